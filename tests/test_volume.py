"""The Python API's guarantees (issue: core), one process, several agents."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from coherent_volume import (
    Absent,
    CasConflict,
    CoherenceError,
    CoherentVolume,
    NotManaged,
    RetriesExhausted,
    StaleWriteError,
    VolumeConfigError,
)
from coherent_volume.errors import InvalidPath
from coherent_volume.fingerprint import content_hash

from .conftest import run_py
from .harness.volumes import read_log

P = "plans/plan.md"


def test_read_registers_view_at_version_of_the_bytes(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    assert alice.write(P, b"v1") == 1
    assert bob.read(P) == b"v1"
    assert bob.read_text(P) == "v1"
    assert bob.write(P, b"v2") == 2
    assert alice.stale() == [P]
    assert alice.read(P) == b"v2" and alice.stale() == []


def test_stale_write_is_refused_with_full_detail_and_changes_nothing(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"base")
    bob.read(P)
    alice.write(P, b"alice's work")
    with pytest.raises(StaleWriteError) as info:
        bob.write(P, b"bob clobbers")
    e = info.value
    assert isinstance(e, PermissionError) and e.errno == errno.EACCES
    assert (e.path, e.agent, e.reason, e.seen_version, e.current_version, e.last_writer) == (
        P,
        "bob",
        "stale",
        1,
        2,
        "alice",
    )
    assert "re-read" in str(e) and "redo the change" in str(e)
    assert (root / P).read_bytes() == b"alice's work"
    assert bob.version(P) == 2


def test_overwrite_of_a_never_read_file_is_refused_as_unread(vols, root: Path) -> None:
    vols("alice").write(P, b"mine")
    with pytest.raises(StaleWriteError) as info:
        vols("bob").write(P, b"theirs")
    assert info.value.reason == "unread" and info.value.seen_version is None
    assert (root / P).read_bytes() == b"mine"


def test_an_absolute_path_with_slashes_doubled_after_the_root_is_the_file_it_names(vols, root: Path) -> None:
    """`ROOT//plans/x.md` is `plans/x.md`, as for the kernel: checked as it (it was refused as a path
    outside the volume, naming `/plans/x.md`)."""
    vols("alice").write(P, b"mine")
    for spelling in (f"{root}//{P}", f"{root}///{P.replace('/', '//')}"):
        with pytest.raises(StaleWriteError) as info:
            vols("bob").write(spelling, b"theirs")
        assert info.value.reason == "unread" and info.value.path == P
    assert vols("alice").read(f"{root}//{P}") == b"mine"
    assert (root / P).read_bytes() == b"mine"


def test_a_write_over_a_deletion_since_the_view_says_so_and_how_to_take_it_in(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"v1")
    bob.read(P)
    bob.delete(P)
    with pytest.raises(StaleWriteError) as info:
        alice.write(P, b"v2 from v1")
    said = str(info.value)
    assert info.value.deleted and "current version is 2 (the file's deletion), deleted by 'bob'" in said, said
    assert "look at its directory again to take in the deletion" in said and "re-read" not in said, said
    with pytest.raises(FileNotFoundError):  # the remedy, through the API
        alice.read(P)
    assert alice.write(P, b"made anew") == 3


def test_a_path_given_as_bytes_is_refused_saying_to_give_it_as_str(vols, root: Path) -> None:
    alice = vols("alice")
    for use in (lambda: alice.read(b"plans/x.md"), lambda: alice.write(b"plans/x.md", b"x")):  # type: ignore[arg-type]
        with pytest.raises(InvalidPath, match=r"is bytes: give it as str"):
            use()
    assert not (root / "plans/x.md").exists()


def test_racing_creators_exactly_one_wins(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    assert alice.write("plans/new.md", b"a") == 1
    with pytest.raises(StaleWriteError, match="unread"):
        bob.write("plans/new.md", b"b")


def test_write_is_atomic_keeps_mode_and_leaves_no_temp_files(vols, root: Path) -> None:
    alice = vols("alice")
    alice.write(P, b"x" * 10_000)
    os.chmod(root / P, 0o640)
    alice.write(P, b"y" * 20_000)
    assert os.stat(root / P).st_mode & 0o777 == 0o640
    assert (root / P).read_bytes() == b"y" * 20_000
    assert sorted(os.listdir(root / "plans")) == ["plan.md"]


def test_new_file_mode_follows_umask_and_parents_are_created(vols, root: Path) -> None:
    old = os.umask(0o027)
    try:
        vols("alice").write("plans/a/b/c.md", b"deep")
    finally:
        os.umask(old)
    assert os.stat(root / "plans/a/b/c.md").st_mode & 0o777 == 0o640


def test_identical_bytes_are_a_no_op(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"same")
    bob.read(P)
    assert alice.write(P, b"same") == 1
    assert bob.stale() == [] and bob.write(P, b"bob") == 2


def test_foreign_write_is_detected_at_read_and_recorded_as_external(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"one")
    bob.read(P)
    (root / P).write_bytes(b"edited by hand")
    assert alice.read(P) == b"edited by hand"
    assert alice.version(P) == 2
    assert bob.stale() == [P]
    with pytest.raises(StaleWriteError) as info:
        bob.write(P, b"built on one")
    assert info.value.last_writer == "external" and info.value.current_version == 2


def test_foreign_write_is_detected_at_write(vols, root: Path) -> None:
    alice = vols("alice")
    alice.write(P, b"one")
    (root / P).write_bytes(b"two!")  # same size would also do: the content hash decides
    with pytest.raises(StaleWriteError) as info:
        alice.write(P, b"built on one")
    assert info.value.reason == "stale" and info.value.last_writer == "external"
    assert (root / P).read_bytes() == b"two!"


def test_same_size_same_second_foreign_write_is_detected(vols, root: Path) -> None:
    alice = vols("alice")
    alice.write(P, b"aaaa")
    st = os.stat(root / P)
    (root / P).write_bytes(b"bbbb")
    os.utime(root / P, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide behind the old mtime
    with pytest.raises(StaleWriteError):
        alice.write(P, b"cccc")


def test_foreign_create_and_delete(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    (root / "plans/handmade.md").write_text("from an editor")
    with pytest.raises(StaleWriteError, match="unread"):
        alice.write("plans/handmade.md", b"overwrite")
    assert alice.read("plans/handmade.md") == b"from an editor"
    bob.read("plans/handmade.md")
    (root / "plans/handmade.md").unlink()
    with pytest.raises(StaleWriteError) as info:
        bob.write("plans/handmade.md", b"resurrect old content")
    assert info.value.reason == "stale"
    with pytest.raises(FileNotFoundError):
        bob.read("plans/handmade.md")
    assert bob.write("plans/handmade.md", b"fresh start") == 3


def test_delete_has_the_same_checks_as_write(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"x")
    with pytest.raises(StaleWriteError, match="unread"):
        bob.delete(P)
    bob.read(P)
    alice.read(P)
    assert bob.delete(P) == 2
    assert not (root / P).exists()
    with pytest.raises(StaleWriteError, match="stale"):
        alice.write(P, b"built on the deleted file")
    with pytest.raises(FileNotFoundError):
        vols("carol").delete("plans/never.md")


def test_a_rename_the_kernel_refuses_records_nothing(vols, root: Path) -> None:
    """A checked rename whose rename(2) fails (RENAME_NOREPLACE onto an existing file) raises the
    kernel's error and records nothing, even where the destination already held the same bytes:
    no version by the renamer, no view of another agent made stale."""
    carol, peer = vols("carol"), vols("peer")
    carol.write("plans/s1.md", "same")
    carol.write("plans/s2.md", "same")
    peer.read("plans/s2.md")
    core = carol._core
    with pytest.raises(FileExistsError):
        core.rename("carol", core.resolve("plans/s1.md"), core.resolve("plans/s2.md"), noreplace=True)
    assert [(v.version, v.writer) for v in carol.history("plans/s2.md")] == [(1, "carol")]
    assert [(v.version, v.kind) for v in carol.history("plans/s1.md")] == [(1, "commit")]
    assert (root / "plans/s1.md").read_bytes() == (root / "plans/s2.md").read_bytes() == b"same"
    assert peer.stale() == []
    assert peer.write("plans/s2.md", "peer") == 2


def test_a_write_whose_content_cannot_be_made_durable_records_and_changes_nothing(
    vols, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the new content's fsync fails (a disk error), the write raises that error before its
    commit point: no version, no log line, the file and every view as they were, and the next write
    goes through."""
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"v1")
    bob.read(P)
    real, failed = os.fsync, threading.Event()

    def failing(fd: int) -> None:
        if not failed.is_set():
            failed.set()
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError) as info:
        alice.write(P, b"v2")
    assert info.value.errno == errno.EIO and failed.is_set()
    assert [(v.version, v.writer) for v in alice.history(P)] == [(1, "alice")]
    assert [e["kind"] for e in read_log(root) if e.get("path") == P] == ["commit"]
    assert (root / P).read_bytes() == b"v1" and bob.stale() == []
    assert not [name for name in os.listdir(root / ".coherent/staging") if not name.startswith("..")]
    assert alice.write(P, b"v2") == 2 and (root / P).read_bytes() == b"v2"


WRITES_AT_SHUTDOWN = """
import sys, threading
from coherent_volume import CoherentVolume
vol = CoherentVolume(sys.argv[1], agent="late")
def late():
    threading.main_thread().join()  # the interpreter is shutting down now
    print(vol.write("plans/late.md", b"late"), flush=True)
threading.Thread(target=late).start()
"""


def test_a_write_made_while_the_interpreter_shuts_down_is_committed(root: Path) -> None:
    """A thread that writes after the main thread ended (the interpreter shutting down: no new
    thread may start, so a write must need none) still commits."""
    done = run_py(WRITES_AT_SHUTDOWN, str(root))
    assert (done.returncode, done.stdout, done.stderr) == (0, "1\n", "")
    assert (root / "plans/late.md").read_bytes() == b"late"


def test_write_cas(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    assert alice.write_cas(P, 0, b"created") == 1
    assert bob.write_cas(P, 1, b"second") == 2
    with pytest.raises(CasConflict) as info:
        alice.write_cas(P, 1, b"late")
    assert isinstance(info.value, StaleWriteError)
    assert (info.value.expected_version, info.value.current_version, info.value.reason) == (1, 2, "stale")
    alice.read(P)  # a current view does not make content built on version 1 current (its message says so:
    with pytest.raises(CasConflict) as info:  # it said "you read version 2; current version is 2", /tmp/s30race 3)
        alice.write_cas(P, 1, b"late")
    assert "the content was built on version 1 (you read version 2); current version is 2" in str(info.value)
    with pytest.raises(CasConflict):
        bob.write_cas("plans/other.md", 3, b"no such version")


def test_update_retries_and_exhausts(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    assert alice.update(P, lambda old: old + b"a") == 1
    assert bob.update(P, lambda old: old + b"b") == 2
    assert alice.read(P) == b"ab"
    with alice.lock(P, ttl=30), pytest.raises(RetriesExhausted) as info:
        bob.update(P, lambda old: old + b"!", retries=2)
    assert info.value.reason == "held" and isinstance(info.value, CasConflict)
    assert bob.update(P, lambda old: old + b"c") == 3


def test_update_of_a_missing_file_never_overwrites_a_creation_made_after_its_read(
    vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`update` finds the file deleted (v2); bob creates it (v3) before alice's commit: the commit
    expects the version alice's read observed, is refused, and her next round applies her change
    to bob's bytes (/tmp/s26pgmodel F1: it asked the version after the read, got bob's v3, and
    committed its change to nothing over bob's file, 70 of 100 races on PostgreSQL). A missing
    file's read raises Absent with that version."""
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"first\n")
    alice.delete(P)
    with pytest.raises(Absent) as absent:
        alice.read(P)
    assert absent.value.version == 2 and absent.value.errno == errno.ENOENT
    read = alice._core.read

    def read_then_bob_creates(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except FileNotFoundError:
            if bob.version(P) == 2:
                bob.write(P, b"bob's plan\n")
            raise

    monkeypatch.setattr(alice._core, "read", read_then_bob_creates)
    assert alice.update(P, lambda old: old + b"alice's line\n") == 4
    assert alice.read(P) == b"bob's plan\nalice's line\n"
    assert [(v.version, v.writer) for v in alice.history(P)][:2] == [(4, "alice"), (3, "bob")]


def test_update_from_many_threads_on_one_instance_is_exact(vols) -> None:
    alice = vols("alice")
    alice.write("plans/counter", b"0")

    def work() -> None:
        for _ in range(25):
            alice.update("plans/counter", lambda old: str(int(old) + 1).encode(), retries=1000)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert alice.read("plans/counter") == b"200"
    assert alice.version("plans/counter") == 201


def test_read_set_isolation_prevents_write_skew(vols) -> None:
    setup = vols("setup2")
    setup.write("plans/a", b"1")
    setup.write("plans/b", b"1")
    alice, bob = vols("alice", isolation="read-set"), vols("bob", isolation="read-set")
    for v in (alice, bob):
        v.read("plans/a")
        v.read("plans/b")
    assert alice.write("plans/a", b"2") == 2
    with pytest.raises(StaleWriteError) as info:
        bob.write("plans/b", b"2")
    assert info.value.reason == "read-set" and info.value.changed == ("plans/a",)
    bob.forget("plans/a")
    assert bob.write("plans/b", b"2") == 2


@pytest.mark.parametrize("before", ["never", "deleted"])
def test_read_set_isolation_counts_a_read_that_found_no_file(vols, root: Path, before: str) -> None:
    """Two agents each read that neither a nor b exists and create one of them: the second is
    refused, as with files that exist (the invariant "at most one of them" holds)."""
    if before == "deleted":
        setup = vols("setup")
        for p in ("plans/a", "plans/b"):
            setup.write(p, b"old")
            setup.delete(p)
    x, y = vols("x", isolation="read-set"), vols("y", isolation="read-set")
    for v in (x, y):
        for p in ("plans/a", "plans/b"):
            with pytest.raises(FileNotFoundError):
                v.read(p)
    x.write("plans/a", b"on call")
    with pytest.raises(StaleWriteError) as info:
        y.write("plans/b", b"on call")
    assert info.value.reason == "read-set" and info.value.changed == ("plans/a",)
    assert not (root / "plans/b").exists()
    with pytest.raises(StaleWriteError) as info:  # its read of a found nothing: a write of it is stale
        y.write("plans/a", b"mine")
    assert info.value.reason == "stale" and y.read("plans/a") == b"on call"


def test_read_set_isolation_sees_foreign_changes_of_other_files(vols, root: Path) -> None:
    alice = vols("alice", isolation="read-set")
    alice.write("plans/a", b"1")
    alice.write("plans/b", b"1")
    (root / "plans/b").write_bytes(b"hand edit")
    with pytest.raises(StaleWriteError, match="read-set"):
        alice.write("plans/a", b"2")


def test_file_isolation_ignores_other_files(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write("plans/a", b"1")
    bob.read("plans/a")
    alice.write("plans/a", b"2")
    assert bob.write("plans/b", b"independent") == 1


def test_lock_refuses_others_and_releases(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"x")
    bob.read(P)
    with alice.lock(P, ttl=30):
        with pytest.raises(StaleWriteError) as info:
            bob.write(P, b"y")
        assert info.value.reason == "held" and info.value.holder == "alice"
        assert "reclaim" not in str(info.value)  # a short grant: waiting is the answer
        with pytest.raises(StaleWriteError, match="held"), bob.lock(P, timeout=0.2):
            pass
        assert alice.write(P, b"locked write") == 2
    bob.read(P)
    assert bob.write(P, b"after release") == 3


def test_a_long_lock_of_a_live_holder_is_refused_naming_reclaim(vols) -> None:
    """A volume copied while a process held a long lock carries the grant, and that process, alive,
    never releases it in the copy: the refusal said only to wait for a release that never comes."""
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"x")
    bob.read(P)
    with alice.lock(P, ttl=600), pytest.raises(StaleWriteError) as info:
        bob.write(P, b"y")
    assert info.value.reason == "held" and "a lock; its process is alive" in str(info.value)
    assert "`coherent-volume reclaim PATH` ends it now" in str(info.value)


def test_expired_grant_fences_the_holder_even_if_the_version_never_moved(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"x")
    with alice.lock(P, ttl=0.3):
        alice.read(P)
        time.sleep(0.4)
        bob.read(P)
        with bob.lock(P, ttl=30):  # reclaims alice's expired grant
            pass
        with pytest.raises(StaleWriteError) as info:
            alice.write(P, b"thinks it still holds the lock")
        assert info.value.reason == "fenced" and info.value.current_version == 1
    with pytest.raises(StaleWriteError, match="fenced"):
        alice.write(P, b"still fenced until reacquire")
    assert alice.reacquire(P) == b"x"
    assert alice.write(P, b"ok") == 2


def test_holder_write_after_ttl_is_fenced_without_any_other_agent(vols) -> None:
    alice = vols("alice")
    alice.write(P, b"x")
    with alice.lock(P, ttl=0.2):
        time.sleep(0.3)
        with pytest.raises(StaleWriteError, match="fenced"):
            alice.write(P, b"late")


def test_lock_on_unmanaged_path_is_an_error(vols) -> None:
    with pytest.raises(NotManaged), vols("alice").lock("notes.txt"):
        pass


def test_unmanaged_paths_pass_through(vols, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    assert alice.write("notes.txt", b"a") == 0
    assert bob.write("notes.txt", b"b") == 0  # never read, still accepted
    (root / "notes.txt").write_bytes(b"hand")
    assert alice.read("notes.txt") == b"hand"
    assert alice.stale() == [] and bob.stale() == []
    alice.delete("notes.txt")
    assert not (root / "notes.txt").exists()


def test_version_of_unknown_path_is_zero(vols) -> None:
    assert vols("alice").version("plans/nothing.md") == 0


def test_agent_defaults_and_validation(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COHERENT_AGENT", "from-env")
    with CoherentVolume(root) as v:
        assert v.agent == "from-env"
    monkeypatch.delenv("COHERENT_AGENT")
    with CoherentVolume(root) as a, CoherentVolume(root) as b:
        assert a.agent != b.agent
    with pytest.raises(VolumeConfigError, match="reserved"):
        CoherentVolume(root, agent="external")
    with pytest.raises(VolumeConfigError):
        CoherentVolume(root, agent="bad\nname")
    monkeypatch.setenv("COHERENT_AGENT", "from-env")
    with pytest.raises(VolumeConfigError, match="1 to 200 printable characters"):
        CoherentVolume(root, agent="")  # refused, as the CLI refuses it (before: ran as "from-env")
    with pytest.raises(VolumeConfigError):
        CoherentVolume(root, isolation="snapshot")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda v: v.lock(P, ttl=float("nan")),
            "ttl must be a number of seconds from 0.001 to 2.592e.06 .30 days., not nan",
        ),
        (lambda v: v.lock(P, ttl=0), "ttl must be a number of seconds from 0.001 .*, not 0"),
        (lambda v: v.lock(P, ttl=1e-300), "ttl must be"),
        (lambda v: v.lock(P, ttl=1e15), "ttl must be"),
        (lambda v: v.lock(P, ttl=-1), "ttl must be"),
        (lambda v: v.lock(P, ttl="5"), "ttl must be"),
        (lambda v: v.lock(P, timeout=float("nan")), "timeout must be a number of seconds from 0 to .*, not nan"),
        (lambda v: v.lock(P, timeout=float("inf")), "timeout must be"),
        (lambda v: v.update(P, lambda old: old, retries=-1), "retries must be a whole number, 0 or more, not -1"),
    ],
)
def test_bad_waits_and_retries_are_refused_before_anything_is_asked(vols, call, error: str) -> None:
    """Before: a NaN timeout waited for ever, a NaN ttl failed deep in SQLite (and never expired
    on PostgreSQL), ttl 0 or -1 gave a grant already over, ttl 1e15 one that made `status` crash,
    retries=-1 a bare AssertionError."""
    alice, bob = vols("alice"), vols("bob")
    alice.write(P, b"x")
    with alice.lock(P, ttl=30), pytest.raises(VolumeConfigError, match=error), call(bob):
        pass
    assert bob.read(P) == b"x" and [e.kind for e in bob.history(P)] == ["commit"]


def test_closed_volume_refuses_use(root: Path) -> None:
    v = CoherentVolume(root, agent="alice")
    v.close()
    for use in (lambda: v.read(P), lambda: v.policy, v.prune, v.stale, lambda: v.lock(P).__enter__()):
        with pytest.raises(CoherenceError, match="closed"):
            use()


def test_close_waits_for_the_calls_other_threads_have_under_way(root: Path) -> None:
    """Eight threads sharing one volume, closed while they work: calls under way met the closed
    registry and failed with raw errors (ValueError: file descriptor cannot be a negative integer,
    EBADF: /tmp/s32api 2). Calls under way end first, later ones are told the volume is closed."""
    v = CoherentVolume(root, agent="alice")
    failures: list[BaseException] = []
    done = threading.Event()

    def work(i: int) -> None:
        n = 0
        while not done.is_set():
            try:
                v.write(f"plans/{i}.md", f"{n}\n")
                with v.lock(f"plans/{i}.md", timeout=1):
                    v.read(f"plans/{i}.md")
                n += 1
            except CoherenceError as e:
                if "closed" not in str(e):
                    failures.append(e)
                return
            except BaseException as e:  # noqa: BLE001 -- what the test looks for
                failures.append(e)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    v.close()
    done.set()
    for t in threads:
        t.join(30)
    assert failures == []
    with CoherentVolume(root, agent="bob") as bob:  # and every call that ran left the volume whole
        assert all(bob.read(f"plans/{i}.md").endswith(b"\n") for i in range(8))


def test_close_ends_waits_under_way_and_nothing_is_written_after_it(root: Path) -> None:
    """close() waited a minute for a lock() that waited on another agent's grant, returned, and the
    lock was then taken on the closed volume; an update whose function closed the volume still
    committed (/tmp/s32r2api 5). Both end with "closed", nothing written; and a close in a forked
    child does not wait for calls its parent's threads had under way (4: a minute)."""
    alice, bob = CoherentVolume(root, agent="alice"), CoherentVolume(root, agent="bob")
    bob.write(P, b"x")
    outcome: list[BaseException] = []

    def wait_for_the_lock() -> None:
        try:
            with alice.lock(P, timeout=120):
                pass
        except BaseException as e:  # noqa: BLE001 -- what the test looks for
            outcome.append(e)

    with bob.lock(P):
        waiter = threading.Thread(target=wait_for_the_lock)
        waiter.start()
        time.sleep(0.5)
        started = time.monotonic()
        alice.close()
        assert time.monotonic() - started < 10
        waiter.join(10)
    assert len(outcome) == 1 and "closed while lock() waited" in str(outcome[0]), outcome
    carol = CoherentVolume(root, agent="carol")
    with pytest.raises(CoherenceError, match="closed while update\\(\\) ran; nothing was written"):
        carol.update(P, lambda old: (carol.close(), old + b"carol")[1])
    assert bob.read(P) == b"x" and [v.version for v in bob.history(P)] == [1]
    dave = CoherentVolume(root, agent="dave")
    inside, leave = threading.Event(), threading.Event()
    busy = threading.Thread(target=lambda: dave.update(P, lambda old: (inside.set(), leave.wait(30), old)[2]))
    busy.start()
    assert inside.wait(30)
    child = os.fork()
    if child == 0:  # the child: its parent's thread inside update() is not its own
        began = time.monotonic()
        dave.close()
        os._exit(0 if time.monotonic() - began < 5 else 1)
    _, status = os.waitpid(child, 0)
    leave.set()
    busy.join(30)
    assert status == 0
    dave.close()
    bob.close()


def test_an_error_names_the_path_as_given(root: Path) -> None:
    """Each call names its file beneath a descriptor of its directory: errors showed that name
    (/proc/self/fd/11/file.md, /tmp/s32r2api 3)."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/file.md", b"x")
        with pytest.raises(NotADirectoryError) as info:
            alice.write("plans/file.md/x.md", b"y")
        assert "/proc/self/fd" not in str(info.value), info.value
        with pytest.raises(FileNotFoundError) as missing:
            alice.read("notes/none.txt")
        assert "/proc/self/fd" not in str(missing.value), missing.value


def test_a_second_lock_of_a_path_in_the_thread_holding_it_is_refused_at_once(root: Path) -> None:
    """A lock() nested in another of the same path (a helper that locks, called under a lock) waited
    its whole timeout for its own grant, then was refused 'held' by itself, told to wait until the
    holder released (/tmp/s32api 3). Another thread still waits its turn, and another agent is refused
    'held' as before."""
    alice = CoherentVolume(root, agent="alice")
    other = CoherentVolume(root, agent="alice")
    alice.write(P, b"x")
    with alice.lock(P, timeout=30):
        started = time.monotonic()
        for vol in (alice, other):
            with pytest.raises(CoherenceError, match="alice holds its lock\\(\\) already in this thread"), vol.lock(P):
                pass
        assert time.monotonic() - started < 5
        waited: list[float] = []

        def later() -> None:
            begun = time.monotonic()
            with other.lock(P, timeout=30):
                waited.append(time.monotonic() - begun)

        t = threading.Thread(target=later)
        t.start()
        time.sleep(0.5)
    t.join(30)
    assert waited and waited[0] >= 0.4  # it waited for the release, then took it
    alice.close()
    other.close()


def test_reading_a_directory_or_missing_file(vols) -> None:
    alice = vols("alice")
    with pytest.raises(IsADirectoryError):
        alice.read("plans")
    with pytest.raises(FileNotFoundError):
        alice.read("plans/missing.md")


def test_str_data_and_type_errors(vols) -> None:
    alice = vols("alice")
    assert alice.write(P, "héllo") == 1 and alice.read(P) == "héllo".encode()
    with pytest.raises(TypeError):
        alice.write(P, 42)  # type: ignore[arg-type]


def test_a_file_larger_than_one_read_is_read_whole(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """read(2) returns at most ~2 GiB however much is asked: a short read before the file's size is
    no end of file. The limit is lowered here so that a small file shows it."""
    from coherent_volume import fingerprint

    monkeypatch.setattr(fingerprint, "READ_MAX", 4096)
    data = bytes(range(256)) * 1000
    (root / P).write_bytes(data)
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.read(P) == data
        assert vol.version(P) == 1


@pytest.mark.parametrize("size", [64 << 10, 3 << 20])
def test_a_foreign_file_with_holes_is_recorded_as_the_bytes_it_reads_as(root: Path, size: int) -> None:
    """A file written outside the volume with a hole before, between and after its data (one part
    long, read in one piece; and several, read a run at a time) is recorded with the hash of what
    it reads as, and served back so from the content store."""
    path = root / P
    with open(path, "wb") as f:
        for offset in (size // 3, size // 2):
            f.seek(offset)
            f.write(b"data at %d\n" % offset)
        f.truncate(size)
    data = path.read_bytes()
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.read(P) == data
        (entry,) = vol.history(P)
        assert (entry.hash, entry.size) == (content_hash(data), size)
        assert vol.read_version(P, 1) == data


def test_a_managed_name_that_is_not_utf8_is_a_clear_error(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as vol, pytest.raises(InvalidPath, match="UTF-8"):
        vol._core.paths.of_rel("plans/\udcff.md")


def test_a_name_longer_than_a_file_system_allows_is_a_clear_error(root: Path) -> None:
    """As a path too long is (before: a bare OSError ENAMETOOLONG from deep inside)."""
    with CoherentVolume(root, agent="alice") as vol:
        for path in ("plans/" + "x" * 256, "notes/" + "é" * 128 + "/a.md"):
            with pytest.raises(InvalidPath, match="bytes, longer than a file system allows one name"):
                vol.write(path, b"x")
        vol.write("plans/" + "x" * 255, b"255 bytes is allowed")
    assert sorted(p.name for p in (root / "plans").iterdir()) == ["x" * 255]


def test_a_refused_write_into_new_directories_makes_none(root: Path, vols) -> None:
    """A write makes the directories its file needs only once it is accepted (at its install): a
    refused one leaves none (a directory left at a name makes a later file there fail EISDIR), and
    removes none another writer or program is using (before, a refused write removed what its
    staging had made, under another writer staging a file there: found by a hostile probe)."""
    holder, alice = vols("holder"), vols("alice")
    with holder.lock("plans/new/deep/x.md", ttl=30):
        with pytest.raises(StaleWriteError, match="held"):
            alice.write("plans/new/deep/x.md", b"refused")
        assert not (root / "plans/new").exists()
        assert alice.write("plans/new", b"a file where the refused write wanted a directory") == 1
        with pytest.raises(NotADirectoryError):
            alice.write("plans/new/deep/y.md", b"y")
        alice.delete("plans/new")
    assert alice.write("plans/new/deep/x.md", b"accepted") == 1
    assert (root / "plans/new/deep/x.md").read_bytes() == b"accepted"
    assert sorted(p.name for p in (root / "plans/new").iterdir()) == ["deep"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_write_into_new_directories_on_another_file_system_inside_the_volume_lands(root: Path) -> None:
    """The staging directory is on the root's file system; content for a file system mounted inside
    the volume is named in the nearest directory on its way there, since its own is made only at
    the install (before: every such write into a new directory was refused, the message blaming
    the staging directory: found by a hostile probe)."""
    inner = root / "plans/tm"
    inner.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
    try:
        with CoherentVolume(root, agent="alice") as v:
            assert v.write("plans/tm/new/deep/x.md", "on the inner file system\n") == 1
            assert v.read("plans/tm/new/deep/x.md") == b"on the inner file system\n"
        assert [p.name for p in inner.rglob("*") if p.is_file()] == ["x.md"]
    finally:
        subprocess.run(["umount", str(inner)], check=True)


def test_repeated_reads_see_every_change_at_once(root: Path, vols) -> None:
    """A tracked read that finds its view already current skips the registry for the same inode
    state: a peer's commit (a new inode) or a same-size foreign write in place (new bytes) must
    still be seen, and registered, by the very next read."""
    a, b = vols("a"), vols("b")
    a.write("plans/p.md", "aaaa")
    assert a.read("plans/p.md") == b"aaaa" and a.read("plans/p.md") == b"aaaa"
    b.read("plans/p.md")
    b.write("plans/p.md", "bbbb")
    assert a.read("plans/p.md") == b"bbbb" and a.version("plans/p.md") == 2
    a.write("plans/p.md", "cccc")  # accepted: a's view moved to v2 with that read
    with open(root / "plans" / "p.md", "r+b") as f:  # foreign, in place, same size
        f.write(b"dddd")
    assert a.read("plans/p.md") == b"dddd"
    assert a.version("plans/p.md") == 4
    a.write("plans/p.md", "eeee")  # a's view is the foreign version it just read
    a.forget("plans/p.md")
    a.read("plans/p.md")
    assert a.write("plans/p.md", "ffff") == 6


def test_listing_a_directory_shows_its_deletions(vols) -> None:
    """Through a mount the only way to see that a file is gone is to list its directory (a lookup
    precedes every create): the listing moves an outdated view to the deletion, so the file may be
    created again; files deleted elsewhere, or whose deletion the agent saw, are left alone."""
    a, b = vols("a"), vols("b")
    a.write("plans/gone.md", "1")
    a.write("plans/sub/deep.md", "1")
    for path in ("plans/gone.md", "plans/sub/deep.md"):
        b.read(path)
        b.delete(path)
    core = a._core
    with pytest.raises(StaleWriteError):
        a.write("plans/gone.md", "again")
    assert core.note_listed("a", "plans") == 1 and core.note_listed("a", "plans") == 0
    assert a.write("plans/gone.md", "again") == 3
    with pytest.raises(StaleWriteError):
        a.write("plans/sub/deep.md", "again")


def test_a_write_after_the_root_was_removed_makes_nothing_and_says_so(tmp_path: Path) -> None:
    """The volume's root removed under an open volume: a write neither makes the root again (with
    an empty plans/ in it) nor blames the staging directory."""
    root = tmp_path / "vol"
    root.mkdir()
    with CoherentVolume(root, managed=["plans/**"], agent="alice") as alice:
        alice.write("plans/a.md", "one")
        shutil.rmtree(root)
        for path in ("plans/a.md", "plans/new/b.md"):
            with pytest.raises(FileNotFoundError, match="the volume's root was removed or moved while in use"):
                alice.write(path, "two")
        assert not root.exists()


def test_a_fifo_or_socket_at_a_managed_name_is_said_to_be_one(vols, root: Path) -> None:
    """It holds no content: a read or a delete says what it is (EINVAL), never "no such file" or
    "no such device", and the delete leaves it in place."""
    alice = vols("alice")
    os.mkfifo(root / "plans/pipe.md")
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(root / "plans/sock.md"))
        for name, kind in (("plans/pipe.md", "a FIFO (named pipe)"), ("plans/sock.md", "a socket")):
            with pytest.raises(OSError) as read:
                alice.read(name)
            assert read.value.errno == errno.EINVAL
            assert read.value.strerror == f"Not a regular file: it is {kind}, which has no content to read"
            with pytest.raises(OSError) as deleted:
                alice.delete(name)
            assert deleted.value.errno == errno.EINVAL and not isinstance(deleted.value, FileNotFoundError)
            assert f"it is {kind}, not managed content, so the volume keeps no version of it" in str(deleted.value)
            assert os.path.lexists(root / name)
    with pytest.raises(FileNotFoundError):
        alice.delete("plans/never.md")


def test_staged_content_dropped_twice_across_an_interrupt_closes_its_descriptor_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt landing after a staged file's descriptor was closed but before it was
    forgotten made the next `discard` (a restore's own, after the commit's) close that number again:
    EBADF for the program (/tmp/s33api 3), or another thread's file closed where the number was
    reused."""
    from coherent_volume import atomic

    staged = atomic.stage(str(tmp_path / "a.md"), b"content\n", root=str(tmp_path))
    real = os.close

    def close_then_interrupt(fd: int) -> None:
        real(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        staged.discard()
    monkeypatch.undo()
    reused = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)  # likely the number just freed
    try:
        staged.discard()
        os.fstat(reused)  # still open
    finally:
        os.close(reused)


def test_a_path_whose_directory_flips_between_a_link_and_a_directory_while_resolved_is_walked_again(
    vols, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.path.realpath raises what its walk meets when a name changes between its lstat and its
    readlink (EINVAL: a symlink replaced by a directory; ENOENT: removed): a read raised a raw
    `OSError: [Errno 22] Invalid argument: '…/plans/sub'` (/tmp/s33api 4). The path is walked
    again; one that never settles is an OSError saying so, naming the path as given."""
    alice = vols("alice")
    alice.write("plans/sub/a.md", "A\n")
    os.symlink("sub", root / "plans/link")
    real = os.path.realpath
    failures = [OSError(errno.EINVAL, "Invalid argument"), OSError(errno.ENOENT, "No such file or directory")]

    def racing(path: str, **kwargs: object) -> str:
        if failures:
            raise failures.pop()
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os.path, "realpath", racing)
    assert alice.read("plans/link/a.md") == b"A\n"
    monkeypatch.setattr(os.path, "realpath", lambda path, **kwargs: (_ for _ in ()).throw(OSError(errno.EINVAL, "x")))
    with pytest.raises(OSError, match="kept changing while the path was resolved") as said:
        alice.write("plans/link/a.md", "B\n")
    assert said.value.filename == "plans/link/a.md"
    monkeypatch.undo()
    assert alice.read("plans/sub/a.md") == b"A\n"


def test_a_commit_interrupted_after_its_decision_was_recorded_is_installed_not_reverted(
    vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt landing after a commit's decision was recorded and before its install
    dropped the staged file's name, the marker of an install not done: recovery took the install as
    done, and the file's previous bytes were then recorded over the commit as a change made outside
    the volume by `external` (with real SIGINTs: 55 such reverts in 10,749 interrupts, /tmp/s33api).
    The name stays; the next operation installs the commit."""
    from coherent_volume.core.writes import Writes

    alice = vols("alice")
    alice.write("plans/a.md", "1\n")

    def interrupted(*args: object, **kwargs: object) -> bool:
        raise KeyboardInterrupt

    monkeypatch.setattr(Writes, "_install_recorded", interrupted)
    with pytest.raises(KeyboardInterrupt):
        alice.write("plans/a.md", "2\n")
    monkeypatch.undo()
    assert alice.read("plans/a.md") == b"2\n"
    assert [(v.version, v.kind, v.writer) for v in alice.history("plans/a.md")] == [
        (2, "commit", "alice"),
        (1, "commit", "alice"),
    ]


def test_a_bytes_root_and_a_merge_that_is_no_bool_are_refused_clearly(root: Path) -> None:
    """`CoherentVolume(b"/path")` raised `TypeError: a bytes-like object is required, not 'str'` from
    deep inside (/tmp/s32api 7), and `write(..., merge="yes")` was taken as True."""
    with pytest.raises(VolumeConfigError, match="is bytes: give it as str"):
        CoherentVolume(os.fsencode(root), agent="alice")
    with CoherentVolume(root, agent="alice") as alice:
        with pytest.raises(VolumeConfigError, match="merge is True or False"):
            alice.write("plans/a.md", "x\n", merge="yes")  # type: ignore[arg-type]
        assert not (root / "plans/a.md").exists()
