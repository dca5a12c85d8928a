"""Claude Code sessions as agents: a session's view is what its model read.

Claude Code's Write and Edit tools re-read the target just before writing, so at the
file-system level every write looks fresh. Its hooks show what the model actually read:

- PostToolUse Read registers the session's view at the version whose content is what the
  tool returned (and binds the session's process, pinning its views to model reads, so the
  tools' own re-reads through a mount never refresh them);
- PreToolUse Write/Edit/MultiEdit/NotebookEdit checks the view and takes the session's write
  grant on the path in one commit-locked step (`VolumeCore.begin_write`), or denies the write
  with a reason and a remedy the model can act on (a `stale` denial also shows the diff of what
  changed since the session's view, bounded);
- PostToolUse of a write tool records the session's own commit (`adopt`) and releases that
  grant; PostToolUseFailure and PermissionDenied release it;
- SessionEnd releases everything the session holds.

Invariants: between PreToolUse and PostToolUse of a write no other hooked session can pass
its PreToolUse on the same path (it is refused `held`), so check and write are one step.
A write to a path that is (or may be) managed is denied whenever the hook cannot decide in
time or fails; it is allowed without a decision only for paths in no volume. A denial, once
decided, stands: a diff that cannot be made in time is left out of it, never the denial.

Every rule is the core's; this module maps hook events onto it.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .core import VolumeCore, open_core
from .errors import (
    CoherenceError,
    OutsideVolume,
    Reason,
    StaleWriteError,
    UnprotectedAlias,
)
from .liveness import ProcessId
from .paths import REGISTRY_DIR, Target, is_registry_path

HOOK_TIMEOUT = 5
"""Seconds Claude Code gives the hook (`timeout` in the installed settings). A hook it kills at
its timeout counts as a non-blocking error and the tool runs: so the hook must answer first."""

HOOK_BUDGET = 3.0
"""Seconds, counted from the hook process's start, within which it decides. A hook that cannot
decide in time denies a write to a path that is (or may be) managed. The 2 s left before
HOOK_TIMEOUT cover printing the answer and a loaded machine; start-up and imports are inside
the budget (about 0.12 s idle, under 0.4 s on two busy cores)."""

HOOK_GRANT_TTL = 60.0
"""Seconds a write grant taken by PreToolUse lasts at most. It spans Claude Code's permission
step and the tool's write (milliseconds) until PostToolUse releases it. It ends earlier when
the session's process dies, at PostToolUseFailure or PermissionDenied, and at SessionEnd; the
TTL only bounds how long a session that never reports back (a write rejected in the
permission dialog, an interrupted tool, a killed hook) blocks other sessions. If a permission
prompt outlasts it and another session commits meanwhile, the late write is logged as a
clobber and PostToolUse tells the model, so the overwrite is never silent."""

DIFF_BUDGET = 1.0
"""Seconds a decided `stale` denial waits for the diff it shows (within HOOK_BUDGET); past it,
or if the diff fails, the denial is answered without it (difflib can take seconds on a large file
changed in many places)."""

DIFF_LINE_CHARS = 240
"""Characters shown of one line of a denial's diff; the diff's lines are already cut to
`diffs.MAX_LINES`, so a denial stays small whatever the file (a minified one-line file too)."""

WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
HOOK_COMMAND_MARK = "hook claude-code"

HOOK_REMEDY: dict[Reason, str] = {
    "stale": "Read the file again with the Read tool, then redo your change from its current content.",
    "unread": "Read the file with the Read tool first, then make your change from its current content.",
    "held": (
        "Its holder is writing it right now; the grant ends when that write is done (a Claude Code session's "
        "after {ttl:g} s at the latest). Wait a few seconds (for example run `sleep 5` with the Bash tool), then "
        "read the file again with the Read tool and redo your change from its current content."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it "
        "are held back until you read it again. Read the file again with the Read tool, then redo your "
        "change from its current content."
    ),
    "read-set": (
        "Files this change builds on have changed since you read them ({changed}). Read them again with "
        "the Read tool, then redo your change."
    ),
}
"""What the model is told to do, per refusal reason (`errors.REMEDY` phrased for Claude Code's tools)."""


def agent_of(session_id: str) -> str:
    return f"claude:{session_id}"


def _mounts() -> dict[str, str]:
    from .mounts import fuse_mounts

    return fuse_mounts()


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a path inside a mounted or plain volume, else None.

    Mounts come from /proc (never a stat through a mount); a plain volume is the nearest
    ancestor directory holding a registry."""
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


@dataclass
class Answer:
    """What the hook prints and its exit status."""

    code: int = 0
    stdout: str = ""
    stderr: str = ""


def _deny(reason: str) -> Answer:
    return Answer(
        0,
        json.dumps(
            {
                "hookSpecificOutput": {
                    "hookEventName": "PreToolUse",
                    "permissionDecision": "deny",
                    "permissionDecisionReason": reason,
                }
            }
        ),
    )


def _tell_model(reason: str) -> Answer:
    """A PostToolUse answer that puts `reason` in front of the model (the tool has already run)."""
    return Answer(0, json.dumps({"decision": "block", "reason": reason}))


def _when(ts: float | None) -> str:
    return "an unknown time" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def remedy(refusal: StaleWriteError) -> str:
    """What the model should do about `refusal`, phrased for Claude Code's tools."""
    return HOOK_REMEDY[refusal.reason].format(ttl=HOOK_GRANT_TTL, changed=", ".join(refusal.changed) or "-")


def denial_text(core: VolumeCore, refusal: StaleWriteError) -> str:
    """What the model is told: which file, what it read, what is current, who wrote it, what
    changed since (`refusal.diff`, when attached, with long lines shortened) and what to do."""
    with core.registry.read() as tx:
        record = tx.file(refusal.path)
    seen = (
        "you have not read it in this session"
        if refusal.seen_version is None
        else f"you last read version {refusal.seen_version}"
    )
    who = f"written by {refusal.last_writer} at {_when(record.committed_at if record else None)}"
    held = f" {refusal.holder} holds its write grant right now." if refusal.holder else ""
    changes = (
        f"\nWhat changed since version {refusal.seen_version} (unified diff to version "
        f"{refusal.current_version}):\n{_shortened(refusal.diff)}\n"
        if refusal.diff
        else " "
    )
    return (
        f"coherent-volume refused this write to {refusal.path} ({refusal.reason}): {seen}; the current "
        f"version is {refusal.current_version}, {who}.{held}{changes}{remedy(refusal)}"
    )


def _shortened(diff: str) -> str:
    """`diff` (already cut to a number of lines) with each line cut to DIFF_LINE_CHARS characters."""
    return "\n".join(
        line
        if len(line) <= DIFF_LINE_CHARS
        else f"{line[:DIFF_LINE_CHARS]}... ({len(line) - DIFF_LINE_CHARS} more characters)"
        for line in diff.rstrip("\n").split("\n")
    )


def _saw(response: Any) -> Callable[[bytes], bool]:
    """A predicate: does the file's current content match what the Read tool returned?"""
    file = response.get("file") if isinstance(response, dict) else None
    content = file.get("content") if isinstance(file, dict) else None
    if not isinstance(file, dict) or not isinstance(content, str):
        return lambda data: True  # this Claude Code does not report content: trust the read
    start = int(file.get("startLine") or 1)
    count = file.get("numLines")

    def matches(data: bytes) -> bool:
        lines = data.decode("utf-8", "replace").split("\n")
        shown = lines[start - 1 : start - 1 + count] if isinstance(count, int) else lines[start - 1 :]
        return "\n".join(shown).rstrip("\n") == content.rstrip("\n")

    return matches


@dataclass
class Progress:
    """How far a hook got with an event: what it answers when it cannot finish.

    `in_volume` and `managed` stay None until established; only an established False lets a
    write through without a decision."""

    path: str | None = None
    in_volume: bool | None = None
    managed: bool | None = None
    denial: Answer | None = None
    """A denial already decided; answered if what follows it (its diff) does not finish in time."""
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once the answer is known: `denial` decided, or the handling ended."""


def _is_write_check(event: dict[str, Any]) -> bool:
    return event.get("hook_event_name") == "PreToolUse" and event.get("tool_name") in WRITE_TOOLS


def _event_path(event: dict[str, Any]) -> str | None:
    """The absolute path of the file a tool event is about, if any."""
    tool_input = event.get("tool_input")
    path = (tool_input.get("file_path") or tool_input.get("notebook_path")) if isinstance(tool_input, dict) else None
    if not isinstance(path, str) or not path:
        return None
    if not os.path.isabs(path) and isinstance(event.get("cwd"), str):
        path = os.path.join(event["cwd"], path)
    return os.path.abspath(path)


def handle(event: dict[str, Any], process: ProcessId | None = None, progress: Progress | None = None) -> Answer:
    """Apply one hook event; the decision for PreToolUse is in the answer. Errors propagate
    (`run_hook` turns them into a denial for managed writes). `progress` records what is
    established on the way; the session's process is looked up when not given."""
    progress = progress if progress is not None else Progress()
    name = event.get("hook_event_name")
    path = progress.path = _event_path(event)
    session = event.get("session_id")
    if not isinstance(session, str) or not session:
        if _is_write_check(event) and path is not None and locate(path) is not None:
            progress.in_volume = True
            raise CoherenceError("the hook event has no session_id, so the write cannot be attributed to a session")
        return Answer(0, "", "coherent-volume: hook event without session_id; ignored")
    agent = agent_of(session)
    if name == "SessionEnd":
        _end_session(event, agent)
        return Answer()
    if path is None:
        progress.in_volume = False
        return Answer()
    found = locate(path)
    progress.in_volume = found is not None
    if found is None:
        return Answer()  # not in a volume: always allowed
    root, rel = found
    core = open_core(root)
    try:
        try:
            target = core.resolve(rel)
        except OutsideVolume:
            if is_registry_path(rel):
                raise
            progress.managed = False  # a symlink leading out of the volume: the write lands elsewhere
            return Answer()
        tool = event.get("tool_name")
        progress.managed = target.managed or target.alias_of is not None
        if target.alias_of is not None and _is_write_check(event):
            return _deny(f"coherent-volume refused this write: {UnprotectedAlias(target.alias_of, target.rel)}.")
        if not target.managed:
            return Answer()
        owner = process if process is not None else session_process()
        core.bind_session(agent, owner, pinned=True)
        if name == "PreToolUse" and tool in WRITE_TOOLS:
            try:  # check and grant in one commit-locked step: nobody else passes until PostToolUse
                core.begin_write(agent, target, owner, kind="write", ttl=HOOK_GRANT_TTL)
            except StaleWriteError as refusal:
                return _denied(core, refusal, progress)
            return Answer()
        if name == "PostToolUse" and tool == "Read":
            core.observe(agent, target, _saw(event.get("tool_response")))  # a confirmed read also lifts a fence
        elif name == "PostToolUse" and tool in WRITE_TOOLS:
            return _record_write(core, agent, target, owner)
        elif name in ("PostToolUseFailure", "PermissionDenied") and tool in WRITE_TOOLS:
            _release_hook_grant(core, agent, target, owner)
        return Answer()
    finally:
        core.registry.close()
        core.paths.close()


def _denied(core: VolumeCore, refusal: StaleWriteError, progress: Progress) -> Answer:
    """The denial of `refusal`. It is decided first (`progress.denial`); a `stale` one then gets the
    diff of what changed since the session's view (`VolumeCore.refusal_diff`, cut), which `run_hook`
    waits for at most DIFF_BUDGET seconds."""
    progress.denial = _deny(denial_text(core, refusal))
    progress.settled.set()
    if refusal.reason != "stale":
        return progress.denial
    return _deny(denial_text(core, core.refusal_diff(refusal)))


def _release_hook_grant(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> bool:
    """Release the grant a PreToolUse took for this session's write of `target`; never a grant taken
    through `lock()` (those fence) nor one of another agent or process. False if none was in force."""
    with core.registry.read() as tx:
        grant = tx.grant(target.rel)
    if grant is None or grant.agent != agent or grant.fences or grant.owner != owner:
        return False
    return core.release(grant)


def _record_write(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> Answer:
    """PostToolUse of a write tool: record the session's commit, then release its grant. A write
    that went over a version the session had not read (its grant had lapsed) is logged as a
    clobber by `adopt`, and the model is told."""
    with core.registry.read() as tx:
        last = tx.events(path=target.rel, limit=1, newest_first=True)
    after = last[0].seq if last else 0
    core.adopt(agent, target)
    _release_hook_grant(core, agent, target, owner)
    with core.registry.read() as tx:
        clobbers = [e for e in tx.events(after=after, path=target.rel, kind="clobber") if e.agent == agent]
    if not clobbers:
        return Answer()
    c = clobbers[-1]
    return _tell_model(
        f"coherent-volume: your write to {target.rel} went over version {c.version} ({c.detail}); your write grant "
        f"had lapsed (it lasts {HOOK_GRANT_TTL:g} s from the PreToolUse check), so another session's change may be "
        f"gone from the file. Read the file with the Read tool, check that the other change is still there and "
        f"redo it if it is not, or tell the user. `coherent-volume log {core.paths.root}` shows the history."
    )


def _end_session(event: dict[str, Any], agent: str) -> None:
    roots = set(_mounts().values())
    cwd = event.get("cwd")
    found = locate(os.path.join(cwd, "x")) if isinstance(cwd, str) else None
    if found:
        roots.add(found[0])
    for root in roots:
        core = open_core(root)
        try:
            core.end_session(agent)
        finally:
            core.registry.close()
            core.paths.close()


def _undecided(event: dict[str, Any], progress: Progress, what: str) -> Answer:
    """The answer when the hook could not decide (`what` says why): a write to a path that is (or
    may be) managed is denied; anything else goes ahead with a warning saying what was not done."""
    shown = progress.path or "this file"
    name, tool = event.get("hook_event_name"), event.get("tool_name")
    if not _is_write_check(event) or progress.in_volume is False or progress.managed is False:
        if name == "PostToolUse" and tool == "Read":
            undone = "no view was registered, so a write to it is refused until it is read again"
        elif name == "PostToolUse" and tool in WRITE_TOOLS:
            undone = (
                f"the write was not recorded as this session's (it will be recorded as a change by 'external'), "
                f"and its write grant ends by itself within {HOOK_GRANT_TTL:g} s"
            )
        elif name == "PostToolUseFailure":
            undone = f"the write grant ends by itself within {HOOK_GRANT_TTL:g} s"
        else:
            undone = "nothing was recorded for this event"
        return Answer(0, "", f"coherent-volume: {what} ({name} for {shown}); {undone}")
    return _deny(
        f"coherent-volume could not check this write to {shown}: {what}. It refused the write because an unchecked "
        "write could overwrite another session's work. Retry the write in a few seconds (read the file again first "
        f"if it may have changed). If it keeps being refused, run `coherent-volume why {shown}` with the Bash tool "
        "to see what holds the volume, and tell the user."
    )


def run_hook(stdin: str, process: ProcessId | None = None, budget: float = HOOK_BUDGET) -> Answer:
    """Parse and handle one event within `budget` seconds. A write to a path that is (or may be)
    managed is denied if the hook fails or overruns (fails closed); it goes ahead without a
    decision only for paths in no volume. Other events only warn on stderr."""
    try:
        event = json.loads(stdin)
        if not isinstance(event, dict):
            raise TypeError("the event is not a JSON object")
    except (TypeError, ValueError) as e:
        return Answer(0, "", f"coherent-volume: unreadable hook event ({e}); it names no file, so nothing was checked")
    progress = Progress()
    result: list[Answer] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            result.append(handle(event, process, progress))
        except BaseException as e:  # noqa: BLE001 -- answered below: a hook must never crash the session
            failure.append(e)
        finally:
            progress.settled.set()

    deadline = time.monotonic() + max(budget, 0.0)
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    progress.settled.wait(max(budget, 0.0))
    if not result and progress.denial is not None:  # decided: only the denial's diff may be missing
        worker.join(max(min(DIFF_BUDGET, deadline - time.monotonic()), 0.0))
    if result:
        return result[0]
    if progress.denial is not None:
        return progress.denial
    if failure:
        error = failure[0]
        return _undecided(event, progress, f"the check failed ({type(error).__name__}: {error})")
    return _undecided(
        event,
        progress,
        f"the check did not finish in time (waited {budget:.1f} s; the volume's "
        "registry is busy: another process may hold its commit lock)",
    )


def process_age() -> float:
    """Seconds since this process started (0 if /proc cannot tell): the hook's budget includes start-up."""
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
    hook = [{"type": "command", "command": command, "timeout": HOOK_TIMEOUT}]
    return {
        "PreToolUse": [{"matcher": "|".join(WRITE_TOOLS), "hooks": hook}],
        "PostToolUse": [{"matcher": "|".join(("Read",) + WRITE_TOOLS), "hooks": hook}],
        "PostToolUseFailure": [{"matcher": "|".join(WRITE_TOOLS), "hooks": hook}],
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
