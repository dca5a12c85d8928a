"""Contention sweeps: N agents doing read-modify-write increments on one file, or on a set of
files with random cross-file reads, through API threads, API processes, or shell processes in a
mount; and the same workload on a plain directory, where the checker must find lost updates."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from coherent_volume import CoherentVolume

from . import REPO, child, payload
from .history import Attempt, Producer, Recorder, load_json_records, load_shell_records
from .judge import judge_plain, judge_volume
from .mounts import Mount
from .result import Result
from .volumes import create, raw_read, seed
from .workers import Agent, Workload, process_config

SHELL_AGENT = Path(__file__).resolve().parent / "shell_agent.sh"


@dataclass
class Sweep:
    face: str  # "threads" | "processes" | "shell" | "plain"
    agents: int
    files: int = 1  # 1: all agents on one file; more: a set of files with cross reads
    attempts: int = 400  # write attempts in total, shared among the agents
    isolation: str = "file"
    cross: int = 2
    think: float = 0.0
    fill: int = 4000
    judge_as: str | None = None  # judge with other rules than the run's (control runs)
    expect_violations: bool = False

    @property
    def name(self) -> str:
        layout = "1 file" if self.files == 1 else f"{self.files} files, cross reads"
        iso = "" if self.files == 1 and self.isolation == "file" else f", {self.isolation}"
        judged = f" judged as {self.judge_as}" if self.judge_as else ""
        return f"sweep {self.face}: {layout}{iso}{judged}"

    def paths(self) -> list[str]:
        return ["plans/counter.md"] if self.files == 1 else [f"plans/f{i}.md" for i in range(self.files)]

    def workload(self) -> Workload:
        return Workload(
            self.paths(),
            max(1, self.attempts // self.agents),
            self.cross if self.files > 1 else 0,
            self.fill,
            self.think,
            self.isolation,
        )


class Sampler(threading.Thread):
    """Reads the backing files directly, over and over, recording which content it saw."""

    def __init__(self, root: Path, paths: list[str], period: float = 0.003) -> None:
        super().__init__(daemon=True)
        self.root, self.paths, self.period = root, paths, period
        self.samples: set[tuple[str, str | None]] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            for path in self.paths:
                r = raw_read(self.root, path)
                if r.error is None:
                    self.samples.add((path, r.token))
            self._halt.wait(self.period)

    def stop(self) -> set[tuple[str, str | None]]:
        self._halt.set()
        self.join()
        return self.samples


def spawn_agent(face: str, root: Path, agent: str, work: Workload, record: Path, seed_: int) -> subprocess.Popen[str]:
    """An agent in its own Python process (see workers.process_main); prints 'ready' when open."""
    return subprocess.Popen(
        child("workers", process_config(face, root, agent, work, record, seed_)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def spawn_shell_agent(
    mnt: Path,
    agent: str,
    work: Workload,
    records: Path,
    seed_: int,
    stop: Path | None = None,
    process: str | None = None,
) -> subprocess.Popen[str]:
    """A bash agent in the mount (shell_agent.sh), as COHERENT_AGENT=agent. `process` tells one of
    several processes of one agent apart: its records are AGENT~PROCESS.log, its tokens
    AGENT~PROCESS.N (see load_records)."""
    name = f"{agent}~{process}" if process else agent
    env = shell_agent_env(mnt, agent, name, work, records, seed_, stop or records / "STOP")
    return subprocess.Popen(
        ["bash", str(SHELL_AGENT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/"
    )


def shell_agent_env(
    mnt: Path, agent: str, name: str, work: Workload, records: Path, seed_: int, stop: Path
) -> dict[str, str]:
    """The environment of a bash agent (shell_agent.sh) writing `work` through the mount at `mnt` as
    COHERENT_AGENT=agent, its records RECORDS/NAME.log, stopping once `stop` exists."""
    return {
        **os.environ,
        "COHERENT_AGENT": agent,
        "NAME": name,
        "MNT": str(mnt),
        "FILES": " ".join(work.paths),
        "CROSS": str(work.cross),
        "ATTEMPTS": str(work.attempts),
        "FILL": str(min(work.fill, 300)),
        "REC": str(records / f"{name}.log"),
        "ERRF": str(records / f"{name}.err"),
        "SEED": str(seed_ % 32768),
        "STOP": str(stop),
    }


def _threads(root: Path, work: Workload, records: Path, n: int, seed_: int) -> list[str]:
    barrier = threading.Barrier(n)
    errors: list[str] = []

    def body(i: int) -> None:
        try:
            name = f"t{i}"
            vol = CoherentVolume(root, agent=name, isolation=work.isolation)  # type: ignore[arg-type]
            recorder = Recorder(records / f"{name}.jsonl")
            barrier.wait()
            Agent(name, vol, work, recorder, random.Random(seed_ + i)).run()
            vol.close()
            recorder.close()
        except Exception as e:  # an agent must never crash: that is a finding
            errors.append(f"agent t{i} crashed: {e!r}")

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def wait_all(procs: list[subprocess.Popen[str]], timeout: float = 1800) -> list[str]:
    """Wait for agent processes; an agent that failed is a finding."""
    errors = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors.append(f"agent process exited with {p.returncode}: {err.strip()[-500:]}")
    return errors


def stop_all(procs: list[subprocess.Popen[str]]) -> None:
    """Kill whatever of `procs` still runs, reap every one of them and close their pipes (safe to
    call on processes already waited for)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # SIGKILLed: only an uninterruptible sleep delays it, and nothing here can help that
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


def load_records(records: Path) -> list[Attempt]:
    """Every attempt recorded in a records directory (Python agents' .jsonl, shell agents' .log)."""
    attempts: list[Attempt] = []
    for f in sorted(records.iterdir()):
        if f.suffix == ".jsonl":
            attempts += load_json_records(f)
        elif f.suffix == ".log":
            attempts += load_shell_records(f, f.stem.split("~")[0])  # AGENT~PROCESS.log: one of its processes
    return attempts


def _seed_plain(root: Path, paths: list[str]) -> list[Producer]:
    (root / "plans").mkdir(parents=True)
    out = []
    for path in paths:
        token = payload.seed_token(path)
        (root / path).write_bytes(payload.make(token, "-", 0))
        out.append(Producer("seed", path, token, 0, None, time.time()))
    return out


def run_sweep(spec: Sweep, workdir: Path, seed_: int = 0) -> Result:
    """Run one sweep configuration in a fresh directory under `workdir` and check its history."""
    slug = f"{spec.face}-{spec.agents}-{spec.files}-{spec.isolation}-{seed_}"
    root, records = workdir / slug, workdir / f"{slug}-records"
    records.mkdir(parents=True)
    paths, work = spec.paths(), spec.workload()
    result = Result(spec.name, spec.agents, expect_violations=spec.expect_violations)
    if spec.face == "plain":
        producers = _seed_plain(root, paths)
    else:
        producers = seed(create(root), paths)
    sampler = Sampler(root, paths)
    sampler.start()
    started = time.monotonic()
    try:
        errors = _drive(spec, root, work, records, workdir / f"{slug}-mnt", seed_)
    finally:
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    for e in errors:
        result.fail(e)
    attempts = load_records(records)
    if spec.face == "plain":
        judge_plain(result, root, paths, attempts, producers, samples)
    else:
        judge_volume(
            result,
            root,
            paths,
            attempts,
            producers,
            samples,
            spec.isolation,
            shell=spec.face == "shell",
            judge_as=spec.judge_as,
        )
    return result


def _drive(spec: Sweep, root: Path, work: Workload, records: Path, mnt: Path, seed_: int) -> list[str]:
    n = spec.agents
    if spec.face == "threads":
        return _threads(root, work, records, n, seed_)
    if spec.face in ("processes", "plain"):
        face = "plain" if spec.face == "plain" else "api"
        return wait_all([spawn_agent(face, root, f"p{i}", work, records / f"p{i}.jsonl", seed_ + i) for i in range(n)])
    with Mount(root, mnt):
        return wait_all([spawn_shell_agent(mnt, f"s{i}", work, records, seed_ + i) for i in range(n)])
