"""Connections to a PostgreSQL registry: the session and libpq settings, the small pool of a
process, and what a PostgreSQL error means (a RegistryError, a re-run, a lost connection).

Invariants:
- psycopg is imported inside functions only: the core and the SQLite path never load it;
- every wait is bounded: connecting (CONNECT_WAIT, each attempt connect_timeout), the commit lock
  (COMMIT_LOCK_TIMEOUT), row locks (lock_timeout), statements (statement_timeout), a dead peer
  (keepalives, tcp_user_timeout), and every round trip on the client's side (ANSWER_WAIT): a server
  that stops answering but keeps the connection (its process stopped or stuck, a proxy that forwards
  nothing) still acknowledges at the TCP level, so no TCP timeout fires there;
- a connection whose round trip ran past ANSWER_WAIT is closed at once (it is never used again: it
  stopped in the middle of an exchange), and its error is `Unanswered`.
"""

from __future__ import annotations

import errno
import functools
import getpass
import os
import re
import socket
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import RegistryError, RegistryLoginRefused, VolumeConfigError
from .pg_location import Location

if TYPE_CHECKING:
    import psycopg

CONNECT_WAIT = 10.0
"""Seconds a lost or missing connection is re-established for before RegistryError(EIO) (an attempt
started within them may take its connect_timeout, 5 s, to fail)."""
ANSWER_WAIT = 45.0
"""Seconds a round trip waits while the server sends nothing and takes nothing more of what it is
sent, before the connection is closed and the round trip fails (`Unanswered`). Longer than every
wait the server itself ends within one round trip: a lock of the volume or a path (waited for at most
COMMIT_LOCK_TIMEOUT, 30 s; its statement ends by 35 s), any statement (statement_timeout, 30 s), a
row lock (lock_timeout, 5 s); so it fires only on a server, or a session's process in it, that
stopped answering (stopped, stuck on its disk, or a network path that holds what it sends)."""
POOL_SIZE = 4
"""Connections a process keeps open to the database at most (a thread waits for one, bounded)."""
LOCK_CLASS = 0x6376
"""First key of the advisory locks of coherent-volume ('cv'); the second is the volume's (0: migrations)."""
SESSION_SETTINGS = {
    "idle_in_transaction_session_timeout": "5s",  # a paused or vanished client's transaction, and the
    # locks it holds with it, end within 5 s of its last statement (legitimate gaps are milliseconds)
    "lock_timeout": "5s",  # a row-lock waiter fails typed (EBUSY) instead of hanging
    "statement_timeout": "30s",
    "tcp_keepalives_idle": "5",  # the server notices a dead client within 5 + 3 x 2 s
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",  # ms: a reply the client never acknowledges (it was cut off: no
    # keepalive runs while data is unacknowledged) ends the session
}
LIBPQ_SETTINGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: a client never hangs on a dead server
    "connect_timeout": 5,
}
IDLE_ENDED = "25P03"
"""The server ended the session: its transaction stayed idle past idle_in_transaction_session_timeout."""
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure, deadlock: the transaction is re-run."""
GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25P03"})
"""Server shut down or restarting, session ended by the server: the connection is gone, nothing of
the open transaction was committed."""


def _psycopg() -> Any:
    import psycopg

    return psycopg


class Unanswered(Exception):
    """What a round trip raises when the server sent nothing for ANSWER_WAIT s (its connection is
    closed by then); always a psycopg.OperationalError too, so a caller takes it for a lost connection
    (`_gone`), and `_registry_error` says what happened."""


Ready = TypeVar("Ready")
Result = TypeVar("Result")


def _answered_within(
    gen: Generator[Any, Ready, Result], unanswered: type[Exception], seconds: float
) -> Generator[Any, Ready, Result]:
    """`gen` (a psycopg generator of one exchange on a connection's socket), failing with
    `unanswered` once `seconds` pass with the socket never ready. psycopg's wait resumes it with
    "not ready" every interval (0.1 s) while the socket stays silent, so the deadline is checked in
    the waiting thread: no other thread, no signal."""
    try:
        state = next(gen)
        since = time.monotonic()
        while True:
            ready = yield state
            if ready:
                since = time.monotonic()
            elif time.monotonic() - since > seconds:
                raise unanswered(f"no answer for {seconds:g} s: this process closed the connection")
            state = gen.send(ready)
    except StopIteration as done:
        return done.value


@functools.cache
def _connection_class() -> type[psycopg.Connection[Any]]:
    """psycopg's Connection, with every round trip bounded by ANSWER_WAIT (`_answered_within`):
    psycopg consumes each exchange on the socket through `Connection.wait`. A connection whose round
    trip ran past it is finished there (closed; `broken` is then true)."""
    import psycopg

    class Timeout(Unanswered, psycopg.OperationalError):
        pass

    class BoundedConnection(psycopg.Connection[Any]):
        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().wait(_answered_within(gen, Timeout, ANSWER_WAIT), *args, **kwargs)
            except Timeout:
                self.pgconn.finish()  # stopped mid-exchange: never to be used again
                raise

    return BoundedConnection


@contextmanager
def _pipeline(conn: psycopg.Connection[Any]) -> Iterator[None]:
    """`conn.pipeline()`, whose block's error (a lost connection, `Unanswered`) is raised as it is,
    alone: psycopg would then try to end the pipeline on the lost connection, and log a warning that
    it ignored that second failure ("error ignored terminating Pipeline [BAD]: the connection is
    lost"), an alarm about nothing more than what the first error says."""
    psycopg = _psycopg()
    failed: BaseException | None = None
    try:
        with conn.pipeline():
            try:
                yield
            except psycopg.Error as e:
                failed = e
    except psycopg.Error:
        if failed is None:
            raise
    if failed is not None:
        raise failed


def _connect(location: Location, deadline: float) -> psycopg.Connection[Any]:
    """A new autocommit connection with the session settings, named `coherent-volume HOST PID`
    (pg_stat_activity.application_name), whose round trips are bounded (ANSWER_WAIT), retried until
    `deadline` (time.monotonic()); then the RegistryError of `_unconnected` (unreachable, or out of
    connection slots), nothing written. A login the server refused (`RegistryLoginRefused`) is
    raised at once: the same login would be refused again."""
    psycopg = _psycopg()
    settings = _settings(location.url)
    while True:
        try:
            return _connection_class().connect(location.url, autocommit=True, **settings)
        except psycopg.OperationalError as e:
            error = _unconnected(e, location)
            if isinstance(error, RegistryLoginRefused) or time.monotonic() + 0.2 >= deadline:
                raise error from e
            time.sleep(0.2)


SLOTS_TAKEN = ("too many clients", "remaining connection slots are reserved")
"""How the server words a connection it refuses because every slot is taken (SQLSTATE 53300,
which libpq does not pass on for a refused connection)."""


_PASSWORD_REMEDY = (
    "give libpq the role's password: a password file (PGPASSFILE, else ~/.pgpass; a line "
    "HOST:PORT:DATABASE:ROLE:PASSWORD, mode 0600), a service file (PGSERVICEFILE) or the PGPASSWORD "
    "environment variable (never the URL: it would be recorded in the volume's files)"
)
LOGIN_REFUSALS: tuple[tuple[str, str, str, str], ...] = (
    (
        "28P01",
        r'password authentication failed for user "(?P<name>[^"\n]*)"',
        "authentication failed for role {name}: the password libpq sent is not the role's",
        _PASSWORD_REMEDY,
    ),
    (
        "28P01",
        r"no password supplied",
        "authentication failed for role {name}: libpq found no password to send",
        _PASSWORD_REMEDY,
    ),
    (
        "28000",
        r'authentication failed for user "(?P<name>[^"\n]*)"',
        "authentication failed for role {name}",
        "give it what the method the server's pg_hba.conf names for this host asks for, or change the method",
    ),
    (
        "28000",
        r'role "(?P<name>[^"\n]*)" does not exist',
        "role {name} does not exist",
        "create it (CREATE ROLE {name} LOGIN) or name an existing role in the URL (postgresql://ROLE@HOST:PORT/DB)",
    ),
    (
        "28000",
        r'role "(?P<name>[^"\n]*)" is not permitted to log in',
        "role {name} may not log in",
        "ALTER ROLE {name} LOGIN",
    ),
    (
        "28000",
        r"pg_hba\.conf rejects connection|no pg_hba\.conf entry",
        "the server's pg_hba.conf admits no login of role {name} from this host to this database",
        "add a line for them to pg_hba.conf and reload the server",
    ),
    (
        "3D000",
        r'database "(?P<name>[^"\n]*)" does not exist',
        "database {name} does not exist",
        "create it (CREATE DATABASE {name} OWNER the URL's role) or name an existing database in the URL "
        "(postgresql://ROLE@HOST:PORT/DB)",
    ),
    (
        "42501",
        r'permission denied for database "(?P<name>[^"\n]*)"',
        "the role may not connect to database {name}",
        "GRANT CONNECT ON DATABASE {name} TO the URL's role",
    ),
)
"""How the server refuses a login (SQLSTATE, what its message says, the cause, what to do; {name} is
the role or database the message names, else the role the URL names): retrying cannot help."""


def _login_refused(e: BaseException, location: Location) -> RegistryLoginRefused | None:
    """The error of a connection the server refused for the login itself (`LOGIN_REFUSALS`): its
    authentication failed, or its role or database does not exist or may not be used from here;
    None for any other failure. Decided on the SQLSTATE when the error carries one; libpq passes none
    for a connection it could not open (psycopg 3.3 with libpq 18: `sqlstate` is None for each of
    these), so else, as a last resort, on the message's text: the server's (in English unless its
    lc_messages say otherwise; a translated one is taken as unreachable) or libpq's own ("no password
    supplied"). Several hosts in the URL: one host's refusal decides (the others did not connect)."""
    text, state = str(e), _sqlstate(e)
    for code, pattern, cause, remedy in LOGIN_REFUSALS:
        found = re.search(pattern, text)
        if found is None or (state is not None and state != code):
            continue
        named = found.groupdict().get("name")
        name = f'"{named}"' if named is not None else _role(location)
        said = next((line for line in text.splitlines() if found.group(0) in line), _first_line(e))
        return _refused(location, cause.format(name=name), said, remedy.format(name=name))
    if state in {refusal[0] for refusal in LOGIN_REFUSALS}:
        return _refused(location, f"SQLSTATE {state}", _first_line(e), "see the server's log for the cause")
    return None


def _refused(location: Location, cause: str, said: str, remedy: str) -> RegistryLoginRefused:
    return RegistryLoginRefused(
        f"the registry at {location.server} refused this login: {cause} ({said.strip()}). Nothing was written, "
        f"and the login was not tried again (it would be refused again). To fix: {remedy}; then try again"
    )


def _role(location: Location) -> str:
    """The role the URL logs in as, as libpq picks it: its user, else PGUSER, else this OS user's name."""
    user = _psycopg().conninfo.conninfo_to_dict(location.url).get("user") or os.environ.get("PGUSER")
    return f'"{user}"' if user else f'"{getpass.getuser()}" (this OS user\'s name: the URL names no role)'


def _unconnected(e: BaseException, location: Location) -> RegistryError:
    """The error of a connection that could not be made: the server refused the login
    (`_login_refused`), or refused it for want of a slot (EBUSY, and what to change), else
    unreachable (EIO)."""
    refused = _login_refused(e, location)
    if refused is not None:
        return refused
    if _sqlstate(e) == "53300" or any(words in str(e) for words in SLOTS_TAKEN):
        return RegistryError(
            f"the registry at {location.server} refused a new connection: every connection slot is taken "
            f"({_first_line(e)}); nothing was written. Raise the server's max_connections (each process of the "
            "volume opens up to 4, and one more for a mount's listener) or run fewer "
            "processes, then try again",
            errno.EBUSY,
        )
    return RegistryError(
        f"the registry at {location.server} is unreachable ({_first_line(e)}): nothing could be checked, so "
        "nothing was written and no content was served. Check that PostgreSQL runs and accepts this host, then "
        "try again"
    )


def url_params(url: str) -> dict[str, str]:
    """The libpq parameters of `url`, parsed by libpq's rules (several hosts and ports, `?…`):
    VolumeConfigError saying what is wrong (never the URL, which may carry a secret)."""
    psycopg = _psycopg()
    try:
        return {k: str(v) for k, v in psycopg.conninfo.conninfo_to_dict(url).items()}
    except psycopg.ProgrammingError as e:
        raise VolumeConfigError(f"the registry URL is not one libpq can read: {e}") from e


def _settings(url: str) -> dict[str, Any]:
    """The libpq parameters a connection adds to `url`'s: LIBPQ_SETTINGS, the application name and
    SESSION_SETTINGS (in `options`), each only where the URL (for `options`, else PGOPTIONS) does not
    set it: what the user set wins, and the user's `options` are kept whole."""
    given = url_params(url)
    settings: dict[str, Any] = {k: v for k, v in LIBPQ_SETTINGS.items() if k not in given}
    if "application_name" not in given:
        settings["application_name"] = f"coherent-volume {socket.gethostname()} {os.getpid()}"[:63]
    user = str(given.get("options") or os.environ.get("PGOPTIONS") or "")
    ours = [f"-c {k}={v}" for k, v in SESSION_SETTINGS.items() if k not in _options_set(user)]
    settings["options"] = " ".join([user, *ours]) if user else " ".join(ours)
    return settings


def _options_set(options: str) -> set[str]:
    """The server settings a libpq `options` string sets (`-c name=value`, `-cname=value`,
    `--name=value`), by their names."""
    names, words = set(), options.split()
    for n, word in enumerate(words):
        if word == "-c" and n + 1 < len(words):
            word = words[n + 1]
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            continue
        if "=" in word:
            names.add(word.split("=", 1)[0].strip().lower().replace("-", "_"))
    return names


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _sqlstate(e: BaseException) -> str | None:
    return getattr(e, "sqlstate", None)


def _gone(conn: psycopg.Connection[Any], e: BaseException) -> bool:
    """Whether `e` means the connection is lost (nothing of its open transaction committed)."""
    return conn.broken or _sqlstate(e) in GONE_SQLSTATES or (_sqlstate(e) or "").startswith("08")


def _registry_error(e: BaseException, location: Location) -> RegistryError:
    """The RegistryError for a PostgreSQL error that no re-run resolves."""
    state = _sqlstate(e)
    where = location.describe()
    if state == "25006":
        return RegistryError(f"{where}: the database is read-only ({_first_line(e)}); nothing was written", errno.EROFS)
    if state == "53100":
        return RegistryError(
            f"{where}: the database's disk is full ({_first_line(e)}); nothing was written", errno.ENOSPC
        )
    if state == "55P03":
        return RegistryError(
            f"{where}: a row stayed locked by another transaction past lock_timeout ({_first_line(e)}); "
            "nothing was written: try again",
            errno.EBUSY,
        )
    if state == "57014":
        return RegistryError(
            f"{where}: a statement ran past statement_timeout ({_first_line(e)}); nothing was written: try again",
            errno.ETIMEDOUT,
        )
    if isinstance(e, Unanswered):
        return _unanswered(location)
    if isinstance(e, _psycopg().OperationalError):
        return _unconnected(e, location)
    return RegistryError(f"{where} failed: {_first_line(e)}")


def _unanswered(location: Location, outcome: str = "") -> RegistryError:
    """The error of a round trip the server did not answer within ANSWER_WAIT (`Unanswered`);
    `outcome`: what became of the call's changes, when the caller knows."""
    return RegistryError(
        f"the registry at {location.server} did not answer within {ANSWER_WAIT:g} s (its server, or this "
        f"session's process in it, is stopped or stuck, or the network to it holds what it sends); this process "
        f"closed the connection{outcome}. Check that PostgreSQL runs and answers (pg_stat_activity shows what its "
        "sessions wait on), then try again"
    )


def _idle_ended(e: BaseException, location: Location) -> RegistryError:
    return RegistryError(
        f"{location.describe()}: the database ended this process's session because its write transaction "
        f"stayed idle longer than idle_in_transaction_session_timeout ({_first_line(e)}): this process was "
        "paused, or worked that long between two statements (reading a large file), while it held the "
        "locks of the paths it touched in the database. Nothing was written; it was not run again, as "
        "the same work would end the same way: try again, and if it recurs, say which command and file it was",
        errno.ETIMEDOUT,
    )


class _Pool:
    """Up to POOL_SIZE idle connections of this process, made on demand; a broken one is dropped."""

    def __init__(self, location: Location) -> None:
        self._location = location
        self._idle: list[psycopg.Connection[Any]] = []
        self._slots = threading.BoundedSemaphore(POOL_SIZE)
        self._mutex = threading.Lock()

    def take(self) -> psycopg.Connection[Any]:
        """An idle connection, or a new one; waits at most CONNECT_WAIT s for a free slot and to connect."""
        deadline = time.monotonic() + CONNECT_WAIT
        if not self._slots.acquire(timeout=CONNECT_WAIT):
            raise RegistryError(
                f"{self._location.describe()}: all {POOL_SIZE} connections of this process stayed in use for "
                f"{CONNECT_WAIT:g} s; nothing was written: try again",
                errno.EBUSY,
            )
        try:
            with self._mutex:
                conn = self._idle.pop() if self._idle else None
            if conn is None or conn.broken or conn.closed:
                conn = _connect(self._location, deadline)
            return conn
        except BaseException:
            self._slots.release()
            raise

    def give(self, conn: psycopg.Connection[Any]) -> None:
        """Return a taken connection (a broken one, or one left in a transaction, is closed)."""
        try:
            if conn.broken or conn.closed or conn.info.transaction_status != _psycopg().pq.TransactionStatus.IDLE:
                conn.close()
            else:
                with self._mutex:
                    self._idle.append(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close the idle connections (`flush` after a lost one: the others were probably lost too)."""
        with self._mutex:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    flush = close
