"""Demo: two agents race read-increment-write cycles on plans/counter.txt.

The same shell loop runs on a plain directory (updates get lost) and, as `coherent-volume as
alice` / `as bob`, inside a mounted volume (a stale write gets EACCES; the agent re-reads and
retries). A third row races two Python agents through the CoherentVolume API.

    ./scripts/demo [--cycles N]             (installs what is missing first)
    python -m tests.harness.demo_race [--cycles N]     (from the repo root, with the .venv's python)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

from . import CLI, REPO, child
from .mounts import Mount

COUNTER = "plans/counter.txt"

# One agent: CYCLES times read the counter, add one, write it back; on a refused write, re-read and redo.
# Both agents start together (they wait for a go-file), so they really overlap.
SHELL_AGENT = r"""
while [ ! -e "$GO" ]; do sleep 0.01; done
refusals=0
for ((i = 0; i < CYCLES; i++)); do
  while true; do
    read -r value < plans/counter.txt
    if { echo $((value + 1)) > plans/counter.txt; } 2>/dev/null; then break; fi
    refusals=$((refusals + 1))
  done
done
echo "$refusals"
"""


def api_agent(root: str, cycles: int, agent: str) -> int:
    from coherent_volume import CoherentVolume, StaleWriteError

    refusals = 0
    with CoherentVolume(root, agent=agent) as vol:
        while not os.path.exists(os.environ["GO"]):
            time.sleep(0.01)
        for _ in range(cycles):
            while True:
                value = int(vol.read_text(COUNTER))
                try:
                    vol.write(COUNTER, str(value + 1))
                    break
                except StaleWriteError:
                    refusals += 1
    return refusals


def race(setup: str, workdir: Path, cycles: int, volume_root: Path | None = None) -> dict[str, object]:
    (workdir / COUNTER).write_text("0\n") if setup == "plain" else None
    script = SHELL_AGENT.replace("CYCLES", str(cycles))
    go = workdir.parent / f"go-{setup}"
    procs = []
    for agent in ("alice", "bob"):
        cwd = workdir
        if setup == "plain":
            argv = ["bash", "-c", script]
        elif setup == "mount":
            argv = [CLI, "as", agent, "--", "bash", "-c", script]
        else:
            argv, cwd = child("demo_race", "--api-agent", str(volume_root), str(cycles), agent), REPO
        procs.append(
            subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, text=True, env={**os.environ, "GO": str(go)})
        )
    time.sleep(0.3)
    started = time.monotonic()
    go.touch()
    refusals = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"{setup}: an agent failed with exit status {proc.returncode}")
        refusals += int(out.strip() or 0)
    final = int((workdir / COUNTER).read_text().strip() or 0)
    expected = 2 * cycles
    return {
        "setup": setup,
        "final": final,
        "expected": expected,
        "lost": expected - final,
        "refusals": refusals,
        "seconds": time.monotonic() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=200, help="read-increment-write cycles per agent")
    parser.add_argument("--api-agent", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api_agent:
        root, cycles, agent = args.api_agent
        print(api_agent(root, int(cycles), agent))
        return

    from rich.console import Console
    from rich.table import Table

    from coherent_volume import CoherentVolume

    rows = []
    with tempfile.TemporaryDirectory(prefix="cv-demo-") as tmp:
        plain, volume, mountpoint = Path(tmp, "plain"), Path(tmp, "volume"), Path(tmp, "mnt")
        for d in (plain / "plans", volume / "plans", mountpoint):
            d.mkdir(parents=True)
        with CoherentVolume(volume, managed=["plans/**"], agent="setup") as setup:
            setup.write(COUNTER, "0\n")
        rows.append(race("plain", plain, args.cycles))
        mount = Mount(volume, mountpoint)
        try:
            try:
                mount.mount()
            except RuntimeError as e:  # the CLI's reason
                raise SystemExit(str(e)) from None
            rows.append(race("mount", mountpoint, args.cycles))
        finally:
            mount.unmount()  # unmounted, and the daemon and its watcher gone, in every outcome
        with CoherentVolume(volume, agent="reset") as reset:
            reset.read(COUNTER)
            reset.write(COUNTER, "0\n")
        rows.append(race("api", volume, args.cycles, volume))

    labels = {
        "plain": "plain directory (bash)",
        "mount": "mounted volume (bash, `as alice`/`as bob`)",
        "api": "volume through the Python API",
    }
    table = Table(
        title=f"two agents x {args.cycles} read-increment-write cycles on {COUNTER}",
        title_justify="left",
        header_style="bold",
    )
    for column in ("where", "final counter", "expected", "lost updates", "refusals (re-read, retried)", "seconds"):
        table.add_column(column, justify="left" if column == "where" else "right")
    for r in rows:
        table.add_row(
            labels[str(r["setup"])],
            str(r["final"]),
            str(r["expected"]),
            str(r["lost"]),
            str(r["refusals"]),
            f"{r['seconds']:.1f}",
        )
    Console(width=120).print(table)
    if any(r["lost"] != 0 for r in rows if r["setup"] != "plain"):
        raise SystemExit("the coherent volume lost updates: this is a bug")


if __name__ == "__main__":
    main()
