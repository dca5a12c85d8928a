"""Real FUSE mounts for the tests, the torture harness, the benchmarks and the demo: mounted through
the real CLI, always unmounted, no daemon left behind.

This is the one place outside the product that unmounts (`unmount_and_reap`) and that asks which
FUSE mounts exist (`is_mounted`, `fuse_mounts_under`). Both read the kernel's table through
`coherent_volume.mounts.fuse_mounts`, the tree's one parser of /proc/self/mounts. (The history
checker still shares no code with the product; this module only sets up and tears down.)

Every `Mount` is tracked, so `unmount_all` (run at exit, and by the torture run in every outcome)
cleans up whatever a failing scenario left.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from coherent_volume.mounts import fuse_mounts

from . import CLI

__all__ = [
    "CLI",
    "DEAD_ERRNOS",
    "Mount",
    "Unmounted",
    "daemon_pids",
    "dead_errno",
    "fuse_mounts_under",
    "is_mounted",
    "serving_pids",
    "unmount_all",
    "unmount_and_reap",
    "watcher_pids",
]

DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
"""What a mount whose daemon died answers with."""

_ACTIVE: set[Mount] = set()


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a FUSE file system (ours, bindfs, floorfs; serving or with a dead daemon) is mounted
    at `mountpoint`."""
    return os.fspath(mountpoint) in fuse_mounts(None)


def fuse_mounts_under(base: str | os.PathLike[str]) -> list[str]:
    """Every FUSE mountpoint at or below `base`: what a run must not leave behind."""
    top = os.fspath(base).rstrip("/")
    return sorted(m for m in fuse_mounts(None) if m == top or m.startswith(top + "/"))


def serving_pids(mountpoint: str | os.PathLike[str], marker: bytes | None = None) -> list[int]:
    """Live processes with `mountpoint` (and `marker`, when given) among their arguments."""
    pids = []
    needle = os.fsencode(os.fspath(mountpoint))
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


def daemon_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Live processes serving `mountpoint` (the forked `coherent-volume mount` daemon)."""
    return serving_pids(mountpoint, b"mount")


def watcher_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Live watcher processes (`fusefs.watch_process`) of the daemon serving `mountpoint`."""
    return serving_pids(mountpoint, b"fusefs.watch_process")


@dataclass
class Unmounted:
    """What `unmount_and_reap` had to do beyond a plain unmount."""

    lazy: bool = False
    """The mount stayed busy: it was detached with `fusermount3 -u -z`."""
    killed: list[int] = field(default_factory=list)
    """Processes still serving the mountpoint after the wait, killed with SIGKILL."""


def unmount_and_reap(mountpoint: str | os.PathLike[str], wait: float = 10.0) -> Unmounted:
    """Unmount `mountpoint` if it is mounted (`fusermount3 -u`, retried for a second while busy,
    then `-u -z`), then make sure nothing serves it any more: wait up to `wait` seconds for every
    process with the mountpoint among its arguments (our daemon and its watcher process, bindfs,
    floorfs) to exit, and SIGKILL what is left. Safe to call on anything: mounted, dead, or gone."""
    mp = os.fspath(mountpoint)
    done = Unmounted()
    if is_mounted(mp):
        for _ in range(5):
            if subprocess.run(
                ["fusermount3", "-u", mp], capture_output=True, check=False
            ).returncode == 0 or not is_mounted(mp):
                break
            time.sleep(0.2)
        else:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
            done.lazy = True
    deadline = time.monotonic() + wait
    while serving_pids(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in serving_pids(mp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        done.killed.append(pid)
    return done


def dead_errno(mountpoint: Path) -> int | None:
    """The errno a dead mount answers with, or None if the mountpoint answers normally."""
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno
    return None


class Mount:
    """`root` mounted at `path` through `coherent-volume mount` (as `agent`, when given); a context
    manager that unmounts in every outcome."""

    def __init__(self, root: Path, path: Path, agent: str | None = None) -> None:
        self.root, self.path, self.agent = root, path, agent

    def mount(self) -> float:
        """Mount (over a dead mount too, as the CLI does); returns the seconds it took."""
        if not is_mounted(self.path):  # a dead mount cannot even be stat'ed
            self.path.mkdir(parents=True, exist_ok=True)
        args = [CLI, "mount", str(self.root), str(self.path)] + (["--agent", self.agent] if self.agent else [])
        started = time.monotonic()
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        _ACTIVE.add(self)
        if result.returncode != 0:
            raise RuntimeError(f"mount failed: {result.stderr.strip()}")
        return time.monotonic() - started

    def kill_daemon(self) -> list[int]:
        """SIGKILL the daemon (its mount stays, dead); returns the pids killed."""
        pids = daemon_pids(self.path)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def unmount(self) -> Unmounted:
        done = unmount_and_reap(self.path)
        _ACTIVE.discard(self)
        return done

    def __enter__(self) -> Self:
        try:
            self.mount()
        except BaseException:
            self.unmount()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def run(self, agent: str, script: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a bash script as `agent` with the mount as working directory."""
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.path,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "COHERENT_AGENT": agent},
            **kwargs,
        )  # type: ignore[call-overload]

    @contextlib.contextmanager
    def holding(self, agent: str, script: str) -> Iterator[subprocess.Popen[str]]:
        """Run a bash script as `agent` that prints 'ready' once it holds what it opened; kill it after."""
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.path,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": agent},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield proc
        finally:
            proc.kill()
            proc.wait()


def unmount_all() -> None:
    """Unmount every Mount still tracked (made and not yet unmounted)."""
    for m in list(_ACTIVE):
        m.unmount()


atexit.register(unmount_all)
