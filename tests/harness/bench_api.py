"""API benchmark: plain file I/O, coherent-volume, and agent-coherence 0.15.0, side by side.

One run on one machine, 4 KiB managed files. Each subject is measured in alternating rounds
(ours, peer, ours, peer, ...) and the median round is reported, so drift hits both alike.

The content store's cost (issue 13: every version's bytes retained) has a table of its own, in
which each of our operations and the plain one it is set against are timed alternately, one
operation at a time, in one process: our write against the raw durable write (temp file, fsync,
rename, fsync of the directory), our tracked read of an unchanged file against `read_bytes`.
`history` and `diff` are timed on a file with 10,000 versions (`--versions`), made through the
API once per run.

The peer runs from its own venv, .bench/peer-venv in the repo (never the project's). This script
installs nothing: without that venv it prints the command that makes it (PEER_INSTALL) and leaves
the peer's column out.

    .venv/bin/python scripts/bench_api.py [--rounds 3] [--scale 100000]
    .venv/bin/python -m tests.harness.bench_api [...]       (the same, from the repo root)

Its child processes run this module the same way (`python -m tests.harness.bench_api`, in the repo
root), the peer's with the peer venv's interpreter: this module imports only the standard library
at the top.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from . import REPO, child

PEER_VENV = REPO / ".bench" / "peer-venv"
PEER = "agent-coherence==0.15.0"
PEER_INSTALL = f"python3 -m venv .bench/peer-venv && .bench/peer-venv/bin/pip install {PEER}"
"""Run in the repo root, once, to add the peer's column."""
MANAGED = ("plans/**",)
P = "plans/f0.md"
SIZE = 4096
READS, WRITES, CONTENDERS, UPDATES_EACH = 2000, 200, 4, 50
LINES = 100
"""Lines of the text file whose many versions `history` and `diff` are timed on (each version
changes one line)."""
CALLS = 20
"""Calls of `history` and of `diff` timed per round."""


def per_op(n: int, op: Callable[[int], object], before: Callable[[int], object] | None = None) -> float:
    """Seconds per call of `op`, timing only `op` (not `before`)."""
    total = 0.0
    for i in range(n):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        op(i)
        total += time.perf_counter() - t0
    return total / n


def median_call(n: int, op: Callable[[], object]) -> tuple[float, float]:
    """Seconds the median of `n` calls of `op` took: wall clock, and CPU time of this process (what
    other load on the machine does not add to)."""
    wall, cpu = [], []
    for _ in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        op()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def payload(i: int) -> bytes:
    return (b"%08d" % i) * (SIZE // 8)


def new_root() -> str:
    """A fresh directory with plans/ in it, removed when this process exits."""
    root = tempfile.mkdtemp(prefix="cv-bench-", dir=os.environ.get("BENCH_DIR"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    os.makedirs(os.path.join(root, "plans"))
    return root


# ---- plain file I/O (the floor) -------------------------------------------------------


def raw_write(path: Path, data: bytes, dir_fsync: bool = False) -> None:
    """The raw write: temp file, fsync, rename over `path` (and with `dir_fsync`, fsync of the
    directory: then it is as durable as ours)."""
    tmp = str(path) + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)
    if dir_fsync:
        dfd = os.open(os.path.dirname(path), os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)


def measure_plain() -> dict[str, float]:
    root = new_root()
    path = Path(root, P)
    path.write_bytes(payload(0))
    return {
        "read": per_op(READS, lambda i: path.read_bytes()),
        "write": per_op(WRITES, lambda i: raw_write(path, payload(i))),
        "write+dirsync": per_op(WRITES, lambda i: raw_write(path, payload(i), True)),
    }


# ---- coherent-volume ------------------------------------------------------------------


def measure_ours(root: str | None = None) -> dict[str, float]:
    from coherent_volume import CoherentVolume

    root = root or new_root()
    with CoherentVolume(root, managed=MANAGED, agent="a") as a, CoherentVolume(root, agent="b") as b:
        a.write(P, payload(0))
        a.read(P)
        b.read(P)
        out = {"read": per_op(READS, lambda i: a.read(P))}
        out["read after peer commit"] = per_op(
            WRITES, lambda i: a.read(P), before=lambda i: (b.read(P), b.write(P, payload(i + 1)))
        )
        out["write"] = per_op(WRITES, lambda i: a.write(P, payload(i)), before=lambda i: a.read(P))
        out["write_cas"] = per_op(WRITES, lambda i: a.write_cas(P, a.version(P), payload(i + 7)))
    return out


STORE_COST = {
    "write (content store on)": "temp+fsync+rename+dir fsync",
    "tracked read of an unchanged file": "read_bytes",
}
"""Our operation -> the plain one it is set against, op by op (`measure_interleaved`)."""


def timed(op: Callable[[], object]) -> tuple[float, float]:
    """Seconds `op` took: wall clock, and CPU time of this thread (user and system: what the machine's
    other load stretches into more wall clock when the CPUs are busy)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    op()
    return time.perf_counter() - t0, time.thread_time() - c0


def measure_interleaved() -> dict[str, float]:
    """Our write (every version's bytes retained) and the raw durable write, and our tracked read of
    an unchanged file and a plain `read_bytes`, each pair timed alternately one operation at a
    time (which goes first alternates too), so whatever else the machine does hits both alike.
    The median operation of each (seconds), and under "cpu NAME" its mean CPU time."""
    from coherent_volume import CoherentVolume

    plain = Path(new_root(), P)
    plain.write_bytes(payload(0))
    times: dict[str, list[float]] = {name: [] for pair in STORE_COST.items() for name in pair}
    cpu: dict[str, list[float]] = {name: [] for name in times}

    def pair(i: int, ours: tuple[str, Callable[[], object]], theirs: tuple[str, Callable[[], object]]) -> None:
        for name, op in (ours, theirs) if i % 2 else (theirs, ours):
            wall, used = timed(op)
            times[name].append(wall)
            cpu[name].append(used)

    with CoherentVolume(new_root(), managed=MANAGED, agent="a") as a:
        a.write(P, payload(0))
        for i in range(WRITES):
            data = payload(i + 1)
            a.read(P)  # the view a write needs; not timed
            pair(
                i,
                ("write (content store on)", partial(a.write, P, data)),
                ("temp+fsync+rename+dir fsync", partial(raw_write, plain, data, True)),
            )
        a.read(P)
        for i in range(READS):
            pair(i, ("tracked read of an unchanged file", partial(a.read, P)), ("read_bytes", plain.read_bytes))
    return {name: statistics.median(t) for name, t in times.items()} | {
        f"cpu {name}": statistics.mean(t) for name, t in cpu.items()
    }


def text_version(i: int) -> bytes:
    """Version `i` of the many-versions file: LINES lines, line `i % LINES` saying it changed at `i`."""
    lines = [f"line {n}: unchanged since the start\n" for n in range(LINES)]
    lines[i % LINES] = f"line {i % LINES}: changed by version {i}\n"
    return "".join(lines).encode()


def measure_history(versions: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Make a file with `versions` versions through the API, then time, in `rounds` rounds of CALLS
    calls each: `history`, `diff` of the last two versions, `diff` from an agent's view at version
    1 to the current version (its default), and `read_version` of the first version. Per round the
    median call, [wall, CPU] seconds; also the seconds the commits took."""
    from coherent_volume import CoherentVolume

    root = new_root()
    path = "plans/many.md"
    with CoherentVolume(root, managed=MANAGED, agent="a") as a, CoherentVolume(root, agent="old") as old:
        t0 = time.perf_counter()
        a.write(path, text_version(0))
        old.read(path)  # its view stays at version 1
        for i in range(1, versions):
            a.write(path, text_version(i))
        made = time.perf_counter() - t0
        assert a.version(path) == versions
        calls = {
            "history": lambda: a.history(path),
            "diff of the last two versions": lambda: a.diff(path, versions - 1, versions),
            "diff from a view at v1 (default)": lambda: old.diff(path),
            "read_version of v1": lambda: a.read_version(path, 1),
        }
        assert len(calls["history"]()) == versions and calls["diff from a view at v1 (default)"]()
        out: dict[str, list[tuple[float, float]]] = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                out[name].append(median_call(CALLS, call))
    out["commits"] = [(made, made)]
    return out


def contend_ours(root: str, count: int) -> None:
    from coherent_volume import CoherentVolume

    with CoherentVolume(root) as v:
        for _ in range(count):
            v.update("plans/counter", lambda old: str(int(old or b"0") + 1).encode(), retries=100_000)


# ---- agent-coherence 0.15.0 (runs inside its own venv) --------------------------------


def _peer_volume(root: str):  # type: ignore[no-untyped-def]
    from ccs.adapters.claude_code.lifecycle import LifecycleConfig
    from ccs.adapters.coherent_volume import CoherentVolume

    return CoherentVolume(root, managed=MANAGED, config=LifecycleConfig(idle_shutdown_sec=0))


def measure_peer(root: str | None = None) -> dict[str, float]:
    root = root or new_root()
    a, b = _peer_volume(root), _peer_volume(root)
    a.write(P, payload(0))
    a.read(P)
    out = {"read": per_op(READS, lambda i: a.read(P))}
    out["read after peer commit"] = per_op(
        WRITES, lambda i: a.read(P), before=lambda i: (b.reacquire(P), b.write(P, payload(i + 1)))
    )
    a.reacquire(P)
    out["write"] = per_op(WRITES, lambda i: a.write(P, payload(i)), before=lambda i: a.read(P))
    out["write_cas"] = per_op(WRITES, lambda i: a.write_cas_at(P, a.read_with_version(P)[1], payload(i + 7)))
    return out


def contend_peer(root: str, count: int) -> None:
    from ccs.core.exceptions import CasRetriesExhausted, ViewWedged

    v = _peer_volume(root)
    for _ in range(count):
        while True:
            try:
                v.write_cas("plans/counter", lambda old: str(int(old or b"0") + 1).encode())
                break
            except (CasRetriesExhausted, ViewWedged):
                continue


# ---- orchestration --------------------------------------------------------------------


def find_peer() -> str | None:
    """The peer venv's interpreter; None (having said how to make it) when there is none."""
    python = PEER_VENV / "bin" / "python"
    if python.exists():
        return str(python)
    print(
        f"{PEER} is not installed, so its column is left out. To add it, run once in the repo root:\n"
        f"    {PEER_INSTALL}",
        file=sys.stderr,
    )
    return None


def run_child(python: str, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        child("bench_api", *args, python=python), capture_output=True, text=True, check=False, cwd=REPO
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def contention(python: str, subject: str) -> float:
    """Updates per second with CONTENDERS processes incrementing one counter; checks it is exact."""
    root = new_root()
    Path(root, "plans/counter").write_bytes(b"0")
    host = None
    if subject == "peer":  # the first peer instance hosts its coordinator: keep one alive meanwhile
        host = subprocess.Popen(
            child("bench_api", "--peer-host", root, python=python), stdout=subprocess.PIPE, text=True, cwd=REPO
        )
        host.stdout.readline()
    else:
        subprocess.run(
            [
                python,
                "-c",
                f"from coherent_volume import CoherentVolume as V; V({root!r}, managed={MANAGED!r}).close()",
            ],
            check=True,
        )
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(child("bench_api", "--contend", subject, root, str(UPDATES_EACH), python=python), cwd=REPO)
        for _ in range(CONTENDERS)
    ]
    for p in procs:
        if p.wait() != 0:
            raise SystemExit(f"{subject} contender failed")
    elapsed = time.perf_counter() - t0
    final = int(Path(root, "plans/counter").read_bytes())
    if host is not None:
        host.kill()
        host.wait()
    if final != CONTENDERS * UPDATES_EACH:
        raise SystemExit(f"{subject}: counter is {final}, expected {CONTENDERS * UPDATES_EACH}: lost updates")
    return CONTENDERS * UPDATES_EACH / elapsed


def scaling(files: int) -> dict[str, float]:
    """Our per-operation cost with `files` managed files in the registry."""
    from coherent_volume.core import open_core

    root = new_root()
    for i in range(files):
        sub = Path(root, "plans", f"d{i // 1000}")
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.md").write_bytes(b"x")
    core = open_core(root, MANAGED)
    core.scan()
    core.registry.close()
    os.sync()  # let the set-up's writeback finish before timing fsync-bound operations
    return measure_ours(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--scale", type=int, default=100_000, help="registry size for the flatness check")
    parser.add_argument(
        "--versions", type=int, default=10_000, help="versions of the file that history and diff are timed on"
    )
    parser.add_argument(
        "--store-only",
        action="store_true",
        help="only the content store's table: --rounds runs of our write and tracked read against plain I/O",
    )
    parser.add_argument("--history", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("ours", "peer", "plain", "interleaved"), help=argparse.SUPPRESS)
    parser.add_argument("--contend", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--peer-host", help=argparse.SUPPRESS)
    parser.add_argument("--scaling", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure = {
            "plain": measure_plain,
            "ours": measure_ours,
            "peer": measure_peer,
            "interleaved": measure_interleaved,
        }
        print(json.dumps(measure[args.measure]()))
        return
    if args.scaling:
        print(json.dumps(scaling(args.scaling)))
        return
    if args.store_only:
        report_store([run_child(sys.executable, "--measure", "interleaved") for _ in range(args.rounds)])
        return
    if args.history:
        print(json.dumps(measure_history(args.history, args.rounds)))
        return
    if args.contend:
        subject, root, count = args.contend
        (contend_ours if subject == "ours" else contend_peer)(root, int(count))
        return
    if args.peer_host:
        _peer_volume(args.peer_host)
        print("ready", flush=True)
        time.sleep(3600)
        return

    ours_py, peer_py = sys.executable, find_peer()
    subjects = [("plain", ours_py), ("ours", ours_py)] + ([("peer", peer_py)] if peer_py else [])
    measured = [*subjects, ("interleaved", ours_py)]
    rounds: dict[str, list[dict[str, float]]] = {subject: [] for subject, _ in measured}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for subject, python in measured:
            rounds[subject].append(run_child(python, "--measure", subject))
    med = {s: {op: statistics.median(r[op] for r in rs) for op in rs[0]} for s, rs in rounds.items()}
    print("contention", file=sys.stderr)
    upd = {s: statistics.median(contention(py, s) for _ in range(args.rounds)) for s, py in subjects if s != "plain"}
    print(f"scaling: 100 and {args.scale} managed files, alternating", file=sys.stderr)
    sizes: dict[int, list[dict[str, float]]] = {100: [], args.scale: []}
    for _ in range(args.rounds):
        for files in sizes:
            sizes[files].append(run_child(ours_py, "--scaling", str(files)))
    small, large = ({op: statistics.median(r[op] for r in sizes[n]) for op in sizes[n][0]} for n in sizes)
    print(f"history and diff: {args.versions:,} versions", file=sys.stderr)
    many = run_child(ours_py, "--history", str(args.versions), "--rounds", str(args.rounds))
    report(med, upd, small, large, args.scale, many, args.versions)


def store_cost(side: dict[str, float], checks: list[tuple[str, bool | None]]) -> Any:
    """The content store's table (a rich Table) from `measure_interleaved`'s medians; its targets
    are added to `checks`."""
    from rich.table import Table

    cost = Table(
        title="the content store's cost: ours and plain timed alternately, op by op (median of rounds of median ops)",
        title_justify="left",
        header_style="bold",
    )
    for c in ("operation", "µs", "set against", "µs ", "ours / plain (throughput)", "target"):
        cost.add_column(c, justify="left" if c in ("operation", "set against", "target") else "right")
    for (op, against), floor in zip(STORE_COST.items(), (0.8, 0.5), strict=True):
        ratio = side[against] / side[op]
        cost.add_row(op, f"{side[op] * 1e6:.1f}", against, f"{side[against] * 1e6:.1f}", f"{ratio:.2f}×", f"≥ {floor}×")
        checks.append((f"{op} ≥ {floor}× {against} (op by op)", ratio >= floor))
    return cost


def report_store(rounds: list[dict[str, float]]) -> None:
    """`--store-only`: each round's ratios, then the table of their medians and its targets."""
    from rich.console import Console

    console = Console(width=160)
    for n, side in enumerate(rounds, 1):
        ratios = ", ".join(f"{op} {side[against] / side[op]:.2f}× {against}" for op, against in STORE_COST.items())
        console.print(f"round {n}: {ratios}", markup=False)
        cpu = ", ".join(
            f"{op} {side[f'cpu {op}'] * 1e6:.0f} µs, {against} {side[f'cpu {against}'] * 1e6:.0f} µs"
            for op, against in STORE_COST.items()
        )
        console.print(f"         CPU per operation (mean): {cpu}", markup=False)
    checks: list[tuple[str, bool | None]] = []
    console.print(store_cost({op: statistics.median(r[op] for r in rounds) for op in rounds[0]}, checks))
    for name, ok in checks:
        console.print(f"{'met    ' if ok else 'MISSED '} {name}", markup=False)


def report(
    med: dict[str, dict[str, float]],
    upd: dict[str, float],
    small: dict[str, float],
    large: dict[str, float],
    scale: int,
    many: dict[str, list[tuple[float, float]]],
    versions: int,
) -> None:
    """The tables and the targets; without the peer (`med` and `upd` lack "peer") its columns say n/a."""
    from rich.console import Console
    from rich.table import Table

    ops = lambda s: 1 / s  # noqa: E731
    ours, plain, peer = med["ours"], med["plain"], med.get("peer", {})
    t = Table(title="API operations per second (4 KiB, median of rounds)", title_justify="left", header_style="bold")
    for c in (
        "operation",
        "plain I/O",
        "coherent-volume",
        "agent-coherence 0.15.0",
        "ours / peer",
        "ours / plain",
        "target",
    ):
        t.add_column(c, justify="left" if c in ("operation", "target") else "right")
    rows = [
        ("read (unchanged file)", plain["read"], ours["read"], peer.get("read"), "≥50× peer, ≥0.25× plain read_bytes"),
        (
            "read after a peer's commit",
            plain["read"],
            ours["read after peer commit"],
            peer.get("read after peer commit"),
            "",
        ),
        ("write", plain["write"], ours["write"], peer.get("write"), "≥7× peer, ≥0.75× temp+fsync+rename"),
        ("write_cas", plain["write"], ours["write_cas"], peer.get("write_cas"), ""),
    ]
    for name, pl, us, other, target in rows:
        t.add_row(
            name,
            f"{ops(pl):,.0f}",
            f"{ops(us):,.0f}",
            f"{ops(other):,.0f}" if other else "n/a",
            f"{other / us:.1f}×" if other else "n/a",
            f"{pl / us:.2f}×",
            target,
        )
    t.add_row("  plain temp+fsync+rename+dir fsync", f"{ops(plain['write+dirsync']):,.0f}", "", "", "", "", "reference")
    peer_upd = upd.get("peer")
    t.add_row(
        f"update, {CONTENDERS} contending processes",
        "-",
        f"{upd['ours']:,.0f}",
        f"{peer_upd:,.0f}" if peer_upd else "n/a",
        f"{upd['ours'] / peer_upd:.1f}×" if peer_upd else "n/a",
        "",
        "exact final counter (checked)",
    )
    checks: list[tuple[str, bool | None]] = [
        ("read ≥ 50× peer", peer["read"] / ours["read"] >= 50 if peer else None),
        ("read ≥ 25% of plain", plain["read"] / ours["read"] >= 0.25),
        ("write ≥ 7× peer", peer["write"] / ours["write"] >= 7 if peer else None),
        ("write ≥ 75% of temp+fsync+rename", plain["write"] / ours["write"] >= 0.75),
    ]
    cost = store_cost(med["interleaved"], checks)
    h = Table(
        title=f"on a file with {versions:,} versions (median call of the median round)",
        title_justify="left",
        header_style="bold",
    )
    for c in ("operation", "ms", "CPU ms", "target"):
        h.add_column(c, justify="left" if c in ("operation", "target") else "right")
    for op, rounds in many.items():
        if op == "commits":
            continue
        ms, cpu = (statistics.median(r[i] for r in rounds) * 1e3 for i in (0, 1))
        target = "< 50 ms" if op.startswith(("history", "diff")) else ""
        h.add_row(op, f"{ms:.2f}", f"{cpu:.2f}", target)
        if target:
            checks.append((f"{op} on {versions:,} versions < 50 ms", ms < 50))
    h.add_row(f"  making them: {versions:,} commits", f"{many['commits'][0][0] * 1e3 / versions:.2f} each", "", "")
    s = Table(
        title=f"per-operation cost: {scale:,} versus 100 managed files in the registry",
        title_justify="left",
        header_style="bold",
    )
    for c in ("operation", "µs at 100", f"µs at {scale:,}", "ratio", "target"):
        s.add_column(c, justify="left" if c in ("operation", "target") else "right")
    for op in small:
        ratio = large[op] / small[op]
        s.add_row(op, f"{small[op] * 1e6:.1f}", f"{large[op] * 1e6:.1f}", f"{ratio:.2f}×", "≤ 1.5×")
        checks.append((f"{op} flat to {scale:,} files", ratio <= 1.5))
    console = Console(width=160)
    console.print(t)
    console.print(s)
    console.print(cost)
    console.print(h)
    for name, ok in checks:
        console.print(f"{'n/a    ' if ok is None else 'met    ' if ok else 'MISSED '} {name}", markup=False)
    if not peer:
        console.print(
            f"{PEER} is not installed; to compare against it, run once in the repo root:\n    {PEER_INSTALL}",
            markup=False,
        )


if __name__ == "__main__":
    main()
