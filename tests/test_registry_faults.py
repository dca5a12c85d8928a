"""Bad registries get a typed, readable error and nothing already committed is lost."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume, InstallPending, RegistryError, VolumeConfigError
from coherent_volume.registry import sqlite as sqlite_registry

from .conftest import REPO, run_py
from .harness import CLI
from .harness.mounts import bound
from .harness.volumes import sql

P = "plans/plan.md"


def _committed(root: Path) -> bytes:
    with CoherentVolume(root, agent="alice") as v:
        v.write(P, b"precious work")
    return (root / P).read_bytes()


def test_garbage_registry_is_reported_and_left_untouched(root: Path) -> None:
    before = _committed(root)
    db = root / ".coherent/registry.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a coherent-volume registry"):
        CoherentVolume(root, agent="bob")
    assert db.read_bytes() == b"this is not a database" * 100
    assert (root / P).read_bytes() == before


def test_truncated_registry_is_reported(root: Path) -> None:
    before = _committed(root)
    db = root / ".coherent/registry.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])
    with pytest.raises(RegistryError), CoherentVolume(root, agent="bob") as v:
        v.read(P)
        v.write(P, b"x")
    assert (root / P).read_bytes() == before


def test_wrong_schema_version_is_reported(root: Path) -> None:
    _committed(root)
    conn = sqlite3.connect(root / ".coherent/registry.db")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(RegistryError, match="schema version '99'") as newer:
        CoherentVolume(root, agent="bob")
    assert "made by a newer coherent-volume: upgrade this one" in str(newer.value)


def test_opening_without_globs_where_no_volume_exists(tmp_path: Path) -> None:
    """Says what can be done there: create a volume, or join a PostgreSQL one again (a working copy
    whose .coherent was removed was told only to create one)."""
    with pytest.raises(RegistryError, match=f"no volume at '{tmp_path}'") as info:
        CoherentVolume(tmp_path, agent="bob")
    assert f"`coherent-volume init {tmp_path} --managed GLOB`" in str(info.value)
    assert f"joins it again with `coherent-volume init {tmp_path} --registry URL --volume NAME`" in str(info.value)
    assert not (tmp_path / ".coherent").exists()


def test_opening_a_directory_inside_a_volume_names_its_root(root: Path, tmp_path: Path) -> None:
    """The API, `mount` and `mcp` given a directory inside a volume name its root, as the other
    commands do (they said to create a volume there, which `init` refuses: volumes do not nest)."""
    with pytest.raises(RegistryError, match=f"'{root / 'plans'}' is a directory inside the volume at '{root}'"):
        CoherentVolume(root / "plans", agent="bob")
    (tmp_path / "mnt").mkdir()
    for command in (["mount", str(root / "plans"), str(tmp_path / "mnt")], ["mcp", str(root / "plans")]):
        r = subprocess.run([CLI, *command], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
        assert r.returncode == 1 and f"is a directory inside the volume at '{root}', not its root" in r.stderr, r
    assert not (root / "plans" / ".coherent").exists()


def test_registry_locked_past_the_busy_timeout_is_a_bounded_wait(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _committed(root)
    monkeypatch.setattr(sqlite_registry, "BUSY_TIMEOUT_MS", 300)
    alice = CoherentVolume(root, agent="alice")
    alice.read(P)
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            """
import sqlite3, sys, time
c = sqlite3.connect(sys.argv[1], isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
""",
            str(root / ".coherent/registry.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert locker.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryError, match="stayed locked"):
            alice.write(P, b"blocked")
        assert locker.poll() is None, "the error came while the lock was still held: the wait was bounded"
    finally:
        locker.kill()
        locker.wait()
    assert (root / P).read_bytes() == before
    assert alice.write(P, b"after the lock") == 2
    alice.close()


def test_an_empty_or_foreign_registry_file_is_left_untouched(root: Path) -> None:
    db = root / ".coherent/registry.db"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"")
    with pytest.raises(RegistryError, match="not a coherent-volume registry") as info:
        CoherentVolume(root, agent="bob")
    assert "an empty file (a volume's creation that never finished)" in str(info.value)
    assert f"move it aside with its -wal and -shm files, then make the volume with `coherent-volume init {root}" in str(
        info.value
    )
    assert db.read_bytes() == b""
    db.unlink()
    foreign = sqlite3.connect(db)
    foreign.execute("CREATE TABLE notes (x)")
    foreign.commit()
    foreign.close()
    before = db.read_bytes()
    with pytest.raises(RegistryError, match="not a coherent-volume registry") as info:
        CoherentVolume(root, agent="bob")
    assert "another program's database" in str(info.value) and "move it aside" in str(info.value)
    assert db.read_bytes() == before


# ---- a registry the operating system refuses: said so, with what to do, never called damaged ---------------


@contextmanager
def _immutable(path: Path) -> Iterator[None]:
    """`path` immutable (chattr +i) for the block, and mutable again in every outcome."""
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_registry_directory_that_cannot_be_written_is_not_called_damaged(root: Path) -> None:
    """SQLite cannot make the write-ahead log's files in an immutable `.coherent`: that is said, with
    what to do, not "not a coherent-volume registry ... move it aside", which would throw away every
    version. Once it is lifted, the volume opens with its history."""
    before = _committed(root)
    directory = root / ".coherent"
    db = directory / "registry.db"
    assert not Path(f"{db}-wal").exists() and not Path(f"{db}-shm").exists()  # SQLite must make them
    data = db.read_bytes()
    with _immutable(directory), pytest.raises(RegistryError) as refused:
        CoherentVolume(root, agent="bob")
    message = str(refused.value)
    assert refused.value.errno == errno.EPERM, message
    assert f"{str(directory)!r} may not be changed" in message and "chattr -i" in message, message
    assert "do not move it aside" in message
    assert db.read_bytes() == data
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == before and [v.writer for v in bob.history(P)] == ["alice"]


def test_an_immutable_registry_file_is_refused_when_the_volume_is_opened(root: Path) -> None:
    """SQLite opens a file it may not write read-only, without a word, and every read (which records
    a view) then failed "attempt to write a readonly database": opening says what is wrong."""
    before = _committed(root)
    db = root / ".coherent/registry.db"
    with _immutable(db), pytest.raises(RegistryError) as refused:
        CoherentVolume(root, agent="bob")
    message = str(refused.value)
    assert refused.value.errno == errno.EPERM and f"{str(db)!r} may not be changed" in message, message
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == before


def test_an_immutable_staging_directory_is_named_as_the_cause_and_nothing_changes(root: Path) -> None:
    """A commit names its content in `.coherent/staging` first: made immutable there, the refusal
    says so and how to see it (before, it told to remove the directory, which fails too:
    /tmp/s30crash 2), nothing is written, and the next write works once the flag is lifted."""
    before = _committed(root)
    staging = root / ".coherent/staging"
    with CoherentVolume(root, agent="alice") as alice:
        with _immutable(staging), pytest.raises(RegistryError) as refused:
            alice.write(P, b"next")
        message = str(refused.value)
        assert "immutable or append-only flag" in message and f"lsattr -d {staging}" in message, message
        assert (root / P).read_bytes() == before and len(alice.history(P)) == 1
        assert alice.write(P, b"next") == 2


OUT_OF_DESCRIPTORS = r"""
import errno, os, resource, sys
from coherent_volume import CoherentVolume, RegistryError
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
for fd in held[-int(sys.argv[2]):]:
    os.close(fd)
try:
    CoherentVolume(sys.argv[1], agent="bob").close()
    print("opened")
except RegistryError as e:
    print(errno.errorcode.get(e.errno), e)
"""


def test_a_process_out_of_descriptors_is_told_so_not_that_the_registry_is_damaged(root: Path) -> None:
    """Opening a volume with one, two or three descriptors to spare (SQLite needs three for the
    registry, its -wal and its -shm) says the process is out of them."""
    before = _committed(root)
    for spare in (1, 2, 3):
        r = run_py(OUT_OF_DESCRIPTORS, str(root), str(spare))
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("EMFILE registry ") and "out of file descriptors" in r.stdout, (spare, r.stdout)
        assert "ulimit -n" in r.stdout and "do not move it aside" in r.stdout
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == before


def test_a_root_whose_name_holds_uri_characters_opens(tmp_path: Path) -> None:
    """The registry is checked through an SQLite URI: ? # % in the root's path are quoted."""
    root = tmp_path / "odd?name#with%20"
    root.mkdir()
    CoherentVolume(root, managed=["plans/**"], agent="setup").close()
    with CoherentVolume(root, agent="alice") as alice:
        assert alice.write(P, b"one") == 1
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == b"one"


def _failing_finishes(vol: CoherentVolume, monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """Make the registry unreachable for the next `failures` transactions that record an installed
    commit (the second transaction of a write), as a database restart would."""
    registry = vol._core.registry
    transact = registry.transact
    seen: list[str] = []

    def flaky(fn: Callable[..., Any], holds: Iterable[str] = ()) -> Any:
        if getattr(fn, "__name__", "") == "finish" and len(seen) < failures:
            seen.append("failed")
            raise RegistryError("registry at db:5432 is unreachable; nothing was written", 5)
        return transact(fn, holds)

    monkeypatch.setattr(registry, "transact", flaky)
    return seen


def test_a_deletion_whose_record_fails_a_while_is_recorded_as_the_writers(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deletion is recorded after its unlink (a commit of content is recorded before its install,
    in one transaction): when the registry goes away in between, the deletion keeps trying
    (bounded) and reports success once its version is recorded as the writer's, never a failure
    for a deletion that landed (a caller would apply it twice)."""
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        failed = _failing_finishes(vol, monkeypatch, 3)
        assert vol.delete(P) == 2
        assert failed == ["failed"] * 3
        assert [(v.version, v.writer, v.kind) for v in vol.history(P)][0] == (2, "alice", "delete")
        assert vol.version(P) == 2


def test_a_deletion_that_cannot_be_recorded_in_time_says_it_is_pending_and_lands_later(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coherent_volume.core import writes

    monkeypatch.setattr(writes, "FINISH_WAIT", 0.3)
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        _failing_finishes(vol, monkeypatch, 1000)
        with pytest.raises(RegistryError) as pending:
            vol.delete(P)
        assert "is on disk and its commit is pending" in str(pending.value)
        assert "do not write it again" in str(pending.value)
    with CoherentVolume(root, agent="bob") as bob:  # any next operation records it as alice's
        with pytest.raises(FileNotFoundError):
            bob.read(P)
        assert [(v.version, v.writer, v.kind) for v in bob.history(P)][:2] == [
            (2, "alice", "delete"),
            (1, "alice", "commit"),
        ]


def test_a_registry_directory_that_is_a_link_or_a_file_is_refused_and_nothing_changes(
    root: Path, tmp_path: Path
) -> None:
    """A root whose `.coherent` is a symlink to another volume's registry is not opened as that
    volume (before, `status` of it recorded each of that volume's files as deleted there: /tmp/s30cli
    1); one whose `.coherent` is a plain file is told it is no registry, not that a registry is
    unusable."""
    with CoherentVolume(root, agent="alice") as v:
        v.write(P, b"alice's plan")
    other, stray = tmp_path / "other", tmp_path / "stray"
    other.mkdir()
    (other / ".coherent").symlink_to(root / ".coherent")
    with pytest.raises(VolumeConfigError, match=r"is a symlink .* Nothing was changed"):
        CoherentVolume(other, agent="bob")
    r = subprocess.run([CLI, "status", str(other)], capture_output=True, text=True)
    assert r.returncode == 1 and "is a symlink" in r.stderr, r.stderr
    with CoherentVolume(root, agent="alice") as v:
        assert [(e.version, e.kind, e.writer) for e in v.history(P)] == [(1, "commit", "alice")]
        assert v.read(P) == b"alice's plan"
    (other / ".coherent").unlink()
    (other / ".coherent").mkdir()
    (other / ".coherent" / "registry.db").symlink_to(root / ".coherent" / "registry.db")
    with pytest.raises(VolumeConfigError, match=r"registry.db is a symlink .* Nothing was changed"):
        CoherentVolume(other, agent="bob")  # (it said the registry was replaced while open: /tmp/s30r2c 4)
    assert os.listdir(other / ".coherent") == ["registry.db"], "no lock file made"
    stray.mkdir()
    (stray / ".coherent").write_bytes(b"")
    for managed in (None, ("plans/**",)):
        with pytest.raises(VolumeConfigError, match=r"is a regular file \(0 bytes\), not a volume's registry"):
            CoherentVolume(stray, managed=managed, agent="bob")
    assert (stray / ".coherent").read_bytes() == b""
    for inside in (root / ".coherent", root / ".coherent" / "staging"):  # (not a nested volume: /tmp/s30cli 5)
        with pytest.raises(VolumeConfigError, match=f"the registry directory of the volume at {root}: no volume"):
            CoherentVolume(inside, managed=("plans/**",), agent="bob")


def test_a_registry_reached_by_a_second_root_through_a_hard_link_or_a_mount_is_refused(
    root: Path, tmp_path: Path
) -> None:
    """One registry reached from two roots loses commits: a hard-linked registry file (`cp -al`)
    gets two write-ahead logs over one database, which corrupted it and lost 150 acknowledged
    commits; a volume or its `.coherent` bind-mounted inside another root puts its files in two
    volumes, whose writes undid each other (/tmp/s30r2c 1-3). Each is refused at open, nothing
    changed, and the volume works once the second name is gone."""
    before = _committed(root)
    linked = tmp_path / "linked"
    subprocess.run(["cp", "-al", str(root), str(linked)], check=True)
    for name in (linked, root):
        with pytest.raises(VolumeConfigError, match="has 2 hard links .* Nothing was changed"):
            CoherentVolume(name, agent="bob")
    shutil.rmtree(linked)
    outer, other = tmp_path / "outer", tmp_path / "other"
    outer.mkdir()
    with CoherentVolume(outer, managed=("**",), agent="carol") as v:
        v.write("sub/plans/plan.md", b"outer's")
    (other / ".coherent").mkdir(parents=True)
    with (
        bound(root, outer / "sub"),
        pytest.raises(VolumeConfigError, match=f"is a mount of {root}, which is the volume"),
    ):
        CoherentVolume(outer, agent="carol")
    with bound(root / "plans", outer / "sub"), pytest.raises(VolumeConfigError, match="which is inside the volume"):
        CoherentVolume(outer, agent="carol")
    with bound(root / ".coherent", other / ".coherent"), pytest.raises(VolumeConfigError, match="is a mount of"):
        CoherentVolume(other, agent="carol")
    (outer / "bf").mkdir()  # a FUSE passthrough (bindfs) or an overlay of another volume's directory too
    subprocess.run(["bindfs", str(root / "plans"), str(outer / "bf")], check=True)  # (/tmp/s30r2o 1)
    try:
        with pytest.raises(VolumeConfigError, match=f"is a mount of {root}/plans, which is inside the volume"):
            CoherentVolume(outer, agent="carol")
    finally:
        if subprocess.run(["fusermount3", "-u", str(outer / "bf")]).returncode:
            subprocess.run(["fusermount3", "-uz", str(outer / "bf")])
    alias = tmp_path / "alias"  # the volume by another name, holding a bind of its own directory: its own
    with bound(outer, alias), bound(alias / "sub", alias / "x"), CoherentVolume(alias, agent="carol") as carol:
        assert carol.read("x/plans/plan.md") == b"outer's"  # (it was refused as another volume: /tmp/s30r2o 2)
    with CoherentVolume(root, agent="bob") as bob, CoherentVolume(outer, agent="carol") as carol:
        assert bob.read(P) == before and [e.version for e in bob.history(P)] == [1]
        assert carol.read("sub/plans/plan.md") == b"outer's"
        shm = root / ".coherent/registry.db-shm"
        assert shm.exists()  # (while the volume is open)
        os.link(shm, other / ".coherent/registry.db-shm")  # another root's index: refused, not called damaged
        with pytest.raises(VolumeConfigError, match="registry.db-shm has 2 hard links"):
            CoherentVolume(other, managed=("plans/**",), agent="dave")
        os.unlink(other / ".coherent/registry.db-shm")


def test_a_commit_whose_transaction_fails_changes_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit of content is one transaction, recorded before its install: when the registry is
    unreachable for it, the write fails, the file keeps its content, no version is recorded and
    nothing is left staged."""
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        registry = vol._core.registry
        transact = registry.transact

        def unreachable(fn: Callable[..., Any], holds: Iterable[str] = ()) -> Any:
            if getattr(fn, "__name__", "") != "decide":
                return transact(fn, holds)

            def lost(tx: Any) -> Any:
                fn(tx)  # its body runs (and names its staged content), then the connection is lost
                raise RegistryError("registry at db:5432 is unreachable; nothing was written", 5)

            return transact(lost, holds)

        monkeypatch.setattr(registry, "transact", unreachable)
        with pytest.raises(RegistryError, match="unreachable"):
            vol.write(P, b"two")
        monkeypatch.undo()
        assert (root / P).read_bytes() == b"one"
        assert [v.version for v in vol.history(P)] == [1]
        assert [n for n in os.listdir(root / ".coherent" / "staging")] == []


def test_a_commit_whose_content_cannot_be_made_durable_changes_nothing(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Staged content is fsynced before the transaction that records it, so the registry never names
    content a power loss could take. When that fsync fails (EIO, or ENOSPC said plainly), nothing is
    recorded: the write fails, the file keeps its content, no version, nothing staged, and the next
    write goes through."""
    with CoherentVolume(root, agent="alice") as vol:
        vol.write(P, b"one")
        fsync = os.fsync
        for code, said in ((errno.EIO, "Input/output error"), (errno.ENOSPC, "Free some space there")):
            synced: list[int] = []

            def failing(fd: int, code: int = code, synced: list[int] = synced) -> None:
                if stat.S_ISREG(os.fstat(fd).st_mode):  # the staged content (a directory's is the install's)
                    synced.append(fd)
                    raise OSError(code, os.strerror(code))
                fsync(fd)

            monkeypatch.setattr(os, "fsync", failing)
            with pytest.raises(OSError, match=said) as failed:
                vol.write(P, b"two")
            monkeypatch.undo()
            assert failed.value.errno == code
            assert synced, "the staged content was fsynced"
            assert (root / P).read_bytes() == b"one"
            assert [v.version for v in vol.history(P)] == [1]
            assert os.listdir(root / ".coherent" / "staging") == []
        assert vol.write(P, b"three") == 2
        assert (root / P).read_bytes() == b"three"


def test_a_create_whose_transaction_fails_creates_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A creation through a handle (the mount's create) is one transaction, recorded before the file
    is put in place: when the registry is unreachable for it, no file, no version, no grant, nothing
    staged."""
    from coherent_volume.liveness import ProcessId

    with CoherentVolume(root, agent="alice") as vol:
        core = vol._core
        core.settle()  # the process's sweep, a transaction of its own: the failure below is the create's
        transact = core.registry.transact

        def unreachable(fn: Callable[..., Any], holds: Iterable[str] = ()) -> Any:
            def lost(tx: Any) -> Any:
                fn(tx)
                raise RegistryError("registry at db:5432 is unreachable; nothing was written", 5)

            return transact(lost if getattr(fn, "__name__", "") == "decide" else fn, holds)

        monkeypatch.setattr(core.registry, "transact", unreachable)
        with pytest.raises(RegistryError, match="unreachable"):
            core.create("alice", core.resolve("plans/new.md"), 0o644, ProcessId.of(os.getpid()), "write")
        monkeypatch.undo()
        assert not (root / "plans/new.md").exists()
        assert vol.history("plans/new.md") == []
        with core.registry.read() as tx:
            assert tx.grant("plans/new.md") is None
        assert os.listdir(root / ".coherent/staging") == []


def test_a_create_in_a_directory_renamed_away_meanwhile_fails_and_makes_no_directory(root: Path) -> None:
    """A handle's create names a directory the kernel looked up: one another agent renamed away
    meanwhile is not made again (it was, and the real directory could not be moved back over it:
    /tmp/s30race 1). ENOENT, no directory, no version, no grant, nothing staged."""
    from coherent_volume.liveness import ProcessId

    with CoherentVolume(root, agent="alice") as vol:
        vol.write("plans/d/a.md", b"a")
        target = vol._core.resolve("plans/d/new.md")
        (root / "plans/d").rename(root / "plans/moved")  # (as another agent's rename through a mount)
        with pytest.raises(FileNotFoundError):
            vol._core.create("alice", target, 0o644, ProcessId.of(os.getpid()), "write")
        assert not (root / "plans/d").exists()
        assert vol.history("plans/d/new.md") == []
        with vol._core.registry.read() as tx:
            assert tx.grant("plans/d/new.md") is None
        assert os.listdir(root / ".coherent/staging") == []


def test_a_create_that_meets_a_file_made_outside_meanwhile_keeps_that_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The new file is put in place only where nothing is (RENAME_NOREPLACE): a file a program made
    outside the volume after the decision is kept, recorded as a version of its own, and the
    creation says File exists."""
    from coherent_volume import atomic
    from coherent_volume.liveness import ProcessId

    real = atomic.rename

    def raced(src: str, dst: str, **flags: bool) -> None:
        Path(dst).write_text("made outside\n")
        real(src, dst, **flags)

    with CoherentVolume(root, agent="alice") as vol:
        core = vol._core
        monkeypatch.setattr(atomic, "rename", raced)
        with pytest.raises(FileExistsError):
            core.create("alice", core.resolve("plans/new.md"), 0o644, ProcessId.of(os.getpid()), "write")
        monkeypatch.undo()
        with core.registry.read() as tx:
            assert tx.grant("plans/new.md") is None
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read("plans/new.md") == b"made outside\n"
        assert [(v.version, v.kind, v.writer) for v in bob.history("plans/new.md")] == [
            (2, "foreign", "external"),
            (1, "commit", "alice"),
        ]
    assert os.listdir(root / ".coherent/staging") == []


# ---- a commit recorded, its install failed while its writer lives ------------------------------------------


def _failing_renames(monkeypatch: pytest.MonkeyPatch, failures: int, error: int = errno.EIO) -> list[str]:
    """Make the next `failures` renames of a commit's install fail with `error`."""
    from coherent_volume import atomic

    real = atomic.rename
    failed: list[str] = []

    def rename(src: Any, dst: Any, **flags: bool) -> None:
        if len(failed) < failures:
            failed.append(str(dst))
            raise OSError(error, os.strerror(error), src)
        real(src, dst, **flags)

    monkeypatch.setattr(atomic, "rename", rename)
    return failed


def test_a_commit_whose_install_fails_says_it_was_committed_and_the_next_operation_puts_it_in_place(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one")
        _failing_renames(monkeypatch, 1)
        with pytest.raises(InstallPending) as pending:
            alice.write(P, b"two")
        assert pending.value.errno == errno.EIO and pending.value.version == 2
        assert "committed as version 2" in str(pending.value) and "do not write it again" in str(pending.value)
        assert (root / P).read_bytes() == b"one"  # not in place yet
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.read(P) == b"two"  # the next operation put it in place
        assert [(v.version, v.writer) for v in bob.history(P)] == [(2, "alice"), (1, "alice")]
    recovered = sql(root, "SELECT reason, version FROM events WHERE kind = 'recover'")
    assert recovered == [("installed", 2)]
    assert os.listdir(root / ".coherent/staging") == []


def test_the_writer_whose_install_failed_puts_it_in_place_at_its_own_next_write(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process that installed a commit settles its intent without looking for the staged file;
    one whose install failed must look, find it and install it, before its next commit."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one")
        _failing_renames(monkeypatch, 1)
        with pytest.raises(InstallPending):
            alice.write(P, b"two")
        assert alice.write(P, b"three") == 3
        assert (root / P).read_bytes() == b"three"
        assert [(v.version, v.writer) for v in alice.history(P)] == [(3, "alice"), (2, "alice"), (1, "alice")]
        assert alice.read_version(P, 2) == b"two"
    recovered = sql(root, "SELECT reason, version FROM events WHERE kind = 'recover'")
    assert recovered == [("installed", 2)]
    assert os.listdir(root / ".coherent/staging") == []


def test_a_commit_that_cannot_be_installed_is_superseded_by_what_the_file_holds_saying_why(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one")
        _failing_renames(monkeypatch, 1000, errno.EPERM)
        with pytest.raises(InstallPending):
            alice.write(P, b"two")
        with CoherentVolume(root, agent="bob") as bob:
            assert bob.read(P) == b"one"
            assert [(v.version, v.kind, v.writer) for v in bob.history(P)] == [
                (3, "foreign", "external"),
                (2, "commit", "alice"),
                (1, "commit", "alice"),
            ]
            assert bob.read_version(P, 2) == b"two"  # the commit stays in history, its bytes kept
    why = sql(root, "SELECT detail FROM events WHERE kind = 'foreign'")
    assert why == [
        ("the file still holds what it held before v2, which could not be installed (Operation not permitted)",)
    ]
    assert [r for (r,) in sql(root, "SELECT reason FROM events WHERE kind = 'recover'")] == ["superseded"]


def test_a_mount_handle_whose_commit_was_not_put_in_place_never_writes_into_the_file(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handle's shadow is the commit's staged file: after InstallPending the handle closes it,
    so its next writes go to a fresh copy and reach the file only through a commit of their own."""
    import trio

    from coherent_volume.core import open_core
    from coherent_volume.liveness import current_process
    from fusefs.handles import Shadow

    with CoherentVolume(root, agent="ed") as ed:
        ed.write(P, b"one\n")
        ed.read(P)
    core = open_core(str(root))
    target = core.resolve(str(root / P))

    async def edit() -> None:
        shadow = Shadow.open(core, current_process(), "ed", target, os.O_WRONLY | os.O_TRUNC, None)
        await shadow.write(0, b"two\n")
        failed = _failing_renames(monkeypatch, 1)
        with pytest.raises(InstallPending):
            await shadow.flush()
        assert failed and shadow.fd < 0
        monkeypatch.undo()
        await shadow.write(4, b"unflushed\n")
        assert (root / P).read_bytes() == b"two\n"  # the committed version, put in place; not the write
        await shadow.flush()
        await shadow.release()

    try:
        trio.run(edit)
    finally:
        core.close()
    with CoherentVolume(root, agent="other") as other:
        assert other.read(P) == b"two\nunflushed\n"
        assert [v.version for v in other.history(P)] == [3, 2, 1]


def test_the_close_of_a_handle_whose_file_its_agent_unlinked_succeeds_when_the_registry_fails(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its commit is dropped (as a local disk keeps nothing written to an unlinked file): the close
    commits nothing, so a registry that cannot take the grant's release (a full disk) must not fail
    it (it answered ENOSPC: found on a full tmpfs, /tmp/s23res). The grant ends with its lease."""
    import trio

    from coherent_volume.core import open_core
    from coherent_volume.liveness import current_process
    from fusefs.handles import Shadow

    with CoherentVolume(root, agent="ed") as ed:
        ed.write(P, b"one\n")
        ed.read(P)
    core = open_core(str(root))
    target = core.resolve(str(root / P))

    def full(*args: object, **kwargs: object) -> None:
        raise RegistryError("the file system holding it is full", errno.ENOSPC)

    async def edit() -> None:
        shadow = Shadow.open(core, current_process(), "ed", target, os.O_WRONLY | os.O_TRUNC, None)
        await shadow.write(0, b"two\n")
        st = os.stat(root / P)
        os.unlink(root / P)
        shadow.orphan(st, None, "ed")
        monkeypatch.setattr(core, "release", full)
        await shadow.flush()  # the close(2): no error
        await shadow.release()

    try:
        trio.run(edit)
    finally:
        core.close()
    assert "was not released (it ends with its lease)" in caplog.text
    assert not (root / P).exists()


FULL_DISK = r"""
import errno, os, sys
from coherent_volume import CoherentVolume, RegistryError
root = sys.argv[1]
with CoherentVolume(root, managed=["plans/**"], agent="setup") as v:
    v.write("plans/plan.md", "v1\n")
if sys.argv[2] == "inodes":  # to the last inode
    os.mkdir(os.path.join(os.path.dirname(root), "fillers"))
    try:
        for n in range(1_000_000):
            os.close(os.open(os.path.join(os.path.dirname(root), "fillers", str(n)), os.O_CREAT | os.O_WRONLY))
    except OSError:
        pass
else:
    with open(os.path.join(os.path.dirname(root), "filler"), "wb", buffering=0) as f:
        for size in (65536, 4096, 512):  # to the last block
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError:
                pass
try:
    with CoherentVolume(root, agent="alice") as v:
        v.read("plans/plan.md")
        v.write("plans/plan.md", "alice\n")
    print("written")
except (RegistryError, OSError) as e:
    print(getattr(e, "errno", None) == errno.ENOSPC, e)
"""


_SMALL_DISKS = {
    "tmpfs": 'mount -t tmpfs -o size=2m none "$1"',
    # ext4 keeps clusters that count as free for root yet nobody may write (2 %, at most 16 MiB):
    # the disk was said to have 1.3 MiB free, and SQLite's I/O error passed on as it was
    "ext4": 'truncate -s 64M "$1.img" && mkfs.ext4 -F -q -m 0 "$1.img" && mount -o loop "$1.img" "$1"',
    # out of inodes, not blocks: SQLite says it cannot open a file (it was called a passing shortage)
    "ext4-inodes": 'truncate -s 64M "$1.img" && mkfs.ext4 -F -q -m 0 -N 64 "$1.img" && mount -o loop "$1.img" "$1"',
}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small file system (root only)")
@pytest.mark.parametrize("kind", sorted(_SMALL_DISKS))
def test_a_registry_on_a_full_file_system_says_the_disk_is_full(tmp_path: Path, kind: str) -> None:
    """Whatever SQLite reports when the file system is full (SQLITE_FULL, or an I/O error growing
    its shared-memory or log file), the error says the disk is full and what to do, with ENOSPC
    (before, only an I/O error's name, and hooks said to retry in a few seconds)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = _SMALL_DISKS[kind] + ' && mkdir "$1/vol" && exec "$2" -c "$3" "$1/vol" "$4"'
    private = ["unshare", "--mount", "--propagation", "private"]  # the tmpfs is this test's alone
    fill = "inodes" if kind.endswith("-inodes") else "blocks"
    argv = [*private, "sh", "-c", script, "sh", str(disk), sys.executable, FULL_DISK, fill]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.startswith("True "), ran.stdout
    assert "full" in ran.stdout and "free space" in ran.stdout, ran.stdout


@pytest.mark.parametrize("after", ["removed", "made-anew"])
def test_a_process_whose_registry_was_removed_or_replaced_stops_using_it(root: Path, after: str) -> None:
    """A volume kept open while its .coherent is deleted (and the volume made anew by another
    process): its writes would go to the deleted registry, where no other process sees them, and
    its commit lock would exclude nobody. Every use after is refused, saying so; nothing changes."""
    alice = CoherentVolume(root, agent="alice")
    try:
        alice.write(P, b"v1")
        alice.read(P)
        shutil.rmtree(root / ".coherent")
        if after == "made-anew":
            code = f"from coherent_volume import CoherentVolume\nCoherentVolume({str(root)!r}, managed=('plans/**',)).close()"
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
        for use in (lambda: alice.write(P, b"v2 from a deleted registry"), lambda: alice.history(P)):
            with pytest.raises(RegistryError, match="was removed or replaced while this process had it open") as info:
                use()
            assert "open the volume again" in str(info.value) and info.value.errno == errno.EIO
        assert (root / P).read_bytes() == b"v1"
    finally:
        alice.close()
    assert (root / ".coherent").exists() == (after == "made-anew")
    if after == "made-anew":
        with CoherentVolume(root, agent="bob") as bob:  # the volume made anew works, alice's write is not there
            assert bob.read(P) == b"v1" and [v.writer for v in bob.history(P)] == ["external"]


HOLDER = """
import sys
from coherent_volume import CoherentVolume, CoherenceError
P = "plans/1.md"
with CoherentVolume(sys.argv[1], agent="alice") as alice:
    alice.read("plans/1.md")
    for n in range(int(sys.argv[2])):  # commits only in the write-ahead log yet
        alice.write(f"plans/mine{n}.md", b"alice's")
    print("ready", flush=True)
    sys.stdin.readline()
    for use in (lambda: alice.read("plans/2.md"), lambda: alice.write("plans/1.md", b"after"), lambda: alice.history(P)):
        try:
            use()
            print("done")
        except CoherenceError as e:
            print(type(e).__name__, e)
"""


@pytest.mark.parametrize("logged", [0, 20])
@pytest.mark.parametrize("change", ["half", "zero", "copied-over"])
def test_a_registry_cut_or_copied_over_in_place_is_an_error_to_the_process_using_it(
    root: Path, change: str, logged: int
) -> None:
    """A registry file truncated, or overwritten in place with an older copy (a backup restored with
    `cp` while a process uses the volume): that process got SIGBUS through SQLite's memory map of
    the file and died (an agent's whole program, with no word); now it goes on, told. Cut, its
    next write is refused, never acknowledged into a write-ahead log that the next open would
    discard (a hostile probe: accepted, then lost with the log), and that open leaves the log be."""
    with CoherentVolume(root, agent="bob") as bob:
        backup = (root / ".coherent/registry.db").read_bytes()
        for n in range(40):
            bob.write(f"plans/{n}.md", os.urandom(1500).hex().encode())
    db = root / ".coherent/registry.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root), str(logged)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        if change == "copied-over":
            with open(db, "r+b") as f:  # in place, as cp does: the same inode
                f.write(backup)
                f.truncate()
        else:
            os.truncate(db, os.path.getsize(db) // 2 if change == "half" else 0)
        out, err = proc.communicate("go\n", timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, (proc.returncode, out, err)  # not killed by a signal
    if change == "copied-over":  # (a copy over a registry in use is SQLite's to judge: docs/protocol.md)
        return
    write = out.splitlines()[1]
    assert write.startswith("RegistryError") and "damaged" in write and "move it aside" in write, out
    wal = Path(f"{db}-wal")
    log = wal.read_bytes() if wal.exists() else b""
    if change == "zero" and log:
        with pytest.raises(RegistryError, match="holds 0 bytes, no database, while its write-ahead log"):
            CoherentVolume(root, agent="carol")
        assert wal.read_bytes() == log and db.stat().st_size == 0  # nothing discarded


def test_a_commit_lock_file_removed_while_held_still_excludes_another_process(root: Path) -> None:
    """.coherent/commit.lock removed while a commit holds it (a clean-up of *.lock files): a process
    that opens the volume after makes a new lock file, yet its commit still waits for the holder's
    (it went ahead beside it: two commits of one path at once, increments lost)."""
    code = (
        "import sys\nfrom coherent_volume import CoherentVolume\n"
        f"with CoherentVolume({str(root)!r}, agent='bob') as bob:\n"
        "    print('ready', flush=True)\n"
        "    bob.write('plans/other.md', b'bob')\n"
        "    print('written', flush=True)\n"
    )
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"v1")
        with alice._core.registry.commit_lock():
            (root / ".coherent" / sqlite_registry.LOCK_NAME).unlink()
            bob = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            try:
                assert bob.stdout is not None and bob.stdout.readline() == "ready\n"
                time.sleep(1.0)
                assert bob.poll() is None, "bob's commit went ahead while alice held the commit lock"
            except BaseException:
                bob.kill()
                raise
        assert bob.stdout.readline() == "written\n" and bob.wait(timeout=60) == 0


@pytest.mark.parametrize("child_opens", ["inherited", "its-own"])
def test_a_process_forked_while_another_thread_is_in_a_transaction_can_use_the_volume(
    root: Path, child_opens: str
) -> None:
    """SQLite keeps the locks of a transaction in process memory, which a forked child copies:
    forked mid-transaction, the child's commits waited for a lock nobody held and failed after
    10 s blaming another process. The fork waits for the transaction to end instead."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"v1")
        inside = threading.Event()

        def hold(tx: Any) -> None:
            tx.file(P)
            inside.set()
            time.sleep(0.5)

        thread = threading.Thread(target=lambda: alice._core.registry.transact(hold))
        thread.start()
        assert inside.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: read and write within 5 s, whichever volume object it uses
            code = 1
            try:
                started = time.monotonic()
                vol = alice if child_opens == "inherited" else CoherentVolume(root, agent="bob")
                vol.read(P)
                vol.write(P, b"from the child")
                code = 0 if time.monotonic() - started < 5 else 2
            finally:
                os._exit(code)
        thread.join()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert alice.read(P) == b"from the child"


def test_a_process_whose_write_ahead_log_was_removed_writes_nothing_more_and_never_checkpoints_it(
    root: Path,
) -> None:
    """registry.db-wal and -shm removed (checkpointed first) while alice has the volume open: bob's
    process makes new ones and commits there. Alice's next use is refused, and her close does not
    copy her old log over the registry (it did: bob's committed version vanished, his next one was
    recorded as external's)."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, b"v1")
    alice = CoherentVolume(root, agent="alice")
    try:
        alice.read(P)
        conn = sqlite3.connect(root / ".coherent" / "registry.db")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        for suffix in ("-wal", "-shm"):
            (root / ".coherent" / f"registry.db{suffix}").unlink()
        bob = (
            "from coherent_volume import CoherentVolume\n"
            f"with CoherentVolume({str(root)!r}, agent='bob') as bob:\n"
            f"    bob.read({P!r}); bob.write({P!r}, b'v2 by bob'); bob.write({P!r}, b'v3 by bob')\n"
        )
        subprocess.run([sys.executable, "-c", bob], check=True, timeout=120)
        with pytest.raises(RegistryError, match="write-ahead log or index beside it, was removed or replaced"):
            alice.write(P, b"from alice")
    finally:
        alice.close()
    with pytest.raises(RegistryError, match="restart the program"):  # SQLite's state of it here is alice's
        CoherentVolume(root, agent="carol")
    carol = (
        "from coherent_volume import CoherentVolume\n"
        f"with CoherentVolume({str(root)!r}, agent='carol') as carol:\n"
        f"    print([(v.version, v.writer) for v in carol.history({P!r})], carol.read_version({P!r}, 2))\n"
    )
    told = subprocess.run([sys.executable, "-c", carol], capture_output=True, text=True, timeout=120)
    assert told.stdout == "[(3, 'bob'), (2, 'bob'), (1, 'setup')] b'v2 by bob'\n", told.stderr


def test_two_threads_forking_at_once_leave_every_registry_free(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads fork while a third holds one registry's mutex (a slow transaction) and a fourth
    logging's lock (whose at-fork hook runs after ours): each fork releases only the mutexes it
    took (they shared one list: a fork released the other's, both hooks failed, and both mutexes
    stayed held, every later read of those volumes waiting for ever)."""
    monkeypatch.setattr(sqlite_registry, "FORK_WAIT", 0.2)
    vols = []
    for n in (1, 2):
        root = tmp_path / f"v{n}"
        root.mkdir()
        vols.append(CoherentVolume(root, managed=("*.md",), agent="a"))
        vols[-1].write("f.md", "x")
    failed: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: failed.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    first = vols[0]._core.registry  # type: ignore[attr-defined]

    def slow_transaction() -> None:
        with first._mutex:
            time.sleep(0.27)

    def logging_busy() -> None:
        time.sleep(0.2)
        with logging_lock():
            time.sleep(0.25)

    def fork(delay: float) -> None:
        time.sleep(delay)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)

    threads = [
        threading.Thread(target=t, args=a)
        for t, a in ((slow_transaction, ()), (logging_busy, ()), (fork, (0.05,)), (fork, (0.10,)))
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert failed == []
        for v in vols:
            mutex = v._core.registry._mutex  # type: ignore[attr-defined]
            assert mutex.acquire(timeout=5), "a registry's mutex stayed held after the forks"
            mutex.release()
        assert [v.read("f.md") for v in vols] == [b"x", b"x"]
    finally:
        for v in vols:  # (a mutex left held would make close wait for ever)
            if v._core.registry._mutex.acquire(timeout=5):  # type: ignore[attr-defined]
                v._core.registry._mutex.release()  # type: ignore[attr-defined]
                v.close()


@contextmanager
def logging_lock() -> Iterator[None]:
    """logging's module lock, as a thread inside `logging.getLogger` holds it."""
    import logging

    logging._acquireLock()  # type: ignore[attr-defined]
    try:
        yield
    finally:
        logging._releaseLock()  # type: ignore[attr-defined]


def test_a_forked_child_whose_parent_exits_keeps_every_commit_while_other_processes_come_and_go(
    tmp_path: Path,
) -> None:
    """A program opens a volume, writes, forks and exits (a daemon): the child's connections took
    no lock in the kernel (SQLite's state in the process said the parent's were held), so another
    process closing the volume counted as the last, checkpointed and removed the write-ahead log
    under the child, whose acknowledged commits were then lost (300 acknowledged, 17 recorded)."""
    root = tmp_path / "vol"
    root.mkdir()
    CoherentVolume(root, managed=("*.md",), agent="init").close()
    done, stop = tmp_path / "done", tmp_path / "stop"
    launcher = os.fork()
    if launcher == 0:
        code = 1
        try:
            v = CoherentVolume(root, agent="daemon")
            v.write("n.md", b"0")
            if os.fork() == 0:
                acknowledged = 0
                try:
                    while not stop.exists():
                        v.update("n.md", lambda old: b"%d" % (int(old) + 1))
                        acknowledged += 1
                finally:
                    done.write_text(str(acknowledged))
                    os._exit(0)
            code = 0
        finally:
            os._exit(code)  # the launcher exits, closing nothing
    assert os.waitstatus_to_exitcode(os.waitpid(launcher, 0)[1]) == 0
    come_and_go = f"from coherent_volume import CoherentVolume\nCoherentVolume({str(root)!r}, agent='q').close()"
    for _ in range(3):  # while the child commits
        subprocess.run([sys.executable, "-c", come_and_go], check=True, timeout=60)
    stop.touch()
    deadline = time.monotonic() + 60
    while not done.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # (the file is written before the child exits)
    acknowledged = int(done.read_text())
    with CoherentVolume(root, agent="looker") as looker:
        assert looker.read("n.md") == b"%d" % acknowledged and looker.version("n.md") == acknowledged + 1
        assert {v.writer for v in looker.history("n.md")} == {"daemon"}
