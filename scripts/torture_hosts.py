#!/usr/bin/env python3
"""The torture harness over three namespace hosts sharing a PostgreSQL volume:
tests/harness/torture_hosts.py. `python scripts/torture_hosts.py [--rounds N] [--seed S]` runs it from
anywhere (as root: it makes network namespaces); in the repo root `python -m tests.harness.torture_hosts`
is the same."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: the package `tests` is there
runpy.run_module("tests.harness.torture_hosts", run_name="__main__", alter_sys=True)
