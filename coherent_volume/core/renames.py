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
from ..diffs import MAX_MERGE_BYTES
from ..errors import (
    InvalidPath,
    LinkRefused,
    OpenForWriting,
    StaleWriteError,
    TreeClash,
)
from ..fingerprint import Fingerprint, content_hash, fingerprint_path, hash_file, open_to_check, read_fd
from ..open_writers import RELEASE_WAIT, open_for_writing
from ..paths import Target, printable
from ..policy import Policy
from ..protocol import (
    FileRecord,
    Intent,
    WriteCheck,
    current_version,
    displaced_needs_hash,
    in_the_way,
    is_noop,
    may_merge,
    view_moves,
)
from ..registry import Transaction
from .history import History, Refused
from .writes import Made, in_the_way_said


def refuse_hard_link(*ends: Target) -> None:
    """Refuse (LinkRefused) a hard link with a managed path at either of its `ends`: a commit installs
    a new inode, and a write through another name would reach a managed file's bytes past the
    protocol. (The mount's `link`, and the hooks' check of a shell command's `ln`, `cp -l`, `link`.)"""
    for end in ends:
        if end.managed:
            raise LinkRefused(
                f"{end.rel!r} is managed: hard links to or from managed files are not allowed; copy the file instead"
            )


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


Seen = tuple[Fingerprint | None, int]
"""A fingerprint a decision relied on for a file and when it was checked against the content."""


class Planned(NamedTuple):
    """A managed path a checked rename changes: its new version, content hash (None: it loses its
    content) and the writer's view, and the file that brings the new content with the fingerprint
    its hash was taken with (`Seen`)."""

    target: Target
    version: int
    digest: str | None
    seen: int | None
    source: str | None
    came: Seen = (None, 0)


class _Aside(NamedTuple):
    """The file a checked rename's install takes from its place (what a save replaces at its
    destination, or a merged save's source), set aside at `name` (a temp name beside it, which the
    path's intent names) and checked against what the decision found there: its hash (None: no
    file) and the fingerprint relied on (`Writes._displaced_settled`)."""

    name: str
    target: Target
    digest: str | None
    seen: Seen


class _Plan(NamedTuple):
    """A checked rename's decision: the paths it changes whose versions are recorded once it is
    installed, and for a save by merging the version of the merge recorded at its destination
    (None: no merge, or one that is the destination's current content, `protocol.is_noop`: then
    nothing is installed there, only the source removed); the file it takes from its place."""

    plan: list[Planned]
    merged: int | None
    aside: _Aside | None = None
    merged_over: FileRecord | None = None
    """The record of `dst` the merge was decided over (what its install displaces)."""


class _Merge(NamedTuple):
    """The merge a save by rename commits at its destination: its staged content, its parents
    (base, theirs), the refusal it answers and the hash of the source's bytes it merged."""

    content: atomic.Staged
    parents: tuple[int, int]
    refusal: StaleWriteError
    ours: str

    @property
    def made(self) -> Made:
        return ("merge", self.parents)


def _merge_side(src: Target) -> bytes | None:
    """The bytes of `src` for a merge: None when it is not a regular file or too large to merge."""
    try:
        fd = open_to_check(src.abs)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat_mod.S_ISREG(st.st_mode) or st.st_size > MAX_MERGE_BYTES:
        os.close(fd)
        return None
    return read_fd(fd, src.rel)[0]


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


def _save_in(src: str, aside: str, dst: str, found: bool) -> bool:
    """A save by rename of `src` over `dst`, destroying nothing: where its decision found no file
    at `dst` (`found`) one rename that replaces nothing; else (or once a file is there after all)
    the file moved to `aside` (a temp name beside `dst`, which `dst`'s intent names) and exchanged
    from there with the file at `dst` (`atomic.swap_in`), so what it displaced is at `aside`, never
    at `src`, where a program may save again (a killed install leaves at `aside` either the
    content, which recovery installs, or what it displaced). Moved back if the exchange fails,
    or moved a directory a program put at either name meanwhile (an exchange works across
    types), exchanged back then, failing as rename(2) would (`_misfit`): nothing changed (unless a
    file was made at `src` in between: then what the rename took stays at `aside`, and the error
    says so). Whether it displaced a file."""
    if not found:
        try:
            atomic.rename(src, dst, noreplace=True)
            return False
        except FileExistsError:
            pass
    atomic.rename(src, aside, noreplace=True)
    try:
        displaced = atomic.swap_in(aside, dst)
        misfit = _misfit(src, dst)
        if misfit is not None:
            atomic.rename(aside, dst, exchange=True) if displaced else atomic.rename(dst, aside, noreplace=True)
            raise misfit
        return displaced
    except BaseException as e:
        try:
            atomic.rename(aside, src, noreplace=True)
        except FileExistsError:  # a program made another file at `src` meanwhile: never replaced
            if isinstance(e, OSError):
                at, now = atomic.named(src), atomic.named(aside)
                e.strerror = f"{e.strerror}; what was at {at} is at {now} now, since a file was made at {at} meanwhile"
                e.filename, e.filename2 = atomic.named(e.filename or src), atomic.named(e.filename2 or "") or None
            raise e from None
        raise


def _misfit(src: str, dst: str) -> OSError | None:
    """The error rename(2) of `src` over `dst`, a file over a file as a save by rename decided,
    gives where a program made a directory at `src` meanwhile (what it moved, now at `dst`, is one):
    ENOTDIR; None where it is not. (One made at `dst` is never taken away: `atomic.swap_in`.)"""
    if stat_mod.S_ISDIR(os.lstat(dst).st_mode):
        return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), src, None, dst)
    return None


def _moved_changed(plan: list[Planned]) -> list[tuple[Target, tuple[Fingerprint, str]]]:
    """The files a rename moved (`plan`) whose bytes at their new name are not what its decision
    hashed at their old one (a program outside the volume saved there in the meantime), with
    their fingerprint and hash: a stat proves a file the same (`protocol.displaced_needs_hash`: a
    rename moves the inode), else it is hashed."""
    moved: list[tuple[Target, tuple[Fingerprint, str]]] = []
    for target, _, digest, _, source, came in plan:
        if source is None or digest is None:
            continue
        fp = fingerprint_path(target.abs)
        if fp is None or not displaced_needs_hash(came[0], came[1], fp):
            continue
        try:
            fp, now = hash_file(target.abs)
        except OSError:
            continue
        if now != digest:
            moved.append((target, (fp, now)))
    return moved


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

    @staticmethod
    def _refuse_unseen(tx: Transaction, src: Target, dst: Target, moving: _Tree, other: _Tree, exchange: bool) -> None:
        """A working copy's rename of the directory `src` (over `dst`, or exchanged with it): TreeClash,
        nothing changed, where the registry holds a file below either name that this copy lacks
        (another copy's, not installed here yet): below `dst`, a disk holding it would find `dst`
        not empty (ENOTEMPTY; exchanged, its file would end up among `src`'s); below `src`, the
        rename would leave it behind, split from its directory (EBUSY)."""
        sides = [(dst, other, errno.EBUSY if exchange else errno.ENOTEMPTY), (src, moving, errno.EBUSY)]
        for side, here, code in sides:
            found = tx.file_in_the_way(side.rel, besides=here.files)
            if found is None or in_the_way(side.rel, found.path) != errno.EISDIR:
                continue
            held = in_the_way_said(found, "below it", lacking=True)
            doing = f"cannot be replaced by the directory {src.rel}" if code == errno.ENOTEMPTY else "cannot be moved"
            raise TreeClash(
                code,
                f"{side.rel} {doing}: {held}. Nothing was changed: read {found.path} (or run `coherent-volume "
                "status`) to bring this working copy up to date, then try again",
                side.rel,
            )

    def _refuse_unprotectable(self, moving: _Tree, src: Target, dst: Target) -> None:
        """Nothing may arrive at a name that is (or may hold) a managed path unless the protocol can
        guard it there: no symlink (the kernel would follow it past the protocol), no file with
        another hard link (a write through the other name would reach it), no name the registry
        cannot record (not UTF-8), no unmanaged file open for writing anywhere on this kernel (its
        writers would go on in place: `open_writers.open_for_writing`; where the kernel cannot
        say, the mount's handles refuse what would be lost: `CarriedIn`)."""
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
        writers_close_by = time.monotonic() + RELEASE_WAIT  # (the commit lock is held meanwhile)
        for rel, path in moving.files.items():
            new = dst.rel + rel[len(src.rel) :]
            if self.paths.managed(new):
                try:
                    new.encode("utf-8")
                except UnicodeEncodeError:
                    raise InvalidPath(
                        f"{printable(new)!r} is not valid UTF-8: a volume records its paths as UTF-8, so a file "
                        "cannot be moved there"
                    ) from None
                if not self.paths.managed(rel) and open_for_writing(path, writers_close_by):
                    raise OpenForWriting(rel, new)

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

        Saving over a path the volume's merge globs name (a regular file renamed over it, the way
        editors save) from a stale view, every other path it changes being accepted, is merged
        instead (`protocol.may_merge`): the three-way merge of the version the agent read, the
        source's bytes and the current version is committed at `dst` and `src` removed, in one
        decision; or the rename is refused (MergeConflict, or the refusal) and nothing changes."""
        src, dst = self.paths.beneath(src), self.paths.beneath(dst)
        if not self.rename_is_checked(src, dst):
            atomic.rename(src.abs, dst.abs, exchange=exchange, noreplace=noreplace)
            return
        agent = self.agent(agent)
        _rename_types_fit(src, dst, exchange)
        once = partial(self._rename_once, agent, src, dst, exchange, noreplace)
        save = once(None)
        if save is None:
            return

        def merge_onto(save: Refused, base: int | None) -> Refused | None:
            # no lock held: the decision checks what the merge relied on
            merged, parents = self._merged(dst, save.refusal, save.ours, base)
            assert save.ours is not None  # `_merged` refuses a save that is not merged
            staged = atomic.stage(dst.abs, merged, root=self.paths.root)
            try:
                staged.take_attributes(src.abs)  # as rename(2) would have installed the source
            except OSError:
                staged.discard()
                raise
            merge = _Merge(staged, parents, save.refusal, content_hash(save.ours))
            try:
                return once(merge)
            finally:
                merge.content.discard()  # consumed by its install, unless the rename was refused

        self.merge_rounds(save, merge_onto)

    def _rename_once(
        self, agent: str, src: Target, dst: Target, exchange: bool, noreplace: bool, merge: _Merge | None
    ) -> Refused | None:
        """One decision of a checked rename (`_decide_rename`, with `merge` the merge made for it)
        and, if it is accepted, its install, under the commit lock: None once done; a save to merge
        (`merge_rounds`) when that is all that refused it; else the refusal raised."""

        def once() -> Refused | None:
            outcome = self._transact(partial(self._decide_rename, agent, src, dst, exchange, noreplace, merge))
            if isinstance(outcome, StaleWriteError):
                raise outcome
            if isinstance(outcome, _Plan):
                self._install_rename(agent, src, dst, exchange, noreplace, outcome, merge)
                return None
            return outcome

        return self._locked((src.rel, dst.rel), once)

    def _decide_rename(
        self,
        agent: str,
        src: Target,
        dst: Target,
        exchange: bool,
        noreplace: bool,
        merge: _Merge | None,
        tx: Transaction,
    ) -> _Plan | StaleWriteError | Refused:
        """The decision of a checked rename, for every managed path it changes at once: its plan
        (intents recorded, and with `merge` the merge at `dst` recorded with its staged content), the
        first refusal, or a save to merge (`Refused`: the refusal and the source's bytes as this
        decision read them) when the only refusal is a stale view of `dst` that `protocol.may_merge`
        lets a merge answer. `merge`: the merge made for this rename's last save, committed if
        `dst` is still the version it merged onto and `src` still holds the bytes it merged."""
        now = time.time()
        if not os.path.lexists(src.abs) or (exchange and not os.path.lexists(dst.abs)):
            missing = src if not os.path.lexists(src.abs) else dst
            raise FileNotFoundError(2, "No such file or directory", missing.rel)
        moving, other = self._tree(src), self._tree(dst)
        if self.replica is not None and os.path.isdir(src.abs):
            self._refuse_unseen(tx, src, dst, moving, other, exchange)
        self._refuse_unprotectable(moving, src, dst)
        if exchange:
            self._refuse_unprotectable(other, dst, src)
        before = {**moving.files, **other.files}
        after = {dst.rel + rel[len(src.rel) :]: path for rel, path in moving.files.items()}
        if exchange:
            after.update({src.rel + rel[len(dst.rel) :]: path for rel, path in other.files.items()})
        saving = not exchange and not noreplace and list(moving.files) == [src.rel]  # one file over `dst`
        self._hold(tx, (rel for rel in set(before) | set(after) if self.paths.of_rel(rel).managed))
        stale: StaleWriteError | None = None
        checked: list[tuple[str, Target, FileRecord | None, WriteCheck]] = []
        for rel in sorted(set(before) | set(after)):
            target = self.paths.of_rel(rel)
            if not target.managed or before.get(rel) == after.get(rel):
                continue
            expected = merge.parents[1] if merge is not None and rel == dst.rel else None
            record, check, refusal = self._check(tx, agent, target, now, "file", expected)
            if refusal is None:
                checked.append((rel, target, record, check))
            elif saving and rel == dst.rel and may_merge(refusal.reason, self._merges(tx, dst)):
                stale = refusal  # answered by a merge if every other path is accepted
            else:
                return refusal
        if stale is not None:
            return Refused(stale, _merge_side(src))
        # hashed once every path was checked: a check brings a working copy that is behind up to
        # date, so a source hashed before its own check would name the bytes it held before that.
        # A managed source's own check synced its record with the disk, so (outside a working
        # copy) that record's hash names the bytes it holds: not hashed again
        synced = {} if self.replica is not None else {t.abs: r for _, t, r, _ in checked if r and r.present}
        plan: list[Planned] = []
        merged: int | None = None
        aside: _Aside | None = None
        dst_record: FileRecord | None = None
        for rel, target, record, check in checked:
            digest: str | None = None
            came: Seen = (None, 0)
            if rel in after:
                digest, came = self._moving_hash(after[rel], synced.get(after[rel]))
            version = current_version(record) + 1
            if merge is not None and rel == dst.rel:
                if digest != merge.ours:  # the source changed since it was merged: merge it again
                    return Refused(merge.refusal, _merge_side(src))
                aside = _Aside(atomic.temp_name(src.abs), src, digest, came)
                if is_noop(record, merge.content.hash):
                    continue
                moves_view = view_moves(check, True, True)
                self._record_staged(tx, agent, target, version, merge.content, check.seen, moves_view, merge.made)
                merged, dst_record = version, record
            elif (record is not None and record.present) or digest is not None:
                plan.append(Planned(target, version, digest, check.seen, after.get(rel), came))
                if saving and rel == dst.rel:
                    present = record is not None and record.present
                    seen = self._seen_on_disk(target, record)
                    aside = _Aside(atomic.temp_name(dst.abs), dst, record.hash if present and record else None, seen)
        for target, version, digest, _, source, _ in plan:
            tmp = aside.name if aside is not None and aside.target.rel == target.rel else None
            tx.put_intent(Intent(target.rel, agent, version, digest is not None, digest, tmp))
            if source is not None:
                self._retain(tx, source, digest)
        return _Plan(plan, merged, aside, dst_record)

    def _moving_hash(self, path: str, record: FileRecord | None) -> tuple[str | None, Seen]:
        """The hash of the file at `path` that a rename moves, and the fingerprint it was taken with:
        its record's where its check synced that with the disk (`record`), else hashed now."""
        if record is not None:
            return record.hash, (record.fingerprint, record.checked_ns)
        fp, digest = self._hash_of(path, fingerprint_path(path))
        return digest, (fp, time.time_ns())

    @staticmethod
    def _merges(tx: Transaction, dst: Target) -> bool:
        """Whether the volume's policy merges stale saves over `dst` (read in the decision's transaction)."""
        return Policy.from_json(tx.meta("policy")).merges(dst.rel)

    def _install_rename(
        self,
        agent: str,
        src: Target,
        dst: Target,
        exchange: bool,
        noreplace: bool,
        decided: _Plan,
        merge: _Merge | None,
    ) -> None:
        """The disk half of a decided rename (under the commit lock), and the record of its versions:
        rename(2), or for a save by merging (`merge`) the merge installed at `dst` (unless it is
        already its content) and `src` removed. Nothing a program outside the volume wrote in the
        meantime is destroyed: a save over `dst` exchanges (`_save_in`) and a merged save's source
        is set aside before it goes (`Writes._displaced_settled`), and a moved file is checked at
        its new name (`_moved_changed`)."""
        plan = decided.plan
        undone = [(target.rel, version) for target, version, *_ in plan]
        paths = [target.rel for target, *_ in plan]
        aside, done, settled = decided.aside, [], True
        if merge is None and aside is None:
            self._install(
                lambda: atomic.rename(src.abs, dst.abs, exchange=exchange, noreplace=noreplace), undone, paths
            )
        elif merge is None:
            assert aside is not None
            found = aside.digest is not None
            brought = next(digest for target, _, digest, *_ in plan if target.rel == dst.rel)
            self._noting_aside(dst, aside.name, brought)  # for this copy, once another completes its intent
            self._install(lambda: done.append(_save_in(src.abs, aside.name, dst.abs, found)), undone, paths)
        else:
            assert aside is not None
            if decided.merged is not None:
                settled = self._install_recorded(dst, merge.content, decided.merged, decided.merged_over)
            if src.managed:
                self._install(lambda: done.append(atomic.set_aside(src.abs, aside.name)), undone, paths)
            else:
                done.append(atomic.set_aside(src.abs, aside.name))
        for target, version, digest, _, _, _ in plan:
            self._installed(target, version, digest)
        moved = _moved_changed(plan)
        if done and done[0] and aside is not None and not self._displaced_settled(aside.name, aside.digest, aside.seen):
            self._aside_back(aside, undone)
            settled = settled or aside.target.managed  # its recovery held `dst` too
        if not settled:  # recovery puts it back and records it
            self._settle(f"the save merged at {dst.rel}", lambda tx: None, (dst.rel, *paths), recover=True)
        if self.replica is not None and merge is None and aside is not None and not os.path.lexists(aside.name):
            self._noted_settled(dst, aside.name)  # (a file left there keeps its note: `_set_back`)

        def finish(tx: Transaction) -> bool:
            """Record the installed rename's versions (`Writes._recorded`); whether every one is the
            writer's."""
            ours = [
                self._recorded(
                    tx, agent, target, version, partial(self._finish, tx, agent, target, version, digest, seen)
                )
                for target, version, digest, seen, _, _ in plan
            ]
            return all(ours)

        what = ", ".join(f"{target.rel} (version {version})" for target, version, *_ in plan)
        if plan and not self._settle(what, finish, paths):
            raise self._not_recorded(what, "the rename", "check the files and redo the rename if it is missing")
        for target, disk in moved:
            self._transact(partial(self._moved_foreign, agent, target, disk), holds=(target.rel,))

    def _moved_foreign(self, agent: str, target: Target, disk: tuple[Fingerprint, str], tx: Transaction) -> None:
        """Record the bytes a rename by `agent` moved to `target` that were not what its decision
        hashed (`_moved_changed`) as the version after the rename's, by EXTERNAL."""
        why = f"changed outside the volume just before a rename by {agent} moved it to this name"
        self._sync(tx, target, tx.file(target.rel), disk, why)

    def _aside_back(self, aside: _Aside, installed: list[tuple[str, int]]) -> None:
        """The file a rename's install set aside holds other bytes than its decision found there (a
        change made outside the volume in the meantime): recorded after the rename's version and
        put back in place by recovery (its path's intent names it, `CoreBase._recover`), which
        completes the rename's intents (`installed`: path, version) as this process saw them done,
        whatever a program saved at their names since (retried while the registry cannot be
        reached, as a commit's record is: `_settle`); an unmanaged source is put back as it was,
        unless a file was made at its name meanwhile (then it stays at its temp name, never
        removed)."""
        if aside.target.managed:
            with self._lock:
                self._done.update(installed)
            try:
                holds = (aside.target.rel, *(path for path, _ in installed))
                self._settle(f"the rename to {aside.target.rel}", lambda tx: None, holds, recover=True)
            finally:
                with self._lock:
                    self._done.difference_update(installed)
            return
        try:
            atomic.rename(aside.name, aside.target.abs, noreplace=True)
        except FileExistsError:
            pass

    def link(self, src: Target, dst: Target) -> None:
        """Hard-link `src` as `dst`, unless `refuse_hard_link` refuses it."""
        refuse_hard_link(src, dst)
        src, dst = self.paths.beneath(src), self.paths.beneath(dst)
        os.link(src.abs, dst.abs, follow_symlinks=False)

    def symlink(self, value: str, at: Target) -> None:
        """Create a symlink `at` -> `value`. Refused (LinkRefused) where managed paths may be: the
        kernel would follow it to a file the protocol does not guard under that name."""
        if self._may_hold_managed(at):
            raise LinkRefused(
                f"{at.rel!r} is inside a managed glob: symlinks cannot be created there; write a regular file instead"
            )
        at = self.paths.beneath(at)  # (held: its descriptor lives as long as the Target)
        os.symlink(value, at.abs)
