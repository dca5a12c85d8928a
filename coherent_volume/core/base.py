"""The state every part of the core shares: the registry and paths of one volume, the write
grants this process's handles share, and keeping the registry in step with the disk
(foreign changes, crash recovery, reclaiming grants). Every decision is taken in
`CoreBase._transact`: the commit lock and a write transaction after recovery, which the
registry may run again after a conflict."""

from __future__ import annotations

import errno
import os
import secrets
import socket
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
    Local,
    Version,
    VersionKind,
    agent_name_problem,
    changed_paths,
    classify,
    current_version,
    grant_over,
    installed_needs_hash,
    local_state,
    needs_hash,
    recovery,
)
from ..registry import Registry, Transaction
from ..registry.postgresql import PostgresRegistry
from ..registry.replica import Replica

Isolation = Literal["file", "read-set"]
R = TypeVar("R")

EMPTY_HASH = content_hash(b"")
HASHED_IN_TRANSACTION = 16 << 20
"""Bytes of the largest file hashed inside a registry transaction (`CoreBase._hash_of`)."""


class _HashFirst(Exception):
    """Raised inside `CoreBase._transact`'s transaction: the file at `path` is to be hashed with no
    transaction open, then the transaction run again."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


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
        self.replica: Replica | None = registry.replica if isinstance(registry, PostgresRegistry) else None
        """This working copy's own state when the registry holds the content (`_sync_copy`), else None."""
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
        self._hashed: dict[str, tuple[Fingerprint | None, str | None]] = {}
        """Files hashed outside a transaction for `_transact`'s next run (`_hash_of`); under the commit lock."""

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
            try:
                while True:
                    try:
                        return self.registry.transact(decide)
                    except _HashFirst as first:  # rolled back: hashed with no transaction open, run again
                        try:
                            self._hashed[first.path] = hash_file(first.path)
                        except FileNotFoundError:
                            self._hashed[first.path] = (None, None)
            finally:
                self._hashed.clear()

    def _hash_of(self, path: str, fp: Fingerprint | None) -> tuple[Fingerprint | None, str | None]:
        """Fingerprint and content hash of the file at `path` (whose fingerprint was `fp`), inside
        `_transact`'s transaction: a file larger than HASHED_IN_TRANSACTION is hashed with no
        transaction open (`_HashFirst`: the transaction is run again once it is), so no transaction
        stays idle that long holding the registry's locks; one that changed since is hashed here."""
        known = self._hashed.get(path)
        if known is None and fp is not None and fp.size > HASHED_IN_TRANSACTION:
            raise _HashFirst(path)
        if known is not None and known[0] == fp:
            return known
        try:
            return hash_file(path)
        except FileNotFoundError:
            return None, None

    def refuse_mount(self) -> None:
        """VolumeConfigError if this root may not be mounted yet: a working copy that joined a
        PostgreSQL volume (its daemon would go on serving what the kernel cached while other hosts
        commit, until it materialises their commits from notifications)."""
        if self.replica is not None and self.replica.joined():
            raise VolumeConfigError(
                f"{self.paths.root} is a working copy that joined a PostgreSQL volume: mounting it is not "
                "supported yet (only the root that created the volume can be mounted). Use the Python API or "
                "the CLI on it; nothing was mounted"
            )

    def _installed(self, target: Target, version: int, digest: str | None) -> None:
        """Right after a decided commit's install (under the commit lock): in a working copy, record
        that its disk holds `version` (bytes hashing to `digest`; None: no file), whoever records the
        commit itself (its finish, or another process's recovery), so the copy never takes its own
        install for a foreign change."""
        if self.replica is not None:
            self.replica.holds(target.abs, target.rel, version, digest)

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
        if self.replica is not None:
            return self._sync_copy(tx, self.replica, target, record, disk)
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
        if present:  # the bytes the caller read (`disk`), or else as read now: a file still being
            # written is recorded as it was then; bytes that moved on since are not retained
            stored = self._retain(tx, target.abs, disk_hash if disk is not None else None)
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

    def _in_step(self, tx: Transaction, target: Target) -> bool:
        """Whether `_sync` would find nothing to record or install for `target` (read only: for a
        registry that cannot be written)."""
        record = tx.file(target.rel)
        if self.replica is None:
            fp, disk_hash = disk_state(target, record)
            return classify(record, fp, disk_hash) is Disk.SAME
        installed = self.replica.installed(target.rel)
        fp = fingerprint_path(target.abs)
        disk_hash = None
        if installed_needs_hash(installed, fp):
            try:
                fp, disk_hash = hash_file(target.abs)
            except FileNotFoundError:
                fp = None
        return local_state(record, installed, fp, disk_hash) is Local.SAME

    def _sync_copy(
        self,
        tx: Transaction,
        replica: Replica,
        target: Target,
        record: FileRecord | None,
        disk: tuple[Fingerprint | None, str | None] | None,
    ) -> FileRecord | None:
        """`_sync` for a working copy of a volume whose registry holds the content
        (`protocol.local_state`): install the current version where this copy is behind, record a
        foreign change (based on the version this copy held) as a new version by EXTERNAL; return
        the current record. Given the `disk` a caller read, behind: the record of the older version
        those bytes are (its view of them is that version), and nothing is installed."""
        installed = replica.installed(target.rel)
        given = disk is not None
        if disk is None:
            fp = fingerprint_path(target.abs)
            disk = self._hash_of(target.abs, fp) if installed_needs_hash(installed, fp) else (fp, None)
        fp, disk_hash = disk
        state = local_state(record, installed, fp, disk_hash)
        if state is Local.BEHIND:
            assert record is not None
            if given and fp is not None and installed is not None:  # the caller holds an older version's bytes
                return record._replace(version=installed.version, hash=installed.hash, fingerprint=fp)
            data = tx.load(record.hash, f"{target.rel} v{record.version}") if record.present and record.hash else None
            replica.install(target.abs, target.rel, record.version, record.hash, data)
            return record
        now, now_ns = time.time(), time.time_ns()
        if state is Local.SAME:
            held = None if record is None else (record.version, record.hash if record.present else None, fp)
            if held is not None and (installed is None or installed[:3] != held or disk_hash is not None):
                assert record is not None
                tx.touch_file(target.rel, record._replace(fingerprint=fp, checked_ns=now_ns))
            return record
        version, base = current_version(record) + 1, 0 if installed is None else installed.version
        stored = self._retain(tx, target.abs, None)  # the bytes as read now
        new = FileRecord(target.rel, version, True, stored or disk_hash, fp, EXTERNAL, now, now_ns)
        self._record(tx, new, "foreign", retained=stored is not None)
        host = socket.gethostname()
        tx.log(
            "adopt" if record is None else "foreign",
            target.rel,
            EXTERNAL,
            now,
            seen_version=base,
            version=version,
            detail=f"changed outside the volume on host {host}, in a working copy that held v{base}",
        )
        if base != current_version(record):
            assert record is not None
            tx.log(
                "clobber",
                target.rel,
                EXTERNAL,
                now,
                seen_version=base,
                version=version,
                detail=f"a program on host {host} wrote over v{record.version} by {record.writer}, which its "
                f"working copy never had (it held v{base}); both versions stay in history",
            )
        return new

    def _recover(self, tx: Transaction) -> None:
        """Complete or abandon the intents of writers that died between decision and install."""
        for intent in tx.intents():
            target = self.paths.of_rel(intent.path)
            record = tx.file(intent.path)
            # a working copy's disk may not hold it (`_sync_copy` finds out at its next access): not read
            fp, disk_hash = disk_state(target, None) if self.replica is None else (None, None)
            outcome = recovery(intent, fp is not None, disk_hash, replicated=self.replica is not None)
            now = time.time()
            if outcome == "completed":
                retained = (
                    not intent.present
                    or self.replica is not None  # stored with the intent
                    or self._retain(tx, target.abs, intent.hash) is not None  # stored already
                )
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
                    atomic.Staged(target.abs, "", None, atomic.beside(target.abs, intent.tmp), named=True).discard()
                except OSError:
                    pass  # nothing by that name can exist: never let cleanup wedge the volume
            tx.drop_intent(intent.path)
            if intent.hash is not None and not tx.in_use(intent.hash):
                tx.drop(intent.hash)  # an abandoned commit's content, which nothing else names

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

    def _retain(self, tx: Transaction, path: str, digest: str | None) -> str | None:
        """Retain, in `tx`, the content of the file at `path` for the version about to be recorded
        in it: as `digest` (None if the file no longer holds it), or, with `digest` None, as
        whatever it holds now; the hash it was stored under. None: a file gone meanwhile or no
        longer holding `digest` (its version is then listed as not retained)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        try:
            return tx.store(digest, fd)
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
