"""Differential POSIX conformance: the same system-call sequences on a plain directory and through
the mount, in its unmanaged area (`u/`) and in a managed glob (`plans/**`), as one agent.

Every step's outcome through the mount must equal the plain directory's with the documented
differences applied (`tests/harness/conformance.py`: rules `fuse` everywhere, `managed` in
`plans/`, each one a bullet of docs/mount.md). Steps marked `Expect` must also answer what the
mark says, so that a case cannot pass by both sides doing the same wrong thing.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coherent_volume import CoherentVolume

from .harness.conformance import NOT_COMPARED, RULES, Runner, Step
from .harness.mounts import Mount

AREAS = ("u", "plans")
"""The unmanaged area and the managed one (`plans/**`)."""


@dataclass
class Expect:
    """A step and, per area, what the mount must answer: an outcome, or a dict of stat fields it must
    have (None: only that it equals the plain run)."""

    step: Step
    u: Any = None
    plans: Any = None


E = Expect


def _matches(got: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(got.get(k) == v for k, v in want.items())
    return bool(got == want)


class Site:
    """One mount (volume managing plans/**) and one plain directory laid out alike, and the
    interpreter process that runs sequences as agent alice."""

    def __init__(self, plain: Path, mount: Mount, runner: Runner) -> None:
        self.plain, self.mount, self.runner = plain, mount, runner
        self._fresh = itertools.count()

    def compare(self, area: str, case: list[Step | Expect]) -> None:
        """Run `case` in a fresh directory of `area` on both sides; fail on any difference from the
        plain run with the documented rules, or any `Expect` not met."""
        steps = [s.step if isinstance(s, Expect) else s for s in case]
        name = f"c{next(self._fresh)}"
        (self.plain / area / name).mkdir()
        (self.mount.path / area / name).mkdir()
        rules = RULES if area == "plans" else RULES - {"managed"}
        expected = self.runner.run(self.plain / area / name, steps, rules)
        got = self.runner.run(self.mount.path / area / name, steps)
        labels = [*steps, ["close what is open"], ["tree"]]
        problems = [
            f"step {i} {_short(label)}:\n    expected {_short(want)}\n    mount    {_short(have)}"
            for i, (label, want, have) in enumerate(zip(labels, expected, got, strict=True))
            if want != have and not (isinstance(want, str) and want.startswith(NOT_COMPARED))
        ]
        for i, step in enumerate(case):
            want = getattr(step, area, None) if isinstance(step, Expect) else None
            if want is not None and not _matches(got[i], want):
                problems.append(f"step {i} {_short(steps[i])}: must answer {want!r}, answered {_short(got[i])}")
        assert not problems, f"{area}: " + "\n".join(problems)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 600 else text[:300] + " ... " + text[-300:]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    base = tmp_path_factory.mktemp("conformance")
    root, plain = base / "vol", base / "plain"
    root.mkdir()
    CoherentVolume(root, managed=("plans/**",), agent="setup").close()
    for area in AREAS:
        (root / area).mkdir()
        (plain / area).mkdir(parents=True)
    with Mount(root, base / "mnt") as mount, Runner("alice") as runner:
        yield Site(plain, mount, runner)


def new(path: str, data: str, mode: int = 0o644) -> list[Step]:
    return [["open", "new", path, "O_WRONLY|O_CREAT|O_TRUNC", mode], ["write", "new", data], ["close", "new"]]


W = "O_WRONLY|O_CREAT|O_TRUNC"

CASES: dict[str, list[Step | Expect]] = {
    "chmod": [
        *new("f", "x"),
        ["chmod", "f", 0o600],
        E(["stat", "f"], u={"mode": "0o600"}, plans={"mode": "0o600"}),
        ["chmod", "f", 0o4755],
        E(["stat", "f"], u={"mode": "0o4755"}, plans={"mode": "0o4755"}),
        ["open", "a", "f", "O_RDONLY"],
        ["fchmod", "a", 0o640],
        E(["fstat", "a"], u={"mode": "0o640"}, plans={"mode": "0o640"}),
        ["close", "a"],
        E(["chmod", "missing", 0o600], u="ENOENT", plans="ENOENT"),
        ["mkdir", "d", 0o755],
        ["chmod", "d", 0o700],
        ["stat", "d"],
        E(["chmod", "f/x", 0o600], u="ENOTDIR", plans="ENOTDIR"),
    ],
    "chown": [
        *new("f", ""),
        ["chown", "f", 1234, 5678],
        E(["stat", "f"], u={"uid": 1234, "gid": 5678}, plans={"uid": 1234, "gid": 5678}),
        ["chown", "f", -1, 42],
        ["stat", "f"],
        ["chmod", "f", 0o6755],
        ["chown", "f", 7, -1],
        ["stat", "f"],
        ["open", "a", "f", "O_RDWR"],
        ["fchown", "a", 0, 0],
        ["fstat", "a"],
        ["write", "a", "after chown"],
        ["close", "a"],
        ["stat", "f"],
        ["mkdir", "d", 0o755],
        ["chown", "d", 99, 99],
        ["stat", "d"],
        ["symlink", "f", "s"],
        ["chown", "s", 5, 5, False],
        ["lstat", "s"],
        ["chown", "missing", 1, 1],
    ],
    "link": [
        *new("f", "one"),
        E(["link", "f", "g"], u="ok", plans="EPERM"),
        E(["stat", "f"], u={"nlink": 2, "same": ["f", "g"]}, plans={"nlink": 1, "same": ["f"]}),
        E(["stat", "g"], u={"nlink": 2, "same": ["f", "g"]}, plans="ENOENT"),
        ["link", "f", "g"],
        ["link", "missing", "h"],
        ["open", "a", "g", "O_WRONLY|O_APPEND"],
        ["write", "a", "two"],
        ["close", "a"],
        E(["read_file", "f"], u="onetwo", plans="one"),
        ["rename", "g", "f"],
        E(["stat", "g"], u={"nlink": 2}),
        ["unlink", "f"],
        E(["stat", "g"], u={"nlink": 1, "same": ["g"]}),
        ["mkdir", "d", 0o755],
        E(["link", "d", "e"], u="EPERM", plans="EPERM"),
        ["open", "a", "h", "O_RDWR|O_CREAT", 0o644],
        ["link", "h", "d/h"],
        ["unlink", "h"],
        E(["fstat", "a"], u={"nlink": 1, "same": ["d/h"]}),
        ["write", "a", "through the first name"],
        ["close", "a"],
        ["read_file", "d/h"],
    ],
    "mkdir": [
        ["mkdir", "d", 0o755],
        E(["stat", "d"], u={"type": "dir", "mode": "0o755", "nlink": 2}, plans={"type": "dir", "mode": "0o755"}),
        E(["mkdir", "d", 0o755], u="EEXIST", plans="EEXIST"),
        ["mkdir", "d/e/f", 0o755],
        ["mkdir", "d/e", 0o2700],
        ["stat", "d/e"],
        E(["stat", "d"], u={"nlink": 3}, plans={"nlink": 3}),
        *new("x", ""),
        ["mkdir", "x/y", 0o755],
        ["listdir", "d"],
        ["mkdir", "d/e/", 0o777],
        ["stat", "d/e/"],
    ],
    "mkfifo": [
        ["mkfifo", "p", 0o640],
        E(["lstat", "p"], u={"type": "fifo"}, plans={"type": "fifo"}),
        ["mkfifo", "p", 0o640],
        ["open", "a", "p", "O_RDWR"],
        E(["write", "a", "hi"], u=2, plans=2),
        E(["read", "a", 10], u="hi", plans="hi"),
        ["fstat", "a"],
        ["close", "a"],
        ["rename", "p", "q"],
        ["open", "a", "q", "O_WRONLY|O_NONBLOCK"],
        ["unlink", "q"],
        ["listdir", "."],
    ],
    "mknod": [
        ["mknod", "r", "S_IFREG", 0o600, 0],
        E(["stat", "r"], u={"type": "reg", "mode": "0o600"}, plans={"type": "reg", "mode": "0o600"}),
        ["mknod", "p", "S_IFIFO", 0o644, 0],
        ["stat", "p"],
        ["mknod", "n", "S_IFCHR", 0o666, 259],
        E(["stat", "n"], u={"type": "chr"}, plans={"type": "chr"}),
        ["mknod", "r", "S_IFREG", 0o600, 0],
        E(["open", "a", "n", "O_RDWR"], u="EACCES", plans="EACCES"),
        ["open", "a", "r", "O_WRONLY"],
        ["write", "a", "x"],
        ["close", "a"],
        ["read_file", "r"],
    ],
    "open": [
        ["open", "a", "f", "O_RDWR|O_CREAT|O_EXCL", 0o640],
        ["write", "a", "hello"],
        E(["fstat", "a"], u={"size": 5, "mode": "0o640"}, plans={"size": 5, "mode": "0o640"}),
        ["lseek", "a", 0, "SET"],
        E(["read", "a", 3], u="hel", plans="hel"),
        ["lseek", "a", 0, "CUR"],
        ["close", "a"],
        E(["open", "a", "f", "O_RDWR|O_CREAT|O_EXCL", 0o640], u="EEXIST", plans="EEXIST"),
        ["open", "a", "missing", "O_RDONLY"],
        ["open", "a", "f", "O_WRONLY|O_APPEND"],
        ["write", "a", " world"],
        ["lseek", "a", 0, "CUR"],
        ["close", "a"],
        ["open", "a", "f", "O_RDONLY"],
        E(["read", "a", 100], u="hello world", plans="hello world"),
        ["write", "a", "x"],
        ["close", "a"],
        ["open", "a", "f", "O_WRONLY|O_TRUNC"],
        E(["fstat", "a"], u={"size": 0}, plans={"size": 0}),
        ["close", "a"],
        E(["stat", "f"], u={"size": 0}, plans={"size": 0}),
        ["open", "a", "f", "O_RDONLY|O_DIRECTORY"],
        ["mkdir", "d", 0o755],
        ["open", "a", "d", "O_WRONLY"],
        ["open", "a", "d", "O_RDONLY|O_DIRECTORY"],
        ["close", "a"],
        ["open", "a", "f/x", "O_RDONLY"],
        ["open", "a", "n", "O_WRONLY|O_CREAT", 0o4755],
        E(["stat", "n"], u={"mode": "0o4755"}, plans={"mode": "0o4755"}),
        ["dup", "b", "a"],
        ["write", "b", "via dup"],
        ["close", "a"],
        ["write", "b", "!"],
        ["close", "b"],
        E(["read_file", "n"], u="via dup!", plans="via dup!"),
        ["stat", "n"],
    ],
    "rename": [
        *new("f", "f"),
        *new("g", "gg", 0o600),
        ["rename", "f", "h"],
        ["stat", "h"],
        ["stat", "f"],
        E(["rename", "h", "g", "NOREPLACE"], u="EEXIST", plans="EEXIST"),
        E(["rename", "h", "g", "EXCHANGE"], u="ok", plans="ok"),
        E(["read_file", "h"], u="gg", plans="gg"),
        E(["read_file", "g"], u="f", plans="f"),
        E(["stat", "g"], u={"mode": "0o644"}, plans={"mode": "0o644"}),
        E(["rename", "h", "new", "EXCHANGE"], u="ENOENT", plans="ENOENT"),
        ["rename", "h", "new", "NOREPLACE"],
        ["listdir", "."],
        ["mkdir", "d", 0o755],
        E(["rename", "g", "d"], u="EISDIR", plans="EISDIR"),
        E(["rename", "d", "g"], u="ENOTDIR", plans="ENOTDIR"),
        ["rename", "g", "d/g"],
        ["mkdir", "e", 0o700],
        ["rename", "d", "e"],
        ["listdir", "e"],
        E(["rename", "e", "e/sub"], u="EINVAL", plans="EINVAL"),
        ["rename", "e/d/g", "e/d/g"],
        ["rename", "missing", "x"],
        ["rename", "new", "e/d"],
        ["mkdir", "e2", 0o755],
        *new("e2/z", ""),
        E(["rename", "e", "e2"], u="ENOTEMPTY", plans="ENOTEMPTY"),
        *new("n", "file"),
        E(["rename", "e", "n", "EXCHANGE"], u="ok", plans="ok"),
        E(["stat", "e"], u={"type": "reg"}, plans={"type": "reg"}),
        E(["stat", "n"], u={"type": "dir"}, plans={"type": "dir"}),
        E(["read_file", "e"], u="file", plans="file"),
        ["rename", "n", "e2", "EXCHANGE"],
        ["listdir", "n"],
    ],
    "rmdir": [
        ["mkdir", "d", 0o755],
        ["mkdir", "d/e", 0o755],
        E(["rmdir", "d"], u="ENOTEMPTY", plans="ENOTEMPTY"),
        ["rmdir", "d/e"],
        ["rmdir", "d"],
        E(["rmdir", "d"], u="ENOENT", plans="ENOENT"),
        *new("f", ""),
        E(["rmdir", "f"], u="ENOTDIR", plans="ENOTDIR"),
        ["listdir", "."],
    ],
    "symlink": [
        E(["symlink", "target", "s"], u="ok", plans="EPERM"),
        E(["lstat", "s"], u={"type": "lnk"}, plans="ENOENT"),
        ["readlink", "s"],
        ["stat", "s"],
        *new("target", "t"),
        E(["stat", "s"], u={"type": "reg", "same": ["target"]}),
        ["read_file", "s"],
        ["symlink", "x", "s"],
        E(["readlink", "target"], u="EINVAL", plans="EINVAL"),
        ["unlink", "s"],
        ["lstat", "s"],
        ["symlink", "d", "sd"],
        ["mkdir", "d", 0o755],
        ["open", "a", "sd/in", W, 0o644],
        ["close", "a"],
        ["listdir", "d"],
    ],
    "truncate": [
        *new("f", "0123456789"),
        ["truncate", "f", 4],
        E(["read_file", "f"], u="0123", plans="0123"),
        ["truncate", "f", 8],
        E(["read_file", "f"], u="0123\0\0\0\0", plans="0123\0\0\0\0"),
        ["stat", "f"],
        ["truncate", "f", 0],
        ["stat", "f"],
        ["truncate", "missing", 1],
        E(["truncate", "f", -1], u="EINVAL", plans="EINVAL"),
        ["mkdir", "d", 0o755],
        E(["truncate", "d", 0], u="EISDIR", plans="EISDIR"),
    ],
    "ftruncate": [
        ["open", "a", "f", "O_RDWR|O_CREAT", 0o644],
        ["write", "a", "0123456789"],
        ["ftruncate", "a", 3],
        E(["fstat", "a"], u={"size": 3}, plans={"size": 3}),
        ["pread", "a", 20, 0],
        ["ftruncate", "a", 6],
        E(["pread", "a", 20, 0], u="012\0\0\0", plans="012\0\0\0"),
        ["lseek", "a", 0, "CUR"],
        ["write", "a", "w"],
        ["close", "a"],
        E(["read_file", "f"], u="012\0\0\0\0\0\0\0w", plans="012\0\0\0\0\0\0\0w"),
        ["open", "a", "f", "O_RDONLY"],
        E(["ftruncate", "a", 0], u="EINVAL", plans="EINVAL"),
        ["close", "a"],
        ["open", "a", "f", "O_WRONLY|O_APPEND"],
        ["ftruncate", "a", 2],
        ["write", "a", "z"],
        ["close", "a"],
        E(["read_file", "f"], u="01z", plans="01z"),
    ],
    "unlink": [
        *new("f", "x"),
        ["unlink", "f"],
        E(["unlink", "f"], u="ENOENT", plans="ENOENT"),
        ["stat", "f"],
        ["mkdir", "d", 0o755],
        E(["unlink", "d"], u="EISDIR", plans="EISDIR"),
        ["unlink", "d/missing"],
        *new("g", ""),
        E(["unlink", "g/"], u="ENOTDIR", plans="ENOTDIR"),
        ["open", "a", "h", "O_RDWR|O_CREAT", 0o644],
        ["write", "a", "gone"],
        ["unlink", "h"],
        ["write", "a", " with it"],
        ["close", "a"],
        ["listdir", "."],
    ],
    "utimensat": [
        *new("f", ""),
        E(
            ["utimensat", "f", 1_000_000_000_123_456_789, 1_500_000_000_000_000_001],
            u=[1_000_000_000_123_456_789, 1_500_000_000_000_000_001],
            plans=[1_000_000_000_123_456_789, 1_500_000_000_000_000_001],
        ),
        ["utimensat", "f", 0, 2**33 * 10**9],
        ["symlink", "f", "s"],
        ["utimensat", "s", 5 * 10**9, 7 * 10**9, False],
        ["utimensat", "missing", 0, 0],
        ["mkdir", "d", 0o755],
        ["utimensat", "d", 10**9, 3 * 10**9],
        ["open", "a", "f", "O_RDWR"],
        ["write", "a", "later"],
        ["close", "a"],
        ["utimensat", "f", 4 * 10**9, 6 * 10**9],
    ],
    "fstat": [
        ["open", "a", "f", "O_RDWR|O_CREAT", 0o640],
        ["write", "a", "abc"],
        E(["fstat", "a"], u={"size": 3, "nlink": 1}, plans={"size": 3, "nlink": 1}),
        ["unlink", "f"],
        E(["fstat", "a"], u={"size": 3, "nlink": 0, "mode": "0o640"}, plans={"size": 3, "nlink": 0, "mode": "0o640"}),
        ["write", "a", "def"],
        E(["fstat", "a"], u={"size": 6, "nlink": 0}, plans={"size": 6, "nlink": 0}),
        E(["pread", "a", 10, 0], u="abcdef", plans="abcdef"),
        ["fchmod", "a", 0o600],
        ["ftruncate", "a", 1],
        E(["fstat", "a"], u={"size": 1, "mode": "0o600"}, plans={"size": 1, "mode": "0o600"}),
        ["close", "a"],
        ["listdir", "."],
        ["open", "b", "g", "O_RDWR|O_CREAT", 0o644],
        ["write", "b", "123"],
        ["close", "b"],
        ["open", "b", "g", "O_RDONLY"],
        ["unlink", "g"],
        E(["fstat", "b"], u={"nlink": 0, "size": 3}, plans={"nlink": 0, "size": 3}),
        E(["read", "b", 10], u="123", plans="123"),
        ["close", "b"],
    ],
    "mmap": [
        *new("f", "0123456789"),
        ["open", "a", "f", "O_RDWR"],
        E(["mmap", "a", "private", "rw", 10, 0, "PRIV"], u="0123456789", plans="0123456789"),
        E(["pread", "a", 10, 0], u="0123456789", plans="0123456789"),
        E(["mmap", "a", "shared", "rw", 10, 0, "SHRD"], u="0123456789", plans="ENODEV"),
        E(["pread", "a", 10, 0], u="SHRD456789", plans="0123456789"),
        ["close", "a"],
        ["read_file", "f"],
        ["open", "a", "f", "O_RDONLY"],
        E(["mmap", "a", "shared", "r", 10, 0, None], plans="0123456789"),
        E(["mmap", "a", "private", "r", 4, 0, None], plans="0123"),
        E(["mmap", "a", "shared", "rw", 10, 0, "x"], u="EACCES", plans="EACCES"),
        ["mmap", "a", "private", "rw", 20, 0, None],
        ["close", "a"],
    ],
    "copy_file_range": [
        *new("f", "abcdefghij"),
        ["open", "a", "f", "O_RDONLY"],
        ["open", "b", "g", "O_RDWR|O_CREAT", 0o644],
        E(["copy_file_range", "a", "b", 4, 2, 0], u=4, plans=4),
        E(["copy_file_range", "a", "b", 100, None, None], u=10, plans=10),
        ["fstat", "b"],
        ["copy_file_range", "a", "b", 3, 8, 100],
        ["fstat", "b"],
        E(["copy_file_range", "b", "a", 1, 0, 0], u="EBADF", plans="EBADF"),
        ["close", "a"],
        ["close", "b"],
        ["read_file", "g"],
    ],
    "O_TMPFILE": [
        E(["open", "t", ".", "O_TMPFILE|O_RDWR", 0o600], u="EOPNOTSUPP", plans="EOPNOTSUPP"),
        ["write", "t", "anon"],
        ["linkat", "t", "named"],
        ["close", "t"],
        E(["open", "t", ".", "O_TMPFILE|O_RDONLY", 0o600], u="EINVAL", plans="EINVAL"),
        E(["open", "t", "missing", "O_TMPFILE|O_RDWR", 0o600], u="ENOENT", plans="ENOENT"),
        ["listdir", "."],
    ],
    "sparse": [
        ["open", "a", "f", "O_RDWR|O_CREAT", 0o644],
        ["pwrite", "a", "end", 1 << 20],
        E(["fstat", "a"], u={"size": (1 << 20) + 3}, plans={"size": (1 << 20) + 3}),
        E(["pread", "a", 4, 0], u="\0\0\0\0", plans="\0\0\0\0"),
        E(["lseek", "a", 0, "DATA"], u=0, plans=0),
        E(["lseek", "a", 0, "HOLE"], u=(1 << 20) + 3, plans=(1 << 20) + 3),
        E(["fallocate", "a", "", 0, 4096], u="EOPNOTSUPP", plans="EOPNOTSUPP"),
        ["fallocate", "a", "PUNCH_HOLE", 0, 4096],
        ["close", "a"],
        ["stat", "f"],
        ["open", "a", "f", "O_RDWR"],
        E(["pread", "a", 3, 1 << 20], u="end", plans="end"),
        ["pwrite", "a", "mid", 1 << 19],
        ["close", "a"],
        ["read_file", "f"],
    ],
    "handles": [
        ["open", "w", "f", "O_RDWR|O_CREAT", 0o644],
        ["write", "w", "draft"],
        E(["open", "v", "f", "O_WRONLY"], u="ok", plans="EACCES"),
        ["close", "v"],
        ["open", "r", "f", "O_RDONLY"],
        E(["pread", "r", 10, 0], u="draft", plans=""),
        E(["stat", "f"], u={"size": 5}, plans={"size": 5}),
        E(["rename", "f", "g"], u="ok", plans="EBUSY"),
        ["dup", "w2", "w"],
        ["close", "w2"],
        ["rename", "f", "g"],
        E(["write", "w", "!"], u=1, plans="ESTALE"),
        ["close", "w"],
        ["pread", "r", 10, 0],
        ["close", "r"],
        ["read_file", "g"],
        ["open", "a1", "log", "O_WRONLY|O_APPEND|O_CREAT", 0o644],
        E(["open", "a2", "log", "O_WRONLY|O_APPEND"], u="ok", plans="ok"),
        ["write", "a1", "one."],
        ["write", "a2", "two."],
        E(["ftruncate", "a1", 0], u="ok", plans="EACCES"),
        ["close", "a1"],
        ["close", "a2"],
        ["read_file", "log"],
        ["open", "w", "g", "O_RDWR"],
        ["write", "w", "more"],
        E(["truncate", "g", 1], u="ok", plans="EACCES"),
        ["close", "w"],
        ["read_file", "g"],
    ],
}


@pytest.mark.parametrize("area", AREAS)
@pytest.mark.parametrize("name", CASES)
def test_hand_written_sequences(site: Site, name: str, area: str) -> None:
    site.compare(area, CASES[name])


def large_file(far: int) -> list[Step | Expect]:
    """Data `far` bytes into a file, most of it a hole."""
    return [
        ["open", "a", "f", "O_RDWR|O_CREAT", 0o644],
        E(["pwrite", "a", "far", far], u=3, plans=3),
        E(["fstat", "a"], u={"size": far + 3}, plans={"size": far + 3}),
        E(["pread", "a", 3, far], u="far", plans="far"),
        E(["pread", "a", 3, far - 2], u="\0\0f", plans="\0\0f"),
        E(["lseek", "a", 0, "END"], u=far + 3, plans=far + 3),
        ["ftruncate", "a", far + 1],
        ["close", "a"],
        E(["stat", "f"], u={"size": far + 1}, plans={"size": far + 1}),
        ["truncate", "f", far // 2],
        E(["read_file", "f"], u=f"<more than {1 << 20} bytes>", plans=f"<more than {1 << 20} bytes>"),
        ["truncate", "f", 0],
    ]


@pytest.mark.parametrize(("area", "far"), [("u", 5 << 30), ("plans", 5 << 24)])
def test_large_files(site: Site, area: str, far: int) -> None:
    """Offsets past 4 GiB in the unmanaged area. A managed file is copied whole by each write handle
    and commit (docs/mount.md), so the managed area goes to 80 MiB."""
    site.compare(area, large_file(far))


def test_hard_links_made_behind_the_mount_show_one_inode(site: Site) -> None:
    """Names the mount first sees when the file already has both (a link made in the backing
    directory) are one inode too: one number, and what is written through one is read through the other."""
    backing = site.mount.root / "u" / "behind"
    backing.mkdir()
    (backing / "f").write_text("one")
    os.link(backing / "f", backing / "g")
    seen = site.mount.path / "u" / "behind"
    assert (seen / "f").read_text() == "one"
    assert os.stat(seen / "f").st_ino == os.stat(seen / "g").st_ino
    assert os.stat(seen / "g").st_nlink == 2
    with open(seen / "g", "a") as f:
        f.write("two")
    assert (seen / "f").read_text() == "onetwo"


def _long_names(prefix: str) -> tuple[list[Step], list[str]]:
    """Directories of 255-byte names making a 4095-byte relative path with a 255-byte file name."""
    dirs = [f"{i:03d}" + prefix * 252 for i in range(15)]
    made, steps = "", []
    for d in dirs:
        made += d + "/"
        steps.append(["mkdir", made.rstrip("/"), 0o755])
    return steps, ["/".join(dirs[: i + 1]) for i in range(len(dirs))]


def path_max_case(with_links: bool) -> list[Step | Expect]:
    steps, dirs = _long_names("d")
    deep = dirs[-1] + "/"
    f, g = deep + "f" * 255, deep + "g" * 255
    assert len(f.encode()) == 4095
    case: list[Step | Expect] = [
        *steps,
        E(["open", "a", f, "O_RDWR|O_CREAT", 0o644], u="ok", plans="ok"),
        ["write", "a", "deep"],
        ["fstat", "a"],
        ["close", "a"],
        E(["stat", f], u={"size": 4}, plans={"size": 4}),
        E(["rename", f, g, "NOREPLACE"], u="ok", plans="ok"),
        E(["read_file", g], u="deep", plans="deep"),
        ["truncate", g, 2],
        ["chmod", g, 0o600],
        ["utimensat", g, 10**9, 2 * 10**9],
        E(["lstat", g], u={"mode": "0o600", "size": 2}, plans={"mode": "0o600", "size": 2}),
        ["open", "a", g, "O_WRONLY|O_APPEND"],
        ["write", "a", "!"],
        ["close", "a"],
        E(["read_file", g], u="de!", plans="de!"),
        E(["open", "a", deep + "h" * 256, "O_RDWR|O_CREAT", 0o644], u="ENAMETOOLONG", plans="ENAMETOOLONG"),
        E(["open", "a", g + "x", "O_RDONLY"], u="ENAMETOOLONG", plans="ENAMETOOLONG"),
        ["mkdir", deep + "x" * 255, 0o755],
        ["rename", deep + "x" * 255, deep + "y" * 255],
        ["listdir", deep],
        ["rmdir", deep + "y" * 255],
    ]
    if with_links:
        case += [
            E(["link", g, deep + "l" * 255], u="ok", plans="EPERM"),
            E(["stat", deep + "l" * 255], u={"nlink": 2, "same": [g, deep + "l" * 255]}),
            ["unlink", deep + "l" * 255],
            E(["symlink", "t", deep + "s" * 255], u="ok", plans="EPERM"),
            ["readlink", deep + "s" * 255],
            ["unlink", deep + "s" * 255],
        ]
    case += [["unlink", g], *[["rmdir", d] for d in reversed(dirs)]]
    return case


def test_paths_near_path_max_in_the_unmanaged_area(site: Site) -> None:
    """A 4095-byte relative path of 255-byte names works as on a plain directory (the mount's own
    path from its root is longer still: the backing tree is reached a run of directories at a time)."""
    site.compare("u", path_max_case(with_links=False))


@pytest.mark.parametrize("area", AREAS)
def test_paths_near_path_max_with_links_and_in_the_managed_area(site: Site, area: str) -> None:
    """The same in a managed glob, with hard links and symlinks: the core reaches a path whose backing
    path reaches PATH_MAX beneath a descriptor of its directory (`paths.Target`)."""
    site.compare(area, path_max_case(with_links=True))


# ---- generated sequences ---------------------------------------------------------------

NAMES = ["a", "b", "d", "d/a", "e"]
SLOTS = ["x", "y", "z"]
FLAGS = [
    "O_RDONLY",
    "O_WRONLY|O_CREAT|O_TRUNC",
    "O_RDWR|O_CREAT",
    "O_WRONLY|O_APPEND|O_CREAT",
    "O_RDWR|O_CREAT|O_EXCL",
    "O_RDWR|O_TRUNC",
    "O_WRONLY",
    "O_RDWR|O_APPEND",
]


def _op(name: str, *args: st.SearchStrategy[Any]) -> st.SearchStrategy[Step]:
    return st.tuples(st.just(name), *args).map(list)


def _one(*values: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from(values)


name = _one(*NAMES)
data, offset, size = _one("", "x", "hello", "0123456789"), _one(0, 3, 64, 1 << 20), _one(0, 2, 10, 1 << 16)
mode = _one(0o600, 0o644, 0o755, 0o4755)
PRELUDE: list[Step] = [*new("a", "hello"), ["mkdir", "d", 0o755], *new("d/a", "0123456789", 0o600)]
"""What each generated sequence starts from: files to open, a directory to move things into."""


def _opens(slot: st.SearchStrategy[str]) -> st.SearchStrategy[Step]:
    return st.one_of(
        _op("open", slot, name, _one(*FLAGS).map(lambda f: f + "|O_NONBLOCK"), mode),
        _op("open", slot, _one(".", "d"), _one("O_TMPFILE|O_RDWR"), _one(0o600)),
    )


def _on_slots(slot: st.SearchStrategy[str], other: st.SearchStrategy[str], managed: bool) -> st.SearchStrategy[Step]:
    """Steps on open files (in a managed glob, no fchmod: through a read handle whose file changed
    since, it reaches the version's own inode, which the hand-written cases cover)."""
    fchmod = [] if managed else [_op("fchmod", slot, mode)]
    return st.one_of(
        *fchmod,
        _op("close", slot),
        _op("dup", other, slot),
        _op("write", slot, data),
        _op("pwrite", slot, data, offset),
        _op("read", slot, _one(0, 4, 100)),
        _op("pread", slot, _one(0, 4, 100), offset),
        _op("lseek", slot, offset, _one("SET", "CUR", "END", "DATA", "HOLE")),
        _op("ftruncate", slot, size),
        _op("fstat", slot),
        _op("fsync", slot),
        _op("linkat", slot, name),
        _op("mmap", slot, _one("shared", "private"), _one("r", "rw"), _one(1, 4), _one(0), _one(None, "M")),
        _op("copy_file_range", slot, other, _one(1, 5, 100), _one(None, 0, 2), _one(None, 0, 3)),
        _op("fallocate", slot, _one("", "PUNCH_HOLE"), _one(0), _one(4096)),
    )


NAMED = st.one_of(
    _op("truncate", name, size),
    _op("stat", name),
    _op("lstat", name),
    _op("chmod", name, mode),
    _op("chown", name, _one(-1, 0, 1234), _one(-1, 0, 42)),
    _op("utimensat", name, _one(10**9), _one(2 * 10**9)),
    _op("link", name, name),
    _op("symlink", _one("a", "nowhere", "d"), name),
    _op("readlink", name),
    _op("mkdir", name, _one(0o755, 0o700)),
    _op("rmdir", name),
    _op("mkfifo", name, _one(0o644)),
    _op("mknod", name, _one("S_IFREG", "S_IFIFO"), _one(0o640), _one(0)),
    _op("unlink", name),
    _op("rename", name, name, _one("", "NOREPLACE", "EXCHANGE")),
    _op("listdir", _one(".", "d")),
    _op("read_file", name),
)
"""Steps on names."""


@st.composite
def sequences(draw: st.DrawFn, managed: bool) -> list[Step]:
    """PRELUDE, then steps mostly on the files the sequence has open (an open comes first, and one in
    five steps opens another), the rest on names."""
    steps, open_slots = list(PRELUDE), set()
    for _ in range(draw(st.integers(1, 24))):
        if not open_slots or draw(st.integers(0, 4)) == 0:
            step = draw(_opens(_one(*SLOTS)))
        elif draw(st.booleans()):
            step = draw(_on_slots(_one(*sorted(open_slots)), _one(*SLOTS), managed))
        else:
            step = draw(NAMED)
        if step[0] == "close":
            open_slots.discard(step[1])
        elif step[0] in ("open", "dup"):
            open_slots.add(step[1])
        steps.append(step)
    return steps


EXAMPLES = int(os.environ.get("CONFORMANCE_EXAMPLES", "60"))
"""Generated sequences per area (the suite's default keeps this file well under two minutes)."""


@pytest.mark.parametrize("area", AREAS)
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_generated_sequences(site: Site, area: str, data: st.DataObject) -> None:
    site.compare(area, data.draw(sequences(managed=area == "plans"), label="steps"))
