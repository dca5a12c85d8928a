"""scripts/bench_workloads.py in its quick form: it runs every workload on every subject, prints a
complete table and the targets, and leaves no mount or daemon behind. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .harness import REPO
from .harness.bench_workloads import QUICK, RATIOS, SUBJECTS, WORKLOADS, Sizes, sizes_label
from .harness.mounts import fuse_mounts_under

TIME = r"\d[\d,.]* (?:ms|s)\b"
RATIO = r"\d+\.\d\d×"


def run_quick(tmp_path: Path, *args: str) -> tuple[str, dict[str, list[float]]]:
    samples = tmp_path / "samples.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_workloads.py"), "--quick", "--json", str(samples), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "BENCH_DISK": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout, json.loads(samples.read_text())


def row(out: str, backing: str, label: str) -> str:
    section = out.split(f"Workloads on {backing}:", 1)[1]
    return next(line for line in section.splitlines() if line.strip().startswith(label))


def check_table(out: str, samples: dict[str, list[float]], backing: str, bindfs: bool, z: Sizes) -> None:
    measured = [s for s in SUBJECTS if bindfs or s != "bindfs"]
    for w in WORKLOADS:
        line = row(out, backing, sizes_label(w, z))
        # a time for each measured subject (bindfs: n/a when missing), then the ratios between them
        assert len(re.findall(TIME, line)) == len(measured), line
        assert len(re.findall(RATIO, line)) == len([r for r in RATIOS if bindfs or "bindfs" not in r]), line
        for subject in measured:
            values = samples[f"{w.key}/{backing}/{subject}"]
            assert len(values) == 1 and values[0] > 0, (w.key, subject, values)


def test_quick_run_prints_every_workload_on_every_subject_and_the_targets(tmp_path: Path) -> None:
    bindfs = shutil.which("bindfs") is not None
    out, samples = run_quick(tmp_path, "--backing", "both")
    for backing in ("tmpfs", "disk"):
        check_table(out, samples, backing, bindfs, QUICK)
    targets = out.split("Targets", 1)[1]
    unmanaged = [w for w in WORKLOADS if not w.managed]
    # every unmanaged workload against floorfs and bindfs on both backings; sed on both; save on tmpfs
    verdicts = re.findall(r"^\s+(met|MISSED|n/a)\s", targets, re.MULTILINE)
    assert len(verdicts) == len(unmanaged) * 2 * 2 + 2 + 1, targets
    assert ("n/a" in verdicts) == (not bindfs)
    if not bindfs:
        assert "apt-get install bindfs" in out
    assert out.count("left behind: 0 mounts of this run, 0 daemons") == 2, out
    assert not fuse_mounts_under(tmp_path)
