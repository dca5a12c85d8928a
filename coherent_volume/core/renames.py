"""Renames and links: a rename is a write of every managed path whose content it changes, all
decided in one step; links that would let writes reach managed bytes past the protocol are refused."""

from __future__ import annotations

import errno
import os
import stat as stat_mod
import time
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from .. import atomic
from ..errors import (
    InvalidPath,
    LinkRefused,
    StaleWriteError,
)
from ..fingerprint import fingerprint_path
from ..paths import Target, printable
from ..protocol import (
    FileRecord,
    Intent,
    current_version,
    may_merge,
)
from ..registry import Transaction
from .history import History


def _rename_types_fit(src: Target, dst: Target, exchange: bool) -> None:
    """rename(2)'s own type errors, raised before any check so that they never reach recovery."""
    if exchange or not os.path.lexists(dst.abs) or not os.path.lexists(src.abs):
        return
    src_dir, dst_dir = (
        os.path.isdir(src.abs) and not os.path.islink(src.abs),
        os.path.isdir(dst.abs) and not os.path.islink(dst.abs),
    )
    if dst_dir and not src_dir:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", dst.rel)
    if src_dir and not dst_dir:
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", dst.rel)
    if dst_dir and os.listdir(dst.abs):
        raise OSError(errno.ENOTEMPTY, "Directory not empty", dst.rel)


class Planned(NamedTuple):
    """A managed path a checked rename changes: its new version, content hash (None: it loses its
    content) and the writer's view, and the file that brings the new content."""

    target: Target
    version: int
    digest: str | None
    seen: int | None
    source: str | None


@dataclass
class _Tree:
    """What a rename moves from one side: regular files (rel -> abs), symlinks, multiply linked files."""

    files: dict[str, str]
    symlinks: list[str]
    linked: list[str]

    def add(self, rel: str, path: str, st: os.stat_result) -> None:
        if stat_mod.S_ISLNK(st.st_mode):
            self.symlinks.append(rel)
        elif stat_mod.S_ISREG(st.st_mode):
            self.files[rel] = path
            if st.st_nlink > 1:
                self.linked.append(rel)


class Renames(History):
    # ---- renames --------------------------------------------------------------------

    def _may_hold_managed(self, target: Target) -> bool:
        """Whether `target` is, or (as a directory) may hold, a managed path."""
        return target.managed or self.paths.globs.reaches(target.rel)

    def rename_is_checked(self, src: Target, dst: Target) -> bool:
        """Whether renaming `src` over `dst` can change a managed path (then `rename` must check it);
        a False answer lets a face rename directly."""
        return self._may_hold_managed(src) or self._may_hold_managed(dst)

    def _tree(self, target: Target) -> _Tree:
        """What renaming `target` moves: every regular file at or below it, and every symlink."""
        tree = _Tree({}, [], [])
        try:
            st = os.lstat(target.abs)
        except FileNotFoundError:
            return tree
        if not stat_mod.S_ISDIR(st.st_mode):
            tree.add(target.rel, target.abs, st)
            return tree
        for directory, dirs, files in os.walk(target.abs):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
                path = os.path.join(directory, name)
                tree.add(target.rel + path[len(target.abs) :], path, os.lstat(path))
        return tree

    def _refuse_unprotectable(self, moving: _Tree, src: Target, dst: Target) -> None:
        """Nothing may arrive at a name that is (or may hold) a managed path unless the protocol can
        guard it there: no symlink (the kernel would follow it past the protocol), no file with
        another hard link (a write through the other name would reach it), no name the registry
        cannot record (not UTF-8)."""
        for rel in moving.symlinks:
            if self._may_hold_managed(self.paths.of_rel(dst.rel + rel[len(src.rel) :])):
                raise LinkRefused(
                    f"{rel!r} is a symlink: it cannot be moved to {dst.rel!r}, inside a managed glob; "
                    "move the files it points to instead"
                )
        for rel in moving.linked:
            if self.paths.managed(dst.rel + rel[len(src.rel) :]):
                raise LinkRefused(
                    f"{rel!r} has another hard link: it cannot be moved into a managed glob; copy it instead"
                )
        for rel in moving.files:
            new = dst.rel + rel[len(src.rel) :]
            if self.paths.managed(new):
                try:
                    new.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidPath(
                        f"{printable(new)!r} is not valid UTF-8: a volume records its paths as UTF-8, so a file "
                        "cannot be moved there"
                    ) from None

    def rename(
        self,
        agent: str,
        src: Target,
        dst: Target,
        *,
        exchange: bool = False,
        noreplace: bool = False,
    ) -> None:
        """Rename `src` (a file or a whole directory) over `dst` as one checked commit of every managed
        path whose content it changes. Like rename(2), not made durable: a program that needs the
        new names to survive a power loss fsyncs the directories.

        A rename deletes every file at its old name and creates it at its new one (with `exchange`,
        in both directions): each managed path that loses or changes content is a write that needs
        the agent's current view, each that gains content a creation, all decided in one
        commit-locked step, so a refusal of any of them renames nothing.

        Saving over a path the volume's merge globs name (a file renamed over it, the way editors
        save) from a stale view is merged instead (`write_merging`): the merge is committed at
        `dst` and `src` removed, or the rename is refused (MergeConflict) and nothing changes."""
        if not self.rename_is_checked(src, dst):
            atomic.rename(src.abs, dst.abs, exchange=exchange, noreplace=noreplace)
            return
        agent = self.agent(agent)
        _rename_types_fit(src, dst, exchange)
        try:
            self._rename_checked(agent, src, dst, exchange, noreplace)
        except StaleWriteError as refusal:
            if not self._saves_by_merging(refusal, src, dst, exchange, noreplace):
                raise
            with open(src.abs, "rb") as f:  # src is a regular file: checked above
                ours = f.read()
            self.write_merging(agent, dst, ours, refused=refusal)
            if src.managed:
                self.commit(agent, src, None)
            else:
                os.unlink(src.abs)

    def _saves_by_merging(
        self, refusal: StaleWriteError, src: Target, dst: Target, exchange: bool, noreplace: bool
    ) -> bool:
        """Whether a refused rename is a save over a merge-glob file from a stale view: one regular
        file replacing `dst`, refused only because `dst` moved on since the agent read it."""
        if exchange or noreplace or refusal.path != dst.rel or not may_merge(refusal.reason, True):
            return False
        try:
            is_file = stat_mod.S_ISREG(os.lstat(src.abs).st_mode)
        except OSError:
            return False
        return is_file and self.policy().merges(dst.rel)

    def _rename_checked(self, agent: str, src: Target, dst: Target, exchange: bool, noreplace: bool) -> None:
        """`rename` of a checked rename: decided for every managed path it changes at once."""

        def decide(tx: Transaction) -> tuple[list[Planned], StaleWriteError | None]:
            now = time.time()
            if not os.path.lexists(src.abs) or (exchange and not os.path.lexists(dst.abs)):
                missing = src if not os.path.lexists(src.abs) else dst
                raise FileNotFoundError(2, "No such file or directory", missing.rel)
            moving, other = self._tree(src), self._tree(dst)
            self._refuse_unprotectable(moving, src, dst)
            if exchange:
                self._refuse_unprotectable(other, dst, src)
            before = {**moving.files, **other.files}
            after = {dst.rel + rel[len(src.rel) :]: path for rel, path in moving.files.items()}
            if exchange:
                after.update({src.rel + rel[len(dst.rel) :]: path for rel, path in other.files.items()})
            checked: list[tuple[str, Target, FileRecord | None, int | None]] = []
            for rel in sorted(set(before) | set(after)):
                target = self.paths.of_rel(rel)
                if not target.managed or before.get(rel) == after.get(rel):
                    continue
                record, check, refusal = self._check(tx, agent, target, now, "file")
                if refusal is not None:
                    return [], refusal
                checked.append((rel, target, record, check.seen))
            # hashed once every path was checked: a check brings a working copy that is behind up to
            # date, so a source hashed before its own check would name the bytes it held before that
            plan: list[Planned] = []
            for rel, target, record, seen in checked:
                digest = self._hash_of(after[rel], fingerprint_path(after[rel]))[1] if rel in after else None
                if (record is not None and record.present) or digest is not None:
                    plan.append(Planned(target, current_version(record) + 1, digest, seen, after.get(rel)))
            for target, version, digest, _, source in plan:
                tx.put_intent(Intent(target.rel, agent, version, digest is not None, digest, None))
                if source is not None:
                    self._retain(tx, source, digest)
            return plan, None

        def finish(tx: Transaction) -> bool:
            """Record the installed rename's versions (`Writes._recorded`); whether every one is the
            writer's."""
            ours = [
                self._recorded(
                    tx, agent, target, version, partial(self._finish, tx, agent, target, version, digest, seen)
                )
                for target, version, digest, seen, _ in plan
            ]
            return all(ours)

        with self.registry.commit_lock():
            plan, refusal = self._transact(decide)
            if refusal is not None:
                raise refusal
            self._install(lambda: atomic.rename(src.abs, dst.abs, exchange=exchange, noreplace=noreplace))
            for target, version, digest, _, _ in plan:
                self._installed(target, version, digest)
            what = ", ".join(f"{target.rel} (version {version})" for target, version, *_ in plan)
            if plan and not self._settle(what, finish):
                raise self._not_recorded(what, "the rename", "check the files and redo the rename if it is missing")

    def link(self, src: Target, dst: Target) -> None:
        """Hard-link `src` as `dst`. Refused (LinkRefused) when either is a managed path: a commit
        installs a new inode, and a write through another name would reach a managed file's bytes
        past the protocol."""
        for end in (src, dst):
            if end.managed:
                raise LinkRefused(
                    f"{end.rel!r} is managed: hard links to or from managed files are not allowed; "
                    "copy the file instead"
                )
        os.link(src.abs, dst.abs, follow_symlinks=False)

    def symlink(self, value: str, at: Target) -> None:
        """Create a symlink `at` -> `value`. Refused (LinkRefused) where managed paths may be: the
        kernel would follow it to a file the protocol does not guard under that name."""
        if self._may_hold_managed(at):
            raise LinkRefused(
                f"{at.rel!r} is inside a managed glob: symlinks cannot be created there; write a regular file instead"
            )
        os.symlink(value, at.abs)
