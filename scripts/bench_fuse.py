"""The FUSE benchmark: tests/harness/bench_fuse.py. `python scripts/bench_fuse.py ARGS` runs it from anywhere;
in the repo root `python -m tests.harness.bench_fuse ARGS` is the same."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: the package `tests` is there
runpy.run_module("tests.harness.bench_fuse", run_name="__main__", alter_sys=True)
