"""Every committed version kept: a path's history, a version's bytes, diffs between versions and
restoring an old version as a new commit."""

from __future__ import annotations

from .. import diffs
from ..errors import CoherenceError, StaleWriteError, VersionGone
from ..paths import Target
from ..protocol import Version
from .writes import Writes


class History(Writes):
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
        self.version(target)
        with self.registry.read() as tx:
            entry = tx.version_entry(target.rel, version)
        what = f"{target.rel!r} version {version}"
        if entry is None:
            raise VersionGone(f"{what} is not in its history (versions are numbered from 1)")
        if entry.hash is None:
            raise VersionGone(f"{what} is a deletion by {entry.writer!r}: it has no content")
        return self.registry.load(entry.hash, what)

    def seen(self, agent: str, target: Target) -> int | None:
        """The version `agent` last read (its view) of `target`, if any."""
        with self.registry.read() as tx:
            return tx.view(agent, target.rel)

    def _side(self, target: Target, version: int) -> tuple[bytes | None, str]:
        """A diff's side: the bytes of `version` (None for a deletion or version 0) and its label."""
        label = f"{target.rel}@v{version}"
        if version == 0:
            return None, label
        with self.registry.read() as tx:
            entry = tx.version_entry(target.rel, version)
        if entry is not None and entry.hash is None:
            return None, label
        return self.read_version(target, version), label

    def diff(self, target: Target, old: int, new: int) -> str | None:
        """The unified diff from version `old` to version `new` (0: before the path existed); None
        for binary content. VersionGone/DamagedContent as `read_version`."""
        a, a_label = self._side(target, old)
        b, b_label = self._side(target, new)
        return diffs.unified(a, b, a_label, b_label)

    def refusal_diff(self, refusal: StaleWriteError) -> StaleWriteError:
        """`refusal` with the diff from the version its agent read to the current one attached (cut
        to a readable size); none when it never read the file, the content is binary, or the base
        is no longer retained or damaged."""
        if refusal.seen_version is None or refusal.seen_version == refusal.current_version:
            return refusal
        target = self.paths.of_rel(refusal.path)
        try:
            diff = self.diff(target, refusal.seen_version, refusal.current_version)
        except CoherenceError:
            return refusal
        return refusal.with_diff(None if diff is None else diffs.cut(diff))

    def restore(self, agent: str, target: Target, version: int) -> int:
        """Commit the bytes of `version` again as a new version (kind `restore`), with the checks
        of any write (StaleWriteError, with its diff, if `agent` is not current)."""
        data = self.read_version(target, version)
        try:
            return self.commit(agent, target, data, made=("restore", (version,)))
        except StaleWriteError as e:
            raise self.refusal_diff(e) from None
