"""Which file a hook event names: every face resolves a path as the kernel will open it, so a
path through a symlink that lives outside the volume, or a `..` after one, is checked as the
managed file it reaches, and a read and a write of one file through two spellings agree. Each
hook call is `coherent-volume hook FACE` with the event on stdin (`timed_hook`)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume
from coherent_volume.errors import NestedVolume, VolumeConfigError
from coherent_volume.hook_paths import session_file

from .harness.agent_session import commit_lock_held, fill, fixture, timed_hook, unique
from .harness.mounts import CLI, Mount, bound

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


def _claude_bash(root: Path, session: str, path: str) -> dict[str, Any]:
    tool = {"tool_name": "Bash", "tool_input": {"command": f"echo mine > {path}"}, "tool_use_id": "toolu_bash"}
    return {**_claude(root, session, path), **tool}


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
    "claude-code Bash": ("claude-code", _claude_bash),
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


def _hook_with_bind(face: str, event: dict[str, Any], source: Path, at: Path) -> subprocess.CompletedProcess[str]:
    """`coherent-volume hook FACE` run with `event` in a mount namespace of its own where `source` is
    bind-mounted at `at`: the mount ends with the namespace, whatever happens."""
    at.mkdir(exist_ok=True)
    script = 'mount --bind "$SOURCE" "$AT" && exec "$CLI" hook "$FACE"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=json.dumps(event),
        env={**os.environ, "SOURCE": str(source), "AT": str(at), "CLI": str(CLI), "FACE": face},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@pytest.mark.parametrize("face", FACES)
def test_a_write_through_a_bind_mount_of_a_volumes_subdirectory_is_checked(
    root: Path, tmp_path: Path, face: str
) -> None:
    """`mount --bind VOL/plans /x`: walking up from /x/plan.md never meets the volume's registry, so
    every face took the write for one in no volume and let a stale write through (/tmp/s31hookproto
    2). The volume is found through the mount table (the directory the bind shows, reached through
    a mount of its file system's root), so the write is checked as the managed file it is. The bind
    is made in a mount namespace of the hook's own, gone with it."""
    command, event = FACES[face]
    deeper = "plans/deeper/notes.md"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
        setup.write(deeper, "v1\n")
    (tmp_path / "free").mkdir()
    for source, name, rel in ((root / "plans", "plan.md", P), (root / "plans/deeper", "notes.md", deeper)):
        at = tmp_path / f"bind-{source.name}"
        r = _hook_with_bind(command, event(tmp_path, f"bind-{source.name}", f"{at}/{name}"), source, at)
        reason = _denial(r.stdout)
        assert reason is not None and "(unread)" in reason and rel in reason, (source, r.stdout, r.stderr)
    at = tmp_path / "bind-free"
    r = _hook_with_bind(command, event(tmp_path, "bind-free", f"{at}/new.md"), tmp_path / "free", at)
    assert r.returncode == 0 and _denial(r.stdout) is None, (r.stdout, r.stderr)  # (a bind of no volume's directory)
    assert (root / P).read_text() == "v1\n"
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


_SETUP = """import sys
from coherent_volume import CoherentVolume
with CoherentVolume(sys.argv[1], agent="setup") as setup:
    setup.write(sys.argv[2], "v1\\n")
"""


def _hook_after(mounting: str, face: str, event: Event, root: Path, session: str, at: str, rel: str) -> str | None:
    """The denial of `coherent-volume hook FACE` for a write of `at` (an absolute path), run in a
    mount namespace of its own after the shell commands `mounting` and a write of `rel` by another
    writer (so a session that never read it is denied it `unread`): the mounts end with it."""
    script = f'set -e; {mounting}; "$PY" -c "$SETUP" {root} {rel}; exec "$CLI" hook "$FACE"'
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        input=json.dumps(event(root.parent, session, at)),
        env={**os.environ, "PY": sys.executable, "SETUP": _SETUP, "CLI": str(CLI), "FACE": face},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    return _denial(r.stdout)


_BINDS = {
    "moved onto": (
        "mkdir D/free D/m1 D/x && mount --bind VOL/plans D/m1 && mount --bind D/free D/x && mount --move D/m1 D/x",
        "D/x/plan.md",
        P,
    ),
    "hidden by a parent": (
        "mkdir -p D/free D/a/plans VOL/plans/plans && mount --bind D/free D/a/plans && mount --bind VOL/plans D/a",
        "D/a/plans/plan.md",
        "plans/plans/plan.md",
    ),
}


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@pytest.mark.parametrize("case", _BINDS)
@pytest.mark.parametrize("face", FACES)
def test_a_write_through_the_bind_in_use_where_mountinfo_lists_another_last_is_checked(
    root: Path, tmp_path: Path, face: str, case: str
) -> None:
    """The mount in use at a mountpoint was taken as the last mountinfo lists there, so a write through
    a bind of VOL/plans reached the volume's file as one in no volume, a stale write let through
    (/tmp/s31r2h 2): a bind moved (`mount --move`) onto a mountpoint in use is on top, yet listed
    before the mount it covers; a bind at D/a hides an older one at D/a/plans, which is the last
    listed there. The mount in use is now found from the root down by parent ids."""
    command, event = FACES[face]
    mounting, at, rel = (s.replace("VOL", str(root)).replace("D/", f"{tmp_path}/") for s in _BINDS[case])
    reason = _hook_after(mounting, command, event, root, "moved", at, rel)
    assert reason is not None and "(unread)" in reason and rel in reason, reason
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
@pytest.mark.parametrize("face", FACES)
def test_a_write_through_a_bind_of_a_file_systems_root_mounted_in_a_volume_is_checked(
    root: Path, tmp_path: Path, face: str
) -> None:
    """`mount -t tmpfs t VOL/plans; mount --bind VOL/plans /x`: the bind shows its file system's root,
    so no mount shows more of it, and /x/plan.md, which is VOL/plans/plan.md, was "in no volume", a
    stale write let through (/tmp/s31r2h 1). It is found through the other mount of that root, the
    one in the volume. A bind of a tmpfs mounted nowhere in a volume stays in no volume."""
    command, event = FACES[face]
    d = tmp_path
    mounting = f"mount -t tmpfs t {root}/plans && mkdir {d}/x && mount --bind {root}/plans {d}/x"
    reason = _hook_after(mounting, command, event, root, "tmpfs", f"{d}/x/plan.md", P)
    assert reason is not None and "(unread)" in reason and P in reason, reason
    mounting = f"mkdir {d}/free {d}/y && mount -t tmpfs t {d}/free && mount --bind {d}/free {d}/y"
    assert _hook_after(mounting, command, event, root, "tmpfs-free", f"{d}/y/new.md", "notes.md") is None
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


@pytest.mark.parametrize("face", FACES)
def test_slashes_doubled_after_the_root_spell_the_same_managed_file(root: Path, face: str) -> None:
    """`ROOT//plans/plan.md` is the file `ROOT/plans/plan.md`, for the kernel and for the check (a
    path below the root kept its leading slash and was taken for a file outside the volume)."""
    command, event = FACES[face]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    for path in (f"{root}//{P}", f"{root}///{P}", f"{root}//plans//plan.md"):
        r, _ = timed_hook(command, event(root, "slashes", path))
        reason = _denial(r.stdout)
        assert reason is not None and "(unread)" in reason and P in reason, (path, r.stdout, r.stderr)
    assert (root / P).read_text() == "v1\n"


@pytest.mark.parametrize("face", ["claude-code Write", "gemini write_file", "cursor Write"])
def test_a_write_tools_event_that_names_no_file_path_is_denied(root: Path, face: str) -> None:
    """A write tool's input whose path is no string (a list, a number, missing, the input itself a
    string) is a write that could not be checked: denied, saying so (before, it was let through
    silently as naming no file, /tmp/s28hooks F3). A valid path beside it changes nothing."""
    command, event = FACES[face]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    base = event(root, "no-path", str(root / P))
    key = next(k for k in ("file_path", "path", "target_file") if k in base["tool_input"])
    for named in ([str(root / P)], 5, None, ""):
        tool_input = {**base["tool_input"], key: named, "path": str(root / P)} if key != "path" else {"path": named}
        for given in (tool_input, json.dumps(tool_input)):
            r, _ = timed_hook(command, {**base, "tool_input": given})
            reason = _denial(r.stdout)
            assert reason is not None and "names no file path" in reason, (named, given, r.stdout, r.stderr)
    assert (root / P).read_text() == "v1\n"


@pytest.mark.parametrize(
    ("face", "keys"),
    [
        ("claude-code Write", ("file_path", "notebook_path")),
        ("cursor Write", ("file_path", "path", "target_file", "target_notebook")),
    ],
)
def test_a_write_tools_event_naming_two_files_is_denied(
    root: Path, tmp_path: Path, face: str, keys: tuple[str, ...]
) -> None:
    """A write tool's input that names one file under one of its path keys and another file under
    another: which the tool writes cannot be told, so it is denied (before, only the first key's was
    checked: a free file there let a write to the managed file under the other key through)."""
    command, event = FACES[face]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    free = str(tmp_path / "free.txt")
    (tmp_path / "out/deep").mkdir(parents=True)
    (root / "src").mkdir()
    (root / "src/x").symlink_to(tmp_path / "out/deep")  # src/x/../../P is P by its text, not for the kernel
    through = f"{root}/src/x/../../{P}"
    base = event(root, "two-files", str(root / P))
    for first, second in itertools.permutations(keys, 2):
        for one, other in ((free, str(root / P)), (str(root / P), free), (through, str(root / P))):
            r, _ = timed_hook(command, {**base, "tool_input": {**base["tool_input"], first: one, second: other}})
            reason = _denial(r.stdout)
            assert reason is not None and "names more than one file" in reason, (first, second, r.stdout, r.stderr)
        same = {**base["tool_input"], first: str(root / P), second: f"{root}//{P}"}  # one file, two spellings
        r, _ = timed_hook(command, {**base, "tool_input": same})
        reason = _denial(r.stdout)
        assert reason is not None and "(unread)" in reason, (first, second, r.stdout, r.stderr)
    assert (root / P).read_text() == "v1\n"


@pytest.mark.parametrize("face", ["claude-code Write", "gemini write_file", "cursor Write", "codex apply_patch"])
def test_a_write_tools_path_through_the_agents_own_process_is_denied(root: Path, face: str) -> None:
    """A file tool opens its path in the agent's process, so /proc/self/cwd there is the agent's
    working directory, not the hook's: such a path (or /dev/fd/N) cannot be checked, and the write is
    denied saying so (before, it was resolved in the hook's process, running elsewhere, and let
    through unchecked as naming no managed file: /tmp/s30hooks 6)."""
    command, event = FACES[face]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    assert os.getcwd() != str(root)
    (root / "me").symlink_to("/proc/self")  # (a link to the opening process's entry: /tmp/s30r2h 1)
    for path in (
        f"/proc/self/cwd/{P}",
        f"/proc/thread-self/cwd/{P}",
        f"/proc/./self/root{root}/{P}",
        "/dev/fd/7",
        f"/dev/fd/../cwd/{P}",
        f"{root}/me/cwd/{P}",
    ):
        r, _ = timed_hook(command, event(root, "own-process", path))
        reason = _denial(r.stdout)
        assert reason is not None and "through the agent's own process" in reason, (path, r.stdout, r.stderr)
        assert "do not retry the write unchanged" in reason, reason  # (retrying cannot help)
    assert (root / P).read_text() == "v1\n"


@pytest.mark.parametrize("face", FACES)
def test_a_path_with_a_lone_surrogate_is_denied_wherever_it_leads(root: Path, tmp_path: Path, face: str) -> None:
    """JSON's `\\udce9` without its pair is a lone surrogate: Node (Claude Code, Gemini CLI, Cursor)
    opens it as U+FFFD, Python as the byte 0xE9. Through a directory named U+FFFD outside the volume
    that leads into it, the hook saw no such entry ("in no volume") and let a stale write through,
    which Node made to the managed file (/tmp/s31hookproto 3): a write naming such a path is denied
    wherever it leads, saying why; a shell command with one that writes nothing goes ahead."""
    command, event = FACES[face]
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "\ufffd").symlink_to(root / "plans")
    for path in (f"{tmp_path}/links/\udce9/plan.md", f"{tmp_path}/nowhere-\udce9.md"):
        r, _ = timed_hook(command, event(tmp_path, "surrogate", path))
        reason = _denial(r.stdout)
        assert reason is not None and "lone UTF-16 surrogate" in reason, (path, r.stdout, r.stderr)
    if face.endswith("Bash"):
        read = {**event(tmp_path, "surrogate", "x"), "tool_input": {"command": f"cat {tmp_path}/links/\udce9/plan.md"}}
        r, _ = timed_hook(command, read)
        assert _denial(r.stdout) is None, r.stdout
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


SESSION_FACES = {
    "claude-code": "claude-code Write",
    "codex": "codex Bash",
    "gemini": "gemini write_file",
    "cursor": "cursor Write",
}
"""Each face, by its command, and the name of a write check of it in FACES."""


def _session_events(face: str, cwd: Path, session: str) -> tuple[str, list[dict[str, Any]]]:
    """The agent a session of `face` working in `cwd` is, and its session events in order (its
    start, a prompt's, its end or, for Codex, which has none, the end of a turn), shaped as the
    face's agent sends them."""
    sid = unique(session)
    if face == "claude-code":
        base = {
            "session_id": sid,
            "transcript_path": f"/tmp/{sid}.jsonl",
            "cwd": str(cwd),
            "permission_mode": "default",
        }
        names = ("SessionStart", "UserPromptSubmit", "SessionEnd")
        return f"claude:{sid}", [{**base, "hook_event_name": name} for name in names]
    events = fixture(face)
    if face == "cursor":
        return f"cursor:{sid}", [fill(events[n], conversation=sid, root=cwd) for n in ("session_start", "session_end")]
    names = (
        ("session_start", "user_prompt_submit", "stop")
        if face == "codex"
        else ("session_start", "before_agent", "session_end")
    )
    return f"{face}:{sid}", [fill(events[n], session=sid, cwd=cwd) for n in names]


def _rows(root: Path, table: str) -> list[tuple[Any, ...]]:
    """The rows of a table of the SQLite registry at `root`, read straight from the file (no lock taken)."""
    with closing(sqlite3.connect(f"file:{root / '.coherent/registry.db'}?mode=ro", uri=True)) as db:
        return sorted(db.execute(f"SELECT * FROM {table}").fetchall(), key=repr)


def _volume(at: Path) -> Path:
    at.mkdir()
    CoherentVolume(at, managed=("plans/**", "*.md"), agent="setup").close()
    (at / "plans").mkdir()
    return at


@pytest.mark.parametrize("face", SESSION_FACES)
def test_a_sessions_events_neither_wait_on_nor_change_a_volume_it_never_worked_in(
    root: Path, tmp_path: Path, face: str
) -> None:
    """A session works in volume A (mounted; its working directory). Volume B is mounted too,
    another process holds its commit lock, and a process of this host holds a lock there under the
    session's agent name (not through its hooks). The session's start, a prompt and its end are
    each answered with no warning (none waited for B's lock until its budget ran out), and B is as
    it was: no binding, the lock still held, nothing logged. A is where the session is bound."""
    other = _volume(tmp_path / "other")
    with Mount(root, tmp_path / "mnt_a") as a, Mount(other, tmp_path / "mnt_b"):
        agent, events = _session_events(face, a.path, "apart")
        with CoherentVolume(other, agent=agent) as peer, peer.lock(P, ttl=3600):
            before = {table: _rows(other, table) for table in ("sessions", "grants", "events")}
            assert [grant[:2] for grant in before["grants"]] == [(P, agent)]
            with commit_lock_held(other):
                for number, e in enumerate(events):
                    r, _ = timed_hook(face, e)
                    assert (r.returncode, r.stderr) == (0, ""), (e["hook_event_name"], r.stdout, r.stderr)
                    if number == 0:
                        assert agent in {row[0] for row in _rows(root, "sessions")}, "the start binds it in A"
            assert {table: _rows(other, table) for table in before} == before


@pytest.mark.parametrize("face", SESSION_FACES)
def test_a_sessions_end_reaches_a_volume_its_hooks_worked_in_outside_its_working_directory(
    root: Path, tmp_path: Path, face: str
) -> None:
    """A session whose working directory is in volume A writes a new file in volume B (not
    mounted, not its working directory): the write check takes its grant in B, and the session's
    end (Codex: the end of its turn) releases it there, as in A. The note of the volumes it works
    in goes with its end."""
    other = _volume(tmp_path / "other")
    agent, (*_, end) = _session_events(face, root, "across")
    _, check = FACES[SESSION_FACES[face]]
    r, _ = timed_hook(face, check(root, "across", str(other / "plans/new.md")))
    assert r.returncode == 0 and _denial(r.stdout) is None, (r.stdout, r.stderr)
    assert [grant[:2] for grant in _rows(other, "grants")] == [("plans/new.md", agent)]
    noted = session_file("volumes", agent)
    assert noted is not None and noted.exists(), "its hooks noted the volumes it works in"
    r, _ = timed_hook(face, end)
    assert (r.returncode, r.stderr) == (0, ""), (r.stdout, r.stderr)
    assert _rows(other, "grants") == [], "its grant in B is released"
    assert noted.exists() == (face == "codex"), "the note goes with the session's end (Codex: a turn's end)"


@pytest.mark.parametrize("face", FACES)
def test_no_spelling_of_the_registrys_path_lets_a_write_reach_it(root: Path, face: str) -> None:
    """The registry's own directory is no file of the volume and nothing but coherent-volume may
    change it: a write to it is denied, saying so, however the path is spelled (`./`, a `..`, a
    symlink to it), and so is a shell command that would delete it with the rest of the volume."""
    command, event = FACES[face]
    (root / "reg").symlink_to(".coherent")
    registry = (root / ".coherent/registry.db").read_bytes()
    for path in (
        f"{root}/./.coherent/registry.db",
        f"{root}/plans/../.coherent/registry.db",
        f"{root}/reg/registry.db",
        f"{root}//.coherent//registry.db",
    ):
        r, _ = timed_hook(command, event(root, "reg", path))
        reason = _denial(r.stdout)
        assert reason is not None and "is the registry's own directory" in reason, (path, r.stdout, r.stderr)
        assert "leave it out of the command" in reason, reason
    os.link(root / ".coherent/registry.db", root / "notes.db")  # made outside the hooks: the volume is refused
    r, _ = timed_hook(command, event(root, "reg", f"{root}/notes.db"))
    reason = _denial(r.stdout)
    assert reason is not None and "registry.db has 2 hard links" in reason, (r.stdout, r.stderr)
    assert "do not retry the write unchanged" in reason, reason
    os.unlink(root / "notes.db")
    r, _ = timed_hook("codex", _codex_shell(root, "reg", "echo mine > /dev/null; find . -delete"))
    reason = _denial(r.stdout)
    assert reason is not None and "is the registry's own directory" in reason, (r.stdout, r.stderr)
    assert (root / ".coherent/registry.db").read_bytes() == registry


def _codex_shell(root: Path, session: str, command: str, hook: str = "pre_bash") -> dict[str, Any]:
    """Codex's event before (or with `hook="post_bash"`, after) its shell runs `command` in `root`: its
    input gives `root` as the command's `workdir`, so its relative paths are checked there (Codex's
    own events give none, and the hook refuses such writes in a volume: test_codex)."""
    event = dict(fill(fixture("codex")[hook], session=unique(session), cwd=root, command=command))
    return {**event, "tool_input": {**event["tool_input"], "workdir": str(root)}}


def _run_tool(root: Path, session: str, command: str) -> str | None:
    """A Codex shell tool call: the hook before it, the command (if allowed) in `root`, the hook
    after it; the denial's reason, or None and what the hook after it told the model ("" if nothing)."""
    r, _ = timed_hook("codex", _codex_shell(root, session, command))
    reason = _denial(r.stdout)
    if reason is not None:
        return reason
    subprocess.run(["bash", "-c", command], cwd=root, check=True)
    r, _ = timed_hook("codex", _codex_shell(root, session, command, "post_bash"))
    assert r.returncode == 0 and not r.stderr, (r.stdout, r.stderr)
    return None


def _holders(root: Path) -> list[str]:
    status = subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, check=True)
    return [f["holder"] for f in json.loads(status.stdout)["files"] if f["holder"]]


def _log(root: Path) -> list[dict[str, Any]]:
    out = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


def test_a_symlink_a_command_makes_gives_no_view_of_the_file_it_leads_to(root: Path) -> None:
    """`ln -s plans/plan.md sym.txt` writes only a new unmanaged name, so it goes ahead, and the end
    of the tool records only what its start checked: nothing. The link leads to a managed file the
    session never read, yet it gets no view of it: its write of that file is refused `unread`. A
    command that writes through a link it makes itself is not checked before it runs (the link is
    not there yet); its end records no commit of the session's and speaks of no grant it never
    took: the volume takes the change for a foreign one at its next access."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    assert _run_tool(root, "linker", "ln -s plans/plan.md sym.txt") is None
    reason = _run_tool(root, "linker", "echo evil > plans/plan.md")
    assert reason is not None and "(unread)" in reason, reason
    r, _ = timed_hook("codex", _codex_shell(root, "through", "ln -s plans/plan.md out.txt && echo evil > out.txt"))
    assert _denial(r.stdout) is None, r.stdout
    subprocess.run(["bash", "-c", "ln -s plans/plan.md out.txt && echo evil > out.txt"], cwd=root, check=True)
    command = "ln -s plans/plan.md out.txt && echo evil > out.txt"
    r, _ = timed_hook("codex", _codex_shell(root, "through", command, "post_bash"))
    assert (r.returncode, r.stdout, r.stderr) == (0, "", ""), "no lapsed grant is told of: none was taken"
    assert _holders(root) == []
    assert [(e["kind"], e["agent"]) for e in _log(root) if e["kind"] != "refusal"] == [
        ("commit", "setup"),
        ("foreign", "external"),
    ]


def test_removing_a_symlink_removes_the_link_never_the_file_it_leads_to(root: Path) -> None:
    """`rm alias.txt` where alias.txt -> plans/plan.md removes the link, as unlink(2) does: no file
    of the volume is written, so a session that never read plan.md may run it (and apply_patch's
    Delete File of a link), and one that did takes no grant on plan.md, which another agent may
    write right after (no grant left held for up to its TTL)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    for link in ("alias.txt", "alias2.txt", "alias3.txt"):
        (root / link).symlink_to(P)
    assert _run_tool(root, "never-read", "rm alias.txt") is None
    patch = "*** Begin Patch\n*** Delete File: alias2.txt\n*** End Patch\n"
    r, _ = timed_hook(
        "codex", dict(fill(fixture("codex")["pre_apply_patch"], session=unique("nr"), cwd=root, patch=patch))
    )
    assert _denial(r.stdout) is None, r.stdout
    update = "*** Begin Patch\n*** Update File: plans/plan.md\n@@\n v1\n+more\n*** End Patch\n"
    events = {
        h: fill(fixture("codex")[h], session=unique("reader"), cwd=root, patch=update)
        for h in ("pre_apply_patch", "post_apply_patch")
    }
    r, _ = timed_hook("codex", events["pre_apply_patch"])
    assert _denial(r.stdout) is None, r.stdout
    (root / P).write_text("v1\nmore\n")
    timed_hook("codex", events["post_apply_patch"])
    assert _run_tool(root, "reader", "rm alias3.txt") is None
    assert _holders(root) == [], "no grant is left on plans/plan.md"
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.write(P, "bob\n")
    assert (root / P).read_text() == "bob\n"


def test_a_volume_moved_inside_another_is_refused_by_every_face(root: Path, tmp_path: Path) -> None:
    """Volumes do not nest. A volume made before inside another one (here: moved into it) is never
    opened: not by the API, and not by a hook, which denies a write of a file below it, saying why
    (the outer volume manages `sub/x.md`, which a session that never read it would otherwise write
    unchecked, since the nearest volume does not manage it) and not to retry (only the user can
    move a volume)."""
    (root / "sub").mkdir()
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("sub/x.md", "alice's notes\n")
    inner = tmp_path / "inner"
    inner.mkdir()
    CoherentVolume(inner, managed=("plans/**",), agent="setup").close()
    (inner / ".coherent").rename(root / "sub/.coherent")
    with pytest.raises(NestedVolume, match="lies inside the volume at"):
        CoherentVolume(root / "sub", agent="bob")
    for name, (command, event) in FACES.items():
        r, _ = timed_hook(command, event(root, "nested", str(root / "sub/x.md")))
        reason = _denial(r.stdout)
        assert reason is not None and "volumes do not nest" in reason, (name, r.stdout, r.stderr)
        assert "Retry" not in reason and "do not retry" in reason, (name, reason)  # a retry changes nothing
    assert (root / "sub/x.md").read_text() == "alice's notes\n"


def test_a_directory_named_with_a_trailing_slash_that_does_not_exist_yet_is_no_failed_check(root: Path) -> None:
    """`cp -r src build/` and `mv notes.txt newdir/` write into a directory the command makes or
    finds: the check names it without its `/` (it was denied as a check that failed, saying to retry,
    which never helped); a managed file named with a trailing `/` is still checked."""
    (root / "src").mkdir()
    (root / "src/x.py").write_text("x\n")
    (root / "notes.txt").write_text("n\n")
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1\n")
    for command in ("cp -r src build/", "cp src/x.py out/", "mv notes.txt newdir/"):
        r, _ = timed_hook("codex", _codex_shell(root, "slash-dir", f"echo mine > /dev/null; {command}"))
        assert _denial(r.stdout) is None, (command, r.stdout, r.stderr)
    r, _ = timed_hook("codex", _codex_bash(root, "slash-file", f"{root}/{P}/"))
    reason = _denial(r.stdout)
    assert reason is not None and "(unread)" in reason and P in reason, (r.stdout, r.stderr)


def test_a_write_in_a_volume_mounted_inside_another_mount_is_checked_as_the_inner_volumes(
    mounted: Mount, tmp_path: Path
) -> None:
    """Mounts on mounts: the path is the deepest mount's, as the kernel resolves it."""
    inner = tmp_path / "inner"
    inner.mkdir()
    subprocess.run([CLI, "init", str(inner), "--managed", "plans/**"], check=True, capture_output=True)
    with CoherentVolume(inner, agent="setup") as setup:
        setup.write(P, "v1\n")
    (mounted.path / "sub").mkdir()
    with Mount(inner, mounted.path / "sub") as m:
        r, _ = timed_hook("claude-code", _claude(m.path, "in", str(m.path / P)))
    reason = _denial(r.stdout)
    assert reason is not None and "(unread)" in reason and "by setup" in reason, (r.stdout, r.stderr)


def test_a_plain_volume_bound_inside_a_mount_is_checked_as_itself(mounted: Mount, tmp_path: Path) -> None:
    """A bind mount inside a volume's mount shows another directory, served past the daemon: a path
    there is the volume it holds, as the kernel resolves it (/tmp/s26r2 F1: checked as the outer
    volume's unmanaged name, the write of a hooks-only volume's file went through unrefused)."""
    inner = tmp_path / "inner"
    inner.mkdir()
    subprocess.run([CLI, "init", str(inner), "--managed", "plans/**"], check=True, capture_output=True)
    with CoherentVolume(inner, agent="setup") as setup:
        setup.write(P, "v1\n")
    (mounted.path / "plans").mkdir(exist_ok=True)
    with bound(inner, mounted.path / "plans/sub") as at:
        r, _ = timed_hook("claude-code", _claude(at, "b", str(at / P)))
        with CoherentVolume(at, agent="reader") as vol:  # the bound volume itself, not "give the outer root"
            assert vol.read(P) == b"v1\n"
    reason = _denial(r.stdout)
    assert reason is not None and "(unread)" in reason and "by setup" in reason, (r.stdout, r.stderr)


def test_a_bind_of_a_directory_of_a_mount_names_that_directorys_files(mounted: Mount, tmp_path: Path) -> None:
    """A bind mount of MNT/plans shows the volume's plans directory: a file there is plans/NAME, for
    the hooks, and the bind is no volume's root (/tmp/s26r2 F2: its files were taken as the root's
    files of that name; `restore` committed one the user never named)."""
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "the plan\n")
        setup.write("plan.md", "top\n")
    with bound(mounted.path / "plans", tmp_path / "bsub") as at:
        r, _ = timed_hook("claude-code", _claude(at, "s", str(at / "plan.md")))
        with pytest.raises(
            VolumeConfigError, match=f"is a bind mount of plans, a directory of the volume at {mounted.root}"
        ):
            CoherentVolume(at, agent="reader")
    reason = _denial(r.stdout)
    assert reason is not None and f"write to {P} (unread)" in reason, (r.stdout, r.stderr)


def test_a_bind_of_a_managed_file_replaced_since_names_that_file(mounted: Mount, tmp_path: Path) -> None:
    """A bind of MNT/plans/plan.md keeps showing the version it was made on; once a commit replaced
    it, mountinfo says `/plans/plan.md//deleted`: the hooks still check plans/plan.md (/tmp/s26r3 F3:
    an unread write was allowed, and a grant recorded on 'plans/plan.md/deleted')."""
    with CoherentVolume(mounted.root, agent="setup") as setup:
        setup.write(P, "v1\n")
        bind = tmp_path / "bf"
        bind.touch()
        subprocess.run(["mount", "--bind", str(mounted.path / P), str(bind)], check=True, capture_output=True)
        try:
            setup.write(P, "v2\n")
            r, _ = timed_hook("claude-code", _claude(tmp_path, "f", str(bind)))
        finally:
            if subprocess.run(["umount", str(bind)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(bind)], capture_output=True)
    reason = _denial(r.stdout)
    assert reason is not None and f"write to {P} (unread)" in reason, (r.stdout, r.stderr)


def test_one_hook_event_reads_the_mount_table_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each question about a path read /proc/self/mountinfo again, up to three times a path: a
    command naming 10 paths took 8.9 s to judge on a host with 8,000 mounts, past the hook's 3 s
    budget, so every such write was denied as not checked in time (0.4 s now). Within one event,
    the table is read once."""
    from coherent_volume import hook_paths, mounts

    reads: list[int] = []
    real = mounts._read_mountinfo

    def counted() -> list[mounts.Entry]:
        reads.append(1)
        return real()

    monkeypatch.setattr(mounts, "_read_mountinfo", counted)
    paths = [str(tmp_path / f"f{i}.md") for i in range(10)]
    with mounts.one_table():
        found = [hook_paths.located(p) for p in paths]
    assert len(reads) == 1
    reads.clear()
    assert [hook_paths.located(p) for p in paths] == found  # outside it: read per question, as before
    assert len(reads) >= 10
