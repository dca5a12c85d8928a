"""One working copy's own state, for a volume whose registry holds the content (PostgreSQL): which
version of each managed path this copy holds on its disk, with the file's stat fingerprint then.

Kept in ROOT/.coherent/replica.db (SQLite, on the working copy's own disk) and never in the shared
registry: a stat fingerprint means nothing on another host.

Invariants:
- a row (path, version, hash, fingerprint) says this copy's disk held exactly that version's bytes
  (hash None: no file) when it was written; rows change only after the disk did (an install) or
  after the registry transaction recording what the disk holds committed (`PostgresTransaction`);
- every change of a managed file of this copy by the volume (a commit's install, a catch-up)
  happens under the registry's commit lock of its path (`copy_locks`, byte ranges of
  ROOT/.coherent/replica.lock): serial per path across the host's threads and processes (and
  containers sharing the root on one kernel: the locks work across PID namespaces), and held by the
  live thread whatever becomes of its database sessions;
- replica.db is written by several threads and processes at once: one connection per process,
  its statements serialised by a mutex; across processes SQLite's WAL, each write one short
  statement or transaction, waited for at most 30 s (the connection's busy timeout) when another
  process writes;
- the replica's id (`cv_replicas` in the registry) is recorded here once with the identity
  (st_dev, st_ino) of the directory it was made in: a copy of the directory (`cp -a`, a restored
  backup) carries the id along but not the identity, and is refused (`identity_problem`);
- `reported` is the version of the path the registry was last told this copy holds
  (`cv_replica_holds`, see pg_hosts); a row whose `reported` is not its `version` is a pending
  report, sent with the next one (`unreported`, `reported`; one report of the copy at a time);
- a replica.db SQLite finds no database or damaged, or one that holds none of this state (an empty
  file), is found so read-only (`damage`) before anything writes to it, and refused at open;
- `replica_aside` names, before a catch-up changes the disk, where the file it takes away will be
  (the temp name of its exchange, or where a deletion sets the file aside) and the hash of what
  the catch-up brings (None: a deletion); a commit's install, deletion or rename through the
  volume notes too what the copy recorded holding there before it (`held`, `held_before`); so
  does a save by rename (`Renames._install_rename`:
  the temp name it moves its source to, the source's hash), whose intent another copy may
  complete; a row goes once that file is settled (`set_back`): it outlives the change only if
  its process died or its transaction failed before that, or a directory made at the name stopped
  its put back (`CoreBase._set_back`), and is settled by the next transaction holding the path
  (`CoreBase._settle_asides`; after the recovery of an intent naming it), whichever process runs
  it;
- a forked child opens its own connection, and has a mutex of its own; inode numbers >= 2**63 are
  stored wrapped to signed.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
import weakref

from .. import atomic
from ..fingerprint import Fingerprint, fingerprint_path
from ..protocol import Installed

DB_FILE = "replica.db"
LOCK_FILE = "replica.lock"
_INO_RANGE = 2**64
_DDL = (
    "CREATE TABLE IF NOT EXISTS replica_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS replica_files (path TEXT PRIMARY KEY, version INTEGER NOT NULL, hash TEXT, "
    "ino INTEGER, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, checked_ns INTEGER NOT NULL, reported INTEGER)",
    "CREATE TABLE IF NOT EXISTS replica_aside (path TEXT NOT NULL, name TEXT NOT NULL, brought TEXT, held TEXT, "
    "PRIMARY KEY (path, name))",
)
_UNREPORTED = "CREATE INDEX IF NOT EXISTS replica_unreported ON replica_files (path) WHERE reported IS NOT version"


INSTALLED_MODE = 0o644
"""The mode of a file new to a working copy (and, with search bits, of directories made for it),
less the installing process's umask: the registry keeps no modes, and a mount daemon runs with
umask 0, so nothing installed is ever group- or world-writable."""


_INHERITED: list[sqlite3.Connection] = []
"""Connections a forked child inherited: kept, never closed (closing one could end its parent's locks)."""
_OPEN: weakref.WeakSet[Replica] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for replica in list(_OPEN):
        replica._mutex = threading.Lock()  # a thread of the parent (its report, a heartbeat) may have held it


os.register_at_fork(after_in_child=_after_fork_in_child)


def _add_column(conn: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    """Give a replica.db made before `column` of `table` the column, NULL in every row (`reported`:
    every row pending; `brought`: each file set aside is checked against the version held only;
    `held`: what the copy held there before the change is not known)."""
    if any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})")):
        return
    try:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    except sqlite3.OperationalError as e:
        # "duplicate column": another process added it meanwhile
        if "duplicate column" not in str(e):
            raise


def _ino_to_sql(ino: int) -> int:
    return ino - _INO_RANGE if ino >= _INO_RANGE // 2 else ino


class Replica:
    """The state of the working copy whose registry directory (ROOT/.coherent) is `directory`;
    thread-safe."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._mutex = threading.Lock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        _OPEN.add(self)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            if self._conn is not None:  # a forked child never uses, nor closes, its parent's connection
                _INHERITED.append(self._conn)
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            conn = sqlite3.connect(
                os.path.join(self.directory, DB_FILE), timeout=30, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            for statement in _DDL:
                conn.execute(statement)
            _add_column(conn, "replica_files", "reported", "INTEGER")
            _add_column(conn, "replica_aside", "brought", "TEXT")
            _add_column(conn, "replica_aside", "held", "TEXT")
            conn.execute(_UNREPORTED)
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def damage(self) -> str | None:
        """Why this copy's state file cannot be used (None: it can, or there is none yet): SQLite
        finds it no database, or damaged, or it holds none of this state (an empty file). Looked at
        read-only, so a file found so is left as it was."""
        path = os.path.join(self.directory, DB_FILE)
        if not os.path.exists(path):
            return None
        try:
            probe = sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=30)
            try:
                tables = {row[0] for row in probe.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                probe.close()
        except sqlite3.DatabaseError as e:
            code = getattr(e, "sqlite_errorcode", None)
            if code is None or code & 0xFF not in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                raise
            return f"SQLite finds it damaged, or no database ({getattr(e, 'sqlite_errorname', 'an SQLite error')}: {e})"
        if "replica_meta" not in tables:
            return "it holds no working copy's state (it is empty, or another file)"
        return None

    def recorded_id(self) -> uuid.UUID | None:
        """The id this copy is registered under (`cv_replicas`), None if none is recorded (nothing is
        created to find out)."""
        if not os.path.exists(os.path.join(self.directory, DB_FILE)):
            return None
        value = self.meta("replica")
        return None if value is None else uuid.UUID(value)

    def registered(self, replica_id: uuid.UUID) -> None:
        """Record the id this copy was registered under and the identity of the directory it was
        registered in; nothing it holds is reported under that id yet."""
        self.put_meta("directory", self.identity())
        with self._mutex:
            self._db().execute("UPDATE replica_files SET reported = NULL")
        self.put_meta("replica", str(replica_id))

    def identity(self) -> str:
        """The identity of the registry directory itself, "st_dev:st_ino": the same through every
        bind mount of it, different in any copy of it."""
        st = os.stat(self.directory)
        return f"{st.st_dev}:{st.st_ino}"

    def identity_problem(self) -> str | None:
        """Why this state may not be used for the directory it is in (None: it may): it was
        registered in another directory, of which this one is a copy. A state recorded before
        identities were (none recorded) is taken to be this directory's."""
        recorded = self.meta("directory")
        here = self.identity()
        if recorded is None or recorded == here:
            return None
        return (
            f"its {DB_FILE} was registered in another directory (st_dev:st_ino {recorded}; this one is {here}): "
            "it is a copy of a working copy (`cp -a`, a restored backup, or another directory put at its path), "
            "and a copy cannot share a working copy's registration"
        )

    def meta(self, key: str) -> str | None:
        with self._mutex:
            row = self._db().execute("SELECT value FROM replica_meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def put_meta(self, key: str, value: str) -> None:
        with self._mutex:
            self._db().execute("INSERT OR REPLACE INTO replica_meta (key, value) VALUES (?, ?)", (key, value))

    def installed(self, path: str) -> Installed | None:
        """What this copy holds of `path`, as last recorded; None if it never recorded it."""
        with self._mutex:
            row = (
                self._db()
                .execute(
                    "SELECT version, hash, ino, size, mtime_ns, ctime_ns, checked_ns FROM replica_files WHERE path = ?",
                    (path,),
                )
                .fetchone()
            )
        if row is None:
            return None
        version, digest, ino, size, mtime_ns, ctime_ns, checked_ns = row
        fp = None if ino is None else Fingerprint(ino + _INO_RANGE if ino < 0 else ino, size, mtime_ns, ctime_ns)
        return Installed(version, digest, fp, checked_ns)

    def record(self, path: str, held: Installed) -> None:
        """Record that this copy's disk holds `held` at `path`."""
        fp = held.fingerprint
        stat = (None, None, None, None) if fp is None else (_ino_to_sql(fp.ino), fp.size, fp.mtime_ns, fp.ctime_ns)
        with self._mutex:
            self._db().execute(
                "INSERT INTO replica_files (path, version, hash, ino, size, mtime_ns, ctime_ns, checked_ns) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET version = excluded.version, "
                "hash = excluded.hash, ino = excluded.ino, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "ctime_ns = excluded.ctime_ns, checked_ns = excluded.checked_ns",
                (path, held.version, held.hash, *stat, held.checked_ns),
            )

    def setting_aside(self, path: str, name: str, brought: str | None, held: Installed | None = None) -> None:
        """Note, before the disk changes, that a catch-up of `path` bringing bytes hashing to
        `brought` (None: a deletion) may take its file away to `name`: by its directory's path now
        (`atomic.named`), never a name beneath this process's descriptor (`/proc/self/fd/N/...`),
        which another process settling the note would take for one of its own descriptors; for a
        commit's install (or a deletion or rename through the volume), what this copy recorded
        holding there before it (`held`: its `installed`, read before the change; None: it recorded
        nothing there)."""
        name = atomic.named(name)
        kept = None if held is None else (held.hash or "")  # "": it held no file there
        with self._mutex:
            self._db().execute(
                "INSERT OR REPLACE INTO replica_aside (path, name, brought, held) VALUES (?, ?, ?, ?)",
                (path, name, brought, kept),
            )

    def held_before(self, path: str, name: str) -> tuple[bool, str | None]:
        """What the note of a change that takes the file at `path` away to `name` says this copy
        held there before it: (known, its hash; None for no file). Not known: no note of that name
        (matched by its base name: another process may see the root elsewhere), or one made by a
        catch-up (which checks against `installed` itself) or before notes said it."""
        with self._mutex:
            rows = self._db().execute("SELECT name, held FROM replica_aside WHERE path = ?", (path,)).fetchall()
        base = os.path.basename(name)
        for noted, held in rows:
            if os.path.basename(str(noted)) == base and held is not None:
                return True, str(held) or None
        return False, None

    def set_back(self, path: str, name: str) -> None:
        """The file a catch-up of `path` took away to `name` is settled (removed, or put back)."""
        name = atomic.named(name)
        with self._mutex:
            self._db().execute("DELETE FROM replica_aside WHERE path = ? AND name = ?", (path, name))

    def asides(self) -> list[tuple[str, str, str | None]]:
        """(path, name, brought) of every file a catch-up took away that is not settled."""
        with self._mutex:
            rows = self._db().execute("SELECT path, name, brought FROM replica_aside").fetchall()
        return [(str(p), str(n), None if b is None else str(b)) for p, n, b in rows]

    def unreported(self) -> list[tuple[str, int]]:
        """(path, version) of every version this copy holds that the registry was not told yet."""
        with self._mutex:
            rows = self._db().execute("SELECT path, version FROM replica_files WHERE reported IS NOT version")
            return [(str(path), int(version)) for path, version in rows]

    def reported(self, holds: list[tuple[str, int]]) -> None:
        """Record that the registry now knows this copy holds `holds` ((path, version) each); a
        path whose version changed since stays pending."""
        with self._mutex:
            db = self._db()
            db.execute("BEGIN")
            try:
                db.executemany("UPDATE replica_files SET reported = version WHERE path = ? AND version = ?", holds)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def install(
        self, target: str, path: str, version: int, digest: str | None, data: bytes | None
    ) -> tuple[str, Fingerprint | None] | None:
        """Make this copy hold `version` of `path` (at `target` on disk): its bytes `data` (temp,
        fsync, exchanged with the file: `atomic.swap_in`) or, `data` None, no file (the file set
        aside: `atomic.set_aside`); then record it. Where the install took a file away, it is left at
        the name returned (noted first: `setting_aside`), with the fingerprint of the file installed
        (None for a deletion), and what this copy holds is for the caller to record (`holds`) and
        the note to drop (`set_back`). Called under the registry's commit lock of `path`."""
        brought = digest if data is not None else None
        if data is None:
            aside = atomic.temp_name(target)
            self.setting_aside(path, aside, brought)
            try:
                if atomic.set_aside(target, aside):
                    atomic.sync_dirs(target)
                    return aside, None
            except IsADirectoryError:
                if os.path.lexists(aside):  # moved back it was not: the error says where it is
                    raise
                # else a directory a program made there, left in place: no file, as the version brought
        else:
            staged = atomic.stage(target, data, INSTALLED_MODE, root=os.path.dirname(self.directory))
            aside = staged.plan_name()
            try:
                self.setting_aside(path, aside, brought)
                own = staged.fingerprint()
                if staged.install(exchange=True):
                    return aside, own
            finally:
                staged.discard()
        self.holds(target, path, version, brought)
        self.set_back(path, aside)
        return None

    def holds(self, target: str, path: str, version: int, digest: str | None) -> None:
        """Record that this copy's disk now holds `version` of `path` (at `target`): bytes hashing to
        `digest`, or with `digest` None no file. Called right after the disk changed, under the
        registry's commit lock of `path`."""
        fp = None if digest is None else fingerprint_path(target)
        self.record(path, Installed(version, digest, fp, time.time_ns()))

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None
