"""The pure decision core, checked exhaustively against a restatement of the issue's rules."""
from __future__ import annotations

import itertools

from coherent_volume.fingerprint import Fingerprint
from coherent_volume.liveness import ProcessId
from coherent_volume.protocol import (RACY_NS, Disk, FileRecord, Grant, WriteCheck, changed_paths, classify,
                                      decide_write, grant_over, needs_hash)

FP = Fingerprint(ino=1, size=3, mtime_ns=10, ctime_ns=10)


def rec(version: int, present: bool = True, fp: Fingerprint | None = FP, checked_ns: int = 10 + 10 * RACY_NS) -> FileRecord:
    return FileRecord("p", version, present, "h" if present else None, fp if present else None, "w", 0.0, checked_ns)


def spec(c: WriteCheck) -> str | None:
    """Independent statement of guarantee 2, 5 and 6, written from the issue text."""
    exists = c.current is not None and c.current.present
    version = c.current.version if c.current else 0
    if c.fenced:
        return "fenced"
    if c.holder not in (None, c.agent):
        return "held"
    if c.expected is not None:
        ok = c.expected == version
    elif not exists:
        ok = c.seen in (None, version)  # creating needs no read, unless the read predates a deletion
    else:
        ok = c.seen == version
    if not ok:
        return "stale" if (c.expected is not None or not exists or c.seen is not None) else "unread"
    return "read-set" if c.changed_read_set else None


def test_decide_write_matches_spec_exhaustively() -> None:
    records = [None, rec(1), rec(2), rec(2, present=False), rec(3)]
    seens = [None, 0, 1, 2, 3]
    holders = [None, "a", "b"]
    expecteds = [None, 0, 1, 2, 3]
    cases = 0
    for current, seen, holder, fenced, changed, expected in itertools.product(
            records, seens, holders, (False, True), ((), ("q",)), expecteds):
        check = WriteCheck("a", current, seen, holder, fenced, changed, expected)
        assert decide_write(check) == spec(check), check
        cases += 1
    assert cases == 5 * 5 * 3 * 2 * 2 * 5


def test_racing_creators_second_sees_unread() -> None:
    assert decide_write(WriteCheck("a", None, None, None, False)) is None
    assert decide_write(WriteCheck("b", rec(1), None, None, False)) == "unread"


def test_classify_disk_states() -> None:
    assert classify(None, None, None) is Disk.SAME
    assert classify(rec(1), None, None) is Disk.DELETED
    assert classify(rec(1, present=False), None, None) is Disk.SAME
    assert classify(None, FP, "x") is Disk.CHANGED
    assert classify(rec(1, present=False), FP, "x") is Disk.CHANGED
    assert classify(rec(1), FP, None) is Disk.SAME
    assert classify(rec(1), FP, "h") is Disk.SAME
    assert classify(rec(1), FP, "other") is Disk.CHANGED


def test_needs_hash_on_stat_change_or_racy_fingerprint() -> None:
    assert not needs_hash(rec(1), FP)
    assert needs_hash(rec(1), Fingerprint(1, 3, 10, 11))
    assert needs_hash(rec(1), Fingerprint(2, 3, 10, 10))
    assert needs_hash(rec(1, checked_ns=10 + RACY_NS // 2), FP), "a same-tick write could hide behind this stat"
    assert not needs_hash(None, FP) and not needs_hash(rec(1), None)


def test_grant_over_at_ttl_or_dead_owner() -> None:
    g = Grant("p", "a", "t", ProcessId("h", 1, 1), expires_at=100.0)
    assert not grant_over(g, 99.0, True)
    assert not grant_over(g, 99.0, None)
    assert grant_over(g, 100.0, True)
    assert grant_over(g, 50.0, False)


def test_changed_paths_ignores_the_target_and_reports_moves() -> None:
    assert changed_paths({"a": 1, "b": 2, "c": 1}, {"a": 5, "b": 2, "c": 2}, exclude="a") == ("c",)
    assert changed_paths({"gone": 1}, {}, exclude="x") == ("gone",)
