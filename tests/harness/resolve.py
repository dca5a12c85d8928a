"""Attach versions to attempts whose face does not report one, from the volume's log.

A shell write through the mount learns only success or an errno; a writer killed mid-write
learns nothing. The log lists each commit with its agent, path, version and time, so each
logged commit is matched to the attempt of that agent on that path whose write was under way
at that time (a commit completed by crash recovery: to that agent's last write cut short).
Attempts told "success" that no logged commit matches are reported: that would be a silent loss.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from .history import Attempt

EPS = 0.05
"""Seconds of slack between the harness's and the volume's clocks (same host, same clock)."""


COMMITS = ("commit", "merge", "restore")
"""Log kinds of an agent's commit: the kind of the version it made, as `history` names it."""


def completed_recovery(event: dict[str, Any]) -> bool:
    return event["kind"] == "recover" and event.get("reason") == "completed"


def log_versions(events: list[dict[str, Any]]) -> dict[str, dict[int, tuple[str, str | None]]]:
    """path -> version -> (kind, agent) of every version the log says was made."""
    out: dict[str, dict[int, tuple[str, str | None]]] = defaultdict(dict)
    for e in events:
        if e["kind"] in COMMITS:
            out[e["path"]][e["version"]] = (e["kind"], e["agent"])
        elif completed_recovery(e):
            out[e["path"]][e["version"]] = ("commit", e["agent"])
        elif e["kind"] in ("foreign", "delete"):
            out[e["path"]][e["version"]] = (e["kind"], e["agent"])
    return dict(out)


def refusal_reasons(events: list[dict[str, Any]]) -> Counter[str]:
    return Counter(e["reason"] for e in events if e["kind"] == "refusal")


def _candidates(attempts: list[Attempt]) -> dict[tuple[str, str], list[Attempt]]:
    index: dict[tuple[str, str], list[Attempt]] = defaultdict(list)
    for a in attempts:
        if a.reached_write and a.outcome != "refused" and a.version is None:
            index[(a.agent, a.target)].append(a)
    return index


def _in_flight(a: Attempt, kill_times: list[float]) -> bool:
    end = a.t_write1 if a.t_write1 is not None else math.inf
    return not kill_times or any(a.t_write0 <= k <= end for k in kill_times)  # type: ignore[operator]


def _match(event: dict[str, Any], candidates: list[Attempt], kill_times: list[float]) -> Attempt | None:
    at = event["at"]
    if completed_recovery(event):  # the writer's last write cut short by a kill before the recovery
        cut = [
            a
            for a in candidates
            if a.outcome in ("error", "unknown")
            and a.t_write0 <= at + EPS  # type: ignore[operator]
            and _in_flight(a, kill_times)
        ]
        return max(cut, key=lambda a: a.t_write0 or 0, default=None)
    for slack in (0.0, EPS):  # one agent's writes never overlap: the exact interval is unique
        during = [
            a
            for a in candidates
            if a.t_write0 - slack <= at <= (a.t_write1 if a.t_write1 is not None else math.inf) + slack
        ]  # type: ignore[operator]
        if during:
            return min(during, key=lambda a: abs((a.t_write0 or 0) - at))
    return None


def resolve(
    attempts: list[Attempt], events: list[dict[str, Any]], kill_times: list[float] | None = None
) -> list[tuple[str, str]]:
    """Give versions to unversioned attempts from logged commits; return (kind, message) problems.
    `kill_times`: when the harness killed a process that may have had a write under way."""
    claimed = {(a.target, a.version) for a in attempts if a.committed and a.version is not None}
    index = _candidates(attempts)
    for e in events:
        if not (e["kind"] in COMMITS or completed_recovery(e)) or (e["path"], e["version"]) in claimed:
            continue
        attempt = _match(e, index.get((e["agent"], e["path"]), []), kill_times or [])
        if attempt is not None:
            attempt.version, attempt.outcome = e["version"], "ok"
            index[(attempt.agent, attempt.target)].remove(attempt)
    problems = []
    for a in attempts:
        if a.committed and a.version is None:
            problems.append(
                (
                    "false-success",
                    f"{a.agent} was told its write {a.token} of {a.target} succeeded, but the log has no such commit",
                )
            )
            a.outcome = "unlogged"
        elif a.outcome in ("error", "unknown"):
            a.outcome = "failed"
    return problems
