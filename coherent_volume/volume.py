"""CoherentVolume: the Python face — tracked reads and fail-closed writes for one agent."""

from __future__ import annotations

import functools
import math
import os
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Concatenate, ParamSpec, TypeVar

from .core import Isolation, open_core, validate_agent
from .core.history import MAX_VERSION, Pruned
from .errors import Absent, CasConflict, CoherenceError, RetriesExhausted, StaleWriteError, VolumeConfigError
from .liveness import current_process
from .paths import Target, is_registry_path, lexical
from .policy import Policy
from .protocol import ENV_AGENT, Grant, Version

CLOSE_WAIT = 60.0
"""Seconds `close()` waits at most for calls under way in other threads (and locks they hold)."""

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _call(method: Callable[Concatenate[CoherentVolume, _P], _R]) -> Callable[Concatenate[CoherentVolume, _P], _R]:
    """A public call: refused once the volume is closed, waited for by `close()` while under way."""

    @functools.wraps(method)
    def call(self: CoherentVolume, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self._in_use():
            try:
                return method(self, *args, **kwargs)
            except OSError as e:  # named beneath a descriptor of this call (`VolumePaths.beneath`): as given
                if isinstance(e.filename, str) and e.filename.startswith("/proc/self/fd/") and args:
                    given = args[0]
                    if isinstance(given, (str, os.PathLike)):
                        e.filename = os.fspath(given)
                raise

    return call


_locking = threading.Lock()


def _after_fork_in_child() -> None:
    """A forked child's lock of `_locked` is its own (the parent's may have been copied held)."""
    global _locking
    _locking = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
_locked: dict[tuple[str, str], tuple[int, int, str]] = {}
"""(volume root, path) -> the process and thread holding its `lock()`, and its agent: a second lock()
of the path by that agent in that thread would wait for itself (a forked child's thread of the same
id holds nothing: the grant is its parent's)."""


class CoherentVolume:
    """One agent's handle on a volume. Thread-safe; any number may be open in any number of processes.
    All handles under one agent name, in any process, are one agent: they share its views and never
    refuse each other, so workers that may write the same file at once need names of their own.

    `managed` creates the volume on first use and must equal the stored globs afterwards
    (None opens an existing volume with its stored globs)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        managed: object = None,
        agent: str | None = None,
        isolation: Isolation = "file",
    ) -> None:
        if isolation not in ("file", "read-set"):
            raise VolumeConfigError(f"isolation must be 'file' or 'read-set', not {isolation!r}")
        if agent is None:
            agent = os.environ.get(ENV_AGENT) or f"agent-{os.getpid()}-{secrets.token_hex(3)}"
        self.agent = validate_agent(agent)
        self.isolation: Isolation = isolation
        self._core = open_core(root, managed)
        self._closed = False
        self._calls = threading.Condition()
        self._running: dict[int, int] = {}
        """Calls under way, by thread (of process `_pid`)."""
        self._pid = os.getpid()

    @property
    def root(self) -> str:
        return self._core.paths.root

    @property
    def managed(self) -> tuple[str, ...]:
        return self._core.paths.globs.patterns

    def _target(self, path: str | os.PathLike[str]) -> Target:
        return self._core.resolve(path)

    # ---- reads ----

    @_call
    def read(self, path: str | os.PathLike[str]) -> bytes:
        """Tracked read: returns the bytes and registers this agent's view at their version (with
        read-set isolation, a read that finds no file that ever was counts too, at version 0). A
        managed file found missing raises Absent, with the version its absence was seen at."""
        paths = self._core.paths
        rel = lexical(path) if isinstance(path, str) else None
        if rel is not None and not is_registry_path(rel):
            fd = paths.open_plain(rel)  # fast path: a plain path with no symlink in it
            if fd is not None:
                return self._core.read(self.agent, paths.of_rel(rel), fd).data
        absence = self.isolation == "read-set"
        return self._core.read(self.agent, self._target(path), absence=absence).data

    def read_text(self, path: str | os.PathLike[str], encoding: str = "utf-8") -> str:
        return self.read(path).decode(encoding)

    @_call
    def reacquire(self, path: str | os.PathLike[str]) -> bytes:
        """Explicit re-read after a refusal: also lifts a fence left by a reclaimed grant."""
        self._core.clear_fence(self.agent, self._target(path))
        return self.read(path)

    @_call
    def version(self, path: str | os.PathLike[str]) -> int:
        """Current committed version of a managed path, 0 if it never existed."""
        return self._core.version(self._target(path))

    @_call
    def stale(self) -> list[str]:
        """Managed paths this agent has read that changed since."""
        return self._core.stale(self.agent)

    @_call
    def forget(self, path: str | os.PathLike[str]) -> None:
        """Drop a path from this agent's read set (it no longer counts for read-set isolation)."""
        self._core.forget(self.agent, self._target(path))

    # ---- writes ----

    @staticmethod
    def _bytes(data: bytes | str) -> bytes:
        if isinstance(data, str):
            try:
                return data.encode("utf-8")
            except UnicodeEncodeError as e:  # (a lone surrogate: text decoded with errors="surrogateescape")
                raise VolumeConfigError(
                    f"data is text that UTF-8 cannot encode ({e.reason} at character {e.start}): give the bytes "
                    "themselves, or valid text (nothing was written)"
                ) from None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes or str, not {type(data).__name__}")
        return bytes(data)

    @_call
    def write(self, path: str | os.PathLike[str], data: bytes | str, *, merge: bool = False) -> int:
        """Fail-closed write (str is written as UTF-8); returns the new version (0 for unmanaged paths).
        A refusal carries the diff of what changed since this agent's read (`StaleWriteError.diff`).

        With `merge` (or on a path the volume's merge globs name), a write refused only because
        this agent's view is stale is merged three-way, by line, with the current version and
        committed as a `merge` version; changes to the same lines raise MergeConflict with the
        hunks, and nothing changes. Never merged: held, fenced, unread, read-set, binary content."""
        if not isinstance(merge, bool):
            raise VolumeConfigError(f"merge is True or False, not {merge!r} (nothing was written)")
        return self._core.write(
            self.agent, self._target(path), self._bytes(data), isolation=self.isolation, merge=merge
        )

    @_call
    def write_cas(self, path: str | os.PathLike[str], expected_version: int, data: bytes | str) -> int:
        """Write only if the current version is `expected_version`; CasConflict otherwise."""
        number = isinstance(expected_version, int) and not isinstance(expected_version, bool)
        if not number or not 0 <= expected_version <= MAX_VERSION:
            raise VolumeConfigError(
                f"expected_version must be a version number (0: the path does not exist yet), not "
                f"{expected_version!r} (nothing was written)"
            )
        try:
            return self._core.commit(
                self.agent, self._target(path), self._bytes(data), isolation=self.isolation, expected=expected_version
            )
        except StaleWriteError as refusal:
            raise self._core.refusal_diff(refusal) from None

    @_call
    def delete(self, path: str | os.PathLike[str]) -> int:
        """Delete with the same checks as write; returns the deletion's version. A symlink is removed
        itself (0: links carry no versions), as unlink(2) does."""
        link = self._core.paths.resolve_link(path)
        if link is not None and self._core.unlink_special(link):  # the link, never what it points to
            return 0
        try:
            return self._core.commit(self.agent, self._target(path), None, isolation=self.isolation)
        except StaleWriteError as refusal:
            raise self._core.refusal_diff(refusal) from None

    @_call
    def update(self, path: str | os.PathLike[str], fn: Callable[[bytes], bytes | str], retries: int = 8) -> int:
        """Read, compute `fn(old)` (b"" for a missing file), write_cas; retry on a conflict that a
        re-read can cure (stale, held) up to `retries` more times, then RetriesExhausted."""
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise VolumeConfigError(f"retries must be a whole number, 0 or more, not {retries!r}")
        target = self._target(path)
        last: CasConflict | None = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(random.uniform(0, min(0.05, 0.001 * 2**attempt)))
            try:
                observed = self._core.read(self.agent, target)
                old, version = observed.data, observed.version
            except Absent as absent:  # the version its absence was observed at, not asked again after
                old, version = b"", absent.version
            except FileNotFoundError:  # (not managed: no version)
                old, version = b"", 0
            new = self._bytes(fn(old))
            if self._closed:  # (by `fn`, or by another thread meanwhile): nothing is written after close()
                raise CoherenceError(
                    f"{target.rel}: this CoherentVolume was closed while update() ran; nothing was written"
                )
            try:
                return self._core.commit(self.agent, target, new, isolation=self.isolation, expected=version)
            except CasConflict as conflict:
                if conflict.reason not in ("stale", "held"):
                    raise
                last = conflict
        assert last is not None
        raise self._core.refusal_diff(RetriesExhausted(**last.facts(), expected_version=last.expected_version))

    # ---- history ----

    @_call
    def history(self, path: str | os.PathLike[str]) -> list[Version]:
        """Every version of a managed path, newest first: version, writer, at, size, hash, kind;
        [] for one that never existed (where the CLI's `history` says so and exits 4)."""
        return self._core.history(self._core.resolve_name(path))

    @_call
    def read_version(self, path: str | os.PathLike[str], version: int) -> bytes:
        """The bytes of a retained version; untracked (this agent's view does not move).
        VersionGone if it was pruned (or is a deletion), DamagedContent if its stored bytes are."""
        return self._core.read_version(self._core.resolve_name(path), version)

    @_call
    def diff(self, path: str | os.PathLike[str], old: int | None = None, new: int | None = None) -> str | None:
        """Unified diff between two retained versions; by default from this agent's view (nothing,
        if it never read the file) to the current version. None for binary content."""
        target = self._core.resolve_name(path)
        if new is None:
            new = self._core.version(target)
        if old is None:
            old = self._core.seen(self.agent, target) or 0
        return self._core.diff(target, old, new)

    @property
    @_call
    def policy(self) -> Policy:
        """The volume's merge globs and retention policy."""
        return self._core.policy()

    @_call
    def set_policy(self, policy: Policy) -> None:
        """Change the volume's policy (every process sees it at its next decision)."""
        if not isinstance(policy, Policy):
            raise VolumeConfigError(
                f"a policy is a coherent_volume.Policy, not {type(policy).__name__} (nothing changed)"
            )
        self._core.set_policy(policy)

    @_call
    def prune(self) -> Pruned:
        """Drop the bytes of versions the retention policy no longer keeps (also done automatically,
        at most hourly, after a commit)."""
        return self._core.prune()

    @_call
    def restore(self, path: str | os.PathLike[str], version: int) -> int:
        """Commit the bytes of an old version as a new version (kind `restore`), with the same checks
        as `write`; returns the new version."""
        return self._core.restore(self.agent, self._target(path), version, isolation=self.isolation)

    @contextmanager
    def lock(self, path: str | os.PathLike[str], ttl: float = 30.0, timeout: float = 30.0) -> Iterator[Grant]:
        """Exclusive write grant for this agent (pessimistic mode), waiting up to `timeout` seconds.

        While held, every other agent's write is refused with 'held'. The grant ends at exit,
        at `ttl`, or when this process dies; a write after it was reclaimed is refused 'fenced'.
        Both are seconds, at most 30 days (VolumeConfigError otherwise)."""
        _seconds("ttl", ttl, zero=False)
        _seconds("timeout", timeout, zero=True)
        with self._in_use():
            target = self._target(path)
            key = (self.root, target.rel)
            with _locking:
                if _locked.get(key) == (os.getpid(), threading.get_ident(), self.agent):
                    raise CoherenceError(
                        f"{target.rel}: {self.agent} holds its lock() already in this thread: a second one would "
                        "wait for the first, which it keeps from ending; take it once (nothing was changed)"
                    )
            deadline = time.monotonic() + timeout
            delay = 0.001
            while True:
                if self._closed:  # close() waits for this call no longer than CLOSE_WAIT: nor does it
                    raise CoherenceError(f"{target.rel}: this CoherentVolume was closed while lock() waited")
                try:
                    grant = self._core.acquire(self.agent, target, ttl, current_process())
                    break
                except CoherenceError as refusal:
                    if getattr(refusal, "reason", None) != "held" or time.monotonic() >= deadline:
                        raise
                time.sleep(random.uniform(delay / 2, delay))
                delay = min(delay * 2, 0.1)
            with _locking:
                _locked[key] = (os.getpid(), threading.get_ident(), self.agent)
            try:
                yield grant
            finally:
                with _locking:
                    _locked.pop(key, None)
                self._core.release(grant)

    # ---- lifetime ----

    @contextmanager
    def _in_use(self) -> Iterator[None]:
        """A call under way (or a lock held): none begins once the volume is closed, and `close()`
        waits for those of other threads."""
        self._forked()
        me = threading.get_ident()
        with self._calls:
            if self._closed:
                raise CoherenceError("this CoherentVolume is closed")
            self._running[me] = self._running.get(me, 0) + 1
        try:
            yield
        finally:
            with self._calls:
                self._running[me] -= 1
                if not self._running[me]:
                    del self._running[me]
                self._calls.notify_all()

    def _forked(self) -> None:
        """In a forked child: the calls its parent's other threads had under way are none of its own
        (close() waited a minute for them, /tmp/s32r2api 4), and their lock may have been copied held."""
        if self._pid != os.getpid():
            self._pid, self._calls, self._running = os.getpid(), threading.Condition(), {}

    def close(self) -> None:
        """Close the volume. Calls under way in other threads, and locks they hold, end first
        (CLOSE_WAIT s at most: before, they met a closed registry and failed with raw errors,
        /tmp/s32api 2); no call begins after."""
        self._forked()
        me = threading.get_ident()
        with self._calls:
            if self._closed:
                return
            self._closed = True
            self._calls.wait_for(lambda: not set(self._running) - {me}, CLOSE_WAIT)
        self._core.close()

    def __enter__(self) -> CoherentVolume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CoherentVolume({self.root!r}, agent={self.agent!r}, isolation={self.isolation!r})"


LONGEST_WAIT = 30 * 86400.0
"""Seconds a grant may last or a lock() wait at most (30 days): past that, a number is taken for a
mistake (a grant's end far past any clock a registry or `status` shows)."""
SHORTEST_TTL = 0.001
"""Seconds a grant lasts at least: a shorter one would be over before anything could use it."""


def _seconds(name: str, value: object, *, zero: bool) -> None:
    """VolumeConfigError unless `value` is a number of seconds from SHORTEST_TTL (or 0, with `zero`)
    to LONGEST_WAIT."""
    least = 0.0 if zero else SHORTEST_TTL
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not least <= value <= LONGEST_WAIT
    ):
        raise VolumeConfigError(
            f"{name} must be a number of seconds from {least:g} to {LONGEST_WAIT:g} (30 days), not {value!r}"
        )
