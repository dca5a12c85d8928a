"""Process identity that survives pid reuse: (host, pid, start time).

`host` names the PID namespace of one boot of one host: a pid (and the /proc that reads it)
only means something within it. From anywhere else a process cannot be checked, so its
grants end only at their TTL.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cache, lru_cache


def _pid_namespace() -> str:
    """This process's PID namespace, e.g. 'pid:[4026531836]'; unique to this process if /proc cannot say."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return f"pid:[unknown, process {os.getpid()}]"


INITIAL_PID_NAMESPACE = 0xEFFFFFFC
"""The inode number of the host's own PID namespace (the kernel's PROC_PID_INIT_INO)."""


def pid_namespace_inode() -> int:
    """The inode number of this process's PID namespace."""
    return os.stat("/proc/self/ns/pid").st_ino


@lru_cache(maxsize=1)
def host_id() -> str:
    """This PID namespace of this boot of this host: pids are only comparable within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}/{_pid_namespace()}"


@lru_cache(maxsize=1)
def _boottime_offset() -> int:
    """How far, in clock ticks, this process's time namespace puts the time since boot ahead of the
    host's: /proc shows every start time shifted by it (time_namespaces(7)); 0 outside one."""
    try:
        with open("/proc/self/timens_offsets") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        clock, seconds, nanoseconds = line.split()
        if clock in ("boottime", "7"):  # (7: CLOCK_BOOTTIME, as kernels may name it)
            tick = os.sysconf("SC_CLK_TCK")
            return int(seconds) * tick + int(nanoseconds) * tick // 1_000_000_000
    return 0


os.register_at_fork(after_in_child=_boottime_offset.cache_clear)  # a child may be in another time namespace


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since the host's boot (field 22 of /proc/pid/stat, less
    this process's time namespace's offset: the same for every reader); None if gone."""
    try:  # os.read, not open(): this is on the mount's request path (its agent cache), ~3 µs less
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)  # one line of a few hundred bytes
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # zombie or dead: the process has exited
        return None
    return int(fields[19]) - _boottime_offset()


def proc_is_ours() -> bool:
    """Whether /proc numbers processes as this PID namespace does (it does not in a namespace
    that did not mount its own /proc): only then does /proc/PID describe our PID."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def children_share_our_pid_namespace() -> bool:
    """Whether the processes this one starts are in its own PID namespace (they are not after
    `unshare --pid` without `--fork`: the new namespace waits for its first child, and once that
    child exits no process can be started in it). True where the kernel does not say."""
    if not os.path.lexists("/proc/self/ns/pid_for_children"):
        return True
    try:
        return os.readlink("/proc/self/ns/pid_for_children") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcessId:
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(f"process {pid} does not exist")
        return cls(host_id(), pid, started)

    def alive(self) -> bool | None:
        """True/False in this PID namespace of this boot of this host; None when it runs
        elsewhere (another host, boot or PID namespace) or /proc here is another namespace's:
        then it cannot be checked from here."""
        if self.host != host_id() or not proc_is_ours():
            return None
        return start_time(self.pid) == self.start


@cache
def _self(pid: int) -> ProcessId:
    return ProcessId.of(pid)


def current_process() -> ProcessId:
    """This process (cached per pid, so it stays right after fork)."""
    return _self(os.getpid())


def _forget_after_fork() -> None:
    """A child may be in a new PID namespace (its parent called unshare(CLONE_NEWPID))."""
    host_id.cache_clear()
    _self.cache_clear()


os.register_at_fork(after_in_child=_forget_after_fork)
