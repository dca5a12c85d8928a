"""Open-file state of the mount: one object per FUSE file handle, carrying its own behaviour.

Every file handle answers the same requests (`FileHandle`); the operations adapter only looks
a handle up and forwards. Blocking protocol work runs in worker threads (`blocking`), so one
slow commit never stalls other requests. Which read-only handles the kernel may serve from its
page cache (which a shared mapping needs) is decided in one place, `PageCache`. Directory
listings are not file handles: they live in a table of their own (`Listing`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import resource
import stat as stat_mod
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import pyfuse3
import trio

from coherent_volume import atomic
from coherent_volume.core import HandleCommit, VolumeCore
from coherent_volume.edits import Edits
from coherent_volume.errors import CarriedIn, CoherenceError, InstallPending, RootGone, StaleWriteError
from coherent_volume.fingerprint import Fingerprint, hash_fd, open_to_check
from coherent_volume.liveness import ProcessId
from coherent_volume.paths import Target
from coherent_volume.protocol import Grant, HandleKind, goes_on_unlinked, read_shows_content

from .backing import syncs_nothing
from .workers import Workers

log = logging.getLogger("coherent_volume.fuse")

OUT_OF_DESCRIPTORS_EVERY = 60.0
"""Seconds between two log lines saying the daemon ran out of file descriptors."""


WORKERS = Workers()


async def blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking work in a worker thread (`fusefs.workers`)."""
    return await WORKERS.run(functools.partial(fn, *args, **kwargs))


async def fsync(fd: int, datasync: bool) -> None:
    """fsync(2) of `fd` (fdatasync where `datasync`): in a worker thread, unless its file system's
    fsync does nothing (`syncs_nothing`), which cannot block."""
    sync = os.fdatasync if datasync else os.fsync
    if syncs_nothing(fd):
        sync(fd)
    else:
        await blocking(sync, fd)


def reads_only(flags: int) -> bool:
    """Whether an open with `flags` changes nothing of the file it finds: read-only, not truncating."""
    return flags & os.O_ACCMODE == os.O_RDONLY and not flags & os.O_TRUNC


def errno_of(e: CoherenceError | OSError) -> int:
    """The errno a request answers for `e`: a refusal's is EACCES unless it names its own (a full
    or busy registry, a bad path), an OSError's its own, else EIO. The daemon out of descriptors
    answers ENFILE (the caller's own table is not full: EMFILE would say it is) and is logged."""
    if isinstance(e, RootGone):
        return errno.EIO  # (ENOENT would say that names which may exist at the root's new place do not)
    code = (getattr(e, "errno", None) or errno.EACCES) if isinstance(e, CoherenceError) else (e.errno or errno.EIO)
    if code in (errno.EMFILE, errno.ENFILE):
        _out_of_descriptors(code)
        return errno.ENFILE
    return code


_SAID_OUT_OF_DESCRIPTORS = [-OUT_OF_DESCRIPTORS_EVERY]


def _out_of_descriptors(code: int) -> None:
    """Log, at most once every OUT_OF_DESCRIPTORS_EVERY seconds, that the daemon could not open a file."""
    now = time.monotonic()
    if now - _SAID_OUT_OF_DESCRIPTORS[0] < OUT_OF_DESCRIPTORS_EVERY:
        return
    _SAID_OUT_OF_DESCRIPTORS[0] = now
    if code == errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        log.warning(
            "the mount daemon has no file descriptor left (its limit is %d): programs are told ENFILE. Unmount, "
            "raise the hard limit (`ulimit -Hn` in the shell that runs `coherent-volume mount`, or LimitNOFILE= in "
            "its service; the daemon raises its soft limit to it) and mount again",
            limit,
        )
    else:
        log.warning(
            "the system has no file left to open (fs.file-max): programs are told ENFILE; raise fs.file-max "
            "or close files elsewhere"
        )


class FileHandle(Protocol):
    """What the mount asks of an open file."""

    @property
    def rel(self) -> str: ...
    def stat(self) -> os.stat_result | None: ...
    async def read(self, off: int, size: int) -> bytes: ...
    async def write(self, off: int, buf: bytes) -> int: ...
    async def resize(self, size: int) -> None: ...
    async def flush(self) -> None: ...
    async def fsync(self, datasync: bool) -> None: ...
    async def release(self) -> None: ...


@dataclass
class Passthrough:
    """An unmanaged file: reads and writes go straight to the backing fd."""

    fd: int
    rel: str
    writable: bool
    unprivileged: Unprivileged | None = None
    """Its opener, unless root, until its first write or truncation clears the file's set-ID bits
    as a local disk does (`kill_set_ids`: the kernel's FUSE clears set-group-ID only where group
    execute is set)."""
    gone_from_volume: Callable[[int], tuple[str, bool, bool] | None] | None = None
    """For a writable handle: where its file (open as the given fd) is, if a write would reach no
    file the volume keeps (`Operations._gone_from_volume`), else None. A rename this daemon did not
    check may carry the file into a managed glob (its own, and every rename through the volume, are
    refused while the file is open for writing: `Operations._refuse_open_writers`,
    `Renames._refuse_unprotectable`), and a commit there then replaces it: from then on the handle
    changes nothing (`CarriedIn`)."""

    def stat(self) -> os.stat_result | None:
        return os.fstat(self.fd)

    async def read(self, off: int, size: int) -> bytes:
        return os.pread(self.fd, size, off)

    async def write(self, off: int, buf: bytes) -> int:
        self._changing()
        written = os.pwrite(self.fd, buf, off)
        self._still_kept(landed=True)
        return written

    async def resize(self, size: int) -> None:
        self._changing()
        os.ftruncate(self.fd, size)
        self._still_kept(landed=True)

    def _still_kept(self, landed: bool = False) -> None:
        """Refuse (`CarriedIn`) a change that would reach no file the volume keeps; `landed`: the
        change was made (the file was replaced while it ran), and the caller is told so rather than success."""
        gone = self.gone_from_volume(self.fd) if self.gone_from_volume is not None else None
        if gone is not None:
            raise CarriedIn(self.rel, *gone, landed)

    def _changing(self) -> None:
        """Before each write or truncation: its file still one the volume keeps (`_still_kept`); before
        the first, the file's set-ID bits, as its opener's change clears them."""
        self._still_kept()
        if self.unprivileged is not None:
            kill_set_ids(self.fd, self.unprivileged)
            self.unprivileged = None

    async def flush(self) -> None:
        pass

    async def fsync(self, datasync: bool) -> None:
        await fsync(self.fd, datasync)

    async def release(self) -> None:
        os.close(self.fd)


@dataclass
class Snapshot:
    """A managed file opened for reading: `fd` is the inode of the version it opened, which no
    commit modifies (commits install new inodes), so it serves exactly that version's bytes.
    At its first read its agent's view may move to that version (`VolumeCore.note_read` decides);
    `agent` is None once that was asked, or if the reader's agent is unknown (nothing tracked).
    A `cached` one is read through the kernel's page cache, so it can be mapped shared; the pages
    it is shown are its version's, filled through it or through a handle of its own agent (see
    `PageCache.serving`)."""

    core: VolumeCore
    fd: int
    version: int
    target: Target
    agent: str | None
    pinned: bool
    reader: ProcessId | None
    program: str | None
    opener: str | None = None
    """The agent that opened it (None: unknown), whatever `agent` becomes."""
    cached: bool = False

    @property
    def rel(self) -> str:
        return self.target.rel

    def stat(self) -> os.stat_result | None:
        return os.fstat(self.fd)

    async def read(self, off: int, size: int) -> bytes:
        data = os.pread(self.fd, size, off)
        if self.agent is not None and read_shows_content(off, len(data)):
            agent, self.agent = self.agent, None  # a view is what was read: the first read moves it
            await blocking(
                self.core.note_read,
                agent,
                self.target,
                self.version,
                pinned=self.pinned,
                reader=self.reader,
                program=self.program,
                content=self.fd,
            )
        return data

    async def write(self, off: int, buf: bytes) -> int:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def resize(self, size: int) -> None:
        raise pyfuse3.FUSEError(errno.EBADF)

    async def flush(self) -> None:
        pass

    async def fsync(self, datasync: bool) -> None:
        pass

    async def release(self) -> None:
        os.close(self.fd)


Serving = Literal["cached", "direct", "fresh"]

RETRY_WAIT = 5.0
"""Seconds the mount expects the kernel's repeat of a call it answered ESTALE (`PageCache.retry`),
counted on the mount's own clock (`PageCache.now`)."""
STALL = 0.5
"""Most seconds one gap between two calls of the mount's ESTALE bookkeeping adds to its clock: a
daemon stopped (SIGSTOP, a paused VM) or starved for longer finds the kernel's repeats of the calls
it answered ESTALE queued when it goes on, and they are still repeats (before, a daemon stopped
for 35 s answered them ESTALE again, which reached the programs: /tmp/s33crash 1)."""


@dataclass
class Retry:
    """A call by name answered ESTALE (`writing` to the file at `rel`, or not): the kernel looks the
    name up again, with no cached entry, and repeats the call once, on the inode that lookup answers."""

    rel: str
    writing: bool
    until: float
    pin: int | None = None
    """The file handle of the version a read-only open is repeated with (the mount's `_pin`)."""
    inode: int | None = None
    """The inode the lookup of a read-only open's repeat answered (the mount's `_repeating`)."""
    carries: int = 0
    """How many checked renames the mount had done when it answered ESTALE (its `_walk_again`)."""
    attributes: bool = False
    """It answered a getattr: the kernel repeats that with a lookup and a getattr, which never land,
    or, when an open's permission check asked, repeats the open."""


class PageCache:
    """Which content each inode of a managed file serves, and which of its read-only handles the
    kernel's page cache serves (a shared mapping needs it). The kernel keeps one page cache and one
    size per FUSE inode, and reads through them for every handle of the inode whenever it copies
    (`copy_file_range`, `sendfile`, `splice`) or maps, `direct_io` or not; so an inode serves one
    content at a time: one version to all its read-only handles, or one write handle's shadow.
    Another content gets another inode (a new one for its name, where the call is repeated), as a
    local disk gives a file replaced by rename. A handle may moreover be cached only while every
    page there was filled through a handle whose read registered its agent's view.

    Invariants: the handles open on an inode serve one content; an inode with cached readers
    (`used`) serves one version, and a change to its file gives the path a new inode first. The call
    that change came through is answered ESTALE and repeated by the kernel once only, so its repeat
    never meets ESTALE again (`retry`): a repeat that meets another content on its inode (another
    call opened it between the repeat's lookup and its open) is served there, the one case where an
    inode serves two contents."""

    def __init__(self) -> None:
        self._readers: dict[int, list[Snapshot]] = {}
        """The cached readers open on each inode."""
        self._writing: Counter[str] = Counter()
        """Paths a write is being opened at, or made to."""
        self._opening: Counter[int] = Counter()
        """Inodes a write is being opened or made through (its handle is not open there yet)."""
        self._retries: dict[int, Retry] = {}
        """Calls answered ESTALE that the kernel is about to repeat, by the caller's thread id."""
        self._clock = 0.0
        self._seen = time.monotonic()

    @staticmethod
    def version_served(here: Sequence[FileHandle]) -> Snapshot | None:
        """A read-only handle among `here` (the handles open on one inode) if all of them read one
        version (then that is the content the inode serves), else None."""
        snapshots = [h for h in here if isinstance(h, Snapshot)]
        if not snapshots or len(snapshots) < len(here) or any(h.version != snapshots[0].version for h in snapshots):
            return None
        return snapshots[0]

    def serving(
        self,
        rel: str,
        inode: int,
        version: int,
        size: int,
        opener: str | None,
        here: Sequence[FileHandle],
        elsewhere: Sequence[FileHandle],
    ) -> Serving:
        """How to serve a read-only open of `version` (`size` bytes) of the managed file at `rel` by
        agent `opener` through `inode`, given the handles open on it (`here`) and the write handles of
        the file open or being released on other inodes (`elsewhere`):

        - "fresh" when the inode serves another content (a write handle, or one being opened there,
          another version, an unmanaged handle of a file moved into a managed glob): the path gets a
          new inode and this open is repeated there;
        - "cached" when every handle here is a Snapshot of this version opened by the same agent (a
          page one of them filled was shown to that agent, and its read registered that view);
        - "direct" otherwise, so that each read reaches this handle and registers exactly what it
          returns: another agent's reader is open here; the file is empty (a cached read of it
          reaches no handle at all); or a write to it is open elsewhere, under way or about to be
          repeated (`retry`), which no reader may take the inode's page cache from."""
        if here or self.opening(inode):
            served = self.version_served(here)
            if served is None or served.version != version:
                return "fresh"
        now = self.now()
        due = any(r.writing and r.rel == rel and r.until > now for r in self._retries.values())
        if elsewhere or rel in self._writing or due or size == 0:
            return "direct"
        return "direct" if any(h.opener != opener for h in here if isinstance(h, Snapshot)) else "cached"

    def opened(self, inode: int, handle: Snapshot) -> None:
        """`handle` was opened on `inode` (as `serving` said)."""
        if handle.cached:
            self._readers.setdefault(inode, []).append(handle)

    def released(self, handle: FileHandle) -> None:
        """`handle` was released: if it was the last cached reader of its inode, the inode is free."""
        for inode, readers in list(self._readers.items()):
            if any(h is handle for h in readers):
                self._readers[inode] = [h for h in readers if h is not handle]
                if not self._readers[inode]:
                    del self._readers[inode]

    def used(self, inode: int) -> bool:
        """Whether readers use the page cache of `inode`: a change to its file needs a new inode."""
        return inode in self._readers

    def now(self) -> float:
        """The mount's clock for RETRY_WAIT: the monotonic clock, but each gap between two of its
        readings counted for at most STALL seconds, so a daemon that did not run meanwhile (stopped,
        starved) does not see a repeat queued through that gap as overdue."""
        now = time.monotonic()
        self._clock += min(now - self._seen, STALL)
        self._seen = now
        return self._clock

    def retry(self, tid: int, rel: str, writing: bool, pin: int | None, carries: int, attributes: bool) -> None:
        """A call by thread `tid` by the name `rel` was answered ESTALE: the kernel looks `rel` up
        again and repeats the call once, on the inode that lookup answers; a second ESTALE would
        reach the program. So until it lands (`landed`): for a write, its lookup gives it an inode
        that no reader's page cache holds (see `retrying`), and no reader of `rel` starts using a
        page cache; and if the inode its lookup answered lost its name meanwhile, the call is
        served at the name (a call by name may take effect at any moment while it is under way).
        `pin`: a version held for a read-only open's repeat; `carries`, `attributes`: see `Retry`."""
        now = self.now()
        self._retries = {t: r for t, r in self._retries.items() if r.until > now}
        self._retries[tid] = Retry(rel, writing, now + RETRY_WAIT, pin, carries=carries, attributes=attributes)

    def retrying(self, tid: int) -> Retry | None:
        """The call of thread `tid` that the kernel is repeating, if any, whatever name it looks up: a
        rename may have carried the file, or the inode the call came to, between the program's lookup
        and its call, so the name the kernel looks up again need not be the one the call was answered
        ESTALE by (the mount's `_repeating` decides which of the repeat's lookups is the call's)."""
        retry = self._retries.get(tid)
        return retry if retry is not None and retry.until > self.now() else None

    def landed(self, tid: int) -> Retry | None:
        """Thread `tid` makes its next call after its lookup: the call the kernel was repeating, if any,
        is over. (A lookup that found nothing does not end it: the kernel looks a name up once more
        after a lookup that revalidated its entry found nothing. One that never lands expires after
        RETRY_WAIT.)"""
        retry = self._retries.pop(tid, None)
        return retry if retry is not None and retry.until > self.now() else None

    @contextlib.contextmanager
    def writing(self, rel: str, inode: int) -> Iterator[None]:
        """A write to `rel` is being opened or made through `inode`: meanwhile no reader of `rel` is
        cached, and none is opened on `inode` (`opening`)."""
        self._writing[rel] += 1
        self._opening[inode] += 1
        try:
            yield
        finally:
            self._writing[rel] -= 1
            if not self._writing[rel]:
                del self._writing[rel]
            self._opening[inode] -= 1
            if not self._opening[inode]:
                del self._opening[inode]

    def opening(self, inode: int) -> bool:
        """Whether a write is being opened or made through `inode` (see `writing`)."""
        return inode in self._opening


@dataclass
class Shadow:
    """A managed file opened for writing: writes land in an unnamed shadow file beside the target,
    installed as one commit at flush/close, so readers never see a partial write. A handle that
    only appends (`kind` "append") shares its agent's grant with its other appending handles and
    its appends are added to whatever is current at commit; any other write handle is alone and
    commits as a compare-and-swap against `base_version` (see `protocol.handles_share`).

    Invariants: from open (or the first write after a commit) until the next commit, `grant` (a
    share of this agent's write grant) keeps every other agent out; between commits it is None and
    `fd` is -1 (the committed shadow is the file now), or the file it committed once its agent
    unlinked that (`orphan`), and `kept` the file its commit left at its name (read, never written),
    which its reads, `fstat` and `fsync` go on with wherever a rename carries it or whatever is put
    at its name since, as on a local disk. What a failed commit at a FLUSH (a close(2)) told its
    program is final (`failed`): its writes are dropped then, never committed later, and every later
    request of the handle (another descriptor's write, fsync, close) fails the same way."""

    core: VolumeCore
    owner: ProcessId
    """The daemon: handle grants live as long as it does."""
    target: Target
    agent: str
    kind: HandleKind
    fd: int
    grant: Grant | None
    base_version: int
    """The version the shadow's content starts from."""
    edits: Edits = field(default_factory=Edits)
    pending: bool = False
    """The shadow differs from what was last committed (an O_TRUNC open alone makes it so)."""
    wrote: bool = False
    """Data was written or resized since the last commit: flush commits only then, because
    shells flush a freshly opened descriptor (dup2, then close) before writing anything."""
    synced: bool = False
    """The program fsynced the shadow since its last write, asking for its content to be durable."""
    created: bool = False
    """This handle created the file: as on a local disk, its name is durable only once the
    program fsyncs the directory, so even a synced commit need not fsync it."""
    unlinker: str | None = None
    """The agent that unlinked its file through the mount (`orphan`), if one did."""
    moved: bool = False
    """Its file was renamed away: writing on is refused (ESTALE), since its grant and version are
    those of the old name."""
    closed: bool = False
    """A close(2) of a descriptor of it (FLUSH) left nothing to commit: its program may be done with
    it while it still holds its grant, which its RELEASE ends (`released`) shortly after."""
    failed: int | None = None
    """The errno of a commit that failed at a FLUSH: its close(2) was told that nothing was written
    (or that the outcome is unknown), so the writes it held were dropped then. A release that
    committed them later would make that answer a lie (a program that appends again would add its
    line twice); later writes through another descriptor could not land without them. So nothing
    is ever committed through the handle again: every later request but RELEASE fails with this
    errno (`_usable`), and RELEASE only ends its grant."""
    unprivileged: Unprivileged | None = None
    """Its opener, unless root: its writes and truncations clear the file's set-ID bits
    (`kill_set_ids`), its first write after each commit and its O_TRUNC open."""
    kept: int = -1
    """Between commits (`fd` -1): a descriptor of the file its last commit left at its name, taken in
    the commit's worker job (`_committed`): its inode is that version's, which no commit changes (each
    installs a new inode), so reads, `fstat` and `fsync` of the handle go on with it as on a local
    disk, wherever renames carry it and whatever is put at its name since (before, the handle re-read
    its name: after another file was renamed over it, a directory exchange, or a rename racing the
    read, it read another file's bytes or failed ENOENT; /tmp/s31r2p 1-3). Never written through: the
    next write takes a new shadow, whose grant is refused if the file changed (`_regrant`). -1 where
    that file is not known (a replayed append whose file was replaced at once): reads copy the file
    at its name, as before. Closed when a new shadow starts, at a failed commit and at RELEASE."""
    released: trio.Event = field(default_factory=trio.Event, repr=False)
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _busy: trio.Lock = field(default_factory=trio.Lock, repr=False)
    """Held by each of read, write, resize, flush, fsync and release for its whole run: the kernel
    sends requests of one handle concurrently (a forked child's close(2) is a FLUSH while its parent
    writes), and a commit in a worker thread hashes the shadow, stages it and closes its descriptor,
    so nothing may write, read or resize it meanwhile (a write landing after the hash would commit
    bytes that do not match their recorded hash)."""

    @property
    def rel(self) -> str:
        return self.target.rel

    @property
    def unlinked(self) -> bool:
        """Its file was unlinked through the mount: it goes on with it, kept by no name."""
        return self.unlinker is not None

    @property
    def orphaned(self) -> bool:
        """Its own agent unlinked its file: its commits are dropped, as a local disk keeps nothing
        written to an unlinked file (`protocol.goes_on_unlinked`)."""
        return self.unlinker is not None and goes_on_unlinked(self.agent, self.unlinker)

    @property
    def unsaved(self) -> bool:
        """It holds writes not yet committed, at the name it was opened by."""
        return self.pending and not self.moved and not self.unlinked

    def stat(self) -> os.stat_result | None:
        """The shadow's stat while there is one, else the committed file's (`kept`) if known. Called on
        the event loop while a worker thread may be committing (and closing) the shadow: the fds are
        read and closed under one lock."""
        with self._fd_lock:
            held = self.fd if self.fd >= 0 else self.kept
            return os.fstat(held) if held >= 0 else None

    def committed_stat(self) -> os.stat_result | None:
        """The stat of the file its last commit left (`kept`) while it holds no shadow, else None."""
        with self._fd_lock:
            return os.fstat(self.kept) if self.fd < 0 and self.kept >= 0 else None

    def orphan(self, st: os.stat_result, file: int | None, unlinker: str) -> None:
        """Agent `unlinker` unlinked its file (`st`, open as `file` until then). As on a local disk, the
        handle goes on with the file, kept by no name: its shadow (given the file's owner and extended
        attributes: those set through the handle went to the file) or, between
        commits, the file itself. What it writes then is never committed if its own agent unlinked it;
        another agent's unlink (which only comes between its commits: its grant keeps others out
        otherwise) is a change since its last commit, so its next write is refused as after another
        agent's commit (`_regrant`), never dropped silently (`protocol.goes_on_unlinked`). A handle
        whose committed file (`kept`) is not `st` (another commit replaced it since) is not that file's:
        it keeps its own, and its next write is refused as after that commit."""
        with self._fd_lock:
            if self.kept >= 0 and not os.path.samestat(os.fstat(self.kept), st):
                return
            if self.fd < 0 and file is not None:
                self.fd = os.dup(file)  # (`kept` stays open until the handle's next request that may close it)
            elif self.fd >= 0:
                if file is not None:
                    atomic.copy_xattrs(file, self.fd)  # those set through it went to the file
                if os.geteuid() == 0:
                    mode = os.fstat(self.fd).st_mode
                    os.fchown(self.fd, st.st_uid, st.st_gid)
                    if mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                        os.fchmod(self.fd, stat_mod.S_IMODE(mode))  # chown cleared them
        self.unlinker = unlinker

    def set_times(self, atime_ns: int | None, mtime_ns: int | None) -> None:
        """utimensat of the file while this handle holds unsaved writes: the times go to the shadow too
        (what its agent's stat shows, and what its commit installs); None keeps one as it is."""
        with self._fd_lock:
            if self.fd >= 0:
                st = os.fstat(self.fd)
                atime = st.st_atime_ns if atime_ns is None else atime_ns
                os.utime(self.fd, ns=(atime, st.st_mtime_ns if mtime_ns is None else mtime_ns))

    @staticmethod
    def kind_of(flags: int) -> HandleKind:
        return "append" if flags & os.O_APPEND and not flags & os.O_TRUNC else "write"

    @classmethod
    def open(
        cls,
        core: VolumeCore,
        owner: ProcessId,
        agent: str,
        target: Target,
        flags: int,
        unprivileged: Unprivileged | None,
        existing: bool = False,
    ) -> Shadow:
        """Check and take the write grant, then start a shadow copy of the current content (blocking).
        With `existing`, FileNotFoundError if no file is there (`VolumeCore.begin_write`)."""
        kind = cls.kind_of(flags)
        truncate = bool(flags & os.O_TRUNC)
        grant, version = core.begin_write(agent, target, owner, kind=kind, existing=existing)
        handle = cls(core, owner, target, agent, kind, -1, grant, version, pending=truncate, unprivileged=unprivileged)
        if truncate:
            handle.edits.change()
        handle = handle._start(copy=not truncate)
        if truncate and unprivileged is not None:
            kill_set_ids_at(target.abs, unprivileged)
        return handle

    @classmethod
    def create(
        cls,
        core: VolumeCore,
        owner: ProcessId,
        agent: str,
        target: Target,
        mode: int,
        flags: int,
        unprivileged: Unprivileged | None,
        uid: int,
        gid: int,
    ) -> Shadow:
        """Create a managed file (committed empty) owned by `uid`, `gid` (the caller's), and open its
        shadow; a read-only one (O_RDONLY|O_CREAT), which can write nothing, holds no grant once it
        is made. A file that appeared meanwhile is opened as by open(2) with these flags, unless
        O_EXCL or read-only: FileExistsError then (the caller opens a read-only one to read) (blocking)."""
        kind = cls.kind_of(flags)
        try:
            grant, version = core.create(agent, target, mode, owner, kind)
        except FileExistsError:
            if flags & os.O_EXCL or reads_only(flags):
                raise  # a read-only open of what is there now needs no write handle: the caller's
            return cls.open(core, owner, agent, target, flags, unprivileged)
        handle = cls(core, owner, target, agent, kind, -1, grant, version, created=True, unprivileged=unprivileged)
        handle = handle._start(copy=False, chown=(uid, gid))
        if reads_only(flags):  # its creation is all it can change: no grant held open
            handle._drop_grant()
        return handle

    def _start(self, copy: bool, chown: tuple[int, int] | None = None) -> Shadow:
        """Give a handle that holds its grant its shadow file (and a file it created, its owner);
        on failure the grant is released."""
        try:
            if chown is not None and os.geteuid() == 0:
                st = os.lstat(self.target.abs)
                uid, gid = chown
                if st.st_uid != uid or gid not in (-1, st.st_gid):  # not the caller's already
                    os.lchown(self.target.abs, uid, gid)
                    if st.st_mode & (stat_mod.S_ISUID | stat_mod.S_ISGID):
                        os.chmod(self.target.abs, stat_mod.S_IMODE(st.st_mode))  # chown cleared the set-id bits
            self.fd = _shadow(self.target.abs, copy)
            return self
        except BaseException:
            self._drop_grant()
            raise

    async def _writable(self) -> None:
        """A handle written (or resized) again after its commit takes its grant back and a new shadow."""
        if self.moved:
            raise pyfuse3.FUSEError(errno.ESTALE)
        if (self.grant is None and not self.orphaned) or self.fd < 0:
            await blocking(self._rewritable)  # one worker-thread job for both

    def _rewritable(self) -> None:
        """`_writable`'s blocking half, in one job: the grant back where it has none (unless its own
        agent unlinked its file: `orphaned`), and a new shadow where it has none."""
        if self.grant is None and not self.orphaned:
            self._regrant()
        if self.fd < 0:
            try:
                self._reshadow()
            except BaseException:
                self._drop_grant()  # a failed write leaves nothing that blocks others
                raise

    def _regrant(self) -> None:
        """The grant for a handle written again after its commit: it goes on from the version it
        committed if that is still current (or it only appends), else EACCES, whose log line says
        that this descriptor cannot write again, whatever is read (its content is that version's)."""
        try:
            self.grant, self.base_version = self.core.begin_write(
                self.agent, self.target, self.owner, kind=self.kind, expected=self.base_version
            )
        except StaleWriteError as e:
            if e.reason == "stale":
                log.info(
                    "refused: a write to %s through a descriptor of %s whose writes were committed as version %s: "
                    "the file changed since (now version %s), and this descriptor's content is that version's: "
                    "close it and open the file again to write",
                    self.target.rel,
                    self.agent,
                    self.base_version,
                    e.current_version,
                )
            raise

    def _reshadow(self) -> None:
        """A new shadow after a commit: a copy of the current content. The committed file it goes on
        from is let go (`kept`)."""
        fd = _shadow(self.target.abs, copy=True)
        with self._fd_lock:
            self.fd = fd
            self._let_kept_go()

    def _let_kept_go(self) -> None:
        """Close the committed file's descriptor (`kept`), if any; under `_fd_lock`."""
        if self.kept >= 0:
            os.close(self.kept)
            self.kept = -1

    def _usable(self) -> None:
        """FUSEError with its errno once a FLUSH's commit failed (`failed`)."""
        if self.failed is not None:
            log.info(
                "refused: %s: an earlier close(2) of this write handle failed, so the writes it held were "
                "dropped and nothing written through it is committed any more; open the file again",
                self.target.rel,
            )
            raise pyfuse3.FUSEError(self.failed)

    async def read(self, off: int, size: int) -> bytes:
        async with self._busy:
            self._usable()
            if self.fd < 0 and self.kept >= 0:
                return os.pread(self.kept, size, off)  # its committed file, wherever it is now
            if self.fd < 0:
                await blocking(self._reshadow)
            return os.pread(self.fd, size, off)

    async def write(self, off: int, buf: bytes) -> int:
        async with self._busy:
            self._usable()
            self.closed = False
            await self._writable()
            self._changing()
            if self.kind == "append":
                off = os.fstat(self.fd).st_size
                self.edits.append(off)
            else:
                self.edits.change()
            written = os.pwrite(self.fd, buf, off)
            self.pending = self.wrote = True
            self.synced = False
            return written

    async def resize(self, size: int) -> None:
        """ftruncate. A handle that only appended so far was opened with no view: cutting or
        extending makes its content depend on the file's, so it turns into a write handle, which
        needs a current view, an unmoved base and no other open handle of its agent (EACCES
        otherwise, at the ftruncate that asked)."""
        async with self._busy:
            self._usable()
            self.closed = False
            if self.moved:  # before a grant is asked at its old name, whose refusal would speak of that name's file
                raise pyfuse3.FUSEError(errno.ESTALE)
            if self.kind == "append" and not self.orphaned:
                await blocking(self._turn_into_writer)
            await self._writable()
            self._changing()
            os.ftruncate(self.fd, size)
            self.edits.change()
            self.pending = self.wrote = True
            self.synced = False

    def _changing(self) -> None:
        """Before its first write or truncation since its last commit: the file's set-ID bits, as its
        opener's change clears them (what its commit installs takes the file's mode)."""
        if self.unprivileged is not None and not self.wrote:
            kill_set_ids_at(self.target.abs, self.unprivileged)

    def _turn_into_writer(self) -> None:
        self._drop_grant()  # its append share; another agent taking the grant meanwhile is a refusal below
        self.grant, _ = self.core.begin_write(
            self.agent, self.target, self.owner, kind="write", expected=self.base_version, after_appending=True
        )
        self.kind = "write"

    async def flush(self) -> None:
        async with self._busy:
            self._usable()
            if self.wrote:
                try:
                    await blocking(self._commit)
                except InstallPending:
                    raise  # committed: the next operation puts it in place
                except (CoherenceError, OSError) as e:
                    self._drop_writes(e)
                    trio.lowlevel.spawn_system_task(self._let_go)
                    raise
            self.closed = not self.pending

    async def _let_go(self) -> None:
        """After a failed FLUSH: end the handle's grant now, not at its RELEASE (nothing written through
        it can commit any more, and other descriptors of it, a forked child's, may stay open for
        long); in the background, so that the close(2) that failed is answered at once. Where the
        registry does not take the release, its renewals stop all the same (`Writes.release`) and the
        grant ends with its lease."""
        async with self._busy:  # taken from the handle at once: its other requests never wait on the registry
            grant, self.grant = self.grant, None
        if grant is None:
            return
        await blocking(self._end_grant, grant)

    def _end_grant(self, grant: Grant) -> None:
        """End this handle's use of `grant`; where the registry does not take it, the grant's renewals
        stop all the same (`Writes.release`), so it ends with its lease: logged, never failing the caller."""
        try:
            self.core.release(grant, self.kind, log=False)
        except (CoherenceError, OSError) as e:
            log.warning(
                "the write grant on %s of %s was not released (it ends with its lease): %s", self.rel, self.agent, e
            )

    def _drop_writes(self, e: CoherenceError | OSError) -> None:
        """The commit of a FLUSH failed with `e`, which its close(2) reports: the writes the shadow
        held are dropped, never committed later (`failed`). Its grant lasts until RELEASE, which
        follows the last close at once, unless `_let_go` ended it before (ending it here would make this
        close wait on the registry again)."""
        self.failed = errno_of(e)
        self._close()
        self.edits = Edits()
        self.pending = self.wrote = False
        self.closed = True  # nothing left to commit: its agent's next open waits for its RELEASE, not refused `held`
        log.warning(
            "close(2) of %s by %s failed, so the writes its handle held were dropped and are never committed: %s",
            self.target.rel,
            self.agent,
            e,
        )

    def _commit(self, keep: bool = True) -> None:
        """Install the shadow's content as one commit, then end the grant's share so that close()
        returning means the file is free; a failure is reported to this flush, and to every later
        request of the handle (`_drop_writes`). The commit is as durable as the program asked: content
        it fsynced into an existing file survives a power loss, as it would on a local disk;
        anything else reaches the disk with the next writeback. A handle whose file its agent
        unlinked commits nothing: its writes stay in the file it goes on with (`orphan`). `keep`: the
        handle goes on (not its RELEASE), with the file its commit left (`kept`)."""
        if self.orphaned:  # nothing to commit, so nothing to fail
            self._drop_grant()
            self.edits = Edits()
            self.pending = self.wrote = False
            return
        durable = self.synced and not self.created
        staged = atomic.Staged(self.target.abs, hash_fd(self.fd), os.dup(self.fd), durable=durable)
        commit = HandleCommit(self.kind, self.grant, self.edits, self.orphaned)
        before, written_at = self.base_version, os.fstat(self.fd).st_mtime_ns
        try:
            self.base_version = self.core.commit(
                self.agent, self.target, staged, expected=self.base_version, handle=commit
            )
        except InstallPending as e:  # committed, put in place by the next operation: as after a commit
            self.base_version = e.version
            self._committed(before, keep)
            raise
        self._committed(before, keep)
        if self.base_version == before:  # it wrote the bytes the file holds: no commit, but a write all the same
            touch(self.target.abs, written_at)

    def _committed(self, before: int, keep: bool) -> None:
        """After a commit (from version `before`): the shadow is the file now (or its file is gone, or
        it is the committed version's staged file, which the volume puts in place): writing again
        starts afresh, and meanwhile (`keep`) the handle holds the file the commit left (`kept`)."""
        kept = self._committed_file(before) if keep else -1
        with self._fd_lock:
            self._let_kept_go()
            if self.fd >= 0:
                os.close(self.fd)
            self.fd, self.kept = -1, kept
        self.edits = Edits()
        self.pending = self.wrote = False
        self.grant = None

    def _committed_file(self, before: int) -> int:
        """A read-only descriptor of the file the commit of the shadow just made (from version `before`
        to `base_version`) left at its name, taken right after it, or -1 (read-only: the daemon holds
        no managed file open for writing, which a checked rename into the globs takes for a writer's,
        EBUSY: `open_writers`). A commit that made a version
        installs the shadow's own inode (linked: it has a name now, or had one until another commit
        replaced it), except an append replayed onto a newer version (`protocol.may_replay`), whose
        shadow was never linked: the file at the name then, if the registry says it is that version.
        One that made none (the file held those bytes already) leaves the file there, if the
        registry says so, else the shadow, whose bytes are that file's (a write handle's; an append
        handle's may be the base's, not the file's: -1)."""
        made = self.base_version != before
        if made and (self.kind == "write" or os.fstat(self.fd).st_nlink > 0):
            return _reopened(self.fd)
        there = self._version_at_name()
        if there >= 0:
            return there
        return _reopened(self.fd) if not made and self.kind == "write" else -1

    def _version_at_name(self) -> int:
        """A descriptor of the file at its name if it is its version `base_version` as the registry
        records it (its fingerprint, or failing that its content), else -1."""
        try:
            fd = open_to_check(self.target.abs)
        except OSError:
            return -1
        try:
            st = os.fstat(fd)
            record, _ = self.core.registry.peek(self.target.rel, self.agent)
            if (
                stat_mod.S_ISREG(st.st_mode)
                and record is not None
                and record.present
                and record.version == self.base_version
                and (Fingerprint.of(st) == record.fingerprint or hash_fd(fd) == record.hash)
            ):
                return fd
        except (CoherenceError, OSError):
            pass
        os.close(fd)
        return -1

    async def fsync(self, datasync: bool) -> None:
        async with self._busy:
            self._usable()
            if self.fd < 0 and self.kept >= 0:  # its content is committed: make that durable, where it is now
                at = None if self.moved or self.unlinked else os.path.dirname(self.target.abs)
                await blocking(_sync_kept, self.kept, datasync, at)
                return
            if self.fd < 0:
                await blocking(_sync_committed, self.target.abs)
                return
            await fsync(self.fd, datasync)
            self.synced = True

    async def release(self) -> None:
        try:
            async with self._busy:
                if self.pending or self.grant is not None:
                    await blocking(self._release)
                else:
                    self._close()
        finally:
            self.released.set()

    def _release(self) -> None:
        try:
            if self.pending:
                try:
                    self._commit(keep=False)
                except (CoherenceError, OSError) as e:
                    log.warning(
                        "the commit at the release of %s failed, and no close(2) reports it (its handle held "
                        "only an O_TRUNC with nothing written, or writes that came after its last close): %s",
                        self.target.rel,
                        e,
                    )
        finally:
            self._drop_grant()
            self._close()

    def _drop_grant(self) -> None:
        grant, self.grant = self.grant, None
        if grant is not None:
            self._end_grant(grant)

    def _close(self) -> None:
        """Close the shadow and the committed file (`kept`): nothing is read through the handle any more."""
        with self._fd_lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self._let_kept_go()


@dataclass(frozen=True)
class Unprivileged:
    """A caller that is not root (taken to lack CAP_FSETID): its groups, the primary one first."""

    groups: frozenset[int]

    @classmethod
    def of(cls, ctx: pyfuse3.RequestContext) -> Unprivileged | None:
        """The caller of a request (its supplementary groups from /proc), or None for root."""
        if ctx.uid == 0:
            return None
        groups = {ctx.gid}
        try:
            with open(f"/proc/{ctx.pid}/status") as f:
                for line in f:
                    if line.startswith("Groups:"):
                        groups.update(int(g) for g in line.split()[1:])
        except OSError:  # (gone: its primary group alone)
            pass
        return cls(frozenset(groups))


def kill_set_ids(fd: int, caller: Unprivileged) -> None:
    """Clear the set-user-ID bit of the file open as `fd`, and its set-group-ID bit where group
    execute is set or the caller is not in its group, as a write or a truncation by a process
    without CAP_FSETID does on a local disk (Linux's setattr_should_drop_suidgid): the daemon
    writes as root, so the kernel keeps them when it writes for such a caller."""
    st = os.fstat(fd)
    mode = st.st_mode
    group_kept = not mode & stat_mod.S_IXGRP and st.st_gid in caller.groups
    killed = mode & ~stat_mod.S_ISUID & ~(0 if group_kept else stat_mod.S_ISGID)
    if killed != mode:
        os.fchmod(fd, stat_mod.S_IMODE(killed))


def kill_set_ids_at(path: str, caller: Unprivileged) -> None:
    """`kill_set_ids` of the file at `path` (nothing where it is gone meanwhile)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:  # (gone meanwhile: its commit will say)
        return
    try:
        kill_set_ids(fd, caller)
    finally:
        os.close(fd)


def touch(path: str, mtime_ns: int) -> None:
    """Move the modification time of the file at `path` (and so its change time) forward to
    `mtime_ns`, as a write or a truncate that changed no byte does on a local disk (make and editors
    compare them); its access time kept. Never back: a version another agent committed since holds
    a later time. Nothing where no file is there now (the call it follows has succeeded)."""
    try:
        st = os.lstat(path)
        if stat_mod.S_ISREG(st.st_mode) and st.st_mtime_ns < mtime_ns:
            os.utime(path, ns=(st.st_atime_ns, mtime_ns), follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        pass


def _shadow(path: str, copy: bool) -> int:
    """An unnamed shadow of the file at `path` (a copy of its content when `copy`) with the file's
    mode: once its name is gone (unlinked while open) an fstat through the handle still sees the
    file's mode, as on a local disk. (Not its owner: a commit gives the new inode the target's owner
    only when that is not the daemon, so the shadow must stay the daemon's.) The daemon's own reads
    of it (a commit hashes it) leave its access time alone (O_NOATIME): that is the program's."""
    fd = atomic.unnamed_copy(path, copy)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NOATIME)
        os.fchmod(fd, stat_mod.S_IMODE(os.stat(path, follow_symlinks=False).st_mode))
    except FileNotFoundError:
        pass  # gone meanwhile: an unlinked file shows what the shadow was made with
    except BaseException:
        os.close(fd)
        raise
    return fd


def _reopened(fd: int) -> int:
    """A read-only descriptor of the file open as `fd` (named or not), or -1 if it cannot be had (out
    of descriptors: the handle reads its name as before)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _sync_kept(fd: int, datasync: bool, directory: str | None) -> None:
    """fsync a committed file open as `fd`, and the directory of its name (`directory`, unless a rename
    or unlink took it from there: then the file alone), so its content (and name) survive a power loss."""
    (os.fdatasync if datasync else os.fsync)(fd)
    if directory is not None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # (moved meanwhile: the file is synced)
            atomic.fsync_dir(directory)


def _sync_committed(path: str) -> None:
    """fsync a committed file and its directory: its content and its name survive a power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic.fsync_dir(os.path.dirname(path))


@dataclass
class Listing:
    """An open directory: its entry names, taken at opendir and again when it is read from its start
    once more (rewinddir(3)), and its backing descriptor (for fstat, which works on a local disk
    after the directory is removed too)."""

    inode: int
    names: list[bytes]
    fd: int
    read: bool = False
    """Whether it was read: a read from its start after that is a rewind, which lists it anew."""
