"""Which agent a FUSE request comes from.

The request's pid is a thread id: it is mapped to its process (Tgid). The agent is the one an
integration bound to that process or its nearest ancestor up to its PID namespace's init (a Claude Code session, see
`VolumeCore.bind_session`), else COHERENT_AGENT in the environment of the nearest such
process, else the mount's default agent, else one agent per session (`session_agent`). Results are
cached by (pid, start time) so a reused pid never inherits another process's agent, for at
most CACHE_SECONDS so a binding made after a process started is seen soon. A thread seen
within that time is answered from one read of /proc/<tid>/stat (`cached`, cheap enough for
the event loop). /proc/<pid>/environ is read in a worker thread with a timeout: reading it
while the process is in execve of a binary on this mount can block in the kernel, and the
file system must never stall on it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from coherent_volume.liveness import INITIAL_PID_NAMESPACE, ProcessId, host_id, pid_namespace_inode, start_time
from coherent_volume.protocol import ENV_AGENT

ENVIRON_TIMEOUT = 0.5
CACHE_SECONDS = 1.0

Binding = Callable[[Sequence[ProcessId]], "tuple[str, bool] | None"]
"""(agent, pinned) bound to the first of some processes that has a binding (`VolumeCore.session_of`)."""


def proc_file(pid: int, name: str) -> bytes | None:
    """The content of /proc/<pid>/<name> (a small file: status, comm), None if unreadable. One
    os.read, not open(): this is on the request path of managed opens (~15 µs less)."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 65536)
        finally:
            os.close(fd)
    except OSError:
        return None


def _status_field(pid: int, field: str) -> str | None:
    status = proc_file(pid, "status")
    if status is None:
        return None
    at = status.find(f"\n{field}:".encode())
    if at < 0:
        return None
    end = status.find(b"\n", at + 1)
    return status[at + len(field) + 2 : end if end >= 0 else len(status)].strip().decode()


_CAP_SYS_ADMIN = 21


def administers(pid: int, uid: int) -> bool:
    """Whether the process `pid` holds CAP_SYS_ADMIN in its effective set (what a local file system
    asks before it lists `trusted.*` attributes); where /proc does not say, whether `uid` is root."""
    effective = _status_field(pid, "CapEff")
    if effective is None:
        return uid == 0
    return bool(int(effective, 16) >> _CAP_SYS_ADMIN & 1)


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
            value = item[len(prefix) :].decode("utf-8", "replace")
            return value or None
    return None


def namespace_name() -> str | None:
    """What tells this PID namespace from any other over time, for agent names: its inode and its
    init's start time (a namespace's inode is reused as soon as it ends); None for the host's own."""
    inode = pid_namespace_inode()
    return None if inode == INITIAL_PID_NAMESPACE else f"pidns-{inode}.{start_time(1)}"


def session_agent(leader: int, namespace: str | None) -> str:
    """The agent of the session led by `leader` (as numbered in the PID namespace `namespace`) that
    nothing names: `session-LEADER`, with `@NAMESPACE` outside the host's own namespace (each
    container numbers its processes from 1: two containers' sessions must not be one agent, nor a
    container's one of a container that ended before it)."""
    return f"session-{leader}" if namespace is None else f"session-{leader}@{namespace}"


class AgentResolver:
    """Maps a request's thread id to (agent, pinned); thread-safe, never blocks longer than a timeout."""

    def __init__(self, default_agent: str | None, daemon_pid: int, bound: Binding) -> None:
        self.default_agent = default_agent
        self._daemon_pid = daemon_pid
        self._bound = bound
        self._cache: dict[tuple[int, int], tuple[float, str, bool]] = {}
        self._threads: dict[tuple[int, int], tuple[float, str, bool]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cv-environ")
        self._namespace = namespace_name()
        self._led_from_outside: dict[tuple[int, int], str] = {}
        """(pid, start time) -> the session agent of a process whose session is led from outside
        this PID namespace, for its life: its farthest ancestor here when it was first seen."""

    def _fallback(self, pid: int, chain: list[tuple[int, int | None]]) -> str:
        """The mount's agent, else `pid`'s session's (`session_agent`). A session led from outside
        this PID namespace (getsid 0, a container's) is stood for by the caller's farthest ancestor
        here when the caller, or a nearer ancestor, was first seen (`chain`: the caller and its
        ancestors with their start times, nearest first): an orphan its parent's exit hands to
        the namespace's init keeps the session it had (it read as that agent), as a session does."""
        if self.default_agent:
            return self.default_agent
        try:
            sid = os.getsid(pid)
        except OSError:
            return "session-unknown"
        if sid > 0:
            return session_agent(sid, self._namespace)
        alive = [(p, s) for p, s in chain if s is not None]
        with self._lock:
            known = next((self._led_from_outside[key] for key in alive if key in self._led_from_outside), None)
            agent = known or session_agent(chain[-1][0] if chain else pid, self._namespace)
            if len(self._led_from_outside) > 4096:
                self._led_from_outside = {k: a for k, a in self._led_from_outside.items() if start_time(k[0]) == k[1]}
            for key in alive:
                self._led_from_outside.setdefault(key, agent)
        return agent

    def _lookup(self, pid: int) -> tuple[str, bool]:
        """The binding of `pid` or its nearest bound ancestor (one registry read for them all), else
        COHERENT_AGENT of the nearest that has it, else the fallback. The ancestors go up to this PID
        namespace's init included (a container's entrypoint names its agent), never the daemon."""
        chain: list[int] = []
        walk: int | None = pid
        for _ in range(64):  # nearest ancestor first, bounded
            if walk is None or walk <= 0 or walk == self._daemon_pid:
                break
            chain.append(walk)
            walk = _parent(walk)
        host = host_id()
        started = [(p, start_time(p)) for p in chain]
        binding = self._bound([ProcessId(host, p, s) for p, s in started if s is not None])
        if binding is not None:
            return binding
        for walk in chain:
            future = self._pool.submit(_agent_in_environ, walk)
            try:
                env_agent = future.result(timeout=ENVIRON_TIMEOUT)
            except FutureTimeout:
                env_agent = None
            if env_agent is not None:
                return env_agent, False
        return self._fallback(pid, started), False

    def cached(self, tid: int) -> tuple[str | None, bool] | None:
        """(agent, pinned) for a thread answered within CACHE_SECONDS; None when `agent` must look it up."""
        started = start_time(tid) if tid > 0 else None
        with self._lock:
            known = self._threads.get((tid, started)) if started is not None else None
        return (known[1], known[2]) if known is not None and known[0] > time.monotonic() else None

    def agent(self, tid: int) -> tuple[str | None, bool]:
        """(agent, pinned) of the process that sent a request with thread id `tid`. The kernel reports
        tid 0 for callers outside the daemon's PID namespace (and for its own writeback): their agent
        is the mount's default agent, or None (unknown: no managed change may be made for it)."""
        if tid <= 0:
            return self.default_agent, False
        thread_started = start_time(tid)
        pid = process_of(tid)
        started = start_time(pid)
        key = (pid, started if started is not None else -1)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(key)
        if cached is None or cached[0] <= now:
            cached = (now + CACHE_SECONDS, *self._lookup(pid))
            if started is not None:
                self._remember(self._cache, key, cached)
        if started is not None and thread_started is not None:
            self._remember(self._threads, (tid, thread_started), cached)
        return cached[1], cached[2]

    def _remember(
        self,
        cache: dict[tuple[int, int], tuple[float, str, bool]],
        key: tuple[int, int],
        answer: tuple[float, str, bool],
    ) -> None:
        with self._lock:
            if len(cache) > 4096:
                cache.clear()
            cache[key] = answer

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
