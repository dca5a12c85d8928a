"""Unmodified programs writing a managed file through the mount: refused when stale, applied when fresh.

STALE: another agent committed after this agent last read the file. Programs that read the file
themselves (sed, perl, vim, a Claude-style Node writer) get that commit between their own read
and their write, through a ready/go handshake on marker files outside the mount.
FRESH: nothing happened since the read; the write lands and the version moves on.
Unmanaged files behave exactly as in a plain directory. How each program reaches FUSE: the table
in docs/mount.md, "Where a stale write is refused".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume

from .harness.mounts import Mount

P = "plans/plan.md"
ORIGINAL = "the plan\n"
NEW = "new text\n"
BOB = "bob rewrote the plan\n"  # another size than ORIGINAL, so git must notice without reading
DRAFT = "notes/draft.txt"  # unmanaged source for cp and mv

# Claude Code's Write/Edit as the file system sees it: lstat, read, (handshake), O_EXCL temp beside
# the target, write, fchmod, fsync, rename over the target, read back. A temp create refused with
# EACCES, or a rename failing with EXDEV/EPERM/EEXIST/EBUSY, falls back to writing in place; a
# rename refused with EACCES has no fallback.
CLAUDE_WRITER = r"""
const fs = require("fs"), crypto = require("crypto"), C = fs.constants;
const [target, ready, go] = process.argv.slice(2);
fs.lstatSync(target);
const content = "edited: " + fs.readFileSync(target, "utf8");
fs.writeFileSync(ready, "");
const cell = new Int32Array(new SharedArrayBuffer(4));
while (!fs.existsSync(go)) Atomics.wait(cell, 0, 0, 20);

function inPlace() {
  const fd = fs.openSync(target, C.O_RDWR | C.O_CREAT, 0o644);
  try { fs.ftruncateSync(fd, 0); fs.writeSync(fd, content); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
}
function atomicWrite() {
  const tmp = `${target}.tmp.${process.pid}.${crypto.randomBytes(6).toString("hex")}`;
  let fd;
  try { fd = fs.openSync(tmp, C.O_WRONLY | C.O_CREAT | C.O_EXCL | C.O_NOFOLLOW, 0o644); }
  catch (e) { if (e.code === "EACCES") return inPlace(); throw e; }
  try { fs.writeSync(fd, content); fs.fchmodSync(fd, 0o644); fs.fsyncSync(fd); } finally { fs.closeSync(fd); }
  try { fs.renameSync(tmp, target); }
  catch (e) {
    fs.rmSync(tmp, { force: true });
    if (["EXDEV", "EPERM", "EEXIST", "EBUSY"].includes(e.code)) return inPlace();
    throw e;
  }
}
atomicWrite();
if (fs.readFileSync(target, "utf8") !== content) { console.error("read back differs"); process.exit(3); }
"""


@dataclass(frozen=True)
class Program:
    """A bash script writing `{f}`; placeholders: f, src, hook, ready, go, writer, vimlog, python."""

    script: str
    result: Callable[[str], str | None]
    """The file's content after a successful run, from its content before (None: removed)."""
    commits: int = 1
    """Versions a fresh run adds to a managed target (one per committed FUSE operation)."""
    denied: str = "Permission denied"
    stdin: str = ""


# Programs that write without reading the target first.
BLIND = {
    "bash >": Program("echo new text > {f}", lambda old: NEW),
    "python open(w)": Program(
        "{python} -c \"open('{f}', 'w').write('new text\\n')\"", lambda old: NEW, denied="PermissionError"
    ),
    "cp": Program("cp {src} {f}", lambda old: NEW),
    "truncate -s": Program("truncate -s 4 {f}", lambda old: old[:4]),
    "rm": Program("rm {f}", lambda old: None),
    "mv over": Program("mv {src} {f}", lambda old: NEW),
    # rsync reads the target as the basis of its delta, never as content it builds on (-I: even
    # where size and time match, as here)
    "rsync --no-whole-file": Program("rsync -I --no-whole-file {src} {f}", lambda old: NEW),
    "rsync --no-whole-file --inplace": Program("rsync -I --no-whole-file --inplace {src} {f}", lambda old: NEW),
}

VIM = (
    ": > {{vimlog}}; vim -es -V1{{vimlog}} -u NONE -N -i NONE -c 'set backupcopy={mode} backupskip=' "
    "-c \"call writefile([], '{{ready}}')\" -c \"while !filereadable('{{go}}') | sleep 20m | endwhile\" "
    "-c '%s/^/edited: /' -c w -c 'qa!' {{f}}; status=$?; cat {{vimlog}} >&2; exit $status"
)

# Programs that read the target themselves, then signal {ready} and wait for {go} before writing.
# vim: -es prints no messages, so they go to {vimlog} and then to stderr; `backupskip=` because the
# default skips backups under /tmp (pytest's tmp_path), which would make backupcopy meaningless; the
# "y" answers vim's own "file changed since reading it, really write?" so that any refusal is the mount's.
READING = {
    "sed -i": Program("sed -i -e '1e sh {hook}' -e 's/^/edited: /' {f}", lambda old: "edited: " + old),
    "perl -pi": Program(
        'perl -pi -e \'system("sh", "{hook}") if $. == 1; s/^/edited: /\' {f}', lambda old: "edited: " + old
    ),
    "vim backupcopy=yes": Program(VIM.format(mode="yes"), lambda old: "edited: " + old, denied="E212", stdin="y\n"),
    # rename f -> f~ (f deleted), create f, write: three commits of f
    "vim backupcopy=no": Program(
        VIM.format(mode="no"), lambda old: "edited: " + old, commits=3, denied="E212", stdin="y\n"
    ),
    "node Claude-style write": Program(
        "node {writer} {f} {ready} {go}", lambda old: "edited: " + old, denied="EACCES: permission denied, rename"
    ),
}

GIT = "git -c safe.directory=* -c user.name=t -c user.email=t@example.invalid"
# unlink, create O_EXCL, write: three commits of the plan
GIT_RESTORES = {
    name: Program(f"{GIT} {command} {{f}}", lambda old: ORIGINAL, commits=3, denied="unable to unlink")
    for name, command in (("git checkout --", "checkout --"), ("git restore", "restore"))
}

APPEND = Program("echo more >> {f}", lambda old: old + "more\n")


def agent_env(agent: str) -> dict[str, str]:
    return {**os.environ, "COHERENT_AGENT": agent}


def version(m: Mount, rel: str = P) -> int:
    with CoherentVolume(m.root, agent="observer") as v:
        return v.version(rel)


def backing(root: Path, rel: str = P) -> str | None:
    path = root / rel
    return path.read_text() if path.exists() else None


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, r.stderr
    return r


class Handshake:
    """Marker files outside the mount: the program creates `ready` after its read, then waits for `go`."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(exist_ok=True)
        self.ready, self.go_marker, self.hook = directory / "ready", directory / "go", directory / "hook.sh"
        self.hook.write_text(f"touch '{self.ready}'\nwhile [ ! -e '{self.go_marker}' ]; do sleep 0.02; done\n")
        writer = directory / "claude_writer.js"
        writer.write_text(CLAUDE_WRITER)
        self.fields = {
            "hook": self.hook,
            "ready": self.ready,
            "go": self.go_marker,
            "writer": writer,
            "vimlog": directory / "vim.log",
            "python": sys.executable,
            "src": DRAFT,
        }

    def wait_ready(self, proc: subprocess.Popen[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.exists():
            if proc.poll() is not None:
                pytest.fail(f"program ended before its handshake: {proc.communicate()}")
            assert time.monotonic() < deadline, "program never signalled that it had read the file"
            time.sleep(0.01)

    def go(self) -> None:
        self.go_marker.touch()

    def script(self, program: Program, f: str) -> str:
        return program.script.format(f=f, **self.fields)


@contextmanager
def running(cwd: Path, agent: str, script: str) -> Iterator[subprocess.Popen[str]]:
    """A bash script in the background, in its own process group, killed with it in every outcome."""
    proc = subprocess.Popen(
        ["bash", "-c", script],
        cwd=cwd,
        env=agent_env(agent),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


@contextmanager
def held_open(cwd: Path, agent: str, rel: str) -> Iterator[None]:
    """`agent` holds `rel` open for appending (a write handle) until the block ends."""
    with running(cwd, agent, f"exec 3>>{rel}; echo held; sleep 60") as holder:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held", "holder did not open"
        yield


def seed(m: Mount) -> int:
    """alice creates and reads the plan (and an unmanaged draft); returns the plan's version."""
    ok(m.run("alice", f"mkdir -p notes && printf 'new text\\n' > {DRAFT} && printf '{ORIGINAL}' > {P} && cat {P}"))
    return version(m)


def bob_commits(m: Mount) -> int:
    ok(m.run("bob", f"cat {P} >/dev/null && printf '{BOB}' > {P}"))
    return version(m)


def assert_refused(r: subprocess.CompletedProcess[str], program: Program, m: Mount, committed: int) -> None:
    assert r.returncode != 0, f"a stale write succeeded: {r.stdout}{r.stderr}"
    assert program.denied in r.stderr + r.stdout, r.stderr + r.stdout
    assert backing(m.root) == BOB, "the other agent's commit was overwritten"
    assert version(m) == committed


def assert_applied(r: subprocess.CompletedProcess[str], program: Program, m: Mount, before: int) -> None:
    assert r.returncode == 0, r.stderr + r.stdout
    assert backing(m.root) == program.result(ORIGINAL)
    assert version(m) == before + program.commits


# ---- programs that do not read the target ---------------------------------------------------------


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "fresh"])
@pytest.mark.parametrize("name", BLIND)
def test_blind_writer(mounted: Mount, tmp_path: Path, name: str, stale: bool) -> None:
    program, hs = BLIND[name], Handshake(tmp_path / "hs")
    before = seed(mounted)
    committed = bob_commits(mounted) if stale else before
    r = mounted.run("alice", hs.script(program, P))
    if stale:
        assert_refused(r, program, mounted, committed)
        assert backing(mounted.root, DRAFT) == NEW, "a refused mv keeps its source"
    else:
        assert_applied(r, program, mounted, before)


@pytest.mark.parametrize("stale", [True, False], ids=["another-agent-holds-it-open", "fresh"])
def test_append(mounted: Mount, stale: bool) -> None:
    """>> needs no prior read (dave never read the plan), but takes the per-file write grant."""
    before = seed(mounted)
    script = APPEND.script.format(f=P)
    if stale:
        with held_open(mounted.path, "carol", P):
            r = mounted.run("dave", script)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
        assert backing(mounted.root) == ORIGINAL
        assert version(mounted) == before
    else:
        assert_applied(mounted.run("dave", script), APPEND, mounted, before)


def test_a_write_over_a_peers_deletion_is_refused_saying_how_to_take_the_deletion_in(mounted: Mount) -> None:
    """alice read the plan, bob deleted it. Writing it anew from alice's view would bring back what
    bob deleted: refused `stale`, an exclusive create too (cp and Python's open(..., 'x') make every
    new file so), saying that the current version is the deletion and how to take it in (it said
    "re-read the file", which no read of a missing file could follow); after a listing, it goes ahead."""
    before = seed(mounted)
    ok(mounted.run("bob", f"cat {P} >/dev/null && rm {P}"))
    for write in (f"echo from my old view > {P}", f"cp {DRAFT} {P}", f"set -C; echo from my old view > {P}"):
        refused = mounted.run("alice", write)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, (write, refused.stderr)
    assert not (mounted.root / P).exists() and version(mounted) == before + 1
    told = ok(mounted.run("alice", f"{Path(sys.executable).parent}/coherent-volume why {P}")).stdout
    assert "look at its directory again to take in the deletion" in told and "re-read the file" not in told, told
    ok(mounted.run("alice", f"ls plans >/dev/null && {sys.executable} -c \"open('{P}', 'x').write('made anew\\n')\""))
    assert backing(mounted.root) == "made anew\n" and version(mounted) == before + 3  # created, then written


# ---- programs that read the target themselves -------------------------------------------------------


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "fresh"])
@pytest.mark.parametrize("name", READING)
def test_reading_writer(mounted: Mount, tmp_path: Path, name: str, stale: bool) -> None:
    program, hs = READING[name], Handshake(tmp_path / "hs")
    before = seed(mounted)
    with running(mounted.path, "alice", hs.script(program, P)) as proc:
        hs.wait_ready(proc)
        committed = bob_commits(mounted) if stale else before
        hs.go()
        out, err = proc.communicate(program.stdin, timeout=60)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if stale:
        assert_refused(r, program, mounted, committed)
    else:
        assert_applied(r, program, mounted, before)


# ---- git, in a repository at the mount root (.git is unmanaged, the plan is tracked) ---------------


@pytest.mark.parametrize("stale", [True, False], ids=["stale", "fresh"])
@pytest.mark.parametrize("name", GIT_RESTORES)
def test_git_restores_a_tracked_plan(mounted: Mount, name: str, stale: bool) -> None:
    """git stats the file (a size change needs no read), then unlinks it and creates it O_EXCL."""
    seed(mounted)
    ok(mounted.run("alice", f"{GIT} init -q . && {GIT} add {P} && {GIT} commit -qm plan"))
    if stale:
        committed = bob_commits(mounted)
    else:
        ok(mounted.run("alice", f"cat {P} >/dev/null && printf 'alice drafted something longer\\n' > {P}"))
    before, program = version(mounted), GIT_RESTORES[name]
    r = mounted.run("alice", program.script.format(f=P))
    if stale:
        assert_refused(r, program, mounted, committed)
    else:
        assert_applied(r, program, mounted, before)
        assert ok(mounted.run("alice", f"{GIT} status --porcelain {P}")).stdout == ""


# ---- unmanaged files: exactly as in a plain directory ----------------------------------------------

HELD = "bash >> while another agent holds it open"
UNMANAGED = {
    **BLIND,
    HELD: APPEND,
    **READING,
    "git checkout --": Program(
        f"{GIT} init -q . && {GIT} add {{f}} && {GIT} commit -qm x && "
        f"echo local change > {{f}} && {GIT} checkout -- {{f}}",
        lambda old: old,
    ),
}


def outcome(
    cwd: Path, root: Path, run: Callable[[str, str], subprocess.CompletedProcess[str]], script: str, hold: bool
) -> tuple[str | None, list[str]]:
    """alice creates notes/x.txt; bob, who never read it, runs `script` (while carol holds it open, if `hold`).
    It must succeed; returns (content, names in notes/) as found in the backing directory `root`."""
    assert (
        run(
            "alice", f"mkdir -p notes && printf 'new text\\n' > {DRAFT} && printf '{ORIGINAL}' > notes/x.txt"
        ).returncode
        == 0
    )
    with held_open(cwd, "carol", "notes/x.txt") if hold else nullcontext():
        r = run("bob", script)
    assert r.returncode == 0, r.stderr + r.stdout
    return backing(root, "notes/x.txt"), sorted(os.listdir(root / "notes"))


@pytest.mark.parametrize("name", UNMANAGED)
def test_unmanaged_file_behaves_as_in_a_plain_directory(mounted: Mount, tmp_path: Path, name: str) -> None:
    program, hs = UNMANAGED[name], Handshake(tmp_path / "hs")
    hs.go()  # no pause: nobody interferes here
    script = hs.script(program, "notes/x.txt")
    plain = tmp_path / "plain"
    plain.mkdir()

    def run_plain(agent: str, s: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", s],
            cwd=plain,
            env=agent_env(agent),
            capture_output=True,
            text=True,
            input=program.stdin,
            timeout=60,
        )

    def run_mounted(agent: str, s: str) -> subprocess.CompletedProcess[str]:
        return mounted.run(agent, s, input=program.stdin)

    expected = outcome(plain, plain, run_plain, script, name == HELD)
    assert expected[0] == program.result(ORIGINAL)
    assert outcome(mounted.path, mounted.root, run_mounted, script, name == HELD) == expected
