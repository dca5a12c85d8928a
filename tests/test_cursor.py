"""Cursor conversations: hook events shaped as Cursor's documentation specifies
(tests/fixtures/cursor/events.json), run through `coherent-volume hook cursor` by a stand-in
Cursor process, with and without a mount."""

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

from coherent_volume import CoherentVolume, StaleWriteError, cursor, hook_steps
from coherent_volume.liveness import ProcessId

from .harness.agent_session import AgentProcess, commit_lock_held, fill, fixture, started, timed_hook, unique
from .harness.mounts import CLI, Mount

P = "plans/plan.md"
EVENTS = fixture("cursor")


class Conversation(AgentProcess):
    """A stand-in Cursor agent conversation: its tool calls with the hooks around them."""

    def __init__(self, conversation: str, root: Path) -> None:
        super().__init__("cursor", root)
        self.id, self.root = conversation, root

    def event(self, name: str, **values: object) -> dict[str, object]:
        values.setdefault("cwd", self.root)
        return fill(EVENTS[name], conversation=unique(self.id), root=self.root, **values)

    def read(self, path: Path) -> str:  # type: ignore[override]
        """The agent reads the file; beforeReadFile gets the content the model is about to receive."""
        text = super().read(path)
        answer = self.hook(self.event("before_read_file", path=path, content=text))
        assert answer["json"] == {"permission": "allow"}, "a read is never held up"
        return text

    def begin(self) -> None:
        assert self.hook(self.event("session_start"))["code"] == 0

    def close(self) -> None:
        self.hook(self.event("session_end"))
        super().close()

    def write_file(self, path: Path, content: str) -> tuple[str, str]:
        """The Write tool: preToolUse; if allowed, the write, then postToolUse. (permission, agent_message)."""
        verdict, message = permission(self.hook(self.event("pre_tool_use_write", path=path, content=content)))
        if verdict == "allow":
            written = self.write(path, content)
            assert written["code"] == 0, written
            assert self.hook(self.event("post_tool_use_write", path=path, content=content))["code"] == 0
        return verdict, message


def permission(answer: dict[str, object]) -> tuple[str, str]:
    out = answer["json"]
    assert answer["code"] == 0 and isinstance(out, dict), answer
    return str(out["permission"]), str(out.get("agent_message", ""))


def version(root: Path, rel: str = P) -> int:
    with CoherentVolume(root, agent="observer") as v:
        return v.version(rel)


@pytest.fixture
def conversations():
    yield from started(Conversation)


def _stale_scenario(workdir: Path, root: Path, conversations, mounted: bool) -> None:
    target = workdir / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "goal\nstep A\n")
    one, two = conversations("c1", workdir), conversations("c2", workdir)
    assert one.read(target) == two.read(target) == "goal\nstep A\n"
    assert two.write_file(target, "goal\nstep A, done\n") == ("allow", "")
    assert version(root) == 2

    verdict, message = permission(one.hook(one.event("pre_tool_use_str_replace", path=target, old="goal", new="goal!")))
    assert verdict == "deny"
    for words in (P, "(stale)", "version 1", "current version is 2", f"cursor:{unique('c2')}", "Read the file again"):
        assert words in message, (words, message)
    assert "-step A\n+step A, done" in message, "the diff since the conversation's view is in the message"
    if mounted:  # the tool's own write is refused by the file system as well
        forced = one.write(target, "forced\n")
        assert forced["code"] == 1 and forced["errno"] == errno.EACCES
    assert target.read_text() == "goal\nstep A, done\n"

    one.read(target)
    assert one.write_file(target, "goal!\nstep A, done\n") == ("allow", "")
    assert version(root) == 3


def test_a_stale_edit_is_denied_with_the_diff_and_a_fresh_one_allowed(root: Path, conversations) -> None:
    _stale_scenario(root, root, conversations, mounted=False)


def test_on_a_mount_the_file_system_refuses_the_stale_write_too(mounted: Mount, conversations) -> None:
    _stale_scenario(mounted.path, mounted.root, conversations, mounted=True)


def test_unread_held_and_fenced_edits_are_denied_with_what_to_do(root: Path, conversations) -> None:
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = conversations("u1", root), conversations("u2", root)
    verdict, message = permission(one.hook(one.event("pre_tool_use_delete", path=target)))
    assert verdict == "deny" and "(unread)" in message and "Read the file first" in message
    assert target.exists()

    one.read(target)
    two.read(target)
    assert permission(one.hook(one.event("pre_tool_use_write", path=target, content="v2\n")))[0] == "allow"
    verdict, message = permission(two.hook(two.event("pre_tool_use_write", path=target, content="w\n")))
    assert verdict == "deny" and "(held)" in message and f"cursor:{unique('u1')} holds its write grant" in message
    assert "Wait a few seconds" in message
    one.hook(one.event("post_tool_use_failure_write", path=target, content="v2\n"))
    verdict, reason = permission(two.hook(two.event("pre_tool_use_delete", path=target)))
    assert verdict == "allow", reason
    target.unlink()  # the Delete tool
    deleted = two.event("post_tool_use_write", path=target, content="")
    end = {"tool_name": "Delete", "tool_input": {"file_path": str(target)}}
    two.hook({**deleted, **end, "tool_use_id": EVENTS["pre_tool_use_delete"]["tool_use_id"]})  # the Delete call's end
    with CoherentVolume(root, agent="observer") as v:
        assert [e.kind for e in v.history(P)][0] == "delete" and v.history(P)[0].writer == f"cursor:{unique('u2')}"

    with CoherentVolume(root, agent="recreator") as recreator:
        recreator.write(P, "again\n")
    f = conversations("f1", root)
    f.read(target)
    with CoherentVolume(root, agent=f"cursor:{unique('f1')}") as same_agent, same_agent.lock(P, ttl=0.1):
        time.sleep(0.2)  # the lock() grant expires; the next look reclaims it and fences its agent
        verdict, message = permission(f.hook(f.event("pre_tool_use_write", path=target, content="x")))
        assert verdict == "deny" and "(fenced)" in message and "reclaimed" in message
        f.read(target)  # a confirmed read lifts the fence
        assert permission(f.hook(f.event("pre_tool_use_write", path=target, content="x")))[0] == "allow"


def test_the_view_is_the_content_the_model_receives(root: Path, conversations) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "current\n")
    c = conversations("r1", root)
    c.hook(c.event("before_read_file", path=root / P, content="something else\n"))
    assert permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x")))[0] == "deny"
    c.hook(c.event("before_read_file", path=root / P, content="current"))
    assert permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x")))[0] == "allow", (
        "a missing final newline is the same text"
    )


def test_a_file_with_a_byte_order_mark_matches_its_content_with_or_without_it(root: Path, conversations) -> None:
    """What Cursor's `content` holds of a file beginning with a BOM is not documented: the text with
    the BOM as a character, or decoded by it without (as an editor shows it) both register the view
    (before, only the first: a write was refused `unread` however often the file was read:
    /tmp/s32hookgc 3)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, b"\xef\xbb\xbfhello\n")
        setup.write("plans/bom.md", b"\xef\xbb\xbfhello\n")
        setup.write("plans/u16.md", "\ufeffhello\n".encode("utf-16-le"))
    for n, (rel, content) in enumerate(
        [(P, "hello\n"), ("plans/bom.md", "\ufeffhello\n"), ("plans/u16.md", "hello\n")]
    ):
        c = conversations(f"bom{n}", root)
        c.hook(c.event("before_read_file", path=root / rel, content=content))
        verdict, message = permission(c.hook(c.event("pre_tool_use_write", path=root / rel, content="x")))
        assert verdict == "allow", (rel, content, message)


def test_a_read_that_raced_a_commit_is_a_view_of_the_version_it_showed(root: Path, conversations) -> None:
    """The file changed between Cursor's read and its beforeReadFile: the content the model gets is
    an older version's, so its view is that version, and its write is refused as stale with the
    diff since (before: no view, refused `unread`, "you have not read it", though it had)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.write(P, "v2\n")
    c = conversations("race", root)
    c.hook(c.event("before_read_file", path=root / P, content="v1\n"))
    verdict, message = permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x")))
    assert verdict == "deny" and "(stale)" in message and "you last saw version 1" in message, message
    assert "-v1" in message and "+v2" in message, message
    c.read(root / P)
    assert c.write_file(root / P, "v3\n")[0] == "allow"


def test_a_read_that_raced_a_change_of_line_ends_is_a_view_of_the_version_it_showed(root: Path, conversations) -> None:
    """A peer made the file CRLF between Cursor's read and its beforeReadFile: the content matches the
    older version exactly and the current one only loosely, so the view is the older one and a Write
    is refused stale (before, the view landed on the peer's version and the Write went ahead:
    /tmp/s32hookgc 4). A second read showing the same again (a re-read, or our hook run twice for one
    read) leaves the view there, so the Write is still refused (before, the view already there made
    the hook take the loose match of the current version, and the Write went ahead: /tmp/s32r2hooks
    1); a read showing the current version exactly moves it."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb\n")
        setup.write(P, "a\r\nb\r\n")
    c = conversations("race-ends", root)
    for _ in range(2):
        c.hook(c.event("before_read_file", path=root / P, content="a\nb\n"))
        verdict, message = permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x\n")))
        assert verdict == "deny" and "(stale)" in message and "you last saw version 1" in message, message
    c.hook(c.event("before_read_file", path=root / P, content="a\r\nb\r\n"))
    assert permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x\n")))[0] == "allow"


def test_a_read_matching_an_older_version_exactly_long_after_the_change_is_of_the_current_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read can have raced only a change made while its tool ran, moments before the hook: where
    the version after the one `content` matches exactly was committed (and the file changed) longer
    ago than RACE_WINDOW, the tool showed the current version in a form coherent-volume models
    wrongly (Cursor giving CRLF line ends as LF, say), and the loose match of the current version
    is the view. Else such a tool's every read would put the view back on the older version and
    every write would be refused stale for ever."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\nb\n")
        setup.write(P, "a\r\nb\r\n")
    actor = hook_steps.Actor("cursor:lock", "cursor:lock", ProcessId.of(os.getpid()))
    shown = partial(hook_steps.shows, text="a\nb\n", whole=True)
    exact = partial(hook_steps.same_text, text="a\nb\n")
    for _ in range(2):  # just after the change: taken for a read that raced it
        assert hook_steps.observe(actor, str(root / P), shown, exact=exact) == 1
    monkeypatch.setattr(hook_steps, "RACE_WINDOW", 0.0)  # the change is older than the window
    assert hook_steps.observe(actor, str(root / P), shown, exact=exact) == 2


def test_the_search_for_the_version_a_read_showed_reads_a_bounded_number_of_bytes(root: Path, conversations) -> None:
    """Older versions are searched newest first up to EARLIER_BYTES in all (a hook has seconds):
    a read showing the version before the current one is found; one that only the version
    before that (past the bound) would match registers no view."""
    big = 5 << 20
    texts = [f"{n}\n" + "x" * big + "\n" for n in (1, 2, 3)]
    with CoherentVolume(root, agent="setup") as setup:
        for text in texts:
            setup.write(P, text)
    near, far = conversations("near", root), conversations("far", root)
    near.hook(near.event("before_read_file", path=root / P, content=texts[1]))
    far.hook(far.event("before_read_file", path=root / P, content=texts[0]))
    verdict, message = permission(near.hook(near.event("pre_tool_use_write", path=root / P, content="x")))
    assert verdict == "deny" and "(stale)" in message and "you last saw version 2" in message, message[:300]
    verdict, message = permission(far.hook(far.event("pre_tool_use_write", path=root / P, content="x")))
    assert verdict == "deny" and "(unread)" in message, message[:300]


@pytest.mark.parametrize("base", ["lf", "crlf"])
def test_line_ends_a_program_changes_during_a_write_another_agent_reads_stay_its_own(
    root: Path, conversations, base: str
) -> None:
    """A program makes a Write's file CRLF between the tool's write and its postToolUse, and
    another agent's read records that as a change by `external`: it stays `external`'s (only
    bytes exactly what the tool made become the session's, and a file that had CR line ends
    never counts as exactly that: the tools may put them back), so the change keeps its trace."""
    old = "v1\r\n" if base == "crlf" else "v1\n"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, old)
    c = conversations(f"ends-{base}", root)
    c.read(root / P)
    assert permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="v2\nmore\n")))[0] == "allow"
    assert c.write(root / P, "v2\nmore\n")["code"] == 0
    (root / P).write_bytes(b"v2\r\nmore\r\n")  # a program converts the line ends meanwhile
    with CoherentVolume(root, agent="reader") as reader:
        reader.read(P)
    assert c.hook(c.event("post_tool_use_write", path=root / P, content="v2\nmore\n"))["code"] == 0
    with CoherentVolume(root, agent="observer") as v:
        assert [(e.version, e.writer) for e in v.history(P)][0] == (2, "external")


def test_shell_commands_writing_managed_files_are_checked(root: Path, conversations) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    c = conversations("sh", root)
    verdict, message = permission(c.hook(c.event("before_shell_execution", command=f"rm -f {P}")))
    assert verdict == "deny" and "(unread)" in message and P in message
    for harmless in ("git status", f"grep v1 {P}", "echo x > build.log"):
        assert permission(c.hook(c.event("before_shell_execution", command=harmless)))[0] == "allow", harmless
    c.read(root / P)
    command = f"mv {P} plans/renamed.md"
    assert permission(c.hook(c.event("before_shell_execution", command=command)))[0] == "allow"
    (root / P).rename(root / "plans/renamed.md")  # what the command does
    c.hook(c.event("after_shell_execution", command=command))
    with CoherentVolume(root, agent="observer") as v:
        assert (
            v.history(P)[0].writer == f"cursor:{unique('sh')}"
            and v.history("plans/renamed.md")[0].writer == f"cursor:{unique('sh')}"
        )


def test_a_shell_commands_end_records_the_files_its_start_checked(root: Path, conversations) -> None:
    """afterShellExecution carries no cwd: the command's writes are the ones its start checked in the
    directory it ran in (its call known by the generation and the command), not its words worked out
    again from the first workspace root (before, a `sed -i` run in plans/ was looked for at the
    root: its write was recorded as `external`, its grant held peers off for a minute, and the
    conversation's next edit was refused stale against its own write: /tmp/s30hooks 7)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "hello\n")
    c = conversations("sh-cwd", root)
    c.read(root / P)
    command = f"sed -i s/hello/bye/ {Path(P).name}"
    assert permission(c.hook(c.event("before_shell_execution", command=command, cwd=root / "plans")))[0] == "allow"
    subprocess.run(["bash", "-c", command], cwd=root / "plans", check=True)
    after = c.event("after_shell_execution", command=command)
    assert "cwd" not in after  # (as Cursor sends it)
    assert c.hook(after)["code"] == 0
    with CoherentVolume(root, agent="peer") as peer:
        assert [(e.version, e.writer) for e in peer.history(P)][0] == (2, f"cursor:{unique('sh-cwd')}")
        peer.read(P)
        peer.write(P, "bye\npeer\n")  # the grant was released
    c.read(root / P)
    assert c.write_file(root / P, "bye\npeer\nmine\n")[0] == "allow"


def test_two_runs_of_one_command_in_one_generation_each_hold_the_file_until_their_own_end(
    root: Path, conversations
) -> None:
    """Two runs of one shell command in one generation share its call id (the generation and the
    command): the first one's end takes one claim, not both, so the file stays held until the second
    ends (before, the first end released the grant while the second still ran, a peer's commit went
    in and the second run overwrote it, recorded by no one: /tmp/s30r2h 3)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "top\n")
    c = conversations("twins", root)
    c.read(root / P)
    command = f"sed -i s/t/u/ {P}"
    for _ in range(2):
        assert permission(c.hook(c.event("before_shell_execution", command=command)))[0] == "allow"
    (root / P).write_text("uop\n")  # the first run
    assert c.hook(c.event("after_shell_execution", command=command))["code"] == 0
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(P)
        with pytest.raises(StaleWriteError) as held:
            peer.write(P, "peer's\n")
        assert held.value.reason == "held"
    (root / P).write_text("uop2\n")  # the second run
    assert c.hook(c.event("after_shell_execution", command=command))["code"] == 0
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(P)
        assert peer.write(P, "peer's\n") > 0, "the grant ended with the second run"


def test_a_shell_commands_end_without_a_generation_releases_no_other_commands_claim(root: Path, conversations) -> None:
    """Shell events that name no generation: a command's end takes its own claims (its command's),
    never another's that its words, worked out again from the first workspace root, happen to name
    (before, a command writing an unmanaged file elsewhere released a running command's claim and a
    peer's commit went in under it: /tmp/s30r3h 7)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "top\n")
    (root / "other/plans").mkdir(parents=True)
    c = conversations("no-generation", root)
    c.read(root / P)

    def shell(name: str, command: str, cwd: Path) -> dict[str, object]:
        event = {k: v for k, v in c.event(name, command=command, cwd=cwd).items() if k != "generation_id"}
        return event

    running = f"sed -i s/t/u/ {Path(P).name}"
    assert permission(c.hook(shell("before_shell_execution", running, root / "plans")))[0] == "allow"
    other = f"echo hi > {P}"  # in other/: an unmanaged file of that name
    assert permission(c.hook(shell("before_shell_execution", other, root / "other")))[0] == "allow"
    assert c.hook(shell("after_shell_execution", other, root))["code"] == 0
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(P)
        with pytest.raises(StaleWriteError) as held:
            peer.write(P, "peer's\n")
        assert held.value.reason == "held", "the running command still holds the file"


def test_an_allowed_action_names_the_files_that_went_stale(root: Path, conversations) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "one\ntwo\n")
    c = conversations("w1", root)
    c.read(root / P)
    with CoherentVolume(root, agent="rival") as rival:
        rival.read_text(P)
        rival.write(P, "one\ntwo, changed\n")
    verdict, message = permission(c.hook(c.event("pre_tool_use_write", path=root / "plans/new.md", content="x")))
    assert verdict == "allow"
    for words in (P, "last saw version 1", "now version 2", "rival", "-two\n+two, changed"):
        assert words in message, (words, message)
    verdict, message = permission(c.hook(c.event("before_shell_execution", command="ls")))
    assert verdict == "allow" and P in message


def test_a_conversation_in_two_volumes_is_told_which_volumes_file_changed(
    root: Path, tmp_path: Path, conversations
) -> None:
    """A conversation working in two volumes (a multi-root workspace) is told of a changed file by
    its absolute path: the same name in the other volume is another file (it was told `plans/plan.md`
    alone, and could not tell which to read again: /tmp/s30hooks 8)."""
    second = tmp_path / "second"
    second.mkdir()
    with CoherentVolume(second, managed=("plans/**",), agent="setup"):
        pass
    for where in (root, second):
        with CoherentVolume(where, agent="setup") as setup:
            setup.write(P, "one\n")
    c = conversations("two-volumes", root)

    def event(name: str, **values: object) -> dict[str, object]:
        return {**c.event(name, **values), "workspace_roots": [str(root), str(second)]}

    for where in (root, second):
        c.hook(event("before_read_file", path=where / P, content="one\n"))
    with CoherentVolume(second, agent="rival") as rival:
        rival.read(P)
        rival.write(P, "one, changed\n")
    verdict, message = permission(c.hook(event("pre_tool_use_write", path=root / "plans/new.md", content="x")))
    assert verdict == "allow" and f"- {second}/{P}: you last saw version 1" in message, message
    assert f"- {root}/{P}" not in message, "the unchanged one is not named"


def test_a_write_another_writer_changes_before_its_post_tool_use_is_theirs_and_told(root: Path, conversations) -> None:
    """A program outside the hooks rewrites the file between the Write tool's write and its
    postToolUse: recorded as a change by `external`, the conversation told, and its next write
    refused until it reads the file again."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    target = root / P
    c = conversations("after", root)
    c.read(target)
    assert permission(c.hook(c.event("pre_tool_use_write", path=target, content="v2\n")))[0] == "allow"
    assert c.write(target, "v2\n")["code"] == 0
    target.write_text("a script's line\n")
    answer = c.hook(c.event("post_tool_use_write", path=target, content="v2\n"))
    assert "does not hold what your tool just wrote" in str(answer["json"]), answer
    with CoherentVolume(root, agent="observer") as v:
        assert v.history(P)[0].writer == "external"
    assert c.write_file(target, "v3\n")[0] == "deny"


def test_on_a_mount_a_str_replace_is_the_conversations_own_version_and_nothing_is_told(
    mounted: Mount, conversations
) -> None:
    """On a mount the file system commits a StrReplace as the conversation's before postToolUse:
    nothing is told (applying the replacement to that version again would not give the file), and
    the conversation writes on."""
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "END\n")
    target = mounted.path / P
    c = conversations("medit", mounted.path)
    c.begin()
    c.read(target)
    edit = c.event("pre_tool_use_str_replace", path=target, old="END", new="TOK\nEND")
    assert permission(c.hook(edit))[0] == "allow"
    assert c.write(target, "TOK\nEND\n")["code"] == 0
    post = {**c.event("post_tool_use_write", path=target, content=""), "tool_name": "StrReplace"}
    post.update(tool_use_id=edit["tool_use_id"], tool_input=edit["tool_input"])
    assert c.hook(post)["json"] in (None, {}), "nothing told"
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert [h.writer for h in v.history(P)] == [f"cursor:{unique('medit')}", "setup"]
    assert c.write_file(target, "next\n") == ("allow", "")


def test_conversation_end_releases_its_grants(root: Path, conversations) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    c = conversations("e1", root)
    c.read(root / P)
    assert permission(c.hook(c.event("pre_tool_use_write", path=root / P, content="x")))[0] == "allow"
    with CoherentVolume(root, agent="other") as other:
        other.read_text(P)
        with pytest.raises(PermissionError):
            other.write(P, "blocked")
        c.hook(c.event("session_end"))
        assert other.write(P, "free again") == 2


LOG = "plans/log.md"
NOW = "one\ntwo\nthree\nFOUR\nand one more\n"


def test_a_stale_edit_of_a_merge_file_is_merged_and_shown_never_committed(root: Path, conversations) -> None:
    """Cursor's events do not say whether the user reviews its edits, so a clean merge of a stale
    StrReplace or Write is shown to the model with the tool denied, and nothing is written; an edit
    that does not apply or that the merge would not reproduce on the current content, overlapping
    changes, a Delete and a file no merge glob names are denied as stale."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(replace(setup.policy, merge=(LOG,)))
        for rel in (LOG, P):
            setup.write(rel, "one\ntwo\nthree\nfour\n")
    target = root / LOG
    one, two = conversations("m1", root), conversations("m2", root)
    for path in (target, root / P):
        one.read(path)
        two.read(path)
        assert two.write_file(path, NOW) == ("allow", "")

    edit = one.event("pre_tool_use_str_replace", path=target, old="two", new="TWO")
    verdict, message = permission(one.hook(edit))
    assert verdict == "deny" and "(stale)" in message and "merges cleanly with version 2" in message, message
    assert "whether the user reviews this conversation's edits" in message and "-two\n+TWO\n" in message
    edit = one.event("pre_tool_use_str_replace", path=target, old="four", new="4")
    verdict, message = permission(one.hook(edit))
    assert verdict == "deny" and "It was not merged: your edit does not apply to the current content" in message
    every = one.event("pre_tool_use_str_replace", path=target, old="one", new="1")
    every["tool_input"]["replace_all"] = True
    verdict, message = permission(one.hook(every))
    assert verdict == "deny" and "your edit would not give the merge of both changes" in message, message
    verdict, message = permission(one.hook(one.event("pre_tool_use_write", path=target, content="one\nfour?\n")))
    assert verdict == "deny" and "1 conflicting hunk(s)" in message and "<<<<<<< yours\nfour?\n|||" in message
    verdict, message = permission(one.hook(one.event("pre_tool_use_delete", path=target)))
    assert verdict == "deny" and "(stale)" in message and "merge" not in message

    verdict, message = permission(one.hook(one.event("pre_tool_use_str_replace", path=root / P, old="one", new="1")))
    assert verdict == "deny" and "(stale)" in message and "merge" not in message
    assert target.read_text() == (root / P).read_text() == NOW
    assert version(root, LOG) == version(root, P) == 2


_hook = partial(timed_hook, "cursor")


def test_fails_closed_for_managed_paths_when_it_cannot_decide(root: Path, tmp_path: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")

    def ev(name: str, **values: object) -> dict[str, object]:
        return fill(EVENTS[name], conversation=unique("closed"), root=root, cwd=root, **values)

    with commit_lock_held(root):
        r, took = _hook(ev("pre_tool_use_write", path=root / P, content="x"))
        out = json.loads(r.stdout)
        assert out["permission"] == "deny" and "did not finish in time" in out["agent_message"]
        assert took < cursor.hooks.HOOK_TIMEOUT, f"answered after {took:.1f} s"
        r, _ = _hook(ev("before_shell_execution", command=f"rm {P}"))
        assert json.loads(r.stdout)["permission"] == "deny"
        r, _ = _hook(ev("pre_tool_use_write", path=tmp_path / "elsewhere.md", content="x"))
        assert json.loads(r.stdout)["permission"] == "allow", "a path in no volume is not held up"
        r, _ = _hook(ev("before_read_file", path=root / P, content="v1\n"))
        assert json.loads(r.stdout) == {"permission": "allow"} and "no view was registered" in r.stderr

    (root / ".coherent/registry.db").write_bytes(b"not a database" * 100)
    out = json.loads(_hook(ev("pre_tool_use_write", path=root / P, content="x"))[0].stdout)
    assert out["permission"] == "deny" and "RegistryError" in out["agent_message"]
    anonymous = ev("pre_tool_use_write", path=root / "plans/new.md", content="x")
    anonymous.pop("conversation_id")
    anonymous.pop("session_id")
    assert json.loads(_hook(anonymous)[0].stdout)["permission"] == "deny", "an unattributable write is refused"


def test_install_and_uninstall_are_idempotent_and_keep_other_hooks(tmp_path: Path) -> None:
    settings = tmp_path / "proj/.cursor/hooks.json"
    settings.parent.mkdir(parents=True)
    original = {"version": 1, "hooks": {"afterFileEdit": [{"command": "./hooks/format.sh"}]}}
    settings.write_text(json.dumps(original))
    r = subprocess.run([CLI, "cursor", "install", str(tmp_path / "proj")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = json.loads(settings.read_text())
    assert installed["version"] == 1 and installed["hooks"]["afterFileEdit"] == original["hooks"]["afterFileEdit"]
    pre = installed["hooks"]["preToolUse"][0]
    assert pre["failClosed"] is True and pre["matcher"] == "Write|Edit|StrReplace|MultiEdit|Delete|EditNotebook"
    assert pre["command"].endswith("coherent-volume hook cursor") and pre["timeout"] == 5
    assert installed["hooks"]["beforeShellExecution"][0]["failClosed"] is True
    assert "failClosed" not in installed["hooks"]["beforeReadFile"][0], "a failing hook never blocks a read"
    subprocess.run([CLI, "cursor", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == installed, "install is idempotent"
    for _ in range(2):
        subprocess.run([CLI, "cursor", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
        assert json.loads(settings.read_text()) == original
    fresh = tmp_path / "fresh"
    fresh.mkdir()  # (a DIR that does not exist is refused: /tmp/s33cli 6)
    subprocess.run([CLI, "cursor", "install", str(fresh)], check=True, capture_output=True)
    assert json.loads((fresh / ".cursor/hooks.json").read_text())["version"] == 1
    subprocess.run([CLI, "cursor", "uninstall", str(fresh)], check=True, capture_output=True)
    assert json.loads((fresh / ".cursor/hooks.json").read_text()) == {"version": 1}, "a version may be the user's"


def test_install_and_uninstall_keep_the_users_own_hooks_and_version(tmp_path: Path) -> None:
    """A user's hook whose command merely mentions "hook cursor" survives install and uninstall, and
    uninstall leaves a `"version": 1` the file had (before, both were removed: /tmp/s32hookgc 2)."""
    settings = tmp_path / ".cursor/hooks.json"
    settings.parent.mkdir(parents=True)
    scan = {"command": "/opt/secscan/pre-write-hook cursor --block-secrets", "matcher": "Write"}
    original = {"version": 1, "hooks": {"preToolUse": [scan]}}
    settings.write_text(json.dumps(original))
    cursor.FACE.install(settings)
    installed = json.loads(settings.read_text())
    assert installed["hooks"]["preToolUse"][0] == scan and len(installed["hooks"]["preToolUse"]) == 2
    cursor.FACE.uninstall(settings)
    assert json.loads(settings.read_text()) == original
    settings.write_text(json.dumps({"version": 1, "hooks": {}}))
    cursor.FACE.install(settings)
    cursor.FACE.uninstall(settings)
    assert json.loads(settings.read_text())["version"] == 1


def test_a_shell_command_over_a_peers_commit_is_denied(root: Path, conversations) -> None:
    """The stale conversation's `sed -i plans/*.md` (a glob: the real plan.md is among its files)
    is denied; a write whose file only a variable names, in the volume, is denied saying so."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = conversations("c1", root), conversations("c2", root)
    one.read(root / P)
    two.read(root / P)
    assert two.write_file(root / P, "v2\n")[0] == "allow"
    verdict, message = permission(one.hook(one.event("before_shell_execution", command="sed -i s/v1/v3/ plans/*.md")))
    assert verdict == "deny" and "(stale)" in message and P in message and f"cursor:{unique('c2')}" in message, message
    command = "cd plans && ls | xargs sed -i s/v1/v3/"
    verdict, message = permission(one.hook(one.event("before_shell_execution", command=command)))
    assert verdict == "deny" and "xargs" in message and "Name the file literally" in message, message
    assert version(root) == 2
