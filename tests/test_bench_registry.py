"""scripts/bench_registry.py --quick runs end to end: SQLite and PostgreSQL (loopback and through the
delay proxy) side by side, a figure for every subject and writer count."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import REPO

SUBJECTS = ("SQLite", "PostgreSQL loopback", "PostgreSQL +1 ms RTT")


def test_quick_run_reports_every_subject() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/bench_registry.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith(SUBJECTS)]
    assert [(r[:26].strip(), int(r[26:34])) for r in rows] == [(s, n) for n in (1, 4) for s in SUBJECTS]
    for row in rows:
        commits, ratio_c, reads, ratio_r = (float(x.replace(",", "")) for x in row[34:].split())
        assert commits > 0 and reads > 0 and ratio_c > 0 and ratio_r > 0
