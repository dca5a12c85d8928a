"""The commit lock of one working copy of a PostgreSQL volume: byte ranges of ROOT/.coherent/
replica.lock, locked as open file description locks (F_OFD_SETLK), so that each hold (one thread's
decision and install) is a lock owner of its own, across the threads and processes of the host
(and containers sharing the root on one kernel), freed by the kernel when its holder dies.

Invariants:
- a path's lock is one byte, at PATHS + its key (`pg_transaction.path_key`) modulo 2**62: two
  paths that share a byte merely share a lock. A hold of paths holds the gate byte GATE shared and
  the byte of each of its paths; a hold of the whole copy holds GATE exclusive, so it excludes every
  hold of a path, and holds of different paths exclude nothing of each other;
- every wait goes in one global order: the turnstile TURN, GATE, then paths by ascending byte. TURN
  is waited for only by a hold holding nothing, and held only while it waits for GATE (then let
  go): a wait for the whole copy keeps new holds of paths out until it is granted (the kernel
  grants a shared lock while an exclusive one waits, so a stream of writers would starve it). A
  hold waits for a path's byte only when every byte it holds sorts below it; a byte below one it
  holds, and GATE exclusive once it holds it shared, are only tried, never waited for: taken, the
  hold goes on; busy, `CopyRelock` has its owner let go and take the whole set again from the start;
- every wait is polled and bounded: past its deadline, RegistryError(EBUSY) naming the processes
  that have the lock file open (/proc/locks shows no owner of an open file description lock). Its
  callers never wait with a registry transaction open (see pg_registry);
- REPORT, a byte of its own, is held exclusive by a report of what the copy holds (pg_hosts),
  alone: reports of the copy's processes go one at a time, so none sends a path's version after
  a newer one was sent;
- a hold is let go by unlocking the whole file, then closing its descriptor (a forked child's copy
  of the descriptor keeps nothing locked); a forked child closes the descriptors of the holds it
  inherited without unlocking them (that would let go its parent's hold: one open file description).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..errors import RegistryError
from . import CopyRelock
from .polling import poll
from .sqlite import _comm, _openers

TURN, GATE, REPORT, PATHS = 0, 1, 2, 3
_FLOCK = "@hhqqi4x"
"""struct flock on Linux (l_type, l_whence, l_start, l_len, l_pid; l_pid 0 for OFD locks)."""

_OPEN: set[int] = set()
"""Descriptors of this process's holds (a forked child closes them)."""
_OPEN_MUTEX = threading.Lock()


def _after_fork_in_child() -> None:
    global _OPEN_MUTEX
    _OPEN_MUTEX = threading.Lock()
    for fd in list(_OPEN):
        try:
            os.close(fd)  # never unlocked: its open file description is the parent's
        except OSError:
            pass
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _fcntl(fd: int, kind: int, start: int, length: int = 1) -> bool:
    """Lock (or with F_UNLCK unlock) `length` bytes at `start` (0: to the end) if that is possible
    now; whether it was."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack(_FLOCK, kind, os.SEEK_SET, start, length, 0))
        return True
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


@dataclass
class CopyHold:
    """One thread's hold of the copy: its open file description and what it holds."""

    fd: int
    pid: int
    paths: frozenset[str] | None
    """The paths it holds; None: the whole copy."""
    keys: set[int] = field(default_factory=set)
    """The bytes of its paths."""
    committed: bool = False
    """Whether a write transaction committed under it (it is then never taken again from its start)."""


class CopyLocks:
    """The locks of the working copy whose lock file is `path`; `key_of` gives a path's key."""

    def __init__(self, path: str, key_of: Callable[[str], int]) -> None:
        self.path = path
        self._key_of = key_of

    def _byte(self, path: str) -> int:
        return PATHS + (self._key_of(path) & (2**62 - 1))

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with _OPEN_MUTEX:
            _OPEN.add(fd)
        return fd

    def _close(self, fd: int) -> None:
        with _OPEN_MUTEX:
            _OPEN.discard(fd)
        os.close(fd)

    def _wait(self, fd: int, kind: int, start: int, deadline: float, started: float, what: str) -> None:
        """Lock one byte, polling with short growing sleeps until `deadline` (time.monotonic());
        past it, RegistryError(EBUSY) naming who may hold it."""
        poll(
            lambda: _fcntl(fd, kind, start),
            deadline,
            lambda: RegistryError(
                f"the lock of the working copy ({what}, {self.path!r}) stayed held for the "
                f"{time.monotonic() - started:.1f} s this process waited; {self._holders()}. Nothing was "
                "changed. If the holder is stuck, stop it; then try again",
                errno.EBUSY,
            ),
        )

    def _holders(self) -> str:
        """Who may hold a lock of the file: the processes that have it open (a hold opens it)."""
        others = _openers(self.path)
        if not others:
            return "held by another thread of this process, or a process this one cannot see"
        return "held by " + " or ".join(f"pid {p} ({_comm(p)})" for p in others) + ", which have it open"

    def _gate(self, fd: int, kind: int, deadline: float, started: float) -> None:
        """GATE (shared for paths, exclusive for the whole copy), through the turnstile."""
        self._wait(fd, fcntl.F_WRLCK, TURN, deadline, started, "its turnstile")
        try:
            self._wait(fd, kind, GATE, deadline, started, "the whole copy")
        finally:
            _fcntl(fd, fcntl.F_UNLCK, TURN)

    def _whole_if_free(self, fd: int) -> bool:
        """The whole copy, if it is free at once (never waited for)."""
        if not _fcntl(fd, fcntl.F_WRLCK, TURN):
            return False
        try:
            return _fcntl(fd, fcntl.F_WRLCK, GATE)
        finally:
            _fcntl(fd, fcntl.F_UNLCK, TURN)

    def take(self, paths: Iterable[str] | None, whole_if_free: bool, timeout: float) -> CopyHold:
        """A new hold of `paths` (None: the whole copy; with `whole_if_free`, the whole copy if it is
        free at once, else `paths`), waited for at most `timeout` s."""
        started = time.monotonic()
        fd = self._open()
        try:
            if paths is None or (whole_if_free and self._whole_if_free(fd)):
                if paths is None:
                    self._gate(fd, fcntl.F_WRLCK, started + timeout, started)
                return CopyHold(fd, os.getpid(), None)
            self._gate(fd, fcntl.F_RDLCK, started + timeout, started)
            hold = CopyHold(fd, os.getpid(), frozenset())
            self.extend(hold, paths, started + timeout - time.monotonic())
            return hold
        except BaseException:
            self.release_fd(fd)
            raise

    def extend(self, hold: CopyHold, paths: Iterable[str] | None, timeout: float) -> None:
        """Have `hold` hold `paths` too (None: the whole copy): bytes above every byte it holds are
        waited for (at most `timeout` s), others only tried; CopyRelock when one of those is busy."""
        if hold.paths is None:
            return
        if paths is None:
            if not _fcntl(hold.fd, fcntl.F_WRLCK, GATE):
                raise CopyRelock(None)
            hold.paths = None
            return
        wanted = frozenset(paths)
        if hold.paths.issuperset(wanted):
            return
        started = time.monotonic()
        for byte in sorted({self._byte(p) for p in wanted} - hold.keys):
            if hold.keys and byte < max(hold.keys):
                if not _fcntl(hold.fd, fcntl.F_WRLCK, byte):
                    raise CopyRelock(hold.paths | wanted)
            else:
                self._wait(hold.fd, fcntl.F_WRLCK, byte, started + timeout, started, "a path's")
            hold.keys.add(byte)
        hold.paths = hold.paths | wanted

    def release(self, hold: CopyHold) -> None:
        """Let go of `hold` (in the process that took it; a forked child closed its copy already)."""
        if hold.pid == os.getpid():
            self.release_fd(hold.fd)

    def release_fd(self, fd: int) -> None:
        try:
            _fcntl(fd, fcntl.F_UNLCK, 0, 0)  # also for a copy of `fd` a child forked without exec keeps
        finally:
            self._close(fd)

    @contextmanager
    def reporting(self, timeout: float) -> Iterator[None]:
        """REPORT, exclusive, waited for at most `timeout` s: one report of the copy at a time."""
        started = time.monotonic()
        fd = self._open()
        try:
            self._wait(fd, fcntl.F_WRLCK, REPORT, started + timeout, started, "its reports'")
            yield
        finally:
            self.release_fd(fd)
