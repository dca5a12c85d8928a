"""Agent sessions for integrations such as the Claude Code hooks: process bindings, views
registered from what a model was shown, and commits a hook reports."""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterable, Sequence

from ..errors import CoherenceError, StaleWriteError
from ..fingerprint import content_hash, read_file
from ..liveness import ProcessId
from ..paths import Target
from ..protocol import (
    EXTERNAL,
    FileRecord,
    Version,
    current_version,
    tools_write_seen_early,
)
from ..registry import Transaction
from .base import Isolation, disk_state
from .writes import Writes

HELD_CLOBBER = ", recorded while it held its write grant (its own write seen half done, or another program's change)"
"""How a clobber's detail ends when its writer held the file's grant all along: the version it wrote
over was recorded during its tool's run, by a look at the file then."""


class Fit(enum.IntEnum):
    """How a file's bytes stand against what a hook's tool made: not that (false), that as the
    tool may have written it (line ends, spaces at line ends or, where the tool matched so, all
    spaces aside), or exactly that, byte for byte."""

    NO = 0
    LOOSE = 1
    EXACT = 2


Check = Callable[[bytes], Fit]
Made = Callable[[bytes], Check | None]
"""What a hook's tool made of a file, from its input: given the bytes of the version its check
found, how a file's bytes fit what it made of them (None where that cannot be told)."""


def any_check(checks: Iterable[Check | None]) -> Check | None:
    """A file fits as well as the best of `checks` that can tell (not None); None where none can."""
    known = [check for check in checks if check is not None]
    if not known:
        return None
    return lambda data: max(check(data) for check in known)


class Sessions(Writes):
    # ---- agent sessions (integrations such as Claude Code hooks) --------------------

    def bind_session(self, agent: str, process: ProcessId, *, pinned: bool) -> None:
        """Requests from `process` (and its descendants, on a mount) are `agent`'s. A pinned agent's
        views move only through `observe` (what its model read) and its own commits."""

        def bind(tx: Transaction) -> None:
            tx.hold_agents([agent])
            tx.bind(agent, process, pinned, time.time())

        self.registry.transact(bind)

    def join_session(self, session: str, process: ProcessId, fork: str) -> str:
        """Bind `process` to the session agent `session`, views pinned, and return the agent it acts
        as: `session`, unless another process that is (or may be: another host's) alive is bound to
        it, as when one session is resumed in two terminals: then `fork`, an agent of its own whose
        views start as copies of the session's (both conversations hold what was read before), so
        neither passes for the other's reads. A process bound already (pinned) keeps its agent; a
        process bound to another session is bound to this one instead (a process runs one session
        at a time: Claude Code's /clear starts a new one, whose SessionEnd for the old one may never
        have come); a session whose process is gone is rebound to `process`, its views kept."""

        def join(tx: Transaction) -> str:
            tx.hold_agents([session, fork])  # first: two joins of one session decide one after the other
            bound = tx.bound_agent(process)
            if bound is not None and bound[1] and bound[0] in (session, fork):
                return bound[0]
            if bound is not None:  # a new session in this process (/clear): it runs one at a time
                tx.unbind(bound[0])
            holder = tx.bound_process(session)
            now = time.time()
            if holder is None or holder == process or holder.alive() is False:
                tx.bind(session, process, True, now)
                return session
            if tx.bound_process(fork) != process:
                for path, version in tx.read_set(session).items():
                    tx.put_view(fork, path, version, now)
            tx.bind(fork, process, True, now)
            return fork

        return self.registry.transact(join)

    def session_of(self, processes: Sequence[ProcessId]) -> tuple[str, bool] | None:
        """(agent, pinned) bound to the first of `processes` that has a binding (a process and its
        ancestors, nearest first), if any: one read."""
        with self.registry.read() as tx:
            bound = tx.bound_agents(processes)
        return next((bound[p] for p in processes if p in bound), None)

    def end_session(self, agent: str) -> None:
        """Release every grant `agent` holds and forget its process binding."""

        def end(tx: Transaction) -> None:
            tx.hold_agents([agent])
            now = time.time()
            for grant in tx.grants_of(agent):
                tx.drop_grant(grant.path)
                tx.log("release", grant.path, agent, now, detail="session ended")
            tx.unbind(agent)

        self._transact(end)

    def observe(self, agent: str, target: Target, saw: Callable[[bytes], bool]) -> int | None:
        """Register `agent`'s view at the current version if `saw(current content)` confirms that is
        what the agent was shown, and lift a fence it had there (a confirmed re-read, as
        `reacquire`); return that version, or None (views unchanged) if it was not. A working copy
        that was behind is brought up to date after (the view stays at what was shown), so the
        agent's next read shows the current version."""
        target = self.paths.beneath(target)
        with self._commit_lock((target.rel,)):  # no commit of it between the read and the sync
            self._settle_installs()
            try:
                data, fp = read_file(target.abs)
            except FileNotFoundError:
                return None
            shown, digest = saw(data), content_hash(data)

            def confirm(tx: Transaction) -> int | None:
                record = self._sync(tx, target, tx.file(target.rel), (fp, digest), content=data)
                if record is None or not shown:
                    return None
                tx.put_view(agent, target.rel, record.version, time.time())
                tx.drop_fence(agent, target.rel)
                return record.version

            version = self._transact(confirm, holds=(target.rel,))
            self._catch_up(target)
            return version

    def observe_absent(self, agent: str, target: Target) -> int | None:
        """Where `agent`'s read found no file (its model was shown that there is none) and the
        volume's current version of `target` is a deletion: register the view there, lifting a fence
        as `observe` does, and return it; else None, views unchanged (a file is there, or the
        volume never held one)."""
        target = self.paths.beneath(target)
        with self._commit_lock((target.rel,)):
            self._settle_installs()
            if os.path.lexists(target.abs):
                return None

            def confirm(tx: Transaction) -> int | None:
                record = self._sync(tx, target, tx.file(target.rel), (None, None))
                if record is None or record.present:
                    return None
                tx.put_view(agent, target.rel, record.version, time.time())
                tx.drop_fence(agent, target.rel)
                return record.version

            return self._transact(confirm, holds=(target.rel,))

    def check(self, agent: str, target: Target, isolation: Isolation = "file") -> StaleWriteError | None:
        """The refusal `agent`'s write of `target` would get now (logged), or None if it would be accepted."""
        return self._transact(lambda tx: self._check(tx, agent, target, time.time(), isolation)[2], holds=(target.rel,))

    def adopt(
        self, agent: str, target: Target, made: Made | None = None, *, appended: bool = False, moved: bool = False
    ) -> int | None:
        """Record the file's content, written by `agent` itself outside the volume (a hook reporting
        its own write), as `agent`'s commit. If that write was not based on the current version it
        overwrote a commit: that is logged as a clobber, never hidden. An append (`appended`) needs
        no view, so it clobbers nothing and moves none (`protocol.view_moves`): its bytes are added
        to the version its grant held the file at. `made`, where the tool's input says what its
        write makes of the version its check found (`agent`'s view until this record; with `moved`,
        where the tool's write was committed as `agent`'s already, the version before it:
        `_expected`): a file that holds something else was changed by another writer as well,
        meanwhile: recorded as a change by EXTERNAL, `agent`'s view left where it was (its model
        never saw those bytes), and None returned."""
        target = self.paths.beneath(target)

        def record_own(tx: Transaction) -> int | None:
            record = tx.file(target.rel)
            expected = self._expected(tx, agent, target, made, moved) if made is not None else None
            fit, data = Fit.NO, None
            if expected is not None:
                try:
                    data, fp = read_file(target.abs)
                except FileNotFoundError:
                    data, fp = None, None
                digest = None if data is None else content_hash(data)
                fit = Fit.NO if data is None else expected(data)
                if not fit:
                    why = f"changed outside the volume while a tool of {agent} wrote it"
                    self._sync(tx, target, record, (fp, digest), why, data)
                    return None
            else:
                fp, digest = disk_state(target, None)
            now = time.time()
            version = current_version(record)
            present = fp is not None
            if (record is not None and record.present == present and record.hash == digest) or (
                record is None and not present
            ):
                if record is not None and not appended:
                    if fit is Fit.EXACT:  # (bytes a tool may have written otherwise may be another program's)
                        self._own_again(tx, agent, target, record, now)
                    tx.put_view(agent, target.rel, version, now)
                return version
            seen = tx.view(agent, target.rel)
            if record is not None and record.present and seen != version and not appended:
                held = tx.grant(target.rel)
                during = HELD_CLOBBER if held is not None and held.agent == agent else ""
                tx.log(
                    "clobber",
                    target.rel,
                    agent,
                    now,
                    seen_version=seen,
                    version=version,
                    detail=f"{agent} wrote over v{version} by {record.writer} without having read it{during}",
                )
            # the bytes the tool's input was checked against, else as they are now
            stored = self._retain(tx, target.abs, None if data is None else digest, data) if present else None
            record = FileRecord(target.rel, version + 1, present, stored or digest, fp, agent, now, time.time_ns())
            self._record(tx, record, "commit" if present else "delete", retained=not present or stored is not None)
            if not appended:
                tx.put_view(agent, target.rel, version + 1, now)
            tx.log("commit" if present else "delete", target.rel, agent, now, seen_version=seen, version=version + 1)
            return version + 1

        return self._transact(record_own, holds=(target.rel,))

    def _own_again(self, tx: Transaction, agent: str, target: Target, record: FileRecord, now: float) -> None:
        """The current version (`record`), which holds what `agent`'s tool made, recorded as
        `agent`'s where it is that tool's write seen early (`protocol.tools_write_seen_early`):
        same version, same bytes (views of it stay valid), its writer and kind corrected, and logged."""
        entry = tx.version_entry(target.rel, record.version)
        grant = self._holder(tx, target.rel)
        holder = None if grant is None else grant.agent
        if entry is None or not tools_write_seen_early(entry, tx.view(agent, target.rel), holder, agent):
            return
        tx.put_file(record._replace(writer=agent))
        tx.put_version(entry._replace(kind="commit", writer=agent))
        tx.log(
            "adopt",
            target.rel,
            agent,
            now,
            version=record.version,
            detail=f"recorded as a change by {EXTERNAL} while {agent}'s tool wrote it, it holds exactly what that "
            f"tool made: {agent}'s write, seen before the tool's end",
        )

    @classmethod
    def _expected(cls, tx: Transaction, agent: str, target: Target, made: Made, moved: bool) -> Check | None:
        """What `made` makes of the version the tool's check found, as read from the store in `tx`
        (no sync: the file may hold the tool's write, not recorded yet): `agent`'s view, or, where
        the tool's write `moved` it (on a mount the file system commits that write as its agent's)
        and it is a version of `agent`'s own, the one before it too (no other writer comes between
        while the grant holds the file). Never that one elsewhere: a program that put an earlier
        version back before the tool wrote would pass. None where that cannot be told (the bytes
        not kept, or damaged)."""
        seen = tx.view(agent, target.rel)
        entry = None if seen is None else tx.version_entry(target.rel, seen)
        bases = (
            [entry, tx.version_entry(target.rel, entry.version - 1)]
            if moved and entry is not None and entry.writer == agent
            else [entry]
        )
        return any_check(cls._made_of(tx, target, base, made) for base in bases)

    @staticmethod
    def _made_of(tx: Transaction, target: Target, base: Version | None, made: Made) -> Check | None:
        """`made` applied to the bytes of version `base` (none, or a deletion: no bytes); None where
        they are not kept, or damaged."""
        if base is None or base.hash is None:
            return made(b"")
        if not base.retained:
            return None
        try:
            return made(tx.load(base.hash, f"{target.rel!r} version {base.version}"))
        except CoherenceError:
            return None
