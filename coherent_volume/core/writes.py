"""Checked writes: every commit, creation and handle grant is decided under the commit lock and
logged when refused. A commit of content and a creation are recorded, with an intent naming their
staged file, in their decision's transaction before they touch the disk; a deletion records an
intent before and its version after."""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .. import atomic
from ..edits import Edits
from ..errors import (
    CasConflict,
    CommitPending,
    DeletionOvertaken,
    DeletionOvertakenCas,
    InstallPending,
    Reason,
    RegistryError,
    StaleWriteError,
    TreeClash,
    UnprotectedAlias,
)
from ..fingerprint import Fingerprint, absent, fingerprint_path, hash_path
from ..liveness import ProcessId
from ..paths import Target
from ..protocol import (
    FileRecord,
    Grant,
    HandleKind,
    Intent,
    VersionKind,
    ViewState,
    WriteCheck,
    appends_lost_their_file,
    current_version,
    decide_write,
    displaced_needs_hash,
    in_the_way,
    is_noop,
    may_drop_taken,
    may_replay,
    view_moves,
    view_state,
)
from ..registry import InTheWay, Transaction
from .base import EMPTY_HASH, Isolation
from .reads import Reads

Made = tuple[VersionKind, tuple[int, ...]]
"""How a commit's version is made: its kind and the versions besides its predecessor it comes from."""


@dataclass
class HandleCommit:
    """What an open handle's commit brings besides its content: its kind, the grant it writes under
    and its edits since its last commit."""

    kind: HandleKind
    grant: Grant | None
    """The grant the handle writes under until this commit ends its use of it (`CoreBase._end`)."""
    edits: Edits
    unlinked: bool = False
    """The handle's file was unlinked since by its own agent (`protocol.goes_on_unlinked`). As on a
    local disk, what is written to an unlinked file is kept by no name: the commit is dropped."""


@dataclass(frozen=True)
class _Decided:
    """What a commit's decision transaction settled (`Writes._commit_locked`)."""

    version: int
    """The current version it decided on."""
    check: WriteCheck
    done: bool = False
    """Nothing to install (an identical no-op, or the handle's file was unlinked)."""
    refusal: StaleWriteError | None = None
    content: atomic.Staged | None = None
    """What to install (None: delete); its intent is recorded."""
    moves_view: bool = False
    exists: bool = False
    record: FileRecord | None = None
    """The current record it decided on, which its install displaces (`Writes._displaced_settled`)."""


def _detail(check: WriteCheck, reason: Reason) -> str | None:
    """What a refusal's log line adds to its reason."""
    if reason == "held":
        own = check.holder == check.agent
        return f"holder={check.holder}" + (" (another open write handle of this agent)" if own else "")
    if reason == "stale" and check.expected is not None and check.expected != check.seen:
        return f"based on v{check.expected} (a write handle's last commit, or the version expected), not on the view"
    return ",".join(check.changed_read_set) or None


R = TypeVar("R")


def _set_aside(target: Target, aside: str) -> None:
    """A deletion's disk change: the file set aside at `aside` (`atomic.set_aside`), to be checked
    there before it goes; FileNotFoundError if there is none (IsADirectoryError for a directory:
    nothing changed either way)."""
    if not atomic.set_aside(target.abs, aside):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", atomic.named(target.abs))


FINISH_WAIT = 15.0
"""Seconds a commit that is on disk keeps trying to record its version while the registry is
unreachable (a database restart), before it reports the commit as pending."""


def in_the_way_said(other: InTheWay, where: str, lacking: bool = False) -> str:
    """What a refusal says of the file `other` the registry holds `where` ("on its way", "below it")
    a path: a rename's install under way, or a file of the volume (`lacking`: one this working copy
    has not installed yet)."""
    if other.pending:
        return (
            f"a rename by {other.writer} is putting a file {where}, {other.path} (its v{other.version}), and its "
            "install is not recorded yet"
        )
    lacks = " that this working copy has not installed yet" if lacking else ""
    return f"the volume holds a file {where}{lacks}, {other.path} v{other.version} (by {other.writer})"


def _staging_fix(staging: str, e: OSError) -> str:
    """What to do about the staging directory `staging` where naming a commit's content in it failed `e`."""
    if e.errno == errno.EPERM:
        return (
            f"it may not be changed although its permission bits allow it: an immutable or append-only flag "
            f"(`lsattr -d {shlex.quote(staging)}` shows i or a; `chattr -i -a` lifts them), an ACL or a security "
            "module forbids it: lift that, then write again"
        )
    if e.errno == errno.EROFS:
        return "its file system is mounted read-only: use the volume where it is mounted read-write"
    if e.errno == errno.EACCES:
        return f"this process (uid {os.geteuid()}) may not write there: run it as the volume's owner"
    return (
        "that must be a directory the volume's processes can write (remove whatever is there instead: it is made again)"
    )


class Writes(Reads):
    # ---- writes ---------------------------------------------------------------------

    def _decide(
        self,
        tx: Transaction,
        agent: str,
        target: Target,
        isolation: Isolation,
        expected: int | None = None,
        kind: HandleKind | None = None,
    ) -> tuple[FileRecord | None, WriteCheck, Reason | None, Grant | None]:
        """Sync `target` with the disk and decide whether `agent` may write it (nothing logged).
        `kind`: opening a write handle of that kind. (record, check, refusal reason, the live grant
        on `target` as this transaction read it)."""
        record, seen, held, fenced = tx.write_state(target.rel, agent)
        record = self._sync(tx, target, record)
        if self.replica is not None and (record is None or not record.present):
            self._refuse_in_the_way(tx, target)
        grant = self._live(tx, target.rel, held)
        if held is not None and grant is None:  # reclaimed just now: it may have fenced this agent
            fenced = tx.fenced(agent, target.rel)
        # handles whose file is gone hold nothing there: a new file at its name is not theirs
        open_kinds = self._open_kinds(grant, agent) if record is not None and record.present else None
        check = WriteCheck(
            agent=agent,
            current=record,
            seen=seen,
            holder=grant.agent if grant else None,
            fenced=fenced,
            changed_read_set=self._changed_read_set(tx, agent, target.rel) if isolation == "read-set" else (),
            expected=expected,
            kind=kind,
            open_kinds=open_kinds,
        )
        return record, check, decide_write(check), grant

    @staticmethod
    def _refuse_in_the_way(tx: Transaction, target: Target) -> None:
        """A working copy's write of a path that is no file in the volume: TreeClash (nothing
        changed) where the registry holds a file on its way or below it that this copy lacks
        (another copy's; `protocol.in_the_way`)."""
        other = tx.file_in_the_way(target.rel)
        if other is None:
            return
        code = in_the_way(target.rel, other.path)
        held = in_the_way_said(other, "on its way" if code == errno.ENOTDIR else "below it")
        raise TreeClash(
            code,
            f"{target.rel} cannot be made a file: {held}. Nothing was changed: read {other.path} (or run "
            "`coherent-volume status`) to bring this working copy up to date, then choose another name, or delete "
            "or rename that file through the volume first",
            target.rel,
        )

    @staticmethod
    def _refusal(
        tx: Transaction,
        target: Target,
        check: WriteCheck,
        reason: Reason,
        now: float,
        *,
        record: FileRecord | None = None,
        detail: str | None = None,
        kinds: tuple[type[StaleWriteError], type[CasConflict]] = (StaleWriteError, CasConflict),
    ) -> StaleWriteError:
        """Log a refusal (every refusal is logged, so `why` can explain it) and build its error: of
        `kinds` (plain, and where the write expected a version); `record`, `detail`: the current
        record and the log's detail where the decision's (`check`) are not what refused it."""
        record = check.current if record is None else record
        version = current_version(record)
        tx.log(
            "refusal",
            target.rel,
            check.agent,
            now,
            reason=reason,
            seen_version=check.seen,
            version=version,
            detail=detail or _detail(check, reason),
        )
        holder = check.holder if reason == "held" else None
        grant = tx.grant(target.rel) if holder is not None else None
        until = None if grant is None else (grant.expires_at, grant.expires_at - now, grant.owner.alive() is None)
        writer = record.writer if record else None
        facts = (target.rel, check.agent, reason, check.seen, version, writer)
        deleted = record is not None and not record.present
        plain, cas = kinds
        if check.expected is not None:
            return cas(
                *facts,
                holder=holder,
                changed=check.changed_read_set,
                held_until=until,
                deleted=deleted,
                expected_version=check.expected,
            )
        return plain(*facts, holder=holder, changed=check.changed_read_set, held_until=until, deleted=deleted)

    def _check(
        self,
        tx: Transaction,
        agent: str,
        target: Target,
        now: float,
        isolation: Isolation,
        expected: int | None = None,
    ) -> tuple[FileRecord | None, WriteCheck, StaleWriteError | None]:
        """`_decide`, with any refusal logged and built."""
        record, check, reason, _ = self._decide(tx, agent, target, isolation, expected)
        return record, check, None if reason is None else self._refusal(tx, target, check, reason, now)

    def commit(
        self,
        agent: str,
        target: Target,
        content: bytes | atomic.Staged | None,
        *,
        isolation: Isolation = "file",
        expected: int | None = None,
        handle: HandleCommit | None = None,
        made: Made = ("commit", ()),
    ) -> int:
        """Install `content` (bytes, or content already staged beside the target; None deletes) if the
        protocol accepts it; return the new version. Staged content is consumed.

        Unmanaged paths are written atomically with no checks and report version 0. A refusal
        raises StaleWriteError (CasConflict when `expected` is given) and changes no file. An open
        handle's commit (`handle`) may append its bytes to a newer version (`protocol.may_replay`),
        is dropped when its file was unlinked, and ends its share of the handle's grant in its last
        transaction."""
        if target.alias_of is not None:
            raise UnprotectedAlias(target.alias_of, target.rel)
        if target.managed:
            agent = self.agent(agent)
        target = self.paths.beneath(target)
        if os.path.isdir(target.abs) and not os.path.islink(target.abs):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", target.rel)
        if (
            target.managed
            and isinstance(content, bytes)
            and self.replica is None
            and not atomic.below_missing(target.abs)  # (its directory missing: checked under the lock only)
            and self._doomed(agent, target, expected)
        ):
            self._refuse_if_still_refused(agent, target, isolation, expected)
        staged = atomic.stage(target.abs, content, root=self.paths.root) if isinstance(content, bytes) else content
        try:
            if not target.managed:
                if staged is None:
                    atomic.remove(target.abs)
                else:
                    staged.install()
                return 0
            version = self._locked(
                (target.rel,),
                lambda: self._commit_locked(agent, target, staged, isolation, expected, handle, made=made),
            )
        except BaseException as e:
            if staged is not None and not isinstance(e, Exception):
                self._left_to_recovery(staged)
            raise
        finally:
            if staged is not None:
                staged.discard()
        self._committed()
        return version

    def _left_to_recovery(self, staged: atomic.Staged) -> None:
        """After an interrupt (KeyboardInterrupt, SystemExit) cut a commit off: its staged file's name
        in the staging directory, where its decision gave it one, stays, since that decision may
        have been recorded (it came after the COMMIT, say) and the name is then the marker of an
        install not done, which recovery does; where it was not recorded, the staging sweep removes
        it. Removing it (`discard`) made recovery take the install as done, and the file's
        previous bytes were recorded over the commit as a change made outside the volume
        (/tmp/s33api 2: 55 reverts in 10,749 interrupts)."""
        if staged.named and staged.tmp is not None and os.path.dirname(staged.tmp) == self.paths.staging:
            staged.leave_name()

    def _doomed(self, agent: str, target: Target, expected: int | None) -> bool:
        """Cheap unlocked guess that a write will be refused: then skip staging (and its fsync). Not
        asked where the registry is a round trip away (a working copy): it would cost every write
        more than it saves a refused one. A plain write within CONFIRMED_FOR of a read by this
        process that found the agent's view current (`Reads.read`) is guessed to go through
        without asking the registry."""
        if expected is None:
            confirmed = self._confirmed.get((agent, target.rel))
            if confirmed is not None and time.monotonic() < confirmed[3]:
                return False
        record, seen = self.registry.peek(target.rel, agent)
        version = current_version(record)
        if expected is not None:
            return expected != version
        return record is not None and record.present and seen != version

    def _refuse_if_still_refused(self, agent: str, target: Target, isolation: Isolation, expected: int | None) -> None:
        """Decide under the commit lock; raise (and log) the refusal, or return if the write may go ahead."""
        refusal = self._transact(
            lambda tx: self._check(tx, agent, target, time.time(), isolation, expected)[2], holds=(target.rel,)
        )
        if refusal is not None:
            raise refusal

    def _commit_locked(
        self,
        agent: str,
        target: Target,
        staged: atomic.Staged | None,
        isolation: Isolation,
        expected: int | None,
        handle: HandleCommit | None,
        opening: HandleKind | None = None,
        made: Made = ("commit", ()),
    ) -> int:
        """`commit` under the commit lock. `opening`: the write acts like opening a handle of that
        kind (a truncate by name), so the agent's own open write handles are respected."""
        if atomic.below_missing(target.abs):
            # its directory was missing when the path was resolved: looked for again beneath the root
            # now, so the decision never reads through a symlink a program put on its way since
            # (OutsideVolume, nothing recorded); the install makes what is still missing (/tmp/s33api 1)
            target = self.paths.beneath(self.paths.target(target.rel, target.managed, target.alias_of))
        replayed: list[atomic.Staged] = []  # what a replay staged; a re-run stages anew
        # where a deletion sets the file aside (its intent names it); a commit of content needs none
        aside = atomic.temp_name(target.abs) if staged is None else None

        def decide(tx: Transaction) -> _Decided:
            for earlier in replayed:
                earlier.discard()
            replayed.clear()
            now = time.time()
            record, check, reason, _ = self._decide(tx, agent, target, isolation, expected, opening)
            version = current_version(record)
            ends = handle is not None and handle.grant is not None
            if handle is not None and handle.unlinked:
                if handle.grant is not None:
                    self._end(tx, handle.grant, handle.kind)
                return _Decided(version, check, done=True)
            content = staged
            appended_from = handle.edits.appended_from if handle is not None else None
            if (
                handle is not None
                and staged is not None
                and staged.fd is not None
                and appended_from is not None
                and may_replay(check, reason, handle.edits.appends_only)
            ):
                content = atomic.stage_appended(target.abs, staged.fd, appended_from)
                replayed.append(content)
                reason = None
            refusal = None if reason is None else self._refusal(tx, target, check, reason, now)
            based_on_view = handle is None or handle.kind == "write"
            moves_view = view_moves(check, based_on_view, bool(replayed) or made[0] == "merge")
            if refusal is None and is_noop(record, content.hash if content is not None else None):
                if moves_view:
                    tx.put_view(agent, target.rel, version, now)  # no new version, nobody invalidated
                if ends:
                    assert handle is not None and handle.grant is not None
                    self._end(tx, handle.grant, handle.kind)
                return _Decided(version, check, done=True)
            exists = record is not None and record.present
            if refusal is None and content is not None:
                self._record_staged(tx, agent, target, version + 1, content, check.seen, moves_view, made)
                if ends:
                    assert handle is not None and handle.grant is not None
                    self._end(tx, handle.grant, handle.kind)
            elif refusal is None and exists:
                tx.put_intent(Intent(target.rel, agent, version + 1, False, None, aside))
            return _Decided(
                version, check, refusal=refusal, content=content, moves_view=moves_view, exists=exists, record=record
            )

        try:
            decided = self._transact(decide, ahead=(target.rel, agent))
            if decided.done:
                self._handle_ended(handle)
                return decided.version
            if decided.refusal is not None:
                raise decided.refusal
            content, version = decided.content, decided.version
            if content is None and not decided.exists:
                raise absent(target.abs, target.rel)
            if content is not None:  # recorded: install it (recovery does, if this fails or dies first)
                try:
                    settled = self._install_recorded(target, content, version + 1, decided.record)
                finally:
                    self._handle_ended(handle)
                if not settled:
                    self._transact(lambda tx: None, holds=(target.rel,))  # recovery puts it back (and records it)
                return version + 1
            # set aside (refused: nothing changed), then the directory's fsync (if it fails, the disk
            # says what happened)
            assert aside is not None
            seen = self._seen_on_disk(target, decided.record)
            self._noting_aside(target, aside, None)
            self._install(lambda: _set_aside(target, aside), ((target.rel, version + 1),), (target.rel,))
            self._install(lambda: atomic.sync_dirs(target.abs), (), (target.rel,))
            self._installed(target, version + 1, None)
            previous = decided.record.hash if decided.record is not None else None
            if self._displaced_settled(aside, previous, seen):
                self._noted_settled(target, aside)
            else:
                self._transact(lambda tx: None, holds=(target.rel,))  # recovery puts it back (and records it)

            def finish(tx: Transaction) -> bool:
                """Record the installed deletion, unless crash recovery already settled its intent (a
                finish whose reply was lost, or another process's recovery while the registry was
                unreachable); whether the version is the writer's."""
                ours = self._recorded(
                    tx,
                    agent,
                    target,
                    version + 1,
                    lambda: self._finish(
                        tx, agent, target, version + 1, None, decided.check.seen, decided.moves_view, made
                    ),
                )
                if handle is not None and handle.grant is not None:
                    self._end(tx, handle.grant, handle.kind)
                if not ours:
                    overtaken.append(self._overtaken(tx, target, decided.check))
                return ours

            what = f"{target.rel} (version {version + 1})"
            overtaken: list[StaleWriteError] = []
            if not self._settle(what, finish, (target.rel,)):
                if overtaken:
                    raise overtaken[-1]
                raise self._not_recorded(
                    what, "your change", "read the file again and redo your change if it is missing"
                )
            self._handle_ended(handle)
            return version + 1
        finally:
            for earlier in replayed:
                earlier.discard()

    def _record_staged(
        self,
        tx: Transaction,
        agent: str,
        target: Target,
        version: int,
        content: atomic.Staged,
        seen: int | None,
        moves_view: bool,
        made: Made,
    ) -> None:
        """Record a commit of staged content as `version` in its decision's transaction: its COMMIT
        is the commit's commit point. The content is named in the staging directory first and its
        intent names that file: a name still there later means the install did not happen, and
        recovery installs it (`protocol.recovery`). Its bytes are retained in the same transaction."""
        try:
            tmp = content.name_in(self.paths.staging)
        except OSError as e:
            raise RegistryError(
                f"{target.rel}: nothing was written: the commit could not name its content in "
                f"{self.paths.staging} ({e.strerror or e}); {_staging_fix(self.paths.staging, e)}",
                e.errno or errno.EIO,
            ) from e
        tx.put_intent(Intent(target.rel, agent, version, True, content.hash, tmp))
        self._retain_staged(tx, content)
        now = time.time()
        fp = content.fingerprint()
        self._record(
            tx,
            FileRecord(
                target.rel,
                version,
                True,
                content.hash,
                fp if self.replica is None else None,  # a working copy records its install after it
                agent,
                now,
                time.time_ns(),
            ),
            made[0],
            made[1],
            size=fp.size,
        )
        if moves_view:
            tx.put_view(agent, target.rel, version, now)
        tx.log("commit", target.rel, agent, now, seen_version=seen, version=version)

    @staticmethod
    def _recorded(tx: Transaction, agent: str, target: Target, version: int, record: Callable[[], None]) -> bool:
        """Record an installed commit of `target` as `version` (`record`), unless crash recovery
        settled its intent already (a finish whose reply was lost, or another process's recovery
        while the registry was unreachable); whether that version is `agent`'s."""
        if any(i.version == version for i in tx.intents([target.rel])):
            record()
        entry = tx.version_entry(target.rel, version)
        return entry is not None and entry.writer == agent

    def _overtaken(self, tx: Transaction, target: Target, check: WriteCheck) -> StaleWriteError:
        """The refusal of a deletion that recovery abandoned, as the file was saved outside the
        volume after it was set aside (`CoreBase._recover_unrecorded`), logged so `why` explains
        it: the current version is the save's."""
        return self._refusal(
            tx,
            target,
            check,
            "stale",
            time.time(),
            record=tx.file(target.rel),
            detail="a deletion a program's save overtook: saved outside the volume after the deletion set the file "
            "aside, so the deletion was abandoned, not recorded",
            kinds=(DeletionOvertaken, DeletionOvertakenCas),
        )

    @staticmethod
    def _not_recorded(what: str, done: str, remedy: str) -> RegistryError:
        """The error of an installed commit that is not its writer's: the file changed again before it
        was recorded, so crash recovery recorded what it found instead."""
        return RegistryError(
            f"{what}: {done} was installed, but changed again before it was recorded, so crash recovery "
            f"did not record it as yours (see `coherent-volume log`): {remedy}",
            errno.EAGAIN,
        )

    def _settle(self, what: str, finish: Callable[[Transaction], R], holds: Sequence[str], recover: bool = False) -> R:
        """Run `finish` (idempotent: it records an installed commit, of `what`, unless recovery did;
        after recovery of the paths it holds where `recover`, `_transact`) until the registry takes
        it, retrying for at most FINISH_WAIT seconds while it cannot be reached; its answer. Past
        that, RegistryError saying the change is on disk and will be recorded as the writer's
        version by the next operation's recovery."""
        deadline = time.monotonic() + FINISH_WAIT
        pause = 0.05
        while True:
            try:
                return self._transact(finish, holds=holds) if recover else self.registry.transact(finish, holds)
            except RegistryError as e:
                if time.monotonic() + pause > deadline:
                    raise CommitPending(
                        f"{what}: your change is on disk and its commit is pending, but the registry could "
                        f"not record it within {FINISH_WAIT:.0f} s ({e}); the next operation on this volume "
                        "records it as yours (crash recovery) unless the file changes before that: do not "
                        "write it again, check `coherent-volume log` of this path",
                        e.errno,
                    ) from e
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    @staticmethod
    def _retain_staged(tx: Transaction, staged: atomic.Staged) -> None:
        """Retain a commit's content in the transaction that records its intent, before it is
        installed (an abandoned commit's content goes with its intent: `CoreBase._recover`): from
        the bytes it was staged from when they are at hand, else read back from the staged file."""
        if staged.data is not None:
            tx.store(staged.hash, staged.data)
            return
        fd = staged.reader()
        try:
            tx.store(staged.hash, fd)
        finally:
            os.close(fd)

    def _consumed(self, staged: atomic.Staged, target: Target) -> None:
        """After the install of a recorded commit's staged content at `target`: its name is gone, so
        recovery settles its intent as `finished` without looking (`CoreBase._recover`)."""
        assert staged.tmp is not None
        with self._lock:
            self._renamed[staged.tmp] = target.rel

    def _install_recorded(
        self, target: Target, content: atomic.Staged, version: int, record: FileRecord | None
    ) -> bool:
        """Install a commit of `content` recorded as `version` with its decision, which found `record`:
        exchanged with the file in place (`atomic.Staged.install`), the file it displaced removed if
        it is that version (`_displaced_settled`). False: it is not, and is left for recovery to
        record and put back (`CoreBase._put_back`; the caller runs it). An install that fails leaves
        its staged name, the marker of an install not done (`InstallPending`)."""
        seen = self._seen_on_disk(target, record)
        name = content.plan_name()
        self._noting_aside(target, name, content.hash)
        try:
            displaced = content.install(exchange=True)
        except BaseException as e:
            content.leave_name()  # the marker of an install not done, for the next recovery
            if isinstance(e, OSError):
                raise InstallPending(target.rel, version, e) from e
            raise
        self._installed(target, version, content.hash)
        previous = record.hash if record is not None and record.present else None
        if displaced and not self._displaced_settled(name, previous, seen):
            return False
        self._consumed(content, target)
        self._noted_settled(target, name)
        return True

    def _noting_aside(self, target: Target, name: str, brought: str | None) -> None:
        """In a working copy, before an install or a deletion takes the file at `target` away to
        `name`: noted there (`Replica.setting_aside`), since another copy's transaction may settle
        the change's intent before a change made outside the volume that it displaced is put back;
        this copy's next transaction holding the path then does (`CoreBase._settle_asides`). The
        note says what the copy recorded holding there before (`Replica.installed`): the only bytes
        recovery counts as the copy's own, where they are not the version the decision found
        (`CoreBase._kept_already`), also when this process dies right after the change."""
        if self.replica is not None:
            self.replica.setting_aside(target.rel, name, brought, self.replica.installed(target.rel))

    def _noted_settled(self, target: Target, name: str) -> None:
        """What an install or a deletion took away to `name` is settled: its note dropped."""
        if self.replica is not None:
            self.replica.set_back(target.rel, name)

    def _seen_on_disk(self, target: Target, record: FileRecord | None) -> tuple[Fingerprint | None, int]:
        """The fingerprint that a commit's decision relied on for the file its install displaces (the
        current `record`'s), and when it was checked against the content: in a working copy, what the
        copy records holding (read before its install changes that)."""
        if self.replica is None:
            return (None, 0) if record is None else (record.fingerprint, record.checked_ns)
        installed = self.replica.installed(target.rel)
        if installed is None or record is None or installed.version != record.version:
            return None, 0
        return installed.fingerprint, installed.checked_ns

    @staticmethod
    def _displaced_settled(name: str, previous: str | None, seen: tuple[Fingerprint | None, int]) -> bool:
        """After an install that took the file at its target away to `name` (an exchange, or set
        aside): remove it if it is the version the decision found (hashing to `previous`, None for no
        file; its fingerprint relied on as `seen`: `protocol.displaced_needs_hash`), and say so.
        False: it holds other bytes (a change made outside the volume meanwhile), left to recovery
        (`CoreBase._put_back`)."""
        fp = fingerprint_path(name)
        if fp is not None and displaced_needs_hash(seen[0], seen[1], fp):
            digest = hash_path(name)
            if not may_drop_taken(digest, previous):
                return False
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass
        return True

    def _handle_ended(self, handle: HandleCommit | None) -> None:
        """After the transaction that ended a handle's use of its grant: end it in memory too."""
        if handle is not None and handle.grant is not None:
            self._forget_share(handle.grant, handle.kind)

    def _install(self, action: Callable[[], None], undone: Sequence[tuple[str, int]], paths: Sequence[str]) -> None:
        """Run the disk half of a commit whose intents are recorded; if it fails, recovery settles
        them by what the disk holds, except the intents (path, version) in `undone`: those whose one
        system call `action` is. When the kernel refuses that (an OSError), nothing changed: they are
        abandoned without looking at the disk, which may hold the same bytes already
        (`protocol.recovery`). `paths`: those of the intents."""
        try:
            action()
        except BaseException as e:
            if isinstance(e, OSError):
                with self._lock:
                    self._undone.update(undone)
            self._transact(lambda tx: None, holds=paths)  # recovery settles the intents
            with self._lock:
                self._undone.difference_update(undone)  # settled: their (path, version) may be decided anew
            raise

    def _finish(
        self,
        tx: Transaction,
        agent: str,
        target: Target,
        version: int,
        digest: str | None,
        seen: int | None,
        moves_view: bool = True,
        made: Made = ("commit", ()),
    ) -> None:
        """Record an installed commit (`made`: its kind and parents; a deletion is always a
        `delete`): new version, the writer's view current where it knew the content
        (`protocol.view_moves`), intent done."""
        now = time.time()
        present = digest is not None
        self._record(
            tx,
            FileRecord(
                target.rel,
                version,
                present,
                digest,
                fingerprint_path(target.abs) if present else None,
                agent,
                now,
                time.time_ns(),
            ),
            made[0] if present else "delete",
            made[1],
        )
        if moves_view:
            tx.put_view(agent, target.rel, version, now)
        tx.drop_intent(target.rel)
        tx.log("commit" if present else "delete", target.rel, agent, now, seen_version=seen, version=version)

    def create(self, agent: str, target: Target, mode: int, owner: ProcessId, kind: HandleKind) -> tuple[Grant, int]:
        """Create `target` empty with `mode` (FileExistsError if it exists) as a checked commit, and
        take `agent`'s write grant for the handle that created it, as `begin_write` does: (grant,
        version).

        Creating a new path needs no prior read, but a view that predates the path's deletion is
        stale."""
        self._require_managed(target, "create")
        agent = self.agent(agent)
        staged = atomic.stage_written(
            target.abs, EMPTY_HASH, lambda write: None, b"", mode, durable=False, root=self.paths.root
        )

        def decide(tx: Transaction) -> tuple[int, StaleWriteError | tuple[Grant, bool]]:
            """Decide the creation and, accepted, record it (`_record_staged`) and take the handle's grant.
            Its directory must be there (under the commit lock, no checked rename moves it meanwhile):
            the handle's create(2) names a directory the kernel looked up, never one to be made, and
            making it again would bring back a directory just renamed away."""
            if not os.path.isdir(os.path.dirname(target.abs)):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory (its directory is gone)", target.rel)
            now = time.time()
            record, check, reason, held = self._decide(tx, agent, target, "file", kind=kind)
            if record is not None and record.present:
                raise FileExistsError(errno.EEXIST, "File exists", target.rel)
            version = current_version(record) + 1
            if reason is not None:
                return version, self._refusal(tx, target, check, reason, now)
            self._record_staged(tx, agent, target, version, staged, check.seen, True, ("commit", ()))
            return version, self._share(tx, agent, target, owner, self.leases.length, held)

        try:
            with self._commit_lock((target.rel,)):
                version, outcome = self._transact(decide, ahead=(target.rel, agent))
                if isinstance(outcome, StaleWriteError):
                    raise outcome
                grant, taken = outcome
                self._count_share(grant, kind, taken, leased=True)
                try:
                    staged.install(noreplace=True)
                except BaseException as e:
                    staged.leave_name()  # recovery installs it, or finds what was made there meanwhile
                    self.release(grant, kind, log=False)
                    if isinstance(e, FileExistsError):
                        raise FileExistsError(errno.EEXIST, "File exists (made outside the volume)", target.rel) from e
                    if isinstance(e, OSError):
                        raise InstallPending(target.rel, version, e) from e
                    raise
                self._consumed(staged, target)
                self._installed(target, version, EMPTY_HASH)
                return grant, version
        finally:
            staged.discard()

    def truncate(self, agent: str, target: Target, size: int) -> int:
        """truncate(2) of a managed file by name: a checked commit of its content cut or zero-extended
        to `size`, built from the current content under the commit lock (no copy in memory). Like
        opening a write handle, it waits for the agent's own open write handles (`held`)."""
        self._require_managed(target, "truncate")
        agent = self.agent(agent)
        with self._commit_lock((target.rel,)):
            self._settle_installs()
            staged = atomic.stage_resized(target.abs, size)
            try:
                return self._commit_locked(agent, target, staged, "file", None, None, opening="write")
            finally:
                staged.discard()

    def view_state(self, agent: str, target: Target) -> tuple[int, ViewState]:
        """(current version, 'fresh' | 'stale' | 'unread') of a managed path for `agent`."""
        version = self.version(target)
        with self.registry.read() as tx:
            seen = tx.view(agent, target.rel)
        return version, view_state(seen, version)

    # ---- grants ---------------------------------------------------------------------

    def acquire(self, agent: str, target: Target, ttl: float, owner: ProcessId) -> Grant:
        """Take the write grant on `target` for `agent`, lasting `ttl` s on the registry's clock (not
        renewed: it ends at release, at its TTL, or when its process is known dead; reclaimed, it
        fences its holder); StaleWriteError('held') (logged) while another grant is live."""
        self._require_managed(target, "lock")
        agent = self.agent(agent)

        def decide(tx: Transaction) -> Grant | StaleWriteError:
            held = self._holder(tx, target.rel)
            now = tx.now()
            if held is None:
                grant = Grant(target.rel, agent, secrets.token_hex(8), owner, now + ttl)
                tx.put_grant(grant)
                tx.drop_fence(agent, target.rel)
                tx.log("grant", target.rel, agent, now, detail=f"ttl={ttl:g}s pid={owner.pid}")
                return grant
            record, seen = tx.file_and_view(target.rel, agent)
            check = WriteCheck(agent=agent, current=record, seen=seen, holder=held.agent, fenced=False)
            return self._refusal(tx, target, check, "held", now)

        outcome = self._transact(decide, holds=(target.rel,))
        if isinstance(outcome, StaleWriteError):
            raise outcome
        return outcome

    def begin_write(
        self,
        agent: str,
        target: Target,
        owner: ProcessId,
        *,
        kind: HandleKind,
        expected: int | None = None,
        after_appending: bool = False,
        ttl: float | None = None,
        existing: bool = False,
    ) -> tuple[Grant, int]:
        """Check that `agent` may open a write handle of `kind` on `target` now, and take a share of
        its write grant for it (`protocol.decide_write`: opening to append needs no view; appends
        share, any other write handle is alone). With `existing` (a write that must find its file: the
        mount's open carried by a rename to a name the program never gave), FileNotFoundError if no
        file is there, decided in the same transaction.

        A handle that writes again after its commit passes the version it committed (`expected`),
        which must still be current unless it appends. One that only appended and now does more
        (an ftruncate) ends its append share first and passes `after_appending` and its base as
        `expected`: it was opened without a view, so it needs both a current view and that base.

        A grant it takes is a lease (`leases.HANDLE_LEASE` s on the registry's clock), renewed by this
        process's heartbeat until the handle's last share of it ends (`leases`); with `ttl`, a grant
        of `ttl` s, never renewed (a hook's, which outlives the process that took it).

        Returns (grant, version): the grant the handle writes under, which it passes to its commit
        and to `release` with its kind, and the version it starts from. Refusals raise
        StaleWriteError."""
        self._require_managed(target, "begin_write")
        agent = self.agent(agent)

        def decide(tx: Transaction) -> tuple[int, tuple[Grant, bool] | StaleWriteError | FileNotFoundError]:
            now = time.time()
            cas = expected if kind == "write" and not after_appending else None
            record, check, reason, held = self._decide(tx, agent, target, "file", cas, kind)
            if existing and (record is None or not record.present):
                return current_version(record), FileNotFoundError(
                    errno.ENOENT, "no file to write at this name (deleted meanwhile)", atomic.named(target.abs)
                )
            if reason is None and after_appending and expected != current_version(record):
                reason = "stale"  # its content so far is based on a version that is no longer current
            if reason is None and kind == "append" and expected is not None and current_version(record) > expected:
                since = tx.history(target.rel, current_version(record) - expected) if record and record.present else []
                if appends_lost_their_file(record, expected, since):
                    reason = "stale"
            if reason is not None:
                return current_version(record), self._refusal(tx, target, check, reason, now)
            lasts = self.leases.length if ttl is None else ttl
            return current_version(record), self._share(tx, agent, target, owner, lasts, held)

        with self._commit_lock((target.rel,)):
            version, outcome = self._transact(decide, ahead=(target.rel, agent))
            if isinstance(outcome, (StaleWriteError, FileNotFoundError)):
                raise outcome
            grant, taken = outcome
            self._count_share(grant, kind, taken, leased=ttl is None)
            return grant, version if expected is None else expected

    def release(self, grant: Grant, kind: HandleKind | None = None, *, log: bool = True) -> bool:
        """End a handle's use (of `kind`) of `grant`, or with no kind release the grant itself, if it
        is still in force (`CoreBase._end`); False if it was reclaimed meanwhile. A release that fails
        (the registry unreachable) still ends the use in this process: the grant is renewed no more,
        so what the registry still holds of it lapses by itself (a handle grant within its lease)
        instead of being renewed for as long as this process lives."""

        def end(tx: Transaction) -> bool:
            ended = self._end(tx, grant, kind)
            if ended and log:
                tx.log("release", grant.path, grant.agent, time.time())
            return ended

        try:
            with self._commit_lock((grant.path,)):
                ended = self._transact(end, ahead=(grant.path, grant.agent))  # (its grant: `_end`)
        finally:
            self._forget_share(grant, kind)
        return ended
