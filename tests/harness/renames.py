"""Directory renames and exchanges through a mount, under increments by other agents.

A mover agent carries the directory that holds managed files back and forth: `mv -T plans
plans_tmp` (out of the managed globs) and back, and `mv -T plans archive/plans` (to another
managed place) and back, reading every file first so that its views are current. A swapper agent
exchanges (renameat2 RENAME_EXCHANGE) managed files with each other and with a directory that
holds a managed file. Bash agents meanwhile read-modify-write every one of those files by its
original name; they meet missing directories, directories where files were, and files that a
move replaced.

`checker.check_moves` judges the whole history, the moves included: every version of every
managed path was made by one recorded action (increment, or the tombstone / moved content of an
accepted move) and is in the log as such; every increment was built on the version just before
its own; every move carried what its source held just before; each counter's last increment is
in exactly one final file; a refused move changed nothing and its refusal is in the log; a move
that failed otherwise (neither done nor refused) is a finding.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from coherent_volume import CoherentVolume

from . import REPO, child
from .checker import check_moves
from .history import Attempt, History, Journal, Move, Read, load_journal
from .judge import unexpected_errors
from .mounts import Mount
from .resolve import EPS, log_versions, refusal_reasons, resolve
from .result import Result
from .sweeps import Sampler, load_records, spawn_shell_agent, stop_all, wait_all
from .volumes import create, raw_read, read_log, seed
from .workers import Workload

MANAGED = ("plans/**", "swap/**", "archive/**")
PREFIXES = ("plans/", "swap/", "archive/")
ROUND_TRIP = ["plans/r0.md", "plans/r1.md", "plans/sub/r2.md"]
SWAPPED = ["swap/x.md", "swap/y.md", "swap/d/inner.md"]
NAMES = ["swap/x.md", "swap/y.md", "swap/d"]
"""What the swapper exchanges: two files and a directory holding a managed file."""
AWAY = ["plans_tmp", "archive/plans"]
"""Where the mover carries plans/: outside every glob, and to another managed place."""
RENAME_EXCHANGE = 2
REFUSALS = (errno.EACCES, errno.EBUSY)
"""How the mount refuses a move: EACCES (the protocol: logged), EBUSY (a write handle on the file
has unsaved changes: docs/mount.md)."""


def _files(base: Path, name: str) -> list[str]:
    """Regular files at or below `name` (relative to `base`), as paths relative to `base`; hidden
    names (a commit's temporary file beside its target) are left out."""
    top = base / name
    try:
        if top.is_file() and not top.is_symlink():
            return [name]
        found = []
        for directory, _, files in os.walk(top):
            found += [os.path.relpath(os.path.join(directory, f), base) for f in files if not f.startswith(".")]
        return sorted(found)
    except OSError:
        return []


def _read_token(path: Path) -> str | None:
    try:
        return Read.of("", path.read_bytes()).token
    except OSError:
        return None


def _plan(mnt: Path, src: str, dst: str, exchange: bool) -> list[list[str | None]] | str:
    """[from, to, token] for every file the move carries, read through the mount just before (a
    tracked read: the mover's view becomes current); or the file that could not be read (gone, or
    torn: being written)."""
    files = []
    ends = [(src, dst)] + ([(dst, src)] if exchange else [])
    for a, b in ends:
        for f in _files(mnt, a):
            token = _read_token(mnt / f)
            if token is None:
                return f
            files.append([f, b + f[len(a) :], token])
    return files


def _libc_exchange(mnt: Path, a: str, b: str) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, os.fsencode(mnt / a), -100, os.fsencode(mnt / b), RENAME_EXCHANGE) == 0:
        return 0
    return ctypes.get_errno()


def _move(mnt: Path, root: Path, agent: str, src: str, dst: str, exchange: bool) -> Move | str:
    """One move through the mount, recorded with what it carried and the trees before and after; or,
    not tried, the file the mover could not read first."""
    files = _plan(mnt, src, dst, exchange)
    if isinstance(files, str):
        return files
    before = _files(root, src) + _files(root, dst)
    t0 = time.time()
    if exchange:
        code = _libc_exchange(mnt, src, dst)
    else:
        mv = subprocess.run(["mv", "-T", src, dst], cwd=mnt, capture_output=True, text=True, timeout=60)
        code = (
            0
            if mv.returncode == 0
            else next(
                (
                    c
                    for c, name in (
                        (errno.EACCES, "Permission denied"),
                        (errno.EBUSY, "resource busy"),
                        (errno.EIO, "Input/output"),
                        (errno.ENOENT, "No such file"),
                        (errno.EPERM, "not permitted"),
                    )
                    if name in mv.stderr
                ),
                -1,
            )
        )
    t1 = time.time()
    name = errno.errorcode.get(code, str(code))
    outcome, reason = ("ok", None) if code == 0 else ("refused", name) if code in REFUSALS else ("error", name)
    return Move(
        agent,
        "exchange" if exchange else "rename",
        src,
        dst,
        files,
        t0,
        t1,
        outcome,
        reason,
        before,
        _files(root, src) + _files(root, dst),
    )


def _carry(
    mnt: Path, root: Path, agent: str, src: str, dst: str, journal: Journal, patience: float
) -> Counter[str] | None:
    """Move `src` to `dst`, trying again (backing off from 1 ms to 50 ms) after each refusal or
    unreadable file for up to `patience` seconds; every move tried is journaled. None once the move
    went in; else why each try failed (an errno's name, or the file that could not be read)."""
    failed: Counter[str] = Counter()
    deadline, pause = time.monotonic() + patience, 0.001
    while True:
        move = _move(mnt, root, agent, src, dst, False)
        if isinstance(move, Move):
            journal.put(move)
            if move.committed:
                return None
            failed[move.reason or move.outcome] += 1
        else:
            failed[f"{move} unreadable"] += 1
        if time.monotonic() >= deadline:
            return failed
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


def mover_main(config: dict) -> None:
    """Carry plans/ away and back `rounds` times (alternating destinations), retrying refusals for
    up to `patience` seconds a move: a move away that never goes in ends the round, one back ends
    the mover (a finding: plans/ is left away)."""
    mnt, root, agent = Path(config["mnt"]), Path(config["root"]), config["agent"]
    rng = random.Random(config["seed"])
    journal = Journal(config["record"])
    for r in range(config["rounds"]):
        away = AWAY[r % len(AWAY)]
        for src, dst in (("plans", away), (away, "plans")):
            failed = _carry(mnt, root, agent, src, dst, journal, config["patience"])
            if failed is None:
                time.sleep(rng.uniform(0.01, 0.08))  # let the bash agents meet the moved tree
            elif src == "plans":
                break
            else:
                journal.close()
                sys.exit(f"could not move {src} back to plans in {config['patience']} s; tries failed: {dict(failed)}")
    journal.close()


def swapper_main(config: dict) -> None:
    """`exchanges` RENAME_EXCHANGEs of two of NAMES, picked at random (refusals count too)."""
    mnt, root, agent = Path(config["mnt"]), Path(config["root"]), config["agent"]
    rng = random.Random(config["seed"])
    journal = Journal(config["record"])
    for _ in range(config["exchanges"]):
        a, b = rng.sample(NAMES, 2)
        move = _move(mnt, root, agent, a, b, True)
        if isinstance(move, Move):
            journal.put(move)
        time.sleep(rng.uniform(0.002, 0.03))
    journal.close()


def _spawn(kind: str, mnt: Path, root: Path, agent: str, record: Path, **config: object) -> subprocess.Popen[str]:
    body = {"mnt": str(mnt), "root": str(root), "agent": agent, "record": str(record), **config}
    return subprocess.Popen(
        child("renames", kind, json.dumps(body)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "COHERENT_AGENT": agent},
    )


def renames(workdir: Path, rounds: int, exchanges: int, agents: int = 3, seed_: int = 0) -> Result:
    """`rounds` round trips of plans/ and `exchanges` exchanges in swap/, under `agents` bash incrementers."""
    root = create(workdir / "renames", MANAGED)
    records = workdir / "renames-records"
    (records / "shell").mkdir(parents=True)
    for d in ("plans/sub", "swap/d", "archive"):
        (root / d).mkdir(parents=True, exist_ok=True)
    paths = ROUND_TRIP + SWAPPED
    producers = seed(root, paths)
    result = Result(f"renames: {rounds} round trips of plans/, {exchanges} exchanges, under increments", agents + 2)
    stop = records / "shell" / "STOP"
    sampler = Sampler(root, paths)
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    sampler.start()
    try:
        with Mount(root, workdir / "renames-mnt") as m:
            work = Workload(paths, attempts=-1, cross=1, fill=300)
            shells = [
                spawn_shell_agent(m.path, f"s{i}", work, records / "shell", seed_ + i, stop) for i in range(agents)
            ]
            procs += shells
            movers = [
                _spawn(
                    "mover", m.path, root, "mover", records / "mover.jsonl", rounds=rounds, patience=120, seed=seed_
                ),
                _spawn(
                    "swapper", m.path, root, "swapper", records / "swapper.jsonl", exchanges=exchanges, seed=seed_ + 1
                ),
            ]
            procs += movers
            for e in wait_all(movers, timeout=900):
                result.fail(e)
            stop.touch()
            for e in wait_all(shells, timeout=120):
                result.fail(e)
    finally:
        stop.touch()
        stop_all(procs)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    _judge(result, root, records, producers, samples)
    return result


def _final(root: Path) -> dict[str, Read]:
    """Every regular file left in the places the moves use."""
    return {f: raw_read(root, f) for top in ("plans", "plans_tmp", "swap", "archive") for f in _files(root, top)}


def _versions(root: Path, paths: set[str]) -> dict[str, int]:
    out = {}
    with CoherentVolume(root, agent="harness-final") as vol:
        for p in sorted(paths):
            try:
                out[p] = vol.version(p)
            except OSError:
                pass  # a directory stands at that name now
    return out


def _attach(moves: list[Move], events: list[dict]) -> None:
    """Give each accepted move the versions its mover's commits and deletions got in its time window."""
    for m in moves:
        if not m.committed or m.t1 is None:
            continue
        touched = {p for f in m.files for p in f[:2] if p is not None}
        for e in events:
            if (
                e["agent"] == m.agent
                and e["kind"] in ("commit", "delete")
                and e["path"] in touched
                and m.t0 <= e["at"] <= m.t1
            ):
                m.versions[e["path"]] = e["version"]


def _follow(attempts: list[Attempt], events: list[dict], moves: list[Move]) -> int:
    """Writes told "success" that the log does not show at their target: the path lookup of their
    open came before a move and the open itself after it, so they reached the file the move
    carried, under its new name (as on any file system). Retarget each one to the managed path
    where the log shows its agent's commit during its write (a move connected the two). (A write
    by a managed name never reaches a file a move carried out of the globs: the mount has it look
    the name up again.) Returns how many."""
    related: dict[str, set[str]] = defaultdict(set)
    for m in moves:
        if m.committed:
            for frm, to, _ in m.files:
                related[frm].add(to)  # type: ignore[index,arg-type]
                related[to].add(frm)  # type: ignore[index,arg-type]
    claimed = {(a.target, a.version) for a in attempts if a.version is not None}
    followed = 0
    for a in attempts:
        if a.outcome != "unlogged" or a.t_write0 is None:
            continue
        end = a.t_write1 if a.t_write1 is not None else a.t_write0
        commits = [
            e
            for e in events
            if e["kind"] == "commit"
            and e["agent"] == a.agent
            and e["path"] in related[a.target]
            and a.t_write0 - EPS <= e["at"] <= end + EPS
            and (e["path"], e["version"]) not in claimed
        ]
        if len(commits) == 1:
            a.target, a.version, a.outcome = commits[0]["path"], commits[0]["version"], "ok"
            claimed.add((a.target, a.version))
            followed += 1
    return followed


def _judge(result: Result, root: Path, records: Path, producers: list, samples: set) -> None:
    events = read_log(root)
    attempts = load_records(records / "shell")
    moves = [
        r
        for f in ("mover.jsonl", "swapper.jsonl")
        if (records / f).exists()
        for r in load_journal(records / f)
        if isinstance(r, Move)
    ]
    resolve(attempts, events)
    followed = _follow(attempts, events, moves)
    for a in attempts:
        if a.outcome == "unlogged":
            result.fail(
                f"false-success: {a.agent} was told its write {a.token} of {a.target} succeeded, but no "
                "logged commit and no moved content shows it"
            )
    _attach(moves, events)
    final = _final(root)
    logged = log_versions(events)
    managed_paths = {p for p in set(logged) | set(final) if p.startswith(PREFIXES)}
    history = History(
        "file",
        True,
        producers,
        attempts,
        samples,
        final,
        _versions(root, managed_paths),
        logged,
        moves=moves,
        managed=PREFIXES,
        refusals=[(e["agent"], e["path"], e["at"]) for e in events if e["kind"] == "refusal"],
    )
    result.absorb(check_moves(history))
    result.tally(attempts, refusal_reasons(events))
    unexpected_errors(result, attempts, ("ENOENT", "EISDIR", "ENOTDIR", "ESTALE"))  # what the moves make them meet
    result.attempts += len(moves)
    result.accepted += sum(m.committed for m in moves)
    result.refusals.update(Counter(f"{m.op} {m.reason}" for m in moves if m.reason not in (None, "EACCES")))
    for op in ("rename", "exchange"):
        done = [m for m in moves if m.op == op]
        result.stats[f"{op}s accepted"] = sum(m.committed for m in done)
        result.stats[f"{op}s refused"] = sum(m.outcome == "refused" for m in done)
    result.stats["round trips out of the globs"] = sum(m.committed and m.dst == "plans_tmp" for m in moves)
    result.stats["exchanges with the directory"] = sum(
        m.committed and m.op == "exchange" and "swap/d" in (m.src, m.dst) for m in moves
    )
    result.stats["writes that followed their file to its new name"] = followed


if __name__ == "__main__":
    {"mover": mover_main, "swapper": swapper_main}[sys.argv[1]](json.loads(sys.argv[2]))
