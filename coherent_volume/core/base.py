"""The state every part of the core shares: the registry and paths of one volume, the write
grants this process's handles share, and keeping the registry in step with the disk
(foreign changes, crash recovery, reclaiming grants). Every decision is taken in
`CoreBase._transact`: the commit lock of the paths it changes and a write transaction after
recovery, which the registry may run again after a conflict."""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, TypeVar

from .. import atomic
from ..errors import (
    NotManaged,
    OutsideVolume,
    RootGone,
    TreeClash,
    UnprotectedAlias,
    VolumeConfigError,
    root_gone,
)
from ..fingerprint import Fingerprint, content_hash, fingerprint_path, hash_file, hash_path, open_to_check
from ..liveness import ProcessId
from ..paths import Target, VolumePaths
from ..protocol import (
    EXTERNAL,
    Disk,
    FileRecord,
    Grant,
    HandleKind,
    Installed,
    Intent,
    Local,
    Version,
    VersionKind,
    agent_name_problem,
    changed_paths,
    classify,
    current_version,
    displaced_needs_hash,
    grant_over,
    installed_needs_hash,
    local_state,
    lost_install,
    may_drop_taken,
    needs_hash,
    proven,
    recovery,
)
from ..registry import CopyRelock, Registry, Transaction
from ..registry.replica import Replica
from .leases import Heartbeat

Isolation = Literal["file", "read-set"]
R = TypeVar("R")

EMPTY_HASH = content_hash(b"")
PUT_BACK_ROUNDS = 8
"""Files a put back (`CoreBase._put_in_place`) records and exchanges into place in one go, each
saved at the name by a program while the one before was being put back; past that, the file the
last exchange brought back is recorded too (its bytes kept as the newest version) and removed, and
the file in place (an earlier save, recorded) stays for the next check."""
SWEEP_AGAIN = 1.0
"""Seconds after a sweep found the volume or the working copy in use before the next one is tried
(`_commit_lock`)."""
HASHED_IN_TRANSACTION = 16 << 20
"""Bytes of the largest file hashed inside a registry transaction (`CoreBase._hash_of`)."""


class _RecoverFirst(Exception):
    """Raised inside `CoreBase._transact`'s transaction: a recorded commit's install is to be
    settled (its staged file installed or dropped) in a transaction of its own first, which then
    commits with what recovery logged, whatever becomes of the caller's."""


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


def _fresher(record: FileRecord | None, fp: Fingerprint | None, disk_hash: str | None, now_ns: int) -> bool:
    """Whether a check that found `record`'s content on disk (`Disk.SAME`) records the disk's
    fingerprint `fp` with it: one that proves something later (`proven`: past the racy window) and
    that the record lacks (it holds another, or the content had to be hashed to be confirmed)."""
    return (
        record is not None
        and record.present
        and fp is not None
        and (fp != record.fingerprint or disk_hash is not None)
        and proven(fp, now_ns)
    )


def _recorded(tx: Transaction, rel: str, record: FileRecord | None, installed: Installed | None) -> str | None:
    """The hash the registry records for the version of `rel` a working copy installed (for
    `protocol.local_state`): the current record's, else that version's history entry's (one more
    read, only for a copy behind); None for no such version, or a deletion."""
    if installed is None or installed.hash is None or record is None or installed.version > record.version:
        return None
    if installed.version == record.version:
        return record.hash if record.present else None
    entry = tx.version_entry(rel, installed.version)
    return None if entry is None else entry.hash


def _hash_or_none(path: str) -> str | None:
    """The content hash of the regular file at `path`; None if there is none."""
    try:
        return hash_file(path)[1]
    except OSError:
        return None


def _is_the_file(name: str, fp: Fingerprint | None, digest: str | None) -> bool:
    """Whether the file at `name` is the one a put back expected an exchange to bring back: the
    very inode `fp` names (inode, size and mtime: an exchange moves only its ctime), unchanged
    (still hashing to `digest`). Where its identity is not known (`fp` None), its bytes alone tell
    it, as they are `digest`. No file at `name` (or no regular file): nothing to put in place."""
    now = fingerprint_path(name)
    if now is None:
        return True
    if fp is not None and (now.ino, now.size, now.mtime_ns) != (fp.ino, fp.size, fp.mtime_ns):
        return False
    return _hash_or_none(name) == digest


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
        self.replica: Replica | None = registry.replica
        """This working copy's own state when the registry holds the content (`_sync_copy`), else None."""
        self._shares: dict[str, list[HandleKind]] = {}
        """The kinds of this process's open write handles under each grant (by token)."""
        self._owned: set[str] = set()
        """Handle grants this process took: each ends with the last handle under it, so an agent's
        other handles stay protected meanwhile."""
        self._lock = threading.Lock()
        """Guards `_shares`, `_owned`, `_loaded`, `_renamed`, `_undone` and `_done` (the worker threads of a
        mount share one core, and commit paths side by side)."""
        self.leases = Heartbeat(registry)
        """Renews the handle grants this process took as leases (`begin_write`), while they are in use."""
        self._agents: set[str] = set()
        self._loaded: set[tuple[ProcessId, str]] = set()
        """(reader, path) of files buffering programs loaded (see `note_read`)."""
        self._swept = False
        """Whether this process settled every intent and removed what killed writers left in the
        staging directory (`_sweep`)."""
        self._swept_at = -SWEEP_AGAIN
        """When (monotonic) this process last tried to (`_sweep`)."""
        self._renamed: dict[str, str] = {}
        """Staged names (as intents record them) that this process's installs renamed into place, whose
        intents may still be recorded, and their paths: recovery drops those without looking for the
        file. An entry changes under the commit lock of its path."""
        self._undone: set[tuple[str, int]] = set()
        """Intents (path, version) of renames whose one system call the kernel refused in this process
        (`Writes._install`): nothing changed, so recovery abandons them without looking at the disk.
        An entry changes under the commit lock of its path."""
        self._done: set[tuple[str, int]] = set()
        """Intents (path, version) of renames this process installed and settles before it records
        them (`Renames._aside_back`): recovery completes them without looking at the disk. An entry
        changes under the commit lock of its path."""
        self._put_expected: dict[str, tuple[Fingerprint | None, str | None]] = {}
        """Names a one-host put back exchanged a file into place from (`_put_in_place`), and the file
        each exchange was to bring back there (its fingerprint, its hash): what the next step of the
        put back removes (`_putting_back`). Lost with the process: recovery then tells that file by
        its bytes alone. An entry changes under the commit lock of its path."""
        self._thread = threading.local()
        """This thread's files hashed outside a transaction for `_transact`'s next run (`hashed`:
        `_hash_of`)."""

    def close(self) -> None:
        """Let go of everything this core holds: its leases are renewed no more (released by their
        handles, or lapsing within one lease), its registry connection and root descriptor closed."""
        self.leases.stop()
        self.registry.close()
        self.paths.close()

    def root_gone(self) -> RootGone | None:
        """The error to give where the volume's root is no longer a directory at the path it was
        opened at (removed or moved while in use), else None."""
        return None if os.path.isdir(self.paths.root) else root_gone(self.paths.root)

    def agent(self, name: object) -> str:
        """`name`, checked once per process to be a valid agent name (VolumeConfigError if not)."""
        if name not in self._agents:
            self._agents.add(validate_agent(name))
        assert isinstance(name, str)
        return name

    # ---- handle grants (shared by one agent's open handles in this process) -----------

    def _share(
        self, tx: Transaction, agent: str, target: Target, owner: ProcessId, ttl: float, held: Grant | None
    ) -> tuple[Grant, bool]:
        """The write grant a handle of `agent` that passed its checks writes under: `held`, the live
        grant the decision read (the agent's own: another agent's was a refusal; a handle grant of
        this process, a `lock()`, a hook's claim), or a new handle grant lasting `ttl` s on the
        registry's clock, which does not fence (a handle's commit is a compare-and-swap anyway); and
        whether it is new. Count the handle with `_count_share` once the transaction has committed."""
        if held is not None:
            return held, False
        grant = Grant(target.rel, agent, secrets.token_hex(8), owner, tx.now() + ttl, fences=False)
        tx.put_grant(grant)
        return grant, True

    def _count_share(self, grant: Grant, kind: HandleKind, taken: bool, leased: bool) -> None:
        """Count one open handle of `kind` writing under `grant` in this process; `taken`: the
        handle's transaction took the grant, which then ends with this process's last handle, and
        with `leased` is renewed meanwhile (`leases.Heartbeat`)."""
        with self._lock:
            self._shares.setdefault(grant.token, []).append(kind)
            if taken:
                self._owned.add(grant.token)
        if taken and leased:
            self.leases.hold(grant)

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
        """The in-memory half of `_end`, once its transaction has committed: a grant that ends
        here is renewed no more."""
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
        self.leases.drop(grant.token)

    @contextmanager
    def _commit_lock(self, paths: Iterable[str] | None) -> Iterator[None]:
        """The commit lock of `paths` (None: every path). Taken by a thread holding none, until this
        process swept (at most every SWEEP_AGAIN s), the sweep goes first (`_sweep`)."""
        outer = not getattr(self._thread, "locked", False)
        if outer and not self._swept and time.monotonic() - self._swept_at >= SWEEP_AGAIN:
            self._sweep()
        with self.registry.commit_lock(paths):
            self._thread.locked = True
            try:
                yield
            finally:
                if outer:
                    self._thread.locked = False

    def settle(self) -> None:
        """Settle what interrupted commits and killed writers left, now, unless this process did
        (`_sweep`: only if the volume and the working copy are free at once). A mount does before
        it serves, so no name a killed install set aside shows in it until its first commit."""
        if not self._swept:
            self._sweep()

    def _sweep(self) -> None:
        """Settle every intent interrupted commits left and remove what killed writers left in the
        staging directory (`_recover`, `_sweep_staging`), in a transaction of its own, holding the
        whole working copy and the volume's lock exclusive only if both are free at once (never
        waited for: every writer would wait behind). Never inside a decision: one paused, cut off or
        catching up a large file there would hold every writer of the volume up meanwhile."""
        self._swept_at = time.monotonic()
        with self.registry.commit_lock((), whole_if_free=True):
            self._thread.locked, self._thread.sweeping = True, True
            try:
                self._transact(lambda tx: None)
            finally:
                self._thread.locked, self._thread.sweeping = False, False

    def _locked(self, paths: Iterable[str] | None, body: Callable[[], R]) -> R:
        """`body` under the commit lock of `paths` (None: every path); run again from its start
        holding more when one of its transactions needed a path the lock could not take in its
        order (`CopyRelock`, only before any of them committed)."""
        wanted = None if paths is None else frozenset(paths)
        while True:
            try:
                with self._commit_lock(wanted):
                    return body()
            except CopyRelock as more:
                if not more.released:
                    raise
                wanted = more.paths

    def _hashed(self) -> dict[str, tuple[Fingerprint | None, str | None]]:
        """This thread's files hashed for `_transact`'s next run."""
        hashed: dict[str, tuple[Fingerprint | None, str | None]] = self._thread.__dict__.setdefault("hashed", {})
        return hashed

    def _transact(
        self, fn: Callable[[Transaction], R], ahead: tuple[str, str] | None = None, holds: Iterable[str] | None = ()
    ) -> R:
        """Where every decision of the protocol is taken: under the commit lock of its paths
        (re-entrant), one write transaction in which every interrupted commit of the paths it holds
        is first completed or abandoned (`_recover`), then `fn`. The registry may run it more than
        once (`Registry.transact`), so `fn` reads the disk and changes only the transaction: changes
        to the disk or to this process's memory come after it returns, under a commit lock the
        caller holds around both when they must stay in step. `ahead`: (path, agent) of the
        `write_state` that `fn` reads first (`Transaction.read_ahead`); `holds`: the paths `fn`
        touches, so far as the caller knows (what `fn` touches besides, it holds with `_hold`), None:
        every path (the whole working copy)."""
        paths = None if holds is None else {*holds, *(ahead[:1] if ahead is not None else ())}

        def decide(tx: Transaction) -> R:
            if ahead is not None:
                tx.read_ahead(*ahead)
            self._recover(tx)
            return fn(tx)

        def run() -> R:
            hashed = self._hashed()
            try:
                while True:
                    try:
                        return self.registry.transact(decide, paths or ())
                    except _RecoverFirst:  # rolled back: settle the disk alone, then run again
                        self._settle_alone(paths or ())
                    except _HashFirst as first:  # rolled back: hashed with no transaction open, run again
                        try:
                            hashed[first.path] = hash_file(first.path)
                        except FileNotFoundError:
                            hashed[first.path] = (None, None)
            finally:
                hashed.clear()

        return self._locked(paths, run)

    def _settle_alone(self, paths: Iterable[str]) -> None:
        """Recovery in write transactions of its own (`_RecoverFirst`), under the commit lock of
        `paths`: each put back step it records (`_put_in_place`, one host) is committed before the
        exchange it calls for is made, here, between its transactions, then recovery runs again to
        see what that exchange brought back; until no step calls for one."""
        while True:
            moves: list[tuple[str, Target]] = []

            def settle(tx: Transaction, moves: list[tuple[str, Target]] = moves) -> None:
                moves.clear()  # (the registry may run it more than once)
                self._thread.put_backs = moves
                try:
                    self._recover(tx, settle=True)
                finally:
                    self._thread.put_backs = None

            self.registry.transact(settle, paths)
            if not moves:
                return
            for name, target in moves:  # (a Target: its anchor, where it has one, stays open till then)
                dst = target.abs
                try:
                    atomic.swap_in(name, dst)
                except (IsADirectoryError, FileNotFoundError, NotADirectoryError):
                    continue  # a directory made at the target, or its directory removed: the next step stops
                atomic.sync_dirs(dst)

    def _hash_of(self, path: str, fp: Fingerprint | None) -> tuple[Fingerprint | None, str | None]:
        """Fingerprint and content hash of the file at `path` (whose fingerprint was `fp`), inside
        `_transact`'s transaction: a file larger than HASHED_IN_TRANSACTION is hashed with no
        transaction open (`_HashFirst`: the transaction is run again once it is), so no transaction
        stays idle that long holding the registry's locks; one that changed since is hashed here."""
        known = self._hashed().get(path)
        if known is None and fp is not None and fp.size > HASHED_IN_TRANSACTION:
            raise _HashFirst(path)
        if known is not None and known[0] == fp:
            return known
        try:
            return hash_file(path)
        except FileNotFoundError:
            return None, None

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

    def resolve_name(self, path: str | os.PathLike[str]) -> Target:
        """The Target whose versions a question about `path` asks for (history, a version's bytes, a
        diff): the file it names (`resolve`), or, where its last component is a symlink that a
        program put in place of a managed file the registry holds versions of (leading out of the
        root, or to an unmanaged file), that name itself: versions are kept by name."""
        try:
            target: Target | None = self.paths.resolve(path)
        except OutsideVolume:
            target = None
        if target is not None and target.alias_of is None:
            return target
        link = self.paths.resolve_link(path)
        if link is not None and self.paths.managed(link.rel):
            with self.registry.read() as tx:
                if tx.history(link.rel, 1):
                    return self.paths.target(link.rel, True)
        return target if target is not None else self.paths.resolve(path)  # (raises as it did)

    # ---- keeping the registry in step with the disk (commit lock + write transaction held) ----

    def _sync(
        self,
        tx: Transaction,
        target: Target,
        record: FileRecord | None,
        disk: tuple[Fingerprint | None, str | None] | None = None,
        why: str | None = None,
        content: bytes | int | None = None,
    ) -> FileRecord | None:
        """Record any foreign change of `target` as a new version by EXTERNAL (`why`: how the disk
        came to differ, when the caller knows better than "changed outside the volume"); return the
        current record. `disk`: what the caller found (fingerprint, hash), recorded as it found it
        (its view goes there); `content`: the bytes it hashed, or a descriptor of the file it hashed,
        retained as that version's (a file written on since keeps the version it was)."""
        if self.replica is not None:
            return self._sync_copy(tx, self.replica, target, record, disk, content)
        fp, disk_hash = disk if disk is not None else disk_state(target, record)
        state = classify(record, fp, disk_hash)
        now, now_ns = time.time(), time.time_ns()
        if state is Disk.SAME:
            if _fresher(record, fp, disk_hash, now_ns):
                assert record is not None and fp is not None
                record = FileRecord(
                    record.path, record.version, True, record.hash, fp, record.writer, record.committed_at, now_ns
                )
                tx.touch_file(target.rel, record)
            return record
        version = current_version(record) + 1
        present = state is Disk.CHANGED
        new = FileRecord(target.rel, version, present, disk_hash if present else None, fp, EXTERNAL, now, now_ns)
        if present:  # the bytes the caller read (`disk`), or else as read now: a file still being
            # written is recorded as it was then; bytes that moved on since are not retained unless
            # the caller kept them (`content`)
            stored = self._retain(tx, target.abs, disk_hash if disk is not None else None, content)
            new = new if stored is None else new._replace(hash=stored)
        size = self._kept_size(tx, stored, content) if present else None
        self._record(tx, new, "foreign" if present else "delete", retained=not present or stored is not None, size=size)
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
            held = tx.grant(target.rel)
            why = why or ("changed outside the volume" if present else "deleted outside the volume")
            if held is not None:  # a hook's tool writes in place: this may be its write seen half done
                why += f", while {held.agent} held its write grant (its own write under way, or another program's)"
            tx.log("foreign", target.rel, EXTERNAL, now, version=version, detail=why)
        return new

    def _in_step(self, tx: Transaction, target: Target, *, fingerprint: bool = False) -> bool:
        """Whether `_sync` would find nothing to record or install for `target` (read only: for a
        registry that cannot be written, or to find what a check of every file must sync); with
        `fingerprint`, nor a fingerprint of it to record (`_fresher`)."""
        record = tx.file(target.rel)
        if self.replica is None:
            fp, disk_hash = disk_state(target, record)
            same = classify(record, fp, disk_hash) is Disk.SAME
            return same and not (fingerprint and _fresher(record, fp, disk_hash, time.time_ns()))
        installed = self.replica.installed(target.rel)
        fp = fingerprint_path(target.abs)
        disk_hash = None
        if installed_needs_hash(installed, fp):
            try:
                fp, disk_hash = hash_file(target.abs)
            except FileNotFoundError:
                fp = None
        return local_state(record, installed, fp, disk_hash, _recorded(tx, target.rel, record, installed)) is Local.SAME

    def _sync_copy(
        self,
        tx: Transaction,
        replica: Replica,
        target: Target,
        record: FileRecord | None,
        disk: tuple[Fingerprint | None, str | None] | None,
        content: bytes | int | None,
    ) -> FileRecord | None:
        """`_sync` for a working copy of a volume whose registry holds the content
        (`protocol.local_state`): install the current version where this copy is behind, record a
        foreign change (based on the version this copy held) as a new version by EXTERNAL; return
        the current record. Given the `disk` a caller read, behind: the record of the older version
        those bytes are (its view of them is that version), or of the deletion this copy holds where
        the caller found no file, or None where this copy never held the file (no view: a view of a
        version the caller never saw would let its write of a file it took for new replace that
        version), and nothing is installed."""
        installed = replica.installed(target.rel)
        given = disk is not None
        if disk is None:
            fp = fingerprint_path(target.abs)
            disk = self._hash_of(target.abs, fp) if installed_needs_hash(installed, fp) else (fp, None)
        fp, disk_hash = disk
        state = local_state(record, installed, fp, disk_hash, _recorded(tx, target.rel, record, installed))
        base = 0 if installed is None else installed.version
        if state is Local.FOREIGN and record is not None and disk_hash is not None and base < record.version:
            lost = lost_install(installed, tx.history(target.rel, limit=record.version - base), disk_hash)
            if lost is not None:
                tx.log(
                    "recover",
                    target.rel,
                    EXTERNAL,
                    time.time(),
                    reason="lost-install",
                    seen_version=base,
                    version=lost.version,
                    detail=f"the working copy on host {socket.gethostname()} held v{lost.version}'s bytes with v{base} "
                    f"recorded as installed (an install whose record was lost, or a program writing those bytes): "
                    f"taken as v{lost.version} and brought up to date to v{record.version}",
                )
                installed, state = lost, local_state(record, lost, fp, disk_hash, lost.hash)
        if state is Local.BEHIND:
            assert record is not None
            if given and fp is None:  # the caller found no file: the deletion this copy holds, or nothing
                if installed is None:
                    return None
                return record._replace(version=installed.version, present=False, hash=None, fingerprint=None)
            if given and installed is not None:  # the caller holds an older version's bytes
                return record._replace(version=installed.version, hash=installed.hash, fingerprint=fp)
            data = tx.load(record.hash, f"{target.rel} v{record.version}") if record.present and record.hash else None
            try:
                displaced = replica.install(target.abs, target.rel, record.version, record.hash, data)
            except (NotADirectoryError, IsADirectoryError) as e:
                if not (isinstance(e, IsADirectoryError) and _removed_if_empty(target.abs)):
                    raise _tree_clash(self.paths.root, target, record, e) from e
                displaced = replica.install(target.abs, target.rel, record.version, record.hash, data)
            if displaced is not None:
                return self._caught_up(tx, replica, target, record, installed, *displaced)
            return record
        now, now_ns = time.time(), time.time_ns()
        if state is Local.SAME:
            held = None if record is None else (record.version, record.hash if record.present else None, fp)
            if held is not None and (installed is None or installed[:3] != held or disk_hash is not None):
                assert record is not None
                tx.touch_file(target.rel, record._replace(fingerprint=fp, checked_ns=now_ns))
            return record
        version, base = current_version(record) + 1, 0 if installed is None else installed.version
        # the bytes the caller read (its view goes to this version), or else as read now
        stored = self._retain(tx, target.abs, disk_hash if given else None, content)
        new = FileRecord(target.rel, version, True, stored or disk_hash, fp, EXTERNAL, now, now_ns)
        self._record(tx, new, "foreign", retained=stored is not None, size=self._kept_size(tx, stored, content))
        host = socket.gethostname()
        unrecorded = state is Local.UNRECORDED
        tx.log(
            "adopt" if record is None else "foreign",
            target.rel,
            EXTERNAL,
            now,
            seen_version=base,
            version=version,
            detail=f"the working copy on host {host} holds the v{base} it installed, which the registry does not "
            f"record (the database went back, restored from an older backup?): its bytes are recorded as "
            f"v{version}, not overwritten"
            if unrecorded
            else f"changed outside the volume on host {host}, in a working copy that held v{base}",
        )
        if record is not None and record.version >= base and (unrecorded or base != record.version):
            tx.log(
                "clobber",
                target.rel,
                EXTERNAL,
                now,
                seen_version=base,
                version=version,
                detail=f"the working copy on host {host} kept its v{base}, which the registry lost, over "
                f"v{record.version} by {record.writer}; both versions stay in history"
                if unrecorded
                else f"a program on host {host} wrote over v{record.version} by {record.writer}, which its "
                f"working copy never had (it held v{base}); both versions stay in history",
            )
        return new

    def _caught_up(
        self,
        tx: Transaction,
        replica: Replica,
        target: Target,
        record: FileRecord,
        installed: Installed | None,
        displaced: str,
        own: Fingerprint | None,
    ) -> FileRecord | None:
        """After a working copy's install of `record` took a file away (now at `displaced`: exchanged
        with the current version's bytes, the file `own` names, or set aside by a deletion): removed
        if it is what the copy was found holding (`installed`; `protocol.displaced_needs_hash`,
        `protocol.may_drop_taken`), else a change made on this host outside the volume after the
        check, recorded as the next version and put back in place (`_put_in_place`: a later save
        the put back meets is recorded and put in place in turn); the current record then."""
        fp = fingerprint_path(displaced)
        held = installed.hash if installed is not None else None
        seen = (installed.fingerprint, installed.checked_ns) if installed is not None and held else (None, 0)
        brought = record.hash if record.present else None
        if fp is None or not displaced_needs_hash(*seen, fp) or may_drop_taken(hash_path(displaced), held, brought):
            os.unlink(displaced)
            replica.holds(target.abs, target.rel, record.version, record.hash)
            replica.set_back(target.rel, displaced)
            return record
        why = (
            f"changed outside the volume on host {socket.gethostname()} just before its working copy's "
            f"{'install' if record.present else 'deletion'} of v{record.version}, which took it away"
        )
        self._set_back(tx, replica, target, displaced, why, own, brought)
        return tx.file(target.rel)

    def _set_back(
        self,
        tx: Transaction,
        replica: Replica,
        target: Target,
        name: str,
        why: str,
        own: Fingerprint | None,
        brought: str | None,
    ) -> None:
        """Record the file at `name`, which a catch-up (or a rename) of this working copy took from
        `target`, and put it back in place (`_put_in_place`; the file the catch-up installed is `own`,
        bytes `brought`); its note dropped once nothing is left at `name`, kept while a directory
        made at the target stops it (`Replica.setting_aside`)."""
        if self._put_in_place(tx, target, name, why, own, brought):
            return
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        replica.set_back(target.rel, name)

    def _noted(self) -> set[str]:
        """The paths where a catch-up or rename of this working copy left a file it took away
        unsettled (a `replica_aside` note; none outside a copy): the next transaction holding one
        settles it (`_settle_asides`), so a tracked read or a scan holds them (the file in place
        may be an older version than that change)."""
        return set() if self.replica is None else {rel for rel, _, _ in self.replica.asides()}

    def _settle_asides(self, tx: Transaction, replica: Replica, paths: set[str] | None, pending: set[str]) -> None:
        """Settle what catch-ups or renames of this working copy took away from `paths` (None: every
        path) and left unsettled: their process died, or their transaction failed, between the disk
        change and the record, or a directory made at the name stopped the put back (`_set_back`).
        `tx` holds those paths, so no catch-up of them is under way; a name an intent still names
        (`pending`) is its recovery's, which follows. As a live catch-up does
        (`protocol.may_drop_taken`): a file that is gone, the version the copy holds there or the
        bytes the change brought is removed; any other (a change made outside the volume) is
        recorded as the next version of its path and put back in place."""
        for rel, name, brought in replica.asides():
            if (paths is not None and rel not in paths) or name in pending:
                continue
            target = self.paths.of_rel(rel)
            taken = _hash_or_none(name)
            installed = replica.installed(rel)
            if may_drop_taken(taken, installed.hash if installed is not None else None, brought):
                if taken is not None:
                    os.unlink(name)
                replica.set_back(rel, name)
                continue
            why = (
                f"changed outside the volume on host {socket.gethostname()} just before its working copy's "
                "catch-up or rename took it away, whose process died before it put it back"
            )
            record = tx.file(rel)
            current = record.hash if record is not None and record.present else None
            own = installed.fingerprint if installed is not None and installed.hash == current else None
            self._set_back(tx, replica, target, name, why, own, current)

    def _hold(self, tx: Transaction, paths: Iterable[str]) -> None:
        """Hold `paths` too in `fn`'s transaction (`_transact`), their interrupted commits settled."""
        new = tx.hold(paths)
        if new:
            self._recover(tx, paths=new)

    def _recover(self, tx: Transaction, settle: bool = False, paths: Iterable[str] | None = None) -> None:
        """Settle every intent left by earlier commits on the paths `tx` holds, or on `paths`
        (`protocol.recovery`): drop those whose install happened, install or drop the staged content
        of recorded commits whose writer did not install it (only in a transaction of its own,
        `settle`: else `_RecoverFirst`), complete or abandon the other interrupted commits. Once per
        process's sweep (`_sweep`) finding the whole volume free at once, settle them all and remove
        what killed writers left in the staging directory."""
        sweeping = getattr(self._thread, "sweeping", False)
        if sweeping:
            tx.hold_all_if_free()
        intents = tx.intents(paths)
        held = tx.held if paths is None else paths
        covered = None if held is None else set(held)
        if sweeping and covered is None:
            self._sweep_staging(intents)
        if self.replica is not None:
            staged_names = {self.paths.staged(self.paths.of_rel(i.path), i.tmp) for i in intents if i.tmp}
            self._settle_asides(tx, self.replica, covered, staged_names)
        named = {i.tmp for i in intents}
        pending = {(i.path, i.version) for i in intents}
        with self._lock:  # other threads change entries of the paths they hold only
            for tmp, path in list(self._renamed.items()):  # forget names whose intents are gone
                if (covered is None or path in covered) and tmp not in named:
                    del self._renamed[tmp]  # no intent ever names one again
            self._undone -= {u for u in self._undone if (covered is None or u[0] in covered) and u not in pending}
            self._done -= {d for d in self._done if (covered is None or d[0] in covered) and d not in pending}
            renamed, undone, done = set(self._renamed), set(self._undone), set(self._done)
        for intent in intents:
            if intent.tmp in renamed:  # installed by this process: `finished`
                tx.drop_intent(intent.path)
                continue
            target = self.paths.of_rel(intent.path)
            staged = self.paths.staged(target, intent.tmp) if intent.tmp is not None else None
            if staged is not None and os.path.dirname(staged) == self.paths.staging and not os.path.lexists(staged):
                tx.drop_intent(intent.path)  # recorded with its decision, installed: `finished`
                continue
            record = tx.file(intent.path)
            recorded = record is not None and record.version >= intent.version
            if recorded:
                assert record is not None
                left = staged is not None and os.path.lexists(staged)
                if left and self.replica is None and not settle:
                    raise _RecoverFirst()
                if self._recover_recorded(tx, intent, target, record, staged if left else None):
                    continue  # its staged name holds another program's file, to be put back in turn
            else:
                if self.replica is None and not settle and staged is not None and os.path.lexists(staged):
                    raise _RecoverFirst()  # its disk is settled in a transaction of its own (a put back's steps)
                key = (intent.path, intent.version)
                self._recover_unrecorded(tx, intent, target, record, key in undone, key in done, staged)
                set_aside = staged is not None and os.path.lexists(staged)  # by its removal or rename
                if set_aside and self._recover_recorded(tx, intent, target, tx.file(intent.path), staged, aside=True):
                    continue
            if staged is not None:
                try:
                    os.unlink(staged)
                except OSError:
                    pass  # gone already (installed); never let cleanup wedge the volume
            tx.drop_intent(intent.path)
            if not recorded and intent.hash is not None and not tx.in_use(intent.hash):
                tx.drop(intent.hash)  # an abandoned commit's content, which nothing else names

    def _recover_recorded(
        self,
        tx: Transaction,
        intent: Intent,
        target: Target,
        record: FileRecord | None,
        staged: str | None,
        aside: bool = False,
    ) -> bool:
        """A commit recorded with its decision, its staged file still there (`staged`) or not:
        nothing to do if its install happened, else install the staged file now where the disk
        still holds the version before it and the file still holds the recorded bytes. A staged name
        holding what its install displaced puts that back in place unless the registry has its
        bytes (`protocol.recovery`, `_put_back`); so does the name a removal or a rename set the
        file it replaced aside at (`aside`: its intent, settled already, names it), never installed.
        Whether the intent stays (`_put_back`). On one host, a put back under way (its last step
        recorded, its exchange made or not) goes on from where it is (`_putting_back`)."""
        if self.replica is None and staged is not None:
            going = self._putting_back(tx, intent, target, record, staged)
            if going is not None:
                return going
        on_disk, disk_hash, previous, staged_hash = False, None, None, None
        current = aside or (record is not None and record.version == intent.version)
        if staged is not None and current and not aside:
            try:  # read and installed beneath the root, never through a directory made a symlink since
                target = self.paths.beneath(target)
            except OutsideVolume as e:
                detail = f"v{intent.version} was recorded but could not be installed: {e}"
                tx.log(
                    "recover",
                    intent.path,
                    intent.agent,
                    time.time(),
                    reason="superseded",
                    version=intent.version,
                    detail=detail,
                )
                return False  # its staged file goes; the version stays in history
        if staged is not None:
            staged_hash = _hash_or_none(staged)
            if current:
                before = tx.version_entry(intent.path, intent.version - 1)
                previous = before.hash if before is not None and before.hash is not None else None
                if self.replica is None and not aside:
                    fp, disk_hash = disk_state(target, None)
                    on_disk = fp is not None
        outcome = recovery(
            intent,
            on_disk,
            disk_hash,
            replicated=self.replica is not None,
            recorded=True,
            staged=staged is not None and current and not aside,
            staged_hash=staged_hash,
            staged_kept=not aside
            and staged_hash is not None
            and staged_hash != previous
            and staged is not None
            and self._kept_already(tx, intent, staged_hash, staged),
            previous=previous,
        )
        if outcome == "finished":
            return False
        v = intent.version
        detail = f"installed v{v}, recorded by a writer that did not install it"
        if outcome == "installed":
            assert staged is not None and intent.hash is not None
            try:
                install = atomic.Staged(
                    target.abs, intent.hash, None, staged, named=True, makes=(self.paths.root, 0o777)
                )
                if install.install(noreplace=previous is None, exchange=True) and _hash_or_none(staged) != previous:
                    outcome = "displaced"  # changed outside the volume since it was checked above
            except (OSError, OutsideVolume) as e:  # OutsideVolume: a directory on its way is a symlink now
                outcome, detail = "superseded", f"v{v} was recorded but could not be installed ({e})"
                why = (
                    f"the file still holds what it held before v{v}, which could not be installed "
                    f"({getattr(e, 'strerror', None) or e})"
                )
                self._sync(tx, target, record, why=why)
        elif outcome == "superseded":
            detail = f"v{v} was recorded, and the file changed outside the volume before it was installed"
        stays = False
        deletion = aside and not intent.present
        # a removal (a deletion, or a rename's of its source) is made (recorded as its version)
        # unless the file was saved again after its set-aside
        made = not deletion or (
            record is not None and record.version == intent.version and record.writer == intent.agent
        )
        if outcome == "displaced":
            assert staged is not None
            stays = self._put_back(tx, intent, target, staged, self._own_file(tx, intent), made)
            detail = f"v{v} was installed over a change made outside the volume just before, put back in place"
            if deletion:
                detail = (
                    f"v{v}, {intent.agent}'s removal of the file, was made over a change made outside the volume "
                    "just before, which it set aside: put back in place"
                    if made
                    else f"{intent.agent}'s removal of the file (not recorded: the file was saved outside the volume "
                    "again after it set the file aside) had set aside a change made outside the volume just before "
                    "it: put back in place, recorded as a version of its own, then the newer save in place again; "
                    "the removal is not in history: to delete the file, read it and delete it again"
                )
        if outcome in ("superseded", "displaced") and not deletion:
            detail += (
                "; the file keeps what it holds, recorded as a version of its own; "
                f"v{v} stays in history (`coherent-volume restore PATH --version {v}` brings it back)"
            )
        elif outcome == "displaced" and made:
            detail += f"; the file keeps what it holds, recorded as a version of its own; v{v} stays in history"
        version = v if made else None  # an abandoned deletion has no version
        tx.log("recover", intent.path, intent.agent, time.time(), reason=outcome, version=version, detail=detail)
        return stays

    def _kept_already(self, tx: Transaction, intent: Intent, digest: str, staged: str) -> bool:
        """Whether bytes hashing to `digest`, which the install of `intent` displaced (to `staged`),
        are kept as its path's already: recorded by a put back of that install that could not
        finish (a version after the intent's: a directory made at the name, `_put_in_place`), or,
        in a working copy, what the copy recorded holding there before the install (a version it
        held while behind), as the install's note says (`Writes._noting_aside`; the note is made
        before the disk changes, so a process killed right after the exchange leaves it). Where no
        note says it (a copy's state from before notes did), an earlier version of the path than
        the one the decision found counts: putting that back would revert the commits after it,
        another host's among them. Any other bytes, kept as another path's or as an earlier
        version of this one, are a change made outside all the same (/tmp/s32paths 1, /tmp/s32r2fw 1):
        a revert by a program is recorded and put back, not dropped."""
        retained = tx.retained(intent.path)
        if any(v.hash == digest and v.version > intent.version for v in retained):
            return True
        if self.replica is None:
            return False
        known, held = self.replica.held_before(intent.path, staged)
        if known:
            return held == digest
        return any(v.hash == digest and v.version < intent.version - 1 for v in retained)

    def _own_file(self, tx: Transaction, intent: Intent) -> Fingerprint | None:
        """The fingerprint of the file the install of `intent` put in place, where it is known: its
        record's (the staged file's, taken before the install), or in a working copy what the copy
        recorded holding right after its install (None: killed before it did)."""
        if self.replica is not None:
            held = self.replica.installed(intent.path)
            ours = held is not None and held.version == intent.version and held.hash == intent.hash
            return held.fingerprint if ours and held is not None else None
        record = tx.file(intent.path)
        return record.fingerprint if record is not None and record.version == intent.version else None

    def _put_back(
        self, tx: Transaction, intent: Intent, target: Target, staged: str, own: Fingerprint | None, made: bool = True
    ) -> bool:
        """Record the file that the install of `intent` displaced (at its staged name) as the version
        after the current one, by EXTERNAL, then exchange it back into place (`_put_in_place`: the
        file that install put in place is `own`, where known). Whether the staged name is to stay,
        with the intent: a directory made at the name stops the put back (the file, recorded,
        is left there, and recovery, finding its bytes recorded after the intent, removes it). `made`
        False: the change is a deletion that was not (the file saved again after its set-aside), so
        it has no version to name."""
        detail = (
            f"changed outside the volume just before the install of v{intent.version} by {intent.agent}, "
            "which displaced it"
        )
        if not intent.present:
            named = f" (v{intent.version})" if made else " (not recorded: the file was saved again after it)"
            what = f"{intent.agent}'s removal of the file{named}"
            detail = f"changed outside the volume just before {what}, which set it aside"
        return self._put_in_place(tx, target, staged, detail, own, intent.hash)

    def _put_in_place(
        self, tx: Transaction, target: Target, name: str, why: str, own: Fingerprint | None, brought: str | None
    ) -> bool:
        """Record the file at `name`, which a change of `target` took away (an install's exchange, a
        set-aside), as the next version by EXTERNAL (`_record_displaced`), then exchange it back
        into place. The exchange should bring back the change's own file (`own`: its fingerprint,
        None where not known; `brought`: its bytes): told by its inode, never by its bytes alone
        (`_is_the_file`), it is removed. Any other file it brings back is a program's save made at
        the name meanwhile, later than the one put back, whatever its bytes (the commit's, a
        save's this put back recorded, the version before: /tmp/s32r2fw 2): recorded after it
        and exchanged into place in turn, what comes back then expected to be the file put back
        the round before; PUT_BACK_ROUNDS times at most (past that, the last file brought back is
        recorded too and removed). Where `own` is not known (a working copy killed between its
        install and its record of it), bytes equal to `brought` are taken for the change's file.
        Whether `name` still holds a file: a directory made at the name stops the put back.

        On one host, step by step (`_put_step`): the record committed before the exchange is made,
        so a process killed at any point leaves its next recovery the record and the disk to go on
        from (`_putting_back`)."""
        if self.replica is None:
            return self._put_step(tx, target, name, why, (own, brought))
        expected, expected_hash = own, brought
        for _ in range(PUT_BACK_ROUNDS):
            version = current_version(tx.file(target.rel)) + 1
            digest = self._record_displaced(tx, target, name, version, why)[0]
            placed = fingerprint_path(name)
            try:
                swapped = atomic.swap_in(name, target.abs)
            except IsADirectoryError:  # made at the name by a program: it stays; the file is recorded
                return True
            atomic.sync_dirs(target.abs)
            if not swapped or _is_the_file(name, expected, expected_hash):
                return False
            expected, expected_hash = placed, digest
            why = f"saved outside the volume while v{version}, which another program's save displaced, was put back"
        self._record_last(tx, target, name, current_version(tx.file(target.rel)) + 1, why)
        return False

    def _put_step(
        self,
        tx: Transaction,
        target: Target,
        name: str,
        why: str,
        expected: tuple[Fingerprint | None, str | None],
        done: str = "put back in place",
    ) -> bool:
        """One step of a one-host put back: record the file at `name` as the next version by
        EXTERNAL, with its fingerprint (its inode: an exchange moves only its ctime), and call for
        its exchange into place, which `_settle_alone` makes once this transaction committed; the
        file it is to bring back is `expected` (fingerprint, hash). Only in recovery's transaction
        of its own (`_RecoverFirst` from any other: nothing is recorded there). Whether `name`
        stays (with its intent) for the next step; False: its bytes are the current version's
        already, and it is removed."""
        moves = self._put_backs()
        version = current_version(tx.file(target.rel)) + 1
        if not self._record_displaced(tx, target, name, version, why, done, fingerprinted=True)[1]:
            return False
        self._exchange_after(moves, name, target, expected)
        return True

    def _put_backs(self) -> list[tuple[str, Target]]:
        """The exchanges this thread's recovery transaction of its own calls for (`_settle_alone`
        makes them once it committed); `_RecoverFirst` from any other transaction."""
        moves: list[tuple[str, Target]] | None = getattr(self._thread, "put_backs", None)
        if moves is None:
            raise _RecoverFirst()
        return moves

    def _exchange_after(
        self,
        moves: list[tuple[str, Target]],
        name: str,
        target: Target,
        expected: tuple[Fingerprint | None, str | None],
    ) -> None:
        """Call for the exchange of the file at `name` into place at `target`, which is to bring back
        the file `expected` (fingerprint, hash: `_putting_back` removes it)."""
        with self._lock:
            self._put_expected[name] = expected
        moves.append((name, target))

    def _record_last(self, tx: Transaction, target: Target, name: str, version: int, why: str) -> None:
        """Record the file at `name` as `version` where a put back stops after PUT_BACK_ROUNDS saves
        in a row: its bytes kept in history only, the file in place (an earlier save) stays."""
        why += f", the {PUT_BACK_ROUNDS + 1}th save in a row the put back met"
        self._record_displaced(
            tx, target, name, version, why, "its bytes kept in history only (the file in place stays)"
        )

    def _putting_back(
        self, tx: Transaction, intent: Intent, target: Target, record: FileRecord | None, staged: str
    ) -> bool | None:
        """Go on with a one-host put back under way at `staged`, the name the change of `intent`
        took a file away to (None: none is): its last step recorded the file it put back as the
        current version (`record`, by EXTERNAL, with its fingerprint) and committed that before its
        exchange (`_put_step`). Told by where that file is, its inode (`protocol.recovery`):
        - at `staged`: the exchange was not made (the process died first): made now (after this
          transaction), unless a directory was made at the target, which stops it (the file,
          recorded, is removed);
        - at the target: made. What it brought back to `staged` is removed if it is the file the
          step expected there (what the change had put in place, or the file the step before put
          back: told by its inode while this process knows it, else by its bytes), or the
          recorded bytes again; any other file is a program's save at the target before the
          exchange, later than the one put back: recorded and put in place in turn (a next step);
        - neither: the file in place was replaced since (a later save, which the next check
          records): a file at `staged` other than the one expected is recorded (after the one put
          back, before that later save) and removed.
        Whether `staged` stays, with the intent (None: no put back under way there)."""
        if (
            record is None
            or not record.present
            or record.writer != EXTERNAL
            or record.fingerprint is None
            or record.version < intent.version
        ):
            return None
        fp = record.fingerprint

        def holds(name: str) -> bool:  # the very file that step recorded
            return fingerprint_path(name) is not None and _is_the_file(name, fp, record.hash)

        with self._lock:
            expected = self._put_expected.pop(staged, None)
        if expected is None:  # this process did not make the exchange: the file expected back told by its bytes
            before = tx.version_entry(intent.path, record.version - 1)
            first = record.version - 1 < intent.version or (
                before is not None and before.version == intent.version and before.writer == intent.agent
            )
            expected = (None, intent.hash if first or before is None else before.hash)
        if holds(staged):
            if (os.path.isdir(target.abs) and not os.path.islink(target.abs)) or not os.path.isdir(
                os.path.dirname(target.abs)
            ):  # a directory made at its name, or its own directory removed: stopped (kept in history)
                return False
            self._exchange_after(self._put_backs(), staged, target, expected)
            return True
        if fingerprint_path(staged) is None or _is_the_file(staged, *expected) or _hash_or_none(staged) == record.hash:
            return False
        why = f"saved outside the volume while v{record.version}, which another program's save displaced, was put back"
        if not holds(target.abs):
            why = f"saved outside the volume while v{record.version} was put back, and replaced in place since"
            self._record_displaced(tx, target, staged, record.version + 1, why, "its bytes kept in history only")
            return False
        if record.version - intent.version >= PUT_BACK_ROUNDS:
            self._record_last(tx, target, staged, record.version + 1, why)
            return False
        return self._put_step(tx, target, staged, why, (fp, record.hash))

    @staticmethod
    def _stored_size(tx: Transaction, record: FileRecord) -> int | None:
        """The size of `record`'s content, as the store records it (None where it is not kept): for
        a version recorded with no fingerprint (recovery's, from a temp name or another process's
        install, or a file gone again at once)."""
        return None if record.hash is None else tx.content_size(record.hash)

    @staticmethod
    def _kept_size(tx: Transaction, stored: str | None, content: bytes | int | None = None) -> int | None:
        """The size of the bytes a foreign version keeps (`stored`: their hash, None if none are;
        `content`: the bytes, where the caller read them), which its history lists: a fingerprint
        taken before a file still being written grew gives another. None: no bytes are kept."""
        if isinstance(content, bytes):
            return len(content)
        return None if stored is None else tx.content_size(stored)

    def _record_displaced(
        self,
        tx: Transaction,
        target: Target,
        name: str,
        version: int,
        why: str,
        done: str = "put back in place",
        *,
        fingerprinted: bool = False,
    ) -> tuple[str, bool]:
        """Record the file at `name`, which an install displaced from `target` and which is to be
        put back in place, as `version`, a change made outside the volume: its bytes retained as
        read from `name` before it goes back (where another program could replace it before any
        check saw it), logged saying `why`. No fingerprint (the next check hashes the file) unless
        `fingerprinted`: a one-host put back's step, whose file is told by its inode until its
        exchange is settled (`_putting_back`). Its hash, and whether a version was recorded (not
        where the current version holds those bytes)."""
        now = time.time()
        kept = hash_file(name)
        current = tx.file(target.rel)
        if current is not None and current.present and current.hash == kept[1]:
            return kept[1], False  # recorded by a put back a directory stopped, or a save of those bytes again
        stored = self._retain(tx, name, None)
        digest = stored or kept[1]
        fp = kept[0] if fingerprinted and stored == kept[1] else None  # (a file changing while read: no identity)
        record = FileRecord(target.rel, version, True, digest, fp, EXTERNAL, now, time.time_ns())
        size = self._kept_size(tx, stored)
        self._record(tx, record, "foreign", retained=stored is not None, size=kept[0].size if size is None else size)
        tx.log("foreign", target.rel, EXTERNAL, now, version=version, detail=f"{why}: {done}")
        return digest, True

    def _recover_unrecorded(
        self,
        tx: Transaction,
        intent: Intent,
        target: Target,
        record: FileRecord | None,
        undone: bool,
        done: bool,
        staged: str | None,
    ) -> None:
        """A creation, deletion or rename interrupted before it was recorded: complete it if the
        disk holds what it intended, else abandon it; abandon it if its disk step failed (`undone`),
        complete it if this process saw that step succeed (`done`).
        A rename whose content waits at its temp name (`staged`) is completed by installing it
        (exchanged into place: what that displaced is at `staged` then, for the caller to check)."""
        set_aside = staged is not None and not intent.present and os.path.lexists(staged)  # a deletion's, done
        waiting = staged is not None and intent.present and _hash_or_none(staged) == intent.hash
        moved = not waiting and staged is not None and intent.present and self._moved_source(tx, intent, target, staged)
        waiting = waiting or moved
        blocked: str | None = None  # where its content stays, when a directory at its name stops it
        # a working copy's disk may not hold it (`_sync_copy` finds out at its next access): not read
        read = self.replica is None and not undone and not done and not waiting
        fp, disk_hash = disk_state(target, None) if read else (None, None)
        replicated = self.replica is not None
        outcome = recovery(intent, fp is not None, disk_hash, replicated, staged=waiting, undone=undone, done=done)
        if outcome == "completed" and waiting:  # no fingerprint recorded: a save meanwhile is not taken for it
            assert staged is not None
            try:
                atomic.swap_in(staged, target.abs)
                atomic.sync_dirs(target.abs)
            except IsADirectoryError:  # made at the name by a program: it stays, and the rename cannot end
                outcome, blocked = "abandoned", staged
        now = time.time()
        if outcome == "completed":
            retained = (
                not intent.present
                or self.replica is not None  # stored with the intent
                or (moved and intent.hash is not None and tx.content_size(intent.hash) is not None)  # the source's
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
            if moved:  # as the live rename's check of the moved file (`Renames._moved_changed`)
                why = (
                    f"saved at the source of {intent.agent}'s rename just before the rename moved it here, "
                    "whose process died before it checked it"
                )
                self._record_displaced(tx, target, target.abs, intent.version + 1, why, done="in place")
        # a deletion whose file was saved again after its set-aside (its own live process's recovery too)
        overtaken = outcome == "abandoned" and not intent.present and not undone and set_aside
        tx.log(
            "recover",
            intent.path,
            intent.agent,
            now,
            reason=outcome,
            version=intent.version if outcome == "completed" else None if overtaken else current_version(record),
            detail=f"abandoned an interrupted rename: a directory was made at its name; its content stays at {blocked}"
            if blocked is not None
            else "abandoned: the system call that was to make the change failed, so nothing changed"
            if outcome == "abandoned" and undone
            else "completed an interrupted rename: its content, moved to a temp name, installed from there"
            if waiting
            else "completed a rename installed by its process, which settles what its exchange displaced first"
            if done
            else f"abandoned {intent.agent}'s removal of the file (a deletion, or a rename of it away), not recorded "
            f"(it would have been v{intent.version}): the file was saved outside the volume after the removal set it "
            "aside, so a program's save newer than it is in place; what it set aside is put back in place before it "
            "goes (if it is not the version the removal found)"
            if overtaken
            else f"{outcome} an interrupted commit"
            if self.replica is None  # one host: its writer holds the commit lock until it records it
            else f"recorded {intent.agent}'s {'change' if intent.present else 'deletion'} as v{intent.version}: "
            "decided in the registry (its commit point) and not yet recorded as done, as its writer (a process of "
            "another working copy, on this host or another) was still finishing it, or died",
        )

    @staticmethod
    def _moved_source(tx: Transaction, intent: Intent, target: Target, staged: str) -> bool:
        """Whether the temp name of a rename's destination intent (`staged`), holding other bytes
        than the rename's, holds the rename's source after all, saved by a program just before the
        rename moved it there (`renames._save_in`), its process killed before the exchange: the
        destination still holds the version the rename found (the exchange did not happen), and
        the temp name other bytes. Else (the exchange happened) it holds what that displaced."""
        held = _hash_or_none(staged)
        before = tx.version_entry(intent.path, intent.version - 1)
        if held is None or before is None or before.hash is None or held == before.hash:
            return False
        return _hash_or_none(target.abs) == before.hash

    def _settle_installs(self) -> None:
        """Under the commit lock, before reading a file for a transaction that is given what was
        read (`_sync`'s `disk`): install what writers that died had recorded but not installed. Its
        recovery would otherwise change the file after it was read (a working copy's recovery
        changes no file)."""
        if self.replica is not None:
            return
        with self.registry.read() as tx:
            intents = tx.intents()
        if any(
            i.tmp is not None and os.path.lexists(self.paths.staged(self.paths.of_rel(i.path), i.tmp)) for i in intents
        ):
            self._transact(lambda tx: None)

    def _sweep_staging(self, intents: list[Intent]) -> None:
        """Remove staged files no intent names: named by writers killed before their commit was
        recorded (every staged file is named under the commit lock, which the caller holds). One a
        working copy noted (`replica_aside`: what an install displaced there, whose intent another
        copy settled) is `_settle_asides`' to record and put back, never removed here."""
        self._swept = True
        named = {os.path.basename(i.tmp) for i in intents if i.tmp is not None}
        if self.replica is not None:
            named |= {os.path.basename(name) for _, name, _ in self.replica.asides()}
        try:
            names = os.listdir(self.paths.staging)
        except OSError:
            return
        for name in names:
            if name not in named:
                try:
                    os.unlink(os.path.join(self.paths.staging, name))
                except OSError:
                    pass

    def _record(
        self,
        tx: Transaction,
        record: FileRecord,
        kind: VersionKind,
        parents: tuple[int, ...] = (),
        *,
        retained: bool = True,
        size: int | None = None,
    ) -> None:
        """Record a new version of a managed path: its current state and its history entry (its
        size: `size`, else its fingerprint's). Its bytes are retained (`_retain`) before it is
        recorded; `retained` False says they could not be (a file that kept changing while it was
        read), so its history lists it as not kept."""
        tx.put_file(record)
        if size is None and record.present:
            size = record.fingerprint.size if record.fingerprint is not None else self._stored_size(tx, record)
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
                never_kept=record.present and not retained,
            )
        )

    def _retain(self, tx: Transaction, path: str, digest: str | None, content: bytes | int | None = None) -> str | None:
        """Retain, in `tx`, the content of the file at `path` for the version about to be recorded
        in it: as `digest` (None if the file no longer holds it), or, with `digest` None, as
        whatever it holds now; the hash it was stored under. `content`, the bytes `digest` was
        taken of or a descriptor of the file it was, is read instead of `path`: a descriptor written
        in place since is retained as it is now (what its reader will read). None: a file gone
        meanwhile or no longer holding `digest` (its version is then listed as not retained)."""
        if isinstance(content, bytes):
            return self._store(tx, digest, content)
        if content is not None:
            return self._store(tx, digest, content) or self._store(tx, None, content)
        try:
            fd = open_to_check(path)
        except OSError:
            return None
        try:
            return self._store(tx, digest, fd)
        finally:
            os.close(fd)

    @staticmethod
    def _store(tx: Transaction, digest: str | None, source: bytes | int) -> str | None:
        """`tx.store`; None where the bytes no longer hash to `digest` (a file written meanwhile)."""
        try:
            return tx.store(digest, source)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            return None

    def _holder(self, tx: Transaction, rel: str) -> Grant | None:
        """The live grant on `rel` (`_live`)."""
        return self._live(tx, rel, tx.grant(rel))

    def _live(self, tx: Transaction, rel: str, grant: Grant | None) -> Grant | None:
        """`grant`, the grant on `rel` as this transaction read it, if it is live; one that ended is
        reclaimed (and, for a `lock()`, its agent fenced) (`protocol.grant_over`, on the registry's
        clock)."""
        if grant is None:
            return None
        now = tx.now()
        if not grant_over(grant, now, grant.owner.alive()):
            return grant
        owner = f"process {grant.owner.pid} of {grant.owner.host}"
        if now >= grant.expires_at:
            why = f"expired {now - grant.expires_at:.1f} s ago on the registry's clock, not renewed by its {owner}"
        else:
            why = f"its {owner} died"
        self._end_grant(tx, rel, grant, now, f"write grant reclaimed: {why}")
        return None

    @staticmethod
    def _end_grant(tx: Transaction, rel: str, grant: Grant, now: float, detail: str) -> None:
        """Drop `grant` on `rel` before its holder released it (logged with `detail`), fencing its
        agent where the grant fences (a `lock()`: its holder's later write is refused `fenced`)."""
        tx.drop_grant(rel)
        if grant.fences:
            tx.put_fence(grant.agent, rel, now)
        tx.log("reclaim", rel, grant.agent, now, detail=detail)

    def reclaim(self, target: Target) -> Grant | None:
        """End the write grant on `target` now, as its expiry would (`_end_grant`): for a holder whose
        process this host cannot check (another PID namespace or host), which the user knows to be
        gone. The grant ended, or None where there was none."""
        self._require_managed(target, "reclaim")

        def end(tx: Transaction) -> Grant | None:
            grant = tx.grant(target.rel)
            if grant is not None:
                detail = f"write grant of process {grant.owner.pid} of {grant.owner.host} reclaimed on request"
                self._end_grant(tx, target.rel, grant, tx.now(), detail)
            return grant

        return self._transact(end, holds=(target.rel,))

    def _changed_read_set(self, tx: Transaction, agent: str, rel: str) -> tuple[str, ...]:
        read_set = tx.read_set(agent)
        self._hold(tx, read_set)
        for path in read_set:
            if path != rel:
                self._sync(tx, self.paths.of_rel(path), tx.file(path))
        return changed_paths(read_set, tx.versions(list(read_set)), rel)

    @staticmethod
    def _require_managed(target: Target, what: str, *, reads: bool = False) -> None:
        """NotManaged unless `target` is managed; UnprotectedAlias for a managed name through a
        symlink to an unmanaged path (`reads`: `what` only reads versions, which it has none of)."""
        if target.alias_of is not None:
            raise UnprotectedAlias(target.alias_of, target.rel, what if reads else None)
        if not target.managed:
            raise NotManaged(f"{target.rel!r} is not managed by this volume; {what} applies to managed paths only")


def _removed_if_empty(path: str) -> bool:
    """Remove the directory `path` if it holds nothing but directories on its own file system (what a
    working copy keeps of files deleted under a name that is a file now); whether it did. Nothing is
    removed if it holds anything else (a file, a symlink, a mount point), or if something is made in
    it meanwhile."""
    try:
        device = os.lstat(path).st_dev
        found = list(os.walk(path, topdown=False))
        for directory, dirs, files in found:
            if files or os.lstat(directory).st_dev != device:  # (a mount point: never crossed)
                return False
            if any(os.path.islink(os.path.join(directory, d)) for d in dirs):
                return False
        for directory, _, _ in found:
            os.rmdir(directory)
    except OSError:  # (gone or changed meanwhile)
        return False
    return True


def _tree_clash(root: str, target: Target, record: FileRecord, e: OSError) -> TreeClash:
    """The error of a working copy's catch-up that cannot install `record` at `target`: its name is
    a directory here (`IsADirectoryError`), or a name on its path is a file here
    (`NotADirectoryError`), where another copy made the other kind (the registry holds both: each
    copy's commit was checked against its own disk)."""
    name = target.rel
    if isinstance(e, NotADirectoryError):
        parts = target.rel.split("/")
        ancestors = ("/".join(parts[:n]) for n in range(1, len(parts)))
        name = next((a for a in ancestors if not os.path.isdir(os.path.join(root, a))), target.rel)
    here, there = ("a directory", "a file") if isinstance(e, IsADirectoryError) else ("a file", "a directory")
    return TreeClash(
        e.errno,
        f"{target.rel} v{record.version} (by {record.writer}) cannot be installed in this working copy: {name} is "
        f"{here} here, and another working copy made it {there}; the volume holds both. Rename or delete the file, "
        f"or every file under the directory, through the volume, on a copy that holds it (this one holds {name} as "
        f"{here})",
        target.rel,
    )
