"""What one write handle did to its content since its last commit.

A handle's shadow starts as a copy of a base version. A handle that only appended can be
committed onto any newer version by appending the same bytes there (an append adds to whatever
is current); a handle that did anything else (wrote at an offset, changed the size) depends on
its base, and its commit is a compare-and-swap against it. Pure data: the replay's I/O is
`atomic.stage_appended`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Edits:
    """Invariant: while `in_place` is False, the shadow is the base followed by the appended bytes,
    which start at `appended_from` (None: nothing appended yet)."""

    appended_from: int | None = None
    in_place: bool = False

    @property
    def appends_only(self) -> bool:
        return not self.in_place

    def append(self, offset: int) -> None:
        """Bytes were appended at `offset` of the shadow."""
        if self.appended_from is None:
            self.appended_from = offset

    def change(self) -> None:
        """A write at an offset or a size change: the content now depends on the base."""
        self.in_place = True
