"""Retention: versions' bytes are pruned by the volume's policy, never the current version's, a
version some agent's view points at, or a path's last `keep_last`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, Policy, Retention, StaleWriteError, VersionGone, VolumeConfigError
from coherent_volume.fingerprint import content_hash
from coherent_volume.registry import objects

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
