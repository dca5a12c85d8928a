"""Line diffs between versions, for people and models: pure functions, no I/O.

Text is UTF-8 without NUL bytes; anything else is binary and gets no line diff. Every diff and
merge aligns lines along a longest common subsequence (`_matching_blocks`: rapidfuzz's bit-parallel
LCS, about n·m/64 word operations, so files of many repeated lines cost no more than others), the
alignment `diff` and `git merge-file` also aim for, with each run of lines only added or removed
slid down past equal lines (`_slid_down`), so the two alignments of a merge agree where it goes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .errors import TooManyLines
from .paths import shown

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


CONTEXT = 3
"""Unchanged lines shown around each change of a unified diff."""


def lines(text: str) -> list[str]:
    """`text` split after each "\n" (kept; a "\r\n" stays whole), the last line possibly without
    one: the lines of diff, patch and git. Never at the other ends `str.splitlines` knows (form
    feed, vertical tab, a lone "\r", U+2028...), which would print a diff `patch` cannot apply."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _lines(data: bytes) -> list[str]:
    return lines(data.decode("utf-8"))


MAX_ALIGNED = 40_000 * 40_000
"""Most lines × lines an alignment takes, past the lines both versions begin and end with: its
traceback holds one bit per pair (at most 200 MB; a merge makes two: the worst merge within the
byte bound took 1.2 s and 330 MB here); beyond it TooManyLines (a 1 MiB file of 2-byte lines would
have needed 34 GB)."""


def _matching_blocks(a: list[str], b: list[str]) -> list[tuple[int, int, int]]:
    """Runs of lines equal in `a` and `b` (start in a, start in b, length), in order, along a
    longest common subsequence; the last is (len(a), len(b), 0). Lines are compared exactly (each
    distinct line is numbered first, so no two lines are taken as equal by a hash). The lines both
    begin and end with are matched as they stand (some longest common subsequence holds them), so
    only the lines between are aligned: TooManyLines if they are more than MAX_ALIGNED pairs."""
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    middle_a, middle_b = a[head : len(a) - tail], b[head : len(b) - tail]
    if len(middle_a) * len(middle_b) > MAX_ALIGNED:
        raise TooManyLines(
            f"{len(middle_a):,} and {len(middle_b):,} lines differ between the two versions: more than a line diff "
            f"or merge aligns ({MAX_ALIGNED:,} pairs of lines)"
        )
    from rapidfuzz.distance import Indel  # (loaded by the first diff, not by every hook and command)

    numbers: dict[str, int] = {}
    a_ids = [numbers.setdefault(line, len(numbers)) for line in middle_a]
    b_ids = [numbers.setdefault(line, len(numbers)) for line in middle_b]
    middle = [(m.a + head, m.b + head, m.size) for m in Indel.opcodes(a_ids, b_ids).as_matching_blocks() if m.size]
    blocks = ([(0, 0, head)] if head else []) + middle + ([(len(a) - tail, len(b) - tail, tail)] if tail else [])
    return _slid_down(a, b, blocks + [(len(a), len(b), 0)])


def _slid_down(a: list[str], b: list[str], blocks: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The alignment `blocks` of `a` and `b` with every run of lines only added, or only removed,
    moved as far down as the equal lines after it allow (the same lines matched, as many). So every
    alignment places a line added beside equal ones alike, after them: the two of a merge (base to
    ours, base to theirs) agree on where such a line goes, and `merge3` takes it once."""
    out = [[0, 0, 0]] + [list(block) for block in blocks]
    k = 0
    while k < len(out) - 1:
        here, after = out[k], out[k + 1]
        while after[2]:
            a_end, b_end = here[0] + here[2], here[1] + here[2]
            added = a_end == after[0] and b_end < after[1] and b[b_end] == b[after[1]]
            removed = b_end == after[1] and a_end < after[0] and a[a_end] == a[after[0]]
            if not (added or removed):
                break
            here[2] += 1  # (the line equal to the run's first matches it: a[a_end] == b[b_end])
            after[0], after[1], after[2] = after[0] + 1, after[1] + 1, after[2] - 1
        if after[2] == 0 and k + 1 < len(out) - 1:
            del out[k + 1]  # used up: the run meets the next one, slid on against the block after
        else:
            k += 1
    return [(x, y, n) for x, y, n in out[:-1] if n] + [(out[-1][0], out[-1][1], 0)]


def _changes(blocks: list[tuple[int, int, int]]) -> Iterator[tuple[int, int, int, int]]:
    """The changed ranges between matching blocks: (a start, a end, b start, b end)."""
    ai = bi = 0
    for a_start, b_start, size in blocks:
        if a_start > ai or b_start > bi:
            yield ai, a_start, bi, b_start
        ai, bi = a_start + size, b_start + size


def _range(start: int, stop: int) -> str:
    """A hunk header's range of lines [start, stop) (0-based) in unified form."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"


def unified(old: bytes | None, new: bytes | None, old_label: str, new_label: str) -> str | None:
    """The unified diff from `old` to `new` (None: no such file, shown as /dev/null), with CONTEXT
    lines around changes, or None when either side is binary. Empty when they are equal."""
    if (old is not None and not is_text(old)) or (new is not None and not is_text(new)):
        return None
    a = [] if old is None else _lines(old)
    b = [] if new is None else _lines(new)
    changes = list(_changes(_matching_blocks(a, b)))
    if not changes:
        return ""
    out = [
        f"--- {'/dev/null' if old is None else shown(old_label)}\n",
        f"+++ {'/dev/null' if new is None else shown(new_label)}\n",
    ]
    hunks: list[list[tuple[int, int, int, int]]] = [[changes[0]]]
    for change in changes[1:]:  # changes closer than twice the context share a hunk
        if change[0] - hunks[-1][-1][1] <= 2 * CONTEXT:
            hunks[-1].append(change)
        else:
            hunks.append([change])
    for hunk in hunks:
        a_start, b_start = max(hunk[0][0] - CONTEXT, 0), max(hunk[0][2] - CONTEXT, 0)
        a_end, b_end = min(hunk[-1][1] + CONTEXT, len(a)), min(hunk[-1][3] + CONTEXT, len(b))
        out.append(f"@@ -{_range(a_start, a_end)} +{_range(b_start, b_end)} @@\n")
        ai = a_start
        for c_a_start, c_a_end, c_b_start, c_b_end in hunk:
            out += [" " + line for line in a[ai:c_a_start]]
            out += ["-" + line for line in a[c_a_start:c_a_end]]
            out += ["+" + line for line in b[c_b_start:c_b_end]]
            ai = c_a_end
        out += [" " + line for line in a[ai:a_end]]
    return "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in out)


MAX_DIFF_BYTES = 16 << 20
"""Largest version a line diff reads (`diffable`): a diff holds both versions whole, decoded and
split into lines (a 1 GiB text file took 6.4 GB of memory and 33 s to diff)."""


def diffable(*sizes: int) -> bool:
    """Whether versions of these sizes may be diffed line by line (each at most MAX_DIFF_BYTES)."""
    return all(size <= MAX_DIFF_BYTES for size in sizes)


MAX_MERGE_BYTES = 1 << 20
"""Largest side of a three-way merge (`mergeable`): an alignment costs about lines²/64 word
operations (a merge of 30,000 lines takes ~0.4 s here), and a save through the mount merges while
the kernel holds the directory."""


def mergeable(*sizes: int) -> bool:
    """Whether versions of these sizes may be merged (each at most MAX_MERGE_BYTES)."""
    return all(size <= MAX_MERGE_BYTES for size in sizes)


def small_enough(old_size: int, new_size: int) -> bool:
    """Whether two versions are small enough to diff for a refusal (MAX_INPUT_BYTES together)."""
    return old_size + new_size <= MAX_INPUT_BYTES


def cut(diff: str, max_lines: int = MAX_LINES, max_line_chars: int = MAX_LINE_CHARS) -> str:
    """`diff` cut to `max_lines` lines of at most `max_line_chars` characters, saying how much was
    left out."""
    all_lines = lines(diff)
    shown = []
    for line in all_lines[:max_lines]:
        text = line.rstrip("\n")
        if len(text) > max_line_chars:
            line = f"{text[:max_line_chars]}... ({len(text) - max_line_chars} more characters)\n"
        shown.append(line)
    if len(all_lines) > max_lines:
        shown.append(f"... {len(all_lines) - max_lines} more lines of the diff not shown\n")
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
    a, b = _matching_blocks(base, ours), _matching_blocks(base, theirs)
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
    b, o, t = _lines(base), _lines(ours), _lines(theirs)
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
