"""scripts/bench_registry.py --quick runs end to end: SQLite and PostgreSQL (loopback and through the
delay proxy) side by side, a figure for every subject and writer count, after the round trips of a
commit and of a tracked read counted on the wire (tests/test_pg_round_trips.py checks their values)."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.harness import REPO

SUBJECTS = ("SQLite", "PostgreSQL loopback", "PostgreSQL +1 ms RTT")


def test_quick_run_reports_every_subject() -> None:
    done = subprocess.run(
        [sys.executable, "scripts/bench_registry.py", "--quick"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    row = re.compile(r"(.+?) +(\d+) +([\d,]+) +([\d.]+) +([\d,]+) +([\d.]+)")
    rows = [row.fullmatch(line) for line in done.stdout.splitlines() if line.startswith(SUBJECTS)]
    assert all(rows), done.stdout
    assert [(r[1], int(r[2])) for r in rows if r] == [(s, n) for n in (1, 4) for s in SUBJECTS]
    for r in rows:
        assert r is not None
        commits, ratio_c, reads, ratio_r = (float(x.replace(",", "")) for x in r.groups()[2:])
        assert commits > 0 and reads > 0 and ratio_c > 0 and ratio_r > 0
    commit = re.search(r"commit of a 4 KiB file: ([\d.]+) round trip\(s\), ([\d.]+) write transaction", done.stdout)
    read = re.search(r"tracked read of an unchanged file: ([\d.]+) round trip\(s\)", done.stdout)
    assert commit and read, done.stdout
    assert float(commit[1]) >= 2 and float(commit[2]) >= 1 and float(read[1]) >= 1
