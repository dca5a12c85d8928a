"""Which file a hook event names: every face resolves a path as the kernel will open it, so a
path through a symlink that lives outside the volume, or a `..` after one, is checked as the
managed file it reaches, and a read and a write of one file through two spellings agree. Each
hook call is `coherent-volume hook FACE` with the event on stdin (`timed_hook`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume

from .harness.agent_session import fill, fixture, timed_hook, unique
from .harness.mounts import Mount

P = "plans/plan.md"

Event = Callable[[Path, str, str], dict[str, Any]]
"""(volume root, session id, absolute path as the agent gives it) -> a write check's event."""


def _claude(root: Path, session: str, path: str) -> dict[str, Any]:
    return {
        "session_id": unique(session),
        "transcript_path": f"/tmp/{unique(session)}.jsonl",
        "cwd": str(root),
        "permission_mode": "default",
        "hook_event_name": "PreToolUse",
        "tool_name": "Write",
        "tool_input": {"file_path": path, "content": "mine\n"},
    }


def _gemini(root: Path, session: str, path: str) -> dict[str, Any]:
    return dict(
        fill(fixture("gemini")["before_write_file"], session=unique(session), cwd=root, path=path, content="mine\n")
    )


def _cursor(root: Path, session: str, path: str) -> dict[str, Any]:
    return dict(
        fill(fixture("cursor")["pre_tool_use_write"], conversation=unique(session), root=root, path=path, content="x")
    )


def _codex_patch(root: Path, session: str, path: str) -> dict[str, Any]:
    patch = f"*** Begin Patch\n*** Update File: {path}\n@@\n-text no version holds\n+mine\n*** End Patch\n"
    return dict(fill(fixture("codex")["pre_apply_patch"], session=unique(session), cwd=root, patch=patch))


def _codex_bash(root: Path, session: str, path: str) -> dict[str, Any]:
    return dict(fill(fixture("codex")["pre_bash"], session=unique(session), cwd=root, command=f"echo mine > {path}"))


FACES: dict[str, tuple[str, Event]] = {
    "claude-code Write": ("claude-code", _claude),
    "gemini write_file": ("gemini", _gemini),
    "cursor Write": ("cursor", _cursor),
    "codex apply_patch": ("codex", _codex_patch),
    "codex Bash": ("codex", _codex_bash),
}


def _denial(out: str) -> str | None:
    """The reason of a write check's answer if it denied the write, in any face's format."""
    if not out.strip():
        return None
    answer = json.loads(out)
    specific = answer.get("hookSpecificOutput", {})
    if specific.get("permissionDecision") == "deny":
        return str(specific["permissionDecisionReason"])
    if answer.get("decision") == "deny":
        return str(answer["reason"])
    if answer.get("permission") == "deny":
        return str(answer["agent_message"])
    return None


@pytest.fixture
def links(root: Path, tmp_path: Path) -> dict[str, str]:
    """Spellings of root/P from outside the volume: through a symlink to plans/, and `..` after a
    symlink to plans/sub (the kernel goes up from where the link leads; text tidying would give
    outside/plan.md)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    (root / "plans/sub").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "plans_link").symlink_to(root / "plans")
    (outside / "sub").symlink_to(root / "plans/sub")
    return {"through a link": f"{outside}/plans_link/plan.md", "up after a link": f"{outside}/sub/../plan.md"}


@pytest.mark.parametrize("face", FACES)
def test_a_write_through_a_symlink_outside_the_volume_is_checked(root: Path, links: dict[str, str], face: str) -> None:
    command, event = FACES[face]
    for spelling, path in links.items():
        assert os.path.realpath(path) == str(root / P)
        r, _ = timed_hook(command, event(root, f"s-{len(spelling)}", path))
        reason = _denial(r.stdout)
        assert reason is not None and "(unread)" in reason and P in reason, (spelling, r.stdout, r.stderr)
    assert (root / P).read_text() == "v1\n"


def test_a_file_outside_every_volume_stays_free(root: Path, tmp_path: Path) -> None:
    """A symlink out of nowhere into nowhere: no volume, so every face lets it be."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    for command, event in FACES.values():
        r, _ = timed_hook(command, event(root, "free", f"{tmp_path}/link/new.md"))
        assert _denial(r.stdout) is None, (command, r.stdout)


def _read(root: Path, session: str, path: str, text: str) -> None:
    event = {**_claude(root, session, path), "hook_event_name": "PostToolUse", "tool_name": "Read"}
    event["tool_input"] = {"file_path": path}
    event["tool_response"] = {"type": "text", "file": {"filePath": path, "content": text, "startLine": 1}}
    r, _ = timed_hook("claude-code", event)
    assert r.returncode == 0 and not r.stderr, r


def test_a_view_and_a_write_through_two_spellings_of_one_file_agree(root: Path, links: dict[str, str]) -> None:
    """Read through the link, write by the plain path (and the other way round): one file, one view."""
    through, up = links["through a link"], links["up after a link"]
    _read(root, "one", through, "v1\n")
    r, _ = timed_hook("claude-code", _claude(root, "one", str(root / P)))
    assert _denial(r.stdout) is None, r.stdout
    release = {**_claude(root, "one", str(root / P)), "hook_event_name": "PostToolUseFailure"}
    timed_hook("claude-code", release)
    _read(root, "two", str(root / P), "v1\n")
    with CoherentVolume(root, agent="other") as other:
        other.read_text(P)
        other.write(P, "v2 by other\n")
    r, _ = timed_hook("claude-code", _claude(root, "two", up))
    reason = _denial(r.stdout)
    assert reason is not None and "(stale)" in reason and "version 1" in reason, r.stdout


def test_a_managed_name_linked_to_an_unmanaged_file_is_still_refused(root: Path) -> None:
    """The core's alias rule sees the name the agent gave: plans/alias.md -> notes.txt is refused
    (the core would refuse it too), while notes.txt by its own name stays free."""
    (root / "notes.txt").write_text("free\n")
    (root / "plans/alias.md").symlink_to("../notes.txt")
    r, _ = timed_hook("claude-code", _claude(root, "al", str(root / "plans/alias.md")))
    reason = _denial(r.stdout)
    assert reason is not None and "plans/alias.md" in reason, r.stdout
    r, _ = timed_hook("claude-code", _claude(root, "al", str(root / "notes.txt")))
    assert _denial(r.stdout) is None, r.stdout


def test_a_write_through_a_symlink_to_a_mount_is_checked_as_the_mounts(mounted: Mount, tmp_path: Path) -> None:
    """A symlink outside the mount leading into it: the write is the mounted volume's."""
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\n")
    (tmp_path / "to_mount").symlink_to(mounted.path / "plans")
    r, _ = timed_hook("claude-code", _claude(mounted.path, "m", f"{tmp_path}/to_mount/plan.md"))
    reason = _denial(r.stdout)
    assert reason is not None and "(unread)" in reason and P in reason, (r.stdout, r.stderr)
