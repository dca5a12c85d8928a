"""The content store of the SQLite backend: every retained version's bytes, one file per content,
named by its xxh3-128 hash under `.coherent/objects/`, so identical content is stored once.

Invariants:
- an object's name is the hash of the bytes it was written with: it is written under a temporary
  name while hashed, and renamed to its hash only when that hash is the one expected;
- a read returns bytes only after checking them against their name; anything else is
  `DamagedContent` (typed, never served);
- objects are not fsynced: a process killed at any instant leaves every renamed object whole
  (the page cache survives it); a power loss may leave one damaged, which a read then reports.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable

import xxhash

from ..errors import DamagedContent, VersionGone

CHUNK = 1 << 20


class ObjectStore:
    """Content-addressed files under one directory; safe for many processes at once."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def _path(self, digest: str) -> str:
        return os.path.join(self.directory, digest[:2], digest)

    def has(self, digest: str) -> bool:
        return os.path.exists(self._path(digest))

    def put(self, digest: str | None, source: bytes | int) -> str:
        """Retain `source` (bytes, or everything readable by offset from a descriptor) under
        `digest`, unless content with that hash is stored already; return the hash it is stored
        under. OSError(EAGAIN) if the bytes read do not hash to `digest` (a descriptor written to
        meanwhile): nothing is stored. With `digest` None, what is read is stored under its hash."""
        if digest is not None and os.path.exists(self._path(digest)):
            return digest
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # private, as the registry
        tmp = os.path.join(self.directory, f".tmp-{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            hasher = xxhash.xxh3_128()
            if isinstance(source, bytes):
                hasher.update(source)
                _write_all(fd, source)
            else:
                offset = 0
                while chunk := os.pread(source, CHUNK, offset):
                    hasher.update(chunk)
                    _write_all(fd, chunk)
                    offset += len(chunk)
            os.close(fd)
            fd = -1
            got = hasher.hexdigest()
            if digest is not None and got != digest:
                raise OSError(errno.EAGAIN, f"content changed while it was stored (expected {digest}); try again")
            path = self._path(got)
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            os.rename(tmp, path)
            return got
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def get(self, digest: str, what: str) -> bytes:
        """The bytes stored under `digest`; VersionGone if none are, DamagedContent if they do not
        hash to it. `what` names the version in errors."""
        try:
            with open(self._path(digest), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise VersionGone(f"{what}: its content is no longer retained (pruned)") from None
        if xxhash.xxh3_128_hexdigest(data) != digest:
            raise DamagedContent(
                f"{what}: the stored content is damaged (it no longer hashes to {digest}); it is not served. "
                f"The object is {self._path(digest)!r}"
            )
        return data

    def drop(self, digest: str) -> int:
        """Remove an object; the bytes it freed (0 if it was gone)."""
        path = self._path(digest)
        try:
            size = os.stat(path).st_size
            os.unlink(path)
        except FileNotFoundError:
            return 0
        return size

    def sweep(self, before: float, keep: Callable[[str], bool]) -> int:
        """Remove what a killed writer can leave: temporary files, and objects no version names
        (`keep` says which are named), both last changed before `before` (time.time()); the caller
        holds the commit lock, so no store is in flight. The bytes freed."""
        freed = 0
        for directory, _, names in os.walk(self.directory):
            for name in names:
                path = os.path.join(directory, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if st.st_mtime < before and (name.startswith(".tmp-") or not keep(name)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                        freed += st.st_size
        return freed

    def size(self) -> tuple[int, int]:
        """(objects, bytes) stored."""
        count = total = 0
        for directory, _, names in os.walk(self.directory):
            for name in names:
                if not name.startswith(".tmp-"):
                    count += 1
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(directory, name)).st_size
        return count, total


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
