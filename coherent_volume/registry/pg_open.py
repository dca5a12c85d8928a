"""Opening a PostgreSQL volume: the one a root records, or (at `init`) the volume of a name,
created if new (and the schema with it, in an empty database), with the root registered as a
working copy of it on this host and boot."""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any

from ..errors import OtherGlobs, RegistryError, VolumeConfigError
from ..globs import ManagedGlobs
from ..paths import REGISTRY_DIR
from . import DB_FILE, pg_connections
from .pg_connections import _connect, _first_line, _psycopg, _registry_error
from .pg_hosts import not_registered
from .pg_location import Location, _record_location, recorded
from .pg_registry import PostgresRegistry
from .pg_schema import _check_schema, _migrate, _schema_version
from .replica import DB_FILE as REPLICA_FILE
from .replica import Replica

if TYPE_CHECKING:
    import psycopg


def open_postgres(
    directory: str, root: str, globs: ManagedGlobs | None, url: str | None, volume: str | None
) -> PostgresRegistry:
    """The PostgreSQL registry of the root whose registry directory is `directory`: the one it
    records, or (given `url` and `volume`: `init`) the volume of that name, created if new (and the
    schema with it, in an empty database), with the root registered as a working copy of it (one
    that joined, when the volume existed already). Refuses (VolumeConfigError) a root whose working
    copy is registered to another boot, unless `init` takes it over, and a copy of a working copy's
    directory (it carries the working copy's registration along), which `init` registers as a
    working copy of its own, and a working copy whose replica.db cannot be read (`Replica.damage`);
    a refusal changes nothing."""
    found = recorded(directory)
    if url is not None:
        location = Location.of(url, volume)
        if found is not None and found[0] != location:
            raise VolumeConfigError(
                f"{root!r} already uses {found[0].describe()} ({found[0].url}); a root has one registry"
            )
        if os.path.exists(os.path.join(directory, DB_FILE)):
            raise VolumeConfigError(f"{root!r} already has a SQLite registry; a root has one registry")
    elif found is not None:
        location = found[0]
    else:
        raise RegistryError(f"no PostgreSQL registry is recorded in {directory!r}")
    replica = Replica(directory)
    damage = replica.damage()
    if damage is not None:
        raise _damaged_replica(root, directory, location, damage)
    replica_id = replica.recorded_id()
    copied = None if replica_id is None else replica.identity_problem()
    if copied is not None:
        if url is None:
            raise VolumeConfigError(
                f"{root!r} records {location.describe()}, but {copied}. Run `coherent-volume init {root} "
                f"--registry {location.url} --volume {location.volume}` to make it a working copy of its own. "
                "Nothing was changed"
            )
        replica_id = None  # `init` registers the copy as a working copy of its own
    psycopg = _psycopg()
    new = (uuid.uuid4(), uuid.uuid4())  # the volume and the working copy `init` may create
    with _connect(location, time.monotonic() + pg_connections.CONNECT_WAIT) as conn:
        try:
            if url is not None and _schema_version(conn) == 0:
                _migrate(conn, location.server)
            _check_schema(conn, location)
            if url is not None:
                with conn.transaction():  # a refusal leaves no volume and no working copy behind
                    volume_id, stored, created = _create_volume(conn, location, globs, new[0])
                    if found is not None and found[1] != volume_id:
                        raise _not_created_with(location, found[1], volume_id)
                    if globs is not None and not created and found is None:
                        raise _exists(location, stored, root)
                    _check_globs(globs, stored)
                    registered = _register(conn, volume_id, replica_id, root, new[1])
            else:
                assert found is not None
                volume_id, stored = _recorded_volume(conn, location, found[1])
                _check_globs(globs, stored)
                _check_replica(conn, location, volume_id, replica_id, root)
                registered = None
        except psycopg.Error as e:
            landed = _landed(location, new[1]) if url is not None and isinstance(e, psycopg.OperationalError) else None
            if landed is None:
                raise _registry_error(e, location) from e
            volume_id, stored, registered = landed
    if found is None:
        _record_location(directory, location, volume_id)
    if registered is not None and registered != replica_id:
        replica.registered(registered)
    return PostgresRegistry(location, volume_id, stored, replica)


def _damaged_replica(root: str, directory: str, location: Location, damage: str) -> RegistryError:
    """A working copy whose state file (replica.db) cannot be used: refused, nothing changed; the
    registry keeps every version, so the copy joins again once the file is moved aside."""
    state = os.path.join(directory, REPLICA_FILE)
    return RegistryError(
        f"the working copy {root!r} of {location.describe()} cannot be used: its state file {state!r} (which "
        f"version of each file this copy holds) cannot be read: {damage}. Nothing was changed, that file "
        f"included. The registry keeps every version: move the file aside with its -wal and -shm files, if any "
        f"(`mv {shlex.quote(state)} {shlex.quote(state + '.damaged')}`), then run `coherent-volume init {root} "
        f"--registry {location.url} --volume {location.volume}` to join this root as a working copy again (a "
        "managed file here that differs from the volume's current version is then recorded as a change of this "
        "host, the current version kept in history)"
    )


def _check_globs(globs: ManagedGlobs | None, stored: ManagedGlobs) -> None:
    if globs is not None and globs != stored:
        raise OtherGlobs(stored.patterns, globs.patterns)


def _register(
    conn: psycopg.Connection[Any], volume_id: uuid.UUID, replica_id: uuid.UUID | None, root: str, new: uuid.UUID
) -> uuid.UUID:
    """Register the root as a working copy on this host and boot (taking over its registration
    when it has one: `init` again after a reboot or a move; where it records none, the one of this
    root on this host and boot, which a root whose `.coherent` was lost or an `init` whose reply
    was lost left), else as `new`; its replica id."""
    here = (socket.gethostname(), boot_id(), root)
    if replica_id is not None:
        row = conn.execute(
            "UPDATE cv_replicas SET hostname = %s, boot_id = %s, root = %s, last_seen = now() "
            "WHERE id = %s AND volume = %s RETURNING id",
            (*here, replica_id, volume_id),
        ).fetchone()
        if row is not None:
            return replica_id
    else:
        row = conn.execute(
            "UPDATE cv_replicas SET last_seen = now() WHERE id = (SELECT id FROM cv_replicas WHERE volume = %s "
            "AND hostname = %s AND boot_id = %s AND root = %s ORDER BY id LIMIT 1) RETURNING id",
            (volume_id, *here),
        ).fetchone()
        if row is not None:
            return row[0]
    conn.execute(
        "INSERT INTO cv_replicas (id, volume, hostname, boot_id, root) VALUES (%s, %s, %s, %s, %s)",
        (new, volume_id, *here),
    )
    return new


def _landed(location: Location, replica_id: uuid.UUID) -> tuple[uuid.UUID, ManagedGlobs, uuid.UUID] | None:
    """After `init`'s transaction lost its connection (at its COMMIT, maybe after the server
    committed it): whether it landed, told by the working copy it registers as `replica_id`
    (volume id, globs, replica id), asked on a new connection; None where it did not. Where that
    cannot be asked either, RegistryError saying the outcome is unknown and how to settle it."""
    try:
        with _connect(location, time.monotonic() + pg_connections.CONNECT_WAIT) as conn:
            row = conn.execute(
                "SELECT v.id, v.globs FROM cv_replicas r JOIN cv_volumes v ON v.id = r.volume WHERE r.id = %s",
                (replica_id,),
            ).fetchone()
    except (RegistryError, _psycopg().Error) as e:
        raise RegistryError(
            f"{location.describe()}: the connection was lost at the end of `init` and the registry could not be "
            f"asked since ({_first_line(e)}), so whether the volume was created or joined is unknown. Run the same "
            "`init` again once the registry answers: it creates or joins it (if it says the volume exists already, "
            "this `init` created it: run it without --managed to join it)"
        ) from e
    return None if row is None else (row[0], ManagedGlobs.of(row[1]), replica_id)


def _check_replica(
    conn: psycopg.Connection[Any], location: Location, volume_id: uuid.UUID, replica_id: uuid.UUID | None, root: str
) -> None:
    """VolumeConfigError unless the root is a working copy registered to this boot of this kernel."""
    again = f"`coherent-volume init {root} --registry {location.url} --volume {location.volume}`"
    if replica_id is None:
        raise VolumeConfigError(
            f"{root!r} records {location.describe()} but not which versions its files are (its "
            f"{REGISTRY_DIR}/{REPLICA_FILE} is missing): run {again} to make it a working copy again. "
            "Nothing was changed"
        )
    row = conn.execute(
        "SELECT root, hostname, boot_id FROM cv_replicas WHERE id = %s AND volume = %s", (replica_id, volume_id)
    ).fetchone()
    if row is None:
        raise not_registered(root, location)
    stored_root, hostname, boot = row
    if boot == boot_id():
        try:
            seen = conn.execute("UPDATE cv_replicas SET last_seen = now() WHERE id = %s RETURNING id", (replica_id,))
        except _psycopg().errors.ReadOnlySqlTransaction:
            return  # a read-only database: what can be read is still served
        if seen.fetchone() is None:  # forgotten since it was read
            raise not_registered(root, location)
        return
    raise VolumeConfigError(
        f"the working copy {root!r} of {location.describe()} is registered to {stored_root!r} on host "
        f"{hostname!r} (boot {boot}); this is host {socket.gethostname()!r} (boot {boot_id()}). A working copy "
        "serves one kernel: a root shared across hosts (a network file system) is refused. If this host "
        f"rebooted or the disk moved here, run {again} to take the working copy over. Nothing was changed"
    )


def _create_volume(
    conn: psycopg.Connection[Any], location: Location, globs: ManagedGlobs | None, new: uuid.UUID
) -> tuple[uuid.UUID, ManagedGlobs, bool]:
    """The volume named by `location` (created with `globs` as `new` if there is none): (id, globs,
    whether created)."""
    if globs is not None:
        made = conn.execute(
            "INSERT INTO cv_volumes (id, name, globs) VALUES (%s, %s, %s) ON CONFLICT (name) DO NOTHING RETURNING id",
            (new, location.volume, json.dumps(list(globs.patterns))),
        ).fetchone()
        if made is not None:
            return made[0], globs, True
    row = conn.execute("SELECT id, globs FROM cv_volumes WHERE name = %s", (location.volume,)).fetchone()
    if row is None:
        raise VolumeConfigError(f"{location.describe()} does not exist: create it with managed globs")
    return row[0], ManagedGlobs.of(row[1]), False


def _exists(location: Location, stored: ManagedGlobs, root: str) -> VolumeConfigError:
    """`init` with managed globs creates a volume: a name that exists already is someone's volume,
    never joined by mistake (its files would be clobbered by this root's)."""
    return VolumeConfigError(
        f"{location.describe()} exists already (it manages {list(stored.patterns)}): `init` with managed globs "
        f"creates a volume. To join that volume as a working copy, run `coherent-volume init {root} --registry "
        f"{location.url} --volume {location.volume}` (without --managed); to create a volume of your own, choose "
        "another --volume name. Nothing was changed"
    )


def _recorded_volume(
    conn: psycopg.Connection[Any], location: Location, volume_id: uuid.UUID
) -> tuple[uuid.UUID, ManagedGlobs]:
    row = conn.execute("SELECT id, globs FROM cv_volumes WHERE name = %s", (location.volume,)).fetchone()
    if row is None or row[0] != volume_id:
        raise _not_created_with(location, volume_id, None if row is None else row[0])
    return row[0], ManagedGlobs.of(row[1])


def _not_created_with(location: Location, recorded_id: uuid.UUID, found: uuid.UUID | None) -> RegistryError:
    return RegistryError(
        f"{location.describe()} is not the volume this root was created with (id {recorded_id}): "
        + ("it no longer exists" if found is None else f"that name now names volume {found}")
        + "; nothing was changed"
    )


def boot_id() -> str:
    """The boot of this host's kernel (what `cv_replicas.boot_id` records)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown-boot"
