"""Gemini CLI sessions as agents: a session's view is what its model read.

Gemini CLI's write tools re-read the file just before writing, so at the file-system level every
write looks fresh. Its hooks (settings.json, https://geminicli.com/docs/hooks/reference) show
what the model was given:

- AfterTool `read_file` / `read_many_files` registers the session's view at the version whose
  content is what the tool returned to the model (`tool_response.llmContent`);
- BeforeTool `write_file` / `replace` (and a `run_shell_command` whose writes are recognisable:
  `hooks.shell_writes`) checks the view and takes the session's write grant in one step, or
  denies with `{"decision": "deny", "reason": …}`, which Gemini CLI sends the model as the
  tool's error;
- AfterTool of those tools records the session's own commit and releases the grant, and with
  BeforeAgent tells the model (`additionalContext`) which files it read went stale;
- SessionStart binds the session's process, so on a mount everything it does is the session's;
  SessionEnd releases everything the session holds.

Each session is the agent `gemini:<session_id>`. Every rule is the core's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from . import hooks
from .errors import CoherenceError, Reason
from .hooks import Answer, Progress
from .liveness import ProcessId
from .protocol import HandleKind

PREFIX = "gemini"
WRITE_TOOLS = ("write_file", "replace")
READ_TOOLS = ("read_file", "read_many_files")
SHELL_TOOL = "run_shell_command"
HOOK_COMMAND_MARK = "hook gemini"
SETTINGS = (".gemini", "settings.json")

REMEDIES: dict[Reason, str] = {
    "stale": "Read the file again with read_file, then redo your change from its current content.",
    "unread": "Read the file with read_file first, then make your change from its current content.",
    "held": (
        "Another session is writing it right now; its grant ends when that write is done (after {ttl:g} s at "
        "the latest). Wait a few seconds (for example run `sleep 5` with run_shell_command), then read the file "
        "again with read_file and redo your change from its current content."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it are "
        "held back until you read it again. Read the file again with read_file, then redo your change."
    ),
    "read-set": "Files this change builds on have changed since you read them ({changed}). Read them again with "
    "read_file, then redo your change.",
}
"""What the model is told to do, per refusal reason, in Gemini CLI's tool names."""

TRUNCATED = re.compile(
    r"^\s*IMPORTANT: The file content has been truncated\.\nStatus: Showing lines (\d+)-\d+ of \d+ total lines\..*?"
    r"\n--- FILE CONTENT \(truncated\) ---\n",
    re.S,
)
"""The note read_file puts before a part of a file (a range, or lines cut at 2000 characters)."""
SHORTENED = "... [truncated]"
"""How read_file ends a line it cut."""
PROJECT_CONTEXT = "\n\n--- Newly Discovered Project Context ---\n"
"""Where read_file starts appending context files it discovered (not the file's content)."""
MANY_PART = re.compile(r"--- (/.*?) ---\n\n(.*)\n\n", re.S)
MANY_TRUNCATED = (
    "[WARNING: This file was truncated. To view the full content, use the 'read_file' tool on this specific file.]\n\n"
)
"""read_many_files: each text file is one part `--- <absolute path> ---\\n\\n<content>\\n\\n`."""


def _writes(event: dict[str, Any]) -> list[tuple[str, HandleKind]]:
    """The files a write tool or a shell command of the event writes (absolute), with how."""
    tool, cwd = event.get("tool_name"), event.get("cwd")
    tool_input = event.get("tool_input")
    if not isinstance(tool_input, dict):
        return []
    if tool in WRITE_TOOLS:
        path = hooks.absolute(tool_input.get("file_path"), cwd)
        return [] if path is None else [(path, "write")]
    command = tool_input.get("command")
    if tool == SHELL_TOOL and isinstance(command, str):
        base = hooks.absolute(tool_input.get("dir_path"), cwd) or (cwd if isinstance(cwd, str) else ".")
        return hooks.shell_writes(command, base)
    return []


def _text(part: object) -> str | None:
    if isinstance(part, str):
        return part
    text = part.get("text") if isinstance(part, dict) else None
    return text if isinstance(text, str) else None


def _reads(event: dict[str, Any]) -> list[tuple[str, Callable[[bytes], bool]]]:
    """(absolute path, predicate on the file's bytes) for each text file the read tool gave the model."""
    response, tool_input = event.get("tool_response"), event.get("tool_input")
    if not isinstance(response, dict) or response.get("error") or not isinstance(tool_input, dict):
        return []
    content = response.get("llmContent")
    if event.get("tool_name") == "read_file":
        path, text = hooks.absolute(tool_input.get("file_path"), event.get("cwd")), _text(content)
        if path is None or text is None:
            return []
        text = text.split(PROJECT_CONTEXT, 1)[0]
        cut = TRUNCATED.match(text)
        if cut is None:
            return [(path, partial(hooks.shows, text=text, whole=True))]
        shown, start = text[cut.end() :], int(cut.group(1))
        return [(path, partial(hooks.shows, text=shown, start=start, whole=False, shortened=SHORTENED))]
    found: list[tuple[str, Callable[[bytes], bool]]] = []
    for part in content if isinstance(content, list) else [content]:
        match = MANY_PART.fullmatch(_text(part) or "")
        if match is None:
            continue
        text = match.group(2)
        whole = not text.startswith(MANY_TRUNCATED)
        text = text if whole else text[len(MANY_TRUNCATED) :]
        found.append((match.group(1), partial(hooks.shows, text=text, whole=whole, shortened=SHORTENED)))
    return found


def _deny(reason: str) -> Answer:
    return Answer(0, json.dumps({"decision": "deny", "reason": reason}))


def _context(event_name: str, texts: Sequence[str | None]) -> Answer:
    """An answer that appends `texts` to what the model gets (the tool's result, or the prompt)."""
    text = "\n\n".join(t for t in texts if t)
    if not text:
        return Answer()
    return Answer(0, json.dumps({"hookSpecificOutput": {"hookEventName": event_name, "additionalContext": text}}))


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Gemini CLI hook event; errors propagate (`run` turns them into a denial for
    managed writes). `process` is the session's process, looked up when not given."""
    name, tool, cwd = event.get("hook_event_name"), event.get("tool_name"), event.get("cwd")
    agent = hooks.agent_name(PREFIX, event.get("session_id"))
    writes = _writes(event) if tool in WRITE_TOOLS + (SHELL_TOOL,) else []
    progress.path = writes[0][0] if writes else None
    if name == "BeforeTool" and writes:
        progress.write_check = True
        if agent is None:
            progress.in_volume = any(hooks.locate(p) is not None for p, _ in writes)
            if progress.in_volume:
                raise CoherenceError("the hook event has no session_id, so the write cannot be attributed to a session")
            return Answer()
        denial = hooks.begin_writes(agent, writes, process or hooks.session_process(), REMEDIES, progress)
        return Answer() if denial is None else _deny(denial)
    if agent is None:
        return Answer(0, "", "coherent-volume: hook event without session_id; ignored")
    places = [cwd if isinstance(cwd, str) else None]
    if name == "SessionStart":
        hooks.start_session(agent, places, process or hooks.session_process())
        return Answer()
    if name == "SessionEnd":
        hooks.end_session(agent, places)
        return Answer()
    if name == "BeforeAgent":
        return _context("BeforeAgent", [hooks.stale_notice(agent, places)])
    if name != "AfterTool":
        return Answer()
    owner = process or hooks.session_process()
    told: list[str | None] = []
    if tool in READ_TOOLS:
        for path, shown in _reads(event):
            progress.path = path
            hooks.observe(agent, path, shown, owner)
    elif writes:
        response = event.get("tool_response")
        failed = not isinstance(response, dict) or bool(response.get("error"))
        told.extend(hooks.end_writes(agent, writes, owner, record=not failed))
    told.append(hooks.stale_notice(agent, places))
    return _context("AfterTool", told)


def _undecided(event: dict[str, Any], progress: Progress, what: str) -> Answer:
    """A write check that could not decide is denied unless its path is established to be in no
    volume or unmanaged; anything else goes ahead with a warning saying what was not done."""
    if not hooks.passes_undecided(progress):
        return _deny(hooks.undecided_text(progress.path, what))
    tool = event.get("tool_name")
    undone = "read" if tool in READ_TOOLS else "write" if event.get("hook_event_name") == "AfterTool" else "other"
    return hooks.warning(what, event.get("hook_event_name"), progress, undone)


def run(stdin: str, budget: float = hooks.HOOK_BUDGET, process: ProcessId | None = None) -> Answer:
    """Answer one event (JSON text) within `budget` seconds, failing closed for managed writes."""
    return hooks.run_hook(stdin, lambda e, p: handle(e, p, process), _undecided, budget)


def our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    hook = [
        {"name": "coherent-volume", "type": "command", "command": command, "timeout": int(hooks.HOOK_TIMEOUT * 1000)}
    ]
    return {
        "BeforeTool": [{"matcher": f"^({'|'.join(WRITE_TOOLS + (SHELL_TOOL,))})$", "hooks": hook}],
        "AfterTool": [{"matcher": f"^({'|'.join(READ_TOOLS + WRITE_TOOLS + (SHELL_TOOL,))})$", "hooks": hook}],
        "BeforeAgent": [{"hooks": hook}],
        "SessionStart": [{"hooks": hook}],
        "SessionEnd": [{"hooks": hook}],
    }


def _ours(entry: dict[str, Any]) -> bool:
    return any(HOOK_COMMAND_MARK in str(h.get("command", "")) for h in entry.get("hooks", []) if isinstance(h, dict))


def install(settings: Path, command: str | None = None) -> None:
    """Merge our hooks into `settings` (idempotent; other settings and hooks are kept)."""
    hooks.merge_hooks(settings, our_hooks(command or hooks.hook_command(PREFIX)), _ours, {})


def uninstall(settings: Path) -> None:
    """Remove exactly the hooks `install` added."""
    hooks.remove_hooks(settings, _ours, {})


group = hooks.face_group(
    "gemini",
    "Gemini CLI integration: hooks that make a session's view what its model read.",
    SETTINGS,
    install,
    uninstall,
)
hook = hooks.face_hook("gemini", run)
