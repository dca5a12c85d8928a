"""Bad registries get a typed, readable error and nothing already committed is lost."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume, RegistryError
from coherent_volume.registry import sqlite as sqlite_registry

from .conftest import REPO

P = "plans/plan.md"


def _committed(root: Path) -> bytes:
    with CoherentVolume(root, agent="alice") as v:
        v.write(P, b"precious work")
    return (root / P).read_bytes()


def test_garbage_registry_is_reported_and_left_untouched(root: Path) -> None:
    before = _committed(root)
    db = root / ".coherent/registry.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a coherent-volume registry"):
        CoherentVolume(root, agent="bob")
    assert db.read_bytes() == b"this is not a database" * 100
    assert (root / P).read_bytes() == before


def test_truncated_registry_is_reported(root: Path) -> None:
    before = _committed(root)
    db = root / ".coherent/registry.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    with pytest.raises(RegistryError), CoherentVolume(root, agent="bob") as v:
        v.read(P)
        v.write(P, b"x")
    assert (root / P).read_bytes() == before


def test_wrong_schema_version_is_reported(root: Path) -> None:
    _committed(root)
    conn = sqlite3.connect(root / ".coherent/registry.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema version '99'"):
        CoherentVolume(root, agent="bob")


def test_opening_without_globs_where_no_volume_exists(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="create the volume with managed globs"):
        CoherentVolume(tmp_path, agent="bob")


def test_registry_locked_past_the_busy_timeout_is_a_bounded_wait(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _committed(root)
    monkeypatch.setattr(sqlite_registry, "BUSY_TIMEOUT_MS", 300)
    alice = CoherentVolume(root, agent="alice")
    alice.read(P)
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
""",
            str(root / ".coherent/registry.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryError, match="stayed locked"):
            alice.write(P, b"blocked")
        assert locker.poll() is None, "the error came while the lock was still held: the wait was bounded"
    finally:
        locker.kill()
        locker.wait()
    assert (root / P).read_bytes() == before
    assert alice.write(P, b"after the lock") == 2
    alice.close()


def test_an_empty_or_foreign_registry_file_is_left_untouched(root: Path) -> None:
    db = root / ".coherent/registry.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"")
    with pytest.raises(RegistryError, match="not a coherent-volume registry"):
        CoherentVolume(root, agent="bob")
    assert db.read_bytes() == b""
    db.unlink()
    foreign = sqlite3.connect(db)
    foreign.execute("CREATE TABLE notes (x)")
    foreign.commit()
    foreign.close()
    before = db.read_bytes()
    with pytest.raises(RegistryError, match="not a coherent-volume registry"):
        CoherentVolume(root, agent="bob")
    assert db.read_bytes() == before


def _failing_finishes(vol: CoherentVolume, monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """Make the registry unreachable for the next `failures` transactions that record an installed
    commit (the second transaction of a write), as a database restart would."""
    registry = vol._core.registry
    transact = registry.transact
    seen: list[str] = []

    def flaky(fn: Callable[..., Any]) -> Any:
        if getattr(fn, "__name__", "") == "finish" and len(seen) < failures:
            seen.append("failed")
            raise RegistryError("registry at db:5432 is unreachable; nothing was written", 5)
        return transact(fn)

    monkeypatch.setattr(registry, "transact", flaky)
    return seen


def test_a_commit_whose_record_fails_a_while_is_recorded_as_the_writers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change is on disk and its intent recorded when the registry goes away: the write keeps
    trying (bounded) and reports success once its version is recorded as the writer's, never a
    failure for a commit that landed (a caller would apply it twice)."""
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        failed = _failing_finishes(vol, monkeypatch, 3)
        assert vol.write(P, b"two") == 2
        assert failed == ["failed"] * 3
        assert [(v.version, v.writer, v.kind) for v in vol.history(P)][0] == (2, "alice", "commit")
        assert vol.version(P) == 2


def test_a_commit_that_cannot_be_recorded_in_time_says_it_is_pending_and_lands_later(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coherent_volume.core import writes

    monkeypatch.setattr(writes, "FINISH_WAIT", 0.3)
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        _failing_finishes(vol, monkeypatch, 1000)
        with pytest.raises(RegistryError) as pending:
            vol.write(P, b"two")
        assert "is on disk and its commit is pending" in str(pending.value)
        assert "do not write it again" in str(pending.value)
    with CoherentVolume(root, agent="bob") as bob:  # any next operation records it as alice's
        assert bob.read(P) == b"two"
        assert [(v.version, v.writer) for v in bob.history(P)][:2] == [(2, "alice"), (1, "alice")]


def test_a_create_whose_record_fails_a_while_is_recorded_and_its_grant_taken(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for a file created through a handle (the mount's create): the empty version is the
    creator's and so is the handle's grant, once the registry takes the record."""
    from coherent_volume.liveness import ProcessId

    with CoherentVolume(root, agent="alice") as vol:
        failed = _failing_finishes(vol, monkeypatch, 2)
        core = vol._core
        grant, version = core.create("alice", core.resolve("plans/new.md"), 0o644, ProcessId.of(os.getpid()), "write")
        assert (version, grant.agent, failed) == (1, "alice", ["failed"] * 2)
        assert [(v.version, v.writer) for v in vol.history("plans/new.md")] == [(1, "alice")]
        with core.registry.read() as tx:
            assert tx.grant("plans/new.md") == grant
