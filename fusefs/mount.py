"""Mounting and unmounting a volume, with a clear error for each way it can fail.

`mount` returns only once the mount works (or with the reason it does not): the daemon
forks, mounts, and reports back through a pipe, which the parent waits on for at most
READY_TIMEOUT seconds. If the daemon dies, the mountpoint stays dead (ENOTCONN) rather than
becoming a bare directory that agents could write into unprotected; mounting again goes over
the dead mount (as root), and `unmount` takes every mount there away.
"""

from __future__ import annotations

import ctypes
import faulthandler
import io
import logging
import logging.handlers
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pyfuse3
import trio

from coherent_volume.core import open_core
from coherent_volume.errors import CoherenceError
from coherent_volume.filesystems import lies_within
from coherent_volume.liveness import children_share_our_pid_namespace, proc_is_ours
from coherent_volume.mounts import FSTYPE, daemon_gone, device_of, fuse_mounts, mount_holding, unescape
from coherent_volume.paths import REGISTRY_DIR
from coherent_volume.registry.postgresql import PostgresRegistry

from . import direct
from .abort import abort
from .identity import AgentResolver
from .listen import listen
from .operations import CoherentOperations
from .watcher import watch

log = logging.getLogger("coherent_volume.fuse")


class MountError(CoherenceError):
    """A mount or unmount that cannot be done; the message says why and what to do."""


MS_NOSUID, MS_NODEV = 2, 4
"""mount(2) flags, as libfuse mounts."""
_LIBC = ctypes.CDLL(None, use_errno=True)
READY_TIMEOUT = 120.0
"""Seconds `mount` waits for its daemon to report the mount ready (it settles unfinished commits
and starts its watcher first) before it stops the daemon and says so."""
READAHEAD_KB = 1024
"""Kernel readahead for the mount: sequential reads of unmanaged (page-cached) files reach the
daemon in requests as large as FUSE allows (1 MiB) instead of the default 128 KiB; measured here,
that doubles their throughput. Managed files are read direct_io and are unaffected."""


async def _widen_readahead(mountpoint: str) -> None:
    """Set the mount's readahead to READAHEAD_KB once the kernel has the daemon's answer to FUSE_INIT
    (which caps it); without permission to (not root, a read-only /sys) the mount keeps the
    kernel's default."""
    await trio.to_thread.run_sync(os.statvfs, mountpoint)  # answered only after FUSE_INIT
    device = device_of(mountpoint)
    if device is None:
        log.info("kept the default readahead for %s: not in /proc/self/mountinfo", mountpoint)
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(READAHEAD_KB))
    except OSError as e:
        log.info("kept the default readahead for %s: %s", mountpoint, e)


def _named(mountpoint: str) -> str:
    """`mountpoint` with the directories above it resolved (symlinks followed) but not itself,
    which a dead mount makes unreadable: as mountinfo names it."""
    absolute = os.path.abspath(mountpoint)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _fusermount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fusermount3", *args], capture_output=True, text=True)


class Mountable(NamedTuple):
    """What `check_mountable` found: the root and the mountpoint resolved, the direct dirs relative
    to the root, and whether the mountpoint is a dead mount (its daemon killed) to mount over."""

    root: str
    mountpoint: str
    direct_dirs: tuple[str, ...]
    over_dead: bool


def check_mountable(root: str, mountpoint: str, direct_dirs: Sequence[str] = ()) -> Mountable:
    """Validate everything that can be checked before forking, then create the direct dirs that are
    missing. A dead mount at the mountpoint stays where it is (as root): the new mount goes over it,
    so no program meets the bare directory beneath, which it could write into, in between."""
    if not os.path.exists("/dev/fuse"):
        raise MountError(
            "no /dev/fuse on this machine: FUSE is unavailable (load the fuse module, or give the "
            "container --device /dev/fuse)"
        )
    if not proc_is_ours():
        raise MountError(
            "/proc here numbers the processes of another PID namespace (no /proc was mounted for this one, e.g. "
            "after `unshare --pid --fork` without `--mount-proc`): the mount tells its callers apart by "
            "their entries in /proc, and would take one agent's writes for another's. Mount from a namespace "
            "whose /proc is its own (`unshare --pid --fork --mount-proc`), or from outside it"
        )
    if not children_share_our_pid_namespace():
        raise MountError(
            "this process's children would start in another PID namespace (`unshare --pid` without `--fork`), "
            "where the mount could start its watcher once at most and could not tell its callers apart: "
            "mount with `unshare --pid --fork --mount-proc`, or from outside it"
        )
    root_real = os.path.realpath(root)
    if root_real in fuse_mounts() and daemon_gone(root_real):
        raise MountError(
            f"{root!r} is a mount of a volume whose daemon is gone: unmount it (`coherent-volume unmount "
            f"{root_real}`), then mount the volume's root"
        )
    if not os.path.isdir(root_real):
        raise MountError(f"volume root {root!r} does not exist")
    core = open_core(root_real)  # a clear error now if ROOT is no volume
    core.close()
    root_real = core.paths.root  # (ROOT may name it through a mount of it: the daemon serves the root itself)
    mp = _named(mountpoint)
    over = mp in fuse_mounts() and daemon_gone(mp)  # a daemon killed earlier left it dead
    if over and os.geteuid() != 0:  # (only root can mount over it: detached, then checked as any directory)
        _fusermount("-u", "-z", mp)
        over = False
    if not over and mp in fuse_mounts():
        raise MountError(f"{mp} is already a mounted volume; unmount it first")
    if not over and not os.path.isdir(mp):
        raise MountError(f"mountpoint {mp} does not exist or is not a directory")
    mp = os.path.realpath(mp)
    held = mount_holding(mp)  # (a mount of the volume shows its directories under other names)
    shown = held if held is not None and held.root == root_real and held.mountpoint != mp else None
    if lies_within(mp, root_real) or shown is not None:
        through = "" if shown is None else f", through its mount at {shown.mountpoint}"
        raise MountError(
            f"mountpoint {mp} is a directory of the volume at {root_real} (by its name or through a bind mount"
            f"{through}): the mount would serve itself, and a lookup through it would wait on itself; mount it "
            "outside the volume"
        )
    if not over and os.listdir(mp):
        raise MountError(f"mountpoint {mp} is not empty: its files would be hidden; use an empty directory")
    if direct_dirs and os.geteuid() != 0:
        raise MountError("--direct needs root: a bind mount needs CAP_SYS_ADMIN (mount as root, or without --direct)")
    rels = direct.check(root_real, core.paths.globs, direct_dirs)
    direct.make(root_real, rels)
    return Mountable(root_real, mp, rels, over)


async def _serve(
    ops: CoherentOperations, mountpoint: str, direct_dirs: Sequence[str], on_ready: Callable[[], None]
) -> None:
    root = ops.core.paths.root
    async with trio.open_nursery() as nursery:
        await nursery.start(watch, ops.core, ops.inodes, ops.own, mountpoint)
        registry = ops.core.registry
        if isinstance(registry, PostgresRegistry):  # other hosts commit too: notified, brought in as they land
            await nursery.start(listen, ops.core, registry, ops.inodes, ops.own)
        bound = trio.Event()

        async def bind_then_ready() -> None:
            # the binds look their targets up through this mount: made while the loop below serves
            if direct_dirs:
                await trio.to_thread.run_sync(direct.bind, root, mountpoint, direct_dirs)
            bound.set()
            on_ready()

        async def stop_on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for number in signals:
                    unsaved = sorted({h.rel for h in ops.files.values() if getattr(h, "unsaved", False)})
                    log.warning(
                        "stopping on %s with %d files open%s",
                        signal.Signals(number).name,
                        len(ops.files),
                        f"; unsaved writes to {', '.join(unsaved)} are dropped (their programs get ENOTCONN)"
                        if unsaved
                        else "",
                    )
                    await bound.wait()
                    if direct_dirs:  # before the mount they sit on, while it still serves their lookups
                        try:
                            await trio.to_thread.run_sync(direct.unbind, root, mountpoint, True)
                        except (direct.DirectError, OSError) as e:
                            log.warning("left the direct dirs to the unmount of %s: %s", mountpoint, e)
                    pyfuse3.terminate()
                    return

        nursery.start_soon(bind_then_ready)
        nursery.start_soon(stop_on_signal)
        nursery.start_soon(_widen_readahead, mountpoint)
        await pyfuse3.main(min_tasks=4, max_tasks=64)
        nursery.cancel_scope.cancel()


def _option_value(text: str) -> str:
    """`text` escaped for libfuse's comma-separated option list (a root may contain ',' or '\\')."""
    return text.replace("\\", "\\\\").replace(",", "\\,")


def serve(m: Mountable, agent: str | None, allow_other: bool, on_ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled, the direct dirs bound over the mount while it
    serves. A crash leaves the mount dead, never bare (its binds go with its next unmount)."""
    root, mountpoint, direct_dirs = m.root, m.mountpoint, m.direct_dirs
    os.umask(0)  # callers' modes arrive with their own umask applied: never apply the daemon's on top
    core = open_core(root)
    core.settle()
    resolver = AgentResolver(agent, os.getpid(), core.session_of)
    ops = CoherentOperations(core, resolver, direct_dirs)
    options = set(pyfuse3.default_options) | {f"fsname={_option_value(core.paths.root)}", "subtype=coherent"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, _mounted_over(core.paths.root, mountpoint, allow_other) if m.over_dead else mountpoint, options)
    ours = device_of(mountpoint) if m.over_dead else None
    ready = False

    def serving() -> None:
        nonlocal ready
        ready = True
        on_ready()

    clean = False
    try:
        trio.run(_serve, ops, mountpoint, direct_dirs, serving)
        clean = True
    finally:
        pyfuse3.close(unmount=clean or not ready)  # a mount that never served leaves nothing behind
        if m.over_dead and (clean or not ready):  # libfuse unmounts only what it mounted itself
            _detach_over(mountpoint, ours, dead_too=clean)
        resolver.close()
        ops.backing.close()
        core.close()


def _mounted_over(root: str, mountpoint: str, allow_other: bool) -> str:
    """Mount a new connection over the dead mount at `mountpoint` with mount(2), which stacks it on
    the dead one's root (that needs no answer from a daemon, where libfuse's stat of the mountpoint
    fails ENOTCONN); the connection for libfuse to serve, as "/dev/fd/N". The dead mount beneath is
    detached by the next `unmount`."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    data = f"fd={fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()},default_permissions"
    data += ",allow_other" if allow_other else ""
    flags = ctypes.c_ulong(MS_NOSUID | MS_NODEV)
    if _LIBC.mount(root.encode(), mountpoint.encode(), FSTYPE.encode(), flags, data.encode()) != 0:
        error = ctypes.get_errno()
        os.close(fd)
        raise MountError(f"could not mount over the dead mount at {mountpoint}: {os.strerror(error)}")
    return f"/dev/fd/{fd}"


def _detach_over(mountpoint: str, ours: str | None, dead_too: bool) -> None:
    """Detach the mount this daemon made over a dead one (device `ours`), if it is still there; with
    `dead_too` (a stop, as an unmount) the dead ones beneath as well, else they stay (fail closed)."""
    if ours is not None and device_of(mountpoint) == ours:
        _fusermount("-u", "-z", mountpoint)
    if dead_too:
        _detach_dead(mountpoint)


def _detach_dead(mountpoint: str) -> subprocess.CompletedProcess[str] | None:
    """Detach the dead mounts (their daemons killed) at the top of `mountpoint`, one stacked on the
    next, until a live mount or none is there; the detach that failed, if one did."""
    while mountpoint in fuse_mounts() and daemon_gone(mountpoint):
        result = _fusermount("-u", "-z", mountpoint)
        if result.returncode != 0:
            return result
    return None


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _MountLog(logging.handlers.WatchedFileHandler):
    """The daemon's log, `ROOT/.coherent/mount.log`, followed to a new file at its path: a `.coherent`
    removed while mounted (and made again by `init`) took the daemon's explanations of its EIOs with
    it. While nothing can be made at the path, records go to the file the daemon started with."""

    def __init__(self, path: str) -> None:
        super().__init__(path, encoding="utf-8", errors="backslashreplace")  # names that are not UTF-8, as stderr
        self._on_stderr = self.ino
        """The inode of the log file on stderr (the daemon's descriptor 2)."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.reopenIfNeeded()
        except OSError:
            if self.stream is None:
                self.stream = os.fdopen(os.dup(2), "a", encoding=self.encoding, errors=self.errors)
                self.dev = self.ino = -1  # (looked for again at the next record)
        if self.stream is not None and self.ino not in (-1, self._on_stderr):  # stderr follows (faulthandler's trace)
            os.dup2(self.stream.fileno(), 2)
            self._on_stderr = self.ino
        logging.StreamHandler.emit(self, record)


def _reason(e: BaseException) -> str:
    """What went wrong, without trio's wrapping: the first error inside an exception group."""
    while isinstance(e, BaseExceptionGroup) and e.exceptions:
        e = e.exceptions[0]
    return str(e)


def mount(
    root: str, mountpoint: str, agent: str | None, foreground: bool, allow_other: bool, direct_dirs: Sequence[str] = ()
) -> None:
    """Mount ROOT at MOUNTPOINT, each of `direct_dirs` (relative to ROOT) served by the kernel (see
    fusefs/direct.py); without `foreground`, return once the mount and its binds work (daemon in
    background)."""
    m = check_mountable(root, mountpoint, direct_dirs)
    root, mountpoint = m.root, m.mountpoint
    if foreground:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        serve(m, agent, allow_other, lambda: None)
        return
    dead = device_of(mountpoint) if m.over_dead else None
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(read_end)
        os.setsid()
        os.chdir("/")  # never pin the caller's directory, nor import from it
        log_path = os.path.join(root, REGISTRY_DIR, "mount.log")
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        faulthandler.enable()  # a fatal signal (SIGBUS from a cut -shm) is said in the log, with where it hit
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=[_MountLog(log_path)])

        def ready() -> None:
            os.write(write_end, b"ok")
            os.close(write_end)

        try:
            serve(m, agent, allow_other, ready)
        except BaseException as e:  # report to the waiting parent if it is still waiting
            log.exception("mount daemon failed")
            try:
                os.write(write_end, f"error: {_reason(e)}".encode())
            except OSError:
                pass
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    try:
        answer = _answer(read_end)
    finally:
        os.close(read_end)
    if answer is None:
        raise MountError(_stopped(pid, root, mountpoint, dead))
    if answer != "ok":
        _, status = os.waitpid(pid, 0)
        if answer:
            raise MountError(answer.removeprefix("error: "))
        raise MountError(_died(status, root, mountpoint, dead))


def _answer(read_end: int) -> str | None:
    """What the daemon reports through its pipe ("ok", or its error); None if it reports nothing
    within READY_TIMEOUT seconds."""
    deadline = time.monotonic() + READY_TIMEOUT
    chunks: list[bytes] = []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([read_end], [], [], left)[0]:
            break
        chunk = os.read(read_end, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)
    return None


def _stopped(pid: int, root: str, mountpoint: str, dead: str | None) -> str:
    """Stop a daemon that did not report its mount ready in time: killed, its connection aborted
    (a daemon waiting on its own mount keeps every caller waiting), its mount detached, never the
    dead mount (device `dead`) it was to go over, which stays (fail closed); what happened, to be said."""
    os.kill(pid, signal.SIGKILL)
    left = _detach_own(mountpoint, dead)
    os.waitpid(pid, 0)
    return (
        f"the mount daemon did not report the mount of {root} at {mountpoint} ready within {READY_TIMEOUT:g} s, "
        f"so it was stopped and {left}; its log, {os.path.join(root, REGISTRY_DIR, 'mount.log')}, says how far it got"
    )


def _died(status: int, root: str, mountpoint: str, dead: str | None) -> str:
    """A daemon that ended (wait `status`) before it reported its mount ready, unasked (killed, or
    gone without a word): what it mounted is detached, never the dead mount (device `dead`) it was
    to go over; what happened, to be said."""
    if os.WIFSIGNALED(status):
        how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    else:
        how = f"exited with status {os.waitstatus_to_exitcode(status)}"
    return (
        f"the mount daemon of {root} {how} before it reported the mount at {mountpoint} ready, and "
        f"{_detach_own(mountpoint, dead)}; its log, {os.path.join(root, REGISTRY_DIR, 'mount.log')}, says how far it "
        "got. Mount again"
    )


def _detach_own(mountpoint: str, dead: str | None) -> str:
    """Detach the mount a daemon stopped before it reported ready made at `mountpoint` (its connection
    aborted: a daemon waiting on its own mount keeps every caller waiting), never the dead mount
    (device `dead`) it was to go over, which stays (fail closed); what is left there, to be said."""
    device = device_of(mountpoint) if mountpoint in fuse_mounts() else None
    if device is not None and device != dead:
        abort(device)
        _fusermount("-u", "-z", mountpoint)
    if dead is not None:
        return "the dead mount it was to go over stays there (`coherent-volume unmount` removes it)"
    return "nothing is mounted there"


def unmount(mountpoint: str, timeout: float = 10.0) -> list[str]:
    """Unmount a volume, its direct dirs first; a busy mount is an error, not a lazy detach, and
    leaves the mount as it was. A dead mount (its daemon killed) is detached with its direct dirs.
    Returns where the mount is still held (`still_held`): its daemon serves those until they are
    unmounted or their processes end."""
    dead = daemon_gone(mountpoint)
    mp = _named(mountpoint) if dead else os.path.realpath(mountpoint)
    root = fuse_mounts().get(mp)
    if root is None:
        raise MountError(f"{mp} is not a mounted volume")
    device = device_of(mp)
    unbound = [] if dead else direct.unbind(root, mp, lazy=False)
    result = _fusermount("-u", mp)
    if result.returncode != 0:
        if daemon_gone(mp):  # with the dead mounts it was mounted over
            failed = _detach_dead(mp)
            if failed is None:
                return []
            result = failed
        direct.bind(root, mp, unbound)
        reason = result.stderr.strip() or f"fusermount3 exited with {result.returncode}"
        if "busy" in reason.lower():
            raise MountError(
                f"{mp} is busy (files are open there, or a process has its working directory in it): "
                "close them and try again"
            )
        raise MountError(f"could not unmount {mp}: {reason}")
    deadline = time.monotonic() + timeout
    while mp in fuse_mounts() and time.monotonic() < deadline:
        if device_of(mp) == device:
            time.sleep(0.05)
        elif not daemon_gone(mp) or _detach_dead(mp) is not None:  # dead: mounts it was mounted over (`_mounted_over`)
            break
    return [] if device is None else still_held(device, root)


def still_held(device: str, root: str) -> list[str]:
    """Where the mount of the volume at `root` on `device` ("major:minor") is still held once
    unmounted here, from each mount namespace's /proc/PID/mountinfo: its other mountpoints in this
    namespace (a bind mount of it), and a process of each other namespace holding it (`unshare
    -m`, a container); a process that ends meanwhile is left out. (A device number is reused only
    once its mount is gone everywhere: a mount made on it since is another volume's.)"""
    here = os.stat("/proc/self/ns/mnt").st_ino
    seen: set[int] = set()
    held: list[str] = []
    for name in ["self", *(n for n in os.listdir("/proc") if n.isdigit())]:
        try:
            namespace = os.stat(f"/proc/{name}/ns/mnt").st_ino
            if namespace in seen:
                continue
            seen.add(namespace)
            with open(f"/proc/{name}/mountinfo") as f:
                found = [unescape(line.split()[4]) for line in f if _mount_of(line, device, root)]
        except OSError:
            continue
        if namespace == here:
            held += [f"at {mp} (a bind mount of it, in this mount namespace)" for mp in found]
        elif found:
            held.append(f"in the mount namespace of process {name} (made by `unshare -m` or a container)")
    return held


def _mount_of(line: str, device: str, root: str) -> bool:
    """Whether a /proc/PID/mountinfo `line` is a mount of the volume at `root` on `device`."""
    fields = line.split()
    dash = fields.index("-") if "-" in fields else -1
    return (
        fields[2] == device
        and 0 < dash < len(fields) - 2
        and fields[dash + 1] == FSTYPE
        and unescape(fields[dash + 2]) == root
    )
