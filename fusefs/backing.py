"""The mount's access to the backing tree, anchored at the root's descriptor: the only module of
the mount that touches backing paths for metadata and directories.

Every path is resolved beneath the root by the kernel (`openat2` with RESOLVE_BENEATH and
RESOLVE_NO_SYMLINKS for the directory that holds the entry, then an `*at` call on the entry's
own name, never following it), as libfuse's passthrough_hp anchors each access at a file
descriptor: a directory swapped for a symlink behind the daemon's back fails with ELOOP/EXDEV
instead of steering a root daemon outside the volume.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat as stat_mod
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_SYS_OPENAT2 = 437  # x86_64 and aarch64 alike
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_PATH_MAX = 4096


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class Backing:
    """The backing directory of one mount. `rel` paths are root-relative ("" is the root)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        os.close(self._root_fd)

    def _openat2(self, rel: str, flags: int) -> int:
        """An fd for `rel` resolved beneath the root with no symlink on the way (OSError otherwise).
        A path of PATH_MAX bytes or more (a plain directory holds them: only one system call's
        argument is limited) is resolved a run of directories at a time, each beneath the last."""
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
        how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
        fd = _syscall(_SYS_OPENAT2, at, name, ctypes.byref(how), ctypes.sizeof(how))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), rel)
        return int(fd)

    @contextmanager
    def _parent(self, rel: str) -> Iterator[tuple[int, str]]:
        """(fd of the directory holding `rel`, its last component)."""
        if not rel:
            raise OSError(errno.EINVAL, "the root has no parent", rel)
        head, _, name = rel.rpartition("/")
        fd = self._openat2(head, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def lstat(self, rel: str) -> os.stat_result:
        if not rel:
            return os.stat(self._root_fd)
        with self._parent(rel) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def open(self, rel: str, flags: int, mode: int = 0o777) -> int:
        """open(2) of a file: the last component is not followed either (O_NOFOLLOW)."""
        with self._parent(rel) as (fd, name):
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def opendir(self, rel: str) -> int:
        """A descriptor of the directory `rel` (os.listdir reads it; fstat still works once it is removed)."""
        return self._openat2(rel, os.O_RDONLY | os.O_DIRECTORY)

    def readlink(self, rel: str) -> str:
        with self._parent(rel) as (fd, name):
            return os.readlink(name, dir_fd=fd)

    def mkdir(self, rel: str, mode: int) -> None:
        with self._parent(rel) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def rmdir(self, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            os.rmdir(name, dir_fd=fd)

    def mknod(self, rel: str, mode: int, device: int) -> None:
        with self._parent(rel) as (fd, name):
            os.mknod(name, mode, device, dir_fd=fd)

    def unlink(self, rel: str) -> None:
        with self._parent(rel) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def truncate(self, rel: str, size: int) -> None:
        fd = self.open(rel, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    @contextmanager
    def _entry(self, rel: str) -> Iterator[int]:
        """An O_PATH fd of `rel` itself (a symlink stays a symlink), for the *at calls that act on it."""
        fd = self._openat2(rel, os.O_PATH | os.O_NOFOLLOW)
        try:
            yield fd
        finally:
            os.close(fd)

    def chmod(self, rel: str, mode: int) -> None:
        """chmod of the entry itself; a symlink has no mode of its own on Linux (EOPNOTSUPP)."""
        with self._entry(rel) as fd:
            if stat_mod.S_ISLNK(os.stat(fd).st_mode):
                raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), rel)
            os.chmod(self._proc(fd), mode)

    def chown(self, rel: str, uid: int, gid: int) -> None:
        with self._parent(rel) as (fd, name):
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)

    def utime(self, rel: str, ns: tuple[int, int]) -> None:
        with self._parent(rel) as (fd, name):
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)

    def _proc(self, fd: int) -> str:
        """The /proc name of an O_PATH fd: xattr calls following it act on that very inode."""
        return f"/proc/self/fd/{fd}"

    def getxattr(self, rel: str, name: bytes) -> bytes:
        with self._entry(rel) as fd:
            return os.getxattr(self._proc(fd), name)

    def listxattr(self, rel: str) -> list[str]:
        with self._entry(rel) as fd:
            return os.listxattr(self._proc(fd))

    def setxattr(self, rel: str, name: bytes, value: bytes) -> None:
        with self._entry(rel) as fd:
            os.setxattr(self._proc(fd), name, value)

    def removexattr(self, rel: str, name: bytes) -> None:
        with self._entry(rel) as fd:
            os.removexattr(self._proc(fd), name)

    def rename(self, src: str, dst: str, flags: int) -> None:
        """renameat2(2) between two anchored directories (flags: RENAME_NOREPLACE, RENAME_EXCHANGE)."""
        with self._parent(src) as (src_fd, src_name), self._parent(dst) as (dst_fd, dst_name):
            if _libc.renameat2(src_fd, os.fsencode(src_name), dst_fd, os.fsencode(dst_name), flags) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), src, None, dst)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root)
