"""The scenarios of a run, sized by a profile: `QUICK` (what pytest runs) or `FULL`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import crashes, faults, foreign, fuzz, isolation
from .result import Result
from .sweeps import Sweep, run_sweep


@dataclass(frozen=True)
class Profile:
    name: str
    agents: tuple[int, ...] = (2, 4, 8, 16)
    api_attempts: int = 160  # write attempts per API sweep configuration (all agents together)
    shell_attempts: int = 64  # per shell sweep configuration
    files: int = 6
    writer_kills: int = 12
    daemon_kills: int = 3
    foreign_writes: int = 20
    fuzz_examples: int = 40


QUICK = Profile("quick")
FULL = Profile("full", api_attempts=4200, shell_attempts=1500, writer_kills=220, daemon_kills=22,
               foreign_writes=300, fuzz_examples=400)


def sweep_specs(p: Profile, faces: tuple[str, ...] = ("threads", "processes", "shell")) -> list[Sweep]:
    """Every face x agent count x layout (one file; many files with cross reads, per isolation)."""
    specs = []
    for face in faces:
        attempts = p.shell_attempts if face == "shell" else p.api_attempts
        layouts = [(1, "file"), (p.files, "file")] + ([] if face == "shell" else [(p.files, "read-set")])
        for n in p.agents:
            specs += [Sweep(face, n, files, attempts, isolation) for files, isolation in layouts]
    return specs


def control_specs(p: Profile) -> list[Sweep]:
    """Runs where the checker must find violations: it is shown to catch them."""
    return [Sweep("plain", 4, 1, max(p.api_attempts // 2, 80), think=0.002, expect_violations=True),
            Sweep("plain", 4, p.files, max(p.api_attempts // 2, 80), think=0.002, expect_violations=True),
            Sweep("threads", 4, 3, max(p.api_attempts, 160), judge_as="read-set", expect_violations=True)]


def groups(p: Profile, seed: int) -> dict[str, Callable[[Path], list[Result]]]:
    """Scenario groups by name; each runs in its own directory and returns report rows."""
    return {
        "sweeps": lambda d: [run_sweep(s, d, seed) for s in sweep_specs(p)],
        "controls": lambda d: [run_sweep(s, d, seed) for s in control_specs(p)],
        "writer-kills": lambda d: [crashes.writer_kills(d, p.writer_kills, seed_=seed)],
        "daemon-kills": lambda d: [crashes.daemon_kills(d, p.daemon_kills, seed_=seed)],
        "foreign": lambda d: [foreign.foreign_writes(d, p.foreign_writes, seed_=seed)],
        "resources": lambda d: [faults.enospc(d), faults.busy_registry(d), faults.deleted_backing_file(d)],
        "fuzz": lambda d: [_sub(fuzz.fuzz_paths, d, "paths", p.fuzz_examples, seed),
                           _sub(fuzz.fuzz_globs, d, "globs", p.fuzz_examples, seed),
                           _sub(fuzz.fuzz_registry, d, "registry", p.fuzz_examples, seed)],
        "isolation": lambda d: [isolation.registry_isolation(d)],
    }


def _sub(run: Callable[[Path, int, int], Result], d: Path, name: str, examples: int, seed: int) -> Result:
    sub = d / name
    sub.mkdir()
    return run(sub, examples, seed)
