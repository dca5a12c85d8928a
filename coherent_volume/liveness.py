"""Process identity that survives pid reuse: (host, pid, start time)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=1)
def host_id() -> str:
    """This boot of this host: pids are only comparable within it."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}/{boot}"


def start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/pid/stat); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):  # zombie or dead: the process has exited
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> "ProcessId":
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(f"process {pid} does not exist")
        return cls(host_id(), pid, started)

    def alive(self) -> bool | None:
        """True/False on this host; None when it runs elsewhere and cannot be checked from here."""
        if self.host != host_id():
            return None
        return start_time(self.pid) == self.start


@lru_cache(maxsize=None)
def _self(pid: int) -> ProcessId:
    return ProcessId.of(pid)


def current_process() -> ProcessId:
    """This process (cached per pid, so it stays right after fork)."""
    return _self(os.getpid())
