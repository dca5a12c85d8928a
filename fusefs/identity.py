"""Which agent a FUSE request comes from.

The request's pid is a thread id: it is mapped to its process (Tgid). The agent is
COHERENT_AGENT in the environment of that process or its nearest ancestor, else the mount's
default agent, else one agent per session (getsid). Results are cached by (pid, start time)
so a reused pid never inherits another process's agent. /proc/<pid>/environ is read in a
worker thread with a timeout: reading it while the process is in execve of a binary on this
mount can block in the kernel, and the file system must never stall on it.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from coherent_volume.liveness import start_time
from coherent_volume.volume import ENV_AGENT

ENVIRON_TIMEOUT = 0.5


def _status_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def process_of(tid: int) -> int:
    """The process (thread group) of a thread id; the id itself if /proc does not say."""
    tgid = _status_field(tid, "Tgid")
    return int(tgid) if tgid else tid


def _parent(pid: int) -> int | None:
    ppid = _status_field(pid, "PPid")
    return int(ppid) if ppid else None


def _agent_in_environ(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    prefix = ENV_AGENT.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            value = item[len(prefix):].decode("utf-8", "replace")
            return value or None
    return None


class AgentResolver:
    """Maps a request's thread id to an agent name; thread-safe, never blocks longer than a timeout."""

    def __init__(self, default_agent: str | None, daemon_pid: int) -> None:
        self.default_agent = default_agent
        self._daemon_pid = daemon_pid
        self._cache: dict[tuple[int, int], str] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cv-environ")

    def _fallback(self, pid: int) -> str:
        if self.default_agent:
            return self.default_agent
        try:
            return f"session-{os.getsid(pid)}"
        except OSError:
            return "session-unknown"

    def _lookup(self, pid: int) -> str:
        walk: int | None = pid
        for _ in range(64):  # nearest ancestor first, bounded
            if walk is None or walk <= 1 or walk == self._daemon_pid:
                break
            future = self._pool.submit(_agent_in_environ, walk)
            try:
                agent = future.result(timeout=ENVIRON_TIMEOUT)
            except FutureTimeout:
                agent = None
            if agent:
                return agent
            walk = _parent(walk)
        return self._fallback(pid)

    def agent(self, tid: int) -> str:
        """Agent of the process that sent a request with thread id `tid` (0: kernel-originated)."""
        if tid <= 0:
            return self._fallback(0) if self.default_agent else "session-kernel"
        pid = process_of(tid)
        started = start_time(pid)
        key = (pid, started if started is not None else -1)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            return cached
        agent = self._lookup(pid)
        if started is not None:
            with self._lock:
                if len(self._cache) > 4096:
                    self._cache.clear()
                self._cache[key] = agent
        return agent

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
