"""Managed globs: which paths of a volume the protocol protects.

Patterns are relative to the volume root, with `/` separators:
`**` as a whole segment matches any number of segments (zero included),
`*` and `?` match inside one segment, `[...]` is a character class (`[!...]` negates).
A file is managed when any pattern matches its whole relative path, unless its name is one the
volume gives content it stages for a commit (`STAGED`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import GlobError

STAGED = re.compile(r"\.cv-\d+-[0-9a-f]{8}\.tmp$")
"""The names of content a commit stages (`atomic._temp_name`): never a managed file, even where a
glob reaches (one left beside its target by a writer killed before its commit was recorded, where
the staging directory is on another file system, is no file of the volume)."""


def _segment_regex(segment: str, pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(segment):
        c = segment[i]
        if c == "*":
            if segment.startswith("**", i):
                raise GlobError(f"malformed glob {pattern!r}: '**' must be a whole path segment")
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
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
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = end
        elif c == "]":
            raise GlobError(f"malformed glob {pattern!r}: unmatched ']'")
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


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

    def matches(self, rel: str) -> bool:
        """True if the root-relative POSIX path `rel` is managed."""
        return self._regex.match(rel) is not None and STAGED.search(rel) is None  # type: ignore[attr-defined]
