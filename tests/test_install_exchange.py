"""A program that does not use the volume (an editor's save: a temp file renamed over the file) may
write a managed file after a commit's decision checked it and before the commit's install: the
install exchanges the staged file with whatever is there, so those bytes are never destroyed, but
put back in place and recorded as the version after the commit's (which stays in history), as a
save just after the install would be; logged, also when the writer is killed right after the
exchange, and in a working copy catching up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume, StaleWriteError, atomic

from .conftest import REPO
from .harness.volumes import sql

P = "plans/plan.md"
SAVE = b"the editor's save\n"


def _editor_saves_first(root: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the next install's rename (an exchange, or before it a plain rename) first let an
    editor save the target: a temp file outside the managed globs renamed over it. The targets it
    saved."""
    real_rename, real_replace = atomic.rename, os.replace
    saved: list[str] = []

    def save(dst: str) -> None:
        if not saved and os.path.realpath(dst).endswith(P):  # (a core call names it beneath its directory)
            tmp = root / "editor.tmp"
            tmp.write_bytes(SAVE)
            real_replace(tmp, dst)
            saved.append(dst)

    def rename(src: str, dst: str, **flags: bool) -> None:
        if flags.get("exchange"):
            save(dst)
        real_rename(src, dst, **flags)

    def replace(src: Any, dst: Any) -> None:
        save(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(atomic, "rename", rename)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return saved


def _race(root: Path, open_volume: Callable[[str], CoherentVolume], monkeypatch: pytest.MonkeyPatch) -> None:
    with open_volume("alice") as alice:
        alice.write(P, b"one\n")
        saved = _editor_saves_first(root, monkeypatch)
        assert alice.write(P, b"two\n") == 2
        monkeypatch.undo()
        assert saved, "the editor saved before the install"
        with pytest.raises(StaleWriteError):  # the save came after her commit: she has not read it
            alice.write(P, b"three\n")
    with open_volume("bob") as bob:
        assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
            (3, "foreign", "external"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert bob.read(P) == SAVE
        assert bob.read_version(P, 2) == b"two\n"
        with bob._core.registry.read() as tx:
            [recovered] = tx.events(path=P, kind="recover")
        assert (recovered.reason, recovered.version) == ("displaced", 2)
        assert "installed over a change made outside the volume just before, put back" in (recovered.detail or "")
        assert "restore PATH --version 2" in (recovered.detail or "")
    assert os.listdir(root / ".coherent/staging") == []


def test_an_editors_save_just_before_a_commits_install_is_put_back_and_recorded_after_it(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _race(root, lambda agent: CoherentVolume(root, agent=agent), monkeypatch)


def test_a_working_copy_puts_back_an_editors_save_made_just_before_a_commits_install(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_registry_postgresql import _pg_volume

    root = _pg_volume(tmp_path / "copy", pg_url)
    _race(root, lambda agent: CoherentVolume(root, agent=agent), monkeypatch)


KILLED_AFTER_EXCHANGE = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root = Path(sys.argv[1])
real_rename, real_replace = atomic.rename, os.replace

def save(dst):
    tmp = root / "editor.tmp"
    tmp.write_bytes({SAVE!r})
    real_replace(tmp, dst)

def rename(src, dst, **flags):  # the install: the editor saves, the exchange happens, the writer dies
    if not flags.get("exchange"):
        return real_rename(src, dst, **flags)
    save(dst)
    real_rename(src, dst, **flags)
    os.kill(os.getpid(), signal.SIGKILL)

def replace(src, dst):  # the install before exchanges
    save(dst)
    real_replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

vol = CoherentVolume(root, agent="victim")
vol.read({P!r})
atomic.rename, atomic.os.replace = rename, replace
vol.write({P!r}, b"the victim's content\\n")
"""


def test_a_writer_killed_right_after_its_install_displaced_an_editors_save_loses_nothing(root: Path) -> None:
    with CoherentVolume(root, agent="seed") as seed:
        seed.write(P, b"one\n")
    victim = subprocess.run([sys.executable, "-c", KILLED_AFTER_EXCHANGE, str(root)], cwd=REPO, timeout=120)
    assert victim.returncode == -signal.SIGKILL
    assert (root / P).read_bytes() == b"the victim's content\n"  # exchanged: the save at the staged name
    with CoherentVolume(root, agent="bob") as bob:
        bob.write("plans/other.md", b"x\n")  # any commit-locked operation settles the intent
        assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
            (3, "foreign", "external"),
            (2, "commit", "victim"),
            (1, "commit", "seed"),
        ]
        assert bob.read(P) == SAVE
        assert bob.read_version(P, 2) == b"the victim's content\n"
    recovered = sql(root, f"SELECT reason, version FROM events WHERE kind = 'recover' AND path = '{P}'")
    assert recovered == [("displaced", 2)]
    why = sql(root, f"SELECT detail FROM events WHERE kind = 'foreign' AND path = '{P}'")
    assert why == [
        ("changed outside the volume just before the install of v2 by victim, which displaced it: put back in place",)
    ]
    assert sql(root, "SELECT count(*) FROM intents") == [(0,)]
    assert os.listdir(root / ".coherent/staging") == []


def _copy_behind(tmp_path: Path, pg_url: str, *later: bytes) -> tuple[Path, Path]:
    """Two working copies of a PostgreSQL volume: c0, where alice wrote P as b"one\\n" and then
    each of `later`, and c1, whose bob read the first of those only (so c1 holds it, behind)."""
    from .test_registry_postgresql import _join, _pg_volume

    c0, c1 = _pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)
    with CoherentVolume(c0, agent="alice") as alice:
        alice.write(P, b"one\n")
        with CoherentVolume(c1, agent="bob") as bob:
            assert bob.read(P) == b"one\n"
        for data in later:
            alice.write(P, data)
    return c0, c1


def test_a_working_copy_catching_up_puts_back_an_editors_save_made_after_its_check(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    c0, c1 = _copy_behind(tmp_path, pg_url, b"two\n")
    with CoherentVolume(c1, agent="bob") as bob:
        saved = _editor_saves_first(c1, monkeypatch)
        assert bob.read(P) == SAVE  # c1 caught up with v2, which displaced the save: put back
        monkeypatch.undo()
        assert saved, "the editor saved before the catch-up's install"
        assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
            (3, "foreign", "external"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert bob.read_version(P, 2) == b"two\n"
    assert (c1 / P).read_bytes() == SAVE
    assert [n for n in os.listdir(c1 / "plans") if n != "plan.md"] == []


def test_a_save_put_back_is_recorded_before_it_goes_back_so_a_next_save_cannot_replace_it_unseen(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the install and the save's return to its place a reader found the file holding the
    commit, as recorded, so its program may save again at once, over the save put back."""
    real_swap = atomic.swap_in
    swaps: list[str] = []

    def save(data: bytes) -> None:
        (root / "editor.tmp").write_bytes(data)
        os.replace(root / "editor.tmp", root / P)

    def swap(src: str, dst: str) -> bool:
        swaps.append(dst)
        if len(swaps) == 1:  # the install
            save(SAVE)
        swapped = real_swap(src, dst)
        if len(swaps) == 2:  # the save's return to its place
            save(b"the editor's next save\n")
        return swapped

    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
        monkeypatch.setattr(atomic, "swap_in", swap)
        assert alice.write(P, b"two\n") == 2
        monkeypatch.undo()
        assert len(swaps) == 2
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == b"the editor's next save\n"
        assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
            (4, "foreign", "external"),
            (3, "foreign", "external"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert bob.read_version(P, 3) == SAVE
    assert os.listdir(root / ".coherent/staging") == []


@pytest.mark.parametrize("kept_as", ["another path's version", "an older version of the path"])
def test_an_editors_save_of_bytes_the_volume_keeps_elsewhere_is_put_back_and_recorded_all_the_same(
    root: Path, monkeypatch: pytest.MonkeyPatch, kept_as: str
) -> None:
    """A save displaced by an install holding bytes the registry keeps anyway (a copy of another
    managed file, a revert to an earlier version) was taken for the registry's own and dropped by
    recovery: the save was gone from the file and from the path's history (/tmp/s32paths 1: 31 of
    325 saves by rename lost while an agent committed through the mount every few ms, whenever the
    saved bytes had been another file's before). They are a change of this path all the same."""
    with CoherentVolume(root, agent="alice") as alice:
        if kept_as == "another path's version":
            alice.write("plans/other.md", SAVE)
        else:
            alice.write(P, SAVE)
        alice.write(P, b"one\n")
        before = alice.version(P)
        saved = _editor_saves_first(root, monkeypatch)
        assert alice.write(P, b"two\n") == before + 1
        monkeypatch.undo()
        assert saved, "the editor saved before the install"
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == SAVE
        [newest, *_] = bob.history(P)
        assert (newest.version, newest.kind, newest.writer) == (before + 2, "foreign", "external")
        assert bob.read_version(P, before + 1) == b"two\n"
    assert os.listdir(root / ".coherent/staging") == []


def _saves_before_swaps(root: Path, saves: list[bytes], monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Make a program save P (a temp file renamed over it) with `saves[k]` just before the k-th
    exchange onto P (the install first, then the put back's rounds). The saves made."""
    real_swap = atomic.swap_in
    made: list[bytes] = []

    def swap(src: str, dst: str) -> bool:
        if atomic.named(dst).endswith(P) and len(made) < len(saves):
            (root / "editor.tmp").write_bytes(saves[len(made)])
            os.replace(root / "editor.tmp", dst)
            made.append(saves[len(made)])
        return real_swap(src, dst)

    monkeypatch.setattr(atomic, "swap_in", swap)
    return made


SAVES_DURING_PUT_BACK = {
    "the commit's bytes": [b"F1\n", b"two\n"],
    "a save the put back recorded": [b"A\n", b"B\n", b"A\n"],
    "the version before": [b"F1\n", b"one\n"],
}


def _later_saves_win(
    root: Path, open_volume: Callable[[str], CoherentVolume], saves: list[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_volume("alice") as alice:
        alice.write(P, b"one\n")
    with open_volume("bob") as bob:
        assert bob.read(P) == b"one\n"
        made = _saves_before_swaps(root, saves, monkeypatch)
        assert bob.write(P, b"two\n") == 2
        monkeypatch.undo()
        assert made == saves, "each save came before an exchange onto the path"
    assert (root / P).read_bytes() == saves[-1]  # the program's last save is the file
    with open_volume("carol") as carol:
        assert carol.read(P) == saves[-1]
        history = [(v.version, v.kind, v.writer) for v in carol.history(P)]
        assert history[-2:] == [(2, "commit", "bob"), (1, "commit", "alice")]
        assert all(kind == "foreign" for _, kind, _ in history[:-2])
        assert [carol.read_version(P, v) for v, _, _ in reversed(history[:-2])] == saves
    assert os.listdir(root / ".coherent/staging") == []


@pytest.mark.parametrize("saves", list(SAVES_DURING_PUT_BACK.values()), ids=list(SAVES_DURING_PUT_BACK))
def test_a_save_during_a_put_back_is_recorded_and_put_in_place_whatever_its_bytes(
    root: Path, monkeypatch: pytest.MonkeyPatch, saves: list[bytes]
) -> None:
    """A second save landing while a put back is under way, holding the commit's bytes or the
    bytes of a save this put back recorded, was taken for the commit's own file (or the one put
    back) and dropped: the program's last save was no version and not the file (/tmp/s32r2fw 2).
    The commit's own file is told by its inode, never by its bytes: every other file an exchange
    brings back is recorded and put in place in turn."""
    _later_saves_win(root, lambda agent: CoherentVolume(root, agent=agent), saves, monkeypatch)


@pytest.mark.parametrize("saves", list(SAVES_DURING_PUT_BACK.values()), ids=list(SAVES_DURING_PUT_BACK))
def test_a_working_copy_puts_in_place_a_save_made_during_a_put_back_whatever_its_bytes(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, saves: list[bytes]
) -> None:
    from .test_registry_postgresql import _pg_volume

    root = _pg_volume(tmp_path / "copy", pg_url)
    _later_saves_win(root, lambda agent: CoherentVolume(root, agent=agent), saves, monkeypatch)


@pytest.mark.parametrize(
    "saves",
    [[b"F1\n", b"three\n"], [b"A\n", b"B\n", b"A\n"], [b"F1\n", b"one\n"]],
    ids=["current", "alternate", "held"],
)
def test_a_working_copy_catching_up_puts_in_place_a_save_made_during_its_put_back_whatever_its_bytes(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, saves: list[bytes]
) -> None:
    """As a commit's put back: a catch-up's put back brings back the catch-up's own file or a
    later save, told apart by inode (/tmp/s32r2fw 2, `pg_catchup.py`)."""
    _, c1 = _copy_behind(tmp_path, pg_url, b"two\n", b"three\n")
    with CoherentVolume(c1, agent="bob") as bob:
        made = _saves_before_swaps(c1, saves, monkeypatch)
        assert bob.read(P) == saves[-1]
        monkeypatch.undo()
        assert made == saves
        history = [(v.version, v.kind) for v in bob.history(P)]
        assert history[-3:] == [(3, "commit"), (2, "commit"), (1, "commit")]
        assert [bob.read_version(P, v) for v, _ in reversed(history[:-3])] == saves
    assert (c1 / P).read_bytes() == saves[-1]
    assert [n for n in os.listdir(c1 / "plans") if n != "plan.md"] == []


REVERT_KILLED = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root = Path(sys.argv[1])
real_swap = atomic.swap_in

def swap(src, dst):  # the install: the program reverts P, the exchange happens, the writer dies
    (root / "editor.tmp").write_bytes({SAVE!r})
    os.replace(root / "editor.tmp", dst)
    real_swap(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)

vol = CoherentVolume(root, agent="bob")
vol.read({P!r})
atomic.swap_in = swap
vol.write({P!r}, b"two\\n")
"""


@pytest.mark.parametrize("killed", [False, True], ids=["live", "killed after the exchange"])
def test_a_working_copy_puts_back_a_revert_its_install_displaced(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, killed: bool
) -> None:
    """A revert to an earlier version, saved just before a working copy's install, was taken for a
    version the copy held while behind and dropped, unlogged (/tmp/s32r2fw 1): only what the copy
    recorded holding there before the install (noted with it) is the copy's own."""
    from .test_registry_postgresql import _pg_volume

    root = _pg_volume(tmp_path / "copy", pg_url)
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, SAVE)
        alice.write(P, b"one\n")
    if killed:
        victim = subprocess.run([sys.executable, "-c", REVERT_KILLED, str(root)], cwd=REPO, timeout=120)
        assert victim.returncode == -signal.SIGKILL
    else:
        with CoherentVolume(root, agent="bob") as bob:
            bob.read(P)
            made = _saves_before_swaps(root, [SAVE], monkeypatch)
            assert bob.write(P, b"two\n") == 3
            monkeypatch.undo()
            assert made == [SAVE]
    with CoherentVolume(root, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")  # settles a killed writer's intent
        assert carol.read(P) == SAVE
        assert [(v.version, v.kind, v.writer) for v in carol.history(P)][:2] == [
            (4, "foreign", "external"),
            (3, "commit", "bob"),
        ]
        assert carol.read_version(P, 4) == SAVE
    assert (root / P).read_bytes() == SAVE
    assert os.listdir(root / ".coherent/staging") == []


@pytest.mark.parametrize("killed", [False, True], ids=["live", "killed after the exchange"])
def test_a_working_copy_behind_drops_the_older_version_its_install_displaced(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, killed: bool
) -> None:
    """The other side: a copy holding v1 while another host committed v2 installs v3 without
    catching up first (its catch-up made a no-op here: a copy behind); what the install displaces
    is the v1 the copy held there, noted so before the install: removed, never recorded and put
    back over v2 and v3, also when the writer stops right after the exchange."""
    c0, c1 = _copy_behind(tmp_path, pg_url, b"two\n")
    real_swap = atomic.swap_in
    with CoherentVolume(c0, agent="bob") as bob:
        assert bob.read(P) == b"two\n"  # bob's view: v2, read through c0
    with CoherentVolume(c1, agent="bob") as bob:
        core = bob._core
        assert core.replica is not None
        monkeypatch.setattr(core.replica, "install", lambda *args: None)  # c1 stays behind, holding v1

        def swap(src: str, dst: str) -> bool:
            swapped = real_swap(src, dst)
            if killed and atomic.named(dst).endswith(P):
                raise KeyboardInterrupt  # the writer stops right after the exchange
            return swapped

        monkeypatch.setattr(atomic, "swap_in", swap)
        try:
            bob.write(P, b"three\n")
        except KeyboardInterrupt:
            pass
        monkeypatch.undo()
    with CoherentVolume(c1, agent="carol") as carol:
        carol.write("plans/other.md", b"x\n")
        assert carol.read(P) == b"three\n"
        assert [(v.version, v.kind) for v in carol.history(P)] == [(3, "commit"), (2, "commit"), (1, "commit")]
    assert (c1 / P).read_bytes() == b"three\n"
    assert os.listdir(c1 / ".coherent/staging") == []


@pytest.mark.parametrize("cas", [False, True])
def test_a_deletion_overtaken_by_saves_around_its_set_aside_is_refused_as_stale_and_logged_as_such(
    root: Path, monkeypatch: pytest.MonkeyPatch, cas: bool
) -> None:
    """A program saves the file just before a live deletion sets it aside and again just after:
    recovery abandons the deletion (the file holds a newer save) and puts back what it set aside,
    recording both saves in their order. No process died: the deleter is refused as a stale writer
    (it never read those saves), not told RegistryError that "crash recovery" did not record its
    change, and the log names no version for the deletion, which has none (/tmp/s33fw 3)."""
    from coherent_volume.errors import CasConflict, RegistryError

    real_aside = atomic.set_aside

    def save(data: bytes) -> None:
        (root / "editor.tmp").write_bytes(data)
        os.replace(root / "editor.tmp", root / P)

    def set_aside(path: str, aside: str) -> bool:
        save(SAVE)
        done = real_aside(path, aside)
        save(b"the editor's next save\n")
        return done

    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one\n")
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == b"one\n"
        monkeypatch.setattr(atomic, "set_aside", set_aside)
        with pytest.raises(StaleWriteError) as refused:
            if cas:
                bob._core.commit("bob", bob._target(P), None, expected=1)
            else:
                bob.delete(P)
        monkeypatch.undo()
        from coherent_volume import DeletionOvertaken

        e = refused.value
        assert isinstance(e, DeletionOvertaken) and not isinstance(e, RegistryError)
        assert isinstance(e, CasConflict) == cas
        assert (e.reason, e.seen_version, e.current_version, e.last_writer) == ("stale", 1, 3, "external")
        assert "was not made: a program saved the file outside the volume while the deletion" in str(e)
        assert "crash recovery" not in str(e)
        assert bob.read(P) == b"the editor's next save\n"
        assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
            (3, "foreign", "external"),
            (2, "foreign", "external"),
            (1, "commit", "alice"),
        ]
        assert bob.read_version(P, 2) == SAVE
    lines = sql(root, f"SELECT kind, version, detail FROM events WHERE path = '{P}' AND kind != 'commit' ORDER BY seq")
    assert [(kind, version) for kind, version, _ in lines] == [
        ("recover", None),
        ("foreign", 2),
        ("recover", None),
        ("foreign", 3),
        ("refusal", 3),
    ]
    said = " | ".join(detail for _, _, detail in lines)
    assert "interrupted commit" not in said and "by bob" not in said and "--version 2" not in said
    assert "abandoned bob's removal of the file" in lines[0][2]
    assert "just before bob's removal of the file (not recorded" in lines[1][2]
    assert os.listdir(root / ".coherent/staging") == []
    assert sorted(os.listdir(root / "plans")) == ["plan.md"]


KILLED_IN_PUT_BACK = f"""
import os, signal, sys
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, kill_at, second = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "after"
real_install, real_swap = atomic.Staged.install, atomic.swap_in
swaps = []

def save(data):
    (root / "editor.tmp").write_bytes(data)
    os.replace(root / "editor.tmp", root / {P!r})

def install(self, *a, **k):  # the editor saves between the decision and the install
    save(b"save A\\n")
    return real_install(self, *a, **k)

def swap_in(src, dst):  # the install's exchange, then the put back's: 1, and 2 when a save B met the first
    swaps.append(dst)
    if len(swaps) == 2 and kill_at >= 2:
        save(b"save B\\n")  # just before the first put back's exchange
    if len(swaps) == kill_at + 1 and not second:
        os.kill(os.getpid(), signal.SIGKILL)
    swapped = real_swap(src, dst)
    if len(swaps) == kill_at + 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return swapped

vol = CoherentVolume(root, agent="victim")
vol.read({P!r})
atomic.Staged.install, atomic.swap_in = install, swap_in
vol.write({P!r}, b"the victim's content\\n")
"""


@pytest.mark.parametrize("later", [False, True], ids=["", "then a save C"])
@pytest.mark.parametrize(
    "kill_at,when",
    [(1, "before"), (1, "after"), (2, "before"), (2, "after")],
    ids=["before the put back's exchange", "after it", "before the second one", "after the second one"],
)
def test_a_writer_killed_at_any_step_of_a_put_back_loses_no_save_and_keeps_their_order(
    root: Path, kill_at: int, when: str, later: bool
) -> None:
    """A save A displaced by a commit's install is put back: recorded, then exchanged into place;
    a save B made at the name meanwhile is recorded and put in place in turn. The writer is killed
    -9 before or after either exchange; then maybe the editor saves C over whatever is in place.
    The next recovery ends with the newest save in place and every save in history, in the order
    they were made: each record is committed before its exchange, and recovery tells from where
    the recorded file is which step was done. Before, the record and the exchange shared one
    transaction: a kill after the exchange left A in place unrecorded (lost once C replaced it),
    and B at the staged name, put back over A as if it were older (/tmp/s33fw 1, 2)."""
    with CoherentVolume(root, agent="seed") as seed:
        seed.write(P, b"one\n")
    victim = subprocess.run(
        [sys.executable, "-c", KILLED_IN_PUT_BACK, str(root), str(kill_at), when], cwd=REPO, timeout=120
    )
    assert victim.returncode == -signal.SIGKILL
    saves = [b"save A\n", b"save B\n"][:kill_at]
    if later:
        (root / "editor.tmp").write_bytes(b"save C\n")
        os.replace(root / "editor.tmp", root / P)
        saves.append(b"save C\n")
    with CoherentVolume(root, agent="bob") as bob:
        bob.write("plans/other.md", b"x\n")  # any commit-locked operation settles the intent
        assert bob.read(P) == saves[-1]
        history = sorted(bob.history(P), key=lambda v: v.version)
        assert [(v.version, v.writer) for v in history] == [(1, "seed"), (2, "victim")] + [
            (3 + i, "external") for i in range(len(saves))
        ]
        assert [bob.read_version(P, v.version) for v in history[2:]] == saves
    assert sql(root, "SELECT count(*) FROM intents") == [(0,)]
    assert os.listdir(root / ".coherent/staging") == []
    assert sorted(os.listdir(root / "plans")) == ["other.md", "plan.md"]


def test_a_put_back_whose_directory_a_program_removed_meanwhile_wedges_nothing(root: Path) -> None:
    """A put back's step recorded save A (displaced by a commit's install), its writer killed before
    the exchange; then a program removed the file's directory (`rm -r plans`). The exchange, made by
    the next recovery, failed ENOENT out of every process's first operation on any path, and every
    mount (/tmp/s33r2fw 2). The put back stops there as for a directory made at the name: save A is
    kept in history, its staged file removed, and what the disk holds (no file) is recorded after."""
    with CoherentVolume(root, agent="seed") as seed:
        seed.write(P, b"one\n")
    victim = subprocess.run([sys.executable, "-c", KILLED_IN_PUT_BACK, str(root), "1", "before"], cwd=REPO, timeout=120)
    assert victim.returncode == -signal.SIGKILL
    shutil.rmtree(root / "plans")
    with CoherentVolume(root, agent="bob") as bob:
        bob.write("notes.md", b"x\n")  # a commit-locked operation on another path settles the intent
        history = sorted(bob.history(P), key=lambda v: v.version)
        assert [(v.version, v.writer, v.kind) for v in history] == [
            (1, "seed", "commit"),
            (2, "victim", "commit"),
            (3, "external", "foreign"),
            (4, "external", "delete"),
        ]
        assert bob.read_version(P, 3) == b"save A\n"
    assert sql(root, "SELECT count(*) FROM intents") == [(0,)]
    assert os.listdir(root / ".coherent/staging") == []
    assert not (root / "plans").exists()
