"""The torture harness over three namespace hosts sharing a PostgreSQL volume, quick form
(tests/harness/torture_hosts.py; `scripts/torture_hosts.py --rounds N` runs the long form and prints
the table of docs/reliability.md).

Every scenario starts its agents in the hosts of one bed, on a fresh database of the bed's cluster,
provokes its fault, and is judged after its agents stopped: every working copy converges on the
registry's current bytes, every version reads back with its hash on every host, the history checker
finds nothing (no acknowledged commit lost, none applied twice, no write skew), no write failed with
an error the fault does not explain, and no process is left in any host. The bed and the cluster are
gone at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest

from .harness import payload
from .harness.history import Attempt, Read, StoreAudit, StoredVersion
from .harness.nethosts import Host
from .harness.pgcluster import bindir
from .harness.torture_hosts import (
    QUICK,
    HostBed,
    HostVolume,
    Row,
    host_bed,
    left_behind,
    lost_and_doubled,
    lost_replies,
    mount_daemon_kills,
    partition,
    pg_restart,
    strays,
    sweep,
    table,
    writer_kills,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(p) for p in ("nsenter", "nft", "fusermount3")),
    reason="the multi-host bed needs root, nsenter, nft and fusermount3",
)


@pytest.fixture(scope="module")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostBed]:
    pytest.importorskip("psycopg")
    if bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: postgresql)")
    with host_bed(tmp_path_factory.mktemp("hosts")) as bed:
        yield bed
    assert not left_behind(bed)


def _passed(rows: list[Row], tb: HostBed) -> None:
    for r in rows:
        assert r.passed, f"{table([r])}\n" + "\n".join(r.result.messages[:10])
        assert r.lost == 0 and r.double_applied == 0 and r.acknowledged > 0, table([r])
    assert not strays(tb)


def test_sweeps_of_agents_on_three_hosts_pass_the_history_checker(tb: HostBed) -> None:
    one_file, read_set = (
        sweep(tb, QUICK, 1, files=1, isolation="file"),
        sweep(tb, QUICK, 1, files=4, isolation="read-set"),
    )
    _passed([one_file, read_set], tb)
    assert one_file.refusals["stale"] > 0, "agents on different hosts contended for one file"
    assert read_set.refusals["read-set"] > 0, "read sets across hosts were checked"


def test_writers_killed_on_one_host_lose_nothing(tb: HostBed) -> None:
    row = writer_kills(tb, QUICK, 2)
    _passed([row], tb)
    assert row.faults == QUICK.writer_kills


def test_a_partitioned_host_loses_nothing_and_commits_again_after_the_heal(tb: HostBed) -> None:
    row = partition(tb, QUICK, 3)
    _passed([row], tb)
    assert row.faults == QUICK.partitions and "never" not in row.recovery


def test_a_database_restart_during_the_sweep_loses_nothing(tb: HostBed) -> None:
    row = pg_restart(tb, QUICK, 4)
    _passed([row], tb)
    assert row.faults == QUICK.restarts and "never" not in row.recovery


def test_lost_commit_replies_are_never_applied_twice_nor_reported_failed(tb: HostBed) -> None:
    row = lost_replies(tb, QUICK, 5)
    _passed([row], tb)
    assert row.faults == QUICK.lost_replies


def test_shell_writers_through_a_mount_on_h1_survive_kill_9_of_its_daemon(tb: HostBed) -> None:
    row = mount_daemon_kills(tb, QUICK, 6)
    _passed([row], tb)
    assert row.faults == QUICK.daemon_kills


# ---- the table's counts, on doctored stores ----------------------------------------------------------


def _ack(token: str, target: str = "plans/a.md") -> Attempt:
    return Attempt("h1-0", target, token, "seed", 1, [], 0.0, 0.0, 0.1, outcome="ok", version=2)


def _store(*versions: tuple[str, str]) -> StoreAudit:
    """versions: (path, token) in order; each stored at the next version of its path."""
    audit = StoreAudit()
    for path, token in versions:
        rows = audit.versions.setdefault(path, {})
        v = len(rows) + 1
        rows[v] = StoredVersion(path, v, "commit", "w", "h", "ok", Read.of(path, payload.make(token, "-", v)))
    return audit


def test_lost_and_double_applied_are_counted_from_the_stored_bytes() -> None:
    store = _store(("plans/a.md", "seed"), ("plans/a.md", "x"), ("plans/a.md", "y"))
    assert lost_and_doubled([_ack("x"), _ack("y")], store) == (0, 0)
    assert lost_and_doubled([_ack("x"), _ack("z")], store) == (1, 0)  # z was told success, nothing stores it
    assert lost_and_doubled([_ack("x", "plans/b.md")], store) == (1, 0)  # stored, but at another path
    twice = _store(("plans/a.md", "seed"), ("plans/a.md", "x"), ("plans/a.md", "x"), ("plans/b.md", "x"))
    assert lost_and_doubled([_ack("x")], twice) == (0, 2)


# ---- what the kill scenarios found, made deterministic ------------------------------------------------

KILLED_INSTALLING = r"""
import os, signal, sys
from coherent_volume import CoherentVolume
from coherent_volume.registry.replica import Replica
def killed(self, *args):  # the fault point: the install's rename is done, its record in replica.db not
    os.kill(os.getpid(), signal.SIGKILL)
Replica.holds = killed
CoherentVolume(sys.argv[1], agent="bob").read(sys.argv[2])
"""

OP = r"""
import sys
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent=sys.argv[2])
if len(sys.argv) > 4:
    if vol.version(sys.argv[3]):
        vol.read(sys.argv[3])
    vol.write(sys.argv[3], sys.argv[4].encode())
print(vol.read(sys.argv[3]).decode(), end="")
"""


def test_a_copy_killed_between_an_install_and_its_record_does_not_revert_later_commits(tb: HostBed) -> None:
    vol = HostVolume(tb, "killed-install")
    h1, h2 = tb.hosts[0], tb.hosts[1]
    r1, r2 = (str(r) for r in vol.roots[:2])

    def op(host: Host, root: str, agent: str, *args: str) -> str:
        done = host.run([sys.executable, "-c", OP, root, agent, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    op(h1, r1, "alice", "plans/a.md", "one\n")
    assert op(h2, r2, "bob", "plans/a.md") == "one\n"
    op(h1, r1, "alice", "plans/a.md", "two\n")
    killed = h2.run([sys.executable, "-c", KILLED_INSTALLING, r2, "plans/a.md"], capture_output=True, timeout=120)
    assert killed.returncode == -9 and (vol.roots[1] / "plans/a.md").read_text() == "two\n"
    op(h1, r1, "alice", "plans/a.md", "three\n")  # another host commits while h2's copy holds v2 unrecorded
    assert op(h2, r2, "bob", "plans/a.md") == "three\n"  # v2's bytes are v2 (`protocol.lost_install`), not foreign
    assert op(h1, r1, "alice", "plans/a.md") == "three\n"
    assert vol.sql("SELECT count(*) FROM cv_events WHERE kind = 'foreign'") == [(0,)]
