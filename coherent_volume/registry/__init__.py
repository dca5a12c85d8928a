"""The registry: where a volume's versions, views, grants, fences and log live.

This is the one narrow interface the core talks to. `SQLiteRegistry` is the host-local
backend; a backend for volumes shared across hosts implements the same two protocols.

Locking rule (deadlock freedom): take `commit_lock(paths)` before opening a write transaction,
never while one is open (a hold that needs more paths takes them between two runs of a
transaction, in order, or is taken again from its start: `CopyRelock`). Every wait for a lock is
bounded: past it, RegistryError(EBUSY) says which lock and, when the system tells, who holds it. A
forked child never holds (or keeps alive) its parent's locks.

What the commit lock covers: every process that changes the volume's files on this disk (SQLite:
the volume's root, one per volume, whole whatever the paths asked; PostgreSQL: this working copy,
one per host, a lock per path) decides, recovers and installs under it, so a holder's disk changes
nothing of the paths it holds but what it does itself, across all the transactions it runs under
one hold: a write transaction settles the intents and changes the files of the paths its thread's
hold covers only (`Transaction.held`). Every write transaction is serial with every other of the
volume that touches a path it touches (SQLite: every other, BEGIN IMMEDIATE under the commit lock;
PostgreSQL: the lock of each path in the database, and the volume's lock shared, or exclusive for
a transaction that needs the whole volume: `Transaction.hold`, taken by the transaction and
released by its COMMIT, so another host's transaction may commit between two transactions of one
hold). What a hold relies on across several
transactions is therefore its own disk and its own transactions' outcomes, never that the
registry stood still (docs/multihost.md lists each such call site and why that is enough).

Retry rule: every write goes through `transact(fn)`, which may run `fn` more than once (a
backend re-runs it in a new transaction when its engine aborted the last one as a conflict that
a re-run may resolve, `Retry`), so `fn` changes nothing but its transaction.

Content rule: a version's bytes are stored (`Transaction.store`) in the transaction that names
them (its version, or the intent of the commit that will make it), so no content is ever named
without being stored, and none is left stored that nothing names.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Protocol, TypeVar

from ..errors import RegistryError
from ..globs import REGISTRY_DIR, ManagedGlobs
from ..liveness import ProcessId
from ..protocol import EventKind, FileRecord, Grant, Intent, Version

if TYPE_CHECKING:
    from .replica import Replica

R = TypeVar("R")

DB_FILE = "registry.db"
"""The SQLite backend's registry, in a root's `.coherent` directory."""
LOCATION_FILE = "registry.json"
"""What a root's `.coherent` directory holds instead of DB_FILE when its registry is elsewhere
(a PostgreSQL database: its URL without a password, and the volume's name there)."""


def volume_above(path: str) -> str | None:
    """The nearest directory above the absolute `path` that is a volume's root (its `.coherent`
    `recorded_in`), None if there is none."""
    below, above = path, os.path.dirname(path)
    while above != below:
        if recorded_in(os.path.join(above, REGISTRY_DIR)):
            return above
        below, above = above, os.path.dirname(above)
    return None


def recorded_in(directory: str) -> bool:
    """Whether `directory` (a root's `.coherent`) holds or names a registry, of either backend:
    the one test of "is this a volume root" that every face uses. A `directory` this process may
    not look into counts: it may hold one, and opening the volume then says permission denied (its
    files are never taken for files of no volume)."""
    for name in (DB_FILE, LOCATION_FILE):
        try:
            os.stat(os.path.join(directory, name))
            return True
        except PermissionError:
            return os.path.isdir(directory)
        except OSError:
            continue
    return False


ATTEMPTS = 8
"""Runs of one write transaction before a backend gives up on conflicts (`retried`)."""


class CopyRelock(RegistryError):
    """A hold of the commit lock needs `paths` too (None: the whole copy), and one of them could
    only be taken out of the lock order and was held: the outermost `commit_lock` lets go
    (`released`, unless a write transaction committed under it) and its owner takes it again
    holding `paths`, running its block again from its start (`CoreBase._locked`). Where nobody
    does, a RegistryError(EBUSY): nothing of it was changed."""

    def __init__(self, paths: frozenset[str] | None) -> None:
        super().__init__(
            "a working copy's commit lock needed a path held by another writer out of its lock order; nothing "
            "was changed: try again",
            errno.EBUSY,
        )
        self.paths = paths
        self.released = False


class Retry(Exception):
    """A backend's engine aborted a write transaction as a conflict with another that a re-run may
    resolve (PostgreSQL: serialization failure, deadlock). Raised inside `transact` only; it never
    reaches the caller."""


def retried(attempt: Callable[[], R], where: str) -> R:
    """Run `attempt` (one whole transaction) until it does not raise Retry: at most ATTEMPTS times,
    with short random pauses between; then RegistryError(EBUSY). Nothing of an attempt that raised
    Retry was committed, so each run starts from the registry as it is."""
    for n in range(ATTEMPTS):
        try:
            return attempt()
        except Retry as e:
            last = e
            time.sleep(random.uniform(0, 0.002 * 2**n))
    raise RegistryError(
        f"registry {where}: a write conflicted with other writers {ATTEMPTS} times in a row ({last}); "
        "nothing was changed: try again",
        errno.EBUSY,
    )


@dataclass(frozen=True)
class Event:
    """One line of the volume's log."""

    seq: int
    at: float
    kind: EventKind
    path: str | None
    agent: str | None
    reason: str | None = None
    seen_version: int | None = None
    version: int | None = None
    detail: str | None = None


@dataclass(frozen=True)
class LogMark:
    """Where a reader of the log stands (`Transaction.events_since`): it has read every line whose
    key is below `below`, and of the others those numbered in `seen`. The key is a line's `seq`
    where write transactions are serial (SQLite); where those touching no common path commit side
    by side (PostgreSQL), a line numbered first may commit last, so the key is the id of its
    transaction, and `below` the oldest one still running when the reader last read."""

    below: int = 0
    seen: frozenset[int] = frozenset()


@dataclass(frozen=True)
class AgentSummary:
    agent: str
    views: int
    stale: int
    last_read: float | None


class InTheWay(NamedTuple):
    """A file a new one at another name would clash with (`Transaction.file_in_the_way`): its path,
    its version and its writer (of a rename under way: the version its intent records)."""

    path: str
    version: int
    writer: str
    pending: bool
    """A rename's intent (its install not recorded yet), not a file the volume holds."""


class Transaction(Protocol):
    """Reads and writes of one registry transaction; a write transaction is atomic and serial.

    A write transaction holds paths (PostgreSQL; SQLite's holds every path): what it reads or
    writes of a path it does not hold, or of the whole volume while it holds paths (a listing), has
    it rolled back and run again by `Registry.transact` holding that too.
    `hold` says ahead what it will touch, so that it need not be run again."""

    @property
    def held(self) -> Iterable[str] | None:
        """The paths this transaction holds, in the registry and in its thread's commit lock: whose
        interrupted commits it settles and whose files it may change; None: every path."""
        ...

    def hold(self, paths: Iterable[str]) -> list[str]:
        """Hold `paths` too (or have the transaction run again holding them from its start); the
        paths newly held, whose interrupted commits it has not settled yet."""
        ...

    def hold_agents(self, agents: Iterable[str]) -> None:
        """Hold the rows of `agents` that no path covers (each one's session binding, all its views
        at once) too, or have the transaction run again holding them from its start: for those rows,
        serial with every other transaction holding one of them."""
        ...

    def hold_all(self) -> None:
        """Hold every path (or have the transaction run again holding the whole volume)."""
        ...

    def hold_all_if_free(self) -> None:
        """Hold every path if no other transaction holds one when it opens and its thread's commit
        lock holds every path, else those it holds (`held` says which, once it read something),
        never waiting for the others to end (or have the transaction run again asking so)."""
        ...

    def file(self, path: str) -> FileRecord | None:
        """The record as `put_file`/`touch_file` stored it, fingerprint included (inode numbers up to 2**64)."""
        ...

    def file_and_view(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]: ...
    def write_state(self, path: str, agent: str) -> tuple[FileRecord | None, int | None, Grant | None, bool]:
        """What a write decision reads of `path`, in one statement: (`file(path)`, `view(agent,
        path)`, `grant(path)`, `fenced(agent, path)`), as those four would answer now."""
        ...

    def read_ahead(self, path: str, agent: str) -> None:
        """Say that this transaction will ask `write_state(path, agent)`; its answer is the same
        either way. A backend whose reads are round trips away sends that read with the
        transaction's first one (PostgreSQL: with its opening), and reads it again if the
        transaction wrote what it reads meanwhile."""
        ...

    def put_file(self, record: FileRecord) -> None: ...
    def put_version(self, version: Version) -> None: ...
    def history(self, path: str, limit: int | None = None) -> list[Version]:
        """A path's versions, newest first."""
        ...

    def version_entry(self, path: str, version: int) -> Version | None: ...
    def file_in_the_way(self, path: str, besides: Collection[str] = ()) -> InTheWay | None:
        """A file at a name on `path`'s way (a directory it is in) or below it (`path` as a
        directory), if the registry holds one, present or on its way in (a rename's intent, until
        its install is recorded), other than those at `besides`: the name it would clash with as a
        file. Ordered after every
        transaction that may record such a file (PostgreSQL: the tree locks of `path`,
        `pg_transaction.Holds.trees`), so no two can record a clash side by side."""
        ...

    def deleted_in(self, directory: str) -> list[FileRecord]:
        """Tombstones of paths directly in `directory` ("" is the root)."""
        ...

    def history_paths(self) -> list[str]:
        """Paths with retained versions."""
        ...

    def retained(self, path: str) -> list[Version]:
        """A path's versions whose bytes are retained (not pruned, not a deletion), oldest first."""
        ...

    def viewers(self, path: str) -> dict[str, int]:
        """The agents with a view of `path`, and the version each one's points at."""
        ...

    def last_view(self, agent: str) -> float | None:
        """When `agent` last registered a view (the newest `read_at` of its views), if it has any."""
        ...

    def prune(self, path: str, version: int) -> None:
        """Mark a version's bytes as no longer retained (its history entry stays)."""
        ...

    def in_use(self, digest: str) -> bool:
        """Whether a retained version or a pending commit (intent) names this content. The answer
        holds to this transaction's end: a commit storing the content meanwhile is either seen
        (committed) or waits for this transaction to end (PostgreSQL: the content's lock)."""
        ...

    def retained_bytes(self) -> int:
        """Bytes of distinct retained content."""
        ...

    def store(self, digest: str | None, source: bytes | int) -> str:
        """Retain content (bytes, or everything readable by offset from a descriptor) in this
        transaction, stored once however many versions name it: it exists exactly when the
        transaction commits, so the version or intent naming it goes in the same transaction.
        `digest` None stores what was read under its own hash. Returns the hash stored under.
        Any size is kept (no cap but the disk); a descriptor is read and stored a bounded part at a
        time, never whole in memory. OSError(EAGAIN) if the bytes do not hash to `digest` (a file
        written meanwhile): nothing was stored and the transaction stays usable."""
        ...

    def load(self, digest: str, what: str) -> bytes:
        """Retained content, checked against its hash: VersionGone if it is not retained,
        DamagedContent if it is not all there or no longer hashes to `digest` (never served).
        `what` names it in errors."""
        ...

    def load_into(self, digest: str, what: str, write: Callable[[bytes], object]) -> int:
        """`load` a bounded part at a time: each part is passed to `write`, in order; the bytes
        passed. The check comes after the last part: on DamagedContent, what `write` got is not the
        content and the caller discards it (VersionGone comes before any part)."""
        ...

    def drop(self, digest: str) -> int:
        """Remove retained content that nothing names any more (`in_use` False: the caller checks,
        in this transaction); the bytes freed (0 if it was not stored)."""
        ...

    def stored(self) -> tuple[int, int]:
        """(contents, bytes) the store holds."""
        ...

    def content_size(self, digest: str) -> int | None:
        """The size of the content stored under `digest` (None: none is), as its row records it
        (not read through: `load` checks the bytes)."""
        ...

    def meta(self, key: str) -> str | None: ...
    def put_meta(self, key: str, value: str) -> None:
        """Set `key`, serial with every other transaction setting it, and with what this one read of
        it (PostgreSQL: the setting's lock, from the transaction's start). Writers read settings
        with no lock: a setting they decide by is changed holding the whole volume (`hold_all`)."""
        ...

    def touch_file(self, path: str, record: FileRecord) -> None: ...

    def view(self, agent: str, path: str) -> int | None: ...
    def put_view(self, agent: str, path: str, version: int, at: float) -> None: ...
    def drop_view(self, agent: str, path: str) -> None: ...
    def drop_views(self, agent: str) -> int:
        """Forget every view of `agent`; how many there were."""
        ...

    def read_set(self, agent: str) -> dict[str, int]: ...
    def versions(self, paths: list[str]) -> dict[str, int]: ...
    def stale_views(self, agent: str) -> list[tuple[str, int, int]]: ...

    def now(self) -> float:
        """The registry's clock (seconds since the epoch), read once per transaction: the one clock
        every host's grant decisions use (taking, expiring, reclaiming, renewing), never the
        caller's own (SQLite: this host's; PostgreSQL: the database server's)."""
        ...

    def grant(self, path: str) -> Grant | None: ...
    def grants(self, paths: Iterable[str] | None = None) -> list[Grant]:
        """The grants on `paths` (held), else every grant (the whole volume held)."""
        ...

    def put_grant(self, grant: Grant) -> None: ...
    def drop_grant(self, path: str) -> None: ...

    def bind(self, agent: str, process: ProcessId, pinned: bool, at: float) -> None: ...
    def unbind(self, agent: str) -> None: ...
    def bound_agent(self, process: ProcessId) -> tuple[str, bool] | None: ...
    def bound_agents(self, processes: Sequence[ProcessId]) -> dict[ProcessId, tuple[str, bool]]:
        """(agent, pinned) of each of `processes` that is bound, in one statement."""
        ...

    def bound_process(self, agent: str) -> ProcessId | None: ...
    def pinned(self, agent: str) -> bool: ...
    def grants_of(self, agent: str) -> list[Grant]: ...

    def fenced(self, agent: str, path: str) -> bool: ...
    def put_fence(self, agent: str, path: str, at: float) -> None: ...
    def drop_fence(self, agent: str, path: str) -> None: ...

    def intents(self, paths: Iterable[str] | None = None) -> list[Intent]:
        """The intents of `paths` (held), else of every path it holds."""
        ...

    def put_intent(self, intent: Intent) -> None: ...
    def drop_intent(self, path: str) -> None: ...

    def log(
        self,
        kind: EventKind,
        path: str | None,
        agent: str | None,
        at: float,
        *,
        reason: str | None = None,
        seen_version: int | None = None,
        version: int | None = None,
        detail: str | None = None,
    ) -> None: ...
    def events(
        self,
        after: int = 0,
        path: str | None = None,
        kind: EventKind | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Event]: ...
    def log_mark(self) -> LogMark:
        """The mark of a reader that has read every line this transaction sees."""
        ...

    def events_since(self, mark: LogMark) -> tuple[list[Event], LogMark]:
        """The lines committed since `mark` that this transaction sees, each once, by `seq`; the
        mark past them. A line of a path comes after every earlier line of that path."""
        ...

    def files(self) -> Iterator[FileRecord]: ...
    def agents(self) -> list[AgentSummary]: ...


class Registry(Protocol):
    """A volume's shared registry. Safe to use from many threads; one per process per volume is enough."""

    @property
    def globs(self) -> ManagedGlobs: ...
    @property
    def replica(self) -> Replica | None:
        """This working copy's own state where the registry holds the content (PostgreSQL), else None."""
        ...

    def commit_lock(
        self, paths: Iterable[str] | None = None, whole_if_free: bool = False
    ) -> AbstractContextManager[None]:
        """Exclusive over `paths` (None: every path; with `whole_if_free`, every path if no other
        hold is in place at once, never waited for) across the threads and processes that change the
        volume's files on this disk (see the module's locking rule), re-entrant within a thread (a
        nested call asking for more extends the hold, or raises CopyRelock), freed when its holder
        dies; waited for a bounded time, then RegistryError(EBUSY)."""
        ...

    def peek(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]: ...
    def read(self) -> AbstractContextManager[Transaction]: ...
    def transact(self, fn: Callable[[Transaction], R], holds: Iterable[str] = ()) -> R:
        """Run `fn` in one write transaction and commit it; return what `fn` returned. An exception
        from `fn` rolls back and propagates. `fn` may run several times (`retried`, and to hold more:
        `Transaction.hold`): it must read and change only the transaction (and read the disk),
        leaving every other effect to its caller once `transact` has returned. `holds`: the paths
        it holds from its start."""
        ...

    def close(self) -> None: ...
