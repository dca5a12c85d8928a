"""A do-nothing passthrough file system in pyfuse3 + trio: bench_fuse's floor for the binding.

It forwards each request to the backing directory and nothing else (no protocol, no watcher,
no identity), served by the same pyfuse3 main loop as coherent-volume's mount. Whatever it costs
over bindfs (C, libfuse, many threads) is the price of the binding itself, which no work in our
own handlers can win back. Only what bench_fuse's small-file and sequential operations need.

    python -m tests.harness.floorfs ROOT MOUNTPOINT   (from the repo root; in the foreground,
                                                      `fusermount3 -u MOUNTPOINT` ends it)
"""

from __future__ import annotations

import errno
import os
import sys

import pyfuse3
import trio

ATTRS = (
    "st_mode",
    "st_nlink",
    "st_uid",
    "st_gid",
    "st_size",
    "st_blksize",
    "st_blocks",
    "st_atime_ns",
    "st_mtime_ns",
    "st_ctime_ns",
)


class Floor(pyfuse3.Operations):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.paths = {pyfuse3.ROOT_INODE: root}
        self.inodes = {root: pyfuse3.ROOT_INODE}
        self.next_inode = pyfuse3.ROOT_INODE + 1

    def _inode(self, path: str) -> int:
        if path not in self.inodes:
            self.inodes[path], self.next_inode = self.next_inode, self.next_inode + 1
            self.paths[self.inodes[path]] = path
        return self.inodes[path]

    def _attrs(self, path: str) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None
        entry = pyfuse3.EntryAttributes()
        for name in ATTRS:
            setattr(entry, name, getattr(st, name))
        entry.st_ino = self._inode(path)
        entry.entry_timeout = entry.attr_timeout = 1.0
        return entry

    def _child(self, parent: int, name: bytes) -> str:
        return os.path.join(self.paths[parent], os.fsdecode(name))

    async def lookup(self, parent_inode, name, ctx):
        return self._attrs(self._child(parent_inode, name))

    async def getattr(self, inode, ctx):
        return self._attrs(self.paths[inode])

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size:
            os.truncate(self.paths[inode], attr.st_size)
        return self._attrs(self.paths[inode])

    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self.paths[inode], name, follow_symlinks=False)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno) from None

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=os.open(self.paths[inode], flags & ~os.O_CREAT), keep_cache=True)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        fd = os.open(path, flags | os.O_CREAT, mode)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True), self._attrs(path)

    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        await trio.to_thread.run_sync(os.fsync, fh)  # as the mount does: never block the loop on the disk

    async def release(self, fh):
        os.close(fh)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src, dst = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        os.rename(src, dst)
        self.inodes.pop(dst, None)
        self.inodes[dst] = self.inodes.pop(src, None) or self._inode(dst)
        self.paths[self.inodes[dst]] = dst

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        os.unlink(path)
        self.inodes.pop(path, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        os.mkdir(path, mode)
        return self._attrs(path)


def main(root: str, mountpoint: str) -> None:
    pyfuse3.init(Floor(os.path.realpath(root)), mountpoint, set(pyfuse3.default_options) | {"fsname=floorfs"})
    try:
        trio.run(pyfuse3.main, 4, 64)  # the mount's own min/max worker tasks
    finally:
        pyfuse3.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
