from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume

from .harness import REPO


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory that becomes a volume managing plans/** and *.md."""
    r = tmp_path / "vol"
    r.mkdir()
    CoherentVolume(r, managed=("plans/**", "*.md"), agent="setup").close()
    (r / "plans").mkdir()
    return r


@pytest.fixture
def vols(root: Path):
    """Factory for one CoherentVolume per agent name (closed at teardown)."""
    opened: list[CoherentVolume] = []

    def make(agent: str, **kwargs: object) -> CoherentVolume:
        vol = CoherentVolume(root, agent=agent, **kwargs)  # type: ignore[arg-type]
        opened.append(vol)
        return vol

    yield make
    for vol in opened:
        vol.close()


def run_py(
    code: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run Python code in a real, separate interpreter."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


@pytest.fixture
def mounted(root: Path, tmp_path: Path):
    """The `root` volume mounted at tmp_path/mnt through the real CLI; unmounted in every outcome."""
    from .harness.mounts import Mount

    with Mount(root, tmp_path / "mnt") as m:
        yield m
