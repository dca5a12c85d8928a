"""Why an SQLite registry cannot be used when the cause lies outside it: what the operating system
refuses this process (descriptors, permission, a read-only file system, an immutable file or
directory, space), said with the path and what to do, so that no such failure is ever reported as
a damaged registry, whose remedy (moving it aside) would throw away every version.

Nothing here opens or closes the registry's files (the database, its `-wal` and `-shm`): closing
any descriptor of a file drops every POSIX lock this process holds on it, those of its SQLite
connections included. What may be done to them is asked with stat(2) and access(2) only.
"""

from __future__ import annotations

import errno
import os
import resource
import shlex
import stat

from ..errors import RegistryError

DESCRIPTORS_NEEDED = 4
"""Descriptors that opening an SQLite registry may need at once besides those it holds already:
the database, its `-wal` and `-shm`, and the commit lock."""

WRITTEN_TO_READ = (
    "every process that uses a volume writes its registry, even only to read: a read records what its agent has seen"
)


def refusal(path: str) -> OSError | None:
    """What the operating system refuses this process, as things stand now, of what SQLite needs to
    use the registry at `path`: descriptors to spare, a file (not a directory) to read and write,
    its `-wal` and `-shm` to read and write, or its directory to create them in when they are
    missing. None if it refuses none of these."""
    directory = os.path.dirname(path)
    try:
        counted = _descriptors()
        if counted is not None and counted[1] - counted[0] < DESCRIPTORS_NEEDED:
            return OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        if stat.S_ISDIR(os.stat(path).st_mode):
            return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    except OSError as e:
        return e
    needed = [(path, os.R_OK | os.W_OK)]
    for side in (f"{path}-wal", f"{path}-shm"):
        needed.append((side, os.R_OK | os.W_OK) if os.path.lexists(side) else (directory, os.W_OK | os.X_OK))
    for where, mode in needed:
        if not os.access(where, mode, effective_ids=True):
            denied = _denied(where, mode)
            if denied is not None:
                return denied
    return None


def _denied(path: str, mode: int) -> OSError | None:
    """Why access(2) refuses `mode` on `path`: a read-only file system (EROFS), permission bits that
    do not grant it (EACCES), or something else while they do (EPERM: an immutable or append-only
    flag, an ACL, a security module). None if `path` is gone meanwhile."""
    try:
        st = os.stat(path)
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as e:
        return e
    if mode & os.W_OK and read_only:
        code = errno.EROFS
    elif _bits_grant(st, mode):
        code = errno.EPERM
    else:
        code = errno.EACCES
    return OSError(code, os.strerror(code), path)


def _bits_grant(st: os.stat_result, mode: int) -> bool:
    """Whether the permission bits of `st` grant this process's effective ids `mode` (access(2)
    bits): any to root that may override them (CAP_DAC_OVERRIDE; a container may drop it)."""
    uid = os.geteuid()
    if uid == 0 and _overrides_permissions() and _mapped(st):
        return True
    if st.st_uid == uid:
        shift = 6
    elif st.st_gid == os.getegid() or st.st_gid in os.getgroups():
        shift = 3
    else:
        shift = 0
    return (st.st_mode >> shift) & mode == mode


_CAP_DAC_OVERRIDE = 1


def _overrides_permissions() -> bool:
    """Whether this process has CAP_DAC_OVERRIDE in its effective set (True where /proc does not say)."""
    try:
        with open("/proc/self/status") as f:
            effective = next(line for line in f if line.startswith("CapEff:"))
    except (OSError, StopIteration):
        return True
    return bool(int(effective.split()[1], 16) >> _CAP_DAC_OVERRIDE & 1)


def _mapped(st: os.stat_result) -> bool:
    """Whether the owner and group of `st` are mapped into this process's user namespace, where
    only a capability applies to a file (unmapped ones show as the overflow ids: a rootless
    container's root over files of users outside it)."""
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split() == ["0", "0", "4294967295"]:  # the initial namespace: every id is mapped
                return True
        with open("/proc/sys/kernel/overflowuid") as u, open("/proc/sys/kernel/overflowgid") as g:
            overflow = int(u.read()), int(g.read())
    except (OSError, ValueError):
        return True
    return st.st_uid != overflow[0] and st.st_gid != overflow[1]


def _descriptors() -> tuple[int, int] | None:
    """(descriptors this process has open, the most it may have), None if it has no limit or /proc
    does not tell; OSError(EMFILE or ENFILE) if there is none left to look."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        return len(os.listdir("/proc/self/fd")), limit
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise
        return None


def _owner(*paths: str) -> str:
    """Who owns the first of `paths` this process may look at, and its mode."""
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        return f"{path!r} belongs to uid {st.st_uid}, gid {st.st_gid} (mode {stat.S_IMODE(st.st_mode):04o})"
    return f"this process may not look at {paths[-1]!r}"


def unusable(path: str, e: OSError) -> RegistryError:
    """The RegistryError for the operating system's refusal `e` of something that using the registry
    at `path` needs: what was refused, on which path, and what to do. Its errno is `e`'s, but EIO for
    EACCES: through the mount EACCES is a refused write (re-read, then retry), which this is not."""
    where = e.filename if isinstance(e.filename, str) else path
    directory = os.path.dirname(path)
    code = e.errno or errno.EIO
    if code == errno.EISDIR:
        return RegistryError(
            f"registry {path!r} cannot be used: {where!r} is a directory, not a registry file; it was left "
            "untouched. Nothing of a registry is in it: move it aside, then create the volume again",
            code,
        )
    if code == errno.EACCES:
        problem = (
            f"permission denied on {where!r}: {_owner(where, directory)}, and this process runs as "
            f"uid {os.geteuid()}, gid {os.getegid()}"
        )
        fix = (
            f"run it as the user the volume belongs to, or give this user read and write access to {directory!r} "
            f"and every file in it ({WRITTEN_TO_READ})"
        )
    elif code == errno.EPERM:
        if not os.path.lexists(where):  # a file to be made: what forbids it is on its directory
            where = os.path.dirname(where)
        problem = f"{where!r} may not be changed, although its permission bits allow it"
        fix = (
            f"an immutable or append-only flag (`lsattr -d {shlex.quote(where)}` shows i or a; `chattr -i -a` "
            f"lifts them), an ACL (`getfacl`) or a security module forbids it: lift that ({WRITTEN_TO_READ})"
        )
    elif code == errno.EROFS:
        problem = f"{where!r} is on a read-only file system"
        fix = f"use the volume where its root is mounted read-write ({WRITTEN_TO_READ})"
    elif code == errno.EMFILE:
        try:
            counted = _descriptors()
        except OSError:
            counted = None
        problem = "this process is out of file descriptors" + (
            f" ({counted[0]} open, its limit is {counted[1]})" if counted else ""
        )
        fix = "close files it no longer needs, or raise its limit (`ulimit -n`), then try again"
    elif code == errno.ENFILE:
        problem = "the system is out of open files (`/proc/sys/fs/file-nr`)"
        fix = "close files elsewhere, or raise `fs.file-max`, then try again"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        problem = f"no space left for {where!r} ({e.strerror})"
        fix = "free some space on its file system, then try again"
    elif code == errno.ENOENT:
        problem = f"{where!r} does not exist"
        fix = f"{directory!r} or the volume's root was removed or moved: open the volume where it is now"
    else:
        problem = f"{where!r}: {e.strerror or e}"
        fix = "put that right, then try again"
    return RegistryError(
        f"registry {path!r} cannot be used: {problem}. It was left untouched and is not known to be damaged "
        f"(do not move it aside: it holds every version). To fix: {fix}",
        errno.EIO if code == errno.EACCES else code,
    )
