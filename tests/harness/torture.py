"""Torture harness for coherent-volume: contention sweeps, crashes, foreign writes, resource
faults, fuzzing, registry isolation, same-agent concurrency, renames and exchanges, links, and
lock holders that are forked or in another PID namespace, each checked by an independent
history checker.

    python scripts/torture.py            # the short run (what pytest runs)
    python scripts/torture.py --full     # the long run: >= 100,000 commit attempts, >= 200 writer
                                         # kill -9s, >= 20 daemon kill -9s; prints the report table
    python scripts/torture.py --only sweeps,fuzz

(or `python -m tests.harness.torture ...` from the repo root: the same program)

Exit status 0 only if every scenario passed (and, with --full, every target was met).
Every mount is unmounted and every daemon stopped in every outcome.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from .mounts import fuse_mounts_under, unmount_all
from .result import Result, table
from .suite import FULL, OPT_IN, QUICK, Profile, groups

TARGET_ATTEMPTS, TARGET_WRITER_KILLS, TARGET_DAEMON_KILLS, TARGET_MINUTES = 100_000, 200, 20, 30


def _targets(results: list[Result], wall: float) -> list[tuple[str, bool]]:
    sweeps = [r for r in results if r.scenario.startswith("sweep") and not r.expect_violations]
    attempts = sum(r.attempts for r in sweeps)
    writer = sum(int(r.stats.get("kills", 0)) for r in results)
    daemon = sum(int(r.stats.get("daemon_kills", 0)) for r in results)
    return [
        (
            f"commit attempts across the sweeps: {attempts:,} (target >= {TARGET_ATTEMPTS:,}), "
            f"violations {sum(r.violations for r in sweeps)} (target 0)",
            attempts >= TARGET_ATTEMPTS and all(r.violations == 0 for r in sweeps),
        ),
        (f"writer kill -9s: {writer} (target >= {TARGET_WRITER_KILLS})", writer >= TARGET_WRITER_KILLS),
        (f"daemon kill -9s: {daemon} (target >= {TARGET_DAEMON_KILLS})", daemon >= TARGET_DAEMON_KILLS),
        (f"wall time: {wall / 60:.1f} min (target < {TARGET_MINUTES})", wall < TARGET_MINUTES * 60),
    ]


def _details(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.stats:
            stats = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.stats.items())
            lines.append(f"{r.scenario}: {stats}")
        if r.violations:
            kinds = ", ".join(f"{k} {n}" for k, n in r.kinds.most_common())
            lines.append(f"{r.scenario}: {r.violations} violations" + (f" ({kinds})" if kinds else ""))
            lines += [f"    {m}" for m in r.messages[:6]]
    return lines


def run(profile: Profile, only: list[str] | None, seed: int, workdir: Path) -> tuple[list[Result], float]:
    from rich.console import Console

    console = Console(width=160, highlight=False)
    results: list[Result] = []
    started = time.monotonic()
    for name, group in groups(profile, seed).items():
        if (only and name not in only) or (not only and name in OPT_IN):
            continue
        directory = workdir / name
        directory.mkdir()
        group_started = time.monotonic()
        rows = group(directory)
        results += rows
        bad = sum(not r.passed for r in rows)
        console.print(
            f"{name}: {len(rows)} runs in {time.monotonic() - group_started:.1f} s"
            + (f", [bold red]{bad} failed[/]" if bad else ", all passed")
        )
    return results, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the long run with the issue's targets")
    parser.add_argument(
        "--only",
        help="comma-separated groups: "
        + ", ".join(groups(QUICK, 0))
        + f" ({', '.join(sorted(OPT_IN))} only when named)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    profile = FULL if args.full else QUICK
    workdir = Path(tempfile.mkdtemp(prefix="cv-torture-"))
    try:
        results, wall = run(profile, args.only.split(",") if args.only else None, args.seed, workdir)
    finally:
        unmount_all()
    from rich.console import Console

    console = Console(width=160, highlight=False)
    console.print(table(results, f"coherent-volume torture report ({profile.name}, seed {args.seed})"))
    for line in _details(results):
        console.print(line, markup=False)
    ok = all(r.passed for r in results)
    if args.full:
        for text, met in _targets(results, wall):
            console.print(f"target {'met' if met else 'MISSED'}: {text}", markup=False)
            ok = ok and met
    leftovers = fuse_mounts_under(workdir)
    console.print(f"FUSE mounts left behind: {len(leftovers)}", markup=False)
    if not leftovers and not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
