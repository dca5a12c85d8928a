"""Tracked reads: a view is registered only at the version whose hash equals the bytes returned."""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from dataclasses import dataclass
from functools import partial

from .. import atomic
from ..errors import Absent, DamagedContent, RegistryError
from ..fingerprint import (
    Fingerprint,
    content_hash,
    fingerprint_path,
    hash_fd,
    hash_path,
    kind_of,
    read_fd,
    read_file,
)
from ..liveness import ProcessId
from ..paths import REGISTRY_DIR, Target
from ..protocol import (
    BUFFERING_PROGRAMS,
    FileRecord,
    current_version,
    needs_hash,
    read_moves_view,
)
from ..registry import Registry, Transaction
from .base import CoreBase

log = logging.getLogger(__name__)

NOT_UTF8 = (
    "its name is not valid UTF-8: the volume records paths as UTF-8, so it cannot record or protect "
    "this file; rename it to a UTF-8 name"
)
NOT_CONTENT = (
    "it is {kind}, not a regular file: the volume keeps no versions of it, and what programs write into it (through "
    "a mount too) is neither checked nor versioned; a whole-file write through the API or MCP replaces it with a "
    "regular file, which is. Remove it, or move it out of the managed paths"
)
"""Why `scan` reports a FIFO, socket or device at a managed name (`kind`: what it is)."""


CONFIRMED_FOR = 1.0
"""Seconds a read that found its agent's view already at the bytes' version is trusted to stay so
while the file keeps its fingerprint and hash (`Reads.read`)."""
CONFIRMED_MAX = 65536


@dataclass(frozen=True)
class Observed:
    """What a read saw: the bytes and the version they are."""

    data: bytes
    version: int


class Reads(CoreBase):
    _confirmed: dict[tuple[str, str], tuple[Fingerprint, str, int, float]]
    """(agent, path) -> (fingerprint, hash, version, until): a tracked read of these exact bytes of
    this inode found (or made) the agent's view that version. Another read of the same inode state
    within CONFIRMED_FOR seconds needs no registry round trip: every commit installs a new inode, a
    foreign in-place write moves ctime, and the hash must match too. Per process."""

    def __init__(self, root: str, registry: Registry) -> None:
        super().__init__(root, registry)
        self._confirmed = {}

    # ---- reads ----------------------------------------------------------------------

    def read(
        self, agent: str, target: Target, fd: int | None = None, *, register: bool = True, absence: bool = False
    ) -> Observed:
        """Read a file (from `fd` if given, which this closes); for a managed one, register `agent`'s
        view at the version of these bytes (unless `register` is False: a pinned agent's re-read).
        A path where a catch-up or rename of this working copy left a file unsettled
        (`CoreBase._noted`) is read under the commit lock, whose transaction settles it first.

        Raises Absent (a FileNotFoundError) for a missing file, with the version it observed (after
        recording the agent's view of its deletion; with `absence`, the read-set isolation's, at
        version 0 where no file of that name ever was)."""
        if fd is None:  # (a descriptor given was opened beneath the root with no symlink: `open_plain`)
            target = self.paths.beneath(target)
        if not target.managed:
            return Observed(read_fd(fd, target.rel)[0] if fd is not None else read_file(target.abs)[0], 0)
        try:
            data, fp = read_fd(fd, target.rel) if fd is not None else read_file(target.abs)
        except (FileNotFoundError, NotADirectoryError):  # (a file where its directory would be: absent)
            data = None
        except IsADirectoryError:
            if self.replica is None:
                raise
            data = None  # a working copy's directory where another copy made the file: its catch-up says
        if data is not None and target.rel not in self._noted():
            digest = content_hash(data)
            key = (agent, target.rel)
            now = time.monotonic()
            confirmed = self._confirmed.get(key)
            if (
                register
                and self.replica is None  # a working copy's inode does not move when another host commits
                and confirmed is not None
                and confirmed[:2] == (fp, digest)
                and now < confirmed[3]
            ):
                return Observed(data, confirmed[2])
            version = self._pair(agent, target, digest, register)
            if version is not None:
                if register:
                    if len(self._confirmed) >= CONFIRMED_MAX:
                        self._confirmed.clear()
                    self._confirmed[key] = (fp, digest, version, now + CONFIRMED_FOR)
                return Observed(data, version)
        return self._read_locked(agent, target, register, absence)

    def _pair(self, agent: str, target: Target, digest: str, register: bool) -> int | None:
        """Optimistically pair content with the committed version that has its hash (registering
        the view unless told not to); None when no committed version matches right now."""
        record, seen = self.registry.peek(target.rel, agent)
        if record is None or not record.present or record.hash != digest:
            return None
        if seen == record.version or not register:
            return record.version

        def pair(tx: Transaction) -> int | None:
            record = tx.file(target.rel)
            if record is None or not record.present or record.hash != digest:
                return None
            tx.put_view(agent, target.rel, record.version, time.time())
            return record.version

        return self.registry.transact(pair, (target.rel,))

    def open_version(self, agent: str, target: Target, *, register: bool = True) -> tuple[int, int]:
        """Open a managed file for reading, paired with the version of its content: (fd, version).

        The fd keeps serving exactly that version (a commit installs a new inode), so a reader never
        mixes two versions; the agent's view is registered at it unless `register` is False."""
        target = self.paths.beneath(target)
        fd = os.open(target.abs, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            version = None if target.rel in self._noted() else self._pair(agent, target, hash_fd(fd), register)
        except BaseException:
            os.close(fd)
            raise
        if version is not None:
            return fd, version
        os.close(fd)
        with self._commit_lock((target.rel,)):  # no commit of it between the open and the sync
            self._settle_installs()
            self._catch_up(target)
            fd = os.open(target.abs, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                disk = (Fingerprint.of(os.fstat(fd)), hash_fd(fd))

                def pair(tx: Transaction) -> int:
                    record = self._sync(tx, target, tx.file(target.rel), disk, content=fd)
                    assert record is not None
                    if register:
                        tx.put_view(agent, target.rel, record.version, time.time())
                    return record.version

                return fd, self._transact(pair, holds=(target.rel,))
            except BaseException:
                os.close(fd)
                raise

    def _read_locked(self, agent: str, target: Target, register: bool, absence: bool = False) -> Observed:
        """Slow path: no cooperating writer can move the file while we read, sync and register."""
        target = self.paths.beneath(target)
        with self._commit_lock((target.rel,)):  # no commit of it between the read and the sync
            self._settle_installs()
            self._catch_up(target)
            try:
                data, fp = read_file(target.abs)
                disk: tuple[Fingerprint | None, str | None] = (fp, content_hash(data))
            except (FileNotFoundError, NotADirectoryError):
                data, disk = None, (None, None)

            def pair(tx: Transaction) -> FileRecord | None:
                record = self._sync(tx, target, tx.file(target.rel), disk, content=data)
                # a read that found no file is a view of the deletion (or, with `absence`, at 0 where no
                # file ever was), never of a version it did not find
                if register and (data is not None or (record is None and absence) or (record and not record.present)):
                    tx.put_view(agent, target.rel, current_version(record), time.time())
                return record

            record = self._transact(pair, holds=(target.rel,))
        if data is None:
            raise Absent(target.rel, current_version(record))
        assert record is not None
        return Observed(data, record.version)

    def bring(self, target: Target) -> int | None:
        """In a working copy that lacks the managed file `target` (never installed here, or removed
        outside the volume: a cache miss, no deletion): install its current version (`_catch_up`)
        and return it; None where the file is there already, or the volume holds none."""
        self._require_managed(target, "bring", reads=True)
        target = self.paths.beneath(target)
        if self.replica is None or os.path.lexists(target.abs):
            return None
        with self.registry.read() as tx:  # (a name no copy made costs one read, no lock)
            record = tx.file(target.rel)
        if record is None or not record.present:
            return None
        with self._commit_lock((target.rel,)):
            self._settle_installs()
            self._catch_up(target)
            if not os.path.lexists(target.abs):
                return None
            with self.registry.read() as tx:
                record = tx.file(target.rel)
        return record.version if record is not None and record.present else None

    def _catch_up(self, target: Target) -> None:
        """In a working copy (`CoreBase.replica`), under the commit lock: install the current version
        of `target` if this copy is behind (a foreign change is recorded instead), so that what is
        read next is the current version's bytes, served and registered as such."""
        if self.replica is not None:
            self._transact(lambda tx: self._sync(tx, target, tx.file(target.rel)), holds=(target.rel,))

    def version(self, target: Target) -> int:
        """Current committed version of a managed path (0 if it never existed), foreign changes included."""
        self._require_managed(target, "version", reads=True)
        target = self.paths.beneath(target)
        with self.registry.read() as tx:
            record = tx.file(target.rel)
        fp = fingerprint_path(target.abs)
        if (fp is None and (record is None or not record.present)) or (
            record is not None and record.present and fp is not None and not needs_hash(record, fp)
        ):
            return current_version(record)
        if record is not None and record.present and fp is not None and hash_path(target.abs) == record.hash:
            return record.version  # same content, only the fingerprint is unproven: no lock needed
        try:
            return self._transact(
                lambda tx: current_version(self._sync(tx, target, tx.file(target.rel))), holds=(target.rel,)
            )
        except RegistryError as e:
            if e.errno != errno.EROFS:
                raise
            log.warning(
                "%s: the file differs from its record in the registry, which is read-only: the change is not "
                "recorded, and the registry's version %d is reported (%s)",
                target.rel,
                current_version(record),
                e,
            )
            return current_version(record)

    def stale(self, agent: str) -> list[str]:
        """Managed paths `agent` has read whose current version is not the one it read."""

        def stale(tx: Transaction) -> list[str]:
            read_set = tx.read_set(agent)
            self._hold(tx, read_set)
            for path in read_set:
                self._sync(tx, self.paths.of_rel(path), tx.file(path))
            return [path for path, _, _ in tx.stale_views(agent)]

        return self._transact(stale)

    def scan(self) -> list[tuple[str, str]]:
        """Bring the registry in step with the whole tree (every recorded path, every managed regular
        file); return the files it could not check, as (path, why). Files are compared read only
        (`_in_step`); those that differ or whose record lacks a fingerprint worth keeping (so a check
        after this one need not hash them), and the paths of unsettled commits or catch-ups
        (`CoreBase._noted`), alone are synced, in one transaction holding just them, so a check of
        a tree in step holds no path. One odd file never stops the scan: a name that is not valid
        UTF-8 (returned as os.walk hands it over, with surrogate escapes) or a recorded path that
        is no longer a regular file is reported, never skipped silently, and so is a FIFO, socket
        or device at a managed name, which cannot hold a version (`NOT_CONTENT`), and a file whose
        current version a working copy cannot install because its stored bytes are damaged (the
        copy keeps what it holds). Symlinks carry no versions."""
        with self.registry.read() as tx:
            recorded = {record.path for record in tx.files()}
        on_disk: set[str] = set()
        unchecked: list[tuple[str, str]] = []
        for directory, dirs, files in os.walk(self.paths.root):
            if directory == self.paths.root and REGISTRY_DIR in dirs:
                dirs.remove(REGISTRY_DIR)
            for name in files:
                path = os.path.join(directory, name)
                rel = os.path.relpath(path, self.paths.root).replace(os.sep, "/")
                if not self.paths.managed(rel):
                    continue
                try:
                    mode: int | None = os.lstat(path).st_mode
                except FileNotFoundError:
                    continue  # gone since it was listed: a recorded one is synced all the same
                except OSError:
                    mode = None  # synced as any file, which reports the error it meets
                if mode is not None and stat.S_ISLNK(mode):
                    continue
                if mode is not None and not stat.S_ISREG(mode):  # a recorded one is synced all the same
                    unchecked.append((rel, NOT_CONTENT.format(kind=kind_of(mode))))
                    continue
                try:
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    unchecked.append((rel, NOT_UTF8))
                    continue
                on_disk.add(rel)

        def differs(tx: Transaction, rel: str, fingerprint: bool) -> bool:
            try:
                return not self._in_step(tx, self.paths.of_rel(rel), fingerprint=fingerprint)
            except OSError:
                return True  # its sync says why

        with self.registry.read() as tx:
            differ = [rel for rel in sorted(recorded | on_disk) if differs(tx, rel, fingerprint=True)]
            synced = sorted({*differ, *(intent.path for intent in tx.intents()), *self._noted()})
        if not synced:
            return unchecked

        def sync(tx: Transaction) -> list[tuple[str, str]]:
            failed = []
            for rel in synced:
                try:
                    self._sync(tx, self.paths.of_rel(rel), tx.file(rel))
                except (OSError, DamagedContent) as e:  # (a working copy keeps what it holds of it)
                    failed.append((rel, str(e)))
            return failed

        try:
            return unchecked + self._transact(sync, holds=synced)
        except RegistryError as e:
            if e.errno != errno.EROFS:
                raise
            why = f"it differs from its record, and the registry could not record the change ({e})"
            with self.registry.read() as tx:  # (not a fingerprint it could not record)
                return unchecked + [(rel, why) for rel in differ if differs(tx, rel, fingerprint=False)]

    def note_read(
        self,
        agent: str,
        target: Target,
        version: int,
        *,
        pinned: bool = False,
        reader: ProcessId | None = None,
        program: str | None = None,
        content: int | None = None,
    ) -> bool:
        """`agent` read `version` of `target` through a handle opened earlier, by process `reader`
        running `program`: its view moves to that version where `protocol.read_moves_view` says so
        (a view is what was read, never what was merely opened). True if it moved (a view there
        already is not written again). `content`: a
        descriptor of that version's bytes (the handle's), which are stored again, in the move's
        transaction, if a prune dropped them since the handle was opened (`_kept_again`): a
        version a live agent's view points at keeps its bytes, so its diffs and merges work."""
        loaded_before = False
        if reader is not None and program in BUFFERING_PROGRAMS:
            with self._lock:
                key = (reader, target.rel)
                loaded_before = key in self._loaded
                if len(self._loaded) > 10_000:
                    self._loaded.clear()
                self._loaded.add(key)
        if not read_moves_view(pinned, program, loaded_before):
            return False
        agent = self.agent(agent)
        if self.registry.peek(target.rel, agent)[1] == version:
            return False  # there already: no transaction (its read time stays, as a tracked read's does)

        def move(tx: Transaction) -> bool:
            if not read_moves_view(pinned, program, loaded_before, tx.view(agent, target.rel), version):
                return False
            if content is not None:
                self._kept_again(tx, target, version, content)
            tx.put_view(agent, target.rel, version, time.time())
            return True

        return self.registry.transact(move, (target.rel,))

    @staticmethod
    def _kept_again(tx: Transaction, target: Target, version: int, content: int) -> None:
        """If the bytes of `version` of `target` are no longer kept (pruned), store them again from
        `content`, a descriptor holding them, and list the version as retained: only when what it
        holds hashes to the version's recorded hash (content-addressed: the very object the prune
        dropped). A descriptor holding other bytes restores nothing (the view still moves: the
        agent read that version, and a write from it fails closed, without a diff)."""
        entry = tx.version_entry(target.rel, version)
        if entry is None or entry.hash is None or entry.retained:
            return
        try:
            tx.store(entry.hash, content)
        except OSError as e:
            if e.errno != errno.EAGAIN:
                raise
            log.warning(
                "%s version %d: the handle read no longer holds its bytes; they stay pruned", target.rel, version
            )
            return
        tx.put_version(entry._replace(retained=True, never_kept=False))

    def deletions_in(self, directory: str) -> bool:
        """Whether managed files directly in `directory` were deleted (see `note_listed`)."""
        with self.registry.read() as tx:
            return bool(tx.deleted_in(directory))

    def note_listed(self, agent: str, directory: str) -> int:
        """`agent` listed `directory` (readdir through a mount): it has seen which managed files there
        are gone, so its views of them move to their deletions' versions, as the API's read of a
        missing file does; creating one again is then no write built on gone content. (A lookup
        cannot count: the kernel looks a name up before every create.) One registry read unless a
        view moves; returns how many moved."""
        with self.registry.read() as tx:
            gone = tx.deleted_in(directory)
            views = tx.read_set(agent)
        behind = [r.path for r in gone if views.get(r.path) not in (None, r.version)]
        if not behind:
            return 0
        agent = self.agent(agent)

        def move(tx: Transaction) -> int:
            moved = 0
            for rel in behind:
                current = self._sync(tx, self.paths.of_rel(rel), tx.file(rel))
                if current is not None and not current.present and tx.view(agent, rel) != current.version:
                    tx.put_view(agent, rel, current.version, time.time())
                    moved += 1
            return moved

        return self._transact(move, holds=behind)

    def unlink_special(self, target: Target) -> bool:
        """Remove a symlink, FIFO, socket or device node itself (unlink(2)): they carry no versions,
        so this is no commit. At a managed name, never a file a program put there meanwhile
        (`atomic.remove_special`): False then, nothing removed, for the caller to delete it as the
        file it is, with the checks."""
        target = self.paths.beneath(target)
        if not self.paths.managed(target.rel):
            os.unlink(target.abs)
            return True
        try:
            return atomic.remove_special(target.abs)
        except atomic.SetAside as taken:
            if stat.S_ISREG(os.lstat(taken.aside).st_mode) and self._transact(
                partial(self._kept_aside, target, taken.aside), holds=(target.rel,)
            ):
                os.unlink(taken.aside)
                raise FileExistsError(
                    errno.EEXIST,
                    f"programs saved files at {target.rel} twice while what was there was being removed: the first is "
                    "recorded as a version of its own (see `coherent-volume log`), the second is in place; nothing "
                    "was removed",
                    target.rel,
                ) from None
            raise

    def _kept_aside(self, target: Target, aside: str, tx: Transaction) -> bool:
        """Record the file a removal set aside at `aside` and could not put back (a program saved
        `target` twice meanwhile) as the next version by EXTERNAL; whether its bytes are kept."""
        why = "saved where a symlink or special file was, taken aside by its removal, and saved over meanwhile"
        self._record_displaced(tx, target, aside, current_version(tx.file(target.rel)) + 1, why)
        entry = tx.version_entry(target.rel, current_version(tx.file(target.rel)))
        return entry is not None and entry.retained

    def forget(self, agent: str, target: Target, back_to: int | None = None) -> None:
        """Drop `agent`'s view of `target`, or put it back at version `back_to` (what it was before
        a read whose bytes the model never got)."""
        self._confirmed.pop((agent, target.rel), None)

        def back(tx: Transaction) -> None:
            if back_to is None:
                tx.drop_view(agent, target.rel)
            else:
                tx.put_view(agent, target.rel, back_to, time.time())

        self.registry.transact(back, (target.rel,))

    def clear_fence(self, agent: str, target: Target) -> None:
        """Lift `agent`'s fence on `target` (a re-read after its `lock()` was reclaimed). Fences are
        put only by commit-locked transactions (`CoreBase._live`), so a read that finds none is as
        current as the commit lock would make it: the lock is taken only to drop one, and a read of
        a file with none never waits behind a holder of the lock."""
        with self.registry.read() as tx:
            if not tx.fenced(agent, target.rel):
                return
        self._transact(lambda tx: tx.drop_fence(agent, target.rel), holds=(target.rel,))
