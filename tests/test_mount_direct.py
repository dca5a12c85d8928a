"""`coherent-volume mount --direct DIR` (issue 12): a subtree no managed glob can reach served by the
kernel through a bind mount over the FUSE mount, bypassing the daemon.

What is checked: which directories are refused (nothing mounted, nothing changed); that the kernel
serves the direct dirs while the daemon still guards the managed files; what a direct dir breaks
(docs/mount.md, "Differences from a local file system"); the same system-call sequences as
tests/test_conformance.py inside a direct dir answer as a plain directory does; and the binds'
lifecycle: unmounted before the volume by `unmount` (a busy one refused, the mount left as it
was), by SIGTERM, with a killed daemon, and in a peer mount namespace.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume.mounts import direct_dirs, unescape
from fusefs.operations import UNMANAGED_TIMEOUT

from .harness.conformance import Runner, Step
from .harness.mounts import CLI, DEAD_ERRNOS, Mount, daemon_pids, dead_errno
from .test_conformance import CASES, Expect


def mountpoints_under(base: Path) -> list[str]:
    """Every mount (of any kind) at or below `base` in this mount namespace."""
    return mountpoints_in(base, "/proc/self/mountinfo")


def mountpoints_in(base: Path, mountinfo: str) -> list[str]:
    top = str(base)
    with open(mountinfo) as f:
        points = [unescape(line.split()[4]) for line in f]
    return sorted(p for p in points if p == top or p.startswith(top + "/"))


def mount_cli(root: Path, mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "mount", str(root), str(mnt), *args], capture_output=True, text=True, timeout=60)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def wait_until_gone(pids: list[int], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids), f"still running: {pids}"


# ---- which directories ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dirs", "says"),
    [
        (["plans"], "managed glob 'plans/**' can match paths there"),
        (["plans/sub"], "managed glob 'plans/**' can match paths there"),
        (["notes.md"], "managed glob '*.md' can match paths there"),
        ([".coherent"], "the volume's registry"),
        ([".coherent/objects"], "the volume's registry"),
        (["."], "that is the volume root"),
        (["../outside"], "it leaves the volume root"),
        (["deps/../../outside"], "it leaves the volume root"),
        (["/abs/deps"], "give the directory relative to the volume root"),
        (["link/deps"], "link is a symlink in the volume root"),
        (["link"], "link is a symlink in the volume root"),
        (["afile/deps"], "afile is not a directory"),
        (["deps", "deps/sub"], "--direct deps/sub: it overlaps --direct deps"),
        (["deps/sub", "deps"], "--direct deps: it overlaps --direct deps/sub"),
        (["deps", "deps/"], "--direct deps/: it overlaps --direct deps"),
    ],
)
def test_refused_dirs_mount_nothing_and_change_nothing(root: Path, tmp_path: Path, dirs: list[str], says: str) -> None:
    (root / "afile").write_text("x")
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = tree(root)
    done = mount_cli(root, mnt, *[arg for d in dirs for arg in ("--direct", d)])
    assert done.returncode == 1, done
    assert says in done.stderr and "nothing was mounted" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert mountpoints_under(tmp_path) == []
    assert tree(root) == before
    assert os.listdir(tmp_path / "elsewhere") == []


# ---- served by the kernel -------------------------------------------------------------------


def test_direct_dirs_are_served_by_the_kernel_and_managed_files_still_by_the_daemon(root: Path, tmp_path: Path) -> None:
    os.chown(root, 4321, 4322)  # missing direct dirs are made owned as their parent
    os.chmod(root, 0o750)
    (root / "build").mkdir()
    os.chown(root / "build", 4323, 4324)
    m = Mount(root, tmp_path / "mnt", direct=["node_modules", "build/out"])
    with m:
        assert set(direct_dirs(str(m.path))) == {"node_modules", "build/out"}
        status = subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, check=True)
        assert json.loads(status.stdout)["mounts"] == {str(m.path): ["build/out", "node_modules"]}
        made = os.stat(root / "node_modules")
        assert (made.st_uid, made.st_gid, made.st_mode & 0o7777) == (4321, 4322, 0o750)
        made = os.stat(root / "build" / "out")
        assert (made.st_uid, made.st_gid) == (4323, 4324)
        r = m.run("alice", "mkdir -p node_modules/pkg && echo data > node_modules/pkg/index.js && echo o > build/out/x")
        assert r.returncode == 0, r.stderr
        assert (root / "node_modules/pkg/index.js").read_text() == "data\n"
        assert (root / "build/out/x").read_text() == "o\n"
        # the kernel answers from the backing file system: its device, not the FUSE mount's
        backing_dev = os.stat(root).st_dev
        assert os.stat(m.path / "node_modules/pkg/index.js").st_dev == backing_dev
        assert os.stat(m.path / "build/out/x").st_dev == backing_dev
        assert os.stat(m.path / "build").st_dev == os.stat(m.path).st_dev != backing_dev
        with open("/proc/self/mountinfo") as f:
            options = [line.split()[5] for line in f if unescape(line.split()[4]).startswith(str(m.path) + "/")]
        assert len(options) == 2 and all({"nosuid", "nodev"} <= set(o.split(",")) for o in options), options
        # the managed files outside still go through the daemon: a stale write is refused
        assert m.run("alice", "echo v1 > plans/p.md").returncode == 0
        assert m.run("bob", "cat plans/p.md").returncode == 0
        assert m.run("alice", "cat plans/p.md >/dev/null && echo v2 > plans/p.md").returncode == 0
        refused = m.run("bob", "echo clobber > plans/p.md")
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
        assert (root / "plans/p.md").read_text() == "v2\n"
        done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mountpoints_under(tmp_path) == []
    assert mountpoints_under(tmp_path) == []


def test_mount_names_its_direct_dirs(root: Path, tmp_path: Path) -> None:
    m = Mount(root, tmp_path / "mnt")
    m.path.mkdir()
    done = mount_cli(root, m.path, "--direct", "./deps/", "--agent", "alice")
    try:
        assert done.returncode == 0, done.stderr
        assert "deps: served directly by the kernel" in done.stdout
        assert list(direct_dirs(str(m.path))) == ["deps"]
    finally:
        m.unmount()
    assert mountpoints_under(tmp_path) == []


# ---- what it breaks -------------------------------------------------------------------------


@pytest.fixture
def with_deps(root: Path, tmp_path: Path) -> Iterator[Mount]:
    (root / "u").mkdir()
    with Mount(root, tmp_path / "mnt", direct=["deps"]) as m:
        yield m
    assert mountpoints_under(tmp_path) == []


def _errno(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as e:
        return e.errno or 0
    return 0


def test_what_a_direct_dir_breaks(with_deps: Mount) -> None:
    m = with_deps
    (m.path / "u" / "f").write_text("f")
    (m.path / "deps" / "g").write_text("g")
    (m.path / "deps" / "sub").mkdir()
    # the direct dir itself is a mountpoint: it cannot be renamed or removed
    assert _errno(os.rename, m.path / "deps", m.path / "deps2") == errno.EBUSY
    assert _errno(os.rename, m.path / "deps", m.path / "u" / "deps") == errno.EBUSY
    (m.path / "empty").mkdir()
    assert _errno(os.rename, m.path / "empty", m.path / "deps") == errno.EBUSY
    # across its boundary: another file system
    assert _errno(os.rename, m.path / "u" / "f", m.path / "deps" / "f") == errno.EXDEV
    assert _errno(os.rename, m.path / "deps" / "g", m.path / "u" / "g") == errno.EXDEV
    assert _errno(os.rename, m.path / "deps" / "sub", m.path / "u" / "sub") == errno.EXDEV
    assert _errno(os.rename, m.path / "deps" / "g", m.path / "plans" / "g.md") == errno.EXDEV
    assert _errno(os.link, m.path / "u" / "f", m.path / "deps" / "f") == errno.EXDEV
    assert _errno(os.link, m.path / "deps" / "g", m.path / "u" / "g") == errno.EXDEV
    # mv falls back to copy and delete
    moved = m.run("alice", "mv u/f deps/f && cat deps/f && test ! -e u/f")
    assert moved.returncode == 0 and moved.stdout == "f", moved.stderr
    # the usual `rm -rf node_modules`: the contents go, the directory stays and rm fails
    removed = m.run("alice", "rm -rf deps")
    assert removed.returncode != 0 and "Device or resource busy" in removed.stderr, removed
    assert os.listdir(m.path / "deps") == [] and os.listdir(m.root / "deps") == []
    assert m.run("alice", "rm -rf deps/* && rmdir deps").returncode != 0
    # another file system: another device, and `find -xdev`/`du -x` stop at it
    assert os.stat(m.path / "deps").st_dev != os.stat(m.path).st_dev
    (m.path / "deps" / "h").write_text("h")
    found = m.run("alice", "find . -xdev -name h")
    assert found.returncode == 0 and found.stdout == "", found
    # the rest of the mount is unchanged
    assert _errno(os.rename, m.path / "empty", m.path / "u" / "empty") == 0


def test_a_directory_holding_a_direct_dir_cannot_be_moved(root: Path, tmp_path: Path) -> None:
    """Its bind would move along, served past the daemon wherever it lands: into a managed glob's
    reach too, where stale writes would go through unchecked."""
    (root / "docs" / "deps").mkdir(parents=True)
    (root / "docs" / "other").mkdir()
    with Mount(root, tmp_path / "mnt", direct=["docs/deps"]) as m:
        (m.path / "docs" / "deps" / "f.md").write_text("served by the kernel\n")
        for where in (m.path / "plans" / "docs", m.path / "docs2"):
            assert _errno(os.rename, m.path / "docs", where) == errno.EBUSY
            assert not where.exists()
        assert _errno(os.rename, m.path / "docs" / "other", m.path / "plans" / "other") == 0
        assert os.path.ismount(m.path / "docs" / "deps")
        assert m.run("alice", "cat docs/deps/f.md").stdout == "served by the kernel\n"
        assert "refused renaming docs: it holds the direct dir docs/deps" in m.log.read_text()
    assert mountpoints_under(tmp_path) == []


def test_why_says_what_to_do_about_a_direct_dir_or_a_directory_holding_one_that_cannot_be_moved(
    root: Path, tmp_path: Path
) -> None:
    """A program sees only "Device or resource busy": `coherent-volume why` on the path (through the
    mount or in the root, text or JSON) says which direct dir of which mount is in the way, and what to
    do instead."""
    (root / "docs" / "deps").mkdir(parents=True)
    with Mount(root, tmp_path / "mnt", direct=["docs/deps"]) as m:
        expected = {
            "docs/deps": ["docs/deps is a direct dir of the mount at", "rm -rf docs/deps/*"],
            "docs": ["docs holds docs/deps, a direct dir of the mount at", "rename it in"],
        }
        for rel, says in expected.items():
            assert _errno(os.rename, m.path / rel, m.path / "moved") == errno.EBUSY
            for how in ([str(m.path / rel)], [str(root), rel], ["--json", str(m.path / rel)]):
                done = subprocess.run([CLI, "why", *how], capture_output=True, text=True, timeout=60, check=False)
                assert done.returncode == 0, done.stderr
                advice = json.loads(done.stdout)["advice"] if "--json" in how else done.stdout
                for text in [*says, f"the mount at {m.path} ", "EBUSY", f"coherent-volume unmount {m.path}"]:
                    assert text in advice, (how, advice)
        unrelated = subprocess.run([CLI, "why", str(m.path / "docs" / "deps" / "f")], capture_output=True, text=True)
        assert "this path is not managed" in unrelated.stdout, unrelated
        # a direct dir is the volume's directory, never a place for a volume of its own (/tmp/s26r3 F2:
        # taken for no volume's, `init` made one nested in the root there)
        (m.path / "docs" / "deps" / "sub").mkdir()
        nested = subprocess.run([CLI, "init", str(m.path / "docs/deps/sub"), "--managed", "x/**"], capture_output=True)
        assert nested.returncode != 0 and not (root / "docs/deps/sub/.coherent").exists(), nested
    assert mountpoints_under(tmp_path) == []


def test_a_direct_dir_answers_as_a_plain_directory(with_deps: Mount, tmp_path: Path) -> None:
    """tests/test_conformance.py's hand-written sequences, run in the direct dir and in a plain
    directory: every step answers the same (no FUSE rules apply: the kernel serves it), but opening
    a device node, which is EACCES as everywhere in the mount (nodev)."""
    plain = tmp_path / "plain"
    plain.mkdir()
    problems = []
    with Runner("alice") as runner:
        for name, case in CASES.items():
            steps: list[Step] = [s.step if isinstance(s, Expect) else s for s in case]
            (plain / name).mkdir()
            (with_deps.path / "deps" / name).mkdir()
            want = runner.run(plain / name, steps)
            got = runner.run(with_deps.path / "deps" / name, steps)
            for i, (step, a, b) in enumerate(zip([*steps, ["close"], ["tree"]], want, got, strict=True)):
                if a == b:
                    continue
                if name == "mknod" and step[:3] == ["open", "a", "n"] and b == "EACCES":
                    continue  # nodev, like the FUSE mount
                problems.append(f"{name} step {i} {step}: plain {a!r}, direct {b!r}")
    assert not problems, "\n".join(problems)


# ---- lifecycle ------------------------------------------------------------------------------


@contextlib.contextmanager
def holding_cwd(directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process with its working directory in `directory` (which keeps that mount busy)."""
    proc = subprocess.Popen(["sleep", "600"], cwd=directory)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_unmount_refuses_a_busy_direct_dir_and_leaves_the_mount_as_it_was(root: Path, tmp_path: Path) -> None:
    (root / "u").mkdir()
    with Mount(root, tmp_path / "mnt", direct=["a", "z"]) as m:
        complete = mountpoints_under(tmp_path)
        assert len(complete) == 3
        for busy in ("a", "z", "u"):
            with holding_cwd(m.path / busy):
                done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
                assert done.returncode == 1 and "busy" in done.stderr, done
                assert mountpoints_under(tmp_path) == complete
                assert set(direct_dirs(str(m.path))) == {"a", "z"}
                (m.path / "a" / busy).write_text(busy)  # and it still works
                assert (root / "a" / busy).read_text() == busy
        done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mountpoints_under(tmp_path) == []


def test_sigterm_unmounts_the_direct_dirs_then_the_volume(root: Path, tmp_path: Path) -> None:
    with Mount(root, tmp_path / "mnt", direct=["deps"]) as m, holding_cwd(m.path / "deps") as inside:
        pids = daemon_pids(m.path)
        assert len(pids) == 1
        os.kill(pids[0], signal.SIGTERM)
        wait_until_gone(pids)
        assert mountpoints_under(tmp_path) == []
        # a process inside keeps its directory: the backing one
        Path(f"/proc/{inside.pid}/cwd/kept").write_text("k")
        assert (root / "deps" / "kept").read_text() == "k"
    assert mountpoints_under(tmp_path) == []


def test_killed_daemon_the_direct_dirs_go_with_unmount_or_a_new_mount(root: Path, tmp_path: Path) -> None:
    with Mount(root, tmp_path / "mnt", direct=["deps"]) as m:
        with holding_cwd(m.path / "deps") as inside:
            m.kill_daemon()
            deadline = time.monotonic() + 10
            while dead_errno(m.path) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            # the volume is dead and so is every path through it, the direct dir included, once the
            # kernel's cached entries expire (UNMANAGED_TIMEOUT, 1 s) ...
            time.sleep(UNMANAGED_TIMEOUT + 0.5)
            assert dead_errno(m.path) in DEAD_ERRNOS
            assert _errno(os.stat, m.path / "deps") in DEAD_ERRNOS
            assert _errno(os.listdir, m.path / "deps") in DEAD_ERRNOS
            # ... but the bind stays until the volume goes, serving the processes already inside it
            assert len(mountpoints_under(tmp_path)) == 2
            Path(f"/proc/{inside.pid}/cwd/kept").write_text("k")
            assert (root / "deps" / "kept").read_text() == "k"
            # a plain unmount is refused (busy: the bind sits on it); the CLI detaches both
            assert subprocess.run(["fusermount3", "-u", str(m.path)], capture_output=True).returncode != 0
            done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            assert mountpoints_under(tmp_path) == []
        # mounting over a dead mount with binds: the new ones serve over the old, which `unmount` takes too
        m.mount()
        m.kill_daemon()
        deadline = time.monotonic() + 10
        while dead_errno(m.path) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        m.mount()
        assert len(mountpoints_under(tmp_path)) == 4 and list(direct_dirs(str(m.path))) == ["deps"]
        (m.path / "deps" / "again").write_text("a")
        assert (root / "deps" / "again").read_text() == "a"
        done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mountpoints_under(tmp_path) == []


@pytest.fixture
def shared_base(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """A tmpfs at tmp_path/shared, shared, and a process in a new mount namespace whose copy of it is
    a peer (what a host with shared propagation and a container or service namespace have)."""
    base = tmp_path / "shared"
    base.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "h4", str(base)], check=True)
    try:
        subprocess.run(["mount", "--make-shared", str(base)], check=True)
        peer = subprocess.Popen(["unshare", "--mount", "--propagation", "unchanged", "sleep", "600"])
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{peer.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt"):
                assert time.monotonic() < deadline, "unshare did not start"
                time.sleep(0.02)
            yield base, peer.pid
        finally:
            peer.kill()
            peer.wait()
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(base)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(base)], check=False)


def test_direct_dirs_follow_the_volume_into_a_peer_namespace_and_leave_with_it(
    shared_base: tuple[Path, int],
) -> None:
    base, peer = shared_base
    root = base / "vol"
    root.mkdir()
    subprocess.run([CLI, "init", str(root), "--managed", "plans/**"], check=True, capture_output=True)
    theirs = f"/proc/{peer}/mountinfo"
    with Mount(root, base / "mnt", direct=["deps"]) as m:
        ours = [str(m.path), str(m.path / "deps")]
        assert mountpoints_under(base) == [str(base), *ours]
        assert mountpoints_in(base, theirs) == [str(base), *ours]  # propagated with the volume
        # each bind is a clone of its own, not a peer of the backing's mount: a mount made under the
        # backing directory does not show through it
        (root / "deps" / "sub").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "inner", str(root / "deps" / "sub")], check=True)
        try:
            assert str(m.path / "deps" / "sub") not in mountpoints_under(base)
        finally:
            subprocess.run(["umount", str(root / "deps" / "sub")], check=True)
        # a process working in the peer's copy of the bind keeps it busy here too: refused, nothing changes
        inside = ["nsenter", "-t", str(peer), "-m", "--", "sh", "-c", f"cd {m.path / 'deps'} && exec sleep 600"]
        busy = subprocess.Popen(inside)
        try:
            deadline = time.monotonic() + 10
            while not os.path.realpath(f"/proc/{busy.pid}/cwd").endswith("/deps"):
                assert time.monotonic() < deadline and busy.poll() is None, "nsenter did not start"
                time.sleep(0.02)
            done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
            assert done.returncode == 1 and "busy" in done.stderr, done
            assert mountpoints_under(base) == [str(base), *ours]
            assert mountpoints_in(base, theirs) == [str(base), *ours]
        finally:
            busy.kill()
            busy.wait()
        done = subprocess.run([CLI, "unmount", str(m.path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert mountpoints_under(base) == [str(base)]
        assert mountpoints_in(base, theirs) == [str(base)]
