"""What a file on disk is: a cheap stat fingerprint and an xxhash of its content."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from typing import NamedTuple

import xxhash


def content_hash(data: bytes) -> str:
    """The content identity stored in the registry (xxh3, 128 bits, hex)."""
    return xxhash.xxh3_128_hexdigest(data)


class Fingerprint(NamedTuple):
    """Identity of one inode state. Every commit installs a new inode, so `ino` moves with it;
    foreign in-place writes move `ctime_ns`, which no user call can set back."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fingerprint_path(path: str) -> Fingerprint | None:
    """Fingerprint of the regular file at `path` (not following a final symlink); None if there is
    none. Anything else at `path` (a directory, a fifo, a symlink) holds no version: to the
    protocol the managed file is absent, so a file replaced by a directory reads as deleted."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return Fingerprint.of(st) if stat_mod.S_ISREG(st.st_mode) else None


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of what is at `path`, following symlinks; None where nothing is (a look the
    system refuses, EACCES, is raised: it says nothing of whether something is there)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino


def kind_of(mode: int) -> str:
    """What a file of `mode` (st_mode) is, for people: "a regular file", "a FIFO (named pipe)", ..."""
    kinds = (
        (stat_mod.S_ISREG, "a regular file"),
        (stat_mod.S_ISDIR, "a directory"),
        (stat_mod.S_ISLNK, "a symlink"),
        (stat_mod.S_ISFIFO, "a FIFO (named pipe)"),
        (stat_mod.S_ISSOCK, "a socket"),
        (stat_mod.S_ISCHR, "a character device"),
        (stat_mod.S_ISBLK, "a block device"),
    )
    return next((kind for test, kind in kinds if test(mode)), f"a file of type {stat_mod.S_IFMT(mode):#o}")


def not_regular(mode: int, name: str) -> OSError:
    """The error of reading `name` as a file when it is not a regular one (`mode`): EISDIR for a
    directory, else EINVAL saying what it is."""
    if stat_mod.S_ISDIR(mode):
        return IsADirectoryError(errno.EISDIR, "Is a directory", name)
    return OSError(errno.EINVAL, f"Not a regular file: it is {kind_of(mode)}, which has no content to read", name)


def absent(path: str, name: str) -> OSError:
    """The error of deleting a managed file that is not there (`path`, named `name`):
    FileNotFoundError, or EINVAL saying what is there instead when that is not a regular file (a
    FIFO, a socket: no managed content, so no version of it is deleted)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = None
    if mode is None or stat_mod.S_ISREG(mode):  # gone, or a file since, which the volume has not seen
        return FileNotFoundError(errno.ENOENT, "No such file or directory", name)
    return OSError(
        errno.EINVAL,
        f"Not a regular file: it is {kind_of(mode)}, not managed content, so the volume keeps no version of it to "
        "delete; remove it as you would outside the volume (rm)",
        name,
    )


READ_MAX = 0x7FFFF000
"""The most one read(2) returns on Linux, whatever was asked."""


def read_fd(fd: int, name: str) -> tuple[bytes, Fingerprint]:
    """Read a whole regular file from `fd` (which this closes); the fingerprint is of that inode
    as it was opened.

    The bytes are those of one inode, but a foreign in-place writer may still tear them; the
    caller pairs them with a version by hash."""
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise not_regular(st.st_mode, name)
        chunks = []
        total = 0
        want = st.st_size + 1  # a short read past the stat size is the end: no extra read to find EOF
        while True:
            asked = max(min(want, READ_MAX), 65536)
            chunk = os.read(fd, asked)
            chunks.append(chunk)
            total += len(chunk)
            if not chunk or (len(chunk) < asked and total >= st.st_size):
                break  # one read returns at most READ_MAX bytes: a short read before the size is no end
            want = max(st.st_size + 1 - total, 65536)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return data, Fingerprint.of(st)
    finally:
        os.close(fd)


def read_file(path: str) -> tuple[bytes, Fingerprint]:
    """Read a whole regular file, not following a final symlink; FileNotFoundError if absent,
    `not_regular`'s error if it is something else (a socket cannot even be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.ENXIO:
            raise
        raise not_regular(os.lstat(path).st_mode, path) from e
    return read_fd(fd, path)


CHUNK = 1 << 20
_ZEROS = bytes(CHUNK)


def data_runs(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The runs [begin, stop) of `fd`'s file within [start, end) that may hold data: everything else
    there is a hole, which reads as zeros (SEEK_DATA/SEEK_HOLE; a file system that tells no holes
    has one run). Moves the fd's position."""
    at = start
    while at < end:
        try:
            begin = os.lseek(fd, at, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # only a hole from `at` on
                return
            raise
        if begin >= end:
            return
        stop = min(os.lseek(fd, begin, os.SEEK_HOLE), end)
        yield begin, stop
        at = stop


def hash_fd(fd: int, size: int | None = None) -> str:
    """Content hash of the file behind `fd`, as far as it reaches (the fd's position is untouched);
    `size`: its size, when the caller has just taken it. A file of at most CHUNK bytes is read whole,
    in one read; a larger one a run of data at a time, its holes hashed as the zeros they read as
    without reading them."""
    if size is None:
        size = os.fstat(fd).st_size
    if size <= CHUNK:
        data = os.pread(fd, size, 0)
        return xxhash.xxh3_128_hexdigest(data if len(data) == size else data + bytes(size - len(data)))
    hasher = xxhash.xxh3_128()
    position = os.lseek(fd, 0, os.SEEK_CUR)
    offset = 0

    def zeros(upto: int) -> None:
        nonlocal offset
        while offset < upto:
            n = min(upto - offset, CHUNK)
            hasher.update(memoryview(_ZEROS)[:n])
            offset += n

    try:
        for begin, stop in data_runs(fd, 0, size):
            zeros(begin)
            while offset < stop and (chunk := os.pread(fd, min(CHUNK, stop - offset), offset)):
                hasher.update(chunk)
                offset += len(chunk)
        zeros(size)
    finally:
        os.lseek(fd, position, os.SEEK_SET)
    return hasher.hexdigest()


def open_to_check(path: str, follow: bool = False) -> int:
    """`path` open to read for a check (a symlink followed only if `follow`; never blocking on a
    FIFO), without moving its access time where this process may (O_NOATIME: the file's owner, or
    root): a check is no one's read."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        return os.open(path, flags | os.O_NOATIME)
    except PermissionError:
        return os.open(path, flags)


def hash_file(path: str) -> tuple[Fingerprint, str]:
    """Fingerprint and content hash of the regular file at `path` (not following a final symlink),
    read in chunks: memory stays flat whatever the file's size; its access time stays as it was
    (`open_to_check`). FileNotFoundError if absent."""
    fd = open_to_check(path)
    try:
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            raise not_regular(st.st_mode, path)
        return Fingerprint.of(st), hash_fd(fd, st.st_size)
    finally:
        os.close(fd)


def hash_path(path: str) -> str | None:
    """Content hash of the file at `path`, None if absent (streamed, see `hash_file`)."""
    try:
        return hash_file(path)[1]
    except FileNotFoundError:
        return None
