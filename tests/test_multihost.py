"""Several hosts share one PostgreSQL volume, each through its own working copy (API and CLI faces).

Real parts: a private PostgreSQL cluster listening on the bridge of a bed of three namespace hosts
(network, UTS, mount and PID namespaces; tests/harness/nethosts.py), each host with its own root
made by `coherent-volume init` run in it; agents are Python processes started in the hosts; faults
are real (kill -9, a link taken down, `rm -rf`, a shell writing a managed file). The decision rule
"behind / foreign / same" (`protocol.local_state`) has unit tests at the end.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coherent_volume.fingerprint import Fingerprint
from coherent_volume.protocol import FileRecord, Installed, Local, installed_needs_hash, local_state

from .harness import CLI, REPO, child

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nsenter") is None or shutil.which("nft") is None,
    reason="the multi-host bed needs root, nsenter and nft",
)

PY = sys.executable
MANAGED = "plans/**"

AGENT = r"""
import json, sys, time
from coherent_volume import CoherentVolume, RegistryError, StaleWriteError
vol = CoherentVolume(sys.argv[1], agent=sys.argv[2])
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    verb, path, *rest = json.loads(line)
    began = time.monotonic()
    try:
        if verb == "read":
            out = {"data": vol.read(path).decode()}
        elif verb == "write":
            out = {"version": vol.write(path, rest[0])}
        else:
            out = {"history": [[h.version, h.kind, h.writer] for h in vol.history(path)]}
    except StaleWriteError as e:
        out = {"refused": e.reason, "current": e.current_version}
    except RegistryError as e:
        out = {"error": type(e).__name__, "message": str(e), "errno": e.errno}
    except FileNotFoundError:
        out = {"missing": True}
    out["seconds"] = time.monotonic() - began
    print(json.dumps(out), flush=True)
"""
"""An agent in a host, driven by JSON lines [verb, path, data?] on its stdin, one JSON answer each."""

KILLED_AFTER_COMMIT = r"""
import os, signal, sys
from coherent_volume import CoherentVolume
from coherent_volume.core.writes import Writes
vol = CoherentVolume(sys.argv[1], agent="killed")
vol.read(sys.argv[2])
def killed(self, action):  # the fault point: the commit's transaction committed, its local install not begun
    os.kill(os.getpid(), signal.SIGKILL)
Writes._install = killed
vol.write(sys.argv[2], sys.argv[3])
"""


class Agent:
    """An AGENT process in a host."""

    def __init__(self, host: Any, root: Path, name: str) -> None:
        self.host, self.name = host, name
        self.proc = host.popen(
            [PY, "-c", AGENT, str(root), name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self._answer(60) == {"ready": True}

    def _answer(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"agent {self.name} on {self.host.name} gave no answer in {timeout} s: {err[-2000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def do(self, verb: str, path: str, *data: str, timeout: float = 60) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps([verb, path, *data]) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def read(self, path: str) -> str:
        answer = self.do("read", path)
        assert "data" in answer, answer
        return str(answer["data"])

    def write(self, path: str, data: str) -> dict[str, Any]:
        return self.do("write", path, data)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


# ---- the bed: three hosts, one PostgreSQL, one volume with a working copy on each host ------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[Any]:
    pytest.importorskip("psycopg")
    from .harness.nethosts import bed
    from .harness.pgcluster import bindir, cluster

    if bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: postgresql)")
    with bed(3) as b:
        memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with cluster(
            listen=[b.bridge_address], trust=[f"{b.bridge_address}/24"], settings={"fsync": "off"}, parent=memory
        ) as pg:
            yield b, pg
    assert not b.leftovers()


class Volume:
    """One volume in a fresh database, with the root of host hN at `roots[N-1]`."""

    def __init__(self, bed: Any, url: str, roots: list[Path]) -> None:
        self.hosts, self.url, self.roots = bed.hosts, url, roots
        self.agents: list[Agent] = []

    def agent(self, n: int, name: str) -> Agent:
        a = Agent(self.hosts[n - 1], self.roots[n - 1], name)
        self.agents.append(a)
        return a

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else []


@pytest.fixture
def volume(hosts: Any, tmp_path: Path) -> Iterator[Volume]:
    bed, pg = hosts
    name = f"t_{secrets.token_hex(6)}"
    pg.create_database(name)
    roots = [tmp_path / f"h{n}" for n in (1, 2, 3)]
    for n, (host, root) in enumerate(zip(bed.hosts, roots, strict=True)):
        creating = ["-m", MANAGED] if n == 0 else []  # h1 creates the volume, h2 and h3 join it
        done = host.run(
            [CLI, "init", str(root), *creating, "--registry", pg.url(name), "--volume", "team"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    v = Volume(bed, pg.url(name), roots)
    try:
        yield v
    finally:
        for a in v.agents:
            a.close()


# ---- agents on three hosts ---------------------------------------------------------------------------


def test_agents_on_three_hosts_read_the_latest_version_and_stale_writes_are_refused(volume: Volume) -> None:
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


def test_the_cli_joins_with_every_file_installed_and_a_joined_copy_may_not_be_mounted_yet(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    alice.write("plans/deep/b.md", "two\n")
    host = volume.hosts[1]
    late = volume.roots[1].parent / "late"
    done = host.run(
        [CLI, "init", str(late), "--registry", volume.url, "--volume", "team"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert (late / "plans/a.md").read_text() == "one\n" and (late / "plans/deep/b.md").read_text() == "two\n"
    refused = host.run(
        [
            PY,
            "-c",
            "import sys; from coherent_volume.core import open_core; open_core(sys.argv[1]).refuse_mount()",
            str(late),
        ],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "not supported yet" in refused.stderr


# ---- a contention sweep over three hosts, judged by the history checker -----------------------------------


def test_a_contention_sweep_over_three_hosts_passes_the_history_checker(volume: Volume, tmp_path: Path) -> None:
    import xxhash

    from .harness import checker
    from .harness.history import History, Read, StoreAudit, StoredVersion
    from .harness.resolve import log_versions, resolve
    from .harness.sweeps import load_records, wait_all
    from .harness.volumes import final_state, read_log, seed
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
    store = StoreAudit()
    for path, version, kind, writer, digest, pruned in volume.sql(
        "SELECT path, version, kind, writer, hash, pruned FROM cv_versions ORDER BY path, version"
    ):
        data = volume.sql("SELECT data FROM cv_contents WHERE hash = %s", (digest,)) if digest else []
        state = "none" if digest is None else "pruned" if pruned else "ok" if data else "missing"
        read = Read.of(path, bytes(data[0][0])) if data else None
        store.versions.setdefault(path, {})[version] = StoredVersion(path, version, kind, writer, digest, state, read)
    store.current = {p: (v, h) for p, v, h in volume.sql("SELECT path, version, hash FROM cv_files")}
    store.disk = {p: xxhash.xxh3_128_hexdigest((root / p).read_bytes()) for p in paths}
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


def test_a_wiped_working_copy_converges_on_the_next_read(volume: Volume) -> None:
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


def test_a_foreign_write_on_a_lagging_host_is_recorded_and_nothing_is_lost(volume: Volume) -> None:
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
    volume: Volume,
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
    assert volume.sql("SELECT reason FROM cv_events WHERE kind = 'recover'") == [("completed",)]
    assert volume.sql("SELECT count(*) FROM cv_intents") == [(0,)]


def test_a_partitioned_host_fails_closed_with_a_typed_error_and_works_after_the_heal(volume: Volume) -> None:
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


# ---- the rule: behind, foreign or same (protocol.local_state) ---------------------------------------------


FP = Fingerprint(1, 4, 1_000_000_000, 1_000_000_000)
LATER = Fingerprint(2, 4, 2_000_000_000, 2_000_000_000)


def _current(version: int, digest: str | None) -> FileRecord:
    return FileRecord("p", version, digest is not None, digest, None, "w", 0.0, 0)


def test_local_state_same_behind_foreign() -> None:
    held = Installed(1, "h1", FP, 2_000_000_000)
    # the fingerprint shows the disk holds what this copy installed: same if current, else behind
    assert not installed_needs_hash(held, FP)
    assert local_state(_current(1, "h1"), held, FP, None) is Local.SAME
    assert local_state(_current(2, "h2"), held, FP, None) is Local.BEHIND
    assert local_state(_current(2, None), held, FP, None) is Local.BEHIND  # deleted since: remove it
    # another fingerprint: hashed; the installed bytes still, the current ones, or foreign bytes
    assert installed_needs_hash(held, LATER)
    assert local_state(_current(2, "h2"), held, LATER, "h1") is Local.BEHIND
    assert local_state(_current(2, "h2"), held, LATER, "h2") is Local.SAME  # an install whose record was lost
    assert local_state(_current(2, "h2"), held, LATER, "hx") is Local.FOREIGN
    assert local_state(_current(1, "h1"), held, LATER, "hx") is Local.FOREIGN
    # no file: not installed (or wiped), never a deletion
    assert local_state(_current(2, "h2"), held, None, None) is Local.BEHIND
    assert local_state(_current(2, "h2"), None, None, None) is Local.BEHIND
    assert local_state(_current(2, None), held, None, None) is Local.SAME
    assert local_state(None, None, None, None) is Local.SAME
    # never installed here: the current bytes are the current version, any others foreign
    assert installed_needs_hash(None, FP)
    assert local_state(_current(2, "h2"), None, FP, "h2") is Local.SAME
    assert local_state(_current(2, "h2"), None, FP, "hx") is Local.FOREIGN
    assert local_state(None, None, FP, "hx") is Local.FOREIGN
    # a deletion installed, a file there now: foreign
    gone = Installed(3, None, None, 2_000_000_000)
    assert local_state(_current(3, None), gone, FP, "hx") is Local.FOREIGN
    # same version number, other bytes (a registry that forgot commits): compared by hash too
    assert local_state(_current(1, "h1-other"), held, FP, None) is Local.BEHIND


def test_a_fingerprint_taken_too_soon_after_a_write_is_confirmed_by_hash() -> None:
    racy = Installed(1, "h1", FP, FP.ctime_ns + 1)
    assert installed_needs_hash(racy, FP)
    assert not installed_needs_hash(racy, None)
