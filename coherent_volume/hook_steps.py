"""A hook's steps on the volumes, the same for every agent face: find the volume of a path, bind a
session's process, check and claim writes, record a session's own writes, register views from
what a model was shown, word refusals, and end a session.

Invariants:
- a session's process is bound to the session (views pinned) before a hook checks or registers
  anything for it, so on a mount whatever the process does is the session's, and its own reads
  through the mount never refresh a view; a second live process on the same session id acts as
  an agent of its own (`_joined`, `core.join_session`), never as the first one;
- a path is the file the kernel opens for it (`hook_paths.located`: symlinks followed, `..` applied after
  them), so no spelling of a managed file's path escapes its check;
- on a mount the file system tells no thread of a process apart, so there a subagent acts as its
  session (`Actor.on`); elsewhere each subagent is an agent of its own;
- a view is registered only by `core.observe` (or, for an older version a read or an edit shows the model
  saw, `core.note_read`), at the version whose content matches what the model was shown;
- a write grant is taken with its check in one commit-locked step (`core.begin_write`), for every
  managed path of an event or for none, after it is noted as the claim of the tool call (its id
  where the agent gives one; `hook_paths.note_claims`); a hook releases only a grant a hook took
  for the same agent and process (`release_hook_grant`) and no other call of the process that
  has not ended claims (two tools at once on one file: the grant stays until the last one's end),
  and the end of a tool records only what its call claimed (`end_writes`);
- a write a shell command leaves to a job it does not wait for (every write of one the agent runs in
  the background) of a managed file off a mount is denied before any grant is taken (`planned`):
  the hook after the command would come before it;
- a session's events (start, end, end of a turn, warnings) touch only the volumes it works in
  (`hook_paths.session_volumes`): a binding is noted before it is made (`_joined`), so a volume a
  session holds anything in is one its end reaches, wherever the note can be kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import shlex
import stat
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from . import hooks
from .core import VolumeCore, open_core, validate_agent
from .core.sessions import HELD_CLOBBER, Check, Fit, Made, any_check
from .errors import (
    LONG_HELD,
    CoherenceError,
    LinkRefused,
    OutsideVolume,
    StaleWriteError,
    UnprotectedAlias,
    UnresolvedShellWrite,
)
from .hook_paths import (
    Claim,
    drop_claims,
    end_process,
    located,
    note_claims,
    of_call,
    record_volume,
    registry_gone,
    session_volumes,
    sweep_notes,
    taking_claims,
)
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import REGISTRY_DIR, Target, is_registry_path, shown
from .protocol import HandleKind, agent_name_problem
from .shell_writes import ShellWrites, shell_writes, volume_named

Writes = Iterable[tuple[str, HandleKind]]
"""Absolute paths an event writes, each with how (a whole-content write, or an append)."""

Refused = Callable[[VolumeCore, Target, str, StaleWriteError], Answer]
"""What a face answers to a refused write check: (core, target, the writing agent, the refusal)."""


@dataclass(frozen=True)
class Actor:
    """Whom a hook event acts for: `agent` (a session, or one of its subagents), the `session`
    agent its agent process is bound to, and that process."""

    agent: str
    session: str
    process: ProcessId

    def on(self, mounted: bool) -> str:
        """The agent acting on a path: through a mount, the process's (the session)."""
        return self.session if mounted else self.agent


def when(ts: float | None) -> str:
    return "an unknown time" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def opened(root: str) -> Iterator[VolumeCore]:
    core = open_core(root)
    try:
        yield core
    finally:
        core.close()


def _resolve(core: VolumeCore, rel: str) -> Target | None:
    """The target at `rel` if writes to it are the volume's business (managed, or an alias of an
    unmanaged path); None for an unmanaged path or a symlink out of the volume. The registry's own
    directory, however spelled (`./.coherent`, through a symlink or a `..`), raises OutsideVolume.
    A trailing `/` names the entry without it: a directory the command writes into or makes
    (`cp -r src build/`), or, on anything else, the very file a system call will refuse ENOTDIR."""
    rel = rel.rstrip("/") or rel
    try:
        target = core.resolve(rel)
    except OutsideVolume:
        real = os.path.relpath(os.path.realpath(os.path.join(core.paths.root, rel)), core.paths.root)
        if is_registry_path(rel) or is_registry_path(real):
            raise
        return None
    if target.managed or target.alias_of is not None:
        return target
    _refuse_registry_link(core, target)
    return None


def _refuse_registry_link(core: VolumeCore, target: Target) -> None:
    """OutsideVolume if the unmanaged file at `target` is a hard link of a file of the registry's
    directory (made outside the hooks, which refuse making one): a write through it would change
    the registry."""
    try:
        st = os.lstat(target.abs)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode) or st.st_nlink < 2:
        return
    registry = os.path.join(core.paths.root, REGISTRY_DIR)
    for entry in os.scandir(registry):
        held = entry.stat(follow_symlinks=False)
        if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
            raise OutsideVolume(
                f"{target.rel!r} is a hard link of {REGISTRY_DIR}/{entry.name}, the registry's own file"
            )


def _fork(actor: Actor) -> str:
    """The agent a second live process of the actor's session acts as: `<session>~<pid>-<6 hex>`, the
    hex from the process's host and start time, so processes of one pid on other hosts, containers
    or boots get names of their own (a shared name would make them one agent, each passing for the
    other's reads); the same process always gets the same name."""
    process = actor.process
    where = hashlib.sha256(f"{process.host}\0{process.start}".encode("utf-8", "surrogatepass")).hexdigest()[:6]
    suffix = f"~{process.pid}-{where}"
    if agent_name_problem(actor.session + suffix) is None:
        return actor.session + suffix
    digest = hashlib.sha256(actor.session.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{actor.session[:100]}~{digest}{suffix}"


def _as(actor: Actor, session: str) -> Actor:
    """The actor acting as `session` (its fork, or itself): a subagent's name follows its session's."""
    if session == actor.session:
        return actor
    agent = session + actor.agent[len(actor.session) :] if actor.agent.startswith(actor.session) else actor.agent
    return Actor(agent, session, actor.process)


def _joined(core: VolumeCore, actor: Actor) -> Actor:
    """Bind the actor's process to its session, views pinned, once both names are valid agent
    names, recording the volume as one the session works in (`hook_paths.record_volume`); the
    actor as it acts in this volume: its session's own agent, or, while another live
    process is bound to the session (one session resumed twice), the agent of its own `_fork`
    names (`core.join_session` decides)."""
    validate_agent(actor.session)
    validate_agent(actor.agent)
    record_volume(actor.session, core.paths.root, actor.process)  # first: the session's events reach what it binds
    return _as(actor, core.join_session(actor.session, actor.process, _fork(actor)))


def acting(core: VolumeCore, actor: Actor) -> Actor:
    """The actor as it acts in this volume, binding nothing: its fork if its process is bound to it."""
    fork = _fork(actor)
    with core.registry.read() as tx:
        forked = tx.bound_process(fork) == actor.process
    return _as(actor, fork) if forked else actor


@dataclass
class _Volume:
    core: VolumeCore
    mounted: bool
    targets: list[tuple[Target, HandleKind, list[str]]]
    """Each managed target, how it is written, and the paths the event names it by."""


class _RegistryGone(Exception):
    """A write's path lies in a volume whose registry went away under its session (`_managed`)."""

    def __init__(self, root: str, path: str) -> None:
        super().__init__(root, path)
        self.root, self.path = root, path


@contextmanager
def _managed(writes: Writes, progress: Progress, session: str | None = None) -> Iterator[list[_Volume]]:
    """Open the volume of every path in `writes` and resolve its managed paths, once each, recording
    in `progress` what is established: `progress.path` becomes the first path in a volume, then the
    first managed one (what a denial that could not be decided names); yields the volumes holding
    any (the cores close after). With `session`, a path in no volume that lies in one the session
    worked in whose registry is gone raises _RegistryGone (`hook_paths.registry_gone`)."""
    by_place: dict[tuple[str, bool], list[tuple[str, HandleKind, str]]] = {}
    for path, kind in writes:
        found = located(path)
        if found is not None:
            by_place.setdefault((found.root, found.mounted), []).append((found.rel, kind, path))
        elif session is not None and (gone := registry_gone(session, path)) is not None:
            progress.in_volume = True
            raise _RegistryGone(gone, path)
    progress.in_volume = bool(by_place)
    progress.path = next((path for rels in by_place.values() for _, _, path in rels), progress.path)
    with ExitStack() as stack:
        volumes: list[_Volume] = []
        managed: list[str] = []
        for (root, mounted), rels in by_place.items():
            core = stack.enter_context(opened(root))
            targets: dict[str, tuple[Target, HandleKind, list[str]]] = {}
            for rel, kind, path in rels:
                target = _resolve(core, rel)
                if target is not None:
                    targets.setdefault(target.rel, (target, kind, []))[2].append(path)
                    managed.append(path)
            if targets:
                volumes.append(_Volume(core, mounted, list(targets.values())))
        progress.managed = bool(volumes)
        progress.path = managed[0] if managed else progress.path
        yield volumes


def planned(
    progress: Progress,
    face: Face,
    checking: bool,
    shell: tuple[str, str] | None,
    find: Callable[[], list[tuple[str, HandleKind]] | ShellWrites],
    background: bool = False,
) -> list[tuple[str, HandleKind]] | Answer:
    """The files an event writes, as `find` works them out, with `progress` saying where the hook
    is: a write check when `checking` (the event comes before the tool runs) and something is
    written. `shell` is a shell command and the directory it runs in: one that runs in a volume or
    names a path in one is a write check there while its writes are worked out (which takes
    time), so a budget that runs out denies it; so is any other event `checking` until `find` has
    returned. A shell write whose file is known only at run time, or a hard link of a managed
    file, is answered instead: denied before the command runs; after it, nothing to record. So is
    a write in the background (one the command leaves to a job it does not wait for,
    `ShellWrites.background`, or any, for a command the agent runs in the `background`) of a
    managed file off a mount (`_late`)."""
    if shell is not None and any(hooks.lone_surrogate(text) for text in shell):
        return _surrogate_command(shell, face, checking)
    if shell is not None:
        progress.doing = "working out which files the shell command writes"
        root = volume_named(*shell)
        if root is not None:
            progress.write_check, progress.path = True, root
    else:  # a file tool: a write check until `find` says it writes nothing (it raises for a write naming no file)
        progress.write_check = checking
    try:
        found = find()
    except (UnresolvedShellWrite, LinkRefused) as refused:
        return face.deny(str(refused), None) if checking else Answer()
    writes = found.writes if isinstance(found, ShellWrites) else found
    later = {p for p, _ in writes} if background else found.background if isinstance(found, ShellWrites) else set()
    progress.doing = None
    progress.path = writes[0][0] if writes else None
    progress.write_check = checking and bool(writes)
    denial = _late(sorted(later), progress, face) if checking and later else None
    return writes if denial is None else denial


SURROGATE = (
    "coherent-volume refused this shell command: its text holds a lone UTF-16 surrogate ({surrogate!r}, a JSON `\\u` "
    "escape no character has), and it writes files, whose names the hook cannot tell as the shell will: the agent's "
    "runtime (Node) gives the shell U+FFFD in its place, Python a raw byte, so the hook would check other files "
    "than the ones the command writes. Write the command with the characters its names have."
)
"""Why a shell command whose text holds a lone surrogate is denied when it writes anything (`planned`)."""


def _surrogate_command(shell: tuple[str, str], face: Face, checking: bool) -> list[tuple[str, HandleKind]] | Answer:
    """`planned` for a shell command (or its directory) holding a lone UTF-16 surrogate: walked as the
    shell receives it from the agent's Node runtime (each surrogate as U+FFFD), it writes nothing (so
    nothing to check or record), or it is denied before it runs, as a file tool's path with one is
    (`hooks.absolute`): the hook cannot tell which files its names reach."""
    as_run = ["".join("\ufffd" if hooks.lone_surrogate(c) else c for c in text) for text in shell]
    try:
        writes = bool(shell_writes(as_run[0], as_run[1]).writes)
    except (UnresolvedShellWrite, LinkRefused):
        writes = True
    if not writes:
        return []
    surrogate = next(c for text in shell for c in text if hooks.lone_surrogate(c))
    return face.deny(SURROGATE.format(surrogate=surrogate), None) if checking else Answer()


BACKGROUND = (
    "coherent-volume refused this command: it writes {path}, a file coherent-volume manages, in what runs in the "
    "background (a command run in the background, or a job it starts with `&`, `coproc`, a process substitution, "
    "`setsid`, `sudo -b`, `systemd-run`, `screen`, `daemonize` or `tmux` and does not `wait` for), so the hook "
    "after the command comes before that write ends: it could neither hold other sessions off the file until then "
    "nor record what was written. Run it "
    "in the foreground (without `&`, or with a plain `wait` right after the jobs at the top level of the command, "
    "nothing between them)."
)
"""Why a write in the background of a managed file is denied off a mount (`_late`)."""


def _late(paths: list[str], progress: Progress, face: Face) -> Answer | None:
    """The denial of a shell command that writes one of `paths` in the background (`planned`), if one
    is a managed file off a mount: the hook after the command comes before such a write ends (for a
    command the agent runs in the background, once it has started), so no grant could hold other
    sessions off the file until then, nor the write be recorded. On a mount the file system checks
    each write as it comes. A path in a registry is `begin_writes`'s to deny."""
    try:
        with _managed([(path, "write") for path in paths], progress) as volumes:
            late = next((t.rel for v in volumes if not v.mounted for t, _, _ in v.targets), None)
    except OutsideVolume:
        return None
    return None if late is None else face.deny(BACKGROUND.format(path=shown(late)), late)


def unattributed(writes: Writes, progress: Progress, field: str) -> str:
    """The warning for an event that names no session (`field` is missing). A write check of a
    path in a volume raises instead: it cannot be attributed to a session, so it is denied."""
    if progress.write_check:
        progress.in_volume = any(located(path) is not None for path, _ in writes)
        if progress.in_volume:
            raise CoherenceError(f"the hook event has no {field}, so the write cannot be attributed to a session")
    return f"coherent-volume: hook event without {field}; ignored"


# ---- refusals ------------------------------------------------------------------------


def denial_text(core: VolumeCore, refusal: StaleWriteError, face: Face, note: str = "") -> str:
    """What the model is told of a refusal: which file, what it saw, what is current, who wrote it
    and when, what changed since (`refusal.diff`, when attached: already bounded by `diffs.cut`),
    `note`, and what to do."""
    with core.registry.read() as tx:
        record = tx.file(refusal.path)
    if refusal.current_version == 0:  # nothing to have read: a file no one has made yet
        state = "no version of it exists yet"
    else:
        seen = (
            "no read of it by you is on record in this session (a read is recorded where what you were shown was "
            "its content at that moment: not where it changed while you read it)"
            if refusal.seen_version is None
            else f"you last {face.seen} version {refusal.seen_version}"
        )
        how = "the file's deletion by" if refusal.deleted else "written by"
        at = when(record.committed_at if record else None)
        state = f"{seen}; the current version is {refusal.current_version}, {how} {refusal.last_writer} at {at}"
    held = f" {refusal.holder} holds its write grant right now." if refusal.holder else ""
    changes = (
        f"\nWhat changed since version {refusal.seen_version} (unified diff to version "
        f"{refusal.current_version}):\n{refusal.diff.rstrip()}\n"
        if refusal.diff
        else " "
    )
    return (
        f"coherent-volume refused this write to {shown(refusal.path)} ({refusal.reason}): {state}.{held}{changes}{note}"
        + (_long_lock(core, refusal) or _unshown(core, refusal, face) or face.remedy(refusal))
    )


def _unshown(core: VolumeCore, refusal: StaleWriteError, face: Face) -> str | None:
    """What to do about an `unread` or `stale` refusal of a file the face's read tool shows no
    content of (`Face.unshown`): reading it again, as the remedy says, gives no view (before, the
    model was told to, for ever: /tmp/s32r2hooks 7); None for any other."""
    if refusal.reason not in ("unread", "stale"):
        return None
    try:
        with open(core.paths.of_rel(refusal.path).abs, "rb") as f:
            why = face.unshown(f.read(4096))
    except OSError:
        return None
    if why is None:
        return None
    return (
        f"Your read tool shows no content of this file ({why}), so no read of it gives you a view and no write "
        "of it can be checked against one: leave it as it is, or ask the user to change it (through the "
        "volume's mount or its Python API, which check each write against what its writer read)."
    )


def _long_lock(core: VolumeCore, refusal: StaleWriteError) -> str | None:
    """What to do about a `held` refusal by a live holder's long lock (`errors.LONG_HELD`), which the
    faces' "wait a few seconds" does not end; None for any other refusal."""
    until = refusal.held_until
    if refusal.reason != "held" or until is None or until.unchecked or until.left <= LONG_HELD:
        return None
    at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until.at))
    command = f"coherent-volume reclaim {shlex.quote(core.paths.root)} {shlex.quote(refusal.path)}"
    return (
        f"It is held by a lock until {at} (in {until.left:,.0f} s) unless released sooner, and its process is "
        "alive: do not wait for it in a loop. Do other work and try again later, or ask the user; if its holder "
        f"will not release it here (a volume copied while it held the lock), the user can end it with `{command}`."
    )


def denied(core: VolumeCore, refusal: StaleWriteError, progress: Progress, face: Face, note: str = "") -> Answer:
    """The denial of `refusal` (with `note` before its remedy). It is decided first; a `stale` one
    then gets the diff of what changed since the agent's view (`VolumeCore.refusal_diff`, cut),
    which `run_hook` waits for at most DIFF_BUDGET seconds."""
    decided = face.deny(denial_text(core, refusal, face, note), refusal.path)
    progress.decide(decided, hooks.DIFF_BUDGET)
    if refusal.reason != "stale":
        return decided
    return face.deny(denial_text(core, core.refusal_diff(refusal), face, note), refusal.path)


# ---- writes --------------------------------------------------------------------------


def release_hook_grant(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> bool:
    """Release the grant a hook took for `agent`'s write of `target`; never a grant taken through
    `lock()` (those fence) nor one of another agent or process. False if none was in force."""
    with core.registry.read() as tx:
        grant = tx.grant(target.rel)
    if grant is None or grant.agent != agent or grant.fences or grant.owner != owner:
        return False
    return core.release(grant)


REGISTRY_GONE = (
    "coherent-volume refused this write: it is in the volume at {root}, which this session worked in, and that "
    "volume's registry ({root}/.coherent) is no longer there, so no write of a file in it can be checked against "
    "the other sessions' work. Do not write there until it is back; if the volume was removed on purpose, a new "
    "session is not held to it (this session's hooks keep checking every volume it worked in)."
)
"""Why a write in a volume whose registry went away under a session is denied (`begin_writes`)."""


def begin_writes(
    actor: Actor,
    writes: Writes,
    progress: Progress,
    face: Face,
    refused: Refused | None = None,
    tool: str | None = None,
) -> Answer | None:
    """Check and take the actor's write grant on every managed path of `writes`, all or none, for
    the tool call `tool` (its id, where the agent's events give one): None when every grant was
    taken (or nothing is managed); else, with this call's claims dropped and the grants it took
    released (those no other call of the process claims), the denial (`refused` answers a
    refusal of the check, `denied` by default). Each claim is noted before its grant is taken
    (`hook_paths.note_claims`), so no other call's end releases a grant this call relies on."""
    taken: list[tuple[VolumeCore, str, Target]] = []
    noted: list[Claim] = []

    def release_taken() -> None:
        with taking_claims(actor.session, actor.process, lambda _: noted, hooks.HOOK_GRANT_TTL) as (_, held):
            for core, agent, target in taken:
                if (core.paths.root, target.rel) not in held:
                    release_hook_grant(core, agent, target, actor.process)

    try:
        with _managed(writes, progress, actor.session) as volumes:
            for volume in volumes:
                core = volume.core
                writer = _joined(core, actor).on(volume.mounted)
                alias = next(((t.alias_of, t.rel) for t, _, _ in volume.targets if t.alias_of is not None), None)
                if alias is not None:
                    release_taken()
                    return face.deny(f"coherent-volume refused this write: {UnprotectedAlias(*alias)}.", alias[1])
                claims = [
                    Claim(path, core.paths.root, target.rel, writer, kind, tool)
                    for target, kind, paths in volume.targets
                    for path in paths
                ]
                note_claims(actor.session, actor.process, claims)
                noted += dict.fromkeys(claims)
                for target, kind, _ in volume.targets:
                    try:  # check and grant in one commit-locked step: nobody else passes until released
                        core.begin_write(writer, target, actor.process, kind=kind, ttl=hooks.HOOK_GRANT_TTL)
                    except StaleWriteError as refusal:
                        release_taken()
                        if refused is not None:
                            return refused(core, target, writer, refusal)
                        return denied(core, refusal, progress, face)
                    taken.append((core, writer, target))
    except _RegistryGone as gone:  # raised before any grant is taken
        return face.deny(REGISTRY_GONE.format(root=gone.root), gone.path)
    except OutsideVolume as registry:  # a path in a volume's registry (`_resolve`)
        release_taken()
        text = (
            f"coherent-volume refused this write: {registry}. Only coherent-volume changes a volume's registry "
            "(its `.coherent` directory): leave it out of the command."
        )
        return face.deny(text, progress.path)
    return None


def end_writes(
    actor: Actor,
    writes: Writes | None,
    progress: Progress,
    *,
    record: bool,
    tool: str | None = None,
    made: Made | None = None,
) -> list[str]:
    """After the tool call `tool` ran: the writes its start claimed for the paths of `writes` (all
    it claimed where `writes` is None: a call whose end cannot name them again, with its id)
    (`begin_writes`, `hook_paths.taking_claims`), each the file it resolved to then, and no others
    (a path the tool's own symlink leads elsewhere now was never checked there, so what it holds
    gives the session no view). With `record`, each claimed write is recorded as the claiming
    agent's commit (`adopt`; an append's too, leaving its view alone: a peer on another working
    copy sees only what the registry records, and would have committed over it); then its
    grant is released unless another call of the process that has not ended claims the file too
    (two tools run at once: the grant stays until the last one's end). Returns what the model must
    be told: writes that went over a version it had not seen (its grant had lapsed), which
    `adopt` logged as clobbers, and files another writer changed as well meanwhile. `made`: what
    the tool's write makes of the file it changes (its input says so: a Write's content, an Edit's
    strings; `exactly`, `replacing`), where it is one file's."""
    told: list[str] = []
    named = None if writes is None else {path for path, _ in writes}

    def pick(claims: list[Claim]) -> list[Claim]:
        return of_call(claims, tool, lambda claim: claim.path if named is None or claim.path in named else None)

    with taking_claims(actor.session, actor.process, pick, hooks.HOOK_GRANT_TTL) as (taken, held):
        claims = {(c.root, c.rel): c for c in taken}
        progress.path = next((c.path for c in claims.values()), progress.path)
        for root in sorted({root for root, _ in claims}):
            with opened(root) as core:
                for claim in (c for c in claims.values() if c.root == root):
                    validate_agent(claim.agent)  # nothing is recorded under a name that cannot be an agent's
                    target = core.paths.of_rel(claim.rel)
                    if record:  # an append's too: a working copy's peers see only what the registry records
                        appended, found = claim.kind == "append", located(claim.path)
                        moved = found is not None and found.mounted  # the file system committed it as theirs
                        running = (claim.root, claim.rel) in held  # another call of the process claims it too
                        made_here = None if appended else made
                        try:
                            told += _recorded(core, claim.agent, target, made_here, appended, moved, running)
                        except (CoherenceError, OSError) as e:  # the others recorded stand: say which one failed
                            told.append(
                                f"coherent-volume: your write to {shown(target.rel)} could not be recorded "
                                f"as yours ({e}); it "
                                "is recorded as a change by `external` at the next access. Read the file again before "
                                "you change it."
                            )
                    if (claim.root, claim.rel) not in held:
                        try:
                            release_hook_grant(core, claim.agent, target, actor.process)
                        except (CoherenceError, OSError) as e:  # what was recorded stands; the grant lapses
                            told.append(
                                f"coherent-volume: the write grant on {shown(target.rel)} could not be released ({e}); "
                                f"it ends by itself within {hooks.HOOK_GRANT_TTL:g} s."
                            )
    return told


def end_deletions(actor: Actor, places: Iterable[str | None], *, record: bool, tool: str | None = None) -> list[str]:
    """After the shell command of the tool call `tool` ran: each managed file on which the actor's
    process holds a hook's grant (`begin_writes`), in the volumes the session works in
    (`hook_paths.session_volumes`), that its volume holds and the disk no longer does, and that no
    other call of the process that has not ended claims, the command deleted where its words name
    it no more once it ran (`find -delete`, `rm -r DIR`, a directory moved away): with `record`,
    it is recorded as the deletion of the agent that holds the grant (`adopt`), the call's claims
    on it dropped, and the grant released. Returns what the model must be told, as `end_writes`
    does."""
    told: list[str] = []
    for root in session_volumes(actor.session, places):
        with opened(root) as core:
            acts = acting(core, actor)
            with core.registry.read() as tx:
                held = [(g, tx.file(g.path)) for agent in {acts.agent, acts.session} for g in tx.grants_of(agent)]
            for grant, file in held:
                target = core.paths.of_rel(grant.path)
                ours = not grant.fences and grant.owner == actor.process
                if not ours or file is None or not file.present or os.path.lexists(target.abs):
                    continue
                on = (core.paths.root, grant.path)

                def pick(claims: list[Claim], on: tuple[str, str] = on) -> list[Claim]:
                    return of_call(claims, tool, lambda claim: on if (claim.root, claim.rel) == on else None)

                with taking_claims(actor.session, actor.process, pick, hooks.HOOK_GRANT_TTL) as (_, others):
                    if on in others:
                        continue
                    if record:
                        told += _recorded(core, grant.agent, target)
                    release_hook_grant(core, grant.agent, target, actor.process)
    return told


def exactly(made: Callable[[str], str | None]) -> Made:
    """`made` (what a tool's write makes of a text) as `VolumeCore.adopt` asks it: given the bytes of
    the version the tool's check found, whether a file's bytes are what it made of them
    (`_fits`); None where that cannot be told (not text, or the change does not apply as
    written)."""

    def expect(base: bytes) -> Check | None:
        try:  # the tools edit a CRLF file's text with its line ends made LF, then put them back
            result = made(base.decode("utf-8").replace("\r\n", "\n"))
        except UnicodeDecodeError:
            return None
        return None if result is None else _fits({result}, exact=b"\r" not in base)

    return expect


def either(*mades: Made) -> Made:
    """A file fits as well as it fits the best of `mades` that can tell (None where none can), but
    never exactly where more than one can: the tool may have made any of them, so a program that
    turned one into another meanwhile must not pass for the tool (`Fit.EXACT`)."""

    def expect(base: bytes) -> Check | None:
        checks = [check for check in (made(base) for made in mades) if check is not None]
        best = any_check(checks)
        if best is None or len(checks) == 1:
            return best
        return lambda data: min(best(data), Fit.LOOSE)

    return expect


def replacing(variants: Collection[tuple[str, str]]) -> Made:
    """What a string replacement makes of a file when its tool may correct it first (Gemini CLI's
    replace: its strings unescaped; matched regardless of spaces and re-indented where they do not
    occur as written; made to replace one occurrence where it finds more): given the bytes of the
    version its check found, whether a file is that version with one of `variants`' old strings
    replaced by its new one, at every occurrence or at one of them. Where an old string occurs as
    written, the file is compared line by line (line ends and spaces at line ends aside); else, as
    the tool matched, with all spaces taken out (`_flat`). An empty old string makes a new file of
    the new one. None where that cannot be told: not text, or no old string occurs in the version
    in either way (the tool rewrote it to fit)."""

    def expect(base: bytes) -> Check | None:
        try:
            text = base.decode("utf-8").replace("\r\n", "\n")
        except UnicodeDecodeError:
            return None
        exact: set[str] = set()
        flat: set[str] = set()
        for old, new in variants:
            if not old:
                if not text:
                    exact.add(new)
            elif old in text:
                exact.update(_replaced(text, old, new))
            elif _flat(old) and _flat(old) in _flat(text):
                flat.update(_replaced(_flat(text), _flat(old), _flat(new)))
        if not exact and not flat:
            return None  # (several results, or a match regardless of spaces: none is exactly the tool's)
        return _fits(exact, flat, exact=b"\r" not in base and len(exact) == 1 and not flat)

    return expect


_MOST_OCCURRENCES = 64
"""Occurrences of an old string each tried alone (`_replaced`); past that, every one only."""


def _replaced(text: str, old: str, new: str) -> set[str]:
    """`text` with every occurrence of `old` replaced by `new`, and with each one alone."""
    results = {text.replace(old, new)}
    start = text.find(old)
    for _ in range(_MOST_OCCURRENCES):
        if start < 0:
            break
        results.add(text[:start] + new + text[start + len(old) :])
        start = text.find(old, start + len(old))
    return results


def _stripped_lines(text: str) -> list[str]:
    """The lines of `text`, line ends and spaces or tabs at their ends aside."""
    return [line.rstrip(" \t") for line in _split_lines(text)]


def _flat(text: str) -> str:
    """`text` without its spaces, tabs and line ends: what a change that only moved those leaves."""
    return re.sub(r"\s+", "", text)


def _fits(results: set[str], loose: Collection[str] = (), *, exact: bool = True) -> Check:
    """How a file fits one of a tool's `results` (made with LF line ends): exactly, where `exact`
    (not of a file that had CR line ends: the tools put those back, or do not, and a program
    changing only line ends meanwhile must not pass for the tool); else holding its lines, line
    ends and spaces or tabs at their ends aside (Claude Code strips those from an Edit's new
    lines), or (where the tool matched regardless of spaces) one of the `loose` texts with all
    spaces taken out (`_flat`); else not."""
    lines = {tuple(_stripped_lines(result)) for result in results}

    def fit(data: bytes) -> Fit:
        found = data.decode("utf-8", "replace")
        if exact and found in results:
            return Fit.EXACT
        if tuple(_stripped_lines(found)) in lines or _flat(found) in loose:
            return Fit.LOOSE
        return Fit.NO

    return fit


def _recorded(
    core: VolumeCore,
    agent: str,
    target: Target,
    made: Made | None = None,
    appended: bool = False,
    moved: bool = False,
    running: bool = False,
) -> list[str]:
    """Record `agent`'s own write of `target` (`made`, `moved`: see `VolumeCore.adopt`); the clobber
    to tell the model of, if it was one, or the change another writer made meanwhile. `running`:
    another call of the session's process that has not ended claims the file too (two tools at once
    on it), so the change found may be that call's write, which its own end records as the
    session's (`adopt` of what it made): the model is told so, never only of another writer."""
    with core.registry.read() as tx:
        last = tx.events(path=target.rel, limit=1, newest_first=True)
    version = core.adopt(agent, target, made, appended=appended, moved=moved)
    if version is None:
        who = (
            "another tool call of yours that has not ended yet claims the file too and may have written it since "
            "(its end records its write as yours, if the file holds what it wrote), or another writer changed it "
            "meanwhile; for now it is recorded as a change by `external`"
            if running
            else "another writer changed it meanwhile (recorded as a change by `external`)"
        )
        return [
            f"coherent-volume: {shown(target.rel)} does not hold what your tool just wrote: {who}. Read the file "
            "again before you change it, and check that your change is there. "
            f"`coherent-volume log {core.paths.root}` shows the history."
        ]
    try:
        with core.registry.read() as tx:
            after = last[0].seq if last else 0
            clobbers = [e for e in tx.events(after=after, path=target.rel, kind="clobber") if e.agent == agent]
    except (CoherenceError, OSError) as e:  # recorded all the same: never reported as not recorded
        return [
            f"coherent-volume: your write to {shown(target.rel)} was recorded as version {version}, but "
            "whether it went "
            f"over another change could not be looked up ({e}). Read the file again before you change it, and "
            f"check that no other change is missing. `coherent-volume log {core.paths.root}` shows the history."
        ]
    if not clobbers:
        return []
    c = clobbers[-1]
    if c.detail is not None and c.detail.endswith(HELD_CLOBBER):
        return [
            f"coherent-volume: while your tool ran, {shown(target.rel)} was seen changed (version "
            f"{c.version}, recorded "
            "then): either another session or program looked at it while your write was half done, or another "
            "program changed it and your write went over that change. "
            "Read the file, check that no other change is missing from it and redo it if it is, or tell the user. "
            f"`coherent-volume log {core.paths.root}` shows the history, and every version's bytes are kept "
            "(`coherent-volume show`)."
        ]
    return [
        f"coherent-volume: your write to {shown(target.rel)} went over version {c.version} ({c.detail}); "
        "your write grant "
        f"had lapsed (it lasts {hooks.HOOK_GRANT_TTL:g} s), so another session's change may be gone from the file. "
        "Read the file, check that the other change is still there and redo it if it is not, or tell the user. "
        f"`coherent-volume log {core.paths.root}` shows the history."
    ]


# ---- views ---------------------------------------------------------------------------


EARLIER_VERSIONS = 20
EARLIER_BYTES = 8 << 20
"""Retained versions before the current one searched for the one a model was shown (`observe`): a
read that raced a commit, a patch written against an older version; at most so many bytes of them
read (a hook's budget is seconds: past it, no view, and a write refused `unread`)."""
RACE_WINDOW = 30.0
"""Seconds within which a change of a file may have raced a read of it (`observe`'s `exact`): the
time from a read tool's reading the file to its hook's check, many times a hook's budget. A change
made longer ago than that came before the tool read the file."""


@dataclass(frozen=True)
class Passed:
    """A view `observe` moved from version `seen` to `now` over versions `writers` made (not the
    agent): what changed in between was not shown to the model by what confirmed the view (a
    patch's lines)."""

    root: str
    rel: str
    agent: str
    seen: int
    now: int
    writers: tuple[str, ...]


def passed_over(core: VolumeCore, agent: str, rel: str, before: int | None, now: int) -> Passed | None:
    """`agent`'s view of `rel` moved from `before` to `now` over versions other writers made: the
    Passed saying so, else None (no earlier view, or only its own versions between)."""
    if before is None or before >= now:
        return None
    with core.registry.read() as tx:
        record = tx.file(rel)
        since = tx.history(rel, (record.version if record else now) - before)
    writers = sorted({v.writer for v in since if before < v.version <= now and v.writer != agent})
    return Passed(core.paths.root, rel, agent, before, now, tuple(writers)) if writers else None


def observe(
    actor: Actor,
    path: str,
    matches: Callable[[bytes], bool],
    progress: Progress | None = None,
    *,
    earlier: int = EARLIER_VERSIONS,
    passed: list[Passed] | None = None,
    exact: Callable[[bytes], bool] | None = None,
) -> int | None:
    """Register the actor's view of the managed file at `path` at the current version if `matches`
    confirms its content is what the model was shown (a confirmed read also lifts a fence); else,
    searching up to `earlier` retained older versions newest first, at the first one `matches`
    confirms (a read that raced a commit, a patch built on an older version: a check then refuses
    the write as stale, with the diff since, not as unread). With `exact` (what the tool showed,
    compared with the details `matches` overlooks where the tool keeps them: a final newline, line
    ends), a current version `matches` confirms only loosely gives way to an older one `exact`
    confirms (a read that raced a commit changing only such details; before, the view landed on the
    newer version the model never saw: /tmp/s32hookgc 4), and the view never moves past that older
    version: where it is there already (a re-read, or our hook run twice for one event) it stays
    (before, it then moved to the current version all the same: /tmp/s32r2hooks 1). Only a change
    made within RACE_WINDOW of the hook (the version after the older one committed, or the file
    changed on disk, then) can have raced the read: past it, the tool showed the current version in
    a form `exact` models wrongly, and the loose match stands (else such a tool's reads would keep
    the view on the older version, and every write be refused stale, for ever). The version, or
    None (nothing registered: not managed, gone, or nothing matched). What is established about the
    path is recorded in `progress` if given (never the progress of a write check: it is not about
    that check's paths). With `passed`, where `matches` confirms only part of the content: a view
    moved from an earlier one over other writers' versions is added to it (the model is to be
    told what they changed)."""
    found = located(path)
    progress = progress or Progress()
    progress.in_volume = found is not None
    if found is None:
        return None
    with opened(found.root) as core:
        target = _readable(core, found.rel)
        progress.managed = target is not None
        if target is None:
            return None
        agent = _joined(core, actor).on(found.mounted)
        with core.registry.read() as tx:
            before = tx.view(agent, target.rel)
        version = None
        if exact is not None and earlier:
            version = core.observe(agent, target, exact)
            if version is None:
                raced = _earlier_match(core, target, exact, earlier, progress)
                if raced is not None and _lately(target, raced[1]):
                    if raced[0] != before:
                        core.note_read(agent, target, raced[0])
                    return raced[0]
        if version is None:
            version = core.observe(agent, target, matches)
        if passed is not None and version is not None:
            passed += filter(None, [passed_over(core, agent, target.rel, before, version)])
        if version is not None or not earlier:
            return version
        loose = _earlier_match(core, target, matches, earlier, progress)
        if loose is not None:
            core.note_read(agent, target, loose[0])
        return None if loose is None else loose[0]


def _earlier_match(
    core: VolumeCore, target: Target, matches: Callable[[bytes], bool], earlier: int, progress: Progress
) -> tuple[int, float] | None:
    """The newest of up to `earlier` retained versions before the current one that `matches`
    confirms (at most EARLIER_BYTES of them read), with the time the version after it was committed;
    or None."""
    progress.doing = f"looking for what the model was shown of {shown(target.rel)} among its older versions"
    try:
        read = 0
        versions = core.history(target, earlier + 1)
        for newer, old in zip(versions, versions[1:], strict=False):
            read += old.size or 0
            if read > EARLIER_BYTES:
                break
            try:
                data = core.read_version(target, old.version) if old.hash is not None and old.retained else None
            except CoherenceError:
                continue
            if data is not None and matches(data):
                return old.version, newer.at
        return None
    finally:
        progress.doing = None


def _lately(target: Target, committed: float) -> bool:
    """Whether a change of `target` made at `committed` (a version's commit), or the last change of
    its file on disk (its ctime: in a working copy a version is installed long after its commit
    elsewhere), lies within RACE_WINDOW of now, either way (clocks of other hosts may be ahead)."""
    try:
        changed = os.stat(target.abs).st_ctime
    except OSError:
        changed = committed
    now = time.time()
    return any(abs(now - t) < RACE_WINDOW for t in (committed, changed))


def bring(actor: Actor, path: str, said_missing: bool) -> list[str]:
    """After a read tool failed at `path`: in a working copy that lacked the managed file
    (committed on another host and not installed here yet), its current version installed; what to
    tell the model (nothing where there was nothing to bring). Where the tool said the file is
    missing (`said_missing`) and the volume's current version is a deletion, the model was shown
    that: the actor's view is registered there (`core.observe_absent`), so it may make the file anew."""
    found = located(path)
    if found is None:
        return []
    with opened(found.root) as core:
        target = _readable(core, found.rel)
        if target is None:
            return []
        version = core.bring(target)
        if version is None and said_missing:
            core.observe_absent(_joined(core, actor).on(found.mounted), target)
    if version is None:
        return []
    return [
        f"coherent-volume: {shown(target.rel)} was missing from this working copy (a cache of the volume, which "
        f"holds it at version {version}); it is there now: read it again."
    ]


def _readable(core: VolumeCore, rel: str) -> Target | None:
    """The managed file at `rel` a read tool read (`_resolve`), or None: not managed, an alias of
    an unmanaged path, or in the registry (no view of it: a write to it is denied, `begin_writes`)."""
    try:
        target = _resolve(core, rel)
    except OutsideVolume:
        return None
    return None if target is None or target.alias_of is not None else target


def _split_lines(text: str) -> list[str]:
    lines = re.split(r"\r?\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


_BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "utf-32-le"),
    (b"\x00\x00\xfe\xff", "utf-32-be"),
    (b"\xef\xbb\xbf", "utf-8"),
    (b"\xff\xfe", "utf-16-le"),
    (b"\xfe\xff", "utf-16-be"),
)
"""The byte order marks Gemini CLI's read_file decodes a file by, in the order it tests them."""


def by_mark(data: bytes) -> str | None:
    """`data` decoded as Gemini CLI's read_file decodes a file that begins with a byte order mark
    (gemini-cli utils/fileUtils.ts `readFileWithEncoding`): the mark stripped, the rest as UTF-8,
    UTF-16 or UTF-32 by it (a trailing part of a code unit dropped, as Node drops it; an unpaired
    UTF-16 surrogate kept, as a JavaScript string keeps it). None where `data` begins with none."""
    for mark, codec in _BYTE_ORDER_MARKS:
        if data.startswith(mark):
            body = data[len(mark) :]
            unit = 4 if "32" in codec else 2 if "16" in codec else 1
            body = body[: len(body) - len(body) % unit]
            return body.decode(codec, "surrogatepass" if unit == 2 else "replace")
    return None


def decodings(data: bytes, marked: bool = False) -> list[str]:
    """The texts a tool may show of the file content `data`: as UTF-8 (undecodable bytes as U+FFFD)
    and, where it begins with a byte order mark, decoded by it (`by_mark`); with `marked` (a tool
    that decodes such a file by its mark alone: Gemini CLI's read_file), only that (before, its
    UTF-8 decoding matched too, which Gemini CLI never shows: /tmp/s32r2hooks 2)."""
    mark = by_mark(data)
    if marked and mark is not None:
        return [mark]
    return [data.decode("utf-8", "replace"), *([mark] if mark is not None else [])]


def same_text(data: bytes, text: str, *, line_ends: bool = True, marked: bool = False) -> bool:
    """Whether `text` is exactly the file content `data` decoded (`decodings`, `marked` as there),
    final newline included; with `line_ends` False, CRLF line ends are taken for LF (a tool that
    shows them so)."""
    return any((c if line_ends else c.replace("\r\n", "\n")) == text for c in decodings(data, marked))


def shows(
    data: bytes,
    text: str,
    start: int = 1,
    *,
    whole: bool,
    shortened: str | None = None,
    cut: int | None = None,
    marked: bool = False,
) -> bool:
    """Whether `text` is the file content `data` (`whole`), or lines `start`.. of it, as an agent's
    read tool shows them (line ends normalised; a trailing newline is no line). `data` is read as
    UTF-8 (undecodable bytes as U+FFFD), or, where it begins with a byte order mark, also decoded by
    it (`by_mark`: as Gemini CLI and editors show such a file; before, a file with a BOM never
    matched what Gemini CLI showed, and every write of it was refused `unread`: /tmp/s32hookgc 3);
    with `marked`, only so (`decodings`).
    A shown line ending in `shortened` (a tool's marker for a cut line) stands for any line that
    begins with what precedes it; so does a shown line of `cut` UTF-16 units or more, which a tool
    that cuts long lines without a marker shows. A text showing none of a non-empty file's lines (a
    read past its end) shows nothing of it: False."""
    return any(_shows_text(d, text, start, whole, shortened, cut) for d in decodings(data, marked))


def _shows_text(content: str, text: str, start: int, whole: bool, shortened: str | None, cut: int | None) -> bool:
    """`shows` of the file's `content` decoded."""
    shown = _split_lines(text)
    lines = _split_lines(content)[max(start, 1) - 1 :]
    if len(shown) > len(lines) or (whole and len(shown) != len(lines)) or (not shown and content):
        return False
    for have, want in zip(lines, shown, strict=False):
        if shortened and want.endswith(shortened) and have.startswith(want[: -len(shortened)]):
            continue
        if cut is not None and len(want.encode("utf-16-le", "surrogatepass")) >= 2 * cut and have.startswith(want):
            continue  # (counted in UTF-16 units, as a JavaScript tool cuts)
        if have != want:
            return False
    return True


# ---- sessions ------------------------------------------------------------------------


def start_session(actor: Actor, places: Iterable[str | None]) -> None:
    """Bind the session's process (views pinned) in the volumes the session works in
    (`hook_paths.session_volumes`: those holding `places`, its working directories, and those its
    hooks bound it in before), so whatever it does through a mount of one is the session's from its
    first access on: a mount caches whose a process is for a moment, so a binding made only between
    a read and a write could come too late for the write. Then notes of sessions that ended
    without a session end go (`sweep_notes`)."""
    for root in session_volumes(actor.session, places):
        with opened(root) as core:
            _joined(core, actor)
    sweep_notes()


def release_grants(actor: Actor, places: Iterable[str | None]) -> None:
    """Release every write grant hooks took for the actor's agent and process in the volumes the
    session works in (`hook_paths.session_volumes`), keeping its binding (the session goes on)."""
    for root in session_volumes(actor.session, places):
        with opened(root) as core:
            agent = acting(core, actor).agent
            with core.registry.read() as tx:
                grants = tx.grants_of(agent)
            for grant in grants:
                if not grant.fences and grant.owner == actor.process:
                    core.release(grant)
    drop_claims(actor.session, actor.process)


def end_session(actor: Actor, places: Iterable[str | None]) -> None:
    """Release every grant the actor's agent (its fork where its process acts as one) and that
    agent's subagents (`agent/…`) hold, and their process bindings, in the volumes the session
    works in (`hook_paths.session_volumes`); at the session's own end, then drop its process from
    the session's note (`hook_paths.end_process`: the note goes with the last of its processes)."""
    for root in session_volumes(actor.session, places):
        with opened(root) as core:
            agent = acting(core, actor).agent
            with core.registry.read() as tx:
                subagents = sorted({g.agent for g in tx.grants() if g.agent.startswith(agent + "/")})
            for ending in [agent, *subagents]:
                core.end_session(ending)
    if actor.agent == actor.session:
        end_process(actor.session, actor.process)
