"""The multi-host bed of the tests (pytest only): three namespace hosts (nethosts.py) and a private
PostgreSQL cluster listening on their bridge (pgcluster.py), one volume per test in a fresh
database of that cluster with a working copy per host, and Python processes in the hosts that
answer JSON lines.

Invariants:
- a working copy is made by the real CLI (`coherent-volume init`) run in its host: the first host
  of a volume creates it (managing MANAGED), every later one joins it;
- every process a `BedVolume` started is stopped when the volume's context ends, in any outcome;
- `three_hosts` asserts at its end that the bed left nothing behind.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

import pytest

from . import CLI

if TYPE_CHECKING:
    from .nethosts import Bed, Host
    from .pgcluster import Cluster

PY = sys.executable
MANAGED = "plans/**"
VOLUME = "team"

Hosts = tuple["Bed", "Cluster"]
"""The bed of three hosts and the cluster listening on its bridge."""

needs_bed = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nsenter") is None or shutil.which("nft") is None,
    reason="the multi-host bed needs root, nsenter and nft",
)

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
        elif verb == "delete":
            out = {"version": vol.delete(path)}
        elif verb == "history":
            out = {"history": [[h.version, h.kind, h.writer] for h in vol.history(path)]}
        else:
            raise ValueError(f"no verb {verb!r}")
    except StaleWriteError as e:
        out = {"refused": e.reason, "current": e.current_version}
    except RegistryError as e:
        out = {"error": type(e).__name__, "message": str(e), "errno": e.errno}
    except FileNotFoundError:
        out = {"missing": True}
    out["seconds"] = time.monotonic() - began
    print(json.dumps(out), flush=True)
"""
"""An API agent (argv: root, agent name), driven by JSON lines [verb, path, data?] on its stdin
(verbs read, write, delete, history), one JSON answer each; an unknown verb ends it."""


def three_hosts() -> Iterator[Hosts]:
    """The bed for a module fixture (`yield from`): skips where psycopg or PostgreSQL's server is
    missing; the cluster runs in memory without fsync (no test cuts the power)."""
    pytest.importorskip("psycopg")
    from .nethosts import bed
    from .pgcluster import bindir, cluster

    if bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: postgresql)")
    with bed(3) as b:
        memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with cluster(
            listen=[b.bridge_address], trust=[f"{b.bridge_address}/24"], settings={"fsync": "off"}, parent=memory
        ) as pg:
            yield b, pg
    assert not b.leftovers()


def sql(url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query straight on the database at `url` (autocommit), never through coherent_volume; its
    rows ([] for a statement that returns none)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


def init(run: Callable[..., subprocess.CompletedProcess[str]], root: Path, url: str, *, create: bool) -> Path:
    """`root` made a working copy of the volume VOLUME at `url` by `coherent-volume init` run with
    `run` (a host's `run`, or `subprocess.run` for this machine): creating the volume, managing
    MANAGED, or joining it with every file installed."""
    creating = ["-m", MANAGED] if create else []
    done = run(
        [CLI, "init", str(root), *creating, "--registry", url, "--volume", VOLUME],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return root


class LineProcess:
    """`python -c SCRIPT ARGS` in a host, answering lines on its stdin with JSON lines; `what` names
    it in errors."""

    def __init__(self, host: Host, what: str, script: str, *args: str) -> None:
        self.host, self.what = host, what
        self.proc: subprocess.Popen[str] = host.popen(
            [PY, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def answer(self, timeout: float = 60) -> dict[str, Any]:
        """Its next line; a process that gives none in `timeout` s is killed and its stderr shown."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate()
            raise AssertionError(f"{self.what} on {self.host.name} gave no answer in {timeout} s: {err[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, request: object, timeout: float = 60) -> dict[str, Any]:
        """`request` sent as one JSON line; its answer."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.answer(timeout)

    def close(self) -> None:
        """Its stdin closed (it exits), waited for (killed after 30 s); idempotent."""
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


class Agent(LineProcess):
    """An AGENT process in a host, named `name`, on the working copy `root`; its volume is open
    once it is made."""

    def __init__(self, host: Host, root: Path, name: str) -> None:
        super().__init__(host, f"agent {name}", AGENT, str(root), name)
        self.name = name
        assert self.answer() == {"ready": True}

    def do(self, verb: str, path: str, *data: str, timeout: float = 60) -> dict[str, Any]:
        return self.ask([verb, path, *data], timeout)

    def read(self, path: str) -> str:
        answer = self.do("read", path)
        assert "data" in answer, answer
        return str(answer["data"])

    def write(self, path: str, data: str) -> dict[str, Any]:
        """The answer: a version, or a refusal or error (see AGENT)."""
        return self.do("write", path, data)


Process = TypeVar("Process", bound=LineProcess)


class BedVolume:
    """One volume in a fresh database of the bed's cluster, with the root of host hN at
    `roots[N-1]` once hN joined (`join`); the first `joined` hosts join at once. A context: its
    processes (`started`) are closed at its end, last started first."""

    def __init__(self, hosts: Hosts, base: Path, joined: int = 3) -> None:
        bed, pg = hosts
        database = f"t_{secrets.token_hex(6)}"
        pg.create_database(database)
        self.hosts, self.url = bed.hosts, pg.url(database)
        self.roots = [base / f"h{n}" for n in range(1, len(bed.hosts) + 1)]
        self.processes: list[LineProcess] = []
        self._joined: set[int] = set()
        for n in range(1, joined + 1):
            self.join(n)

    def join(self, n: int) -> Path:
        """The root of host hN, made a working copy in hN the first time it is asked for."""
        if n not in self._joined:
            init(self.hosts[n - 1].run, self.roots[n - 1], self.url, create=not self._joined)
            self._joined.add(n)
        return self.roots[n - 1]

    def started(self, process: Process) -> Process:
        """`process`, closed at the end of the volume's context."""
        self.processes.append(process)
        return process

    def agent(self, n: int, name: str) -> Agent:
        """An agent `name` in host hN, on its root."""
        return self.started(Agent(self.hosts[n - 1], self.join(n), name))

    def sql(self, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return sql(self.url, statement, args)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *failure: object) -> None:
        while self.processes:
            self.processes.pop().close()
