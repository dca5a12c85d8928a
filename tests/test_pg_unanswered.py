"""A PostgreSQL server that stops answering but keeps its connections (its process stopped with
SIGSTOP: the kernel still acknowledges, so no TCP timeout fires): every round trip of a process
fails within its bound (`pg_connections.ANSWER_WAIT`) with the registry's typed error, its
connection is closed and never used again, and a COMMIT whose answer never came is resolved by its
commit id, never applied twice and never reported failed when it landed. Every test resumes what it
stopped (SIGCONT) in every outcome."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg  # ./scripts/test installs it (the postgresql extra): missing, these tests fail
import pytest

from coherent_volume import CoherentVolume, RegistryError, StaleWriteError
from coherent_volume.core import leases, open_core
from coherent_volume.liveness import current_process
from coherent_volume.registry import pg_connections, pg_hosts, pg_transaction

WAIT = 3.0
"""ANSWER_WAIT in this process's tests."""
DAEMON_WAIT = 5.0
"""ANSWER_WAIT in the test mount's daemon (`bounded_mount`), shorter than the 45 s it ships with."""


def _pg_volume(root: Path, url: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    open_core(root, ("plans/**",), registry=url, volume="vol").registry.close()
    (root / "plans").mkdir(exist_ok=True)
    return root


def _q(url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query straight on the database, never through coherent_volume."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


def _backends(url: str, pid: int) -> list[int]:
    """The server processes of the sessions the process `pid` holds (its application_name)."""
    name = f"coherent-volume {socket.gethostname()} {pid}"[:63]
    return [p for (p,) in _q(url, "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _resume(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGCONT)


@contextmanager
def _stopped(pids: list[int]) -> Iterator[list[int]]:
    """`pids` stopped (SIGSTOP) inside the block, resumed (SIGCONT) in every outcome."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield pids
    finally:
        _resume(pids)


def _ended(url: str, pids: list[int], within: float = 30.0) -> bool:
    """Whether the sessions of `pids` are all gone from pg_stat_activity within `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _q(url, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (pids,)):
            return True
        time.sleep(0.1)
    return False


def _termination_pending(pid: int) -> bool:
    """Whether the (stopped) process `pid` has a SIGTERM pending: pg_terminate_backend was sent to it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in masks)


@pytest.fixture
def root(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(pg_connections, "ANSWER_WAIT", WAIT)
    monkeypatch.setattr(pg_hosts, "REPORT_AFTER", 3600.0)  # no reporting thread takes a pooled connection
    return _pg_volume(tmp_path / "vol", pg_url)


def _events(url: str) -> list[tuple[str, int]]:
    return _q(url, "SELECT kind, version FROM cv_events ORDER BY seq")


def test_a_report_on_a_session_the_server_ended_raises_no_false_alarm(
    root: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ended this process's sessions (a restart, an administrator) while its working
    copy's report was pending: the last report, at close, finds its pooled connection lost and
    leaves the report pending, with nothing logged: psycopg's "error ignored terminating Pipeline
    [BAD]: the connection is lost" was a warning about that lost connection's second failure."""
    with caplog.at_level(logging.WARNING, logger="psycopg"), CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")  # its report waits (REPORT_AFTER): it goes at close
        backends = _backends(pg_url, os.getpid())
        _q(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (backends,))
        assert _ended(pg_url, backends)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("psycopg")] == []
    assert _q(pg_url, "SELECT count(*) FROM cv_replica_holds") == [(0,)]  # pending, in the working copy
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/b.md", "one\n")  # its next report carries both
    assert _q(pg_url, "SELECT path, version FROM cv_replica_holds ORDER BY path") == [
        ("plans/a.md", 1),
        ("plans/b.md", 1),
    ]


def test_a_tracked_read_whose_server_stops_answering_fails_within_its_bound(root: Path, pg_url: str) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        assert v.read("plans/a.md") == b"one\n"  # its session is idle in this process's pool
        backends = _backends(pg_url, os.getpid())
        assert backends
        with _stopped(backends):
            started = time.monotonic()
            with pytest.raises(RegistryError) as failed:
                v.read("plans/a.md")
            took = time.monotonic() - started
        assert failed.value.errno == errno.EIO
        assert f"did not answer within {WAIT:g} s" in str(failed.value), failed.value
        assert took < 3 * WAIT, f"the read failed after {took:.1f} s"
        assert _ended(pg_url, backends), "the sessions that did not answer were closed by this process"
        assert v.read("plans/a.md") == b"one\n"  # on a new connection


def test_a_write_whose_first_round_trip_is_not_answered_writes_nothing(root: Path, pg_url: str) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        v.read("plans/a.md")
        backends = _backends(pg_url, os.getpid())
        with _stopped(backends):
            started = time.monotonic()
            with pytest.raises(RegistryError) as failed:
                v.write("plans/a.md", "two\n")
            took = time.monotonic() - started
        assert failed.value.errno == errno.EIO
        assert f"did not answer within {WAIT:g} s" in str(failed.value), failed.value
        assert took < 3 * WAIT, f"the write failed after {took:.1f} s"
        assert _ended(pg_url, backends)  # resumed, its session found the connection closed: nothing of it commits
        assert _events(pg_url) == [("commit", 1)]
        assert (root / "plans/a.md").read_bytes() == b"one\n"
        assert v.write("plans/a.md", "two\n") == 2
    assert _events(pg_url) == [("commit", 1), ("commit", 2)]


@contextmanager
def _stopped_at_commit(stop: Callable[[int], list[int]]) -> Iterator[list[int]]:
    """The next COMMIT of this process sent to a server stopped (SIGSTOP) just before it: `stop`,
    given the committing session's server process, stops what it names and returns it. Yields the
    processes it stopped (once it has), resumes them in every outcome."""
    commit = pg_transaction.PostgresTransaction.commit
    stopped: list[int] = []

    def stopping(self: pg_transaction.PostgresTransaction) -> None:
        if not stopped:
            stopped.extend(stop(self.conn.info.backend_pid))
        commit(self)

    pg_transaction.PostgresTransaction.commit = stopping  # type: ignore[method-assign]
    try:
        yield stopped
    finally:
        pg_transaction.PostgresTransaction.commit = commit  # type: ignore[method-assign]
        _resume(stopped)


def _sigstop(pids: list[int]) -> list[int]:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


LONG_IDLE = "60s"
"""idle_in_transaction_session_timeout in the COMMIT tests: with the default (5 s) a session stopped
longer than that ends its transaction as soon as it resumes, before it reads the COMMIT waiting in
its socket; a server configured otherwise (or a session stuck on its disk after it read the COMMIT)
commits it when it resumes, after the writer stopped waiting."""


def test_a_commit_not_answered_is_told_unknown_and_never_lands_once_its_session_is_ended(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committing session's server process stops with the COMMIT unread in its socket and stays
    stopped: the writer, unable to learn the outcome, says so (with the commit id) instead of
    failing or succeeding; it told that session to end, so once resumed it ends without committing:
    nothing landed, nothing was applied twice."""
    monkeypatch.setattr(pg_connections, "CONNECT_WAIT", 2.0)
    monkeypatch.setitem(pg_connections.SESSION_SETTINGS, "idle_in_transaction_session_timeout", LONG_IDLE)
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        v.read("plans/a.md")
        with _stopped_at_commit(lambda backend: _sigstop([backend])) as stopped:
            started = time.monotonic()
            with pytest.raises(RegistryError) as failed:
                v.write("plans/a.md", "two\n")
            took = time.monotonic() - started
            assert stopped and _termination_pending(stopped[0])
        message = str(failed.value)
        assert failed.value.errno == errno.EIO
        assert "outcome unknown (commit id" in message and "had not ended, though told to" in message, message
        assert took < 3 * (WAIT + 2.0), f"the write failed after {took:.1f} s"
        assert _ended(pg_url, stopped)
        commit_id = message.split("commit id ")[1].split(")")[0]
        assert _q(pg_url, "SELECT count(*) FROM cv_commits WHERE id = %s", (commit_id,)) == [(0,)]
        assert _events(pg_url) == [("commit", 1)]
        assert v.read("plans/a.md") == b"one\n"
        assert v.write("plans/a.md", "two\n") == 2
    assert _events(pg_url) == [("commit", 1), ("commit", 2)]


def test_a_commit_not_answered_whose_session_ends_while_it_is_resolved_did_not_land(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but the stopped process resumes once it was told to end (the writer is still
    resolving), or once the writer answered: it ends without committing, and the writer, seeing it
    gone and no commit of its id, says that nothing was written (had it trusted the missing commit
    id while that session lived, the COMMIT would land after it said so)."""
    monkeypatch.setattr(pg_connections, "CONNECT_WAIT", 20.0)
    monkeypatch.setitem(pg_connections.SESSION_SETTINGS, "idle_in_transaction_session_timeout", LONG_IDLE)
    answered = threading.Event()
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        v.read("plans/a.md")
        with _stopped_at_commit(lambda backend: _sigstop([backend])) as stopped:

            def resume_once_told_to_end() -> None:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not answered.is_set():
                    if stopped and _termination_pending(stopped[0]):
                        break
                    time.sleep(0.05)
                _resume(stopped)

            resumer = threading.Thread(target=resume_once_told_to_end, daemon=True)
            resumer.start()
            try:
                with pytest.raises(RegistryError) as failed:
                    v.write("plans/a.md", "two\n")
            finally:
                answered.set()
                resumer.join(60)
            assert _ended(pg_url, stopped)
        message = str(failed.value)
        assert failed.value.errno == errno.EIO
        assert f"did not answer within {WAIT:g} s" in message and "its COMMIT did not land" in message, message
        assert "nothing was written" in message
        assert _events(pg_url) == [("commit", 1)]
        assert v.write("plans/a.md", "two\n") == 2
    assert _events(pg_url) == [("commit", 1), ("commit", 2)]


def test_a_commit_whose_whole_server_stopped_lands_once_when_it_resumes_and_was_called_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole server stops (postmaster and every session) with the COMMIT unread: no new
    connection can ask how it went, so the writer says the outcome is unknown, naming the commit id.
    Resumed, the server commits it (LONG_IDLE): once, under that id, and the working copy installs
    it at its next read."""
    from .harness.mounts import serving_pids
    from .harness.pgcluster import cluster

    monkeypatch.setattr(pg_connections, "ANSWER_WAIT", WAIT)
    monkeypatch.setattr(pg_connections, "CONNECT_WAIT", 2.0)
    monkeypatch.setitem(pg_connections.LIBPQ_SETTINGS, "connect_timeout", 2)
    monkeypatch.setitem(pg_connections.SESSION_SETTINGS, "idle_in_transaction_session_timeout", LONG_IDLE)
    monkeypatch.setattr(pg_hosts, "REPORT_AFTER", 3600.0)
    with cluster(parent="/dev/shm" if os.path.isdir("/dev/shm") else None) as pg:
        pg.create_database("whole")
        url = pg.url("whole")
        root = _pg_volume(tmp_path / "vol", url)

        def the_server(_backend: int) -> list[int]:
            [postmaster] = serving_pids(pg.data)
            children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout
            return _sigstop([postmaster, *map(int, children.split())])

        with CoherentVolume(root, agent="alice") as v:
            v.write("plans/a.md", "one\n")
            v.read("plans/a.md")
            with _stopped_at_commit(the_server):
                started = time.monotonic()
                with pytest.raises(RegistryError) as failed:
                    v.write("plans/a.md", "two\n")
                took = time.monotonic() - started
            message = str(failed.value)
            assert failed.value.errno == errno.EIO
            assert "outcome unknown (commit id" in message and "unreachable" in message, message
            assert "nothing was written" not in message, message  # it landed (below): never said otherwise
            assert took < 3 * (WAIT + 2.0 + 2.0), f"the write failed after {took:.1f} s"
            commit_id = message.split("commit id ")[1].split(")")[0]
            deadline = time.monotonic() + 30
            while not _q(url, "SELECT 1 FROM cv_commits WHERE id = %s", (commit_id,)):
                assert time.monotonic() < deadline, "the COMMIT the resumed server read did not land"
                time.sleep(0.1)
            assert _events(url) == [("commit", 1), ("commit", 2)]  # once
            assert v.read("plans/a.md") == b"two\n"
            assert (root / "plans/a.md").read_bytes() == b"two\n"
            assert [h.version for h in v.history("plans/a.md")] == [2, 1]


@pytest.fixture
def bounded_mount(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """`root` mounted through the real CLI by a daemon whose ANSWER_WAIT is DAEMON_WAIT (set at its
    interpreter's start by a sitecustomize on its PYTHONPATH: the daemon is another process)."""
    from .harness.mounts import Mount

    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        f"from coherent_volume.registry import pg_connections\npg_connections.ANSWER_WAIT = {DAEMON_WAIT!r}\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")])))
    with Mount(root, tmp_path / "mnt", log_allows=[r".*did not answer within"]) as m:
        monkeypatch.delenv("PYTHONPATH")  # the daemon has it; the programs run in the mount need not
        yield m


def test_an_open_through_the_mount_whose_server_stops_answering_fails_eio_and_the_mount_serves_on(
    bounded_mount: Any, pg_url: str
) -> None:
    """The mount's daemon (ANSWER_WAIT: DAEMON_WAIT) opens a managed file for a program while the
    server processes of all its sessions are stopped: the open fails EIO within the bound, the mount
    serves meanwhile what needs no registry (an unmanaged file), and once the server resumes it
    serves that file again."""
    from .harness.mounts import daemon_pids

    mounted = bounded_mount

    assert mounted.run("alice", "mkdir -p plans && echo one > plans/a.md && echo mine > notes.txt").returncode == 0
    assert mounted.run("alice", "cat plans/a.md").stdout == "one\n"  # the daemon's sessions are open
    [daemon] = daemon_pids(mounted.path)
    backends = _backends(pg_url, daemon)
    assert backends
    with _stopped(backends):
        started = time.monotonic()
        opening = subprocess.Popen(
            ["cat", "plans/a.md"],
            cwd=mounted.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": "bob"},
        )
        try:
            time.sleep(1)
            assert opening.poll() is None  # waiting on the server
            assert (mounted.path / "notes.txt").read_text() == "mine\n"  # it serves what needs no registry
            out, err = opening.communicate(timeout=3 * DAEMON_WAIT)
        except subprocess.TimeoutExpired:
            opening.kill()  # it ends once the server resumes and the daemon answers
            out, err = "", f"no answer in {3 * DAEMON_WAIT:g} s"
        finally:
            took = time.monotonic() - started
    opening.wait(60)
    assert opening.returncode != 0 and "Input/output error" in err, (out, err)
    assert took < 3 * DAEMON_WAIT, f"the open failed after {took:.1f} s"
    deadline = time.monotonic() + 30  # resumed, the session the daemon gave up on finds its connection closed
    while len(_q(pg_url, "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s)", (backends,))) == len(backends):
        assert time.monotonic() < deadline, "no session the daemon stopped waiting for was closed"
        time.sleep(0.1)
    assert mounted.run("bob", "cat plans/a.md").stdout == "one\n"
    assert mounted.run("bob", "echo two > plans/a.md").returncode == 0
    assert (mounted.root / "plans/a.md").read_text() == "two\n"


APPEND_THEN_RETRY = r"""
import sys
path = sys.argv[1]
f = open(path, "a")
f.write("two\n")
f.flush()  # in the shadow now; committed at close
print("ready", flush=True)
sys.stdin.readline()  # the test stops the daemon's sessions
try:
    f.close()
    print("closed", flush=True)
except OSError as e:
    print(f"close failed {e.errno}", flush=True)
sys.stdin.readline()  # the test resumes them
with open(path, "a") as f:  # what a program told its close failed does: it appends again
    f.write("two\n")
print("appended again", flush=True)
"""


def _grants(url: str) -> list[tuple[Any, ...]]:
    return _q(url, "SELECT path, agent FROM cv_grants")


def _released(url: str) -> None:
    """Wait (30 s at most) until the volume holds no grant: the failed handle's release ended it."""
    deadline = time.monotonic() + 30
    while _grants(url):
        assert time.monotonic() < deadline, f"the failed handle's grant was never released: {_grants(url)}"
        time.sleep(0.1)


@contextmanager
def _bobs_program(mounted: Any, script: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """alice's plans/a.md ("one"), read by bob, and `script` run by bob in the mount on it, once it
    said "ready": (the program, the daemon's pid). The program is ended in every outcome."""
    from .harness.mounts import daemon_pids

    assert mounted.run("alice", "mkdir -p plans && echo one > plans/a.md").returncode == 0
    assert mounted.run("bob", "cat plans/a.md").stdout == "one\n"  # the daemon's sessions are open
    [daemon] = daemon_pids(mounted.path)
    program = subprocess.Popen(
        [sys.executable, "-c", script, "plans/a.md"],
        cwd=mounted.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": "bob"},
    )
    try:
        assert program.stdin is not None and program.stdout is not None
        assert program.stdout.readline().strip() == "ready"
        yield program, daemon
    finally:
        if program.poll() is None:
            program.kill()
        program.communicate()


def test_an_append_whose_close_failed_eio_never_lands_later_so_its_retry_lands_once(
    bounded_mount: Any, pg_url: str
) -> None:
    """A program appends through the mount and closes while every session of the daemon is stopped:
    close() fails EIO (nothing was written). That append must never be committed afterwards (by the
    handle's release, on a new connection, once the server answers again): the program, told
    nothing was written, appends again, and its line is in the file once."""
    mounted = bounded_mount
    with _bobs_program(mounted, APPEND_THEN_RETRY) as (program, daemon):
        assert program.stdin is not None and program.stdout is not None
        with _stopped(_backends(pg_url, daemon)):
            program.stdin.write("close\n")
            program.stdin.flush()
            assert program.stdout.readline().strip() == f"close failed {errno.EIO}"
        _released(pg_url)  # the handle's release: its grant ends (it commits nothing)
        program.stdin.write("again\n")
        program.stdin.flush()
        assert program.stdout.readline().strip() == "appended again"
        assert program.wait(timeout=30) == 0
    assert (mounted.root / "plans/a.md").read_text() == "one\ntwo\n"
    assert _events(pg_url)[-1:] == [("commit", 3)]  # alice's creation (v1), her "one" (v2), bob's append once
    assert _q(pg_url, "SELECT version, writer FROM cv_files WHERE path = 'plans/a.md'") == [(3, "bob")]
    assert "failed, so the writes its handle held were dropped" in mounted.log.read_text()


DUP_THEN_WRITE_ON = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"rewritten\n")
copy = os.dup(fd)
print("ready", flush=True)
sys.stdin.readline()  # the test stops the daemon's sessions
try:
    os.close(copy)  # a close(2) that is not the last: a FLUSH of the handle
    print("close of the copy ok", flush=True)
except OSError as e:
    print(f"close of the copy failed {e.errno}", flush=True)
sys.stdin.readline()  # the test resumes them
for call, args in ((os.write, (fd, b"more\n")), (os.fsync, (fd,)), (os.close, (fd,))):
    try:
        call(*args)
        print(f"{call.__name__} ok", flush=True)
    except OSError as e:
        print(f"{call.__name__} failed {e.errno}", flush=True)
"""


def test_a_handle_whose_close_of_a_copy_failed_commits_nothing_and_says_so_at_every_later_call(
    bounded_mount: Any, pg_url: str
) -> None:
    """A program closes a dup of its write descriptor while every session of the daemon is stopped
    (EIO: nothing was written), then, the server answering again, writes on through the other one
    and closes it. What the failed close dropped cannot land without being a lie, and what follows
    cannot land without it: the later write, fsync and close fail EIO, the file keeps its committed
    content, and the handle's grant is released (another agent writes the file at once)."""
    mounted = bounded_mount
    with _bobs_program(mounted, DUP_THEN_WRITE_ON) as (program, daemon):
        assert program.stdin is not None and program.stdout is not None
        with _stopped(_backends(pg_url, daemon)):
            program.stdin.write("close the copy\n")
            program.stdin.flush()
            assert program.stdout.readline().strip() == f"close of the copy failed {errno.EIO}"
        program.stdin.write("go on\n")
        program.stdin.flush()
        said = [program.stdout.readline().strip() for _ in range(3)]
        assert said == [f"write failed {errno.EIO}", f"fsync failed {errno.EIO}", f"close failed {errno.EIO}"]
        assert program.wait(timeout=30) == 0
    assert (mounted.root / "plans/a.md").read_text() == "one\n"
    _released(pg_url)
    assert _q(pg_url, "SELECT version, writer FROM cv_files WHERE path = 'plans/a.md'") == [(2, "alice")]
    written = mounted.run("carol", "cat plans/a.md > /dev/null && echo carol > plans/a.md")
    assert written.returncode == 0, written.stderr
    assert (mounted.root / "plans/a.md").read_text() == "carol\n"


def test_a_mounts_listener_whose_session_stops_answering_reconnects_and_brings_in_what_it_missed(
    bounded_mount: Any, pg_url: str, tmp_path: Path
) -> None:
    """The server process of the mount's LISTEN session is stopped (SIGSTOP): it sends nothing and
    keeps its connection, so only a check of a quiet connection finds it lost. A commit made then
    in another working copy of the volume reaches the mounted copy (its disk and `ls` through the
    mount, with no read of the file) within SEEN_EVERY + the daemon's ANSWER_WAIT and the reconnect,
    and the daemon logs why it connected again."""
    from .harness.mounts import daemon_pids

    mounted = bounded_mount
    assert mounted.run("alice", "mkdir -p plans && echo one > plans/a.md").returncode == 0
    other = tmp_path / "other"
    other.mkdir()
    open_core(other, registry=pg_url, volume="vol").registry.close()  # joins the volume
    [daemon] = daemon_pids(mounted.path)
    name = f"coherent-volume {socket.gethostname()} {daemon}"[:63]
    listening = "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND query LIKE 'LISTEN %%'"
    [(listener,)] = _q(pg_url, listening, (name,))
    bound = pg_hosts.SEEN_EVERY + DAEMON_WAIT + 10.0  # quiet that long, no answer, then reconnect and resync
    with _stopped([listener]):
        with CoherentVolume(other, agent="carol") as v:
            v.write("plans/new.md", "new in the other copy\n")
        started = time.monotonic()
        while not (mounted.root / "plans/new.md").exists():
            assert time.monotonic() - started < bound, (
                "the commit never reached the mounted copy:\n" + mounted.log.read_text()
            )
            time.sleep(0.1)
        took = time.monotonic() - started
    print(f"reached the mounted copy {took:.1f} s after the commit")
    assert (mounted.root / "plans/new.md").read_text() == "new in the other copy\n"
    assert "new.md" in mounted.run("bob", "ls plans").stdout.split()
    log = mounted.log.read_text()
    assert f"quiet for {pg_hosts.SEEN_EVERY:g} s and did not answer a check" in log, log
    assert f"did not answer within {DAEMON_WAIT:g} s" in log, log
    [(again,)] = _q(pg_url, listening, (name,))
    assert again != listener  # listening on a session of its own again


def test_a_handle_release_the_server_does_not_answer_stops_renewing_its_grant(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The release of an open write handle's grant (as the mount's RELEASE makes it) fails: the
    server does not answer. The grant stays in the registry, but this process renews it no more, so
    it lapses within one lease and another agent writes the file; renewed on, it would keep the
    path from everyone for as long as the process lives."""
    monkeypatch.setattr(leases, "HANDLE_LEASE", 2.0)
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
    core = open_core(root)
    try:
        target = core.resolve("plans/a.md")
        grant, _ = core.begin_write("bob", target, current_process(), kind="append")
        with _stopped(_backends(pg_url, os.getpid())), pytest.raises(RegistryError) as failed:
            core.release(grant, "append", log=False)
        assert f"did not answer within {WAIT:g} s" in str(failed.value), failed.value
        with CoherentVolume(root, agent="carol") as v:
            v.read("plans/a.md")
            deadline = time.monotonic() + 5 * leases.HANDLE_LEASE
            while True:
                try:
                    assert v.write("plans/a.md", "carol\n") == 2
                    break
                except StaleWriteError as e:
                    assert e.reason == "held" and time.monotonic() < deadline, f"still held by bob: {e}"
                    time.sleep(0.2)
    finally:
        core.close()
