"""The demo's race: tests/harness/demo_race.py. `python scripts/demo_race.py ARGS` runs it from
anywhere; in the repo root `python -m tests.harness.demo_race ARGS` is the same (./scripts/demo)."""

import runpy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: the package `tests` is there
runpy.run_module("tests.harness.demo_race", run_name="__main__", alter_sys=True)
