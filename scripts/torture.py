#!/usr/bin/env python3
"""The torture harness: tests/harness/torture.py. `python scripts/torture.py ARGS` runs it from anywhere;
in the repo root `python -m tests.harness.torture ARGS` is the same."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: the package `tests` is there
runpy.run_module("tests.harness.torture", run_name="__main__", alter_sys=True)
