"""The core never reads or writes outside the volume root, nor through a symlink, whatever a directory
on a managed path is replaced by after the path was resolved (/tmp/s32api 1): each operation opens
the target's parent beneath the root with no symlink on the way (`VolumePaths.beneath`), and makes its
system calls from that descriptor. Real files, real symlink swaps; a monkeypatched step only puts the
swap at a given point."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, OutsideVolume, StaleWriteError, atomic
from coherent_volume.paths import VolumePaths, _walk_beneath

from .harness import CLI

PRECIOUS = b"PRECIOUS file outside the volume\n"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Path, Path, CoherentVolume]]:
    """A volume managing plans/** with plans/sub/x.md at v1, and a directory outside it holding a
    file of the same name."""
    root, outside = tmp_path / "vol", tmp_path / "outside"
    (root / "plans" / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.md").write_bytes(PRECIOUS)
    vol = CoherentVolume(root, managed=("plans/**",), agent="alice")
    vol.write("plans/sub/x.md", b"v1\n")
    yield root, outside, vol
    vol.close()


def _swap(root: Path, outside: Path) -> None:
    """What another program does: plans/sub moved away, a symlink to the outside directory put there."""
    os.rename(root / "plans" / "sub", root / "plans" / "sub.moved")
    os.symlink(outside, root / "plans" / "sub")


def _untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["x.md"]
    assert (outside / "x.md").read_bytes() == PRECIOUS


def _swap_after_resolve(monkeypatch: pytest.MonkeyPatch, root: Path, outside: Path) -> None:
    """The next resolve of a path returns its Target, then the directory is swapped."""
    real = VolumePaths.resolve

    def resolve(self: VolumePaths, path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        target = real(self, path)
        if not os.path.islink(root / "plans" / "sub"):
            _swap(root, outside)
        return target

    monkeypatch.setattr(VolumePaths, "resolve", resolve)


def test_an_update_whose_retry_meets_the_swapped_directory_is_refused_and_records_nothing(setup) -> None:
    root, outside, vol = setup
    calls: list[bytes] = []

    def fn(old: bytes) -> bytes:
        calls.append(old)
        if len(calls) == 1:
            _swap(root, outside)  # the first commit is refused (its file moved); the retry reuses the Target
        return old + b"alice's line\n"

    with pytest.raises(OutsideVolume, match="'plans/sub' on its way is a symlink"):
        vol.update("plans/sub/x.md", fn)
    _untouched(outside)
    assert calls == [b"v1\n"]  # the outside file was never read
    os.unlink(root / "plans" / "sub")
    os.rename(root / "plans" / "sub.moved", root / "plans" / "sub")
    assert [(v.version, v.writer) for v in vol.history("plans/sub/x.md")] == [(1, "alice")]
    assert vol.read("plans/sub/x.md") == b"v1\n"


@pytest.mark.parametrize("operation", ["write", "write_cas", "delete", "read", "version"])
def test_a_call_through_a_directory_swapped_after_resolve_is_refused_outside_untouched(
    setup, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    root, outside, vol = setup
    calls: dict[str, Callable[[], object]] = {
        "write": lambda: vol.write("plans/sub/x.md", b"alice\n"),
        "write_cas": lambda: vol.write_cas("plans/sub/x.md", 1, b"alice\n"),
        "delete": lambda: vol.delete("plans/sub/x.md"),
        "read": lambda: vol.read(Path("plans/sub/x.md")),  # (a Path: resolved, not read by `open_plain`)
        "version": lambda: vol.version("plans/sub/x.md"),
    }
    _swap_after_resolve(monkeypatch, root, outside)
    with pytest.raises(OutsideVolume, match="symlink"):
        calls[operation]()
    monkeypatch.undo()
    _untouched(outside)
    os.unlink(root / "plans" / "sub")
    os.rename(root / "plans" / "sub.moved", root / "plans" / "sub")
    assert [(v.version, v.writer, v.kind) for v in vol.history("plans/sub/x.md")] == [(1, "alice", "commit")]
    assert vol.read("plans/sub/x.md") == b"v1\n"


def test_a_new_file_whose_missing_directories_lie_below_a_swapped_one_is_refused(setup, monkeypatch) -> None:
    root, outside, vol = setup
    _swap_after_resolve(monkeypatch, root, outside)
    with pytest.raises(OutsideVolume):
        vol.write("plans/sub/new/deeper/y.md", b"alice\n")
    _untouched(outside)


def test_a_directory_swapped_between_staging_and_install_gets_nothing_outside(setup, monkeypatch) -> None:
    """The swap comes after the parent was opened, just before the install's rename: the install lands
    in the directory that was opened (moved, inside the root), never through the symlink."""
    root, outside, vol = setup
    real_swap_in = atomic.swap_in

    def swap_in(src: str, dst: str) -> bool:
        if not os.path.islink(root / "plans" / "sub"):
            _swap(root, outside)
        return real_swap_in(src, dst)

    monkeypatch.setattr(atomic, "swap_in", swap_in)
    vol.write("plans/sub/x.md", b"v2\n")
    monkeypatch.undo()
    _untouched(outside)
    assert (root / "plans" / "sub.moved" / "x.md").read_bytes() == b"v2\n"


def test_a_rename_through_a_swapped_directory_is_refused(setup) -> None:
    root, outside, vol = setup
    core = vol._core
    src, dst = core.resolve("plans/sub/x.md"), core.resolve("plans/sub/y.md")
    core.read("alice", src)
    _swap(root, outside)
    with pytest.raises(OutsideVolume):
        core.rename("alice", src, dst)
    _untouched(outside)
    assert (root / "plans" / "sub.moved" / "x.md").read_bytes() == b"v1\n"


def test_a_symlinked_directory_inside_the_root_leading_into_the_globs_still_works(setup) -> None:
    """docs/mount.md: a path through a symlink is resolved to its real name (here plans/sub/...), whose
    parent has no symlink on its way."""
    root, _, vol = setup
    os.symlink("plans/sub", root / "linked")
    assert vol.read("linked/x.md") == b"v1\n"
    assert vol.write("linked/x.md", b"v2\n") == 2
    assert (root / "plans" / "sub" / "x.md").read_bytes() == b"v2\n"
    assert vol.update("linked/x.md", lambda old: old + b"more\n") == 3
    assert vol.version("plans/sub/x.md") == 3
    assert vol.delete("linked/x.md") == 4
    assert not (root / "plans" / "sub" / "x.md").exists()


def test_beneath_names_the_file_from_its_parent_descriptor(setup) -> None:
    root, _, vol = setup
    paths = vol._core.paths
    target = paths.beneath(paths.resolve("plans/sub/x.md"))
    assert target.anchor is not None and target.abs == f"/proc/self/fd/{target.anchor.fd}/x.md"
    assert os.path.realpath(target.abs) == str(root / "plans" / "sub" / "x.md")
    assert paths.beneath(target) is target  # one operation opens it once
    missing = paths.beneath(paths.resolve("plans/new/deeper/y.md"))  # from the nearest directory there is
    assert missing.anchor is not None and missing.abs == f"/proc/self/fd/{missing.anchor.fd}/new/deeper/y.md"
    assert os.path.realpath(f"/proc/self/fd/{missing.anchor.fd}") == str(root / "plans")


def test_the_walk_without_openat2_refuses_a_symlink_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "a", tmp_path / "link")
    at = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        fd = _walk_beneath(at, "a/b")
        assert os.path.realpath(f"/proc/self/fd/{fd}") == str(tmp_path / "a" / "b")
        os.close(fd)
        for rel, code in (("link/b", errno.ELOOP), ("a/../a", errno.EXDEV), ("a/missing", errno.ENOENT)):
            with pytest.raises(OSError) as caught:
                _walk_beneath(at, rel)
            assert caught.value.errno == code
    finally:
        os.close(at)


def test_a_working_copy_notes_a_set_aside_name_by_its_directory_path_never_a_descriptor_of_its_own(
    tmp_path: Path, pg_url: str
) -> None:
    """An operation names its file beneath its own descriptor (`/proc/self/fd/N/...`); a working
    copy's note of where a change took a file away is settled by any process of the copy, where
    that descriptor number names another directory or none: it notes the directory's path."""
    from .test_registry_postgresql import _pg_volume

    root = _pg_volume(tmp_path / "copy", pg_url)
    with CoherentVolume(root, agent="alice") as alice:
        replica = alice._core.replica
        assert replica is not None
        fd = os.open(root / "plans", os.O_PATH | os.O_DIRECTORY)
        try:
            replica.setting_aside("plans/x.md", f"/proc/self/fd/{fd}/.x.md.tmp", None)
            assert replica.asides() == [("plans/x.md", str(root / "plans/.x.md.tmp"), None)]
            replica.set_back("plans/x.md", f"/proc/self/fd/{fd}/.x.md.tmp")
            assert replica.asides() == []
        finally:
            os.close(fd)


# ---- a missing directory on the way (/tmp/s33api 1) ------------------------------------------------
# Where the file's directory is missing, `beneath` anchors the nearest directory there is; the decision
# looks for it again beneath the root, and the install makes the names below it one at a time beneath
# the one above (mkdirat, then opened with no symlink) and installs beneath the last one so made.


@pytest.fixture
def missing(setup) -> Iterator[tuple[Path, Path, CoherentVolume]]:
    """`setup`, with outside/a.md and a directory notes/ (unmanaged) in the root."""
    root, outside, vol = setup
    (outside / "a.md").write_bytes(PRECIOUS)
    (root / "notes").mkdir()
    yield root, outside, vol


def _outside_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["a.md", "x.md"]
    assert (outside / "a.md").read_bytes() == PRECIOUS and (outside / "x.md").read_bytes() == PRECIOUS


def _link_instead(directory: Path, outside: Path) -> None:
    """What a program does: `directory` (if there) moved away, a symlink to `outside` put in its place."""
    if os.path.lexists(directory):
        os.rename(directory, directory.with_name(directory.name + ".moved"))
    os.symlink(outside, directory)


def _nothing_recorded(root: Path, vol: CoherentVolume, rel: str) -> None:
    """No version of `rel` (the symlink taken away first: its history is asked by name)."""
    link = root / rel.split("/")[0] / "n"
    if os.path.islink(link):
        os.unlink(link)
    assert vol.history(rel) == []


@pytest.mark.parametrize("rel", ["plans/n/a.md", "notes/n/a.md", "plans/n/m/a.md"])
def test_a_symlink_put_where_a_missing_directory_is_to_be_made_is_refused(missing, monkeypatch, rel: str) -> None:
    """The symlink comes after the path was resolved and its nearest directory opened, before anything
    is staged or made (p1, p1c: the old install found `plans/n` a directory through the link, and
    renamed the file into outside/, over outside/a.md for an unmanaged path)."""
    root, outside, vol = missing
    real_stage = atomic.stage

    def stage(target: str, data: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        _link_instead(root / rel.split("/")[0] / "n", outside)
        return real_stage(target, data, *args, **kwargs)

    monkeypatch.setattr(atomic, "stage", stage)
    with pytest.raises(OutsideVolume, match="is a symlink now"):
        vol.write(rel, b"ATTACK\n")
    monkeypatch.undo()
    _outside_untouched(outside)
    assert sorted(os.listdir(root / rel.split("/")[0])) == (["n", "sub"] if rel.startswith("plans") else ["n"])
    if rel.startswith("plans"):
        _nothing_recorded(root, vol, rel)


@pytest.mark.parametrize("rel", ["plans/n/a.md", "notes/n/a.md", "plans/n/m/a.md"])
def test_a_directory_replaced_by_a_symlink_right_after_its_install_made_it_gets_nothing_outside(
    missing, monkeypatch, rel: str
) -> None:
    """The worst instant of the install's walk: between the mkdir of `n` and its open (the old install
    made it by name, then renamed the file through the link). Nothing goes through the link; a
    managed write's decision was recorded already, so its version is superseded by the next
    operation's recovery (logged, its bytes kept in history), never installed through the link."""
    root, outside, vol = missing
    real_mkdir = os.mkdir
    n = root / rel.split("/")[0] / "n"

    def mkdir(*args, **kwargs):  # type: ignore[no-untyped-def]
        real_mkdir(*args, **kwargs)
        if os.path.isdir(n) and not os.path.islink(n):
            os.rmdir(n)
            os.symlink(outside, n)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(OutsideVolume, match="is a symlink now"):
        vol.write(rel, b"ATTACK\n")
    monkeypatch.undo()
    vol.write("plans/other.md", b"x\n")  # the next operation settles what the write left
    _outside_untouched(outside)
    assert os.path.islink(n)  # the program's symlink stays as it made it
    if rel.startswith("plans"):
        os.unlink(n)
        # v1 never reached the disk: what the disk holds (no file) is the next version
        assert [(v.version, v.writer, v.kind) for v in vol.history(rel)] == [
            (2, "external", "delete"),
            (1, "alice", "commit"),
        ]
        assert vol.read_version(rel, 1) == b"ATTACK\n"
        assert not os.path.lexists(root / rel)
        assert any("could not be installed" in line for line in _log(root, rel))


def _log(root: Path, rel: str) -> list[str]:
    """The volume's log lines about `rel`."""
    r = subprocess.run([CLI, "log", str(root), "--limit", "1000"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if rel in line]


@pytest.mark.parametrize("rel", ["plans/n/a.md", "notes/n/a.md"])
def test_a_missing_directory_replaced_by_a_symlink_after_staging_is_refused(missing, monkeypatch, rel: str) -> None:
    """The probes' instant (p1, p1c: right after staging, before the decision): the decision looks
    for the file's directory again beneath the root and meets the symlink: OutsideVolume, nothing
    read, recorded or written outside (before: outside/a.md recorded as an external version of the
    managed path, or replaced for an unmanaged one)."""
    root, outside, vol = missing
    real_stage = atomic.stage
    n = root / rel.split("/")[0] / "n"

    def stage(target: str, data: bytes, *args, **kwargs):  # type: ignore[no-untyped-def]
        staged = real_stage(target, data, *args, **kwargs)
        _link_instead(n, outside)
        return staged

    monkeypatch.setattr(atomic, "stage", stage)
    with pytest.raises(OutsideVolume, match="is a symlink now"):
        vol.write(rel, b"ATTACK\n")
    monkeypatch.undo()
    _outside_untouched(outside)
    if rel.startswith("plans"):
        _nothing_recorded(root, vol, rel)


def test_missing_directories_are_made_and_a_refused_write_leaves_none(missing) -> None:
    root, outside, vol = missing
    assert vol.write("plans/n/m/a.md", b"new\n") == 1
    assert (root / "plans" / "n" / "m" / "a.md").read_bytes() == b"new\n"
    assert vol.write("notes/n/m/a.md", b"new\n") == 0
    assert (root / "notes" / "n" / "m" / "a.md").read_bytes() == b"new\n"
    with pytest.raises(StaleWriteError):
        vol.write_cas("plans/q/r/a.md", 3, b"refused\n")
    assert sorted(os.listdir(root / "plans")) == ["n", "sub"]  # the refused write made no directory
    (root / "plans" / "f").write_bytes(b"a file\n")
    with pytest.raises(NotADirectoryError):
        vol.write("plans/f/g/a.md", b"x\n")
    assert (root / "plans" / "f").read_bytes() == b"a file\n"
    _outside_untouched(outside)


def test_a_recorded_commit_whose_directory_a_program_made_a_symlink_before_recovery_wedges_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer cut off after its commit was recorded leaves its install to recovery; where a program
    replaced the file's directory by a symlink out of the root meanwhile, recovery's install is
    refused (OutsideVolume: no name is followed through a symlink) and the commit superseded, kept
    in history, instead of that refusal failing every later operation on the path."""
    from coherent_volume.core.writes import Writes

    root, outside = tmp_path / "vol", tmp_path / "outside"
    (root / "plans").mkdir(parents=True)
    outside.mkdir()
    with CoherentVolume(root, managed=["plans/**"], agent="alice") as alice:

        def cut_off(*args: object, **kwargs: object) -> bool:
            raise SystemExit  # the writer stops between its recorded decision and its install

        monkeypatch.setattr(Writes, "_install_recorded", cut_off)
        with pytest.raises(SystemExit):
            alice.write("plans/n/a.md", "A\n")
        monkeypatch.undo()
        os.symlink(outside, root / "plans/n")  # where the install is to make the file's directory
        with CoherentVolume(root, agent="bob") as bob:
            bob.write("plans/b.md", "B\n")  # its first transaction settles what killed writers left
            assert os.listdir(outside) == []
            os.unlink(root / "plans/n")
            assert bob.read_version("plans/n/a.md", 1) == b"A\n"  # kept in history
            assert not (root / "plans/n").exists()


def test_a_write_whose_directory_is_removed_before_it_is_staged_says_so(missing) -> None:
    """O_TMPFILE in a directory removed since the path was resolved failed a bare `PermissionError:
    [Errno 1] Operation not permitted` (/tmp/s33r3 3), as if permissions were wrong."""
    root, outside, vol = missing
    (root / "plans/d").mkdir()
    target = vol._core.paths.beneath(vol._core.resolve("plans/d/a.md"))  # anchored at plans/d
    os.rmdir(root / "plans/d")
    with pytest.raises(FileNotFoundError, match="directory was removed while it was being written"):
        atomic.stage(target.abs, b"x\n", root=str(root))
    _outside_untouched(outside)
