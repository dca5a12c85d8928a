"""The content store of the SQLite backend: every retained version's bytes in the registry, keyed by
their xxh3-128 hash, so identical content is stored once and is written in the same transaction as
the version (or commit intent) that names it.

Layout (schema version 3): a content is cut into parts of at most PART bytes; its first part is in
its `contents` row (hash, size, data), the others, in order, in `content_parts` (hash, part 1, 2, …).
Content that fits in one part (nearly every managed file) is one row; there is no cap but the disk,
and a content is read and written one part at a time, so memory stays bounded whatever its size.

Invariants:
- a `contents` row's key is the hash of the bytes it was written with: bytes are hashed while
  they are inserted (in one read of the source), and the `contents` row goes in last, only when
  the hash is the one expected (otherwise the parts already inserted are deleted again: nothing is
  stored); parts of content whose hash is not known yet wait under PENDING until it is;
- once a store has returned, parts exist only under a `contents` row (`drop` removes both);
- a read serves bytes only after checking all of them against their key; a part changed or
  missing is `DamagedContent` (typed, never served), never `VersionGone` (which means not retained);
- a store of content whose hash is stored already checks what is stored and replaces it (every
  part) if it is damaged, so a new version never names damaged bytes (one statement for new
  content of one part);
- content is exactly as durable as the registry (WAL, synchronous=NORMAL): a process killed at any
  instant leaves every committed row whole, and no row that its transaction did not commit.
"""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Iterator

import xxhash

from ..errors import DamagedContent, VersionGone

CONTENTS_DDL = (
    "CREATE TABLE IF NOT EXISTS contents (hash TEXT PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS content_parts (hash TEXT NOT NULL, part INTEGER NOT NULL, data BLOB NOT NULL, "
    "PRIMARY KEY (hash, part))",
)
PART = 1 << 20
"""Most bytes of one stored part (and of what a store or a read holds in memory at once, twice)."""
READ = 64 << 10
"""Bytes asked for by a read of a descriptor whose size says less is left (a file may grow while read)."""


def _read_parts(fd: int) -> Iterator[bytes]:
    """Everything readable from `fd` by offset, to its end as it is while read, in parts of at most
    PART bytes (each read asks for what fstat says is left, so a small file costs no large buffer)."""
    offset, size = 0, os.fstat(fd).st_size
    while chunk := os.pread(fd, min(PART, max(size - offset, READ)), offset):
        yield chunk
        offset += len(chunk)


def _slices(data: bytes) -> Iterator[memoryview]:
    """`data` in parts of at most PART bytes (no copies)."""
    view = memoryview(data)
    for start in range(0, len(data), PART):
        yield view[start : start + PART]


def _exists(conn: sqlite3.Connection, digest: str) -> bool:
    return conn.execute("SELECT 1 FROM contents WHERE hash = ?", (digest,)).fetchone() is not None


def _intact(conn: sqlite3.Connection, digest: str) -> bool:
    """Whether content is stored under `digest`, whole and hashing to it (read through, a part at a time)."""
    try:
        for _ in _parts(conn, digest, digest):
            pass
    except (VersionGone, DamagedContent):
        return False
    return True


def _remove(conn: sqlite3.Connection, digest: str) -> None:
    """Remove whatever is stored under `digest`, damaged or not, every part."""
    conn.execute("DELETE FROM contents WHERE hash = ?", (digest,))
    conn.execute("DELETE FROM content_parts WHERE hash = ?", (digest,))


PENDING = "~" * 32
"""The key under which the parts of content whose hash is not known yet are inserted: no hash is
spelled so, and it is as long as one, so re-keying them to their hash rewrites none of their bytes."""


def _insert(
    conn: sqlite3.Connection,
    parts: Iterable[bytes | memoryview],
    *,
    expected: str | None = None,
    key: str | None = None,
) -> str:
    """Store `parts` (one read of a content, in order), hashing them as they go: under their hash,
    which must be `expected` when that is given (the caller knows nothing is stored under it), or
    under `key` as they are (schema 1's objects); the hash of the bytes read. One read: a file
    changing meanwhile is stored as read. Bytes that do not hash to `expected`, content already
    stored intact under its hash, and anything this raises leave nothing more stored; damaged
    content under its hash is replaced."""
    pending = key or expected or PENDING
    hasher, size, inserted = xxhash.xxh3_128(), 0, False
    first: bytes | memoryview = b""
    try:
        for n, part in enumerate(parts):
            hasher.update(part)
            size += len(part)
            if n == 0:
                first = part
            else:
                conn.execute("INSERT INTO content_parts (hash, part, data) VALUES (?, ?, ?)", (pending, n, part))
                inserted = True
        got = hasher.hexdigest()
        final = key or got
        if expected is not None and got != expected:
            return got
        if pending == PENDING and _exists(conn, got):
            if _intact(conn, got):
                return got
            _remove(conn, got)
        if inserted and pending != final:
            conn.execute("UPDATE content_parts SET hash = ? WHERE hash = ?", (final, pending))
        conn.execute("INSERT INTO contents (hash, size, data) VALUES (?, ?, ?)", (final, size, first))
        inserted = False
        return got
    finally:
        if inserted:
            conn.execute("DELETE FROM content_parts WHERE hash = ?", (pending,))


def _changed(digest: str) -> OSError:
    return OSError(errno.EAGAIN, f"content changed while it was stored (expected {digest}); try again")


def put(conn: sqlite3.Connection, digest: str | None, source: bytes | int) -> str:
    """`Transaction.store` on `conn`'s open write transaction: a descriptor is read once, a part at
    a time (with `digest` None, what that read finds is stored under its hash). Content stored
    already under its hash is kept if intact, replaced if damaged."""
    if isinstance(source, int):
        parts = _read_parts(source)
        first = next(parts, b"")
        second = next(parts, None)
        if second is not None:
            return _put_parts(conn, digest, itertools.chain((first, second), parts))
        source = first  # all of it, in one part: stored as bytes are
    got = xxhash.xxh3_128_hexdigest(source)
    if digest is not None and got != digest:
        raise _changed(digest)
    if len(source) > PART:
        return _put_parts(conn, got, _slices(source))
    row = (got, len(source), source)  # new content: one row, one statement
    new = conn.execute("INSERT OR IGNORE INTO contents (hash, size, data) VALUES (?, ?, ?)", row).rowcount
    if not new and not _intact(conn, got):  # stored before (maybe in parts), and damaged
        _remove(conn, got)
        conn.execute("INSERT INTO contents (hash, size, data) VALUES (?, ?, ?)", row)
    return got


def _put_parts(conn: sqlite3.Connection, digest: str | None, parts: Iterable[bytes | memoryview]) -> str:
    """`put` of content of more than one part, read as it goes."""
    if digest is not None:
        if _intact(conn, digest):
            return digest
        _remove(conn, digest)
    got = _insert(conn, parts, expected=digest)
    if digest is not None and got != digest:
        raise _changed(digest)
    return got


def _parts(conn: sqlite3.Connection, digest: str, what: str) -> Iterator[bytes]:
    """The stored parts of `digest`, in order, unchecked; then DamagedContent if they are not all
    there or do not hash to it. VersionGone (before any part) if it is not stored."""
    row = conn.execute("SELECT size, data FROM contents WHERE hash = ?", (digest,)).fetchone()
    if row is None:
        raise VersionGone(f"{what}: its content is no longer retained (pruned)")
    size, first = row
    hasher, seen = xxhash.xxh3_128(first), len(first)
    yield bytes(first)
    for (part,) in conn.execute("SELECT data FROM content_parts WHERE hash = ? ORDER BY part", (digest,)):
        hasher.update(part)
        seen += len(part)
        yield bytes(part)
    if seen != size:
        raise DamagedContent(
            f"{what}: the stored content is damaged ({seen:,} bytes are stored, not its {size:,}); it is not served"
        )
    if hasher.hexdigest() != digest:
        raise DamagedContent(
            f"{what}: the stored content is damaged (it no longer hashes to {digest}); it is not served"
        )


def get(conn: sqlite3.Connection, digest: str, what: str) -> bytes:
    """The bytes stored under `digest`; VersionGone if none are, DamagedContent if they are not
    all there or do not hash to it. `what` names the version in errors."""
    return b"".join(_parts(conn, digest, what))


def copy(conn: sqlite3.Connection, digest: str, what: str, write: Callable[[bytes], object]) -> int:
    """Pass the bytes stored under `digest` to `write`, part by part; the bytes passed. Errors as
    `get`; DamagedContent may come after some parts were passed: the caller discards them."""
    total = 0
    for part in _parts(conn, digest, what):
        write(part)
        total += len(part)
    return total


def drop(conn: sqlite3.Connection, digest: str) -> int:
    """Remove the content stored under `digest`, every part of it; the bytes it freed (0 if none was stored)."""
    row = conn.execute("DELETE FROM contents WHERE hash = ? RETURNING size, length(data)", (digest,)).fetchone()
    if row is None:
        return 0
    if row[0] != row[1]:  # more than its first part
        conn.execute("DELETE FROM content_parts WHERE hash = ?", (digest,))
    return int(row[0])


def size_of(conn: sqlite3.Connection, digest: str) -> int | None:
    """The size the content stored under `digest` records (None: none is stored)."""
    row = conn.execute("SELECT size FROM contents WHERE hash = ?", (digest,)).fetchone()
    return None if row is None else int(row[0])


def size(conn: sqlite3.Connection) -> tuple[int, int]:
    """(contents, bytes) stored."""
    count, total = conn.execute("SELECT count(*), COALESCE(SUM(size), 0) FROM contents").fetchone()
    return int(count), int(total)


def import_files(conn: sqlite3.Connection, directory: str, named: set[str]) -> None:
    """Move schema version 1's store (one file per content, `directory`/<2 hex>/<hash>) into the
    content tables, in `conn`'s open write transaction: every object that `named` lists (a retained
    version or an intent names it), as it is, so a damaged one still reads as damaged; temporary
    files and objects nothing names were garbage and are left out. The caller removes `directory`
    (`remove_files`) once the transaction has committed."""
    for sub, _, names in os.walk(directory):
        for name in names:
            if name in named and not _exists(conn, name):
                fd = os.open(os.path.join(sub, name), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _insert(conn, _read_parts(fd), key=name)
                finally:
                    os.close(fd)


def split_rows(conn: sqlite3.Connection) -> None:
    """Bring schema version 2's store (each content whole in its `contents` row, of any size) to
    parts of at most PART bytes, in `conn`'s open write transaction, one part in memory at a time."""
    large = conn.execute("SELECT rowid, hash FROM contents WHERE length(data) > ?", (PART,)).fetchall()
    for rowid, digest in large:
        with conn.blobopen("contents", "data", rowid, readonly=True) as blob:
            first = blob.read(PART)
            n = 1
            while part := blob.read(PART):
                conn.execute("INSERT INTO content_parts (hash, part, data) VALUES (?, ?, ?)", (digest, n, part))
                n += 1
        conn.execute("UPDATE contents SET data = ? WHERE rowid = ?", (first, rowid))


def remove_files(directory: str) -> None:
    """Remove schema version 1's store directory, once `import_files` committed (idempotent)."""
    shutil.rmtree(directory, ignore_errors=True)
