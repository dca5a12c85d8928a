"""Torture over hosts: agents on three namespace hosts share one PostgreSQL volume under faults.

Real parts: a bed of three hosts (tests/harness/nethosts.py: network, UTS, mount and PID namespaces
on a bridge), a private PostgreSQL cluster listening on the bridge (pgcluster.py), a working copy
per host made by `coherent-volume init` run in it (h1 creates the volume, h2 and h3 join), agents
that are Python processes started in the hosts (workers.py, through the API), and on h1 also bash
agents writing through a mount. Each scenario runs on a fresh database of the bed's cluster:

- sweeps: API agents on every host, on one file and on a set of files with cross reads (file and
  read-set isolation);
- kill -9 of writers on h2 at random instants, each replaced by a new agent;
- a partition of h3 (its link down) at the instant a lock in the database (a path's, or the
  volume's) is granted to one of its write transactions, then the heal; a long one checks that the other hosts go on
  (STALL_BOUND);
- a PostgreSQL restart (`pg_ctl restart -m fast`) during the sweep;
- lost COMMIT replies: h3 reaches the database through `CommitProxy`, which at random instants
  forwards a COMMIT and drops the connection before its reply;
- mounts on h1 and h2 (a joined copy, kept current by notifications) with bash agents writing
  through them while API agents on h3 write too, and kill -9 of a mount daemon, remounted.

After each scenario (`_judge`), with every agent stopped:
- every working copy converges: each host reads every managed file through the API, and then every
  managed file of every root holds the bytes of the registry's current version (hashed here);
- every version of the versions table reads back through `read_version` on every host, hashing to
  its recorded hash;
- the history checker passes (checker.check, the content store audited with SQL from here), and no
  write failed with an error the scenario does not provoke;
- no process is left in any host but its init.

A row counts operations (write calls), acknowledged commits (calls told success), lost (acknowledged
commits whose payload no version of their path stores), double-applied (payloads stored by more than
one version) and refusals, and says how long the volume took to recover from the fault.

    python scripts/torture_hosts.py [--rounds N] [--seed S] [--only partition,…]
        (prints the table; exit status 0 only if every scenario passed and nothing was left behind)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import secrets
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from . import CLI, REPO, checker, child
from .commitproxy import CommitProxy
from .history import Attempt, History, Producer, StoreAudit
from .judge import unexpected_errors
from .mounts import daemon_pids, log_problems, serving_pids
from .nethosts import Bed, Host, bed
from .pgcluster import Cluster, cluster
from .resolve import log_versions, refusal_reasons, resolve
from .result import Result
from .sweeps import SHELL_AGENT, load_records, shell_agent_env
from .volumes import audit_pg_store, raw_read, read_log, seed
from .workers import Workload, process_config

MANAGED = "plans/**"
VOLUME = "team"


@dataclass(frozen=True)
class Profile:
    """How much of each scenario to run."""

    name: str
    agents: int = 2  # API agents per host
    sweep_s: float = 2.0  # seconds of each sweep
    load: float = 1.5  # seconds of load before and after each fault
    writer_kills: int = 4
    partitions: int = 1
    partition_s: float = 4.0
    restarts: int = 1
    lost_replies: int = 3
    daemon_kills: int = 2


QUICK = Profile("quick")


def rounds(n: int) -> Profile:
    """The long form: `n` rounds of every fault, with partitions longer than STALL_BOUND and than
    the time the partitioned host's calls take to fail closed (about 20 s)."""
    return Profile(
        f"{n} rounds",
        sweep_s=20.0 * n,
        load=2.0,
        writer_kills=10 * n,
        partitions=n,
        partition_s=20.0,
        restarts=n,
        lost_replies=10 * n,
        daemon_kills=3 * n,
    )


# ---- the bed: three hosts and a cluster on their bridge ---------------------------------------------


@dataclass
class HostBed:
    """The hosts, the cluster every scenario makes its database in, and a directory for the roots."""

    bed: Bed
    pg: Cluster
    workdir: Path

    @property
    def hosts(self) -> list[Host]:
        return self.bed.hosts


@contextlib.contextmanager
def host_bed(workdir: Path) -> Iterator[HostBed]:
    """Three hosts and a PostgreSQL cluster listening on their bridge (in memory, without fsync: no
    scenario cuts the power; restarts and kills stay real); torn down in every outcome."""
    memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with (
        bed(3) as b,
        cluster(
            listen=[b.bridge_address], trust=[f"{b.bridge_address}/24"], settings={"fsync": "off"}, parent=memory
        ) as pg,
    ):
        yield HostBed(b, pg, workdir)


def left_behind(tb: HostBed) -> list[str]:
    """What of a closed test bed still exists: namespaces, links, host inits, the cluster's directory
    or a process of its server (empty when all is gone)."""
    found = tb.bed.leftovers()
    if tb.pg.directory.exists():
        found.append(f"cluster directory {tb.pg.directory}")
    found += [f"PostgreSQL process {pid}" for pid in serving_pids(tb.pg.data)]
    return found


def strays(tb: HostBed, wait: float = 10.0) -> list[str]:
    """Processes left in any host but its init, after up to `wait` seconds for them to exit."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for h in tb.hosts:
            ns = os.readlink(f"/proc/{h.init_pid}/ns/pid")
            for entry in os.listdir("/proc"):
                if not entry.isdigit() or int(entry) == h.init_pid:
                    continue
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/pid") == ns:
                        argv = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        found.append(f"{h.name}: pid {entry} {argv.strip()[:120]}")
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


# ---- a volume with a working copy on each host -------------------------------------------------------


class HostVolume:
    """A volume in a fresh database of the bed's cluster, with the root of host hN at `roots[N-1]`
    (h1 created it, h2 and h3 joined). A host in `through` reaches the database at that (host, port)
    instead of the cluster's own address."""

    def __init__(self, tb: HostBed, name: str, through: dict[int, tuple[str, int]] | None = None) -> None:
        self.tb, self.hosts = tb, tb.hosts
        database = f"t_{secrets.token_hex(6)}"
        tb.pg.create_database(database)
        self.url = tb.pg.url(database)
        base = tb.workdir / name
        self.roots = [base / f"h{n}" for n in (1, 2, 3)]
        self.records = base / "records"
        self.records.mkdir(parents=True)
        self.stop_file = base / "STOP"
        for n, (host, root) in enumerate(zip(self.hosts, self.roots, strict=True), 1):
            address = (through or {}).get(n)
            url = f"postgresql://cv@{address[0]}:{address[1]}/{database}" if address else self.url
            creating = ["-m", MANAGED] if n == 1 else []
            done = host.run(
                [CLI, "init", str(root), *creating, "--registry", url, "--volume", VOLUME],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                raise RuntimeError(f"init on {host.name} failed: {done.stderr.strip()}")

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query straight on the database (as role cv), never through coherent_volume."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, args)
            return cur.fetchall() if cur.description else []

    def agent(self, n: int, name: str, work: Workload, seed_: int) -> subprocess.Popen[str]:
        """An API agent (workers.py) on host hN, working on hN's root; prints "ready" once open."""
        return self.hosts[n - 1].popen(
            child(
                "workers", process_config("api", self.roots[n - 1], name, work, self.records / f"{name}.jsonl", seed_)
            ),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def shell_agent(self, n: int, mnt: Path, name: str, work: Workload, seed_: int) -> subprocess.Popen[str]:
        """A bash agent (shell_agent.sh) on host hN, writing through the mount at `mnt` as agent `name`."""
        return self.hosts[n - 1].popen(
            ["bash", str(SHELL_AGENT)],
            cwd="/",
            env=shell_agent_env(mnt, name, name, work, self.records, seed_, self.stop_file),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def _ready(proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    """Whether an API agent said "ready" within `timeout` seconds."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "ready"


class Crew:
    """The agents of one scenario, stopped together (their stop file), each waited for."""

    def __init__(self, vol: HostVolume) -> None:
        self.vol = vol
        self.procs: dict[str, tuple[int, subprocess.Popen[str]]] = {}
        self.errors: list[str] = []
        self._starting: list[str] = []

    def api(self, n: int, name: str, work: Workload, seed_: int) -> None:
        """Start an API agent on host hN (see `ready`)."""
        self.procs[name] = (n, self.vol.agent(n, name, work, seed_))
        self._starting.append(name)

    def ready(self) -> None:
        """Wait until every API agent started since the last call has its volume open (they start
        together: each begins its attempts as soon as it is open)."""
        while self._starting:
            name = self._starting.pop()
            n, proc = self.procs[name]
            if not _ready(proc):
                self.errors.append(f"agent {name} on h{n} did not start")

    def shell(self, n: int, mnt: Path, name: str, work: Workload, seed_: int) -> None:
        self.procs[name] = (n, self.vol.shell_agent(n, mnt, name, work, seed_))

    def kill(self, name: str) -> float:
        """SIGKILL agent `name` (the command nsenter runs in its host); returns when it was killed."""
        n, proc = self.procs.pop(name)
        os.kill(self.vol.hosts[n - 1].pid_of(proc), signal.SIGKILL)
        killed_at = time.time()
        proc.communicate()
        return killed_at

    def stop(self, timeout: float = 120) -> None:
        """Touch the stop file and wait for every agent; an agent that failed is an error."""
        self.vol.stop_file.touch()
        deadline = time.monotonic() + timeout
        for name, (n, proc) in self.procs.items():
            try:
                _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if proc.returncode != 0:
                self.errors.append(f"agent {name} on h{n} exited with {proc.returncode}: {err.strip()[-500:]}")
        self.procs.clear()


# ---- faults: a proxy that loses COMMIT replies, a mount on a host ---------------------------------


class HostMount:
    """The root of host `host` mounted at `path` by `coherent-volume mount` run in that host (so in
    its mount namespace: the mount is invisible outside it). `problems` collects what the daemon's
    log shows of a bug (mounts.log_problems) and what `unmount` had to force."""

    def __init__(self, host: Host, root: Path, path: Path) -> None:
        self.host, self.root, self.path = host, root, path
        self.log = root / ".coherent" / "mount.log"
        self._log_checked = self.log.stat().st_size if self.log.exists() else 0
        self.problems: list[str] = []

    def mounted(self) -> bool:
        table = self.host.run(["cat", "/proc/self/mounts"], capture_output=True, text=True, check=True).stdout
        return any(line.split()[1] == str(self.path) for line in table.splitlines())

    def mount(self) -> float:
        """Mount (over a dead mount too); returns the seconds it took."""
        if not self.mounted():  # a dead mount cannot even be stat'ed
            self.path.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        done = self.host.run([CLI, "mount", str(self.root), str(self.path)], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"mount on {self.host.name} failed: {done.stderr.strip()}")
        return time.monotonic() - started

    def kill_daemon(self) -> list[int]:
        """SIGKILL the daemon serving the mount (which stays, dead); the pids killed."""
        pids = daemon_pids(self.path)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    def unmount(self) -> None:
        """Unmount in the host (busy: retried, then detached lazily; each mount stacked there in turn),
        wait for the daemon and its
        watcher to exit (SIGKILL after 10 s), then check the daemon's log."""
        for stacked in range(10):  # each mount there: a remount over a killed daemon's leaves that one beneath
            if not self.mounted():
                break
            for _ in range(5):
                if self.host.run(["fusermount3", "-u", str(self.path)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)
            else:
                self.host.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)
                if (
                    stacked == 0
                ):  # (a dead mount beneath, busy with its killed daemon's callers, goes as `unmount` takes it)
                    self.problems.append("the mount stayed busy: detached lazily")
        deadline = time.monotonic() + 10
        while serving_pids(self.path) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in serving_pids(self.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self.problems.append(f"process {pid} still served the mount after the unmount: killed")
        if self.mounted():
            self.problems.append(f"{self.path} is still mounted in {self.host.name}")
        with contextlib.suppress(FileNotFoundError), open(self.log, "rb") as f:
            f.seek(self._log_checked)
            self.problems += log_problems(f.read().decode("utf-8", "replace"))


# ---- judging a scenario ------------------------------------------------------------------------------------


@dataclass
class Row:
    """One scenario's line of the table, and its result (violations, messages)."""

    result: Result
    operations: int = 0
    acknowledged: int = 0
    lost: int = 0
    double_applied: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    recovery: str = "-"
    faults: int = 0

    @property
    def passed(self) -> bool:
        return self.result.passed


CHECK_HOST = r"""
import json, sys, xxhash
from coherent_volume import CoherentVolume
root, agent = sys.argv[1], sys.argv[2]
wanted = json.loads(sys.stdin.read())
with CoherentVolume(root, agent=agent) as vol:
    for path in wanted["paths"]:
        vol.read(path)  # brought up to date on read
    print(json.dumps([[p, v, xxhash.xxh3_128_hexdigest(vol.read_version(p, v))] for p, v in wanted["versions"]]))
"""
"""Run in a host: read every managed file of its root through the API, then every version asked for
through `read_version`; prints [path, version, xxh3-128 of the bytes] for each version."""


def _check_hosts(vol: HostVolume) -> list[str]:
    """Every working copy converges and every version reads back right on every host (see module)."""
    current = {p: h for p, h in vol.sql("SELECT path, hash FROM cv_files WHERE hash IS NOT NULL")}
    versions = {(p, v): h for p, v, h in vol.sql("SELECT path, version, hash FROM cv_versions WHERE hash IS NOT NULL")}
    wanted = json.dumps({"paths": sorted(current), "versions": sorted(versions)})
    problems = []
    for host, root in zip(vol.hosts, vol.roots, strict=True):
        done = host.run(
            [sys.executable, "-c", CHECK_HOST, str(root), f"harness-check-{host.name}"],
            input=wanted,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            problems.append(f"{host.name}: reading every file and version failed: {done.stderr.strip()[-800:]}")
            continue
        for path, version, digest in json.loads(done.stdout):
            if digest != versions[(path, version)]:
                problems.append(
                    f"{host.name}: read_version({path}, {version}) hashes to {digest}, recorded {versions[(path, version)]}"
                )
        for path, digest in current.items():
            try:
                on_disk = xxhash.xxh3_128_hexdigest((root / path).read_bytes())
            except OSError as e:
                on_disk = f"unreadable ({e.strerror})"
            if on_disk != digest:
                problems.append(f"{host.name}: {path} holds {on_disk} after a read, the current version is {digest}")
    return problems


def _judge(
    row: Row,
    vol: HostVolume,
    paths: list[str],
    producers: list[Producer],
    isolation: str = "file",
    kill_times: list[float] | None = None,
    allowed: Callable[[Attempt], tuple[str, ...]] = lambda a: (),
    shell: bool = False,
) -> list[Attempt]:
    """Check a finished scenario (see the module's docstring); fills `row`. `allowed`: the errors a
    write of that attempt may fail with because the scenario provoked them."""
    result = row.result
    for problem in _check_hosts(vol):
        result.fail(f"convergence: {problem}")
    attempts = load_records(vol.records)
    acknowledged = [a for a in attempts if a.committed]
    events = read_log(vol.roots[0])
    store = audit_pg_store(vol.sql, vol.roots[0], paths)
    final = {p: raw_read(vol.roots[0], p) for p in paths}
    versions = {p: v for p, v in vol.sql("SELECT path, version FROM cv_files") if p in paths}
    for kind, message in resolve(attempts, events, kill_times):
        result.fail(f"{kind}: {message}")
    history = History(isolation, True, producers, attempts, set(), final, versions, log_versions(events), store=store)
    result.tally(attempts, refusal_reasons([e for e in events if e["path"] in paths]) if shell else None)
    result.absorb(checker.check(history))
    by_error: dict[tuple[str, ...], list[Attempt]] = defaultdict(list)
    for a in attempts:
        by_error[allowed(a)].append(a)
    for errors, group in by_error.items():
        unexpected_errors(result, group, errors)
    row.operations, row.acknowledged, row.refusals = result.attempts, len(acknowledged), result.refusals
    row.lost, row.double_applied = lost_and_doubled(acknowledged, store)
    return acknowledged


def lost_and_doubled(acknowledged: list[Attempt], store: StoreAudit) -> tuple[int, int]:
    """(acknowledged commits whose payload no version of their path stores, payloads stored by more
    than one version beyond the first): counted from the stored bytes alone, whatever the log says."""
    stored: dict[str, list[str]] = defaultdict(list)
    for path, by_version in store.versions.items():
        for sv in by_version.values():
            if sv.read is not None and sv.read.token is not None:
                stored[sv.read.token].append(path)
    lost = sum(1 for a in acknowledged if a.target not in stored.get(a.token, []))
    return lost, sum(len(paths) - 1 for paths in stored.values())


def _after(acknowledged: list[Attempt], t: float, hosts: tuple[str, ...] = ()) -> float | None:
    """Seconds from `t` to the end of the first acknowledged commit after it (of agents of `hosts`;
    of any agent by default), None if none came."""
    ends = [
        a.t_write1
        for a in acknowledged
        if a.t_write1 is not None and a.t_write1 > t and (not hosts or a.agent.split("-")[0] in hosts)
    ]
    return min(ends) - t if ends else None


def _worst(values: list[float | None]) -> str:
    """The largest of `values` in seconds, "never" if one is None (no commit came)."""
    if None in values:
        return "never"
    return f"{max(v for v in values if v is not None):.2f} s"


# ---- scenarios -------------------------------------------------------------------------------------------------


def _api_crew(
    vol: HostVolume, work: Workload, profile: Profile, seed_: int, hosts: tuple[int, ...] = (1, 2, 3)
) -> Crew:
    crew = Crew(vol)
    for n in hosts:
        for i in range(profile.agents):
            crew.api(n, f"h{n}-{i}", work, seed_ * 100 + n * 10 + i)
    crew.ready()
    return crew


def sweep(tb: HostBed, profile: Profile, seed_: int, files: int, isolation: str) -> Row:
    """API agents on every host, no fault."""
    layout = "1 file" if files == 1 else f"{files} files, cross reads"
    row = Row(Result(f"sweep: {layout}, {isolation}", 3 * profile.agents))
    vol = HostVolume(tb, f"sweep-{files}-{isolation}")
    paths = ["plans/counter.md"] if files == 1 else [f"plans/f{i}.md" for i in range(files)]
    producers = seed(vol.roots[0], paths)
    work = _forever(paths, vol.stop_file, cross=2 if files > 1 else 0, isolation=isolation)
    started = time.monotonic()
    crew = _api_crew(vol, work, profile, seed_)
    time.sleep(profile.sweep_s)
    while _committed_hosts(vol) != HOSTS and time.monotonic() < started + SWEEP_AT_MOST * profile.sweep_s:
        time.sleep(0.25)  # a host its agents lost every race to so far (a slow machine) gets longer
    crew.stop()
    row.result.wall = time.monotonic() - started
    for e in crew.errors:
        row.result.fail(e)
    _judge(row, vol, paths, producers, isolation)
    writers = _committed_hosts(vol)
    if writers != HOSTS:
        row.result.fail(f"harness: only {sorted(writers)} committed")
    return row


HOSTS = {"h1", "h2", "h3"}
SWEEP_AT_MOST = 4
"""A sweep runs `Profile.sweep_s`, and on until an agent of every host committed, this many times as
long at most: a sweep in which a host committed nothing shows nothing of it."""


def _committed_hosts(vol: HostVolume) -> set[str]:
    """The hosts an agent of which committed so far (a record's line still being written is skipped)."""
    return {a.agent.split("-")[0] for a in load_records(vol.records) if a.committed}


def _forever(paths: list[str], stop_file: Path, cross: int = 1, isolation: str = "file") -> Workload:
    """Attempts until `stop_file` exists, each reading `cross` other files first."""
    return Workload(paths, attempts=-1, cross=cross, isolation=isolation, stop_file=str(stop_file))


def writer_kills(tb: HostBed, profile: Profile, seed_: int) -> Row:
    """kill -9 of API writers on h2 at random instants, each replaced by a new agent."""
    rng = random.Random(seed_)
    row = Row(Result(f"kill -9 writers on h2 ({profile.writer_kills}x)", 3 * profile.agents))
    vol = HostVolume(tb, "writer-kills")
    paths = ["plans/k0.md", "plans/k1.md"]
    producers = seed(vol.roots[0], paths)
    work = _forever(paths, vol.stop_file)
    started = time.monotonic()
    crew = _api_crew(vol, work, profile, seed_)
    kill_times: list[float] = []
    on_h2 = [f"h2-{i}" for i in range(profile.agents)]  # the agent in each slot of h2 now
    for k in range(profile.writer_kills):
        slot = rng.randrange(profile.agents)
        time.sleep(rng.uniform(0.05, 0.5))
        kill_times.append(crew.kill(on_h2[slot]))
        on_h2[slot] = f"h2-{slot}.{k + 1}"  # a new agent: its predecessor's views died with it
        crew.api(2, on_h2[slot], work, seed_ * 1000 + k)
        crew.ready()
    time.sleep(profile.load)
    crew.stop()
    row.result.wall = time.monotonic() - started
    for e in crew.errors:
        row.result.fail(e)
    acknowledged = _judge(row, vol, paths, producers, kill_times=kill_times)
    recoveries = [_after(acknowledged, t) for t in kill_times]
    row.faults = len(kill_times)
    row.recovery = f"next commit ≤ {_worst(recoveries)} after a kill"
    if None in recoveries:
        row.result.fail("no commit was acknowledged after a kill")
    return row


STALL_BOUND = 15.0
"""Seconds within which the other hosts must commit again after a host was cut off while holding
a lock in the database: the server ends the cut-off transaction, and its locks, within
idle_in_transaction_session_timeout (5 s) of its last answer, or within its tcp_user_timeout (10 s)
when that answer stays unsent (docs/multihost.md)."""


def _commit_lock(vol: HostVolume, host: str, granted: bool) -> bool:
    """Whether a session of `host` waits for a lock in the database (the advisory locks every write
    transaction takes, the volume's and its paths', until its COMMIT) or, `granted`, holds one in a
    transaction that is idle: its first round trip answered, the server waiting for its next (the
    state the partition catches)."""
    return bool(
        vol.sql(
            "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
            "AND l.granted = %s AND (NOT l.granted OR a.state = 'idle in transaction') "
            "AND a.datname = current_database() AND a.application_name LIKE %s",
            (granted, f"coherent-volume {host} %"),
        )
    )


def _cut_as_granted(vol: HostVolume, host: Host, wait: float = 60.0) -> float | None:
    """Partition `host` at an instant one of its sessions waits for a lock in the database, so that the
    lock is granted to it after the cut and the server's answer never reaches it; tried again (after
    a heal) until the lock went to that session within 2 s, its first round trip done (its
    transaction idle, holding it). The instant of the cut, None if it never did within `wait` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if not _commit_lock(vol, host.name, granted=False):
            continue
        cut = time.time()
        host.partition()
        granted_by = time.monotonic() + 2.0
        while time.monotonic() < granted_by:
            if _commit_lock(vol, host.name, granted=True):
                return cut
            time.sleep(0.01)
        host.heal()
        time.sleep(0.2)
    return None


def _await_commit(vol: HostVolume, host: str, since: float, bound: float) -> None:
    """Wait until an agent of `host` committed a version after `since` (epoch seconds), at most
    `bound` seconds; the judge then says whether one came and when."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and not vol.sql(
        "SELECT 1 FROM cv_versions WHERE writer LIKE %s AND kind = 'commit' AND at > %s LIMIT 1", (f"{host}-%", since)
    ):
        time.sleep(0.1)


def partition(tb: HostBed, profile: Profile, seed_: int) -> Row:
    """h3's link down for `partition_s`, cut as the volume's lock is granted to it, then up
    again, `partitions` times; h3 must commit again within STALL_BOUND after each heal (TCP's
    retransmission backoff alone delays it by seconds after a partition of 4 s), and after a
    partition longer than STALL_BOUND, h1 and h2 within STALL_BOUND of the cut."""
    row = Row(
        Result(
            f"partition of h3 as it gets the commit lock ({profile.partitions}x {profile.partition_s:g} s)",
            3 * profile.agents,
        )
    )
    vol = HostVolume(tb, "partition")
    paths = ["plans/p0.md", "plans/p1.md"]
    producers = seed(vol.roots[0], paths)
    started = time.monotonic()
    crew = _api_crew(vol, _forever(paths, vol.stop_file), profile, seed_)
    h3 = tb.hosts[2]
    windows: list[tuple[float, float]] = []
    for _ in range(profile.partitions):
        time.sleep(profile.load)
        cut = _cut_as_granted(vol, h3)
        if cut is None:
            row.result.fail("harness: the volume's lock never went to a partitioned h3 in 60 s")
            continue
        try:
            time.sleep(profile.partition_s)
        finally:
            h3.heal()
        healed = time.time()
        windows.append((cut, healed))
        _await_commit(vol, "h3", healed, STALL_BOUND)  # TCP's backoff: the server's reply comes seconds later
        time.sleep(profile.load)
    crew.stop()
    row.result.wall = time.monotonic() - started
    for e in crew.errors:
        row.result.fail(e)
    acknowledged = _judge(
        row,
        vol,
        paths,
        producers,
        allowed=lambda a: ("RegistryError",) if a.agent.startswith("h3-") else (),
    )
    back = [_after(acknowledged, heal, ("h3",)) for _, heal in windows]
    others = [_after(acknowledged, cut, ("h1", "h2")) for cut, _ in windows]
    row.faults = len(windows)
    row.recovery = f"h1/h2 commit {_worst(others)} after the cut, h3 {_worst(back)} after the heal"
    if None in back or any(b is not None and b > STALL_BOUND for b in back):
        row.result.fail(f"h3 committed nothing within {STALL_BOUND:g} s after the heal")
    if profile.partition_s > STALL_BOUND:
        for stall in others:
            if stall is None or stall > STALL_BOUND:
                row.result.fail(
                    f"h1 and h2 committed nothing for {_worst([stall])} after h3 was cut off holding the "
                    f"commit lock (partitioned for {profile.partition_s:g} s; bound: {STALL_BOUND:g} s)"
                )
    return row


def pg_restart(tb: HostBed, profile: Profile, seed_: int) -> Row:
    """`pg_ctl restart -m fast` of the cluster during the sweep, `restarts` times."""
    row = Row(Result(f"PostgreSQL restart ({profile.restarts}x, -m fast)", 3 * profile.agents))
    vol = HostVolume(tb, "pg-restart")
    paths = ["plans/r0.md", "plans/r1.md"]
    producers = seed(vol.roots[0], paths)
    started = time.monotonic()
    crew = _api_crew(vol, _forever(paths, vol.stop_file), profile, seed_)
    restarted: list[tuple[float, float]] = []
    for _ in range(profile.restarts):
        time.sleep(profile.load)
        began = time.time()
        tb.pg.restart()
        restarted.append((began, time.time()))
    time.sleep(profile.load)
    crew.stop()
    row.result.wall = time.monotonic() - started
    for e in crew.errors:
        row.result.fail(e)
    acknowledged = _judge(row, vol, paths, producers, allowed=lambda a: ("RegistryError",))
    back = [_after(acknowledged, up) for _, up in restarted]
    down = max(up - began for began, up in restarted)
    row.faults = len(restarted)
    row.recovery = f"restart {down:.2f} s, then next commit ≤ {_worst(back)}"
    if None in back:
        row.result.fail("no commit was acknowledged after a restart")
    return row


def lost_replies(tb: HostBed, profile: Profile, seed_: int) -> Row:
    """h3 reaches the database through a CommitProxy that loses a COMMIT's reply at random instants."""
    rng = random.Random(seed_)
    row = Row(Result(f"lost COMMIT replies on h3 ({profile.lost_replies}x)", 3 * profile.agents))
    proxy = CommitProxy((tb.bed.bridge_address, tb.pg.port), listen=tb.bed.bridge_address)
    try:
        vol = HostVolume(tb, "lost-replies", through={3: proxy.address})
        paths = ["plans/l0.md", "plans/l1.md"]
        producers = seed(vol.roots[0], paths)
        started = time.monotonic()
        crew = _api_crew(vol, _forever(paths, vol.stop_file), profile, seed_)
        missed = 0
        for _ in range(profile.lost_replies):
            time.sleep(rng.uniform(0.1, 0.6))
            missed += not proxy.drop_reply()
        time.sleep(profile.load)
        crew.stop()
        row.result.wall = time.monotonic() - started
        for e in crew.errors:
            row.result.fail(e)
        if missed:
            row.result.fail(f"harness: {missed} armed drops saw no COMMIT within 20 s")
        acknowledged = _judge(row, vol, paths, producers)
    finally:
        proxy.close()
        proxy.cut()
    spans = [
        a.t_write1 - a.t_write0
        for a in acknowledged
        if a.agent.startswith("h3-")
        and a.t_write0 is not None
        and a.t_write1 is not None
        and any(a.t_write0 <= t <= a.t_write1 for t in proxy.drops)
    ]
    row.faults = len(proxy.drops)
    row.recovery = f"{len(spans)} acknowledged writes lost a reply, each returned in ≤ {max(spans, default=0.0):.2f} s"
    if not proxy.drops:
        row.result.fail("harness: no COMMIT reply was lost")
    return row


def mount_daemon_kills(tb: HostBed, profile: Profile, seed_: int) -> Row:
    """Mounts on h1 (the copy that created the volume) and h2 (a joined copy, kept current by
    notifications) with bash agents writing through each, API agents on h3, and kill -9 of a mount
    daemon `daemon_kills` times (h1's and h2's in turn), remounted each time; after each remount a
    shell of that host must commit through it again (within STALL_BOUND)."""
    rng = random.Random(seed_)
    row = Row(Result(f"mounts on h1 and h2, kill -9 of their daemons ({profile.daemon_kills}x)", 3 * profile.agents))
    vol = HostVolume(tb, "mount")
    paths = ["plans/m0.md", "plans/m1.md"]
    producers = seed(vol.roots[0], paths)
    mounts = [HostMount(tb.hosts[n], vol.roots[n], tb.workdir / "mount" / f"mnt{n + 1}") for n in (0, 1)]
    work = _forever(paths, vol.stop_file)
    kill_times: list[float] = []
    remounts: list[tuple[str, float, float]] = []
    started = time.monotonic()
    try:
        for m in mounts:
            m.mount()
        crew = _api_crew(vol, work, profile, seed_, hosts=(3,))
        for n, m in enumerate(mounts, 1):
            for i in range(profile.agents):
                crew.shell(n, m.path, f"h{n}-s{i}", work, seed_ * 100 + n * 10 + i)
        for k in range(profile.daemon_kills):
            m = mounts[k % 2]
            time.sleep(rng.uniform(0.5, 1.0) * profile.load)
            if len(m.kill_daemon()) != 1:
                row.result.fail(f"expected one mount daemon on {m.host.name} to kill")
            kill_times.append(time.time())
            time.sleep(0.2)  # the shells meet the dead mount
            seconds = m.mount()
            remounts.append((m.host.name, time.time(), seconds))
            _await_commit(vol, m.host.name, remounts[-1][1], STALL_BOUND)
        time.sleep(profile.load)
        crew.stop()
    finally:
        vol.stop_file.touch()
        for m in mounts:
            m.unmount()
    row.result.wall = time.monotonic() - started
    for e in crew.errors + [p for m in mounts for p in m.problems]:
        row.result.fail(e)
    acknowledged = _judge(
        row,
        vol,
        paths,
        producers,
        kill_times=kill_times,
        allowed=lambda a: ("ENOTCONN", "ECONNABORTED") if a.agent.startswith(("h1-", "h2-")) else (),
        shell=True,
    )
    back = [_after(acknowledged, t, (host,)) for host, t, _ in remounts]
    row.faults = len(kill_times)
    row.recovery = (
        f"remount ≤ {max((s for _, _, s in remounts), default=0.0):.2f} s, then a shell commit ≤ {_worst(back)}"
    )
    if None in back or any(b is not None and b > STALL_BOUND for b in back):
        row.result.fail(f"no shell commit through a remounted mount within {STALL_BOUND:g} s")
    return row


SCENARIOS: dict[str, Callable[[HostBed, Profile, int], list[Row]]] = {
    "sweeps": lambda tb, p, s: [sweep(tb, p, s, 1, "file"), sweep(tb, p, s, 4, "read-set")],
    "writer-kills": lambda tb, p, s: [writer_kills(tb, p, s)],
    "partition": lambda tb, p, s: [partition(tb, p, s)],
    "pg-restart": lambda tb, p, s: [pg_restart(tb, p, s)],
    "lost-replies": lambda tb, p, s: [lost_replies(tb, p, s)],
    "mount": lambda tb, p, s: [mount_daemon_kills(tb, p, s)],
}


# ---- the table -------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| scenario | operations | acknowledged commits | lost | double-applied | refusals | recovery | violations | wall s |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in rows:
        refusals = ", ".join(f"{reason} {n}" for reason, n in r.refusals.most_common()) or "-"
        lines.append(
            f"| {r.result.scenario} | {r.operations} | {r.acknowledged} | {r.lost} | {r.double_applied} | "
            f"{refusals} | {r.recovery} | {r.result.violations} | {r.result.wall:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--rounds", type=int, default=0, help="the long form: N rounds of every fault (0: the quick form)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    only = args.only.split(",") if args.only else list(SCENARIOS)
    if unknown := set(only) - set(SCENARIOS):
        parser.error(f"no scenario {', '.join(sorted(unknown))}; there are {', '.join(SCENARIOS)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profile = rounds(args.rounds) if args.rounds > 0 else QUICK
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cv-torture-hosts-") as workdir:
        with host_bed(Path(workdir)) as tb:
            for name in only:
                scenario = SCENARIOS[name]
                began = time.monotonic()
                done = scenario(tb, profile, args.seed)
                rows += done
                left = strays(tb)
                for r in done:
                    for stray in left:
                        r.result.fail(f"left running: {stray}")
                bad = sum(not r.passed for r in done)
                print(
                    f"{name}: {time.monotonic() - began:.1f} s" + (f", {bad} FAILED" if bad else ", passed"), flush=True
                )
        left = left_behind(tb)
    print(
        f"\ncoherent-volume torture over 3 hosts ({profile.name}, seed {args.seed}), {(time.monotonic() - started) / 60:.1f} min\n"
    )
    print(table(rows))
    for r in rows:
        for message in r.result.messages[:10]:
            print(f"{r.result.scenario}: {message}")
    print(
        f"\nleft behind: {', '.join(left) if left else 'nothing'} (namespaces, links, host inits, cluster, processes)"
    )
    return 0 if all(r.passed for r in rows) and not left else 1


if __name__ == "__main__":
    sys.exit(main())
