"""Lock holders whose death or liveness is hard to see: forked holders of the commit lock, and
lock() holders in another PID namespace.

Forked holders: writer processes each fork a child the default multiprocessing way (which goes
on writing its own file through the volume it inherited) and are kill -9'd at a moment they hold
the commit lock (seen in /proc/locks). The child is alive and holds every descriptor it
inherited; other writers must still commit within a bounded time, and a fresh writer must get
through at once. Each writer runs under a subreaper (`reaper_main`), so the orphaned child is
killed and reaped when the round ends.

PID namespaces: a lock() holder runs inside `unshare --pid --fork --mount-proc` (not as the
namespace's init, so its pid means something else on the host) and takes the write grant of a
file again and again, incrementing it under the grant, while agents on the host try to write it;
the last grant it takes it never releases: the namespace is killed. Host writes must be refused
'held' while it holds the grant, and its killed grant may only end at its TTL (the host cannot
see that process). `checker.check_holds` judges the grants, the ordinary history check the content.
"""

from __future__ import annotations

import ctypes
import json
import os
import queue
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import REPO, child, payload
from .checker import check_holds
from .history import Hold, Journal, Recorder, load_journal
from .judge import judge_volume, unexpected_errors
from .result import Result
from .sweeps import Sampler, load_records, spawn_agent, stop_all, wait_all
from .volumes import create, read_log, seed
from .workers import Agent, Workload

RESUME_BOUND = 5.0
"""Seconds within which writers must commit again after a commit-lock holder was killed."""


# ---- a subreaper for a process that forks --------------------------------------------------


def _children() -> list[int]:
    out: list[int] = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def reaper_main(argv: list[str]) -> None:
    """Run `argv` as a child subreaper: orphans of its descendants become ours. When our stdin
    closes (or after an hour), SIGKILL every process left below us and reap them all."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    select.select([sys.stdin], [], [], 3600)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for pid in _children():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return  # nothing left below us
        time.sleep(0.005)


# ---- forked holders ---------------------------------------------------------------------------


def _child_loop(vol: object, config: dict) -> None:
    """The forked child: increments its own file through the volume object it inherited (as an
    agent of its own, so that its tokens and its log entries tell it from its parent)."""
    vol.agent = config["agent"] + "-child"  # type: ignore[attr-defined]
    work = Workload([config["child_path"]], attempts=-1, fill=2000)
    Agent(vol.agent, vol, work, Recorder(config["child_record"]), random.Random(config["seed"] + 1)).run()  # type: ignore[attr-defined,arg-type]


def forked_writer_main(config: dict) -> None:
    """Open the volume, fork a child (multiprocessing's default start method), say both pids,
    then increment the shared files until killed."""
    import multiprocessing

    from coherent_volume import CoherentVolume

    vol = CoherentVolume(config["root"], agent=config["agent"])
    vol.read(config["paths"][0])  # the registry is in use before the fork
    forked = multiprocessing.Process(target=_child_loop, args=(vol, config))
    forked.start()
    print(f"ready {os.getpid()} {forked.pid}", flush=True)
    work = Workload(config["paths"], attempts=-1, fill=6000)
    Agent(config["agent"], vol, work, Recorder(config["record"]), random.Random(config["seed"])).run()


def commit_lock_holders(root: Path) -> set[int]:
    """Pids that /proc/locks says hold the volume's commit lock (an flock)."""
    st = os.stat(root / ".coherent" / "commit.lock")
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK" or "->" in fields:
                continue
            major, minor, ino = fields[5].split(":")
            if (
                int(ino) == st.st_ino
                and int(major, 16) == os.major(st.st_dev)
                and int(minor, 16) == os.minor(st.st_dev)
            ):
                holders.add(int(fields[4]))
    return holders


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else ""


PROBE = r"""
import sys, time
from coherent_volume import CoherentVolume
t = time.monotonic()
with CoherentVolume(sys.argv[1], agent=sys.argv[2]) as v:
    try:
        v.read(sys.argv[3])
    except FileNotFoundError:
        pass
    v.write(sys.argv[3], sys.argv[4])
print(f"{time.monotonic() - t:.3f}", flush=True)
"""


def _probe(root: Path, agent: str, data: bytes) -> float | None:
    """Seconds a fresh writer took to commit (None: not within the bound, or it failed)."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", PROBE, str(root), agent, "plans/probe.md", data.decode()],
            capture_output=True,
            text=True,
            timeout=RESUME_BOUND * 3,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(r.stdout) if r.returncode == 0 and r.stdout.strip() else None


def forked_holders(workdir: Path, kills: int, others: int = 2, seed_: int = 0) -> Result:
    """`kills` rounds: a forking writer (under a subreaper) is kill -9'd while it holds the commit
    lock; `others` plain API writers keep writing the same files all along."""
    rng = random.Random(seed_)
    root, records = create(workdir / "forked"), workdir / "forked-records"
    records.mkdir()
    paths = ["plans/f0.md", "plans/f1.md"]
    child_path = "plans/child.md"
    producers = seed(root, paths + [child_path])
    result = Result(f"forked lock holders ({kills}x kill -9 holding the commit lock)", others + 2)
    stop = records / "STOP"
    sampler = Sampler(root, paths + [child_path])
    writers: list[subprocess.Popen[str]] = []
    reapers: list[subprocess.Popen[str]] = []
    kill_times: list[float] = []
    resumes, probes = [], []
    caught = children_alive = 0
    started = time.monotonic()
    sampler.start()
    try:
        work = Workload(paths, attempts=-1, fill=3000, stop_file=str(stop))
        writers += [
            spawn_agent("api", root, f"other{i}", work, records / f"other{i}.jsonl", seed_ + i) for i in range(others)
        ]
        for k in range(kills):
            agent = f"forker{k}"
            config = {
                "root": str(root),
                "agent": agent,
                "paths": paths,
                "child_path": child_path,
                "seed": seed_ + k,
                "record": str(records / f"{agent}.jsonl"),
                "child_record": str(records / f"{agent}-child.jsonl"),
            }
            reaper = subprocess.Popen(
                child("lockholders", "reaper", *child("lockholders", "forked-writer", json.dumps(config))),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            reapers.append(reaper)
            try:
                fields = _line(reaper, 60).split()
                if len(fields) != 3 or fields[0] != "ready":
                    result.fail(f"round {k}: the forking writer did not start")
                    continue
                parent, forked = int(fields[1]), int(fields[2])
                time.sleep(rng.uniform(0.05, 0.3))
                holding, deadline = False, time.monotonic() + 10
                while not holding and time.monotonic() < deadline:
                    holding = parent in commit_lock_holders(root)
                    if not holding:
                        time.sleep(0.0005)
                os.kill(parent, signal.SIGKILL)  # at once: it held the lock a few microseconds ago
                killed_at = time.time()
                kill_times.append(killed_at)
                caught += holding
                children_alive += _alive(forked)
                took = _probe(root, f"probe{k}", payload.make(f"probe{k}", "-", k))
                if took is None:
                    result.fail(
                        f"round {k}: a fresh writer did not commit within {RESUME_BOUND * 3:g} s after the "
                        f"commit-lock holder was killed (its forked child alive: {_alive(forked)})"
                    )
                else:
                    probes.append(took)
                    if took > RESUME_BOUND:
                        result.fail(f"round {k}: a fresh writer took {took:.2f} s after the holder was killed")
                if not _alive(forked):
                    result.fail(f"round {k}: the forked child died with its parent: the round shows nothing")
                resumes.append(killed_at)
            finally:
                try:
                    _, err = reaper.communicate(input="", timeout=60)  # EOF: it kills and reaps what is below it
                    if reaper.returncode != 0:
                        result.fail(f"round {k}: the subreaper failed: {err.strip()[-400:]}")
                except subprocess.TimeoutExpired:
                    reaper.kill()
                    reaper.communicate()
                kill_times.append(time.time())  # the reaper killed the forked child by now
    finally:
        stop.touch()
        for e in wait_all(writers, timeout=120):
            result.fail(e)
        stop_all(writers + reapers)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    attempts = load_records(records)
    judge_volume(result, root, paths + [child_path], attempts, producers, samples, "file", kill_times=kill_times)
    unexpected_errors(result, attempts)
    waits = _resume_waits(attempts, resumes)
    for k, wait in enumerate(waits):
        if wait is None or wait > RESUME_BOUND:
            result.fail(f"round {k}: the other writers committed nothing within {RESUME_BOUND:g} s after the kill")
    if caught == 0:
        result.fail("harness: no writer was ever caught holding the commit lock")
    result.stats.update(
        kills=len(resumes),
        killed_holding_the_commit_lock=caught,
        forked_children_alive_at_the_kill=children_alive,
        max_resume_s=max((w for w in waits if w is not None), default=0.0),
        max_fresh_writer_s=max(probes, default=0.0),
    )
    return result


def _resume_waits(attempts: list, kills: list[float]) -> list[float | None]:
    """Per kill: seconds until the next commit accepted from another writer, None if none came."""
    done = sorted(a.t_write1 for a in attempts if a.committed and a.agent.startswith("other") and a.t_write1)
    return [next((t - k for t in done if t > k), None) for k in kills]


# ---- PID namespaces -------------------------------------------------------------------------


def ns_holder_main(config: dict) -> None:
    """Inside the namespace: `rounds` grants held for a while with an increment under each, then a
    last grant (TTL `kill_ttl`) held until the harness kills the namespace."""
    from coherent_volume import CoherentVolume

    rng = random.Random(config["seed"])
    path, agent = config["path"], config["agent"]
    journal, recorder = Journal(config["holds"]), Recorder(config["record"])
    where = f"pid {os.getpid()} in its PID namespace"
    vol = CoherentVolume(config["root"], agent=agent)
    increments = Agent(agent, vol, Workload([path], attempts=-1, fill=2000), recorder, rng)
    for _ in range(config["rounds"]):
        with vol.lock(path, ttl=60, timeout=60) as grant:
            start = time.time()
            time.sleep(rng.uniform(0.05, 0.25))
            increments.attempt()
            time.sleep(rng.uniform(0.05, 0.25))
            end = time.time()
        journal.put(Hold(agent, path, start, end, grant.expires_at, where))
        time.sleep(rng.uniform(0.05, 0.2))
    with vol.lock(path, ttl=config["kill_ttl"], timeout=60) as grant:
        journal.put(Hold(agent, path, time.time(), None, grant.expires_at, where + ", killed holding it"))
        print(f"locked {grant.expires_at}", flush=True)
        time.sleep(3600)


class _Lines:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.q.put(line.strip())
        self.q.put(None)

    def get(self, timeout: float) -> str | None:
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return None


def _namespace_init(unshare: subprocess.Popen[str]) -> int | None:
    try:
        with open(f"/proc/{unshare.pid}/task/{unshare.pid}/children") as f:
            kids = [int(p) for p in f.read().split()]
    except OSError:
        return None
    return kids[0] if len(kids) == 1 else None


def _end_namespace(unshare: subprocess.Popen[str]) -> None:
    """SIGKILL the namespace's init (every process in it dies with it), then reap `unshare`."""
    if unshare.poll() is None:
        init = _namespace_init(unshare)
        if init is not None:
            try:
                os.kill(init, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            unshare.wait(timeout=10)
        except subprocess.TimeoutExpired:
            unshare.kill()
    unshare.wait(timeout=30)


def pid_namespaces(
    workdir: Path, holders: int, rounds: int, kill_ttl: float = 2.0, agents: int = 2, seed_: int = 0
) -> Result:
    """`holders` namespaced holders one after another, each taking the grant `rounds` times and then
    killed while holding a grant of TTL `kill_ttl`, under `agents` API writers on the host."""
    root, records, holds = create(workdir / "pidns"), workdir / "pidns-records", workdir / "pidns-holds"
    records.mkdir()
    holds.mkdir()
    path, other = "plans/ns.md", "plans/free.md"
    producers = seed(root, [path, other])
    result = Result(f"PID namespaces: {holders} lock() holders x {rounds} grants, killed holding the last", agents + 1)
    stop = records / "STOP"
    sampler = Sampler(root, [path, other])
    writers: list[subprocess.Popen[str]] = []
    namespaces: list[subprocess.Popen[str]] = []
    kill_times: list[float] = []
    started = time.monotonic()
    sampler.start()
    try:
        work = Workload([path, other], attempts=-1, fill=2000, stop_file=str(stop))
        writers += [
            spawn_agent("api", root, f"host{i}", work, records / f"host{i}.jsonl", seed_ + i) for i in range(agents)
        ]
        for h in range(holders):
            config = {
                "root": str(root),
                "path": path,
                "agent": f"inside{h}",
                "rounds": rounds,
                "kill_ttl": kill_ttl,
                "seed": seed_ + 10 + h,
                "holds": str(holds / f"inside{h}.jsonl"),
                "record": str(records / f"inside{h}.jsonl"),
            }
            # sh stays the namespace's init, so the holder is not pid 1 there
            unshare = subprocess.Popen(
                [
                    "unshare",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--kill-child",
                    "sh",
                    "-c",
                    '"$0" -m tests.harness.lockholders ns-holder "$1"; :',
                    sys.executable,
                    json.dumps(config),
                ],
                stdout=subprocess.PIPE,
                stderr=open(holds / f"inside{h}.err", "w"),
                text=True,
                cwd=REPO,
            )
            namespaces.append(unshare)
            try:
                line = _Lines(unshare).get(timeout=60 + rounds * 2)
                if line is None or not line.startswith("locked "):
                    _end_namespace(unshare)
                    err = (holds / f"inside{h}.err").read_text().strip()[-400:]
                    result.fail(f"holder {h}: never reached its last grant ({line!r}): {err}")
                    continue
                expires_at = float(line.split()[1])
                _end_namespace(unshare)
                kill_times.append(time.time())
                if time.time() > expires_at - 0.5:
                    result.fail(f"holder {h}: killed too late to show anything (TTL {kill_ttl:g} s)")
                time.sleep(max(0.0, expires_at - time.time()) + 1.0)  # host agents try all along, then past it
            finally:
                _end_namespace(unshare)
    finally:
        stop.touch()
        for e in wait_all(writers, timeout=120):
            result.fail(e)
        for unshare in namespaces:
            _end_namespace(unshare)
        stop_all(writers)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    attempts = load_records(records)
    judge_volume(result, root, [path, other], attempts, producers, samples, "file", kill_times=kill_times)
    unexpected_errors(result, attempts)
    recorded = [r for f in sorted(holds.iterdir()) for r in load_journal(f) if isinstance(r, Hold)]
    result.absorb(check_holds(recorded, read_log(root), attempts))
    held = sum(1 for a in attempts if a.agent.startswith("host") and a.reason == "held")
    if held == 0:
        result.fail("harness: no host write met a namespaced grant ('held'): the scenario showed nothing")
    killed = [h for h in recorded if h.end is None]
    waited = [
        min(
            (
                a.t_write1
                for a in attempts
                if a.committed
                and a.target == path
                and a.agent.startswith("host")
                and a.t_write1
                and a.t_write1 > h.start
            ),
            default=float("nan"),
        )
        - h.expires_at
        for h in killed
    ]
    result.stats.update(
        grants=len(recorded),
        killed_holding=len(killed),
        host_writes_refused_held=held,
        first_host_commit_after_expiry_s=max(waited, default=0.0),
    )
    return result


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "reaper":
        reaper_main(sys.argv[2:])
    else:
        {"forked-writer": forked_writer_main, "ns-holder": ns_holder_main}[kind](json.loads(sys.argv[2]))
