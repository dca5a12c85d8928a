"""Codex CLI sessions: hook events shaped as Codex's documentation specifies
(tests/fixtures/codex/events.json), run through `coherent-volume hook codex` by a stand-in Codex
process, with and without a mount. A Codex session's view is formed from its patches."""

from __future__ import annotations

import errno
import json
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, codex
from coherent_volume.codex import parse_patch

from .harness.agent_session import AgentProcess, commit_lock_held, fill, fixture, started, timed_hook
from .harness.mounts import CLI, Mount

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
        return fill(EVENTS[name], session=self.id, cwd=self.cwd, subagent=self.subagent or "", **values)

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
        "  *** Add File: plans/new.md\n"
        "+fresh\n"
        "*** Delete File: plans/old.md\n"
        "*** End Patch\n"
    )
    files = parse_patch(patch)
    assert [(f.path, f.op, f.move_to) for f in files] == [
        ("plans/plan.md", "update", "plans/done.md"),
        ("plans/new.md", "add", None),
        ("plans/old.md", "delete", None),
    ]
    assert files[0].chunks == [["## Steps"], ["step A", "step B", "", "step C"]]


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
    assert writers(root)[0] == (2, "codex:k2")

    verdict, reason = one.apply(update(P, " goal", "-step A", "+step A (revised)", " step B"), {P: "lost"})
    assert verdict == "deny"
    for words in (P, "(stale)", "version 1", "current version is 2", "codex:k2", "written against an earlier version"):
        assert words in reason, (words, reason)
    assert "-step A\n+step A, done" in reason, "the diff since the version the patch was written against"
    if mounted:  # Codex's own write is refused by the file system as well
        forced = one.write(workdir / P, "forced\n")
        assert forced["code"] == 1 and forced["errno"] == errno.EACCES
    assert (workdir / P).read_text() == "goal\nstep A, done\nstep B\n"

    patch = update(P, " goal", "-step A, done", "+step A, done and revised", " step B")
    assert one.apply(patch, {P: "goal\nstep A, done and revised\nstep B\n"}) == ("allow", "")
    assert writers(root)[0] == (3, "codex:k1")


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
    assert (root / P).read_text() == "\n".join(both) + "\n" and writers(root)[0] == (3, "codex:p1")


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
    assert verdict == "deny" and "(held)" in reason and "codex:u1 holds its write grant" in reason
    assert "Wait a few seconds" in reason
    one.hook(one.event("stop"))  # the end of the turn releases what the session still holds
    assert decision(two.hook(two.event("pre_apply_patch", patch=patch)))[0] == "allow"
    two.hook(two.event("stop"))

    f = sessions("f1", root)
    assert decision(f.hook(f.event("pre_apply_patch", patch=patch)))[0] == "allow"  # its view: the current version
    f.hook(f.event("stop"))
    with CoherentVolume(root, agent="codex:f1") as same_agent, same_agent.lock(P, ttl=0.1):
        time.sleep(0.2)  # the lock() grant expires; the next look reclaims it and fences its agent
        verdict, reason = decision(f.hook(f.event("pre_bash", command=f"rm {P}")))
        assert verdict == "deny" and "(fenced)" in reason and "reclaimed" in reason
        assert decision(f.hook(f.event("pre_apply_patch", patch=patch)))[0] == "allow", (
            "a patch built on the current content shows the file was seen again: the fence is lifted"
        )


def test_subagents_are_agents_of_their_own(root: Path, sessions) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    a, b = sessions("parent", root, "worker-a"), sessions("parent", root, "worker-b")
    patch = update(P, " goal", "-step A", "+step A!", " step B")
    assert decision(a.hook(a.event("pre_apply_patch_subagent", patch=patch)))[0] == "allow"
    verdict, reason = decision(b.hook(b.event("pre_apply_patch_subagent", patch=patch)))
    assert verdict == "deny" and "codex:parent/worker-a holds its write grant" in reason


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


_hook = partial(timed_hook, "codex")


def test_fails_closed_for_managed_paths_when_it_cannot_decide(root: Path, tmp_path: Path) -> None:
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, PLAN)
    patch = update(P, " goal", "-step A", "+step A!")

    def ev(name: str, **values: object) -> dict[str, object]:
        return fill(EVENTS[name], session="closed", cwd=root, **values)

    with commit_lock_held(root):
        r, took = _hook(ev("pre_apply_patch", patch=patch))
        verdict, reason = decision({"code": r.returncode, "json": json.loads(r.stdout)})
        assert verdict == "deny" and "did not finish in time" in reason and f"coherent-volume why {root / P}" in reason
        assert took < codex.hooks.HOOK_TIMEOUT, f"answered after {took:.1f} s: Codex would have applied the patch"
        r, _ = _hook(ev("pre_apply_patch", patch=update(str(tmp_path / "elsewhere.md"), "-a", "+b")))
        assert r.returncode == 0 and r.stdout == "", "a path in no volume is not held up"

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
