"""Python agents: read-modify-write increments through the API (or on a plain directory).

Each attempt picks a target file, reads `cross` other files and then the target, writes the
target's payload with its counter plus one, and records everything (history.Recorder). A
refused write is simply followed by the next attempt, which re-reads. Run as a process with
`python -m tests.harness.workers CONFIG_JSON` from the repo root (sweeps.spawn_agent); it prints
"ready" once its volume is open.
"""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from . import payload
from .history import Attempt, Read, Recorder


@dataclass
class Workload:
    paths: list[str]
    attempts: int = 100  # write attempts per agent; -1: until stopped
    cross: int = 0  # other files read before the target
    fill: int = 4000  # largest filler (bytes), so contents span pages
    think: float = 0.0  # longest pause between read and write (seconds)
    isolation: str = "file"
    lock_ttl: float = 0.0  # > 0: take the write grant (lock) around each read-modify-write
    stop_file: str | None = None  # stop once this file exists


class Face(Protocol):
    def read(self, path: str) -> bytes: ...
    def write(self, path: str, data: bytes) -> int | None: ...
    def forget(self, path: str) -> None: ...


class PlainDirectory:
    """The same operations on an ordinary directory: atomic replace, no checks, no versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def read(self, path: str) -> bytes:
        return (self.root / path).read_bytes()

    def write(self, path: str, data: bytes) -> None:
        tmp = self.root / f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / path)

    def forget(self, path: str) -> None:
        pass

    def close(self) -> None:
        pass


def _read(face: Face, path: str) -> Read:
    try:
        return Read.of(path, face.read(path))
    except OSError as e:
        return Read(path, error=errno.errorcode.get(e.errno or 0, type(e).__name__))
    except Exception as e:  # a typed CoherenceError that is not an OSError
        return Read(path, error=type(e).__name__)


def _outcome(error: BaseException) -> tuple[str, str]:
    reason = getattr(error, "reason", None)
    if reason is not None and isinstance(error, PermissionError):
        return "refused", reason
    if isinstance(error, OSError) and error.errno:
        return "error", errno.errorcode.get(error.errno, str(error.errno))
    return "error", type(error).__name__


class Agent:
    """One agent's attempts on a face, recorded."""

    def __init__(self, name: str, face: Face, work: Workload, recorder: Recorder, rng: random.Random) -> None:
        self.name, self.face, self.work, self.recorder, self.rng = name, face, work, recorder, rng
        self.n = 0

    def run(self, stop: threading.Event | None = None) -> None:
        while self.work.attempts < 0 or self.n < self.work.attempts:
            if (stop is not None and stop.is_set()) or (self.work.stop_file and os.path.exists(self.work.stop_file)):
                return
            self.attempt()

    def attempt(self) -> Attempt:
        target = self.rng.choice(self.work.paths)
        others = [p for p in self.work.paths if p != target]
        cross = self.rng.sample(others, min(self.work.cross, len(others)))
        if self.work.lock_ttl > 0:
            return self._locked(target, cross)
        return self._attempt(target, cross)

    def _locked(self, target: str, cross: list[str]) -> Attempt:
        try:
            with self.face.lock(target, ttl=self.work.lock_ttl, timeout=self.work.lock_ttl):  # type: ignore[attr-defined]
                return self._attempt(target, cross)
        except PermissionError as e:  # the lock itself was refused (held past the timeout)
            attempt = Attempt(
                self.name,
                target,
                f"{self.name}.{self.n}",
                None,
                0,
                [],
                time.time(),
                outcome="read-error",
                reason=f"lock-{getattr(e, 'reason', 'refused')}",
            )
            self.n += 1
            self.recorder.done(attempt)
            return attempt

    def _attempt(self, target: str, cross: list[str]) -> Attempt:
        t_read = time.time()
        reads = [_read(self.face, p) for p in cross] + [_read(self.face, target)]
        base = reads[-1]
        token = f"{self.name}.{self.n}"
        self.n += 1
        attempt = Attempt(self.name, target, token, base.token, (base.count or 0) + 1, reads, t_read)
        try:
            if base.token is None:
                attempt.outcome, attempt.reason = "read-error", base.error or "torn"
                self.recorder.done(attempt)
                return attempt
            self._write(attempt)
            return attempt
        finally:
            if self.work.isolation == "read-set":  # the next attempt's read set starts empty
                for r in reads:
                    self.face.forget(r.path)

    def _write(self, attempt: Attempt) -> None:
        data = payload.make(attempt.token, attempt.prev or "-", attempt.count, self.rng.randint(0, self.work.fill))
        if self.work.think:
            time.sleep(self.rng.uniform(0, self.work.think))
        attempt.t_write0 = time.time()
        self.recorder.begin(attempt)
        try:
            attempt.version = self.face.write(attempt.target, data)
            attempt.outcome = "ok"
        except Exception as e:
            attempt.outcome, attempt.reason = _outcome(e)
        attempt.t_write1 = time.time()
        self.recorder.end(attempt)


def open_face(kind: str, root: str, agent: str, isolation: str) -> Face:
    if kind == "plain":
        return PlainDirectory(root)
    from coherent_volume import CoherentVolume

    return CoherentVolume(root, agent=agent, isolation=isolation)  # type: ignore[arg-type]


def process_main(config: dict) -> None:
    """Entry point of an agent process: open the face, say ready, run, close."""
    work = Workload(**config["work"])
    face = open_face(config["face"], config["root"], config["agent"], work.isolation)
    recorder = Recorder(config["record"])
    print("ready", flush=True)
    Agent(config["agent"], face, work, recorder, random.Random(config["seed"])).run()
    face.close()  # type: ignore[attr-defined]
    recorder.close()


def process_config(face: str, root: Path, agent: str, work: Workload, record: Path, seed: int) -> str:
    return json.dumps(
        {"face": face, "root": str(root), "agent": agent, "work": asdict(work), "record": str(record), "seed": seed}
    )


if __name__ == "__main__":
    process_main(json.loads(sys.argv[1]))
