"""A transaction of a PostgreSQL registry: the SQL of each registry.Transaction method, and the
content of versions stored in parts.

Invariants (round trips):
- a write (a statement whose result nothing reads) is queued, never sent alone: the queue goes to
  the server in one round trip with the transaction's next read (one message, bound here:
  `_together`; a statement carrying ALONE bytes of content or more goes alone before it, its bytes
  binary, in a round trip of its own: `_sent`), or with its COMMIT (one pipeline, content binary),
  so a write costs no round trip of its own (save such content, sent before a read), a read
  sees every write queued before it, and a queued write's error (a constraint violation, a lost
  connection) is raised by that read or that COMMIT, as the same psycopg error it would have raised
  alone (its owner maps it: `PostgresRegistry`);
- every round trip after which the transaction stays open ends with the server's ReadyForQuery and
  nothing after it, so idle_in_transaction_session_timeout ends a transaction whose client stopped
  (paused, cut off) between two round trips (`_together` says why a pipeline would not);
- the statements that open a transaction (BEGIN, its locks, the commit id) are queued
  the same way: they go with its first read;
- a read asked for ahead (`read_ahead`: the decision's `write_state`) is queued the same way, and
  answered from what it read unless a write queued since names a table it reads (then it is read
  again): a read ahead answers as if it were asked when it is asked;
- the queue holds at most PART bytes of parameters (content in parts) before it is sent;
- a write transaction holds its volume's lock shared and the lock of each path it reads or writes
  (`hold`), of each agent whose own rows it changes (`hold_agents`: its session binding, all its
  views) and of each setting it writes (`put_meta`), or the volume's lock exclusive (`Holds.whole`:
  it needs no other lock then; with `Holds.whole_if_free`, exclusive as well only if it is free when
  asked, never waited for). Touching a path, an agent or a setting it does not hold, or the whole
  volume (a listing) while it holds paths, raises `Relock`: its owner runs it again holding that
  from its opening. Locks of paths, agents and settings are taken in one global order (their keys,
  `path_key`, `agent_key` and `setting_key`, ascending, after the volume's): a key that sorts before
  one held is never waited for, its transaction is run again with the whole set instead (no
  deadlock). What a transaction lists of intents and grants is what its locks cover;
- a content's lock (`content_key`) is taken where the content is: shared by a transaction that
  stores it (one part), exclusive by one that stores it in parts, asks whether it is in use
  (`in_use`) or drops it, each held to its end; so a drop decides with no commit naming that content
  under way, and content in parts is stored by one transaction at a time. It is waited for where it
  is needed, in no order with the other keys, as the content's rows are: a wait that closes a cycle
  (only with a drop or a store in parts of that very content) is a deadlock PostgreSQL ends within
  its deadlock_timeout, and the transaction it ends is run again;
- a write transaction whose thread holds its working copy's commit lock (`copy`, a `CopyHold`)
  holds no path that hold does not: `hold` raises `Relock` for one, and its owner extends the hold
  before running it again; what it settles (`held`, `intents`) is what both cover, and it asks for
  the whole volume if free only while the hold is of the whole copy;
- a pipeline is sent only when the server has not spoken unasked: a session it is ending (idling
  too long in a transaction, a shutdown) gets a plain statement first, which raises the server's
  error with its SQLSTATE (a pipeline would report only a lost connection).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import xxhash

from ..errors import DamagedContent, VersionGone
from ..liveness import ProcessId
from ..protocol import FileRecord, Grant, Installed, Intent, Version, dirs_above
from . import AgentSummary, Event, InTheWay, LogMark
from .copy_locks import CopyHold
from .pg_connections import _pipeline, _psycopg

if TYPE_CHECKING:
    import psycopg

PART = 8 << 20
"""Most bytes of one stored part of a content (and of what a store or a read holds at once, twice)."""
ALONE = 256 << 10
"""Bytes of parameters (content) from which a statement sent before a read goes alone, its bytes
binary (`PostgresTransaction._sent`): bound into a text literal, content doubles on the wire and
its encoding and decoding cost about 50 ms a MiB (on the test VM: a commit of 16 MiB took 1.04 s
that way, 0.27 s binary), far more than the round trip it saves from this size up."""

_FILE_COLS = "path, version, present, hash, writer, committed_at"
_GRANT_COLS = "path, agent, token, host, pid, start, expires_at, fences"
_CLOCK = "extract(epoch FROM clock_timestamp())::float8"
"""The server's clock, in seconds since the epoch (`PostgresTransaction.now`)."""
_VERSION_COLS = "path, version, kind, writer, at, size, hash, parents, pruned, never_kept"
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
"""The oldest transaction running when the statement's snapshot was taken (every older one is over)."""
_WRITE_STATE_TABLES = ("cv_files", "cv_views", "cv_grants", "cv_fences")
"""What `write_state` reads: a queued write naming one of them drops what was read ahead."""


@dataclass(frozen=True)
class Holds:
    """What a write transaction locks from its opening: the volume's lock exclusive (`whole`), or
    shared with the lock of each of `paths` and of each of `agents` (an agent's own rows: its
    session binding, its views as a whole); with `whole_if_free`, exclusive too if it is free at
    once (never waited for: a request waiting for it would stall every writer of the volume)."""

    paths: frozenset[str] = frozenset()
    """The paths it locks one by one; with `whole`, those its thread's commit lock must hold."""
    agents: frozenset[str] = frozenset()
    settings: frozenset[str] = frozenset()
    trees: frozenset[str] = frozenset()
    """The paths whose tree it locks, to ask what is in their way (`file_in_the_way`): each one's tree
    lock exclusive, and shared that of each directory it lies in; so a file and a file below it
    are never recorded side by side, while files made in one directory are."""
    whole: bool = False
    whole_if_free: bool = False

    def keys(self, volume: uuid.UUID) -> set[int]:
        """The keys of the locks it takes one by one in `volume` (none when it holds the whole volume)."""
        if self.whole:
            return set()
        return (
            {path_key(volume, p) for p in self.paths}
            | {agent_key(volume, a) for a in self.agents}
            | {setting_key(volume, k) for k in self.settings}
            | {tree_key(volume, t) for t in self._tree_names()}
        )

    def shared(self, volume: uuid.UUID) -> set[int]:
        """Those of `keys` it takes shared: the tree locks of the directories its `trees` lie in."""
        own = {tree_key(volume, t) for t in self.trees}
        return {tree_key(volume, t) for t in self._tree_names()} - own

    def count(self) -> int:
        """How many locks it takes one by one."""
        return len(self.paths) + len(self.agents) + len(self.settings) + len(self._tree_names())

    def _tree_names(self) -> set[str]:
        return {name for t in self.trees for name in (t, *dirs_above(t))}


HOLD_MOST = 32
"""Most paths a write transaction locks one by one; one that needs more holds the whole volume
(a lock each takes room in the server's shared lock table, sized for about 64 per session)."""


def _holding(needs: Holds) -> Holds:
    """What a transaction that needs `needs` holds (the whole volume past HOLD_MOST keys, its thread's
    commit lock still those paths)."""
    if needs.count() > HOLD_MOST:
        return Holds(needs.paths, whole=True)
    return needs


class Relock(Exception):
    """Raised inside a write transaction that needs what it does not hold (`Holds`): rolled back,
    it is run again holding `holds` from its opening."""

    def __init__(self, holds: Holds) -> None:
        super().__init__(holds)
        self.holds = holds


def path_key(volume: uuid.UUID, path: str) -> int:
    """The key of `path`'s advisory lock in `volume` (a signed 64-bit hash: two paths sharing one
    merely share a lock)."""
    return int.from_bytes(
        xxhash.xxh3_64_digest(volume.bytes + path.encode("utf-8", "surrogateescape")), "big", signed=True
    )


def agent_key(volume: uuid.UUID, agent: str) -> int:
    """The key of `agent`'s advisory lock in `volume`: `path_key` of the name after a NUL byte, which
    no path holds, so no agent's key is hashed from a path's bytes (a collision of the 64-bit hashes
    merely shares a lock, as two paths may, in the same one global order of keys)."""
    return path_key(volume, "\0" + agent)


def tree_key(volume: uuid.UUID, path: str) -> int:
    """The key of the lock of the tree at `path` in `volume` (`Holds.trees`): `path_key` of the path
    after a NUL and an ETX byte (hashed from bytes no path, agent, content or setting key is)."""
    return path_key(volume, "\0\3" + path)


def content_key(volume: uuid.UUID, digest: str) -> int:
    """The key of the lock of the content stored under `digest` in `volume`: `path_key` of the hash
    after a NUL and a SOH byte (no path holds a NUL, no agent's name a SOH: no key of a path or an
    agent is hashed from these bytes)."""
    return path_key(volume, "\0\1" + digest)


def setting_key(volume: uuid.UUID, key: str) -> int:
    """The key of the lock of the setting `key` (`put_meta`) in `volume`: `path_key` of its name after
    a NUL and an STX byte (hashed from bytes no path, agent or content key is)."""
    return path_key(volume, "\0\2" + key)


def _read_parts(fd: int) -> Iterator[bytes]:
    """Everything readable from `fd` by offset, to its end as it is while read, in parts of at most
    PART bytes (each read asks for what fstat says is left, so a small file costs no large buffer)."""
    offset, size = 0, os.fstat(fd).st_size
    while chunk := os.pread(fd, min(PART, max(size - offset, 64 << 10)), offset):
        yield chunk
        offset += len(chunk)


def _slices(data: bytes) -> Iterator[bytes | memoryview]:
    """`data` in parts of at most PART bytes (no copies)."""
    view = memoryview(data)
    for start in range(0, max(len(data), 1), PART):
        yield view[start : start + PART]


def _changed(digest: str) -> OSError:
    return OSError(errno.EAGAIN, f"content changed while it was stored (expected {digest}); try again")


def _record(row: tuple[Any, ...]) -> FileRecord:
    """A file's record; never a fingerprint (the working copy's own are in its Replica)."""
    path, version, present, hsh, writer, at = row
    return FileRecord(path, version, bool(present), hsh, None, writer, at, 0)


def _grant(row: tuple[Any, ...]) -> Grant:
    path, agent, token, host, pid, start, expires_at, fences = row
    return Grant(path, agent, token, ProcessId(host, pid, start), expires_at, bool(fences))


def _version(row: tuple[Any, ...]) -> Version:
    parents = tuple(int(p) for p in row[7].split(",")) if row[7] else ()
    return Version(row[0], row[1], row[2], row[3], row[4], row[5], row[6], parents, not row[8], row[9])


@dataclass(frozen=True)
class Queued:
    """A statement waiting in a transaction's queue; `then` is given its cursor once it ran (and
    every statement before it ran without error)."""

    sql: str
    args: tuple[Any, ...] = ()
    then: Callable[[psycopg.Cursor[Any]], None] | None = None


def _size(args: tuple[Any, ...]) -> int:
    return sum(len(a) for a in args if isinstance(a, bytes | memoryview))


class PostgresTransaction:
    """A Transaction over one connection with a transaction open, or opened by the statements queued
    with `open` (see registry.Transaction and the module's invariants). The fingerprints `put_file`
    and `touch_file` are given describe this working copy's disk: they go to `installs`, which its
    registry records in the working copy's Replica once the transaction has committed, never to the
    shared database."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        volume: uuid.UUID,
        installs: list[tuple[str, Installed]] | None = None,
        holds: Holds | None = None,
        locks: Callable[[list[int], Queued | None, set[int]], list[Queued]] | None = None,
        copy: CopyHold | None = None,
    ) -> None:
        self._c = conn
        self._v = volume
        self.installs: list[tuple[str, Installed]] = [] if installs is None else installs
        self._queue: list[Queued] = []
        self._queued_bytes = 0
        self._now: float | None = None
        self.opened = True
        """Whether the statements that open it ran (a transaction opened already, or its first round
        trip came back)."""
        self._ahead: tuple[str, str] | None = None
        """The `write_state` asked for ahead (`read_ahead`), while what it reads is unchanged."""
        self._ahead_row: tuple[Any, ...] | None = None
        self._way: str | None = None
        """The `file_in_the_way` read ahead with `write_state`, while what it reads is unchanged."""
        self._way_answer: tuple[tuple[Any, ...] | None] | None = None
        self._holds = None if holds is None or holds.whole else holds
        """What it locks (None: a read transaction, or one holding the volume exclusive)."""
        self._trying = self._holds is not None and self._holds.whole_if_free
        """Whether its try for the volume's lock exclusive (`Holds.whole_if_free`) is yet to be answered."""
        self._keys = self._holds.keys(volume) if self._holds is not None else set()
        self._shared = self._holds.shared(volume) if self._holds is not None else set()
        """Those of `_keys` it holds shared."""
        self._locks = locks
        """The statements that take a lock (a content's), then lock paths by their keys, in the order
        given (`hold`)."""
        self.locking = False
        """Whether locks it takes (of paths, agents, settings: `hold`; of contents: `_hold_content`) are
        queued or being waited for."""
        self._contents: dict[str, bool] = {}
        """The contents whose lock it holds (or has queued), each: whether exclusive (`_hold_content`)."""
        self._copy = copy
        """Its thread's hold of the working copy's commit lock (None: it holds none)."""

    def open(self, statements: Sequence[Queued]) -> None:
        """Queue the statements that open it (BEGIN, its locks: they go with its first read)."""
        self._queue[:0] = statements
        self.opened = False

    def tried(self, cursor: psycopg.Cursor[Any]) -> None:
        """The answer of `pg_try_advisory_xact_lock` for the volume (`Holds.whole_if_free`): the whole
        volume held if it was free, else the paths alone."""
        row = cursor.fetchone()
        if row is not None and row[0]:
            self._holds = None
        self._trying = False

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return self._c

    @property
    def held(self) -> frozenset[str] | None:
        """The paths this transaction holds, in the database and in its thread's commit lock; None:
        every path (the volume's lock exclusive, and the whole working copy, or no hold of it: a read
        transaction, or a write one outside the commit lock, which settles no intent)."""
        if self._holds is not None:
            return self._holds.paths
        return None if self._copy is None else self._copy.paths

    @property
    def holds(self) -> Holds:
        """What this transaction locks (or has queued to lock)."""
        return Holds(whole=True) if self._holds is None else self._holds

    def hold(self, paths: Iterable[str]) -> list[str]:
        """Hold `paths` too: locked now (with the next read) when every new key sorts after the
        keys held, else `Relock` with the whole set. The paths newly held (their intents unsettled)."""
        paths = set(paths)
        copy = None if self._copy is None else self._copy.paths
        if copy is not None and not copy.issuperset(paths):  # its owner extends the copy's hold first
            raise Relock(
                Holds(copy | paths, whole=True)
                if self._holds is None
                else _holding(replace(self._holds, paths=self._holds.paths | paths))
            )
        if self._holds is None:
            return []
        new = sorted({p for p in paths if p not in self._holds.paths})
        if new:
            self._take(replace(self._holds, paths=self._holds.paths | set(new)))
        return new

    def hold_agents(self, agents: Iterable[str]) -> None:
        """Hold `agents` too: locked now (with the next read) when every new key sorts after the
        keys held, else `Relock` with the whole set."""
        if self._holds is not None and not self._holds.agents.issuperset(agents):
            self._take(replace(self._holds, agents=self._holds.agents | set(agents)))

    def _take(self, more: Holds) -> None:
        """Hold `more` (what it holds, and more): the new keys queued to be locked with the next read
        if each sorts after every key held, else `Relock` (also past HOLD_MOST: the whole volume)."""
        more = _holding(more)
        if more.whole:
            raise Relock(more)
        keys = sorted(more.keys(self._v) - self._keys)
        shared = more.shared(self._v)
        if (keys and self._keys and keys[0] < max(self._keys)) or (self._shared - shared) & self._keys:
            raise Relock(more)  # out of order, or a lock held shared now needed exclusive
        if keys:
            assert self._locks is not None
            self._queue.extend(self._locks(keys, None, shared))
            self._keys.update(keys)
            self.locking = True
        self._holds, self._shared = more, shared

    def hold_all(self) -> None:
        """Hold the whole volume (its lock exclusive): `Relock` unless it does."""
        if self._holds is not None:
            raise Relock(Holds(whole=True))

    def hold_all_if_free(self) -> None:
        """Hold the whole volume if its lock was free when this transaction opened (`held` says,
        once its first read came back) and its thread holds the whole working copy (else nothing is
        asked); `Relock` unless it asked so."""
        if self._copy is None or self._copy.paths is not None:
            return
        if self._holds is not None and not self._holds.whole_if_free:
            raise Relock(replace(self._holds, whole_if_free=True))

    def _need(self, *paths: str) -> None:
        """`Relock` unless this transaction holds `paths`."""
        if self._holds is not None and not self._holds.paths.issuperset(paths):
            raise Relock(_holding(replace(self._holds, paths=self._holds.paths | set(paths))))

    def _need_setting(self, key: str) -> None:
        """`Relock` unless this transaction holds the setting `key`."""
        if self._holds is not None and key not in self._holds.settings:
            raise Relock(_holding(replace(self._holds, settings=self._holds.settings | {key})))

    def content_keys(self) -> list[int]:
        """The keys of the contents' locks it holds or waits for (`_hold_content`)."""
        return [content_key(self._v, digest) for digest in self._contents]

    def _hold_content(self, digest: str, exclusive: bool) -> None:
        """Hold the lock of the content stored under `digest` till this transaction ends (queued:
        taken with the next statement, waited for at most as long as a path's): shared to store it,
        exclusive to store it in parts, to ask whether it is in use and to drop it. Nothing while it
        holds the whole volume (no other write transaction runs)."""
        held = self._contents.get(digest)
        if self._holds is None or held or (held is not None and not exclusive):
            return
        assert self._locks is not None
        mode = "" if exclusive else "_shared"
        lock = Queued(f"SELECT pg_advisory_xact_lock{mode}(%s)", (content_key(self._v, digest),))
        self._queue.extend(self._locks([], lock, set()))
        self._contents[digest] = exclusive
        self.locking = True

    def _need_agent(self, agent: str) -> None:
        """`Relock` unless this transaction holds `agent`."""
        if self._holds is not None and agent not in self._holds.agents:
            raise Relock(_holding(replace(self._holds, agents=self._holds.agents | {agent})))

    def run(
        self, sql: str, args: tuple[Any, ...] = (), prepare: bool | None = None, ends: bool = False
    ) -> psycopg.Cursor[Any]:
        """Run `sql` after everything queued, in one round trip; its cursor, with its rows. `ends`:
        `sql` ends the transaction (see `_together`)."""
        queue, self._queue, self._queued_bytes = self._queue, [], 0
        if queue and select.select([self._c.fileno()], [], [], 0)[0]:
            # the server spoke unasked: it is ending the session (idle_in_transaction_session_timeout,
            # a shutdown). A plain statement raises its error with its SQLSTATE; a pipeline loses it
            first = queue.pop(0)
            done = self._c.execute(first.sql, first.args)
            if first.then is not None:
                first.then(done)
        if not queue:
            cursor = self._c.execute(sql, args, prepare=prepare)
        elif ends:
            with _pipeline(self._c):
                ran = [(q.then, self._c.execute(q.sql, q.args)) for q in queue]
                cursor = self._c.execute(sql, args, prepare=prepare)
            for then, done in ran:
                if then is not None:
                    then(done)
        else:
            cursor = self._sent([*queue, Queued(sql, args)])
        self.opened = True
        self.locking = False
        return cursor

    def _sent(self, statements: list[Queued]) -> psycopg.Cursor[Any]:
        """`statements`, in order, for a round trip after which the transaction stays open; the
        cursor of the last. A statement with ALONE bytes of parameters or more (content) goes alone,
        bound by the server: its bytes go as they are (binary), where a literal bound here would
        double them on the wire and cost their encoding. The others go in one message between two
        such (`_together`). A plain statement is one message too, as far as the server's timeout is
        concerned: Parse, Bind, Execute and Sync, answered with ReadyForQuery, nothing after."""
        cursor: psycopg.Cursor[Any] | None = None
        batch: list[Queued] = []
        for n, q in enumerate(statements):
            if _size(q.args) < ALONE:
                batch.append(q)
                continue
            if batch:
                done = self._together(batch)
                if batch[-1].then is not None:
                    batch[-1].then(done)
                batch = []
            cursor = self._c.execute(q.sql, q.args, prepare=False)
            if n < len(statements) - 1 and q.then is not None:
                q.then(cursor)
        if batch:
            cursor = self._together(batch)
        assert cursor is not None
        return cursor

    def _together(self, statements: list[Queued]) -> psycopg.Cursor[Any]:
        """`statements` in one message, bound here (one simple query); the cursor, at the last one's
        rows. A round trip after which the transaction stays open goes this way, never as a
        pipeline: psycopg ends a pipeline with a Flush after its Sync, which PostgreSQL (15) reads
        as activity after its ReadyForQuery and so stops the idle_in_transaction_session_timeout it
        had just started; until the next round trip, a paused or cut-off client would then hold the
        transaction, and the volume's lock, for ever. One message ends with the server's
        ReadyForQuery: the timeout runs between round trips. (The round trip with COMMIT leaves no
        transaction open: it stays a pipeline, its content sent in binary.)"""
        bind = _psycopg().ClientCursor(self._c)
        text = "; ".join(bind.mogrify(q.sql, q.args) for q in statements)
        cursor = self._c.cursor()
        cursor.execute(text, prepare=False)
        for q in statements[:-1]:
            if q.then is not None:
                q.then(cursor)
            cursor.nextset()
        return cursor

    def commit(self) -> None:
        """COMMIT, after everything queued (its text on the wire, never a prepared name: a proxy in
        the tests finds it)."""
        self.run("COMMIT", prepare=False, ends=True)

    def _flush(self) -> None:
        """Send what is queued now, in one round trip."""
        if self._queue:
            last = self._queue.pop()
            done = self.run(last.sql, last.args)
            if last.then is not None:
                last.then(done)

    def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        return self.run(sql, (self._v, *args)).fetchone()

    def _all(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self.run(sql, (self._v, *args)).fetchall()

    def _do(self, sql: str, *args: Any) -> None:
        self.queue(sql, (self._v, *args))

    def queue(self, sql: str, args: tuple[Any, ...] = ()) -> None:
        """Queue a write (sent with the next read or COMMIT; at once past PART bytes queued)."""
        if self._ahead is not None and any(table in sql for table in _WRITE_STATE_TABLES):
            self._ahead = None  # what was read ahead may no longer be what `write_state` would read
        if "cv_files" in sql or "cv_intents" in sql:
            self._way = None  # nor what `file_in_the_way` would
        self._queue.append(Queued(sql, args))
        self._queued_bytes += _size(args)
        if self._queued_bytes > PART:
            self._flush()

    def file(self, path: str) -> FileRecord | None:
        self._need(path)
        row = self._one(f"SELECT {_FILE_COLS} FROM cv_files WHERE volume = %s AND path = %s", path)
        return None if row is None else _record(row)

    def file_and_view(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        self._need(path)
        sql, args = _file_and_view_query(self._v, path, agent, pending=False)
        return _file_and_view_row(self.run(sql, args).fetchone())

    def read_ahead(self, path: str, agent: str) -> None:
        """Queue `write_state(path, agent)`: it goes with this transaction's next read (its first:
        the one that opens it), and `write_state` answers from it while no write queued since names
        a table it reads."""
        self._need(path)

        def keep(cursor: psycopg.Cursor[Any]) -> None:
            self._ahead_row = cursor.fetchone()

        self._ahead, self._ahead_row = (path, agent), None
        self._queue.append(Queued(*_write_state_query(self._v, path, agent), keep))
        self._hold_tree(path)

        def keep_way(cursor: psycopg.Cursor[Any]) -> None:
            self._way_answer = (cursor.fetchone(),)

        self._way, self._way_answer = path, None  # a creation's decision asks it (`file_in_the_way`)
        self._queue.append(Queued(*self._in_the_way_query(path), keep_way))

    def write_state(self, path: str, agent: str) -> tuple[FileRecord | None, int | None, Grant | None, bool]:
        """`file`, `view`, `grant` and `fenced` of `path` for `agent`, in one statement (the server's
        clock read with it, as `grant` reads it); read ahead, if it was (`read_ahead`)."""
        self._need(path)
        if self._ahead != (path, agent) or self._ahead_row is None:
            self._ahead_row = self.run(*_write_state_query(self._v, path, agent)).fetchone()
        state = self._ahead_state()
        self._ahead, self._ahead_row = None, None
        return state

    def _ahead_state(self) -> tuple[FileRecord | None, int | None, Grant | None, bool]:
        """`write_state`'s answer from its row (`_ahead_row`)."""
        row = self._ahead_row
        assert row is not None
        files, grants = len(_FILE_COLS.split(",")), len(_GRANT_COLS.split(","))
        record = None if row[0] is None else _record(row[:files])
        view = row[files]
        held = row[files + 1 : files + 1 + grants]
        if self._now is None:  # the clock, read in the same statement: `now` needs no round trip
            self._now = float(row[-1])
        fenced = bool(row[-2])
        return record, None if view is None else int(view), None if held[0] is None else _grant(held), fenced

    def put_file(self, r: FileRecord) -> None:
        """The record in the database; its fingerprint, if any (this copy's disk holds it), to `installs`."""
        self._need(r.path)
        self._do(
            f"INSERT INTO cv_files (volume, {_FILE_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, path) DO UPDATE SET version = EXCLUDED.version, present = EXCLUDED.present, "
            "hash = EXCLUDED.hash, writer = EXCLUDED.writer, committed_at = EXCLUDED.committed_at",
            r.path,
            r.version,
            r.present,
            r.hash,
            r.writer,
            r.committed_at,
        )
        if r.present and r.fingerprint is not None:
            self.installs.append((r.path, Installed(r.version, r.hash, r.fingerprint, r.checked_ns)))

    def touch_file(self, path: str, r: FileRecord) -> None:
        """This copy's disk holds `r` (no file for a deletion), as its fingerprint says: to `installs`."""
        held = (
            Installed(r.version, r.hash, r.fingerprint, r.checked_ns)
            if r.present
            else Installed(r.version, None, None, r.checked_ns)
        )
        self.installs.append((path, held))

    def put_version(self, v: Version) -> None:
        self._need(v.path)
        self._do(
            f"INSERT INTO cv_versions (volume, {_VERSION_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, path, version) DO UPDATE SET kind = EXCLUDED.kind, writer = EXCLUDED.writer, "
            "at = EXCLUDED.at, size = EXCLUDED.size, hash = EXCLUDED.hash, parents = EXCLUDED.parents, "
            "pruned = EXCLUDED.pruned, never_kept = EXCLUDED.never_kept",
            *v[:7],
            ",".join(str(p) for p in v.parents) or None,
            not v.retained,
            v.never_kept,
        )

    def history(self, path: str, limit: int | None = None) -> list[Version]:
        self._need(path)
        rows = self._all(
            f"SELECT {_VERSION_COLS} FROM cv_versions WHERE volume = %s AND path = %s ORDER BY version DESC LIMIT %s",
            path,
            limit,
        )
        return [_version(row) for row in rows]

    def version_entry(self, path: str, version: int) -> Version | None:
        self._need(path)
        row = self._one(
            f"SELECT {_VERSION_COLS} FROM cv_versions WHERE volume = %s AND path = %s AND version = %s", path, version
        )
        return None if row is None else _version(row)

    def file_in_the_way(self, path: str, besides: Collection[str] = ()) -> InTheWay | None:
        """Read ahead with the decision's `write_state` (`read_ahead`), while nothing it reads changed."""
        self._hold_tree(path)
        answer = self._way_answer if self._way == path and not besides else None
        row = answer[0] if answer is not None else self.run(*self._in_the_way_query(path, besides)).fetchone()
        self._way, self._way_answer = None, None
        return None if row is None else InTheWay(*row)

    def _hold_tree(self, path: str) -> None:
        """Hold the tree of `path` (`Holds.trees`) too: locked with the next read, or `Relock` (which
        costs no round trip before the first read: nothing was sent)."""
        if self._holds is not None and path not in self._holds.trees:
            self._take(replace(self._holds, trees=self._holds.trees | {path}))

    def _in_the_way_query(self, path: str, besides: Collection[str] = ()) -> tuple[str, tuple[Any, ...]]:
        places = "volume = %s AND present AND (path = ANY(%s) OR (path > %s AND path < %s)) AND NOT (path = ANY(%s))"
        return (
            f"SELECT path, version, writer, false FROM cv_files WHERE {places} "
            f"UNION ALL SELECT path, version, agent, true FROM cv_intents WHERE {places} LIMIT 1",
            (self._v, dirs_above(path), path + "/", path + "0", sorted(besides)) * 2,
        )

    def deleted_in(self, directory: str) -> list[FileRecord]:
        self.hold_all()
        prefix = f"{directory}/" if directory else ""
        rows = self._all(
            f"SELECT {_FILE_COLS} FROM cv_files WHERE volume = %s AND NOT present AND starts_with(path, %s) "
            "AND strpos(substr(path, %s), '/') = 0 ORDER BY path",
            prefix,
            len(prefix) + 1,
        )
        return [_record(row) for row in rows]

    def history_paths(self) -> list[str]:
        self.hold_all()
        return [r[0] for r in self._all("SELECT DISTINCT path FROM cv_versions WHERE volume = %s AND NOT pruned")]

    def retained(self, path: str) -> list[Version]:
        self._need(path)
        rows = self._all(
            f"SELECT {_VERSION_COLS} FROM cv_versions WHERE volume = %s AND path = %s AND NOT pruned "
            "AND hash IS NOT NULL ORDER BY version",
            path,
        )
        return [_version(row) for row in rows]

    def viewers(self, path: str) -> dict[str, int]:
        self._need(path)
        return dict(self._all("SELECT agent, version FROM cv_views WHERE volume = %s AND path = %s", path))

    def last_view(self, agent: str) -> float | None:
        row = self._one("SELECT max(read_at) FROM cv_views WHERE volume = %s AND agent = %s", agent)
        return None if row is None or row[0] is None else float(row[0])

    def prune(self, path: str, version: int) -> None:
        self._need(path)
        self._do("UPDATE cv_versions SET pruned = true WHERE volume = %s AND path = %s AND version = %s", path, version)

    def in_use(self, digest: str) -> bool:
        """Asked holding the content's lock exclusive (to this transaction's end): a commit storing
        it meanwhile has committed, its version seen, or waits for this transaction to end."""
        self._hold_content(digest, exclusive=True)
        row = self._one(
            "SELECT EXISTS (SELECT 1 FROM cv_versions WHERE volume = %s AND hash = %s AND NOT pruned) "
            "OR EXISTS (SELECT 1 FROM cv_intents WHERE volume = %s AND hash = %s)",
            digest,
            self._v,
            digest,
        )
        return bool(row and row[0])

    def retained_bytes(self) -> int:
        return self.stored()[1]

    def store(self, digest: str | None, source: bytes | int) -> str:
        """Content of one part (nearly every file) is queued as one insert that keeps what is stored
        under its hash already unless it differs (damaged: replaced): no round trip of its own.
        Larger content is looked up first, holding its lock exclusive (`_kept`): kept if intact, else
        stored anew. Content read from a descriptor with no hash given is stored under a key of its
        own while it is read (`provisional`, which no other transaction names), then under its hash."""
        if isinstance(source, bytes):
            got = xxhash.xxh3_128_hexdigest(source)
            if digest is not None and got != digest:
                raise _changed(digest)
            if len(source) <= PART:
                self._put_content(got, source)
            elif not self._kept(got):
                self._insert(got, _slices(source), None)
            return got
        if digest is not None and os.fstat(source).st_size > PART and self._kept(digest):
            return digest
        parts = _read_parts(source)
        first = next(parts, b"")
        second = next(parts, None)
        if second is None:  # one part, read whole
            got = xxhash.xxh3_128_hexdigest(first)
            if digest is not None and got != digest:
                raise _changed(digest)
            self._put_content(got, first)
            return got
        rest = itertools.chain((first, second), parts)
        if digest is None:  # read once, stored while hashed (statements keep flowing), then named by its hash
            provisional = f"provisional {uuid.uuid4()}"
            got = self._insert(provisional, rest, None)
            if self._kept(got):
                self._delete(provisional)
            else:
                for table in ("cv_content_parts", "cv_contents"):
                    self.queue(
                        f"UPDATE {table} SET hash = %s WHERE volume = %s AND hash = %s", (got, self._v, provisional)
                    )
            return got
        self._hold_content(digest, exclusive=True)  # grown past one part since its size was read
        if self._insert(digest, rest, digest) != digest:
            raise _changed(digest)
        return digest

    def _kept(self, digest: str) -> bool:
        """Whether content of more than one part is stored intact under `digest`, asked holding its
        lock exclusive (to this transaction's end: such content is stored by one transaction at a
        time, and another storing it waits, then finds it stored); if not, what is stored under it
        (damaged) is deleted, for the caller to store it anew in this transaction."""
        self._hold_content(digest, exclusive=True)
        if self._intact(digest):
            return True
        self._delete(digest)
        return False

    def _put_content(self, digest: str, data: bytes) -> None:
        """Queue the content `data` (one part) under `digest`, unless it is stored already as these
        bytes (other bytes under their hash are damage: replaced); its lock held shared."""
        self._hold_content(digest, exclusive=False)
        self._do(
            "INSERT INTO cv_contents (volume, hash, size, data) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (volume, hash) DO UPDATE SET size = EXCLUDED.size, data = EXCLUDED.data "
            "WHERE cv_contents.size <> EXCLUDED.size OR cv_contents.data <> EXCLUDED.data",
            digest,
            len(data),
            data,
        )

    def _intact(self, digest: str) -> bool:
        """Whether content is stored under `digest`, whole and hashing to it (read through)."""
        try:
            for _ in self._parts(digest, digest):
                pass
        except (VersionGone, DamagedContent):
            return False
        return True

    def _insert(self, key: str, parts: Iterable[bytes | memoryview], expected: str | None) -> str:
        """Store `parts` under `key`, hashing them as they go: the first in its cv_contents row,
        inserted last and only if they hash to `expected` (when given), the others in
        cv_content_parts; otherwise nothing stays stored. The hash of all of them."""
        hasher, size, first, later = xxhash.xxh3_128(), 0, b"", False
        try:
            for n, part in enumerate(parts):
                hasher.update(part)
                size += len(part)
                if n == 0:
                    first = bytes(part)
                else:
                    later = True
                    self._do(
                        "INSERT INTO cv_content_parts (volume, hash, part, data) VALUES (%s, %s, %s, %s)",
                        key,
                        n,
                        bytes(part),
                    )
        except BaseException as e:
            if later and not isinstance(e, _psycopg().Error):  # after a PostgreSQL error nothing commits anyway
                self._do("DELETE FROM cv_content_parts WHERE volume = %s AND hash = %s", key)
            raise
        got = hasher.hexdigest()
        if expected is None or got == expected:
            self._do("INSERT INTO cv_contents (volume, hash, size, data) VALUES (%s, %s, %s, %s)", key, size, first)
        elif later:
            self._do("DELETE FROM cv_content_parts WHERE volume = %s AND hash = %s", key)
        return got

    def _parts(self, digest: str, what: str) -> Iterator[bytes]:
        """The stored parts of `digest` in order, one in memory at a time, unchecked; then
        DamagedContent if they are not all there or do not hash to it. VersionGone (before any
        part) if it is not stored."""
        row = self._one("SELECT size, data FROM cv_contents WHERE volume = %s AND hash = %s", digest)
        if row is None:
            raise VersionGone(f"{what}: its content is no longer retained (pruned)")
        size, first = int(row[0]), bytes(row[1])
        hasher, seen, n = xxhash.xxh3_128(first), len(first), 0
        yield first
        while seen < size:
            n += 1
            part = self._one(
                "SELECT data FROM cv_content_parts WHERE volume = %s AND hash = %s AND part = %s", digest, n
            )
            if part is None:
                break
            data = bytes(part[0])
            hasher.update(data)
            seen += len(data)
            yield data
        where = f"the row of volume {self._v}, hash {digest} in table cv_contents"
        if seen != size:
            raise DamagedContent(
                f"{what}: the stored content is damaged ({seen:,} of its {size:,} bytes are stored, {where}); "
                "it is not served"
            )
        if hasher.hexdigest() != digest:
            raise DamagedContent(
                f"{what}: the stored content is damaged (it no longer hashes to {digest}; {where}); it is not served"
            )

    def load(self, digest: str, what: str) -> bytes:
        return b"".join(self._parts(digest, what))

    def load_into(self, digest: str, what: str, write: Callable[[bytes], object]) -> int:
        done = 0
        for part in self._parts(digest, what):
            write(part)
            done += len(part)
        return done

    def drop(self, digest: str) -> int:
        """Holding the content's lock exclusive (taken by `in_use` already, as the caller asked it)."""
        self._hold_content(digest, exclusive=True)
        return self._delete(digest)

    def _delete(self, key: str) -> int:
        """Delete what is stored under `key` (its lock held, or a key no other transaction names);
        the bytes freed."""
        self._do("DELETE FROM cv_content_parts WHERE volume = %s AND hash = %s", key)
        row = self._one("DELETE FROM cv_contents WHERE volume = %s AND hash = %s RETURNING size", key)
        return 0 if row is None else int(row[0])

    def stored(self) -> tuple[int, int]:
        """Read committed (no lock): what commits meanwhile store may be counted or not."""
        row = self._one("SELECT count(*), coalesce(sum(size), 0) FROM cv_contents WHERE volume = %s")
        assert row is not None
        return int(row[0]), int(row[1])

    def content_size(self, digest: str) -> int | None:
        row = self._one("SELECT size FROM cv_contents WHERE volume = %s AND hash = %s", digest)
        return None if row is None else int(row[0])

    def meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM cv_meta WHERE volume = %s AND key = %s", key)
        return None if row is None else str(row[0])

    def put_meta(self, key: str, value: str) -> None:
        """Holding the setting's lock (from the transaction's opening: what it read of the setting
        before is what it replaces). Writers read settings with no lock: a setting they decide by
        is changed holding the whole volume (`hold_all`, by the caller)."""
        self._need_setting(key)
        self._do(
            "INSERT INTO cv_meta (volume, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (volume, key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )

    def view(self, agent: str, path: str) -> int | None:
        self._need(path)
        row = self._one("SELECT version FROM cv_views WHERE volume = %s AND agent = %s AND path = %s", agent, path)
        return None if row is None else int(row[0])

    def put_view(self, agent: str, path: str, version: int, at: float) -> None:
        self._need(path)
        self._do(
            "INSERT INTO cv_views (volume, agent, path, version, read_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (volume, agent, path) DO UPDATE SET version = EXCLUDED.version, read_at = EXCLUDED.read_at",
            agent,
            path,
            version,
            at,
        )

    def drop_view(self, agent: str, path: str) -> None:
        self._need(path)
        self._do("DELETE FROM cv_views WHERE volume = %s AND agent = %s AND path = %s", agent, path)

    def drop_views(self, agent: str) -> int:
        self._need_agent(agent)
        row = self._one(
            "WITH gone AS (DELETE FROM cv_views WHERE volume = %s AND agent = %s RETURNING 1) "
            "SELECT count(*) FROM gone",
            agent,
        )
        return int(row[0]) if row else 0

    def read_set(self, agent: str) -> dict[str, int]:
        return {
            p: v for p, v in self._all("SELECT path, version FROM cv_views WHERE volume = %s AND agent = %s", agent)
        }

    def versions(self, paths: list[str]) -> dict[str, int]:
        self._need(*paths)
        rows = self._all("SELECT path, version FROM cv_files WHERE volume = %s AND path = ANY(%s)", list(paths))
        return {p: v for p, v in rows}

    def stale_views(self, agent: str) -> list[tuple[str, int, int]]:
        rows = self._all(
            "SELECT v.path, v.version, f.version FROM cv_views v JOIN cv_files f ON f.volume = v.volume "
            "AND f.path = v.path WHERE v.volume = %s AND v.agent = %s AND f.version != v.version ORDER BY v.path",
            agent,
        )
        return [(p, int(seen), int(current)) for p, seen, current in rows]

    def now(self) -> float:
        """The database server's clock, read once per transaction (with its `write_state`, or the
        first `grant` that finds one, else by a statement of its own)."""
        if self._now is None:
            row = self.run(f"SELECT {_CLOCK}").fetchone()
            assert row is not None
            self._now = float(row[0])
        return self._now

    def grant(self, path: str) -> Grant | None:
        """The grant on `path`: from the `write_state` read ahead for it (`read_ahead`, for any agent:
        a grant is the path's) while what that read is unchanged, else read now."""
        self._need(path)
        if self._ahead is not None and self._ahead[0] == path:
            if self._ahead_row is None:
                self._flush()  # (the read ahead goes in this round trip, as the grant's own read would)
            if self._ahead is not None and self._ahead_row is not None:
                return self._ahead_state()[2]
        row = self._one(f"SELECT {_GRANT_COLS}, {_CLOCK} FROM cv_grants WHERE volume = %s AND path = %s", path)
        if row is None:
            return None
        if self._now is None:  # a grant's decision needs the clock: read with it, no round trip of its own
            self._now = float(row[-1])
        return _grant(row[:-1])

    def grants(self, paths: Iterable[str] | None = None) -> list[Grant]:
        sql = f"SELECT {_GRANT_COLS} FROM cv_grants WHERE volume = %s"
        if paths is None:
            self.hold_all()
            return [_grant(r) for r in self._all(sql + " ORDER BY path")]
        paths = sorted(paths)
        self._need(*paths)
        return [_grant(r) for r in self._all(sql + " AND path = ANY(%s) ORDER BY path", paths)]

    def put_grant(self, g: Grant) -> None:
        self._need(g.path)
        self._do(
            f"INSERT INTO cv_grants (volume, {_GRANT_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, path) DO UPDATE SET agent = EXCLUDED.agent, token = EXCLUDED.token, "
            "host = EXCLUDED.host, pid = EXCLUDED.pid, start = EXCLUDED.start, expires_at = EXCLUDED.expires_at, "
            "fences = EXCLUDED.fences",
            g.path,
            g.agent,
            g.token,
            g.owner.host,
            g.owner.pid,
            g.owner.start,
            g.expires_at,
            g.fences,
        )

    def drop_grant(self, path: str) -> None:
        self._need(path)
        self._do("DELETE FROM cv_grants WHERE volume = %s AND path = %s", path)

    def bind(self, agent: str, process: ProcessId, pinned: bool, at: float) -> None:
        self._need_agent(agent)
        self._do(
            "INSERT INTO cv_sessions (volume, agent, host, pid, start, pinned, at) VALUES (%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, agent) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, "
            "start = EXCLUDED.start, pinned = EXCLUDED.pinned, at = EXCLUDED.at",
            agent,
            process.host,
            process.pid,
            process.start,
            pinned,
            at,
        )

    def unbind(self, agent: str) -> None:
        self._need_agent(agent)
        self._do("DELETE FROM cv_sessions WHERE volume = %s AND agent = %s", agent)

    def bound_agent(self, process: ProcessId) -> tuple[str, bool] | None:
        row = self._one(
            "SELECT agent, pinned FROM cv_sessions WHERE volume = %s AND host = %s AND pid = %s AND start = %s",
            process.host,
            process.pid,
            process.start,
        )
        return None if row is None else (row[0], bool(row[1]))

    def bound_agents(self, processes: Sequence[ProcessId]) -> dict[ProcessId, tuple[str, bool]]:
        if not processes:
            return {}
        wanted = set(processes)
        rows = self._all(
            "SELECT host, pid, start, agent, pinned FROM cv_sessions WHERE volume = %s AND host = %s AND pid = ANY(%s)",
            processes[0].host,  # one host's processes, as a process's ancestors are
            sorted({p.pid for p in wanted}),
        )
        found = ((ProcessId(host, pid, start), (agent, bool(pinned))) for host, pid, start, agent, pinned in rows)
        return {p: bound for p, bound in found if p in wanted}

    def bound_process(self, agent: str) -> ProcessId | None:
        row = self._one("SELECT host, pid, start FROM cv_sessions WHERE volume = %s AND agent = %s", agent)
        return None if row is None else ProcessId(row[0], row[1], row[2])

    def pinned(self, agent: str) -> bool:
        row = self._one("SELECT pinned FROM cv_sessions WHERE volume = %s AND agent = %s", agent)
        return bool(row and row[0])

    def grants_of(self, agent: str) -> list[Grant]:
        return [
            _grant(r) for r in self._all(f"SELECT {_GRANT_COLS} FROM cv_grants WHERE volume = %s AND agent = %s", agent)
        ]

    def fenced(self, agent: str, path: str) -> bool:
        self._need(path)
        return (
            self._one("SELECT 1 FROM cv_fences WHERE volume = %s AND agent = %s AND path = %s", agent, path) is not None
        )

    def put_fence(self, agent: str, path: str, at: float) -> None:
        self._need(path)
        self._do(
            "INSERT INTO cv_fences (volume, agent, path, at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (volume, agent, path) DO UPDATE SET at = EXCLUDED.at",
            agent,
            path,
            at,
        )

    def drop_fence(self, agent: str, path: str) -> None:
        self._need(path)
        self._do("DELETE FROM cv_fences WHERE volume = %s AND agent = %s AND path = %s", agent, path)

    def intents(self, paths: Iterable[str] | None = None) -> list[Intent]:
        """The intents of `paths`, else of every path it holds: every intent read while whether it
        holds the whole volume is yet to be answered (with it), those of other paths then left out."""
        sql = "SELECT path, agent, version, present, hash, tmp FROM cv_intents WHERE volume = %s"
        if paths is None and not self._trying:
            paths = self.held
        if paths is None:
            rows = self._all(sql + " ORDER BY path")
            if self._holds is not None:  # not free: only what it holds
                rows = [r for r in rows if r[0] in self._holds.paths]
        else:
            paths = sorted(paths)
            if not paths:
                return []
            self._need(*paths)
            rows = self._all(sql + " AND path = ANY(%s) ORDER BY path", paths)
        return [Intent(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def put_intent(self, i: Intent) -> None:
        self._need(i.path)
        self._do(
            "INSERT INTO cv_intents (volume, path, agent, version, present, hash, tmp) VALUES (%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, path) DO UPDATE SET agent = EXCLUDED.agent, version = EXCLUDED.version, "
            "present = EXCLUDED.present, hash = EXCLUDED.hash, tmp = EXCLUDED.tmp",
            i.path,
            i.agent,
            i.version,
            i.present,
            i.hash,
            i.tmp,
        )

    def drop_intent(self, path: str) -> None:
        self._need(path)
        self._do("DELETE FROM cv_intents WHERE volume = %s AND path = %s", path)

    def log(
        self,
        kind: str,
        path: str | None,
        agent: str | None,
        at: float,
        *,
        reason: str | None = None,
        seen_version: int | None = None,
        version: int | None = None,
        detail: str | None = None,
    ) -> None:
        """A line of the log, numbered (`seq`) under the lock of its path: a path's lines are
        numbered in commit order."""
        if path is not None:
            self._need(path)
        self._do(
            "INSERT INTO cv_events (volume, at, kind, path, agent, reason, seen_version, version, detail) "
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            at,
            kind,
            path,
            agent,
            reason,
            seen_version,
            version,
            detail,
        )

    def events(
        self,
        after: int = 0,
        path: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Event]:
        sql = (
            "SELECT seq, at, kind, path, agent, reason, seen_version, version, detail FROM cv_events "
            "WHERE volume = %s AND seq > %s"
        )
        args: list[Any] = [after]
        if path is not None:
            sql += " AND path = %s"
            args.append(path)
        if kind is not None:
            sql += " AND kind = %s"
            args.append(kind)
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        sql += " LIMIT %s"
        args.append(limit)
        return [Event(*row) for row in self._all(sql, *args)]

    def log_mark(self) -> LogMark:
        row = self._one(f"SELECT {_HORIZON}, array(SELECT seq FROM cv_events WHERE volume = %s AND xact >= {_HORIZON})")
        assert row is not None
        return LogMark(int(row[0]), frozenset(row[1]))

    def events_since(self, mark: LogMark) -> tuple[list[Event], LogMark]:
        """Every line of a transaction that was running (or not begun) when `mark` was taken, not
        read since, by `seq`: a line numbered first that commits last is read once it commits, never
        skipped. The new mark's `below` is the oldest transaction running now (this read's
        snapshot): none older can still write a line."""
        now = self.run(f"SELECT {_HORIZON}").fetchone()  # first: the lines read next are at least as new
        assert now is not None
        rows = self._all(
            "SELECT xact, seq, at, kind, path, agent, reason, seen_version, version, detail FROM cv_events "
            "WHERE volume = %s AND xact >= %s ORDER BY seq",
            mark.below,
        )
        horizon = max(mark.below, int(now[0]))
        found = [Event(*row[1:]) for row in rows if row[1] not in mark.seen]
        return found, LogMark(horizon, frozenset(row[1] for row in rows if row[0] >= horizon))

    def files(self) -> Iterator[FileRecord]:
        self.hold_all()
        for row in self._all(f"SELECT {_FILE_COLS} FROM cv_files WHERE volume = %s ORDER BY path"):
            yield _record(row)

    def agents(self) -> list[AgentSummary]:
        rows = self._all(
            "SELECT v.agent, count(*), "
            "sum(CASE WHEN f.version IS NOT NULL AND f.version != v.version THEN 1 ELSE 0 END), "
            "max(v.read_at) FROM cv_views v LEFT JOIN cv_files f ON f.volume = v.volume AND f.path = v.path "
            "WHERE v.volume = %s GROUP BY v.agent ORDER BY v.agent"
        )
        return [AgentSummary(a, int(n), int(s or 0), last) for a, n, s, last in rows]


def _write_state_query(volume: uuid.UUID, path: str, agent: str) -> tuple[str, tuple[Any, ...]]:
    """One statement: what `PostgresTransaction.write_state` returns, and the server's clock."""
    sql = (
        f"SELECT {', '.join('f.' + c.strip() for c in _FILE_COLS.split(','))}, "
        "(SELECT version FROM cv_views v WHERE v.volume = k.volume AND v.agent = %s AND v.path = k.path), "
        f"{', '.join('g.' + c.strip() for c in _GRANT_COLS.split(','))}, "
        "EXISTS (SELECT 1 FROM cv_fences x WHERE x.volume = k.volume AND x.agent = %s AND x.path = k.path), "
        f"{_CLOCK} "
        'FROM (SELECT %s::uuid AS volume, %s::text COLLATE "C" AS path) k '
        "LEFT JOIN cv_files f ON f.volume = k.volume AND f.path = k.path "
        "LEFT JOIN cv_grants g ON g.volume = k.volume AND g.path = k.path"
    )
    return sql, (agent, agent, volume, path)


def _file_and_view_query(volume: uuid.UUID, path: str, agent: str, pending: bool) -> tuple[str, tuple[Any, ...]]:
    """One statement: a file's record and an agent's view of it (`_file_and_view_row` reads its
    row). With `pending` (`peek`), a path whose change is decided but not yet recorded (an intent
    past its record's version: a deletion, creation or rename whose writer is changing the disk,
    or died first) has a record without hash, so no content is paired with it: a tracked read takes
    the locked path, which waits for that change or recovers it, and so never returns the version
    before. (A commit of content is recorded with its intent: its record is the new version.)"""
    sql = (
        f"SELECT {', '.join('f.' + c.strip() for c in _FILE_COLS.split(','))}, v.version, "
        + (
            "EXISTS (SELECT 1 FROM cv_intents i WHERE i.volume = k.volume AND i.path = k.path "
            "AND i.version > coalesce(f.version, 0)) "
            if pending
            else "false "
        )
        + 'FROM (SELECT %s::uuid AS volume, %s::text COLLATE "C" AS path) k '
        "LEFT JOIN cv_files f ON f.volume = k.volume AND f.path = k.path "
        "LEFT JOIN cv_views v ON v.volume = k.volume AND v.path = k.path AND v.agent = %s"
    )
    return sql, (volume, path, agent)


def _file_and_view_row(row: tuple[Any, ...] | None) -> tuple[FileRecord | None, int | None]:
    assert row is not None
    record = None if row[0] is None else _record(row[:-2])
    if record is not None and row[-1]:
        record = record._replace(hash=None)
    return record, row[-2]
