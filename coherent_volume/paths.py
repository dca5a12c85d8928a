"""Confinement of user paths to a volume root. Pure path logic plus `realpath` at the edge."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import unicodedata
from functools import lru_cache
from typing import NamedTuple

from .errors import InvalidPath, OutsideVolume
from .globs import REGISTRY_DIR, ManagedGlobs

STAGING = "staging"
"""The directory in REGISTRY_DIR where commits name their staged content (`VolumePaths.staging`)."""


class Target(NamedTuple):
    """A path inside the volume: `rel` is root-relative POSIX, symlinks resolved; `abs` is the path
    system calls take: root/rel, or where that reaches PATH_MAX, rel's tail beneath a descriptor of
    one of its directories (`/proc/self/fd/N/...`, see `VolumePaths.target`), which `anchor` holds
    open as long as the Target lives. The directory a temp file beside it goes in is always
    `os.path.dirname(abs)`."""

    rel: str
    abs: str
    managed: bool
    alias_of: str | None = None
    """The managed name the caller gave, when it resolved through a symlink to this unmanaged path:
    every write and delete through it is refused (errors.UnprotectedAlias)."""
    anchor: Anchor | None = None


class Anchor:
    """An open O_PATH descriptor of a directory, closed when nothing holds it any more."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        os.close(self.fd)


PATH_MAX = 4096
NAME_MAX = 255


WALKS = 16
"""How many times a path is walked again (`settled_realpath`) while a name on it keeps changing."""


def settled_realpath(path: str, given: str) -> str:
    """os.path.realpath of `path`, walked again while a name on the way changes between the walk's
    lstat and readlink of it (a symlink replaced by a directory: EINVAL; removed: ENOENT), which
    realpath raises as they are (/tmp/s33api 4). Past WALKS walks, an OSError naming `given` (the
    path as the caller gave it) says so."""
    for _ in range(WALKS):
        try:
            return os.path.realpath(path)
        except OSError as e:
            error = e
    raise OSError(
        error.errno,
        f"a directory on the way kept changing while the path was resolved ({error.strerror}); nothing was "
        "changed: try again once it is settled",
        given,
    )


def _check_text(path: str) -> None:
    if "\0" in path:
        raise OutsideVolume(f"path {path!r} contains a NUL byte")
    if not path:
        raise OutsideVolume("empty path")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"path {path!r} is not valid UTF-8: a volume records its paths as UTF-8") from None
    if len(encoded) >= PATH_MAX:
        raise InvalidPath(f"path of {len(encoded)} bytes is longer than the system allows ({PATH_MAX - 1})")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise InvalidPath(
            f"the name '{shown(longest[:60].decode('utf-8', 'replace'))}...' is {len(longest)} bytes, longer than a "
            f"file system allows one name ({NAME_MAX})"
        )


def printable(rel: str) -> str:
    """`rel` as text that can always be printed and encoded: bytes that are not UTF-8 (which
    os.walk hands over as surrogate escapes) become \\xNN."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def shown(rel: str) -> str:
    """`rel` as `printable`, with every control or format character (a newline, ESC, a bidi mark)
    and every line or paragraph separator escaped as \\xNN, \\uNNNN or \\UNNNNNNNN: one line that
    moves no cursor, so no name forges or hides a line of a command's output."""
    return "".join(_escaped(c) if _unshown(unicodedata.category(c)) else c for c in printable(rel))


def _unshown(category: str) -> bool:
    """Control, format, surrogate and unassigned characters, and line and paragraph separators
    (U+2028, U+2029, which break a line where terminals and viewers honour them)."""
    return category[0] == "C" or category in ("Zl", "Zp")


def _escaped(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_DIRECTORY_BENEATH = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS


@lru_cache(maxsize=8)
def _how(flags: int, resolve: int = _RESOLVE_NO_SYMLINKS) -> tuple[_OpenHow, int]:
    """A reusable open_how for `flags` and `resolve` (kept alive by the cache) and its size."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    return how, ctypes.sizeof(how)


def lexical(path: str) -> str | None:
    """`path` itself when it is plainly relative (no '.', '..' or empty segment), else None."""
    if not path or path[0] == "/" or "\0" in path:
        return None
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return None
    return path


def is_registry_path(rel: str) -> bool:
    """True for the registry directory and anything below it."""
    return rel == REGISTRY_DIR or rel.startswith(REGISTRY_DIR + "/")


def open_beneath(at: int, rel: str) -> int:
    """An O_PATH descriptor of the directory `rel` beneath the directory open as `at`, with no symlink
    (nor magic link) on the way: ELOOP (or EXDEV) where one is. openat2 where the kernel has it, else
    a walk one name at a time, each opened O_NOFOLLOW."""
    how, size = _how(os.O_PATH | os.O_DIRECTORY, _DIRECTORY_BENEATH)
    fd = _syscall(_SYS_OPENAT2, at, os.fsencode(rel), ctypes.byref(how), size)
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err != errno.ENOSYS:
        raise OSError(err, os.strerror(err), rel)
    return _walk_beneath(at, rel)


def _walk_beneath(at: int, rel: str) -> int:
    """`open_beneath` without openat2 (ENOSYS): each name opened O_NOFOLLOW from the one before, and
    checked to be a directory (a symlink opened so is the link itself: ELOOP)."""
    fd = os.dup(at)
    try:
        for name in rel.split("/"):
            if name in ("", ".", ".."):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), rel)
            try:
                inner = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            finally:
                os.close(fd)
                fd = -1
            fd = inner
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
            if not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def _linked(root: str, rel: str) -> str:
    """The first name on `rel`'s way that is a symlink (for a message; `rel` where none is now)."""
    parts = rel.split("/")
    for n in range(1, len(parts) + 1):
        if os.path.islink(os.path.join(root, *parts[:n])):
            return "/".join(parts[:n])
    return rel


class VolumePaths:
    """Maps user paths to Targets inside one root. Invariant: every Target.abs is below root."""

    def __init__(self, root: str, globs: ManagedGlobs) -> None:
        self.root = os.path.realpath(root)
        self.globs = globs
        self.managed = lru_cache(maxsize=65536)(globs.matches)
        """Whether a root-relative path is managed (cached: globs never change)."""
        self.staging = os.path.join(self.root, REGISTRY_DIR, STAGING)
        """Where commits name their staged content before recording it (`atomic.Staged.name_in`):
        in the registry's directory, so a name a killed writer left there is never a file of the
        volume (`CoreBase._recover` removes it)."""
        try:
            self._root_fd: int | None = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self._root_fd = None

    def staged(self, target: Target, tmp: str) -> str:
        """The staged file `tmp` of a commit of `target` (as its intent recorded it, maybe in
        another process) as this process names it: in the staging directory, or beside the target."""
        if os.path.basename(os.path.dirname(tmp)) == STAGING and tmp.startswith(os.sep):
            parent = os.path.dirname(os.path.dirname(tmp))
            if os.path.basename(parent) == REGISTRY_DIR:
                return os.path.join(self.staging, os.path.basename(tmp))
        return os.path.join(os.path.dirname(target.abs), os.path.basename(tmp))

    def close(self) -> None:
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def rel_of(self, abs_path: str) -> str:
        """Root-relative POSIX path of an absolute, already-resolved path; raises if outside."""
        if abs_path == self.root:
            return "."
        if not abs_path.startswith(self.root + os.sep):
            raise OutsideVolume(f"{abs_path!r} is outside the volume root {self.root!r}")
        rel = abs_path[len(self.root) + 1 :]
        if is_registry_path(rel):
            raise OutsideVolume(f"{rel!r} is the registry's own directory; it is not part of the volume")
        return rel

    def resolve(self, path: str | os.PathLike[str]) -> Target:
        """Resolve `path` (relative to root, or absolute) following symlinks, and confine it. Errors
        name the path as it was given."""
        given = text = os.fspath(path)
        if isinstance(text, bytes):
            raise InvalidPath(f"path {text!r} is bytes: give it as str (os.fsdecode decodes a file name)")
        _check_text(text)
        if os.path.isabs(text) and text.startswith(self.root + os.sep):
            text = text[len(self.root) :].lstrip(os.sep) or "."  # (`ROOT//plans/a.md` is `plans/a.md`)
        plain = lexical(text)
        if plain is not None and self._free_of_symlinks(plain):
            rel = plain  # no '.', '..' or symlink in it: the path is its own canonical form
            named = None
            if is_registry_path(rel):
                raise OutsideVolume(f"{rel!r} is the registry's own directory; it is not part of the volume")
        else:
            joined = text if os.path.isabs(text) else os.path.join(self.root, text)
            rel = self.rel_of(settled_realpath(joined, given))
            named = self._named(joined)
        if rel == ".":
            raise OutsideVolume(f"{given!r} is the volume root itself, not a file in it")
        if text.endswith("/") and not os.path.isdir(f"{self.root}/{rel}"):
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory (the path ends with '/')", given)
        managed = self.managed(rel)
        alias_of = named if named is not None and not managed and self.managed(named) else None
        return self.target(rel, managed, alias_of)

    def target(self, rel: str, managed: bool, alias_of: str | None = None) -> Target:
        """The Target of the canonical root-relative `rel`. Its `abs` is root/rel, unless that reaches
        PATH_MAX (a plain directory holds such paths: only one system call's argument is limited):
        then it is the rest of `rel` beneath a descriptor of its deepest existing directory, opened
        beneath the root a run of directories at a time with no symlink on the way (ELOOP if one is)."""
        path = f"{self.root}/{rel}"
        if len(os.fsencode(path)) < PATH_MAX:
            return Target(rel, path, managed, alias_of)
        head = rel.rpartition("/")[0]
        while head:
            try:
                anchor = Anchor(self._open_dir(head))
                break
            except FileNotFoundError:
                head = head.rpartition("/")[0]
        else:
            raise InvalidPath(f"{rel[:60]!r}...: inside this root the path is longer than the system allows")
        path = f"/proc/self/fd/{anchor.fd}/{rel[len(head) + 1 :]}"
        if len(os.fsencode(path)) >= PATH_MAX:
            raise InvalidPath(f"{rel[:60]!r}...: more of this path is missing than one system call can create")
        return Target(rel, path, managed, alias_of, anchor)

    def beneath(self, target: Target) -> Target:
        """`target` for the system calls of one operation: its `abs` is its name beneath a descriptor
        (`/proc/self/fd/N/name`, which the kernel resolves from that very directory) of its parent,
        opened now beneath the root with no symlink on the way (openat2 RESOLVE_BENEATH |
        RESOLVE_NO_SYMLINKS), so that no directory replaced by a symlink since `resolve` leads a read,
        a staging, an install, a set-aside or a mkdir out of the root or to another name (/tmp/s32api
        1). Where the parent is missing, the nearest directory there is on its way (its missing
        directories are made from there); where the root cannot be opened (gone), `target` as it is,
        whose calls fail as they did. A symlink on the way: OutsideVolume, nothing done. Already
        anchored (this operation's, or a path too long for one call): `target` itself."""
        if target.anchor is not None:
            return target
        try:
            root = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return target
        head, rest = target.rel.rpartition("/")[0], target.rel
        try:
            while head:
                try:
                    fd = open_beneath(root, head)
                    break
                except (FileNotFoundError, NotADirectoryError):
                    head = head.rpartition("/")[0]
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.EXDEV):
                        raise
                    raise OutsideVolume(
                        f"{target.rel!r}: {_linked(self.root, head)!r} on its way is a symlink now (it was "
                        "replaced since the path was resolved); nothing was read or written there. Give the "
                        "path again: a symlink that leads into the volume is followed when a path is resolved"
                    ) from None
            else:
                fd, root = root, -1
        finally:
            if root >= 0:
                os.close(root)
        anchor = Anchor(fd)
        if head:
            rest = target.rel[len(head) + 1 :]
        return target._replace(abs=f"/proc/self/fd/{fd}/{rest}", anchor=anchor)

    def _open_dir(self, rel: str) -> int:
        """An O_PATH descriptor of the directory `rel`, resolved beneath the root with no symlink on the
        way (OSError otherwise), a run of directories at a time: one call takes under PATH_MAX bytes."""
        if self._root_fd is None:
            raise OSError(errno.EBADF, "the volume root could not be opened", self.root)
        how, size = _how(os.O_PATH | os.O_DIRECTORY, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        at, rest = self._root_fd, os.fsencode(rel)
        try:
            while rest:
                cut = len(rest) if len(rest) < PATH_MAX else rest.rfind(b"/", 0, PATH_MAX)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
                fd = _syscall(_SYS_OPENAT2, at, rest[:cut], ctypes.byref(how), size)
                if fd < 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), rel)
                if at != self._root_fd:
                    os.close(at)
                at, rest = fd, rest[cut + 1 :]
            return at
        except BaseException:
            if at != self._root_fd:
                os.close(at)
            raise

    def _named(self, joined: str) -> str | None:
        """The root-relative name of `joined` with '.' and '..' folded but no symlink followed (None
        outside the root): what a caller meant to write."""
        try:
            return self.rel_of(os.path.normpath(joined))
        except OutsideVolume:
            return None

    def resolve_link(self, path: str | os.PathLike[str]) -> Target | None:
        """The Target of `path` itself when its last component is a symlink (for unlink(2)
        semantics: removing the link, never what it points to), else None."""
        text = os.fspath(path)
        if not isinstance(text, str):
            return None
        _check_text(text)
        joined = text if os.path.isabs(text) else os.path.join(self.root, text)
        parent, name = os.path.split(os.path.normpath(joined))
        if not name or name in (".", ".."):
            return None
        directory = settled_realpath(parent, text)
        link = os.path.join(directory, name)
        if not os.path.islink(link):
            return None
        rel = self.rel_of(link)
        return Target(rel, link, False)

    def _openat2(self, rel: str, flags: int) -> int:
        """openat2 beneath root refusing any symlink on the way; -errno on failure."""
        if self._root_fd is None:
            return -1
        how, size = _how(flags)
        try:
            name = rel.encode("utf-8")
        except UnicodeEncodeError:
            return -errno.EINVAL  # the slow path reports it as InvalidPath
        fd = _syscall(_SYS_OPENAT2, self._root_fd, name, ctypes.byref(how), size)
        return fd if fd >= 0 else -ctypes.get_errno()

    def _free_of_symlinks(self, rel: str) -> bool:
        """True if no component of `rel` is a symlink (a missing last component counts as free)."""
        fd = self._openat2(rel, os.O_PATH)
        if fd == -errno.ENOENT and "/" in rel:
            fd = self._openat2(rel.rsplit("/", 1)[0], os.O_PATH | os.O_DIRECTORY)
        elif fd == -errno.ENOENT:
            return True
        if fd < 0:
            return False
        os.close(fd)
        return True

    def open_plain(self, rel: str) -> int | None:
        """Open `rel` for reading if no component of it is a symlink (kernel-checked, so the fd is
        confined to root and `rel` is canonical); None when the caller must resolve it the slow way."""
        fd = self._openat2(rel, os.O_RDONLY | os.O_NONBLOCK)
        return fd if fd >= 0 else None

    def of_rel(self, rel: str) -> Target:
        """Target for a root-relative path that is already resolved (as stored in the registry, or
        as a mount names it). A managed path must be valid UTF-8: the registry records it as text."""
        managed = self.managed(rel)
        if managed and not rel.isascii():
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidPath(
                    f"{printable(rel)!r} is not valid UTF-8: a volume records its managed paths as UTF-8, so it "
                    "cannot protect a file of that name; choose a UTF-8 name"
                ) from None
        return self.target(rel, managed)
