"""Write grants of open handles as leases: short, on the registry's clock, renewed by a heartbeat.

A handle grant (a mount's open write handle, `Writes.begin_write`) lasts HANDLE_LEASE seconds past
its last renewal; the `Heartbeat` of the process that took it renews it every third of that while
the handle is open. A holder that stops renewing (paused, cut off from the registry, or dead on
another host or in another PID namespace, where liveness cannot tell) lets the path go within one
lease; on one host and PID namespace a dead holder is reclaimed at once (`protocol.grant_over`).

Invariants:
- the renewal rule is `protocol.renewed`, applied in one write transaction per beat, on the
  registry's clock (`Transaction.now`), never this host's;
- a lease found ended (released, reclaimed, run out) is renewed no more: the handle's later
  commit is a compare-and-swap, refused (and logged) if anyone wrote the file meanwhile;
- one daemon thread per heartbeat at most, running while it has leases to renew and ending at the
  first beat that finds none (so handles opened and closed in quick succession share one thread,
  never paying a thread start each);
- a forked child renews nothing of its parent's (the leases are its parent's process's).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from functools import partial

from ..errors import RegistryError
from ..protocol import Grant, renewed
from ..registry import Registry, Transaction

log = logging.getLogger(__name__)

HANDLE_LEASE = 30.0
"""Seconds an open write handle's grant lasts past its last renewal, on the registry's clock: how
long a holder that stopped (paused, partitioned, or dead where liveness cannot tell) blocks its
path for everyone else. Renewed every HANDLE_LEASE / 3 s while the handle is open."""

_OPEN: weakref.WeakSet[Heartbeat] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for heartbeat in list(_OPEN):
        heartbeat._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Heartbeat:
    """Renews the leases this process holds (`hold` until `drop`) on one registry."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self.length = HANDLE_LEASE
        """Seconds a lease lasts past each renewal (the grants `begin_write` takes last that long)."""
        self._forked()
        _OPEN.add(self)

    def _forked(self) -> None:
        """Start with no lease and no thread (also in a forked child: the thread did not follow)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._leases: dict[str, Grant] = {}
        """The leases to renew, by token."""
        self._thread: threading.Thread | None = None

    def hold(self, lease: Grant) -> None:
        """Renew `lease` from now on, until `drop` or a renewal finds it ended."""
        with self._lock:
            self._leases[lease.token] = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="coherent-volume lease heartbeat", daemon=True)
                self._thread.start()

    def drop(self, token: str) -> None:
        """Renew the lease `token` no more (its handles ended); the thread ends at its next beat if
        no lease is left by then."""
        with self._lock:
            self._leases.pop(token, None)

    def stop(self) -> None:
        """Renew none of the leases held now (they lapse within a lease unless released first), and
        wait for the thread to end; a later `hold` starts afresh."""
        with self._lock:
            self._leases.clear()
            self._changed.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        """Every third of a lease, renew every lease held in one transaction; end at the first beat
        (or `stop`) that finds none."""
        period = self.length / 3
        while True:
            with self._lock:
                self._changed.wait(period)  # woken early by `stop` only
                if not self._leases:
                    self._thread = None
                    return
                leases = list(self._leases.values())
            try:
                ended = self._registry.transact(partial(self._renew, leases=leases), [g.path for g in leases])
            except RegistryError as e:
                log.warning("write grants of open handles could not be renewed (%s); tried again in %g s", e, period)
                continue
            except Exception:
                log.exception("renewing the write grants of open handles failed; tried again in %g s", period)
                continue
            with self._lock:
                for token in ended:
                    self._leases.pop(token, None)

    def _renew(self, tx: Transaction, *, leases: list[Grant]) -> list[str]:
        """Renew `leases` in `tx` (`protocol.renewed`); the tokens of those found ended."""
        now = tx.now()
        held = {g.path: g for g in tx.grants([g.path for g in leases])}
        ended = []
        for lease in leases:
            renewal = renewed(lease, held.get(lease.path), now, self.length)
            if renewal is None:
                ended.append(lease.token)
            else:
                tx.put_grant(renewal)
        return ended
