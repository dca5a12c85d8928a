"""The coherence protocol as pure decisions: no I/O, no clock, no registry.

Every face (Python API, FUSE mount, hooks) reaches these rules through `core.VolumeCore`;
none re-implements them. Inputs are plain records; outputs are decisions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple
from enum import Enum

from .errors import Reason
from .fingerprint import Fingerprint
from .liveness import ProcessId

EXTERNAL = "external"
"""Writer name recorded for changes made outside the volume (foreign writes)."""

RACY_NS = 100_000_000
"""A fingerprint taken this soon after the file's ctime cannot rule out a later same-tick write."""


class FileRecord(NamedTuple):
    """The committed state of one managed path. `present=False` is a tombstone (a deletion version)."""

    path: str
    version: int
    present: bool
    hash: str | None
    fingerprint: Fingerprint | None
    writer: str
    committed_at: float
    checked_ns: int
    """When `fingerprint` was last confirmed against the content (time.time_ns)."""


@dataclass(frozen=True)
class Grant:
    """An exclusive write grant on one path, held by `agent` on behalf of process `owner`."""

    path: str
    agent: str
    token: str
    owner: ProcessId
    expires_at: float
    fences: bool = True
    """A `lock()` grant fences its holder when reclaimed (the holder may still believe it holds
    it); a grant held by an open write handle does not: its commit is a CAS anyway."""


@dataclass(frozen=True)
class Intent:
    """A commit decided but not yet installed; completed or dropped by recovery after a crash."""

    path: str
    agent: str
    version: int
    present: bool
    hash: str | None
    tmp: str | None


# ---- disk versus record ---------------------------------------------------------------


class Disk(Enum):
    SAME = "same"  # content is the recorded content (stat may have moved: refresh it)
    CHANGED = "changed"  # a foreign write changed or created the file
    DELETED = "deleted"  # a foreign process removed the file


def needs_hash(record: FileRecord | None, fp: Fingerprint | None) -> bool:
    """Whether the stat fingerprint alone cannot tell that the disk holds the record's content."""
    if record is None or not record.present or fp is None:
        return False
    return fp != record.fingerprint or fp.ctime_ns + RACY_NS > record.checked_ns


def classify(record: FileRecord | None, fp: Fingerprint | None, disk_hash: str | None) -> Disk:
    """Compare the disk (fingerprint, and hash when `needs_hash` said so) with the record."""
    recorded = record is not None and record.present
    if fp is None:
        return Disk.DELETED if recorded else Disk.SAME
    if not recorded:
        return Disk.CHANGED
    assert record is not None
    if disk_hash is None:
        return Disk.SAME
    return Disk.SAME if disk_hash == record.hash else Disk.CHANGED


# ---- grants ---------------------------------------------------------------------------


def grant_over(grant: Grant, now: float, owner_alive: bool | None) -> bool:
    """A grant ends at its TTL or as soon as its owning process is known to be dead."""
    return now >= grant.expires_at or owner_alive is False


# ---- writes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WriteCheck:
    """Everything a write decision depends on, gathered under the commit lock."""

    agent: str
    current: FileRecord | None
    seen: int | None
    """The agent's view of this path; None if it never read it (or forgot it)."""
    holder: str | None
    """Agent holding a live write grant on the path, if any."""
    fenced: bool
    changed_read_set: tuple[str, ...] = ()
    """Other paths in the agent's read set that moved since it read them (read-set isolation)."""
    expected: int | None = None
    """write_cas: the version the caller based its write on."""


def current_version(record: FileRecord | None) -> int:
    return 0 if record is None else record.version


def decide_write(c: WriteCheck) -> Reason | None:
    """None if the write may be installed, else the reason it is refused.

    Precedence: fenced, held, then the version rule (CAS, or unread/stale), then read-set.
    A path that does not exist may be created without a prior read, unless the agent's view
    predates its deletion (a write built on content that is gone is stale).
    """
    if c.fenced:
        return "fenced"
    if c.holder is not None and c.holder != c.agent:
        return "held"
    version = current_version(c.current)
    exists = c.current is not None and c.current.present
    if c.expected is not None:
        if c.expected != version:
            return "stale"
    elif exists:
        if c.seen is None:
            return "unread"
        if c.seen != version:
            return "stale"
    elif c.seen is not None and c.seen != version:
        return "stale"
    if c.changed_read_set:
        return "read-set"
    return None


def changed_paths(read_set: dict[str, int], versions: dict[str, int], exclude: str) -> tuple[str, ...]:
    """Paths of `read_set` (path -> seen version) whose current version differs, except `exclude`."""
    return tuple(sorted(p for p, seen in read_set.items() if p != exclude and versions.get(p, 0) != seen))
