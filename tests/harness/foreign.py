"""Foreign writes: a process outside the volume replaces managed files in the backing directory
while agents increment them. Each foreign write must show up in the log as kind "foreign", and
no commit built on the content it replaced may be accepted (the checker's lost-update rule,
with the foreign content as a version of its own).

A foreign write that lands while an accepted commit is being installed is replaced by that
commit before anyone can look at it; it cannot be recorded, so the harness instead requires
that such a commit was indeed under way at that instant (an inherent limit of uncoordinated
writers, counted in the report).
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from pathlib import Path

from . import payload
from .history import Attempt, Producer
from .judge import judge_volume
from .result import Result
from .sweeps import Sampler, load_records, spawn_agent, wait_all
from .volumes import create, raw_read, registry_db, seed
from .workers import Workload

RECORD_TIMEOUT = 10.0


def _write_outside(root: Path, path: str, token: str, rng: random.Random) -> tuple[int, float]:
    """Replace `path` in the backing directory like an editor would (temp file, rename).
    Returns the counter written and when the rename was done."""
    current = raw_read(root, path)
    count = (current.count or 0) + 1000
    tmp = root / "outside-tmp" / token
    tmp.write_bytes(payload.make(token, current.token or "-", count, rng.randint(0, 3000)))
    os.rename(tmp, root / path)
    return count, time.time()


class ForeignEvents:
    """Waits for the log's record of each foreign write (SQL on the registry file, read-only)."""

    def __init__(self, root: Path) -> None:
        self._conn = sqlite3.connect(f"file:{registry_db(root)}?mode=ro", uri=True, timeout=30)
        self._after: dict[str, int] = {}

    def next_version(self, path: str) -> int | None:
        deadline = time.monotonic() + RECORD_TIMEOUT
        while time.monotonic() < deadline:
            row = self._conn.execute(
                "SELECT seq, version FROM events WHERE kind = 'foreign' AND path = ? AND seq > ? ORDER BY seq LIMIT 1",
                (path, self._after.get(path, 0)),
            ).fetchone()
            if row is not None:
                self._after[path] = row[0]
                return row[1]
            time.sleep(0.002)
        return None

    def close(self) -> None:
        self._conn.close()


def _replaced_in_flight(attempts: list[Attempt], path: str, at: float) -> bool:
    return any(
        a.committed
        and a.target == path
        and a.t_write0 is not None
        and a.t_write1 is not None
        and a.t_write0 <= at <= a.t_write1
        for a in attempts
    )


def foreign_writes(workdir: Path, writes: int, agents: int = 4, files: int = 3, seed_: int = 0) -> Result:
    """`writes` foreign replacements of random files under load from `agents` API agent processes."""
    rng = random.Random(seed_)
    root, records = create(workdir / "foreign"), workdir / "foreign-records"
    records.mkdir()
    (root / "outside-tmp").mkdir()
    paths = [f"plans/x{i}.md" for i in range(files)]
    producers = seed(root, paths)
    result = Result(f"foreign writes ({writes}x under load)", agents)
    stop = records / "STOP"
    work = Workload(paths, attempts=-1, cross=1, fill=3000, stop_file=str(stop))
    procs = [spawn_agent("api", root, f"p{i}", work, records / f"p{i}.jsonl", seed_ + i) for i in range(agents)]
    sampler, events = Sampler(root, paths), ForeignEvents(root)
    sampler.start()
    started = time.monotonic()
    unrecorded: list[tuple[str, str, float]] = []
    try:
        for k in range(writes):
            time.sleep(rng.uniform(0.005, 0.04))
            path, token = rng.choice(paths), f"outside.{k}"
            count, at = _write_outside(root, path, token, rng)
            version = events.next_version(path)
            if version is not None:
                producers.append(Producer("foreign", path, token, count, version, at))
            else:
                unrecorded.append((path, token, at))
    finally:
        stop.touch()
        errors = wait_all(procs, timeout=120)
        samples = sampler.stop()
        events.close()
    result.wall = time.monotonic() - started
    for e in errors:
        result.fail(e)
    attempts = load_records(records)
    for path, token, at in unrecorded:
        if raw_read(root, path).token == token or not _replaced_in_flight(attempts, path, at):
            result.fail(f"foreign write {token} to {path} was never recorded")
    lost = {token for _, token, _ in unrecorded}
    samples = {(p, t) for p, t in samples if t not in lost}  # on disk for an instant, legitimately
    judge_volume(result, root, paths, attempts, producers, samples, "file")
    result.stats.update(foreign_writes=writes, foreign_replaced_in_flight=len(unrecorded))
    return result
