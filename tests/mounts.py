"""Real FUSE mounts for tests: mounted with the real CLI, always unmounted, no daemon left behind."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator
import subprocess
import sys
from pathlib import Path

CLI = str(Path(sys.executable).parent / "coherent-volume")


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from torturelib.mounts import daemon_pids  # noqa: E402  (one copy of the test harness's mount helpers)
from torturelib.mounts import mounted as is_mounted  # noqa: E402
from torturelib.mounts import unmount_and_reap  # noqa: E402
from torturelib.mounts import watcher_pids  # noqa: E402

__all__ = ["CLI", "Mount", "daemon_pids", "is_mounted", "watcher_pids"]


class Mount:
    """A mounted volume: `root` is the backing directory, `path` the mountpoint."""

    def __init__(self, root: Path, path: Path, agent: str | None = None) -> None:
        self.root, self.path, self.agent = root, path, agent

    def __enter__(self) -> "Mount":
        self.path.mkdir(exist_ok=True)
        args = [CLI, "mount", str(self.root), str(self.path)] + (["--agent", self.agent] if self.agent else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"mount failed: {result.stderr}")
        return self

    def unmount(self) -> None:
        unmount_and_reap(self.path)

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def run(self, agent: str, script: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a bash script as `agent` with the mount as working directory."""
        return subprocess.run(["bash", "-c", script], cwd=self.path, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "COHERENT_AGENT": agent}, **kwargs)  # type: ignore[arg-type]

    @contextmanager
    def holding(self, agent: str, script: str) -> Iterator[subprocess.Popen[str]]:
        """Run a bash script as `agent` that prints 'ready' once it holds what it opened; kill it after."""
        proc = subprocess.Popen(["bash", "-c", script], cwd=self.path, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "COHERENT_AGENT": agent})
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield proc
        finally:
            proc.kill()
            proc.wait()
