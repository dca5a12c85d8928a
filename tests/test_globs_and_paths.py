"""Managed globs and path confinement: what is protected, and what can never be reached."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from coherent_volume import CoherentVolume, GlobError, OutsideVolume, VolumeConfigError
from coherent_volume.errors import NotManaged, UnprotectedAlias
from coherent_volume.globs import ManagedGlobs, Wild


@pytest.mark.parametrize(
    "path,managed",
    [
        ("plans/a.md", True),
        ("plans/deep/er/x.txt", True),
        ("plans", False),
        ("README.md", True),
        ("docs/x.md", False),
        ("notes.txt", False),
        ("planss/a.md", False),
    ],
)
def test_glob_matching(path: str, managed: bool) -> None:
    assert ManagedGlobs.of(["plans/**", "*.md"]).matches(path) is managed


def test_double_star_in_the_middle_matches_zero_or_more_segments() -> None:
    g = ManagedGlobs.of(["src/**/*.py"])
    assert g.matches("src/a.py") and g.matches("src/x/y/a.py")
    assert not g.matches("src/a.pyc") and not g.matches("lib/a.py")


def test_character_classes() -> None:
    g = ManagedGlobs.of(["v[0-9].txt", "w[!a].txt", "x?.txt"])
    assert g.matches("v3.txt") and not g.matches("va.txt")
    assert g.matches("wb.txt") and not g.matches("wa.txt")
    assert g.matches("x1.txt") and not g.matches("x/.txt")


def test_a_commits_staged_name_is_never_managed_where_a_glob_reaches(tmp_path: Path) -> None:
    """A staged file a killed writer left beside its target (staging on another file system) is no
    file of the volume: a scan does not adopt it."""
    globs = ManagedGlobs.of(["plans/**"])
    assert not globs.matches("plans/.plan.md.cv-123-0a1b2c3d.tmp")
    assert globs.matches("plans/.plan.md.cv-123-0a1b2c3d.tmp.md") and globs.matches("plans/plan.cv-1-x.tmp")
    root = tmp_path / "vol"
    (root / "plans").mkdir(parents=True)
    with CoherentVolume(root, managed=["plans/**"], agent="a") as vol:
        (root / "plans/.plan.md.cv-123-0a1b2c3d.tmp").write_text("left by a killed writer\n")
        (root / "plans/plan.md").write_text("adopted\n")
        assert vol._core.scan() == []
        with vol._core.registry.read() as tx:
            assert [r.path for r in tx.files()] == ["plans/plan.md"]


def test_another_volumes_registry_below_the_root_is_never_managed(tmp_path: Path) -> None:
    """A volume bind-mounted into another's managed tree (as a container runtime may) puts its
    `.coherent` below the outer root: no glob makes those files managed, so the outer volume never
    records the inner registry as its files nor replaces them by a commit (before, an agent of the
    outer volume read and wrote the inner registry.db as a managed file: the inner volume no longer
    opened, every version in it lost)."""
    globs = ManagedGlobs.of(["plans/**", "**/*.db"])
    assert not globs.matches("plans/sub/.coherent/registry.db") and not globs.matches(".coherent/registry.db")
    assert not globs.reaches("plans/sub/.coherent") and globs.reaches("plans/sub")
    assert globs.matches("plans/sub/.coherentish/x.db") and globs.matches("plans/sub/x.coherent")
    outer, inner = tmp_path / "outer", tmp_path / "inner"
    (outer / "plans").mkdir(parents=True)
    inner.mkdir()
    with CoherentVolume(inner, managed=["plans/**"], agent="b") as b:
        b.write("plans/b.md", "B v1\n")
    CoherentVolume(outer, managed=["plans/**"], agent="a").close()
    inside = outer / "plans" / "sub"
    inner.rename(inside)  # (a bind mount there does the same: init refuses to nest, a mount cannot)
    registry = (inside / ".coherent" / "registry.db").read_bytes()
    with CoherentVolume(outer, agent="a") as a:
        assert not a._core.resolve("plans/sub/.coherent/registry.db").managed
        with pytest.raises(NotManaged):
            a.history("plans/sub/.coherent/registry.db")
        a._core.scan()
        with a._core.registry.read() as tx:
            assert [r.path for r in tx.files()] == ["plans/sub/plans/b.md"]
    assert (inside / ".coherent" / "registry.db").read_bytes() == registry
    inside.rename(inner)
    with CoherentVolume(inner, agent="b") as b:
        assert b.read("plans/b.md") == b"B v1\n"


@pytest.mark.parametrize(
    "bad", ["", "   ", "/abs/**", "a/../b", "a//b", "a**", "**b/c", "x[", "x[]", "y]", "a\\b", "nul\0"]
)
def test_malformed_globs_raise_glob_error(bad: str) -> None:
    with pytest.raises(GlobError):
        ManagedGlobs.of([bad])


def test_no_globs_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(GlobError, match="protect nothing"):
        CoherentVolume(tmp_path, managed=[])


def test_globs_are_a_set(tmp_path: Path) -> None:
    assert ManagedGlobs.of(["b/**", "a/**", "a/**"]) == ManagedGlobs.of(["a/**", "b/**"])


@given(st.text(alphabet="ab/.", min_size=1, max_size=12))
def test_single_star_never_crosses_a_slash(name: str) -> None:
    g = ManagedGlobs.of(["*"])
    assert g.matches(name) == ("/" not in name)


def test_opening_with_other_globs_is_refused(root: Path) -> None:
    with pytest.raises(VolumeConfigError, match="a second policy is never applied"):
        CoherentVolume(root, managed=["other/**"])
    with CoherentVolume(root, managed=["*.md", "plans/**"]) as same_globs_other_order:
        assert same_globs_other_order.managed == ("*.md", "plans/**")


def test_missing_root_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(VolumeConfigError, match="not an existing directory"):
        CoherentVolume(tmp_path / "nope", managed=["*"])


@pytest.mark.parametrize("path", ["../outside.md", "plans/../../x", "/etc/passwd", "plans/\0x"])
def test_paths_leaving_root_raise(vols, path: str) -> None:
    with pytest.raises(OutsideVolume):
        vols("alice").read(path)
    with pytest.raises(OutsideVolume):
        vols("alice").write(path, b"x")


def test_symlink_escaping_root_raises_and_writes_nothing(vols, root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.md"
    outside.write_text("keep")
    (root / "plans" / "link.md").symlink_to(outside)
    alice = vols("alice")
    with pytest.raises(OutsideVolume):
        alice.read("plans/link.md")
    with pytest.raises(OutsideVolume):
        alice.write("plans/link.md", b"gotcha")
    assert outside.read_text() == "keep"


def test_symlink_inside_root_is_the_target(vols, root: Path) -> None:
    alice = vols("alice")
    alice.write("plans/real.md", b"one")
    (root / "plans" / "alias.md").symlink_to("real.md")
    assert alice.read("plans/alias.md") == b"one"
    assert alice.write("plans/alias.md", b"two") == 2
    assert (root / "plans" / "alias.md").is_symlink() and (root / "plans" / "real.md").read_bytes() == b"two"


def test_the_volume_root_is_named_as_it_was_given(vols, root: Path) -> None:
    alice = vols("alice")
    for path in (f"{root}/", str(root), ".", "plans/.."):
        with pytest.raises(OutsideVolume) as refused:
            alice.write(path, b"x")
        assert str(refused.value) == f"{path!r} is the volume root itself, not a file in it"


def test_a_managed_name_linked_to_an_unmanaged_file_is_said_to_have_no_versions(vols, root: Path) -> None:
    """What reads versions (version, history, a version's bytes, a diff) asked of a managed name that
    is a symlink out of the globs is told that it has none, and why; a write through it is refused."""
    (root / "notes").mkdir()
    (root / "notes/n.txt").write_text("N\n")
    (root / "plans/alias.md").symlink_to("../notes/n.txt")
    alice = vols("alice")
    asked = {
        "version": lambda: alice.version("plans/alias.md"),
        "history": lambda: alice.history("plans/alias.md"),
        "read_version": lambda: alice.read_version("plans/alias.md", 1),
        "diff": lambda: alice.diff("plans/alias.md", 0, 1),
    }
    for what, ask in asked.items():
        with pytest.raises(UnprotectedAlias) as said:
            ask()
        text = str(said.value)
        assert text.startswith("'plans/alias.md' is managed but is a symlink (or lies below one) to the unmanaged")
        assert f"it has no versions ({what} applies to managed files" in text and "writes through it" not in text
    with pytest.raises(UnprotectedAlias, match="writes through it are refused"):
        alice.write("plans/alias.md", b"x")
    assert (root / "notes/n.txt").read_text() == "N\n"


@pytest.mark.parametrize("path", [".coherent/registry.db", ".coherent", "plans/../.coherent/commit.lock"])
def test_registry_directory_is_unreachable(vols, path: str) -> None:
    alice = vols("alice")
    with pytest.raises(OutsideVolume, match="registry"):
        alice.read(path)
    with pytest.raises(OutsideVolume, match="registry"):
        alice.write(path, b"x")
    with pytest.raises(OutsideVolume, match="registry"):
        alice.delete(path)


def test_registry_is_private(root: Path) -> None:
    assert os.stat(root / ".coherent").st_mode & 0o777 == 0o700
    assert os.stat(root / ".coherent" / "registry.db").st_mode & 0o777 == 0o600


def test_resolution_is_stable_while_the_file_is_being_replaced(vols, root: Path) -> None:
    """Regression: a path resolved during a concurrent commit once came back as '<path> (deleted)'."""
    import threading

    writer = vols("writer")
    writer.write("plans/hot.md", b"0")
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            writer.write("plans/hot.md", str(i).encode())

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        paths = writer._core.paths
        seen = {paths.resolve("plans/hot.md").rel for _ in range(3000)}
        seen |= {paths.resolve(str(root / "plans/hot.md")).rel for _ in range(1000)}
    finally:
        stop.set()
        thread.join()
    assert seen == {"plans/hot.md"}


def test_paths_with_dot_segments_resolve_to_their_canonical_form(vols, root: Path) -> None:
    alice = vols("alice")
    alice.write("plans/a.md", b"x")
    assert alice._core.resolve("plans/./sub/../a.md").rel == "plans/a.md"
    assert alice._core.resolve(str(root / "plans" / "a.md")).rel == "plans/a.md"
    assert alice._core.resolve("plans//a.md").rel == "plans/a.md"


def test_which_directories_a_glob_reaches() -> None:
    globs = ManagedGlobs.of(["plans/**", "*.md", "docs/*/x.txt"])
    reached = {d: globs.reaches(d) for d in ("", "plans", "plans/a/b", "notes", "docs", "docs/q", "docs/q/r", "x.md")}
    assert reached == {
        "": True,
        "plans": True,
        "plans/a/b": True,
        "notes": False,
        "docs": True,
        "docs/q": True,
        "docs/q/r": False,
        "x.md": False,  # '*.md' is one segment at the root: nothing under a directory named x.md matches it
    }


@pytest.mark.parametrize(
    ("pattern", "reached", "not_reached"),
    [
        ("**/*.md", ["", "any/depth/at/all", ".hidden"], []),
        ("**", ["", "a", "a/b/c"], []),
        ("a/**/b.md", ["", "a", "a/x/y"], ["b", "x/a"]),
        ("a/**", ["", "a", "a/b"], ["b", "ab"]),
        ("a/b/c.md", ["", "a", "a/b"], ["a/b/c.md", "a/c", "b"]),
        ("[pq]lans/*.md", ["", "plans", "qlans"], ["rlans", "plans/sub", "[pq]lans"]),
        ("[!p]*/x", ["", "docs", "q"], ["p", "plans", "docs/x"]),
        ("[]x]/a", ["", "]", "x"], ["y", "[]x]"]),
        ("d?/x", ["", "da"], ["d", "dab", "d/"]),
        ("plans/**", ["plans"], ["Plans", "PLANS", "plan", "plans2"]),  # case-sensitive, as `matches` is
    ],
)
def test_reaches_decides_each_glob_form(pattern: str, reached: list[str], not_reached: list[str]) -> None:
    globs = ManagedGlobs.of([pattern])
    assert {d: globs.reaches(d) for d in reached + not_reached} == {
        **dict.fromkeys(reached, True),
        **dict.fromkeys(not_reached, False),
    }


@pytest.mark.parametrize("pattern", ["plans/**", "*.md", "**/*.md", "a/**/b/*.txt", "[a-c]?/**/z", "x/[!y]/*"])
def test_every_ancestor_of_a_managed_path_is_reached_and_no_other_directory(pattern: str) -> None:
    """`reaches` agrees with `matches`: over every directory of a sample tree, it is True exactly where
    a sampled path below matches (the sample holds a matching path under each directory that can hold one)."""
    names = ["plans", "a", "b", "x", "y", "z", "ab", "bq", "n.md", "t.txt", "Plans"]
    paths = ["/".join(p) for depth in (1, 2, 3, 4) for p in itertools.product(names, repeat=depth)]
    globs = ManagedGlobs.of([pattern])
    holders = {"/".join(p.split("/")[:i]) for p in paths if globs.matches(p) for i in range(p.count("/") + 1)}
    assert holders, "the sample must hold managed paths"
    for directory in ["", *(p for p in paths if p.count("/") < 2)]:
        assert globs.reaches(directory) == (directory in holders), directory


@pytest.mark.parametrize(
    ("managed", "merge", "shared"),
    [
        (["plans/**"], "notes/*.md", False),
        (["plans/**"], "plans/log.md", True),
        (["plans/**"], "plans", False),  # 'plans/**' is what lies below plans/, not plans itself
        (["plans/**"], "**", True),
        (["plans/**"], "**/*.md", True),
        (["plans/**"], "*.md", False),  # one segment, at the root
        (["plans/**"], "p*/x", True),
        (["plans/**"], "q*/x", False),
        (["plans/**"], "pla?s/x", True),
        (["plans/**", "*.md"], "README.md", True),
        (["plans/**", "*.md"], "*.txt", False),
        (["plans/**", "*.md"], "docs/**/x.md", False),
        (["src/**/*.py"], "src/a.txt", False),
        (["src/**/*.py"], "**/x.py", True),
        (["*.md"], "*.m?", True),
        (["a[bc]/x"], "a[de]/x", True),  # two classes are taken to share a character
        (["a/b"], "a[%-0]b", True),  # a class holding '/' matches across segments: 'a/b' matches both
    ],
)
def test_may_share_decides_whether_a_glob_can_match_a_managed_path(
    managed: list[str], merge: str, shared: bool
) -> None:
    assert ManagedGlobs.of(managed).may_share(merge) is shared


_NAMES = ["a", "b", "aa", "ab", "ba", "bb"]
_SAMPLE = ["/".join(p) for depth in (1, 2, 3, 4) for p in itertools.product(_NAMES, repeat=depth)]


def _glob(tokens: list[str]) -> st.SearchStrategy[str]:
    segment = st.lists(st.sampled_from(tokens), min_size=1, max_size=2).map("".join).filter(lambda s: "**" not in s)
    return st.lists(segment | st.just("**"), min_size=1, max_size=3).map("/".join)


@given(_glob(["a", "b", "*", "?", "[ab]", "[!a]"]), _glob(["a", "b", "*", "?", "[ab]", "[!a]"]))
def test_a_glob_said_to_share_no_path_with_the_managed_ones_shares_none(managed: str, other: str) -> None:
    """Soundness: where `may_share` says no, no sampled path matches both globs."""
    globs, others = ManagedGlobs.of([managed]), ManagedGlobs.of([other])
    if not globs.may_share(other):
        assert not [p for p in _SAMPLE if globs.matches(p) and others.matches(p)]


@given(_glob(["a", "b", "*"]), _glob(["a", "b", "*"]))
def test_without_classes_may_share_is_exact(managed: str, other: str) -> None:
    """Globs of plain characters, '*' and '**': where `may_share` says yes, a sampled path matches
    both (the sample holds a witness for globs this small)."""
    globs, others = ManagedGlobs.of([managed]), ManagedGlobs.of([other])
    witnesses = [p for p in _SAMPLE if globs.matches(p) and others.matches(p)]
    assert globs.may_share(other) is bool(witnesses)


# ---- may_match: every path of a shape at once ----------------------------------------------------

_NAMES = ["".join(p) for n in (1, 2) for p in itertools.product("a.0z", repeat=n) if "".join(p) not in (".", "..")]
"""Names of up to 2 characters: 'z' is in no glob, so it stands for any other character."""
_FILLS = {
    Wild.NAME: ["".join(p) for n in (0, 1, 2) for p in itertools.product("a.0z", repeat=n)],
    Wild.NUMBER: ["".join(p) for n in (1, 2) for p in itertools.product("0-", repeat=n)],
    Wild.PATH: ["", "a", "..", "../a", "a/b", "/a"],
}


def _spellings(segment: object) -> list[str]:
    """Every text a shape's segment spells within the bounds: a `Wild.DIRS` up to 2 names."""
    if segment == [Wild.DIRS]:
        return ["/".join(p) for n in (0, 1, 2) for p in itertools.product(_NAMES, repeat=n)]
    texts = [""]
    for piece in segment:  # type: ignore[attr-defined]
        fills = _FILLS[piece] if isinstance(piece, Wild) else [piece]
        texts = [t + f for t in texts for f in fills]
    return texts


_glob_token = st.sampled_from(["a", ".", "0", "*", "?", "[a.]", "[.]", "[!a]", "[.-0]"])
_glob_segment = st.one_of(
    st.just("**"), st.lists(_glob_token, min_size=1, max_size=2).map("".join).filter(lambda s: "**" not in s)
)
_shape_segment = st.one_of(
    st.just([Wild.DIRS]),
    st.lists(st.sampled_from(["a", ".", "0", "..", Wild.NAME, Wild.NUMBER, Wild.PATH]), min_size=1, max_size=2),
)


@settings(max_examples=400, deadline=None)
@example(["a/0"], [["a"], [Wild.NAME], ["0"]])  # the name may be empty: a//0 is a/0
@example(["[.]/*"], [[Wild.DIRS], ["a"]])  # no file is named '.'
@given(
    st.lists(st.lists(_glob_segment, min_size=1, max_size=2).map("/".join), min_size=1, max_size=2),
    st.lists(_shape_segment, min_size=1, max_size=3),
)
def test_may_match_agrees_with_matching_every_path_of_the_shape(patterns: list[str], segments: list) -> None:
    """Brute force: every path a shape spells (wildcards filled from a small alphabet, up to a bound)
    is matched against the globs. `may_match` is never False when one matches (a refusal it allows
    would lose a write); and when the shape holds nothing uncertain (no `Wild.PATH`, no segment that
    may spell '', '.' or '..', no class that may match '/'), it is never True when none does: the
    bound is wide enough to hold a witness of every match (globs of 2 segments, each of 2 characters:
    names of up to 2 characters, 2 directories)."""
    try:
        globs = ManagedGlobs.of(patterns)
    except GlobError:
        return
    pieces: list = []
    for index, segment in enumerate(segments):
        pieces += (["/"] if index else []) + segment
    if sum(isinstance(p, Wild) for p in pieces) > 2 or sum(p.count("**") for p in patterns) > 1:
        return  # keeps the enumeration small
    spelled = itertools.product(*(_spellings(s) for s in segments))
    uncertain = Wild.PATH in pieces or "[.-0]" in "".join(patterns)
    found = False
    for parts in spelled:
        names = [n for n in "/".join(parts).split("/") if n not in ("", ".")]
        if any(part in ("", ".", "..") for part, s in zip(parts, segments, strict=True) if s != [Wild.DIRS]):
            uncertain = True
        if ".." in names or "/".join(parts).startswith("/"):
            uncertain = True
            continue
        found = bool(names) and globs.matches("/".join(names))  # the root itself is no file
        if found:
            break  # a match decides it: `may_match` must say True, however uncertain the rest
    answer = globs.may_match(pieces)
    if found or uncertain:
        assert answer or not found, (patterns, pieces)
    else:
        assert not answer, (patterns, pieces)
    if found:
        assert answer, (patterns, pieces)


@pytest.mark.parametrize(
    ("shape", "may"),
    [
        (["logs/", Wild.NUMBER, ".log"], False),  # no glob reaches logs/
        (["plans/", Wild.NUMBER, ".md"], True),
        (["", Wild.NUMBER, ".md"], True),  # '*.md' at the root
        (["logs/", Wild.NUMBER, ".md"], False),  # ... and only there
        (["build/", Wild.DIRS], False),  # nothing under build/ is managed
        (["build"], False),
        (["", Wild.DIRS], True),
        (["plans/", Wild.DIRS], True),
        (["plans"], False),  # 'plans/**' is what is below plans, not plans itself
        (["logs/", Wild.NAME], True),  # the name may be '..'
        (["logs/", Wild.NAME, ".log"], False),
        (["logs/", Wild.NUMBER, "/../a.md"], True),
        (["logs/", Wild.PATH, ".log"], True),  # a '/' in it may reach anywhere
        (["logs//./", Wild.NUMBER, ".log"], False),
        (["/abs/", Wild.NUMBER], True),
        (["logs/a", Wild.DIRS], True),  # not a whole segment
    ],
)
def test_may_match_of_each_form(shape: list, may: bool) -> None:
    assert ManagedGlobs.of(["plans/**", "*.md"]).may_match(shape) is may


def test_may_match_with_unanchored_and_deep_globs() -> None:
    globs = ManagedGlobs.of(["**/*.md", "docs/*/x.txt"])
    assert globs.may_match(["build/", Wild.DIRS])  # '**/*.md' reaches every directory
    assert not globs.may_match(["build/", Wild.DIRS, "/", Wild.NAME, ".o"])
    assert globs.may_match(["docs/", Wild.NUMBER, "/x.txt"]) and not globs.may_match(["docs/", Wild.NUMBER, "/y.txt"])
    assert globs.may_match(["docs/", Wild.DIRS, "/", Wild.NUMBER, "/x.txt"])  # no directory between
    assert not globs.may_match(["docs/", Wild.NUMBER, "/", Wild.NUMBER, "/x.txt"])  # two segments between
    assert ManagedGlobs.of(["a[.-0]b"]).may_match(["elsewhere"])  # the class may match '/': anything may
    assert ManagedGlobs.of(["[!!-~]"]).may_match([Wild.DIRS])  # a name of one character beyond ASCII's printables
    assert not ManagedGlobs.of(["[!!-~]"]).may_match(["a", Wild.NUMBER])
