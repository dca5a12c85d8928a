"""Short versions of every torture scenario (scripts/torture.py; `--full` runs the long ones).

Each scenario records its history and hands it to the independent checker
(scripts/torturelib/checker.py); a passing scenario has no violation. The control runs show the
checker catching lost updates (plain directory) and write skew (file isolation judged as
read-set), and the doctored histories show each of its rules firing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))

from torturelib import checker, crashes, faults, foreign, fuzz, isolation  # noqa: E402
from torturelib.history import Attempt, History, Producer, Read  # noqa: E402
from torturelib.result import Result  # noqa: E402
from torturelib.suite import QUICK, control_specs, sweep_specs  # noqa: E402
from torturelib.sweeps import run_sweep  # noqa: E402


def explain(result: Result) -> str:
    kinds = ", ".join(f"{k} {n}" for k, n in result.kinds.most_common())
    return f"{result.scenario}: {result.violations} violations ({kinds})\n" + "\n".join(result.messages[:10])


@pytest.fixture(autouse=True)
def no_mount_left_behind(tmp_path: Path):
    yield
    with open("/proc/self/mounts") as f:
        left = [line.split()[1] for line in f if line.split()[1].startswith(str(tmp_path))]
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

def _history(*commits: tuple[str, str, str, int], final: str | None = None, isolation: str = "file",
             reads: dict[str, list[Read]] | None = None) -> History:
    """Seeds f and g at v1; commits are (token, path, built-on token, version)."""
    seeds = [Producer("seed", p, f"seed-{p}", 0, 1, 0.0, "setup") for p in ("f", "g")]
    counts = {s.token: 0 for s in seeds}
    attempts = []
    for i, (token, path, base, version) in enumerate(commits):
        counts[token] = counts[base] + 1
        extra = (reads or {}).get(token, [])
        attempts.append(Attempt("a", path, token, base, counts[token], extra + [Read(path, base, None, counts[base])],
                                float(i), float(i) + 0.1, float(i) + 0.2, "ok", None, version))
    last = {p: max((c for c in commits if c[1] == p), key=lambda c: c[3], default=None) for p in ("f", "g")}
    final_tokens = {p: (c[0] if c else f"seed-{p}") for p, c in last.items()}
    if final is not None:
        final_tokens["f"] = final
    return History(isolation, True, seeds, attempts, set(),
                   {p: Read(p, t, None, counts.get(t, 0)) for p, t in final_tokens.items()},
                   {p: (c[3] if c else 1) for p, c in last.items()})


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


# ---- crashes, foreign writes, resource faults ------------------------------------------------

def test_kill9_of_writers(tmp_path: Path) -> None:
    result = crashes.writer_kills(tmp_path, QUICK.writer_kills)
    assert result.passed, explain(result)
    assert result.stats["kills"] >= QUICK.writer_kills and result.stats["reclaims"] >= 1
    assert result.stats["max_reclaim_s"] < 3.0


def test_kill9_of_the_mount_daemon(tmp_path: Path) -> None:
    result = crashes.daemon_kills(tmp_path, QUICK.daemon_kills)
    assert result.passed, explain(result)
    assert result.stats["daemon_kills"] == QUICK.daemon_kills


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

@pytest.mark.parametrize("fuzzer", [fuzz.fuzz_paths, fuzz.fuzz_globs, fuzz.fuzz_registry],
                         ids=["paths", "globs", "registry"])
def test_fuzzed_bad_input_gets_typed_errors_and_loses_nothing(fuzzer, tmp_path: Path) -> None:
    result = fuzzer(tmp_path, QUICK.fuzz_examples)
    assert result.passed, explain(result)


def test_registry_is_isolated_from_the_mount_and_other_users(tmp_path: Path) -> None:
    result = isolation.registry_isolation(tmp_path)
    assert result.passed, explain(result)
