"""The mount's watcher: foreign changes of managed files made in the backing directory are noticed
with no access through the mount, and a tree no managed glob can reach costs it no inotify watch.
First its tree alone (real inotify over a real directory), then through real mounts."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, atomic
from coherent_volume.globs import ManagedGlobs
from fusefs.watch_process import Tree

from .harness.mounts import CLI, Mount, watcher_pids


def watched_inodes(pid: int) -> set[int]:
    """The inodes process `pid`'s inotify instances watch, as the kernel lists them."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            if line.startswith("inotify"):
                inodes |= {int(f[4:], 16) for f in line.split() if f.startswith("ino:")}
    return inodes


def inodes(root: Path, *dirs: str) -> set[int]:
    return {(root / d).stat().st_ino for d in dirs}


# ---- the tree alone -------------------------------------------------------------------------


def settle(tree: Tree) -> dict[str, bool]:
    """Every change the tree reports until the kernel has had nothing more for 0.2 s."""
    while select.select([tree.fd], [], [], 0.2)[0]:
        tree.read()
    return tree.drain()


def make_tree(root: Path, *globs: str) -> Tree:
    (root / ".coherent").mkdir(exist_ok=True)
    return Tree(str(root), ManagedGlobs.of(globs))


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A bare directory: the watcher's tree alone, no volume, no mount."""
    r = tmp_path / "vol"
    r.mkdir()
    return r


def test_trees_no_glob_reaches_are_not_watched(bare: Path) -> None:
    (bare / "plans/old").mkdir(parents=True)
    (bare / "docs").mkdir()
    tree = make_tree(bare, "plans/**", "*.md")
    try:
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans", "plans/old")  # not docs, not .coherent
        for i in range(20):
            (bare / f"build/d{i}/sub").mkdir(parents=True)
            (bare / f"build/d{i}/sub/f.md").write_text("x")
        (bare / "plans/new/deeper").mkdir(parents=True)
        changes = settle(tree)
        assert changes == {"build": False, "plans/new": False, "plans/new/deeper": False}
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans", "plans/old", "plans/new", "plans/new/deeper")
    finally:
        os.close(tree.fd)


def test_every_directory_a_double_star_reaches_is_watched_but_never_the_registry(bare: Path) -> None:
    (bare / "a/b").mkdir(parents=True)
    tree = make_tree(bare, "**/*.md")
    try:
        assert watched_inodes(os.getpid()) == inodes(bare, "", "a", "a/b")
        (bare / ".coherent/registry.db").write_text("x")
        assert settle(tree) == {}
    finally:
        os.close(tree.fd)


def test_files_made_in_new_directories_before_their_watch_are_reported(bare: Path) -> None:
    """Directories created faster than the watcher adds watches: what was made in them before is
    found by listing them, whatever the depth."""
    tree = make_tree(bare, "**/notes/*.md")
    try:
        (bare / "src/a/b/notes").mkdir(parents=True)
        (bare / "src/a/b/notes/x.md").write_text("x")
        changes = settle(tree)
        assert changes.get("src/a/b/notes/x.md") is False
        assert watched_inodes(os.getpid()) == inodes(bare, "", "src", "src/a", "src/a/b", "src/a/b/notes")
        (bare / "src/a/b/notes/y.md").write_text("y")
        assert settle(tree) == {"src/a/b/notes/y.md": False}
    finally:
        os.close(tree.fd)


def test_directories_renamed_into_out_of_and_within_reach(bare: Path) -> None:
    (bare / "plans").mkdir()
    (bare / "tmp/d/e").mkdir(parents=True)
    (bare / "tmp/d/x.md").write_text("x")
    (bare / "tmp/d/e/y.md").write_text("y")
    tree = make_tree(bare, "plans/**")
    try:
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans")
        os.rename(bare / "tmp/d", bare / "plans/d")  # into reach: its files are new there
        assert settle(tree) == {"plans/d": False, "plans/d/x.md": False, "plans/d/e": False, "plans/d/e/y.md": False}
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans", "plans/d", "plans/d/e")

        os.rename(bare / "plans/d", bare / "plans/f")  # within reach: gone here, new there
        assert settle(tree) == {
            "plans/d": True,
            "plans/d/x.md": True,
            "plans/d/e": True,
            "plans/d/e/y.md": True,
            "plans/f": False,
            "plans/f/x.md": False,
            "plans/f/e": False,
            "plans/f/e/y.md": False,
        }
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans", "plans/f", "plans/f/e")

        os.rename(bare / "plans/f", bare / "tmp/f")  # out of reach: every managed file it held is gone
        assert settle(tree) == {"plans/f": True, "plans/f/x.md": True, "plans/f/e": True, "plans/f/e/y.md": True}
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans")
        (bare / "tmp/f/x.md").write_text("no longer watched")
        assert settle(tree) == {}
    finally:
        os.close(tree.fd)


def test_files_written_deleted_and_renamed_in_reach(bare: Path) -> None:
    (bare / "plans").mkdir()
    (bare / "plans/a.md").write_text("a")
    tree = make_tree(bare, "plans/**")
    try:
        (bare / "plans/a.md").write_text("changed")
        assert settle(tree) == {"plans/a.md": False}
        os.rename(bare / "plans/a.md", bare / "plans/b.md")
        assert settle(tree) == {"plans/a.md": True, "plans/b.md": False}
        (bare / "plans/b.md").unlink()
        assert settle(tree) == {"plans/b.md": True}
        (bare / "plans/.cv-12-0123abcd.tmp").write_text("the core's staging file")
        assert settle(tree) == {}
    finally:
        os.close(tree.fd)


def test_a_file_exchanged_in_from_beyond_reach_is_still_known_when_its_directory_leaves(bare: Path) -> None:
    """Every commit installs its content by exchanging it with the file at its name (renameat2
    RENAME_EXCHANGE) from the staging directory, which is not watched: the watcher sees the name's
    old file moved out last. The name still holds a file, so a later move of its directory out of
    reach reports it as gone (before, the watcher had forgotten it: a foreign move of the directory
    left such files out of history, and a rebuild after a dropped queue never reported them gone;
    /tmp/s31foreign 2)."""
    (bare / "plans").mkdir()
    (bare / "plans/a.md").write_text("one")
    (bare / "elsewhere").mkdir()
    (bare / "elsewhere/staged").write_text("two")
    tree = make_tree(bare, "plans/**")
    try:
        atomic.rename(str(bare / "elsewhere/staged"), str(bare / "plans/a.md"), exchange=True)
        assert settle(tree) == {"plans/a.md": True}  # (its file was moved out: the daemon looks again)
        assert (bare / "plans/a.md").read_text() == "two"
        os.rename(bare / "plans", bare / "elsewhere/plans")
        assert settle(tree) == {"plans": True, "plans/a.md": True}
    finally:
        os.close(tree.fd)


def test_a_dropped_queue_rebuilds_the_watches_and_reports_what_is_there(bare: Path) -> None:
    """More events than the kernel queues (fs.inotify.max_queued_events) before the watcher reads:
    it watches afresh, reports every entry in reach, and each managed file it knew that is gone."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    (bare / "plans").mkdir()
    (bare / "plans/doomed.md").write_text("x")
    tree = make_tree(bare, "plans/**")
    try:
        for i in range(limit // 2 + 1):  # a create and a close-write each
            (bare / f"plans/f{i}.md").write_bytes(b"")
        (bare / "plans/doomed.md").unlink()  # events the kernel drops
        (bare / "plans/late/sub").mkdir(parents=True)
        changes = settle(tree)
        assert changes["plans/doomed.md"] is True
        assert changes["plans/late/sub"] is False and changes[f"plans/f{limit // 2}.md"] is False
        assert watched_inodes(os.getpid()) == inodes(bare, "", "plans", "plans/late", "plans/late/sub")
    finally:
        os.close(tree.fd)


# ---- through a mount ------------------------------------------------------------------------


@pytest.fixture
def mounted_notes_anywhere(tmp_path: Path) -> Iterator[Mount]:
    """A volume managing plans/**, *.md and **/notes/*.md, mounted through the real CLI."""
    root = tmp_path / "vol"
    root.mkdir()
    CoherentVolume(root, managed=("plans/**", "*.md", "**/notes/*.md"), agent="setup").close()
    (root / "plans").mkdir()
    with Mount(root, tmp_path / "mnt") as m:
        yield m


def foreign(root: Path, rel: str) -> list[str]:
    """What the registry recorded of `rel` as changes by 'external', read from the log (reading it
    changes nothing): `adopt` for a first sighting, `deleted` for a deletion, `foreign` otherwise."""
    out = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    return [
        "deleted" if e["kind"] == "foreign" and "deleted" in (e["detail"] or "") else e["kind"]
        for e in events
        if e["kind"] in ("foreign", "adopt") and e["path"] == rel
    ]


def recorded_within(seconds: float, root: Path, rel: str) -> list[str]:
    deadline = time.monotonic() + seconds
    while not (found := foreign(root, rel)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_a_managed_file_made_deep_under_new_directories_that_double_star_reaches_is_recorded(
    mounted_notes_anywhere: Mount,
) -> None:
    mounted = mounted_notes_anywhere
    """`**/notes/*.md`: directories that look unmanaged are created faster than the watcher can
    watch them, and the managed file at the bottom is still recorded with no access at all."""
    rel = "src/a/b/c/notes/n.md"
    (mounted.root / rel).parent.mkdir(parents=True)
    (mounted.root / rel).write_text("typed into the backing directory\n")
    assert recorded_within(10, mounted.root, rel) == ["adopt"]


def test_a_directory_renamed_into_reach_behind_the_mounts_back_is_recorded(mounted: Mount) -> None:
    (mounted.root / "tmp/d/e").mkdir(parents=True)  # out of every glob's reach: not watched
    (mounted.root / "tmp/d/x.md").write_text("x\n")
    (mounted.root / "tmp/d/e/y.md").write_text("y\n")
    os.rename(mounted.root / "tmp/d", mounted.root / "plans/d")
    assert recorded_within(10, mounted.root, "plans/d/x.md") == ["adopt"]
    assert recorded_within(10, mounted.root, "plans/d/e/y.md") == ["adopt"]


def test_a_directory_renamed_out_of_reach_behind_the_mounts_back_records_its_files_as_deleted(
    mounted: Mount,
) -> None:
    (mounted.root / "plans/d/e").mkdir(parents=True)
    with CoherentVolume(mounted.root, agent="alice") as v:  # (writes through the mount would be its own echo for 2 s)
        v.write("plans/d/x.md", b"x\n")
        v.write("plans/d/e/y.md", b"y\n")
    (mounted.root / "tmp").mkdir()
    os.rename(mounted.root / "plans/d", mounted.root / "tmp/d")
    for rel in ("plans/d/x.md", "plans/d/e/y.md"):
        assert recorded_within(10, mounted.root, rel) == ["deleted"]


def test_trees_no_glob_reaches_cost_the_watcher_no_watch(mounted: Mount) -> None:
    r = mounted.run(
        "alice",
        "for i in $(seq 40); do mkdir -p build/d$i/sub && echo x > build/d$i/sub/f.md; done; mkdir -p plans/p/q",
    )
    assert r.returncode == 0, r.stderr
    [watcher] = watcher_pids(mounted.path)
    expected = inodes(mounted.root, "", "plans", "plans/p", "plans/p/q")
    deadline = time.monotonic() + 10
    while watched_inodes(watcher) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert watched_inodes(watcher) == expected  # not build/, not .coherent/


def test_a_foreign_write_out_of_reach_reaches_cached_readers_when_attributes_expire(mounted: Mount) -> None:
    """No watch, no eager invalidation: the kernel refreshes the file when its cached attributes
    expire (unmanaged timeout, 1 s) and sees the new size and time."""
    (mounted.root / "build").mkdir()
    (mounted.root / "build/notes.txt").write_text("old")
    assert (mounted.path / "build/notes.txt").read_text() == "old"  # now in the kernel's caches
    (mounted.root / "build/notes.txt").write_text("new content")
    deadline = time.monotonic() + 10
    while (mounted.path / "build/notes.txt").read_text() != "new content" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (mounted.path / "build/notes.txt").read_text() == "new content"


def test_a_burst_of_new_directories_in_reach_leaves_the_daemons_log_quiet(mounted: Mount) -> None:
    """watchdog warned ("Callback with id ... already exists") into the log for directories it
    met twice while a tree was being made; the watcher watches and lists each new directory once."""
    start = mounted.log.stat().st_size if mounted.log.exists() else 0
    r = mounted.run("alice", "git init -q plans/repo && mkdir -p plans/x/{1..40}/y/z")
    assert r.returncode == 0, r.stderr
    [watcher] = watcher_pids(mounted.path)
    last = (mounted.root / "plans/x/40/y/z").stat().st_ino
    deadline = time.monotonic() + 10
    while last not in watched_inodes(watcher) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert last in watched_inodes(watcher)
    with open(mounted.log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        noise = [line for line in f if "Warning:" in line or "watch" in line]
    assert noise == []
