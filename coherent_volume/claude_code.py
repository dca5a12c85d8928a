"""Claude Code sessions as agents: a session's view is what its model read.

Claude Code's Write and Edit tools re-read the target just before writing, so at the
file-system level every write looks fresh. Its hooks show what the model actually read:

- PostToolUse Read registers the agent's view at the version whose content is what the tool
  returned (and binds the session's process, pinning its views to model reads, so the tools'
  own re-reads through a mount never refresh them);
- PreToolUse Write/Edit/MultiEdit/NotebookEdit checks the view and takes the agent's write
  grant on the path in one commit-locked step (`VolumeCore.begin_write`), or denies the write
  with a reason and a remedy the model can act on (a `stale` denial also shows the diff of what
  changed since the agent's view, bounded). A `stale` write of a path the volume's merge globs
  name is merged instead where that is safe (`_merge`);
- PostToolUse of a write tool records the agent's own commit (`adopt`) and releases that
  grant; PostToolUseFailure and PermissionDenied release it;
- SubagentStop releases what a subagent holds, SessionEnd everything the session and its
  subagents hold;
- allowed writes, reads and UserPromptSubmit tell the model which files it read have changed
  since (`additionalContext`), once per file and version.

Each session is the agent `claude:<session_id>`; each of its Task subagents (the events carry
`agent_id`) is `claude:<session_id>/<agent_id>`, so siblings are checked against each other.
On a mount the file system sees one agent per process, the session, so there a subagent's
events act as its session's.

Invariants: between PreToolUse and PostToolUse of a write no other hooked agent can pass its
PreToolUse on the same path (it is refused `held`), so check and write are one step. A write
to a path that is (or may be) managed is denied whenever the hook cannot decide in time or
fails; it is allowed without a decision only for paths in no volume. An answer, once decided,
stands: what follows it (a denial's diff, a warning) is left out if it cannot be made in time,
never the decision. A merge is committed by the hook itself, as a `merge` version that leaves
the agent's view where it was (its model never saw the other change), and the tool is then
denied with what happened: the tool never writes over a merge.

Every rule is the core's; this module maps hook events onto it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import diffs
from .core import VolumeCore, open_core, validate_agent
from .core.history import MERGE_ATTEMPTS
from .errors import (
    CoherenceError,
    OutsideVolume,
    Reason,
    StaleWriteError,
    UnprotectedAlias,
)
from .liveness import ProcessId
from .paths import REGISTRY_DIR, Target, is_registry_path
from .protocol import FileRecord, may_merge

HOOK_TIMEOUT = 5
"""Seconds Claude Code gives the hook (`timeout` in the installed settings). A hook it kills at
its timeout counts as a non-blocking error and the tool runs: so the hook must answer first."""

HOOK_BUDGET = 3.0
"""Seconds, counted from the hook process's start, within which it decides. A hook that cannot
decide in time denies a write to a path that is (or may be) managed. The 2 s left before
HOOK_TIMEOUT cover printing the answer and a loaded machine; start-up and imports are inside
the budget (about 0.15 s idle, under 0.4 s on two busy cores)."""

HOOK_GRANT_TTL = 60.0
"""Seconds a write grant taken by PreToolUse lasts at most. It spans Claude Code's permission
step and the tool's write (milliseconds) until PostToolUse releases it. It ends earlier when
the session's process dies, at PostToolUseFailure or PermissionDenied, at SubagentStop (a
subagent's) and at SessionEnd; the TTL only bounds how long a session that never reports back
(a write rejected in the permission dialog, an interrupted tool, a killed hook) blocks other
sessions. If a permission prompt outlasts it and another session commits meanwhile, the late
write is logged as a clobber and PostToolUse tells the model, so the overwrite is never silent."""

DIFF_BUDGET = 1.0
"""Seconds a decided `stale` denial waits for the diff it shows (within HOOK_BUDGET); past it,
or if the diff fails, the denial is answered without it (difflib can take seconds on a large file
changed in many places)."""

WARN_BUDGET = 0.5
"""Seconds a decided answer waits for the stale-view warning added to it (within HOOK_BUDGET);
past it the answer goes without the warning."""

MERGE_MODES = frozenset({"acceptEdits", "bypassPermissions"})
"""Claude Code permission modes in which its file tools write without asking the user. Only in
these does the hook commit a clean merge itself: in any other mode that would skip the user's
approval of the write, so the model is shown the merge and told to redo its change instead."""

STALE_FILES_SHOWN = 5
STALE_DIFF_LINES = 30
WARNING_CHARS = 6000
"""Bounds of a stale-view warning: files listed, lines of diff per file, and characters of diff
in all (past them files are listed without their diff). Claude Code keeps 10,000 characters of
a hook's output."""

WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
EDIT_TOOLS = ("Edit", "MultiEdit")
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


def agent_of(session_id: str, agent_id: str | None = None) -> str:
    """The agent a Claude Code session is, or with `agent_id` one of its subagents."""
    return f"claude:{session_id}" if not agent_id else f"claude:{session_id}/{agent_id}"


def _mounts() -> dict[str, str]:
    from .mounts import fuse_mounts

    return fuse_mounts()


def _located(path: str) -> tuple[str, str, bool] | None:
    """(volume root, path relative to it, whether it is reached through a mount) for a path inside
    a mounted or plain volume, else None. Mounts come from /proc (never a stat through a mount); a
    plain volume is the nearest ancestor directory holding a registry."""
    absolute = os.path.abspath(path)
    for mountpoint, root in _mounts().items():
        if absolute == mountpoint or absolute.startswith(mountpoint + os.sep):
            return root, os.path.relpath(absolute, mountpoint), True
    directory = os.path.dirname(absolute)
    while True:
        if os.path.exists(os.path.join(directory, REGISTRY_DIR, "registry.db")):
            return directory, os.path.relpath(absolute, directory), False
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def locate(path: str) -> tuple[str, str] | None:
    """(volume root, path relative to it) for a path inside a mounted or plain volume, else None."""
    found = _located(path)
    return None if found is None else found[:2]


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


def _with_context(answer: Answer, event_name: str, context: str | None) -> Answer:
    """`answer` with `context` added to the model's context (`additionalContext`); a PreToolUse
    answer without a decision leaves the permission decision to Claude Code."""
    if not context:
        return answer
    out = json.loads(answer.stdout) if answer.stdout else {}
    out.setdefault("hookSpecificOutput", {"hookEventName": event_name})["additionalContext"] = context
    return Answer(answer.code, json.dumps(out), answer.stderr)


def _when(ts: float | None) -> str:
    return "an unknown time" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def remedy(refusal: StaleWriteError) -> str:
    """What the model should do about `refusal`, phrased for Claude Code's tools."""
    return HOOK_REMEDY[refusal.reason].format(ttl=HOOK_GRANT_TTL, changed=", ".join(refusal.changed) or "-")


def denial_text(core: VolumeCore, refusal: StaleWriteError, note: str = "") -> str:
    """What the model is told: which file, what it read, what is current, who wrote it, what
    changed since (`refusal.diff`, when attached: already bounded by `diffs.cut`), `note` and what
    to do."""
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
        f"{refusal.current_version}):\n{refusal.diff.rstrip()}\n"
        if refusal.diff
        else " "
    )
    return (
        f"coherent-volume refused this write to {refusal.path} ({refusal.reason}): {seen}; the current "
        f"version is {refusal.current_version}, {who}.{held}{changes}{note}{remedy(refusal)}"
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
    decided: Answer | None = None
    """An answer already decided; given if what follows it (a denial's diff, a merge, a warning)
    does not finish within `patience` seconds (and the budget)."""
    patience: float = DIFF_BUDGET
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once the answer is known: `decided`, or the handling ended."""

    def decide(self, answer: Answer, patience: float) -> None:
        self.decided, self.patience = answer, patience
        self.settled.set()


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


def _subagent(event: dict[str, Any]) -> str | None:
    """The `agent_id` Claude Code adds to the events of a subagent's tool calls (absent for the
    session's main thread)."""
    agent_id = event.get("agent_id")
    return agent_id if isinstance(agent_id, str) and agent_id else None


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
    main = agent_of(session)
    sub = _subagent(event)
    if name == "SessionEnd":
        _end_session(event, main, session)
        return Answer()
    if name == "SubagentStop":
        if sub is not None:
            _end(event, [agent_of(session, sub)])
        return Answer()
    if name == "UserPromptSubmit":
        progress.decide(Answer(), WARN_BUDGET)
        return _with_context(Answer(), name, _warn_in(_roots(event), main, session))
    if path is None:
        progress.in_volume = False
        return Answer()
    found = _located(path)
    progress.in_volume = found is not None
    if found is None:
        return Answer()  # not in a volume: always allowed
    root, rel, mounted = found
    agent = main if mounted else agent_of(session, sub)  # a mount tells no thread of a process apart
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
        validate_agent(main)  # before anything is bound or recorded under a name that cannot be an agent's
        validate_agent(agent)
        owner = process if process is not None else session_process()
        if core.session_of(owner) != (main, True):  # the session's process is the session's, subagents' too
            core.bind_session(main, owner, pinned=True)
        answer = Answer()
        if name == "PreToolUse" and tool in WRITE_TOOLS:
            try:  # check and grant in one commit-locked step: nobody else passes until PostToolUse
                core.begin_write(agent, target, owner, kind="write", ttl=HOOK_GRANT_TTL)
            except StaleWriteError as refusal:
                return _refused(core, event, agent, target, refusal, progress)
        elif name == "PostToolUse" and tool == "Read":
            core.observe(agent, target, _saw(event.get("tool_response")))  # a confirmed read also lifts a fence
        elif name == "PostToolUse" and tool in WRITE_TOOLS:
            answer = _record_write(core, agent, target, owner)
        elif name in ("PostToolUseFailure", "PermissionDenied") and tool in WRITE_TOOLS:
            _release_hook_grant(core, agent, target, owner)
            return answer
        else:
            return answer
        progress.decide(answer, WARN_BUDGET)
        return _with_context(answer, str(name), _warning([core], agent, session))
    finally:
        core.registry.close()
        core.paths.close()


def _denied(core: VolumeCore, refusal: StaleWriteError, progress: Progress, note: str = "") -> Answer:
    """The denial of `refusal` (with `note` before its remedy). It is decided first
    (`progress.decided`); a `stale` one then gets the diff of what changed since the agent's view
    (`VolumeCore.refusal_diff`, cut), which `run_hook` waits for at most DIFF_BUDGET seconds."""
    decided = _deny(denial_text(core, refusal, note))
    progress.decide(decided, DIFF_BUDGET)
    if refusal.reason != "stale":
        return decided
    return _deny(denial_text(core, core.refusal_diff(refusal), note))


def _refused(
    core: VolumeCore, event: dict[str, Any], agent: str, target: Target, refusal: StaleWriteError, progress: Progress
) -> Answer:
    """The answer to a refused write check: merged where the volume's merge globs name the path and
    the refusal allows it (`protocol.may_merge`: only `stale`), for a Write or an edit, else denied."""
    mergeable = (
        event.get("tool_name") in ("Write",) + EDIT_TOOLS
        and refusal.seen_version is not None
        and may_merge(refusal.reason, core.policy().merges(target.rel))
    )
    if not mergeable:
        return _denied(core, refusal, progress)
    return _merge(core, event, agent, target, refusal, progress)


_UNDER_WAY = (
    "coherent-volume was merging your change with the current version when its time ran out, so your "
    "change may be in the file now. Check before you redo it.\n"
)


@dataclass(frozen=True)
class _Plan:
    """A write merged onto the current version: the merged content, or why there is none."""

    merged: bytes | None = None
    current: bytes = b""
    conflicts: tuple[diffs.Conflict, ...] = ()
    why: str = ""


def _merge(
    core: VolumeCore, event: dict[str, Any], agent: str, target: Target, refusal: StaleWriteError, progress: Progress
) -> Answer:
    """A stale write of a merge-glob path: the merge of the agent's view (base), its change (ours)
    and the current version (theirs), committed by the hook as a `merge` version in the permission
    modes where Claude Code writes without asking (MERGE_MODES), and the tool denied with what was
    done (it must not write over the merge). Overlapping changes, an edit that the merge would not
    reproduce on the current content, binary or unretained content: denied as stale, saying why.
    In other modes the model is shown the merge and told to read again and redo its change.

    Whatever happens the tool is denied; until the answer is known the decided fallback is the
    stale denial, and while a commit is under way one that says the change may be in the file."""
    progress.decide(_deny(denial_text(core, refusal)), HOOK_BUDGET)
    mode = event.get("permission_mode")
    for _ in range(MERGE_ATTEMPTS):
        plan = _plan(core, target, refusal, event)
        if plan.merged is None:
            return _denied(core, refusal, progress, _unmerged_note(refusal, plan))
        if mode not in MERGE_MODES:
            preview = diffs.unified(
                plan.current, plan.merged, f"{target.rel}@v{refusal.current_version}", f"{target.rel} with your change"
            )
            return _deny(denial_text(core, refusal, _preview_note(refusal, mode, preview)))
        progress.decided = _deny(denial_text(core, refusal, _UNDER_WAY))
        try:
            version = core.commit(
                agent,
                target,
                plan.merged,
                expected=refusal.current_version,
                made=("merge", (refusal.seen_version or 0, refusal.current_version)),
            )
        except StaleWriteError as again:
            if again.reason != "stale" or again.seen_version is None:
                return _denied(core, again, progress)
            refusal = again  # another commit landed since: merge onto it
            continue
        return _deny(_merged_text(core, refusal, version))
    return _denied(core, refusal, progress, "It was not merged: other writes kept landing while it was merged.\n")


def _plan(core: VolumeCore, target: Target, refusal: StaleWriteError, event: dict[str, Any]) -> _Plan:
    """The merge of the tool's change onto the current version. A Write's content is merged three-way
    (`diffs.merge3`). An Edit/MultiEdit is applied by Claude Code to the current content, so it
    merges only if applying it to the version the agent read and merging that with the current
    version gives exactly the current content with the edit applied."""
    base_version, current_version = refusal.seen_version or 0, refusal.current_version
    try:
        base = b"" if base_version == 0 else core.read_version(target, base_version)
        current = core.read_version(target, current_version)
    except CoherenceError as e:
        return _Plan(why=str(e))
    tool_input = event.get("tool_input") or {}
    edits = _edits(event.get("tool_name"), tool_input)
    content = tool_input.get("content")
    if edits is None and not isinstance(content, str):
        return _Plan(why="the tool's input names no change coherent-volume can merge")
    ours = content.encode("utf-8") if isinstance(content, str) else base
    if not (diffs.small_enough(len(base), len(ours)) and diffs.small_enough(len(base), len(current))):
        return _Plan(why="the file is too large to merge within the hook's time")
    if not (diffs.is_text(base) and diffs.is_text(current)):
        return _Plan(why="binary content is never merged")
    edited_current: bytes | None = None
    if edits is not None:
        edited_base = _applied(base.decode("utf-8"), edits)
        edited = _applied(current.decode("utf-8"), edits)
        if edited_base is None or edited is None:
            which = "the version you read" if edited_base is None else "the current content"
            return _Plan(why=f"your edit does not apply to {which} (its old_string is missing or not unique there)")
        ours, edited_current = edited_base.encode("utf-8"), edited.encode("utf-8")
    merged, conflicts = diffs.merge3(base, ours, current)
    if conflicts:
        return _Plan(current=current, conflicts=tuple(conflicts))
    if merged is None:
        return _Plan(why="binary content is never merged")
    if edited_current is not None and merged != edited_current:
        return _Plan(why="applied to the current content, your edit would not give the merge of both changes")
    return _Plan(merged, current)


def _edits(tool: object, tool_input: dict[str, Any]) -> list[tuple[str, str, bool]] | None:
    """The (old_string, new_string, replace_all) edits of an Edit or MultiEdit input, in order; None
    for any other tool or an input that is not one."""
    if tool == "Edit":
        items: object = [tool_input]
    elif tool == "MultiEdit":
        items = tool_input.get("edits")
    else:
        return None
    if not isinstance(items, list) or not items:
        return None
    edits = []
    for item in items:
        old, new = (item.get("old_string"), item.get("new_string")) if isinstance(item, dict) else (None, None)
        if not isinstance(old, str) or not old or not isinstance(new, str):
            return None
        edits.append((old, new, item.get("replace_all") is True))
    return edits


def _applied(text: str, edits: list[tuple[str, str, bool]]) -> str | None:
    """`text` with `edits` applied in order as Claude Code applies them: each old_string must occur
    exactly once (at least once with replace_all), and deleting text (an empty new_string) that a
    newline follows deletes that newline too. None if one does not apply, or only as Claude Code's
    lenient matching would (its quote and line-ending normalisation): then nothing is merged."""
    for old, new, every in edits:
        count = text.count(old)
        if count == 0 or (count > 1 and not every):
            return None
        if not new and not old.endswith("\n") and old + "\n" in text:
            old += "\n"
        text = text.replace(old, new, -1 if every else 1)
    return text


def _unmerged_note(refusal: StaleWriteError, plan: _Plan) -> str:
    if plan.conflicts:
        hunks = diffs.cut("".join(str(c) for c in plan.conflicts)).rstrip()
        return (
            f"Your change and version {refusal.current_version} changed the same lines ({len(plan.conflicts)} "
            f"conflicting hunk(s)), so coherent-volume did not merge them:\n{hunks}\n"
        )
    return f"It was not merged: {plan.why}.\n"


def _preview_note(refusal: StaleWriteError, mode: object, preview: str | None) -> str:
    shown = diffs.cut(preview).rstrip() if preview else "(no change to the current content)"
    return (
        f"Your change merges cleanly with version {refusal.current_version}: the two changes touch different "
        f"lines. coherent-volume commits such a merge itself only where Claude Code writes without asking "
        f"(permission mode acceptEdits or bypassPermissions; this session's is {mode or 'unknown'}), since "
        f"writing it here would skip the user's approval. Applied to the current content, your change is:\n"
        f"{shown}\n"
    )


def _merged_text(core: VolumeCore, refusal: StaleWriteError, version: int) -> str:
    """What the model is told after the hook committed its merged change as `version`."""
    base, current = refusal.seen_version or 0, refusal.current_version
    if version == current:
        done = f"the current version {current} already holds your change, so there was nothing to write"
    else:
        done = f"coherent-volume merged your change into it and committed the result as version {version}"
    theirs = core.refusal_diff(StaleWriteError(refusal.path, refusal.agent, "stale", base, current, None)).diff
    changes = (
        f"\nWhat changed between the version you read and version {current} (unified diff):\n{theirs.rstrip()}"
        if theirs
        else ""
    )
    return (
        f"coherent-volume: {refusal.path} changed since you read it (you last read version {base}; version "
        f"{current} is by {refusal.last_writer}), and {done}. Both changes are kept: they touch different lines "
        f"and {refusal.path} is a file this volume merges. The tool did not run, because the write is already "
        f"done: do not repeat it. Read the file with the Read tool before you change it again.{changes}"
    )


def _release_hook_grant(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> bool:
    """Release the grant a PreToolUse took for this agent's write of `target`; never a grant taken
    through `lock()` (those fence) nor one of another agent or process. False if none was in force."""
    with core.registry.read() as tx:
        grant = tx.grant(target.rel)
    if grant is None or grant.agent != agent or grant.fences or grant.owner != owner:
        return False
    return core.release(grant)


def _record_write(core: VolumeCore, agent: str, target: Target, owner: ProcessId) -> Answer:
    """PostToolUse of a write tool: record the agent's commit, then release its grant. A write
    that went over a version the agent had not read (its grant had lapsed) is logged as a
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


# ---- stale views: warnings --------------------------------------------------------------


def _warned_path(session: str) -> Path | None:
    """The file remembering which stale views a session's agents were warned of, in a directory
    only this user may use (None if there is none: then every warning is repeated)."""
    directory = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()) / f"coherent-volume-{os.getuid()}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        return None
    return directory / f"claude-{hashlib.sha256(session.encode('utf-8', 'surrogatepass')).hexdigest()[:32]}.json"


def _load_warned(path: Path | None) -> dict[str, int]:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_warned(path: Path | None, warned: dict[str, int]) -> None:
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(warned))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a warning may be repeated; nothing else depends on it


def _warning(cores: Iterable[VolumeCore], agent: str, session: str) -> str | None:
    """What to tell the model of files `agent` read in these volumes that have changed since: each
    file, the version it read, the current one, who wrote it when and the diff (bounded: see
    WARNING_CHARS); None if there is nothing it was not already told. Each stale view is told
    once per current version. Cheap when nothing is stale: one registry query per volume (changes
    made outside the volume's faces count once the volume has noticed them)."""
    stale: list[tuple[VolumeCore, str, int, int, FileRecord | None]] = []
    for core in cores:
        with core.registry.read() as tx:
            stale += [(core, path, seen, now, tx.file(path)) for path, seen, now in tx.stale_views(agent)]
    if not stale:
        return None
    marks_at = _warned_path(session)
    warned = _load_warned(marks_at)
    entries: list[str] = []
    diff_chars = more = 0
    for core, path, seen, now, record in stale:
        mark = f"{agent}\n{core.paths.root}\n{path}"
        if warned.get(mark) == now:
            continue
        warned[mark] = now
        if len(entries) >= STALE_FILES_SHOWN:
            more += 1
            continue
        what = "deleted" if record is not None and not record.present else f"now version {now}"
        writer = record.writer if record is not None else "unknown"
        entry = (
            f"- {path}: you last read version {seen}; it is {what}, written by {writer} at "
            f"{_when(record.committed_at if record is not None else None)}"
        )
        if diff_chars < WARNING_CHARS:
            diff = core.refusal_diff(StaleWriteError(path, agent, "stale", seen, now, writer)).diff
            if diff:
                shown = diffs.cut(diff, STALE_DIFF_LINES).rstrip()
                diff_chars += len(shown)
                entry += f"; what changed:\n{shown}"
        entries.append(entry)
    if not entries:
        return None
    _save_warned(marks_at, warned)
    tail = f"\n(and {more} more changed files you read)" if more else ""
    return (
        "coherent-volume: files you read have changed since you read them. Read them again with the Read tool "
        "before you change them (a write built on what you read is refused):\n" + "\n".join(entries) + tail
    )


def _roots(event: dict[str, Any]) -> set[str]:
    """The roots of every mounted volume and of the volume holding the event's working directory."""
    roots = set(_mounts().values())
    cwd = event.get("cwd")
    found = locate(os.path.join(cwd, "x")) if isinstance(cwd, str) and cwd else None
    if found:
        roots.add(found[0])
    return roots


def _warn_in(roots: Iterable[str], agent: str, session: str) -> str | None:
    cores = []
    try:
        for root in sorted(roots):
            cores.append(open_core(root))
        return _warning(cores, agent, session)
    finally:
        for core in cores:
            core.registry.close()
            core.paths.close()


def _end(event: dict[str, Any], agents: list[str], subagents_of: str | None = None) -> None:
    """Release every grant `agents` (and, with `subagents_of`, that session's subagents) hold, and
    their process bindings, in every volume the event may concern."""
    for root in _roots(event):
        core = open_core(root)
        try:
            ending = list(agents)
            if subagents_of is not None:
                with core.registry.read() as tx:
                    ending += sorted({g.agent for g in tx.grants() if g.agent.startswith(subagents_of + "/")})
            for agent in ending:
                core.end_session(agent)
        finally:
            core.registry.close()
            core.paths.close()


def _end_session(event: dict[str, Any], agent: str, session: str) -> None:
    _end(event, [agent], subagents_of=agent)
    marks = _warned_path(session)
    if marks is not None:
        marks.unlink(missing_ok=True)


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
        elif name in ("PostToolUseFailure", "SubagentStop"):
            undone = f"the write grants end by themselves within {HOOK_GRANT_TTL:g} s"
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
    if not result and progress.decided is not None:  # decided: only what follows the decision may be missing
        worker.join(max(min(progress.patience, deadline - time.monotonic()), 0.0))
    if result:
        return result[0]
    if progress.decided is not None:
        return progress.decided
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
        "UserPromptSubmit": [{"hooks": hook}],
        "SubagentStop": [{"hooks": hook}],
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
