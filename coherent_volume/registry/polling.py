"""Bounded waits for a lock that can only be tried (flock, byte-range locks): polled with short
growing sleeps, never longer than the deadline, so every wait ends with the lock or an error."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..errors import RegistryError


def poll(take: Callable[[], bool], deadline: float, refusal: Callable[[], RegistryError]) -> None:
    """Call `take` (one try of a lock: whether it got it) until it succeeds, sleeping 0.5 ms, then
    twice as long each time up to 5 ms, never past `deadline` (time.monotonic()); past it, raise
    `refusal()` (its message made then: how long was waited, who holds it)."""
    delay = 0.0005
    while not take():
        left = deadline - time.monotonic()
        if left <= 0:
            raise refusal()
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.005)
