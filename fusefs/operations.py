"""The pyfuse3 operations adapter: passthrough of the backing tree, with the protocol on managed files.

Every rule comes from `coherent_volume.core.VolumeCore`; this module only decides *where* a
check happens (see shared field notes): at open with write access or O_TRUNC, at rename when
either end is managed, at unlink and at setattr(size) — never at write, flush or release,
which cannot reach the calling program cleanly. Blocking protocol work runs in worker threads
so one slow commit never stalls other requests.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat as stat_mod
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import pyfuse3
import trio

from coherent_volume.core import VolumeCore
from coherent_volume.core.renames import refuse_hard_link
from coherent_volume.errors import CoherenceError, CommitPending, RegistryError
from coherent_volume.fingerprint import Fingerprint
from coherent_volume.globs import STAGED
from coherent_volume.liveness import ProcessId, current_process
from coherent_volume.mounts import direct_dir_in
from coherent_volume.paths import Target, is_registry_path
from coherent_volume.protocol import BUFFERING_PROGRAMS, agent_name_problem

from .backing import Backing
from .handles import (
    RETRY_WAIT,
    STALL,
    FileHandle,
    Listing,
    PageCache,
    Passthrough,
    Retry,
    Shadow,
    Snapshot,
    Unprivileged,
    blocking,
    errno_of,
    fsync,
    kill_set_ids,
    kill_set_ids_at,
    reads_only,
    touch,
)
from .identity import AgentResolver, administers, proc_file, process_of
from .inodes import InodeTable
from .watcher import OwnChanges

log = logging.getLogger("coherent_volume.fuse")

UNMANAGED_TIMEOUT = 1.0
"""Kernel entry/attribute cache lifetime for unmanaged paths; foreign changes are invalidated."""

RELEASE_WAIT = 0.5
"""Seconds a managed change waits for its agent's write handles that a close(2) left holding their
grant to be released (see `_writer`)."""

LEFT_NAMES = 16
"""How many of the names an inode had before checked renames carried it out of the globs the mount
keeps (`_left`), the newest: a path walk spans one system call, which that many renames of one
inode do not fit in."""

_NOT_PASSED = os.O_DIRECT
"""Open flags a caller's open of an unmanaged file does not pass to the backing file: the daemon
writes a caller's data from its own buffers, which `O_DIRECT`'s alignment rules refuse (EINVAL)."""

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
        except RegistryError as e:  # the registry failed: the program is told EIO (or ENOSPC, EBUSY)
            log.warning("%s failed (%s): %s", handler.__name__, errno.errorcode.get(errno_of(e), "?"), e)
            raise pyfuse3.FUSEError(errno_of(e)) from None
        except CoherenceError as e:  # refusals are EACCES; a bad path says so
            log.info("refused: %s", e)
            raise pyfuse3.FUSEError(errno_of(e)) from None
        except OSError as e:
            gone = args[0].core.root_gone() if e.errno == errno.ENOENT else None  # (args[0]: the operations)
            if gone is not None:
                log.warning("refused: %s", gone)
                raise pyfuse3.FUSEError(errno_of(gone)) from None
            raise pyfuse3.FUSEError(errno_of(e)) from None
        except Exception:
            log.exception("internal error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]


async def _made(commit: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run a checked change (a deletion, a rename) in a worker thread. One made on disk whose
    record is pending (`CommitPending`: recovery records it as its writer's) was made: the caller
    is told success, as the disk says, and the log why its version is not recorded yet (it was
    told ENOSPC or EIO while its file was gone)."""
    try:
        await blocking(commit, *args, **kwargs)
    except CommitPending as e:
        log.warning("%s", e)


def _call_of(tid: int) -> str | None:
    """The system call thread `tid` is blocked in, with its arguments (/proc/TID/syscall; "running"
    while it is runnable, which tells nothing of where it is), "" once the thread is gone; None
    where that cannot be read (a caller outside this PID namespace: 0)."""
    if tid <= 0:
        return None
    try:
        with open(f"/proc/{tid}/syscall") as f:
            return f.read()
    except FileNotFoundError:
        return ""
    except OSError:
        return None


async def _forget_entry(parent_inode: int, name: bytes) -> None:
    """Drop the kernel's cached entry of `name` in a worker thread (from a handler it can deadlock)."""
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent_inode, name)
    except OSError:
        pass  # the kernel holds no such entry (any more)


def _names(fd: int, root: bool) -> list[bytes]:
    """The names in the backing directory open as `fd`, sorted; at the mount's `root` without the
    registry's directory."""
    names = sorted(os.listdir(fd))
    return [os.fsencode(n) for n in names if not (root and is_registry_path(n))]


def _visible(rel: str) -> str:
    """`rel`, a name a request reaches the disk by; ENOENT for the registry's, invisible in the mount."""
    if is_registry_path(rel):
        raise pyfuse3.FUSEError(errno.ENOENT)
    return rel


def _at_or_below(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _writable(flags: int) -> bool:
    return (flags & os.O_ACCMODE) != os.O_RDONLY


def _carried(name: str, src: str, dst: str, exchange: bool) -> str:
    """Where the rename of `src` to `dst` (or their exchange) put what was at `name`."""
    for old, new in ((src, dst), (dst, src)) if exchange else ((src, dst),):
        if _at_or_below(name, old):
            return new + name[len(old) :]
    return name


class CoherentOperations(pyfuse3.Operations):
    """FUSE requests -> backing directory + VolumeCore."""

    supports_dot_lookup = False
    enable_writeback_cache = False

    def __init__(self, core: VolumeCore, resolver: AgentResolver, direct_dirs: Sequence[str] = ()) -> None:
        super().__init__()
        self.core = core
        self.direct_dirs = tuple(direct_dirs)
        """Root-relative directories bound over the mount (fusefs/direct.py): served by the kernel."""
        self.root = core.paths.root
        self.resolver = resolver
        self.inodes = InodeTable()
        self.backing = Backing(self.root, self.inodes.inode_if_known)
        self.files: dict[int, FileHandle] = {}
        self.file_inodes: dict[int, int] = {}
        self.open_on: dict[int, dict[int, FileHandle]] = {}
        """The open file handles of each inode, by file handle (`files` indexed by `file_inodes`)."""
        self._renaming: dict[str, trio.Event] = {}
        """Paths a checked rename is changing right now, or is about to (see `_settled`, `rename`)."""
        self._using: dict[str, int] = {}
        """Paths requests reach the disk by across an await right now, each as often as requests use it
        (`_use`): a checked rename at or above one waits until they are done (`_unused`)."""
        self._used: trio.Event | None = None
        """Set (and dropped) whenever a request stops using paths (`_use`), while a rename waits for that
        (`_unused`)."""
        self._files: dict[tuple[int, int], int] = {}
        """The inode of each unmanaged non-directory seen, by its backing (st_dev, st_ino): a hard link
        of it is looked up as that inode (see `_inode_of`)."""
        self.writers: dict[str, Shadow] = {}
        """The write handle that last changed each managed path (see `setattr`)."""
        self._aside: dict[int, str] = {}
        """Inodes of write handles that their file's name does not map to, with that name: each write
        opened by name has one of its own (`_apart`), and a write handle whose name moved on
        (`_fresh_inode`) keeps its own; see `_writers_apart`, `_take_name_back`."""
        self._sizes: dict[int, int | None] = {}
        """The size the kernel holds for each managed file's inode (it copies up to it), None when the
        mount cannot be sure of it: once two replies told it different sizes, since the kernel applies
        an attribute reply only if it applied none for that inode since it sent the request, and so may
        keep the older one (see `_pin`)."""
        self._cached_as: dict[int, Fingerprint] = {}
        """The file of each unmanaged inode as its last open found it (`_keeps_cache`)."""
        self._truncated: dict[int, tuple[int, str | None]] = {}
        """Inodes a truncate by name went through, with the truncating thread and the system call it
        was in (`_call_of`): until that thread takes the reply, the kernel drops every other reply
        about the inode and copies reads through its page cache up to the old size
        (FUSE_I_SIZE_UNSTABLE; another agent's read of the new content came back padded with NULs
        to the old size, found by fsx), and no reply tells when it took it. Their readers are served
        direct till the thread is out of that call (`_may_cache`), or the kernel forgets the inode."""
        self._pins: set[int] = set()
        """File handles of versions held for read-only opens the kernel is about to repeat (`_pin`)."""
        self._private: set[int] = set()
        """The inodes made for a write (`_apart`), until the kernel forgets them: they never take the
        name, and are in `_aside` until their write handle's release."""
        self._left_globs: dict[int, dict[str, int]] = {}
        """The names that could be or hold managed paths which each inode had before a checked rename
        carried it (or a directory above it) to an unmanaged name, until the kernel forgets it, each
        with that rename's number (`_carries`): a path walk that resolved the inode before that rename
        meant a name below those (`_walk_again`)."""
        self._carries = 0
        """How many checked renames were done (numbering them for `_left_globs`)."""
        self.releasing: dict[int, Shadow] = {}
        """Write handles whose release is under way, by file handle (see `_writer`)."""
        self.dirs: dict[int, Listing] = {}
        self.pages = PageCache()
        self._next_fh = 1
        self._owner = current_process()
        self._reaches = functools.lru_cache(maxsize=65536)(core.paths.globs.reaches)
        """Whether a managed glob can match below a directory (cached: the globs never change)."""
        self.own = OwnChanges(self._reaches)

    # ---- helpers ------------------------------------------------------------------

    def _target(self, rel: str) -> Target:
        return self.core.paths.of_rel(rel)

    async def _path(self, inode: int) -> str:
        """The path of `inode`, for a request that reaches the disk by it, or by the name the inode is
        set aside to (`_aside`; see `_settled`)."""
        if not self._renaming:  # (`_settled` without its closures: most requests meet no rename)
            return self.inodes.path(inode)
        [rel] = await self._settled(functools.partial(self.inodes.path, inode), inode=inode)
        return rel

    async def _child(self, parent: int, name: bytes) -> str:
        """The path of `name` in `parent`, for a request that reaches the disk by it (see `_settled`)."""
        if not self._renaming:  # (`_children` without its lists: most requests meet no rename)
            return _visible(self.inodes.child(parent, name))
        [rel] = await self._children((parent, name))
        return rel

    async def _children(self, *entries: tuple[int, bytes], inode: int | None = None) -> list[str]:
        """The paths of the names `entries` (each a directory's inode and a name in it), and of `inode`
        after them if given, for a request that reaches the disk by all of them: settled together
        (`_settled`), so none went stale while another waited for a rename."""
        if self._renaming:
            children = [functools.partial(self.inodes.child, parent, name) for parent, name in entries]
            own = [functools.partial(self.inodes.path, inode)] if inode is not None else []
            rels = await self._settled(*children, *own, inode=inode)
        else:  # (no closures: most requests meet no rename)
            rels = [self.inodes.child(parent, name) for parent, name in entries]
            rels += [self.inodes.path(inode)] if inode is not None else []
        for rel in rels[: len(entries)]:
            _visible(rel)
        return rels

    def _stat(self, rel: str, inode: int) -> os.stat_result:
        """The backing file at `rel`, reached through an open handle when its name is gone
        (unlinked while open, or a directory above it swapped behind the daemon's back). An inode set
        aside for a write handle (`_unname`) is the file at its name, whose content it serves, until
        another commit replaced the file its handle committed (`Shadow.kept`): that file then, at no name
        (`st_nlink` 0), whose bytes the handle reads, as on a local disk."""
        aside = self._aside_name(inode)
        rel = aside or rel
        try:
            if "\0" in rel:  # unlinked while open, or its name is another inode's now (InodeTable.unlinked)
                raise OSError(errno.ESTALE, "Stale file handle", rel)  # the kernel looks the name up again
            now = self.backing.lstat(rel)
            kept = self._kept_stat(inode) if aside is not None else None
            return kept if kept is not None and not os.path.samestat(kept, now) else now
        except OSError:
            st = self._held_stat(inode)
            if st is not None:
                return st
            for listing in self.dirs.values():  # a directory removed while open
                if listing.inode == inode:
                    return os.fstat(listing.fd)
            raise

    def _kept_stat(self, inode: int) -> os.stat_result | None:
        """The stat of the file the last commit of a write handle open on `inode` left (`Shadow.kept`),
        if one holds nothing else (no shadow: its writes committed)."""
        for handle in self._handles_on(inode):
            if isinstance(handle, Shadow):
                st = handle.committed_stat()
                if st is not None:
                    return st
        return None

    def _held_stat(self, inode: int) -> os.stat_result | None:
        """The stat of the file an open handle of `inode` holds (a committed write handle's: the file at
        its name), if one does."""
        for handle in self._handles_on(inode):
            st = handle.stat()
            if st is None and isinstance(handle, Shadow) and not (handle.moved or handle.unlinked):
                with contextlib.suppress(OSError):  # committed (no shadow now): its content is the file's
                    st = self.backing.lstat(handle.rel)
            if st is not None:
                return st
        return None

    def _handles_on(self, inode: int) -> list[FileHandle]:
        """The open file handles of `inode`."""
        held = self.open_on.get(inode)
        return list(held.values()) if held is not None else []

    def _fresh_inode(self, rel: str) -> None:
        """Give the managed file at `rel` a new inode, leaving the old one to the readers of its page
        cache (`PageCache.used`); other callers' cached entries of the name are dropped. A caller
        that answers ESTALE (`_stale`) makes the kernel look the path up again and repeat the call there.
        An inode that a write handle is open on takes the name back once it serves the file again
        (`_take_name_back`)."""
        self._unname(rel)
        entry = self._entry_of(rel)
        if entry is not None:
            trio.lowlevel.spawn_system_task(_forget_entry, *entry)

    def _unname(self, rel: str) -> None:
        """The managed file at `rel` loses its inode (its next lookup gives it a new one), which is left
        to its handles, holding a past version of the file (`InodeTable.superseded`); one a write handle
        is open (or being opened) on is set aside to take the name back later."""
        old = self.inodes.inode_if_known(rel)
        if old is not None and (self.pages.opening(old) or any(isinstance(h, Shadow) for h in self._handles_on(old))):
            self._aside[old] = rel
        self.inodes.superseded(rel)
        if old is not None:
            self._let_go(old)  # (one that nothing holds any more: a pin released before it lost its name)

    def _other_content(self, inode: int) -> bool:
        """Whether a read-only open repeated after ESTALE would meet another content on `inode`: a write
        handle, or a write being made there (readers of the version it will read may share)."""
        return self.pages.opening(inode) or any(not isinstance(h, Snapshot) for h in self._handles_on(inode))

    async def _name_of(self, inode: int) -> str:
        """The path a call on `inode` changes or asks about by name: its own, or for an inode set aside
        for a write handle (`_unname`), its name's, whose metadata is the file's (a chmod through the
        name is the file's, not the shadow's its commit would replace). See `_settled`."""
        [rel] = await self._settled(lambda: self._aside_name(inode) or self.inodes.path(inode), inode=inode)
        return rel

    async def _still_its_file(self, inode: int) -> None:
        """Before a metadata call of `inode` (`_metadata_at`): if its readers hold a past version of a
        file at a name (`InodeTable.current_name`; a change made outside this mount is noticed here,
        `_replaced`) and the registry shows a deletion there since the version they hold (the file
        there now is another one), it is of no file at a name any more."""
        held = [h.version for h in self._handles_on(inode) if isinstance(h, Snapshot)]
        if not held:
            return
        own = self.inodes.path_if_known(inode)
        if own is not None and "\0" not in own and self._replaced(own, inode)[0]:
            self._fresh_inode(own)  # changed outside this mount, unseen so far: a past version now
        name = self.inodes.current_name(inode)
        if name is None:
            return
        target = self._target(name)
        current = await blocking(self.core.version, target)
        if current > min(held):
            since = await blocking(self.core.history, target, current - min(held))
            if any(v.hash is None and v.version > min(held) for v in since):
                self.inodes.not_superseded(inode)

    def _metadata_at(self, inode: int, rel: str) -> str:
        """Where a metadata call (mode, owner, times, xattrs) of `inode`, known by `rel` (`_name_of`),
        acts: at `rel`, or, for an inode holding a past version of a file that a commit replaced
        while descriptors held it (`InodeTable.current_name`), at that file's name, whichever version
        they hold (each commit carries the file's metadata over, so a change made to a past version
        would reach no one). An inode whose file is gone (unlinked, renamed over) keeps `rel`: its
        handles hold the file (`_held_fd`), as on a local disk."""
        return (self.inodes.current_name(inode) if "\0" in rel else None) or rel

    def _aside_name(self, inode: int) -> str | None:
        """The name `inode` was set aside from (`_unname`, `_apart`), while a write handle open on it
        still goes on with the file there (none was renamed away or unlinked since), or the write it
        was made for is not open yet."""
        rel = self._aside.get(inode)
        if rel is None:
            return None
        writers = [h for h in self._handles_on(inode) if isinstance(h, Shadow)]
        if not writers and inode in self._private:
            return rel  # made for a write not opened yet: the kernel checks permissions with a getattr first
        return rel if any(not (h.moved or h.unlinked) for h in writers) else None

    def _entry_of(self, rel: str) -> tuple[int, bytes] | None:
        """The kernel's entry of the name `rel`: its directory's inode and its name (None: the kernel
        holds no entry there, since it holds no such directory)."""
        parent, _, name = rel.rpartition("/")
        parent_inode = self.inodes.inode_if_known(parent)
        return None if parent_inode is None else (parent_inode, os.fsencode(name))

    def _stale(
        self, rel: str, ctx: pyfuse3.RequestContext, writing: bool, pin: int | None = None, attributes: bool = False
    ) -> pyfuse3.FUSEError:
        """ESTALE for a call by name whose inode is no longer (or must no longer be) its name's: the
        kernel looks the name up again and repeats the call there, once. The mount expects that
        repeat (`PageCache.retry`), so it never meets ESTALE again: see `lookup`, `open`, `setattr`.
        `pin`: the file handle of the version a read-only open is repeated with (`_pin`)."""
        self.pages.retry(ctx.pid, rel.partition("\0")[0], writing, pin, self._carries, attributes)
        return pyfuse3.FUSEError(errno.ESTALE)

    @contextlib.contextmanager
    def _writing(self, rel: str, inode: int, ctx: pyfuse3.RequestContext, repeat: bool) -> Iterator[None]:
        """Around a write to the managed file at `rel` through `inode` (`repeat`: the kernel's repeat of
        a call answered ESTALE): if handles are open on the inode, the file gets a new inode, where
        the kernel repeats the write (ESTALE), since an inode serves one content (`PageCache`); a
        repeat meeting handles opened on it meanwhile goes ahead there, unless readers use its page
        cache. Meanwhile no reader of `rel` starts using the page cache (`PageCache.writing`)."""
        if self.pages.used(inode) or ((self._handles_on(inode) or self.pages.opening(inode)) and not repeat):
            if self.inodes.inode_if_known(rel) == inode:
                self._fresh_inode(rel)
            raise self._stale(rel, ctx, writing=True)
        with self.pages.writing(rel, inode):
            yield

    def _unpin(self, rel: str) -> None:
        """A file just made at `rel` gets a new inode if handles are still open on the one its name
        had (a file removed behind the volume's back): an inode serves one content."""
        inode = self.inodes.inode_if_known(rel)
        if inode is not None and self._handles_on(inode):
            self._fresh_inode(rel)

    async def _forget(self, rel: str) -> None:
        """Drop the kernel's entry of the name `rel` before the reply (only from a request that holds no
        lock of a file: a write or truncate holds its file's, which a rename of it that holds the
        directory's waits for, and dropping the entry takes the directory's)."""
        entry = self._entry_of(rel)
        if entry is not None:
            await _forget_entry(*entry)

    def _writers_apart(self, rel: str) -> list[tuple[int, Shadow]]:
        """The inodes of write handles of the file at `rel` that its name does not map to, and those
        handles (still going on with that file: not renamed away or unlinked)."""
        return [
            (inode, handle)
            for inode, name in self._aside.items()
            if name == rel
            for handle in self._handles_on(inode)
            if isinstance(handle, Shadow) and not (handle.moved or handle.unlinked)
        ]

    async def _written_by_caller(self, rel: str, ctx: pyfuse3.RequestContext) -> int | None:
        """The inode of the caller's agent's write handle with unsaved writes to the file at `rel`, if it
        has one apart from the name's: while it does, the name is that inode for that agent (its stat
        by the name sees its writes, on the inode its descriptor has, as on a local disk), and the
        committed file's for every other agent; once they are committed (or before any) the name's
        inode for all, so a file written in place keeps its inode number. Read-only opens and
        repeated calls are served by the committed file's (`lookup`)."""
        if not any(handle.unsaved for _, handle in self._writers_apart(rel)):
            return None
        agent = (await self._identity(ctx))[0]
        return next(
            (inode for inode, handle in self._writers_apart(rel) if handle.agent == agent and handle.unsaved), None
        )

    def _answer(self, attrs: pyfuse3.EntryAttributes, inode: int) -> pyfuse3.EntryAttributes:
        """`attrs` as a getattr or setattr reply for `inode`: a write's own inode (`_apart`) shows the
        inode number of its file's name (the kernel reports the number a reply gives, and a lookup
        must give the inode's own), so the program's `fstat` of its descriptor and any `stat` of the
        name agree, as on a local disk (vim checks that the file it opened is the one it stat'ed)."""
        if inode in self._private and self._holds_its_name(inode):  # (by its file's name now: `_renamed`)
            attrs.st_ino = self.inodes.inode(self._aside.get(inode) or self.inodes.path(inode).partition("\0")[0])
        return attrs

    def _holds_its_name(self, inode: int) -> bool:
        """Whether a write's own inode still stands for the file at its name: not once the file its
        handle's commit left (`Shadow.kept`) has no name (another file replaced it there), which then
        shows the inode's own number, as a replaced file does on a local disk (/tmp/s31r3p 1)."""
        kept = self._kept_stat(inode)
        return kept is None or kept.st_nlink > 0

    def _apart(self, rel: str, retry: Retry) -> pyfuse3.EntryAttributes:
        """The lookup of a write by the name `rel` repeated after ESTALE (an open for writing, a truncate
        of a file descriptors are open on): a managed file's write gets an inode of its own, which
        no other call is given (other callers' lookups answer the name's inode, which goes on serving
        the committed file), so no other content is ever served beside its writes (`PageCache`)."""
        st = self.backing.lstat(rel)
        if not (stat_mod.S_ISREG(st.st_mode) and self.core.paths.managed(rel)):
            return self._entry(rel, st)  # (a directory on the way to it)
        retry.rel = rel  # the name the write is repeated by
        inode = self.inodes.apart(rel)
        self._aside[inode] = rel
        self._private.add(inode)
        attrs = self._attrs(rel, inode, st=st)
        self.inodes.looked_up(inode)
        return attrs

    async def _take_name_back(self, inode: int, released: bool) -> None:
        """A write handle's inode apart from its name's (`_aside`) once its writes are committed or
        dropped (`released`: its last descriptor closed). One made for the write (`_apart`) is done
        with at its release: its agent's calls by the name reach the name's inode again, which the
        file kept all along; until the kernel forgets it, it stays `_private`, so a getattr the
        kernel sends it still shows the name's inode number (a stat by the name that looked it up
        just before the release: `_answer`). One whose name moved on while it was open (`_fresh_inode`) takes the name
        back if it still holds a managed regular file and nobody looked the name up meanwhile: a file
        written in place keeps its inode number, as on a local disk; otherwise the name keeps the
        inode the others know it by, and this one is left to its handles, still set aside until
        their release: a FLUSH that is no last close (a forked child's copy of the descriptor) leaves
        the handle writing on, and its agent's stat by the name must see those writes again
        (`_written_by_caller`; they showed the committed size until the close, /tmp/s31posix 1)."""
        if inode in self._private:
            if released:
                self._aside.pop(inode, None)
            return
        if inode not in self._aside or self._unsaved_on(inode) is not None:
            return
        rel = self._aside_name(inode)
        if rel is None or released:
            del self._aside[inode]
        if rel is None:
            return  # its write handle went on with a file renamed away or unlinked
        here = self._handles_on(inode)
        if not self.inodes.lost(inode, rel) or any(isinstance(h, Snapshot) for h in here):
            return  # it has a name again (a hard link), or a repeat's reader beside it
        now = self.inodes.inode_if_known(rel)
        if now is not None and (self.inodes.held(now) or self._handles_on(now)):
            return  # another caller looked the name up meanwhile: its inode stays, so the name's does not change again
        try:
            if not (self.core.paths.managed(rel) and stat_mod.S_ISREG(self.backing.lstat(rel).st_mode)):
                return
        except OSError:
            return
        self._aside.pop(inode, None)
        self.inodes.rebind(inode, rel)
        await self._forget(rel)

    def _replaced(self, rel: str, inode: int) -> tuple[bool, os.stat_result | None]:
        """Whether read-only handles are open on `inode` while the file at `rel` is no longer theirs:
        replaced through another inode, or outside this mount (the Python API, another mount, a
        foreign write), which the mount notices at the next lookup or stat. The path must then get a
        new inode (`_fresh_inode`), or the kernel would take the new file's size for the readers'
        version (and an open by the name would be served beside them). With it, the stat of the file
        at `rel` that told (None: none taken), from which alone a reply for `inode` may be made: a
        commit may land at any moment, and a stat taken after this one could tell the kernel the next
        version's size for the readers' inode, where a copy through their descriptors stops."""
        readers = [h for h in self._handles_on(inode) if isinstance(h, Snapshot)]
        if not readers or "\0" in rel:
            return False, None
        try:
            st = self.backing.lstat(rel)
        except FileNotFoundError:
            return True, None
        theirs = os.fstat(readers[0].fd)
        return (st.st_dev, st.st_ino) != (theirs.st_dev, theirs.st_ino), st

    def _unsaved_on(self, inode: int) -> os.stat_result | None:
        """The stat of the shadow holding the unsaved writes that `inode` serves, if it serves any:
        every stat of the inode shows them (an inode serves one content, `PageCache`), so its
        handle's `fstat` and `lseek(SEEK_END)` see them, as on a local disk. Its name meanwhile
        serves the committed file from another inode (`_apart`)."""
        for handle in self._handles_on(inode):
            if isinstance(handle, Shadow) and handle.unsaved:
                return handle.stat()
        return None

    def _attrs(self, rel: str, inode: int, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """The reply for `inode` at `rel` (`st`: its stat, when the caller just took it). The kernel
        asks for a directory's attributes or name before it sends requests through it (permission
        checks), so this is where a directory is anchored afresh, and an anchored one is looked
        at through its new anchor (see `Backing.anchor`)."""
        fresh = self.backing.anchor(inode, rel) if st is None and self.backing.anchored(inode) else None
        st = fresh or st or self._stat(rel, inode)
        if self.inodes.retyped(inode, st.st_mode):  # another type of file at its name, made behind our back
            held = self._held_stat(inode)
            self._fresh_inode(rel)  # the name gets a new inode; the handles open on this one keep their file
            if held is None or self.inodes.retyped(inode, held.st_mode):
                raise pyfuse3.FUSEError(errno.ESTALE)  # the kernel looks the name up again
            st = held
        mode = st.st_mode
        if fresh is None and stat_mod.S_ISDIR(mode):
            st = self.backing.anchor(inode, rel) or st
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = inode
        entry.st_mode = st.st_mode
        entry.st_nlink = st.st_nlink
        entry.st_uid = st.st_uid
        entry.st_gid = st.st_gid
        entry.st_rdev = st.st_rdev
        entry.st_blksize = st.st_blksize
        entry.st_atime_ns = st.st_atime_ns
        unsaved = self._unsaved_on(inode)
        if unsaved is not None:  # the file's identity (mode, links, owner), the shadow's content
            st = unsaved
        entry.st_size = st.st_size
        entry.st_blocks = st.st_blocks
        entry.st_mtime_ns = st.st_mtime_ns
        entry.st_ctime_ns = st.st_ctime_ns
        # a name whose inode depends on the caller's agent is looked up at each use (`_written_by_caller`)
        entry.entry_timeout = (
            0.0 if self._aside and rel.partition("\0")[0] in self._aside.values() else UNMANAGED_TIMEOUT
        )
        entry.attr_timeout = UNMANAGED_TIMEOUT
        if stat_mod.S_ISREG(mode) and self.core.paths.managed(rel.partition("\0")[0]):
            entry.attr_timeout = 0.0
            told = self._sizes.get(inode, entry.st_size)
            self._sizes[inode] = entry.st_size if told == entry.st_size else None
        return entry

    def _inode_of(self, rel: str, st: os.stat_result | None = None) -> tuple[int, os.stat_result | None]:
        """The inode of `rel` and its stat: the one taken to tell whether its readers' file is still there
        (`_replaced`), else `st` (the caller's, just taken), else the one taken to tell when the name
        is seen for the first time. Such a name that is a hard link of an unmanaged file the mount
        knows by another name is that file's inode, so that every name of a file shows one inode
        number, as on disk (managed names never share: links to them are refused)."""
        inode = self.inodes.inode_if_known(rel)
        if inode is not None:
            replaced, now = self._replaced(rel, inode)
            st = now or st
            if not replaced:
                return inode, st
            self._fresh_inode(rel)
        try:
            st = st or self.backing.lstat(rel)
        except (FileNotFoundError, NotADirectoryError):
            raise  # a missing name gets no inode: every negative lookup would keep one
        except OSError:
            return self.inodes.inode(rel), None
        if stat_mod.S_ISDIR(st.st_mode) or self.core.paths.managed(rel):
            return self.inodes.inode(rel), st
        key = (st.st_dev, st.st_ino)
        inode = self._files.get(key)  # (its inode may be gone since, nameless: `_let_go`)
        if inode is not None and st.st_nlink > 1 and self._holds(self.inodes.path_if_known(inode) or "\0", st):
            self.inodes.link(inode, rel)  # (a backing inode number is reused once its file is gone)
            return inode, st
        inode = self._files[key] = self.inodes.inode(rel)
        return inode, st

    def _entry(self, rel: str, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that the kernel will count as one lookup (`st`: its stat, just taken)."""
        inode, st = self._inode_of(rel, st)
        attrs = self._attrs(rel, inode, st=st)
        self.inodes.remember(rel)
        return attrs

    def _new_owner(self, rel: str, ctx: pyfuse3.RequestContext) -> tuple[int, int]:
        """Who a new entry `rel` belongs to, as on a local file system: the caller, and the caller's
        group unless its directory is set-group-ID (then the kernel gave it the directory's group:
        -1 keeps that)."""
        parent = self.backing.lstat(rel.rpartition("/")[0])
        return ctx.uid, -1 if parent.st_mode & stat_mod.S_ISGID else ctx.gid

    def _own(self, rel: str, ctx: pyfuse3.RequestContext, fd: int | None = None) -> os.stat_result:
        """New entries belong to the caller, as on a local file system (the daemon runs as root);
        returns the entry's stat as it is now. `fd`: the new file's own descriptor, when the caller
        holds one (then the entry is reached through it)."""
        st = self.backing.lstat(rel) if fd is None else os.fstat(fd)
        if (st.st_uid, st.st_gid) == (ctx.uid, ctx.gid) or os.geteuid() != 0:
            return st  # the caller's already (as made, or as its set-group-ID directory gave it)
        uid, gid = self._new_owner(rel, ctx)
        self.backing.chown(rel, uid, gid) if fd is None else os.fchown(fd, uid, gid)
        if st.st_mode & (stat_mod.S_ISUID | stat_mod.S_ISGID) and not stat_mod.S_ISLNK(st.st_mode):
            mode = stat_mod.S_IMODE(st.st_mode)  # chown cleared the set-id bits it was made with
            self.backing.chmod(rel, mode) if fd is None else os.fchmod(fd, mode)
        return self.backing.lstat(rel) if fd is None else os.fstat(fd)

    def _fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    def _keeps_cache(self, inode: int, st: os.stat_result) -> bool:
        """Whether the kernel may keep what it cached of unmanaged `inode` at an open of its file
        (`st`, its fstat): only while the file is as the last open found it. A change behind the volume's back
        that kept its size and mtime (`dd conv=notrunc`, then `touch -d` back) moves its ctime, which
        the kernel does not compare: it served the old bytes for good (found by a hostile probe)."""
        now = Fingerprint.of(st)  # inode, size, mtime, ctime
        before, self._cached_as[inode] = self._cached_as.get(inode), now
        return before == now

    def _open_file(self, handle: FileHandle, inode: int) -> int:
        fh = self._fh()
        self.files[fh] = handle
        self.file_inodes[fh] = inode
        self.open_on.setdefault(inode, {})[fh] = handle
        return fh

    async def _agent(self, ctx: pyfuse3.RequestContext) -> str:
        """The agent a managed change is made for; EACCES for a caller whose agent cannot be told."""
        agent = (await self._identity(ctx))[0]
        if agent is None:
            log.warning(
                "refused a managed change by pid %d: it is outside the daemon's PID namespace (the "
                "kernel reports pid 0), so its agent cannot be told; mount with --agent NAME to name "
                "such callers' agent",
                ctx.pid,
            )
            raise pyfuse3.FUSEError(errno.EACCES)
        return self.core.agent(agent)  # a malformed or reserved name is refused with its reason

    async def _writer(self, ctx: pyfuse3.RequestContext, *rels: str, appending: bool = False) -> str:
        """The agent a managed change of `rels` is made for (see `_agent`), once its write handles there
        that a close(2) left holding their grant are released (RELEASE_WAIT at most): close(2) returns
        at FLUSH, and the kernel sends the RELEASE that ends the grant only after, so the agent's next
        change would otherwise be refused `held` by a handle its program already closed. An open to
        append does not wait for appending handles, which share the grant."""
        agent = await self._agent(ctx)
        closing = [h for h in self._closing(*rels) if h.agent == agent and not (appending and h.kind == "append")]
        await self._released(closing)
        return agent

    def _closing(self, *rels: str) -> list[Shadow]:
        """The write handles at or below `rels` whose release is under way, or that a close(2) left
        holding their grant with nothing to commit: close(2) returns at FLUSH, and the kernel sends
        the RELEASE that ends a handle just after, so for a moment they hold a file their program is
        done with."""
        closing = [h for h in self.releasing.values() if any(_at_or_below(h.rel, rel) for rel in rels)]
        return closing + [h for rel in rels for h in self._writers_of(rel) if h.closed and h.grant is not None]

    @staticmethod
    async def _released(handles: Sequence[Shadow]) -> None:
        """Wait until `handles` are released, RELEASE_WAIT at most."""
        if not handles:  # the common case: no cancel scope to set up
            return
        with trio.move_on_after(RELEASE_WAIT):
            for handle in handles:
                await handle.released.wait()

    async def _identity(self, ctx: pyfuse3.RequestContext) -> tuple[str | None, bool]:
        """(agent, pinned) of the calling process (agent None: unknown, see AgentResolver.agent);
        looked up off the event loop unless just seen."""
        known = self.resolver.cached(ctx.pid)
        if known is not None:
            return known
        return await blocking(self.resolver.agent, ctx.pid)

    def _managed_file(self, rel: str) -> bool:
        if not self.core.paths.managed(rel):
            return False
        try:
            return stat_mod.S_ISREG(self.backing.lstat(rel).st_mode)
        except FileNotFoundError:
            return True

    # ---- metadata -----------------------------------------------------------------

    @guarded
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = await self._child(parent_inode, name)
        attrs = await self._looked_up(rel, ctx)
        self._reached(parent_inode, rel, attrs.st_ino)
        return attrs

    async def _looked_up(self, rel: str, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """The entry of `rel` for a lookup by thread `ctx.pid`."""
        retry = self._repeating(rel, ctx)  # the lookup of a call the kernel repeats (`_stale`)
        if retry is not None:  # the repeated call needs an inode no other content is served on
            if retry.writing:
                # (a name not found leaves the repeat pending: the kernel looks the name up once more
                # after a lookup that revalidated its entry found nothing, and the file may be there again)
                return self._apart(rel, retry)
            if retry.pin in self._pins:
                attrs = self._pinned_entry(rel, retry.pin)
            else:
                inode = self.inodes.inode_if_known(rel)
                if inode is not None and self._other_content(inode):
                    self._fresh_inode(rel)
                attrs = await self._found(rel)
            retry.inode = attrs.st_ino  # a rename may carry it before the open comes (`_open`)
            return attrs
        if self._aside:
            with self._use(rel):
                written = await self._written_by_caller(rel, ctx)
            if written is not None:  # the caller's agent's unsaved writes: its inode, as on a local disk
                attrs = self._attrs(rel, written)
                self.inodes.looked_up(written)
                return attrs
        return await self._found(rel)

    async def _found(self, rel: str) -> pyfuse3.EntryAttributes:
        """`_entry`, where a working copy may lack a managed file another copy committed and this
        one has not been told of yet: the registry asked (one read where it holds none), the file
        brought in if it does (`Reads.bring`)."""
        try:
            return self._entry(rel)
        except FileNotFoundError:
            if self.core.replica is None or not self.core.paths.managed(rel):
                raise
        await blocking(self.core.bring, self.core.paths.of_rel(rel))  # (or the listener brought it meanwhile)
        return self._entry(rel)

    def _repeating(self, rel: str, ctx: pyfuse3.RequestContext) -> Retry | None:
        """The call answered ESTALE (`_stale`) that the kernel repeats with this lookup of `rel` by thread
        `ctx.pid`, if any: a write's, whatever the name (`_apart` tells a directory on the way); a
        read's, by its name or by another managed file's. The kernel repeats a call by the name the
        program gave, which is not the name the call was answered by when a rename carried the inode
        it came to between the program's lookup and its call (an exchange puts the file that was at
        the program's name at the other one); from then on that name is the repeat's, and a version
        pinned for the other (`_pin`) is not its."""
        retry = self.pages.retrying(ctx.pid)
        if retry is None or retry.writing or retry.rel == rel:
            return retry
        if not self._managed_file(rel):
            return None  # (a directory on the way to it)
        if retry.pin is not None:
            trio.lowlevel.spawn_system_task(self._drop_pin, retry.pin, 0.0)
        retry.rel, retry.pin = rel, None
        return retry

    @staticmethod
    def _repeat_name(retry: Retry | None, inode: int) -> str | None:
        """The name the lookup of a read-only call's repeat (`retry`) was made by, if it answered `inode`:
        a rename may have carried the inode to another name since, or the file at it gone, and the
        repeat's getattr and open, which must not meet ESTALE again, are served as if they came after
        it, by the file at that name (`getattr`, `_open`)."""
        return retry.rel if retry is not None and not retry.writing and retry.inode == inode else None

    @guarded
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        rel = await self._path(inode)
        looked_up = self._repeat_name(self.pages.retrying(ctx.pid), inode)  # (an open's repeat asks first)
        if ("\0" in rel or looked_up not in (None, rel)) and self._held_stat(inode) is None:
            rel = self._moved_on(inode, looked_up or rel, repeat=looked_up is not None)
        try:
            return self._reply(inode, rel)
        except OSError as e:
            if e.errno not in (errno.ESTALE, errno.ENOENT) or not self.core.paths.managed(rel.partition("\0")[0]):
                raise
            # a managed file's inode that lost its name (or is losing it: a rename carried it to a name
            # whose file is being removed), with no file there now: the kernel walks the path again and
            # repeats the call that asked (an open checks permissions with a getattr first), which must
            # not meet ESTALE again: an open repeated so is served (`open`). Asked by such a repeat
            # (another agent deleted the file since its lookup), a second ESTALE would reach the
            # program: the call fails as one made after the deletion would, ENOENT
            if self.pages.retrying(ctx.pid) is not None:
                raise pyfuse3.FUSEError(errno.ENOENT) from None
            raise self._stale(rel, ctx, writing=False, attributes=True) from None

    def _reply(self, inode: int, rel: str) -> pyfuse3.EntryAttributes:
        """The getattr or setattr reply for `inode`, whose call asked about or changed the file at `rel`.
        For an inode that readers have open, it is made from the one stat that found the file at its
        name still theirs (`_replaced`); once it is not, the name gets a new inode and their version
        answers, on the inode they keep (the kernel would stop their copies at another size)."""
        own = self.inodes.path(inode)
        replaced, st = self._replaced(own, inode)
        if replaced:
            self._fresh_inode(own)
            rel, st = self.inodes.path(inode), None  # its readers' version: its open handles answer
        return self._answer(self._attrs(rel, inode, st=st), inode)

    def _moved_on(self, inode: int, rel: str, repeat: bool) -> str:
        """For `inode`, of a managed file that lost its name (`_fresh_inode`, a rename over it) and has
        no open handle left that holds a file (a write handle renamed over between its commit and its
        release holds none): its name, if a regular file is there now, else `rel` (whose stat fails
        ESTALE). A call by that name made as it moved on (the kernel checks permissions with a
        getattr before an open) is answered by that file; the open itself is sent on (`_stale`). For
        the `repeat` of a read-only open, `rel` is the name its lookup was made by, since a rename may
        have carried the inode it answered to another name since (`_repeating`). Any other call on an
        inode that an exchange moved and whose file then left that name (a save by exchange removes its
        temp) may come from a path walk that found it at the other name, which the file at its last
        name is not (the next temp file): `rel`, and the kernel walks the caller's path again."""
        if not repeat and self.inodes.swapped(inode) and self.inodes.current_name(inode) is None:
            return rel
        name = rel.partition("\0")[0]
        try:
            st = self.backing.lstat(name)
        except OSError:
            return rel
        return name if self.core.paths.managed(name) and stat_mod.S_ISREG(st.st_mode) else rel

    async def _settled(self, *path_of: Callable[[], str], inode: int | None = None) -> list[str]:
        """What each of `path_of()` gives, a path from the inode table, once no checked rename in flight
        is at or above any of them (or its name, for an inode that lost it, or the name `inode` is
        set aside to, `_aside`, or that of the file it holds a past version of, `_metadata_at`), all
        taken after the last wait, so none is stale. Such a
        rename changes the disk in a worker thread and the table follows only after: a request
        reaching the disk by the path meanwhile would meet another object there, and an open or a
        reply would pair an inode with that object's type (the kernel answers EIO) or fail (ENOTDIR).
        Every request reaching the disk by a path it takes from the table gets it here, with no await
        before that access; one that awaits after it uses the path meanwhile (`_use`). (Free while
        no rename is in flight: most requests meet none.)"""
        rels = [of() for of in path_of]
        while self._renaming:
            names = [rel.partition("\0")[0] for rel in rels]
            if inode is not None:
                names += filter(None, [self._aside.get(inode), self.inodes.current_name(inode)])
            moving = [event for top, event in self._renaming.items() if any(_at_or_below(n, top) for n in names)]
            if not moving:
                break
            await moving[0].wait()
            rels = [of() for of in path_of]
        return rels

    @contextlib.contextmanager
    def _use(self, *rels: str) -> Iterator[None]:
        """Around the part of a request that reaches the disk by `rels` (paths `_settled` just gave it,
        with no await since) across awaits: a checked rename at or above one of them waits until it
        is done (`_unused`), so each path stays the object's the request found there. A request
        using paths never waits for a rename (`_settled`) meanwhile, nor for the kernel to drop an
        entry (a rename holds its directories' locks while it waits)."""
        names = {rel.partition("\0")[0] for rel in rels}
        using = self._using
        for name in names:
            using[name] = using.get(name, 0) + 1
        try:
            yield
        finally:
            for name in names:
                if using[name] == 1:
                    del using[name]
                else:
                    using[name] -= 1
            if self._used is not None:
                self._used.set()
                self._used = None

    async def _unused(self, *tops: str) -> None:
        """Wait until no request uses a path at or below `tops` (`_use`)."""
        while any(_at_or_below(rel, top) for rel in self._using for top in tops):
            if self._used is None:
                self._used = trio.Event()
            await self._used.wait()

    @guarded
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        await self._still_its_file(inode)
        rel = await self._name_of(inode)
        with self._use(rel, self._metadata_at(inode, rel)):
            return await self._setattr(rel, inode, attr, fields, fh, ctx)

    async def _setattr(
        self,
        rel: str,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """The setattr of `inode` by the name `rel` (`_name_of`, and in use: `_use`)."""
        handle = self.files.get(fh) if fh is not None else None
        if "\0" not in rel and (handle is None or isinstance(handle, Passthrough)) and not self.core.paths.managed(rel):
            # unmanaged, by its name or its own descriptor: no agent, no page cache
            if fields.update_size and handle is None:  # a truncate by name
                self._walk_again(ctx, self.pages.landed(ctx.pid), False, (inode, rel))
            fd = handle.fd if handle is not None else self._unmanaged_fd(inode)
            self.own.note(rel)
            if fields.update_size:
                await handle.resize(attr.st_size) if handle is not None else self.backing.truncate(rel, attr.st_size)
                self._truncated_by(ctx, rel)
            self._set_mode_and_owner(rel, fd, attr, fields)
            self._set_times(rel, fd, attr, fields)
            return self._attrs(rel, inode, st=os.fstat(fd) if fd is not None else None)
        repeat, by_name = self.pages.landed(ctx.pid), inode
        if "\0" in rel and handle is None and (fields.update_size or self._held_fd(inode) is None):  # a name gone
            if repeat is None or repeat.rel != rel.partition("\0")[0]:
                raise self._stale(rel, ctx, writing=fields.update_size)
            # the kernel's repeat, and its inode lost its name since its lookup: made at the name, now
            rel = repeat.rel
            self.backing.lstat(rel)  # ENOENT if nothing is there now
            if inode not in self._private:  # (the name's inode: given a new one meanwhile, not looked up since)
                by_name = self.inodes.inode(rel)
        self.own.note(rel)
        if fields.update_size:
            if handle is not None:
                await handle.resize(attr.st_size)
                if isinstance(handle, Shadow) and fh is not None:
                    self.writers[handle.rel] = handle
            elif self._managed_file(rel):
                with self._writing(rel, by_name, ctx, repeat is not None):
                    agent = await self._writer(ctx, rel)
                    await blocking(self._truncate, agent, rel, attr.st_size)
                    self._truncated[by_name] = (ctx.pid, _call_of(ctx.pid))
            else:
                self.backing.truncate(rel, attr.st_size)
            if handle is None:
                self._truncated_by(ctx, rel)
        at = self._metadata_at(inode, rel)
        if at != rel:
            self.own.note(at)
        self._set_mode_and_owner(at, self._through(handle, inode, at), attr, fields)
        if fields.update_atime or fields.update_mtime:
            writer = self.writers.get(at)
            # first: its commit may land meanwhile; one file, so times set by any agent outlast the commit
            if writer is not None and writer.unsaved:
                writer.set_times(
                    attr.st_atime_ns if fields.update_atime else None, attr.st_mtime_ns if fields.update_mtime else None
                )
            self._set_times(at, self._through(handle, inode, at), attr, fields)
        return self._reply(inode, rel)

    def _truncated_by(self, ctx: pyfuse3.RequestContext, rel: str) -> None:
        """After a truncate by `ctx`'s caller of the file at `rel`: its set-ID bits cleared as Linux
        clears them for a caller without CAP_FSETID (`kill_set_ids`; the kernel's FUSE keeps a
        set-group-ID bit without group execute, whoever truncates)."""
        caller = Unprivileged.of(ctx)
        if caller is not None:
            kill_set_ids_at(self.core.paths.of_rel(rel).abs, caller)

    def _truncate(self, agent: str, rel: str, size: int) -> None:
        """truncate(2) of the managed file at `rel` by its name, as `agent` (`VolumeCore.truncate`): a
        truncate to the size it has changes no byte (no commit) and, as on a local disk, its times."""
        unchanged = self.backing.lstat(rel).st_size == size
        self.core.truncate(agent, self._target(rel), size)
        if unchanged:
            touch(self.core.paths.of_rel(rel).abs, time.time_ns())

    def _through(self, handle: FileHandle | None, inode: int, rel: str) -> int | None:
        """The descriptor a setattr of `inode` at `rel` (through `handle`, when the kernel sent one) acts
        through, else None: by the name. Its own unmanaged handle's, which the kernel keeps open until
        the reply; for a file whose name is gone, one that an open handle of it holds (`_held_fd`). A file
        at its name is changed by that name: a managed file's descriptors may hold a past version, at no
        name (it was opened under an unmanaged name and moved into a managed glob, then committed to).
        Asked for where it is used, never kept across an await: the handle that holds it may be released
        while the request waits, and another open given its number."""
        if isinstance(handle, Passthrough):
            return handle.fd
        return self._held_fd(inode) if "\0" in rel else None

    def _set_mode_and_owner(
        self, rel: str, fd: int | None, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        """A setattr's mode and owner, through `fd` when the file is open (else by name)."""
        if fields.update_mode:
            mode = stat_mod.S_IMODE(attr.st_mode)
            os.fchmod(fd, mode) if fd is not None else self.backing.chmod(rel, mode)
        if fields.update_uid or fields.update_gid:
            uid, gid = attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1
            os.fchown(fd, uid, gid) if fd is not None else self.backing.chown(rel, uid, gid)

    def _set_times(
        self, rel: str, fd: int | None, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields
    ) -> None:
        """A setattr's access and modification times, through `fd` when the file is open (else by name);
        a time not given stays as it is (the kernel sends both for utimensat, `touch`, `tar`)."""
        atime, mtime = fields.update_atime, fields.update_mtime
        if not (atime or mtime):
            return
        if atime and mtime:
            ns = (attr.st_atime_ns, attr.st_mtime_ns)
        else:
            st = os.fstat(fd) if fd is not None else self.backing.lstat(rel)
            ns = (attr.st_atime_ns if atime else st.st_atime_ns, attr.st_mtime_ns if mtime else st.st_mtime_ns)
        os.utime(fd, ns=ns) if fd is not None else self.backing.utime(rel, ns)

    @guarded
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(self.backing.readlink(await self._path(inode)))

    @guarded
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.backing.statvfs()
        data = pyfuse3.StatvfsData()
        for name in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
            "f_namemax",
        ):
            setattr(data, name, getattr(st, name))
        return data

    @guarded
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel already checked the mode bits

    # ---- directories --------------------------------------------------------------

    @guarded
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        # a commit a close(2) left to the release shows its temp name here until it lands
        if self.releasing:
            here = self.inodes.path(inode)
            await self._released([h for h in self.releasing.values() if h.rel.rpartition("/")[0] == here])
        rel = await self._path(inode)
        fd = self.backing.opendir(rel)
        try:
            names = _names(fd, rel == "")
        except BaseException:
            os.close(fd)
            raise
        fh = self._fh()
        self.dirs[fh] = Listing(inode, names, fd)
        if self._reaches(rel):
            try:
                await self._note_listed(rel, ctx)
            except RegistryError as e:  # the listing shows the disk; the views wait for the next one
                log.warning("listing %r: its lister's views of files deleted there were not moved: %s", rel, e)
        return fh

    async def _note_listed(self, rel: str, ctx: pyfuse3.RequestContext) -> None:
        """The caller sees which managed files in `rel` are gone (its agent looked up only if some
        are): its views of them move to their deletions (`VolumeCore.note_listed`)."""
        if await blocking(self.core.deletions_in, rel):
            agent = (await self._identity(ctx))[0]
            if agent is not None and agent_name_problem(agent) is None:
                await blocking(self.core.note_listed, agent, rel)

    @guarded
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self.dirs[fh]
        if start_id == 0 and listing.read:  # rewinddir(3): the directory as it is now
            listing.names = _names(listing.fd, listing.inode == pyfuse3.ROOT_INODE)
        listing.read = True
        for index in range(start_id, len(listing.names)):
            [rel] = await self._settled(functools.partial(self.inodes.child, listing.inode, listing.names[index]))
            try:
                inode, st = self._inode_of(rel)
                try:
                    attrs = self._attrs(rel, inode, st=st)
                except pyfuse3.FUSEError as e:  # another type of file at the name now: it got a new inode
                    if e.errno != errno.ESTALE:  # (`_attrs`), which a listing, never repeated, replies with
                        raise
                    inode, st = self._inode_of(rel)
                    attrs = self._attrs(rel, inode, st=st)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, listing.names[index], attrs, index + 1):
                if not self.inodes.held(inode):  # not sent: the kernel will not forget it
                    self.backing.release(inode)
                return
            self.inodes.remember(rel)
            self._reached(listing.inode, rel, inode)  # the kernel may keep the entry as if looked up

    @guarded
    async def releasedir(self, fh: int) -> None:
        os.close(self.dirs.pop(fh).fd)

    @guarded
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rel = await self._child(parent_inode, name)
        self.own.note(rel)
        self.backing.mkdir(rel, mode & ~ctx.umask)
        return self._entry(rel, self._own(rel, ctx))

    @guarded
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = await self._child(parent_inode, name)
        self.own.note(rel)
        self.backing.rmdir(rel)
        self._unlinked(rel)

    @guarded
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rel = await self._child(parent_inode, name)
        self._walk_again(ctx, self.pages.landed(ctx.pid), False, (parent_inode, rel))
        self.own.note(rel)
        if stat_mod.S_ISREG(mode) and self.core.paths.managed(rel):  # creating a managed file: as `create`
            agent = await self._agent(ctx)
            grant, _ = await blocking(
                self.core.create, agent, self._target(rel), stat_mod.S_IMODE(mode) & ~ctx.umask, self._owner, "write"
            )
            await blocking(self.core.release, grant, "write", log=False)
            self._unpin(rel)
        else:
            self.backing.mknod(rel, mode & ~ctx.umask, rdev)
        return self._entry(rel, self._own(rel, ctx))

    @guarded
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rel = await self._child(parent_inode, name)
        self._walk_again(ctx, self.pages.landed(ctx.pid), False, (parent_inode, rel))
        self.own.note(rel)
        self.core.symlink(os.fsdecode(target), self._target(rel))
        self._own(rel, ctx)
        return self._entry(rel)

    @guarded
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        rel, src = await self._children((new_parent_inode, new_name), inode=inode)  # (its source: no await after)
        self._walk_again(ctx, self.pages.landed(ctx.pid), False, (new_parent_inode, rel))
        self.own.note(rel)
        if "\0" in src:  # (linkat AT_EMPTY_PATH, /proc/self/fd/N) an inode that lost its name (`InodeTable`)
            # a managed file's (a write's own inode, one set aside, a past version): a link from a managed
            # file, refused; else a file unlinked while open, which has no name to link from, as on a local
            # disk (the table's name, with its NUL, reached the core: EIO, /tmp/s31posix 2)
            refuse_hard_link(self._target(self._name_now(inode)), self._target(rel))
            raise pyfuse3.FUSEError(errno.ENOENT)
        self.core.link(self._target(src), self._target(rel))
        self.inodes.link(inode, rel)  # one inode for both names, as on disk
        return self._entry(rel)

    # ---- removal and renaming (checked when a managed file is involved) -----------

    @guarded
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        rel = await self._child(parent_inode, name)
        self._walk_again(ctx, self.pages.landed(ctx.pid), False, (parent_inode, rel))
        self.own.note(rel)
        managed_file = self._managed_file(rel)
        if not managed_file and not self.core.paths.managed(rel):
            self.backing.unlink(rel)
        elif managed_file or not await blocking(self.core.unlink_special, self._target(rel)):
            # a managed file (also one a program put where a symlink or FIFO was meanwhile): checked
            agent = await self._writer(ctx, rel)
            writers = [h for h in self._writers_of(rel) if h.rel == rel and not h.moved]  # (moved: not this file)
            st = self.backing.lstat(rel)
            file = self.backing.open(rel, os.O_RDWR) if writers else None  # what its handles go on with
            try:
                await _made(self.core.commit, agent, self._target(rel), None)
                still_open = {id(h) for h in self.files.values()}  # one released meanwhile would keep `file` forever
                for handle in writers:
                    if id(handle) in still_open:
                        handle.orphan(st, file, agent)
            finally:
                if file is not None:
                    os.close(file)
        self._unlinked(rel)

    def _unlinked(self, rel: str) -> None:
        """`rel` is gone (`InodeTable.unlinked`); its inode is let go if nothing holds it (`_let_go`)."""
        old = self.inodes.inode_if_known(rel)
        self.inodes.unlinked(rel)
        if old is not None:
            self._let_go(old)

    @guarded
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        src, dst = await self._children((parent_inode_old, name_old), (parent_inode_new, name_new))
        self._walk_again(ctx, self.pages.landed(ctx.pid), False, (parent_inode_old, src), (parent_inode_new, dst))
        self.own.note(src, dst)
        if flags & ~(pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE):
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_WHITEOUT: the mount makes no whiteouts
        exchange = bool(flags & pyfuse3.RENAME_EXCHANGE)
        noreplace = bool(flags & pyfuse3.RENAME_NOREPLACE)
        st = self.backing.lstat(src)
        tree = stat_mod.S_ISDIR(st.st_mode) or (exchange and stat_mod.S_ISDIR(self.backing.lstat(dst).st_mode))
        if tree and self.direct_dirs:
            self._refuse_moving_direct_dirs(src, *((dst,) if exchange else ()))
        source, destination = self._target(src), self._target(dst)
        if not exchange and stat_mod.S_ISDIR(st.st_mode):
            self._refuse_full_directory(dst)
        if self.core.rename_is_checked(source, destination):
            done = trio.Event()
            self._renaming.update({src: done, dst: done})  # from here requests there wait (`_settled`)
            try:
                agent = await self._writer(ctx, src, dst)
                await self._unused(src, dst)  # an open under way there gets its handle first
                self._refuse_open_writers(src, dst, st)
                if exchange:  # dst's tree goes to src's name
                    self._refuse_open_writers(dst, src, self.backing.lstat(dst))
                moving = [*self._writers_of(src), *self._writers_of(dst)]
                self._refuse_unsaved(src, dst, moving)
                carried = {**self.inodes.below(src, tree), **(self.inodes.below(dst, tree) if exchange else {})}
                # the watcher reports each managed file below a moved directory: the echo of this rename
                self.own.note(*carried.values(), *(_carried(rel, src, dst, exchange) for rel in carried.values()))
                ends = (src, dst) if exchange else (src,)
                aside = {i: rel for i, rel in self._aside.items() if any(_at_or_below(rel, end) for end in ends)}
                await _made(self.core.rename, agent, source, destination, exchange=exchange, noreplace=noreplace)
                for handle in moving:  # writing on is refused (ESTALE); reads go on with its file (`Shadow.kept`)
                    handle.moved = True
                self._renamed(src, dst, exchange, tree)
                self._carries += 1
                for inode, before in {**carried, **aside}.items():
                    self._left(inode, before, self._carries)
            finally:
                for path in (src, dst):
                    if self._renaming.get(path) is done:
                        del self._renaming[path]
                done.set()
        else:
            same = not exchange and self._holds(dst, st)  # two names of one file: rename(2) does nothing
            self.backing.rename(src, dst, flags & (pyfuse3.RENAME_EXCHANGE | pyfuse3.RENAME_NOREPLACE))
            if not same:
                self._renamed(src, dst, exchange, tree)

    def _refuse_full_directory(self, dst: str) -> None:
        """ENOTEMPTY for a directory renamed over a directory that holds anything, before the checks
        of what moves (whose EBUSY would say to close a file, after which the rename fails all the
        same), as rename(2) answers."""
        try:
            st = self.backing.lstat(dst)
        except FileNotFoundError:
            return
        if stat_mod.S_ISDIR(st.st_mode):
            fd = self.backing.opendir(dst)
            try:
                if os.listdir(fd):
                    raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            finally:
                os.close(fd)

    @staticmethod
    def _refuse_unsaved(src: str, dst: str, moving: Sequence[Shadow]) -> None:
        """EBUSY for a checked rename of `src` to `dst` while one of the write handles `moving` there
        holds writes not committed yet, which the rename would leave behind."""
        unsaved = [handle for handle in moving if handle.pending]
        if unsaved:
            log.info(
                "refused renaming %s to %s (EBUSY): %s holds writes to %s not committed yet, which the rename "
                "would leave behind; rename it once that file is closed (a close commits its writes)",
                src,
                dst,
                unsaved[0].agent,
                unsaved[0].rel,
            )
            raise pyfuse3.FUSEError(errno.EBUSY)

    def _left(self, inode: int, before: str, carry: int) -> None:
        """`inode` was reached by the name `before` until checked rename number `carry` (which carried
        it, or a directory above it: `_reached`): noted in `_left_globs` if that name could be or
        hold a managed path and its name now is not managed."""
        if self.inodes.path_if_known(inode) is None:
            return  # forgotten by the kernel (while the rename was under way): no walk can reach it
        now = self._name_now(inode)
        meant = self.core.paths.managed(before) or self._reaches(before)
        if meant and now != before and not self.core.paths.managed(now):
            befores = self._left_globs.setdefault(inode, {})
            carry = max(carry, befores.pop(before, carry))
            befores[before] = carry  # the newest last; only the newest LEFT_NAMES are kept
            for oldest in list(befores)[:-LEFT_NAMES]:
                del befores[oldest]

    def _name_now(self, inode: int) -> str:
        """The name `inode` is reached by now: its own, or where it lost that (its write's own inode,
        `_apart`, or one a write handle is open on, `_unname`), the name it was set aside from, which
        follows renames (`_renamed`)."""
        path = self.inodes.path(inode)
        return (self._aside.get(inode) or path.partition("\0")[0]) if "\0" in path else path

    def _reached(self, parent: int, rel: str, inode: int) -> None:
        """`inode` is the entry `rel` of the directory `parent`: where `parent` left the globs, a walk
        that resolved it before meant `inode` by the same name below its names then."""
        befores = self._left_globs.get(parent)
        if befores:
            name = rel.rpartition("/")[2]
            for before, carry in list(befores.items()):
                self._left(inode, f"{before}/{name}", carry)

    def _walk_again(
        self, ctx: pyfuse3.RequestContext, repeat: Retry | None, writing: bool, *reached: tuple[int, str]
    ) -> None:
        """Turn back a call that changes the files at the unmanaged names `reached`, each through an
        inode (the file's own, or its directory's), when the path walk it came by may have resolved
        one of those inodes before a checked rename carried it out of the globs, and so meant a
        managed name: the call would change the moved file unchecked. It is answered ESTALE: the
        kernel walks the whole path again and repeats the call once (`repeat`: the record of the call
        of this thread answered ESTALE last, if any), meeting the tree as it is now, as if the call
        had come after the rename. A call with such a record (the kernel's repeat, whatever name an
        exchange or rename gave its inodes since, or the thread's next call: a repeat the kernel
        never made, its lookup having found nothing, leaves its record behind for a while,
        `PageCache.landed`) walked its path after that ESTALE, so it met every inode carried out
        before at its unmanaged name, and goes ahead (a call that did come after the rename costs one
        round trip more); if a rename carried one of them out since, its walk may have met it at a
        managed name, and it fails ENOENT (the name it meant moved away), since a second ESTALE would
        reach the program. Unless the record is a getattr's (`Retry.attributes`): a stat or fstat
        leaves it, never to land, so the call is taken for a new one."""
        if not self._left_globs:  # (no inode carried out of the globs: the common case)
            return
        meant = {rel: self._meant(inode, rel) for inode, rel in reached}
        carries = [carry for names in meant.values() for carry in names.values()]
        if not carries:
            return
        if repeat is None or (repeat.attributes and max(carries) > repeat.carries):
            # (a getattr's record is most likely a stat's or an fstat's, whose repeat never lands here:
            # this call is new; should it be the open whose permission check asked, it fails ESTALE)
            raise self._stale(next(rel for rel, names in meant.items() if names), ctx, writing)
        if max(carries) > repeat.carries:
            raise pyfuse3.FUSEError(errno.ENOENT)

    def _meant(self, inode: int, rel: str) -> dict[str, int]:
        """The managed names a path walk may have meant that resolved `inode` (the file at `rel`, or its
        directory) before a checked rename carried it out of the globs, where `rel` is not managed,
        each with the number of the rename that carried it (`_left_globs`)."""
        befores = self._left_globs.get(inode)
        if not befores or self.core.paths.managed(rel):
            return {}
        below = "" if self._name_now(inode) == rel else "/" + rel.rpartition("/")[2]
        return {before + below: carry for before, carry in befores.items() if self.core.paths.managed(before + below)}

    def _holds(self, rel: str, st: os.stat_result) -> bool:
        """Whether the backing name `rel` is the file `st` describes."""
        if "\0" in rel:  # unlinked while open (InodeTable.unlinked)
            return False
        try:
            other = self.backing.lstat(rel)
        except OSError:
            return False
        return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)

    def _renamed(self, src: str, dst: str, exchange: bool, tree: bool) -> None:
        """The inode table, and the names inodes are set aside to (`_aside`), follow a rename done."""
        if exchange:
            self.inodes.exchanged(src, dst, tree)
        else:
            self.inodes.moved(src, dst, tree)
        for inode, name in self._aside.items():
            self._aside[inode] = _carried(name, src, dst, exchange)

    def _held_fd(self, inode: int) -> int | None:
        """A descriptor of the file behind `inode`, whose name is gone, that an open handle holds: a
        setattr acts on that very file (the kernel sends fchmod and futimens without the handle)."""
        for held in self._handles_on(inode):
            if isinstance(held, Passthrough) or (isinstance(held, (Snapshot, Shadow)) and held.fd >= 0):
                return held.fd
        return None

    def _writers_of(self, rel: str) -> list[Shadow]:
        """The open write handles of the managed files at or below `rel`."""
        return [h for h in self.files.values() if isinstance(h, Shadow) and _at_or_below(h.rel, rel)]

    def _refuse_open_writers(self, rel: str, dst: str, st: os.stat_result) -> None:
        """A file open for writing under an unmanaged name (at or below `rel`, whose stat is `st`)
        cannot be renamed where it would be checked (`dst`): its open handle (or a shared writable
        mapping of it, which keeps the handle) would go on writing its bytes in place, past the
        protocol (EBUSY, and the log says what to do). A handle is known by the name it was opened at, by its
        inode's name now (renames that were not checked moved it), and, when its name is `rel`
        itself, by the file it holds, however it was reached."""
        for fh, handle in self.files.items():
            if not isinstance(handle, Passthrough) or not handle.writable:
                continue
            held = os.fstat(handle.fd)
            inode = self.file_inodes.get(fh)
            now = self.inodes.path_if_known(inode) if inode is not None else None
            if (
                _at_or_below(handle.rel, rel)
                or (now is not None and _at_or_below(now, rel))
                or (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino)
            ):
                log.info(
                    "refused renaming %s to %s (EBUSY): a file there is open for writing, or mapped shared and "
                    "writable, under an unmanaged name, and would go on being written in place past the checks of "
                    "a managed file; close it (and munmap it), then rename it again",
                    rel,
                    dst,
                )
                raise pyfuse3.FUSEError(errno.EBUSY)

    def _refuse_moving_direct_dirs(self, *rels: str) -> None:
        """A directory holding a direct dir cannot be renamed (EBUSY, as the direct dir itself, which
        the kernel refuses): its bind would move along, served past the daemon wherever it lands, a
        managed glob's reach included. `mounts.direct_dir_in` decides; `coherent-volume why` on the
        directory says what to do instead (a program shows only "Device or resource busy")."""
        for rel in rels:
            held = direct_dir_in(rel, self.direct_dirs)
            if held is not None:
                log.info("refused renaming %s: it holds the direct dir %s (`coherent-volume why %s`)", rel, held, rel)
                raise pyfuse3.FUSEError(errno.EBUSY)

    # ---- files --------------------------------------------------------------------

    @guarded
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        rel = await self._path(inode)
        with self._use(rel, *([self._aside[inode]] if inode in self._aside else [])):
            return await self._open(rel, inode, flags, ctx)

    async def _open(self, rel: str, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """The open of `inode`, whose path is `rel` (`_settled`, and in use: `_use`)."""
        writing = _writable(flags) or bool(flags & os.O_TRUNC)
        landed = repeat = self.pages.landed(ctx.pid)
        looked_up = None if writing else self._repeat_name(repeat, inode)  # (or pinned there: `_pin`)
        if repeat is not None and repeat.rel != rel.partition("\0")[0] and looked_up is None:
            repeat = None  # the repeat of a call by another name (renamed meanwhile): this one is new
        if "\0" in rel or looked_up not in (None, rel):
            # its name is gone, or another inode's now (or it was made for a write: `_apart`), or a rename
            # carried it since its repeat's lookup: served as if the open came after, by that lookup's name
            name = self._aside_name(inode) or looked_up or rel.partition("\0")[0]
            if repeat is None and (writing or not self._managed_file(name)):
                raise self._stale(rel, ctx, writing)  # the kernel looks it up again and repeats the open
            rel = self._repeated_at(name)  # served at the name (a read-only open that is no repeat: `_pin`)
        if not self._managed_file(rel):
            if writing:
                self._walk_again(ctx, landed, True, (inode, rel))
                self.own.note(rel)  # its close-after-write event is our own echo
            try:
                fd = self.backing.open(rel, flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | _NOT_PASSED))
            except OSError as e:
                if repeat is not None or e.errno not in (errno.ENOENT, errno.ELOOP):
                    raise
                # gone since the kernel's lookup, or a symlink now (a program on the root, another
                # mount): the kernel looks the name up again and repeats the open as it finds it (an
                # O_CREAT open, whose flag the kernel does not pass, creates it, as on a local disk)
                raise self._stale(rel, ctx, writing) from None
            if not stat_mod.S_ISREG((st := os.fstat(fd)).st_mode):  # a directory now: likewise
                os.close(fd)
                if repeat is None:
                    raise self._stale(rel, ctx, writing)
                raise pyfuse3.FUSEError(errno.EISDIR if stat_mod.S_ISDIR(st.st_mode) else errno.ENXIO)
            caller = Unprivileged.of(ctx) if writing else None
            if flags & os.O_TRUNC and caller is not None:
                kill_set_ids(fd, caller)  # (the kernel does for a write, not for the daemon's truncation)
            handle = self._passthrough(fd, rel, flags, caller)
            keep = self._keeps_cache(inode, st)
            return pyfuse3.FileInfo(fh=self._open_file(handle, inode), keep_cache=keep)
        if not writing:
            return await self._open_reading(rel, inode, ctx, repeat)
        if repeat is None:  # a write goes to an inode of its own (`_apart`), where the kernel repeats it
            raise self._stale(rel, ctx, writing=True)
        with self._writing(rel, inode, ctx, repeat=True):
            agent = await self._writer(ctx, rel, appending=Shadow.kind_of(flags) == "append")
            caller = Unprivileged.of(ctx)
            # carried by a rename to a name the program never gave (its repeat's lookup was of another),
            # the write needs the file there: were it deleted since, making it again would put the bytes
            # where no one asked, a deletion undone (/tmp/s29mnt 1). At its own name the core decides as
            # for any write, which a program's O_CREAT (the kernel does not pass it) may need
            elsewhere = rel != repeat.rel
            target = self._target(rel)
            handle = await blocking(Shadow.open, self.core, self._owner, agent, target, flags, caller, elsewhere)
            fh = self._open_file(handle, inode)
            if handle.pending:  # O_TRUNC: its descriptors see the file cut, as on a local disk
                self.writers[rel] = handle
            return pyfuse3.FileInfo(fh=fh, direct_io=True)

    def _repeated_at(self, name: str) -> str:
        """`name`, where an open of a file's inode that lost it (or was made for a write by it, `_apart`,
        which follows the file's renames) is served, as an open made after whatever moved there
        since: the file there, or nothing (ENOENT). A directory there fails EISDIR, as an open of it
        for writing would (the inode, a file's, cannot serve it); anything else but a file fails
        ESTALE."""
        try:
            st = self.backing.lstat(name)
        except FileNotFoundError:
            return name
        if stat_mod.S_ISDIR(st.st_mode):
            raise pyfuse3.FUSEError(errno.EISDIR)
        if not stat_mod.S_ISREG(st.st_mode):
            raise pyfuse3.FUSEError(errno.ESTALE)
        return name

    async def _open_reading(
        self, rel: str, inode: int, ctx: pyfuse3.RequestContext, repeat: Retry | None
    ) -> pyfuse3.FileInfo:
        """A read-only open of the managed file at `rel` through `inode` (`repeat`: the kernel's repeat
        of an open answered ESTALE): the version current now, on an inode that serves no other content
        (`PageCache.serving`) and whose size the kernel surely holds (else `_pin`), through the page
        cache when it allows. If the inode lost its name while the open was under way, or the repeat
        meets another content there, the open takes the version the inode's readers have (current
        when it began), or without any, the file's now: a call may take effect at any moment while it
        is under way, and a repeat must not fail ESTALE."""
        if repeat is not None and repeat.pin in self._pins and self.file_inodes.get(repeat.pin) == inode:
            return self._open_pinned(rel, inode, repeat.pin)
        agent, pinned = await self._identity(ctx)
        target = self._target(rel)
        await self._released([h for h in self.releasing.values() if h.rel == rel])  # their commits land first
        try:
            fd, version = await blocking(self.core.open_version, agent or "", target, register=False)
        except FileNotFoundError:
            if repeat is not None:
                raise
            # no file at the inode's name (now): a rename may have carried the inode there from the name
            # the program looked up since (an exchange), and the file at it gone; the kernel walks the
            # program's path again and repeats the open, which finds the file there, or nothing (`_repeating`)
            raise self._stale(rel, ctx, writing=False) from None
        tracked = agent is not None and agent_name_problem(agent) is None
        opener = agent if tracked else None
        here = self._handles_on(inode)
        elsewhere = self._writes_elsewhere(rel, here)
        st = os.fstat(fd)
        how = self.pages.serving(rel, inode, version, st.st_size, opener, here, elsewhere)
        reader, program = self._reader(ctx.pid) if tracked else (None, None)
        moved = how == "fresh" or "\0" in self.inodes.path(inode)
        if repeat is None and (moved or self._sizes.get(inode) != st.st_size):
            if moved:  # another content there, or its name is gone: the open is repeated on a new inode
                self._fresh_inode(rel)
                inode = self.inodes.inode(rel)
            snapshot = Snapshot(self.core, fd, version, target, opener, pinned, reader, program, opener=opener)
            raise await self._pin(snapshot, rel, inode, ctx)
        if self.inodes.path(inode) != rel or how == "fresh":  # (served at a name it lost, or not its own)
            held = self.pages.version_served(here)
            if held is not None and held.rel == rel:  # (a version of another name's is no view of this one)
                os.close(fd)
                fd, version = os.dup(held.fd), held.version
                how = self.pages.serving(rel, inode, version, os.fstat(fd).st_size, opener, here, elsewhere)
            else:
                how = "direct"
        elif how == "cached" and not self._may_cache(inode, rel, st):
            how = "direct"
        cached = how == "cached"
        snapshot = Snapshot(
            self.core, fd, version, target, opener, pinned, reader, program, opener=opener, cached=cached
        )
        return self._reading(self._open_file(snapshot, inode), snapshot, inode, here)

    def _may_cache(self, inode: int, rel: str, st: os.stat_result) -> bool:
        """Whether a reader of the version whose stat is `st` may copy through `inode`'s page cache: the
        file at `rel` is still that version (no commit landed while it was opened, `_holds`), and no
        truncate by name through the inode may still be under way in the kernel (`_truncated`: its
        thread in the call it was in then, or that unknown)."""
        truncated = self._truncated.get(inode)
        if truncated is not None:
            tid, call = truncated
            now = _call_of(tid)
            if call is None or now in (call, None) or now.startswith("running"):  # (runnable: anywhere)
                return False
            del self._truncated[inode]
        return self._holds(rel, st)

    def _writes_elsewhere(self, rel: str, here: Sequence[FileHandle]) -> list[Shadow]:
        """The write handles of the file at `rel`, open or being released, that are not among `here`
        (the handles open on the inode a read-only open comes through)."""
        releasing = [h for h in self.releasing.values() if h.rel == rel and not h.released.is_set()]
        writing = [h for h in self._writers_of(rel) if h.rel == rel and not (h.moved or h.unlinked)]
        return [h for h in (*releasing, *writing) if all(h is not o for o in here)]

    def _reading(self, fh: int, snapshot: Snapshot, inode: int, here: Sequence[FileHandle]) -> pyfuse3.FileInfo:
        """The reply to a read-only open served by `snapshot` (file handle `fh`) on `inode`, where the
        handles `here` were open before it."""
        self.pages.opened(inode, snapshot)
        # a cached open drops the inode's pages, so its first read comes through it; a direct one keeps
        # those of readers of its version open there, and drops any other (the kernel copies through
        # them: another version's, left by readers since closed, would be copied for this one's)
        keep = not snapshot.cached and any(isinstance(h, Snapshot) for h in here)
        return pyfuse3.FileInfo(fh=fh, direct_io=not snapshot.cached, keep_cache=keep)

    async def _pin(self, snapshot: Snapshot, rel: str, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FUSEError:
        """ESTALE for a read-only open of `inode` whose size the kernel may hold another than that of
        the version `snapshot` opened (a commit landed since it was told, or while two calls asked
        about the file: the kernel keeps the older size for either, and a copy stops at it). The
        version is held on the inode as an open reader would hold it, so every reply about the inode
        tells its size from now on (the name moves to a new inode at a commit, `_replaced`); the kernel's
        attributes of the inode are invalidated, so that no reply made before can be applied any
        more; the kernel's repeat looks the name up after that, and is answered by this inode
        (`_pinned_entry`): when the repeated open comes, the kernel holds the version's size, which
        it serves (`_open_pinned`). (An open that met another content on its inode, or an inode that
        lost its name, pins a new inode for the name, which the kernel learns of at that lookup.)
        The invalidation cannot deadlock: the kernel holds no lock of the inode during a read-only
        open, and takes none for an attribute-only invalidation."""
        fh = self._open_file(snapshot, inode)
        self._pins.add(fh)
        trio.lowlevel.spawn_system_task(self._drop_pin, fh)
        with contextlib.suppress(OSError):  # the kernel forgot the inode: its next lookup makes it anew
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, inode, True)
        return self._stale(rel, ctx, writing=False, pin=fh)

    def _pinned_entry(self, rel: str, fh: int) -> pyfuse3.EntryAttributes:
        """The lookup of `rel` by a read-only open repeated with a pinned version (`_pin`): the pin's
        inode, with the version's attributes; if the name moved on to another inode meanwhile (a
        commit), the entry expires at once, so the name is that other inode for every later call."""
        inode = self.file_inodes[fh]
        attrs = self._reply(inode, self.inodes.path(inode))
        if self.inodes.inode_if_known(rel) != inode:
            attrs.entry_timeout = 0.0
        self.inodes.looked_up(inode)
        return attrs

    def _open_pinned(self, rel: str, inode: int, fh: int) -> pyfuse3.FileInfo:
        """The repeat of a read-only open that `_pin` answered ESTALE, on the pin's inode: served the
        pinned version, whose size the kernel holds now (every reply about the inode told it since
        the invalidation, and the repeat's lookup, sent after it, was applied or gave way to one)."""
        self._pins.discard(fh)
        snapshot = self.files[fh]
        assert isinstance(snapshot, Snapshot)
        here = [h for h in self._handles_on(inode) if h is not snapshot]
        st = os.fstat(snapshot.fd)
        how = self.pages.serving(
            rel, inode, snapshot.version, st.st_size, snapshot.opener, here, self._writes_elsewhere(rel, here)
        )
        snapshot.cached = how == "cached" and self._may_cache(inode, rel, st)
        self._sizes[inode] = st.st_size
        return self._reading(fh, snapshot, inode, here)

    async def _drop_pin(self, fh: int, wait: float = RETRY_WAIT) -> None:
        """Release a pinned version (`_pin`) whose open was not repeated on its inode in time (`wait`), or
        whose repeat was looked up by another name (`_repeating`: 0); `wait` on the mount's clock
        (`PageCache.now`: a daemon stopped meanwhile still keeps it for the repeat queued)."""
        deadline = self.pages.now() + wait
        while self.pages.now() < deadline:
            await trio.sleep(STALL / 2)
        if fh in self._pins:
            self._pins.discard(fh)
            handle = self.files.pop(fh)
            self._closed(self.file_inodes.pop(fh), fh)
            await handle.release()

    def _passthrough(self, fd: int, rel: str, flags: int, caller: Unprivileged | None) -> Passthrough:
        """An unmanaged file's handle; a writable one refuses a change that would be lost (`CarriedIn`)."""
        writable = _writable(flags)
        return Passthrough(fd, rel, writable, caller, self._gone_from_volume if writable else None)

    def _gone_from_volume(self, fd: int) -> tuple[str, bool, bool] | None:
        """Where the file open as `fd` is, if a write to it would reach no file the volume keeps:
        (its name, whether that is the volume's temp name, whether it is deleted). A temp name is
        where a commit or deletion sets aside the file it displaces from a managed name (in the
        registry's directory, or a `globs.STAGED` name where managed paths may be); a managed name,
        when the file was deleted from it. None while it is unmanaged, or managed in place (a write
        there is any program's change on the root: recorded by `external` when seen)."""
        found = self.backing.name_of(fd)
        if found is None:
            return None
        name, deleted = found
        aside = is_registry_path(name) or (STAGED.search(name) is not None and self._reaches(os.path.dirname(name)))
        return (name, aside, deleted) if aside or (deleted and self.core.paths.managed(name)) else None

    @staticmethod
    def _reader(tid: int) -> tuple[ProcessId | None, str | None]:
        """The program behind a request's thread id and, for a buffering program (whose re-reads
        `VolumeCore.note_read` tells apart by process), its process, as far as /proc tells."""
        pid = process_of(tid)
        comm = proc_file(pid, "comm")
        if comm is None:
            return None, None
        program = comm.decode(errors="replace").strip()
        try:
            return (ProcessId.of(pid) if program in BUFFERING_PROGRAMS else None), program
        except OSError:  # gone meanwhile (ProcessLookupError)
            return None, None

    @guarded
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        rel = await self._child(parent_inode, name)
        self._walk_again(ctx, self.pages.landed(ctx.pid), True, (parent_inode, rel))
        mode = stat_mod.S_IMODE(mode) & ~ctx.umask
        self.own.note(rel)
        if not self._managed_file(rel):
            fd = self.backing.open(rel, (flags | os.O_CREAT) & ~_NOT_PASSED, mode)
            try:
                entry = self._entry(rel, self._own(rel, ctx, fd))
            except BaseException:
                os.close(fd)  # the program gets the error, not a descriptor: none may leak
                raise
            return pyfuse3.FileInfo(
                fh=self._open_file(self._passthrough(fd, rel, flags, Unprivileged.of(ctx)), entry.st_ino),
                keep_cache=True,
            ), entry
        with self._use(rel):
            agent = await self._writer(ctx, rel, appending=Shadow.kind_of(flags) == "append")
            caller = Unprivileged.of(ctx)
            target, owner = self._target(rel), self._new_owner(rel, ctx)
            try:
                handle = await blocking(
                    Shadow.create, self.core, self._owner, agent, target, mode, flags, caller, *owner
                )
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
                # made meanwhile (the kernel's lookup found no file): opened as open(2) opens it now, to read
                entry = self._entry(rel)
                return await self._open_reading(rel, entry.st_ino, ctx, None), entry
        self._unpin(rel)
        entry = self._entry(rel)
        if reads_only(flags):
            # O_RDONLY|O_CREAT: making the file is all it changes; it reads the version it made as any
            # read-only open reads its version, so a later commit leaves it that version and its size
            # (a write handle's copy on the name's inode, it read nothing while its fstat showed the size
            # of the next commit of the name)
            await handle.release()
            return await self._open_reading(rel, entry.st_ino, ctx, None), entry
        return pyfuse3.FileInfo(fh=self._open_file(handle, entry.st_ino), direct_io=True), entry

    @guarded
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.files[fh].read(off, size)

    @guarded
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.files[fh]
        self.own.note(handle.rel)
        written = await handle.write(off, buf)
        if isinstance(handle, Shadow):
            self.writers[handle.rel] = handle
        inode = self.file_inodes[fh]
        told = self._sizes.get(inode)
        if told is not None and written > 0 and off + written > told:
            self._sizes[inode] = off + written  # as the kernel grows its size to a write's end
        return written

    @guarded
    async def flush(self, fh: int) -> None:
        handle = self.files.get(fh)
        if handle is not None:
            self.own.note(handle.rel)  # a commit's echo
            try:
                await handle.flush()
            finally:
                await self._take_name_back(self.file_inodes[fh], released=False)

    @guarded
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.files[fh].fsync(datasync)

    @guarded
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await fsync(self.dirs[fh].fd, datasync)

    @guarded
    async def release(self, fh: int) -> None:
        handle = self.files.pop(fh)
        inode = self.file_inodes.pop(fh)
        self.pages.released(handle)
        if not isinstance(handle, Shadow):
            self._closed(inode, fh)
            await handle.release()
            return
        self.own.note(handle.rel)  # its commit's echo
        self.releasing[fh] = handle
        try:
            await handle.release()
        finally:  # until its commit is in, its inode serves its writes: close(2) does not wait for it
            del self.releasing[fh]
            if self.writers.get(handle.rel) is handle:
                del self.writers[handle.rel]
            try:
                await self._take_name_back(inode, released=True)
            finally:
                self._closed(inode, fh)

    def _closed(self, inode: int, fh: int) -> None:
        """The file handle `fh` of `inode` is no longer open on it."""
        held = self.open_on[inode]
        del held[fh]
        if not held:
            del self.open_on[inode]
            self._let_go(inode)  # (a handle released after the kernel's FORGET: a commit at close, a pin)

    # ---- extended attributes --------------------------------------------------------

    @guarded
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        rel = await self._xattrs_at(inode)
        if name in (XATTR_VERSION, XATTR_VIEW):
            if "\0" in rel or not self._managed_file(rel):
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
            agent = await self._agent(ctx)
            version, view = await blocking(self.core.view_state, agent, self._target(rel))
            return str(version).encode() if name == XATTR_VERSION else view.encode()
        held = self._xattr_fd(inode, rel)
        if held is None and "\0" in rel:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)  # (the kernel asks for `security.capability` at each write)
        return os.getxattr(held, name) if held is not None else self.backing.getxattr(rel, name)

    async def _xattrs_at(self, inode: int) -> str:
        """The path the xattrs of `inode` are asked, set and removed at (`_metadata_at`)."""
        await self._still_its_file(inode)
        rel = await self._name_of(inode)
        return self._metadata_at(inode, rel)

    def _xattr_fd(self, inode: int, rel: str) -> int | None:
        """The descriptor the xattrs of `inode` at `rel` (`_xattrs_at`) are reached through: an open
        unmanaged handle's (`_unmanaged_fd`), or, for a file whose name is gone (unlinked or renamed
        over while open), one its handles hold (`_held_fd`); None: by the name (a nameless file
        without one has no attribute to show, nor one to change). An inode holding a past version of a
        file has it at that file's name, even through the unmanaged handle it was opened by."""
        if self.inodes.current_name(inode) is not None:
            return None
        held = self._unmanaged_fd(inode)
        return self._held_fd(inode) if held is None and "\0" in rel else held

    def _unmanaged_fd(self, inode: int) -> int | None:
        """The descriptor of an open unmanaged file's handle on `inode`, if any: its xattrs (and an
        unmanaged setattr's mode, owner and times) are asked and set through it, no name to resolve (the
        kernel asks at each write whether it has security.capability), and they stay reachable once its
        name is unlinked, as on a local disk. Used before any await (see `_through`)."""
        for held in self.open_on.get(inode, {}).values():
            if isinstance(held, Passthrough):
                return held.fd
        return None

    @guarded
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        rel = await self._xattrs_at(inode)
        held = self._xattr_fd(inode, rel)
        if held is None and "\0" in rel:
            return []
        # the file's own, not `user.coherent.*`: those are asked by name, so `cp -a`, `rsync -X` and
        # `tar --xattrs` copy no volume's version numbers into other files; `trusted.*` only to a
        # process with CAP_SYS_ADMIN, as a local file system lists them (the daemon sees them all)
        names = os.listxattr(held) if held is not None else self.backing.listxattr(rel)
        if any(n.startswith("trusted.") for n in names) and not administers(ctx.pid, ctx.uid):
            names = [n for n in names if not n.startswith("trusted.")]
        return [os.fsencode(n) for n in names]

    @guarded
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in (XATTR_VERSION, XATTR_VIEW):
            raise pyfuse3.FUSEError(errno.EPERM)
        rel = await self._xattrs_at(inode)
        held = self._xattr_fd(inode, rel)
        os.setxattr(held, name, value) if held is not None else self.backing.setxattr(rel, name, value)

    @guarded
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if name in (XATTR_VERSION, XATTR_VIEW):
            raise pyfuse3.FUSEError(errno.EPERM)
        rel = await self._xattrs_at(inode)
        held = self._xattr_fd(inode, rel)
        os.removexattr(held, name) if held is not None else self.backing.removexattr(rel, name)

    # ---- inode lifetime -------------------------------------------------------------

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            if not self.inodes.forget(inode, count):
                self.backing.release(inode)
                self._sizes.pop(inode, None)
                self._cached_as.pop(inode, None)
                self._truncated.pop(inode, None)
                self._left_globs.pop(inode, None)  # a lookup through a carried directory marks it again (`_reached`)
                self._let_go(inode)

    def _let_go(self, inode: int) -> None:
        """Once the kernel forgot `inode` and no handle is open on it: a write's own inode (`_apart`) is
        done with, and a nameless one (unlinked, replaced, made for a write) leaves the inode table
        with its hard-link key (`_files`), so files deleted through the mount cost no memory
        afterwards. (A named inode keeps its number for the life of the mount: `InodeTable.forget`.)"""
        if self.inodes.held(inode) or inode in self.open_on:
            return
        self._private.discard(inode)
        self._aside.pop(inode, None)
        self.inodes.drop(inode)
        if len(self._files) > 2 * len(self.inodes):  # at most one live key per inode: half are dead
            self._files = {key: i for key, i in self._files.items() if self.inodes.path_if_known(i) is not None}
