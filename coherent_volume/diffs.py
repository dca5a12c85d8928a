"""Line diffs between versions, for people and models: pure functions, no I/O.

Text is UTF-8 without NUL bytes; anything else is binary and gets no line diff."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

MAX_LINES = 80
"""Lines of a diff shown in a refusal (`cut`); the rest is counted, not shown."""
MAX_LINE_CHARS = 240
"""Characters of one diff line shown in a refusal (`cut`): a minified file is one long line."""
MAX_INPUT_BYTES = 256 * 1024
"""Largest pair of versions a refusal diffs (`small_enough`): a line diff of big, much-changed
files can take seconds, which a refusal (or a hook's budget) must not wait for."""


def is_text(data: bytes) -> bool:
    if b"\0" in data:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def unified(old: bytes | None, new: bytes | None, old_label: str, new_label: str) -> str | None:
    """The unified diff from `old` to `new` (None: no such file, shown as /dev/null), or None when
    either side is binary. Empty when they are equal."""
    if (old is not None and not is_text(old)) or (new is not None and not is_text(new)):
        return None
    a = [] if old is None else old.decode("utf-8").splitlines(keepends=True)
    b = [] if new is None else new.decode("utf-8").splitlines(keepends=True)
    lines = difflib.unified_diff(
        a, b, "/dev/null" if old is None else old_label, "/dev/null" if new is None else new_label
    )
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)


def small_enough(old_size: int, new_size: int) -> bool:
    """Whether two versions are small enough to diff for a refusal (MAX_INPUT_BYTES together)."""
    return old_size + new_size <= MAX_INPUT_BYTES


def cut(diff: str, max_lines: int = MAX_LINES, max_line_chars: int = MAX_LINE_CHARS) -> str:
    """`diff` cut to `max_lines` lines of at most `max_line_chars` characters, saying how much was
    left out."""
    lines = diff.splitlines(keepends=True)
    shown = []
    for line in lines[:max_lines]:
        text = line.rstrip("\n")
        if len(text) > max_line_chars:
            line = f"{text[:max_line_chars]}... ({len(text) - max_line_chars} more characters)\n"
        shown.append(line)
    if len(lines) > max_lines:
        shown.append(f"... {len(lines) - max_lines} more lines of the diff not shown\n")
    return "".join(shown)


@dataclass(frozen=True)
class Conflict:
    """Lines both sides changed differently, at `line` (1-based) of the base."""

    line: int
    base: tuple[str, ...]
    ours: tuple[str, ...]
    theirs: tuple[str, ...]

    def __str__(self) -> str:
        def block(lines: tuple[str, ...]) -> str:
            return "".join(line if line.endswith("\n") else line + "\n" for line in lines)

        return (
            f"@@ base line {self.line} @@\n<<<<<<< yours\n{block(self.ours)}||||||| base\n{block(self.base)}"
            f"=======\n{block(self.theirs)}>>>>>>> current\n"
        )


def _sync_regions(base: list[str], ours: list[str], theirs: list[str]) -> list[tuple[int, int, int, int]]:
    """Runs of base lines that both sides kept unchanged: (base start, ours start, theirs start,
    length), in order, ending with an empty run at the three ends."""
    a = difflib.SequenceMatcher(None, base, ours, autojunk=False).get_matching_blocks()
    b = difflib.SequenceMatcher(None, base, theirs, autojunk=False).get_matching_blocks()
    regions = []
    i = j = 0
    while i < len(a) and j < len(b):
        a_base, a_ours, a_len = a[i]
        b_base, b_theirs, b_len = b[j]
        start, end = max(a_base, b_base), min(a_base + a_len, b_base + b_len)
        if start < end:
            regions.append((start, a_ours + start - a_base, b_theirs + start - b_base, end - start))
        if a_base + a_len < b_base + b_len:
            i += 1
        else:
            j += 1
    regions.append((len(base), len(ours), len(theirs), 0))
    return regions


def merge3(base: bytes, ours: bytes, theirs: bytes) -> tuple[bytes | None, list[Conflict]]:
    """Three-way line merge of text: (merged bytes, []) when no line was changed differently by
    both sides, else (None, the conflicting hunks). Binary input: (None, []). A side that left a
    region as the base had it takes the other side's change there; identical changes are taken once."""
    if not (is_text(base) and is_text(ours) and is_text(theirs)):
        return None, []
    b = base.decode("utf-8").splitlines(keepends=True)
    o = ours.decode("utf-8").splitlines(keepends=True)
    t = theirs.decode("utf-8").splitlines(keepends=True)
    merged: list[str] = []
    conflicts: list[Conflict] = []
    bi = oi = ti = 0
    for b_start, o_start, t_start, length in _sync_regions(b, o, t):
        b_chunk, o_chunk, t_chunk = b[bi:b_start], o[oi:o_start], t[ti:t_start]
        if o_chunk == t_chunk or t_chunk == b_chunk:
            merged += o_chunk
        elif o_chunk == b_chunk:
            merged += t_chunk
        else:
            conflicts.append(Conflict(bi + 1, tuple(b_chunk), tuple(o_chunk), tuple(t_chunk)))
        merged += b[b_start : b_start + length]
        bi, oi, ti = b_start + length, o_start + length, t_start + length
    if conflicts:
        return None, conflicts
    return "".join(merged).encode("utf-8"), []
