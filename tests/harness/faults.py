"""Resource faults: a full file system, a registry locked by another process past the busy
timeout, and a backing file deleted under an open handle. Each returns a Result whose
violations are the properties that did not hold."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from coherent_volume import CoherentVolume, RegistryError
from coherent_volume.registry import sqlite as sqlite_registry

from . import payload
from .mounts import Mount
from .result import Result
from .volumes import create, dump, integrity, read_log, registry_db, seed

P = "plans/a.md"


@contextmanager
def tmpfs(path: Path, size: str = "1m") -> Iterator[Path]:
    """A small tmpfs at `path`, unmounted in every outcome."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True, capture_output=True)
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Fill the file system of `directory` until ENOSPC; returns the filler file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


def _expect_errno(result: Result, what: str, call: Callable[[], object], code: int, says: tuple[str, ...] = ()) -> None:
    """`call` must fail with errno `code`, its message saying each of `says`."""
    try:
        call()
        result.fail(f"{what}: accepted on a full file system")
    except OSError as e:
        if e.errno != code:
            result.fail(f"{what}: {type(e).__name__} errno {e.errno}, expected {errno.errorcode[code]}: {e}")
        elif missing := [s for s in says if s not in str(e)]:
            result.fail(f"{what}: the error does not say {missing}: {e}")
    result.attempts += 1
    result.refusals[errno.errorcode[code]] += 1


def enospc(workdir: Path) -> Result:
    """Writes on a full tmpfs fail with ENOSPC, leaving the old version and the registry unchanged;
    once space is back the same agent's write is accepted."""
    result = Result("resource: full file system (tmpfs 1 MiB)", 1)
    started = time.monotonic()
    with tmpfs(workdir / "tmpfs") as fs:
        root = create(fs / "vol")
        seed(root, [P])
        with CoherentVolume(root, agent="writer") as vol, Mount(root, workdir / "tmpfs-mnt") as m:
            old = vol.read(P)
            shell(m, "cat plans/a.md >/dev/null")
            before = dump(root)
            filler = _fill(fs)
            for size in (200_000, 10):
                _expect_errno(
                    result,
                    f"API write of {size} bytes",
                    lambda size=size: vol.write(P, payload.make(f"big{size}", "-", 1, size)),
                    errno.ENOSPC,
                    (P, "nothing was changed", "Free some space"),
                )
            _check_unchanged(result, root, old, before)
            _enospc_through_mount(result, m, old)
            filler.unlink()
            version = vol.write(P, payload.make("after", "-", 1))
            result.accepted += version == 2
            if version != 2 or (root / P).read_bytes() != payload.make("after", "-", 1):
                result.fail(f"after space came back the write gave version {version}")
    result.wall = time.monotonic() - started
    return result


def _check_unchanged(result: Result, root: Path, old: bytes, before: list[str]) -> None:
    if (root / P).read_bytes() != old:
        result.fail("the old version was damaged by a failed write")
    if dump(root) != before:
        result.fail("the registry changed although the write failed")
    if (verdict := integrity(root)) != "ok":
        result.fail(f"registry integrity: {verdict}")


def shell(m: Mount, script: str) -> subprocess.CompletedProcess[str]:
    """Run a bash script in the mount as agent shell-writer."""
    return subprocess.run(
        ["bash", "-c", script],
        cwd=m.path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COHERENT_AGENT": "shell-writer"},
    )


def _enospc_through_mount(result: Result, m: Mount, old: bytes) -> None:
    """The agent read the file before the disk filled up; its write must fail with ENOSPC."""
    r = shell(m, 'head -c 300000 /dev/zero | tr "\\0" x > plans/a.md')
    result.attempts += 1
    if r.returncode == 0 or "No space left" not in r.stderr:
        result.fail(f"shell write on a full file system: exit {r.returncode}, {r.stderr.strip()!r}")
    else:
        result.refusals["ENOSPC"] += 1
    if (m.root / P).read_bytes() != old:
        result.fail("a failed shell write damaged the old version")


LOCKER = """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
"""


@contextmanager
def locked_registry(root: Path, seconds: float = 60) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the registry with BEGIN EXCLUSIVE."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(registry_db(root)), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _bounded(
    result: Result, what: str, call: Callable[[], object], locker: subprocess.Popen[str], limit: float
) -> None:
    """`call` must fail with a RegistryError that says the registry is locked, within `limit` seconds,
    while the lock is still held."""
    started = time.monotonic()
    result.attempts += 1
    try:
        call()
        result.fail(f"{what} succeeded while the registry was locked")
        return
    except RegistryError as e:
        message = str(e)
        result.refusals["RegistryError"] += 1
        if "locked" not in message or "corrupt" in message:
            result.fail(f"{what}: the error does not say the registry is locked: {message!r}")
    except Exception as e:
        result.fail(f"{what}: {type(e).__name__} instead of RegistryError: {e}")
    elapsed = time.monotonic() - started
    if elapsed > limit or locker.poll() is not None:
        result.fail(f"{what}: waited {elapsed:.2f} s (limit {limit:g} s) or the lock was gone")
    result.stats[f"{what} wait s"] = round(elapsed, 3)


def busy_registry(workdir: Path, timeout_ms: int = 300) -> Result:
    """A registry held by another process past the busy timeout: a bounded wait, then a clear
    RegistryError; nothing changes; once the lock is gone the write is accepted."""
    result = Result(f"resource: registry locked past the busy timeout ({timeout_ms} ms)", 1)
    started = time.monotonic()
    saved = sqlite_registry.BUSY_TIMEOUT_MS
    sqlite_registry.BUSY_TIMEOUT_MS = timeout_ms
    try:
        root = create(workdir / "busy")
        seed(root, [P])
        with CoherentVolume(root, agent="writer") as vol:
            old = vol.read(P)
            limit = timeout_ms / 1000 * 4 + 1
            with locked_registry(root) as locker:
                _bounded(result, "write", lambda: vol.write(P, payload.make("blocked", "-", 1)), locker, limit)
                # opening an existing volume writes nothing, so it works; a new agent's first read
                # registers a view (a write), so it waits, boundedly, like the write
                with CoherentVolume(root, agent="late") as late:
                    _bounded(result, "first read", lambda: late.read(P), locker, limit)
            if (root / P).read_bytes() != old:
                result.fail("the old version changed during the failed write")
            if vol.write(P, payload.make("after", "-", 1)) != 2:
                result.fail("the write after the lock was released did not make version 2")
            else:
                result.accepted += 1
    finally:
        sqlite_registry.BUSY_TIMEOUT_MS = saved
    result.wall = time.monotonic() - started
    return result


HOLD_WRITER = """
import os, sys
path = sys.argv[1]
open(path, "rb").read()
f = open(path, "wb")
f.write(sys.argv[2].encode())
print("ready", flush=True)
sys.stdin.readline()
try:
    f.close()
    print("closed")
except OSError as e:
    print("error", e.errno)
"""


def deleted_backing_file(workdir: Path) -> Result:
    """A managed file deleted in the backing directory while a mount handle has it open for writing
    (and another for reading): the reader keeps its snapshot, the writer's commit is refused,
    the deletion is recorded as a foreign change, and nothing comes back."""
    result = Result("resource: backing file deleted under open handles", 2)
    started = time.monotonic()
    root = create(workdir / "deleted")
    seed(root, [P])
    old = (root / P).read_bytes()
    with Mount(root, workdir / "deleted-mnt") as m:
        env = {**os.environ, "COHERENT_AGENT": "holder"}
        reader = open(m.path / P, "rb")
        writer = subprocess.Popen(
            [sys.executable, "-c", HOLD_WRITER, str(m.path / P), payload.make("holder.1", "-", 1).decode()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
            (root / P).unlink()
            outcome, _ = writer.communicate("go\n", timeout=30)
        finally:
            writer.kill()
            writer.wait()
        result.attempts += 1
        if outcome.split() != ["error", str(errno.EACCES)]:
            result.fail(f"the write built on the deleted file ended with {outcome.strip()!r}, expected EACCES")
        else:
            result.refusals["EACCES"] += 1
        if reader.read() != old:
            result.fail("the open reader did not keep its snapshot")
        reader.close()
    if (root / P).exists():
        result.fail(f"the deleted file came back: {(root / P).read_bytes()[:60]!r}")
    _check_deletion_logged(result, root)
    result.wall = time.monotonic() - started
    return result


def _check_deletion_logged(result: Result, root: Path) -> None:
    events = [e for e in read_log(root) if e["path"] == P]
    if not any(e["kind"] == "foreign" and "deleted" in (e["detail"] or "") for e in events):
        result.fail("the deletion was not recorded as a foreign change")
    if any(e["kind"] == "commit" and e["agent"] == "holder" for e in events):
        result.fail("the holder's write was committed over the deletion")
    try:
        with CoherentVolume(root, agent="after") as vol:
            vol.read(P)
        result.fail("a read after the deletion returned content")
    except FileNotFoundError:
        pass
