"""A volume on a network file system is refused at open; local disks, tmpfs and bind mounts are not.

The network file system is a real FUSE mount of type `fuse.sshfs` (the floor passthrough mounted
with `subtype=sshfs`: what the kernel reports is what the check reads), unmounted in every outcome.
tmpfs and bind mounts are made in a private mount namespace that vanishes with the test's shell.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume, filesystems, mounts
from coherent_volume.errors import VolumeConfigError
from coherent_volume.filesystems import is_network, mount_of
from tests.harness import CLI
from tests.harness.bench_fuse import mount_bindfs, mount_floor

MOUNTINFO = r"""22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
40 22 0:40 / /mnt/my\040share rw,relatime shared:30 - nfs4 files:/export\040dir rw,vers=4.2
41 22 0:41 / /mnt/ab rw - tmpfs none rw
42 40 0:42 / /mnt/my\040share/local rw master:7 - tmpfs none rw
43 22 254:0 /srv/data /bind rw - ext4 /dev/vda rw
44 22 0:44 / /over rw - tmpfs none rw
45 44 0:45 / /over/deep rw - fuse.sshfs me@h:/x rw
46 22 0:46 / /over rw - ext4 /dev/vdb rw
"""


def test_mountinfo_fields_are_unescaped_and_optional_fields_skipped() -> None:
    table = mounts.parse(MOUNTINFO.splitlines())
    assert table[2] == mounts.Entry("40", "22", "0:40", "", "/mnt/my share", "nfs4", "files:/export dir", "rw,vers=4.2")
    assert table[5] == mounts.Entry(
        "43", "22", "254:0", "srv/data", "/bind", "ext4", "/dev/vda", "rw"
    )  # a bind of /srv/data


def test_the_longest_mount_point_above_a_path_holds_it() -> None:
    table = mounts.parse(MOUNTINFO.splitlines())
    assert mount_of("/mnt/my share/vol", table, "0:40").fstype == "nfs4"
    assert mount_of("/mnt/my share/local/vol", table, "0:42").fstype == "tmpfs"
    assert mount_of("/mnt/abc/vol", table, "254:0").fstype == "ext4"  # /mnt/ab is not above /mnt/abc
    assert mount_of("/bind/vol", table, "254:0").mountpoint == "/bind"


def test_an_overmount_hides_the_mounts_under_it() -> None:
    table = mounts.parse(MOUNTINFO.splitlines())
    # /over/deep (sshfs) lies under the first /over; the second /over covers both: its device wins
    assert mount_of("/over/deep/vol", table, "0:46").fstype == "ext4"
    # when no device matches (btrfs subvolumes report their own), the last mounted of the longest
    assert mount_of("/over/x", table, "0:99").source == "/dev/vdb"


def test_a_volume_opened_within_one_table_reads_no_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook's event judges its paths against one reading of the mount table (`mounts.one_table`);
    opening the volume there (its network check) read and parsed /proc/self/mountinfo again, about
    7% of a hook's time on a host with 8,000 mounts."""
    reads: list[str] = []
    real = builtins.open

    def counted(file: Any, *args: Any, **kwargs: Any) -> Any:
        if file == "/proc/self/mountinfo":
            reads.append(file)
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counted)
    with mounts.one_table():
        filesystems.refuse_network_root(str(tmp_path))
        assert filesystems.lies_within(str(tmp_path / "a"), str(tmp_path))
        CoherentVolume(tmp_path, managed=["plans/**"], agent="a").close()
    assert len(reads) == 1


@pytest.mark.parametrize(
    "fstype",
    ["nfs", "nfs4", "cifs", "smb3", "ceph", "9p", "glusterfs", "fuse.sshfs", "fuse.mfs", "fuse.mountpoint-s3", "davfs"],
)
def test_network_types(fstype: str) -> None:
    assert is_network(fstype)


@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs", "tmpfs", "overlay", "fuse.coherent", "fuse", "fuseblk"])
def test_local_types(fstype: str) -> None:
    assert not is_network(fstype)


SSHFS_LOOKALIKE = """
import os, sys, pyfuse3, trio
from tests.harness.floorfs import Floor
src, mountpoint = sys.argv[1:3]
pyfuse3.init(Floor(os.path.realpath(src)), mountpoint,
             set(pyfuse3.default_options) | {"fsname=files.example:/export", "subtype=sshfs"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close()
"""


@pytest.fixture
def sshfs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(backing directory, mountpoint of a `fuse.sshfs` passthrough of it)."""
    src, mnt = tmp_path / "export", tmp_path / "ssh"
    with contextlib.ExitStack() as stack:
        mount_floor(src, mnt, stack, [sys.executable, "-c", SSHFS_LOOKALIKE, str(src), str(mnt)])
        yield src, mnt


def _init(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "init", str(root), "--managed", "plans/**"], capture_output=True, text=True)


def test_init_on_a_network_file_system_is_refused_and_changes_nothing(sshfs: tuple[Path, Path]) -> None:
    src, mnt = sshfs
    (src / "vol").mkdir()
    done = _init(mnt / "vol")
    assert done.returncode != 0
    assert "network file system (fuse.sshfs 'files.example:/export'" in done.stderr
    assert "local disk" in done.stderr and "PostgreSQL" in done.stderr
    assert os.listdir(src / "vol") == []


def test_a_volume_reached_through_a_network_file_system_is_refused(sshfs: tuple[Path, Path]) -> None:
    src, mnt = sshfs
    (src / "vol").mkdir()
    CoherentVolume(src / "vol", managed=["plans/**"]).close()  # made on the local disk beneath
    with pytest.raises(VolumeConfigError, match="network file system"):
        CoherentVolume(mnt / "vol")
    CoherentVolume(src / "vol").close()  # the same files on the local path: allowed


def test_a_file_system_that_cannot_rename_without_replacing_is_refused_at_open(tmp_path: Path) -> None:
    """bindfs answers renameat2 RENAME_NOREPLACE with EINVAL: on such a root every commit failed
    after it was recorded (InstallPending) and left temp names behind (found by a hostile tester).
    `init` and every open refuse it, saying why, and leave nothing there."""
    with contextlib.ExitStack() as stack:
        mount_bindfs(tmp_path / "src", tmp_path / "mnt", stack)
        done = _init(tmp_path / "mnt" / "vol")
        assert done.returncode != 0 and "RENAME_NOREPLACE" in done.stderr and "ext4" in done.stderr, done.stderr
        assert os.listdir(tmp_path / "src") == []
        (tmp_path / "src" / "vol").mkdir()
        CoherentVolume(tmp_path / "src" / "vol", managed=["plans/**"]).close()  # made on the disk beneath
        with pytest.raises(VolumeConfigError, match="cannot rename a file without replacing"):
            CoherentVolume(tmp_path / "mnt" / "vol")
        assert [n for n in os.listdir(tmp_path / "src" / "vol" / ".coherent") if ".cv-" in n] == []


def test_a_local_disk_is_allowed(tmp_path: Path) -> None:
    assert _init(tmp_path).returncode == 0


@pytest.mark.parametrize(
    "setup",
    [
        pytest.param("mount -t tmpfs none $ROOT", id="tmpfs"),
        pytest.param("mkdir $BASE/local && mount --bind $BASE/local $ROOT", id="bind-mount-of-a-local-dir"),
    ],
)
def test_tmpfs_and_bind_mounts_are_allowed(tmp_path: Path, setup: str) -> None:
    (tmp_path / "root").mkdir()
    script = f'{setup} && findmnt -no FSTYPE "$ROOT" && "{CLI}" init "$ROOT" --managed "plans/**"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**os.environ, "BASE": str(tmp_path), "ROOT": str(tmp_path / "root")},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] in ("tmpfs", "ext4", "xfs", "btrfs")
    assert f"volume {tmp_path / 'root'} manages: plans/**" in done.stdout


def test_a_bind_mount_of_a_network_file_system_is_refused(tmp_path: Path, sshfs: tuple[Path, Path]) -> None:
    src, mnt = sshfs
    (src / "vol").mkdir()
    (tmp_path / "root").mkdir()
    script = f'mount --bind "{mnt / "vol"}" "$ROOT" && exec "{CLI}" init "$ROOT" --managed "plans/**"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env={**os.environ, "ROOT": str(tmp_path / "root")},
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "network file system (fuse.sshfs" in done.stderr
    assert os.listdir(src / "vol") == []
