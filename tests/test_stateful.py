"""A stateful property test: the volume against a small reference model of the protocol."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from coherent_volume import CasConflict, CoherentVolume, StaleWriteError

AGENTS = ("a", "b")  # b uses read-set isolation
PATHS = ("plans/x", "plans/y")
DATA = (b"", b"1", b"22", b"333")


class Model:
    """Reference semantics, written from the issue text: versions, views, refusals."""

    def __init__(self) -> None:
        self.version: dict[str, int] = {}
        self.content: dict[str, bytes | None] = {}
        self.views: dict[tuple[str, str], int] = {}

    def read(self, agent: str, path: str) -> bytes | None:
        if path in self.version:
            self.views[agent, path] = self.version[path]
        elif agent == "b":  # read-set isolation counts a read that found no file that ever was
            self.views[agent, path] = 0
        return self.content.get(path)

    def refusal(self, agent: str, path: str, expected: int | None) -> str | None:
        v = self.version.get(path, 0)
        exists = self.content.get(path) is not None
        seen = self.views.get((agent, path))
        if expected is not None:
            if expected != v:
                return "stale"
        elif exists and seen is None:
            return "unread"
        elif seen is not None and seen != v:
            return "stale"
        if agent == "b":
            for (who, other), seen_other in self.views.items():
                if who == agent and other != path and self.version.get(other, 0) != seen_other:
                    return "read-set"
        return None

    def commit(self, writer: str | None, path: str, data: bytes | None) -> int:
        """Identical content is a no-op (no version, nobody invalidated) but the writer now knows it."""
        if self.content.get(path) == data and (data is not None or path in self.version):
            if writer is not None:
                self.views[writer, path] = self.version[path]
            return self.version.get(path, 0)
        self.version[path] = self.version.get(path, 0) + 1
        self.content[path] = data
        if writer is not None:
            self.views[writer, path] = self.version[path]
        return self.version[path]


class VolumeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp())
        (self.dir / "plans").mkdir()
        self.vols = {
            "a": CoherentVolume(self.dir, managed=["plans/**"], agent="a"),
            "b": CoherentVolume(self.dir, agent="b", isolation="read-set"),
        }
        self.model = Model()

    def teardown(self) -> None:
        for v in self.vols.values():
            v.close()
        shutil.rmtree(self.dir)

    @rule(agent=st.sampled_from(AGENTS), path=st.sampled_from(PATHS))
    def read(self, agent: str, path: str) -> None:
        expected = self.model.read(agent, path)
        try:
            got: bytes | None = self.vols[agent].read(path)
        except FileNotFoundError:
            got = None
        assert got == expected

    def _write(self, agent: str, path: str, data: bytes | None, expected: int | None) -> None:
        reason = self.model.refusal(agent, path, expected)
        if data is None and reason is None and self.model.content.get(path) is None:
            try:
                self.vols[agent].delete(path)
                raise AssertionError("deleting a missing file must fail")
            except FileNotFoundError:
                return
        vol = self.vols[agent]
        try:
            if data is None:
                got = vol.delete(path)
            elif expected is None:
                got = vol.write(path, data)
            else:
                got = vol.write_cas(path, expected, data)
        except StaleWriteError as e:
            assert e.reason == reason, (e, reason)
            assert isinstance(e, CasConflict) == (expected is not None)
            return
        assert reason is None, f"accepted a write the model refuses ({reason})"
        assert got == self.model.commit(agent, path, data)

    @rule(agent=st.sampled_from(AGENTS), path=st.sampled_from(PATHS), data=st.sampled_from(DATA))
    def write(self, agent: str, path: str, data: bytes) -> None:
        self._write(agent, path, data, None)

    @rule(
        agent=st.sampled_from(AGENTS),
        path=st.sampled_from(PATHS),
        data=st.sampled_from(DATA),
        expected=st.integers(0, 4),
    )
    def write_cas(self, agent: str, path: str, data: bytes, expected: int) -> None:
        self._write(agent, path, data, expected)

    @rule(agent=st.sampled_from(AGENTS), path=st.sampled_from(PATHS))
    def delete(self, agent: str, path: str) -> None:
        self._write(agent, path, None, None)

    @rule(agent=st.sampled_from(AGENTS), path=st.sampled_from(PATHS))
    def forget(self, agent: str, path: str) -> None:
        self.vols[agent].forget(path)
        self.model.views.pop((agent, path), None)

    @rule(path=st.sampled_from(PATHS), data=st.sampled_from(DATA))
    def foreign_write(self, path: str, data: bytes) -> None:
        (self.dir / path).write_bytes(data)
        self.model.commit(None, path, data)

    @rule(path=st.sampled_from(PATHS))
    def foreign_delete(self, path: str) -> None:
        if (self.dir / path).exists():
            (self.dir / path).unlink()
            self.model.commit(None, path, None)

    @invariant()
    def stale_sets_and_versions_agree(self) -> None:
        for agent in AGENTS:
            expected = sorted(
                p
                for (who, p), seen in self.model.views.items()
                if who == agent and self.model.version.get(p, 0) != seen
            )
            assert self.vols[agent].stale() == expected
        for path in PATHS:
            assert self.vols["a"].version(path) == self.model.version.get(path, 0)


VolumeMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestVolumeAgainstModel = VolumeMachine.TestCase
