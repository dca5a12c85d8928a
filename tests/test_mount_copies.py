"""Copies the kernel makes through its page cache (`copy_file_range`, `sendfile`, `splice`: what
`cp`, `cat a > b`, Python's `shutil.copyfile` and Node's `fs.copyFile` use) of managed files
through the mount copy the bytes of the descriptor they copy from, and as many as it holds,
whatever other agents hold open or ask meanwhile: the kernel keeps one page cache and one size
per FUSE inode, so the mount gives each content its own inode (`fusefs/handles.py` `PageCache`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume

from .harness.mounts import Mount
from .test_mount_posix import _gated, _wait_for
from .test_silent_loss import python_in

P = "plans/a.md"

AGENT = r"""
import os, sys
fds = {}
for line in sys.stdin:
    cmd, name, rest = (line.rstrip("\n").split(" ", 2) + [""])[:3]
    args = rest.split(" ")
    try:
        if cmd == "open":  # read-only, read-write, or read-write cut
            flags = {"r": os.O_RDONLY, "w": os.O_RDWR, "t": os.O_RDWR | os.O_TRUNC}[args[1]]
            fds[name] = os.open(args[0], flags)
            out = "opened"
        elif cmd == "read":
            out = os.pread(fds[name], 1 << 16, 0).decode()
        elif cmd == "write":  # the rest of the line, backslash escapes decoded
            out = str(os.pwrite(fds[name], rest.encode().decode("unicode_escape").encode(), 0))
        elif cmd == "sendfile":  # no fstat first: what the kernel's own idea of the file gives
            out_fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                copied = os.sendfile(out_fd, fds[name], 0, 1 << 16)
            finally:
                os.close(out_fd)
            out = f"{copied}:{open(args[0], 'rb').read().decode()}"
        elif cmd == "copy":  # copy_file_range into a file of the mount (the kernel's splice fallback)
            out_fd = os.open(args[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                copied = os.copy_file_range(fds[name], out_fd, 1 << 16, 0, 0)
            finally:
                os.close(out_fd)
            out = str(copied)
        elif cmd == "fstat":
            out = str(os.fstat(fds[name]).st_size)
        elif cmd == "stat":
            out = str(os.stat(name).st_size)
        elif cmd == "ino":  # of a descriptor, or of a name
            out = str(os.fstat(fds[name]).st_ino if name in fds else os.stat(name).st_ino)
        elif cmd == "close":
            os.close(fds.pop(name))
            out = "closed"
    except OSError as e:
        out = f"error {e}"
    print(out.replace("\n", "|"), flush=True)
"""


class Agent:
    """A process of `agent` in the mount that runs one command per line (see AGENT) and answers it."""

    def __init__(self, m: Mount, agent: str) -> None:
        self.process = python_in(m, agent, AGENT)

    def __call__(self, *words: str) -> str:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(" ".join(words) + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().rstrip("\n")


@contextlib.contextmanager
def agents(m: Mount, *names: str) -> Iterator[list[Agent]]:
    started = [Agent(m, name) for name in names]
    try:
        yield started
    finally:
        for agent in started:
            agent.process.kill()
            agent.process.wait()


def test_a_copy_from_a_reader_of_each_version_copies_that_version(mounted: Mount, tmp_path: Path) -> None:
    """bob holds version 1 open while alice commits version 2 of the same size in place; carol opens
    version 2. Each copy by sendfile gives its own descriptor's bytes, whichever went first (the
    kernel would otherwise answer the second from the pages the first filled), and each
    descriptor's fstat its version's size."""
    (mounted.path / P).write_text("version one\n")
    with agents(mounted, "alice", "bob", "carol") as (alice, bob, carol):
        assert alice("open", "x", P, "r") == "opened" and alice("read", "x") == "version one|"
        assert alice("open", "w", P, "w") == "opened"
        assert bob("open", "r", P, "r") == "opened" and bob("read", "r") == "version one|"
        assert alice("write", "w", "VERSION TWO\\n") == "12" and alice("close", "w") == "closed"
        assert carol("open", "r", P, "r") == "opened" and carol("read", "r") == "VERSION TWO|"
        assert bob("sendfile", "r", str(tmp_path / "bob.copy")) == "12:version one|"
        assert carol("sendfile", "r", str(tmp_path / "carol.copy")) == "12:VERSION TWO|"
        assert bob("sendfile", "r", str(tmp_path / "bob.copy")) == "12:version one|"
        assert (bob("fstat", "r"), carol("fstat", "r")) == ("12", "12")
        assert carol("open", "w", P, "t") == "opened" and carol("write", "w", "three, a longer version\\n") == "24"
        assert carol("close", "w") == "closed"
        assert bob("fstat", "r") == "12", "a reader's descriptor keeps its version's size"
        assert bob("sendfile", "r", str(tmp_path / "bob.copy")) == "12:version one|"


def test_a_stat_answered_as_a_commit_lands_does_not_cut_a_readers_copy(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """carol holds the file open when bob stats it by its name. The daemon takes the file's stat,
    finds it still carol's version, and is held there while bob commits a shorter version (through
    the Python API: the daemon is held); then it answers. carol's copy by sendfile gives all of her
    version: the answer came from the stat that found the file hers (a stat taken again to answer
    would tell the kernel the new version's size for her inode, and the copy stops at that size: 1
    copy in some thousands was cut short so, or padded with NUL bytes, while agents rewrote a file
    as fast as they could)."""
    patch = """
from fusefs.backing import Backing
_lstat = Backing.lstat
def _held(self, rel):
    st = _lstat(self, rel)
    if rel == "plans/a.md":
        wait_at_gate()
    return st
Backing.lstat = _held
"""
    hers = "carol's version " * 300
    with _gated(root, tmp_path, monkeypatch, patch) as (m, gate):
        (m.path / P).write_text(hers)
        with agents(m, "carol", "bob") as (carol, bob):
            assert carol("open", "r", P, "r") == "opened"
            gate.touch()
            said: list[str] = []
            stat = threading.Thread(target=lambda: said.append(bob("stat", P)))
            stat.start()
            try:
                _wait_for(Path(f"{gate}.held").exists, "bob's stat to reach the gate")
                with CoherentVolume(root, agent="bob") as vol:
                    vol.read(P)
                    vol.write(P, "bob's\n")
            finally:
                gate.unlink()
                stat.join(timeout=60)
            assert len(said) == 1, "bob's stat never returned"
            assert carol("sendfile", "r", str(tmp_path / "carol.copy")) == f"{len(hers)}:{hers}"
            assert carol("close", "r") == "closed"
            assert carol("open", "r", P, "r") == "opened" and carol("read", "r") == "bob's|"


def test_a_chmod_by_the_name_after_a_commit_does_not_cut_a_readers_copy(mounted: Mount, tmp_path: Path) -> None:
    """carol holds the file open; bob commits a shorter version (through the Python API, so nobody
    looks the name up meanwhile), then the file is chmod'ed by its name, which the kernel still
    maps to carol's inode. The chmod changes the file at the name, and carol's copy by sendfile
    gives all of her version (the reply telling the name's new size for her inode would stop it)."""
    hers = "carol's version " * 300
    (mounted.path / P).write_text(hers)
    with agents(mounted, "carol") as (carol,):
        assert carol("open", "r", P, "r") == "opened"
        with CoherentVolume(mounted.root, agent="bob") as vol:
            vol.read(P)
            vol.write(P, "bob's\n")
        os.chmod(mounted.path / P, 0o600)
        assert carol("sendfile", "r", str(tmp_path / "carol.copy")) == f"{len(hers)}:{hers}"
        assert carol("fstat", "r") == str(len(hers))
    assert (mounted.root / P).stat().st_mode & 0o777 == 0o600
    assert (mounted.path / P).read_text() == "bob's\n"


def test_a_copy_from_a_write_handle_copies_its_unsaved_writes_and_a_readers_copy_the_committed_bytes(
    mounted: Mount, tmp_path: Path
) -> None:
    """alice has unsaved writes (of the committed file's size) in a write handle; bob copies the
    committed file, then alice copies from her handle: each gets its own descriptor's bytes."""
    (mounted.path / P).write_text("committed bytes\n")
    with agents(mounted, "alice", "bob") as (alice, bob):
        assert alice("open", "x", P, "r") == "opened" and alice("read", "x") == "committed bytes|"
        assert alice("open", "w", P, "w") == "opened" and alice("write", "w", "UNSAVED BYTES!!\\n") == "16"
        assert bob("open", "r", P, "r") == "opened"
        assert bob("sendfile", "r", str(tmp_path / "bob.copy")) == "16:committed bytes|"
        assert alice("sendfile", "w", str(tmp_path / "alice.copy")) == "16:UNSAVED BYTES!!|"
        assert bob("sendfile", "r", str(tmp_path / "bob.copy")) == "16:committed bytes|"
        assert (bob("read", "r"), bob("stat", P)) == ("committed bytes|", "16")
        assert alice("close", "w") == "closed"
    assert (mounted.root / P).read_text() == "UNSAVED BYTES!!\n"


def test_another_agents_stat_does_not_cut_a_copy_from_a_write_handle(mounted: Mount) -> None:
    """alice's write handle holds 34 unsaved bytes where 12 are committed; bob stats the file by its
    name (he sees the committed file) and alice copies from her handle into another managed file
    with copy_file_range: all 34 bytes are copied (the kernel clamps a copy at the size it last
    heard of the inode, which bob's stat set)."""
    (mounted.path / P).write_text("version one\n")
    with agents(mounted, "alice", "bob") as (alice, bob):
        assert alice("open", "x", P, "r") == "opened" and alice("read", "x") == "version one|"
        assert alice("open", "w", P, "w") == "opened"
        assert alice("write", "w", "thirty-five bytes of unsaved text\\n") == "34"
        assert alice("fstat", "w") == "34"
        assert bob("stat", P) == "12"
        assert alice("copy", "w", "plans/copy.md") == "34"
        assert alice("close", "w") == "closed"
    assert (mounted.root / "plans/copy.md").read_text() == "thirty-five bytes of unsaved text\n"
    assert (mounted.root / P).read_text() == "thirty-five bytes of unsaved text\n"


def test_a_file_written_in_place_keeps_its_inode_number_and_other_agents_see_the_committed_file_meanwhile(
    mounted: Mount,
) -> None:
    """While alice's write handle holds unsaved writes, her stat of the file by its name shows them,
    as on a local disk; bob's shows the committed file, and his read gives its bytes. Every stat and
    fstat shows the inode number the file had before, during the write and after it (vim checks
    that the file it opened is the one it stat'ed; cp, that the file it copies is). (A reader that
    still holds the version before when the write is committed keeps that inode for itself, and the
    name gets a new one, as after a save by rename: see the first test.)"""
    (mounted.path / P).write_text("version one\n")
    before = str(os.stat(mounted.path / P).st_ino)
    with agents(mounted, "alice", "bob") as (alice, bob):
        assert alice("open", "x", P, "r") == "opened" and alice("read", "x") == "version one|"
        assert alice("close", "x") == "closed"
        assert alice("open", "w", P, "w") == "opened" and alice("write", "w", "longer version two\\n") == "19"
        assert (alice("fstat", "w"), alice("stat", P), bob("stat", P)) == ("19", "19", "12")
        assert alice("ino", "w") == alice("ino", P) == bob("ino", P) == before
        assert bob("open", "r", P, "r") == "opened" and bob("read", "r") == "version one|"
        assert bob("close", "r") == "closed"
        assert alice("close", "w") == "closed"
        assert (alice("stat", P), bob("stat", P)) == ("19", "19")
        assert alice("ino", P) == bob("ino", P) == before


WRITER = r"""
import os, random, shutil, sys, tempfile, time
me, kind, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
spare = tempfile.NamedTemporaryFile(delete=False).name  # shutil.copyfile's source, outside the mount
n = 0

def version():
    global n
    n += 1
    size = random.choice((random.randrange(40, 4096), random.randrange(4096, 3 * 4096)))
    head = f"{me} {n:07d} {size:06d}\n".encode()
    return head + bytes([65 + n % 26]) * (size - len(head))

end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with open("plans/a.md", "rb") as f:  # a current view: another agent's writes since are stale
            f.read()
        data = version()
        if kind == "trunc":  # open O_TRUNC, two writes 2 ms apart, close
            fd = os.open("plans/a.md", os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, data[: len(data) // 2])
                time.sleep(0.002)
                os.write(fd, data[len(data) // 2 :])
            finally:
                os.close(fd)
        elif kind == "rdwr":  # rewritten in place without O_TRUNC, cut to its size
            fd = os.open("plans/a.md", os.O_RDWR)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
        else:
            with open(spare, "wb") as f:
                f.write(data)
            shutil.copyfile(spare, "plans/a.md")
    except OSError:
        pass  # refused (another agent committed since this one read): it reads again
os.unlink(spare)
"""

COPIER = r"""
import os, sys, time
seconds = float(sys.argv[1])
out = os.memfd_create("copy")
copies = bad = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    fd = os.open("plans/a.md", os.O_RDONLY)
    try:
        os.ftruncate(out, 0)
        os.lseek(out, 0, os.SEEK_SET)
        copied = os.sendfile(out, fd, 0, 1 << 20)  # right after open: no fstat in between
    finally:
        os.close(fd)
    data = os.pread(out, 1 << 20, 0)
    copies += 1
    line, _, rest = data.partition(b"\n")
    words = line.split()
    whole = len(words) == 3 and int(words[2]) == len(data) == copied
    if not (whole and rest == bytes([65 + int(words[1]) % 26]) * (len(data) - len(line) - 1)):
        bad += 1
        print("BAD", copied, data[:40], flush=True)
print("DONE", copies, bad, flush=True)
"""


def copy_while_rewritten(m: Mount, seconds: float) -> tuple[int, list[str]]:
    """Three agents rewrite plans/a.md in place as fast as they can while a fourth copies it with
    sendfile right after each open; returns the number of copies and the ones that were no
    committed version."""
    (m.path / P).write_text("setup 0000000 000021\n")
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, agent, kind, str(seconds)],
            cwd=m.path,
            env={**os.environ, "COHERENT_AGENT": agent},
        )
        for agent, kind in (("alice", "trunc"), ("bob", "rdwr"), ("carol", "copyfile"))
    ]
    try:
        done = subprocess.run(
            [sys.executable, "-c", COPIER, str(seconds)],
            cwd=m.path,
            env={**os.environ, "COHERENT_AGENT": "dave"},
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
    finally:
        for writer in writers:
            writer.wait(timeout=seconds + 60)
    lines = done.stdout.splitlines()
    copies = int(lines[-1].split()[1])
    return copies, [line for line in lines if line.startswith("BAD")]


def test_a_copy_right_after_a_read_only_open_is_one_committed_version_while_agents_rewrite_the_file(
    mounted: Mount,
) -> None:
    """Three agents rewrite the file in place as fast as they can (open O_TRUNC and two writes 2 ms
    apart; O_RDWR, write and ftruncate; shutil.copyfile into it) while a fourth opens it read-only
    and copies it with sendfile at once, asking no size: every copy is one whole committed version
    (the kernel stops such a copy at the size it holds for the inode, and when a commit lands while
    two calls ask about the file it may keep the older one)."""
    copies, bad = copy_while_rewritten(mounted, 40.0)
    assert copies > 200  # on a loaded machine too: each copy is a few requests
    assert bad == []


def test_a_repeat_queued_while_the_daemon_was_stopped_is_still_known_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The mount answers a call ESTALE and expects the kernel's repeat for RETRY_WAIT (5 s); a daemon
    stopped for 35 s (SIGSTOP past a lease) found the repeats queued meanwhile overdue and answered
    them ESTALE again, which reached the programs (/tmp/s33crash 1: opens failing at the second the
    daemon went on). RETRY_WAIT is counted on the mount's clock, in which a gap in which the daemon
    did not run counts for STALL seconds at most; a repeat that never comes still expires."""
    from fusefs import handles

    class Clock:
        now = 1000.0

        @classmethod
        def monotonic(cls) -> float:
            return cls.now

    monkeypatch.setattr(handles, "time", Clock)
    pages = handles.PageCache()
    pages.retry(7, "plans/a.md", True, None, 0, False)
    Clock.now += 35  # the daemon stopped; the kernel's repeat waits in its queue
    assert pages.retrying(7) is not None and pages.landed(7) is not None
    pages.retry(8, "plans/b.md", False, None, 0, False)
    for _ in range(int(handles.RETRY_WAIT / 0.25) + 1):  # the daemon runs on; no repeat comes
        Clock.now += 0.25
        pages.now()
    assert pages.retrying(8) is None
