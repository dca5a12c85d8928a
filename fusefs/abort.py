"""Ending the FUSE connection of a mount whose daemon died without letting it go.

A daemon killed with SIGKILL ends its connection when its last thread exits: the kernel then
answers every call on the mount ENOTCONN. A thread blocked in the kernel where no signal reaches
it outlives the kill, and with it the daemon's descriptor of /dev/fuse: the daemon's notification
that drops a cached name (`pyfuse3.invalidate_entry`) waits for its directory's lock, which a
lookup holds while it waits for the daemon's answer, which never comes. Every caller of the mount
then waits forever, and so does the notification. The watcher process, which outlives its daemon
for as long as that descriptor does, aborts the connection through the fuse control file system
(what `umount -f` does): the waiting calls fail ENOTCONN, the lock is let go, the stuck thread
finishes, and the mount is dead like that of any killed daemon.
"""

from __future__ import annotations

import os
import subprocess

CONNECTIONS = "/sys/fs/fuse/connections"
"""Where the fuse control file system lists live connections, by device number."""


def main_thread_gone(pid: int) -> bool:
    """Whether process `pid` has no main thread any more (gone, or a zombie leader whose other
    threads live on)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def abort(device: str) -> str:
    """Abort the FUSE connection of the mount whose device is `device` ("0:N"), mounting the control
    file system where it is not (root only); what was done, for the log."""
    major, minor = (int(n) for n in device.split(":"))
    connection = f"{CONNECTIONS}/{major << 20 | minor}"  # the kernel's own encoding of a device number
    if not os.path.isdir(connection) and not os.listdir(CONNECTIONS):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", CONNECTIONS], capture_output=True, check=False)
    try:
        with open(f"{connection}/abort", "w") as f:
            f.write("1")
    except FileNotFoundError:
        return f"its connection {device} had ended"
    except OSError as e:
        return f"could not abort its connection {device} ({e}): unmount it with `umount -f` as root"
    return f"aborted its connection {device}"
