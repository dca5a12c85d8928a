"""Every committed version kept: history, a version's bytes, diffs in refusals, restore; through the
Python API, foreign writes, real processes and a real mount."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, DamagedContent, StaleWriteError, VersionGone
from coherent_volume.fingerprint import content_hash

from .harness.mounts import Mount


def _kinds(vol: CoherentVolume, path: str) -> list[tuple[int, str, str]]:
    return [(v.version, v.kind, v.writer) for v in vol.history(path)]


def test_history_lists_every_version_newest_first_with_its_bytes(root: Path, vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "one\n")
    bob.read("plans/p.md")
    bob.write("plans/p.md", "two\n")
    (root / "plans" / "p.md").write_text("three, by hand\n")  # outside the volume
    alice.read("plans/p.md")
    alice.delete("plans/p.md")
    alice.write("plans/p.md", "four\n")
    assert _kinds(alice, "plans/p.md") == [
        (5, "commit", "alice"),
        (4, "delete", "alice"),
        (3, "foreign", "external"),
        (2, "commit", "bob"),
        (1, "commit", "alice"),
    ]
    newest = alice.history("plans/p.md")[0]
    assert newest.size == 5 and newest.hash == content_hash(b"four\n") and newest.at > 0
    assert alice.read_version("plans/p.md", 3) == b"three, by hand\n"
    assert bob.read_version("plans/p.md", 1) == b"one\n"
    with pytest.raises(VersionGone, match="is a deletion by 'alice'"):
        alice.read_version("plans/p.md", 4)
    with pytest.raises(VersionGone, match="not in its history"):
        alice.read_version("plans/p.md", 9)


def test_reading_an_old_version_moves_no_view(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "one\n")
    bob.read_version("plans/p.md", 1)
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "mine\n")
    assert refused.value.reason == "unread"


def test_identical_content_is_stored_once(root: Path, vols) -> None:
    alice = vols("alice")
    for i in range(5):
        alice.write(f"plans/same{i}.md", "the same bytes\n")
    alice.write("plans/same0.md", "other\n")
    alice.write("plans/same0.md", "the same bytes\n")
    objects = [name for _, _, names in os.walk(root / ".coherent" / "objects") for name in names]
    assert sorted(objects) == sorted([content_hash(b"the same bytes\n"), content_hash(b"other\n")])


def test_a_stale_refusal_carries_the_diff_of_what_changed(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "intro\nstep one\nstep two\n")
    bob.read("plans/p.md")
    alice.write("plans/p.md", "intro\nstep one, done\nstep two\n")
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "bob's plan\n")
    diff = refused.value.diff
    assert diff is not None
    assert "-step one\n+step one, done\n" in diff and diff.startswith("--- plans/p.md@v1\n+++ plans/p.md@v2\n")
    assert "What changed since version 1:" in str(refused.value) and "+step one, done" in str(refused.value)
    # an agent that never read the file gets no diff: it has no base
    carol = vols("carol")
    with pytest.raises(StaleWriteError) as unread:
        carol.write("plans/p.md", "x")
    assert unread.value.reason == "unread" and unread.value.diff is None


def test_a_long_diff_is_cut_and_says_how_much(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "".join(f"line {i}\n" for i in range(300)))
    bob.read("plans/p.md")
    alice.write("plans/p.md", "".join(f"line {i} changed\n" for i in range(300)))
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "x")
    assert refused.value.diff is not None
    shown = refused.value.diff.splitlines()
    assert len(shown) == 81 and shown[-1].endswith("more lines of the diff not shown")


def test_binary_content_gets_no_line_diff(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.bin", b"\x00\x01\x02")
    bob.read("plans/p.bin")
    alice.write("plans/p.bin", b"\x00\x01\x03")
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.bin", b"x")
    assert refused.value.diff is None
    assert alice.diff("plans/p.bin", 1, 2) is None


def test_diff_defaults_to_this_agents_view_and_the_current_version(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "a\n")
    bob.read("plans/p.md")
    alice.write("plans/p.md", "a\nb\n")
    assert bob.diff("plans/p.md") == "--- plans/p.md@v1\n+++ plans/p.md@v2\n@@ -1 +1,2 @@\n a\n+b\n"
    assert vols("carol").diff("plans/p.md").startswith("--- /dev/null\n+++ plans/p.md@v2\n")
    assert alice.diff("plans/p.md", 2, 1) == "--- plans/p.md@v2\n+++ plans/p.md@v1\n@@ -1,2 +1 @@\n a\n-b\n"
    assert alice.diff("plans/p.md", 2, 2) == ""


def test_restore_commits_an_old_version_as_new_with_the_checks_of_a_write(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "good plan\n")
    bob.read("plans/p.md")
    bob.write("plans/p.md", "bad rewrite\n")
    with pytest.raises(StaleWriteError) as refused:
        alice.restore("plans/p.md", 1)  # alice has not seen bob's rewrite
    assert refused.value.reason == "stale" and "+bad rewrite" in (refused.value.diff or "")
    alice.read("plans/p.md")
    assert alice.restore("plans/p.md", 1) == 3
    assert alice.read("plans/p.md") == b"good plan\n"
    newest = alice.history("plans/p.md")[0]
    assert (newest.kind, newest.parents, newest.writer) == ("restore", (1,), "alice")


def test_damaged_stored_content_is_reported_never_served(root: Path, vols) -> None:
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    alice.write("plans/p.md", "two\n")
    digest = content_hash(b"one\n")
    obj = root / ".coherent" / "objects" / digest[:2] / digest
    obj.write_bytes(b"ONE\n")
    with pytest.raises(DamagedContent, match="damaged"):
        alice.read_version("plans/p.md", 1)
    obj.unlink()
    with pytest.raises(VersionGone, match="no longer retained"):
        alice.read_version("plans/p.md", 1)


def test_every_commit_through_the_mount_is_retained(root: Path, tmp_path: Path, vols) -> None:
    with Mount(root, tmp_path / "mnt") as m:
        plans = m.path / "plans"
        env = {**os.environ, "COHERENT_AGENT": "editor"}
        steps = [
            "printf 'draft\\n' > p.md",  # create + write
            "printf 'more\\n' >> p.md",  # append
            "sed -i 's/draft/final/' p.md",  # atomic save (temp file + rename)
            "mv p.md q.md",  # rename
        ]
        for step in steps:
            subprocess.run(["sh", "-c", step], cwd=plans, env=env, check=True, timeout=30)
    reader = vols("reader")
    assert [v.kind for v in reader.history("plans/q.md")] == ["commit"]
    assert reader.read_version("plans/q.md", 1) == b"final\nmore\n"
    history = reader.history("plans/p.md")
    assert history[0].kind == "delete"
    contents = [reader.read_version("plans/p.md", v.version) for v in history if v.hash is not None]
    assert b"draft\n" in contents and b"draft\nmore\n" in contents and b"final\nmore\n" in contents


def test_a_registry_from_before_history_gets_its_versions_table(root: Path, vols) -> None:
    import sqlite3

    vols("alice").write("plans/p.md", "one\n")
    db = sqlite3.connect(root / ".coherent" / "registry.db")
    db.execute("DROP TABLE versions")
    db.commit()
    db.close()
    with CoherentVolume(root, agent="bob") as bob:
        bob.read("plans/p.md")
        bob.write("plans/p.md", "two\n")
        assert [(v.version, v.kind) for v in bob.history("plans/p.md")] == [(2, "commit")]


def test_a_refusal_never_waits_for_a_large_diff_and_cuts_long_lines(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    big = "".join(f"line {i}\n" for i in range(40_000))  # ~430 KB: beyond what a refusal diffs
    alice.write("plans/big.md", big)
    bob.read("plans/big.md")
    alice.write("plans/big.md", big.replace("0\n", "0 changed\n"))
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/big.md", "x")
    assert refused.value.reason == "stale" and refused.value.diff is None
    assert "-line 10\n+line 10 changed\n" in (alice.diff("plans/big.md", 1, 2) or "")  # on request, it is there
    alice.write("plans/min.js", "a" * 5000 + "\n")
    bob.read("plans/min.js")
    alice.write("plans/min.js", "b" * 5000 + "\n")
    with pytest.raises(StaleWriteError) as minified:
        bob.write("plans/min.js", "x")
    assert minified.value.diff is not None and max(map(len, minified.value.diff.splitlines())) < 300
    assert re.search(r"\.\.\. \(\d+ more characters\)", minified.value.diff)
