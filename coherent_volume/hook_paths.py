"""Where a path a hook is given lies: in which volume (mounted or plain) and by which path below
its root. A path is the file the kernel opens for it: symlinks followed, `..` applied after them,
so no spelling of a managed file's path escapes its check."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import NamedTuple

from .paths import REGISTRY_DIR
from .registry import recorded_in


class Located(NamedTuple):
    """Where a path lies: its volume's root and the path relative to it."""

    root: str
    rel: str
    mounted: bool
    """Reached through a mount of the volume (else in the plain volume directory)."""


def _mounts() -> dict[str, str]:
    from .mounts import fuse_mounts

    return fuse_mounts()


def located(path: str) -> Located | None:
    """Where the file a path names lies: in a mounted volume or a plain one, else None. `path` is
    resolved as the kernel will open it (`os.path.realpath` of the path as given, joined to the
    working directory: symlinks followed component by component, each `..` applied to where the
    components before it lead; a name that does not exist yet through its existing parent), so a
    path through a symlink that lives outside a volume, or a `..` after one, finds the volume the
    file is in. Mounts come from /proc; a plain volume is the nearest ancestor directory of the
    resolved path holding a registry. `rel` is the path as given below the volume's root (or
    mountpoint) when it was given there, so the core resolves it and sees the name the caller used
    (`Target.alias_of`); else it is the resolved path's."""
    given = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    real = os.path.realpath(given)
    for mountpoint, root in _mounts().items():
        if real == mountpoint or real.startswith(mountpoint + os.sep):
            return Located(root, _below(given, mountpoint) or os.path.relpath(real, mountpoint), True)
    directory = os.path.dirname(real)
    while True:
        if recorded_in(os.path.join(directory, REGISTRY_DIR)):
            return Located(directory, _below(given, directory) or os.path.relpath(real, directory), False)
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def _below(given: str, top: str) -> str | None:
    """`given` relative to `top` as text (its `..` and symlinks left for the core to resolve), when
    it is written below `top`."""
    return given[len(top) + 1 :] if given.startswith(top + os.sep) and len(given) > len(top) + 1 else None


def located_directory(path: str) -> Located | None:
    """Where the directory `path` lies (or would, if it does not exist yet): `located` of a name in
    it that does not exist (so no symlink of that name leads elsewhere), with `rel` the directory's
    own real path below the root or mountpoint ("" for the root itself)."""
    real = os.path.realpath(path)
    name = "x"
    while os.path.lexists(os.path.join(real, name)):
        name += "x"
    found = located(os.path.join(real, name))
    return None if found is None else found._replace(rel=found.rel[: -len(name)].rstrip("/"))


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a path inside a mounted or plain volume, else None."""
    found = located(path)
    return None if found is None else (found.root, found.rel)


def volume_roots(places: Iterable[str | None]) -> set[str]:
    """The roots of every mounted volume and of the volumes holding `places` (directories)."""
    roots = set(_mounts().values())
    for place in places:
        found = located_directory(place) if place else None
        if found:
            roots.add(found.root)
    return roots
