"""Managed globs: which paths of a volume the protocol protects.

Patterns are relative to the volume root, with `/` separators:
`**` as a whole segment matches any number of segments (zero included),
`*` and `?` match inside one segment, `[...]` is a character class (`[!...]` negates).
A file is managed when any pattern matches its whole relative path, unless its name is one the
volume gives content it stages for a commit (`STAGED`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from .errors import GlobError

STAGED = re.compile(r"\.cv-\d+-[0-9a-f]{8}\.tmp$")
"""The names of content a commit stages (`atomic._temp_name`): never a managed file, even where a
glob reaches (one left beside its target by a writer killed before its commit was recorded, where
the staging directory is on another file system, is no file of the volume)."""


_ANY_RUN = "[^/]*"
"""The regex of `*` in a segment (`_segment_tokens`)."""


def _segment_tokens(segment: str, pattern: str) -> list[tuple[str, str | None]]:
    """The parts of one glob segment, in order, each as (its regex, the character it stands for if
    it is a plain one): `*` is `_ANY_RUN`, `?` and `[...]` match one character. GlobError if the
    segment is malformed."""
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            if segment.startswith("**", i):
                raise GlobError(f"malformed glob {pattern!r}: '**' must be a whole path segment")
            out.append((_ANY_RUN, None))
        elif c == "?":
            out.append(("[^/]", None))
        elif c == "[":
            end = segment.find("]", i + 2 if segment.startswith("[!", i) or segment.startswith("[]", i) else i + 1)
            if end < 0:
                raise GlobError(f"malformed glob {pattern!r}: unclosed '['")
            body = segment[i + 1 : end]
            negate = body.startswith("!")
            if negate:
                body = body[1:]
            if not body:
                raise GlobError(f"malformed glob {pattern!r}: empty character class")
            body = body.replace("\\", "\\\\").replace("^", "\\^").replace("[", "\\[")
            out.append((f"[^/{body}]" if negate else f"[{body}]", None))
            i = end
        elif c == "]":
            raise GlobError(f"malformed glob {pattern!r}: unmatched ']'")
        else:
            out.append((re.escape(c), c))
        i += 1
    return out


def _segment_regex(segment: str, pattern: str) -> str:
    return "".join(regex for regex, _ in _segment_tokens(segment, pattern))


def compile_glob(pattern: str) -> str:
    """Return a regex (without anchors) for one glob; raise GlobError if it is malformed."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise GlobError(f"malformed glob {pattern!r}: empty pattern")
    if "\0" in pattern or "\\" in pattern:
        raise GlobError(f"malformed glob {pattern!r}: NUL and backslash are not allowed")
    if pattern.startswith("/"):
        raise GlobError(f"malformed glob {pattern!r}: patterns are relative to the volume root")
    segments = pattern.split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise GlobError(f"malformed glob {pattern!r}: empty, '.' or '..' path segment")
    parts: list[str] = []
    for index, seg in enumerate(segments):
        last = index == len(segments) - 1
        if seg == "**":
            # '**' at the end matches one or more segments; elsewhere zero or more.
            parts.append(".+" if last else "(?:[^/]+/)*")
        else:
            parts.append(_segment_regex(seg, pattern) + ("" if last else "/"))
    return "".join(parts)


def _pattern_reaches(pattern: tuple[re.Pattern[str] | None, ...], parts: list[str]) -> bool:
    """Whether a path strictly under the directory `parts` can match `pattern` (its segments; None is `**`)."""
    for index, part in enumerate(parts):
        if index == len(pattern):
            return False
        segment = pattern[index]
        if segment is None:  # '**' absorbs the rest of the directory, and the pattern's tail fits below it
            return True
        if not segment.match(part):
            return False
    return len(pattern) > len(parts)


Part = tuple[str, str | None]
"""One part of a glob segment (`_segment_tokens`): its regex, and the character it stands for if it
is a plain one."""

T = TypeVar("T")


def _parsed(pattern: str) -> list[list[Part] | None]:
    """A valid glob as its segments' parts, None for `**` (zero or more segments). A `**` that ends
    the glob matches one or more segments: it is a `*` segment, then a `**`."""
    parsed: list[list[Part] | None] = [
        None if seg == "**" else _segment_tokens(seg, pattern) for seg in pattern.split("/")
    ]
    if parsed[-1] is None:
        parsed[-1:] = [[(_ANY_RUN, None)], None]
    return parsed


def _may_meet(a: Sequence[T], b: Sequence[T], many: Callable[[T], bool], meet: Callable[[T, T], bool]) -> bool:
    """Whether the sequences of parts `a` and `b` may match one same sequence of items: a part that
    is `many` matches any number of items (none included), any other one item, one that `meet` says
    both may match. Explores every way the two can advance together (at most len(a) x len(b)
    states)."""
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j = state
        if i == len(a) and j == len(b):
            return True
        a_many, b_many = i < len(a) and many(a[i]), j < len(b) and many(b[j])
        if a_many:
            todo.append((i + 1, j))  # it matches no more items
        if b_many:
            todo.append((i, j + 1))
        if i < len(a) and j < len(b):  # both match the next item
            if a_many and not b_many:
                todo.append((i, j + 1))
            elif b_many and not a_many:
                todo.append((i + 1, j))
            elif not a_many and meet(a[i], b[j]):
                todo.append((i + 1, j + 1))
    return False


def _chars_may_meet(a: Part, b: Part) -> bool:
    """Whether two one-character parts may match the same character: a plain character must match
    the other part; two classes (or `?`) are taken to share one."""
    if a[1] is not None:
        return re.fullmatch(b[0], a[1], re.DOTALL) is not None
    if b[1] is not None:
        return re.fullmatch(a[0], b[1], re.DOTALL) is not None
    return True


def _segments_may_meet(a: list[Part] | None, b: list[Part] | None) -> bool:
    """Whether two segments that are not `**` (None) may match the same name."""
    assert a is not None and b is not None
    return _may_meet(a, b, lambda part: part[0] == _ANY_RUN, _chars_may_meet)


def _may_hold_slash(parsed: list[list[Part] | None]) -> bool:
    """Whether a character class of the glob matches '/' (a range such as `[%-0]`): its regex then
    matches across segments, so a comparison segment by segment would not hold."""
    return any(
        part[1] is None and part[0] != _ANY_RUN and re.fullmatch(part[0], "/") is not None
        for segment in parsed
        if segment is not None
        for part in segment
    )


@dataclass(frozen=True)
class ManagedGlobs:
    """An immutable, validated set of managed globs (order and duplicates do not matter)."""

    patterns: tuple[str, ...]

    @classmethod
    def of(cls, patterns: object) -> ManagedGlobs:
        if isinstance(patterns, str):
            patterns = (patterns,)
        if not isinstance(patterns, Iterable):
            raise GlobError(f"managed globs must be a list of strings, not {patterns!r}")
        items: list[str] = []
        for p in patterns:
            if not isinstance(p, str):
                raise GlobError(f"malformed glob {p!r}: a glob is a string")
            try:
                re.compile(compile_glob(p))
            except re.error as e:
                raise GlobError(f"malformed glob {p!r}: {e}") from None
            items.append(p)
        if not items:
            raise GlobError("a volume needs at least one managed glob: with none it would protect nothing")
        return cls(tuple(sorted(set(items))))

    def __post_init__(self) -> None:
        regex = "|".join(f"(?:{compile_glob(p)})" for p in self.patterns)
        object.__setattr__(self, "_regex", re.compile(f"(?:{regex})\\Z", re.DOTALL))
        segments = tuple(
            tuple(
                None if seg == "**" else re.compile(_segment_regex(seg, p) + "\\Z", re.DOTALL) for seg in p.split("/")
            )
            for p in self.patterns
        )
        object.__setattr__(self, "_segments", segments)

    def reaches(self, directory: str) -> bool:
        """True if some path strictly under the root-relative `directory` ("" is the root) could match a
        managed glob, exactly as `matches` decides (case-sensitive). When False, no file however deep in
        that directory's tree is managed: renaming, deleting or not watching it cannot touch a managed file."""
        parts = directory.split("/") if directory else []
        return any(_pattern_reaches(pattern, parts) for pattern in self._segments)  # type: ignore[attr-defined]

    def may_share(self, pattern: str) -> bool:
        """Whether some path that the valid glob `pattern` matches may be managed (case-sensitive,
        as `matches`); False only where none can be. Decided conservatively: two character classes
        (or `?`) are taken to share a character, and a glob with a class that may match '/' to share
        a path with any."""
        other = _parsed(pattern)
        for managed in self.patterns:
            parsed = _parsed(managed)
            if _may_hold_slash(parsed) or _may_hold_slash(other):
                return True
            if _may_meet(parsed, other, lambda segment: segment is None, _segments_may_meet):
                return True
        return False

    def matches(self, rel: str) -> bool:
        """True if the root-relative POSIX path `rel` is managed."""
        return self._regex.match(rel) is not None and STAGED.search(rel) is None  # type: ignore[attr-defined]
