"""The working copies of a PostgreSQL volume as the registry knows them: what each copy reports
about itself (the versions it holds, when it was last seen), and how far behind each one is
(`coherent-volume status ROOT --hosts`).

Invariants:
- a copy reports that it holds a version only once its disk does (its Replica recorded it), and
  only under its working copy's lock (the commit lock, `Replica.locked`), so reports reach the
  registry in the order the copy changed; a report that fails stays pending in the Replica and goes
  with the next one. A copy never reports for another;
- a report is never part of a write transaction (a report the server refuses must fail nothing): it
  goes on a round trip of its own, at most REPORT_AFTER s after the release of a commit lock that
  left something to report, one for every such release in that time (`PostgresRegistry._report_now`);
  `last_seen` of a process that holds no commit lock (it only registers views) goes at most every
  SEEN_EVERY seconds. A report's commit does not wait for a WAL flush (synchronous_commit off for
  it): a report lost by a crash of the server makes the copy look behind on those paths (until it
  next installs them), never current;
- "behind" is read in one statement: a path is behind in a copy when the copy's reported version
  is not the current one, except a deleted path the copy never held; `last_seen` and ages are on
  the database's clock, commit times on the committing host's (`time.time()` there);
- a registration is removed only by `forget`, and only once unseen for FORGET_AFTER on the
  database's clock (the copy's processes bump last_seen while they work): a forgotten copy's next
  open fails closed until `init` registers it again; nothing of its disk is lost (what changed there
  meanwhile is a foreign write, recorded as such).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import VolumeConfigError
from .pg_location import Location
from .replica import Replica

if TYPE_CHECKING:
    import psycopg

SEEN_EVERY = 10.0
"""Seconds between two bumps of a copy's last_seen by one process (opening the volume bumps it too)."""
LAST_REPORT_WAIT = 5.0
"""Seconds a closing process waits for its last report (a server that stopped answering must not
hold its exit); one not sent stays pending in the working copy, for its next process to send."""

REPORT_AFTER = 0.5
"""Seconds from the release of a commit lock that left something to report (a commit's install) to
the report: a commit's round trips stay its own, and the commits of a busy copy in that time share
one report."""

FORGET_AFTER = 3600.0
"""Seconds a working copy must have been unseen (on the database's clock) before `forget` removes it."""

_ASYNC = "SELECT set_config('synchronous_commit', 'off', true)"
_SEEN = "UPDATE cv_replicas SET last_seen = now() WHERE id = %s AND volume = %s RETURNING id"
_HOLDS = (
    "WITH held AS (INSERT INTO cv_replica_holds (volume, replica, path, version) "
    "SELECT %s, %s, h.path, h.version FROM unnest(%s::text[], %s::bigint[]) AS h(path, version) "
    "ON CONFLICT (volume, replica, path) DO UPDATE SET version = EXCLUDED.version) " + _SEEN
)
_COPIES = """
SELECT r.id, r.hostname, r.root, r.boot_id, extract(epoch FROM r.last_seen)::float8,
       extract(epoch FROM now() - r.last_seen)::float8, count(b.path), min(b.since),
       extract(epoch FROM now())::float8 - min(b.since)
FROM cv_replicas r
LEFT JOIN LATERAL (
    SELECT f.path, (SELECT min(v.at) FROM cv_versions v WHERE v.volume = f.volume AND v.path = f.path
                    AND v.version > coalesce(h.version, 0)) AS since
    FROM cv_files f
    LEFT JOIN cv_replica_holds h ON h.volume = f.volume AND h.replica = r.id AND h.path = f.path
    WHERE f.volume = r.volume AND h.version IS DISTINCT FROM f.version AND (f.present OR h.version IS NOT NULL)
) b ON true
WHERE r.volume = %s
GROUP BY r.id
ORDER BY r.hostname, r.root, r.id
"""


@dataclass(frozen=True)
class WorkingCopy:
    """One working copy of a volume, as the registry knows it."""

    replica: str | None
    """Its id in the registry (`cv_replicas`); None for the one working copy of a SQLite volume."""
    hostname: str
    root: str
    boot_id: str
    """The boot of the kernel serving it (/proc/sys/kernel/random/boot_id)."""
    this: bool
    """Whether it is the root that asked."""
    last_seen: float
    """When a process of it last opened the volume or reported (epoch seconds, the database's clock)."""
    seen_ago: float
    """Seconds since `last_seen`, on the database's clock."""
    behind: int
    """Managed paths whose current version this copy did not report it holds."""
    behind_since: float | None
    """The commit time of the oldest version it lacks (epoch seconds, the committing host's
    clock); None when it lacks none."""
    behind_for: float | None
    """Seconds from `behind_since` to the database's now."""


def working_copies(conn: psycopg.Connection[Any], volume: uuid.UUID, this: uuid.UUID | None) -> list[WorkingCopy]:
    """Every working copy of `volume` (one statement); `this`: the asking copy's id."""
    return [
        WorkingCopy(str(rid), host, root, boot, rid == this, seen, ago, int(behind), since, age)
        for rid, host, root, boot, seen, ago, behind, since, age in conn.execute(_COPIES, (volume,)).fetchall()
    ]


def not_registered(root: str, location: Location) -> VolumeConfigError:
    """The error of every use of a working copy whose registration was removed (`forget`)."""
    return VolumeConfigError(
        f"{root!r} is no longer registered as a working copy of {location.describe()}: run `coherent-volume init "
        f"{root} --registry {location.url} --volume {location.volume}` to join it again. Nothing was changed"
    )


def forget(conn: psycopg.Connection[Any], volume: uuid.UUID, copy: str, this: uuid.UUID | None) -> WorkingCopy:
    """Remove the registration of the working copy of `volume` whose id starts with `copy` (and what it
    reported holding); the copy removed. VolumeConfigError, nothing changed, when no copy or more than
    one matches, when it is `this` one, or when it was seen within FORGET_AFTER seconds."""
    copies = working_copies(conn, volume, this)
    matches = [c for c in copies if c.replica is not None and c.replica.startswith(copy.lower())]
    if len(matches) != 1:
        listed = ", ".join(f"{c.replica} ({c.hostname}:{c.root})" for c in (matches or copies))
        raise VolumeConfigError(
            f"{len(matches) or 'no'} working copies of this volume have an id starting with {copy!r} "
            f"({'they are' if matches else 'there are'}: {listed}); give more of the id (`status --hosts --json` "
            "lists them). Nothing was changed"
        )
    [found] = matches
    if found.this:
        raise VolumeConfigError(
            f"{found.replica} is the working copy you asked from ({found.root}): forget it from another one, or "
            "stop using this root. Nothing was changed"
        )
    removed = conn.execute(
        "DELETE FROM cv_replicas WHERE id = %s AND volume = %s AND last_seen < now() - make_interval(secs => %s) "
        "RETURNING id",
        (found.replica, volume, FORGET_AFTER),
    ).fetchone()
    if removed is None:
        raise VolumeConfigError(
            f"the working copy {found.replica} ({found.hostname}:{found.root}) was seen less than "
            f"{FORGET_AFTER / 3600:g} h ago: it may still be in use (its processes make it seen while they work). "
            "A copy can be forgotten once unseen that long. Nothing was changed"
        )
    return found


class Reporter:
    """What one process tells the registry about its working copy (see the module's invariants)."""

    def __init__(self, replica: Replica, volume: uuid.UUID) -> None:
        self._replica = replica
        self._volume = volume
        self._id = replica.recorded_id()
        self._seen = time.monotonic()
        """When this process last bumped last_seen (or tried to): opening the volume bumped it."""
        self._forgotten = False
        """Whether a report found this copy's registration removed (`forget`)."""

    def due(self) -> bool:
        """Whether this process's bump of last_seen is due."""
        return self._id is not None and time.monotonic() - self._seen >= SEEN_EVERY

    def news(self, holdings: bool) -> bool:
        """Whether `report(holdings)` would have a report (nothing changes)."""
        return (holdings and self._id is not None and bool(self._replica.unreported())) or self.due()

    def report(self, holdings: bool) -> Report | None:
        """This copy's report, if it has one: with `holdings` (under the working copy's lock), the
        versions it holds that the registry was not told, with last_seen; else last_seen if due."""
        holds = self._replica.unreported() if holdings and self._id is not None else []
        if not holds and not self.due():
            return None
        self._seen = time.monotonic()
        return Report(holds)

    def queue(self, conn: psycopg.Connection[Any], report: Report) -> psycopg.Cursor[Any]:
        """The statements of `report` on `conn`, in the caller's pipeline: one round trip, one
        implicit transaction of their own; the cursor of the last, which returns a row only if this
        copy is registered (a report of a copy that is not fails on its foreign key)."""
        conn.execute(_ASYNC)
        if report.holds:
            paths, versions = [p for p, _ in report.holds], [v for _, v in report.holds]
            return conn.execute(_HOLDS, (self._volume, self._id, paths, versions, self._id, self._volume))
        return conn.execute(_SEEN, (self._id, self._volume))

    def unregistered(self) -> None:
        """A report found no registration under this process's id: the copy was forgotten, unless
        `init` registered it anew since (`forgotten`)."""
        self._forgotten = True
        self.forgotten()

    def forgotten(self) -> bool:
        """Whether this copy was found forgotten and not registered anew since. Registered anew
        (its replica.db records another id: `init` joined it again), this process reports under the
        new id from then on (`Replica.registered` made every holding pending again)."""
        if self._forgotten:
            recorded = self._replica.recorded_id()
            if recorded is not None and recorded != self._id:
                self._id, self._forgotten = recorded, False
        return self._forgotten

    def sent(self, report: Report) -> None:
        """`report`'s pipeline succeeded: the registry knows what it holds."""
        if report.holds:
            self._replica.reported(report.holds)


@dataclass(frozen=True)
class Report:
    """One report of a working copy: the versions it holds that the registry was not told
    ((path, version) each; none: last_seen alone)."""

    holds: list[tuple[str, int]]
