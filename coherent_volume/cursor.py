"""Cursor agent conversations as agents: a conversation's view is what its model read.

Cursor's hooks (`.cursor/hooks.json`, https://cursor.com/docs/hooks) show what the model is given
and what it is about to write:

- beforeReadFile carries the file's `content` as the agent will receive it: the conversation's
  view is registered at the version with exactly that content (the read is always allowed). It
  comes before the read, and Cursor has no event after one: if another hook or an ignore rule
  then denies the read, the view stays for content the model never got (docs/agents.md, "A read
  denied after the view was registered");
- preToolUse on the edit tools (`Write`, `Edit`, `StrReplace`, `MultiEdit`, `Delete`,
  `EditNotebook`) and beforeShellExecution (for writes `shell_writes` recognises) check
  the view and take the conversation's write grant in one step, or answer
  `{"permission": "deny", "agent_message": …}`; both are installed with `failClosed`, so a hook
  that crashes or times out blocks the action. A `stale` Write, StrReplace or Edit of a path the
  volume's merge globs name is merged with the current version (`hook_merge`) before the tool
  runs and denied showing the merge: the events do not say whether the user reviews Cursor's
  edits, so the hook never commits it;
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
from typing import Any

from . import hook_merge, hook_paths, hook_steps, hooks
from .core import VolumeCore
from .errors import StaleWriteError
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import Target
from .protocol import HandleKind
from .shell_writes import ShellWrites, shell_writes
from .stale_warnings import stale_warning

PREFIX = "cursor"
EDIT_TOOLS = ("Write", "Edit", "StrReplace", "MultiEdit", "Delete", "EditNotebook")
WRITE_CHECKS = ("preToolUse", "beforeShellExecution")
SHELL_EVENTS = ("beforeShellExecution", "afterShellExecution")
MERGING_TOOLS = ("Write", "StrReplace", "Edit")
"""The edit tools whose stale write of a merge-glob file is merged (`hook_merge`)."""


def _base(event: dict[str, Any]) -> str | None:
    """The directory relative paths of the event are relative to: its cwd, else its first workspace root."""
    cwd, roots = event.get("cwd"), event.get("workspace_roots")
    if isinstance(cwd, str) and cwd:
        return cwd
    if isinstance(roots, list) and roots and isinstance(roots[0], str):
        return roots[0]
    return None


def _call(event: dict[str, Any]) -> str | None:
    """The id of the tool call an event is about (`hooks.tool_call`). A shell command's events carry
    none: theirs is made of the generation's id and the command, the same in the events before and
    after it (the event after it has no `cwd`, so its writes are the ones its start claimed, never
    worked out again from somewhere else, where another command's claims could be taken); two runs of
    one command in one generation share it (`hook_paths.SHARED`), as do those of one command in
    events that name no generation."""
    generation, command = event.get("generation_id"), event.get("command")
    if event.get("hook_event_name") in SHELL_EVENTS:  # (no generation: the command's text alone)
        text = command if isinstance(command, str) else ""
        return f"{hook_paths.SHARED}{hooks.id_hash(str(generation or ''))}:{hooks.id_hash(text)}"
    return hooks.tool_call(event)


def _writes(event: dict[str, Any]) -> list[tuple[str, HandleKind]] | ShellWrites:
    """The files the event's edit tool or shell command writes (absolute), with how; none for the
    end of a shell command (its start's claims say, `_call`)."""
    name, base = event.get("hook_event_name"), _base(event)
    if name == "afterShellExecution":
        return []
    if name in SHELL_EVENTS:
        command = event.get("command")
        return shell_writes(command, base or ".") if isinstance(command, str) else []
    tool_input = event.get("tool_input")
    if event.get("tool_name") not in EDIT_TOOLS:
        return []
    return [(hooks.tool_path(tool_input, ("file_path", "path", "target_file", "target_notebook"), base), "write")]


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
    """Apply one Cursor hook event; errors propagate (`FACE.run` answers them, failing closed for
    managed writes). `process` is Cursor's process, looked up when not given."""
    name = event.get("hook_event_name")
    agent = hooks.agent_name(PREFIX, event.get("conversation_id") or event.get("session_id"))
    command = event.get("command")
    shell = (command, _base(event) or ".") if name == "beforeShellExecution" and isinstance(command, str) else None
    found = hook_steps.planned(progress, FACE, name in WRITE_CHECKS, shell, lambda: _writes(event))
    if isinstance(found, Answer):
        return found
    writes = found
    if agent is None:
        return Answer(0, _goes_ahead(event).stdout, hook_steps.unattributed(writes, progress, "conversation_id"))
    actor = hook_steps.Actor(agent, agent, process or hooks.session_process())
    places = _places(event)
    if name in WRITE_CHECKS:
        merging = name == "preToolUse" and event.get("tool_name") in MERGING_TOOLS
        refused = partial(_refused, event, progress) if merging else None
        denial = hook_steps.begin_writes(actor, writes, progress, FACE, refused, _call(event))
        if denial is not None:
            return denial
        progress.decide(_permission("allow"), hooks.WARN_BUDGET)
        return _permission("allow", stale_warning(actor, hook_paths.session_volumes(actor.session, places), FACE))
    if name == "beforeReadFile":
        path, content = hooks.absolute(event.get("file_path"), _base(event)), event.get("content")
        progress.path = path
        if path is not None and isinstance(content, str):
            shown, exact = (
                partial(hook_steps.shows, text=content, whole=True),
                partial(hook_steps.same_text, text=content),
            )
            hook_steps.observe(actor, path, shown, progress, exact=exact)
        return _permission("allow")
    if name in ("postToolUse", "afterShellExecution") and (writes or name == "afterShellExecution"):
        call = _call(event)
        made = hook_merge.made(_change(event)) if name == "postToolUse" else None
        if name == "afterShellExecution":  # every write its start claimed
            told = hook_steps.end_writes(actor, None, progress, record=True, tool=call)
        else:
            told = hook_steps.end_writes(actor, writes, progress, record=True, tool=call, made=made) if writes else []
        if name == "afterShellExecution":
            told += hook_steps.end_deletions(actor, places, record=True, tool=call)
        return Answer(0, json.dumps({"additional_context": "\n\n".join(told)})) if told else Answer()
    if name == "postToolUseFailure" and writes:
        hook_steps.end_writes(actor, writes, progress, record=False, tool=_call(event))
    elif name == "sessionStart":
        hook_steps.start_session(actor, places)
    elif name == "sessionEnd":
        hook_steps.end_session(actor, places)
    return Answer()


ASKS = (
    "coherent-volume commits such a merge itself only where the agent writes without asking the user, and "
    "Cursor's hook events do not say whether the user reviews this conversation's edits, so it wrote nothing."
)
"""Why the hook never commits a merge for Cursor (`hook_merge`)."""


def _refused(
    event: dict[str, Any], progress: Progress, core: VolumeCore, target: Target, agent: str, refusal: StaleWriteError
) -> Answer:
    """The answer to a refused Write, StrReplace or Edit: merged and shown where the volume's merge
    globs and the refusal allow it (`hook_merge.answer`), else denied."""
    return hook_merge.answer(core, target, agent, refusal, progress, FACE, _change(event), ASKS)


def _change(event: dict[str, Any]) -> hook_merge.Change | str:
    """The change of a Write (its content) or a StrReplace/Edit, which Cursor makes to the current
    content itself: old_string must occur once (at least once with replace_all, every occurrence
    replaced)."""
    tool_input = event.get("tool_input")
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    content, old, new = tool_input.get("content"), tool_input.get("old_string"), tool_input.get("new_string")
    if event.get("tool_name") == "Write" and isinstance(content, str):
        return hook_merge.whole(content)
    if not (isinstance(old, str) and old and isinstance(new, str)):
        return "the tool's input names no change coherent-volume can merge"
    count = None if tool_input.get("replace_all") is True else 1
    return hook_merge.Change(
        partial(hook_merge.replaced, old=old, new=new, count=count),
        rebased=True,
        name="your edit",
        misfit="its old_string is missing or not unique there",
    )


def _undone(event: dict[str, Any]) -> str:
    name = event.get("hook_event_name")
    if name == "beforeReadFile":
        return "read"
    if name in ("postToolUse", "afterShellExecution"):
        return "write"
    return "release" if name == "postToolUseFailure" else "other"


def _goes_ahead(event: dict[str, Any]) -> Answer:
    """A read, and a write check of nothing managed, are answered with a permission."""
    name = event.get("hook_event_name")
    return _permission("allow") if name == "beforeReadFile" or name in WRITE_CHECKS else Answer()


def _our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
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


FACE = Face(
    "cursor",
    handle,
    undone=_undone,
    our_hooks=_our_hooks,
    remedies=hooks.tool_remedies("", " in the terminal"),
    deny=_deny,
    reread="Read them again before you change them",
    reread_one="Read the file before you change it again",
    top={"version": 1},
    goes_ahead=_goes_ahead,
)
"""The Cursor face: `coherent-volume hook cursor` runs `FACE.run`; `install` writes .cursor/hooks.json."""
