"""`coherent-volume status ROOT --hosts`: every working copy of a volume, how far behind it is and
when it was last seen.

Real parts: three namespace hosts sharing a PostgreSQL volume (as tests/test_multihost.py), agents
started in the hosts, the CLI run in a host; a private PostgreSQL for the reporting rules (a report
refused by the server, a view-only process); the CLI on a SQLite volume.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coherent_volume import CoherentVolume, VolumeConfigError
from coherent_volume.registry import pg_open

from .harness import CLI
from .harness.hostbed import BedVolume, Hosts, init, needs_bed, sql, three_hosts

COPY_FIELDS = {
    "replica",
    "hostname",
    "root",
    "boot_id",
    "this",
    "last_seen",
    "seen_ago",
    "behind",
    "behind_since",
    "behind_for",
}


# ---- the bed: three hosts, one PostgreSQL, one volume with a working copy on each host ------------


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    yield from three_hosts()


class Volume(BedVolume):
    """A BedVolume, with `coherent-volume status --hosts` run in its hosts."""

    def status(self, n: int, *options: str) -> subprocess.CompletedProcess[str]:
        """`coherent-volume status ROOT --hosts OPTIONS` run in host hN on its root."""
        done: subprocess.CompletedProcess[str] = self.hosts[n - 1].run(
            [CLI, "status", str(self.roots[n - 1]), "--hosts", *options], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done

    def copies(self, n: int) -> dict[str, dict[str, Any]]:
        """`status --hosts --json` in host hN: its working copies by host name."""
        data = json.loads(self.status(n, "--json").stdout)
        assert set(data) == {"root", "registry", "copies"}
        assert data["root"] == str(self.roots[n - 1]) and "PostgreSQL registry" in data["registry"]
        for copy in data["copies"]:
            assert set(copy) == COPY_FIELDS
        return {c["hostname"]: c for c in data["copies"]}


@pytest.fixture
def volume(hosts: Hosts, tmp_path: Path) -> Iterator[Volume]:
    with Volume(hosts, tmp_path) as v:
        yield v


def _reported(volume: Volume, host: str, holds: dict[str, int], within: float = 15.0) -> None:
    """Wait (at most `within` s) until the working copy of `host` reported that it holds `holds`:
    a copy reports what it installed after its commit lock's release, on a round trip of its own."""
    deadline = time.monotonic() + within
    while True:
        rows = volume.sql(
            "SELECT h.path, h.version FROM cv_replica_holds h JOIN cv_replicas r ON r.id = h.replica "
            "WHERE r.hostname = %s",
            (host,),
        )
        if all(dict(rows).get(path) == version for path, version in holds.items()):
            return
        assert time.monotonic() < deadline, f"{host} reported {rows}, not {holds}, within {within} s"
        time.sleep(0.05)


def _committed_at(volume: Volume, path: str, version: int) -> float:
    [(at,)] = volume.sql("SELECT at FROM cv_versions WHERE path = %s AND version = %s", (path, version))
    return float(at)


@needs_bed
def test_status_hosts_shows_how_far_behind_each_working_copy_is_and_when_it_was_last_seen(volume: Volume) -> None:
    alice = volume.agent(1, "alice")
    for name in ("a", "b", "c"):
        assert alice.do("write", f"plans/{name}.md", f"{name}\n")["version"] == 1
    carol = volume.agent(3, "carol")
    assert carol.do("read", "plans/a.md")["data"] == "a\n"
    carol.close()  # h3 runs no process of the volume any more (it reported as it exited)
    _reported(volume, "h1", {"plans/a.md": 1, "plans/b.md": 1, "plans/c.md": 1})

    copies = volume.copies(1)
    assert sorted(copies) == ["h1", "h2", "h3"]
    h1, h2, h3 = copies["h1"], copies["h2"], copies["h3"]
    assert [h1["behind"], h2["behind"], h3["behind"]] == [0, 3, 2]
    assert [h1["this"], h2["this"], h3["this"]] == [True, False, False]
    assert [c["root"] for c in (h1, h2, h3)] == [str(r) for r in volume.roots]
    replicas = dict(volume.sql("SELECT hostname, id::text FROM cv_replicas"))
    assert {c["hostname"]: c["replica"] for c in (h1, h2, h3)} == replicas
    assert h1["behind_since"] is None and h1["behind_for"] is None
    # the oldest commit each copy lacks: h2 never had a.md, h3 read a.md and lacks b.md
    assert h2["behind_since"] == _committed_at(volume, "plans/a.md", 1)
    assert h3["behind_since"] == _committed_at(volume, "plans/b.md", 1)
    assert h2["behind_for"] >= 0 and h3["behind_for"] >= 0
    assert h1["seen_ago"] < h3["seen_ago"]  # status itself opened h1's copy: seen just now

    # the stopped host stays listed, its last_seen unchanged, seen longer ago on the database's clock
    time.sleep(1.1)
    later = volume.copies(2)
    assert later["h3"]["last_seen"] == h3["last_seen"]
    assert later["h3"]["seen_ago"] >= h3["seen_ago"] + 1
    assert later["h2"]["this"] and not later["h1"]["this"]

    table = volume.status(1).stdout
    rows: list[list[str]] = []
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("│")]
        if len(cells) > 1 and cells[0]:
            rows.append(cells)
        elif len(cells) > 1 and rows:  # a cell wrapped onto the next line
            rows[-1] = [" ".join(x for x in (a, b) if x) for a, b in zip(rows[-1], cells, strict=True)]
    lines = {row[1]: " ".join(row) for row in rows if row[1] in ("h1", "h2", "h3")}
    for row in rows:  # each row starts with the start of its copy's id, for `forget`
        if row[1] in lines:
            assert row[0] == copies[row[1]]["replica"][:8]
    flat = {host: "".join(line.split()) for host, line in lines.items()}  # cells wrap at spaces or mid-path
    assert f"{volume.roots[0]}(thisone)" in flat["h1"] and "3paths" in flat["h2"] and "2paths" in flat["h3"]
    assert "oldestmissingcommit" in flat["h2"] and "sago" in flat["h3"]

    # a working copy wiped while its host is stopped: still listed, further behind with each commit
    assert volume.hosts[2].run(["rm", "-rf", str(volume.roots[2])]).returncode == 0
    assert alice.do("write", "plans/a.md", "a, again\n")["version"] == 2
    _reported(volume, "h1", {"plans/a.md": 2})
    copies = volume.copies(1)
    assert [copies[h]["behind"] for h in ("h1", "h2", "h3")] == [0, 3, 3]
    assert copies["h3"]["behind_since"] == _committed_at(volume, "plans/b.md", 1)  # still the oldest it lacks

    # a copy that catches up is current again, and seen now; its commit puts the others behind
    bob = volume.agent(2, "bob")
    for name in ("a", "b", "c"):
        bob.do("read", f"plans/{name}.md")
    assert bob.do("write", "plans/c.md", "c by bob\n")["version"] == 2
    _reported(volume, "h2", {"plans/a.md": 2, "plans/b.md": 1, "plans/c.md": 2})
    copies = volume.copies(1)
    assert [copies[h]["behind"] for h in ("h1", "h2", "h3")] == [1, 0, 3]
    assert copies["h2"]["seen_ago"] < 5
    assert alice.do("read", "plans/c.md")["data"] == "c by bob\n"
    _reported(volume, "h1", {"plans/c.md": 2})
    assert volume.copies(1)["h1"]["behind"] == 0


# ---- the reporting rules, on one host -------------------------------------------------------------------


def _held(pg_url: str, root: Path) -> dict[str, int]:
    rows = sql(
        pg_url,
        "SELECT h.path, h.version FROM cv_replica_holds h JOIN cv_replicas r ON r.id = h.replica WHERE r.root = %s",
        (str(root),),
    )
    return dict(rows)


def test_a_report_the_server_refuses_never_fails_the_commit_and_goes_with_the_next_one(
    pg_url: str, tmp_path: Path
) -> None:
    root = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.write("plans/a.md", "one\n") == 1
    assert _held(pg_url, root) == {"plans/a.md": 1}  # reported by the time the volume is closed
    sql(pg_url, "ALTER TABLE cv_replica_holds ADD CONSTRAINT refused CHECK (version < 0) NOT VALID")
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.write("plans/a.md", "two\n") == 2  # its report is refused by the server
        assert vol.write("plans/b.md", "bee\n") == 1
    assert _held(pg_url, root) == {"plans/a.md": 1}  # behind as the registry knows it, never ahead
    sql(pg_url, "ALTER TABLE cv_replica_holds DROP CONSTRAINT refused")
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.write("plans/c.md", "sea\n") == 1
    assert _held(pg_url, root) == {"plans/a.md": 2, "plans/b.md": 1, "plans/c.md": 1}


def test_what_a_commit_installed_is_reported_soon_after_with_no_other_call(pg_url: str, tmp_path: Path) -> None:
    root = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    with CoherentVolume(root, agent="alice") as vol:
        assert vol.write("plans/a.md", "one\n") == 1
        assert vol.write("plans/b.md", "bee\n") == 1
        deadline = time.monotonic() + 15
        while _held(pg_url, root) != {"plans/a.md": 1, "plans/b.md": 1}:  # the volume stays open, unused
            assert time.monotonic() < deadline, _held(pg_url, root)
            time.sleep(0.05)


def test_a_process_that_only_registers_views_bumps_last_seen_when_due(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coherent_volume.registry import pg_hosts

    first = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    with CoherentVolume(first, agent="alice") as alice:
        alice.write("plans/a.md", "one\n")
    second = init(subprocess.run, tmp_path / "second", pg_url, create=False)
    sql(pg_url, "UPDATE cv_replicas SET last_seen = now() - interval '1 hour' WHERE root = %s", (str(second),))
    with CoherentVolume(second, agent="bob") as bob:  # opening bumps last_seen
        [(opened,)] = sql(pg_url, "SELECT last_seen FROM cv_replicas WHERE root = %s", (str(second),))
        monkeypatch.setattr(pg_hosts, "SEEN_EVERY", 0.0)
        assert bob.read("plans/a.md") == b"one\n"  # a view registered: a write transaction, no commit lock
        [(seen,)] = sql(pg_url, "SELECT last_seen FROM cv_replicas WHERE root = %s", (str(second),))
        assert seen > opened
        monkeypatch.setattr(pg_hosts, "SEEN_EVERY", 3600.0)
        with CoherentVolume(first, agent="alice") as alice:
            alice.write("plans/a.md", "two\n")
        bob_other = CoherentVolume(second, agent="bob-2")
        try:
            assert bob_other.read("plans/a.md") == b"two\n"  # installed under the commit lock: reported
        finally:
            bob_other.close()
        [(reported,)] = sql(pg_url, "SELECT last_seen FROM cv_replicas WHERE root = %s", (str(second),))
        assert reported > seen
        [(unchanged,)] = sql(pg_url, "SELECT last_seen FROM cv_replicas WHERE root = %s", (str(second),))
        assert bob.read("plans/a.md") == b"two\n"  # a view only, and not due: nothing sent
        assert sql(pg_url, "SELECT last_seen FROM cv_replicas WHERE root = %s", (str(second),)) == [(unchanged,)]
    assert _held(pg_url, second) == {"plans/a.md": 2}


def test_a_working_copy_made_before_reports_reports_everything_it_holds(pg_url: str, tmp_path: Path) -> None:
    root = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/a.md", "one\n")
        alice.write("plans/b.md", "bee\n")
    sql(pg_url, "DELETE FROM cv_replica_holds")
    db = sqlite3.connect(root / ".coherent" / "replica.db")  # as the release before reports left it
    db.execute("DROP INDEX replica_unreported")
    db.execute("ALTER TABLE replica_files DROP COLUMN reported")
    db.commit()
    db.close()
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/c.md", "sea\n")
    assert _held(pg_url, root) == {"plans/a.md": 1, "plans/b.md": 1, "plans/c.md": 1}


def test_status_hosts_on_a_sqlite_volume_lists_its_one_working_copy(root: Path) -> None:
    done = subprocess.run([CLI, "status", str(root), "--hosts", "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["root"] == str(root) and "one working copy" in data["registry"]
    [copy] = data["copies"]
    assert set(copy) == COPY_FIELDS
    assert (copy["root"], copy["this"], copy["behind"], copy["replica"]) == (str(root), True, 0, None)
    table = subprocess.run([CLI, "status", str(root), "--hosts"], capture_output=True, text=True)
    assert table.returncode == 0 and "SQLite, in the root: the volume has this one working copy" in table.stdout
    both = subprocess.run([CLI, "status", str(root), "--hosts", "--all"], capture_output=True, text=True)
    assert both.returncode == 2 and "give one of them" in both.stderr


def _forget(root: Path, copy: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "forget", str(root), copy, "--json"], capture_output=True, text=True, timeout=60)


def test_forget_removes_a_copy_unseen_for_an_hour_and_the_copy_joins_again_with_nothing_lost(
    pg_url: str, tmp_path: Path
) -> None:
    first = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    second = init(subprocess.run, tmp_path / "second", pg_url, create=False)
    with CoherentVolume(second, agent="bob") as bob:
        assert bob.write("plans/a.md", "bob's\n") == 1
    [(copy,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(second),))
    [(this,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(first),))

    # refused, nothing changed: seen just now; its own copy; no id or several ids matching
    for asked, says in [
        (copy[:8], "was seen less than 1 h ago"),
        (this[:8], "is the working copy you asked from"),
        ("zzzz", "no working copies of this volume have an id starting with 'zzzz'"),
        ("", "2 working copies of this volume have an id starting with ''"),
    ]:
        done = _forget(first, asked)
        assert done.returncode == 1 and says in done.stderr and "Nothing was changed" in done.stderr, done.stderr
    assert len(sql(pg_url, "SELECT id FROM cv_replicas")) == 2

    sql(pg_url, "UPDATE cv_replicas SET last_seen = now() - interval '2 hours' WHERE id = %s", (copy,))
    done = _forget(first, copy[:8])
    assert done.returncode == 0, done.stderr
    gone = json.loads(done.stdout)
    assert set(gone) == COPY_FIELDS and (gone["replica"], gone["root"]) == (copy, str(second))
    assert sql(pg_url, "SELECT id::text FROM cv_replicas") == [(this,)]
    assert sql(pg_url, "SELECT count(*) FROM cv_replica_holds WHERE replica = %s", (copy,)) == [(0,)]
    assert [
        c["root"]
        for c in json.loads(
            subprocess.run([CLI, "status", str(first), "--hosts", "--json"], capture_output=True, text=True).stdout
        )["copies"]
    ] == [str(first)]

    # the forgotten copy, changed meanwhile by a program, fails closed until it joins again
    (second / "plans" / "a.md").write_text("changed while forgotten\n")
    with pytest.raises(VolumeConfigError, match="no longer registered as a working copy"):
        CoherentVolume(second, agent="bob")
    init(subprocess.run, second, pg_url, create=False)
    with CoherentVolume(second, agent="bob") as bob:
        assert bob.read("plans/a.md") == b"changed while forgotten\n"  # its bytes kept, as a version of their own
        history = bob.history("plans/a.md")
        assert [(v.version, v.kind) for v in history] == [(2, "foreign"), (1, "commit")]
        assert bob.read_version("plans/a.md", 1) == b"bob's\n"
    with CoherentVolume(first, agent="alice") as alice:
        assert alice.read("plans/a.md") == b"changed while forgotten\n"
    assert _held(pg_url, second) == {"plans/a.md": 2}  # it reports what it holds under its new id


def test_a_forget_landing_while_the_copy_is_opened_makes_that_open_fail_closed(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`forget`, from another copy, removes a copy's registration after an open of that copy read it
    and before the open marked the copy seen: the open fails closed (not registered: join again),
    never serves a copy the registry no longer knows; the copy joins again with nothing lost."""
    first = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    second = init(subprocess.run, tmp_path / "second", pg_url, create=False)
    with CoherentVolume(second, agent="bob") as bob:
        assert bob.write("plans/a.md", "bob's\n") == 1
    [(copy,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(second),))
    sql(pg_url, "UPDATE cv_replicas SET last_seen = now() - interval '2 hours' WHERE id = %s", (copy,))
    boot_id = pg_open.boot_id
    forgot: list[subprocess.CompletedProcess[str]] = []

    def forgotten_meanwhile() -> str:
        """Called by the open between its read of the registration and its bump of last_seen."""
        if not forgot:
            forgot.append(_forget(first, copy[:8]))
        return boot_id()

    monkeypatch.setattr(pg_open, "boot_id", forgotten_meanwhile)
    with pytest.raises(VolumeConfigError, match="no longer registered as a working copy"):
        CoherentVolume(second, agent="bob")
    assert forgot and forgot[0].returncode == 0, forgot
    assert sql(pg_url, "SELECT count(*) FROM cv_replicas WHERE id = %s", (copy,)) == [(0,)]
    monkeypatch.setattr(pg_open, "boot_id", boot_id)
    init(subprocess.run, second, pg_url, create=False)
    with CoherentVolume(second, agent="bob") as bob:
        assert bob.read("plans/a.md") == b"bob's\n"


def test_forget_on_a_sqlite_volume_says_there_is_nothing_to_forget(root: Path) -> None:
    done = _forget(root, "abc")
    assert done.returncode == 1 and "a SQLite volume has one working copy" in done.stderr


def test_a_mounted_copy_is_seen_while_it_listens_so_it_is_never_forgotten(pg_url: str, tmp_path: Path) -> None:
    pytest.importorskip("pyfuse3")
    from coherent_volume.registry.pg_hosts import SEEN_EVERY

    from .harness.mounts import Mount

    first = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    second = init(subprocess.run, tmp_path / "second", pg_url, create=False)
    [(copy,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(second),))
    age = "SELECT extract(epoch FROM now() - last_seen) FROM cv_replicas WHERE id = %s"
    with Mount(second, tmp_path / "mnt"):  # no process of it commits or reads: only its listener runs
        sql(pg_url, "UPDATE cv_replicas SET last_seen = now() - interval '2 hours' WHERE id = %s", (copy,))
        deadline = time.monotonic() + SEEN_EVERY + 20
        while sql(pg_url, age, (copy,))[0][0] > 3600 and time.monotonic() < deadline:
            time.sleep(0.5)
        [(seen_ago,)] = sql(pg_url, age, (copy,))
        assert seen_ago < SEEN_EVERY + 20, "the listening daemon never made its copy seen"
        done = _forget(first, copy[:8])
        assert done.returncode == 1 and "was seen less than 1 h ago" in done.stderr, done.stderr
    assert len(sql(pg_url, "SELECT id FROM cv_replicas")) == 2


def test_a_running_process_of_a_forgotten_copy_fails_closed_until_the_copy_joins_again(
    pg_url: str, tmp_path: Path
) -> None:
    first = init(subprocess.run, tmp_path / "first", pg_url, create=True)
    second = init(subprocess.run, tmp_path / "second", pg_url, create=False)
    [(copy,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(second),))
    current = "SELECT version FROM cv_files WHERE path = 'plans/a.md'"
    with CoherentVolume(second, agent="bob") as bob:
        assert bob.write("plans/a.md", "1\n") == 1
        deadline = time.monotonic() + 10
        while _held(pg_url, second) != {"plans/a.md": 1}:  # its report (which makes it seen) went first
            assert time.monotonic() < deadline
            time.sleep(0.05)
        sql(pg_url, "UPDATE cv_replicas SET last_seen = now() - interval '2 hours' WHERE id = %s", (copy,))
        assert _forget(first, copy[:8]).returncode == 0
        # the report after its next commit finds the copy forgotten: from then on it fails closed
        refused: VolumeConfigError | None = None
        deadline = time.monotonic() + 10
        while refused is None and time.monotonic() < deadline:
            try:
                version = bob.write("plans/a.md", "next\n")
            except VolumeConfigError as e:
                refused = e
            time.sleep(0.2)
        assert refused is not None and "no longer registered as a working copy" in str(refused)
        assert "Nothing was changed" in str(refused)
        [(before,)] = sql(pg_url, current)
        with pytest.raises(VolumeConfigError, match="no longer registered"):
            bob.write("plans/a.md", "refused\n")
        assert sql(pg_url, current) == [(before,)] and (second / "plans" / "a.md").read_text() == "next\n"
        # `init` joins the copy again: the same process works again, and reports under the new id
        init(subprocess.run, second, pg_url, create=False)
        version = bob.write("plans/a.md", "joined again\n")
        assert version == before + 1
    [(joined,)] = sql(pg_url, "SELECT id::text FROM cv_replicas WHERE root = %s", (str(second),))
    assert joined != copy
    assert _held(pg_url, second) == {"plans/a.md": version}
