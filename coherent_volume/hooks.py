"""What every agent's hook integration shares (Gemini CLI, Cursor, Codex): find the volume of a
path, decide within a time budget and fail closed, take and end a session's write grants,
register views from what a model was shown, word refusals and stale views for the model, and
keep the agent's settings file.

The faces (`gemini`, `cursor`, `codex`) only parse their agent's events and answer in its
format; every rule is the core's.

Invariants:
- a write check that fails or cannot decide within the budget is a denial for every path that
  is (or may be) managed; it goes ahead undecided only for a path established to be in no
  volume or unmanaged (`run_hook`, `Progress`);
- a view is registered only by `core.observe` (or, for an older version a model's edit shows it
  saw, `core.note_read`), at the version whose content matches what the model was shown;
- a write grant is taken with its check in one commit-locked step (`core.begin_write`); a hook
  releases only a grant a hook took for the same session and process (`release_hook_grant`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from .core import VolumeCore, open_core
from .diffs import cut
from .errors import CoherenceError, OutsideVolume, Reason, StaleWriteError, UnprotectedAlias
from .liveness import ProcessId
from .paths import REGISTRY_DIR, Target, is_registry_path
from .protocol import HandleKind, agent_name_problem

HOOK_TIMEOUT = 5.0
"""Seconds the agent gives a hook (each face installs it in its agent's unit). Gemini CLI, Cursor
(without `failClosed`) and Codex run the tool when a hook times out or crashes, so the hook must
answer first."""

HOOK_BUDGET = 3.0
"""Seconds from the hook process's start within which it decides; what cannot be decided in time
is denied when it is a write to a path that is (or may be) managed."""

HOOK_GRANT_TTL = 60.0
"""Seconds a write grant a hook took before a tool's write lasts at most. It spans the agent's
permission prompt and the write; the hook after the tool releases it, and it ends earlier when
the session's process dies or the session ends."""

STALE_FILES_SHOWN = 5
STALE_DIFF_LINES = 40
"""Bounds of a stale-view warning: files listed, lines of diff per file."""

Remedies = Mapping[Reason, str]
"""What a model is told to do per refusal reason, phrased for its agent's tools; may use `{ttl}`
(the grant TTL) and `{changed}` (the read-set paths that moved)."""


def agent_name(prefix: str, session: object) -> str | None:
    """The agent a session is: `prefix:session`, or `prefix:sha256-…` of the id when that would be
    no valid agent name (too long, unprintable); stable for one id. None without a session id."""
    if not isinstance(session, str) or not session:
        return None
    name = f"{prefix}:{session}"
    if agent_name_problem(name) is None:
        return name
    return f"{prefix}:sha256-{hashlib.sha256(session.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}"


def _mounts() -> dict[str, str]:
    from .mounts import fuse_mounts

    return fuse_mounts()


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a path inside a mounted or plain volume, else None.
    Mounts come from /proc (never a stat through a mount); a plain volume is the nearest ancestor
    directory holding a registry."""
    absolute = os.path.abspath(path)
    for mountpoint, root in _mounts().items():
        if absolute == mountpoint or absolute.startswith(mountpoint + os.sep):
            return root, os.path.relpath(absolute, mountpoint)
    directory = os.path.dirname(absolute)
    while True:
        if os.path.exists(os.path.join(directory, REGISTRY_DIR, "registry.db")):
            return directory, os.path.relpath(absolute, directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def volume_roots(places: Iterable[str | None]) -> set[str]:
    """The roots of every mounted volume and of the volumes holding `places` (directories)."""
    roots = set(_mounts().values())
    for place in places:
        found = locate(os.path.join(place, "x")) if place else None
        if found:
            roots.add(found[0])
    return roots


def absolute(path: object, base: object) -> str | None:
    """`path` made absolute against `base` (the agent's working directory), if it is a path."""
    if not isinstance(path, str) or not path:
        return None
    if not os.path.isabs(path) and isinstance(base, str) and base:
        path = os.path.join(base, path)
    return os.path.abspath(path)


@dataclass
class Answer:
    """What the hook prints and its exit status."""

    code: int = 0
    stdout: str = ""
    stderr: str = ""


@dataclass
class Progress:
    """How far a hook got with an event: what it answers when it cannot finish. `in_volume` and
    `managed` stay None until established; only an established False, or a check that already
    passed, lets a write check go ahead undecided. `write_check` marks events whose answer allows
    or denies a write."""

    path: str | None = None
    write_check: bool = False
    in_volume: bool | None = None
    managed: bool | None = None
    allowed: bool = False
    """The write check passed and its grants are taken: what is left (a warning) cannot deny it."""


@contextmanager
def opened(root: str) -> Iterator[VolumeCore]:
    core = open_core(root)
    try:
        yield core
    finally:
        core.registry.close()
        core.paths.close()


def _resolve(core: VolumeCore, rel: str) -> Target | None:
    """The target at `rel` if writes to it are the volume's business (managed, or an alias of an
    unmanaged path); None for an unmanaged path or a symlink out of the volume. The registry's own
    directory raises OutsideVolume."""
    try:
        target = core.resolve(rel)
    except OutsideVolume:
        if is_registry_path(rel):
            raise
        return None
    return target if target.managed or target.alias_of is not None else None


@contextmanager
def managed_targets(
    writes: Iterable[tuple[str, HandleKind]], progress: Progress
) -> Iterator[list[tuple[VolumeCore, list[tuple[Target, HandleKind]]]]]:
    """Open the volume of every path in `writes` (absolute) and resolve its managed paths, once
    each, recording in `progress` what is established; yields (core, targets) per volume holding
    any (the cores close after)."""
    by_root: dict[str, list[tuple[str, HandleKind]]] = {}
    for path, kind in writes:
        progress.path = progress.path or path
        found = locate(path)
        if found is not None:
            by_root.setdefault(found[0], []).append((found[1], kind))
    progress.in_volume = bool(by_root)
    with ExitStack() as stack:
        volumes: list[tuple[VolumeCore, list[tuple[Target, HandleKind]]]] = []
        for root, rels in by_root.items():
            core = stack.enter_context(opened(root))
            targets: dict[str, tuple[Target, HandleKind]] = {}
            for rel, kind in rels:
                target = _resolve(core, rel)
                if target is not None:
                    targets.setdefault(target.rel, (target, kind))
            if targets:
                volumes.append((core, list(targets.values())))
        progress.managed = bool(volumes)
        yield volumes


def release_hook_grant(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> bool:
    """Release the grant a hook took for this session's write of `target`; never a grant taken
    through `lock()` (those fence) nor one of another agent or process. False if none was in force."""
    with core.registry.read() as tx:
        grant = tx.grant(target.rel)
    if grant is None or grant.agent != agent or grant.fences or grant.owner != owner:
        return False
    return core.release(grant)


def _when(ts: float | None) -> str:
    return "an unknown time" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def denial_text(core: VolumeCore, refusal: StaleWriteError, remedies: Remedies) -> str:
    """What the model is told of a refusal: which file, what it saw, what is current, who wrote it
    and when, what to do, and the diff since its view (bounded)."""
    refusal = core.refusal_diff(refusal)
    with core.registry.read() as tx:
        record = tx.file(refusal.path)
    seen = (
        "you have not read it in this session"
        if refusal.seen_version is None
        else f"you last saw version {refusal.seen_version}"
    )
    who = f"written by {refusal.last_writer} at {_when(record.committed_at if record else None)}"
    held = f" {refusal.holder} holds its write grant right now." if refusal.holder else ""
    remedy = remedies[refusal.reason].format(ttl=HOOK_GRANT_TTL, changed=", ".join(refusal.changed) or "-")
    text = (
        f"coherent-volume refused this write to {refusal.path} ({refusal.reason}): {seen}; the current "
        f"version is {refusal.current_version}, {who}.{held} {remedy}"
    )
    if refusal.diff:
        text += f"\nWhat changed since version {refusal.seen_version}:\n{refusal.diff.rstrip()}"
    return text


def begin_writes(
    agent: str, writes: Iterable[tuple[str, HandleKind]], owner: ProcessId, remedies: Remedies, progress: Progress
) -> str | None:
    """Check and take `agent`'s write grant on every managed path of `writes` (absolute paths), all
    or none: None when every grant was taken (or nothing is managed), else the denial the model is
    told (grants taken so far are released). The session's process is bound to the agent, its
    views pinned to what hooks register."""
    taken: list[tuple[VolumeCore, Target]] = []
    with managed_targets(writes, progress) as volumes:
        for core, targets in volumes:
            core.bind_session(agent, owner, pinned=True)
            for target, kind in targets:
                denial = None
                if target.alias_of is not None:
                    denial = f"coherent-volume refused this write: {UnprotectedAlias(target.alias_of, target.rel)}."
                else:
                    try:  # check and grant in one commit-locked step: nobody else passes until released
                        core.begin_write(agent, target, owner, kind=kind, ttl=HOOK_GRANT_TTL)
                    except StaleWriteError as refusal:
                        denial = denial_text(core, refusal, remedies)
                if denial is not None:
                    for held_core, held in taken:
                        release_hook_grant(held_core, agent, held, owner)
                    return denial
                taken.append((core, target))
    progress.allowed = True
    return None


def end_writes(agent: str, writes: Iterable[tuple[str, HandleKind]], owner: ProcessId, *, record: bool) -> list[str]:
    """After a tool ran: with `record`, record each managed path its whole-content writes (kind
    "write") changed as `agent`'s commit (`adopt`; an append leaves its view alone); then release
    the grants `begin_writes` took. Returns what the model must be told: writes that went over a
    version the session had not seen (its grant had lapsed), logged as clobbers."""
    told: list[str] = []
    with managed_targets(writes, Progress()) as volumes:
        for core, targets in volumes:
            for target, kind in targets:
                if target.alias_of is not None:
                    continue
                if record and kind == "write":
                    with core.registry.read() as tx:
                        last = tx.events(path=target.rel, limit=1, newest_first=True)
                    core.adopt(agent, target)
                    with core.registry.read() as tx:
                        after = last[0].seq if last else 0
                        clobbers = [
                            e for e in tx.events(after=after, path=target.rel, kind="clobber") if e.agent == agent
                        ]
                    if clobbers:
                        told.append(
                            f"coherent-volume: your write to {target.rel} went over version {clobbers[-1].version} "
                            f"({clobbers[-1].detail}); your write grant had lapsed (it lasts {HOOK_GRANT_TTL:g} s), so "
                            "another session's change may be gone from the file. Read the file, check that the other "
                            f"change is still there and redo it if it is not, or tell the user. `coherent-volume log "
                            f"{core.paths.root}` shows the history."
                        )
                release_hook_grant(core, agent, target, owner)
    return told


def observe(agent: str, path: str, shown: Callable[[bytes], bool], owner: ProcessId, *, earlier: int = 0) -> int | None:
    """Register `agent`'s view of the managed file at `path` at the current version if `shown`
    confirms its content is what the model was shown; else, searching up to `earlier` retained
    older versions newest first, at the first one `shown` confirms (so a check then refuses the
    write as stale, with the diff since). The version, or None (nothing registered: not managed,
    gone, or nothing matched)."""
    found = locate(path)
    if found is None:
        return None
    with opened(found[0]) as core:
        target = _resolve(core, found[1])
        if target is None or target.alias_of is not None:
            return None
        core.bind_session(agent, owner, pinned=True)
        version = core.observe(agent, target, shown)  # a confirmed read also lifts a fence
        if version is not None or not earlier:
            return version
        for old in core.history(target, earlier + 1)[1:]:
            try:
                data = core.read_version(target, old.version) if old.hash is not None and old.retained else None
            except CoherenceError:
                continue
            if data is not None and shown(data):
                core.note_read(agent, target, old.version)
                return old.version
        return None


def start_session(agent: str, places: Iterable[str | None], owner: ProcessId) -> None:
    """Bind the session's process to `agent` (views pinned) in every mounted volume and the volumes
    holding `places`, so whatever it does through a mount is the session's from its first access
    on (a mount caches whose a process is for a moment: a binding made only between a read and a
    write could come too late for the write)."""
    for root in volume_roots(places):
        with opened(root) as core:
            core.bind_session(agent, owner, pinned=True)


def release_grants(agent: str, places: Iterable[str | None], owner: ProcessId) -> None:
    """Release every write grant hooks took for `agent`'s process `owner` in every mounted volume
    and the volumes holding `places`, keeping its binding (the session goes on)."""
    for root in volume_roots(places):
        with opened(root) as core:
            with core.registry.read() as tx:
                grants = tx.grants_of(agent)
            for grant in grants:
                if not grant.fences and grant.owner == owner:
                    core.release(grant)


def end_session(agent: str, places: Iterable[str | None]) -> None:
    """Release every grant `agent` holds and its process binding, in every mounted volume and the
    volumes holding `places`."""
    for root in volume_roots(places):
        with opened(root) as core:
            core.end_session(agent)


def _split_lines(text: str) -> list[str]:
    lines = re.split(r"\r?\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def shows(data: bytes, text: str, start: int = 1, *, whole: bool, shortened: str | None = None) -> bool:
    """Whether `text` is the file content `data` (`whole`), or lines `start`.. of it, as an agent's
    read tool shows them (line ends normalised; a trailing newline is no line). A shown line ending
    in `shortened` (a tool's marker for a cut line) stands for any line that begins with what
    precedes it."""
    shown = _split_lines(text)
    lines = _split_lines(data.decode("utf-8", "replace"))[max(start, 1) - 1 :]
    if len(shown) > len(lines) or (whole and len(shown) != len(lines)):
        return False
    for have, want in zip(lines, shown, strict=False):
        if shortened and want.endswith(shortened) and have.startswith(want[: -len(shortened)]):
            continue
        if have != want:
            return False
    return True


def stale_notice(agent: str, places: Iterable[str | None]) -> str | None:
    """What to tell a model whose views went stale, in the volumes of `places`: which files, the
    version it saw and the current one, who wrote it when, and the diff (bounded); None if none."""
    entries: list[str] = []
    more = 0
    for root in sorted(volume_roots(places)):
        try:
            found, left = _stale_entries(agent, root, len(entries))
        except (CoherenceError, OSError):
            continue  # a warning is a courtesy: a volume that cannot answer now is left out
        entries += found
        more += left
    if not entries:
        return None
    tail = f"\n(and {more} more)" if more else ""
    return (
        "coherent-volume: files you read have changed since you read them; a write to them will be refused "
        "until you read them again:\n" + "\n".join(entries) + tail
    )


def _stale_entries(agent: str, root: str, shown: int) -> tuple[list[str], int]:
    """`stale_notice`'s entries for one volume (while fewer than STALE_FILES_SHOWN are `shown`), and
    how many more stale files it left out."""
    entries: list[str] = []
    more = 0
    with opened(root) as core:
        if core.stale(agent):
            with core.registry.read() as tx:
                rows = [(path, seen, now, tx.file(path)) for path, seen, now in tx.stale_views(agent)]
            for path, seen, now, record in rows:
                if shown + len(entries) >= STALE_FILES_SHOWN:
                    more += 1
                    continue
                what = "deleted" if record is not None and not record.present else f"now version {now}"
                writer = record.writer if record else "unknown"
                when = _when(record.committed_at if record else None)
                entry = f"- {path}: you last saw version {seen}; it is {what}, written by {writer} at {when}"
                diff = core.refusal_diff(StaleWriteError(path, agent, "stale", seen, now, writer)).diff
                if diff:  # the core's diff since a view, bounded as in a refusal, then shorter
                    entry += "\n" + cut(diff, STALE_DIFF_LINES).rstrip()
                entries.append(entry)
    return entries, more


# ---- shell commands ------------------------------------------------------------------

_REDIRECTS: dict[str, HandleKind] = {">": "write", ">|": "write", "&>": "write", ">>": "append", "&>>": "append"}
_INPUTS = {"<", "<<", "<<-", "<<<", "<&", ">&", "<>"}
_WRAPPERS = {"sudo", "command", "exec", "nohup", "env", "time", "nice", "doas"}
_MOST_EXPANDED = 1000
"""Files a directory a command removes or moves is expanded to at most."""
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def _without_heredoc_bodies(command: str) -> str:
    """`command` without the bodies of its here-documents (data, not commands)."""
    out: list[str] = []
    lines = command.split("\n")
    i = 0
    while i < len(lines):
        out.append(lines[i])
        ends = [m.group(2) for m in _HEREDOC.finditer(lines[i])]
        i += 1
        for end in ends:
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
    return "\n".join(out)


def _operands(args: list[str], valued: set[str]) -> tuple[list[str], dict[str, str]]:
    """A command's operands (after its options) and the values of the options in `valued`."""
    operands: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            operands.extend(args[i + 1 :])
            break
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            if name in valued:
                if "=" in arg:
                    values[name] = arg.split("=", 1)[1]
                elif i + 1 < len(args):
                    values[name] = args[i + 1]
                    i += 1
        else:
            operands.append(arg)
        i += 1
    return operands, values


def _into(dest: str, sources: list[str], cwd: str) -> list[str]:
    """Where `sources` land when copied or moved to `dest` (an existing directory or a name)."""
    where = absolute(dest, cwd) or dest
    if os.path.isdir(where):
        return [os.path.join(where, os.path.basename(s.rstrip("/"))) for s in sources]
    return [where]


def _command_writes(words: list[str], cwd: str) -> list[tuple[str, HandleKind, bool]]:
    """The files one simple command (its redirections aside) writes, as far as it can be
    recognised: (path as given, how, whether a directory there stands for the files below it)."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    while words and os.path.basename(words[0]) in _WRAPPERS:
        words = words[1:]
        while words and (words[0].startswith("-") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
            words = words[1:]
    if not words:
        return []
    name, args = os.path.basename(words[0]), words[1:]
    files: list[str] = []
    removed: list[str] = []
    kind: HandleKind = "write"
    if name == "tee":
        files, _ = _operands(args, set())
        kind = "append" if {"-a", "--append"} & set(args) else "write"
    elif name in ("sed", "perl") and any(a.startswith(("-i", "--in-place")) or re.match(r"^-\w*i", a) for a in args):
        script_flags = {"-e", "--expression", "-f", "--file"} if name == "sed" else {"-e", "-E"}
        files, values = _operands(args, script_flags | {"-l", "-s", "--line-length"})
        if not set(values) & script_flags and files:
            files = files[1:]  # the first operand is the script
    elif name in ("rm", "unlink", "shred"):
        removed, _ = _operands(args, set())
    elif name in ("mv", "cp", "install"):
        operands, values = _operands(args, {"-t", "--target-directory", "-S", "--suffix", "-m", "--mode"})
        target_dir = values.get("-t") or values.get("--target-directory")
        sources = operands if target_dir else operands[:-1]
        if sources:
            files = _into(target_dir + "/" if target_dir else operands[-1], sources, cwd)
        if name == "mv":
            removed = sources  # a move deletes its sources
    elif name == "truncate":
        files, _ = _operands(args, {"-s", "--size", "-r", "--reference"})
    elif name == "dd":
        files = [a[3:] for a in args if a.startswith("of=")]
    return [(f, kind, False) for f in files] + [(f, "write", True) for f in removed]


def _expand(path: str) -> list[str]:
    """The regular files at or below `path` (a directory a command removes or moves)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return [path]
    found: list[str] = []
    for directory, _dirs, names in os.walk(path):
        found.extend(os.path.join(directory, n) for n in names)
        if len(found) >= _MOST_EXPANDED:
            break
    return found[:_MOST_EXPANDED]


def shell_writes(command: str, cwd: str) -> list[tuple[str, HandleKind]]:
    """The files (absolute) a shell command recognisably writes, each with how: redirections
    (`>`, `>>`, `&>`), `tee`, `sed -i`/`perl -i`, `rm`, `mv`, `cp`, `install`, `truncate`,
    `dd of=`; a directory removed or moved stands for the files below it. Anything else (a
    script, an interpreter's own file writes) is not recognised; unparsable text yields nothing."""
    lexer = shlex.shlex(_without_heredoc_bodies(command), posix=True, punctuation_chars=";&|<>()\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    found: list[tuple[str, HandleKind, bool]] = []
    words: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        punct = all(c in ";&|<>()\n" for c in token)
        if punct and token in _REDIRECTS:
            if words and words[-1].isdigit():
                words.pop()  # a file descriptor number: 2>file
            if i + 1 < len(tokens):
                found.append((tokens[i + 1], _REDIRECTS[token], False))
            i += 2
            continue
        if punct and token in _INPUTS:
            if words and words[-1].isdigit():
                words.pop()
            i += 2
            continue
        if punct:
            found.extend(_command_writes(words, cwd))
            words = []
        else:
            words.append(token)
        i += 1
    found.extend(_command_writes(words, cwd))
    out: list[tuple[str, HandleKind]] = []
    for path, kind, expand in found:
        where = absolute(path, cwd)
        if where is not None:
            out.extend((p, kind) for p in (_expand(where) if expand else [where]))
    return out


# ---- running one hook ----------------------------------------------------------------


UNDONE = {
    "read": "no view was registered, so a write to it is refused until it is read again",
    "write": (
        "the write was not recorded as this session's (it is recorded as a change by 'external' at the next "
        f"access), and its write grant ends by itself within {HOOK_GRANT_TTL:g} s"
    ),
    "other": "nothing was recorded for this event",
    "allowed": "the write was checked and allowed; only the warning about stale files was left out",
}
"""What an event a hook could not finish leaves undone, by what the event was about."""


def warning(what: str, event_name: object, progress: Progress, undone: str) -> Answer:
    """The answer to an event that could not be finished and needs no denial: a warning on stderr
    saying what was left `undone` (a key of UNDONE; a write check that passed says so itself)."""
    left = UNDONE["allowed" if progress.allowed else undone]
    return Answer(0, "", f"coherent-volume: {what} ({event_name} for {progress.path or 'this file'}); {left}")


def undecided_text(path: str | None, what: str) -> str:
    """What the model is told when a write could not be checked (`what` says why)."""
    shown = path or "this file"
    return (
        f"coherent-volume could not check this write to {shown}: {what}. It refused the write because an unchecked "
        "write could overwrite another session's work. Retry the write in a few seconds (read the file again first "
        f"if it may have changed). If it keeps being refused, run `coherent-volume why {shown}` to see what holds "
        "the volume, and tell the user."
    )


def run_hook(
    stdin: str,
    handle: Callable[[dict[str, Any], Progress], Answer],
    undecided: Callable[[dict[str, Any], Progress, str], Answer],
    budget: float = HOOK_BUDGET,
) -> Answer:
    """Parse one event and `handle` it within `budget` seconds; if it fails or overruns,
    `undecided(event, progress, why)` answers (a face denies a write check unless `progress`
    established the path is in no volume or unmanaged). An event that is not a JSON object names
    no file: it is answered with a warning only."""
    try:
        event = json.loads(stdin.lstrip("\ufeff"))
        if not isinstance(event, dict):
            raise TypeError("the event is not a JSON object")
    except (TypeError, ValueError) as e:
        return Answer(0, "", f"coherent-volume: unreadable hook event ({e}); it names no file, so nothing was checked")
    progress = Progress()
    result: list[Answer] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(handle(event, progress))
        except BaseException as e:  # noqa: BLE001 -- answered below: a hook must never crash the session
            failure.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(max(budget, 0.0))
    if result:
        return result[0]
    if failure:
        return undecided(event, progress, f"the check failed ({type(failure[0]).__name__}: {failure[0]})")
    return undecided(
        event,
        progress,
        f"the check did not finish in time (waited {budget:.1f} s; the volume's registry is busy: another process "
        "may hold its commit lock)",
    )


def passes_undecided(progress: Progress) -> bool:
    """Whether an event that could not be finished may go ahead: anything but a write check, a
    write check of a path established to be in no volume or unmanaged, or one that passed."""
    return not progress.write_check or progress.in_volume is False or progress.managed is False or progress.allowed


def process_age() -> float:
    """Seconds since this process started (0 if /proc cannot tell): the budget includes start-up."""
    try:
        with open("/proc/self/stat", "rb") as f:
            started = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    age = uptime - started / os.sysconf("SC_CLK_TCK")
    return age if 0.0 <= age < HOOK_TIMEOUT else 0.0  # a clock that makes no sense (namespaces): unknown


SHELLS = {"sh", "dash", "bash", "zsh"}


def session_process() -> ProcessId:
    """The agent process that ran this hook: the nearest ancestor that is not a shell (hooks may be
    started through `sh -c`)."""
    pid = os.getppid()
    for _ in range(4):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            break
        if comm not in SHELLS or parent <= 1:
            break
        pid = parent
    return ProcessId.of(pid)


def run_cli(run: Callable[[str, float], Answer]) -> None:
    """The body of a `coherent-volume hook AGENT` command: read the event on stdin, answer within
    the budget counted from the process's start, print, and exit without waiting for a worker
    thread that overran. A failure before `run` could answer blocks with exit status 2, which
    every supported agent treats as a denial carrying stderr."""
    try:
        stdin = sys.stdin.buffer.read().decode("utf-8", "replace")
        answer = run(stdin, max(HOOK_BUDGET - process_age(), 0.2))
    except BaseException as e:  # noqa: BLE001 -- run answers every failure itself; this is the last resort
        answer = Answer(
            2, "", f"coherent-volume: the hook failed before it could decide ({e}); the action was blocked: retry it"
        )
    if answer.stdout:
        sys.stdout.write(answer.stdout + "\n")
    if answer.stderr:
        sys.stderr.write(answer.stderr + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(answer.code)


# ---- settings files and commands ------------------------------------------------------


def hook_command(face: str) -> str:
    """The command an agent runs for its hook: this installation's CLI, by absolute path."""
    cli = shutil.which("coherent-volume") or str(Path(sys.executable).parent / "coherent-volume")
    return f"{os.path.abspath(cli)} hook {face}"


def load_settings(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text() or "{}")
    except ValueError as e:
        raise CoherenceError(f"{path} is not valid JSON ({e}); fix it first, nothing was changed") from e
    if not isinstance(data, dict) or not isinstance(data.get("hooks", {}), dict):
        raise CoherenceError(f"{path} does not hold a JSON object with a `hooks` object; nothing was changed")
    return data


def save_settings(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".coherent-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def merge_hooks(
    path: Path, ours: dict[str, list[dict[str, Any]]], is_ours: Callable[[dict[str, Any]], bool], top: dict[str, Any]
) -> None:
    """Put `ours` (event -> entries) into the `hooks` object of the settings at `path`, replacing
    entries `is_ours` recognises and keeping every other setting and hook; `top` are top-level
    keys set only when missing. Idempotent."""
    data = load_settings(path)
    for key, value in top.items():
        data.setdefault(key, value)
    hooks = data.setdefault("hooks", {})
    for event, entries in ours.items():
        kept = [e for e in hooks.get(event, []) if not (isinstance(e, dict) and is_ours(e))]
        hooks[event] = kept + entries
    save_settings(path, data)


def remove_hooks(path: Path, is_ours: Callable[[dict[str, Any]], bool], top: dict[str, Any]) -> None:
    """Remove exactly the entries `is_ours` recognises (and `top` keys `merge_hooks` added, when
    nothing else is left in `hooks`). A missing file stays missing."""
    if not path.exists():
        return
    data = load_settings(path)
    hooks = data.get("hooks", {})
    for event in list(hooks):
        hooks[event] = [e for e in hooks[event] if not (isinstance(e, dict) and is_ours(e))]
        if not hooks[event]:
            del hooks[event]
    if not hooks:
        data.pop("hooks", None)
        for key, value in top.items():
            if data.get(key) == value:
                del data[key]
    save_settings(path, data)


def place(project_dir: str | None, user: bool, folder: str, name: str) -> Path:
    """`~/FOLDER/NAME` with `user`, else `PROJECT_DIR/FOLDER/NAME` (the working directory by default)."""
    return (Path.home() if user else Path(project_dir or ".").resolve()) / folder / name


def face_group(
    name: str, summary: str, where: tuple[str, str], install: Callable[[Path], None], uninstall: Callable[[Path], None]
) -> click.Group:
    """`coherent-volume NAME install [DIR] [--user]` / `uninstall` of one agent's settings file
    `where` = (folder, file name), in DIR or the home directory."""

    @click.group(name, help=summary)
    def group() -> None:
        pass

    shown = "/".join(where)
    for verb, fn, done, what in (
        ("install", install, "installed coherent-volume hooks in", "Merge the hooks into"),
        ("uninstall", uninstall, "removed coherent-volume hooks from", "Remove exactly the hooks install added from"),
    ):

        def command(project_dir: str | None, user: bool, fn: Callable[[Path], None] = fn, done: str = done) -> None:
            path = place(project_dir, user, *where)
            try:
                fn(path)
            except (CoherenceError, OSError) as e:
                raise click.ClickException(str(e)) from e
            click.echo(f"{done} {path}")

        command.__doc__ = f"{what} DIR/{shown} (idempotent; other settings are kept)."
        decorated = click.option("--user", is_flag=True, help=f"Use ~/{shown} instead.")(command)
        decorated = click.argument("project_dir", required=False, metavar="[DIR]", type=click.Path(file_okay=False))(
            decorated
        )
        group.command(verb)(decorated)
    return group


def face_hook(name: str, run: Callable[[str, float], Answer]) -> click.Command:
    """`coherent-volume hook NAME`: the entry point the agent runs for every hooked event."""

    @click.command(name)
    def hook() -> None:
        run_cli(run)

    hook.help = (
        f"Read one {name} hook event (JSON) on stdin and answer it within {HOOK_BUDGET:g} s of the process's start; "
        "a write to a path that is (or may be) managed that cannot be decided in time is denied."
    )
    return hook
