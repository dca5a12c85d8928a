"""Every committed version kept: a path's history, a version's bytes, diffs between versions and
restoring an old version as a new commit."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from .. import diffs
from ..errors import CoherenceError, MergeConflict, StaleWriteError, VersionGone
from ..paths import Target
from ..policy import DAY, Policy, prunable
from ..protocol import Version, current_version, may_merge
from ..registry import Transaction
from .base import Isolation
from .writes import Writes

log = logging.getLogger(__name__)

MERGE_ATTEMPTS = 8
"""Merges of one write tried while other commits keep landing between a merge and its commit."""
PRUNE_EVERY = 3600.0
"""Seconds between automatic prunes of a volume (run by a commit that finds one due)."""
SWEEP_AFTER = 3600.0
"""Age (seconds) after which a prune removes stored content nothing names (left by a killed writer)."""
PRUNE_BATCH = 500
"""Most versions an automatic prune drops at once, so the commit that runs it is not held up long."""


@dataclass(frozen=True)
class Pruned:
    """What a prune did: versions whose bytes it dropped, objects removed and bytes freed."""

    versions: int
    objects: int
    bytes: int


class History(Writes):
    _prune_check_at = 0.0
    """time.monotonic() after which a commit of this process looks whether a prune is due."""

    def _committed(self) -> None:
        """At most once a minute per process, a prune if one is due (`prune_if_due`); a failing
        prune never fails the commit that ran it."""
        if time.monotonic() >= self._prune_check_at:
            self._prune_check_at = time.monotonic() + 60.0
            try:
                self.prune_if_due()
            except (CoherenceError, OSError) as e:
                log.warning("pruning old versions failed (the commit stands; the next prune retries): %s", e)

    def history(self, target: Target, limit: int | None = None) -> list[Version]:
        """`target`'s versions, newest first (a foreign change is synced first, so it is listed)."""
        self._require_managed(target, "history")
        self.version(target)
        with self.registry.read() as tx:
            return tx.history(target.rel, limit)

    def read_version(self, target: Target, version: int) -> bytes:
        """The bytes of a retained version (no view is registered); VersionGone if it never existed,
        is a deletion or was pruned, DamagedContent if its stored bytes no longer match its hash."""
        self._require_managed(target, "read_version")
        self.version(target)  # a foreign change is recorded first, so that its version can be read
        return self._stored(target, version, self._entries(target, version)[0])

    def _entries(self, target: Target, *versions: int) -> list[Version | None]:
        """History entries of `target`, in one registry read (None: no such version)."""
        with self.registry.read() as tx:
            return [tx.version_entry(target.rel, v) for v in versions]

    def _stored(self, target: Target, version: int, entry: Version | None) -> bytes:
        """The retained bytes of `version` (whose history entry is `entry`): `read_version`'s errors."""
        what = f"{target.rel!r} version {version}"
        if entry is None:
            raise VersionGone(f"{what} is not in its history (versions are numbered from 1)")
        if entry.hash is None:
            raise VersionGone(f"{what} is a deletion by {entry.writer!r}: it has no content")
        if not entry.retained:
            raise VersionGone(
                f"{what}: its content is not kept (pruned by the volume's retention policy, or it changed "
                "again while it was being recorded)"
            )
        return self.registry.load(entry.hash, what)

    def seen(self, agent: str, target: Target) -> int | None:
        """The version `agent` last read (its view) of `target`, if any."""
        with self.registry.read() as tx:
            return tx.view(agent, target.rel)

    def diff(self, target: Target, old: int, new: int) -> str | None:
        """The unified diff from version `old` to version `new` (0: before the path existed); None
        for binary content. VersionGone/DamagedContent as `read_version`."""
        self._require_managed(target, "diff")
        self.version(target)  # a foreign change is recorded first, so that its version can be diffed
        return self._diff(target, old, new, self._entries(target, old, new))

    def _diff(self, target: Target, old: int, new: int, entries: list[Version | None]) -> str | None:
        """`diff`, given both versions' history entries."""
        sides = []
        for version, entry in zip((old, new), entries, strict=True):
            gone = version == 0 or (entry is not None and entry.hash is None)  # nothing there: /dev/null
            sides.append(None if gone else self._stored(target, version, entry))
        return diffs.unified(sides[0], sides[1], f"{target.rel}@v{old}", f"{target.rel}@v{new}")

    def refusal_diff(self, refusal: StaleWriteError) -> StaleWriteError:
        """`refusal` with the diff from the version its agent read to the current one attached (cut
        to a readable size); none when it never read the file, the content is binary or too large
        to diff quickly (`diffs.small_enough`), or the base is no longer retained or damaged."""
        if refusal.seen_version is None or refusal.seen_version == refusal.current_version:
            return refusal
        target = self.paths.of_rel(refusal.path)
        entries = self._entries(target, refusal.seen_version, refusal.current_version)
        if not diffs.small_enough(*(entry.size or 0 if entry is not None else 0 for entry in entries)):
            return refusal  # `coherent-volume diff` shows it, without a refusal waiting for it
        try:
            diff = self._diff(target, refusal.seen_version, refusal.current_version, entries)
        except CoherenceError:
            return refusal
        return refusal.with_diff(None if diff is None else diffs.cut(diff))

    def write(
        self, agent: str, target: Target, data: bytes, *, isolation: Isolation = "file", merge: bool = False
    ) -> int:
        """A face's write of whole content: merged when a refusal allows it and `merge` asks for it
        or the volume's policy names the path (`write_merging`), else a plain commit; a refusal
        carries its diff."""
        if target.managed and (merge or self.policy().merges(target.rel)):
            return self.write_merging(agent, target, data, isolation)
        try:
            return self.commit(agent, target, data, isolation=isolation)
        except StaleWriteError as refusal:
            raise self.refusal_diff(refusal) from None

    def write_merging(
        self,
        agent: str,
        target: Target,
        data: bytes,
        isolation: Isolation = "file",
        refused: StaleWriteError | None = None,
    ) -> int:
        """Commit `data`; if that is refused `stale` (only: `protocol.may_merge`) and the version the
        agent read is retained, commit instead the three-way line merge of it (base), `data` (ours)
        and the current version (theirs), as a version of kind `merge` whose parents are both. A
        merge leaves the agent's view where it was (`protocol.view_moves`): it never read the
        result. Overlapping changes raise MergeConflict (with the hunks), binary content or a pruned
        base the stale refusal (with its diff); either way nothing changes. `refused`: the refusal
        `data` already got (and logged), so it is not tried again."""
        refusal = refused
        if refusal is None:
            try:
                return self.commit(agent, target, data, isolation=isolation)
            except StaleWriteError as e:
                refusal = e
        for _ in range(MERGE_ATTEMPTS):
            merged, parents = self._merged(target, refusal, data)
            try:
                return self.commit(
                    agent, target, merged, isolation=isolation, expected=parents[1], made=("merge", parents)
                )
            except StaleWriteError as e:
                if e.reason != "stale":
                    raise self.refusal_diff(e) from None
                refusal = e  # another commit landed between the merge and its commit: merge onto it
        raise self.refusal_diff(refusal)

    def _merged(self, target: Target, refusal: StaleWriteError, ours: bytes) -> tuple[bytes, tuple[int, int]]:
        """The merge `write_merging` commits for a refused write, and its parents (base, theirs);
        raises what the writer is told when there is none."""
        if not may_merge(refusal.reason, True) or refusal.seen_version is None:
            raise self.refusal_diff(refusal)
        base_version, theirs_version = refusal.seen_version, refusal.current_version
        try:  # both versions are recorded already: the refusal named them
            base_entry, theirs_entry = self._entries(target, base_version, theirs_version)
            base = b"" if base_version == 0 else self._stored(target, base_version, base_entry)
            theirs = self._stored(target, theirs_version, theirs_entry)
        except CoherenceError:
            raise self.refusal_diff(refusal) from None
        merged, conflicts = diffs.merge3(base, ours, theirs)
        if conflicts:
            raise MergeConflict(refusal, conflicts)
        if merged is None:
            raise self.refusal_diff(refusal)
        return merged, (base_version, theirs_version)

    def restore(self, agent: str, target: Target, version: int) -> int:
        """Commit the bytes of `version` again as a new version (kind `restore`), with the checks
        of any write (StaleWriteError, with its diff, if `agent` is not current)."""
        data = self.read_version(target, version)
        try:
            return self.commit(agent, target, data, made=("restore", (version,)))
        except StaleWriteError as e:
            raise self.refusal_diff(e) from None

    # ---- policy and retention -----------------------------------------------------

    def policy(self) -> Policy:
        with self.registry.read() as tx:
            return Policy.from_json(tx.meta("policy"))

    def set_policy(self, policy: Policy) -> None:
        self._transact(lambda tx: tx.put_meta("policy", policy.to_json()))

    def prune(self, now: float | None = None, limit: int | None = None) -> Pruned:
        """Drop the bytes of versions the retention policy no longer keeps (`policy.prunable`:
        never a current or viewed version, nor one of a path's last `keep_last`): older than
        `keep_days`, then, over `max_bytes`, the oldest others until the content fits. Each path is
        decided in its own short transaction and objects are removed under the commit lock only
        once nothing names them, so writers are never held up for long. At most `limit` versions."""
        now = time.time() if now is None else now
        retention = self.policy().retention
        with self.registry.read() as tx:
            paths = tx.history_paths()
        budget = limit if limit is not None else -1
        versions = objects = freed = 0
        older_than = now - retention.keep_days * DAY

        def candidates(tx: Transaction, path: str) -> list[Version]:
            current = current_version(tx.file(path))
            return prunable(tx.history(path), current, tx.viewed(path), retention.keep_last)

        def prune_path(path: str, choose: str) -> list[str]:
            def decide(tx: Transaction) -> list[str]:
                chosen = [v for v in candidates(tx, path) if choose == "all" or v.at < older_than]
                if budget >= 0:
                    chosen = chosen[: max(budget - versions, 0)]
                for v in chosen:
                    tx.prune(path, v.version)
                return [v.hash for v in chosen if v.hash is not None]

            return self._transact(decide)

        def drop(hashes: list[str]) -> None:
            nonlocal objects, freed
            with self.registry.commit_lock():
                with self.registry.read() as tx:
                    unused = [h for h in set(hashes) if not tx.in_use(h)]
                for digest in unused:
                    size = self.registry.drop(digest)
                    objects += 1 if size else 0
                    freed += size

        for path in paths:
            if budget >= 0 and versions >= budget:
                break
            hashes = prune_path(path, "old")
            versions += len(hashes)
            drop(hashes)
        if retention.max_bytes is not None:
            cap = retention.max_bytes
            with self.registry.read() as tx:
                oldest = sorted((v for path in paths for v in candidates(tx, path)), key=lambda v: v.at)
            for v in oldest:
                if budget >= 0 and versions >= budget:
                    break

                def one(tx: Transaction, v: Version = v) -> bool | None:
                    """None: the content fits; False: `v` may no longer be pruned."""
                    if tx.retained_bytes() <= cap:
                        return None
                    if v not in candidates(tx, v.path):
                        return False
                    tx.prune(v.path, v.version)
                    return True

                outcome = self._transact(one)
                if outcome is None:
                    break
                if outcome and v.hash is not None:
                    versions += 1
                    drop([v.hash])
        # what killed writers left unnamed, an hour old or more
        with self.registry.commit_lock(), self.registry.read() as tx:
            freed += self.registry.sweep(now - SWEEP_AFTER, tx.in_use)
        return Pruned(versions, objects, freed)

    def prune_if_due(self, now: float | None = None) -> Pruned | None:
        """Prune (at most PRUNE_BATCH versions) when the volume's last prune was PRUNE_EVERY seconds
        ago or more; the first process to find it due claims it, so volumes prune once at a time."""
        now = time.time() if now is None else now

        def claim(tx: Transaction) -> bool:
            last = tx.meta("pruned_at")
            if last is not None and now - float(last) < PRUNE_EVERY:
                return False
            tx.put_meta("pruned_at", repr(now))
            return True

        if not self._transact(claim):
            return None
        return self.prune(now, PRUNE_BATCH)
