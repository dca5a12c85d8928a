"""Opt-in three-way merge of stale writes: the line merge itself (checked against git's), and the
rule that only a stale write asked to merge is merged, with nothing changed on a conflict."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coherent_volume import (
    CasConflict,
    CoherentVolume,
    MergeConflict,
    Policy,
    Retention,
    StaleWriteError,
    TooManyLines,
)
from coherent_volume.diffs import merge3, unified


def _git_merge(tmp: Path, base: bytes, ours: bytes, theirs: bytes) -> bytes | None:
    """git merge-file's merge: its bytes when clean, None on conflicts."""
    paths = [tmp / name for name in ("ours", "base", "theirs")]
    for path, data in zip(paths, (ours, base, theirs), strict=True):
        path.write_bytes(data)
    done = subprocess.run(["git", "merge-file", "-p", *map(str, paths)], capture_output=True, timeout=30)
    assert done.returncode >= 0, done.stderr
    return done.stdout if done.returncode == 0 else None


_fresh = itertools.count()


@st.composite
def _edited(draw: st.DrawFn, base: list[str], unique: bool) -> list[str]:
    """`base` after a few line insertions, deletions and replacements."""
    lines = list(base)
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from("idr"))
        pos = draw(st.integers(0, len(lines)))
        new = f"new {next(_fresh)}\n" if unique else draw(st.sampled_from(["a\n", "b\n", "x\n"]))
        if op == "i":
            lines.insert(pos, new)
        elif pos < len(lines):
            if op == "d":
                del lines[pos]
            else:
                lines[pos] = new
    return lines


@st.composite
def _three(draw: st.DrawFn, unique: bool) -> tuple[bytes, bytes, bytes]:
    n = draw(st.integers(0, 10))
    base = (
        [f"line {i}\n" for i in range(n)]
        if unique
        else [draw(st.sampled_from(["a\n", "b\n", "c\n"])) for _ in range(n)]
    )
    ours = draw(_edited(base, unique))
    theirs = list(ours) if draw(st.integers(0, 9)) == 0 else draw(_edited(base, unique))
    return tuple("".join(x).encode() for x in (base, ours, theirs))  # type: ignore[return-value]


@settings(
    max_examples=400, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_three(unique=True))
def test_the_line_merge_agrees_with_git_merge_file(tmp_path: Path, sides: tuple[bytes, bytes, bytes]) -> None:
    """With distinct lines (one alignment only) the merge is git's: clean exactly when git's is,
    with the same bytes."""
    base, ours, theirs = sides
    merged, conflicts = merge3(base, ours, theirs)
    assert (merged is None) == bool(conflicts)
    assert merged == _git_merge(tmp_path, base, ours, theirs)


@settings(max_examples=400, derandomize=True, deadline=None)
@given(_three(unique=False))
def test_the_line_merge_keeps_every_one_sided_change(sides: tuple[bytes, bytes, bytes]) -> None:
    """With repeated lines alignments are ambiguous and merges may differ from git's; what never
    differs: one side unchanged means the other side's content, identical sides merge to it."""
    base, ours, theirs = sides
    merged, _ = merge3(base, ours, theirs)
    if ours in (base, theirs):
        assert merged == theirs
    elif theirs == base:
        assert merged == ours


@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.lists(st.sampled_from(["a\n", "b\n", "c\n"]), max_size=8), st.integers(0, 8), st.sampled_from("abc"))
def test_a_line_both_sides_add_at_one_place_is_taken_once(middle: list[str], at: int, line: str) -> None:
    """Both sides add the same line at the same place, among equal lines, and each changes one end
    of the file: the merge has the line once, with both ends' changes (before, the two alignments
    could place it on either side of an equal line and the merge kept it twice, /tmp/s29hist 1)."""
    base, at = ["first\n", *middle, "last\n"], min(at, len(middle)) + 1  # (between first and last)
    both = base[:at] + [f"{line}\n"] + base[at:]
    ours, theirs = both + ["ours at the end\n"], ["theirs at the start\n"] + both
    for mine, other in ((ours, theirs), (theirs, ours)):
        merged, conflicts = merge3(*("".join(x).encode() for x in (base, mine, other)))
        assert conflicts == [] and merged == "".join(["theirs at the start\n", *both, "ours at the end\n"]).encode()


@settings(
    max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(_three(unique=False), st.booleans(), st.booleans())
def test_a_unified_diff_applied_by_patch_gives_the_new_version(
    tmp_path: Path, sides: tuple[bytes, bytes, bytes], old_newline: bool, new_newline: bool
) -> None:
    """The diffs shown in refusals, `diff` and `log -p` are real unified diffs: GNU patch turns the
    old version into the new one with them (repeated lines, no final newline included)."""
    old, _, new = sides
    old, new = (old if old_newline else old.rstrip(b"\n")), (new if new_newline else new.rstrip(b"\n"))
    shown = unified(old, new, "a/f", "b/f")
    assert shown is not None and (shown == "") == (old == new)
    (tmp_path / "f").write_bytes(old)
    if shown:
        done = subprocess.run(
            ["patch", "-s", "-p1", "--no-backup-if-mismatch", "-d", str(tmp_path)],
            input=shown.encode(),
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, (done.stdout, done.stderr, shown)
    assert (tmp_path / "f").read_bytes() == new


def test_a_file_of_many_repeated_lines_merges_both_sides(tmp_path: Path) -> None:
    """12,000 lines drawn from a few dozen (a table, blank lines): one side adds a line at the top,
    the other at the bottom; both are kept, as git keeps them (difflib's matcher took seconds here)."""
    base = "".join(f"row {i % 50}\n" if i % 2 else "\n" for i in range(12_000)).encode()
    ours, theirs = b"top\n" + base, base + b"bottom\n"
    merged, conflicts = merge3(base, ours, theirs)
    assert conflicts == [] and merged == b"top\n" + base + b"bottom\n"
    assert merged == _git_merge(tmp_path, base, ours, theirs)


@pytest.mark.parametrize("inside", ["\x0c", "\x0b", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r"])
def test_only_a_newline_ends_a_line_as_for_patch_and_git(tmp_path: Path, inside: str) -> None:
    """Characters Python's str.splitlines also ends lines at (form feed, a lone CR, U+2028...) are
    inside a line for diff, patch and git: a diff of such lines applies with patch, and one such
    line changed on both of its halves conflicts, as in git merge-file. CRLF lines stay whole."""
    base, ours, theirs = (f"{x}{inside}{y}\r\nc\n".encode() for x, y in (("a", "b"), ("A", "b"), ("a", "B")))
    shown = unified(base, theirs, "a/f", "b/f")
    assert shown is not None and shown.count("\n") == 6, shown  # labels, a hunk: - and + of one line, c
    (tmp_path / "f").write_bytes(base)
    done = subprocess.run(
        ["patch", "-s", "-p1", "--no-backup-if-mismatch", "-d", str(tmp_path)],
        input=shown.encode(),
        capture_output=True,
    )
    assert done.returncode == 0 and (tmp_path / "f").read_bytes() == theirs, (done.stdout, shown)
    assert _git_merge(tmp_path, base, ours, theirs) is None
    merged, conflicts = merge3(base, ours, theirs)
    assert merged is None and [c.line for c in conflicts] == [1]


def test_a_version_over_the_merge_bound_is_refused_stale_not_merged(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    big = b"".join(b"line %d\n" % i for i in range(200_000))  # ~1.4 MB, over diffs.MAX_MERGE_BYTES
    alice.write("plans/p.md", big)
    bob.read("plans/p.md")
    alice.write("plans/p.md", b"top\n" + big)
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", big + b"bottom\n", merge=True)
    assert refused.value.reason == "stale" and not isinstance(refused.value, MergeConflict)
    assert alice.read("plans/p.md") == b"top\n" + big and alice.version("plans/p.md") == 2


def test_versions_whose_changed_lines_are_too_many_to_align_are_refused_typed_and_quickly(
    root: Path, vols, tmp_path: Path
) -> None:
    """Within the byte bound, a merge or diff whose changed lines are more than an alignment takes
    (`diffs.MAX_ALIGNED`: its traceback holds a bit per pair of lines) is refused with TooManyLines
    saying so, never a MemoryError or a wait of seconds; the lines both versions begin and end with
    cost no alignment, so a large file with a small change diffs and merges as any other."""
    alice, bob = vols("alice"), vols("bob")
    ours = b"".join(b"o%d\n" % i for i in range(45_000))  # ~300 KB, within diffs.MAX_MERGE_BYTES
    theirs = b"".join(b"t%d\n" % i for i in range(45_000))
    with pytest.raises(TooManyLines, match="45,000 and 45,000 lines differ"):
        unified(ours, theirs, "a", "b")
    alice.write("plans/p.md", b"".join(b"b%d\n" % i for i in range(45_000)))
    bob.read("plans/p.md")
    alice.write("plans/p.md", theirs)
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", ours, merge=True)
    assert refused.value.reason == "stale" and "lines differ" in str(refused.value), str(refused.value)[:300]
    assert alice.read("plans/p.md") == theirs and alice.version("plans/p.md") == 2
    with pytest.raises(TooManyLines):
        alice.diff("plans/p.md", 1, 2)
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "coherent-volume"), "diff", str(root), "plans/p.md", "1", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode != 0 and "lines differ" in shown.stderr and "Traceback" not in shown.stderr, shown.stderr
    big = b"".join(b"line %d\n" % i for i in range(100_000))  # 100,000 lines, one changed in the middle
    changed = big.replace(b"line 50000\n", b"line fifty thousand\n")
    assert unified(big, changed, "a", "b") is not None
    assert merge3(big, changed, b"top\n" + big) == (b"top\n" + changed, [])


def test_binary_content_is_never_merged() -> None:
    assert merge3(b"a\n", b"\0b\n", b"a\nc\n") == (None, [])


def test_a_stale_write_asked_to_merge_is_merged_and_recorded_with_both_parents(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "# plan\nstep 1\nstep 2\nstep 3\n")
    bob.read("plans/p.md")
    alice.write("plans/p.md", "# plan\nstep 1, done\nstep 2\nstep 3\n")
    with pytest.raises(StaleWriteError):
        bob.write("plans/p.md", "# plan\nstep 1\nstep 2\nstep 3\nstep 4\n")  # no merge unless asked
    assert bob.write("plans/p.md", "# plan\nstep 1\nstep 2\nstep 3\nstep 4\n", merge=True) == 3
    assert alice.read("plans/p.md") == b"# plan\nstep 1, done\nstep 2\nstep 3\nstep 4\n"
    merge = alice.history("plans/p.md")[0]
    assert (merge.kind, merge.writer, merge.parents) == ("merge", "bob", (1, 2))
    # bob never read the merged result: its next plain write is still stale
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "bob rewrites everything\n")
    assert refused.value.reason == "stale"


@pytest.mark.parametrize("undo", ["delete", "revert"])
def test_a_second_write_from_a_merged_writers_base_is_refused_not_merged_over_a_peers_undo(vols, undo: str) -> None:
    """A merge leaves its writer's view at its base, so its next write from the same buffer is
    built on that base too: merged from there again, the change the first merge brought in would
    count as new once more and come back over a peer that read the merge and deleted or undid it.
    It is refused `stale`, saying why, and changes nothing; read again, the writer's change merges."""
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/log.md", "h\n\nx\n\nt\n")
    bob.read("plans/log.md")
    bob.write("plans/log.md", "H\n\nx\n\nt\n")
    mine = "h\n\nX\n\nt\n" if undo == "revert" else "h\n\nx\nA1\n\nt\n"  # alice's buffer, from v1
    assert alice.write("plans/log.md", mine, merge=True) == 3
    undone = bob.read_text("plans/log.md").replace("X\n", "x\n").replace("A1\n", "")  # bob's knowing undo
    assert bob.write("plans/log.md", undone) == 4
    with pytest.raises(StaleWriteError) as refused:
        alice.write("plans/log.md", mine + "A2\n", merge=True)  # her buffer again, one line more
    assert refused.value.reason == "stale" and "merged into version 3 already" in str(refused.value)
    assert (alice.version("plans/log.md"), bob.read_text("plans/log.md")) == (4, undone)
    assert alice.read_text("plans/log.md") == "H\n\nx\n\nt\n"
    assert alice.write("plans/log.md", "H\n\nx\n\nt\nA2\n", merge=True) == 5  # from what she read: no merge


def test_a_writers_earlier_merge_is_found_however_many_commits_land_after_the_refusal(vols, monkeypatch) -> None:
    """Whether the writer had a write merged since its base is read from the history as it is when
    asked, not as far back as the refusal's current version reached: commits landing between the
    two do not push that merge out of sight."""
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/log.md", "h\n\nx\n\nt\n")
    bob.read("plans/log.md")
    bob.write("plans/log.md", "H\n\nx\n\nt\n")
    mine = "h\n\nx\nA1\n\nt\n"
    assert alice.write("plans/log.md", mine, merge=True) == 3
    bob.read("plans/log.md")
    assert bob.write("plans/log.md", "H\n\nx\n\nt\n") == 4  # bob drops A1
    core = alice._core
    check = core._refuse_merged_already

    def peers_land_first(refusal: StaleWriteError, base: int) -> None:
        for text in ("H\n\nx\n\nt\nB1\n", "H\n\nx\n\nt\nB1\nB2\n"):
            bob.write("plans/log.md", text)
        check(refusal, base)

    monkeypatch.setattr(core, "_refuse_merged_already", peers_land_first)
    with pytest.raises(StaleWriteError, match="merged into version 3 already"):
        alice.write("plans/log.md", mine + "A2\n", merge=True)
    assert "A1" not in bob.read_text("plans/log.md")


def test_overlapping_changes_raise_merge_conflict_and_change_nothing(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "a\nb\nc\n")
    bob.read("plans/p.md")
    alice.write("plans/p.md", "a\nB by alice\nc\n")
    with pytest.raises(MergeConflict) as conflict:
        bob.write("plans/p.md", "a\nB by bob\nc\n", merge=True)
    assert conflict.value.reason == "stale" and len(conflict.value.conflicts) == 1
    hunk = conflict.value.conflicts[0]
    assert (hunk.line, hunk.base, hunk.ours, hunk.theirs) == (2, ("b\n",), ("B by bob\n",), ("B by alice\n",))
    assert "B by bob" in str(conflict.value) and "B by alice" in str(conflict.value)
    # as every refusal, it carries what changed since the writer's view (it carried none)
    assert conflict.value.diff == "--- plans/p.md@v1\n+++ plans/p.md@v2\n@@ -1,3 +1,3 @@\n a\n-b\n+B by alice\n c\n"
    assert alice.read("plans/p.md") == b"a\nB by alice\nc\n" and alice.version("plans/p.md") == 2


def test_held_unread_and_binary_writes_are_never_merged(vols) -> None:
    alice, bob, carol = vols("alice"), vols("bob"), vols("carol")
    alice.write("plans/p.md", "a\n")
    with pytest.raises(StaleWriteError) as unread:
        carol.write("plans/p.md", "a\nc\n", merge=True)
    assert unread.value.reason == "unread" and not isinstance(unread.value, MergeConflict)
    bob.read("plans/p.md")
    with alice.lock("plans/p.md"), pytest.raises(StaleWriteError) as held:
        bob.write("plans/p.md", "a\nb\n", merge=True)
    assert held.value.reason == "held"
    alice.write("plans/p.bin", b"\0one")
    bob.read("plans/p.bin")
    alice.write("plans/p.bin", b"\0two")
    with pytest.raises(StaleWriteError) as binary:
        bob.write("plans/p.bin", b"\0three", merge=True)
    assert binary.value.reason == "stale" and alice.read("plans/p.bin") == b"\0two"


def test_merge_globs_of_the_volume_merge_without_asking(root: Path, vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/log.md",)))
    alice.write("plans/log.md", "one\n")
    alice.write("plans/other.md", "one\n")
    bob.read("plans/log.md")
    bob.read("plans/other.md")
    alice.write("plans/log.md", "zero\none\n")
    alice.write("plans/other.md", "zero\none\n")
    assert bob.write("plans/log.md", "one\ntwo\n") == 3
    assert alice.read("plans/log.md") == b"zero\none\ntwo\n"
    with pytest.raises(StaleWriteError):
        bob.write("plans/other.md", "one\ntwo\n")
    # another process of the volume sees the policy
    with CoherentVolume(root, agent="carol") as carol:
        assert carol.policy.merges("plans/log.md") and not carol.policy.merges("plans/other.md")


def _rename(vol: CoherentVolume, src: str, dst: str) -> None:
    """`src` renamed over `dst` by `vol`'s agent, as the mount does for `mv src dst`."""
    core = vol._core
    core.rename(vol.agent, core.resolve(src), core.resolve(dst))


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (root / "plans").iterdir()}


def test_a_save_by_rename_refused_for_its_source_changes_nothing(root: Path, vols) -> None:
    """bob's view of the merge-glob file a.md is stale and he never read z.md: renaming z.md over
    a.md is refused for z.md (unread), and a.md is not merged (no version by bob, nothing on
    disk): a refusal of any path renames nothing, even where the destination alone would merge."""
    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/**",)))
    alice.write("plans/a.md", "line1\nline2\nline3\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "line1 (alice)\nline2\nline3\n")
    alice.write("plans/z.md", "line1\nline2\nline3 (z)\n")
    before = _files(root)
    with pytest.raises(StaleWriteError) as refused:
        _rename(bob, "plans/z.md", "plans/a.md")
    assert (refused.value.path, refused.value.reason) == ("plans/z.md", "unread")
    assert _files(root) == before
    assert [(v.version, v.writer) for v in alice.history("plans/a.md")] == [(2, "alice"), (1, "alice")]
    assert [(v.version, v.writer) for v in alice.history("plans/z.md")] == [(1, "alice")]
    assert bob.stale() == ["plans/a.md"]
    bob.read("plans/z.md")  # what the refusal says to do: then the save merges
    _rename(bob, "plans/z.md", "plans/a.md")
    assert _files(root) == {"a.md": b"line1 (alice)\nline2\nline3 (z)\n"}


def test_a_save_by_rename_commits_the_merge_and_the_sources_deletion_together(root: Path, vols) -> None:
    """A save over a merge-glob file from a stale view, of a managed source the agent read: the
    merge is recorded at the destination (kind merge, both parents, the agent's view left at the
    version it read) and the source's deletion as the agent's, and no refusal but the stale one."""
    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/a.md",)))
    alice.write("plans/a.md", "one\ntwo\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "zero\none\ntwo\n")
    bob.write("plans/z.md", "one\ntwo\nthree\n")
    _rename(bob, "plans/z.md", "plans/a.md")
    assert _files(root) == {"a.md": b"zero\none\ntwo\nthree\n"}
    merge = alice.history("plans/a.md")[0]
    assert (merge.version, merge.kind, merge.writer, merge.parents) == (3, "merge", "bob", (1, 2))
    gone = alice.history("plans/z.md")[0]
    assert (gone.version, gone.kind, gone.writer) == (2, "delete", "bob")
    assert bob.stale() == ["plans/a.md"]  # it never read the merge
    with alice._core.registry.read() as tx:
        refusals = [(e.path, e.reason) for e in tx.events() if e.kind == "refusal"]
    assert refusals == [("plans/a.md", "stale")]


def test_a_save_by_rename_whose_source_a_peer_changes_meanwhile_changes_nothing(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer commits a new version of the source while the save's merge is being made: the save
    is refused for the source (bob's view of it is stale now), and neither bob's merge nor the
    peer's bytes reach a.md."""
    from coherent_volume.core.history import History

    alice, bob, peer = vols("alice"), vols("bob"), vols("peer")
    alice.set_policy(Policy(merge=("plans/**",)))
    alice.write("plans/a.md", "1\n2\n3\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "1 (alice)\n2\n3\n")
    bob.write("plans/z.md", "1\n2\n3 (bob)\n")
    peer.read("plans/z.md")
    real = History._merged

    def merged_while_the_peer_writes(self: History, *args: Any) -> Any:
        if peer.version("plans/z.md") == 1:
            peer.write("plans/z.md", "1\n2\n3 (peer)\n")
        return real(self, *args)

    monkeypatch.setattr(History, "_merged", merged_while_the_peer_writes)
    with pytest.raises(StaleWriteError) as refused:
        _rename(bob, "plans/z.md", "plans/a.md")
    assert (refused.value.path, refused.value.reason) == ("plans/z.md", "stale")
    assert _files(root) == {"a.md": b"1 (alice)\n2\n3\n", "z.md": b"1\n2\n3 (peer)\n"}
    assert [(v.version, v.writer) for v in alice.history("plans/a.md")] == [(2, "alice"), (1, "alice")]


def test_a_save_by_rename_merged_again_after_a_peers_commit_keeps_every_change(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer commits the destination while the save's merge is being made, so the merge is made
    again onto the peer's version: still from the version the saver read (not from the first
    merge's theirs, which would take the peer's first change for one the saver removed)."""
    from coherent_volume.core.history import History

    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/**",)))
    alice.write("plans/a.md", "A\n1\n2\n3\nB\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "A alice-1\n1\n2\n3\nB\n")
    (root / "bob.tmp").write_text("A\n1\n2\n3\nB bob\n")  # bob's save, built on v1
    real = History._merged
    bases: list[int | None] = []

    def merged_while_alice_commits(self: History, *args: Any) -> Any:
        bases.append(args[3])
        if len(bases) == 1:
            alice.write("plans/a.md", "A alice-1\n1\n2 alice-2\n3\nB\n")
        return real(self, *args)

    monkeypatch.setattr(History, "_merged", merged_while_alice_commits)
    _rename(bob, "bob.tmp", "plans/a.md")
    assert bases == [1, 1], "both merges are made from the version bob read"
    assert (root / "plans/a.md").read_text() == "A alice-1\n1\n2 alice-2\n3\nB bob\n"
    [merge, *_] = alice.history("plans/a.md")
    assert (merge.kind, merge.writer, merge.parents) == ("merge", "bob", (1, 3))


def test_a_save_by_rename_whose_merge_is_the_current_content_makes_no_version(root: Path, vols) -> None:
    """bob saves, from a stale view, the same fix alice committed: the merge is alice's version, so
    a.md keeps its version (identical bytes are no new version) and only the temp file goes."""
    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/**",)))
    alice.write("plans/a.md", "1\n2\n3\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "1\n2 fixed\n3\n")
    (root / "bob.tmp").write_text("1\n2 fixed\n3\n")
    _rename(bob, "bob.tmp", "plans/a.md")
    assert not (root / "bob.tmp").exists()
    assert [(v.version, v.writer) for v in alice.history("plans/a.md")] == [(2, "alice"), (1, "alice")]
    assert alice.write_cas("plans/a.md", 2, "1\n2 fixed\n3\nmore\n") == 3, "alice's view is current"


def test_concurrent_merging_writers_lose_no_line(root: Path) -> None:
    """Eight processes, each appending its own lines by whole-file rewrites from a stale view with
    merge=True: every line arrives (each rewrite is merged onto what the others committed)."""
    CoherentVolume(root, agent="setup").write("plans/log.md", "".join(f"base {i}\n" for i in range(3)))
    code = """
import sys
from coherent_volume import CoherentVolume, MergeConflict
me = sys.argv[1]
with CoherentVolume(sys.argv[2], agent=me) as vol:
    for i in range(10):
        data = vol.read("plans/log.md")
        while True:
            try:
                vol.write("plans/log.md", data + f"{me} {i}\\n".encode(), merge=True)
                break
            except MergeConflict:  # two appends at the same end: re-read and redo
                data = vol.read("plans/log.md")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{n}", str(root)]) for n in range(8)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 8
    with CoherentVolume(root, agent="check") as vol:
        lines = vol.read("plans/log.md").decode().splitlines()
    assert sorted(lines) == sorted([f"base {i}" for i in range(3)] + [f"w{n} {i}" for n in range(8) for i in range(10)])


def test_through_the_mount_a_stale_save_over_a_merge_glob_file_merges_or_is_refused(root: Path, tmp_path: Path) -> None:
    """Saving by rename (a temp file moved over the file, as editors do) from a stale view merges;
    overlapping changes are refused at the rename (EACCES) and change nothing. An in-place rewrite
    from a stale view is refused at open, as for any managed file."""
    from .harness.mounts import Mount

    with CoherentVolume(root, agent="setup") as setup:
        setup.set_policy(Policy(merge=("plans/log.md",)))
        setup.write("plans/log.md", "one\ntwo\n")
    with Mount(root, tmp_path / "mnt") as m:
        plans = m.path / "plans"

        def run(agent: str, script: str) -> subprocess.CompletedProcess[str]:
            env = {**os.environ, "COHERENT_AGENT": agent}
            return subprocess.run(["sh", "-c", script], cwd=plans, env=env, capture_output=True, text=True, timeout=30)

        assert run("a", "cat log.md").stdout == "one\ntwo\n"  # a's view: v1
        assert run("b", "cat log.md >/dev/null && printf 'zero\\none\\ntwo\\n' > t && mv t log.md").returncode == 0
        saved = run("a", "printf 'one\\ntwo\\nthree\\n' > t2 && chmod 600 t2 && mv t2 log.md")
        assert saved.returncode == 0, saved.stderr
        assert (plans / "log.md").read_text() == "zero\none\ntwo\nthree\n"
        assert (plans / "log.md").stat().st_mode & 0o777 == 0o600  # the saved file's, as rename(2) gives
        assert sorted(os.listdir(plans)) == ["log.md"]
        clash = run("a", "printf 'ONE\\ntwo\\nthree\\n' > t3 && mv t3 log.md")
        assert clash.returncode != 0 and "Permission denied" in clash.stderr
        assert (plans / "log.md").read_text() == "zero\none\ntwo\nthree\n"
        in_place = run("a", "printf 'x\\n' > log.md")
        assert in_place.returncode != 0 and "Permission denied" in in_place.stderr
        # b reads the merge and drops a's line; a's next save from its buffer would bring it back
        assert run("b", "grep -v three log.md > t4 && mv t4 log.md").returncode == 0
        again = run("a", "printf 'one\\ntwo\\nthree\\nfour\\n' > t5 && mv t5 log.md")
        assert again.returncode != 0 and "Permission denied" in again.stderr
        assert (plans / "log.md").read_text() == "zero\none\ntwo\n"
        assert sorted(os.listdir(plans)) == ["log.md", "t3", "t5"]  # mv leaves its source when refused
    with CoherentVolume(root, agent="check") as vol:
        merged = vol.history("plans/log.md")[1]
        assert (merged.kind, merged.writer, merged.parents) == ("merge", "a", (1, 2))


@pytest.mark.parametrize("how", ["write", "save by rename"])
def test_a_merge_that_other_commits_keep_overtaking_is_refused_after_its_rounds_saying_why(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """alice commits a.md again between each of bob's merges and its commit: after MERGE_ATTEMPTS
    merges bob's stale write (a write asked to merge, or a save by rename) is refused `stale`,
    saying why it was not merged, and nothing of it landed: no version by bob, the file alice's,
    the saved file still there. A write and a save give up after the same rounds, saying the same."""
    from coherent_volume.core.history import MERGE_ATTEMPTS, History

    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(merge=("plans/**",)))
    alice.write("plans/a.md", "A\n1\n2\n3\nB\n")
    bob.read("plans/a.md")
    alice.write("plans/a.md", "A alice\n1\n2\n3\nB\n")
    real = History._merged
    merges: list[int | None] = []

    def merged_while_alice_commits(self: History, *args: Any) -> Any:
        merges.append(args[3])
        made = real(self, *args)
        alice.write("plans/a.md", f"A alice\n1\n2\n3\nB\nalice {len(merges)}\n")
        return made

    monkeypatch.setattr(History, "_merged", merged_while_alice_commits)
    with pytest.raises(StaleWriteError) as refused:
        if how == "write":
            bob.write("plans/a.md", "A\n1\n2 bob\n3\nB\n", merge=True)
        else:
            (root / "bob.tmp").write_text("A\n1\n2 bob\n3\nB\n")
            _rename(bob, "bob.tmp", "plans/a.md")
    assert merges == [1] * MERGE_ATTEMPTS, "every merge is made from the version bob read"
    assert refused.value.reason == "stale" and refused.value.current_version == 2 + MERGE_ATTEMPTS
    assert (
        f"It could not be merged: other commits landed between each of its {MERGE_ATTEMPTS} merges and that "
        "merge's commit." in str(refused.value)
    )
    assert (root / "plans/a.md").read_text() == f"A alice\n1\n2\n3\nB\nalice {MERGE_ATTEMPTS}\n"
    assert {v.writer for v in alice.history("plans/a.md")} == {"alice"}
    assert (root / "bob.tmp").exists() == (how == "save by rename")


def test_a_merge_that_loses_its_round_to_a_deletion_is_refused_as_the_callers_write(vols, monkeypatch) -> None:
    """The commit of a merge is a compare-and-swap against the version merged onto; when a deletion
    lands between the merge and that commit, the writer is refused as for its own write (stale, the
    deletion current), never told of an expected version it did not give (found by a hostile probe:
    "expected version 55 … you read version 54")."""
    from coherent_volume.core import history

    alice, bob, carol = vols("alice"), vols("bob"), vols("carol")
    alice.write("plans/p.md", "a\nb\nc\n")
    bob.read("plans/p.md")
    carol.read("plans/p.md")
    alice.write("plans/p.md", "a\nb by alice\nc\n")
    carol.read("plans/p.md")
    merged, deleted = history.History._merged, []

    def deleted_meanwhile(self: Any, *args: Any) -> Any:
        done = merged(self, *args)
        if not deleted:
            deleted.append(carol.delete("plans/p.md"))
        return done

    monkeypatch.setattr(history.History, "_merged", deleted_meanwhile)
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "a\nb\nc\nd by bob\n", merge=True)
    assert not isinstance(refused.value, CasConflict), refused.value
    assert "expected version" not in str(refused.value)
    assert (refused.value.reason, refused.value.seen_version, refused.value.current_version) == ("stale", 1, 3)


def test_a_merge_onto_or_from_a_deletion_is_refused_saying_so(vols) -> None:
    """A stale write asked to merge onto a deletion (or built on one: a view of the file gone) was
    refused `stale`, rightly, but said "a version it needs cannot be read (… is a deletion …)", as if
    a read had failed (/tmp/s33hist 2). It says that nothing is merged onto or from a deletion."""
    alice, bob = vols("alice"), vols("bob")
    bob.write("plans/d.md", "1\n2\n")
    alice.read("plans/d.md")
    bob.delete("plans/d.md")
    with pytest.raises(StaleWriteError) as onto:
        alice.write("plans/d.md", "1\n2\n3 alice\n", merge=True)
    assert "the current version, v2, is a deletion by bob: nothing is merged onto or from one" in str(onto.value)
    assert "cannot be read" not in str(onto.value)
    with pytest.raises(FileNotFoundError):
        alice.read("plans/d.md")  # her view: the deletion
    bob.write("plans/d.md", "x\n")
    with pytest.raises(StaleWriteError) as built:
        alice.write("plans/d.md", "alice\n", merge=True)
    assert "the version your write was built on, v2, is a deletion by bob" in str(built.value)
    assert bob.read("plans/d.md") == b"x\n"


@pytest.mark.parametrize("how", ["write", "save by rename"])
def test_a_merge_whose_current_version_is_pruned_before_it_is_read_merges_onto_the_newer_one(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """bob's stale write of a merge-glob file is refused at alice's v2; before its merge reads v2,
    alice commits v3 (her view leaves v2) and a prune (keep_last=1) drops v2. The write is merged
    onto v3, as a merge overtaken after it is made is merged again, and keeps both changes (found
    by a hostile probe: refused "a version it needs cannot be read", with no diff)."""
    from coherent_volume.core.history import History

    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(("plans/**",), Retention(keep_days=0, keep_last=1)))
    alice.write("plans/log.md", "1\n2\n3\n4\n5\n")
    bob.read("plans/log.md")
    alice.write("plans/log.md", "1\n2\n3\n4\n5 alice\n")
    real, pruned = History._merged, []

    def pruned_first(self: History, *args: Any) -> Any:
        if not pruned:
            alice.write("plans/log.md", "1\n2\n3 alice\n4\n5 alice\n")
            pruned.append(alice.prune().versions)
        return real(self, *args)

    monkeypatch.setattr(History, "_merged", pruned_first)
    if how == "write":
        bob.write("plans/log.md", "1 bob\n2\n3\n4\n5\n")
    else:
        (root / "bob.tmp").write_text("1 bob\n2\n3\n4\n5\n")
        _rename(bob, "bob.tmp", "plans/log.md")
    assert pruned == [1] and not alice.history("plans/log.md")[2].retained  # v2 was pruned
    assert (root / "plans/log.md").read_text() == "1 bob\n2\n3 alice\n4\n5 alice\n"
    newest = alice.history("plans/log.md")[0]
    assert (newest.version, newest.kind, newest.writer, newest.parents) == (4, "merge", "bob", (1, 3))
