"""The mount's access to the backing tree, anchored at descriptors: the only module of the mount
that touches backing paths for metadata and directories.

Every entry is reached as (descriptor of the directory holding it, its own name), and the name is
never followed (`*at` calls with AT_SYMLINK_NOFOLLOW / O_NOFOLLOW), as libfuse's passthrough_hp
anchors each access at a descriptor. The directory's descriptor is its *anchor*: an O_PATH
descriptor that a directory inode the kernel holds keeps (`anchor`, dropped at `release`), so a
request costs one system call on its entry and no path walk. Files hold no descriptor: reached by
their directory's anchor and their name, a managed path stays bound to its name across commits
(each installs a new inode), and a million files cost no descriptor. A directory without an
anchor (the kernel forgot it, or the budget, half the descriptor limit, is spent) is resolved
beneath the root's descriptor (`openat2` with RESOLVE_BENEATH and RESOLVE_NO_SYMLINKS) for each
access, as every access was before anchors. A directory swapped for a symlink behind the daemon's
back is never followed, and an anchor is re-resolved beneath the root each time the kernel asks
for its directory's attributes or name (`anchor`): a directory that a foreign process moves away
serves the mount until then (its attributes expire after 1 s), never after.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import stat as stat_mod
from collections.abc import Callable
from typing import Any, TypeVar

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_PATH_MAX = 4096
_ANCHOR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_fstatfs = _libc.fstatfs
_STATFS_SIZE = 120  # struct statfs on x86_64 and aarch64; f_type is its first field, a long
_SYNCS_NOTHING = frozenset({0x01021994, 0x858458F6})
"""File system magics (tmpfs, ramfs) whose fsync does nothing: it cannot block (`syncs_nothing`)."""

_DELETED = " (deleted)"
"""What the kernel appends to the name of a file deleted since it was opened (/proc/PID/fd)."""

_T = TypeVar("_T")


def syncs_nothing(fd: int) -> bool:
    """Whether fsync(2) of `fd` does nothing (its file system keeps no data on a disk: tmpfs, ramfs),
    so that it cannot block; False where fstatfs(2) fails."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _fstatfs(fd, buf) != 0:
        return False
    return ctypes.c_long.from_buffer(buf).value in _SYNCS_NOTHING


ANCHOR_SHARE = 2
"""At most 1/ANCHOR_SHARE of the descriptor limit is spent on anchors: the rest stays for open
files, listings and the registry."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_HOW: dict[int, _OpenHow] = {}
"""The open_how of each set of open flags resolved so far (a few: made once, never changed)."""
_HOW_SIZE = ctypes.sizeof(_OpenHow)


def raise_descriptor_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass  # kept the soft limit: fewer anchors, every access still works
    return soft


class Backing:
    """The backing directory of one mount. `rel` paths are root-relative ("" is the root).

    `inode_of` (the mount's inode table) maps a directory's path to the inode whose anchor it
    uses; without it every access resolves beneath the root. Invariant: an anchor is the
    directory that was at its inode's path when the kernel last asked about that inode, reached
    beneath the root with no symlink; renames made through the mount keep it right, since the
    descriptor follows its directory and the inode table follows the name."""

    def __init__(self, root: str, inode_of: Callable[[str], int | None] | None = None) -> None:
        self.root = root
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._inode_of = inode_of
        self._anchors: dict[int, int] = {}
        self._budget = raise_descriptor_limit() // ANCHOR_SHARE if inode_of is not None else 0

    def close(self) -> None:
        for fd in self._anchors.values():
            os.close(fd)
        self._anchors.clear()
        os.close(self._root_fd)

    # ---- anchors --------------------------------------------------------------------

    def anchor(self, inode: int, rel: str) -> os.stat_result | None:
        """The kernel holds (or is told of) directory `inode` at `rel`: (re)anchor it at what is at
        `rel` now, resolved beneath the root, and return that directory's stat. None, its anchor
        dropped, when that is no directory or the budget is spent (its accesses then resolve
        beneath the root each time). When `rel` is gone, the anchors above it are resolved afresh
        too: one of them may be a directory moved away behind the mount's back."""
        self.release(inode)
        if not rel or self._inode_of is None or len(self._anchors) >= self._budget:
            return None
        st = self._reopen(inode, rel)
        if st is None:
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                above = "/".join(parts[:depth])
                held = self._inode_of(above)
                if held is not None and held in self._anchors:
                    self.release(held)
                    self._reopen(held, above)
        return st

    def _reopen(self, inode: int, rel: str) -> os.stat_result | None:
        """Anchor `inode` (holding none) at the directory at `rel`; its stat, or None if there is none."""
        try:
            fd = self._openat2(rel, _ANCHOR)
        except OSError:
            return None  # gone, no directory, or out of descriptors
        self._anchors[inode] = fd
        return os.stat(fd)

    def anchored(self, inode: int) -> bool:
        """Whether directory `inode` has an anchor."""
        return inode in self._anchors

    def release(self, inode: int) -> None:
        """Close `inode`'s anchor, if any (the kernel forgot the inode)."""
        fd = self._anchors.pop(inode, None)
        if fd is not None:
            os.close(fd)

    def _parent(self, rel: str) -> tuple[int, str, bool]:
        """The directory holding `rel` and its last component: (its descriptor, the name, whether
        the descriptor was opened for this one access, which must then close it). The descriptor
        is the directory's anchor, or resolved now."""
        if not rel:
            raise OSError(errno.EINVAL, "the root has no parent", rel)
        if "\0" in rel:  # a name the inode table keeps for an unlinked entry: no backing path
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
        head, _, name = rel.rpartition("/")
        if not head:
            return self._root_fd, name, False
        if self._inode_of is not None:
            inode = self._inode_of(head)
            fd = self._anchors.get(inode) if inode is not None else None
            if fd is not None:
                return fd, name, False
        return self._openat2(head, os.O_PATH | os.O_DIRECTORY), name, True

    def _openat2(self, rel: str, flags: int) -> int:
        """An fd for `rel` resolved beneath the root with no symlink on the way (OSError otherwise).
        A path of PATH_MAX bytes or more (a plain directory holds them: only one system call's
        argument is limited) is resolved a run of directories at a time, each beneath the last."""
        if "\0" in rel:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), rel)
        name = os.fsencode(rel or ".")
        at = self._root_fd
        try:
            while len(name) >= _PATH_MAX:
                cut = name.rfind(b"/", 0, _PATH_MAX)
                if cut <= 0:
                    raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), rel)
                step = self._resolve(at, name[:cut], os.O_PATH | os.O_DIRECTORY, rel)
                if at != self._root_fd:
                    os.close(at)
                at, name = step, name[cut + 1 :]
            return self._resolve(at, name, flags, rel)
        finally:
            if at != self._root_fd:
                os.close(at)

    @staticmethod
    def _resolve(at: int, name: bytes, flags: int, rel: str) -> int:
        how = _HOW.get(flags)
        if how is None:
            how = _HOW[flags] = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        fd = _syscall(_SYS_OPENAT2, at, name, ctypes.byref(how), _HOW_SIZE)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), rel)
        return int(fd)

    def _entry(self, rel: str) -> int:
        """An O_PATH descriptor of `rel` itself, for the calls that act on it through /proc (the
        caller closes it)."""
        if not rel:
            return os.dup(self._root_fd)
        fd, name, owned = self._parent(rel)
        try:
            return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def name_of(self, fd: int) -> tuple[str, bool] | None:
        """The root-relative name the kernel gives the file open as `fd` now (renames by anyone
        followed) and whether the file is deleted (the name is then its last); None when that lies
        outside the root or is longer than PATH_MAX. Where the name `fd` was opened by was removed
        while another link to its file remains, the kernel names neither that link nor the file
        deleted: the removed name comes back with its " (deleted)" suffix, and not deleted."""
        try:
            root = os.readlink(self._proc(self._root_fd))
            path = os.readlink(self._proc(fd))
        except OSError:
            return None
        deleted = path.endswith(_DELETED) and os.fstat(fd).st_nlink == 0
        if deleted:
            path = path[: -len(_DELETED)]
        prefix = root.rstrip("/") + "/"
        return (path[len(prefix) :], deleted) if path.startswith(prefix) else None

    @staticmethod
    def _proc(fd: int) -> str:
        """The /proc name of an O_PATH fd: calls following it act on that very inode."""
        return f"/proc/self/fd/{fd}"

    # ---- entries --------------------------------------------------------------------

    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.stat(self._root_fd)
        fd, name, owned = self._parent(rel)
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        finally:
            if owned:
                os.close(fd)

    def open(self, rel: str, flags: int, mode: int = 0o777) -> int:
        """open(2) of a file: the last component is not followed either (O_NOFOLLOW)."""
        fd, name, owned = self._parent(rel)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def opendir(self, rel: str) -> int:
        """A descriptor of the directory `rel` (os.listdir reads it; fstat still works once it is removed)."""
        if not rel:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._root_fd)
        return self.open(rel, os.O_RDONLY | os.O_DIRECTORY)

    def readlink(self, rel: str) -> str:
        fd, name, owned = self._parent(rel)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def mkdir(self, rel: str, mode: int) -> None:
        fd, name, owned = self._parent(rel)
        try:
            os.mkdir(name, mode, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def rmdir(self, rel: str) -> None:
        fd, name, owned = self._parent(rel)
        try:
            os.rmdir(name, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def mknod(self, rel: str, mode: int, device: int) -> None:
        fd, name, owned = self._parent(rel)
        try:
            os.mknod(name, mode, device, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def unlink(self, rel: str) -> None:
        fd, name, owned = self._parent(rel)
        try:
            os.unlink(name, dir_fd=fd)
        finally:
            if owned:
                os.close(fd)

    def truncate(self, rel: str, size: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        """chmod of the entry itself; a symlink has no mode of its own on Linux (EOPNOTSUPP)."""
        fd = self._entry(rel)
        try:
            if stat_mod.S_ISLNK(os.stat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), rel)
            os.chmod(self._proc(fd), mode)
        finally:
            os.close(fd)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        if not rel:
            os.chown(self._proc(self._root_fd), uid, gid)
            return
        fd, name, owned = self._parent(rel)
        try:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        finally:
            if owned:
                os.close(fd)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        if not rel:
            os.utime(self._proc(self._root_fd), ns=ns)
            return
        fd, name, owned = self._parent(rel)
        try:
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
        finally:
            if owned:
                os.close(fd)

    def _xattr(self, call: Callable[..., _T], rel: str, *args: Any) -> _T:
        """`call` (one of os's xattr calls) on `rel` itself through /proc, the calls taking no
        directory descriptor: its directory's descriptor, then its name (not followed); the
        root's own descriptor for ""."""
        if not rel:
            return call(self._proc(self._root_fd), *args)
        fd, name, owned = self._parent(rel)
        try:
            return call(f"{self._proc(fd)}/{name}", *args, follow_symlinks=False)
        finally:
            if owned:
                os.close(fd)

    def getxattr(self, rel: str, name: bytes) -> bytes:
        return self._xattr(os.getxattr, rel, name)

    def listxattr(self, rel: str) -> list[str]:
        return self._xattr(os.listxattr, rel)

    def setxattr(self, rel: str, name: bytes, value: bytes) -> None:
        self._xattr(os.setxattr, rel, name, value)

    def removexattr(self, rel: str, name: bytes) -> None:
        self._xattr(os.removexattr, rel, name)

    def rename(self, src: str, dst: str, flags: int) -> None:
        """renameat2(2) between two anchored directories (flags: RENAME_NOREPLACE, RENAME_EXCHANGE)."""
        src_fd, src_name, src_owned = self._parent(src)
        try:
            dst_fd, dst_name, dst_owned = self._parent(dst)
            try:
                if _libc.renameat2(src_fd, os.fsencode(src_name), dst_fd, os.fsencode(dst_name), flags) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err), src, None, dst)
            finally:
                if dst_owned:
                    os.close(dst_fd)
        finally:
            if src_owned:
                os.close(src_fd)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)
