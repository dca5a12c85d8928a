"""The watcher process: watchdog's inotify observer over a volume root, in a process of its own.

Every write through the mount echoes back as an inotify event. Handled inside the mount daemon,
each echo woke three watchdog threads that competed with the FUSE loop for the interpreter lock
(measured: an unmanaged open+write+close took ~1.6x as long). Here the events cost the daemon
nothing: they are deduplicated and sent in batches.

Run by the daemon as `python -I -m fusefs.watch_process ROOT MOUNTPOINT` (the mountpoint only names
the process). Writes to stdout one record per changed path: `C` (changed) or `G` (its name
disappeared), the path relative to ROOT, NUL; and `R` NUL once the watches are in place. Exits
when its stdin reaches end of file, which happens however the daemon ends (even kill -9), so it
never outlives the mount.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from coherent_volume.paths import is_registry_path

BATCH_DELAY = 0.01
"""Seconds to gather events before sending them: a burst of writes costs one record per path."""

CHANGES = [
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileClosedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
"""The inotify events that signal a change: a write is seen when its writer closes the file
(every write(2) and open(2) would otherwise wake this process too)."""

_TEMP = re.compile(r"\.cv-\d+-[0-9a-f]{8}\.tmp$")
"""The core's own staging names: never a change of their own."""


class Batcher(FileSystemEventHandler):
    """Collects (relative path -> gone) from watchdog's thread; `drain` hands them over."""

    def __init__(self, root: str) -> None:
        self._root = root
        self._pending: dict[bytes, bool] = {}
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def on_any_event(self, event: FileSystemEvent) -> None:
        gone = event.event_type in ("deleted", "moved")
        for raw, vanished in ((event.src_path, gone), (getattr(event, "dest_path", ""), False)):
            if not raw:
                continue
            rel = os.path.relpath(os.fsdecode(raw), self._root).replace(os.sep, "/")
            if rel == "." or rel.startswith("../") or is_registry_path(rel) or _TEMP.search(rel):
                continue
            key = os.fsencode(rel)
            with self._lock:
                self._pending[key] = self._pending.get(key, False) or vanished
            self.ready.set()

    def drain(self) -> dict[bytes, bool]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self.ready.clear()
        return pending


def encode(changes: dict[bytes, bool]) -> bytes:
    return b"".join((b"G" if gone else b"C") + rel + b"\0" for rel, gone in changes.items())


def _exit_on_eof() -> None:
    sys.stdin.buffer.read()
    os._exit(0)


def _send(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(1, data) :]
    except BrokenPipeError:  # the daemon is gone
        os._exit(0)


def main(root: str) -> None:
    batcher = Batcher(root)
    observer = Observer()
    observer.schedule(batcher, root, recursive=True, event_filter=CHANGES)
    observer.start()
    threading.Thread(target=_exit_on_eof, daemon=True).start()
    _send(b"R\0")
    while True:
        batcher.ready.wait()
        time.sleep(BATCH_DELAY)
        _send(encode(batcher.drain()))


if __name__ == "__main__":
    main(sys.argv[1])
