"""What drives coherent-volume from outside: the torture harness, the mount helpers the tests use,
the benchmarks and the demo.

The harness drives a volume through its faces (Python API in threads and processes, shell
processes in a real mount), records every commit attempt, and hands the recorded history to
`checker`, which verifies it without importing anything from `coherent_volume`.

Every program here runs as `python -m tests.harness.<name>` from the repo root (pytest imports
the package the same way: tests/ is a package, so its parent, the repo root, is on sys.path).
The scripts/*.py entry points only make the repo root importable and run that module. Child
processes are started the same way: `python -m tests.harness.<name>` with the repo root as their
working directory (`child`).

This module imports nothing but the standard library: bench_api's children import it from an
interpreter that has only the benchmark's peer installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
"""The repo root: the working directory of every child process started as `child(...)`."""

CLI = str(Path(sys.executable).parent / "coherent-volume")
"""The `coherent-volume` command installed next to this interpreter (the .venv's)."""


def child(module: str, *args: str, python: str | None = None) -> list[str]:
    """argv of `python -m tests.harness.<module> ARGS` (run it with cwd=REPO)."""
    return [python or sys.executable, "-m", f"{__name__}.{module}", *args]
