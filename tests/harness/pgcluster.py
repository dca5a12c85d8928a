"""A private, throw-away PostgreSQL cluster for tests and benchmarks.

`cluster()` runs initdb (as the `postgres` user when run as root: PostgreSQL refuses to run as
root) into a new temporary directory, starts the server on a free port and makes the role and
database `cv`; it stops the server and removes the directory in every outcome: on leaving the
context, and at exit of the interpreter for a cluster still running then.

Invariants:
- the cluster shares nothing with any other PostgreSQL on the machine: its own directory, port and
  Unix socket directory;
- `stop()` always ends the server: `pg_ctl stop -m fast`, then `-m immediate`, then SIGKILL of the
  postmaster (and of its children, by its process group);
- trust authentication for the addresses given; a password only for a role a test makes with
  `password_role` (scram-sha-256 from every address, for that role alone).

Needs PostgreSQL's server binaries (Debian: postgresql-15 or later) and psql.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path


def bindir() -> Path | None:
    """Where initdb, pg_ctl and postgres are (the newest installed version), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(versions[-1]).parent if versions else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class Cluster:
    """One running private cluster (see `cluster`)."""

    def __init__(self, directory: Path, listen: Sequence[str], trust: Sequence[str], settings: dict[str, str]) -> None:
        binaries = bindir()
        if binaries is None:
            raise RuntimeError("PostgreSQL's server binaries (initdb, pg_ctl) are not installed")
        self.bin = binaries
        self.directory = directory
        self.data = directory / "data"
        self.socket_dir = directory
        self.log = directory / "server.log"
        self.listen = tuple(listen)
        self.port = _free_port(self.listen[0])
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(directory, "postgres", "postgres")
        directory.chmod(0o755)  # psql and clients reach the socket in it
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C", "-N")
        conf = {
            "listen_addresses": ",".join(self.listen),
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            "shared_buffers": "64MB",
            **settings,
        }
        with open(self.data / "postgresql.conf", "a") as f:
            f.writelines(f"{key} = '{value}'\n" for key, value in conf.items())
        hba = ["local all all trust"] + [f"host all all {cidr} trust" for cidr in trust]
        (self.data / "pg_hba.conf").write_text("\n".join(hba) + "\n")
        self.start()
        try:
            self.sql("CREATE ROLE cv LOGIN")
            self.sql("CREATE DATABASE cv OWNER cv")
        except BaseException:
            self.stop()
            raise

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / program), *args]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd="/")
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()
            raise RuntimeError(f"{program} {' '.join(args)} failed (exit {done.returncode}): {said}")
        return done

    def url(self, db: str = "cv") -> str:
        """A libpq URL for role cv on database `db`, over TCP to the first listen address."""
        return f"postgresql://cv@{self.listen[0]}:{self.port}/{db}"

    def sql(self, statement: str, db: str = "postgres") -> str:
        """Run `statement` as the superuser (over the Unix socket); its output, unaligned."""
        psql = self.bin / "psql" if (self.bin / "psql").exists() else Path(shutil.which("psql") or "psql")
        r = subprocess.run(
            [str(psql), "-h", str(self.socket_dir), "-p", str(self.port), "-U", "postgres", "-d", db]
            + ["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", statement],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"psql failed ({r.returncode}) on {statement!r}: {r.stderr.strip()}")
        return r.stdout

    def create_database(self, name: str, owner: str = "cv") -> None:
        """A new database (faster than `sql`: no psql process)."""
        import psycopg

        with psycopg.connect(
            host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}" OWNER "{owner}"')

    def password_role(self, name: str, password: str) -> None:
        """A role `name` that logs in with `password` only (scram-sha-256, from every address: its
        pg_hba.conf line goes first), and owns a database `name`."""
        self.sql(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE \"{name}\" LOGIN PASSWORD '{password}'")
        self.create_database(name, owner=name)
        hba = self.data / "pg_hba.conf"
        hba.write_text(f"host all {name} all scram-sha-256\n" + hba.read_text())
        loaded = self.sql("SELECT pg_conf_load_time()")
        self.sql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 30  # the postmaster reloads on its own time; new sessions see it then
        while self.sql("SELECT pg_conf_load_time()") == loaded:
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not reload pg_hba.conf within 30 s")
            time.sleep(0.05)

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start", timeout=90)

    def running(self) -> bool:
        return self._postmaster() is not None

    def _postmaster(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def stop(self) -> None:
        """Stop the server, however it is: fast, then immediate, then SIGKILL."""
        for mode in ("fast", "immediate"):
            if not self.running():
                return
            with contextlib.suppress(subprocess.SubprocessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "20", "stop", timeout=30)
        pid = self._postmaster()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while self._postmaster() is not None and time.monotonic() < deadline:
                time.sleep(0.05)

    def restart(self) -> None:
        """A fast shutdown and a start: every session is ended, the data stays."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-m", "fast", "-w", "-t", "60", "restart")

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


_RUNNING: list[Cluster] = []


@atexit.register
def _close_all() -> None:
    while _RUNNING:
        _RUNNING.pop().close()


@contextlib.contextmanager
def cluster(
    listen: Sequence[str] = ("127.0.0.1",),
    trust: Sequence[str] = ("127.0.0.1/32",),
    settings: dict[str, str] | None = None,
    parent: str | None = None,
) -> Iterator[Cluster]:
    """A new cluster listening on `listen` (TCP), trusting clients from the `trust` CIDRs (and the
    Unix socket), with extra postgresql.conf `settings`, in a new directory under `parent` (the
    system's temporary directory by default); stopped and removed in every outcome."""
    directory = Path(tempfile.mkdtemp(prefix="cv-pg-", dir=parent))
    try:
        c = Cluster(directory, listen, trust, settings or {})
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    _RUNNING.append(c)
    try:
        yield c
    finally:
        with contextlib.suppress(ValueError):
            _RUNNING.remove(c)
        c.close()
