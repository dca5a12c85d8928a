"""Descriptors held across another agent's change of their file: a reader's, whose version a commit
replaced, and a write handle's, whose file another agent deleted after the handle's own commit.
Each agent is a process of its own that keeps its descriptors open between the steps."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from coherent_volume import CoherentVolume

from .harness.mounts import Mount

STEPS = r"""
import json, os, sys
fds = {}
for line in sys.stdin:
    scope = {"os": os, "fds": fds, "_r": None}
    try:
        exec(json.loads(line), scope)
        out = {"r": repr(scope["_r"])}
    except OSError as e:
        out = {"errno": e.errno}
    print(json.dumps(out), flush=True)
"""


class Agent:
    """A process of one agent in the mount: `agent(code)` runs Python there (its descriptors stay
    in `fds`) and answers what it set `_r` to, or the errno of the OSError it raised."""

    def __init__(self, m: Mount, name: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", STEPS],
            cwd=m.path,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": name},
        )

    def __call__(self, code: str) -> str | int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(code) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return out["errno"] if "errno" in out else out["r"]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agents(mounted: Mount) -> Iterator[tuple[Agent, Agent]]:
    """Agents alice and bob, each a process in the mount."""
    alice, bob = Agent(mounted, "alice"), Agent(mounted, "bob")
    try:
        yield alice, bob
    finally:
        alice.close()
        bob.close()


def _write(path: str, data: bytes) -> str:
    return f"fd = os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644); os.write(fd, {data!r}); os.close(fd)"


def _read(path: str) -> str:
    """Code that reads `path` (the agent's view moves to its version)."""
    return f"fd = os.open({path!r}, os.O_RDONLY); os.read(fd, 100); os.close(fd)"


@pytest.mark.parametrize("first", ["chmod", "utime", "setxattr", "fstat"])
def test_metadata_calls_through_a_readers_descriptor_held_across_a_commit_all_reach_the_file_at_its_name(
    mounted: Mount, agents: tuple[Agent, Agent], first: str
) -> None:
    """bob holds a read-only descriptor of version 1; alice commits version 2. Every fchmod, futimens
    and fsetxattr bob makes through that descriptor then changes the file at its name, whatever came
    first (before, only the first of them did: the reply to it gave the name a new inode, and the next
    ones changed the past version the descriptor holds, at no name, answering 0), and fgetxattr reads
    the file at its name."""
    alice, bob = agents
    path = "plans/m.md"
    assert alice(_write(path, b"one\n") + f"; os.chmod({path!r}, 0o644)") == "None"
    assert bob(f"fds['r'] = os.open({path!r}, os.O_RDONLY); _r = os.read(fds['r'], 100)") == repr(b"one\n")
    assert alice(_read(path) + "; " + _write(path, b"two\n")) == "None"
    calls = {
        "chmod": "os.fchmod(fds['r'], 0o600)",
        "utime": "os.utime(fds['r'], ns=(10**9, 2 * 10**9))",
        "setxattr": "os.setxattr(fds['r'], 'user.note', b'kept')",
        "fstat": "os.fstat(fds['r'])",
    }
    for name in [first, *(c for c in calls if c != first)]:
        assert bob(calls[name]) == "None", name
    assert bob("_r = os.getxattr(fds['r'], 'user.note')") == repr(b"kept")
    st = (mounted.root / path).stat()
    assert (oct(st.st_mode & 0o777), st.st_mtime_ns) == ("0o600", 2 * 10**9)
    assert os.getxattr(mounted.root / path, "user.note") == b"kept"
    assert bob("os.removexattr(fds['r'], 'user.note')") == "None"
    assert "user.note" not in os.listxattr(mounted.root / path)
    assert (mounted.root / path).read_bytes() == b"two\n"
    assert bob("_r = os.pread(fds['r'], 100, 0)") == repr(b"one\n")  # its version's bytes, as documented


def test_metadata_calls_through_a_readers_descriptor_never_reach_a_file_made_anew_outside_the_mount(
    mounted: Mount, agents: tuple[Agent, Agent]
) -> None:
    """bob holds a read-only descriptor of version 1 and alice commits version 2 through the mount;
    then the file is deleted and made anew through the Python API, which the mount does not follow:
    bob's fchmod, futimens and fsetxattr change only the file his descriptor holds, as on a local
    disk, never the new one at the name (found by a hostile probe: they did)."""
    alice, bob = agents
    path = "plans/m.md"
    assert alice(_write(path, b"one\n") + f"; os.chmod({path!r}, 0o644)") == "None"
    assert bob(f"fds['r'] = os.open({path!r}, os.O_RDONLY); _r = os.read(fds['r'], 100)") == repr(b"one\n")
    assert alice(_read(path) + "; " + _write(path, b"two\n")) == "None"
    with CoherentVolume(mounted.root, agent="carol") as carol:
        carol.read(path)
        carol.delete(path)
        carol.write(path, b"carol's own\n")
    os.chmod(mounted.root / path, 0o644)
    before = (mounted.root / path).stat()
    assert bob("os.fchmod(fds['r'], 0o600)") == "None"
    assert bob("os.utime(fds['r'], ns=(10**9, 2 * 10**9))") == "None"
    assert bob("os.setxattr(fds['r'], 'user.note', b'bob')") == "None"
    after = (mounted.path / path).stat()
    assert (oct(after.st_mode & 0o777), after.st_mtime_ns) == ("0o644", before.st_mtime_ns)
    assert "user.note" not in os.listxattr(mounted.path / path)
    assert (mounted.path / path).read_bytes() == b"carol's own\n"
    assert bob("_r = oct(os.fstat(fds['r']).st_mode & 0o777)") == repr("0o600")


@pytest.mark.parametrize("recreated", [False, True], ids=["deleted", "deleted-and-recreated"])
def test_a_write_handle_written_again_after_another_agent_deleted_its_committed_file_is_refused(
    mounted: Mount, agents: tuple[Agent, Agent], recreated: bool
) -> None:
    """bob's write handle commits through a dup's close; alice then deletes the file (and makes it
    anew). That deletion is a change since bob's commit, so bob's next write is refused EACCES, as
    after another agent's commit (before, every call answered 0 and bob's bytes were kept by no name).
    Until then the handle reads and fstats the file it committed, as on a local disk."""
    alice, bob = agents
    path = "plans/d.md"
    assert alice(_write(path, b"one by alice\n")) == "None"
    assert bob(_read(path) + f"; fds['w'] = os.open({path!r}, os.O_RDWR)") == "None"
    assert bob("os.pwrite(fds['w'], b'BOB', 0); os.close(os.dup(fds['w']))") == "None"
    assert (mounted.root / path).read_bytes() == b"BOB by alice\n"
    alice_deletes = _read(path) + f"; os.unlink({path!r})"
    if recreated:
        alice_deletes += "; os.listdir('plans'); " + _write(path, b"alice anew\n")  # (a listing: see protocol.md)
    assert alice(alice_deletes) == "None"
    assert bob("_r = os.pread(fds['w'], 100, 0)") == repr(b"BOB by alice\n")
    assert bob("_r = os.fstat(fds['w']).st_nlink") == "0"
    assert bob("os.pwrite(fds['w'], b'lost?', 0)") == errno.EACCES
    assert bob("os.fsync(fds['w']); os.close(fds['w'])") == "None"
    file = mounted.root / path
    assert (file.read_bytes() if file.exists() else None) == (b"alice anew\n" if recreated else None)


@pytest.mark.parametrize("recreated", [False, True], ids=["deleted", "deleted-and-recreated"])
def test_an_append_handle_written_again_after_another_agent_deleted_its_committed_file_is_refused(
    mounted: Mount, agents: tuple[Agent, Agent], recreated: bool
) -> None:
    """As for any write handle, but appends go to whatever is current: after another agent deleted
    the file, bob's next append is refused EACCES, never added to a file alice made anew at the name
    (found by a hostile probe: it landed there) nor kept by no name, and it leaves no grant behind."""
    alice, bob = agents
    path = "plans/d.md"
    assert alice(_write(path, b"one by alice\n")) == "None"
    assert bob(f"fds['a'] = os.open({path!r}, os.O_WRONLY | os.O_APPEND)") == "None"
    assert bob("os.write(fds['a'], b'bob 1\\n'); os.close(os.dup(fds['a']))") == "None"
    assert (mounted.root / path).read_bytes() == b"one by alice\nbob 1\n"
    alice_deletes = _read(path) + f"; os.unlink({path!r})"
    if recreated:
        alice_deletes += "; os.listdir('plans'); " + _write(path, b"alice anew\n")
    assert alice(alice_deletes) == "None"
    assert bob("os.write(fds['a'], b'bob 2\\n')") == errno.EACCES
    assert bob("os.close(fds['a'])") == "None"
    file = mounted.root / path
    assert (file.read_bytes() if file.exists() else None) == (b"alice anew\n" if recreated else None)
    assert (
        alice(_read(path) + "; " + _write(path, b"alice again\n") if recreated else _write(path, b"alice again\n"))
        == "None"
    )


def test_a_write_handle_whose_own_agent_deleted_its_file_goes_on_with_it_kept_by_no_name(
    mounted: Mount, agents: tuple[Agent, Agent]
) -> None:
    """The documented exception stays: a deletion by the handle's own agent (another of its
    processes) lets it go on writing the file, kept by no name, as on a local disk."""
    alice, bob = agents
    path = "plans/o.md"
    assert bob(_write(path, b"bob's\n")) == "None"
    assert bob(
        f"fds['w'] = os.open({path!r}, os.O_RDWR); os.pwrite(fds['w'], b'B', 0); os.close(os.dup(fds['w']))"
    ) == ("None")
    other = Agent(mounted, "bob")
    try:
        assert other(f"os.unlink({path!r})") == "None"
    finally:
        other.close()
    assert bob("os.pwrite(fds['w'], b'still', 0); _r = os.pread(fds['w'], 100, 0)") == repr(b"still\n")
    assert bob("os.close(fds['w'])") == "None"
    assert not (mounted.root / path).exists()
    assert alice("_r = sorted(os.listdir('plans'))") == "[]"
