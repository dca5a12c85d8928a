"""Every decision survives being run twice: a registry backend may re-run a write transaction after
a conflict its engine reports as retryable (PostgreSQL's serialization failures), so the core's
transaction bodies must change nothing but their transaction.

The same scenario (commits, a refusal, appending handles whose appends are replayed, a creation, a
rename, a lock) runs on a plain SQLite registry and on one whose every transaction is aborted once
after its body ran; everything a user can observe must be the same."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from coherent_volume import RegistryError, StaleWriteError, atomic
from coherent_volume.core import HandleCommit, VolumeCore
from coherent_volume.edits import Edits
from coherent_volume.fingerprint import hash_fd
from coherent_volume.globs import ManagedGlobs
from coherent_volume.liveness import current_process
from coherent_volume.paths import REGISTRY_DIR
from coherent_volume.registry import ATTEMPTS, Retry, retried
from coherent_volume.registry.sqlite import SQLiteRegistry, SQLiteTransaction

R = TypeVar("R")


class AbortsOnce(SQLiteRegistry):
    """Aborts every write transaction once, after its body ran, as an engine reporting a
    serialization failure at COMMIT would; then lets the backend's retry loop run it again."""

    aborted = 0

    def transact(self, fn: Callable[[SQLiteTransaction], R], holds: Iterable[str] = ()) -> R:
        first = True

        def body(tx: SQLiteTransaction) -> R:
            nonlocal first
            result = fn(tx)
            if first:
                first = False
                type(self).aborted += 1
                raise Retry("could not serialize access due to concurrent update (injected)")
            return result

        return retried(lambda: self._write(body), "under test")


class Counts(SQLiteRegistry):
    """Counts the write transactions it runs."""

    ran = 0

    def transact(self, fn: Callable[[SQLiteTransaction], R], holds: Iterable[str] = ()) -> R:
        type(self).ran += 1
        return super().transact(fn, holds)


class AlwaysConflicts(SQLiteRegistry):
    def transact(self, fn: Callable[[SQLiteTransaction], R], holds: Iterable[str] = ()) -> R:
        def body(tx: SQLiteTransaction) -> R:
            fn(tx)
            raise Retry("deadlock detected (injected)")

        return retried(lambda: self._write(body), "under test")


def _core(root: Path, registry: type[SQLiteRegistry]) -> VolumeCore:
    root.mkdir()
    (root / "plans").mkdir()
    return VolumeCore(str(root), registry(str(root / REGISTRY_DIR), ManagedGlobs.of(["plans/**"])))


def _append(core: VolumeCore, agent: str, rel: str, line: bytes) -> tuple[Any, int, int, Edits]:
    """Open an appending handle on `rel` and write `line` into its shadow, as the mount does."""
    target = core.resolve(rel)
    grant, base = core.begin_write(agent, target, current_process(), kind="append")
    fd = atomic.unnamed_copy(target.abs, True)
    edits = Edits()
    size = os.fstat(fd).st_size
    edits.append(size)
    os.pwrite(fd, line, size)
    return grant, base, fd, edits


def _commit_append(core: VolumeCore, agent: str, rel: str, opened: tuple[Any, int, int, Edits]) -> int:
    grant, base, fd, edits = opened
    target = core.resolve(rel)
    try:
        staged = atomic.Staged(target.abs, hash_fd(fd), os.dup(fd))
        return core.commit(agent, target, staged, expected=base, handle=HandleCommit("append", grant, edits))
    finally:
        os.close(fd)


def _scenario(core: VolumeCore) -> dict[str, Any]:
    """What a user can observe of one run: answers, refusals, files, log, grants, in-memory shares."""
    answers: list[object] = []
    plan = core.resolve("plans/plan.md")
    answers.append(core.commit("alice", plan, b"one\n"))
    answers.append(core.read("bob", plan).version)
    answers.append(core.commit("bob", plan, b"two\n"))
    try:
        core.commit("alice", plan, b"three\n")
    except StaleWriteError as e:
        answers.append(("refused", e.reason, e.current_version))
    # two appending handles of one agent share its grant; the second's appends are replayed
    # onto the first's commit
    first = _append(core, "alice", "plans/plan.md", b"a\n")
    second = _append(core, "alice", "plans/plan.md", b"b\n")
    answers.append(first[0].token == second[0].token)
    answers.append(_commit_append(core, "alice", "plans/plan.md", first))
    answers.append(_commit_append(core, "alice", "plans/plan.md", second))
    # a creation takes a grant for its handle, released with it
    notes = core.resolve("plans/notes.md")
    grant, version = core.create("alice", notes, 0o644, current_process(), "write")
    answers.append(version)
    answers.append(core.release(grant, "write"))
    core.rename("alice", notes, core.resolve("plans/kept.md"))
    # a lock keeps another agent's handle out, and is logged both ways
    lock = core.acquire("bob", plan, 30, current_process())
    try:
        core.begin_write("alice", plan, current_process(), kind="write")
    except StaleWriteError as e:
        answers.append(("refused", e.reason, e.holder))
    answers.append(core.release(lock))
    answers.append(core.stale("alice"))
    with core.registry.read() as tx:
        log = [(e.kind, e.path, e.agent, e.reason, e.seen_version, e.version) for e in tx.events()]
        grants = tx.grants()
        intents = tx.intents()
        views = {(agent, path): tx.view(agent, path) for agent in ("alice", "bob") for path in ("plans/plan.md",)}
    files = {
        os.path.relpath(os.path.join(d, f), core.paths.root): Path(d, f).read_bytes()
        for d, _, names in os.walk(core.paths.root)
        if REGISTRY_DIR not in Path(d).relative_to(core.paths.root).parts
        for f in names
    }
    return {
        "answers": answers,
        "files": files,
        "log": log,
        "grants": grants,
        "intents": intents,
        "views": views,
        "shares": (dict(core._shares), set(core._owned)),
    }


def test_every_decision_run_twice_gives_what_running_it_once_gives(tmp_path: Path) -> None:
    plain = _core(tmp_path / "plain", Counts)
    AbortsOnce.aborted = Counts.ran = 0
    flaky = _core(tmp_path / "flaky", AbortsOnce)
    try:
        once, twice = _scenario(plain), _scenario(flaky)
    finally:
        plain.registry.close()
        flaky.registry.close()
    assert AbortsOnce.aborted == Counts.ran >= 15  # every transaction of the scenario really ran twice
    assert once == twice
    # and the scenario itself says what it should
    assert once["files"] == {"plans/plan.md": b"two\na\nb\n", "plans/kept.md": b""}
    assert once["answers"][3] == ("refused", "stale", 2)
    assert once["grants"] == [] and once["intents"] == [] and once["shares"] == ({}, set())


def test_a_transaction_that_keeps_conflicting_is_refused_with_nothing_changed(tmp_path: Path) -> None:
    plain = _core(tmp_path / "vol", SQLiteRegistry)
    plan = plain.resolve("plans/plan.md")
    plain.commit("alice", plan, b"one\n")
    plain.registry.close()
    core = VolumeCore(str(tmp_path / "vol"), AlwaysConflicts(str(tmp_path / "vol" / REGISTRY_DIR), None))
    try:
        with pytest.raises(RegistryError) as refused:
            core.commit("alice", plan, b"two\n")
        assert refused.value.errno == errno.EBUSY
        assert f"{ATTEMPTS} times" in str(refused.value) and "nothing was changed: try again" in str(refused.value)
        with pytest.raises(RegistryError):
            core.begin_write("alice", plan, current_process(), kind="write")
        assert core._shares == {} and core._owned == set()
        with core.registry.read() as tx:
            assert tx.file("plans/plan.md").version == 1  # type: ignore[union-attr]
            assert tx.grants() == [] and tx.intents() == []
        assert sorted(os.listdir(tmp_path / "vol" / "plans")) == ["plan.md"]
        assert (tmp_path / "vol" / "plans" / "plan.md").read_bytes() == b"one\n"
    finally:
        core.registry.close()
