"""Codex CLI sessions: hook events shaped as Codex's documentation specifies
(tests/fixtures/codex/events.json), run through `coherent-volume hook codex` by a stand-in Codex
process, with and without a mount. A Codex session's view is formed from its patches."""

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

from coherent_volume import CoherentVolume, codex, hook_paths
from coherent_volume.codex import parse_patch
from coherent_volume.errors import StaleWriteError

from .harness.agent_session import AgentProcess, commit_lock_held, fill, fixture, started, timed_hook, unique
from .harness.mounts import CLI, Mount, bound

P = "plans/plan.md"
EVENTS = fixture("codex")
PLAN = "goal\nstep A\nstep B\n"


def update(path: str, *hunk: str) -> str:
    """An apply_patch patch updating `path` with one hunk (lines with their ' ', '-', '+' marks)."""
    return "\n".join(["*** Begin Patch", f"*** Update File: {path}", "@@", *hunk, "*** End Patch"]) + "\n"


class Session(AgentProcess):
    """A stand-in Codex session: apply_patch and shell calls with the hooks around them."""

    def __init__(self, session: str, cwd: Path, subagent: str | None = None) -> None:
        super().__init__("codex", cwd)
        self.id, self.cwd, self.subagent = session, cwd, subagent

    def event(self, name: str, **values: object) -> dict[str, object]:
        event = fill(EVENTS[name], session=unique(self.id), cwd=self.cwd, subagent=self.subagent or "", **values)
        return known_workdir(event) if name in ("pre_bash", "post_bash") else event

    def begin(self) -> None:
        assert self.hook(self.event("session_start"))["code"] == 0

    def close(self) -> None:
        self.hook(self.event("stop"))
        super().close()

    def apply(self, patch: str, result: dict[str, str]) -> tuple[str, str]:
        """apply_patch: PreToolUse; if allowed, the files as the patch leaves them, then PostToolUse."""
        name = "pre_apply_patch_subagent" if self.subagent else "pre_apply_patch"
        verdict, reason = decision(self.hook(self.event(name, patch=patch)))
        if verdict == "allow":
            for rel, text in result.items():
                written = self.write(self.cwd / rel, text)
                assert written["code"] == 0, written
            post = self.hook(self.event("post_apply_patch", patch=patch, files=" ".join(result)))
            assert post["code"] == 0 and not post["stderr"], post
        return verdict, reason


def known_workdir(event: dict[str, object]) -> dict[str, object]:
    """A `Bash` event whose input also gives the directory its command runs in (`workdir`: its `cwd`).
    Codex's own events give only `command` (it runs the command in the call's `workdir`, which they do
    not carry): the hook then takes the directory as unknown and refuses writes by a relative path in
    or above a volume (test_a_shell_command_codex_may_run_in_its_workdir_…). The tests of what a
    command writes give it, as a Codex that sent it would, so their relative paths are checked."""
    tool_input = event["tool_input"]
    assert isinstance(tool_input, dict)
    return {**event, "tool_input": {**tool_input, "workdir": event["cwd"]}}


def decision(answer: dict[str, object]) -> tuple[str, str]:
    """(permissionDecision, reason) of a PreToolUse answer; ("allow", "") when it denied nothing."""
    out = answer["json"]
    assert answer["code"] == 0, answer
    specific = out.get("hookSpecificOutput", {}) if isinstance(out, dict) else {}
    if specific.get("permissionDecision") != "deny":
        return "allow", ""
    return "deny", str(specific["permissionDecisionReason"])


def context(answer: dict[str, object]) -> str:
    out = answer["json"]
    return str(out["hookSpecificOutput"]["additionalContext"]) if isinstance(out, dict) else ""


def writers(root: Path, rel: str = P) -> list[tuple[int, str]]:
    with CoherentVolume(root, agent="observer") as v:
        return [(e.version, e.writer) for e in v.history(rel)]


@pytest.fixture
def sessions():
    yield from started(Session)


def test_the_patch_names_every_file_it_touches_and_the_lines_it_builds_on() -> None:
    """As Codex's grammar reads it: a header is trimmed where a file's section starts, and within an
    update a line opening with a space is a context line, whatever it holds."""
    patch = (
        "*** Begin Patch\n"
        "*** Update File: plans/plan.md\n"
        "*** Move to: plans/done.md\n"
        "@@ ## Steps\n"
        " step A\n"
        "-step B\n"
        "+step B, done\n"
        "\n"
        " step C\n"
        "  *** Add File: plans/not-a-file.md\n"
        "+fresh\n"
        "*** Delete File: plans/old.md\n"
        "  *** Add File: plans/new.md\n"
        "+fresh\n"
        "*** End Patch\n"
    )
    files = parse_patch(patch)
    assert [(f.path, f.op, f.move_to) for f in files] == [
        ("plans/plan.md", "update", "plans/done.md"),
        ("plans/old.md", "delete", None),
        ("plans/new.md", "add", None),
    ]
    assert [h.old for h in files[0].hunks] == [
        ["## Steps"],
        ["step A", "step B", "", "step C", " *** Add File: plans/not-a-file.md"],
    ]


@pytest.mark.parametrize("header", ["*** End Patch", "*** Update File: notes.txt", "@@", "*** End of File"])
def test_a_patch_whose_context_line_reads_as_a_marker_is_denied_for_the_file_after_it(
    root: Path, sessions, header: str
) -> None:
    """A context line is a space and a line of the file, which may read as a marker once trimmed:
    Codex reads it as context and goes on to the next file's section; the hook read it trimmed, took
    ` *** End Patch` for the patch's end, and allowed a patch deleting a file its session never read
    (crafted input, found by a hostile probe of the fix above)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    (root / "notes.txt").write_text(f"n1\n{header}\n")
    patch = (
        f"*** Begin Patch\n*** Update File: notes.txt\n@@\n-n1\n+n2\n {header}\n*** Delete File: {P}\n*** End Patch\n"
    )
    assert [(f.path, f.op) for f in parse_patch(patch)] == [("notes.txt", "update"), (P, "delete")]
    verdict, reason = sessions("context", root).apply(patch, {})
    assert verdict == "deny" and "(unread)" in reason and P in reason
    assert (root / P).read_text() == PLAN


def test_a_patch_codex_refuses_is_read_leniently() -> None:
    """A patch Codex's grammar refuses is applied not at all; the hook then names every file any
    header names (a patch that reaches no file is allowed, one that names a managed file checked)."""
    broken = "*** Begin Patch\n*** Update File: a.md\n*** End Patch\n*** Delete File: plans/b.md\n*** End Patch\n"
    assert [(f.path, f.op) for f in parse_patch(broken)] == [("a.md", "update"), ("plans/b.md", "delete")]


@pytest.mark.parametrize("separator", ["\r", "\u2028", "\x0c", "\x85"], ids=["cr", "u2028", "form-feed", "nel"])
def test_a_patch_hiding_a_file_behind_a_line_that_only_looks_like_its_end_is_denied_for_it(
    root: Path, sessions, separator: str
) -> None:
    """Codex splits a patch into lines at newlines only: an added line holding `<separator>*** End
    Patch` is one line of the file it adds to, and the patch goes on to replace the next file. The
    hook read the patch as Codex does not, took that line for the patch's end and allowed a patch
    that replaced a file its session never read (crafted input, found by a hostile probe)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    (root / "notes.txt").write_text("n1\n")
    patch = (
        "*** Begin Patch\n*** Update File: notes.txt\n@@\n-n1\n"
        f"+n1{separator}*** End Patch\n*** Add File: {P}\n+replaced wholesale\n*** End Patch\n"
    )
    assert [(f.path, f.op) for f in parse_patch(patch)] == [("notes.txt", "update"), (P, "add")]
    assert parse_patch(patch)[0].hunks[0].new == [f"n1{separator}*** End Patch"]
    verdict, reason = sessions("crafted", root).apply(patch, {})
    assert verdict == "deny" and "(unread)" in reason and P in reason
    assert (root / P).read_text() == PLAN


def _stale_scenario(workdir: Path, root: Path, sessions, mounted: bool) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one, two = sessions("k1", workdir), sessions("k2", workdir)
    assert two.apply(
        update(P, " goal", "-step A", "+step A, done", " step B"), {P: "goal\nstep A, done\nstep B\n"}
    ) == (
        "allow",
        "",
    )
    assert writers(root)[0] == (2, f"codex:{unique('k2')}")

    verdict, reason = one.apply(update(P, " goal", "-step A", "+step A (revised)", " step B"), {P: "lost"})
    assert verdict == "deny"
    for words in (
        P,
        "(stale)",
        "version 1",
        "current version is 2",
        f"codex:{unique('k2')}",
        "written against an earlier version",
    ):
        assert words in reason, (words, reason)
    assert "-step A\n+step A, done" in reason, "the diff since the version the patch was written against"
    if mounted:  # Codex's own write is refused by the file system as well
        forced = one.write(workdir / P, "forced\n")
        assert forced["code"] == 1 and forced["errno"] == errno.EACCES
    assert (workdir / P).read_text() == "goal\nstep A, done\nstep B\n"

    patch = update(P, " goal", "-step A, done", "+step A, done and revised", " step B")
    assert one.apply(patch, {P: "goal\nstep A, done and revised\nstep B\n"}) == ("allow", "")
    assert writers(root)[0] == (3, f"codex:{unique('k1')}")


def test_a_patch_written_against_an_old_version_is_denied_with_the_diff(root: Path, sessions) -> None:
    _stale_scenario(root, root, sessions, mounted=False)


def test_on_a_mount_the_file_system_refuses_the_stale_write_too(mounted: Mount, sessions) -> None:
    _stale_scenario(mounted.path, mounted.root, sessions, mounted=True)


def test_a_patch_of_lines_nobody_changed_loses_nothing_and_passes(root: Path, sessions) -> None:
    lines = [f"line {i}" for i in range(1, 11)]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "\n".join(lines) + "\n")
    one, two = sessions("p1", root), sessions("p2", root)
    changed = ["line 1, by p2", *lines[1:]]
    assert two.apply(update(P, "-line 1", "+line 1, by p2", " line 2"), {P: "\n".join(changed) + "\n"})[0] == "allow"
    both = [*changed[:8], "line 9, by p1", "line 10"]
    assert one.apply(update(P, " line 8", "-line 9", "+line 9, by p1", " line 10"), {P: "\n".join(both) + "\n"}) == (
        "allow",
        "",
    )
    assert (root / P).read_text() == "\n".join(both) + "\n" and writers(root)[0] == (3, f"codex:{unique('p1')}")


def test_a_patch_that_fits_a_file_others_changed_since_is_told_their_changes(root: Path, sessions) -> None:
    """A patch whose lines fit the current version goes ahead (it keeps every other change) and
    moves the session's view there; another session changed the file since this one's last patch
    of it, so its model is told what changed (before, nothing was said, and a `printf > file` it
    built on what it had seen then dropped the other session's line unnoticed)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one, two = sessions("w1", root), sessions("w2", root)
    mine = PLAN.replace("step A", "step A, one")
    assert one.apply(update(P, "-step A", "+step A, one"), {P: mine})[0] == "allow"
    theirs = mine.replace("goal", "goal, two")
    assert two.apply(update(P, "-goal", "+goal, two"), {P: theirs})[0] == "allow"
    for patch, before, told in [
        (update(P, "-step B", "+step B, one"), theirs, True),
        (update(P, "-step B, one", "+step B, done"), theirs.replace("step B", "step B, one"), False),
    ]:
        answer = one.hook(one.event("pre_apply_patch", patch=patch))
        said = context(answer)
        assert decision(answer)[0] == "allow", answer
        assert (
            "+goal, two" in said and f"codex:{unique('w2')}" in said and "nothing showed them to you" in said
        ) is told, said
        assert one.write(root / P, before.replace(patch.split("\n")[3][1:], patch.split("\n")[4][1:]))["code"] == 0
        assert one.hook(one.event("post_apply_patch", patch=patch, files=P))["code"] == 0
    assert (root / P).read_text() == "goal, two\nstep A, one\nstep B, done\n"


def test_a_patch_denied_for_another_file_still_tells_what_its_fitting_file_moved_over(root: Path, sessions) -> None:
    """A patch of a.md (fitting its current version, which bob changed since this session's last
    patch of it) and of b.md (changed by carol: stale) is denied for b.md; its fit moved the view of
    a.md all the same, so the denial tells bob's change too (before, it named b.md only, and a
    `printf > a.md` built on what the model had seen then went through over bob's line: a hostile
    tester, /tmp/s20hk C1)."""
    a, b = "plans/a.md", "plans/b.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(a, "title\nalpha\nbeta\n")
        setup.write(b, "p\nq\n")
    s = sessions("denied", root)
    assert s.apply(update(a, " alpha", "-beta", "+beta2"), {a: "title\nalpha\nbeta2\n"})[0] == "allow"
    assert s.apply(update(b, " p", "-q", "+q1"), {b: "p\nq1\n"})[0] == "allow"
    for who, path, text in (("bob", a, "BOB LINE\ntitle\nalpha\nbeta2\n"), ("carol", b, "p\nQ\n")):
        with CoherentVolume(root, agent=who) as peer:
            peer.read(path)
            peer.write(path, text)
    both = update(a, " alpha", "-beta2", "+beta3").replace("*** End Patch\n", "") + update(
        b, " p", "-q1", "+q2"
    ).replace("*** Begin Patch\n", "")
    verdict, reason = decision(s.hook(s.event("pre_apply_patch", patch=both)))
    assert verdict == "deny" and "plans/b.md" in reason, reason
    assert "+BOB LINE" in reason and "written by bob" in reason and "nothing showed them to you" in reason, reason


def test_a_patch_another_writer_changes_before_its_post_tool_use_is_theirs_and_told(root: Path, sessions) -> None:
    """A program outside the hooks rewrites the file between apply_patch's write and its
    PostToolUse: recorded as a change by `external`, the session told, its view left behind."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    s = sessions("after", root)
    patch = update(P, " goal", "-step A", "+step A, done")
    assert decision(s.hook(s.event("pre_apply_patch", patch=patch)))[0] == "allow"
    (root / P).write_text("goal\nstep A, done\nstep B\n")
    (root / P).write_text("a script's line\n")
    post = s.hook(s.event("post_apply_patch", patch=patch, files=P))
    assert "does not hold what your tool just wrote" in context(post), post
    assert writers(root)[0] == (2, "external")
    again = update(P, " step A, done", "-step B", "+step C")  # built on what it believes it made
    assert decision(s.hook(s.event("pre_apply_patch", patch=again)))[0] == "deny"


@pytest.mark.parametrize("meanwhile", ["nothing", "line ends made CRLF"])
def test_a_patch_another_agent_reads_before_its_post_tool_use_is_still_the_sessions(
    root: Path, sessions, meanwhile: str
) -> None:
    """Another agent reads the file between apply_patch's write and its PostToolUse: that read
    records the bytes it finds as a change by `external` (it cannot tell whose they are); where the
    PostToolUse finds exactly what the patch makes of the session's view, that version is the
    session's: its writer and kind corrected, nobody told of a change by `external` (before, it
    stayed `external`'s, and other sessions' warnings and refusals named `external`). Bytes that
    only fit as a tool may have written them (a program made the line ends CRLF meanwhile) may be
    another program's: that version stays `external`'s."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    s = sessions("seen", root)
    patch = update(P, " goal", "-step A", "+step A, done")
    assert decision(s.hook(s.event("pre_apply_patch", patch=patch)))[0] == "allow"
    written = "goal\nstep A, done\nstep B\n"
    (root / P).write_text(written)
    if meanwhile != "nothing":
        written = written.replace("\n", "\r\n")
        (root / P).write_bytes(written.encode())
    with CoherentVolume(root, agent="reader") as reader:
        assert reader.read(P) == written.encode()
    assert writers(root)[0] == (2, "external")
    post = s.hook(s.event("post_apply_patch", patch=patch, files=P))
    assert post["code"] == 0 and context(post) == "", post
    session = f"codex:{unique('seen')}"
    if meanwhile != "nothing":
        assert writers(root)[0] == (2, "external")
        return
    assert writers(root)[0] == (2, session)
    with CoherentVolume(root, agent="reader") as reader:
        assert [(v.version, v.kind) for v in reader.history(P)] == [(2, "commit"), (1, "commit")]
    again = update(P, " step A, done", "-step B", "+step B, done")  # built on what it made: current
    assert s.apply(again, {P: "goal\nstep A, done\nstep B, done\n"}) == ("allow", "")
    assert writers(root)[0] == (3, session)


def test_a_patch_whose_lines_differ_from_the_current_ones_only_in_whitespace_is_stale(root: Path, sessions) -> None:
    """apply_patch finds a hunk whose lines differ from the file's only in whitespace and writes
    its own lines over them: a patch built on version 1 would undo version 2's re-indentation. Its
    lines are version 1's exactly, so it is refused stale with the diff; built on version 2's exact
    lines it passes."""
    rel = "plans/c.yaml"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(rel, "if x:\n    do()\ndone()\n")
        setup.write(rel, "if x:\n    do()\n    done()\n")  # done() moved into the block: indentation only
    a = sessions("ws", root)
    verdict, reason = a.apply(update(rel, "     do()", "-done()", "+finish()"), {rel: "lost"})
    assert verdict == "deny" and "(stale)" in reason and "version 1" in reason, reason
    assert "-done()\n+    done()" in reason, "the diff shows the re-indentation"
    assert (root / rel).read_text() == "if x:\n    do()\n    done()\n"
    patch = update(rel, "     do()", "-    done()", "+    finish()")
    assert a.apply(patch, {rel: "if x:\n    do()\n    finish()\n"}) == ("allow", "")
    assert writers(root, rel)[0] == (3, f"codex:{unique('ws')}")


def test_unread_held_and_fenced_writes_are_denied_with_what_to_do(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one, two = sessions("u1", root), sessions("u2", root)
    delete = f"*** Begin Patch\n*** Delete File: {P}\n*** End Patch\n"
    verdict, reason = one.apply(delete, {})
    assert verdict == "deny" and "(unread)" in reason and "no evidence that you saw" in reason and "cat" in reason
    verdict, reason = one.apply(update(P, " something", "-the model", "+never saw"), {})
    assert verdict == "deny" and "(unread)" in reason, "context that fits no version registers nothing"
    verdict, reason = decision(one.hook(one.event("pre_bash", command=f"printf 'x\\n' > {P}")))
    assert verdict == "deny" and "(unread)" in reason and "apply_patch" in reason
    assert (root / P).read_text() == PLAN

    patch = update(P, " goal", "-step A", "+step A!", " step B")
    assert decision(one.hook(one.event("pre_apply_patch", patch=patch)))[0] == "allow"
    verdict, reason = decision(two.hook(two.event("pre_apply_patch", patch=patch)))
    assert verdict == "deny" and "(held)" in reason and f"codex:{unique('u1')} holds its write grant" in reason
    assert "Wait a few seconds" in reason
    one.hook(one.event("stop"))  # the end of the turn releases what the session still holds
    assert decision(two.hook(two.event("pre_apply_patch", patch=patch)))[0] == "allow"
    two.hook(two.event("stop"))

    f = sessions("f1", root)
    assert decision(f.hook(f.event("pre_apply_patch", patch=patch)))[0] == "allow"  # its view: the current version
    f.hook(f.event("stop"))
    with CoherentVolume(root, agent=f"codex:{unique('f1')}") as same_agent, same_agent.lock(P, ttl=0.1):
        time.sleep(0.2)  # the lock() grant expires; the next look reclaims it and fences its agent
        verdict, reason = decision(f.hook(f.event("pre_bash", command=f"rm {P}")))
        assert verdict == "deny" and "(fenced)" in reason and "reclaimed" in reason
        assert decision(f.hook(f.event("pre_apply_patch", patch=patch)))[0] == "allow", (
            "a patch built on the current content shows the file was seen again: the fence is lifted"
        )


def _judged_whole(workdir: Path, sessions, spellings: list[tuple[str, str]]) -> None:
    """Session n1 patches P at `workdir`, n2 changes it since; then each patch of n1 with a section
    whose lines fit the current version (P spelled as the pair's first) and another section for P
    (spelled as its second) is denied stale; the fitting section alone is allowed."""
    with CoherentVolume(workdir, agent="setup") as setup:
        setup.write(P, PLAN)
        setup.write("plans/b.md", "other\n")
    one, two = sessions("n1", workdir), sessions("n2", workdir)
    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    current = PLAN.replace("step A", "step A, one").replace("goal", "goal, two")
    assert two.apply(update(P, "-goal", "+goal, two"), {P: current})[0] == "allow"
    for fits_as, other in spellings:
        fitting = [f"*** Update File: {fits_as}", "@@", "-step B", "+step B, one"]
        for second in (
            [f"*** Add File: {other}", "+the model's whole file"],
            [f"*** Delete File: {other}"],
            ["*** Update File: plans/b.md", f"*** Move to: {other}", "@@", "-other", "+moved"],
            [f"*** Update File: {other}", "@@", "-step A", "+step A, again"],
        ):
            patch = "\n".join(["*** Begin Patch", *fitting, *second, "*** End Patch"]) + "\n"
            verdict, reason = decision(one.hook(one.event("pre_apply_patch", patch=patch)))
            assert verdict == "deny" and "(stale)" in reason, (fits_as, second, reason)
    assert (workdir / P).read_text() == current
    patch = "\n".join(["*** Begin Patch", *fitting, "*** End Patch"]) + "\n"  # alone, it fits: allowed
    assert decision(one.hook(one.event("pre_apply_patch", patch=patch)))[0] == "allow"


def test_a_patch_naming_a_file_in_two_sections_is_judged_by_the_view_held_before_it(root: Path, sessions) -> None:
    """A section whose lines fit the current version shows the file was seen, but only that
    section's lines: another section of the same patch for that file (an Add over it, a Delete, a
    Move onto it, a second Update with stale lines), however either spells it, is judged by the
    view the session held before the patch. Before, the fitting section moved the view and the
    other section replaced a peer's line the session never saw, allowed (/tmp/s29hooks 1; spelled
    two ways, /tmp/s29r2c 1)."""
    (root / "plink").symlink_to("plans")
    name = P.rsplit("/", 1)[1]
    spelled = (P, f"./{P}", f"plans//{name}", f"plans/../{P}", f"plink/{name}")
    _judged_whole(root, sessions, [(fits_as, P) for fits_as in spelled])


def test_a_patch_naming_a_file_through_a_bind_of_its_root_or_above_names_one_file(
    root: Path, tmp_path: Path, sessions
) -> None:
    """The same through a bind mount of the volume's root, or of the directory above it (/tmp/s29r4 1:
    two names to the hook, not to the write check, and the loss came back again)."""
    with bound(root, tmp_path / "bind") as bind, bound(root.parent, tmp_path / "above") as above:
        through = [str(bind / P), str(above / root.name / P)]
        _judged_whole(root, sessions, [(P, other) for other in through] + [(other, P) for other in through])


def test_a_patch_naming_a_file_through_its_mount_and_its_root_names_one_file(mounted: Mount, sessions) -> None:
    """The same, one section naming the file through the volume's mount and the other through its
    root (/tmp/s29r3 1: two names to the hook, which let the loss through again)."""
    through_root = str(mounted.root / P)
    _judged_whole(mounted.path, sessions, [(P, through_root), (through_root, P)])


def test_a_patch_or_command_event_whose_input_has_no_string_is_denied(root: Path, sessions) -> None:
    """An apply_patch or Bash event whose input gives its patch or command as no string (another
    key, a list, null) could not be checked: denied, as Gemini CLI's and Cursor's hooks deny such
    input (before, Codex's was allowed silently, /tmp/s29hooks 3)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one = sessions("m1", root)
    for name in ("pre_apply_patch", "pre_bash"):
        event = one.event(name, patch=update(P, "-goal", "+goal!"), command=f"printf x > {P}")
        for given in ({"input": "x"}, {"command": ["printf", "x"]}, {"command": None}, "printf x", None):
            verdict, reason = decision(one.hook({**event, "tool_input": given}))
            assert verdict == "deny" and "no command as a string" in reason, (name, given, reason)
    assert (root / P).read_text() == PLAN


def test_subagents_are_agents_of_their_own(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    a, b = sessions("parent", root, "worker-a"), sessions("parent", root, "worker-b")
    patch = update(P, " goal", "-step A", "+step A!", " step B")
    assert decision(a.hook(a.event("pre_apply_patch_subagent", patch=patch)))[0] == "allow"
    verdict, reason = decision(b.hook(b.event("pre_apply_patch_subagent", patch=patch)))
    assert verdict == "deny" and f"codex:{unique('parent')}/worker-a holds its write grant" in reason


def test_stale_views_are_named_before_the_next_turn(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    s = sessions("w1", root)
    s.apply(update(P, " goal", "-step A", "+step A!", " step B"), {P: "goal\nstep A!\nstep B\n"})
    assert context(s.hook(s.event("user_prompt_submit"))) == ""
    with CoherentVolume(root, agent="rival") as rival:
        rival.read_text(P)
        rival.write(P, "goal\nstep A!\nstep B, by rival\n")
    told = context(s.hook(s.event("user_prompt_submit")))
    for words in (P, "last saw version 2", "now version 3", "rival", "-step B\n+step B, by rival"):
        assert words in told, (words, told)
    assert P in context(s.hook(s.event("pre_bash", command="ls")))


# ---- merge globs ----------------------------------------------------------------------

LOG = "plans/log.md"
LINES = "".join(f"line {i}\n" for i in range(1, 9))


def _history(root: Path, rel: str = LOG) -> list[tuple[int, str, str, tuple[int, ...]]]:
    with CoherentVolume(root, agent="observer") as v:
        return [(h.version, h.kind, h.writer, h.parents) for h in v.history(rel)]


def _unattended(event: dict[str, object]) -> dict[str, object]:
    """`event` as Codex sends it under approval policy `never`."""
    return {**event, "permission_mode": "bypassPermissions"}


def _merge_scenario(workdir: Path, root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(replace(setup.policy, merge=(LOG,)))
        setup.write(LOG, LINES)
    one, two = sessions("k1", workdir), sessions("k2", workdir)
    theirs = LINES.replace("line 2\n", "line 2, by two\n")
    assert two.apply(update(LOG, " line 1", "-line 2", "+line 2, by two", " line 3"), {LOG: theirs})[0] == "allow"
    patch = update(LOG, " line 2", " line 3", " line 4", "-line 5", "+line 5, by one", " line 6")

    verdict, reason = decision(one.hook(one.event("pre_apply_patch", patch=patch)))
    assert verdict == "deny" and "(stale)" in reason and "merges cleanly with version 2" in reason, reason
    assert "this session's is default" in reason and "-line 5\n+line 5, by one\n" in reason
    assert (workdir / LOG).read_text() == theirs and len(_history(root)) == 2, "in the default mode nothing is written"

    verdict, reason = decision(one.hook(_unattended(one.event("pre_apply_patch", patch=patch))))
    assert verdict == "deny" and "committed the result as version 3" in reason and "do not repeat it" in reason
    assert (
        f"codex:{unique('k2')}" in reason and "-line 2\n+line 2, by two" in reason and "Print the file again" in reason
    )
    both = theirs.replace("line 5\n", "line 5, by one\n")
    assert (workdir / LOG).read_text() == both
    assert _history(root)[0] == (3, "merge", f"codex:{unique('k1')}", (1, 2))
    after = both.replace("line 6\n", "line 6, by one\n")
    assert one.apply(update(LOG, " line 5, by one", "-line 6", "+line 6, by one"), {LOG: after}) == ("allow", "")
    assert _history(root)[0][:3] == (4, "commit", f"codex:{unique('k1')}") and (workdir / LOG).read_text() == after


def test_a_stale_patch_of_a_merge_file_is_merged_and_committed_where_codex_does_not_ask(root: Path, sessions) -> None:
    """A patch written against version 1 of a merge-glob file that version 2 changed elsewhere: in
    the default approval mode the merge is shown and nothing written; under approval policy
    `never` the hook commits it as a `merge` version with both parents and denies the patch, saying
    so; the session's next patch, built on the merge, passes."""
    _merge_scenario(root, root, sessions)


def test_on_a_mount_a_merge_committed_by_the_hook_is_what_the_mount_shows(mounted: Mount, sessions) -> None:
    _merge_scenario(mounted.path, mounted.root, sessions)


def test_overlapping_multi_file_and_non_merge_patches_are_denied_as_stale(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(replace(setup.policy, merge=(LOG,)))
        setup.write(LOG, LINES)
        setup.write(P, LINES)
    one, two = sessions("o1", root), sessions("o2", root)
    theirs = LINES.replace("line 2\n", "line 2, by two\n")
    for rel in (LOG, P):
        assert two.apply(update(rel, " line 1", "-line 2", "+line 2, by two", " line 3"), {rel: theirs})[0] == "allow"

    same_lines = update(LOG, " line 1", "-line 2", "+line 2, by one", " line 3")
    verdict, reason = decision(one.hook(_unattended(one.event("pre_apply_patch", patch=same_lines))))
    assert verdict == "deny" and "(stale)" in reason and "1 conflicting hunk(s)" in reason, reason
    assert "<<<<<<< yours\nline 2, by one\n||||||| base\nline 2\n=======\nline 2, by two\n>>>>>>> current" in reason
    two_files = "\n".join(
        ["*** Begin Patch", f"*** Update File: {LOG}", "@@", " line 4", "-line 5", "+line 5, by one", " line 6"]
        + ["*** Add File: plans/new.md", "+new", "*** End Patch"]
    )
    two_files = two_files.replace(" line 4", " line 2\n line 3\n line 4")
    verdict, reason = decision(one.hook(_unattended(one.event("pre_apply_patch", patch=two_files))))
    assert (
        verdict == "deny" and "It was not merged: coherent-volume merges a patch only when it updates one" in reason
    ), reason
    elsewhere = update(P, " line 2", " line 3", " line 4", "-line 5", "+line 5, by one", " line 6")
    verdict, reason = decision(one.hook(_unattended(one.event("pre_apply_patch", patch=elsewhere))))
    assert verdict == "deny" and "(stale)" in reason and "merge" not in reason, reason
    assert (root / LOG).read_text() == (root / P).read_text() == theirs and not (root / "plans/new.md").exists()
    assert len(_history(root)) == len(_history(root, P)) == 2


def test_a_patch_is_made_as_apply_patch_makes_it() -> None:
    """`patched`: hunks found in order (surrounding whitespace ignored, `@@ line` seeks that line,
    `*** End of File` anchors at the end), their lines replaced; a hunk that only adds lines, or
    whose lines are missing, gives nothing."""
    text = "def a():\n    x = 1\n\ndef b():\n    x = 1\nend\n"
    patch = (
        "*** Begin Patch\n*** Update File: f.py\n@@ def b():\n-    x = 1\n+    x = 2\n@@\n end\n+tail\n"
        "*** End of File\n*** End Patch\n"
    )
    (file,) = parse_patch(patch)
    assert codex.patched(text, file.hunks) == "def a():\n    x = 1\n\ndef b():\n    x = 2\nend\ntail\n"
    assert codex.patched(text.replace("end\n", "end\nmore\n"), file.hunks) is None, "`end` no longer ends the file"
    (adds,) = parse_patch("*** Begin Patch\n*** Update File: f.py\n@@\n+only added\n*** End Patch\n")
    assert codex.patched(text, adds.hunks) is None
    (crlf,) = parse_patch("*** Begin Patch\n*** Update File: f.py\n@@\n a\n-b\n+B\n*** End Patch\n")
    assert codex.patched("a\r\nb\r\nc\r\n", crlf.hunks) == "a\nB\nc\r\n", "a hunk's lines are the patch's"
    indented = "class A:\n    def f(self):\n        x = 1\n"
    (anchored,) = parse_patch(
        "*** Begin Patch\n*** Update File: f.py\n@@ def f(self):\n-x = 1\n+x = 2\n*** End Patch\n"
    )
    assert codex.patched(indented, anchored.hunks) == "class A:\n    def f(self):\nx = 2\n", (
        "an `@@` anchor is only sought: its line keeps the file's indentation"
    )


_hook = partial(timed_hook, "codex")


def test_fails_closed_for_managed_paths_when_it_cannot_decide(root: Path, tmp_path: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    patch = update(P, " goal", "-step A", "+step A!")

    def ev(name: str, **values: object) -> dict[str, object]:
        event = fill(EVENTS[name], session=unique("closed"), cwd=root, **values)
        return known_workdir(event) if name == "pre_bash" else event

    with commit_lock_held(root):
        r, took = _hook(ev("pre_apply_patch", patch=patch))
        verdict, reason = decision({"code": r.returncode, "json": json.loads(r.stdout)})
        assert verdict == "deny" and "did not finish in time" in reason and f"coherent-volume why {root / P}" in reason
        assert took < codex.hooks.HOOK_TIMEOUT, f"answered after {took:.1f} s: Codex would have applied the patch"
        r, _ = _hook(ev("pre_apply_patch", patch=update(str(tmp_path / "elsewhere.md"), "-a", "+b")))
        assert r.returncode == 0 and r.stdout == "", "a path in no volume is not held up"
        command = f"echo a > {tmp_path}/unmanaged.txt; echo b > notes.txt; echo x > {P}"
        r, _ = _hook(ev("pre_bash", command=command))
        verdict, reason = decision({"code": r.returncode, "json": json.loads(r.stdout)})
        assert verdict == "deny" and f"this write to {root / P}:" in reason, "named: the managed file checked"
        assert f"coherent-volume why {root / P}" in reason and "unmanaged.txt" not in reason and "notes" not in reason

    (root / ".coherent/registry.db").write_bytes(b"not a database" * 100)
    r, _ = _hook(ev("pre_apply_patch", patch=patch))
    verdict, reason = decision({"code": r.returncode, "json": json.loads(r.stdout)})
    assert verdict == "deny" and "RegistryError" in reason
    anonymous = ev("pre_apply_patch", patch=patch)
    anonymous["session_id"] = ""
    r, _ = _hook(anonymous)
    assert decision({"code": r.returncode, "json": json.loads(r.stdout)})[0] == "deny"


def test_install_and_uninstall_are_idempotent_and_keep_other_hooks(tmp_path: Path) -> None:
    settings = tmp_path / "proj/.codex/hooks.json"
    settings.parent.mkdir(parents=True)
    mine = {"matcher": "Bash", "hooks": [{"type": "command", "command": "python3 audit.py", "timeout": 10}]}
    original = {"hooks": {"PreToolUse": [mine]}}
    settings.write_text(json.dumps(original))
    r = subprocess.run([CLI, "codex", "install", str(tmp_path / "proj")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = json.loads(settings.read_text())
    assert installed["hooks"]["PreToolUse"][0] == mine
    assert set(installed["hooks"]) == {"PreToolUse", "PostToolUse", "SessionStart", "UserPromptSubmit", "Stop"}
    ours = installed["hooks"]["PreToolUse"][1]
    assert ours["matcher"] == "^(apply_patch|Bash)$" and ours["hooks"][0]["timeout"] == 5
    assert ours["hooks"][0]["command"].endswith("coherent-volume hook codex")
    subprocess.run([CLI, "codex", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == installed, "install is idempotent"
    for _ in range(2):
        subprocess.run([CLI, "codex", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
        assert json.loads(settings.read_text()) == original


def test_a_shell_command_over_a_peers_commit_is_denied(root: Path, sessions) -> None:
    """The stale session's `sed -i plans/*.md` (a glob: the real plan.md is among its files) is
    denied; a write whose file only a variable names, in the volume, is denied saying so."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one, two = sessions("g1", root), sessions("g2", root)
    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    assert two.apply(update(P, "-step B", "+step B, two"), {P: "goal\nstep A, one\nstep B, two\n"})[0] == "allow"
    verdict, reason = decision(one.hook(one.event("pre_bash", command="sed -i s/goal/aim/ plans/*.md")))
    assert verdict == "deny" and "(stale)" in reason and P in reason and f"codex:{unique('g2')}" in reason, reason
    verdict, reason = decision(
        one.hook(one.event("pre_bash", command="cd plans && f=$(ls | head -1) && sed -i s/a/b/ $f"))
    )
    assert verdict == "deny" and "`$f`" in reason and "Name the file literally" in reason, reason
    assert decision(one.hook(one.event("post_bash", command="f=$(ls); echo > $f")))[0] == "allow"
    assert (root / P).read_text() == "goal\nstep A, one\nstep B, two\n" and writers(root)[0] == (
        3,
        f"codex:{unique('g2')}",
    )


def test_a_shell_command_after_cd_out_through_a_symlink_and_back_is_checked_where_bash_is(
    root: Path, tmp_path: Path, sessions
) -> None:
    """bash's `cd` is logical: after `cd EXT/..` (EXT a symlink at the volume's root to a directory
    outside it) the shell is at the volume's root again, so the stale session's `sed -i` of the plan
    is denied `stale` however that `cd` is spelled."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    (tmp_path / "ext/a/b").mkdir(parents=True)
    (root / "EXT").symlink_to(tmp_path / "ext/a/b")
    one, two = sessions("cd1", root), sessions("cd2", root)
    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    assert two.apply(update(P, "-step B", "+step B, two"), {P: "goal\nstep A, one\nstep B, two\n"})[0] == "allow"
    for cd in ("cd EXT/..", "cd EXT && cd ..", "cd EXT; cd ..", "pushd EXT/.. > /dev/null", "cd EXT/../plans && cd .."):
        verdict, reason = decision(one.hook(one.event("pre_bash", command=f"{cd} && sed -i s/goal/aim/ {P}")))
        assert verdict == "deny" and f"{P} (stale)" in reason, (cd, reason)


def test_a_shell_command_codex_may_run_in_its_workdir_is_judged_where_it_may_run(
    root: Path, tmp_path: Path, sessions
) -> None:
    """Codex runs a shell command in the call's `workdir` (the turn's directory joined with it), but
    its PreToolUse event gives only `{"command": …}` and the turn's `cwd` (codex-rs builds it so for
    shell, shell_command and exec_command). From the root, `printf > plan.md` run in `plans` wrote
    the plan over a peer's commit unchecked: the hook checked `ROOT/plan.md` (/tmp/s31hookproto 1).
    Now a write by a relative path is refused when the turn's directory is in a volume or one lies
    below it, saying why and what to do; a command that writes nothing, or writes by absolute
    paths (or after a `cd` to an absolute directory), is checked as before; a `workdir` the event
    gives is where the command runs."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one, two = sessions("wd1", root), sessions("wd2", root)
    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    assert two.apply(update(P, "-step B", "+step B, two"), {P: "goal\nstep A, one\nstep B, two\n"})[0] == "allow"
    (tmp_path / "elsewhere").mkdir()
    for cwd, command in (
        (root, "printf 'mine\\n' > plan.md"),
        (root, "sed -i s/goal/aim/ plan.md"),
        (root / "plans", "cd sub && printf 'mine\\n' > ../plan.md"),
        (tmp_path, "printf 'mine\\n' > plans/plan.md"),
    ):
        event = {**one.event("pre_bash", command=command), "cwd": str(cwd)}
        event["tool_input"] = {"command": command}  # (as Codex sends it: no workdir)
        verdict, reason = decision(one.hook(event))
        assert verdict == "deny" and "`workdir`" in reason and "absolute paths" in reason, (cwd, command, reason)
    patch = "apply_patch <<'EOF'\n*** Begin Patch\n*** Add File: plans/plan.md\n+mine\n*** End Patch\nEOF"
    event = {**one.event("pre_bash", command=patch), "cwd": str(tmp_path), "tool_input": {"command": patch}}
    assert decision(one.hook(event))[0] == "deny", "a patch run as a command, maybe in the volume: refused"
    for cwd, command in (
        (root, f"cat {P} && ls plans"),
        (root, f"printf 'x\\n' > {tmp_path}/elsewhere/out.txt"),
        (tmp_path / "elsewhere", "printf 'x\\n' > out.txt"),
    ):
        event = {**one.event("pre_bash", command=command), "cwd": str(cwd)}
        event["tool_input"] = {"command": command}
        assert decision(one.hook(event))[0] == "allow", (cwd, command)
    for command in (f"printf 'mine\\n' > {root / P}", f"cd {root} && sed -i s/a/b/ {P}"):
        event = {**one.event("pre_bash", command=command), "tool_input": {"command": command}}
        verdict, reason = decision(one.hook(event))
        assert verdict == "deny" and f"{P} (stale)" in reason, (command, reason)
    event = {**one.event("pre_bash", command="printf 'mine\\n' > plan.md"), "cwd": str(tmp_path)}
    event["tool_input"] = {"command": "printf 'mine\\n' > plan.md", "workdir": str(root / "plans")}
    verdict, reason = decision(one.hook(event))
    assert verdict == "deny" and f"{P} (stale)" in reason, reason
    assert (root / P).read_text() == "goal\nstep A, one\nstep B, two\n"


def test_a_shell_command_from_above_a_volume_is_refused_however_it_names_its_start_directory(
    root: Path, tmp_path: Path, sessions
) -> None:
    """With the turn's directory above a volume and no `workdir` given, a plain relative write was
    refused, but one through `$PWD`, `~+`, `/proc/self/cwd`, `cd -`, a pattern or find's starting
    point went ahead into the volume when `workdir` was inside it (/tmp/s31r2h 3): each is now refused
    as the relative write is, with the same advice."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one = sessions("above1", root)
    for command in (
        'echo x > "$PWD/plan.md"',
        "echo x > ~+/plan.md",
        "echo x > /proc/self/cwd/plan.md",
        "cd /tmp; cd -; echo x > plan.md",
        'for f in *.md; do echo x > "$f"; done',
        "find . -name plan.md -delete",
        "find . -name plan.md -exec rm {} +",
    ):
        event = {**one.event("pre_bash", command=command), "cwd": str(tmp_path), "tool_input": {"command": command}}
        verdict, reason = decision(one.hook(event))
        assert verdict == "deny" and "`workdir`" in reason and "absolute paths" in reason, (command, reason)
    assert (root / P).read_text() == PLAN


def test_an_append_by_a_relative_name_with_no_workdir_goes_ahead(root: Path, sessions) -> None:
    """`echo x >> notes.md` with the turn's directory in a volume and no `workdir` was refused by the
    unknown-directory rule (/tmp/s31r2h 5, a false denial): an append needs no view. It goes ahead;
    a truncating write there is still refused."""
    one = sessions("append1", root)
    for command, expected in (("echo x >> notes.md", "allow"), ("echo x > notes.md", "deny")):
        event = {**one.event("pre_bash", command=command), "tool_input": {"command": command}}
        assert decision(one.hook(event))[0] == expected, command
        if expected == "allow":
            post = one.hook({**one.event("post_bash", command=command), "tool_input": {"command": command}})
            assert post["code"] == 0 and not post["stderr"], post


def _call(event: dict[str, object], call: str) -> dict[str, object]:
    """`event` as the tool call `call` sends it (Codex names each call: `tool_use_id`)."""
    return {**event, "tool_use_id": call}


def _foreign_write(root: Path, text: str) -> str:
    """Another writer with a current view writes the plan: "accepted", or the reason it was refused."""
    with CoherentVolume(root, agent="other") as other:
        other.read(P)
        try:
            other.write(P, text)
        except StaleWriteError as refused:
            return refused.reason
        return "accepted"


def test_two_tools_of_one_session_at_once_keep_the_file_held_until_both_ended(root: Path, sessions) -> None:
    """Two shell commands of one session run at once on the plan: the first one's end records its
    write but leaves the session's grant, which the second still relies on, so another writer is
    refused until the second one ended too; a third call the hook denies (it writes a file the
    session never saw) releases none of it. Then nothing is held, and no write is `external`."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
        setup.write("plans/other.md", "other\n")
    one = sessions("two-tools", root)
    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    first, second = "sed -i s/goal/aim/ plans/plan.md", "cat > plans/plan.md <<'EOF'\nrewritten\nEOF"
    assert decision(one.hook(_call(one.event("pre_bash", command=first), "call-1")))[0] == "allow"
    assert decision(one.hook(_call(one.event("pre_bash", command=second), "call-2")))[0] == "allow"
    third = "sed -i s/x/y/ plans/plan.md plans/other.md"
    verdict, reason = decision(one.hook(_call(one.event("pre_bash", command=third), "call-3")))
    assert verdict == "deny" and "plans/other.md (unread)" in reason, reason
    assert one.run("bash", "-c", first)["code"] == 0
    assert one.hook(_call(one.event("post_bash", command=first), "call-1"))["code"] == 0
    assert _foreign_write(root, "the other's change\n") == "held", "the second tool still holds the plan"
    assert one.run("bash", "-c", second)["code"] == 0
    post = one.hook(_call(one.event("post_bash", command=second), "call-2"))
    assert post["code"] == 0 and not post["stdout"], post
    assert [writer for _, writer in writers(root)[:3]] == [f"codex:{unique('two-tools')}"] * 3
    assert (root / P).read_text() == "rewritten\n"
    assert _foreign_write(root, "the other's change\n") == "accepted", "the grant ends with the last tool"


def test_a_shell_command_is_told_what_to_do_about_a_shell_command_and_a_patch_about_a_patch(
    root: Path, sessions
) -> None:
    """A `Bash` command refused as unread or stale is told that no patch of the session's fits the
    file and to make the change with a patch built on what it holds (printing it gives no view: Codex
    has no read hook), never about a patch it did not write; a patch keeps its own words."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    one = sessions("shell-words", root)
    patch_words = ("the patch's context lines", "Your patch was written against")
    for command in (f"rm {P}", f"sed -i s/goal/aim/ {P}"):
        verdict, reason = decision(one.hook(one.event("pre_bash", command=command)))
        assert verdict == "deny" and "(unread)" in reason and "this command changes or removes" in reason, reason
        assert "no patch of yours in this session fits it" in reason and "apply_patch" in reason, reason
        assert not any(words in reason for words in patch_words), reason
    verdict, reason = one.apply(update(P, " something", "-the model", "+never saw"), {})
    assert verdict == "deny" and "the patch's context lines fit no version" in reason, reason

    assert one.apply(update(P, "-step A", "+step A, one"), {P: PLAN.replace("step A", "step A, one")})[0] == "allow"
    with CoherentVolume(root, agent="other") as other:
        other.read(P)
        other.write(P, "goal\nstep A, other\nstep B\n")
    verdict, reason = decision(one.hook(one.event("pre_bash", command=f"sed -i s/goal/aim/ {P}")))
    assert verdict == "deny" and "(stale)" in reason and "+step A, other" in reason, reason
    assert "This command would change the file over a version you have not seen" in reason, reason
    assert not any(words in reason for words in patch_words), reason
    verdict, reason = one.apply(update(P, " goal", "-step A, one", "+step A, two"), {})
    assert verdict == "deny" and "Your patch was written against an earlier version" in reason, reason
    assert (root / P).read_text() == "goal\nstep A, other\nstep B\n"


def test_the_note_of_a_session_that_ended_without_a_session_end_goes_at_a_later_start(
    root: Path, sessions, tmp_path: Path, monkeypatch
) -> None:
    """Codex has no session-end event: a session's note of the volumes it works in outlived its
    process for good (/tmp/s28hooks F4: thousands on a machine). A later session's start removes
    every note unwritten for an hour whose processes are all dead, not one of a live process."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # (the hooks' processes inherit it)
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "goal\n")
    living, ended = sessions("living", root), Session("ended", root)  # (ended here: not at teardown)
    ended.begin()
    assert living.apply(update(P, "-goal", "+goal, living"), {P: "goal, living\n"})[0] == "allow"
    assert ended.apply(update(P, "-goal, living", "+goal, ended"), {P: "goal, ended\n"})[0] == "allow"
    ended.close()
    notes = {name: hook_paths.session_file("volumes", f"codex:{unique(name)}") for name in ("ended", "living")}
    assert all(at is not None and at.exists() for at in notes.values()), notes
    hour_ago = time.time() - hook_paths.SWEEP_AGE - 60
    for at in notes.values():
        os.utime(at, (hour_ago, hour_ago))  # type: ignore[arg-type]
    sessions("later", root)  # its start
    assert not notes["ended"].exists()  # type: ignore[union-attr]
    assert notes["living"].exists()  # type: ignore[union-attr]
