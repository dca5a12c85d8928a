"""Setting up volumes and looking at them only from outside: the public API, the CLI, and SQL on
the registry file (never coherent_volume's internals)."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from coherent_volume import CoherentVolume
from coherent_volume.globs import STAGED

from . import CLI, payload
from .history import Producer, Read, StoreAudit, StoredVersion

MANAGED = ("plans/**",)
SEED_AGENT = "harness-seed"


def registry_db(root: Path) -> Path:
    return root / ".coherent" / "registry.db"


def stored(root: Path, digest: str) -> bytes | None:
    """The bytes the content store keeps under the xxh3-128 hash `digest` (the registry's
    `contents` row, its first part, then its `content_parts` in order), None if it keeps none."""
    first = sql(root, "SELECT data FROM contents WHERE hash = ?", (digest,))
    if not first:
        return None
    rest = sql(root, "SELECT data FROM content_parts WHERE hash = ? ORDER BY part", (digest,))
    return b"".join(bytes(data) for (data,) in first + rest)


def tamper(root: Path, digest: str, data: bytes | None, part: int = 0) -> None:
    """Damage the content stored under `digest`: replace the bytes of its part `part` (0: the first,
    in its `contents` row) with `data` or, with `data` None, remove that part (part 0: the whole
    content, every part of it): what a failing disk or a careless hand could do to the registry file."""
    conn = sqlite3.connect(registry_db(root), timeout=30)
    try:
        with conn:
            if part == 0 and data is None:
                conn.execute("DELETE FROM contents WHERE hash = ?", (digest,))
                conn.execute("DELETE FROM content_parts WHERE hash = ?", (digest,))
            elif part == 0:
                conn.execute("UPDATE contents SET data = ? WHERE hash = ?", (data, digest))
            elif data is None:
                conn.execute("DELETE FROM content_parts WHERE hash = ? AND part = ?", (digest, part))
            else:
                conn.execute("UPDATE content_parts SET data = ? WHERE hash = ? AND part = ?", (data, digest, part))
    finally:
        conn.close()


def create(root: Path, managed: tuple[str, ...] = MANAGED) -> Path:
    """A new volume at `root` with a plans/ directory."""
    root.mkdir(parents=True, exist_ok=True)
    CoherentVolume(root, managed=managed, agent=SEED_AGENT).close()
    (root / "plans").mkdir(exist_ok=True)
    return root


def seed(root: Path, paths: list[str], count: int = 0) -> list[Producer]:
    """Put a seed payload in each path through the API; the producers record their versions."""
    out = []
    with CoherentVolume(root, agent=SEED_AGENT) as vol:
        for path in paths:
            token = payload.seed_token(path)
            version = vol.write(path, payload.make(token, "-", count))
            out.append(Producer("seed", path, token, count, version, time.time(), SEED_AGENT))
    return out


def read_log(root: Path) -> list[dict[str, Any]]:
    """The volume's whole log through the CLI, oldest first."""
    result = subprocess.run(
        [CLI, "log", str(root), "--json", "--limit", "1000000"], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:
        raise RuntimeError(f"coherent-volume log failed: {result.stderr.strip()}")
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def raw_read(root: Path, path: str) -> Read:
    """The backing file's bytes, read directly (not through the volume)."""
    try:
        return Read.of(path, (root / path).read_bytes())
    except OSError as e:  # gone (ENOENT), or a directory there now (renames), …
        return Read(path, error=errno.errorcode.get(e.errno or 0, type(e).__name__))


def final_state(root: Path, paths: list[str]) -> tuple[dict[str, Read], dict[str, int]]:
    """Final file contents (from disk) and versions (from a fresh volume handle)."""
    final = {p: raw_read(root, p) for p in paths}
    with CoherentVolume(root, agent="harness-final") as vol:
        versions = {p: vol.version(p) for p in paths}
    return final, versions


def integrity(root: Path) -> str:
    """SQLite's own verdict on the registry file ('ok' when sound)."""
    conn = sqlite3.connect(f"file:{registry_db(root)}?mode=ro", uri=True, timeout=30)
    try:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def sql(root: Path, query: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
    """A read-only query on the registry file."""
    conn = sqlite3.connect(f"file:{registry_db(root)}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(query, args))
    finally:
        conn.close()


def dump(root: Path) -> list[str]:
    """The registry's logical content (every table, every row), to show it did not change."""
    conn = sqlite3.connect(f"file:{registry_db(root)}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def agreement(root: Path, paths: list[str]) -> list[str]:
    """Registry and disk agree: a fresh read returns the disk's bytes, and the version the volume
    reports is the last one its log records (the log is read after, so a disagreement the read
    had to repair shows up as a version the log has and the caller's history lacks)."""
    from .resolve import log_versions

    problems, versions = [], {}
    with CoherentVolume(root, agent="harness-agreement") as vol:
        for path in paths:
            if vol.read(path) != (root / path).read_bytes():
                problems.append(f"{path}: a fresh read does not return the disk's bytes")
            versions[path] = vol.version(path)
    logged = log_versions(read_log(root))
    for path, version in versions.items():
        last = max(logged.get(path, {0: None}))
        if version != last:
            problems.append(f"{path}: the volume reports v{version}, its log ends at v{last}")
    return problems


def _stored(row: tuple[Any, ...], lookup: Callable[[str], bytes | None]) -> StoredVersion:
    """A `versions` row (path, version, kind, writer, hash, pruned) with its bytes as `lookup` finds
    them by hash, judged: none, pruned, missing, damaged or ok."""
    path, version, kind, writer, digest, pruned = row
    if digest is None:
        return StoredVersion(path, version, kind, writer, None, "none")
    if pruned:
        return StoredVersion(path, version, kind, writer, digest, "pruned")
    data = lookup(digest)
    if data is None:
        return StoredVersion(path, version, kind, writer, digest, "missing")
    state = "ok" if xxhash.xxh3_128_hexdigest(data) == digest else "damaged"
    return StoredVersion(path, version, kind, writer, digest, state, Read.of(path, data))


def _disk(audit: StoreAudit, root: Path, paths: list[str]) -> None:
    """The hash of each of `paths`' bytes under `root` now (None: gone, or a directory there)."""
    for path in paths:
        try:
            audit.disk[path] = xxhash.xxh3_128_hexdigest((root / path).read_bytes())
        except OSError:
            audit.disk[path] = None


def audit_pg_store(query: Callable[[str], list[tuple[Any, ...]]], root: Path, paths: list[str]) -> StoreAudit:
    """`audit_store` for a PostgreSQL volume, read with `query` (SQL on its database): every
    `cv_versions` row with its bytes (`cv_contents` and its `cv_content_parts` in order) hashed
    here, the `cv_files` records, and the hash of `paths`' bytes in the working copy at `root`."""
    stored = {digest: bytes(data) for digest, data in query("SELECT hash, data FROM cv_contents")}
    for digest, data in query("SELECT hash, data FROM cv_content_parts ORDER BY hash, part"):
        if digest in stored:
            stored[digest] += bytes(data)
    audit = StoreAudit()
    for row in query("SELECT path, version, kind, writer, hash, pruned FROM cv_versions ORDER BY path, version"):
        audit.versions.setdefault(row[0], {})[row[1]] = _stored(row, stored.get)
    audit.current = {p: (v, h) for p, v, h in query("SELECT path, version, hash FROM cv_files")}
    _disk(audit, root, paths)
    return audit


def audit_store(root: Path, paths: list[str]) -> StoreAudit:
    """The content store as an auditor sees it: every row of the `versions` table with its stored
    bytes (the `contents` and `content_parts` tables) read and hashed here (never through the
    volume), the `files` table's current record of each path, the hash of each of `paths`' bytes on
    disk now, and what nothing names (contents no version or intent names, parts of no content)."""
    audit = StoreAudit()
    for row in sql(root, "SELECT path, version, kind, writer, hash, pruned FROM versions ORDER BY path, version"):
        audit.versions.setdefault(row[0], {})[row[1]] = _stored(row, lambda digest: stored(root, digest))
    audit.current = {
        path: (version, digest) for path, version, digest in sql(root, "SELECT path, version, hash FROM files")
    }
    _disk(audit, root, paths)
    named = {row.hash for rows in audit.versions.values() for row in rows.values()}
    named |= {digest for (digest,) in sql(root, "SELECT hash FROM intents")}
    pending = {os.path.basename(tmp) for (tmp,) in sql(root, "SELECT tmp FROM intents WHERE tmp IS NOT NULL")}
    audit.temp_files = sum(
        1 for f in root.rglob("*") if STAGED.search(f.name) and f.name not in pending and f.is_file()
    )
    audit.unnamed_objects = sum(digest not in named for (digest,) in sql(root, "SELECT hash FROM contents")) + len(
        sql(root, "SELECT DISTINCT hash FROM content_parts WHERE hash NOT IN (SELECT hash FROM contents)")
    )
    return audit


def changed_after_read(root: Path, rel: str, read: Callable[[Path], object], before: str, after: str) -> Path:
    """`rel` written by a setup agent as `before`, read by `read` (an agent's read tool), then
    rewritten as `after` by bob, who read it: the reader's view is of a version bob's followed.
    The file's path."""
    target = root / rel
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(rel, before)
    read(target)
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(rel)
        bob.write(rel, after)
    return target


def deleted_after_read(root: Path, rel: str, read: Callable[[Path], object]) -> Path:
    """`rel` written by a setup agent, read by `read` (an agent's read tool), then deleted by a peer
    that read it: the reader's view is of a version a deletion followed. The file's path."""
    target = root / rel
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(rel, "v1\n")
    read(target)
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(rel)
        peer.delete(rel)
    return target
