"""The scenarios of a run, sized by a profile: `QUICK` (what pytest runs) or `FULL`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import crashes, faults, foreign, fuzz, isolation, links, lockholders, renames, same_agent
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
    same_agent_processes: int = 3  # processes of one agent, each appending and each writing in place
    same_agent_appends: int = 15  # accepted appends per process
    same_agent_slot_writes: int = 10  # accepted in-place increments per process
    rename_rounds: int = 4  # round trips of plans/ (alternately out of the globs and to archive/)
    exchanges: int = 12  # RENAME_EXCHANGE attempts in swap/
    link_rounds: int = 2  # rounds of every link and symlink attack
    forked_kills: int = 3  # forking writers killed while holding the commit lock
    ns_holders: int = 1  # namespaced lock() holders, each killed holding its last grant
    ns_grants: int = 3  # grants each one takes (and releases) before that
    ns_kill_ttl: float = 1.5  # TTL of the grant it is killed holding


QUICK = Profile("quick")
FULL = Profile(
    "full",
    api_attempts=4200,
    shell_attempts=1500,
    writer_kills=220,
    daemon_kills=22,
    foreign_writes=300,
    fuzz_examples=400,
    same_agent_processes=4,
    same_agent_appends=250,
    same_agent_slot_writes=150,
    rename_rounds=60,
    exchanges=200,
    link_rounds=100,
    forked_kills=40,
    ns_holders=3,
    ns_grants=12,
    ns_kill_ttl=3.0,
)


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
    return [
        # a pause of up to 20 ms between each read and its write: the workers' windows overlap (and
        # lose updates) even on a loaded machine, where 2 ms once left a run with none
        Sweep("plain", 4, 1, max(p.api_attempts // 2, 80), think=0.02, expect_violations=True),
        Sweep("plain", 4, p.files, max(p.api_attempts // 2, 80), think=0.02, expect_violations=True),
        Sweep("threads", 4, 3, max(p.api_attempts, 160), judge_as="read-set", expect_violations=True),
    ]


OPT_IN = frozenset({"same-agent-rmw"})
"""Groups that run only when named in --only: they show a known loss that is not fixed (yet)."""


def groups(p: Profile, seed: int) -> dict[str, Callable[[Path], list[Result]]]:
    """Scenario groups by name; each runs in its own directory and returns report rows (the OPT_IN
    ones only when asked for by name)."""
    return {
        "sweeps": lambda d: [run_sweep(s, d, seed) for s in sweep_specs(p)],
        "controls": lambda d: [run_sweep(s, d, seed) for s in control_specs(p)],
        "writer-kills": lambda d: [crashes.writer_kills(d, p.writer_kills, seed_=seed)],
        "daemon-kills": lambda d: [crashes.daemon_kills(d, p.daemon_kills, seed_=seed)],
        "foreign": lambda d: [foreign.foreign_writes(d, p.foreign_writes, seed_=seed)],
        "resources": lambda d: [faults.enospc(d), faults.busy_registry(d), faults.deleted_backing_file(d)],
        "fuzz": lambda d: [
            _sub(fuzz.fuzz_paths, d, "paths", p.fuzz_examples, seed),
            _sub(fuzz.fuzz_globs, d, "globs", p.fuzz_examples, seed),
            _sub(fuzz.fuzz_registry, d, "registry", p.fuzz_examples, seed),
        ],
        "isolation": lambda d: [isolation.registry_isolation(d)],
        "same-agent": lambda d: [
            same_agent.same_agent(d, p.same_agent_appends, p.same_agent_slot_writes, p.same_agent_processes, seed_=seed)
        ],
        "renames": lambda d: [renames.renames(d, p.rename_rounds, p.exchanges, seed_=seed)],
        "links": lambda d: [links.links(d, p.link_rounds, seed_=seed)],
        "forked-holders": lambda d: [lockholders.forked_holders(d, p.forked_kills, seed_=seed)],
        "pid-namespaces": lambda d: [
            lockholders.pid_namespaces(d, p.ns_holders, p.ns_grants, p.ns_kill_ttl, seed_=seed)
        ],
        "same-agent-rmw": lambda d: [same_agent.same_agent_rmw(d, p.shell_attempts)],
    }


def _sub(run: Callable[[Path, int, int], Result], d: Path, name: str, examples: int, seed: int) -> Result:
    sub = d / name
    sub.mkdir()
    return run(sub, examples, seed)
