"""Demo: two agents race read-increment-write cycles on one counter file.

Once on a plain directory (updates get lost), once on a coherent volume through the Python
API (a stale write is refused; the agent re-reads and retries), side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COUNTER = "plans/counter.txt"
THINK = 0.0005  # the "work" an agent does between reading and writing


def plain_worker(root: str, cycles: int) -> dict[str, int]:
    path = Path(root, COUNTER)
    torn = 0
    for _ in range(cycles):
        while not (text := path.read_text()):
            torn += 1  # caught the other agent between truncate and write
        time.sleep(THINK)
        path.write_text(str(int(text) + 1))
    return {"refusals": 0, "torn": torn}


def coherent_worker(root: str, cycles: int, agent: str) -> dict[str, int]:
    from coherent_volume import CoherentVolume, StaleWriteError

    refusals = 0
    with CoherentVolume(root, agent=agent) as vol:
        for _ in range(cycles):
            while True:
                value = int(vol.read_text(COUNTER))
                time.sleep(THINK)
                try:
                    vol.write(COUNTER, str(value + 1))
                    break
                except StaleWriteError:
                    refusals += 1  # re-read and redo the change
    return {"refusals": refusals, "torn": 0}


def race(kind: str, root: str, cycles: int) -> dict[str, object]:
    agents = ["alice", "bob"]
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, root, str(cycles), agent],
                              stdout=subprocess.PIPE, text=True) for agent in agents]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{kind} worker failed with exit status {proc.returncode}")
        results.append(json.loads(out))
    final = int(Path(root, COUNTER).read_text())
    expected = cycles * len(agents)
    return {"setup": kind, "final": final, "expected": expected, "lost": expected - final,
            "refusals": sum(r["refusals"] for r in results), "torn": sum(r["torn"] for r in results),
            "seconds": time.monotonic() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=200, help="read-increment-write cycles per agent")
    parser.add_argument("--worker", nargs=4, metavar=("KIND", "ROOT", "CYCLES", "AGENT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, root, cycles, agent = args.worker
        result = plain_worker(root, int(cycles)) if kind == "plain" else coherent_worker(root, int(cycles), agent)
        print(json.dumps(result))
        return

    from rich.console import Console
    from rich.table import Table

    from coherent_volume import CoherentVolume

    rows = []
    with tempfile.TemporaryDirectory(prefix="cv-demo-") as tmp:
        plain, coherent = Path(tmp, "plain"), Path(tmp, "coherent")
        for root in (plain, coherent):
            (root / "plans").mkdir(parents=True)
            (root / COUNTER).write_text("0")
        CoherentVolume(coherent, managed=["plans/**"], agent="setup").close()
        rows.append(race("plain", str(plain), args.cycles))
        rows.append(race("coherent", str(coherent), args.cycles))

    table = Table(title=f"two agents x {args.cycles} read-increment-write cycles on {COUNTER}",
                  title_justify="left", header_style="bold")
    for column in ("directory", "final counter", "expected", "lost updates", "refusals (re-read, retried)",
                   "torn reads", "seconds"):
        table.add_column(column, justify="right" if column != "directory" else "left")
    for r in rows:
        table.add_row(str(r["setup"]), str(r["final"]), str(r["expected"]), str(r["lost"]), str(r["refusals"]),
                      str(r["torn"]), f"{r['seconds']:.1f}")
    Console().print(table)
    coherent_row = rows[1]
    if coherent_row["lost"] != 0:
        raise SystemExit("the coherent volume lost updates: this is a bug")


if __name__ == "__main__":
    main()
