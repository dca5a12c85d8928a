"""Running one agent hook event: parse it, decide within a time budget, fail closed, answer.

Every agent face (`claude_code`, `gemini`, `cursor`, `codex`) is a `Face`: it parses its agent's
events, names its tools and answers in its agent's format, through the steps every face shares:
this module runs an event; `hook_steps` acts on the volumes (check and claim writes, record them,
register views, sessions); `stale_warnings` tells a model which files it saw went stale;
`shell_writes` finds what a shell command writes; `hook_settings` keeps the agents' settings
files. Every rule is the core's.

Invariants:
- a write check that fails or cannot decide within the budget is a denial for every path that is
  (or may be) managed; it goes ahead undecided only for a path established to be in no volume or
  unmanaged (`run_hook`, `passes_undecided`);
- an answer once decided (`Progress.decide`) stands: what follows it (a denial's diff, a merge, a
  warning) is left out if it does not finish in time, never the decision.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import hook_settings, mounts
from .errors import Reason, StaleWriteError, VolumeConfigError
from .hook_paths import through_own_process
from .liveness import ProcessId
from .protocol import agent_name_problem

HOOK_TIMEOUT = 5.0
"""Seconds the agent gives a hook (each face installs it in its agent's unit). Claude Code, Gemini
CLI, Cursor (without `failClosed`) and Codex run the tool when a hook times out or crashes, so the
hook must answer first."""

HOOK_BUDGET = 3.0
"""Seconds from the hook process's start within which it decides (start-up and imports included);
what cannot be decided in time is denied when it is a write to a path that is (or may be) managed.
The 2 s left before HOOK_TIMEOUT cover printing the answer and a loaded machine."""

HOOK_GRANT_TTL = 60.0
"""Seconds a write grant a hook took before a tool's write lasts at most. It spans the agent's
permission prompt and the write; the hook after the tool releases it, and it ends earlier when the
session's process dies or the session ends. A write after it lapsed that went over another commit
is logged as a clobber and the model is told, so the overwrite is never silent."""

DIFF_BUDGET = 1.0
"""Seconds a decided `stale` denial waits for the diff it shows (within HOOK_BUDGET); past it, or if
the diff fails, the denial is answered without it (difflib can take seconds on a large file changed
in many places)."""

WARN_BUDGET = 0.5
"""Seconds a decided answer waits for the stale-view warning added to it (within HOOK_BUDGET)."""


@dataclass
class Answer:
    """What the hook prints and its exit status."""

    code: int = 0
    stdout: str = ""
    stderr: str = ""


@dataclass
class Progress:
    """How far a hook got with an event: what it answers when it cannot finish. `in_volume` and
    `managed` stay None until established; only an established False, or an answer already
    decided, lets a write check go ahead undecided. `write_check` marks events whose answer allows
    or denies a write."""

    path: str | None = None
    write_check: bool = False
    in_volume: bool | None = None
    managed: bool | None = None
    decided: Answer | None = None
    """An answer already decided; given if what follows it (a denial's diff, a merge, a warning)
    does not finish within `patience` seconds (and the budget)."""
    patience: float = 0.0
    doing: str | None = None
    """What the handling is doing, when it is not waiting for a volume: said if the budget runs out."""
    settled: threading.Event = field(default_factory=threading.Event)
    """Set once the answer is known: `decided`, or the handling ended."""

    def decide(self, answer: Answer, patience: float) -> None:
        self.decided, self.patience = answer, patience
        self.settled.set()


def agent_name(prefix: str, session: object) -> str | None:
    """The agent a session is: `prefix:session`, or `prefix:sha256-…` of the id when that would be
    no valid agent name (too long, unprintable); stable for one id. None without a session id."""
    if not isinstance(session, str) or not session:
        return None
    name = f"{prefix}:{session}"
    if agent_name_problem(name) is None:
        return name
    return f"{prefix}:sha256-{id_hash(session)}"


def id_hash(text: str) -> str:
    """A stable name for an id that makes no valid agent name: 32 hex digits of its SHA-256."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def tool_call(event: dict[str, Any]) -> str | None:
    """The id of the tool call an event is about (`tool_use_id`: Claude Code's, Codex's and Cursor's
    tool events carry it), if it gives one: the claims a tool's start takes are that call's
    (`hook_steps.begin_writes`), released at its own end only."""
    call = event.get("tool_use_id")
    return call if isinstance(call, str) and call else None


MISSING_WORDS = ("does not exist", "no such file", "enoent", "not found")
"""What a read tool's error says of a file that is not there (Claude Code: "File does not exist.";
Gemini CLI: "File not found")."""


def says_missing(error: object) -> bool:
    """Whether a failed read tool's error (text, or an object carrying it) told the model that the
    file is not there; an error for another reason (a file too large) showed it nothing of the file."""
    return error is not None and any(words in str(error).lower() for words in MISSING_WORDS)


class Uncheckable(ValueError):
    """A tool's input that no retry makes checkable (no file path, several, a path through the
    agent's own process): its write is denied, and the model told not to retry it unchanged."""


def absolute(path: object, base: object) -> str | None:
    """`path` joined to `base` (the agent's working directory) when relative, if it is a path. Only
    joined, never tidied: a `..` after a symlink goes up from where the symlink leads, so which file
    a path names is `hook_paths.located`'s to find (it resolves it as the kernel will). ValueError
    for a path through the opening process's own /proc entry or descriptors however it gets there
    (/proc/self/cwd/…, /dev/fd/3, a symlink to /proc/self: `hook_paths.through_own_process`): the
    hook cannot tell which file the agent's process reaches there, so a write by such a path is
    not checked and is denied (`run_hook`), as `Uncheckable`; so is a path holding a lone UTF-16
    surrogate (`lone_surrogate`), wherever it leads."""
    if not isinstance(path, str) or not path:
        return None
    if not os.path.isabs(path) and isinstance(base, str) and base:
        path = os.path.join(base, path)
    if (surrogate := lone_surrogate(path)) is not None:
        raise Uncheckable(
            f"the tool's input names the file {path[:300]!r} with a lone UTF-16 surrogate ({surrogate!r}, a JSON "
            "`\\u` escape no character has), which is no name of one file: the agent's runtime (Node) opens it with "
            "U+FFFD in its place, Python with a raw byte, so the hook would check another file than the one the tool "
            "writes. Give the file's name as the characters it has"
        )
    if through_own_process(path):
        raise Uncheckable(
            f"the tool's input names the file {path[:300]!r} through the agent's own process (/proc/self, /dev/fd), "
            "which file that reaches cannot be told by the hook: give the file's own path"
        )
    return path


def lone_surrogate(text: str) -> str | None:
    """The first lone UTF-16 surrogate (U+D800..U+DFFF) in `text`, if any: what JSON's `\\udcXX` escape
    without its pair decodes to. Node encodes it as U+FFFD, Python's file names as the byte it
    escapes (or not at all), so such a name never names one file alike for the agent and the hook."""
    return next((c for c in text if "\ud800" <= c <= "\udfff"), None)


def tool_path(tool_input: object, keys: tuple[str, ...], base: object) -> str:
    """The path a write tool's input names (`absolute`) under each of `keys` it has, which must name
    one file alike: ValueError otherwise, so the write is not checked and is denied (`run_hook`),
    never let through as naming no file, nor checked by one key while the tool writes by another."""
    named = {k: v for k, v in tool_input.items() if k in keys} if isinstance(tool_input, dict) else {}
    found = {k: absolute(v, base) for k, v in named.items()}
    paths = [path for path in found.values() if path is not None]
    if not named or len(paths) < len(found):
        unnamed = (v for k, v in named.items() if found[k] is None)
        given = next(unnamed, None) if isinstance(tool_input, dict) else tool_input
        raise Uncheckable(f"the tool's input names no file path (as {' or '.join(keys)}; it gives {repr(given)[:200]})")
    if len({os.path.realpath(path) for path in paths}) > 1:  # (as the kernel resolves them: a file named twice is one)
        shown = ", ".join(f"{k} {v!r}" for k, v in named.items())
        raise Uncheckable(f"the tool's input names more than one file ({shown[:300]}): which it writes cannot be told")
    return paths[0]


Handle = Callable[[dict[str, Any], Progress, ProcessId | None], Answer]
"""A face's handling of one event: (event, progress, the agent's process if known) -> answer; it
raises what it cannot handle (`run_hook` answers undecided)."""


@dataclass(frozen=True)
class Face:
    """One agent's hook integration: how its events are handled, how its hooks speak to its model
    (its tools' words, its answer format) and which hooks its settings file gets."""

    name: str
    """Its command name: the agent runs `coherent-volume hook NAME`."""
    handle: Handle
    undone: Callable[[dict[str, Any]], str]
    """What an event leaves undone when it cannot be finished: a key of UNDONE."""
    our_hooks: Callable[[str], dict[str, list[dict[str, Any]]]]
    """Its entries of the settings file's `hooks` object, for a hook command."""
    remedies: Mapping[Reason, str]
    """What the model is told to do per refusal reason, in the agent's tool names; may use `{ttl}`
    (the grant TTL) and `{changed}` (the read-set paths that moved)."""
    deny: Callable[[str, str | None], Answer]
    """The agent's answer denying a write: (what the model is told, the path it is about)."""
    reread: str
    """What the model is told to do about files it saw that changed since, as one clause."""
    reread_one: str
    """What the model is told to do before it changes a file again whose change the hook merged
    (`hook_merge`), as one sentence without its full stop."""
    seen: str = "saw"
    """What the model did with a version, in its tools' terms ("you last read version 3")."""
    warn_once: bool = False
    """Tell each stale view once per version (marks kept for the session), rather than in every
    answer that can carry text to the model."""
    top: Mapping[str, Any] = field(default_factory=dict)
    """Top-level keys of the settings file that `install` sets when missing."""
    goes_ahead: Callable[[dict[str, Any]], Answer] = lambda event: Answer()
    """The answer that lets an event go ahead undecided (Cursor answers some with a permission)."""
    unshown: Callable[[bytes], str | None] = lambda head: None
    """Why its read tool shows no content of a file beginning with `head` (its first 4 KiB), if it
    shows none (then no read gives a view, and a refusal says what to do instead of reading)."""

    def remedy(self, refusal: StaleWriteError) -> str:
        """What the model should do about `refusal`."""
        return self.remedies[refusal.reason].format(ttl=HOOK_GRANT_TTL, changed=", ".join(refusal.changed) or "-")

    def run(self, stdin: str, budget: float = HOOK_BUDGET, process: ProcessId | None = None) -> Answer:
        """Answer one event (JSON text) within `budget` seconds, failing closed for managed writes;
        `process` is the agent's process, looked up when not given."""
        return run_hook(stdin, lambda event, progress: self.handle(event, progress, process), self.undecided, budget)

    def undecided(self, event: dict[str, Any], progress: Progress, what: str, lasting: bool = False) -> Answer:
        """The answer to an event that could not be finished (`what` says why; `lasting` when it is
        how the volumes are set up, which a retry does not change): a write check is denied unless
        `passes_undecided`; anything else goes ahead with a warning on stderr saying what was left
        undone."""
        if not passes_undecided(progress):
            return self.deny(undecided_text(progress.path, what, lasting), progress.path)
        event_name, path = event.get("hook_event_name"), progress.path or "this file"
        left = f"coherent-volume: {what} ({event_name} for {path}); {UNDONE[self.undone(event)]}"
        return Answer(0, self.goes_ahead(event).stdout, left)

    def install(self, settings: Path, command: str | None = None) -> None:
        """Merge our hooks into `settings` (idempotent; other settings and hooks are kept)."""
        command = command or hook_settings.hook_command(self.name)
        hook_settings.merge_hooks(settings, self.name, self.our_hooks(command), self.top, command)

    def uninstall(self, settings: Path, command: str | None = None) -> bool:
        """Remove exactly the hooks `install` added (`command`: the one it was given, if not ours);
        whether there were any (else the file is left as it is)."""
        return hook_settings.remove_hooks(settings, self.name, command)


def tool_remedies(read: str, wait: str) -> dict[Reason, str]:
    """The remedies for an agent whose model reads files with a tool: `read` says with which
    (" with the Read tool"; "" for no name), `wait` how it can wait (" with the Bash tool")."""
    return {
        "stale": f"Read the file again{read}, then redo your change from its current content.",
        "unread": f"Read the file{read} first, then make your change from its current content.",
        "held": (
            "Its holder is writing it right now; the grant ends when that write is done (a hook's grant after "
            f"{{ttl:g}} s at the latest). Wait a few seconds (for example run `sleep 5`{wait}), then read the file "
            f"again{read} (if it exists by then) and redo your change from its current content."
        ),
        "fenced": (
            "Your write grant on this file was reclaimed (it expired or its process ended), so your writes to it "
            f"are held back until you read it again. Read the file again{read}, then redo your change from its "
            "current content."
        ),
        "read-set": (
            f"Files this change builds on have changed since you read them ({{changed}}). Read them again{read}, "
            "then redo your change."
        ),
    }


# ---- answers in the shape of Claude Code's hook output (Gemini CLI and Codex follow it) -------


def with_context(answer: Answer, event_name: str, texts: Iterable[str | None]) -> Answer:
    """`answer` with `texts` added to what the model gets (`hookSpecificOutput.additionalContext`,
    after what it holds already); unchanged when there are none. An answer without a decision
    leaves the decision to the agent."""
    text = "\n\n".join(t for t in texts if t)
    if not text:
        return answer
    out = json.loads(answer.stdout) if answer.stdout else {}
    specific = out.setdefault("hookSpecificOutput", {"hookEventName": event_name})
    specific["additionalContext"] = "\n\n".join(t for t in (specific.get("additionalContext"), text) if t)
    return Answer(answer.code, json.dumps(out), answer.stderr)


def denied_too(answer: Answer, text: str | None) -> Answer:
    """A PreToolUse denial (`deny_tool_use`) whose reason goes on with `text` (unchanged without)."""
    out = json.loads(answer.stdout) if answer.stdout and text else None
    specific = out.get("hookSpecificOutput") if isinstance(out, dict) else None
    if not isinstance(specific, dict) or "permissionDecisionReason" not in specific:
        return answer
    specific["permissionDecisionReason"] = f"{specific['permissionDecisionReason']}\n\n{text}"
    return Answer(answer.code, json.dumps(out), answer.stderr)


def deny_tool_use(reason: str, path: str | None = None) -> Answer:
    """A PreToolUse denial (`permissionDecision: "deny"`) that gives the model `reason` (which names
    the path; the agent shows the tool call beside it)."""
    decision = {"hookEventName": "PreToolUse", "permissionDecision": "deny", "permissionDecisionReason": reason}
    return Answer(0, json.dumps({"hookSpecificOutput": decision}))


# ---- running one hook ----------------------------------------------------------------


UNDONE = {
    "read": "no view was registered, so a write to it is refused until it is read again",
    "write": (
        "the write was not recorded as this session's (it is recorded as a change by 'external' at the next "
        f"access), and its write grant ends by itself within {HOOK_GRANT_TTL:g} s"
    ),
    "release": f"the write grants end by themselves within {HOOK_GRANT_TTL:g} s",
    "other": "nothing was recorded for this event",
}
"""What an event a hook could not finish leaves undone, by what the event was about."""


def undecided_text(path: str | None, what: str, lasting: bool = False) -> str:
    """What the model is told when a write could not be checked (`what` says why): to retry, or,
    when it is `lasting` (how the volumes are set up: `VolumeConfigError`, such as a volume moved
    inside another), not to, since only the user can change that."""
    shown = path or "this file"
    refused = (
        f"coherent-volume could not check this write to {shown}: {what}. It refused the write because an unchecked "
        "write could overwrite another session's work."
    )
    if lasting:
        return (
            f"{refused} Made again as it is, the write is refused again (this is how the volumes are set up, or "
            "what the tool's input says): do not retry the write unchanged; if what it says cannot be put right in "
            "the tool's input, tell the user."
        )
    return (
        f"{refused} Retry the write in a few seconds (read the file again first if it may have changed). If it keeps "
        f"being refused, tell the user what it says (`coherent-volume why {shown}` shows what the volume last refused "
        "for that file, and why)."
    )


def passes_undecided(progress: Progress) -> bool:
    """Whether an event that could not be finished may go ahead: anything but a write check, or a
    write check of a path established to be in no volume or unmanaged."""
    return not progress.write_check or progress.in_volume is False or progress.managed is False


def run_hook(
    stdin: str,
    handle: Callable[[dict[str, Any], Progress], Answer],
    undecided: Callable[[dict[str, Any], Progress, str, bool], Answer],
    budget: float = HOOK_BUDGET,
) -> Answer:
    """Parse one event and `handle` it within `budget` seconds. Once `handle` decided an answer
    (`Progress.decide`), what follows it gets the decision's patience at most, then the decided
    answer is given; if the handling fails or overruns undecided, `undecided(event, progress, why,
    lasting)` answers (a face denies a write check unless `passes_undecided`; `lasting` for a
    failure a retry does not change, a `VolumeConfigError`). An event that is not a JSON
    object cannot be told from any other (a denial in the wrong shape would stop an agent that
    sends one): it goes ahead, with a warning saying nothing was checked."""
    try:
        event = json.loads(stdin.lstrip("\ufeff"))
        if not isinstance(event, dict):
            raise TypeError("the event is not a JSON object")
    except (TypeError, ValueError) as e:
        said = "nothing was checked or recorded for it: a write it was about went ahead unchecked"
        return Answer(0, "", f"coherent-volume: unreadable hook event ({e}); {said}")
    progress = Progress()
    result: list[Answer] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with mounts.one_table():  # every path of the event judged against one mount table, read once
                result.append(handle(event, progress))
        except BaseException as e:  # noqa: BLE001 -- answered below: a hook must never crash the session
            failure.append(e)
        finally:
            progress.settled.set()

    started = process_age()  # what start-up took of the budget (`run_cli` gave the rest)
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
        what = f"the check failed ({type(failure[0]).__name__}: {failure[0]})"
        return undecided(event, progress, what, isinstance(failure[0], (VolumeConfigError, Uncheckable)))
    before = (
        f", after the hook's process took {started:.1f} s of its {HOOK_BUDGET:g} s to start" if started >= 0.1 else ""
    )
    if progress.doing is not None:
        what = f"the check did not finish in time (waited {budget:.1f} s {progress.doing}{before})"
        return undecided(event, progress, what, False)
    return undecided(
        event,
        progress,
        f"the check did not finish in time (waited {budget:.1f} s on the volume: its registry, its commit lock or "
        f"its files{before})",
        False,
    )


def process_age() -> float:
    """Seconds since this process started (0 if /proc cannot tell): the budget includes start-up."""
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
    """The agent process that ran this hook: the nearest ancestor that is not a shell (hooks may be
    started through `sh -c`)."""
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


READ_AT_LEAST = 0.5
"""Seconds a hook waits for its event however long its start took (an event already there is read
at once; past HOOK_BUDGET the check that follows has its own least time, `run_cli`)."""


def _event_text(wait: float) -> bytes:
    """Everything on standard input up to its end, which must come within `wait` seconds: an agent
    writes its event and closes the pipe, and one that keeps it open is not waited for past the
    budget (TimeoutError, which blocks the action)."""
    deadline, parts = time.monotonic() + wait, list[bytes]()
    while True:
        left = deadline - time.monotonic()
        try:
            ready = select.select([0], [], [], max(left, 0))[0]
            part = os.read(0, 1 << 20) if ready else None
        except OSError as e:
            raise OSError(e.errno, f"its standard input could not be read: {e.strerror}") from None
        if part is None:
            raise TimeoutError(
                f"its event did not end on standard input in time (a hook has {HOOK_BUDGET:g} s from its start)"
            )
        if not part:
            return b"".join(parts)
        parts.append(part)


def run_cli(run: Callable[[str, float], Answer]) -> None:
    """The body of a `coherent-volume hook AGENT` command: read the event on stdin, answer within
    the budget counted from the process's start, print, and exit without waiting for a worker
    thread that overran. A failure before `run` could answer blocks with exit status 2, which
    every supported agent treats as a denial carrying stderr."""
    try:
        stdin = _event_text(max(HOOK_BUDGET - process_age(), READ_AT_LEAST)).decode("utf-8", "replace")
        answer = run(stdin, max(HOOK_BUDGET - process_age(), 0.2))
    except BaseException as e:  # noqa: BLE001 -- run answers every failure itself; this is the last resort
        answer = Answer(
            2,
            "",
            f"coherent-volume: the hook failed before it could decide ({e}): a tool call it was to check was "
            "blocked (retry it); one that had run already was not recorded",
        )
    if answer.stdout:
        sys.stdout.write(answer.stdout + "\n")
    if answer.stderr:
        sys.stderr.write(answer.stderr + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(answer.code)
