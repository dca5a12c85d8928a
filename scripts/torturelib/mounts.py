"""Real mounts through the real CLI, always unmounted, with no daemon left behind.

Every mount the harness makes is tracked here, so `unmount_all` (run at exit and on signals)
can clean up whatever a failing scenario left.
"""
from __future__ import annotations

import atexit
import errno
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from .volumes import CLI

_ACTIVE: set["Mount"] = set()


def serving_pids(mountpoint: Path, marker: bytes | None = None) -> list[int]:
    """Live processes with `mountpoint` (and `marker`, when given) among their arguments."""
    pids = []
    needle = os.fsencode(str(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv and (marker is None or marker in argv):
            pids.append(int(entry))
    return pids


def daemon_pids(mountpoint: Path) -> list[int]:
    """Live processes serving `mountpoint` (the forked `coherent-volume mount` daemon)."""
    return serving_pids(mountpoint, b"mount")


def watcher_pids(mountpoint: Path) -> list[int]:
    """Live watcher processes (`fusefs.watch_process`) of the daemon serving `mountpoint`."""
    return serving_pids(mountpoint, b"fusefs.watch_process")


def unmount_and_reap(mountpoint: Path) -> None:
    """Unmount (lazily if busy), wait up to 10 s for the daemon and its watcher to exit, then kill
    what is left."""
    if mounted(mountpoint):
        if subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    deadline = time.monotonic() + 10
    while (daemon_pids(mountpoint) or watcher_pids(mountpoint)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in daemon_pids(mountpoint) + watcher_pids(mountpoint):
        os.kill(pid, signal.SIGKILL)


def mounted(mountpoint: Path) -> bool:
    """Whether `mountpoint` is in /proc/self/mounts, which escapes space, tab, newline and backslash
    as octal (read here, not through coherent_volume: the harness shares no code with the product)."""
    with open("/proc/self/mounts") as f:
        return any(_OCTAL.sub(lambda m: chr(int(m.group(1), 8)), line.split()[1]) == str(mountpoint) for line in f)


_OCTAL = re.compile(r"\\([0-7]{3})")


def dead_errno(mountpoint: Path) -> int | None:
    """The errno a dead mount answers with, or None if the mountpoint answers normally."""
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno
    return None


class Mount:
    """`root` mounted at `path`; a context manager that unmounts in every outcome."""

    def __init__(self, root: Path, path: Path) -> None:
        self.root, self.path = root, path

    def mount(self) -> float:
        """Mount (cleaning up a dead mount first, as the CLI does); returns the seconds it took."""
        if not mounted(self.path):  # a dead mount cannot even be stat'ed
            self.path.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        result = subprocess.run([CLI, "mount", str(self.root), str(self.path)], capture_output=True, text=True,
                                timeout=60)
        _ACTIVE.add(self)
        if result.returncode != 0:
            raise RuntimeError(f"mount failed: {result.stderr.strip()}")
        return time.monotonic() - started

    def kill_daemon(self) -> list[int]:
        pids = daemon_pids(self.path)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def unmount(self) -> None:
        unmount_and_reap(self.path)
        _ACTIVE.discard(self)

    def __enter__(self) -> "Mount":
        try:
            self.mount()
        except BaseException:
            self.unmount()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def unmount_all() -> None:
    for m in list(_ACTIVE):
        m.unmount()


DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)

atexit.register(unmount_all)
