"""Claude Code sessions: hook events shaped as Claude Code sends them, with and without a mount.

The events follow Claude Code's hooks reference (https://code.claude.com/docs/en/hooks): every
event carries session_id, transcript_path, cwd, permission_mode and hook_event_name; tool events
add tool_name and tool_input (PostToolUse: tool_response); an event fired inside a subagent adds
agent_id and agent_type; SubagentStop carries agent_id, agent_type, agent_transcript_path,
stop_hook_active and last_assistant_message; UserPromptSubmit carries prompt."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import get_args

import pytest

from coherent_volume import (
    CoherentVolume,
    RegistryError,
    StaleWriteError,
    claude_code,
    diffs,
    hook_settings,
    hook_steps,
)
from coherent_volume.claude_code import FACE, HOOK_REMEDY, SHELL_REMEDY, handle, our_hooks
from coherent_volume.core import VolumeCore, open_core
from coherent_volume.errors import Reason
from coherent_volume.hook_paths import session_file
from coherent_volume.hook_steps import Actor
from coherent_volume.hooks import Progress
from coherent_volume.liveness import ProcessId, current_process
from coherent_volume.paths import Target

from .harness.agent_session import AgentProcess, commit_lock_held, started, timed_hook, unique
from .harness.mounts import CLI, Mount
from .harness.volumes import changed_after_read, deleted_after_read

P = "plans/plan.md"

CLAUDE_WRITE = r"""
// Claude Code's Write tool: lstat, read current content, temp file (O_EXCL), write, fsync, rename.
const fs = require("fs");
const [target, content, mode] = process.argv.slice(1);  // node -e: no script path in argv
fs.lstatSync(target);
fs.readFileSync(target);
if (mode === "in-place") {
  const fd = fs.openSync(target, fs.constants.O_RDWR | fs.constants.O_CREAT);
  fs.ftruncateSync(fd, 0); fs.writeSync(fd, content); fs.closeSync(fd);
} else {
  const tmp = `${target}.tmp.${process.pid}.${Math.random().toString(16).slice(2)}`;
  const fd = fs.openSync(tmp, fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_EXCL, 0o644);
  fs.writeSync(fd, content); fs.fsyncSync(fd); fs.closeSync(fd);
  try { fs.renameSync(tmp, target); } catch (e) { try { fs.unlinkSync(tmp); } catch (_) {} throw e; }
}
console.log(fs.readFileSync(target, "utf8"));
"""


def event(
    name: str,
    session: str,
    cwd: Path,
    tool: str | None = None,
    path: Path | None = None,
    response: object = None,
    *,
    tool_input: dict[str, object] | None = None,
    agent_id: str | None = None,
    **fields: object,
) -> dict[str, object]:
    """An event as Claude Code sends it; `agent_id`: fired inside that subagent (Task tool)."""
    e: dict[str, object] = {
        "session_id": unique(session),
        "transcript_path": f"/tmp/{unique(session)}.jsonl",
        "cwd": str(cwd),
        "permission_mode": "default",
        "hook_event_name": name,
    }
    if agent_id is not None:
        e.update(agent_id=agent_id, agent_type="general-purpose")
    if tool:
        e["tool_name"] = tool
        e["tool_input"] = {"notebook_path" if tool == "NotebookEdit" else "file_path": str(path), **(tool_input or {})}
        e["tool_use_id"] = "toolu_01"
    if response is not None:
        e["tool_response"] = response
    e.update(fields)
    return e


def read_response(path: Path, text: str) -> dict[str, object]:
    lines = text.split("\n")
    return {
        "type": "text",
        "file": {
            "filePath": str(path),
            "content": text,
            "numLines": len(lines),
            "startLine": 1,
            "totalLines": len(lines),
        },
    }


class Session(AgentProcess):
    """A stand-in Claude Code process: it runs the hook command as its child (so it is the hook's
    parent) and performs the file operations, as Claude Code does, itself or through children. It
    runs in `start_in` (default: `cwd`, the directory its events name)."""

    def __init__(self, session_id: str, cwd: Path, start_in: Path | None = None) -> None:
        super().__init__("claude-code", start_in or cwd)
        self.id, self.cwd = session_id, cwd

    def hook(self, e: dict[str, object]) -> dict[str, object]:  # type: ignore[override]
        """Run `coherent-volume hook claude-code` with the event; returns exit code, stdout, stderr."""
        out = super().hook(e)
        return {k: out[k] for k in ("code", "stdout", "stderr")}

    def read(self, path: Path, agent_id: str | None = None) -> str:  # type: ignore[override]
        """The Read tool (of a subagent, with `agent_id`): read the file, then the PostToolUse hook
        with what was read."""
        text = super().read(path)
        self.hook(event("PostToolUse", self.id, self.cwd, "Read", path, read_response(path, text), agent_id=agent_id))
        return text

    def tool_write(self, path: Path, content: str, mode: str = "rename") -> dict[str, object]:
        """Claude's write sequence alone (a node child of this process), with no hook around it."""
        return self.run("node", "-e", CLAUDE_WRITE, str(path), content, mode)

    def own_write(self, path: Path, content: str) -> dict[str, object]:
        """A write from this process itself (as Claude Code's Node process makes it), no hook around it."""
        return super().write(path, content)

    def write(self, path: Path, content: str, agent_id: str | None = None) -> dict[str, object]:  # type: ignore[override]
        """The Write tool: PreToolUse hook; if allowed, Claude's write sequence, then PostToolUse."""
        written = {"content": content}
        pre = self.hook(event("PreToolUse", self.id, self.cwd, "Write", path, tool_input=written, agent_id=agent_id))
        verdict = json.loads(str(pre["stdout"])).get("hookSpecificOutput", {}) if pre["stdout"] else {}
        decision = verdict.get("permissionDecision", "allow")
        if decision == "allow":
            assert self.tool_write(path, content)["code"] == 0
            post = event("PostToolUse", self.id, self.cwd, "Write", path, {"type": "update"}, agent_id=agent_id)
            self.hook(post)
        return {"decision": decision, "reason": pre["stdout"]}

    def close(self) -> None:
        self.hook(event("SessionEnd", self.id, self.cwd))
        super().close()


def version(root: Path, rel: str = P) -> int:
    with CoherentVolume(root, agent="observer") as v:
        return v.version(rel)


@pytest.fixture
def sessions():
    yield from started(Session)


def _scenario(workdir: Path, root: Path, sessions, mounted: bool) -> None:
    target = workdir / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = sessions("s1", workdir), sessions("s2", workdir)
    assert one.read(target) == "v1\n"
    assert two.read(target) == "v1\n"
    assert two.write(target, "v2 by session two\n")["decision"] == "allow"
    assert target.read_text() == "v2 by session two\n" and version(root) == 2

    denied = one.write(target, "v2 by session one, built on v1\n")
    assert denied["decision"] == "deny"
    reason = json.loads(str(denied["reason"]))["hookSpecificOutput"]["permissionDecisionReason"]
    for words in (
        "plans/plan.md",
        "version 1",
        "current version is 2",
        f"claude:{unique('s2')}",
        "Read the file again",
    ):
        assert words in reason
    assert "What changed since version 1 (unified diff to version 2):\n--- plans/plan.md@v1\n" in reason
    assert "\n-v1\n+v2 by session two\n" in reason and reason.endswith("redo your change from its current content.")
    if mounted:  # even without the hook for this tool, the file system refuses both of Claude's paths
        for mode in ("rename", "in-place"):
            forced = one.tool_write(target, "forced stale write\n", mode)
            assert forced["code"] != 0 and "EACCES" in str(forced["stderr"])
    assert target.read_text() == "v2 by session two\n" and version(root) == 2

    assert one.read(target) == "v2 by session two\n"
    assert one.write(target, "v3 by session one\n")["decision"] == "allow"
    assert target.read_text() == "v3 by session one\n"
    assert version(root) == 3


def test_stale_write_denied_without_a_mount(root: Path, sessions) -> None:
    _scenario(root, root, sessions, mounted=False)


def test_stale_write_denied_by_hook_and_file_system_on_a_mount(mounted: Mount, sessions) -> None:
    _scenario(mounted.path, mounted.root, sessions, mounted=True)


def test_on_a_mount_the_session_is_its_process_from_its_start(mounted: Mount, sessions, tmp_path: Path) -> None:
    """SessionStart binds the Claude Code process, so its first read through the mount is already
    the session's. (The mount caches whose a process is for a moment: had it seen the process
    unbound, the write right after the hooks would be refused `held` by the session's own grant.)"""
    target = mounted.path / P
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("started", mounted.path, start_in=tmp_path)  # nothing of the mount seen before SessionStart
    assert s.hook(event("SessionStart", "started", mounted.path, source="startup")) == {
        "code": 0,
        "stdout": "",
        "stderr": "",
    }
    assert s.read(target) == "v1\n"  # the Read tool: this process reads through the mount, then PostToolUse
    pre = event("PreToolUse", "started", mounted.path, "Write", target, tool_input={"content": "v2\n"})
    assert decision(s.hook(pre))[0] == "allow"
    written = s.own_write(target, "v2 by the session\n")
    assert written["code"] == 0, written
    assert s.hook(event("PostToolUse", "started", mounted.path, "Write", target, {"type": "update"}))["stdout"] == ""
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert (v.read_text(P), v.version(P), v.history(P)[0].writer) == (
            "v2 by the session\n",
            2,
            f"claude:{unique('started')}",
        )


def test_a_session_cleared_without_its_session_end_leaves_its_process_to_the_new_one(
    mounted: Mount, sessions, tmp_path: Path
) -> None:
    """/clear starts a new session in the same Claude Code process. Where the old one's SessionEnd
    never ran (killed, timed out, an older Claude Code), the process stayed bound to both and the
    mount took it for the old session: a write the hook allowed failed EACCES, and a blind write of
    a file only the old session had read went through as the old session's (found by a hostile
    probe). The process is the new session's alone, once the mount's memory of whose a process is
    (a second) has expired."""
    from fusefs import identity

    other = "plans/other.md"
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.write(other, "other v1\n")
    s = sessions("before-clear", mounted.path, start_in=tmp_path)
    s.hook(event("SessionStart", "before-clear", mounted.path, source="startup"))
    s.read(mounted.path / P)
    s.read(mounted.path / other)
    s.id = "after-clear"  # the same process, a new session: no SessionEnd came for the old one
    s.hook(event("SessionStart", "after-clear", mounted.path, source="clear"))
    time.sleep(identity.CACHE_SECONDS + 0.2)  # what the mount remembers of whose the process is expires (docs)
    blind = s.own_write(mounted.path / other, "blind write\n")
    assert blind["code"] != 0 and "Permission denied" in str(blind["stderr"]), blind
    with CoherentVolume(mounted.root, agent="peer") as peer:
        peer.read(P)
        peer.write(P, "v2 by a peer\n")
    assert s.read(mounted.path / P) == "v2 by a peer\n"
    pre = event("PreToolUse", "after-clear", mounted.path, "Write", mounted.path / P, tool_input={"content": "v3\n"})
    assert decision(s.hook(pre))[0] == "allow"
    written = s.own_write(mounted.path / P, "v3\n")
    assert written["code"] == 0, written
    s.hook(event("PostToolUse", "after-clear", mounted.path, "Write", mounted.path / P, {"type": "update"}))
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert v.read_text(other) == "other v1\n"
        assert [(e.version, e.writer) for e in v.history(P)][0] == (3, f"claude:{unique('after-clear')}")


def test_a_partial_read_past_another_writers_change_tells_the_model_what_changed(root: Path, sessions) -> None:
    """A Read of lines 10-20 registers the view at the current version, which another writer changed
    in line 1 since the session's last Read: the model is told that change (its diff), so a Write of
    the whole file from what it knew does not drop it unnoticed (found by a hostile tester: the view
    moved silently and the Write went through over the peer's line)."""
    lines = [f"line {i}" for i in range(1, 31)]
    s = sessions("partly", root)
    text = "\n".join(lines) + "\n"
    target = changed_after_read(root, P, s.read, text, text.replace("line 1\n", "BOB LINE\n", 1))
    part = {
        "filePath": str(target),
        "content": "\n".join(lines[9:20]),
        "numLines": 11,
        "startLine": 10,
        "totalLines": 30,
    }
    told = _context(s.hook(event("PostToolUse", s.id, s.cwd, "Read", target, {"type": "text", "file": part})))
    assert told is not None and "shown only part" in told and "+BOB LINE" in told and "written by bob" in told, told


def test_a_file_a_peer_deleted_can_be_made_again_after_the_read_tool_found_it_gone(root: Path, sessions) -> None:
    """The deny of a write onto a file a peer deleted since the session read it says to read it
    again; the Read tool then fails (no file), which shows the model the deletion: its view is
    registered there, so the next Write makes the file anew (before: no view was registered, and
    every Write was denied `stale` again)."""
    s = sessions("remake", root)
    target = deleted_after_read(root, P, s.read)
    write = event("PreToolUse", "remake", root, "Write", target, tool_input={"content": "made again\n"})
    assert decision(s.hook(write))[0] == "deny"
    # a Read that failed for another reason showed the model nothing of the file: no view
    too_large = event("PostToolUseFailure", "remake", root, "Read", target, error="File content exceeds maximum size")
    assert s.hook(too_large)["code"] == 0
    assert decision(s.hook(write))[0] == "deny"
    failed = event("PostToolUseFailure", "remake", root, "Read", target, error="File does not exist.")
    assert s.hook(failed)["code"] == 0
    assert decision(s.hook(write))[0] == "allow"
    assert s.own_write(target, "made again\n")["code"] == 0
    s.hook(event("PostToolUse", "remake", root, "Write", target, {"type": "create"}))
    with CoherentVolume(root, agent="observer") as v:
        assert [(e.version, e.kind, e.writer) for e in v.history(P)][:2] == [
            (3, "commit", f"claude:{unique('remake')}"),
            (2, "delete", "peer"),
        ]


@pytest.mark.parametrize(
    ("peer", "own", "edit", "written"),
    [
        (None, "v2\nend\n", ("end\n", "added\nend\n"), ("v2\nadded\nend\n", "v2\nend\n")),
        (
            "peer line\nEND\n",
            "peer line\nMINE v3\nEND\n",
            ("END\n", "edited\nEND\n"),
            ("peer line\nEND\n", "peer line\nedited\nEND\n"),
        ),
    ],
    ids=["tools-write-undone", "earlier-version-put-back-first"],
)
def test_an_edit_a_program_interferes_with_after_the_sessions_own_write_is_told(
    root: Path, sessions, peer: str | None, own: str, edit: tuple[str, str], written: tuple[str, str]
) -> None:
    """The session's Write made the current version (its view there), and its next Edit passed its
    check; then the file is `written` twice: the Edit's write and a program's save of what it had
    open (the session's own version back), or a program putting an earlier version back (`git
    checkout`) and the Edit's write of what it found (the session's own line gone). Either way the
    file is not what the Edit made of the version its check found, and the model is told (only on
    a mount, where the file system commits the tool's write and moves the view, is the version
    before the view a base too)."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\nEND\n")
    if peer is not None:
        with CoherentVolume(root, agent="peer") as other:
            other.read(P)
            other.write(P, peer)
    s = sessions("interfered", root)
    s.read(target)
    assert s.write(target, own)["decision"] == "allow"
    tool_input = {"old_string": edit[0], "new_string": edit[1]}
    assert decision(s.hook(event("PreToolUse", s.id, root, "Edit", target, tool_input=tool_input)))[0] == "allow"
    for content in written:
        target.write_text(content)
    post = s.hook(event("PostToolUse", s.id, root, "Edit", target, {"filePath": str(target)}, tool_input=tool_input))
    assert "does not hold what your tool just wrote" in str(post["stdout"]), post


def test_a_command_writing_two_files_whose_second_record_fails_names_that_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry fails while a Bash command's second file is recorded, after its first was: the
    model is told which one was not recorded as its own; the first stays the session's."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/a.md", "a\n")
        setup.write("plans/b.md", "b\n")
    for rel in ("plans/a.md", "plans/b.md"):
        _in_process("PostToolUse", "two", root, "Read", root / rel, read_response(root / rel, rel[-4] + "\n"))
    command = "echo A > plans/a.md; echo B > plans/b.md"
    pre = handle(bash_event("PreToolUse", "two", root, command), Progress(), current_process())
    assert decision({"stdout": pre.stdout, "code": pre.code})[0] == "allow"
    (root / "plans/a.md").write_text("A\n")
    (root / "plans/b.md").write_text("B\n")
    adopt = VolumeCore.adopt

    def fails_for_b(core: VolumeCore, agent: str, target: Target, *args: object, **kwargs: object) -> int | None:
        if target.rel == "plans/b.md":
            raise RegistryError("the registry at db:5432 is unreachable (connection refused); nothing was written.")
        return adopt(core, agent, target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(VolumeCore, "adopt", fails_for_b)
    after = handle(bash_event("PostToolUse", "two", root, command), Progress(), current_process())
    monkeypatch.undo()
    told = json.loads(after.stdout)["reason"]
    assert "your write to plans/b.md could not be recorded as yours" in told and "plans/a.md" not in told, told
    with CoherentVolume(root, agent="observer") as v:
        assert v.history("plans/a.md")[0].writer == f"claude:{unique('two')}"


@pytest.mark.parametrize(
    ("tool", "edit"),
    [
        ("Edit", {"old_string": "end\n", "new_string": "added\nend\n"}),
        ("MultiEdit", {"edits": [{"old_string": "end\n", "new_string": "added\nend\n"}]}),
    ],
)
def test_on_a_mount_an_edit_is_the_sessions_own_version_and_nothing_is_told(
    mounted: Mount, sessions, tool: str, edit: dict[str, object]
) -> None:
    """On a mount the file system commits an edit as the session's (its view moves there) before
    PostToolUse: the end-of-tool check finds the session's own version, tells the model nothing, and
    its next edit goes ahead. (Applying the edit to the session's version again would add a second
    line: no test of what the file holds.)"""
    target = mounted.path / P
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\nend\n")
    s = sessions("medit", mounted.path)
    s.hook(event("SessionStart", s.id, mounted.path, source="startup"))
    s.read(target)
    assert decision(s.hook(event("PreToolUse", s.id, mounted.path, tool, target, tool_input=edit)))[0] == "allow"
    assert s.tool_write(target, "v1\nadded\nend\n")["code"] == 0
    post = s.hook(event("PostToolUse", s.id, mounted.path, tool, target, {"filePath": str(target)}, tool_input=edit))
    assert post["stdout"] == "", post
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)] == [(2, f"claude:{unique('medit')}"), (1, "setup")]
    again = {"old_string": "v1", "new_string": "v2"}
    assert decision(s.hook(event("PreToolUse", s.id, mounted.path, "Edit", target, tool_input=again)))[0] == "allow"


def test_edit_of_a_never_read_file_is_denied(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "exists\n")
    s = sessions("fresh", root)
    answer = s.hook(event("PreToolUse", "fresh", root, "Edit", root / P))
    out = json.loads(str(answer["stdout"]))["hookSpecificOutput"]
    assert (
        out["permissionDecision"] == "deny" and "no read of it by you is on record" in out["permissionDecisionReason"]
    )


def test_unmanaged_new_and_outside_files_are_allowed(root: Path, tmp_path: Path, sessions) -> None:
    s = sessions("free", root)
    for path in (root / "notes.txt", root / "plans/brand-new.md", tmp_path / "elsewhere.md"):
        assert s.hook(event("PreToolUse", "free", root, "Write", path))["stdout"] == ""


def test_a_read_the_model_did_not_see_registers_no_view(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "current\n")
    s = sessions("late", root)
    s.hook(event("PostToolUse", "late", root, "Read", root / P, read_response(root / P, "an older text\n")))
    answer = s.hook(event("PreToolUse", "late", root, "Write", root / P))
    assert json.loads(str(answer["stdout"]))["hookSpecificOutput"]["permissionDecision"] == "deny"


def test_a_read_that_showed_the_model_nothing_checkable_registers_no_view(root: Path, sessions) -> None:
    """A Read past the end (no line of a non-empty file), an error, a bare string and a response
    without the file's text show nothing the hook can check against the file: no view, so a write
    is refused `unread`. An empty file read whole, and a notebook whose cells are the file's, do."""
    ten = "".join(f"line {i}\n" for i in range(1, 11))
    notebook = {"cells": [{"cell_type": "code", "source": ["x = 1\n", "y = 2"]}], "metadata": {}, "nbformat": 4}
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, ten)
        setup.write("plans/empty.md", "")
        setup.write("plans/nb.ipynb", json.dumps(notebook))
    past_end = {"type": "text", "file": {"filePath": str(root / P), "content": "", "startLine": 500}}
    cells = [{"cellType": "code", "source": "x = 1\ny = 2", "cell_id": "0"}]
    shown = {"type": "notebook", "file": {"filePath": str(root / "plans/nb.ipynb"), "cells": cells}}
    wrong = {"type": "notebook", "file": {"filePath": str(root / "plans/nb.ipynb"), "cells": [{"source": "x = 9"}]}}
    cases = [
        (P, past_end, "deny"),
        (P, {"error": "File does not exist."}, "deny"),
        (P, "     1\tline 1\n", "deny"),
        (P, {"type": "text"}, "deny"),
        ("plans/nb.ipynb", wrong, "deny"),
        ("plans/empty.md", read_response(root / "plans/empty.md", ""), "allow"),
        ("plans/nb.ipynb", shown, "allow"),
    ]
    s = sessions("nothing", root)
    for i, (rel, response, expected) in enumerate(cases):
        sub = f"reader-{i}"
        s.hook(event("PostToolUse", "nothing", root, "Read", root / rel, response, agent_id=sub))
        verdict, reason = decision(s.hook(event("PreToolUse", "nothing", root, "Write", root / rel, agent_id=sub)))
        assert verdict == expected, (rel, response, reason)
        assert expected == "allow" or "(unread)" in reason, reason
        s.hook(event("PostToolUseFailure", "nothing", root, "Write", root / rel, agent_id=sub))


def test_resumed_processes_of_one_pid_on_three_hosts_are_three_agents(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One session resumed by processes that share a pid on three hosts (or containers): each is an
    agent of its own (a fork name shared by two would make them one agent, each passing for the
    other's reads), and each keeps its name from one hook to the next."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))  # the session's note of its volumes
    CoherentVolume(root).close()
    core = open_core(str(root))
    try:
        actors = [Actor("claude:s", "claude:s", ProcessId(host, 100, 7)) for host in ("host-a", "host-b", "host-c")]
        joined = [hook_steps._joined(core, actor).agent for actor in actors]
        assert joined[0] == "claude:s" and len(set(joined)) == 3, joined
        assert [hook_steps.acting(core, actor).agent for actor in actors] == joined
        assert [hook_steps._joined(core, actor).agent for actor in actors] == joined
    finally:
        core.close()


def test_two_processes_of_one_session_are_two_agents(root: Path, sessions) -> None:
    """`claude --resume ID` in two terminals: two live processes on one session id. The second is
    an agent of its own (`claude:ID~<pid>`) whose views start as the session's, so neither passes
    for the other's reads: while one holds its grant the other is refused `held`, and after one's
    write the other's write built on the old version is refused `stale`. A session resumed after its
    process died is the session again, with its views."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one = Session("same", root)
    try:
        one.hook(event("SessionStart", "same", root, source="startup"))
        one.read(target)
        two = sessions("same", root)
        two.hook(event("SessionStart", "same", root, source="resume"))
        assert decision(one.hook(event("PreToolUse", "same", root, "Write", target)))[0] == "allow"
        verdict, reason = decision(two.hook(event("PreToolUse", "same", root, "Write", target)))
        assert verdict == "deny" and "(held)" in reason and f"claude:{unique('same')} holds its write grant" in reason
        assert one.tool_write(target, "v2 by one\n")["code"] == 0
        one.hook(event("PostToolUse", "same", root, "Write", target, {"type": "update"}))
        told = _context(two.hook(event("UserPromptSubmit", "same", root, prompt="go on")))
        assert (
            f"plans/plan.md: you last read version 1; it is now version 2, written by claude:{unique('same')}"
            in str(told)
        )

        denied = two.write(target, "v2 by two, built on v1 (the read both conversations hold)\n")
        reason = json.loads(str(denied["reason"]))["hookSpecificOutput"]["permissionDecisionReason"]
        assert denied["decision"] == "deny" and "(stale)" in reason and "version 1" in reason, reason
        assert target.read_text() == "v2 by one\n"
        log = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True).stdout
        refusals = [e for e in map(json.loads, log.splitlines()) if e["kind"] == "refusal"]
        assert [e["reason"] for e in refusals] == ["held", "stale"]
        fork = rf"claude:{re.escape(unique('same'))}~{two.proc.pid}-[0-9a-f]{{6}}"
        assert all(re.fullmatch(fork, e["agent"]) for e in refusals), refusals
        assert decision(one.hook(event("PreToolUse", "same", root, "Edit", target)))[0] == "allow"
        two.hook(event("SessionEnd", "same", root, reason="exit"))
        status = subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, check=True)
        holders = [f["holder"] for f in json.loads(status.stdout)["files"] if f["path"] == P]
        assert holders == [f"claude:{unique('same')}"], (
            "the second process's SessionEnd ends its own agent, not the session"
        )
        one.hook(event("PostToolUseFailure", "same", root, "Edit", target))
    finally:
        one.proc.kill()  # dies without SessionEnd, as a closed terminal does
        one.proc.wait()
    three = sessions("same", root)
    three.hook(event("SessionStart", "same", root, source="resume"))
    assert three.write(target, "v3, resumed after one died\n")["decision"] == "allow", "its views are the session's"
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)][:2] == [
            (3, f"claude:{unique('same')}"),
            (2, f"claude:{unique('same')}"),
        ]


def test_a_sessions_end_reaches_its_volumes_after_a_second_process_of_it_ended(
    root: Path, tmp_path: Path, sessions
) -> None:
    """One session in two processes, both working outside every volume: the first takes a grant in
    the volume (its note of the volumes it works in now names it); the second starts and ends. The
    note outlives the second's end, so the first's own SessionEnd still reaches the volume and
    releases its grant; the note goes with the last process's end."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    one = Session("twice", elsewhere)
    try:
        one.hook(event("SessionStart", "twice", elsewhere, source="startup"))
        pre = event("PreToolUse", "twice", elsewhere, "Write", root / "plans/new.md", tool_input={"content": "x\n"})
        assert decision(one.hook(pre))[0] == "allow"
        two = sessions("twice", elsewhere)
        two.hook(event("SessionStart", "twice", elsewhere, source="resume"))
        two.hook(event("SessionEnd", "twice", elsewhere, reason="exit"))
        note = session_file("volumes", f"claude:{unique('twice')}")
        assert note is not None and note.exists(), "the note outlives the end of one of the session's processes"
        one.hook(event("SessionEnd", "twice", elsewhere, reason="exit"))
        status = subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, check=True)
        assert [f["holder"] for f in json.loads(status.stdout)["files"] if f["holder"]] == [], "its grant is released"
        assert not note.exists(), "the note goes with the end of the session's last process"
    finally:
        one.proc.kill()
        one.proc.wait()


def test_bad_events_fail_open_with_a_warning(root: Path) -> None:
    for payload in ("not json", "[]", json.dumps({"hook_event_name": "PreToolUse"})):
        r = subprocess.run([CLI, "hook", "claude-code"], input=payload, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout == "" and "coherent-volume" in r.stderr


def test_an_event_whose_input_never_ends_is_not_waited_for_past_the_budget(root: Path) -> None:
    """An agent that writes its event and keeps standard input open gets an answer within the
    hook's budget, blocking the action and saying why, not when (if ever) the pipe closes."""
    event = {"session_id": "s", "hook_event_name": "PreToolUse", "tool_name": "Write", "cwd": str(root)}
    event["tool_input"] = {"file_path": str(root / "plans/plan.md"), "content": "x"}
    budget = claude_code.hooks.HOOK_BUDGET
    started = time.monotonic()
    hook = subprocess.Popen([CLI, "hook", "claude-code"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert hook.stdin is not None and hook.stderr is not None
        hook.stdin.write(json.dumps(event).encode())
        hook.stdin.flush()  # and left open
        code = hook.wait(timeout=budget + 5)
        took = time.monotonic() - started
        err = hook.stderr.read()
    finally:
        hook.kill()
        hook.wait()
    assert code == 2 and b"did not end on standard input" in err and took < budget + 2, (code, err, took)


def test_session_end_releases_grants(root: Path, sessions) -> None:
    s = sessions("ender", root)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import time
from coherent_volume import CoherentVolume
with CoherentVolume({str(root)!r}, agent="claude:{unique("ender")}").lock({P!r}, ttl=3600):
    print("locked", flush=True)
    time.sleep(60)
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with CoherentVolume(root, agent="other") as other:
            with pytest.raises(PermissionError):
                other.write(P, "blocked")
            s.hook(event("SessionEnd", "ender", root))
            assert other.write(P, "free again") == 1
    finally:
        holder.kill()
        holder.wait()


def test_install_and_uninstall_round_trip_keep_other_settings(tmp_path: Path) -> None:
    settings = tmp_path / "proj/.claude/settings.json"
    settings.parent.mkdir(parents=True)
    original = {
        "model": "opus",
        "hooks": {"PreToolUse": [{"matcher": "Bash", "hooks": [{"type": "command", "command": "echo mine"}]}]},
    }
    settings.write_text(json.dumps(original))
    r = subprocess.run([CLI, "claude-code", "install", str(tmp_path / "proj")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = json.loads(settings.read_text())
    assert installed["model"] == "opus"
    assert installed["hooks"]["PreToolUse"][0]["hooks"][0]["command"] == "echo mine"
    assert set(installed["hooks"]) == {
        "PreToolUse",
        "PostToolUse",
        "PostToolUseFailure",
        "UserPromptSubmit",
        "SubagentStop",
        "SessionStart",
        "SessionEnd",
    }
    assert all(
        h["timeout"] == claude_code.hooks.HOOK_TIMEOUT
        for entries in installed["hooks"].values()
        for e in entries
        for h in e["hooks"]
        if h["command"] != "echo mine"
    )
    command = installed["hooks"]["SessionEnd"][0]["hooks"][0]["command"]
    assert command.endswith("coherent-volume hook claude-code") and os.path.isabs(command.split()[0])
    subprocess.run([CLI, "claude-code", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == installed, "install is idempotent"
    subprocess.run([CLI, "claude-code", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == original


def test_an_installation_under_a_path_with_a_space_writes_hooks_that_run(tmp_path: Path) -> None:
    """The CLI's path is quoted in the hook command: an installation under "my venv" installs a hook
    the agent's shell runs (before, `sh -c` split the path and exited 127, which Claude Code takes for
    a non-blocking error, so no write was checked: /tmp/s32r2hooks 4). Another installation's install
    takes that hook for ours and replaces it, and its uninstall removes it."""
    spaced = tmp_path / "my venv/bin"
    spaced.mkdir(parents=True)
    (spaced / "coherent-volume").symlink_to(CLI)
    proj = tmp_path / "proj"
    proj.mkdir()
    env = {**os.environ, "PATH": f"{spaced}:{os.environ.get('PATH', '')}"}
    subprocess.run([str(spaced / "coherent-volume"), "claude-code", "install", str(proj)], check=True, env=env)
    settings = proj / ".claude/settings.json"
    command = json.loads(settings.read_text())["hooks"]["PreToolUse"][0]["hooks"][0]["command"]
    assert command == f"{shlex.quote(str(spaced / 'coherent-volume'))} hook claude-code", command
    r = subprocess.run(["sh", "-c", command], input="not json", capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "coherent-volume" in r.stderr, (r.returncode, r.stderr)

    def commands() -> list[str]:
        hooks = json.loads(settings.read_text()).get("hooks", {})
        return [h["command"] for entries in hooks.values() for e in entries for h in e["hooks"]]

    subprocess.run([CLI, "claude-code", "install", str(proj)], check=True, capture_output=True)
    assert len(commands()) == len(json.loads(settings.read_text())["hooks"]), commands()
    assert not any("my venv" in c for c in commands()), commands()
    subprocess.run([str(spaced / "coherent-volume"), "claude-code", "install", str(proj)], check=True, env=env)
    subprocess.run([CLI, "claude-code", "uninstall", str(proj)], check=True, capture_output=True)
    assert commands() == []


def test_our_hook_commands_are_told_from_the_users_by_their_whole_form(tmp_path: Path) -> None:
    """`hook_settings.ours`: another installation's command, its path quoted as install quotes it
    (`shlex.quote`), or written unquoted by an install before that (its first word no program, so
    the shell cannot start it), is ours; a command of the user's that runs (a program given our
    command's words) or does more is not."""
    spaced = f"{tmp_path}/my venv/bin/coherent-volume"
    assert hook_settings.ours(f"{shlex.quote(spaced)} hook gemini", "gemini")
    assert hook_settings.ours(f"{spaced} hook gemini", "gemini")
    assert hook_settings.ours("/opt/cv/bin/coherent-volume hook gemini", "gemini")
    assert not hook_settings.ours(f"{shlex.quote(spaced)} hook cursor", "gemini")
    assert not hook_settings.ours("/bin/echo /usr/bin/coherent-volume hook gemini", "gemini")
    assert not hook_settings.ours("/opt/cv/bin/coherent-volume hook gemini; rm -rf ~", "gemini")
    assert not hook_settings.ours(f"{shlex.quote(spaced)} hook gemini && echo", "gemini")
    assert not hook_settings.ours(f'"{spaced}" hook gemini $(id)', "gemini")


def test_install_and_uninstall_write_through_a_linked_settings_file(tmp_path: Path) -> None:
    """A settings file kept elsewhere and linked in (dotfiles) stays linked, its target changed and
    its permissions kept (before: the link was replaced by a plain file, the target left as it was)."""
    kept = tmp_path / "dotfiles/claude-settings.json"
    kept.parent.mkdir()
    kept.write_text(json.dumps({"model": "opus"}))
    kept.chmod(0o600)
    settings = tmp_path / "proj/.claude/settings.json"
    settings.parent.mkdir(parents=True)
    settings.symlink_to(kept)
    subprocess.run([CLI, "claude-code", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert settings.is_symlink() and "SessionStart" in json.loads(kept.read_text())["hooks"]
    assert kept.stat().st_mode & 0o777 == 0o600
    subprocess.run([CLI, "claude-code", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
    assert settings.is_symlink() and json.loads(kept.read_text()) == {"model": "opus"}
    assert sorted(p.name for p in kept.parent.iterdir()) == ["claude-settings.json"]


def test_install_refuses_a_broken_settings_file(tmp_path: Path) -> None:
    settings = tmp_path / ".claude/settings.json"
    settings.parent.mkdir()
    settings.write_text("{not json")
    r = subprocess.run([CLI, "claude-code", "install", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "is not plain JSON" in r.stderr
    assert settings.read_text() == "{not json"
    assert our_hooks("x")["PreToolUse"][0]["matcher"] == "Write|Edit|MultiEdit|NotebookEdit|Bash"
    FACE.install(tmp_path / "new/settings.json", "x hook claude-code")
    FACE.uninstall(tmp_path / "new/settings.json", "x hook claude-code")
    assert json.loads((tmp_path / "new/settings.json").read_text()) == {}
    FACE.install(tmp_path / "new/settings.json", "x hook claude-code")
    FACE.uninstall(tmp_path / "new/settings.json")  # only a command install writes is ours (/tmp/s32hookgc 2)
    assert "x hook claude-code" in (tmp_path / "new/settings.json").read_text()


def decision(answer: dict[str, object]) -> tuple[str, str]:
    """(permissionDecision, reason) of a PreToolUse answer; ("allow", "") when it printed nothing."""
    if not answer["stdout"]:
        return "allow", ""
    out = json.loads(str(answer["stdout"]))["hookSpecificOutput"]
    return out["permissionDecision"], out["permissionDecisionReason"]


def test_a_held_denial_of_a_file_no_one_made_yet_says_so(root: Path, sessions) -> None:
    """Two sessions writing a new file: the second is told no version exists yet and who holds it,
    not that it has not read it, nor a version 0 "written by None" (found by a hostile probe)."""
    target = root / "plans" / "new.md"
    one, two = sessions("n1", root), sessions("n2", root)
    assert decision(one.hook(event("PreToolUse", "n1", root, "Write", target)))[0] == "allow"
    verdict, reason = decision(two.hook(event("PreToolUse", "n2", root, "Write", target)))
    assert verdict == "deny" and "plans/new.md (held): no version of it exists yet." in reason, reason
    assert f"claude:{unique('n1')} holds its write grant" in reason and "(if it exists by then)" in reason
    assert "None" not in reason and "no read of it" not in reason, reason


def test_a_held_denial_by_a_long_lock_says_not_to_wait_and_who_can_end_it(root: Path, sessions) -> None:
    """A live process's 600 s lock: the denial said its holder was "writing it right now" and to wait a
    few seconds, so the model waited in a loop for ten minutes (found by a hostile probe)."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one = sessions("l1", root)
    one.read(target)
    with CoherentVolume(root, agent="locker") as locker, locker.lock(P, ttl=600):
        verdict, reason = decision(one.hook(event("PreToolUse", "l1", root, "Write", target)))
    assert verdict == "deny" and "(held)" in reason and "locker holds its write grant" in reason, reason
    assert "It is held by a lock until" in reason and "do not wait for it in a loop" in reason, reason
    assert f"`coherent-volume reclaim {root} {P}`" in reason and "Wait a few seconds" not in reason


def test_pre_tool_use_holds_the_grant_until_post_tool_use(root: Path, sessions) -> None:
    """Check and write are one step: between one session's PreToolUse and PostToolUse another
    session's PreToolUse is refused `held`, with a remedy that says to wait, not to re-read."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = sessions("g1", root), sessions("g2", root)
    one.read(target)
    two.read(target)
    assert decision(one.hook(event("PreToolUse", "g1", root, "Write", target)))[0] == "allow"
    verdict, reason = decision(two.hook(event("PreToolUse", "g2", root, "Edit", target)))
    assert verdict == "deny" and "(held)" in reason and f"claude:{unique('g1')} holds its write grant" in reason
    assert "Wait a few seconds" in reason
    assert one.tool_write(target, "v2 by one\n")["code"] == 0
    assert one.hook(event("PostToolUse", "g1", root, "Write", target, {"type": "update"}))["stdout"] == ""
    assert version(root) == 2
    verdict, reason = decision(two.hook(event("PreToolUse", "g2", root, "Edit", target)))
    assert verdict == "deny" and "(stale)" in reason and "Read the file again" in reason, "released, but stale"
    two.read(target)
    assert decision(two.hook(event("PreToolUse", "g2", root, "Edit", target)))[0] == "allow"


def test_a_read_of_the_whole_file_registers_no_view_of_a_longer_version_made_before_its_hook(
    root: Path, sessions
) -> None:
    """The Read tool showed the whole file ("a"); a peer appends a line before the PostToolUse Read
    reaches the hook: the file starts with what the model saw, but the model saw all of it, and
    this is more, so the view is the version it saw, and a Write built on "a" is refused `stale`
    with the peer's line in its diff."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "a\n")
    s = sessions("whole", root)
    text = target.read_text()
    with CoherentVolume(root, agent="peer") as peer:
        peer.read(P)
        peer.write(P, "a\npeer line\n")
    s.hook(event("PostToolUse", s.id, root, "Read", target, read_response(target, text)))
    written = {"content": "a\nmine\n"}
    verdict, reason = decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))
    assert verdict == "deny" and "(stale)" in reason and "+peer line" in reason, reason
    assert target.read_text() == "a\npeer line\n"


def test_a_write_another_writer_changes_before_the_tools_end_is_recorded_as_theirs_and_told(
    root: Path, sessions
) -> None:
    """Between the Write tool's write and its PostToolUse, a program outside the hooks rewrites
    the file: the hook finds bytes the tool did not write, records them as a change by `external`
    (not the session's), tells the model, and leaves its view where it was, so its next write is
    refused `stale` until it reads the file again."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("after", root)
    s.read(target)
    written = {"content": "v2 by the session\n"}
    assert decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))[0] == "allow"
    assert s.tool_write(target, "v2 by the session\n")["code"] == 0
    target.write_text("a script's line\n")
    post = s.hook(event("PostToolUse", s.id, root, "Write", target, {"type": "update"}, tool_input=written))
    told = json.loads(str(post["stdout"]))["reason"]
    assert "does not hold what your tool just wrote" in told, told
    assert "of yours" not in told, "no other call of the session was under way"
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)][0] == (2, "external")
    verdict, reason = decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))
    assert verdict == "deny" and "(stale)" in reason, reason
    s.read(target)
    assert decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))[0] == "allow"


def test_two_writes_of_one_file_at_once_are_told_that_the_other_call_may_have_written_it(root: Path, sessions) -> None:
    """Two Write calls of one session on one file at once: both checked, A written, then B, then
    the first call's end finds B. It told the model that another writer changed the file meanwhile,
    but the only other writer was the session's own second call (/tmp/s31hookproto 4): it is told
    that another call of its own that has not ended may have written it. The second call's end
    records B as the session's; the check is as strict as before (the first call's end still
    records no write of A)."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("parallel", root)
    s.read(target)

    def call(name: str, call_id: str, text: str, response: object = None) -> dict[str, object]:
        return event(name, s.id, root, "Write", target, response, tool_input={"content": text}, tool_use_id=call_id)

    assert decision(s.hook(call("PreToolUse", "toolu_a", "A\n")))[0] == "allow"
    assert decision(s.hook(call("PreToolUse", "toolu_b", "B\n")))[0] == "allow"
    assert s.tool_write(target, "A\n")["code"] == 0
    assert s.tool_write(target, "B\n")["code"] == 0
    first = s.hook(call("PostToolUse", "toolu_a", "A\n", {"type": "update"}))
    told = json.loads(str(first["stdout"]))["reason"]
    assert "another tool call of yours that has not ended yet" in told, told
    assert "another writer changed it meanwhile" in told, "it may still be another writer's"
    assert s.hook(call("PostToolUse", "toolu_b", "B\n", {"type": "update"}))["stdout"] == ""
    with CoherentVolume(root, agent="observer") as v:
        assert [h.writer for h in v.history(P)][0] == f"claude:{unique('parallel')}"


@pytest.mark.parametrize(
    ("before", "edit", "after"),
    [
        (b"one\ntwo\n", {"old_string": "two", "new_string": "TWO"}, b"one\nTWO\n"),
        # Claude Code edits a CRLF file's text with LF line ends, then puts the CRLFs back
        (b"a\r\nb\r\nc\r\n", {"old_string": "b", "new_string": ""}, b"a\r\nc\r\n"),
        # and strips the spaces at the ends of an Edit's new lines
        (b"one\ntwo\n", {"old_string": "two", "new_string": "TWO  "}, b"one\nTWO\n"),
    ],
    ids=["plain", "crlf-line-deleted", "trailing-spaces-stripped"],
)
def test_an_edits_result_at_its_end_is_the_sessions_version(
    root: Path, sessions, before: bytes, edit: dict[str, str], after: bytes
) -> None:
    """A file holding, at the Edit's PostToolUse, what Claude Code makes of the version the session
    read is the session's own version (no change by another writer, nothing told), and its view
    moves there: its next edit goes ahead."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, before)
    s = sessions("edit", root)
    s.read(target)
    assert decision(s.hook(event("PreToolUse", s.id, root, "Edit", target, tool_input=edit)))[0] == "allow"
    target.write_bytes(after)
    post = s.hook(event("PostToolUse", s.id, root, "Edit", target, {"filePath": str(target)}, tool_input=edit))
    assert post["stdout"] == "", post
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)][0] == (2, f"claude:{unique('edit')}")
    written = {"content": "next\n"}
    assert decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))[0] == "allow"


@pytest.mark.parametrize(
    ("line", "shown"),
    [("x" * 3000, "x" * 2000), ("\U0001f600" * 1500, "\U0001f600" * 1000)],
    ids=["ascii", "emoji-cut-in-utf16-units"],
)
def test_a_read_showing_a_long_line_cut_registers_the_view(root: Path, sessions, line: str, shown: str) -> None:
    """The Read tool shows a line of more than 2,000 UTF-16 units (a JavaScript string's length)
    cut to 2,000: that read is a view of the file all the same, so a write after it goes ahead."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, f"short\n{line}\nlast\n")
    s = sessions("long", root)
    s.hook(event("PostToolUse", s.id, root, "Read", target, read_response(target, f"short\n{shown}\nlast\n")))
    written = {"content": "new\n"}
    assert decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))[0] == "allow"


def test_a_failed_tool_releases_the_grant(root: Path, sessions) -> None:
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    one, two = sessions("f1", root), sessions("f2", root)
    one.read(target)
    two.read(target)
    assert decision(one.hook(event("PreToolUse", "f1", root, "Write", target)))[0] == "allow"
    assert decision(two.hook(event("PreToolUse", "f2", root, "Write", target)))[0] == "deny"
    failed = event("PostToolUseFailure", "f1", root, "Write", target)
    failed.update(error="EACCES: permission denied", is_interrupt=False)  # the same call: its tool_use_id
    assert one.hook(failed)["code"] == 0
    assert decision(two.hook(event("PreToolUse", "f2", root, "Write", target)))[0] == "allow"
    assert version(root) == 1


def test_every_reason_has_its_own_remedy() -> None:
    assert set(HOOK_REMEDY) == set(get_args(Reason))
    assert len(set(HOOK_REMEDY.values())) == len(HOOK_REMEDY)
    for reason in get_args(Reason):
        text = FACE.remedy(
            StaleWriteError(P, "claude:x", reason, 1, 2, "claude:y", holder="claude:y", changed=("plans/other.md",))
        )
        assert "{" not in text and "Read tool" in text
    assert "plans/other.md" in FACE.remedy(StaleWriteError(P, "a", "read-set", 1, 1, "b", changed=("plans/other.md",)))
    assert "Wait" in HOOK_REMEDY["held"] and "Wait" not in HOOK_REMEDY["stale"]
    assert set(SHELL_REMEDY) == set(get_args(Reason)) and len(set(SHELL_REMEDY.values())) == len(SHELL_REMEDY)
    for reason in ("stale", "unread", "held", "fenced"):
        assert "Read tool" in SHELL_REMEDY[reason] and "run the command again" in SHELL_REMEDY[reason], reason


def _in_process(
    name: str, session: str, root: Path, tool: str, path: Path, response: object = None
) -> dict[str, object]:
    answer = handle(event(name, session, root, tool, path, response), Progress(), current_process())
    return {"code": answer.code, "stdout": answer.stdout, "stderr": answer.stderr}


def test_a_write_after_its_grant_lapsed_is_a_clobber_the_model_is_told(root: Path, monkeypatch) -> None:
    """A permission prompt that outlasts the grant: the late write is logged as a clobber and
    PostToolUse puts that in front of the model."""
    monkeypatch.setattr(claude_code.hooks, "HOOK_GRANT_TTL", 0.2)
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    for s in ("slow", "quick"):
        _in_process("PostToolUse", s, root, "Read", target, read_response(target, "v1\n"))
    assert decision(_in_process("PreToolUse", "slow", root, "Write", target))[0] == "allow"
    time.sleep(0.3)
    assert decision(_in_process("PreToolUse", "quick", root, "Write", target))[0] == "allow"
    target.write_text("v2 by quick\n")
    assert _in_process("PostToolUse", "quick", root, "Write", target)["stdout"] == ""
    target.write_text("v2 by slow, built on v1\n")
    told = json.loads(str(_in_process("PostToolUse", "slow", root, "Write", target)["stdout"]))
    assert (
        told["decision"] == "block"
        and "went over version 2" in told["reason"]
        and f"claude:{unique('quick')}" in told["reason"]
    )
    log = [
        json.loads(line)
        for line in subprocess.run(
            [CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    ]
    assert [e["agent"] for e in log if e["kind"] == "clobber"] == [f"claude:{unique('slow')}"]


def test_a_write_recorded_before_the_registry_fails_is_told_as_recorded(root: Path, monkeypatch) -> None:
    """The registry fails right after PostToolUse recorded the session's write, when it looks for a
    clobber to tell and releases the grant: the model is told its write was recorded, with its
    version, to read the file again, and that the grant ends by itself (before, the hook's failure
    said the write was not recorded as the session's)."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    _in_process("PostToolUse", "late", root, "Read", target, read_response(target, "v1\n"))
    assert decision(_in_process("PreToolUse", "late", root, "Write", target))[0] == "allow"
    target.write_text("v2\n")
    adopt = VolumeCore.adopt

    def then_unreachable(core: VolumeCore, *args: object, **kwargs: object) -> int | None:
        version = adopt(core, *args, **kwargs)  # type: ignore[arg-type]

        def read() -> None:
            raise RegistryError("the registry at db:5432 is unreachable (connection refused); nothing was written.")

        monkeypatch.setattr(core.registry, "read", read)
        return version

    monkeypatch.setattr(VolumeCore, "adopt", then_unreachable)
    told = json.loads(str(_in_process("PostToolUse", "late", root, "Write", target)["stdout"]))
    monkeypatch.undo()
    assert "your write to plans/plan.md was recorded as version 2" in told["reason"], told
    assert "could not be released" in told["reason"] and "ends by itself" in told["reason"], told
    with CoherentVolume(root, agent="observer") as v:
        assert v.history(P)[0].writer == f"claude:{unique('late')}"


def test_a_fenced_session_is_told_to_read_again_and_reading_lifts_the_fence(root: Path) -> None:
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    _in_process("PostToolUse", "fx", root, "Read", target, read_response(target, "v1\n"))
    with CoherentVolume(root, agent=f"claude:{unique('fx')}") as same_agent, same_agent.lock(P, ttl=0.1):
        time.sleep(0.2)  # the lock() grant expires; the next look reclaims it and fences its agent
        verdict, reason = decision(_in_process("PreToolUse", "fx", root, "Write", target))
        assert verdict == "deny" and "(fenced)" in reason and "reclaimed" in reason and "Read tool" in reason
        _in_process("PostToolUse", "fx", root, "Read", target, read_response(target, "v1\n"))
        assert decision(_in_process("PreToolUse", "fx", root, "Write", target))[0] == "allow"


_cli_hook = partial(timed_hook, "claude-code")


def test_a_slow_registry_fails_closed_for_managed_paths_only(root: Path, tmp_path: Path) -> None:
    """With the commit lock held elsewhere past the budget: a write to a managed path (existing or
    new) is denied in time with what happened and what to do; a path in no volume, and an
    unmanaged one, are allowed; a Read is answered with a warning only."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    with commit_lock_held(root):
        for managed in (root / P, root / "plans/new.md"):
            r, took = _cli_hook(event("PreToolUse", "slow", root, "Write", managed))
            verdict, reason = decision({"stdout": r.stdout.strip()})
            assert r.returncode == 0 and verdict == "deny", r.stderr
            assert "could not check this write" in reason and "did not finish in time" in reason
            assert "Retry" in reason and f"coherent-volume why {managed}" in reason
            assert took < claude_code.hooks.HOOK_TIMEOUT, (
                f"answered after {took:.1f} s: Claude Code would have let it run"
            )
        for free in (tmp_path / "elsewhere.md", root / "notes.txt"):
            r, took = _cli_hook(event("PreToolUse", "slow", root, "Write", free))
            assert r.returncode == 0 and r.stdout == "" and took < claude_code.hooks.HOOK_BUDGET, (
                r.stdout,
                r.stderr,
                took,
            )
        r, _ = _cli_hook(event("PostToolUse", "slow", root, "Read", root / P, read_response(root / P, "v1\n")))
        assert r.returncode == 0 and r.stdout == "" and "no view was registered" in r.stderr
    assert (
        decision(
            {"stdout": _cli_hook(event("PreToolUse", "slow", root, "Write", root / "plans/new.md"))[0].stdout.strip()}
        )[0]
        == "allow"
    ), "once the lock is free the same write is decided"


def test_an_internal_error_denies_a_write_that_may_be_managed(root: Path, tmp_path: Path) -> None:
    (root / ".coherent/registry.db").write_bytes(b"not a database" * 100)
    r, _ = _cli_hook(event("PreToolUse", "broken", root, "Write", root / "anything.txt"))
    verdict, reason = decision({"stdout": r.stdout.strip()})
    assert r.returncode == 0 and verdict == "deny" and "RegistryError" in reason and "coherent-volume why" in reason
    r, _ = _cli_hook(event("PreToolUse", "broken", root, "Write", tmp_path / "elsewhere.md"))
    assert r.returncode == 0 and r.stdout == ""
    r, _ = _cli_hook(
        {
            "session_id": "",
            "hook_event_name": "PreToolUse",
            "tool_name": "Write",
            "cwd": str(root),
            "tool_input": {"file_path": str(root / P)},
        }
    )
    assert decision({"stdout": r.stdout.strip()})[0] == "deny", "a write that cannot be attributed is not let through"


def _stale_denial(root: Path, old: str, new: str) -> str:
    """The reason the real hook gives session `big` for writing P after it read `old` and another
    agent committed `new`."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, old)
        _in_process("PostToolUse", "big", root, "Read", root / P, read_response(root / P, old))
        setup.write(P, new)
    r, _ = _cli_hook(event("PreToolUse", "big", root, "Write", root / P))
    verdict, reason = decision({"stdout": r.stdout.strip()})
    assert r.returncode == 0 and verdict == "deny" and "(stale)" in reason, (r.stdout, r.stderr)
    assert "Read the file again with the Read tool" in reason
    return reason


def test_a_long_diff_in_a_denial_is_cut(root: Path) -> None:
    """A large file rewritten everywhere: the denial shows the first lines of the diff and counts the
    rest; a huge single line is shortened too, so the model gets a small text either way."""
    reason = _stale_denial(
        root, "".join(f"step {i}\n" for i in range(5000)), "".join(f"step {i}, done\n" for i in range(5000))
    )
    assert "-step 0\n" in reason and "... 9923 more lines of the diff not shown" in reason
    assert len(reason) < 4000
    reason = _stale_denial(root, "{" + "1," * 50_000 + "}\n", "{" + "2," * 50_000 + "}\n")
    assert "more characters)\n" in reason and len(reason) < 2000
    assert max(len(line) for line in reason.split("\n")) < diffs.MAX_LINE_CHARS + 40, "each line is cut once"


def test_a_diff_too_slow_to_make_leaves_a_decided_denial_standing(root: Path) -> None:
    """A large file changed on every tenth line: difflib needs many seconds, more than the hook has.
    The stale denial was decided before the diff was started, so it is answered without the diff
    (never the "could not check" of an undecided hook)."""
    lines = [f"line {i} of a long plan, with some words on it\n" for i in range(20_000)]
    changed = [f"line {i} rewritten\n" if i % 10 == 0 else line for i, line in enumerate(lines)]
    reason = _stale_denial(root, "".join(lines), "".join(changed))
    assert "could not check" not in reason and "you last read version 1; the current version is 2" in reason


# ---- merge globs ----------------------------------------------------------------------

LOG = "plans/log.md"


def _merge_volume(root: Path, text: str) -> Path:
    """`root` with LOG a merge glob holding `text` (version 1)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(replace(setup.policy, merge=(LOG,)))
        setup.write(LOG, text)
    return root / LOG


def _history(root: Path, rel: str = LOG) -> list[tuple[int, str, str, tuple[int, ...]]]:
    with CoherentVolume(root, agent="observer") as v:
        return [(h.version, h.kind, h.writer, h.parents) for h in v.history(rel)]


def _kinds_logged(root: Path) -> list[str]:
    log = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line)["kind"] for line in log.splitlines()]


def test_a_stale_write_of_a_merge_file_is_merged_and_committed_by_the_hook(root: Path, sessions) -> None:
    """Two sessions change different lines of a merge-glob file: the stale one's Write is merged
    three-way with the current version and committed by the hook as a `merge` version with both
    parents; the tool is denied (its write is done) and told so; its view stays where it was."""
    target = _merge_volume(root, "alpha\nbeta\ngamma\n")
    one, two = sessions("m1", root), sessions("m2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "ALPHA\nbeta\ngamma\n")["decision"] == "allow"
    answer = one.hook(
        event(
            "PreToolUse",
            "m1",
            root,
            "Write",
            target,
            tool_input={"content": "alpha\nbeta\nGAMMA\n"},
            permission_mode="acceptEdits",
        )
    )
    verdict, reason = decision(answer)
    assert verdict == "deny" and "committed the result as version 3" in reason, reason
    assert "do not repeat it" in reason and f"claude:{unique('m2')}" in reason and "-alpha\n+ALPHA" in reason
    assert target.read_text() == "ALPHA\nbeta\nGAMMA\n"
    assert _history(root)[0] == (3, "merge", f"claude:{unique('m1')}", (1, 2))
    assert "clobber" not in _kinds_logged(root)
    again = decision(one.hook(event("PreToolUse", "m1", root, "Edit", target, permission_mode="acceptEdits")))
    assert again[0] == "deny" and "you last read version 1" in again[1], "its model never saw version 2's change"
    one.read(target)
    assert decision(one.hook(event("PreToolUse", "m1", root, "Write", target)))[0] == "allow"


def test_a_merge_is_only_shown_where_claude_code_asks_before_writing(root: Path, sessions) -> None:
    """In the default permission mode the hook would skip the user's approval by writing: it denies,
    showing the change applied to the current content, and writes nothing."""
    target = _merge_volume(root, "alpha\nbeta\ngamma\n")
    one, two = sessions("d1", root), sessions("d2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "ALPHA\nbeta\ngamma\n")["decision"] == "allow"
    verdict, reason = decision(
        one.hook(event("PreToolUse", "d1", root, "Write", target, tool_input={"content": "alpha\nbeta\nGAMMA\n"}))
    )
    assert verdict == "deny" and "merges cleanly with version 2" in reason and "this session's is default" in reason
    assert "-gamma\n+GAMMA\n" in reason and reason.endswith(
        "Read the file again with the Read tool, then redo your change from its current content."
    )
    assert target.read_text() == "ALPHA\nbeta\ngamma\n" and [h[0] for h in _history(root)] == [2, 1]


def test_overlapping_changes_are_denied_with_the_conflicting_hunks(root: Path, sessions) -> None:
    target = _merge_volume(root, "alpha\nbeta\ngamma\n")
    one, two = sessions("c1", root), sessions("c2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "alpha\nBETA by two\ngamma\n")["decision"] == "allow"
    pre = event(
        "PreToolUse",
        "c1",
        root,
        "Write",
        target,
        tool_input={"content": "alpha\nbeta by one\ngamma\n"},
        permission_mode="bypassPermissions",
    )
    verdict, reason = decision(one.hook(pre))
    assert verdict == "deny" and "(stale)" in reason and "1 conflicting hunk(s)" in reason
    assert "<<<<<<< yours\nbeta by one\n||||||| base\nbeta\n=======\nBETA by two\n>>>>>>> current" in reason
    assert target.read_text() == "alpha\nBETA by two\ngamma\n" and len(_history(root)) == 2
    why = subprocess.run([CLI, "why", str(target)], capture_output=True, text=True, check=True).stdout
    assert "1 conflicting hunk between the change of claude:" in why and "beta by one" in why, (
        "the conflict is logged as one through the API is, so `why` shows its hunks"
    )


def test_an_edit_merges_only_when_applying_it_to_the_current_content_is_the_merge(root: Path, sessions) -> None:
    """Claude Code applies an Edit to the file's current content: the hook commits that when it is
    what merging the edit (applied to the version read) with the current version gives; an edit that
    no longer applies is denied, and so is one that would change the other session's lines too."""
    target = _merge_volume(root, "one\ntwo\nthree\nfour\nfive\nsix\nseven\n")
    one, two = sessions("e1", root), sessions("e2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "two again\none\ntwo\nthree\nfour\nfive\nsix\nSEVEN\n")["decision"] == "allow"

    def edit(tool: str, **tool_input: object) -> tuple[str, str]:
        pre = event("PreToolUse", "e1", root, tool, target, tool_input=tool_input, permission_mode="acceptEdits")
        return decision(one.hook(pre))

    verdict, reason = edit("Edit", old_string="six\nseven", new_string="six\nseven!")
    assert verdict == "deny" and "It was not merged: your edit does not apply to the current content" in reason
    verdict, reason = edit("Edit", old_string="two", new_string="TWO", replace_all=True)
    assert verdict == "deny" and "would not give the merge of both changes" in reason, reason
    assert len(_history(root)) == 2, "nothing committed"
    verdict, reason = edit(
        "MultiEdit",
        edits=[
            {"old_string": "three", "new_string": "THREE"},
            {"old_string": "one\n", "new_string": "one\nhalf\n"},
            {"old_string": "five", "new_string": ""},  # Claude Code deletes the line's newline too
        ],
    )
    assert verdict == "deny" and "committed the result as version 3" in reason, reason
    assert target.read_text() == "two again\none\nhalf\ntwo\nTHREE\nfour\nsix\nSEVEN\n"
    assert _history(root)[0] == (3, "merge", f"claude:{unique('e1')}", (1, 2))


def test_unread_and_held_writes_of_a_merge_file_are_never_merged(root: Path, sessions) -> None:
    target = _merge_volume(root, "alpha\n")
    fresh, holder = sessions("u1", root), sessions("u2", root)
    mode = {"permission_mode": "acceptEdits"}
    verdict, reason = decision(
        fresh.hook(event("PreToolUse", "u1", root, "Write", target, tool_input={"content": "x\n"}, **mode))
    )
    assert verdict == "deny" and "(unread)" in reason
    holder.read(target)
    fresh.read(target)
    assert decision(holder.hook(event("PreToolUse", "u2", root, "Write", target, **mode)))[0] == "allow"
    verdict, reason = decision(
        fresh.hook(event("PreToolUse", "u1", root, "Write", target, tool_input={"content": "alpha\nx\n"}, **mode))
    )
    assert verdict == "deny" and "(held)" in reason and target.read_text() == "alpha\n"


# ---- subagents ------------------------------------------------------------------------


def test_subagents_are_agents_of_their_own(root: Path, sessions) -> None:
    """Two Task subagents of one session (events with agent_id) read the same file; the first one's
    write makes the second one's stale, and while the first holds its grant the second is refused
    `held`. The main thread's view is its own too. SubagentStop releases a subagent's grant."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("parent", root)
    for who in (None, "agent-a", "agent-b"):
        s.read(target, agent_id=who)
    assert s.write(target, "v2 by subagent a\n", agent_id="agent-a")["decision"] == "allow"
    with CoherentVolume(root, agent="observer") as v:
        assert v.history(P)[0].writer == f"claude:{unique('parent')}/agent-a"
    denied = s.write(target, "v2 by subagent b, built on v1\n", agent_id="agent-b")
    reason = json.loads(str(denied["reason"]))["hookSpecificOutput"]["permissionDecisionReason"]
    assert denied["decision"] == "deny" and "(stale)" in reason and f"claude:{unique('parent')}/agent-a" in reason
    assert s.write(target, "v2 by the main thread, built on v1\n")["decision"] == "deny"
    assert target.read_text() == "v2 by subagent a\n"

    s.read(target, agent_id="agent-b")
    s.read(target, agent_id="agent-a")
    assert decision(s.hook(event("PreToolUse", "parent", root, "Edit", target, agent_id="agent-a")))[0] == "allow"
    verdict, reason = decision(s.hook(event("PreToolUse", "parent", root, "Edit", target, agent_id="agent-b")))
    assert (
        verdict == "deny"
        and "(held)" in reason
        and f"claude:{unique('parent')}/agent-a holds its write grant" in reason
    )
    stop = event(
        "SubagentStop",
        "parent",
        root,
        agent_id="agent-a",
        agent_transcript_path="/tmp/parent/subagents/agent-a.jsonl",
        stop_hook_active=False,
        last_assistant_message="done",
    )
    assert s.hook(stop) == {"code": 0, "stdout": "", "stderr": ""}
    assert decision(s.hook(event("PreToolUse", "parent", root, "Edit", target, agent_id="agent-b")))[0] == "allow"
    s.hook(event("SessionEnd", "parent", root, reason="other"))
    status = json.loads(subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True).stdout)
    assert all(f["holder"] is None for f in status["files"]), "SessionEnd released its subagents' grants too"


def test_on_a_mount_a_subagent_writes_as_its_session(mounted: Mount, sessions) -> None:
    """The file system sees one agent per process: a subagent's checked write through the mount goes
    through (its grant is its session's) and is recorded as the session's."""
    target = mounted.path / P
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\n")
    s = sessions("mounted", mounted.path)
    s.read(target, agent_id="agent-m")
    assert s.write(target, "v2 by a subagent\n", agent_id="agent-m")["decision"] == "allow"
    assert target.read_text() == "v2 by a subagent\n"
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert (v.version(P), v.history(P)[0].writer) == (2, f"claude:{unique('mounted')}")


# ---- stale warnings -------------------------------------------------------------------


def _context(answer: dict[str, object]) -> str | None:
    out = json.loads(str(answer["stdout"])) if answer["stdout"] else {}
    return out.get("hookSpecificOutput", {}).get("additionalContext")


def test_the_model_is_told_once_of_each_stale_view(root: Path, sessions) -> None:
    """UserPromptSubmit, an allowed write and a read put the files the session read that changed
    since in the model's context: file, versions, writer and diff; once per version, and nothing
    when nothing is stale."""
    a, b = root / "plans/a.md", root / "plans/b.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/a.md", "a1\n")
        setup.write("plans/b.md", "b1\n")
    me, other = sessions("w1", root), sessions("w2", root)
    prompt = event("UserPromptSubmit", "w1", root, prompt="go on")
    me.read(a)
    me.read(b)
    assert me.hook(prompt) == {"code": 0, "stdout": "", "stderr": ""}, "nothing stale, nothing said"
    other.read(a)
    assert other.write(a, "a2 by w2\n")["decision"] == "allow"

    told = me.hook(prompt)
    out = json.loads(str(told["stdout"]))["hookSpecificOutput"]
    assert out["hookEventName"] == "UserPromptSubmit"
    text = out["additionalContext"]
    assert f"plans/a.md: you last read version 1; it is now version 2, written by claude:{unique('w2')}" in text
    assert "-a1\n+a2 by w2" in text and "plans/b.md" not in text
    assert _context(me.hook(prompt)) is None, "told once"

    assert other.write(a, "a3 by w2\n")["decision"] == "allow"
    allowed = me.hook(event("PreToolUse", "w1", root, "Write", b, tool_input={"content": "b2\n"}))
    verdict = json.loads(str(allowed["stdout"]))["hookSpecificOutput"]
    assert "permissionDecision" not in verdict, "the write's permission is left to Claude Code"
    assert "it is now version 3" in verdict["additionalContext"] and "+a3 by w2" in verdict["additionalContext"]
    me.hook(event("PostToolUseFailure", "w1", root, "Write", b, error="interrupted", is_interrupt=True))

    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/b.md", "b2 by setup\n")
    read_a = me.hook(event("PostToolUse", "w1", root, "Read", a, read_response(a, "a3 by w2\n")))
    assert "plans/b.md: you last read version 1; it is now version 2, written by setup" in str(_context(read_a))
    assert "plans/a.md" not in str(_context(read_a)), "a was just read"


# ---- the Bash tool --------------------------------------------------------------------


def bash_event(
    name: str,
    session: str,
    cwd: Path,
    command: str,
    *,
    call: str = "toolu_bash",
    tool_input: dict[str, object] | None = None,
    **fields: object,
) -> dict[str, object]:
    """An event of Claude Code's Bash tool running `command` (its tool call `call`)."""
    e = event(name, session, cwd, **fields)
    e.update(tool_name="Bash", tool_use_id=call)
    e["tool_input"] = {"command": command, "description": "Change the plan", "timeout": 120000, **(tool_input or {})}
    return e


def bash(s: Session, command: str, *, call: str = "toolu_bash", **fields: object) -> tuple[str, str]:
    """The Bash tool in session `s`: PreToolUse; if allowed, the command run by a child of the
    session's process in its directory, then PostToolUse (PostToolUseFailure when it failed).
    (permissionDecision, reason) of the PreToolUse."""
    verdict, reason = decision(s.hook(bash_event("PreToolUse", s.id, s.cwd, command, call=call, **fields)))
    if verdict == "allow":
        ran = s.run("bash", "-c", command)
        if ran["code"] == 0:
            response = {"stdout": ran["stdout"], "stderr": ran["stderr"], "interrupted": False, "isImage": False}
            after = bash_event("PostToolUse", s.id, s.cwd, command, call=call, tool_response=response, **fields)
        else:
            error = f"Exit code {ran['code']}\n{ran['stderr']}"
            after = bash_event("PostToolUseFailure", s.id, s.cwd, command, call=call, error=error, **fields)
        assert s.hook(after)["code"] == 0
    return verdict, reason


def _plan(root: Path, text: str = "v1\n") -> Path:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, text)
    return root / P


@pytest.mark.parametrize(
    ("session_id", "agent_id"),
    [("s" * 300, None), ("bad\x01id", None), ("fine", "a\nb")],
    ids=["long", "unprintable", "subagent"],
)
def test_a_session_or_subagent_id_that_makes_no_agent_name_is_named_by_its_hash(
    root: Path, sessions, session_id: str, agent_id: str | None
) -> None:
    """An id too long or unprintable for an agent name names its agent by its hash, as every other
    face does: the session's writes are checked as any session's. Before, every write check was
    denied saying the volumes were set up wrongly and not to retry."""
    target = _plan(root)
    s = sessions(session_id, root)
    written = s.write(target, "blind\n", agent_id=agent_id)
    assert written["decision"] == "deny" and "(unread)" in str(written["reason"]), written
    s.read(target, agent_id=agent_id)
    assert s.write(target, "v2\n", agent_id=agent_id)["decision"] == "allow"
    with CoherentVolume(root, agent="observer") as v:
        writer = v.history(P)[0].writer
    assert writer == claude_code.agent_of(unique(session_id), agent_id) and "sha256-" in writer


def test_a_write_in_a_volume_whose_registry_went_away_under_the_session_is_denied(root: Path, sessions) -> None:
    """A session that worked in a volume whose `.coherent` is then removed cannot have its writes
    there checked: they are denied, saying so (before, the hook found no volume and let every
    write through unchecked, a stale one too); a new session is not held to it."""
    target = _plan(root)
    one = sessions("gone1", root)
    one.read(target)
    bash(one, f"sed -i s/v1/v2/ {P}")  # a write: the session's note now names the volume
    shutil.rmtree(root / ".coherent")
    written = one.write(target, "over whatever is there\n")
    assert written["decision"] == "deny" and "registry" in str(written["reason"]), written
    assert "is no longer there" in str(written["reason"])
    verdict, reason = bash(one, f"echo x > {P}")
    assert verdict == "deny" and "is no longer there" in reason
    assert target.read_text() == "v2\n"
    fresh = sessions("gone2", root)
    assert fresh.write(target, "a new session, no volume here\n")["decision"] == "allow"


def test_a_bash_write_after_a_read_is_the_sessions_version(root: Path, sessions) -> None:
    """`sed -i` of a file the session read goes ahead and is recorded as the session's version;
    so is an `rm` of one, as its deletion."""
    target = _plan(root)
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/a.md", "a\n")
    s = sessions("sh", root)
    s.read(target)
    s.read(root / "plans/a.md")
    assert bash(s, f"sed -i s/v1/v2/ {P}") == ("allow", "")
    assert bash(s, "rm plans/a.md") == ("allow", "")
    assert target.read_text() == "v2\n" and not (root / "plans/a.md").exists()
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)] == [(2, f"claude:{unique('sh')}"), (1, "setup")]
        deletion = v.history("plans/a.md")[0]
        assert (deletion.version, deletion.writer, deletion.hash) == (2, f"claude:{unique('sh')}", None)
    assert "external" not in {json.loads(line)["agent"] for line in _log(root)}


def _log(root: Path) -> list[str]:
    return subprocess.run(
        [CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True
    ).stdout.splitlines()


def test_a_bash_write_over_a_peers_commit_is_denied_stale_with_the_diff(root: Path, sessions) -> None:
    """Another session committed since this one read the file: its `sed -i` is denied `stale`,
    showing what changed since its view and telling it to read with the Read tool and run the
    command again; the file keeps the peer's version."""
    target = _plan(root)
    one, two = sessions("b1", root), sessions("b2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "v2 by two\n")["decision"] == "allow"
    verdict, reason = bash(one, f"sed -i 's/v1/v2 by one/' {P}")
    assert verdict == "deny" and f"refused this write to {P} (stale): you last read version 1" in reason, reason
    assert f"written by claude:{unique('b2')}" in reason and "\n-v1\n+v2 by two\n" in reason, reason
    assert "Read the file again with the Read tool, then run the command again" in reason, reason
    assert target.read_text() == "v2 by two\n" and version(root) == 2


def test_a_bash_write_of_a_file_never_read_is_denied_and_unmanaged_files_are_let_be(
    root: Path, tmp_path: Path, sessions
) -> None:
    """A command that writes (or removes) a managed file the session never read with the Read tool
    is denied `unread`, saying to Read it first (a `cat` is no read the hook sees); one whose file
    is known only when it runs is denied saying so. Unmanaged files, files outside any volume and
    commands that write nothing go ahead unchecked."""
    target = _plan(root)
    s = sessions("never", root)
    s.run("cat", str(target))  # printed through Bash: no view
    for command in (f"echo v2 > {P}", f"rm {P}", f"sed -i s/v1/v2/ {P}"):
        verdict, reason = bash(s, command)
        assert verdict == "deny" and f"{P} (unread): no read of it by you is on record" in reason, (command, reason)
        assert "Read the file with the Read tool first" in reason and "then run the command again" in reason
    verdict, reason = bash(s, "f=$(ls plans | head -1); sed -i s/v1/v2/ plans/$f")
    assert verdict == "deny" and "`plans/$f`" in reason and "Name the file literally" in reason, reason
    elsewhere = tmp_path / "elsewhere.txt"
    for command in ("echo x > notes.txt && sed -i s/x/y/ notes.txt", f"echo x > {elsewhere}", f"cat {P} | wc -l"):
        pre = s.hook(bash_event("PreToolUse", "never", root, command))
        assert pre == {"code": 0, "stdout": "", "stderr": ""}, (command, pre)
        assert s.run("bash", "-c", command)["code"] == 0
        post = s.hook(bash_event("PostToolUse", "never", root, command, tool_response={"stdout": "", "stderr": ""}))
        assert post == {"code": 0, "stdout": "", "stderr": ""}, (command, post)
    assert target.read_text() == "v1\n" and (root / "notes.txt").read_text() == "y\n"
    with CoherentVolume(root, agent="observer") as v:
        assert [h.writer for h in v.history(P)] == ["setup"]


def test_a_bash_append_needs_no_view(root: Path, sessions) -> None:
    """`echo x >> plans/log.md` appends: it goes ahead without a read, as appends do."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/log.md", "entry 1\n")
    s = sessions("append", root)
    assert decision(s.hook(bash_event("PreToolUse", "append", root, "echo v2 > plans/log.md")))[0] == "deny"
    assert bash(s, "echo entry 2 >> plans/log.md") == ("allow", "")
    assert (root / "plans/log.md").read_text() == "entry 1\nentry 2\n"


def test_a_failed_bash_command_releases_its_grant(root: Path, sessions) -> None:
    """Two sessions' Bash writes of one file: while the first is between its PreToolUse and the hook
    after it, the second is denied `held` (told to wait); the first command fails
    (PostToolUseFailure), which releases its grant, so the second goes ahead and is the file's next
    version."""
    target = _plan(root)
    one, two = sessions("h1", root), sessions("h2", root)
    one.read(target)
    two.read(target)
    failing = f"test -e plans/missing.md && sed -i s/v1/one/ {P}"
    assert decision(one.hook(bash_event("PreToolUse", "h1", root, failing)))[0] == "allow"
    verdict, reason = decision(two.hook(bash_event("PreToolUse", "h2", root, f"sed -i s/v1/two/ {P}", call="t2")))
    assert verdict == "deny" and f"{P} (held)" in reason and f"claude:{unique('h1')} holds its write grant" in reason
    assert "Wait a few seconds" in reason and "run the command again" in reason, reason
    assert one.run("bash", "-c", failing)["code"] == 1
    failed = bash_event("PostToolUseFailure", "h1", root, failing, error="Exit code 1", is_interrupt=False)
    assert one.hook(failed)["code"] == 0
    assert bash(two, f"sed -i s/v1/two/ {P}", call="t2") == ("allow", "")
    assert target.read_text() == "two\n"
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)] == [(2, f"claude:{unique('h2')}"), (1, "setup")]


def test_a_bash_write_in_the_background_is_denied_off_a_mount(root: Path, sessions) -> None:
    """A background command's PostToolUse comes when it has started, not ended: one that writes a
    managed file is denied (and holds nothing after); in the foreground it goes ahead."""
    target = _plan(root)
    one, two = sessions("bg1", root), sessions("bg2", root)
    one.read(target)
    two.read(target)
    background = {"tool_input": {"run_in_background": True}}
    verdict, reason = decision(one.hook(bash_event("PreToolUse", "bg1", root, f"sed -i s/v1/v2/ {P}", **background)))
    assert verdict == "deny" and "runs in the background" in reason and "in the foreground" in reason, reason
    assert bash(two, f"sed -i s/v1/v2/ {P}") == ("allow", ""), "the denied command holds no grant"


def test_a_look_at_a_bash_write_half_done_is_recorded_and_the_writer_told(root: Path, sessions) -> None:
    """`echo 2 > file` truncates the file before it writes: a peer's Read meanwhile shows the
    empty file, which is recorded as a version by `external` (what was seen is kept, as any change
    seen is: it may as well be another program's) and is the peer's view; the writer's PostToolUse
    then records its own version over it as a `clobber` made while it held the grant, and tells
    its model so, in those words; the peer's write needs a read of that version."""
    target = _plan(root)
    one, two = sessions("half1", root), sessions("half2", root)
    one.read(target)
    two.read(target)
    command = f"echo 2 > {P}"
    assert decision(one.hook(bash_event("PreToolUse", one.id, root, command)))[0] == "allow"
    target.write_text("")  # the command half done: truncated, not yet written
    assert two.read(target) == ""
    verdict, reason = bash(two, f"echo 3 > {P}")
    assert verdict == "deny" and "(held)" in reason, reason
    target.write_text("2\n")
    response = {"stdout": "", "stderr": "", "interrupted": False, "isImage": False}
    post = one.hook(bash_event("PostToolUse", one.id, root, command, tool_response=response))
    told = json.loads(str(post["stdout"]))["reason"]
    assert "while your tool ran" in told and "half done" in told, told
    with CoherentVolume(root, agent="observer") as v:
        history = [(h.version, h.writer) for h in v.history(P)]
        assert history == [(3, f"claude:{unique('half1')}"), (2, "external"), (1, "setup")], history
        assert v.read_version(P, 2) == b""
    assert bash(two, f"echo 3 > {P}")[0] == "deny", "the peer saw version 2 last, so it is stale"
    two.read(target)
    assert bash(two, f"echo 3 > {P}") == ("allow", "") and target.read_text() == "3\n"


def test_a_program_s_change_seen_while_a_session_held_the_file_is_kept_and_the_session_told(
    root: Path, sessions
) -> None:
    """A program outside the hooks appends to a file while a session's Write holds it, and
    `status` looks meanwhile: the appended bytes are recorded (`external`), the Write that
    replaces them is the session's version logged as a `clobber` made while it held the grant,
    and its model is told to check that no other change is missing. The program's bytes stay in
    the history."""
    target = _plan(root)
    s = sessions("held", root)
    s.read(target)
    written = {"content": "v2 by the session\n"}
    assert decision(s.hook(event("PreToolUse", s.id, root, "Write", target, tool_input=written)))[0] == "allow"
    with open(target, "a") as f:
        f.write("a program's line\n")
    subprocess.run([CLI, "status", str(root)], capture_output=True, check=True)
    assert s.tool_write(target, "v2 by the session\n")["code"] == 0
    post = s.hook(event("PostToolUse", s.id, root, "Write", target, {"type": "update"}, tool_input=written))
    assert "while your tool ran" in json.loads(str(post["stdout"]))["reason"]
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)][:2] == [(3, f"claude:{unique('held')}"), (2, "external")]
        assert v.read_version(P, 2) == b"v1\na program's line\n"
    assert "clobber" in {json.loads(line)["kind"] for line in _log(root)}


def test_a_bash_job_the_command_does_not_wait_for_is_denied_off_a_mount(root: Path, sessions) -> None:
    """`(sleep 1; sed -i …) &` writes after the shell has exited, so after the PostToolUse that would
    release the grant: denied even with a current view, saying to run it in the foreground (and
    holding nothing after). With a `wait` for the job the command ends after its write: allowed and
    recorded as the session's version, over which the peer's write is then stale."""
    target = _plan(root)
    one, two = sessions("job1", root), sessions("job2", root)
    one.read(target)
    two.read(target)
    verdict, reason = bash(one, f"(sleep 1; sed -i s/v1/one/ {P}) > /dev/null 2>&1 &")
    assert verdict == "deny" and "runs in the background" in reason and "in the foreground" in reason, reason
    assert target.read_text() == "v1\n"
    assert bash(one, f"(sleep 1; sed -i s/v1/one/ {P}) > /dev/null 2>&1 & wait") == ("allow", "")
    assert target.read_text() == "one\n"
    with CoherentVolume(root, agent="observer") as v:
        assert [(h.version, h.writer) for h in v.history(P)] == [(2, f"claude:{unique('job1')}"), (1, "setup")]
    assert two.write(target, "two\n")["decision"] == "deny"


def test_a_bash_job_that_outlives_the_command_is_denied_off_a_mount(root: Path, tmp_path: Path, sessions) -> None:
    """A job tmux's server runs, or one whose shell `fuser -k` kills before its `wait`, writes after
    the command has ended, so after the PostToolUse that releases the grant: had it gone ahead, it
    would overwrite the peer's commit made in between. Both are denied and the peer's write stays. A
    job the command waits for by its `$!` ends within the command: allowed, the session's version."""
    target = _plan(root)
    one, two = sessions("late1", root), sessions("late2", root)
    one.read(target)
    two.read(target)
    lock, sock = tmp_path / "lock", tmp_path / "tmux.sock"
    lock.write_text("")
    jobs = (
        f"tmux -S {sock} new -d 'sleep 1; sed -i s/v1/one/ {P}'",
        f"{{ (sleep 1; sed -i s/v1/one/ {P}) 9<&- & fuser -sk -KILL {lock} 9<&-; wait; }} 9<{lock}",
    )
    try:
        for command in jobs:
            verdict, reason = bash(one, command)
            assert verdict == "deny" and "runs in the background" in reason, (command, reason)
    finally:
        subprocess.run(["tmux", "-S", str(sock), "kill-server"], capture_output=True)
    assert two.write(target, "two\n")["decision"] == "allow"
    assert target.read_text() == "two\n"
    one.read(target)
    assert bash(one, f"sed -i s/two/one/ {P} & wait $!") == ("allow", "")
    assert target.read_text() == "one\n"
    with CoherentVolume(root, agent="observer") as v:
        assert [h.writer for h in v.history(P)][:2] == [f"claude:{unique('late1')}", f"claude:{unique('late2')}"]
    assert two.write(target, "two again\n")["decision"] == "deny"


def test_a_bash_cd_out_through_a_symlink_and_back_checks_the_file_bash_writes(
    root: Path, tmp_path: Path, sessions
) -> None:
    """bash's `cd` is logical: after `cd EXT/..` (EXT a symlink at the volume's root to a directory
    outside it) the shell is at the volume's root, not beside where EXT leads, so its `sed -i` of
    the plan over a peer's commit is denied `stale`, however that `cd` is spelled; `cd -P` goes
    where EXT leads, beside which the file is no managed one."""
    target = _plan(root)
    (tmp_path / "ext/a/b").mkdir(parents=True)
    (root / "EXT").symlink_to(tmp_path / "ext/a/b")
    one, two = sessions("cd1", root), sessions("cd2", root)
    one.read(target)
    two.read(target)
    assert two.write(target, "v2\n")["decision"] == "allow"
    for cd in ("cd EXT/..", "cd -L EXT/..", "cd EXT && cd ..", "cd EXT; cd ..", "pushd EXT/.. > /dev/null"):
        verdict, reason = bash(one, f"{cd} && sed -i s/v/one/ {P}")
        assert verdict == "deny" and f"{P} (stale)" in reason, (cd, reason)
    assert target.read_text() == "v2\n"
    (tmp_path / "ext/a/plans").mkdir()
    (tmp_path / "ext/a/plans/plan.md").write_text("v1\n")
    assert bash(one, f"cd -P EXT/.. && sed -i s/v/one/ {P}") == ("allow", "")
    assert target.read_text() == "v2\n" and (tmp_path / "ext/a/plans/plan.md").read_text() == "one1\n"


def test_on_a_mount_a_bash_write_composes_with_the_file_system(mounted: Mount, sessions) -> None:
    """On a mount the Bash tool's commands (children of the session's process) write as the session:
    the grant the hook takes is the one their writes through the mount use, so a `sed -i` after a
    Read goes ahead (also a subagent's, and one in the background) and is the session's version; a
    stale one is denied by the hook, and the file system refuses it without the hook too."""
    _plan(mounted.root)
    target = mounted.path / P
    one, two = sessions("m1", mounted.path), sessions("m2", mounted.path)
    for s in (one, two):
        s.hook(event("SessionStart", s.id, mounted.path, source="startup"))
        s.read(target)
    assert bash(one, f"sed -i s/v1/v2/ {P}") == ("allow", "")
    assert bash(one, f"sed -i s/v2/v3/ {P}", agent_id="agent-x") == ("allow", ""), "a subagent acts as its session"
    assert bash(one, f"sed -i s/v3/v4/ {P}", tool_input={"run_in_background": True}) == ("allow", "")
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert [h.writer for h in v.history(P)] == [f"claude:{unique('m1')}"] * 3 + ["setup"]
    assert target.read_text() == "v4\n"
    verdict, reason = bash(two, f"sed -i s/v4/two/ {P}")
    assert verdict == "deny" and "(stale)" in reason and "+v4" in reason, reason
    forced = two.run("sed", "-i", "s/v4/two/", str(target))
    assert forced["code"] != 0 and "Permission denied" in str(forced["stderr"]), forced
    assert target.read_text() == "v4\n"


def test_an_install_over_older_settings_adds_bash(tmp_path: Path) -> None:
    """Settings installed before Bash was checked (the write tools only): installing again puts Bash
    in the matchers of PreToolUse, PostToolUse and PostToolUseFailure, and keeps the user's hooks."""
    settings = tmp_path / ".claude/settings.json"
    settings.parent.mkdir()
    command = "/opt/bin/coherent-volume hook claude-code"
    old = {"type": "command", "command": command, "timeout": 5}
    mine = {"matcher": "Bash", "hooks": [{"type": "command", "command": "echo mine"}]}
    settings.write_text(
        json.dumps(
            {
                "hooks": {
                    "PreToolUse": [mine, {"matcher": "Write|Edit|MultiEdit|NotebookEdit", "hooks": [old]}],
                    "PostToolUse": [{"matcher": "Read|Write|Edit|MultiEdit|NotebookEdit", "hooks": [old]}],
                    "PostToolUseFailure": [{"matcher": "Write|Edit|MultiEdit|NotebookEdit", "hooks": [old]}],
                }
            }
        )
    )
    r = subprocess.run([CLI, "claude-code", "install", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hooks = json.loads(settings.read_text())["hooks"]
    assert hooks["PreToolUse"][0] == mine and len(hooks["PreToolUse"]) == 2
    for name in ("PreToolUse", "PostToolUse", "PostToolUseFailure"):
        [ours] = [e for e in hooks[name] if e["hooks"][0]["command"].endswith("hook claude-code")]
        assert "Bash" in ours["matcher"].split("|"), (name, ours)


def _cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"HOME": str(home)} if home is not None else {})}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("failing", ["write", "replace"])
def test_a_failed_install_leaves_the_settings_as_they_were_and_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A settings file that could not be written (a full disk) or replaced (`chattr +i`) left
    `settings.json.coherent-tmp` behind, and the error was a bare errno (/tmp/s33cli 3): the
    temporary file goes in every outcome, and the error says what happened and what to do."""
    import errno as errnos

    from coherent_volume.errors import CoherenceError

    settings = tmp_path / ".claude/settings.json"
    settings.parent.mkdir()
    settings.write_text('{"model": "opus"}')
    if failing == "write":
        real_write = Path.write_text

        def write_text(self: Path, text: str, *args: object, **kwargs: object) -> int:
            real_write(self, text[:5], *args, **kwargs)  # partly written, then the disk is full
            raise OSError(errnos.ENOSPC, os.strerror(errnos.ENOSPC))

        monkeypatch.setattr(Path, "write_text", write_text)
    else:

        def replace(src: object, dst: object) -> None:
            raise PermissionError(errnos.EPERM, os.strerror(errnos.EPERM), str(src), None, str(dst))

        monkeypatch.setattr(hook_settings.os, "replace", replace)
    with pytest.raises(CoherenceError) as info:
        FACE.install(settings)
    monkeypatch.undo()
    message = str(info.value)
    said = "written (No space left on device)" if failing == "write" else "replaced (Operation not permitted)"
    assert (
        f"{settings} could not be {said}: it is as it was" in message
        and "nothing was changed" in message
        and "then run this again" in message
    ), message
    assert sorted(p.name for p in settings.parent.iterdir()) == ["settings.json"]
    assert settings.read_text() == '{"model": "opus"}'


def test_install_says_what_is_wrong_with_a_settings_path_that_is_no_file(tmp_path: Path) -> None:
    """A settings.json that is a directory, and a HOME that is a file or missing (`--user`), gave
    bare errnos ("[Errno 21] Is a directory"), and a missing HOME was made (/tmp/s33cli 8, 6)."""
    (tmp_path / "proj/.claude/settings.json").mkdir(parents=True)
    r = _cli("claude-code", "install", str(tmp_path / "proj"))
    assert r.returncode == 1 and "is a directory, not a settings file" in r.stderr and "Errno" not in r.stderr
    homefile = tmp_path / "homefile"
    homefile.write_text("")
    for home in (homefile, tmp_path / "nonexistent/home"):
        r = _cli("gemini", "install", "--user", home=home)
        assert r.returncode == 1 and "Errno" not in r.stderr, r.stderr
        assert f"your home directory {str(home)!r} (HOME) is not an existing directory" in r.stderr, r.stderr
    assert homefile.read_text() == "" and not (tmp_path / "nonexistent").exists()


def test_install_refuses_a_dir_that_does_not_exist_or_with_user(tmp_path: Path) -> None:
    """`install typo_dir` made typo_dir/.claude/settings.json (/tmp/s33cli 6), and `install --user
    DIR` wrote ~/.claude/settings.json, DIR silently ignored (/tmp/s33cli 5): both are usage errors
    (exit status 2) that change nothing."""
    home, proj = tmp_path / "home", tmp_path / "proj"
    home.mkdir()
    proj.mkdir()
    for verb in ("install", "uninstall"):
        r = _cli("claude-code", verb, str(tmp_path / "typo_dir"), home=home)
        assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
        r = _cli("claude-code", verb, "--user", str(proj), home=home)
        assert r.returncode == 2 and "give DIR or --user" in r.stderr, r.stderr
    assert not (tmp_path / "typo_dir").exists() and list(home.iterdir()) == list(proj.iterdir()) == []


def test_uninstall_with_none_of_our_hooks_says_so_and_changes_nothing(tmp_path: Path) -> None:
    """`uninstall` said it removed hooks where there were none (no file, or a file with none of
    ours), and rewrote such a file reformatted, a new inode (/tmp/s33cli 4)."""
    proj = tmp_path / "proj"
    proj.mkdir()
    settings = proj / ".claude/settings.json"
    r = _cli("claude-code", "uninstall", str(proj))
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"no coherent-volume hooks in {settings} (there is no such file); nothing was changed\n"
    assert list(proj.iterdir()) == []
    settings.parent.mkdir()
    for text in ('{"a":1}', '{"hooks": {"PreToolUse": [{"hooks": [{"command": "echo mine"}]}]}}'):
        settings.write_text(text)
        inode = settings.stat().st_ino
        r = _cli("claude-code", "uninstall", str(proj))
        assert r.returncode == 0 and r.stdout == f"no coherent-volume hooks in {settings}; nothing was changed\n"
        assert settings.read_text() == text and settings.stat().st_ino == inode
    assert _cli("claude-code", "install", str(proj)).returncode == 0
    r = _cli("claude-code", "uninstall", str(proj))
    assert r.returncode == 0 and r.stdout == f"removed coherent-volume hooks from {settings}\n"
    assert json.loads(settings.read_text()) == json.loads(text)
