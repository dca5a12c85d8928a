"""FUSE benchmark: the native disk, bindfs, and coherent-volume's mount (unmanaged and managed files), side by side.

Subjects, each with its own backing directory under one base directory (BENCH_DIR, default the
system's temporary directory), so all sit on the same kind of file system:

  native       the backing directory itself
  bindfs       `bindfs SRC MNT` of a backing directory (default options); skipped, with the command
               that installs it, when bindfs is missing
  cv unmanaged this project's mount, files outside the managed globs (passthrough)
  cv managed   this project's mount, files under `plans/` (the coherence protocol)
  floor        floorfs.py (beside this file): a do-nothing passthrough on the same binding (pyfuse3 + trio),
               so unm/floor is the cost of our handlers and floor/bindfs the cost of the binding

Operations (time per operation; sequential I/O as throughput):

  stat                 os.stat of a 4 KiB file
  open+read+close      of a 4 KiB file
  in-place write       open an existing 4 KiB file O_WRONLY, write 4 KiB at offset 0, close
  atomic save          create a temp beside the target, write 4 KiB, fsync, rename over the target
  seq write / read     one file in 1 MiB blocks (create+write+close, no fsync / open+read+close);
                       an untimed sync() first so earlier dirty data is not flushed inside the window
  git status           on a 5,000-file tree created once per subject (git init, add, commit)
  tree walk            os.walk + lstat of every entry of that tree (its .git included)

The protocol refuses to overwrite a managed file that the writer has not read at its current
version, so managed in-place writes and atomic saves read the target first (once per
iteration, untimed), and the whole run is one agent: the script re-executes itself with
COHERENT_AGENT=bench. The git tree lives in unmanaged directories only, so git status and the
walk have no managed (or floor) variant. Reads run with a warm page cache: this measures the cost of each
layer, not the disk.

Every operation is run for every subject in turn, subject order rotated each round, and the
median round is reported, so machine noise hits all subjects alike. Ratios are time ratios
(>1 is slower). Every mount is unmounted whatever happens (mounts.unmount_and_reap: fusermount3 -u,
then -uz; its daemon is waited for), and the kernel's mount table is checked at the end.

    .venv/bin/python scripts/bench_fuse.py [--rounds N] [--quick]
    .venv/bin/python -m tests.harness.bench_fuse [--rounds N] [--quick]     (the same, from the repo root)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from coherent_volume.mounts import fuse_mounts

from . import CLI, REPO, child
from .mounts import Mount, fuse_mounts_under, serving_pids, unmount_and_reap

AGENT = "bench"
MANAGED_GLOB = "plans/**"
KiB, MiB = 1024, 1024 * 1024
GIT = ["git", "-c", "safe.directory=*", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, "GIT_TERMINAL_PROMPT": "0"}

console = Console(width=176)


@dataclass(frozen=True)
class Sizes:
    """Sizes and loop counts of one run (full or --quick)."""

    seq: int
    seq_managed: int
    tree_files: int
    loops: dict[str, int]
    small: int = 4 * KiB
    block: int = MiB
    rounds: int = 3


FULL = Sizes(
    seq=256 * MiB,
    seq_managed=256 * MiB,
    tree_files=5000,
    loops={"stat": 10000, "read": 2000, "inplace": 300, "save": 200, "git": 5, "walk": 3},
)
QUICK = Sizes(
    seq=16 * MiB,
    seq_managed=16 * MiB,
    tree_files=500,
    rounds=2,
    loops={"stat": 500, "read": 200, "inplace": 20, "save": 10, "git": 2, "walk": 2},
)


@dataclass(frozen=True)
class Subject:
    key: str
    label: str
    work: Path
    """Directory of the small and sequential files."""
    tree: Path | None
    """The 5,000-file git tree (None: not measured for this subject)."""
    managed: bool = False


# ---- timing ---------------------------------------------------------------------------------


def per_op(n: int, op: Callable[[], object], before: Callable[[], object] | None = None) -> float:
    """Seconds per call of `op`, timing only `op` (not `before`)."""
    total = 0.0
    for _ in range(n):
        if before is not None:
            before()
        t0 = time.perf_counter()
        op()
        total += time.perf_counter() - t0
    return total / n


def payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def read_small(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, size)
    finally:
        os.close(fd)


def write_in_place(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def atomic_save(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


# ---- operations: each returns seconds per operation (sequential I/O: seconds per MiB) --------------


def op_stat(s: Subject, z: Sizes) -> float:
    path = s.work / "small.bin"
    return per_op(z.loops["stat"], lambda: os.stat(path))


def op_read(s: Subject, z: Sizes) -> float:
    path = s.work / "small.bin"
    return per_op(z.loops["read"], lambda: read_small(path, z.small))


def _read_first(s: Subject, path: Path, z: Sizes) -> Callable[[], object] | None:
    """The untimed read that a managed overwrite needs (the protocol's precondition)."""
    return (lambda: read_small(path, z.small)) if s.managed else None


def op_inplace(s: Subject, z: Sizes) -> float:
    path, data = s.work / "inplace.bin", payload(z.small)
    return per_op(z.loops["inplace"], lambda: write_in_place(path, data), _read_first(s, path, z))


def op_save(s: Subject, z: Sizes) -> float:
    path, data = s.work / "save.bin", payload(z.small)
    return per_op(z.loops["save"], lambda: atomic_save(path, data), _read_first(s, path, z))


def seq_size(s: Subject, z: Sizes) -> int:
    return z.seq_managed if s.managed else z.seq


def op_seq_write(s: Subject, z: Sizes) -> float:
    path, size, block = s.work / "big.bin", seq_size(s, z), payload(z.block)
    if path.exists():
        path.unlink()  # a managed file may be created without a prior read
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size // z.block):
            os.write(fd, block)
    finally:
        os.close(fd)
    return (time.perf_counter() - t0) / (size / MiB)


def op_seq_read(s: Subject, z: Sizes) -> float:
    path, buf = s.work / "big.bin", bytearray(z.block)
    os.sync()
    t0 = time.perf_counter()
    total = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - t0
    if total != seq_size(s, z):
        raise RuntimeError(f"{s.label}: read {total} bytes of {path}, expected {seq_size(s, z)}")
    return elapsed / (total / MiB)


def git(tree: Path, *args: str) -> None:
    subprocess.run(
        [*GIT, *args],
        cwd=tree,
        env={**os.environ, **GIT_ENV},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def op_git_status(s: Subject, z: Sizes) -> float:
    assert s.tree is not None
    return per_op(z.loops["git"], lambda: git(s.tree, "status"))


def walk(top: Path) -> int:
    entries = 0
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            os.lstat(os.path.join(directory, name))
            entries += 1
    return entries


def op_walk(s: Subject, z: Sizes) -> float:
    assert s.tree is not None
    return per_op(z.loops["walk"], lambda: walk(s.tree))


@dataclass(frozen=True)
class Op:
    key: str
    label: str
    run: Callable[[Subject, Sizes], float]
    throughput: bool = False
    needs_tree: bool = False


SETUP = Op("setup", "tree setup (once; +git commit)", lambda s, z: 0.0, needs_tree=True)
"""Reporting only: `make_tree`'s time, measured once per subject outside the rounds."""


def ops_for(z: Sizes) -> list[Op]:
    seq = f"{z.seq // MiB} MiB" + ("" if z.seq_managed == z.seq else f" (managed {z.seq_managed // MiB} MiB)")
    return [
        Op("stat", "stat", op_stat),
        Op("read", "open+read+close 4K", op_read),
        Op("inplace", "in-place write 4K", op_inplace),
        Op("save", "atomic save 4K", op_save),
        Op("seq_write", f"seq write {seq}", op_seq_write, throughput=True),
        Op("seq_read", f"seq read {seq}", op_seq_read, throughput=True),
        Op("git", f"git status ({z.tree_files:,} files)", op_git_status, needs_tree=True),
        Op("walk", "tree walk (walk+lstat)", op_walk, needs_tree=True),
    ]


# ---- setup ----------------------------------------------------------------------------------


def make_tree(top: Path, files: int) -> float:
    """Create a `files`-file tree (100 per directory) and commit it to git; returns the seconds taken."""
    t0 = time.perf_counter()
    top.mkdir()
    for i in range(files):
        directory = top / f"d{i // 100:03d}"
        if i % 100 == 0:
            directory.mkdir()
        (directory / f"f{i % 100:02d}.txt").write_text(f"file {i}\n" * 8)
    git(top, "init", "-q")
    git(top, "add", "-A")
    git(top, "commit", "-q", "-m", "tree")
    elapsed = time.perf_counter() - t0
    time.sleep(1.1)  # past the index's timestamp: no racily-clean entries
    git(top, "status")  # untimed: lets git refresh and rewrite its index once
    return elapsed


def prepare(s: Subject, z: Sizes) -> float | None:
    """Create the subject's files (through its own path); returns the tree setup time, if any."""
    s.work.mkdir(parents=True, exist_ok=True)
    for name in ("small.bin", "inplace.bin", "save.bin"):
        (s.work / name).write_bytes(payload(z.small))  # new files: no prior read needed
    if read_small(s.work / "small.bin", z.small) != payload(z.small):
        raise RuntimeError(f"{s.label}: reading back small.bin gave other bytes")
    return make_tree(s.tree, z.tree_files) if s.tree is not None else None


# ---- mounts ---------------------------------------------------------------------------------


def unmount(mountpoint: Path) -> None:
    """Unmount and reap (mounts.unmount_and_reap), saying what it took beyond a plain unmount."""
    done = unmount_and_reap(mountpoint, wait=15)
    if done.lazy:
        console.print(f"[yellow]{mountpoint} stayed busy: unmounted lazily[/]")
    for pid in done.killed:
        console.print(f"[red]process {pid} of {mountpoint} still running after unmount: killed it[/]")


BINDFS_MISSING = "bindfs is not installed: `apt-get install bindfs` adds it to the comparison (skipped this run)"


def mount_bindfs(src: Path, mountpoint: Path, stack: contextlib.ExitStack) -> None:
    src.mkdir()
    mountpoint.mkdir()
    stack.callback(unmount, mountpoint)  # registered first: a half-made mount is cleaned up too
    subprocess.run(["bindfs", str(src), str(mountpoint)], check=True, capture_output=True)


def mount_volume(root: Path, mountpoint: Path, stack: contextlib.ExitStack) -> None:
    root.mkdir()
    mountpoint.mkdir()
    subprocess.run([CLI, "init", str(root), "--managed", MANAGED_GLOB], check=True, capture_output=True)
    stack.callback(unmount, mountpoint)
    Mount(root, mountpoint, agent=AGENT).mount()


def mount_floor(src: Path, mountpoint: Path, stack: contextlib.ExitStack, argv: list[str] | None = None) -> int:
    """A floor daemon runs in the foreground: start it (`argv`, by default floorfs over `src` at
    `mountpoint`), then wait until its mount answers; its pid."""
    src.mkdir()
    mountpoint.mkdir()
    stack.callback(unmount, mountpoint)
    proc = subprocess.Popen(
        argv or child("floorfs", str(src), str(mountpoint)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 30
    while str(mountpoint) not in fuse_mounts(None):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"floorfs did not mount: {proc.communicate()[1].decode(errors='replace').strip()}")
        time.sleep(0.05)
    return proc.pid


def make_subjects(base: Path, stack: contextlib.ExitStack, bindfs: bool) -> list[Subject]:
    if bindfs:
        mount_bindfs(base / "bindfs-src", base / "bindfs-mnt", stack)
    mount_volume(base / "volume", base / "cv-mnt", stack)
    mount_floor(base / "floor-src", base / "floor-mnt", stack)
    cv = base / "cv-mnt"
    return [
        Subject("native", "native", base / "native" / "work", base / "native" / "tree"),
        *([Subject("bindfs", "bindfs", base / "bindfs-mnt" / "work", base / "bindfs-mnt" / "tree")] if bindfs else []),
        Subject("cv", "cv unmanaged", cv / "work", cv / "tree"),
        Subject("cvm", "cv managed", cv / "plans", None, managed=True),
        Subject("floor", "pyfuse3 floor", base / "floor-mnt" / "work", None),
    ]


# ---- running and reporting ----------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    """(operation, subject) -> one value per round (seconds per operation, or per MiB)."""

    def add(self, op: str, subject: str, seconds: float) -> None:
        self.samples.setdefault((op, subject), []).append(seconds)

    def median(self, op: str, subject: str) -> float | None:
        values = self.samples.get((op, subject))
        return statistics.median(values) if values else None


def run_rounds(subjects: list[Subject], ops: list[Op], z: Sizes, rounds: int) -> Results:
    results = Results()
    for s in subjects:
        elapsed = prepare(s, z)
        if elapsed is not None:
            results.add(SETUP.key, s.key, elapsed)
    console.print("setup done")
    for r in range(rounds):
        t0 = time.perf_counter()
        order = subjects[r % len(subjects) :] + subjects[: r % len(subjects)]
        for op in ops:
            for s in order:
                if s.tree is not None or not op.needs_tree:
                    results.add(op.key, s.key, op.run(s, z))
        console.print(f"round {r + 1}/{rounds} done in {time.perf_counter() - t0:.1f} s")
    return results


def fmt_time(seconds: float | None, throughput: bool) -> str:
    if seconds is None:
        return "n/a"
    if throughput:
        return f"{1 / seconds:,.0f} MiB/s"
    if seconds < 1e-3:
        return f"{seconds * 1e6:,.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:,.2f} ms"
    return f"{seconds:,.2f} s"


def fmt_ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return ""
    ratio = a / b
    text = f"{ratio:.2f}×"
    return f"[red]{text}[/]" if ratio > 3 else text


RATIOS = [
    ("bindfs", "native"),
    ("cv", "bindfs"),
    ("cv", "native"),
    ("cvm", "bindfs"),
    ("cvm", "native"),
    ("floor", "bindfs"),
    ("cv", "floor"),
]
SHORT = {"native": "native", "bindfs": "bindfs", "cv": "unm", "cvm": "man", "floor": "floor"}
"""Ratio column headers: unm / man are this mount's unmanaged / managed files."""


def report(results: Results, subjects: list[Subject], ops: list[Op], z: Sizes, rounds: int) -> None:
    table = Table(
        title=f"FUSE benchmark: median of {rounds} rounds (ratios are time ratios, >1 = slower)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        padding=(0, 1),
    )
    table.add_column("operation", no_wrap=True)
    for s in subjects:
        table.add_column(s.label, justify="right", no_wrap=True)
    measured = {s.key for s in subjects}
    ratios = [(a, b) for a, b in RATIOS if a in measured and b in measured]
    for a, b in ratios:
        table.add_column(f"{SHORT[a]}\n/{b}", justify="right", no_wrap=True)
    for op in [*ops, SETUP]:
        row = [op.label] + [fmt_time(results.median(op.key, s.key), op.throughput) for s in subjects]
        row += [fmt_ratio(results.median(op.key, a), results.median(op.key, b)) for a, b in ratios]
        table.add_row(*row)
    console.print(table)


@dataclass(frozen=True)
class Target:
    label: str
    op: str
    subject: str
    reference: str
    limit: float
    """Maximum time ratio subject/reference."""
    throughput: bool = False


TARGETS = [
    *[
        Target(f"cv unmanaged {name} ≤ 2× bindfs", op, "cv", "bindfs", 2.0)
        for op, name in [
            ("stat", "stat"),
            ("read", "open+read+close"),
            ("inplace", "in-place write"),
            ("save", "atomic save"),
        ]
    ],
    Target("cv managed atomic save ≤ 3× bindfs", "save", "cvm", "bindfs", 3.0),
    Target("cv unmanaged stat ≤ 2× native", "stat", "cv", "native", 2.0),
    Target("cv unmanaged seq read throughput ≥ 0.7× bindfs", "seq_read", "cv", "bindfs", 1 / 0.7, throughput=True),
]


def check_targets(results: Results) -> None:
    console.print("\n[bold]Targets[/]")
    for t in TARGETS:
        a, b = results.median(t.op, t.subject), results.median(t.op, t.reference)
        if b is None and t.reference == "bindfs":
            console.print(f"  n/a     {t.label}: bindfs is not installed")
            continue
        if a is None or b is None:
            console.print(f"  MISSED  {t.label}: not measured")
            continue
        ratio = a / b
        met = ratio <= t.limit
        shown = f"{b / a:.2f}× throughput" if t.throughput else f"{ratio:.2f}×"
        floor = results.median(t.op, "floor")
        if floor is not None and t.reference == "bindfs" and not t.throughput:
            shown += f" (the pyfuse3 floor alone: {floor / b:.2f}×)"
        console.print(f"  {'[green]met[/]   ' if met else '[red]MISSED[/]'}  {t.label}: {shown}")


def check_clean(base: Path, mountpoints: list[Path]) -> bool:
    """After unmounting: no FUSE mount under `base`, no daemon left; prints every FUSE mount there is."""
    mounts = fuse_mounts(None)
    ours = fuse_mounts_under(base)
    daemons = [pid for m in mountpoints for pid in serving_pids(m)]
    console.print(f"\nFUSE mounts: {', '.join(f'{m} ({source})' for m, source in mounts.items()) or 'none'}")
    console.print(f"left behind: {len(ours)} mounts of this run, {len(daemons)} daemons")
    return not ours and not daemons


def ignore_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="rounds per subject (default 3, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="small sizes for a fast smoke run")
    return parser.parse_args()


def measure(base: Path, z: Sizes, rounds: int, bindfs: bool) -> None:
    """Mount, run the rounds, unmount (whatever happens), then report."""
    ops, stack = ops_for(z), contextlib.ExitStack()
    try:
        subjects = make_subjects(base, stack, bindfs)
        results = run_rounds(subjects, ops, z, rounds)
    finally:
        ignore_signals()  # nothing may cut the unmounts short
        stack.close()
    report(results, subjects, ops, z, rounds)
    check_targets(results)


def main() -> int:
    if os.environ.get("COHERENT_AGENT") != AGENT:  # the mount reads the agent from the exec'd environment
        # the same command line again (`python scripts/bench_fuse.py …` or `python -m …`)
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "COHERENT_AGENT": AGENT})
    args = parse_args()
    bindfs = shutil.which("bindfs") is not None  # the comparison subject; never installed from here
    if not bindfs:
        console.print(f"[yellow]{BINDFS_MISSING}[/]")
    z = QUICK if args.quick else FULL
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: sys.exit(143))  # unwind through the unmounts
    base = Path(tempfile.mkdtemp(prefix="cv-fuse-bench-", dir=os.environ.get("BENCH_DIR")))
    started = time.perf_counter()
    try:
        measure(base, z, args.rounds or z.rounds, bindfs)
    finally:
        ignore_signals()
        if check_clean(base, [base / "bindfs-mnt", base / "cv-mnt", base / "floor-mnt"]):
            shutil.rmtree(base, ignore_errors=True)
        else:
            console.print(f"[red]left {base} in place: something is still mounted or running[/]")
    console.print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
