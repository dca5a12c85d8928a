"""VolumeCore: the protocol applied to one volume — files under the root plus the registry.

This is the I/O edge around `protocol` (pure rules) and `registry` (shared state). Every
face calls it with an explicit agent; the Python API serves one agent, a mount many.

Invariants:
- every registry change that a write decision depends on happens under `commit_lock()`;
- a commit is recorded as an Intent before its rename and completed after it, so a crash
  at any instant is either completed or abandoned by `_recover`, never left disagreeing;
- a view is registered only at the version whose content hash equals the bytes returned.
"""
from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Callable, Literal

from . import atomic
from .errors import CasConflict, NotManaged, RegistryError, StaleWriteError
from .fingerprint import Fingerprint, content_hash, fingerprint_path, hash_fd, hash_path, read_fd, read_file
from .liveness import ProcessId
from .paths import REGISTRY_DIR, Target, VolumePaths
from .protocol import (EXTERNAL, Disk, FileRecord, Grant, Intent, WriteCheck, changed_paths, classify,
                       current_version, decide_write, grant_over, needs_hash)
from .registry import Registry, Transaction

Isolation = Literal["file", "read-set"]

EMPTY_HASH = content_hash(b"")

HANDLE_GRANT_TTL = 24 * 3600.0
"""Grants taken for open write handles end at release, or when the process owning them dies."""


@dataclass(frozen=True)
class Observed:
    """What a read saw: the bytes and the version they are."""

    data: bytes
    version: int


def _disk(target: Target, record: FileRecord | None) -> tuple[Fingerprint | None, str | None]:
    """Fingerprint of the disk, plus its content hash when the fingerprint alone cannot decide."""
    fp = fingerprint_path(target.abs)
    if fp is None:
        return None, None
    if record is not None and record.present and not needs_hash(record, fp):
        return fp, None
    try:
        data, fp = read_file(target.abs)
    except FileNotFoundError:
        return None, None
    return fp, content_hash(data)


def _handle_grant(tx: Transaction, agent: str, target: Target, owner: ProcessId,
                  expires: float) -> tuple[Grant, bool]:
    """The write grant for an open handle of an agent that passed its checks: (grant, owned), the
    grant it already holds (not owned: the handle must not release it) or a new one. It does not
    fence: a handle's writes are committed as compare-and-swaps."""
    held = tx.grant(target.rel)  # the agent's own: another agent's was a refusal
    if held is not None:
        return held, False
    grant = Grant(target.rel, agent, secrets.token_hex(8), owner, expires, fences=False)
    tx.put_grant(grant)
    return grant, True


def _end(tx: Transaction, grant: Grant) -> bool:
    """End `grant` if it is still the one in force; False if it was reclaimed meanwhile."""
    current = tx.grant(grant.path)
    if current is None or current.token != grant.token:
        return False
    tx.drop_grant(grant.path)
    return True


class VolumeCore:
    """The protocol over one root and its registry; thread-safe; one per process per volume."""

    def __init__(self, root: str, registry: Registry) -> None:
        self.registry = registry
        self.paths = VolumePaths(root, registry.globs)

    def resolve(self, path: str) -> Target:
        return self.paths.resolve(path)

    # ---- keeping the registry in step with the disk (commit lock + write transaction held) ----

    def _sync(self, tx: Transaction, target: Target, record: FileRecord | None,
              disk: tuple[Fingerprint | None, str | None] | None = None) -> FileRecord | None:
        """Record any foreign change of `target` as a new version by EXTERNAL; return the current record."""
        fp, disk_hash = disk if disk is not None else _disk(target, record)
        state = classify(record, fp, disk_hash)
        now, now_ns = time.time(), time.time_ns()
        if state is Disk.SAME:
            if record is not None and record.present and fp is not None and (
                    fp != record.fingerprint or disk_hash is not None):
                record = FileRecord(record.path, record.version, True, record.hash, fp, record.writer,
                                    record.committed_at, now_ns)
                tx.touch_file(target.rel, record)
            return record
        version = current_version(record) + 1
        present = state is Disk.CHANGED
        new = FileRecord(target.rel, version, present, disk_hash if present else None, fp, EXTERNAL, now, now_ns)
        tx.put_file(new)
        tx.log("foreign", target.rel, EXTERNAL, now, version=version,
               detail="changed outside the volume" if present else "deleted outside the volume")
        return new

    def _recover(self, tx: Transaction) -> None:
        """Complete or abandon the intents of writers that died between decision and install."""
        for intent in tx.intents():
            target = self.paths.of_rel(intent.path)
            record = tx.file(intent.path)
            fp, disk_hash = _disk(target, None)
            installed = (fp is not None and disk_hash == intent.hash) if intent.present else fp is None
            now = time.time()
            if installed:
                tx.put_file(FileRecord(intent.path, intent.version, intent.present, intent.hash, fp,
                                       intent.agent, now, time.time_ns()))
                tx.put_view(intent.agent, intent.path, intent.version, now)
            tx.log("recover", intent.path, intent.agent, now, version=intent.version if installed else current_version(record),
                   detail="completed an interrupted commit" if installed else "abandoned an interrupted commit")
            if intent.tmp is not None:
                try:
                    atomic.Staged(target.abs, "", None, intent.tmp, named=True).discard()
                except OSError:
                    pass  # nothing by that name can exist: never let cleanup wedge the volume
            tx.drop_intent(intent.path)

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

    # ---- reads ----------------------------------------------------------------------

    def read(self, agent: str, target: Target, fd: int | None = None, *, register: bool = True) -> Observed:
        """Read a file (from `fd` if given, which this closes); for a managed one, register `agent`'s
        view at the version of these bytes (unless `register` is False: a pinned agent's re-read).

        Raises FileNotFoundError for a missing file (after recording the agent's view of its deletion)."""
        if not target.managed:
            return Observed(read_fd(fd, target.rel)[0] if fd is not None else read_file(target.abs)[0], 0)
        try:
            data, _ = read_fd(fd, target.rel) if fd is not None else read_file(target.abs)
        except FileNotFoundError:
            data = None
        if data is not None:
            version = self._pair(agent, target, content_hash(data), register)
            if version is not None:
                return Observed(data, version)
        return self._read_locked(agent, target, register)

    def _pair(self, agent: str, target: Target, digest: str, register: bool) -> int | None:
        """Optimistically pair content with the committed version that has its hash (registering
        the view unless told not to); None when no committed version matches right now."""
        record, seen = self.registry.peek(target.rel, agent)
        if record is None or not record.present or record.hash != digest:
            return None
        if seen == record.version or not register:
            return record.version
        with self.registry.write() as tx:
            record = tx.file(target.rel)
            if record is not None and record.present and record.hash == digest:
                tx.put_view(agent, target.rel, record.version, time.time())
                return record.version
        return None

    def open_version(self, agent: str, target: Target, *, register: bool = True) -> tuple[int, int]:
        """Open a managed file for reading, paired with the version of its content: (fd, version).

        The fd keeps serving exactly that version (a commit installs a new inode), so a reader never
        mixes two versions; the agent's view is registered at it unless `register` is False."""
        fd = os.open(target.abs, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            version = self._pair(agent, target, hash_fd(fd), register)
        except BaseException:
            os.close(fd)
            raise
        if version is not None:
            return fd, version
        os.close(fd)
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            fd = os.open(target.abs, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                record = self._sync(tx, target, tx.file(target.rel), (Fingerprint.of(os.fstat(fd)), hash_fd(fd)))
                assert record is not None
                if register:
                    tx.put_view(agent, target.rel, record.version, time.time())
            except BaseException:
                os.close(fd)
                raise
            return fd, record.version

    def _read_locked(self, agent: str, target: Target, register: bool) -> Observed:
        """Slow path: no cooperating writer can move the file while we read, sync and register."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            try:
                data, fp = read_file(target.abs)
                disk: tuple[Fingerprint | None, str | None] = (fp, content_hash(data))
            except FileNotFoundError:
                data, disk = None, (None, None)
            record = self._sync(tx, target, tx.file(target.rel), disk)
            if record is not None and register:
                tx.put_view(agent, target.rel, record.version, time.time())
        if data is None:
            raise FileNotFoundError(2, "No such file or directory", target.rel)
        assert record is not None
        return Observed(data, record.version)

    def version(self, target: Target) -> int:
        """Current committed version of a managed path (0 if it never existed), foreign changes included."""
        self._require_managed(target, "version")
        with self.registry.read() as tx:
            record = tx.file(target.rel)
        fp = fingerprint_path(target.abs)
        if (fp is None and (record is None or not record.present)) or (
                record is not None and record.present and fp is not None and not needs_hash(record, fp)):
            return current_version(record)
        if record is not None and record.present and fp is not None and hash_path(target.abs) == record.hash:
            return record.version  # same content, only the fingerprint is unproven: no lock needed
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            return current_version(self._sync(tx, target, tx.file(target.rel)))

    def stale(self, agent: str) -> list[str]:
        """Managed paths `agent` has read whose current version is not the one it read."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            for path in tx.read_set(agent):
                self._sync(tx, self.paths.of_rel(path), tx.file(path))
            return [path for path, _, _ in tx.stale_views(agent)]

    def scan(self) -> None:
        """Bring the registry in step with the whole tree: every recorded path and every managed file."""
        with self.registry.read() as tx:
            recorded = {record.path for record in tx.files()}
        on_disk = set()
        for directory, dirs, files in os.walk(self.paths.root):
            if directory == self.paths.root and REGISTRY_DIR in dirs:
                dirs.remove(REGISTRY_DIR)
            for name in files:
                rel = os.path.relpath(os.path.join(directory, name), self.paths.root).replace(os.sep, "/")
                if self.paths.managed(rel):
                    on_disk.add(rel)
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            for rel in sorted(recorded | on_disk):
                self._sync(tx, self.paths.of_rel(rel), tx.file(rel))

    def forget(self, agent: str, target: Target) -> None:
        with self.registry.write() as tx:
            tx.drop_view(agent, target.rel)

    def clear_fence(self, agent: str, target: Target) -> None:
        with self.registry.commit_lock(), self.registry.write() as tx:
            tx.drop_fence(agent, target.rel)

    # ---- writes ---------------------------------------------------------------------

    def _check(self, tx: Transaction, agent: str, target: Target, now: float, isolation: Isolation,
               expected: int | None = None, need_view: bool = True) -> tuple[FileRecord | None, WriteCheck, StaleWriteError | None]:
        """Sync `target` with the disk and decide whether `agent` may write it; log and build any refusal.

        `need_view=False` checks only grants and fences (an append cannot clobber what it did not read)."""
        record = self._sync(tx, target, tx.file(target.rel))
        grant = self._holder(tx, target.rel, now)
        check = WriteCheck(
            agent=agent, current=record, seen=tx.view(agent, target.rel) if need_view else current_version(record),
            holder=grant.agent if grant else None, fenced=tx.fenced(agent, target.rel),
            changed_read_set=self._changed_read_set(tx, agent, target.rel) if isolation == "read-set" else (),
            expected=expected)
        reason = decide_write(check)
        if reason is None:
            return record, check, None
        version = current_version(record)
        tx.log("refusal", target.rel, agent, now, reason=reason, seen_version=check.seen, version=version,
               detail=f"holder={check.holder}" if reason == "held" else ",".join(check.changed_read_set) or None)
        kind = CasConflict if expected is not None else StaleWriteError
        extra = {"expected_version": expected} if expected is not None else {}
        return record, check, kind(target.rel, agent, reason, check.seen, version, record.writer if record else None,
                                   holder=check.holder if reason == "held" else None,
                                   changed=check.changed_read_set, **extra)

    def commit(self, agent: str, target: Target, content: bytes | atomic.Staged | None, *,
               isolation: Isolation = "file", expected: int | None = None, ending: Grant | None = None) -> int:
        """Install `content` (bytes, or content already staged beside the target; None deletes) if the
        protocol accepts it; return the new version. Staged content is consumed.

        Unmanaged paths are written atomically with no checks and report version 0. A refusal
        raises StaleWriteError (CasConflict when `expected` is given) and changes no file. A
        successful commit also ends the grant `ending` (if still in force), in its last transaction."""
        if target.managed and isinstance(content, bytes) and self._doomed(agent, target, expected):
            self._refuse_if_still_refused(agent, target, isolation, expected)
        staged = atomic.stage(target.abs, content) if isinstance(content, bytes) else content
        try:
            if not target.managed:
                if staged is None:
                    atomic.remove(target.abs)
                else:
                    staged.install()
                return 0
            with self.registry.commit_lock():
                return self._commit_locked(agent, target, staged, isolation, expected, ending)
        finally:
            if staged is not None:
                staged.discard()

    def _doomed(self, agent: str, target: Target, expected: int | None) -> bool:
        """Cheap unlocked guess that a write will be refused: then skip staging (and its fsync)."""
        record, seen = self.registry.peek(target.rel, agent)
        version = current_version(record)
        if expected is not None:
            return expected != version
        return record is not None and record.present and seen != version

    def _refuse_if_still_refused(self, agent: str, target: Target, isolation: Isolation, expected: int | None) -> None:
        """Decide under the commit lock; raise (and log) the refusal, or return if the write may go ahead."""
        with self.registry.commit_lock():
            with self.registry.write() as tx:
                self._recover(tx)
                _, _, refusal = self._check(tx, agent, target, time.time(), isolation, expected)
            if refusal is not None:
                raise refusal

    def _commit_locked(self, agent: str, target: Target, staged: atomic.Staged | None,
                       isolation: Isolation, expected: int | None, ending: Grant | None) -> int:
        rel = target.rel
        with self.registry.write() as tx:
            self._recover(tx)
            now = time.time()
            record, check, refusal = self._check(tx, agent, target, now, isolation, expected)
            version = current_version(record)
            exists = record is not None and record.present
            if refusal is None and staged is not None and exists and record is not None and staged.hash == record.hash:
                tx.put_view(agent, rel, version, now)  # identical content: no new version, nobody invalidated
                if ending is not None:
                    _end(tx, ending)
                return version
            if refusal is None and (staged is not None or exists):
                tx.put_intent(Intent(rel, agent, version + 1, staged is not None,
                                     staged.hash if staged else None, staged.plan_name() if staged else None))
        if refusal is not None:
            raise refusal
        if staged is None and not exists:
            raise FileNotFoundError(2, "No such file or directory", rel)
        self._install(lambda: staged.install() if staged is not None else atomic.remove(target.abs))
        try:
            with self.registry.write() as tx:
                self._finish(tx, agent, target, version + 1, staged.hash if staged else None, check.seen)
                if ending is not None:
                    _end(tx, ending)
        except RegistryError as e:
            raise RegistryError(f"{rel}: the change is on disk, but the registry could not record it ({e}); "
                                "it will be recorded as a change by 'external' at the next access", e.errno) from e
        return version + 1

    def _install(self, action: Callable[[], None]) -> None:
        """Run the disk half of a commit whose intents are recorded; on failure let recovery decide."""
        try:
            action()
        except BaseException:
            with self.registry.write() as tx:
                self._recover(tx)
            raise

    def _finish(self, tx: Transaction, agent: str, target: Target, version: int, digest: str | None,
                seen: int | None) -> None:
        """Record an installed commit: new version, writer's view current, intent done."""
        now = time.time()
        present = digest is not None
        tx.put_file(FileRecord(target.rel, version, present, digest, fingerprint_path(target.abs) if present else None,
                               agent, now, time.time_ns()))
        tx.put_view(agent, target.rel, version, now)
        tx.drop_intent(target.rel)
        tx.log("commit" if present else "delete", target.rel, agent, now, seen_version=seen, version=version)

    def create(self, agent: str, target: Target, mode: int, owner: ProcessId,
               ttl: float = HANDLE_GRANT_TTL) -> tuple[Grant, bool, int]:
        """Create `target` empty with `mode` (exclusive: FileExistsError if it exists) as a checked commit,
        and take `agent`'s write grant for the handle that created it, as `begin_write` does:
        (grant, owned, version), owned False when the agent already held it.

        Creating a new path needs no prior read, but a view that predates the path's deletion is stale."""
        self._require_managed(target, "create")
        with self.registry.commit_lock():
            with self.registry.write() as tx:
                self._recover(tx)
                record, check, refusal = self._check(tx, agent, target, time.time(), "file")
                if refusal is None:
                    if record is not None and record.present:
                        raise FileExistsError(17, "File exists", target.rel)
                    version = current_version(record) + 1
                    tx.put_intent(Intent(target.rel, agent, version, True, EMPTY_HASH, None))
            if refusal is not None:
                raise refusal
            self._install(lambda: os.close(os.open(target.abs, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)))
            with self.registry.write() as tx:
                self._finish(tx, agent, target, version, EMPTY_HASH, check.seen)
                return (*_handle_grant(tx, agent, target, owner, time.time() + ttl), version)

    def view_state(self, agent: str, target: Target) -> tuple[int, str]:
        """(current version, 'fresh' | 'stale' | 'unread') of a managed path for `agent`."""
        version = self.version(target)
        with self.registry.read() as tx:
            seen = tx.view(agent, target.rel)
        return version, "unread" if seen is None else "fresh" if seen == version else "stale"

    def rename(self, agent: str, src: Target, dst: Target, *, exchange: bool = False, noreplace: bool = False,
               isolation: Isolation = "file", durable: bool = True) -> None:
        """Rename `src` over `dst` as one checked commit of both ends; `durable` fsyncs the directories.

        Each end that is a managed path is written (dst gets src's content, src is deleted, or with
        `exchange` they swap) and so needs the agent's current view. Unmanaged ends are not checked;
        a rename with no managed end has nothing to check and is the caller's plain rename."""
        with self.registry.commit_lock():
            with self.registry.write() as tx:
                self._recover(tx)
                now = time.time()
                src_hash = hash_path(src.abs)
                dst_hash = hash_path(dst.abs)
                if src_hash is None or (exchange and dst_hash is None):
                    raise FileNotFoundError(2, "No such file or directory", src.rel if src_hash is None else dst.rel)
                # what each end holds afterwards: (target, new content hash or None for gone)
                ends = [(dst, src_hash), (src, dst_hash if exchange else None)]
                plan: list[tuple[Target, int, str | None, int | None]] = []
                refusal: StaleWriteError | None = None
                for target, after in ends:
                    if not target.managed:
                        continue
                    record, check, refusal = self._check(tx, agent, target, now, isolation)
                    if refusal is not None:
                        break
                    if (record is not None and record.present) or after is not None:
                        plan.append((target, current_version(record) + 1, after, check.seen))
                for target, version, after, _ in plan:
                    tx.put_intent(Intent(target.rel, agent, version, after is not None, after, None))
            if refusal is not None:
                raise refusal
            def install() -> None:
                atomic.rename(src.abs, dst.abs, exchange=exchange, noreplace=noreplace)
                if durable:
                    atomic.sync_dirs(src.abs, dst.abs)

            self._install(install)
            with self.registry.write() as tx:
                for target, version, after, seen in plan:
                    self._finish(tx, agent, target, version, after, seen)

    # ---- grants ---------------------------------------------------------------------

    def acquire(self, agent: str, target: Target, ttl: float, owner: ProcessId) -> Grant:
        """Take the write grant on `target` for `agent`; StaleWriteError('held') while another grant is live."""
        self._require_managed(target, "lock")
        with self.registry.commit_lock(), self.registry.write() as tx:
            now = time.time()
            held = self._holder(tx, target.rel, now)
            if held is not None:
                record, seen = tx.file_and_view(target.rel, agent)
                refusal = StaleWriteError(target.rel, agent, "held", seen, current_version(record),
                                          record.writer if record else None, holder=held.agent)
            else:
                refusal = None
                grant = Grant(target.rel, agent, secrets.token_hex(8), owner, now + ttl)
                tx.put_grant(grant)
                tx.drop_fence(agent, target.rel)
                tx.log("grant", target.rel, agent, now, detail=f"ttl={ttl:g}s pid={owner.pid}")
                return grant
        raise refusal

    def begin_write(self, agent: str, target: Target, owner: ProcessId, *, need_view: bool,
                    isolation: Isolation = "file", ttl: float = HANDLE_GRANT_TTL) -> tuple[Grant, bool, int]:
        """Check that `agent` may write `target` now and take its write grant for an open handle.

        Returns (grant, owned, version): owned is False when the agent already held the grant (say
        through `lock()`), and then the caller must not release it; `version` is what the handle
        starts from, so its commit is a `expected=version` CAS. Refusals raise StaleWriteError."""
        self._require_managed(target, "begin_write")
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            now = time.time()
            record, _, refusal = self._check(tx, agent, target, now, isolation, need_view=need_view)
            if refusal is None:
                return (*_handle_grant(tx, agent, target, owner, now + ttl), current_version(record))
        raise refusal

    def release(self, grant: Grant, *, log: bool = True) -> bool:
        """Release `grant` if it is still the one in force; False if it was reclaimed meanwhile."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            ended = _end(tx, grant)
            if ended and log:
                tx.log("release", grant.path, grant.agent, time.time())
            return ended

    # ---- agent sessions (integrations such as Claude Code hooks) --------------------

    def bind_session(self, agent: str, process: ProcessId, *, pinned: bool) -> None:
        """Requests from `process` (and its descendants, on a mount) are `agent`'s. A pinned agent's
        views move only through `observe` (what its model read) and its own commits."""
        with self.registry.write() as tx:
            tx.bind(agent, process, pinned, time.time())

    def session_of(self, process: ProcessId) -> tuple[str, bool] | None:
        """(agent, pinned) bound to `process`, if any."""
        with self.registry.read() as tx:
            return tx.bound_agent(process)

    def end_session(self, agent: str) -> None:
        """Release every grant `agent` holds and forget its process binding."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            now = time.time()
            for grant in tx.grants_of(agent):
                tx.drop_grant(grant.path)
                tx.log("release", grant.path, agent, now, detail="session ended")
            tx.unbind(agent)

    def observe(self, agent: str, target: Target, saw: Callable[[bytes], bool]) -> int | None:
        """Register `agent`'s view at the current version if `saw(current content)` confirms that is
        what the agent was shown; return that version, or None (views unchanged) if it was not."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            try:
                data, fp = read_file(target.abs)
            except FileNotFoundError:
                return None
            record = self._sync(tx, target, tx.file(target.rel), (fp, content_hash(data)))
            if record is None or not saw(data):
                return None
            tx.put_view(agent, target.rel, record.version, time.time())
            return record.version

    def check(self, agent: str, target: Target, isolation: Isolation = "file") -> StaleWriteError | None:
        """The refusal `agent`'s write of `target` would get now (logged), or None if it would be accepted."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            _, _, refusal = self._check(tx, agent, target, time.time(), isolation)
        return refusal

    def adopt(self, agent: str, target: Target) -> int:
        """Record the file's content, written by `agent` itself outside the volume (a hook reporting
        its own write), as `agent`'s commit. If that write was not based on the current version it
        overwrote a commit: that is logged as a clobber, never hidden."""
        with self.registry.commit_lock(), self.registry.write() as tx:
            self._recover(tx)
            record = tx.file(target.rel)
            fp, digest = _disk(target, None)
            now = time.time()
            version = current_version(record)
            present = fp is not None
            if (record is not None and record.present == present and record.hash == digest) or (
                    record is None and not present):
                if record is not None:
                    tx.put_view(agent, target.rel, version, now)
                return version
            seen = tx.view(agent, target.rel)
            if record is not None and record.present and seen != version:
                tx.log("clobber", target.rel, agent, now, seen_version=seen, version=version,
                       detail=f"{agent} wrote over v{version} by {record.writer} without having read it")
            tx.put_file(FileRecord(target.rel, version + 1, present, digest, fp, agent, now, time.time_ns()))
            tx.put_view(agent, target.rel, version + 1, now)
            tx.log("commit" if present else "delete", target.rel, agent, now, seen_version=seen, version=version + 1)
            return version + 1

    @staticmethod
    def _require_managed(target: Target, what: str) -> None:
        if not target.managed:
            raise NotManaged(f"{target.rel!r} is not managed by this volume; {what} applies to managed paths only")
