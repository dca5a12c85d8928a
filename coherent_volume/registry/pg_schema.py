"""The schema of a PostgreSQL registry: the migrations this release ships (pg/*.sql), applying
them, and the check that a database has the schema this release reads and writes."""

from __future__ import annotations

import socket
import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import RegistryError
from . import pg_connections
from .pg_connections import LOCK_CLASS, _connect, _psycopg, _registry_error
from .pg_location import Location, _check_url

if TYPE_CHECKING:
    import psycopg


def migrations() -> list[tuple[int, str]]:
    """(number, SQL) of every schema migration this release ships, in order."""
    found = []
    for entry in resources.files(__package__).joinpath("pg").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text()))
    return sorted(found)


SCHEMA_VERSION = migrations()[-1][0]
"""The schema this release reads and writes (the last migration's number)."""


def _schema_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('cv_schema') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM cv_schema").fetchone()
    return int(row[0]) if row else 0


def _newer(found: int, where: str) -> RegistryError:
    return RegistryError(
        f"the registry at {where} has schema version {found}; this coherent-volume knows versions up to "
        f"{SCHEMA_VERSION}: upgrade coherent-volume (nothing was changed)"
    )


def migrate(url: str) -> tuple[int, int]:
    """Bring the database at `url` to SCHEMA_VERSION: every missing migration in one transaction,
    under an advisory lock (hosts migrating together do not race). (version before, after)."""
    _check_url(url)
    location = Location(url, "")
    with _connect(location, time.monotonic() + pg_connections.CONNECT_WAIT) as conn:
        try:
            return _migrate(conn, location.server)
        except _psycopg().Error as e:
            raise _registry_error(e, location) from e


def _migrate(conn: psycopg.Connection[Any], where: str) -> tuple[int, int]:
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (LOCK_CLASS,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS cv_schema (version int PRIMARY KEY, "
            "applied_at timestamptz NOT NULL DEFAULT now(), applied_by text)"
        )
        before = _schema_version(conn)
        if before > SCHEMA_VERSION:
            raise _newer(before, where)
        for number, sql in migrations():
            if number > before:
                conn.execute(sql.encode())
                conn.execute(
                    "INSERT INTO cv_schema (version, applied_by) VALUES (%s, %s)",
                    (number, f"coherent-volume on {socket.gethostname()}"),
                )
        conn.execute("COMMIT")
    except BaseException:
        if not conn.broken:
            conn.execute("ROLLBACK")
        raise
    return before, SCHEMA_VERSION


def _check_schema(conn: psycopg.Connection[Any], location: Location) -> None:
    found = _schema_version(conn)
    if found > SCHEMA_VERSION:
        raise _newer(found, location.server)
    if found < SCHEMA_VERSION:
        raise RegistryError(
            f"the registry at {location.server} has schema version {found}; this coherent-volume needs "
            f"{SCHEMA_VERSION}: run `coherent-volume migrate --registry {location.url}` (nothing was changed)"
        )
