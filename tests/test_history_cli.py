"""The history commands of the CLI (`history`, `show`, `diff`, `restore`, `why`'s diff, `log -p`,
the content store in `status`), run as real processes on real volumes, and inside a real mount."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest

from coherent_volume import (
    CoherenceError,
    CoherentVolume,
    GlobError,
    MergeConflict,
    Policy,
    StaleWriteError,
    VolumeConfigError,
)
from coherent_volume.cli import HISTORY_SHOWN
from coherent_volume.fingerprint import content_hash
from coherent_volume.policy import Retention

from .harness.mounts import CLI, Mount
from .harness.volumes import tamper

P = "plans/p.md"
REFUSED, GONE, DAMAGED = 3, 4, 5


def cv(
    *args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [CLI, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


def ok(*args: str | Path, **kwargs: object) -> str:
    r = cv(*args, **kwargs)  # type: ignore[arg-type]
    assert r.returncode == 0, r.stderr
    return r.stdout


def _three_versions(root: Path) -> None:
    """plans/p.md v1 and v2 by alice, v3 by bob, who read v2; carol read v1 and was refused."""
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, "intro\nstep one\nstep two\n")
        with CoherentVolume(root, agent="carol") as carol:
            carol.read(P)
            alice.write(P, "intro\nstep one, done\nstep two\n")
            bob.read(P)
            bob.write(P, "intro\nstep one, done\nstep two\nstep three :rocket:\n")
            with pytest.raises(StaleWriteError):
                carol.write(P, "carol's plan\n")


def test_history_lists_every_version_newest_first(root: Path) -> None:
    _three_versions(root)
    (root / P).write_text("typed by hand\n")  # a foreign write is listed too
    with CoherentVolume(root, agent="bob") as bob:
        bob.read(P)
        bob.restore(P, 1)
        bob.delete(P)
    data = json.loads(ok("history", root, P, "--json"))
    assert data["path"] == P
    got = [(v["version"], v["kind"], v["writer"], v["parents"]) for v in data["versions"]]
    assert got == [
        (6, "delete", "bob", []),
        (5, "restore", "bob", [1]),
        (4, "foreign", "external", []),
        (3, "commit", "bob", []),
        (2, "commit", "alice", []),
        (1, "commit", "alice", []),
    ]
    v1 = data["versions"][-1]
    assert (v1["size"], v1["hash"], v1["retained"]) == (24, content_hash(b"intro\nstep one\nstep two\n"), True)
    assert data["versions"][0]["hash"] is None and data["versions"][0]["size"] is None
    human = ok("history", root, P)
    assert "restore of v1" in human and "external" in human and content_hash(b"typed by hand\n")[:16] in human
    newest = json.loads(ok("history", root / P, "-n", "2", "--json"))  # a path inside the volume, no ROOT
    assert [v["version"] for v in newest["versions"]] == [6, 5]


def test_show_prints_a_versions_bytes_as_they_are_and_registers_no_view(root: Path) -> None:
    binary = bytes(range(256)) * 3
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/blob.bin", binary)
        alice.write("plans/blob.bin", b"second")
        alice.delete("plans/blob.bin")
    shown = subprocess.run([CLI, "show", root, "plans/blob.bin", "--version", "1"], capture_output=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout == binary, shown.stderr
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/blob.bin", b"back")
    with CoherentVolume(root, agent="bob") as bob:
        with pytest.raises(StaleWriteError) as refused:
            bob.write("plans/blob.bin", b"mine")  # show is not a read: bob still has no view
        assert refused.value.reason == "unread"
    gone = cv("show", root, "plans/blob.bin", "--version", "3")
    assert gone.returncode == GONE and "is a deletion by 'alice'" in gone.stderr and gone.stdout == ""
    never = cv("show", root, "plans/blob.bin", "--version", "9")
    assert never.returncode == GONE and "not in its history" in never.stderr


def test_damaged_content_is_reported_never_printed(root: Path) -> None:
    _three_versions(root)
    digest = content_hash(b"intro\nstep one\nstep two\n")
    tamper(root, digest, b"intro\nstep ONE\nstep two\n")
    r = cv("show", root, P, "--version", "1")
    assert r.returncode == DAMAGED and "damaged" in r.stderr and "step ONE" not in r.stdout
    assert cv("diff", root, P, "1", "2").returncode == DAMAGED
    assert ok("show", root, P, "--version", "2") == "intro\nstep one, done\nstep two\n"


def test_numbers_past_what_a_registry_holds_are_answered_not_crashed_on(root: Path) -> None:
    _three_versions(root)
    huge = str(2**63)
    for args in (
        ("show", root, P, "--version", huge),
        ("diff", root, P, huge, "1"),
        ("restore", root, P, "--version", huge, "--agent", "alice"),
    ):
        r = cv(*args)
        assert r.returncode == GONE and "not in its history" in r.stderr and "Traceback" not in r.stderr, r.stderr
    listed = json.loads(ok("history", root, P, "--limit", str(2**70), "--json"))
    assert [v["version"] for v in listed["versions"]] == [3, 2, 1]
    for days in ("inf", "1e400", "2000000"):
        bad = cv("policy", root, "--keep-days", days)
        assert bad.returncode == 2 and "--keep-days" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    with pytest.raises(VolumeConfigError, match="keep_days"):
        Retention(keep_days=10**400)


def test_diff_defaults_to_the_latest_change(root: Path) -> None:
    _three_versions(root)
    latest = ok("diff", root, P)
    assert latest.startswith("--- plans/p.md@v2\n+++ plans/p.md@v3\n") and "+step three :rocket:\n" in latest
    since_one = ok("diff", root, P, "1")
    assert since_one.startswith("--- plans/p.md@v1\n+++ plans/p.md@v3\n") and "-step one\n" in since_one
    backwards = json.loads(ok("diff", root / P, "3", "1", "--json"))  # PATH inside the volume, A and B
    assert (backwards["path"], backwards["from"], backwards["to"], backwards["binary"]) == (P, 3, 1, False)
    assert backwards["diff"].startswith("--- plans/p.md@v3\n+++ plans/p.md@v1\n")
    assert ok("diff", root, P, "0", "1").startswith("--- /dev/null\n+++ plans/p.md@v1\n")
    assert ok("diff", root, P, "2", "2") == ""
    carol = ok("diff", root, P, "--agent", "carol")  # from carol's view (v1) to the current version
    assert carol == since_one
    assert ok("diff", root, P, "--agent", "nobody").startswith("--- /dev/null\n")
    assert cv("diff", root, P, "1", "9").returncode == GONE


def test_diff_of_binary_content_and_bad_arguments(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/b.bin", b"\x00\x01")
        alice.write("plans/b.bin", b"\x00\x02")
    assert "binary content, no line diff" in ok("diff", root, "plans/b.bin")
    data = json.loads(ok("diff", root, "plans/b.bin", "--json"))
    assert (data["from"], data["to"], data["diff"], data["binary"]) == (1, 2, None, True)
    for args in (("x",), ("1", "2", "3"), ("1", "--agent", "alice")):
        bad = cv("diff", root, "plans/b.bin", *args)
        assert bad.returncode == 2 and bad.stdout == "", bad.stderr
    assert "not a version number" in cv("diff", root, "plans/b.bin", "x").stderr
    unmanaged = cv("history", root, "notes.txt")
    assert unmanaged.returncode == 1 and "not managed" in unmanaged.stderr
    outside = cv("show", root, "../elsewhere.md", "--version", "1")
    assert outside.returncode == 1 and "outside the volume" in outside.stderr


def _unwritable_stdout(*args: str | Path, into: str) -> subprocess.CompletedProcess[str]:
    """`coherent-volume ARGS` with stdout a pipe whose reader is gone (`into="pipe"`), /dev/full, or
    closed (`into="closed"`: started as `>&-`)."""
    if into == "closed":
        line = " ".join(shlex.quote(str(a)) for a in (CLI, *args))
        return subprocess.run(["bash", "-c", f"exec >&-; {line}"], stderr=subprocess.PIPE, text=True, timeout=60)
    if into == "full":
        with open("/dev/full", "w") as full:
            return subprocess.run([CLI, *map(str, args)], stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([CLI, *map(str, args)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("into", ["pipe", "full", "closed"])
def test_a_restore_whose_report_cannot_be_written_says_it_on_stderr(root: Path, into: str) -> None:
    """A restore is committed before its report is printed: where stdout cannot be written (its
    reader gone, a full disk), the report goes to stderr and the status is 0, so the caller does not
    take the change for a failure (before: status 1, and with --json into a closed pipe not a word:
    /tmp/s30cli 2). A refusal keeps its status 3 and its message on stderr."""
    _three_versions(root)
    for version, args, said in (("1", ("--json",), '"restored": 1'), ("2", (), "restored v2 as v5")):
        done = _unwritable_stdout("restore", root, P, "--version", version, "--agent", "bob", *args, into=into)
        assert done.returncode == 0, done.stderr
        assert "stdout could not be written" in done.stderr and said in done.stderr, done.stderr
    with CoherentVolume(root, agent="observer") as v:
        assert [e.kind for e in v.history(P)[:2]] == ["restore", "restore"]
    refused = _unwritable_stdout("restore", root, P, "--version", "1", "--agent", "alice", "--json", into=into)
    assert refused.returncode == REFUSED and "(stale)" in refused.stderr and "Traceback" not in refused.stderr
    for command in (("status", root), ("history", root, P), ("log", root), ("why", root, P)):
        lost = _unwritable_stdout(*command, into=into)  # a report that changed nothing: an error, never a traceback
        if into == "pipe":  # its reader gone: ended as SIGPIPE ends a program, silently (/tmp/s33cli 9)
            assert (lost.returncode, lost.stderr) == (-signal.SIGPIPE, ""), (lost.returncode, lost.stderr)
        else:
            assert lost.returncode == 1 and "Traceback" not in lost.stderr, lost.stderr


def test_a_refusals_detail_in_log_shows_names_escaped(root: Path) -> None:
    """A read-set refusal's log detail names the files that changed: `log -p` (and `-f`) print them
    escaped as every name, so a name's escape sequence never reaches the terminal (/tmp/s30r2c 6)."""
    evil = "plans/x\x1b[2Jy\rz.md"
    with CoherentVolume(root, agent="alice", isolation="read-set") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(evil, "a\n")
        alice.write(P, "p\n")
        alice.read(evil)
        alice.read(P)
        bob.read(evil)
        bob.write(evil, "b\n")
        with pytest.raises(StaleWriteError):
            alice.write(P, "mine\n")
    out = subprocess.run([CLI, "log", str(root), "-p"], capture_output=True, timeout=60).stdout  # (bytes: a CR kept)
    assert b"read-set" in out and b"plans/x\\x1b[2Jy\\x0dz.md" in out, out
    assert b"\x1b" not in out and b"\r" not in out, out


def test_restore_has_the_checks_of_a_write(root: Path) -> None:
    _three_versions(root)
    refused = cv("restore", root, P, "--version", "1", "--agent", "alice")  # alice read v2, current is v3
    assert refused.returncode == REFUSED and refused.stdout == ""
    assert "(stale)" in refused.stderr and "+step three :rocket:" in refused.stderr, refused.stderr
    as_json = cv("restore", root, P, "--version", "1", "--agent", "alice", "--json")
    assert as_json.returncode == REFUSED
    refusal = json.loads(as_json.stdout)["refusal"]
    assert (refusal["reason"], refusal["seen_version"], refusal["current_version"]) == ("stale", 2, 3)
    assert refusal["diff"].startswith("--- plans/p.md@v2\n+++ plans/p.md@v3\n")
    unread = cv("restore", root, P, "--version", "1", "--agent", "dave")
    assert unread.returncode == REFUSED and "(unread)" in unread.stderr
    assert (root / P).read_text().endswith("step three :rocket:\n")

    done = json.loads(ok("restore", root, P, "--version", "1", "--json", env={"COHERENT_AGENT": "bob"}))
    assert done == {"path": P, "restored": 1, "version": 4, "refusal": None}
    assert (root / P).read_text() == "intro\nstep one\nstep two\n"
    newest = json.loads(ok("history", root, P, "--json"))["versions"][0]
    assert (newest["kind"], newest["writer"], newest["parents"]) == ("restore", "bob", [1])
    assert ok("restore", root, P, "--version", "1", "--agent", "bob") == (
        "plans/p.md: v4 already holds the bytes of v1; nothing committed\n"
    )
    assert "restored v2 as v5" in ok("restore", root, P, "--version", "2", "--agent", "bob")

    with CoherentVolume(root, agent="bob") as bob:
        bob.delete(P)
    deletion = cv("restore", root, P, "--version", "6", "--agent", "bob")
    assert deletion.returncode == GONE and "is a deletion" in deletion.stderr
    nobody = cv("restore", root, P, "--version", "1", env={"COHERENT_AGENT": ""})
    assert nobody.returncode == 2 and "--agent" in nobody.stderr
    reserved = cv("restore", root, P, "--version", "1", "--agent", "external")
    assert reserved.returncode == 1 and "reserved" in reserved.stderr


def test_show_writes_every_byte_where_the_system_takes_fewer_per_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """One write(2) moves at most 2 GiB - 4 KiB: `show` of a 3 GiB version printed that much and
    exited 0 (found by a hostile probe). Here the system takes at most 7 bytes per write."""
    from coherent_volume import cli

    read_end, write_end = os.pipe()
    real_write = os.write
    try:
        with monkeypatch.context() as patched:
            patched.setattr(cli.os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
            cli.write_all(write_end, b"every byte of a version, in order")
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        assert f.read() == b"every byte of a version, in order"


def test_why_shows_what_changed_since_the_refused_agents_view(root: Path) -> None:
    _three_versions(root)
    human = ok("why", root, P)
    assert "agent carol (stale)" in human and "what changed from v1 (that agent's view) to the current v3:" in human
    assert "--- plans/p.md@v1\n+++ plans/p.md@v3\n" in human and "+step three :rocket:\n" in human
    data = json.loads(ok("why", root / P, "--json"))
    assert data["diff"].startswith("--- plans/p.md@v1\n+++ plans/p.md@v3\n") and data["diff_note"] is None

    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="erin") as erin:
        alice.write("plans/long.md", "".join(f"line {i}\n" for i in range(300)))
        erin.read("plans/long.md")
        alice.read("plans/long.md")
        alice.write("plans/long.md", "".join(f"line {i} changed\n" for i in range(300)))
        with pytest.raises(StaleWriteError):
            erin.write("plans/long.md", "x")
        alice.write("plans/unread.md", "z")
    with CoherentVolume(root, agent="frank") as frank, pytest.raises(StaleWriteError):
        frank.write("plans/unread.md", "y")
    cut = json.loads(ok("why", root, "plans/long.md", "--json"))["diff"].splitlines()
    assert len(cut) == 81 and cut[-1] == "... 523 more lines of the diff not shown"
    unread = json.loads(ok("why", root, "plans/unread.md", "--json"))
    assert unread["diff"] is None and "frank had not read the file" in unread["diff_note"]
    assert "frank had not read the file" in ok("why", root, "plans/unread.md")


def test_log_p_shows_each_versions_diff(root: Path) -> None:
    _three_versions(root)
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/b.bin", b"\x00binary")
    human = ok("log", root, "-p")
    assert "--- /dev/null\n+++ plans/p.md@v1\n" in human and "--- plans/p.md@v2\n+++ plans/p.md@v3\n" in human
    assert "(binary content: no line diff)" in human
    lines = [json.loads(line) for line in ok("log", root, "-p", "--json").splitlines()]
    commits = [e for e in lines if e["kind"] == "commit" and e["path"] == P]
    assert [e["diff"].splitlines()[1] for e in commits] == [f"+++ plans/p.md@v{n}" for n in (1, 2, 3)]
    refusal = next(e for e in lines if e["kind"] == "refusal")
    assert refusal["diff"] is None and refusal["diff_note"] is None
    assert "diff" not in json.loads(ok("log", root, "--json").splitlines()[0])
    with CoherentVolume(root, agent="alice") as alice:  # a diff of 2 MB, far more than a pipe holds
        alice.write("plans/big.md", "".join(f"line {i}\n" for i in range(200_000)))
    piped = subprocess.run(
        ["bash", "-c", f"{CLI} log {root} -p | head -n 1"], capture_output=True, text=True, timeout=60
    )
    assert piped.stdout.startswith("1 ") and piped.stderr == "", "a reader that leaves early is no error"


def test_a_name_holding_a_newline_or_an_escape_forges_no_line_of_output(root: Path) -> None:
    """Names are data: printed with their control characters escaped, a name holding a newline
    cannot print a line that passes for a commit, nor one holding ESC clear the terminal (found by a
    hostile probe: `log -p`, `why`, `diff` headers, the `history` title and the tables printed them
    raw). --json keeps the name as it is."""
    forged = "plans/x\n99  2026-11-30 17:00:00  commit  plans/a.md  alice  v7"
    clearing = "plans/\x1b[2Jy\u2028z"
    with CoherentVolume(root, agent="mallory") as v:
        v.write(forged, "one\n")
        v.write(forged, "two\n")
        v.write(clearing, "one\n")
    outputs = [
        ok("log", root, "-p"),
        ok("log", root),
        ok("status", root),
        ok("history", root, forged),
        ok("history", root, clearing),
        ok("diff", root, forged, "1", "2"),
        ok("why", root, forged),
    ]
    for out in outputs:
        assert "\x1b" not in out and not any(line.startswith("99 ") for line in out.splitlines()), out
        assert "\u2028" not in out and ("plans/x\\x0a99" in out or "plans/\\x1b[2Jy\\u2028z" in out), out
    assert {json.loads(line)["path"] for line in ok("log", root, "--json").splitlines()} == {forged, clearing}


def test_versions_whose_bytes_were_pruned_are_said_to_be(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        for text in ("one\n", "two\n", "three\n"):
            alice.write(P, text)
    ok("policy", root, "--keep-last", "1", "--keep-days", "0")
    assert "pruned 2 versions" in ok("prune", root)
    assert [v["retained"] for v in json.loads(ok("history", root, P, "--json"))["versions"]] == [True, False, False]
    assert "(pruned)" in ok("history", root, P) and "never kept" not in ok("history", root, P)
    gone = cv("show", root, P, "--version", "1")
    assert gone.returncode == GONE and "pruned" in gone.stderr
    assert cv("diff", root, P).returncode == GONE
    human = ok("log", root, "-p")
    assert "(no diff: 'plans/p.md' version 2: its content is not kept (pruned" in human
    assert "+three\n" not in human, "v3's diff needs v2, which is gone"
    assert ok("show", root, P, "--version", "3") == "three\n"


def test_status_shows_the_content_store_size(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/:rocket:.md", "x" * 1000)
        alice.write("plans/same.md", "x" * 1000)  # the same content is stored once
        alice.write("plans/other.md", "y" * 24)
    data = json.loads(ok("status", root, "--json"))
    assert data["store"] == {"objects": 2, "bytes": 1024}
    human = ok("status", root)
    assert "content store: 2 objects, 1.0 KiB" in human
    assert "plans/:rocket:.md" in human, "a path prints as it is (no emoji codes)"


def test_a_path_with_no_version_is_said_to_have_none(root: Path) -> None:
    """history and diff of a managed path no version was ever recorded for (a typo) say so and exit
    4, as for a version that never existed (the API's history is empty, as documented); why says it
    never existed, not that it is deleted."""
    _three_versions(root)
    with CoherentVolume(root, agent="bob") as bob:
        assert bob.history("plans/typo.md") == []
    for args in (
        ("history", root, "plans/typo.md"),
        ("history", root, "plans/typo.md", "--json"),
        ("diff", root, "plans/typo.md"),
        ("diff", root, "plans/typo.md", "0"),
        ("diff", root, "plans/typo.md", "--agent", "bob"),
    ):
        r = cv(*args)
        printed = json.loads(r.stdout)["error"]["message"] if "--json" in args else r.stdout
        assert r.returncode == GONE and printed in ("", r.stderr.removeprefix("Error: ").rstrip("\n")), (args, r.stdout)
        assert "'plans/typo.md' has no versions: no file of that name was ever recorded" in r.stderr, r.stderr
    why = ok("why", root, "plans/typo.md")
    assert why.startswith("plans/typo.md: managed, never existed: no version of it was ever recorded\n"), why
    assert "deleted" not in why
    assert ok("why", root, "notes.txt").startswith("notes.txt: not managed: it has no versions\n")
    with CoherentVolume(root, agent="bob") as bob:  # bob wrote v3: a deletion keeps the versions
        bob.delete(P)
    assert ok("why", root, P).startswith(f"{P}: managed, current v4 (deleted), last written by bob")
    assert [v["version"] for v in json.loads(ok("history", root, P, "--json"))["versions"]] == [4, 3, 2, 1]
    assert ok("diff", root, P).startswith(f"--- {P}@v3\n+++ /dev/null\n")


def test_the_history_commands_inside_a_mount(mounted: Mount) -> None:
    m = mounted.path
    assert mounted.run("alice", f"printf 'one\\n' > {P}").returncode == 0  # v1: created empty, v2: one
    assert mounted.run("bob", f"cat {P} >/dev/null").returncode == 0
    assert mounted.run("alice", f"cat {P} >/dev/null && printf 'one\\ntwo\\n' > {P}").returncode == 0  # v3
    assert mounted.run("bob", f"printf 'mine\\n' > {P}").returncode != 0

    why = ok("why", m / P)  # a path inside the mount
    assert "agent bob (stale)" in why and "--- plans/p.md@v2\n+++ plans/p.md@v3\n" in why and "+two\n" in why
    assert json.loads(ok("why", m / P, "--json"))["diff"].endswith(" one\n+two\n")
    assert [v["version"] for v in json.loads(ok("history", m / P, "--json"))["versions"]] == [3, 2, 1]
    assert [v["version"] for v in json.loads(ok("history", m, P, "--json"))["versions"]] == [3, 2, 1]  # mount as ROOT
    assert ok("show", m / P, "--version", "2") == "one\n"
    assert ok("diff", P, "2", cwd=m).startswith("--- plans/p.md@v2\n+++ plans/p.md@v3\n")  # relative, in the mount

    refused = cv("restore", m / P, "--version", "2", env={"COHERENT_AGENT": "bob"})
    assert refused.returncode == REFUSED and "+two" in refused.stderr
    assert mounted.run("bob", f"cat {P} >/dev/null").returncode == 0
    assert "restored v2 as v4" in ok("restore", m / P, "--version", "2", env={"COHERENT_AGENT": "bob"})
    assert mounted.run("carol", f"cat {P}").stdout == "one\n"
    assert "+two\n" in ok("log", m, "-p")

    inside = cv("status", m / "plans", "--json")  # a directory inside the mount: its volume's status
    backing = os.path.realpath(mounted.root)
    assert inside.returncode == 0 and json.loads(inside.stdout)["root"] == backing
    assert f"{m / 'plans'} is a directory inside the volume at {backing}, not its root" in inside.stderr


def test_a_deletion_is_listed_as_holding_no_bytes(root: Path) -> None:
    """A deletion has no bytes: `history` (JSON, text) and the API say it retains none, as `show`
    finds; a deletion outside the volume too."""
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, "one\n")
        alice.delete(P)
        alice.write("plans/q.md", "q\n")
    (root / "plans/q.md").unlink()  # deleted outside the volume: recorded by `external` at the next look
    listed = json.loads(ok("history", root, P, "--json"))["versions"]
    assert [(v["version"], v["kind"], v["hash"], v["retained"]) for v in listed] == [
        (2, "delete", None, False),
        (1, "commit", content_hash(b"one\n"), True),
    ]
    outside = json.loads(ok("history", root, "plans/q.md", "--json"))["versions"]
    assert [(v["kind"], v["writer"], v["retained"]) for v in outside] == [
        ("delete", "external", False),
        ("commit", "alice", True),
    ]
    with CoherentVolume(root, agent="bob") as bob:
        assert [(v.kind, v.retained) for v in bob.history(P)] == [("delete", False), ("commit", True)]
    gone = cv("show", root, P, "--version", "2")
    assert gone.returncode == GONE and "is a deletion" in gone.stderr
    human = ok("history", root, P)
    deletion = next(line for line in human.splitlines() if line.strip().startswith("2 "))
    assert "delete" in deletion and "pruned" not in deletion


def test_log_names_each_version_by_its_kind_as_history_does(root: Path) -> None:
    """`log` and `why` name a version by the kind `history` gives it (a merge, a restore), with
    its parents."""
    with (
        CoherentVolume(root, agent="alice") as alice,
        CoherentVolume(root, agent="bob") as bob,
        CoherentVolume(root, agent="carol") as carol,
    ):
        alice.write(P, "a\nb\nc\n")  # v1
        bob.read(P)
        carol.read(P)
        alice.write(P, "a\nb by alice\nc\n")  # v2
        bob.write(P, "a\nb\nc\nd by bob\n", merge=True)  # v3: a merge of v1 and v2
        alice.read(P)
        alice.restore(P, 1)  # v4
        alice.delete(P)  # v5
        with pytest.raises(StaleWriteError):
            carol.write(P, "carol's\n")
    kinds = {1: ("commit", []), 2: ("commit", []), 3: ("merge", [1, 2]), 4: ("restore", [1]), 5: ("delete", [])}
    history = json.loads(ok("history", root, P, "--json"))["versions"]
    assert {v["version"]: (v["kind"], v["parents"]) for v in history} == kinds
    for args in ((), ("-p",)):
        lines = [json.loads(line) for line in ok("log", root, "--json", *args).splitlines()]
        made = {e["version"]: (e["kind"], e["parents"]) for e in lines if e["path"] == P and e["kind"] != "refusal"}
        assert made == kinds
        assert all(e["parents"] == [] for e in lines if e["kind"] == "refusal")
    human = ok("log", root)
    assert "merge of v1 and v2" in human and "restore of v1" in human
    merge_row = next(line for line in human.splitlines() if "merge of v1 and v2" in line)
    assert " merge " in merge_row and " commit " not in merge_row
    why = json.loads(ok("why", root, P, "--json"))
    assert [(c["version"], c["kind"], c["parents"]) for c in why["changes"]] == [(v, *kinds[v]) for v in (2, 3, 4, 5)]
    assert "merge of v1 and v2" in ok("why", root, P)


def test_why_shows_the_hunks_of_a_merge_that_conflicted_through_the_mount(tmp_path: Path) -> None:
    """A stale save over a merge-glob file whose changes overlap is refused (EACCES) through the
    mount; `why` then shows the conflicting hunks, as MergeConflict carries them in the API."""
    root = tmp_path / "vol"
    ok("init", root, "-m", "plans/**", "--merge", "plans/log.md")
    (root / "plans").mkdir()
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/log.md", "one\ntwo\nthree\n")  # v1
    with Mount(root, tmp_path / "mnt") as m:
        log = m.path / "plans/log.md"
        assert m.run("a", "cat plans/log.md >/dev/null").returncode == 0  # a's view: v1
        saved = m.run("b", "cat plans/log.md >/dev/null && printf 'one\\nTWO by b\\nthree\\n' > t && mv t plans/log.md")
        assert saved.returncode == 0, saved.stderr  # v2
        clash = m.run("a", "printf 'one\\nTWO by a\\nthree\\n' > t2 && mv t2 plans/log.md")
        assert clash.returncode != 0 and "Permission denied" in clash.stderr
        assert log.read_text() == "one\nTWO by b\nthree\n"
        human = ok("why", log)
        data = json.loads(ok("why", log, "--json"))
    hunk = "@@ base line 2 @@\n<<<<<<< yours\nTWO by a\n||||||| base\ntwo\n=======\nTWO by b\n>>>>>>> current\n"
    assert "agent a (stale)" in human and "the write was to be merged, and its changes overlapped:" in human
    assert "1 conflicting hunk between the change of a (yours) and v2 (current), both made from v1" in human
    assert hunk in human
    assert data["refusal"]["agent"] == "a" and data["conflict"].endswith(hunk)
    [logged] = [json.loads(line) for line in ok("log", root, "--json").splitlines() if '"conflict"' in line]
    assert (logged["kind"], logged["agent"], logged["seen_version"], logged["version"]) == ("conflict", "a", 1, 2)


def test_why_cuts_the_hunks_of_a_conflict_and_shows_none_for_a_later_plain_refusal(root: Path) -> None:
    with CoherentVolume(root, agent="alice") as alice, CoherentVolume(root, agent="bob") as bob:
        alice.write(P, "".join(f"line {i}\n" for i in range(300)))
        bob.read(P)
        alice.write(P, "".join(f"line {i} by alice\n" for i in range(300)))
        with pytest.raises(MergeConflict):
            bob.write(P, "".join(f"line {i} by bob\n" for i in range(300)), merge=True)
        conflict = json.loads(ok("why", root, P, "--json"))["conflict"].splitlines()
        assert (
            conflict[0]
            == "1 conflicting hunk between the change of bob (yours) and v2 (current), both made from v1: nothing was merged"
        )
        assert len(conflict) == 82 and conflict[-1] == "... 825 more lines of the diff not shown"
        assert conflict[1:4] == ["@@ base line 1 @@", "<<<<<<< yours", "line 0 by bob"]
        with pytest.raises(StaleWriteError):
            bob.write(P, "bob, without merging\n")  # the last refusal now: no merge was asked for
    assert json.loads(ok("why", root, P, "--json"))["conflict"] is None
    assert "overlapped" not in ok("why", root, P)


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under `root`: its mode, mtime and (for a file) bytes."""
    return {
        str(p.relative_to(root)): (p.lstat().st_mode, p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else b"")
        for p in root.rglob("*")
    }


def test_a_merge_glob_that_no_managed_path_can_match_is_refused(tmp_path: Path) -> None:
    """`init --merge` (and `policy --merge`, and the API) refuse a merge glob that can never apply,
    naming it: nothing is written."""
    fresh = tmp_path / "new" / "vol"
    refused = cv("init", fresh, "-m", "plans/**", "--merge", "notes/*.md")
    assert refused.returncode == 1 and refused.stdout == ""
    assert "merge glob 'notes/*.md' can match no managed path (the volume manages 'plans/**')" in refused.stderr
    assert not (tmp_path / "new").exists()

    root = tmp_path / "vol"
    ok("init", root, "-m", "plans/**", "--merge", "plans/log.md")
    (root / "plans").mkdir()
    with CoherentVolume(root, agent="alice") as alice:
        alice.write("plans/log.md", "one\n")
    before = _tree(root)
    again = cv("init", root, "-m", "plans/**", "--merge", "plans/log.md", "--merge", "*.md", "--keep-last", "3")
    assert again.returncode == 1 and "merge glob '*.md' can match no managed path" in again.stderr
    assert _tree(root) == before, "a refused init writes nothing, not even into an existing volume"

    policy = cv("policy", root, "--merge", "x/*", "--merge", "plans", "--keep-days", "1")
    assert policy.returncode == 1 and "merge globs 'x/*', 'plans' can match no managed path" in policy.stderr
    with CoherentVolume(root, agent="alice") as alice:
        with pytest.raises(GlobError, match="'notes/\\*\\.md' can match no managed path"):
            alice.set_policy(Policy(merge=("plans/**", "notes/*.md")))
        assert alice.policy == Policy(merge=("plans/log.md",)), "nothing stored: neither merge globs nor retention"
    assert {rel: entry for rel, entry in _tree(root).items() if not rel.startswith(".coherent")} == {
        rel: entry for rel, entry in before.items() if not rel.startswith(".coherent")
    }
    assert "merge: **/*.md;" in ok("policy", root, "--merge", "**/*.md")  # may match managed paths: accepted


def test_history_shows_the_newest_versions_and_says_how_to_see_the_others(root: Path) -> None:
    """A table of thousands of versions takes seconds and is read by nobody: `history` shows the
    newest HISTORY_SHOWN and says how many more there are; --all shows them, --json lists all."""
    with CoherentVolume(root, agent="alice") as alice:
        for i in range(1, HISTORY_SHOWN + 6):
            alice.write(P, f"v{i}\n")

    def rows(text: str) -> list[int]:
        return [int(line.split()[0]) for line in text.splitlines() if "│" in line and line.split()[0].isdigit()]

    text = ok("history", root, P)
    assert rows(text) == list(range(HISTORY_SHOWN + 5, 5, -1)), text
    assert text.endswith("5 older versions not shown (v5 to v1): --all lists every version, --limit N the newest N\n")
    every = ok("history", root, P, "--all")
    assert rows(every) == list(range(HISTORY_SHOWN + 5, 0, -1)) and "not shown" not in every
    assert len(json.loads(ok("history", root, P, "--json"))["versions"]) == HISTORY_SHOWN + 5
    assert f"{HISTORY_SHOWN + 2} older versions not shown" in ok("history", root, P, "--limit", "3")
    both = cv("history", root, P, "--all", "--limit", "3")
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_contradictory_policy_options_are_refused_and_change_nothing(root: Path) -> None:
    ok("policy", root, "--merge", "plans/log.md")
    r = cv("policy", root, "--merge", "plans/other.md", "--no-merge", "--keep-last", "3")
    assert r.returncode == 2 and "--merge" in r.stderr and "--no-merge" in r.stderr
    assert json.loads(ok("policy", root, "--json"))["merge"] == ["plans/log.md"]
    assert json.loads(ok("policy", root, "--json"))["retention"]["keep_last"] == 10


def test_the_versions_of_a_name_a_program_replaced_by_a_link_out_of_the_volume_are_still_read(
    root: Path, tmp_path: Path
) -> None:
    """A program replaced plans/p.md by a symlink to a file outside the root (or to an unmanaged
    file): `history`, `show` and `diff` of the name failed, naming the link's target as outside the
    volume (/tmp/s32api 4), though the registry keeps the name's versions by name. Writes through
    the link are still refused."""
    outside = tmp_path / "outside.txt"
    outside.write_text("not the volume's\n")
    (root / "notes").mkdir()
    (root / "notes" / "n.txt").write_text("unmanaged\n")
    with CoherentVolume(root, agent="alice") as alice:
        alice.write(P, "one\n")
        alice.write(P, "two\n")
        alice.write("plans/q.md", "q one\n")
    os.unlink(root / P)
    os.symlink(outside, root / P)
    os.unlink(root / "plans/q.md")
    os.symlink("../notes/n.txt", root / "plans/q.md")
    for name, first in ((P, "one\n"), ("plans/q.md", "q one\n")):
        assert [v["version"] for v in json.loads(ok("history", root, name, "--json"))["versions"]][-1] == 1
        assert ok("show", root, name, "--version", "1") == first
        with CoherentVolume(root, agent="bob") as bob:
            assert bob.read_version(name, 1) == first.encode()
            assert [v.version for v in bob.history(name)][-1] == 1
    assert "-one\n+two" in ok("diff", root, P, "1", "2")
    with CoherentVolume(root, agent="alice") as alice, pytest.raises(CoherenceError):
        alice.write(P, "through the link\n")
    assert outside.read_text() == "not the volume's\n"
