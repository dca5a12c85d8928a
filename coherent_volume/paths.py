"""Confinement of user paths to a volume root. Pure path logic plus `realpath` at the edge."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OutsideVolume
from .globs import ManagedGlobs

REGISTRY_DIR = ".coherent"


@dataclass(frozen=True)
class Target:
    """A path inside the volume: `rel` is root-relative POSIX, symlinks resolved; `abs` is absolute."""

    rel: str
    abs: str
    managed: bool


def _check_text(path: str) -> None:
    if "\0" in path:
        raise OutsideVolume(f"path {path!r} contains a NUL byte")
    if not path:
        raise OutsideVolume("empty path")


def is_registry_path(rel: str) -> bool:
    """True for the registry directory and anything below it."""
    return rel == REGISTRY_DIR or rel.startswith(REGISTRY_DIR + "/")


class VolumePaths:
    """Maps user paths to Targets inside one root. Invariant: every Target.abs is below root."""

    def __init__(self, root: Path, globs: ManagedGlobs) -> None:
        self.root = os.path.realpath(root)
        self.globs = globs

    def rel_of(self, abs_path: str) -> str:
        """Root-relative POSIX path of an absolute, already-resolved path; raises if outside."""
        if abs_path == self.root:
            return "."
        if not abs_path.startswith(self.root + os.sep):
            raise OutsideVolume(f"{abs_path!r} is outside the volume root {self.root!r}")
        rel = abs_path[len(self.root) + 1 :]
        if is_registry_path(rel):
            raise OutsideVolume(f"{rel!r} is the registry's own directory; it is not part of the volume")
        return rel

    def resolve(self, path: str | os.PathLike[str]) -> Target:
        """Resolve `path` (relative to root, or absolute) following symlinks, and confine it."""
        text = os.fspath(path)
        if isinstance(text, bytes):
            raise OutsideVolume(f"path {text!r} must be str, not bytes")
        _check_text(text)
        joined = text if os.path.isabs(text) else os.path.join(self.root, text)
        resolved = os.path.realpath(joined)
        rel = self.rel_of(resolved)
        if rel == ".":
            raise OutsideVolume(f"{text!r} is the volume root itself, not a file in it")
        return Target(rel=rel, abs=resolved, managed=self.globs.matches(rel))

    def of_rel(self, rel: str) -> Target:
        """Target for a root-relative path that is already resolved (as stored in the registry)."""
        return Target(rel=rel, abs=os.path.join(self.root, rel), managed=self.globs.matches(rel))
