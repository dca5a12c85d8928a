"""The state every part of the core shares: the registry and paths of one volume, the write
grants this process's handles share, and keeping the registry in step with the disk
(foreign changes, crash recovery, reclaiming grants). Every decision is taken in
`CoreBase._transact`: the commit lock and a write transaction after recovery, which the
registry may run again after a conflict."""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Literal, TypeVar

from .. import atomic
from ..errors import (
    NotManaged,
    UnprotectedAlias,
    VolumeConfigError,
)
from ..fingerprint import Fingerprint, content_hash, fingerprint_path, hash_file
from ..liveness import ProcessId
from ..paths import Target, VolumePaths
from ..protocol import (
    EXTERNAL,
    Disk,
    FileRecord,
    Grant,
    HandleKind,
    Version,
    VersionKind,
    agent_name_problem,
    changed_paths,
    classify,
    current_version,
    grant_over,
    needs_hash,
    recovery,
)
from ..registry import Registry, Transaction

Isolation = Literal["file", "read-set"]
R = TypeVar("R")

EMPTY_HASH = content_hash(b"")


def disk_state(target: Target, record: FileRecord | None) -> tuple[Fingerprint | None, str | None]:
    """Fingerprint of the disk, plus its content hash when the fingerprint alone cannot decide."""
    fp = fingerprint_path(target.abs)
    if fp is None:
        return None, None
    if record is not None and record.present and not needs_hash(record, fp):
        return fp, None
    try:
        return hash_file(target.abs)
    except FileNotFoundError:
        return None, None


def validate_agent(agent: object) -> str:
    """`agent` if it may name an agent (see `protocol.agent_name_problem`), else VolumeConfigError."""
    problem = agent_name_problem(agent)
    if problem is not None:
        raise VolumeConfigError(problem)
    assert isinstance(agent, str)
    return agent


class CoreBase:
    """The protocol's shared state over one root and its registry; thread-safe; one per process
    per volume."""

    def __init__(self, root: str, registry: Registry) -> None:
        self.registry = registry
        self.paths = VolumePaths(root, registry.globs)
        self._shares: dict[str, list[HandleKind]] = {}
        """The kinds of this process's open write handles under each grant (by token)."""
        self._owned: set[str] = set()
        """Handle grants this process took: each ends with the last handle under it, so an agent's
        other handles stay protected meanwhile."""
        self._lock = threading.Lock()
        """Guards `_shares`, `_owned` and `_loaded` (the worker threads of a mount share one core)."""
        self._agents: set[str] = set()
        self._loaded: set[tuple[ProcessId, str]] = set()
        """(reader, path) of files buffering programs loaded (see `note_read`)."""

    def agent(self, name: object) -> str:
        """`name`, checked once per process to be a valid agent name (VolumeConfigError if not)."""
        if name not in self._agents:
            self._agents.add(validate_agent(name))
        assert isinstance(name, str)
        return name

    # ---- handle grants (shared by one agent's open handles in this process) -----------

    def _share(
        self, tx: Transaction, agent: str, target: Target, owner: ProcessId, expires: float
    ) -> tuple[Grant, bool]:
        """The write grant a handle of `agent` that passed its checks writes under: the grant the
        agent holds (a handle grant of this process, a `lock()`, a hook's claim) or a new handle
        grant, which does not fence (a handle's commit is a compare-and-swap anyway); and whether
        it is new. Count the handle with `_count_share` once the transaction has committed."""
        held = tx.grant(target.rel)  # the agent's own: another agent's was a refusal
        if held is not None:
            return held, False
        grant = Grant(target.rel, agent, secrets.token_hex(8), owner, expires, fences=False)
        tx.put_grant(grant)
        return grant, True

    def _count_share(self, grant: Grant, kind: HandleKind, taken: bool) -> None:
        """Count one open handle of `kind` writing under `grant` in this process; `taken`: the
        handle's transaction took the grant, which then ends with this process's last handle."""
        with self._lock:
            self._shares.setdefault(grant.token, []).append(kind)
            if taken:
                self._owned.add(grant.token)

    def _open_kinds(self, grant: Grant | None, agent: str) -> list[HandleKind] | None:
        """The kinds of this process's open write handles under `agent`'s grant `grant` (a handle
        grant or its `lock()`); None when there are none (or the grant is another agent's)."""
        if grant is None or grant.agent != agent:
            return None
        with self._lock:
            kinds = self._shares.get(grant.token)
            return None if kinds is None else list(kinds)

    def _end(self, tx: Transaction, grant: Grant, kind: HandleKind | None) -> bool:
        """End one handle's use (of `kind`) of `grant` in the registry, or with `kind` None the grant
        itself (an explicit release); `_forget_share` then ends it in memory. A handle grant this
        process took ends with its last handle; a grant held otherwise (`lock()`, a hook's claim)
        outlives the handles that wrote under it. False if it was reclaimed meanwhile."""
        with self._lock:
            kinds = list(self._shares.get(grant.token, ()))
            if kind in kinds:
                kinds.remove(kind)
            ends = kind is None or (grant.token in self._shares and not kinds and grant.token in self._owned)
        current = tx.grant(grant.path)
        if current is None or current.token != grant.token:
            return False
        if ends:
            tx.drop_grant(grant.path)
        return True

    def _forget_share(self, grant: Grant, kind: HandleKind | None) -> None:
        """The in-memory half of `_end`, once its transaction has committed."""
        with self._lock:
            kinds = self._shares.get(grant.token)
            if kind is not None and kinds is not None:
                if kind in kinds:
                    kinds.remove(kind)
                if kinds:
                    return
                del self._shares[grant.token]
            if kind is None or kinds is not None:
                self._owned.discard(grant.token)

    def _transact(self, fn: Callable[[Transaction], R]) -> R:
        """Where every decision of the protocol is taken: under the commit lock (re-entrant), one
        write transaction in which every interrupted commit is first completed or abandoned, then
        `fn`. The registry may run it more than once (`Registry.transact`), so `fn` reads the disk
        and changes only the transaction: changes to the disk or to this process's memory come
        after it returns, under a commit lock the caller holds around both when they must stay in
        step."""

        def decide(tx: Transaction) -> R:
            self._recover(tx)
            return fn(tx)

        with self.registry.commit_lock():
            return self.registry.transact(decide)

    def _committed(self) -> None:
        """Run after each managed commit of `Writes.commit`, outside the commit lock (retention's
        prune, in `History`)."""

    def resolve(self, path: str | os.PathLike[str]) -> Target:
        return self.paths.resolve(path)

    # ---- keeping the registry in step with the disk (commit lock + write transaction held) ----

    def _sync(
        self,
        tx: Transaction,
        target: Target,
        record: FileRecord | None,
        disk: tuple[Fingerprint | None, str | None] | None = None,
    ) -> FileRecord | None:
        """Record any foreign change of `target` as a new version by EXTERNAL; return the current record."""
        fp, disk_hash = disk if disk is not None else disk_state(target, record)
        state = classify(record, fp, disk_hash)
        now, now_ns = time.time(), time.time_ns()
        if state is Disk.SAME:
            if (
                record is not None
                and record.present
                and fp is not None
                and (fp != record.fingerprint or disk_hash is not None)
            ):
                record = FileRecord(
                    record.path, record.version, True, record.hash, fp, record.writer, record.committed_at, now_ns
                )
                tx.touch_file(target.rel, record)
            return record
        version = current_version(record) + 1
        present = state is Disk.CHANGED
        new = FileRecord(target.rel, version, present, disk_hash if present else None, fp, EXTERNAL, now, now_ns)
        if present:  # the bytes as read now: a file still being written is recorded as it was then
            stored = self._retain(target.abs, None)
            new = new if stored is None else new._replace(hash=stored)
        self._record(tx, new, "foreign" if present else "delete", retained=not present or stored is not None)
        if record is None:  # first sighting of a file that was there before the volume knew it
            tx.log(
                "adopt",
                target.rel,
                EXTERNAL,
                now,
                version=version,
                detail="first seen, not written through the volume: recorded as it is",
            )
        else:
            tx.log(
                "foreign",
                target.rel,
                EXTERNAL,
                now,
                version=version,
                detail="changed outside the volume" if present else "deleted outside the volume",
            )
        return new

    def _recover(self, tx: Transaction) -> None:
        """Complete or abandon the intents of writers that died between decision and install."""
        for intent in tx.intents():
            target = self.paths.of_rel(intent.path)
            record = tx.file(intent.path)
            fp, disk_hash = disk_state(target, None)
            outcome = recovery(intent, fp is not None, disk_hash)
            now = time.time()
            if outcome == "completed":
                retained = not intent.present or self._retain(target.abs, intent.hash) is not None  # stored already
                self._record(
                    tx,
                    FileRecord(
                        intent.path, intent.version, intent.present, intent.hash, fp, intent.agent, now, time.time_ns()
                    ),
                    "commit" if intent.present else "delete",
                    retained=retained,
                )
                tx.put_view(intent.agent, intent.path, intent.version, now)
            tx.log(
                "recover",
                intent.path,
                intent.agent,
                now,
                reason=outcome,
                version=intent.version if outcome == "completed" else current_version(record),
                detail=f"{outcome} an interrupted commit",
            )
            if intent.tmp is not None:
                try:
                    atomic.Staged(target.abs, "", None, intent.tmp, named=True).discard()
                except OSError:
                    pass  # nothing by that name can exist: never let cleanup wedge the volume
            tx.drop_intent(intent.path)

    def _record(
        self,
        tx: Transaction,
        record: FileRecord,
        kind: VersionKind,
        parents: tuple[int, ...] = (),
        *,
        retained: bool = True,
    ) -> None:
        """Record a new version of a managed path: its current state and its history entry. Its
        bytes are retained (`_retain`) before it is recorded; `retained` False says they could not
        be (a file that kept changing while it was read), so its history lists it as not kept."""
        tx.put_file(record)
        size = record.fingerprint.size if record.fingerprint is not None and record.present else None
        tx.put_version(
            Version(
                record.path,
                record.version,
                kind,
                record.writer,
                record.committed_at,
                size,
                record.hash if record.present else None,
                parents,
                retained,
            )
        )

    def _retain(self, path: str, digest: str | None) -> str | None:
        """Retain the content of the file at `path` for the version about to be recorded: as
        `digest` (None if the file no longer holds it), or, with `digest` None, as whatever it holds
        now; the hash it was stored under. None: a file gone meanwhile, or no longer holding
        `digest` (its version is then listed as not retained)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return self.registry.store(digest, fd)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            return None
        finally:
            os.close(fd)

    def _holder(self, tx: Transaction, rel: str, now: float) -> Grant | None:
        """The live grant on `rel`, reclaiming (and fencing) one that ended."""
        grant = tx.grant(rel)
        if grant is None or not grant_over(grant, now, grant.owner.alive()):
            return grant
        tx.drop_grant(rel)
        if grant.fences:
            tx.put_fence(grant.agent, rel, now)
        why = "expired" if now >= grant.expires_at else "its process died"
        tx.log("reclaim", rel, grant.agent, now, detail=f"write grant reclaimed: {why}")
        return None

    def _changed_read_set(self, tx: Transaction, agent: str, rel: str) -> tuple[str, ...]:
        read_set = tx.read_set(agent)
        for path in read_set:
            if path != rel:
                self._sync(tx, self.paths.of_rel(path), tx.file(path))
        return changed_paths(read_set, tx.versions(list(read_set)), rel)

    @staticmethod
    def _require_managed(target: Target, what: str) -> None:
        if target.alias_of is not None:
            raise UnprotectedAlias(target.alias_of, target.rel)
        if not target.managed:
            raise NotManaged(f"{target.rel!r} is not managed by this volume; {what} applies to managed paths only")
