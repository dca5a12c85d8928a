"""The multi-host test bed itself: hosts as namespaces on a bridge, its faults, the delay proxy.

Real parts only: network namespaces, veths, a bridge, nftables, PID and UTS namespaces, real TCP.
Every bed is torn down by its context manager; the last tests check that nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coherent_volume.liveness import ProcessId
from tests.harness import REPO
from tests.harness.delayproxy import delay_proxy
from tests.harness.nethosts import Bed, Host, bed
from tests.harness.pgcluster import cluster

PY = sys.executable

IDENTIFY = """
import json, os, socket, sys
from coherent_volume import liveness
me = liveness.current_process()
print(json.dumps({"host": me.host, "pid": me.pid, "start": me.start, "hostname": socket.gethostname()}), flush=True)
sys.stdin.read()  # alive until the test closes stdin
"""

ALIVE = """
import json, sys
from coherent_volume.liveness import ProcessId
print(json.dumps(ProcessId(**json.loads(sys.argv[1])).alive()))
"""

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
print("connected", s.getsockname()[0], flush=True)
for line in sys.stdin:                      # "send TEXT" or "recv SECONDS"
    verb, arg = line.split()
    if verb == "send":
        s.sendall(arg.encode() + b"\\n")
        print("sent", flush=True)
    else:
        s.settimeout(float(arg))
        try:
            print("got", s.recv(100).decode().strip(), flush=True)
        except TimeoutError:
            print("timeout", flush=True)
"""
"""A TCP client in a host, driven line by line through its stdin."""

ECHO_RTT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    s.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        got += s.recv(64)
    rtts.append(time.perf_counter() - t)
print(min(rtts))
"""


@pytest.fixture
def two_hosts() -> Iterator[Bed]:
    with bed(2) as b:
        yield b


class Server:
    """A TCP server in the root namespace on the bridge: records lines, echoes or answers them."""

    def __init__(self, address: str, echo: bool = False) -> None:
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        self.echo = echo
        self.peers: list[str] = []
        self.lines: list[str] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.peers.append(peer[0])
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # closed by the test
            while data := conn.recv(65536):
                if self.echo:
                    conn.sendall(data)
                else:
                    self.lines.extend(data.decode().split())

    def push(self, line: str) -> None:
        """Send `line` on every connection still open."""
        for c in self.conns:
            if c.fileno() >= 0:
                c.sendall(line.encode() + b"\n")

    def wait_for_line(self, line: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while line not in self.lines:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def server(two_hosts: Bed) -> Iterator[Server]:
    s = Server(two_hosts.bridge_address)
    yield s
    s.close()


def _identify(host: Host) -> tuple[subprocess.Popen[str], dict[str, object]]:
    proc = host.popen([PY, "-c", IDENTIFY], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def test_each_host_has_its_own_hostname_and_pid_namespace(two_hosts: Bed) -> None:
    h1, h2 = two_hosts.hosts
    p1, who1 = _identify(h1)
    p2, who2 = _identify(h2)
    try:
        assert (who1["hostname"], who2["hostname"]) == ("h1", "h2")
        assert who1["host"] != who2["host"]
        assert who1["pid"] != h1.pid_of(p1)  # numbered in the host's own PID namespace
        ident = json.dumps({k: who1[k] for k in ("host", "pid", "start")})
        same_host = h1.run([PY, "-c", ALIVE, ident], capture_output=True, text=True, check=True)
        other_host = h2.run([PY, "-c", ALIVE, ident], capture_output=True, text=True, check=True)
        assert json.loads(same_host.stdout) is True
        assert json.loads(other_host.stdout) is None  # cannot be checked from there: never "dead"
        assert ProcessId(str(who1["host"]), int(str(who1["pid"])), int(str(who1["start"]))).alive() is None
    finally:
        for p in (p1, p2):
            p.communicate("")


def test_hosts_reach_a_server_on_the_bridge_and_each_other(two_hosts: Bed, server: Server) -> None:
    h1, h2 = two_hosts.hosts
    for h in (h1, h2):
        client = h.popen(
            [PY, "-c", CLIENT, two_hosts.bridge_address, str(server.port), "5"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = client.communicate(f"send from-{h.name}\n", timeout=30)
        assert out.splitlines() == [f"connected {h.address}", "sent"]
        assert server.wait_for_line(f"from-{h.name}", 10)
    assert sorted(server.peers) == [h1.address, h2.address]
    listener = h2.popen(
        [
            PY,
            "-c",
            "import socket; s = socket.create_server(('', 7000)); print('up', flush=True); c, p = s.accept(); print(p[0])",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert listener.stdout is not None and listener.stdout.readline() == "up\n"
    h1.run([PY, "-c", f"import socket; socket.create_connection(('{h2.address}', 7000), timeout=5)"], check=True)
    assert listener.communicate(timeout=10)[0].strip() == h1.address


def _connects(host: Host, address: str, port: int, timeout: float) -> bool:
    """Whether a TCP connection from `host` to address:port is made within `timeout` seconds."""
    done = host.run(
        [PY, "-c", CLIENT, address, str(port), str(timeout)], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if done.returncode and "TimeoutError" not in done.stderr and "OSError" not in done.stderr:
        raise AssertionError(f"the client failed: {done.stderr}")
    return done.returncode == 0


def test_a_partition_fails_connections_and_heal_restores_them(two_hosts: Bed, server: Server) -> None:
    h1, h2 = two_hosts.hosts
    h1.partition()
    try:
        assert not _connects(h1, two_hosts.bridge_address, server.port, timeout=2)
        assert _connects(h2, two_hosts.bridge_address, server.port, timeout=5)  # only h1 is cut off
    finally:
        h1.heal()
    assert _connects(h1, two_hosts.bridge_address, server.port, timeout=5)


def _client(host: Host, bed: Bed, port: int) -> subprocess.Popen[str]:
    proc = host.popen(
        [PY, "-c", CLIENT, bed.bridge_address, str(port), "5"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
    )
    assert proc.stdout is not None and proc.stdout.readline().startswith("connected")
    return proc


def _say(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_a_one_way_drop_loses_one_direction_only(two_hosts: Bed, server: Server) -> None:
    h1, h2 = two_hosts.hosts
    client = _client(h1, two_hosts, server.port)
    try:
        h1.drop("in", server.port)  # what the server sends is lost; what h1 sends arrives
        assert _say(client, "send ping") == "sent" and server.wait_for_line("ping", 10)
        server.push("hello")
        assert _say(client, "recv 1") == "timeout"
        assert _connects(h2, two_hosts.bridge_address, server.port, timeout=5)  # other hosts are not affected
        h1.undrop("in", server.port)
        assert _say(client, "recv 30") == "got hello"  # the server's retransmission gets through

        h1.drop("out", server.port)  # now the other way round
        assert _say(client, "send pong") == "sent"
        assert not server.wait_for_line("pong", 1)
        server.push("again")
        assert _say(client, "recv 10") == "got again"
        h1.undrop("out", server.port)
        assert server.wait_for_line("pong", 30)
    finally:
        client.communicate("")


def test_pause_and_resume_a_process_in_a_host(two_hosts: Bed) -> None:
    h1 = two_hosts.hosts[0]
    proc = h1.popen(
        [PY, "-c", "import time; print('up', flush=True); [time.sleep(0.01) for _ in range(20)]; print('done')"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "up\n"
    started = time.monotonic()
    h1.pause(h1.pid_of(proc))
    time.sleep(1)
    assert proc.poll() is None  # stopped: its 0.2 s of work cannot have ended
    h1.resume(h1.pid_of(proc))
    assert proc.communicate(timeout=30)[0] == "done\n"  # nsenter went on too, or this would hang
    assert time.monotonic() - started >= 1


def test_the_delay_proxy_adds_its_delay_each_way(two_hosts: Bed) -> None:
    h1 = two_hosts.hosts[0]
    echo = Server(two_hosts.bridge_address, echo=True)
    try:
        with delay_proxy((two_hosts.bridge_address, echo.port), 25, listen=two_hosts.bridge_address) as proxy:
            rtt = h1.run([PY, "-c", ECHO_RTT, proxy.host, str(proxy.port), "10"], capture_output=True, text=True)
            assert rtt.returncode == 0, rtt.stderr
            assert float(rtt.stdout) >= 0.050  # 2 × 25 ms, at the least
    finally:
        echo.close()


PG_CLIENT = """
import sys, psycopg
with psycopg.connect(sys.argv[1], connect_timeout=10) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS seen (host text PRIMARY KEY, addr text)")
    conn.execute("INSERT INTO seen SELECT %s, host(inet_client_addr()) ON CONFLICT DO NOTHING", (sys.argv[2],))
    conn.commit()
    print(sorted(conn.execute("SELECT host, addr FROM seen").fetchall()))
"""


def test_postgresql_on_the_bridge_is_reached_from_two_hosts(two_hosts: Bed) -> None:
    h1, h2 = two_hosts.hosts
    with cluster(listen=[two_hosts.bridge_address], trust=[f"{two_hosts.bridge_address}/24"]) as pg:
        first = h1.run([PY, "-c", PG_CLIENT, pg.url(), "h1"], capture_output=True, text=True)
        assert first.returncode == 0, first.stderr
        second = h2.run([PY, "-c", PG_CLIENT, pg.url(), "h2"], capture_output=True, text=True)
        assert second.returncode == 0, second.stderr
        assert second.stdout.strip() == str([("h1", h1.address), ("h2", h2.address)])  # over TCP, from each host
        psql = h2.run(["psql", pg.url(), "-XAtc", "SELECT count(*) FROM seen"], capture_output=True, text=True)
        assert (psql.returncode, psql.stdout.strip()) == (0, "2"), psql.stderr


def _netns() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()


def _alive(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return raw[raw.rindex(b")") + 2 :].split()[0] != b"Z"


def test_nothing_is_left_behind_in_any_outcome() -> None:
    kept: list[Bed] = []
    inner: list[int] = []
    with pytest.raises(RuntimeError, match="a scenario failed"), bed(2) as b:
        kept.append(b)
        h1 = b.hosts[0]
        # a daemon that left its nsenter (reparented to the host's init) and one that ignores SIGTERM
        h1.run(["sh", "-c", "sleep 1000 </dev/null >/dev/null 2>&1 &"], check=True)
        stubborn = h1.popen(
            [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(1000)"]
        )
        inner.append(h1.pid_of(stubborn))
        inner.extend(pid for h in b.hosts for pid in [h.init_pid])
        h1.partition()
        h1.drop("in", 5432)
        assert b.leftovers()  # everything is there while the bed is open
        raise RuntimeError("a scenario failed")
    b = kept[0]
    assert b.leftovers() == []
    assert not any(name.startswith(f"cvb{b.subnet}-") for name in _netns())
    assert [pid for pid in inner if _alive(pid)] == []
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert _bed_links(b.subnet, links) == []
    stubborn.wait(timeout=10)  # its nsenter ended with it


def _bed_links(subnet: int, links: str) -> list[str]:
    """The links of bed `subnet` in `ip -o link show` output: its bridge and veths, or a veth's
    namespace (never another bed's whose number starts the same: cvb10 against cvb106br)."""
    return re.findall(rf"\bcvb{subnet}(?:br|h\d+|-h\d+)\b", links)


def test_a_bed_left_open_is_torn_down_at_exit() -> None:
    script = "from tests.harness.nethosts import bed; b = bed(1).__enter__(); print(b.subnet, b.hosts[0].init_pid)"
    done = subprocess.run([PY, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    subnet, init_pid = (int(x) for x in done.stdout.split())
    assert not any(name.startswith(f"cvb{subnet}-") for name in _netns())
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    assert _bed_links(subnet, links) == []
    assert not _alive(init_pid)


def test_two_beds_at_once_do_not_collide() -> None:
    with bed(1) as a, bed(1) as b:
        assert a.subnet != b.subnet and a.bridge != b.bridge
        assert {h.netns for h in a.hosts}.isdisjoint(h.netns for h in b.hosts)
        for one, other in ((a, b), (b, a)):
            s = Server(one.bridge_address)
            try:
                assert _connects(one.hosts[0], one.bridge_address, s.port, timeout=5)
                assert not _connects(other.hosts[0], one.bridge_address, s.port, timeout=1)
            finally:
                s.close()
    assert a.leftovers() == [] and b.leftovers() == []
