"""Directories the kernel holds are reached through descriptors the daemon keeps (`fusefs.backing`
anchors): what a program sees when directories move, through the mount or behind its back, and
when descriptors run short."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from coherent_volume.paths import REGISTRY_DIR

from .harness.mounts import CLI, Mount, daemon_pids

ATTR_EXPIRY = 1.5
"""Seconds after which the kernel's cached attributes of an unmanaged directory (1 s) have expired."""


def run(m: Mount, code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=m.path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def descriptors(m: Mount) -> int:
    (pid,) = daemon_pids(m.path)
    return len(os.listdir(f"/proc/{pid}/fd"))


def anchored(m: Mount) -> int:
    """How many descriptors of the daemon hold a directory of the volume (its anchors), leaving out
    the others it opens as it works (a registry connection per worker thread, handles, pipes)."""
    (pid,) = daemon_pids(m.path)
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target, st = os.readlink(f"/proc/{pid}/fd/{fd}"), os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        count += stat.S_ISDIR(st.st_mode) and target.startswith(str(m.root)) and REGISTRY_DIR not in target
    return count


def test_a_directory_renamed_through_the_mount_takes_its_working_directories_along(mounted: Mount) -> None:
    out = run(
        mounted,
        """
import os
import stat
os.makedirs("a/b/c")
os.chdir("a/b/c")
open("before", "w").write("1")
os.rename("../../../a", "../../../z")
open("after", "w").write("2")
print(sorted(os.listdir(".")), os.getcwd().endswith("/z/b/c"), open("../../../z/b/c/before").read())
""",
    )
    assert out.split() == ["['after',", "'before']", "True", "1"]
    assert sorted(p.name for p in (mounted.root / "z/b/c").iterdir()) == ["after", "before"]
    assert not (mounted.root / "a").exists()


def test_a_directory_moved_out_of_the_volume_behind_the_mount_is_not_followed(mounted: Mount, tmp_path: Path) -> None:
    """A foreign process moves a backing directory, with a program's working directory in it, out of
    the volume root: once the kernel asks for that directory again, nothing reaches it any more."""
    outside = tmp_path / "outside"
    outside.mkdir()
    out = run(
        mounted,
        f"""
import os, time
os.makedirs("a/b")
os.chdir("a/b")
open("x", "w").write("1")
os.rename({str(mounted.root / "a")!r}, {str(outside / "a")!r})
time.sleep({ATTR_EXPIRY})
for call in (lambda: open("y", "w"), lambda: os.mkdir("d"), lambda: os.unlink("x"), lambda: os.chmod("x", 0o600)):
    try:
        call()
        print("done")
    except OSError as e:
        print(e.errno)
""",
    )
    assert "done" not in out.split()
    assert sorted(p.name for p in (outside / "a/b").iterdir()) == ["x"]
    assert oct((outside / "a/b/x").stat().st_mode & 0o777) == "0o644"


def test_a_directory_replaced_behind_the_mount_is_served_by_its_name(mounted: Mount) -> None:
    """A foreign process renames a backing directory and puts another one at its name: the mount
    shows, and writes into, the one at the name, as it does for files."""
    out = run(
        mounted,
        f"""
import os, time
os.makedirs("d/e")
open("d/e/old", "w").write("1")
os.rename({str(mounted.root / "d")!r}, {str(mounted.root / "moved")!r})
os.makedirs({str(mounted.root / "d/e")!r})
time.sleep({ATTR_EXPIRY})
open("d/e/new", "w").write("2")
print(sorted(os.listdir("d/e")))
""",
    )
    assert out.strip() == "['new']"
    assert sorted(p.name for p in (mounted.root / "d/e").iterdir()) == ["new"]
    assert sorted(p.name for p in (mounted.root / "moved/e").iterdir()) == ["old"]


def test_directories_the_kernel_forgets_give_their_descriptors_back(mounted: Mount) -> None:
    before = descriptors(mounted)
    run(mounted, "import os\nfor i in range(300): os.makedirs(f't/{i}/x')\n")
    held = descriptors(mounted)
    assert held >= before + 300, "the directories the kernel holds are anchored"
    Path("/proc/sys/vm/drop_caches").write_text("2\n")  # the kernel forgets the inodes it can
    deadline = time.monotonic() + 30
    while descriptors(mounted) > before + 50 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert descriptors(mounted) <= before + 50


def test_work_beyond_the_descriptor_budget_goes_on(root: Path, tmp_path: Path) -> None:
    """A daemon allowed few descriptors anchors what its budget allows (half of them) and resolves
    the other directories by name: every call still works."""
    m = Mount(root, tmp_path / "mnt")
    m.path.mkdir()
    mount = [CLI, "mount", str(root), str(m.path)]
    subprocess.run(["prlimit", "--nofile=256:256", "--", *mount], check=True, capture_output=True, timeout=60)
    try:
        base = anchored(m)  # the volume's root, held from the start
        out = run(
            m,
            """
import os
import stat
for i in range(400):
    os.makedirs(f"t/{i}/x")
    open(f"t/{i}/x/f", "w").write(str(i))
print(sum(open(f"t/{i}/x/f").read() == str(i) for i in range(400)))
for i in range(400):
    os.rename(f"t/{i}/x", f"t/{i}/y")
    os.unlink(f"t/{i}/y/f")
print(sum(os.listdir(f"t/{i}") == ["y"] for i in range(400)))
""",
        )
        assert out.split() == ["400", "400"]
        # A descriptor of a directory handle lives until the kernel's release reaches the daemon,
        # which close() does not wait for: wait (bounded) for those to go.
        deadline = time.monotonic() + 10
        while anchored(m) > base + 256 // 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert anchored(m) <= base + 256 // 2, "anchors stay within half the daemon's descriptors"
    finally:
        m.unmount()
