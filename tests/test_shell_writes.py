"""What `shell_writes` recognises a shell command writes, on a real volume: the files (with how)
for a command run in the volume, or the refusal of a write whose file is known only when the
command runs. Each row is a command a hook must not let through unchecked, or one it must leave
alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from coherent_volume.errors import UnresolvedShellWrite
from coherent_volume.shell_writes import shell_writes

W, A = "write", "append"
PLAN = [("plans/plan.md", W)]
UNRESOLVED = "unresolved"

CASES: list[tuple[str, str, object]] = [
    # (command, cwd relative to the volume, expected: [(path relative to the volume, kind)] or UNRESOLVED)
    ("echo hi > plans/plan.md", ".", PLAN),
    ("sed -i s/a/b/ plans/plan.md", ".", PLAN),
    ("echo hi >> plans/plan.md", ".", [("plans/plan.md", A)]),
    ("cat plans/plan.md | wc -l > /dev/null 2>&1", ".", [("/dev/null", W)]),
    ("echo x > notes.txt; git status", ".", [("notes.txt", W)]),
    # globs and braces, expanded against the cwd as bash does (no match: the word itself)
    ("sed -i s/a/b/ plans/*.md", ".", [("plans/other.md", W), ("plans/plan.md", W)]),
    ("sed -i s/a/b/ plans/plan.m?", ".", PLAN),
    ("sed -i s/a/b/ plans/pla[nm].md", ".", PLAN),
    ("echo hi > plans/{plan,x}.md", ".", [("plans/plan.md", W), ("plans/x.md", W)]),
    ("rm plans/*.txt", ".", [("plans/*.txt", W)]),
    ("echo hi > 'plans/*.md' plans/\\?", ".", [("plans/*.md", W)]),
    ("sed -i s/a/b/ *.md", "plans", [("plans/other.md", W), ("plans/plan.md", W)]),
    # cd is followed in its shell, not out of a subshell or pipeline
    ("cd plans && echo hi > plan.md", ".", PLAN),
    ("cd plans; echo hi > plan.md", ".", PLAN),
    ("(cd plans; sed -i s/a/b/ plan.md)", ".", PLAN),
    ("(cd plans; true); echo hi > plan.md", ".", [("plan.md", W)]),
    ("cd plans | true; echo hi > plan.md", ".", [("plan.md", W)]),
    ("cd missing; echo hi > plan.md", "plans", [("plans/missing/plan.md", W), ("plans/plan.md", W)]),
    ("cd .. && rm plans/plan.md", "plans", [("plans/../plans/plan.md", W)]),
    ("cd $DIR && echo hi > plan.md", ".", UNRESOLVED),
    ("cd /tmp && echo hi > $X", ".", []),
    ("f() { sed -i s/a/b/ plan.md; }; cd plans && f", ".", PLAN),
    # keywords and compound commands hide no command
    ("if true; then sed -i s/a/b/ plans/plan.md; fi", ".", PLAN),
    ("if false; then :; elif true; then :; else rm plans/plan.md; fi", ".", PLAN),
    ("for i in 1; do rm plans/plan.md; done", ".", PLAN),
    ("while false; do tee plans/plan.md; done", ".", PLAN),
    ("case x in x) rm plans/plan.md;; esac", ".", PLAN),
    ("{ rm plans/plan.md; }", ".", PLAN),
    ("! cp plans/other.md plans/plan.md", ".", PLAN),
    ("echo $(echo hi > plans/plan.md)", ".", PLAN),
    ("echo `echo hi > plans/plan.md`", ".", PLAN),
    ("bash -c 'echo hi > plans/plan.md'", ".", PLAN),
    ("eval 'cd plans'; rm plan.md", ".", PLAN),
    ("[ a > plans/plan.md ]", ".", PLAN),
    ("[[ a > plans/plan.md ]]", ".", []),
    ("rm() { :; }; rm plans/plan.md", ".", []),
    ("rm() { :; }; command rm plans/plan.md", ".", PLAN),
    ("f() { f; f; f; f; f; f; f; f; f; f; }; f", ".", UNRESOLVED),
    ("coproc w { rm plans/plan.md; }", ".", PLAN),
    ("echo a >> plans/plan.md; echo b > plans/plan.md; rm plans/plan.md", ".", PLAN),
    # redirections by their operator
    ("echo hi >& plans/plan.md", ".", PLAN),
    ("echo hi &> plans/plan.md", ".", PLAN),
    ("echo hi >| plans/plan.md", ".", PLAN),
    ("echo hi &>> plans/plan.md", ".", [("plans/plan.md", A)]),
    ("echo hi 1<>plans/plan.md", ".", PLAN),
    ("exec 3>plans/plan.md", ".", PLAN),
    ("echo hi 2>&1 >&2 < plans/plan.md", ".", []),
    ("cat > out.txt plans/plan.md", ".", [("out.txt", W)]),
    ("> plans/plan.md", ".", PLAN),
    (
        "echo hi | tee >(cat > plans/plan.md) > /dev/null",
        ".",
        [("/dev/fd/63", W), ("plans/plan.md", W), ("/dev/null", W)],
    ),
    # wrappers, with their own options
    ("nice -n 5 tee plans/plan.md", ".", PLAN),
    ("timeout -s KILL 5 tee plans/plan.md", ".", PLAN),
    ("sudo -u root tee plans/plan.md", ".", PLAN),
    ("env -i -u BAR FOO=1 tee plans/plan.md", ".", PLAN),
    ("env -C plans sed -i s/a/b/ plan.md", ".", PLAN),
    ("time -p stdbuf -oL ionice -c 3 setsid chronic nohup doas command exec tee plans/plan.md", ".", PLAN),
    ("command -v tee plans/plan.md", ".", []),
    ("sudo -Eu root tee plans/plan.md", ".", PLAN),
    ("cp -rt plans notes.txt", ".", [("plans/notes.txt", W)]),
    ("builtin cd plans && rm plan.md", ".", PLAN),
    ("time { sed -i s/a/b/ plans/plan.md; }", ".", PLAN),
    ("trap 'rm -f plans/plan.md' EXIT; echo hi", ".", PLAN),
    # operands that come from elsewhere, and expansions: unknown in a volume
    ("xargs rm <<< plans/plan.md", ".", UNRESOLVED),
    ("ls | xargs -I{} cp {} plans/", ".", UNRESOLVED),
    ("find plans -name plan.md -delete", ".", UNRESOLVED),
    ("find . -name '*.md' -exec sed -i s/a/b/ {} +", ".", UNRESOLVED),
    ("find . -name '*.md' -exec grep a {} +; ls | xargs grep a", ".", []),
    ("f=plans/plan.md; echo hi > $f", ".", UNRESOLVED),
    ("echo hi > plans/$(date).md", ".", UNRESOLVED),
    ("echo hi > plans/$((1+1)).md", ".", UNRESOLVED),
    ('for f in plans/*.md; do sed -i s/a/b/ "$f"; done', ".", UNRESOLVED),
    ("echo hi > /tmp/$X", ".", []),
    ('echo hi > "$PWD/plans/plan.md"', ".", PLAN),
    ("cd plans && echo hi > ${PWD}/plan.md", ".", PLAN),
    ("echo 'unterminated > plans/plan.md", ".", UNRESOLVED),
    ("rm f{1..5000}", ".", UNRESOLVED),
    ("shopt -s globstar; sed -i s/a/b/ **/*.md", ".", UNRESOLVED),
    ("find . -name plans -execdir sed -i s/a/b/ plan.md ';'", ".", UNRESOLVED),
    ("cd - && rm plan.md", ".", UNRESOLVED),
    ("eval " + "'eval " * 9 + "rm plan.md" + "'" * 9, ".", UNRESOLVED),
    ("echo hi > \udcff\ud800", ".", UNRESOLVED),
    # here-documents and here-strings are data
    ("cat > plans/plan.md <<EOF\nx\nEOF", ".", PLAN),
    ("cat <<EOF > plans/plan.md\nx\nEOF", ".", PLAN),
    ("cat <<'E1' | tee plans/plan.md\n> not a redirect\nE1", ".", PLAN),
    ("cat <<EOF\n$(rm plans/plan.md)\nEOF", ".", PLAN),
    ("cat <<'EOF'\n$(rm plans/plan.md)\nEOF", ".", []),
    ("x=$((1<<SHIFT))\necho hi > plans/plan.md", ".", PLAN),
    ("tr a b <<<word\necho hi > plans/plan.md", ".", PLAN),
    ("echo '<<EOF'\nsed -i s/a/b/ plans/plan.md", ".", PLAN),
    ("cat <<EOF\nbody\nEOF\nsed -i s/a/b/ plans/plan.md", ".", PLAN),
    # the commands recognised before
    ("sed -i -e s/a/b/ -- plans/plan.md", ".", PLAN),
    ("perl -pi -e s/a/b/ plans/plan.md", ".", PLAN),
    ("awk -i inplace '{print}' plans/plan.md", ".", PLAN),
    ("mv plans/other.md plans/plan.md", ".", [("plans/plan.md", W), ("plans/other.md", W)]),
    ("cp -t plans plans/other.md", ".", [("plans/other.md", W)]),
    ("cp notes.txt plans", ".", [("plans/notes.txt", W)]),
    ("cp -r plans/../plans .", ".", [("./plans/other.md", W), ("./plans/plan.md", W)]),
    ("ln -sf /etc/hostname plans/plan.md", ".", PLAN),
    ("truncate -s0 plans/plan.md; dd if=/dev/null of=plans/plan.md", ".", PLAN),
    ("echo hi | tee -a plans/plan.md", ".", [("plans/plan.md", A)]),
    ("rm -r plans", ".", [("plans/other.md", W), ("plans/plan.md", W)]),
]


@pytest.mark.parametrize(("command", "cwd", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_what_a_command_writes(root: Path, command: str, cwd: str, expected: object, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(root))
    monkeypatch.delenv("CDPATH", raising=False)
    (root / "plans/plan.md").write_text("a\n")
    (root / "plans/other.md").write_text("o\n")
    if expected == UNRESOLVED:
        with pytest.raises(UnresolvedShellWrite) as refused:
            shell_writes(command, str(root) if cwd == "." else f"{root}/{cwd}")
        assert str(root) in str(refused.value) and "Name the file literally" in str(refused.value)
        return
    writes = shell_writes(command, str(root) if cwd == "." else f"{root}/{cwd}")
    wanted = [(p if p.startswith("/") else f"{root}/{p}", k) for p, k in expected]  # type: ignore[attr-defined]
    assert sorted(writes) == sorted(wanted), command


def test_home_and_unknown_places(root: Path, tmp_path: Path, monkeypatch) -> None:
    """`~` and $HOME come from the environment; a write known only at run time is refused only
    where its known part lies in a volume; a command that sets HOME does not expand it."""
    monkeypatch.setenv("HOME", str(root))
    (root / "plans/plan.md").write_text("a\n")
    assert shell_writes("echo hi > ~/plans/plan.md; echo > $HOME/x.md", str(tmp_path)) == [
        (f"{root}/plans/plan.md", W),
        (f"{root}/x.md", W),
    ]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert shell_writes("f=x; echo hi > $f; find . -delete; ls | xargs rm", str(outside)) == []
    with pytest.raises(UnresolvedShellWrite, match="HOME"):
        shell_writes("HOME=/tmp; echo hi > ~/plans/plan.md", str(root))
    with pytest.raises(UnresolvedShellWrite, match=r"\$f"):
        shell_writes(f"echo hi > {root}/plans/$f", str(outside))
