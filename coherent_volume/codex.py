"""Codex CLI sessions as agents, whose view is what their patches show they saw.

Codex has no read hook: its model reads files through shell commands whose output no hook sees
whole. What a Codex model saw of a file shows in its edits instead: an `apply_patch` hunk's
context and removed lines are the text the model believes the file holds. So a Codex session's
view of a file is formed from its patches (https://developers.openai.com/codex/hooks):

- PreToolUse `apply_patch` parses the patch (`*** Update File:`, `*** Add File:`,
  `*** Delete File:`, `*** Move to:`). For each file it updates that no other section of the patch
  names (one named twice is judged as a whole by the view the session held before), the view is registered at the
  current version when every hunk's old lines are in the current content exactly, whitespace
  included (`fits`: the patch then only changes text that is current, so applying it loses
  nobody's change), and where that moves the view over other writers' versions since the
  session's last one, the model is told what they changed (`stale_warnings.passed_warning`: the
  patch's lines showed it none of that); else at the newest retained older version they are in
  exactly, so the write is refused as stale with the diff since; else nothing is registered. Then every file the patch
  touches is checked and the session's write grant taken in one step (whole-file additions over an
  existing file, deletions and move targets need a view the session already has), or the patch is
  denied with `permissionDecision: "deny"`. A `stale` patch that updates one file the volume's
  merge globs name is merged with the current version (`hook_merge`: its hunks made to the
  version they fit, merged three-way): committed by the hook where Codex applies patches without
  asking (MERGE_MODES), else shown; the patch is denied;
- PreToolUse `Bash` does the same for writes `shell_writes` recognises (they need a view a
  patch registered: a file never patched is refused `unread`), its refusals worded for a shell
  command (`SHELL_REMEDIES`). A `Bash` command that runs
  `apply_patch` is applied by Codex itself with no `apply_patch` event: `shell_writes` refuses it
  in a volume, so a patch is checked only as the apply_patch tool;
- SessionStart binds the session's process (on a mount, what it does is the session's);
  PostToolUse records the commits its call (`tool_use_id`) claimed and releases the grants no
  other running call claims (after a `Bash` command,
  also the deletions of files its words no longer name, `hook_steps.end_deletions`); Stop (the end of a turn)
  releases the grants the session still holds (a patch the user rejected took one);
  UserPromptSubmit and allowed tool calls tell the model (`additionalContext`) which files it
  saw went stale.

Each session is the agent `codex:<session_id>` (a subagent: `codex:<session_id>/<agent_id>`).
The session's process is bound with pinned views, so on a mount its shell commands write as the
same agent and their reads never refresh a view. Every rule is the core's.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from . import hook_merge, hook_paths, hook_settings, hook_steps, hooks
from .core import VolumeCore
from .errors import Reason, StaleWriteError
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import Target
from .protocol import HandleKind
from .shell_writes import ShellWrites, shell_writes
from .stale_warnings import passed_warning, stale_warning

PREFIX = "codex"
PATCH_TOOL = "apply_patch"
SHELL_TOOL = "Bash"

_SHOW = "Print the file's current content with a shell command (for example `cat` it), then"
REMEDIES: dict[Reason, str] = {
    "stale": f"Your patch was written against an earlier version. {_SHOW} write the patch again from it.",
    "unread": (
        "coherent-volume has no evidence that you saw the file's current content: the patch's context lines fit "
        "no version of it, or the change replaces, deletes or moves over the whole file, which a patch shows "
        f"nothing of. {_SHOW} make your change with apply_patch (`*** Update File:` with context lines from that "
        "content). To delete or replace a file you have not updated in this session, ask the user."
    ),
    "held": (
        "Another session is writing it right now; its grant ends when that write is done (after {ttl:g} s at "
        f"the latest). Wait a few seconds (for example run `sleep 5`), then {_SHOW[0].lower()}{_SHOW[1:]} redo "
        "your change from it."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it are "
        f"held back until you show you saw it again. {_SHOW} write the patch again from it."
    ),
    "read-set": "Files this change builds on have changed since you saw them ({changed}). Print them again, "
    "then redo your change.",
}
"""What the model is told to do, per refusal reason, for an apply_patch patch."""

_NO_READS = (
    "Codex tells coherent-volume of no read, only of patches, so a view of a file is what a patch of yours showed "
    "of it."
)
SHELL_REMEDIES: dict[Reason, str] = {
    **REMEDIES,
    "stale": (
        "This command would change the file over a version you have not seen: it changed since your last patch of "
        f"it. {_NO_READS} {_SHOW} make your change with apply_patch from it (`*** Update File:` with context lines "
        "from that content); once a patch of yours fits its current content, shell commands may change it again."
    ),
    "unread": (
        "coherent-volume has no evidence that you saw the file's current content, which this command changes or "
        f"removes: no patch of yours in this session fits it. {_NO_READS} {_SHOW} make your change with apply_patch "
        "(`*** Update File:` with context lines from that content); once a patch of yours fits its current content, "
        "shell commands may change it. To delete or replace a file you have not updated in this session, ask the "
        "user."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it are "
        f"held back until a patch of yours shows you saw it again. {_SHOW} make your change with apply_patch from "
        "it."
    ),
}
"""What the model is told to do, per refusal reason, for a shell command (`Bash`): no patch is
involved, and printing a file gives no view (Codex has no read hook), a patch does."""


@dataclass
class Hunk:
    """One hunk of a file's update: its old lines (context and removed) and its new lines (context
    and added), in order."""

    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    at_end: bool = False
    """Marked `*** End of File`: its old lines end the file."""
    seek_only: bool = False
    """An `@@ line` anchor: its one old line is sought, and kept as the file has it."""


@dataclass
class FilePatch:
    """One file's section of an apply_patch patch."""

    path: str
    op: str
    """"add", "delete" or "update"."""
    move_to: str | None = None
    hunks: list[Hunk] = field(default_factory=list)


HEADERS = {"*** Add File: ": "add", "*** Delete File: ": "delete", "*** Update File: ": "update"}
BEGIN_PATCH, END_PATCH, MOVE_TO, END_OF_FILE = "*** Begin Patch", "*** End Patch", "*** Move to: ", "*** End of File"
HEREDOC_OPENINGS = ("<<EOF", "<<'EOF'", '<<"EOF"')
WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
)
"""The characters Rust's `trim` removes (Unicode White_Space), which Codex trims a patch and its
markers by; Python's `str.strip` also removes U+001C..U+001F."""


def lines_of(text: str) -> list[str]:
    """`text`'s lines as Codex reads a patch and a file it patches (Rust's `str::lines`): split at
    newlines only, the carriage return before a newline dropped. Never `str.splitlines`, which also
    splits at a lone carriage return, a form feed, U+0085 or U+2028: a line Codex reads whole, such
    as an added `x<CR>*** End Patch`, would be read as the patch's end, and the files after it unseen."""
    *ended, last = text.split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in ended]  # (a last line's is kept)
    return [*lines, last] if last else lines


def parse_patch(text: str) -> list[FilePatch]:
    """The files of an apply_patch patch, with each update's hunks, read by Codex's grammar
    (codex-rs/apply-patch `parser.rs`): the first and last lines, trimmed, are the patch's markers
    (or those of a heredoc around it); a file's section starts at a trimmed header; within an
    update, a line opening with a space is context whatever it holds, one opening with `*` ends the
    update, `@@` and `@@ line` (untrimmed) open a hunk, the text after `@@ ` being a line to seek
    before it, so a hunk of its own that changes nothing. A patch that grammar refuses, which Codex
    applies none of, is read leniently (`_scanned`): every header anywhere names a file."""
    files = _parsed(lines_of(text.strip(WHITESPACE)))
    return _scanned(text) if files is None else files


def _parsed(lines: list[str]) -> list[FilePatch] | None:
    """`parse_patch` by Codex's grammar; None where it refuses the patch."""
    body = _body(lines)
    if body is None and len(lines) >= 4 and lines[0] in HEREDOC_OPENINGS and lines[-1].endswith("EOF"):
        body = _body(lines[1:-1])
    if body is None:
        return None
    files: list[FilePatch] = []
    while body:
        found = _section(body)
        if found is None:
            return None
        patch, used = found
        files.append(patch)
        body = body[used:]
    return files


def _body(lines: list[str]) -> list[str] | None:
    """The lines between the patch's markers, None unless the first and last lines are those."""
    if len(lines) < 2 or lines[0].strip(WHITESPACE) != BEGIN_PATCH or lines[-1].strip(WHITESPACE) != END_PATCH:
        return None
    return lines[1:-1]


def _section(lines: list[str]) -> tuple[FilePatch, int] | None:
    """The file section `lines` start with and how many lines it takes; None if it is none."""
    header = lines[0].strip(WHITESPACE)
    op, path = next(((o, header[len(p) :]) for p, o in HEADERS.items() if header.startswith(p)), (None, ""))
    if op == "add":
        used = 1
        while used < len(lines) and lines[used].startswith("+"):
            used += 1
        return FilePatch(path, op), used
    if op == "delete":
        return FilePatch(path, op), 1
    if op is None:
        return None
    patch, used = FilePatch(path, op), 1
    if used < len(lines) and lines[used].startswith(MOVE_TO):
        patch.move_to = lines[used][len(MOVE_TO) :].strip(WHITESPACE)
        used += 1
    first = True
    while used < len(lines):
        line = lines[used]
        if not line.strip(WHITESPACE):
            used += 1
            continue
        if line.startswith("*"):
            break
        found = _hunks(lines[used:], first)
        if found is None:
            return None
        hunks, taken = found
        patch.hunks += [h for h in hunks if h.old or h.new]
        used, first = used + taken, False
    return (patch, used) if not first else None


def _hunks(lines: list[str], first: bool) -> tuple[list[Hunk], int] | None:
    """The hunk `lines` start with (after its `@@ line` anchor's, if any) and how many lines they
    take; None where Codex refuses them (no `@@` but on a file's first hunk, no line, a line of no
    kind first)."""
    start, hunks = 1, []
    if lines[0] != "@@" and not lines[0].startswith("@@ "):
        if not first:
            return None
        start = 0
    elif lines[0].startswith("@@ ") and lines[0][3:].strip(WHITESPACE):
        anchor = lines[0][3:].strip(WHITESPACE)
        hunks.append(Hunk([anchor], [anchor], seek_only=True))
    if start >= len(lines):
        return None
    hunk, taken = Hunk(), 0
    for line in lines[start:]:
        if line == END_OF_FILE:
            if not taken:
                return None
            hunk.at_end, taken = True, taken + 1
            break
        kind = line[:1]
        if kind not in ("", " ", "+", "-"):
            if not taken:
                return None
            break
        if kind != "+":
            hunk.old.append(line[1:])
        if kind != "-":
            hunk.new.append(line[1:])
        taken += 1
    return [*hunks, hunk], start + taken


def _scanned(text: str) -> list[FilePatch]:
    """A patch Codex's grammar refuses (and Codex applies none of), read leniently: every line that
    reads as a header once trimmed names a file, wherever it is; the hunks as `parse_patch` reads them."""
    files: list[FilePatch] = []
    for line in lines_of(text):
        header = line.strip()
        op = next((o for prefix, o in HEADERS.items() if header.startswith(prefix)), None)
        if op is not None:
            files.append(FilePatch(header.split(": ", 1)[1].strip(), op))
            continue
        current = files[-1] if files else None
        if current is None or current.op != "update":
            continue
        if header.startswith("*** Move to: "):
            current.move_to = header.split(": ", 1)[1].strip()
        elif header.startswith("@@"):
            context = header[2:].strip()
            if context:
                current.hunks.append(Hunk([context], [context], seek_only=True))
            current.hunks.append(Hunk())
        elif header == "*** End Patch":
            continue
        elif header == "*** End of File":
            if current.hunks:
                current.hunks[-1].at_end = True
        elif header.startswith("***"):
            continue
        elif line[:1] in (" ", "-", "+", ""):
            if not current.hunks:
                current.hunks.append(Hunk())
            if line[:1] != "+":
                current.hunks[-1].old.append(line[1:])
            if line[:1] != "-":
                current.hunks[-1].new.append(line[1:])
    for patch in files:
        patch.hunks = [h for h in patch.hunks if h.old or h.new]
    return files


def _seek(lines: list[str], want: list[str], start: int, at_end: bool = False) -> int | None:
    """Where `want` first occurs in `lines` from `start` on (at their end if `at_end`). `patched`
    gives both with each line's surrounding whitespace trimmed, as Codex compares them when it
    finds a hunk; `fits` compares them as they are."""
    first = max(start, len(lines) - len(want)) if at_end else start
    return next((i for i in range(first, len(lines) - len(want) + 1) if lines[i : i + len(want)] == want), None)


def _trimmed(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


def fits(data: bytes, hunks: list[Hunk]) -> bool:
    """Whether every hunk's old lines occur in `data`, in order, exactly as the file holds them
    (line ends aside): then the model saw this text. Whitespace counts: apply_patch finds a hunk
    whose lines differ from the file's only in whitespace and writes its new lines over the
    file's, so a patch built on text another writer re-indented since would undo that change. An
    `@@ line` anchor, which the patch gives trimmed and apply_patch keeps as the file has it, is
    compared trimmed."""
    lines = lines_of(data.decode("utf-8", "replace"))
    trimmed = _trimmed(lines) if any(h.seek_only for h in hunks) else lines
    at = 0
    for hunk in (h for h in hunks if h.old):
        have = trimmed if hunk.seek_only else lines
        found = _seek(have, hunk.old, at)
        if found is None:
            return False
        at = found + len(hunk.old)
    return True


def patched(text: str, hunks: list[Hunk]) -> str | None:
    """`text` updated by `hunks` as apply_patch updates a file: each hunk's old lines, found in
    order after the previous hunk's (`_seek`), replaced by its new lines (an anchor is only
    sought: its line stays as the file has it); the result ends with a
    newline. None if a hunk is not found, or adds lines without old ones (apply_patch puts those
    at the file's end, which no merge reproduces with certainty)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    trimmed = _trimmed(lines)
    out: list[str] = []
    at = 0
    for hunk in hunks:
        found = _seek(trimmed, _trimmed(hunk.old), at, hunk.at_end) if hunk.old else None
        if found is None:
            return None
        kept = lines[found : found + len(hunk.old)] if hunk.seek_only else hunk.new
        out += lines[at:found] + kept
        at = found + len(hunk.old)
    return "\n".join(out + lines[at:]) + "\n"


def _actor(event: dict[str, Any], process: ProcessId | None) -> hook_steps.Actor | None:
    """The session (or, with `agent_id`, its subagent) an event acts for; None without a session id."""
    session, sub = event.get("session_id"), event.get("agent_id")
    agent = hooks.agent_name(PREFIX, session)
    if agent is None:
        return None
    if isinstance(sub, str) and sub:
        return hook_steps.Actor(
            hooks.agent_name(PREFIX, f"{session}/{sub}") or agent, agent, process or hooks.session_process()
        )
    return hook_steps.Actor(agent, agent, process or hooks.session_process())


def _command(event: dict[str, Any]) -> str | None:
    tool_input = event.get("tool_input")
    command = tool_input.get("command") if isinstance(tool_input, dict) else None
    return command if isinstance(command, str) else None


WORKDIR = (
    "cd <workdir>",
    "the directory Codex runs the command in, the tool call's `workdir` where one is given, which its hook event "
    "does not carry (only the turn's directory, `cwd`)",
    "Name the files the command writes by absolute paths, or begin the command with `cd` to an absolute directory "
    "(`cd /abs/dir && …`) and leave `workdir` out, so the hook checks the files it writes.",
)
"""A Codex shell command's relative paths (`shell_writes`'s `elsewhere`): Codex runs `exec_command` and
`shell` in their `workdir` (the turn's directory joined with it), but the PreToolUse and PostToolUse
events it builds for them give only `{"command": …}` as `tool_input` and the turn's `cwd`."""


def _shell_writes(event: dict[str, Any], command: str) -> ShellWrites:
    """What a `Bash` event's command writes: run in the `workdir` its input gives (relative to its `cwd`,
    or absolute), where it gives one; else in a directory the hook cannot know (WORKDIR)."""
    known = _workdir(event) is not None
    return shell_writes(command, _shell_place(event)) if known else shell_writes(command, _shell_place(event), WORKDIR)


def _workdir(event: dict[str, Any]) -> str | None:
    """The `workdir` a `Bash` event's input gives, if any (Codex's own events never carry one)."""
    tool_input = event.get("tool_input")
    workdir = tool_input.get("workdir") if isinstance(tool_input, dict) else None
    return workdir if isinstance(workdir, str) and workdir else None


def _shell_place(event: dict[str, Any]) -> str:
    """The directory a `Bash` event's command is known to start in, or judged at (`_shell_writes`)."""
    cwd, workdir = event.get("cwd"), _workdir(event)
    base = cwd if isinstance(cwd, str) else "."
    return base if workdir is None else os.path.join(base, workdir)


def _patches(event: dict[str, Any]) -> list[FilePatch]:
    """The files of the event's apply_patch patch (none for another tool), their paths (and move
    targets) made absolute against the event's `cwd`, once; a file with no path is left out."""
    command, cwd = _command(event), event.get("cwd")
    if event.get("tool_name") != PATCH_TOOL or command is None:
        return []
    placed = (
        (patch, hooks.absolute(patch.path, cwd), hooks.absolute(patch.move_to, cwd)) for patch in parse_patch(command)
    )
    return [replace(patch, path=path, move_to=move_to) for patch, path, move_to in placed if path is not None]


def _writes(event: dict[str, Any], patches: list[FilePatch]) -> list[tuple[str, HandleKind]] | ShellWrites:
    """The files the event's patch (`_patches`) or shell command writes (absolute), with how."""
    command = _command(event)
    if event.get("tool_name") in (SHELL_TOOL, PATCH_TOOL) and command is None:  # (a write check: denied)
        given = repr(event.get("tool_input"))[:200]
        raise ValueError(f"the tool's input gives no command as a string (it gives {given})")
    if event.get("tool_name") == SHELL_TOOL and command is not None:
        return _shell_writes(event, command)
    paths = (path for patch in patches for path in (patch.path, patch.move_to))
    return [(path, "write") for path in paths if path is not None and not _unlinked_link(path, patches)]


def _unlinked_link(path: str, patches: list[FilePatch]) -> bool:
    """Whether the patch only removes `path` and it is a symlink: a `*** Delete File:` or the source
    of a `*** Move to:`, which apply_patch removes (`remove_file`, unlink(2)) without following it, so
    no file it leads to is written (`hook_paths.unlinks_link`)."""
    removed = [p for p in patches if p.path == path and (p.op == "delete" or p.move_to not in (None, path))]
    kept = [p for p in patches if path in (p.move_to, p.path) and p not in removed]
    return bool(removed) and not kept and hook_paths.unlinks_link(path)


def _named_twice(patches: list[FilePatch]) -> set[str]:
    """The paths (as the patches give them) of files that more than one section names, as its path
    or where it moves it, counted one name per file however it is reached (`hook_paths.one_name`:
    through a mount of a volume, its root or a bind mount alike)."""
    given = {name for patch in patches for name in (patch.path, patch.move_to) if name is not None}
    one = {name: hook_paths.one_name(name) for name in given}
    sections = Counter(
        file for patch in patches for file in {one[n] for n in (patch.path, patch.move_to) if n is not None}
    )
    return {name for name in given if sections[one[name]] > 1}


def _updates(patches: list[FilePatch]) -> list[FilePatch]:
    """The patch's updates with old lines."""
    return [patch for patch in patches if patch.op == "update" and any(h.old for h in patch.hunks)]


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Codex hook event; errors propagate (`FACE.run` answers them, failing closed for
    managed writes). `process` is the Codex process, looked up when not given."""
    name, cwd = event.get("hook_event_name"), event.get("cwd")
    places = [cwd if isinstance(cwd, str) else None]
    actor = _actor(event, process)
    command, patches = _command(event), []
    shell = None
    if name == "PreToolUse" and event.get("tool_name") == SHELL_TOOL and command is not None:
        shell = command, _shell_place(event)
    face = SHELL_FACE if event.get("tool_name") == SHELL_TOOL else FACE

    def find() -> list[tuple[str, HandleKind]] | ShellWrites:
        patches.extend(_patches(event))  # in the write check: a path it cannot place denies the patch
        return _writes(event, patches)

    found = hook_steps.planned(progress, face, name == "PreToolUse", shell, find)
    if isinstance(found, Answer):
        return found
    writes, updates = found, _updates(patches)
    if actor is None:
        return Answer(0, "", hook_steps.unattributed(writes, progress, "session_id"))
    passed: list[hook_steps.Passed] = []  # views a patch moved over others' changes: told below
    if progress.write_check:
        twice = _named_twice(patches)  # (their sections are judged together, by the view held before)
        for patch in updates:  # what the patch shows the model saw, of a file no other section names
            if patch.path in twice:
                continue
            fit = partial(fits, hunks=patch.hunks)
            hook_steps.observe(actor, patch.path, fit, passed=passed)
        merging = event.get("tool_name") == PATCH_TOOL
        refused = partial(_refused, event, progress, _change(writes, updates)) if merging else None
        denial = hook_steps.begin_writes(actor, writes, progress, face, refused, hooks.tool_call(event))
        if denial is not None:  # its views moved all the same: what they moved over is told too
            return hooks.denied_too(denial, passed_warning(passed, FACE, goes_ahead=False))
    if name in ("PreToolUse", "UserPromptSubmit"):
        progress.decide(Answer(), hooks.WARN_BUDGET)
        warning = stale_warning(actor, hook_paths.session_volumes(actor.session, places), FACE)
        return hooks.with_context(Answer(), name, [passed_warning(passed, FACE), warning])
    if name == "PostToolUse":
        call = hooks.tool_call(event)
        made = hook_merge.made(_change(writes, updates)) if event.get("tool_name") == PATCH_TOOL else None
        told = hook_steps.end_writes(actor, writes, progress, record=True, tool=call, made=made) if writes else []
        if event.get("tool_name") == SHELL_TOOL:
            told += hook_steps.end_deletions(actor, places, record=True, tool=call)
        return hooks.with_context(Answer(), name, told)
    if name == "SessionStart":
        hook_steps.start_session(actor, places)
    elif name == "Stop":
        hook_steps.release_grants(actor, places)
    return Answer()


MERGE_MODES = frozenset({"acceptEdits", "bypassPermissions"})
"""The `permission_mode`s of Codex's hook events in which it applies patches without asking the
user (Codex reports its approval policy `never` as bypassPermissions, every other as default).
Only in these does the hook commit a clean merge itself (`hook_merge`)."""


def _refused(
    event: dict[str, Any],
    progress: Progress,
    change: hook_merge.Change | str,
    core: VolumeCore,
    target: Target,
    agent: str,
    refusal: StaleWriteError,
) -> Answer:
    """The answer to a refused apply_patch: merged where the volume's merge globs and the refusal
    allow it (`hook_merge.answer`; committed only in MERGE_MODES), else denied."""
    mode = event.get("permission_mode")
    asks = (
        None
        if mode in MERGE_MODES
        else "coherent-volume commits such a merge itself only where Codex applies patches without asking "
        f"(approval policy never, which its hooks are told as permission mode bypassPermissions; this session's "
        f"is {mode or 'unknown'}), since writing it here would skip the user's approval."
    )
    return hook_merge.answer(core, target, agent, refusal, progress, FACE, change, asks)


def _change(writes: list[tuple[str, HandleKind]], updates: list[FilePatch]) -> hook_merge.Change | str:
    """The change of a patch that updates one file and writes no other: its hunks, made to the
    version they were written against (Codex would not apply them to the current content: they
    do not fit it, or the view would be current); or why it cannot be merged."""
    if len(writes) != 1 or len(updates) != 1:
        return "coherent-volume merges a patch only when it updates one file (`*** Update File:`) and nothing else"
    return hook_merge.Change(
        partial(patched, hunks=updates[0].hunks),
        rebased=False,
        name="your patch",
        misfit="its hunks' old lines are not all there in order, or a hunk only adds lines",
    )


def _undone(event: dict[str, Any]) -> str:
    return "write" if event.get("hook_event_name") == "PostToolUse" else "other"


def _our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    tools = f"^({PATCH_TOOL}|{SHELL_TOOL})$"
    return hook_settings.nested(
        {"type": "command", "command": command, "timeout": int(hooks.HOOK_TIMEOUT)},
        {"PreToolUse": tools, "PostToolUse": tools, "SessionStart": None, "UserPromptSubmit": None, "Stop": None},
    )


FACE = Face(
    "codex",
    handle,
    undone=_undone,
    our_hooks=_our_hooks,
    remedies=REMEDIES,
    deny=hooks.deny_tool_use,
    reread="Print them again (for example `cat` them) and build your next patch on what they hold now",
    reread_one="Print the file again (for example `cat` it) and build your next patch on what it holds now",
)
"""The Codex CLI face: `coherent-volume hook codex` runs `FACE.run`; `install` writes .codex/hooks.json."""

SHELL_FACE = replace(FACE, remedies=SHELL_REMEDIES)
"""The Codex face as it answers a `Bash` command: its refusals say what to do about a shell command."""
