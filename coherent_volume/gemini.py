"""Gemini CLI sessions as agents: a session's view is what its model read.

Gemini CLI's write tools re-read the file just before writing, so at the file-system level every
write looks fresh. Its hooks (settings.json, https://geminicli.com/docs/hooks/reference) show
what the model was given:

- AfterTool `read_file` / `read_many_files` registers the session's view at the version whose
  content is what the tool returned to the model (`tool_response.llmContent`);
- BeforeTool `write_file` / `replace` (and a `run_shell_command` whose writes are recognisable:
  `shell_writes`) checks the view and takes the session's write grant in one step, or
  denies with `{"decision": "deny", "reason": …}`, which Gemini CLI sends the model as the
  tool's error. A `stale` write_file or replace of a path the volume's merge globs name is merged
  with the current version (`hook_merge`) and denied showing the merge: the events do not say
  whether Gemini CLI asks the user before it writes, so the hook never commits it;
- AfterTool of those tools records the session's own commit and releases the grant, and with
  BeforeAgent tells the model (`additionalContext`) which files it read went stale;
- SessionStart binds the session's process, so on a mount everything it does is the session's;
  SessionEnd releases everything the session holds.

Each session is the agent `gemini:<session_id>`. Every rule is the core's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from . import hook_merge, hook_paths, hook_settings, hook_steps, hooks
from .core import VolumeCore
from .core.sessions import Made
from .errors import StaleWriteError
from .hook_steps import shows
from .hooks import Answer, Face, Progress
from .liveness import ProcessId
from .paths import Target
from .protocol import HandleKind
from .shell_writes import ShellWrites, shell_writes
from .stale_warnings import partly_read_warning, stale_warning

PREFIX = "gemini"
WRITE_TOOLS = ("write_file", "replace")
READ_TOOLS = ("read_file", "read_many_files")
SHELL_TOOL = "run_shell_command"

TRUNCATED = re.compile(
    r"^\s*IMPORTANT: The file content has been truncated\.\nStatus: Showing lines (\d+)-\d+ of \d+ total lines\..*?"
    r"\n--- FILE CONTENT \(truncated\) ---\n",
    re.S,
)
"""The note read_file puts before a part of a file (a range, or lines cut at 2000 characters)."""
SHORTENED = "... [truncated]"
"""How read_file ends a line it cut."""
PROJECT_CONTEXT = "\n\n--- Newly Discovered Project Context ---\n"
"""Where read_file starts appending context files it discovered (not the file's content); a file's
own text may hold it too, so the text is tried whole and cut at its last occurrence."""
MANY_PART = re.compile(r"--- (/.*?) ---\n\n(.*)\n\n", re.S)
MANY_TRUNCATED = (
    "[WARNING: This file was truncated. To view the full content, use the 'read_file' tool on this specific file.]\n\n"
)
"""read_many_files: each text file is one part `--- <absolute path> ---\\n\\n<content>\\n\\n`."""


def _writes(event: dict[str, Any]) -> list[tuple[str, HandleKind]] | ShellWrites:
    """The files a write tool or a shell command of the event writes (absolute), with how."""
    tool, cwd = event.get("tool_name"), event.get("cwd")
    tool_input = event.get("tool_input")
    if tool in WRITE_TOOLS:
        return [(hooks.tool_path(tool_input, ("file_path",), cwd), "write")]
    if not isinstance(tool_input, dict):
        return []
    command = tool_input.get("command")
    if tool == SHELL_TOOL and isinstance(command, str):
        base = hooks.absolute(tool_input.get("dir_path"), cwd) or (cwd if isinstance(cwd, str) else ".")
        return shell_writes(command, base)
    return []


def _text(part: object) -> str | None:
    if isinstance(part, str):
        return part
    text = part.get("text") if isinstance(part, dict) else None
    return text if isinstance(text, str) else None


def _failed_read(event: dict[str, Any]) -> str | None:
    """The absolute path of the file a read_file that failed named (a working copy may lack it yet:
    `hook_steps.bring`)."""
    response, tool_input = event.get("tool_response"), event.get("tool_input")
    if event.get("tool_name") != "read_file" or not isinstance(tool_input, dict):
        return None
    if isinstance(response, dict) and not response.get("error"):
        return None
    return hooks.absolute(tool_input.get("file_path"), event.get("cwd"))


Read = tuple[str, Callable[[bytes], bool], bool, Callable[[bytes], bool] | None]
"""(absolute path, predicate on the file's bytes, whether it was shown whole, and whether exactly:
`hook_steps.observe`'s `exact`)."""


def _read_file(path: str, text: str) -> Read:
    """The Read of a read_file that showed `text` of the file at `path`: whole, or the lines after
    its note of a partial read."""
    cut = TRUNCATED.match(text)
    if cut is None:
        exact = partial(hook_steps.same_text, text=text, line_ends=False, marked=True)
        return path, partial(shows, text=text, whole=True, marked=True), True, exact
    shown, start = text[cut.end() :], int(cut.group(1))
    return path, partial(shows, text=shown, start=start, whole=False, shortened=SHORTENED, marked=True), False, None


def _reads(event: dict[str, Any]) -> list[Read]:
    """A Read for each text file the read tool gave the model. read_file shows a whole file with its
    final newline and its CRLF line ends as LF (it splits at /\\r?\\n/ and joins with \\n):
    what it shows exactly is known (`hook_steps.same_text`), and so is what a whole part of
    read_many_files shows, which holds the file as read_file shows it (before, read_many_files had
    no exact match: /tmp/s32r2hooks 3). A file beginning with a byte order
    mark is decoded by it alone (`readFileWithEncoding`; `hook_steps.decodings`' `marked`)."""
    response, tool_input = event.get("tool_response"), event.get("tool_input")
    if not isinstance(response, dict) or response.get("error") or not isinstance(tool_input, dict):
        return []
    content = response.get("llmContent")
    if event.get("tool_name") == "read_file":
        path, text = hooks.absolute(tool_input.get("file_path"), event.get("cwd")), _text(content)
        if path is None or text is None:
            return []
        # the file's text, and it cut before a project context block read_file appended (the
        # last marker: the file's own text may hold one too, /tmp/s32r2hooks 6)
        read = [_read_file(path, t) for t in dict.fromkeys([text, text.rsplit(PROJECT_CONTEXT, 1)[0]])]
        if len(read) == 1:
            return read
        exacts = [r[3] for r in read if r[3] is not None]
        return [
            (
                path,
                lambda data: any(r[1](data) for r in read),
                all(r[2] for r in read),
                (lambda data: any(e(data) for e in exacts)) if exacts else None,
            )
        ]
    found: list[Read] = []
    for part in content if isinstance(content, list) else [content]:
        match = MANY_PART.fullmatch(_text(part) or "")
        if match is None:
            continue
        text = match.group(2)
        whole = not text.startswith(MANY_TRUNCATED)
        text = text if whole else text[len(MANY_TRUNCATED) :]
        shortened = None if whole else SHORTENED  # a line is cut only in a part said to be truncated
        seen = partial(shows, text=text, whole=whole, shortened=shortened, marked=True)
        same = partial(hook_steps.same_text, text=text, line_ends=False, marked=True)
        found.append((match.group(1), seen, whole, same if whole else None))
    return found


def _deny(reason: str, path: str | None = None) -> Answer:
    """The BeforeTool denial Gemini CLI gives the model as the tool's error."""
    return Answer(0, json.dumps({"decision": "deny", "reason": reason}))


def handle(event: dict[str, Any], progress: Progress, process: ProcessId | None = None) -> Answer:
    """Apply one Gemini CLI hook event; errors propagate (`FACE.run` answers them, failing closed
    for managed writes). `process` is the session's process, looked up when not given."""
    name, tool, cwd = event.get("hook_event_name"), event.get("tool_name"), event.get("cwd")
    agent = hooks.agent_name(PREFIX, event.get("session_id"))
    tool_input = event.get("tool_input")
    command = tool_input.get("command") if isinstance(tool_input, dict) else None
    shell = None
    if name == "BeforeTool" and tool == SHELL_TOOL and isinstance(tool_input, dict) and isinstance(command, str):
        shell = command, hooks.absolute(tool_input.get("dir_path"), cwd) or (cwd if isinstance(cwd, str) else ".")
    found = hook_steps.planned(
        progress,
        FACE,
        name == "BeforeTool",
        shell,
        lambda: _writes(event) if tool in WRITE_TOOLS + (SHELL_TOOL,) else [],
        background=isinstance(tool_input, dict) and tool_input.get("is_background") is True,
    )
    if isinstance(found, Answer):
        return found
    writes = found
    if agent is None:
        return Answer(0, "", hook_steps.unattributed(writes, progress, "session_id"))
    actor = hook_steps.Actor(agent, agent, process or hooks.session_process())
    places = [cwd if isinstance(cwd, str) else None]
    if progress.write_check:
        refused = partial(_refused, event, progress) if tool in WRITE_TOOLS else None
        return hook_steps.begin_writes(actor, writes, progress, FACE, refused) or Answer()
    if name == "SessionStart":
        hook_steps.start_session(actor, places)
    elif name == "SessionEnd":
        hook_steps.end_session(actor, places)
    elif name in ("BeforeAgent", "AfterTool"):
        told: list[str] = []
        partly: str | None = None
        if name == "AfterTool" and tool in READ_TOOLS:
            passed: list[hook_steps.Passed] = []  # views a partial read moved over others' changes
            for path, shown, whole, exact in _reads(event):
                progress.path = path
                hook_steps.observe(actor, path, shown, progress, passed=None if whole else passed, exact=exact)
            missing = _failed_read(event)
            response = event.get("tool_response")
            error = response.get("error") if isinstance(response, dict) else None
            told = hook_steps.bring(actor, missing, hooks.says_missing(error)) if missing is not None else []
            partly = partly_read_warning(passed, FACE.seen, FACE.reread)
        elif name == "AfterTool" and (writes or tool == SHELL_TOOL):
            response = event.get("tool_response")
            failed = not isinstance(response, dict) or bool(response.get("error"))
            made = _made(event) if tool in WRITE_TOOLS else None
            told = hook_steps.end_writes(actor, writes, progress, record=not failed, made=made) if writes else []
            if tool == SHELL_TOOL:
                told += hook_steps.end_deletions(actor, places, record=not failed)
        answer = hooks.with_context(Answer(), name, [*told, partly])
        progress.decide(answer, hooks.WARN_BUDGET)
        return hooks.with_context(
            answer, name, [stale_warning(actor, hook_paths.session_volumes(actor.session, places), FACE)]
        )
    return Answer()


ASKS = (
    "coherent-volume commits such a merge itself only where the agent writes without asking the user, and "
    "Gemini CLI's hook events do not say whether this session asks before it writes (its approval mode), so "
    "it wrote nothing."
)
"""Why the hook never commits a merge for Gemini CLI (`hook_merge`)."""


def _refused(
    event: dict[str, Any], progress: Progress, core: VolumeCore, target: Target, agent: str, refusal: StaleWriteError
) -> Answer:
    """The answer to a refused write_file or replace: merged and shown where the volume's merge
    globs and the refusal allow it (`hook_merge.answer`), else denied."""
    return hook_merge.answer(core, target, agent, refusal, progress, FACE, _change(event), ASKS)


def _change(event: dict[str, Any]) -> hook_merge.Change | str:
    """The change of a write_file (its content) or a replace, which Gemini CLI makes to the current
    content itself: every occurrence of old_string, which must occur exactly expected_replacements
    times (default 1; any number with allow_multiple)."""
    tool_input = event.get("tool_input")
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    content, old, new = tool_input.get("content"), tool_input.get("old_string"), tool_input.get("new_string")
    if event.get("tool_name") == "write_file" and isinstance(content, str):
        return hook_merge.whole(content)
    expected = tool_input.get("expected_replacements", 1)
    count = None if tool_input.get("allow_multiple") is True else expected
    if not (isinstance(old, str) and old and isinstance(new, str)) or not (
        count is None or (isinstance(count, int) and not isinstance(count, bool) and count > 0)
    ):
        return "the tool's input names no change coherent-volume can merge"
    return hook_merge.Change(
        partial(hook_merge.replaced, old=old, new=new, count=count),
        rebased=True,
        name="your edit",
        misfit="its old_string does not occur there the number of times the edit expects",
    )


_ESCAPED = re.compile(r"\\+(n|t|r|'|\"|`|\\|\n)")
_UNESCAPED = {"n": "\n", "t": "\t", "r": "\r", "\n": "\n"}


def _unescaped(text: str) -> str:
    """`text` with the escapes Gemini CLI's file tools undo before they write (a model that wrote
    `\\n` for a line end): a run of backslashes before n, t, r, a quote, a backtick, a backslash or
    a line end stands for that character."""
    return _ESCAPED.sub(lambda m: _UNESCAPED.get(m.group(1), m.group(1)), text)


def _made(event: dict[str, Any]) -> Made | None:
    """What a write_file or replace makes of the file, allowing for what Gemini CLI's tools may do
    to it first: a write_file writes its content, or that content unescaped (`_unescaped`); a
    replace puts new_string for old_string at every occurrence or at one of them, each as given or
    unescaped (`hook_steps.replacing`: where old_string occurs in the version read neither as
    written nor regardless of spaces, the tool rewrote it to fit, and nothing can be told). None
    where the input names neither."""
    tool_input = event.get("tool_input")
    tool_input = tool_input if isinstance(tool_input, dict) else {}
    content, old, new = tool_input.get("content"), tool_input.get("old_string"), tool_input.get("new_string")
    if event.get("tool_name") == "write_file":
        if not isinstance(content, str):
            return None
        return hook_steps.either(
            *(hook_steps.exactly(hook_merge.whole(c).apply) for c in {content, _unescaped(content)})
        )
    if not isinstance(old, str) or not isinstance(new, str):
        return None
    return hook_steps.replacing({(o, n) for o in (old, _unescaped(old)) for n in (new, _unescaped(new))})


def _undone(event: dict[str, Any]) -> str:
    if event.get("tool_name") in READ_TOOLS:
        return "read"
    return "write" if event.get("hook_event_name") == "AfterTool" else "other"


def _our_hooks(command: str) -> dict[str, list[dict[str, Any]]]:
    timeout = int(hooks.HOOK_TIMEOUT * 1000)
    writes = "|".join(WRITE_TOOLS + (SHELL_TOOL,))
    return hook_settings.nested(
        {"name": "coherent-volume", "type": "command", "command": command, "timeout": timeout},
        {
            "BeforeTool": f"^({writes})$",
            "AfterTool": f"^({'|'.join(READ_TOOLS)}|{writes})$",
            "BeforeAgent": None,
            "SessionStart": None,
            "SessionEnd": None,
        },
    )


FACE = Face(
    "gemini",
    handle,
    undone=_undone,
    our_hooks=_our_hooks,
    remedies=hooks.tool_remedies(" with read_file", " with run_shell_command"),
    deny=_deny,
    reread="Read them again with read_file before you change them",
    reread_one="Read the file with read_file before you change it again",
    unshown=lambda head: (
        "it holds a NUL byte, which Gemini CLI's read_file takes for a binary file"
        if b"\0" in head and hook_steps.by_mark(head) is None
        else None
    ),
)
"""The Gemini CLI face: `coherent-volume hook gemini` runs `FACE.run`; `install` writes .gemini/settings.json."""
