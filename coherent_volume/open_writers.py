"""Whether any process on this kernel has a file open for writing.

A read lease (fcntl `F_SETLEASE`, `F_RDLCK`) is refused with EAGAIN while the file is open for
writing anywhere: by a program, by a mount daemon's descriptor for a program (another mount of the
root too), by a shared writable mapping (whose file stays open until it is unmapped). Taken and
dropped at once, it asks the kernel exactly that and changes nothing. While it is held, a lease
break would signal this process: its signal is set to SIGURG first, which is ignored unless
handled, never the default SIGIO, which would end it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal


def open_for_writing(path: str) -> bool | None:
    """True if some process has the regular file at `path` open for writing, False if none has;
    None if the kernel cannot say (no file there, a file system without leases, or this process may
    not take one: neither the file's owner nor holding CAP_LEASE)."""
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
