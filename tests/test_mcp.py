"""`coherent-volume mcp ROOT` driven by the official MCP SDK's own client over stdio.

Every session is a real `coherent-volume mcp` process started by the SDK's `stdio_client`; the
SDK ends it when the session's block exits (closing its stdin, then killing it if it lingers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import Implementation, TextContent

from coherent_volume import CoherentVolume, Policy, RegistryError, Retention
from coherent_volume.core import open_core
from coherent_volume.diffs import MAX_MERGE_BYTES
from coherent_volume.mcp_server import READ_LIMIT, Session, ToolRefused

from .harness.volumes import sql

CLI = str(Path(sys.executable).parent / "coherent-volume")
P = "plans/plan.md"


class Tools:
    """One MCP session: call its tools and get (is_error, text) back."""

    def __init__(self, session: ClientSession) -> None:
        self.session = session

    async def __call__(self, tool: str, **arguments: object) -> tuple[bool, str]:
        result = await self.session.call_tool(tool, arguments)
        texts = [c.text for c in result.content if isinstance(c, TextContent)]
        return bool(result.is_error), "\n".join(texts)

    async def ok(self, tool: str, **arguments: object) -> str:
        error, text = await self(tool, **arguments)
        assert not error, f"{tool} {arguments} failed: {text}"
        return text

    async def refused(self, tool: str, **arguments: object) -> str:
        error, text = await self(tool, **arguments)
        assert error, f"{tool} {arguments} was not refused: {text}"
        return text

    async def agent(self) -> str:
        line = (await self.ok("status")).splitlines()[0]
        return line.split("you are agent ", 1)[1]


@asynccontextmanager
async def mcp_session(root: Path, *args: str, client: str = "pytest") -> AsyncIterator[Tools]:
    params = StdioServerParameters(command=CLI, args=["mcp", str(root), *args])
    async with (
        stdio_client(params) as (read, write),
        ClientSession(read, write, client_info=Implementation(name=client, version="1")) as session,
    ):
        await session.initialize()
        yield Tools(session)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        with anyio.fail_after(120):
            await scenario()

    anyio.run(bounded)


def test_a_second_sessions_stale_write_is_refused_with_reason_and_diff(root: Path) -> None:
    async def scenario() -> None:
        async with mcp_session(root, client="Claude Desktop") as a, mcp_session(root) as b:
            alice, bob = await a.agent(), await b.agent()
            assert alice != bob and alice.startswith("mcp:Claude-Desktop:") and bob.startswith("mcp:pytest:")
            assert await a.ok("write_file", path=P, content="goal\nstep one\n") == f"Wrote {P}: now version 1."
            for s in (a, b):
                assert (await s.ok("read_file", path=P)).startswith("goal\nstep one\n")
            await a.ok("write_file", path=P, content="goal\nstep one, revised\n")

            refusal = await b.refused("write_file", path=P, content="goal\nstep one\nstep two\n")
            assert "Refused (stale): nothing was written" in refusal
            assert f"you read version 1, it is now version 2, last written by {alice}" in refusal
            assert "-step one\n+step one, revised" in refusal, "the diff since bob's view"
            assert f"Call read_file on {P} again" in refusal
            assert (root / P).read_text() == "goal\nstep one, revised\n", "nothing was written"

            why = await b.ok("why", path=P)
            assert f"agent {bob} (stale); it had read version 1, current was version 2" in why
            assert f"v2 commit by {alice}" in why and "re-read the file" in why
            assert "what changed since version 1:" in why and "+step one, revised" in why
            assert f"your stale views (changed since you read them): {P}" in await b.ok("status")

            text = await b.ok("read_file", path=P)
            assert f"{P}: version 2" in text
            await b.ok("write_file", path=P, content="goal\nstep one, revised\nstep two\n")
            history = (await a.ok("history", path=P)).splitlines()
            assert history[1].startswith(f"v3 commit by {bob}") and not history[1].endswith("your view")
            assert history[2].startswith(f"v2 commit by {alice}") and history[2].endswith("<- your view")
            assert history[3].startswith(f"v1 commit by {alice}")
            assert "+step two" in await a.ok("diff", path=P), "a's view (v2) to the current version"
            assert (await a.ok("diff", path=P, from_version=1, to_version=2)).startswith(f"{P}: version 1 to version 2")
            status = await a.ok("status")
            assert f"{P} v3 by {bob}" in status and f"{alice}: 1 views, 1 stale" in status
            assert f"{bob}: 1 views, 0 stale" in status

    run(scenario)


def test_unread_writes_are_refused_and_unmanaged_paths_pass_through(root: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "by setup\n")
    (root / "notes.txt").write_text("plain\n")

    async def scenario() -> None:
        async with mcp_session(root) as s:
            refusal = await s.refused("write_file", path=P, content="blind\n")
            assert "Refused (unread)" in refusal and "last written by setup" in refusal
            assert f"Call read_file on {P} first" in refusal
            refusal = await s.refused("edit_file", path=P, old_string="by", new_string="BY")
            assert "Refused (unread)" in refusal and "read_file" in refusal
            assert (root / P).read_text() == "by setup\n"

            assert "not managed" in await s.ok("write_file", path="notes.txt", content="plain\nmore\n")
            await s.ok("edit_file", path="notes.txt", old_string="more", new_string="most")
            assert (root / "notes.txt").read_text() == "plain\nmost\n"
            assert "is not managed" in await s.ok("read_file", path="notes.txt")
            await s.ok("write_file", path="plans/new/deep.md", content="created\n")
            assert (root / "plans/new/deep.md").read_text() == "created\n"

    run(scenario)


def test_a_write_of_a_file_read_file_cannot_show_is_refused_with_a_remedy_that_works(root: Path) -> None:
    """A managed file that is not UTF-8 text cannot be read with read_file, so "read it first" would
    loop: the refusal says these tools cannot change it and what can."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, b"\xff\xfe binary\n")

    async def scenario() -> None:
        async with mcp_session(root) as s:
            assert "not UTF-8" in await s.refused("read_file", path=P)
            refusal = await s.refused("write_file", path=P, content="text\n")
            assert "Refused (unread)" in refusal and "not UTF-8 text" in refusal and "Python API" in refusal
            assert "Call read_file" not in refusal
            assert (root / P).read_bytes() == b"\xff\xfe binary\n"

    run(scenario)


def test_edit_file_applies_to_what_the_session_read(root: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb\nc\nc\n")

    async def scenario() -> None:
        async with mcp_session(root) as s:
            await s.ok("read_file", path=P)
            once = await s.refused("edit_file", path=P, old_string="c", new_string="C")
            assert "occurs 2 times" in once
            assert "does not occur" in await s.refused("edit_file", path=P, old_string="zzz", new_string="y")
            assert "empty" in await s.refused("edit_file", path=P, old_string="", new_string="y")
            assert await s.ok("edit_file", path=P, old_string="a\n", new_string="A\n") == f"Wrote {P}: now version 2."
            await s.ok("edit_file", path=P, old_string="b\n", new_string="B\n")  # builds on its own write
            assert (root / P).read_text() == "A\nB\nc\nc\n"
            async with anyio.create_task_group() as tg:  # a model's parallel edits: one builds on the other
                tg.start_soon(partial(s.ok, "edit_file", path=P, old_string="A\n", new_string="A1\n"))
                tg.start_soon(partial(s.ok, "edit_file", path=P, old_string="B\n", new_string="B1\n"))
            assert (root / P).read_text() == "A1\nB1\nc\nc\n"

            with CoherentVolume(root, agent="bob") as bob:
                bob.read(P)
                bob.write(P, "A1\nB1\nc\nc\nbob's line\n")
            # old_string still occurs in the current content: the edit is refused all the same, as it
            # would apply to version 5, which the session wrote, not to what is on disk now
            refusal = await s.refused("edit_file", path=P, old_string="A1\n", new_string="first\n")
            assert "Refused (stale)" in refusal and "it is now version 6, last written by bob" in refusal
            assert "+bob's line" in refusal and "merge=true" in refusal
            assert (root / P).read_text() == "A1\nB1\nc\nc\nbob's line\n"

            merged = await s.ok("edit_file", path=P, old_string="A1\n", new_string="first\n", merge=True)
            assert "merged" in merged and "version 7" in merged
            assert (root / P).read_text() == "first\nB1\nc\nc\nbob's line\n"
            again = await s.refused("edit_file", path=P, old_string="B1", new_string="second")
            assert "Refused (unread)" in again, "a merge's result was never read"

            await s.ok("read_file", path=P)
            with CoherentVolume(root, agent="bob") as bob:
                bob.read(P)
                bob.write(P, "FIRST\nB1\nc\nc\nbob's line\n")
            conflict = await s.refused("edit_file", path=P, old_string="first\n", new_string="1st\n", merge=True)
            assert "changed the same lines" in conflict and "<<<<<<< yours\n1st" in conflict
            assert "merge=true" not in conflict, "a conflict is resolved by reading, not by merging again"
            assert (root / P).read_text() == "FIRST\nB1\nc\nc\nbob's line\n"

    run(scenario)


def test_an_edit_is_committed_only_onto_the_version_its_session_read_whatever_the_shared_view(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions under one agent name: the second's read lands between the first's edit and its
    commit (made deterministic by running it inside the commit call), moving the shared view to a
    peer's newer version. The edit, built on the older version, is refused, or merged from that base."""
    core = open_core(root)
    first, second = Session(core, "planner"), Session(core, "planner")
    write = core.write
    for path, merge in (("plans/refused.md", False), ("plans/merged.md", True)):
        with CoherentVolume(root, agent="setup") as setup:
            setup.write(path, "one\nx\ny\ntwo\n")
        first.read_file(path)
        with CoherentVolume(root, agent="peer") as peer:
            peer.read(path)
            peer.write(path, "one\nx\ny\ntwo, by the peer\n")

        def after_the_other_sessions_read(*args: Any, _path: str = path, **kwargs: Any) -> int:
            second.read_file(_path)
            return write(*args, **kwargs)

        monkeypatch.setattr(core, "write", after_the_other_sessions_read)
        if merge:
            assert "merged" in first.edit_file(path, "one\n", "ONE\n", merge=True)
            assert (root / path).read_text() == "ONE\nx\ny\ntwo, by the peer\n"
        else:
            with pytest.raises(ToolRefused, match=r"Refused \(stale\).*you read version 1, it is now version 2"):
                first.edit_file(path, "one\n", "ONE\n")
            assert (root / path).read_text() == "one\nx\ny\ntwo, by the peer\n", "the peer's commit is kept"
        monkeypatch.undo()
    core.close()


def test_a_merged_edit_is_told_as_a_merge_even_if_the_shared_view_moves_to_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second session of the agent reads the merged version right after the first's merged
    edit: the first session still knows it never read that version, so its next edit is refused
    unread instead of applying to its own unmerged text (which would revert the peer's line)."""
    path = "plans/merged.md"
    with CoherentVolume(root, agent="peer") as peer:
        peer.write(path, "top\n1\n2\n3\nbottom\n")
        core = open_core(root)
        first, second = Session(core, "planner"), Session(core, "planner")
        first.read_file(path)
        peer.write(path, "top, by the peer\n1\n2\n3\nbottom\n")
    write = core.write

    def then_the_other_session_reads(*args: Any, **kwargs: Any) -> int:
        version = write(*args, **kwargs)
        second.read_file(path)
        return version

    monkeypatch.setattr(core, "write", then_the_other_session_reads)
    assert "merged" in first.edit_file(path, "bottom\n", "bottom, by the first\n", merge=True)
    monkeypatch.undo()
    with pytest.raises(ToolRefused, match=r"Refused \(unread\)"):
        first.edit_file(path, "2\n", "2, by the first\n")
    assert (root / path).read_text() == "top, by the peer\n1\n2\n3\nbottom, by the first\n"
    core.close()


@pytest.mark.parametrize("asked", ["merge=True", "a merge glob"])
def test_a_merge_that_makes_no_version_leaves_the_session_knowing_it_must_read_again(root: Path, asked: str) -> None:
    """A peer's commit already holds the session's change (and one of its own): the merge is the
    current version and makes none. The session never read that version's bytes, so its next edit
    is refused unread; before, it kept its own text as that version's and the edit built on it
    reverted the peer's other change, accepted (/tmp/s29mcp 1)."""
    with CoherentVolume(root, agent="bob") as bob:
        if asked == "a merge glob":
            bob.set_policy(replace(bob.policy, merge=(P,)))
        bob.write(P, "title: teh plan\nstep 1\nstep 2\nstep 3\n")
        core = open_core(root)
        session = Session(core, "model")
        session.read_file(P)
        bob.read(P)
        bob.write(P, "title: the plan\nstep 1\nstep 2\nstep 3 (bob: done)\n")
    told = session.edit_file(P, "teh", "the", merge=asked == "merge=True")
    assert "merged with changes others made" in told and "Call read_file" in told, told
    with pytest.raises(ToolRefused, match=r"Refused \(unread\)"):
        session.edit_file(P, "step 1\n", "step 1 (done)\n")
    assert (root / P).read_text() == "title: the plan\nstep 1\nstep 2\nstep 3 (bob: done)\n"
    core.close()


def test_a_refused_read_leaves_what_the_session_read_before_to_edit(root: Path) -> None:
    """A part read, then a read of the whole file refused as too large: the session's view stays
    the part's version, and so does what edit_file builds on (before, the refusal forgot it and the
    edit was refused unread while write_file was allowed, /tmp/s29mcp 2)."""
    lines = [f"line {i:05} {'x' * 20}\n" for i in range(1, 10_001)]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "".join(lines))
    core = open_core(root)
    session = Session(core, "model")
    session.read_file(P, 1, 3)
    with pytest.raises(ToolRefused, match=str(READ_LIMIT)):
        session.read_file(P)
    assert "now version 2" in session.edit_file(P, "line 00002", "line two")
    assert (root / P).read_text().splitlines()[1].startswith("line two")
    core.close()


def test_a_write_whose_follow_up_lookup_fails_is_reported_written(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry fails right after a write's commit (a PostgreSQL restart between the two), when
    the session looks up whether the version was a merge: the write is reported as written, with its
    version and why read_file is needed before the next edit (before, "writing failed ... nothing
    was written" for a write that had landed: a hostile probe on PostgreSQL copies)."""
    core = open_core(root)
    session = Session(core, "model")
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/x.md", "one\n")
    session.read_file("plans/x.md")

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise RegistryError("the registry at db:5432 is unreachable (connection refused); nothing was written.")

    monkeypatch.setattr(core, "version_entry", unreachable)
    said = session.write_file("plans/x.md", "two\n")
    assert said.startswith("Wrote plans/x.md: now version 2. Whether it was merged") and "call read_file" in said
    monkeypatch.undo()
    assert (root / "plans/x.md").read_text() == "two\n"
    with pytest.raises(ToolRefused, match=r"Refused \(unread\)"):
        session.edit_file("plans/x.md", "two", "three")
    core.close()


def test_a_merge_that_cannot_be_made_says_why_and_is_not_suggested_again(root: Path) -> None:
    big = "x" * 99 + "\n"
    big *= (MAX_MERGE_BYTES // len(big)) + 1
    with CoherentVolume(root, agent="peer") as peer:
        peer.write("plans/big.md", big)
        core = open_core(root)
        session = Session(core, "model")
        session.read_file("plans/big.md", limit=3)
        peer.write("plans/big.md", "peer line\n" + big)
    with pytest.raises(ToolRefused) as refused:
        session.write_file("plans/big.md", big + "mine\n", merge=True)
    text = str(refused.value)
    assert "Refused (stale)" in text and "not merged: a side of the merge is larger than 1 MiB" in text, text
    assert "merge=true" not in text, "the model already asked for a merge: not suggested again"
    assert (root / "plans/big.md").read_text() == "peer line\n" + big
    core.close()


def test_bad_input_gets_a_clear_tool_error(root: Path) -> None:
    (root / "plans/binary.md").write_bytes(b"\xff\xfe\x00")
    (root / "notes.txt").write_text("plain\n")

    async def scenario() -> None:
        async with mcp_session(root) as s:
            for outside in ("../outside.md", "/etc/passwd", ".coherent/registry.db"):
                text = await s.refused("read_file", path=outside)
                assert "is not a file of this workspace" in text and str(root) in text, text
                assert "is not a file of this workspace" in await s.refused("write_file", path=outside, content="x")
            assert not (root.parent / "outside.md").exists()
            assert "plans/missing.md does not exist" in await s.refused("read_file", path="plans/missing.md")
            assert "is a directory" in await s.refused("read_file", path="plans")
            assert "not UTF-8 text" in await s.refused("read_file", path="plans/binary.md")
            refusal = await s.refused("write_file", path="plans/binary.md", content="text\n")
            assert "Refused (unread)" in refusal, "a binary read shows the model nothing: no view"
            assert "is not managed" in await s.refused("history", path="notes.txt")
            await s.ok("write_file", path=P, content="one\n")
            assert "not in its history" in await s.refused("diff", path=P, from_version=7)
            error, text = await s("history", path=P, limit=0)
            assert error and "limit" in text
            assert (await s.ok("read_file", path=P)).startswith("one\n"), "the session still serves"

    run(scenario)


def test_a_name_with_a_newline_or_an_escape_is_one_escaped_line_in_every_reply(root: Path) -> None:
    """A file's name may hold a newline or a terminal escape: every reply shows it escaped on its
    own line, so no name forges a line of `status`, of a refusal or of `why` (as the CLI shows it)."""
    name = "plans/x\n  plans/forged.md v9 by boss\x1b[2J.md"
    escaped = "plans/x\\x0a  plans/forged.md v9 by boss\\x1b[2J.md"
    core = open_core(str(root))
    try:
        alice, bob = Session(core, "alice"), Session(core, "bob")
        alice.write_file(name, "one\n")
        bob.read_file(name)
        alice.read_file(name)
        alice.write_file(name, "two\n")
        with pytest.raises(ToolRefused) as refused:
            bob.write_file(name, "three\n")
        replies = {
            "refusal": str(refused.value),
            "why": bob.why(name),
            "status": bob.status(),
            "history": alice.history(name),
            "diff": alice.diff(name, 1, 2),
            "read_file": alice.read_file(name)[1],
            "write_file": alice.write_file(name, "four\n"),
        }
        for tool, reply in replies.items():
            assert escaped in reply, (tool, reply)
            assert "\x1b" not in reply and not any(line.startswith("  plans/forged") for line in reply.splitlines()), (
                tool,
                reply,
            )
        assert (root / name).read_text() == "four\n"
    finally:
        core.close()


def test_a_read_too_large_for_one_tool_result_is_refused_and_read_in_parts(root: Path) -> None:
    """Clients cut or refuse large tool results, which would leave a view of text the model never
    got: a read over READ_LIMIT characters is refused with the size and how to read in parts, and
    registers no view; a part does. A part past the end, and a negative history limit, are refused."""
    big = "plans/big.md"
    text = "".join(f"line {i:04} {'x' * 50}\n" for i in range(1, 1001))
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(big, text)

    async def scenario() -> None:
        async with mcp_session(root) as s:
            refusal = await s.refused("read_file", path=big)
            assert f"{len(text)} characters" in refusal and "1000 lines" in refusal, refusal
            assert f"({READ_LIMIT})" in refusal and "offset" in refusal and "limit" in refusal, refusal
            assert "Refused (unread)" in await s.refused("write_file", path=big, content="x\n"), "no view"
            assert "fewer than offset 1001" in await s.refused("read_file", path=big, offset=1001)
            assert "Refused (unread)" in await s.refused("write_file", path=big, content="x\n"), "no view"
            first = await s.ok("read_file", path=big, offset=1, limit=400)
            assert first.startswith("line 0001 ") and "line 0400 " in first and "line 0401 " not in first
            assert "version 1" in first.splitlines()[-1]
            rest = await s.ok("read_file", path=big, offset=401)
            assert rest.startswith("line 0401 ") and "line 1000 " in rest
            assert "now version 2" in await s.ok("edit_file", path=big, old_string="line 0999 ", new_string="999: ")
            for bad in (0, -1):
                assert "must be at least 1" in await s.refused("history", path=big, limit=bad)
            assert "must be at least 1" in await s.refused("read_file", path=big, offset=0)

    run(scenario)


def test_a_part_read_past_another_writers_change_tells_the_model_what_changed(root: Path) -> None:
    """A part of a file registers the view at its version, which another writer changed in lines
    the part does not show since the session's last read: the reply says so, with the diff, so a
    whole-file write from what the model knew does not drop that change unnoticed (found by a
    hostile tester: the view moved silently and write_file went through over the peer's line)."""
    lines = [f"line {i}\n" for i in range(1, 31)]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "".join(lines))

    async def scenario() -> None:
        async with mcp_session(root) as s:
            await _read_then_bob_writes(s, root, "".join(["BOB LINE\n", *lines[1:]]))
            part = await s.ok("read_file", path=P, offset=10, limit=11)
            assert "shown only part" in part and "+BOB LINE" in part and "written by bob" in part, part
            whole = await s.ok("read_file", path=P)
            assert "shown only part" not in whole and whole.startswith("BOB LINE\n")

    run(scenario)


def test_a_refused_read_leaves_the_view_it_found_so_the_next_part_tells_what_changed(root: Path) -> None:
    """A read refused as too large, or past the file's end, showed the model nothing: it dropped
    the session's view, so the part read next had no earlier view to compare with, moved the view
    past a peer's change without a word, and a write_file from what the model knew dropped it (a
    hostile tester, /tmp/s20r3 D1). The view stays what it was; the part tells the change."""
    lines = [f"line {i:05} {'x' * 20}\n" for i in range(1, 1001)]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "".join(lines))

    async def scenario() -> None:
        async with mcp_session(root) as s:
            await _read_then_bob_writes(s, root, "".join(["BOB LINE\n", *lines[1:], *lines]))  # too large at once
            assert str(READ_LIMIT) in await s.refused("read_file", path=P)
            assert "fewer than offset" in await s.refused("read_file", path=P, offset=5000)
            part = await s.ok("read_file", path=P, offset=100, limit=5)
            assert "shown only part" in part and "+BOB LINE" in part and "written by bob" in part, part

    run(scenario)


async def _read_then_bob_writes(s: Tools, root: Path, text: str) -> None:
    """The session reads P whole; bob, another agent, reads it and writes `text`."""
    await s.ok("read_file", path=P)
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.write(P, text)


def test_a_line_too_long_for_one_tool_result_is_refused_saying_these_tools_cannot_show_it(root: Path) -> None:
    """A file with one line longer than READ_LIMIT (minified JSON) cannot be read in parts, which are
    whole lines: the refusal says so and names the tools that can change it (before: "read it in
    parts", which the same refusal answered for ever)."""
    minified = "plans/data.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(minified, "head\n" + "x" * (READ_LIMIT + 10) + "\ntail\n")

    async def scenario() -> None:
        async with mcp_session(root) as s:
            for call in ({}, {"offset": 2, "limit": 1}):
                refusal = await s.refused("read_file", path=minified, **call)
                assert f"line 2 of {minified} alone is {READ_LIMIT + 10} characters" in refusal, refusal
                assert "the mounted workspace, the Python API" in refusal and "in parts" not in refusal, refusal
            assert (await s.ok("read_file", path=minified, offset=3)).startswith("tail\n")

    run(scenario)


def test_an_agent_name_can_be_given_and_is_checked(root: Path) -> None:
    async def scenario() -> None:
        async with mcp_session(root, "--agent", "planner") as s:
            assert await s.agent() == "planner"
            await s.ok("write_file", path=P, content="x\n")
            assert "v1 commit by planner" in await s.ok("history", path=P)

    run(scenario)
    r = subprocess.run(
        [CLI, "mcp", str(root), "--agent", "external"], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    assert r.returncode == 1 and "reserved" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([CLI, "mcp", str(root / "plans")], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert r.returncode == 1 and "is a directory inside the volume at" in r.stderr


def test_the_server_exits_cleanly_when_the_client_goes(root: Path, tmp_path: Path) -> None:
    """The shell reports the server's exit status only if the server ends by itself: the SDK kills
    the whole process group when its server outlives the closing of its stdin."""
    errlog = tmp_path / "stderr"
    script = '"$0" mcp "$1"; echo "server exited: $?" >&2'
    params = StdioServerParameters(command="sh", args=["-c", script, CLI, str(root)])

    async def scenario() -> None:
        with errlog.open("w") as log:
            async with stdio_client(params, errlog=log) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                result = await session.call_tool("write_file", {"path": P, "content": "kept\n"})
                assert not result.is_error

    run(scenario)
    log = errlog.read_text()
    assert "server exited: 0" in log and "Traceback" not in log, log
    assert (root / P).read_text() == "kept\n"


def test_a_client_that_goes_before_its_replies_are_written_ends_the_server_with_one_line(root: Path) -> None:
    """A client that closes both its ends while requests are under way: the server finishes them,
    cannot write their replies, and ends with status 0 and one line saying so (it ended with status
    1 and a 68-line traceback: /tmp/s29mcp 4)."""
    server = subprocess.Popen(
        [CLI, "mcp", str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert server.stdin is not None and server.stdout is not None and server.stderr is not None
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "gone", "version": "1"}}
    messages = [{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}]
    messages.append({"jsonrpc": "2.0", "method": "notifications/initialized"})
    messages += [
        {"jsonrpc": "2.0", "id": 2 + i, "method": "tools/call", "params": {"name": "status", "arguments": {}}}
        for i in range(5)
    ]
    server.stdin.write(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
    server.stdin.flush()
    server.stdout.close()
    server.stdin.close()
    assert server.wait(90) == 0
    err = server.stderr.read().decode()
    assert "Traceback" not in err and "the client closed its side" in err and len(err.splitlines()) == 1, err


def test_a_path_that_never_existed_is_said_to_have_no_versions(root: Path) -> None:
    async def scenario() -> None:
        async with mcp_session(root) as s:
            for tool in ("history", "diff"):
                text = await s.refused(tool, path="plans/typo.md")
                assert "'plans/typo.md' has no versions: no file of that name was ever recorded" in text, text
            why = await s.ok("why", path="plans/typo.md")
            assert why.startswith("plans/typo.md: managed, never existed: no version of it was ever recorded\n")

    run(scenario)


def test_a_diff_too_large_for_one_tool_result_is_cut_saying_how_to_see_the_rest(root: Path) -> None:
    """Clients cut large tool results where the model cannot tell: a diff over READ_LIMIT characters
    is cut to its first lines, saying how many were left out and how to see them."""
    big = "plans/big.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(big, "".join(f"line {i}\n" for i in range(20_000)))
        setup.write(big, "".join(f"LINE {i}\n" for i in range(20_000)))

    async def scenario() -> None:
        async with mcp_session(root) as s:
            text = await s.ok("diff", path=big, from_version=1, to_version=2)
            assert len(text) <= READ_LIMIT, len(text)
            assert text.startswith(f"{big}: version 1 to version 2:\n--- {big}@v1\n")
            assert "-line 0\n" in text and "-line 19999\n" not in text
            shown = text.count("\n-line ") + text.count("\n+LINE ")
            assert f"... {40_000 - shown} more lines of the diff not shown" in text, text[-600:]
            assert "read_file with offset and limit" in text and f"coherent-volume diff ROOT {big} A B" in text
            small = await s.ok("diff", path=big, from_version=2, to_version=2)
            assert small.endswith("no differences.")

    run(scenario)


def test_a_diff_of_versions_too_large_to_diff_says_what_a_session_can_do(root: Path) -> None:
    """A version over diffs.MAX_DIFF_BYTES gets no line diff: the tool says why and what this
    session can use (read_file), not a command a client without a shell cannot run (/tmp/s26r2 F6)."""
    from coherent_volume import diffs

    big = "plans/big.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(big, "small\n")
        setup.write(big, b"x" * (diffs.MAX_DIFF_BYTES + 1))

    async def scenario() -> None:
        async with mcp_session(root) as s:
            text = await s.refused("diff", path=big, from_version=1, to_version=2)
            assert f"{big}: version 1 to version 2: no line diff ('{big}' version 2 is" in text, text
            assert "read_file shows the current version" in text and "ROOT PATH --version N" not in text, text

    run(scenario)


def test_an_unnamed_sessions_views_are_forgotten_when_its_client_goes(root: Path) -> None:
    """A session named `mcp:<client>:<random>` can never come back: its views would only keep old
    versions from being pruned, so they go with it. A session given --agent may connect again, and
    keeps them."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))

    async def scenario() -> None:
        async with mcp_session(root) as s:
            await s.ok("read_file", path=P)
            unnamed = await s.agent()
        async with mcp_session(root, "--agent", "planner") as s:
            await s.ok("read_file", path=P)
        assert [agent for (agent,) in sql(root, "SELECT agent FROM views ORDER BY agent")] == ["planner", "setup"]
        assert unnamed.startswith("mcp:pytest:")

    run(scenario)
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v2\n")
        setup.write(P, "v3\n")
        assert setup.prune().versions == 1, "v2; v1 is the view of planner, who may come back"
        assert [v.version for v in setup.history(P) if v.retained] == [3, 1]


HOLD_THE_COMMIT_LOCK = r"""
import sys, time
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent="holder")
with vol._core.registry.commit_lock():
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_read_with_no_fence_to_lift_does_not_wait_for_the_commit_lock(root: Path) -> None:
    """A process holds the commit lock (stuck): a read of a file in step with its record needs no
    commit, so it answers (and registers the view) instead of waiting 30 s and failing EBUSY."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "one\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_COMMIT_LOCK, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"

        async def scenario() -> None:
            async with mcp_session(root) as s:
                text = await s.ok("read_file", path=P)
                assert text.startswith("one\n") and f"{P}: version 1. Your view is this version" in text, text
                holder.kill()
                holder.wait()
                assert await s.ok("write_file", path=P, content="two\n") == f"Wrote {P}: now version 2."

        run(scenario)
    finally:
        holder.kill()
        holder.wait()


def test_a_read_lifts_the_sessions_fence(root: Path) -> None:
    """A session whose agent's lock() was reclaimed is fenced on the file until it reads it again."""
    with CoherentVolume(root, agent="planner") as planner, CoherentVolume(root, agent="bob") as bob:
        planner.write(P, "one\n")
        with planner.lock(P, ttl=0.2):
            time.sleep(0.3)
            bob.read(P)
            bob.write(P, "two\n")  # reclaims planner's lapsed grant: planner is fenced

    async def scenario() -> None:
        async with mcp_session(root, "--agent", "planner") as s:
            assert "Refused (fenced)" in await s.refused("write_file", path=P, content="three\n")
            assert (await s.ok("read_file", path=P)).startswith("two\n")
            assert await s.ok("write_file", path=P, content="three\n") == f"Wrote {P}: now version 3."

    run(scenario)


def test_a_line_that_is_not_a_message_is_answered_and_the_session_goes_on(root: Path) -> None:
    """JSON-RPC answers what it cannot read (a client waiting for that reply would wait forever):
    a parse error for a line that is not JSON, invalid request (with the line's id) for JSON that
    is not a message; the next request is served as usual."""
    lines = [
        "this is not json",
        json.dumps({"jsonrpc": "2.0", "id": 5, "method": 123}),
        json.dumps({"jsonrpc": "2.0", "id": 6, "method": "ping"}),
    ]
    server = subprocess.Popen([CLI, "mcp", str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert server.stdin is not None and server.stdout is not None
    out, reader = server.stdout, ThreadPoolExecutor(1)
    try:
        server.stdin.write("\n".join(lines) + "\n")
        server.stdin.flush()
        replies = [json.loads(reader.submit(out.readline).result(timeout=30)) for _ in lines]
    finally:
        server.stdin.close()
        server.wait(timeout=60)
        reader.shutdown()
    assert [(r.get("id"), r.get("error", {}).get("code")) for r in replies] == [(None, -32700), (5, -32600), (6, None)]
    assert replies[2]["result"] == {}
    assert server.returncode == 0


def test_requests_sent_just_before_the_client_closes_its_side_are_all_answered(root: Path) -> None:
    """A client that sends its requests and closes its side (a pipe) gets every answer before the
    server exits: a write's too, which landed (before, the SDK dropped the answers of requests still
    running at the end of input, /tmp/s28cli 7: 10/10 writes committed unanswered)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    hello = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    calls = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "read_file", "arguments": {"path": P}}},
    ]
    for attempt in range(2):
        # a new file, which needs no read: requests sent together may run in any order (one at a time)
        made = f"plans/new-{attempt}.md"
        write = {"name": "write_file", "arguments": {"path": made, "content": "v2\n" + "x" * 200_000}}
        server = subprocess.Popen([CLI, "mcp", str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert server.stdin is not None and server.stdout is not None
        lines = [*calls, {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": write}]
        server.stdin.write("".join(json.dumps(line) + "\n" for line in lines))
        server.stdin.close()
        out = server.stdout.read()  # to the end: the server exits once every answer is written
        assert server.wait(timeout=60) == 0
        replies = {r["id"]: r for r in map(json.loads, out.splitlines()) if "id" in r}
        assert sorted(replies) == [1, 2, 3], (attempt, out[-500:])
        assert not replies[3]["result"].get("isError"), replies[3]
        assert (root / made).read_text().startswith("v2\n")


HELLO = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}}


class Raw:
    """A `coherent-volume mcp` process spoken to a line at a time: requests sent together, cancels."""

    def __init__(self, root: Path, *args: str) -> None:
        self.p = subprocess.Popen(
            [CLI, "mcp", str(root), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.replies: dict[object, dict[str, Any]] = {}
        self.seen = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": HELLO})
        assert self.reply(0) is not None
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def _read(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            message = json.loads(line)
            with self.seen:
                self.replies[message.get("id")] = message
                self.seen.notify_all()

    def send(self, message: object) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(json.dumps(message).encode() + b"\n")
        self.p.stdin.flush()

    def call(self, id: int, tool: str, **arguments: object) -> None:
        self.send(
            {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
        )

    def cancel(self, id: int) -> None:
        self.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": id}})

    def reply(self, id: object, timeout: float = 30) -> dict[str, Any] | None:
        with self.seen:
            self.seen.wait_for(lambda: id in self.replies, timeout)
            return self.replies.get(id)

    def tool(self, id: int, timeout: float = 30) -> tuple[bool, str]:
        """(is_error, text) of tool call `id`'s reply."""
        reply = self.reply(id, timeout)
        assert reply is not None, f"no reply to {id}"
        result = reply["result"]
        return bool(result.get("isError")), "\n".join(c["text"] for c in result["content"])

    def close(self) -> tuple[int, float, str]:
        """Close the server's input: (its exit status, the seconds it took, its stderr)."""
        assert self.p.stdin is not None and self.p.stderr is not None
        start = time.monotonic()
        self.p.stdin.close()
        status = self.p.wait(90)
        return status, time.monotonic() - start, self.p.stderr.read().decode()


@contextmanager
def reads_held_back(root: Path, path: str, text: str) -> Iterator[Callable[[], None]]:
    """`path` is changed behind the volume's back (a foreign write) while another process holds the
    commit lock: a read of it waits (it must record the change, under the lock) until the function
    yielded is called, or the block ends."""
    (root / path).write_text(text)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_COMMIT_LOCK, str(root)], stdout=subprocess.PIPE, text=True
    )

    def release() -> None:
        holder.kill()
        holder.wait()

    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield release
    finally:
        release()


@contextmanager
def read_waiting(root: Path) -> Iterator[tuple[Raw, Callable[[], None]]]:
    """A session that read P at v1 and then sent a read_file of P (id 2), which waits (holding the
    session) while P was changed behind the volume's back to "v1\\nforeign\\n" and another process
    holds the commit lock (`reads_held_back`): (the session, the function that lets the read go)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = Raw(root)
    s.call(1, "read_file", path=P)
    assert not s.tool(1)[0]
    with reads_held_back(root, P, "v1\nforeign\n") as release:
        s.call(2, "read_file", path=P)
        time.sleep(0.5)  # the read waits for the lock, holding the session
        yield s, release


def test_a_write_sent_before_a_reads_reply_is_not_built_on_that_read(root: Path) -> None:
    """A model's parallel tool calls: read_file and write_file sent together, the write composed
    before the read's result existed. The read ran first and moved the view to a newer version, so
    the write, built on the older one, went through over it (/tmp/s31mcp 1, LOSS: p5, 10 of 10).
    A write is checked against what the session was sent before the write was sent."""
    with read_waiting(root) as (s, release):
        s.call(3, "write_file", path=P, content="v1\nmine\n")
        time.sleep(0.5)
        release()
        assert s.tool(2)[1].startswith("v1\nforeign\n")
        error, text = s.tool(3)
    assert error and "Refused (stale)" in text and "you read version 1, it is now version 2" in text, text
    assert (root / P).read_text() == "v1\nforeign\n"
    s.call(4, "write_file", path=P, content="v1\nforeign\nmine\n")  # sent after the read's reply came
    assert s.tool(4) == (False, f"Wrote {P}: now version 3.")
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.write(P, "v1\nforeign\nmine\nbob\n")
    s.call(5, "read_file", path=P)  # a read answered at once: the write sent next is no later
    s.call(6, "write_file", path=P, content="v1\nforeign\nmine, again\n")
    assert "bob" in s.tool(5)[1]
    error, text = s.tool(6)
    assert error and "you read version 3, it is now version 4, last written by bob" in text, text
    s.call(7, "write_file", path=P, content="v1\nforeign\nmine, again\nbob\n")
    assert s.tool(7) == (False, f"Wrote {P}: now version 5."), s.tool(7)[1][:300]
    assert s.close()[0] == 0


def test_a_stale_write_sent_with_a_read_behind_a_long_call_is_not_built_on_that_read(root: Path) -> None:
    """A model's parallel calls handed to the transport at once: read_file, a write_file of megabytes,
    and a write_file built on the version before. The third call reached the pipe only once the long
    one had drained, after the read's reply was written 50 ms after the read came, so it counted as
    built on the read and went through over bob's commit (/tmp/s31r2mcp 1, LOSS: 2 of 2 SDK runs
    with 4 and 8 MB). Here the client stops half-way through the long call, as a full pipe makes
    it: a read's reply waits until the client stopped sending mid-line no more."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = Raw(root)
    s.call(1, "read_file", path=P)
    assert not s.tool(1)[0]
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.write(P, "v1\nbob\n")
    batch = [
        ("read_file", {"path": P}),
        ("write_file", {"path": "big.txt", "content": "y" * (1 << 20)}),
        ("write_file", {"path": P, "content": "v1\nmine\n"}),
    ]
    wire = b"".join(
        json.dumps({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": n, "arguments": a}}).encode()
        + b"\n"
        for i, (n, a) in enumerate(batch, start=2)
    )
    assert s.p.stdin is not None
    s.p.stdin.write(wire[: len(wire) // 2])
    s.p.stdin.flush()
    time.sleep(0.5)  # the read is done: before, its reply was written now
    s.p.stdin.write(wire[len(wire) // 2 :])
    s.p.stdin.flush()
    assert s.tool(2)[1].startswith("v1\nbob\n")
    assert s.tool(3) == (False, "Wrote big.txt (not managed: not versioned, not checked).")
    error, text = s.tool(4)
    assert error and "Refused (stale)" in text and "you read version 1, it is now version 2" in text, text
    assert (root / P).read_text() == "v1\nbob\n"
    assert s.close()[0] == 0


def test_a_request_reusing_the_id_of_one_under_way_is_refused_and_its_read_registers_no_view(root: Path) -> None:
    """A read under id 2 waited; a stale write sent with the same id (which JSON-RPC forbids) took
    the read's place on the wire's books, so it counted as sent after the read's reply and went
    through over a foreign change (/tmp/s31r2mcp 2, LOSS). A reused id is refused, and the read it
    reused registers no view: the client cannot tell which reply under the id answered what."""
    with read_waiting(root) as (s, release):
        s.call(2, "write_file", path=P, content="v1\nmine\n")
        refusal = s.reply(2)
        assert refusal is not None and refusal["error"]["code"] == -32600, refusal
        assert "id 2 is that of a request still under way" in refusal["error"]["message"], refusal
        release()
        with s.seen:
            assert s.seen.wait_for(lambda: "result" in s.replies[2], 30)
    assert s.replies[2]["result"]["content"][0]["text"].startswith("v1\nforeign\n")
    note = s.replies[2]["result"]["content"][1]["text"]  # it said "Your view is this version" (/tmp/s32r2mcp 3)
    assert "This read registered no view (its id was reused" in note and "Your view" not in note, note
    assert (root / P).read_text() == "v1\nforeign\n"
    s.call(3, "write_file", path=P, content="v1\nforeign\nmine\n")  # built on the read with the reused id
    error, text = s.tool(3)
    assert error and "Refused (stale)" in text, text
    s.call(4, "read_file", path=P)
    assert not s.tool(4)[0]
    s.call(5, "write_file", path=P, content="v1\nforeign\nmine\n")
    assert s.tool(5) == (False, f"Wrote {P}: now version 3.")
    status, _, stderr = s.close()
    assert status == 0 and "its id was reused by another request while it ran" in stderr, stderr


def test_a_malformed_line_under_the_id_of_a_write_under_way_answers_nothing_of_it(root: Path) -> None:
    """A line the server cannot read, carrying the id of a stale write sent after a read that was
    still running: its error was taken for that write's reply, which dropped the write's place on
    the wire's books, so the write counted as built on the read and went through over a foreign
    change (/tmp/s32r2mcp 1, LOSS: 4 of 4). The error answers no request; the write is checked
    against what the session was sent before it, and refused."""
    with read_waiting(root) as (s, release):
        s.call(3, "write_file", path=P, content="v1\nmine\n")
        s.send({"jsonrpc": "2.0", "id": 3, "method": 5})
        error = s.reply(3)
        assert error is not None and error["error"]["code"] == -32600, error
        release()
        assert s.tool(2)[1].startswith("v1\nforeign\n")
        with s.seen:
            assert s.seen.wait_for(lambda: "result" in s.replies[3], 30)
    text = "\n".join(c["text"] for c in s.replies[3]["result"]["content"])
    assert s.replies[3]["result"].get("isError") and "Refused (stale)" in text, text
    assert (root / P).read_text() == "v1\nforeign\n"
    s.send({"jsonrpc": "2.0", "method": {"id": 9}})  # an id nested in a field is no id of the line
    s.send({"jsonrpc": "2.0", "id": 10, "method": "ping"})
    assert s.reply(10) is not None and s.replies[None]["error"]["code"] == -32600
    assert s.close()[0] == 0


def test_ids_are_told_apart_as_the_sdk_tells_them_and_blank_lines_get_no_reply(root: Path) -> None:
    """The SDK takes "07" for 7: a cancel naming "07" stopped write 7, which the server still
    counted as under way, so it waited a minute at the end of input (/tmp/s32r2mcp 2). A blank line
    got a parse error (5)."""
    s = Raw(root)
    with reads_held_back(root, P, "x\n") as release:
        s.call(6, "read_file", path=P)
        time.sleep(0.3)
        s.call(7, "write_file", path="plans/other.md", content="never\n")  # waits for the read
        s.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": "07"}})
        assert s.p.stdin is not None
        s.p.stdin.write(b"   \n")
        s.p.stdin.flush()
        time.sleep(0.3)
        release()
        assert not s.tool(6)[0]
    status, took, _ = s.close()
    assert status == 0 and took < 10, took
    assert not (root / "plans/other.md").exists()
    assert sorted(k for k in s.replies if k is not None) == [0, 6] and None not in s.replies, s.replies


def test_a_cancelled_read_registers_no_view_and_the_server_still_ends_at_once(root: Path) -> None:
    """A read the client cancelled is never answered, yet its view was registered: the next write,
    built on what the client last got, went through over a change it never saw (/tmp/s31mcp 2, LOSS).
    And the cancelled id stayed among those the server waited to answer at the end of input: it
    lived 60 s more, and the SDK client killed it, so an unnamed session's views stayed (5)."""
    with read_waiting(root) as (s, release):
        s.cancel(2)
        time.sleep(0.3)
        release()
        s.call(3, "write_file", path=P, content="v1\nmine\n")
        error, text = s.tool(3)
    assert error and "Refused (stale)" in text and "you read version 1, it is now version 2" in text, text
    assert s.reply(2, timeout=0) is None, "a cancelled request is not answered"
    status, took, err = s.close()
    assert status == 0 and took < 20 and "Traceback" not in err, (took, err)
    assert sql(root, "SELECT agent FROM views") == [("setup",)], "the unnamed session's views are forgotten"


def test_a_read_whose_reply_the_client_never_got_does_not_count_for_the_agent(root: Path) -> None:
    """--agent: the client died while its read waited; the reply could not be written, yet the
    view was registered, and the next connection under the name wrote over a change no client of
    it ever got (/tmp/s31mcp 3, LOSS). A view moves once the reply carrying it is written."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    first = Raw(root, "--agent", "planner")
    first.call(1, "read_file", path=P)
    assert not first.tool(1)[0]
    assert first.close()[0] == 0
    with reads_held_back(root, P, "v1\nforeign\n") as release:
        gone = subprocess.Popen(
            [CLI, "mcp", str(root), "--agent", "planner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert gone.stdin is not None and gone.stdout is not None and gone.stderr is not None
        read = {"name": "read_file", "arguments": {"path": P}}
        lines = [
            {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": HELLO},
            {"jsonrpc": "2.0", "method": "notifications/initialized"},
            {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": read},
        ]
        gone.stdin.write(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        gone.stdin.flush()
        assert json.loads(gone.stdout.readline())["id"] == 0
        time.sleep(0.5)
        gone.stdout.close()  # the client is gone before the read's reply
        release()
        gone.stdin.close()
        assert gone.wait(60) == 0
        assert "the client closed its side" in gone.stderr.read().decode()
    third = Raw(root, "--agent", "planner")
    third.call(1, "write_file", path=P, content="v1\nplanner\n")
    error, text = third.tool(1)
    assert error and "Refused (stale)" in text and "you read version 1, it is now version 2" in text, text
    assert third.close()[0] == 0
    assert (root / P).read_text() == "v1\nforeign\n"


def test_a_read_that_fails_after_reading_registers_no_view(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry fails while a part read looks up what others changed since (a transient error
    between its transactions): the model got an error and no content, yet the view had moved, and a
    whole-file write built on the older read went through (/tmp/s31mcp 4, LOSS)."""
    from coherent_volume import mcp_server

    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "".join(f"line {i}\n" for i in range(10)))
    core = open_core(root)
    session = Session(core, "model")
    session.read_file(P)
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.write(P, "BOB\n" + "".join(f"line {i}\n" for i in range(10)))

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise RegistryError("the registry at db:5432 is unreachable (connection refused)")

    monkeypatch.setattr(mcp_server, "passed_over", unreachable)
    with pytest.raises(ToolRefused, match="reading plans/plan.md failed"):
        session.read_file(P, 5, 2)
    monkeypatch.undo()
    with pytest.raises(ToolRefused, match=r"Refused \(stale\).*you read version 1, it is now version 2"):
        session.write_file(P, "".join(f"line {i}\n" for i in range(10)) + "mine\n")
    assert (root / P).read_text().startswith("BOB\n")
    core.close()


def test_a_write_the_client_cancelled_before_it_ran_is_not_written(root: Path) -> None:
    """A write_file cancelled while it waited for the session (behind a slow read) was committed
    all the same, with no reply (/tmp/s31mcp 6): it is not written. (One cancelled once it is
    committing is too late: it stands, and stderr says so.)"""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.write("plans/other.md", "other\n")
    s = Raw(root)
    s.call(1, "read_file", path=P)
    assert not s.tool(1)[0]
    with reads_held_back(root, "plans/other.md", "other, changed\n") as release:
        s.call(2, "read_file", path="plans/other.md")
        time.sleep(0.5)
        s.call(3, "write_file", path=P, content="v1\nmine\n")
        time.sleep(0.3)
        s.cancel(3)
        time.sleep(0.3)
        release()
        assert not s.tool(2)[0]
    s.call(4, "history", path=P)
    assert s.tool(4)[1].count("\nv") == 1, "no version 2"
    assert s.reply(3, timeout=0) is None and (root / P).read_text() == "v1\n"
    status, _, err = s.close()
    assert status == 0 and err == "", err


def test_a_request_holding_a_lone_surrogate_escape_is_answered_with_its_id(root: Path) -> None:
    """A string with half a character, "\\ud83d", is JSON (Python reads it; JavaScript writes it),
    which the SDK's parser refuses as no JSON: the request got a parse error with id null, and a
    client waiting for its own id waited forever (/tmp/s31mcp 7). It gets invalid params, with its
    id; a notification holding one gets nothing, as any notification; the session goes on."""
    s = Raw(root)
    write = {"name": "write_file", "arguments": {"path": P, "content": "half an emoji \ud83d"}}
    assert "\\ud83d" in json.dumps(write)
    s.send({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": write})
    s.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1, "reason": "\ud83d"}})
    s.call(8, "status")
    reply = s.reply(7)
    assert reply is not None and reply["error"]["code"] == -32602 and "lone surrogate" in reply["error"]["message"]
    assert not s.tool(8)[0]
    assert None not in s.replies and not (root / P).exists()
    assert s.close()[0] == 0


def test_loose_arguments_and_an_unnamed_sessions_name_are_refused(root: Path) -> None:
    """`offset: true` was read as 1 and `merge: "yes"` as true (pydantic's lax coercion), and
    `--agent mcp:<client>:<hex>` took a live unnamed session's name, writing on its reads and
    losing its views when it ended (/tmp/s31mcp 10, 11)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "one\ntwo\n")
    s = Raw(root)
    s.call(1, "read_file", path=P, offset=True)
    s.call(2, "read_file", path=P, offset=1.0)
    s.call(3, "write_file", path=P, content="x\n", merge="yes")
    s.call(4, "history", path=P, limit="5")
    for id in (1, 2, 3, 4):
        reply = s.reply(id)
        assert reply is not None
        assert "error" in reply or reply["result"].get("isError"), reply
    assert (root / P).read_text() == "one\ntwo\n"
    s.call(5, "read_file", path=P, offset=2, limit=1)
    assert s.tool(5)[1].startswith("two\n")
    assert s.close()[0] == 0
    r = subprocess.run(
        [CLI, "mcp", str(root), "--agent", "mcp:pytest:0123abcd"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "the sessions' own" in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("stdin", ["a file", "/dev/null"])
def test_requests_from_a_file_or_no_input_are_answered(root: Path, tmp_path: Path, stdin: str) -> None:
    """The server reads requests from a regular file or from /dev/null (`coherent-volume mcp ROOT <
    requests.jsonl`), which epoll cannot wait for: every request is answered and it exits 0 (its own
    stdio layer crashed there with PermissionError, /tmp/s31r2mcp 3; the SDK's did not)."""
    (root / "plans/a.md").write_text("one\n")
    requests = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {
            "jsonrpc": "2.0",
            "id": 2,
            "method": "tools/call",
            "params": {"name": "read_file", "arguments": {"path": "plans/a.md"}},
        },
    ]
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in requests))
    with open(source if stdin == "a file" else "/dev/null", "rb") as given:
        done = subprocess.run([CLI, "mcp", str(root)], stdin=given, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answered = [json.loads(line)["id"] for line in done.stdout.splitlines()]
    assert answered == ([1, 2] if stdin == "a file" else []), done.stdout
