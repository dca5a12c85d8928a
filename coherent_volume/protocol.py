"""The coherence protocol as pure decisions: no I/O, no clock, no registry.

Every face (Python API, FUSE mount, hooks) reaches these rules through `core.VolumeCore`;
none re-implements them. Inputs are plain records; outputs are decisions.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import Literal, NamedTuple

from .errors import Reason
from .fingerprint import Fingerprint
from .liveness import ProcessId

EXTERNAL = "external"
"""Writer name recorded for changes made outside the volume (foreign writes)."""

ENV_AGENT = "COHERENT_AGENT"
"""The environment variable that names a process's agent, for every face."""

AGENT_NAME_MAX = 200


def agent_name_problem(name: object) -> str | None:
    """Why `name` cannot be an agent's name, or None if it can: 1 to 200 printable characters, with
    no white space at either end (a name shown in a table looks like the one without it), never the
    name reserved for foreign writes, in any case."""
    if not isinstance(name, str) or not name or len(name) > AGENT_NAME_MAX or not name.isprintable():
        return f"agent name {name!r} must be 1 to {AGENT_NAME_MAX} printable characters"
    if name != name.strip():
        return f"agent name {name!r} must not begin or end with white space (tables show it as the name without)"
    if name.casefold() == EXTERNAL.casefold():
        return f"agent name {name!r} is reserved for changes made outside the volume"
    return None


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
    """A commit decided but not yet known to be installed; settled by the next write transaction's
    recovery (`recovery`). A commit of content is recorded with its intent and leaves it behind
    until then; `tmp` names its staged file, the marker of an install not yet done."""

    path: str
    agent: str
    version: int
    present: bool
    hash: str | None
    tmp: str | None


VersionKind = Literal["commit", "foreign", "delete", "restore", "merge"]
"""How a version came to be: an agent's commit (or deletion), a change made outside the volume
(`foreign`, by EXTERNAL; a deletion outside is a `delete` by EXTERNAL), an old version's bytes
committed again (`restore`), or a three-way merge (`merge`)."""


class Version(NamedTuple):
    """One entry of a managed path's history. `hash` None: a deletion (no bytes)."""

    path: str
    version: int
    kind: VersionKind
    writer: str
    at: float
    size: int | None
    hash: str | None
    parents: tuple[int, ...] = ()
    """The versions it was made from, when more than its predecessor (a merge: base and theirs; a
    restore: the version restored)."""
    retained: bool = True
    """Its bytes are kept (False once pruned by the retention policy, or if never kept). The
    registry records a deletion as retained (there is nothing to prune); `History.history` lists it
    as not: it has no bytes to read."""
    never_kept: bool = False
    """Its bytes were never kept (`retained` False from the start): the file changed again while
    the version was being recorded, so no bytes holding its hash were left to keep."""


EventKind = Literal[
    "commit", "delete", "refusal", "conflict", "foreign", "adopt", "clobber", "reclaim", "grant", "release", "recover"
]
"""What a line of the volume's log records (`conflict`: a refused write asked to merge, whose changes
overlapped the current version's; logged after its refusal, its hunks in the detail)."""

ViewState = Literal["fresh", "stale", "unread"]
Recovery = Literal["completed", "abandoned", "installed", "superseded", "displaced", "finished"]
"""What crash recovery did with an interrupted commit (logged as a `recover` event's reason, except
`finished`: a commit whose install happened, of which only its intent was left)."""


# ---- disk versus record ---------------------------------------------------------------


class Disk(Enum):
    SAME = "same"  # content is the recorded content (stat may have moved: refresh it)
    CHANGED = "changed"  # a foreign write changed or created the file
    DELETED = "deleted"  # a foreign process removed the file


def proven(fp: Fingerprint, checked_ns: int) -> bool:
    """Whether a fingerprint checked against the content at `checked_ns` vouches for it later: not
    when taken within RACY_NS of the file's ctime (a later same-tick write would keep it). Recording
    one that is not proven saves no later hash."""
    return fp.ctime_ns + RACY_NS <= checked_ns


def needs_hash(record: FileRecord | None, fp: Fingerprint | None) -> bool:
    """Whether the stat fingerprint alone cannot tell that the disk holds the record's content."""
    if record is None or not record.present or fp is None:
        return False
    return fp != record.fingerprint or not proven(fp, record.checked_ns)


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


# ---- a working copy of a volume whose registry holds the content ------------------------


class Installed(NamedTuple):
    """What one working copy holds of a managed path: the version it installed (or found on its
    disk) and that version's hash (None: a deletion, no file), with the file's stat fingerprint
    then. Host-local: a fingerprint means nothing on another host."""

    version: int
    hash: str | None
    fingerprint: Fingerprint | None
    checked_ns: int
    """When `fingerprint` was last confirmed against the content (time.time_ns)."""


class Local(Enum):
    SAME = "same"  # the disk holds the current version (or neither has a file)
    BEHIND = "behind"  # the disk holds what this copy installed before, or no file: install the current version
    FOREIGN = "foreign"  # a program on this host changed the file outside the volume: record it
    UNRECORDED = "unrecorded"  # the copy holds what it installed, a version the registry lost: record it


def installed_needs_hash(installed: Installed | None, fp: Fingerprint | None) -> bool:
    """Whether the stat fingerprint alone cannot tell that the disk holds what this copy installed."""
    if fp is None:
        return False
    if installed is None or installed.hash is None:
        return True
    return fp != installed.fingerprint or not proven(fp, installed.checked_ns)


def local_state(
    current: FileRecord | None,
    installed: Installed | None,
    fp: Fingerprint | None,
    disk_hash: str | None,
    recorded: str | None,
) -> Local:
    """How a working copy's file stands against the volume's current record. `disk_hash` None with
    a file present: the fingerprint showed it holds `installed` (`installed_needs_hash` False).
    `recorded`: the hash the registry records for the version this copy installed
    (`installed.version` of this path; None where it records no such version, or a deletion).

    A working copy is a cache of the registry: a missing file is one not installed yet (or wiped),
    never a deletion; bytes this copy installed are the version it installed, current or behind;
    any other bytes were written on this host outside the volume (foreign), unless they are the
    current version's own (an install whose record was lost). Bytes this copy installed that the
    registry does not record as that version (the registry went back: restored from an older
    backup, then another copy committed that version number, or none did yet) are held by this
    copy alone (unrecorded): they are recorded as a new version, never overwritten."""
    present = current is not None and current.present
    if fp is None:
        return Local.BEHIND if present else Local.SAME
    if present and disk_hash is not None and current is not None and disk_hash == current.hash:
        return Local.SAME
    holds_installed = installed is not None and installed.hash is not None and disk_hash in (None, installed.hash)
    if not holds_installed:
        return Local.FOREIGN
    assert installed is not None
    if recorded != installed.hash:
        return Local.UNRECORDED  # bytes nobody else has: kept as a new version, never overwritten
    same = present and current is not None and (installed.version, installed.hash) == (current.version, current.hash)
    return Local.SAME if same else Local.BEHIND


def lost_install(installed: Installed | None, since: list[Version], disk_hash: str | None) -> Installed | None:
    """What a working copy whose file holds other bytes than it recorded really holds, when those
    bytes are a version committed after the one it recorded (`since`: those versions): an install
    whose record was lost (its process killed between the rename and the record), so the copy is
    behind, not written outside the volume. None when they are no such version (a foreign change).
    Only a version whose bytes are retained is taken: bytes equal to it lose nothing if overwritten
    (the caller logs it, as a program on the host may have written them)."""
    base = 0 if installed is None else installed.version
    for v in sorted(since, key=lambda v: -v.version):
        if v.version > base and v.retained and v.hash is not None and v.hash == disk_hash:
            return Installed(v.version, v.hash, None, 0)
    return None


# ---- reads ----------------------------------------------------------------------------

BUFFERING_PROGRAMS = frozenset(
    {"vi", "vim", "nvim", "vim.basic", "vim.tiny", "gvim", "emacs", "nano", "micro", "kak", "hx"}
)
"""Programs that hold a file in a buffer (editors): their view is the version they loaded."""

BASIS_PROGRAMS = frozenset({"rsync"})
"""Programs that read a file they replace only as the basis of a delta: what they write comes
from elsewhere (rsync's sender), so their reads show their agent nothing it builds on."""


def read_shows_content(offset: int, returned: int) -> bool:
    """Whether a read request showed the reader the file's content: it returned bytes, or it read
    from the start and found the file empty. A read past the end (`tail -f` seeking to it) shows
    nothing, so it is no view."""
    return returned > 0 or offset == 0


def read_moves_view(
    pinned: bool, program: str | None, loaded_before: bool, seen: int | None = None, version: int = 0
) -> bool:
    """Whether a read of `version` through a handle opened earlier moves its agent's view (`seen`)
    there. Not for a pinned agent (its views move only with what its model read, see the hooks),
    nor for a buffering program re-reading a file it already loaded (vim's backup copy while saving
    would otherwise let a stale save through), nor for a program reading a delta's basis
    (`BASIS_PROGRAMS`: rsync writing back a copy taken earlier would otherwise pass as built on the
    version it replaces), nor backwards: a handle that still serves an older version (its file was
    replaced or deleted since) shows the agent nothing newer than it saw."""
    if seen is not None and version < seen:
        return False
    return not pinned and program not in BASIS_PROGRAMS and not (program in BUFFERING_PROGRAMS and loaded_before)


# ---- grants ---------------------------------------------------------------------------


def grant_over(grant: Grant, now: float, owner_alive: bool | None) -> bool:
    """A grant ends at its expiry or as soon as its owning process is known to be dead. `now` is
    the registry's clock (`Transaction.now`), the one every host judges by; `owner_alive` is None
    where the owner cannot be checked (another host or PID namespace): only the expiry ends it."""
    return now >= grant.expires_at or owner_alive is False


def renewed(lease: Grant, current: Grant | None, now: float, length: float) -> Grant | None:
    """A lease renewed by its holder's heartbeat at `now` (the registry's clock): the grant in force
    on its path (`current`), lasting `length` s from now. None when that grant is no longer
    `lease` (released, or reclaimed and maybe taken by another) or it ran out already
    (`grant_over`): a lapsed lease stays lapsed, renewed no more, as every other host judges it."""
    if current is None or current.token != lease.token or grant_over(current, now, True):
        return None
    return replace(current, expires_at=now + length)


# ---- writes ---------------------------------------------------------------------------


HandleKind = Literal["append", "write"]
"""An open write handle (the mount): one that only appends, or any other."""


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
    """write_cas, or an open handle's commit: the version the caller based its write on."""
    kind: HandleKind | None = None
    """Opening a write handle of this kind (the mount); None for any other write. Opening one that
    appends needs no view: it adds to whatever is current, so it cannot clobber what it did not read."""
    open_kinds: list[HandleKind] | None = None
    """The kinds of the write handles the agent has open on the path in the deciding process,
    sharing its grant; None when the agent's grant (if any) is no such handle grant."""


def current_version(record: FileRecord | None) -> int:
    return 0 if record is None else record.version


def decide_write(c: WriteCheck) -> Reason | None:
    """None if the write may be installed, else the reason it is refused.

    Precedence: fenced, held (by another agent, or by the agent's own open write handles where
    `handles_share` says no), then the version rule (CAS, or unread/stale; none for opening to
    append), then read-set.
    A path that does not exist may be created without a prior read, unless the agent's view
    predates its deletion (a write built on content that is gone is stale, even an exclusive
    create: cp and Python's open(..., 'x') make every new file so).
    """
    if c.fenced:
        return "fenced"
    if c.holder is not None and c.holder != c.agent:
        return "held"
    if c.kind is not None and c.open_kinds is not None and not handles_share(c.open_kinds, c.kind):
        return "held"  # by the agent's own open write handle: see handles_share
    version = current_version(c.current)
    exists = c.current is not None and c.current.present
    if c.kind == "append":
        pass  # opening for append: it adds to whatever is current (its commit is replayed onto it)
    elif c.expected is not None:
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


def handles_share(open_kinds: list[HandleKind], kind: HandleKind) -> bool:
    """Whether a write handle of `kind` may join the write handles its agent has open on a path:
    appends share with appends (each adds to whatever is current, so none can lose another's
    lines); any other write handle is alone, refused at open while another is open, so that its
    commit, a compare-and-swap, is never refused at close by its own agent's other handle."""
    return all(k == "append" for k in open_kinds) and (kind == "append" or not open_kinds)


def goes_on_unlinked(handle_agent: str, unlinker: str) -> bool:
    """Whether a write handle whose file was deleted goes on with that file, kept by no name (what it
    writes later is never committed, as on a local disk): only when its own agent deleted it. A
    deletion by another agent (possible between the handle's commits, when it holds no grant) is a
    change since its last commit, so its next write is refused like one after another agent's commit
    (`decide_write` with `expected`), never dropped silently."""
    return handle_agent == unlinker


def may_replay(c: WriteCheck, reason: Reason | None, appends_only: bool) -> bool:
    """Whether a handle refused only because its base is no longer current may append its bytes to
    the current content instead: it only appended, and the file still exists (appends are never
    replayed onto a deletion)."""
    if reason != "stale" or c.expected is None or c.current is None or not c.current.present:
        return False
    return appends_only


def appends_lost_their_file(current: FileRecord | None, expected: int | None, since: Sequence[Version]) -> bool:
    """Whether a handle that only appends, taking its grant back to write again after its commit of
    version `expected`, finds its file deleted since (by another agent: its own agent's delete leaves
    the handle with the file, `goes_on_unlinked`), whether or not a file was made anew at its name
    (`since`: the versions after `expected`, or at least those of them that are deletions): its
    appends would reach no file, or another file, so that write is refused `stale`, taking no grant
    (appends are never replayed onto a deletion either: `may_replay`)."""
    if expected is None or current is None or current.version == expected:
        return False
    return not current.present or any(v.hash is None and v.version > expected for v in since)


def view_moves(c: WriteCheck, based_on_view: bool, onto_unread: bool) -> bool:
    """Whether a commit makes its writer's view the new version: only when the writer knew the
    content it changed: its view was current, or its write was based on the current version,
    which it had read (a handle opened with a view check) or claims (a compare-and-swap). An
    append, and appends replayed or a merge made onto content it never read (`onto_unread`),
    leave its view where it was: its next write must not pass for one based on the result."""
    return c.seen == current_version(c.current) or (based_on_view and not onto_unread)


def tools_write_seen_early(current: Version, view: int | None, holder: str | None, agent: str) -> bool:
    """Whether the `current` version, found holding exactly what `agent`'s tool made of its view (a
    hook's end-of-tool check confirmed it), is that tool's write, seen half way by a look at the
    file before the tool's end recorded it (another agent's read, `status`): recorded then as a
    change by EXTERNAL, the one version after `agent`'s view, while `agent` held the path's write
    grant, which let no other writer of the volume in. Only an outside program writing the very
    bytes the tool made could be it instead; the version stays what it is, only its writer is
    `agent`'s."""
    return (
        current.writer == EXTERNAL
        and current.kind == "foreign"
        and view is not None
        and current.version == view + 1
        and holder == agent
    )


def may_merge(reason: Reason | None, merging: bool) -> bool:
    """Whether a refused write may be merged three-way with the current version instead: only when
    merging was asked for (`merge=True`, or a merge glob of the volume) and only a `stale` one, whose
    base is the version its writer read. `held`, `fenced`, `unread` and `read-set` never merge."""
    return merging and reason == "stale"


def merged_already(after_base: Sequence[Version], agent: str) -> int | None:
    """The version, among those committed after the base of `agent`'s stale write (`after_base`),
    that merged an earlier write of `agent`'s from that same base (a merge leaves its writer's view
    there, `view_moves`): that write's change is in it already, so merging this one from the base
    again would bring the change in once more as one of its own, over what later commits did to it
    (a peer that read the merge and deleted or undid those lines). Such a write is not merged; None:
    it may be."""
    return next((v.version for v in after_base if v.kind == "merge" and v.writer == agent), None)


def takes_current_again(named: Version | None, current: int) -> bool:
    """Whether a refusal's diff, or a merge of its write, that finds no bytes kept for the version the
    refusal named current (`named`) takes the version current now instead, as a merge overtaken
    after it is made is merged again: only when those bytes were dropped (pruned, or never kept: it
    changed while being recorded) after a newer commit overtook that version. A deletion has no
    bytes to take; a base is never replaced: the refused content was built on it."""
    return named is not None and named.hash is not None and not named.retained and current > named.version


def changed_paths(read_set: dict[str, int], versions: dict[str, int], exclude: str) -> tuple[str, ...]:
    """Paths of `read_set` (path -> seen version) whose current version differs, except `exclude`."""
    return tuple(sorted(p for p, seen in read_set.items() if p != exclude and versions.get(p, 0) != seen))


def view_state(seen: int | None, version: int) -> ViewState:
    """How an agent's view of a path stands against its current version."""
    return "unread" if seen is None else "fresh" if seen == version else "stale"


def dirs_above(path: str) -> list[str]:
    """The directories a relative '/'-separated `path` lies in, outermost first."""
    parts = path.split("/")
    return ["/".join(parts[:n]) for n in range(1, len(parts))]


def in_the_way(path: str, other: str) -> int:
    """The errno of a working copy's write of `path` while the registry holds a present file at
    `other`, a name on its way (ENOTDIR) or below it (EISDIR, `path` being a directory of files
    there): what a disk holding both would answer. Each copy checks its own disk; between copies
    the registry decides, so no name is ever a file on one copy and a directory on another."""
    return errno.ENOTDIR if other in dirs_above(path) else errno.EISDIR


def is_noop(record: FileRecord | None, digest: str | None) -> bool:
    """A write of exactly the recorded content is no new version: nobody is invalidated by it."""
    return digest is not None and record is not None and record.present and record.hash == digest


def displaced_needs_hash(seen: Fingerprint | None, checked_ns: int, displaced: Fingerprint) -> bool:
    """Whether the stat of the file an install displaced (`displaced`: exchanged away, so its ctime
    moved) cannot tell that it is the file its decision found holding the version before: the same
    inode, size and mtime as the fingerprint the decision relied on (`seen`, checked against the
    content at `checked_ns`), which must be `proven` (a write since would have moved the mtime).
    Otherwise its bytes decide: the version before's hash, or a change made outside the volume."""
    return seen is None or displaced[:3] != seen[:3] or not proven(seen, checked_ns)


def may_drop_taken(taken: str | None, before: str | None, brought: str | None = None) -> bool:
    """Whether a file that a change took from its place to a temp name (an install's exchange, a
    deletion's set-aside), hashing to `taken` (None: no file is there), may be removed: only the
    version the change found there (`before`: its hash, None for no file) or the bytes the change
    itself brings (`brought`: there while its exchange is not done). Any other bytes are a change
    made outside the volume in the change's window, recorded as a version of that path and put
    back, even bytes the registry keeps as another path's or another version's (a copy of another
    file, a revert): they are a change of this path all the same."""
    return taken is None or taken == before or (brought is not None and taken == brought)


def recovery(
    intent: Intent,
    on_disk: bool,
    disk_hash: str | None,
    replicated: bool = False,
    *,
    recorded: bool = False,
    staged: bool = False,
    staged_hash: str | None = None,
    staged_kept: bool = False,
    previous: str | None = None,
    undone: bool = False,
    done: bool = False,
) -> Recovery:
    """The fate of a commit whose intent outlived its transaction.

    A commit recorded with its decision (`recorded`: its version was committed with its intent, so
    the registry's COMMIT was its commit point) is `finished` once its staged file is gone (its
    install renamed it into place). An install exchanges the staged file with the target, so a
    staged name holding other bytes than the intent's (`staged_hash`, given whenever the name is
    there) names the file the install displaced: `finished` (the name dropped) if that is the
    version before (`previous`: its hash, None for no file; `may_drop_taken`) or, at a commit's
    staged name, bytes kept as that path's already (`staged_kept`: recorded by a put back of this
    install, or in a working copy what it recorded holding there before the install, a version it
    held while behind: `CoreBase._kept_already`; never for the name a
    rename or a deletion set a file aside at), else `displaced`: a change made outside the volume just
    before the install, which is put back in place and recorded as the next version, after the
    commit's, as a change made just after the install would be (the commit stays in history; its
    number was fixed at its COMMIT, before the change was seen). While the staged file holds the
    intent's bytes the install did not happen (`staged`: it is there and the intent's version
    current): it is `installed` now if the disk still holds the version before it, else
    `superseded`: the file was changed outside the volume meanwhile, which the next check records
    as a version of its own (the commit stays in history, its bytes retained). In a volume whose
    registry holds the content (`replicated`) it is never installed by recovery: `finished` (a
    working copy that lacks it is merely behind), unless its staged name holds displaced bytes.

    Any other intent (a creation, deletion or rename, recorded after its install) whose temp name
    holds its content (`staged`: a rename over a file interrupted between moving its source there
    and exchanging it into place; or the source a program saved just before it was moved, the
    destination still holding the version before: `CoreBase._moved_source`) is `completed`,
    installed from there. Else it is `abandoned`
    when its process saw its disk step fail (`undone`: the kernel refused the system call, so
    nothing changed, whatever the disk holds: a file of the same bytes already there is not its
    doing), and `completed` when its process saw its disk step succeed (`done`: a live rename
    settling what its exchange displaced before it records itself; a save at its names since then
    is a change after it, which the next check records). Else, its process interrupted, it is
    `completed` when the disk already holds what it intended (its content, or for a deletion no
    file), else `abandoned`: the disk still holds the previous version. Where the registry holds
    the content, always `completed`: its intent and content were committed together."""
    if recorded:
        if staged_hash is not None and staged_hash != intent.hash:
            return "finished" if may_drop_taken(staged_hash, previous) or staged_kept else "displaced"
        if not staged or replicated:
            return "finished"
        holds_previous = (on_disk and disk_hash == previous) if previous is not None else not on_disk
        return "installed" if holds_previous else "superseded"
    if staged:
        return "completed"
    if undone:
        return "abandoned"
    if done or replicated:
        return "completed"
    installed = (on_disk and disk_hash == intent.hash) if intent.present else not on_disk
    return "completed" if installed else "abandoned"
