"""Retention: versions' bytes are pruned by the volume's policy, never the current version's, a
version some agent's view points at, or a path's last `keep_last`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, Policy, Retention, StaleWriteError, VersionGone, VolumeConfigError
from coherent_volume.core import history
from coherent_volume.core.history import PRUNE_STEP
from coherent_volume.fingerprint import content_hash
from coherent_volume.policy import DAY
from coherent_volume.registry import objects
from coherent_volume.registry.sqlite import SQLiteTransaction

from .harness.volumes import sql


def _objects(root: Path) -> set[str]:
    """The hashes whose content the store keeps."""
    return {digest for (digest,) in sql(root, "SELECT hash FROM contents")}


def _retained(vol: CoherentVolume, path: str) -> list[int]:
    return [v.version for v in vol.history(path) if v.retained and v.hash is not None]


def test_old_versions_beyond_the_last_k_are_pruned_and_listed_as_such(root: Path, vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=3)))
    for i in range(10):
        alice.write("plans/p.md", f"version {i + 1}\n")
    pruned = alice.prune()
    assert pruned.versions == 7 and pruned.objects == 7
    assert _retained(alice, "plans/p.md") == [10, 9, 8]
    assert [v.version for v in alice.history("plans/p.md")] == list(range(10, 0, -1))  # history stays whole
    with pytest.raises(VersionGone, match="pruned by the volume's retention policy"):
        alice.read_version("plans/p.md", 2)
    assert _objects(root) == {content_hash(f"version {i}\n".encode()) for i in (8, 9, 10)}
    assert alice.prune().versions == 0  # idempotent


def test_a_deleted_files_last_content_is_kept_as_one_of_its_last_versions(vols) -> None:
    """A deletion has no bytes and is not one of a path's last `keep_last`: the content it removed
    stays restorable (before, with keep_last=1 the next prune dropped it, /tmp/s29hist 2)."""
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "first\n")
    alice.write("plans/p.md", "last words\n")
    alice.delete("plans/p.md")
    alice.prune()
    assert _retained(alice, "plans/p.md") == [2]
    alice.restore("plans/p.md", 2)
    assert alice.read("plans/p.md") == b"last words\n"


def test_young_versions_are_kept_whatever_their_number(vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=1, keep_last=1)))
    for i in range(5):
        alice.write("plans/p.md", f"v{i}\n")
    assert alice.prune().versions == 0
    assert _retained(alice, "plans/p.md") == [5, 4, 3, 2, 1]


def test_a_viewed_version_keeps_its_bytes_so_the_refusal_diff_still_works(vols) -> None:
    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "shared base\n")
    bob.read("plans/p.md")  # bob's view: v1
    for i in range(5):
        alice.write("plans/p.md", f"shared base\nalice {i}\n")
    alice.prune()
    assert _retained(alice, "plans/p.md") == [6, 1]
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "bob\n")
    assert refused.value.diff is not None and "+alice 4" in refused.value.diff


def test_content_shared_with_a_kept_version_stays_stored(root: Path, vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "same\n")
    alice.write("plans/p.md", "other\n")
    alice.write("plans/q.md", "same\n")  # current, and the same bytes as p's v1
    alice.prune()
    assert _retained(alice, "plans/p.md") == [2]
    assert content_hash(b"same\n") in _objects(root)
    assert alice.read_version("plans/q.md", 1) == b"same\n"


def test_pruning_content_stored_in_parts_frees_every_part(root: Path, vols, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objects, "PART", 1000)
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    versions = [bytes([i]) * 3500 for i in range(3)]  # 4 parts each
    for data in versions:
        alice.write("plans/p.bin", data)
    assert len(sql(root, "SELECT 1 FROM content_parts")) == 3 * 3
    pruned = alice.prune()
    assert (pruned.versions, pruned.objects, pruned.bytes) == (2, 2, 2 * 3500)
    assert _objects(root) == {content_hash(versions[-1])}
    assert {h for (h,) in sql(root, "SELECT hash FROM content_parts")} == {content_hash(versions[-1])}
    assert len(sql(root, "SELECT 1 FROM content_parts")) == 3, "the kept version keeps all of its parts"
    assert alice.read_version("plans/p.bin", 3) == versions[-1]


def test_a_size_budget_prunes_the_oldest_first_down_to_the_floor(vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=365, keep_last=2, max_bytes=2500)))
    for i in range(10):
        alice.write("plans/p.md", f"{i}".encode() * 1000)
    alice.prune()
    assert _retained(alice, "plans/p.md") == [10, 9]  # 2,000 bytes: fits
    alice.set_policy(Policy(retention=Retention(keep_days=365, keep_last=5, max_bytes=0)))
    for i in range(5):
        alice.write("plans/q.md", f"q{i}")
    alice.prune()
    assert _retained(alice, "plans/q.md") == [5, 4, 3, 2, 1]  # the floor wins over the budget


def test_a_prune_is_claimed_by_one_process_per_interval(vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    for i in range(3):
        alice.write("plans/p.md", f"{i}")
    core = alice._core
    two_hours_ago = repr(time.time() - 7200)
    core.registry.transact(lambda tx: tx.put_meta("pruned_at", two_hours_ago))
    assert core.prune_if_due() is not None
    assert core.prune_if_due() is None  # claimed: not due again within the hour
    assert _retained(alice, "plans/p.md") == [3]


def test_a_commit_prunes_when_a_prune_is_due(root: Path, vols) -> None:
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    for i in range(4):
        alice.write("plans/p.md", f"{i}")  # the first of these claimed the hour's prune
    assert _retained(alice, "plans/p.md") == [4, 3, 2, 1]
    two_hours_ago = repr(time.time() - 7200)
    alice._core.registry.transact(lambda tx: tx.put_meta("pruned_at", two_hours_ago))
    with CoherentVolume(root, agent="bob") as bob:  # a new core: its first commit looks whether one is due
        bob.read("plans/p.md")
        bob.write("plans/p.md", "bob")
        assert _retained(bob, "plans/p.md") == [5, 4]  # v4: alice's view, kept for her refusal diffs


def test_a_bad_policy_is_a_typed_error() -> None:
    with pytest.raises(VolumeConfigError, match="keep_last"):
        Retention(keep_last=0)
    with pytest.raises(VolumeConfigError, match="keep_days"):
        Retention(keep_days=-1)


def test_the_cli_sets_the_policy_at_init_changes_it_and_prunes(tmp_path: Path) -> None:
    import json
    import subprocess

    from .harness import CLI

    root = tmp_path / "vol"

    def cv(*args: str) -> str:
        done = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "merge: plans/log.md; keep versions 0 days, at least the last 1 per path" in cv(
        "init", str(root), "-m", "plans/**", "--merge", "plans/log.md", "--keep-days", "0", "--keep-last", "1"
    )
    with CoherentVolume(root, agent="alice") as alice:
        for i in range(3):
            alice.write("plans/p.md", f"{i}")
        assert alice.policy == Policy(("plans/log.md",), Retention(0, 1))
    assert json.loads(cv("prune", str(root), "--json")) == {"versions": 2, "objects": 2, "bytes": 2}
    cv("policy", str(root), "--no-merge", "--max-store-bytes", "100")
    assert json.loads(cv("policy", str(root), "--json")) == {
        "merge": [],
        "retention": {"keep_days": 0, "keep_last": 1, "max_bytes": 100},
    }
    bad = subprocess.run([CLI, "policy", str(root), "--keep-last", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "--keep-last" in bad.stderr


def test_a_last_prune_dated_in_the_future_does_not_stop_pruning(vols) -> None:
    """A prune claimed on a host clock that ran ahead dated the volume's last prune in the future:
    pruning is due again, not stopped until the registry's clock catches up."""
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    for i in range(3):
        alice.write("plans/p.md", f"{i}")
    forty_days_ahead = repr(time.time() + 40 * 86400)
    alice._core.registry.transact(lambda tx: tx.put_meta("pruned_at", forty_days_ahead))
    assert alice._core.prune_if_due() is not None
    assert _retained(alice, "plans/p.md") == [3]


def test_a_commit_that_finds_a_prune_due_prunes_one_step_and_its_next_commits_the_rest(root: Path, vols) -> None:
    """The writer whose commit finds a prune due waits for one short step (PRUNE_STEP versions), not
    for the whole prune; its next commits do a step each, and no other process starts the same
    prune meanwhile."""
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    for i in range(250):
        alice.write("plans/p.md", f"{i}")  # the first of these claimed the hour's prune
    two_hours_ago = repr(time.time() - 7200)
    alice._core.registry.transact(lambda tx: tx.put_meta("pruned_at", two_hours_ago))
    bob, carol = vols("bob"), vols("carol")
    bob.write("plans/q.md", "bob 1")
    assert len(_retained(bob, "plans/p.md")) == 250 - PRUNE_STEP
    assert carol._core.prune_if_due() is None, "bob's prune is under way: nobody else starts it"
    bob.write("plans/q.md", "bob 2")
    assert len(_retained(bob, "plans/p.md")) == 250 - 2 * PRUNE_STEP
    bob.write("plans/q.md", "bob 3")
    assert _retained(bob, "plans/p.md") == [250]
    bob.write("plans/q.md", "bob 4")  # the prune is over: this process looks again only in a minute
    assert _retained(bob, "plans/q.md") == [4, 3, 2, 1]


def test_a_prune_of_large_versions_drops_a_bounded_size_a_step(vols, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step of a prune (what a commit finding one due waits for, under the commit lock) frees at
    most PRUNE_STEP_BYTES of versions, or one version larger than that, however many are due:
    before, a step took a hundred versions whatever their size (4 MiB each: seconds of a writer's
    wait, and 20 MiB each: writers failing at the commit lock's 30 s)."""
    monkeypatch.setattr(history, "PRUNE_STEP_BYTES", 3000)
    alice = vols("alice")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    for i in range(8):
        alice.write("plans/p.md", bytes([65 + i]) * 1000)
    alice.write("plans/big.md", b"x" * 5000)
    alice.write("plans/big.md", b"y" * 5000)
    steps = []
    alice._core.registry.transact(lambda tx: tx.put_meta("pruned_at", repr(time.time() - 7200)))
    while (step := alice._core.prune_if_due()) is not None and step.versions:
        steps.append(step.bytes)
    assert steps == [3000, 3000, 1000, 5000], "oldest first, a step at most 3,000 bytes or one larger version"
    assert _retained(alice, "plans/p.md") == [8] and _retained(alice, "plans/big.md") == [2]


def test_a_prune_reads_each_history_once_however_many_versions_it_drops(vols, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning costs the versions it reads once, not once per version dropped (which made a byte
    budget's prune of a 10,000-version file take minutes, inside some writer's commit)."""
    alice = vols("alice")
    for i in range(300):
        alice.write("plans/p.md", f"{i:03}".encode() * 100)
    alice.set_policy(Policy(retention=Retention(keep_days=365, keep_last=2, max_bytes=600)))
    rows = 0

    def counted(method):
        def read(self, *args, **kwargs):
            nonlocal rows
            found = method(self, *args, **kwargs)
            rows += len(found)
            return found

        return read

    for name in ("history", "retained"):
        monkeypatch.setattr(SQLiteTransaction, name, counted(getattr(SQLiteTransaction, name)))
    assert alice.prune().versions == 298
    assert _retained(alice, "plans/p.md") == [300, 299]
    assert rows < 3 * 300, f"{rows} history rows read to prune 298 versions of one file"


def test_views_of_an_agent_inactive_longer_than_keep_days_stop_keeping_versions(vols) -> None:
    """A view keeps its version while its agent is live: it registered a view (any file's) within
    `keep_days`, and at least within the last day. An agent that ended without saying so (a session
    never resumed) keeps versions no longer."""
    alice, bob, carol = vols("alice"), vols("bob"), vols("carol")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "v1\n")
    alice.write("plans/q.md", "q\n")
    for reader in (bob, carol):
        reader.read("plans/p.md")
    alice.write("plans/p.md", "v2\n")
    alice.write("plans/p.md", "v3\n")
    two_days_ago = time.time() - 2 * DAY

    def read_at(agent: str, path: str, version: int, at: float) -> None:
        alice._core.registry.transact(lambda tx: tx.put_view(agent, path, version, at))

    read_at("bob", "plans/p.md", 1, two_days_ago)  # bob: nothing since, two days ago
    read_at("carol", "plans/p.md", 1, two_days_ago)
    carol.read("plans/q.md")  # carol read another file just now: she is live, her view of p v1 too
    assert alice.prune().versions == 1
    assert _retained(alice, "plans/p.md") == [3, 1]
    with pytest.raises(StaleWriteError) as refused:
        carol.write("plans/p.md", "carol\n")
    assert refused.value.diff is not None and "+v3" in refused.value.diff
    read_at("carol", "plans/q.md", 1, two_days_ago)  # now she too has been gone for two days
    alice.set_policy(Policy(retention=Retention(keep_days=3, keep_last=1, max_bytes=0)))  # prune all it may
    assert alice.prune().versions == 0, "keep_days 3: an agent gone for two days is still live"
    alice.set_policy(Policy(retention=Retention(keep_days=1, keep_last=1, max_bytes=0)))
    assert alice.prune().versions == 1
    assert _retained(alice, "plans/p.md") == [3]
    with pytest.raises(StaleWriteError) as refused:
        carol.write("plans/p.md", "carol\n")  # refused as before: only its diff is gone
    assert refused.value.diff is None and carol.read("plans/p.md") == b"v3\n"


def test_forgotten_views_keep_no_version(vols) -> None:
    """`forget_views`: an agent that will never act again (an MCP session's own name once its
    client went) keeps no version; were it to write, it would be refused as one that never read."""
    alice, gone = vols("alice"), vols("mcp:client:0123abcd")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "v1\n")
    gone.read("plans/p.md")
    alice.write("plans/p.md", "v2\n")
    assert alice.prune().versions == 0
    assert alice._core.forget_views("mcp:client:0123abcd") == 1
    assert alice.prune().versions == 1
    with pytest.raises(StaleWriteError) as refused:
        gone.write("plans/p.md", "late\n")
    assert refused.value.reason == "unread"


def test_a_refusal_whose_current_version_is_pruned_before_its_diff_shows_the_newer_one(
    vols, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bob's write is refused stale at alice's v2; before its diff is made alice commits v3 and a
    prune (keep_last=1) drops v2. bob's view (v1) is kept, so the refusal carries the diff from it
    to the current version, which it names (found by a hostile probe: the diff was None)."""
    from coherent_volume.core.history import History

    alice, bob = vols("alice"), vols("bob")
    alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
    alice.write("plans/p.md", "x\ny\n")
    bob.read("plans/p.md")
    alice.write("plans/p.md", "x\ny alice\n")
    real, pruned = History.refusal_diff, []

    def pruned_first(self: History, refusal: StaleWriteError) -> StaleWriteError:
        if not pruned:
            alice.write("plans/p.md", "x alice\ny alice\n")
            pruned.append(alice.prune().versions)
        return real(self, refusal)

    monkeypatch.setattr(History, "refusal_diff", pruned_first)
    with pytest.raises(StaleWriteError) as refused:
        bob.write("plans/p.md", "x\ny\nz bob\n")
    assert pruned == [1] and _retained(alice, "plans/p.md") == [3, 1]
    assert (refused.value.seen_version, refused.value.current_version) == (1, 3)
    assert refused.value.diff is not None and "+x alice\n" in refused.value.diff
    assert "current version is 3" in str(refused.value) and "+x alice" in str(refused.value)


_HOLDER = r"""
import os, sys
fd = os.open("plans/log.md", os.O_RDONLY)
print("opened", flush=True)
sys.stdin.readline()
lines = os.pread(fd, 1 << 20, 0).decode().splitlines(keepends=True)
with open("plans/t", "w") as saved:
    saved.write("".join(["1 by x\n", *lines[1:]]))
os.rename("plans/t", "plans/log.md")
print("saved", flush=True)
"""


def test_a_version_read_through_a_handle_opened_before_a_prune_keeps_its_bytes(root: Path, tmp_path: Path) -> None:
    """Through the mount, x opens log.md (a merge glob) at v1 and reads nothing yet; y commits v2..v4
    and a prune (keep_last=1) drops v1, which no view points at. x's first read through the old
    handle makes v1 its view: v1's bytes are kept again (from that handle), so x's save by rename
    merges onto v4 (found by a hostile probe: the view pointed at pruned bytes, and the save was
    refused EACCES with no diff)."""
    from .harness.mounts import Mount

    with CoherentVolume(root, agent="y") as y:
        y.set_policy(Policy(("plans/log.md",), Retention(keep_days=0, keep_last=1)))
        y.write("plans/log.md", "1\n2\n3\n")
    with Mount(root, tmp_path / "mnt") as m:
        env = {**os.environ, "COHERENT_AGENT": "x"}
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER],
            cwd=m.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "opened\n"
            with CoherentVolume(root, agent="y") as y:
                for k in range(3):
                    y.read("plans/log.md")
                    y.write("plans/log.md", f"1\n2\n3 by y {k}\n")
                assert y.prune().versions == 3 and _retained(y, "plans/log.md") == [4]
            assert holder.communicate("go\n", timeout=60)[0] == "saved\n" and holder.returncode == 0
        finally:
            holder.kill()
            holder.wait()
    with CoherentVolume(root, agent="check") as vol:
        assert _retained(vol, "plans/log.md") == [5, 4, 1]
        assert vol.read_version("plans/log.md", 1) == b"1\n2\n3\n"
        newest = vol.history("plans/log.md")[0]
        assert (newest.kind, newest.writer, newest.parents) == ("merge", "x", (1, 4))
    assert (root / "plans/log.md").read_text() == "1 by x\n2\n3 by y 2\n"


def test_a_commit_recovery_could_not_install_is_never_pruned(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit whose install met a change made outside the volume just before it (an editor's save)
    is put back over by that change (`recover`, `displaced`): its writer was told it landed, the file
    never kept it, and the log line says `restore` brings it back. The retention policy keeps its
    bytes however old and however many versions follow (before: a prune with keep_last 1 dropped
    them, and the acknowledged write was nowhere)."""
    from .test_install_exchange import SAVE, P, _editor_saves_first

    with CoherentVolume(root, agent="alice") as alice:
        alice.set_policy(Policy(retention=Retention(keep_days=0, keep_last=1)))
        alice.write(P, b"one\n")
        saved = _editor_saves_first(root, monkeypatch)
        assert alice.write(P, b"two\n") == 2
        monkeypatch.undo()
        assert saved and alice.read(P) == SAVE
        alice.write(P, b"four\n")
        alice.write(P, b"five\n")
        alice.prune()
        assert _retained(alice, P) == [5, 2]
        assert alice.read_version(P, 2) == b"two\n"
        alice.restore(P, 2)
        assert alice.read(P) == b"two\n"
