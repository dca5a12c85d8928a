"""A program that does not use the volume (an editor's save: a temp file renamed over the file) may
save a managed file after a change's decision checked it and before the change reaches the disk.
Besides a commit's install (tests/test_install_exchange.py): a checked rename over the file, a
rename whose source the program saves, a save merged by rename, and a working copy catching up
with a deletion, or killed while it catches up. The save is never destroyed: it is recorded as the
version after the change's and put back in place. A directory a program makes at the name then
stays there: the change fails as the system call would."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, Policy, RegistryError, atomic
from coherent_volume.core import renames
from coherent_volume.errors import InstallPending
from coherent_volume.protocol import RACY_NS

from .conftest import REPO
from .harness import CLI

P = "plans/plan.md"
SAVE = b"the editor's save\n"


def _save(at: Path, data: bytes = SAVE) -> None:
    """An editor's save of `at`: a temp file outside the managed globs renamed over it."""
    tmp = at.parent.parent / "editor.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, at)


def _real(path: str | Path) -> str:
    """A name the volume's system calls use, as the test names it: an operation names its file
    beneath a descriptor of its directory (`/proc/self/fd/N/name`, `VolumePaths.beneath`)."""
    return atomic.named(str(path))


def _saves_before_rename(monkeypatch: pytest.MonkeyPatch, at: Path, when: Callable[[str, str], bool]) -> list[str]:
    """Make the first rename(2) of the volume for which `when(src, dst)` holds (atomic.rename, with
    or without renameat2's flags) first let an editor save `at`. The names it fired on."""
    real = atomic.rename
    fired: list[str] = []

    def rename(src: str, dst: str, **flags: bool) -> None:
        if not fired and when(src, dst):
            _save(at)
            fired.append(_real(dst))
        real(src, dst, **flags)

    monkeypatch.setattr(atomic, "rename", rename)
    return fired


def _rename(vol: CoherentVolume, src: str, dst: str) -> None:
    core = vol._core
    core.rename(vol.agent, core.resolve(src), core.resolve(dst))


def _history(vol: CoherentVolume, path: str) -> list[tuple[int, str, str]]:
    return [(v.version, v.kind, v.writer) for v in vol.history(path)]


def _leftovers(directory: Path) -> list[str]:
    return [n for n in os.listdir(directory) if ".cv-" in n]


def _save_recorded_after_the_rename(root: Path, alice: CoherentVolume) -> None:
    """P holds the program's save, recorded by external as v3 after the rename's v2 (b"two\n")."""
    assert (root / P).read_bytes() == SAVE
    assert _history(alice, P) == [(3, "foreign", "external"), (2, "commit", "alice"), (1, "commit", "alice")]
    assert alice.read_version(P, 2) == b"two\n"
    assert alice.read_version(P, 3) == SAVE


def test_a_save_over_the_destination_just_before_a_checked_rename_is_put_back_and_recorded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        (root / "draft.txt").write_bytes(b"two\n")  # unmanaged: the rename is checked for its destination
        fired = _saves_before_rename(monkeypatch, root / P, lambda src, dst: _real(dst).endswith(P))
        _rename(alice, "draft.txt", P)
        monkeypatch.undo()
        assert fired
        _save_recorded_after_the_rename(root, alice)
    assert not (root / "draft.txt").exists()
    assert _leftovers(root / "plans") == [] and _leftovers(root) == []


def test_two_saves_over_the_destination_during_a_checked_rename_are_both_recorded_the_last_in_place(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program saves the destination between the rename's two steps, and again right after its
    exchange: the first save, displaced by the exchange, is recorded and put back, which displaces
    the second; that one is recorded after it and put in place in turn (it stayed unrecorded at
    the hidden temp name, its intent dropped by the rename's own record: found by a hostile probe)."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        (root / "draft.txt").write_bytes(b"two\n")
        fired = _saves_before_rename(monkeypatch, root / P, lambda src, dst: _real(src).endswith("draft.txt"))
        real_swap = atomic.swap_in
        swapped: list[str] = []

        def swap_in(src: str, dst: str) -> bool:  # the rename's exchange, then the program's second save
            done = real_swap(src, dst)
            if not swapped:
                swapped.append(dst)
                _save(root / P, b"the second save\n")
            return done

        monkeypatch.setattr(atomic, "swap_in", swap_in)
        _rename(alice, "draft.txt", P)
        monkeypatch.undo()
        assert fired and swapped
        assert (root / P).read_bytes() == b"the second save\n"
        assert _history(alice, P)[:3] == [
            (4, "foreign", "external"),
            (3, "foreign", "external"),
            (2, "commit", "alice"),
        ]
        assert alice.read_version(P, 3) == SAVE
        assert alice.read_version(P, 4) == b"the second save\n"
    assert _leftovers(root / "plans") == [] and _leftovers(root) == []


def test_a_checked_rename_whose_put_back_meets_a_busy_registry_once_is_reported_done(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transaction that puts back a save the rename displaced meets a busy registry once: it is
    tried again, as a commit's record is, and the rename is reported done, the save recorded after
    it (it raised the RegistryError, though the rename was on disk: found by a hostile probe)."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        (root / "draft.txt").write_bytes(b"two\n")
        fired = _saves_before_rename(monkeypatch, root / P, lambda src, dst: _real(src).endswith("draft.txt"))
        core = alice._core
        real_transact, real_aside_back = core.registry.transact, core._aside_back
        failing: list[bool] = []

        def transact(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
            if failing:
                failing.clear()
                raise RegistryError("the registry is busy (injected once)", errno.EBUSY)
            return real_transact(fn, *args, **kwargs)

        def aside_back(*args: object, **kwargs: object) -> None:
            failing.append(True)
            real_aside_back(*args, **kwargs)

        monkeypatch.setattr(core.registry, "transact", transact)
        monkeypatch.setattr(core, "_aside_back", aside_back)
        _rename(alice, "draft.txt", P)
        monkeypatch.undo()
        assert fired and not failing
        _save_recorded_after_the_rename(root, alice)
    assert _leftovers(root / "plans") == [] and _leftovers(root) == []


def test_a_save_of_the_source_just_before_a_checked_rename_is_recorded_where_it_went(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename moves whatever the source holds: a save there after its decision hashed the
    source arrives at the destination, and is recorded as a version of its own after the
    rename's (which keeps the bytes its decision hashed), never taken for them, also when the
    rename is recorded later than the racy window of its ctime (a slow registry)."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        alice.write("plans/draft.md", b"two\n")
        fired = _saves_before_rename(
            monkeypatch, root / "plans/draft.md", lambda src, dst: _real(src).endswith("draft.md")
        )
        renamed = atomic.rename

        def slow(src: str, dst: str, **flags: bool) -> None:
            renamed(src, dst, **flags)
            time.sleep(RACY_NS / 1e9 + 0.05)

        monkeypatch.setattr(atomic, "rename", slow)
        _rename(alice, "plans/draft.md", P)
        monkeypatch.undo()
        assert fired
        _save_recorded_after_the_rename(root, alice)
        assert _history(alice, "plans/draft.md")[0] == (2, "delete", "alice")


def _stale_merge_source(alice: CoherentVolume, bob: CoherentVolume) -> None:
    """P on a merge glob at v2 by alice; bob read v1 and wrote plans/z.md, his change of v1, which a
    rename over P saves by merging."""
    alice.set_policy(Policy(merge=(P,)))
    alice.write(P, b"one\ntwo\n")
    bob.read(P)
    alice.write(P, b"zero\none\ntwo\n")
    bob.write("plans/z.md", b"one\ntwo\nthree\n")


def test_a_save_just_before_a_merged_save_by_rename_is_installed_is_put_back_and_recorded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        _stale_merge_source(alice, bob)
        real_replace = os.replace
        fired: list[str] = []

        def replace(src: str, dst: str) -> None:  # the merge's install before exchanges
            if not fired and _real(dst).endswith(P):
                fired.append(_real(str(dst)))
                _save(root / P)
            real_replace(src, dst)

        monkeypatch.setattr(atomic.os, "replace", replace)
        saved = _saves_before_rename(monkeypatch, root / P, lambda src, dst: _real(dst).endswith(P) and not fired)
        _rename(bob, "plans/z.md", P)
        monkeypatch.undo()
        assert fired or saved
        assert (root / P).read_bytes() == SAVE
        assert _history(alice, P) == [
            (4, "foreign", "external"),
            (3, "merge", "bob"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert alice.read_version(P, 3) == b"zero\none\ntwo\nthree\n"
    assert _leftovers(root / "plans") == [] and os.listdir(root / ".coherent/staging") == []


def test_a_save_of_a_merged_saves_source_just_before_it_is_removed_is_put_back_and_recorded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        _stale_merge_source(alice, bob)
        z = root / "plans/z.md"
        real_unlink = os.unlink
        fired: list[str] = []

        def unlink(path: str, *args: object, **kwargs: object) -> None:  # the source's removal before
            if not fired and str(path) == str(z):
                fired.append(_real(str(path)))
                _save(z)
            real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "unlink", unlink)
        saved = _saves_before_rename(monkeypatch, z, lambda src, dst: _real(src) == str(z) and not fired)
        _rename(bob, "plans/z.md", P)
        monkeypatch.undo()
        assert fired or saved
        assert z.read_bytes() == SAVE
        assert _history(alice, "plans/z.md") == [
            (3, "foreign", "external"),
            (2, "delete", "bob"),
            (1, "commit", "bob"),
        ]
        assert (root / P).read_bytes() == b"zero\none\ntwo\nthree\n"
    assert _leftovers(root / "plans") == []


def test_a_save_before_a_merged_save_of_an_unmanaged_file_is_in_place_when_the_rename_returns(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program saves the destination just before the merge's install and the unmanaged source
    just before it is set aside: both saves are in place when the rename returns (nothing left in
    the staging directory for a later transaction to find), and the destination's is recorded."""
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        _stale_merge_source(alice, bob)
        draft = root / "draft.txt"
        draft.write_bytes(b"one\ntwo\nthree\n")
        real_swap, real_aside = atomic.swap_in, atomic.set_aside
        fired: list[str] = []

        def swap_in(staged: str, at: str) -> bool:
            if not fired and _real(at).endswith(P):
                fired.append(_real(at))
                _save(root / P)
            return real_swap(staged, at)

        def set_aside(path: str, aside: str) -> bool:
            if _real(path) == str(draft):
                fired.append(_real(path))
                _save(draft, b"the source's save\n")
            return real_aside(path, aside)

        monkeypatch.setattr(atomic, "swap_in", swap_in)
        monkeypatch.setattr(atomic, "set_aside", set_aside)
        _rename(bob, "draft.txt", P)
        monkeypatch.undo()
        assert fired == [str(root / P), str(draft)]
        assert os.listdir(root / ".coherent/staging") == []
        assert (root / P).read_bytes() == SAVE
        assert draft.read_bytes() == b"the source's save\n"
        assert _history(alice, P) == [
            (4, "foreign", "external"),
            (3, "merge", "bob"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
    assert _leftovers(root / "plans") == [] and _leftovers(root) == []


def _dir_at(at: Path) -> None:
    """A program replaces the file `at` by a directory holding a file of its own."""
    os.unlink(at)
    at.mkdir()
    (at / "keep.txt").write_bytes(b"the program's file\n")


def _dir_before(monkeypatch: pytest.MonkeyPatch, step: str, at: Path) -> list[str]:
    """Make the first call of `atomic.<step>` naming `at` find a directory there (`_dir_at`)."""
    real = getattr(atomic, step)
    fired: list[str] = []

    def before(*names: str, **flags: bool) -> bool:
        if not fired and str(at) in map(_real, names):
            fired.append(step)
            _dir_at(at)
        return bool(real(*names, **flags))

    monkeypatch.setattr(atomic, step, before)
    return fired


def test_a_directory_made_at_a_file_just_before_its_deletion_stays_and_the_deletion_fails_as_unlink_would(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the deletion moved the directory, files and all, to a temp name no one looks at, and
    recorded itself though it failed."""
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, b"one\n")
        bob.read(P)
        fired = _dir_before(monkeypatch, "set_aside", root / P)
        with pytest.raises(IsADirectoryError):
            bob.delete(P)
        monkeypatch.undo()
        assert fired
        assert (root / P / "keep.txt").read_bytes() == b"the program's file\n"
        assert _leftovers(root / "plans") == []
        bob._core.scan()
        assert _history(alice, P) == [(2, "delete", "external"), (1, "commit", "alice")]


def test_a_directory_made_at_a_file_just_before_a_commit_is_installed_stays_and_the_commit_is_kept(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit is recorded (its commit point passed) and its bytes kept, the install fails as
    open(2) would there, and the directory stays; before, the install exchanged it into the
    staging directory, files and all."""
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, b"one\n")
        bob.read(P)
        fired = _dir_before(monkeypatch, "swap_in", root / P)
        with pytest.raises(InstallPending) as refused:
            bob.write(P, b"two\n")
        monkeypatch.undo()
        assert fired and refused.value.errno == errno.EISDIR
        assert (root / P / "keep.txt").read_bytes() == b"the program's file\n"
        bob._core.scan()
        assert os.listdir(root / ".coherent/staging") == [] and _leftovers(root / "plans") == []
        assert _history(alice, P) == [(3, "delete", "external"), (2, "commit", "bob"), (1, "commit", "alice")]
        assert alice.read_version(P, 2) == b"two\n"


def test_a_directory_made_at_the_name_before_a_displaced_save_is_put_back_stays_and_the_save_is_kept(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program saves the file just before a commit's install (which displaces the save), then
    replaces the file by a directory before the save is put back: the directory stays at its name
    (before, the put back's exchange took it to the staging directory, files and all, for good), and
    the save is recorded, its bytes kept. The save does not wait for the directory to go: its
    staged file is removed by that same recovery, its bytes being the version recorded after the
    commit's (docs/protocol.md said it waited until the directory was gone: /tmp/s32r2fw 4)."""
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, b"one\n")
        bob.read(P)
        real = atomic.swap_in
        calls: list[str] = []

        def swap_in(staged: str, at: str) -> bool:
            calls.append(_real(at))
            if _real(at) == str(root / P):
                _save(root / P) if len(calls) == 1 else _dir_at(root / P)
            return real(staged, at)

        monkeypatch.setattr(atomic, "swap_in", swap_in)
        assert bob.write(P, b"two\n") == 2
        monkeypatch.undo()
        assert calls == [str(root / P)] * 2
        assert (root / P / "keep.txt").read_bytes() == b"the program's file\n"
        assert os.listdir(root / ".coherent/staging") == []  # not waiting: its bytes are v3 already
        bob._core.scan()
        assert _history(alice, P)[:3] == [(4, "delete", "external"), (3, "foreign", "external"), (2, "commit", "bob")]
        assert alice.read_version(P, 3) == SAVE and alice.read_version(P, 2) == b"two\n"
        assert os.listdir(root / ".coherent/staging") == [] and _leftovers(root / "plans") == []


def _copies(tmp_path: Path, pg_url: str) -> tuple[Path, Path]:
    from .test_registry_postgresql import _join, _pg_volume

    return _pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)


def test_a_working_copy_catching_up_with_a_deletion_puts_back_a_save_made_after_its_check(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
        with CoherentVolume(c1, agent="bob") as bob:
            assert bob.read(P) == b"one\n"
        alice.delete(P)
    real_remove = atomic.remove
    fired: list[str] = []

    def remove(target: str) -> None:  # the catch-up's removal before
        if not fired and _real(target).endswith(P):
            fired.append(_real(target))
            _save(c1 / P)
        real_remove(target)

    monkeypatch.setattr(atomic, "remove", remove)
    saved = _saves_before_rename(monkeypatch, c1 / P, lambda src, dst: _real(src).endswith(P) and not fired)
    with CoherentVolume(c1, agent="bob") as bob:
        assert bob.read(P) == SAVE  # c1 caught up with the deletion, which took the save away: put back
        monkeypatch.undo()
        assert fired or saved
        assert _history(bob, P) == [(3, "foreign", "external"), (2, "delete", "alice"), (1, "commit", "alice")]
    assert (c1 / P).read_bytes() == SAVE
    assert _leftovers(c1 / "plans") == []


@pytest.mark.parametrize("change", ["write", "delete"])
def test_a_save_a_change_displaced_after_another_copy_settled_its_intent_is_put_back_and_recorded(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """Bob's change is decided in the registry; before his copy's disk changes, a transaction of
    another copy settles its intent (the registry holds it) and a program on bob's copy saves the
    file. The install then takes that save away to a name only bob's copy knows: noted there first,
    it is put back and recorded. Before, it stayed unrecorded (at a temp name beside the file, or
    in the staging directory, whose sweep removed it)."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice, CoherentVolume(c1, agent="bob") as bob:
        alice.write(P, b"one\n")
        assert bob.read(P) == b"one\n"
        step = "install" if change == "write" else "set_aside"
        owner = atomic.Staged if change == "write" else atomic
        real = getattr(owner, step)
        fired: list[str] = []

        def before(*args: object, **flags: bool) -> bool:
            if not fired:
                fired.append(step)
                if change == "write":  # alice's read settles bob's intent
                    assert alice.read(P) == b"two\n"
                else:
                    with pytest.raises(FileNotFoundError):
                        alice.read(P)
                _save(c1 / P)
            return bool(real(*args, **flags))

        monkeypatch.setattr(owner, step, before)
        if change == "write":
            assert bob.write(P, b"two\n") == 2
        else:
            bob.delete(P)
        monkeypatch.undo()
        assert fired
        assert (c1 / P).read_bytes() == SAVE
        assert _history(bob, P) == [
            (3, "foreign", "external"),
            (2, "commit" if change == "write" else "delete", "bob"),
            (1, "commit", "alice"),
        ]
    staging = c1 / ".coherent/staging"
    assert (not staging.exists() or os.listdir(staging) == []) and _leftovers(c1 / "plans") == []


KILLED_CATCHING_UP = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root = Path(sys.argv[1])
real_rename = atomic.rename
_real = atomic.named

def rename(src, dst, **flags):  # the catch-up's exchange: the editor saves first, then the copy dies
    if flags.get("exchange") and _real(dst).endswith({P!r}):
        tmp = root / "editor.tmp"
        tmp.write_bytes({SAVE!r})
        os.replace(tmp, dst)
        real_rename(src, dst, **flags)
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst, **flags)

vol = CoherentVolume(root, agent="bob")
atomic.rename = rename
vol.read({P!r})
"""


def test_a_working_copy_killed_between_a_catch_ups_exchange_and_the_put_back_loses_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
        with CoherentVolume(c1, agent="bob") as bob:
            assert bob.read(P) == b"one\n"
        alice.write(P, b"two\n")
    killed = subprocess.run([sys.executable, "-c", KILLED_CATCHING_UP, str(c1)], cwd=REPO, timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert (c1 / P).read_bytes() == b"two\n"  # exchanged: the save beside it, at a temp name
    with CoherentVolume(c1, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")  # the first commit-locked operation of a process settles it
        assert carol.read(P) == SAVE
        assert _history(carol, P) == [(3, "foreign", "external"), (2, "commit", "alice"), (1, "commit", "alice")]
        assert carol.read_version(P, 3) == SAVE
    assert _leftovers(c1 / "plans") == []


def test_a_second_save_the_put_back_of_a_copys_rename_meets_keeps_its_note_and_is_recorded(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's rename over P on copy c1: another copy completes its intents, a program saves P (Y)
    before the exchange, which displaces Y; Y is recorded and put back, and a second save (Z) just
    before that put back lands at the temp name. Before, the rename then dropped that note, and Z
    stayed unrecorded at the hidden name for good (a hostile tester, s15pg round 2, D3); then it
    was left noted for the next transaction; now the put back records Z and puts it in place in
    turn (/tmp/s32r2fw 2)."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice, CoherentVolume(c1, agent="bob") as bob:
        bob.write(P, b"one\n")
        bob.write("plans/f1.md", b"f1\n")
        real_save_in, real_swap = renames._save_in, atomic.swap_in
        asides: list[str] = []

        def save_in(src: str, aside: str, dst: str, found: bool) -> bool:
            asides.append(aside)
            alice.read(P)  # another copy completes the rename's intents
            _save(c1 / P, b"Y\n")
            return real_save_in(src, aside, dst, found)

        def swap_in(name: str, at: str) -> bool:
            if asides and _real(name) == _real(asides[0]):
                asides.append(name)
                if len(asides) == 3:  # the put back of Y (the second exchange from that name)
                    _save(c1 / P, b"Z\n")
            return real_swap(name, at)

        monkeypatch.setattr(renames, "_save_in", save_in)
        monkeypatch.setattr(atomic, "swap_in", swap_in)
        _rename(bob, "plans/f1.md", P)
        monkeypatch.undo()
        assert len(asides) == 4  # Z, brought back by Y's put back, put in place in turn
        bob._core.scan()
        assert (c1 / P).read_bytes() == b"Z\n"
        kept = {bob.read_version(P, v.version) for v in bob.history(P) if v.kind == "foreign"}
        assert {b"Y\n", b"Z\n"} <= kept
    assert _leftovers(c1 / "plans") == []


KILLED_AFTER_AN_INSTALL_ANOTHER_COPY_SETTLED = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
from coherent_volume.core import writes
c1, c0 = Path(sys.argv[1]), Path(sys.argv[2])
real_install, real_settled = atomic.Staged.install, writes.Writes._displaced_settled

armed = []

def install(self, *args, **flags):  # another copy settles the intent, an editor saves, then the install
    if not armed:
        return real_install(self, *args, **flags)
    armed.clear()
    with CoherentVolume(c0, agent="alice") as alice:
        alice.read({P!r})
    tmp = c1 / "editor.tmp"
    tmp.write_bytes({SAVE!r})
    os.replace(tmp, c1 / {P!r})
    return real_install(self, *args, **flags)

def settled(*args):  # the save displaced to the staging name: the writer dies before it settles it
    os.kill(os.getpid(), signal.SIGKILL)

atomic.Staged.install = install
writes.Writes._displaced_settled = staticmethod(settled)
vol = CoherentVolume(c1, agent="bob")
vol.read({P!r})
armed.append(True)
vol.write({P!r}, b"two\\n")
"""


def test_a_save_displaced_by_a_writer_killed_after_its_install_is_kept_though_another_copy_settled_it(
    tmp_path: Path, pg_url: str
) -> None:
    """The next process of the writer's copy sweeps the staging directory in its first transaction:
    a name its notes hold is settled (recorded, put back), never swept. Before, the sweep removed
    the save (a hostile tester, s15pg round 2, D4: 5 of 5)."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_AN_INSTALL_ANOTHER_COPY_SETTLED, str(c1), str(c0)], cwd=REPO, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    with CoherentVolume(c1, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")  # the first transaction of a process sweeps the staging directory
        assert carol.read(P) == SAVE
        assert _history(carol, P) == [(3, "foreign", "external"), (2, "commit", "bob"), (1, "commit", "alice")]
    assert os.listdir(c1 / ".coherent/staging") == [] and _leftovers(c1 / "plans") == []


def test_a_save_just_before_a_deletion_through_the_volume_is_put_back_and_recorded(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        real_unlink = os.unlink
        fired: list[str] = []

        def unlink(path: str, *args: object, **kwargs: object) -> None:  # the deletion's unlink before
            if not fired and _real(path).endswith(P):
                fired.append(_real(str(path)))
                _save(root / P)
            real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "unlink", unlink)
        saved = _saves_before_rename(monkeypatch, root / P, lambda src, dst: _real(src).endswith(P) and not fired)
        assert alice.delete(P) == 2
        monkeypatch.undo()
        assert fired or saved
        assert (root / P).read_bytes() == SAVE
        assert _history(alice, P) == [(3, "foreign", "external"), (2, "delete", "alice"), (1, "commit", "alice")]
    assert _leftovers(root / "plans") == []


KILLED_CATCHING_UP_AGAIN = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, save = Path(sys.argv[1]), sys.argv[2].encode()
real_rename = atomic.rename
_real = atomic.named

def rename(src, dst, **flags):  # the catch-up's exchange, or its set-aside: the editor saves first, then the copy dies
    if (flags.get("exchange") and _real(dst).endswith({P!r})) or (flags.get("noreplace") and _real(src).endswith({P!r})):
        tmp = root / "editor.tmp"
        tmp.write_bytes(save)
        os.replace(tmp, root / {P!r})
        real_rename(src, dst, **flags)
        os.kill(os.getpid(), signal.SIGKILL)
    real_rename(src, dst, **flags)

vol = CoherentVolume(root, agent="bob")
atomic.rename = rename
vol.read({P!r})
"""


def _kill_catching_up(c1: Path, save: bytes = SAVE) -> None:
    """A process of working copy `c1` catching up with `P`, killed right after the system call that
    took the file away, which an editor's save of `save` came just before."""
    args = [sys.executable, "-c", KILLED_CATCHING_UP_AGAIN, str(c1), save.decode()]
    assert subprocess.run(args, cwd=REPO, timeout=120).returncode == -signal.SIGKILL


@pytest.mark.parametrize("deleted", [False, True])
@pytest.mark.parametrize("settled_by", ["read", "scan"])
def test_a_catch_up_killed_while_another_process_of_the_copy_runs_on_loses_nothing(
    tmp_path: Path, pg_url: str, deleted: bool, settled_by: str
) -> None:
    """The process running on (a mount, a long-lived agent) settles what the killed one took away
    at its next tracked read of the path or scan (`status`): the save is recorded and put back,
    never dropped when that process records what it holds of the path."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
        with CoherentVolume(c1, agent="bob") as bob:
            assert bob.read(P) == b"one\n"
        if deleted:
            alice.delete(P)
        else:
            alice.write(P, b"two\n")
    with CoherentVolume(c1, agent="dave") as dave:
        dave.write("plans/warm.md", b"w\n")  # its first transaction holding the whole copy is behind it
        _kill_catching_up(c1)
        assert _leftovers(c1 / "plans") != []  # the save, at the temp name the catch-up took it to
        if settled_by == "scan":
            assert dave._core.scan() == []
            assert (c1 / P).read_bytes() == SAVE  # put back
        assert dave.read(P) == SAVE  # not the version in place (v2, or no file)
        assert _history(dave, P) == [
            (3, "foreign", "external"),
            (2, "delete" if deleted else "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert dave.read_version(P, 3) == SAVE
    assert (c1 / P).read_bytes() == SAVE
    assert _leftovers(c1 / "plans") == []


@pytest.mark.parametrize("saved", ["a copy of another file", "a revert to an older version"])
def test_a_save_of_bytes_the_registry_keeps_taken_by_a_killed_catch_up_is_recorded(
    tmp_path: Path, pg_url: str, saved: str
) -> None:
    """Only the version the copy held there (or the bytes its catch-up brings) may go: bytes the
    registry keeps for another path or an older version are a change of this path all the same,
    recorded as a live catch-up records them."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write("plans/b.md", b"B's content\n")
        alice.write(P, b"zero\n")
        alice.write(P, b"one\n")
        with CoherentVolume(c1, agent="bob") as bob:
            assert bob.read(P) == b"one\n"
        alice.write(P, b"two\n")
    save = b"B's content\n" if saved == "a copy of another file" else b"zero\n"
    _kill_catching_up(c1, save)
    with CoherentVolume(c1, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")
        assert carol.read(P) == save
        assert _history(carol, P)[:2] == [(4, "foreign", "external"), (3, "commit", "alice")]
    assert _leftovers(c1 / "plans") == []


@pytest.mark.parametrize("destination_saved", [False, True])
def test_a_save_of_a_renames_source_after_the_rename_took_it_stays_at_the_source(
    root: Path, monkeypatch: pytest.MonkeyPatch, destination_saved: bool
) -> None:
    """Once the rename has taken the source's file, a program's save at the source's name is a new
    file there, recorded as the source's next version; the destination keeps the rename's bytes.
    A save of the destination as well, before the exchange, is put back and recorded after the
    rename, which is done and reported so."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        alice.write("plans/a.md", b"A\n")
        source = root / "plans/a.md"
        taken = source.stat().st_ino
        real = atomic.rename
        fired: list[str] = []

        def rename(src: str, dst: str, **flags: bool) -> None:  # the first after the source's file left its name
            if not fired and (not source.exists() or source.stat().st_ino != taken):
                fired.append(_real(dst))
                _save(source, b"a.md saved\n")
                if destination_saved:
                    _save(root / P)
            real(src, dst, **flags)

        monkeypatch.setattr(atomic, "rename", rename)
        _rename(alice, "plans/a.md", P)
        monkeypatch.undo()
        assert fired
        saved = [(3, "foreign", "external")] if destination_saved else []
        assert (root / P).read_bytes() == (SAVE if destination_saved else b"A\n")
        assert _history(alice, P) == [*saved, (2, "commit", "alice"), (1, "commit", "alice")]
        assert alice.read_version(P, 2) == b"A\n"
        assert alice.read("plans/a.md") == b"a.md saved\n"
        assert _history(alice, "plans/a.md") == [
            (3, "foreign", "external"),
            (2, "delete", "alice"),
            (1, "commit", "alice"),
        ]
    assert _leftovers(root / "plans") == []


@pytest.mark.parametrize(
    ("made_a_directory", "error"), [("source", NotADirectoryError), ("destination", IsADirectoryError)]
)
def test_a_directory_made_at_a_save_by_renames_names_meanwhile_fails_it_as_rename_would(
    root: Path, monkeypatch: pytest.MonkeyPatch, made_a_directory: str, error: type[OSError]
) -> None:
    """An exchange works across types: a directory a program put at the source (before it was
    moved to its temp name) or at the destination (before the exchange) is exchanged back and
    the rename fails as rename(2) of a file over a file would have: the rename changes nothing, and
    what the program did is recorded (a directory holds no version: the file's deletion)."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        alice.write("plans/a.md", b"A\n")
        made_rel, other = ("plans/a.md", P) if made_a_directory == "source" else (P, "plans/a.md")
        made = root / made_rel
        real = atomic.rename
        fired: list[str] = []

        def rename(src: str, dst: str, **flags: bool) -> None:  # the rename's first step, or its exchange
            if not fired and flags.get("noreplace" if made_a_directory == "source" else "exchange"):
                fired.append(_real(dst))
                made.unlink()
                made.mkdir()
                (made / "inner.md").write_bytes(SAVE)
            real(src, dst, **flags)

        monkeypatch.setattr(atomic, "rename", rename)
        with pytest.raises(error):
            _rename(alice, "plans/a.md", P)
        monkeypatch.undo()
        assert fired
        assert (made / "inner.md").read_bytes() == SAVE
        assert alice.read(other) == (b"A\n" if other == "plans/a.md" else b"one\n")
        assert _history(alice, other) == [(1, "commit", "alice")]
        assert _history(alice, made_rel) == [(2, "delete", "external"), (1, "commit", "alice")]  # the program's
    assert _leftovers(root / "plans") == []


def test_a_directory_a_rename_took_stays_beside_a_file_made_at_its_name_and_the_error_says_where(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A program puts a directory at a save by rename's source just before the rename moves it to its
    temp name, then makes a file at the source's name: the rename fails ENOTDIR, as rename(2) of a
    directory over a file would, and puts back what it took only where nothing is: the file stays,
    the directory stays at the temp name, which the error names (it said FileExistsError, naming
    nothing), and nothing below that name is ever taken for a managed file."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        alice.write("plans/a.md", b"A\n")
        made = root / "plans/a.md"
        real = atomic.rename
        fired: list[str] = []

        def rename(src: str, dst: str, **flags: bool) -> None:  # the rename's first step
            real_first = not fired and flags.get("noreplace") and _real(src) == str(made)
            if real_first:
                fired.append(_real(dst))
                made.unlink()
                made.mkdir()
                (made / "inner.md").write_bytes(SAVE)
            real(src, dst, **flags)
            if real_first:
                made.write_bytes(b"made after\n")

        monkeypatch.setattr(atomic, "rename", rename)
        with pytest.raises(NotADirectoryError) as raised:
            _rename(alice, "plans/a.md", P)
        monkeypatch.undo()
        [aside] = fired
        assert aside in str(raised.value)
        assert (Path(aside) / "inner.md").read_bytes() == SAVE
        assert made.read_bytes() == b"made after\n"
        assert alice.read(P) == b"one\n"
    status = subprocess.run([CLI, "status", str(root)], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "plans/a.md" in status.stdout, status.stderr
    assert ".cv-" not in status.stdout, "nothing below a temp name is taken for a managed file"


KILLED_RENAMING = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, kill_after, save = Path(sys.argv[1]), sys.argv[2], sys.argv[3].encode()
real_rename = atomic.rename

def rename(src, dst, **flags):  # the rename's system calls: an editor's save of P before the exchange
    if save and flags.get("exchange"):
        tmp = root / "editor.tmp"
        tmp.write_bytes(save)
        os.replace(tmp, root / {P!r})
    real_rename(src, dst, **flags)
    if kill_after == "first" or flags.get("exchange"):
        os.kill(os.getpid(), signal.SIGKILL)

vol = CoherentVolume(root, agent="bob")
vol.read({P!r})
atomic.rename = rename
vol._core.rename("bob", vol._core.resolve("draft.txt"), vol._core.resolve({P!r}))
"""


@pytest.mark.parametrize(
    ("kill_after", "save"),
    [("first", b""), ("exchange", SAVE), ("exchange", b"B's content\n")],
    ids=["after-its-first-step", "after-its-exchange", "after-its-exchange-a-copy-of-another-file"],
)
def test_an_editors_save_by_rename_killed_midway_loses_nothing(root: Path, kill_after: str, save: bytes) -> None:
    """An editor's save by rename of an unmanaged file over a managed one, its process killed after
    either of its two system calls: the next process installs its content if it was not yet, and
    records and puts back a save of the destination that came just before (even bytes the
    registry keeps as another file's); nothing is left at the source's name or a temp name."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/b.md", b"B's content\n")
        alice.write(P, b"one\n")
    (root / "draft.txt").write_bytes(b"the draft\n")
    args = [sys.executable, "-c", KILLED_RENAMING, str(root), kill_after, save.decode()]
    assert subprocess.run(args, cwd=REPO, timeout=120).returncode == -signal.SIGKILL
    with CoherentVolume(root, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")  # the next commit-locked operation settles it
        assert carol.read_version(P, 2) == b"the draft\n"
        assert [v.size for v in carol.history(P)] == [len(carol.read_version(P, v.version)) for v in carol.history(P)]
        if save:
            assert carol.read(P) == save
            assert _history(carol, P) == [(3, "foreign", "external"), (2, "commit", "bob"), (1, "commit", "alice")]
        else:
            assert carol.read(P) == b"the draft\n"
            assert _history(carol, P) == [(2, "commit", "bob"), (1, "commit", "alice")]
    assert not (root / "draft.txt").exists()
    assert _leftovers(root / "plans") == [] and _leftovers(root) == []


@pytest.mark.parametrize(
    ("kill_after", "save"), [("first", b""), ("exchange", SAVE)], ids=["after-its-first-step", "after-its-exchange"]
)
def test_a_save_by_rename_killed_midway_in_a_working_copy_and_completed_by_another_copy_leaves_nothing(
    tmp_path: Path, pg_url: str, kill_after: str, save: bytes
) -> None:
    """Another copy's recovery completes the killed rename's intent (the registry holds its
    content) and never sees this copy's temp name: this copy noted it first, and its next process
    removes the rename's bytes left there (the registry's version), or records and puts back the
    save its exchange displaced."""
    c0, c1 = _copies(tmp_path, pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
    (c1 / "draft.txt").write_bytes(b"the draft\n")
    args = [sys.executable, "-c", KILLED_RENAMING, str(c1), kill_after, save.decode()]
    assert subprocess.run(args, cwd=REPO, timeout=120).returncode == -signal.SIGKILL
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write("plans/other.md", b"x\n")  # its first transaction holds every path: recovery
        assert _history(alice, P)[0] == (2, "commit", "bob")
    with CoherentVolume(c1, agent="carol") as carol:
        carol.write("plans/mine.md", b"y\n")
        assert carol.read(P) == (save or b"the draft\n")
        assert _history(carol, P) == [
            *([(3, "foreign", "external")] if save else []),
            (2, "commit", "bob"),
            (1, "commit", "alice"),
        ]
    assert not (c1 / "draft.txt").exists()
    assert _leftovers(c1 / "plans") == [] and _leftovers(c1) == []


KILLED_AFTER_MOVING_THE_SOURCE = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, data = Path(sys.argv[1]), sys.argv[2].encode()
real_rename = atomic.rename
src = str(root / "plans/src.md")

def rename(a, b, **flags):  # a program saves the source, the rename moves it aside, the writer dies
    if atomic.named(a) == src:
        (root / "editor.tmp").write_bytes(data)
        os.replace(root / "editor.tmp", src)
        real_rename(a, b, **flags)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_rename(a, b, **flags)

vol = CoherentVolume(root, agent="bob")
vol.read({P!r})
vol.read("plans/src.md")
atomic.rename = rename
core = vol._core
core.rename("bob", core.resolve(src), core.resolve(str(root / {P!r})))
"""


@pytest.mark.parametrize("saved", ["NEW\n", "SAVE\n"], ids=["new bytes", "a revert of the source"])
def test_a_rename_killed_after_moving_a_source_saved_just_before_is_completed_with_the_moved_file(
    root: Path, saved: str
) -> None:
    """A checked rename of src.md over P, killed between moving its source (just saved by a
    program) to the temp name and exchanging it into place: recovery abandoned the move onto P,
    completed the source's deletion, then took what the temp name held for a save displaced at P
    and P's own old bytes, which that put back brought back, for another save ("saved outside the
    volume while v2 ... was put back", false) put back over it: P held its old bytes, the source
    was gone, the moved file only in history (/tmp/s32r2fw 3). Recovery completes the rename as
    the live path does: the moved file in place at P, recorded after the rename's version as a
    save at the source it carried."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/src.md", b"SAVE\n")
        alice.write(P, b"one\n")
        alice.write("plans/src.md", b"src\n")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_MOVING_THE_SOURCE, str(root), saved], cwd=REPO, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL
    with CoherentVolume(root, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")  # settles the rename's intents
        assert carol.read(P) == saved.encode()
        assert _history(carol, P) == [(3, "foreign", "external"), (2, "commit", "bob"), (1, "commit", "alice")]
        assert carol.read_version(P, 2) == b"src\n"
        assert [v.kind for v in carol.history("plans/src.md")][0] == "delete"
        with carol._core.registry.read() as tx:
            details = [e.detail or "" for e in tx.events(path=P, kind="foreign")]
        assert not any("was put back" in d for d in details), details
    assert (root / P).read_bytes() == saved.encode()
    assert not (root / "plans/src.md").exists()
    assert _leftovers(root / "plans") == [] and os.listdir(root / ".coherent/staging") == []
