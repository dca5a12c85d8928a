"""Host-local registry: one SQLite file in WAL mode, shared by every process on the host.

No coordinator process: SQLite's own locking serialises write transactions, and an
flock on a sibling file is the commit lock, released by the kernel if its holder dies.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import sqlite_utils

from ..errors import RegistryError, VolumeConfigError
from ..fingerprint import Fingerprint
from ..globs import ManagedGlobs
from ..liveness import ProcessId
from ..protocol import FileRecord, Grant, Intent
from . import AgentSummary, Event

SCHEMA_VERSION = 1
DB_NAME = "registry.db"
LOCK_NAME = "commit.lock"
BUSY_TIMEOUT_MS = 10_000

REQUIRED_TABLES = frozenset({"meta", "files", "views", "grants", "fences", "intents", "events", "sessions"})

_FILE_COLS = "path, version, present, hash, ino, size, mtime_ns, ctime_ns, writer, committed_at, checked_ns"


_GRANT_COLS = "path, agent, token, host, pid, start, expires_at, fences"


def _grant(row: tuple[Any, ...]) -> Grant:
    path, agent, token, host, pid, start, expires_at, fences = row
    return Grant(path, agent, token, ProcessId(host, pid, start), expires_at, bool(fences))


def _record(row: tuple[Any, ...]) -> FileRecord:
    path, version, present, hsh, ino, size, mtime_ns, ctime_ns, writer, at, checked = row
    fp = None if ino is None else Fingerprint(ino, size, mtime_ns, ctime_ns)
    return FileRecord(path, version, bool(present), hsh, fp, writer, at, checked)


def _create_schema(db: sqlite_utils.Database) -> None:
    """Idempotent: racing creators converge on one schema."""
    db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db["files"].create(
        {"path": str, "version": int, "present": int, "hash": str, "ino": int, "size": int,
         "mtime_ns": int, "ctime_ns": int, "writer": str, "committed_at": float, "checked_ns": int},
        pk="path", not_null={"version", "present", "writer", "committed_at", "checked_ns"}, if_not_exists=True,
    )
    db["views"].create({"agent": str, "path": str, "version": int, "read_at": float},
                       pk=("agent", "path"), not_null={"version", "read_at"}, if_not_exists=True)
    db["grants"].create(
        {"path": str, "agent": str, "token": str, "host": str, "pid": int, "start": int, "expires_at": float,
         "fences": int},
        pk="path", not_null={"agent", "token", "host", "pid", "start", "expires_at", "fences"}, if_not_exists=True,
    )
    db["fences"].create({"agent": str, "path": str, "at": float}, pk=("agent", "path"), if_not_exists=True)
    db["intents"].create(
        {"path": str, "agent": str, "version": int, "present": int, "hash": str, "tmp": str},
        pk="path", not_null={"agent", "version", "present"}, if_not_exists=True,
    )
    db["events"].create(
        {"seq": int, "at": float, "kind": str, "path": str, "agent": str, "reason": str,
         "seen_version": int, "version": int, "detail": str},
        pk="seq", not_null={"at", "kind"}, if_not_exists=True,
    )
    db["sessions"].create(
        {"agent": str, "host": str, "pid": int, "start": int, "pinned": int, "at": float},
        pk="agent", not_null={"host", "pid", "start", "pinned", "at"}, if_not_exists=True,
    )
    db["sessions"].create_index(["host", "pid", "start"], if_not_exists=True)
    db["events"].create_index(["path", "seq"], if_not_exists=True)
    db["views"].create_index(["path"], if_not_exists=True)


class SQLiteTransaction:
    """A Transaction over one sqlite3 connection (see registry.Transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def file(self, path: str) -> FileRecord | None:
        row = self._c.execute(f"SELECT {_FILE_COLS} FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else _record(row)

    def file_and_view(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        row = self._c.execute(
            f"SELECT {_FILE_COLS}, (SELECT version FROM views WHERE agent = ? AND path = ?) FROM files WHERE path = ?",
            (agent, path, path),
        ).fetchone()
        if row is None:
            return None, self.view(agent, path)
        return _record(row[:-1]), row[-1]

    def put_file(self, r: FileRecord) -> None:
        fp = r.fingerprint
        self._c.execute(
            f"INSERT OR REPLACE INTO files ({_FILE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (r.path, r.version, int(r.present), r.hash, fp and fp.ino, fp and fp.size, fp and fp.mtime_ns,
             fp and fp.ctime_ns, r.writer, r.committed_at, r.checked_ns),
        )

    def touch_file(self, path: str, r: FileRecord) -> None:
        fp = r.fingerprint
        assert fp is not None
        self._c.execute(
            "UPDATE files SET ino = ?, size = ?, mtime_ns = ?, ctime_ns = ?, checked_ns = ? WHERE path = ?",
            (fp.ino, fp.size, fp.mtime_ns, fp.ctime_ns, r.checked_ns, path),
        )

    def view(self, agent: str, path: str) -> int | None:
        row = self._c.execute("SELECT version FROM views WHERE agent = ? AND path = ?", (agent, path)).fetchone()
        return None if row is None else row[0]

    def put_view(self, agent: str, path: str, version: int, at: float) -> None:
        self._c.execute("INSERT OR REPLACE INTO views (agent, path, version, read_at) VALUES (?,?,?,?)",
                        (agent, path, version, at))

    def drop_view(self, agent: str, path: str) -> None:
        self._c.execute("DELETE FROM views WHERE agent = ? AND path = ?", (agent, path))

    def read_set(self, agent: str) -> dict[str, int]:
        return dict(self._c.execute("SELECT path, version FROM views WHERE agent = ?", (agent,)))

    def versions(self, paths: list[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for path in paths:
            row = self._c.execute("SELECT version FROM files WHERE path = ?", (path,)).fetchone()
            if row is not None:
                out[path] = row[0]
        return out

    def stale_views(self, agent: str) -> list[tuple[str, int, int]]:
        return list(self._c.execute(
            "SELECT v.path, v.version, f.version FROM views v JOIN files f ON f.path = v.path "
            "WHERE v.agent = ? AND f.version != v.version ORDER BY v.path", (agent,)))

    def grant(self, path: str) -> Grant | None:
        row = self._c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE path = ?", (path,)).fetchone()
        return None if row is None else _grant(row)

    def grants(self) -> list[Grant]:
        return [_grant(r) for r in self._c.execute(f"SELECT {_GRANT_COLS} FROM grants ORDER BY path")]

    def put_grant(self, g: Grant) -> None:
        self._c.execute(
            f"INSERT OR REPLACE INTO grants ({_GRANT_COLS}) VALUES (?,?,?,?,?,?,?,?)",
            (g.path, g.agent, g.token, g.owner.host, g.owner.pid, g.owner.start, g.expires_at, int(g.fences)),
        )

    def drop_grant(self, path: str) -> None:
        self._c.execute("DELETE FROM grants WHERE path = ?", (path,))

    def bind(self, agent: str, process: ProcessId, pinned: bool, at: float) -> None:
        self._c.execute("INSERT OR REPLACE INTO sessions (agent, host, pid, start, pinned, at) VALUES (?,?,?,?,?,?)",
                        (agent, process.host, process.pid, process.start, int(pinned), at))

    def unbind(self, agent: str) -> None:
        self._c.execute("DELETE FROM sessions WHERE agent = ?", (agent,))

    def bound_agent(self, process: ProcessId) -> tuple[str, bool] | None:
        row = self._c.execute("SELECT agent, pinned FROM sessions WHERE host = ? AND pid = ? AND start = ?",
                              (process.host, process.pid, process.start)).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def pinned(self, agent: str) -> bool:
        row = self._c.execute("SELECT pinned FROM sessions WHERE agent = ?", (agent,)).fetchone()
        return bool(row and row[0])

    def grants_of(self, agent: str) -> list[Grant]:
        return [_grant(r) for r in self._c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE agent = ?", (agent,))]

    def fenced(self, agent: str, path: str) -> bool:
        return self._c.execute("SELECT 1 FROM fences WHERE agent = ? AND path = ?", (agent, path)).fetchone() is not None

    def put_fence(self, agent: str, path: str, at: float) -> None:
        self._c.execute("INSERT OR REPLACE INTO fences (agent, path, at) VALUES (?,?,?)", (agent, path, at))

    def drop_fence(self, agent: str, path: str) -> None:
        self._c.execute("DELETE FROM fences WHERE agent = ? AND path = ?", (agent, path))

    def intents(self) -> list[Intent]:
        return [Intent(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in self._c.execute(
            "SELECT path, agent, version, present, hash, tmp FROM intents")]

    def put_intent(self, i: Intent) -> None:
        self._c.execute("INSERT OR REPLACE INTO intents (path, agent, version, present, hash, tmp) VALUES (?,?,?,?,?,?)",
                        (i.path, i.agent, i.version, int(i.present), i.hash, i.tmp))

    def drop_intent(self, path: str) -> None:
        self._c.execute("DELETE FROM intents WHERE path = ?", (path,))

    def log(self, kind: str, path: str | None, agent: str | None, at: float, *, reason: str | None = None,
            seen_version: int | None = None, version: int | None = None, detail: str | None = None) -> None:
        self._c.execute(
            "INSERT INTO events (at, kind, path, agent, reason, seen_version, version, detail) VALUES (?,?,?,?,?,?,?,?)",
            (at, kind, path, agent, reason, seen_version, version, detail),
        )

    def events(self, after: int = 0, path: str | None = None, kind: str | None = None,
               limit: int | None = None, newest_first: bool = False) -> list[Event]:
        sql = "SELECT seq, at, kind, path, agent, reason, seen_version, version, detail FROM events WHERE seq > ?"
        args: list[Any] = [after]
        if path is not None:
            sql += " AND path = ?"
            args.append(path)
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY seq DESC" if newest_first else " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Event(*row) for row in self._c.execute(sql, args)]

    def files(self) -> Iterator[FileRecord]:
        for row in self._c.execute(f"SELECT {_FILE_COLS} FROM files ORDER BY path"):
            yield _record(row)

    def agents(self) -> list[AgentSummary]:
        rows = self._c.execute(
            "SELECT v.agent, count(*), sum(f.version IS NOT NULL AND f.version != v.version), max(v.read_at) "
            "FROM views v LEFT JOIN files f ON f.path = v.path GROUP BY v.agent ORDER BY v.agent")
        return [AgentSummary(a, n, int(s or 0), last) for a, n, s, last in rows]


class SQLiteRegistry:
    """The registry of the volume whose registry directory is `directory` (see registry.Registry)."""

    def __init__(self, directory: str, globs: ManagedGlobs | None) -> None:
        """Open the registry in `directory`, creating it if `globs` is given and none exists.

        Raises VolumeConfigError if `globs` differ from the stored ones, RegistryError if the
        registry is missing (and no globs were given), corrupt, or of another schema version."""
        self._directory = directory
        self._path = os.path.join(directory, DB_NAME)
        self._mutex = threading.RLock()
        self._commit_mutex = threading.RLock()
        self._commit_depth = 0
        self._pid = -1
        if not os.path.exists(self._path):
            if globs is None:
                raise RegistryError(f"no volume registry at {self._path!r}: create the volume with managed globs first")
            os.makedirs(directory, mode=0o700, exist_ok=True)
            os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))
            stored = None
        elif globs is None or os.path.getsize(self._path) > 0:
            stored = self._probe(complete=globs is None)
        else:
            stored = None  # an empty file left by a creator that died before writing the schema
        self._connect()
        self._globs = self._configure(globs, stored)

    def _probe(self, complete: bool) -> ManagedGlobs | None:
        """Validate an existing registry read-only, before anything may write to it: integrity,
        schema version and, when `complete` (opening, not creating), its tables and stored globs."""
        try:
            probe = sqlite3.connect(f"file:{self._path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                check = probe.execute("PRAGMA quick_check(1)").fetchone()[0]
                tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                meta = dict(probe.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            finally:
                probe.close()
        except sqlite3.DatabaseError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise self._error(e) from e
            raise RegistryError(f"{self._path!r} is not a coherent-volume registry ({e}); it was left untouched: "
                                "move it aside to start a new registry") from e
        if check != "ok":
            raise RegistryError(f"registry {self._path!r} is corrupt ({check}); it was left untouched")
        if "schema_version" in meta and meta["schema_version"] != str(SCHEMA_VERSION):
            raise RegistryError(f"registry {self._path!r} has schema version {meta['schema_version']!r}; "
                                f"this coherent-volume reads version {SCHEMA_VERSION}")
        if not complete:
            return None
        missing = sorted(REQUIRED_TABLES - tables)
        if missing:
            raise RegistryError(f"{self._path!r} is not a coherent-volume registry, or a damaged one "
                                f"(missing {', '.join(missing)}); it was left untouched")
        if "schema_version" not in meta or "globs" not in meta:
            raise RegistryError(f"registry {self._path!r} stores no schema version or managed globs; it was left untouched")
        try:
            return ManagedGlobs.of(json.loads(meta["globs"]))
        except (ValueError, TypeError) as e:
            raise RegistryError(f"registry {self._path!r} stores unreadable managed globs ({e})") from e

    # -- connection management ------------------------------------------------------

    def _connect(self) -> None:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise RegistryError(f"registry {self._path!r} could not be put in WAL mode (got {mode!r})")
            conn.execute("PRAGMA synchronous = NORMAL")
            # a large registry stays in memory: lookups cost the same at 100 or 100,000 files
            conn.execute("PRAGMA cache_size = -32768")
            conn.execute("PRAGMA mmap_size = 268435456")
        except sqlite3.DatabaseError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise self._error(e) from e
            raise RegistryError(f"registry {self._path!r} is not a usable SQLite database ({e}); "
                                "it was left untouched: move it aside to start a new registry") from e
        self._conn = conn
        self._lock_fd = os.open(os.path.join(self._directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._pid = os.getpid()

    def _connection(self) -> sqlite3.Connection:
        if self._pid != os.getpid():  # after fork: never share a SQLite connection or an flock
            self._mutex = threading.RLock()
            self._commit_mutex = threading.RLock()
            self._commit_depth = 0
            self._connect()
        return self._conn

    def _configure(self, globs: ManagedGlobs | None, stored: ManagedGlobs | None) -> ManagedGlobs:
        """The volume's globs: the stored ones when opening; when creating (`globs` given), write the
        schema and the globs idempotently (racing creators converge) and insist they agree."""
        if globs is None:
            assert stored is not None
            return stored
        try:
            _create_schema(sqlite_utils.Database(self._conn))
            for key, value in (("schema_version", str(SCHEMA_VERSION)), ("globs", json.dumps(list(globs.patterns)))):
                self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            meta = dict(self._conn.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise self._error(e) from e
            raise RegistryError(f"registry {self._path!r} is corrupt ({e}); it was left untouched") from e
        if meta.get("schema_version") != str(SCHEMA_VERSION):
            raise RegistryError(f"registry {self._path!r} has schema version {meta.get('schema_version')!r}; "
                                f"this coherent-volume reads version {SCHEMA_VERSION}")
        try:
            stored_globs = ManagedGlobs.of(json.loads(meta["globs"]))
        except (ValueError, TypeError) as e:
            raise RegistryError(f"registry {self._path!r} stores unreadable managed globs ({e})") from e
        if globs != stored_globs:
            raise VolumeConfigError(
                f"this volume manages {list(stored_globs.patterns)}, not {list(globs.patterns)}: "
                "open it without managed globs (or with the stored ones); a second policy is never applied")
        return stored_globs

    @property
    def globs(self) -> ManagedGlobs:
        return self._globs

    # -- locking and transactions ---------------------------------------------------

    @contextmanager
    def commit_lock(self) -> Iterator[None]:
        """Exclusive across threads and processes; re-entrant within a thread; freed if the process dies."""
        self._connection()
        with self._commit_mutex:
            if self._commit_depth == 0:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._commit_depth += 1
            try:
                yield
            finally:
                self._commit_depth -= 1
                if self._commit_depth == 0:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def peek(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        """One consistent read of a file record and an agent's view of it (no explicit transaction)."""
        with self._mutex:
            try:
                return SQLiteTransaction(self._connection()).file_and_view(path, agent)
            except sqlite3.DatabaseError as e:
                raise self._error(e) from e

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[SQLiteTransaction]:
        with self._mutex:
            conn = self._connection()
            try:
                conn.execute(begin)
            except sqlite3.OperationalError as e:
                raise self._error(e) from e
            try:
                yield SQLiteTransaction(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise self._error(e) from e

    def _error(self, e: sqlite3.DatabaseError) -> RegistryError:
        if "locked" in str(e) or "busy" in str(e):
            return RegistryError(f"registry {self._path!r} stayed locked by another process for more than "
                                 f"{BUSY_TIMEOUT_MS / 1000:g} s; try again", errno.EBUSY)
        if "full" in str(e):
            return RegistryError(f"registry {self._path!r}: no space left on the device ({e})", errno.ENOSPC)
        return RegistryError(f"registry {self._path!r} failed: {e}")

    @contextmanager
    def read(self) -> Iterator[SQLiteTransaction]:
        try:
            with self._transaction("BEGIN") as tx:
                yield tx
        except sqlite3.DatabaseError as e:
            raise self._error(e) from e

    @contextmanager
    def write(self) -> Iterator[SQLiteTransaction]:
        try:
            with self._transaction("BEGIN IMMEDIATE") as tx:
                yield tx
        except sqlite3.DatabaseError as e:
            raise self._error(e) from e

    def close(self) -> None:
        with self._mutex:
            if self._pid == os.getpid():
                self._conn.close()
                os.close(self._lock_fd)
            self._pid = -1
