"""Managed globs: which paths of a volume the protocol protects.

Patterns are relative to the volume root, with `/` separators:
`**` as a whole segment matches any number of segments (zero included),
`*` and `?` match inside one segment, `[...]` is a character class (`[!...]` negates).
A file is managed when any pattern matches its whole relative path, unless its name is one the
volume gives content it stages for a commit (`STAGED`).

`ManagedGlobs.may_match` answers the same question for every path of a *shape* at once (a path
whose parts are known only as wildcards, such as the file a shell command names through an
expansion): False only when no path the shape can spell is managed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from .errors import GlobError

REGISTRY_DIR = ".coherent"
"""The name of a volume's registry directory (in its root). A path with a segment of that name is
never managed, even where a glob reaches: this volume's registry, or another volume's below its
root (bind-mounted there, as a container runtime may), whose files a commit here would replace."""

STAGED = re.compile(r"\.cv-\d+-[0-9a-f]{8}\.tmp(?:$|/)")
"""The names of content a commit stages and of files set aside (`atomic.temp_name`): never a
managed file, nor anything below one (a directory a program made at a rename's source, stranded
there when the rename could not put it back), even where a glob reaches (one left beside its
target by a writer killed before its commit was recorded, where the staging directory is on
another file system, is no file of the volume)."""


_ANY_RUN = "[^/]*"
"""The regex of `*` in a segment (`_segment_tokens`)."""


class Wild(enum.Enum):
    """A part of a shape (`ManagedGlobs.may_match`) known only as a wildcard."""

    NAME = "any characters but '/', none included"
    NUMBER = "one or more digits and '-' (an integer)"
    LETTERS = "one or more lowercase ASCII letters"
    DIRS = "a whole segment standing for any number of directories' names, none included"
    PATH = "any text, '/' and '..' included: any path at all"


Piece = str | Wild
"""A part of a shape: literal text (where `/` separates segments) or a wildcard."""


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


S = TypeVar("S", bound=Hashable)


def _walk(start: S, end: Callable[[S], bool], moves: Callable[[S], Iterable[S]]) -> bool:
    """Whether a walk from `start`, taking `moves` from each state (each state visited once),
    reaches a state `end` accepts: how every pair of patterns below is searched."""
    seen: set[S] = set()
    todo = [start]
    while todo:
        state = todo.pop()
        if state in seen:
            continue
        seen.add(state)
        if end(state):
            return True
        todo.extend(moves(state))
    return False


def _may_meet(a: Sequence[T], b: Sequence[T], many: Callable[[T], bool], meet: Callable[[T, T], bool]) -> bool:
    """Whether the sequences of parts `a` and `b` may match one same sequence of items: a part that
    is `many` matches any number of items (none included), any other one item, one that `meet` says
    both may match. Explores every way the two can advance together (at most len(a) x len(b)
    states)."""

    def moves(state: tuple[int, int]) -> Iterator[tuple[int, int]]:
        i, j = state
        a_many, b_many = i < len(a) and many(a[i]), j < len(b) and many(b[j])
        if a_many:
            yield i + 1, j  # it matches no more items
        if b_many:
            yield i, j + 1
        if i < len(a) and j < len(b):  # both match the next item
            if a_many and not b_many:
                yield i, j + 1
            elif b_many and not a_many:
                yield i + 1, j
            elif not a_many and meet(a[i], b[j]):
                yield i + 1, j + 1

    return _walk((0, 0), lambda state: state == (len(a), len(b)), moves)


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


class _Char(NamedTuple):
    """One token of a glob's segment: the one-character regex it matches, whether it repeats (`*`),
    and its text."""

    one: re.Pattern[str]
    many: bool
    text: str


_Segment = tuple[_Char, ...] | None
"""A glob's segment as its tokens, or None for `**` (any number of segments, none included)."""
_Token = tuple[frozenset[str] | None, bool]
"""One character of a shape's segment: the characters it may be (None: any but '/'), and whether it
repeats (any number of times, none included)."""
_LETTERS = frozenset("abcdefghijklmnopqrstuvwxyz")
_DIGITS = frozenset("0123456789-")
_DOT = (1, 2, 3, 3)
"""How a '.' moves the state of a name being spelled: 0 empty, 1 ".", 2 "..", 3 a file's name."""


def _glob_segments(pattern: str) -> list[_Segment] | None:
    """The segments of a valid glob; None when a character class of it may match '/' (a range across
    it), so that one of its segments may match more than one segment of a path."""
    parts = pattern.split("/")
    segments: list[_Segment] = []
    for index, part in enumerate(parts):
        if part == "**":
            # at the end '**' matches one or more segments: a name, then any number
            segments += [(_Char(re.compile("[^/]"), True, _ANY_RUN),), None] if index == len(parts) - 1 else [None]
            continue
        chars = []
        for text, _ in _segment_tokens(part, pattern):
            one = re.compile("[^/]" if text == _ANY_RUN else text, re.DOTALL)
            if one.fullmatch("/"):
                return None
            chars.append(_Char(one, text == _ANY_RUN, text))
        segments.append(tuple(chars))
    return segments


def _shape_segments(shape: Sequence[Piece]) -> list[list[_Token] | None] | None:
    """The segments of a root-relative shape, each as its tokens (None for a `Wild.DIRS` segment),
    empty and `.` segments dropped as the kernel skips them; None when the shape may be any path: a
    `Wild.PATH`, a leading `/`, a `..` segment, a `Wild.DIRS` sharing its segment, or a segment that
    may spell '', '.' or '..' (it may vanish or climb)."""
    if "".join(p if isinstance(p, str) else "x" for p in shape).startswith("/") or Wild.PATH in shape:
        return None
    raw: list[list[str | Wild]] = [[]]
    for piece in shape:
        if isinstance(piece, Wild):
            raw[-1].append(piece)
            continue
        for index, part in enumerate(piece.split("/")):
            if index:
                raw.append([])
            raw[-1].extend(part)
    segments: list[list[_Token] | None] = []
    for segment in raw:
        if segment in ([], ["."]):
            continue
        if Wild.DIRS in segment:
            if segment != [Wild.DIRS]:
                return None
            segments.append(None)
            continue
        tokens: list[_Token] = []
        for char in segment:
            if char is Wild.NAME:
                tokens.append((None, True))
            elif char is Wild.NUMBER:
                tokens += [(_DIGITS, False), (_DIGITS, True)]
            elif char is Wild.LETTERS:
                tokens += [(_LETTERS, False), (_LETTERS, True)]
            elif isinstance(char, str):
                tokens.append((frozenset(char), False))
        if any(_spells(tokens, name) for name in ("", ".", "..")):
            return None
        segments.append(tokens)
    return segments


def _spells(tokens: Sequence[_Token], text: str) -> bool:
    """Whether a shape's segment can be exactly `text`."""
    states = {0}
    for c in [*text, None]:
        closure, todo = set(), list(states)
        while todo:  # a repeating token may be passed over
            i = todo.pop()
            if i not in closure:
                closure.add(i)
                if i < len(tokens) and tokens[i][1]:
                    todo.append(i + 1)
        if c is None:
            return len(tokens) in closure
        states = {i if tokens[i][1] else i + 1 for i in closure if i < len(tokens) and _holds(tokens[i][0], c)}
    return False


def _holds(chars: frozenset[str] | None, c: str) -> bool:
    return c != "/" and (chars is None or c in chars)


def _common(chars: frozenset[str] | None, glob: _Char, dot: bool) -> bool:
    """Whether one character of a file's name may be one of `chars` (None: any) and match `glob`,
    being '.' (`dot`) or another character."""
    if dot:
        return _holds(chars, ".") and glob.one.fullmatch(".") is not None
    if chars is None:
        # the members of a class are runs of code points between characters of its text (a range's
        # ends, and the '/' a negated class leaves out): a run with a member that is not '.', '/' or
        # NUL holds one within 3 code points of its end
        near = {ord(c) + d for c in glob.text for d in range(-3, 4)}
        chars = frozenset(chr(n) for n in near if 0 < n <= 0x10FFFF)
    return any(c not in "./" and glob.one.fullmatch(c) is not None for c in chars)


def _meet(tokens: Sequence[_Token], segment: tuple[_Char, ...]) -> bool:
    """Whether some file name (not '', '.' or '..') is spelled by a shape's segment and matched by a
    glob's: a walk of the pair of their positions, and of the name's state (`_DOT`)."""

    def moves(state: tuple[int, int, int]) -> Iterator[tuple[int, int, int]]:
        i, j, dots = state
        if i < len(tokens) and tokens[i][1]:
            yield i + 1, j, dots
        if j < len(segment) and segment[j].many:
            yield i, j + 1, dots
        if i < len(tokens) and j < len(segment):
            after = (i if tokens[i][1] else i + 1, j if segment[j].many else j + 1)
            if _common(tokens[i][0], segment[j], True):
                yield *after, _DOT[dots]
            if _common(tokens[i][0], segment[j], False):
                yield *after, 3

    return _walk((0, 0, 0), lambda state: state == (len(tokens), len(segment), 3), moves)


_ANY_NAME: list[_Token] = [(None, True)]
_ANY_SEGMENT = (_Char(re.compile("[^/]"), True, _ANY_RUN),)


def _pattern_meets(shape: list[list[_Token] | None], pattern: list[_Segment]) -> bool:
    """Whether some path the shape's segments spell matches the glob's segments: a walk of the pair of
    positions, where a `Wild.DIRS` and a `**` each stand for any number of names."""

    def moves(state: tuple[int, int]) -> Iterator[tuple[int, int]]:
        i, j = state
        ours = shape[i] if i < len(shape) else []
        theirs = pattern[j] if j < len(pattern) else ()
        if ours is None:
            yield i + 1, j  # no more directories
        if theirs is None:
            yield i, j + 1  # '**' matches no more segments
        if i == len(shape) or j == len(pattern):
            return
        if theirs is None:
            if ours is not None and _meet(ours, _ANY_SEGMENT):
                yield i + 1, j
        elif _meet(_ANY_NAME if ours is None else ours, theirs):
            yield (i if ours is None else i + 1), j + 1

    return _walk((0, 0), lambda state: state == (len(shape), len(pattern)), moves)


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
        object.__setattr__(self, "_shapes", tuple(_glob_segments(p) for p in self.patterns))

    def only_within(self, name: str) -> tuple[str, ...]:
        """The patterns whose first segment is `name` as plain text: every path they match lies in the
        top-level directory `name` (or is it)."""
        return tuple(p for p in self.patterns if p.split("/")[0] == name)

    def reaches(self, directory: str) -> bool:
        """True if some path strictly under the root-relative `directory` ("" is the root) could match a
        managed glob, exactly as `matches` decides (case-sensitive). When False, no file however deep in
        that directory's tree is managed: renaming, deleting or not watching it cannot touch a managed file."""
        parts = directory.split("/") if directory else []
        if REGISTRY_DIR in parts:
            return False
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
        return (
            self._regex.match(rel) is not None  # type: ignore[attr-defined]
            and STAGED.search(rel) is None
            and REGISTRY_DIR not in rel.split("/")
        )

    def may_match(self, shape: Sequence[Piece]) -> bool:
        """Whether some path of a root-relative shape may be managed: False only when no path it can
        spell matches a managed glob as `matches` decides (staged names aside: a shape that reaches
        only those is still True). The shape is literal text (`/` separates segments; empty and `.`
        segments are skipped as the kernel skips them) and wildcards (`Wild`). True whenever it may be
        any path: a `Wild.PATH`, a leading `/`, a `..` segment, a segment that may spell '', '.' or '..'
        (so may vanish or climb), a `Wild.DIRS` that is not a whole segment; and for any shape when a
        glob's character class may match '/' (a range across it). Otherwise exact: some name spelled
        by each segment (never '', '.' or '..') matches its glob's segment."""
        segments = _shape_segments(shape)
        if segments is None:
            return True
        patterns: tuple[list[_Segment] | None, ...] = self._shapes  # type: ignore[attr-defined]
        return any(pattern is None or _pattern_meets(segments, pattern) for pattern in patterns)
