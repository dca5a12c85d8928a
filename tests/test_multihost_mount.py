"""The mount of any working copy of a PostgreSQL volume, kept current by LISTEN/NOTIFY.

Real parts, as in tests/test_multihost.py: a private PostgreSQL cluster listening on the bridge of a
bed of three namespace hosts (network, UTS, mount and PID namespaces), h1 creating the volume and h2
and h3 joining it with `coherent-volume init`. Mounts are made and unmounted by the real CLI inside
a host (the mount exists in that host's mount namespace only), and read and written there by
programs started in the host; every daemon must exit by itself at its unmount and log no bug
(`harness.mounts.log_problems`). Faults are real: the listener's session ended by the server
(`pg_terminate_backend`) while the host cannot reach the database (nftables drops).

What only the listener does, and so what these tests look at: a commit on another host reaches this
host's working copy (its disk, `ls` and `stat` through the mount) with no read through the mount at
all. A read through the daemon gets the current version either way (the core checks at open).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import pytest

from .harness import CLI
from .harness.hostbed import PY, BedVolume, Hosts, needs_bed, three_hosts

pytestmark = [
    needs_bed,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="the multi-host mount bed needs FUSE",
    ),
]

BOUND = 2.0
"""Seconds within which a commit on one host must show in another host's mount (the goal is < 1 s)."""

READ_THEN_WRITE = r"""
import sys
path = sys.argv[1]
with open(path) as f:
    print(f.read(), end="", flush=True)
sys.stdin.readline()  # the test lets it write once another host committed
try:
    with open(path, "w") as f:
        f.write("written by a program that read an old version\n")
    print("written", flush=True)
except OSError as e:
    print(f"refused {e.errno}", flush=True)
"""
"""A program in a host that reads a file through the mount, then (told to) writes it back."""

REOPENER = r"""
import sys
for _ in sys.stdin:  # each line: open the file and print its text, or that it is missing
    try:
        with open(sys.argv[1]) as f:
            print(f.read().strip(), flush=True)
    except FileNotFoundError:
        print("missing", flush=True)
"""


class HostMount:
    """`root` mounted at `path` inside `host` by the real CLI, unmounted in every outcome. On a clean
    exit the unmount must succeed, the daemon (and its watcher) exit by themselves, and its log hold
    no bug; after a failure whatever serves the mountpoint is killed (the host's mount namespace,
    and the mount with it, ends with the bed)."""

    def __init__(self, host: Any, root: Path, path: Path) -> None:
        self.host, self.root, self.path = host, root, path
        self.log = root / ".coherent" / "mount.log"
        self._log_from = 0

    def __enter__(self) -> HostMount:
        self.path.mkdir(parents=True, exist_ok=True)
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        done = self.host.run(
            [CLI, "mount", str(self.root), str(self.path)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"mount on {self.host.name} failed: {done.stderr}"
        return self

    def __exit__(self, kind: object, failure: BaseException | None, traceback: TracebackType | None) -> None:
        from .harness.mounts import serving_pids

        done = self.host.run([CLI, "unmount", str(self.path)], capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 20
        while serving_pids(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = serving_pids(self.path)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if failure is None:
            assert done.returncode == 0, f"unmount on {self.host.name} failed: {done.stderr}"
            assert not left, f"processes serving {self.path} did not exit after its unmount (killed): {left}"
            problems = self.log_problems()
            assert not problems, "the mount daemon logged a bug:\n" + "\n".join(problems)

    def log_text(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self._log_from)
            return f.read().decode("utf-8", "replace")

    def log_problems(self) -> list[str]:
        from .harness.mounts import log_problems

        return log_problems(self.log_text())

    def run(self, agent: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """`argv` run in the host as `agent` (COHERENT_AGENT), in the mountpoint (entered once in
        the host's mount namespace: nsenter's --wd is taken before)."""
        return self.host.run(
            ["sh", "-c", 'cd "$0" && exec "$@"', str(self.path), *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COHERENT_AGENT": agent},
            **kw,
        )

    def cat(self, rel: str, agent: str = "reader") -> str:
        done = self.run(agent, ["cat", rel])
        assert done.returncode == 0, done.stderr
        return done.stdout

    def listing(self, rel: str) -> list[str] | None:
        """The names in the directory `rel` through the mount; None if there is no such directory."""
        done = self.run("reader", ["ls", "-A", rel])
        if done.returncode != 0 and "No such file or directory" in done.stderr:
            return None
        assert done.returncode == 0, done.stderr
        return done.stdout.split()


def within(seconds: float, check: Callable[[], bool]) -> float | None:
    """Poll `check` until it holds: the seconds that took, or None if it did not within `seconds`."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            return None
        time.sleep(0.01)


def holds(path: Path, text: str | None) -> Callable[[], bool]:
    """Whether the working copy's file at `path` holds `text` (None: there is no file)."""

    def check() -> bool:
        try:
            return path.read_text() == text
        except FileNotFoundError:
            return text is None

    return check


def _program(m: HostMount, code: str, rel: str, agent: str) -> subprocess.Popen[str]:
    """A Python program `code` in the mount's host, as `agent`, given the mount's path of `rel`,
    talking on its standard input and output."""
    return m.host.popen(
        [PY, "-c", code, str(m.path / rel)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": agent},
    )


# ---- the bed: three hosts, one PostgreSQL, one volume with a working copy on each host ----------


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    pytest.importorskip("pyfuse3")
    yield from three_hosts()


class Volume(BedVolume):
    """A BedVolume, with the mountpoint of host hN (in that host) at `mountpoints[N-1]`."""

    def __init__(self, hosts: Hosts, base: Path) -> None:
        super().__init__(hosts, base)
        self.mountpoints = [base / f"mnt{n}" for n in (1, 2, 3)]
        self.port = urlsplit(self.url).port or 5432

    def mount(self, n: int) -> HostMount:
        return HostMount(self.hosts[n - 1], self.roots[n - 1], self.mountpoints[n - 1])

    def listeners(self, n: int) -> list[int]:
        """The backend pids of the sessions host hN LISTENs on."""
        return [
            r[0]
            for r in self.sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN %%' "
                "AND host(client_addr) = %s",
                (self.hosts[n - 1].address,),
            )
        ]


@pytest.fixture
def volume(hosts: Hosts, tmp_path: Path) -> Iterator[Volume]:
    with Volume(hosts, tmp_path) as v:
        yield v


# ---- other hosts' commits, in every mount ------------------------------------------------------------


def test_commits_on_one_host_reach_the_mounts_of_the_others_within_the_bound(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2, h3 = volume.roots[1], volume.roots[2]
    with volume.mount(2) as m2, volume.mount(3) as m3:
        # mounting a joined working copy brings it up to date (a resync when the listener starts)
        assert (h2 / "plans/a.md").read_text() == "one\n" and m2.cat("plans/a.md") == "one\n"
        latencies = []
        for n in range(2, 7):
            alice.write("plans/a.md", f"version {n}\n")
            for root in (h2, h3):  # no read through either mount: only the listener brings it in
                took = within(BOUND, holds(root / "plans/a.md", f"version {n}\n"))
                assert took is not None, f"v{n} did not reach {root} within {BOUND} s"
                latencies.append(took)
            assert m2.cat("plans/a.md") == m3.cat("plans/a.md") == f"version {n}\n"
        print(f"commit on h1 to the working copies of h2 and h3: max {max(latencies) * 1000:.0f} ms")
        # a new file and a new directory appear in the listing, a deleted file disappears from it
        alice.write("plans/deep/new.md", "new\n")
        assert within(BOUND, lambda: "new.md" in (m2.listing("plans/deep") or [])) is not None
        assert m2.run("reader", ["stat", "-c", "%s", "plans/deep/new.md"]).stdout.strip() == "4"
        # installed by a daemon (umask 0): never group- or world-writable
        modes = m2.run("reader", ["stat", "-c", "%a", "plans/deep", "plans/deep/new.md"]).stdout.split()
        assert modes == ["755", "644"]
        assert "version" in alice.do("delete", "plans/a.md")
        assert within(BOUND, lambda: "a.md" not in (m3.listing("plans") or [])) is not None
        assert m3.run("reader", ["cat", "plans/a.md"]).returncode != 0
        assert m3.cat("plans/deep/new.md") == "new\n"
        assert len(volume.listeners(2)) == len(volume.listeners(3)) == 1
    # the daemons exited at their unmounts (HostMount), and their sessions ended with them
    assert within(10, lambda: not volume.listeners(2) and not volume.listeners(3)) is not None


def test_a_program_that_read_an_old_version_through_a_joined_mount_is_refused_its_write(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2 = volume.roots[1]
    with volume.mount(2) as m2:
        program = _program(m2, READ_THEN_WRITE, "plans/a.md", "bob")
        try:
            assert program.stdout is not None and program.stdin is not None
            assert program.stdout.readline() == "one\n"  # bob's view: v1
            assert alice.write("plans/a.md", "two\n")["version"] == 2
            assert within(BOUND, holds(h2 / "plans/a.md", "two\n")) is not None
            program.stdin.write("go\n")
            program.stdin.flush()
            assert program.stdout.readline().strip() == f"refused {errno.EACCES}"
            assert program.wait(timeout=30) == 0
        finally:
            if program.poll() is None:
                program.kill()
            program.communicate()
        assert m2.cat("plans/a.md") == "two\n" and (h2 / "plans/a.md").read_text() == "two\n"
        assert volume.sql("SELECT version, writer FROM cv_files WHERE path = 'plans/a.md'") == [(2, "alice")]
        # fail closed, then the usual way on: bob re-reads and writes; h1 gets it
        written = m2.run("bob", ["bash", "-c", "cat plans/a.md > /dev/null && echo three > plans/a.md"])
        assert written.returncode == 0, written.stderr
    assert alice.read("plans/a.md") == "three\n"
    assert volume.sql("SELECT version, writer FROM cv_files WHERE path = 'plans/a.md'") == [(3, "bob")]
    assert (volume.roots[0] / "plans/a.md").read_text() == "three\n"


def test_the_listener_reconnects_after_its_session_is_ended_and_catches_up_what_it_missed(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2, host = volume.roots[1], volume.hosts[1]
    with volume.mount(2) as m2:
        assert within(BOUND, holds(h2 / "plans/a.md", "one\n")) is not None
        (before,) = volume.listeners(2)
        host.drop("out", volume.port)  # h2 cannot reach the database: no new session, no LISTEN
        try:
            volume.sql("SELECT pg_terminate_backend(%s)", (before,))
            assert within(10, lambda: not volume.listeners(2)) is not None
            # committed while h2 listens nowhere: these notifications are never delivered to it
            alice.write("plans/a.md", "two\n")
            alice.write("plans/b.md", "bee\n")
            assert within(BOUND, lambda: "connection to the registry at " in m2.log_text()) is not None
            assert (h2 / "plans/a.md").read_text() == "one\n"  # nothing reached h2 meanwhile
            # a listing cut off from the database shows what the copy holds (it failed EIO)
            assert m2.listing("plans") == ["a.md"]
            assert "its lister's views of files deleted there were not moved" in m2.log_text()
        finally:
            host.undrop("out", volume.port)
        # once it connects again, it resyncs: what it missed is brought in with no read through the mount
        took = within(60, lambda: holds(h2 / "plans/a.md", "two\n")() and holds(h2 / "plans/b.md", "bee\n")())
        assert took is not None, m2.log_text()
        print(f"caught up {took:.1f} s after the database was reachable again")
        (after,) = volume.listeners(2)
        assert after != before
        assert m2.listing("plans") == ["a.md", "b.md"] and m2.cat("plans/b.md") == "bee\n"
        # and it listens again: the next commit arrives within the bound
        alice.write("plans/a.md", "three\n")
        assert within(BOUND, holds(h2 / "plans/a.md", "three\n")) is not None
        assert m2.cat("plans/a.md") == "three\n"


def test_a_managed_name_the_copy_lacks_is_looked_up_in_the_registry(volume: Volume) -> None:
    """A lookup through the mount of a managed name this working copy does not hold yet (another
    host's commit whose notification has not come) asks the registry and brings the current
    version in, so an open by name right after another host's commit finds the file (before,
    ENOENT until the notification came). A name the volume does not hold is still not there, and
    a file made at the name of a directory of files the copy lacks is refused (EISDIR)."""
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2, host = volume.roots[1], volume.hosts[1]
    with volume.mount(2) as m2:
        assert within(BOUND, holds(h2 / "plans/a.md", "one\n")) is not None
        (listener,) = volume.listeners(2)
        ((port,),) = volume.sql("SELECT client_port FROM pg_stat_activity WHERE pid = %s", (listener,))
        host.drop("in", port)  # the notifications to h2's listener are held back; nothing else is
        try:
            alice.write("plans/new.md", "new\n")
            time.sleep(0.5)
            assert not (h2 / "plans/new.md").exists()  # not brought in by the listener
            assert m2.cat("plans/new.md") == "new\n"
            missing = m2.run("reader", ["cat", "plans/none.md"])
            assert missing.returncode != 0 and "No such file" in missing.stderr
            # a file at the name of a directory of files h2 does not hold yet: refused as a disk
            # holding both would refuse it (before: committed, and the volume held both)
            alice.write("plans/dir/inner.md", "alice's\n")
            clash = m2.run("bob", ["sh", "-c", "echo bob > plans/dir"])
            assert clash.returncode != 0 and "Is a directory" in clash.stderr, clash
            assert volume.sql("SELECT path FROM cv_files WHERE path = 'plans/dir'") == []
            # deleted on h1, opened on h2 (not there: the open checks), then made again on h1: one
            # reader process opens it each time, as soon as h1's call returns
            reader = _program(m2, REOPENER, "plans/new.md", "reader")
            try:
                assert reader.stdin is not None and reader.stdout is not None
                for n in range(5):
                    assert "version" in alice.do("delete", "plans/new.md")
                    reader.stdin.write("open\n")
                    reader.stdin.flush()
                    assert reader.stdout.readline().strip() == "missing", n
                    alice.write("plans/new.md", f"again {n}\n")
                    reader.stdin.write("open\n")
                    reader.stdin.flush()
                    assert reader.stdout.readline().strip() == f"again {n}", n
            finally:
                reader.kill()
                reader.communicate()
        finally:
            host.undrop("in", port)
    assert volume.sql("SELECT writer FROM cv_files WHERE path = 'plans/new.md'") == [("alice",)]
