"""What `status`, `log` and `why` show: plain data read from the registry and the content store,
no presentation."""

from __future__ import annotations

import os
import socket
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from . import diffs
from .core import VolumeCore
from .core.history import MAX_VERSION
from .errors import DamagedContent, TooManyLines, VersionGone, VolumeConfigError, remedy
from .fingerprint import kind_of
from .mounts import daemon_gone, direct_dir_in, mounts_of
from .paths import Target, printable, shown
from .protocol import Version, grant_over
from .registry import AgentSummary, Event, LogMark, Transaction

if TYPE_CHECKING:  # (the PostgreSQL backend's modules are loaded where one is used: not by the hooks)
    from .registry.pg_hosts import WorkingCopy


@dataclass(frozen=True)
class FileStatus:
    path: str
    version: int
    present: bool
    writer: str
    committed_at: float | None
    holder: str | None
    holder_expires_at: float | None


@dataclass(frozen=True)
class Unchecked:
    """A managed-looking file `status` could not bring in step with the registry, and why."""

    path: str
    """Printable: bytes that are not UTF-8 appear as \\xNN escapes."""
    problem: str


@dataclass(frozen=True)
class StoreSize:
    """The content store: stored contents (each distinct content once) and their bytes."""

    objects: int
    bytes: int


@dataclass(frozen=True)
class Status:
    root: str
    managed: tuple[str, ...]
    files: list[FileStatus]
    agents: list[AgentSummary]
    unchecked: list[Unchecked] = field(default_factory=list)
    store: StoreSize | None = None
    """None when the registry backend cannot tell."""
    mounts: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Where the volume is mounted in this mount namespace, with each mount's direct dirs."""
    gone: tuple[str, ...] = ()
    """Those of `mounts` whose daemon is gone (killed): every use there fails until it is unmounted."""

    def as_json(self) -> dict[str, object]:
        return {
            "root": self.root,
            "managed": list(self.managed),
            "files": [asdict(f) for f in self.files],
            "agents": [asdict(a) for a in self.agents],
            "unchecked": [asdict(u) for u in self.unchecked],
            "store": None if self.store is None else asdict(self.store),
            "mounts": {mountpoint: list(direct) for mountpoint, direct in self.mounts.items()},
            "mounts_gone": list(self.gone),
        }


def scan(core: VolumeCore) -> list[Unchecked]:
    """Bring the registry in step with the tree (`VolumeCore.scan`); the files it could not check."""
    return sorted((Unchecked(printable(rel), why) for rel, why in core.scan()), key=lambda u: u.path)


def status(core: VolumeCore) -> Status:
    """Every recorded managed file with its live grant holder, every agent's stale-view count, and
    the managed-looking files that could not be checked (see `scan`)."""
    unchecked = scan(core)
    now = time.time()
    with core.registry.read() as tx:
        grants = {g.path: g for g in tx.grants() if not grant_over(g, now, g.owner.alive())}
        records = {r.path: r for r in tx.files()}
        agents = tx.agents()
    files = []
    for path in sorted(records.keys() | grants.keys()):
        r, g = records.get(path), grants.get(path)
        files.append(
            FileStatus(
                path,
                r.version if r else 0,
                bool(r and r.present),
                r.writer if r else "-",
                r.committed_at if r else None,
                g.agent if g else None,
                g.expires_at if g else None,
            )
        )
    mounts = mounts_of(core.paths.root)
    return Status(
        core.paths.root,
        core.paths.globs.patterns,
        files,
        agents,
        unchecked,
        store_size(core),
        mounts,
        tuple(mountpoint for mountpoint in mounts if daemon_gone(mountpoint)),
    )


@dataclass(frozen=True)
class Hosts:
    """The working copies of a volume (`status --hosts`)."""

    root: str
    registry: str
    """Where the registry is."""
    copies: list[WorkingCopy]

    def as_json(self) -> dict[str, object]:
        return {"root": self.root, "registry": self.registry, "copies": [asdict(c) for c in self.copies]}


def hosts(core: VolumeCore) -> Hosts:
    """Every working copy of the volume: how far behind it is, when it was last seen. A SQLite
    volume has one, its root (the registry is in it), never behind; nothing is checked or changed."""
    from .registry.pg_hosts import WorkingCopy
    from .registry.pg_open import boot_id
    from .registry.postgresql import PostgresRegistry

    registry = core.registry
    if isinstance(registry, PostgresRegistry):
        return Hosts(core.paths.root, registry.location.describe(), registry.working_copies())
    this = WorkingCopy(None, socket.gethostname(), core.paths.root, boot_id(), True, time.time(), 0.0, 0, None, None)
    return Hosts(core.paths.root, "SQLite, in the root: the volume has this one working copy", [this])


def forget(core: VolumeCore, copy: str) -> WorkingCopy:
    """Remove the registration of another working copy of a PostgreSQL volume (the copy whose id
    starts with `copy`, unseen for long); the copy removed."""
    from .registry.postgresql import PostgresRegistry

    registry = core.registry
    if not isinstance(registry, PostgresRegistry):
        raise VolumeConfigError(
            "a SQLite volume has one working copy, its root, and no registrations to forget. Nothing was changed"
        )
    return registry.forget_copy(copy)


def store_size(core: VolumeCore) -> StoreSize:
    """The size of the volume's content store."""
    with core.registry.read() as tx:
        return StoreSize(*tx.stored())


@dataclass(frozen=True)
class LogLine:
    """One line of the log as `log` and `why` show it: `event`, named `kind` (an agent's commit by
    the kind of the version it made, as `history` names it: commit, merge or restore; any other
    event by its own kind), with the `parents` that version was made from (a merge's base and
    theirs, a restore's version; else none)."""

    event: Event
    kind: str
    parents: tuple[int, ...] = ()

    def as_json(self) -> dict[str, object]:
        return {**asdict(self.event), "kind": self.kind, "parents": list(self.parents)}


def _lines(tx: Transaction, events: list[Event]) -> list[LogLine]:
    """`events` as log lines: each commit named by its version's history entry."""
    lines = []
    for e in events:
        entry = None
        if e.kind == "commit" and e.path is not None and e.version is not None:
            entry = tx.version_entry(e.path, e.version)
        lines.append(LogLine(e, e.kind) if entry is None else LogLine(e, entry.kind, entry.parents))
    return lines


def events(core: VolumeCore, limit: int | None = None) -> tuple[list[LogLine], LogMark]:
    """The log, oldest first: the newest `limit` lines only, if given (a limit past what a registry
    can number, `MAX_VERSION`, is none); and the mark past every line there is (`events_since`)."""
    with core.registry.read() as tx:
        if limit is None or limit > MAX_VERSION:
            found = tx.events()
        else:
            found = list(reversed(tx.events(limit=limit, newest_first=True)))
        return _lines(tx, found), tx.log_mark()


def events_since(core: VolumeCore, mark: LogMark) -> tuple[list[LogLine], LogMark]:
    """The lines committed since `mark`, each once (`Transaction.events_since`); the mark past them."""
    with core.registry.read() as tx:
        found, mark = tx.events_since(mark)
        return _lines(tx, found), mark


def made_version(e: Event) -> bool:
    """Whether `e` records a new version of its path (`e.version`): a commit, deletion, foreign
    change, first sighting or crash-completed commit."""
    if e.path is None or e.version is None:
        return False
    return e.kind in ("commit", "delete", "foreign", "adopt") or (e.kind == "recover" and e.reason == "completed")


def unkept(v: Version) -> str | None:
    """Why a version that has bytes lists none (None: they are kept, or it is a deletion)."""
    if v.retained or v.hash is None:
        return None
    return "never kept" if v.never_kept else "pruned"


@dataclass(frozen=True)
class VersionDiff:
    """The unified diff from version `old` to version `new` of a path, or why there is none."""

    old: int
    new: int
    diff: str | None
    """None when it cannot be shown: `note` says why (binary content, a version not retained)."""
    note: str | None = None


def version_diff(core: VolumeCore, target: Target, old: int, new: int) -> VersionDiff:
    """`VolumeCore.diff` of two versions; a version that is not retained (or is damaged) and binary
    content are a note, not an error."""
    try:
        diff = core.diff(target, old, new)
    except (VersionGone, DamagedContent, TooManyLines) as e:
        return VersionDiff(old, new, None, f"no diff: {e}")
    if diff is None:
        return VersionDiff(old, new, None, "binary content: no line diff")
    return VersionDiff(old, new, diff)


def commit_diff(core: VolumeCore, line: LogLine) -> VersionDiff | None:
    """For a log line whose event made a version (`made_version`), the diff against the version
    before it; None for any other event."""
    e = line.event
    if not made_version(e):
        return None
    assert e.path is not None and e.version is not None
    return version_diff(core, core.paths.of_rel(e.path), e.version - 1, e.version)


def occupant(target: Target) -> str | None:
    """What is at a managed path when it is neither a regular file nor a symlink (a FIFO, a socket, a
    device, a directory), which holds no version; None otherwise."""
    try:
        mode = os.lstat(target.abs).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISLNK(mode) else kind_of(mode)


def never_recorded(target: Target) -> VersionGone:
    """What `history` and `diff` say of a managed path that has no version at all."""
    there = occupant(target)
    if there is not None:
        return VersionGone(f"{target.rel!r} has no versions: it is {there}, and only regular files have versions")
    return VersionGone(
        f"{target.rel!r} has no versions: no file of that name was ever recorded in this volume (a deleted "
        "file keeps its versions); check the path (status lists the managed files)"
    )


@dataclass(frozen=True)
class Why:
    path: str
    managed: bool
    version: int
    present: bool
    writer: str | None
    committed_at: float | None
    holder: str | None
    refusal: Event | None
    changes: list[LogLine]
    """The newest WHY_CHANGES commits, deletions and foreign writes after the version the refused
    agent had read, oldest first."""
    earlier_changes: int
    """How many such changes came before those (not listed: `history` lists every version)."""
    advice: str
    diff: str | None = None
    """From the refused agent's view to the current version, cut like a refusal's (`diffs.cut`);
    empty when nothing changed since, None when there is none (`diff_note` says why)."""
    diff_note: str | None = None
    conflict: str | None = None
    """When the refused write was to be merged and overlapped the current version: what conflicted,
    then the conflicting hunks, cut like the diff (the `conflict` event logged after the refusal)."""
    occupant: str | None = None
    """What is at the path when it is not a regular file (`occupant`): it holds no version."""

    def state(self, version: str) -> str:
        """The path's state for people: managed or not, its current version (`version` names it:
        "v", "version "), deleted, or never recorded."""
        if not self.managed:
            return "not managed: it has no versions"
        if self.version == 0:
            return "managed, never existed: no version of it was ever recorded"
        return f"managed, current {version}{self.version}" + ("" if self.present else " (deleted)")

    def occupied(self) -> str:
        """What ends the line of the path's state when it is not a regular file (`occupant`)."""
        return f"; it is {self.occupant} now, not a regular file" if self.occupant else ""

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "changes": [line.as_json() for line in self.changes]}


def _direct_dir_advice(root: str, rel: str) -> str | None:
    """What to do about `rel` when a mount of the volume refuses to rename or remove it (EBUSY): it is
    a direct dir of that mount, or holds one (`mounts.direct_dir_in`); None otherwise."""
    for mountpoint, dirs in mounts_of(root).items():
        held = direct_dir_in(rel, dirs)
        name, there, top = shown(rel), shown(mountpoint), shown(root)
        if held == rel:
            return (
                f"{name} is a direct dir of the mount at {there} (mount --direct): the kernel serves it, bound "
                'over the mount, so it cannot be renamed, removed or replaced by a rename (EBUSY, "Device or resource '
                f'busy"). To empty it, remove what is in it (rm -rf {name}/*); to rename or remove it, unmount the '
                f"volume (coherent-volume unmount {there}), change it in {top}, and mount the volume again"
            )
        if held is not None:
            return (
                f"{name} holds {shown(held)}, a direct dir of the mount at {there} (mount --direct): it "
                "cannot be renamed "
                'or replaced by a rename (EBUSY, "Device or resource busy"): the direct dir\'s bind would move along, '
                f"served past the daemon wherever it lands; nor can it be removed while {shown(held)} is in "
                "it. To rename it, "
                f"unmount the volume (coherent-volume unmount {there}), rename it in {top}, and mount the "
                f"volume again (its --direct at the new place)"
            )
    return None


WHY_CHANGES = 20
"""Changes since a refused agent's view that `why` lists (a view 10,000 versions old listed all)."""


def why(core: VolumeCore, target: Target) -> Why:
    """The last refusal on `target`, who changed the file since the refused agent's view (and the
    diff of what changed), and what to do."""
    if target.managed:
        core.version(target)  # records a foreign change first, so the answer is current
    now = time.time()
    with core.registry.read() as tx:
        record = tx.file(target.rel)
        grant = tx.grant(target.rel)
        holder = grant.agent if grant and not grant_over(grant, now, grant.owner.alive()) else None
        found = tx.events(path=target.rel, kind="refusal", limit=1, newest_first=True)
        refusal = found[0] if found else None
        since = [
            e
            for e in tx.events(path=target.rel)
            if made_version(e) and refusal is not None and (e.version or 0) > (refusal.seen_version or 0)
        ]
        changes = _lines(tx, since[-WHY_CHANGES:])
        conflict = None
        refused_deletion = False
        if refusal is not None:
            refused_at = tx.version_entry(target.rel, refusal.version or 0)
            refused_deletion = refused_at is not None and refused_at.hash is None
            conflict = next(
                (
                    e.detail
                    for e in tx.events(after=refusal.seq, path=target.rel, kind="conflict")
                    if (e.agent, e.seen_version, e.version) == (refusal.agent, refusal.seen_version, refusal.version)
                ),
                None,
            )
    current = record.version if record else 0
    diff = note = None
    if not target.managed:
        advice = (
            _direct_dir_advice(core.paths.root, target.rel)
            or "this path is not managed: writes to it are never refused"
        )
    elif refusal is None:
        advice = "no write to this file has been refused"
    else:
        advice = f"agent {refusal.agent}: {remedy(refusal.reason or 'stale', refused_deletion)}"
        if refusal.seen_version is None:
            note = f"agent {refusal.agent} had not read the file: there is no view to compare with"
        else:
            shown = version_diff(core, target, refusal.seen_version, current)
            diff, note = (None if shown.diff is None else diffs.cut(shown.diff)), shown.note
    return Why(
        target.rel,
        target.managed,
        current,
        bool(record and record.present),
        record.writer if record else None,
        record.committed_at if record else None,
        holder,
        refusal,
        changes,
        len(since) - len(changes),
        advice,
        diff,
        note,
        conflict,
        occupant(target) if target.managed else None,
    )
