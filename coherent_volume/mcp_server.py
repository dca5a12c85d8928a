"""The MCP server: `coherent-volume mcp ROOT` gives any MCP client coherent files with no mount.

One server process serves one client connection over stdio (an MCP client starts a server
process per connection), so the process is the MCP session and the session is one agent:
`--agent NAME` if given, else `mcp:<client name>:<random>` named at its first tool call. When
the client disconnects (or the server stops), the views of a session named so are forgotten: no
later connection can be that agent, so they would only pin old versions against pruning. A
session named by `--agent` keeps them (the next connection under the name may still write).
`COHERENT_AGENT` is not read: a client passes its environment to every server it starts, and two
sessions under one name would be one agent, each passing for the other's reads.

Invariants:
- `read_file` registers the session's view at the version of exactly the bytes it returns (all
  of them, or the lines asked for), and lifts a fence of the session's on the file as
  `reacquire()` does (with no fence to lift, it takes no commit lock), once its reply is written
  to the client (`_serve_stdio`): a read refused, failed, cancelled, whose reply cannot be
  written or whose id another request reused while it ran registers none; it returns at most
  READ_LIMIT characters;
- a write or edit is checked against what the session was sent before the client sent it
  (`Session._base`): a read whose reply was written after that is no base of it (a
  compare-and-swap on the version the session knew then);
- `diff` returns at most READ_LIMIT characters (`_bounded`): the first lines of a larger diff, then
  how many were left out and how to see them;
- `write_file` is the API's fail-closed write (`merge` as in `CoherentVolume.write`);
- `edit_file` applies old→new to the content this session last read or wrote of the file (never to
  what is on disk now) and writes that only while the session's view is still that version; a
  merge leaves the view where it was (`write_merging`), so the next edit needs a read first;
- a session's tool calls run one at a time, in the order sent (`Wire.turn`), so two edits it sends
  together never build on the same content; a cancelled one is not answered, and a cancelled
  write not yet committing is not written;
- every refusal and bad input is a tool error saying what happened and what to do; nothing is
  written then. Unmanaged paths pass through unchecked, as in the API.

The `mcp` SDK is an optional extra: it is imported only when the command runs (`serve`), so the
rest of the CLI and the hooks never load it. This module has no `from __future__ import
annotations`: the SDK reads the tools' annotations at runtime, and they name classes imported
inside `serve`."""

import datetime as dt
import errno
import importlib.util
import json
import math
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any

import click

from . import diffs, report
from .core import VolumeCore, open_core, validate_agent
from .errors import (
    Absent,
    CoherenceError,
    MergeConflict,
    NotManaged,
    OutsideVolume,
    Reason,
    StaleWriteError,
    TooManyLines,
)
from .fingerprint import content_hash
from .hook_steps import passed_over
from .paths import Target, shown
from .stale_warnings import partly_read_warning

INSTRUCTIONS = (
    "The files of this workspace are shared with other agents. Read a file with read_file before you "
    "change it; write_file and edit_file are refused when the file changed since you last read it, or "
    "when you never read it, and nothing is written then. The refusal says who changed it and shows "
    "the diff: read the file again and redo your change from its current content. history, diff, "
    "status and why show versions, their writers and past refusals. Paths are relative to the "
    "workspace root."
)

REMEDY: dict[Reason, str] = {
    "stale": "Call read_file on {path} again, then redo your change from its current content.",
    "unread": "Call read_file on {path} first, then make your change from its current content.",
    "held": (
        "Another agent is writing {path} right now. Wait a few seconds, call read_file on it again (if it "
        "exists by then), then redo your change from its current content."
    ),
    "fenced": (
        "Your write grant on {path} was reclaimed, so your writes to it are held back until you read it "
        "again: call read_file on it, then redo your change from its current content."
    ),
    "read-set": (
        "Files this change builds on changed since you read them ({changed}): call read_file on them again, "
        "then redo your change."
    ),
}
"""What the model is told to do, per refusal reason (`errors.REMEDY` phrased for these tools)."""
MERGE_HINT = (
    " Or call the same tool again with merge=true: your change is combined with theirs if you changed different lines."
)


READ_LIMIT = 40_000
"""Characters `read_file` returns at most in one call. MCP clients cut or refuse large tool results
(Claude Code warns above 10,000 tokens and cuts above 25,000 by default), and a cut result would
leave a view of text the model never got: a larger read is refused, naming the file's size, and the
model reads it in parts (`offset`, `limit`)."""
PARTLY_REREAD = "read all of it again with read_file (in parts with offset and limit where it is long)"
"""What a model shown part of a file others changed since its last read is told to do."""


class ToolRefused(Exception):
    """A tool call that changed nothing; its message tells the model what happened and what to do."""


@dataclass(frozen=True)
class Known:
    """What this session was sent of a managed file (a read's reply, written) or wrote itself: its
    content (None: the file was found missing) and version. `since`: where on the client's input a
    request must begin to be built on it (a request sent before the reply carrying the content was
    written could not have seen it; -inf with no wire). `prior`: the agent's view before it."""

    text: str | None
    version: int
    since: float = -math.inf
    prior: int | None = None


@dataclass(frozen=True)
class Sent:
    """A read whose reply is on its way: its view is registered once the reply is written."""

    target: Target
    version: int
    text: str | None


class Wire:
    """What the stdio layer (`_serve_stdio`) saw of each request, for the session's checks: where
    on the client's input it began (`arrived`, in bytes), which the client cancelled, the reads
    whose replies are not yet written (`sent`) or written and not yet registered (`settling`), and
    the tool calls not yet done (`turns`), which run in the order they were sent (`turn`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.arrived: dict[object, int] = {}
        self.arrived_at: dict[object, float] = {}
        """(event loop only) When each request was read (`time.monotonic`)."""
        self.cancelled: set[object] = set()
        self.reused: set[object] = set()
        """Requests whose id another request reused while they ran: a read among them registers no view."""
        self.sent: dict[object, tuple[Session, Sent]] = {}
        self.settling: list[float] = []
        """(event loop only, as are `turns` and `changed`)"""
        self.turns: dict[object, int] = {}
        self.changed: Any = None

    @staticmethod
    def key(request: object) -> object:
        """One key per id as the SDK correlates ids (`coerce_request_id`: 7, "7", "07", " 7" are one),
        its cancellations too (before: "07" and 7 were two here, one to the SDK, /tmp/s32r2mcp 2)."""
        from mcp.shared.dispatcher import coerce_request_id

        return str(coerce_request_id(request) if isinstance(request, (int, str)) else request)

    def arrival(self, request: object) -> float:
        with self.lock:
            return self.arrived.get(self.key(request), math.inf) if request is not None else math.inf

    def is_cancelled(self, request: object) -> bool:
        with self.lock:
            return request is not None and self.key(request) in self.cancelled

    def notify(self) -> None:
        """Something `turn` waits for changed (on the event loop)."""
        if self.changed is not None:
            self.changed.set()
            self.changed = None

    async def turn(self, request: object) -> None:
        """Wait (on the event loop, ANSWER_AT_END s at most) until every tool call sent before
        `request` is done, and every read whose reply was written before `request` was sent is
        registered: tool calls run one at a time in the order they were sent, and a call sent after
        a read's reply is checked against that read."""
        import anyio

        arrival = self.arrival(request)
        with anyio.move_on_after(ANSWER_AT_END):
            while any(a < arrival for a in self.turns.values()) or any(h <= arrival for h in self.settling):
                if self.changed is None:
                    self.changed = anyio.Event()
                await self.changed.wait()

    def done(self, request: object) -> None:
        """Tool call `request` is done (or answered, or cancelled): the next may go."""
        if self.turns.pop(self.key(request), None) is not None:
            self.notify()


def _lines(text: str, offset: int, limit: int | None) -> str:
    """Lines `offset`.. of `text` (from 1; `limit` of them, else to the end), each with its "\n"."""
    lines = text.split("\n")
    last = lines.pop()  # after the last "\n": a last line without one, or nothing
    lines = [line + "\n" for line in lines] + ([last] if last else [])
    return "".join(lines[offset - 1 :] if limit is None else lines[offset - 1 : offset - 1 + limit])


def _line_count(text: str) -> int:
    return text.count("\n") + (bool(text) and not text.endswith("\n"))


def _returnable(path: str, text: str, part: str, offset: int) -> None:
    """Raise ToolRefused unless `part` (of the file's `text`) can be returned whole: at most
    READ_LIMIT characters, and some of a non-empty file's lines."""
    if len(part) > READ_LIMIT:
        long = next(((n, len(line)) for n, line in enumerate(part.split("\n"), offset) if len(line) > READ_LIMIT), None)
        if long is not None:  # no part holds it: a part is whole lines
            raise ToolRefused(
                f"Nothing was read: line {long[0]} of {shown(path)} alone is {long[1]} characters, more than read_file "
                f"returns at once ({READ_LIMIT}), so these tools can neither show it nor change the file after "
                "reading it: change it with a tool that reads its bytes (the mounted workspace, the Python API), "
                "or ask the user."
            )
        some = "these lines of " if part != text else ""
        raise ToolRefused(
            f"Nothing was read: {some}{shown(path)} are {len(part)} characters ({len(text)} characters, "
            f"{_line_count(text)} lines in all), more than read_file returns at once ({READ_LIMIT}). Read it in "
            "parts: call read_file with offset (the first line, from 1) and limit (how many lines) for parts under "
            "that size. Each part you read registers your view of the file's version."
        )
    if text and not part:
        raise ToolRefused(f"Nothing was read: {shown(path)} has {_line_count(text)} lines, fewer than offset {offset}.")


def _bounded(diff: str, path: str) -> str:
    """`diff` whole if it fits in one tool result (READ_LIMIT characters), else its first lines that
    fit (each cut as a refusal's diff cuts a line, `diffs.cut`), then how much was left out and how to
    see the rest: a client would cut the result where the model could not tell."""
    if len(diff) <= READ_LIMIT:
        return diff
    lines = diffs.lines(diff)
    kept: list[str] = []
    size = 0
    for line in lines:
        line = diffs.cut(line)
        if size + len(line) > READ_LIMIT - 1000:  # room for the note
            break
        kept.append(line)
        size += len(line)
    return "".join(kept) + (
        f"... {len(lines) - len(kept)} more lines of the diff not shown ({len(diff)} characters in all, more "
        f"than one tool result holds, {READ_LIMIT}). To see the rest, diff fewer versions at a time (from_version, "
        f"to_version), read the current version in parts (read_file with offset and limit), or run "
        f"`coherent-volume diff ROOT {shown(path)} A B` outside this session.\n"
    )


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


UNNAMED = re.compile(r"mcp:.*:[0-9a-f]{8}", re.DOTALL)
"""The names `agent_for` gives, which `--agent` may not take (/tmp/s31mcp 10)."""


def agent_for(client: str | None) -> str:
    """A fresh agent name for a session whose client calls itself `client`: `mcp:<client>:<random>`."""
    label = "-".join("".join(c if c.isalnum() or c in "-_." else " " for c in client or "").split())[:40]
    return validate_agent(f"mcp:{label or 'client'}:{secrets.token_hex(4)}")


def refusal_text(e: StaleWriteError) -> str:
    """What a refused write tells the model: what happened, why, what changed, what to do."""
    if e.reason == "stale":
        what = f"{shown(e.path)} changed since you read it: you read version {e.based_on}, it is now version "
        what += f"{e.current_version}" + (f", last written by {e.last_writer}" if e.last_writer else "")
    elif e.reason == "unread":
        what = f"you have not read {shown(e.path)} in this session; it is at version {e.current_version}"
        what += f", last written by {e.last_writer}" if e.last_writer else ""
    elif e.reason == "held":
        what = f"{e.holder or 'another agent'} holds the write grant on {shown(e.path)}"
    elif e.reason == "fenced":
        what = f"your write grant on {shown(e.path)} was reclaimed"
    else:
        what = f"files you read changed since: {', '.join(map(shown, e.changed))}"
    text = f"Refused ({e.reason}): nothing was written. {what}."
    if isinstance(e, MergeConflict):
        hunks = "".join(str(c) for c in e.conflicts).rstrip()
        text += (
            f"\nYour change and version {e.current_version} changed the same lines ({len(e.conflicts)} "
            f"conflicting hunk(s)), so they were not merged:\n{hunks}"
        )
    elif e.diff:
        text += f"\nWhat changed since version {e.based_on}:\n{e.diff.rstrip()}"
    if e.unmerged:
        text += f"\nYour change was not merged: {e.unmerged}."
    remedy = REMEDY[e.reason].format(path=shown(e.path), changed=", ".join(map(shown, e.changed)))
    if e.reason == "stale" and not isinstance(e, MergeConflict) and not e.unmerged:
        remedy += MERGE_HINT
    return f"{text}\nTo fix: {remedy}"


class Session:
    """One MCP session: one agent's tools over a volume. Methods return the text the model reads,
    or raise ToolRefused; calls are serialized."""

    def __init__(self, core: VolumeCore, agent: str, wire: Wire | None = None) -> None:
        self.core = core
        self.agent = agent
        self.wire = wire
        """None: no stdio layer (tests): a read's reply counts as written when the call returns."""
        self._known: dict[str, list[Known]] = {}
        self._lock = threading.Lock()

    # ---- what the client was sent ----

    def _arrival(self, request: object) -> float:
        return math.inf if self.wire is None else self.wire.arrival(request)

    def _send(self, request: object, sent: Sent) -> None:
        """A read's reply is ready: its view is registered once it is written (`delivered`), at once
        with no wire."""
        if self.wire is None or request is None:
            self._register(sent, -math.inf)
            return
        with self.wire.lock:
            if Wire.key(request) not in self.wire.cancelled:  # a cancelled request is never answered
                self.wire.sent[Wire.key(request)] = (self, sent)

    def delivered(self, sent: Sent, since: float) -> None:
        """The reply carrying `sent` was written, and a request beginning at `since` on the
        client's input or later may be built on it: register its view (`_register`)."""
        with self._lock:
            self._register(sent, since)

    def _register(self, sent: Sent, since: float) -> None:
        """The client was sent `sent`: the agent's view moves to its version (never back, as a read
        through a handle opened earlier: `note_read`), a fence of the agent's on the file is lifted
        (it read it again, as `reacquire()`), and the session knows its content from `since`. A file
        found missing is a view of its deletion (none where no file of that name ever was)."""
        target = sent.target
        prior = self.core.registry.peek(target.rel, self.agent)[1]
        self.core.clear_fence(self.agent, target)
        if sent.version:
            self.core.note_read(self.agent, target, sent.version)
        self._learn(target.rel, Known(sent.text, sent.version, since, prior))

    def _learn(self, rel: str, known: Known) -> None:
        """Add what the session now knows of `rel`, dropping what no request under way can build on:
        of what a request that began before every request still under way could see, only the
        newest is kept."""
        oldest = math.inf
        if self.wire is not None:
            with self.wire.lock:
                oldest = min(self.wire.arrived.values(), default=math.inf)
        states = [*self._known.get(rel, []), known]
        seen = [k for k in states if k.since <= oldest]
        newest = max(seen, key=lambda k: k.version, default=None)
        self._known[rel] = [k for k in states if k is newest or k.since > oldest]

    def _base(self, target: Target, arrival: float, edit: bool) -> tuple[Known | None, int | None]:
        """What a write that began at `arrival` on the client's input may be built on: (the newest
        content the session was sent or wrote before it, the version the write must find current or
        None for the agent's view). A read whose reply was written after the write was sent, or a
        write sent after it, moved the agent's view past what the write could have seen: then it is
        a compare-and-swap on what it could (the view before them where the session knew nothing
        before), and refused unread where that was no view of an existing file."""
        states = self._known.get(target.rel, [])
        relied = max((k for k in states if k.since <= arrival), key=lambda k: k.version, default=None)
        later = [k for k in states if k.since > arrival]
        if relied is not None:
            return relied, relied.version if edit or later else None
        if not later:
            return None, None
        if later[0].prior is None and os.path.lexists(target.abs):
            raise ToolRefused(
                f"Refused (unread): nothing was written. You had not read {shown(target.rel)} when you sent this "
                "call: the read_file answered after it was sent, so the call could not be built on what it "
                f"showed. To fix: {REMEDY['unread'].format(path=shown(target.rel))}"
            )
        return None, later[0].prior

    # ---- paths and errors ----

    def _target(self, path: str) -> Target:
        try:
            return self.core.resolve(path)
        except OutsideVolume as e:
            raise ToolRefused(
                f"'{shown(path)}' is not a file of this workspace ({shown(str(e))}). Give a path relative "
                "to the workspace root "
                f"({shown(self.core.paths.root)}), or an absolute path inside it."
            ) from None

    def _call(self, path: str, action: str, fn: Any, request: object = None) -> str:
        """Run `fn()` under the session's lock, turning every expected failure into ToolRefused."""
        with self._lock:
            try:
                text: str = fn()
                return text
            except ToolRefused:
                raise
            except StaleWriteError as e:
                if e.reason in ("unread", "stale", "fenced") and not self._text(e.path):
                    raise ToolRefused(
                        f"Refused ({e.reason}): nothing was written. {shown(e.path)} is not UTF-8 text, "
                        "which read_file "
                        "cannot show, so these tools cannot change it after reading it: change it with a tool that "
                        "reads its bytes (the mounted workspace, the Python API), or ask the user."
                    ) from None
                raise ToolRefused(refusal_text(e)) from None
            except FileNotFoundError:
                raise ToolRefused(f"{shown(path)} does not exist (write_file creates a file).") from None
            except IsADirectoryError:
                raise ToolRefused(f"{shown(path)} is a directory, not a file.") from None
            except NotManaged:
                managed = ", ".join(self.core.paths.globs.patterns)
                raise ToolRefused(
                    f"{shown(path)} is not managed (managed paths: {managed}): it has no versions and its writes are "
                    "never checked."
                ) from None
            except (CoherenceError, OSError, UnicodeError) as e:
                raise ToolRefused(f"{action} {shown(path)} failed: {shown(str(e))}") from None

    def _text(self, rel: str) -> bool:
        """Whether the file at `rel` holds UTF-8 text (or is gone), which read_file can show."""
        try:
            with open(self.core.paths.of_rel(rel).abs, "rb") as f:
                f.read().decode("utf-8")
        except UnicodeDecodeError:
            return False
        except OSError:
            return True
        return True

    # ---- tools ----

    def read_file(
        self, path: str, offset: int = 1, limit: int | None = None, request: object = None
    ) -> tuple[str, str]:
        """(content, note): the file's text, or its lines `offset`.. (`limit` of them), and a line
        about its version. Once its reply is written (`_send`), the view is registered (of the
        version: as a read tool's view of part of a file, it stands for the whole version); a read
        refused (`_returnable`), failed, cancelled or never answered registers none."""
        note: list[str] = []

        def read() -> str:
            if offset < 1 or (limit is not None and limit < 1):
                raise ToolRefused(f"offset ({offset}) and limit ({limit}) must be at least 1: lines count from 1.")
            target = self._target(path)
            before = self.core.registry.peek(target.rel, self.agent)[1] if target.managed else None
            try:
                observed = self.core.read(self.agent, target, register=False)
            except Absent as e:
                if target.managed:  # told the file does not exist: a view of its deletion
                    self._send(request, Sent(target, e.version, None))
                raise
            try:
                text = observed.data.decode("utf-8")
                part = _lines(text, offset, limit)
                _returnable(path, text, part, offset)
            except UnicodeDecodeError:
                raise ToolRefused(f"{shown(path)} is not UTF-8 text; these tools read and write text only.") from None
            if target.managed:
                note.append(
                    f"[coherent-volume] {shown(target.rel)}: version {observed.version}.{VIEWED} "
                    "write_file and edit_file are refused if someone changes the file before you do."
                )
                over = (
                    passed_over(self.core, self.agent, target.rel, before, observed.version) if part != text else None
                )
                told = partly_read_warning([over], "read", PARTLY_REREAD) if over else None
                note[-1] += f"\n{told}" if told else ""
                self._send(request, Sent(target, observed.version, text))
            else:
                note.append(f"[coherent-volume] {shown(target.rel)} is not managed: writes to it are not checked.")
            return part

        return self._call(path, "reading", read, request), note[0]

    def write_file(self, path: str, content: str, merge: bool = False, request: object = None) -> str:
        def write() -> str:
            target = self._target(path)
            arrival = self._arrival(request)
            expected = self._base(target, arrival, edit=False)[1] if target.managed else None
            return self._write(target, content, merge, expected, request, arrival)

        return self._call(path, "writing", write, request)

    def edit_file(
        self, path: str, old_string: str, new_string: str, merge: bool = False, request: object = None
    ) -> str:
        def edit() -> str:
            if not old_string:
                raise ToolRefused(
                    "old_string is empty: give the exact text to replace (write_file writes a whole file)."
                )
            if old_string == new_string:
                raise ToolRefused("old_string and new_string are the same: there is nothing to change.")
            target = self._target(path)
            arrival = self._arrival(request)
            if target.managed:
                known = self._base(target, arrival, edit=True)[0]
                if known is None or known.text is None:
                    raise ToolRefused(
                        f"Refused (unread): nothing was written. You have not read {shown(target.rel)} in this session "
                        f"(or changed it by a merge since). To fix: {REMEDY['unread'].format(path=shown(target.rel))}"
                    )
                text, base, expected = known.text, f"the version {known.version} you read", known.version
            else:
                text, base = self.core.read(self.agent, target).data.decode("utf-8"), "its current content"
                expected = None
            count = text.count(old_string)
            if count != 1:
                found = "does not occur" if count == 0 else f"occurs {count} times"
                hint = (
                    "include more surrounding lines to make it unique"
                    if count
                    else "copy it exactly from read_file's output (call read_file again if the file changed)"
                )
                raise ToolRefused(f"Nothing was written: old_string {found} in {base} of {shown(target.rel)}; {hint}.")
            return self._write(target, text.replace(old_string, new_string), merge, expected, request, arrival)

        return self._call(path, "editing", edit, request)

    def _write(
        self,
        target: Target,
        content: str,
        merge: bool,
        expected: int | None = None,
        request: object = None,
        arrival: float = math.inf,
    ) -> str:
        """Write `content`; `expected`: the version it was built on (an edit of what this session
        read, or what a write could see when it was sent: `_base`), which must be current whatever
        the agent's view (another session of the same agent may have moved it), else it is merged
        onto the current version or refused. Not written if the client cancelled the request by
        then; a cancel that comes later is too late, which stderr says (the reply is not sent)."""
        data = content.encode("utf-8")
        prior = self.core.registry.peek(target.rel, self.agent)[1] if target.managed else None
        if self.wire is not None and self.wire.is_cancelled(request):
            raise ToolRefused("Cancelled by the client: nothing was written.")
        version = self.core.write(self.agent, target, data, merge=merge, expected=expected)
        if self.wire is not None and self.wire.is_cancelled(request):
            click.echo(
                f"coherent-volume mcp: request {request!r} was cancelled by the client after its write of "
                f"{shown(target.rel)} was committed (version {version}); it stands, and gets no reply",
                err=True,
            )
        if not target.managed:
            return f"Wrote {shown(target.rel)} (not managed: not versioned, not checked)."
        try:
            made = self.core.version_entry(target, version)
        except (CoherenceError, OSError) as e:  # committed all the same: never reported as not written
            self._known.pop(target.rel, None)
            return (
                f"Wrote {shown(target.rel)}: now version {version}. Whether it was merged with changes "
                "others made could "
                f"not be looked up ({e}): call read_file before you change it again."
            )
        # asked of the version, not of the agent's view (another session of the agent may have moved
        # that): a merge, or a merge that made no version (the current one holds both changes), holds
        # bytes this session never read
        if made is None or made.kind != "merge" and made.hash == content_hash(data):
            self._learn(target.rel, Known(content, version, arrival if arrival < math.inf else -math.inf, prior))
            return f"Wrote {shown(target.rel)}: now version {version}."
        self._known.pop(target.rel, None)
        return (
            f"Wrote {shown(target.rel)}: your change was merged with changes others made since you read it, as version "
            f"{version}. Call read_file to see the result before you change it again."
        )

    def history(self, path: str, limit: int = 20) -> str:
        def history() -> str:
            if limit < 1:
                raise ToolRefused(f"limit ({limit}) must be at least 1: it is how many of the newest versions to list.")
            target = self._target(path)
            versions = self.core.history(target, limit)
            if not versions:
                raise report.never_recorded(target)
            seen = self.core.seen(self.agent, target)
            lines = [f"{shown(target.rel)}: {len(versions)} most recent versions, newest first"]
            for v in versions:
                size = "deleted" if v.hash is None else f"{v.size} bytes"
                parents = f" of versions {', '.join(map(str, v.parents))}" if v.parents else ""
                extra = "" if (why := report.unkept(v)) is None else f", content {why}"
                mark = "  <- your view" if v.version == seen else ""
                lines.append(f"v{v.version} {v.kind}{parents} by {v.writer} at {_when(v.at)}, {size}{extra}{mark}")
            return "\n".join(lines)

        return self._call(path, "listing the history of", history)

    def diff(self, path: str, from_version: int | None = None, to_version: int | None = None) -> str:
        def diff() -> str:
            target = self._target(path)
            current = self.core.version(target)
            if current == 0:
                raise report.never_recorded(target)
            new = current if to_version is None else to_version
            seen = self.core.seen(self.agent, target)
            old = (seen or 0) if from_version is None else from_version
            label = " (your view)" if from_version is None and seen is not None else ""
            head = f"{shown(target.rel)}: version {old}{label} to version {new}"
            try:
                text = self.core.diff(target, old, new)
            except TooManyLines as e:  # no tool here prints a version's bytes (`coherent-volume show` does)
                raise ToolRefused(
                    f"{head}: no line diff ({e.what}). read_file shows the current version, a part at a time "
                    "(offset, limit); the user can print any kept version with `coherent-volume show`."
                ) from None
            if text is None:
                return f"{head}: binary content, no line diff."
            return f"{head}:\n{_bounded(text, target.rel).rstrip()}" if text else f"{head}: no differences."

        return self._call(path, "diffing", diff)

    def status(self) -> str:
        def status() -> str:
            st = report.status(self.core)
            stale = self.core.stale(self.agent)
            lines = [
                f"workspace {shown(st.root)}; managed: {', '.join(map(shown, st.managed))}; you are agent {self.agent}",
                f"your stale views (changed since you read them): {', '.join(map(shown, stale)) if stale else 'none'}",
                "files (path, version, last writer, when, grant holder):",
            ]
            for f in st.files:
                if f.present or f.holder:
                    held = f", held by {f.holder} until {_when(f.holder_expires_at)}" if f.holder else ""
                    lines.append(f"  {shown(f.path)} v{f.version} by {f.writer} at {_when(f.committed_at)}{held}")
            lines.append("agents (views, stale views, last read):")
            lines += [f"  {a.agent}: {a.views} views, {a.stale} stale, {_when(a.last_read)}" for a in st.agents]
            lines += [f"not checked: {shown(u.path)}: {u.problem}" for u in st.unchecked]
            return "\n".join(lines)

        return self._call("the workspace", "the status of", status)

    def why(self, path: str) -> str:
        def why() -> str:
            answer = report.why(self.core, self._target(path))
            lines = [
                f"{shown(answer.path)}: {answer.state('version ')}"
                + (f", last written by {answer.writer} at {_when(answer.committed_at)}" if answer.writer else "")
                + (f", write grant held by {answer.holder}" if answer.holder else "")
                + answer.occupied()
            ]
            r = answer.refusal
            if r is not None:
                seen = f"version {r.seen_version}" if r.seen_version is not None else "nothing (never read)"
                lines.append(
                    f"last refusal: {_when(r.at)}, agent {r.agent} ({r.reason}); it had read {seen}, "
                    f"current was version {r.version}"
                )
                if answer.earlier_changes:
                    lines.append(
                        f"  ({answer.earlier_changes:,} earlier changes since then are not listed: the history tool "
                        "lists every version)"
                    )
                lines += [
                    f"  then: v{c.event.version} {c.kind} by {c.event.agent} at {_when(c.event.at)}"
                    + (f" ({c.event.detail})" if c.event.detail else "")
                    for c in answer.changes
                ]
                if answer.diff:
                    lines.append(f"what changed since version {r.seen_version}:\n{answer.diff.rstrip()}")
                elif answer.diff_note:
                    lines.append(answer.diff_note)
                if answer.conflict:
                    lines.append(f"the write was to be merged, and its changes overlapped:\n{answer.conflict.rstrip()}")
            lines.append(f"what to do: {answer.advice}")
            return "\n".join(lines)

        return self._call(path, "explaining", why)


def serve(core: VolumeCore, agent: str | None) -> None:
    """Serve `core` to one MCP client over stdio until it disconnects (stdin closes)."""
    import anyio
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import CallToolResult, TextContent, ToolAnnotations
    from pydantic import Field

    server: MCPServer[Any] = MCPServer("coherent-volume", instructions=INSTRUCTIONS, log_level="WARNING")
    sessions: list[Session] = []
    naming = threading.Lock()
    wire = Wire()

    def session(ctx: Context) -> Session:
        """This connection's session, named at its first tool call (when the client's name is known)."""
        with naming:
            if not sessions:
                client = ctx.session.client_params
                sessions.append(Session(core, agent or agent_for(client.client_info.name if client else None), wire))
            return sessions[0]

    def request(ctx: Context) -> object:
        return ctx.request_context.request_id

    async def answer(ctx: Context, fn: Any) -> Any:
        """`fn()` in a worker thread once it is this call's turn (`Wire.turn`); a refusal is a tool error."""
        import anyio.to_thread

        try:
            await wire.turn(request(ctx))
            return await anyio.to_thread.run_sync(fn)
        except ToolRefused as e:
            raise ToolError(str(e)) from None
        finally:
            wire.done(request(ctx))

    FilePath = Annotated[str, Field(description="File path, relative to the workspace root.")]
    Merge = Annotated[
        bool,
        Field(
            strict=True,
            description="If the file changed since you read it, merge your change with theirs when they touched "
            "different lines (refused with the conflicting lines otherwise).",
        ),
    ]
    reading = ToolAnnotations(read_only_hint=True)
    writing = ToolAnnotations(destructive_hint=True, idempotent_hint=False)

    @server.tool(annotations=reading, structured_output=False)
    async def read_file(
        path: FilePath,
        ctx: Context,
        offset: Annotated[int, Field(strict=True, description="The first line to read (lines count from 1).")] = 1,
        limit: Annotated[
            int | None, Field(strict=True, description="How many lines to read (default: to the end).")
        ] = None,
    ) -> CallToolResult:
        """Read a text file, or lines of it (offset, limit: a large file is read in parts).
        Reading registers what you saw: later write_file/edit_file calls on it are refused if anyone
        changed it since, so always read a file before changing it."""
        content, note = await answer(ctx, lambda: session(ctx).read_file(path, offset, limit, request(ctx)))
        return CallToolResult(content=[TextContent(type="text", text=content), TextContent(type="text", text=note)])

    @server.tool(annotations=writing, structured_output=False)
    async def write_file(
        path: FilePath,
        content: Annotated[str, Field(description="The whole new content of the file.")],
        ctx: Context,
        merge: Merge = False,
    ) -> str:
        """Write a whole text file (creating it and its directories if needed). Refused, with what changed,
        if the file exists and you have not read it, or it changed since you read it."""
        result: str = await answer(ctx, lambda: session(ctx).write_file(path, content, merge, request(ctx)))
        return result

    @server.tool(annotations=writing, structured_output=False)
    async def edit_file(
        path: FilePath,
        old_string: Annotated[
            str, Field(description="Exact text to replace; it must occur exactly once in the file as you read it.")
        ],
        new_string: Annotated[str, Field(description="The text to put in its place.")],
        ctx: Context,
        merge: Merge = False,
    ) -> str:
        """Replace old_string with new_string in the content you last read of a file (read_file first).
        Refused, with the diff of what changed, if the file changed since you read it."""
        result: str = await answer(
            ctx, lambda: session(ctx).edit_file(path, old_string, new_string, merge, request(ctx))
        )
        return result

    @server.tool(annotations=reading, structured_output=False)
    async def history(
        path: FilePath,
        ctx: Context,
        limit: Annotated[
            int, Field(strict=True, description="How many of the newest versions to list (at least 1).")
        ] = 20,
    ) -> str:
        """List a managed file's versions, newest first: who wrote each, when, and which one you read."""
        result: str = await answer(ctx, lambda: session(ctx).history(path, limit))
        return result

    @server.tool(annotations=reading, structured_output=False)
    async def diff(
        path: FilePath,
        ctx: Context,
        from_version: Annotated[
            int | None, Field(ge=0, strict=True, description="Older version (default: the version you last read).")
        ] = None,
        to_version: Annotated[
            int | None, Field(ge=0, strict=True, description="Newer version (default: the current one).")
        ] = None,
    ) -> str:
        """Unified diff of a managed file between two versions; by default what changed since you read it."""
        result: str = await answer(ctx, lambda: session(ctx).diff(path, from_version, to_version))
        return result

    @server.tool(annotations=reading, structured_output=False)
    async def status(ctx: Context) -> str:
        """The workspace: managed files with version, last writer and grant holder; agents and their stale
        views; the files you read that changed since."""
        result: str = await answer(ctx, lambda: session(ctx).status())
        return result

    @server.tool(annotations=reading, structured_output=False)
    async def why(path: FilePath, ctx: Context) -> str:
        """Why the last write to a file was refused: which agent, what it had read, who changed the file
        since, and what to do."""
        result: str = await answer(ctx, lambda: session(ctx).why(path))
        return result

    try:
        anyio.run(_serve_stdio, server, wire)
    except* (BrokenPipeError, anyio.BrokenResourceError):  # the client closed its side, not the server's fault
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        click.echo(
            "coherent-volume mcp: the client closed its side before every reply was written; what its requests "
            "changed stands (coherent-volume log shows it)",
            err=True,
        )
    finally:
        if agent is None and sessions:  # its own random name: no later connection can be this agent
            try:
                core.forget_views(sessions[0].agent)
            except (CoherenceError, OSError) as e:
                click.echo(
                    f"coherent-volume mcp: the views of {sessions[0].agent} were not forgotten ({e}); they stop "
                    "keeping old versions from pruning once it has been idle for the policy's keep_days",
                    err=True,
                )


VIEWED = " Your view is this version:"
"""What a read's note says of the view it registers (`Session.read_file`); a reply whose read
registers none says that instead (`_serve_stdio.unviewed`)."""

READ_SETTLE = 0.05
"""Seconds of silence on the client's input (after the read came, and after its last byte) before a
read_file's reply is written: calls the client sent together with the read (a model's parallel
tool calls, sent one after the other) arrive meanwhile, before the reply is written, and so are
not built on it (`_serve_stdio`). The server cannot see when the client reads a reply, only when
it was written: a call sent after such a silence, yet before the client read the reply, counts as
built on it."""

ANSWER_AT_END = 60.0
"""Seconds the server waits, once its client closed its side, for the requests still running to
be answered (each is bounded by the volume's own waits)."""


async def _serve_stdio(server: Any, wire: Wire) -> None:
    """Serve `server` (an SDK `MCPServer`) over stdio as its `run_stdio_async` does (fd 0 and 1 point
    at /dev/null and stderr meanwhile, so nothing else reads or writes the wire), except that:
    - every line that is not a JSON-RPC message is answered (the SDK drops it, so a client waiting for
      its reply would wait forever): JSON-RPC's parse error for a line that is not JSON, invalid
      request for JSON that is not a message, with the line's id if it has one, and invalid params,
      with its id, for JSON holding a lone surrogate escape ("\\ud83d", which pydantic refuses as
      no JSON: answered with id null, a client waited for its reply forever);
    - `wire` learns where each request began on the input (in bytes) and which the client cancelled,
      and a read's view is registered (`Session.delivered`) once its reply is written, for requests
      that began after every byte the client had sent by then: those sent before it could not have
      seen it; the reply waits until the client stopped sending (`quiet`), and a request reusing
      the id of one under way is refused, and a read under that id registers no view;
    - at the end of input (the client closed its side), it waits for every request read and not
      cancelled to be answered (the SDK would drop the answers of those still running, whose
      changes may have landed), ANSWER_AT_END seconds at most."""
    import fcntl
    import termios

    import anyio
    import anyio.to_thread
    from mcp.shared.message import SessionMessage
    from mcp.types import (
        INVALID_PARAMS,
        INVALID_REQUEST,
        PARSE_ERROR,
        ErrorData,
        JSONRPCError,
        JSONRPCNotification,
        JSONRPCRequest,
        JSONRPCResponse,
        jsonrpc_message_adapter,
    )
    from pydantic import ValidationError

    def error_for(e: Exception, line: str) -> JSONRPCError | None:
        problems = e.errors() if isinstance(e, ValidationError) else []
        if any(p["type"] == "json_invalid" for p in problems):
            try:  # JSON all the same where it holds a lone surrogate escape ("\ud83d"), which is no text
                parsed = json.loads(line)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                return JSONRPCError(
                    jsonrpc="2.0",
                    id=None,
                    error=ErrorData(code=PARSE_ERROR, message="Parse error: a line that is not JSON was ignored"),
                )
            i = parsed.get("id")
            if "method" in parsed and not (isinstance(i, (int, str)) and not isinstance(i, bool)):
                return None  # a notification: no reply, as for any other
            return JSONRPCError(
                jsonrpc="2.0",
                id=i if isinstance(i, (int, str)) and not isinstance(i, bool) else None,
                error=ErrorData(
                    code=INVALID_PARAMS,
                    message="Invalid params, ignored: a string holds a lone surrogate escape (such as \\ud83d, half "
                    "of a character), which is no Unicode text; nothing was done",
                ),
            )
        try:  # the line's own id, never one nested in its fields (`{"method": {"id": 7}}` has none)
            parsed = json.loads(line)
        except ValueError:
            parsed = None
        i = parsed.get("id") if isinstance(parsed, dict) else None
        why = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems[:3]) or str(e)
        return JSONRPCError(
            jsonrpc="2.0",
            id=i if isinstance(i, (int, str)) and not isinstance(i, bool) else None,
            error=ErrorData(code=INVALID_REQUEST, message=f"Invalid request, ignored ({why})"),
        )

    def reused(request: Any) -> JSONRPCError:
        return JSONRPCError(
            jsonrpc="2.0",
            id=request,
            error=ErrorData(
                code=INVALID_REQUEST,
                message=f"Invalid request, ignored: id {request!r} is that of a request still under way; give each "
                "request its own id. A read_file under that id registers no view: read the file again before "
                "writing it",
            ),
        )

    def no_view_because(heard: bool) -> str:
        if heard:
            return "its id was reused by another request while it ran, so the client cannot tell which reply it read"
        return (
            f"the client sent without a pause for {ANSWER_AT_END:.0f} s, so its reply could not be told from the "
            "calls sent with it"
        )

    def unviewed(reply: JSONRPCResponse, heard: bool) -> JSONRPCResponse:
        """A read's `reply` that registers no view, its note saying so (it said "Your view is this
        version", and the write built on it was refused: /tmp/s32r2mcp 3)."""
        content = reply.result.get("content")
        if not isinstance(content, list):
            return reply
        said = (
            f" This read registered no view ({no_view_because(heard)}): read the file again, on its own, before "
            "writing it."
        )
        notes = [
            {**item, "text": item["text"].split(VIEWED)[0] + said}
            if isinstance(item, dict) and VIEWED in str(item.get("text", ""))
            else item
            for item in content
        ]
        return reply.model_copy(update={"result": {**reply.result, "content": notes}})

    lowlevel = server._lowlevel_server  # the SDK's own `run_stdio_async` serves it the same way
    unanswered: set[object] = set()
    """The ids (`Wire.key`) of the requests read and neither answered nor cancelled yet."""
    writing = anyio.Lock()

    wire_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    wire_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    flags = fcntl.fcntl(wire_in, fcntl.F_GETFL)
    out_flags = fcntl.fcntl(wire_out, fcntl.F_GETFL)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    fcntl.fcntl(wire_in, fcntl.F_SETFL, flags | os.O_NONBLOCK)  # read on the event loop: `taken` is exact
    fcntl.fcntl(wire_out, fcntl.F_SETFL, out_flags | os.O_NONBLOCK)  # (and written there)
    taken = 0
    """Bytes read from the input so far."""
    pending = bytearray()
    """Of those, what follows the last line handed on."""
    ended = False
    last_input = 0.0
    """When bytes last came from the input (`time.monotonic`)."""

    def sent_so_far() -> int:
        """Bytes the client has sent so far: read, or waiting in the pipe."""
        waiting = bytearray(4)
        try:
            fcntl.ioctl(wire_in, termios.FIONREAD, waiting)
        except OSError:
            return taken
        return taken + int.from_bytes(waiting, sys.byteorder)

    pollable = True
    """Whether the input can be waited for (a pipe, socket or terminal; a regular file or /dev/null,
    which epoll refuses, never makes a read wait)."""

    async def next_line() -> tuple[int, bytes] | None:
        """(where it began, the line), or None at the end of input. Each byte is searched for the
        line's end once (a request of many megabytes arrives in many reads)."""
        nonlocal taken, pending, ended, pollable, last_input
        searched = 0
        while (end := pending.find(b"\n", searched)) < 0 and not ended:
            searched = len(pending)
            if pollable:
                try:
                    await anyio.wait_readable(wire_in)
                except PermissionError:
                    pollable = False
            try:
                chunk = os.read(wire_in, 1 << 16)
            except BlockingIOError:
                continue
            taken += len(chunk)
            pending += chunk
            ended = not chunk
            last_input = time.monotonic()
        if not pending:
            return None
        start = taken - len(pending)  # where the first byte not handed on began on the input
        line = bytes(pending[:end] if end >= 0 else pending)  # (the input may end without a line end)
        del pending[: end + 1 if end >= 0 else len(pending)]
        return start, line

    async def write_all(data: bytes) -> bool:
        """Write `data` on the event loop; whether it had to wait for the client to read."""
        view = memoryview(data)
        waited = False
        while view:
            try:
                view = view[os.write(wire_out, view) :]
            except BlockingIOError:
                waited = True
                await anyio.wait_writable(wire_out)
        return waited

    async def quiet(arrived: float) -> bool:
        """Wait until the client stopped sending: nothing came for READ_SETTLE seconds (nor since
        `arrived`), nothing waits in the pipe and no line is half read. Calls sent together with a
        read, even behind a call of many megabytes that the client is still writing, so arrive
        before its reply is written. False if the client never stopped within ANSWER_AT_END."""
        give_up = time.monotonic() + ANSWER_AT_END
        while True:
            left = max(arrived, last_input) + READ_SETTLE - time.monotonic()
            if left <= 0 and sent_so_far() == taken and pending[-1:] in (b"", b"\n"):
                return True
            if time.monotonic() >= give_up:
                return False
            await anyio.sleep(max(left, 0.01))

    async def emit(message: Any, answers: bool = True) -> None:
        """Write `message`; once a reply is written, register the view of the read it carries. An
        error that `answers` nothing (a request reusing the id of one under way) is only written."""
        heard = True
        if answers and isinstance(message, JSONRPCResponse | JSONRPCError) and message.id is not None:
            key = Wire.key(message.id)
            with wire.lock:
                carries = key in wire.sent
            if carries:  # calls sent together with the read arrive meanwhile, and are not built on it
                heard = await quiet(wire.arrived_at.get(key, 0))
            wire.arrived_at.pop(key, None)
            with wire.lock:
                doubtful = carries and (key in wire.reused or not heard)
            if doubtful and isinstance(message, JSONRPCResponse):
                message = unviewed(message, heard)
        data = (message.model_dump_json(by_alias=True, exclude_unset=True) + "\n").encode()
        async with writing:
            before = sent_so_far()
            try:
                waited = await write_all(data)
            except BrokenPipeError:  # the client closed its side: the serving ends, its handlers are told so
                broken.append(message)
                serving.cancel()
                return
            if not answers or not isinstance(message, JSONRPCResponse | JSONRPCError) or message.id is None:
                return
            key = Wire.key(message.id)
            unanswered.discard(key)
            wire.done(message.id)
            # what the client sent before the reply began to be written, or, where it had to be
            # waited for (not reading), before it was written: calls sent later may be built on it
            # (the server cannot tell a call sent as the reply is written from one sent on reading
            # it: measured after the write, a quick client was taken for one that had not read it)
            since = sent_so_far() if waited else before
            unsure = None
            with wire.lock:
                wire.arrived.pop(key, None)
                read = wire.sent.pop(key, None)
                if key in wire.reused or not heard:
                    unsure = read
                    read = None
                wire.reused.discard(key)
                if read is not None:
                    wire.settling.append(since)
        if unsure is not None:
            click.echo(
                f"coherent-volume mcp: the read of {shown(unsure[1].target.rel)} registered no view: "
                f"{no_view_because(heard)}; a write built on it will be refused until the file is read again",
                err=True,
            )
        if read is not None:
            try:
                await anyio.to_thread.run_sync(read[0].delivered, read[1], since)
            except (CoherenceError, OSError) as e:  # the reply stands; the view stays where it was
                click.echo(
                    f"coherent-volume mcp: the view of {shown(read[1].target.rel)} that a read's reply showed "
                    f"could not be registered ({e}); a write built on it will be refused",
                    err=True,
                )
            finally:
                wire.settling.remove(since)
                wire.notify()

    class Answering:
        """The client's messages, with every line that is not a message answered and skipped; at the
        end of input, what it ends with waits for every request read to be answered."""

        last_context = None

        async def receive(self) -> Any:
            while True:
                got = await next_line()
                if got is None:
                    raise anyio.EndOfStream
                start, raw = got
                if not raw.strip():
                    continue  # a blank line is no message, nor an error
                line = raw.decode("utf-8", errors="replace")
                try:
                    message = jsonrpc_message_adapter.validate_json(line, by_name=False)
                except Exception as e:
                    error = error_for(e, line)
                    if error is not None:
                        if error.id is not None and Wire.key(error.id) in unanswered:
                            with wire.lock:  # the client cannot tell this error from that request's reply
                                wire.reused.add(Wire.key(error.id))
                        # it answers no request the server runs (before, it took the place of one under way
                        # under its id, and a stale write sent after a read counted as built on it: /tmp/s32r2mcp 1)
                        await emit(error, answers=False)
                    continue
                if isinstance(message, JSONRPCRequest):
                    key = Wire.key(message.id)
                    if key in unanswered:  # JSON-RPC forbids it: the client could not tell the replies apart
                        with wire.lock:
                            wire.reused.add(key)
                        await emit(reused(message.id), answers=False)
                        continue
                    unanswered.add(key)
                    with wire.lock:
                        wire.arrived[key] = start
                    wire.arrived_at[key] = time.monotonic()
                    if message.method == "tools/call":
                        wire.turns[key] = start
                elif isinstance(message, JSONRPCNotification) and message.method == "notifications/cancelled":
                    cancelled = (message.params or {}).get("requestId")
                    if cancelled is not None:  # never answered (the SDK drops the reply): not waited for
                        key = Wire.key(cancelled)
                        unanswered.discard(key)
                        with wire.lock:
                            wire.cancelled.add(key)
                            wire.arrived.pop(key, None)
                            wire.sent.pop(key, None)
                        wire.done(cancelled)
                return SessionMessage(message)

        async def aclose(self) -> None:
            pass

        def __aiter__(self) -> "Answering":
            return self

        async def __anext__(self) -> Any:
            try:
                return await self.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                with anyio.move_on_after(ANSWER_AT_END):
                    while unanswered:
                        await anyio.sleep(0.01)
                raise StopAsyncIteration from None

        async def __aenter__(self) -> "Answering":
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

    class Noting:
        """The server's messages, written by `emit`."""

        async def send(self, item: Any, /) -> None:
            await emit(item.message)

        async def aclose(self) -> None:
            pass

        async def __aenter__(self) -> "Noting":
            return self

        async def __aexit__(self, *exc: object) -> None:
            pass

    broken: list[object] = []
    serving = anyio.CancelScope()
    try:
        with serving:
            await lowlevel.run(Answering(), Noting(), lowlevel.create_initialization_options())
        if broken:
            raise BrokenPipeError(errno.EPIPE, "the client closed its side before every reply was written")
    finally:
        fcntl.fcntl(wire_in, fcntl.F_SETFL, flags)
        fcntl.fcntl(wire_out, fcntl.F_SETFL, out_flags)
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        os.close(wire_in)
        os.close(wire_out)


@click.command("mcp")
@click.argument("root", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--agent",
    help="Agent name for this session (default: mcp:<client name>:<random>, new for each connection). Give "
    "each concurrent session its own name.",
)
def mcp_command(root: str, agent: str | None) -> None:
    """Serve the volume at ROOT to one MCP client over stdio: tracked reads, fail-closed writes and edits,
    history, diff, status and why. Needs the `mcp` extra."""
    if importlib.util.find_spec("mcp") is None:
        raise click.ClickException("the MCP server needs the official MCP SDK: pip install 'coherent-volume[mcp]'")
    try:
        if agent is not None:
            validate_agent(agent)
            if UNNAMED.fullmatch(agent):  # another connection's own name: it could write on its reads
                raise CoherenceError(
                    f"--agent {agent!r}: names of the form mcp:<client>:<8 hex digits> are the sessions' own, "
                    "given to connections without --agent; choose another name"
                )
        core = open_core(root)
    except (CoherenceError, OSError) as e:
        raise click.ClickException(str(e)) from e
    try:
        serve(core, agent)
    finally:
        core.close()
