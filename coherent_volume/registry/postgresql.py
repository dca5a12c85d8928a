"""PostgreSQL registry: a volume's registry and the content of its versions in one PostgreSQL
database (many volumes may share one), chosen at `init --registry postgresql://…`.

Every root that uses the volume is a working copy of it (a replica, registered in `cv_replicas`
with its host and boot): the root that created it, and each root that joined it (`init ROOT
--registry URL --volume NAME` on any host). A working copy's own state (which version of each path
its disk holds, with the file's stat fingerprint) is host-local, in its `Replica`
(ROOT/.coherent/replica.db), never in the database. A root whose replica is registered to another
boot of a kernel is refused (a root shared across hosts by a network file system, or a disk moved
from another machine) until `init` takes it over.

Invariants:
- psycopg is imported inside functions only: the core and the SQLite path never load it;
- the location lives in ROOT/.coherent/registry.json and never holds a password (libpq's
  PGPASSFILE, PGSERVICEFILE or environment carry credentials);
- every write transaction first bumps its volume's `serial` row: write transactions of a volume
  are serial (as SQLite's BEGIN IMMEDIATE makes them) and READ COMMITTED statements after that
  row lock see everything committed before; each records a commit id, so a COMMIT whose reply was
  lost is resolved by looking the id up: never applied twice, never reported failed if it landed;
- the commit lock is this working copy's flock (`Replica.locked`, held by the live process) and
  then a session advisory lock keyed by the volume, held on the connection that then runs the
  holding thread's transactions: the advisory lock is held exactly as long as that connection
  lives. A lost connection is replaced and the lock re-taken; when a write transaction of the
  volume committed meanwhile (its `serial` moved), the step that found it fails (RegistryError);
- within a thread, every call made while it holds the commit lock or has a transaction open uses
  that connection (content stored by a transaction's function is part of it);
- every wait is bounded: connecting (CONNECT_WAIT), the commit lock (COMMIT_LOCK_TIMEOUT), row
  locks (lock_timeout), statements (statement_timeout), a dead peer (keepalives, tcp_user_timeout);
- a forked child never uses or closes its parent's connections (it opens its own).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import xxhash

from ..errors import DamagedContent, RegistryError, VersionGone, VolumeConfigError
from ..globs import ManagedGlobs
from ..liveness import ProcessId
from ..paths import REGISTRY_DIR
from ..protocol import FileRecord, Grant, Installed, Intent, Version
from . import DB_FILE, LOCATION_FILE, AgentSummary, Event, Retry, retried
from .replica import DB_FILE as REPLICA_FILE
from .replica import Replica

if TYPE_CHECKING:
    import psycopg

R = TypeVar("R")

"""In the registry directory (ROOT/.coherent): which database and volume the root's registry is."""
COMMIT_LOCK_TIMEOUT = 30.0
"""Seconds the commit lock is waited for before RegistryError(EBUSY)."""
CONNECT_WAIT = 10.0
"""Seconds a lost or missing connection is re-established for before RegistryError(EIO)."""
POOL_SIZE = 4
"""Connections a process keeps open to the database at most (a thread waits for one, bounded)."""
PART = 8 << 20
"""Most bytes of one stored part of a content (and of what a store or a read holds at once, twice)."""
LOCK_CLASS = 0x6376
"""First key of the advisory locks of coherent-volume ('cv'); the second is the volume's (0: migrations)."""
SESSION_SETTINGS = {
    "idle_in_transaction_session_timeout": "5s",  # a vanished client's row locks go within 5 s
    "lock_timeout": "5s",  # a row-lock waiter fails typed (EBUSY) instead of hanging
    "statement_timeout": "30s",
    "tcp_keepalives_idle": "5",  # the server notices a dead client within 5 + 3 x 2 s
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
LIBPQ_SETTINGS: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms: a client never hangs on a dead server
    "connect_timeout": 5,
}
LOST_RERUNS = 3
"""Runs of one write transaction whose connection is lost before COMMIT (a database restart)."""
IDLE_ENDED = "25P03"
"""The server ended the session: its transaction stayed idle past idle_in_transaction_session_timeout."""
RETRY_SQLSTATES = frozenset({"40001", "40P01"})
"""Serialization failure, deadlock: the transaction is re-run."""
GONE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "25P03"})
"""Server shut down or restarting, session ended by the server: the connection is gone, nothing of
the open transaction was committed."""

_FILE_COLS = "path, version, present, hash, writer, committed_at"
_GRANT_COLS = "path, agent, token, host, pid, start, expires_at, fences"
_VERSION_COLS = "path, version, kind, writer, at, size, hash, parents, pruned"


# ---- the location a root records ---------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A PostgreSQL volume: the database's URL (no password) and the volume's name in it."""

    url: str
    volume: str

    @classmethod
    def of(cls, url: str, volume: str | None) -> Location:
        """Check a location given by the user: VolumeConfigError saying what is wrong."""
        _check_url(url)
        if not volume or len(volume) > 200 or not volume.isprintable():
            raise VolumeConfigError(
                f"a PostgreSQL volume needs a name (--volume) of 1 to 200 printable characters, not {volume!r}"
            )
        return cls(url, volume)

    @property
    def server(self) -> str:
        """HOST:PORT as the URL names it (libpq's defaults when it does not)."""
        return _server(self.url)

    def describe(self) -> str:
        return f"volume {self.volume!r} in the PostgreSQL registry at {self.server}"


def _check_url(url: str) -> None:
    """VolumeConfigError unless `url` is a postgresql:// URL without a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise VolumeConfigError(f"the registry {url!r} is not a postgresql://USER@HOST:PORT/DB URL")
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise VolumeConfigError(
            "the registry URL carries a password; it would be stored in the volume's files. Give the URL "
            "without it and let libpq find the password: a password file (PGPASSFILE, ~/.pgpass), a service "
            "file (PGSERVICEFILE) or the PGPASSWORD environment variable"
        )


def _server(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or os.environ.get("PGHOST") or "the local socket"
    return f"{host}:{parts.port or os.environ.get('PGPORT') or 5432}"


def recorded(directory: str) -> tuple[Location, uuid.UUID] | None:
    """The location (and volume id) recorded in registry directory `directory`, None if none is."""
    path = os.path.join(directory, LOCATION_FILE)
    try:
        with open(path) as f:
            data = json.load(f)
        return Location(data["url"], data["volume"]), uuid.UUID(data["volume_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RegistryError(f"{path!r} does not say which PostgreSQL registry this volume uses ({e})") from e


def _record_location(directory: str, location: Location, volume_id: uuid.UUID) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, LOCATION_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"backend": "postgresql", "url": location.url, "volume": location.volume, "volume_id": str(volume_id)}, f
        )
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"


# ---- schema ----------------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str]]:
    """(number, SQL) of every schema migration this release ships, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("pg").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = 2
"""The schema this release reads and writes (the last migration's number)."""


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('cv_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM cv_schema").fetchone()
    return int(row[0]) if row else 0


def _newer(found: int, where: str) -> RegistryError:
    return RegistryError(
        f"the registry at {where} has schema version {found}; this coherent-volume knows versions up to "
        f"{SCHEMA_VERSION}: upgrade coherent-volume (nothing was changed)"
    )


def migrate(url: str) -> tuple[int, int]:
    """Bring the database at `url` to SCHEMA_VERSION: every missing migration in one transaction,
    under an advisory lock (hosts migrating together do not race). (version before, after)."""
    _check_url(url)
    location = Location(url, "")
    with _connect(location, time.monotonic() + CONNECT_WAIT) as conn:
        try:
            return _migrate(conn, location.server)
        except _psycopg().Error as e:
            raise _registry_error(e, location) from e


def _migrate(conn: psycopg.Connection[Any], where: str) -> tuple[int, int]:
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cv_schema (version int PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now(), applied_by text)"
        )
        before = _schema_version(conn)
        if before > SCHEMA_VERSION:
            raise _newer(before, where)
        for number, sql in migrations():
            if number > before:
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO cv_schema (version, applied_by) VALUES (%s, %s)",
                    (number, f"coherent-volume on {socket.gethostname()}"),
                )
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken:
            conn.execute("ROLLBACK")
        raise
    return before, SCHEMA_VERSION


def _check_schema(conn: psycopg.Connection[Any], location: Location) -> None:
    found = _schema_version(conn)
    if found > SCHEMA_VERSION:
        raise _newer(found, location.server)
    if found < SCHEMA_VERSION:
        raise RegistryError(
            f"the registry at {location.server} has schema version {found}; this coherent-volume needs "
            f"{SCHEMA_VERSION}: run `coherent-volume migrate --registry {location.url}` (nothing was changed)"
        )


# ---- connections -------------------------------------------------------------------------------------


def _psycopg() -> Any:
    import psycopg

    return psycopg


def _connect(location: Location, deadline: float) -> psycopg.Connection[Any]:
    """A new autocommit connection with the session settings, named `coherent-volume HOST PID`
    (pg_stat_activity.application_name), retried until `deadline` (time.monotonic()); then
    RegistryError(EIO): unreachable, nothing written."""
    psycopg = _psycopg()
    settings = _settings(location.url)
    while True:
        try:
            return psycopg.connect(location.url, autocommit=True, **settings)
        except psycopg.OperationalError as e:
            if time.monotonic() + 0.2 >= deadline:
                raise RegistryError(
                    f"the registry at {location.server} is unreachable ({_first_line(e)}); nothing was written. "
                    "Check that PostgreSQL runs and accepts this host, then try again"
                ) from e
            time.sleep(0.2)


def _settings(url: str) -> dict[str, Any]:
    """The libpq parameters a connection adds to `url`'s: LIBPQ_SETTINGS, the application name and
    SESSION_SETTINGS (in `options`), each only where the URL (for `options`, else PGOPTIONS) does not
    set it: what the user set wins, and the user's `options` are kept whole."""
    given = _psycopg().conninfo.conninfo_to_dict(url)
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
    if isinstance(e, _psycopg().OperationalError):
        return RegistryError(
            f"the registry at {location.server} is unreachable ({_first_line(e)}); nothing was written. "
            "Check that PostgreSQL runs and accepts this host, then try again"
        )
    return RegistryError(f"{where} failed: {_first_line(e)}")


def _idle_ended(e: BaseException, location: Location) -> RegistryError:
    return RegistryError(
        f"{location.describe()}: the database ended this process's session because its write transaction "
        f"stayed idle longer than idle_in_transaction_session_timeout ({_first_line(e)}): this process was "
        "paused, or worked that long between two statements (reading a large file), while it held the "
        "volume's row lock. Nothing was written; it was not run again, as the same work would end the same "
        "way: try again, and if it recurs, say which command and file it was",
        errno.ETIMEDOUT,
    )


class _Lost(Exception):
    """A write transaction's connection was lost before its COMMIT (nothing of it committed): it
    is run again (`PostgresRegistry.transact`)."""


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


_OPEN: weakref.WeakSet[PostgresRegistry] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for registry in list(_OPEN):
        registry._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- transactions ---------------------------------------------------------------------------------


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
    return Version(row[0], row[1], row[2], row[3], row[4], row[5], row[6], parents, not row[8])


class PostgresTransaction:
    """A Transaction over one connection with a transaction open (see registry.Transaction). The
    fingerprints `put_file` and `touch_file` are given describe this working copy's disk: they go to
    `installs`, which its registry records in the working copy's Replica once the transaction has
    committed, never to the shared database."""

    def __init__(
        self, conn: psycopg.Connection[Any], volume: uuid.UUID, installs: list[tuple[str, Installed]] | None = None
    ) -> None:
        self._c = conn
        self._v = volume
        self.installs: list[tuple[str, Installed]] = [] if installs is None else installs

    def _one(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        return self._c.execute(sql, (self._v, *args)).fetchone()

    def _all(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return self._c.execute(sql, (self._v, *args)).fetchall()

    def _do(self, sql: str, *args: Any) -> None:
        self._c.execute(sql, (self._v, *args))

    def file(self, path: str) -> FileRecord | None:
        row = self._one(f"SELECT {_FILE_COLS} FROM cv_files WHERE volume = %s AND path = %s", path)
        return None if row is None else _record(row)

    def file_and_view(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        return _file_and_view(self._c, self._v, path, agent)

    def put_file(self, r: FileRecord) -> None:
        """The record in the database; its fingerprint, if any (this copy's disk holds it), to `installs`."""
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
        self._do(
            f"INSERT INTO cv_versions (volume, {_VERSION_COLS}) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON CONFLICT (volume, path, version) DO UPDATE SET kind = EXCLUDED.kind, writer = EXCLUDED.writer, "
            "at = EXCLUDED.at, size = EXCLUDED.size, hash = EXCLUDED.hash, parents = EXCLUDED.parents, "
            "pruned = EXCLUDED.pruned",
            *v[:7],
            ",".join(str(p) for p in v.parents) or None,
            not v.retained,
        )

    def history(self, path: str, limit: int | None = None) -> list[Version]:
        rows = self._all(
            f"SELECT {_VERSION_COLS} FROM cv_versions WHERE volume = %s AND path = %s ORDER BY version DESC LIMIT %s",
            path,
            limit,
        )
        return [_version(row) for row in rows]

    def version_entry(self, path: str, version: int) -> Version | None:
        row = self._one(
            f"SELECT {_VERSION_COLS} FROM cv_versions WHERE volume = %s AND path = %s AND version = %s", path, version
        )
        return None if row is None else _version(row)

    def deleted_in(self, directory: str) -> list[FileRecord]:
        prefix = f"{directory}/" if directory else ""
        rows = self._all(
            f"SELECT {_FILE_COLS} FROM cv_files WHERE volume = %s AND NOT present AND starts_with(path, %s) "
            "AND strpos(substr(path, %s), '/') = 0 ORDER BY path",
            prefix,
            len(prefix) + 1,
        )
        return [_record(row) for row in rows]

    def history_paths(self) -> list[str]:
        return [r[0] for r in self._all("SELECT DISTINCT path FROM cv_versions WHERE volume = %s AND NOT pruned")]

    def viewed(self, path: str) -> set[int]:
        return {r[0] for r in self._all("SELECT version FROM cv_views WHERE volume = %s AND path = %s", path)}

    def prune(self, path: str, version: int) -> None:
        self._do("UPDATE cv_versions SET pruned = true WHERE volume = %s AND path = %s AND version = %s", path, version)

    def in_use(self, digest: str) -> bool:
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
        if isinstance(source, bytes):
            got = xxhash.xxh3_128_hexdigest(source)
            if digest is not None and got != digest:
                raise _changed(digest)
            if not self._stored(got):
                self._insert(got, _slices(source), None)
            return got
        if digest is None:  # read once, stored while hashed (statements keep flowing), then named by its hash
            provisional = f"provisional {uuid.uuid4()}"
            got = self._insert(provisional, _read_parts(source), None)
            if self._stored(got):
                self.drop(provisional)
            else:
                for table in ("cv_content_parts", "cv_contents"):
                    self._c.execute(
                        f"UPDATE {table} SET hash = %s WHERE volume = %s AND hash = %s", (got, self._v, provisional)
                    )
            return got
        if self._stored(digest):
            return digest
        if self._insert(digest, _read_parts(source), digest) != digest:
            raise _changed(digest)
        return digest

    def _stored(self, digest: str) -> bool:
        return self._one("SELECT 1 FROM cv_contents WHERE volume = %s AND hash = %s", digest) is not None

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
        self._do("DELETE FROM cv_content_parts WHERE volume = %s AND hash = %s", digest)
        row = self._one("DELETE FROM cv_contents WHERE volume = %s AND hash = %s RETURNING size", digest)
        return 0 if row is None else int(row[0])

    def stored(self) -> tuple[int, int]:
        row = self._one("SELECT count(*), coalesce(sum(size), 0) FROM cv_contents WHERE volume = %s")
        assert row is not None
        return int(row[0]), int(row[1])

    def meta(self, key: str) -> str | None:
        row = self._one("SELECT value FROM cv_meta WHERE volume = %s AND key = %s", key)
        return None if row is None else str(row[0])

    def put_meta(self, key: str, value: str) -> None:
        self._do(
            "INSERT INTO cv_meta (volume, key, value) VALUES (%s, %s, %s) "
            "ON CONFLICT (volume, key) DO UPDATE SET value = EXCLUDED.value",
            key,
            value,
        )

    def view(self, agent: str, path: str) -> int | None:
        row = self._one("SELECT version FROM cv_views WHERE volume = %s AND agent = %s AND path = %s", agent, path)
        return None if row is None else int(row[0])

    def put_view(self, agent: str, path: str, version: int, at: float) -> None:
        self._do(
            "INSERT INTO cv_views (volume, agent, path, version, read_at) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (volume, agent, path) DO UPDATE SET version = EXCLUDED.version, read_at = EXCLUDED.read_at",
            agent,
            path,
            version,
            at,
        )

    def drop_view(self, agent: str, path: str) -> None:
        self._do("DELETE FROM cv_views WHERE volume = %s AND agent = %s AND path = %s", agent, path)

    def read_set(self, agent: str) -> dict[str, int]:
        return {
            p: v for p, v in self._all("SELECT path, version FROM cv_views WHERE volume = %s AND agent = %s", agent)
        }

    def versions(self, paths: list[str]) -> dict[str, int]:
        rows = self._all("SELECT path, version FROM cv_files WHERE volume = %s AND path = ANY(%s)", list(paths))
        return {p: v for p, v in rows}

    def stale_views(self, agent: str) -> list[tuple[str, int, int]]:
        rows = self._all(
            "SELECT v.path, v.version, f.version FROM cv_views v JOIN cv_files f ON f.volume = v.volume "
            "AND f.path = v.path WHERE v.volume = %s AND v.agent = %s AND f.version != v.version ORDER BY v.path",
            agent,
        )
        return [(p, int(seen), int(current)) for p, seen, current in rows]

    def grant(self, path: str) -> Grant | None:
        row = self._one(f"SELECT {_GRANT_COLS} FROM cv_grants WHERE volume = %s AND path = %s", path)
        return None if row is None else _grant(row)

    def grants(self) -> list[Grant]:
        return [_grant(r) for r in self._all(f"SELECT {_GRANT_COLS} FROM cv_grants WHERE volume = %s ORDER BY path")]

    def put_grant(self, g: Grant) -> None:
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
        self._do("DELETE FROM cv_grants WHERE volume = %s AND path = %s", path)

    def bind(self, agent: str, process: ProcessId, pinned: bool, at: float) -> None:
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
        self._do("DELETE FROM cv_sessions WHERE volume = %s AND agent = %s", agent)

    def bound_agent(self, process: ProcessId) -> tuple[str, bool] | None:
        row = self._one(
            "SELECT agent, pinned FROM cv_sessions WHERE volume = %s AND host = %s AND pid = %s AND start = %s",
            process.host,
            process.pid,
            process.start,
        )
        return None if row is None else (row[0], bool(row[1]))

    def pinned(self, agent: str) -> bool:
        row = self._one("SELECT pinned FROM cv_sessions WHERE volume = %s AND agent = %s", agent)
        return bool(row and row[0])

    def grants_of(self, agent: str) -> list[Grant]:
        return [
            _grant(r) for r in self._all(f"SELECT {_GRANT_COLS} FROM cv_grants WHERE volume = %s AND agent = %s", agent)
        ]

    def fenced(self, agent: str, path: str) -> bool:
        return (
            self._one("SELECT 1 FROM cv_fences WHERE volume = %s AND agent = %s AND path = %s", agent, path) is not None
        )

    def put_fence(self, agent: str, path: str, at: float) -> None:
        self._do(
            "INSERT INTO cv_fences (volume, agent, path, at) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (volume, agent, path) DO UPDATE SET at = EXCLUDED.at",
            agent,
            path,
            at,
        )

    def drop_fence(self, agent: str, path: str) -> None:
        self._do("DELETE FROM cv_fences WHERE volume = %s AND agent = %s AND path = %s", agent, path)

    def intents(self) -> list[Intent]:
        rows = self._all(
            "SELECT path, agent, version, present, hash, tmp FROM cv_intents WHERE volume = %s ORDER BY path"
        )
        return [Intent(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    def put_intent(self, i: Intent) -> None:
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

    def files(self) -> Iterator[FileRecord]:
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


def _file_and_view(
    conn: psycopg.Connection[Any], volume: uuid.UUID, path: str, agent: str, pending: bool = False
) -> tuple[FileRecord | None, int | None]:
    """One statement: a file's record and an agent's view of it. With `pending`, a path whose
    commit is decided but not finished (an intent: its writer is installing it, or died first)
    has a record without hash, so no content is paired with it: a tracked read takes the locked
    path, which waits for that commit or recovers it, and so never returns the version before."""
    row = conn.execute(
        f"SELECT {', '.join('f.' + c.strip() for c in _FILE_COLS.split(','))}, v.version, "
        + (
            "EXISTS (SELECT 1 FROM cv_intents i WHERE i.volume = k.volume AND i.path = k.path) "
            if pending
            else "false "
        )
        + 'FROM (SELECT %s::uuid AS volume, %s::text COLLATE "C" AS path) k '
        "LEFT JOIN cv_files f ON f.volume = k.volume AND f.path = k.path "
        "LEFT JOIN cv_views v ON v.volume = k.volume AND v.path = k.path AND v.agent = %s",
        (volume, path, agent),
    ).fetchone()
    assert row is not None
    record = None if row[0] is None else _record(row[:-2])
    if record is not None and row[-1]:
        record = record._replace(hash=None)
    return record, row[-2]


# ---- the registry ---------------------------------------------------------------------------------


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

    def _own(self) -> psycopg.Connection[Any] | None:
        """The connection this thread must use: its open transaction's, else its commit lock's."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
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
        """Run one autocommit statement (or a step of this thread's open transaction); a stale pooled
        connection is replaced once."""
        psycopg = _psycopg()
        for attempt in (1, 2):
            with self._use() as conn:
                in_tx = conn is getattr(self._local, "conn", None)
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
            conn.execute(
                f"SET lock_timeout = {wait_ms}; SET statement_timeout = {wait_ms + 5000}; "
                f"SELECT pg_advisory_lock({LOCK_CLASS}, {self._lock_key}); "
                "RESET lock_timeout; RESET statement_timeout"  # to the session's own (options)
            )
            row = conn.execute("SELECT serial FROM cv_volumes WHERE id = %s", (self.volume_id,)).fetchone()
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
                                self._unlock(held.conn)
                            self._pool.give(held.conn)
        finally:
            mutex.release()

    # -- reads and writes --------------------------------------------------------------------

    def peek(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        return self._statement(lambda c: _file_and_view(c, self.volume_id, path, agent, pending=True))

    @contextmanager
    def read(self) -> Iterator[PostgresTransaction]:
        """A REPEATABLE READ READ ONLY transaction: one snapshot."""
        if getattr(self._local, "conn", None) is not None:  # nested in this thread's open transaction
            yield PostgresTransaction(self._local.conn, self.volume_id)
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
            self._local.conn = conn
            try:
                yield PostgresTransaction(conn, self.volume_id)
            except psycopg.Error as e:
                self._rollback(conn)
                raise _registry_error(e, self.location) from e
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                self._local.conn = None
            try:
                conn.execute("COMMIT", prepare=False)
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
        if getattr(self._local, "conn", None) is not None:
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
        psycopg = _psycopg()
        commit_id = uuid.uuid4()
        with self._use() as conn:
            try:
                self._begin(conn, "BEGIN ISOLATION LEVEL READ COMMITTED")
                conn = self._own() or conn
                row = conn.execute(
                    "WITH s AS (UPDATE cv_volumes SET serial = serial + 1 WHERE id = %s RETURNING serial) "
                    "INSERT INTO cv_commits (id, volume, serial) SELECT %s, %s, serial FROM s RETURNING serial",
                    (self.volume_id, commit_id, self.volume_id),
                ).fetchone()
                if row is None:
                    raise RegistryError(f"{self.location.describe()} no longer exists in the database")
                serial = int(row[0])
                self._local.conn = conn
                tx = PostgresTransaction(conn, self.volume_id)
                try:
                    result = fn(tx)
                finally:
                    self._local.conn = None
            except psycopg.Error as e:
                self._rollback(conn)
                if _sqlstate(e) in RETRY_SQLSTATES:
                    raise Retry(_first_line(e)) from e
                if _gone(conn, e):
                    self._connection_lost(conn)
                    if _sqlstate(e) == IDLE_ENDED:
                        raise _idle_ended(e, self.location) from e
                    raise _Lost(_first_line(e)) from e
                raise _registry_error(e, self.location) from e
            except BaseException:
                self._rollback(conn)
                raise
            try:
                conn.execute("COMMIT", prepare=False)  # its text on the wire: a proxy in the tests finds it
            except psycopg.Error as e:
                if _sqlstate(e) in RETRY_SQLSTATES:
                    raise Retry(_first_line(e)) from e
                if not _gone(conn, e):
                    raise _registry_error(e, self.location) from e
                if not self._landed(commit_id, e):
                    self._connection_lost(conn)
                    if _sqlstate(e) == IDLE_ENDED:
                        raise _idle_ended(e, self.location) from e
                    raise _Lost(f"the COMMIT did not land ({_first_line(e)})") from e
                held = self._held
                if held is not None and held.conn is conn and held.thread == threading.get_ident():
                    held.serial = serial  # it committed under the lock: re-taking it checks from here
                    try:
                        self._connection_lost(conn)
                    except RegistryError as moved:
                        held.moved = str(moved)  # the commit landed: report it; refuse the hold's next step
                self._record_installs(tx)
                return result
        held = self._held
        if held is not None and held.conn is conn:
            held.serial = serial
        self._record_installs(tx)
        return result

    def _record_installs(self, tx: PostgresTransaction) -> None:
        """What a committed transaction said this working copy's disk holds, into its Replica."""
        for path, held in tx.installs:
            self.replica.record(path, held)

    def _landed(self, commit_id: uuid.UUID, lost: BaseException) -> bool:
        """Whether the transaction with `commit_id`, whose COMMIT reply was lost, committed; asked on
        a new connection for at most CONNECT_WAIT s, then RegistryError(EIO): outcome unknown."""
        psycopg = _psycopg()
        deadline = time.monotonic() + CONNECT_WAIT
        while True:
            try:
                with _connect(self.location, deadline) as conn:
                    row = conn.execute(
                        "SELECT EXISTS (SELECT 1 FROM cv_commits WHERE id = %s)", (commit_id,)
                    ).fetchone()
                    return bool(row and row[0])
            except (RegistryError, psycopg.Error) as e:
                if time.monotonic() >= deadline:
                    raise RegistryError(
                        f"{self.location.describe()}: the reply to a COMMIT was lost ({_first_line(lost)}) and the "
                        f"registry stayed unreachable for {CONNECT_WAIT:g} s ({_first_line(e)}): outcome unknown, "
                        f"commit id {commit_id}. `coherent-volume log` shows whether it landed once the registry "
                        "is reachable"
                    ) from e
                time.sleep(0.2)

    def close(self) -> None:
        if self._pid == os.getpid():
            self._pool.close()
        self.replica.close()
        _OPEN.discard(self)


# ---- opening and creating ----------------------------------------------------------------------------


def open_postgres(
    directory: str, root: str, globs: ManagedGlobs | None, url: str | None, volume: str | None
) -> PostgresRegistry:
    """The PostgreSQL registry of the root whose registry directory is `directory`: the one it
    records, or (given `url` and `volume`: `init`) the volume of that name, created if new (and the
    schema with it, in an empty database), with the root registered as a working copy of it (one
    that joined, when the volume existed already). Refuses (VolumeConfigError) a root whose working
    copy is registered to another boot, unless `init` takes it over, and a copy of a working copy's
    directory (it carries the working copy's registration along), which `init` registers as a
    working copy of its own; a refusal changes nothing."""
    found = recorded(directory)
    if url is not None:
        location = Location.of(url, volume)
        if found is not None and found[0] != location:
            raise VolumeConfigError(
                f"{root!r} already uses {found[0].describe()} ({found[0].url}); a root has one registry"
            )
        if os.path.exists(os.path.join(directory, DB_FILE)):
            raise VolumeConfigError(f"{root!r} already has a SQLite registry; a root has one registry")
    elif found is not None:
        location = found[0]
    else:
        raise RegistryError(f"no PostgreSQL registry is recorded in {directory!r}")
    replica = Replica(directory)
    replica_id = replica.recorded_id()
    copied = None if replica_id is None else replica.identity_problem()
    if copied is not None:
        if url is None:
            raise VolumeConfigError(
                f"{root!r} records {location.describe()}, but {copied}. Run `coherent-volume init {root} "
                f"--registry {location.url} --volume {location.volume}` to make it a working copy of its own. "
                "Nothing was changed"
            )
        replica_id = None  # `init` registers the copy as a working copy of its own
    psycopg = _psycopg()
    with _connect(location, time.monotonic() + CONNECT_WAIT) as conn:
        try:
            if url is not None and _schema_version(conn) == 0:
                _migrate(conn, location.server)
            _check_schema(conn, location)
            if url is not None:
                with conn.transaction():  # a refusal leaves no volume and no working copy behind
                    volume_id, stored = _create_volume(conn, location, globs)
                    if found is not None and found[1] != volume_id:
                        raise _not_created_with(location, found[1], volume_id)
                    _check_globs(globs, stored)
                    registered, joined = _register(conn, volume_id, replica_id, root)
            else:
                assert found is not None
                volume_id, stored = _recorded_volume(conn, location, found[1])
                _check_globs(globs, stored)
                _check_replica(conn, location, volume_id, replica_id, root)
                registered, joined = None, False
        except psycopg.Error as e:
            raise _registry_error(e, location) from e
    if found is None:
        _record_location(directory, location, volume_id)
    if registered is not None and registered != replica_id:
        replica.registered(registered, joined)
    return PostgresRegistry(location, volume_id, stored, replica)


def _check_globs(globs: ManagedGlobs | None, stored: ManagedGlobs) -> None:
    if globs is not None and globs != stored:
        raise VolumeConfigError(
            f"this volume manages {list(stored.patterns)}, not {list(globs.patterns)}: "
            "open it without managed globs (or with the stored ones); a second policy is never applied"
        )


def _register(
    conn: psycopg.Connection[Any], volume_id: uuid.UUID, replica_id: uuid.UUID | None, root: str
) -> tuple[uuid.UUID, bool]:
    """Register the root as a working copy on this host and boot (taking over its registration
    when it has one: `init` again after a reboot or a move): its replica id, and whether it joined
    (another working copy was registered before it)."""
    if replica_id is not None:
        row = conn.execute(
            "UPDATE cv_replicas SET hostname = %s, boot_id = %s, root = %s, last_seen = now() "
            "WHERE id = %s AND volume = %s RETURNING id",
            (socket.gethostname(), _boot_id(), root, replica_id, volume_id),
        ).fetchone()
        if row is not None:
            return replica_id, False
    new = uuid.uuid4()
    row = conn.execute(
        "WITH earlier AS (SELECT EXISTS (SELECT 1 FROM cv_replicas WHERE volume = %s) AS joined) "
        "INSERT INTO cv_replicas (id, volume, hostname, boot_id, root) VALUES (%s, %s, %s, %s, %s) "
        "RETURNING (SELECT joined FROM earlier)",
        (volume_id, new, volume_id, socket.gethostname(), _boot_id(), root),
    ).fetchone()
    return new, bool(row and row[0])


def _check_replica(
    conn: psycopg.Connection[Any], location: Location, volume_id: uuid.UUID, replica_id: uuid.UUID | None, root: str
) -> None:
    """VolumeConfigError unless the root is a working copy registered to this boot of this kernel."""
    again = f"`coherent-volume init {root} --registry {location.url} --volume {location.volume}`"
    if replica_id is None:
        raise VolumeConfigError(
            f"{root!r} records {location.describe()} but not which versions its files are (its "
            f"{REGISTRY_DIR}/{REPLICA_FILE} is missing): run {again} to make it a working copy again. "
            "Nothing was changed"
        )
    row = conn.execute(
        "SELECT root, hostname, boot_id FROM cv_replicas WHERE id = %s AND volume = %s", (replica_id, volume_id)
    ).fetchone()
    if row is None:
        raise VolumeConfigError(
            f"{root!r} is no longer registered as a working copy of {location.describe()}: run {again} to "
            "join it again. Nothing was changed"
        )
    stored_root, hostname, boot = row
    if boot == _boot_id():
        try:
            conn.execute("UPDATE cv_replicas SET last_seen = now() WHERE id = %s", (replica_id,))
        except _psycopg().errors.ReadOnlySqlTransaction:
            pass  # a read-only database: what can be read is still served
        return
    raise VolumeConfigError(
        f"the working copy {root!r} of {location.describe()} is registered to {stored_root!r} on host "
        f"{hostname!r} (boot {boot}); this is host {socket.gethostname()!r} (boot {_boot_id()}). A working copy "
        "serves one kernel: a root shared across hosts (a network file system) is refused. If this host "
        f"rebooted or the disk moved here, run {again} to take the working copy over. Nothing was changed"
    )


def _create_volume(
    conn: psycopg.Connection[Any], location: Location, globs: ManagedGlobs | None = None
) -> tuple[uuid.UUID, ManagedGlobs]:
    """The volume named by `location` (created with `globs` if new): (id, globs)."""
    if globs is not None:
        conn.execute(
            "INSERT INTO cv_volumes (id, name, globs) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING",
            (uuid.uuid4(), location.volume, json.dumps(list(globs.patterns))),
        )
    row = conn.execute("SELECT id, globs FROM cv_volumes WHERE name = %s", (location.volume,)).fetchone()
    if row is None:
        raise VolumeConfigError(f"{location.describe()} does not exist: create it with managed globs")
    return row[0], ManagedGlobs.of(row[1])


def _recorded_volume(
    conn: psycopg.Connection[Any], location: Location, volume_id: uuid.UUID
) -> tuple[uuid.UUID, ManagedGlobs]:
    row = conn.execute("SELECT id, globs FROM cv_volumes WHERE name = %s", (location.volume,)).fetchone()
    if row is None or row[0] != volume_id:
        raise _not_created_with(location, volume_id, None if row is None else row[0])
    return row[0], ManagedGlobs.of(row[1])


def _not_created_with(location: Location, recorded_id: uuid.UUID, found: uuid.UUID | None) -> RegistryError:
    return RegistryError(
        f"{location.describe()} is not the volume this root was created with (id {recorded_id}): "
        + ("it no longer exists" if found is None else f"that name now names volume {found}")
        + "; nothing was changed"
    )
