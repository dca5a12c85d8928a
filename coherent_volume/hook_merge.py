"""Merging a hooked agent's stale write of a merge-glob file, the same for every agent face.

A face reads its tool's input as a `Change` (whole content, string edits or a patch, as a
function of the text it applies to) and says whether its agent writes without asking the user;
everything else is decided here: when a refusal may be merged (`protocol.may_merge`, only
`stale`, only a path the volume's merge globs name), the merge (base = the version the agent
saw, ours = its change applied to that, theirs = the current version; `diffs.merge3`), its
checks, its commit and what the model is told.

Invariants: whatever happens the tool is denied, so it never writes over a merge. A clean merge
is committed by the hook only where the agent writes without asking (else that would skip the
user's approval: the model is shown the merge instead), as a `merge` version whose parents are
the base and the current version, which leaves the agent's view where it was (its model never
saw the other change). Overlapping changes, a change that does not apply, binary, unretained or
too large content: denied as stale, saying why. Nothing is committed but the merge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import diffs, hooks
from .core import VolumeCore
from .core.history import Refused
from .core.sessions import Made
from .errors import CoherenceError, MergeConflict, StaleWriteError, TooManyLines
from .hook_steps import denial_text, denied, exactly
from .hooks import Answer, Face, Progress
from .paths import Target, shown
from .protocol import may_merge


@dataclass(frozen=True)
class Change:
    """What a write tool would do to the file, read from its input by the agent's face."""

    apply: Callable[[str], str | None]
    """The file's text after the change is made to `text`; None where it does not apply."""
    rebased: bool
    """The tool itself would make the change to whatever the file holds when it runs (a string
    edit): then a merge is committed only if it is exactly that."""
    name: str = "your change"
    misfit: str = ""
    """Why the change may not apply to a text, as a clause ("its old_string is missing there")."""


def made(change: Change | str) -> Made | None:
    """What a write tool's change makes of a file (`hook_steps.end_writes`), where its input names one."""
    return exactly(change.apply) if isinstance(change, Change) else None


def whole(content: str) -> Change:
    """A write of the whole content."""
    return Change(lambda _text: content, rebased=False)


def replaced(text: str, old: str, new: str, count: int | None) -> str | None:
    """`text` with every occurrence of `old` replaced by `new`: there must be exactly `count` of
    them (None: at least one). None if not (an empty `old` never applies)."""
    found = text.count(old) if old else 0
    if found == 0 or (count is not None and found != count):
        return None
    return text.replace(old, new)


def answer(
    core: VolumeCore,
    target: Target,
    agent: str,
    refusal: StaleWriteError,
    progress: Progress,
    face: Face,
    change: Change | str,
    asks: str | None,
) -> Answer:
    """The answer to a refused write check of a tool whose change may be merged: `change` (or why
    the tool's input names none that can be), `asks` None where the agent writes without asking,
    else the sentence saying why the hook does not commit the merge itself. Merged where the
    volume's merge globs name the path and the refusal allows it (`protocol.may_merge`), else
    denied as the refusal says."""
    if refusal.seen_version is None or not may_merge(refusal.reason, core.policy().merges(target.rel)):
        return denied(core, refusal, progress, face)
    return _merge(core, target, agent, refusal, progress, face, change, asks)


_UNDER_WAY = (
    "coherent-volume was merging your change with the current version when its time ran out, so your "
    "change may be in the file now. Check before you redo it.\n"
)


@dataclass(frozen=True)
class _Plan:
    """A change merged onto the current version: the merged content, or why there is none."""

    merged: bytes | None = None
    current: bytes = b""
    conflicts: tuple[diffs.Conflict, ...] = ()
    why: str = ""


def _merge(
    core: VolumeCore,
    target: Target,
    agent: str,
    refusal: StaleWriteError,
    progress: Progress,
    face: Face,
    change: Change | str,
    asks: str | None,
) -> Answer:
    """Merge, then commit (`asks` None) or show the merge; the tool is denied either way. Until
    the answer is known the decided fallback is the stale denial, and while a commit is under way
    one that says the change may be in the file."""
    progress.decide(face.deny(denial_text(core, refusal, face), refusal.path), hooks.HOOK_BUDGET)

    def merge_onto(save: Refused, base: int | None) -> Answer | Refused:
        """One round of `VolumeCore.merge_rounds`: merge the change onto the version `save`'s
        refusal names current, from the version the session saw (`base`), and commit or show it."""
        refusal = save.refusal
        found = _plan(core, target, refusal, base or 0, change)
        if found.conflicts:  # logged as the API's merge logs one, so `why` shows its hunks
            core.log_conflict(MergeConflict(refusal, list(found.conflicts), base or 0))
        if found.merged is None:
            return denied(core, refusal, progress, face, _unmerged_note(refusal, found))
        if asks is not None:
            now = f"{target.rel}@v{refusal.current_version}"
            try:
                preview = diffs.unified(found.current, found.merged, now, f"{target.rel} with your change")
            except TooManyLines:
                preview = None
            return face.deny(denial_text(core, refusal, face, _preview_note(refusal, asks, preview)), refusal.path)
        progress.decided = face.deny(denial_text(core, refusal, face, _UNDER_WAY), refusal.path)
        try:
            version = core.commit(
                agent,
                target,
                found.merged,
                expected=refusal.current_version,
                made=("merge", (base or 0, refusal.current_version)),
            )
        except StaleWriteError as again:
            return Refused(again, None)  # merged again onto what landed since, if it may be
        return face.deny(_merged_text(core, refusal, version, face), refusal.path)

    try:
        return core.merge_rounds(Refused(refusal, None), merge_onto)
    except StaleWriteError as refused:  # not merged: the last round's refusal
        return denied(
            core, refused, progress, face, f"It was not merged: {refused.unmerged}.\n" if refused.unmerged else ""
        )


def _plan(core: VolumeCore, target: Target, refusal: StaleWriteError, base_version: int, change: Change | str) -> _Plan:
    """The three-way merge of the change made to the version the agent saw (base) with the
    current version; for a `rebased` change only if that is exactly the change made to the current
    content (else the tool's own way of applying it would give something else)."""
    if isinstance(change, str):
        return _Plan(why=change)
    current_version = refusal.current_version
    try:
        with core.reading_sides(target, refusal):  # theirs overtaken and pruned: a round onto the current one
            base = b"" if base_version == 0 else core.read_version(target, base_version)
            current = core.read_version(target, current_version)
    except CoherenceError as e:
        return _Plan(why=str(e))
    if not diffs.small_enough(len(base), len(current)):
        return _Plan(why="the file is too large to merge within the hook's time")
    if not (diffs.is_text(base) and diffs.is_text(current)):
        return _Plan(why="binary content is never merged")
    mine = change.apply(base.decode("utf-8"))
    on_current = change.apply(current.decode("utf-8")) if change.rebased else None
    if mine is None or (change.rebased and on_current is None):
        which = "the version you read" if mine is None else "the current content"
        return _Plan(why=f"{change.name} does not apply to {which} ({change.misfit})")
    ours = mine.encode("utf-8", "surrogatepass")
    if not diffs.small_enough(len(base), len(ours)):
        return _Plan(why="the file is too large to merge within the hook's time")
    try:
        merged, conflicts = diffs.merge3(base, ours, current)
    except TooManyLines as e:
        return _Plan(why=e.what)
    if conflicts:
        return _Plan(current=current, conflicts=tuple(conflicts))
    if merged is None:
        return _Plan(why="binary content is never merged")
    if on_current is not None and merged != on_current.encode("utf-8", "surrogatepass"):
        return _Plan(why=f"applied to the current content, {change.name} would not give the merge of both changes")
    return _Plan(merged, current)


def _unmerged_note(refusal: StaleWriteError, found: _Plan) -> str:
    if found.conflicts:
        hunks = diffs.cut("".join(str(c) for c in found.conflicts)).rstrip()
        return (
            f"Your change and version {refusal.current_version} changed the same lines ({len(found.conflicts)} "
            f"conflicting hunk(s)), so coherent-volume did not merge them:\n{hunks}\n"
        )
    return f"It was not merged: {found.why}.\n"


def _preview_note(refusal: StaleWriteError, asks: str, preview: str | None) -> str:
    shown = diffs.cut(preview).rstrip() if preview else "(no change to the current content)"
    return (
        f"Your change merges cleanly with version {refusal.current_version}: the two changes touch different "
        f"lines. {asks} Applied to the current content, your change is:\n{shown}\n"
    )


def _merged_text(core: VolumeCore, refusal: StaleWriteError, version: int, face: Face) -> str:
    """What the model is told after the hook committed its merged change as `version`."""
    base, current = refusal.seen_version or 0, refusal.current_version
    if version == current:
        done = f"the current version {current} already holds your change, so there was nothing to write"
    else:
        done = f"coherent-volume merged your change into it and committed the result as version {version}"
    theirs = core.refusal_diff(StaleWriteError(refusal.path, refusal.agent, "stale", base, current, None)).diff
    changes = (
        f"\nWhat changed between the version you {face.seen} and version {current} (unified diff):\n{theirs.rstrip()}"
        if theirs
        else ""
    )
    return (
        f"coherent-volume: {shown(refusal.path)} changed since you {face.seen} it (you last {face.seen} "
        f"version {base}; "
        f"version {current} is by {refusal.last_writer}), and {done}. Both changes are kept: they touch different "
        f"lines and {shown(refusal.path)} is a file this volume merges. The tool did not run, because the "
        "write is already "
        f"done: do not repeat it. {face.reread_one}.{changes}"
    )
