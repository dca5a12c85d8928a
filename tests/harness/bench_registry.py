"""Registry benchmark: commits/s and tracked reads/s, SQLite against PostgreSQL, side by side.

Subjects, each a volume of its own made through `coherent-volume init`: SQLite (the default),
PostgreSQL on loopback, and PostgreSQL through the delay proxy at 1 ms and 5 ms of added round
trip (a private cluster from tests/harness/pgcluster.py, stopped in every outcome). For each
number of concurrent writers (1, 4, 16: one process and one agent each, each on a file of its
own, so nothing is refused) every subject runs a commit phase (whole-file writes of 4 KiB) and a
tracked-read phase (reads of the unchanged file), all processes starting together; the figure is
the total over the processes. Rounds alternate the subjects and the median round is reported, so
drift of this shared machine hits every subject alike; the ratio column is against SQLite with
the same writers, in the same round. With `--copies`, every PostgreSQL writer works in a working
copy of its own (joined with `init`, as another host would), so what is measured is the database's
locking alone, not one working copy's commit lock.

Before the table, the round trips of one commit and of one tracked read of an unchanged file on
PostgreSQL, counted exactly by a proxy (`Turns`: a round trip is the client speaking after the
server answered, on one connection), and the write transactions one commit makes (each flushes
the WAL once at its COMMIT), counted in `cv_commits`.

    .venv/bin/python scripts/bench_registry.py [--rounds 3] [--seconds 3]
    .venv/bin/python scripts/bench_registry.py --quick      (1 round, 0.5 s, 1 and 4 writers, 1 ms only)
    .venv/bin/python scripts/bench_registry.py --copies     (a working copy per PostgreSQL writer)
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import CLI, REPO, child

SIZE = 4096


@dataclass(frozen=True)
class Subject:
    name: str
    root: str
    copies: tuple[str, ...] = ()
    """A working copy per writer (`--copies`); empty: every writer in `root`."""

    def copy(self, writer: int) -> str:
        return self.copies[writer] if self.copies else self.root


class Turns:
    """A TCP proxy to `port` on 127.0.0.1 that counts round trips: on each connection, every time
    the client sends after the server has sent (or first) is one. Bytes pass unchanged; a client
    that sends several statements before it waits (a pipeline) makes one."""

    def __init__(self, port: int) -> None:
        self.count = 0
        self._upstream = port
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._upstream))
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            last: list[str] = [""]
            threading.Thread(target=self._pump, args=(client, upstream, last, "client"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, last, "server"), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, last: list[str], side: str) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                break
            if not data:
                break
            with self._lock:  # the server answers only what reached it: this order is the wire's
                if side == "client" and last[0] != "client":
                    self.count += 1
                last[0] = side
            try:
                sink.sendall(data)
            except OSError:
                break
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()


@contextlib.contextmanager
def turns(port: int) -> Iterator[Turns]:
    proxy = Turns(port)
    try:
        yield proxy
    finally:
        proxy.close()


@dataclass(frozen=True)
class Counted:
    """Round trips of one commit and of one tracked read of an unchanged file, and the write
    transactions of one commit (each flushes the WAL once, at its COMMIT)."""

    commit: float
    read: float
    transactions: float


def count(turns: Turns, committed: Callable[[], int], root: str, ops: int = 10) -> Counted:
    """Counted per operation over `ops` whole-file writes (then tracked reads) of one agent on the
    volume at `root`, whose registry is reached through `turns`; `committed()` counts the
    database's write transactions. Warmed up first: connections made, statements prepared. What the
    commits installed is reported after the count (`pg_hosts.REPORT_AFTER` is held off meanwhile:
    a report is no part of a commit, one goes for all the commits of REPORT_AFTER s), and so is the
    bump of last_seen a process makes every SEEN_EVERY s (a slow machine's count crossed one)."""
    from coherent_volume.registry import pg_hosts

    path = "plans/counted.md"
    report_after, pg_hosts.REPORT_AFTER = pg_hosts.REPORT_AFTER, 3600.0
    seen_every, pg_hosts.SEEN_EVERY = pg_hosts.SEEN_EVERY, 3600.0  # nor a bump of last_seen (every 10 s)
    try:
        return _count(turns, committed, root, ops, path)
    finally:
        pg_hosts.REPORT_AFTER, pg_hosts.SEEN_EVERY = report_after, seen_every


def _count(turns: Turns, committed: Callable[[], int], root: str, ops: int, path: str) -> Counted:
    from coherent_volume import CoherentVolume

    with CoherentVolume(root, agent="counter") as vol:
        for n in range(8):  # psycopg prepares a statement at its 5th run, with a round trip of its own
            vol.write(path, n.to_bytes(8, "big") * (SIZE // 8))
            vol.read(path)
            vol.read(path)
        turns_before, tx_before = turns.count, committed()
        for n in range(ops):
            vol.write(path, (n + 100).to_bytes(8, "big") * (SIZE // 8))
        commit, transactions = (turns.count - turns_before) / ops, (committed() - tx_before) / ops
        vol.read(path)  # the first read after a commit may complete what the commit left (its intent)
        turns_before = turns.count
        for _ in range(ops):
            vol.read(path)
        read = (turns.count - turns_before) / ops
    return Counted(commit, read, transactions)


def _init(root: str, registry: str | None, volume: str) -> None:
    extra = [] if registry is None else ["--registry", registry, "--volume", volume]
    subprocess.run([CLI, "init", root, "--managed", "plans/**", *extra], check=True, capture_output=True, text=True)


def _joined(subject: Subject, url: str, volume: str, writers: int) -> Subject:
    """`subject` with `writers` working copies of its volume joined beside its root, one per writer."""
    copies = tuple(f"{subject.root}-copy{i}" for i in range(writers))
    for root in copies:
        subprocess.run([CLI, "init", root, "--registry", url, "--volume", volume], check=True, capture_output=True)
    return Subject(f"{subject.name}, copies", subject.root, copies)


def measure(subject: Subject, writers: int, seconds: float) -> tuple[float, float]:
    """(commits/s, tracked reads/s) of `writers` processes together on `subject`."""
    procs = [
        subprocess.Popen(
            child("bench_registry", "worker", subject.copy(i), str(i), str(seconds)),
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        for i in range(writers)
    ]
    try:
        totals = []
        for _phase in ("commits", "reads"):
            for p in procs:  # every process is set up (volume open, file written) before any starts
                assert p.stdout is not None and p.stdout.readline() == "ready\n", f"a worker on {subject.name} failed"
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
            counts = [int(p.stdout.readline()) for p in procs if p.stdout is not None]
            totals.append(sum(counts) / seconds)
        return totals[0], totals[1]
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.communicate(timeout=60)
            if p.returncode is None:
                p.kill()


def worker(root: str, index: int, seconds: float) -> None:
    """One agent: commits its own file for `seconds`, then reads it for `seconds`, each on "go"."""
    from coherent_volume import CoherentVolume

    path = f"plans/w{index}.md"
    with CoherentVolume(root, agent=f"writer-{index}") as vol:
        vol.write(path, b"\0" * SIZE)
        for op in (lambda n: vol.write(path, n.to_bytes(8, "big") * (SIZE // 8)), lambda n: vol.read(path)):
            print("ready", flush=True)
            sys.stdin.readline()
            n = 0
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                op(n)
                n += 1
            print(n, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--copies", action="store_true", help="a working copy per PostgreSQL writer")
    args = parser.parse_args()
    rounds, seconds = (1, 0.5) if args.quick else (args.rounds, args.seconds)
    writer_counts = (1, 4) if args.quick else (1, 4, 16)
    rtts_ms = (1.0,) if args.quick else (1.0, 5.0)

    from .delayproxy import delay_proxy
    from .pgcluster import cluster

    base = Path(tempfile.mkdtemp(prefix="cv-bench-registry-"))
    try:
        with contextlib.ExitStack() as stack:
            pg = stack.enter_context(cluster())
            subjects = [Subject("SQLite", str(base / "sqlite")), Subject("PostgreSQL loopback", str(base / "pg"))]
            _init(subjects[0].root, None, "")
            _init(subjects[1].root, pg.url(), "loopback")
            if args.copies:
                subjects[1] = _joined(subjects[1], pg.url(), "loopback", max(writer_counts))
            counter = stack.enter_context(turns(pg.port))
            _init(str(base / "counted"), f"postgresql://cv@127.0.0.1:{counter.port}/cv", "counted")
            counted = count(
                counter, lambda: int(pg.sql("SELECT count(*) FROM cv_commits", db="cv")), str(base / "counted")
            )
            for rtt in rtts_ms:
                proxy = stack.enter_context(delay_proxy(("127.0.0.1", pg.port), rtt / 2))
                s = Subject(f"PostgreSQL +{rtt:g} ms RTT", str(base / f"pg-{rtt:g}ms"))
                url = f"postgresql://cv@{proxy.host}:{proxy.port}/cv"
                _init(s.root, url, f"rtt{rtt:g}")
                subjects.append(_joined(s, url, f"rtt{rtt:g}", max(writer_counts)) if args.copies else s)
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}
            for r in range(rounds):
                for n in writer_counts:
                    order = subjects if r % 2 == 0 else subjects[::-1]
                    for s in order:
                        results.setdefault((s.name, n), []).append(measure(s, n, seconds))
                print(f"round {r + 1} of {rounds} done", file=sys.stderr)
        report_counted(counted)
        report(subjects, writer_counts, results, rounds, seconds)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report_counted(counted: Counted) -> None:
    print("PostgreSQL round trips (counted on the wire), per operation of one agent:")
    print(f"  commit of a 4 KiB file: {counted.commit:g} round trip(s), {counted.transactions:g} write transaction(s)")
    from coherent_volume.registry.pg_hosts import REPORT_AFTER

    print(
        f"    (what a working copy installed is reported after: one round trip for its commits of {REPORT_AFTER:g} s)"
    )
    print(f"  tracked read of an unchanged file: {counted.read:g} round trip(s)")


def report(
    subjects: list[Subject],
    writer_counts: tuple[int, ...],
    results: dict[tuple[str, int], list[tuple[float, float]]],
    rounds: int,
    seconds: float,
) -> None:
    print(f"commits/s and tracked reads/s, all writers together; median of {rounds} round(s) of {seconds:g} s")
    print(f"{'subject':<36}{'writers':>8}{'commits/s':>12}{'× SQLite':>10}{'reads/s':>12}{'× SQLite':>10}")
    for n in writer_counts:
        base = results[("SQLite", n)]
        for s in subjects:
            runs = results[(s.name, n)]
            commits = statistics.median(c for c, _ in runs)
            reads = statistics.median(r for _, r in runs)
            ratio_c = statistics.median(c / b[0] for (c, _), b in zip(runs, base, strict=True) if b[0])
            ratio_r = statistics.median(r / b[1] for (_, r), b in zip(runs, base, strict=True) if b[1])
            print(f"{s.name:<36}{n:>8}{commits:>12,.0f}{ratio_c:>10.3f}{reads:>12,.0f}{ratio_r:>10.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    else:
        main()
