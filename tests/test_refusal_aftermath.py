"""A refusal leaves nothing behind (issue 11, "The mount behaves like a real file system").

For every refusal class, on every face where it exists (the Python API, the mount, the Claude Code
hook, the CLI), the refusal is provoked on fresh paths of agents that never acted before, and then:

(a) the registry is exactly as before: every SQLite table row by row, `coherent-volume status --json`,
    `coherent-volume log --json` and what the API reports (versions, stale views), except the
    refusal's own log entry, which must be there and name the path, the agent and the reason;
(b) the disk under the root is name for name and byte for byte as before (type, mode, size, links,
    inode and mtime of every entry; `.coherent/` aside);
(c) the refused agent, after doing what the refusal told it to do, and a Claude Code session then
    succeed at the full set of operations on the same paths: read, write, create, append,
    truncate (by path and by handle), rename of the file and of its directory, unlink, mkdir and
    rmdir through the mount; read, write, update, delete, lock and unlock through the API; the
    hook's PreToolUse and PostToolUse around a write.

The crash variants kill -9 a process in the middle of a commit (an API writer, the mount daemon, a
lock holder, a hooked session, random writers) and then run the same full set.

The cases share one volume and one mount per module (the mount costs more than a case); each case
works in a directory of its own (`plans/<case>/`, `notes/<case>/`) with agents of its own, and
the registry is compared whole, so a case that changed anything of another's would show too.

A case that fails only with a bug this file found and that is not fixed yet (`FINDINGS`) is
reported as an expected failure naming the bug; it fails outright once the bug is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from click.testing import CliRunner

from coherent_volume import CoherentVolume, InvalidPath, OutsideVolume, RegistryError, StaleWriteError, claude_code
from coherent_volume import cli as cli_module
from coherent_volume.core import VolumeCore, open_core
from coherent_volume.errors import CasConflict, MergeConflict, RetriesExhausted, UnprotectedAlias, VolumeConfigError
from coherent_volume.liveness import ProcessId
from coherent_volume.registry import sqlite as sqlite_registry

from .harness import CLI
from .harness.agent_session import unique
from .harness.crashes import _kill, writer_kills
from .harness.faults import locked_registry
from .harness.mounts import DaemonLogError, Mount, PidNamespaceMount, is_mounted
from .harness.volumes import create, integrity, sql

MANAGED = ("plans/**", "*.md")
MERGED = "plans/*/merged.md"
"""The arena's merge glob: a stale save over such a file is merged, or refused when changes overlap."""
RACY_WAIT = 0.15
"""Seconds past a file's ctime after which the registry's fingerprint of it is settled (the
protocol's racy window is 0.1 s): a snapshot taken later is not changed by a later look."""


# ---- the arena: one volume and one mount per module --------------------------------------------


@dataclass(frozen=True)
class Arena:
    """The module's volume, its mount and a stand-in Claude Code process for the hook's sessions."""

    root: Path
    mount: Mount
    session_process: ProcessId


def _sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "3600"])


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Arena]:
    base = tmp_path_factory.mktemp("aftermath")
    root = create(base / "vol", MANAGED)
    (root / "notes").mkdir()
    cli_in_process("policy", str(root), "--merge", MERGED)
    session = _sleeper()
    try:
        with Mount(root, base / "mnt") as m:
            yield Arena(root, m, ProcessId.of(session.pid))
    finally:
        session.kill()
        session.wait()


# ---- one case: its paths, agents and faces ------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A refusal the registry's log must hold afterwards (or, `kind` "conflict", the conflict of a
    refused merge, logged after its refusal, that `why` must show)."""

    path: str
    agent: str
    reason: str | None
    kind: str = "refusal"


class Case:
    """One refusal class on one face: fresh paths and agents in the arena, what the refusal must
    leave in the logs, and what the full set runs on afterwards."""

    def __init__(self, arena: Arena, name: str) -> None:
        self.arena, self.name = arena, name
        self.root, self.mount = arena.root, arena.mount
        self.dir = f"plans/{name}"
        self.a, self.b = f"{self.dir}/a.md", f"{self.dir}/b.md"
        self.notes = f"notes/{name}"
        self.free = f"{self.notes}/free.txt"
        self.alice, self.bob = f"{name}.alice", f"{name}.bob"
        self.session = unique(f"{name}.session")
        self.refused: list[Refused] = []
        self.daemon_says: list[str] = []
        self.paths = [self.a, self.free]
        hooked = name.startswith("hook-")
        self.actor = claude_code.agent_of(self.session) if hooked else self.alice
        """Who runs the full set afterwards: the refused agent."""
        self.hook_session = self.session if hooked else unique(f"{name}.after")
        self.held = ExitStack()
        """What the setup holds while the refusal happens (a lock, an open handle); the remedy ends it."""
        self.volumes: dict[tuple[str, str], CoherentVolume] = {}

    def seed(self) -> None:
        """Two managed files and an unmanaged one, written through the API by a seeding agent."""
        (self.root / self.dir).mkdir()
        (self.root / self.notes).mkdir()
        seeder = self.api(f"{self.name}.seed")
        for path in (self.a, self.b, self.free):
            seeder.write(path, f"{path} v1\n")

    def api(self, agent: str, isolation: str = "file") -> CoherentVolume:
        """The Python API as `agent` (one handle per agent and isolation, closed with the case)."""
        key = (agent, isolation)
        if key not in self.volumes:
            self.volumes[key] = CoherentVolume(self.root, agent=agent, isolation=isolation)  # type: ignore[arg-type]
        return self.volumes[key]

    def close(self) -> None:
        for vol in self.volumes.values():
            vol.close()

    def sh(self, agent: str, script: str) -> subprocess.CompletedProcess[str]:
        """A bash script as `agent` in the mount."""
        return self.mount.run(agent, script)

    def py(self, agent: str, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Python code as `agent` in the mount."""
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=self.mount.path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COHERENT_AGENT": agent},
        )

    def hook(self, name: str, tool: str | None = None, path: str | None = None, **extra: Any) -> claude_code.Answer:
        """A Claude Code hook event of this case's session about `path` (in the mount), answered in
        this process on behalf of the arena's stand-in Claude Code process."""
        event: dict[str, Any] = {"session_id": self.session, "cwd": str(self.mount.path), "hook_event_name": name}
        if tool is not None:
            event["tool_name"] = tool
            event["tool_input"] = {"file_path": str(self.mount.path / path) if path else ""}
        event.update(extra)
        return claude_code.FACE.run(json.dumps(event), process=self.arena.session_process)

    def hook_read(self, path: str) -> None:
        """The Read tool and its PostToolUse hook: the session's view is what it was shown."""
        text = (self.root / path).read_text()
        lines = text.split("\n")
        response = {"file": {"content": text, "numLines": len(lines), "startLine": 1, "totalLines": len(lines)}}
        assert self.hook("PostToolUse", "Read", path, tool_response=response).code == 0

    def refusal(self, path: str, agent: str, reason: str) -> None:
        """The refusal the registry's log must gain."""
        self.refused.append(Refused(path, agent, reason))

    def conflict(self, path: str, agent: str) -> None:
        """The merge conflict the registry's log must gain after the refusal."""
        self.refused.append(Refused(path, agent, None, "conflict"))

    def daemon(self, pattern: str) -> None:
        """A line the mount daemon must log for the refusal (a regular expression)."""
        self.daemon_says.append(pattern)

    def lock_held_by(self, agent: str, path: str) -> None:
        """`agent` holds the write grant on `path` (API `lock()`) until the remedy."""
        self.held.enter_context(self.api(agent).lock(path, ttl=600))

    def fence(self, agent: str, path: str) -> None:
        """`agent` read `path` and held its write grant, which was reclaimed when it expired: it is
        fenced there (another agent's write did the reclaiming)."""
        vol = self.api(agent)
        vol.read(path)
        with vol.lock(path, ttl=0.05):
            time.sleep(0.1)
            other = self.api(f"{self.name}.reclaimer")
            other.read(path)
            other.write(path, f"{path} by the reclaimer\n")

    def holding(self, agent: str, script: str) -> subprocess.Popen[str]:
        """A bash script as `agent` in the mount that prints 'ready' once it holds what it opened,
        killed by the remedy."""
        return self.held.enter_context(self.mount.holding(agent, script))

    def release_held(self) -> None:
        """End what the setup held, and wait until the mount has let go of the handles' grants
        (the kernel releases a closed file after its process is gone)."""
        self.held.close()
        deadline = time.monotonic() + 10
        while grants_on(self.root, self.dir, self.notes) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not grants_on(self.root, self.dir, self.notes), "a closed handle's grant stayed"


def grants_on(root: Path, *dirs: str) -> list[tuple[Any, ...]]:
    return [row for row in sql(root, "SELECT path, agent FROM grants") if any(row[0].startswith(d + "/") for d in dirs)]


def denied(answer: claude_code.Answer) -> str:
    """The reason of a PreToolUse denial ('' when the write was allowed)."""
    if not answer.stdout:
        return ""
    output = json.loads(answer.stdout)["hookSpecificOutput"]
    assert output["permissionDecision"] == "deny"
    return str(output["permissionDecisionReason"])


def refused_in_mount(result: subprocess.CompletedProcess[str], message: str = "Permission denied") -> None:
    assert result.returncode != 0 and message in result.stderr, (result.returncode, result.stderr)


# ---- what is compared ---------------------------------------------------------------------------


@dataclass
class Snapshot:
    tables: dict[str, list[tuple[Any, ...]]]
    status: dict[str, Any]
    log: list[dict[str, Any]]
    api: dict[str, Any]
    disk: dict[str, tuple[Any, ...]]


def _cli_json(*args: str) -> str:
    """What `coherent-volume ARGS --json` prints (`cli_in_process`)."""
    return cli_in_process(*args, "--json")


def cli_in_process(*args: str) -> str:
    """What `coherent-volume ARGS` prints: the CLI's own code, run in this process (and the volumes
    it opened closed after it, which the command leaves to its process's exit)."""
    opened: list[VolumeCore] = []

    def opening(*how: Any) -> VolumeCore:
        opened.append(open_core(*how))
        return opened[-1]

    try:
        with mock.patch.object(cli_module, "open_core", opening):
            result = CliRunner().invoke(cli_module.main, list(args))
    finally:
        for core in opened:
            core.registry.close()
            core.paths.close()
    assert result.exit_code == 0, result.output
    return result.stdout


def registry_tables(root: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the registry (the log in its order, the others as sets), and the
    names of the content store's objects (as the table `objects`)."""
    names = [row[0] for row in sql(root, "SELECT name FROM sqlite_master WHERE type = 'table'")]
    tables = {t: sorted(sql(root, f"SELECT * FROM {t}"), key=repr) for t in names if t != "events"}
    store = root / ".coherent/objects"
    objects = sorted((str(p.relative_to(store)),) for p in store.rglob("*")) if store.exists() else []
    return {**tables, "objects": objects, "events": sql(root, "SELECT * FROM events ORDER BY seq")}


def disk_state(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under `root` but the registry's directory: type, mode, size, links, inode, mtime,
    and the bytes of a regular file or the target of a symlink."""
    out: dict[str, tuple[Any, ...]] = {}
    for directory, dirs, files in os.walk(root):
        if Path(directory) == root:
            dirs.remove(".coherent")
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                body: Any = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = None
            kind = stat.S_IFMT(st.st_mode)
            out[os.path.relpath(path, root)] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_size,
                st.st_nlink,
                st.st_ino,
                st.st_mtime_ns,
                body,
            )
    return out


def snapshot(case: Case) -> Snapshot:
    root = case.root
    tables = registry_tables(root)
    prefix = case.name + "."
    agents = sorted({row[0] for row in sql(root, "SELECT agent FROM views") if row[0].startswith(prefix)})
    paths = sorted(row[0] for row in sql(root, "SELECT path FROM files") if row[0].startswith(case.dir + "/"))
    api: dict[str, Any] = {}
    for agent in agents:  # the API's own account: each agent's stale views, each path's version
        with CoherentVolume(root, agent=agent) as vol:
            api[agent] = (vol.stale(), {p: vol.version(p) for p in paths})
    return Snapshot(
        tables,
        json.loads(_cli_json("status", str(root))),
        [json.loads(line) for line in _cli_json("log", str(root), "--limit", "100000000").splitlines()],
        api,
        disk_state(root),
    )


def settle(root: Path) -> None:
    """Wait until every fingerprint the registry may take is past the racy window and the watcher
    has seen the setup's changes, then bring the registry in step (`status`), so that nothing
    but the refusal changes it from here on."""
    newest = max(os.lstat(os.path.join(d, n)).st_ctime for d, ds, fs in os.walk(root) for n in ds + fs)
    time.sleep(max(0.05, newest + RACY_WAIT - time.time()))
    _cli_json("status", str(root))


def _rows(before: list[Any], after: list[Any]) -> str:
    gone, new = [r for r in before if r not in after], [r for r in after if r not in before]
    return f"rows gone: {gone!r}; rows new: {new!r}"


def unrenewed(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The grants `after` (rows of the `grants` table), with each open handle's lease that its
    holder's heartbeat renewed since `before` (the same grant, token and all, lasting longer:
    `core/leases.py`, every 10 s on its own clock) as it was `before`: a renewal is the holder's
    doing, never the refusal's."""
    leases = {row[:6]: row for row in before if not row[7]}  # path .. start: the grant but its expiry
    return [
        leases[row[:6]] if not row[7] and row[:6] in leases and row[6] >= leases[row[:6]][6] else row for row in after
    ]


def status_unrenewed(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """`status --json` `after`, with the expiry of each holder's grant that was renewed since `before`
    (as `unrenewed`) as it was `before`."""
    held = {(f["path"], f["holder"]): f["holder_expires_at"] for f in before["files"] if f["holder"] is not None}
    files = []
    for f in after["files"]:
        was = held.get((f["path"], f["holder"]))
        renewed = was is not None and f["holder_expires_at"] is not None and f["holder_expires_at"] >= was
        files.append({**f, "holder_expires_at": was} if renewed else f)
    return {**after, "files": files}


def differences(case: Case, before: Snapshot, after: Snapshot) -> list[str]:
    """Every way the registry or the disk differs from before the refusal, besides the refusal's own
    log entry (which must be there, in the registry's log, `log --json` and `why`) and the renewal
    of an open handle's lease by its holder's heartbeat (`unrenewed`)."""
    found = []
    expected = [(r.kind, r.path, r.agent, r.reason) for r in case.refused]
    for table in sorted(before.tables.keys() | after.tables.keys()):
        old, new = before.tables.get(table, []), after.tables.get(table, [])
        if table == "grants":
            new = unrenewed(old, new)
        if table == "events":
            added = [(row[2], row[3], row[4], row[5]) for row in new[len(old) :]]
            if new[: len(old)] != old or added != expected:
                found.append(f"the registry's log: expected only {expected} added; {_rows(old, new)}")
        elif new != old and [r[:-1] for r in new] == [r[:-1] for r in old] and table == "sessions":
            found.append(f"the refusal rewrote when a session's process was bound (sessions.at): {_rows(old, new)}")
        elif new != old:
            found.append(f"the refusal changed the registry's {table}: {_rows(old, new)}")
    shown = [(e["kind"], e["path"], e["agent"], e["reason"]) for e in after.log[len(before.log) :]]
    if after.log[: len(before.log)] != before.log or shown != expected:
        found.append(f"`log --json`: expected only {expected} added; {_rows(before.log, after.log)}")
    if status_unrenewed(before.status, after.status) != before.status:
        found.append(f"`status --json` changed: {before.status!r} -> {after.status!r}")
    if after.api != before.api:
        found.append(f"what the API reports (versions, stale views) changed: {before.api!r} -> {after.api!r}")
    if after.disk != before.disk:
        changed = sorted(k for k in before.disk.keys() | after.disk.keys() if before.disk.get(k) != after.disk.get(k))
        found.append(f"the disk under the root changed at {changed}")
    for r in case.refused:
        answer = json.loads(_cli_json("why", str(case.root), r.path))
        if r.kind == "conflict":
            if f"the change of {r.agent} (yours)" not in (answer["conflict"] or ""):
                found.append(f"`why {r.path}` does not show the conflict of {r.agent}: {answer['conflict']!r}")
            continue
        why = answer["refusal"]
        if why is None or (why["agent"], why["reason"]) != (r.agent, r.reason):
            found.append(f"`why {r.path}` does not name the refusal of {r.agent} ({r.reason}): {why!r}")
    return found


# ---- the full set of operations afterwards ------------------------------------------------------

FULL_SET = r"""
import os, sys

def read(p):
    with open(p, "rb") as f:
        return f.read()

def expect(content):
    if read(path) != content:
        sys.exit(f"{what} of {path}: it holds {read(path)!r}, not {content!r}")

for path in sys.argv[1:]:
    folder = os.path.dirname(path)
    try:
        what = "create"
        if not os.path.lexists(path):
            with open(path, "xb") as f:
                f.write(b"created\n")
        what = "read"
        for name in sorted(os.listdir(folder)):  # the whole folder: renaming it rewrites every file in it
            try:
                if os.path.isfile(os.path.join(folder, name)):
                    read(os.path.join(folder, name))
            except FileNotFoundError:
                pass  # a crashed commit's temp file, removed by recovery meanwhile
        what = "write"
        with open(path, "wb") as f:
            f.write(b"written\n")
        expect(b"written\n")
        what = "append"
        with open(path, "ab") as f:
            f.write(b"appended\n")
        expect(b"written\nappended\n")
        what = "truncate by path"
        os.truncate(path, 8)
        expect(b"written\n")
        what = "truncate by handle"
        with open(path, "r+b") as f:
            f.truncate(3)
            f.seek(0, 2)
            f.write(b"\n")
        expect(b"wri\n")
        what = "rename"
        os.rename(path, path + ".renamed")
        os.rename(path + ".renamed", path)
        expect(b"wri\n")
        what = "rename of its directory"
        os.rename(folder, folder + ".moved")
        os.rename(folder + ".moved", folder)
        expect(b"wri\n")
        what = "create a sibling"
        sibling = path + ".sibling.md"
        with open(sibling, "xb") as f:
            f.write(b"new\n")
        what = "unlink"
        os.unlink(sibling)
        os.unlink(path)
        what = "create"
        with open(path, "xb") as f:
            f.write(b"again\n")
        expect(b"again\n")
        what = "mkdir"
        os.mkdir(path + ".dir")
        what = "rmdir"
        os.rmdir(path + ".dir")
    except OSError as e:
        sys.exit(f"{what} of {path}: {e}")
"""


def full_set(root: Path, mount: Mount, agent: str, paths: list[str], session: str, session_process: ProcessId) -> None:
    """The full set of operations on `paths`: through the mount and the API as `agent`, then the
    hook's PreToolUse and PostToolUse around a write by Claude Code session `session`. Afterwards
    no grant or intent is left and the volume reads what the disk holds."""
    done = subprocess.run(
        [sys.executable, "-c", FULL_SET, *paths],
        cwd=mount.path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COHERENT_AGENT": agent},
    )
    assert done.returncode == 0, f"through the mount, as {agent}: {done.stderr.strip()}"
    with CoherentVolume(root, agent=agent) as vol:
        for path in paths:
            assert vol.read(path) == b"again\n"
            vol.write(path, b"api write\n")
            vol.update(path, lambda old: old + b"api update\n")
            if path.startswith("plans/"):
                with vol.lock(path, ttl=30, timeout=5):
                    vol.write(path, b"under lock\n")
            vol.delete(path)
            vol.write(path, b"api again\n")
            assert (root / path).read_bytes() == b"api again\n"
    managed = [p for p in paths if p.startswith("plans/")]
    for path in managed:
        hook_write(root, mount, session, session_process, path)
    assert not sql(
        root, "SELECT path, agent FROM grants WHERE path IN (SELECT value FROM json_each(?))", (json.dumps(paths),)
    )
    assert sql(root, "SELECT count(*) FROM intents") == [(0,)]
    assert integrity(root) == "ok"
    with CoherentVolume(root, agent=f"{agent}.checker") as vol:
        for path in paths:
            assert vol.read(path) == (root / path).read_bytes()
    for path in paths:
        folder = root / os.path.dirname(path)
        assert not [n for n in os.listdir(folder) if ".cv-" in n], "a staging file was left behind"


def hook_write(root: Path, mount: Mount, session: str, process: ProcessId, path: str) -> None:
    """Claude Code's Write tool under the hooks: Read, PreToolUse (allowed), the write through the
    mount, PostToolUse (records it and releases the grant), SessionEnd."""
    agent = claude_code.agent_of(session)

    def hook(name: str, tool: str | None = None, **extra: Any) -> claude_code.Answer:
        event: dict[str, Any] = {"session_id": session, "cwd": str(mount.path), "hook_event_name": name}
        if tool is not None:
            event.update(tool_name=tool, tool_input={"file_path": str(mount.path / path)})
        event.update(extra)
        return claude_code.FACE.run(json.dumps(event), process=process)

    text = (root / path).read_text()
    lines = text.split("\n")
    shown = {"file": {"content": text, "numLines": len(lines), "startLine": 1, "totalLines": len(lines)}}
    assert hook("PostToolUse", "Read", tool_response=shown).code == 0
    assert denied(hook("PreToolUse", "Write")) == "", f"the hook denied {agent}'s write of {path}"
    written = mount.run(agent, f"printf 'by the session\\n' > {path}")
    assert written.returncode == 0, written.stderr
    post = hook("PostToolUse", "Write", tool_response={"type": "update"})
    assert post.code == 0 and not post.stdout, post
    hook("SessionEnd")
    writer = sql(root, "SELECT writer FROM files WHERE path = ?", (path,))
    assert writer == [(agent,)] and (root / path).read_bytes() == b"by the session\n"


# ---- the refusal classes --------------------------------------------------------------------------
#
# Each is a generator over a fresh Case: up to its first `yield` it sets up the state before the
# refusal (the snapshot is taken there); up to the second it provokes the refusal and asserts what
# the face answered; after that it does what the refusal told the agent to do (the remedy).

Scenario = Callable[[Case], Iterator[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


def _stale(c: Case, path: str) -> None:
    """alice read `path`, then bob committed a new version of it."""
    c.api(c.alice).read(path)
    bob = c.api(c.bob)
    bob.read(path)
    bob.write(path, f"{path} by bob\n")


# -- the Python API


@scenario("api-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    with pytest.raises(StaleWriteError) as e:
        c.api(c.alice).write(c.a, "alice\n")
    assert e.value.reason == "stale"
    c.refusal(c.a, c.alice, "stale")
    yield
    c.api(c.alice).read(c.a)


@scenario("api-unread")
def _(c: Case) -> Iterator[None]:
    yield
    with pytest.raises(StaleWriteError, match=r"\(unread\)"):
        c.api(c.alice).write(c.a, "alice\n")
    c.refusal(c.a, c.alice, "unread")
    yield
    c.api(c.alice).read(c.a)


@scenario("api-held")
def _(c: Case) -> Iterator[None]:
    c.api(c.alice).read(c.a)
    c.lock_held_by(c.bob, c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(held\)"):
        c.api(c.alice).write(c.a, "alice\n")
    c.refusal(c.a, c.alice, "held")
    yield
    c.held.close()


@scenario("api-lock-held")
def _(c: Case) -> Iterator[None]:
    c.lock_held_by(c.bob, c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(held\)"), c.api(c.alice).lock(c.a, timeout=0):
        pass
    c.refusal(c.a, c.alice, "held")
    yield
    c.held.close()
    c.api(c.alice).read(c.a)


@scenario("api-fenced")
def _(c: Case) -> Iterator[None]:
    c.fence(c.alice, c.a)
    c.api(c.alice).read(c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(fenced\)"):
        c.api(c.alice).write(c.a, "alice\n")
    c.refusal(c.a, c.alice, "fenced")
    yield
    c.api(c.alice).reacquire(c.a)


@scenario("api-read-set")
def _(c: Case) -> Iterator[None]:
    alice = c.api(c.alice, "read-set")
    alice.read(c.a)
    alice.read(c.b)
    bob = c.api(c.bob)
    bob.read(c.b)
    bob.write(c.b, "bob\n")
    yield
    with pytest.raises(StaleWriteError, match=r"\(read-set\)"):
        alice.write(c.a, "alice\n")
    c.refusal(c.a, c.alice, "read-set")
    yield
    alice.read(c.b)


@scenario("api-cas")
def _(c: Case) -> Iterator[None]:
    c.api(c.alice).read(c.a)
    yield
    with pytest.raises(CasConflict):
        c.api(c.alice).write_cas(c.a, 7, "alice\n")
    c.refusal(c.a, c.alice, "stale")
    yield


@scenario("api-update-exhausted")
def _(c: Case) -> Iterator[None]:
    c.api(c.alice).read(c.a)
    c.lock_held_by(c.bob, c.a)
    yield
    with pytest.raises(RetriesExhausted):
        c.api(c.alice).update(c.a, lambda old: old + b"alice\n", retries=0)
    c.refusal(c.a, c.alice, "held")
    yield
    c.held.close()


@scenario("api-delete-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(stale\)"):
        c.api(c.alice).delete(c.a)
    c.refusal(c.a, c.alice, "stale")
    yield
    c.api(c.alice).read(c.a)


@scenario("api-merge-conflict")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    with pytest.raises(MergeConflict):  # bob changed the same line
        c.api(c.alice).write(c.a, "alice's line\n", merge=True)
    c.refusal(c.a, c.alice, "stale")
    c.conflict(c.a, c.alice)
    yield
    c.api(c.alice).read(c.a)


@scenario("api-restore-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(stale\)"):
        c.api(c.alice).restore(c.a, 1)
    c.refusal(c.a, c.alice, "stale")
    yield
    c.api(c.alice).read(c.a)


@scenario("api-write-after-deletion")
def _(c: Case) -> Iterator[None]:
    c.api(c.alice).read(c.a)
    bob = c.api(c.bob)
    bob.read(c.a)
    bob.delete(c.a)
    yield
    with pytest.raises(StaleWriteError, match=r"\(stale\)"):  # built on content that is gone
        c.api(c.alice).write(c.a, "alice\n")
    c.refusal(c.a, c.alice, "stale")
    yield
    with pytest.raises(FileNotFoundError):
        c.api(c.alice).read(c.a)  # a read of the deletion is the view of it


@scenario("api-created-by-another")
def _(c: Case) -> Iterator[None]:
    new = f"{c.dir}/new.md"
    c.api(c.bob).write(new, "bob made it\n")
    c.paths = [new, c.free]
    yield
    with pytest.raises(StaleWriteError, match=r"\(unread\)"):
        c.api(c.alice).write(new, "alice\n")
    c.refusal(new, c.alice, "unread")
    yield
    c.api(c.alice).read(new)


@scenario("api-unprotected-alias")
def _(c: Case) -> Iterator[None]:
    alias = f"{c.dir}/alias.md"
    os.symlink(f"../../{c.free}", c.root / alias)
    c.paths = [alias, c.free]
    yield
    with pytest.raises(UnprotectedAlias):
        c.api(c.alice).write(alias, "alice\n")
    yield
    c.api(c.alice).delete(alias)  # the remedy: replace the link with a regular file


@scenario("api-outside-the-volume")
def _(c: Case) -> Iterator[None]:
    yield
    alice = c.api(c.alice)
    for bad in ("../escape.md", "/etc/hostname", ".coherent/registry.db", ".coherent/x.md", f"{c.dir}/a\0.md"):
        with pytest.raises(OutsideVolume):
            alice.write(bad, "alice\n")
    yield


@scenario("api-invalid-path")
def _(c: Case) -> Iterator[None]:
    yield
    with pytest.raises(InvalidPath):
        c.api(c.alice).write(f"{c.dir}/\udcff.md", "alice\n")
    yield


@scenario("api-invalid-agent-name")
def _(c: Case) -> Iterator[None]:
    yield
    for name in ("external", "bad\x01name", "x" * 201):
        with pytest.raises(VolumeConfigError):
            CoherentVolume(c.root, agent=name)
    yield


@scenario("api-registry-busy")
def _(c: Case) -> Iterator[None]:
    c.api(c.alice).read(c.a)
    yield
    saved = sqlite_registry.BUSY_TIMEOUT_MS
    sqlite_registry.BUSY_TIMEOUT_MS = 200
    try:
        with CoherentVolume(c.root, agent=c.alice) as alice, locked_registry(c.root):
            with pytest.raises(RegistryError) as e:
                alice.write(c.a, "alice\n")
            assert e.value.errno == errno.EBUSY
    finally:
        sqlite_registry.BUSY_TIMEOUT_MS = saved
    yield


# -- the mount


@scenario("mount-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))
    c.refusal(c.a, c.alice, "stale")
    c.daemon(rf"refused: write to '{c.a}' refused for agent '{c.alice}' \(stale\)")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-unread")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))
    c.refusal(c.a, c.alice, "unread")
    c.daemon(r"\(unread\)")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-held")
def _(c: Case) -> Iterator[None]:
    c.lock_held_by(c.bob, c.a)
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))
    c.refusal(c.a, c.alice, "held")
    c.daemon(rf"write grant held by '{c.bob}'")
    yield
    c.held.close()


@scenario("mount-held-by-own-handle")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    c.holding(c.alice, f"exec 3<>{c.a}; echo ready; exec sleep 600")
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))
    c.refusal(c.a, c.alice, "held")
    yield
    c.release_held()


@scenario("mount-fenced")
def _(c: Case) -> Iterator[None]:
    c.fence(c.alice, c.a)
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))
    c.refusal(c.a, c.alice, "fenced")
    yield
    c.api(c.alice).reacquire(c.a)


@scenario("mount-deleted-then-created")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    assert c.sh(c.bob, f"cat {c.a} >/dev/null && rm {c.a}").returncode == 0
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {c.a}"))  # built on content that is gone
    c.refusal(c.a, c.alice, "stale")
    yield
    # the remedy: see that it is gone by listing its directory (a lookup cannot count: one precedes
    # every create); a cat of the missing name fails as on any disk
    assert c.sh(c.alice, f"cat {c.a}").returncode != 0
    assert c.sh(c.alice, f"ls {c.dir} >/dev/null").returncode == 0


@scenario("mount-created-by-another")
def _(c: Case) -> Iterator[None]:
    new = f"{c.dir}/new.md"
    c.holding(c.bob, f"exec 3>{new}; echo ready; exec sleep 600")  # two agents creating one file
    c.paths = [new, c.free]
    yield
    refused_in_mount(c.sh(c.alice, f"echo alice > {new}"))
    c.refusal(new, c.alice, "held")
    yield
    c.release_held()
    assert c.sh(c.alice, f"cat {new}").returncode == 0


@scenario("mount-rename-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.a} {c.dir}/moved.md"))
    c.refusal(c.a, c.alice, "stale")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-merge-conflict-at-rename")
def _(c: Case) -> Iterator[None]:
    merged, saved = f"{c.dir}/merged.md", f"{c.dir}/.merged.md.new"
    c.api(f"{c.name}.seed").write(merged, "merged v1\n")
    assert c.sh(c.alice, f"cat {merged} >/dev/null && echo alice > {saved}").returncode == 0
    _stale(c, merged)  # bob changed the line alice's save changes
    c.paths = [merged, c.free]
    yield
    refused_in_mount(c.sh(c.alice, f"mv {saved} {merged}"))  # a save by rename: merged, here refused
    c.refusal(merged, c.alice, "stale")
    c.conflict(merged, c.alice)
    yield
    assert c.sh(c.alice, f"cat {merged}").returncode == 0


@scenario("mount-merge-save-rename-unread-source")
def _(c: Case) -> Iterator[None]:
    merged, source = f"{c.dir}/merged.md", f"{c.dir}/z.md"
    seeder = c.api(f"{c.name}.seed")
    seeder.write(merged, "line1\nline2\nline3\n")
    seeder.write(source, "line1\nline2\nline3 (z)\n")  # a save that would merge cleanly; alice never read it
    c.api(c.alice).read(merged)
    bob = c.api(c.bob)
    bob.read(merged)
    bob.write(merged, "line1 (bob)\nline2\nline3\n")
    c.paths = [merged, source, c.free]
    yield
    refused_in_mount(c.sh(c.alice, f"mv {source} {merged}"))  # merging the destination changes nothing either
    c.refusal(merged, c.alice, "stale")
    c.refusal(source, c.alice, "unread")
    c.daemon(rf"refused: write to '{source}' refused for agent '{c.alice}' \(unread\)")
    yield
    assert c.sh(c.alice, f"cat {source} {merged}").returncode == 0


@scenario("mount-unlink-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    refused_in_mount(c.sh(c.alice, f"rm {c.a}"))
    c.refusal(c.a, c.alice, "stale")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-truncate-by-path-stale")
def _(c: Case) -> Iterator[None]:
    _stale(c, c.a)
    yield
    refused_in_mount(c.py(c.alice, "import os, sys; os.truncate(sys.argv[1], 0)", c.a))
    c.refusal(c.a, c.alice, "stale")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-append-handle-truncate-unread")
def _(c: Case) -> Iterator[None]:
    yield
    code = "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); os.ftruncate(fd, 0)"
    refused_in_mount(c.py(c.alice, code, c.a))
    c.refusal(c.a, c.alice, "unread")
    yield
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0


@scenario("mount-rename-tree")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0  # but never b.md
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.dir} {c.dir}.moved"))
    c.refusal(c.b, c.alice, "unread")
    yield
    assert c.sh(c.alice, f"cat {c.b}").returncode == 0


@scenario("mount-rename-exchange")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    yield
    code = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.renameat2(-100, sys.argv[1].encode(), -100, sys.argv[2].encode(), 2) != 0:
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
"""
    refused_in_mount(c.py(c.alice, code, c.a, c.b))
    c.refusal(c.b, c.alice, "unread")
    yield
    assert c.sh(c.alice, f"cat {c.b}").returncode == 0


@scenario("mount-hard-link")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh(c.alice, f"ln {c.a} {c.notes}/hard"), "Operation not permitted")
    refused_in_mount(c.sh(c.alice, f"ln {c.free} {c.dir}/hard.md"), "Operation not permitted")
    c.daemon(r"refused: .* is managed: hard links")
    yield


@scenario("mount-symlink")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh(c.alice, f"ln -s ../../{c.free} {c.dir}/link.md"), "Operation not permitted")
    c.daemon(r"refused: .* symlinks cannot be created there")
    yield


@scenario("mount-symlink-moved-in")
def _(c: Case) -> Iterator[None]:
    os.symlink("free.txt", c.root / c.notes / "sym")
    os.mkdir(c.root / c.notes / "tree")
    os.symlink("../free.txt", c.root / c.notes / "tree/sym")
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.notes}/sym {c.dir}/sym.md"), "Operation not permitted")
    refused_in_mount(c.sh(c.alice, f"mv {c.notes}/tree {c.dir}/tree"), "Operation not permitted")
    c.daemon(r"refused: .* is a symlink: it cannot be moved")
    yield


@scenario("mount-hard-linked-file-moved-in")
def _(c: Case) -> Iterator[None]:
    os.link(c.root / c.free, c.root / c.notes / "twin.txt")
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.notes}/twin.txt {c.dir}/twin.md"), "Operation not permitted")
    c.daemon(r"refused: .* has another hard link")
    yield


@scenario("mount-rename-with-unsaved-writes")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    code = (
        "import os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nos.write(fd, b'unsaved')\nprint('ready', flush=True)\n"
    )
    c.held.enter_context(python_in_mount(c.mount, c.alice, code + "sys.stdin.readline()\n", c.a))
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.a} {c.dir}/moved.md"), "Device or resource busy")
    c.daemon(r"refused renaming .* \(EBUSY\): \S+ holds writes to .* not committed yet, .* once that file is closed")
    yield
    c.release_held()


@scenario("mount-move-in-while-open-for-writing")
def _(c: Case) -> Iterator[None]:
    c.holding(c.alice, f"exec 3>>{c.free}; echo ready; exec sleep 600")
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.free} {c.dir}/free.md"), "Device or resource busy")
    c.daemon(r"refused renaming .* open for writing, or mapped shared and writable, under an unmanaged name")
    yield
    c.release_held()


@scenario("mount-move-in-by-its-directory-while-open-for-writing")
def _(c: Case) -> Iterator[None]:
    c.holding(c.alice, f"exec 3>>{c.free}; echo ready; exec sleep 600")
    moved = c.sh(c.alice, f"mkdir {c.notes}/v && mv {c.free} {c.notes}/v/free.txt")  # unmanaged to unmanaged
    assert moved.returncode == 0, moved.stderr
    yield
    refused_in_mount(c.sh(c.alice, f"mv {c.notes}/v {c.dir}/v"), "Device or resource busy")
    c.daemon(r"refused renaming .* open for writing, or mapped shared and writable, under an unmanaged name")
    yield
    c.release_held()
    assert c.sh(c.alice, f"mv {c.notes}/v/free.txt {c.free} && rmdir {c.notes}/v").returncode == 0


@scenario("mount-write-after-rename-estale")
def _(c: Case) -> Iterator[None]:
    assert c.sh(c.alice, f"cat {c.a}").returncode == 0
    writer = c.held.enter_context(
        python_in_mount(
            c.mount,
            c.alice,
            "import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY)\nprint('ready', flush=True)\nsys.stdin.readline()\n"
            "try:\n    os.write(fd, b'late')\n    print('written', flush=True)\nexcept OSError as e:\n"
            "    print(e.errno, flush=True)\nsys.stdin.readline()\n",
            c.a,
        )
    )
    assert c.sh(c.alice, f"mv {c.a} {c.dir}/moved.md").returncode == 0  # its handle has nothing unsaved
    c.paths = [c.a, f"{c.dir}/moved.md", c.free]
    yield
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write("write\n")
    writer.stdin.flush()
    assert writer.stdout.readline().strip() == str(errno.ESTALE)
    yield
    c.release_held()


@scenario("mount-protected-xattr")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(
        c.py(c.alice, "import os, sys; os.setxattr(sys.argv[1], 'user.coherent.version', b'9')", c.a),
        "Operation not permitted",
    )
    yield


@scenario("mount-reserved-agent-name")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh("external", f"echo x > {c.dir}/new.md; cat {c.a} > /dev/null; echo x > {c.a}"))
    c.daemon(r"refused: agent name 'external' is reserved")
    yield


@scenario("mount-malformed-agent-name")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh("bad\x01name", f"echo x > {c.dir}/new.md"))
    c.daemon(r"refused: agent name .* must be 1 to 200 printable characters")
    yield


@scenario("mount-name-not-utf8")
def _(c: Case) -> Iterator[None]:
    yield
    code = "import os, sys; os.close(os.open(os.fsencode(sys.argv[1]) + b'/\\xff.md', os.O_CREAT | os.O_WRONLY))"
    refused_in_mount(c.py(c.alice, code, c.dir), "Invalid argument")
    c.daemon(r"refused: .* is not valid UTF-8")
    yield


@scenario("mount-registry-path")
def _(c: Case) -> Iterator[None]:
    yield
    refused_in_mount(c.sh(c.alice, "echo x > .coherent/x.md"), "No such file or directory")
    refused_in_mount(c.sh(c.alice, "mv .coherent elsewhere"), "No such file or directory")
    yield


# -- the Claude Code hook


@scenario("hook-stale")
def _(c: Case) -> Iterator[None]:
    c.hook_read(c.a)
    c.api(c.bob).read(c.a)
    c.api(c.bob).write(c.a, "bob\n")
    yield
    assert "(stale)" in denied(c.hook("PreToolUse", "Write", c.a))
    c.refusal(c.a, claude_code.agent_of(c.session), "stale")
    yield
    c.hook_read(c.a)


@scenario("hook-unread")
def _(c: Case) -> Iterator[None]:
    c.hook_read(c.b)  # the session is known, but never read a.md
    yield
    assert "(unread)" in denied(c.hook("PreToolUse", "Write", c.a))
    c.refusal(c.a, claude_code.agent_of(c.session), "unread")
    yield
    c.hook_read(c.a)


@scenario("hook-held")
def _(c: Case) -> Iterator[None]:
    c.hook_read(c.a)
    c.lock_held_by(c.bob, c.a)
    yield
    assert "(held)" in denied(c.hook("PreToolUse", "Write", c.a))
    c.refusal(c.a, claude_code.agent_of(c.session), "held")
    yield
    c.held.close()


@scenario("hook-fenced")
def _(c: Case) -> Iterator[None]:
    c.hook_read(c.b)
    c.fence(claude_code.agent_of(c.session), c.a)
    yield
    assert "(fenced)" in denied(c.hook("PreToolUse", "Write", c.a))
    c.refusal(c.a, claude_code.agent_of(c.session), "fenced")
    yield
    c.hook_read(c.a)  # a confirmed read lifts the fence


@scenario("hook-unprotected-alias")
def _(c: Case) -> Iterator[None]:
    alias = f"{c.dir}/alias.md"
    os.symlink(f"../../{c.free}", c.root / alias)
    c.hook_read(c.b)
    yield
    assert "is managed but is a symlink" in denied(c.hook("PreToolUse", "Write", alias))
    yield
    os.unlink(c.root / alias)


@scenario("hook-registry-path")
def _(c: Case) -> Iterator[None]:
    c.hook_read(c.b)
    yield
    event = {
        "session_id": c.session,
        "cwd": str(c.root),
        "hook_event_name": "PreToolUse",
        "tool_name": "Write",
        "tool_input": {"file_path": str(c.root / ".coherent/registry.db")},
    }
    reason = denied(claude_code.FACE.run(json.dumps(event), process=c.arena.session_process))
    assert "is the registry's own directory" in reason and "leave it out of the command" in reason, reason
    yield


@scenario("hook-no-session-id")
def _(c: Case) -> Iterator[None]:
    yield
    event: dict[str, Any] = {"cwd": str(c.mount.path), "hook_event_name": "PreToolUse", "tool_name": "Write"}
    event["tool_input"] = {"file_path": str(c.mount.path / c.a)}
    assert "no session_id" in denied(claude_code.FACE.run(json.dumps(event), process=c.arena.session_process))
    yield


# -- the CLI


def cli(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, **kwargs)


@scenario("cli-as-reserved-agent")
def _(c: Case) -> Iterator[None]:
    yield
    for name in ("external", "bad\x01name"):
        r = cli("as", name, "--", "touch", str(c.mount.path / c.dir / "made.md"))
        assert r.returncode == 1 and "agent name" in r.stderr, r.stderr
    yield


@scenario("cli-init-with-other-globs")
def _(c: Case) -> Iterator[None]:
    yield
    r = cli("init", str(c.root), "--managed", "other/**")
    assert r.returncode == 1 and "a second policy is never applied" in r.stderr, r.stderr
    yield


@scenario("cli-why-outside-the-volume")
def _(c: Case) -> Iterator[None]:
    yield
    for path in ("../outside.md", ".coherent/registry.db"):
        r = cli("why", str(c.root), path)
        assert r.returncode == 1 and ("outside" in r.stderr or "registry" in r.stderr), r.stderr
    yield


@scenario("cli-mount-as-reserved-agent")
def _(c: Case) -> Iterator[None]:
    (c.root / c.notes / "mnt").mkdir()
    yield
    r = cli("mount", str(c.root), str(c.root / c.notes / "mnt"), "--agent", "external")
    assert r.returncode == 1 and "reserved" in r.stderr, r.stderr
    assert not is_mounted(c.root / c.notes / "mnt")
    yield


@scenario("cli-unmount-busy")
def _(c: Case) -> Iterator[None]:
    c.held.enter_context(_process(subprocess.Popen(["sleep", "600"], cwd=c.mount.path / c.dir)))
    yield
    r = cli("unmount", str(c.mount.path))
    assert r.returncode == 1 and "busy" in r.stderr, r.stderr
    assert is_mounted(c.mount.path) and "a.md" in os.listdir(c.mount.path / c.dir)
    yield
    c.held.close()


@contextmanager
def _process(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


@contextmanager
def python_in_mount(m: Mount, agent: str, code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """Python `code` as `agent` in the mount, talking on stdin and stdout; it prints 'ready' first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=m.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": agent},
    )
    with _process(proc):
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc


# ---- the test -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A bug this file found that is not fixed yet (it is the core's to fix): its case fails with
    it and nothing else (`pattern` matches every failure) and is then reported as an expected
    failure; once it no longer fails, the case fails until the entry is removed."""

    pattern: str
    reason: str


FINDINGS: dict[str, Finding] = {}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_refusal_leaves_the_registry_and_the_disk_as_they_were(arena: Arena, name: str) -> None:
    case = Case(arena, name)
    try:
        failures = refusal_aftermath(case)
    finally:
        case.close()
    known = FINDINGS.get(name)
    if known is None:
        assert not failures, "\n\n".join(failures)
        return
    assert failures, f"this no longer fails: remove it from FINDINGS ({known.reason})"
    unexplained = [f for f in failures if not re.search(known.pattern, f)]
    assert not unexplained, "\n\n".join(unexplained)
    pytest.xfail(known.reason)


def refusal_aftermath(case: Case) -> list[str]:
    """Provoke `case`'s refusal between two snapshots, do its remedy, run the full set: every way
    the outcome differs from what must be."""
    arena = case.arena
    case.seed()
    failures: list[str] = []
    with case.held:
        steps = SCENARIOS[case.name](case)
        next(steps)  # the state before the refusal
        settle(arena.root)
        before = snapshot(case)
        logged_from = case.mount.log.stat().st_size
        next(steps)  # the refusal
        after = snapshot(case)
        with open(case.mount.log, "rb") as f:
            f.seek(logged_from)
            daemon_log = f.read().decode("utf-8", "replace")
        failures += differences(case, before, after)
        failures += [f"the mount daemon did not log {p!r}" for p in case.daemon_says if not re.search(p, daemon_log)]
        next(steps, None)  # the remedy
    try:
        full_set(arena.root, arena.mount, case.actor, case.paths, case.hook_session, arena.session_process)
    except AssertionError as e:
        failures.append(str(e))
    return failures


def test_a_foreign_file_the_volume_cannot_record_leaves_the_mount_serving(arena: Arena) -> None:
    """A file whose managed name is not UTF-8, made in the backing directory while mounted: the
    watcher cannot record it (the core refuses the name) and says so; the daemon keeps serving (it
    used to die of it, leaving the mount dead), the registry is untouched, and once the file is
    given a UTF-8 name (in the backing directory: the mount refuses the name itself) everything
    works on that directory again."""
    case = Case(arena, "foreign-name-not-utf8")
    try:
        case.seed()
        settle(arena.root)
        before = registry_tables(arena.root)
        logged_from = arena.mount.log.stat().st_size
        bad = os.fsencode(arena.root / case.dir) + b"/\xff.md"
        with open(bad, "wb") as f:
            f.write(b"foreign\n")
        deadline = time.monotonic() + 10
        while b"could not sync" not in arena.mount.log.read_bytes()[logged_from:] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert b"is not valid UTF-8" in arena.mount.log.read_bytes()[logged_from:]
        assert "a.md" in os.listdir(arena.mount.path / case.dir), "the mount stopped serving"
        assert registry_tables(arena.root) == before
        os.rename(bad, arena.root / case.dir / "renamed.md")
        full_set(arena.root, arena.mount, case.actor, [case.a, case.free], case.hook_session, arena.session_process)
    finally:
        case.close()


# ---- the refusal of a caller outside the daemon's PID namespace (a mount of its own) -----------


def test_a_refused_caller_outside_the_pid_namespace_leaves_nothing_behind(tmp_path: Path) -> None:
    root = create(tmp_path / "vol", MANAGED)
    (root / "notes").mkdir()
    with CoherentVolume(root, agent="seed") as seed:
        seed.write("plans/a.md", "a v1\n")
        seed.write("notes/free.txt", "free v1\n")
    with PidNamespaceMount(root, tmp_path / "ns") as ns:
        settle(root)
        before = tables_and_disk(root)
        for script in ("echo x > plans/a.md", "cat plans/a.md > /dev/null; echo x > plans/a.md", "rm plans/a.md"):
            refused_in_mount(ns.run("sidecar", script))
        assert tables_and_disk(root) == before
        assert "refused a managed change by pid 0" in ns.log.read_text()
    session = _sleeper()
    try:
        with Mount(root, tmp_path / "mnt") as m:
            full_set(
                root, m, "sidecar", ["plans/a.md", "notes/free.txt"], unique("ns.after"), ProcessId.of(session.pid)
            )
    finally:
        session.kill()
        session.wait()


def tables_and_disk(root: Path) -> tuple[dict[str, list[tuple[Any, ...]]], dict[str, tuple[Any, ...]]]:
    return registry_tables(root), disk_state(root)


# ---- crashes: kill -9 in the middle of a commit, then the full set ----------------------------------

STOPPED_COMMIT = """
import os, sys, time
from coherent_volume import CoherentVolume, atomic
root, path, when = sys.argv[1:]
rename = atomic.rename

def stop_here(src, dst, **flags):
    if when == "after":
        rename(src, dst, **flags)
    print("ready", flush=True)
    time.sleep(600)

vol = CoherentVolume(root, agent="victim")
vol.read(path)
atomic.rename = stop_here
vol.write(path, "the victim's content\\n")
"""


@contextmanager
def crash_volume(tmp_path: Path) -> Iterator[tuple[Path, Mount, ProcessId]]:
    """A fresh volume with plans/a.md and notes/free.txt, mounted, and a stand-in Claude Code process."""
    root = create(tmp_path / "vol", MANAGED)
    (root / "notes").mkdir()
    with CoherentVolume(root, agent="seed") as seed:
        seed.write("plans/a.md", "a v1\n")
        seed.write("notes/free.txt", "free v1\n")
    session = _sleeper()
    try:
        with Mount(root, tmp_path / "mnt") as m:
            yield root, m, ProcessId.of(session.pid)
    finally:
        session.kill()
        session.wait()


@pytest.mark.parametrize("when", ["before", "after"])
def test_an_api_writer_killed_in_the_middle_of_its_commit_leaves_nothing_that_fails(tmp_path: Path, when: str) -> None:
    """Killed with its commit recorded, before or after its rename: the next operation installs its
    staged content (before) or finds it installed (after: nothing to log), and every operation works."""
    with crash_volume(tmp_path) as (root, m, session):
        victim = subprocess.Popen(
            [sys.executable, "-c", STOPPED_COMMIT, str(root), "plans/a.md", when], stdout=subprocess.PIPE, text=True
        )
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        assert sql(root, "SELECT path, agent FROM intents") == [("plans/a.md", "victim")]
        _kill(victim)
        full_set(root, m, "victim", ["plans/a.md", "notes/free.txt"], unique("crash.after"), session)
        recovered = [] if when == "after" else [("installed",)]
        assert sql(root, "SELECT reason FROM events WHERE kind = 'recover'") == recovered
        assert sql(root, "SELECT version, writer FROM versions WHERE path = 'plans/a.md' AND version = 2") == [
            (2, "victim")
        ]


def test_a_daemon_killed_in_the_middle_of_a_commit_leaves_nothing_that_fails(tmp_path: Path) -> None:
    """The daemon is killed while a close's commit waits for the commit lock: after the remount the
    dead daemon's handle grant is reclaimed and every operation works, for the writer and others."""
    with crash_volume(tmp_path) as (root, m, session):
        assert m.run("alice", "cat plans/a.md").returncode == 0
        code = "import sys\nf = open(sys.argv[1], 'r+b')\nf.write(b'unsaved')\nprint('ready', flush=True)\n"
        code += "sys.stdin.readline()\nf.close()\n"
        with (
            python_in_mount(m, "alice", code, "plans/a.md") as writer,
            CoherentVolume(root, agent="locker") as vol,
            vol._core.registry.commit_lock(),  # the commit at close waits for it: mid-commit
        ):
            assert writer.stdin is not None
            writer.stdin.write("close\n")
            writer.stdin.flush()
            time.sleep(0.5)
            assert writer.poll() is None, "the close did not wait for the commit lock"
            assert len(m.kill_daemon()) == 1
            writer.wait(timeout=30)
        assert (root / "plans/a.md").read_bytes() == b"a v1\n"
        m.mount()
        full_set(root, m, "alice", ["plans/a.md", "notes/free.txt"], unique("crash.after"), session)
        full_set(root, m, "bob", ["plans/a.md", "notes/free.txt"], "crash.other", session)


def test_a_killed_lock_holder_fences_only_itself_until_it_reads_again(tmp_path: Path) -> None:
    with crash_volume(tmp_path) as (root, m, session):
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\nfrom coherent_volume import CoherentVolume\n"
                "v = CoherentVolume(sys.argv[1], agent='holder')\nv.read('plans/a.md')\n"
                "with v.lock('plans/a.md', ttl=600):\n    print('ready', flush=True)\n    time.sleep(600)\n",
                str(root),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        _kill(holder)
        full_set(root, m, "other", ["plans/a.md", "notes/free.txt"], "crash.other", session)
        refused = m.run("holder", "cat plans/a.md > /dev/null && echo x > plans/a.md")
        assert refused.returncode != 0, "a lock holder whose grant was reclaimed must re-acquire first"
        with CoherentVolume(root, agent="holder") as vol:
            vol.reacquire("plans/a.md")
        full_set(root, m, "holder", ["plans/a.md", "notes/free.txt"], unique("crash.after"), session)


def test_a_hooked_session_killed_between_its_hooks_leaves_nothing_that_fails(tmp_path: Path) -> None:
    with crash_volume(tmp_path) as (root, m, session):
        doomed = _sleeper()
        event: dict[str, Any] = {"session_id": unique("doomed"), "cwd": str(m.path), "tool_name": "Write"}
        event["tool_input"] = {"file_path": str(m.path / "plans/a.md")}
        process = ProcessId.of(doomed.pid)
        text = (root / "plans/a.md").read_text()
        shown = {"file": {"content": text, "numLines": 2, "startLine": 1, "totalLines": 2}}
        claude_code.FACE.run(
            json.dumps({**event, "hook_event_name": "PostToolUse", "tool_name": "Read", "tool_response": shown}),
            process=process,
        )
        assert (
            denied(claude_code.FACE.run(json.dumps({**event, "hook_event_name": "PreToolUse"}), process=process)) == ""
        )
        assert sql(root, "SELECT agent FROM grants") == [(f"claude:{unique('doomed')}",)]
        doomed.kill()
        doomed.wait()
        full_set(root, m, "alice", ["plans/a.md", "notes/free.txt"], unique("crash.after"), session)


def test_writers_killed_at_random_points_leave_nothing_that_fails(tmp_path: Path) -> None:
    """The torture harness's writer kills (a pessimistic writer killed holding its grant, others at
    random points of their commits), then the full set on the files they wrote."""
    result = writer_kills(tmp_path, kills=3, slots=2, lock_slots=1, ttl=1.0, files=1)
    assert result.passed, result.messages[:10]
    root = tmp_path / "kill-writers"
    (root / "notes").mkdir()
    (root / "notes/free.txt").write_text("free\n")
    session = _sleeper()
    try:
        with Mount(root, tmp_path / "mnt") as m:
            full_set(
                root, m, "survivor", ["plans/k0.md", "notes/free.txt"], unique("kills.after"), ProcessId.of(session.pid)
            )
    finally:
        session.kill()
        session.wait()


# ---- the daemon's log ---------------------------------------------------------------------------------


def test_an_internal_error_in_the_daemons_log_fails_the_test_that_used_the_mount(tmp_path: Path) -> None:
    """The check every mount gets (tests/harness/mounts.py): a record of an internal error (here written
    where the daemon writes) fails at unmount, naming it; one the test declared it provokes does not;
    refusals and documented warnings never do."""
    root = create(tmp_path / "vol", MANAGED)
    m = Mount(root, tmp_path / "mnt", log_allows=[r"ERROR internal error in rename$"])
    stamp = "2026-01-01 00:00:00,000"
    with pytest.raises(DaemonLogError) as failure, m:
        assert m.run("alice", "echo x > plans/a.md && echo y > plans/a.md").returncode == 0
        assert m.run("bob", "echo z > plans/a.md").returncode != 0  # a refusal: INFO, no problem
        with open(m.log, "a") as log:
            log.write(f"{stamp} ERROR internal error in rename\nTraceback (most recent call last):\nKeyError: 1\n")
            log.write(f"{stamp} WARNING the watcher process exited (-9); restarting it in 0.1 s\n")
            log.write(f"{stamp} ERROR fuse_release(): fuse_reply_* failed with No such file or directory\n")
            log.write(f"{stamp} ERROR internal error in lookup\nTraceback (most recent call last):\n")
            log.write("  File \"operations.py\", line 1, in lookup\nKeyError: 'planted'\n")
    message = str(failure.value)
    assert "internal error in lookup" in message and "KeyError: 'planted'" in message
    assert "in rename" not in message and "refused" not in message and "watcher" not in message
    assert "fuse_reply" not in message  # the kernel no longer waited for that answer: a documented condition
    assert not is_mounted(m.path)
