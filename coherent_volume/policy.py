"""A volume's policy, set at `init` and changeable later: which managed paths merge a stale write
instead of refusing it (merge globs, each one that managed paths may match: `Policy.check_merges`),
and how long versions' bytes are retained. Pure: no I/O.

Invariants: pruning never selects a current version, a version the view of a live agent points at
(its refusal diffs and merges need it as a base), nor one of the last `keep_last` versions of its
path that have bytes (a deletion has none). An agent is live while it registered a view (a read
that moved one, a commit) within the last `keep_days`, and at least within the last day
(`Retention.live`): the views of an agent that ended without saying so (a session never resumed)
stop pinning versions then, so a store used by many short sessions stays within its policy."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import GlobError, VolumeConfigError
from .globs import ManagedGlobs
from .protocol import Version

DAY = 86400.0
LIVE_AT_LEAST = DAY
"""An agent whose last view is younger than this is live, whatever `keep_days` says (with `keep_days`
0 its views still keep the bases of its refusal diffs while it works)."""
MAX_KEEP_DAYS = 1_000_000
"""Most days `keep_days` may say (about 2,700 years): a finite span that time arithmetic can hold."""
MAX_COUNT = 2**63 - 1
"""Most that `keep_last` and `max_bytes` may say: what a registry's integers hold."""


@dataclass(frozen=True)
class Retention:
    """Keep every version for `keep_days`, and at least the last `keep_last` of each path whatever
    their age; with `max_bytes`, prune older versions (oldest first, within the same floor) until
    the retained content fits."""

    keep_days: float = 30.0
    keep_last: int = 10
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_days", "keep_last", "max_bytes"):
            if isinstance(getattr(self, name), bool):  # (True is an int to Python, and no number of anything)
                raise VolumeConfigError(f"{name} must be a number, not {getattr(self, name)!r}")
        if not (isinstance(self.keep_days, (int, float)) and 0 <= self.keep_days <= MAX_KEEP_DAYS):
            raise VolumeConfigError(
                f"keep_days must be a number of days from 0 to {MAX_KEEP_DAYS:,}, not {self.keep_days!r}"
            )
        if not (isinstance(self.keep_last, int) and 1 <= self.keep_last <= MAX_COUNT):
            raise VolumeConfigError(f"keep_last must be an integer from 1 to {MAX_COUNT}, not {self.keep_last!r}")
        if self.max_bytes is not None and not (isinstance(self.max_bytes, int) and 0 <= self.max_bytes <= MAX_COUNT):
            raise VolumeConfigError(
                f"max_bytes must be an integer from 0 to {MAX_COUNT}, or None, not {self.max_bytes!r}"
            )

    def live(self, last_view: float | None, now: float) -> bool:
        """Whether an agent that last registered a view at `last_view` (None: it has none) is live
        at `now` (its views keep their versions from pruning): within `keep_days`, and at least
        within LIVE_AT_LEAST."""
        return last_view is not None and last_view >= now - max(self.keep_days * DAY, LIVE_AT_LEAST)


@dataclass(frozen=True)
class Policy:
    merge: tuple[str, ...] = ()
    """Globs of managed paths whose stale writes are merged (three-way, by line) when they can be."""
    retention: Retention = field(default_factory=Retention)

    def __post_init__(self) -> None:
        if isinstance(self.merge, str) or not all(isinstance(glob, str) for glob in self.merge):
            raise VolumeConfigError(f"merge must be a sequence of glob strings, not {self.merge!r}")
        if not isinstance(self.retention, Retention):
            raise VolumeConfigError(f"retention must be a coherent_volume.Retention, not {self.retention!r}")
        object.__setattr__(self, "_merge", ManagedGlobs.of(self.merge) if self.merge else None)

    def merges(self, rel: str) -> bool:
        globs: ManagedGlobs | None = self._merge  # type: ignore[attr-defined]
        return globs is not None and globs.matches(rel)

    def check_merges(self, managed: ManagedGlobs) -> None:
        """Refuse (GlobError) merge globs that no path of `managed` can match
        (`ManagedGlobs.may_share`): they would silently never apply."""
        never = [glob for glob in self.merge if not managed.may_share(glob)]
        if never:
            raise GlobError(
                f"merge glob{'s' if len(never) > 1 else ''} {', '.join(map(repr, never))} can match no managed "
                f"path (the volume manages {', '.join(map(repr, managed.patterns))}): a merge glob names managed "
                "files whose stale writes are merged, so it would never apply. The merge globs were not set: "
                "give ones that managed paths match, or none"
            )

    def to_json(self) -> str:
        r = self.retention
        return json.dumps(
            {
                "merge": list(self.merge),
                "retention": {"keep_days": r.keep_days, "keep_last": r.keep_last, "max_bytes": r.max_bytes},
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> Policy:
        if text is None:
            return cls()
        data = json.loads(text)
        return cls(tuple(data.get("merge", ())), Retention(**data.get("retention", {})))


def prunable(
    versions: list[Version], newest: list[Version], keep_last: int, current: int, kept: set[int]
) -> list[Version]:
    """Those of `versions` (of one path, in their order) whose bytes may be dropped: retained, not
    current, not kept whatever their age (`kept`: viewed by a live agent, or set aside by recovery
    and never installed), not among the path's last `keep_last` with bytes (`newest`: its history
    entries, newest first, back to its `keep_last`-th with bytes or all of them). A deletion has
    none and is not one of them: the content it removed stays restorable."""
    with_bytes = [v for v in newest if v.hash is not None]
    if len(with_bytes) < keep_last:
        return []  # the path has no more than its last keep_last versions
    floor = with_bytes[keep_last - 1].version
    return [
        v
        for v in versions
        if v.retained and v.hash is not None and v.version < floor and v.version != current and v.version not in kept
    ]
