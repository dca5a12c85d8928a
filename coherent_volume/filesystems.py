"""Which file system holds a path, and whether other hosts share it over a network.

A SQLite registry is correct only while every process that opens it runs on one kernel: WAL keeps
its index in shared memory and the commit lock is the kernel's `flock`. A network file system gives
each host its own cache and its own locks, and SQLite's writers then lose updates without any error
(measured on sshfs: 131 of 300 lost). So a volume whose registry directory is on a network file
system is refused at open, before anything is written, whatever its registry (a PostgreSQL
volume's root is one host's working copy). Sharing one kernel stays allowed: containers
bind-mounting one local directory see the file system type of that directory, not a network one.

The mount holding a path is read from /proc/self/mountinfo (this mount namespace's view): the mount
with the longest mount point above the path whose device is the path's (an overmount hides what
lies under it); when no device matches (btrfs subvolumes report their own), the last mounted of
the longest.
"""

from __future__ import annotations

import errno
import os

from . import atomic
from .errors import VolumeConfigError
from .mounts import Entry
from .mounts import table as mounts_table
from .paths import REGISTRY_DIR

__all__ = [
    "NETWORK_TYPES",
    "is_network",
    "mount_of",
    "lies_within",
    "refuse_network_root",
    "refuse_renaming_in_place",
]

NETWORK_TYPES = frozenset(
    {
        # kernel clients
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "9p",
        "afs",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        # FUSE clients (type "fuse.<subtype>")
        "fuse.sshfs",
        "fuse.glusterfs",
        "fuse.s3fs",
        "fuse.rclone",
        "fuse.juicefs",
        "fuse.gcsfuse",
        "fuse.ceph-fuse",
        "fuse.mfs",  # MooseFS
        "fuse.lizardfs",
        "fuse.seaweedfs",
        "fuse.weed",  # SeaweedFS's own name for it
        "fuse.blobfuse",
        "fuse.blobfuse2",
        "fuse.mountpoint-s3",
        "fuse.goofys",
        "fuse.geesefs",
        "fuse.ossfs",
        "fuse.davfs",
        "davfs",  # davfs2 (WebDAV)
        "fuse.cvmfs",
    }
)
"""File system types whose files other hosts (other kernels) write too."""


def _under(path: str, point: str) -> bool:
    return point == "/" or path == point or path.startswith(point + "/")


def _inside(rel: str, top: str) -> bool:
    """Whether `rel` is `top` or lies below it, both relative to their file system's root ("": it)."""
    return top == "" or rel == top or rel.startswith(top + "/")


def mount_of(path: str, mounts: list[Entry], device: str | None = None) -> Entry | None:
    """The mount that holds the absolute, symlink-free `path`, whose `st_dev` is `device`."""
    above = [m for m in mounts if _under(path, m.mountpoint)]
    if not above:
        return None
    same_device = [m for m in above if m.device == device]
    candidates = same_device or above
    longest = max(len(m.mountpoint) for m in candidates)
    return [m for m in candidates if len(m.mountpoint) == longest][-1]


def _mounts() -> list[Entry] | None:
    """The mount table (`mounts.table`: the one a hook's event holds), None where /proc cannot say."""
    try:
        return mounts_table()
    except OSError:
        return None


def _place(path: str, mounts: list[Entry]) -> tuple[str, str] | None:
    """Where `path` lies (device, path within its file system, relative to its root); for a mountpoint
    that cannot be looked at (a dead FUSE mount: ENOTCONN), the directory it is mounted on."""
    try:
        st = os.stat(path)
        found = mount_of(path, mounts, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    except OSError:
        found = mount_of(path, [m for m in mounts if m.mountpoint != path])
    if found is None:
        return None
    below = path[len(found.mountpoint) :] if found.mountpoint != "/" else path
    return found.device, os.path.join(found.within, below.strip("/")).strip("/")


def lies_within(path: str, directory: str) -> bool:
    """Whether the absolute, symlink-free `path` is `directory` or lies below it, by name or by
    its place: in the file system holding `directory` below it, or in one mounted below it, each
    of which a bind mount may show elsewhere too."""
    if _under(path, directory):
        return True
    mounts = _mounts()
    here = None if mounts is None else _place(path, mounts)
    top = None if mounts is None else _place(directory, mounts)
    if mounts is None or here is None or top is None:
        return False
    shown = [top] + [
        (m.device, m.within) for m in mounts if m.mountpoint != directory and _under(m.mountpoint, directory)
    ]
    return any(here[0] == device and _inside(here[1], within) for device, within in shown)


def is_network(fstype: str) -> bool:
    return fstype in NETWORK_TYPES


def refuse_network_root(root: str) -> None:
    """Raise VolumeConfigError when the registry directory of the volume at `root` (an absolute,
    symlink-free directory), or `root` itself before the registry exists, is on a network file
    system. Changes nothing; when /proc cannot say, the root is taken as local."""
    path = os.path.realpath(os.path.join(root, REGISTRY_DIR))
    if not os.path.isdir(path):
        path = root
    mounts = _mounts()
    try:
        st = os.stat(path)
    except OSError:
        return
    if mounts is None:
        return
    found = mount_of(path, mounts, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if found is None or not is_network(found.fstype):
        return
    raise VolumeConfigError(
        f"the volume at {root!r} is on a network file system ({found.fstype} {found.source!r} mounted at "
        f"{found.mountpoint!r}), which other hosts can write too: a SQLite registry there loses updates without "
        "any error, and no host sees the others' changes as they happen. Put the volume root on a local disk "
        "of each host (containers on one host may share a local directory through bind mounts); hosts share "
        "a volume through a PostgreSQL registry, each with a root of its own (docs/multihost.md)."
    )


def refuse_renaming_in_place(root: str) -> None:
    """Raise VolumeConfigError when the file system of the volume at `root` (its registry
    directory, or `root` itself before that exists) cannot rename without replacing (renameat2
    RENAME_NOREPLACE answers EINVAL: bindfs, some FUSE file systems): every install, deletion and
    checked rename needs it so as to destroy no file a program makes meanwhile, and each would
    fail after its commit. Probed with a file of a staged name made and removed there; a directory
    this process may not write to is not probed (it makes no commit there either)."""
    directory = os.path.join(root, REGISTRY_DIR)
    if not os.path.isdir(directory):
        directory = root
    probe = atomic.temp_name(os.path.join(directory, "probe"))
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError:
        return
    moved = atomic.temp_name(probe)
    try:
        atomic.rename(probe, moved, noreplace=True)
        probe = moved
    except OSError as e:
        if e.errno != errno.EINVAL:
            return  # (the commits' own errors say what else is wrong)
        raise VolumeConfigError(
            f"the file system holding the volume at {root!r} cannot rename a file without replacing what is "
            "at its new name (renameat2 RENAME_NOREPLACE: EINVAL), which every commit needs so that no file a "
            "program makes meanwhile is destroyed. Put the volume on a local file system that has it (ext4, xfs, "
            "btrfs, tmpfs, overlayfs)."
        ) from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
