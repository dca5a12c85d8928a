"""Where a path a hook is given lies: in which volume (mounted or plain) and by which path below
its root, and which volumes a session works in. A path is the file the kernel opens for it:
symlinks followed, `..` applied after them, so no spelling of a managed file's path escapes its
check. A session works in the volume of its working directory and in each volume its hooks bound
it in (`record_volume`): its session events touch those and no other."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
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
    it is written below `top`: never absolute (`ROOT//plans/a.md` is `plans/a.md`)."""
    rel = given[len(top) :].lstrip(os.sep) if given.startswith(top + os.sep) else ""
    return rel or None


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


def session_file(kind: str, session: str) -> Path | None:
    """The file of `kind` a session's hooks keep about it (the volumes it works in, the stale views
    it was told of), in a directory only this user may use: `coherent-volume-UID` (0700) in
    $XDG_RUNTIME_DIR, else the temporary directory. None if there is none such (then nothing is
    kept)."""
    directory = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"coherent-volume-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return directory / f"{kind}-{hashlib.sha256(session.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def _recorded(session: str) -> set[str]:
    """The volume roots `record_volume` kept for `session`."""
    at = session_file("volumes", session)
    try:
        lines = at.read_bytes().splitlines() if at is not None else []
    except OSError:
        return set()
    roots: set[str] = set()
    for line in lines:
        try:
            root = json.loads(line)
        except ValueError:
            continue  # a line cut short (a full disk): its volume is missed, as if never recorded
        if isinstance(root, str):
            roots.add(root)
    return roots


def record_volume(session: str, root: str) -> None:
    """Remember that `session`'s hooks work in the volume at `root` (a real path), so its session
    events reach it (`session_volumes`): one line appended in one write (O_APPEND: hooks of one
    session running at once lose none of theirs), unless it is there already. Where it cannot be
    kept (no private directory, a full disk), the session's events miss that volume: its grants
    there end with its process or at their TTL, as after a session event that timed out."""
    at = session_file("volumes", session)
    if at is None or root in _recorded(session):
        return
    try:
        fd = os.open(at, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (json.dumps(root) + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        return


def forget_volumes(session: str) -> None:
    """Drop what `record_volume` kept for `session` (the session ended)."""
    at = session_file("volumes", session)
    if at is not None:
        at.unlink(missing_ok=True)


def session_volumes(session: str, places: Iterable[str | None]) -> set[str]:
    """The roots of the volumes a session works in: those holding `places` (its working
    directories) and those its hooks recorded (`record_volume`) that are volumes still. No other
    volume is opened for a session's events: a lock held in a volume the session never worked in
    never makes them wait, and they never bind, release or end anything there."""
    roots = {root for root in _recorded(session) if recorded_in(os.path.join(root, REGISTRY_DIR))}
    for place in places:
        found = located_directory(place) if place else None
        if found:
            roots.add(os.path.realpath(found.root))
    return roots
