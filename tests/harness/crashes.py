"""Crashes: kill -9 of writer processes at random points, and of the mount daemon under load.

After every kill the files are read straight from disk (each must be a complete committed
payload: the checker verifies that from the samples), the registry passes SQLite's integrity
check, and a write grant the victim held is reclaimed within its TTL. At the end the registry
must agree with the disk and the whole history must check out, the content store included: every
version's bytes stored and hashing to its recorded hash, each the content that version was, and
each file's bytes those of its current version (`checker.check_store`).
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import time
from pathlib import Path

from coherent_volume import CoherentVolume

from . import payload
from .history import Producer
from .judge import judge_volume
from .mounts import DEAD_ERRNOS, Mount, dead_errno, is_mounted
from .result import Result
from .sweeps import Sampler, load_records, spawn_agent, spawn_shell_agent, wait_all
from .volumes import agreement, create, integrity, raw_read, seed, sql
from .workers import Workload


def _ready(proc: subprocess.Popen[str], timeout: float = 30) -> bool:
    """Wait for an agent process's 'ready' line."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "ready"


def _kill(proc: subprocess.Popen[str]) -> float:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if proc.stdout:
        proc.stdout.close()
    if proc.stderr:
        proc.stderr.close()
    return time.time()


class WriterPool:
    """`slots` agent processes (the first `lock_slots` in pessimistic mode), each respawned under a
    new agent name after it is killed."""

    def __init__(
        self, root: Path, records: Path, paths: list[str], slots: int, lock_slots: int, ttl: float, seed_: int
    ) -> None:
        self.root, self.records, self.paths, self.ttl, self.seed = root, records, paths, ttl, seed_
        self.lock_slots = lock_slots
        self.procs: list[subprocess.Popen[str] | None] = [None] * slots
        self.names = [""] * slots
        self.incarnation = 0
        for slot in range(slots):
            self.spawn(slot)

    def spawn(self, slot: int) -> None:
        self.incarnation += 1
        name = f"w{slot}.{self.incarnation}"
        work = Workload(self.paths, attempts=-1, fill=6000, lock_ttl=self.ttl if slot < self.lock_slots else 0.0)
        self.names[slot] = name
        self.procs[slot] = spawn_agent(
            "api", self.root, name, work, self.records / f"{name}.jsonl", self.seed + self.incarnation
        )

    def kill(self, slot: int) -> tuple[str, float]:
        proc = self.procs[slot]
        assert proc is not None
        return self.names[slot], _kill(proc)

    def kill_all(self) -> int:
        for proc in self.procs:
            if proc is not None:
                _kill(proc)
        return len(self.procs)


def _reclaim_latency(root: Path, path: str, killed_at: float, ttl: float) -> float | None:
    """Seconds from the kill until another agent got the write grant, None if not within the TTL."""
    with CoherentVolume(root, agent="harness-reclaimer") as vol:
        try:
            with vol.lock(path, ttl=1.0, timeout=ttl):
                return time.time() - killed_at
        except PermissionError:
            return None


def _held(root: Path, agent: str) -> list[str]:
    return [row[0] for row in sql(root, "SELECT path FROM grants WHERE agent = ?", (agent,))]


def _after_writer_kill(
    result: Result, root: Path, victim: str, killed_at: float, ttl: float, latencies: list[float], held: list[str]
) -> None:
    """Each grant the victim held just before it died must pass to another agent within its TTL."""
    for path in sorted(set(held) | set(_held(root, victim))):
        latency = _reclaim_latency(root, path, killed_at, ttl)
        if latency is None or latency >= ttl:
            result.fail(f"grant of killed {victim} on {path} not reclaimed within its TTL of {ttl:g} s")
        else:
            latencies.append(latency)


def _kill_holder(result: Result, pool: WriterPool, root: Path, latencies: list[float]) -> bool:
    """Kill the first pessimistic writer at a moment it holds a write grant (so at least one
    reclaim is measured whatever the random kills hit)."""
    deadline = time.monotonic() + 20
    name = pool.names[0]
    while time.monotonic() < deadline:
        if held := _held(root, name):
            victim, killed_at = pool.kill(0)
            _after_writer_kill(result, root, victim, killed_at, pool.ttl, latencies, held)
            pool.spawn(0)
            return True
        time.sleep(0.002)
    result.fail(f"the pessimistic writer {name} never held a grant")
    return False


def writer_kills(
    workdir: Path, kills: int, slots: int = 4, lock_slots: int = 1, ttl: float = 3.0, files: int = 2, seed_: int = 0
) -> Result:
    """kill -9 agent processes at random points of their read-modify-write loops, `kills` times."""
    rng = random.Random(seed_)
    root, records = create(workdir / "kill-writers"), workdir / "kill-writers-records"
    records.mkdir()
    paths = [f"plans/k{i}.md" for i in range(files)]
    producers = seed(root, paths)
    result = Result(f"kill -9 writers ({kills}x, {lock_slots} of {slots} holding grants)", slots)
    sampler = Sampler(root, paths)
    sampler.start()
    started = time.monotonic()
    pool = WriterPool(root, records, paths, slots, lock_slots, ttl, seed_)
    latencies: list[float] = []
    done = 0
    try:
        if lock_slots and _kill_holder(result, pool, root, latencies):
            done += 1
        while done < kills:
            slot = rng.randrange(slots)
            proc = pool.procs[slot]
            if proc is None or not _ready(proc):
                result.fail(f"writer {pool.names[slot]} did not start")
                pool.spawn(slot)
                continue
            time.sleep(rng.uniform(0.0, 0.12))
            held = _held(root, pool.names[slot])
            victim, killed_at = pool.kill(slot)
            done += 1
            _after_writer_kill(result, root, victim, killed_at, ttl, latencies, held)
            sampler.samples.update((p, raw_read(root, p).token) for p in paths)
            if done % 25 == 0 and (verdict := integrity(root)) != "ok":
                result.fail(f"registry integrity check after {done} kills: {verdict}")
            pool.spawn(slot)
    finally:
        done += pool.kill_all()
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    _finish(result, root, paths, records, producers, samples)
    result.stats.update(kills=done, reclaims=len(latencies), max_reclaim_s=max(latencies, default=0.0))
    return result


def _finish(
    result: Result,
    root: Path,
    paths: list[str],
    records: Path,
    producers: list[Producer],
    samples: set[tuple[str, str | None]],
    kill_times: list[float] | None = None,
    shell: bool = False,
) -> None:
    """Integrity, registry/disk agreement, then the history check."""
    if (verdict := integrity(root)) != "ok":
        result.fail(f"registry integrity check: {verdict}")
    for problem in agreement(root, paths):
        result.fail(f"registry disagrees with disk: {problem}")
    attempts = load_records(records)
    history = judge_volume(
        result, root, paths, attempts, producers, samples, "file", shell=shell, kill_times=kill_times
    )
    recovered = sql(root, "SELECT detail, count(*) FROM events WHERE kind = 'recover' GROUP BY detail")
    result.stats.update({f"recover: {detail}": n for detail, n in recovered})
    assert history.store is not None
    rows = [row for by_version in history.store.versions.values() for row in by_version.values()]
    result.stats.update(
        {
            "versions whose stored bytes hash right": sum(row.state == "ok" for row in rows),
            "deletions": sum(row.kind == "delete" for row in rows),
            "temporary objects left by kills": history.store.temp_files,
            "objects no version names": history.store.unnamed_objects,
        }
    )


# ---- the mount daemon ------------------------------------------------------------------------


def _probe_read(mnt: Path, agent: str, path: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'cat "$MNT/{path}"'],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "COHERENT_AGENT": agent, "MNT": str(mnt)},
        cwd="/",
    )


def _probe_write(mnt: Path, agent: str, path: str, data: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f'/usr/bin/printf "%s" "$DATA" > "$MNT/{path}"'],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={**os.environ, "COHERENT_AGENT": agent, "MNT": str(mnt), "DATA": data.decode()},
    )


def _check_dead(result: Result, m: Mount, paths: list[str]) -> None:
    """A killed daemon leaves the mountpoint dead (ENOTCONN/ECONNABORTED), never a bare directory."""
    deadline = time.monotonic() + 5
    while dead_errno(m.path) not in DEAD_ERRNOS and time.monotonic() < deadline:
        time.sleep(0.01)
    code = dead_errno(m.path)
    if code not in DEAD_ERRNOS or not is_mounted(m.path):
        result.fail(f"after the daemon was killed the mountpoint answered errno {code} (mounted: {is_mounted(m.path)})")
        return
    for attempt in (lambda: os.listdir(m.path), lambda: os.open(m.path / paths[0], os.O_WRONLY | os.O_TRUNC)):
        try:
            fd = attempt()
            result.fail("a dead mountpoint accepted an operation: it is bare")
            if isinstance(fd, int):
                os.close(fd)
        except OSError as e:
            if e.errno not in DEAD_ERRNOS:
                result.fail(f"a dead mountpoint failed with errno {e.errno}, not ENOTCONN/ECONNABORTED")


def _stale_probe(result: Result, m: Mount, root: Path, round_: int) -> None:
    """An agent whose view predates the crash cannot write after the remount once someone committed."""
    probe = "plans/probe.md"
    with CoherentVolume(root, agent="harness-other") as other:
        other.read(probe)
        other.write(probe, payload.make(f"other.{round_}", "-", round_))
    stale = _probe_write(m.path, "prober", probe, payload.make(f"stale.{round_}", "-", 0))
    if stale.returncode == 0 or "Permission denied" not in stale.stderr:
        result.fail(f"round {round_}: a stale write through the remounted volume was not refused: {stale.stderr}")
    if payload.parse((root / probe).read_bytes()) != payload.Payload(f"other.{round_}", "-", round_):
        result.fail(f"round {round_}: the probe file lost the committed version")


def daemon_kills(workdir: Path, kills: int, agents: int = 3, files: int = 2, seed_: int = 0) -> Result:
    """kill -9 the mount daemon under shell load `kills` times, remounting each time."""
    rng = random.Random(seed_)
    root, records = create(workdir / "kill-daemon"), workdir / "kill-daemon-records"
    records.mkdir()
    paths = [f"plans/d{i}.md" for i in range(files)]
    producers = seed(root, paths)
    seed(root, ["plans/probe.md"])
    result = Result(f"kill -9 mount daemon ({kills}x, shell load)", agents)
    stop, remounts = records / "STOP", []
    sampler = Sampler(root, paths)
    sampler.start()
    started = time.monotonic()
    m = Mount(root, workdir / "kill-daemon-mnt")
    kill_times: list[float] = []
    try:
        m.mount()
        work = Workload(paths, attempts=-1, cross=1, fill=300)
        procs = [spawn_shell_agent(m.path, f"s{i}", work, records, seed_ + i, stop) for i in range(agents)]
        for round_ in range(kills):
            time.sleep(rng.uniform(0.3, 0.9))
            _probe_read(m.path, "prober", "plans/probe.md")
            if len(m.kill_daemon()) != 1:
                result.fail(f"round {round_}: expected one daemon to kill")
            kill_times.append(time.time())
            _check_dead(result, m, paths)
            sampler.samples.update((p, raw_read(root, p).token) for p in paths)
            if (verdict := integrity(root)) != "ok":
                result.fail(f"round {round_}: registry integrity check: {verdict}")
            remounts.append(m.mount())
            _stale_probe(result, m, root, round_)
        stop.touch()
        for e in wait_all(procs, timeout=120):
            result.fail(e)
    finally:
        stop.touch()
        m.unmount()
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    if any(m.path.iterdir()):
        result.fail("something was written into the bare mountpoint directory")
    _finish(result, root, paths, records, producers, samples, kill_times, shell=True)
    result.stats.update(daemon_kills=len(kill_times), max_remount_s=max(remounts, default=0.0))
    return result
