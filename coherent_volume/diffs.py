"""Line diffs between versions, for people and models: pure functions, no I/O.

Text is UTF-8 without NUL bytes; anything else is binary and gets no line diff."""

from __future__ import annotations

import difflib

MAX_LINES = 80
"""Lines of a diff shown in a refusal (`cut`); the rest is counted, not shown."""


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


def cut(diff: str, max_lines: int = MAX_LINES) -> str:
    """`diff` cut to `max_lines` lines, saying how many were left out."""
    lines = diff.splitlines(keepends=True)
    if len(lines) <= max_lines:
        return diff
    return "".join(lines[:max_lines]) + f"... {len(lines) - max_lines} more lines of the diff not shown\n"
