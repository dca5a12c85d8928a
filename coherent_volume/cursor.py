"""Cursor agent conversations as agents: a conversation's view is what its model read.

Cursor's hooks (`.cursor/hooks.json`, https://cursor.com/docs/hooks) show what the model is given
and what it is about to write:

- beforeReadFile carries the file's `content` as the agent will receive it: the conversation's
  view is registered at the version with exactly that content (the read is always allowed);
- preToolUse on the edit tools (`Write`, `Edit`, `StrReplace`, `MultiEdit`, `Delete`,
  `EditNotebook`) and beforeShellExecution (for writes `hooks.shell_writes` recognises) check
  the view and take the conversation's write grant in one step, or answer
  `{"permission": "deny", "agent_message": …}`; both are installed with `failClosed`, so a hook
  that crashes or times out blocks the action;
- postToolUse / afterShellExecution record the conversation's own commit and release the grant,
  postToolUseFailure releases it; sessionStart binds Cursor's process (on a mount, what it does is
  the conversation's), sessionEnd releases everything;
- an allowed action's answer carries, as `agent_message`, which files the conversation read
  went stale since.

Each conversation is the agent `cursor:<conversation_id>`. Every rule is the core's.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

from . import hooks
from .errors import CoherenceError, Reason
from .hooks import Answer, Progress
from .liveness import ProcessId
from .protocol import HandleKind

PREFIX = "cursor"
EDIT_TOOLS = ("Write", "Edit", "StrReplace", "MultiEdit", "Delete", "EditNotebook")
HOOK_COMMAND_MARK = "hook cursor"
SETTINGS = (".cursor", "hooks.json")
WRITE_CHECKS = ("preToolUse", "beforeShellExecution")

REMEDIES: dict[Reason, str] = {
    "stale": "Read the file again, then redo your change from its current content.",
    "unread": "Read the file first, then make your change from its current content.",
    "held": (
        "Another session is writing it right now; its grant ends when that write is done (after {ttl:g} s at "
        "the latest). Wait a few seconds (for example run `sleep 5` in the terminal), then read the file again "
        "and redo your change from its current content."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it are "
        "held back until you read it again. Read the file again, then redo your change."
    ),
    "read-set": "Files this change builds on have changed since you read them ({changed}). Read them again, "
    "then redo your change.",
}
"""What the model is told to do, per refusal reason."""


def _base(event: dict[str, Any]) -> str | None:
    """The directory relative paths of the event are relative to: its cwd, else its first workspace root."""
    cwd, roots = event.get("cwd"), event.get("workspace_roots")
    if isinstance(cwd, str) and cwd:
        return cwd
    if isinstance(roots, list) and roots and isinstance(roots[0], str):
        return roots[0]
    return None


def _writes(event: dict[str, Any]) -> list[tuple[str, HandleKind]]:
    """The files the event's edit tool or shell command writes (absolute), with how."""
    name, base = event.get("hook_event_name"), _base(event)
    if name in ("beforeShellExecution", "afterShellExecution"):
        command = event.get("command")
        return hooks.shell_writes(command, base or ".") if isinstance(command, str) else []
    tool_input = event.get("tool_input")
    if event.get("tool_name") not in EDIT_TOOLS or not isinstance(tool_input, dict):
        return []
    raw = next((tool_input[k] for k in ("file_path", "path", "target_file") if k in tool_input), None)
    path = hooks.absolute(raw, base)
    return [] if path is None else [(path, "write")]


def _permission(permission: str, agent_message: str | None = None, user_message: str | None = None) -> Answer:
    answer: dict[str, str] = {"permission": permission}
    if user_message:
        answer["user_message"] = user_message
    if agent_message:
        answer["agent_message"] = agent_message
    return Answer(0, json.dumps(answer))


def _deny(reason: str, path: str | None) -> Answer:
    return _permission(
        "deny", reason, f"coherent-volume refused a write to {path or 'a managed file'}; see the agent's message"
    )


def _places(event: dict[str, Any]) -> list[str | None]:
    roots = event.get("workspace_roots")
    return [_base(event)] + [r for r in roots if isinstance(r, str)] if isinstance(roots, list) else [_base(event)]


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Cursor hook event; errors propagate (`run` turns them into a denial for managed
    writes). `process` is Cursor's process, looked up when not given."""
    name = event.get("hook_event_name")
    session = event.get("conversation_id") or event.get("session_id")
    agent = hooks.agent_name(PREFIX, session)
    writes = _writes(event)
    progress.path = writes[0][0] if writes else None
    if name in WRITE_CHECKS:
        if not writes:
            return _permission("allow", agent and hooks.stale_notice(agent, _places(event)))
        progress.write_check = True
        if agent is None:
            progress.in_volume = any(hooks.locate(p) is not None for p, _ in writes)
            if progress.in_volume:
                raise CoherenceError("the hook event has no conversation_id, so the write cannot be attributed")
            return _permission("allow")
        denial = hooks.begin_writes(agent, writes, process or hooks.session_process(), REMEDIES, progress)
        if denial is not None:
            return _deny(denial, progress.path)
        return _permission("allow", hooks.stale_notice(agent, _places(event)))
    if agent is None:
        allow = _permission("allow") if name == "beforeReadFile" else Answer()
        return Answer(allow.code, allow.stdout, "coherent-volume: hook event without conversation_id; ignored")
    owner = process or hooks.session_process()
    if name == "beforeReadFile":
        path, content = hooks.absolute(event.get("file_path"), _base(event)), event.get("content")
        progress.path = path
        if path is not None and isinstance(content, str):
            hooks.observe(agent, path, partial(hooks.shows, text=content, whole=True), owner)
        return _permission("allow")
    if name in ("postToolUse", "afterShellExecution") and writes:
        told = hooks.end_writes(agent, writes, owner, record=True)
        return Answer(0, json.dumps({"additional_context": "\n\n".join(told)})) if told else Answer()
    if name == "postToolUseFailure" and writes:
        hooks.end_writes(agent, writes, owner, record=False)
    elif name == "sessionStart":
        hooks.start_session(agent, _places(event), owner)
    elif name == "sessionEnd":
        hooks.end_session(agent, _places(event))
    return Answer()


def _undecided(event: dict[str, Any], progress: Progress, what: str) -> Answer:
    """A write check that could not decide is denied unless its path is established to be in no
    volume or unmanaged; a read is always allowed (nothing registered); anything else warns."""
    name = event.get("hook_event_name")
    if not hooks.passes_undecided(progress):
        return _deny(hooks.undecided_text(progress.path, what), progress.path)
    undone = (
        "read" if name == "beforeReadFile" else "write" if name in ("postToolUse", "afterShellExecution") else "other"
    )
    warning = hooks.warning(what, name, progress, undone)
    allow = _permission("allow") if name == "beforeReadFile" or name in WRITE_CHECKS else Answer()
    return Answer(0, allow.stdout, warning.stderr)


def run(stdin: str, budget: float = hooks.HOOK_BUDGET, process: ProcessId | None = None) -> Answer:
    """Answer one event (JSON text) within `budget` seconds, failing closed for managed writes."""
    return hooks.run_hook(stdin, lambda e, p: handle(e, p, process), _undecided, budget)


def our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    timeout = int(hooks.HOOK_TIMEOUT)
    guard = {"command": command, "timeout": timeout, "failClosed": True}
    observe = {"command": command, "timeout": timeout}
    edits = "|".join(EDIT_TOOLS)
    return {
        "beforeReadFile": [observe],
        "preToolUse": [{**guard, "matcher": edits}],
        "postToolUse": [{**observe, "matcher": edits}],
        "postToolUseFailure": [{**observe, "matcher": edits}],
        "beforeShellExecution": [guard],
        "afterShellExecution": [observe],
        "sessionStart": [observe],
        "sessionEnd": [observe],
    }


def _ours(entry: dict[str, Any]) -> bool:
    return HOOK_COMMAND_MARK in str(entry.get("command", ""))


def install(settings: Path, command: str | None = None) -> None:
    """Merge our hooks into `settings` (idempotent; other hooks and keys are kept)."""
    hooks.merge_hooks(settings, our_hooks(command or hooks.hook_command(PREFIX)), _ours, {"version": 1})


def uninstall(settings: Path) -> None:
    """Remove exactly the hooks `install` added."""
    hooks.remove_hooks(settings, _ours, {"version": 1})


group = hooks.face_group(
    "cursor",
    "Cursor integration: hooks that make a conversation's view what its model read.",
    SETTINGS,
    install,
    uninstall,
)
hook = hooks.face_hook("cursor", run)
