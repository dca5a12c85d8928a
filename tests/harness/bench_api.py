"""API benchmark: plain file I/O, coherent-volume, and agent-coherence 0.15.0, side by side.

One run on one machine, 4 KiB managed files. Each subject is measured in alternating rounds
(ours, peer, ours, peer, ...) and the median round is reported, so drift hits both alike.

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
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from . import REPO, child

PEER_VENV = REPO / ".bench" / "peer-venv"
PEER = "agent-coherence==0.15.0"
PEER_INSTALL = f"python3 -m venv .bench/peer-venv && .bench/peer-venv/bin/pip install {PEER}"
"""Run in the repo root, once, to add the peer's column."""
MANAGED = ("plans/**",)
P = "plans/f0.md"
SIZE = 4096
READS, WRITES, CONTENDERS, UPDATES_EACH = 2000, 200, 4, 50


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


def payload(i: int) -> bytes:
    return (b"%08d" % i) * (SIZE // 8)


def new_root() -> str:
    root = tempfile.mkdtemp(prefix="cv-bench-", dir=os.environ.get("BENCH_DIR"))
    os.makedirs(os.path.join(root, "plans"))
    return root


# ---- plain file I/O (the floor) -------------------------------------------------------


def measure_plain() -> dict[str, float]:
    root = new_root()
    path = Path(root, P)
    path.write_bytes(payload(0))

    def raw_write(i: int, dir_fsync: bool = False) -> None:
        tmp = str(path) + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, payload(i))
        os.fsync(fd)
        os.close(fd)
        os.replace(tmp, path)
        if dir_fsync:
            dfd = os.open(os.path.dirname(path), os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

    return {
        "read": per_op(READS, lambda i: path.read_bytes()),
        "write": per_op(WRITES, raw_write),
        "write+dirsync": per_op(WRITES, lambda i: raw_write(i, True)),
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


def run_child(python: str, *args: str) -> dict[str, float]:
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
    parser.add_argument("--measure", choices=("ours", "peer", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--contend", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--peer-host", help=argparse.SUPPRESS)
    parser.add_argument("--scaling", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps({"plain": measure_plain, "ours": measure_ours, "peer": measure_peer}[args.measure]()))
        return
    if args.scaling:
        print(json.dumps(scaling(args.scaling)))
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
    rounds: dict[str, list[dict[str, float]]] = {subject: [] for subject, _ in subjects}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for subject, python in subjects:
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
    report(med, upd, small, large, args.scale)


def report(
    med: dict[str, dict[str, float]],
    upd: dict[str, float],
    small: dict[str, float],
    large: dict[str, float],
    scale: int,
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
    for name, ok in checks:
        console.print(f"{'n/a    ' if ok is None else 'met    ' if ok else 'MISSED '} {name}", markup=False)
    if not peer:
        console.print(
            f"{PEER} is not installed; to compare against it, run once in the repo root:\n    {PEER_INSTALL}",
            markup=False,
        )


if __name__ == "__main__":
    main()
