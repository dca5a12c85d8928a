"""The mount: same protocol as the API, for unmodified programs, on a real FUSE mount."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume

from .harness.mounts import CLI, Mount, daemon_pids, dead_errno, is_mounted, watcher_pids

P = "plans/plan.md"


def version(m: Mount, rel: str, agent: str = "observer") -> int:
    with CoherentVolume(m.root, agent=agent) as v:
        return v.version(rel)


def test_passthrough_of_unmanaged_files_and_directories(mounted: Mount) -> None:
    r = mounted.run(
        "alice",
        """
set -e
mkdir -p notes/deep && echo one > notes/deep/a.txt && echo two >> notes/deep/a.txt
ln -s deep/a.txt notes/link && cat notes/link
mv notes/deep/a.txt notes/b.txt && ls notes && rm notes/link && chmod 600 notes/b.txt
stat -c %a notes/b.txt && truncate -s 3 notes/b.txt && cat notes/b.txt; echo
rmdir notes/deep && ls -A notes
""",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["one", "two", "b.txt", "deep", "link", "600", "one", "b.txt"]
    assert (mounted.root / "notes/b.txt").read_text() == "one"


def test_registry_is_invisible(mounted: Mount) -> None:
    assert ".coherent" not in os.listdir(mounted.path)
    with pytest.raises(FileNotFoundError):
        os.stat(mounted.path / ".coherent")
    with pytest.raises(FileNotFoundError):
        open(mounted.path / ".coherent/registry.db", "rb")


def test_stale_shell_write_is_refused_and_the_file_unchanged(mounted: Mount) -> None:
    assert mounted.run("alice", f"echo v1 > {P}").returncode == 0
    assert mounted.run("bob", f"cat {P}").returncode == 0
    before = version(mounted, P)
    assert mounted.run("alice", f"cat {P} >/dev/null && echo v2 > {P}").returncode == 0
    assert version(mounted, P) == before + 1
    refused = mounted.run("bob", f"echo clobber > {P}")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert (mounted.root / P).read_text() == "v2\n"
    assert version(mounted, P) == before + 1


def test_never_read_overwrite_is_refused(mounted: Mount) -> None:
    mounted.run("alice", f"echo mine > {P}")
    assert mounted.run("bob", f"echo theirs > {P}").returncode != 0
    assert (mounted.root / P).read_text() == "mine\n"


def test_append_needs_no_read_but_takes_the_grant(mounted: Mount) -> None:
    mounted.run("alice", f"echo first > {P}")
    assert mounted.run("bob", f"echo appended >> {P}").returncode == 0
    assert (mounted.root / P).read_text() == "first\nappended\n"
    with mounted.holding("carol", f"exec 3>>{P}; echo ready; sleep 30"):
        refused = mounted.run("bob", f"echo more >> {P}")
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert mounted.run("bob", f"echo more >> {P}").returncode == 0


def test_one_writer_at_a_time(mounted: Mount) -> None:
    mounted.run("alice", f"echo x > {P}")
    mounted.run("bob", f"cat {P}")
    with mounted.holding("alice", f"exec 3<>{P}; echo ready; sleep 30"):
        r = mounted.run("bob", f"cat {P} >/dev/null; echo y > {P}")
        assert r.returncode != 0 and "Permission denied" in r.stderr
    assert mounted.run("bob", f"cat {P} >/dev/null; echo y > {P}").returncode == 0


def test_fsync_after_a_commit_makes_that_commit_durable_without_a_second_version(mounted: Mount) -> None:
    mounted.run("alice", f"echo one > {P}")
    before = version(mounted, P)
    script = f"""cat {P} >/dev/null && python3 - <<'EOF'
import os
fd = os.open("{P}", os.O_WRONLY | os.O_TRUNC)
os.write(fd, b"two\\n")
os.close(os.dup(fd))  # a flush with data written: the commit
os.fsync(fd)          # reaches the committed file, not the spent shadow
os.close(fd)
EOF"""
    result = mounted.run("alice", script)
    assert result.returncode == 0, result.stderr
    assert (mounted.root / P).read_text() == "two\n"
    assert version(mounted, P) == before + 1


@pytest.mark.parametrize("where", ["/dev/shm", "tmp_path"])
def test_fsync_runs_on_the_event_loop_only_where_it_does_nothing(where: str, tmp_path: Path) -> None:
    """The mount runs an fsync on its event loop only on a file system whose fsync does nothing
    (tmpfs, ramfs: it cannot block), elsewhere in a worker thread (`fusefs.backing.syncs_nothing`,
    asked of each descriptor): checked against the file system type stat(1) names."""
    from fusefs.backing import syncs_nothing

    directory = tmp_path if where == "tmp_path" else Path(where)
    named = subprocess.run(["stat", "-f", "-c", "%T", str(directory)], capture_output=True, text=True, check=True)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert syncs_nothing(fd) == (named.stdout.strip() in ("tmpfs", "ramfs"))
    finally:
        os.close(fd)


def test_readers_never_see_a_partial_write_and_keep_their_version(mounted: Mount) -> None:
    mounted.run("alice", f"printf old > {P}")
    mounted.run("bob", f"cat {P}")
    reader = open(mounted.path / P, "rb")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import time
with open({str(mounted.path / P)!r}, "wb") as f:
    f.write(b"half")
    f.flush()  # reaches the mount as write(2); only close() commits
    print("written half", flush=True)
    time.sleep(1.5)
    f.write(b" and the rest")
""",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": "bob"},
    )
    try:
        assert writer.stdout.readline().strip() == "written half"
        assert (mounted.path / P).read_bytes() == b"old"
        assert (mounted.root / P).read_bytes() == b"old"
    finally:
        writer.wait(timeout=30)
    assert writer.returncode == 0
    assert reader.read() == b"old", "an open handle keeps serving the version it opened"
    reader.close()
    assert (mounted.path / P).read_bytes() == b"half and the rest"


def test_api_and_mount_are_one_volume(mounted: Mount) -> None:
    with CoherentVolume(mounted.root, agent="api") as api:
        api.write(P, b"from the api")
        assert mounted.run("shell", f"cat {P}").stdout == "from the api"
        assert mounted.run("shell", f"echo from the shell > {P}").returncode == 0
        with pytest.raises(PermissionError):
            api.write(P, b"stale api write")
        assert api.read(P) == b"from the shell\n"
        api.write(P, b"api again")
    refused = mounted.run("shell", f"echo stale shell > {P}")
    assert refused.returncode != 0
    assert mounted.run("shell", f"cat {P}").stdout == "api again"


def test_xattrs_report_version_and_view(mounted: Mount) -> None:
    mounted.run("alice", f"echo 1 > {P}")
    mounted.run("bob", f"cat {P}")
    mounted.run("alice", f"echo 2 > {P}")
    script = f"""import os
print(os.getxattr({P!r}, "user.coherent.version").decode(), os.getxattr({P!r}, "user.coherent.view").decode())"""
    get = lambda agent: subprocess.run(
        [sys.executable, "-c", script],
        cwd=mounted.path,
        capture_output=True,
        text=True,
        env={**os.environ, "COHERENT_AGENT": agent},
    ).stdout.split()
    current = str(version(mounted, P))
    assert not [n for n in os.listxattr(mounted.path / P) if n.startswith("user.coherent.")], "asked by name only"
    assert get("alice") == [current, "fresh"]
    assert get("bob") == [current, "stale"]
    assert get("carol") == [current, "unread"]


def test_foreign_write_into_root_is_seen_while_mounted(mounted: Mount) -> None:
    mounted.run("alice", f"echo 1 > {P}")
    mounted.run("bob", f"cat {P}")
    (mounted.root / P).write_text("typed into the backing directory\n")
    assert mounted.run("carol", f"cat {P}").stdout == "typed into the backing directory\n"
    assert mounted.run("bob", f"echo stale > {P}").returncode != 0
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert v.read(P) == b"typed into the backing directory\n"
    log = subprocess.run([CLI, "log", str(mounted.root), "--json"], capture_output=True, text=True).stdout
    assert '"kind": "foreign"' in log


def gone_within(seconds: float, pids: Callable[[], list[int]]) -> bool:
    deadline = time.monotonic() + seconds
    while pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not pids()


def test_unmount_ends_the_daemon_and_its_watcher(root: Path, tmp_path: Path) -> None:
    m = Mount(root, tmp_path / "mnt")
    with m:
        assert len(daemon_pids(m.path)) == 1 and len(watcher_pids(m.path)) == 1
        result = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert gone_within(10, lambda: daemon_pids(m.path) + watcher_pids(m.path))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_unmount_says_when_another_mount_namespace_still_holds_a_copy(root: Path, tmp_path: Path) -> None:
    """A process that made a mount namespace of its own (`unshare -m`, a container) holds a copy of
    the mount, which the kernel keeps, and the daemon serves it, after `unmount` here succeeded:
    `unmount` says so, naming the process (before, nothing told that the daemon lived on); a bind
    mount of it in this namespace likewise, as what it is."""
    m = Mount(root, tmp_path / "mnt")
    holder = None
    with m:
        holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sleep", "60"])
        try:
            deadline = time.monotonic() + 10
            while (
                not Path(f"/proc/{holder.pid}/ns/mnt").exists()
                or os.stat(f"/proc/{holder.pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
            ):
                assert time.monotonic() < deadline, "unshare made no namespace"
                time.sleep(0.01)
            result = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
            assert f"in the mount namespace of process {holder.pid}" in result.stderr, result
            assert "a bind mount" not in result.stderr, result
            assert daemon_pids(m.path), "the daemon serves the copy"
        finally:
            holder.kill()
            holder.wait()
        assert gone_within(10, lambda: daemon_pids(m.path) + watcher_pids(m.path))
        result = subprocess.run([CLI, "mount", str(root), str(m.path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        bound = tmp_path / "bound"
        bound.mkdir()
        subprocess.run(["mount", "--bind", str(m.path), str(bound)], check=True)
        try:  # a bind mount in this namespace is named as one, never as another namespace's
            result = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True)
            assert result.returncode == 0 and f"at {bound} (a bind mount of it" in result.stderr, result
            assert "mount namespace of process" not in result.stderr, result
        finally:
            subprocess.run(["umount", str(bound)], check=True)
        assert gone_within(10, lambda: daemon_pids(m.path) + watcher_pids(m.path))


def foreign_versions(root: Path, rel: str) -> list[int]:
    """Versions the registry recorded for `rel` as changes by 'external' (a first sighting is an
    adoption), read from the log (reading it changes nothing)."""
    out = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, check=True).stdout
    events = [json.loads(line) for line in out.splitlines()]
    return [e["version"] for e in events if e["kind"] in ("foreign", "adopt") and e["path"] == rel]


def recorded_within(seconds: float, root: Path, rel: str) -> bool:
    deadline = time.monotonic() + seconds
    while not foreign_versions(root, rel) and time.monotonic() < deadline:
        time.sleep(0.1)
    return bool(foreign_versions(root, rel))


def test_the_watcher_records_a_foreign_write_with_no_access_at_all(mounted: Mount) -> None:
    (mounted.root / "plans").mkdir(exist_ok=True)
    (mounted.root / P).write_text("typed into the backing directory\n")  # the mount never touched it
    assert recorded_within(10, mounted.root, P)


def test_a_killed_watcher_is_restarted_and_the_mount_keeps_serving(mounted: Mount) -> None:
    mounted.run("alice", f"echo 1 > {P}")
    [first] = watcher_pids(mounted.path)
    os.kill(first, 9)
    deadline = time.monotonic() + 10
    while watcher_pids(mounted.path) in ([], [first]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(watcher_pids(mounted.path)) == 1 and watcher_pids(mounted.path) != [first]
    assert mounted.run("alice", f"cat {P}").stdout == "1\n"
    other = "plans/other.md"  # a path the mount never touched: no echo of its own to discount
    deadline = time.monotonic() + 10
    while not foreign_versions(mounted.root, other) and time.monotonic() < deadline:
        (mounted.root / other).write_text("after the restart\n")  # until the new watcher has its watches
        time.sleep(0.2)
    assert foreign_versions(mounted.root, other)
    assert mounted.run("bob", f"cat {other}").stdout == "after the restart\n"


def test_the_daemon_never_imports_code_from_the_callers_directory(root: Path, tmp_path: Path) -> None:
    """The daemon runs as root and agents write into volumes: packages planted in the directory
    `mount` is run from, named as what the daemon (`trio`) and its watcher process (`ctypes`,
    `select`) import, must not be imported by either."""
    planted = tmp_path / "cwd"
    marker = tmp_path / "imported"
    for name in ("trio", "ctypes", "select"):
        (planted / name).mkdir(parents=True)
        (planted / name / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        result = subprocess.run([CLI, "mount", str(root), str(mp)], cwd=planted, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert len(watcher_pids(mp)) == 1
    finally:
        Mount(root, mp).unmount()
    assert not marker.exists()


def test_a_failure_inside_the_daemon_is_reported_without_trios_wrapping() -> None:
    from fusefs.mount import MountError, _reason

    assert _reason(ExceptionGroup("Exceptions from Trio nursery", [MountError("the reason")])) == "the reason"


def test_sequential_reads_get_a_wide_readahead_even_at_an_awkward_mountpoint(root: Path, tmp_path: Path) -> None:
    m = Mount(root, tmp_path / "mount point\twith space")  # /proc escapes both in mountinfo
    with m:
        device = os.stat(m.path).st_dev
        bdi = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
        log = root / ".coherent" / "mount.log"

        def widened() -> bool:
            if os.access(bdi, os.W_OK):
                return bdi.read_text().strip() == "1024"
            return "kept the default readahead" in log.read_text()  # a read-only /sys: said so

        deadline = time.monotonic() + 10  # set by the daemon just after it starts serving
        while not widened() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert widened()
        assert m.run("alice", "head -c 3000000 /dev/urandom > big.bin").returncode == 0
        assert (m.path / "big.bin").read_bytes() == (root / "big.bin").read_bytes()


def test_a_root_moved_while_mounted_fails_closed_with_eio_and_says_so(root: Path, tmp_path: Path) -> None:
    """The volume's root moved away (`mv ROOT ROOT2`) under its mount: managed calls failed ENOENT
    on names that exist (at the root's new place) and the log said nothing (found by a hostile probe).
    Now each is EIO, logged with what happened and what to do; nothing changes, and the mount serves
    again once the root is back."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/a.md", b"v1")
    moved = tmp_path / "moved"
    with Mount(root, tmp_path / "mnt") as m:
        plans = m.path / "plans"
        os.rename(root, moved)
        try:
            uses: list[Callable[[], object]] = [
                lambda: os.listdir(plans),
                lambda: (plans / "a.md").read_bytes(),
                lambda: (plans / "a.md").write_bytes(b"x"),
                lambda: (plans / "new.md").write_bytes(b"n"),
                lambda: os.unlink(plans / "a.md"),
                lambda: os.rename(plans / "a.md", plans / "b.md"),
            ]
            for n, use in enumerate(uses):
                with pytest.raises(OSError) as info:
                    use()
                assert info.value.errno == errno.EIO, (n, info.value)
            log = (moved / ".coherent/mount.log").read_text()
            assert "the volume's root was removed or moved while in use" in log
            assert sorted(os.listdir(moved / "plans")) == ["a.md"] and (moved / "plans/a.md").read_bytes() == b"v1"
        finally:
            os.rename(moved, root)
        assert (plans / "a.md").read_bytes() == b"v1"
    with CoherentVolume(root, agent="bob") as bob:
        assert [v.writer for v in bob.history("plans/a.md")] == ["alice"]


def test_the_daemon_logs_to_a_mount_log_made_again_after_its_coherent_directory_was_removed(
    root: Path, tmp_path: Path
) -> None:
    """`.coherent` removed while mounted: every managed call fails EIO (fail closed), and the daemon's
    explanation went to the removed mount.log, so nobody could read why (found by a hostile probe).
    The daemon's log follows its path: once `init` made `.coherent` again, it says there why it
    refuses, and what to do."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/a.md", b"v1")
    with Mount(root, tmp_path / "mnt") as m:
        assert (m.path / "plans/a.md").read_bytes() == b"v1"
        shutil.rmtree(root / ".coherent")
        r = subprocess.run([CLI, "init", str(root), "-m", "plans/**"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        with pytest.raises(OSError) as info:
            (m.path / "plans/a.md").write_bytes(b"v2 into a removed registry")
        assert info.value.errno == errno.EIO
        log = root / ".coherent/mount.log"
        assert log.exists() and "was removed or replaced while this process had it open" in log.read_text()
        assert "restart the program, the mount" in log.read_text()
        assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert (root / "plans/a.md").read_bytes() == b"v1"


def test_a_registry_cut_under_a_mount_stays_as_the_refusals_say_and_the_logs_follow_mount_log(
    root: Path, tmp_path: Path
) -> None:
    """The registry file cut to nothing under a mount: writes fail EIO, and at unmount the daemon's
    close checkpointed its write-ahead log into the cut file and removed the log that the refusals
    told the user to keep for salvage (found by a hostile probe, 3/3). And once mount.log was moved
    aside, the trace of a fatal signal (the -shm cut: SQLite maps it) went to the old file. The log
    names the call the registry failed (a WARNING: the program was told EIO)."""
    db = root / ".coherent/registry.db"
    mnt = tmp_path / "mnt"
    m = Mount(root, mnt, log_allows=[r".*Fatal Python error", r".*Bus error"])
    with m:
        for n in range(20):
            (mnt / "plans" / f"{n}.md").write_bytes(b"x" * 1000)
        wal = Path(f"{db}-wal")
        logged = wal.read_bytes()
        assert logged
        os.truncate(db, 0)
        with pytest.raises(OSError) as info:
            (mnt / "plans/0.md").write_bytes(b"after the cut")
        assert info.value.errno == errno.EIO
        failed = re.search(
            r" WARNING (\w+) failed \(EIO\): ", m.log.read_text()
        )  # (before: INFO 'refused', no call named)
        assert failed is not None and failed.group(1) in ("lookup", "getattr", "open", "setattr"), m.log.read_text()[
            -2000:
        ]
        m.unmount()
        assert db.stat().st_size == 0 and wal.read_bytes()[: len(logged)] == logged
    for side in ("", "-wal", "-shm"):
        Path(f"{db}{side}").unlink(missing_ok=True)
    r = subprocess.run([CLI, "init", str(root), "-m", "plans/**"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with Mount(
        root, mnt, log_allows=[r".*Fatal Python error", r".*Bus error", r".*Current thread", r".*Thread 0x"]
    ) as m:
        (mnt / "plans/a.md").write_bytes(b"one")
        log = root / ".coherent/mount.log"
        log.rename(root / ".coherent/mount.log.1")
        refused = f"echo two > {mnt / 'plans/a.md'}"  # a refusal: a record, in a new mount.log
        subprocess.run(["bash", "-c", refused], env={**os.environ, "COHERENT_AGENT": "bob"}, capture_output=True)
        assert "refused" in log.read_text()
        os.truncate(f"{db}-shm", 0)
        for _ in range(3):
            with contextlib.suppress(OSError):
                (mnt / "plans/a.md").write_bytes(b"two")
        deadline = time.monotonic() + 30
        while "Fatal Python error" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Fatal Python error: Bus error" in log.read_text(), log.read_text()
        assert "Fatal Python error" not in (root / ".coherent/mount.log.1").read_text()


def test_kill_9_of_the_daemon_leaves_the_mount_dead_and_remount_recovers(root: Path, tmp_path: Path) -> None:
    m = Mount(root, tmp_path / "mnt")
    with m:
        m.run("alice", f"echo kept > {P}")
        assert len(watcher_pids(m.path)) == 1
        for pid in daemon_pids(m.path):
            os.kill(pid, 9)
        with pytest.raises(OSError) as info:
            os.listdir(m.path)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED), "a dead mount, never a bare directory"
        assert is_mounted(m.path)
        assert gone_within(10, lambda: watcher_pids(m.path)), "the watcher process dies with its daemon"
        again = subprocess.run([CLI, "mount", str(root), str(m.path)], capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
        assert m.run("alice", f"cat {P}").stdout == "kept\n"
        before = version(m, P)
        assert m.run("alice", f"echo next > {P}").returncode == 0
    assert version(m, P) == before + 1


KILLED_SETTING_ASIDE = """
import os, sys
from coherent_volume import CoherentVolume, atomic
set_aside = atomic.set_aside
def killed(path, aside):
    set_aside(path, aside)
    os.kill(os.getpid(), 9)
atomic.set_aside = killed
with CoherentVolume(sys.argv[1], agent="alice") as v:
    v.read(sys.argv[2])
    v.delete(sys.argv[2])
"""


def test_a_mount_settles_what_a_killed_deletion_set_aside_before_it_serves(root: Path, tmp_path: Path) -> None:
    """A deletion killed after its decision set the file aside (`.NAME.cv-PID-XXXXXXXX.tmp`, beside
    it) left that name in the directory: a mount started then listed it, a stray unmanaged file in
    the managed glob, until some process's next commit settled it (found by a hostile tester
    killing the daemon mid-unlink). The mount settles it before it serves."""
    with CoherentVolume(root, agent="alice") as v:
        v.write(P, "doomed\n")
    killed = subprocess.run([sys.executable, "-c", KILLED_SETTING_ASIDE, str(root), P], timeout=60)
    assert killed.returncode == -9
    directory = os.path.dirname(P)
    assert [n for n in os.listdir(root / directory) if ".cv-" in n], "the killed deletion left its set-aside name"
    with Mount(root, tmp_path / "mnt") as m:
        assert [n for n in os.listdir(m.path / directory) if ".cv-" in n] == []
        assert not (m.path / P).exists()
    with CoherentVolume(root, agent="bob") as v:
        assert [h.kind for h in v.history(P)] == ["delete", "commit"]


def test_mount_and_unmount_errors_are_clear(root: Path, tmp_path: Path) -> None:
    busy = tmp_path / "full"
    busy.mkdir()
    (busy / "x").write_text("x")
    r = subprocess.run([CLI, "mount", str(root), str(busy)], capture_output=True, text=True)
    assert r.returncode == 1 and "not empty" in r.stderr
    r = subprocess.run([CLI, "mount", str(tmp_path / "nope"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = subprocess.run([CLI, "unmount", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "not a mounted volume" in r.stderr
    with Mount(root, tmp_path / "mnt") as m:
        holder = subprocess.Popen(["sleep", "30"], cwd=m.path)
        try:
            r = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True)
            assert r.returncode == 1 and "busy" in r.stderr
        finally:
            holder.kill()
            holder.wait()
        r = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.path)


def test_a_mountpoint_inside_a_mount_of_the_same_volume_is_refused(root: Path, tmp_path: Path) -> None:
    """`mount ROOT MNT1/plans/sub`, MNT1 a mount of ROOT: the new mount would sit on a directory of
    the volume it serves, as `mount ROOT ROOT/plans/sub` would, which is refused; it was accepted
    (and `status` and `unmount` then misreported the stack, /tmp/s28r3 F5)."""
    with Mount(root, tmp_path / "m1") as m1:
        inner = m1.path / "plans/sub"
        inner.mkdir(parents=True)
        for given in (root, m1.path):  # the volume named by its root, and by its mount
            r = subprocess.run([CLI, "mount", str(given), str(inner)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and f"through its mount at {m1.path}" in r.stderr, r.stderr
            assert "mount it outside the volume" in r.stderr
        assert not is_mounted(inner) and not daemon_pids(inner)
        assert subprocess.run([CLI, "mount", str(root), str(root / "plans/sub")], capture_output=True).returncode == 1


def test_a_volume_named_by_a_mount_of_it_is_mounted_from_its_root(root: Path, tmp_path: Path) -> None:
    """`mount MNT1 MNT2`, MNT1 a mount of the volume, mounts the volume's root at MNT2, as every
    command opens a volume named by a mount of it (before, the daemon looked for its log in MNT1's
    .coherent, which a mount does not show: the mount failed, naming a log that did not exist,
    /tmp/s28cli 1)."""
    with Mount(root, tmp_path / "m1") as m1:
        second = tmp_path / "m2"
        second.mkdir()
        try:
            r = subprocess.run([CLI, "mount", str(m1.path), str(second)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            sources = [line.split()[0] for line in Path("/proc/self/mounts").read_text().splitlines()]
            assert sources.count(str(root)) == 2, "both mounts serve the root itself"
            (second / P).write_text("through the second\n")
            assert (m1.path / P).read_text() == "through the second\n"
        finally:
            subprocess.run([CLI, "unmount", str(second)], capture_output=True, timeout=60)
        assert not is_mounted(second)  # (its daemon ends just after: at load ~4 it was seen still ending)
        assert gone_within(10, lambda: daemon_pids(second))


def test_commands_given_a_mount_whose_daemon_died_say_so(root: Path, tmp_path: Path) -> None:
    """`status`, `policy`, `prune`, `log` and `mount` of a mountpoint whose daemon was killed say it
    is such a mount and what to do, not that the directory does not exist."""
    with Mount(root, tmp_path / "mnt") as m:
        m.kill_daemon()
        assert gone_within(10, lambda: daemon_pids(m.path))
        for command in ("status", "policy", "prune", "log"):
            r = subprocess.run([CLI, command, str(m.path)], capture_output=True, text=True, timeout=60)
            assert r.returncode == 2 and "is a mount whose daemon is gone" in r.stderr, (command, r.stderr)
            assert "coherent-volume unmount" in r.stderr
        other = tmp_path / "other"
        other.mkdir()
        r = subprocess.run([CLI, "mount", str(m.path), str(other)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "is a mount whose daemon is gone" in r.stderr, r.stderr  # (not "does not exist")


def test_agent_comes_from_the_nearest_ancestor_and_threads_map_to_their_process(mounted: Mount, tmp_path: Path) -> None:
    mounted.run("alice", f"echo 1 > {P}")
    reader = tmp_path / "thread_reader.py"
    reader.write_text(f"""
import threading
def work():
    with open({P!r}) as f:
        f.read()
t = threading.Thread(target=work)
t.start()
t.join()
""")
    # bash (COHERENT_AGENT=bob) -> python without the variable, reading from a second thread
    r = mounted.run("bob", f"env -u COHERENT_AGENT {sys.executable} {reader}; exit $?")
    assert r.returncode == 0, r.stderr
    with CoherentVolume(mounted.root, agent="observer") as v:
        assert v._core.view_state("bob", v._core.paths.of_rel(P))[1] == "fresh"


def test_mount_default_agent(root: Path, tmp_path: Path) -> None:
    with Mount(root, tmp_path / "mnt", agent="default-agent") as m:
        env = {k: v for k, v in os.environ.items() if k != "COHERENT_AGENT"}
        r = subprocess.run(["bash", "-c", f"echo hi > {P}"], cwd=m.path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    log = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True).stdout
    assert '"agent": "default-agent"' in log


def test_why_works_from_inside_the_mount(mounted: Mount) -> None:
    mounted.run("alice", f"echo 1 > {P}")
    mounted.run("bob", f"cat {P}")
    mounted.run("alice", f"echo 2 > {P}")
    assert mounted.run("bob", f"echo 3 > {P}").returncode != 0
    r = subprocess.run([CLI, "why", str(mounted.path / P)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "agent bob (stale)" in r.stdout and "re-read" in r.stdout


def test_foreign_write_to_an_unmanaged_file_reaches_cached_readers(mounted: Mount) -> None:
    (mounted.root / "notes.txt").write_text("old")
    assert (mounted.path / "notes.txt").read_text() == "old"  # now in the kernel's caches
    (mounted.root / "notes.txt").write_text("new content")
    deadline = time.monotonic() + 10
    while (mounted.path / "notes.txt").read_text() != "new content" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (mounted.path / "notes.txt").read_text() == "new content"


@pytest.mark.parametrize("where", ["build/x.txt", "notes.txt"], ids=["unwatched", "watched"])
def test_a_foreign_change_keeping_size_and_mtime_reaches_the_next_open(mounted: Mount, where: str) -> None:
    """A file changed behind the volume's back in place, its size and mtime put back: the next open
    through the mount reads the new bytes (the kernel kept its cache on every open, and served the
    old bytes for good where nothing watches: found by a hostile probe)."""
    backing = mounted.root / where
    backing.parent.mkdir(exist_ok=True)
    backing.write_text("012345")
    assert (mounted.path / where).read_text() == "012345"  # now in the kernel's page cache
    before = backing.stat()
    with open(backing, "r+b") as f:
        f.write(b"XXXX")
    os.utime(backing, ns=(before.st_atime_ns, before.st_mtime_ns))
    time.sleep(1.5)  # past the attributes' timeout
    assert (mounted.path / where).read_text() == "XXXX45"


def test_registry_cannot_be_renamed_or_deleted_through_the_mount(mounted: Mount) -> None:
    r = mounted.run("alice", "mv .coherent x; rm -rf .coherent; cat .coherent/registry.db; ls -A")
    assert ".coherent" not in r.stdout
    assert (mounted.root / ".coherent/registry.db").exists()


def test_no_dev_fuse_is_a_clear_error(root: Path, tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(
        ["unshare", "-m", "bash", "-c", f"mount -t tmpfs none /dev && {CLI} mount {root} {tmp_path / 'mnt'}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "no /dev/fuse" in r.stderr


_INSIDE = {
    # way -> (what is mounted first, the mountpoint then given); S is a directory outside the volume
    "by name": ("true", "{root}/inner"),
    "through a bind mount of it": ("mount --bind {root} {s}", "{s}/inner"),
    "through a mount inside it": ("mount -t tmpfs none {root}/t && mount --bind {root}/t {s}", "{s}/inner"),
    "through a bind mount inside it": ("mount --bind {s} {root}/t", "{s}/inner"),
    # the mountpoint a dead mount (of another volume, its daemon killed), which stat cannot look at
    "through a bind mount inside it, over a dead mount": (
        "mount --bind {s} {root}/t && mkdir {s}/inner && {cli} init {s}2 -m '*.md' >/dev/null && "
        "{cli} mount {s}2 {s}/inner >/dev/null && kill -9 $(pgrep -x -f '.*python.* {cli} mount {s}2 {s}/inner') && sleep 0.5",
        "{s}/inner",
    ),
}


@pytest.mark.parametrize("way", sorted(_INSIDE))
def test_a_mountpoint_inside_the_volume_is_refused(root: Path, tmp_path: Path, way: str) -> None:
    """A mountpoint that is a directory of the volume, also when reached through a bind mount of it
    or of a mount inside it (which would receive the mount and make the daemon wait on itself:
    found by hostile probes, each a hang), is refused before anything is mounted. Run in a mount
    namespace of its own, with shared propagation, so nothing made here is seen outside."""
    (root / "inner").mkdir()
    (root / "t").mkdir()
    (tmp_path / "S").mkdir()
    first, given = (part.format(root=root, s=tmp_path / "S", cli=CLI) for part in _INSIDE[way])
    count = f"grep -c ' {given} ' /proc/self/mountinfo"
    script = (
        f"mount --make-rshared / && {first} && (mkdir -p {given} 2>/dev/null; true) && {count}; "
        f"{CLI} mount {root} {given}; echo rc=$?; {count}"
    )
    try:
        r = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=60)
        before, status, after = r.stdout.split()[-3:]
        assert status == "rc=1" and after == before, r
        if way.endswith("over a dead mount"):  # another volume's mount below the root: no root is opened
            assert f"{root}/t/inner, inside the volume at {root}, is a mount of {tmp_path}/S2" in r.stderr, r.stderr
        else:
            assert f"mountpoint {given} is a directory of the volume at {root}" in r.stderr
    finally:
        daemons = subprocess.run(["pgrep", "-f", f"coherent-volume mount {tmp_path}/"], capture_output=True, text=True)
        for pid in [int(p) for p in daemons.stdout.split()]:
            os.kill(pid, 9)


@pytest.mark.parametrize("over", [False, True], ids=["fresh", "over a dead mount"])
def test_a_daemon_that_never_reports_ready_is_stopped_within_the_bound(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, over: bool
) -> None:
    """`mount` waits for its daemon's report a bounded time: then the daemon is killed, nothing it
    mounted is left, and the error says so (it waited forever on a daemon hung on its own mount).
    A dead mount it was to go over stays, never a bare directory (found by a hostile probe)."""
    from fusefs import mount as mounting

    mnt = tmp_path / "mnt"
    dead = Mount(root, mnt)
    if over:
        dead.mount()
        dead.kill_daemon()
    else:
        mnt.mkdir()
    monkeypatch.setattr(mounting, "READY_TIMEOUT", 1.0)
    monkeypatch.setattr(mounting, "serve", lambda *args: time.sleep(600))  # in the forked daemon
    started = time.monotonic()
    try:
        with pytest.raises(mounting.MountError, match="did not report the mount of .* ready within 1 s") as info:
            mounting.mount(str(root), str(mnt), None, foreground=False, allow_other=False)
        assert time.monotonic() - started < 30
        if over:
            assert "the dead mount it was to go over stays there" in str(info.value)
            assert is_mounted(mnt) and dead_errno(mnt) in (errno.ENOTCONN, errno.ECONNABORTED)
        else:
            assert "nothing is mounted there" in str(info.value)
            assert not is_mounted(mnt) and os.listdir(mnt) == []
    finally:
        dead.unmount()


@pytest.mark.parametrize("when", ["before it mounts", "once mounted"])
def test_a_daemon_killed_before_it_reports_ready_leaves_nothing_mounted_and_is_said_killed(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A daemon killed (SIGKILL) before it reports its mount ready: `mount` says how it ended and
    detaches the dead mount it made (/tmp/s26crash finding 1: "the mount daemon exited before the
    mount was ready", and a dead mount left at the mountpoint, unmentioned)."""
    from fusefs import mount as mounting

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    serve = mounting.serve

    def killed(m: Any, agent: Any, allow_other: bool, ready: Any) -> None:  # in the forked daemon
        if when == "before it mounts":
            os.kill(os.getpid(), signal.SIGKILL)
        serve(m, agent, allow_other, lambda: os.kill(os.getpid(), signal.SIGKILL))

    monkeypatch.setattr(mounting, "serve", killed)
    try:
        with pytest.raises(mounting.MountError) as info:
            mounting.mount(str(root), str(mnt), None, foreground=False, allow_other=False)
        assert f"the mount daemon of {root} was killed by SIGKILL before it reported the mount at {mnt} ready" in str(
            info.value
        ), info.value
        assert "nothing is mounted there" in str(info.value) and "Mount again" in str(info.value)
        assert not is_mounted(mnt) and os.listdir(mnt) == []
    finally:
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


def test_status_says_which_mount_of_the_volume_lost_its_daemon(root: Path, tmp_path: Path) -> None:
    """`status ROOT` lists a mount whose daemon was killed as gone, with what to do (it printed it
    as it prints a live one: /tmp/s26crash finding 2); --json lists it under mounts_gone."""
    live, dead = Mount(root, tmp_path / "live"), Mount(root, tmp_path / "dead")
    with live, dead:
        dead.kill_daemon()
        shown = subprocess.run([CLI, "status", str(root)], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        said = " ".join(shown.stdout.split())
        assert f"mounted at {live.path}\n" in shown.stdout, shown.stdout
        assert f"mounted at {dead.path}: its daemon is gone (killed)" in said, shown.stdout
        assert f"`coherent-volume unmount {dead.path}` removes the mount" in said, shown.stdout
        data = json.loads(subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True).stdout)
        assert set(data["mounts"]) == {str(live.path), str(dead.path)} and data["mounts_gone"] == [str(dead.path)]


def test_status_prints_a_root_and_a_mountpoint_named_with_control_characters_escaped(tmp_path: Path) -> None:
    """The root and mountpoint lines of `status` escape their names as every other name is (a
    mountpoint named with a newline and ESC forged a line: /tmp/s26r2 F4)."""
    root, mnt = tmp_path / "vol\nfiles\x1b[2K", tmp_path / "mnt\nmounted at /elsewhere\x1b[2K"
    root.mkdir()
    subprocess.run([CLI, "init", str(root), "--managed", "plans/**"], check=True, capture_output=True)
    with Mount(root, mnt):
        shown = subprocess.run([CLI, "status", str(root)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "\x1b" not in shown.stdout and "mounted at /elsewhere" not in shown.stdout.splitlines(), shown.stdout
    assert f"mounted at {tmp_path}/mnt\\x0amounted at /elsewhere\\x1b[2K" in shown.stdout, shown.stdout


def test_a_descriptor_whose_file_changed_after_its_commit_is_refused_saying_to_open_it_again(mounted: Mount) -> None:
    """A write handle committed (the close of a dup), its file then changed by name, then written
    again through it: EACCES, and what the log and `why` say names the version its writes were
    committed as, and to open the file again (/tmp/s26posix finding 2: "you read v3; current
    version is 3", and to re-read, which cannot make that descriptor write again)."""
    r = mounted.run(
        "alice",
        f"""python3 -c '
import os
fd = os.open("{P}", os.O_WRONLY | os.O_CREAT, 0o644)
os.write(fd, b"Q" * 70)
os.close(os.dup(fd))
os.truncate("{P}", 0)
try:
    os.write(fd, b"more")
except OSError as e:
    print(e.errno)
os.close(fd)
'""",
    )
    assert r.stdout.strip() == str(errno.EACCES), (r.stdout, r.stderr)
    assert "through a descriptor of alice whose writes were committed as version 2: the file changed since (now" in (
        mounted.log.read_text()
    )
    assert "close it and open the file again to write" in mounted.log.read_text()
    why = subprocess.run([CLI, "why", str(mounted.root), P, "--json"], capture_output=True, text=True)
    refusal = json.loads(why.stdout)["refusal"]
    assert refusal["version"] == 3 and refusal["detail"].startswith("based on v2 (a write handle"), refusal


def test_a_daemon_that_mounted_over_a_dead_mount_unmounts_both_when_stopped(root: Path, tmp_path: Path) -> None:
    """SIGTERM to a daemon serving over a dead mount unmounts, as it does a fresh one (libfuse
    unmounts only what it mounted itself: both stayed, dead; found by a hostile probe)."""
    mnt = tmp_path / "mnt"
    m = Mount(root, mnt)
    with m:
        m.kill_daemon()
        assert subprocess.run([CLI, "mount", str(root), str(mnt)], capture_output=True).returncode == 0
        (pid,) = daemon_pids(mnt)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while is_mounted(mnt) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not is_mounted(mnt) and os.listdir(mnt) == []


@pytest.mark.mount_log_allows("the mount daemon has no file descriptor left")
def test_a_daemon_out_of_descriptors_answers_enfile_and_says_so(mounted: Mount) -> None:
    """The daemon's own descriptor limit reached: callers are told ENFILE (EMFILE said that their
    own table was full, and the log said nothing), the log names the limit to raise, and opens work
    again once descriptors are free."""
    for n in range(100):
        (mounted.root / f"f{n}.txt").write_text("x")
    for pid in daemon_pids(mounted.path):
        subprocess.run(["prlimit", f"--pid={pid}", "--nofile=64:64"], check=True)
    held, failures = [], []
    try:
        for n in range(100):
            try:
                held.append(os.open(mounted.path / f"f{n}.txt", os.O_RDONLY))
            except OSError as e:
                failures.append(e.errno)
    finally:
        for fd in held:
            os.close(fd)
    assert failures and set(failures) == {errno.ENFILE}, failures
    assert (mounted.path / "f99.txt").read_text() == "x"
    log = mounted.log.read_text()
    assert "the mount daemon has no file descriptor left (its limit is 64" in log and "ulimit -Hn" in log


WRITER = """
import errno, os, sys, time
made, refused, end = 0, 0, time.monotonic() + 60
while made < int(sys.argv[2]) and time.monotonic() < end:
    try:
        with open(os.path.join(sys.argv[1], f"w{made}.txt"), "x") as f:
            f.write("x")
        made += 1
    except OSError as e:
        refused += 1
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
        time.sleep(0.001)
print(made, refused)
"""


def test_mounting_again_over_a_killed_daemons_mount_never_shows_the_bare_directory(root: Path, tmp_path: Path) -> None:
    """Between the dead mount and the new one no program may meet the bare directory under them:
    it wrote there, outside the volume, and `mount` then refused it as not empty and left it bare
    (found by a hostile probe: hundreds of files per try). The new mount goes over the dead one,
    and `unmount` takes both away."""
    mnt = tmp_path / "mnt"
    m = Mount(root, mnt)
    with m:
        m.kill_daemon()
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt), "200"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        r = subprocess.run([CLI, "mount", str(root), str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        made, refused = (int(n) for n in writer.communicate(timeout=60)[0].split())
        assert refused > 0 and made > 0  # ENOTCONN while dead, then written through the new mount
        assert sorted(p.name for p in root.glob("w*.txt")) == sorted(f"w{n}.txt" for n in range(made))
        assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if f" {mnt} " in line][1:]
        r = subprocess.run([CLI, "unmount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(mnt) and os.listdir(mnt) == []  # both gone, and nothing was ever written beneath


def test_a_dead_mount_named_through_a_symlink_is_mounted_over_and_unmounted(root: Path, tmp_path: Path) -> None:
    """A dead mount named through a symlinked directory above it is one too: `mount` goes over it
    and `unmount` takes the stack (they said "does not exist" and "is not a mounted volume",
    found by a hostile probe)."""
    (tmp_path / "via").symlink_to(tmp_path)
    m = Mount(root, tmp_path / "mnt")
    with m:
        m.kill_daemon()
        via = tmp_path / "via" / "mnt"
        r = subprocess.run([CLI, "mount", str(root), str(via)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        over = daemon_pids(via)  # (named as it was given: the daemon's arguments)
        assert len(over) == 1
        os.kill(over[0], signal.SIGKILL)
        assert gone_within(10, lambda: daemon_pids(via))
        r = subprocess.run([CLI, "unmount", str(via)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(m.path) and os.listdir(m.path) == []


def test_a_dead_daemons_handle_grants_never_lock_an_agent_out(root: Path, tmp_path: Path) -> None:
    """A write handle still open when the daemon dies leaves a grant behind; after remounting the
    same agent (and others) can write again: only lock() grants fence their holder."""
    m = Mount(root, tmp_path / "mnt")
    with m:
        m.run("alice", f"echo 1 > {P}")
        holder = subprocess.Popen(
            ["bash", "-c", f"exec 3>>{P}; echo open; sleep 60"],
            cwd=m.path,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": "alice"},
        )
        assert holder.stdout.readline().strip() == "open"
        for pid in daemon_pids(m.path):
            os.kill(pid, 9)
        holder.kill()
        holder.wait()
        assert subprocess.run([CLI, "mount", str(root), str(m.path)], capture_output=True).returncode == 0
        assert m.run("alice", f"cat {P} >/dev/null && echo 2 > {P}").returncode == 0
        assert m.run("bob", f"cat {P} >/dev/null && echo 3 > {P}").returncode == 0
