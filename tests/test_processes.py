"""Many processes on one registry: real subprocesses, real SQLite file, real kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, StaleWriteError
from coherent_volume.fingerprint import content_hash

from .conftest import REPO, run_py

P = "plans/plan.md"


def spawn(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )


def test_update_from_four_processes_is_exact(root: Path) -> None:
    code = """
import sys
from coherent_volume import CoherentVolume
with CoherentVolume(sys.argv[1], agent=sys.argv[2]) as v:
    for _ in range(40):
        v.update("plans/counter", lambda old: str(int(old or b"0") + 1).encode(), retries=10_000)
"""
    procs = [spawn(code, str(root), f"p{i}") for i in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with CoherentVolume(root, agent="check") as v:
        assert v.read("plans/counter") == b"160"
        assert v.version("plans/counter") == 160


def test_racing_creators_in_separate_processes_exactly_one_wins(root: Path) -> None:
    go = root / "go"
    code = """
import os, sys, time
from coherent_volume import CoherentVolume, StaleWriteError
v = CoherentVolume(sys.argv[1], agent=sys.argv[2])
while not os.path.exists(sys.argv[3]):
    time.sleep(0.001)
try:
    v.write("plans/race.md", sys.argv[2].encode())
    print("won")
except StaleWriteError as e:
    print(e.reason)
"""
    procs = [spawn(code, str(root), f"creator{i}", str(go)) for i in range(6)]
    time.sleep(0.5)
    go.touch()
    outcomes = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outcomes.append(out.strip())
    assert outcomes.count("won") == 1 and outcomes.count("unread") == 5
    winner = f"creator{outcomes.index('won')}"
    assert (root / "plans/race.md").read_text() == winner


def test_grant_of_a_killed_holder_is_reclaimed_at_once(root: Path) -> None:
    with CoherentVolume(root, agent="bob") as bob:
        bob.write(P, b"x")
        holder = spawn(
            """
import sys, time
from coherent_volume import CoherentVolume
v = CoherentVolume(sys.argv[1], agent="alice")
with v.lock("plans/plan.md", ttl=3600):
    print("locked", flush=True)
    time.sleep(3600)
""",
            str(root),
        )
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StaleWriteError, match="held"):
            bob.write(P, b"while alice holds it")
        holder.kill()
        holder.wait()
        assert bob.write(P, b"after alice died") == 2
    log = run_py("import sys; from coherent_volume.cli import main; main()", "log", str(root), "--json")
    kinds = [json.loads(line)["kind"] for line in log.stdout.splitlines()]
    assert "reclaim" in kinds


def _kill_at(point: str, root: Path) -> subprocess.CompletedProcess[str]:
    """A writer that SIGKILLs itself at `point` of a commit: just before or just after the rename."""
    return run_py(
        f"""
import os, signal, sys
from coherent_volume import CoherentVolume, atomic
real_rename = atomic.rename
def dying_rename(src, dst, **flags):
    if "{point}" == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst, **flags)
    os.kill(os.getpid(), signal.SIGKILL)
v = CoherentVolume(sys.argv[1], agent="victim")
v.read("plans/plan.md")
atomic.rename = dying_rename
v.write("plans/plan.md", b"the victim's new content")
""",
        str(root),
    )


def test_kill_after_rename_completes_the_commit_for_its_writer(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"old")
    assert _kill_at("after", root).returncode == -signal.SIGKILL
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == b"the victim's new content"
        assert bob.version(P) == 2
    rows = (
        sqlite3.connect(root / ".coherent/registry.db")
        .execute("SELECT writer, version FROM files WHERE path = ?", (P,))
        .fetchall()
    )
    assert rows == [("victim", 2)]
    assert os.listdir(root / "plans") == ["plan.md"]


def test_kill_before_rename_has_recovery_install_the_recorded_commit(root: Path) -> None:
    """A commit is recorded (its bytes stored, its staged file named) before its install: a writer
    killed just before its rename has its version installed by the next operation, and an agent
    whose view predates it is refused until it reads it."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"old")
    assert _kill_at("before", root).returncode == -signal.SIGKILL
    with CoherentVolume(root, agent="alice") as alice:
        assert alice.version(P) == 2
        with pytest.raises(StaleWriteError):
            alice.write(P, b"alice continues")
        assert alice.read(P) == b"the victim's new content"
        assert alice.write(P, b"alice continues") == 3
    assert os.listdir(root / "plans") == ["plan.md"]
    assert os.listdir(root / ".coherent/staging") == [], "the staged file was installed, nothing left"


def test_kill_9_at_random_instants_never_tears_a_file_or_desyncs_the_registry(root: Path) -> None:
    payloads = [bytes([65 + i]) * (256 * 1024) for i in range(4)]
    hashes = {content_hash(p) for p in payloads}
    with CoherentVolume(root, agent="init") as v:
        v.write(P, payloads[0])
    writer = """
import sys
from coherent_volume import CoherentVolume
payloads = [bytes([65 + i]) * (256 * 1024) for i in range(4)]
v = CoherentVolume(sys.argv[1], agent="writer")
i = 0
while True:
    v.update("plans/plan.md", lambda old: payloads[(payloads.index(old) + 1) % 4], retries=1000)
"""
    rng = random.Random(7)
    for _ in range(12):
        p = spawn(writer, str(root))
        time.sleep(rng.uniform(0.3, 0.7))
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert content_hash((root / P).read_bytes()) in hashes, "a torn managed file"
        with CoherentVolume(root, agent="checker") as check:  # installs a commit recorded before the kill
            data = check.read(P)
            version = check.version(P)
        assert (root / P).read_bytes() == data
        conn = sqlite3.connect(root / ".coherent/registry.db")
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT hash, version, writer FROM files WHERE path = ?", (P,)).fetchone()[:2] == (
            content_hash(data),
            version,
        )
        conn.close()
        # a writer killed after its COMMIT leaves its intent until the next write transaction
        assert (
            subprocess.run(
                [str(Path(sys.executable).parent / "coherent-volume"), "status", str(root)], capture_output=True
            ).returncode
            == 0
        )
        conn = sqlite3.connect(root / ".coherent/registry.db")
        assert conn.execute("SELECT count(*) FROM intents").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM events WHERE kind = 'foreign'").fetchone() == (0,), (
            "a crashed commit must never look like a foreign write"
        )
        conn.close()
    leftovers = [n for n in os.listdir(root / "plans") if n != "plan.md"]
    assert leftovers == []


def test_read_then_write_race_between_processes_loses_nothing(root: Path) -> None:
    """Two processes doing the demo's plain read / write / re-read-on-refusal loop end exact."""
    with CoherentVolume(root, agent="setup") as v:
        v.write("plans/counter.txt", b"0")
    code = """
import sys
from coherent_volume import CoherentVolume, StaleWriteError
with CoherentVolume(sys.argv[1], agent=sys.argv[2]) as v:
    for _ in range(150):
        while True:
            value = int(v.read("plans/counter.txt"))
            try:
                v.write("plans/counter.txt", str(value + 1))
                break
            except StaleWriteError:
                pass
"""
    procs = [spawn(code, str(root), agent) for agent in ("alice", "bob")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert (root / "plans/counter.txt").read_text() == "300"
    assert sorted(os.listdir(root / "plans")) == ["counter.txt"]
