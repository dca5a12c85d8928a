"""The coherent-volume command, run as a real process."""

from __future__ import annotations

import json
import os
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, RegistryError, StaleWriteError, VolumeConfigError

from .harness.mounts import Mount

CLI = str(Path(sys.executable).parent / "coherent-volume")
P = "plans/plan.md"


def cv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)


def _refused_scenario(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, b"v1")
        bob.read(P)
        alice.read(P)
        alice.write(P, b"v2")
        try:
            bob.write(P, b"stale")
        except StaleWriteError:
            pass


def test_init_creates_and_is_idempotent(tmp_path: Path) -> None:
    r = cv("init", str(tmp_path / "ws"), "--managed", "plans/**", "-m", "*.md")
    assert r.returncode == 0, r.stderr
    assert "plans/**" in r.stdout
    assert cv("init", str(tmp_path / "ws"), "-m", "*.md", "-m", "plans/**").returncode == 0
    clash = cv("init", str(tmp_path / "ws"), "-m", "other/**")
    assert clash.returncode == 1 and "a second policy is never applied" in clash.stderr
    assert "`init` with the same `--managed`" in clash.stderr  # (it advised `init` without globs: a usage error)
    bad = cv("init", str(tmp_path / "ws2"), "-m", "a**")
    assert bad.returncode == 1 and "malformed glob" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "ws2").exists(), "a refused init leaves no directory behind"


def test_init_refuses_a_glob_that_names_only_the_volumes_own_directory(tmp_path: Path) -> None:
    """Files in .coherent/ are never managed, so a glob naming only them would protect nothing:
    `init` says so and makes nothing, alone or beside a glob that works."""
    for globs in ([".coherent/**"], ["plans/**", ".coherent/*.db"], [".coherent"]):
        r = cv("init", str(tmp_path / "ws"), *(a for g in globs for a in ("-m", g)))
        assert r.returncode == 1 and "never managed" in r.stderr and "Traceback" not in r.stderr, (globs, r.stderr)
        assert not (tmp_path / "ws").exists()
    assert cv("init", str(tmp_path / "ws"), "-m", ".c*/**").returncode == 0  # may name other directories


def test_a_refused_init_leaves_no_directory_behind(tmp_path: Path) -> None:
    root = tmp_path / "new" / "ws"
    r = cv("init", str(root), "-m", "plans/**", "--registry", "postgresql://cv:secret@127.0.0.1:1/cv", "--volume", "v")
    assert r.returncode == 1 and "password" in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_refused_init_removes_only_what_it_made_never_a_volume_made_there_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`init` of a root that did not exist, refused after another process made a volume inside it
    and committed there (while the refused one waited on an unreachable database, say), leaves that
    volume and its versions whole; what it made itself and is still empty goes."""
    from click.testing import CliRunner

    from coherent_volume import cli
    from coherent_volume.errors import RegistryError

    root = tmp_path / "proj"
    inner = root / "ws"

    def meanwhile(*args: object, **kwargs: object) -> None:
        inner.mkdir()
        with CoherentVolume(inner, managed=("plans/**",), agent="other") as other:
            other.write(P, "committed meanwhile\n")
        raise RegistryError("the PostgreSQL server did not answer (nothing was written)")

    monkeypatch.setattr(cli, "open_core", meanwhile)
    r = CliRunner().invoke(cli.main, ["init", str(root), "-m", "plans/**", "--registry", "postgresql://cv@h/cv"])
    assert r.exit_code == 1 and "did not answer" in r.output
    with CoherentVolume(inner, agent="check") as check:
        assert check.read(P) == b"committed meanwhile\n" and check.version(P) == 1
    refused = tmp_path / "new" / "deep"
    monkeypatch.setattr(cli, "open_core", lambda *a, **k: (_ for _ in ()).throw(RegistryError("refused")))
    assert CliRunner().invoke(cli.main, ["init", str(refused), "-m", "plans/**"]).exit_code == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # what it made, empty, is gone


def test_as_runs_the_command_as_the_agent_or_fails_as_a_shell_does(tmp_path: Path) -> None:
    """`as NAME -- CMD` runs CMD with COHERENT_AGENT set; one that cannot be run exits as a shell
    exits for it, 127 not found and 126 not executable (it was 1: /tmp/s30cli 9)."""
    r = cv("as", "alice", "--", sys.executable, "-c", "import os; print(os.environ['COHERENT_AGENT'])")
    assert (r.returncode, r.stdout) == (0, "alice\n")
    missing = cv("as", "alice", "--", "no-such-command-here")
    assert missing.returncode == 127 and "cannot run no-such-command-here" in missing.stderr, missing.stderr
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    unrunnable = cv("as", "alice", "--", str(script))
    assert unrunnable.returncode == 126 and "Permission denied" in unrunnable.stderr, unrunnable.stderr


def test_init_and_policy_refuse_bad_values_and_roots_before_writing_anything(tmp_path: Path) -> None:
    """A policy value out of range (not a number, past what the registry's integers hold) and a root
    whose path is not UTF-8 are refused with nothing made; a volume's policy stays as it was. A value
    is a usage error (status 2, naming the option: NaN and too large numbers were status 1, in the
    library's words: /tmp/s30cli 7)."""
    for option, value in (("--keep-days", "nan"), ("--keep-last", str(2**80)), ("--max-store-bytes", str(2**64))):
        r = cv("init", str(tmp_path / "ws"), "-m", "plans/**", option, value)
        assert r.returncode == 2 and option in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not (tmp_path / "ws").exists(), (option, r.stdout)
    assert cv("init", str(tmp_path / "ws"), "-m", "plans/**").returncode == 0
    for option, value in (("--keep-days", "nan"), ("--keep-last", str(2**80)), ("--max-store-bytes", str(2**64))):
        bad = cv("policy", str(tmp_path / "ws"), option, value)
        assert bad.returncode == 2 and f"Invalid value for '{option}'" in bad.stderr, bad.stderr
    assert "at least the last 10 per path" in cv("policy", str(tmp_path / "ws")).stdout
    odd = os.path.join(os.fsencode(tmp_path), b"ws\xff")
    r = subprocess.run([CLI, "init", odd, "-m", "plans/**"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not valid UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.lexists(odd)


def test_a_volume_is_not_made_around_more_directories_than_can_be_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new volume's tree is searched for a volume below it; past MOST_SCANNED directories it is
    not made (a volume there, unseen, would be refused at every open), saying so, nothing written."""
    from coherent_volume import core

    monkeypatch.setattr(core, "MOST_SCANNED", 5)
    for i in range(6):
        (tmp_path / "big" / f"d{i}").mkdir(parents=True)
    with pytest.raises(VolumeConfigError, match="more than 5 directories") as refused:
        CoherentVolume(tmp_path / "big", managed=("plans/**",), agent="a")
    assert "nothing was written" in str(refused.value) and not (tmp_path / "big" / ".coherent").exists()
    (tmp_path / "small" / "d").mkdir(parents=True)
    CoherentVolume(tmp_path / "small", managed=("plans/**",), agent="a").close()


def test_commands_given_a_directory_inside_a_volume_name_its_root(tmp_path: Path) -> None:
    """`log`, `policy`, `prune` and `diff` given a directory inside a volume say which volume it is
    in and to give its root, not to create a volume there (which would be refused as nested)."""
    root = tmp_path / "ws"
    assert cv("init", str(root), "-m", "plans/**").returncode == 0
    (root / "plans").mkdir(exist_ok=True)
    for args in (("log",), ("policy",), ("prune",), ("diff",)):
        r = cv(*args, str(root / "plans"), *(["plans/x.md"] if args == ("diff",) else []))
        assert r.returncode == 1 and f"inside the volume at {root}, not its root: give {root}" in r.stderr, (
            args,
            r.stderr,
        )
    r = cv("init", str(tmp_path / "pg"), "-m", "plans/**", "--registry", "postgresql://cv@127.0.0.1:1/cv")
    assert r.returncode == 1 and "--volume NAME" in r.stderr and "None" not in r.stderr


def test_reclaiming_a_live_holders_grant_says_its_process_still_runs(tmp_path: Path) -> None:
    """`reclaim` ends a grant whatever its holder: when that process is alive here, it says so and
    what happens to the holder's next write (refused, fenced, for a lock() holder)."""
    root = tmp_path / "ws"
    assert cv("init", str(root), "-m", "plans/**").returncode == 0
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, "one\n")
        with alice.lock(P, ttl=60):
            r = cv("reclaim", str(root), P)
            assert r.returncode == 0 and "reclaimed the write grant of 'alice'" in r.stdout
            assert "still running here" in r.stderr and "fenced" in r.stderr, r.stderr
            with pytest.raises(StaleWriteError, match="fenced"):
                alice.write(P, "two\n")


def test_init_inside_a_mount_or_at_its_mountpoint_names_the_volume_and_its_mount(
    root: Path, mounted: Mount, tmp_path: Path
) -> None:
    """`init MNT/other` said it lay inside "the volume at MNT" and to remove MNT/.coherent (not there:
    the volume is ROOT); `init MNT` and `CoherentVolume(MNT)` guessed that the root was removed or
    moved (a mount of a volume now opens as its root, as every command takes it); and
    `CoherentVolume(MNT/plans)` said to create a volume there."""
    inside = cv("init", str(mounted.path / "other"), "-m", "plans/**")
    assert inside.returncode == 1 and "Traceback" not in inside.stderr, inside.stderr
    assert f"lies inside {mounted.path}, where the volume at {root} is mounted" in inside.stderr, inside.stderr
    assert ".coherent" not in inside.stderr and not (root / "other").exists()
    at = cv("init", str(mounted.path), "-m", "plans/**")
    assert at.returncode == 1 and f"{mounted.path} is where the volume at {root} is mounted" in at.stderr, at.stderr
    assert "it is a volume already" in at.stderr and "removed or moved" not in at.stderr
    with CoherentVolume(mounted.path, agent="alice") as alice:  # opened as its root, as every command takes it
        assert alice.root == str(root)
    (mounted.path / "plans").mkdir(exist_ok=True)
    below = mounted.path / "plans"
    with pytest.raises(VolumeConfigError) as info:  # it said "no volume ... create one with init" there
        CoherentVolume(below, agent="alice")
    assert f"{below} is a directory inside {mounted.path}, where the volume at {root} is mounted" in str(info.value)
    assert f"give {root}" in str(info.value) and "coherent-volume init" not in str(info.value)


def test_init_at_a_dead_mount_says_its_daemon_is_gone(root: Path, tmp_path: Path) -> None:
    """A mount whose daemon was killed: `init` there said only "[Errno 17] File exists"."""
    with Mount(root, tmp_path / "mnt") as m:
        m.kill_daemon()
        r = cv("init", str(m.path), "-m", "plans/**")
        assert r.returncode == 2 and "is a mount whose daemon is gone" in r.stderr, r.stderr
        assert f"coherent-volume unmount {m.path}`" in r.stderr
        link = tmp_path / "link"
        link.symlink_to(m.path)
        for inside in (m.path / "plans", link):  # the mountpoint named, not the path given (its unmount fails)
            r = cv("status", str(inside))
            assert r.returncode == 2 and f"is in {str(m.path)!r}, a mount whose daemon is gone" in r.stderr, r.stderr
            assert f"`coherent-volume unmount {m.path}`" in r.stderr


def test_init_refuses_a_volume_inside_another_or_around_one(tmp_path: Path) -> None:
    """Volumes do not nest: a file in both would be checked by one and not the other. `init` of a
    directory inside a volume, or of one holding a volume below it, is refused, saying which volume
    and what to do, and leaves nothing behind."""
    outer, around = tmp_path / "outer", tmp_path / "around"
    assert cv("init", str(outer), "-m", "**/*.md").returncode == 0
    inside = cv("init", str(outer / "sub"), "-m", "plans/**")
    assert inside.returncode == 1 and "Traceback" not in inside.stderr, inside.stderr
    assert f"{outer}/sub lies inside the volume at {outer}: volumes do not nest" in inside.stderr
    assert "Work in the volume at" in inside.stderr
    assert not (outer / "sub").exists()
    assert cv("init", str(around / "deep/ws"), "-m", "plans/**").returncode == 0
    contains = cv("init", str(around), "-m", "*.md")
    assert contains.returncode == 1 and f"{around} contains the volume at {around}/deep/ws" in contains.stderr
    assert not (around / ".coherent").exists()
    # a mount of a volume below shows no registry: found by itself (/tmp/s28cli 4: made, then its writes
    # there failed with a bare PermissionError)
    with Mount(outer, tmp_path / "host/mnt") as m:
        mounting = cv("init", str(tmp_path / "host"), "-m", "**")
        assert mounting.returncode == 1, mounting.stderr
        assert f"contains {m.path}, where the volume at {outer} is mounted" in mounting.stderr
        assert f"unmount {m.path} first" in mounting.stderr
        assert not (tmp_path / "host/.coherent").exists()


def test_status_table_and_json(root: Path) -> None:
    _refused_scenario(root)
    with CoherentVolume(root, agent="carol") as carol, carol.lock("plans/locked.md"):
        human = cv("status", str(root))
        data = json.loads(cv("status", str(root), "--json").stdout)
    assert human.returncode == 0, human.stderr
    assert "plans/plan.md" in human.stdout and "alice" in human.stdout and "carol" in human.stdout
    files = {f["path"]: f for f in data["files"]}
    assert files[P]["version"] == 2 and files[P]["writer"] == "alice"
    agents = {a["agent"]: a for a in data["agents"]}
    assert agents["bob"]["stale"] == 1 and agents["alice"]["stale"] == 0
    assert data["managed"] == ["*.md", "plans/**"]


def test_status_reports_foreign_writes(root: Path) -> None:
    (root / "plans/by-hand.md").write_text("typed in an editor")
    data = json.loads(cv("status", str(root), "--json").stdout)
    assert {"path": "plans/by-hand.md", "writer": "external", "version": 1}.items() <= {
        k: v for f in data["files"] if f["path"] == "plans/by-hand.md" for k, v in f.items()
    }.items()


def test_log_shows_commits_refusals_and_foreign_writes(root: Path) -> None:
    _refused_scenario(root)
    (root / P).write_text("foreign")
    with CoherentVolume(root, agent="dave") as dave:
        dave.read(P)
    events = [json.loads(line) for line in cv("log", str(root), "--json").stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds == ["commit", "commit", "refusal", "foreign"]
    refusal = events[2]
    assert (refusal["agent"], refusal["reason"], refusal["seen_version"], refusal["version"]) == ("bob", "stale", 1, 2)
    human = cv("log", str(root))
    assert human.returncode == 0 and "refusal" in human.stdout and "stale" in human.stdout


def test_log_follow_prints_new_events(root: Path) -> None:
    proc = subprocess.Popen([CLI, "log", str(root), "--follow", "--json"], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        with CoherentVolume(root, agent="erin") as erin:
            erin.write("plans/followed.md", b"x")
        line = proc.stdout.readline()
        assert json.loads(line)["path"] == "plans/followed.md"
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("gone", ["removed", "made-anew"])
def test_log_follow_ends_saying_so_when_its_volume_is_gone(tmp_path: Path, gone: str) -> None:
    root = tmp_path / "ws"
    assert cv("init", str(root), "--managed", "plans/**").returncode == 0
    proc = subprocess.Popen(
        [CLI, "log", str(root), "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with CoherentVolume(root, agent="alice") as alice:
            alice.write(P, b"v1")
        assert select.select([proc.stdout], [], [], 30)[0], "log --follow printed nothing in 30 s"
        assert json.loads(proc.stdout.readline())["path"] == P  # it is following
        shutil.rmtree(root)
        if gone == "made-anew":
            assert cv("init", str(root), "--managed", "plans/**").returncode == 0
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    assert "the volume followed is gone" in err and "follow the volume where it is now" in err
    assert json.loads(out.splitlines()[-1])["error"]["kind"] == "VolumeConfigError"


def test_why_explains_the_last_refusal(root: Path) -> None:
    _refused_scenario(root)
    human = cv("why", str(root), P)
    assert human.returncode == 0, human.stderr
    assert "bob" in human.stdout and "stale" in human.stdout and "re-read" in human.stdout
    data = json.loads(cv("why", str(root), P, "--json").stdout)
    assert data["refusal"]["agent"] == "bob" and data["version"] == 2
    assert [c["agent"] for c in data["changes"]] == ["alice"]
    quiet = json.loads(cv("why", str(root), "plans/untouched.md", "--json").stdout)
    assert quiet["refusal"] is None and "no write" in quiet["advice"]


def test_why_lists_the_newest_changes_since_a_view_and_counts_the_earlier_ones(root: Path) -> None:
    """A refused agent whose view is many versions old: `why` lists the newest WHY_CHANGES changes
    since it (10,000 versions were listed in 11 s), says how many earlier ones it left out and
    where they are; --json counts them too."""
    from coherent_volume.report import WHY_CHANGES

    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, "v1\n")
        bob.read(P)
        for n in range(WHY_CHANGES + 5):
            alice.write(P, f"v{n + 2}\n")
        with pytest.raises(StaleWriteError):
            bob.write(P, "mine\n")
    data = json.loads(cv("why", str(root), P, "--json").stdout)
    assert [c["version"] for c in data["changes"]] == list(range(7, WHY_CHANGES + 7))
    assert data["earlier_changes"] == 5
    human = cv("why", str(root), P)
    assert human.returncode == 0, human.stderr
    assert (
        f"5 earlier changes since that agent's view are not listed (`coherent-volume history {root} {P}`"
        in " ".join(human.stdout.split())
    ), human.stdout


def test_cli_errors_are_messages_not_tracebacks(tmp_path: Path, root: Path) -> None:
    r = cv("status", str(tmp_path))
    assert r.returncode == 1 and "no volume at" in r.stderr and "Traceback" not in r.stderr
    r = cv("why", str(root), "../escape")
    assert r.returncode == 1 and "outside the volume" in r.stderr


def test_a_root_that_is_no_directory_is_a_usage_error(tmp_path: Path) -> None:
    """Exit status 2, as the README says, whatever it is: before, a FIFO or a device passed for a
    directory and failed later, exit status 1 (/tmp/s28cli 6)."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "file").write_text("x")
    for root in (fifo, Path("/dev/null"), tmp_path / "file"):
        for args in (("status", str(root)), ("history", str(root), "plans/a.md")):
            r = cv(*args)
            assert r.returncode == 2 and "not a directory" in r.stderr, (args, r.stderr)


def test_a_json_command_that_fails_prints_its_error_as_json_too(tmp_path: Path, root: Path) -> None:
    """A tool that reads --json output learns why a command failed from stdout, not only stderr."""
    cases = [
        (("status", str(tmp_path), "--json"), 1, "RegistryError", "no volume at"),
        (("history", str(root), "plans/none.md", "--json"), 4, "VersionGone", "plans/none.md"),
        (("history", str(root), P, "--all", "--limit", "2", "--json"), 2, "UsageError", "--all"),
        (("why", str(root), "../escape", "--json"), 1, "OutsideVolume", "outside the volume"),
        # an agent name checked as the command line is read, wherever --json stands (/tmp/s28cli 2)
        (("diff", str(root), P, "--agent", "", "--json"), 1, "VolumeConfigError", "agent name ''"),
        (
            ("restore", "--json", str(root), P, "--version", "1", "--agent", "external"),
            1,
            "VolumeConfigError",
            "reserved",
        ),
    ]
    for args, status, kind, said in cases:
        r = cv(*args)
        assert r.returncode == status, (args, r.stderr)
        error = json.loads(r.stdout)["error"]
        assert (error["kind"], error["exit_status"]) == (kind, status), (args, error)
        assert said in error["message"] and error["message"] in r.stderr, (args, error, r.stderr)
    assert cv("status", str(tmp_path)).stdout == ""  # without --json, stdout stays empty
    for place, said in ((root, "No space left on device"), (tmp_path, "no volume at")):  # stdout cannot be written
        with open("/dev/full", "w") as full:
            r = subprocess.run([CLI, "status", str(place), "--json"], stdout=full, stderr=subprocess.PIPE, text=True)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr  # (two tracebacks before)
        assert r.stderr.count("Error: ") == 1 and said in r.stderr, r.stderr
    closed = subprocess.run(  # stdout closed (`>&-`): the message on stderr, no traceback (/tmp/s28r3 4)
        ["bash", "-c", f"{shlex.quote(CLI)} diff --json --agent external {shlex.quote(str(root))} {P} >&-"],
        capture_output=True,
        text=True,
    )
    assert closed.returncode == 1 and "Traceback" not in closed.stderr, closed.stderr
    assert "Error: agent name 'external' is reserved" in closed.stderr, closed.stderr


def test_status_hides_deleted_paths_unless_asked(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/tmp.md", b"x")
        alice.delete("plans/tmp.md")
        alice.write("plans/kept.md", b"y")
    plain = cv("status", str(root)).stdout
    assert "plans/kept.md" in plain and "plans/tmp.md" not in plain and "1 deleted paths not shown" in plain
    assert "plans/tmp.md (deleted)" in cv("status", str(root), "--all").stdout


def test_status_reports_a_managed_file_whose_name_is_not_utf8(root: Path) -> None:
    """A file named b'plans/\\xff.md' made on the root directly: the volume cannot record it (paths
    are UTF-8), so status says so, escaped, instead of failing with a traceback."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"v1")
    with open(bytes(root) + b"/plans/\xff.md", "wb") as f:
        f.write(b"typed by hand")
    human = cv("status", str(root))
    assert human.returncode == 0 and "Traceback" not in human.stderr, human.stderr
    assert "plans/\\xff.md" in human.stdout and "not valid UTF-8" in human.stdout and P in human.stdout
    data = json.loads(cv("status", str(root), "--json").stdout)
    assert [u["path"] for u in data["unchecked"]] == ["plans/\\xff.md"]
    assert [f["path"] for f in data["files"]] == [P]


def test_status_prints_paths_as_they_are(root: Path) -> None:
    (root / "plans/[bold]notes.md").write_text("brackets are not markup")
    human = cv("status", str(root))
    assert human.returncode == 0 and "plans/[bold]notes.md" in human.stdout, human.stdout + human.stderr


def test_why_takes_a_path_inside_a_plain_volume(root: Path) -> None:
    _refused_scenario(root)
    answer = cv("why", str(root / P), "--json")
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout)["refusal"]["agent"] == "bob"
    lost = cv("why", "/nowhere/plan.md")
    assert lost.returncode == 2 and "inside a volume" in lost.stderr


def test_log_with_a_limit_past_what_a_registry_can_number_shows_the_whole_log(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one")
    for output in ([], ["--json"]):
        r = cv("log", str(root), "-n", str(2**63), *output)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert "commit" in r.stdout and P in r.stdout


# ---- a registry this process may not use: what happened, on which path, and what to do -------------------

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A volume (managing plans/**) that user nobody can reach: pytest's tmp_path is private."""
    parent = Path(tempfile.mkdtemp(prefix="cv-shared-", dir="/tmp"))
    try:
        parent.chmod(0o755)
        root = parent / "vol"
        made = cv("init", str(root), "-m", "plans/**")
        assert made.returncode == 0, made.stderr
        yield root
    finally:
        shutil.rmtree(parent)


def _as_nobody(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, CLI, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd="/")


def test_another_user_is_told_permission_denied_on_which_path_and_what_to_do(shared_root: Path) -> None:
    """Not "no volume at ... create one" (there is one), nor a bare EACCES."""
    registry = shared_root / ".coherent"
    for args in (["status", str(shared_root)], ["init", str(shared_root), "-m", "plans/**"]):
        r = _as_nobody(*args)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"permission denied on {str(registry / 'registry.db')!r}" in r.stderr, r.stderr
        assert f"{str(registry)!r} belongs to uid {os.getuid()}" in r.stderr and "uid 65534" in r.stderr
        assert "run it as the user the volume belongs to" in r.stderr and "no volume at" not in r.stderr
    registry.chmod(0o755)
    (registry / "registry.db").chmod(0o644)
    r = _as_nobody("history", str(shared_root), "plans/a.md")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"permission denied on {str(registry / 'registry.db')!r}" in r.stderr, r.stderr
    assert "(mode 0644), and this process runs as uid 65534" in r.stderr


def test_an_open_refused_for_a_read_only_registry_leaves_nothing_that_refuses_the_next(shared_root: Path) -> None:
    """A registry file its user made read-only is refused, and the refusal makes nothing: SQLite's
    read-only probe made its -wal and -shm, with the registry's mode, and once the user gave the
    file its mode back (what the error says to do) every open was still refused, naming the -shm."""
    registry = shared_root / ".coherent"
    subprocess.run(["chown", "-R", "65534:65534", str(shared_root)], check=True)
    before = sorted(p.name for p in registry.iterdir())
    (registry / "registry.db").chmod(0o400)
    r = _as_nobody("status", str(shared_root))
    assert r.returncode == 1 and f"permission denied on {str(registry / 'registry.db')!r}" in r.stderr, r.stderr
    assert sorted(p.name for p in registry.iterdir()) == before
    (registry / "registry.db").chmod(0o600)
    r = _as_nobody("status", str(shared_root))
    assert r.returncode == 0, r.stderr


def test_root_that_may_not_override_permission_bits_is_told_they_refuse_it(root: Path) -> None:
    """Root without CAP_DAC_OVERRIDE (a container that dropped it) is refused by a read-only registry
    file's bits, as any user: not "an immutable or append-only flag, an ACL or a security module"."""
    registry = root / ".coherent/registry.db"
    registry.chmod(0o400)
    dropped = "-dac_override,-dac_read_search,-fowner"
    r = subprocess.run(
        ["setpriv", "--bounding-set", dropped, "--inh-caps", dropped, CLI, "status", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and f"permission denied on {str(registry)!r}" in r.stderr, r.stderr
    assert "immutable" not in r.stderr and "(mode 0400)" in r.stderr


def test_root_of_a_user_namespace_is_told_the_permission_bits_refuse_it(shared_root: Path) -> None:
    """Root of a user namespace (a rootless container) has CAP_DAC_OVERRIDE, which does not apply to
    files whose owner is not mapped into it: refused by their bits, it was told of an immutable flag,
    an ACL or a security module."""
    subprocess.run(["chown", "-R", "1234:1234", str(shared_root)], check=True)
    (shared_root / ".coherent").chmod(0o755)
    for path in (shared_root / ".coherent").iterdir():
        path.chmod(0o755 if path.is_dir() else 0o644)
    r = subprocess.run(
        ["unshare", "--user", "--map-root-user", CLI, "status", str(shared_root)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    registry = shared_root / ".coherent/registry.db"
    assert r.returncode == 1 and f"permission denied on {str(registry)!r}" in r.stderr, r.stderr
    assert "immutable" not in r.stderr


def test_log_follow_goes_on_through_a_while_it_may_not_look_at_the_registry(shared_root: Path) -> None:
    """`.coherent` made unreadable for a moment (chmod 000, then back) is not a volume gone: a user's
    `log --follow` keeps following (it ended, saying the registry was removed or replaced)."""
    registry = shared_root / ".coherent"
    for path in (registry, *registry.iterdir()):
        path.chmod(0o777 if path.is_dir() else 0o666)
    proc = subprocess.Popen(
        [*NOBODY, CLI, "log", str(shared_root), "--follow", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        with CoherentVolume(shared_root, agent="alice") as alice:
            alice.write(P, b"v1")
            assert select.select([proc.stdout], [], [], 30)[0] and proc.stdout is not None
            assert json.loads(proc.stdout.readline())["version"] == 1  # following
            registry.chmod(0o000)
            time.sleep(1.0)
            registry.chmod(0o777)
            alice.read(P)
            alice.write(P, b"v2")
            assert select.select([proc.stdout], [], [], 30)[0], "the follower printed nothing more"
            line = proc.stdout.readline()
            assert line and json.loads(line)["version"] == 2, (
                line,
                proc.stderr.read() if proc.poll() is not None else "",
            )
            assert proc.poll() is None
    finally:
        registry.chmod(0o777)
        proc.kill()
        proc.wait()


def test_a_hook_run_by_a_user_who_cannot_look_into_the_registry_denies_the_write(shared_root: Path) -> None:
    """Its `.coherent` unreadable, the volume was taken for no volume: the write was let through
    unchecked. It is a volume whose check fails, and says why."""
    (shared_root / "plans").mkdir(mode=0o777)
    (shared_root / "plans").chmod(0o777)
    target = shared_root / "plans/a.md"
    event = {
        "session_id": "s1",
        "transcript_path": "/tmp/s1.jsonl",
        "cwd": str(shared_root),
        "permission_mode": "default",
        "hook_event_name": "PreToolUse",
        "tool_name": "Write",
        "tool_input": {"file_path": str(target), "content": "x"},
        "tool_use_id": "toolu_01",
    }
    r = _as_nobody("hook", "claude-code", stdin=json.dumps(event))
    assert r.returncode == 0 and r.stdout, (r.stdout, r.stderr)
    answer = json.loads(r.stdout)["hookSpecificOutput"]
    assert answer["permissionDecision"] == "deny"
    assert f"permission denied on {str(shared_root / '.coherent/registry.db')!r}" in answer["permissionDecisionReason"]


def test_a_volume_on_a_read_only_mount_says_so_and_what_to_do(root: Path, tmp_path: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"one")
    before = {p.name: p.read_bytes() for p in (root / ".coherent").iterdir() if p.is_file()}
    read_only = tmp_path / "ro"
    read_only.mkdir()
    subprocess.run(["mount", "--bind", str(root), str(read_only)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)], check=True)
        for args in (["status", str(read_only)], ["history", str(read_only), P], ["log", str(read_only)]):
            r = cv(*args)
            assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
            assert f"{str(read_only / '.coherent/registry.db')!r} is on a read-only file system" in r.stderr, r.stderr
            assert "use the volume where its root is mounted read-write" in r.stderr
    finally:
        subprocess.run(["umount", str(read_only)], check=True)
    assert {p.name: p.read_bytes() for p in (root / ".coherent").iterdir() if p.is_file()} == before


def test_every_option_naming_an_agent_is_checked_alike(root: Path) -> None:
    _refused_scenario(root)
    for name in ("", "external", "bad\x01name"):
        for args in (
            ("diff", str(root), P, "--agent", name),
            ("restore", str(root), P, "--version", "1", "--agent", name),
        ):
            r = cv(*args)
            assert r.returncode == 1 and r.stdout == "" and "Error: agent name" in r.stderr, (args, r.stderr)
    r = cv("diff", str(root), P, "--agent", "nobody")  # a valid name that never read it: from v0, said so
    assert r.returncode == 0 and r.stdout.startswith(f"--- /dev/null\n+++ {P}@v2\n"), r.stdout
    assert r.stderr == f"agent nobody has no view of {P} (never read it): from v0, before it existed\n"


def test_status_of_a_directory_inside_a_volume_shows_that_volume(root: Path) -> None:
    _refused_scenario(root)
    real = os.path.realpath(root)
    human = cv("status", str(root / "plans"))
    assert human.returncode == 0 and P in human.stdout and f"volume {real}" in human.stdout, human.stderr
    said = (
        f"{root / 'plans'} is a directory inside the volume at {real}, not its root: the status of that volume follows"
    )
    assert human.stderr == said + "\n"
    data = json.loads(cv("status", str(root / "plans"), "--json").stdout)
    assert data["root"] == real and [f["path"] for f in data["files"]] == [P]
    assert cv("status", str(root)).stderr == ""


def test_status_reports_fifos_and_sockets_at_managed_names(root: Path) -> None:
    """They cannot hold a version: status says what each is, and that what is written into it is
    neither checked nor versioned. A file replaced by one is recorded as deleted, and reported too."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, b"v1")
        alice.write("plans/was-a-file.md", b"then a FIFO")
    os.unlink(root / "plans/was-a-file.md")
    os.mkfifo(root / "plans/was-a-file.md")
    os.mkfifo(root / "plans/pipe.md")
    os.mkfifo(root / "notes.txt")  # not managed: not reported
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(root / "plans/sock.md"))
        human = cv("status", str(root))
        data = json.loads(cv("status", str(root), "--json").stdout)
    assert human.returncode == 0, human.stderr
    expected = {
        "plans/pipe.md": "a FIFO (named pipe)",
        "plans/sock.md": "a socket",
        "plans/was-a-file.md": "a FIFO (named pipe)",
    }
    assert [u["path"] for u in data["unchecked"]] == sorted(expected)
    for u in data["unchecked"]:
        assert u["problem"].startswith(f"it is {expected[u['path']]}, not a regular file: the volume keeps no versions")
        assert "neither checked nor versioned" in u["problem"]
        assert f"not checked: {u['path']}: {u['problem']}" in human.stdout
    files = {f["path"]: (f["version"], f["present"], f["writer"]) for f in data["files"]}
    assert files == {P: (1, True, "alice"), "plans/was-a-file.md": (2, False, "external")}
    why = cv("why", str(root), "plans/was-a-file.md").stdout
    assert why.startswith("plans/was-a-file.md: managed, current v2 (deleted), last written by external")
    assert why.splitlines()[0].endswith("; it is a FIFO (named pipe) now, not a regular file")
    never = cv("history", str(root), "plans/pipe.md")
    assert (
        never.returncode == 4
        and "'plans/pipe.md' has no versions: it is a FIFO (named pipe), and only regular" in never.stderr
    )


def test_a_long_table_prints_as_rich_draws_it_without_rich_laying_out_each_cell(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past PLAIN_ROWS rows a table is drawn by `_Columns` (rich took 55 s for 50,000 managed
    files): the same text as rich draws, wide characters and escaped names included, but a path
    wider than the console kept on one line where rich folds it; `status` of a volume with more
    files than that lists each."""
    import io

    from coherent_volume import cli

    rows = [[f"plans/{name}", str(n), "alice"] for n, name in enumerate(["a.md", "日本語.md", "x\udcff.md"])]

    def drawn(plain_rows: int) -> str:
        monkeypatch.setattr(cli, "PLAIN_ROWS", plain_rows)
        console = cli._console()
        console.file = io.StringIO()
        console.print(cli._table("files", ["path", "version", "last writer"], rows))
        return console.file.getvalue()

    assert drawn(0) == drawn(len(rows)), drawn(0)
    rows.append(["plans/" + "b" * 200, "3", "alice"])  # wider than the console: rich folds it in its cell
    assert "b" * 200 in drawn(0) and "b" * 200 not in drawn(len(rows))
    (root / "plans").mkdir(exist_ok=True)
    for n in range(cli.PLAIN_ROWS + 1):
        (root / "plans" / f"f{n}.md").write_text(f"{n}\n")
    listed = cv("status", str(root))
    assert listed.returncode == 0, listed.stderr
    assert {f"plans/f{n}.md" for n in range(cli.PLAIN_ROWS + 1)} <= set(re.findall(r"plans/f\d+\.md", listed.stdout))


def _into_full_or_closed(args: list[str], into: str) -> subprocess.CompletedProcess[str]:
    """`coherent-volume ARGS` with stdout /dev/full (`into="full"`) or closed (`>&-`)."""
    if into == "closed":
        line = " ".join(shlex.quote(a) for a in (CLI, *args))
        return subprocess.run(["bash", "-c", f"exec >&-; {line}"], stderr=subprocess.PIPE, text=True, timeout=60)
    with open("/dev/full", "w") as full:
        return subprocess.run([CLI, *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)


@pytest.mark.parametrize("into", ["full", "closed"])
def test_a_mount_whose_report_cannot_be_written_is_up_and_says_so_on_stderr(
    root: Path, tmp_path: Path, into: str
) -> None:
    """`mount` with stdout unwritable exited 1 with a bare errno while the mount was up and its
    daemon running: a script took it for a failure and left the daemon (/tmp/s33cli 1). The mount
    is a change made: its report goes to stderr, exit status 0."""
    from .harness.mounts import is_mounted, unmount_and_reap

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = _into_full_or_closed(["mount", str(root), str(mnt)], into)
        assert is_mounted(mnt)
        assert r.returncode == 0, r.stderr
        assert "stdout could not be written" in r.stderr and f"mounted {os.path.realpath(root)} on {mnt}" in r.stderr
    finally:
        unmount_and_reap(mnt)


@pytest.mark.parametrize("into", ["full", "closed"])
def test_an_install_or_uninstall_whose_report_cannot_be_written_says_so_on_stderr(tmp_path: Path, into: str) -> None:
    """`codex install DIR >/dev/full` wrote DIR/.codex/hooks.json, then exited 1 with a bare errno
    (/tmp/s33cli 7): the change was made, so its report goes to stderr and the status is 0."""
    proj = tmp_path / "proj"
    proj.mkdir()
    settings = proj / ".codex/hooks.json"
    done = _into_full_or_closed(["codex", "install", str(proj)], into)
    assert done.returncode == 0 and "hook codex" in settings.read_text(), done.stderr
    assert (
        "stdout could not be written" in done.stderr and f"installed coherent-volume hooks in {settings}" in done.stderr
    )
    done = _into_full_or_closed(["codex", "uninstall", str(proj)], into)
    assert done.returncode == 0 and "hook codex" not in settings.read_text(), done.stderr
    assert (
        "stdout could not be written" in done.stderr and f"removed coherent-volume hooks from {settings}" in done.stderr
    )


def test_a_plain_directory_holding_a_mount_of_a_volume_is_said_to_be_no_volume(root: Path, tmp_path: Path) -> None:
    """`status X`, where X is a plain directory and X/mnt a mount of another volume, said "X/mnt,
    inside the volume at X, is a mount of ...: unmount it": there is no volume at X, and a newcomer
    who typed the wrong directory was told to unmount a working mount (/tmp/s33cli 2). Opening says
    there is no volume there, as it does once X/mnt is unmounted (`init X` refuses to make one
    around the mount, naming it)."""
    plain = tmp_path / "X"
    with Mount(root, plain / "mnt"):
        (tmp_path / "m2").mkdir()
        for args in (
            ("status", str(plain)),
            ("log", str(plain)),
            ("policy", str(plain)),
            ("mount", str(plain), str(tmp_path / "m2")),
        ):
            r = cv(*args)
            assert r.returncode == 1 and f"no volume at {str(plain)!r}" in r.stderr, (args, r.stderr)
            assert "inside the volume at" not in r.stderr and "Unmount" not in r.stderr, r.stderr
        with pytest.raises(RegistryError, match="no volume at"):  # the API too: the core says it
            CoherentVolume(plain)
        made = cv("init", str(plain), "-m", "*.md")
        assert made.returncode == 1 and f"{plain} contains {plain / 'mnt'}, where the volume at {root}" in made.stderr
        assert "inside the volume at" not in made.stderr and not (plain / ".coherent").exists()
    assert f"no volume at {str(plain)!r}" in cv("status", str(plain)).stderr


def test_an_empty_root_or_mountpoint_is_a_usage_error(root: Path, tmp_path: Path) -> None:
    """`init ''` said "[Errno 2] No such file or directory: ''" with exit status 1 (/tmp/s33cli 8),
    and `mount ROOT ''` took the working directory for its mountpoint: usage errors, exit status 2."""
    for args in (("init", "", "-m", "*.md"), ("status", ""), ("mount", str(root), "")):
        r = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert r.returncode == 2 and "an empty path names no directory" in r.stderr, (args, r.stderr)
        assert "Errno" not in r.stderr


def test_a_reader_that_leaves_ends_a_command_as_sigpipe_ends_other_programs(root: Path, tmp_path: Path) -> None:
    """`status | true`, `log -p | head` exited 1, the status of an error, so `set -o pipefail` took
    them for failures (/tmp/s33cli 9): they end as a program killed by SIGPIPE, silently, status 141
    in the shell."""
    import signal

    _refused_scenario(root)
    for args in (("status", str(root)), ("log", "-p", str(root)), ("show", str(root), P, "--version", "1")):
        read, write = os.pipe()
        os.close(read)
        try:
            r = subprocess.run([CLI, *args], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
            shell = subprocess.run(
                ["bash", "-c", '"$@"; echo "status $?" >&2', "bash", CLI, *args],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )
        finally:
            os.close(write)
        assert (r.returncode, r.stderr) == (-signal.SIGPIPE, ""), (args, r.returncode, r.stderr)
        assert shell.stderr == "status 141\n", (args, shell.stderr)


def test_log_follow_ended_by_ctrl_c_exits_130_saying_nothing(root: Path) -> None:
    """Ctrl-C, `log --follow`'s documented end, printed click's "Aborted!" and exited 1, the status
    of its "volume gone" end (/tmp/s33cli 9): 130, the shell's status for it, and nothing said."""
    import signal

    _refused_scenario(root)
    proc = subprocess.Popen(
        [CLI, "log", str(root), "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and select.select([proc.stdout], [], [], 30)[0]
        proc.stdout.readline()  # following
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (130, ""), (proc.returncode, err)
