"""The PostgreSQL registry of one volume: the commit lock, write transactions with commit ids,
and which connection each call uses.

Invariants:
- the commit lock (`commit_lock`) is this working copy's own, a lock per path (`copy_locks`: a
  byte of ROOT/.coherent/replica.lock each, open file description locks, one owner per hold), held
  by the live thread from a decision to its install whatever becomes of its database sessions. It
  orders the decisions, recoveries and installs of a path by this host's threads and processes;
  holds of different paths go side by side; it holds nothing in the database. A thread's hold is
  taken before its write transactions and never waited for with one open: a transaction that needs
  a path its hold lacks is rolled back (`Relock`) and the hold extended before it runs again (in
  the lock order, or the hold taken again from its start: `CopyRelock`). So no thread waits for a
  lock of the copy while it holds one of the database (lock order: the copy's, then the
  database's; see docs/multihost.md, "The commit lock");
- the database's part is taken by every write transaction itself, first thing after its BEGIN:
  transaction-scoped advisory locks (`pg_advisory_xact_lock*`, each waited for at most
  COMMIT_LOCK_TIMEOUT s, then RegistryError(EBUSY) naming its holder): the volume's, shared, then
  the lock of each path it touches, of each agent whose own rows it changes (a session binding,
  an agent's views forgotten) and of each setting it writes, in one global order
  (`pg_transaction.Holds`, `path_key`, `agent_key`, `setting_key`), and a content's lock where it
  stores, asks about or drops that content (`content_key`); or the volume's alone, exclusive, for a
  transaction that needs the whole volume (more paths than `pg_transaction.HOLD_MOST`, a listing, a
  setting writers decide by); a process's
  sweep (`CoreBase._sweep`, a transaction of its own that decides nothing else) takes it exclusive
  only if it is free at once (`Holds.whole_if_free`), never queueing for it (every writer
  would queue behind). So write transactions that touch a common path are serial across hosts,
  others commit side by side; READ COMMITTED statements after a path's lock see everything
  committed on it before; the locks end with the
  transaction: at its COMMIT, at its rollback, or when the server ends the session of a holder
  that stayed idle in it longer than idle_in_transaction_session_timeout (paused, cut off). No
  lock is held between two transactions, and no row is updated by every transaction (its commit
  id's serial is its transaction id);
- each write transaction records a commit id, so a COMMIT whose reply was lost (or never came:
  `Unanswered`) is resolved by looking the id up, trusting "not committed" only once the lost
  session has ended: never applied twice, never reported failed if it landed;
- a round trip the server left unanswered (`Unanswered`) is never run again: its caller gets
  RegistryError(EIO) saying so, and the process's idle connections (to the same server) are closed;
- round trips: a write transaction's BEGIN, locks and commit id go with its first read (and the
  decision's `write_state`, when it is read ahead), its writes with the next read or its COMMIT
  (`PostgresTransaction`); a read transaction's BEGIN goes first, alone (a pooled connection found
  lost there is replaced before anything is read);
- what this working copy now holds is reported (pg_hosts) one report of the copy at a time
  (`CopyLocks.reporting`), on a round trip of its own at most REPORT_AFTER s after the release of a
  commit lock that left something to report (one report for every commit in that time), never
  inside a write transaction (a refused report fails nothing);
- within a thread, every call made while it has a transaction open uses that transaction's
  connection (content stored by a transaction's function is part of it);
- a forked child never uses or closes its parent's connections (it opens its own).
"""

from __future__ import annotations

import atexit
import errno
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RegistryError
from ..globs import ManagedGlobs
from ..protocol import FileRecord
from . import CopyRelock, Retry, pg_connections, pg_hosts, retried
from .copy_locks import CopyHold, CopyLocks
from .pg_connections import (
    IDLE_ENDED,
    LOCK_CLASS,
    RETRY_SQLSTATES,
    Unanswered,
    _connect,
    _first_line,
    _gone,
    _idle_ended,
    _pipeline,
    _Pool,
    _psycopg,
    _registry_error,
    _sqlstate,
    _unanswered,
)
from .pg_hosts import Reporter, WorkingCopy, forget, working_copies
from .pg_location import Location
from .pg_transaction import (
    Holds,
    PostgresTransaction,
    Queued,
    Relock,
    _file_and_view_query,
    _file_and_view_row,
    path_key,
)
from .replica import LOCK_FILE, Replica

if TYPE_CHECKING:
    import psycopg

R = TypeVar("R")

COMMIT_LOCK_TIMEOUT = 30.0
"""Seconds the commit lock is waited for before RegistryError(EBUSY): this working copy's lock,
and the database's lock each write transaction takes."""
WHOLE_TRIES_FOR = 10.0
"""Seconds a transaction needing the whole volume tries for its lock without queueing for it
(`_whole_volume`): longer than a paused client's transaction lasts (5 s idle in it)."""
LOST_RERUNS = 3
"""Runs of one write transaction whose connection is lost before COMMIT (a database restart)."""
LOCK_TIMED_OUT = "55P03"
"""lock_timeout ran out (in a round trip of a write transaction that takes locks: its first, or one
holding more paths, `PostgresTransaction.locking`)."""


def _sessions(rows: list[tuple[Any, ...]]) -> str:
    """Database sessions (pid, application_name, client address, state), as a user reads them."""
    return ", ".join(
        f"{app or 'a session with no application_name'} (PostgreSQL backend {pid}"
        + (f", client {addr}" if addr else "")
        + (f", {state}" if state else "")
        + ")"
        for pid, app, addr, state in rows
    )


@dataclass(frozen=True)
class _Session:
    """A database session, as its connection knows it without asking the server."""

    pid: int
    """Its server process (pg_stat_activity.pid)."""
    name: str | None
    """Its application_name."""

    @staticmethod
    def of(conn: psycopg.Connection[Any]) -> _Session:
        return _Session(conn.info.backend_pid, conn.info.parameter_status("application_name"))

    def ended(self, conn: psycopg.Connection[Any]) -> bool:
        """Whether this session has ended, asked on `conn` (another session of the same role); if it
        has not, it is told to (pg_terminate_backend: a server process told to end while it waits for
        its client's next statement ends before it runs any, also when it was stopped and resumes).
        Once it has ended, nothing of its transaction can commit any more."""
        found = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = %s AND application_name = %s",
            (self.pid, self.name),
        ).fetchone()
        return found is None


class _Lost(Exception):
    """A write transaction's connection was lost before its COMMIT (nothing of it committed): it
    is run again (`PostgresRegistry.transact`)."""


_OPEN: weakref.WeakSet[PostgresRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_OPEN):
        registry._forked()


def _at_exit() -> None:
    for registry in list(_OPEN):
        registry._last_report()


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_at_exit)  # a process that never closed its volume reports what its copy holds too


class PostgresRegistry:
    """The registry of one volume in a PostgreSQL database (see registry.Registry). Open it with
    `open_postgres`."""

    def __init__(self, location: Location, volume_id: uuid.UUID, globs: ManagedGlobs, replica: Replica) -> None:
        self.location = location
        self.volume_id = volume_id
        self._globs = globs
        self.replica = replica
        """This working copy's own state (host-local)."""
        self._reporter = Reporter(replica, volume_id)
        self._lock_key = int.from_bytes(volume_id.bytes[:4], "big", signed=True)
        self._forked()
        _OPEN.add(self)

    def _forked(self) -> None:
        """Start afresh (also in a forked child: the parent's connections are never used nor closed
        here; psycopg never ends a session from a process other than the one that opened it; the
        parent's reporting thread did not follow)."""
        self._pool = _Pool(self.location)
        self._pid = os.getpid()
        self._copy = CopyLocks(os.path.join(self.replica.directory, LOCK_FILE), partial(path_key, self.volume_id))
        self._local = threading.local()
        """This thread's open transaction (`tx`) and hold of the commit lock (`hold`)."""
        self._reports = threading.Condition(threading.Lock())
        self._report_due: float | None = None
        """When the reporting thread sends this copy's report (time.monotonic()); None: not asked."""
        self._reporting: threading.Thread | None = None
        self._closed = False
        self._installing = False
        """Whether this process held the commit lock (only then may it have installed something)."""

    @property
    def globs(self) -> ManagedGlobs:
        return self._globs

    # -- which connection a call uses ------------------------------------------------------

    def _tx(self) -> PostgresTransaction | None:
        """This thread's open transaction."""
        return getattr(self._local, "tx", None)

    @contextmanager
    def _use(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one statement or transaction: this thread's open transaction's, else
        one from the pool."""
        if self._pid != os.getpid():
            self._forked()
        tx = self._tx()
        if tx is not None:
            yield tx.conn
            return
        conn = self._pool.take()
        try:
            yield conn
        finally:
            self._pool.give(conn)

    def _statement(self, fn: Callable[[psycopg.Connection[Any]], R]) -> R:
        """Run one autocommit statement (not in this thread's open transaction: see `peek`); a stale
        pooled connection is replaced once (not one the server left unanswered: `Unanswered`)."""
        psycopg = _psycopg()
        for attempt in (1, 2):
            with self._use() as conn:
                in_tx = self._tx() is not None
                try:
                    return fn(conn)
                except psycopg.Error as e:
                    if in_tx:
                        raise  # the transaction's owner decides (re-run, or which RegistryError)
                    if _gone(conn, e):
                        self._pool.flush()  # the others were most likely lost with it (a server restart)
                    if attempt == 2 or not _gone(conn, e) or isinstance(e, Unanswered):
                        raise _registry_error(e, self.location) from e
        raise AssertionError("unreachable")

    # -- locking ------------------------------------------------------------------------

    def _holder(self, conn: psycopg.Connection[Any], holds: Holds, more: Sequence[int] = ()) -> str:
        """Who holds, against `holds` (and the locks of `more` keys: contents'), the volume's lock or a
        path's, an agent's, a setting's or a content's in the database (a write transaction), as
        PostgreSQL tells."""
        keys = [key & (2**64 - 1) for key in [*holds.keys(self.volume_id), *more]]
        try:
            rows = conn.execute(
                "SELECT DISTINCT a.pid, a.application_name, a.client_addr, a.state FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND a.pid != pg_backend_pid() "
                "AND ((l.classid = %s AND l.objid = %s AND l.objsubid = 2 AND (%s OR l.mode = 'ExclusiveLock')) "
                "OR (l.objsubid = 1 "
                "AND l.classid::text::numeric * 4294967296 + l.objid::text::numeric = ANY(%s::numeric[]))) "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (LOCK_CLASS, self._lock_key & 0xFFFFFFFF, holds.whole, keys),
            ).fetchall()
            queued = (
                []
                if rows or holds.whole
                else conn.execute(
                    "SELECT DISTINCT a.pid, a.application_name, a.client_addr, a.state FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND NOT l.granted "
                    "AND a.pid != pg_backend_pid() AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 "
                    "AND l.mode = 'ExclusiveLock' "
                    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    (LOCK_CLASS, self._lock_key & 0xFFFFFFFF),
                ).fetchall()
            )
        except Exception:
            return "PostgreSQL did not say who holds it"
        if queued:
            return (
                f"queued behind {_sessions(queued)}, which waits to hold the whole volume (more paths than "
                "it locks one by one, a policy change) until the transactions holding paths "
                "end: PostgreSQL grants no shared lock while an exclusive request waits"
            )
        if not rows:
            return "PostgreSQL shows no holder any more"
        return "held by " + _sessions(rows)

    def _hold(self) -> CopyHold | None:
        """This thread's hold of the commit lock, if it holds it."""
        if self._pid != os.getpid():
            self._forked()
        return getattr(self._local, "hold", None)

    @contextmanager
    def commit_lock(self, paths: Iterable[str] | None = None, whole_if_free: bool = False) -> Iterator[None]:
        """Exclusive over `paths` (None: every path; with `whole_if_free`, every path if the copy
        is free at once) across the threads and processes of this working copy (every process of
        this host, and containers sharing the root on one kernel); re-entrant within a thread (asking
        for more extends the hold: `CopyLocks.extend`, CopyRelock out of order); freed when its holder
        dies; waited for at most COMMIT_LOCK_TIMEOUT s, then RegistryError(EBUSY) naming who may hold
        it. Held by the live thread whatever becomes of its database sessions, so no other thread or
        process of this host decides, recovers or installs a path it holds while it is between its
        decision and its install. Other hosts never touch this copy's disk; against them each write
        transaction locks its paths itself, until its COMMIT (see the module's invariants)."""
        hold = self._hold()
        if hold is not None:  # re-entered: outside any transaction of the hold (the locking rule)
            self._copy.extend(hold, paths, COMMIT_LOCK_TIMEOUT)
            yield
            return
        pid = os.getpid()
        hold = self._copy.take(paths, whole_if_free, COMMIT_LOCK_TIMEOUT)
        self._local.hold, self._installing = hold, True
        try:
            yield
        except CopyRelock as e:
            e.released = not hold.committed  # nothing of the block committed: it may run again
            raise
        finally:
            if os.getpid() == pid:  # not in a forked child (it starts afresh)
                self._local.hold = None
                self._copy.release(hold)
        if os.getpid() == pid and self._reporter.news(holdings=True):
            self._report_later()

    # -- what this working copy holds, reported (pg_hosts) ---------------------------------------

    def _report_later(self) -> None:
        """Have the reporting thread send this copy's report REPORT_AFTER s from now (or when it was
        asked to already, if sooner): one report for every release in that time. A write
        transaction never carries a report (a report the server refuses would fail it)."""
        with self._reports:
            if self._closed:
                return
            if self._report_due is None:
                self._report_due = time.monotonic() + pg_hosts.REPORT_AFTER
            if self._reporting is None:
                self._reporting = threading.Thread(
                    target=self._reports_run, name="coherent-volume working copy report", daemon=True
                )
                self._reporting.start()
            self._reports.notify()

    def _reports_run(self) -> None:
        """The reporting thread: send the report when it is due; end when none is asked for."""
        while True:
            with self._reports:
                while not self._closed and self._report_due is not None and self._report_due > time.monotonic():
                    self._reports.wait(self._report_due - time.monotonic())
                if self._closed or self._report_due is None:
                    self._reporting = None
                    return
                self._report_due = None
            self._report_now()

    def _report_now(self) -> None:
        """Send what this copy holds and has not reported (with last_seen), one report of the copy at
        a time (`CopyLocks.reporting`: what replica.db records is on the disk already, and a report
        sends the newest of each path). What is unreported is the working copy's, in its Replica: a
        report that fails stays pending; it never fails anything."""
        if not self._reporter.news(holdings=True):
            return
        try:
            conn = self._pool.take()  # before the lock: the lock is held for the report's round trip only
        except RegistryError:
            return
        try:
            with self._copy.reporting(COMMIT_LOCK_TIMEOUT):
                self._send(conn, self._reporter.report(holdings=True))
        except RegistryError:
            pass  # another report held it all that time: what is left stays pending
        finally:
            self._pool.give(conn)

    def _send(self, conn: psycopg.Connection[Any], report: pg_hosts.Report | None) -> None:
        """`report` on `conn`, in one round trip; recorded as sent only if it went through."""
        if report is None:
            return
        psycopg = _psycopg()
        try:
            with _pipeline(conn):
                cursor = self._reporter.queue(conn, report)
            registered = cursor.fetchone() is not None
        except psycopg.errors.ForeignKeyViolation:
            registered = False
        except psycopg.Error:
            return  # refused, or the session is gone: it stays pending
        if registered:
            self._reporter.sent(report)
        else:
            self._reporter.unregistered()

    # -- reads and writes --------------------------------------------------------------------

    def peek(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        sql, args = _file_and_view_query(self.volume_id, path, agent, pending=True)
        tx = self._tx()
        if tx is not None:  # in this thread's open transaction: after its queued writes
            return _file_and_view_row(tx.run(sql, args).fetchone())
        return self._statement(lambda c: _file_and_view_row(c.execute(sql, args).fetchone()))

    @contextmanager
    def read(self) -> Iterator[PostgresTransaction]:
        """A REPEATABLE READ READ ONLY transaction: one snapshot."""
        tx = self._tx()
        if tx is not None:  # nested in this thread's open transaction: its reads follow its queued writes
            yield tx
            return
        psycopg = _psycopg()
        with self._use() as conn:
            try:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            except psycopg.Error as e:
                if not _gone(conn, e):
                    raise _registry_error(e, self.location) from e
                self._pool.flush()
                if isinstance(e, Unanswered):
                    raise _registry_error(e, self.location) from e
                with self.read() as tx:  # a pooled connection found lost: once more on a new one
                    yield tx
                return
            tx = self._local.tx = PostgresTransaction(conn, self.volume_id)
            try:
                yield tx
            except psycopg.Error as e:
                self._rollback(conn)
                if _gone(conn, e):
                    self._pool.flush()
                raise _registry_error(e, self.location) from e
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                self._local.tx = None
            try:
                tx.commit()
            except psycopg.Error as e:
                if not _gone(conn, e):
                    raise _registry_error(e, self.location) from e
                self._pool.flush()  # what it read stands: it wrote nothing

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        if not conn.broken and conn.info.transaction_status != _psycopg().pq.TransactionStatus.IDLE:
            try:
                conn.execute("ROLLBACK")
            except _psycopg().Error:
                pass

    def transact(self, fn: Callable[[PostgresTransaction], R], holds: Iterable[str] = ()) -> R:
        """`Registry.transact`: READ COMMITTED, holding the volume's lock shared and the locks of
        `holds` from its opening, and whatever a run found it needs (`Relock`: run again holding
        that, the whole volume exclusive if it must; in a thread holding the commit lock, its hold
        is extended to those paths first, with no transaction open); VolumeConfigError, nothing run,
        once a report found this working copy forgotten (`pg_hosts.Reporter.unregistered`). Re-run
        after a serialization failure or a deadlock (`Retry`), or a connection lost before COMMIT
        (at most LOST_RERUNS runs, then RegistryError(EIO) saying so); a COMMIT whose reply was lost
        is resolved by the transaction's commit id. A session the server ended because its
        transaction stayed idle too long is not re-run (RegistryError(ETIMEDOUT)): the same work
        would end the same way. A lock it waits for held past COMMIT_LOCK_TIMEOUT by another
        transaction: RegistryError(EBUSY) naming it, not re-run."""
        if self._tx() is not None:
            raise RegistryError("a registry write transaction was started inside another; nothing was written")
        if self._reporter.forgotten():
            raise pg_hosts.not_registered(os.path.dirname(self.replica.directory), self.location)
        plan = Holds(frozenset(holds))
        hold = self._hold()
        for _ in range(LOST_RERUNS):
            try:
                while True:
                    if hold is not None:  # no transaction open: the copy's hold may wait (in order)
                        self._copy.extend(hold, plan.paths, COMMIT_LOCK_TIMEOUT)
                    try:
                        return retried(partial(self._attempt, fn, plan, hold), self.location.describe())
                    except Relock as again:  # rolled back: run again holding what it needs
                        plan = again.holds
            except _Lost as e:
                lost = e
        raise RegistryError(
            f"{self.location.describe()}: the connection to the database was lost before COMMIT in "
            f"{LOST_RERUNS} runs in a row of one write transaction (the last: {lost}); nothing was written. "
            "Check that PostgreSQL runs and stays reachable from this host, then try again"
        )

    def _attempt(self, fn: Callable[[PostgresTransaction], R], holds: Holds, copy: CopyHold | None) -> R:
        """One run of a write transaction: its opening (BEGIN, its locks, the commit id) goes with
        `fn`'s first read, its writes with the next read or the COMMIT. A
        round trip the server did not answer (`Unanswered`) is not run again: before its COMMIT,
        RegistryError(EIO), nothing written; at its COMMIT, the commit id says how it went."""
        psycopg = _psycopg()
        commit_id = uuid.uuid4()
        with self._use() as conn:
            tx = PostgresTransaction(conn, self.volume_id, holds=holds, locks=self._locks, copy=copy)
            tx.open(self._opening(commit_id, holds, tx.tried))
            session = _Session.of(conn)
            committing = False
            try:
                self._local.tx = tx
                try:
                    result = fn(tx)
                finally:
                    self._local.tx = None
                committing = True
                tx.commit()
            except psycopg.Error as e:
                unknown = committing and _sqlstate(e) is None and not conn.broken
                if unknown:  # the client failed while its COMMIT was on the wire (a reply half read):
                    conn.close()  # only the commit id can say whether it landed
                self._rollback(conn)
                if _sqlstate(e) in RETRY_SQLSTATES:
                    raise Retry(_first_line(e)) from e
                if not unknown and not _gone(conn, e):
                    if _sqlstate(e) == LOCK_TIMED_OUT and (not tx.opened or tx.locking):
                        raise self._busy(conn, tx.holds, tx.content_keys()) from e
                    raise _registry_error(e, self.location) from e
                if not committing or self._landed(commit_id, e, session) is None:
                    self._pool.flush()  # the others were most likely lost with it (a server restart)
                    if isinstance(e, Unanswered):
                        outcome = ": its COMMIT did not land (its commit id says so)" if committing else ""
                        raise _unanswered(self.location, f"{outcome}; nothing was written") from e
                    if _sqlstate(e) == IDLE_ENDED:
                        raise _idle_ended(e, self.location) from e
                    raise _Lost(f"the COMMIT did not land ({_first_line(e)})" if committing else _first_line(e)) from e
            except BaseException:
                self._rollback(conn)
                raise
        self._record_installs(tx)
        return result

    def _busy(self, conn: psycopg.Connection[Any], holds: Holds, contents: Sequence[int] = ()) -> RegistryError:
        return RegistryError(
            f"the commit lock of {self.location.describe()} (the database's locks of its write transactions: the "
            "volume's, and each path's, agent's, setting's and stored content's) stayed held for the "
            f"{COMMIT_LOCK_TIMEOUT:g} s this process waited; {self._holder(conn, holds, contents)}. Nothing was "
            "changed: if the holder is stuck, stop it; then try again",
            errno.EBUSY,
        )

    def _opening(
        self, commit_id: uuid.UUID, holds: Holds, tried: Callable[[psycopg.Cursor[Any]], None]
    ) -> list[Queued]:
        """The statements that open a write transaction: BEGIN, its locks (`_locks`: the volume's,
        exclusive for `holds.whole`, else shared and then those of `holds.paths` and `holds.agents` in
        key order; for `holds.whole_if_free`, first exclusive if it is free at once, its answer given
        to `tried`, never waited for), and the record of `commit_id`. Its serial is the transaction's own id
        (`pg_current_xact_id`): unique, and no row every writer updates."""

        def recorded(cursor: psycopg.Cursor[Any]) -> None:
            if cursor.fetchone() is None:
                raise RegistryError(f"{self.location.describe()} no longer exists in the database")

        volume = (
            self._whole_volume()
            if holds.whole
            else Queued("SELECT pg_advisory_xact_lock_shared(%s, %s)", (LOCK_CLASS, self._lock_key))
        )
        keys = sorted(holds.keys(self.volume_id))
        whole = Queued("SELECT pg_try_advisory_xact_lock(%s, %s)", (LOCK_CLASS, self._lock_key), tried)
        return [
            Queued("BEGIN ISOLATION LEVEL READ COMMITTED"),
            *([whole] if holds.whole_if_free and not holds.whole else []),
            *self._locks(keys, volume, holds.shared(self.volume_id)),
            Queued(
                "INSERT INTO cv_commits (id, volume, serial) SELECT %s, id, pg_current_xact_id()::text::bigint "
                "FROM cv_volumes WHERE id = %s RETURNING serial",
                (commit_id, self.volume_id),
                recorded,
            ),
        ]

    def _whole_volume(self) -> Queued:
        """The statement that takes the volume's lock exclusive: tried every 10 ms for WHOLE_TRIES_FOR
        s, then queued for (`lock_timeout`). A queued exclusive request makes every later request of
        the lock wait behind it, shared ones too (PostgreSQL grants no lock past a waiting one), so
        trying first keeps writers of every path going while a transaction holding one path
        stays open (paused: until the server ends it); queueing after keeps a volume always being
        written from starving it. (One statement, run by the server: no round trip per try.)"""
        lock = f"{LOCK_CLASS}, {self._lock_key}"  # integers: a DO block takes no parameters
        tries = int(WHOLE_TRIES_FOR * 100)
        return Queued(
            f"DO $$ BEGIN FOR i IN 1..{tries} LOOP IF pg_try_advisory_xact_lock({lock}) THEN RETURN; END IF; "
            f"PERFORM pg_sleep(0.01); END LOOP; PERFORM pg_advisory_xact_lock({lock}); END $$"
        )

    @staticmethod
    def _locks(keys: list[int], first: Queued | None, shared: set[int]) -> list[Queued]:
        """The statements that take the lock `first` takes (the volume's, a content's), then the locks
        of paths by `keys` in their order (those in `shared` shared), each waited for at most
        COMMIT_LOCK_TIMEOUT s (lock_timeout, and statement_timeout past it, raised for these
        statements only)."""
        if first is None and not keys:
            return []
        wait_ms = int(COMMIT_LOCK_TIMEOUT * 1000)
        return [
            Queued(f"SET LOCAL lock_timeout = {wait_ms}"),
            Queued(f"SET LOCAL statement_timeout = {wait_ms + int(WHOLE_TRIES_FOR * 1000) + 5000}"),
            *([] if first is None else [first]),
            *(Queued(f"SELECT pg_advisory_xact_lock{'_shared' if key in shared else ''}(%s)", (key,)) for key in keys),
            Queued("SET LOCAL lock_timeout TO DEFAULT"),  # the session's own (options) for the rest
            Queued("SET LOCAL statement_timeout TO DEFAULT"),
        ]

    def _record_installs(self, tx: PostgresTransaction) -> None:
        """What a committed transaction said this working copy's disk holds, into its Replica; then,
        outside the commit lock (whose release has the report sent), this copy's last_seen if due
        (pg_hosts)."""
        for path, held in tx.installs:
            self.replica.record(path, held)
        hold = self._hold()
        if hold is None:
            self.seen()
        else:
            hold.committed = True

    def seen(self) -> None:
        """This copy's last_seen, if due, on a pooled connection: after a transaction of a process that
        holds no commit lock (it only registers views), and while a mount's listener runs (it serves
        the copy with no transactions of its own); what the copy holds is reported only under its
        commit lock."""
        report = self._reporter.report(holdings=False)
        if report is None:
            return
        try:
            conn = self._pool.take()
        except RegistryError:
            return
        try:
            self._send(conn, report)
        finally:
            self._pool.give(conn)

    def working_copies(self) -> list[WorkingCopy]:
        """Every working copy of this volume, how far behind it is and when it was last seen."""
        return self._statement(lambda c: working_copies(c, self.volume_id, self.replica.recorded_id()))

    def forget_copy(self, copy: str) -> WorkingCopy:
        """Remove the registration of another working copy, unseen for long (`pg_hosts.forget`)."""
        return self._statement(lambda c: forget(c, self.volume_id, copy, self.replica.recorded_id()))

    def _landed(self, commit_id: uuid.UUID, lost: BaseException, session: _Session) -> int | None:
        """The serial of the transaction with `commit_id`, whose COMMIT reply was lost, if it
        committed (None if not), asked on a new connection. "Not committed" is trusted only once the
        lost `session` has ended: one still alive (its server process stopped or stuck, the COMMIT
        unread in its socket) could commit later, so it is told to end (`_Session.ended`) and its end
        is waited for. All within CONNECT_WAIT s, then RegistryError(EIO): outcome unknown."""
        psycopg = _psycopg()
        deadline = time.monotonic() + pg_connections.CONNECT_WAIT
        while True:
            try:
                with _connect(self.location, deadline) as conn:
                    while True:
                        ended = session.ended(conn)  # first: then what the lookup finds is final
                        row = conn.execute("SELECT serial FROM cv_commits WHERE id = %s", (commit_id,)).fetchone()
                        if row is not None:
                            return int(row[0])
                        if ended:
                            return None
                        why = f"its session (PostgreSQL backend {session.pid}) had not ended, though told to"
                        if time.monotonic() >= deadline:
                            break
                        time.sleep(0.1)
            except (RegistryError, psycopg.Error) as e:
                # the server's words, not a RegistryError's advice ("nothing was written": not known here)
                cause = e.__cause__ if isinstance(e, RegistryError) and e.__cause__ is not None else e
                why = f"the registry stayed unreachable ({_first_line(cause)})"
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"{self.location.describe()}: the reply to a COMMIT was lost ({_first_line(lost)}) and {why} "
                    f"for {pg_connections.CONNECT_WAIT:g} s: outcome unknown (commit id {commit_id}). Once the "
                    "registry is reachable, `coherent-volume history ROOT PATH` shows whether your change landed (a "
                    "version by you at this time); if it did not, read the file again and redo the change"
                )
            time.sleep(0.2)

    def _last_report(self) -> None:
        """Stop the reporting thread (after the report it is sending, if any) and send what this copy
        holds and has not reported (within LAST_REPORT_WAIT s). Only in a process that held the commit
        lock (a forked child that did not sends nothing)."""
        if self._pid != os.getpid() or not self._installing:
            return
        with self._reports:
            self._closed = True
            self._reports.notify()
            thread = self._reporting

        def last() -> None:
            if thread is not None and thread is not threading.current_thread():
                thread.join()
            self._report_now()

        sender = threading.Thread(target=last, name="coherent-volume last report", daemon=True)
        sender.start()
        sender.join(pg_hosts.LAST_REPORT_WAIT)  # past it, what is unreported stays pending in the copy

    def close(self) -> None:
        """The last report (`_last_report`), then the connections closed."""
        if self._pid == os.getpid():
            self._last_report()
            self._pool.close()
        self.replica.close()
        _OPEN.discard(self)
