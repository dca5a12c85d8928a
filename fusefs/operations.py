"""The pyfuse3 operations adapter: passthrough of the backing tree, with the protocol on managed files.

Every rule comes from `coherent_volume.core.VolumeCore`; this module only decides *where* a
check happens (see shared field notes): at open with write access or O_TRUNC, at rename when
either end is managed, at unlink and at setattr(size) — never at write, flush or release,
which cannot reach the calling program cleanly. Blocking protocol work runs in worker threads
so one slow commit never stalls other requests.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat as stat_mod
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import trio

from coherent_volume import atomic
from coherent_volume.core import VolumeCore
from coherent_volume.errors import CoherenceError
from coherent_volume.fingerprint import hash_fd
from coherent_volume.liveness import current_process, start_time
from coherent_volume.paths import Target, is_registry_path

from .handles import Handle, Listing, Passthrough, Shadow, Snapshot
from .identity import AgentResolver, process_of
from .inodes import InodeTable
from .watcher import OwnChanges

log = logging.getLogger("coherent_volume.fuse")

UNMANAGED_TIMEOUT = 1.0
"""Kernel entry/attribute cache lifetime for unmanaged paths; foreign changes are invalidated."""

EDITORS = frozenset({"vi", "vim", "nvim", "vim.basic", "vim.tiny", "gvim", "emacs", "nano", "micro", "kak", "hx"})
"""Programs that hold a file in a buffer: their view is the version they loaded, so their later
re-reads of it (vim's backup copy while saving) must not advance it."""

XATTR_VERSION = b"user.coherent.version"
XATTR_VIEW = b"user.coherent.view"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def guarded(handler: F) -> F:
    """Map every exception to a FUSEError: anything else escaping a handler kills the mount."""
    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except CoherenceError as e:  # refusals are EACCES; a full or busy registry, a bad path say so
            log.info("refused: %s", e)
            raise pyfuse3.FUSEError(getattr(e, "errno", None) or errno.EACCES) from None
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper  # type: ignore[return-value]


class CoherentOperations(pyfuse3.Operations):
    """FUSE requests -> backing directory + VolumeCore."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, core: VolumeCore, resolver: AgentResolver) -> None:
        super().__init__()
        self.core = core
        self.root = core.paths.root
        self.resolver = resolver
        self.inodes = InodeTable()
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._owner = current_process()
        self.own = OwnChanges()
        self._editor_reads: set[tuple[int, int | None, str]] = set()

    # ---- helpers ------------------------------------------------------------------

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def _target(self, rel: str) -> Target:
        return self.core.paths.of_rel(rel)

    def _child(self, parent: int, name: bytes) -> str:
        rel = self.inodes.child(parent, name)
        if is_registry_path(rel):
            raise pyfuse3.FUSEError(errno.ENOENT)  # the registry is invisible in the mount
        return rel

    def _attrs(self, rel: str, inode: int) -> pyfuse3.EntryAttributes:
        st = os.lstat(self._abs(rel))
        entry = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize", "st_blocks",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(entry, name, getattr(st, name))
        entry.st_ino = inode
        entry.generation = 0
        timeout = 0.0 if stat_mod.S_ISREG(st.st_mode) and self.core.paths.managed(rel) else UNMANAGED_TIMEOUT
        entry.entry_timeout = UNMANAGED_TIMEOUT
        entry.attr_timeout = timeout
        return entry

    def _entry(self, rel: str) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that the kernel will count as one lookup."""
        attrs = self._attrs(rel, self.inodes.inode(rel))
        self.inodes.remember(rel)
        return attrs

    def _own(self, rel: str, ctx: pyfuse3.RequestContext) -> None:
        """New entries belong to the caller, as on a local file system (the daemon runs as root)."""
        if os.geteuid() == 0:
            os.lchown(self._abs(rel), ctx.uid, ctx.gid)

    def _add(self, handle: Handle) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = handle
        return fh

    async def _agent(self, ctx: pyfuse3.RequestContext) -> str:
        return (await self._identity(ctx))[0]

    async def _identity(self, ctx: pyfuse3.RequestContext) -> tuple[str, bool]:
        """(agent, pinned) of the calling process; looked up off the event loop unless just seen."""
        known = self.resolver.cached(ctx.pid)
        if known is not None:
            return known
        return await trio.to_thread.run_sync(self.resolver.agent, ctx.pid)

    @staticmethod
    async def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    def _managed_file(self, rel: str) -> bool:
        if not self.core.paths.managed(rel):
            return False
        try:
            return stat_mod.S_ISREG(os.lstat(self._abs(rel)).st_mode)
        except FileNotFoundError:
            return True

    # ---- metadata -----------------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self._child(parent_inode, name))

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.path(inode), inode)

    @guarded
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self.inodes.path(inode)
        path = self._abs(rel)
        handle = self.handles.get(fh) if fh is not None else None
        self.own.note(rel)
        if fields.update_size:
            if isinstance(handle, Shadow):
                os.ftruncate(handle.fd, attr.st_size)
                handle.pending = handle.wrote = True
            elif isinstance(handle, Snapshot):
                raise pyfuse3.FUSEError(errno.EBADF)
            elif self._managed_file(rel):
                agent = await self._agent(ctx)
                await self._blocking(self._truncate_managed, agent, rel, attr.st_size)
            elif isinstance(handle, Passthrough):
                os.ftruncate(handle.fd, attr.st_size)
            else:
                os.truncate(path, attr.st_size)
        if fields.update_mode:
            os.chmod(path, stat_mod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            os.lchown(path, attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            os.utime(path, ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                               attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns), follow_symlinks=False)
        return self._attrs(rel, inode)

    def _truncate_managed(self, agent: str, rel: str, size: int) -> None:
        """truncate(2) by path: a commit of the resized content, with the usual checks."""
        target = self._target(rel)
        with open(target.abs, "rb") as f:
            data = f.read(size)
        self.core.commit(agent, target, data.ljust(size, b"\0"))

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self._abs(self.inodes.path(inode))))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.root)
        data = pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail",
                     "f_namemax"):
            setattr(data, name, getattr(st, name))
        return data

    @guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel already checked the mode bits

    # ---- directories --------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        rel = self.inodes.path(inode)
        names = sorted(os.listdir(self._abs(rel)))
        if rel == "":
            names = [n for n in names if not is_registry_path(n)]
        return self._add(Listing(inode, [os.fsencode(n) for n in names]))

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.handles[fh]
        assert isinstance(listing, Listing)
        for index in range(start_id, len(listing.names)):
            rel = self.inodes.child(listing.inode, listing.names[index])
            try:
                attrs = self._attrs(rel, self.inodes.inode(rel))
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, listing.names[index], attrs, index + 1):
                return
            self.inodes.remember(rel)

    @guarded
    async def releasedir(self, fh: int) -> None:
        self.handles.pop(fh).close()

    @guarded
    async def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        self.own.note(rel)
        os.mkdir(self._abs(rel), mode & ~ctx.umask)
        self._own(rel, ctx)
        return self._entry(rel)

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = self._child(parent_inode, name)
        self.own.note(rel)
        os.rmdir(self._abs(rel))
        self.inodes.unlinked(rel)

    @guarded
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        self.own.note(rel)
        os.mknod(self._abs(rel), mode & ~ctx.umask, rdev)
        self._own(rel, ctx)
        return self._entry(rel)

    @guarded
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(parent_inode, name)
        self.own.note(rel)
        os.symlink(target, self._abs(rel))
        self._own(rel, ctx)
        return self._entry(rel)

    @guarded
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = self._child(new_parent_inode, new_name)
        self.own.note(rel)
        os.link(self._abs(self.inodes.path(inode)), self._abs(rel), follow_symlinks=False)
        return self._entry(rel)

    # ---- removal and renaming (checked when a managed file is involved) -----------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = self._child(parent_inode, name)
        self.own.note(rel)
        if self._managed_file(rel):
            agent = await self._agent(ctx)
            await self._blocking(self.core.commit, agent, self._target(rel), None)
        else:
            os.unlink(self._abs(rel))
        self.inodes.unlinked(rel)

    @guarded
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        src = self._child(parent_inode_old, name_old)
        dst = self._child(parent_inode_new, name_new)
        self.own.note(src, dst)
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        tree = stat_mod.S_ISDIR(os.lstat(self._abs(src)).st_mode) or (
            exchange and stat_mod.S_ISDIR(os.lstat(self._abs(dst)).st_mode))
        if not tree and (self._managed_file(src) or self._managed_file(dst)):
            if os.path.isdir(self._abs(dst)):
                raise pyfuse3.FUSEError(errno.EISDIR)
            agent = await self._agent(ctx)
            await self._blocking(functools.partial(self.core.rename, agent, self._target(src), self._target(dst),
                                                   exchange=exchange, noreplace=noreplace, durable=False))
        else:
            atomic.rename(self._abs(src), self._abs(dst), exchange=exchange, noreplace=noreplace)
        if exchange:
            self.inodes.exchanged(src, dst, tree)
        else:
            self.inodes.moved(src, dst, tree)

    # ---- files --------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        rel = self.inodes.path(inode)
        if not self._managed_file(rel):
            if (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC:
                self.own.note(rel)  # its close-after-write event is our own echo
            fd = os.open(self._abs(rel), flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY) | os.O_CLOEXEC)
            return pyfuse3.FileInfo(fh=self._add(Passthrough(fd, rel)), keep_cache=True)
        agent, pinned = await self._identity(ctx)
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if not writing:  # a pinned agent's views move only with what its model read (see hooks)
            register = not pinned and self._first_read(ctx.pid, rel)
            fd, version = await self._blocking(functools.partial(self.core.open_version, agent, self._target(rel),
                                                                 register=register))
            return pyfuse3.FileInfo(fh=self._add(Snapshot(fd, version)), direct_io=True)
        handle = await self._blocking(self._open_shadow, agent, rel, flags)
        return pyfuse3.FileInfo(fh=self._add(handle), direct_io=True)

    def _first_read(self, tid: int, rel: str) -> bool:
        """False for an editor re-reading a file it already loaded (its buffer is its view)."""
        pid = process_of(tid)
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in EDITORS:
                    return True
        except OSError:
            return True
        key = (pid, start_time(pid), rel)
        if key in self._editor_reads:
            return False
        if len(self._editor_reads) > 10_000:
            self._editor_reads.clear()
        self._editor_reads.add(key)
        return True

    def _open_shadow(self, agent: str, rel: str, flags: int) -> Shadow:
        """Check and take the write grant, then start a shadow copy of the current content."""
        target = self._target(rel)
        truncate = bool(flags & os.O_TRUNC)
        append = bool(flags & os.O_APPEND)
        grant, owned, version = self.core.begin_write(agent, target, self._owner, need_view=truncate or not append)
        return self._start_shadow(Shadow(target, agent, -1, grant, owned, append, version, pending=truncate),
                                  copy=not truncate)

    def _start_shadow(self, handle: Shadow, copy: bool, owner: tuple[int, int] | None = None) -> Shadow:
        """Give a handle that holds its grant its shadow file (and a file it created, its `owner`);
        on failure the grant is released."""
        try:
            if owner is not None and os.geteuid() == 0:
                os.lchown(handle.target.abs, *owner)
            handle.fd = self._new_shadow(handle.target, copy)
            return handle
        except BaseException:
            if handle.owns_grant and handle.grant is not None:
                self.core.release(handle.grant, log=False)
            raise

    @staticmethod
    def _new_shadow(target: Target, copy: bool) -> int:
        """An unnamed file beside the target (same file system, so the commit can link it in place),
        holding a copy of the target's current content when `copy`."""
        fd = os.open(os.path.dirname(target.abs), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        if copy:
            try:
                with open(target.abs, "rb") as current:
                    size = os.fstat(current.fileno()).st_size
                    while size > 0:
                        size -= os.copy_file_range(current.fileno(), fd, size) or size
            except BaseException:
                os.close(fd)
                raise
        return fd

    @guarded
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        rel = self._child(parent_inode, name)
        mode = stat_mod.S_IMODE(mode) & ~ctx.umask
        self.own.note(rel)
        if not self._managed_file(rel):
            fd = os.open(self._abs(rel), flags | os.O_CREAT | os.O_CLOEXEC, mode)
            self._own(rel, ctx)
            return pyfuse3.FileInfo(fh=self._add(Passthrough(fd, rel)), keep_cache=True), self._entry(rel)
        agent = await self._agent(ctx)
        handle = await self._blocking(self._create_shadow, agent, rel, mode, flags, ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=self._add(handle), direct_io=True), self._entry(rel)

    def _create_shadow(self, agent: str, rel: str, mode: int, flags: int, uid: int, gid: int) -> Shadow:
        """Create a managed file (committed empty) owned by the caller, and open its shadow. A file
        that appeared meanwhile is opened as by open(2) with these flags, unless O_EXCL."""
        target = self._target(rel)
        try:
            grant, owned, version = self.core.create(agent, target, mode, self._owner)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            return self._open_shadow(agent, rel, flags)
        return self._start_shadow(Shadow(target, agent, -1, grant, owned, bool(flags & os.O_APPEND), version,
                                         created=True), copy=False, owner=(uid, gid))

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles[fh]
        if isinstance(handle, Shadow) and handle.fd < 0:
            await self._blocking(self._reshadow, handle)
        return os.pread(handle.fd, size, off)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        if isinstance(handle, Snapshot):
            raise pyfuse3.FUSEError(errno.EBADF)
        self.own.note(handle.rel if isinstance(handle, Passthrough) else handle.target.rel)
        if isinstance(handle, Shadow):
            if handle.grant is None:  # writing again after a commit: take the grant back first
                await self._blocking(self._regrant, handle)
            if handle.fd < 0:
                await self._blocking(self._reshadow, handle)
            if handle.append:
                off = os.fstat(handle.fd).st_size
            handle.pending = handle.wrote = True
            handle.synced = False
        return os.pwrite(handle.fd, buf, off)

    @guarded
    async def flush(self, fh: int) -> None:
        handle = self.handles.get(fh)
        if isinstance(handle, Shadow) and handle.wrote:
            await self._blocking(self._commit_shadow, handle)

    def _commit_shadow(self, handle: Shadow) -> None:
        """Install the shadow's content as one commit, then end the grant so that close() returning
        means the file is free; a refusal is reported to close(). The commit is as durable as the
        program asked: content it fsynced into an existing file survives a power loss, as it
        would on a local disk; anything else reaches the disk with the next writeback."""
        handle.pending = handle.wrote = False
        self.own.note(handle.target.rel)
        durable = handle.synced and not handle.created
        staged = atomic.Staged(handle.target.abs, hash_fd(handle.fd), handle.fd, durable=durable)
        handle.fd = -1  # the commit installs (or discards) the shadow itself
        handle.base_version = self.core.commit(handle.agent, handle.target, staged, expected=handle.base_version,
                                               ending=handle.grant if handle.owns_grant else None)
        handle.grant = None

    def _reshadow(self, handle: Shadow) -> None:
        """A new shadow after a commit: a copy of what this handle committed."""
        handle.fd = self._new_shadow(handle.target, copy=True)

    def _regrant(self, handle: Shadow) -> None:
        """The grant for a handle written again after its commit; its next commit is still a CAS."""
        handle.grant, handle.owns_grant, _ = self.core.begin_write(handle.agent, handle.target, self._owner,
                                                                   need_view=False)

    def _drop_grant(self, handle: Shadow) -> None:
        if handle.grant is not None and handle.owns_grant:
            self.core.release(handle.grant, log=False)
        handle.grant = None

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        if isinstance(handle, Snapshot):
            return
        if isinstance(handle, Shadow) and handle.fd < 0:  # its content is committed: make that durable
            await self._blocking(self._sync_committed, handle.target.abs)
            return
        await self._blocking(os.fdatasync if datasync else os.fsync, handle.fd)
        if isinstance(handle, Shadow):
            handle.synced = True

    @staticmethod
    def _sync_committed(path: str) -> None:
        """fsync a committed file and its directory: its content and its name survive a power loss."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        atomic.fsync_dir(os.path.dirname(path))

    @guarded
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        listing = self.handles[fh]
        assert isinstance(listing, Listing)
        await self._blocking(atomic.fsync_dir, self._abs(self.inodes.path(listing.inode)))

    @guarded
    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if isinstance(handle, Shadow) and (handle.pending or handle.grant is not None):
            await self._blocking(self._release_shadow, handle)
        else:
            handle.close()

    def _release_shadow(self, handle: Shadow) -> None:
        try:
            if handle.pending:
                try:
                    self._commit_shadow(handle)
                except (CoherenceError, OSError) as e:
                    log.warning("commit at release of %s failed: %s", handle.target.rel, e)
        finally:
            self._drop_grant(handle)
            handle.close()

    # ---- extended attributes --------------------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        rel = self.inodes.path(inode)
        if name in (XATTR_VERSION, XATTR_VIEW):
            if not self._managed_file(rel):
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            agent = await self._agent(ctx)
            version, view = await self._blocking(self.core.view_state, agent, self._target(rel))
            return str(version).encode() if name == XATTR_VERSION else view.encode()
        return os.getxattr(self._abs(rel), name, follow_symlinks=False)

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        rel = self.inodes.path(inode)
        names = [os.fsencode(n) for n in os.listxattr(self._abs(rel), follow_symlinks=False)]
        if self._managed_file(rel) and os.path.exists(self._abs(rel)):
            names += [XATTR_VERSION, XATTR_VIEW]
        return names

    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in (XATTR_VERSION, XATTR_VIEW):
            raise pyfuse3.FUSEError(errno.EPERM)
        os.setxattr(self._abs(self.inodes.path(inode)), name, value, follow_symlinks=False)

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in (XATTR_VERSION, XATTR_VIEW):
            raise pyfuse3.FUSEError(errno.EPERM)
        os.removexattr(self._abs(self.inodes.path(inode)), name, follow_symlinks=False)

    # ---- inode lifetime -------------------------------------------------------------

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.inodes.forget(inode, count)
