"""The watcher process: inotify over the directories of a volume root that a managed glob can reach.

Every write through the mount echoes back as an inotify event. Handled inside the mount daemon,
the echoes competed with the FUSE loop for the interpreter lock (measured: an unmanaged
open+write+close took ~1.6x as long). Here they cost the daemon nothing: they are deduplicated
and sent in batches.

Only directories some path below which a managed glob can match (`ManagedGlobs.reaches`) are
watched, and never `.coherent`: a tree no glob reaches holds no managed file, so an unpack, build
or `rm -rf` there wakes this process only for its top directory's name. A new directory in reach
is watched and then listed here, off the mount's request path: what was created in it before its
watch is reported from the listing, what comes after from its events. For each watched directory
the names of its managed files are kept, so a directory renamed away (even to a place no glob
reaches) reports each managed file it held as gone.

Run by the daemon as `python -I -m fusefs.watch_process ROOT MOUNTPOINT GLOB...` (the mountpoint
names the process, and the mount whose connection `_guard` aborts). Writes to stdout one record
per changed path: `C` (changed) or `G` (its name disappeared), the path relative to ROOT, NUL;
and `R` NUL once the watches are in place. If the kernel drops events (its queue overflowed), the
watches are rebuilt and every entry in reach is reported, each managed file that went away as gone.
Exits when its stdin reaches end of file, which happens however the daemon ends (even kill -9), so
it never outlives the mount; and once the daemon's main thread is gone while a thread of it stuck
in the kernel holds the mount open, it aborts the mount's connection first (`fusefs.abort`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import stat
import struct
import sys
import time

from coherent_volume.errors import InvalidPath
from coherent_volume.globs import STAGED, ManagedGlobs
from coherent_volume.mounts import device_of
from coherent_volume.paths import VolumePaths, is_registry_path

from .abort import abort, main_thread_gone

BATCH_DELAY = 0.01
"""Seconds to gather events before sending them: a burst of writes costs one record per path."""
GUARD_EVERY = 1.0
"""Seconds between looks at whether the daemon's main thread is gone (`_guard`)."""

IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x1000000
IN_DONT_FOLLOW = 0x2000000
IN_EXCL_UNLINK = 0x4000000
IN_ISDIR = 0x40000000
IN_CLOEXEC = os.O_CLOEXEC

MASK = (
    IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR | IN_DONT_FOLLOW | IN_EXCL_UNLINK
)
"""The events that signal a change: a write is seen when its writer closes the file (every
write(2) and open(2) would otherwise wake this process too)."""

_EVENT = struct.Struct("iIII")
"""struct inotify_event without its name: wd, mask, cookie, length of the NUL-padded name."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.inotify_init1.argtypes = [ctypes.c_int]
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
_libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]


def _checked(result: int, path: str = "") -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), path or None)
    return result


class Tree:
    """The watched directories of one root and the changes seen since the last `drain`.
    Invariant: only directories that `globs.reaches` are watched, never `.coherent`."""

    def __init__(self, root: str, globs: ManagedGlobs) -> None:
        self.root = root
        self.globs = globs
        self.paths = VolumePaths(root, globs)
        """Where each directory is reached: by a short path beneath a descriptor where root/rel
        would reach PATH_MAX."""
        self.pending: dict[str, bool] = {}
        """Changed path -> whether its name disappeared (once gone in a batch, it stays gone)."""
        self._start(report=False)

    def _start(self, *, report: bool) -> None:
        try:
            self.fd = _checked(_libc.inotify_init1(IN_CLOEXEC))
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
            raise SystemExit(
                f"inotify instance limit reached: no watcher of {self.root} could start (this user's processes hold "
                "fs.inotify.max_user_instances of them, or this process its descriptor limit): raise "
                "fs.inotify.max_user_instances (sysctl) or stop programs that watch files, then mount again"
            ) from None
        self._dirs: dict[int, str] = {}  # watch descriptor -> its directory
        self._wds: dict[str, int] = {}  # directory -> its watch descriptor
        self._managed: dict[int, set[str]] = {}  # watch descriptor -> names of its managed non-directories
        self._watch_tree("", report=report)

    def read(self) -> None:
        """Take the events the kernel has queued (call when the descriptor is readable)."""
        data = os.read(self.fd, 65536)
        offset = 0
        overflowed = False
        while offset < len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            name = data[offset + _EVENT.size : offset + _EVENT.size + length].rstrip(b"\0")
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                overflowed = True
            else:
                self._event(wd, mask, os.fsdecode(name))
        if overflowed:
            self._rebuild()

    def drain(self) -> dict[str, bool]:
        pending, self.pending = self.pending, {}
        return pending

    def _report(self, rel: str, gone: bool) -> None:
        self.pending[rel] = self.pending.get(rel, False) or gone

    def _event(self, wd: int, mask: int, name: str) -> None:
        directory = self._dirs.get(wd)
        if directory is None:  # a watch already dropped: its events are stale
            return
        if mask & IN_IGNORED:  # the kernel dropped the watch: its directory is gone
            self._forget(wd)
            return
        if not name:  # an event of the directory itself (its file system unmounted)
            return
        rel = f"{directory}/{name}" if directory else name
        if is_registry_path(rel) or STAGED.search(name):
            return
        if mask & (IN_DELETE | IN_MOVED_FROM):
            self._report(rel, gone=True)
            if mask & IN_ISDIR:
                self._vanish(rel)
            elif not self._still_a_file(directory, name):  # (an exchange moves a file out and another in)
                self._managed[wd].discard(name)
            return
        self._report(rel, gone=False)
        if mask & IN_ISDIR:
            if self.globs.reaches(rel):
                self._watch_tree(rel, report=True)
        elif self.globs.matches(rel):
            self._managed[wd].add(name)

    def _still_a_file(self, directory: str, name: str) -> bool:
        """Whether `name` in the watched `directory` is a file now. A file exchanged with another at
        its name (renameat2 RENAME_EXCHANGE: how every commit installs its content) is moved out last,
        from the watcher's side, when the other came from a directory it does not watch: the name
        still holds a file, which a later move of its directory must report as gone."""
        try:
            target = self.paths.target(f"{directory}/{name}" if directory else name, managed=False)
            return not stat.S_ISDIR(os.lstat(target.abs).st_mode)
        except (OSError, InvalidPath):
            return False

    def _watch_tree(self, top: str, *, report: bool) -> None:
        """Watch `top` and every directory in reach below it, then list each: its entries are
        reported (if `report`) and its managed names kept. A directory that is gone or no longer a
        directory by now is skipped: its parent's events say what became of it."""
        stack = [top]
        while stack:
            directory = stack.pop()
            try:
                target = self.paths.target(directory, managed=False)  # holds its anchor while in use
                path = target.abs
                wd = _checked(_libc.inotify_add_watch(self.fd, os.fsencode(path), MASK), path)
            except (FileNotFoundError, NotADirectoryError, InvalidPath):
                continue
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise SystemExit(
                        f"inotify watch limit reached with {len(self._dirs)} directories watched in {self.root}: "
                        f"raise fs.inotify.max_user_watches (sysctl) or manage fewer trees"
                    ) from None
                raise
            if self._dirs.get(wd) == directory:  # watched and listed already
                continue
            self._forget(wd)
            self._dirs[wd], self._wds[directory] = directory, wd
            managed = self._managed[wd] = set()
            try:
                entries = list(os.scandir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                rel = f"{directory}/{entry.name}" if directory else entry.name
                if is_registry_path(rel) or STAGED.search(entry.name):
                    continue
                if report:
                    self._report(rel, gone=False)
                if entry.is_dir(follow_symlinks=False):
                    if self.globs.reaches(rel):
                        stack.append(rel)
                elif self.globs.matches(rel):
                    managed.add(entry.name)

    def _vanish(self, top: str) -> None:
        """`top`, a directory, is gone from here: report the managed files it held as gone and
        drop the watches of its tree (wherever it went, its events no longer name it)."""
        for directory, wd in [(d, wd) for d, wd in self._wds.items() if d == top or d.startswith(top + "/")]:
            self._report(directory, gone=True)
            for name in self._managed.get(wd, ()):
                self._report(f"{directory}/{name}", gone=True)
            self._forget(wd)
            _libc.inotify_rm_watch(self.fd, wd)  # fails harmlessly if the kernel dropped it already

    def _forget(self, wd: int) -> None:
        directory = self._dirs.pop(wd, None)
        self._managed.pop(wd, None)
        if directory is not None and self._wds.get(directory) == wd:
            del self._wds[directory]

    def _rebuild(self) -> None:
        """The kernel dropped events: watch everything in reach afresh and report it all, and
        each managed file no longer there as gone."""
        known = {f"{d}/{n}" if d else n for wd, d in self._dirs.items() for n in self._managed.get(wd, ())}
        os.close(self.fd)
        self._start(report=True)
        now = {f"{d}/{n}" if d else n for wd, d in self._dirs.items() for n in self._managed.get(wd, ())}
        for rel in known - now:
            self._report(rel, gone=True)


def encode(changes: dict[str, bool]) -> bytes:
    return b"".join((b"G" if gone else b"C") + os.fsencode(rel) + b"\0" for rel, gone in changes.items())


def _send(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(1, data) :]
    except BrokenPipeError:  # the daemon is gone
        os._exit(0)


def _guard(daemon: int, device: str | None, mountpoint: str) -> None:
    """Exit if the daemon's main thread is gone: its stdin stays open only while a thread of it is
    stuck in the kernel, holding the mount open too, and the mount's callers wait for answers that
    never come; its connection is aborted first, so they fail ENOTCONN as on any dead mount."""
    if not main_thread_gone(daemon):
        return
    done = abort(device) if device is not None else "found no connection of it"
    print(
        f"coherent-volume: the mount daemon (pid {daemon}) of {mountpoint} died while a thread of it was stuck in "
        f"the kernel, holding the mount open: {done}, so calls on the mount fail ENOTCONN instead of waiting; "
        f"unmount it with `fusermount3 -u {mountpoint}` (or mount the volume there again)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(0)


def main(root: str, mountpoint: str, globs: ManagedGlobs) -> None:
    daemon, device = os.getppid(), device_of(mountpoint)
    tree = Tree(root, globs)
    _send(b"R\0")
    poller = select.poll()
    poller.register(0, select.POLLIN)
    watched = tree.fd
    poller.register(watched, select.POLLIN)
    due: float | None = None
    guard_at = time.monotonic() + GUARD_EVERY
    while True:
        until = guard_at if due is None else min(due, guard_at)
        timeout = max(0.0, until - time.monotonic()) * 1000
        for fd, _ in poller.poll(timeout):
            if fd == 0:
                if not os.read(0, 4096):  # the daemon is gone
                    os._exit(0)
            elif fd == watched:
                tree.read()
        if tree.fd != watched:  # rebuilt after an overflow
            poller.unregister(watched)
            watched = tree.fd
            poller.register(watched, select.POLLIN)
        if due is None and tree.pending:
            due = time.monotonic() + BATCH_DELAY
        if due is not None and time.monotonic() >= due:
            _send(encode(tree.drain()))
            due = None
        if time.monotonic() >= guard_at:
            _guard(daemon, device, mountpoint)
            guard_at = time.monotonic() + GUARD_EVERY


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], ManagedGlobs.of(sys.argv[3:]))
