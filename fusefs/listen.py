"""Other hosts' commits, brought into a mounted working copy of a PostgreSQL volume as they land.

Every change of a managed path's current record notifies the volume's channel at its COMMIT
(migration `0004_notify.sql`: `C<path>`, `G<path>` for a path left with no file, `*` for a path too
long for a payload). The listener holds a connection of its own LISTENing there; its socket is
waited on by the trio loop, so nothing blocks the loop. Each notified path is settled as the
watcher settles a foreign change (`watcher._settle`): the core brings the working copy up to date
(`VolumeCore.version`, the rule `_sync_copy` applies at every access: this module never writes a
file), then the kernel's cached attributes and data of the path, and its entry if the name is
gone, are dropped.

Invariants:
- a notification is a hint, never the truth: what is installed is what the core finds current;
- notifications are missed only while no LISTEN is in place: after every connection's LISTEN,
  the whole working copy is resynced (`VolumeCore.scan`) and every inode the kernel holds is
  dropped, so no commit stays unseen past the next successful connection;
- while it listens, the working copy is seen (its last_seen bumped every SEEN_EVERY s), so a mounted
  copy with no commits of its own is never taken for one that is gone (`coherent-volume forget`);
- a lost connection (the server ended it, or the keepalives found the server gone) is replaced,
  retried with back-off doubling from RECONNECT_DELAY to MAX_RECONNECT_DELAY; the mount serves
  on meanwhile (an open still reaches the daemon, whose core asks the registry);
- a connection that stops answering is found lost too: one quiet for SEEN_EVERY s is checked with
  a round trip (`SELECT 1`), which fails after ANSWER_WAIT s with no answer (the connection is then
  closed), so a stopped or stuck session misses notifications for at most SEEN_EVERY + ANSWER_WAIT
  s (55 s as shipped) before the reconnect and its resync bring in what it missed. Notifications
  arriving during the check are kept by psycopg and settled next.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import trio

from coherent_volume.core import VolumeCore
from coherent_volume.errors import CoherenceError
from coherent_volume.registry import pg_connections, pg_hosts
from coherent_volume.registry.pg_connections import _connect, _first_line, _psycopg, _registry_error
from coherent_volume.registry.postgresql import PostgresRegistry

from .inodes import InodeTable
from .watcher import OwnChanges, _drop_cached, _settle_all

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger("coherent_volume.fuse")

RECONNECT_DELAY = 0.1
MAX_RECONNECT_DELAY = 5.0
"""Seconds before connecting again after a failed or lost connection, doubling while it keeps failing."""

RESYNC_ALL = "*"
"""The payload that names no path: resync everything."""


def channel(registry: PostgresRegistry) -> str:
    """The volume's notification channel, as 0004_notify.sql names it (a plain identifier)."""
    return f"cv_{registry.volume_id.hex}"


async def listen(
    core: VolumeCore,
    registry: PostgresRegistry,
    inodes: InodeTable,
    own: OwnChanges,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run until cancelled: keep a LISTEN connection to `registry` and settle every path other
    processes commit. Reports started after the first attempt to connect and resync, whether it
    succeeded (the working copy is then current as of that instant) or failed (logged; retried)."""
    delay = RECONNECT_DELAY
    first = True
    while True:
        conn: psycopg.Connection[Any] | None = None
        try:
            conn = await trio.to_thread.run_sync(_connect_listening, registry, abandon_on_cancel=True)
            await trio.to_thread.run_sync(_resync, core, inodes, not first)
            log.info("listening on %s for commits: the working copy is in step", channel(registry))
            delay = RECONNECT_DELAY
            if first:
                task_status.started()
                first = False
            lost = await _serve(conn, core, registry, inodes, own)
            server = registry.location.server
            log.warning("the listener's connection to the registry at %s was lost (%s); connecting again", server, lost)
        except CoherenceError as e:  # the registry unreachable, busy or failing: tried again
            log.warning("the listener could not connect and resync (%s); trying again in %.1f s", e, delay)
        except OSError as e:  # a file of the working copy the resync could not install
            log.warning("the listener's resync failed (%s); trying again in %.1f s", e, delay)
        except Exception:  # never let a bug end the listening (the mount would go stale): log it as one
            log.exception("internal error in the listener; trying again in %.1f s", delay)
        finally:
            if conn is not None:
                conn.close()
        if first:
            task_status.started()
            first = False
        await trio.sleep(delay)
        delay = min(delay * 2, MAX_RECONNECT_DELAY)


def _connect_listening(registry: PostgresRegistry) -> psycopg.Connection[Any]:
    """A new connection LISTENing on the volume's channel (RegistryError if it cannot be had)."""
    conn = _connect(registry.location, time.monotonic() + pg_connections.CONNECT_WAIT)
    try:
        conn.execute(f"LISTEN {channel(registry)}")
    except _psycopg().Error as e:
        conn.close()
        raise _registry_error(e, registry.location) from e
    return conn


def _resync(core: VolumeCore, inodes: InodeTable, drop: bool) -> None:
    """Bring the whole working copy in step with the registry (notifications may have been missed);
    with `drop`, then drop the kernel's cached attributes and data of every inode it holds."""
    for rel, why in core.scan():
        log.warning("could not check %s while resyncing with the registry: %s", rel, why)
    if drop:
        _drop_cached(inodes)


async def _serve(
    conn: psycopg.Connection[Any], core: VolumeCore, registry: PostgresRegistry, inodes: InodeTable, own: OwnChanges
) -> str:
    """Settle what each notification on `conn` names, until the connection is lost: why it was.
    Between notifications, the copy is seen every SEEN_EVERY s (`PostgresRegistry.seen`), and a
    connection quiet that long is checked with a round trip of its own, bounded as every round
    trip is (ANSWER_WAIT): its session's server process stopped or stuck, or a path that holds what
    it sends, sends nothing and keeps the connection, so nothing else would ever find it lost."""
    psycopg = _psycopg()
    fd = conn.fileno()
    while True:
        try:
            payloads = [n.payload for n in conn.notifies(timeout=0)]  # what arrived: never waits
        except psycopg.Error as e:
            return _first_line(e)
        if not payloads:
            with trio.move_on_after(pg_hosts.SEEN_EVERY) as quiet:
                await trio.lowlevel.wait_readable(fd)
            if quiet.cancelled_caught:
                try:  # a session whose server process stopped sends nothing and is never found lost by itself
                    await trio.to_thread.run_sync(conn.execute, "SELECT 1")
                except psycopg.Error as e:
                    why = _registry_error(e, registry.location)
                    return f"it was quiet for {pg_hosts.SEEN_EVERY:g} s and did not answer a check: {why}"
            await trio.to_thread.run_sync(registry.seen)
            continue
        if RESYNC_ALL in payloads:
            await trio.to_thread.run_sync(_resync, core, inodes, True)
            continue
        changes = {payload[1:]: payload[0] == "G" for payload in payloads}
        own.note(*changes)  # the core's installs echo through inotify: the watcher leaves them be
        await trio.to_thread.run_sync(_settle_all, core, inodes, list(changes.items()))
