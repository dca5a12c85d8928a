"""What the harness records, and how workers write it down.

Every commit attempt becomes one `Attempt`: the agent, the target path, every read it made
(path, the token of the bytes it got), the token it wrote and the token it built on, the
outcome (`ok`, `refused`, `error`, `read-error`, or `unknown` for a writer killed mid-write)
with the refusal reason, the version the volume reported (when the face reports one), and
timestamps. Python workers append JSON lines (a `begin` line before the write call, an `end`
line after, so a write cut short by kill -9 stays visible); shell workers append plain lines.

Scenarios whose operations are not increments record them as well: `Append` (a line appended
by one process), `SlotWrite` (an in-place increment of a fixed-width field), `Move` (a rename or
exchange, with the content it carried), `Probe` (an attempt to get around the protocol, with
the outcome it must have) and `Hold` (a write grant as its holder saw it), written as JSON lines
by a `Journal`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import payload

COMMITTED = "ok"


@dataclass
class Read:
    """One read: `token` is None when the bytes were not a complete payload; `error` names a failed read."""

    path: str
    token: str | None = None
    prev: str | None = None
    count: int | None = None
    error: str | None = None

    @classmethod
    def of(cls, path: str, data: bytes | str | None, error: str | None = None) -> Read:
        p = payload.parse(data) if error is None else None
        return cls(path, p.token if p else None, p.prev if p else None, p.count if p else None, error)

    @property
    def torn(self) -> bool:
        return self.error is None and self.token is None


@dataclass
class Attempt:
    agent: str
    target: str
    token: str
    prev: str | None
    count: int
    reads: list[Read]
    t_read: float
    t_write0: float | None = None
    t_write1: float | None = None
    outcome: str = "unknown"
    reason: str | None = None
    version: int | None = None

    @property
    def committed(self) -> bool:
        return self.outcome == COMMITTED

    @property
    def reached_write(self) -> bool:
        return self.t_write0 is not None


@dataclass
class Producer:
    """Content put in place by the harness itself: the seed of a file, or a foreign write."""

    kind: str  # "seed" | "foreign"
    path: str
    token: str
    count: int
    version: int | None
    t: float
    agent: str | None = None
    """The agent that wrote a seed through the volume (foreign writes have none)."""


@dataclass
class Move:
    """A rename or RENAME_EXCHANGE through the mount of a file or a whole directory.

    `files` lists every regular file it moves: [from, to, token], the token being what the mover
    read at `from` just before (so its view was current), None for a file it could not read."""

    agent: str
    op: str  # "rename" | "exchange"
    src: str
    dst: str
    files: list[list[str | None]]
    t0: float
    t1: float | None = None
    outcome: str = "unknown"  # "ok" | "refused" | "error"
    reason: str | None = None
    before: list[str] = field(default_factory=list)
    """Regular files under both names just before (backing directory), to show a refusal moved nothing."""
    after: list[str] = field(default_factory=list)
    """The same just after."""
    versions: dict[str, int] = field(default_factory=dict)
    """path -> the version this move made there, attached from the volume's log (managed paths only)."""

    @property
    def committed(self) -> bool:
        return self.outcome == COMMITTED


@dataclass
class StoredVersion:
    """One row of the registry's `versions` table, with what the content store holds for it, as
    the harness found it reading the object file itself: `state` is "ok" (the bytes are there and
    hash to the row's hash), "missing", "damaged" (they hash to something else), "none" (the row
    has no hash: a deletion) or "pruned" (the retention policy let its bytes go; not read). `read`
    is the stored bytes as a payload (None when there are none)."""

    path: str
    version: int
    kind: str
    writer: str
    hash: str | None
    state: str
    read: Read | None = None


@dataclass
class StoreAudit:
    """The content store at the end of a run, read straight from the registry file and the object
    files: every version of every path, the registry's current record of each path (version, hash),
    the hash of each judged path's bytes on disk (None: no file); and what nothing refers to (no
    loss, but space nothing reclaims): temporary object files and objects no version names, which
    writers killed while storing or before their install leave behind."""

    versions: dict[str, dict[int, StoredVersion]] = field(default_factory=dict)
    current: dict[str, tuple[int, str | None]] = field(default_factory=dict)
    disk: dict[str, str | None] = field(default_factory=dict)
    temp_files: int = 0
    unnamed_objects: int = 0


@dataclass
class History:
    """Everything the checker gets: records, the final files, and the volume's own log (as data)."""

    isolation: str  # "file" | "read-set"
    versioned: bool  # False for a plain directory: no versions exist
    producers: list[Producer] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    samples: set[tuple[str, str | None]] = field(default_factory=set)
    final: dict[str, Read] = field(default_factory=dict)
    final_versions: dict[str, int] = field(default_factory=dict)
    log: dict[str, dict[int, tuple[str, str]]] = field(default_factory=dict)
    """path -> version -> (kind, agent) of every version the volume's log says it made."""
    moves: list[Move] = field(default_factory=list)
    """Renames and exchanges (their content moves between paths; see checker.check_moves)."""
    managed: tuple[str, ...] = ()
    """Prefixes of the managed paths, for check_moves (moves also pass through unmanaged names)."""
    refusals: list[tuple[str, str, float]] = field(default_factory=list)
    """(agent, path, time) of every refusal the volume's log records."""
    store: StoreAudit | None = None
    """The content store as audited at the end (None: not audited, e.g. a plain directory)."""


@dataclass
class Append:
    """One line appended by one process (`writer`) of `agent`: `token` is the whole line."""

    writer: str
    agent: str
    token: str
    seq: int
    t0: float
    t1: float | None
    outcome: str  # "ok" | "refused" | "error"
    reason: str | None = None


@dataclass
class SlotWrite:
    """One in-place increment of a fixed-width slot of a shared file: `read` is the value the
    write handle read at the slot, `wrote` what it wrote there (None where it never got so far)."""

    slot: str
    agent: str
    seq: int
    read: int | None
    wrote: int | None
    t0: float
    t1: float | None
    outcome: str  # "ok" | "refused" | "error"
    reason: str | None = None


@dataclass
class Probe:
    """One attempt to get around the protocol (a link, a symlink, a write through one): `expected`
    is the outcome it must have (an errno name, or the exception class; alternatives separated by
    `|`), `got` the one it had."""

    name: str
    agent: str
    expected: str
    got: str
    t: float
    detail: str = ""

    @property
    def held(self) -> bool:
        return self.got in self.expected.split("|")


@dataclass
class Hold:
    """A write grant as its holder saw it: taken at `start`, released at `end` (None: its holder was
    killed while holding it), ending at `expires_at` at the latest."""

    agent: str
    path: str
    start: float
    end: float | None
    expires_at: float
    where: str = ""


class Journal:
    """JSON lines of dataclass records (Move, SlotWrite, …), one write(2) each, so a kill -9 cannot cut one."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def put(self, record: object) -> None:
        line = json.dumps({"type": type(record).__name__, **asdict(record)}, separators=(",", ":"))  # type: ignore[call-overload]
        os.write(self._fd, (line + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


JOURNAL_TYPES = {cls.__name__: cls for cls in (Move, SlotWrite, Append, Probe, Hold)}


def load_journal(path: str | os.PathLike[str]) -> list[object]:
    """The records a Journal wrote (a line cut short by a full disk is skipped)."""
    out: list[object] = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        out.append(JOURNAL_TYPES[record.pop("type")](**record))
    return out


def load_append_records(path: str | os.PathLike[str], agent: str) -> list[Append]:
    """Appends from an appender's lines: `A writer token seq rc t0 t1 message…` (see same_agent.APPENDER)."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind != "A":
            continue
        writer, token, seq, rc, t0, t1, message = (rest.split(" ", 6) + [""])[:7]
        outcome, reason = (
            ("ok", None)
            if rc == "0"
            else (("refused", "EACCES") if shell_error(message) == "EACCES" else ("error", shell_error(message)))
        )
        out.append(Append(writer, agent, token, int(seq), float(t0), float(t1), outcome, reason))
    return out


class Recorder:
    """Appends one worker's attempts to a JSON-lines file; each line is one write(2), so it survives kill -9."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def _line(self, record: dict[str, object]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())

    def begin(self, attempt: Attempt) -> None:
        record = asdict(attempt)
        for key in ("t_write1", "outcome", "reason", "version"):
            record.pop(key)
        self._line({"op": "begin", **record})

    def end(self, attempt: Attempt) -> None:
        self._line(
            {
                "op": "end",
                "token": attempt.token,
                "t_write1": attempt.t_write1,
                "outcome": attempt.outcome,
                "reason": attempt.reason,
                "version": attempt.version,
            }
        )

    def done(self, attempt: Attempt) -> None:
        """An attempt that never reached its write (a failed read or lock)."""
        self._line({"op": "done", **asdict(attempt)})

    def close(self) -> None:
        os.close(self._fd)


def _attempt(record: dict) -> Attempt:
    reads = [Read(**r) for r in record.pop("reads")]
    record.pop("op", None)
    return Attempt(reads=reads, **record)


def load_json_records(path: str | os.PathLike[str]) -> list[Attempt]:
    """Attempts from a Recorder file; a `begin` without its `end` stays `unknown`."""
    attempts: dict[str, Attempt] = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a full disk; kill -9 cannot cut a single write(2)
        if record["op"] in ("begin", "done"):
            attempt = _attempt(record)
            attempts[attempt.token] = attempt
        elif record["op"] == "end" and record["token"] in attempts:
            a = attempts[record["token"]]
            a.t_write1, a.outcome, a.reason, a.version = (
                record["t_write1"],
                record["outcome"],
                record["reason"],
                record["version"],
            )
    return list(attempts.values())


SHELL_ERRORS = {
    "Permission denied": "EACCES",
    "Transport endpoint is not connected": "ENOTCONN",
    "Software caused connection abort": "ECONNABORTED",
    "No space left on device": "ENOSPC",
    "No such file or directory": "ENOENT",
    "Is a directory": "EISDIR",
    "Not a directory": "ENOTDIR",
    "Operation not permitted": "EPERM",
    "Input/output error": "EIO",
    "Device or resource busy": "EBUSY",
    "Stale file handle": "ESTALE",
    "Interrupted system call": "EINTR",
    "Invalid argument": "EINVAL",
    "Resource temporarily unavailable": "EAGAIN",
    "Bad file descriptor": "EBADF",
}


def shell_error(message: str) -> str:
    """errno name for the message a shell or coreutils printed."""
    for text, name in SHELL_ERRORS.items():
        if text in message:
            return name
    return f"EOTHER ({message.strip()[:80]})" if message.strip() else "EUNKNOWN"


def load_shell_records(path: str | os.PathLike[str], agent: str) -> list[Attempt]:
    """Attempts from a shell worker's lines: `R path rc|F line…`, `W target token prev count t_read t_write0`,
    `E rc t_write1 message…` (see shell_agent.sh)."""
    attempts: list[Attempt] = []
    reads: list[Read] = []
    current: Attempt | None = None
    for line in Path(path).read_text(errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "R":
            rpath, rc, raw = (rest.split(" ", 2) + ["", ""])[:3]
            if rc == "F":  # the open failed (dead mount, missing file)
                reads.append(Read(rpath, error="read-failed"))
            else:  # read(1) fails on a last line without newline: that content is torn
                reads.append(Read.of(rpath, raw + "\n" if rc == "0" else raw))
        elif kind == "W":
            target, token, prev, count, t_read, t0 = rest.split(" ")[:6]
            current = Attempt(agent, target, token, prev, int(count), reads, float(t_read), float(t0))
            attempts.append(current)
            reads = []
        elif kind == "X":  # an attempt whose target read failed: no write was made
            target, t_read = rest.split(" ")[:2]
            attempts.append(
                Attempt(
                    agent,
                    target,
                    f"{agent}.x{len(attempts)}",
                    None,
                    0,
                    reads,
                    float(t_read),
                    outcome="read-error",
                    reason="read-failed",
                )
            )
            reads = []
        elif kind == "E" and current is not None:
            rc, t1, message = (rest.split(" ", 2) + [""])[:3]
            current.t_write1 = float(t1)
            current.outcome, current.reason = (
                ("ok", None)
                if rc == "0"
                else (("refused", "EACCES") if shell_error(message) == "EACCES" else ("error", shell_error(message)))
            )
            current = None
    return attempts
