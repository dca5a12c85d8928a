"""Real FUSE mounts for the tests, the torture harness, the benchmarks and the demo: mounted through
the real CLI, always unmounted, no daemon left behind.

This is the one place outside the product that unmounts (`unmount_and_reap`) and that asks which
FUSE mounts exist (`is_mounted`, `fuse_mounts_under`). Both read the kernel's table through
`coherent_volume.mounts.fuse_mounts`, the tree's one parser of /proc/self/mounts. (The history
checker still shares no code with the product; this module only sets up and tears down.)

Every `Mount` is tracked, so `unmount_all` (run at exit, and by the torture run in every outcome)
cleans up whatever a failing scenario left.

Every `Mount` also checks its daemon's log, `ROOT/.coherent/mount.log`: what the daemon wrote there
since the `Mount` was made must hold no internal error (see `log_problems`), so no bug hides behind
the EIO a caller saw. `unmount` raises `DaemonLogError` naming the offending lines; the tests also
check every mount still up at the end of each test (`daemon_log_problems`, from tests/conftest.py).
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from coherent_volume.errors import CoherenceError
from coherent_volume.mounts import fuse_mounts
from fusefs import direct

from . import CLI

__all__ = [
    "CLI",
    "DEAD_ERRNOS",
    "DaemonLogError",
    "Mount",
    "Unmounted",
    "daemon_log_problems",
    "daemon_pids",
    "dead_errno",
    "fuse_mounts_under",
    "is_mounted",
    "log_problems",
    "serving_pids",
    "unmount_all",
    "unmount_and_reap",
    "watcher_pids",
]

DEAD_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)
"""What a mount whose daemon died answers with."""

_ACTIVE: set[Mount] = set()

_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ", re.M)
"""The first line of a record of the daemon's logging (`%(asctime)s %(levelname)s %(message)s`)."""

_BUG_MARKS = ("internal error", "Traceback (most recent call last)", "Exception in thread", "Exception ignored in")
"""Text that only a bug writes: `operations.guarded`'s line for an unexpected exception, and what
Python prints for an exception nothing caught (in the daemon, a thread or the watcher process,
whose stderr is the log too)."""

_EXPECTED = (r" ERROR fuse_\w+\(\): fuse_reply_\* failed with No such file or directory$",)
"""ERROR records that are documented conditions: pyfuse3's note that the kernel no longer awaited a
reply. The kernel ends every request still being answered when the mount goes away, so a request
answered while it is unmounted (a RELEASE of a file whose process closed it just before) finds no
one waiting; the daemon did its work all the same."""


class DaemonLogError(AssertionError):
    """A mount's daemon logged an internal error: a bug the caller saw at most as an EIO."""


def log_problems(text: str, allowed: Sequence[str] = ()) -> list[str]:
    """The records of a stretch of `mount.log` that show a bug: an ERROR or CRITICAL record, or one
    holding a traceback or `internal error` (a record is its first line and the lines up to the
    next record, so a traceback belongs to the record that logged it; text before the first record
    is one record). Refusals (INFO) and documented conditions (WARNING: a caller outside the PID
    namespace, a commit refused at close, a restarted watcher; `_EXPECTED`) are no problem. A record whose first
    line matches one of the `allowed` regular expressions is no problem either: for a test that
    provokes a daemon failure on purpose, each pattern naming the one failure it expects."""
    starts = [m.start() for m in _RECORD_START.finditer(text)]
    bounds = ([0] if not starts or starts[0] > 0 else []) + starts + [len(text)]
    problems = []
    for begin, end in itertools.pairwise(bounds):
        record = text[begin:end].rstrip("\n")
        first = record.split("\n", 1)[0]
        level = _RECORD_START.match(record)
        bad = (level is not None and level.group(1) in ("ERROR", "CRITICAL")) or any(m in record for m in _BUG_MARKS)
        if bad and not any(re.search(pattern, first) for pattern in (*_EXPECTED, *allowed)):
            problems.append(record)
    return problems


def daemon_log_problems() -> list[str]:
    """What every tracked mount's daemon logged that shows a bug since it was last checked
    (`Mount.log_problems`), each naming its mountpoint."""
    return [problem for m in list(_ACTIVE) for problem in m.log_problems()]


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """Whether a FUSE file system (ours, bindfs, floorfs; serving or with a dead daemon) is mounted
    at `mountpoint`."""
    return os.fspath(mountpoint) in fuse_mounts(None)


def fuse_mounts_under(base: str | os.PathLike[str]) -> list[str]:
    """Every FUSE mountpoint at or below `base`: what a run must not leave behind."""
    top = os.fspath(base).rstrip("/")
    return sorted(m for m in fuse_mounts(None) if m == top or m.startswith(top + "/"))


def serving_pids(mountpoint: str | os.PathLike[str], marker: bytes | None = None) -> list[int]:
    """Live processes with `mountpoint` (and `marker`, when given) among their arguments."""
    pids = []
    needle = os.fsencode(os.fspath(mountpoint))
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv and (marker is None or marker in argv):
            pids.append(int(entry))
    return pids


def daemon_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Live processes serving `mountpoint` (the forked `coherent-volume mount` daemon)."""
    return serving_pids(mountpoint, b"mount")


def watcher_pids(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Live watcher processes (`fusefs.watch_process`) of the daemon serving `mountpoint`."""
    return serving_pids(mountpoint, b"fusefs.watch_process")


@dataclass
class Unmounted:
    """What `unmount_and_reap` had to do beyond a plain unmount."""

    lazy: bool = False
    """The mount stayed busy: it was detached with `fusermount3 -u -z`."""
    killed: list[int] = field(default_factory=list)
    """Processes still serving the mountpoint after the wait, killed with SIGKILL."""


def unmount_and_reap(mountpoint: str | os.PathLike[str], wait: float = 10.0) -> Unmounted:
    """Unmount `mountpoint` while it is mounted (its --direct binds first, detached lazily; then
    `fusermount3 -u`, retried for a second while busy, then `-u -z`; each mount stacked there in
    turn), then make sure nothing
    serves it any more: wait up to `wait` seconds for every
    process with the mountpoint among its arguments (our daemon and its watcher process, bindfs,
    floorfs) to exit, and SIGKILL what is left. Safe to call on anything: mounted, dead, or gone."""
    mp = os.fspath(mountpoint)
    done = Unmounted()
    for _ in range(10):  # each mount there: a mount made over a dead one leaves that one beneath
        if not is_mounted(mp):
            break
        with contextlib.suppress(CoherenceError, OSError):  # a dead mount's binds go with its `-u -z`
            direct.unbind(fuse_mounts(None)[mp], mp, lazy=True)
        for _ in range(5):
            if subprocess.run(
                ["fusermount3", "-u", mp], capture_output=True, check=False
            ).returncode == 0 or not is_mounted(mp):
                break
            time.sleep(0.2)
        else:
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True, check=False)
            done.lazy = True
    deadline = time.monotonic() + wait
    while serving_pids(mp) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in serving_pids(mp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        done.killed.append(pid)
    return done


def dead_errno(mountpoint: Path) -> int | None:
    """The errno a dead mount answers with, or None if the mountpoint answers normally."""
    try:
        os.statvfs(mountpoint)
    except OSError as e:
        return e.errno
    return None


class Mount:
    """`root` mounted at `path` through `coherent-volume mount` (as `agent`, and with `--direct` for
    each of `direct`, when given); a context manager that unmounts in every outcome.

    What its daemon logs from the moment this object is made (remounts included) is checked at
    `unmount` and by `log_problems`: an internal error, a traceback or an ERROR record fails with
    `DaemonLogError` naming the records (see `log_problems`). A test that makes the daemon fail on
    purpose passes `log_allows`, regular expressions each matching the first line of a record it
    expects (with the `mounted` fixture: `@pytest.mark.mount_log_allows(pattern, ...)`); there is no
    switch that turns the check off."""

    def __init__(
        self,
        root: Path,
        path: Path,
        agent: str | None = None,
        log_allows: Sequence[str] = (),
        direct: Sequence[str] = (),
        allow_other: bool = False,
    ) -> None:
        self.root, self.path, self.agent, self.direct = root, path, agent, tuple(direct)
        self.allow_other = allow_other
        self.log_allows = tuple(log_allows)
        self.log = root / ".coherent" / "mount.log"
        self._log_checked = self.log.stat().st_size if self.log.exists() else 0
        """How far `log_problems` has read the daemon's log (whole lines only)."""

    def log_problems(self) -> list[str]:
        """The records the daemon logged since the last check that show a bug (see `log_problems`),
        each prefixed with this mount's log path; later calls see only what came after."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self._log_checked)
                new = f.read()
        except FileNotFoundError:
            return []
        complete = new[: new.rfind(b"\n") + 1]  # a line still being written is read next time
        self._log_checked += len(complete)
        text = complete.decode("utf-8", "replace")
        return [f"{self.log}:\n{record}" for record in log_problems(text, self.log_allows)]

    def mount(self) -> float:
        """Mount (over a dead mount too, as the CLI does); returns the seconds it took."""
        if not is_mounted(self.path):  # a dead mount cannot even be stat'ed
            self.path.mkdir(parents=True, exist_ok=True)
        args = [CLI, "mount", str(self.root), str(self.path)] + (["--agent", self.agent] if self.agent else [])
        args += [arg for rel in self.direct for arg in ("--direct", rel)] + (
            ["--allow-other"] if self.allow_other else []
        )
        started = time.monotonic()
        result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
        _ACTIVE.add(self)
        if result.returncode != 0:
            raise RuntimeError(f"mount failed: {result.stderr.strip()}")
        return time.monotonic() - started

    def kill_daemon(self) -> list[int]:
        """SIGKILL the daemon and wait (10 s at most) until it is gone and its mount answers as a
        dead one (the mount stays); returns the pids killed."""
        pids = daemon_pids(self.path)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (daemon_pids(self.path) or dead_errno(self.path) is None) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not daemon_pids(self.path) and dead_errno(self.path) is not None, "the killed daemon's mount is not dead"
        return pids

    def unmount(self) -> Unmounted:
        """Unmount and reap (`unmount_and_reap`), then check the daemon's log: DaemonLogError if it
        shows a bug (the mount is gone either way)."""
        done = unmount_and_reap(self.path)
        _ACTIVE.discard(self)
        problems = self.log_problems()
        if problems:
            raise DaemonLogError("the mount daemon logged an internal error:\n" + "\n".join(problems))
        return done

    def _unmount_after(self, failure: BaseException) -> None:
        """Unmount while `failure` propagates: what the daemon's log shows is added to it as a note."""
        try:
            self.unmount()
        except DaemonLogError as problems:
            failure.add_note(str(problems))

    def __enter__(self) -> Self:
        try:
            self.mount()
        except BaseException as failure:
            self._unmount_after(failure)
            raise
        return self

    def __exit__(self, kind: object, failure: BaseException | None, traceback: object) -> None:
        if failure is None:
            self.unmount()
        else:
            self._unmount_after(failure)

    def run(self, agent: str, script: str, timeout: float = 60, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a bash script as `agent` with the mount as working directory."""
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.path,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            env={**os.environ, "COHERENT_AGENT": agent},
            **kwargs,
        )  # type: ignore[call-overload]

    @contextlib.contextmanager
    def holding(self, agent: str, script: str) -> Iterator[subprocess.Popen[str]]:
        """Run a bash script as `agent` that prints 'ready' once it holds what it opened; kill it after."""
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=self.path,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "COHERENT_AGENT": agent},
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            yield proc
        finally:
            proc.kill()
            proc.wait()


def unmount_all() -> None:
    """Unmount every Mount still tracked (made and not yet unmounted), all of them even if a
    daemon's log shows a bug; then DaemonLogError naming every such log."""
    problems = []
    for m in list(_ACTIVE):
        try:
            m.unmount()
        except DaemonLogError as e:
            problems.append(str(e))
    if problems:
        raise DaemonLogError("\n".join(problems))


atexit.register(unmount_all)


class PidNamespaceMount:
    """`root` mounted at `path` by a daemon in a PID namespace of its own, with its own /proc (as a
    container's daemon is: `mount` refuses a PID namespace whose /proc is another's) and so its own
    mount namespace, where the mount lives. Callers `run` from here enter that mount namespace but
    not the PID namespace: to the daemon they are outside it, and FUSE reports their pid as 0 (a
    sidecar's case). A context manager: the mount is unmounted in every outcome, and the
    namespace, its daemon with it, ended."""

    def __init__(self, root: Path, path: Path, *args: str) -> None:
        self.root, self.path, self.args = root, path, args
        self.log = root / ".coherent" / "mount.log"
        self._ns: subprocess.Popen[str] | None = None

    def __enter__(self) -> PidNamespaceMount:
        self.path.mkdir(exist_ok=True)
        self._ns = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--kill-child",
                "bash",
                "-c",
                '"$0" mount "$@" >/dev/null && echo ready && exec sleep 600',
                CLI,
                str(self.root),
                str(self.path),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert self._ns.stdout is not None and self._ns.stdout.readline().strip() == "ready"
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _enter(self) -> list[str]:
        """The command prefix that enters the namespace's mount namespace (not its PID namespace)."""
        assert self._ns is not None
        return ["nsenter", "--mount", "--target", str(self._ns.pid), "--"]

    def run(self, agent: str | None, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a bash script (as `agent`, if given) with the mount as working directory."""
        env = dict(os.environ)
        if agent is not None:
            env["COHERENT_AGENT"] = agent
        return subprocess.run(
            [*self._enter(), "bash", "-c", f'cd "$0" && {script}', str(self.path)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )

    def __exit__(self, *exc: object) -> None:
        if self._ns is None:
            return
        try:
            if self._ns.poll() is None:
                for flags in (["-u"], ["-u", "-z"]):
                    done = subprocess.run([*self._enter(), "fusermount3", *flags, str(self.path)], capture_output=True)
                    if done.returncode == 0:
                        break
        finally:
            self._ns.kill()  # --kill-child: the namespace's processes, the daemon among them, end with it
            self._ns.wait()
            self._ns = None


@contextlib.contextmanager
def bound(source: Path, at: Path) -> Iterator[Path]:
    """`source` bind-mounted at `at` (made), unmounted in every outcome."""
    at.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(source), str(at)], check=True, capture_output=True)
    try:
        yield at
    finally:
        if subprocess.run(["umount", str(at)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(at)], capture_output=True)
