"""The registry's locks under real processes: fork, kill -9, racing creators, huge inode numbers.

Real subprocesses, real SQLite files, real flock, real kill -9, real overlayfs. Every wait is
bounded and every process a test starts is killed and reaped before it returns.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume
from coherent_volume.fingerprint import Fingerprint
from coherent_volume.globs import ManagedGlobs
from coherent_volume.liveness import start_time
from coherent_volume.protocol import FileRecord
from coherent_volume.registry import Transaction
from coherent_volume.registry.sqlite import SQLiteRegistry

from .conftest import REPO, run_py

P = "plans/plan.md"


class Lines:
    """The stdout lines of a process, read by a thread so that every wait for one is bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def next(self, timeout: float = 30) -> str:
        try:
            line = self._q.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from pid {self.proc.pid} within {timeout} s") from None
        if line is None:
            err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
            raise AssertionError(f"pid {self.proc.pid} ended without the expected line: {err}")
        return line


def _gone(pid: int, timeout: float) -> bool:
    """Whether `pid` is dead (gone or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) is None:
            return True
        time.sleep(0.01)
    return False


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


# A subreaper: runs argv, adopts the orphans its descendants leave, and on EOF on its stdin
# kills and reaps every child it has (so a forked grandchild never lingers as a zombie).
REAPER = r"""
import ctypes, os, signal, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
sys.stdin.read()
def children():
    out = []
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out
for pid in children():
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
"""

FORK_THEN_HOLD = r"""
import multiprocessing, os, sys, time
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent="parent")
vol.write("plans/before.md", b"written before the fork")
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(3600,))
child.start()
print(os.getpid(), child.pid, flush=True)
with vol._core.registry.commit_lock():
    print("locked", flush=True)
    time.sleep(3600)
"""

THIRD_WRITER = r"""
import sys, time
from coherent_volume import CoherentVolume
t = time.monotonic()
with CoherentVolume(sys.argv[1], agent="third") as v:
    v.write("plans/after.md", b"the third writer")
print(f"{time.monotonic() - t:.3f}", flush=True)
"""


def test_a_forked_child_does_not_keep_the_commit_lock_of_its_killed_parent(root: Path) -> None:
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, sys.executable, "-c", FORK_THEN_HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        lines = Lines(reaper)
        parent, child = map(int, lines.next().split())
        assert lines.next() == "locked"
        os.kill(parent, signal.SIGKILL)
        assert _gone(parent, 10), "the parent survived kill -9"
        try:
            third = subprocess.run(
                [sys.executable, "-c", THIRD_WRITER, str(root)],
                capture_output=True,
                text=True,
                check=False,
                timeout=10,
                cwd=REPO,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(
                "a writer still waits for the commit lock 10 s after its holder was killed: the forked child kept it"
            )
        assert third.returncode == 0, third.stderr
        assert float(third.stdout) < 5
        assert start_time(child) is not None, "the forked child must still be alive for this test to mean anything"
        assert (root / "plans/after.md").read_bytes() == b"the third writer"
    finally:
        if reaper.stdin:
            reaper.stdin.close()
        try:
            reaper.wait(timeout=30)
        finally:
            _stop(reaper)


HOLDER = r"""
import sys, time
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent="holder")
with vol._core.registry.commit_lock():
    print("locked", flush=True)
    time.sleep(3600)
"""

WAITER = r"""
import json, sys, time
from coherent_volume import CoherentVolume, RegistryError
from coherent_volume.registry import sqlite as sqlite_registry
sqlite_registry.COMMIT_LOCK_TIMEOUT = 1.0
vol = CoherentVolume(sys.argv[1], agent="waiter")
t = time.monotonic()
try:
    vol.write("plans/plan.md", b"blocked")
    print(json.dumps({"outcome": "written"}))
except RegistryError as e:
    print(json.dumps({"outcome": "error", "errno": e.errno, "message": str(e), "after": time.monotonic() - t}))
"""


def test_the_wait_for_the_commit_lock_is_bounded_and_names_the_holder(root: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert Lines(holder).next() == "locked"
        try:
            waiter = subprocess.run(
                [sys.executable, "-c", WAITER, str(root)],
                capture_output=True,
                text=True,
                check=False,
                timeout=20,
                cwd=REPO,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("the wait for a held commit lock is not bounded")
        assert waiter.returncode == 0, waiter.stderr
        result = json.loads(waiter.stdout)
        assert result["outcome"] == "error" and result["errno"] == errno.EBUSY
        assert 1.0 <= result["after"] < 10
        message = result["message"]
        assert str(root / ".coherent/commit.lock") in message
        assert f"pid {holder.pid}" in message, message
        assert holder.poll() is None, "the error came while the lock was still held"
    finally:
        _stop(holder)
    assert not (root / P).exists(), "nothing was written"
    with CoherentVolume(root, agent="after") as v:
        assert v.write(P, b"once the holder is gone") == 1


# libc's fork() runs none of Python's at-fork handlers: this child keeps the lock's open file.
LIBC_FORK_THEN_HOLD = r"""
import ctypes, os, sys, time
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent="parent")
with vol._core.registry.commit_lock():
    child = ctypes.CDLL(None).fork()
    if child == 0:
        time.sleep(3600)
        os._exit(0)
    print(os.getpid(), child, flush=True)
    time.sleep(3600)
"""


def test_a_lock_kept_by_an_inheriting_process_is_reported_with_who_has_it(root: Path) -> None:
    reaper = subprocess.Popen(
        [sys.executable, "-c", REAPER, sys.executable, "-c", LIBC_FORK_THEN_HOLD, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        parent, child = map(int, Lines(reaper).next().split())
        os.kill(parent, signal.SIGKILL)
        assert _gone(parent, 10), "the parent survived kill -9"
        try:
            waiter = subprocess.run(
                [sys.executable, "-c", WAITER, str(root)],
                capture_output=True,
                text=True,
                check=False,
                timeout=20,
                cwd=REPO,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("the wait for a commit lock kept by an inheriting process is not bounded")
        assert waiter.returncode == 0, waiter.stderr
        result = json.loads(waiter.stdout)
        assert result["outcome"] == "error" and result["errno"] == errno.EBUSY
        message = result["message"]
        assert f"names pid {parent}, which has exited" in message, message
        assert f"pid {child} (" in message, message
        assert "fuser -v" in message
    finally:
        if reaper.stdin:
            reaper.stdin.close()
        try:
            reaper.wait(timeout=30)
        finally:
            _stop(reaper)


OPENER = r"""
import os, sys, time
from coherent_volume import CoherentVolume
base, rounds, agent = sys.argv[1], int(sys.argv[2]), sys.argv[3]
for r in range(rounds):  # each round a brand-new volume, created by every opener at once
    root, go = f"{base}/vol{r}", f"{base}/go{r}"
    open(go + "." + agent, "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit(f"no go signal for round {r} within 60 s")
        time.sleep(0.0005)
    CoherentVolume(root, managed=("plans/**",), agent=agent).close()
    print("ok", r, flush=True)
"""


def _line_within(proc: subprocess.Popen[str], seconds: float) -> str | None:
    """The next line `proc` prints within `seconds` (stripped; "" at its end), or None."""
    assert proc.stdout is not None
    if not select.select([proc.stdout], [], [], seconds)[0]:
        return None
    return proc.stdout.readline().strip()


def test_processes_creating_a_brand_new_volume_at_once_all_succeed(tmp_path: Path) -> None:
    """Each round, every opener process creates the same brand-new volume at the same instant (one
    process per opener for all the rounds: the race is between processes, not their start)."""
    n, rounds = 10, 10
    for r in range(rounds):
        (tmp_path / f"vol{r}").mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, str(tmp_path), str(rounds), f"a{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for i in range(n)
    ]
    try:
        for r in range(rounds):
            go = tmp_path / f"go{r}"
            deadline = time.monotonic() + 60
            while not all(Path(f"{go}.a{i}").exists() for i in range(n)):
                assert time.monotonic() < deadline, f"round {r}: the openers were not ready within 60 s"
                assert all(p.poll() is None for p in procs), f"round {r}: an opener died before the start"
                time.sleep(0.01)
            go.touch()
            answers = [_line_within(p, 60) for p in procs]
            if answers != [f"ok {r}"] * n:
                for p in procs:
                    _stop(p)
                errors = [p.stderr.read().strip()[-300:] if p.stderr else "" for p in procs]
                raise AssertionError(f"round {r}: {answers}; stderr: {errors}")
            with CoherentVolume(tmp_path / f"vol{r}", agent="check") as v:
                assert v.managed == ("plans/**",)
        failures = []
        for i, p in enumerate(procs):
            _, err = p.communicate(timeout=60)
            if p.returncode != 0:
                failures.append(f"a{i}: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
        assert not failures, failures
    finally:
        for p in procs:
            _stop(p)


def test_opening_a_volume_again_in_a_process_that_has_it_open_loses_none_of_its_commits(root: Path) -> None:
    """Opening with managed globs asks whether the registry is a WAL database yet. Read from the file
    itself, that closed a descriptor of it, which drops every POSIX lock the process holds on it, its
    open connection's too: another process closing its last connection then deleted the write-ahead
    log under that connection, and its next commit reached no other process (which saw the file's
    new content as a change made outside the volume)."""
    alice = CoherentVolume(root, agent="alice")
    bob = CoherentVolume(root, managed=("plans/**", "*.md"), agent="bob")
    try:
        alice.write(P, b"one")
        carol = run_py(
            "import sys\nfrom coherent_volume import CoherentVolume\n"
            "with CoherentVolume(sys.argv[1], agent='carol') as v:\n    v.write('plans/other.md', b'x')",
            str(root),
        )
        assert carol.returncode == 0, carol.stderr
        alice.write(P, b"two")
        seen = run_py(
            "import sys\nfrom coherent_volume import CoherentVolume\n"
            "with CoherentVolume(sys.argv[1], agent='dave') as v:\n"
            "    print([(h.version, h.writer) for h in v.history(sys.argv[2])])",
            str(root),
            P,
        )
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.strip() == "[(2, 'alice'), (1, 'alice')]"
    finally:
        bob.close()
        alice.close()


def test_a_busy_error_that_came_at_once_does_not_claim_a_long_wait(tmp_path: Path) -> None:
    reg = SQLiteRegistry(str(tmp_path / "reg"), ManagedGlobs.of(["plans/**"]))
    try:
        a = sqlite3.connect(tmp_path / "reg/registry.db", isolation_level=None, timeout=10)
        b = sqlite3.connect(tmp_path / "reg/registry.db", isolation_level=None, timeout=10)
        a.execute("BEGIN")
        a.execute("SELECT count(*) FROM files").fetchone()  # a read snapshot...
        b.execute("INSERT INTO meta (key, value) VALUES ('x', 'y')")  # ...that another writer makes stale
        started = time.monotonic()
        with pytest.raises(sqlite3.OperationalError) as info:
            a.execute("INSERT INTO meta (key, value) VALUES ('z', 'w')")  # SQLite does not wait here
        assert time.monotonic() - started < 1
        a.execute("ROLLBACK")
        a.close()
        b.close()
        error = reg._error(info.value, started)
        assert error.errno == errno.EBUSY
        assert "stayed locked" not in str(error) and "more than" not in str(error), str(error)
        assert "SQLITE_BUSY_SNAPSHOT" in str(error)
    finally:
        reg.close()


# ---- inode numbers of 2**63 and more (GlusterFS, overlayfs with xino) ----------------------

HUGE = (0, 2**63 - 1, 2**63, 2**64 - 5, 2**64 - 1)


def _record(path: str, ino: int) -> FileRecord:
    return FileRecord(
        path,
        1,
        True,
        "0" * 32,
        Fingerprint(ino, 3, 1_700_000_000_000_000_000, 1_700_000_000_000_000_001),
        "alice",
        1_700_000_000.5,
        1_700_000_000_000_000_002,
    )


def test_inode_numbers_up_to_2_64_round_trip_through_the_registry(tmp_path: Path) -> None:
    reg = SQLiteRegistry(str(tmp_path / "reg"), ManagedGlobs.of(["plans/**"]))
    try:
        records = [_record(f"plans/f{i}", ino) for i, ino in enumerate(HUGE)]

        def put_all(tx: Transaction) -> None:
            for r in records:
                tx.put_file(r)

        reg.transact(put_all)
        with reg.read() as tx:
            assert [tx.file(r.path) for r in records] == records
            assert list(tx.files()) == records
        assert reg.peek("plans/f3", "alice") == (records[3], None)
        touched = _record("plans/f0", 2**64 - 5)
        reg.transact(lambda tx: tx.touch_file("plans/f0", touched))
        with reg.read() as tx:
            assert tx.file("plans/f0") == touched
    finally:
        reg.close()
    reopened = SQLiteRegistry(str(tmp_path / "reg"), None)
    try:
        with reopened.read() as tx:
            assert tx.file("plans/f3") == records[3]
    finally:
        reopened.close()


# On overlayfs with xino=on, a file of a lower layer on another file system reports an inode
# number with bit 63 set. The whole thing runs in a private mount namespace: when the process
# ends, its mounts are gone.
OVERLAY = r"""
set -e
d=$1
mkdir -p "$d/lower" "$d/upper" "$d/vol"
mount -t tmpfs lower "$d/lower"
mount -t tmpfs upper "$d/upper"
mkdir -p "$d/lower/l/plans" "$d/upper/u" "$d/upper/w"
printf 'from the lower layer' > "$d/lower/l/plans/plan.md"
mount -t overlay overlay -o "lowerdir=$d/lower/l,upperdir=$d/upper/u,workdir=$d/upper/w,xino=on" "$d/vol" || exit 77
exec "$2" -c "$3" "$d/vol"
"""

ON_OVERLAY = r"""
import os, sys
from coherent_volume import CoherentVolume
root = sys.argv[1]
ino = os.stat(os.path.join(root, "plans/plan.md")).st_ino
if ino < 2**63:
    sys.exit(77)
with CoherentVolume(root, managed=("plans/**",), agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
    assert alice.read("plans/plan.md") == b"from the lower layer"
    assert alice.version("plans/plan.md") == 1
    assert bob.read("plans/plan.md") == b"from the lower layer"
    os.utime(os.path.join(root, "plans/plan.md"))  # copied up, keeps its huge inode: a new fingerprint
    assert os.stat(os.path.join(root, "plans/plan.md")).st_ino >= 2**63
    assert bob.read("plans/plan.md") == b"from the lower layer" and bob.version("plans/plan.md") == 1
    assert alice.write("plans/plan.md", b"alice's version") == 2
    assert bob.stale() == ["plans/plan.md"]
    print("ok", ino)
"""


def test_a_volume_whose_files_have_inode_numbers_of_2_63_and_more(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount an overlay in a private mount namespace")
    try:
        run = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                OVERLAY,
                "sh",
                str(tmp_path),
                sys.executable,
                ON_OVERLAY,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the overlay volume did not finish within 60 s")
    if run.returncode == 77:
        pytest.skip(f"overlayfs with xino=on gives no inode number >= 2**63 here: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ok ")


def test_a_child_forked_inside_a_transaction_leaves_it_cleanly_and_the_parent_goes_on(root: Path) -> None:
    from coherent_volume.core import open_core

    core = open_core(root)
    try:
        pid = -1
        try:
            with core.registry.read() as tx:
                pid = os.fork()
                tx.intents()
        except BaseException:
            if pid == 0:
                os._exit(1)  # the child failed to leave the block
            raise
        if pid == 0:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        with CoherentVolume(root, agent="alice") as vol:  # the parent's registry still works
            assert vol.write("plans/a.md", "after the fork\n") == 1
    finally:
        core.close()


class _Interrupting:
    """`time` for the registry's module whose `monotonic` raises KeyboardInterrupt once, when a
    transaction's end asks it, before its COMMIT: a Ctrl-C landing between its statements."""

    def __init__(self) -> None:
        self.raised = False

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    def monotonic(self) -> float:
        if not self.raised and sys._getframe(1).f_code.co_name == "__exit__":
            self.raised = True
            raise KeyboardInterrupt
        return time.monotonic()


@pytest.mark.parametrize("where", ["after BEGIN", "before COMMIT"])
def test_a_transaction_cut_off_by_an_interrupt_holds_no_lock_and_wedges_nothing(
    root: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt (Ctrl-C in an agent's loop or a REPL) between a transaction's BEGIN and its
    end left it open: that CoherentVolume refused every later call ("cannot start a transaction
    within a transaction") and every other process's write waited 10 s for SQLite's lock and
    failed, until the process exited (/tmp/s33api 2, with real SIGINTs). The cut-off transaction
    is rolled back: the same object and another process go on at once."""
    from coherent_volume.registry import sqlite as registry_sqlite

    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, "one\n")
        if where == "after BEGIN":
            real = registry_sqlite.SQLiteTransaction
            calls = []

            def cut(conn: sqlite3.Connection) -> object:
                if conn.in_transaction and not calls:  # (a peek runs no transaction)
                    calls.append(1)
                    raise KeyboardInterrupt  # BEGIN IMMEDIATE ran: SQLite's write lock is held
                return real(conn)

            monkeypatch.setattr(registry_sqlite, "SQLiteTransaction", cut)
        else:
            monkeypatch.setattr(registry_sqlite, "time", _Interrupting())
        with pytest.raises(KeyboardInterrupt):
            alice.write(P, "two\n")
        monkeypatch.undo()
        assert alice.read(P) in (b"one\n", b"two\n")
        r = run_py(
            f"from coherent_volume import CoherentVolume as V\n"
            f"with V({str(root)!r}, agent='bob') as b:\n"
            f"    b.read({P!r}); print(b.write({P!r}, 'bob\\n'))",
            timeout=60,
        )
        assert r.returncode == 0, r.stderr  # (a wedged lock made it wait 10 s, then fail)
        assert alice.read(P) == b"bob\n"
        alice.write(P, "three\n")


def test_an_interrupt_right_after_the_commit_lock_was_taken_leaves_it_held_by_no_idle_process(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt landing between taking the commit lock's flock and counting the block left
    the flock held while the process sat idle, so every other process's commit waited 30 s and
    failed until it exited (/tmp/s33r2api 1). The flock goes with the interrupt."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, "one\n")
        real, cut = SQLiteRegistry._lock_commits, []

        def interrupted(self: SQLiteRegistry, started: float) -> None:
            real(self, started)
            if not cut:
                cut.append(1)
                raise KeyboardInterrupt

        monkeypatch.setattr(SQLiteRegistry, "_lock_commits", interrupted)
        with pytest.raises(KeyboardInterrupt):
            alice.write(P, "two\n")
        monkeypatch.undo()
        r = run_py(  # alice's process idles meanwhile, its volume open
            f"from coherent_volume import CoherentVolume as V\n"
            f"with V({str(root)!r}, agent='bob') as b:\n"
            f"    b.read({P!r}); print(b.write({P!r}, 'bob\\n'))",
            timeout=60,
        )
        assert r.returncode == 0, r.stderr  # (it waited 30 s for the lock and failed)
        alice.read(P)
        alice.write(P, "three\n")
