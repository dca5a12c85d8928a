"""The mount behaves like a real file system under a random-operation exerciser (tests/harness/exerciser.py,
every read checked against a model), and memory mappings of managed files follow the rule in
docs/mount.md: read-only shared mappings work and register what they show, a write handle cannot be
mapped shared (ENODEV at mmap), private mappings always work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from coherent_volume import CoherentVolume

from .harness import REPO, child
from .harness.mounts import CLI, Mount

P = "plans/mapped.bin"
OPS = "10000"


def exercise(path: Path, seed: int, agent: str | None = None) -> str:
    """Run the exerciser on `path` (as `agent`, in a process of its own); its report, asserting it ran clean."""
    env = {**os.environ, "COHERENT_AGENT": agent} if agent else os.environ.copy()
    r = subprocess.run(
        child("exerciser", str(path), "--ops", OPS, "--seed", str(seed)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def py(m: Mount, agent: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as `agent` with the mount as working directory."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=m.path,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COHERENT_AGENT": agent},
    )


def why(m: Mount) -> str:
    r = subprocess.run([CLI, "why", str(m.path / P)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_exerciser_agrees_with_a_plain_directory(tmp_path: Path) -> None:
    assert f"{OPS} operations clean, seed 1, rules plain" in exercise(tmp_path / "x.bin", seed=1)


def test_ten_thousand_operations_on_a_managed_file_through_the_mount(mounted: Mount) -> None:
    report = exercise(mounted.path / "plans/x.bin", seed=2, agent="alice")
    assert f"{OPS} operations clean, seed 2, rules managed" in report


def test_ten_thousand_operations_on_an_unmanaged_file_through_the_mount(mounted: Mount) -> None:
    assert f"{OPS} operations clean, seed 3, rules plain" in exercise(mounted.path / "x.bin", seed=3, agent="alice")


def test_a_read_only_shared_mapping_of_a_managed_file_shows_the_committed_bytes(mounted: Mount) -> None:
    content = bytes(range(256)) * 40
    (mounted.path / P).write_bytes(content)  # committed at close
    r = py(
        mounted,
        "alice",
        f"""
import mmap
with open({P!r}, "rb") as f:
    shared = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # MAP_SHARED, PROT_READ
    private = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    print(shared[:] == {content!r}, private[:] == {content!r}, len(shared))
""",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "True", str(len(content))]


def test_a_shared_mapping_registers_the_view_of_what_it_showed(mounted: Mount) -> None:
    assert mounted.run("bob", f"printf 'v1 by bob' > {P}").returncode == 0
    untouched = f"""
import mmap
with open({P!r}, "rb") as f:
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # mapped, never read
"""
    assert py(mounted, "alice", untouched).returncode == 0
    assert mounted.run("alice", f"echo alice > {P}").returncode != 0, "a mapping nobody read is no read"
    touched = f"""
import mmap
with open({P!r}, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
    print(m[:].decode())
"""
    r = py(mounted, "alice", touched)
    assert r.returncode == 0 and r.stdout.strip() == "v1 by bob", r.stderr
    assert mounted.run("alice", f"echo alice after mapping > {P}").returncode == 0
    refused = mounted.run("carol", f"echo carol never read > {P}")
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    assert "agent carol (unread)" in why(mounted)
    assert (mounted.root / P).read_text() == "alice after mapping\n"


def test_a_write_handle_cannot_be_mapped_shared_and_private_writes_stay_private(mounted: Mount) -> None:
    assert py(mounted, "alice", f"open({P!r}, 'wb').write(b'x' * 5000)").returncode == 0
    r = py(
        mounted,
        "alice",
        f"""
import errno, mmap
with open({P!r}, "r+b") as f:
    for prot in (mmap.PROT_READ | mmap.PROT_WRITE, mmap.PROT_READ):
        try:
            mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=prot)
            print("mapped")
        except OSError as e:
            print(errno.errorcode[e.errno])
    with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[:5] = b"PRIVY"
        print(m[:7].decode())
    f.seek(0)
    print(f.read(7).decode())
""",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ENODEV", "ENODEV", "PRIVYxx", "xxxxxxx"]
    assert (mounted.root / P).read_bytes() == b"x" * 5000


def test_a_shared_mapping_keeps_its_version_while_the_file_is_rewritten(mounted: Mount) -> None:
    """Commits install a new file, so a mapping keeps the version it mapped (as a file replaced by
    rename does on a local disk); writers are not held up by it and never see an error."""
    old = b"old " * 3000
    (mounted.path / P).write_bytes(old)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import mmap, os, sys
f = open({P!r}, "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
print(len(m), m[:4].decode(), flush=True)
sys.stdin.readline()
print(m[:] == {old!r}, os.fstat(f.fileno()).st_size, flush=True)
""",
        ],
        cwd=mounted.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": "alice"},
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().split() == [str(len(old)), "old"]
        script = f"cat {P} >/dev/null && printf new > {P} && truncate -s 2 {P} && cat {P}"
        writes = mounted.run("bob", script)
        assert writes.returncode == 0 and writes.stdout == "ne", writes.stderr
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["True", str(len(old))]
    finally:
        holder.kill()
        holder.wait()
    assert (mounted.path / P).read_bytes() == b"ne"


def test_a_shared_mapping_keeps_its_version_when_the_python_api_replaces_the_file(mounted: Mount) -> None:
    """A commit made outside the mount is noticed at the next lookup or stat: the name gets a new
    inode, and the mapped readers keep theirs (their size included: no SIGBUS, no cut read)."""
    old = b"mapped " * 2000
    (mounted.path / P).write_bytes(old)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"""
import mmap, os, sys
f = open({P!r}, "rb")
m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
print(m[:6].decode(), flush=True)
sys.stdin.readline()
print(os.fstat(f.fileno()).st_size, m[:] == {old!r}, f.read() == {old!r}, flush=True)
""",
        ],
        cwd=mounted.path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COHERENT_AGENT": "alice"},
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        assert holder.stdout.readline().strip() == "mapped"
        with CoherentVolume(mounted.root, agent="bob") as bob:
            bob.read(P)
            bob.write(P, b"short")
        assert (mounted.path / P).read_bytes() == b"short"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == [str(len(old)), "True", "True"]
    finally:
        holder.kill()
        holder.wait()
    assert os.stat(mounted.path / P).st_size == 5
