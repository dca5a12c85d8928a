"""A small interpreter of system-call sequences, for the differential conformance test.

A sequence is a list of steps, each a list `[op, args...]` (JSON, so that it crosses a process
boundary), applied to a base directory: paths are relative to it, open files live in named slots
(`dup` gives a second slot the same open file description). Each step's outcome is normalised to
what a program can see and compare across file systems: the return value (bytes read as text,
offsets, counts, "ok") or the errno's name; for stat-like steps the visible fields (`type`,
`mode`, `size`, `nlink`, `uid`, `gid`) and which of the names the sequence used share the inode
right now (`same`), never raw inode numbers, nor atime/mtime/ctime unless the step sets them
(`utimensat` answers the times it set). After the last step every slot is closed and the base
directory is described whole (`tree`).

The same sequence is run on a plain directory and through the mount. The differences the mount
documents (docs/mount.md, "Differences from a local file system") are applied to the plain run as
`rules`, so that the plain run with rules is what the mount must answer, step for step:

- `fuse`, where FUSE differs (bindfs too): O_TMPFILE and fallocate fail EOPNOTSUPP;
  SEEK_DATA/SEEK_HOLE see a file as all data and SEEK_END of a directory gives its size; device
  nodes cannot be opened (nodev: EACCES); the pages of a shared writable mapping of a file opened
  O_APPEND are appended at writeback.
- `managed`, the protocol, when every name in the base directory is managed: hard links and
  symlinks are refused (EPERM). A write handle holds its agent's grant from its open (or its first
  write after a commit) to its next commit, made at a flush (a close) after it wrote, else at its
  last close; while one holds a file, another write open of it (unless both only append), a
  truncate by name, or an appending handle's ftruncate is refused (EACCES), and a handle written
  again after its commit is refused when the file moved on since. A read handle serves the version
  committed when it was opened, and its first read makes that its agent's view: when it was not
  the current one, the agent's next change of that name (but an append) is refused (EACCES).
  Renaming a file a write handle has unsaved changes for fails EBUSY; once renamed, writing
  through the handle fails ESTALE and the name it was opened by stays held until it closes. Shared
  mmap needs a read handle opened while every other handle of the file read its version (ENODEV
  otherwise); a change through the mount gives the name of a file such readers use a new inode,
  which leaves them the old one: their fstat and mmap answer for that inode and are not compared
  (NOT_COMPARED).

A refusal the mount decides after the kernel's own checks is applied the same way here: the
kernel's errors come first (the call is made and undone, or checked beforehand).

Runs as a server (`python -m tests.harness.conformance`: one JSON request per stdin line, one JSON
answer per stdout line) in a process of its own, so that the mount sees one agent
(`COHERENT_AGENT` in its environment). Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import select
import stat as stat_mod
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from . import REPO, child

Step = list[Any]
Outcome = Any

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD = -100
RENAME_FLAGS = {"": 0, "NOREPLACE": 1, "EXCHANGE": 2}
FALLOCATE_MODES = {"": 0, "KEEP_SIZE": 1, "PUNCH_HOLE": 3, "ZERO_RANGE": 0x10}
WHENCE = {"SET": os.SEEK_SET, "CUR": os.SEEK_CUR, "END": os.SEEK_END, "DATA": os.SEEK_DATA, "HOLE": os.SEEK_HOLE}
SHOWN_BYTES = 64
"""Data longer than this is shown as its length and digest."""
RULES = frozenset({"fuse", "managed"})
NOT_COMPARED = "<not compared: "
"""An outcome the documented differences leave open: the plain run answers this prefix and why."""


def flags_of(text: str) -> int:
    """ "O_RDWR|O_CREAT" -> the flags' value (an empty text is O_RDONLY)."""
    value = 0
    for name in filter(None, text.split("|")):
        value |= getattr(os, name)
    return value


def shown(data: bytes) -> str:
    if len(data) <= SHOWN_BYTES:
        return data.decode("latin-1")
    return f"<{len(data)} bytes sha1 {hashlib.sha1(data).hexdigest()[:16]}>"


def error(e: BaseException) -> str:
    """An errno's name (EOPNOTSUPP for ENOTSUP, its alias on Linux), else the exception's type."""
    if isinstance(e, OSError) and e.errno == errno.EOPNOTSUPP:
        return "EOPNOTSUPP"
    if isinstance(e, OSError) and e.errno:
        return errno.errorcode.get(e.errno, str(e.errno))
    return type(e).__name__


def _check(rc: int) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return rc


def kind(mode: int) -> str:
    for name in ("REG", "DIR", "LNK", "FIFO", "CHR", "BLK", "SOCK"):
        if getattr(stat_mod, f"S_IS{name}")(mode):
            return name.lower()
    return "?"


def _copy(fd: int) -> int:
    """A memfd holding the current content of the file `fd` is open on (for writing only, too)."""
    copy = os.memfd_create("committed", os.MFD_CLOEXEC)
    source = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        size, offset = os.fstat(source).st_size, 0
        while offset < size:
            data = os.pread(source, min(size - offset, 1 << 20), offset)
            if not data:
                break
            os.pwrite(copy, data, offset)
            offset += len(data)
        os.ftruncate(copy, size)
    finally:
        os.close(source)
    return copy


def _name(path: str) -> str:
    """`path` in the one form the rules compare names in: relative to the working directory (the
    run's base), normalized. (Not absolute: a name near PATH_MAX beneath the base would be too long
    for any system call.)"""
    return os.path.normpath(path)


def _path_of(fd: int, name: str) -> str:
    """The path (see `_name`) of the file `fd` is open on now, or `name` (the one it was opened by)
    when the kernel cannot tell a path that long (readlink of /proc/self/fd fails at PATH_MAX)."""
    try:
        return os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
        return name


def _at_or_below(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


@dataclass(eq=False)
class Handle:
    """One open file description: the descriptors of the slots that `dup` made of it."""

    fds: list[int]
    writes: bool
    """Opened for writing or with O_TRUNC: a write handle to the mount."""
    appends: bool
    """Only appended so far (O_APPEND without O_TRUNC, no ftruncate)."""
    committed: int | None = None
    """Rule `managed`: the version a read handle serves, or what a write handle's file held at its
    last commit (a memfd)."""
    pending: bool = False
    """Rule `managed`: a write handle changed its file since its last commit (an O_TRUNC open does)."""
    wrote: bool = False
    """Rule `managed`: it was written or resized since its last commit: only then does a flush (the
    close of one of its descriptors) commit; otherwise its last close does."""
    moved: bool = False
    """Rule `managed`: its file was renamed while it was open for writing."""
    mappable: bool = False
    """Rule `managed`: a read handle the kernel's page cache serves (see `Interpreter._mappable`)."""
    name: str = ""
    """The absolute path it was opened by."""
    seen: bool = False
    """Rule `managed`: a read through this read handle showed content (its first such read is a view)."""
    holds: bool = False
    """Rule `managed`: a write handle holds its agent's write grant (from open, or from its first write
    after a commit, until its next commit)."""
    detached: bool = False
    """Rule `managed`: a read handle served through the page cache whose file was then changed through
    the mount: its name got a new inode, the handle keeps the old one."""

    @property
    def fd(self) -> int:
        """A descriptor of it (any: they share the offset and the flags)."""
        return self.fds[0]

    def where(self) -> str:
        """The file's path now (" (deleted)" appended once it has no name)."""
        return _path_of(self.fd, self.name)


@dataclass
class Interpreter:
    """Applies steps to the current directory; `rules` are the documented differences to apply."""

    rules: frozenset[str] = frozenset()
    slots: dict[str, tuple[Handle, int]] = field(default_factory=dict)
    """Each slot's open file description and descriptor."""
    names: list[str] = field(default_factory=list)
    """Every path the sequence used, in order of first use (for `same`)."""
    stale: set[str] = field(default_factory=set)
    """Rule `managed`: absolute paths whose version the agent last read is not the current one (it read
    a read handle of an older version: a view is what was read), so changing them is refused."""

    @property
    def managed(self) -> bool:
        return "managed" in self.rules

    @property
    def fuse(self) -> bool:
        return "fuse" in self.rules

    # ---- the plumbing -------------------------------------------------------------

    def run(self, steps: list[Step]) -> list[Outcome]:
        out = [self.step(step) for step in steps]
        out.append([self.step(["close", slot]) for slot in sorted(self.slots)])
        out.append(self.tree())
        return out

    def step(self, step: Step) -> Outcome:
        op, *args = step
        for arg, path in zip(args, _PATH_ARGS.get(op, ()), strict=False):
            if path and isinstance(arg, str) and arg not in self.names:
                self.names.append(arg)
        try:
            return getattr(self, f"op_{op}")(*args)
        except (OSError, ValueError, TypeError) as e:  # Python's mmap refuses some calls itself, alike on both sides
            return error(e)

    def _stat(self, st: os.stat_result) -> dict[str, Any]:
        same = []
        for name in self.names:
            try:
                other = os.lstat(name)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino):
                same.append(name)
        return {
            "type": kind(st.st_mode),
            "mode": oct(stat_mod.S_IMODE(st.st_mode)),
            "size": st.st_size if not stat_mod.S_ISDIR(st.st_mode) else "dir",
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "same": sorted(same),
        }

    def tree(self) -> list[Any]:
        """Every entry below the base directory: its stat, a regular file's content, a symlink's
        value, and the first name of its inode."""
        out: list[Any] = []
        inodes: dict[tuple[int, int], str] = {}
        for directory, dirs, files in os.walk(".", onerror=lambda e: out.append(["walk", error(e)])):
            dirs.sort()
            for name in sorted(dirs + files):
                path = os.path.relpath(os.path.join(directory, name))
                try:
                    st = os.lstat(path)
                except OSError as e:
                    out.append([path, error(e)])
                    continue
                entry: dict[str, Any] = {k: v for k, v in self._stat(st).items() if k != "same"}
                entry["inode of"] = inodes.setdefault((st.st_dev, st.st_ino), path)
                if stat_mod.S_ISREG(st.st_mode):
                    entry["content"] = self.step(["read_file", path])
                elif stat_mod.S_ISLNK(st.st_mode):
                    entry["target"] = os.readlink(path)
                out.append([path, entry])
        return out

    def _handle(self, slot: str) -> Handle:
        if slot not in self.slots:
            raise OSError(errno.EBADF, "no such slot")
        return self.slots[slot][0]

    def _handles(self) -> list[Handle]:
        return list({id(h): h for h, _ in self.slots.values()}.values())

    def _writers_of(self, fd: int) -> list[Handle]:
        """The other write handles open on the file `fd` is open on."""
        return [h for h in self._writers_on(os.fstat(fd)) if fd not in h.fds]

    def _writers_on(self, st: os.stat_result) -> list[Handle]:
        """The write handles open on the file `st` describes."""
        return [
            h
            for h in self._handles()
            if h.writes and (os.fstat(h.fd).st_dev, os.fstat(h.fd).st_ino) == (st.st_dev, st.st_ino)
        ]

    def _managed_file(self, fd: int) -> bool:
        return self.managed and stat_mod.S_ISREG(os.fstat(fd).st_mode)

    # ---- files --------------------------------------------------------------------

    def op_open(self, slot: str, path: str, flags: str, mode: int = 0o644) -> Outcome:
        """open(2) into `slot`; what the slot held is closed first (its close's outcome is shown when it
        is not "ok")."""
        closed = self.step(["close", slot]) if slot in self.slots else "ok"
        opened = self.step(["_open", slot, path, flags, mode])
        return opened if closed == "ok" else [closed, opened]

    def op__open(self, slot: str, path: str, flags: str, mode: int) -> str:
        value = flags_of(flags)
        writes = (value & os.O_ACCMODE) != os.O_RDONLY or bool(value & os.O_TRUNC)
        if writes and not (value & os.O_CREAT and value & os.O_EXCL):
            self._detach_readers(path)
        self._refuse_held(path, value, writes)
        if writes or value & os.O_CREAT:
            self._refuse_stale_open(path, value)
        before = self._committed_before(path, writes)
        try:
            fd = os.open(path, value | os.O_CLOEXEC, mode)
        except OSError:
            if before is not None:
                os.close(before)
            raise
        handle = Handle([fd], writes, bool(value & os.O_APPEND) and not value & os.O_TRUNC, before)
        handle.name, handle.holds = _name(path), writes
        try:
            self._refuse_open(handle, value)
        except OSError:
            os.close(fd)
            if before is not None:
                os.close(before)
            raise
        if self._managed_file(fd):
            handle.pending = writes and bool(value & os.O_TRUNC) and before is not None  # (a new file is committed)
            if writes and handle.committed is None:  # created: committed empty
                handle.committed = os.memfd_create("committed", os.MFD_CLOEXEC)
            if not writes:
                pending = [h for h in self._writers_of(fd) if h.pending and h.committed is not None]
                handle.committed = _copy(pending[0].committed if pending else fd)  # type: ignore[arg-type]
                handle.mappable = self._mappable(handle)
        self.slots[slot] = handle, fd
        return "ok"

    def _mappable(self, reader: Handle) -> bool:
        """Rule `managed`: a read handle may be mapped shared (the kernel's page cache serves it) when
        its version is not empty and, as it opens, every other handle of its file is a read handle
        of the same version."""
        version = os.pread(reader.committed, 1 << 30, 0)  # type: ignore[arg-type]
        st = os.fstat(reader.fd)
        others = [
            h
            for h in self._handles()
            if not h.detached and (os.fstat(h.fd).st_dev, os.fstat(h.fd).st_ino) == (st.st_dev, st.st_ino)
        ]
        return bool(version) and all(
            not h.writes and h.committed is not None and os.pread(h.committed, 1 << 30, 0) == version for h in others
        )

    def _detach_readers(self, path: str) -> None:
        """Rule `managed`: a change through the mount to a file whose page cache readers use gives its
        name a new inode first; the readers keep the old one (the version they opened)."""
        try:
            st = os.stat(path)
        except OSError:
            return
        if self.managed and stat_mod.S_ISREG(st.st_mode):
            for h in self._handles():
                if h.mappable and (os.fstat(h.fd).st_dev, os.fstat(h.fd).st_ino) == (st.st_dev, st.st_ino):
                    h.detached = True

    def _committed_before(self, path: str, writes: bool) -> int | None:
        """Rule `managed`: a copy of the file a write open is about to open (and maybe truncate)."""
        if not (self.managed and writes):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return _copy(fd) if stat_mod.S_ISREG(os.fstat(fd).st_mode) else None
        finally:
            os.close(fd)

    def _refuse_held(self, path: str, flags: int, writes: bool) -> None:
        """Rule `managed`: a write open of an existing file (the kernel's errors aside) is refused while
        a write handle is open on it, unless both only append."""
        if not (self.managed and writes) or (flags & os.O_CREAT and flags & os.O_EXCL) or flags & os.O_DIRECTORY:
            return
        try:
            st = os.stat(path)
        except OSError:
            return
        appends = bool(flags & os.O_APPEND) and not flags & os.O_TRUNC
        holding = [h for h in self._writers_on(st) if h.holds and not h.moved] + self._held_at(path)
        if stat_mod.S_ISREG(st.st_mode) and any(not (appends and h.appends) for h in holding):
            raise OSError(errno.EACCES, "held by its own write handle")

    def _held_at(self, path: str) -> list[Handle]:
        """Rule `managed`: write handles whose file was renamed away from `path` keep their grant there."""
        return [h for h in self._handles() if h.moved and h.holds and h.name == _name(path)]

    def _refuse_open(self, handle: Handle, flags: int) -> None:
        """What the mount refuses of an open the kernel let through."""
        st = os.fstat(handle.fd)
        if self.fuse and flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "FUSE has no O_TMPFILE (bindfs neither)")
        if self.fuse and (stat_mod.S_ISCHR(st.st_mode) or stat_mod.S_ISBLK(st.st_mode)):
            raise OSError(errno.EACCES, "a FUSE mount is nodev (bindfs too)")

    def op_close(self, slot: str) -> str:
        """close(2): the mount commits a write handle's changes at the flush every close makes."""
        handle = self._handle(slot)
        fd = self.slots.pop(slot)[1]
        handle.fds.remove(fd)
        commits = handle.wrote or (handle.pending and not handle.fds)
        if commits and self.managed:  # the agent knows the version it made
            self.stale.discard(_path_of(fd, handle.name))
        if handle.fds and handle.wrote and handle.committed is not None:
            os.close(handle.committed)
            handle.committed = _copy(handle.fd)
            handle.holds = handle.pending = handle.wrote = False
        if not handle.fds and handle.committed is not None:
            os.close(handle.committed)
        os.close(fd)
        return "ok"

    def op_dup(self, slot: str, of: str) -> str:
        handle = self._handle(of)
        if self.slots.get(slot, (None,))[0] is not handle:  # dup2 onto its own description does nothing
            if slot in self.slots:
                self.op_close(slot)
            fd = os.dup(handle.fd)
            handle.fds.append(fd)
            self.slots[slot] = handle, fd
        return "ok"

    def _source(self, handle: Handle) -> int:
        """Where a handle's reads come from: a read handle of a managed file serves its version."""
        return handle.committed if handle.committed is not None and not handle.writes else handle.fd

    def _written(self, handle: Handle) -> int:
        """Before a handle changes its file: ESTALE once renamed away; rule `managed`: after its commit
        it takes the grant back, refused (EACCES) while another handle holds it (unless both only
        append) or, for one that does not only append, once the file moved on from its commit."""
        if handle.moved:
            raise OSError(errno.ESTALE, "renamed away while open for writing")
        if self._managed_file(handle.fd) and not handle.holds:
            if any(not (handle.appends and h.appends) for h in self._writers_of(handle.fd) if h.holds and not h.moved):
                raise OSError(errno.EACCES, "held by another of its agent's handles")
            base = os.pread(handle.committed, 1 << 30, 0) if handle.committed is not None else None
            if not handle.appends and base != self._committed_now(handle.where()):
                raise OSError(errno.EACCES, "stale: the file moved on since this handle's commit")
            handle.holds = True
        handle.pending = handle.wrote = True
        return handle.fd

    def _writable(self, handle: Handle) -> int:
        if not handle.writes:
            raise OSError(errno.EBADF, "not open for writing")
        return self._written(handle)

    def op_write(self, slot: str, data: str) -> int:
        handle = self._handle(slot)  # (the kernel answers a write of nothing itself)
        return os.write(self._writable(handle) if data else handle.fd, data.encode("latin-1"))

    def op_pwrite(self, slot: str, data: str, offset: int) -> int:
        handle = self._handle(slot)
        return os.pwrite(self._writable(handle) if data else handle.fd, data.encode("latin-1"), offset)

    def op_read(self, slot: str, size: int) -> str:
        return shown(self._read(self._handle(slot), size))

    def _read(self, handle: Handle, size: int) -> bytes:
        source = self._source(handle)
        if source == handle.fd:
            return os.read(handle.fd, size)
        position = os.lseek(handle.fd, 0, os.SEEK_CUR)
        data = os.pread(source, size, position)
        os.lseek(handle.fd, position + len(data), os.SEEK_SET)
        self._note_read(handle, position, len(data))
        return data

    def op_pread(self, slot: str, size: int, offset: int) -> str:
        handle = self._handle(slot)
        data = os.pread(self._source(handle), size, offset)
        self._note_read(handle, offset, len(data))
        return shown(data)

    def _note_read(self, handle: Handle, offset: int, returned: int) -> None:
        """Rule `managed`: the first read of a read handle that shows content (bytes, or an empty file
        from its start) makes the version it serves its agent's view of its name."""
        if self._source(handle) == handle.fd or handle.seen or not (returned or offset == 0):
            return
        handle.seen = True
        if os.pread(handle.committed, 1 << 30, 0) == self._committed_now(handle.name):  # type: ignore[arg-type]
            self.stale.discard(handle.name)
        else:
            self.stale.add(handle.name)

    def _committed_now(self, path: str) -> bytes | None:
        """Rule `managed`: the committed content at `path` (a write handle's unsaved changes aside)."""
        try:
            st = os.stat(path)
        except OSError:
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        pending = [h for h in self._writers_on(st) if h.pending and h.committed is not None]
        if pending:
            return os.pread(pending[0].committed, 1 << 30, 0)  # type: ignore[arg-type]
        with open(path, "rb") as f:
            return f.read()

    def _is_stale(self, path: str) -> bool:
        top = _name(path)
        return self.managed and any(_at_or_below(stale, top) for stale in self.stale)

    def _refuse_stale_open(self, path: str, flags: int) -> None:
        """Rule `managed`: writing a file (or creating it anew) whose view is stale is refused (EACCES),
        after the kernel's own checks."""
        if not self._is_stale(path) or flags & os.O_DIRECTORY:
            return
        if flags & os.O_APPEND and not flags & os.O_TRUNC:
            return  # an append needs no view
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if flags & os.O_CREAT and os.path.isdir(os.path.dirname(_name(path)) or "."):
                raise OSError(errno.EACCES, "stale: created anew after a deletion it did not read") from None
            return
        if stat_mod.S_ISREG(st.st_mode) and not (flags & os.O_CREAT and flags & os.O_EXCL):
            raise OSError(errno.EACCES, "stale: the agent's view is an older version")

    def op_lseek(self, slot: str, offset: int, whence: str) -> int:
        handle = self._handle(slot)
        fd, st = handle.fd, os.fstat(handle.fd)
        if handle.detached:
            st = os.fstat(self._source(handle))  # the size of the version it keeps
            if whence == "END":
                whence, offset = "SET", st.st_size + offset
        if self.fuse and stat_mod.S_ISDIR(st.st_mode) and whence == "END":  # the kernel's generic lseek
            whence, offset = "SET", st.st_size + offset
        if self.fuse and whence in ("DATA", "HOLE") and (stat_mod.S_ISREG(st.st_mode) or stat_mod.S_ISDIR(st.st_mode)):
            if not 0 <= offset < st.st_size:  # no FUSE_LSEEK: the kernel sees a file as all data
                raise OSError(errno.ENXIO, "past the end")
            return os.lseek(fd, offset if whence == "DATA" else st.st_size, os.SEEK_SET)
        return os.lseek(fd, offset, WHENCE[whence])

    def op_ftruncate(self, slot: str, size: int) -> str:
        handle = self._handle(slot)
        holding = [h for h in self._writers_of(handle.fd) if h.holds and not h.moved]
        if handle.appends and self._managed_file(handle.fd) and (holding or handle.moved):
            os.ftruncate(handle.fd, os.fstat(handle.fd).st_size)  # the kernel's own checks
            handle.holds = False  # it gave its appending share back first
            raise OSError(errno.EACCES, "an appending handle's ftruncate needs it alone")
        if handle.writes:
            os.ftruncate(handle.fd, os.fstat(handle.fd).st_size)  # the kernel's own checks
            self._written(handle)
        os.ftruncate(handle.fd, size)
        handle.appends = False
        return "ok"

    def op_fsync(self, slot: str) -> str:
        os.fsync(self._handle(slot).fd)
        return "ok"

    def op_fstat(self, slot: str) -> dict[str, Any] | str:
        handle = self._handle(slot)
        if handle.detached:
            return NOT_COMPARED + "the version's own inode, whose name and links a commit may have taken"
        return self._stat(os.fstat(handle.fd))

    def op_fchmod(self, slot: str, mode: int) -> str:
        os.fchmod(self._handle(slot).fd, mode)
        return "ok"

    def op_fchown(self, slot: str, uid: int, gid: int) -> str:
        os.fchown(self._handle(slot).fd, uid, gid)
        return "ok"

    def op_mmap(self, slot: str, share: str, prot: str, length: int, offset: int, data: str | None) -> str:
        """Map, read the mapping whole, write `data` at its start (msync for a shared one), unmap."""
        handle = self._handle(slot)
        if handle.detached:
            return NOT_COMPARED + "Python checks the length against the size of the version's own inode"
        flags = mmap.MAP_SHARED if share == "shared" else mmap.MAP_PRIVATE
        protection = mmap.PROT_READ | (mmap.PROT_WRITE if prot == "rw" else 0)
        source = self._source(handle)
        with mmap.mmap(handle.fd, length, flags, protection, offset=offset) as m:
            if share == "shared" and self._managed_file(handle.fd) and not handle.mappable:
                raise OSError(errno.ENODEV, "served direct_io")
            seen = shown(m[:] if source == handle.fd else os.pread(source, length, offset))
            self._note_read(handle, offset, min(length, max(os.fstat(source).st_size - offset, 0)))
            if data is None:
                return seen
            appending = fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_APPEND
            if share == "shared" and self.fuse and appending and prot == "rw":
                # the page written back reaches the daemon as a write that an O_APPEND descriptor of a
                # passthrough adds at the end of the file (bindfs too)
                page = bytearray(os.pread(handle.fd, mmap.PAGESIZE, offset))
                page[: len(data)] = data.encode("latin-1")
                os.write(handle.fd, bytes(page[: len(page)]))
                return seen
            m[: len(data)] = data.encode("latin-1")
            if share == "shared":
                self._written(handle)
                m.flush()
        return seen

    def op_copy_file_range(self, src: str, dst: str, count: int, src_off: int | None, dst_off: int | None) -> int:
        source, dest = self._handle(src), self._handle(dst)
        done = os.copy_file_range(source.fd, dest.fd, 0, src_off, dst_off)  # the kernel's own checks
        if self._source(source) != source.fd:  # a read handle of a managed file serves its version
            position = src_off if src_off is not None else os.lseek(source.fd, 0, os.SEEK_CUR)
            data = os.pread(self._source(source), count, position)
            if data:
                self._note_read(source, position, len(data))
            if src_off is None:
                os.lseek(source.fd, position + len(data), os.SEEK_SET)
            fd = self._written(dest)
            done = os.pwrite(fd, data, dst_off) if dst_off is not None else os.write(fd, data)
        else:
            position = src_off if src_off is not None else os.lseek(source.fd, 0, os.SEEK_CUR)
            if count and os.fstat(source.fd).st_size > position:
                self._written(dest)
            done = os.copy_file_range(source.fd, dest.fd, count, src_off, dst_off)
        return done

    def op_fallocate(self, slot: str, mode: str, offset: int, length: int) -> str:
        handle = self._handle(slot)
        if self.fuse:  # after the kernel's own checks
            if fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
                raise OSError(errno.EBADF, "not open for writing")
            kind = os.fstat(handle.fd).st_mode
            if stat_mod.S_ISFIFO(kind):
                raise OSError(errno.ESPIPE, "a pipe")
            if stat_mod.S_ISDIR(kind):
                raise OSError(errno.EISDIR, "a directory")
            if not stat_mod.S_ISREG(kind):
                raise OSError(errno.ENODEV, "not a regular file")
            raise OSError(errno.EOPNOTSUPP, "no fallocate through FUSE here (bindfs neither)")
        _check(_libc.fallocate(handle.fd, FALLOCATE_MODES[mode], offset, length))
        self._written(handle)
        return "ok"

    def op_linkat(self, slot: str, path: str) -> str:
        """Give an open file (an O_TMPFILE one) a name, as linkat(fd, "", AT_EMPTY_PATH) does."""
        os.link(f"/proc/self/fd/{self._handle(slot).fd}", path, follow_symlinks=True)
        return self._refused_link(path)

    # ---- names --------------------------------------------------------------------

    def op_stat(self, path: str) -> dict[str, Any]:
        return self._stat(os.stat(path))

    def op_lstat(self, path: str) -> dict[str, Any]:
        return self._stat(os.lstat(path))

    def op_truncate(self, path: str, size: int) -> str:
        """Rule `managed`: truncating by name is a write: refused (EACCES) while one of its agent's
        write handles holds the file, or when its view is stale."""
        if size >= 0:
            self._detach_readers(path)
            held = self._held_at(path) + [h for h in self._writers_at(path) if h.holds]
            if os.path.isfile(path) and (held or self._is_stale(path)):
                os.truncate(path, os.stat(path).st_size)  # the kernel's own checks
                raise OSError(errno.EACCES, "held by its agent's own write handle, or stale")
        os.truncate(path, size)
        return "ok"

    def _writers_at(self, path: str) -> list[Handle]:
        """Rule `managed`: the write handles open on the managed file at `path`, but for those renamed
        away."""
        try:
            st = os.stat(path)
        except OSError:
            return []
        if not (self.managed and stat_mod.S_ISREG(st.st_mode)):
            return []
        return [h for h in self._writers_on(st) if not h.moved]

    def op_chmod(self, path: str, mode: int) -> str:
        os.chmod(path, mode)
        return "ok"

    def op_chown(self, path: str, uid: int, gid: int, follow: bool = True) -> str:
        os.chown(path, uid, gid, follow_symlinks=follow)
        return "ok"

    def op_utimensat(self, path: str, atime_ns: int, mtime_ns: int, follow: bool = True) -> list[int]:
        os.utime(path, ns=(atime_ns, mtime_ns), follow_symlinks=follow)
        st = os.stat(path, follow_symlinks=follow)
        return [st.st_atime_ns, st.st_mtime_ns]

    def op_link(self, src: str, dst: str) -> str:
        os.link(src, dst, follow_symlinks=False)
        return self._refused_link(dst)

    def op_symlink(self, target: str, path: str) -> str:
        os.symlink(target, path)
        return self._refused_link(path)

    def _refused_link(self, made: str) -> str:
        if self.managed:
            os.unlink(made)
            raise OSError(errno.EPERM, "no links in a managed glob")
        return "ok"

    def op_readlink(self, path: str) -> str:
        return os.readlink(path)

    def op_mkdir(self, path: str, mode: int) -> str:
        os.mkdir(path, mode)
        return "ok"

    def op_rmdir(self, path: str) -> str:
        os.rmdir(path)
        return "ok"

    def op_mkfifo(self, path: str, mode: int) -> str:
        os.mkfifo(path, mode)
        return "ok"

    def op_mknod(self, path: str, kind: str, mode: int, device: int) -> str:
        if kind == "S_IFREG" and not os.path.lexists(path):
            self._refuse_stale_open(path, os.O_CREAT)
        os.mknod(path, getattr(stat_mod, kind) | mode, device)
        return "ok"

    def op_unlink(self, path: str) -> str:
        if self._is_stale(path) and os.path.lexists(path) and not os.path.isdir(path):
            raise OSError(errno.EACCES, "stale: the agent's view is an older version")
        os.unlink(path)
        return "ok"

    def op_rename(self, src: str, dst: str, flags: str = "") -> str:
        if os.path.lexists(src) and os.path.lexists(dst) and os.path.samestat(os.lstat(src), os.lstat(dst)):
            return "ok" if flags != "NOREPLACE" else error(OSError(errno.EEXIST, "exists"))  # rename(2) does nothing
        moving = self._refuse_rename(src, dst, flags)
        if any(self._is_stale(p) and os.path.lexists(p) for p in (src, dst)):
            self._rename_checks(src, dst, flags)
            raise OSError(errno.EACCES, "stale: the agent's view is an older version")
        _check(_libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_FLAGS[flags]))
        for handle in moving:  # its grant stays with the name it was opened by (`_held_at`)
            handle.moved = True
        return "ok"

    def _refuse_rename(self, src: str, dst: str, flags: str) -> list[Handle]:
        """Rule `managed`: the write handles a rename moves; EBUSY if one has unsaved changes (after
        the kernel's own checks: both ends exist as the flags need, of types that fit)."""
        if not self.managed:
            return []
        tops = [_name(src), _name(dst)]
        moving = [h for h in self._handles() if h.writes and any(_at_or_below(h.where(), top) for top in tops)]
        if not any(h.pending for h in moving):
            return moving
        if self._rename_checks(src, dst, flags):
            return []
        raise OSError(errno.EBUSY, "a write handle there has unsaved changes")

    @staticmethod
    def _rename_checks(src: str, dst: str, flags: str) -> bool:
        """The kernel's own checks of a rename (OSError); True if it does nothing (one file's names)."""
        source = os.lstat(src)
        target = os.lstat(dst) if flags == "EXCHANGE" or os.path.lexists(dst) else None
        if target is not None and flags == "NOREPLACE":
            raise OSError(errno.EEXIST, "exists")
        if target is not None and (source.st_dev, source.st_ino) == (target.st_dev, target.st_ino):
            return True  # two names of one file: rename(2) does nothing
        if stat_mod.S_ISDIR(source.st_mode) and _at_or_below(_name(dst), _name(src)):
            raise OSError(errno.EINVAL, "into itself")
        if target is not None and src != dst and _at_or_below(_name(src), _name(dst)):
            raise OSError(errno.EINVAL if flags == "EXCHANGE" else errno.ENOTEMPTY, "onto a directory above it")
        if (
            target is not None
            and flags != "EXCHANGE"
            and stat_mod.S_ISDIR(source.st_mode) != stat_mod.S_ISDIR(target.st_mode)
        ):
            raise OSError(errno.ENOTDIR if stat_mod.S_ISDIR(source.st_mode) else errno.EISDIR, "type")
        return False

    def op_listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def op_read_file(self, path: str) -> str:
        """The file's content (open, read, close; a FIFO is opened without waiting for a writer)."""
        slot = "\0read_file"
        self.op__open(slot, path, "O_RDONLY|O_NONBLOCK", 0)
        try:
            data = self._read(self._handle(slot), 1 << 20)
        finally:
            self.op_close(slot)
        return shown(data) if len(data) < 1 << 20 else f"<more than {len(data)} bytes>"


_PATH_ARGS: dict[str, tuple[bool, ...]] = {
    "open": (False, True),
    "linkat": (False, True),
    "stat": (True,),
    "lstat": (True,),
    "truncate": (True,),
    "chmod": (True,),
    "chown": (True,),
    "utimensat": (True,),
    "link": (True, True),
    "symlink": (False, True),
    "readlink": (True,),
    "mkdir": (True,),
    "rmdir": (True,),
    "mkfifo": (True,),
    "mknod": (True,),
    "unlink": (True,),
    "rename": (True, True),
    "read_file": (True,),
}
"""Which arguments of each op are paths (the names `same` looks among)."""


def serve(requests: TextIO, answers: TextIO) -> None:
    """Answer requests {"base", "steps", "rules"}: run the steps in `base`, answer their outcomes."""
    for line in iter(requests.readline, ""):
        request = json.loads(line)
        os.chdir(request["base"])
        try:
            outcomes = Interpreter(frozenset(request["rules"])).run(request["steps"])
        finally:
            os.chdir("/")
        answers.write(json.dumps(outcomes) + "\n")
        answers.flush()


class Runner:
    """A server process that runs sequences as one agent (`COHERENT_AGENT`); a context manager."""

    def __init__(self, agent: str) -> None:
        self.proc = subprocess.Popen(
            child("conformance"),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": agent},
        )

    def run(
        self, base: Path, steps: list[Step], rules: frozenset[str] = frozenset(), timeout: float = 120
    ) -> list[Outcome]:
        """The outcome of each step run in `base`, then of closing what was left open, then the tree."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"base": str(base), "steps": steps, "rules": sorted(rules)}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.kill()
            raise TimeoutError(f"no answer in {timeout} s to {steps}")
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the conformance interpreter exited ({self.proc.wait()})")
        return list(json.loads(answer))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    os.umask(0o022)
    serve(sys.stdin, sys.stdout)
