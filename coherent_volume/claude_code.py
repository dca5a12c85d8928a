"""Claude Code sessions as agents: a session's view is what its model read.

Claude Code's Write and Edit tools re-read the target just before writing, so at the
file-system level every write looks fresh. Its hooks show what the model actually read:

- PostToolUse Read registers the session's view at the version whose content is what the
  tool returned (and binds the session's process, pinning its views to model reads, so the
  tools' own re-reads through a mount never refresh them);
- PreToolUse Write/Edit/MultiEdit/NotebookEdit denies a write whose view is not current,
  with a reason the model can act on;
- PostToolUse Write/Edit/... records the session's own commit (needed without a mount);
- SessionEnd releases everything the session holds.

Every rule is the core's; this module maps hook events onto it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .core import VolumeCore
from .errors import CoherenceError, StaleWriteError
from .liveness import ProcessId
from .paths import REGISTRY_DIR
from .volume import open_core

HOOK_BUDGET = 1.0
"""Seconds a hook may take before it gives up and lets the tool run (fails open)."""

WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
HOOK_COMMAND_MARK = "hook claude-code"


def agent_of(session_id: str) -> str:
    return f"claude:{session_id}"


def _mounts() -> dict[str, str]:
    from fusefs.mount import fuse_mounts

    return fuse_mounts()


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a file inside a mounted or plain volume, else None."""
    absolute = os.path.abspath(path)
    for mountpoint, root in _mounts().items():
        if absolute.startswith(mountpoint + os.sep):
            return root, os.path.relpath(absolute, mountpoint)
    directory = os.path.dirname(absolute)
    while True:
        if os.path.exists(os.path.join(directory, REGISTRY_DIR, "registry.db")):
            return directory, os.path.relpath(absolute, directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


@dataclass
class Answer:
    """What the hook prints and its exit status."""

    code: int = 0
    stdout: str = ""
    stderr: str = ""


def _deny(event: str, reason: str) -> Answer:
    return Answer(0, json.dumps({"hookSpecificOutput": {
        "hookEventName": event, "permissionDecision": "deny", "permissionDecisionReason": reason}}))


def _when(ts: float | None) -> str:
    return "an unknown time" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def denial_text(core: VolumeCore, refusal: StaleWriteError) -> str:
    """What the model is told: which file, what it read, what is current, who wrote it, what to do."""
    with core.registry.read() as tx:
        record = tx.file(refusal.path)
    seen = ("you have not read it in this session" if refusal.seen_version is None
            else f"you last read version {refusal.seen_version}")
    who = f"written by {refusal.last_writer} at {_when(record.committed_at if record else None)}"
    held = f" {refusal.holder} holds its write grant right now." if refusal.holder else ""
    return (f"coherent-volume refused this write to {refusal.path} ({refusal.reason}): {seen}; the current "
            f"version is {refusal.current_version}, {who}.{held} Read the file again with the Read tool, then "
            "redo your change from its current content.")


def _saw(response: Any) -> Any:
    """A predicate: does the file's current content match what the Read tool returned?"""
    file = response.get("file") if isinstance(response, dict) else None
    content = file.get("content") if isinstance(file, dict) else None
    if not isinstance(content, str):
        return lambda data: True  # this Claude Code does not report content: trust the read
    start = int(file.get("startLine") or 1)
    count = file.get("numLines")

    def matches(data: bytes) -> bool:
        lines = data.decode("utf-8", "replace").split("\n")
        shown = lines[start - 1:start - 1 + count] if isinstance(count, int) else lines[start - 1:]
        return "\n".join(shown).rstrip("\n") == content.rstrip("\n")
    return matches


def handle(event: dict[str, Any], session_process: ProcessId) -> Answer:
    """Apply one hook event; the decision for PreToolUse is in the answer."""
    name = event.get("hook_event_name")
    session = event.get("session_id")
    if not isinstance(session, str) or not session:
        return Answer(0, "", "coherent-volume: hook event without session_id; ignored")
    agent = agent_of(session)
    if name == "SessionEnd":
        for root in _mounts().values():
            _end(root, agent)
        cwd = event.get("cwd")
        found = locate(os.path.join(cwd, "x")) if isinstance(cwd, str) else None
        if found:
            _end(found[0], agent)
        return Answer()
    tool = event.get("tool_name")
    tool_input = event.get("tool_input") or {}
    path = tool_input.get("file_path") or tool_input.get("notebook_path")
    if not isinstance(path, str):
        return Answer()
    if not os.path.isabs(path) and isinstance(event.get("cwd"), str):
        path = os.path.join(event["cwd"], path)
    found = locate(path)
    if found is None:
        return Answer()  # not in a volume: always allowed
    root, rel = found
    core = open_core(root)
    try:
        target = core.resolve(rel)
        if not target.managed:
            return Answer()
        core.bind_session(agent, session_process, pinned=True)
        if name == "PreToolUse" and tool in WRITE_TOOLS:
            refusal = core.check(agent, target)
            return _deny("PreToolUse", denial_text(core, refusal)) if refusal else Answer()
        if name == "PostToolUse" and tool == "Read":
            core.observe(agent, target, _saw(event.get("tool_response")))
        elif name == "PostToolUse" and tool in WRITE_TOOLS:
            core.adopt(agent, target)
        return Answer()
    finally:
        core.registry.close()
        core.paths.close()


def _end(root: str, agent: str) -> None:
    core = open_core(root)
    try:
        core.end_session(agent)
    finally:
        core.registry.close()
        core.paths.close()


def run_hook(stdin: str, session_process: ProcessId) -> Answer:
    """Parse and handle within HOOK_BUDGET; on any failure or timeout let the tool run (fail open),
    with a warning. Only an established stale write is denied."""
    try:
        event = json.loads(stdin)
        if not isinstance(event, dict):
            raise ValueError("the event is not a JSON object")
    except ValueError as e:
        return Answer(0, "", f"coherent-volume: unreadable hook event ({e}); allowed")
    result: list[Answer] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(handle(event, session_process))
        except BaseException as e:  # reported below: a hook must never crash the session
            failure.append(e)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(HOOK_BUDGET)
    if result:
        return result[0]
    if failure:
        return Answer(0, "", f"coherent-volume: hook failed ({failure[0]}); allowed")
    return Answer(0, "", f"coherent-volume: hook took longer than {HOOK_BUDGET:g} s; allowed")


SHELLS = {"sh", "dash", "bash", "zsh"}


def session_process() -> ProcessId:
    """The Claude Code process that ran this hook: the nearest ancestor that is not a shell
    (hooks may be started through `sh -c`)."""
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


# ---- settings.json ---------------------------------------------------------------------


def hook_command() -> str:
    """The command Claude Code runs: this installation's CLI, by absolute path."""
    cli = shutil.which("coherent-volume") or str(Path(sys.executable).parent / "coherent-volume")
    return f"{os.path.abspath(cli)} {HOOK_COMMAND_MARK}"


def _ours(entry: dict[str, Any]) -> bool:
    return any(HOOK_COMMAND_MARK in str(h.get("command", "")) for h in entry.get("hooks", []))


def our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    hook = [{"type": "command", "command": command, "timeout": 5}]
    return {
        "PreToolUse": [{"matcher": "|".join(WRITE_TOOLS), "hooks": hook}],
        "PostToolUse": [{"matcher": "|".join(("Read",) + WRITE_TOOLS), "hooks": hook}],
        "SessionEnd": [{"hooks": hook}],
    }


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text() or "{}")
    except ValueError as e:
        raise CoherenceError(f"{path} is not valid JSON ({e}); fix it first, nothing was changed") from e
    if not isinstance(data, dict):
        raise CoherenceError(f"{path} does not hold a JSON object; nothing was changed")
    return data


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".coherent-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def install(settings: Path, command: str) -> None:
    """Merge our hooks into `settings` (idempotent; other settings and hooks are kept)."""
    data = _load(settings)
    hooks = data.setdefault("hooks", {})
    for event, entries in our_hooks(command).items():
        kept = [e for e in hooks.get(event, []) if not _ours(e)]
        hooks[event] = kept + entries
    _save(settings, data)


def uninstall(settings: Path) -> None:
    """Remove exactly the hooks `install` added."""
    data = _load(settings)
    hooks = data.get("hooks", {})
    for event in list(hooks):
        hooks[event] = [e for e in hooks[event] if not _ours(e)]
        if not hooks[event]:
            del hooks[event]
    if not hooks:
        data.pop("hooks", None)
    _save(settings, data)
