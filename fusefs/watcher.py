"""Foreign writes into the backing root while mounted: record them and drop stale kernel caches.

inotify runs in a process of its own (`watch_process`), over the directories a managed glob can
reach, so the echo of the mount's own writes never competes with FUSE requests for this
interpreter; its batches of changed paths arrive on a pipe read by a trio task. Kernel
invalidation runs in a worker thread: calling it from inside a handler can deadlock.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pyfuse3
import trio

from coherent_volume.core import VolumeCore
from coherent_volume.errors import CoherenceError

from .inodes import InodeTable

log = logging.getLogger("coherent_volume.fuse")

OWN_WINDOW = 2.0
"""Seconds after the mount itself changed a path during which inotify events on it are its own echo."""

RESTART_DELAY = 0.1
MAX_RESTART_DELAY = 5.0
"""Seconds before restarting a watcher process that died, doubling while it keeps dying."""

STOP_TIMEOUT = 5.0
"""Seconds the watcher process gets to exit once its stdin is closed, before it is killed."""


class WatcherError(RuntimeError):
    """The watcher process could not start: foreign writes would go unseen, so the mount must not serve."""


class OwnChanges:
    """Paths the mount itself just changed (thread-safe): the watcher must not treat the echo of
    its own writes as foreign changes, which would drop the kernel's caches after every write.
    A foreign change inside the window is still caught by the core at the next access.

    `watched` tells whether the watcher watches a directory (`ManagedGlobs.reaches`, as
    `watch_process` decides): a change in a directory it does not watch has no echo, so it is
    not noted (most of an unpack or a build happens there)."""

    def __init__(self, watched: Callable[[str], bool]) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self._watched = watched

    def note(self, *rels: str) -> None:
        watched = [rel for rel in rels if self._watched(rel.rpartition("/")[0])]
        if not watched:
            return
        until = time.monotonic() + OWN_WINDOW
        with self._lock:
            if len(self._until) > 100_000:
                now = time.monotonic()
                self._until = {k: v for k, v in self._until.items() if v > now}
            for rel in watched:
                self._until[rel] = until

    def recent(self, rel: str) -> bool:
        with self._lock:
            until = self._until.get(rel)
        return until is not None and until > time.monotonic()


def _settle(core: VolumeCore, inodes: InodeTable, rel: str, gone: bool) -> None:
    """Record a foreign change of `rel` (if managed) and drop the kernel's cached view of it: its
    data and attributes, and its directory entry only when the name disappeared (dropping live
    entries would make the kernel forget inodes that programs are comparing)."""
    try:
        target = core.paths.of_rel(rel)  # a managed name that is not UTF-8 is refused here
        if target.managed and not os.path.isdir(target.abs):
            core.version(target)
    except (CoherenceError, OSError) as e:  # a name the volume cannot record (`status` lists it), a busy registry
        log.warning("could not sync %s after a foreign change: %s", rel, e)
    except Exception:  # never let a bug stop the watcher (it would take the mount down): log it as one
        log.exception("internal error in the watcher's sync of %s", rel)
    inode = inodes.inode_if_known(rel)
    if inode is not None:
        try:
            pyfuse3.invalidate_inode(inode)
        except OSError:
            pass
    parent, _, name = rel.rpartition("/")
    parent_inode = inodes.inode_if_known(parent)
    if gone and parent_inode is not None:
        try:
            pyfuse3.invalidate_entry(parent_inode, os.fsencode(name))
        except OSError:
            pass


def parse(buffer: bytearray) -> list[tuple[bytes, str]]:
    """Take the complete records (kind byte, path, NUL) off the front of `buffer`: (kind, path)."""
    end = buffer.rfind(b"\0") + 1
    records = bytes(buffer[:end]).split(b"\0")[:-1]
    del buffer[:end]
    return [(r[:1], os.fsdecode(r[1:])) for r in records]


async def watch(
    core: VolumeCore,
    inodes: InodeTable,
    own: OwnChanges,
    mountpoint: str,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled: keep a watcher process running and settle each changed path that is not
    the echo of the mount's own writes. Reports started once the first watcher watches; one that
    cannot start at all is a WatcherError. A watcher that dies later is restarted (the mount keeps
    serving): the core catches changes of managed files made in the gap at their next access, and
    once the new watcher watches, the kernel's caches of every inode it holds are dropped."""
    started = False
    delay = RESTART_DELAY
    while True:
        code, watched = await _watch_once(
            core, inodes, own, mountpoint, resync=started, on_ready=None if started else task_status.started
        )
        if not started and not watched:
            raise WatcherError(
                f"the watcher process exited ({code}) before it watched {core.paths.root}: "
                f"foreign writes would go unseen (see the daemon's log)"
            )
        started = True
        delay = RESTART_DELAY if watched else min(delay * 2, MAX_RESTART_DELAY)
        log.warning("the watcher process exited (%s); restarting it in %.1f s", code, delay)
        await trio.sleep(delay)


async def _watch_once(
    core: VolumeCore,
    inodes: InodeTable,
    own: OwnChanges,
    mountpoint: str,
    *,
    resync: bool,
    on_ready: Callable[[], None] | None,
) -> tuple[int, bool]:
    """Run one watcher process until it exits: (exit status, whether it got to watch). It is
    stopped at cancellation."""
    # isolated (-I) and started in /: `-m` would otherwise import modules from the working
    # directory first, and the daemon runs as root while agents write into the volume
    argv = [sys.executable, "-I", "-m", "fusefs.watch_process", core.paths.root, mountpoint, *core.paths.globs.patterns]
    process = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
    assert process.stdin is not None and process.stdout is not None
    watched = False
    try:
        buffer = bytearray()
        while chunk := await process.stdout.receive_some(65536):
            buffer += chunk
            changes = []
            for kind, rel in parse(buffer):
                if kind == b"R":
                    watched = True
                    if resync:
                        await trio.to_thread.run_sync(_drop_cached, inodes)
                    if on_ready is not None:
                        on_ready()
                elif not own.recent(rel):
                    changes.append((rel, kind == b"G"))
            if changes:
                await trio.to_thread.run_sync(_settle_all, core, inodes, changes)
        return await process.wait(), watched
    finally:
        with trio.CancelScope(shield=True):
            await process.stdin.aclose()
            with trio.move_on_after(STOP_TIMEOUT):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()


def _drop_cached(inodes: InodeTable) -> None:
    """Drop the kernel's cached attributes and data of every inode it holds (changes went unseen)."""
    for inode in inodes.cached():
        try:
            pyfuse3.invalidate_inode(inode)
        except OSError:
            pass


def _settle_all(core: VolumeCore, inodes: InodeTable, changes: list[tuple[str, bool]]) -> None:
    for rel, gone in changes:
        _settle(core, inodes, rel, gone)
