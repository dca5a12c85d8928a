"""Every committed version kept: a path's history, a version's bytes, diffs between versions and
restoring an old version as a new commit."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple, TypeVar

from .. import atomic, diffs
from ..errors import (
    CoherenceError,
    DamagedContent,
    MergeConflict,
    StaleWriteError,
    TooManyLines,
    TreeClash,
    VersionGone,
    VolumeConfigError,
)
from ..paths import Target
from ..policy import DAY, Policy, Retention, prunable
from ..protocol import Version, current_version, may_merge, merged_already, takes_current_again
from ..registry import Transaction
from .base import Isolation
from .writes import Writes

log = logging.getLogger(__name__)

_T = TypeVar("_T")

MERGE_ATTEMPTS = 8
"""Merges of one write tried while other commits keep landing between a merge and its commit."""
PRUNE_EVERY = 3600.0
"""Seconds between automatic prunes of a volume (run by a commit that finds one due)."""
MAX_VERSION = 2**63 - 1
"""The largest version number a registry can hold (a signed 64-bit integer)."""
PRUNE_STEP = 100
"""Most versions one transaction of a prune drops (a few milliseconds under the commit lock), and
the most a commit that finds a prune due (or under way) drops before it returns."""
PRUNE_STEP_BYTES = 16 << 20
"""Most bytes of versions one transaction of a prune drops, unless one version alone has more
(freeing content costs time with its size: a step of a hundred 4 MiB versions held the commit lock
for seconds)."""


def _newest(tx: Transaction, path: str, keep_last: int) -> list[Version]:
    """`path`'s history entries, newest first, back to its `keep_last`-th version with bytes, or all
    of them (what `policy.prunable` takes): as many as that usually, more past deletions."""
    limit = keep_last
    while True:
        found = tx.history(path, limit)
        if len(found) < limit or sum(v.hash is not None for v in found) >= keep_last:
            return found
        limit *= 2


def _in_steps(versions: list[Version]) -> Iterator[list[Version]]:
    """`versions`, in order, cut into a prune's steps: at most PRUNE_STEP versions and PRUNE_STEP_BYTES
    of their sizes each (a version larger than that alone)."""
    step: list[Version] = []
    size = 0
    for v in versions:
        if step and (len(step) == PRUNE_STEP or size + (v.size or 0) > PRUNE_STEP_BYTES):
            yield step
            step, size = [], 0
        step.append(v)
        size += v.size or 0
    if step:
        yield step


class Refused(NamedTuple):
    """A write refused that a merge may answer (`History.merge_rounds`): the refusal, and the bytes
    written as the decision saw them, which `History._merged` merges (None: a file saved that is
    not a regular file or larger than a merge takes; or a round that makes the bytes it merges
    itself, as a hook does from a tool's change)."""

    refusal: StaleWriteError
    ours: bytes | None


class Overtaken(Exception):
    """A round of `merge_rounds` that found no bytes kept of the version its refusal named current,
    a newer commit having overtaken it (`History.reading_sides`): merged again onto the current
    version, which `refusal` now names. Never leaves `merge_rounds`."""

    def __init__(self, refusal: StaleWriteError) -> None:
        super().__init__(refusal.path)
        self.refusal = refusal


@dataclass(frozen=True)
class Pruned:
    """What a prune did: versions whose bytes it dropped, stored contents removed and bytes freed."""

    versions: int
    objects: int
    bytes: int

    def plus(self, other: Pruned) -> Pruned:
        return Pruned(self.versions + other.versions, self.objects + other.objects, self.bytes + other.bytes)


PRUNE_PAUSE = 0.005
"""Seconds a prune waits between its transactions: as long as a writer waiting for the commit lock
sleeps between its tries at most (`registry.sqlite._flock_within`), so it gets its turn."""


class Step(NamedTuple):
    """One transaction's share of a prune (`History._prune_plan`): versions planned to be dropped,
    oldest first, for their age (`aged`) or for the byte budget."""

    aged: bool
    versions: list[Version]


class History(Writes):
    _prune_check_at = 0.0
    """time.monotonic() after which a commit of this process looks whether a prune is due."""
    _prune_steps: deque[Step] | None = None
    """The steps left of this process's prune under way (`prune_if_due`), one per commit."""

    def _committed(self) -> None:
        """After each commit while this process has a prune under way, else at most once a minute,
        a step of the automatic prune (`prune_if_due`): the commit's caller waits for one short
        transaction at most, never for a whole prune. A failing prune never fails the commit that
        ran it (the rest of its plan is dropped: the next prune plans again)."""
        if self._prune_steps or time.monotonic() >= self._prune_check_at:
            self._prune_check_at = time.monotonic() + 60.0
            try:
                self.prune_if_due()
            except (CoherenceError, OSError) as e:
                self._prune_steps = None
                log.warning("pruning old versions failed (the commit stands; the next prune retries): %s", e)

    def history(self, target: Target, limit: int | None = None) -> list[Version]:
        """`target`'s versions, newest first (a foreign change is synced first, so it is listed);
        the newest `limit` (>= 1) only, if given. A version is `retained` when the store keeps its
        bytes (`read_version`): never a deletion, which has none, nor a pruned version. Whether the
        bytes kept are intact is checked when they are read (DamagedContent), not here: that would
        read every version's bytes."""
        self._require_managed(target, "history", reads=True)
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise VolumeConfigError(f"a history limit is a number of versions >= 1, not {limit!r}")
        limit = None if limit is None else min(limit, MAX_VERSION)
        self._recorded_first(target)
        with self.registry.read() as tx:
            versions = tx.history(target.rel, limit)
        return [v if v.hash is not None else v._replace(retained=False) for v in versions]

    def _recorded_first(self, target: Target) -> None:
        """Before a read of `target`'s history: a foreign change recorded, so that its version is
        listed and can be read; a working copy that cannot install the current version there
        (`TreeClash`) reads the history the registry holds all the same."""
        try:
            self.version(target)
        except TreeClash:
            pass

    def version_entry(self, target: Target, version: int) -> Version | None:
        """The history entry of one version of `target` (None if it has no such version): whether
        a write's version was a merge, say."""
        return self._entries(target, version)[0]

    def read_version(self, target: Target, version: int) -> bytes:
        """The bytes of a retained version (no view is registered); VersionGone if it never existed,
        is a deletion, was pruned or never kept, DamagedContent if its stored bytes no longer match its hash."""
        self._require_managed(target, "read_version", reads=True)
        self._recorded_first(target)
        return self._stored(target, version, self._entries(target, version)[0])

    def _entries(self, target: Target, *versions: int) -> list[Version | None]:
        """History entries of `target`, in one registry read (None: no such version, also for a
        number no version can have); VolumeConfigError for a version that is not an int."""
        for v in versions:
            if not isinstance(v, int) or isinstance(v, bool):
                raise VolumeConfigError(f"a version is a whole number (0: before the path existed), not {v!r}")
        with self.registry.read() as tx:
            return [tx.version_entry(target.rel, v) if 0 < v <= MAX_VERSION else None for v in versions]

    def _stored(self, target: Target, version: int, entry: Version | None) -> bytes:
        """The retained bytes of `version` (whose history entry is `entry`): `read_version`'s errors."""
        digest, what = self._kept(target, version, entry)
        with self._kept_content(target, version, what), self.registry.read() as tx:
            return tx.load(digest, what)

    @contextmanager
    def _kept_content(self, target: Target, version: int, what: str) -> Iterator[None]:
        """Around a load of content whose history entry said it is retained: none stored under its
        hash is a prune since that entry was read (VersionGone) if the entry now says so, else
        damage (DamagedContent)."""
        try:
            yield
        except VersionGone as e:
            self._kept(target, version, self._entries(target, version)[0])  # VersionGone if pruned meanwhile
            raise DamagedContent(
                f"{what}: its history says its content is retained, but the content store holds none under its "
                "hash: the store is damaged (content removed outside the volume, or restored from an older "
                "backup); it is not served"
            ) from e

    @staticmethod
    def _kept(target: Target, version: int, entry: Version | None) -> tuple[str, str]:
        """The hash of `version`'s retained content (history entry `entry`) and how errors name it;
        VersionGone if it has none that is kept."""
        what = f"{target.rel!r} version {version}"
        if entry is None:
            raise VersionGone(f"{what} is not in its history (versions are numbered from 1)")
        if entry.hash is None:
            raise VersionGone(f"{what} is a deletion by {entry.writer!r}: it has no content")
        if entry.never_kept:
            raise VersionGone(
                f"{what}: its content was never kept (the file changed again while this version was being "
                "recorded, so no bytes holding it were left to keep)"
            )
        if not entry.retained:
            raise VersionGone(f"{what}: its content is not kept (pruned by the volume's retention policy)")
        return entry.hash, what

    def seen(self, agent: str, target: Target) -> int | None:
        """The version `agent` last read (its view) of `target`, if any."""
        with self.registry.read() as tx:
            return tx.view(agent, target.rel)

    def diff(self, target: Target, old: int, new: int) -> str | None:
        """The unified diff from version `old` to version `new` (0: before the path existed); None
        for binary content. VersionGone/DamagedContent as `read_version`."""
        self._require_managed(target, "diff", reads=True)
        self._recorded_first(target)
        return self._diff(target, old, new, self._entries(target, old, new))

    def _diff(self, target: Target, old: int, new: int, entries: list[Version | None]) -> str | None:
        """`diff`, given both versions' history entries; TooManyLines, before either is read, where
        one is larger than a line diff reads (`diffs.diffable`)."""
        for version, entry in zip((old, new), entries, strict=True):
            if entry is not None and not diffs.diffable(entry.size or 0):
                raise TooManyLines(
                    f"{target.rel!r} version {version} is {entry.size:,} bytes: more than a line diff reads "
                    f"({diffs.MAX_DIFF_BYTES >> 20} MiB)"
                )
        sides = []
        for version, entry in zip((old, new), entries, strict=True):
            gone = version == 0 or (entry is not None and entry.hash is None)  # nothing there: /dev/null
            sides.append(None if gone else self._stored(target, version, entry))
        return diffs.unified(sides[0], sides[1], f"{target.rel}@v{old}", f"{target.rel}@v{new}")

    def refusal_diff(self, refusal: StaleWriteError) -> StaleWriteError:
        """`refusal` with the diff from the version its agent read to the current one attached (cut
        to a readable size); none when it never read the file, the content is binary or too large
        to diff quickly (`diffs.small_enough`), or the base is no longer retained or damaged. When
        the version it names current was overtaken and pruned before its diff, the diff is to the
        current version, which the refusal then names (`reading_sides`; MERGE_ATTEMPTS times at most)."""
        base = refusal.based_on
        if base is None or base == refusal.current_version:
            return refusal
        target = self.paths.of_rel(refusal.path)
        for _ in range(MERGE_ATTEMPTS):
            entries = self._entries(target, base, refusal.current_version)
            if not diffs.small_enough(*(entry.size or 0 if entry is not None else 0 for entry in entries)):
                return refusal  # `coherent-volume diff` shows it, without a refusal waiting for it
            try:
                with self.reading_sides(target, refusal):
                    diff = self._diff(target, base, refusal.current_version, entries)
            except Overtaken as e:
                refusal = e.refusal
                continue
            except CoherenceError:
                return refusal
            return refusal.with_diff(None if diff is None else diffs.cut(diff))
        return refusal

    @contextmanager
    def reading_sides(self, target: Target, refusal: StaleWriteError) -> Iterator[None]:
        """Around the reads of the versions a refused write's diff or merge needs: a version gone
        (VersionGone) that is the one `refusal` named current, overtaken by a newer commit before
        it was pruned (`protocol.takes_current_again`), raises Overtaken with the refusal naming
        the current version instead; any other VersionGone (the base pruned) stands."""
        try:
            yield
        except VersionGone:
            with self.registry.read() as tx:
                named, record = tx.version_entry(target.rel, refusal.current_version), tx.file(target.rel)
            if not takes_current_again(named, current_version(record)):
                raise
            writer = None if record is None else record.writer
            raise Overtaken(refusal.naming_current(current_version(record), writer)) from None

    def write(
        self,
        agent: str,
        target: Target,
        data: bytes,
        *,
        isolation: Isolation = "file",
        merge: bool = False,
        expected: int | None = None,
    ) -> int:
        """A face's write of whole content: merged when a refusal allows it and `merge` asks for it
        or the volume's policy names the path (`write_merging`), else a plain commit; a refusal
        carries its diff. `expected`: the version `data` was built on, which must be current (a
        compare-and-swap, whatever the agent's view; a merge's base). The policy is read only once
        a write is refused (a write that goes through is the same commit either way)."""
        if target.managed and merge:
            return self.write_merging(agent, target, data, isolation, expected=expected)
        try:
            return self.commit(agent, target, data, isolation=isolation, expected=expected)
        except StaleWriteError as e:
            refusal = e
        if target.managed and self.policy().merges(target.rel):
            return self.write_merging(agent, target, data, isolation, refused=refusal)
        raise self.refusal_diff(refusal)

    def write_merging(
        self,
        agent: str,
        target: Target,
        data: bytes,
        isolation: Isolation = "file",
        refused: StaleWriteError | None = None,
        expected: int | None = None,
    ) -> int:
        """Commit `data`; if that is refused `stale` (only: `protocol.may_merge`) and the version the
        agent read is retained, commit instead the three-way line merge of it (base), `data` (ours)
        and the current version (theirs), as a version of kind `merge` whose parents are both
        (`merge_rounds`). A merge leaves the agent's view where it was (`protocol.view_moves`): it
        never read the result. Overlapping changes raise MergeConflict (with the hunks, also logged
        after the refusal as a `conflict` event), binary content, a side over
        `diffs.MAX_MERGE_BYTES` or a pruned base the stale refusal (with its diff); either way
        nothing changes. `refused`: the refusal `data` already got (and logged), so it is not tried
        again. `expected`: as for `write` (then the merge's base is that version, not the agent's
        view)."""
        refusal = refused
        if refusal is None:
            try:
                return self.commit(agent, target, data, isolation=isolation, expected=expected)
            except StaleWriteError as e:
                refusal = e

        def merge_onto(save: Refused, base: int | None) -> int | Refused:
            merged, parents = self._merged(target, save.refusal, save.ours, base)
            try:
                return self.commit(
                    agent, target, merged, isolation=isolation, expected=parents[1], made=("merge", parents)
                )
            except StaleWriteError as e:  # the merge's own compare-and-swap is no `expected` of the caller's
                return Refused(e if expected is not None else StaleWriteError(**e.facts()), data)

        return self.merge_rounds(Refused(refusal, data), merge_onto)

    def merge_rounds(self, refused: Refused, merge_onto: Callable[[Refused, int | None], _T | Refused]) -> _T:
        """The rounds of merging a refused write (`write_merging`, a save by rename, a hook's merge of
        a tool's change, `hook_merge`): `merge_onto(save, base)` merges `save` (a refusal and the
        bytes written) onto the version the refusal names current and commits it, returning what the
        commit returns, or the refusal it got (and the bytes written, as they are then): a `stale`
        one (another commit landed between the merge and its commit) is merged again, any other
        raised with its diff. The base is pinned to what the writer read, the first refusal's view:
        a later refusal is the compare-and-swap against the previous merge's theirs, whose view
        would take theirs' changes for ones the writer undid. At most MERGE_ATTEMPTS rounds; then
        the last refusal, with its diff, saying other commits kept landing between each merge and
        its commit. Nothing is changed by a round that is refused. A write whose writer had a write
        merged from the same base since is not merged (`protocol.merged_already`): refused `stale`,
        saying so."""
        base = refused.refusal.based_on
        if base is not None and may_merge(refused.refusal.reason, True):
            self._refuse_merged_already(refused.refusal, base)
        for _ in range(MERGE_ATTEMPTS):
            try:
                outcome = merge_onto(refused, base)
            except Overtaken as e:  # theirs was pruned once a newer commit overtook it: merge onto that one
                outcome = Refused(e.refusal, refused.ours)
            if not isinstance(outcome, Refused):
                return outcome
            if not may_merge(outcome.refusal.reason, True):
                raise self.refusal_diff(outcome.refusal)
            refused = outcome
        why = f"other commits landed between each of its {MERGE_ATTEMPTS} merges and that merge's commit"
        raise self.refusal_diff(refused.refusal.not_merged(why))

    def _refuse_merged_already(self, refusal: StaleWriteError, base: int) -> None:
        """Raise `refusal` (with its diff) if its writer had a write merged from `base` since
        (`protocol.merged_already`)."""
        with self.registry.read() as tx:  # every version after the base, however many landed since the refusal
            after_base = tx.history(refusal.path, max(current_version(tx.file(refusal.path)) - base, 0))
        merged = merged_already([v for v in after_base if v.version > base], refusal.agent)
        if merged is not None:
            why = (
                f"a change of yours made from version {base}, as this write was, was merged into version {merged} "
                f"already, and this write may hold it again: merged from version {base}, it would come back over "
                "what later commits did to it"
            )
            raise self.refusal_diff(refusal.not_merged(why))

    def _merged(
        self, target: Target, refusal: StaleWriteError, ours: bytes | None, base_version: int | None
    ) -> tuple[bytes, tuple[int, int]]:
        """The merge of a refused write (`merge_rounds`) of `ours` (None: a file saved that is not a
        regular file, or larger than a merge takes), built on `base_version`, and its parents (base,
        theirs); raises what the writer is told when there is none."""
        theirs_version = refusal.current_version
        if not may_merge(refusal.reason, True) or base_version is None:
            raise self.refusal_diff(refusal)
        base_entry, theirs_entry = self._entries(target, base_version, theirs_version)  # the refusal named both
        for entry, side in ((theirs_entry, "the current version"), (base_entry, "the version your write was built on")):
            if entry is not None and entry.hash is None:  # (a deletion: told so, not as a version unread)
                why = f"{side}, v{entry.version}, is a deletion by {entry.writer}: nothing is merged onto or from one"
                raise self.refusal_diff(refusal.not_merged(why))
        sizes = (entry.size or 0 for entry in (base_entry, theirs_entry) if entry is not None)
        if ours is None or not diffs.mergeable(len(ours), *sizes):
            limit = diffs.MAX_MERGE_BYTES >> 20
            side = "the file saved is not a regular file or is" if ours is None else "a side of the merge is"
            raise self.refusal_diff(refusal.not_merged(f"{side} larger than {limit} MiB"))
        try:
            with self.reading_sides(target, refusal):
                base = b"" if base_version == 0 else self._stored(target, base_version, base_entry)
                theirs = self._stored(target, theirs_version, theirs_entry)
        except CoherenceError as e:
            raise self.refusal_diff(refusal.not_merged(f"a version it needs cannot be read ({e})")) from None
        try:
            merged, conflicts = diffs.merge3(base, ours, theirs)
        except TooManyLines as e:
            raise self.refusal_diff(refusal.not_merged(e.what)) from None
        if conflicts:  # told with the hunks, and, as every refusal, what changed since its base
            labels = (f"{target.rel}@v{base_version}", f"{target.rel}@v{theirs_version}")
            changed = diffs.unified(base if base_version else None, theirs, *labels)
            conflict = MergeConflict(refusal, conflicts, base_version).with_diff(changed and diffs.cut(changed))
            self.log_conflict(conflict)
            raise conflict
        if merged is None:
            raise self.refusal_diff(refusal.not_merged("only text is merged, and a side is not text"))
        return merged, (base_version, theirs_version)

    def log_conflict(self, conflict: MergeConflict) -> None:
        """Log a merge conflict, wherever the merge was tried (a write's `merge`, a hook's, `hook_merge`)."""
        self._transact(partial(self._log_conflict, conflict=conflict))

    @staticmethod
    def _log_conflict(tx: Transaction, conflict: MergeConflict) -> None:
        """Log a merge conflict (its write's stale refusal is logged already) with its hunks, cut as
        a refusal's diff is (`diffs.cut`), so `why` can show what overlapped: the detail's first
        line says what conflicted, the hunks follow."""
        hunks = len(conflict.conflicts)
        tx.log(
            "conflict",
            conflict.path,
            conflict.agent,
            time.time(),
            seen_version=conflict.seen_version,
            version=conflict.current_version,
            detail=f"{hunks} conflicting hunk{'s' if hunks > 1 else ''} between the change of {conflict.agent} "
            f"(yours) and v{conflict.current_version} (current), both made from v{conflict.based_on}: "
            f"nothing was merged\n{diffs.cut(''.join(str(c) for c in conflict.conflicts))}",
        )

    def restore(self, agent: str, target: Target, version: int, *, isolation: Isolation) -> int:
        """Commit the bytes of `version` again as a new version (kind `restore`), with the checks
        of any write under `isolation` (StaleWriteError, with its diff, if `agent` is not current,
        or with read-set isolation if a file it read changed since); `read_version`'s
        errors. The bytes go from the store to the staged file a part at a time, never whole in
        memory (damaged ones are never staged: the check after the last part discards them)."""
        self._require_managed(target, "restore")
        target = self.paths.beneath(target)
        self.version(target)  # a foreign change is recorded first, so that its version can be restored
        digest, what = self._kept(target, version, self._entries(target, version)[0])

        def fill(write: Callable[[bytes], None]) -> None:
            with self._kept_content(target, version, what), self.registry.read() as tx:
                tx.load_into(digest, what, write)

        staged = atomic.stage_written(target.abs, digest, fill, root=self.paths.root)
        try:
            return self.commit(agent, target, staged, isolation=isolation, made=("restore", (version,)))
        except StaleWriteError as e:
            raise self.refusal_diff(e) from None
        finally:
            staged.discard()  # consumed by the commit, unless it refused before taking it

    # ---- policy and retention -----------------------------------------------------

    def policy(self) -> Policy:
        with self.registry.read() as tx:
            return Policy.from_json(tx.meta("policy"))

    def set_policy(self, policy: Policy) -> None:
        """Store `policy`; GlobError (nothing stored) if a merge glob can match no managed path.
        Holding the whole volume: writers read the policy with no lock, and a change is ordered
        after every decision under way (each decides under one policy)."""
        policy.check_merges(self.paths.globs)

        def change(tx: Transaction) -> None:
            tx.hold_all()
            tx.put_meta("policy", policy.to_json())

        self._transact(change)

    def forget_views(self, agent: str) -> int:
        """Forget every view of `agent`, an agent that will never act again (an MCP session's own
        random name once its client disconnected), so they pin no version against pruning; how
        many it had. Were it to write again, it would be refused `unread`, as any agent that never
        read the file."""

        def forget(tx: Transaction) -> int:
            tx.hold_agents([agent])
            return tx.drop_views(agent)

        return self._transact(forget)

    def prune(self) -> Pruned:
        """Drop the bytes of versions the retention policy no longer keeps (`policy.prunable`:
        never a current version, one a live agent's view points at, nor one of a path's last
        `keep_last`): older than `keep_days`, then, over `max_bytes`, the oldest others until the
        content fits. Planned from one read of the retained versions (no lock held), then done in
        short transactions (`_in_steps`), each checking again what it drops, PRUNE_PAUSE
        apart, so writers interleave with a long prune. Ages are judged on the registry's clock
        (`Transaction.now`: PostgreSQL's server clock), never this host's: a host whose clock runs
        ahead prunes nothing younger than `keep_days` on the registry's."""
        total = Pruned(0, 0, 0)
        steps = self._prune_plan()
        while steps:
            total = total.plus(self._prune_step(steps))
            if steps:
                time.sleep(PRUNE_PAUSE)  # the commit lock is free long enough for waiting writers to take it
        return total

    def _prune_plan(self) -> deque[Step]:
        """A prune's steps, oldest versions first: those older than `keep_days`, then the other
        candidates for `max_bytes` (none without one), in steps of `_in_steps`, as one read of the
        retained versions finds them."""
        retention = self.policy().retention
        old: list[Version] = []
        others: list[Version] = []
        with self.registry.read() as tx:
            older_than = tx.now() - retention.keep_days * DAY
            live: dict[str, bool] = {}
            for path in tx.history_paths():
                newest = _newest(tx, path, retention.keep_last)
                current = current_version(tx.file(path))
                kept = self._never_pruned(tx, path, retention, live)
                for v in prunable(tx.retained(path), newest, retention.keep_last, current, kept):
                    (old if v.at < older_than else others).append(v)
            over_budget = retention.max_bytes is not None and tx.retained_bytes() > retention.max_bytes
        steps: deque[Step] = deque()
        for aged, chosen in ((True, sorted(old, key=lambda v: v.at)), (False, sorted(others, key=lambda v: v.at))):
            if aged or over_budget:
                steps.extend(Step(aged, versions) for versions in _in_steps(chosen))
        return steps

    def _prune_step(self, steps: deque[Step]) -> Pruned:
        """Do the first of a prune's `steps` (`_prune_plan`) in one transaction: drop the bytes of
        each of its versions that the policy, as it is now, still lets go (its history entry
        unchanged since the plan; for a step of the byte budget only while the retained content
        exceeds `max_bytes`: once it fits, the steps left, all for the budget, are dropped too).
        Renews the volume's last prune (`pruned_at`), so a prune under way is not started again
        elsewhere. Nothing if another thread of this process took the last step meanwhile."""
        try:
            step = steps.popleft()
        except IndexError:
            return Pruned(0, 0, 0)

        def run(tx: Transaction) -> tuple[Pruned, bool]:
            retention = Policy.from_json(tx.meta("policy")).retention
            now = tx.now()
            tx.put_meta("pruned_at", repr(now))
            cap = None if step.aged else retention.max_bytes
            if not step.aged and cap is None:
                return Pruned(0, 0, 0), True  # the budget was lifted since the plan
            stored = tx.retained_bytes() if cap is not None else 0
            live: dict[str, bool] = {}
            facts: dict[str, tuple[list[Version], int, set[int]]] = {}
            versions = objects = freed = 0
            for v in step.versions:
                if cap is not None and stored <= cap:
                    return Pruned(versions, objects, freed), True
                if step.aged and v.at >= now - retention.keep_days * DAY:
                    continue
                if v.path not in facts:
                    current = current_version(tx.file(v.path))
                    facts[v.path] = (
                        _newest(tx, v.path, retention.keep_last),
                        current,
                        self._never_pruned(tx, v.path, retention, live),
                    )
                newest, current, kept = facts[v.path]
                if tx.version_entry(v.path, v.version) != v or not prunable(
                    [v], newest, retention.keep_last, current, kept
                ):
                    continue
                tx.prune(v.path, v.version)
                versions += 1
                if v.hash is not None and not tx.in_use(v.hash):
                    size = tx.drop(v.hash)
                    objects, freed, stored = objects + (1 if size else 0), freed + size, stored - size
            return Pruned(versions, objects, freed), cap is not None and stored <= cap

        done, fits = self._transact(run)
        if fits:
            steps.clear()  # the steps for the budget come last: no other is left
        return done

    @staticmethod
    def _never_pruned(tx: Transaction, path: str, retention: Retention, live: dict[str, bool]) -> set[int]:
        """The versions of `path` kept whatever their age: those the view of a live agent
        (`Retention.live`) points at, and those crash recovery recorded but could not install
        (`superseded`: the file changed outside the volume first; `displaced`: put back over by such
        a change), each the one copy of a commit its writer was told landed, which the log line
        says `restore` brings back. `live` holds what is known already of agents' liveness in `tx`
        (each agent's read once)."""
        kept = {
            e.version
            for e in tx.events(path=path, kind="recover")
            if e.reason in ("superseded", "displaced") and e.version is not None
        }
        for agent, version in tx.viewers(path).items():
            if agent not in live:
                live[agent] = retention.live(tx.last_view(agent), tx.now())
            if live[agent]:
                kept.add(version)
        return kept

    def prune_if_due(self) -> Pruned | None:
        """One step of a prune (`_in_steps`, one short transaction): the next of
        this process's prune under way, else, when the volume's last prune was PRUNE_EVERY seconds
        ago or more on the registry's clock, the first of a new one (planned now: `_prune_plan`),
        which this process claims, so volumes prune once at a time; its later steps are done by this
        process's next commits, each renewing the claim (a process that stops before the end leaves
        the rest to whichever process finds a prune due an hour after its last step). None if no
        prune was due. A last prune dated in the future (claimed on a host clock that ran ahead,
        before prunes were dated by the registry) is due."""

        def claim(tx: Transaction) -> bool:
            now, last = tx.now(), tx.meta("pruned_at")
            if last is not None and 0 <= now - float(last) < PRUNE_EVERY:
                return False
            tx.put_meta("pruned_at", repr(now))
            return True

        if not self._prune_steps:
            if not self._transact(claim):
                return None
            self._prune_steps = self._prune_plan()
            if not self._prune_steps:
                return Pruned(0, 0, 0)
        return self._prune_step(self._prune_steps)
