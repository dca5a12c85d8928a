"""Codex CLI sessions as agents, whose view is what their patches show they saw.

Codex has no read hook: its model reads files through shell commands whose output no hook sees
whole. What a Codex model saw of a file shows in its edits instead: an `apply_patch` hunk's
context and removed lines are the text the model believes the file holds. So a Codex session's
view of a file is formed from its patches (https://developers.openai.com/codex/hooks):

- PreToolUse `apply_patch` parses the patch (`*** Update File:`, `*** Add File:`,
  `*** Delete File:`, `*** Move to:`). For each file it updates, the view is registered at the
  current version when every hunk's old lines are in the current content (the patch then only
  changes text that is current: applying it loses nobody's change); else at the newest retained
  older version they fit, so the write is refused as stale with the diff since; else nothing is
  registered. Then every file the patch touches is checked and the session's write grant taken
  in one step (whole-file additions over an existing file, deletions and move targets need a view
  the session already has), or the patch is denied with `permissionDecision: "deny"`;
- PreToolUse `Bash` does the same for writes `shell_writes` recognises (they need a view a
  patch registered: a file never patched is refused `unread`);
- SessionStart binds the session's process (on a mount, what it does is the session's);
  PostToolUse records the session's commits and releases the grants; Stop (the end of a turn)
  releases the grants the session still holds (a patch the user rejected took one);
  UserPromptSubmit and allowed tool calls tell the model (`additionalContext`) which files it
  saw went stale.

Each session is the agent `codex:<session_id>` (a subagent: `codex:<session_id>/<agent_id>`).
The session's process is bound with pinned views, so on a mount its shell commands write as the
same agent and their reads never refresh a view. Every rule is the core's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

from . import hook_settings, hook_steps, hooks
from .errors import Reason
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .protocol import HandleKind
from .shell_writes import shell_writes
from .stale_warnings import stale_warning

PREFIX = "codex"
PATCH_TOOL = "apply_patch"
SHELL_TOOL = "Bash"
EARLIER_VERSIONS = 20
"""Retained versions before the current one searched for the one a patch was written against."""

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
"""What the model is told to do, per refusal reason, for Codex's tools."""


@dataclass
class FilePatch:
    """One file's section of an apply_patch patch."""

    path: str
    op: str
    """"add", "delete" or "update"."""
    move_to: str | None = None
    chunks: list[list[str]] = field(default_factory=list)
    """Per hunk, its old lines (context and removed), in order."""


HEADERS = {"*** Add File: ": "add", "*** Delete File: ": "delete", "*** Update File: ": "update"}


def parse_patch(text: str) -> list[FilePatch]:
    """The files of an apply_patch patch, with each update's old lines per hunk. Headers are read
    from the line with its surrounding whitespace trimmed, as Codex reads them."""
    files: list[FilePatch] = []
    for line in text.splitlines():
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
            current.chunks.append([context] if context else [])
            if context:
                current.chunks.append([])  # the line after `@@` is a marker to seek, not part of the hunk
        elif header == "*** End Patch":
            break
        elif header.startswith("***"):
            continue  # *** End of File
        elif line[:1] in (" ", "-", ""):
            if not current.chunks:
                current.chunks.append([])
            current.chunks[-1].append(line[1:])
    for patch in files:
        patch.chunks = [c for c in patch.chunks if c]
    return files


def fits(data: bytes, chunks: list[list[str]]) -> bool:
    """Whether every hunk's old lines occur in `data`, in order (surrounding whitespace ignored)."""
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()]
    at = 0
    for chunk in chunks:
        want = [line.strip() for line in chunk]
        found = next((i for i in range(at, len(lines) - len(want) + 1) if lines[i : i + len(want)] == want), None)
        if found is None:
            return False
        at = found + len(want)
    return True


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


def _writes(event: dict[str, Any]) -> tuple[list[tuple[str, HandleKind]], list[tuple[str, FilePatch]]]:
    """The files the event's patch or shell command writes (absolute), with how; and the patch's
    updates with old lines, by absolute path."""
    tool, cwd, command = event.get("tool_name"), event.get("cwd"), _command(event)
    if command is None:
        return [], []
    if tool == SHELL_TOOL:
        return shell_writes(command, cwd if isinstance(cwd, str) else "."), []
    if tool != PATCH_TOOL:
        return [], []
    writes: list[tuple[str, HandleKind]] = []
    updates: list[tuple[str, FilePatch]] = []
    for patch in parse_patch(command):
        for raw in (patch.path, patch.move_to):
            path = hooks.absolute(raw, cwd)
            if path is not None:
                writes.append((path, "write"))
        source = hooks.absolute(patch.path, cwd)
        if source is not None and patch.op == "update" and patch.chunks:
            updates.append((source, patch))
    return writes, updates


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Codex hook event; errors propagate (`FACE.run` answers them, failing closed for
    managed writes). `process` is the Codex process, looked up when not given."""
    name, cwd = event.get("hook_event_name"), event.get("cwd")
    places = [cwd if isinstance(cwd, str) else None]
    actor = _actor(event, process)
    writes, updates = _writes(event)
    progress.path = writes[0][0] if writes else None
    progress.write_check = name == "PreToolUse" and bool(writes)
    if actor is None:
        return Answer(0, "", hook_steps.unattributed(writes, progress, "session_id"))
    if progress.write_check:
        for path, patch in updates:  # what the patch shows the model saw
            hook_steps.observe(actor, path, partial(fits, chunks=patch.chunks), earlier=EARLIER_VERSIONS)
        denial = hook_steps.begin_writes(actor, writes, progress, FACE)
        if denial is not None:
            return denial
    if name in ("PreToolUse", "UserPromptSubmit"):
        progress.decide(Answer(), hooks.WARN_BUDGET)
        warning = stale_warning(actor.agent, hook_steps.volume_roots(places), FACE)
        return hooks.with_context(Answer(), name, [warning])
    if name == "PostToolUse" and writes:
        return hooks.with_context(Answer(), name, hook_steps.end_writes(actor, writes, progress, record=True))
    if name == "SessionStart":
        hook_steps.start_session(actor, places)
    elif name == "Stop":
        hook_steps.release_grants(actor, places)
    return Answer()


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
)
"""The Codex CLI face: `coherent-volume hook codex` runs `FACE.run`; `install` writes .codex/hooks.json."""
