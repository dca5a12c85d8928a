"""Host-local registry: one SQLite file in WAL mode, shared by every process on the host.

No coordinator process: SQLite's own locking serialises write transactions, and an
flock on a sibling file is the commit lock, released by the kernel if its holder dies.

Invariants:
- every wait for a lock is bounded: the commit lock and the open lock for
  COMMIT_LOCK_TIMEOUT / OPEN_LOCK_TIMEOUT seconds, SQLite's own locks for BUSY_TIMEOUT_MS;
  past that, RegistryError(EBUSY) says which lock, for how long and, if /proc/locks tells,
  held by whom;
- a forked child never keeps its parent's locks: it closes the inherited lock descriptors
  (never unlocks them: that would release the parent's lock) and closes the inherited SQLite
  connections only where their close cannot checkpoint (`_closed_inherited`); a fork waits for
  other threads' transactions to end (`_before_fork`), whose locks SQLite keeps in memory the
  child would copy;
- a process uses only the registry files at their paths (`_replaced`: it writes nothing more
  into a write-ahead log another process no longer sees, and never closes its connection to it:
  `_park`); the commit lock holds however files in the registry's directory are removed
  (`_lock_commits`);
- a registry is created (file, WAL switch) by one process at a time, under the open lock;
  the schema is written in one write transaction;
- only SQLite opens the registry's files (the database, its -wal and -shm): closing any
  descriptor of a file drops every POSIX lock the process holds on it, its SQLite connections'
  too, and another process could then delete the write-ahead log under them;
- an SQLite error is told apart by its result code (`_error`): only a registry SQLite finds
  damaged is called so; what the operating system refuses is said with its path and remedy
  (`sqlite_access`);
- inode numbers are unsigned 64-bit, SQLite's INTEGER is signed: they are stored
  two's-complement (see `_ino_to_sql`).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shlex
import sqlite3
import struct
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import sqlite_utils


from ..errors import OtherGlobs, RegistryError, RootGone, root_gone
from ..fingerprint import Fingerprint, file_identity
from ..globs import ManagedGlobs
from ..liveness import INITIAL_PID_NAMESPACE, ProcessId, pid_namespace_inode, start_time
from ..protocol import FileRecord, Grant, Intent, Version, dirs_above
from . import DB_FILE, AgentSummary, Event, InTheWay, LogMark, objects, volume_above
from .polling import poll
from .sqlite_access import refusal, unusable

R = TypeVar("R")

SCHEMA_VERSION = 3
"""3: content in parts of at most `objects.PART` bytes (`contents` and `content_parts`); 2: each
content whole in its `contents` row; 1: one file per content under LEGACY_OBJECTS_DIR."""
MIGRATES_FROM = frozenset({"1", "2"})
"""Schema versions that opening a registry migrates to SCHEMA_VERSION (`_migrate`)."""
LEGACY_OBJECTS_DIR = "objects"
LOCK_NAME = "commit.lock"
OPEN_LOCK_NAME = "open.lock"
BUSY_TIMEOUT_MS = 10_000
COMMIT_LOCK_TIMEOUT = 30.0
"""Seconds a commit waits for the commit lock before it gives up with RegistryError(EBUSY)."""
OPEN_LOCK_TIMEOUT = 30.0
"""Seconds opening a registry waits for a creator of it to finish."""

FULL_BELOW = 1 << 20
"""Bytes that must still fit on the file system holding the registry for an I/O error of SQLite's
not to be taken for a full file system: SQLite reports one that cannot grow its shared memory or
log file as SQLITE_IOERR_SHMSIZE or a write error, not SQLITE_FULL."""


def _no_room(directory: str) -> str | None:
    """What shows that FULL_BELOW bytes cannot be allocated on the file system holding `directory`
    (full, or over a quota), tried in a file without a name (O_TMPFILE), so nothing is left behind;
    None when they can, or when it cannot be told. Counting free blocks cannot tell:
    ext4's reserved clusters count as free for root, yet nobody may write them; they are counted only
    where unnamed files cannot be made."""
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"no file can be made there: {e.strerror}"
        return _few_free(directory) if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL) else None
    try:
        os.posix_fallocate(fd, 0, FULL_BELOW)
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        return f"{FULL_BELOW >> 20} MiB more cannot be allocated there: {e.strerror}" if full else None
    finally:
        os.close(fd)
    return None


def _few_free(directory: str) -> str | None:
    """How few bytes are free on the file system holding `directory` for this process (root may
    use the blocks reserved for it), when fewer than FULL_BELOW; None otherwise or if it cannot be told."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    free = (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    return f"only {free:,} bytes are free there" if free < FULL_BELOW else None


_MAY_BE_FULL = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})
"""SQLite's result codes for a failure a full file system may cause (`_no_room` tells)."""
_OS_LEVEL = frozenset({sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN})
"""SQLite's result codes for a failure whose cause may lie with the operating system (`refusal`)."""

REQUIRED_TABLES = frozenset({"meta", "files", "views", "grants", "fences", "intents", "events", "sessions"})

_FILE_COLS = "path, version, present, hash, ino, size, mtime_ns, ctime_ns, writer, committed_at, checked_ns"
_PUT_FILE = (
    f"INSERT INTO files ({_FILE_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (path) DO UPDATE SET "
    + ", ".join(f"{col} = excluded.{col}" for col in _FILE_COLS.split(", ")[1:])
)
"""An upsert, not INSERT OR REPLACE: a path's row is changed in place (same rowid), so its index
entry is not rewritten (a page fewer in each commit's write-ahead log)."""


_GRANT_COLS = "path, agent, token, host, pid, start, expires_at, fences"
_FILE_N, _GRANT_N = len(_FILE_COLS.split(", ")), len(_GRANT_COLS.split(", "))
_WRITE_STATE = (
    f"SELECT {', '.join('f.' + c for c in _FILE_COLS.split(', '))}, "
    "(SELECT version FROM views WHERE agent = ? AND path = k.path), "
    f"{', '.join('g.' + c for c in _GRANT_COLS.split(', '))}, "
    "EXISTS (SELECT 1 FROM fences WHERE agent = ? AND path = k.path) "
    "FROM (SELECT ? AS path) k LEFT JOIN files f ON f.path = k.path LEFT JOIN grants g ON g.path = k.path"
)
"""What `write_state` reads, in one statement: the file, the agent's view, the grant, the fence."""

_INO_RANGE = 2**64

_VERSION_COLS = "path, version, kind, writer, at, size, hash, parents, pruned"

VERSIONS_DDL = (
    "CREATE TABLE IF NOT EXISTS versions (path TEXT NOT NULL, version INTEGER NOT NULL, kind TEXT NOT NULL, "
    "writer TEXT NOT NULL, at FLOAT NOT NULL, size INTEGER, hash TEXT, parents TEXT, "
    "pruned INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (path, version))",
    "CREATE INDEX IF NOT EXISTS versions_hash ON versions (hash)",
)
"""Every version of every managed path (added to registries made before it existed when opened).
`pruned`: 0 its bytes are kept, 1 pruned (or, in registries older than `_NEVER_KEPT`, never kept),
`_NEVER_KEPT` never kept."""
_NEVER_KEPT = 2


def _version(row: tuple[Any, ...]) -> Version:
    parents = tuple(int(p) for p in row[7].split(",")) if row[7] else ()
    return Version(row[0], row[1], row[2], row[3], row[4], row[5], row[6], parents, row[8] == 0, row[8] == _NEVER_KEPT)


def _ino_to_sql(ino: int) -> int:
    """An inode number (0 <= ino < 2**64) as a signed 64-bit SQLite INTEGER: ino >= 2**63 is
    stored as ino - 2**64 (file systems such as GlusterFS's FUSE client use the top bit)."""
    return ino - _INO_RANGE if ino >= _INO_RANGE // 2 else ino


def _ino_from_sql(value: int) -> int:
    """Inverse of `_ino_to_sql`."""
    return value + _INO_RANGE if value < 0 else value


def _grant(row: tuple[Any, ...]) -> Grant:
    path, agent, token, host, pid, start, expires_at, fences = row
    return Grant(path, agent, token, ProcessId(host, pid, start), expires_at, bool(fences))


def _record(row: tuple[Any, ...]) -> FileRecord:
    path, version, present, hsh, ino, size, mtime_ns, ctime_ns, writer, at, checked = row
    fp = None if ino is None else Fingerprint(_ino_from_sql(ino), size, mtime_ns, ctime_ns)
    return FileRecord(path, version, bool(present), hsh, fp, writer, at, checked)


def _create_schema(db: sqlite_utils.Database) -> None:
    """Idempotent: racing creators converge on one schema."""
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    db.table("files").create(
        {
            "path": str,
            "version": int,
            "present": int,
            "hash": str,
            "ino": int,
            "size": int,
            "mtime_ns": int,
            "ctime_ns": int,
            "writer": str,
            "committed_at": float,
            "checked_ns": int,
        },
        pk="path",
        not_null={"version", "present", "writer", "committed_at", "checked_ns"},
        if_not_exists=True,
    )
    db.table("views").create(
        {"agent": str, "path": str, "version": int, "read_at": float},
        pk=("agent", "path"),
        not_null={"version", "read_at"},
        if_not_exists=True,
    )
    db.table("grants").create(
        {
            "path": str,
            "agent": str,
            "token": str,
            "host": str,
            "pid": int,
            "start": int,
            "expires_at": float,
            "fences": int,
        },
        pk="path",
        not_null={"agent", "token", "host", "pid", "start", "expires_at", "fences"},
        if_not_exists=True,
    )
    db.table("fences").create({"agent": str, "path": str, "at": float}, pk=("agent", "path"), if_not_exists=True)
    db.table("intents").create(
        {"path": str, "agent": str, "version": int, "present": int, "hash": str, "tmp": str},
        pk="path",
        not_null={"agent", "version", "present"},
        if_not_exists=True,
    )
    db.table("events").create(
        {
            "seq": int,
            "at": float,
            "kind": str,
            "path": str,
            "agent": str,
            "reason": str,
            "seen_version": int,
            "version": int,
            "detail": str,
        },
        pk="seq",
        not_null={"at", "kind"},
        if_not_exists=True,
    )
    db.table("sessions").create(
        {"agent": str, "host": str, "pid": int, "start": int, "pinned": int, "at": float},
        pk="agent",
        not_null={"host", "pid", "start", "pinned", "at"},
        if_not_exists=True,
    )
    for statement in VERSIONS_DDL:
        db.execute(statement)
    for statement in objects.CONTENTS_DDL:
        db.execute(statement)
    db.table("sessions").create_index(["host", "pid", "start"], if_not_exists=True)
    db.table("events").create_index(["path", "seq"], if_not_exists=True)
    db.table("views").create_index(["path"], if_not_exists=True)


class SQLiteTransaction:
    """A Transaction over one sqlite3 connection (see registry.Transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn
        self._now: float | None = None

    held = None
    """Every path: a write transaction holds the whole registry (BEGIN IMMEDIATE)."""

    def hold(self, paths: Iterable[str]) -> list[str]:
        return []

    def hold_agents(self, agents: Iterable[str]) -> None:
        pass

    def hold_all(self) -> None:
        pass

    def hold_all_if_free(self) -> None:
        pass

    def now(self) -> float:
        """This host's clock (every process sharing an SQLite registry runs on this host)."""
        if self._now is None:
            self._now = time.time()
        return self._now

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

    def read_ahead(self, path: str, agent: str) -> None:
        """Nothing to send ahead: every read is local."""

    def write_state(self, path: str, agent: str) -> tuple[FileRecord | None, int | None, Grant | None, bool]:
        row = self._c.execute(_WRITE_STATE, (agent, agent, path)).fetchone()
        held = row[_FILE_N + 1 : _FILE_N + 1 + _GRANT_N]
        return (
            None if row[0] is None else _record(row[:_FILE_N]),
            row[_FILE_N],
            None if held[0] is None else _grant(held),
            bool(row[-1]),
        )

    def put_version(self, v: Version) -> None:
        self._c.execute(
            f"INSERT OR REPLACE INTO versions ({_VERSION_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
            (
                *v[:7],
                ",".join(str(p) for p in v.parents) or None,
                0 if v.retained else _NEVER_KEPT if v.never_kept else 1,
            ),
        )

    def file_in_the_way(self, path: str, besides: Collection[str] = ()) -> InTheWay | None:
        """(Asked by working copies only, which a SQLite volume has none of: its one disk decides.)"""
        ways, left = dirs_above(path), sorted(besides)
        places = (
            f"(path IN ({','.join('?' * len(ways))}) OR (path > ? AND path < ?)) "
            f"AND path NOT IN ({','.join('?' * len(left))})"
        )
        found = self._c.execute(
            f"SELECT path, version, writer, 0 FROM files WHERE present = 1 AND {places} "
            f"UNION ALL SELECT path, version, agent, 1 FROM intents WHERE present = 1 AND {places} LIMIT 1",
            (*ways, path + "/", path + "0", *left) * 2,
        ).fetchone()
        return None if found is None else InTheWay(found[0], found[1], found[2], bool(found[3]))

    def deleted_in(self, directory: str) -> list[FileRecord]:
        prefix = f"{directory}/" if directory else ""
        rows = self._c.execute(
            f"SELECT {_FILE_COLS} FROM files WHERE present = 0 AND path >= ? AND path < ? "
            "AND instr(substr(path, ?), '/') = 0",
            (prefix, prefix + "\U0010ffff", len(prefix) + 1),
        )
        return [_record(row) for row in rows]

    def history_paths(self) -> list[str]:
        return [row[0] for row in self._c.execute("SELECT DISTINCT path FROM versions WHERE pruned = 0")]

    def retained(self, path: str) -> list[Version]:
        rows = self._c.execute(
            f"SELECT {_VERSION_COLS} FROM versions WHERE path = ? AND pruned = 0 AND hash IS NOT NULL ORDER BY version",
            (path,),
        )
        return [_version(row) for row in rows]

    def viewers(self, path: str) -> dict[str, int]:
        return dict(self._c.execute("SELECT agent, version FROM views WHERE path = ?", (path,)).fetchall())

    def last_view(self, agent: str) -> float | None:
        row = self._c.execute("SELECT max(read_at) FROM views WHERE agent = ?", (agent,)).fetchone()
        return None if row[0] is None else float(row[0])

    def prune(self, path: str, version: int) -> None:
        self._c.execute("UPDATE versions SET pruned = 1 WHERE path = ? AND version = ?", (path, version))

    def in_use(self, digest: str) -> bool:
        return (
            self._c.execute("SELECT 1 FROM versions WHERE hash = ? AND pruned = 0 LIMIT 1", (digest,)).fetchone()
            is not None
            or self._c.execute("SELECT 1 FROM intents WHERE hash = ? LIMIT 1", (digest,)).fetchone() is not None
        )

    def retained_bytes(self) -> int:
        return self.stored()[1]

    def store(self, digest: str | None, source: bytes | int) -> str:
        return objects.put(self._c, digest, source)

    def load(self, digest: str, what: str) -> bytes:
        return objects.get(self._c, digest, what)

    def load_into(self, digest: str, what: str, write: Callable[[bytes], object]) -> int:
        return objects.copy(self._c, digest, what, write)

    def drop(self, digest: str) -> int:
        return objects.drop(self._c, digest)

    def stored(self) -> tuple[int, int]:
        return objects.size(self._c)

    def content_size(self, digest: str) -> int | None:
        return objects.size_of(self._c, digest)

    def meta(self, key: str) -> str | None:
        row = self._c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_meta(self, key: str, value: str) -> None:
        self._c.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def history(self, path: str, limit: int | None = None) -> list[Version]:
        rows = self._c.execute(
            f"SELECT {_VERSION_COLS} FROM versions WHERE path = ? ORDER BY version DESC LIMIT ?",
            (path, -1 if limit is None else limit),
        )
        return [_version(row) for row in rows]

    def version_entry(self, path: str, version: int) -> Version | None:
        row = self._c.execute(
            f"SELECT {_VERSION_COLS} FROM versions WHERE path = ? AND version = ?", (path, version)
        ).fetchone()
        return None if row is None else _version(row)

    def put_file(self, r: FileRecord) -> None:
        fp = r.fingerprint
        stat = (None, None, None, None) if fp is None else (_ino_to_sql(fp.ino), fp.size, fp.mtime_ns, fp.ctime_ns)
        self._c.execute(
            _PUT_FILE, (r.path, r.version, int(r.present), r.hash, *stat, r.writer, r.committed_at, r.checked_ns)
        )

    def touch_file(self, path: str, r: FileRecord) -> None:
        fp = r.fingerprint
        assert fp is not None
        self._c.execute(
            "UPDATE files SET ino = ?, size = ?, mtime_ns = ?, ctime_ns = ?, checked_ns = ? WHERE path = ?",
            (_ino_to_sql(fp.ino), fp.size, fp.mtime_ns, fp.ctime_ns, r.checked_ns, path),
        )

    def view(self, agent: str, path: str) -> int | None:
        row = self._c.execute("SELECT version FROM views WHERE agent = ? AND path = ?", (agent, path)).fetchone()
        return None if row is None else row[0]

    def put_view(self, agent: str, path: str, version: int, at: float) -> None:
        self._c.execute(
            "INSERT INTO views (agent, path, version, read_at) VALUES (?,?,?,?) "
            "ON CONFLICT (agent, path) DO UPDATE SET version = excluded.version, read_at = excluded.read_at",
            (agent, path, version, at),
        )

    def drop_view(self, agent: str, path: str) -> None:
        self._c.execute("DELETE FROM views WHERE agent = ? AND path = ?", (agent, path))

    def drop_views(self, agent: str) -> int:
        return self._c.execute("DELETE FROM views WHERE agent = ?", (agent,)).rowcount

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
        return list(
            self._c.execute(
                "SELECT v.path, v.version, f.version FROM views v JOIN files f ON f.path = v.path "
                "WHERE v.agent = ? AND f.version != v.version ORDER BY v.path",
                (agent,),
            )
        )

    def grant(self, path: str) -> Grant | None:
        row = self._c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE path = ?", (path,)).fetchone()
        return None if row is None else _grant(row)

    def grants(self, paths: Iterable[str] | None = None) -> list[Grant]:
        found = [_grant(r) for r in self._c.execute(f"SELECT {_GRANT_COLS} FROM grants ORDER BY path")]
        wanted = None if paths is None else set(paths)
        return found if wanted is None else [g for g in found if g.path in wanted]

    def put_grant(self, g: Grant) -> None:
        self._c.execute(
            f"INSERT OR REPLACE INTO grants ({_GRANT_COLS}) VALUES (?,?,?,?,?,?,?,?)",
            (g.path, g.agent, g.token, g.owner.host, g.owner.pid, g.owner.start, g.expires_at, int(g.fences)),
        )

    def drop_grant(self, path: str) -> None:
        self._c.execute("DELETE FROM grants WHERE path = ?", (path,))

    def bind(self, agent: str, process: ProcessId, pinned: bool, at: float) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO sessions (agent, host, pid, start, pinned, at) VALUES (?,?,?,?,?,?)",
            (agent, process.host, process.pid, process.start, int(pinned), at),
        )

    def unbind(self, agent: str) -> None:
        self._c.execute("DELETE FROM sessions WHERE agent = ?", (agent,))

    def bound_agent(self, process: ProcessId) -> tuple[str, bool] | None:
        row = self._c.execute(
            "SELECT agent, pinned FROM sessions WHERE host = ? AND pid = ? AND start = ?",
            (process.host, process.pid, process.start),
        ).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def bound_agents(self, processes: Sequence[ProcessId]) -> dict[ProcessId, tuple[str, bool]]:
        if not processes:
            return {}
        wanted = set(processes)
        marks = ",".join("?" * len(wanted))
        rows = self._c.execute(  # one host's processes, as a process's ancestors are
            f"SELECT host, pid, start, agent, pinned FROM sessions WHERE host = ? AND pid IN ({marks})",
            [processes[0].host, *(p.pid for p in wanted)],
        )
        found = ((ProcessId(host, pid, start), (agent, bool(pinned))) for host, pid, start, agent, pinned in rows)
        return {p: bound for p, bound in found if p in wanted}

    def bound_process(self, agent: str) -> ProcessId | None:
        row = self._c.execute("SELECT host, pid, start FROM sessions WHERE agent = ?", (agent,)).fetchone()
        return None if row is None else ProcessId(row[0], row[1], row[2])

    def pinned(self, agent: str) -> bool:
        row = self._c.execute("SELECT pinned FROM sessions WHERE agent = ?", (agent,)).fetchone()
        return bool(row and row[0])

    def grants_of(self, agent: str) -> list[Grant]:
        return [_grant(r) for r in self._c.execute(f"SELECT {_GRANT_COLS} FROM grants WHERE agent = ?", (agent,))]

    def fenced(self, agent: str, path: str) -> bool:
        return (
            self._c.execute("SELECT 1 FROM fences WHERE agent = ? AND path = ?", (agent, path)).fetchone() is not None
        )

    def put_fence(self, agent: str, path: str, at: float) -> None:
        self._c.execute("INSERT OR REPLACE INTO fences (agent, path, at) VALUES (?,?,?)", (agent, path, at))

    def drop_fence(self, agent: str, path: str) -> None:
        self._c.execute("DELETE FROM fences WHERE agent = ? AND path = ?", (agent, path))

    def intents(self, paths: Iterable[str] | None = None) -> list[Intent]:
        found = [
            Intent(r[0], r[1], r[2], bool(r[3]), r[4], r[5])
            for r in self._c.execute("SELECT path, agent, version, present, hash, tmp FROM intents")
        ]
        wanted = None if paths is None else set(paths)
        return found if wanted is None else [i for i in found if i.path in wanted]

    def put_intent(self, i: Intent) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO intents (path, agent, version, present, hash, tmp) VALUES (?,?,?,?,?,?)",
            (i.path, i.agent, i.version, int(i.present), i.hash, i.tmp),
        )

    def drop_intent(self, path: str) -> None:
        self._c.execute("DELETE FROM intents WHERE path = ?", (path,))

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
        self._c.execute(
            "INSERT INTO events (at, kind, path, agent, reason, seen_version, version, detail) "
            "VALUES (?,?,?,?,?,?,?,?)",
            (at, kind, path, agent, reason, seen_version, version, detail),
        )

    def events(
        self,
        after: int = 0,
        path: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Event]:
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

    def log_mark(self) -> LogMark:
        row = self._c.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        return LogMark(int(row[0]) + 1)

    def events_since(self, mark: LogMark) -> tuple[list[Event], LogMark]:
        """Lines by `seq`, which is their commit order: write transactions are serial."""
        found = self.events(after=mark.below - 1)
        return found, LogMark(found[-1].seq + 1) if found else mark

    def files(self) -> Iterator[FileRecord]:
        for row in self._c.execute(f"SELECT {_FILE_COLS} FROM files ORDER BY path"):
            yield _record(row)

    def agents(self) -> list[AgentSummary]:
        rows = self._c.execute(
            "SELECT v.agent, count(*), sum(f.version IS NOT NULL AND f.version != v.version), max(v.read_at) "
            "FROM views v LEFT JOIN files f ON f.path = v.path GROUP BY v.agent ORDER BY v.agent"
        )
        return [AgentSummary(a, n, int(s or 0), last) for a, n, s, last in rows]


# ---- locks: bounded waits, and what to say when one runs out --------------------------------


def _flock_holders(fd: int) -> list[int]:
    """Pids that /proc/locks says hold an flock on the file open at `fd`, as this PID namespace
    numbers them (0 or less: a process it cannot see). Empty if /proc/locks does not tell."""
    st = os.fstat(fd)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key:
                    pids.append(int(fields[4]))
    except (OSError, ValueError):
        return []
    return pids


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _openers(path: str) -> list[int]:
    """Other processes with `path` open (those whose /proc/PID/fd this process may read)."""
    target = os.path.realpath(path)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") == target:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return found


def _who_holds(fd: int, path: str) -> str:
    """What /proc says about the holder of the flock on `path` (open at `fd`): facts only."""
    holders = _flock_holders(fd)
    if not holders and pid_namespace_inode() != INITIAL_PID_NAMESPACE:
        return (
            "held by a process outside this one's PID namespace (this process runs in a PID namespace of its own, "
            "a container's, where /proc/locks leaves out the locks of processes outside it)"
        )
    if not holders:
        return "/proc/locks does not say which process holds it"
    live = [p for p in holders if p > 0 and start_time(p) is not None]
    if live:
        return "held by " + ", ".join(f"pid {p} ({_comm(p)})" for p in live) + " according to /proc/locks"
    if all(p <= 0 for p in holders):
        return "held by a process in another PID namespace according to /proc/locks"
    openers = _openers(path)
    return (
        f"/proc/locks names pid {', '.join(map(str, holders))}, which has exited: the lock lives on in a copy "
        "of its open file that another process inherited (a child forked without exec keeps it until it "
        "exits or closes it); processes that have the lock file open: "
        + (", ".join(f"pid {p} ({_comm(p)})" for p in openers) or "none this process can see")
    )


SQLITE_HEADER = 100
"""Bytes of the header every SQLite database file begins with."""


def _flock_within(fd: int, operation: int, path: str, what: str, timeout: float, started: float) -> None:
    """Take flock `operation` (LOCK_EX or LOCK_SH) on `fd`, polling with short growing sleeps, by
    `started + timeout` (time.monotonic()); past that, RegistryError(EBUSY) saying what happened."""

    def take() -> bool:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    poll(
        take,
        started + timeout,
        lambda: RegistryError(
            f"{what} {path!r} stayed held by another process for the {time.monotonic() - started:.1f} s this "
            f"process waited (the limit is {timeout:g} s); {_who_holds(fd, path)}. Nothing was changed. "
            f"If the holder is stuck, stop it (`fuser -v {path}` lists every process that has the file open); "
            "then try again",
            errno.EBUSY,
        ),
    )


_Identity = tuple[tuple[int, int] | None, ...]
"""(device, inode) of a registry's database, write-ahead log and shared-memory index."""

_PARKED: dict[tuple[int, int], sqlite3.Connection] = {}
"""Connections to registry databases whose write-ahead log was replaced under them, by the
database's (device, inode): never closed (`_park`)."""


def _park(database: tuple[int, int], conn: sqlite3.Connection) -> None:
    """Keep `conn` open until the process ends, never closed even then: the last connection to its
    write-ahead log, it would checkpoint that log at its close and cut the database file to the
    size it knew, over what other processes committed since. SQLite shares a process's state of a
    database among its connections, so this process opens that database no more (`_connect`)."""
    _PARKED[database] = conn
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))  # never freed, so never closed, at exit either


_OPEN: weakref.WeakSet[SQLiteRegistry] = weakref.WeakSet()
_INHERITED: list[sqlite3.Connection] = []
"""SQLite connections a forked child inherited and could not close harmlessly (`_closed_inherited`):
never used, never closed (closing one could checkpoint or remove the parent's write-ahead log),
gone when the child exits."""


_AT_FORK = threading.local()
"""`held`: the registries' mutexes the forking thread holds from just before a fork until just
after it (its own: two threads may fork at once)."""

FORK_WAIT = BUSY_TIMEOUT_MS / 1000
"""Seconds a fork waits, at most, for other threads' registry transactions to end."""


def _before_fork() -> None:
    """Let no other thread be inside a registry transaction while the process forks: SQLite keeps
    the locks a connection holds in process memory, which a child copies, so a transaction under
    way at the fork left the child's own connections waiting for a lock nobody holds (and then
    told it another process held it). Waits at most FORK_WAIT s in all."""
    deadline = time.monotonic() + FORK_WAIT
    held = _AT_FORK.held = []
    for registry in list(_OPEN):
        mutex = registry._mutex
        if mutex.acquire(timeout=max(0.0, deadline - time.monotonic())):
            held.append(mutex)


def _after_fork_in_parent() -> None:
    held = getattr(_AT_FORK, "held", [])
    while held:
        held.pop().release()


_SHARED_BYTES = (0x40000002, 510)
"""Where SQLite's unix VFS takes a database's shared and exclusive locks (SHARED_FIRST, SHARED_SIZE)."""


def _closed_inherited(path: str, conn: sqlite3.Connection) -> bool:
    """Close a connection a forked child inherited, unless that cannot be made harmless; whether it
    was. Kept open, it left SQLite's state of the database in this process saying it held the
    parent's locks, so the child's own connections took none in the kernel: another process's
    close then counted as the last, checkpointed and removed the write-ahead log under the child,
    whose commits went into the removed log (acknowledged, then lost). Its close must not
    checkpoint either (the log it knew may be stale): an open file description lock on the
    database's shared-lock bytes, which this process's own POSIX locks do not pass, keeps the
    close from taking the exclusive lock a checkpoint needs; the description is then closed, before
    the child holds any lock of its own on the file."""
    if conn.in_transaction:  # forked inside its transaction: the child leaves that block on it
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, *_SHARED_BYTES, 0))
        except OSError:  # (a writer holds them exclusively right now: keep it unclosed)
            return False
        conn.close()
        return True
    finally:
        os.close(fd)


def _after_fork_in_child() -> None:
    _AT_FORK.held = []  # the child's registries get mutexes of their own (`_forked`)
    for registry in list(_OPEN):
        registry._forked()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


class _CommitLock:
    """`SQLiteRegistry.commit_lock` (a class rather than a generator: every commit takes it twice).
    The outermost block of a thread's nested ones takes the flock and lets it go, whatever cuts a
    block short (a KeyboardInterrupt between its steps): before, an interrupt between the flock and
    the count of nested blocks left the flock held while the process sat idle, and every other
    process's commit waited 30 s and failed (/tmp/s33r2api 1)."""

    __slots__ = ("_registry", "_mutex", "_pid", "_took")

    def __init__(self, registry: SQLiteRegistry) -> None:
        self._registry = registry
        self._took = False

    def __enter__(self) -> None:
        registry = self._registry
        registry._connection()
        started, self._pid, self._mutex = time.monotonic(), os.getpid(), registry._commit_mutex
        if not self._mutex.acquire(timeout=COMMIT_LOCK_TIMEOUT):
            raise RegistryError(
                f"the commit lock {registry._lock_path!r} stayed held by another thread of this process for more "
                f"than {COMMIT_LOCK_TIMEOUT:g} s; nothing was changed: try again",
                errno.EBUSY,
            )
        try:
            if registry._commit_depth == 0:
                registry._lock_commits(started)
                self._took = True
                registry._commit_depth = 1
            else:
                registry._commit_depth += 1
        except BaseException:
            try:
                if registry._commit_depth == 0:  # (an interrupt right after the flock)
                    registry._unlock_commits()
            finally:
                self._took = False
                self._mutex.release()
            raise

    def __exit__(self, *exc: object) -> None:
        registry = self._registry
        try:
            if os.getpid() == self._pid and not self._took:  # a forked child has nothing to release
                registry._commit_depth -= 1
        finally:
            try:
                if os.getpid() == self._pid and self._took:  # the outermost block
                    registry._commit_depth = 0
                    registry._unlock_commits()
            finally:
                self._took = False
                self._mutex.release()


class _Transaction:
    """One transaction on a registry's connection, begun with `begin` (BEGIN: a read; BEGIN
    IMMEDIATE: a write), holding the registry's mutex: committed when its block ends, rolled back
    when the block raises. An SQLite error in it, in the block too, is raised as RegistryError
    (`SQLiteRegistry._error`). A class rather than a generator: every commit opens one."""

    __slots__ = ("_registry", "_begin", "_conn", "_started", "_mutex")

    def __init__(self, registry: SQLiteRegistry, begin: str) -> None:
        self._registry, self._begin = registry, begin

    def __enter__(self) -> SQLiteTransaction:
        registry = self._registry
        self._mutex = registry._mutex  # the one released at the end (a forked child gets a new one meanwhile)
        self._mutex.acquire()
        self._started = time.monotonic()
        try:
            self._conn = registry._connection()
            _cut_off(self._conn)  # one an interrupt left open (it holds SQLite's locks)
            self._conn.execute(self._begin)
            return SQLiteTransaction(self._conn)
        except BaseException as e:
            try:
                if hasattr(self, "_conn"):
                    _cut_off(self._conn)
            finally:
                self._mutex.release()
            if isinstance(e, sqlite3.DatabaseError):
                raise registry._error(e, self._started) from e
            raise

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        registry, conn = self._registry, self._conn
        try:
            if error is None:
                started = time.monotonic()
                try:
                    conn.execute("COMMIT")
                    return
                except sqlite3.DatabaseError as e:
                    error, self._started = e, started
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.DatabaseError as e:
                raise registry._error(e, self._started) from error
            if isinstance(error, sqlite3.DatabaseError):
                raise registry._error(error, self._started) from error
        finally:
            try:
                _cut_off(conn)  # an interrupt (KeyboardInterrupt) between its statements
            finally:
                self._mutex.release()


def _cut_off(conn: sqlite3.Connection) -> None:
    """Roll back a transaction of `conn` that was cut off before its end (a KeyboardInterrupt between
    its statements): left open, it kept SQLite's write lock, and every other process's writes
    waited for it and failed, and this connection refused every later transaction
    (/tmp/s33api 2)."""
    if conn.in_transaction:
        with suppress(sqlite3.DatabaseError):
            conn.execute("ROLLBACK")


class SQLiteRegistry:
    """The registry of the volume whose registry directory is `directory` (see registry.Registry)."""

    replica = None
    """The registry and the files share the root: no working copy of its own (`Registry.replica`)."""

    def __init__(self, directory: str, globs: ManagedGlobs | None) -> None:
        """Open the registry in `directory`, creating it if `globs` is given and none exists.

        Opening waits (at most OPEN_LOCK_TIMEOUT s) for a process that is creating it. Raises
        VolumeConfigError if `globs` differ from the stored ones, RegistryError if the registry is
        missing (and no globs were given), corrupt, of another schema version, or busy too long."""
        self._directory = directory
        self._path = os.path.join(directory, DB_FILE)
        self._lock_path = os.path.join(directory, LOCK_NAME)
        self._mutex = threading.RLock()
        self._commit_mutex = threading.RLock()
        self._commit_depth = 0
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._lock_fd = -1
        self._dir_fd = -1
        self._open_fd = -1
        self._identity: _Identity = ()
        """What this process's connection has open (`_look` when it connected)."""
        self._size = 0
        """The registry file's size when this process last looked (`_refuse_cut`)."""
        self._looking = threading.Lock()
        """Held around a look and what it is checked against, so that a size one thread saw is never
        checked against a later size another thread saw (a registry growing meanwhile looked cut)."""
        self._lost: RegistryError | RootGone | None = None
        """Why this process's connection was parked, for every later use of it (by any thread)."""
        _OPEN.add(self)  # from here on a fork closes this registry's descriptors in the child
        try:
            try:
                self._open(globs)
            except OSError as e:
                raise unusable(self._path, e) from e
        except BaseException:
            self.close()
            raise

    def _open(self, globs: ManagedGlobs | None) -> None:
        """`__init__`'s work: an OSError says what the operating system refused."""
        exists = self._exists()  # (looked at again under the open lock)
        if globs is None and not exists:
            raise self._no_volume()
        if exists and (refused := refusal(self._path)) is not None:
            # before any probe: SQLite's read-only connection makes the -wal and -shm a refused open
            # must not leave, with the registry's mode (read-only ones would refuse every later open)
            raise unusable(self._path, refused)
        self._refuse_emptied()
        if globs is not None:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
        with self._open_lock(exclusive=globs is not None and self._needs_creation()):
            if not self._exists():
                if globs is None:
                    raise self._no_volume()
                os.close(os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600))
                stored = None
            elif globs is None or os.path.getsize(self._path) > 0:
                stored = self._probe(complete=globs is None)
            else:
                stored = None  # an empty file left by a creator that died before writing the schema
            self._connect()
            self._globs = self._configure(globs, stored)
            self._migrate()

    def _refuse_emptied(self) -> None:
        """RegistryError, before SQLite opens anything, where the registry file has no database header
        while its write-ahead log holds commits (the file cut or emptied in place): SQLite's open
        would discard that log, and the commits in it, for good."""
        try:
            size, log = os.path.getsize(self._path), os.path.getsize(self._path + "-wal")
        except FileNotFoundError:
            return
        if size < SQLITE_HEADER and log > 0:
            raise RegistryError(
                f"registry {self._path!r} holds {size} bytes, no database, while its write-ahead log "
                f"{self._path + '-wal'!r} holds {log:,} bytes of commits: the file was cut or emptied in place. Both "
                "were left untouched (an open would discard the log). To fix: with nothing using the volume, put back "
                "a copy of the whole .coherent directory; or keep the log for salvage and move the three files aside "
                "to create the volume again"
            )

    def _no_volume(self) -> RegistryError:
        """Opening without managed globs where no registry is: what can be done there (a directory
        inside a volume names that volume's root)."""
        root = os.path.dirname(self._directory)
        if (above := volume_above(root)) is not None:
            return RegistryError(
                f"{root!r} is a directory inside the volume at {above!r}, not its root: give {above!r} "
                "(nothing was changed)"
            )
        return RegistryError(
            f"no volume at {root!r} (no registry at {self._path!r}): create one with managed globs "
            f"(`coherent-volume init {shlex.quote(root)} --managed GLOB`); a working copy of a volume kept in "
            "PostgreSQL whose .coherent directory was removed joins it again with `coherent-volume init "
            f"{shlex.quote(root)} --registry URL --volume NAME`"
        )

    def _exists(self) -> bool:
        """Whether the registry file exists (OSError if this process may not look: never taken for "no registry")."""
        try:
            os.stat(self._path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return True

    def _migrate(self) -> None:
        """Bring a registry of an older schema version to SCHEMA_VERSION in one write transaction
        (racing openers: the first migrates, the others find it done). From 1: the `versions` table
        if it predates history, the content tables with the objects that versions and intents name
        moved into them (`objects.import_files`), then the old objects directory goes. From 2: its
        larger contents cut into parts (`objects.split_rows`). Opening a current registry only
        reads (and looks for an objects directory a migration killed after its commit left behind)."""
        conn = self._connection()
        legacy = os.path.join(self._directory, LEGACY_OBJECTS_DIR)
        if self._schema_version(conn) == str(SCHEMA_VERSION):
            if os.path.isdir(legacy):
                objects.remove_files(legacy)
            return
        with _Transaction(self, "BEGIN IMMEDIATE") as tx:
            version = self._schema_version(conn)
            if version in MIGRATES_FROM:
                for statement in (*VERSIONS_DDL, *objects.CONTENTS_DDL):
                    conn.execute(statement)
                if version == "1":
                    named = {row[0] for row in conn.execute("SELECT hash FROM versions WHERE pruned = 0")}
                    named |= {i.hash for i in tx.intents() if i.hash is not None}
                    objects.import_files(conn, legacy, named)
                else:
                    objects.split_rows(conn)
                tx.put_meta("schema_version", str(SCHEMA_VERSION))
        objects.remove_files(legacy)

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> str | None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return None if row is None else str(row[0])

    def _needs_creation(self) -> bool:
        """Whether the file is missing or not yet a WAL database (or SQLite cannot tell: what is wrong
        is said under the open lock). Making it one (creating it, switching it to WAL) can fail at
        once under contention, without SQLite's busy wait, so it is done by one process at a time.
        Asked through SQLite, never by opening the file here: closing a descriptor of it would drop
        every POSIX lock this process holds on it, its SQLite connections' too (another process
        could then delete the write-ahead log under them, and their commits would be lost)."""
        if not self._exists():
            return True
        try:
            probe = sqlite3.connect(self._uri("ro"), uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                return bool(probe.execute("PRAGMA journal_mode").fetchone()[0] != "wal")
            finally:
                probe.close()
        except sqlite3.DatabaseError:
            return True

    def _uri(self, mode: str) -> str:
        """The registry's URI, opened in `mode` (its path quoted: a root's name may hold ? # %)."""
        return f"file:{urllib.parse.quote(self._path)}?mode={mode}"

    @contextmanager
    def _open_lock(self, exclusive: bool) -> Iterator[None]:
        """The open lock (an flock on a sibling file) for the duration of opening: exclusive
        while the registry may have to be created, shared otherwise."""
        path = os.path.join(self._directory, OPEN_LOCK_NAME)
        self._open_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock_within(
                self._open_fd,
                fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH,
                path,
                "the open lock of the registry",
                OPEN_LOCK_TIMEOUT,
                time.monotonic(),
            )
            yield
        finally:
            if self._open_fd >= 0:
                os.close(self._open_fd)  # releases it: this is the only descriptor of its open file
                self._open_fd = -1

    def _probe(self, complete: bool) -> ManagedGlobs | None:
        """Validate an existing registry read-only, before anything may write to it: integrity,
        schema version and, when `complete` (opening, not creating), its tables and stored globs."""
        started = time.monotonic()
        try:
            probe = sqlite3.connect(self._uri("ro"), uri=True, timeout=BUSY_TIMEOUT_MS / 1000)
            try:
                check = probe.execute("PRAGMA quick_check(1)").fetchone()[0]
                tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                meta = dict(probe.execute("SELECT key, value FROM meta")) if "meta" in tables else {}
            finally:
                probe.close()
        except sqlite3.DatabaseError as e:
            raise self._error(e, started) from e
        if check != "ok":
            raise self._damaged(f"quick_check: {check}")
        if "schema_version" in meta:
            self._check_schema(meta["schema_version"])
        if not complete:
            return None
        missing = sorted(REQUIRED_TABLES - tables)
        if missing:
            root = shlex.quote(os.path.dirname(self._directory))
            what = (
                "an empty file (a volume's creation that never finished)"
                if not tables
                else "another program's database"
            )
            raise RegistryError(
                f"{self._path!r} is not a coherent-volume registry, or a damaged one "
                f"(missing {', '.join(missing)}: {what}); it was left untouched. To fix: if it is nothing "
                f"you keep, move it aside with its -wal and -shm files, then make the volume with `coherent-volume "
                f"init {root} --managed GLOB` (the files in the root are taken in as they are)"
            )
        if "schema_version" not in meta or "globs" not in meta:
            raise RegistryError(
                f"registry {self._path!r} stores no schema version or managed globs; it was left untouched"
            )
        try:
            return ManagedGlobs.of(json.loads(meta["globs"]))
        except (ValueError, TypeError) as e:
            raise RegistryError(f"registry {self._path!r} stores unreadable managed globs ({e})") from e

    # -- connection management ------------------------------------------------------

    def _connect(self) -> None:
        """This process's connection and commit lock descriptor. SQLite opens a file it may not
        write read-only, without a word: that is refused here, saying why (`refusal`)."""
        started = time.monotonic()
        try:
            lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise unusable(self._path, e) from e
        try:
            dir_fd = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            os.close(lock_fd)
            raise unusable(self._path, e) from e
        try:
            if not os.access(self._path, os.R_OK | os.W_OK, effective_ids=True):
                raise unusable(self._path, refusal(self._path) or OSError(errno.EACCES, "not readable and writable"))
            before = file_identity(self._path)
            if before in _PARKED:
                raise self._replaced()
            conn = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise RegistryError(f"registry {self._path!r} could not be put in WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous = NORMAL")
                # a large registry stays in memory: lookups cost the same at 100 or 100,000 files. Not
                # mapped (mmap_size): a registry file cut or copied over in place (a backup restored
                # while a process uses it) killed that process with SIGBUS, where it gets an error
                conn.execute("PRAGMA cache_size = -32768")
                # versions' bytes pass through the WAL: after a checkpoint, a WAL a large one grew is cut back
                conn.execute("PRAGMA journal_size_limit = 67108864")
                # Debian's SQLite zeroes every page it frees: a prune of large versions wrote their
                # whole size again under the commit lock (100 MiB: 1.3 s; FAST: 0.12 s)
                conn.execute("PRAGMA secure_delete = FAST")
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # a read opens the log and index
                identity, size = self._look()
                if before is None or identity[0] != before or None in identity:  # replaced while it was opened
                    raise self._replaced()
            except BaseException:
                conn.close()
                raise
        except BaseException as e:
            os.close(lock_fd)
            os.close(dir_fd)
            if isinstance(e, sqlite3.DatabaseError):
                raise self._error(e, started) from e
            raise
        self._conn, self._lock_fd, self._dir_fd = conn, lock_fd, dir_fd
        self._pid, self._identity, self._size = os.getpid(), identity, size

    def _let_go_of_replaced(self, now: _Identity) -> None:
        """Where the database at the registry's path is still the one this process's connection has
        open but its write-ahead log or index is not (removed, another process made new ones), park
        the connection (`_park`): closing it would write its old log's view over the database. A
        database removed, moved or made anew is no one else's with this log: its connection closes."""
        if self._conn is not None and now[0] is not None and now[0] == self._identity[0] and now != self._identity:
            _park(now[0], self._conn)
            self._conn = None

    def _look(self) -> tuple[_Identity, int]:
        """What is at the registry's paths now, and the registry file's size (0 where it is missing):
        one stat of each file, on every use of the connection."""
        try:
            try:
                st = os.stat(self._path)
                registry, size = (st.st_dev, st.st_ino), st.st_size
            except (FileNotFoundError, NotADirectoryError):
                registry, size = None, 0
            return (registry, *(file_identity(self._path + suffix) for suffix in ("-wal", "-shm"))), size
        except OSError as e:  # (not allowed to look: that says nothing of what is there)
            raise unusable(self._path, e) from e

    def _replaced(self) -> RegistryError | RootGone:
        """The error of every use of a registry whose file was removed or replaced since this process
        connected to it: its commits would go where no other process looks (`root_gone` where the
        whole root went)."""
        root = os.path.dirname(self._directory)
        if not os.path.isdir(root):
            return root_gone(root)
        return RegistryError(
            f"the volume registry {self._path!r}, or its write-ahead log or index beside it, was removed or "
            f"replaced while this process had it open (its {os.path.basename(self._directory)} directory or "
            "files in it removed, moved or copied over, or the volume made anew): nothing was changed; this "
            "process no longer writes there, since no other process would see it: open the volume again "
            "(restart the program, the mount or the MCP server that had it open)",
            errno.EIO,
        )

    def _lock_commits(self, started: float) -> None:
        """Take the commit lock: the flock of the lock file, which processes of earlier releases
        take alone, then that of the registry's directory, which no removal of a file in it takes
        away (a lock file removed while held let the next process lock a new one beside it)."""
        _flock_within(self._lock_fd, fcntl.LOCK_EX, self._lock_path, "the commit lock", COMMIT_LOCK_TIMEOUT, started)
        try:
            _flock_within(self._dir_fd, fcntl.LOCK_EX, self._directory, "the commit lock", COMMIT_LOCK_TIMEOUT, started)
        except BaseException:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            raise

    def _unlock_commits(self) -> None:
        fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _let_go(self) -> None:
        """Let go of a connection and lock descriptors this process may not use (inherited
        through fork): the descriptors are closed, never unlocked (the open file is shared with the
        parent, and LOCK_UN would release the parent's lock); the connection is closed where its
        close can be kept from checkpointing (`_closed_inherited`), else kept, unused and unclosed,
        in _INHERITED."""
        for name in ("_lock_fd", "_dir_fd", "_open_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self._conn is not None:
            if not _closed_inherited(self._path, self._conn):
                _INHERITED.append(self._conn)
            self._conn = None
        self._pid = -1

    def _forked(self) -> None:
        """In a forked child: nothing of the parent's is used; the next use connects afresh."""
        self._let_go()
        self._mutex = threading.RLock()  # another thread of the parent may have held them
        self._looking = threading.Lock()
        self._commit_mutex = threading.RLock()
        self._commit_depth = 0

    def _connection(self) -> sqlite3.Connection:
        """This process's connection, to the registry files that are at their paths (else
        `_replaced`, the connection parked: `_park`)."""
        if self._pid != os.getpid():  # after a fork that ran no at-fork handler, or after close
            self._forked()
            self._connect()
        else:
            with self._looking:
                now, size = self._look()
                if now != self._identity:
                    self._let_go_of_replaced(now)
                    self._lost = self._replaced()
                    raise self._lost
                self._refuse_cut(size)
        conn = self._conn
        if conn is None:  # parked on another thread's finding
            assert self._lost is not None
            raise self._lost
        return conn

    def _refuse_cut(self, size: int) -> None:
        """RegistryError (damaged) where the registry file is now `size` bytes, shorter than this
        process last saw it: nothing here shrinks it (no VACUUM), so it was cut in place (a truncate,
        a copy over it), and a commit would go into a write-ahead log that the next open may discard
        with it."""
        if size < self._size:
            if self._conn is not None and self._identity[0] is not None:  # closed, it would checkpoint the
                _park(self._identity[0], self._conn)  # log into the cut file, and remove it
                self._conn = None
            self._lost = self._damaged(f"cut in place to {size:,} bytes while in use, from at least {self._size:,}")
            raise self._lost
        self._size = size

    def _configure(self, globs: ManagedGlobs | None, stored: ManagedGlobs | None) -> ManagedGlobs:
        """The volume's globs: the stored ones when opening; when creating (`globs` given), write the
        schema and the globs idempotently in one write transaction (racing creators converge) and
        insist they agree."""
        if globs is None:
            assert stored is not None
            return stored
        conn = self._connection()
        started = time.monotonic()
        try:
            # BEGIN IMMEDIATE takes the write lock first, with SQLite's busy wait: a transaction that
            # reads before it writes (as sqlite_utils' create does) gets SQLITE_BUSY at once instead
            conn.execute("BEGIN IMMEDIATE")
            try:
                import sqlite_utils  # only creation needs it: hooks open registries in ~0.1 s without it

                _create_schema(sqlite_utils.Database(conn))
                for key, value in (
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("globs", json.dumps(list(globs.patterns))),
                ):
                    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
                meta = dict(conn.execute("SELECT key, value FROM meta"))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as e:
            raise self._error(e, started) from e
        self._check_schema(meta.get("schema_version"))
        try:
            stored_globs = ManagedGlobs.of(json.loads(meta["globs"]))
        except (ValueError, TypeError) as e:
            raise RegistryError(f"registry {self._path!r} stores unreadable managed globs ({e})") from e
        if globs != stored_globs:
            raise OtherGlobs(stored_globs.patterns, globs.patterns)
        return stored_globs

    @property
    def globs(self) -> ManagedGlobs:
        return self._globs

    # -- locking and transactions ---------------------------------------------------

    def commit_lock(self, paths: Iterable[str] | None = None, whole_if_free: bool = False) -> _CommitLock:
        """Exclusive across threads and processes, over every path whatever `paths` asks (the
        registry is one file: its write transactions are serial anyway); re-entrant within a thread;
        freed if the process dies; waited for at most COMMIT_LOCK_TIMEOUT s, then RegistryError(EBUSY)."""
        return _CommitLock(self)

    def peek(self, path: str, agent: str) -> tuple[FileRecord | None, int | None]:
        """One consistent read of a file record and an agent's view of it (no explicit transaction)."""
        with self._mutex:
            started = time.monotonic()
            try:
                return SQLiteTransaction(self._connection()).file_and_view(path, agent)
            except sqlite3.DatabaseError as e:
                raise self._error(e, started) from e

    def _check_schema(self, version: str | None) -> None:
        """RegistryError unless `version` is a schema version this coherent-volume reads or migrates."""
        if version in {str(SCHEMA_VERSION), *MIGRATES_FROM}:
            return
        if version is not None and version.isdigit() and int(version) > SCHEMA_VERSION:
            remedy = "it was made by a newer coherent-volume: upgrade this one (the registry was left untouched)"
        else:
            remedy = "no coherent-volume writes that: the registry is damaged; it was left untouched"
        raise RegistryError(
            f"registry {self._path!r} has schema version {version!r}; this coherent-volume reads versions up to "
            f"{SCHEMA_VERSION}: {remedy}"
        )

    def _damaged(self, what: str) -> RegistryError:
        """The RegistryError for a registry file SQLite finds damaged, or not a database (`what`)."""
        return RegistryError(
            f"registry {self._path!r} is damaged, or is not a coherent-volume registry ({what}); it was left "
            f"untouched. Keep it: `sqlite3 {shlex.quote(self._path)} .recover | sqlite3 recovered.db` may salvage "
            "its versions. To go on without them, move it aside with its -wal and -shm files and create the volume "
            "again"
        )

    def _error(self, e: sqlite3.DatabaseError, started: float) -> RegistryError:
        """The RegistryError for SQLite error `e` of a step that began at `started` (time.monotonic()),
        told apart by its result code: locked (EBUSY; it claims a long wait only when that much time
        has passed), full (ENOSPC), damaged (`_damaged`), refused by the operating system (what
        `refusal` finds, with its errno), else failed."""
        code = getattr(e, "sqlite_errorcode", None)
        primary = None if code is None else code & 0xFF
        name = getattr(e, "sqlite_errorname", None) or "an SQLite error"
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            waited = time.monotonic() - started
            limit = BUSY_TIMEOUT_MS / 1000
            if waited >= limit:
                return RegistryError(
                    f"registry {self._path!r} stayed locked by another process for more than "
                    f"{limit:g} s ({waited:.1f} s); try again",
                    errno.EBUSY,
                )
            return RegistryError(
                f"registry {self._path!r} was locked by another process and SQLite gave up after {waited:.3f} s, "
                f"without its {limit:g} s busy wait ({name}: {e}; SQLite does not wait when a transaction that has "
                "read wants to write, or when waiting could deadlock); try again",
                errno.EBUSY,
            )
        # (a file system out of inodes is SQLITE_CANTOPEN)
        full = _no_room(os.path.dirname(self._path)) if primary in _MAY_BE_FULL else None
        if primary == sqlite3.SQLITE_FULL or full is not None:
            room = "" if full is None else f"; {full}"
            return RegistryError(
                f"registry {self._path!r}: the file system holding it is full ({name}: {e}{room}); free space there, "
                "then try again",
                errno.ENOSPC,
            )
        if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
            return self._damaged(f"{name}: {e}")
        if primary in _OS_LEVEL:
            cause = refusal(self._path)
            if cause is not None:
                return unusable(self._path, cause)
            if primary == sqlite3.SQLITE_CANTOPEN:
                return RegistryError(
                    f"registry {self._path!r}: SQLite could not open it or a file beside it ({name}: {e}), although "
                    "this process may read and write them and has descriptors to spare: a passing shortage, most "
                    "likely. It was left untouched and is not known to be damaged: try again"
                )
        return RegistryError(f"registry {self._path!r} failed ({name}: {e})")

    def read(self) -> _Transaction:
        return _Transaction(self, "BEGIN")

    def transact(self, fn: Callable[[SQLiteTransaction], R], holds: Iterable[str] = ()) -> R:
        """`Registry.transact`: `fn` runs once. BEGIN IMMEDIATE takes SQLite's write lock first (with
        its busy wait), so no SQLite error here is a conflict a re-run could resolve (`Retry`): each
        is a RegistryError."""
        return self._write(fn)

    def _write(self, fn: Callable[[SQLiteTransaction], R]) -> R:
        """`fn` run in one write transaction."""
        with _Transaction(self, "BEGIN IMMEDIATE") as tx:
            return fn(tx)

    def close(self) -> None:
        """Close the connection and the commit lock's descriptor (in a forked child that never used
        the registry: only let go of what it inherited)."""
        with self._mutex:
            if self._pid == os.getpid() and self._conn is not None:
                now, size = self._look()
                self._let_go_of_replaced(now)
                if now[0] is not None:  # a registry cut in place: its connection is parked, not closed
                    with suppress(RegistryError):
                        self._refuse_cut(size)
                if self._conn is not None:  # (not parked)
                    self._conn.close()
                    self._conn = None
            if self._pid == os.getpid():
                for name in ("_lock_fd", "_dir_fd"):
                    if getattr(self, name) >= 0:
                        os.close(getattr(self, name))
                        setattr(self, name, -1)
            self._let_go()
        _OPEN.discard(self)
