"""Workload benchmark (issue 12): real developer work on native, bindfs, a pyfuse3 floor and the mount.

Subjects, each with its own directory on one backing file system (tmpfs, or the disk):

  native    the backing directory itself
  bindfs    `bindfs SRC MNT` (default options); skipped, with the command that installs it, when
            bindfs is missing (this script never installs anything)
  floorfs   `WorkloadFloor`: floorfs.py's do-nothing pyfuse3 + trio passthrough with what real
            work needs on top (directories, links, metadata); mount/floorfs is our handlers' cost
  mount     coherent-volume's mount through the real CLI, managing `plans/**` and `*.md`
  mount+direct  the same, mounted with `--direct direct`: the unmanaged workloads run in that
            directory, which the kernel serves through a bind mount; the managed ones (sed, save)
            run in the mount's `plans/` as for `mount`

Workloads (each timed as a whole, child processes included):

  untar     `tar -xf` of a generated tree of small files in nested directories (a node_modules)
  commit    `git init && git add -A && git commit` of that tree (automatic gc off: it would pack
            the objects in a background process racing the next workloads)
  status    `git status` three times
  grep      `grep -r` of a word in a few of its files (output read through a pipe: GNU grep stops
            at the first match when it writes to /dev/null)
  rm        `rm -rf` of the tree
  venv      `python -m venv` (ensurepip installs pip from its bundled wheel) and a pip install of
            a generated local wheel, no network; --quick: `--without-pip` and the outer pip
  sed       an editor loop: `sed -i` edits of managed files (`plans/`) by one agent
  save      atomic saves of a managed file (create a temp beside it, write 4 KiB, fsync, rename
            over it), the way editors and Claude Code write; each reads the file first, untimed,
            as the protocol needs

untar..rm work on one tree in turn: with --only, the steps that make the tree it needs run
untimed before it, and rm after it. Every workload runs for every subject in turn (subject
order rotated each round, both backings in each round), and the median round is reported, so
machine noise hits all subjects alike. Ratios are time ratios (>1 is slower). Every mount is
unmounted whatever happens and the kernel's mount table is checked at the end.

--diagnose DIR runs each workload once on fresh floorfs and mount daemons that count and time the
FUSE requests they serve by kind (the mount's also the work each hands to its worker threads, and
the hops there and back) and their cyclic garbage collections, with py-spy (when installed: `pip install py-spy`) recording each
daemon's stacks; it prints the counts and times side by side and the daemons' top frames, and
leaves the raw profiles and counts in DIR.

    .venv/bin/python scripts/bench_workloads.py [--quick] [--rounds N] [--only WORKLOAD]
        [--backing tmpfs|disk|both] [--json FILE] [--diagnose DIR]
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import contextvars
import dataclasses
import errno
import gc
import hashlib
import inspect
import io
import json
import os
import random
import shutil
import signal
import stat as stat_mod
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pyfuse3
import trio
from rich import box
from rich.console import Console
from rich.table import Table

from . import CLI, REPO, bench_fuse, child
from .bench_fuse import BINDFS_MISSING, GIT, GIT_ENV, check_clean, ignore_signals, mount_bindfs, unmount
from .floorfs import Floor
from .mounts import Mount, serving_pids, watcher_pids

AGENT = "bench"
MANAGED = ("plans/**", "*.md")
NEEDLE = "coherent_needle"
DUMP_NAME = b".bench-requests-dump"
"""A lookup of this name in the root makes a counting daemon write its counts and reset them."""
SUBJECTS = ("native", "bindfs", "floorfs", "mount", "mount+direct")
DIRECT = "direct"
"""The --direct dir of the `mount+direct` subject, where its unmanaged workloads run."""
BACKINGS = ("tmpfs", "disk")

console = Console(width=236)


@dataclass(frozen=True)
class Sizes:
    """Sizes of one run (full or --quick)."""

    files: int
    """Files in the generated tree."""
    wheel_modules: int
    edits: int
    """`sed -i` edits."""
    saves: int
    rounds: int
    ensurepip: bool
    """venv with pip (ensurepip), and pip install with the venv's own pip."""


FULL = Sizes(files=6000, wheel_modules=300, edits=500, saves=200, rounds=3, ensurepip=True)
QUICK = Sizes(files=120, wheel_modules=4, edits=12, saves=6, rounds=1, ensurepip=False)


@dataclass(frozen=True)
class Assets:
    """Inputs made once per run, outside every subject."""

    tarball: Path
    wheel: Path


@dataclass(frozen=True)
class Subject:
    key: str
    """One of SUBJECTS."""
    backing: str
    work: Path
    """Where the unmanaged workloads run (the mount's root, for the FUSE subjects but mount+direct)."""
    pid: int | None = None
    """floorfs: its daemon's pid."""
    home: Path | None = None
    """Where the managed workloads run (`plans/`), when not in `work`: mount+direct's mount root."""

    @property
    def managed_work(self) -> Path:
        return self.home or self.work


# ---- inputs ---------------------------------------------------------------------------------

WORDS: tuple[str, ...] = (
    "const",
    "require",
    "module",
    "exports",
    "function",
    "return",
    "value",
    "object",
    "string",
    "array",
)
WORDS += ("promise", "async", "await", "callback", "error", "options", "config", "default", "export", "import")


def text(rng: random.Random, size: int, needle: bool) -> bytes:
    words: list[str] = []
    length = 0
    while length < size:
        words.append(rng.choice(WORDS))
        length += len(words[-1]) + 1
    if needle:
        words.insert(rng.randrange(len(words)), NEEDLE)
    return (" ".join(words) + "\n").encode()


def tree_entries(files: int) -> Iterator[tuple[str, bytes]]:
    """(path, content) of a deterministic node_modules-like tree: packages of a few nested
    directories, 100 B to 3 KiB per file, NEEDLE in about one file in 40."""
    rng = random.Random(12)
    made = package = 0
    while made < files:
        name = f"node_modules/pkg{package:04d}"
        layout = ["package.json", "README.md", "index.js", "LICENSE"]
        layout += [f"lib/m{i}.js" for i in range(rng.randrange(2, 8))]
        layout += [f"lib/util/u{i}.js" for i in range(rng.randrange(0, 5))]
        layout += [f"test/t{i}.js" for i in range(rng.randrange(0, 3))]
        for rel in layout[: files - made]:
            yield f"{name}/{rel}", text(rng, rng.randrange(100, 3072), rng.randrange(40) == 0)
            made += 1
        package += 1


def make_tarball(path: Path, files: int) -> None:
    """The tree as a tar archive: fixed owner and times (old, so git sees no racily-clean entries)."""
    with tarfile.open(path, "w") as tar:
        made: set[str] = set()
        for rel, content in tree_entries(files):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
                    tar.addfile(info)
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(content), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(content))


def make_wheel(directory: Path, modules: int) -> Path:
    """A pure-Python wheel of `modules` modules (pip byte-compiles each: a create-heavy install)."""
    files = {f"benchpkg/m{i:03d}.py": f"def f{i}(x):\n    return x + {i}\n".encode() for i in range(modules)}
    files["benchpkg/__init__.py"] = b""
    info = "benchpkg-1.0.dist-info"
    files[f"{info}/METADATA"] = b"Metadata-Version: 2.1\nName: benchpkg\nVersion: 1.0\n"
    files[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    files[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    path = directory / "benchpkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    return path


# ---- workloads ------------------------------------------------------------------------------

NO_GC = ["-c", "gc.auto=0", "-c", "maintenance.auto=false"]
"""git's automatic gc would pack the tree's objects in a background process after the commit (past
6,700 loose objects), racing the workloads after it."""
CHILD_ENV = {**GIT_ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1", "PIP_NO_INDEX": "1"}


def run(argv: list[str], cwd: Path) -> float:
    """Run a program to completion (its output read through pipes); the seconds it took."""
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env={**os.environ, **CHILD_ENV}, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} in {cwd} exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    return elapsed


def untar(s: Subject, z: Sizes, a: Assets) -> float:
    (s.work / "tree").mkdir()
    return run(["tar", "-xf", str(a.tarball)], s.work / "tree")


def commit(s: Subject, z: Sizes, a: Assets) -> float:
    tree = s.work / "tree"
    steps = (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "tree"])
    return sum(run([*GIT, *NO_GC, *args], tree) for args in steps)


def status(s: Subject, z: Sizes, a: Assets) -> float:
    return sum(run([*GIT, *NO_GC, "status"], s.work / "tree") for _ in range(3))


def grep(s: Subject, z: Sizes, a: Assets) -> float:
    return run(["grep", "-r", NEEDLE, "."], s.work / "tree")


def remove(s: Subject, z: Sizes, a: Assets) -> float:
    return run(["rm", "-rf", "tree"], s.work)


def venv(s: Subject, z: Sizes, a: Assets) -> float:
    if z.ensurepip:
        elapsed = run([sys.executable, "-m", "venv", "venv"], s.work)
        elapsed += run(["venv/bin/python", "-m", "pip", "install", "--no-deps", str(a.wheel)], s.work)
    else:
        elapsed = run([sys.executable, "-m", "venv", "--without-pip", "venv"], s.work)
        pip = [sys.executable, "-m", "pip", "--python", "venv/bin/python", "install", "--no-deps", str(a.wheel)]
        elapsed += run(pip, s.work)
    run(["rm", "-rf", "venv"], s.work)  # untimed
    return elapsed


EDITED = 10
"""Managed files the sed loop edits in turn."""


def sed(s: Subject, z: Sizes, a: Assets) -> float:
    script = f'for i in $(seq 0 {z.edits - 1}); do sed -i "s/^edit: .*/edit: $i/" plans/f$((i % {EDITED})).md || exit 1; done'
    return run(["bash", "-c", script], s.managed_work)


def save(s: Subject, z: Sizes, a: Assets) -> float:
    path = s.managed_work / "plans" / "save.md"
    tmp = path.with_name(".save.md.tmp")
    data = bytes(range(256)) * 16
    total = 0.0
    for _ in range(z.saves):
        path.read_bytes()  # the protocol's precondition for an overwrite, untimed
        t0 = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        total += time.perf_counter() - t0
    return total


@dataclass(frozen=True)
class Workload:
    key: str
    label: str
    run: Callable[[Subject, Sizes, Assets], float]
    managed: bool = False
    tree: bool = False
    """One of the steps on the tree (untar..rm), which run in this order."""
    builds: bool = False
    """A tree step that the later ones need (run untimed before them under --only)."""


WORKLOADS = (
    Workload("untar", "tar -xf", untar, tree=True, builds=True),
    Workload("commit", "git init, add -A, commit", commit, tree=True, builds=True),
    Workload("status", "git status ×3", status, tree=True),
    Workload("grep", "grep -r", grep, tree=True),
    Workload("rm", "rm -rf", remove, tree=True),
    Workload("venv", "python -m venv + pip install", venv),
    Workload("sed", "sed -i edits of plans/ (managed)", sed, managed=True),
    Workload("save", "atomic saves of plans/ (managed)", save, managed=True),
)
BY_KEY = {w.key: w for w in WORKLOADS}


def plan(only: str | None) -> list[tuple[Workload, bool]]:
    """(workload, timed) in the order a round runs them."""
    if only is None:
        return [(w, True) for w in WORKLOADS]
    chosen = BY_KEY[only]
    if not chosen.tree:
        return [(chosen, True)]
    before = [(w, False) for w in WORKLOADS if w.builds and WORKLOADS.index(w) < WORKLOADS.index(chosen)]
    return [*before, (chosen, True), *([(BY_KEY["rm"], False)] if only != "rm" else [])]


def sizes_label(w: Workload, z: Sizes) -> str:
    if w.tree:
        return f"{w.label} ({z.files:,} files)"
    if w.key == "sed":
        return f"{w.label} ×{z.edits}"
    if w.key == "save":
        return f"{w.label} ×{z.saves}"
    return w.label if z.ensurepip else f"{w.label} (--without-pip, outer pip)"


def prepare(s: Subject) -> None:
    """The managed files the editor workloads change (new files: no prior read needed)."""
    plans = s.managed_work / "plans"
    plans.mkdir()
    for i in range(EDITED):
        (plans / f"f{i}.md").write_text(f"# plan {i}\nedit: -\n" + "- a step of the plan\n" * 40)
    (plans / "save.md").write_bytes(bytes(4096))


# ---- the floor: floorfs plus what real work needs ----------------------------------------------

REQUESTS = tuple(name for name, f in vars(pyfuse3.Operations).items() if inspect.iscoroutinefunction(f))
"""Every request handler of pyfuse3.Operations."""

Around = Callable[[str, Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]
Ops = TypeVar("Ops", bound=pyfuse3.Operations)


def wrapped(base: type[Ops], around: Around) -> type[Ops]:
    """A subclass of `base` whose every request handler is `around(name, base's handler)`."""
    return type(base.__name__, (base,), {name: around(name, getattr(base, name)) for name in REQUESTS})


def fuse_errors(name: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """OSError -> FUSEError: anything else escaping a handler would end the mount."""

    async def request(*args: Any) -> Any:
        try:
            return await handler(*args)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None

    return request


@dataclass
class Tally:
    """What a daemon's requests of one kind took since the last dump (`counting`)."""

    n: int = 0
    seconds: float = 0.0
    """Their handlers' wall time in the daemon."""
    worker: float = 0.0
    """Of which spent running their blocking work in worker threads (the mount: `fusefs.handles.blocking`)."""
    handed: float = 0.0
    """Of which spent from handing that work to a thread to being back with its result (worker + hop)."""

    @classmethod
    def total(cls, tallies: Iterable[Tally]) -> Tally:
        out = cls()
        for t in tallies:
            out.n, out.seconds, out.worker, out.handed = (
                out.n + t.n,
                out.seconds + t.seconds,
                out.worker + t.worker,
                out.handed + t.handed,
            )
        return out


GC = "(garbage collection)"
"""The tally of the daemon's cyclic garbage collections (their time is also in the requests they interrupted)."""


def collecting(tallies: dict[str, Tally]) -> None:
    """Count and time this process's cyclic garbage collections in `tallies[GC]`."""
    started = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        tally = tallies.setdefault(GC, Tally())
        tally.n += 1
        tally.seconds += time.perf_counter() - started[0]

    gc.callbacks.append(callback)


REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("request", default="?")
"""The kind of the request a daemon's task is serving (each pyfuse3 task serves one at a time)."""


def counting(tallies: dict[str, Tally], dump: str) -> Around:
    """Count and time requests by kind; a lookup of DUMP_NAME in the root writes the tallies to
    `dump` as JSON and starts afresh (it is not counted, and fails ENOENT, which the kernel does not
    cache)."""

    def around(name: str, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def request(self: pyfuse3.Operations, *args: Any) -> Any:
            if name == "lookup" and args[0] == pyfuse3.ROOT_INODE and args[1] == DUMP_NAME:
                with open(dump, "w") as f:
                    json.dump({k: dataclasses.asdict(t) for k, t in tallies.items()}, f)
                tallies.clear()
                raise pyfuse3.FUSEError(errno.ENOENT)
            token = REQUEST.set(name)
            t0 = time.perf_counter()
            try:
                return await handler(self, *args)
            finally:
                tally = tallies.setdefault(name, Tally())
                tally.n += 1
                tally.seconds += time.perf_counter() - t0
                REQUEST.reset(token)

        return request

    return around


def timed_blocking(tallies: dict[str, Tally], blocking: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """`blocking` (the mount's hand-off to a worker thread), adding its times to the tally of the
    request it serves."""

    async def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        ran = [0.0]

        def run() -> Any:
            t1 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                ran[0] = time.perf_counter() - t1

        t0 = time.perf_counter()
        try:
            return await blocking(run)
        finally:
            tally = tallies.setdefault(REQUEST.get(), Tally())
            tally.worker += ran[0]
            tally.handed += time.perf_counter() - t0

    return timed


class WorkloadFloor(Floor):
    """floorfs with directories, links and full metadata on top, still doing nothing but the
    backing system call for each request (1 s entry and attribute timeouts, as floorfs)."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.listings: dict[int, tuple[int, list[str]]] = {}
        self.next_listing = 1

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        path = self.paths[inode]
        if fields.update_size:
            os.truncate(fh if fh is not None else path, attr.st_size)
        if fields.update_mode and not stat_mod.S_ISLNK(os.lstat(path).st_mode):
            os.chmod(path, stat_mod.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid, gid = attr.st_uid if fields.update_uid else -1, attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid, follow_symlinks=False)
        if fields.update_atime or fields.update_mtime:
            st = os.lstat(path)
            ns = (
                attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns,
            )
            os.utime(path, ns=ns, follow_symlinks=False)
        return self._attrs(path)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return os.fsencode(os.readlink(self.paths[inode]))

    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.symlink(os.fsdecode(target), path)
        return self._attrs(path)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(new_parent_inode, new_name)
        os.link(self.paths[inode], path, follow_symlinks=False)
        return self._attrs(path)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        path = self._child(parent_inode, name)
        os.rmdir(path)
        self.inodes.pop(path, None)

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        src, dst = self._child(parent_inode_old, name_old), self._child(parent_inode_new, name_new)
        os.rename(src, dst)
        self.inodes.pop(dst, None)
        below = [p for p in self.inodes if p.startswith(src + "/")] if stat_mod.S_ISDIR(os.lstat(dst).st_mode) else []
        for old in [src, *below]:
            if old in self.inodes:
                inode = self.inodes.pop(old)
                self.inodes[dst + old[len(src) :]] = inode
                self.paths[inode] = dst + old[len(src) :]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        fh, self.next_listing = self.next_listing, self.next_listing + 1
        self.listings[fh] = (inode, sorted(os.listdir(self.paths[inode])))
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        inode, names = self.listings[fh]
        for index in range(start_id, len(names)):
            try:
                attrs = self._attrs(os.path.join(self.paths[inode], names[index]))
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(names[index]), attrs, index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        del self.listings[fh]

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        fd = os.open(self.paths[self.listings[fh][0]], os.O_RDONLY | os.O_DIRECTORY)
        try:
            await trio.to_thread.run_sync(os.fsync, fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st, data = os.statvfs(self.paths[pyfuse3.ROOT_INODE]), pyfuse3.StatvfsData()
        for name in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(data, name, getattr(st, name))
        data.f_namemax = st.f_namemax
        return data

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        path = self._child(parent_inode, name)
        os.mknod(path, mode, rdev)
        return self._attrs(path)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in os.listxattr(self.paths[inode], follow_symlinks=False)]

    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.setxattr(self.paths[inode], name, value, follow_symlinks=False)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        os.removexattr(self.paths[inode], name, follow_symlinks=False)

    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        return True  # default_permissions: the kernel checked the mode bits


def serve_floor(root: str, mountpoint: str, dump: str | None) -> None:
    """Serve WorkloadFloor in the foreground (counting its requests when `dump` is given)."""
    cls = wrapped(WorkloadFloor, fuse_errors)
    if dump is not None:
        tallies: dict[str, Tally] = {}
        collecting(tallies)
        cls = wrapped(cls, counting(tallies, dump))
    pyfuse3.init(cls(os.path.realpath(root)), mountpoint, set(pyfuse3.default_options) | {"fsname=floorfs"})
    try:
        trio.run(pyfuse3.main, 4, 64)  # the mount's own min/max worker tasks
    finally:
        pyfuse3.close()


def serve_counted_mount(root: str, mountpoint: str, dump: str) -> None:
    """Mount the volume as `coherent-volume mount --agent bench` does (the daemon forks and this
    returns once it serves), its operations counting and timing their requests and the work they
    hand to worker threads."""
    import fusefs.handles
    import fusefs.mount
    import fusefs.operations

    tallies: dict[str, Tally] = {}
    collecting(tallies)
    timed = timed_blocking(tallies, fusefs.handles.blocking)
    fusefs.handles.blocking = fusefs.operations.blocking = timed  # type: ignore[assignment]
    counted = wrapped(fusefs.operations.CoherentOperations, counting(tallies, dump))
    fusefs.mount.CoherentOperations = counted  # type: ignore[misc]
    fusefs.mount.mount(root, mountpoint, AGENT, foreground=False, allow_other=False)


# ---- mounting -------------------------------------------------------------------------------


def mount_floor(src: Path, mountpoint: Path, stack: contextlib.ExitStack, dump: Path | None) -> int:
    """Start the counting floor daemon (foreground process) and wait until its mount answers; its pid."""
    extra = [str(dump)] if dump is not None else []
    argv = child("bench_workloads", "serve-floor", str(src), str(mountpoint), *extra)
    return bench_fuse.mount_floor(src, mountpoint, stack, argv)


def mount_volume(
    root: Path, mountpoint: Path, stack: contextlib.ExitStack, dump: Path | None, direct: tuple[str, ...] = ()
) -> None:
    root.mkdir()
    mountpoint.mkdir()
    init = [CLI, "init", str(root)] + [arg for glob in MANAGED for arg in ("--managed", glob)]
    subprocess.run(init, check=True, capture_output=True)
    stack.callback(unmount, mountpoint)
    if dump is None:
        Mount(root, mountpoint, agent=AGENT, direct=direct).mount()
        return
    argv = child("bench_workloads", "serve-mount", str(root), str(mountpoint), str(dump))
    subprocess.run(argv, check=True, capture_output=True, cwd=REPO, timeout=60)


def daemon_of(s: Subject) -> int | None:
    """The pid of the FUSE daemon serving the subject (None for native and bindfs)."""
    if s.key.startswith("mount"):  # started by the CLI or by serve-mount: whatever serves it but its watcher
        pids = set(serving_pids(s.managed_work)) - set(watcher_pids(s.managed_work))
        return pids.pop() if len(pids) == 1 else None
    return s.pid


def make_subjects(
    base: Path, backing: str, stack: contextlib.ExitStack, bindfs: bool, keys: tuple[str, ...], dumps: Path | None
) -> list[Subject]:
    """Mount and prepare the subjects `keys` under `base` (dumps: count requests, into that directory)."""
    subjects = []
    for key in keys:
        if key == "native":
            (base / "native").mkdir()
            subjects.append(Subject(key, backing, base / "native"))
        elif key == "bindfs" and bindfs:
            mount_bindfs(base / "bindfs-src", base / "bindfs-mnt", stack)
            subjects.append(Subject(key, backing, base / "bindfs-mnt"))
        elif key == "floorfs":
            dump = dumps / f"{backing}-floorfs.json" if dumps else None
            pid = mount_floor(base / "floor-src", base / "floor-mnt", stack, dump)
            subjects.append(Subject(key, backing, base / "floor-mnt", pid))
        elif key == "mount":
            mountpoint = base / "cv-mnt"
            mount_volume(base / "volume", mountpoint, stack, dumps / f"{backing}-mount.json" if dumps else None)
            subjects.append(Subject(key, backing, mountpoint))
        elif key == "mount+direct":
            mountpoint = base / "cvd-mnt"
            mount_volume(base / "volume-direct", mountpoint, stack, None, (DIRECT,))
            subjects.append(Subject(key, backing, mountpoint / DIRECT, home=mountpoint))
    for s in subjects:
        prepare(s)
    return subjects


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (/proc/self/mounts)."""
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            mountpoint, fstype = line.split()[1:3]
            if (str(path) + "/").startswith(mountpoint.rstrip("/") + "/") and len(mountpoint) >= len(best):
                best, kind = mountpoint, fstype
    return kind


def backing_dir(backing: str) -> Path:
    """A fresh directory on the backing file system: tmpfs in BENCH_TMPFS (default /dev/shm), the
    disk in BENCH_DISK (default /var/tmp)."""
    if backing == "tmpfs":
        parent = os.environ.get("BENCH_TMPFS", "/dev/shm")
    else:
        parent = os.environ.get("BENCH_DISK", "/var/tmp")
    base = Path(tempfile.mkdtemp(prefix="cv-workloads-", dir=parent))
    kind = fs_type(base)
    if (backing == "tmpfs") != (kind == "tmpfs"):
        console.print(f"[yellow]{backing} backing {base} is {kind}: set BENCH_TMPFS / BENCH_DISK[/]")
    return base


# ---- running and reporting ----------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    """(workload, backing, subject) -> seconds, one value per round."""

    def add(self, workload: str, backing: str, subject: str, seconds: float) -> None:
        self.samples.setdefault((workload, backing, subject), []).append(seconds)

    def median(self, workload: str, backing: str, subject: str) -> float | None:
        values = self.samples.get((workload, backing, subject))
        return statistics.median(values) if values else None


def rotated(subjects: list[Subject], r: int) -> list[Subject]:
    return subjects[r % len(subjects) :] + subjects[: r % len(subjects)]


def run_rounds(
    by_backing: dict[str, list[Subject]], steps: list[tuple[Workload, bool]], z: Sizes, a: Assets, rounds: int
) -> Results:
    results = Results()
    for r in range(rounds):
        t0 = time.perf_counter()
        for backing, subjects in by_backing.items():
            for w, timed in steps:
                for s in rotated(subjects, r):
                    elapsed = w.run(s, z, a)
                    if timed:
                        results.add(w.key, backing, s.key, elapsed)
        console.print(f"round {r + 1}/{rounds} done in {time.perf_counter() - t0:.1f} s")
    return results


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    if seconds < 0.01:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e3:,.0f} ms" if seconds < 1 else f"{seconds:,.2f} s"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def fmt_ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}×"


RATIOS = (
    ("mount", "floorfs"),
    ("mount", "bindfs"),
    ("floorfs", "bindfs"),
    ("bindfs", "native"),
    ("mount", "native"),
    ("mount+direct", "floorfs"),
    ("mount+direct", "bindfs"),
)


def report(
    results: Results, backings: list[str], steps: list[tuple[Workload, bool]], z: Sizes, rounds: int, bindfs: bool
) -> None:
    for backing in backings:
        table = Table(
            title=f"Workloads on {backing}: median of {rounds} round(s); ratios are time ratios (>1 = slower)",
            title_justify="left",
            box=box.SIMPLE_HEAD,
            padding=(0, 1),
        )
        table.add_column("workload", no_wrap=True)
        for key in SUBJECTS:
            table.add_column(key, justify="right", no_wrap=True)
        for a, b in RATIOS:
            table.add_column(f"{a}/{b}", justify="right", no_wrap=True)
        for w, timed in steps:
            if not timed:
                continue
            times = {key: results.median(w.key, backing, key) for key in SUBJECTS}
            row = [sizes_label(w, z), *(fmt_time(times[key]) for key in SUBJECTS)]
            row += [fmt_ratio(ratio(times[a], times[b])) for a, b in RATIOS]
            table.add_row(*row)
        console.print(table)
    if not bindfs:
        console.print(f"[yellow]{BINDFS_MISSING}[/]")


@dataclass(frozen=True)
class Target:
    workload: str
    backing: str
    reference: str
    limit: float


def targets(steps: list[tuple[Workload, bool]], backings: list[str]) -> list[Target]:
    """Issue 12's targets for what was measured: every unmanaged workload ≤ 1.3× floorfs and ≤ 2×
    bindfs; managed atomic saves ≤ 3× floorfs on tmpfs; the sed loop ≤ 3× floorfs."""
    out = []
    for w, timed in steps:
        for backing in backings:
            if not timed:
                continue
            if not w.managed:
                out += [Target(w.key, backing, "floorfs", 1.3), Target(w.key, backing, "bindfs", 2.0)]
            elif w.key == "sed" or backing == "tmpfs":
                out.append(Target(w.key, backing, "floorfs", 3.0))
    return out


def check_targets(results: Results, steps: list[tuple[Workload, bool]], backings: list[str]) -> None:
    console.print("\n[bold]Targets[/] (issue 12)")
    for t in targets(steps, backings):
        label = f"{BY_KEY[t.workload].label} on {t.backing}: mount ≤ {t.limit}× {t.reference}"
        value = ratio(
            results.median(t.workload, t.backing, "mount"), results.median(t.workload, t.backing, t.reference)
        )
        if value is None:
            console.print(f"  n/a     {label}: {t.reference} not measured")
        elif value <= t.limit:
            console.print(f"  [green]met[/]     {label}: {value:.2f}×")
        else:
            console.print(f"  [red]MISSED[/]  {label}: {value:.2f}×")


# ---- diagnosis: request counts and profiles ---------------------------------------------------


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    beside = Path(sys.executable).parent / "py-spy"
    return found or (str(beside) if beside.exists() else None)


@contextlib.contextmanager
def profiling(pid: int | None, output: Path) -> Iterator[None]:
    """Record `pid`'s Python stacks (py-spy, raw collapsed stacks, per function) while the body runs."""
    spy = py_spy()
    if spy is None or pid is None:
        yield
        return
    argv = [spy, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--function", "--threads"]
    proc = subprocess.Popen(
        [*argv, "--nonblocking", "-o", str(output)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert proc.stdout is not None
    while (line := proc.stdout.readline()) and b"Sampling" not in line:
        pass  # it says so once it is attached
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)


def requests_of(s: Subject, dump: Path) -> dict[str, Tally]:
    """The requests the subject's daemon served since the last call (its counting layer writes them)."""
    with contextlib.suppress(FileNotFoundError):
        os.stat(s.work / os.fsdecode(DUMP_NAME))
    tallies = json.loads(dump.read_text())
    dump.unlink()
    return {k: Tally(**v) for k, v in tallies.items()}


IDLE = "EpollIOManager.get_events ("
"""The leaf frame of an event loop waiting for the kernel (py-spy --nonblocking counts it as busy)."""
OURS = ("fusefs/", "coherent_volume/", "tests/harness/floorfs.py", "WorkloadFloor.", "to_thread_run_sync (")
"""Frames worth ranking by inclusive time: the handlers, the core, and the hops to worker threads."""
ROOTS = "(fusefs/mount.py:"
"""Frames below which every request runs (the daemon's start), not worth ranking."""


@dataclass
class Profile:
    """A raw py-spy profile summed up: busy samples (idle epoll waits left out) by frame."""

    busy: int = 0
    idle: int = 0
    workers: int = 0
    """Busy samples in threads other than the main thread (trio's worker threads)."""
    own: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)

    @classmethod
    def read(cls, path: Path) -> Profile:
        p = cls()
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            thread, *frames = stack.split(";")
            if not frames or not count.isdigit():
                continue
            n = int(count)
            if frames[-1].startswith(IDLE):
                p.idle += n
                continue
            p.busy += n
            p.workers += 0 if thread.endswith("MainThread") else n
            p.own[frames[-1]] += n
            ours = {f for f in frames if f.startswith(OURS) or f.split(" (", 1)[-1].startswith(OURS)}
            for frame in {f for f in ours if ROOTS not in f}:
                p.inclusive[frame] += n
        return p


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process, all its threads (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def diagnose(
    base: dict[str, Path], out: Path, backings: list[str], steps: list[tuple[Workload, bool]], z: Sizes, a: Assets
) -> None:
    """Each workload once on counting floorfs and mount daemons (py-spy recording them when installed)."""
    out.mkdir(parents=True, exist_ok=True)
    if py_spy() is None:
        console.print("[yellow]py-spy not found (`pip install py-spy`): counting requests only, no profiles[/]")
    summary: dict[str, Any] = {}
    stack = contextlib.ExitStack()
    try:
        for backing in backings:
            subjects = make_subjects(base[backing], backing, stack, False, ("floorfs", "mount"), out)
            for w, timed in steps:
                for s in subjects:
                    dump = out / f"{backing}-{s.key}.json"
                    requests_of(s, dump)  # start afresh
                    pid = daemon_of(s)
                    watchers = watcher_pids(s.work)
                    cpu = cpu_seconds(pid), sum(map(cpu_seconds, watchers))
                    with profiling(pid if timed else None, out / f"{backing}-{w.key}-{s.key}.txt"):
                        elapsed = w.run(s, z, a)
                    if timed:
                        summary[f"{backing}/{w.key}/{s.key}"] = {
                            "seconds": elapsed,
                            "daemon_cpu": cpu_seconds(pid) - cpu[0],
                            "watcher_cpu": sum(map(cpu_seconds, watchers)) - cpu[1],
                            "requests": requests_of(s, dump),
                        }
    finally:
        ignore_signals()
        stack.close()
    (out / "requests.json").write_text(json.dumps(summary, indent=1, default=dataclasses.asdict))
    for backing in backings:
        for w, timed in steps:
            if timed:
                report_diagnosis(summary, out, backing, w)


def report_diagnosis(summary: dict[str, Any], out: Path, backing: str, w: Workload) -> None:
    floor: dict[str, Tally] = summary[f"{backing}/{w.key}/floorfs"]["requests"]
    ours: dict[str, Tally] = summary[f"{backing}/{w.key}/mount"]["requests"]
    console.print(f"\n[bold]{w.label} on {backing}[/] (one run, counted, timed and profiled)")
    for key in ("floorfs", "mount"):
        m = summary[f"{backing}/{w.key}/{key}"]
        n = sum(t.n for k, t in m["requests"].items() if k != GC)
        console.print(
            f"  {key:<8} {m['seconds']:6.2f} s wall, daemon CPU {m['daemon_cpu']:6.2f} s "
            f"({m['daemon_cpu'] / max(n, 1) * 1e6:,.0f} µs per request), watcher CPU {m['watcher_cpu']:.2f} s"
        )
    table = Table(
        caption="µs: the handler's wall time in the daemon per request; the mount's in worker threads "
        "(running its blocking work) and the hops there and back are part of it",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    columns = ("request", "floorfs", "mount", "mount/floorfs", "floorfs µs", "mount µs", "in worker µs", "hop µs")
    for column in columns:
        table.add_column(column, justify="left" if column == "request" else "right")
    kinds = sorted((set(floor) | set(ours)) - {GC}, key=lambda k: -(ours[k].seconds if k in ours else 0))
    for kind in [*kinds, "total", GC]:
        f = Tally.total(t for k, t in floor.items() if k != GC) if kind == "total" else floor.get(kind, Tally())
        m = Tally.total(t for k, t in ours.items() if k != GC) if kind == "total" else ours.get(kind, Tally())
        per = [t.seconds / t.n * 1e6 if t.n else None for t in (f, m)]
        row = [kind, f"{f.n:,}", f"{m.n:,}", fmt_ratio(ratio(m.n, f.n or None))]
        row += ["" if v is None else f"{v:,.0f}" for v in per]
        row += [f"{m.worker / m.n * 1e6:,.0f}", f"{(m.handed - m.worker) / m.n * 1e6:,.0f}"] if m.handed else ["", ""]
        table.add_row(*row)
    console.print(table)
    for key in ("floorfs", "mount"):
        path = out / f"{backing}-{w.key}-{key}.txt"
        if not path.exists():
            continue
        p = Profile.read(path)
        console.print(
            f"  {key} daemon: {p.busy:,} busy samples at 250/s ({p.workers / max(p.busy, 1):.0%} in worker threads; "
            f"{p.idle:,} more waiting in epoll); top own | top inclusive of the handlers"
        )
        for (f1, c1), (f2, c2) in zip(p.own.most_common(12), p.inclusive.most_common(12), strict=False):
            console.print(f"    {c1 / p.busy:5.1%} {f1[:82]:<82} {c2 / p.busy:5.1%} {f2[:82]}")


# ---- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny trees, one round: proves it works")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3, --quick 1)")
    parser.add_argument("--only", choices=list(BY_KEY), help="time this workload only")
    parser.add_argument("--backing", choices=["tmpfs", "disk", "both"], default="both")
    parser.add_argument("--json", type=Path, help="write every sample here")
    parser.add_argument("--diagnose", type=Path, metavar="DIR", help="count requests and profile instead of timing")
    return parser.parse_args()


def measure(args: argparse.Namespace, base: dict[str, Path], assets: Assets, z: Sizes, bindfs: bool) -> None:
    backings, steps = list(base), plan(args.only)
    if args.diagnose is not None:
        diagnose(base, args.diagnose.resolve(), backings, steps, z, assets)
        return
    rounds = args.rounds or z.rounds
    stack = contextlib.ExitStack()
    try:
        by_backing = {b: make_subjects(base[b], b, stack, bindfs, SUBJECTS, None) for b in backings}
        console.print("mounted: " + ", ".join(f"{b} ({fs_type(base[b])})" for b in backings))
        results = run_rounds(by_backing, steps, z, assets, rounds)
    finally:
        ignore_signals()  # nothing may cut the unmounts short
        stack.close()
    report(results, backings, steps, z, rounds, bindfs)
    check_targets(results, steps, backings)
    if args.json is not None:
        args.json.write_text(json.dumps({"/".join(k): v for k, v in results.samples.items()}, indent=1))


def main() -> int:
    if os.environ.get("COHERENT_AGENT") != AGENT:  # the mount reads the agent from the exec'd environment
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "COHERENT_AGENT": AGENT})
    args = parse_args()
    bindfs = shutil.which("bindfs") is not None  # a comparison subject; never installed from here
    if not bindfs:
        console.print(f"[yellow]{BINDFS_MISSING}[/]")
    z = QUICK if args.quick else FULL
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: sys.exit(143))  # unwind through the unmounts
    started = time.perf_counter()
    base: dict[str, Path] = {}
    try:
        for backing in BACKINGS if args.backing == "both" else (args.backing,):
            base[backing] = backing_dir(backing)
        inputs = next(iter(base.values())) / "inputs"
        inputs.mkdir()
        assets = Assets(inputs / "tree.tar", make_wheel(inputs, z.wheel_modules))
        make_tarball(assets.tarball, z.files)
        measure(args, base, assets, z, bindfs)
    finally:
        ignore_signals()
        for directory in base.values():
            mountpoints = [directory / name for name in ("bindfs-mnt", "floor-mnt", "cv-mnt", "cvd-mnt")]
            if check_clean(directory, mountpoints):
                shutil.rmtree(directory, ignore_errors=True)
            else:
                console.print(f"[red]left {directory} in place: something is still mounted or running[/]")
    console.print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-floor"]:
        serve_floor(sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    elif sys.argv[1:2] == ["serve-mount"]:
        serve_counted_mount(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(main())
