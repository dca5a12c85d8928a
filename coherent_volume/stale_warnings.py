"""Telling a model which files it saw have changed since: each file, the version it saw, the
current one, who wrote it when, and what changed (bounded).

Invariants: a warning never takes the commit lock and never delays a decision (faces add it to an
answer already decided, `hooks.WARN_BUDGET`); it is cheap when nothing is stale (two registry
reads per volume: the agent the session acts as there, its stale views); changes made outside
the volume's faces count once the volume has noticed them. A face that warns once
(`Face.warn_once`) tells each stale view once per current version: the session's marks live in a
file only this user may use, removed when the session ends (`forget`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

from .core import VolumeCore
from .diffs import cut
from .errors import CoherenceError, StaleWriteError
from .hook_paths import session_file
from .hook_steps import Actor, acting, opened, when
from .hooks import Face
from .protocol import FileRecord

STALE_FILES_SHOWN = 5
STALE_DIFF_LINES = 30
WARNING_CHARS = 6000
"""Bounds of a warning: files listed, lines of diff per file, and characters of diff in all (past
them files are listed without their diff). Claude Code keeps 10,000 characters of a hook's output."""


def _load(path: Path | None) -> dict[str, int]:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(path: Path | None, marks: dict[str, int]) -> None:
    if path is None:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(marks))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a warning may be repeated; nothing else depends on it


def forget(session: str) -> None:
    """Drop the marks of what `session`'s agents were told (the session ended)."""
    marks = session_file("warned", session)
    if marks is not None:
        marks.unlink(missing_ok=True)


def stale_warning(actor: Actor, roots: Iterable[str], face: Face, session: str | None = None) -> str | None:
    """What to tell the model of files `actor.agent` saw in the volumes at `roots` that have changed
    since (in each volume, the agent it acts as there: `hook_steps.acting`); None if there is
    nothing (or, with `face.warn_once`, nothing it was not already told: marks are kept per
    `session`, by default the agent). A volume that cannot answer is left out."""
    with ExitStack() as stack:
        stale: list[tuple[VolumeCore, str, str, int, int, FileRecord | None]] = []
        for root in sorted(roots):
            try:
                core = stack.enter_context(opened(root))
                agent = acting(core, actor).agent
                with core.registry.read() as tx:
                    stale += [(core, agent, p, seen, now, tx.file(p)) for p, seen, now in tx.stale_views(agent)]
            except (CoherenceError, OSError):
                continue  # a warning is a courtesy
        if not stale:
            return None
        marks_at = session_file("warned", session or actor.agent) if face.warn_once else None
        marks = _load(marks_at)
        entries: list[str] = []
        diff_chars = more = 0
        for core, agent, path, seen, now, record in stale:
            mark = f"{agent}\n{core.paths.root}\n{path}"
            if marks.get(mark) == now:
                continue
            marks[mark] = now
            if len(entries) >= STALE_FILES_SHOWN:
                more += 1
                continue
            what = "deleted" if record is not None and not record.present else f"now version {now}"
            writer = record.writer if record is not None else "unknown"
            at = when(record.committed_at if record is not None else None)
            entry = f"- {path}: you last {face.seen} version {seen}; it is {what}, written by {writer} at {at}"
            if diff_chars < WARNING_CHARS:
                diff = core.refusal_diff(StaleWriteError(path, agent, "stale", seen, now, writer)).diff
                if diff:
                    shown = cut(diff, STALE_DIFF_LINES).rstrip()
                    diff_chars += len(shown)
                    entry += f"; what changed:\n{shown}"
            entries.append(entry)
    if not entries:
        return None
    _save(marks_at, marks)
    tail = f"\n(and {more} more changed files you {face.seen})" if more else ""
    return (
        f"coherent-volume: files you {face.seen} have changed since. {face.reread} (a write built on what you "
        f"{face.seen} is refused):\n" + "\n".join(entries) + tail
    )
