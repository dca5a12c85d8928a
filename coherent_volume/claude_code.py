"""Claude Code sessions as agents: a session's view is what its model read.

Claude Code's Write and Edit tools re-read the target just before writing, so at the
file-system level every write looks fresh. Its hooks show what the model actually read:

- SessionStart binds the session's process (views pinned to what its model read), so on a mount
  whatever it does is the session's from its first access on;
- PostToolUse Read registers the agent's view at the version whose content is what the tool
  returned;
- PreToolUse Write/Edit/MultiEdit/NotebookEdit checks the view and takes the agent's write grant
  on the path in one commit-locked step, or denies the write with a reason and a remedy the model
  can act on (a `stale` denial also shows the diff since the agent's view, bounded). A `stale`
  write of a path the volume's merge globs name is merged instead where that is safe (`_merge`);
- PostToolUse of a write tool records the agent's own commit and releases that grant;
  PostToolUseFailure and PermissionDenied release it;
- SubagentStop releases what a subagent holds, SessionEnd everything the session and its
  subagents hold;
- allowed writes, reads, recorded writes and UserPromptSubmit tell the model which files it read
  have changed since (`additionalContext`), once per file and version.

Each session is the agent `claude:<session_id>`; each of its Task subagents (the events carry
`agent_id`) is `claude:<session_id>/<agent_id>`, so siblings are checked against each other. On a
mount the file system sees one agent per process, the session, so there a subagent's events act
as its session's.

Invariants: between PreToolUse and PostToolUse of a write no other hooked agent can pass its
PreToolUse on the same path (it is refused `held`), so check and write are one step. A merge is
committed by the hook itself, as a `merge` version that leaves the agent's view where it was (its
model never saw the other change), and the tool is then denied with what happened: the tool never
writes over a merge. Failing closed, budgets and every other step are the shared ones (`hooks`,
`hook_steps`, `stale_warnings`); this module maps Claude Code's events onto them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from . import diffs, hook_settings, hook_steps, hooks
from .core import VolumeCore
from .core.history import MERGE_ATTEMPTS
from .errors import CoherenceError, StaleWriteError
from .hook_steps import denial_text, denied
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import Target
from .protocol import may_merge
from .stale_warnings import forget, stale_warning

MERGE_MODES = frozenset({"acceptEdits", "bypassPermissions"})
"""Claude Code permission modes in which its file tools write without asking the user. Only in
these does the hook commit a clean merge itself: in any other mode that would skip the user's
approval of the write, so the model is shown the merge and told to redo its change instead."""

WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
EDIT_TOOLS = ("Edit", "MultiEdit")

HOOK_REMEDY = hooks.tool_remedies(" with the Read tool", " with the Bash tool")
"""What the model is told to do, per refusal reason (`errors.REMEDY` phrased for Claude Code's tools)."""


def agent_of(session_id: str, agent_id: str | None = None) -> str:
    """The agent a Claude Code session is, or with `agent_id` one of its subagents."""
    return f"claude:{session_id}" if not agent_id else f"claude:{session_id}/{agent_id}"


def _tell_model(reason: str) -> Answer:
    """A PostToolUse answer that puts `reason` in front of the model (the tool has already run)."""
    return Answer(0, json.dumps({"decision": "block", "reason": reason}))


def _saw(response: Any) -> Callable[[bytes], bool]:
    """A predicate: does the file's current content match what the Read tool returned?"""
    file = response.get("file") if isinstance(response, dict) else None
    content = file.get("content") if isinstance(file, dict) else None
    if not isinstance(file, dict) or not isinstance(content, str):
        return lambda data: True  # this Claude Code does not report content: trust the read
    return partial(hook_steps.shows, text=content, start=int(file.get("startLine") or 1), whole=False)


def _event_path(event: dict[str, Any]) -> str | None:
    """The absolute path of the file a tool event is about, if any."""
    tool_input = event.get("tool_input")
    path = (tool_input.get("file_path") or tool_input.get("notebook_path")) if isinstance(tool_input, dict) else None
    return hooks.absolute(path, event.get("cwd"))


def _subagent(event: dict[str, Any]) -> str | None:
    """The `agent_id` Claude Code adds to the events of a subagent's tool calls (absent for the
    session's main thread)."""
    agent_id = event.get("agent_id")
    return agent_id if isinstance(agent_id, str) and agent_id else None


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Claude Code hook event; the decision for PreToolUse is in the answer. Errors
    propagate (`FACE.run` answers them, failing closed for managed writes). `process` is the
    session's Claude Code process, looked up when not given."""
    name, tool, cwd = event.get("hook_event_name"), event.get("tool_name"), event.get("cwd")
    path = progress.path = _event_path(event)
    progress.write_check = name == "PreToolUse" and tool in WRITE_TOOLS
    session = event.get("session_id")
    if not isinstance(session, str) or not session:
        return Answer(0, "", hook_steps.unattributed([(path, "write")] if path else [], progress, "session_id"))
    main = agent_of(session)
    actor = hook_steps.Actor(agent_of(session, _subagent(event)), main, process or hooks.session_process())
    places = [cwd if isinstance(cwd, str) else None]
    if name == "SessionStart":
        hook_steps.start_session(actor, places)
        return Answer()
    if name == "SessionEnd":
        hook_steps.end_session(main, places)
        forget(main)
        return Answer()
    if name == "SubagentStop":
        if actor.agent != main:
            hook_steps.end_session(actor.agent, places)
        return Answer()
    if name == "UserPromptSubmit":
        progress.decide(Answer(), hooks.WARN_BUDGET)
        return hooks.with_context(Answer(), name, [stale_warning(main, hook_steps.volume_roots(places), FACE, main)])
    found = hook_steps.located(path) if path is not None else None
    progress.in_volume = found is not None
    if path is None or found is None:
        return Answer()  # not in a volume: always allowed
    answer = Answer()
    if progress.write_check:
        denial = hook_steps.begin_writes(actor, [(path, "write")], progress, FACE, partial(_refused, event, progress))
        if denial is not None:
            return denial
    elif name == "PostToolUse" and tool == "Read":
        hook_steps.observe(actor, path, _saw(event.get("tool_response")), progress)
    elif name == "PostToolUse" and tool in WRITE_TOOLS:
        told = hook_steps.end_writes(actor, [(path, "write")], progress, record=True)
        answer = _tell_model("\n\n".join(told)) if told else answer
    elif name in ("PostToolUseFailure", "PermissionDenied") and tool in WRITE_TOOLS:
        hook_steps.end_writes(actor, [(path, "write")], progress, record=False)
        return answer
    else:
        return answer
    if not progress.managed:
        return answer
    progress.decide(answer, hooks.WARN_BUDGET)
    warning = stale_warning(actor.on(found.mounted), [found.root], FACE, main)
    return hooks.with_context(answer, str(name), [warning])


def _refused(
    event: dict[str, Any], progress: Progress, core: VolumeCore, target: Target, agent: str, refusal: StaleWriteError
) -> Answer:
    """The answer to a refused write check: merged where the volume's merge globs name the path and
    the refusal allows it (`protocol.may_merge`: only `stale`), for a Write or an edit, else denied."""
    mergeable = (
        event.get("tool_name") in ("Write",) + EDIT_TOOLS
        and refusal.seen_version is not None
        and may_merge(refusal.reason, core.policy().merges(target.rel))
    )
    if not mergeable:
        return denied(core, refusal, progress, FACE)
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
    progress.decide(hooks.deny_tool_use(denial_text(core, refusal, FACE)), hooks.HOOK_BUDGET)
    mode = event.get("permission_mode")
    for _ in range(MERGE_ATTEMPTS):
        plan = _plan(core, target, refusal, event)
        if plan.merged is None:
            return denied(core, refusal, progress, FACE, _unmerged_note(refusal, plan))
        if mode not in MERGE_MODES:
            preview = diffs.unified(
                plan.current, plan.merged, f"{target.rel}@v{refusal.current_version}", f"{target.rel} with your change"
            )
            return hooks.deny_tool_use(denial_text(core, refusal, FACE, _preview_note(refusal, mode, preview)))
        progress.decided = hooks.deny_tool_use(denial_text(core, refusal, FACE, _UNDER_WAY))
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
                return denied(core, again, progress, FACE)
            refusal = again  # another commit landed since: merge onto it
            continue
        return hooks.deny_tool_use(_merged_text(core, refusal, version))
    return denied(core, refusal, progress, FACE, "It was not merged: other writes kept landing while it was merged.\n")


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


def _undone(event: dict[str, Any]) -> str:
    name, tool = event.get("hook_event_name"), event.get("tool_name")
    if name == "PostToolUse":
        return "read" if tool == "Read" else "write" if tool in WRITE_TOOLS else "other"
    return "release" if name in ("PostToolUseFailure", "PermissionDenied", "SubagentStop") else "other"


def our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    writes = "|".join(WRITE_TOOLS)
    return hook_settings.nested(
        {"type": "command", "command": command, "timeout": int(hooks.HOOK_TIMEOUT)},
        {
            "PreToolUse": writes,
            "PostToolUse": f"Read|{writes}",
            "PostToolUseFailure": writes,
            "UserPromptSubmit": None,
            "SubagentStop": None,
            "SessionStart": None,
            "SessionEnd": None,
        },
    )


FACE = Face(
    "claude-code",
    handle,
    undone=_undone,
    our_hooks=our_hooks,
    remedies=HOOK_REMEDY,
    deny=hooks.deny_tool_use,
    reread="Read them again with the Read tool before you change them",
    seen="read",
    warn_once=True,
)
"""The Claude Code face: `coherent-volume hook claude-code` runs `FACE.run`; `install` writes
.claude/settings.json."""
