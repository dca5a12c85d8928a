"""Several hosts on one machine for the multi-host tests: network namespaces on a bridge.

`bed(n)` makes a bridge in the root network namespace with the address `x.1` of a link-local /24
(169.254.x.0/24) and `n` hosts `h1`…`hn`, each a network namespace joined to the bridge by a veth
pair, with the address `x.(10+i)` and its own hostname (UTS), mount namespace (with its own /proc)
and PID namespace. A server in the root namespace listening on `Bed.bridge_address` is reached
from every host over real TCP.

Each host is held by a long-lived init, PID 1 of its PID namespace, which reaps orphans and exits
when the bed closes its end of a pipe, or when the bed's process dies: then the kernel kills every
process of that PID namespace. Commands run in a host through `nsenter` into all its namespaces.

Invariants:
- the /24 of a bed is held under an exclusive lock file and was unused when taken, so two beds
  (two test runs) at once never share an address, a bridge, a veth or a namespace name;
- a closed bed (context exit, or at exit of the interpreter) leaves no namespace, veth, bridge,
  nft table or process behind; `leftovers()` says what is still there.

Needs root, `ip` (iproute2), `unshare` and `nsenter` (util-linux) and `nft` (nftables).

    python -m tests.harness.nethosts init HOSTNAME FD   (the host init; started by `bed`)
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import REPO, child

__all__ = ["Bed", "Host", "bed"]

Direction = Literal["in", "out"]

_LOCKS = Path(tempfile.gettempdir()) / "coherent-volume-beds"
_UNUSABLE = {0, 169, 255}
"""Third octets never taken: 169.254.0.0/24 and .255.0/24 are reserved, 169.254.169.254 is the
metadata service of most clouds."""

_NFT_TABLE = "cvbed"
_ACTIVE: set[Bed] = set()


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T, Z…); None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].split()[0].decode()


def _is_nsenter(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe").endswith("/nsenter")
    except OSError:
        return False


def _parent(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(raw[raw.rindex(b")") + 2 :].split()[1])


@dataclass(eq=False)
class Host:
    """One host of a bed: its hostname, address, and its init's pid in the root PID namespace."""

    name: str
    address: str
    netns: str
    veth: str
    """The bridge's end of the host's veth pair (in the root network namespace)."""
    bed_netns: tuple[str, ...] = ()
    """The network namespaces of every host of its bed."""
    init_pid: int = 0
    _init: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owner: int = field(default=-1, repr=False)
    _drops: set[tuple[Direction, int]] = field(default_factory=set, repr=False)

    # ---- running commands -----------------------------------------------------------------------

    def command(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None) -> list[str]:
        """`argv` run inside this host (every one of its namespaces), in `cwd` (default: REPO)."""
        return [
            "nsenter",
            "-t",
            str(self.init_pid),
            "-n",
            "-m",
            "-u",
            "-p",
            f"--wd={os.fspath(cwd or REPO)}",
            "--",
            *argv,
        ]

    def run(
        self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside this host; `cwd` is a path in the host's mount namespace."""
        return subprocess.run(self.command(argv, cwd), **kw)

    def popen(self, argv: Sequence[str], cwd: str | os.PathLike[str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside this host. Its `.pid` is nsenter's; `pid_of` gives the command's."""
        return subprocess.Popen(self.command(argv, cwd), **kw)

    def pid_of(self, proc: subprocess.Popen[Any], wait: float = 10.0) -> int:
        """The root-namespace pid of the command `proc` (from `popen`) runs: nsenter's only child."""
        deadline = time.monotonic() + wait
        while not (kids := _children(proc.pid)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ProcessLookupError(f"the command of nsenter {proc.pid} did not start in host {self.name}")
            time.sleep(0.01)
        return kids[0]

    # ---- faults ---------------------------------------------------------------------------------

    def partition(self) -> None:
        """Cut this host off the bridge (link down): nothing reaches it, nothing leaves it."""
        _ip("link", "set", self.veth, "down")

    def heal(self, wait: float = 10.0) -> None:
        """Join the bridge again; returns once the link forwards, with the neighbour entries that
        failed during the partition forgotten (else the next connection fails "no route to host")."""
        _ip("link", "set", self.veth, "up")
        deadline = time.monotonic() + wait
        while not self._forwarding():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the link of host {self.name} did not come back within {wait} s")
            time.sleep(0.01)
        _ip("neigh", "flush", "to", self.address, check=False)
        for netns in self.bed_netns:  # failed entries, and those still failing (incomplete)
            _ip("-n", netns, "neigh", "flush", "dev", "eth0", check=False)

    def _forwarding(self) -> bool:
        """The bridge forwards to and from the veth (brport state 3), and the host sees a carrier."""
        try:
            state = Path(f"/sys/class/net/{self.veth}/brport/state").read_text().strip()
        except OSError:
            return False
        return state == "3" and "LOWER_UP" in _ip("-n", self.netns, "-o", "link", "show", "eth0").stdout

    def drop(self, direction: Direction, port: int) -> None:
        """Drop every TCP segment to or from `port` entering ("in") or leaving ("out") this host:
        a one-way loss, e.g. `drop("in", 5432)` loses a database's replies, not the requests."""
        self._drops.add((direction, port))
        self._apply_drops()

    def undrop(self, direction: Direction, port: int) -> None:
        """End a `drop`."""
        self._drops.discard((direction, port))
        self._apply_drops()

    def _apply_drops(self) -> None:
        """Replace the host's nft table by one holding exactly `_drops` (one atomic nft batch)."""
        hooks = {"in": "input", "out": "output"}
        rules = {hook: "" for hook in hooks.values()}
        for direction, port in sorted(self._drops):
            rules[hooks[direction]] += f"tcp dport {port} drop; tcp sport {port} drop; "
        script = f"table inet {_NFT_TABLE}\ndelete table inet {_NFT_TABLE}\n"
        if self._drops:
            chains = "; ".join(
                f"chain {hook} {{ type filter hook {hook} priority 0; {body}}}" for hook, body in rules.items()
            )
            script += f"table inet {_NFT_TABLE} {{ {chains}; }}\n"
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, "nft", "-f", "-"], input=script, text=True, capture_output=True
        )
        if done.returncode:
            raise RuntimeError(f"nft refused the drops of host {self.name}: {done.stderr.strip()}")

    def pause(self, pid: int, wait: float = 10.0) -> None:
        """SIGSTOP the process `pid` (root-namespace pid, e.g. from `pid_of`); returns once stopped."""
        os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + wait
        while process_state(pid) not in ("T", None):
            if time.monotonic() > deadline:
                raise TimeoutError(f"process {pid} did not stop within {wait} s")
            time.sleep(0.005)

    def resume(self, pid: int) -> None:
        """SIGCONT `pid`, and the nsenter that started it: nsenter stops itself when its command
        stops, and would stay stopped (its caller waiting for ever) if only the command went on."""
        os.kill(pid, signal.SIGCONT)
        parent = _parent(pid)
        if parent is not None and _is_nsenter(parent):
            os.kill(parent, signal.SIGCONT)

    # ---- lifetime -------------------------------------------------------------------------------

    def _start(self) -> None:
        """Make the namespace and the veth, then the init; returns once the host is named and up."""
        _ip("netns", "add", self.netns)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.netns)
        _ip("-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _ip("-n", self.netns, "link", "set", "lo", "up")
        _ip("-n", self.netns, "link", "set", "eth0", "up")
        ours, self._owner = os.pipe()
        try:
            self._init = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "unshare",
                    "--mount",
                    "--uts",
                    "--pid",
                    "--fork",
                    "--mount-proc",
                    "--propagation",
                    "private",
                    *child("nethosts", "init", self.name, str(ours)),
                ],
                cwd=REPO,
                pass_fds=(ours,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        finally:
            os.close(ours)
        assert self._init.stdout is not None
        ready = self._init.stdout.readline()
        kids = _children(self._init.pid)  # ip netns exec execs unshare, whose only child is the init
        if ready != b"ready\n" or not kids:
            rest = self._init.stdout.read() if self._init.poll() is not None else b""
            raise RuntimeError(f"host {self.name} did not start: {(ready + rest).decode(errors='replace').strip()}")
        self._init.stdout.close()
        self.init_pid = kids[0]

    def _stop(self) -> None:
        """End the init (so every process of the host), then remove the veth and the namespace."""
        if self._owner >= 0:
            os.close(self._owner)  # the init sees EOF and exits; the kernel kills its PID namespace
            self._owner = -1
        if self._init is not None:
            try:
                self._init.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
                self._init.wait(timeout=10)
            self._init = None
        _ip("link", "del", self.veth, check=False)
        _ip("netns", "del", self.netns, check=False)


@dataclass(eq=False)
class Bed:
    """A bridge and its hosts. `bridge_address` is reachable from every host."""

    subnet: int
    """x of 169.254.x.0/24."""
    bridge: str
    hosts: list[Host]
    _lock: int = field(default=-1, repr=False)

    @property
    def bridge_address(self) -> str:
        return f"169.254.{self.subnet}.1"

    def leftovers(self) -> list[str]:
        """What of this bed still exists: namespaces, links, host inits (empty once closed)."""
        found = []
        netns = _ip("netns", "list").stdout.split()
        links = _ip("-o", "link", "show").stdout
        for name in [h.netns for h in self.hosts]:
            if name in netns:
                found.append(f"netns {name}")
        for name in [self.bridge, *(h.veth for h in self.hosts)]:
            if f": {name}:" in links or f": {name}@" in links:
                found.append(f"link {name}")
        for h in self.hosts:
            if h.init_pid and process_state(h.init_pid) not in (None, "Z"):
                found.append(f"init of {h.name} (pid {h.init_pid})")
        return found

    def close(self) -> None:
        """Tear everything down; idempotent; every step runs even when an earlier one failed."""
        _ACTIVE.discard(self)
        with contextlib.ExitStack() as steps:  # callbacks run last-in first-out: hosts, bridge, lock
            steps.callback(self._release)
            steps.callback(_ip, "link", "del", self.bridge, check=False)
            for h in self.hosts:
                steps.callback(h._stop)

    def _release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _subnet_in_use(x: int) -> bool:
    """Whether 169.254.x.0/24 or a name a bed on it would take already exists."""
    tag = f"cvb{x}"
    addrs = _ip("-o", "-4", "addr", "show").stdout
    links = _ip("-o", "link", "show").stdout
    netns = _ip("netns", "list").stdout.split()
    return (
        f" 169.254.{x}." in addrs
        or f": {tag}br:" in links
        or f": {tag}h" in links
        or any(name.startswith(f"{tag}-") for name in netns)
    )


def _take_subnet() -> tuple[int, int]:
    """A free 169.254.x.0/24, locked for this process: (x, fd of its lock file)."""
    _LOCKS.mkdir(exist_ok=True)
    start = os.getpid() % 256
    for x in [(start + k) % 256 for k in range(256)]:
        if x in _UNUSABLE:
            continue
        fd = os.open(_LOCKS / f"169.254.{x}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        if _subnet_in_use(x):
            os.close(fd)
            continue
        return x, fd
    raise RuntimeError("no free link-local /24 for a test bed: every 169.254.x.0/24 is in use or locked")


@contextlib.contextmanager
def bed(n_hosts: int) -> Iterator[Bed]:
    """`n_hosts` hosts on a bridge, torn down in every outcome."""
    if not 1 <= n_hosts <= 200:
        raise ValueError(f"a bed has 1 to 200 hosts, not {n_hosts}")
    x, lock = _take_subnet()
    tag = f"cvb{x}"
    numbers = range(1, n_hosts + 1)
    netns = tuple(f"{tag}-h{i}" for i in numbers)
    hosts = [Host(f"h{i}", f"169.254.{x}.{10 + i}", f"{tag}-h{i}", f"{tag}h{i}", netns) for i in numbers]
    b = Bed(subnet=x, bridge=f"{tag}br", hosts=hosts, _lock=lock)
    _ACTIVE.add(b)
    try:
        _ip("link", "add", b.bridge, "type", "bridge")
        _ip("addr", "add", f"{b.bridge_address}/24", "dev", b.bridge)
        _ip("link", "set", b.bridge, "up")
        for h in b.hosts:
            h._start()
            _ip("link", "set", h.veth, "master", b.bridge)
            _ip("link", "set", h.veth, "up")
        yield b
    finally:
        b.close()


@atexit.register
def _close_all() -> None:
    for b in list(_ACTIVE):
        b.close()


def _serve_as_init(hostname: str, owner: int) -> None:
    """PID 1 of a host: name the host, then reap orphans until `owner` (a pipe whose other end the
    bed holds) reads EOF, i.e. the bed closed it or its process died. Returning ends the PID
    namespace: the kernel kills every process left in it."""
    socket.sethostname(hostname)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)  # a SIGCHLD wakes the select below, even one that came before it
    sys.stdout.write("ready\n")
    sys.stdout.close()
    while True:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        readable, _, _ = select.select([owner, wake_r], [], [])
        if owner in readable:
            return
        os.read(wake_r, 4096)


if __name__ == "__main__":
    if sys.argv[1:2] == ["init"] and len(sys.argv) == 4:
        _serve_as_init(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
