"""Short versions of every torture scenario (tests/harness/torture.py, run as scripts/torture.py;
`--full` runs the long ones).

Each scenario records its history and hands it to the independent checker
(tests/harness/checker.py); a passing scenario has no violation. The control runs show the
checker catching lost updates (plain directory) and write skew (file isolation judged as
read-set), and the doctored histories show each of its rules firing (for counters, the content
store, appended lines, in-place slots, content carried by renames, and grants).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .harness import checker, crashes, faults, foreign, fuzz, isolation, links, lockholders, renames, same_agent
from .harness.history import (
    Append,
    Attempt,
    History,
    Hold,
    Move,
    Producer,
    Read,
    SlotWrite,
    StoreAudit,
    StoredVersion,
)
from .harness.mounts import fuse_mounts_under
from .harness.result import Result
from .harness.suite import QUICK, control_specs, sweep_specs
from .harness.sweeps import run_sweep


def explain(result: Result) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in result.kinds.most_common())
    return f"{result.scenario}: {result.violations} violations ({kinds})\n" + "\n".join(result.messages[:10])


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path):
    yield
    left = fuse_mounts_under(tmp_path)
    assert not left, f"mounts left behind: {left}"


# ---- contention sweeps -------------------------------------------------------------------


@pytest.mark.parametrize("face", ["threads", "processes", "shell"])
def test_contention_sweep_has_no_violation(face: str, tmp_path: Path) -> None:
    for spec in sweep_specs(QUICK, (face,)):
        result = run_sweep(spec, tmp_path)
        assert result.passed, explain(result)
        assert result.attempts >= spec.attempts * 0.9 and result.accepted > 0, result


@pytest.mark.parametrize("spec", control_specs(QUICK), ids=lambda s: s.name)
def test_checker_finds_violations_in_control_runs(spec, tmp_path: Path) -> None:
    result = run_sweep(spec, tmp_path)
    assert result.violations > 0, "the checker missed the lost updates / write skew of a control run"
    expected = {"same-base", "final-count"} if spec.face == "plain" else {"write-skew", "stale-read-set"}
    assert set(result.kinds) <= expected | {"lost-update"} and set(result.kinds) & expected, result.kinds


# ---- the checker on doctored histories ------------------------------------------------------


def _history(
    *commits: tuple[str, str, str, int],
    final: str | None = None,
    isolation: str = "file",
    reads: dict[str, list[Read]] | None = None,
) -> History:
    """Seeds f and g at v1; commits are (token, path, built-on token, version)."""
    seeds = [Producer("seed", p, f"seed-{p}", 0, 1, 0.0, "setup") for p in ("f", "g")]
    counts = {s.token: 0 for s in seeds}
    attempts = []
    for i, (token, path, base, version) in enumerate(commits):
        counts[token] = counts[base] + 1
        extra = (reads or {}).get(token, [])
        attempts.append(
            Attempt(
                "a",
                path,
                token,
                base,
                counts[token],
                extra + [Read(path, base, None, counts[base])],
                float(i),
                float(i) + 0.1,
                float(i) + 0.2,
                "ok",
                None,
                version,
            )
        )
    last = {p: max((c for c in commits if c[1] == p), key=lambda c: c[3], default=None) for p in ("f", "g")}
    final_tokens = {p: (c[0] if c else f"seed-{p}") for p, c in last.items()}
    if final is not None:
        final_tokens["f"] = final
    return History(
        isolation,
        True,
        seeds,
        attempts,
        set(),
        {p: Read(p, t, None, counts.get(t, 0)) for p, t in final_tokens.items()},
        {p: (c[3] if c else 1) for p, c in last.items()},
    )


def kinds(history: History) -> set[str]:
    return set(checker.check(history).kinds)


def test_checker_accepts_a_clean_history() -> None:
    assert kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 3))) == set()


def test_checker_flags_each_kind_of_violation() -> None:
    assert "same-base" in kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "seed-f", 3)))
    assert "lost-update" in kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "seed-f", 3)))
    assert "duplicate-version" in kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 2)))
    assert "version-gap" in kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 4)))
    assert "final-content" in kinds(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 3), final="x"))
    assert "uncommitted-visible" in kinds(_history(("x", "f", "seed-f", 2), final="never-committed"))
    torn = _history(("x", "f", "seed-f", 2))
    torn.samples.add(("f", None))
    assert "torn" in kinds(torn)


def test_checker_flags_write_skew_only_under_read_set_isolation() -> None:
    skew = dict(reads={"x": [Read("g", "seed-g", None, 0)], "y": [Read("f", "seed-f", None, 0)]})
    commits = (("x", "f", "seed-f", 2), ("y", "g", "seed-g", 2))
    assert kinds(_history(*commits, **skew)) == set()
    assert "write-skew" in kinds(_history(*commits, isolation="read-set", **skew))


def _audited(history: History) -> History:
    """`history` with a log and a content store that agree with it: each version stored whole."""
    made = [(p.path, p.version, p.token, p.agent or "setup") for p in history.producers]
    made += [(a.target, a.version, a.token, a.agent) for a in history.attempts]
    store = StoreAudit()
    for path, version, token, agent in made:
        assert version is not None
        history.log.setdefault(path, {})[version] = ("commit", agent)
        rows = store.versions.setdefault(path, {})
        rows[version] = StoredVersion(path, version, "commit", agent, f"h-{token}", "ok", Read(path, token))
    for path, rows in store.versions.items():
        last = rows[max(rows)]
        store.current[path] = (last.version, last.hash)
        store.disk[path] = last.hash
    history.store = store
    return history


def _store_kinds(
    *changes: tuple[int, dict[str, object]], disk: str | None = None, current: tuple[int, str] | None = None
) -> set[str]:
    """What the checker finds in an audited history (f: seed v1, x v2, y v3) whose stored versions
    get `changes` (version, {attribute: value}), whose file on disk hashes to `disk` and whose
    registry records `current` as f's current (version, hash), when given."""
    h = _audited(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 3)))
    assert h.store is not None
    for version, values in changes:
        for name, value in values.items():
            setattr(h.store.versions["f"][version], name, value)
    if disk is not None:
        h.store.disk["f"] = disk
    if current is not None:
        h.store.current["f"] = current
    return kinds(h)


def test_checker_on_the_content_store() -> None:
    assert _store_kinds() == set()
    assert _store_kinds((2, {"state": "missing", "read": None})) == {"store-missing"}
    assert _store_kinds((2, {"state": "damaged"})) == {"store-damaged"}
    assert "store-torn" in _store_kinds((2, {"read": Read("f", None)}))  # v2's bytes are no whole payload
    assert _store_kinds((2, {"read": Read("f", "y")})) == {"store-content"}  # v2 keeps v3's bytes
    assert "store-no-hash" in _store_kinds((3, {"hash": None, "state": "none"}))  # a commit with no hash
    assert _store_kinds((3, {"writer": "someone-else"})) == {"store-log"}
    assert _store_kinds(disk="h-x") == {"store-final"}  # the file is not its current version's bytes
    assert _store_kinds(current=(3, "h-x")) == {"store-current"}
    h = _audited(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 3)))
    assert h.store is not None
    del h.store.versions["f"][2]
    assert {"store-gap", "store-unrecorded"} <= kinds(h)
    h = _audited(_history(("x", "f", "seed-f", 2), ("y", "f", "x", 3)))
    del h.log["f"][3]
    assert "store-unlogged" in kinds(h)
    # the retention policy may let an old version's bytes go, never the current version's
    assert _store_kinds((2, {"state": "pruned", "read": None})) == set()
    assert _store_kinds((3, {"state": "pruned", "read": None})) == {"store-pruned-current"}


# ---- crashes, foreign writes, resource faults ------------------------------------------------


def test_kill9_of_writers(tmp_path: Path) -> None:
    result = crashes.writer_kills(tmp_path, QUICK.writer_kills)
    assert result.passed, explain(result)
    assert result.stats["kills"] >= QUICK.writer_kills and result.stats["reclaims"] >= 1
    assert result.stats["max_reclaim_s"] < 3.0
    assert result.stats["versions whose stored bytes hash right"] > QUICK.writer_kills  # the store was audited


def test_kill9_of_the_mount_daemon(tmp_path: Path) -> None:
    result = crashes.daemon_kills(tmp_path, QUICK.daemon_kills)
    assert result.passed, explain(result)
    assert result.stats["daemon_kills"] == QUICK.daemon_kills
    assert result.stats["versions whose stored bytes hash right"] > 0  # the store was audited


def test_foreign_writes_under_load(tmp_path: Path) -> None:
    result = foreign.foreign_writes(tmp_path, QUICK.foreign_writes)
    assert result.passed, explain(result)


def test_full_file_system(tmp_path: Path) -> None:
    result = faults.enospc(tmp_path)
    assert result.passed, explain(result)


def test_registry_locked_past_the_busy_timeout(tmp_path: Path) -> None:
    result = faults.busy_registry(tmp_path)
    assert result.passed, explain(result)


def test_backing_file_deleted_under_open_handles(tmp_path: Path) -> None:
    result = faults.deleted_backing_file(tmp_path)
    assert result.passed, explain(result)


# ---- bad input and isolation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "fuzzer", [fuzz.fuzz_paths, fuzz.fuzz_globs, fuzz.fuzz_registry], ids=["paths", "globs", "registry"]
)
def test_fuzzed_bad_input_gets_typed_errors_and_loses_nothing(fuzzer, tmp_path: Path) -> None:
    result = fuzzer(tmp_path, QUICK.fuzz_examples)
    assert result.passed, explain(result)


def test_registry_is_isolated_from_the_mount_and_other_users(tmp_path: Path) -> None:
    result = isolation.registry_isolation(tmp_path)
    assert result.passed, explain(result)


# ---- same-agent concurrency, renames, links, lock holders -------------------------------------


def test_processes_of_one_agent_lose_no_appended_line_and_no_in_place_write(tmp_path: Path) -> None:
    result = same_agent.same_agent(
        tmp_path, QUICK.same_agent_appends, QUICK.same_agent_slot_writes, QUICK.same_agent_processes
    )
    assert result.passed, explain(result)
    assert result.stats["lines"] >= QUICK.same_agent_appends * QUICK.same_agent_processes
    # the agent's processes did have handles open at once (so replays onto its own commits happened)
    assert result.stats["alice_appends_overlapping"] > 0 and result.stats["alice_slot_writes_overlapping"] > 0


def test_directory_renames_and_exchanges_lose_nothing(tmp_path: Path) -> None:
    result = renames.renames(tmp_path, QUICK.rename_rounds, QUICK.exchanges)
    assert result.passed, explain(result)
    assert result.stats["renames accepted"] >= 2 * QUICK.rename_rounds
    assert result.stats["exchanges accepted"] > 0 and result.stats["exchanges with the directory"] > 0


def test_links_and_symlinks_cannot_reach_managed_bytes(tmp_path: Path) -> None:
    result = links.links(tmp_path, QUICK.link_rounds)
    assert result.passed, explain(result)
    assert result.stats["stale writes through symlinks refused"] > 0


def test_a_forked_child_never_keeps_a_killed_writers_commit_lock(tmp_path: Path) -> None:
    result = lockholders.forked_holders(tmp_path, QUICK.forked_kills)
    assert result.passed, explain(result)
    assert result.stats["killed_holding_the_commit_lock"] >= 1
    assert result.stats["forked_children_alive_at_the_kill"] == QUICK.forked_kills


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return (
        subprocess.run(
            ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
        ).returncode
        == 0
    )


@pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --pid --fork --mount-proc")
def test_a_lock_holder_in_another_pid_namespace_holds_until_its_ttl(tmp_path: Path) -> None:
    result = lockholders.pid_namespaces(tmp_path, QUICK.ns_holders, QUICK.ns_grants, QUICK.ns_kill_ttl)
    assert result.passed, explain(result)
    assert result.stats["host_writes_refused_held"] > 0 and result.stats["killed_holding"] == QUICK.ns_holders


# ---- the new rules of the checker on doctored records -------------------------------------------

APPENDS = [
    Append("a.p0", "a", "a.p0.0", 0, 0.0, 0.1, "ok"),
    Append("a.p0", "a", "a.p0.1", 1, 0.2, 0.3, "ok"),
    Append("a.p1", "a", "a.p1.0", 0, 0.0, 0.1, "ok"),
    Append("b.p0", "b", "b.p0.0", 0, 0.0, 0.1, "refused", "EACCES"),
]
LINES_LOG = {1: ("commit", "seed"), 2: ("commit", "a"), 3: ("commit", "a"), 4: ("commit", "a")}


def append_kinds(final: str, log: dict = LINES_LOG) -> set[str]:
    return set(checker.check_appends("log", APPENDS, final, [], log, "seed").kinds)


def test_checker_on_appended_lines() -> None:
    assert append_kinds("a.p0.0\na.p1.0\na.p0.1\n") == set()
    assert "lost-line" in append_kinds("a.p0.0\na.p1.0\n")
    assert "uncommitted-visible" in append_kinds("a.p0.0\na.p1.0\na.p0.1\nb.p0.0\n")
    assert "uncommitted-visible" in append_kinds("a.p0.0\na.p1.0\na.p0.1\nnobody\n")
    assert "reordered" in append_kinds("a.p0.1\na.p1.0\na.p0.0\n")
    assert "duplicate-line" in append_kinds("a.p0.0\na.p1.0\na.p0.1\na.p0.0\n")
    assert "torn" in append_kinds("a.p0.0\na.p1.0\na.p0.1")
    assert "unrecorded-commit" in append_kinds("a.p0.0\na.p1.0\na.p0.1\n", {**LINES_LOG, 5: ("commit", "a")})
    assert "version-gap" in append_kinds(
        "a.p0.0\na.p1.0\na.p0.1\n", {**{k: v for k, v in LINES_LOG.items() if k != 3}, 5: ("commit", "a")}
    )


def slot_kinds(writes: list[SlotWrite], final: str) -> set[str]:
    log = {1: ("commit", "seed"), **{i + 2: ("commit", "a") for i in range(sum(w.outcome == "ok" for w in writes))}}
    return set(checker.check_slots("slots", writes, final, {"x": 0, "y": 0}, log, "seed").kinds)


def test_checker_on_in_place_slots() -> None:
    w = [
        SlotWrite("x", "a", 0, 0, 1, 0.0, 0.1, "ok"),
        SlotWrite("y", "a", 0, 0, 1, 0.0, 0.1, "ok"),
        SlotWrite("x", "a", 1, 1, 2, 0.2, 0.3, "ok"),
        SlotWrite("x", "a", 2, None, None, 0.4, 0.5, "refused", "EACCES"),
    ]
    assert slot_kinds(w, "x 000000002\ny 000000001\n") == set()
    # another handle's commit put slot x back to 0: the next write handle reads 0, not 1
    clobbered = w[:2] + [SlotWrite("x", "a", 1, 0, 1, 0.2, 0.3, "ok")]
    assert "lost-update" in slot_kinds(clobbered, "x 000000001\ny 000000001\n")
    assert "final-count" in slot_kinds(w, "x 000000001\ny 000000001\n")
    assert "torn" in slot_kinds(w, "x 000000002\n")


def _moved(**change: object) -> History:
    """Seed f at p/f v1; s increments it (v2); m moves p/ out of the globs (v3, a tombstone) and
    back (v4); s increments it again (v5)."""
    seed = Producer("seed", "p/f", "seed-f", 0, 1, 0.0, "setup")
    x = Attempt("s", "p/f", "x", "seed-f", 1, [Read("p/f", "seed-f", None, 0)], 1.0, 1.1, 1.2, "ok", None, 2)
    y = Attempt("s", "p/f", "y", "x", 2, [Read("p/f", "x", None, 1)], 5.0, 5.1, 5.2, "ok", None, 5)
    out = Move("m", "rename", "p", "tmp", [["p/f", "tmp/f", "x"]], 2.0, 2.1, "ok", None, ["p/f"], ["tmp/f"], {"p/f": 3})
    back = Move(
        "m", "rename", "tmp", "p", [["tmp/f", "p/f", "x"]], 3.0, 3.1, "ok", None, ["tmp/f"], ["p/f"], {"p/f": 4}
    )
    log = {
        "p/f": {1: ("commit", "setup"), 2: ("commit", "s"), 3: ("delete", "m"), 4: ("commit", "m"), 5: ("commit", "s")}
    }
    h = History(
        "file",
        True,
        [seed],
        [x, y],
        set(),
        {"p/f": Read("p/f", "y", "x", 2)},
        {"p/f": 5},
        log,
        moves=[out, back],
        managed=("p/",),
    )
    for key, value in change.items():
        setattr(h, key, value)
    return h


def move_kinds(history: History) -> set[str]:
    return set(checker.check_moves(history).kinds)


def test_checker_on_content_carried_by_renames() -> None:
    assert move_kinds(_moved()) == set()
    h = _moved()
    h.moves[1].versions = {}
    h.log["p/f"][4] = ("foreign", "external")  # the move back was not recorded as the mover's
    assert {"unlogged-move", "unrecorded-commit"} <= move_kinds(h)
    h = _moved()
    h.moves[0].files = [["p/f", "tmp/f", "seed-f"]]  # the mover's view was stale
    assert "moved-stale" in move_kinds(h)
    h = _moved()
    h.attempts[1].prev, h.attempts[1].reads = "seed-f", [Read("p/f", "seed-f", None, 0)]
    h.attempts[1].count = 1
    assert {"lost-update", "same-base"} <= move_kinds(h)
    assert {"final-content", "final-count"} <= move_kinds(_moved(final={"p/f": Read("p/f", "x", "seed-f", 1)}))
    assert {"final-content", "final-count"} <= move_kinds(_moved(final={}))  # the counter's file is gone
    refused = Move(
        "m", "rename", "p", "tmp", [["p/f", "tmp/f", "y"]], 6.0, 6.1, "refused", "EACCES", ["p/f"], ["tmp/f"]
    )
    h = _moved()
    h.moves.append(refused)
    assert {"refused-but-moved", "unlogged-refusal"} <= move_kinds(h)
    h.refusals = [("m", "p/f", 6.05)]
    refused.after = ["p/f"]
    assert move_kinds(h) == set()
    h.moves.append(Move("m", "exchange", "p/f", "p/d", [["p/f", "p/d", "y"]], 7.0, 7.1, "error", "EIO", [], []))
    assert move_kinds(h) == {"move-error"}


def test_checker_on_grants() -> None:
    holds = [Hold("in", "p", 10.0, 20.0, 100.0), Hold("in", "p", 30.0, None, 40.0)]
    events = [
        {"kind": "grant", "path": "p", "agent": "in", "at": 9.9, "version": None, "detail": None},
        {"kind": "release", "path": "p", "agent": "in", "at": 20.1, "version": None, "detail": None},
        {"kind": "grant", "path": "p", "agent": "in", "at": 29.9, "version": None, "detail": None},
        {"kind": "reclaim", "path": "p", "agent": "in", "at": 40.2, "version": None, "detail": "expired"},
    ]
    assert not checker.check_holds(holds, events, []).kinds
    inside = {"kind": "commit", "path": "p", "agent": "host", "at": 15.0, "version": 3, "detail": None}
    assert set(checker.check_holds(holds, events + [inside], []).kinds) == {"held-write"}
    early = [*events[:3], {**events[3], "at": 31.0, "detail": "write grant reclaimed: its process died"}]
    assert set(checker.check_holds(holds, early, []).kinds) == {"early-reclaim"}
    accepted = Attempt("host", "p", "h.1", "x", 1, [], 11.0, 12.0, 13.0, "ok", None, 3)
    assert set(checker.check_holds(holds, events, [accepted]).kinds) == {"held-write"}
    assert "unlogged-grant" in checker.check_holds(holds, events[2:], []).kinds
