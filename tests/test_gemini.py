"""Gemini CLI sessions: hook events shaped as Gemini CLI's documentation specifies
(tests/fixtures/gemini/events.json), run through `coherent-volume hook gemini` by a stand-in
Gemini CLI process, with and without a mount."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, gemini
from coherent_volume.errors import StaleWriteError

from .harness.agent_session import AgentProcess, commit_lock_held, fill, fixture, started, timed_hook, unique
from .harness.mounts import CLI, Mount
from .harness.volumes import changed_after_read, deleted_after_read

P = "plans/plan.md"
EVENTS = fixture("gemini")


class Session(AgentProcess):
    """A stand-in Gemini CLI session: its tool calls with the hooks around them."""

    def __init__(self, session: str, cwd: Path) -> None:
        super().__init__("gemini", cwd)
        self.id, self.cwd = session, cwd

    def event(self, name: str, **values: object) -> dict[str, object]:
        return fill(EVENTS[name], session=unique(self.id), cwd=self.cwd, **values)

    def read(self, path: Path) -> str:  # type: ignore[override]
        """read_file: the tool reads the file, then AfterTool gets what the model was given."""
        text = super().read(path)
        assert self.hook(self.event("after_read_file", path=path, text=text))["code"] == 0
        return text

    def begin(self) -> None:
        assert self.hook(self.event("session_start"))["code"] == 0

    def close(self) -> None:
        self.hook(self.event("session_end"))
        super().close()

    def write_file(self, path: Path, content: str) -> tuple[str, str]:
        """write_file: BeforeTool; if allowed, the write, then AfterTool. (decision, reason)."""
        verdict, reason = decision(self.hook(self.event("before_write_file", path=path, content=content)))
        if verdict == "allow":
            assert self.write(path, content)["code"] == 0
            assert self.hook(self.event("after_write_file", path=path, content=content))["code"] == 0
        return verdict, reason


def decision(answer: dict[str, object]) -> tuple[str, str]:
    """(decision, reason) of a BeforeTool answer; ("allow", "") when it printed no decision."""
    out = answer["json"]
    assert answer["code"] == 0, answer
    if not isinstance(out, dict) or "decision" not in out:
        return "allow", ""
    return str(out["decision"]), str(out["reason"])


def context(answer: dict[str, object]) -> str:
    out = answer["json"]
    return str(out["hookSpecificOutput"]["additionalContext"]) if isinstance(out, dict) else ""


def version(root: Path, rel: str = P) -> int:
    with CoherentVolume(root, agent="observer") as v:
        return v.version(rel)


@pytest.fixture
def sessions():
    yield from started(Session)


def _stale_scenario(workdir: Path, root: Path, sessions, mounted: bool) -> None:
    target = workdir / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "step 1\nstep 2\n")
    one, two = sessions("s1", workdir), sessions("s2", workdir)
    assert one.read(target) == two.read(target) == "step 1\nstep 2\n"
    assert two.write_file(target, "step 1\nstep 2 done\n") == ("allow", "")
    assert version(root) == 2

    verdict, reason = decision(one.hook(one.event("before_replace", path=target, old="step 1", new="step 1 (revised)")))
    assert verdict == "deny"
    for words in (
        "plans/plan.md",
        "(stale)",
        "version 1",
        "current version is 2",
        f"gemini:{unique('s2')}",
        "read_file",
    ):
        assert words in reason, (words, reason)
    assert "-step 2\n+step 2 done" in reason, "the diff since the session's view is in the reason"
    if mounted:  # the tool's own write is refused by the file system as well: its view is pinned
        forced = one.write(target, "forced\n")
        assert forced["code"] == 1 and forced["errno"] == errno.EACCES
    assert target.read_text() == "step 1\nstep 2 done\n"

    assert one.read(target) == "step 1\nstep 2 done\n"
    assert one.write_file(target, "step 1 (revised)\nstep 2 done\n") == ("allow", "")
    assert version(root) == 3 and target.read_text() == "step 1 (revised)\nstep 2 done\n"


def test_a_stale_write_is_denied_with_the_diff_and_a_fresh_one_allowed(root: Path, sessions) -> None:
    _stale_scenario(root, root, sessions, mounted=False)


def test_on_a_mount_the_file_system_refuses_the_stale_write_too(mounted: Mount, sessions) -> None:
    _stale_scenario(mounted.path, mounted.root, sessions, mounted=True)


def test_unread_held_and_fenced_writes_are_denied_with_what_to_do(root: Path, sessions) -> None:
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = sessions("h1", root), sessions("h2", root)
    verdict, reason = decision(one.hook(one.event("before_write_file", path=target, content="x")))
    assert verdict == "deny" and "(unread)" in reason and "Read the file with read_file first" in reason

    one.read(target)
    two.read(target)
    assert decision(one.hook(one.event("before_write_file", path=target, content="v2\n")))[0] == "allow"
    verdict, reason = decision(two.hook(two.event("before_write_file", path=target, content="other\n")))
    assert verdict == "deny" and "(held)" in reason and f"gemini:{unique('h1')} holds its write grant" in reason
    assert "Wait a few seconds" in reason
    failed = one.hook(one.event("after_write_file_failed", path=target, content="v2\n"))
    assert failed["code"] == 0, "a failed write releases the grant and records nothing"
    verdict, reason = decision(two.hook(two.event("before_write_file", path=target, content="other\n")))
    assert verdict == "allow", reason
    two.hook(two.event("after_write_file_failed", path=target, content="other\n"))
    assert version(root) == 1

    s = sessions("f1", root)
    s.read(target)
    with CoherentVolume(root, agent=f"gemini:{unique('f1')}") as same_agent, same_agent.lock(P, ttl=0.1):
        time.sleep(0.2)  # the lock() grant expires; the next look reclaims it and fences its agent
        verdict, reason = decision(s.hook(s.event("before_write_file", path=target, content="x")))
        assert verdict == "deny" and "(fenced)" in reason and "reclaimed" in reason and "read_file" in reason
        s.read(target)  # a confirmed read lifts the fence
        assert decision(s.hook(s.event("before_replace", path=target, old="v1", new="v2")))[0] == "allow"


def test_a_file_a_peer_deleted_can_be_made_again_after_read_file_found_it_gone(root: Path, sessions) -> None:
    """As for Claude Code's Read: a read_file that failed saying the file is not there showed the
    model the deletion, so its view is registered there and a write_file may make the file anew
    (before: denied `stale` for ever); one that failed for another reason registers nothing."""
    s = sessions("remake", root)
    target = deleted_after_read(root, P, s.read)
    write = s.event("before_write_file", path=target, content="made again\n")
    for error, verdict in (("File size exceeds the 20MB limit", "deny"), ("File not found.", "allow")):
        failed = s.event("after_read_file", path=target, text="")
        failed["tool_response"] = {"llmContent": "", "error": {"message": error}}
        assert s.hook(failed)["code"] == 0
        assert decision(s.hook(write))[0] == verdict, error


def test_a_partial_read_past_another_writers_change_tells_the_model_what_changed(root: Path, sessions) -> None:
    """A read of lines 10-20 registers the view at the current version, which another writer
    changed in line 1 since the session's last read: the model is told that change (its diff), so
    a whole-file write from what it knew does not drop it unnoticed (found by a hostile tester:
    the view moved silently, and the write was allowed over the peer's line)."""
    lines = [f"line {i}" for i in range(1, 31)]
    s = sessions("partly", root)
    text = "\n".join(lines) + "\n"
    target = changed_after_read(root, P, s.read, text, text.replace("line 1\n", "BOB LINE\n", 1))
    shown = "\n".join(lines[9:20])
    told = context(
        s.hook(s.event("after_read_file_range", path=target, text=shown, start=10, end=20, total=30, next=21))
    )
    assert "shown only part" in told and "+BOB LINE" in told and "written by bob" in told, told
    again = context(
        s.hook(s.event("after_read_file_range", path=target, text=shown, start=10, end=20, total=30, next=21))
    )
    assert "shown only part" not in again, "told once: its view is at that version now"


def test_a_runtime_directory_that_is_missing_leaves_the_sessions_notes_in_the_temporary_one(
    root: Path, sessions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With XDG_RUNTIME_DIR naming a directory that does not exist, the hooks kept no note of what
    the session's tools claimed: its own write_file was recorded as `external`'s and its next edit
    refused as stale (a hostile tester, /tmp/s20hk H1). Its notes go to the temporary directory."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "one\n")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "missing"))
    s = sessions("no-runtime-dir", root)
    s.read(root / P)
    assert s.write_file(root / P, "two\n")[0] == "allow"
    with CoherentVolume(root, agent="observer") as v:
        assert [e.writer for e in v.history(P)][0] == f"gemini:{unique('no-runtime-dir')}"


def test_views_are_what_the_model_was_given(root: Path, sessions) -> None:
    lines = [f"line {i}" for i in range(1, 31)]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "\n".join(lines) + "\n")
        setup.write("plans/other.md", "other\n")
    s = sessions("v1", root)
    target = root / P
    s.hook(s.event("after_read_file", path=target, text="an older text\n"))
    assert decision(s.hook(s.event("before_write_file", path=target, content="x")))[0] == "deny", (
        "content the file does not hold registers no view"
    )
    shown = "\n".join(lines[9:20])  # lines 10-20, with a line cut as read_file cuts long lines
    shown = shown.replace("line 15", "line... [truncated]")
    s.hook(s.event("after_read_file_range", path=target, text=shown, start=10, end=20, total=30, next=21))
    assert decision(s.hook(s.event("before_write_file", path=target, content="x")))[0] == "allow"
    s.hook(s.event("after_write_file_failed", path=target, content="x"))

    parts = [f"--- {root / 'plans/other.md'} ---\n\nother\n\n\n", "\n--- End of content ---"]
    s.hook(s.event("after_read_many_files", parts=parts))
    other = root / "plans/other.md"
    assert decision(s.hook(s.event("before_write_file", path=other, content="x")))[0] == "allow"


def test_a_file_with_a_byte_order_mark_is_read_as_gemini_cli_decodes_it(root: Path, sessions) -> None:
    """read_file strips a BOM and decodes UTF-16/32 by it (gemini-cli fileUtils.ts
    readFileWithEncoding), so the view is matched against the file decoded so (before, against its
    bytes as UTF-8: no view, and every write refused `unread` however often it was read:
    /tmp/s32hookgc 3)."""
    files = {
        "plans/bom8.md": b"\xef\xbb\xbfhello\nworld\n",
        "plans/u16le.md": "\ufeffhello\nworld\n".encode("utf-16-le"),
        "plans/u16be.md": "\ufeffhello\nworld\n".encode("utf-16-be"),
        "plans/u32le.md": "\ufeffhello\nworld\n".encode("utf-32-le"),
    }
    with CoherentVolume(root, agent="setup") as setup:
        for rel, data in files.items():
            setup.write(rel, data)
    s = sessions("bom", root)
    for rel in files:
        s.hook(s.event("after_read_file", path=root / rel, text="hello\nworld\n"))
        edit = s.event("before_replace", path=root / rel, old="hello", new="bye")
        assert decision(s.hook(edit)) == ("allow", ""), rel
        s.hook({**edit, "hook_event_name": "AfterTool", "tool_response": {"llmContent": "", "error": "x"}})
    other = sessions("bom-other", root)
    other.hook(other.event("after_read_file", path=root / "plans/bom8.md", text="\ufeffhello\nworld\n"))
    edit = other.event("before_replace", path=root / "plans/bom8.md", old="hello", new="bye")
    verdict, reason = decision(other.hook(edit))
    assert verdict == "deny" and "(unread)" in reason, "read_file never shows the BOM as a character"


def test_a_file_read_file_takes_for_binary_is_refused_saying_what_to_do_instead_of_reading(
    root: Path, sessions
) -> None:
    """A managed file holding a NUL byte: read_file answers "Cannot display content of binary file",
    which gives no view, and every write was refused `unread` telling the model to read the file
    with read_file first, which can never help (/tmp/s32r2hooks 7). The refusal says why no read
    gives a view and what to do instead; a UTF-16 file (NULs, but a BOM) is text to it."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, b"title\x00\nbody\n")
        setup.write("plans/u16.md", "\ufeffhello\n".encode("utf-16-le"))
    s = sessions("binary", root)
    s.hook(s.event("after_read_file", path=root / P, text=f"Cannot display content of binary file: {P}"))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content="title\nbody\n")))
    assert verdict == "deny" and "(unread)" in reason, reason
    assert "it holds a NUL byte, which Gemini CLI's read_file takes for a binary file" in reason, reason
    assert "leave it as it is, or ask the user to change it" in reason and "with read_file first" not in reason
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / "plans/u16.md", content="x\n")))
    assert verdict == "deny" and "Read the file with read_file first" in reason, reason


@pytest.mark.parametrize(
    ("older", "newer", "text"),
    [
        (b"\xef\xbb\xbf\xef\xbb\xbfhello plan\n", b"\xef\xbb\xbfhello plan\n", "\ufeffhello plan\n"),
        (b"\x80\x80-N\x87e", b"\xff\xfe-N\x87e", "\ufffd\ufffd-N\ufffde"),
    ],
    ids=["doubled mark removed", "UTF-16 over bytes that are not UTF-8"],
)
def test_a_file_with_a_byte_order_mark_is_never_matched_as_plain_utf8(
    root: Path, sessions, older: bytes, newer: bytes, text: str
) -> None:
    """read_file decodes a file beginning with a BOM by it, never as plain UTF-8: a read that raced a
    peer's commit is not a view of the peer's version because that version's UTF-8 decoding is what
    the read showed of the older one (before, it was, and a write_file over it went ahead:
    /tmp/s32r2hooks 2)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, older)
        setup.write(P, newer)
    s = sessions("bom-race", root)
    s.hook(s.event("after_read_file", path=root / P, text=text))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content=text + "more\n")))
    assert verdict == "deny" and "you last saw version 1" in reason, reason


def test_a_read_that_raced_a_final_newline_is_a_view_of_the_version_it_showed(root: Path, sessions) -> None:
    """read_file keeps a file's final newline, so a read showing "a\\nb" while a peer's commit made it
    "a\\nb\\n" before AfterTool ran is a view of the older version, which it shows exactly, not of the
    current one, which it shows only loosely: the write is refused stale (before, the view landed on
    the peer's version and a write_file over it went ahead: /tmp/s32hookgc 4)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb")
        setup.write(P, "a\nb\n")
    s = sessions("race-newline", root)
    s.hook(s.event("after_read_file", path=root / P, text="a\nb"))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content="a\nb\nc\n")))
    assert verdict == "deny" and "(stale): you last saw version 1" in reason, reason
    s.hook(s.event("after_read_file", path=root / P, text="a\nb\n"))
    assert decision(s.hook(s.event("before_write_file", path=root / P, content="a\nb\nc\n")))[0] == "allow"


@pytest.mark.parametrize("case", ["re-read", "hook run twice"])
def test_a_read_racing_a_final_newline_never_puts_the_view_on_the_newer_version(
    root: Path, sessions, case: str
) -> None:
    """A read showing "a\\nb" that raced a peer's "a\\nb\\n" leaves the view at the older version even
    where it is there already: a re-read (the model had read it before) or our hook run twice for one
    event (installed twice). The write is refused stale, and the next read, showing the current
    version exactly, moves the view there (before, the view already at the older version made the
    hook take the loose match of the current one, and the write_file over it went ahead:
    /tmp/s32r2hooks 1)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb")
    s = sessions(f"race-{case.replace(' ', '-')}", root)
    if case == "re-read":
        s.hook(s.event("after_read_file", path=root / P, text="a\nb"))
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb\n")
    for _ in range(2 if case == "hook run twice" else 1):
        s.hook(s.event("after_read_file", path=root / P, text="a\nb"))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content="a\nb\nc\n")))
    assert verdict == "deny" and "(stale): you last saw version 1" in reason, reason
    s.hook(s.event("after_read_file", path=root / P, text="a\nb\n"))
    assert decision(s.hook(s.event("before_write_file", path=root / P, content="a\nb\nc\n")))[0] == "allow"


def test_a_whole_part_of_read_many_files_is_matched_exactly(root: Path, sessions) -> None:
    """read_many_files cuts lines only in a part it says was truncated, so a whole part whose line
    ends in the cut marker is that line as it is: a peer's change of it made between the read and
    its AfterTool registers no view of the peer's version (before, the marker matched the changed
    line, the view moved to the peer's version and a write built on the old text went ahead,
    dropping the change: /tmp/s30hooks 5)."""
    old = "status: see log... [truncated]\nrest\n"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, old)
    s = sessions("many-exact", root)
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(P)
        peer.write(P, "status: see log -- ship on friday\nrest\n")
    parts = [f"--- {root / P} ---\n\n{old}\n\n", "\n--- End of content ---"]
    s.hook(s.event("after_read_many_files", parts=parts))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content=old + "mine\n")))
    assert verdict == "deny" and "(stale): you last saw version 1" in reason, reason
    assert (root / P).read_text() == "status: see log -- ship on friday\nrest\n"


def test_a_whole_part_of_read_many_files_that_raced_a_final_newline_is_a_view_of_the_version_it_showed(
    root: Path, sessions
) -> None:
    """A whole part of read_many_files holds the file as read_file shows it (final newline kept), so a
    part showing "a\\nb" while a peer's commit made it "a\\nb\\n" before AfterTool ran is a view of
    the older version, as for read_file (before, read_many_files had no exact match, the view landed
    on the peer's version and a write_file over it went ahead: /tmp/s32r2hooks 3)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb")
        setup.write(P, "a\nb\n")
    s = sessions("many-race", root)
    s.hook(s.event("after_read_many_files", parts=[f"--- {root / P} ---\n\na\nb\n\n", "\n--- End of content ---"]))
    verdict, reason = decision(s.hook(s.event("before_write_file", path=root / P, content="a\nb\nc\n")))
    assert verdict == "deny" and "(stale): you last saw version 1" in reason, reason


def test_a_file_quoting_the_project_context_marker_gets_a_view(root: Path, sessions) -> None:
    """A managed file whose own text holds read_file's project-context marker is read whole, with or
    without a context block appended after it (before, the text was cut at the marker's first
    occurrence, matched nothing, and every write was refused `unread`: /tmp/s32r2hooks 6)."""
    text = f"notes{gemini.PROJECT_CONTEXT}quoted from a session\n"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, text)
    for n, shown in enumerate([text, f"{text}{gemini.PROJECT_CONTEXT}context of GEMINI.md\n"]):
        s = sessions(f"marker{n}", root)
        s.hook(s.event("after_read_file", path=root / P, text=shown))
        edit = s.event("before_replace", path=root / P, old="notes", new="notes 2")
        assert decision(s.hook(edit)) == ("allow", ""), shown
        s.hook({**edit, "hook_event_name": "AfterTool", "tool_response": {"llmContent": "", "error": "x"}})


def _replaced(s: Session, target: Path, old: str, new: str, result: str, meanwhile: str = "") -> str:
    """A replace: BeforeTool, the tool writing `result` (what Gemini CLI made of the edit), a program
    outside the hooks appending `meanwhile`, then AfterTool; what the model is told after it."""
    edit = s.event("before_replace", path=target, old=old, new=new)
    assert decision(s.hook(edit)) == ("allow", "")
    assert s.write(target, result)["code"] == 0
    if meanwhile:
        with target.open("a") as f:
            f.write(meanwhile)
    after = {**edit, "hook_event_name": "AfterTool", "tool_response": {"llmContent": "Successfully modified file."}}
    return context(s.hook(after))


def test_a_replace_another_writer_changes_before_its_end_is_theirs_and_the_model_told(root: Path, sessions) -> None:
    """A program outside the hooks appends a line while a replace holds the file: at AfterTool the
    file holds a line the edit does not, so that change is recorded as `external`'s, the session's
    view stays at what it read, the model is told, and its next write_file is refused until it reads
    again (before, the file was taken for the session's and its next write_file dropped the line)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "step 1\nstep 2\n")
    target = root / P
    s = sessions("g1", root)
    s.read(target)
    told = _replaced(s, target, "step 1", "step 1 done", "step 1 done\nstep 2\n", meanwhile="a script's line\n")
    assert "does not hold what your tool just wrote" in told, told
    s.read(target)
    told = _replaced(s, target, "step 2", "step 2\n}", "step 1 done\nstep 2\n}\na script's line\n", meanwhile="}\n")
    assert "does not hold what your tool just wrote" in told, "a line the new string holds too, added meanwhile"
    with CoherentVolume(root, agent="observer") as v:
        assert v.history(P)[0].writer == "external"
    assert s.write_file(target, "step 1 done\nstep 2\nstep 3\n")[0] == "deny"
    assert target.read_text() == "step 1 done\nstep 2\n}\na script's line\n}\n"


def test_a_program_turning_one_replace_result_into_another_is_not_taken_for_the_tool(root: Path, sessions) -> None:
    """Gemini CLI may replace one occurrence of old_string or every one, so either result passes
    its end-of-tool check, but neither is exactly the tool's: a program that turns one into the
    other meanwhile, seen by another agent's read, stays `external`'s (never relabelled the
    session's write)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "TODO a\nTODO b\n")
    target = root / P
    s = sessions("g-two", root)
    s.read(target)
    edit = s.event("before_replace", path=target, old="TODO", new="DONE")
    assert decision(s.hook(edit)) == ("allow", "")
    assert s.write(target, "DONE a\nTODO b\n")["code"] == 0  # Gemini replaced one occurrence
    target.write_text("DONE a\nDONE b\n")  # a program does the other meanwhile
    with CoherentVolume(root, agent="reader") as reader:
        reader.read(P)
    after = {**edit, "hook_event_name": "AfterTool", "tool_response": {"llmContent": "Successfully modified file."}}
    s.hook(after)
    with CoherentVolume(root, agent="observer") as v:
        assert [(e.version, e.writer) for e in v.history(P)][0] == (2, "external")


@pytest.mark.parametrize(
    ("old", "new", "result"),
    [
        ("step 1", "step 1 done", "  step 1 done\nstep 2\n"),
        ("  step 1", "  step 1\\n  step 1b", "  step 1\n  step 1b\nstep 2\n"),
        ("step 2\n", "", "  step 1\n"),
        ("ste", "STE", "  STEp 1\nSTEp 2\n"),
        ("step 1\nstep", "step 1\n  STEP", "  step 1\n  STEP 2\n"),
        ("step  1", "step one", "  step one\nstep 2\n"),
        ("step", "STEP", "  STEP 1\nstep 2\n"),
    ],
    ids=[
        "re-indented",
        "escapes-undone",
        "line-taken-out",
        "within-lines",
        "across-lines",
        "spaces-differ",
        "one-of-two",
    ],
)
def test_a_replace_gemini_cli_corrected_is_the_sessions_own_and_nothing_is_told(
    root: Path, sessions, old: str, new: str, result: str
) -> None:
    """Gemini CLI replaces every occurrence of old_string, within lines or across them, and may
    correct a replace before making it (matched regardless of spaces and re-indented, a `\\n`
    written for a line end undone): such a file is the session's own version, and nothing is told."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "  step 1\nstep 2\n")
    target = root / P
    s = sessions("g2", root)
    s.read(target)
    assert _replaced(s, target, old, new, result) == ""
    with CoherentVolume(root, agent="observer") as v:
        assert v.history(P)[0].writer == f"gemini:{unique('g2')}"
    assert s.write_file(target, "next\n") == ("allow", "")


@pytest.mark.parametrize(
    ("before", "old", "new", "result"),
    [
        ("x=1\ny\nx = 1\n", "x=1", "x=2", "x=2\ny\nx = 2\n"),  # the other occurrence changed too
        ("if a:\n    b\nc\n", "b", "B", "if a:\n    B\n    c\n"),  # a line moved into the block
    ],
    ids=["another-occurrence", "indentation"],
)
def test_a_replace_whose_file_holds_another_change_is_told(
    root: Path, sessions, before: str, old: str, new: str, result: str
) -> None:
    """A change beside a replace's own, by another writer before AfterTool, is not taken for the
    session's: not a second occurrence of the old string that looks alike without its spaces, nor a
    change of indentation where the old string occurs as written (in Python, that is a change)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, before)
    target = root / P
    s = sessions("g3", root)
    s.read(target)
    assert "does not hold what your tool just wrote" in _replaced(s, target, old, new, result)


def test_a_write_file_is_checked_at_its_end_allowing_for_escapes_gemini_cli_undoes(root: Path, sessions) -> None:
    """A write_file whose content Gemini CLI unescaped before writing it (`\\n` for a line end) is the
    session's own version; one a program outside the hooks appended to before AfterTool is
    recorded as `external`'s and the model told."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    target = root / P
    s = sessions("gw", root)
    s.read(target)
    for content, written, meanwhile in (("v2\\nmore\\n", "v2\nmore\n", ""), ("v3\n", "v3\n", "appended\n")):
        assert decision(s.hook(s.event("before_write_file", path=target, content=content))) == ("allow", "")
        assert s.write(target, written + meanwhile)["code"] == 0
        told = context(s.hook(s.event("after_write_file", path=target, content=content)))
        assert ("does not hold what your tool just wrote" in told) == bool(meanwhile), told
    with CoherentVolume(root, agent="observer") as v:
        assert [h.writer for h in v.history(P)] == ["external", f"gemini:{unique('gw')}", "setup"]


def test_two_tools_of_one_session_at_once_keep_the_file_held_until_both_ended(root: Path, sessions) -> None:
    """Gemini CLI names no tool call in its events: two shell commands of one session at once on the
    plan each count as a claim of it, so the first one's end leaves the grant the second relies on,
    and another writer is refused until the second one ended too."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("two-tools", root)
    s.read(root / P)
    first, second = f"sed -i s/v1/v2/ {P}", f"cat > {P} <<'EOF'\nrewritten\nEOF"
    assert decision(s.hook(s.event("before_shell", command=first)))[0] == "allow"
    assert decision(s.hook(s.event("before_shell", command=second)))[0] == "allow"
    assert s.run("bash", "-c", first)["code"] == 0
    assert s.hook(s.event("after_shell", command=first))["code"] == 0

    def foreign_write() -> str:
        with CoherentVolume(root, agent="other") as other:
            other.read(P)
            try:
                other.write(P, "the other's change\n")
            except StaleWriteError as refused:
                return refused.reason
            return "accepted"

    assert foreign_write() == "held", "the second tool still holds the plan"
    assert s.run("bash", "-c", second)["code"] == 0
    after = s.hook(s.event("after_shell", command=second))
    assert after["code"] == 0 and "went over" not in after["stdout"], after
    with CoherentVolume(root, agent="observer") as v:
        assert [h.writer for h in v.history(P)] == [f"gemini:{unique('two-tools')}"] * 2 + ["setup"]
    assert (root / P).read_text() == "rewritten\n"
    assert foreign_write() == "accepted", "the grant ends with the last tool"


def test_shell_commands_writing_managed_files_are_checked(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.write("plans/log.md", "entry 1\n")
    s = sessions("sh", root)
    verdict, reason = decision(s.hook(s.event("before_shell", command=f"sed -i 's/v1/v2/' {P} 2>/dev/null")))
    assert verdict == "deny" and "(unread)" in reason and P in reason
    verdict, reason = decision(s.hook(s.event("before_shell", command=f"cat > {P} <<'EOF'\nv2 > v1\nEOF")))
    assert verdict == "deny" and "(unread)" in reason
    for harmless in (f"cat {P} | wc -l", "echo entry 2 >> plans/log.md", "echo x > notes.txt"):
        assert decision(s.hook(s.event("before_shell", command=harmless)))[0] == "allow", harmless
    s.hook(s.event("after_shell", command="echo entry 2 >> plans/log.md"))

    s.read(root / P)
    command = f"echo v2 > {P}"
    assert decision(s.hook(s.event("before_shell", command=command)))[0] == "allow"
    assert s.write(root / P, "v2\n")["code"] == 0  # what the command does
    s.hook(s.event("after_shell", command=command))
    with CoherentVolume(root, agent="observer") as v:
        assert v.version(P) == 2 and v.history(P)[0].writer == f"gemini:{unique('sh')}"


def test_a_shell_command_run_in_the_background_writing_a_managed_file_is_denied_off_a_mount(
    root: Path, sessions
) -> None:
    """run_shell_command with `is_background` returns once the command is in the background, so
    AfterTool (which ends the check's grant) comes before its writes: one that writes a managed
    file is denied, as Claude Code's `run_in_background` is, and holds nothing after. Before, it
    was allowed, and its write landed over a peer's commit made after AfterTool."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s, peer = sessions("bg", root), sessions("bg-peer", root)
    s.read(root / P)
    peer.read(root / P)
    event = s.event("before_shell", command=f"sleep 4; echo v2 > {P}")
    event["tool_input"]["is_background"] = True  # type: ignore[index]
    verdict, reason = decision(s.hook(event))
    assert verdict == "deny" and "runs in the background" in reason and "in the foreground" in reason, reason
    command = f"echo peer > {P}"
    assert decision(peer.hook(peer.event("before_shell", command=command)))[0] == "allow", "nothing is held"
    peer.hook(peer.event("after_shell", command=command))


def test_an_awk_of_any_implementation_writing_a_managed_file_is_checked(root: Path, sessions) -> None:
    """`print > FILE` in the program of mawk (Debian's default awk), nawk or original-awk writes FILE
    as gawk's does: unread, denied; after the session read it, allowed and recorded as its version."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    (root / "notes.txt").write_text("n\n")
    s = sessions("awk", root)
    for awk in ("mawk", "nawk", "original-awk", "/usr/bin/mawk -W interactive"):
        command = f'{awk} \'{{ print "v2" > "{P}" }}\' notes.txt'
        verdict, reason = decision(s.hook(s.event("before_shell", command=command)))
        assert verdict == "deny" and f"{P} (unread)" in reason, (command, reason)
    s.read(root / P)
    command = f'mawk \'{{ print "v2" > "{P}" }}\' notes.txt'
    assert decision(s.hook(s.event("before_shell", command=command)))[0] == "allow"
    assert s.run("bash", "-c", command)["code"] == 0 and (root / P).read_text() == "v2\n"
    s.hook(s.event("after_shell", command=command))
    with CoherentVolume(root, agent="observer") as v:
        assert v.version(P) == 2 and v.history(P)[0].writer == f"gemini:{unique('awk')}"


def test_a_find_that_deletes_managed_files_is_checked_like_any_deletion(root: Path, sessions) -> None:
    """`find . -name '*.md' -delete` deletes every managed file it matches: each is a deletion the
    protocol checks (refused `unread` until the session read it; a `*.pyc` clean-up is let be),
    then, once read, it runs and its deletions are the session's versions. A find whose files are
    known only when it runs (-L follows symlinks) is refused, saying why and what to run instead."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    (root / "src").mkdir()
    (root / "src/a.pyc").write_text("bytecode")
    s = sessions("find", root)
    command = "find . -name '*.md' -delete"
    verdict, reason = decision(s.hook(s.event("before_shell", command=command)))
    assert verdict == "deny" and "(unread)" in reason and P in reason, reason
    assert decision(s.hook(s.event("before_shell", command="find . -name '*.pyc' -delete")))[0] == "allow"
    verdict, reason = decision(s.hook(s.event("before_shell", command="find -L . -name '*.md' -delete")))
    assert verdict == "deny" and "it follows symlinks (-L, -follow)" in reason, reason
    assert "Run the same find with -print instead of -delete to list them" in reason, reason

    s.read(root / P)
    assert decision(s.hook(s.event("before_shell", command=command)))[0] == "allow"
    assert s.run("sh", "-c", command)["code"] == 0  # what the command does (from the session's directory)
    s.hook(s.event("after_shell", command=command))
    assert not (root / P).exists() and (root / "src/a.pyc").exists()
    with CoherentVolume(root, agent="observer") as v:
        [deletion, _] = v.history(P)
        assert (deletion.version, deletion.writer, deletion.hash) == (2, f"gemini:{unique('find')}", None)


def test_stale_views_are_named_before_the_next_turn_and_after_tools(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "alpha\nbeta\n")
    s = sessions("w1", root)
    s.read(root / P)
    assert context(s.hook(s.event("before_agent"))) == "", "nothing is stale yet"
    with CoherentVolume(root, agent="rival") as rival:
        rival.read_text(P)
        rival.write(P, "alpha\nbeta, revised\n")
    told = context(s.hook(s.event("before_agent")))
    for words in (P, "last saw version 1", "now version 2", "rival", "-beta\n+beta, revised"):
        assert words in told, (words, told)
    told = context(s.hook(s.event("after_shell", command="ls")))
    assert P in told and "rival" in told
    s.read(root / P)
    assert context(s.hook(s.event("before_agent"))) == ""


def test_session_end_releases_the_sessions_grants(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("e1", root)
    s.read(root / P)
    assert decision(s.hook(s.event("before_write_file", path=root / P, content="x")))[0] == "allow"
    with CoherentVolume(root, agent="other") as other:
        other.read_text(P)
        with pytest.raises(PermissionError):
            other.write(P, "blocked")
        s.hook(s.event("session_end"))
        assert other.write(P, "free again") == 2


# ---- merge globs ----------------------------------------------------------------------

LOG, BLOB = "plans/log.md", "plans/data.bin"


def _merge_volume(root: Path, text: str) -> Path:
    """`root` with LOG and BLOB merge globs, LOG and P holding `text` (version 1)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(replace(setup.policy, merge=(LOG, BLOB)))
        setup.write(LOG, text)
        setup.write(P, text)
    return root / LOG


def test_a_stale_write_of_a_merge_file_is_merged_and_shown_never_committed(root: Path, sessions) -> None:
    """Gemini CLI's events do not say whether it asks the user before a write, so a clean merge of
    a stale write_file or replace is shown to the model with the tool denied, and nothing is
    written; overlapping changes and an edit that does not apply are denied saying why."""
    target = _merge_volume(root, "alpha\nbeta\ngamma\n")
    one, two = sessions("g1", root), sessions("g2", root)
    one.read(target)
    two.read(target)
    assert two.write_file(target, "ALPHA\nbeta\ngamma\n") == ("allow", "")

    verdict, reason = decision(one.hook(one.event("before_write_file", path=target, content="alpha\nbeta\nGAMMA\n")))
    assert verdict == "deny" and "(stale)" in reason and "merges cleanly with version 2" in reason, reason
    assert "approval mode" in reason and "wrote nothing" in reason and "-gamma\n+GAMMA\n" in reason
    assert reason.endswith("Read the file again with read_file, then redo your change from its current content.")
    verdict, reason = decision(one.hook(one.event("before_replace", path=target, old="gamma", new="GAMMA")))
    assert verdict == "deny" and "merges cleanly with version 2" in reason and "-gamma\n+GAMMA\n" in reason

    twice = one.event("before_replace", path=target, old="beta", new="BETA")
    twice["tool_input"]["expected_replacements"] = 2
    verdict, reason = decision(one.hook(twice))
    assert verdict == "deny" and "It was not merged: your edit does not apply to the version you read" in reason
    verdict, reason = decision(one.hook(one.event("before_write_file", path=target, content="alpha 1\nbeta\ngamma\n")))
    assert verdict == "deny" and "(stale)" in reason and "1 conflicting hunk(s)" in reason
    assert "<<<<<<< yours\nalpha 1\n||||||| base\nalpha\n=======\nALPHA\n>>>>>>> current" in reason
    with CoherentVolume(root, agent="observer") as v:
        assert [h.version for h in v.history(LOG)] == [2, 1] and target.read_text() == "ALPHA\nbeta\ngamma\n"


def test_binary_and_non_merge_files_are_denied_as_before(root: Path, sessions) -> None:
    """A stale write of a file no merge glob names, or of binary content, is denied as stale with
    nothing merged or written."""
    _merge_volume(root, "alpha\nbeta\n")
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(BLOB, b"\0\1 binary\n")
    one = sessions("b1", root)
    one.read(root / P)
    with CoherentVolume(root, agent=f"gemini:{unique('b1')}") as same_agent:
        same_agent.read(BLOB)
    with CoherentVolume(root, agent="rival") as rival:
        rival.read(P)
        rival.read(BLOB)
        rival.write(P, "ALPHA\nbeta\n")
        rival.write(BLOB, b"\0\2 binary\n")
    verdict, reason = decision(one.hook(one.event("before_replace", path=root / P, old="beta", new="BETA")))
    assert verdict == "deny" and "(stale)" in reason and "merge" not in reason, reason
    verdict, reason = decision(one.hook(one.event("before_write_file", path=root / BLOB, content="text\n")))
    assert verdict == "deny" and "(stale)" in reason and "It was not merged: binary content is never merged" in reason
    with CoherentVolume(root, agent="observer") as v:
        assert v.version(P) == v.version(BLOB) == 2


_hook = partial(timed_hook, "gemini")


def _ev(name: str, cwd: Path, **values: object) -> dict[str, object]:
    return fill(EVENTS[name], session=unique("closed"), cwd=cwd, **values)


def test_fails_closed_for_managed_paths_when_it_cannot_decide(root: Path, tmp_path: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    with commit_lock_held(root):
        r, took = _hook(_ev("before_write_file", root, path=root / P, content="x"))
        out = json.loads(r.stdout)
        assert r.returncode == 0 and out["decision"] == "deny", r.stderr
        assert "could not check this write" in out["reason"] and "did not finish in time" in out["reason"]
        assert f"coherent-volume why {root / P}" in out["reason"]
        assert took < gemini.hooks.HOOK_TIMEOUT, f"answered after {took:.1f} s: Gemini CLI would have run the tool"
        r, _ = _hook(_ev("before_write_file", root, path=tmp_path / "elsewhere.md", content="x"))
        assert r.returncode == 0 and r.stdout == "", "a path in no volume is not held up"
        r, _ = _hook(_ev("after_read_file", root, path=root / P, text="v1\n"))
        assert r.returncode == 0 and r.stdout == "" and "no view was registered" in r.stderr

    (root / ".coherent/registry.db").write_bytes(b"not a database" * 100)
    r, _ = _hook(_ev("before_write_file", root, path=root / P, content="x"))
    out = json.loads(r.stdout)
    assert out["decision"] == "deny" and "RegistryError" in out["reason"]
    no_session = _ev("before_write_file", root, path=root / "plans/new.md", content="x")
    no_session["session_id"] = ""
    assert json.loads(_hook(no_session)[0].stdout)["decision"] == "deny", "an unattributable write is refused"
    for payload in ("not json", "[]"):
        r, _ = _hook(payload)
        assert r.returncode == 0 and r.stdout == "" and "coherent-volume" in r.stderr


def test_install_and_uninstall_are_idempotent_and_keep_other_settings(tmp_path: Path) -> None:
    settings = tmp_path / "proj/.gemini/settings.json"
    settings.parent.mkdir(parents=True)
    mine = {"type": "command", "command": "echo mine"}
    original = {"model": {"name": "gemini-2.5-pro"}, "hooks": {"BeforeTool": [{"matcher": "glob", "hooks": [mine]}]}}
    settings.write_text(json.dumps(original))
    r = subprocess.run([CLI, "gemini", "install", str(tmp_path / "proj")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = json.loads(settings.read_text())
    assert installed["model"] == original["model"] and installed["hooks"]["BeforeTool"][0]["hooks"] == [mine]
    assert set(installed["hooks"]) == {"BeforeTool", "AfterTool", "BeforeAgent", "SessionStart", "SessionEnd"}
    ours = installed["hooks"]["BeforeTool"][1]
    assert ours["matcher"] == "^(write_file|replace|run_shell_command)$"
    assert ours["hooks"][0]["timeout"] == 5000 and ours["hooks"][0]["command"].endswith("coherent-volume hook gemini")
    assert "read_many_files" in installed["hooks"]["AfterTool"][0]["matcher"]
    subprocess.run([CLI, "gemini", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == installed, "install is idempotent"
    for _ in range(2):
        subprocess.run([CLI, "gemini", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
        assert json.loads(settings.read_text()) == original
    for text, why in (
        ("{broken", "Expecting property name"),
        ('{"model": "x" // mine\n}', "comments, which some agents allow"),  # Gemini CLI strips comments
        ('{"x": 1e400}', "the number 1e400 is too large to be written back"),  # (was written back as Infinity)
        ('{"x": NaN}', "NaN is not JSON"),
    ):
        settings.write_text(text)
        r = subprocess.run([CLI, "gemini", "install", str(tmp_path / "proj")], capture_output=True, text=True)
        assert r.returncode == 1 and "is not plain JSON" in r.stderr and why in r.stderr, r.stderr
        assert settings.read_text() == text
    settings.write_text('{"title": "Plän ✓"}')  # non-ASCII stays as it is, not \uXXXX
    subprocess.run([CLI, "gemini", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert '"title": "Plän ✓"' in settings.read_text(encoding="utf-8")


def test_install_writes_the_cli_of_the_installation_that_ran_it(tmp_path: Path) -> None:
    """Another `coherent-volume` earlier on PATH (an older or stray one) is not what the hooks run:
    they run the CLI that ran install (before, the first on PATH: /tmp/s32r2hooks 5)."""
    stray = tmp_path / "otherbin"
    stray.mkdir()
    (stray / "coherent-volume").write_text("#!/bin/sh\nexit 1\n")
    (stray / "coherent-volume").chmod(0o755)
    proj = tmp_path / "proj"
    proj.mkdir()
    env = {**os.environ, "PATH": f"{stray}:{os.environ.get('PATH', '')}"}
    subprocess.run([CLI, "gemini", "install", str(proj)], check=True, env=env, capture_output=True)
    hooks = json.loads((proj / ".gemini/settings.json").read_text())["hooks"]
    commands = {h["command"] for entries in hooks.values() for e in entries for h in e["hooks"]}
    assert commands == {f"{CLI} hook gemini"}, commands


def test_install_and_uninstall_keep_the_users_own_hooks(tmp_path: Path) -> None:
    """A user's hook whose command merely mentions "hook gemini", and a user's hook put into the group
    install made, survive install, a second install and uninstall; only our own hook goes (before,
    every entry whose command contained "hook gemini" was dropped whole: /tmp/s32hookgc 2)."""
    settings = tmp_path / ".gemini/settings.json"
    settings.parent.mkdir(parents=True)
    scan = {"type": "command", "command": "/opt/secscan/pre-write-hook gemini --block-secrets"}
    settings.write_text(json.dumps({"hooks": {"BeforeTool": [{"matcher": "write_file", "hooks": [scan]}]}}))
    gemini.FACE.install(settings)
    installed = json.loads(settings.read_text())
    assert installed["hooks"]["BeforeTool"][0] == {"matcher": "write_file", "hooks": [scan]}
    guard = {"type": "command", "command": "my-own-guard"}
    installed["hooks"]["BeforeTool"][1]["hooks"].append(guard)
    settings.write_text(json.dumps(installed))
    gemini.FACE.install(settings)
    again = json.loads(settings.read_text())
    assert [e["hooks"] for e in again["hooks"]["BeforeTool"][:2]] == [[scan], [guard]]
    assert again["hooks"]["BeforeTool"][2] == installed["hooks"]["BeforeTool"][1] | {
        "hooks": installed["hooks"]["BeforeTool"][1]["hooks"][:1]
    }
    gemini.FACE.uninstall(settings)
    left = json.loads(settings.read_text())["hooks"]
    assert left == {"BeforeTool": [{"matcher": "write_file", "hooks": [scan]}, again["hooks"]["BeforeTool"][1]]}
    # the user's own empty list of an event install adds nothing to stays (before, uninstall removed
    # it: /tmp/s32r2hooks 8; one install adds to, emptied, cannot be told from one install made)
    settings.write_text(json.dumps({"hooks": {"Notification": []}}))
    gemini.FACE.install(settings)
    gemini.FACE.uninstall(settings)
    assert json.loads(settings.read_text()) == {"hooks": {"Notification": []}}


def test_a_shell_command_over_a_peers_commit_is_denied(root: Path, sessions) -> None:
    """The stale session's `sed -i plans/*.md` (a glob: the real plan.md is among its files) is
    denied; a write whose file only a variable names, in the volume, is denied saying so."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = sessions("g1", root), sessions("g2", root)
    one.read(root / P)
    two.read(root / P)
    assert two.write_file(root / P, "v2\n")[0] == "allow"
    verdict, reason = decision(one.hook(one.event("before_shell", command="sed -i s/v1/v3/ plans/*.md")))
    assert verdict == "deny" and "(stale)" in reason and P in reason and f"gemini:{unique('g2')}" in reason, reason
    verdict, reason = decision(one.hook(one.event("before_shell", command="for f in $(ls plans/*); do rm $f; done")))
    assert verdict == "deny" and "`$f`" in reason and "Name the file literally" in reason, reason
    assert version(root) == 2
