"""Direct dirs (`coherent-volume mount --direct DIR`): subtrees of a volume that no managed glob can
reach, served by the kernel through a bind mount over the FUSE mount instead of by the daemon.

Invariants:
- a direct dir holds no path a managed glob could match (`ManagedGlobs.reaches`), is not the
  registry, has no symlink on its way, and lies in no other direct dir: what the daemon no longer
  sees holds nothing the protocol guards;
- each bind is a clone of the backing directory, made private (never a peer of the backing's own
  mount) and nosuid, nodev (as the FUSE mount) before it is attached; attached under the FUSE
  mount, it propagates where the FUSE mount propagates, and so does its unmount;
- the binds go before the FUSE mount: a bind is found by a path walk through the FUSE mount,
  which needs the daemon serving. If the daemon died, a lazy unmount of the FUSE mount
  (`coherent-volume unmount`, or `mount` again) takes the binds along.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat as stat_mod
from collections.abc import Sequence

from coherent_volume.errors import CoherenceError
from coherent_volume.globs import ManagedGlobs
from coherent_volume.mounts import direct_dirs
from coherent_volume.paths import is_registry_path

from .backing import Backing


class DirectError(CoherenceError):
    """A --direct DIR refused, or a bind that cannot be made or removed; the message says why and
    what to do."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442  # one number on every architecture
_OPEN_TREE_CLONE = 1
_AT_EMPTY_PATH = 0x1000
_MOVE_MOUNT_F_EMPTY_PATH, _MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
_MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x2, 0x4
_MS_PRIVATE = 1 << 18
_MNT_DETACH, _UMOUNT_NOFOLLOW = 2, 8


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _call(result: int, what: str, rel: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", rel)
    return result


# ---- which directories ------------------------------------------------------------------------


def _refused(given: str, why: str) -> DirectError:
    return DirectError(f"--direct {given}: {why}; nothing was mounted")


def _relative(given: str, globs: ManagedGlobs) -> str:
    """`given` as a root-relative path, if the protocol allows serving it directly."""
    if os.path.isabs(given):
        raise _refused(given, "give the directory relative to the volume root (e.g. node_modules)")
    rel = posixpath.normpath(given)
    if rel == ".":
        raise _refused(given, "that is the volume root, which holds the managed files")
    if rel == ".." or rel.startswith("../"):
        raise _refused(given, "it leaves the volume root")
    if is_registry_path(rel):
        raise _refused(given, "it is the volume's registry, which only the volume may change")
    reaching = [p for p in globs.patterns if ManagedGlobs.of(p).matches(rel) or ManagedGlobs.of(p).reaches(rel)]
    if reaching:
        raise _refused(
            given,
            f"managed glob {reaching[0]!r} can match paths there, and the daemon must see every write to "
            "them; choose a directory no managed glob reaches",
        )
    return rel


def check(root: str, globs: ManagedGlobs, dirs: Sequence[str]) -> tuple[str, ...]:
    """The direct dirs as root-relative paths, each allowed (DirectError otherwise; nothing changes).
    A directory that does not exist yet is allowed: `make` creates it."""
    rels: list[str] = []
    for given in dirs:
        rel = _relative(given, globs)
        for other in rels:
            if rel == other or rel.startswith(other + "/") or other.startswith(rel + "/"):
                raise _refused(given, f"it overlaps --direct {other}: give each tree once")
        rels.append(rel)
    backing = Backing(root)
    try:
        for rel in rels:
            parts = rel.split("/")
            for depth in range(1, len(parts) + 1):
                prefix = "/".join(parts[:depth])
                try:
                    st = backing.lstat(prefix)
                except FileNotFoundError:
                    break
                if stat_mod.S_ISLNK(st.st_mode):
                    raise _refused(rel, f"{prefix} is a symlink in the volume root: give the directory itself")
                if not stat_mod.S_ISDIR(st.st_mode):
                    raise _refused(rel, f"{prefix} is not a directory")
    finally:
        backing.close()
    return tuple(rels)


def make(root: str, rels: Sequence[str]) -> None:
    """Create what is missing of each direct dir in the backing directory, each level owned as its
    parent, with its parent's permissions."""
    backing = Backing(root)
    try:
        for rel in rels:
            parts = rel.split("/")
            for depth in range(1, len(parts) + 1):
                prefix = "/".join(parts[:depth])
                try:
                    backing.lstat(prefix)
                    continue
                except FileNotFoundError:
                    pass
                parent = backing.lstat("/".join(parts[: depth - 1]))
                mode = stat_mod.S_IMODE(parent.st_mode) & (0o777 | stat_mod.S_ISGID)
                backing.mkdir(prefix, mode)
                backing.chown(prefix, parent.st_uid, parent.st_gid)
                backing.chmod(prefix, mode)
    finally:
        backing.close()


# ---- binding and unbinding --------------------------------------------------------------------


def _bind_one(root: Backing, view: Backing, rel: str) -> None:
    source = root.opendir(rel)
    try:
        flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH
        tree = _call(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(source), b"", ctypes.c_uint(flags)), "open_tree", rel)
    finally:
        os.close(source)
    try:
        attr = _MountAttr(_MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV, 0, _MS_PRIVATE, 0)
        size = ctypes.c_size_t(ctypes.sizeof(attr))
        at = (ctypes.c_int(tree), b"", ctypes.c_uint(_AT_EMPTY_PATH))
        _call(_libc.syscall(_SYS_MOUNT_SETATTR, *at, ctypes.byref(attr), size), "mount_setattr", rel)
        target = view.opendir(rel)
        try:
            both = ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH)
            moved = _libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(target), b"", both)
            _call(moved, "move_mount", rel)
        finally:
            os.close(target)
    finally:
        os.close(tree)


def bind(root: str, mountpoint: str, rels: Sequence[str]) -> None:
    """Bind each ROOT/rel over MOUNTPOINT/rel (the volume mounted and served there), all or none.
    Runs outside the daemon's event loop: each target is looked up through the FUSE mount."""
    source, view = Backing(root), Backing(mountpoint)
    made: list[str] = []
    try:
        for rel in rels:
            try:
                _bind_one(source, view, rel)
            except OSError as e:
                raise DirectError(f"could not serve {rel} directly ({e.strerror}); nothing was mounted") from None
            made.append(rel)
    except BaseException:
        mounted = direct_dirs(mountpoint)
        for rel in reversed(made):
            if rel in mounted:
                _unmount(mountpoint, rel, mounted[rel], lazy=True)
        raise
    finally:
        source.close()
        view.close()


def _mount_id(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.EINVAL, "no mnt_id in fdinfo")


def _unmount(mountpoint: str, rel: str, mount_id: int, lazy: bool) -> None:
    """Unmount the mount `mount_id` at MOUNTPOINT/rel, reached without following a symlink (an agent
    may have renamed a directory on its way); OSError (EBUSY: in use) otherwise. It is named
    through a descriptor of its parent directory, which pins that directory but not the mount."""
    head, _, name = rel.rpartition("/")
    view = Backing(mountpoint)
    try:
        parent = view.opendir(head)
    finally:
        view.close()
    try:
        entry = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            seen = _mount_id(entry)
        finally:
            os.close(entry)
        if seen != mount_id:  # a mountpoint cannot be renamed or removed: the name now stays this mount
            raise OSError(errno.ESTALE, f"{rel} is no longer the mount it was", rel)
        path = f"/proc/self/fd/{parent}/{name}".encode()
        if _libc.umount2(path, (_MNT_DETACH if lazy else 0) | _UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), rel)
    finally:
        os.close(parent)


def is_bind_of(root: str, mountpoint: str, rel: str) -> bool:
    """Whether MOUNTPOINT/rel shows the directory ROOT/rel itself (a direct dir, not another mount)."""
    backing, view = Backing(root), Backing(mountpoint)
    try:
        seen, behind = view.lstat(rel), backing.lstat(rel)
    except OSError:
        return False
    finally:
        backing.close()
        view.close()
    return (seen.st_dev, seen.st_ino) == (behind.st_dev, behind.st_ino)


def unbind(root: str, mountpoint: str, lazy: bool) -> list[str]:
    """Unmount every direct dir of the volume at `mountpoint`; returns those unmounted. Lazily, a
    dir in use is detached (its users keep it); otherwise one in use is DirectError, and the ones
    already unmounted are bound again, so that a refusal changes nothing."""
    done: list[str] = []
    for rel, mount_id in sorted(direct_dirs(mountpoint).items(), reverse=True):
        if not is_bind_of(root, mountpoint, rel):
            continue  # not ours: it stays, and keeps the volume busy
        try:
            _unmount(mountpoint, rel, mount_id, lazy)
        except OSError as e:
            bind(root, mountpoint, done)
            if e.errno == errno.EBUSY:
                raise DirectError(
                    f"{os.path.join(mountpoint, rel)} is busy (files are open there, or a process has its "
                    "working directory in it, maybe in another mount namespace): close them and try again"
                ) from None
            raise DirectError(f"could not unmount {os.path.join(mountpoint, rel)}: {e.strerror}") from None
        done.append(rel)
    return done
