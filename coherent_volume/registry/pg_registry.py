"""The PostgreSQL registry of one volume: the commit lock, write transactions with commit ids,
and which connection each call uses.

Invariants:
- every write transaction first bumps its volume's `serial` row: write transactions of a volume
  are serial (as SQLite's BEGIN IMMEDIATE makes them) and READ COMMITTED statements after that
  row lock see everything committed before; each records a commit id, so a COMMIT whose reply was
  lost is resolved by looking the id up: never applied twice, never reported failed if it landed;
- round trips: a write transaction's BEGIN and serial bump go with its first read, its writes with
  the next read or its COMMIT (`PostgresTransaction`); a read transaction's BEGIN goes first, alone
  (a pooled connection found lost there is replaced before anything is read); the advisory lock is
  taken, and the serial read, in one round trip;
- the commit lock is this working copy's flock (`Replica.locked`, held by the live process) and
  then a session advisory lock keyed by the volume, held on the connection that then runs the
  holding thread's transactions: the advisory lock is held exactly as long as that connection
  lives. A lost connection is replaced and the lock re-taken; when a write transaction of the
  volume committed meanwhile (its `serial` moved), the step that found it fails (RegistryError);
- within a thread, every call made while it holds the commit lock or has a transaction open uses
  that connection (content stored by a transaction's function is part of it);
- a forked child never uses or closes its parent's connections (it opens its own).
"""

from __future__ import annotations

import errno
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RegistryError
from ..globs import ManagedGlobs
from ..protocol import FileRecord
from . import Retry, pg_connections, retried
from .pg_connections import (
    IDLE_ENDED,
    LOCK_CLASS,
    RETRY_SQLSTATES,
    _connect,
    _first_line,
    _gone,
    _idle_ended,
    _Pool,
    _psycopg,
    _registry_error,
    _sqlstate,
)
from .pg_hosts import Reporter, WorkingCopy, forget, working_copies
from .pg_location import Location
from .pg_transaction import PostgresTransaction, Queued, _file_and_view_query, _file_and_view_row
from .replica import Replica

if TYPE_CHECKING:
    import psycopg

R = TypeVar("R")

COMMIT_LOCK_TIMEOUT = 30.0
"""Seconds the commit lock is waited for before RegistryError(EBUSY)."""
LOST_RERUNS = 3
"""Runs of one write transaction whose connection is lost before COMMIT (a database restart)."""


class _Lost(Exception):
    """A write transaction's connection was lost before its COMMIT (nothing of it committed): it
    is run again (`PostgresRegistry.transact`)."""


_OPEN: weakref.WeakSet[PostgresRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_OPEN):
        registry._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Held:
    """The commit lock as one thread holds it: on `conn`; `serial`: the volume's
    serial when taken or after this holder's last commit."""

    def __init__(self, conn: psycopg.Connection[Any], serial: int) -> None:
        self.conn: psycopg.Connection[Any] | None = conn
        """None while it is being replaced, and after that failed (`lost` says why)."""
        self.serial = serial
        self.thread = threading.get_ident()
        self.lost: str | None = None
        """Why the lock was lost for good, if it was: every later step of this hold is refused."""
        self.moved: str | None = None
        """Why the next step of this hold is refused once (the lock was lost and taken again after
        another process committed, found by a COMMIT that landed and so is reported a success)."""


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
        here; psycopg never ends a session from a process other than the one that opened it)."""
        self._pool = _Pool(self.location)
        self._pid = os.getpid()
        self._commit_mutex = threading.RLock()
        self._held: _Held | None = None
        self._local = threading.local()

    @property
    def globs(self) -> ManagedGlobs:
        return self._globs

    # -- which connection a call uses ------------------------------------------------------

    def _tx(self) -> PostgresTransaction | None:
        """This thread's open transaction."""
        return getattr(self._local, "tx", None)

    def _own(self) -> psycopg.Connection[Any] | None:
        """The connection this thread must use: its open transaction's, else its commit lock's."""
        tx = self._tx()
        if tx is not None:
            return tx.conn
        held = self._held
        if held is not None and held.thread == threading.get_ident():
            if held.lost is not None or held.conn is None:
                raise RegistryError(held.lost or f"{self.location.describe()}: the commit lock was lost")
            if held.moved is not None:
                moved, held.moved = held.moved, None
                raise RegistryError(moved)
            return held.conn
        return None

    @contextmanager
    def _use(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection for one statement or transaction: this thread's own, else one from the pool."""
        if self._pid != os.getpid():
            self._forked()
        own = self._own()
        if own is not None:
            yield own
            return
        conn = self._pool.take()
        try:
            yield conn
        finally:
            self._pool.give(conn)

    def _statement(self, fn: Callable[[psycopg.Connection[Any]], R]) -> R:
        """Run one autocommit statement (not in this thread's open transaction: see `peek`); a stale
        pooled connection is replaced once."""
        psycopg = _psycopg()
        for attempt in (1, 2):
            with self._use() as conn:
                in_tx = self._tx() is not None
                try:
                    return fn(conn)
                except psycopg.Error as e:
                    if in_tx:
                        raise  # the transaction's owner decides (re-run, or which RegistryError)
                    if attempt == 2 or not _gone(conn, e):
                        raise _registry_error(e, self.location) from e
                    self._connection_lost(conn)
        raise AssertionError("unreachable")

    def _connection_lost(self, conn: psycopg.Connection[Any]) -> None:
        """`conn` broke: if it held this thread's commit lock, take the lock again on a new connection.
        When another write transaction committed meanwhile, the step that found the loss fails
        (RegistryError): what this hold decided before may no longer stand. The hold goes on under
        the lock taken again (from the serial then), so a step that re-checks what it records (the
        finish of an installed commit, which looks its intent up) may run again; if the lock cannot
        be taken again, every later step of the hold is refused."""
        self._pool.flush()  # the others were most likely lost with it (a server restart)
        held = self._held
        if held is None or held.conn is not conn or held.thread != threading.get_ident():
            return
        held.conn = None
        self._pool.give(conn)  # closed: it is broken
        try:
            held.conn, serial = self._take_lock(time.monotonic() + COMMIT_LOCK_TIMEOUT)
        except BaseException as e:
            held.lost = f"{self.location.describe()}: the connection holding the commit lock was lost ({e})"
            raise
        if serial != held.serial:
            held.serial = serial
            raise RegistryError(
                f"{self.location.describe()}: the connection holding the commit lock was lost, and another "
                "process committed before it was taken again; nothing more of this operation was written "
                "(an interrupted commit is completed by the next one): try again"
            )

    # -- locking ------------------------------------------------------------------------

    def _take_lock(self, deadline: float) -> tuple[psycopg.Connection[Any], int]:
        """A pooled connection holding the volume's advisory lock, and the volume's serial then;
        a connection found lost on the way is replaced until `deadline`."""
        while True:
            conn = self._pool.take()
            try:
                return conn, self._lock(conn, deadline)
            except _psycopg().Error as e:
                self._pool.give(conn)
                if not _gone(conn, e) or time.monotonic() >= deadline:
                    raise _registry_error(e, self.location) from e
                self._pool.flush()
            except BaseException:
                self._pool.give(conn)
                raise

    def _lock(self, conn: psycopg.Connection[Any], deadline: float) -> int:
        """Take the volume's advisory lock on `conn`, waiting until `deadline`; the volume's serial
        then. RegistryError(EBUSY) naming the holder when the wait runs out."""
        psycopg = _psycopg()
        wait_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            # one message; each statement its own snapshot: the serial is read once the lock is held
            cursor = conn.execute(
                f"SET lock_timeout = {wait_ms}; SET statement_timeout = {wait_ms + 5000}; "
                f"SELECT pg_advisory_lock({LOCK_CLASS}, {self._lock_key}); "
                "RESET lock_timeout; RESET statement_timeout; "  # to the session's own (options)
                f"SELECT serial FROM cv_volumes WHERE id = '{self.volume_id}'"
            )
            while cursor.nextset():
                pass
            row = cursor.fetchone()
        except psycopg.Error as e:
            if _sqlstate(e) in ("55P03", "57014"):  # lock_timeout, or statement_timeout first
                conn.execute("RESET lock_timeout; RESET statement_timeout")
                raise RegistryError(
                    f"the commit lock of {self.location.describe()} stayed held for the "
                    f"{COMMIT_LOCK_TIMEOUT:g} s this process waited; {self._holder(conn)}. Nothing was changed: "
                    "if the holder is stuck, stop it; then try again",
                    errno.EBUSY,
                ) from e
            raise
        if row is None:
            self._unlock(conn)
            raise RegistryError(f"{self.location.describe()} no longer exists in the database")
        return int(row[0])

    def _holder(self, conn: psycopg.Connection[Any]) -> str:
        """Who holds the volume's commit lock, as PostgreSQL tells."""
        try:
            rows = conn.execute(
                "SELECT a.pid, a.application_name, a.client_addr FROM pg_locks l "
                "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted "
                "AND l.classid = %s AND l.objid = %s AND l.objsubid = 2 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (LOCK_CLASS, self._lock_key & 0xFFFFFFFF),
            ).fetchall()
        except Exception:
            return "PostgreSQL did not say who holds it"
        if not rows:
            return "PostgreSQL shows no holder any more"
        return "held by " + ", ".join(
            f"{app or 'a session with no application_name'} (PostgreSQL backend {pid}"
            + (f", client {addr}" if addr else "")
            + ")"
            for pid, app, addr in rows
        )

    def _unlock(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, self._lock_key))
        except _psycopg().Error:
            pass  # the session is gone, and the lock with it

    @contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Exclusive across threads, processes and hosts; re-entrant within a thread; freed when its
        holder dies; waited for at most COMMIT_LOCK_TIMEOUT s, then RegistryError(EBUSY). Two locks,
        taken in this order: this working copy's own (`Replica.locked`, an flock: held by the live
        process whatever becomes of its database session, so no other process of this host decides,
        recovers or installs into this copy while a holder is between its decision and its install),
        then the volume's advisory lock in the database (across hosts; it ends with its session)."""
        if self._pid != os.getpid():
            self._forked()
        deadline, pid, mutex = time.monotonic() + COMMIT_LOCK_TIMEOUT, os.getpid(), self._commit_mutex
        if not mutex.acquire(timeout=COMMIT_LOCK_TIMEOUT):
            raise RegistryError(
                f"the commit lock of {self.location.describe()} stayed held by another thread of this process "
                f"for more than {COMMIT_LOCK_TIMEOUT:g} s; nothing was changed: try again",
                errno.EBUSY,
            )
        try:
            if self._held is not None:  # this thread's (the mutex is): re-entered
                yield
                return
            with self.replica.locked(COMMIT_LOCK_TIMEOUT, deadline - COMMIT_LOCK_TIMEOUT):
                held = self._held = _Held(*self._take_lock(deadline))
                try:
                    yield
                finally:
                    if os.getpid() == pid:
                        self._held = None
                        if held.conn is not None:
                            if not held.conn.broken:
                                self._report(unlock=held.conn)
                            self._pool.give(held.conn)
        finally:
            mutex.release()

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
                self._begin(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            except psycopg.Error as e:
                if self._own() is not None or not _gone(conn, e):
                    raise _registry_error(e, self.location) from e
                with self.read() as tx:  # a pooled connection found lost: once more on a new one
                    yield tx
                return
            conn = self._own() or conn  # a lost commit-lock connection was replaced
            tx = self._local.tx = PostgresTransaction(conn, self.volume_id)
            try:
                yield tx
            except psycopg.Error as e:
                self._rollback(conn)
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
                self._connection_lost(conn)  # what it read stands: it wrote nothing

    def _begin(self, conn: psycopg.Connection[Any], begin: str) -> None:
        """BEGIN on `conn`; a connection found lost is replaced once (a pooled one by the caller's
        next attempt, a commit-lock one here, if no one committed meanwhile)."""
        try:
            conn.execute(begin)
        except _psycopg().Error as e:
            if not _gone(conn, e):
                raise
            self._connection_lost(conn)
            own = self._own()
            if own is None:
                raise
            own.execute(begin)

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        if not conn.broken and conn.info.transaction_status != _psycopg().pq.TransactionStatus.IDLE:
            try:
                conn.execute("ROLLBACK")
            except _psycopg().Error:
                pass

    def transact(self, fn: Callable[[PostgresTransaction], R]) -> R:
        """`Registry.transact`: READ COMMITTED after the volume's serial row lock. Re-run after a
        serialization failure or a deadlock (`Retry`), or a connection lost before COMMIT (at most
        LOST_RERUNS runs, then RegistryError(EIO) saying so); a COMMIT whose reply was lost is
        resolved by the transaction's commit id. A session the server ended because its transaction
        stayed idle too long is not re-run (RegistryError(ETIMEDOUT)): the same work would end the same way."""
        if self._tx() is not None:
            raise RegistryError("a registry write transaction was started inside another; nothing was written")
        for _ in range(LOST_RERUNS):
            try:
                return retried(lambda: self._attempt(fn), self.location.describe())
            except _Lost as e:
                lost = e
        raise RegistryError(
            f"{self.location.describe()}: the connection to the database was lost before COMMIT in "
            f"{LOST_RERUNS} runs in a row of one write transaction (the last: {lost}); nothing was written. "
            "Check that PostgreSQL runs and stays reachable from this host, then try again"
        )

    def _attempt(self, fn: Callable[[PostgresTransaction], R]) -> R:
        """One run of a write transaction: its opening (BEGIN, the serial bump with the commit id)
        goes with `fn`'s first read, its writes with the next read or the COMMIT."""
        psycopg = _psycopg()
        commit_id = uuid.uuid4()
        bumped: list[int] = []
        with self._use() as conn:
            held = self._held
            if held is None or held.conn is not conn or held.thread != threading.get_ident():
                held = None
            tx = PostgresTransaction(conn, self.volume_id, opening=self._opening(commit_id, bumped))
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
                self._rollback(conn)
                if _sqlstate(e) in RETRY_SQLSTATES:
                    raise Retry(_first_line(e)) from e
                if not _gone(conn, e):
                    raise _registry_error(e, self.location) from e
                landed = self._landed(commit_id, e) if committing else None
                if landed is None:
                    self._connection_lost(conn)
                    if _sqlstate(e) == IDLE_ENDED:
                        raise _idle_ended(e, self.location) from e
                    raise _Lost(f"the COMMIT did not land ({_first_line(e)})" if committing else _first_line(e)) from e
                if held is not None and held.conn is conn:
                    held.serial = landed  # it committed under the lock: re-taking it checks from here
                    try:
                        self._connection_lost(conn)
                    except RegistryError as moved:
                        held.moved = str(moved)  # the commit landed: report it; refuse the hold's next step
                self._record_installs(tx)
                return result
            except BaseException:
                self._rollback(conn)
                raise
        if held is not None and held.conn is conn:
            held.serial = bumped[0]
        self._record_installs(tx)
        return result

    def _opening(self, commit_id: uuid.UUID, bumped: list[int]) -> list[Queued]:
        """The statements that open a write transaction: BEGIN, and the serial bump recording
        `commit_id` (the serial it made into `bumped`)."""

        def bump(cursor: psycopg.Cursor[Any]) -> None:
            row = cursor.fetchone()
            if row is None:
                raise RegistryError(f"{self.location.describe()} no longer exists in the database")
            bumped.append(int(row[0]))

        return [
            Queued("BEGIN ISOLATION LEVEL READ COMMITTED"),
            Queued(
                "WITH s AS (UPDATE cv_volumes SET serial = serial + 1 WHERE id = %s RETURNING serial) "
                "INSERT INTO cv_commits (id, volume, serial) SELECT %s, %s, serial FROM s RETURNING serial",
                (self.volume_id, commit_id, self.volume_id),
                bump,
            ),
        ]

    def _record_installs(self, tx: PostgresTransaction) -> None:
        """What a committed transaction said this working copy's disk holds, into its Replica; then,
        outside the commit lock (whose release reports), this copy's last_seen if due (pg_hosts)."""
        for path, held in tx.installs:
            self.replica.record(path, held)
        holder = self._held
        if holder is None or holder.thread != threading.get_ident():
            self._report(unlock=None)

    def _report(self, unlock: psycopg.Connection[Any] | None) -> None:
        """Send this working copy's report (pg_hosts.Reporter), if it has one. Given `unlock` (the
        commit lock's release, under the working copy's flock): `_unlock` it, and in the same round
        trip report the versions this copy now holds that the registry was not told. Else: last_seen
        alone if due, on a pooled connection. A report that fails goes with the next one; it never
        fails the caller."""
        report = self._reporter.report(holdings=unlock is not None)
        if report is None:
            if unlock is not None:
                self._unlock(unlock)
            return
        try:
            conn = unlock or self._pool.take()
        except RegistryError:
            return
        try:
            with conn.pipeline():
                if unlock is not None:
                    conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, self._lock_key))
                self._reporter.queue(conn, report)
        except _psycopg().Error:
            return  # the session is gone (and the lock with it), or the report failed: it stays pending
        finally:
            if unlock is None:
                self._pool.give(conn)
        self._reporter.sent(report)

    def working_copies(self) -> list[WorkingCopy]:
        """Every working copy of this volume, how far behind it is and when it was last seen."""
        return self._statement(lambda c: working_copies(c, self.volume_id, self.replica.recorded_id()))

    def forget_copy(self, copy: str) -> WorkingCopy:
        """Remove the registration of another working copy, unseen for long (`pg_hosts.forget`)."""
        return self._statement(lambda c: forget(c, self.volume_id, copy, self.replica.recorded_id()))

    def _landed(self, commit_id: uuid.UUID, lost: BaseException) -> int | None:
        """The serial of the transaction with `commit_id`, whose COMMIT reply was lost, if it
        committed (None if not); asked on a new connection for at most CONNECT_WAIT s, then
        RegistryError(EIO): outcome unknown."""
        psycopg = _psycopg()
        deadline = time.monotonic() + pg_connections.CONNECT_WAIT
        while True:
            try:
                with _connect(self.location, deadline) as conn:
                    row = conn.execute("SELECT serial FROM cv_commits WHERE id = %s", (commit_id,)).fetchone()
                    return None if row is None else int(row[0])
            except (RegistryError, psycopg.Error) as e:
                if time.monotonic() >= deadline:
                    raise RegistryError(
                        f"{self.location.describe()}: the reply to a COMMIT was lost ({_first_line(lost)}) and the "
                        f"registry stayed unreachable for {pg_connections.CONNECT_WAIT:g} s ({_first_line(e)}): "
                        f"outcome unknown, commit id {commit_id}. `coherent-volume log` shows whether it landed once "
                        "the registry is reachable"
                    ) from e
                time.sleep(0.2)

    def close(self) -> None:
        if self._pid == os.getpid():
            self._pool.close()
        self.replica.close()
        _OPEN.discard(self)
