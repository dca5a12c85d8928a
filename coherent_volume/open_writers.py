"""Whether any process on this kernel has a file open for writing.

A read lease (fcntl `F_SETLEASE`, `F_RDLCK`) is refused with EAGAIN while the file is open for
writing anywhere: by a program, by a mount daemon's descriptor for a program (another mount of the
root too), by a shared writable mapping (whose file stays open until it is unmapped). Taken and
dropped at once, it asks the kernel exactly that. In that instant another program's open of the
file for writing waits for it to be dropped (a non-blocking one fails EAGAIN, as it would meeting
any lease). While it is held, a lease break would signal this process: its signal is set to
SIGURG first, which is ignored unless handled, never the default SIGIO, which would end it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import time

RELEASE_WAIT = 0.5
"""Seconds `open_for_writing` waits for a writer to close: a program's close(2) through a mount
returns before the daemon's own descriptor for it is closed (FUSE sends the release after it)."""


def open_for_writing(path: str, deadline: float) -> bool | None:
    """True if some process has the regular file at `path` open for writing and keeps it open until
    `deadline` (time.monotonic(); a caller asking of several files gives all one deadline, RELEASE_WAIT
    seconds ahead), False if none has (or once it closed); None if the kernel cannot say (no
    file there, a file system without leases, a lease held by another program, or this process may
    not take one: neither the file's owner nor holding CAP_LEASE)."""
    while (found := _open_for_writing(path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def _open_for_writing(path: str) -> bool | None:
    """`open_for_writing` at this instant."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETSIG, signal.SIGURG)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as e:
            return True if e.errno == errno.EAGAIN else None
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)
