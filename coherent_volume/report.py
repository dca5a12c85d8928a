"""What `status`, `log` and `why` show: plain data read from the registry, no presentation."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from .core import VolumeCore
from .errors import REMEDY
from .paths import Target, printable
from .protocol import grant_over
from .registry import AgentSummary, Event


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
class Status:
    root: str
    managed: tuple[str, ...]
    files: list[FileStatus]
    agents: list[AgentSummary]
    unchecked: list[Unchecked] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "root": self.root,
            "managed": list(self.managed),
            "files": [asdict(f) for f in self.files],
            "agents": [asdict(a) for a in self.agents],
            "unchecked": [asdict(u) for u in self.unchecked],
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
    return Status(core.paths.root, core.paths.globs.patterns, files, agents, unchecked)


def events(core: VolumeCore, after: int = 0, limit: int | None = None) -> list[Event]:
    with core.registry.read() as tx:
        if limit is None:
            return tx.events(after=after)
        return list(reversed(tx.events(after=after, limit=limit, newest_first=True)))


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
    changes: list[Event]
    """Commits, deletions and foreign writes after the version the refused agent had read."""
    advice: str

    def as_json(self) -> dict[str, object]:
        return asdict(self)


def why(core: VolumeCore, target: Target) -> Why:
    """The last refusal on `target`, who changed the file since the refused agent's view, and what to do."""
    if target.managed:
        core.version(target)  # records a foreign change first, so the answer is current
    now = time.time()
    with core.registry.read() as tx:
        record = tx.file(target.rel)
        grant = tx.grant(target.rel)
        holder = grant.agent if grant and not grant_over(grant, now, grant.owner.alive()) else None
        found = tx.events(path=target.rel, kind="refusal", limit=1, newest_first=True)
        refusal = found[0] if found else None
        changes = [
            e
            for e in tx.events(path=target.rel)
            if e.kind in ("commit", "delete", "foreign", "adopt", "recover")
            and refusal is not None
            and (e.version or 0) > (refusal.seen_version or 0)
        ]
    if not target.managed:
        advice = "this path is not managed: writes to it are never refused"
    elif refusal is None:
        advice = "no write to this file has been refused"
    else:
        advice = f"agent {refusal.agent}: {REMEDY[refusal.reason or 'stale']}"
    return Why(
        target.rel,
        target.managed,
        record.version if record else 0,
        bool(record and record.present),
        record.writer if record else None,
        record.committed_at if record else None,
        holder,
        refusal,
        changes,
        advice,
    )
