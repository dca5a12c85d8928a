"""Foreign writes into the backing root while mounted: record them and drop stale kernel caches.

watchdog (inotify) calls from its own thread; events cross into trio through a memory channel.
Kernel invalidation runs in a worker thread: calling it from inside a handler can deadlock.
"""
from __future__ import annotations

import logging
import os
import re
import threading
import time

import pyfuse3
import trio
from watchdog.events import (DirCreatedEvent, DirDeletedEvent, DirMovedEvent, FileClosedEvent, FileCreatedEvent,
                             FileDeletedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler)
from watchdog.observers import Observer

from coherent_volume.core import VolumeCore
from coherent_volume.paths import is_registry_path

from .inodes import InodeTable

log = logging.getLogger("coherent_volume.fuse")

OWN_WINDOW = 2.0
"""Seconds after the mount itself changed a path during which inotify events on it are its own echo."""

_TEMP = re.compile(r"\.cv-\d+-[0-9a-f]{8}\.tmp$")


CHANGES = [FileCreatedEvent, FileDeletedEvent, FileMovedEvent, FileClosedEvent,
           DirCreatedEvent, DirDeletedEvent, DirMovedEvent]
"""The inotify events that signal a change: a write is seen when its writer closes the file
(every write(2) and open(2) would otherwise wake this thread and contend for the GIL)."""


class OwnChanges:
    """Paths the mount itself just changed (thread-safe): the watcher must not treat the echo of
    its own writes as foreign changes, which would drop the kernel's caches after every write.
    A foreign change inside the window is still caught by the core at the next access."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def note(self, *rels: str) -> None:
        until = time.monotonic() + OWN_WINDOW
        with self._lock:
            if len(self._until) > 100_000:
                now = time.monotonic()
                self._until = {k: v for k, v in self._until.items() if v > now}
            for rel in rels:
                self._until[rel] = until

    def recent(self, rel: str) -> bool:
        with self._lock:
            until = self._until.get(rel)
        return until is not None and until > time.monotonic()


class _Forwarder(FileSystemEventHandler):
    """Forwards (path, gone) for every change under the root; `gone` when a name disappeared."""

    def __init__(self, root: str, send: trio.MemorySendChannel[tuple[str, bool]], token: trio.lowlevel.TrioToken,
                 own: OwnChanges) -> None:
        self._root = root
        self._own = own
        self._send = send
        self._token = token

    def on_any_event(self, event: FileSystemEvent) -> None:
        gone = event.event_type in ("deleted", "moved")
        for raw, vanished in ((event.src_path, gone), (getattr(event, "dest_path", ""), False)):
            path = os.fsdecode(raw)
            if not path or event.event_type in ("opened", "closed_no_write"):
                continue
            rel = os.path.relpath(path, self._root).replace(os.sep, "/")
            if rel == "." or rel.startswith("../") or is_registry_path(rel) or _TEMP.search(rel) or self._own.recent(rel):
                continue
            try:
                trio.from_thread.run_sync(self._send.send_nowait, (rel, vanished), trio_token=self._token)
            except (trio.WouldBlock, trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # a full queue drops an event: the next access syncs that file anyway


def _settle(core: VolumeCore, inodes: InodeTable, rel: str, gone: bool) -> None:
    """Record a foreign change of `rel` (if managed) and drop the kernel's cached view of it: its
    data and attributes, and its directory entry only when the name disappeared (dropping live
    entries would make the kernel forget inodes that programs are comparing)."""
    target = core.paths.of_rel(rel)
    if target.managed and not os.path.isdir(target.abs):
        try:
            core.version(target)
        except Exception as e:  # never let a bad path stop the watcher
            log.warning("could not sync %s after a foreign change: %s", rel, e)
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


async def watch(core: VolumeCore, inodes: InodeTable, own: OwnChanges,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run until cancelled: forward filesystem events under the root and settle each changed path."""
    send, receive = trio.open_memory_channel[tuple[str, bool]](10_000)
    observer = Observer()
    observer.schedule(_Forwarder(core.paths.root, send, trio.lowlevel.current_trio_token(), own), core.paths.root,
                      recursive=True, event_filter=CHANGES)
    observer.start()
    task_status.started()
    try:
        async with receive:
            async for change in receive:
                pending = {change}
                while True:
                    try:
                        pending.add(receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                for rel, gone in sorted(pending):
                    await trio.to_thread.run_sync(_settle, core, inodes, rel, gone)
    finally:
        observer.stop()
        await trio.to_thread.run_sync(observer.join)
