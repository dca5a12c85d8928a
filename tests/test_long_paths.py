"""Managed paths whose backing path reaches PATH_MAX work through the Python API as any other: a plain
directory holds them (only one system call's argument is limited), and the core reaches them beneath
a descriptor of their directory (`paths.Target`), leaving no descriptor open behind it."""

from __future__ import annotations

import gc
import os
from pathlib import Path

from coherent_volume import CoherentVolume


def _deep_directory(root: Path, under: str) -> str:
    """Directories of 255-byte names below `under`, made a step at a time; their root-relative path."""
    rel, fd = under, os.open(root / under, os.O_PATH | os.O_DIRECTORY)
    try:
        for i in range(15):
            name = f"{i:03d}" + "d" * 252
            os.mkdir(name, dir_fd=fd)
            deeper = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd, rel = deeper, f"{rel}/{name}"
    finally:
        os.close(fd)
    return rel


def test_a_managed_file_whose_backing_path_reaches_path_max_keeps_every_version(root: Path) -> None:
    deep = _deep_directory(root, "plans")
    path = f"{deep}/" + "f" * (4090 - len(deep) - 1)
    assert len(path.encode()) == 4090 and len(f"{root}/{path}".encode()) >= 4096
    gc.collect()  # descriptors of earlier tests' garbage in this worker close now, not mid-test
    before = set(os.listdir("/proc/self/fd"))
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(path, "one\n")
        alice.update(path, lambda data: data + b"two\n")
        assert alice.read(path) == b"one\ntwo\n"
        assert [v.version for v in alice.history(path)] == [2, 1]
        assert alice.read_version(path, 1) == b"one\n"
        alice.restore(path, 1)
        assert alice.read(path) == b"one\n"
        with CoherentVolume(root, agent="bob") as bob:
            bob.read(path)
            bob.write(path, "bob's\n")
        assert alice.stale() == [path]
        assert alice.read(path) == b"bob's\n"
        alice.delete(path)
    assert set(os.listdir("/proc/self/fd")) <= before, "a descriptor was left open"
