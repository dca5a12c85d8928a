"""Isolation of the registry: through the mount `.coherent` cannot be listed, read, written,
renamed or deleted; the registry's files are private to their owner (0600, directory 0700);
and without --allow-other another user cannot even enter the mount."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

from .mounts import Mount
from .result import Result
from .volumes import create, integrity, registry_db, seed

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

ATTACKS = {  # what a process in the mount tries against the registry (each must fail)
    "list": "ls -a . | grep -qx .coherent",
    "stat": "stat .coherent",
    "read": "cat .coherent/registry.db",
    "write": "echo x > .coherent/registry.db",
    "create": "echo x > .coherent",
    "mkdir": "mkdir .coherent",
    "rename away": "mv .coherent gone",
    "rename over": "echo x > plans/x.txt && mv plans/x.txt .coherent",
    "delete file": "rm .coherent/registry.db",
    "delete directory": "rmdir .coherent || rm -r .coherent",
    "symlink into": "ln -s .coherent/registry.db plans/r.db && cat plans/r.db",
}


def _modes(root: Path) -> dict[str, int]:
    directory = registry_db(root).parent
    out = {".coherent": stat.S_IMODE(directory.stat().st_mode)}
    for p in directory.iterdir():
        out[p.name] = stat.S_IMODE(p.stat().st_mode)
    return out


def registry_isolation(workdir: Path) -> Result:
    result = Result("registry isolation through the mount", 2)
    started = time.monotonic()
    root = create(workdir / "isolation")
    seed(root, ["plans/a.md"])
    before = registry_db(root).stat().st_ino
    with Mount(root, workdir / "isolation-mnt") as m:
        for name, script in ATTACKS.items():
            r = subprocess.run(
                ["bash", "-c", script],
                cwd=m.path,
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "COHERENT_AGENT": "intruder"},
            )
            result.attempts += 1
            if r.returncode == 0:
                result.fail(f"through the mount, '{name}' on the registry succeeded")
            else:
                result.refusals["refused"] += 1
        _other_user(result, m.path, "enter the mount", ["ls", str(m.path)])
        _other_user(result, m.path, "read a file in the mount", ["cat", str(m.path / "plans/a.md")])
    _other_user(result, root, "list the backing registry directory", ["ls", str(registry_db(root).parent)])
    for name, mode in _modes(root).items():
        if mode & 0o077:
            result.fail(f"registry file {name} has mode {mode:o}: others can reach it")
    if registry_db(root).stat().st_ino != before or integrity(root) != "ok":
        result.fail("the registry was replaced or damaged")
    result.wall = time.monotonic() - started
    return result


def _other_user(result: Result, where: Path, what: str, argv: list[str]) -> None:
    """User nobody must be refused."""
    r = subprocess.run(NOBODY + argv, capture_output=True, text=True, timeout=30, cwd="/")
    result.attempts += 1
    if r.returncode == 0:
        result.fail(f"another user could {what} ({where})")
    elif "Permission denied" not in r.stderr:
        result.fail(f"another user trying to {what} got {r.stderr.strip()!r}, not Permission denied")
    else:
        result.refusals["other user: EACCES"] += 1
