"""The PostgreSQL registry backend, on a private PostgreSQL cluster the tests start (one per test
session, a fresh database per test): the core runs on it unchanged; commits survive a killed
committer, a database restart and a lost COMMIT reply; the volume refuses what this release does
not support (a password in the URL, a second working copy)."""

from __future__ import annotations

import errno
import importlib
import importlib.util
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg  # ./scripts/test installs it (the postgresql extra): missing, these tests fail
import pytest
import xxhash

from coherent_volume import (
    CoherentVolume,
    DamagedContent,
    Policy,
    RegistryError,
    RegistryLoginRefused,
    Retention,
    StaleWriteError,
    TreeClash,
    VersionGone,
    VolumeConfigError,
)
from coherent_volume.claude_code import agent_of
from coherent_volume.core import VolumeCore, open_core
from coherent_volume.core.base import SWEEP_AGAIN, _removed_if_empty
from coherent_volume.core.writes import Writes
from coherent_volume.fingerprint import content_hash, hash_file
from coherent_volume.paths import REGISTRY_DIR
from coherent_volume.protocol import Intent
from coherent_volume.registry import DB_FILE, LOCATION_FILE, pg_connections, pg_registry, pg_transaction, postgresql
from coherent_volume.registry.pg_location import Location

from . import test_history, test_retention, test_volume
from .conftest import run_py
from .harness import CLI
from .harness.agent_session import unique
from .harness.commitproxy import CommitProxy
from .test_claude_code import Session, event
from .test_claude_code import bash as claude_bash
from .test_gemini import Session as GeminiSession
from .test_transactions import _scenario

R = TypeVar("R")
MANAGED = ("plans/**", "*.md")


UNSETTLED = (
    "SELECT count(*) FROM cv_intents i WHERE NOT EXISTS (SELECT 1 FROM cv_versions v "
    "WHERE v.volume = i.volume AND v.path = i.path AND v.version = i.version)"
)
"""Intents of changes not recorded: none once a commit returned (a commit of content leaves the
intent of its recorded version, which the next write transaction settles)."""


def _pg_volume(root: Path, url: str, name: str = "vol", managed: tuple[str, ...] = MANAGED) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    open_core(root, managed, registry=url, volume=name).registry.close()
    (root / "plans").mkdir(exist_ok=True)
    return root


def _join(root: Path, url: str, name: str = "vol") -> Path:
    """Another working copy of the volume `name` (as another host would have; here on this one)."""
    r = subprocess.run([CLI, "init", str(root), "--registry", url, "--volume", name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return root


def _q(url: str, statement: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A query straight on the database (as role cv), never through coherent_volume."""
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, args)
        return cur.fetchall() if cur.description else []


# ---- the volume API's tests, run on a PostgreSQL volume ------------------------------------------------

SLOW = {"test_update_from_many_threads_on_one_instance_is_exact"}
"""Left out for the suite's time (about 20 s here): the contention sweep below covers contention."""
CACHE = {"test_foreign_create_and_delete"}
"""A working copy of a PostgreSQL volume is a cache: a file deleted outside the volume is installed
again, not recorded as a deletion (test_a_working_copy_reinstalls_a_file_deleted_outside_the_volume)."""
for _name in dir(test_volume):
    if _name.startswith("test_") and _name not in SLOW | CACHE:
        globals()[f"{_name}_on_postgresql"] = getattr(test_volume, _name)
MOUNT_TESTS = (
    "test_stale_shell_write_is_refused_and_the_file_unchanged",
    "test_append_needs_no_read_but_takes_the_grant",
)
"""The mount, through shells, on a PostgreSQL volume (the `mounted` fixture mounts `root` below)."""
if importlib.util.find_spec("pyfuse3") is not None:
    for _name in MOUNT_TESTS:
        globals()[f"{_name}_on_postgresql"] = getattr(importlib.import_module("tests.test_mount"), _name)
RETENTION_TESTS = (
    "test_a_viewed_version_keeps_its_bytes_so_the_refusal_diff_still_works",
    "test_a_size_budget_prunes_the_oldest_first_down_to_the_floor",
    "test_a_commit_that_finds_a_prune_due_prunes_one_step_and_its_next_commits_the_rest",
    "test_views_of_an_agent_inactive_longer_than_keep_days_stop_keeping_versions",
    "test_forgotten_views_keep_no_version",
)
"""Retention's tests that use the API only, on a PostgreSQL volume (its own queries of views and retained versions)."""
for _name in RETENTION_TESTS:
    globals()[f"{_name}_on_postgresql"] = getattr(test_retention, _name)
HISTORY_TESTS = (
    "test_a_change_a_read_saw_half_done_is_kept_as_read_and_its_rest_is_a_version_of_its_own",
    "test_a_version_whose_bytes_were_gone_before_they_were_kept_is_said_never_kept_not_pruned",
)
"""History's tests of foreign changes a read meets, in a working copy (`CoreBase._sync_copy`)."""
for _name in HISTORY_TESTS:
    globals()[f"{_name}_on_postgresql"] = getattr(test_history, _name)


@pytest.fixture
def root(tmp_path: Path, pg_url: str) -> Path:
    """test_volume's volume (plans/** and *.md managed), kept in PostgreSQL."""
    return _pg_volume(tmp_path / "vol", pg_url)


def test_the_root_records_where_its_registry_is_and_no_password(root: Path, pg_url: str) -> None:
    recorded = json.loads((root / REGISTRY_DIR / LOCATION_FILE).read_text())
    assert recorded["url"] == pg_url and recorded["volume"] == "vol"
    assert not (root / REGISTRY_DIR / DB_FILE).exists()
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
    rows = _q(pg_url, "SELECT f.path, f.version, f.writer, v.name FROM cv_files f JOIN cv_volumes v ON v.id = f.volume")
    assert rows == [("plans/a.md", 1, "alice", "vol")]


def test_history_diff_restore_and_merge(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as a, CoherentVolume(root, agent="bob") as b:
        a.write("plans/p.md", "one\ntwo\nthree\n")
        b.read("plans/p.md")
        a.write("plans/p.md", "ONE\ntwo\nthree\n")
        assert b.write("plans/p.md", "one\ntwo\nTHREE\n", merge=True) == 3  # a clean three-way merge
        assert a.read("plans/p.md") == b"ONE\ntwo\nTHREE\n"
        assert [(h.version, h.kind, h.writer) for h in a.history("plans/p.md")] == [
            (3, "merge", "bob"),
            (2, "commit", "alice"),
            (1, "commit", "alice"),
        ]
        assert a.read_version("plans/p.md", 1) == b"one\ntwo\nthree\n"
        assert "-one\n+ONE" in (a.diff("plans/p.md", 1, 2) or "")
        assert a.restore("plans/p.md", 1) == 4
        assert (root / "plans/p.md").read_bytes() == b"one\ntwo\nthree\n"
        with pytest.raises(StaleWriteError) as refused:
            b.write("plans/p.md", "late\n")
        assert refused.value.reason == "stale" and refused.value.current_version == 4
    log = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, timeout=60)
    made = [(e["version"], e["kind"], e["parents"]) for e in map(json.loads, log.stdout.splitlines())]
    assert [m for m in made if m[1] != "refusal"] == [
        (1, "commit", []),
        (2, "commit", []),
        (3, "merge", [1, 2]),
        (4, "restore", [1]),
    ]


def test_the_cli_status_and_log_read_a_postgresql_volume(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
    status = subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["store"]["objects"] == 1
    log = subprocess.run([CLI, "log", str(root), "--json"], capture_output=True, text=True, timeout=60)
    assert [json.loads(line)["kind"] for line in log.stdout.splitlines()] == ["commit"]


# ---- every decision survives a real serialization failure --------------------------------------------


class FailsOnce(postgresql.PostgresRegistry):
    """Each write transaction's body is followed once by a real SQLSTATE 40001 from PostgreSQL."""

    failed = 0

    def transact(self, fn: Callable[[postgresql.PostgresTransaction], R], holds: Iterable[str] = ()) -> R:
        first = True

        def body(tx: postgresql.PostgresTransaction) -> R:
            nonlocal first
            result = fn(tx)
            if first:
                first = False
                type(self).failed += 1
                tx._c.execute("DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END $$")
            return result

        return super().transact(body, holds)


def test_the_transaction_scenario_gives_on_postgresql_what_it_gives_on_sqlite(tmp_path: Path, pg_url: str) -> None:
    sqlite_root = tmp_path / "sqlite"
    sqlite_root.mkdir()
    (sqlite_root / "plans").mkdir()
    plain = open_core(sqlite_root, ["plans/**"])
    pg_root = _pg_volume(tmp_path / "pg", pg_url, managed=("plans/**",))
    opened = open_core(pg_root)
    registry = opened.registry
    assert isinstance(registry, postgresql.PostgresRegistry)
    registry.close()
    FailsOnce.failed = 0
    flaky = VolumeCore(str(pg_root), FailsOnce(registry.location, registry.volume_id, registry.globs, registry.replica))
    try:
        once, twice = _scenario(plain), _scenario(flaky)
    finally:
        plain.registry.close()
        flaky.registry.close()
    assert FailsOnce.failed >= 15  # every transaction of the scenario really ran twice
    assert once == twice
    assert once["files"] == {"plans/plan.md": b"two\na\nb\n", "plans/kept.md": b""}


# ---- refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["cv:secret@", "?password=secret", "?sslpassword=secret&sslmode=disable"])
def test_a_url_with_a_password_is_refused_and_nothing_is_recorded(tmp_path: Path, pg_cluster: Any, secret: str) -> None:
    url = pg_cluster.url().replace("cv@", secret) if "@" in secret else pg_cluster.url() + secret
    r = subprocess.run(
        [CLI, "init", str(tmp_path / "v"), "-m", "plans/**", "--registry", url, "--volume", "v"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "password" in r.stderr and "PGPASSFILE" in r.stderr and "secret" not in r.stderr
    assert not (tmp_path / "v" / REGISTRY_DIR).exists()
    with pytest.raises(VolumeConfigError, match="password"):
        open_core(tmp_path / "v", ["plans/**"], registry=pg_cluster.url() + "?password=secret", volume="v")


def test_init_through_the_cli_then_every_face_opens_what_the_root_names(tmp_path: Path, pg_url: str) -> None:
    root = tmp_path / "v"
    r = subprocess.run(
        [CLI, "init", str(root), "-m", "plans/**", "--registry", pg_url, "--volume", "team"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    code = "import sys; from coherent_volume import CoherentVolume; v = CoherentVolume(sys.argv[1], agent='x'); v.write('plans/a.md', 'hi\\n'); v.close()"
    done = run_py(code, str(root))
    assert done.returncode == 0, done.stderr
    assert _q(pg_url, "SELECT path, version FROM cv_files") == [("plans/a.md", 1)]
    again = subprocess.run(  # idempotent on the same root
        [CLI, "init", str(root), "-m", "plans/**", "--registry", pg_url, "--volume", "team"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0, again.stderr


def test_a_foreign_create_is_recorded_and_a_foreign_delete_is_installed_again(vols: Any, root: Path) -> None:
    alice, bob = vols("alice"), vols("bob")
    (root / "plans/handmade.md").write_text("from an editor")
    with pytest.raises(StaleWriteError, match="unread"):
        alice.write("plans/handmade.md", b"overwrite")
    assert alice.read("plans/handmade.md") == b"from an editor"
    (root / "plans/handmade.md").unlink()  # a working copy is a cache of the registry: nothing is deleted
    assert bob.read("plans/handmade.md") == b"from an editor"
    assert (root / "plans/handmade.md").read_bytes() == b"from an editor"
    assert bob.delete("plans/handmade.md") == 2  # a deletion goes through the volume
    assert not (root / "plans/handmade.md").exists()
    with pytest.raises(FileNotFoundError):
        alice.read("plans/handmade.md")
    assert [(h.version, h.kind, h.writer) for h in alice.history("plans/handmade.md")] == [
        (2, "delete", "bob"),
        (1, "foreign", "external"),
    ]


def test_working_copies_join_and_a_root_on_another_boot_is_refused_until_taken_over(
    tmp_path: Path, pg_url: str
) -> None:
    first = _pg_volume(tmp_path / "first", pg_url, "team")
    with CoherentVolume(first, agent="alice") as v:
        v.write("plans/a.md", "one\n")
    second = tmp_path / "second"
    r = subprocess.run(  # joins: no globs needed, every managed file installed
        [CLI, "init", str(second), "--registry", pg_url, "--volume", "team"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert (second / "plans/a.md").read_bytes() == b"one\n"
    assert (second / REGISTRY_DIR / postgresql.REPLICA_FILE).exists()
    assert sorted(r[0] for r in _q(pg_url, "SELECT root FROM cv_replicas")) == [str(first), str(second)]
    # the first root opened from another boot of the kernel (its disk moved, or shared across hosts)
    _q(pg_url, "UPDATE cv_replicas SET boot_id = 'another-boot', hostname = 'h2' WHERE root = %s", (str(first),))
    with pytest.raises(VolumeConfigError, match="take the working copy over") as other_boot:
        CoherentVolume(first, agent="a")
    assert "'h2'" in str(other_boot.value) and "init" in str(other_boot.value)
    again = subprocess.run(
        [CLI, "init", str(first), "--registry", pg_url, "--volume", "team"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    with CoherentVolume(first, agent="a") as v:
        assert v.read("plans/a.md") == b"one\n"


def test_a_newer_or_older_schema_is_refused(tmp_path: Path, pg_url: str) -> None:
    root = _pg_volume(tmp_path / "v", pg_url)
    _q(pg_url, "INSERT INTO cv_schema (version) VALUES (%s)", (postgresql.SCHEMA_VERSION + 1,))
    with pytest.raises(RegistryError, match="upgrade coherent-volume"):
        CoherentVolume(root, agent="a")
    _q(pg_url, "DELETE FROM cv_schema")
    with pytest.raises(RegistryError, match="coherent-volume migrate"):
        CoherentVolume(root, agent="a")
    r = subprocess.run([CLI, "migrate", "--registry", pg_url], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "already exists" in r.stderr  # the tables exist: the migration does not apply
    assert _q(pg_url, "SELECT count(*) FROM cv_schema") == [(0,)]  # and changed nothing


def test_a_schema_5_registry_is_migrated_with_its_history(tmp_path: Path, pg_url: str) -> None:
    """Schema 6 tells a version never kept from one pruned: a registry of schema 5 is refused at open
    until `migrate` adds that, and its history reads as before (a version not kept says pruned)."""
    root = _pg_volume(tmp_path / "v", pg_url)
    with CoherentVolume(root, agent="a") as a:
        a.write("plans/a.md", "one\n")
        a.write("plans/a.md", "two\n")
    _q(pg_url, "UPDATE cv_versions SET pruned = true WHERE version = 1")  # as a prune leaves it
    _q(pg_url, "ALTER TABLE cv_versions DROP COLUMN never_kept")
    _q(pg_url, "DELETE FROM cv_schema WHERE version = 6")
    with pytest.raises(RegistryError, match="coherent-volume migrate"):
        CoherentVolume(root, agent="a")
    r = subprocess.run([CLI, "migrate", "--registry", pg_url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    with CoherentVolume(root, agent="a") as a:
        assert [(v.version, v.retained, v.never_kept) for v in a.history("plans/a.md")] == [
            (2, True, False),
            (1, False, False),
        ]
        with pytest.raises(VersionGone, match="pruned by the volume's retention policy"):
            a.read_version("plans/a.md", 1)
        assert a.read_version("plans/a.md", 2) == b"two\n"


def test_migrate_creates_the_schema_once(pg_url: str) -> None:
    first = subprocess.run([CLI, "migrate", "--registry", pg_url], capture_output=True, text=True, timeout=60)
    second = subprocess.run([CLI, "migrate", "--registry", pg_url], capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "was 0" in first.stdout and "already" in second.stdout
    assert _q(pg_url, "SELECT max(version) FROM cv_schema") == [(postgresql.SCHEMA_VERSION,)]


def test_an_unreachable_or_read_only_registry_is_a_typed_error(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        db = pg_url.rsplit("/", 1)[1]
        _q(pg_url, f"ALTER DATABASE {db} SET default_transaction_read_only = on")
        v._core.registry.close()  # new sessions get the setting
        with pytest.raises(RegistryError) as read_only:
            v.write("plans/a.md", "two\n")
        assert read_only.value.errno == errno.EROFS and "read-only" in str(read_only.value)
        assert (root / "plans/a.md").read_bytes() == b"one\n"
    monkeypatch.setattr(pg_connections, "CONNECT_WAIT", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    recorded = root / REGISTRY_DIR / LOCATION_FILE
    data = json.loads(recorded.read_text())
    data["url"] = f"postgresql://cv@127.0.0.1:{port}/{db}"
    recorded.write_text(json.dumps(data))
    with pytest.raises(RegistryError) as unreachable:
        CoherentVolume(root, agent="alice")
    assert unreachable.value.errno == errno.EIO
    assert f"127.0.0.1:{port} is unreachable" in str(unreachable.value) and "nothing was written" in str(
        unreachable.value
    )


# ---- the commit lock ------------------------------------------------------------------------------------

HOLD = """
import sys, time
from coherent_volume.core import open_core
core = open_core(sys.argv[1])
if sys.argv[2] == "transaction":  # the database's part: a write transaction of the volume, left open
    def hold(tx):
        tx.file("plans/a.md")  # its first round trip: the volume's lock is taken
        print("held", flush=True)
        time.sleep(120)
    core.registry.transact(hold)
else:  # this working copy's own
    with core.registry.commit_lock():
        print("held", flush=True)
        time.sleep(120)
"""


def _holder(root: Path, what: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}  # held until killed
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(root), what], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    return p


@pytest.mark.parametrize("where", ["another working copy", "this working copy"])
def test_the_commit_lock_names_its_holder_and_is_freed_when_it_is_killed(
    tmp_path: Path, root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    other = _join(tmp_path / "other", pg_url)
    if where == "another working copy":  # its commit lock holds nothing here: its open transaction does
        holder = _holder(other, "transaction")
    else:
        holder = _holder(root, "commit lock")
    try:
        monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 0.5)
        with CoherentVolume(root, agent="alice") as v:
            with pytest.raises(RegistryError) as busy:
                v.write("plans/a.md", "one\n")
            assert busy.value.errno == errno.EBUSY
            if where == "another working copy":  # the database's lock: PostgreSQL names the session
                assert f"held by coherent-volume {socket.gethostname()} {holder.pid} (PostgreSQL backend" in str(
                    busy.value
                )
            else:  # this copy's own lock, taken first: the kernel names the process
                assert f"held by pid {holder.pid} (python" in str(busy.value)
            assert not (root / "plans/a.md").exists()
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 30.0)
            assert v.write("plans/a.md", "one\n") == 1  # its session ended with it: the lock is free
    finally:
        holder.kill()
        holder.wait()


KILLED_WRITER = """
import sys
from coherent_volume import CoherentVolume
v = CoherentVolume(sys.argv[1], agent="killed")
print("open", flush=True)
n = 0
while True:
    n += 1
    v.update("plans/c.md", lambda b: str(int(b or b"0") + 1) + "\\n")
"""


def test_a_committer_killed_at_any_instant_leaves_a_consistent_volume(root: Path, pg_url: str) -> None:
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/c.md", "0\n")
    for delay in (0.3, 0.55):
        p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None and p.stdout.readline().strip() == "open"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        with CoherentVolume(root, agent="after") as v:
            # the next commit completes or abandons what the killed one left, then goes ahead
            before = int(v.read("plans/c.md"))
            assert v.write("plans/c.md", f"{before + 1}\n") > 0
            assert int(v.read("plans/c.md")) == before + 1
            history = v.history("plans/c.md")
        assert [h.version for h in history] == list(range(len(history), 0, -1))
        assert _q(pg_url, UNSETTLED) == [(0,)]
    final = int((root / "plans/c.md").read_bytes())
    assert final == len(history) - 1  # every version is one increment: none lost, none made twice


# ---- a database restart during commits --------------------------------------------------------------------


def test_a_database_restart_during_commits_loses_nothing(root: Path, pg_cluster: Any) -> None:
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/c.md", "0\n")
    acknowledged: list[int] = []
    errors: list[RegistryError] = []
    stop = threading.Event()

    def agent(name: str) -> None:
        with CoherentVolume(root, agent=name) as v:
            while not stop.is_set():
                try:
                    v.update("plans/c.md", lambda b: str(int(b) + 1) + "\n")
                    acknowledged.append(1)
                except RegistryError as e:
                    errors.append(e)  # typed: the registry was away; nothing half-done
                    time.sleep(0.05)
                except StaleWriteError:
                    pass  # the other agents won every retry: refused, nothing changed

    threads = [threading.Thread(target=agent, args=(f"a{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        before = len(acknowledged)
        pg_cluster.restart()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert before > 0 and len(acknowledged) > before, "commits went on after the restart"
    unknown = [e for e in errors if "outcome unknown" in str(e)]
    assert all(e.errno in (errno.EIO, errno.EBUSY) for e in errors), errors
    with CoherentVolume(root, agent="final") as v:
        final = int(v.read("plans/c.md"))
        versions = [h.version for h in v.history("plans/c.md")]
    assert versions == list(range(len(versions), 0, -1))
    assert final == len(versions) - 1  # each version one increment
    assert len(acknowledged) <= final <= len(acknowledged) + len(errors)  # no acknowledged commit lost
    assert len(unknown) <= len(errors)


# ---- a lost COMMIT reply ------------------------------------------------------------------------------------


@pytest.fixture
def proxied(tmp_path: Path, pg_cluster: Any, pg_url: str) -> Iterator[tuple[Path, CommitProxy]]:
    proxy = CommitProxy(("127.0.0.1", pg_cluster.port))
    db = pg_url.rsplit("/", 1)[1]
    try:
        yield _pg_volume(tmp_path / "vol", f"postgresql://cv@127.0.0.1:{proxy.port}/{db}"), proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("lost", ["reply", "commit"])
def test_an_init_whose_commit_or_reply_is_lost_made_the_volume_once_or_nothing(
    tmp_path: Path, pg_cluster: Any, pg_url: str, lost: str
) -> None:
    """`init` creating a volume loses its COMMIT's reply: it asks the registry whether it landed and
    goes on as created (it said "nothing was written", and the same `init` again was told the volume
    existed; joining it left a second registration of the root). Its COMMIT lost: nothing was made,
    as it says, and the same `init` again makes it."""
    proxy = CommitProxy(("127.0.0.1", pg_cluster.port))
    url = f"postgresql://cv@127.0.0.1:{proxy.port}/{pg_url.rsplit('/', 1)[1]}"
    root, name = tmp_path / "vol", f"lost-{lost}"
    init = [CLI, "init", str(root), "--managed", "plans/**", "--registry", url, "--volume", name]
    try:
        assert subprocess.run([CLI, "migrate", "--registry", pg_url], capture_output=True).returncode == 0
        proxy.armed = lost  # the next COMMIT is init's: the volume and its first working copy
        first = subprocess.run(init, capture_output=True, text=True, timeout=120)
        assert proxy.dropped == [lost]
        if lost == "commit":
            assert first.returncode == 1 and "nothing was written" in first.stderr, first.stderr
            assert _q(pg_url, "SELECT count(*) FROM cv_volumes WHERE name = %s", (name,)) == [(0,)]
            first = subprocess.run(init, capture_output=True, text=True, timeout=120)
        assert first.returncode == 0, first.stderr
        rows = _q(
            pg_url, "SELECT count(*) FROM cv_replicas r JOIN cv_volumes v ON v.id = r.volume WHERE v.name = %s", (name,)
        )
        assert rows == [(1,)]
        with CoherentVolume(root, agent="alice") as alice:
            assert alice.write("plans/a.md", "one\n") == 1
    finally:
        proxy.close()


@pytest.mark.parametrize("lost", ["reply", "commit"])
def test_a_lost_commit_or_reply_is_resolved_by_the_commit_id(
    proxied: tuple[Path, CommitProxy], pg_url: str, lost: str
) -> None:
    root, proxy = proxied
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        v.read("plans/a.md")
        commits = _q(pg_url, "SELECT count(*) FROM cv_commits")[0][0]
        proxy.armed = lost
        assert v.write("plans/a.md", "two\n") == 2  # landed once (reply lost) or re-run (commit lost)
        assert proxy.dropped == [lost]
        assert [(h.version, h.writer, h.size) for h in v.history("plans/a.md")] == [(2, "alice", 4), (1, "alice", 4)]
    log = _q(pg_url, "SELECT kind, version FROM cv_events ORDER BY seq")
    assert log == [("commit", 1), ("commit", 2)]  # never applied twice
    assert (root / "plans/a.md").read_bytes() == b"two\n"
    assert _q(pg_url, UNSETTLED) == [(0,)]
    # the transactions that committed: the lost one counted once whichever way it went
    assert _q(pg_url, "SELECT count(*) FROM cv_commits")[0][0] > commits


@pytest.mark.parametrize("landed", [True, False])
def test_a_client_failure_while_the_commit_is_on_the_wire_is_resolved_by_the_commit_id(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, landed: bool
) -> None:
    """psycopg can fail on the client's side with its COMMIT sent and no SQLSTATE (a session ended
    by the server mid-reply gave "cannot exit pipeline mode while busy"): whether it landed is the
    commit id's to say. Before, it was reported as "nothing was written" even where it landed."""
    real = pg_transaction.PostgresTransaction.commit
    failed: list[bool] = []

    def commit(tx: pg_transaction.PostgresTransaction) -> None:
        if not failed:
            failed.append(landed)
            if landed:
                real(tx)
            raise psycopg.InterfaceError("cannot exit pipeline mode while busy")
        real(tx)

    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "one\n")
        v.read("plans/a.md")
        monkeypatch.setattr(pg_transaction.PostgresTransaction, "commit", commit)
        assert v.write("plans/a.md", "two\n") == 2  # landed once, or run again
        monkeypatch.undo()
        assert failed == [landed]
        assert [(h.version, h.writer, h.size) for h in v.history("plans/a.md")] == [(2, "alice", 4), (1, "alice", 4)]
    assert _q(pg_url, "SELECT kind, version FROM cv_events ORDER BY seq") == [("commit", 1), ("commit", 2)]
    assert (root / "plans/a.md").read_bytes() == b"two\n"
    assert _q(pg_url, UNSETTLED) == [(0,)]


def test_content_larger_than_a_part_goes_to_the_server_once_not_as_a_doubled_literal(
    proxied: tuple[Path, CommitProxy],
) -> None:
    """A content of several parts is sent before the COMMIT (a part at a time): its bytes go as they
    are, never bound into a text literal (hex: twice the bytes, and their encoding)."""
    root, proxy = proxied
    data = os.urandom(20 << 20)  # three parts, incompressible
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/small.md", "warm\n")
        before = proxy.sent
        assert v.write("plans/big.bin", data) == 1
        sent = proxy.sent - before
        assert sent < 1.05 * len(data), f"{sent / len(data):.2f} times the content was sent"
    with CoherentVolume(root, agent="bob") as b:
        assert b.read("plans/big.bin") == data
        assert b.read_version("plans/big.bin", 1) == data


def test_a_lost_reply_with_the_registry_gone_says_the_outcome_is_unknown(
    proxied: tuple[Path, CommitProxy], pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, proxy = proxied
    monkeypatch.setattr(pg_connections, "CONNECT_WAIT", 0.5)
    core = open_core(root)
    registry = core.registry
    assert isinstance(registry, postgresql.PostgresRegistry)
    try:
        registry.transact(lambda tx: tx.put_meta("counter", "0"))  # a connection is open through the proxy
        proxy.armed = "reply"
        proxy.close()  # and no new connection gets through

        with pytest.raises(RegistryError) as unknown:
            registry.transact(lambda tx: tx.put_meta("counter", "1"))
        assert unknown.value.errno == errno.EIO
        message = str(unknown.value)
        assert "outcome unknown (commit id" in message and "coherent-volume history ROOT PATH" in message
        commit_id = message.split("commit id ")[1].split(")")[0]
        # it had landed: the id says so
        assert _q(pg_url, "SELECT count(*) FROM cv_commits WHERE id = %s", (commit_id,)) == [(1,)]
        assert _q(pg_url, "SELECT value FROM cv_meta WHERE key = 'counter'") == [("1",)]
    finally:
        registry.close()


# ---- a contention sweep, judged by the history checker ---------------------------------------------------


def test_a_contention_sweep_of_processes_on_one_path_passes_the_history_checker(tmp_path: Path, pg_url: str) -> None:
    from .harness import checker
    from .harness.history import History
    from .harness.resolve import log_versions, resolve
    from .harness.sweeps import load_records, spawn_agent, wait_all
    from .harness.volumes import audit_pg_store, final_state, read_log, seed
    from .harness.workers import Workload

    root = _pg_volume(tmp_path / "vol", pg_url, managed=("plans/**",))
    paths = ["plans/counter.md"]
    producers = seed(root, paths)
    records = tmp_path / "records"
    records.mkdir()
    work = Workload(paths, attempts=15)
    errors = wait_all([spawn_agent("api", root, f"p{i}", work, records / f"p{i}.jsonl", i) for i in range(4)], 300)
    assert not errors, errors
    attempts = load_records(records)
    final, versions = final_state(root, paths)
    events = read_log(root)
    store = audit_pg_store(lambda query: _q(pg_url, query), root, paths)
    problems = resolve(attempts, events)
    history = History("file", True, producers, attempts, set(), final, versions, log_versions(events), store=store)
    verdict = checker.check(history)
    assert not problems, problems
    assert verdict.ok, verdict.messages
    accepted = sum(1 for a in attempts if a.committed)
    assert accepted > 0 and versions["plans/counter.md"] == accepted + 1  # the seed, then one per accepted commit


FORKS = """
import os, sys
from coherent_volume import CoherentVolume
v = CoherentVolume(sys.argv[1], agent="parent")
v.write("plans/a.md", "one\\n")  # the parent has connections open now
pid = os.fork()
if pid == 0:  # the child uses the volume it inherited, then exits the ordinary way (finalizers run)
    v.read("plans/a.md")
    v.write("plans/b.md", "child\\n")
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert v.read("plans/b.md") == b"child\\n"
print(v.write("plans/a.md", "two\\n"))  # the parent's sessions are intact
"""


def test_a_forked_child_never_uses_or_ends_its_parents_sessions(root: Path) -> None:
    done = run_py(FORKS, str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2"]


FORK_DURING_A_REPORT = """
import os, signal, sys, threading, time
from coherent_volume import CoherentVolume
from coherent_volume.registry.replica import Replica
parent = os.getpid()
inside, go = threading.Event(), threading.Event()
unreported = Replica.unreported
def held(self):  # the parent's reporting thread is inside the working copy's state when the fork comes
    if os.getpid() == parent and threading.current_thread().name == "coherent-volume working copy report":
        with self._mutex:
            inside.set()
            go.wait(60)
    return unreported(self)
Replica.unreported = held
v = CoherentVolume(sys.argv[1], agent="parent")
v.write("plans/a.md", "one\\n")  # its report is sent half a second later, by the reporting thread
assert inside.wait(30)
pid = os.fork()
if pid == 0:
    v.write("plans/b.md", "child\\n")  # records what its working copy holds
    os._exit(0)
deadline = time.monotonic() + 30
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        go.set()
        sys.exit("the child hung on the working copy's state its parent's thread held at the fork")
    time.sleep(0.05)
go.set()
print(v.read("plans/b.md").decode().strip())
"""


def test_a_child_forked_while_a_thread_is_inside_the_working_copys_state_goes_on(root: Path) -> None:
    done = run_py(FORK_DURING_A_REPORT, str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["child"]


def test_content_is_stored_in_parts_and_served_only_whole_and_intact(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg_transaction, "PART", 1000)
    data = bytes(range(256)) * 10  # 2,560 bytes: three parts
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/big.md", data)
        v.write("plans/big.md", "small\n")
        assert v.read_version("plans/big.md", 1) == data
        assert _q(pg_url, "SELECT part, length(data) FROM cv_content_parts ORDER BY part") == [(1, 1000), (2, 560)]
        _q(pg_url, "UPDATE cv_content_parts SET data = 'x'::bytea WHERE part = 2")
        with pytest.raises(DamagedContent, match="damaged"):
            v.read_version("plans/big.md", 1)
        _q(pg_url, "DELETE FROM cv_content_parts WHERE part = 2")
        with pytest.raises(DamagedContent, match="2,000 of its 2,560 bytes"):
            v.read_version("plans/big.md", 1)
        assert v.read_version("plans/big.md", 2) == b"small\n"
        _q(pg_url, "DELETE FROM cv_contents WHERE size = 2560")  # its history still says it is retained
        with pytest.raises(DamagedContent, match="the store is damaged"):
            v.read_version("plans/big.md", 1)
    shown = subprocess.run([CLI, "show", str(root), "plans/big.md", "--version", "1"], capture_output=True, text=True)
    assert shown.returncode == 5 and "holds none under its hash" in shown.stderr and "pruned" not in shown.stderr


def test_a_working_copy_reports_a_damaged_current_version_and_brings_in_every_other_file(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """One damaged stored version never stops a working copy's sync: joining, `status` and the
    mount's resync (all `scan`) report the file it cannot install, keep what the copy holds of it,
    and bring in every other file (before, the first damaged file ended the scan: the join failed
    half made, and no file sorting after it came in)."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/a.md", "a1\n")
        v.write("plans/m.md", "m1\n")
    with CoherentVolume(other, agent="bob") as v:
        v.read("plans/m.md")  # installed in the other copy at v1
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/m.md", "m2\n")
        v.write("plans/z.md", "z1\n")
        v.write("plans/a.md", "a2\n")
    _q(pg_url, "UPDATE cv_contents SET data = 'x'::bytea WHERE data = 'm2\n'::bytea")
    status = subprocess.run([CLI, "status", str(other)], capture_output=True, text=True)
    assert "plans/m.md" in status.stdout + status.stderr and "damaged" in status.stdout + status.stderr, status
    assert (other / "plans/m.md").read_text() == "m1\n"
    assert (other / "plans/z.md").read_text() == "z1\n" and (other / "plans/a.md").read_text() == "a2\n"
    joined = subprocess.run(
        [CLI, "init", str(tmp_path / "third"), "--registry", pg_url, "--volume", "vol"], capture_output=True, text=True
    )
    assert joined.returncode == 0 and "not checked: plans/m.md" in joined.stderr and "damaged" in joined.stderr, joined
    assert (tmp_path / "third/plans/z.md").read_text() == "z1\n" and not (tmp_path / "third/plans/m.md").exists()


def test_a_name_another_copy_made_a_file_or_a_directory_of_files_is_refused_as_the_other_kind(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """Each copy checks its own disk, so a copy that does not hold another copy's file yet could
    commit a file below it, or a file at the name of its directory: the volume then held both, and
    neither copy could install the other's file (found by a hostile probe). The registry refuses
    the second as a disk holding both would (ENOTDIR, EISDIR), nothing changed, saying what to do."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/x.md", "alice's\n")
        v.write("plans/d/inner.md", "alice's inner\n")
    with CoherentVolume(other, agent="bob") as v:
        for path, code, holds in [
            ("plans/x.md/inner.md", errno.ENOTDIR, "a file on its way, plans/x.md v1 (by alice)"),
            ("plans/x.md/deeper/inner.md", errno.ENOTDIR, "a file on its way, plans/x.md v1 (by alice)"),
            ("plans/d", errno.EISDIR, "a file below it, plans/d/inner.md v1 (by alice)"),
        ]:
            with pytest.raises(TreeClash, match="to bring this working copy up to date") as clash:
                v.write(path, "bob's\n")
            assert clash.value.errno == code and holds in str(clash.value), clash.value
            assert v.history(path) == []
            assert not (other / path).is_file()
        assert not (other / "plans/x.md").is_dir(), "the refused write made a directory in the way"
        assert v.read("plans/x.md") == b"alice's\n" and v.read("plans/d/inner.md") == b"alice's inner\n"
    rows = _q(pg_url, "SELECT path FROM cv_files WHERE present ORDER BY path")
    assert rows == [("plans/d/inner.md",), ("plans/x.md",)]


def test_a_directory_rename_that_would_split_or_mix_another_copys_files_is_refused(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """A copy that has not installed another copy's file in a directory yet does not see it there:
    renaming plans/a over plans/b mixed the two directories' files, and two copies renaming a→b
    and b→a at once swapped them; an exchange mixed them the same way whichever side held the file;
    renaming plans/a away left the file behind (found by hostile probes). The registry refuses
    each, nothing changed: ENOTEMPTY over a directory a disk holding the file would find not
    empty, EBUSY where the file would be left behind or mixed in."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="alice") as a:
        a.write("plans/a/one.md", "alice's\n")
    with CoherentVolume(other, agent="bob") as b:
        b.write("plans/b/two.md", "bob's\n")
    core = open_core(root)
    try:
        refusals = [
            ("plans/a", "plans/b", False, errno.ENOTEMPTY, "plans/b cannot be replaced by the directory plans/a"),
            ("plans/a", "plans/b", True, errno.EBUSY, "plans/b cannot be moved"),
            ("plans/b", "plans/a", True, errno.EBUSY, "plans/b cannot be moved"),  # the file on the source's side
            ("plans/b", "plans/c", False, errno.EBUSY, "plans/b cannot be moved"),  # it would stay behind
        ]
        for src, dst, exchange, code, said in refusals:
            (root / "plans/b").mkdir(exist_ok=True)
            with pytest.raises(TreeClash, match="not installed yet, plans/b/two.md v1 \\(by bob\\)") as clash:
                core.rename("alice", core.resolve(src), core.resolve(dst), exchange=exchange)
            assert clash.value.errno == code and said in str(clash.value), (src, dst, exchange, clash.value)
            assert (root / "plans/a/one.md").read_text() == "alice's\n" and not any((root / "plans/b").iterdir())
    finally:
        core.close()
    with CoherentVolume(root, agent="alice") as a:
        assert a.read("plans/b/two.md") == b"bob's\n" and a.read("plans/a/one.md") == b"alice's\n"
        assert [e.version for e in a.history("plans/a/one.md")] == [1]
    with CoherentVolume(other, agent="bob") as b:
        b.read("plans/b/two.md")
        b.write("plans/b/three.md", "bob's third\n")  # plans/b: one file installed on root's copy, one not
    core = open_core(root)
    try:
        with pytest.raises(TreeClash, match="not installed yet, plans/b/three.md") as clash:
            core.rename("alice", core.resolve("plans/a"), core.resolve("plans/b"), exchange=True)
        assert clash.value.errno == errno.EBUSY
        with pytest.raises(OSError) as full:  # installed: the disk refuses it as any disk would
            core.rename("alice", core.resolve("plans/a"), core.resolve("plans/b"))
        assert full.value.errno == errno.ENOTEMPTY
    finally:
        core.close()


def test_two_copies_making_a_file_and_a_file_below_it_at_once_never_both_land(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """The tree locks order a file's creation after every creation below it and the other way
    round, across copies (`pg_transaction.Holds.trees`): raced many times, one lands and the
    other is refused, never both; files made side by side in one directory all land."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="alice") as a, CoherentVolume(other, agent="bob") as b:

        def make(v: CoherentVolume, path: str, start: threading.Barrier, outcomes: dict[str, str]) -> None:
            start.wait()
            try:
                v.write(path, f"{path}\n")
                outcomes[path] = "landed"
            except TreeClash:
                outcomes[path] = "refused"

        for i in range(25):
            outcomes: dict[str, str] = {}
            start = threading.Barrier(2)
            pair = [(a, f"plans/r{i}"), (b, f"plans/r{i}/inner.md")][:: 1 if i % 2 else -1]
            threads = [threading.Thread(target=make, args=(*arg, start, outcomes)) for arg in pair]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(outcomes.values()) == ["landed", "refused"], (i, outcomes)
        siblings = [threading.Thread(target=v.write, args=(f"plans/s/{n}.md", "x\n")) for n, v in enumerate([a, b] * 4)]
        for t in siblings:
            t.start()
        for t in siblings:
            t.join()
    assert len(_q(pg_url, "SELECT path FROM cv_files WHERE present AND starts_with(path, %s)", ("plans/s/",))) == 8


def test_a_rename_onto_a_name_another_copy_makes_a_file_at_once_never_both_land(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """A rename records its new names as intents until its install is recorded; a creation in
    their way asks for those too (`file_in_the_way`), so a directory renamed onto a name another
    copy makes a file, or a file renamed onto the directory of another copy's new file, never both
    land (before: 13 clashes in 60 such races through a mount, found by a hostile probe)."""
    other = _join(tmp_path / "other", pg_url)
    moving = open_core(other)

    def race(rename: Callable[[], None], write: Callable[[], None]) -> list[str]:
        outcomes: list[str] = []
        start = threading.Barrier(2)

        def run(step: Callable[[], None]) -> None:
            start.wait()
            try:
                step()
                outcomes.append("landed")
            except (TreeClash, NotADirectoryError, IsADirectoryError):
                outcomes.append("refused")

        threads = [threading.Thread(target=run, args=(step,)) for step in (rename, write)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(outcomes)

    try:
        with CoherentVolume(other, agent="bob") as b, CoherentVolume(root, agent="alice") as a:
            for i in range(15):
                b.write(f"plans/t{i}/f.md", "moved\n")
                b.write(f"plans/u{i}.md", "moved\n")
                dirs = race(
                    partial(moving.rename, "bob", moving.resolve(f"plans/t{i}"), moving.resolve(f"plans/m{i}")),
                    partial(a.write, f"plans/m{i}", "made\n"),
                )
                files = race(
                    partial(moving.rename, "bob", moving.resolve(f"plans/u{i}.md"), moving.resolve(f"plans/w{i}")),
                    partial(a.write, f"plans/w{i}/in.md", "made\n"),
                )
                assert dirs == files == ["landed", "refused"], (i, dirs, files)
    finally:
        moving.close()
    present = {path for (path,) in _q(pg_url, "SELECT path FROM cv_files WHERE present")}
    assert not [(p, q) for p in present for q in present if q.startswith(p + "/")]


def test_a_creation_in_the_way_of_a_rename_whose_install_is_not_recorded_says_so(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """A rename's intent (here: left as a killed renamer leaves it) refuses a creation in its way,
    and the message says it is a rename under way, not a file the volume holds (the history has
    none yet: found by a hostile probe); reading the file, as the message says, settles it."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(other, agent="bob") as b:
        b.write("plans/src.md", "moved\n")
    with CoherentVolume(root, agent="alice") as a:
        a.write("plans/alice.md", "first\n")  # (a process's first transaction settles every intent)
        renamer = open_core(other)
        try:
            intent = Intent("plans/dst/f.md", "bob", 1, True, content_hash(b"moved\n"), None)
            renamer.registry.transact(lambda tx: tx.put_intent(intent), ["plans/dst/f.md"])
        finally:
            renamer.close()
        with pytest.raises(TreeClash, match="a rename by bob is putting a file below it, plans/dst/f.md") as clash:
            a.write("plans/dst", "alice's\n")
        assert clash.value.errno == errno.EISDIR and "install is not recorded yet" in str(clash.value)
        assert a.history("plans/dst") == []


def test_a_name_one_copy_made_a_file_and_another_a_directory_is_reported_on_both(
    root: Path, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A volume whose registry holds a name as a file and as a directory of files (as two copies
    could record before their commits were checked against the registry's tree: the check is
    switched off here to make one) stays usable: neither copy can install the other's file, and
    each says so, naming the clash and what to do (before: the bare errno text, and `history`
    crashed with a NotADirectoryError from deep inside)."""
    monkeypatch.setattr(Writes, "_refuse_in_the_way", staticmethod(lambda tx, target: None))
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(other, agent="bob") as v:
        v.write("plans/x.md/inner.md", "bob's\n")
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/x.md", "alice's\n")
    monkeypatch.undo()
    for copy, clash in [(root, "plans/x.md is a file here"), (other, "plans/x.md is a directory here")]:
        status = subprocess.run([CLI, "status", str(copy)], capture_output=True, text=True)
        assert clash in status.stdout + status.stderr and "the volume holds both" in status.stdout + status.stderr
    with CoherentVolume(root, agent="alice") as v:
        with pytest.raises(TreeClash, match="Rename or delete the file, or every file under the directory") as clash:
            v.read("plans/x.md/inner.md")
        assert clash.value.errno == errno.ENOTDIR
        # what the registry holds of it stays readable on the copy that cannot install it
        assert [e.writer for e in v.history("plans/x.md/inner.md")] == ["bob"]
        assert v.read_version("plans/x.md/inner.md", 1) == b"bob's\n"
    patches = subprocess.run([CLI, "log", str(root), "-p"], capture_output=True, text=True)
    assert patches.returncode == 0 and "+bob's" in patches.stdout and "+alice's" in patches.stdout, patches
    assert (root / "plans/x.md").read_text() == "alice's\n" and (other / "plans/x.md/inner.md").read_text() == "bob's\n"
    # resolved as the message says, on the copy where the name is a directory: bob deletes his file
    with CoherentVolume(other, agent="bob") as v:
        v.read("plans/x.md/inner.md")
        v.delete("plans/x.md/inner.md")
        assert v.read("plans/x.md") == b"alice's\n"  # the empty directory left in the way is gone
    for copy in (root, other):
        status = subprocess.run([CLI, "status", str(copy)], capture_output=True, text=True)
        assert status.returncode == 0 and "the volume holds both" not in status.stdout + status.stderr, status


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_only_a_tree_of_empty_directories_on_its_own_file_system_is_removed_for_a_catch_up(tmp_path: Path) -> None:
    """What a working copy removes to install a file where it kept a directory: a tree of empty
    directories, never one holding a file or a symlink, never across a mount point (found by a
    hostile probe: the empty directories inside a tmpfs mounted there were removed)."""
    empty = tmp_path / "empty"
    (empty / "a/b").mkdir(parents=True)
    assert _removed_if_empty(str(empty)) and not empty.exists()
    linked = tmp_path / "linked"
    (linked / "a").mkdir(parents=True)
    (linked / "link").symlink_to(tmp_path)
    assert not _removed_if_empty(str(linked)) and (linked / "a").is_dir()
    mounted = tmp_path / "mounted"
    (mounted / "x").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted / "x")], check=True)
    try:
        (mounted / "x/m1/m2").mkdir(parents=True)
        assert not _removed_if_empty(str(mounted)) and (mounted / "x/m1/m2").is_dir()
    finally:
        subprocess.run(["umount", str(mounted / "x")], check=True)


@pytest.mark.parametrize("parts", [False, True], ids=["one part", "several parts"])
def test_a_version_committed_again_over_damaged_content_is_stored_whole(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, parts: bool
) -> None:
    """Content is stored once per hash: committing the same bytes again replaces a damaged copy
    instead of naming it (the new version would be born damaged)."""
    monkeypatch.setattr(pg_transaction, "PART", 1000)
    data = bytes(range(256)) * 10 if parts else b"precious\n"
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/p.md", data)
        v.write("plans/p.md", "other\n")
        table = "cv_content_parts WHERE part = 2" if parts else "cv_contents WHERE size = 9"
        _q(pg_url, f"UPDATE {table.split(' WHERE')[0]} SET data = 'x'::bytea WHERE{table.split('WHERE')[1]}")
        with pytest.raises(DamagedContent):
            v.read_version("plans/p.md", 1)
        again = v.write("plans/p.md", data)
        v.write("plans/p.md", "later\n")
        assert v.read_version("plans/p.md", again) == data
        assert v.read_version("plans/p.md", 1) == data


def test_a_writer_commits_another_path_while_a_transaction_of_another_working_copy_stays_open(
    tmp_path: Path, root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each write transaction locks the paths it touches, not the volume: while a transaction of
    another working copy holds plans/a.md open (stopped inside it), a write of plans/b.md commits
    at once, and one of plans/a.md waits for it (EBUSY past the wait, naming it)."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="alice") as v:
        assert v.write("plans/b.md", "one\n") == 1  # this process's first transaction (the whole volume's)
        holder = _holder(other, "transaction")
        try:
            monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 0.5)
            assert v.write("plans/b.md", "two\n") == 2
            assert v.read("plans/b.md") == b"two\n"
            with pytest.raises(RegistryError) as busy:
                v.write("plans/a.md", "one\n")
            assert busy.value.errno == errno.EBUSY
            assert f"held by coherent-volume {socket.gethostname()} {holder.pid} (PostgreSQL backend" in str(busy.value)
        finally:
            holder.kill()
            holder.wait()
    assert _q(pg_url, "SELECT path, version FROM cv_files ORDER BY path") == [("plans/b.md", 2)]


def test_a_path_of_the_read_set_locked_past_the_wait_is_ebusy_naming_its_holder(
    tmp_path: Path, root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A path of a read set is locked when the check reaches it (its lock's key sorting after the
    written path's): held by a transaction of another working copy past the wait, the write fails
    EBUSY naming that holder, and nothing is written."""
    other = _join(tmp_path / "other", pg_url)
    volume = _volume_id(pg_url)
    held = pg_transaction.path_key(volume, "plans/a.md")
    x = next(p for p in (f"plans/n{i}.md" for i in itertools.count()) if pg_transaction.path_key(volume, p) < held)
    with CoherentVolume(root, agent="alice", isolation="read-set") as v:
        v.write(x, "x\n")
        v.write("plans/a.md", "a\n")
        assert v.read("plans/a.md") == b"a\n"
        holder = _holder(other, "transaction")  # it holds plans/a.md
        try:
            monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 0.5)
            with pytest.raises(RegistryError) as busy:
                v.write(x, "two\n")
            assert busy.value.errno == errno.EBUSY
            assert f"held by coherent-volume {socket.gethostname()} {holder.pid} (PostgreSQL backend" in str(busy.value)
        finally:
            holder.kill()
            holder.wait()
        assert v.read(x) == b"x\n"
    assert _q(pg_url, "SELECT path, version FROM cv_files ORDER BY path") == sorted([("plans/a.md", 1), (x, 1)])


def test_a_content_locked_past_the_wait_is_ebusy_naming_its_holder(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stored content's lock held past the wait (a prune stuck while it drops that content, a slow
    store of it in parts) makes a commit of the same bytes fail EBUSY naming the holder, as a held
    path's lock does, and nothing is written."""
    data = b"the same bytes\n"
    key = pg_transaction.content_key(_volume_id(pg_url), xxhash.xxh3_128_hexdigest(data))
    with CoherentVolume(root, agent="alice") as v, psycopg.connect(pg_url, application_name="stuck-prune") as held:
        v.write("plans/a.md", "a\n")
        held.execute("SELECT pg_advisory_xact_lock(%s)", (key,))  # its transaction stays open
        monkeypatch.setattr(pg_registry, "COMMIT_LOCK_TIMEOUT", 0.5)
        with pytest.raises(RegistryError) as busy:
            v.write("plans/b.md", data)
        assert busy.value.errno == errno.EBUSY
        assert f"held by stuck-prune (PostgreSQL backend {held.info.backend_pid}" in str(busy.value), busy.value
        held.rollback()
        assert v.write("plans/b.md", data) == 1
    assert _q(pg_url, "SELECT path, version FROM cv_files ORDER BY path") == [("plans/a.md", 1), ("plans/b.md", 1)]


PAUSED_IN_READ_SET = """
import sys, time
from pathlib import Path
from coherent_volume import CoherentVolume
from coherent_volume.core.base import CoreBase
root, gate, ours, theirs = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
changed = CoreBase._changed_read_set
def paused(self, tx, agent, rel):
    found = changed(self, tx, agent, rel)  # the locks of the paths read are taken with this read
    (gate / "in-read-set").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)
    return found
CoreBase._changed_read_set = paused
with CoherentVolume(root, agent="alice", isolation="read-set") as v:
    v.read(ours)
    v.read(theirs)
    print(v.write(ours, "alice\\n"), flush=True)
"""


def _ordered(volume: Any, first_before_second: bool) -> tuple[str, str]:
    """Two managed paths whose locks' keys sort in the order asked."""
    names = [f"plans/n{i}.md" for i in range(20)]
    for a in names:
        for b in names:
            if (
                a != b
                and (pg_transaction.path_key(volume, a) < pg_transaction.path_key(volume, b)) == first_before_second
            ):
                return a, b
    raise AssertionError("no such pair")


@pytest.mark.parametrize("order", ["bob's path sorts first", "alice's path sorts first"])
def test_read_set_isolation_refuses_write_skew_between_working_copies_committing_together(
    tmp_path: Path, root: Path, pg_url: str, order: str
) -> None:
    """Alice (this working copy) and bob (another) each read x and y, then write one of them with
    read-set isolation at the same time: alice stopped inside her transaction once her read set is
    checked, bob's commit waits for the path she holds and is refused `read-set` once she commits,
    in either order of the two paths' locks. Never both: no write skew."""
    other = _join(tmp_path / "other", pg_url)
    y, x = _ordered(_volume_id(pg_url), order == "bob's path sorts first")  # bob writes y, alice x
    with CoherentVolume(root, agent="seed") as v:
        v.write(x, "x\n")
        v.write(y, "y\n")
    outcome: list[BaseException | int] = []
    with CoherentVolume(other, agent="bob", isolation="read-set") as bob:
        bob.read(x)
        bob.read(y)
        gate = tmp_path / "gate"
        code = PAUSED_IN_READ_SET.replace("sys.argv[3], sys.argv[4]", f"{x!r}, {y!r}")
        alice = _paused(code, root, gate, "in-read-set")
        try:
            writer = threading.Thread(target=lambda: outcome.append(_attempted(lambda: bob.write(y, "bob\n"))))
            writer.start()
            deadline = time.monotonic() + 30
            while not _q(pg_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
                assert writer.is_alive() and time.monotonic() < deadline, outcome  # bob waits for alice's lock
                time.sleep(0.02)
            (gate / "go").touch()
            assert alice.stdout is not None and alice.stdout.readline().strip() == "2"
            writer.join(60)
        finally:
            (gate / "go").touch()
            alice.wait(60)
    assert len(outcome) == 1 and isinstance(outcome[0], StaleWriteError), outcome
    assert outcome[0].reason == "read-set" and outcome[0].changed == (x,)
    assert _q(pg_url, "SELECT path, version, writer FROM cv_files ORDER BY path") == sorted(
        [(x, 2, "alice"), (y, 1, "seed")]
    )


PAUSED_BEFORE_COMMIT = """
import sys, time
from pathlib import Path
from coherent_volume import CoherentVolume
from coherent_volume.registry.pg_transaction import PostgresTransaction
root, gate = sys.argv[1], Path(sys.argv[2])
commit = PostgresTransaction.commit
def paused(self):
    self.run("SELECT 1")  # what it wrote (its log line too) is in the database, not committed
    (gate / "before-commit").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)
    commit(self)
with CoherentVolume(root, agent="alice") as v:
    v.write("plans/warm.md", "warm\\n")  # this process's first transaction (the whole volume's)
    PostgresTransaction.commit = paused
    print(v.write("plans/a.md", "alice\\n"), flush=True)
"""


def test_log_follow_prints_a_commit_that_lands_after_a_later_numbered_one(
    tmp_path: Path, root: Path, pg_url: str
) -> None:
    """Writers of different paths commit side by side, so a log line numbered first may land last:
    alice's commit (this working copy) is stopped inside its transaction, its log line written,
    while bob's (another copy) commits. `log --follow` prints bob's at once, and alice's once it
    lands: never skipped."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/seed.md", "seed\n")
    follower = subprocess.Popen([CLI, "log", str(root), "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        assert json.loads(follower.stdout.readline())["path"] == "plans/seed.md"
        with CoherentVolume(other, agent="bob") as bob:
            bob.write("plans/warm-bob.md", "warm\n")  # this process's first transaction (the whole volume's)
            assert json.loads(follower.stdout.readline())["path"] == "plans/warm-bob.md"
            env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
            gate = tmp_path / "gate"
            gate.mkdir()
            alice = subprocess.Popen(
                [sys.executable, "-c", PAUSED_BEFORE_COMMIT, str(root), str(gate)],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            try:
                deadline = time.monotonic() + 60
                while not (gate / "before-commit").exists():
                    assert alice.poll() is None and time.monotonic() < deadline
                    time.sleep(0.02)
                assert json.loads(follower.stdout.readline())["path"] == "plans/warm.md"
                assert bob.write("plans/b.md", "bob\n") == 1
                assert json.loads(follower.stdout.readline())["path"] == "plans/b.md"
            finally:
                (gate / "go").touch()
                assert alice.stdout is not None and alice.stdout.readline().strip() == "1"
                alice.wait(60)
        timer = threading.Timer(10, follower.kill)  # it would wait for ever for a line it skipped
        timer.start()
        try:
            line = follower.stdout.readline()
        finally:
            timer.cancel()
        assert line, "log --follow never printed alice's commit"
        assert (json.loads(line)["path"], json.loads(line)["agent"]) == ("plans/a.md", "alice")
    finally:
        follower.kill()
        follower.wait()


def _attempted(write: Callable[[], int]) -> BaseException | int:
    try:
        return write()
    except BaseException as e:
        return e


def _volume_id(url: str) -> Any:
    return _q(url, "SELECT id FROM cv_volumes")[0][0]


# ---- a commit's install never lands over a newer version ------------------------------------------------

PAUSED_AT_INSTALL = """
import os, sys, time
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, gate = sys.argv[1], Path(sys.argv[2])
install = atomic.Staged.install
def paused(self, *args, **kwargs):
    (gate / "at-install").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)
    return install(self, *args, **kwargs)
atomic.Staged.install = paused
with CoherentVolume(root, agent="alice") as v:
    v.read("plans/p.md")
    print(v.write("plans/p.md", "alice\\n"))
"""


def _paused(code: str, root: Path, gate: Path, marker: str) -> subprocess.Popen[str]:
    """A process running `code` (argv: root, gate) once it has paused where it makes `gate`/`marker`
    (it goes on when the test makes `gate`/go)."""
    gate.mkdir()
    paused = subprocess.Popen([sys.executable, "-c", code, str(root), str(gate)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (gate / marker).exists():
        if paused.poll() is not None or time.monotonic() >= deadline:
            paused.kill()
            paused.wait()
            raise AssertionError(f"the paused process never reached {marker} (exit {paused.returncode})")
        time.sleep(0.02)
    return paused


@pytest.mark.parametrize("bob_in", ["this working copy", "another working copy"])
def test_a_commit_whose_database_session_ended_before_its_install_never_replaces_a_newer_version(
    tmp_path: Path, root: Path, pg_url: str, bob_in: str
) -> None:
    """Alice's decision is committed and she is about to install it when her database sessions are
    terminated (none holds a lock: the database's lock ended with her COMMIT; her working copy's is
    her process's); bob then reads and commits. Her install must not land over bob's newer version,
    in either working copy, and her commit is reported as what it is."""
    other = _join(tmp_path / "other", pg_url) if bob_in == "another working copy" else root
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/p.md", "base\n")
    gate = tmp_path / "gate"
    alice = _paused(PAUSED_AT_INSTALL, root, gate, "at-install")
    try:
        assert _q(
            pg_url,
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database WHERE l.locktype = 'advisory' AND d.datname = current_database()",
        ) == [(0,)]
        ended = _q(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (f"coherent-volume {socket.gethostname()} {alice.pid}",),
        )
        assert ended and all(done for (done,) in ended)

        def bob_commits() -> int:
            with CoherentVolume(other, agent="bob") as b:
                assert b.read("plans/p.md") == b"alice\n"  # her decision stands: completed, never lost
                return b.write("plans/p.md", "bob\n")

        bob: list[int] = []
        writer = threading.Thread(target=lambda: bob.append(bob_commits()))
        writer.start()
        if bob_in == "another working copy":
            writer.join(60)  # another copy goes on: her lost session holds nothing there
            assert bob == [3]
        else:  # this copy waits for her (its own lock outlives her session): give it time to go wrong
            writer.join(3)
            assert bob == []
        (gate / "go").touch()
        out, _ = alice.communicate(timeout=60)
        writer.join(60)
    finally:
        (gate / "go").touch()
        alice.kill()
        alice.wait()
    assert alice.returncode == 0 and out.split() == ["2"]  # her commit is version 2, and reported so
    assert bob == [3]
    for copy in {root, other}:
        with CoherentVolume(copy, agent="carol") as c:
            assert c.read("plans/p.md") == b"bob\n"
            assert [(h.version, h.kind, h.writer) for h in c.history("plans/p.md")] == [
                (3, "commit", "bob"),
                (2, "commit", "alice"),
                (1, "commit", "seed"),
            ]
    assert _q(pg_url, "SELECT count(*) FROM cv_events WHERE kind IN ('foreign', 'clobber')") == [(0,)]


PAUSED_AT_REMOVAL = """
import sys, time
from pathlib import Path
from coherent_volume import CoherentVolume, atomic
root, gate = sys.argv[1], Path(sys.argv[2])
set_aside = atomic.set_aside
def paused(target, aside):  # the deletion's disk change
    (gate / "at-removal").touch()
    while not (gate / "go").exists():
        time.sleep(0.02)
    return set_aside(target, aside)
atomic.set_aside = paused
with CoherentVolume(root, agent="alice") as v:
    v.read("plans/p.md")
    print(v.delete("plans/p.md"))
"""


def test_a_deletion_recorded_by_another_host_while_its_writer_finishes_is_logged_as_such(
    tmp_path: Path, root: Path, pg_url: str
) -> None:
    """Alice's deletion is decided (its commit point) and she is removing the file when a transaction
    of another working copy records it (recovery: its intent says what was decided). The log says
    that, never that an interrupted commit was completed: nothing was interrupted, and her delete
    returns its version as hers."""
    other = _join(tmp_path / "other", pg_url)
    with CoherentVolume(root, agent="seed") as v:
        v.write("plans/p.md", "base\n")
    gate = tmp_path / "gate"
    alice = _paused(PAUSED_AT_REMOVAL, root, gate, "at-removal")
    try:
        with CoherentVolume(other, agent="bob") as b:
            b.write("plans/q.md", "bob's\n")  # its transaction's recovery records her decided deletion
        (gate / "go").touch()
        out, _ = alice.communicate(timeout=60)
    finally:
        (gate / "go").touch()
        alice.kill()
        alice.wait()
    assert alice.returncode == 0 and out.split() == ["2"]
    [(kind, reason, agent, version, detail)] = _q(
        pg_url, "SELECT kind, reason, agent, version, detail FROM cv_events WHERE path = 'plans/p.md' AND seq > 1"
    )
    assert (kind, reason, agent, version) == ("recover", "completed", "alice", 2)
    assert "interrupted" not in detail and "alice's deletion" in detail and "still finishing it" in detail, detail
    with CoherentVolume(other, agent="carol") as c:
        assert [(h.version, h.kind, h.writer) for h in c.history("plans/p.md")] == [
            (2, "delete", "alice"),
            (1, "commit", "seed"),
        ]


# ---- a copy of a working copy ------------------------------------------------------------------------------


@pytest.mark.parametrize("copied", ["the whole root", "its .coherent directory"])
def test_a_copy_of_a_working_copy_is_refused_until_init_makes_it_one_of_its_own(
    tmp_path: Path, root: Path, pg_url: str, copied: str
) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/p.md", "alice\n")
    copy = tmp_path / "copy"
    if copied == "the whole root":  # cp -a
        shutil.copytree(root, copy, symlinks=True)
    else:
        (copy / "plans").mkdir(parents=True)
        shutil.copytree(root / REGISTRY_DIR, copy / REGISTRY_DIR)
    before = _q(pg_url, "SELECT id, root FROM cv_replicas"), _q(pg_url, "SELECT count(*) FROM cv_events")
    with pytest.raises(VolumeConfigError, match="copy of a working copy") as refused:
        CoherentVolume(copy, agent="bob")
    assert f"coherent-volume init {copy}" in str(refused.value) and "Nothing was changed" in str(refused.value)
    assert (_q(pg_url, "SELECT id, root FROM cv_replicas"), _q(pg_url, "SELECT count(*) FROM cv_events")) == before
    r = subprocess.run(
        [CLI, "init", str(copy), "--registry", pg_url, "--volume", "vol"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert len({row[0] for row in _q(pg_url, "SELECT id FROM cv_replicas")}) == 2  # one registration each
    with CoherentVolume(copy, agent="bob") as b:
        assert b.read("plans/p.md") == b"alice\n"
        assert b.write("plans/p.md", "bob\n") == 2
    with CoherentVolume(root, agent="alice") as v:  # the original is untouched by its copy
        assert v.read("plans/p.md") == b"bob\n"
        assert [h.kind for h in v.history("plans/p.md")] == ["commit", "commit"]


# ---- a large file changed outside the volume ------------------------------------------------------------------


def _slow_hashing(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Reading a file to hash it takes `seconds` (a slow disk, or a file of many gigabytes)."""
    from coherent_volume.core import base

    def slow(path: str) -> Any:
        time.sleep(seconds)
        return hash_file(path)

    monkeypatch.setattr(base, "hash_file", slow)


def test_a_large_file_changed_outside_the_volume_is_hashed_with_no_transaction_open(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coherent_volume.core import base

    monkeypatch.setitem(pg_connections.SESSION_SETTINGS, "idle_in_transaction_session_timeout", "500ms")
    monkeypatch.setattr(base, "HASHED_IN_TRANSACTION", 1 << 20)
    _slow_hashing(monkeypatch, 1.5)
    data = os.urandom(1 << 20) * 3  # 3 MiB: above the limit, hashed outside the transaction
    (root / "plans/big.bin").write_bytes(data)
    with CoherentVolume(root, agent="alice") as v:
        assert v.version("plans/big.bin") == 1
        assert v.read_version("plans/big.bin", 1) == data
        assert [(h.kind, h.writer) for h in v.history("plans/big.bin")] == [("foreign", "external")]


def test_a_transaction_ended_for_idling_is_not_run_again_nor_called_a_conflict(
    root: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(pg_connections.SESSION_SETTINGS, "idle_in_transaction_session_timeout", "300ms")
    (root / "plans/p.md").write_text("outside\n")  # small: hashed inside the transaction
    _slow_hashing(monkeypatch, 1.0)
    started = time.monotonic()
    with CoherentVolume(root, agent="alice") as v, pytest.raises(RegistryError) as ended:
        v.version("plans/p.md")
    assert ended.value.errno == errno.ETIMEDOUT
    assert "idle_in_transaction_session_timeout" in str(ended.value) and "conflicted" not in str(ended.value)
    assert time.monotonic() - started < 4 * 1.0  # run once (or twice, with the read's check), not 8 times
    assert _q(pg_url, "SELECT count(*) FROM cv_files") == [(0,)]


# ---- libpq parameters of the URL ------------------------------------------------------------------------------


def test_the_urls_libpq_options_are_kept_and_ours_added_where_it_sets_none(tmp_path: Path, pg_url: str) -> None:
    _q(pg_url, "CREATE SCHEMA team")
    url = pg_url + "?options=" + urllib.parse.quote("-c search_path=team -c lock_timeout=2s")
    r = subprocess.run(
        [CLI, "init", str(tmp_path / "v"), "--managed", "plans/**", "--registry", url, "--volume", "v"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert _q(pg_url, "SELECT table_schema FROM information_schema.tables WHERE table_name = 'cv_volumes'") == [
        ("team",)
    ]
    with pg_connections._connect(postgresql.Location(url, "v"), time.monotonic() + 10) as conn:
        shown = [
            conn.execute(f"SHOW {name}").fetchone()
            for name in ("search_path", "lock_timeout", "idle_in_transaction_session_timeout", "application_name")
        ]
    assert shown[:3] == [("team",), ("2s",), ("5s",)]  # the URL's win; ours where it sets none
    assert shown[3] is not None and shown[3][0].startswith("coherent-volume ")
    with CoherentVolume(tmp_path / "v", agent="alice") as v:
        v.write("plans/a.md", "one\n")
    assert _q(pg_url, "SELECT path FROM team.cv_files") == [("plans/a.md",)]


# ---- a read-only database ------------------------------------------------------------------------------------


def test_a_read_only_registry_still_answers_status_why_and_history(root: Path, pg_url: str) -> None:
    with CoherentVolume(root, agent="alice") as v:
        v.write("plans/p.md", "one\n")
    db = pg_url.rsplit("/", 1)[1]
    _q(pg_url, f"ALTER DATABASE {db} SET default_transaction_read_only = on")
    (root / "plans/p.md").write_text("changed outside\n")
    status = subprocess.run([CLI, "status", str(root)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "not checked: plans/p.md: it differs from its record" in status.stdout and "read-only" in status.stdout
    for command in (["why", str(root / "plans/p.md")], ["history", str(root / "plans/p.md")]):
        answer = subprocess.run([CLI, *command], capture_output=True, text=True)
        assert answer.returncode == 0, answer.stderr
        assert "alice" in answer.stdout and "the change is not recorded" in answer.stderr
    assert _q(pg_url, "SELECT count(*) FROM cv_versions") == [(1,)]


def test_a_server_out_of_connection_slots_is_named_as_such_not_as_unreachable() -> None:
    """The server answers, but refuses the connection for want of a slot: the error says so and
    what to change (EBUSY), never "unreachable"."""
    psycopg = pytest.importorskip("psycopg")
    location = Location.of("postgresql://cv@db:5432/cv", "team")
    full = psycopg.OperationalError(
        "connection failed: FATAL:  remaining connection slots are reserved for non-replication superuser connections"
    )
    refused = pg_connections._unconnected(full, location)
    assert refused.errno == errno.EBUSY
    assert "every connection slot is taken" in str(refused) and "max_connections" in str(refused)
    assert "unreachable" not in str(refused)
    down = pg_connections._unconnected(psycopg.OperationalError("connection refused"), location)
    assert down.errno == errno.EIO and "unreachable" in str(down)


def test_a_rename_on_a_copy_behind_on_its_source_moves_the_current_version(tmp_path: Path, pg_url: str) -> None:
    """The agent's view of the source is current (it wrote it through another copy); the copy that
    renames still holds the version before, and the new name sorts before the source: the rename
    must carry the current version's bytes, never the ones the copy held before its check."""
    first = _pg_volume(tmp_path / "first", pg_url)
    second = _join(tmp_path / "second", pg_url)
    with CoherentVolume(first, agent="ag") as a, CoherentVolume(second, agent="ag") as b:
        a.write("plans/zsrc.md", "v1\n")
        assert b.read("plans/zsrc.md") == b"v1\n"
        a.write("plans/zsrc.md", "v2, the latest\n")  # the second copy holds v1; ag's view is v2
        assert (second / "plans" / "zsrc.md").read_bytes() == b"v1\n"
        core = b._core
        core.rename("ag", core.resolve("plans/zsrc.md"), core.resolve("plans/adst.md"))
        assert a.read("plans/adst.md") == b"v2, the latest\n"
        assert [v.kind for v in a.history("plans/adst.md")] == ["commit"]
        assert a.read_version("plans/adst.md", 1) == b"v2, the latest\n"
        assert (second / "plans" / "adst.md").read_bytes() == b"v2, the latest\n"
        assert b.read("plans/adst.md") == b"v2, the latest\n"
    assert _q(pg_url, "SELECT count(*) FROM cv_events WHERE kind = 'foreign'") == [(0,)]


def test_a_save_by_rename_over_a_merge_glob_file_merges_across_copies_or_changes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    """bob, in the second copy, is stale on the merge-glob file a.md: renaming z.md over it is
    refused while he never read z.md, and a.md is not merged anywhere; once he read it, the save
    is merged (recorded with its decision in the registry) and reaches the first copy, z.md gone."""
    first = _pg_volume(tmp_path / "first", pg_url)
    second = _join(tmp_path / "second", pg_url)
    with CoherentVolume(first, agent="alice") as a, CoherentVolume(second, agent="bob") as b:
        a.set_policy(Policy(merge=("plans/**",)))
        a.write("plans/a.md", "1\n2\n3\n")
        assert b.read("plans/a.md") == b"1\n2\n3\n"
        a.write("plans/a.md", "1 (alice)\n2\n3\n")
        a.write("plans/z.md", "1\n2\n3 (z)\n")
        assert b.version("plans/z.md") == 1  # the second copy installs it (bob never read it)
        core = b._core
        src, dst = core.resolve("plans/z.md"), core.resolve("plans/a.md")
        with pytest.raises(StaleWriteError) as refused:
            core.rename("bob", src, dst)
        assert (refused.value.path, refused.value.reason) == ("plans/z.md", "unread")
        assert [v.writer for v in a.history("plans/a.md")] == ["alice", "alice"]
        assert (second / "plans/a.md").read_bytes() == b"1 (alice)\n2\n3\n"
        assert b.read("plans/z.md") == b"1\n2\n3 (z)\n"
        core.rename("bob", src, dst)
        assert (second / "plans/a.md").read_bytes() == b"1 (alice)\n2\n3 (z)\n"
        assert a.read("plans/a.md") == b"1 (alice)\n2\n3 (z)\n"
        merge = a.history("plans/a.md")[0]
        assert (merge.version, merge.kind, merge.writer, merge.parents) == (3, "merge", "bob", (1, 2))
        assert [(v.kind, v.writer) for v in a.history("plans/z.md")][0] == ("delete", "bob")
        assert not (first / "plans/z.md").exists() and not (second / "plans/z.md").exists()


def test_closing_a_volume_whose_server_stopped_answering_returns_within_its_bound(tmp_path: Path) -> None:
    """The server's processes stopped (SIGSTOP: their kernel still acknowledges, so no TCP timeout
    fires) while this process has a report to send: close gives up on it after LAST_REPORT_WAIT
    (the report stays pending in the working copy) instead of hanging the process's exit."""
    from coherent_volume.registry import pg_hosts

    from .harness.mounts import serving_pids
    from .harness.pgcluster import cluster

    with cluster(parent="/dev/shm" if os.path.isdir("/dev/shm") else None) as pg:
        pg.create_database("hang")
        root = _pg_volume(tmp_path / "vol", pg.url("hang"))
        vol = CoherentVolume(root, agent="alice")
        vol.write("plans/a.md", "one\n")  # its report goes REPORT_AFTER s later
        [postmaster] = serving_pids(pg.data)
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        server = [postmaster, *map(int, children)]  # the backends serving this process's sessions too
        for pid in server:
            os.kill(pid, signal.SIGSTOP)
        try:
            closing = threading.Thread(target=vol.close, daemon=True)  # a hang fails the test, not the suite
            closing.start()
            closing.join(pg_hosts.LAST_REPORT_WAIT + 5)
            hung = closing.is_alive()
        finally:
            for pid in server:
                os.kill(pid, signal.SIGCONT)
        assert not hung, f"close did not return within {pg_hosts.LAST_REPORT_WAIT + 5:g} s of a server that stopped"


def test_a_second_live_process_of_a_session_joins_it_as_an_agent_of_its_own(root: Path) -> None:
    """`VolumeCore.join_session` on PostgreSQL, as the hooks call it for two processes of one
    session id: the second is its fork, views copied; once the first is dead the session is
    bound to the next process again, views kept."""
    from coherent_volume.liveness import ProcessId

    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/a.md", "v1\n")
    first, second, third = (subprocess.Popen(["sleep", "60"]) for _ in range(3))
    try:
        one, two, three = (ProcessId.of(p.pid) for p in (first, second, third))
        core = open_core(root)
        try:
            assert core.join_session("claude:s", one, "claude:s~1") == "claude:s"
            core.note_read("claude:s", core.resolve("plans/a.md"), 1)
            assert core.join_session("claude:s", two, "claude:s~2") == "claude:s~2"
            assert core.join_session("claude:s", two, "claude:s~2") == "claude:s~2", "bound: it stays the fork"
            with core.registry.read() as tx:
                assert tx.read_set("claude:s~2") == {"plans/a.md": 1}, "its views start as the session's"
            first.kill()
            first.wait()
            assert core.join_session("claude:s", three, "claude:s~3") == "claude:s", "the first died: resumed"
            with core.registry.read() as tx:
                assert tx.bound_process("claude:s") == three and tx.read_set("claude:s") == {"plans/a.md": 1}
        finally:
            core.close()
    finally:
        for p in (first, second, third):
            p.kill()
            p.wait()


@pytest.mark.parametrize("bob_commits", [1, 2])
def test_a_version_the_database_lost_is_kept_when_another_copy_commits_its_number(
    tmp_path: Path, pg_cluster: Any, pg_url: str, bob_commits: int
) -> None:
    """The database goes back (restored from a backup taken before alice's v2): bob's copy commits
    v2 (and v3) anew. Alice's copy holds the v2 it installed, bytes nobody else has: they become a
    new version (a clobber over bob's, both in history), never overwritten by bob's v2."""
    db = urllib.parse.urlsplit(pg_url).path.lstrip("/")
    r1, r2 = _pg_volume(tmp_path / "r1", pg_url), _join(tmp_path / "r2", pg_url)
    with CoherentVolume(r1, agent="alice") as a, CoherentVolume(r2, agent="bob") as b:
        a.write("plans/a.md", "v1 by alice\n")
        assert b.read("plans/a.md") == b"v1 by alice\n"
    pg_cluster.sql(f'CREATE DATABASE "{db}_bak" TEMPLATE "{db}"')  # the backup
    with CoherentVolume(r1, agent="alice") as a:
        a.read("plans/a.md")
        assert a.write("plans/a.md", "ALICE v2\n") == 2
    pg_cluster.sql(f'DROP DATABASE "{db}" WITH (FORCE)')  # the restore
    pg_cluster.sql(f'CREATE DATABASE "{db}" TEMPLATE "{db}_bak" OWNER cv')
    pg_cluster.sql(f'DROP DATABASE "{db}_bak"')
    with CoherentVolume(r2, agent="bob") as b:
        for n in range(2, 2 + bob_commits):
            assert b.write("plans/a.md", f"bob v{n}\n") == n
    with CoherentVolume(r1, agent="alice") as a:
        assert a.read("plans/a.md") == b"ALICE v2\n"
        kept = 2 + bob_commits
        assert [(h.version, h.writer) for h in a.history("plans/a.md")][:2] == [
            (kept, "external"),
            (kept - 1, "bob"),
        ]
        assert a.read_version("plans/a.md", kept - 1) == f"bob v{kept - 1}\n".encode()
    assert (r1 / "plans/a.md").read_bytes() == b"ALICE v2\n"
    with CoherentVolume(r2, agent="bob") as b, pytest.raises(StaleWriteError):
        b.write("plans/a.md", "bob again\n")  # his view is bob's version: stale, nothing lost
    log = _q(pg_url, "SELECT kind, version, detail FROM cv_events WHERE kind IN ('foreign', 'clobber') ORDER BY seq")
    assert [(k, v) for k, v, _ in log] == [("foreign", kept), ("clobber", kept)]
    assert "which the registry does not record" in log[0][2] and "which the registry lost" in log[1][2]


SKEWED_HOST = """
import sys, time
real = time.time
time.time = lambda: real() + 40 * 86400  # this host's clock runs 40 days ahead
from coherent_volume import CoherentVolume
with CoherentVolume(sys.argv[1], agent="bob") as bob:
    bob.write("plans/b.md", "a commit on the skewed host\\n")  # its first commit looks whether a prune is due
    bob.prune()
    print([v.version for v in bob.history("plans/a.md") if v.retained])
"""


def test_retention_judges_ages_on_the_databases_clock_not_a_skewed_hosts(
    root: Path, tmp_path: Path, pg_url: str
) -> None:
    """A host whose clock runs 40 days ahead prunes nothing the policy keeps for 30 days: ages are
    judged on the server's clock, as grants are."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.set_policy(Policy(retention=Retention(keep_days=30, keep_last=1)))
        for i in range(1, 4):
            alice.write("plans/a.md", f"version {i}: keep me 30 days\n")
    other = _join(tmp_path / "other", pg_url)
    r = run_py(SKEWED_HOST, str(other))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["[3,", "2,", "1]"]
    with CoherentVolume(root, agent="alice") as alice:
        assert alice.read_version("plans/a.md", 1) == b"version 1: keep me 30 days\n"


def _team_and_a_root_holding(tmp_path: Path, url: str, plan: str, other: str) -> tuple[Path, Path]:
    """The volume "team" (root a) whose plans/plan.md alice wrote as `plan`, and a directory b
    that is no volume, holding `other` at that name."""
    a = _pg_volume(tmp_path / "a", url, name="team", managed=("plans/**",))
    with CoherentVolume(a, agent="alice") as alice:
        alice.write("plans/plan.md", plan)
    b = tmp_path / "b"
    (b / "plans").mkdir(parents=True)
    (b / "plans/plan.md").write_text(other)
    return a, b


def test_init_with_managed_globs_on_a_name_that_exists_is_refused_and_joining_works(
    tmp_path: Path, pg_url: str
) -> None:
    """`init -m` creates a volume: on a name another team's volume has, it never joins it (its own
    files would become versions of that volume's), changes nothing, and says how to join."""
    a, b = _team_and_a_root_holding(tmp_path, pg_url, "team A plan\n", "team B plan (unrelated)\n")
    r = subprocess.run(
        [CLI, "init", str(b), "-m", "plans/**", "--registry", pg_url, "--volume", "team"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "exists already" in r.stderr and f"coherent-volume init {b} --registry {pg_url} --volume team" in r.stderr
    assert "without --managed" in r.stderr and "Nothing was changed" in r.stderr
    assert sorted(p.name for p in b.iterdir()) == ["plans"]  # no .coherent
    assert (b / "plans/plan.md").read_text() == "team B plan (unrelated)\n"
    assert _q(pg_url, "SELECT count(*) FROM cv_replicas") == [(1,)]
    with CoherentVolume(a, agent="alice") as alice:
        assert alice.read("plans/plan.md") == b"team A plan\n"
        assert [h.version for h in alice.history("plans/plan.md")] == [1]
    # joining (no -m) still works; init -m again on the root that created the volume stays harmless
    (b / "plans/plan.md").unlink()
    with CoherentVolume(_join(b, pg_url, "team"), agent="bob") as bob:
        assert bob.read("plans/plan.md") == b"team A plan\n"
    again = subprocess.run(
        [CLI, "init", str(a), "-m", "plans/**", "--registry", pg_url, "--volume", "team"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0, again.stderr


def test_joining_over_a_file_that_differs_says_what_it_recorded(tmp_path: Path, pg_url: str) -> None:
    """A root that joins holding other bytes at a managed name: `init` records them as a foreign
    version over the volume's current one (kept in history), and says so (it said nothing)."""
    a, b = _team_and_a_root_holding(tmp_path, pg_url, "team plan\n", "an old local copy\n")
    (b / "plans/local.md").write_text("only here\n")
    r = subprocess.run(
        [CLI, "init", str(b), "--registry", pg_url, "--volume", "team"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert (
        "taken in: plans/plan.md: this root held other bytes than the volume's v1 (by alice); they are now its v2 "
        f"(by external) on every host, and v1 stays in history: `coherent-volume diff {b} plans/plan.md 1 2`"
    ) in r.stderr
    assert f"`coherent-volume show {b} plans/plan.md --version 1` its bytes" in r.stderr
    assert "taken in: plans/local.md: a file the volume did not hold, now its v1 (by external)" in r.stderr
    with CoherentVolume(a, agent="alice") as alice:
        assert [(h.version, h.writer) for h in alice.history("plans/plan.md")] == [(2, "external"), (1, "alice")]
    again = subprocess.run(  # joining again takes nothing in: nothing is said
        [CLI, "init", str(b), "--registry", pg_url, "--volume", "team"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0 and "taken in" not in again.stderr, again.stderr


def test_a_join_that_stops_bringing_files_in_says_what_it_did_and_how_to_finish(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A join whose registry became unreachable half-way through bringing the managed files in
    ended on the last step's "nothing was written", with 71 files brought in (/tmp/s32pgmh 2): it
    says the root joined, what the files brought in hold, and that init again finishes."""
    from click.testing import CliRunner

    from coherent_volume import cli
    from coherent_volume.core.reads import Reads

    a, b = _team_and_a_root_holding(tmp_path, pg_url, "team plan\n", "team plan\n")

    def cut_off(self: Reads) -> list[tuple[str, str]]:
        raise RegistryError(
            "the registry at db:5432 is unreachable (timeout): nothing could be checked, so "
            "nothing was written and no content was served",
            errno.EIO,
        )

    monkeypatch.setattr(Reads, "scan", cut_off)
    r = CliRunner().invoke(cli.main, ["init", str(b), "--registry", pg_url, "--volume", "team"])
    assert r.exit_code != 0
    assert f"{b} joined the volume, but bringing its managed files in stopped: the registry at db:5432" in r.output
    assert "run this init again to bring in the rest" in r.output, r.output
    monkeypatch.undo()
    again = subprocess.run(
        [CLI, "init", str(b), "--registry", pg_url, "--volume", "team"], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr


def test_a_url_naming_several_hosts_as_libpq_reads_it_creates_and_opens_the_volume(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    """The documented multi-host URL (`host:port,host:port`, `target_session_attrs`) is parsed by
    libpq's rules: `init` works, and an unreachable one is a typed error naming every host."""
    db = urllib.parse.urlsplit(pg_url).path
    both = (
        f"postgresql://cv@127.0.0.1:{pg_cluster.port},127.0.0.1:{pg_cluster.port}{db}?target_session_attrs=read-write"
    )
    root = tmp_path / "v"
    r = subprocess.run(
        [CLI, "init", str(root), "-m", "plans/**", "--registry", both, "--volume", "v"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    with CoherentVolume(root, agent="alice") as alice:
        assert alice.write("plans/a.md", "one\n") == 1
    (tmp_path / "w").mkdir()
    with pytest.raises(RegistryError, match="127.0.0.1:1,127.0.0.1:2 is unreachable"):
        open_core(tmp_path / "w", ["plans/**"], registry=f"postgresql://cv@127.0.0.1:1,127.0.0.1:2{db}", volume="v")
    assert not (tmp_path / "w" / REGISTRY_DIR / LOCATION_FILE).exists()


# ---- a login the server refuses -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "said", "remedy"),
    [
        ("a wrong password", 'password authentication failed for user "{role}"', "password file (PGPASSFILE"),
        ("no password", "no password supplied", "PGPASSWORD"),
        ("no such database", 'database "{role}_gone" does not exist', "CREATE DATABASE"),
        ("no such role", 'role "{role}_gone" does not exist', "CREATE ROLE"),
    ],
)
def test_a_refused_login_is_named_at_once_with_its_remedy_not_retried_as_unreachable(
    tmp_path: Path, pg_cluster: Any, monkeypatch: pytest.MonkeyPatch, case: str, said: str, remedy: str
) -> None:
    """A wrong or missing password, a database or a role that does not exist: the server refuses the
    login, which no retry changes. `init` says so at once, with the server's words and what to do,
    after one attempt (one FATAL in the server's log, not one every 0.2 s for 10 s), and records
    nothing."""
    role = f"pw_{os.urandom(4).hex()}"
    pg_cluster.password_role(role, "right")
    user, db = role, role
    monkeypatch.setenv("PGPASSWORD", "wrong" if case == "a wrong password" else "right")
    if case == "no password":
        monkeypatch.delenv("PGPASSWORD")
        monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-file"))
    elif case == "no such database":
        db = f"{role}_gone"
    elif case == "no such role":
        user = f"{role}_gone"
    url = f"postgresql://{user}@127.0.0.1:{pg_cluster.port}/{db}"
    root = tmp_path / "v"
    r = subprocess.run(
        [CLI, "init", str(root), "-m", "plans/**", "--registry", url, "--volume", "v"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, r.stderr
    message = " ".join(r.stderr.split())
    assert f"the registry at 127.0.0.1:{pg_cluster.port} refused this login: " in message, message
    assert said.format(role=role) in message and remedy in message and "Nothing was written" in message
    assert "unreachable" not in message and "Traceback" not in r.stderr
    attempts = [line for line in pg_cluster.log.read_text().splitlines() if "FATAL" in line and role in line]
    if case != "no password":  # libpq gives up before it sends a password it does not have: the server logs nothing
        assert len(attempts) == 1, attempts
    assert not (root / REGISTRY_DIR / LOCATION_FILE).exists()
    root.mkdir(exist_ok=True)
    with pytest.raises(RegistryLoginRefused) as refused:  # the API's error, of its own type
        open_core(root, ["plans/**"], registry=url, volume="v")
    assert refused.value.errno == errno.EIO and said.format(role=role) in str(refused.value)


# ---- a damaged working copy's state ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "an empty file"])
def test_a_damaged_replica_db_is_refused_untouched_and_init_joins_the_copy_again(
    tmp_path: Path, root: Path, pg_url: str, damage: str
) -> None:
    """A working copy whose replica.db is garbage, or an empty file: every open is refused with a
    typed error saying what to do, and leaves the file byte for byte as it was (no tables written
    into the empty one); moved aside as it says, `init` joins the copy again."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/a.md", "one\n")
    copy = _join(tmp_path / "copy", pg_url)
    state = copy / REGISTRY_DIR / "replica.db"
    state.write_bytes(os.urandom(24576) if damage == "garbage" else b"")
    before = state.read_bytes()
    with pytest.raises(RegistryError) as refused:
        CoherentVolume(copy, agent="bob")
    assert "cannot be read" in str(refused.value) and "Nothing was changed" in str(refused.value)
    assert f"coherent-volume init {copy} --registry {pg_url} --volume vol" in str(refused.value)
    r = subprocess.run([CLI, "status", str(copy)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cannot be read" in r.stderr, r.stderr
    r = subprocess.run(
        [CLI, "init", str(copy), "--registry", pg_url, "--volume", "vol"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "cannot be read" in r.stderr, r.stderr  # moved aside first, as it says
    assert state.read_bytes() == before
    assert sorted(p.name for p in (copy / REGISTRY_DIR).glob("replica.db*")) == ["replica.db"]
    os.rename(state, f"{state}.damaged")
    _join(copy, pg_url)
    with CoherentVolume(copy, agent="bob") as bob:
        assert bob.read("plans/a.md") == b"one\n"
        assert bob.write("plans/a.md", "two\n") == 2
    assert (Path(f"{state}.damaged")).read_bytes() == before


def test_a_read_that_finds_no_file_while_another_copy_creates_it_gives_no_view_of_that_version(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob's read finds plans/p.md absent in his working copy; alice creates it in hers between that
    read of his disk and the transaction that registers his view. Bob is told there is no file, so
    no view of alice's version may be his: his write of a file he takes for new is refused
    `unread`, and alice's version stays (found by a hostile probe: his view was registered at her
    v1, and his write replaced it as v2)."""
    from coherent_volume.core import reads

    first = _pg_volume(tmp_path / "c0", pg_url)
    second = _join(tmp_path / "c1", pg_url)
    with CoherentVolume(first, agent="alice") as alice, CoherentVolume(second, agent="bob") as bob:
        real, created = reads.read_file, []

        def absent_then_created(path: str) -> Any:
            try:
                return real(path)
            except FileNotFoundError:  # the read under bob's commit lock: alice creates the file now
                if sys._getframe(1).f_code.co_name == "_read_locked" and not created:
                    created.append(alice.write("plans/p.md", b"alice\n"))
                raise

        monkeypatch.setattr(reads, "read_file", absent_then_created)
        with pytest.raises(FileNotFoundError):
            bob.read("plans/p.md")
        monkeypatch.undo()
        assert created == [1]
        with pytest.raises(StaleWriteError) as refused:
            bob.write("plans/p.md", b"bob, taking it for new\n")
        assert refused.value.reason == "unread"
        assert bob.read("plans/p.md") == b"alice\n"
        assert [v.writer for v in bob.history("plans/p.md")] == ["alice"]


QUEUED_HOLD = """
import sys, time
from coherent_volume import CoherentVolume
with CoherentVolume(sys.argv[1], agent="holder") as v:
    v.write("plans/warm1.md", "w")  # its first transaction, which held the whole volume, is over
    def hold(tx):
        tx.file("plans/a.md")
        print("held", flush=True)
        time.sleep(120)
    v._core.registry.transact(hold, ["plans/a.md"])
"""
QUEUED_WRITER = """
import sys
from coherent_volume.registry import pg_registry
pg_registry.COMMIT_LOCK_TIMEOUT = float(sys.argv[3])
from coherent_volume import CoherentVolume, RegistryError
with CoherentVolume(sys.argv[1], agent=sys.argv[2]) as v:
    for path in sys.stdin:  # one write a line, each answered
        try:
            v.write(path.strip(), "x")
            print("ok", flush=True)
        except RegistryError as e:
            print(e, flush=True)
"""
QUEUED_LISTING = """
import sys
from coherent_volume import CoherentVolume
from coherent_volume.registry import pg_registry
pg_registry.WHOLE_TRIES_FOR = float(sys.argv[2])
with CoherentVolume(sys.argv[1], agent="lister") as v:
    v.write("plans/warm-lister.md", "w")
    v._core.registry.transact(lambda tx: list(tx.files()))  # waits to hold the whole volume
"""


class _Procs:
    """Processes of a test, killed at its end whatever its outcome."""

    def __init__(self) -> None:
        self.all: list[subprocess.Popen[str]] = []

    def start(self, code: str, *args: str, **kw: Any) -> subprocess.Popen[str]:
        self.all.append(
            subprocess.Popen(
                [sys.executable, "-c", code, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kw
            )
        )
        return self.all[-1]

    def kill(self) -> None:
        for p in self.all:
            p.kill()
            p.wait()


def _ask(proc: subprocess.Popen[str], line: str) -> str:
    """`line` to `proc`'s stdin; the line it answers."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _holding_a(procs: _Procs, root: Path) -> subprocess.Popen[str]:
    """A process holding plans/a.md in a transaction, idle in it for as long as it lives."""
    env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
    holder = procs.start(QUEUED_HOLD, str(root), env=env)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_process_starting_while_a_path_is_held_stalls_no_writer(tmp_path: Path, pg_url: str) -> None:
    """A transaction holds plans/a.md (idle in it); a process starting in another working copy
    commits plans/c.md at once (its first transaction does not wait to hold the whole volume), and so
    does a writer of plans/b.md in a third, while the holder stays (found by a hostile probe: the
    first transaction waited for the whole volume, and every writer of any path waited behind it)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url), _join(tmp_path / "c2", pg_url)]
    procs = _Procs()
    try:
        writer = procs.start(QUEUED_WRITER, str(roots[2]), "bob", "2")
        assert _ask(writer, "plans/warm-bob.md") == "ok"
        holder = _holding_a(procs, roots[1])
        assert _ask(procs.start(QUEUED_WRITER, str(roots[0]), "carol", "2"), "plans/c.md") == "ok"
        assert _ask(writer, "plans/b.md") == "ok"
        assert holder.poll() is None
    finally:
        procs.kill()


def test_a_writer_queued_behind_a_wait_for_the_whole_volume_is_told_so(tmp_path: Path, pg_url: str) -> None:
    """A transaction holds plans/a.md (idle in it); a listing in another working copy waits to hold
    the whole volume; a writer of plans/b.md, which nobody holds, then waits too (PostgreSQL grants
    no shared lock while an exclusive request waits), and when its wait runs out its EBUSY says what
    it waited behind, not "no holder any more"."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url), _join(tmp_path / "c2", pg_url)]
    procs = _Procs()
    try:
        writer = procs.start(QUEUED_WRITER, str(roots[2]), "bob", "2")
        assert _ask(writer, "plans/warm-bob.md") == "ok"
        _holding_a(procs, roots[1])
        procs.start(QUEUED_LISTING, str(roots[0]), "0.5")  # it tries for the whole volume 0.5 s, then queues
        _wait_for_row(
            pg_url, "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock'"
        )
        said = _ask(writer, "plans/b.md")
        assert "queued behind coherent-volume" in said and "waits to hold the whole volume" in said, said
    finally:
        procs.kill()


def test_a_wait_for_the_whole_volume_while_a_path_is_held_stalls_no_writer(tmp_path: Path, pg_url: str) -> None:
    """A transaction holds plans/a.md (idle in it); a listing in another working copy needs the whole
    volume. While it tries for it (without queueing: `pg_registry.WHOLE_TRIES_FOR`), a writer of
    plans/b.md in a third copy, whose lock wait is 2 s, commits (before, the listing's queued
    exclusive request made it wait behind, and fail EBUSY); once the holder ends, the listing holds
    the volume and completes."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url), _join(tmp_path / "c2", pg_url)]
    procs = _Procs()
    try:
        writer = procs.start(QUEUED_WRITER, str(roots[2]), "bob", "2")
        assert _ask(writer, "plans/warm-bob.md") == "ok"
        holder = _holding_a(procs, roots[1])
        listing = procs.start(QUEUED_LISTING, str(roots[0]), "60")
        trying = (
            "SELECT 1 FROM pg_stat_activity WHERE state = 'active' AND pid != pg_backend_pid() "
            "AND query LIKE '%%DO $$%%pg_try_advisory%%'"
        )
        queued = "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND mode = 'ExclusiveLock'"
        _wait_for_row(pg_url, f"{trying} UNION ALL {queued}")  # it tries (or, before, queued) for the volume
        assert _ask(writer, "plans/b.md") == "ok"
        assert _ask(writer, "plans/c.md") == "ok"
        assert _q(pg_url, trying), "the listing still tries for the whole volume"
        assert listing.poll() is None
        holder.kill()
        assert listing.wait(timeout=60) == 0
    finally:
        procs.kill()


BIND = """
import os, sys
from coherent_volume.core import open_core
from coherent_volume.liveness import ProcessId
core = open_core(sys.argv[1])
core.bind_session("mounter", ProcessId.of(os.getpid()), pinned=False)
core.close()
"""
WAITING = "SELECT 1 FROM pg_locks WHERE NOT granted"
"""Any lock waited for on the server (a request for the whole volume, a path's, an agent's, a row's)."""


def _meanwhile(url: str, step: Callable[[], R]) -> Callable[[], R]:
    """`step` started in a thread; returns once it finished or waits for a lock (pg_locks shows it),
    with the function that waits for its end and gives its result."""
    done: list[R] = []
    thread = threading.Thread(target=lambda: done.append(step()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while thread.is_alive() and not _q(url, WAITING):
        assert time.monotonic() < deadline, "neither done nor waiting"
        time.sleep(0.02)

    def result() -> R:
        thread.join(60)
        assert done, "it failed or did not end"
        return done[0]

    return result


def test_a_hooked_append_on_one_working_copy_is_recorded_before_a_peer_on_another_commits(
    tmp_path: Path, pg_url: str
) -> None:
    """A Claude Code session on copy c0 appends with the Bash tool (`echo A >> plans/log.md`, which
    needs no read); an agent on copy c1 then reads the file and adds a line: it reads the append
    (recorded as the session's at its PostToolUse), and c0 ends with both lines. Before, the
    append stayed unrecorded on c0's disk, c1's commit went over it, and c0's next look recorded
    its disk over c1's commit: c1's line gone from the file, and nobody told."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="setup") as setup:
        setup.write("plans/log.md", "one\n")
    session = Session("append", roots[0])
    try:
        assert claude_bash(session, "echo A >> plans/log.md") == ("allow", "")
        with CoherentVolume(roots[1], agent="peer") as peer:
            text = peer.read("plans/log.md")
            assert text == b"one\nA\n"
            peer.write("plans/log.md", text + b"PEER\n")
        with CoherentVolume(roots[0], agent="observer") as v:
            assert v.read("plans/log.md") == b"one\nA\nPEER\n"
            writers = [h.writer for h in v.history("plans/log.md")]
        assert writers == ["peer", agent_of(unique(session.id)), "setup"]
    finally:
        session.close()


def test_a_read_tool_that_finds_no_file_on_a_working_copy_brings_it_and_says_read_again(
    tmp_path: Path, pg_url: str
) -> None:
    """A file committed on copy c1 that copy c0 never installed: a Claude Code session's Read on c0
    fails (no file), its PostToolUseFailure installs the current version and tells the model to read
    it again, and the next Read shows it (before, every Read failed until a write or `status`); so
    does a Gemini CLI read_file's AfterTool."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[1], agent="peer") as peer:
        peer.write("plans/new.md", "from c1\n")
    target = roots[0] / "plans/new.md"
    assert not target.exists()
    session = Session("missing", roots[0])
    try:
        failed = event("PostToolUseFailure", session.id, roots[0], "Read", target, error="File does not exist.")
        told = json.loads(str(session.hook(failed)["stdout"]))["hookSpecificOutput"]["additionalContext"]
        assert (
            "plans/new.md was missing from this working copy (a cache of the volume, which holds it at version 1)"
            in told
        )
        assert session.read(target) == "from c1\n"
        assert claude_bash(session, "echo mine > plans/new.md") == ("allow", "")
    finally:
        session.close()
    with CoherentVolume(roots[1], agent="peer") as peer:
        peer.write("plans/other.md", "from c1\n")
    other = roots[0] / "plans/other.md"
    gemini = GeminiSession("missing", roots[0])
    try:
        failed = gemini.event("after_read_file", path=other, text="")
        failed["tool_response"] = {"llmContent": "", "error": {"message": "File not found.", "type": "FILE_NOT_FOUND"}}
        told = json.loads(str(gemini.hook(failed)["stdout"]))["hookSpecificOutput"]["additionalContext"]
        assert "plans/other.md was missing from this working copy" in told and "read it again" in told
        assert gemini.read(other) == "from c1\n"
    finally:
        gemini.close()


def test_a_read_tool_on_a_working_copy_behind_brings_it_up_to_date_for_the_next_read(
    tmp_path: Path, pg_url: str
) -> None:
    """A Claude Code session on copy c0 reads a file (its Read tool reads c0's disk) after an agent on
    c1 committed a newer version: its view is what it was shown, the older version, and the copy is
    brought up to date after, so its next Read shows the newer one and a write after it goes ahead
    (before, every Read showed the old bytes until a write was refused)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="setup") as setup:
        setup.write("plans/a.md", "v1\n")
    with CoherentVolume(roots[1], agent="peer") as peer:
        peer.read("plans/a.md")
        peer.write("plans/a.md", "v2\n")
    session = Session("behind", roots[0])
    try:
        assert session.read(roots[0] / "plans/a.md") == "v1\n"
        assert session.read(roots[0] / "plans/a.md") == "v2\n"
        assert claude_bash(session, "echo v3 > plans/a.md") == ("allow", "")
    finally:
        session.close()


def test_session_bindings_and_a_status_while_a_path_is_held_stall_no_writer(tmp_path: Path, pg_url: str) -> None:
    """A transaction holds plans/a.md (idle in it). Meanwhile, in another working copy, a Claude
    Code session starts and ends (its hooks bind and unbind it: `join_session`, `end_session`), a
    process is bound to an agent (`bind_session`, as a mount binds its users) and `status` lists
    every file, a.md included: each completes, and a writer of plans/b.md in a third copy, whose
    lock wait is 2 s, commits while each runs (before, each waited to hold the whole volume, and
    every writer of any path waited behind it)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url), _join(tmp_path / "c2", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        alice.write("plans/a.md", "one\n")
    procs = _Procs()
    session = Session("held-path", roots[0] / "plans")
    try:
        writer = procs.start(QUEUED_WRITER, str(roots[2]), "bob", "2")
        assert _ask(writer, "plans/warm-bob.md") == "ok"
        _holding_a(procs, roots[1])
        started = _meanwhile(pg_url, lambda: session.hook(event("SessionStart", session.id, session.cwd)))
        assert _ask(writer, "plans/b.md") == "ok"
        assert started()["code"] == 0
        assert _q(pg_url, "SELECT agent FROM cv_sessions") == [(agent_of(unique(session.id)),)]
        bound = _meanwhile(pg_url, lambda: subprocess.run([sys.executable, "-c", BIND, str(roots[0])], timeout=60))
        assert _ask(writer, "plans/b.md") == "ok"
        assert bound().returncode == 0
        status = _meanwhile(
            pg_url, lambda: subprocess.run([CLI, "status", str(roots[0]), "--json"], capture_output=True, timeout=60)
        )
        assert _ask(writer, "plans/b.md") == "ok"
        listed = status()
        assert listed.returncode == 0, listed.stderr
        assert "plans/a.md" in [f["path"] for f in json.loads(listed.stdout)["files"]]
        ended = _meanwhile(pg_url, lambda: session.hook(event("SessionEnd", session.id, session.cwd)))
        assert _ask(writer, "plans/b.md") == "ok"
        assert ended()["code"] == 0
        assert _q(pg_url, "SELECT agent FROM cv_sessions") == [("mounter",)]
    finally:
        session.close()
        procs.kill()


JOIN = """
import sys
from coherent_volume.core import open_core
from coherent_volume.liveness import ProcessId
from coherent_volume.registry import pg_transaction
root, session, pid, pause = sys.argv[1:]
if pause == "pause":  # once bound, inside its transaction: until a line comes
    bind = pg_transaction.PostgresTransaction.bind
    def paused(self, *args):
        bind(self, *args)
        print("bound", flush=True)
        sys.stdin.readline()
    pg_transaction.PostgresTransaction.bind = paused
core = open_core(root)
print(core.join_session(session, ProcessId.of(int(pid)), f"{session}~{pid}"), flush=True)
core.close()
"""


def test_two_processes_joining_one_session_at_once_are_two_agents(tmp_path: Path, pg_url: str) -> None:
    """One session resumed in two terminals, both joining at once from two working copies: the
    first is paused inside its join, once it bound the session; the second waits for it (it holds
    the session's name, not the volume) and becomes the session's fork, so neither passes for the
    other's reads."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    procs = _Procs()
    try:
        terminals = [procs.start("import time; time.sleep(120)") for _ in range(2)]
        env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
        first = procs.start(JOIN, str(roots[0]), "claude:s", str(terminals[0].pid), "pause", env=env)
        assert first.stdout is not None and first.stdout.readline().strip() == "bound"
        second = _meanwhile(
            pg_url,
            lambda: subprocess.run(
                [sys.executable, "-c", JOIN, str(roots[1]), "claude:s", str(terminals[1].pid), "-"],
                capture_output=True,
                text=True,
                timeout=60,
            ),
        )
        assert _ask(first, "") == "claude:s"
        joined = second()
        assert joined.returncode == 0, joined.stderr
        assert joined.stdout.strip() == f"claude:s~{terminals[1].pid}"
    finally:
        procs.kill()


COMMIT_PAUSED = """
import sys
from coherent_volume import CoherentVolume
from coherent_volume.registry import pg_transaction
put_version = pg_transaction.PostgresTransaction.put_version
def paused(self, v):  # its content stored, its version named, both sent: until a line comes
    put_version(self, v)
    if v.path == "plans/p.md" and v.writer == "bob":
        self.run("SELECT 1")  # what is queued goes first, as with any read
        print("naming", flush=True)
        sys.stdin.readline()
pg_transaction.PostgresTransaction.put_version = paused
with CoherentVolume(sys.argv[1], agent="bob") as bob:
    bob.read("plans/p.md")
    bob.write("plans/p.md", "old q")
    print("committed", flush=True)
"""


def test_retention_never_drops_content_a_commit_under_way_names(tmp_path: Path, pg_url: str) -> None:
    """plans/q.md's v1 may be pruned; its bytes are those of a commit of plans/p.md paused inside its
    transaction in another working copy, its content and version sent. A prune meanwhile waits for
    that commit (it holds the content's lock, shared, until its COMMIT), then keeps the bytes the
    commit named: p's new version reads whole (had the prune not waited, its drop would have waited
    for the content's row only, and deleted it once the commit naming it was done)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
        alice.write("plans/q.md", "old q")
        alice.write("plans/q.md", "new q\n")
        alice.write("plans/p.md", "p\n")
        procs = _Procs()
        try:
            env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
            bob = procs.start(COMMIT_PAUSED, str(roots[1]), env=env)
            assert bob.stdout is not None and bob.stdout.readline().strip() == "naming"
            pruned = _meanwhile(pg_url, alice.prune)
            assert _ask(bob, "") == "committed"
            assert pruned().versions >= 1
        finally:
            procs.kill()
        assert [v.version for v in alice.history("plans/q.md") if v.retained] == [2]
        assert alice.read("plans/p.md") == b"old q"


BIG = bytes(range(256)) * (9 << 12)
"""9 MiB: content stored in two parts (`pg_transaction.PART` is 8 MiB)."""


def test_a_prune_dropping_content_and_a_commit_of_a_large_file_while_a_path_is_held_stall_no_writer(
    tmp_path: Path, pg_url: str
) -> None:
    """A transaction holds plans/a.md (idle in it). Meanwhile, in another working copy, a prune
    drops the bytes of plans/q.md's v1, and a file of 9 MiB (content in two parts) is committed:
    each completes, and a writer of plans/b.md in a third copy, whose lock wait is 2 s, commits
    while each runs (before, each waited to hold the whole volume, and every writer of any path
    waited behind it)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url), _join(tmp_path / "c2", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
        alice.write("plans/a.md", "a\n")
        alice.write("plans/q.md", "old q\n")
        alice.write("plans/q.md", "new q\n")
        procs = _Procs()
        try:
            writer = procs.start(QUEUED_WRITER, str(roots[2]), "bob", "2")
            assert _ask(writer, "plans/warm-bob.md") == "ok"
            _holding_a(procs, roots[1])
            pruned = _meanwhile(pg_url, alice.prune)
            assert _ask(writer, "plans/b.md") == "ok"
            assert pruned().objects == 1
            committed = _meanwhile(pg_url, lambda: alice.write("plans/big.md", BIG))
            assert _ask(writer, "plans/b.md") == "ok"
            assert committed() == 1
        finally:
            procs.kill()
        assert [v.version for v in alice.history("plans/q.md") if v.retained] == [2]
        assert alice.read("plans/big.md") == BIG


LARGE_PAUSED = """
import sys
from coherent_volume import CoherentVolume
from coherent_volume.registry import pg_transaction
put_version = pg_transaction.PostgresTransaction.put_version
def paused(self, v):  # its content stored, its version named, both sent: until a line comes
    put_version(self, v)
    if v.path == "plans/l1.md":
        self.run("SELECT 1")
        print("naming", flush=True)
        sys.stdin.readline()
pg_transaction.PostgresTransaction.put_version = paused
with CoherentVolume(sys.argv[1], agent="bob") as bob:
    bob.write("plans/warm-bob.md", "w")  # its first transaction, which held the whole volume, is over
    bob.write("plans/l1.md", bytes(range(256)) * (9 << 12))
    print("committed", flush=True)
"""


def test_two_commits_of_the_same_large_content_at_once_both_land_and_store_it_once(tmp_path: Path, pg_url: str) -> None:
    """A commit of 9 MiB (content in two parts) is paused inside its transaction in one working
    copy, its content stored and its version sent; a commit of the same bytes to another path in
    another copy meanwhile waits for it (content in parts is stored by one transaction at a time),
    then finds the content stored: both land, and the content is stored once (had they stored it
    side by side, the second's parts would have collided with the first's)."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        procs = _Procs()
        try:
            env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
            bob = procs.start(LARGE_PAUSED, str(roots[1]), env=env)
            assert bob.stdout is not None and bob.stdout.readline().strip() == "naming"
            committed = _meanwhile(pg_url, lambda: alice.write("plans/l2.md", BIG))
            assert _ask(bob, "") == "committed"
            assert committed() == 1
        finally:
            procs.kill()
        assert alice.read("plans/l1.md") == BIG
        assert alice.read("plans/l2.md") == BIG
    digest = hash_file(str(roots[0] / "plans/l2.md"))[1]
    assert _q(pg_url, "SELECT count(*) FROM cv_contents WHERE hash = %s", (digest,)) == [(1,)]
    assert _q(pg_url, "SELECT count(*) FROM cv_content_parts WHERE hash = %s", (digest,)) == [(1,)]


CLAIM_PAUSED = """
import sys
from coherent_volume import CoherentVolume
from coherent_volume.registry import pg_transaction
put_meta = pg_transaction.PostgresTransaction.put_meta
def paused(self, key, value):  # the prune claimed, sent: until a line comes
    put_meta(self, key, value)
    self.run("SELECT 1")
    print("claiming", flush=True)
    sys.stdin.readline()
with CoherentVolume(sys.argv[1], agent="bob") as bob:
    bob._core._prune_check_at = float("inf")  # no prune after its own commits
    bob.write("plans/warm-bob.md", "w")  # its first transaction, which held the whole volume, is over
    pg_transaction.PostgresTransaction.put_meta = paused
    print("claimed" if bob._core.prune_if_due() is not None else "not due", flush=True)
"""


def test_two_working_copies_finding_a_prune_due_at_once_claim_it_once(tmp_path: Path, pg_url: str) -> None:
    """A prune is due; one working copy's claim of it is paused inside its transaction, sent. Another
    copy finding it due meanwhile waits for that claim (the setting's lock, held from the start of
    each transaction that sets it), then finds the prune claimed: only the first starts it."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        alice.write("plans/a.md", "a")
        two_hours_ago = repr(time.time() - 7200)
        alice._core.registry.transact(lambda tx: tx.put_meta("pruned_at", two_hours_ago))
        procs = _Procs()
        try:
            env = {**os.environ, "PGOPTIONS": "-c idle_in_transaction_session_timeout=0"}
            bob = procs.start(CLAIM_PAUSED, str(roots[1]), env=env)
            assert bob.stdout is not None and bob.stdout.readline().strip() == "claiming"
            claimed = _meanwhile(pg_url, alice._core.prune_if_due)
            assert _ask(bob, "") == "claimed"
            assert claimed() is None
        finally:
            procs.kill()


KILLED_BEFORE_INSTALL = """
import os, signal, sys
from coherent_volume import CoherentVolume
from coherent_volume.atomic import Staged
vol = CoherentVolume(sys.argv[1], agent="killed")
vol.read("plans/k.md")
def killed(self, *args, **kwargs):  # the commit's transaction committed, its install not begun
    os.kill(os.getpid(), signal.SIGKILL)
Staged.install = killed
vol.write("plans/k.md", "two")
"""


def test_a_process_started_while_a_path_is_held_settles_every_interrupted_commit_once_the_volume_is_free(
    tmp_path: Path, pg_url: str
) -> None:
    """While another transaction holds plans/a.md, a writer of plans/k.md is killed between its
    COMMIT and its install (its intent and staged file stay), and a file a killed writer staged
    before its decision lies in the staging directory too. A process starting in that working copy
    meanwhile commits at once and leaves both (it holds neither the path nor the whole volume); its
    next transaction, once the volume is free, settles the intent and sweeps the staging directory."""
    roots = [_pg_volume(tmp_path / "c0", pg_url), _join(tmp_path / "c1", pg_url)]
    with CoherentVolume(roots[0], agent="alice") as alice:
        alice.write("plans/k.md", "one")
    procs = _Procs()
    try:
        holder = _holding_a(procs, roots[0])
        killed = subprocess.run([sys.executable, "-c", KILLED_BEFORE_INSTALL, str(roots[1])], timeout=60)
        assert killed.returncode == -signal.SIGKILL
        staging = roots[1] / REGISTRY_DIR / "staging"
        (staging / "left-by-a-writer-killed-before-its-decision").write_text("x")
        left = sorted(os.listdir(staging))
        assert len(left) == 2
        writer = procs.start(QUEUED_WRITER, str(roots[1]), "carol", "2")
        assert _ask(writer, "plans/c.md") == "ok"
        assert ("plans/k.md",) in _q(pg_url, "SELECT path FROM cv_intents")
        assert sorted(os.listdir(staging)) == left
        holder.kill()
        holder.wait()
        gone = (  # its server session ends once the server reads the closed connection: the volume is free then
            "SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity "
            "WHERE state LIKE 'idle in transaction%%' AND pid != pg_backend_pid())"
        )
        _wait_for_row(pg_url, gone)
        time.sleep(SWEEP_AGAIN)  # its next sweep is tried no sooner after the one that found the volume held
        assert _ask(writer, "plans/d.md") == "ok"
        assert ("plans/k.md",) not in _q(pg_url, "SELECT path FROM cv_intents")
        assert os.listdir(staging) == []
    finally:
        procs.kill()
    with CoherentVolume(roots[1], agent="bob") as bob:
        assert bob.read("plans/k.md") == b"two"
        assert [v.writer for v in bob.history("plans/k.md")] == ["killed", "alice"]


def _wait_for_row(url: str, query: str) -> None:
    deadline = time.monotonic() + 30
    while not _q(url, query):
        assert time.monotonic() < deadline, f"no row for {query}"
        time.sleep(0.05)
