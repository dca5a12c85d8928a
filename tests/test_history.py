"""Every committed version kept: history, a version's bytes, diffs in refusals, restore; through the
Python API, foreign writes, real processes and a real mount."""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import xxhash

from coherent_volume import CoherentVolume, DamagedContent, StaleWriteError, VersionGone, VolumeConfigError
from coherent_volume.core import reads
from coherent_volume.fingerprint import content_hash, hash_file
from coherent_volume.policy import Policy, Retention
from coherent_volume.registry import Transaction, objects
from coherent_volume.registry.sqlite import SQLiteRegistry

from .harness.mounts import Mount
from .harness.volumes import sql, stored, tamper


def _kinds(vol: CoherentVolume, path: str) -> list[tuple[int, str, str]]:
    return [(v.version, v.kind, v.writer) for v in vol.history(path)]


def test_a_version_that_is_not_a_whole_number_is_a_typed_error(vols) -> None:
    """ "1", 1.0 or True name no version: refused saying so (VolumeConfigError, a ValueError), never
    a bare TypeError from inside, nor taken as version 1."""
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    for bad in ("1", 1.0, True):
        for call in (alice.read_version, alice.diff, alice.restore):
            with pytest.raises(VolumeConfigError, match=f"a version is a whole number .*not {re.escape(repr(bad))}"):
                call("plans/p.md", bad)  # type: ignore[operator]
    assert alice.read_version("plans/p.md", 1) == b"one\n"
    assert [v.version for v in alice.history("plans/p.md")] == [1], "nothing was restored"


def test_bad_arguments_of_writes_and_policies_are_typed_errors_that_change_nothing(vols) -> None:
    """write_cas of no version number (None, True, -1, past the largest) was taken as a plain write
    (None), as version 1 (True), or refused CasConflict telling to re-read, which cannot help (-1,
    10**30); text UTF-8 cannot encode raised a bare UnicodeEncodeError; set_policy of no Policy a
    bare AttributeError (/tmp/s29api 2-5). Each is a VolumeConfigError now, and nothing changes."""
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    for bad in (None, True, -1, 2**63, 10**30, "1", 1.5):
        with pytest.raises(
            VolumeConfigError, match=f"expected_version must be a version number .*{re.escape(repr(bad))}"
        ):
            alice.write_cas("plans/p.md", bad, "two\n")  # type: ignore[arg-type]
    with pytest.raises(VolumeConfigError, match="UTF-8 cannot encode"):
        alice.write("plans/p.md", "bad \udcff\n")
    with pytest.raises(VolumeConfigError, match="a policy is a coherent_volume.Policy, not str"):
        alice.set_policy("x")  # type: ignore[arg-type]
    for bad, said in (  # (/tmp/s29r2c 2-4: a bare AttributeError, globs of one character, True as 1)
        (lambda: Policy(retention=None), "retention must be a coherent_volume.Retention"),  # type: ignore[arg-type]
        (lambda: Policy(merge="plans/*.md"), "merge must be a sequence of glob strings"),  # type: ignore[arg-type]
        (lambda: Retention(max_bytes=True), "max_bytes must be a number, not True"),
        (lambda: Retention(keep_last=True), "keep_last must be a number, not True"),
        (lambda: Retention(keep_days=False), "keep_days must be a number, not False"),
    ):
        with pytest.raises(VolumeConfigError, match=said):
            bad()
    assert [v.version for v in alice.history("plans/p.md")] == [1] and alice.read("plans/p.md") == b"one\n"
    assert alice.write_cas("plans/p.md", 1, "two\n") == 2


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
    stored = [digest for (digest,) in sql(root, "SELECT hash FROM contents")]
    assert sorted(stored) == sorted([content_hash(b"the same bytes\n"), content_hash(b"other\n")])


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


def test_restore_under_read_set_isolation_is_refused_when_another_file_read_changed(vols) -> None:
    """Restore has the checks of a write under the volume's isolation: with read-set isolation, a
    restore after a change of another file the agent read is refused `read-set` (it was committed)."""
    alice, bob = vols("alice", isolation="read-set"), vols("bob")
    alice.write("plans/x.md", "x0\n")
    alice.write("plans/y.md", "y1\n")
    alice.write("plans/y.md", "y2\n")
    alice.read("plans/x.md")
    alice.read("plans/y.md")
    bob.read("plans/x.md")
    bob.write("plans/x.md", "x1 from bob\n")
    with pytest.raises(StaleWriteError) as refused:
        alice.restore("plans/y.md", 1)
    assert refused.value.reason == "read-set"
    assert [v.version for v in alice.history("plans/y.md")] == [2, 1] and bob.read("plans/y.md") == b"y2\n"


def test_damaged_stored_content_is_reported_never_served(root: Path, vols) -> None:
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    alice.write("plans/p.md", "two\n")
    digest = content_hash(b"one\n")
    tamper(root, digest, b"ONE\n")
    with pytest.raises(DamagedContent, match="damaged"):
        alice.read_version("plans/p.md", 1)
    tamper(root, digest, None)  # removed outside the volume: its history still says retained
    with pytest.raises(DamagedContent, match="the store is damaged"):
        alice.read_version("plans/p.md", 1)


@pytest.mark.parametrize("parts", [False, True], ids=["one part", "several parts"])
def test_a_version_committed_again_over_damaged_content_is_stored_whole(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch, parts: bool
) -> None:
    """Content is stored once per hash: committing the same bytes again must replace a damaged copy,
    never name it (the new version would be born damaged)."""
    if parts:
        monkeypatch.setattr(objects, "PART", PART)
    data = bytes(range(256)) * 10 if parts else b"precious\n"
    alice = vols("alice")
    alice.write("plans/p.md", data)
    alice.write("plans/p.md", "other\n")
    digest = content_hash(data)
    tamper(root, digest, b"X" * 100, part=2 if parts else 0)
    with pytest.raises(DamagedContent):
        alice.read_version("plans/p.md", 1)
    again = alice.write("plans/p.md", data)
    alice.write("plans/p.md", "later\n")
    assert alice.read_version("plans/p.md", again) == data
    assert alice.read_version("plans/p.md", 1) == data  # the same content: the old version is whole again


@pytest.mark.parametrize("how", ["read_version", "diff", "restore"])
def test_a_version_pruned_while_it_is_read_is_said_to_be_pruned_not_damaged(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Between the history entry's read and the content's load another process prunes the version:
    that is VersionGone (pruned), never DamagedContent (which says the store lost bytes)."""
    alice = vols("alice")
    for n in range(3):
        alice.write("plans/p.md", f"v{n + 1}\n")
    core = alice._core
    looked_up = type(core)._entries

    pruned: list[int] = []

    def entries_then_prune(self, target, *versions):
        found = looked_up(self, target, *versions)
        if not pruned:  # the first lookup only
            with CoherentVolume(root, agent="pruner") as pruner:
                pruner.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
                pruned.append(pruner.prune().versions)
        return found

    monkeypatch.setattr(type(core), "_entries", entries_then_prune)
    with pytest.raises(VersionGone, match="pruned"):
        if how == "read_version":
            alice.read_version("plans/p.md", 1)
        elif how == "diff":
            alice.diff("plans/p.md", 1, 3)
        else:
            alice.restore("plans/p.md", 1)
    assert pruned == [2] and (root / "plans" / "p.md").read_bytes() == b"v3\n"


def test_version_numbers_no_registry_can_hold_are_not_in_the_history(vols) -> None:
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    for version in (2**63, 10**30, -1):
        with pytest.raises(VersionGone, match="not in its history"):
            alice.read_version("plans/p.md", version)
    with pytest.raises(VersionGone, match="not in its history"):
        alice.diff("plans/p.md", 1, 2**64)


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


def _written_again_after(monkeypatch: pytest.MonkeyPatch, module: object, name: str, call: int, at: Path) -> None:
    """Make the `call`th call of `module.name` (a read or hash of `at`'s bytes) return, then let a
    program outside the volume finish writing `at` in place: the bytes it read are gone from the disk
    by the time the read records them."""
    real = getattr(module, name)
    calls = [0]

    def then_written(*args: object) -> object:
        result = real(*args)
        calls[0] += 1
        if calls[0] == call:
            with open(at, "r+b") as f:
                f.write(b"written in full\n")
        return result

    monkeypatch.setattr(module, name, then_written)


@pytest.mark.parametrize("face", ["read", "hook"])
def test_a_change_a_read_saw_half_done_is_kept_as_read_and_its_rest_is_a_version_of_its_own(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch, face: str
) -> None:
    """A read that finds a file a program outside the volume is still writing records the bytes it
    read as a version, kept (history serves them), and registers the reader's view there; the
    bytes written after are another version, so a write based on the half-done ones is refused
    `stale`, never taken over bytes its writer was not shown."""
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "one\n")
    at = root / "plans" / "p.md"
    at.write_bytes(b"half\n")  # the program's write, half done
    core = bob._core
    target = core.resolve("plans/p.md")
    if face == "read":  # the fast path's read, then the slow path's, after which the program goes on
        _written_again_after(monkeypatch, reads, "read_file", 2, at)
        seen = core.read("bob", target)
        shown, version = seen.data, seen.version
    else:  # a hook's Read: what the model was shown is confirmed, then the program goes on
        seen_by_hook: list[bytes] = []

        def saw(data: bytes) -> bool:
            seen_by_hook.append(data)
            at.write_bytes(b"written in full\n")
            return True

        version = core.observe("bob", target, saw)
        shown = seen_by_hook[0]
    assert (shown, version) == (b"half\n", 2)
    assert bob.read_version("plans/p.md", 2) == b"half\n"
    assert [(v.version, v.kind, v.retained, v.size) for v in bob.history("plans/p.md")][-2:] == [
        (2, "foreign", True, len(b"half\n")),
        (1, "commit", True, len(b"one\n")),
    ]
    with pytest.raises(StaleWriteError, match="stale"):
        bob.write("plans/p.md", "based on the half\n")
    assert bob.read("plans/p.md") == b"written in full\n"
    assert bob.version("plans/p.md") == 3
    assert bob.read_version("plans/p.md", 3) == b"written in full\n"


def test_a_descriptor_opened_on_a_file_written_in_place_meanwhile_is_paired_with_what_it_serves(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A descriptor a read keeps (the mount's open) serves what the file holds when it is read: a
    program outside the volume that goes on writing the file in place after the open hashed it
    makes those bytes the version the reader's view is at, kept."""
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/p.md", "one\n")
    at = root / "plans" / "p.md"
    at.write_bytes(b"half\n")
    core = bob._core
    _written_again_after(monkeypatch, reads, "hash_fd", 2, at)  # the fast path's hash, then the kept descriptor's
    fd, version = core.open_version("bob", core.resolve("plans/p.md"))
    try:
        served = os.pread(fd, 100, 0)
    finally:
        os.close(fd)
    assert (served, version) == (b"written in full\n", 2)
    assert [(v.version, v.kind, v.retained, v.size) for v in bob.history("plans/p.md")] == [
        (2, "foreign", True, len(served)),  # the size of the bytes kept, not of those the open hashed
        (1, "commit", True, len(b"one\n")),
    ]
    assert bob.read_version("plans/p.md", 2) == served
    assert bob.write("plans/p.md", "based on what it served\n") == 3


def test_a_version_whose_bytes_were_gone_before_they_were_kept_is_said_never_kept_not_pruned(root: Path, vols) -> None:
    """A change recorded from a hash whose bytes the file no longer held when they were to be kept
    (a file written again between a rename's check and its record, `Renames._moved_foreign`) is
    listed as never kept, and reading it says so, not that the retention policy pruned it; a
    version the policy pruned still says pruned."""
    alice = vols("alice")
    alice.write("plans/p.md", "one\n")
    at = root / "plans" / "p.md"
    at.write_bytes(b"half\n")
    checked = hash_file(str(at))  # what the check found, before the program went on writing
    at.write_bytes(b"written in full\n")
    core = alice._core
    target = core.resolve("plans/p.md")
    core._transact(lambda tx: core._sync(tx, target, tx.file(target.rel), checked, "checked"), holds=(target.rel,))
    assert [(v.version, v.kind, v.retained, v.never_kept) for v in alice.history("plans/p.md")] == [
        (3, "foreign", True, False),  # what the file holds now: the next version, kept
        (2, "foreign", False, True),
        (1, "commit", True, False),
    ]
    with pytest.raises(VersionGone, match="never kept") as gone:
        alice.read_version("plans/p.md", 2)
    assert "pruned" not in str(gone.value) and "changed again while" in str(gone.value)
    assert alice.read_version("plans/p.md", 3) == b"written in full\n"
    assert alice.read("plans/p.md") == b"written in full\n"  # her view leaves v1, which may go now
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.prune()
    assert [(v.version, v.retained, v.never_kept) for v in alice.history("plans/p.md")] == [
        (3, True, False),
        (2, False, True),
        (1, False, False),
    ]
    with pytest.raises(VersionGone, match="pruned by the volume's retention policy"):
        alice.read_version("plans/p.md", 1)
    with pytest.raises(VersionGone, match="never kept"):
        alice.read_version("plans/p.md", 2)


def _as_schema_1(root: Path, *, history: bool) -> None:
    """Turn a volume's registry into what schema version 1 made: content as files under
    .coherent/objects (one per hash), no `contents` table; with `history` False, from before
    history (no `versions` table either)."""
    db = sqlite3.connect(root / ".coherent" / "registry.db")
    with db:
        for (digest,) in db.execute("SELECT hash FROM contents"):
            obj = root / ".coherent" / "objects" / digest[:2] / digest
            obj.parent.mkdir(parents=True, exist_ok=True)
            obj.write_bytes(stored(root, digest) or b"")
        db.execute("DROP TABLE contents")
        db.execute("DROP TABLE content_parts")
        if not history:
            db.execute("DROP TABLE versions")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()


def test_a_registry_from_before_history_gets_its_versions_table(root: Path, vols) -> None:
    vols("alice").write("plans/p.md", "one\n")
    _as_schema_1(root, history=False)
    with CoherentVolume(root, agent="bob") as bob:
        bob.read("plans/p.md")
        bob.write("plans/p.md", "two\n")
        assert [(v.version, v.kind) for v in bob.history("plans/p.md")] == [(2, "commit")]
        assert bob.read_version("plans/p.md", 2) == b"two\n"


def test_a_schema_1_store_moves_into_the_registry(root: Path, vols) -> None:
    alice = vols("alice")
    for text in ("one\n", "two\n", "three\n"):
        alice.write("plans/p.md", text)
    alice.write("plans/q.md", "one\n")  # the same content: stored once
    alice.close()
    _as_schema_1(root, history=True)
    objects = root / ".coherent" / "objects"
    digest = content_hash(b"two\n")
    (objects / digest[:2] / digest).write_bytes(b"TWO\n")  # damaged on disk: must stay reported as damaged
    (objects / "ab").mkdir()
    (objects / "ab" / ".tmp-0123456789abcdef").write_bytes(b"a killed writer's temporary object")
    unnamed = content_hash(b"an abandoned commit's object\n")
    (objects / unnamed[:2]).mkdir(exist_ok=True)
    (objects / unnamed[:2] / unnamed).write_bytes(b"an abandoned commit's object\n")
    with CoherentVolume(root, agent="bob") as bob:
        assert [bob.read_version("plans/p.md", v) for v in (1, 3)] == [b"one\n", b"three\n"]
        assert bob.read_version("plans/q.md", 1) == b"one\n"
        with pytest.raises(DamagedContent, match="damaged"):
            bob.read_version("plans/p.md", 2)
    assert not objects.exists(), "the old store is gone once its content is in the registry"
    assert sql(root, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    assert sorted(d for (d,) in sql(root, "SELECT hash FROM contents")) == sorted(
        content_hash(t) for t in (b"one\n", b"two\n", b"three\n")
    ), "garbage (temporary and unnamed objects) is not carried over"
    with CoherentVolume(root, agent="carol") as carol:  # opening a migrated registry again changes nothing
        assert carol.read_version("plans/p.md", 3) == b"three\n"


def _as_schema_2(root: Path) -> None:
    """Turn a volume's registry into what schema version 2 made: each content whole in its
    `contents` row, whatever its size, no `content_parts` table."""
    db = sqlite3.connect(root / ".coherent" / "registry.db")
    with db:
        for (digest,) in db.execute("SELECT hash FROM contents").fetchall():
            db.execute("UPDATE contents SET data = ? WHERE hash = ?", (stored(root, digest), digest))
        db.execute("DROP TABLE content_parts")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()


PART = 1000
"""The part size the tests of content in parts set (`objects.PART`), so a few KB make several parts."""


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(objects, "PART", PART)
    return PART


def _parts(root: Path, digest: str) -> list[int]:
    """Sizes of the stored parts of `digest`, in order (the first is in its `contents` row)."""
    first = sql(root, "SELECT length(data) FROM contents WHERE hash = ?", (digest,))
    rest = sql(root, "SELECT length(data) FROM content_parts WHERE hash = ? ORDER BY part", (digest,))
    return [n for (n,) in first + rest]


def test_a_schema_2_store_is_cut_into_parts(root: Path, vols, small_parts: int) -> None:
    alice = vols("alice")
    big, small = os.urandom(3 * small_parts + 10), b"small\n"
    alice.write("plans/big.bin", big)
    alice.write("plans/p.md", small)
    alice.write("plans/p.md", b"two\n")
    alice.close()
    _as_schema_2(root)
    whole = sql(root, "SELECT length(data) FROM contents WHERE hash = ?", (content_hash(big),))
    assert whole == [(len(big),)], "schema 2 keeps a content whole in one row"
    tamper(root, content_hash(small), b"SMALL\n")  # damaged: must stay reported as damaged
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read_version("plans/big.bin", 1) == big
        assert bob.read_version("plans/p.md", 2) == b"two\n"
        with pytest.raises(DamagedContent, match="damaged"):
            bob.read_version("plans/p.md", 1)
    assert sql(root, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    assert _parts(root, content_hash(big)) == [small_parts] * 3 + [10]
    with CoherentVolume(root, agent="carol") as carol:  # opening a migrated registry again changes nothing
        assert carol.read_version("plans/big.bin", 1) == big
    assert _parts(root, content_hash(big)) == [small_parts] * 3 + [10]


def test_content_larger_than_a_part_is_stored_in_parts(root: Path, vols, small_parts: int) -> None:
    alice, bob = vols("alice"), vols("bob")
    committed = os.urandom(2 * small_parts + 1)
    alice.write("plans/a.bin", committed)
    foreign = os.urandom(5 * small_parts)
    (root / "plans" / "b.bin").write_bytes(foreign)  # outside the volume: stored when it is noticed
    assert bob.read("plans/b.bin") == foreign
    (root / "plans" / "b2.bin").write_bytes(foreign)  # the same bytes again: stored once
    assert bob.read("plans/b2.bin") == foreign
    alice.write("plans/c.md", b"x" * small_parts)  # exactly one part
    assert _parts(root, content_hash(committed)) == [small_parts, small_parts, 1]
    assert _parts(root, content_hash(foreign)) == [small_parts] * 5
    assert sql(root, "SELECT DISTINCT hash FROM content_parts ORDER BY hash") == sorted(
        [(content_hash(committed),), (content_hash(foreign),)]
    ), "parts only under stored contents"
    assert _parts(root, content_hash(b"x" * small_parts)) == [small_parts], "content of one part is one row"
    assert bob.read_version("plans/a.bin", 1) == committed
    assert alice.read_version("plans/b.bin", 1) == foreign
    assert [v.size for v in alice.history("plans/b.bin")] == [len(foreign)]
    assert sql(root, "SELECT size FROM contents WHERE hash = ?", (content_hash(foreign),)) == [(len(foreign),)]


def test_a_damaged_or_missing_part_is_reported_never_served(root: Path, vols, small_parts: int) -> None:
    alice = vols("alice")
    data = os.urandom(3 * small_parts)
    alice.write("plans/a.bin", data)
    digest = content_hash(data)
    tamper(root, digest, os.urandom(small_parts), part=2)  # the same size, other bytes
    with pytest.raises(DamagedContent, match="no longer hashes"):
        alice.read_version("plans/a.bin", 1)
    tamper(root, digest, None, part=1)
    with pytest.raises(DamagedContent, match="2,000 bytes are stored, not its 3,000"):
        alice.read_version("plans/a.bin", 1)
    tamper(root, digest, None)  # the whole content, removed outside the volume
    with pytest.raises(DamagedContent, match="the store is damaged"):
        alice.read_version("plans/a.bin", 1)


def test_a_store_that_finds_other_bytes_stores_no_part(root: Path, small_parts: int) -> None:
    registry = SQLiteRegistry(str(root / ".coherent"), None)
    expected = content_hash(os.urandom(3 * small_parts))
    fd = os.open(root / "plans" / "changed.bin", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(3 * small_parts))  # not the bytes `expected` is the hash of

        def store(tx: Transaction) -> tuple[int, str]:
            with pytest.raises(OSError) as changed:
                tx.store(expected, fd)
            return changed.value.errno or 0, tx.store(None, fd)  # the transaction stays usable

        failed, digest = registry.transact(store)
    finally:
        os.close(fd)
        registry.close()
    assert failed == errno.EAGAIN
    assert sql(root, "SELECT DISTINCT hash FROM content_parts") == [(digest,)], "nothing stored under the wrong hash"
    assert _parts(root, digest) == [small_parts] * 3


def test_content_stored_in_parts_and_again_whole_reads_back_whole(root: Path, small_parts: int) -> None:
    """Content stored in parts (a file that grew while it was read is read in smaller pieces) and
    then stored again in one part, from bytes or from a descriptor: it reads back whole. Before,
    the second store replaced the first part's row and left the others, so every version naming
    it read as damaged (a hostile tester, /tmp/s20r2 D4)."""
    registry = SQLiteRegistry(str(root / ".coherent"), None)
    data = os.urandom(small_parts - 10)
    path = root / "plans" / "again.bin"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        for source in (data, fd):
            digest = registry.transact(partial(_in_two_parts, data))
            assert len(_parts(root, digest)) == 2
            registry.transact(lambda tx, d=digest, s=source: tx.store(d, s))
            assert registry.transact(lambda tx, d=digest: tx.load(d, "again")) == data, source
            registry.transact(lambda tx, d=digest: tx.drop(d))
    finally:
        os.close(fd)
        registry.close()


def _in_two_parts(data: bytes, tx: Transaction) -> str:
    return objects._insert(tx._c, [data[:300], data[300:]])  # type: ignore[attr-defined]


def _peak_allocated(action: Callable[[], object]) -> int:
    """The most bytes Python held allocated at once while `action` ran, beyond what it held before."""
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_large_file_is_stored_and_restored_a_part_at_a_time(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    part, size = 1 << 20, 64 << 20
    monkeypatch.setattr(objects, "PART", part)
    alice = vols("alice")
    big = root / "plans" / "big.bin"
    with open(big, "wb") as f:  # written outside the volume, sparse: nothing of it in this process's memory
        f.write(b"head")
        f.truncate(size)
        f.seek(size - 4)
        f.write(b"tail")
    assert _peak_allocated(lambda: alice.version("plans/big.bin")) < 8 * part  # noticed: stored
    first = alice.history("plans/big.bin")[0]
    assert (first.kind, first.size, first.retained) == ("foreign", size, True)
    assert len(sql(root, "SELECT 1 FROM content_parts WHERE hash = ?", (first.hash,))) == size // part - 1
    big.write_bytes(b"small\n")
    assert alice.read("plans/big.bin") == b"small\n"
    assert _peak_allocated(lambda: alice.restore("plans/big.bin", 1)) < 8 * part
    assert alice.version("plans/big.bin") == 3 and big.stat().st_size == size
    hasher = xxhash.xxh3_128()
    with open(big, "rb") as f:
        while chunk := f.read(part):
            hasher.update(chunk)
    assert hasher.hexdigest() == first.hash


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


def test_a_version_larger_than_a_diff_reads_is_refused_typed_before_it_is_read(
    root: Path, vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line diff holds both versions whole and split into lines (1 GiB of text took 6.4 GB): a
    version over `diffs.MAX_DIFF_BYTES` gets TooManyLines saying so from its history entry, before a
    byte of it is loaded; `diff`, `log -p` and `why` say so, and a smaller pair still diffs."""
    from coherent_volume import TooManyLines, diffs
    from coherent_volume.core.history import History

    alice, bob = vols("alice"), vols("bob")
    big = b"".join(b"line %d\n" % i for i in range(diffs.MAX_DIFF_BYTES // 10 + 1))
    assert len(big) > diffs.MAX_DIFF_BYTES
    alice.write("plans/big.md", b"small\n")
    bob.read("plans/big.md")
    alice.write("plans/big.md", big)
    with pytest.raises(StaleWriteError):  # no diff for it, and no wait for one
        bob.write("plans/big.md", "mine\n")
    loaded = History._stored
    with monkeypatch.context() as patched:
        patched.setattr(History, "_stored", lambda *a: pytest.fail(f"a version was loaded: {a[2:]}"))
        with pytest.raises(TooManyLines, match=r"version 2 is [\d,]+ bytes: more than a line diff reads \(16 MiB\)"):
            alice.diff("plans/big.md", 1, 2)
    assert History._stored is loaded
    cli = str(Path(sys.executable).parent / "coherent-volume")
    shown = subprocess.run([cli, "diff", str(root), "plans/big.md", "1", "2"], capture_output=True, text=True)
    assert shown.returncode != 0 and "more than a line diff reads" in shown.stderr, shown
    assert "Traceback" not in shown.stderr, shown.stderr
    for command in (["log", "-p", str(root)], ["why", str(root), "plans/big.md"]):
        shown = subprocess.run([cli, *command], capture_output=True, text=True)
        assert shown.returncode == 0 and "more than a line diff reads" in shown.stdout, (command, shown)
    assert alice.diff("plans/big.md", 1, 1) == ""  # versions within the bound diff as before
