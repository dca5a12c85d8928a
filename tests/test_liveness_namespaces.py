"""Grants across PID namespaces: a pid means nothing outside its namespace, so only the TTL
ends a grant held from another one.

Real `unshare --pid --fork --mount-proc` (root only), real kill -9. Every wait is bounded;
each namespace ends with the process that is its init, which every test kills and reaps.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest

from coherent_volume import CoherentVolume, StaleWriteError
from coherent_volume.liveness import ProcessId, current_process, host_id, start_time

from .conftest import REPO
from .harness.agent_session import commit_lock_held
from .harness.mounts import CLI

P = "plans/plan.md"


def _unshare_works() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, check=False, timeout=30
            ).returncode
            == 0
        )
    except subprocess.TimeoutExpired:
        return False


pytestmark = pytest.mark.skipif(not _unshare_works(), reason="needs root and unshare --pid --fork --mount-proc")


class Namespaced:
    """`python -c code args` as pid 1 of a new PID namespace (and mount namespace with its own /proc).

    --kill-child: if `unshare` dies, so does the namespace. `kill()` SIGKILLs the namespace's
    init from here (which ends every process in the namespace) and reaps `unshare`."""

    def __init__(self, code: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable, "-c", code, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout: float = 30) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the namespaced process within {timeout} s") from None
        if line is None:
            self.proc.wait(timeout=30)
            raise AssertionError(f"the namespaced process ended early: {self.proc.stderr.read()}")  # type: ignore[union-attr]
        return line

    def init_pid(self) -> int:
        """Host pid of the namespace's init (the only child of `unshare`)."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        assert len(children) == 1, children
        return children[0]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.init_pid(), signal.SIGKILL)
            except (AssertionError, OSError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def test_host_identity_differs_across_pid_namespaces() -> None:
    with Namespaced(
        "from coherent_volume.liveness import current_process as c; p = c(); print(p.host, p.pid, p.start)"
    ) as ns:
        host, pid, start = ns.line().rsplit(" ", 2)
        assert ns.proc.wait(timeout=30) == 0
    assert int(pid) == 1
    assert host != host_id()
    assert ProcessId(host, int(pid), int(start)).alive() is None, "a pid of another namespace cannot be checked here"
    assert current_process().alive() is True


NAMESPACED_HOLDER = r"""
import os, sys, time
from coherent_volume import CoherentVolume
root, go, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
v = CoherentVolume(root, agent="inside")
with v.lock("plans/plan.md", ttl=ttl) as grant:
    data = v.read("plans/plan.md")
    print("locked", grant.expires_at, flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("wrote", v.write("plans/plan.md", data + b" + the holder's change"), flush=True)
"""


def test_a_grant_held_inside_a_pid_namespace_holds_against_the_host(root: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"base")
        with Namespaced(NAMESPACED_HOLDER, str(root), str(go), "3600") as holder:
            assert holder.line().startswith("locked ")
            with pytest.raises(StaleWriteError) as refused:
                bob.write(P, b"bob, while the namespaced holder holds it")
            assert refused.value.reason == "held" and refused.value.holder == "inside"
            go.touch()
            assert holder.line() == "wrote 2", "the holder kept its grant: it was not fenced"
            assert holder.proc.wait(timeout=30) == 0
        assert (root / P).read_bytes() == b"base + the holder's change"


NAMESPACED_WRITER = r"""
import sys
from coherent_volume import CoherentVolume, StaleWriteError
v = CoherentVolume(sys.argv[1], agent="inside")
v.read("plans/plan.md")
try:
    print("written", v.write("plans/plan.md", b"the namespaced intruder"), flush=True)
except StaleWriteError as e:
    print(e.reason, e.holder, flush=True)
"""


def test_a_grant_held_on_the_host_holds_against_a_pid_namespace(root: Path) -> None:
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"base")
        with bob.lock(P, ttl=3600):
            with Namespaced(NAMESPACED_WRITER, str(root)) as intruder:
                assert intruder.line() == "held bob"
                assert intruder.proc.wait(timeout=30) == 0
            assert bob.write(P, b"bob still holds it") == 2
        assert (root / P).read_bytes() == b"bob still holds it"


def test_a_killed_holder_in_another_namespace_is_reclaimed_only_at_its_ttl(root: Path, tmp_path: Path) -> None:
    ttl = 4.0
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"base")
        with Namespaced(NAMESPACED_HOLDER, str(root), str(tmp_path / "never"), str(ttl)) as holder:
            expires_at = float(holder.line().split()[1])
            holder.kill()
        assert time.time() < expires_at - 0.5, "the holder took too long to die for this test to mean anything"
        with pytest.raises(StaleWriteError) as refused:
            bob.write(P, b"bob, right after the holder died")
        assert refused.value.reason == "held"
        deadline = time.monotonic() + ttl + 10
        while True:
            try:
                assert bob.write(P, b"bob, once the grant expired") == 2
                break
            except StaleWriteError as e:
                assert e.reason == "held" and time.monotonic() < deadline, e
                time.sleep(0.05)
        assert time.time() >= expires_at, "the grant was reclaimed before its TTL"


def test_a_refusal_held_by_a_holder_that_cannot_be_checked_says_until_when_and_reclaim_ends_it(
    root: Path, tmp_path: Path
) -> None:
    """A grant held from another PID namespace lasts to its expiry even once its holder died (it
    cannot be checked from here): the refusal says until when, and that `coherent-volume reclaim`
    ends it; reclaimed, the path is free and the holder's agent fenced."""
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"base")
        with Namespaced(NAMESPACED_HOLDER, str(root), str(tmp_path / "never"), "3600") as holder:
            holder.line()
            holder.kill()
        with pytest.raises(StaleWriteError) as refused:
            bob.write(P, b"bob, after the holder died")
        held = refused.value.held_until
        assert refused.value.reason == "held" and held is not None and held.unchecked and 3500 < held.left <= 3600
        assert f"(in {held.left:,.0f} s)" in str(refused.value) and "coherent-volume reclaim PATH" in str(refused.value)
        ran = subprocess.run([CLI, "reclaim", str(root), P], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0 and "reclaimed the write grant of 'inside'" in ran.stdout, ran
        assert bob.write(P, b"bob, once reclaimed") == 2
        again = subprocess.run([CLI, "reclaim", str(root), P], capture_output=True, text=True, timeout=60)
        assert "no write grant is held on it" in again.stdout
    with CoherentVolume(root, agent="inside") as inside:
        inside.read(P)
        with pytest.raises(StaleWriteError) as late:
            inside.write(P, b"the holder's late write")
        assert late.value.reason == "fenced"


NAMESPACED_WAITER = r"""
import sys
from coherent_volume import CoherentVolume, RegistryError
from coherent_volume.registry import sqlite
sqlite.COMMIT_LOCK_TIMEOUT = 1.0
try:
    CoherentVolume(sys.argv[1], agent="inside").write("plans/other.md", b"x")
    print("written", flush=True)
except RegistryError as e:
    print(e, flush=True)
"""


def test_a_commit_lock_held_from_outside_a_containers_pid_namespace_is_said_to_be(root: Path) -> None:
    """In a container's PID namespace /proc/locks leaves out the locks of processes outside it: a
    wait for the commit lock that such a process holds says so (before: "/proc/locks does not say
    which process holds it")."""
    with commit_lock_held(root), Namespaced(NAMESPACED_WAITER, str(root)) as waiter:
        said = waiter.line(timeout=60)
        assert waiter.proc.wait(timeout=30) == 0
    assert "held by a process outside this one's PID namespace" in said, said
    assert not (root / "plans" / "other.md").exists()


@pytest.mark.parametrize("fork", [["--fork", "--kill-child"], []], ids=["fork", "no-fork"])
def test_a_mount_in_a_pid_namespace_without_its_own_proc_is_refused(
    root: Path, tmp_path: Path, fork: list[str]
) -> None:
    """The mount tells its callers apart by their entries in /proc; in a PID namespace that did not
    mount its own /proc those entries are another namespace's processes, so two agents' writes
    were taken for one agent's (a blind overwrite of the other's commit accepted). Such a mount is
    refused before anything is mounted, saying why and what to do; so is one whose children would
    start in a new PID namespace (`unshare --pid` without `--fork`: before, a bare ENOMEM)."""
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    try:
        done = subprocess.run(
            ["unshare", "--pid", *fork, CLI, "mount", str(root), str(mountpoint)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert str(mountpoint) not in Path("/proc/self/mounts").read_text()
        assert done.returncode != 0 and "another PID namespace" in done.stderr and "--mount-proc" in done.stderr, done
    finally:  # a mount made all the same: its daemon died with the namespace
        mounted = str(mountpoint) in Path("/proc/self/mounts").read_text()
        if mounted and subprocess.run(["fusermount3", "-u", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["fusermount3", "-uz", str(mountpoint)], capture_output=True)


CONTAINER_START = r"""
import os, subprocess, sys, time
cli, root, mnt, steps = sys.argv[1:5]
os.makedirs(mnt)
subprocess.run([cli, "mount", root, mnt], check=True, capture_output=True)
path = os.path.join(mnt, "plans", "plan.md")

def wait(step):
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(steps, step)):
        assert time.monotonic() < deadline, step
        time.sleep(0.01)
"""
"""The start of a container's init: it mounts the volume at `mnt` in its own namespace; `wait` for
a step the test marks in `steps`."""

CONTAINER = (
    CONTAINER_START
    + r"""
role, named = sys.argv[5:7]

def read():  # by the container's init itself (named), else by a program it starts
    if named == "1":
        with open(path) as f:
            return f.read()
    return subprocess.run(["cat", path], capture_output=True, text=True, check=True).stdout

def write(data):
    if named == "1":
        try:
            with open(path, "w") as f:
                f.write(data)
            return True
        except PermissionError:
            return False
    return subprocess.run(["sh", "-c", 'printf %s "$1" > "$2"', "sh", data, path]).returncode == 0

try:
    base = read()
    if role == "A":
        print("read", flush=True)
        wait("B wrote")
    print("accepted" if write(base + " + " + role) else "refused", flush=True)
finally:
    if subprocess.run(["fusermount3", "-u", mnt]).returncode:
        subprocess.run(["fusermount3", "-uz", mnt])
"""
)


@pytest.mark.parametrize("named", [True, False], ids=["named-init", "anonymous"])
def test_agents_of_two_containers_each_mounting_the_volume_are_told_apart(
    root: Path, tmp_path: Path, named: bool
) -> None:
    """Two containers (PID and mount namespaces) each mount the volume and write through their own
    mount: the container's init named by COHERENT_AGENT (`coherent-volume as NAME --` as an
    entrypoint), or programs that no name reaches, each container in a session led from outside it.
    A's write based on what it read before B's commit is refused. Before, the init's name was never
    read and every such process was agent `session-0` in both: one agent, so A's stale write was
    taken over B's commit."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1")
    steps = tmp_path / "steps"
    steps.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"}

    def container(role: str) -> Namespaced:
        agent = {"COHERENT_AGENT": f"agent-{role}"} if named else {}
        args = (CLI, str(root), str(tmp_path / f"mnt{role}"), str(steps), role, str(int(named)))
        return Namespaced(CONTAINER, *args, env={**env, **agent})

    with container("A") as a:
        assert a.line() == "read"
        with container("B") as b:
            assert b.line() == "accepted"
            assert b.proc.wait(timeout=30) == 0
        (steps / "B wrote").touch()
        assert a.line() == "refused", "A's write over B's commit, which A never read, was taken"
        assert a.proc.wait(timeout=30) == 0
    assert (root / P).read_text() == "v1 + B"
    with CoherentVolume(root, agent="observer") as v:
        writers = [h.writer for h in v.history(P)]
    assert writers[0] != "setup" and len(writers) == 2
    if named:
        assert writers[0] == "agent-B"
    else:
        assert writers[0].startswith("session-") and writers[0] != "session-0"


TIME_NAMESPACE = ["unshare", "--time", "--boottime", "100000"]
"""A time namespace whose clock of time since boot runs 100,000 s ahead of the host's."""


def _in_time_namespace(code: str, *args: str, **pipes: int) -> subprocess.Popen[str]:
    """`python -c code args` in a time namespace of its own (TIME_NAMESPACE), its output piped."""
    return subprocess.Popen(
        [*TIME_NAMESPACE, sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=REPO, **pipes
    )


def test_a_process_in_a_time_namespace_has_the_start_time_the_host_sees() -> None:
    """/proc shows start times shifted by the reader's time namespace: both sides must name one
    process alike, or a live process looks dead (or a dead one's pid a live process's)."""
    code = "import sys; from coherent_volume.liveness import current_process as c; print(c().pid, c().start, flush=True); sys.stdin.read()"
    inside = _in_time_namespace(code, stdin=subprocess.PIPE)
    try:
        assert inside.stdout is not None
        pid, start = (int(x) for x in inside.stdout.readline().split())
        assert start_time(pid) == start
    finally:
        inside.communicate(timeout=30)


TIME_HOLDER = r"""
import os, sys, time
from coherent_volume import CoherentVolume
root, go = sys.argv[1:3]
v = CoherentVolume(root, agent="inside")
with v.lock("plans/plan.md", ttl=3600):
    data = v.read("plans/plan.md")
    print("locked", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("wrote", v.write("plans/plan.md", data + b" + the holder's change"), flush=True)
"""


def test_a_grant_held_from_a_time_namespace_holds_and_its_holder_is_not_taken_for_dead(
    root: Path, tmp_path: Path
) -> None:
    """A holder in a time namespace (same PID namespace) is alive: others are refused `held` and
    its write goes in. Before, its start time as the host read it differed from its own, so it was
    taken for dead at once: the grant reclaimed ("its process died"), another agent let in, and
    the holder's write refused `fenced`."""
    go = tmp_path / "go"
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"base")
        holder = _in_time_namespace(TIME_HOLDER, str(root), str(go), stderr=subprocess.PIPE)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "locked"
            with pytest.raises(StaleWriteError) as refused:
                bob.write(P, b"bob, while the holder holds it")
            assert refused.value.reason == "held" and refused.value.holder == "inside"
            go.touch()
            out, err = holder.communicate(timeout=30)
            assert out.strip() == "wrote 2", err
        finally:
            holder.kill()
            holder.wait(timeout=30)
        assert (root / P).read_bytes() == b"base + the holder's change"


ORPHAN_INIT = (
    CONTAINER_START
    + r"""

try:
    print("mounted", flush=True)
    wait("J read")
    # X, a program the init starts (its session is led from outside the namespace, as J's): reads, then commits
    x = subprocess.run(["sh", "-c", 'd=$(cat "$1") && printf "%s + X" "$d" > "$1"', "sh", path])
    print("X", x.returncode, flush=True)
    wait("J done")
finally:
    if subprocess.run(["fusermount3", "-u", mnt]).returncode:
        subprocess.run(["fusermount3", "-uz", mnt])
"""
)
ORPHAN_JOB = r"""
( d=$(cat "$1"); touch "$2/J read"; while [ ! -e "$2/X done" ]; do sleep 0.05; done
  printf "%s + J" "$d" > "$1" && echo accepted > "$2/J said" || echo refused > "$2/J said"; touch "$2/J done" ) &
while [ ! -e "$2/J read" ]; do sleep 0.05; done
"""


def test_an_orphan_inside_a_container_keeps_the_session_agent_it_read_as(root: Path, tmp_path: Path) -> None:
    """A job a shell entered into a container (`nsenter`) leaves behind when it exits is handed to
    the container's init: it keeps the agent it read as, so its write based on what it read before
    another program of the container committed is refused. Before, its agent became the init's
    session's, the committer's own, and its stale write was taken over that commit."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1")
    steps = tmp_path / "steps"
    steps.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"}
    with Namespaced(ORPHAN_INIT, CLI, str(root), str(tmp_path / "mnt"), str(steps), env=env) as init:
        assert init.line() == "mounted"
        inside = ["nsenter", "-t", str(init.init_pid()), "-p", "-m", "--", "sh", "-c", ORPHAN_JOB, "sh"]
        subprocess.run([*inside, str(tmp_path / "mnt" / P), str(steps)], env=env, check=True, timeout=30)
        assert init.line() == "X 0", "X read and committed"
        (steps / "X done").touch()
        assert init.proc.wait(timeout=60) == 0
    assert (steps / "J said").read_text().strip() == "refused", "the orphan's stale write was taken over X's commit"
    assert (root / P).read_text() == "v1 + X"


SUCCESSIVE = r"""
import os, subprocess, sys
cli, root, mnt = sys.argv[1:4]
os.makedirs(mnt)
subprocess.run([cli, "mount", root, mnt], check=True, capture_output=True)
path = os.path.join(mnt, "plans", "plan.md")
try:
    ran = subprocess.run(["sh", "-c", 'd=$(cat "$1") && printf "%s +" "$d" > "$1"', "sh", path])
    print(ran.returncode, os.stat("/proc/self/ns/pid").st_ino, flush=True)
finally:
    if subprocess.run(["fusermount3", "-u", mnt]).returncode:
        subprocess.run(["fusermount3", "-uz", mnt])
"""


def test_containers_one_after_another_are_other_agents_though_their_namespace_numbers_recur(
    root: Path, tmp_path: Path
) -> None:
    """The kernel hands a PID namespace's inode number to the next namespace made once it ends (here
    they alternate), so a later container is named apart from an earlier one by its init's start
    time too: before, one whose namespace got an earlier container's number was that container's
    agent, views and all, and its blind write was taken over them."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "v1")
    env = {k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"}
    inodes = []
    for n in range(3):
        with Namespaced(SUCCESSIVE, CLI, str(root), str(tmp_path / f"mnt{n}"), env=env) as container:
            code, inode = container.line().split()
            assert code == "0" and container.proc.wait(timeout=60) == 0
            inodes.append(inode)
    with CoherentVolume(root, agent="observer") as v:
        writers = [h.writer for h in v.history(P)][:3]
    assert len(set(writers)) == 3, (writers, inodes)
