"""Several hosts share one PostgreSQL volume, each through its own working copy (API and CLI faces).

Real parts: a private PostgreSQL cluster listening on the bridge of a bed of three namespace hosts
(network, UTS, mount and PID namespaces; tests/harness/nethosts.py), each host with its own root
made by `coherent-volume init` run in it; agents are Python processes started in the hosts; faults
are real (kill -9, a link taken down, `rm -rf`, a shell writing a managed file). The decision rule
"behind / foreign / same" (`protocol.local_state`) has unit tests at the end.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coherent_volume.fingerprint import Fingerprint
from coherent_volume.protocol import FileRecord, Installed, Local, installed_needs_hash, local_state

from .harness import REPO, child
from .harness.hostbed import PY, BedVolume, Hosts, init, needs_bed, three_hosts
from .harness.nethosts import process_state

pytestmark = needs_bed

KILLED_AFTER_COMMIT = r"""
import os, signal, sys
from coherent_volume import CoherentVolume
from coherent_volume.atomic import Staged
vol = CoherentVolume(sys.argv[1], agent="killed")
vol.read(sys.argv[2])
def killed(self, *args, **kwargs):  # the fault point: the commit's transaction committed, its local install not begun
    os.kill(os.getpid(), signal.SIGKILL)
Staged.install = killed
vol.write(sys.argv[2], sys.argv[3])
"""

PAUSED_COMMITTER = r"""
import json, os, signal, sys, time
from coherent_volume import CoherentVolume, RegistryError
from coherent_volume.atomic import Staged
from coherent_volume.registry.pg_transaction import PostgresTransaction
root, path, at, gate = sys.argv[1:5]
vol = CoherentVolume(root, agent="bob")
vol.read(path)
paused = []
def pause():
    if not paused:
        paused.append(1)
        print(json.dumps({"paused": os.getpid()}), flush=True)
        if gate == "-":
            os.kill(os.getpid(), signal.SIGSTOP)
        while gate != "-" and not os.path.exists(gate):
            time.sleep(0.01)
if at == "its transaction":  # its first round trip made (its locks taken, its decision read)
    commit = PostgresTransaction.commit
    def before_commit(self):
        pause()
        commit(self)
    PostgresTransaction.commit = before_commit
else:  # its COMMIT made, its local install not begun
    install = Staged.install
    def before_install(self, *args, **kwargs):
        pause()
        return install(self, *args, **kwargs)
    Staged.install = before_install
try:
    out = {"version": vol.write(path, "bob's\n")}
except RegistryError as e:
    out = {"error": type(e).__name__, "message": str(e), "errno": e.errno}
print(json.dumps(out), flush=True)
"""
"""bob's commit of PATH on his working copy, paused once at AT (its transaction, between its first
round trip and its COMMIT; or its install, after its COMMIT): SIGSTOP of itself when GATE is "-",
else until the file GATE exists (argv: root, path, at, gate)."""


# ---- the bed: three hosts, one PostgreSQL, one volume with a working copy on each host ------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    yield from three_hosts()


@pytest.fixture
def volume(hosts: Hosts, tmp_path: Path) -> Iterator[BedVolume]:
    with BedVolume(hosts, tmp_path) as v:
        yield v


# ---- agents on three hosts ---------------------------------------------------------------------------


def test_agents_on_three_hosts_read_the_latest_version_and_stale_writes_are_refused(volume: BedVolume) -> None:
    alice, bob, carol = volume.agent(1, "alice"), volume.agent(2, "bob"), volume.agent(3, "carol")
    h1, h2, h3 = volume.roots
    assert alice.write("plans/a.md", "one\n")["version"] == 1
    assert not (h2 / "plans/a.md").exists()  # nothing installed on the other hosts yet
    assert bob.read("plans/a.md") == "one\n"  # installed from the registry, then served
    assert (h2 / "plans/a.md").read_text() == "one\n"
    assert bob.write("plans/a.md", "two\n")["version"] == 2
    late = alice.write("plans/a.md", "alice's late edit\n")
    assert (late["refused"], late["current"]) == ("stale", 2)
    assert (h1 / "plans/a.md").read_text() == "two\n"  # refused, its working copy brought up to date meanwhile
    assert carol.read("plans/a.md") == "two\n"
    assert alice.read("plans/a.md") == "two\n"
    assert alice.write("plans/a.md", "three\n")["version"] == 3
    assert bob.write("plans/a.md", "bob's late edit\n")["refused"] == "stale"
    assert carol.write("plans/a.md", "carol's late edit\n")["refused"] == "stale"
    assert [carol.read("plans/a.md"), bob.read("plans/a.md")] == ["three\n", "three\n"]
    assert volume.sql("SELECT agent, version FROM cv_views ORDER BY agent") == [
        ("alice", 3),
        ("bob", 3),
        ("carol", 3),
    ]
    assert [(h1 / "plans/a.md").read_text(), (h2 / "plans/a.md").read_text(), (h3 / "plans/a.md").read_text()] == [
        "three\n"
    ] * 3
    # each working copy keeps its own fingerprints: none is in the database
    columns = {
        r[0] for r in volume.sql("SELECT column_name FROM information_schema.columns WHERE table_name = 'cv_files'")
    }
    assert not columns & {"ino", "mtime_ns", "ctime_ns", "checked_ns"}
    assert sorted(r[0] for r in volume.sql("SELECT hostname FROM cv_replicas")) == ["h1", "h2", "h3"]


def test_the_cli_joins_with_every_file_installed(volume: BedVolume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    alice.write("plans/deep/b.md", "two\n")
    host = volume.hosts[1]
    late = volume.roots[1].parent / "late"
    init(host.run, late, volume.url, create=False)
    assert (late / "plans/a.md").read_text() == "one\n" and (late / "plans/deep/b.md").read_text() == "two\n"


# ---- a contention sweep over three hosts, judged by the history checker -----------------------------------


def test_a_contention_sweep_over_three_hosts_passes_the_history_checker(volume: BedVolume, tmp_path: Path) -> None:
    from .harness import checker
    from .harness.history import History
    from .harness.resolve import log_versions, resolve
    from .harness.sweeps import load_records, wait_all
    from .harness.volumes import audit_pg_store, final_state, read_log, seed
    from .harness.workers import Workload, process_config

    root = volume.roots[0]
    paths = ["plans/counter.md"]
    producers = seed(root, paths)  # from the test's own namespace: one more host, in effect
    records = tmp_path / "records"
    records.mkdir()
    work = Workload(paths, attempts=20)
    procs = [
        volume.hosts[n].popen(
            child(
                "workers",
                process_config("api", volume.roots[n], f"h{n + 1}-{i}", work, records / f"h{n}{i}.jsonl", 3 * n + i),
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
        for i in range(2)
    ]
    errors = wait_all(procs, 300)
    assert not errors, errors
    attempts = load_records(records)
    volume.agent(1, "harness-final").read(paths[0])  # the working copy on h1 is brought up to date
    final, versions = final_state(root, paths)
    events = read_log(root)
    store = audit_pg_store(volume.sql, root, paths)
    problems = resolve(attempts, events)
    history = History("file", True, producers, attempts, set(), final, versions, log_versions(events), store=store)
    verdict = checker.check(history)
    assert not problems, problems
    assert verdict.ok, verdict.messages
    accepted = sum(1 for a in attempts if a.committed)
    assert accepted > 0 and versions["plans/counter.md"] == accepted + 1  # the seed, then one per accepted commit
    assert any(a.reason == "stale" for a in attempts), "the agents contended: some writes were refused"
    writers = {e["agent"].split("-")[0] for e in events if e["kind"] == "commit" and e["agent"] != "harness-seed"}
    assert writers == {"h1", "h2", "h3"}, "every host committed"


# ---- faults -----------------------------------------------------------------------------------------------


def test_a_wiped_working_copy_converges_on_the_next_read(volume: BedVolume) -> None:
    alice, carol = volume.agent(1, "alice"), volume.agent(3, "carol")
    alice.write("plans/a.md", "one\n")
    alice.write("plans/b.md", "bee\n")
    assert carol.read("plans/a.md") == "one\n"
    h3 = volume.roots[2]
    wiped = volume.hosts[2].run(["rm", "-rf", str(h3 / "plans")])
    assert wiped.returncode == 0 and not (h3 / "plans").exists()
    assert carol.read("plans/a.md") == "one\n"  # a missing file is one not installed: no deletion recorded
    assert carol.read("plans/b.md") == "bee\n"
    assert (h3 / "plans/a.md").read_text() == "one\n" and (h3 / "plans/b.md").read_text() == "bee\n"
    assert carol.write("plans/a.md", "carol's\n")["version"] == 2  # her view survived the wipe
    assert alice.read("plans/a.md") == "carol's\n"
    assert volume.sql("SELECT count(*) FROM cv_versions WHERE kind = 'delete'") == [(0,)]


def test_a_foreign_write_on_a_lagging_host_is_recorded_and_nothing_is_lost(volume: BedVolume) -> None:
    alice, bob = volume.agent(1, "alice"), volume.agent(2, "bob")
    alice.write("plans/a.md", "one\n")
    assert bob.read("plans/a.md") == "one\n"
    alice.write("plans/a.md", "two\n")  # h2's working copy is behind now
    h2 = volume.roots[1]
    shell = volume.hosts[1].run(["sh", "-c", f"printf 'edited on h2\\n' > {h2 / 'plans/a.md'}"])  # no volume in it
    assert shell.returncode == 0
    assert bob.read("plans/a.md") == "edited on h2\n"  # the disk wins, visibly
    assert bob.do("history", "plans/a.md")["history"] == [
        [3, "foreign", "external"],
        [2, "commit", "alice"],
        [1, "commit", "alice"],
    ]
    events = volume.sql(
        "SELECT kind, agent, seen_version, version, detail FROM cv_events WHERE version = 3 ORDER BY seq"
    )
    assert [e[:4] for e in events] == [("foreign", "external", 1, 3), ("clobber", "external", 1, 3)]
    assert "host h2" in events[0][4] and "never had" in events[1][4] and "v2 by alice" in events[1][4]
    assert alice.read("plans/a.md") == "edited on h2\n"
    # nothing lost: alice's v2 is still there to read, diff or restore
    contents = volume.sql("SELECT c.data FROM cv_versions v JOIN cv_contents c ON c.hash = v.hash WHERE v.version = 2")
    assert [bytes(r[0]) for r in contents] == [b"two\n"]


def test_a_writer_killed_after_commit_before_its_install_leaves_its_host_behind_healed_at_the_next_read(
    volume: BedVolume,
) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2 = volume.roots[1]
    killed = volume.hosts[1].run(
        [PY, "-c", KILLED_AFTER_COMMIT, str(h2), "plans/a.md", "two\n"], capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -9, killed.stderr
    assert (h2 / "plans/a.md").read_text() == "one\n"  # its host is behind
    assert alice.read("plans/a.md") == "two\n"  # every other host sees the commit
    bob = volume.agent(2, "bob")
    assert bob.read("plans/a.md") == "two\n"  # healed at the next read
    assert (h2 / "plans/a.md").read_text() == "two\n"
    assert bob.do("history", "plans/a.md")["history"] == [[2, "commit", "killed"], [1, "commit", "alice"]]
    # the registry holds the content: its intent is settled silently, a copy that lacks it is behind
    assert volume.sql("SELECT reason FROM cv_events WHERE kind = 'recover'") == []
    assert volume.sql("SELECT count(*) FROM cv_intents") == [(0,)]
    assert os.listdir(h2 / ".coherent/staging") == [], "its staged file was removed"


def test_a_partitioned_host_fails_closed_with_a_typed_error_and_works_after_the_heal(volume: BedVolume) -> None:
    alice, bob = volume.agent(1, "alice"), volume.agent(2, "bob")
    alice.write("plans/a.md", "one\n")
    assert bob.read("plans/a.md") == "one\n"
    h2 = volume.hosts[1]
    h2.partition()
    try:
        refused = bob.do("write", "plans/a.md", "written while cut off\n", timeout=60)
        assert refused["error"] == "RegistryError" and "unreachable" in refused["message"], refused
        assert refused["errno"] == errno.EIO and "nothing was written" in refused["message"]
        assert refused["seconds"] < 40, refused  # bounded: tcp_user_timeout 10 s, a reconnect for 10 s
        print(f"partitioned write refused after {refused['seconds']:.1f} s")
        assert (volume.roots[1] / "plans/a.md").read_text() == "one\n"  # nothing written locally
        assert alice.write("plans/a.md", "two\n")["version"] == 2  # the other hosts go on
    finally:
        h2.heal()
    assert bob.read("plans/a.md") == "two\n"
    assert bob.write("plans/a.md", "three\n")["version"] == 3
    assert alice.read("plans/a.md") == "three\n"


# ---- the locks in the database: a transaction's, never a session's ----------------------------------------


@contextlib.contextmanager
def _paused_committer(volume: BedVolume, at: str, gate: str) -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    """bob's PAUSED_COMMITTER on h2, once paused: (its process, its root-namespace pid, its pid in
    h2); killed at the end if it is still there (a test that failed)."""
    h2 = volume.hosts[1]
    bob = h2.popen(
        [PY, "-c", PAUSED_COMMITTER, str(volume.roots[1]), "plans/a.md", at, gate],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    pid = None
    try:
        assert bob.stdout is not None
        line = bob.stdout.readline()
        assert line, bob.communicate()[1][-3000:]
        pid = h2.pid_of(bob)
        if gate == "-":  # it stops itself after saying so
            deadline = time.monotonic() + 10
            while process_state(pid) != "T":
                assert time.monotonic() < deadline, f"bob did not stop: {process_state(pid)}"
                time.sleep(0.005)
        yield bob, pid, json.loads(line)["paused"]
    finally:
        if bob.poll() is None:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            bob.kill()
            bob.communicate()


def _answer(bob: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = bob.communicate(timeout=120)
    assert bob.returncode == 0, err[-3000:]
    answer: dict[str, Any] = json.loads(out.splitlines()[-1])
    return answer


@pytest.mark.parametrize("at", ["its transaction", "its install"])
def test_a_committer_paused_holds_up_only_writers_of_its_path_until_the_server_ends_its_transaction(
    volume: BedVolume, at: str
) -> None:
    """bob (h2) is stopped (SIGSTOP, his kernel and TCP session alive) in the middle of a commit of
    plans/a.md: between his transaction's first round trip and its COMMIT, or after the COMMIT,
    before his install. alice (h1) commits plans/b.md while he stays stopped, at once: his open
    transaction holds the lock of his path only. Her commit of his path, when he holds it, waits
    until the server ended his transaction (idle_in_transaction_session_timeout). Resumed, his
    commit fails closed with nothing recorded (ETIMEDOUT), or, committed before he stopped, is
    installed and reported as the version it is."""
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    h2 = volume.hosts[1]
    in_transaction = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state = 'idle in transaction'"
    )
    with _paused_committer(volume, at, "-") as (bob, pid, inner):
        try:
            if at == "its install":  # between transactions: nothing of his in the database holds anyone
                assert volume.sql(
                    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND d.datname = current_database()"
                ) == [(0,)]
            answer = alice.write("plans/b.md", "alice's\n")
            assert answer.get("version") == 1, answer
            assert process_state(pid) == "T"  # alice committed while bob was still stopped
            print(f"paused at {at}: alice committed another path after {answer['seconds']:.1f} s")
            holding = volume.sql(in_transaction, (f"coherent-volume h2 {inner}",))
            if at == "its transaction":
                assert holding == [(1,)]  # his transaction still holds his path: she did not wait for it
                answer = alice.write("plans/a.md", "two\n")
                assert answer.get("version") == 2, answer
                print(f"paused at {at}: alice committed his path after {answer['seconds']:.1f} s")
                assert process_state(pid) == "T"
                holding = volume.sql(in_transaction, (f"coherent-volume h2 {inner}",))
            assert holding == [(0,)]  # none of his is left in a transaction: the server ended it
        finally:
            h2.resume(pid)
        late = _answer(bob)
    history = alice.do("history", "plans/a.md")["history"]
    if at == "its transaction":
        assert late["error"] == "RegistryError" and late["errno"] == errno.ETIMEDOUT, late
        assert "idle_in_transaction_session_timeout" in late["message"] and "Nothing was written" in late["message"]
        assert history == [[2, "commit", "alice"], [1, "commit", "alice"]]  # nothing of his recorded
        assert (volume.roots[1] / "plans/a.md").read_text() == "one\n"  # h2's copy: not read since
        assert os.listdir(volume.roots[1] / ".coherent/staging") == []
    else:
        assert late == {"version": 2}, late
        assert history == [[2, "commit", "bob"], [1, "commit", "alice"]]
        assert (volume.roots[1] / "plans/a.md").read_text() == "bob's\n"
    assert alice.read("plans/a.md") == ("two\n" if at == "its transaction" else "bob's\n")
    assert volume.agent(2, "carol").read("plans/b.md") == "alice's\n"


def test_a_committer_cut_off_in_its_transaction_holds_no_other_host_up_and_nothing_of_it_is_recorded(
    volume: BedVolume, tmp_path: Path
) -> None:
    """h2 is cut off (link down) between bob's first round trip and his COMMIT: alice (h1) commits
    while h2 is still cut off (the server ends bob's transaction, idle, and its lock with it). After
    the heal, bob's transaction is found not committed and is run again: one version of his, never
    two, and none from the transaction that was cut off."""
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    gate = tmp_path / "go"
    h2 = volume.hosts[1]
    with _paused_committer(volume, "its transaction", str(gate)) as (bob, _, _):
        h2.partition()
        try:
            gate.touch()  # bob sends his COMMIT into the cut
            answer = alice.write("plans/b.md", "alice's\n")
            assert answer.get("version") == 1, answer
            assert bob.poll() is None  # alice committed while bob still waited, cut off
            print(f"cut off in a transaction: alice committed after {answer['seconds']:.1f} s")
        finally:
            h2.heal()
        assert _answer(bob) == {"version": 2}
    assert alice.do("history", "plans/a.md")["history"] == [[2, "commit", "bob"], [1, "commit", "alice"]]
    assert volume.sql("SELECT count(*) FROM cv_versions WHERE writer = 'bob'") == [(1,)]
    assert alice.read("plans/a.md") == "bob's\n"


# ---- the rule: behind, foreign or same (protocol.local_state) ---------------------------------------------


FP = Fingerprint(1, 4, 1_000_000_000, 1_000_000_000)
LATER = Fingerprint(2, 4, 2_000_000_000, 2_000_000_000)


def _current(version: int, digest: str | None) -> FileRecord:
    return FileRecord("p", version, digest is not None, digest, None, "w", 0.0, 0)


def test_local_state_same_behind_foreign() -> None:
    held = Installed(1, "h1", FP, 2_000_000_000)
    # the fingerprint shows the disk holds what this copy installed (the registry's v1): same if current, else behind
    assert not installed_needs_hash(held, FP)
    assert local_state(_current(1, "h1"), held, FP, None, "h1") is Local.SAME
    assert local_state(_current(2, "h2"), held, FP, None, "h1") is Local.BEHIND
    assert local_state(_current(2, None), held, FP, None, "h1") is Local.BEHIND  # deleted since: remove it
    # another fingerprint: hashed; the installed bytes still, the current ones, or foreign bytes
    assert installed_needs_hash(held, LATER)
    assert local_state(_current(2, "h2"), held, LATER, "h1", "h1") is Local.BEHIND
    assert local_state(_current(2, "h2"), held, LATER, "h2", "h1") is Local.SAME  # an install whose record was lost
    assert local_state(_current(2, "h2"), held, LATER, "hx", "h1") is Local.FOREIGN
    assert local_state(_current(1, "h1"), held, LATER, "hx", "h1") is Local.FOREIGN
    # no file: not installed (or wiped), never a deletion
    assert local_state(_current(2, "h2"), held, None, None, "h1") is Local.BEHIND
    assert local_state(_current(2, "h2"), None, None, None, None) is Local.BEHIND
    assert local_state(_current(2, None), held, None, None, "h1") is Local.SAME
    assert local_state(None, None, None, None, None) is Local.SAME
    # never installed here: the current bytes are the current version, any others foreign
    assert installed_needs_hash(None, FP)
    assert local_state(_current(2, "h2"), None, FP, "h2", None) is Local.SAME
    assert local_state(_current(2, "h2"), None, FP, "hx", None) is Local.FOREIGN
    assert local_state(None, None, FP, "hx", None) is Local.FOREIGN
    # a deletion installed, a file there now: foreign
    gone = Installed(3, None, None, 2_000_000_000)
    assert local_state(_current(3, None), gone, FP, "hx", None) is Local.FOREIGN


def test_a_copy_holding_a_version_the_registry_lost_keeps_it() -> None:
    """The registry went back (restored from an older backup): the bytes this copy installed as v1
    are no version the registry records (it records other bytes as v1, or no v1 at all), so nobody
    else has them: they are recorded, never overwritten, whether the registry is now at v1 or beyond."""
    held = Installed(1, "h1", FP, 2_000_000_000)
    assert local_state(_current(1, "h1-other"), held, FP, None, "h1-other") is Local.UNRECORDED
    assert local_state(_current(2, "h2"), held, FP, None, "h1-other") is Local.UNRECORDED
    assert local_state(_current(2, "h2"), held, LATER, "h1", None) is Local.UNRECORDED
    # the bytes the registry's current version holds lose nothing: the copy is in step
    assert local_state(_current(2, "h1"), held, LATER, "h1", "h1-other") is Local.SAME
    # no file, or a file changed since: nothing of the lost version is on the disk to keep
    assert local_state(_current(2, "h2"), held, None, None, None) is Local.BEHIND
    assert local_state(_current(2, "h2"), held, LATER, "hx", None) is Local.FOREIGN


def test_a_fingerprint_taken_too_soon_after_a_write_is_confirmed_by_hash() -> None:
    racy = Installed(1, "h1", FP, FP.ctime_ns + 1)
    assert installed_needs_hash(racy, FP)
    assert not installed_needs_hash(racy, None)
