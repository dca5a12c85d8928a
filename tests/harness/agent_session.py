"""A stand-in for an agent program (Claude Code, Gemini CLI, Cursor, Codex) in the hook tests:
one long-lived process that runs `coherent-volume hook FACE` as its own child (so the hook finds it
as the session's process, as it finds the real agent), reads and writes files itself, the way
those agents' tools do (in place, through a mount when the file lies in one), and runs programs
as its children (`run`).

Events come from `tests/fixtures/<agent>/events.json`, shaped as the agent's documentation
specifies; `fixture(agent)` loads them and `fill` puts a test's paths and ids into their
`{placeholders}`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from . import CLI, REPO

FIXTURES = REPO / "tests" / "fixtures"

_LOOP = r"""
import json, subprocess, sys
for line in sys.stdin:
    req = json.loads(line)
    try:
        if req["op"] == "hook":
            r = subprocess.run(req["argv"], input=req["stdin"], capture_output=True, text=True, timeout=60)
            out = {"code": r.returncode, "stdout": r.stdout.strip(), "stderr": r.stderr.strip()}
        elif req["op"] == "read":
            with open(req["path"]) as f:
                out = {"text": f.read()}
        elif req["op"] == "run":  # a child of the agent's process: a tool that runs a program
            r = subprocess.run(req["argv"], capture_output=True, text=True, timeout=60)
            out = {"code": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
        else:
            with open(req["path"], "w") as f:  # the agents' write tools write in place
                f.write(req["text"])
            out = {"code": 0}
    except OSError as e:
        out = {"code": 1, "errno": e.errno, "stderr": str(e)}
    print(json.dumps(out), flush=True)
"""


RUN = secrets.token_hex(3)
"""This test run's mark on the session ids its hooks are given (`unique`, with the test's)."""


def unique(name: str) -> str:
    """The session id a test's `name` stands for, unique to the test and this test run: what a
    session's hooks keep about it (the volumes it works in, the stale views it was told of) is a
    file of this user's named by the session, so two tests, or two test runs at once, would
    otherwise share each other's for sessions of one name (and a session's events would visit
    another test's volumes)."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]  # its node id, without the phase
    return f"{name}-{RUN}-{hashlib.sha256(test.encode()).hexdigest()[:6]}"


def fixture(agent: str) -> dict[str, Any]:
    """The events of `tests/fixtures/<agent>/events.json`, by name."""
    data = json.loads((FIXTURES / agent / "events.json").read_text())
    assert data["documentation"].startswith("https://"), "each fixture names the documentation it follows"
    return data["events"]


def fill(template: Any, **values: object) -> Any:
    """`template` (an event) with every `{name}` in its strings replaced by `values[name]`; a string
    that is only `{name}` becomes the value itself (a list, a number; a path as text)."""
    values = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}
    if isinstance(template, dict):
        return {k: fill(v, **values) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, **values) for v in template]
    if isinstance(template, str):
        whole = template[1:-1] if template.startswith("{") and template.endswith("}") else None
        if whole in values:
            return values[whole]
        for name, value in values.items():
            template = template.replace("{" + name + "}", str(value))
    return template


class AgentProcess:
    """One agent program's process (a session's or conversation's), stopped by `close`."""

    def __init__(self, face: str, cwd: Path) -> None:
        """The program of agent `face`, started in `cwd`."""
        self.face = face
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-c", _LOOP],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=cwd,
            env={k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"},
        )

    def _call(self, request: dict[str, object]) -> dict[str, Any]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def hook(self, event: dict[str, Any] | str) -> dict[str, Any]:
        """Run `coherent-volume hook FACE` with the event on stdin: code, stdout (parsed JSON, or
        None when empty) and stderr."""
        stdin = event if isinstance(event, str) else json.dumps(event)
        out = self._call({"op": "hook", "argv": [CLI, "hook", self.face], "stdin": stdin})
        out["json"] = json.loads(out["stdout"]) if out["stdout"] else None
        return out

    def read(self, path: Path) -> str:
        return str(self._call({"op": "read", "path": str(path)})["text"])

    def write(self, path: Path, text: str) -> dict[str, Any]:
        """Write `text` over `path` in place, as the agent's tool does: code 0, or 1 with errno."""
        return self._call({"op": "write", "path": str(path), "text": text})

    def run(self, *argv: str) -> dict[str, Any]:
        """Run a program as a child of the agent's process: code, stdout, stderr."""
        return self._call({"op": "run", "argv": list(argv)})

    def begin(self) -> None:
        """The agent's session start, as its hooks see it (`started`); nothing by default."""

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


Params = ParamSpec("Params")
Agent = TypeVar("Agent", bound=AgentProcess)


def started(make: Callable[Params, Agent]) -> Iterator[Callable[Params, Agent]]:
    """The body of a fixture that makes agent processes: each one made has begun its session
    (`begin`), and is closed (its session ended) at teardown."""
    made: list[Agent] = []

    def begun(*args: Params.args, **kwargs: Params.kwargs) -> Agent:
        agent = make(*args, **kwargs)
        made.append(agent)
        agent.begin()
        return agent

    yield begun
    for agent in made:
        agent.close()


def timed_hook(face: str, event: dict[str, Any] | str) -> tuple[subprocess.CompletedProcess[str], float]:
    """`coherent-volume hook FACE` run once with `event` on stdin (from this process, which no agent
    runs as), and the seconds it took."""
    began = time.monotonic()
    stdin = event if isinstance(event, str) else json.dumps(event)
    r = subprocess.run([CLI, "hook", face], input=stdin, capture_output=True, text=True, timeout=60)
    return r, time.monotonic() - began


_HOLD = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


@contextmanager
def commit_lock_held(root: Path) -> Iterator[None]:
    """Another process holds the volume's commit lock (as a writer stuck in a commit would) until
    the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(root / ".coherent" / "commit.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        yield
    finally:
        holder.kill()
        holder.wait()
