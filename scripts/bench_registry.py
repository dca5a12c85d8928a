"""The registry benchmark: tests/harness/bench_registry.py. `python scripts/bench_registry.py ARGS` runs it from
anywhere; in the repo root `python -m tests.harness.bench_registry ARGS` is the same."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: the package `tests` is there
runpy.run_module("tests.harness.bench_registry", run_name="__main__", alter_sys=True)
