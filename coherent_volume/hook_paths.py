"""Where a path a hook is given lies: in which volume (mounted or plain) and by which path below
its root, and which volumes a session works in. A path is the file the kernel opens for it:
symlinks followed, `..` applied after them, so no spelling of a managed file's path escapes its
check (removing a symlink aside: `unlinks_link`). A session works in the volume of its working
directory and in each volume its hooks bound it in (`record_volume`): its session events touch
those and no other. The session's note (a file of the user's) holds those volumes, its live
processes (so it outlives the end of any one of them, `end_process`) and the writes each process
claimed before a tool, each as its tool call's (`note_claims`), which the hook after that call
records and no others, releasing a grant only once no call that claimed it is still running
(`taking_claims`)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import random
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from .liveness import ProcessId
from .mounts import mount_holding, shown_higher
from .paths import REGISTRY_DIR
from .protocol import HandleKind
from .registry import recorded_in, volume_above


class Located(NamedTuple):
    """Where a path lies: its volume's root and the path relative to it."""

    root: str
    rel: str
    mounted: bool
    """Reached through a mount of the volume (else in the plain volume directory)."""


def located(path: str) -> Located | None:
    """Where the file a path names lies: in a mounted volume or a plain one, else None. `path` is
    resolved as the kernel will open it (`os.path.realpath` of the path as given, joined to the
    working directory: symlinks followed component by component, each `..` applied to where the
    components before it lead; a name that does not exist yet through its existing parent), so a
    path through a symlink that lives outside a volume, or a `..` after one, finds the volume the
    file is in. Mounts come from /proc; a plain volume is the nearest ancestor directory of the
    resolved path holding a registry. `rel` is the path as given below the volume's root (or
    mountpoint) when it was given there, so the core resolves it and sees the name the caller used
    (`Target.alias_of`); else it is the resolved path's."""
    given = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    real = os.path.realpath(given)
    if (mounted := mount_holding(real)) is not None:
        below = _below(given, mounted.mountpoint) or os.path.relpath(real, mounted.mountpoint)
        return Located(mounted.root, mounted.rel(below), True)
    if (higher := _through_bind(real)) is not None:
        return higher
    directory = volume_above(real)
    if directory is None:
        return _through_bind(real, root=True)
    return Located(directory, _below(given, directory) or os.path.relpath(real, directory), False)


def _through_bind(real: str, root: bool = False) -> Located | None:
    """Where the real path `real` lies when the mount holding it is a bind of a directory inside a
    volume (`mount --bind VOL/plans /x`): walking up from it never meets the volume's registry, which
    lies above what the bind shows, so it is found through a mount showing more of that file system
    (`mounts.shown_higher`, by mountinfo and checked by device and inode). With `root`, where that
    bind shows its file system's root, mounted also in a volume (`mount -t tmpfs t VOL/plans; mount
    --bind VOL/plans /x`): found through that other mount (asked only where no volume lies above
    `real`: a bind of `/` elsewhere shows every path again). None where no such mount shows it in a
    volume (then a volume above the bind's mountpoint is the one, as for any path)."""
    for higher in shown_higher(real, root):
        if (mounted := mount_holding(higher)) is not None:
            return Located(mounted.root, mounted.rel(os.path.relpath(higher, mounted.mountpoint)), True)
        if (directory := volume_above(higher)) is not None:
            return Located(directory, os.path.relpath(higher, directory), False)
    return None


def one_name(path: str) -> str:
    """The file `path` names, as one string however it is reached: a path in a volume (through a
    mount of it, a bind mount of its root or of a directory above, as `located` finds it) as its
    volume's registry directory by identity (device, inode) and its path there as the kernel
    resolves it; any other path as the kernel resolves it."""
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    found = located(real)  # (given resolved: its rel is the resolved path's)
    if found is None:
        return real
    root, rel = found.root, found.rel
    try:
        st = os.stat(os.path.join(root, REGISTRY_DIR))
    except OSError:
        return os.path.join(root, rel)
    return f"{st.st_dev}:{st.st_ino}:{os.path.normpath(rel)}"


def _below(given: str, top: str) -> str | None:
    """`given` relative to `top` as text (its `..` and symlinks left for the core to resolve), when
    it is written below `top`: never absolute (`ROOT//plans/a.md` is `plans/a.md`)."""
    rel = given[len(top) :].lstrip(os.sep) if given.startswith(top + os.sep) else ""
    return rel or None


_MOST_LINKS = 40
"""Symlinks followed at most in one path (as the kernel does, ELOOP past it)."""


def through_own_process(path: str) -> bool:
    """Whether the absolute `path`, resolved as the kernel resolves it, passes through the /proc
    entry of the process resolving it (`/proc/self`, `/proc/thread-self`, `/dev/fd`, a symlink to
    one, a `..` after one): it names something else in each process that opens it, so the hook
    cannot tell what it names for the agent's."""
    own = f"/proc/{os.getpid()}"
    pending = [name for name in path.split("/") if name]
    current, links = "/", 0
    while pending:
        name = pending.pop(0)
        if name in (".", ""):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        candidate = os.path.join(current, name)
        if candidate in ("/proc/self", "/proc/thread-self") or candidate == own or candidate.startswith(own + "/"):
            return True
        try:
            target = os.readlink(candidate)
        except OSError:  # no symlink (or nothing) there
            current = candidate
            continue
        links += 1
        if links > _MOST_LINKS:
            return False  # (the kernel fails it ELOOP: it names nothing)
        pending[:0] = [n for n in target.split("/") if n]
        current = "/" if target.startswith("/") else current
    return False


def located_directory(path: str) -> Located | None:
    """Where the directory `path` lies (or would, if it does not exist yet): `located` of a name in
    it that does not exist (so no symlink of that name leads elsewhere), with `rel` the directory's
    own real path below the root or mountpoint ("" for the root itself)."""
    real = os.path.realpath(path)
    name = "x"
    while os.path.lexists(os.path.join(real, name)):
        name += "x"
    found = located(os.path.join(real, name))
    return None if found is None else found._replace(rel=found.rel[: -len(name)].rstrip("/"))


def unlinks_link(path: str) -> bool:
    """Whether unlinking or renaming `path` acts on a symlink itself (its last component, reached
    through its directories as the kernel resolves them, is one: `lstat`; a trailing `/` makes the
    kernel follow it). Such a removal changes no file a volume versions, as `CoherentVolume.delete`
    of a symlink removes only the link."""
    return not path.endswith("/") and os.path.islink(path)


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a path inside a mounted or plain volume, else None."""
    found = located(path)
    return None if found is None else (found.root, found.rel)


def session_file(kind: str, session: str) -> Path | None:
    """The file of `kind` a session's hooks keep about it (the volumes it works in, the stale views
    it was told of), in a directory only this user may use: `coherent-volume-UID` (0700) in
    $XDG_RUNTIME_DIR, or where that cannot be made (unset, missing, read-only) in the temporary
    directory. None if neither can (then nothing is kept)."""
    name = f"{kind}-{hashlib.sha256(session.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"
    for base in filter(None, (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir())):
        directory = Path(base) / f"coherent-volume-{os.getuid()}"
        try:
            directory.mkdir(mode=0o700, exist_ok=True)
            st = os.lstat(directory)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077:
            return directory / name
    return None


def _process(process: ProcessId) -> list[object]:
    return [process.host, process.pid, process.start]


def _lines(data: bytes) -> list[object]:
    """The entries of a session's note (`record_volume`); a line cut short (a full disk) is left out:
    what it held is missed, as if never noted."""
    entries: list[object] = []
    for line in data.splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue
    return entries


def _noted(session: str) -> list[object]:
    """The entries of `session`'s note, as they are (none if it cannot be read)."""
    at = session_file("volumes", session)
    try:
        return _lines(at.read_bytes()) if at is not None else []
    except OSError:
        return []


def _recorded(session: str) -> set[str]:
    """The volume roots `record_volume` kept for `session`."""
    return {entry for entry in _noted(session) if isinstance(entry, str)}


def _change_note(session: str, change: Callable[[list[object]], list[object] | None]) -> bool:
    """Rewrite `session`'s note as `change` makes its entries, the note locked (flock) meanwhile, so
    hooks of one session running at once lose none of each other's entries; `change` returning None
    leaves it as it is, an empty list removes it. False where it cannot be kept (no private
    directory, a full disk): then it is as it was, or short of what was being added."""
    at = session_file("volumes", session)
    if at is None:
        return False
    try:
        fd = _locked(at, create=True)
    except OSError:
        return False
    if fd is None:
        return False
    try:
        entries = change(_entries(fd))  # the lock is held for one read and one write of a small file
        if entries is None:
            return True
        if not entries:
            at.unlink(missing_ok=True)
            return True
        _rewrite(fd, entries)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _locked(at: Path, create: bool = False, wait: bool = True) -> int | None:
    """A descriptor of the session note at `at`, locked (flock) until it is closed, and still the
    note by that name once locked (one removed meanwhile, by its session's end or `sweep_notes`,
    is opened again, so nothing is written to a removed note); None if `wait` is False and another
    holds its lock, or if there is none and not `create`."""
    for _ in range(8):
        try:
            fd = os.open(at, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            if os.path.samestat(os.fstat(fd), os.stat(at)):
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise OSError(errno.EAGAIN, f"the session note {at} was removed again and again while being opened")


def _entries(fd: int) -> list[object]:
    """The entries of the session note open as `fd`."""
    return _lines(os.pread(fd, os.fstat(fd).st_size, 0))


def _rewrite(fd: int, entries: Iterable[object]) -> None:
    """The session note open as `fd` holds `entries` now: written before it is cut, so a crash
    leaves no entry of it missing."""
    data = b"".join(json.dumps(entry).encode() + b"\n" for entry in entries)
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))


def _ours(entry: object, process: list[object]) -> bool:
    """Whether a note's entry is of `process` (a process of the session, or a claim it took)."""
    return isinstance(entry, dict) and entry.get("process") == process


def _gone(entry: object) -> bool:
    """Whether a note's entry is of a process known to be dead (its binding and claims went with it)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("process"), list):
        return False
    try:
        host, pid, start = entry["process"]
        return ProcessId(host, pid, start).alive() is False
    except (TypeError, ValueError):
        return True  # not an entry this module writes


def record_volume(session: str, root: str, process: ProcessId) -> None:
    """Note that `session`'s hooks work in the volume at `root` (a real path), so its session events
    reach it (`session_volumes`), and that `process` is one of its processes, so the note outlives
    the end of any other while this one lives (`end_process`). Entries of processes known to be
    dead go meanwhile, so the note of a session that never ends holds its volumes and its live
    processes, no more. Where it cannot be kept (no private directory, a full disk), the session's
    events miss that volume: its grants there end with its process or at their TTL, as after a
    session event that timed out."""
    ours = {"process": _process(process)}
    entries = _noted(session)
    if root in entries and ours in entries:
        return

    def add(entries: list[object]) -> list[object]:
        kept = [entry for entry in entries if not _gone(entry)]
        return kept + [new for new in (root, ours) if new not in kept]

    _change_note(session, add)


class Claim(NamedTuple):
    """A hook's write grant a process took before a tool ran, as its check decided it."""

    path: str
    """The path as the event named it (absolute, as the hook after the tool names it again)."""
    root: str
    rel: str
    """The managed path it resolved to then, below the volume's root."""
    agent: str
    """The agent that holds the grant (its writer there)."""
    kind: HandleKind
    tool: str | None
    """The tool call it was taken for, where the agent's events name one (`tool_use_id`); else None."""


def _claim(entry: object, process: list[object]) -> Claim | None:
    """The claim a note's entry is, if it is one of `process`'s."""
    if not _ours(entry, process) or not isinstance(entry, dict):
        return None
    fields, tool = entry.get("claim"), entry.get("tool")
    if not isinstance(fields, list) or len(fields) != 5 or not all(isinstance(f, str) for f in fields):
        return None
    if tool is not None and not isinstance(tool, str):
        return None
    path, root, rel, agent, kind = fields
    return Claim(path, root, rel, agent, "append" if kind == "append" else "write", tool)


def _entry(claim: Claim, process: list[object]) -> dict[str, object]:
    return {"claim": list(claim[:5]), "tool": claim.tool, "process": process}


def note_claims(session: str, process: ProcessId, claims: Iterable[Claim]) -> None:
    """Note the claims `process` takes for one tool call (`Claim`, each path once), before their
    grants are taken, so the hook after that call records the writes they name and no others
    (`taking_claims`), even once their grants lapsed, and no other call's end releases a grant
    this one relies on. A claim of a call without an id is noted again for each call that makes
    it: a path two such calls claim counts twice. Where the note cannot be kept, the tool's
    writes are not recorded as the session's (the volume sees them as a change by `external` at
    its next access) and their grants end at the end of the turn or their TTL. So is one whose id
    several calls may have (`SHARED`)."""
    mine, now = _process(process), time.time()
    new = [_entry(claim, mine) for claim in dict.fromkeys(claims)]

    def add(entries: list[object]) -> list[object]:
        there = [{k: v for k, v in e.items() if k != "at"} for e in entries if isinstance(e, dict)]
        return entries + [{**e, "at": now} for e in new if not _unique(e["tool"]) or e not in there]

    if new:
        _change_note(session, add)


SHARED = "shared:"
"""The start of a call id that several calls may have (Cursor's shell commands: the generation's id
and the command, the same for two runs of one command in one generation), told apart no better than
calls without an id (`of_call`)."""


def of_call(claims: list[Claim], tool: str | None, key: Callable[[Claim], object]) -> list[Claim]:
    """The claims among `claims` (a process's) that the tool call `tool` made, for which `key` is
    not None: every one with that id; for a call without an id, or with one several calls may have
    (`SHARED`), which cannot be told from another such call, one per key (each call's end takes its
    own, and the grant stays while another's is left)."""
    mine = [claim for claim in claims if claim.tool == tool and key(claim) is not None]
    if _unique(tool):
        return mine
    return list({key(claim): claim for claim in mine}.values())


def _unique(tool: object) -> bool:
    """Whether the call id `tool` is one call's alone (not None, nor one several calls may have)."""
    return isinstance(tool, str) and not tool.startswith(SHARED)


@contextmanager
def taking_claims(
    session: str, process: ProcessId, pick: Callable[[list[Claim]], list[Claim]], fresh: float
) -> Iterator[tuple[list[Claim], set[tuple[str, str]]]]:
    """Take the claims `pick` chooses among `process`'s out of the session's note (each chosen one
    once, the newest noted of equal ones), which stays locked (flock) until the block ends, so no
    other hook of the session notes or takes a claim meanwhile: a grant the block releases is one
    no claim names (a tool's start notes its claim before it takes its grant, `note_claims`).
    Yields the claims taken and the (volume root, managed path) pairs that claims of the process
    left in the note, noted within the last `fresh` seconds (a grant's TTL: an older one's grant
    lapsed anyway, so a tool that never ended, whose call the user rejected, holds nothing back),
    still name: their grants stay. The note is rewritten when the block ends without an error.
    Where the note cannot be read, nothing is taken and nothing is named."""
    at = session_file("volumes", session)
    fd: int | None = None
    entries: list[object] = []
    try:
        if at is not None and (fd := _locked(at)) is not None:
            entries = _entries(fd)  # locked while the block releases the grants of what it took
    except OSError:
        if fd is not None:
            os.close(fd)
        fd = None
    if fd is None:
        yield [], set()
        return
    try:
        mine, since = _process(process), time.time() - fresh
        left = [(i, claim) for i, entry in enumerate(entries) if (claim := _claim(entry, mine)) is not None]
        owned = {i for i, _ in left}
        taken: list[Claim] = []
        for chosen in pick([claim for _, claim in left]):
            found = next((n for n in reversed(range(len(left))) if left[n][1] == chosen), None)
            if found is not None:
                taken.append(left.pop(found)[1])
        yield taken, {(claim.root, claim.rel) for i, claim in left if _noted_at(entries[i]) > since}
        if taken:
            gone = owned - {i for i, _ in left}
            try:
                _rewrite(fd, (e for i, e in enumerate(entries) if i not in gone))
            except OSError:
                pass  # the taken claims stay noted: their grants stay until the end of the turn or their TTL
    finally:
        os.close(fd)


def _noted_at(entry: object) -> float:
    """When a claim's entry was noted (0 if it does not say)."""
    at = entry.get("at") if isinstance(entry, dict) else None
    return float(at) if isinstance(at, int | float) else 0.0


def drop_claims(session: str, process: ProcessId) -> None:
    """Drop every claim `process` noted (its grants were released: the end of a turn)."""
    mine = _process(process)
    if any(_claim(entry, mine) is not None for entry in _noted(session)):
        _change_note(session, lambda entries: [entry for entry in entries if _claim(entry, mine) is None])


def end_process(session: str, process: ProcessId) -> None:
    """`process` of `session` ended the session (its SessionEnd): drop its entries from the note,
    and the whole note when no other process of the session may still be alive; while one may be,
    its events still reach every volume the session works in."""
    mine = _process(process)

    def drop(entries: list[object]) -> list[object]:
        kept = [entry for entry in entries if not _ours(entry, mine) and not _gone(entry)]
        others = any(isinstance(entry, dict) and "claim" not in entry for entry in kept)
        return kept if others else []

    _change_note(session, drop)


SWEEP_AGE = 3600.0
"""Seconds a session note must have gone unwritten before `sweep_notes` looks at it."""
SWEEP_MOST = 100
"""Notes `sweep_notes` reads at most in one call (chosen at random among the old ones, so notes it
must keep do not hide others from it), so a hook's budget holds."""


def sweep_notes() -> None:
    """Remove the notes of sessions that ended without a session end (Codex has none; an agent
    killed): a note unwritten for SWEEP_AGE seconds whose every process entry is of a process known
    to be dead (a process of another host or PID namespace is never taken for dead), locked while
    it is looked at; one whose lock another holds is left."""
    at = session_file("volumes", "")
    if at is None:
        return
    old = time.time() - SWEEP_AGE
    notes: list[str] = []
    with os.scandir(at.parent) as found:
        for entry in found:
            try:
                if entry.name.startswith("volumes-") and entry.stat().st_mtime < old:
                    notes.append(entry.path)
            except OSError:
                continue
    for path in random.sample(notes, min(len(notes), SWEEP_MOST)):  # (never the same ones each time)
        try:
            fd = _locked(Path(path), wait=False)
        except OSError:
            continue
        if fd is None:
            continue
        try:
            entries = _entries(fd)
            if all(_gone(entry) for entry in entries if isinstance(entry, dict)):
                os.unlink(path)
        except OSError:
            continue
        finally:
            os.close(fd)


def registry_gone(session: str, path: str) -> str | None:
    """The root of a volume `session`'s hooks worked in (`record_volume`) that holds `path` (as
    `located` resolves it) but no registry any more, if any: a write there cannot be checked, and
    `located` finds no volume for it. Where the session's note cannot be read, None."""
    given = path if os.path.isabs(path) else os.path.join(os.getcwd(), path)
    real = os.path.realpath(given)
    for root in sorted(_recorded(session), key=len, reverse=True):  # the innermost first
        if (real == root or real.startswith(root + os.sep)) and not recorded_in(os.path.join(root, REGISTRY_DIR)):
            return root
    return None


def session_volumes(session: str, places: Iterable[str | None]) -> set[str]:
    """The roots of the volumes a session works in: those holding `places` (its working
    directories) and those its hooks recorded (`record_volume`) that are volumes still. No other
    volume is opened for a session's events: a lock held in a volume the session never worked in
    never makes them wait, and they never bind, release or end anything there."""
    roots = {root for root in _recorded(session) if recorded_in(os.path.join(root, REGISTRY_DIR))}
    for place in places:
        found = located_directory(place) if place else None
        if found:
            roots.add(os.path.realpath(found.root))
    return roots
