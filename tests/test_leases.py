"""Write grants as leases on the registry's clock, renewed by a heartbeat (issue 15, guarantee 2).

Real parts: a private PostgreSQL cluster on the bridge of a bed of three namespace hosts (network,
UTS, mount and PID namespaces; tests/harness/nethosts.py), each host with its own root made by
`coherent-volume init` in it; holders are processes in the hosts that open a write handle through
the core's `begin_write`, as the mount does; faults are real (SIGSTOP, kill -9 of a host's whole
PID namespace). Holders run with their clock shifted by an hour (time.time patched in the
process): a grant decided on the holder's clock would then end at once or an hour late. The lease
is shortened to LEASE in the holder processes (the length is the one attribute the core reads).
The renewal rule has unit tests; the heartbeat's thread is tested on SQLite in one process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from coherent_volume.core import HandleCommit, VolumeCore, open_core
from coherent_volume.edits import Edits
from coherent_volume.errors import StaleWriteError
from coherent_volume.liveness import ProcessId, current_process
from coherent_volume.protocol import Grant, renewed

from .harness.hostbed import Agent, BedVolume, Hosts, LineProcess, needs_bed, three_hosts

if TYPE_CHECKING:
    from .harness.nethosts import Host

LEASE = 5.0
"""The lease of the holders under test (HANDLE_LEASE is 30 s)."""
HEARTBEAT = "coherent-volume lease heartbeat"

HOLDER = r"""
import json, sys, threading, time
real_time = time.time
skew = float(sys.argv[5])
time.time = lambda: real_time() + skew  # this host's clock, an hour off: grants must not use it
from coherent_volume import CoherentVolume, atomic
from coherent_volume.core import HandleCommit, leases, open_core
from coherent_volume.edits import Edits
from coherent_volume.errors import StaleWriteError
from coherent_volume.liveness import current_process
root, path, mode, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
leases.HANDLE_LEASE = lease
if mode == "handle":  # an open write handle, as the mount opens one
    core = open_core(root)
    target = core.resolve(path)
    core.read("bob", target)
    grant, base = core.begin_write("bob", target, current_process(), kind="write")
else:  # a lock(): its TTL, not renewed
    vol = CoherentVolume(root, agent="bob")
    vol.read(path)
    held = vol.lock(path, ttl=lease)
    grant = held.__enter__()
print(json.dumps({"token": grant.token, "expires_at": grant.expires_at}), flush=True)
for line in sys.stdin:
    try:
        if mode == "handle":
            staged = atomic.stage(target.abs, b"bob's edit\n", root=core.paths.root)
            commit = HandleCommit("write", grant, Edits(in_place=True))
            out = {"version": core.commit("bob", target, staged, expected=base, handle=commit)}
        else:
            out = {"version": vol.write(path, "bob's edit\n")}
    except StaleWriteError as e:
        if mode == "handle":
            core.release(grant, "write", log=False)  # as the mount's close does after a refusal
        out = {"refused": e.reason, "current": e.current_version}
    deadline = time.monotonic() + 10
    while any(t.name == "coherent-volume lease heartbeat" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    out["heartbeat"] = any(t.name == "coherent-volume lease heartbeat" for t in threading.enumerate())
    print(json.dumps(out), flush=True)
"""
"""A holder of bob's write grant on a path (argv: root, path, "handle" | "lock", lease, clock skew)."""


class Holder(LineProcess):
    """A HOLDER process in a host; `opened` is its grant's first line."""

    def __init__(self, host: Host, root: Path, path: str, mode: str, skew: float) -> None:
        super().__init__(host, "the holder", HOLDER, str(root), path, mode, str(LEASE), str(skew))
        self.opened = self.answer()
        self.pid = host.pid_of(self.proc)

    def commit(self) -> dict[str, Any]:
        return self.ask("commit")

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.host.resume(self.pid)  # a test that failed while it was paused
        super().close()


# ---- the bed: three hosts, one PostgreSQL (tests/harness/hostbed.py) --------------------------------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    yield from three_hosts()


class Volume(BedVolume):
    """A BedVolume on which h1 created the volume; any other host joins it when first used."""

    def holder(self, n: int, path: str, mode: str = "handle", skew: float = 3600.0) -> Holder:
        return self.started(Holder(self.hosts[n - 1], self.join(n), path, mode, skew))

    def clock(self) -> float:
        """The database server's clock."""
        return float(self.sql("SELECT extract(epoch FROM clock_timestamp())::float8")[0][0])

    def expires_at(self, path: str) -> float | None:
        rows = self.sql("SELECT expires_at FROM cv_grants WHERE path = %s", (path,))
        return float(rows[0][0]) if rows else None

    def reclaims(self, path: str) -> list[tuple[str, float, str]]:
        rows = self.sql("SELECT agent, at, detail FROM cv_events WHERE kind = 'reclaim' AND path = %s", (path,))
        return [(a, float(at), d) for a, at, d in rows]


@pytest.fixture
def volume(hosts: Hosts, tmp_path: Path) -> Iterator[Volume]:
    with Volume(hosts, tmp_path, joined=1) as v:
        yield v


def _write_once_free(agent: Agent, path: str, data: str, within: float) -> tuple[dict[str, Any], int]:
    """Write until it is accepted, for at most `within` s; (the answer, writes refused `held` first).
    Only `held` refusals (and a registry busy while a paused process held a row lock) may come first."""
    deadline = time.monotonic() + within
    held = 0
    while True:
        answer = agent.write(path, data)
        if "version" in answer:
            return answer, held
        if answer.get("refused") == "held":
            held += 1
        else:
            assert answer.get("errno") == errno.EBUSY, answer
        assert time.monotonic() < deadline, f"still not writable after {within} s: {answer}"
        time.sleep(0.2)


# ---- a holder paused past its lease, a host gone, a live holder --------------------------------------------


@needs_bed
def test_a_holder_paused_past_its_lease_is_reclaimed_and_its_late_commit_is_refused(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    assert alice.write("plans/a.md", "one\n")["version"] == 1
    holder = volume.holder(2, "plans/a.md", skew=3600.0)  # its clock an hour ahead
    now = volume.clock()
    assert now < holder.opened["expires_at"] <= now + LEASE  # taken on the database's clock
    assert alice.read("plans/a.md") == "one\n"
    assert alice.write("plans/a.md", "alice's\n")["refused"] == "held"
    h2 = volume.hosts[1]
    h2.pause(holder.pid)
    expires = volume.expires_at("plans/a.md")  # renewed no more from here
    assert expires is not None
    answer, held = _write_once_free(alice, "plans/a.md", "alice's\n", LEASE * 3 + 20)
    accepted_at = volume.clock()
    assert answer["version"] == 2 and held > 0 and accepted_at >= expires
    [(agent, at, detail)] = volume.reclaims("plans/a.md")
    assert agent == "bob" and at >= expires, (at, expires)
    assert "expired" in detail and "not renewed" in detail and "of h2/" in detail, detail
    h2.resume(holder.pid)
    late = holder.commit()
    assert (late["refused"], late["current"]) == ("stale", 2), late  # typed: its base is gone
    assert not late["heartbeat"]  # its lease is renewed no more
    refusals = volume.sql("SELECT agent, reason, version FROM cv_events WHERE kind = 'refusal' AND agent = 'bob'")
    assert refusals == [("bob", "stale", 2)]
    # nothing lost: alice's version is current everywhere, bob's grant stays gone, he was told
    assert volume.agent(2, "carol").read("plans/a.md") == "alice's\n"
    assert alice.do("history", "plans/a.md")["history"] == [[2, "commit", "alice"], [1, "commit", "alice"]]
    time.sleep(LEASE / 3 + 1)  # a beat of its heartbeat, had it gone on
    assert volume.sql("SELECT count(*) FROM cv_grants") == [(0,)]


@needs_bed
def test_a_live_holder_keeps_its_lease_for_three_leases_and_ends_its_heartbeat_with_its_commit(
    volume: Volume,
) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    holder = volume.holder(2, "plans/a.md", skew=-3600.0)  # its clock an hour behind
    first = holder.opened["expires_at"]
    began = time.monotonic()
    refused = 0
    while time.monotonic() - began < 3 * LEASE + 1:
        answer = alice.write("plans/a.md", "alice's\n")
        assert answer.get("refused") == "held", answer
        refused += 1
        time.sleep(0.5)
    renewed_to = volume.expires_at("plans/a.md")
    assert renewed_to is not None and renewed_to >= first + 2 * LEASE  # renewed by its heartbeat
    assert renewed_to <= volume.clock() + LEASE  # on the database's clock, not its own
    assert volume.reclaims("plans/a.md") == []
    committed = holder.commit()
    assert committed["version"] == 2 and not committed["heartbeat"], committed
    assert volume.sql("SELECT count(*) FROM cv_grants") == [(0,)]
    assert alice.read("plans/a.md") == "bob's edit\n"
    print(f"{refused} writes refused 'held' over {3 * LEASE + 1:g} s; lease renewed {renewed_to - first:.1f} s on")


@needs_bed
def test_a_holder_on_the_same_host_is_reclaimed_at_once_when_killed(volume: Volume) -> None:
    volume.agent(1, "alice").write("plans/a.md", "one\n")
    carol = volume.agent(2, "carol")  # on the holder's host
    holder = volume.holder(2, "plans/a.md", skew=0.0)
    assert carol.read("plans/a.md") == "one\n"
    assert carol.write("plans/a.md", "carol's\n")["refused"] == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.proc.wait(timeout=30)
    expires = volume.expires_at("plans/a.md")
    assert expires is not None
    answer = carol.write("plans/a.md", "carol's\n")  # same host and PID namespace: liveness decides
    assert answer.get("version") == 2, answer
    [(agent, at, detail)] = volume.reclaims("plans/a.md")
    assert agent == "bob" and at < expires and "died" in detail, (at, expires, detail)


@needs_bed
def test_a_lock_of_a_paused_holder_ends_at_its_ttl_on_the_database_clock_and_fences_it(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    holder = volume.holder(2, "plans/a.md", mode="lock", skew=3600.0)
    now = volume.clock()
    assert now < holder.opened["expires_at"] <= now + LEASE
    alice.read("plans/a.md")
    volume.hosts[1].pause(holder.pid)
    answer, held = _write_once_free(alice, "plans/a.md", "alice's\n", LEASE * 3 + 20)
    assert answer["version"] == 2 and held > 0
    volume.hosts[1].resume(holder.pid)
    late = holder.commit()
    assert late["refused"] == "fenced", late
    assert alice.read("plans/a.md") == "alice's\n"


@needs_bed
def test_a_host_gone_with_its_holder_frees_the_path_after_one_lease(volume: Volume) -> None:
    """Last of the module: it ends host h3 (its PID namespace, so every process in it, is killed)."""
    alice = volume.agent(1, "alice")
    alice.write("plans/a.md", "one\n")
    alice.read("plans/a.md")
    h3 = volume.hosts[2]
    holder = volume.holder(3, "plans/a.md", skew=3600.0)
    os.kill(h3.init_pid, signal.SIGKILL)  # PID 1 of h3: the kernel kills its whole PID namespace
    holder.proc.wait(timeout=30)
    killed = time.monotonic()
    expires = volume.expires_at("plans/a.md")
    assert expires is not None
    answer, held = _write_once_free(alice, "plans/a.md", "alice's\n", LEASE * 3 + 20)
    waited = time.monotonic() - killed
    assert answer["version"] == 2 and held > 0 and volume.clock() >= expires
    [(agent, at, detail)] = volume.reclaims("plans/a.md")
    assert agent == "bob" and at >= expires and "of h3/" in detail, (at, expires, detail)
    print(f"the path was writable again {waited:.1f} s after host h3 went (lease {LEASE:g} s)")


# ---- one host, SQLite: the heartbeat's thread ------------------------------------------------------------


def _core(root: Path, length: float) -> VolumeCore:
    core = open_core(root)
    core.leases.length = length
    return core


def _grant(core: VolumeCore, path: str) -> Grant | None:
    with core.registry.read() as tx:
        return tx.grant(path)


def _heartbeats() -> int:
    return sum(t.name == HEARTBEAT for t in threading.enumerate())


def _until(done: Any, within: float) -> bool:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_the_heartbeat_runs_while_a_handle_holds_a_lease_and_ends_after(root: Path) -> None:
    length = 1.5
    core = _core(root, length)
    try:
        plan = core.resolve("plans/a.md")
        core.commit("alice", plan, b"one\n")
        core.read("bob", plan)
        before = _heartbeats()
        grant, base = core.begin_write("alice", plan, current_process(), kind="write")
        assert _heartbeats() == before + 1
        second, _ = core.begin_write("alice", core.resolve("plans/b.md"), current_process(), kind="write")
        assert _heartbeats() == before + 1  # one thread renews every lease of the process
        began = time.monotonic()
        while time.monotonic() - began < 3 * length:
            with pytest.raises(StaleWriteError) as held:
                core.commit("bob", plan, b"bob's\n")
            assert held.value.reason == "held"
            time.sleep(0.2)
        now = _grant(core, "plans/a.md")
        assert now is not None and now.token == grant.token and now.expires_at > grant.expires_at + length
        assert core.release(second, "write")
        assert _heartbeats() == before + 1  # one lease left
        assert core.commit("alice", plan, b"two\n", expected=base, handle=HandleCommit("write", grant, Edits())) == 2
        assert _until(lambda: _heartbeats() == before, 5)  # ended at the first beat after the last lease
        assert _grant(core, "plans/a.md") is None
    finally:
        core.close()


def test_a_lease_no_longer_renewed_lapses_and_its_handle_commit_is_refused_stale(root: Path) -> None:
    length = 1.0
    core = _core(root, length)
    try:
        plan = core.resolve("plans/a.md")
        core.commit("alice", plan, b"one\n")
        core.read("bob", plan)
        before = _heartbeats()
        grant, base = core.begin_write("alice", plan, current_process(), kind="write")
        core.leases.stop()  # as a holder that stopped: nothing renews it
        assert _heartbeats() == before
        with pytest.raises(StaleWriteError) as held:
            core.commit("bob", plan, b"bob's\n")
        assert held.value.reason == "held"
        time.sleep(length + 0.2)
        assert core.commit("bob", plan, b"bob's\n") == 2  # the lease ran out: reclaimed
        with core.registry.read() as tx:
            [reclaim] = tx.events(kind="reclaim")
        assert reclaim.agent == "alice" and "expired" in (reclaim.detail or "")
        with pytest.raises(StaleWriteError) as late:
            core.commit("alice", plan, b"alice's\n", expected=base, handle=HandleCommit("write", grant, Edits()))
        assert late.value.reason == "stale"
        assert core.read("carol", plan).data == b"bob's\n"
    finally:
        core.close()


def test_a_hook_grant_keeps_its_ttl_and_is_not_renewed(root: Path) -> None:
    core = _core(root, 1.0)
    try:
        plan = core.resolve("plans/a.md")
        core.commit("alice", plan, b"one\n")
        before = _heartbeats()
        grant, _ = core.begin_write("alice", plan, current_process(), kind="write", ttl=60.0)
        assert _heartbeats() == before
        with core.registry.read() as tx:
            now = tx.now()
        assert now + 59 < grant.expires_at <= now + 60
        core.release(grant, "write")
    finally:
        core.close()


# ---- the rule (protocol.renewed) ---------------------------------------------------------------------------


def test_a_lease_is_renewed_only_while_it_is_the_grant_in_force() -> None:
    owner = ProcessId("h", 1, 1)
    lease = Grant("p", "a", "t1", owner, expires_at=100.0, fences=False)
    assert renewed(lease, lease, 90.0, 30.0) == Grant("p", "a", "t1", owner, expires_at=120.0, fences=False)
    assert renewed(lease, None, 90.0, 30.0) is None  # released or reclaimed
    assert renewed(lease, Grant("p", "b", "t2", owner, 150.0), 90.0, 30.0) is None  # taken by another since
    assert renewed(lease, lease, 100.0, 30.0) is None  # ran out: stays out, as every host judges it
