"""The pure decision core, checked exhaustively against a restatement of the issue's rules."""

from __future__ import annotations

import itertools

from coherent_volume.fingerprint import Fingerprint
from coherent_volume.liveness import ProcessId
from coherent_volume.protocol import (
    RACY_NS,
    Disk,
    FileRecord,
    Grant,
    Installed,
    Intent,
    Local,
    Version,
    WriteCheck,
    agent_name_problem,
    changed_paths,
    classify,
    decide_write,
    displaced_needs_hash,
    grant_over,
    handles_share,
    is_noop,
    local_state,
    lost_install,
    may_drop_taken,
    may_replay,
    needs_hash,
    read_moves_view,
    recovery,
    view_moves,
)

FP = Fingerprint(ino=1, size=3, mtime_ns=10, ctime_ns=10)


def rec(
    version: int, present: bool = True, fp: Fingerprint | None = FP, checked_ns: int = 10 + 10 * RACY_NS
) -> FileRecord:
    return FileRecord("p", version, present, "h" if present else None, fp if present else None, "w", 0.0, checked_ns)


def spec(c: WriteCheck) -> str | None:
    """Independent statement of guarantee 2, 5 and 6, written from the issue text."""
    exists = c.current is not None and c.current.present
    version = c.current.version if c.current else 0
    if c.fenced:
        return "fenced"
    if c.holder not in (None, c.agent):
        return "held"
    # the agent's own open handles: appends share with appends, anything else is alone
    own = c.kind is not None and bool(c.open_kinds)
    if own and not (c.kind == "append" and set(c.open_kinds or ()) == {"append"}):
        return "held"
    if c.kind == "append":
        ok = True
    elif c.expected is not None:
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
        records, seens, holders, (False, True), ((), ("q",)), expecteds
    ):
        check = WriteCheck("a", current, seen, holder, fenced, changed, expected)
        assert decide_write(check) == spec(check), check
        cases += 1
    assert cases == 5 * 5 * 3 * 2 * 2 * 5


def test_decide_write_for_opening_handles_matches_spec_exhaustively() -> None:
    records = [None, rec(1), rec(2, present=False)]
    kinds = [None, "append", "write"]
    opens = [None, [], ["append"], ["append", "append"], ["write"], ["append", "write"]]
    for current, seen, holder, kind, open_kinds, expected in itertools.product(
        records, [None, 1, 2], [None, "a", "b"], kinds, opens, [None, 1]
    ):
        check = WriteCheck("a", current, seen, holder, False, (), expected, kind=kind, open_kinds=open_kinds)
        assert decide_write(check) == spec(check), check


def test_only_appending_handles_share() -> None:
    assert handles_share([], "write") and handles_share([], "append")
    assert handles_share(["append", "append"], "append")
    assert not handles_share(["append"], "write")
    assert not handles_share(["write"], "append") and not handles_share(["write"], "write")


def test_only_appends_replay_and_never_onto_a_deletion() -> None:
    moved = WriteCheck("a", rec(3), 1, None, False, expected=1)
    assert may_replay(moved, "stale", appends_only=True)
    assert not may_replay(moved, "stale", appends_only=False)
    assert not may_replay(moved, "held", appends_only=True)
    assert not may_replay(WriteCheck("a", rec(3, present=False), 1, None, False, expected=1), "stale", True)
    assert not may_replay(WriteCheck("a", rec(3), 1, None, False), "stale", True), "not a handle's commit"


def test_a_commit_moves_the_view_only_when_the_writer_knew_the_content() -> None:
    current = rec(2)
    assert view_moves(WriteCheck("a", current, 2, None, False), based_on_view=False, onto_unread=True)
    assert view_moves(WriteCheck("a", current, 1, None, False, expected=2), based_on_view=True, onto_unread=False)
    assert not view_moves(
        WriteCheck("a", current, None, None, False, expected=2), based_on_view=False, onto_unread=False
    )
    assert not view_moves(WriteCheck("a", current, 1, None, False, expected=1), based_on_view=True, onto_unread=True)


def test_recovery_completes_what_reached_the_disk_and_abandons_the_rest() -> None:
    write = Intent("p", "a", 2, True, "new", "tmp")
    assert recovery(write, on_disk=True, disk_hash="new") == "completed"
    assert recovery(write, on_disk=True, disk_hash="old") == "abandoned"
    assert recovery(write, on_disk=False, disk_hash=None) == "abandoned"
    delete = Intent("p", "a", 2, False, None, None)
    assert recovery(delete, on_disk=False, disk_hash=None) == "completed"
    assert recovery(delete, on_disk=True, disk_hash="old") == "abandoned"


def test_an_intent_whose_system_call_failed_is_abandoned_whatever_the_disk_holds() -> None:
    """A rename(2) the kernel refused changed nothing: a destination that already held the same
    bytes is not its doing, in a working copy too."""
    rename = Intent("p", "a", 2, True, "same", None)
    assert recovery(rename, on_disk=True, disk_hash="same", undone=True) == "abandoned"
    assert recovery(rename, on_disk=True, disk_hash="same", replicated=True, undone=True) == "abandoned"
    delete = Intent("p", "a", 2, False, None, None)
    assert recovery(delete, on_disk=False, disk_hash=None, undone=True) == "abandoned"


def test_an_intent_whose_process_saw_its_system_call_succeed_is_completed_whatever_the_disk_holds() -> None:
    """A live rename settling what its exchange displaced before it records itself: a program's
    save at its source or destination since is a change after it, not a sign it did not happen."""
    delete = Intent("p", "a", 2, False, None, None)
    assert recovery(delete, on_disk=True, disk_hash="saved", done=True) == "completed"
    rename = Intent("p", "a", 2, True, "new", None)
    assert recovery(rename, on_disk=True, disk_hash="saved", done=True) == "completed"


def test_a_rename_whose_content_waits_at_its_temp_name_is_completed_from_there() -> None:
    """Killed between moving its source to the temp name its intent names and the exchange: the
    destination still holds the version before, and the rename is completed, never abandoned (the
    content is at no other name)."""
    rename = Intent("p", "a", 2, True, "new", "tmp")
    assert recovery(rename, on_disk=True, disk_hash="old", staged=True) == "completed"
    assert recovery(rename, on_disk=False, disk_hash=None, replicated=True, staged=True) == "completed"


def test_only_the_version_a_change_found_or_its_own_bytes_may_be_dropped_once_taken_away() -> None:
    assert may_drop_taken(None, "held")
    assert may_drop_taken("held", "held", "brought")
    assert may_drop_taken("brought", "held", "brought")
    assert not may_drop_taken("a copy of another file", "held", "brought")
    assert not may_drop_taken("saved", None)


def test_a_recorded_commit_is_finished_by_its_install_else_installed_unless_changed_outside() -> None:
    commit = Intent("p", "a", 2, True, "new", ".coherent/staging/x")
    # its install renamed the staged file: whatever the disk holds now is checked as any other time
    assert recovery(commit, on_disk=True, disk_hash=None, recorded=True, staged=False) == "finished"
    # the staged file is still there: installed over the version before, never over a change since
    assert recovery(commit, True, "old", recorded=True, staged=True, previous="old") == "installed"
    assert recovery(commit, True, "edited", recorded=True, staged=True, previous="old") == "superseded"
    assert recovery(commit, False, None, recorded=True, staged=True, previous="old") == "superseded"
    assert recovery(commit, False, None, recorded=True, staged=True, previous=None) == "installed"
    assert recovery(commit, True, "made", recorded=True, staged=True, previous=None) == "superseded"
    # a working copy: the registry holds the content, a copy that lacks it is behind
    assert recovery(commit, True, "old", replicated=True, recorded=True, staged=True, previous="old") == "finished"


def test_a_staged_name_holding_other_bytes_is_what_the_install_displaced() -> None:
    """An install exchanges the staged file with the target: a staged name holding other bytes than
    the commit's names what it displaced, put back unless it is the version before or bytes the
    registry keeps (in a working copy too, and once the commit is no longer current)."""
    commit = Intent("p", "a", 2, True, "new", ".coherent/staging/x")
    for replicated in (False, True):
        done = {"replicated": replicated, "recorded": True, "staged": True, "previous": "old"}
        assert recovery(commit, True, "new", staged_hash="old", **done) == "finished"
        assert recovery(commit, True, "new", staged_hash="saved", **done) == "displaced"
        assert recovery(commit, True, "new", staged_hash="saved", staged_kept=True, **done) == "finished"
    assert recovery(commit, True, "new", recorded=True, staged=True, staged_hash="made", previous=None) == "displaced"
    assert recovery(commit, False, None, recorded=True, staged=False, staged_hash="second save") == "displaced"
    # the staged file still holds the commit's bytes: its install did not happen
    assert recovery(commit, True, "old", recorded=True, staged=True, staged_hash="new", previous="old") == "installed"


def test_a_displaced_file_is_the_version_before_by_its_stat_only_when_the_decision_proved_it() -> None:
    seen = Fingerprint(7, 3, 1_000, 1_000)
    later = seen.ctime_ns + RACY_NS
    assert not displaced_needs_hash(seen, later, Fingerprint(7, 3, 1_000, 5_000_000_000))  # the rename moved ctime
    assert displaced_needs_hash(seen, later - 1, Fingerprint(7, 3, 1_000, 5_000_000_000))  # racy: a write kept mtime
    assert displaced_needs_hash(seen, later, Fingerprint(8, 3, 1_000, 5_000_000_000))  # another inode
    assert displaced_needs_hash(seen, later, Fingerprint(7, 3, 2_000, 5_000_000_000))  # written since
    assert displaced_needs_hash(None, later, Fingerprint(7, 3, 1_000, 5_000_000_000))  # no file was seen


def test_a_working_copy_holding_a_later_versions_bytes_lost_that_installs_record() -> None:
    installed = Installed(2, "v2", None, 0)
    since = [Version("p", v, "commit", "a", 0.0, 2, f"v{v}", (), True) for v in (5, 4, 3)]
    assert lost_install(installed, since, "v4") == Installed(4, "v4", None, 0)  # behind at v4: nothing foreign
    assert lost_install(installed, since, "v2") is None  # what it recorded: not this rule's
    assert lost_install(installed, since, "other") is None  # bytes of no version: written outside
    assert lost_install(None, since, "v3") == Installed(3, "v3", None, 0)


def test_lost_install_takes_only_versions_whose_bytes_are_kept() -> None:
    pruned = Version("p", 4, "commit", "a", 0.0, 2, "v4", (), False)
    assert lost_install(Installed(2, "v2", None, 0), [pruned], "v4") is None  # its bytes would be gone: foreign


def test_a_copy_ahead_of_the_registry_keeps_its_bytes() -> None:
    """The registry went back (restored from an older backup): what the copy holds is recorded,
    never overwritten by the older current version."""
    current = rec(2)
    ahead = Installed(4, "v4", FP, 10 + 10 * RACY_NS)
    assert local_state(current, ahead, FP, None, None) is Local.UNRECORDED
    assert local_state(current, ahead, FP, "v4", None) is Local.UNRECORDED
    assert local_state(current, ahead, FP, "other", None) is Local.FOREIGN  # and changed since: kept as well
    assert local_state(current, Installed(2, "h", FP, 10 + 10 * RACY_NS), FP, None, "h") is Local.SAME


def test_identical_bytes_are_no_new_version() -> None:
    assert is_noop(rec(1), "h") and not is_noop(rec(1), "x")
    assert not is_noop(rec(1, present=False), "h") and not is_noop(None, "h") and not is_noop(rec(1), None)


def test_reads_move_views_except_pinned_agents_and_editors_rereading() -> None:
    assert read_moves_view(False, "cat", loaded_before=True)
    assert read_moves_view(False, "vim", loaded_before=False)
    assert not read_moves_view(False, "vim", loaded_before=True)
    assert not read_moves_view(True, "cat", loaded_before=False)
    # never backwards: an old handle of a replaced or deleted file shows nothing newer than the view
    assert not read_moves_view(False, "cat", False, seen=5, version=3)
    assert read_moves_view(False, "cat", False, seen=3, version=5) and read_moves_view(False, "cat", False, None, 1)


def test_agent_names() -> None:
    assert agent_name_problem("alice") is None and agent_name_problem("claude:4c1e") is None
    for bad in ("", "external", "a\nb", "x" * 201, None, 3):
        assert agent_name_problem(bad) is not None, bad
    # the reserved name in another case or with white space at an end passed for it in history and
    # status (/tmp/s32api 5); so did any name beside its spaced twin
    for bad in ("External", "EXTERNAL", "external ", " external", " alice", "alice\t"):
        assert agent_name_problem(bad) is not None, bad
    assert agent_name_problem("alice smith") is None and agent_name_problem("externally") is None


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
