"""One row of the report per scenario run, and the rich table that prints them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from . import checker
from .history import Attempt


@dataclass
class Result:
    scenario: str
    agents: int = 0
    attempts: int = 0
    accepted: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    violations: int = 0
    messages: list[str] = field(default_factory=list)
    wall: float = 0.0
    expect_violations: bool = False
    """A control run (plain directory, file isolation judged as read-set): the checker must find some."""
    stats: dict[str, float] = field(default_factory=dict)
    kinds: Counter[str] = field(default_factory=Counter)
    """Checker violations by kind."""

    @property
    def passed(self) -> bool:
        return self.violations > 0 if self.expect_violations else self.violations == 0

    def fail(self, message: str) -> None:
        self.violations += 1
        if len(self.messages) < 40:
            self.messages.append(message)

    def absorb(self, verdict: checker.Verdict) -> None:
        """Add a checker verdict: its violations, messages, and counts by kind."""
        self.violations += verdict.violations
        self.messages += verdict.messages[: max(0, 40 - len(self.messages))]
        self.kinds.update(verdict.kinds)

    def tally(self, attempts: list[Attempt], refusal_reasons: Counter[str] | None = None) -> None:
        """Count attempts that reached a write, accepted commits, and every other outcome by reason.
        `refusal_reasons` (from the volume's log) replaces a shell's bare EACCES with the real reasons."""
        for a in attempts:
            if a.reached_write:
                self.attempts += 1
            if a.committed:
                self.accepted += 1
            elif a.outcome == "refused" and refusal_reasons is None:
                self.refusals[a.reason or "?"] += 1
            elif a.outcome in ("failed", "error", "unknown", "unlogged"):
                self.refusals[f"{a.reason or a.outcome}"] += 1
            elif a.outcome == "read-error":
                self.refusals[f"read {a.reason}"] += 1
        if refusal_reasons is not None:
            self.refusals.update(refusal_reasons)


def _reasons(counter: Counter[str]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counter.most_common()) or "-"


def table(results: list[Result], title: str = "torture report"):  # -> rich.table.Table
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for column, justify in (
        ("scenario", "left"),
        ("agents", "right"),
        ("attempts", "right"),
        ("accepted", "right"),
        ("refusals by reason", "left"),
        ("violations", "right"),
        ("wall s", "right"),
    ):
        t.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        violations = f"{r.violations} (expected > 0)" if r.expect_violations else str(r.violations)
        if not r.passed:
            violations = f"[bold red]{violations} FAIL[/]"
        t.add_row(
            r.scenario,
            str(r.agents or "-"),
            str(r.attempts),
            str(r.accepted),
            _reasons(r.refusals),
            violations,
            f"{r.wall:.1f}",
        )
    return t
