"""Claude Code sessions as agents: a session's view is what its model read.

Claude Code's Write and Edit tools re-read the target just before writing, so at the
file-system level every write looks fresh. Its hooks show what the model actually read:

- SessionStart binds the session's process (views pinned to what its model read), so on a mount
  whatever it does is the session's from its first access on;
- PostToolUse Read registers the agent's view at the version whose content is what the tool
  returned (`_saw`: nothing for a read that showed no line of the file, an error, or a response
  whose text cannot be checked against the file);
- PreToolUse Write/Edit/MultiEdit/NotebookEdit checks the view and takes the agent's write grant
  on the path in one commit-locked step, or denies the write with a reason and a remedy the model
  can act on (a `stale` denial also shows the diff since the agent's view, bounded). A `stale`
  write of a path the volume's merge globs name is merged instead where that is safe (`hook_merge`;
  the hook commits the merge only in the permission modes where Claude Code writes without asking);
- PostToolUse of a write tool records the agent's own commit and releases that grant;
  PostToolUseFailure and PermissionDenied release it;
- PreToolUse Bash does the same for the files the command recognisably writes (`shell_writes`,
  relative to the event's `cwd`; an append needs no view, a write known only when it runs is
  denied: `hook_steps.planned`), its refusals worded for a command (`SHELL_REMEDY`); its
  PostToolUse records what the command left in them, and the files it deleted
  (`hook_steps.end_deletions`), and releases their grants; PostToolUseFailure and
  PermissionDenied release them. A command run in the background (`run_in_background`: its
  PostToolUse comes when it has started), like a job a command does not wait for, that writes a
  managed file off a mount is denied (`hook_steps.planned`). Nothing of a Bash command is merged;
- SubagentStop releases what a subagent holds, SessionEnd everything the session and its
  subagents hold;
- allowed writes, reads, recorded writes and UserPromptSubmit tell the model which files it read
  have changed since (`additionalContext`), once per file and version.

Each session is the agent `claude:<session_id>`; each of its Task subagents (the events carry
`agent_id`) is `claude:<session_id>/<agent_id>`, so siblings are checked against each other. On a
mount the file system sees one agent per process, the session, so there a subagent's events act
as its session's. A second live Claude Code process on the same session id (`--resume` in two
terminals) is `claude:<session_id>~<pid>` (`hook_steps._joined`).

Invariants: between PreToolUse and PostToolUse of a write no other hooked agent can pass its
PreToolUse on the same path (it is refused `held`), so check and write are one step. A merge is
committed by the hook itself, as a `merge` version that leaves the agent's view where it was (its
model never saw the other change), and the tool is then denied with what happened: the tool never
writes over a merge. Failing closed, budgets, merging and every other step are the shared ones
(`hooks`, `hook_steps`, `hook_merge`, `shell_writes`, `stale_warnings`); this module maps Claude
Code's events onto them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, TypeGuard

from . import hook_merge, hook_paths, hook_settings, hook_steps, hooks
from .core import VolumeCore
from .errors import Reason, StaleWriteError
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import Target
from .protocol import HandleKind, agent_name_problem
from .shell_writes import shell_writes
from .stale_warnings import forget, partly_read_warning, stale_warning

MERGE_MODES = frozenset({"acceptEdits", "bypassPermissions"})
"""Claude Code permission modes in which its file tools write without asking the user. Only in
these does the hook commit a clean merge itself: in any other mode that would skip the user's
approval of the write, so the model is shown the merge and told to redo its change instead."""

WRITE_TOOLS = ("Write", "Edit", "MultiEdit", "NotebookEdit")
LINE_CUT = 2000
"""The Read tool shows at most this many characters of a line: a line cut so is a prefix of the file's."""
EDIT_TOOLS = ("Edit", "MultiEdit")
MERGING_TOOLS = ("Write",) + EDIT_TOOLS
"""The write tools whose stale write of a merge-glob file is merged (`hook_merge`)."""
SHELL_TOOL = "Bash"
SHELL_EVENTS = ("PreToolUse", "PostToolUse", "PostToolUseFailure", "PermissionDenied")
"""The events of a Bash command the hook checks, records or releases its writes on."""

HOOK_REMEDY = hooks.tool_remedies(" with the Read tool", " with the Bash tool")
"""What the model is told to do, per refusal reason (`errors.REMEDY` phrased for Claude Code's tools)."""

_RUN_AGAIN = "run the command again if it still does what you mean on the file's current content"
SHELL_REMEDY: dict[Reason, str] = {
    **HOOK_REMEDY,
    "stale": (
        f"Read the file again with the Read tool, then {_RUN_AGAIN} (a command that writes the whole file must "
        "be rebuilt from it)."
    ),
    "unread": (
        "Read the file with the Read tool first (printing it through Bash, with `cat` for example, is no read "
        f"coherent-volume can see), then {_RUN_AGAIN}."
    ),
    "held": (
        "Its holder is writing it right now; the grant ends when that write is done (a hook's grant after {ttl:g} "
        f"s at the latest). Wait a few seconds (for example run `sleep 5`), then read the file again with the Read "
        f"tool (if it exists by then) and {_RUN_AGAIN}."
    ),
    "fenced": (
        "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it are "
        f"held back until you read it again. Read the file again with the Read tool, then {_RUN_AGAIN}."
    ),
}
"""What the model is told to do, per refusal reason, about a Bash command that writes the file."""


def agent_of(session_id: str, agent_id: str | None = None) -> str:
    """The agent a Claude Code session is (`hooks.agent_name`: an id that makes no valid agent
    name, too long or unprintable, is named by its hash), or with `agent_id` one of its subagents,
    `SESSION/AGENT_ID` (the same for an agent id that makes none)."""
    main = hooks.agent_name("claude", session_id) or "claude:"
    if not agent_id:
        return main
    sub = f"{main}/{agent_id}"
    return sub if agent_name_problem(sub) is None else f"{main}/sha256-{hooks.id_hash(agent_id)}"


def _tell_model(reason: str) -> Answer:
    """A PostToolUse answer that puts `reason` in front of the model (the tool has already run)."""
    return Answer(0, json.dumps({"decision": "block", "reason": reason}))


def _saw(response: Any) -> tuple[Callable[[bytes], bool], bool] | None:
    """A predicate: does the file's content match what the Read tool returned? And whether that
    was all of the file the model was shown (the Read gave it whole). None when the
    response shows nothing that can be checked against the file's bytes (an error, an image, a
    shape this hook does not know): then no view is registered. A text read gives `file.content`
    (lines from `file.startLine`; all of the file's when it starts at line 1 and `numLines` is
    `totalLines`, so a file that grew since shows more than the model saw); a notebook read gives
    `file.cells`, each cell's `source`."""
    file = response.get("file") if isinstance(response, dict) else None
    if not isinstance(file, dict) or response.get("error"):
        return None
    content, cells, start = file.get("content"), file.get("cells"), file.get("startLine")
    if isinstance(content, str):
        start = start if _count(start) and start > 0 else 1
        shown, total = file.get("numLines"), file.get("totalLines")
        whole = start == 1 and _count(shown) and shown == total
        return partial(hook_steps.shows, text=content, start=start, whole=whole, cut=LINE_CUT), bool(whole)
    if response.get("type") == "notebook" and isinstance(cells, list):
        return partial(_cells_shown, cells=cells), True
    return None


def _count(value: object) -> TypeGuard[int]:
    """Whether a response's field is a count (JSON's integers, not its booleans)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _cells_shown(data: bytes, cells: list[Any]) -> bool:
    """Whether `cells` (a notebook Read's) are the notebook `data`'s cells, each with its source."""
    try:
        notebook = json.loads(data)
    except ValueError:
        return False
    have = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(have, list) or len(have) != len(cells):
        return False
    for cell, shown in zip(have, cells, strict=True):
        source = cell.get("source") if isinstance(cell, dict) else None
        source = "".join(source) if isinstance(source, list) and all(isinstance(s, str) for s in source) else source
        if not isinstance(source, str) or not isinstance(shown, dict) or shown.get("source") != source:
            return False
    return True


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


def _shell(event: dict[str, Any]) -> tuple[str, str] | None:
    """The command of a Bash tool event and the directory it runs in (the event's `cwd`), if it is one."""
    tool_input, cwd = event.get("tool_input"), event.get("cwd")
    command = tool_input.get("command") if isinstance(tool_input, dict) else None
    if event.get("tool_name") != SHELL_TOOL or event.get("hook_event_name") not in SHELL_EVENTS:
        return None
    return (command, cwd if isinstance(cwd, str) and cwd else ".") if isinstance(command, str) else None


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Claude Code hook event; the decision for PreToolUse is in the answer. Errors
    propagate (`FACE.run` answers them, failing closed for managed writes). `process` is the
    session's Claude Code process, looked up when not given."""
    name, tool, cwd = event.get("hook_event_name"), event.get("tool_name"), event.get("cwd")
    shell = _shell(event)
    progress.write_check = name == "PreToolUse" and tool in WRITE_TOOLS
    path: str | None
    if progress.write_check:  # (raises where it names no file, or two)
        path = progress.path = hooks.tool_path(event.get("tool_input"), ("file_path", "notebook_path"), cwd)
    else:
        path = progress.path = None if shell is not None else _event_path(event)
    writes: list[tuple[str, HandleKind]] = [(path, "write")] if path else []
    if shell is not None:
        checking = name == "PreToolUse"
        known = hook_steps.planned(
            progress,
            SHELL_FACE,
            checking,
            shell if checking else None,
            lambda: shell_writes(*shell),
            background=_in_background(event),
        )
        if isinstance(known, Answer):
            return known
        writes = known
    session = event.get("session_id")
    if not isinstance(session, str) or not session:
        return Answer(0, "", hook_steps.unattributed(writes, progress, "session_id"))
    main = agent_of(session)
    actor = hook_steps.Actor(agent_of(session, _subagent(event)), main, process or hooks.session_process())
    session_actor = hook_steps.Actor(main, main, actor.process)
    places = [cwd if isinstance(cwd, str) else None]
    if shell is not None:
        return _command(event, actor, writes, progress, places)
    if name == "SessionStart":
        hook_steps.start_session(actor, places)
        return Answer()
    if name == "SessionEnd":
        hook_steps.end_session(session_actor, places)
        forget(main)
        return Answer()
    if name == "SubagentStop":
        if actor.agent != main:
            hook_steps.end_session(actor, places)
        return Answer()
    if name == "UserPromptSubmit":
        progress.decide(Answer(), hooks.WARN_BUDGET)
        roots = hook_paths.session_volumes(main, places)
        return hooks.with_context(Answer(), name, [stale_warning(session_actor, roots, FACE, main)])
    found = hook_paths.located(path) if path is not None else None
    progress.in_volume = found is not None
    if path is None or (found is None and not progress.write_check):
        return Answer()  # not in a volume: always allowed (a write check asks whether it was: `begin_writes`)
    answer = Answer()
    passed: list[hook_steps.Passed] = []  # views a partial Read moved over others' changes: told below
    if progress.write_check:
        refused = partial(_refused, event, progress) if tool in MERGING_TOOLS else None
        denial = hook_steps.begin_writes(actor, writes, progress, FACE, refused, hooks.tool_call(event))
        if denial is not None:
            return denial
    elif name == "PostToolUse" and tool == "Read":
        saw = _saw(event.get("tool_response"))
        if saw is None:
            return answer  # the model was shown nothing that can be checked: no view
        shown, whole = saw
        hook_steps.observe(actor, path, shown, progress, passed=None if whole else passed)
    elif name == "PostToolUse" and tool in WRITE_TOOLS:
        made = hook_merge.made(_change(event))
        told = hook_steps.end_writes(actor, writes, progress, record=True, tool=hooks.tool_call(event), made=made)
        answer = _tell_model("\n\n".join(told)) if told else answer
    elif name == "PostToolUseFailure" and tool == "Read":
        return hooks.with_context(answer, name, hook_steps.bring(actor, path, hooks.says_missing(event.get("error"))))
    elif name in ("PostToolUseFailure", "PermissionDenied") and tool in WRITE_TOOLS:
        hook_steps.end_writes(actor, writes, progress, record=False, tool=hooks.tool_call(event))
        return answer
    else:
        return answer
    if not progress.managed:
        return answer
    progress.decide(answer, hooks.WARN_BUDGET)
    notes = [partly_read_warning(passed, FACE.seen, FACE.reread), *_warnings(actor, [path])]
    return hooks.with_context(answer, str(name), notes)


def _command(
    event: dict[str, Any],
    actor: hook_steps.Actor,
    writes: list[tuple[str, HandleKind]],
    progress: Progress,
    places: list[str | None],
) -> Answer:
    """Apply an event of a Bash command that writes `writes` (`shell_writes`): before it runs,
    check and claim them as a write tool's target (refusals in `SHELL_REMEDY`'s words); after it,
    record what it changed in them, and the managed files it deleted (`hook_steps.end_deletions`),
    as the actor's, and release their grants; after a failure or a denial, only release them."""
    name, call = str(event.get("hook_event_name")), hooks.tool_call(event)
    if name != "PreToolUse":
        record = name == "PostToolUse"
        told = hook_steps.end_writes(actor, writes, progress, record=record, tool=call) if writes else []
        told += hook_steps.end_deletions(actor, places, record=record, tool=call)
        return _tell_model("\n\n".join(told)) if told else Answer()
    denial = hook_steps.begin_writes(actor, writes, progress, SHELL_FACE, None, call)
    if denial is not None:
        return denial
    if not progress.managed:
        return Answer()
    progress.decide(Answer(), hooks.WARN_BUDGET)
    return hooks.with_context(Answer(), name, _warnings(actor, [path for path, _ in writes]))


def _in_background(event: dict[str, Any]) -> bool:
    """Whether the Bash tool runs the command in the background (`run_in_background`): Claude Code
    runs its PostToolUse once it has started, so every write of it is one in the background
    (`hook_steps.planned` denies those of managed files off a mount)."""
    tool_input = event.get("tool_input")
    return isinstance(tool_input, dict) and tool_input.get("run_in_background") is True


def _warnings(actor: hook_steps.Actor, paths: list[str]) -> list[str | None]:
    """What to tell the model of files it read that changed since, in the volumes holding `paths`:
    a mounted one's as its session's (a subagent acts as its session there, `Actor.on`)."""
    volumes = {(found.root, found.mounted) for found in map(hook_paths.located, paths) if found is not None}
    session_actor = hook_steps.Actor(actor.session, actor.session, actor.process)
    return [
        stale_warning(session_actor if mounted else actor, [root], FACE, actor.session)
        for root, mounted in sorted(volumes)
    ]


def _refused(
    event: dict[str, Any], progress: Progress, core: VolumeCore, target: Target, agent: str, refusal: StaleWriteError
) -> Answer:
    """The answer to a refused write check of a Write or an edit: merged where the volume's merge
    globs and the refusal allow it (`hook_merge.answer`), else denied."""
    return hook_merge.answer(core, target, agent, refusal, progress, FACE, _change(event), _asks(event))


def _asks(event: dict[str, Any]) -> str | None:
    """None in the permission modes where Claude Code writes without asking (MERGE_MODES), else why
    the hook does not commit a merge itself."""
    mode = event.get("permission_mode")
    if mode in MERGE_MODES:
        return None
    return (
        "coherent-volume commits such a merge itself only where Claude Code writes without asking (permission "
        f"mode acceptEdits or bypassPermissions; this session's is {mode or 'unknown'}), since writing it here "
        "would skip the user's approval."
    )


def _change(event: dict[str, Any]) -> hook_merge.Change | str:
    """The change of a Write (its content) or an Edit/MultiEdit (its edits, which Claude Code makes
    to the current content itself), or why the input names none."""
    tool, tool_input = event.get("tool_name"), event.get("tool_input")
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    edits = _edits(tool, tool_input)
    if edits is not None:
        return hook_merge.Change(
            partial(_applied, edits=edits),
            rebased=True,
            name="your edit",
            misfit="its old_string is missing or not unique there",
        )
    content = tool_input.get("content")
    if tool == "Write" and isinstance(content, str):
        return hook_merge.whole(content)
    return "the tool's input names no change coherent-volume can merge"


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


def _undone(event: dict[str, Any]) -> str:
    name, tool = event.get("hook_event_name"), event.get("tool_name")
    if name == "PostToolUse":
        return "read" if tool == "Read" else "write" if tool in (*WRITE_TOOLS, SHELL_TOOL) else "other"
    if name == "PostToolUseFailure" and tool == "Read":
        return "other"
    return "release" if name in ("PostToolUseFailure", "PermissionDenied", "SubagentStop") else "other"


def our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    writes = "|".join((*WRITE_TOOLS, SHELL_TOOL))
    return hook_settings.nested(
        {"type": "command", "command": command, "timeout": int(hooks.HOOK_TIMEOUT)},
        {
            "PreToolUse": writes,
            "PostToolUse": f"Read|{writes}",
            "PostToolUseFailure": f"Read|{writes}",
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
    reread_one="Read the file with the Read tool before you change it again",
    seen="read",
    warn_once=True,
)
"""The Claude Code face: `coherent-volume hook claude-code` runs `FACE.run`; `install` writes
.claude/settings.json."""

SHELL_FACE = replace(FACE, remedies=SHELL_REMEDY)
"""The Claude Code face as it answers a Bash command: its refusals say what to do about a command."""
