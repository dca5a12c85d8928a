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
from .hook_steps import Actor, Passed, acting, opened, when
from .hooks import Face
from .paths import shown
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
    roots = sorted(set(roots))
    with ExitStack() as stack:
        stale: list[tuple[VolumeCore, str, str, int, int, FileRecord | None]] = []
        for root in roots:
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
        several = len(roots) > 1  # the session works in several volumes: each file named with its volume
        for core, agent, path, seen, now, record in stale:
            mark = f"{agent}\n{core.paths.root}\n{path}"
            if marks.get(mark) == now:
                continue
            marks[mark] = now
            if len(entries) >= STALE_FILES_SHOWN:
                more += 1
                continue
            entry, diffed = _entry(core, agent, path, seen, now, record, face.seen, diff_chars < WARNING_CHARS, several)
            diff_chars += diffed
            entries.append(entry)
    if not entries:
        return None
    _save(marks_at, marks)
    tail = f"\n(and {more} more changed files you {face.seen})" if more else ""
    return (
        f"coherent-volume: files you {face.seen} have changed since. {face.reread} (a write built on what you "
        f"{face.seen} is refused):\n" + "\n".join(entries) + tail
    )


def _entry(
    core: VolumeCore,
    agent: str,
    path: str,
    seen: int,
    now: int,
    record: FileRecord | None,
    verb: str,
    with_diff: bool,
    absolute: bool = False,
) -> tuple[str, int]:
    """A warning's line for `path`, seen by `agent` at version `seen`, now `now` (`record`), with the
    diff between them where `with_diff` (bounded); and the characters of diff it shows. `verb`:
    what the model did with a version, in its tools' terms (`Face.seen`). `absolute`: the file is
    named by its absolute path (the session works in several volumes)."""
    what = "deleted" if record is not None and not record.present else f"now version {now}"
    writer = record.writer if record is not None else "unknown"
    at = when(record.committed_at if record is not None else None)
    name = shown(os.path.join(core.paths.root, path) if absolute else path)
    entry = f"- {name}: you last {verb} version {seen}; it is {what}, written by {writer} at {at}"
    if not with_diff:
        return entry, 0
    diff = core.refusal_diff(StaleWriteError(path, agent, "stale", seen, now, writer)).diff
    if not diff:
        return entry, 0
    changed = cut(diff, STALE_DIFF_LINES).rstrip()
    return f"{entry}; what changed:\n{changed}", len(changed)


def passed_warning(passed: Iterable[Passed], face: Face, *, goes_ahead: bool = True) -> str | None:
    """What to tell a model whose view a patch's partial confirmation moved over other writers'
    versions (`hook_steps.observe`'s `passed`: the patch fits the current version, but the model
    was not shown what else changed since it last saw the file), whether the patch `goes_ahead` or
    was denied for another reason; None if nothing."""
    entries = _passed_entries(passed, face.seen)
    if not entries:
        return None
    lead = (
        "your change fits the current content, so it goes ahead and keeps the changes below; but other writers "
        "made them"
        if goes_ahead
        else "your change fits the current content of the files below, so your view of them is now that content; "
        "but other writers changed them"
    )
    return (
        f"coherent-volume: {lead} after you last {face.seen} these files, and nothing showed them to you until now:\n"
        + "\n".join(entries)
        + f"\nBefore you write any of them whole: {face.reread}."
    )


def partly_read_warning(passed: Iterable[Passed], verb: str, reread: str) -> str | None:
    """What to tell a model shown only part of files whose views that read moved over other
    writers' versions (`hook_steps.observe`'s `passed`): their changes may lie in lines it was not
    shown, and a whole-file write built on what it knew would drop them; None if nothing. `verb`,
    `reread`: `Face.seen`, `Face.reread` (or a face's own words)."""
    entries = _passed_entries(passed, verb)
    if not entries:
        return None
    return (
        "coherent-volume: you were shown only part of these files, and other writers changed them after you last "
        f"{verb} them, maybe in lines you were not shown:\n"
        + "\n".join(entries)
        + f"\nBefore you write any of them whole: {reread}."
    )


def _passed_entries(passed: Iterable[Passed], verb: str) -> list[str]:
    """A warning's lines for views moved over other writers' versions (bounded: at most
    STALE_FILES_SHOWN files, with a count of the rest, their diffs as `stale_warning`'s). A volume
    that cannot answer is left out, as in `stale_warning`."""
    entries: list[str] = []
    diff_chars = 0
    passed = list(passed)
    with ExitStack() as stack:
        for p in passed[:STALE_FILES_SHOWN]:
            try:
                core = stack.enter_context(opened(p.root))
                with core.registry.read() as tx:
                    record = tx.file(p.rel)
                if record is not None:  # whose changes are news: not the agent's own
                    record = record._replace(writer=", ".join(p.writers))
                entry, shown = _entry(core, p.agent, p.rel, p.seen, p.now, record, verb, diff_chars < WARNING_CHARS)
            except (CoherenceError, OSError):
                continue
            diff_chars += shown
            entries.append(entry)
    more = len(passed) - STALE_FILES_SHOWN
    return entries + [f"(and {more} more such files)"] if entries and more > 0 else entries
