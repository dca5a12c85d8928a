"""One working copy of a PostgreSQL volume commits paths side by side: its commit lock is a lock per
path (coherent_volume/registry/copy_locks.py), held from a decision to its install. Real PostgreSQL,
real processes paused where a test says (a hook waiting on a file), real kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume
from coherent_volume.registry import pg_registry
from coherent_volume.registry.copy_locks import PATHS
from coherent_volume.registry.pg_transaction import path_key

from .test_registry_postgresql import QUEUED_WRITER, _ask, _join, _pg_volume, _Procs, _q

PAUSED = """
import os, sys, time
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
from coherent_volume.core.writes import Writes
root, gate, where = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

def pause():
    (gate / "paused").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)

if where in ("decision", "first"):  # inside its decision's transaction, the path's locks held (the database's too)
    record = Writes._record_staged
    def paused(self, *args, **kwargs):
        record(self, *args, **kwargs)
        pause()
    Writes._record_staged = paused
else:  # between its decision's COMMIT and its install: the copy's lock of the path alone held
    install = atomic.Staged.install
    def paused(self, *args, **kwargs):
        pause()
        install(self, *args, **kwargs)
    atomic.Staged.install = paused
with CoherentVolume(root, agent="alice") as v:
    if where == "first":  # the process's first transaction: a creation
        print(v.write("plans/new.md", "alice\\n"), flush=True)
    else:
        v.read("plans/p.md")
        print(v.write("plans/p.md", "alice\\n"), flush=True)
"""


def _alice(root: Path, gate: Path, where: str) -> subprocess.Popen[str]:
    """A process of `root`'s copy writing plans/p.md, paused at `where` until `gate`/go exists."""
    gate.mkdir()
    env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}  # paused as long as the test says
    alice = subprocess.Popen(
        [sys.executable, "-c", PAUSED, str(root), str(gate), where], stdout=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 60
    while not (gate / "paused").exists():
        if alice.poll() is not None or time.monotonic() >= deadline:
            alice.kill()
            alice.wait()
            raise AssertionError(f"alice never paused (exit {alice.returncode})")
        time.sleep(0.02)
    return alice


def _in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    """`fn` run in a thread of this process: (the thread, [its result or exception] once done)."""
    done: list[Any] = []

    def run() -> None:
        try:
            done.append(fn())
        except BaseException as e:
            done.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done


def _writes(root: Path, agent: str, rel: str, text: str) -> int:
    with CoherentVolume(root, agent=agent) as v:
        v.read(rel)
        return v.write(rel, text)


@pytest.fixture
def root(tmp_path: Path, pg_url: str) -> Path:
    root = _pg_volume(tmp_path / "vol", pg_url)
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/p.md", "base\n")
        v.write("plans/q.md", "base\n")
    return root


@pytest.mark.parametrize("where", ["decision", "install"])
def test_a_writer_of_another_path_commits_while_one_of_the_same_copy_is_paused(
    root: Path, tmp_path: Path, where: str
) -> None:
    """Alice (a process of the copy) is paused inside her decision of p, or between its COMMIT and its
    install: bob, in another process of the same copy, commits q meanwhile (before, the copy's one
    lock made him wait for her); carol, writing p, waits for her and then writes over her version,
    nothing lost."""
    alice = _alice(root, tmp_path / "gate", where)
    try:
        bob, bob_done = _in_thread(lambda: _writes(root, "bob", "plans/q.md", "bob\n"))
        bob.join(20)
        assert bob_done == [2], bob_done  # committed while alice stays paused
        carol, carol_done = _in_thread(lambda: _writes(root, "carol", "plans/p.md", "carol\n"))
        carol.join(2)
        assert carol_done == []  # the same path waits for alice
        (tmp_path / "gate" / "go").touch()
        out, _ = alice.communicate(timeout=60)
        carol.join(60)
    finally:
        (tmp_path / "gate" / "go").touch()
        alice.kill()
        alice.wait()
    assert alice.returncode == 0 and out.split() == ["2"]
    assert carol_done == [3], carol_done
    with CoherentVolume(root, agent="dave") as v:
        assert v.read("plans/p.md") == b"carol\n" and v.read("plans/q.md") == b"bob\n"
        assert [(h.version, h.writer) for h in v.history("plans/p.md")] == [(3, "carol"), (2, "alice"), (1, "seed")]
    assert os.listdir(root / ".coherent" / "staging") == []


def test_a_process_paused_in_its_first_decision_holds_up_no_writer_of_another_path(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """Alice's process is paused inside the decision of its first transaction (a creation), idle in
    it: writers of other paths in the same working copy and in another one commit meanwhile, each
    waiting at most 2 s for a lock (before, that decision held the whole volume and the whole copy,
    to settle every intent and sweep the staging directory: every writer waited until the server
    ended it, 5 s later, or failed EBUSY; found by a hostile probe)."""
    other = _join(tmp_path / "other", pg_url)
    procs = _Procs()
    alice = _alice(root, tmp_path / "gate", "first")
    try:
        for copy, agent in ((root, "bob"), (other, "carol")):
            writer = procs.start(QUEUED_WRITER, str(copy), agent, "2")
            assert _ask(writer, f"plans/{agent}.md") == "ok"
        (tmp_path / "gate" / "go").touch()
        out, _ = alice.communicate(timeout=60)
    finally:
        (tmp_path / "gate" / "go").touch()
        alice.kill()
        alice.wait()
        procs.kill()
    assert alice.returncode == 0 and out.split() == ["1"]
    with CoherentVolume(root, agent="dave") as v:
        assert v.read("plans/new.md") == b"alice\n" and v.read("plans/bob.md") == b"x"
    assert os.listdir(root / ".coherent" / "staging") == []


def test_a_writer_killed_between_its_decision_and_its_install_is_recovered_while_another_path_commits(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """Alice is killed (SIGKILL) after her decision's COMMIT, before her install, while bob commits
    another path of the same copy: her version stands (recorded with its bytes), the next access of
    her path on this copy installs it and removes the staged file she left, her intent is settled."""
    alice = _alice(root, tmp_path / "gate", "install")
    try:
        bob, bob_done = _in_thread(lambda: _writes(root, "bob", "plans/q.md", "bob\n"))
        bob.join(20)
        assert bob_done == [2], bob_done
        staged = os.listdir(root / ".coherent" / "staging")
        assert len(staged) == 1  # hers, named by her intent: bob's transactions left it alone
        alice.send_signal(signal.SIGKILL)
        alice.wait()
    finally:
        alice.kill()
        alice.wait()
    assert (root / "plans/p.md").read_bytes() == b"base\n"  # never installed
    with CoherentVolume(root, agent="carol") as v:
        assert v.read("plans/p.md") == b"alice\n"
        assert v.write("plans/p.md", "carol\n") == 3
        assert [(h.version, h.writer) for h in v.history("plans/p.md")] == [(3, "carol"), (2, "alice"), (1, "seed")]
    assert os.listdir(root / ".coherent" / "staging") == []
    assert _q(pg_url, "SELECT agent FROM cv_intents WHERE agent = 'alice'") == []  # hers settled


def _below(volume: Any, than: str) -> str:
    """A managed path whose lock in the working copy sorts below `than`'s."""
    byte = PATHS + (path_key(volume, than) & (2**62 - 1))
    for n in range(1000):
        rel = f"plans/r{n}.md"
        if PATHS + (path_key(volume, rel) & (2**62 - 1)) < byte:
            return rel
    raise AssertionError("no path sorts below")


def test_a_read_set_commit_finding_a_path_held_below_its_own_takes_its_locks_again_in_order(
    root: Path, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's read set holds a path whose lock sorts below the one he writes, and alice is paused
    installing that path: his decision finds it held out of the lock order, so he lets go of his
    lock and takes both again in order, waiting for her (never a deadlock, never EBUSY), then
    decides once she is done: his read set changed, so his write is refused, nothing lost."""
    volume = _q(pg_url, "SELECT id FROM cv_volumes")[0][0]
    below = _below(volume, "plans/q.md")
    with CoherentVolume(root, agent="seed") as v:
        v.write(below, "base\n")
    monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 60.0)
    script = PAUSED.replace("plans/p.md", below)
    gate = tmp_path / "gate"
    gate.mkdir()
    env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
    with CoherentVolume(root, agent="bob", isolation="read-set") as b:
        b.read(below)
        b.read("plans/q.md")
        alice = subprocess.Popen([sys.executable, "-c", script, str(root), str(gate), "install"], text=True, env=env)
        try:
            while not (gate / "paused").exists():
                assert alice.poll() is None
                time.sleep(0.02)
            writer, done = _in_thread(lambda: b.write("plans/q.md", "bob\n"))
            writer.join(2)
            assert done == []  # waits for alice's path, in order
            (gate / "go").touch()
            assert alice.wait(60) == 0
            writer.join(60)
        finally:
            (gate / "go").touch()
            alice.kill()
            alice.wait()
    assert len(done) == 1 and getattr(done[0], "reason", None) == "read-set", done  # his read set changed
    with CoherentVolume(root, agent="carol") as v:
        assert v.read(below) == b"alice\n" and v.read("plans/q.md") == b"base\n"
