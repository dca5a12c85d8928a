"""What `shell_writes` recognises a shell command writes, on a real volume: the files (with how)
for a command run in the volume, or the refusal of a write whose file is known only when the
command runs. Each row is a command a hook must not let through unchecked, or one it must leave
alone."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import threading
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume, codex
from coherent_volume.errors import LinkRefused, UnresolvedShellWrite
from coherent_volume.shell_writes import shell_writes

from .harness.agent_session import unique

W, A = "write", "append"
PLAN = [("plans/plan.md", W)]
PLAN_FILE = ["plans/plan.md"]
UNRESOLVED = "unresolved"
EXPANDED_ZSTD = [("plans/plan.md", W), ("plans/other.md", W), ("plans/notes.txt.zst", W), ("plans/x.tar", W)]
OTHER, NULL, ZST, NOTES = ("plans/other.md", W), ("/dev/null", W), ("plans/other.md.zst", W), ("notes.txt", W)

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
    # a pattern tree-sitter splits in two at a backslash is one word to bash, globbed as a whole
    ("echo hi > plans/pla[n]\\.md", ".", PLAN),
    ("tee pl[a]ns/pla[!x]\\.m? < /dev/null", ".", PLAN),
    ('rm "plans"/pla[n]\\.md', ".", PLAN),
    ("sed -i s/a/b/ plans/[\\p]lan.md", ".", PLAN),
    ("echo hi > plans/pla[x]\\.md", ".", [("plans/pla[x].md", W)]),
    ("echo hi > plans/\\[p]lan.md", ".", [("plans/[p]lan.md", W)]),
    ("echo hi > plans/[p\\]]lan.md", ".", UNRESOLVED),  # a quoted `]` in a bracket: fnmatch cannot say it
    # a pattern word decided by its place is placed where its literal directory is, not at the cwd
    ("cd /var/tmp && echo hi > {root}/plans/[p\\-]lan.md", ".", UNRESOLVED),
    ("cd /var/tmp && echo hi > {parent}/*/plans/[[:alpha:]]lan.md", ".", UNRESOLVED),  # a volume below it
    # `$"…"` (a string to translate: its text) inside a word, where tree-sitter reads a `$` and a string
    ('rm plans/plan$"".md', ".", PLAN),
    ('echo hi > plans/$"plan.md"', ".", PLAN),
    ('echo hi > plans/pla[n]$"".md', ".", PLAN),
    # cd is followed in its shell, not out of a subshell or pipeline
    ("cd plans && echo hi > plan.md", ".", PLAN),
    ("cd plans; echo hi > plan.md", ".", PLAN),
    ("(cd plans; sed -i s/a/b/ plan.md)", ".", PLAN),
    ("(cd plans; true); echo hi > plan.md", ".", [("plan.md", W)]),
    ("cd plans | true; echo hi > plan.md", ".", [("plan.md", W)]),
    ("cd missing; echo hi > plan.md", "plans", [("plans/missing/plan.md", W), ("plans/plan.md", W)]),
    ("cd .. && rm plans/plan.md", "plans", PLAN),  # bash's PWD, `..` taken as text
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
    ("find plans -name plan.md -delete", ".", PLAN),
    ("find . -name '*.md' -exec sed -i s/a/b/ {} +", ".", UNRESOLVED),
    ("find . -name '*.md' -exec grep a {} +; ls | xargs grep a", ".", []),
    ("f=$(ls plans); echo hi > $f", ".", UNRESOLVED),
    ("echo hi > plans/$(date).md", ".", UNRESOLVED),
    ("echo hi > plans/$((1+1)).md", ".", UNRESOLVED),
    ("echo 'echo x > plans/plan.md' | at now", ".", UNRESOLVED),  # a job run later, from its input
    ("batch < job.sh", ".", UNRESOLVED),
    ("at -l; atq", ".", []),
    ("tmux send-keys -t s 'echo x > plans/plan.md' Enter", ".", UNRESOLVED),  # typed into a shell elsewhere
    ("tmux new -d true \\; neww 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("tmux ls -F '#(echo x > plans/plan.md)'", ".", UNRESOLVED),
    ("echo 'send-keys x Enter' | tmux -C attach", ".", UNRESOLVED),  # commands read from its input
    ("tmux ls; tmux kill-session -t s", ".", []),
    ("screen -S s -X stuff 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("daemonize /bin/sh -c 'echo x > plans/plan.md'", ".", UNRESOLVED),  # run in / unless -c
    ('for f in $(ls plans/*.md); do sed -i s/a/b/ "$f"; done', ".", UNRESOLVED),
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
    # bounded work: a pattern past the entries read, a command too long to follow, is unknown
    ("rm /**/no-such-file", ".", UNRESOLVED),
    ("rm /*/*/*/*/*/*/no-such-file", ".", UNRESOLVED),
    ("echo " + "a " * 60_000 + "> notes.txt", ".", UNRESOLVED),
    ("echo hi > plans/pl\x00an.md", ".", UNRESOLVED),
    # shells' bundled options, `--`, and other places a script comes from
    ("bash -eo pipefail -c 'rm plans/plan.md'", ".", PLAN),
    ("bash -euo pipefail -c 'rm plans/plan.md'", ".", PLAN),
    ("bash -xeo pipefail -c 'rm plans/plan.md'", ".", PLAN),
    ("bash --rcfile /dev/null -c 'rm plans/plan.md'", ".", PLAN),
    ("bash -c -- 'rm plans/plan.md'", ".", PLAN),
    ("bash <<'EOF'\nrm plans/plan.md\nEOF", ".", UNRESOLVED),
    ("echo 'rm plans/plan.md' | sh", ".", UNRESOLVED),
    ("flock /tmp/lock -c 'rm plans/plan.md'", ".", PLAN),
    ("flock -w 5 /tmp/lock rm plans/plan.md", ".", PLAN),
    ("su -c 'rm plans/plan.md' root", ".", PLAN),
    ("script -qc 'rm plans/plan.md' /dev/null", ".", [*PLAN, ("/dev/null", W)]),
    ("busybox rm plans/plan.md", ".", PLAN),
    # a shell, or `source`, reading its script by a name of its input or of a pipe: a script from its input
    ("source /dev/stdin <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    (". /dev/stdin <<'EOF'\nrm plans/plan.md\nEOF", ".", UNRESOLVED),
    ("bash /dev/stdin <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    ("sh /dev/fd/0 <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    ("bash -o pipefail /proc/self/fd/0 <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    ("bash - <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    ("cd /dev && source ./stdin <<< 'rm plans/plan.md'", ".", UNRESOLVED),
    ("source <(echo 'rm plans/plan.md')", ".", UNRESOLVED),
    ("bash x.sh; source ./x.sh; . /dev/null", ".", []),
    # watch runs its words joined as an `sh -c` script (with -x, as a command); setpriv runs its command
    ("watch -n1 'rm plans/plan.md'", ".", PLAN),
    ("watch -d -n 1 -- echo x \\> plans/plan.md", ".", PLAN),
    ("watch --differences=permanent -t -q 3 'sed -i s/a/b/ plans/plan.md'", ".", PLAN),
    ("watch -x sh -c 'rm plans/plan.md'; watch -x echo x '>' plans/other.md", ".", PLAN),
    ('watch -n1 "rm $X"', ".", UNRESOLVED),
    ("setpriv --reuid 1000 --clear-groups rm plans/plan.md; setpriv -d rm plans/other.md", ".", PLAN),
    # wrappers whose own options come after their operand, or take an optional value, or that run a shell
    ("script /dev/null -c 'rm plans/plan.md'", ".", [*PLAN, ("/dev/null", W)]),  # getopt permutes them
    ("script -q plans/plan.md -c true", ".", PLAN),  # its typescript
    ("script -tplans/plan.md -O /dev/null -c true", ".", [*PLAN, ("/dev/null", W)]),
    ("script -q /dev/null", ".", UNRESOLVED),  # a shell reading its input
    ("xargs --replace rm {} <<< plans/plan.md", ".", UNRESOLVED),  # `--replace` takes `{}` without `=`
    ("xargs --repl rm {} <<< plans/plan.md", ".", UNRESOLVED),
    ("xargs -i rm {} <<< plans/plan.md", ".", UNRESOLVED),
    ("xargs --replace=F echo F <<< plans/plan.md", ".", []),
    ("busybox ash -c 'rm plans/plan.md'", ".", PLAN),
    ("busybox hush -c 'rm plans/plan.md'", ".", PLAN),
    ("toybox rm plans/plan.md", ".", PLAN),
    ("unbuffer -p rm plans/plan.md", ".", PLAN),
    ("prlimit --nofile=1024 -n rm plans/plan.md", ".", PLAN),
    ("chrt -f 10 rm plans/plan.md; chrt --other rm src/plan.md", ".", [*PLAN, ("src/plan.md", W)]),
    ("runuser -u me -- rm plans/plan.md", ".", PLAN),
    ("runuser me -c 'rm plans/plan.md'", ".", PLAN),
    ("nsenter -t 1 -U rm plans/plan.md", ".", PLAN),
    ("nsenter -t 1 -m rm /tmp/x", ".", UNRESOLVED),  # another mount namespace: any file
    ("systemd-run --user -d rm plans/plan.md", ".", PLAN),
    ("systemd-run --user --working-directory={root}/plans rm plan.md", ".", PLAN),
    ("systemd-run --user rm plans/plan.md", ".", UNRESOLVED),  # a unit's own directory
    ("systemd-run --user -p WorkingDirectory=/x rm /tmp/x", ".", UNRESOLVED),
    # /proc/self/cwd is the command's working directory (not the hook's); another process's is any
    ("echo x > /proc/self/cwd/plans/plan.md", ".", PLAN),
    ("cd /proc/self/cwd/plans && rm plan.md", ".", PLAN),
    ("rm /proc/self/cwd/plans/p*.md", ".", PLAN),
    ("echo x > /proc/self/root{root}/plans/plan.md", ".", PLAN),
    ("echo x > /proc/$$/cwd/plans/plan.md", ".", UNRESOLVED),
    ("echo x > /proc/1234/cwd/plans/plan.md", ".", UNRESOLVED),
    # `$"…"` is a string to translate: its text as written; `$'…'` is literal text once decoded
    ('echo x > $"plans/plan.md"', ".", PLAN),
    ("echo x > $'plans/plan.md'; sort -t$'\\t' -k2 plans/plan.md > $'src/a\\tb'", ".", [*PLAN, ("src/a\tb", W)]),
    ("echo x > $'src/\\cA'", ".", UNRESOLVED),
    # an awk program that runs commands runs a shell: not followed
    ('awk \'BEGIN { print "x" | "tee plans/plan.md" }\'', ".", UNRESOLVED),
    ("awk 'BEGIN { system(\"rm plans/plan.md\") }'", ".", UNRESOLVED),
    ("awk '/a|b/ { print $1 }' plans/plan.md", ".", []),
    ("strace -f -o plans/plan.md true", ".", PLAN),
    ("taskset -c 0 rm plans/plan.md; fakeroot rm plans/other.md", ".", [*PLAN, ("plans/other.md", W)]),
    ('bash -c "rm plans/plan.md; echo $X"', ".", UNRESOLVED),
    ('eval "rm plans/plan.md $X"', ".", UNRESOLVED),
    ('bash -c "echo $X"', "../outside", []),
    ("X=rm; $X plans/plan.md", ".", UNRESOLVED),
    # a line continuation inside a word joins it
    ("rm pla\\\nns/plan.md", ".", PLAN),
    ("echo hi > pla\\\nns/plan.md", ".", PLAN),
    # `time` and `coproc` are keywords: a function runs, and `cd` moves this shell
    ("f() { rm plans/plan.md; }; time f", ".", PLAN),
    ("f() { rm plans/plan.md; }; time -p f", ".", PLAN),
    ("f() { rm plans/plan.md; }; coproc f", ".", PLAN),
    ("time cd plans; rm plan.md", ".", PLAN),
    ("time -v rm plans/plan.md", ".", PLAN),
    # a function definition's redirections apply where it is called
    ("f() { echo hi; } > plans/plan.md; f", ".", PLAN),
    ("function f { echo hi; } >> plans/plan.md\nf", ".", [("plans/plan.md", A)]),
    ("for i in 1 2; do f; f() { rm plans/plan.md; }; done", ".", PLAN),
    # after a loop the directory is any its condition or body can leave
    ("while cd {root}/plans; do break; done; rm plan.md", "src", [("src/plan.md", W), *PLAN]),
    ("for d in x; do cd {root}/plans; done; rm plan.md", "src", [("src/plan.md", W), *PLAN]),
    ("for d in x; do cd plans; done; rm plan.md", ".", UNRESOLVED),  # deeper each round
    # a trap's handler runs at exit, where the shell then is
    ("trap -- 'rm plans/plan.md' EXIT", ".", PLAN),
    ("trap 'rm plan.md' EXIT; cd plans", ".", [("plan.md", W), *PLAN]),
    ("pushd plans; pushd /tmp; popd; rm plan.md", ".", UNRESOLVED),
    # -T: the destination is the target itself
    ("cp -rT src plans", ".", [*PLAN, ("plans/other.md", W)]),
    ("mv -T src/plan.md plans/plan.md", ".", [*PLAN, ("src/plan.md", W)]),
    ("ln -sfT /etc/hostname plans/plan.md", ".", PLAN),
    ("install --no-target-directory src/plan.md plans/plan.md", ".", PLAN),
    # patterns fnmatch cannot match as bash does, and `~` after `=`
    ("rm plans/[[:alpha:]]lan.md", ".", UNRESOLVED),
    ("dd of=~/plans/plan.md < /dev/null", "src", PLAN),
    ("cp notes.txt --target-directory=~/plans", ".", [("~/plans/notes.txt", W)]),
    # a directory of more files than are listed is unknown, never cut short
    ("rm -r many", ".", UNRESOLVED),
    # find's options before its start paths
    ("find -L {root}/plans -name plan.md -delete", "../outside", UNRESOLVED),
    # an expansion that may be any path: refused where the command names a path in a volume
    ("echo hi > /tmp/$X/../{root}/plans/plan.md", "../outside", UNRESOLVED),
    ("rm {parent}/ou*/../{name}/plans/$X", "../outside", UNRESOLVED),
    ('F=$(printf %s {name}/plans/plan.md); echo hi > "$F"', "..", UNRESOLVED),
    ('for f in $(ls {name}/plans/*.md); do sed -i s/a/b/ "$f"; done', "..", UNRESOLVED),
    ("rm $(echo {name}/plans/plan.md)", "..", UNRESOLVED),
    ("parallel rm ::: {root}/plans/plan.md", "..", UNRESOLVED),
    ("X={root}/plans/plan.md; read X; echo hi > $X", "../outside", UNRESOLVED),
    ("cd /tmp && rm ${X:-{root}/plans/plan.md}", ".", UNRESOLVED),
    ("echo hi > $X; echo hi > /tmp/y", "../outside", [("/tmp/y", W)]),
    # more writers
    ("sed -n 'w plans/plan.md' notes.txt", ".", PLAN),
    ("sed -e p -e 's/a/b/w plans/plan.md' notes.txt", ".", PLAN),
    ("sed -i '1w plans/other.md' plans/plan.md", ".", [*PLAN, ("plans/other.md", W)]),
    ("awk '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("awk '{ print >> $2 }' notes.txt", ".", UNRESOLVED),
    ("awk '$1 > 5 { print }' plans/plan.md", ".", []),
    ("ruby -i -pe 'sub(/a/, \"b\")' plans/plan.md", ".", PLAN),
    ("perl -Mstrict -ne print plans/plan.md", ".", []),
    ("sort -o plans/plan.md notes.txt; uniq notes.txt plans/other.md", ".", [*PLAN, ("plans/other.md", W)]),
    ("gawk -i inplace.awk '{print}' plans/plan.md", ".", PLAN),
    # a variable set only from mktemp is a new file in the temporary directory
    ('tmp=$(mktemp); echo hi > "$tmp"; rm -f "$tmp"', ".", [("/tmp/tmp.XXXXXXXXXX", W)]),
    ('d=$(mktemp -d); echo hi > "$d/x"', ".", [("/tmp/tmp.XXXXXXXXXX/x", W)]),
    ('tmp=$(mktemp); tmp=plans/plan.md; echo hi > "$tmp"', ".", UNRESOLVED),
    ('tmp=$(mktemp -p plans); echo hi > "$tmp"', ".", UNRESOLVED),
    ('tmp=$(mktemp); read tmp; echo hi > "$tmp"', ".", UNRESOLVED),
    ('(tmp=$(mktemp)); echo hi > "$tmp"', ".", UNRESOLVED),  # set in a subshell: here it is the inherited one
    ('tmp=$(mktemp); read t""mp; echo hi > "$tmp"', ".", UNRESOLVED),
    # a write known only in part, in a volume: allowed where no path it may be is managed
    # (the volume manages plans/** and *.md at its root)
    ('echo x > "logs/$(date +%s).log"', ".", []),
    ('echo x > "$(date +%s).log"', ".", []),  # at the volume's root too
    ("echo x > logs/run-$(date +%Y%m%d-%H%M%S).md", ".", []),  # '*.md' is at the root only
    ('echo x > "logs/$((n + 1)).log" 2> "logs/$$.err"', ".", []),
    ('cp notes.txt "src/$(date +%F)/"', ".", []),
    ('rm -r "src/$((n))"', ".", []),
    ("find src -name '*.o' -delete", ".", []),
    ("find src -type f -exec rm {} +", ".", []),
    ("find src -name x -execdir rm -f plan.md ';'", ".", []),
    ('echo x > "plans/$(date +%s).log"', ".", UNRESOLVED),
    ('echo x > "$(date +%s).md"', ".", UNRESOLVED),
    ('echo x > "$(date +plan).md"', ".", [("plan.md", W)]),  # a format of no conversion prints itself
    ('echo x > "logs/$(date).log"', ".", UNRESOLVED),  # what `date` prints by default is not told
    ('echo x > "logs/$(date +%D).log"', ".", UNRESOLVED),  # %D prints a '/'
    ('date() { echo ../plan; }; echo x > "logs/$(date +%s).md"', ".", UNRESOLVED),
    ('echo x > "logs/$((n))/../plan.md"', ".", UNRESOLVED),
    ("IFS=0; rm logs/$((10)).md", ".", UNRESOLVED),  # split at the 0: 'logs/1' and '.md'
    ('rm -r "plans/$((n))"', ".", UNRESOLVED),
    ('rm -r "plans$!"', ".", UNRESOLVED),  # no job in the background: $! is empty, and this is plans
    ('echo x > "$(pwd)/x"', ".", UNRESOLVED),
    ('echo x > "$X/y"', ".", UNRESOLVED),
    ('echo x > "src/$X"', ".", UNRESOLVED),  # $X may be '../plan.md'
    ("find plans $X -delete", ".", UNRESOLVED),
    ("find plans -follow -delete", ".", UNRESOLVED),
    ("find plans -frobnicate -delete", ".", UNRESOLVED),  # a test this does not read
    ("find src -exec mv {} {}.md ';'", ".", UNRESOLVED),  # src.md, at the root
    ("find src -exec sh -c 'echo x > \"$1\"' _ {} ';'", ".", UNRESOLVED),
    ("find . -name x -execdir rm -f plan.md ';'", ".", UNRESOLVED),
    ("find src -files0-from list -delete", ".", UNRESOLVED),  # and the starting points the file names
    ("dd if=/dev/zero of=plans/$((n))", ".", UNRESOLVED),  # the path begins after `of=`
    ("cp notes.txt --target-directory=plans/$((n))", ".", UNRESOLVED),
    # find -delete: each file below its starting points that its expression may delete (`-a` before
    # `-o`; a test of what only the file system knows, or a pattern with a class, may match anything)
    ("find plans -delete", ".", [*PLAN, ("plans/other.md", W)]),
    ("find . -name '*.md' -delete", ".", [("./plans/plan.md", W), ("./plans/other.md", W), ("./src/plan.md", W)]),
    ("find . -name '*.md' ! -path './src/*' -delete", ".", [("./plans/plan.md", W), ("./plans/other.md", W)]),
    ("find plans src -type f -iname PLAN.MD -delete", ".", [*PLAN, ("src/plan.md", W)]),
    ("find plans -name '*.md' -o -name x -delete", ".", []),
    ("find plans \\( -name x -o -name other.md \\) -delete", ".", [("plans/other.md", W)]),
    ("find plans -name x -o -delete", ".", [*PLAN, ("plans/other.md", W)]),
    ("find plans -type d -delete", ".", []),
    ("find plans -newer notes.txt -name 'p*' -delete", ".", PLAN),
    ("find plans -name 'o[t]her.md' -delete", ".", [*PLAN, ("plans/other.md", W)]),
    ('find plans -name "$X" -delete', ".", [*PLAN, ("plans/other.md", W)]),
    ("find missing -delete", ".", []),
    ("find plans -name '?lan.md' -delete", ".", PLAN),
    ("find plans -name '?\u00e9.md' -delete", ".", [*PLAN, ("plans/other.md", W)]),  # `?` may be a byte of it
    # a variable set only to one literal value, where that surely ran in this shell; a for loop's
    # variable in its body
    ('out=src/a.txt; echo x > "$out"', ".", [("src/a.txt", W)]),
    ("cd plans && f=plan.md && sed -i s/a/b/ $f", ".", PLAN),
    ('for f in src/*.md; do rm "$f"; done', ".", [("src/plan.md", W)]),
    ('for f in plans/*.md; do sed -i s/a/b/ "$f"; done', ".", [*PLAN, ("plans/other.md", W)]),
    ("X={root}/plans/plan.md; echo hi > $X", "../outside", PLAN),
    ('out=src/a; out=plans/plan.md; echo x > "$out"', ".", UNRESOLVED),
    ('if true; then out=src/a; fi; echo x > "$out"', ".", UNRESOLVED),  # it may not have run
    ('true || out=src/a; echo x > "$out"', ".", UNRESOLVED),
    ('(out=src/a); echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a & echo x > "$out"', ".", UNRESOLVED),
    ('echo x > "$out"; out=src/a', ".", UNRESOLVED),
    ('out=src/a; read o""ut; echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a; printf -vout %s plan.md; echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a; declare -n r=o""ut; r=plan.md; echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a; source ./set.sh; echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a; eval "$X"; echo x > "$out"', ".", UNRESOLVED),
    ('out=src/a; time out=plan.md; echo x > "$out"', ".", UNRESOLVED),
    ("out=src/a; bash -c 'echo x > \"$out\"'", ".", UNRESOLVED),  # not exported: the child's own
    ("out=src/*; rm $out", ".", UNRESOLVED),  # unquoted: a pattern again
    ('arr=(plan.md); rm "$arr"', ".", UNRESOLVED),
    ('for f in src/*.md; do :; done; rm "$f"', ".", UNRESOLVED),  # after the loop
    ('f() { for x in src/a; do f; rm "$x"; done; }; f', ".", UNRESOLVED),  # set again by the call
    # a find action, or a writer's option, that comes from an expansion: the command may write any file
    ("d=-delete; find plans $d", ".", [*PLAN, ("plans/other.md", W)]),  # a variable set once is known
    ('find plans "$(echo -delete)"', ".", UNRESOLVED),
    ("find plans ${X:--delete}", ".", UNRESOLVED),
    ("find plans $(printf %s -delete)", ".", UNRESOLVED),
    ('a=(-delete); find plans "${a[@]}"', ".", UNRESOLVED),
    ("find plans -type f $(echo -exec) rm {} +", ".", UNRESOLVED),
    ("find plans -type f `echo -delete`", ".", UNRESOLVED),
    ('find "$D" -name x', ".", UNRESOLVED),  # a starting point that may be `-delete`
    ('find ./"$D" -name x -print', ".", []),  # one that cannot
    ("find src -exec echo \"$X\" -delete ';'", ".", UNRESOLVED),  # $X may be the `;` that ends -exec
    ('find src -exec grep "$X" {} +', ".", []),  # were it `;`, find would refuse `{} +`
    ("find plans -name $X -print", ".", UNRESOLVED),  # unquoted: it may split into `x -delete`
    ('sed "$(echo -i)" s/a/b/ plans/plan.md', ".", UNRESOLVED),
    ("o=-i; sed $o s/a/b/ plans/plan.md", ".", PLAN),
    ("sed -n$X p plans/plan.md", ".", UNRESOLVED),  # `-ni`
    ('sed -n "$(printf %s "w plans/plan.md")" notes.txt', ".", UNRESOLVED),  # a program's `w`
    ('sed -e "$X" notes.txt', ".", UNRESOLVED),
    ("sort plans/plan.md $(echo -o) plans/plan.md", ".", UNRESOLVED),
    ('sort -- "$X"; sort -k "$X" notes.txt; sort ./"$X"', ".", []),
    ("x=-i; perl $x -ne 'print if 0' plans/plan.md", ".", PLAN),
    ('perl "$X" -ne print plans/plan.md', ".", UNRESOLVED),
    ("cp /dev/null $(echo -t) plans/ plan.md", ".", UNRESOLVED),
    ("dd if=/dev/null $(echo of=plans/plan.md)", ".", UNRESOLVED),
    ('dd if=/dev/null "of=$X"', ".", UNRESOLVED),
    ('dd "if=$X" of=src/o', ".", [("src/o", W)]),
    ('awk "$X" notes.txt', ".", UNRESOLVED),  # a program's `print >`
    ('gawk -i "$X" 1 plans/plan.md', ".", PLAN),  # the library may be inplace
    ('awk -i "$X" 1 plans/plan.md', ".", UNRESOLVED),  # original-awk passes over -i: "$X" is its program
    ("ln $(echo -s) notes.txt src/n", ".", UNRESOLVED),
    ("bash $(echo -c) 'rm plans/plan.md'", ".", UNRESOLVED),
    ("f=-c; bash $f 'rm plans/plan.md'", ".", PLAN),
    ('bash "$X"; bash x.sh "$X" "$X"', ".", []),  # a script file: what follows are its arguments
    ("su $X", ".", UNRESOLVED),
    # long options given by a prefix, as getopt_long takes them
    ("sort --out=plans/plan.md notes.txt", ".", PLAN),
    ("sed --in-pl s/a/b/ plans/plan.md", ".", PLAN),
    ("awk --incl=inplace 1 plans/plan.md", ".", PLAN),
    ("time --o plans/plan.md true", ".", PLAN),
    ("cp --target=plans notes.txt", ".", [("plans/notes.txt", W)]),
    # apply_patch run as a shell command (Codex runs it itself): checked only as the apply_patch tool
    ("apply_patch <<'EOF'\n*** Begin Patch\n*** Delete File: plans/plan.md\n*** End Patch\nEOF", ".", UNRESOLVED),
    ("apply_patch '*** Begin Patch\n*** Delete File: {root}/plans/plan.md\n*** End Patch'", "../outside", UNRESOLVED),
    ('cd src && applypatch "$(cat p.diff)"', ".", UNRESOLVED),
    # -prune with -delete
    ("find . -path ./.coherent -prune -o -type f ! -name '*.md' -delete", ".", UNRESOLVED),
    ("find . -path ./.coherent -prune -o -name '*.o' -delete", ".", []),
    # every awk Debian ships, each reading its options as it does (`awk` and `nawk` may be any of them)
    ("mawk '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("nawk '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("original-awk '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("busybox awk '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("/usr/bin/mawk -W interactive -v n=1 '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),
    ("awk -F -W '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),  # -W is -F's value
    ("gawk -f src/plan.md -e '{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),  # (its -f file: `s`)
    ("awk -f lib.awk notes.txt", ".", UNRESOLVED),  # a program file not there now: known only when it runs
    ("gawk -W source='{ print > \"plans/plan.md\" }' notes.txt", ".", PLAN),  # -W NAME is --NAME
    ("gawk -oplans/plan.md 'BEGIN { }'; gawk --prof=plans/other.md 'BEGIN { }'", ".", [*PLAN, ("plans/other.md", W)]),
    ("gawk -d 'BEGIN { }'", ".", [("awkvars.out", W)]),
    ("nawk -i inplace 1 plans/plan.md", ".", PLAN),  # it may be gawk
    ("mawk -i inplace 1 plans/plan.md; mawk -f src/plan.md plans/plan.md", ".", []),  # mawk edits nothing in place
    ('gawk -W "$X" 1 notes.txt', ".", UNRESOLVED),  # it may be any option, --profile=FILE among them
    # awk's print redirections read as awk reads them: strings, newlines after a comma, concatenation
    ('mawk \'{ print "}" > "plans/plan.md" }\' notes.txt', ".", PLAN),
    ('mawk \'{ print ";" > "plans/plan.md" }\' notes.txt', ".", PLAN),
    ('mawk \'{ print "Q",\n "R" > "plans/plan.md" }\' notes.txt', ".", PLAN),
    ('mawk \'$1 > 5 { print (a > b) } /"/ { print > "plans/plan.md" }\' notes.txt', ".", PLAN),
    ('mawk \'{ print "Q" > "plans/" "plan.md" }\' notes.txt', ".", UNRESOLVED),
    # tools that write a file an option or an operand of their own names
    ("shuf -o plans/plan.md notes.txt; iconv -f utf-8 -t ascii --out=plans/other.md notes.txt", ".", [*PLAN, OTHER]),
    (
        "jq . notes.txt | sponge plans/plan.md; sponge -a plans/other.md < notes.txt",
        ".",
        [*PLAN, ("plans/other.md", A)],
    ),
    ("xxd notes.txt plans/plan.md; xxd -r -c 8 notes.txt plans/other.md; xxd -cols 8 notes.txt", ".", [*PLAN, OTHER]),
    ("xxd -c8 -s 4 -ps notes.txt plans/plan.md", ".", PLAN),
    (
        "openssl enc -d -in notes.txt -out plans/plan.md; openssl req -keyout=plans/other.md -passout pass:x",
        ".",
        [*PLAN, OTHER],
    ),
    (
        "curl -sSLo plans/plan.md https://h/x; curl --output-dir plans -O 'https://h/a/other.md?x=1'",
        ".",
        [*PLAN, OTHER],
    ),
    ("curl -c plans/plan.md https://h/x; curl -s https://h/x > /dev/null; curl -o - https://h/y", ".", [*PLAN, NULL]),
    ("curl -O https://h/$NAME", "plans", UNRESOLVED),
    ("curl -OJ https://h/x", "plans", UNRESOLVED),
    ("curl -O https://h/x", "src", [("src/x", W)]),
    ("wget -qO plans/plan.md https://h/x; wget https://h/plan.md; wget -O - https://h/z", ".", PLAN),
    ("wget -N https://h/plan.md", "plans", UNRESOLVED),
    ("wget -e output_document=plan.md https://h/", "/tmp", UNRESOLVED),
    (
        "gzip plans/plan.md; gunzip -k plans/other.md.gz; gzip -c plans/other.md > /tmp/o.gz",
        ".",
        [("plans/plan.md.gz", W), *PLAN, OTHER, ("/tmp/o.gz", W)],
    ),
    (
        "xz -d plans/plan.md.xz; zstd plans/other.md; bzip2 -t plans/x.md.bz2",
        ".",
        [*PLAN, ("plans/plan.md.xz", W), ZST],
    ),
    ("split -l 10 notes.txt plans/part", ".", UNRESOLVED),
    ("split -l 10 notes.txt part; csplit -f src/p notes.txt 5; split -d notes.txt", ".", []),  # no `*.md` can be
    ("split --additional-suffix=.md notes.txt part", ".", UNRESOLVED),
    (
        "git mv notes.txt plans/plan.md; git mv -n plans/other.md x; git -C plans mv other.md x",
        ".",
        [*PLAN, NOTES, OTHER, ("plans/x", W)],
    ),
    # found by a hostile probe of the rows above (each written by the real tool)
    (
        "openssl cms -verify -in m.p7 -signer plans/plan.md; openssl s_client -msgfile=plans/other.md",
        ".",
        [*PLAN, OTHER],
    ),
    ("openssl s_client -keylogfile plans/plan.md -connect h:443", ".", PLAN),
    ("openssl ca -outdir plans -in req.pem", ".", UNRESOLVED),
    ("curl -o '#1' 'https://h/{plan.md,x}'", ".", UNRESOLVED),
    (
        "curl -T notes.txt file://{root}/plans/plan.md; curl --remote-name-a https://h/a/other.md",
        "plans",
        [PLAN[0], OTHER],
    ),
    ("wget --timest https://h/plan.md", "plans", UNRESOLVED),
    ("wget --warc-file=plans/w https://h/", ".", [("plans/w.warc.gz", W)]),
    ("split --numeric-suffixes notes.txt plans/p", ".", UNRESOLVED),
    ("split --filter='cat > plans/plan.md' notes.txt", "src", UNRESOLVED),
    ("gzip -rkf plans", ".", [*PLAN, OTHER]),
    ("zstd -d -r -f plans; zstd --output-dir-flat plans notes.txt; zstd -d plans/x.tzst", ".", EXPANDED_ZSTD),
    ("gzip -dN plans/x.gz", ".", UNRESOLVED),
    # symlinks are made as before (hard links: `test_hard_links…`)
    ("ln -s plans/plan.md src/alias", ".", [("src/alias", W)]),
    # a script, or a startup file, a shell reads from a descriptor however it is named (/tmp/s30r2h 2)
    ('bash 0< <(echo "echo x > plans/plan.md")', ".", UNRESOLVED),  # (tree-sitter reads `0` as a word)
    ("bash //dev/stdin <<< 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("BASH_ENV=/dev/stdin bash -c : <<< 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("env BASH_ENV=<(echo 'echo x > plans/plan.md') bash -c :", ".", UNRESOLVED),
    ("bash --rcfile <(echo 'echo x > plans/plan.md') -i < /dev/null", ".", UNRESOLVED),
    ("bash --init-file /dev/stdin -i <<< 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("echo 'echo x > plans/plan.md' | su", ".", UNRESOLVED),
    ("echo 'echo x > plans/plan.md' | su -s /bin/sh", ".", UNRESOLVED),
    ("echo 'sed -i s/a/b/ plans/plan.md' | rbash", ".", UNRESOLVED),
    ("mawk -f /dev/stdin <<< '{print > \"plans/plan.md\"}'", ".", UNRESOLVED),
    # a path through the /proc entry of the process opening it, however it gets there (/tmp/s30r2h 1)
    ("echo x > /dev/fd/../cwd/plans/plan.md", ".", UNRESOLVED),
    ("echo x > /proc/self/task/*/cwd/plans/plan.md", ".", UNRESOLVED),
    ("ln -s /proc/self src/me; echo x > src/me/cwd/plans/plan.md", ".", UNRESOLVED),
    ("echo x >/dev/stderr; echo y > /dev/fd/2", ".", [("/dev/stderr", W), ("/dev/fd/2", W)]),  # descriptors
    ("cat < notes.txt > /dev/stdout", ".", [("/dev/stdout", W)]),
    # ... unless the command opened that descriptor on a file to read: by name, it is opened to write
    ("{ echo x > /dev/stdout; } 1<plans/plan.md", ".", UNRESOLVED),  # (/tmp/s30r3h 3)
    ("exec 3<plans/plan.md; echo x | tee /dev/fd/3", ".", UNRESOLVED),
    ("echo x < plans/plan.md > /proc/self/fd/0", ".", UNRESOLVED),
    # a shell reading its input with options that take a value or start with `+` (/tmp/s30r3h 2)
    ("echo 'echo x > plans/plan.md' | bash -euo pipefail", ".", UNRESOLVED),
    ("bash -O extglob <<< 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("bash +e <<< 'echo x > plans/plan.md'", ".", UNRESOLVED),
    ("cd /dev; source stdin <<< 'cd -; echo x > top.md'", ".", UNRESOLVED),  # judged where it began
    ("cd /tmp && bash <<< 'cd -; echo x > top.md'", ".", UNRESOLVED),  # (/tmp/s30r3h 6)
    # a here-document's delimiter led by a backslash ends where bash ends it (/tmp/s30r3h 1)
    ("cat <<\\EOF > notes.txt\nhi\nEOF\nsed -i s/a/b/ plans/plan.md\n\\EOF", ".", [NOTES, *PLAN]),
    ("cat <<-\\E\\N\\D > notes.txt\n\thi\n\tEND\necho x > plans/plan.md\n", ".", [NOTES, *PLAN]),
    # bash runs the substitutions of an unquoted here-document wherever they stand (/tmp/s30r4h 1, 2)
    ("cat > notes.txt <<EOF\nRun `sed -i s/a/b/ plans/plan.md` first.\nEOF", ".", [NOTES, *PLAN]),
    ("cat > notes.txt <<EOF\n  $(echo x > plans/plan.md)\nEOF", ".", [NOTES, *PLAN]),
    ("cat > notes.txt <<'EOF'\nRun `sed -i s/a/b/ plans/plan.md` first.\nEOF", ".", [NOTES]),  # quoted: text
    ("echo `echo \\`echo x > plans/plan.md\\``", ".", PLAN),
    # `cp --parents` lands at DEST/SOURCE as written (/tmp/s30r4h 3)
    ("cd {parent}/outside && cp --parents plans/plan.md {root}", ".", PLAN),
    ("cd {parent}/outside && cp -r --pa plans/./plan.md {root}/", ".", [("plans/./plan.md", W)]),
]


@pytest.mark.parametrize(("command", "cwd", "expected"), CASES, ids=[c[0][:60] for c in CASES])
def test_what_a_command_writes(root: Path, command: str, cwd: str, expected: object, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(root))
    monkeypatch.setenv("TMPDIR", "/tmp")
    monkeypatch.delenv("CDPATH", raising=False)
    (root / "plans/plan.md").write_text("a\n")
    (root / "plans/other.md").write_text("o\n")
    (root / "src").mkdir()
    (root / "src/plan.md").write_text("s\n")
    if "many" in command:
        (root / "many").mkdir()
        for i in range(1001):
            (root / f"many/{i}").touch()
    (root.parent / "outside").mkdir()
    command = command.replace("{root}", str(root)).replace("{name}", root.name).replace("{parent}", str(root.parent))
    if expected == UNRESOLVED:
        with pytest.raises(UnresolvedShellWrite) as refused:
            shell_writes(command, str(root) if cwd == "." else f"{root}/{cwd}")
        said = str(refused.value)
        assert str(root) in said and re.search(r"literally|of their own", said), said
        return
    writes = shell_writes(command, str(root) if cwd == "." else f"{root}/{cwd}").writes
    wanted = [(p if p.startswith("/") else f"{root}/{p}", k) for p, k in expected]  # type: ignore[attr-defined]
    assert sorted(writes) == sorted(wanted), command


def test_an_awk_program_file_is_read_as_its_program(root: Path) -> None:
    """`awk -f FILE` runs the program in FILE: its `print > FILE` writes are found as those of a
    program in the command (it was not read, and `mawk -f /dev/stdin` wrote unchecked:
    /tmp/s30r2h 2); a program file that cannot be read now, or that the command writes before it
    runs it (sed's too), is one known only when it runs."""
    (root / "prog.awk").write_text('{ print > "plans/plan.md" }\n')
    assert shell_writes("awk -f prog.awk notes.txt", str(root)).writes == [(f"{root}/plans/plan.md", W)]
    for command in ("mawk -f /dev/stdin notes.txt <<< 1", "gawk -f <(echo 1) notes.txt", "awk -f missing.awk x"):
        with pytest.raises(UnresolvedShellWrite, match="an awk program"):
            shell_writes(command, str(root))
    (root / "x.sed").write_text("p\n")
    for command in (  # a program file the command rewrites first is not the one read now (/tmp/s30r3h 5)
        "echo '{ print > \"plans/plan.md\" }' > prog.awk; awk -f prog.awk notes.txt",
        "echo 'w plans/plan.md' > x.sed; sed -n -f x.sed notes.txt",
        "mv x.sed y.sed; printf 'w plans/plan.md' > x.sed; sed -n --file=x.sed notes.txt",
    ):
        with pytest.raises(UnresolvedShellWrite, match="a program file .* the command itself writes"):
            shell_writes(command, str(root))
    assert shell_writes("sed -n -f x.sed notes.txt", str(root)).writes == []


def test_home_and_unknown_places(root: Path, tmp_path: Path, monkeypatch) -> None:
    """`~` and $HOME come from the environment; a write known only at run time is refused only
    where its known part lies in a volume; a command that sets HOME does not expand it."""
    monkeypatch.setenv("HOME", str(root))
    (root / "plans/plan.md").write_text("a\n")
    assert shell_writes("echo hi > ~/plans/plan.md; echo > $HOME/x.md", str(tmp_path)).writes == [
        (f"{root}/plans/plan.md", W),
        (f"{root}/x.md", W),
    ]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert shell_writes("f=x; echo hi > $f; find . -delete; ls | xargs rm", str(outside)).writes == []
    with pytest.raises(UnresolvedShellWrite, match="HOME"):
        shell_writes("HOME=/tmp; echo hi > ~/plans/plan.md", str(root))
    with pytest.raises(UnresolvedShellWrite, match=r"\$f"):
        shell_writes(f"echo hi > {root}/plans/$f", str(outside))


_FROM_THE_START = [
    'echo x > "$PWD/a.md"',
    "echo x > ~+/a.md",
    "echo x > /proc/self/cwd/a.md",
    'sed -i s/v1/x/ "$PWD/a.md"',
    "cd /tmp; cd -; echo x > a.md",
    'for f in *.md; do echo x > "$f"; done',
    "rm *.md",
    "echo x > *.md",
    "find . -name a.md -delete",
    "find . -delete",
    "find . -name a.md -exec rm {} +",
]
"""Commands that write in the directory they start in, spelled otherwise than by a relative path."""


@pytest.mark.parametrize("command", _FROM_THE_START)
def test_a_command_started_in_an_unknown_directory_above_a_volume_is_refused_however_it_names_it(
    root: Path, command: str
) -> None:
    """A Codex command runs in the call's `workdir`, which its event does not carry: started from the
    turn's directory above a volume, it may run in the volume (`vol/plans`). A relative write was
    refused, but one through `$PWD`, `~+`, `/proc/self/cwd`, `cd -`, a pattern or find's starting
    point went ahead: each made the unknown directory a new unknown one, dropping that a volume below
    counts (/tmp/s31r2h 3; `find . -name a.md -delete` was refused before f14cafb). Any unknown
    placed in the unknown start directory now counts a volume below it."""
    above = str(root.parent)
    (root.parent / "a.md").write_text("x\n")
    with pytest.raises(UnresolvedShellWrite, match="absolute paths"):
        shell_writes(command, above, codex.WORKDIR)


def test_a_command_started_in_an_unknown_directory_above_no_volume_goes_ahead(tmp_path: Path) -> None:
    """The same commands, started from a directory with no volume below it, go ahead."""
    (tmp_path / "free").mkdir()
    (tmp_path / "free/a.md").write_text("x\n")
    for command in _FROM_THE_START:
        assert shell_writes(command, str(tmp_path / "free"), codex.WORKDIR).writes is not None, command


@pytest.mark.parametrize(
    "command",
    [
        'cd /tmp; cd "$OLDPWD"; echo x > plan.md',
        "cd /tmp && cd ~- && echo x > plan.md",
        'cd /tmp; echo x > "$OLDPWD/plan.md"',
        "cd /tmp; echo x > $OLDPWD/plan.md",
    ],
)
def test_the_previous_directory_after_a_cd_is_the_start_directory(root: Path, command: str) -> None:
    """After `cd /tmp`, bash's OLDPWD (`$OLDPWD`, `~-`) is the directory the command started in: a
    write through it there was taken as one to any path and went ahead where the command named no
    volume (/tmp/s31r2h 4), for a start in a volume known (Claude Code) or not (Codex without
    `workdir`). It is placed in the start directory now, any path still."""
    with pytest.raises(UnresolvedShellWrite, match="previous directory"):
        shell_writes(command, str(root / "plans"))
    with pytest.raises(UnresolvedShellWrite, match="absolute paths"):
        shell_writes(command, str(root), codex.WORKDIR)
    with pytest.raises(UnresolvedShellWrite, match="absolute paths"):
        shell_writes(command, str(root.parent), codex.WORKDIR)


def test_an_append_by_a_plain_relative_name_in_an_unknown_start_directory_goes_ahead(root: Path) -> None:
    """A Codex command with no `workdir` runs in a directory the hook cannot know; an append there by a
    relative name was refused (/tmp/s31r2h 5, a false denial), though an append needs no view and
    loses nothing. It goes ahead, not recorded (its file is unknown); a truncating write there is
    refused still, and so is an append whose name may reach a registry or leave the directory."""
    for command in ("echo x >> notes.md", "echo x &>> plans/log.txt", "printf 'a\\n' | tee -a notes.md"):
        assert shell_writes(command, str(root), codex.WORKDIR).writes == [], command
    for command in (
        "echo x > notes.md",
        "echo x >> ../vol/plans/plan.md",
        "echo x >> .coherent/registry.db",
        "echo x >> registry.db",
        "echo x >> commit.lock",
        "echo x >> staging/f",
        'echo x >> "$f"',
    ):
        with pytest.raises(UnresolvedShellWrite):
            shell_writes(command, str(root), codex.WORKDIR)


def test_a_refusal_for_a_volume_below_an_unknown_start_directory_says_so(root: Path, tmp_path: Path) -> None:
    """A Codex command with no `workdir`, from a directory far above a volume (`/`, `/tmp`, $HOME),
    writing by a relative path, is refused; the refusal said the write was "in the volume at X", an
    unrelated volume, as if it were the target (/tmp/s31r2h 6). It now says that a volume lies
    below the directory the command may run in, naming one for instance, and keeps its advice."""
    with pytest.raises(UnresolvedShellWrite) as refused:
        shell_writes("echo x > out.txt", str(tmp_path), codex.WORKDIR)
    text = str(refused.value)
    assert "in the volume at" not in text and f"volumes lie below {tmp_path}" in text, text
    assert f"the one at {root}, for one" in text and "absolute paths" in text, text
    with pytest.raises(UnresolvedShellWrite, match=f"in the volume at {root}"):
        shell_writes("echo x > out.txt", str(root), codex.WORKDIR)  # (in a volume: that one)


def test_a_command_too_long_to_follow_is_checked_against_every_volume_it_names(root: Path, tmp_path: Path) -> None:
    """A command longer than the recogniser follows, run outside every volume, is refused when any
    part of it names a path in a volume, however far into it (before, only its first 100,000
    characters were looked at, so a write after them went ahead unchecked: /tmp/s30hooks 1); and
    when it names more paths than the hook looks at, since a volume may lie among the others. One
    that names no volume goes ahead."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    pad = ": " + "x" * 100_050 + "; "
    for command in (f"echo mine > {root}/plans/plan.md", f"cd {root} && echo mine > plans/plan.md"):
        with pytest.raises(UnresolvedShellWrite, match=f"more than 100000 characters.*in the volume at {root}"):
            shell_writes(pad + command, str(outside))
    many = " ".join(f"{outside}/n{i}" for i in range(1_001))
    with pytest.raises(UnresolvedShellWrite, match="names too many for the hook to look at all"):
        shell_writes(f"{pad}: {many}; echo mine > {root}/plans/plan.md", str(outside))
    assert shell_writes(f"{pad}echo mine > {outside}/out.txt", str(outside)).writes == []


def test_cd_finds_its_directory_through_cdpath_as_bash_does(root: Path, tmp_path: Path, monkeypatch) -> None:
    """A relative `cd` from outside the volume may enter a directory of the CDPATH the hook
    inherits (bash tries its entries first, an empty one being the working directory): the writes
    after it are checked there too, up to the first where it is now. A command that may set CDPATH
    may enter any directory: refused when it names a path in a volume (before, both went ahead
    unchecked, /tmp/s28hooks F1; the later cases, /tmp/s28r2 F1-F4)."""
    (root / "plans/plan.md").write_text("a\n")
    outside = tmp_path / "elsewhere"
    (outside / "plans").mkdir(parents=True)
    there, here, made_first = f"{root}/plans/plan.md", f"{outside}/plans/plan.md", "/nonexistent/plans/plan.md"
    for cdpath, written in (
        (str(root), {there}),
        (f"{root}:", {there}),
        (f"/nonexistent:{root}", {made_first, there}),  # (unless the command makes it first)
        (f"/nonexistent:{outside}:{root}", {made_first, here}),
    ):
        monkeypatch.setenv("CDPATH", cdpath)
        for command in ("cd plans && echo x > plan.md", "pushd plans; echo x > plan.md"):
            assert set(shell_writes(command, str(outside)).writes) == {(w, W) for w in written}, cdpath
    monkeypatch.setenv("CDPATH", "")
    assert shell_writes("cd plans; echo x > plan.md", str(outside)).writes == [(f"{outside}/plans/plan.md", W)]
    monkeypatch.delenv("CDPATH")
    for command in (f"CDPATH={root}; cd plans && echo x > plan.md", f"export CDPATH={root}:; cd plans; echo > plan.md"):
        with pytest.raises(UnresolvedShellWrite, match="CDPATH"):
            shell_writes(command, str(outside))
    assert shell_writes('CDPATH="$(cat f)"; cd plans && echo x > plan.md', str(outside)).writes == []  # names no volume
    # set by spellings a text search for the name misses, or to a path through `~` or $HOME
    monkeypatch.setenv("HOME", str(root.parent))
    for command in (
        f"export CD''PATH={root}; cd plans && echo x > plan.md",
        f"declare CD\\PATH={root}; cd plans && echo x > plan.md",
        f"CDPATH=~/{root.name}; cd plans && echo x > plan.md",
        f"CDPATH=$HOME/{root.name}; cd plans && echo x > plan.md",
        f"export $'CDPATH'={root}; cd plans && echo x > plan.md",  # (/tmp/s28r3 1-3)
        f"export {{C,X}}DPATH={root}; cd plans && echo x > plan.md",
        f"printf 'export CDPATH=%s\\n' {root} > rc; BASH_ENV=rc bash -c 'cd plans && echo x > plan.md'",
        f"bash -O cdable_vars -c 'v={root}/plans; cd v && echo x > plan.md'",
    ):
        with pytest.raises(UnresolvedShellWrite):
            shell_writes(command, str(outside))
    # inherited: `~` expanded as bash does; a directory known only when it runs may be below any entry
    monkeypatch.setenv("CDPATH", f"~/{root.name}")
    assert (f"{root}/plans/plan.md", W) in shell_writes("cd plans && echo x > plan.md", str(outside)).writes
    monkeypatch.setenv("CDPATH", str(root))
    with pytest.raises(UnresolvedShellWrite):
        shell_writes("cd $(echo plans) && echo x > plan.md", str(outside))
    assert shell_writes("d=plans; cd $d && echo x > plan.md", str(outside)).writes == [(there, W)]  # (d known)
    monkeypatch.delenv("CDPATH")  # a sourced script is taken to leave CDPATH as it is, as HOME
    (root / "src").mkdir()
    assert shell_writes("source .venv/bin/activate && cd src && echo x > out.log", str(root)).writes == [
        (f"{root}/src/out.log", W)
    ]
    # bash enters the first entry where the directory is now: none after it is reached
    for cdpath in (f".:{root}", f":{root}"):
        monkeypatch.setenv("CDPATH", cdpath)
        assert shell_writes("cd plans && echo x > plan.md", str(outside)).writes == [(f"{outside}/plans/plan.md", W)]


FACES = {
    "claude_code": lambda command, cwd: {
        "hook_event_name": "PreToolUse",
        "tool_name": "Bash",
        "session_id": unique("s1"),
        "cwd": cwd,
        "tool_input": {"command": command},
    },
    "codex": lambda command, cwd: {  # (`workdir` given: Codex's own events lack it, test_codex)
        "hook_event_name": "PreToolUse",
        "tool_name": "Bash",
        "session_id": unique("s1"),
        "cwd": cwd,
        "tool_input": {"command": command, "workdir": cwd},
    },
    "gemini": lambda command, cwd: {
        "hook_event_name": "BeforeTool",
        "tool_name": "run_shell_command",
        "session_id": unique("s1"),
        "cwd": cwd,
        "tool_input": {"command": command},
    },
    "cursor": lambda command, cwd: {
        "hook_event_name": "beforeShellExecution",
        "conversation_id": unique("c1"),
        "cwd": cwd,
        "command": command,
    },
}


@pytest.mark.parametrize("face", sorted(FACES))
def test_a_command_still_being_worked_out_when_the_budget_ends(
    root: Path, tmp_path: Path, face: str, monkeypatch
) -> None:
    """A shell command that runs in a volume, or names a path in one, is denied when working out
    what it writes outlasts the hook's budget, saying that was what ran out of time; one that does
    neither goes ahead."""
    module = importlib.import_module(f"coherent_volume.{face}")
    release = threading.Event()
    monkeypatch.setattr(module, "shell_writes", lambda command, cwd: release.wait(60) and [])  # still working
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    try:
        for command, cwd, denied in (
            ("rm plans/plan.md", root, True),
            (f"rm {root}/plans/plan.md", outside, True),
            ("rm x", outside, False),
        ):
            answer = module.FACE.run(json.dumps(FACES[face](command, str(cwd))), budget=1.0)
            assert ("deny" in answer.stdout) is denied, (command, answer)
            if denied:
                assert "working out which files the shell command writes" in answer.stdout, answer
                assert "commit lock" not in answer.stdout, answer
    finally:
        release.set()


def test_a_write_known_in_part_is_refused_where_what_lies_there_may_lead_to_a_managed_file(
    root: Path, tmp_path: Path
) -> None:
    """No path spelled `src/<number>…` is managed, but what lies in src/ now may lead to one: a
    symlink among the entries such a path names or passes through, a volume inside it, a directory
    that is itself a symlink into a managed one. Then the command is refused; otherwise allowed."""
    (root / "src").mkdir()
    below = ['echo x > "src/$((n))/a.log"', "find -L src -delete", 'rm -r "src/$((n))"', "find src -exec rm {} +"]
    log = 'echo x > "src/$$.log"'
    for command in [*below, log]:
        assert shell_writes(command, str(root)).writes == [], command

    (root / "src/5").symlink_to(root / "plans")
    for command in below:
        with pytest.raises(UnresolvedShellWrite):
            shell_writes(command, str(root))
    assert shell_writes("find src -delete", str(root)).writes == [(f"{root}/src/5", W)], "the link, not where it leads"
    assert shell_writes(log, str(root)).writes == []  # the link is no `*.log`
    (root / "src/5").unlink()

    (root / "src/1.log").symlink_to(root / "plans/plan.md")
    with pytest.raises(UnresolvedShellWrite):
        shell_writes(log, str(root))
    (root / "src/1.log").unlink()

    inner = tmp_path / "inner"  # volumes do not nest (`init` refuses it): one moved inside
    inner.mkdir()
    CoherentVolume(inner, managed=("**",), agent="setup").close()
    (root / "src/inner").mkdir()
    (inner / ".coherent").rename(root / "src/inner/.coherent")
    for command in below[1:]:
        with pytest.raises(UnresolvedShellWrite):
            shell_writes(command, str(root))

    (root / "logs").symlink_to("plans")  # the directory named is a managed one
    with pytest.raises(UnresolvedShellWrite):
        shell_writes('echo x > "logs/$((n)).log"', str(root))

    other = tmp_path / "other"  # a managed name that is a symlink to an unmanaged directory
    (other / "build").mkdir(parents=True)
    CoherentVolume(other, managed=("docs/**",), agent="setup").close()
    (other / "docs").symlink_to("build")
    assert shell_writes('echo x > "build/$((n)).log"', str(other)).writes == []
    with pytest.raises(UnresolvedShellWrite):
        shell_writes('echo x > "docs/$((n)).log"', str(other))


def test_a_pattern_in_a_word_known_in_part_stays_in_its_segment(tmp_path: Path) -> None:
    """A pattern's `*` matches within one segment of a path; a segment that is only a pattern
    (`**` too, which globstar lets match any number of segments) may be any path."""
    root = tmp_path / "deep"
    root.mkdir()
    CoherentVolume(root, managed=("a/*/*/*/x.md",), agent="setup").close()
    assert shell_writes("sed -i s/a/b/ a/$((n))/*.d/x.md", str(root)).writes == []
    for command in ("sed -i s/a/b/ a/$((n))/*/x.md", "sed -i s/a/b/ a/$((n))/**/x.md"):
        with pytest.raises(UnresolvedShellWrite):
            shell_writes(command, str(root))


@pytest.mark.parametrize("face", sorted(FACES))
def test_each_face_allows_a_write_no_managed_file_can_be_and_denies_its_twin(root: Path, face: str) -> None:
    """Through each face's hook: a write named only in part is allowed where no path it may be is
    managed, and denied (naming the word) where one may be."""
    for command, denied in (
        ('echo x > "logs/$(date +%s).log"', False),
        ("find src -type f -delete", False),
        ('echo x > "plans/$(date +%s).log"', True),
        ("find -L plans -type f -delete", True),
        ('find plans "$(echo -delete)"', True),
        ('sed "$(echo -i)" d plans/plan.md', True),
        ("apply_patch <<'EOF'\n*** Begin Patch\n*** Delete File: plans/plan.md\n*** End Patch\nEOF", True),
    ):
        answer = _pre_tool(face, command, root)
        assert ("deny" in answer) is denied, (command, answer)
        assert not denied or re.search(r"(?:Name the file|Write the program) literally", answer), answer


def _pre_tool(face: str, command: str, root: Path) -> str:
    """What `face`'s hook answers before the shell command `command` runs in `root`."""
    module = importlib.import_module(f"coherent_volume.{face}")
    return str(module.FACE.run(json.dumps(FACES[face](command, str(root))), budget=3.0).stdout)


AFTER = {
    "claude_code": lambda command, cwd: {
        **FACES["claude_code"](command, cwd),
        "hook_event_name": "PostToolUse",
        "tool_response": {"stdout": "", "stderr": "", "interrupted": False, "isImage": False},
    },
    "codex": lambda command, cwd: {
        **FACES["codex"](command, cwd),
        "hook_event_name": "PostToolUse",
        "tool_response": "",
    },
    "gemini": lambda command, cwd: {
        **FACES["gemini"](command, cwd),
        "hook_event_name": "AfterTool",
        "tool_response": {"llmContent": f"Command: {command}\nExit Code: 0", "returnDisplay": ""},
    },
    "cursor": lambda command, cwd: {**FACES["cursor"](command, cwd), "hook_event_name": "afterShellExecution"},
}
"""Each face's event after a shell command ran (FACES: before it)."""
AGENTS = {"claude_code": "claude"}
"""The prefix of a face's agent names, where it is not the face's name."""


@pytest.mark.parametrize("face", sorted(FACES))
def test_the_files_a_find_deleted_are_recorded_as_the_sessions_deletions(root: Path, face: str) -> None:
    """`find plans -name '*.md' -delete` run by a session that read the file: its check takes the
    grant, the command deletes the file, and after it (when the command's words no longer name the
    file) the hook records the deletion as the session's and releases the grant, as after `rm`."""
    module = importlib.import_module(f"coherent_volume.{face}")
    agent = f"{AGENTS.get(face, face)}:{unique('c1' if face == 'cursor' else 's1')}"
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/plan.md", "v1\n")
    with CoherentVolume(root, agent=agent) as session:
        session.read("plans/plan.md")  # its view, as a tool's read would register it
    command = "find plans -name '*.md' -delete"
    answer = module.FACE.run(json.dumps(FACES[face](command, str(root))), budget=3.0)
    assert "deny" not in answer.stdout, answer
    assert subprocess.run(["sh", "-c", command], cwd=root, timeout=30).returncode == 0
    answer = module.FACE.run(json.dumps(AFTER[face](command, str(root))), budget=3.0)
    assert answer.code == 0 and not answer.stderr, answer
    with CoherentVolume(root, agent="observer") as observer:
        [deletion, _] = observer.history("plans/plan.md")
        assert (deletion.version, deletion.writer, deletion.hash) == (2, agent, None)
        observer.write("plans/plan.md", "v3\n")  # no grant is left: the file is free for the next writer


def test_a_hard_link_of_a_managed_file_or_of_the_registry_is_refused(root: Path) -> None:
    """A hard link gives a managed file (or the registry) a second name through which a write
    reaches its bytes unchecked: `ln`, `cp -l`, `link` with a managed file or a registry file at
    either end is refused, as the mount refuses link(2) there; an end known only when the command
    runs is refused where it may be managed. A symlink, or a hard link of unmanaged files, is made."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/plan.md", "v1\n")
    (root / "notes.txt").write_text("n\n")
    for command, said in (
        ("ln plans/plan.md notes2.txt", "'plans/plan.md' is managed: hard links"),
        ("ln -f plans/plan.md", "'plans/plan.md' is managed"),  # a link of its name, here
        ("cp -al plans snapshot", "'plans/plan.md' is managed"),  # a directory: each file below it
        ("cp --li plans/plan.md x", "'plans/plan.md' is managed"),
        ("link plans/plan.md x", "'plans/plan.md' is managed"),
        ("ln notes.txt plans/new.md", "'plans/new.md' is managed"),
        ("ln .coherent/registry.db notes.db", "registry"),
        ("cd .coherent && ln registry.db ../notes.db", "registry"),
    ):
        with pytest.raises(LinkRefused, match=said) as refused:
            shell_writes(command, str(root))
        assert "coherent-volume refused this shell command" in str(refused.value), command
    with pytest.raises(UnresolvedShellWrite, match="an end of a hard link"):
        shell_writes('ln -- "plans/$(date +%s).md" x', str(root))
    assert shell_writes("ln notes.txt n.txt", str(root)).writes == [(f"{root}/n.txt", W)]
    assert shell_writes("ln -s plans/plan.md alias", str(root)).writes == [(f"{root}/alias", W)]


@pytest.mark.parametrize("face", sorted(FACES))
def test_each_face_denies_a_hard_link_of_a_managed_file_or_of_the_registry(root: Path, face: str) -> None:
    """Through each face's hook, `ln plans/plan.md notes.txt` (after which `echo x > notes.txt`
    would change plans/plan.md unchecked) and `ln .coherent/registry.db notes.db` (after which
    `: > notes.db` would destroy the registry) are denied, saying why."""
    module = importlib.import_module(f"coherent_volume.{face}")
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/plan.md", "v1\n")
    for command, said in (
        ("ln plans/plan.md notes.txt", "hard links to or from managed files are not allowed"),
        ("ln .coherent/registry.db notes.db", "the registry"),
    ):
        answer = module.FACE.run(json.dumps(FACES[face](command, str(root))), budget=3.0)
        assert "deny" in answer.stdout and said in answer.stdout, (command, answer)


def test_a_find_that_prunes_the_registry_while_it_deletes_is_refused_saying_prune_keeps_nothing_out(
    root: Path,
) -> None:
    """-delete turns on -depth, with which -prune keeps find out of no directory: `find . -path
    ./.coherent -prune -o -type f ! -name '*.md' -delete` reaches the registry's files (GNU find
    refuses to run it; with -depth it deletes them). The refusal says so, not only "leave it out"."""
    listed = subprocess.run(
        ["find", ".", "-depth", "-path", "./.coherent", "-prune", "-o", "-type", "f", "!", "-name", "*.md", "-print"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "./.coherent/" in listed.stdout, listed  # what it would delete, registry files among them
    with pytest.raises(UnresolvedShellWrite, match="-prune leaves no directory out") as refused:
        shell_writes("find . -path ./.coherent -prune -o -type f ! -name '*.md' -delete", str(root))
    assert "-print instead of -delete" in str(refused.value)


def test_git_clean_and_git_stash_of_untracked_files_are_refused_in_or_above_a_volume(
    root: Path, tmp_path: Path
) -> None:
    """`git clean -fdx` (and -X, and `git stash -a`/`-u`) removes files git does not track, or
    ignores: in a volume that is its registry (every version and grant) and untracked managed
    files, a set known only when it runs. In or above a volume it is refused, saying what to run
    instead; a dry run, a directory that holds no managed file, or a place with no volume below
    goes ahead."""
    git = ["git", "-c", "user.email=a@b", "-c", "user.name=a"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, timeout=30)
    (root / ".gitignore").write_text(".coherent/\nbuild/\n")
    (root / "plans/plan.md").write_text("untracked\n")
    (root / "build").mkdir()
    (root / "build/out.o").write_text("o\n")
    subprocess.run([*git, "add", "vol/.gitignore"], cwd=tmp_path, check=True, timeout=30)
    subprocess.run([*git, "commit", "-qm", "i"], cwd=tmp_path, check=True, timeout=30)
    listed = subprocess.run(["git", "clean", "-ndx"], cwd=root, capture_output=True, text=True, timeout=30)
    assert "Would remove .coherent/" in listed.stdout, listed  # what `git clean -fdx` would delete
    for command, cwd in (
        ("git clean -fdx", root),
        ("git clean -fdX", root),
        ("git clean -xdf -e node_modules", root),
        ("git clean -fd", root),  # an untracked managed file
        ("git clean --force -d -x -- .", root),
        ("git stash --all", root),
        ("git stash -u", root),
        ("git stash push --include-u -m wip", root),
        ("git -C vol clean -fdx", tmp_path),  # above the volume, named
        ("git clean -fdx", tmp_path),  # above the volume, not named
        ("cd {parent} && git clean -fdx", root),
        ("git --work-tree=. clean -fdx", tmp_path / "vol" / "build"),  # another work tree: anywhere
        ("GIT_WORK_TREE={root} git clean -fdx", tmp_path / "vol" / "build"),
        ("git -c alias.tidy='clean -fdx' tidy", tmp_path),  # an alias may be clean
        ('git "$SUB" -fdx', tmp_path),
    ):
        with pytest.raises(UnresolvedShellWrite, match="git") as refused:
            shell_writes(command.replace("{parent}", str(tmp_path)).replace("{root}", str(root)), str(cwd))
        assert str(root) in str(refused.value) and "git clean -n" in str(refused.value), command
    outside = tmp_path / "outside"
    outside.mkdir()
    for command, cwd in (
        ("git clean -ndx", root),
        ("git clean --dry-run -fdx", root),
        ("git stash; git stash list; git stash pop", root),
        ("git status && git diff > /dev/null", root),
        ("git -c core.quotepath=off -C . status; git --no-pager log -p", root),
        ("git clean -fdx build/", root),  # no managed file can lie there
        ("git clean -fdx", outside),  # no volume below
    ):
        assert shell_writes(command, str(cwd)).writes in ([], [("/dev/null", W)]), command


def test_a_hard_link_through_a_symlinked_directory_is_refused_as_cp_follows_it(root: Path) -> None:
    """`cp -l` follows symlinks as its options say (with -l and none of -P, -d, -a: every one; -H:
    those on its command line; a trailing `/` always): a managed file reached through a symlinked
    directory gets a second link as surely as one named directly. Each form is refused; one that
    links the symlink itself (-P, -a) is made, as cp makes it."""
    with CoherentVolume(root, agent="setup") as setup:
        setup.write("plans/plan.md", "v1\n")
    (root / "lnk").symlink_to("plans")
    (root / "src").mkdir()
    (root / "src/p").symlink_to("../plans")
    for command in (
        "cp -rlL lnk snap",
        "cp -rlH lnk snap",
        "cp -rl --dereference lnk snap",
        "cp -rl lnk snap",
        "cp -rl src/p snap",
        "cp -rlL src snap",
        "cp -rl src snap",
        "cp -rlP lnk/ snap",
        "cp -aHl lnk snap",
    ):
        with pytest.raises(LinkRefused, match="is managed") as refused:
            shell_writes(command, str(root))
        assert "coherent-volume refused this shell command" in str(refused.value), command
    for command in ("cp -rlP lnk snap", "cp -al src snap", "cp -rlH src snap"):
        shell_writes(command, str(root))  # the symlink itself is linked: no managed file reached
        made = subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, text=True, timeout=30)
        assert made.returncode == 0 and (root / "plans/plan.md").stat().st_nlink == 1, (command, made)
        subprocess.run(["rm", "-rf", "snap"], cwd=root, check=True, timeout=30)


def test_a_refused_program_with_an_expansion_says_to_write_the_program_literally(root: Path) -> None:
    """A sed or awk program with an expansion may write any file (`w FILE`, `print > FILE`): refused,
    saying to write the program literally, not to name the file (which the command already names
    literally); an awk program that runs commands says to run them on their own."""
    for command in ('sed -n "${START},${END}p" plans/plan.md', 'sed "s/a/$N/" notes.txt', 'awk "{ print $N }" f'):
        with pytest.raises(UnresolvedShellWrite, match="Write the program literally") as refused:
            shell_writes(command, str(root))
        assert "Name the file literally" not in str(refused.value), command
    with pytest.raises(UnresolvedShellWrite, match="Run those commands as commands of their own"):
        shell_writes("awk '{ print | \"sh\" }' notes.txt", str(root))


BACKGROUND: list[tuple[str, list[str]]] = [
    # (command, the files it writes in the background: by a job it does not surely wait for)
    ("(sleep 1; echo x > plans/plan.md) > /dev/null 2>&1 &", [*PLAN_FILE, "/dev/null"]),
    ("nohup sed -i s/a/b/ plans/plan.md &", PLAN_FILE),
    ("sed -i s/a/b/ plans/plan.md & disown; wait", PLAN_FILE),
    ("coproc { sleep 1; echo x > plans/plan.md; }", PLAN_FILE),
    ("coproc { echo x > plans/plan.md & wait; }", PLAN_FILE),  # the `wait` is the coproc's
    ("setsid strace -o plans/plan.md true", PLAN_FILE),  # strace runs in what setsid leaves running
    ("setsid sed -i s/a/b/ plans/plan.md; sudo -b rm plans/other.md", [*PLAN_FILE, "plans/other.md"]),
    ("systemd-run --user -d rm plans/plan.md", PLAN_FILE),
    ("echo hi | tee >(cat > plans/plan.md) > /dev/null", PLAN_FILE),  # a process substitution
    ("x=$(echo x > plans/plan.md &)", PLAN_FILE),
    ("( (echo x > plans/plan.md) & ); wait", PLAN_FILE),  # not a job of the shell that waits
    ("echo x > plans/plan.md & (wait); echo x > plans/other.md & true && wait", [*PLAN_FILE, "plans/other.md"]),
    ("echo x > plans/plan.md & exit 0; wait", PLAN_FILE),
    ("echo x > plans/plan.md & eval 'ex''it 0'; wait", PLAN_FILE),
    ("set -e; echo x > plans/plan.md & false; wait", PLAN_FILE),
    ("echo x > plans/plan.md & ex''it 0; wait", PLAN_FILE),  # quotes hide no word from bash
    ("se''t -e; echo x > plans/plan.md & false; wait", PLAN_FILE),
    ("echo x > plans/plan.md & /bin/kil''l -USR1 $$; wait", PLAN_FILE),
    ("echo x > plans/plan.md & $'\\x65xit' 0; wait", PLAN_FILE),  # ANSI-C quoting may spell any word
    ("echo x > plans/plan.md & wait; echo x > plans/other.md &", ["plans/other.md"]),
    ("tmux new -d 'sleep 1; echo x > plans/plan.md'", PLAN_FILE),  # run by tmux's server
    ('tmux new-session -d -s s -c plans "sed -i s/a/b/ plan.md"', PLAN_FILE),
    ("screen -dmS s sh -c 'sleep 1; echo x > plans/plan.md'", PLAN_FILE),
    ("daemonize -o plans/other.md -c plans /bin/sed -i s/a/b/ plan.md", [*PLAN_FILE, "plans/other.md"]),
    # the shell may end before its `wait`, the job surviving it
    ("{ echo x > plans/plan.md 9<&- & fuser -sk -KILL m 9<&-; wait; } 9<m", PLAN_FILE),
    ("echo x > plans/plan.md & prlimit --pid $$ --cpu=0; wait", PLAN_FILE),
    ("echo x > plans/plan.md & gdb -p $$ -batch -ex 'call abort()'; wait", PLAN_FILE),
    (
        "echo x > plans/plan.md & python3 -c 'import os; os.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)'; wait",
        PLAN_FILE,
    ),
    ("echo x > plans/plan.md & echo $((1/0)); wait", PLAN_FILE),  # bash ends a script on an expansion error
    ("echo x > plans/plan.md & EUID=0; wait", PLAN_FILE),  # one of bash's own read-only variables
    ("echo x > plans/plan.md & x=${}; wait", PLAN_FILE),  # a bad substitution
    ("echo x > plans/plan.md &\ndone\nwait", PLAN_FILE),  # a syntax error after the job: bash ends there
    ("echo x > plans/plan.md & readonly r=1; r=2; wait", PLAN_FILE),
    ("echo x > plans/plan.md & exec true; wait", PLAN_FILE),  # the shell replaced
    ("echo x > plans/plan.md & command exec true; wait", PLAN_FILE),
    ("echo x > plans/plan.md & declare -i n; n=x+; wait", PLAN_FILE),
    ("echo x > plans/plan.md & f() { local -r n=1; n=2; }; f; wait", PLAN_FILE),
    ("echo x > plans/plan.md & if [ -e x ]; then exit 0; fi; wait", PLAN_FILE),
    ("echo x > plans/plan.md & kill -TERM $$; wait", PLAN_FILE),  # a signal sent to the shell
    ("echo x > plans/plan.md & pkill -f bash; wait", PLAN_FILE),
    ("echo x > plans/plan.md & echo $$ | xargs kill; wait", PLAN_FILE),
    ("echo x > plans/plan.md & find /proc/$$/stat -exec /bin/kill {} +; wait", PLAN_FILE),
    ("echo x > plans/plan.md & eval 'kill -TERM 0'; wait", PLAN_FILE),
    ("echo x > plans/plan.md & python3 -c 'import os; os.kill(os.getppid(), 9)'; wait", PLAN_FILE),
    ("echo x > plans/plan.md & python3 -c 'from os import killpg as k; k(0, 9)'; wait", PLAN_FILE),
    ("echo x > plans/plan.md & perl -e 'kill 9, getppid'; wait", PLAN_FILE),
    ("echo x > plans/plan.md & ruby -e 'Process.kill 9, Process.ppid'; wait", PLAN_FILE),
    ('echo x > plans/plan.md & python3 -c \'import os; open("/proc/%d/mem" % os.getppid(), "wb")\'; wait', PLAN_FILE),
    ("echo x > plans/plan.md & echo $((08)); wait", PLAN_FILE),  # not a number to bash
    ("echo x > plans/plan.md & echo $((2**-1)); wait", PLAN_FILE),
    ("echo x > plans/plan.md & echo ${a[i]} ${v:i}; wait", PLAN_FILE),  # arithmetic on a variable
    ("echo x > plans/plan.md & echo ${!v}; wait", PLAN_FILE),
    ("echo x > plans/plan.md & { sleep 1; echo x; } > >(true); wait", PLAN_FILE),  # SIGPIPE
    ("echo x > plans/plan.md & a[1/0]=x; wait", PLAN_FILE),  # a subscript that fails ends the shell
    ("echo x > plans/plan.md & day[08]=x; wait", PLAN_FILE),
    ("echo x > plans/plan.md & a=([1/0]=x); wait", PLAN_FILE),
    ("echo x > plans/plan.md & read 'a[1/0]' <<< x; wait", PLAN_FILE),
    ("echo x > plans/plan.md & POSIXLY_CORRECT=1; : > nodir/x; wait", PLAN_FILE),  # POSIX mode
    ("echo x > plans/plan.md & FUNCNEST=1; f() { g; }; g() { :; }; f; wait", PLAN_FILE),
    ("echo x > plans/plan.md & /bin/k?ll -9 $$; wait", PLAN_FILE),  # a program named by a pattern
    ("echo x > plans/plan.md & perl -e 'syscall(62, getppid, 9)'; wait", PLAN_FILE),  # a raw system call
    # a statement between a job and its `wait` (it may end the shell, or move what a variable names)
    ("echo x > plans/plan.md & wait -p UID -n", PLAN_FILE),  # a name bash refuses: it does not wait
    ("echo x > plans/plan.md & wait -p 1x", PLAN_FILE),
    ('read POSIXLY_CORREC{T,} <<< "1 2"\necho x > plans/plan.md & times() { :; }; wait', PLAN_FILE),  # POSIX mode
    ("v=POSIXLY_CORREC; read ${v}T <<< 1\necho x > plans/plan.md & wait", PLAN_FILE),  # a name known when it runs
    (
        'read POSIXLY_CORREC{T,} BASH_ALIASES{\\[wait\\],} <<< "1 2 : x"\necho x > plans/plan.md &\nwait',
        PLAN_FILE,
    ),  # `wait` an alias
    ("echo x > plans/plan.md & pid=$!; return() { :; }; wait $pid", PLAN_FILE),  # a function's definition
    ("for i in 1 2; do [ $i = 2 ] && break x; echo x > plans/plan.md & done; wait", PLAN_FILE),  # round 2 after
    ("while [ ! -e .d ] || break x; do : > .d; echo x > plans/plan.md & done; wait", PLAN_FILE),
    ("for ((i=0; i<2; i++)); do echo x > plans/plan.md & done; wait", PLAN_FILE),
    ("for t in 2 0; do (sleep $t; echo $t > plans/plan.md) & done; wait $!", PLAN_FILE),  # one job per round
    ("for t in 2 0; do (sleep $t; echo $t > plans/plan.md) & done; wait -n", PLAN_FILE),
    ("for t in 0 2; do (sleep $t; echo $t > plans/plan.md) & done; wait %1", PLAN_FILE),
    ("echo x > plans/plan.md & x=${1x} wait", PLAN_FILE),  # what bash expands before the `wait`
    ("echo x > plans/plan.md & wait <<< ${1x}", PLAN_FILE),
    ("echo x > plans/plan.md & wait <<E\n${1x}\nE", PLAN_FILE),
    ("case a in a) echo x > plans/plan.md & ;;& b) ;; esac; wait", PLAN_FILE),  # patterns after it
    ("trap ': ${1x}' DEBUG; echo x > plans/plan.md & wait", PLAN_FILE),  # a handler between
    ("echo x > plans/plan.md & mapfile -C 'exit 0 #' -c 1 arr < /dev/null; wait", PLAN_FILE),
    ("echo x > plans/plan.md & f() { exit 4; }; compgen -F f x; wait", PLAN_FILE),
    ("echo x > plans/plan.md & for i in 1; do break x; done; wait", PLAN_FILE),
    ("echo x > plans/plan.md & : ${1x}; wait", PLAN_FILE),
    ('echo x > plans/plan.md & n=[1/0]; test -v "a$n"; wait', PLAN_FILE),
    ("echo x > plans/plan.md & pid=$!; x=$(printf '$\\x5bpid=1]'); : \"${x@P}\"; wait $pid", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & ls /usr/local/bin ~/.local; wait", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & cat docs/declare.md; make set-up; echo 'enable tests'; wait", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & find . -name '*.md' -exec grep -l x {} +; wait", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & export N=1; wait", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & cat src/signal_handler.c processes/mem.txt docs/strace.md; wait", PLAN_FILE),
    ("make > plans/plan.md 2>&1 & pytest tests/test_kill.py; ls /usr/lib/kill/; wait", PLAN_FILE),
    ('make > plans/plan.md 2>&1 & echo "${a[@]}" ${#a[@]} ${!a[@]} ${!PA@} ${a[0]} ${v:0:5}; wait', PLAN_FILE),
    ("make > plans/plan.md 2>&1 & echo $((2*3)) $[1+1] $(( 10 - 2 )); wait", PLAN_FILE),
    ('sed -i s/a/b/ plans/plan.md & pid=$!; echo "started $pid"; wait "$pid"', PLAN_FILE),
    ("sed -i s/a/b/ plans/plan.md & pid=$!; cd plans; wait ${pid}", PLAN_FILE),
    ('sed -i s/a/b/ plans/plan.md & P=$!; IFS=1; wait "$P"', PLAN_FILE),
    # a `wait` for some job only
    ("sleep 1 & echo x > plans/plan.md & wait -n", PLAN_FILE),  # for one of the two
    ("echo x > plans/plan.md & sleep 1 & wait $!", PLAN_FILE),
    ("echo x > plans/plan.md & sleep 1 & wait %2", PLAN_FILE),
    ("echo x > plans/plan.md & wait %2", PLAN_FILE),
    # a variable set to `$!` that may name another job by the `wait`
    ("echo x > plans/plan.md & P=$!; P=5; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; read P < /dev/null; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; printf -vP 1; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; for P in 1; do :; done; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; f() { unset P; }; f; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; declare -n R=P; R=1; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; (( P++ )); wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; eval 'P=1'; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; trap 'P=1' CHLD; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; IFS=1; wait $P", PLAN_FILE),  # split where IFS says
    ("echo x > plans/plan.md & (P=$!); wait $P", PLAN_FILE),  # set in a subshell
    ("echo x > plans/plan.md & if [ -e x ]; then P=$!; fi; wait $P", PLAN_FILE),  # set in a branch
    ("echo x > plans/plan.md & [ -e x ] && P=$!; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & f() { P=$!; }; wait $P", PLAN_FILE),  # in a function never called
    ("echo x > plans/plan.md & P=$! | cat; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & sleep 1 & P=$!; wait $P", PLAN_FILE),  # the second job
    ("echo x > plans/plan.md & P=$!; sleep 1 & P=$!; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; echo x > plans/other.md & wait $P", ["plans/other.md"]),
    ("echo x > plans/plan.md & Q=$!; sleep 1 & P=$!; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & cat < <(true); P=$!; wait $P", PLAN_FILE),  # $! is the process substitution
    ("echo x > plans/plan.md & RANDOM=$!; wait $RANDOM", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; kill -0 $P; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; [[ P=1 -eq 1 ]]; wait $P", PLAN_FILE),  # arithmetic sets it
    ("echo x > plans/plan.md & P=$!; x=P=1; [[ x -eq 1 ]]; wait $P", PLAN_FILE),  # through x's value
    ("echo x > plans/plan.md & P=$!; [[ -v a[P=1] ]]; wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & P=$!; a=([P=1]=x); wait $P", PLAN_FILE),
    ("echo x > plans/plan.md & cat > >(cat); wait $!", PLAN_FILE),  # $! is the process substitution
    ("echo x > plans/plan.md & wait 123", PLAN_FILE),
    # waited for, or in the foreground
    ("echo x > plans/plan.md & wait", []),
    ('for f in plans/*.md; do sed -i s/a/b/ "$f" & done; wait', []),
    ("f() { echo x > plans/plan.md & }; f; builtin wait", []),
    ("{ nohup sed -i s/a/b/ plans/plan.md & } 2> /dev/null; wait", []),
    ("setsid -w sed -i s/a/b/ plans/plan.md; systemd-run --user -d --wait rm plans/other.md", []),
    ("echo x > plans/plan.md; cat plans/plan.md | wc -l", []),
    ("sed -i s/a/b/ plans/plan.md & wait $!", []),
    ('sleep 1 & wait; echo x > plans/plan.md & wait "$!"', []),
    ("sed -i s/a/b/ plans/plan.md & wait -n; echo done", []),  # the only job
    ("sleep 1 & wait; sed -i s/a/b/ plans/plan.md & wait -n", []),
    ("sed -i s/a/b/ plans/plan.md & wait -f %1", []),
    ("sed -i s/a/b/ plans/plan.md & wait %%; sed -i s/a/b/ plans/other.md & wait %+", []),
    ("sed -i s/a/b/ plans/plan.md & wait -n %-", []),
    ("sed -i s/a/b/ plans/plan.md & sleep 1 & wait $(jobs -p)", []),
    ("(sleep 1; echo x > plans/plan.md) & pid=$!; wait $pid", []),  # a variable set to `$!`
    ("sed -i s/a/b/ plans/plan.md & p1=$!; sed -i s/o/p/ plans/other.md & p2=$!; wait $p1 $p2", []),
    ('sed -i s/a/b/ plans/plan.md & p1=$!; sed -i s/o/p/ plans/other.md & p2=$!; wait "$p1"; wait "$p2"', []),
    ("sed -i s/a/b/ plans/plan.md & p1=$!; sleep 1 & wait $p1", []),  # the other job writes nothing
]


@pytest.mark.parametrize(("command", "expected"), BACKGROUND, ids=[c[0][:60] for c in BACKGROUND])
def test_what_a_command_writes_in_the_background(root: Path, command: str, expected: list[str]) -> None:
    (root / "plans/plan.md").write_text("a\n")
    (root / "plans/other.md").write_text("o\n")
    found = shell_writes(command, str(root))
    assert found.background <= {path for path, _ in found.writes}, command
    assert sorted(found.background) == sorted(p if p.startswith("/") else f"{root}/{p}" for p in expected), command


@pytest.mark.parametrize("face", sorted(FACES))
def test_each_face_denies_a_write_in_the_background_off_a_mount(root: Path, face: str) -> None:
    """Through each face's hook, a command that leaves a write of a managed file to a job it does not
    wait for is denied, saying to run it in the foreground: the hook after the command would come
    before the job's write. With a `wait` for the job, or writing an unmanaged file, it goes ahead."""
    for command, denied in (
        ("(sleep 1; echo x > plans/new.md) > /dev/null 2>&1 &", True),
        ("setsid sed -i s/a/b/ plans/new.md", True),
        ("(sleep 1; echo x > plans/new.md) & wait", False),
        ("(sleep 1; echo x > plans/new.md) & pid=$!; wait $pid", False),
        ("(sleep 1; echo x > plans/new.md) & ls /usr/local; wait", True),  # a statement before the `wait`
        ("(sleep 1; echo x > plans/new.md) & pid=$!; pid=1; wait $pid", True),
        ("(sleep 1; echo x > plans/new.md) & python3 -c 'import os; os.kill(os.getppid(), 9)'; wait", True),
        ("(sleep 1; echo x > notes.txt) &", False),
    ):
        answer = _pre_tool(face, command, root)
        assert ("deny" in answer) is denied, (command, answer)
        assert not denied or "runs in the background" in answer and "in the foreground" in answer


def test_cd_enters_a_directory_as_bash_does(tmp_path: Path) -> None:
    """`cd` is logical in bash: `EXT/..` is the directory holding the symlink EXT, not the one holding
    where it leads; `-P` (and `set -P`) is physical. The file bash writes after each `cd` is one the
    command is found to write, and where bash's `cd` is certain, the only one."""
    root = tmp_path / "vol"
    (root / "plans/sub").mkdir(parents=True)
    (tmp_path / "ext/a/b/c").mkdir(parents=True)
    (root / "EXT").symlink_to(tmp_path / "ext/a/b")
    (root / "LINKDIR").symlink_to(root / "plans")
    (tmp_path / "VLINK").symlink_to(root)
    for start in (root, tmp_path / "VLINK"):
        for cd, certain in (
            ("cd EXT/..", True),
            ("cd EXT && cd ..", True),
            ("cd -L EXT/..", True),
            ("cd -P EXT/..", True),
            ("cd -PL EXT/..", True),
            ("cd -P EXT; cd ..", True),
            ("pushd EXT/.. > /dev/null", True),
            ("cd EXT; cd ..", True),
            ("cd EXT/../plans", True),
            ("cd EXT/c/../..", True),
            ("cd LINKDIR/sub/../..", True),
            ("cd EXT && cd $PWD/..", True),
            ("cd nosuch/.. 2> /dev/null", True),
            ("pushd -n plans > /dev/null", True),
            ("set -P; cd EXT/..", False),
            ('set -"P"; cd EXT/..', False),
            ("set -o phys''ical; cd EXT/..", False),
            ("cd EXT/../a 2> /dev/null", False),
        ):
            command = f"{cd}; echo x > zz.txt"
            for made in tmp_path.rglob("zz.txt"):
                made.unlink()
            ran = subprocess.run(["bash", "-c", command], cwd=start, capture_output=True, text=True, timeout=30)
            assert ran.returncode == 0, (command, ran)
            [written] = {os.path.realpath(made) for made in tmp_path.rglob("zz.txt")}
            found = {os.path.realpath(p) for p, _ in shell_writes(command, str(start)).writes if p.endswith("zz.txt")}
            assert written in found and (not certain or found == {written}), (start, command, written, found)


def _writes_for_real(root: Path, command: str) -> tuple[set[str], set[str]]:
    """(the files of `root` that running `command` there with bash changed or removed, those
    `shell_writes` finds it writes), each relative to `root`; every file is put back first."""
    for name in ("plans/plan.md", "plans/other.md", "notes.txt"):
        (root / name).write_text("a\n")
    before = [p for p in root.rglob("*") if p.is_file() and ".coherent" not in p.parts]
    for path in before:
        os.utime(path, ns=(0, 0))  # a file opened for writing, even given the same bytes, is changed
    found = {os.path.relpath(p, root) for p, _ in shell_writes(command, str(root)).writes}
    subprocess.run(["bash", "-c", command], cwd=root, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    now = [p for p in root.rglob("*") if p.is_file() and ".coherent" not in p.parts]
    changed = {p for p in before if not p.exists() or p.stat().st_mtime_ns} | set(now) - set(before)
    return {os.path.relpath(p, root) for p in changed}, found


def test_perl_in_place_is_seen_in_any_switch_cluster_as_perl_reads_it(root: Path) -> None:
    """`-i` bundled after switches that take digits (`-0`, `-0777`, `-l0`) or none (`-g`) edits in
    place as surely as `-pi` (found by a hostile probe: allowed unchecked); a letter that takes the
    rest of the cluster (`-I`, `-C`, `-M`) hides an `i` after it from perl. Each command is run, and
    the file it edits is the one found."""
    for command in (
        "perl -0pi -e s/a/b/ plans/plan.md",
        "perl -0777pi -e s/a/b/ plans/plan.md",
        "perl -gpi -e s/a/b/ plans/plan.md",
        "perl -l0pi -e s/a/b/ plans/plan.md",
        "perl -ln0pi -e s/a/b/ plans/plan.md",
        "perl -pe s/a/b/ -i plans/plan.md",  # a switch after -e's program
        "perl -I . -pi -e s/a/b/ plans/plan.md",
        "perl -Ipi -e s/a/b/ plans/plan.md",  # -I's directory is `pi`
        "perl -CSDpi -e s/a/b/ plans/plan.md",  # perl refuses the Unicode flag `p`
        "perl -Mstrict -ne print plans/plan.md",
    ):
        changed, found = _writes_for_real(root, command)
        assert changed == found, (command, changed, found)


SED_SCRIPTS = [
    # (a sed script, run as `sed -n SCRIPT notes.txt`: GNU sed opens its `w` files as it reads the script)
    "1~1w plans/plan.md",
    "0~4w plans/plan.md",
    "1,+1w plans/plan.md",
    "1,~2 w plans/plan.md",
    "0,/a/w plans/plan.md",
    "s|a|b|w plans/plan.md",
    "s a b gw plans/plan.md",
    "s/a/b/ g w plans/plan.md",
    "\\,x, w plans/plan.md",
    "\\%a% I,$ !w plans/plan.md",
    "/a/I,/b/M{ p ; w plans/plan.md\n}",
    "y/a/b/;W plans/plan.md",
    "s/a\\/b/c\\\nd/;w plans/plan.md",
    "1{a foo}\n}; w plans/plan.md",  # a's text runs to the end of its line
    "a\\\nfoo\\\nw plans/other.md\np;w plans/plan.md",  # continued text
    "i foo; w plans/other.md",  # the one-line form: text too
    "r plans/other.md;w plans/plan.md",  # r's file runs to the end of the line
    ":a;t a;b e;T x;:e;:x;w plans/plan.md",
    "b a#x;w plans/other.md\n:a",  # a comment after a label
    "l 5;q 3;w plans/plan.md",
    "#n;w plans/other.md\nw plans/plan.md",
    "w /dev/stdout\ns/a/b/w /dev/stderr",  # sed's own streams
    "s/w plans\\/plan.md/x/",
    "$!N;P;D",
]


def test_sed_writes_the_files_its_script_names_as_gnu_sed_reads_it(root: Path) -> None:
    """A sed script is read as GNU sed compiles it (addresses `FIRST~STEP`, `A,+N`, `A,~N`, `0,/RE/`,
    `\\cREc` with any delimiter, `s` with any delimiter and flags, text of `a`/`i`/`c`, labels, file
    names to the end of the line): the files its `w`, `W` and `s///w` write are found, and no other
    (found by a hostile probe: `1~1w F`, `1,+1w F`, `s|a|b|w F`, `\\,x, w F` wrote unchecked). Each is
    run, and the files it writes are those found."""
    for script in SED_SCRIPTS:
        for command in (f"sed -n {shlex.quote(script)} notes.txt", f"sed -n -e {shlex.quote(script)} notes.txt"):
            changed, found = _writes_for_real(root, command)
            assert changed == found, (command, changed, found)
    (root / "w.sed").write_text("1~1w plans/plan.md\n")
    changed, found = _writes_for_real(root, "sed -n -f w.sed notes.txt; sed -n --file=w.sed -e p notes.txt")
    assert changed == found == {"plans/plan.md"}


def test_a_sed_script_that_runs_commands_or_cannot_be_read_may_write_any_file(root: Path) -> None:
    """sed's `e` command and `s///e` flag run shell commands, as awk's system() does; a script file
    that cannot be read now, or a script this does not read as GNU sed does, may write any file: each
    is refused in a volume (found by a hostile probe: `sed '1e echo x > top.md'` wrote unchecked)."""
    (root / "w.sed").write_text("1e echo x > plans/plan.md\n")
    for command, said in (
        ("sed '1e echo x > plans/plan.md' notes.txt", "of their own"),
        ("sed -n '1s/.*/echo x > plans\\/plan.md/e' notes.txt", "of their own"),
        ("sed -n 's/a/b/gep' notes.txt", "of their own"),
        ("sed -f w.sed notes.txt", "of their own"),
        ("sed -n -f missing.sed notes.txt", "literally"),
        ("sed -n -f /dev/stdin notes.txt <<< 'w plans/plan.md'", "literally"),
        ("sed -n -f - notes.txt <<< 'w plans/plan.md'", "literally"),
        ("sed -n 'p;L' notes.txt", "literally"),  # a command GNU sed 4.9 does not know
        ("sed -n '{p' notes.txt", "literally"),
    ):
        with pytest.raises(UnresolvedShellWrite, match=said):
            shell_writes(command, str(root))


def test_watch_runs_its_words_as_a_shell_script(root: Path) -> None:
    """watch runs `sh -c` with its words joined by spaces (with `-x`, the words themselves): the
    files that script writes are found (found by a hostile probe: `watch -n1 'echo x > top.md'`
    wrote unchecked). Each is run for a moment on a terminal (`script`), and writes what is found."""
    for command, expected in (
        ("watch -n 0.1 'echo x > plans/plan.md'", {"plans/plan.md"}),
        ("watch -n 0.1 -- echo x \\> plans/plan.md", {"plans/plan.md"}),
        ("watch -t -x sh -c 'echo x > plans/plan.md'", {"plans/plan.md"}),
    ):
        (root / "plans/plan.md").unlink(missing_ok=True)
        found = {os.path.relpath(p, root) for p, _ in shell_writes(command, str(root)).writes}
        run = ["timeout", "2", "script", "-qc", command, "/dev/null"]
        subprocess.run(run, cwd=root, capture_output=True, timeout=30, env={**os.environ, "TERM": "xterm"})
        assert (root / "plans/plan.md").exists() and found == expected, (command, found)
