"""Claude Code sessions: hook events shaped as Claude Code sends them, with and without a mount."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume
from coherent_volume.claude_code import install, our_hooks, uninstall

from .mounts import CLI, Mount

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


def event(name: str, session: str, cwd: Path, tool: str | None = None, path: Path | None = None,
          response: object = None) -> dict[str, object]:
    e: dict[str, object] = {"session_id": session, "transcript_path": f"/tmp/{session}.jsonl", "cwd": str(cwd),
                            "hook_event_name": name}
    if tool:
        e["tool_name"] = tool
        e["tool_input"] = {"notebook_path" if tool == "NotebookEdit" else "file_path": str(path)}
    if response is not None:
        e["tool_response"] = response
    return e


def read_response(path: Path, text: str) -> dict[str, object]:
    lines = text.split("\n")
    return {"type": "text", "file": {"filePath": str(path), "content": text, "numLines": len(lines),
                                     "startLine": 1, "totalLines": len(lines)}}


class Session:
    """A stand-in Claude Code process: it runs the hook command as its child (so it is the hook's
    parent) and performs the file operations, as Claude Code does, itself or through children."""

    def __init__(self, session_id: str, cwd: Path) -> None:
        self.id, self.cwd = session_id, cwd
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", SESSION_LOOP], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=cwd,
                                     env={k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"})

    def _call(self, request: dict[str, object]) -> dict[str, object]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def hook(self, e: dict[str, object]) -> dict[str, object]:
        """Run `coherent-volume hook claude-code` with the event; returns exit code, stdout, stderr."""
        return self._call({"op": "hook", "cli": CLI, "event": e})

    def read(self, path: Path) -> str:
        """The Read tool: read the file, then the PostToolUse hook with what was read."""
        text = self._call({"op": "read", "path": str(path)})["text"]
        self.hook(event("PostToolUse", self.id, self.cwd, "Read", path, read_response(path, text)))
        return text

    def tool_write(self, path: Path, content: str, mode: str = "rename") -> dict[str, object]:
        """Claude's write sequence alone (a node child of this process), with no hook around it."""
        return self._call({"op": "node", "args": [str(path), content, mode]})

    def write(self, path: Path, content: str) -> dict[str, object]:
        """The Write tool: PreToolUse hook; if allowed, Claude's write sequence, then PostToolUse."""
        pre = self.hook(event("PreToolUse", self.id, self.cwd, "Write", path))
        decision = json.loads(pre["stdout"])["hookSpecificOutput"]["permissionDecision"] if pre["stdout"] else "allow"
        if decision == "allow":
            assert self.tool_write(path, content)["code"] == 0
            self.hook(event("PostToolUse", self.id, self.cwd, "Write", path, {"type": "update"}))
        return {"decision": decision, "reason": pre["stdout"]}

    def close(self) -> None:
        self.hook(event("SessionEnd", self.id, self.cwd))
        self.proc.kill()
        self.proc.wait()


SESSION_LOOP = """
import json, subprocess, sys
NODE = %r
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "hook":
        r = subprocess.run([req["cli"], "hook", "claude-code"], input=json.dumps(req["event"]), capture_output=True, text=True)
        out = {"code": r.returncode, "stdout": r.stdout.strip(), "stderr": r.stderr.strip()}
    elif req["op"] == "read":
        with open(req["path"]) as f:
            out = {"text": f.read()}
    else:
        r = subprocess.run(["node", "-e", NODE, *req["args"]], capture_output=True, text=True)
        out = {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    print(json.dumps(out), flush=True)
""" % CLAUDE_WRITE


def version(root: Path, rel: str = P) -> int:
    with CoherentVolume(root, agent="observer") as v:
        return v.version(rel)


@pytest.fixture
def sessions():
    opened: list[Session] = []

    def make(session_id: str, cwd: Path) -> Session:
        s = Session(session_id, cwd)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


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
    for words in ("plans/plan.md", "version 1", "current version is 2", "claude:s2", "Read the file again"):
        assert words in reason
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


def test_edit_of_a_never_read_file_is_denied(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "exists\n")
    s = sessions("fresh", root)
    answer = s.hook(event("PreToolUse", "fresh", root, "Edit", root / P))
    out = json.loads(str(answer["stdout"]))["hookSpecificOutput"]
    assert out["permissionDecision"] == "deny" and "have not read it" in out["permissionDecisionReason"]


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


def test_bad_events_fail_open_with_a_warning(root: Path) -> None:
    for payload in ("not json", "[]", json.dumps({"hook_event_name": "PreToolUse"})):
        r = subprocess.run([CLI, "hook", "claude-code"], input=payload, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and r.stdout == "" and "coherent-volume" in r.stderr


def test_session_end_releases_grants(root: Path, sessions) -> None:
    s = sessions("ender", root)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import time
from coherent_volume import CoherentVolume
with CoherentVolume({str(root)!r}, agent="claude:ender").lock({P!r}, ttl=3600):
    print("locked", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
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
    original = {"model": "opus", "hooks": {"PreToolUse": [
        {"matcher": "Bash", "hooks": [{"type": "command", "command": "echo mine"}]}]}}
    settings.write_text(json.dumps(original))
    r = subprocess.run([CLI, "claude-code", "install", str(tmp_path / "proj")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    installed = json.loads(settings.read_text())
    assert installed["model"] == "opus"
    assert installed["hooks"]["PreToolUse"][0]["hooks"][0]["command"] == "echo mine"
    assert set(installed["hooks"]) == {"PreToolUse", "PostToolUse", "SessionEnd"}
    command = installed["hooks"]["SessionEnd"][0]["hooks"][0]["command"]
    assert command.endswith("coherent-volume hook claude-code") and os.path.isabs(command.split()[0])
    subprocess.run([CLI, "claude-code", "install", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == installed, "install is idempotent"
    subprocess.run([CLI, "claude-code", "uninstall", str(tmp_path / "proj")], check=True, capture_output=True)
    assert json.loads(settings.read_text()) == original


def test_install_refuses_a_broken_settings_file(tmp_path: Path) -> None:
    settings = tmp_path / ".claude/settings.json"
    settings.parent.mkdir()
    settings.write_text("{not json")
    r = subprocess.run([CLI, "claude-code", "install", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "not valid JSON" in r.stderr
    assert settings.read_text() == "{not json"
    assert our_hooks("x")["PreToolUse"][0]["matcher"] == "Write|Edit|MultiEdit|NotebookEdit"
    install(tmp_path / "new/settings.json", "x hook claude-code")
    uninstall(tmp_path / "new/settings.json")
    assert json.loads((tmp_path / "new/settings.json").read_text()) == {}
