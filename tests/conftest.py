from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume

from .harness import REPO
from .harness.mounts import DaemonLogError, daemon_log_problems


def _dev_null() -> tuple[bool, int]:
    st = os.stat("/dev/null")
    return stat.S_ISCHR(st.st_mode), stat.S_IMODE(st.st_mode)


@pytest.fixture(autouse=True)
def _dev_null_untouched() -> Iterator[None]:
    """No test may change /dev/null (something made it mode 0600 during a full run, and the
    PostgreSQL clusters' initdb then failed in other tests): the test that did fails."""
    before = _dev_null()
    yield
    after = _dev_null()
    assert after == before, f"/dev/null changed during this test: (char device, mode) {before} -> {after}"


@pytest.fixture(autouse=True, scope="session")
def _session_notes_kept_apart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The hooks the tests run keep their sessions' notes (`hook_paths.session_file`) in a
    directory of this run's, not the user's: the suite's sessions mostly never end, and left
    thousands of notes in the machine's own."""
    before = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("runtime"))
    yield
    if before is None:
        del os.environ["XDG_RUNTIME_DIR"]
    else:
        os.environ["XDG_RUNTIME_DIR"] = before


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "mount_log_allows(*patterns): records of mount.log the test provokes on purpose (regular expressions "
        "matching their first line); see tests/harness/mounts.py Mount",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> object:
    """At the end of each test, every mount still up has its daemon's log checked (mounts are also
    checked when they are unmounted): an internal error fails the test that was running, naming the
    log records; a test that failed anyway gets them as a note."""
    try:
        outcome = yield
    except BaseException as failure:
        problems = daemon_log_problems()
        if problems:
            failure.add_note("the mount daemon logged an internal error:\n" + "\n".join(problems))
        raise
    problems = daemon_log_problems()
    if problems:
        raise DaemonLogError("the mount daemon logged an internal error:\n" + "\n".join(problems))
    return outcome


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty directory that becomes a volume managing plans/** and *.md."""
    r = tmp_path / "vol"
    r.mkdir()
    CoherentVolume(r, managed=("plans/**", "*.md"), agent="setup").close()
    (r / "plans").mkdir()
    return r


@pytest.fixture(scope="session")
def pg_cluster():
    """One private PostgreSQL cluster for the test session (tests/harness/pgcluster.py)."""
    pytest.importorskip("psycopg")
    from .harness.pgcluster import bindir, cluster

    if bindir() is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: postgresql)")
    # in memory, without fsync: no test cuts the power; restarts and kills stay real
    memory = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with cluster(settings={"fsync": "off"}, parent=memory) as c:
        yield c


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """A fresh database for this test on the session's cluster, owned by role cv (the cluster, and
    every database in it, goes at the end of the session)."""
    name = f"t_{secrets.token_hex(6)}"
    if not pg_cluster.running():
        pg_cluster.start()
    pg_cluster.create_database(name)
    return pg_cluster.url(name)


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
def mounted(root: Path, tmp_path: Path, request: pytest.FixtureRequest):
    """The `root` volume mounted at tmp_path/mnt through the real CLI; unmounted in every outcome, its
    daemon's log checked (records the test provokes on purpose: `@pytest.mark.mount_log_allows`)."""
    from .harness.mounts import Mount

    allows = [pattern for mark in request.node.iter_markers("mount_log_allows") for pattern in mark.args]
    with Mount(root, tmp_path / "mnt", log_allows=allows) as m:
        yield m
