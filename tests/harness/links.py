"""Hard links and symlinks against managed files, while other agents increment them.

An attacker agent in the mount tries, round after round, every way to give a managed file's
bytes a second name no rule guards: hard links to and from managed paths, symlinks inside the
managed globs (to unmanaged and to managed files, at a name that may hold managed paths), moving
a symlink, or a file that has a second hard link, into the globs. Each must fail with EPERM, and had one succeeded, the attacker would
have written a payload through it (which the history checker would find as content nobody
committed). Symlinks outside the globs that point into them are allowed: a write through one is
a write of the managed file, so the attacker's stale writes through them must be refused like
any other. Through the API, writes through managed names that resolve (by symlinks planted in the
backing directory behind the volume's back) to unmanaged files must raise UnprotectedAlias, and
a stale write through a planted symlink between managed names must be refused.

Every probe's outcome is recorded; the counters (and the attacker's writes through the allowed
symlinks) are judged by the ordinary history check; at the end no managed file has a second
hard link, no symlink but the planted ones exists inside the globs, and the unmanaged files the
planted symlinks reach are unchanged.
"""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from . import REPO, child, payload
from .history import Attempt, Journal, Probe, Read, Recorder, load_journal
from .judge import judge_volume, unexpected_errors
from .mounts import Mount
from .result import Result
from .sweeps import Sampler, load_records, spawn_shell_agent, stop_all, wait_all
from .volumes import create, raw_read, seed
from .workers import Workload

PATHS = ["plans/a.md", "plans/b.md"]
PLANTED = {"plans/out.md": "../free.txt", "plans/outdir": "../elsewhere", "plans/alias.md": "a.md"}
"""Symlinks made in the backing directory behind the volume's back, before the mount."""
ALLOWED = {"alias.txt": "plans/a.md", "plans_link": "plans"}
"""Symlinks outside the globs, made through the mount (allowed): writes through them are guarded."""
MUST_NOT_EXIST = [
    "stolen.txt",
    "plans/new.md",
    "plans/a2.md",
    "plans/link.md",
    "plans/alias2.md",
    "notes",
    "plans/moved.md",
    "plans/linked.md",
]
MANAGED = ("plans/**", "notes/*.md")
"""`notes` is no managed path, but managed paths may be below it."""


def _errno_of(call) -> str:  # type: ignore[no-untyped-def]
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, type(e).__name__)


def _attacks(mnt: Path) -> list[tuple[str, object, object]]:
    """(name, the attempt, what to write through what it made if it succeeded)."""
    return [
        (
            "hard link: managed -> unmanaged name",
            lambda: os.link(mnt / "plans/a.md", mnt / "stolen.txt"),
            mnt / "stolen.txt",
        ),
        (
            "hard link: unmanaged -> managed name",
            lambda: os.link(mnt / "free.txt", mnt / "plans/new.md"),
            mnt / "plans/new.md",
        ),
        (
            "hard link: managed -> managed name",
            lambda: os.link(mnt / "plans/a.md", mnt / "plans/a2.md"),
            mnt / "plans/a2.md",
        ),
        (
            "symlink in the globs -> unmanaged file",
            lambda: os.symlink("../free.txt", mnt / "plans/link.md"),
            mnt / "plans/link.md",
        ),
        (
            "symlink in the globs -> managed file",
            lambda: os.symlink("a.md", mnt / "plans/alias2.md"),
            mnt / "plans/alias2.md",
        ),
        (
            "symlink at a name that may hold managed paths",
            lambda: os.symlink("elsewhere", mnt / "notes"),
            mnt / "notes/c.md",
        ),
        (
            "rename a symlink into the globs",
            lambda: os.rename(mnt / "lnk.txt", mnt / "plans/moved.md"),
            mnt / "plans/moved.md",
        ),
        (
            "rename a file with a second hard link into the globs",
            lambda: os.rename(mnt / "free-link.txt", mnt / "plans/linked.md"),
            mnt / "free.txt",
        ),
    ]


def _stale_write(
    mnt: Path,
    root: Path,
    agent: str,
    via: str,
    target: str,
    n: int,
    recorder: Recorder,
    journal: Journal,
    rng: random.Random,
) -> None:
    """Read `target` through the symlinked name `via`, wait until someone else commits it, then
    write through `via`: that write is stale and must be refused (EACCES)."""
    t_read = time.time()
    try:
        base = Read.of(target, (mnt / via).read_bytes())
    except OSError:
        return
    if base.token is None:
        return
    deadline = time.monotonic() + 3
    while raw_read(root, target).token == base.token and time.monotonic() < deadline:
        time.sleep(0.003)
    stale = raw_read(root, target).token != base.token
    attempt = Attempt(agent, target, f"{agent}.{n}", base.token, (base.count or 0) + 1, [base], t_read)
    data = payload.make(attempt.token, base.token, attempt.count, rng.randint(0, 300))
    attempt.t_write0 = time.time()
    recorder.begin(attempt)
    got = _errno_of(lambda: (mnt / via).write_bytes(data))
    attempt.t_write1 = time.time()
    attempt.outcome, attempt.reason = (
        ("ok", None) if got == "ok" else ("refused", got) if got == "EACCES" else ("error", got)
    )
    recorder.end(attempt)
    journal.put(
        Probe(
            f"stale write through the symlink {via}",
            agent,
            "EACCES" if stale else got,
            got,
            attempt.t_write0,
            "" if stale else "nobody committed meanwhile: not stale",
        )
    )


def attacker_main(config: dict) -> None:
    mnt, root, agent = Path(config["mnt"]), Path(config["root"]), config["agent"]
    rng = random.Random(config["seed"])
    journal, recorder = Journal(config["probes"]), Recorder(config["record"])
    for name, value in ALLOWED.items():
        got = _errno_of(lambda value=value, name=name: os.symlink(value, mnt / name))
        journal.put(Probe(f"symlink outside the globs ({name} -> {value})", agent, "ok", got, time.time()))
    n = 0
    for r in range(config["rounds"]):
        for name, attack, through in _attacks(mnt):
            if name == "rename a symlink into the globs":  # allowed outside the globs
                _errno_of(lambda: os.symlink("free.txt", mnt / "lnk.txt"))
            elif name.startswith("rename a file with a second hard link"):
                _errno_of(lambda: os.link(mnt / "free.txt", mnt / "free-link.txt"))
            got = _errno_of(attack)
            detail = ""
            if got == "ok":  # it must not have worked: show what it lets a write do
                data = payload.make(f"{agent}.through.{r}", "-", 0)
                wrote = _errno_of(lambda through=through, data=data: Path(through).write_bytes(data))  # type: ignore[misc]
                detail = f"and a write through it: {wrote}"
            # a link from a managed file whose write handle is open meets the kernel's ENOENT first:
            # the mount then reports the file with st_nlink 0 (its shadow's), see the report
            expected = "EPERM|ENOENT" if name.startswith("hard link: managed ->") else "EPERM"
            journal.put(Probe(name, agent, expected, got, time.time(), detail))
        _errno_of(lambda: os.unlink(mnt / "lnk.txt"))
        _errno_of(lambda: os.unlink(mnt / "free-link.txt"))
        for via, target in (("alias.txt", "plans/a.md"), ("plans_link/b.md", "plans/b.md")):
            _stale_write(mnt, root, agent, via, target, n, recorder, journal, rng)
            n += 1
    _api_probes(root, config["api_agent"], config["rounds"], journal, Recorder(config["api_record"]), rng)
    journal.close()
    recorder.close()


def _api_probes(root: Path, agent: str, rounds: int, journal: Journal, recorder: Recorder, rng: random.Random) -> None:
    """Through the Python API: writes through planted symlinks to unmanaged files are refused
    (UnprotectedAlias) and leave those files alone; a stale write through a planted symlink
    between managed names is refused."""
    from coherent_volume import CoherentVolume

    with CoherentVolume(root, agent=agent) as vol:
        for r in range(rounds):
            for rel, outside in (("plans/out.md", "free.txt"), ("plans/outdir/c.md", "elsewhere/c.md")):
                before = (root / outside).read_bytes()
                try:
                    vol.write(rel, payload.make(f"{agent}.alias.{r}", "-", 0))
                    got = "ok"
                except Exception as e:
                    got = type(e).__name__
                changed = (root / outside).read_bytes() != before
                journal.put(
                    Probe(
                        f"API write through {rel} -> {outside}",
                        agent,
                        "UnprotectedAlias",
                        "changed it" if changed else got,
                        time.time(),
                    )
                )
            t_read = time.time()
            base = Read.of("plans/a.md", vol.read("plans/a.md"))
            deadline = time.monotonic() + 3
            while raw_read(root, "plans/a.md").token == base.token and time.monotonic() < deadline:
                time.sleep(0.003)
            stale = raw_read(root, "plans/a.md").token != base.token
            attempt = Attempt(agent, "plans/a.md", f"{agent}.{r}", base.token, (base.count or 0) + 1, [base], t_read)
            attempt.t_write0 = time.time()
            recorder.begin(attempt)
            try:
                attempt.version = vol.write(
                    "plans/alias.md", payload.make(attempt.token, base.token or "-", attempt.count, rng.randint(0, 300))
                )
                attempt.outcome, got = "ok", "ok"
            except Exception as e:
                attempt.outcome, attempt.reason, got = "refused", getattr(e, "reason", type(e).__name__), "refused"
            attempt.t_write1 = time.time()
            recorder.end(attempt)
            journal.put(
                Probe(
                    "API stale write through plans/alias.md -> a.md",
                    agent,
                    "refused" if stale else got,
                    got,
                    attempt.t_write0,
                )
            )
    recorder.close()


def links(workdir: Path, rounds: int, agents: int = 2, seed_: int = 0) -> Result:
    """`rounds` rounds of every link attack under `agents` bash incrementers of plans/a.md and b.md."""
    root = create(workdir / "links", MANAGED)
    records, probes = workdir / "links-records", workdir / "links-probes"
    records.mkdir()
    probes.mkdir()
    producers = seed(root, PATHS)
    (root / "free.txt").write_text("free, unmanaged\n")
    (root / "elsewhere").mkdir()
    (root / "elsewhere/c.md").write_text("elsewhere, unmanaged\n")
    for name, value in PLANTED.items():
        os.symlink(value, root / name)
    untouched = {p: (root / p).read_bytes() for p in ("free.txt", "elsewhere/c.md")}
    result = Result(f"links: {rounds} rounds of link and symlink attacks, under increments", agents + 2)
    stop = records / "STOP"
    sampler = Sampler(root, PATHS)
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    sampler.start()
    try:
        with Mount(root, workdir / "links-mnt") as m:
            work = Workload(PATHS, attempts=-1, cross=1, fill=300)
            shells = [spawn_shell_agent(m.path, f"s{i}", work, records, seed_ + i, stop) for i in range(agents)]
            procs += shells
            config = {
                "mnt": str(m.path),
                "root": str(root),
                "agent": "mallory",
                "api_agent": "mallory-api",
                "rounds": rounds,
                "seed": seed_,
                "probes": str(probes / "probes.jsonl"),
                "record": str(records / "mallory.jsonl"),
                "api_record": str(records / "mallory-api.jsonl"),
            }
            attacker = subprocess.Popen(
                child("links", "attacker", json.dumps(config)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
                env={**os.environ, "COHERENT_AGENT": "mallory"},
            )
            procs.append(attacker)
            for e in wait_all([attacker], timeout=900):
                result.fail(e)
            stop.touch()
            for e in wait_all(shells, timeout=120):
                result.fail(e)
    finally:
        stop.touch()
        stop_all(procs)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    attempts = load_records(records)
    judge_volume(result, root, PATHS, attempts, producers, samples, "file", shell=True)
    unexpected_errors(result, attempts)
    _judge_probes(result, root, probes / "probes.jsonl", untouched)
    return result


def _judge_probes(result: Result, root: Path, probes_file: Path, untouched: dict[str, bytes]) -> None:
    probes = [p for p in load_journal(probes_file) if isinstance(p, Probe)] if probes_file.exists() else []
    for p in probes:
        if not p.name.startswith(("stale", "API stale")):  # those are attempts of the history already
            result.attempts += 1
            if p.got == "ok":
                result.accepted += 1
            else:
                result.refusals[p.got] += 1
        if not p.held:
            result.fail(f"{p.name} by {p.agent}: {p.got}, expected {p.expected} {p.detail}".rstrip())
    result.stats["probes"] = len(probes)
    result.stats["hard links refused ENOENT (st_nlink 0 while a write handle was open)"] = sum(
        p.name.startswith("hard link") and p.got == "ENOENT" for p in probes
    )
    result.stats["stale writes through symlinks refused"] = sum(
        p.name.startswith(("stale", "API stale")) and p.expected != "ok" and p.held for p in probes
    )
    if not probes:
        result.fail("harness: no probe was recorded")
    for path in PATHS:
        if (links := os.lstat(root / path).st_nlink) != 1:
            result.fail(f"{path} has {links} hard links")
    found = {
        os.path.relpath(os.path.join(d, f), root)
        for d, dirs, files in os.walk(root / "plans")
        for f in files + dirs
        if os.path.islink(os.path.join(d, f))
    }
    if found != set(PLANTED):
        result.fail(f"symlinks inside the globs: {sorted(found)}, planted only {sorted(PLANTED)}")
    for name in MUST_NOT_EXIST:
        if os.path.lexists(root / name):
            result.fail(f"{name} exists: an attack left something behind")
    for path, data in untouched.items():
        if (root / path).read_bytes() != data:
            result.fail(f"{path}, reachable only through planted symlinks, was changed")


if __name__ == "__main__":
    {"attacker": attacker_main}[sys.argv[1]](json.loads(sys.argv[2]))
