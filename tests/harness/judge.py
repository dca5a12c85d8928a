"""Turn what a run left behind into a History, resolve versions from the log, and check it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from . import checker
from .history import Attempt, History, Producer
from .resolve import log_versions, refusal_reasons, resolve
from .result import Result
from .volumes import audit_store, final_state, raw_read, read_log


def judge_volume(
    result: Result,
    root: Path,
    paths: list[str],
    attempts: list[Attempt],
    producers: list[Producer],
    samples: set[tuple[str, str | None]],
    isolation: str,
    shell: bool = False,
    judge_as: str | None = None,
    kill_times: list[float] | None = None,
) -> History:
    """Check a run on a volume, its content store included; fills `result` with counts and violations."""
    final, versions = final_state(root, paths)
    events = read_log(root)
    store = audit_store(root, paths)
    problems = resolve(attempts, events, kill_times)
    history = History(isolation, True, producers, attempts, samples, final, versions, log_versions(events), store=store)
    verdict = checker.check(history, judge_as)
    result.tally(attempts, refusal_reasons([e for e in events if e["path"] in paths]) if shell else None)
    for kind, message in problems:
        result.fail(f"{kind}: {message}")
    result.absorb(verdict)
    return history


def judge_plain(
    result: Result,
    root: Path,
    paths: list[str],
    attempts: list[Attempt],
    producers: list[Producer],
    samples: set[tuple[str, str | None]],
) -> History:
    """Check a run on a plain directory: no versions, so only what the contents prove."""
    for a in attempts:
        if a.outcome == "ok":
            a.version = None
    final = {p: raw_read(root, p) for p in paths}
    history = History("file", False, producers, attempts, samples, final)
    verdict = checker.check(history)
    result.tally(attempts, Counter())
    result.absorb(verdict)
    return history


def unexpected_errors(result: Result, attempts: list[Attempt], allowed: tuple[str, ...] = ()) -> None:
    """A write that failed with an errno other than a refusal (and `allowed`, which the scenario
    provokes on purpose) is a finding, even though it changed nothing: EIO means the face broke."""
    odd = Counter(
        a.reason
        for a in attempts  # no reason: cut short by a kill, its outcome unknown
        if a.outcome in ("failed", "error") and a.reason is not None and a.reason not in allowed
    )
    for reason, n in odd.most_common():
        result.fail(f"unexpected-error: {n} writes failed with {reason}")
    if not any(a.committed for a in attempts):
        result.fail("harness: no write was accepted at all")
