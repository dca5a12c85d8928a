"""The kernel's table of mounted volumes, read from /proc (no FUSE import: hooks and the CLI use it)."""

from __future__ import annotations

import errno
import os
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import NamedTuple

FSTYPE = "fuse.coherent"
"""The file system type of a mounted volume (`subtype=coherent`)."""


def unescape(field: str) -> str:
    """Undo /proc's octal escapes (space, tab, newline, backslash) in a mount path."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mounts(fstype: str | None = FSTYPE) -> dict[str, str]:
    """Mountpoint -> source of every mount of type `fstype` (every FUSE mount when None) in this
    process's mount namespace; for our volumes the source is the volume root."""
    out: dict[str, str] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            source, mountpoint, kind = line.split()[:3]
            if kind == fstype or (fstype is None and kind.startswith("fuse")):
                out[unescape(mountpoint)] = unescape(source)
    return out


def daemon_gone(mountpoint: str) -> bool:
    """Whether the FUSE mount at `mountpoint` is dead, its daemon gone (statvfs always reaches the
    daemon; stat may be answered from the kernel's cache)."""
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    return False


class Mounted(NamedTuple):
    """A mount of a volume that a path lies in (`mount_holding`)."""

    mountpoint: str
    root: str
    """The volume's root (the mount's source)."""
    within: str
    """The directory of the volume shown at `mountpoint`, relative to its root: "" for the root
    itself, "plans" where `mountpoint` is a bind mount of the mount's plans directory."""

    def rel(self, below: str) -> str:
        """The volume path of `below`, a path relative to `mountpoint`."""
        return os.path.join(self.within, below) if self.within else below


class Entry(NamedTuple):
    """One line of /proc/self/mountinfo."""

    id: str
    parent: str
    device: str
    """Its "major:minor"."""
    within: str
    """The directory (or file) of its file system the mount shows, "" for its root."""
    mountpoint: str
    fstype: str
    source: str
    options: str
    """Its file system's own options (overlay's `lowerdir=…,upperdir=…`)."""


_held = threading.local()
"""The mount table `one_table` holds for its thread, if any (`table`)."""


@contextmanager
def one_table() -> Iterator[None]:
    """Within the block, every question of this thread here is answered from one reading of
    /proc/self/mountinfo: a hook judges the paths of one event against one table (each question read
    it again: up to three readings per path, 0.13 s a path at 8,000 mounts)."""
    if getattr(_held, "table", None) is not None:
        yield
        return
    _held.table, _held.attached = _read_mountinfo(), None
    try:
        yield
    finally:
        _held.table = _held.attached = None


def table() -> list[Entry]:
    """The mounts of this process's mount namespace, in mountinfo's order (which alone does not tell
    which is in use: `_in_use`): the table `one_table` holds, else read now (OSError where /proc
    cannot be read)."""
    held: list[Entry] | None = getattr(_held, "table", None)
    return held if held is not None else _read_mountinfo()


def _read_mountinfo() -> list[Entry]:
    """The mounts of this process's mount namespace, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        return parse(f)


def parse(lines: Iterable[str]) -> list[Entry]:
    """The mounts of mountinfo's `lines`, in their order (a line without its separator is skipped)."""
    entries = []
    for line in lines:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        after = fields.index("-", 6)
        within = unescape(fields[3]).removesuffix("//deleted").strip("/")  # a bound file replaced since
        mountpoint, fstype, source = unescape(fields[4]), fields[after + 1], unescape(fields[after + 2])
        options = unescape(fields[after + 3]) if len(fields) > after + 3 else ""
        entries.append(Entry(fields[0], fields[1], fields[2], within, mountpoint, fstype, source, options))
    return entries


def _attached(entries: list[Entry]) -> dict[tuple[str, str], Entry]:
    """Each mount of `entries` by (its parent's id, "" where its parent is not listed; its
    mountpoint); of two at one place of one parent, as older kernels shadow, the last listed. Made
    once for the table `one_table` holds."""
    if entries is getattr(_held, "table", None) and getattr(_held, "attached", None) is not None:
        held: dict[tuple[str, str], Entry] = _held.attached
        return held
    ids = {entry.id for entry in entries}
    attached = {(entry.parent if entry.parent in ids else "", entry.mountpoint): entry for entry in entries}
    if entries is getattr(_held, "table", None):
        _held.attached = attached
    return attached


def _in_use(real: str, entries: list[Entry]) -> Entry | None:
    """The mount of `entries` (this namespace's) that the real path `real` is, or lies in, as the
    kernel resolves it: from the root down, at each directory of `real` the mount attached there on
    the mount reached so far (mountinfo's second field, its parent's id), then the one stacked on it
    at the same mountpoint, and so on up the stack. The list's order does not tell: a `mount --move`
    onto a mountpoint in use puts the moved mount on top yet lists it before the one it covers, and a
    mount on a directory above another's mountpoint hides that one whichever came last. A mount
    whose parent is not listed (the root's, or one above a chroot) is attached on a mount this
    process cannot see: taken where no listed mount reached so far has one there. None where no
    mount is reached (no listed root)."""
    attached = _attached(entries)
    current: Entry | None = None
    places = ["/"]
    for name in real.strip("/").split("/"):
        if name:
            places.append(os.path.join(places[-1], name))
    for place in places:
        below = attached.get((current.id if current is not None else "", place))
        if below is None and current is None:
            continue
        while below is not None:  # up the stack at this mountpoint
            current, below = below, attached.get((below.id, place))
    return current


def mount_holding(real: str) -> Mounted | None:
    """The volume mount that the real path `real` is, or lies in, as the kernel resolves it: the
    deepest mount at or above it, of any kind, the one on top where several are stacked (`_in_use`). None where that
    one is no volume's, unless it is a direct dir of a volume's mount (a bind there of the volume's
    own directory of that name, `mount --direct`): a path in a bind mount of another directory inside
    a volume's mount is not that volume's. From /proc/self/mountinfo, whose fourth field says which
    directory of its file system a mount shows (/proc/self/mounts says only its source)."""
    entries = table()
    entry = _in_use(real, entries)
    if entry is None:
        return None
    place = entry.mountpoint
    by_id = {e.id: e for e in entries}
    if entry.fstype == FSTYPE:
        return Mounted(place, entry.source, entry.within)
    volume = by_id.get(entry.parent)
    if volume is None or volume.fstype != FSTYPE or not place.startswith(volume.mountpoint.rstrip("/") + "/"):
        return None
    name = os.path.relpath(place, volume.mountpoint)
    try:  # a direct dir's bind shows the volume's own directory of that name
        direct = os.path.samefile(place, os.path.join(volume.source, volume.within, name))
    except OSError:
        direct = False
    return Mounted(volume.mountpoint, volume.source, volume.within) if direct else None


def shown_higher(real: str, root: bool = False) -> list[str]:
    """`real` (a real path) reached through each other mount of its file system that shows the
    directory the mount holding it shows (checked by device and inode), where that mount (the one in
    use: `_in_use`) is a bind (`mount --bind VOL/plans /x`): walking up from `real` leaves the bind
    at its mountpoint, never reaching the directories above what it shows (a volume's root and
    registry), nor, where it shows its file system's root, the directory that file system is also
    mounted on (`mount -t tmpfs t VOL/plans; mount --bind VOL/plans /x`): these paths do. Where the
    bind shows a directory inside its file system (mountinfo's fourth field names one), through the
    mounts showing a directory above it, the highest first; where it shows the file system's root,
    through the other mounts of that root, the shallowest mountpoint first. Empty where no other mount
    in this namespace shows it (a container's bind from its host, whose file system is mounted
    nowhere here). `root`: only where the bind shows its file system's root (else only where it shows
    a directory inside it)."""
    entries = table()
    bind = _in_use(real, entries)
    if bind is None or root == bool(bind.within):
        return []
    place = bind.mountpoint
    above = {
        entry.mountpoint: entry
        for entry in entries
        if entry.device == bind.device
        and entry.mountpoint != place
        and (bind.within.startswith(entry.within + "/") if entry.within else True)
    }
    found: list[str] = []
    for entry in sorted(above.values(), key=lambda e: (len(e.within), e.mountpoint.count("/"), e.mountpoint)):
        shown = os.path.join(entry.mountpoint, bind.within[len(entry.within) :].lstrip("/"))
        try:
            if os.path.samestat(os.stat(shown), os.stat(place)):
                found.append(os.path.join(shown, os.path.relpath(real, place)) if real != place else shown)
        except OSError:
            continue
    return found


def shown_below(real: str) -> list[tuple[str, str | None]]:
    """Each mount below the directory `real` (a real path), with each directory it shows as this
    process names it: a FUSE mount's source where that is a directory's path (a volume's mount,
    bindfs), an overlay's upper and lower directories, else the directory of its file system at its
    place below a mount of that file system's root; None where this mount namespace mounts no root
    of it (a container's bind from its host)."""
    entries = table()
    tops = {entry.device: entry.mountpoint for entry in entries if not entry.within}
    found: list[tuple[str, str | None]] = []
    for entry in entries:
        if not entry.mountpoint.startswith(real.rstrip("/") + "/"):
            continue
        if entry.fstype.startswith("fuse") and entry.source.startswith("/"):
            shows: list[str | None] = [os.path.join(entry.source, entry.within)]
        elif entry.fstype == "overlay":
            layers = dict(o.partition("=")[::2] for o in entry.options.split(","))
            shows = [d for key in ("upperdir", "lowerdir") for d in layers.get(key, "").split(":") if d]
        else:
            top = tops.get(entry.device)
            shows = [None if top is None else os.path.join(top, entry.within)]
        found += [(entry.mountpoint, shown and shown.rstrip("/")) for shown in shows]
    return found


def device_of(mountpoint: str) -> str | None:
    """The "major:minor" of the newest mount at `mountpoint`, read from /proc/self/mountinfo (never
    from the mount itself, which cannot answer before its daemon serves)."""
    found = None
    for entry in table():
        if entry.mountpoint == mountpoint:
            found = entry.device
    return found


def direct_dirs(mountpoint: str) -> dict[str, int]:
    """Root-relative path -> mount id of each mount attached directly on the volume mounted at
    `mountpoint` (its direct dirs, `mount --direct`; deeper mounts are not listed), from
    /proc/self/mountinfo: the kernel's table is their only record, so a killed daemon leaves none stale."""
    volume: str | None = None
    children = table()
    for entry in children:
        if entry.mountpoint == mountpoint and entry.fstype == FSTYPE:
            volume = entry.id  # the newest mount there is the one in use
    if volume is None:
        return {}
    return {
        os.path.relpath(entry.mountpoint, mountpoint): int(entry.id)
        for entry in children
        if entry.parent == volume and entry.mountpoint.startswith(mountpoint.rstrip("/") + "/")
    }


def direct_dir_in(rel: str, dirs: Iterable[str]) -> str | None:
    """The first of the direct dirs `dirs` at or below the root-relative directory `rel`, if any: then
    `rel` cannot be renamed, replaced by a rename or removed (EBUSY). The kernel refuses it for a
    direct dir, a mountpoint; the mount refuses it for a directory holding one, whose bind would
    move along, served past the daemon wherever it lands, a managed glob's reach included."""
    return next((d for d in dirs if d == rel or d.startswith(rel + "/")), None)


def mounts_of(root: str) -> dict[str, tuple[str, ...]]:
    """Mountpoint -> direct dirs of every mount of the volume at `root` (a real path) in this
    process's mount namespace."""
    return {
        mountpoint: tuple(sorted(direct_dirs(mountpoint)))
        for mountpoint, source in fuse_mounts().items()
        if os.path.realpath(source) == root
    }
