"""Typed errors. Every refusal a user can meet is one of these; none loses data."""

from __future__ import annotations

import errno
import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Self

Reason = Literal["stale", "unread", "held", "fenced", "read-set"]

REMEDY: dict[str, str] = {
    "stale": "re-read the file, then redo the change from its current content",
    "unread": "read the file first, then make the change from its current content",
    "held": "wait until the holder releases its write grant (or it expires), re-read, then redo the change",
    "fenced": (
        "a write grant of this agent on the file was reclaimed (its holder paused past its lease, or its process "
        "ended holding it), so every process of this agent is fenced from the file until one calls reacquire() on "
        "it (re-reading it); then redo the change from its current content"
    ),
    "read-set": "re-read the files listed as changed (or forget() them), then redo the change",
}

REMEDY_DELETED = (
    "look at its directory again to take in the deletion (`ls` through a mount; a read raising "
    "FileNotFoundError through the API), then create it anew if you still mean to"
)
"""The remedy of a `stale` refusal whose current version is the file's deletion: no read of the
file can follow "re-read the file"."""


def remedy(reason: str, deleted: bool) -> str:
    """What a refused writer is told to do: `REMEDY` of its reason, `REMEDY_DELETED` for a `stale`
    one whose current version is the file's deletion."""
    return REMEDY_DELETED if deleted and reason == "stale" else REMEDY[reason]


class CoherenceError(Exception):
    """Base class of every error raised by coherent_volume."""


class Absent(FileNotFoundError):
    """A tracked read of a managed file found none: `version` is what the read observed, the
    deletion's version (0 where no file of that name was ever recorded), from the same registry
    transaction that registered the view of it; what a compare-and-swap on the absence expects."""

    def __init__(self, rel: str, version: int) -> None:
        super().__init__(errno.ENOENT, "No such file or directory", rel)
        self.version = version


class RootGone(CoherenceError, FileNotFoundError):
    """The volume's root directory is no longer where the volume was opened (removed or moved while
    in use); nothing was changed. errno is ENOENT (the mount answers EIO: the names asked for may
    well exist, at the root's new place)."""


def root_gone(root: str) -> RootGone:
    """The error of an operation on a volume whose root directory is no longer where it was opened."""
    return RootGone(
        errno.ENOENT,
        "No such file or directory: the volume's root was removed or moved while in use; nothing was "
        "written (open the volume where it is now)",
        root,
    )


class TreeClash(CoherenceError, OSError):
    """A working copy cannot install a version of a managed file: its name, or a name on its path,
    is a directory here where another working copy made it a file, or the other way round (the
    registry holds both). errno is EISDIR or ENOTDIR; nothing was changed."""


LONG_HELD = 300.0
"""Seconds left on a live holder's grant past which a `held` refusal names `reclaim` (an open write
handle's lease is 30 s: only a `lock()` lasts this long)."""


class HeldUntil(NamedTuple):
    """When a `held` refusal's write grant ends unless released sooner."""

    at: float
    """Its expiry, on the registry's clock (seconds since the epoch)."""
    left: float
    """Seconds from the refusal to it."""
    unchecked: bool
    """Its holder's process cannot be checked from where the refusal was decided (another PID
    namespace or host): the grant lasts to its expiry even if that process ended."""


class StaleWriteError(CoherenceError, PermissionError):
    """A write refused because the writer's view is not current. Nothing was changed.

    errno is EACCES, so code that handles PermissionError handles this too.
    """

    def __init__(
        self,
        path: str,
        agent: str,
        reason: Reason,
        seen_version: int | None,
        current_version: int,
        last_writer: str | None,
        *,
        holder: str | None = None,
        changed: tuple[str, ...] = (),
        held_until: HeldUntil | tuple[float, float, bool] | None = None,
        deleted: bool = False,
    ) -> None:
        self.path = path
        self.agent = agent
        self.reason = reason
        self.seen_version = seen_version
        self.current_version = current_version
        self.last_writer = last_writer
        self.holder = holder
        self.changed = changed
        self.held_until = None if held_until is None else HeldUntil(*held_until)
        self.deleted = deleted
        """The current version is the file's deletion."""
        self.diff: str | None = None
        """The unified diff from the version the agent read to the current one, when a face
        attached it (`with_diff`): None for binary content, an unread file, or a pruned base."""
        self.unmerged: str | None = None
        """Why a merge that was asked for could not be made (`not_merged`), if one was."""
        PermissionError.__init__(self, errno.EACCES, self._message(), path)

    def facts(self) -> dict[str, Any]:
        """What this refusal says, as the keyword arguments that make another refusal say it too."""
        return {
            "path": self.path,
            "agent": self.agent,
            "reason": self.reason,
            "seen_version": self.seen_version,
            "current_version": self.current_version,
            "last_writer": self.last_writer,
            "holder": self.holder,
            "changed": self.changed,
            "held_until": self.held_until,
            "deleted": self.deleted,
        }

    @property
    def based_on(self) -> int | None:
        """The version the refused content was built on (its diff's and a merge's base): the
        agent's view."""
        return self.seen_version

    def not_merged(self, why: str) -> Self:
        """This refusal, its message saying why the merge asked for could not be made."""
        self.unmerged = why
        self.strerror = self._message()
        return self

    def naming_current(self, version: int, writer: str | None) -> Self:
        """This refusal naming `version` (last written by `writer`) as the current version, without
        the diff it carried: the version it named was overtaken by it before its diff or merge."""
        self.current_version, self.last_writer, self.diff = version, writer, None
        self.strerror = self._message()
        return self

    def with_diff(self, diff: str | None) -> Self:
        """This refusal, its message showing `diff` (already cut to a readable size)."""
        self.diff = diff
        self.strerror = self._message()
        return self

    def _seen(self) -> str:
        """What the refused writer had seen, for the message."""
        return "you " + {None: "never read it", 0: "found no file there"}.get(
            self.seen_version, f"read version {self.seen_version}"
        )

    def _message(self) -> str:
        detail = f"{self._seen()}; current version is {self.current_version}"
        if self.deleted:
            detail += " (the file's deletion)"
        if self.last_writer:
            detail += f", {'deleted' if self.deleted else 'last written'} by {self.last_writer!r}"
        if self.holder:
            detail += f"; write grant held by {self.holder!r}"
            if self.held_until is not None:
                at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.held_until.at))
                detail += f" until {at} (in {max(self.held_until.left, 0):,.0f} s) unless released sooner"
                if self.held_until.unchecked:
                    detail += (
                        ", its process running where this one cannot check it (another PID namespace or host), so it "
                        "lasts until then even if that process ended; if you know it did, `coherent-volume reclaim "
                        "PATH` ends it now"
                    )
                elif self.held_until.left > LONG_HELD:
                    detail += (
                        " (a lock; its process is alive: if you know it will not release it here, as when this "
                        "volume is a copy made while it held the lock, `coherent-volume reclaim PATH` ends it now)"
                    )
        if self.changed:
            detail += f"; changed since you read them: {', '.join(self.changed)}"
        message = (
            f"write to {self.path!r} refused for agent {self.agent!r} ({self.reason}): "
            f"{detail}. To fix: {remedy(self.reason, self.deleted)}."
        )
        if self.unmerged:
            message += f"\nIt could not be merged: {self.unmerged}."
        if self.diff:
            message += f"\nWhat changed since version {self.based_on}:\n{self.diff.rstrip()}"
        return message

    def __str__(self) -> str:
        return self._message()


class CasConflict(StaleWriteError):
    """write_cas refused: the expected version is not current (or another rule refused)."""

    def __init__(self, *args: object, expected_version: int, **kwargs: object) -> None:
        self.expected_version = expected_version
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    @property
    def based_on(self) -> int | None:
        """The expected version: the content was built on it, whatever the agent's view."""
        return self.expected_version

    def _seen(self) -> str:
        """The version the content was built on, and the writer's view where that is another."""
        built = f"the content was built on version {self.expected_version}"
        return built if self.seen_version == self.expected_version else f"{built} ({super()._seen()})"

    def _message(self) -> str:
        return f"expected version {self.expected_version}; " + super()._message()


class MergeConflict(StaleWriteError):
    """A stale write asked to merge, refused because it and the current version changed the same
    lines differently. Nothing was changed. `conflicts` holds the hunks (`diffs.Conflict`)."""

    def __init__(self, refusal: StaleWriteError, conflicts: list[Any], base: int) -> None:
        self.conflicts = conflicts
        self.base = base
        super().__init__(**refusal.facts())

    @property
    def based_on(self) -> int | None:
        """The merge's base: the version the refused content was built on."""
        return self.base

    def _message(self) -> str:
        from .diffs import cut  # (diffs raises errors of this module)

        hunks = cut("".join(str(c) for c in self.conflicts))  # as a refusal's diff is: `conflicts` holds them all
        return (
            f"{super()._message()}\nYour change and version {self.current_version} changed the same lines "
            f"({len(self.conflicts)} conflicting hunk(s)); nothing was merged:\n{hunks.rstrip()}"
        )


class RetriesExhausted(CasConflict):
    """update() gave up after its retries; the last conflict is described."""


OVERTAKEN = (
    "your deletion of {path!r} was not made: a program saved the file outside the volume while the deletion was "
    "being made (after the deletion set the file aside), so the deletion would have removed a save you never read; "
    "what it set aside was put back and the program's saves are recorded as versions by 'external', the newest in "
    "place; the deletion is not in history (`coherent-volume log` of the path says each step). "
)
"""What a deletion refused this way (`DeletionOvertaken`) says before its refusal's own message."""


class DeletionOvertaken(StaleWriteError):
    """A deletion through the volume that a program's save overtook: the file was saved again outside
    the volume after the deletion set it aside (`atomic.set_aside`), so the deletion was abandoned,
    not recorded (recovery put back what it set aside, recording the saves). A refusal, as the
    stale write it is (the writer never read the newer save: EACCES on a mount), never a
    RegistryError (EAGAIN, saying the registry failed), which it was (/tmp/s33fw 3). Nothing of
    the deletion remains."""

    def _message(self) -> str:
        return OVERTAKEN.format(path=self.path) + super()._message()


class DeletionOvertakenCas(DeletionOvertaken, CasConflict):
    """`DeletionOvertaken` of a deletion that expected a version (`delete(..., expected=)`)."""

    def _message(self) -> str:
        return OVERTAKEN.format(path=self.path) + CasConflict._message(self)


class LinkRefused(CoherenceError, PermissionError):
    """A hard link or symlink that would let writes reach a managed file past the protocol. Nothing
    was changed. errno is EPERM (the file system does not support such links)."""

    def __init__(self, message: str) -> None:
        PermissionError.__init__(self, errno.EPERM, message)

    def __str__(self) -> str:
        return str(self.strerror)


class CarriedIn(CoherenceError, PermissionError):
    """A write through a descriptor opened on an unmanaged file whose file is no longer at any name
    the volume keeps: moved into a managed glob by a rename its face did not check (a program on the
    root itself, or a race with another mount's rename), then replaced there by a commit or deletion
    (set aside at the volume's temp name `now`: `aside`) or deleted (`deleted`; `now` its last name).
    Its bytes would reach no file (EACCES). Nothing was changed, unless `landed` (the replacement
    came while the write ran: its bytes reached that file first)."""

    def __init__(self, opened: str, now: str, aside: bool, deleted: bool, landed: bool = False) -> None:
        self.opened, self.now, self.aside, self.deleted, self.landed = opened, now, aside, deleted, landed
        where = (
            f"the volume's temp file {now!r}{' (deleted since)' if deleted else ''}, where a commit or deletion of a "
            "managed file set it aside"
            if aside
            else f"deleted from the managed name {now!r}"
        )
        what = (
            "Its bytes reached that file first (it was replaced while the write ran): `coherent-volume history` of "
            "the managed file shows whether they were kept as a version"
            if landed
            else "Nothing was written"
        )
        PermissionError.__init__(
            self,
            errno.EACCES,
            f"refused a write through a descriptor opened at {opened!r}, where its file was unmanaged: that file is "
            f"now {where} (it was moved into a managed glob by a rename this mount did not make), so the write would "
            f"reach no file the volume keeps. {what}. Close the descriptor; to change the managed file, open it "
            f"again by its name",
        )

    def __str__(self) -> str:
        return str(self.strerror)


class OpenForWriting(CoherenceError, OSError):
    """A file open for writing somewhere (a program, another mount of the root, a shared writable
    mapping) cannot be moved into a managed glob: its writers would go on changing a managed file
    past the protocol (EBUSY). Nothing was changed."""

    def __init__(self, rel: str, dst: str) -> None:
        self.rel = rel
        OSError.__init__(
            self,
            errno.EBUSY,
            f"{rel!r} is open for writing (by a program, through another mount of the volume, or mapped shared and "
            f"writable): it cannot be moved to {dst!r}, into a managed glob, where those writes would change a "
            f"managed file unchecked; close it (and munmap it), then rename it again",
        )

    def __str__(self) -> str:
        return str(self.args[1])


class UnprotectedAlias(CoherenceError, PermissionError):
    """A write or delete through a managed name that is a symlink (or lies below one) to a path no
    managed glob covers: the protocol would not guard it, so it is refused. Nothing was changed.
    Asked of it, an operation that reads versions (`reading`: its name) is told that it has none."""

    def __init__(self, name: str, resolved: str, reading: str | None = None) -> None:
        self.name, self.resolved = name, resolved
        link = f"{name!r} is managed but is a symlink (or lies below one) to the unmanaged {resolved!r}"
        if reading is None:
            what = f"writes through it are refused; write {resolved!r} itself, or replace the link with a regular file"
        else:
            what = (
                f"it has no versions ({reading} applies to managed files: the volume keeps versions of regular "
                f"files only, and {resolved!r} is not managed); replace the link with a regular file to have its "
                "versions kept"
            )
        PermissionError.__init__(self, errno.EPERM, f"{link}: {what}")

    def __str__(self) -> str:
        return str(self.strerror)


class UnresolvedShellWrite(CoherenceError, PermissionError):
    """A shell command refused before it ran: it writes a file it names only when it runs (through
    a variable, a command substitution, the input of xargs, ...), in a place inside a volume, so
    which file cannot be checked. Nothing was changed."""

    def __init__(self, word: str, why: str, root: str | None, advice: str | None = None) -> None:
        """`root`: the volume the write may land in; None where the command names more paths than
        the hook looks at, so it may be any volume one of them lies in."""
        self.word, self.why, self.root = word, why, root
        where = (
            f"in the volume at {root}"
            if root is not None
            else "in any volume the paths it names may lie in (it names too many for the hook to look at all)"
        )
        super().__init__(
            errno.EACCES,
            f"coherent-volume refused this shell command: it writes a file named by `{word}` ({why}), which is "
            f"known only when the command runs, {where}, so the hook cannot check that the write "
            "loses no other session's change. "
            + (
                advice
                or "Name the file literally in the command (no variables, command substitutions, xargs or find "
                "-exec, and `cd` only to a literal directory), or make the change with your file-editing tool."
            ),
        )

    def __str__(self) -> str:
        return str(self.args[1])


class OutsideVolume(CoherenceError, ValueError):
    """A path that leaves the volume root, or names the registry's own directory."""


class InvalidPath(CoherenceError, ValueError):
    """A path the volume cannot hold: not valid UTF-8, or longer than the system allows."""

    errno = errno.EINVAL


class GlobError(CoherenceError, ValueError):
    """A malformed managed glob, a glob set that protects nothing, or a merge glob that no managed
    path can match."""


class VolumeConfigError(CoherenceError, ValueError):
    """The volume was opened with settings that contradict what it stores, or bad arguments."""


class OtherGlobs(VolumeConfigError):
    """A volume opened with managed globs other than those it was made with (they never change)."""

    def __init__(self, stored: Sequence[str], given: Sequence[str]) -> None:
        super().__init__(
            f"this volume manages {list(stored)}, not {list(given)}: a second policy is never applied (a volume's "
            "managed globs are set when it is made). Open it without managed globs (the API's `managed=`; the "
            "commands but `init` never take any) or with the stored ones (`init` with the same `--managed`)"
        )


class NestedVolume(VolumeConfigError):
    """A volume root inside another volume, or a new one around one: a file would be in two volumes,
    and a write checked by one would not be checked by the other (`core.open_core`)."""

    def __init__(self, root: str, other: str, *, around: bool = False, mounted_at: str | None = None) -> None:
        self.root, self.other = root, other
        where = f"contains the volume at {other}" if around else f"lies inside the volume at {other}"
        if mounted_at is not None:
            where = f"{'contains' if around else 'lies inside'} {mounted_at}, where the volume at {other} is mounted"
        remedy = (
            f"Make the volume elsewhere, or unmount {mounted_at} first."
            if around and mounted_at is not None
            else f"Make the volume elsewhere, or move the volume at {other} out of {root} first."
            if around
            else f"Work in that volume (with `--managed` globs covering these files), or make this one outside "
            f"{mounted_at}."
            if mounted_at is not None
            else f"Work in the volume at {other} (with `--managed` globs covering these files), or move {root} "
            f"out of it. A volume made here before is not opened while it is inside {other}: move it out, or, "
            f"if the volume at {other} was made around it by mistake, remove {other}/.coherent once nothing "
            "uses it (removing a `.coherent` directory drops that volume's versions and history)."
        )
        super().__init__(
            f"{root} {where}: volumes do not nest, since a file in both would be checked by one and not the "
            f"other, so writes through one could silently overwrite the other's. {remedy}"
        )


class NotManaged(CoherenceError, ValueError):
    """An operation that only makes sense on a managed path was given an unmanaged one."""


class RegistryError(CoherenceError):
    """The registry is missing, corrupt, of another schema version, full, busy past its timeout, or
    refused by the operating system (permission, a read-only file system, no descriptors).

    `errno` says which for callers that speak errno (the mount): EBUSY, ENOSPC, the operating
    system's (EPERM, EROFS, EMFILE, ...) or EIO."""

    def __init__(self, message: str, errno_: int = errno.EIO) -> None:
        super().__init__(message)
        self.errno = errno_


class CommitPending(RegistryError):
    """A change installed on disk whose record the registry did not take in time: the next
    operation's crash recovery records it as its writer's (unless the file changes first). The
    change was made: a face that answers with an errno answers success (the mount)."""


class RegistryLoginRefused(RegistryError):
    """The PostgreSQL server refused this process's login: its authentication failed (a wrong or
    missing password), or the role or the database the registry URL names does not exist or may not
    be used from this host. Never retried (the same login is refused again); nothing was written;
    the message names the cause and the remedy. errno is EIO, as for an unreachable registry (on a
    mount EACCES means a refusal of the protocol)."""


class InstallPending(CoherenceError, OSError):
    """A commit was recorded (its version and bytes are in the registry) but could not be put in
    place on disk: the next operation on the volume does that, or keeps what the file holds then
    as a version of its own. `version` is the recorded version; errno is the install's."""

    def __init__(self, path: str, version: int, cause: OSError) -> None:
        self.version = version
        OSError.__init__(
            self,
            cause.errno or errno.EIO,
            f"{path}: your change was committed as version {version} (its bytes are kept) but could not be put "
            f"in place ({cause.strerror or cause}); the next operation on this volume puts it in place, or, if it "
            f"still cannot or the file changes before that, keeps what the file holds then as a version of its own "
            f"and yours in history: do not write it again, see `coherent-volume log` of this path",
            path,
        )

    def __str__(self) -> str:
        return str(self.args[1])


class VersionGone(CoherenceError, LookupError):
    """A version whose bytes are not retained: it never existed, is a deletion, was pruned, or was
    never kept (the file changed again while it was recorded)."""


class TooManyLines(CoherenceError, ValueError):
    """Two versions too big to compare line by line: more changed lines than an alignment takes
    (`diffs.MAX_ALIGNED`), or for a diff a version larger than it reads (`diffs.MAX_DIFF_BYTES`). No
    line diff or merge of them is made (it would take seconds and gigabytes). `what` says which
    bound; the message adds how to compare them otherwise."""

    def __init__(self, what: str) -> None:
        show = "`coherent-volume show ROOT PATH --version N` writes each"
        super().__init__(f"{what}; compare the versions' bytes another way ({show})")
        self.what = what


class DamagedContent(CoherenceError):
    """Stored bytes of a version that no longer hash to its recorded hash: never served.

    errno is EIO."""

    errno = errno.EIO
