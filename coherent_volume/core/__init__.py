"""VolumeCore: the protocol applied to one volume — files under the root plus the registry.

This is the I/O edge around `protocol` (pure rules) and `registry` (shared state). Every
face calls it with an explicit agent; the Python API serves one agent, a mount many.

Invariants:
- every registry change that a write decision depends on happens under `commit_lock()`;
- a commit is recorded as an Intent before its rename and completed after it, so a crash
  at any instant is either completed or abandoned by `_recover`, never left disagreeing;
- a view is registered only at the version whose content hash equals the bytes returned.
"""

from __future__ import annotations

import os
import stat

from ..errors import GlobError, NestedVolume, VolumeConfigError
from ..filesystems import lies_within, refuse_network_root, refuse_renaming_in_place
from ..fingerprint import kind_of
from ..globs import ManagedGlobs
from ..mounts import fuse_mounts, mount_holding, shown_below
from ..paths import REGISTRY_DIR
from ..registry import DB_FILE, LOCATION_FILE, recorded_in, volume_above
from ..registry.sqlite import SQLiteRegistry
from .base import Isolation, validate_agent
from .reads import Observed
from .renames import Renames
from .sessions import Sessions
from .writes import HandleCommit

# Layering: base <- reads <- writes <- history <- renames; writes <- sessions; renames, sessions <- VolumeCore.
# Each module has one job.

__all__ = ["HandleCommit", "Isolation", "Observed", "VolumeCore", "open_core", "validate_agent"]


class VolumeCore(Renames, Sessions):
    """The protocol over one root and its registry; thread-safe; one per process per volume."""


MOST_SCANNED = 100_000
"""Directories a new volume's tree is searched for a volume inside it, at most (`refuse_nesting`):
past that it is not made."""


def refuse_mounted(real: str, *, creating: bool) -> None:
    """Where the directory `real` (a real path) is a mount of a volume, or inside one: creating a
    volume there is refused (VolumeConfigError at the mountpoint, NestedVolume inside), and so is
    opening a directory inside it as a root, naming the volume's root (`open_core` opens a mount of
    a volume as its root)."""
    if (mounted := mount_holding(real)) is None:
        return
    mountpoint, root, within = mounted
    if real == mountpoint and within:
        if creating:
            raise NestedVolume(real, root, mounted_at=mountpoint)
        raise VolumeConfigError(
            f"{real} is a bind mount of {within}, a directory of the volume at {root} (through its mount), not a "
            f"volume's root: give {root} (nothing was changed)"
        )
    if real == mountpoint:
        raise VolumeConfigError(
            f"{real} is where the volume at {root} is mounted: it is a volume already (nothing was changed). "
            f"Give {root} to make or change it; {real} names it wherever a volume is opened (the API, `mcp`, "
            "every command but `init`)"
        )
    if creating:
        raise NestedVolume(real, root, mounted_at=mountpoint)
    raise VolumeConfigError(
        f"{real} is a directory inside {mountpoint}, where the volume at {root} is mounted, not a volume's "
        f"root: give {root} (nothing was changed)"
    )


def refuse_registry_inside(real: str) -> None:
    """VolumeConfigError if the directory `real` (a real path) is a volume's registry directory or
    lies in one: never a volume's root, nor a directory inside that volume."""
    head = real
    while os.path.dirname(head) != head:
        if os.path.basename(head) == REGISTRY_DIR and recorded_in(head):
            where = "" if head == real else f"inside {head}, "
            raise VolumeConfigError(
                f"{real} is {where}the registry directory of the volume at {os.path.dirname(head)}: no volume is "
                f"made or opened there (nothing was changed). Give {os.path.dirname(head)} to open that volume"
            )
        head = os.path.dirname(head)


def refuse_bound_volumes(real: str) -> None:
    """VolumeConfigError where a mount below the root `real` shows another volume's files: its
    registry directory (a mount at the root's `.coherent`), its root, or a directory inside it. Those
    files would be in two volumes, each registry checking writes as if it were the only one. A
    mount whose directory this process cannot name (`mounts.shown_below`) is not judged."""
    for mountpoint, shows in shown_below(real):
        if shows is None:
            continue
        other = shows if recorded_in(os.path.join(shows, REGISTRY_DIR)) else volume_above(shows)
        if other is not None and not _same_volume(other, real):
            raise VolumeConfigError(
                f"{mountpoint}, inside the volume at {real}, is a mount of {shows}, which is "
                f"{'the volume' if other == shows else 'inside the volume'} at {other}: its files would be in two "
                "volumes, and a write checked by one registry could silently undo one the other checked. Nothing "
                f"was changed. Unmount it (umount {mountpoint}), or use that volume at its own root"
            )


def _same_volume(root: str, other: str) -> bool:
    """Whether the roots `root` and `other` are one directory by two names (a bind of it, a second
    mount of its file system): one volume. (Its registry directory alone could be another root's,
    bound over that root's `.coherent`.)"""
    try:
        return os.path.samefile(root, other)
    except OSError:
        return False


def refuse_foreign_registry(directory: str) -> None:
    """VolumeConfigError if a root's registry directory `directory` is there but is no directory of
    its own: a symlink (to another volume's registry, it would open this root as that volume and
    record each of that volume's files missing here as deleted there), or a file of another kind;
    or if its registry file (or that file's log or index) is a symlink or has another hard link."""
    try:
        st = os.lstat(directory)
    except OSError:  # none, or not ours to look at: opening the registry says which
        return
    if stat.S_ISLNK(st.st_mode):
        raise VolumeConfigError(
            f"{directory} is a symlink (to {os.readlink(directory)!r}), not this root's own registry directory: "
            "opened through it, this directory would be taken for that registry's volume and each of its files "
            "missing here recorded as deleted there. Nothing was changed. Open the volume at its own root; to make "
            "a volume here, remove the link, then `coherent-volume init`"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise VolumeConfigError(
            f"{directory} is {kind_of(st.st_mode)} ({st.st_size:,} bytes), not a volume's registry directory "
            f"(it holds no versions). Nothing was changed. Move it away if no program of yours needs it; "
            "`coherent-volume init` then makes a volume here"
        )
    for name in (DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm"):
        path = os.path.join(directory, name)
        try:
            file = os.lstat(path)
        except OSError:  # none, or not ours to look at (opening it says so)
            continue
        if stat.S_ISLNK(file.st_mode):
            raise VolumeConfigError(
                f"{path} is a symlink (to {os.readlink(path)!r}), not this root's own registry file: through it, "
                "this root would be taken for another volume, or two names would give one database two "
                "write-ahead logs. Nothing was changed. Put the volume's own file there, or open the volume the "
                "link leads to at its own root"
            )
        if file.st_nlink > 1:
            raise VolumeConfigError(
                f"{path} has {file.st_nlink} hard links (a volume copied with `cp -al`, or `ln`): opened through "
                "each of its names, one database would get two write-ahead logs, which corrupts it and loses "
                "commits. Nothing was changed. Give each volume its own copy (`cp -a`, `rsync -a`), or remove the "
                "other links"
            )


def refuse_nesting(real: str, *, creating: bool) -> None:
    """NestedVolume if the directory `real` (a real path) lies inside another volume: below a root
    holding a registry (inside a mount of one: `refuse_mounted`). So a volume made inside another one before is
    never opened (its files are the outer volume's), by the API, a mount or a hook. When `creating`
    it, also if a volume lies below it (searched without following symlinks), or a mount of one; VolumeConfigError if
    more than MOST_SCANNED directories lie below, too many to tell."""
    if (above := volume_above(real)) is not None:
        raise NestedVolume(real, above)
    if not creating:
        return
    for mountpoint, root in fuse_mounts().items():  # (a mount shows no registry: found by its own name)
        if mountpoint != real and lies_within(mountpoint, real):
            raise NestedVolume(real, root, around=True, mounted_at=mountpoint)
    for scanned, (directory, dirs, _) in enumerate(os.walk(real)):
        dirs[:] = [d for d in dirs if d != REGISTRY_DIR]
        if directory != real and recorded_in(os.path.join(directory, REGISTRY_DIR)):
            raise NestedVolume(real, directory, around=True)
        if scanned > MOST_SCANNED:  # (the root is the 0th)
            raise VolumeConfigError(
                f"{real} holds more than {MOST_SCANNED:,} directories: too many to check that no volume lies "
                "below it (volumes do not nest). Make the volume at the directory that holds the files to "
                "manage (nothing was written)"
            )


def _utf8(path: str) -> bool:
    """Whether `path` (as the file system names it, undecodable bytes as surrogates) is UTF-8 text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def open_core(
    root: str | os.PathLike[str], managed: object = None, *, registry: str | None = None, volume: str | None = None
) -> VolumeCore:
    """Open (or, given managed globs, create) the volume at `root`, choosing its registry backend:
    the PostgreSQL volume the root records (or, given `registry`, a postgresql:// URL, and `volume`,
    its name there: creates or opens it and records it), else the root's SQLite registry; shared by
    every face."""
    if isinstance(os.fspath(root), bytes):
        raise VolumeConfigError(
            f"volume root {os.fspath(root)!r} is bytes: give it as str (os.fsdecode decodes a file name); "
            "nothing was opened"
        )
    real = os.path.realpath(root)
    mounted = mount_holding(real)
    if (
        mounted is not None
        and (mounted.mountpoint, mounted.within) == (real, "")
        and managed is None
        and registry is None
    ):
        real = mounted.root  # where a volume is mounted names it, as every command takes it
    if not os.path.isdir(real):
        raise VolumeConfigError(f"volume root {os.fspath(root)!r} is not an existing directory")
    if not _utf8(real):
        raise VolumeConfigError(
            f"volume root {os.fspath(root)!r}: its path is not valid UTF-8, and the registry records paths as text; "
            "rename the directory (or the one above it whose name is not UTF-8) and try again (nothing was written)"
        )
    globs = None if managed is None else ManagedGlobs.of(managed)
    inside = () if globs is None else globs.only_within(REGISTRY_DIR)
    if inside:
        raise GlobError(
            f"managed glob {inside[0]!r} names only paths in {REGISTRY_DIR}/, the volume's own directory, whose "
            "files are never managed: name the files to protect instead (e.g. 'plans/**')"
        )
    refuse_mounted(real, creating=managed is not None or registry is not None)
    refuse_network_root(real)  # whatever the registry, a root serves one kernel
    refuse_renaming_in_place(real)
    refuse_registry_inside(real)
    directory = os.path.join(real, REGISTRY_DIR)
    refuse_foreign_registry(directory)
    made = recorded_in(directory)
    if made or managed is not None or registry is not None:  # a volume's root, or one to be
        refuse_nesting(real, creating=not made)
        refuse_bound_volumes(real)  # (at a plain directory the registry says there is no volume: a
        # mount of another volume below it is no volume's business; /tmp/s33cli 2)
    if registry is not None or os.path.exists(os.path.join(directory, LOCATION_FILE)):
        from ..registry import postgresql  # (its modules load with a PostgreSQL volume only)

        return VolumeCore(real, postgresql.open_postgres(directory, real, globs, registry, volume))
    return VolumeCore(real, SQLiteRegistry(directory, globs))
