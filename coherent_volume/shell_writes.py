"""The files a shell command recognisably writes, for the hooks of agents whose shell tool runs
commands the hooks check like a write tool.

The command is parsed with bash's grammar (tree-sitter-bash) and its syntax tree walked as bash
would run it: every command of every list, pipeline, subshell, compound command (`if`, `for`,
`while`, `case`, `{ }`, `!`, `time`, `coproc`), function (where it is called, with the
redirections of its definition), command and process substitution, with here-documents and
here-strings as data (but the command substitutions of an unquoted one); a line continuation
inside a word joins it. Recognised writes:
- redirections by their operator: `>`, `>|`, `&>`, `>&FILE`, `<>` (and numbered: `2>`, `3<>`)
  write, `>>` and `&>>` append; `<`, `<<`, `<<<` and descriptor copies (`2>&1`) write nothing;
  `[ a > b ]` redirects too;
- `tee [-a]`, `sed -i` and sed's `w FILE`, `W FILE` and `s///w FILE` (the script read as GNU sed
  reads it, `-f` files too: `_SedScript`), `perl -i`, `ruby -i` (in any switch cluster, `-0777pi`:
  `_switch_cluster`), awk's `print > FILE` (each awk
  Debian ships reading its options as it does, `awk` and `nawk` as any of them: `_AWKS`) and
  gawk's `-i inplace` and `-d`/`-o`/`-p` files, `rm`/`unlink`/`shred`, `mv` (its sources are
  removed), `cp`, `install`, `ln` (`-T`: the destination itself), `truncate`, `dd of=`,
  `sort -o`, `uniq IN OUT`, `find -fprint FILE`, `time -o FILE`, `strace -o FILE` (a long option
  also by a prefix, as getopt_long takes it); a directory removed or moved stands for the files
  below it;
  `find START… EXPR -delete` for each file (not a directory, symlinks not followed) below its
  starting points, as they are now, for which its expression may reach `-delete`
  (`_find_expression`, `_find_reaches`: a test only the file system can decide may be either;
  `-prune` keeps it out of nothing, as `-delete` turns on `-depth`);
- a hard link (`ln` without `-s`, `cp -l`, `link`) with a managed file, or a file of a volume's
  registry, at either end: refused (LinkRefused, `refuse_hard_link`, the core's rule); the files
  below a directory `cp -l` links are found following symlinks as cp will (`_cp_follows`);
- `git clean` (but `-n`) and `git stash -u`/`-a`: deletions of files known only when they run
  (those git does not track or ignores, a registry among them) below the directories they clean
  (`_git_removes`), refused also where a volume lies below (`Unknown.volumes_below`);
- `apply_patch` run as a shell command (Codex applies it itself, with no apply_patch hook
  event): a write of files known only when it runs, checked only through the apply_patch tool;
- a word known only when it runs that may be an option of a command whose options change what it
  writes (`_altering`, `_shell_altering`: `sed "$o"`, `bash "$o" 'script'`), a dd operand that
  may be `of=`, a sed or awk program with an expansion, a sed program read from a file that cannot
  be read now or that `_SedScript` cannot read, and an awk or sed program that runs commands
  (`print | CMD`, `system()`, sed's `e`): a write of any file; for find, a word that may be a test or an
  action (`_find_altering`: `find plans "$(echo -delete)"`);
- looked through: the wrappers in `_WRAPPERS` with their own options (one that runs its command in
  another file system or directory: `_Wrapper.unsure`, `_Wrapper.here`), `runuser -u USER`, and the
  text of `bash -c`/`sh -c`, `su -c`, `runuser -c`, `flock -c`, `script -c` (which writes its
  typescript), `watch` (its words joined, `_Walk._watch`), `eval` and `trap` (a trap's handler also
  where the shell exits); an expansion in such a script is code known only when it runs.
Words are expanded as bash expands them (`$"…"` is its text, `$'…'` its decoded text, `_ansi_c`;
a leading /proc/self/cwd is the command's working directory, `_proc_word`, `_unproc`): brace
expansion, `~` (also after `NAME=`), `$HOME` (from
this process's environment), `$PWD`, the variables a second walk takes as known (`_Walk`: one set
only to one literal value or to `$(mktemp)`, a new name in $TMPDIR, from where that surely ran in
this shell; a `for` loop's in its body), then globs against the command's working directory (no
match: the word itself). `cd DIR` moves
the working directory for what follows in its shell (not out of a subshell or a pipeline), as bash
enters it (`_entered`: logically, `..` taken as text, unless `-P` or `set -P`): a directory that
exists is entered; one that does not is entered for what runs after the `cd` succeeded (`&&`), and
either may hold after `;`; after a loop, any directory a round can leave.

Writes in the background: those of a job the command does not surely wait for (`&` without a
`wait` after it in its shell that surely covers it, `_Walk.waited`, `_Walk._wait`, `_Walk._pid`, nor
anything before that may end the shell, `_QUITS`, `_SHELL_QUITS`, `_SIGNALS`; a process substitution;
a command `setsid`, `sudo -b`, `systemd-run`, `screen` or `daemonize` does not wait for:
`_Wrapper.detached`; the command of tmux's `new-session`, `_Walk._tmux`; every write of a command that runs a `coproc`,
`_Walk.coproc`), which may come after the command has ended, are listed apart
(`ShellWrites.background`). A job `at` or `batch` queues, and what other tmux commands run, is
code known only when it runs (below).

A write whose file cannot be told before the command runs (a variable, a command substitution,
arithmetic, a directory `cd` reached through one or the directory stack, a command named by an
expansion, the operands of `xargs`, `find -exec` or `parallel` running a writer, a `find -delete`
that follows symlinks, reads its starting points from a file or whose expression is not read, a
shell reading its script from its input (also by name, `bash /dev/stdin`, `source /dev/fd/0`:
`_from_input`), a pattern with a character class or with a quoted character
(but a letter, digit, `.`, `_`) in a bracket expression, more than `_MOST_EXPANDED` words, matches
or files below a directory, a command tree-sitter cannot parse, work past the bounds
`_MOST_VISITED`, `_MOST_SECONDS`, `_LONGEST`) is decided by the place its known part names (the
directory before the first expansion, else the working directory): the command is refused
(`UnresolvedShellWrite`) when that place is in a volume, unless no file the write may reach there
can be managed (`_Walk._unmanaged`: the rest of the word, its `Unknown.shape`, matches no managed
glob, `ManagedGlobs.may_match`, and no symlink, mount point or volume root lies where it may lead);
or when a volume the command's literal text names a path in lies at or below it (anywhere, for a
word that may be any path: one that starts with an expansion, or has a `..` after one); elsewhere it
goes ahead. An arithmetic expansion, `$$`-like parameters and `$(date +FORMAT)` of numeric
conversions stay within one segment of a path; any other expansion may be any path. Anything else
(aliases, a script, `source`, an interpreter's own file writes, `git checkout` and the other git
commands, prompt and arithmetic-subscript evaluation, a file reopened through /proc/self/fd by a
program (a write by such a name, a redirection or a writer's file, to a descriptor the command
opened to read is recognised: `_READ_REDIRECTION`), a write through a hard link of a managed file
made some other way) is not recognised; on a mount the file system checks those writes.

Paths are joined to the working directory as given: `..` is left for the caller to resolve (after
following symlinks, as the kernel does).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import os
import re
import shlex
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import Literal

import tree_sitter
import tree_sitter_bash

from .core import VolumeCore, open_core
from .core.renames import refuse_hard_link
from .errors import CoherenceError, LinkRefused, OutsideVolume, UnresolvedShellWrite
from .globs import ManagedGlobs, Piece, Wild
from .hook_paths import Located, located, located_directory, through_own_process, unlinks_link
from .paths import REGISTRY_DIR, STAGING, is_registry_path
from .protocol import HandleKind
from .registry import DB_FILE, recorded_in

_MOST_EXPANDED = 1000
"""Words of a brace expansion, and matches of a pattern, at most (more: the word is unknown); and
files a directory a command removes, moves or copies over stands for at most."""
_DEEPEST = 8
"""Nesting of `bash -c`, `eval` and function calls followed at most."""
_MOST_CALLS = 100
"""Function calls followed at most in one command."""
_LOOP_ROUNDS = 4
"""Rounds of a loop followed to find the directories it can end in (more: unknown)."""
_MOST_VISITED = 10_000
"""Directory entries pattern matching and directories removed or moved read at most, in all, for
one command (more: the word is unknown)."""
_MOST_SECONDS = 1.0
"""Time the recogniser takes at most for one command (more: what is left is unknown), well within
a hook's budget."""
_LONGEST = 100_000
"""Characters of a command parsed at most (longer: a command not followed)."""


_PREVIOUS = (
    "the previous directory (OLDPWD): after a `cd`, the directory the command started in; before one, any "
    "directory the shell inherited as it"
)
"""Why `$OLDPWD` and `~-` are known only when the command runs: placed in its start directory."""


class _TooMuch(Exception):
    """The recogniser's bound on entries read or on time ran out."""


@dataclass(frozen=True)
class Unknown:
    """A word (or working directory) known only when the command runs: its text, why, and the
    directory its known part names."""

    word: str
    why: str
    place: str
    anywhere: bool = False
    """It may be any path, not only one below `place`: refused also when the command names a
    path in a volume."""
    shape: tuple[Piece, ...] | None = None
    """What it may be below `place` (`globs.Wild` for the parts known only when the command runs),
    when that is known: in a volume, refused only where some path of it may be managed (`_unmanaged`).
    None: any path below `place`."""
    lead: str | None = None
    """The characters the word surely begins with, as a command receives it (its literal text before
    the first expansion); None when an expansion may split it into several words, or nothing is known
    of it. Whether it may be an option (`_may_begin`)."""
    volumes_below: bool = False
    """It may remove any file below `place`, a volume's registry too (`git clean`): refused also when
    a volume lies below `place`, or when too many entries lie there to tell (`_volume_below`)."""
    advice: str | None = None
    """What to do instead, when naming the file literally is not the way (the refusal's last words)."""

    def below(self, *pieces: Piece) -> Unknown:
        """This unknown with `pieces` after its shape (`/` separates segments)."""
        return dataclasses.replace(self, shape=None if self.shape is None else (*self.shape, *pieces))


@dataclass(frozen=True)
class ShellWrites:
    """What a shell command recognisably writes (`shell_writes`)."""

    writes: list[tuple[str, HandleKind]]
    """Each file, with how."""
    background: frozenset[str] = frozenset()
    """Those of `writes` written in the background: by a job the command starts and does not surely
    wait for (`_Walk.background`), which may still write once the command has ended."""


Follow = Literal["all", "top", "none"]
"""Which symlinks a command follows in a directory it reads: every one, one named on its command
line, none (but one named with a trailing `/`, which the kernel follows)."""
Cwd = str | Unknown
Item = str | Unknown
Chars = list[tuple[str, bool]]
"""A word's characters, each with whether it is quoted (literal to brace and glob expansion)."""
Spelled = list[tuple[str, bool] | Wild]
"""A word's characters (`Chars`), with the `Wild` each part known only when the command runs may be."""
State = frozenset[Cwd]
"""The working directories a command may run in (more than one after a `cd` that may fail)."""

_WRITE_OPS: dict[str, HandleKind] = {">": "write", ">|": "write", "&>": "write", ">&": "write", "<>": "write"}
_WRITE_OPS |= {">>": "append", "&>>": "append"}
_GLOB = set("*?[")
_SHELLS = {"sh", "bash", "rbash", "dash", "zsh", "ksh", "mksh", "ash", "hush"}


@dataclass(frozen=True)
class _Wrapper:
    """How a command that runs another (`_WRAPPERS`) reads its own words."""

    valued: frozenset[str]
    """Its options that take a value (as the next word, or attached)."""
    leading: int = 0
    """Operands before the command (timeout's DURATION)."""
    assignments: bool = False
    """NAME=VALUE words before the command are its (env, sudo)."""
    chdir: frozenset[str] = frozenset()
    """Its options naming the directory the command runs in."""
    no_command: frozenset[str] = frozenset()
    """Options with which it runs no command."""
    output: frozenset[str] = frozenset()
    """Its options naming a file it writes."""
    script: frozenset[str] = frozenset()
    """Its options giving a shell script it runs (instead of a command)."""
    unsure: frozenset[str] = frozenset()
    """Its options with which the command runs in a file system or directory known only when it runs
    (another mount namespace, root or process's directory): the command is not followed, refused in
    a volume."""
    here: frozenset[str] | None = None
    """When not None, it runs the command elsewhere than here (systemd-run's unit) unless given one
    of these options (or one of `chdir`): the command's directory is then known only when it runs."""
    numeric: bool = False
    """Its `leading` operand is given only when it is a number (chrt's priority)."""
    detached: frozenset[str] | None = None
    """When not None, it does not wait for its command (setsid forks when it must, systemd-run starts
    a service) unless given one of these options: the command is a job (`_Walk.background`)."""
    detaching: frozenset[str] = frozenset()
    """Its options with which it does not wait for its command (`sudo -b`, systemd-run's timers)."""


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


_WRAPPERS: dict[str, _Wrapper] = {
    "sudo": _Wrapper(
        _names(
            "-u -g -C -D -h -p -r -t -T -U --user --group --close-from --chdir --host --prompt --role --type "
            "--command-timeout --other-user"
        ),
        assignments=True,
        chdir=_names("-D --chdir"),
        no_command=_names("-l --list -v --validate -k -K --reset-timestamp"),
        detaching=_names("-b --background"),
    ),
    "doas": _Wrapper(_names("-u -C")),
    "command": _Wrapper(frozenset(), no_command=_names("-v -V")),
    "builtin": _Wrapper(frozenset()),
    "exec": _Wrapper(_names("-a")),
    "nohup": _Wrapper(frozenset()),
    "env": _Wrapper(_names("-u --unset -C --chdir -S --split-string"), assignments=True, chdir=_names("-C --chdir")),
    "time": _Wrapper(_names("-f --format -o --output"), output=_names("-o --output")),
    "strace": _Wrapper(
        _names("-o --output -e -p -s -u -E -a -b -I -O -S -X -P --attach --user --env"),
        output=_names("-o --output"),
        no_command=_names("-p --attach"),
    ),
    "busybox": _Wrapper(frozenset()),
    "toybox": _Wrapper(frozenset()),
    "unbuffer": _Wrapper(frozenset()),
    "nsenter": _Wrapper(
        _names("-t --target -S --setuid -G --setgid --user-parent"),
        unsure=_names("-m --mount -r --root -w --wd -a --all"),
    ),
    "prlimit": _Wrapper(_names("-p --pid -o --output"), no_command=_names("-p --pid")),
    "chrt": _Wrapper(
        _names("-T --sched-runtime -P --sched-period -D --sched-deadline"),
        leading=1,
        numeric=True,
        no_command=_names("-p --pid -m --max"),
    ),
    "systemd-run": _Wrapper(
        _names(
            "-u --unit -p --property -E --setenv -H --host -M --machine --description --slice --uid --gid --nice "
            "--working-directory --service-type --on-active --on-boot --on-startup --on-unit-active "
            "--on-unit-inactive --on-calendar --on-clock-change --on-timezone-change --timer-property "
            "--path-property --socket-property --slice-inherit"
        ),
        chdir=_names("--working-directory"),
        unsure=_names("-p --property -H --host -M --machine -S --shell"),
        here=_names("-d --same-dir --scope"),
        detached=_names("--wait -P --pipe -t --pty --pty-late --scope"),
        detaching=_names(
            "--on-active --on-boot --on-startup --on-unit-active --on-unit-inactive --on-calendar --on-clock-change "
            "--on-timezone-change --timer-property --path-property --socket-property"
        ),
    ),
    "taskset": _Wrapper(frozenset(), leading=1, no_command=_names("-p --pid")),
    "fakeroot": _Wrapper(_names("-l --lib --faked -s -i -b")),
    "unshare": _Wrapper(_names("-S --setuid -G --setgid -R --root -w --wd"), chdir=_names("-w --wd")),
    "setpriv": _Wrapper(
        _names(
            "--ambient-caps --inh-caps --bounding-set --ruid --euid --rgid --egid --reuid --regid --groups "
            "--securebits --pdeathsig --selinux-label --apparmor-profile --landlock-access --landlock-rule "
            "--seccomp-filter"
        ),
        no_command=_names("-d --dump"),
    ),
    "flock": _Wrapper(
        _names("-w --timeout -E --conflict-exit-code -c --command"), leading=1, script=_names("-c --command")
    ),
    "nice": _Wrapper(_names("-n --adjustment")),
    "timeout": _Wrapper(_names("-s --signal -k --kill-after"), leading=1),
    "stdbuf": _Wrapper(_names("-i -o -e --input --output --error")),
    "ionice": _Wrapper(_names("-c --class -n --classdata"), no_command=_names("-p --pid -P --pgid -u --uid")),
    "chronic": _Wrapper(frozenset()),
    "setsid": _Wrapper(frozenset(), detached=_names("-w --wait")),
    "daemonize": _Wrapper(
        _names("-c -e -o -E -l -p -u"),
        chdir=_names("-c"),
        output=_names("-e -o -l -p"),
        here=frozenset(),
        detached=frozenset(),
    ),
    "screen": _Wrapper(
        _names("-c -e -h -p -s -S -T -t"),
        no_command=_names("-r -x -v -Q"),
        unsure=_names("-X"),
        detached=frozenset(),
    ),
}
"""Commands that run the command after their options: they are looked through."""
_XARGS_VALUED = _names(
    "-a -d -E -I -L -n -P -s --arg-file --delimiter --max-args --max-procs --max-chars --process-slot-var"
)
"""xargs's options that take a value (`--eof`, `--replace`, `--max-lines`: only after `=`)."""
_SCRIPT_VALUED = _names(
    "-c --command -E --echo -I --log-in -O --log-out -B --log-io -T --log-timing -m --logging-format"
)
_SCRIPT_LOGS = _names("-I --log-in -O --log-out -B --log-io -T --log-timing")
"""script's options naming a file it writes (besides its typescript)."""
_PARALLEL_VALUED = _names("-j -P -S -a -d -I -n -N -L --jobs --arg-file --delimiter --sshlogin --max-args")
_SU_VALUED = _names("-c --command -s --shell -g --group -G --supp-group -w --whitelist-environment")
_SORT_VALUED = _names(
    "-k -t -o -S -T --key --field-separator --output --buffer-size --temporary-directory --parallel --files0-from "
    "--batch-size --compress-program --random-source"
)
_WATCH_VALUED = _names("-n --interval -q --equexit -d::")
"""watch's options that take a value (`-d`: only attached)."""
_SED_VALUED = _names("-e --expression -f --file -l --line-length")
_PERL_VALUED = _names("-e -E")


@dataclass(frozen=True)
class _Switches:
    """How perl or ruby reads a cluster of switches (`-0777pi`, `-l0pi`), as its own switch parser does."""

    next_word: str
    """Letters whose value is the rest of the cluster, or the next word when nothing follows them."""
    rest: str
    """Letters whose value is the rest of the cluster (`-i.bak`, `-Mstrict`, `-F:`, perl's `-CSD`)."""
    digits: str
    """Letters followed by octal digits (`-0777`, `-l0`; `-0x1F` hex), after which the cluster goes on."""
    program: str
    """Letters giving the program's text, so that no word after the switches is its script file."""


_PERL_SWITCHES = _Switches(next_word="eEI", rest="CdDFiMmVx", digits="0l", program="eE")
_RUBY_SWITCHES = _Switches(next_word="eEICr", rest="Fix", digits="0TW", program="e")


@dataclass(frozen=True)
class _Awk:
    """How one awk reads its command line (`_AWKS`)."""

    valued: frozenset[str]
    """Its options that take a value (`_option`)."""
    files: frozenset[str]
    """Its options naming a file it reads its program from."""
    texts: frozenset[str] = frozenset()
    """Its options giving its program's text."""
    gawk: bool = False
    """It is GNU awk: `-W NAME` is `--NAME`, `-i inplace` edits its files in place, and `-d`, `-o`,
    `-p` write files (`_GAWK_OUTPUTS`)."""


_GAWK = _Awk(
    _names(
        "-f -F -v -e -E -i -l -W --file --field-separator --assign --source --exec --include --load "
        "-d:: -D:: -L:: -o:: -p::"
    ),
    _names("-f --file -E --exec"),
    _names("-e --source"),
    gawk=True,
)
_MAWK = _Awk(_names("-f -F -v -W"), _names("-f"))
_ORIGINAL_AWK = _Awk(_names("-f -F -v"), _names("-f"))
_AWKS: dict[str, tuple[_Awk, ...]] = {
    "gawk": (_GAWK,),
    "mawk": (_MAWK,),
    "original-awk": (_ORIGINAL_AWK,),
    "awk": (_GAWK, _MAWK, _ORIGINAL_AWK),
    "nawk": (_GAWK, _MAWK, _ORIGINAL_AWK),
}
"""The awks Debian ships, each with the implementations it may be: `awk` and `nawk` are whichever the
system's alternatives choose (a command is taken as writing what any of them would). busybox's
`awk` applet reads its options as gawk does (`-e` is its program's text)."""
_GAWK_OUTPUTS = {
    "-d": "awkvars.out",
    "--dump-variables": "awkvars.out",
    "-o": "awkprof.out",
    "--pretty-print": "awkprof.out",
    "-p": "awkprof.out",
    "--profile": "awkprof.out",
}
"""gawk's options that write a file: the one attached to them (`-dFILE`, `--profile=FILE`), else this one."""
_TMUX_VALUED = _names("-c -f -L -S -T")
"""tmux's options (before its commands) that take a value; `-c` runs a shell command."""
_TMUX_NEW_VALUED = _names("-c -e -F -f -n -s -t -x -y")
"""tmux new-session's options that take a value; `-c` is the directory its command starts in."""
_TMUX_QUIET = _names(
    "ls list-sessions lsw list-windows lsp list-panes lsc list-clients has has-session capturep capture-pane "
    "kill-session kill-server killw kill-window killp kill-pane detach detach-client attach attach-session "
    "selectw select-window selectp select-pane rename rename-session renamew rename-window"
)
"""tmux's commands that run no shell command (unless a `#(` format in them does)."""
_AT_VALUED = _names("-q -f -t")
_AT_LISTS = _names("-l -d -r -c")
"""at's options with which it adds no job (lists, removes or shows jobs)."""
_SETTERS = _names("read mapfile readarray getopts let unset declare typeset local export readonly")
"""Builtins that set the variables their words name (`printf -v` and `wait -p` too)."""
_SHELL_SET = re.compile(
    r"_|PWD|OLDPWD|HOME|CDPATH|IFS|TMPDIR|REPLY|MAPFILE|OPT\w*|S?RANDOM|SECONDS|LINENO|HISTCMD|EPOCH\w*|PIPESTATUS"
    r"|FUNCNAME|DIRSTACK|GROUPS|BASH\w*|COPROC\w*|COMP\w*|READLINE\w*|SHLVL|PPID|UID|EUID|HOST\w*"
)
"""Variables the shell itself sets or reads specially: never taken as known."""
_FOR = "\0for"
"""What `_Walk.sets` holds for a variable a `for` loop sets (no value can be it: a NUL)."""
_WAITED = "\0wait"
"""Where `_Walk.values` holds the jobs a `wait` surely waited for (no name can be it)."""
_PID = "\0pid "
"""Where `_Walk.values` holds, for a variable set to `$!` (`_PID` and its name), the job it names and
how many times the variable was noted as maybe set then (`_Walk.changes`)."""
_BANG = ("$!", "${!}", '"$!"', '"${!}"')
_PHYSICAL = re.compile(r"\bphysical\b|\b(?:set|(?:ba|k|z)?sh)\b[^\n;&|]*\s[-+][A-Za-z]*P")
"""A command that may turn on bash's `set -P` (`set -o physical`, `bash -P`), with which `cd` enters
directories physically."""
_COPROC = re.compile(r"\bcoproc\b")
"""A command that may run a coproc, a job bash does not wait for (`_Walk.coproc`)."""
_QUITS = re.compile(
    r"\$\{[^}]*\?|\$\(\(|\$\[|\$\{(?:!|\}|[^}]*(?:\[|:(?![-=+?])))|>\("
    r"|\w\[(?!(?:0|[1-9][0-9]*|[@*])\])|\[[^]\s]*\]\+?=|\b(?:POSIXLY_CORRECT|FUNCNEST)\b"
    r"|\b(?:UID|EUID|PPID|SHELLOPTS|BASHOPTS|BASH_VERSINFO)(?:\[[^]]*\])?\+?="
)
"""Text that may end the shell before a `wait` runs, wherever it is: `${v?}`; an error bash ends a script
on (an assignment to a read-only or integer variable, an arithmetic, offset or subscript expansion,
a subscript that is not a plain number, in an assignment, a `-v` test or a name `read` or `printf -v`
set (`a[1/0]=x`, `day[08]=x`), `${!v}`, `${}`, an assignment to one of bash's own read-only
variables; POSIX mode, where a special builtin's redirection error ends it; a FUNCNEST limit); SIGPIPE from a process
substitution it writes to. Also ending it: a builtin the shell runs (`_SHELL_QUITS`), a signal another
process sends it (`_SIGNALS`), a syntax error after the job (`_parses`). No `wait` in such a command is
taken to wait for anything."""
_N = r"(?:0|[1-9][0-9]*)"  # not `08`: bash fails on an octal number with an 8 or 9
_SUMS = rf"\s*{_N}(?:\s*[-+*]\s*{_N})*\s*"
_HARMLESS = re.compile(
    rf"\$\{{(?:#?[A-Za-z_]\w*\[(?:[@*]|{_N})\]|![A-Za-z_]\w*(?:\[[@*]\]|[@*])|[A-Za-z_]\w*:{_N}(?::{_N})?)\}}"
    rf"|\$\(\({_SUMS}\)\)|\$\[{_SUMS}\]"
)
"""The expansions of `_QUITS`'s shapes that cannot fail: an array's elements, one by a number, their
count or keys (`${a[@]}`, `${a[0]}`, `${#a[@]}`, `${!a[@]}`), the names with a prefix (`${!p@}`), a
substring at numbers (`${v:0:5}`), sums and products of numbers (`$((2*3))`; not `**`, `/`, `%`)."""
_SHELL_QUITS = _names("exit exec return logout suspend set shopt ulimit source . enable alias disown")
_SHELL_QUITS |= _names("readonly declare typeset local")
"""Builtins that may end the shell before a `wait` or keep it from waiting (`exit`, `exec`, `set -e`, a
script it sources, a limit on the shell, a variable made read-only or integer; `disown`, `enable -n`, an
alias): they act only where the shell itself runs them, a command name the walk meets (`_Walk._invoke`,
`_Walk._declared`); as any other word (`ls ~/.local`, `make set-up`, `find -exec`) they end nothing."""
_SIGNALS = re.compile(
    r"kill|signal|sigqueue|ptrace|process_vm|syscall|/mem\b|\b(?:fuser|prlimit|gdb|lldb|strace|ltrace)\b"
)
"""A signal sent to the shell, or a limit set on it, by another process, wherever the command's text
names it (a command `xargs` or `find -exec` runs, an interpreter's code): `kill`, `pkill`, `fuser -k`,
`prlimit --pid`, a debugger or tracer attached to it, an interpreter's kill or signal call or raw
system call, its memory written through /proc; but not in a file's name (`_in_file_name`)."""
_SHELL_MODES = frozenset(
    {"POSIXLY_CORRECT", "BASH_ALIASES", "BASH_CMDS", "SHELLOPTS", "BASHOPTS", "FUNCNEST", "BASH_COMPAT", "BASH_ENV"}
)
"""Variables that change how the shell runs (POSIX mode, where an alias or a function named as a
special builtin may end it; aliases; hashed commands; options): set by any name a setter takes
(`read POSIXLY_CORREC{T,}`), they end every `wait`'s cover."""
_GLOBBED = re.compile(r"[*?[]")
"""A command name with a pattern in it (`/bin/k?ll`): which program it runs is known only then."""
_ARITHMETIC = re.compile(r"\[|\(\(|\blet\b|\$\{[^}]*:|\$\{!")
"""Text where bash may evaluate arithmetic, which can assign any variable: a subscript
(`a[pid=1]=x`, `[[ -v a[pid=1] ]]`), `[[ x -eq 1 ]]` (x's value evaluated: `pid=1`), `(( ))`, `let`,
an offset (`${v:pid=1}`), `${!x}` naming a subscript (an integer variable needs `declare`, which
ends every wait's cover: `_SHELL_QUITS`). A variable set to `$!` is not followed in such a command
(`_Walk._pid`)."""
_NOT_NAME = re.compile(r"[^\w.+~/-]")
"""A character no file name in a command's text is taken to have."""


def _signals(text: str) -> bool:
    """Whether `text` names a way another process may end the shell (`_SIGNALS`)."""
    return any(not _in_file_name(text, found) for found in _SIGNALS.finditer(text))


def _in_file_name(text: str, found: re.Match[str]) -> bool:
    """Whether `found` lies in a path's directory (`/usr/lib/kill/run`) or a file name's stem before its
    extension (`src/signal_handler.c`), in a word of file name characters not called (no `(` after it):
    no program or function the command runs is named so (`/bin/kill`, `os.kill`, `killpg` are)."""
    start = found.start() - len(_NOT_NAME.split(text[: found.start()])[-1])
    end = found.end() + len(_NOT_NAME.split(text[found.end() :])[0])
    if text[end:].lstrip()[:1] == "(":
        return False
    word = text[start:end]
    extension = re.search(r"\.[A-Za-z][A-Za-z0-9]{0,4}$", word)
    inside = found.end() - start
    return inside <= word.rfind("/") or extension is not None and inside <= extension.start()


def _unquoted(command: str) -> tuple[str, bool]:
    """`command`'s text with its quotes, backslashes and line continuations taken out, for the word
    searches above (`_PHYSICAL`, `_COPROC`, `_QUITS`, `_SIGNALS`: `se''t -"P"` is `set -P` to bash); and
    whether it has ANSI-C quoting (`$'…'`), whose escapes may spell any word: then each is taken as there."""
    text = re.sub(r"[\"'\\]", "", command.replace("\\\n", ""))
    return text, "$'" in command


_EXPANDS = frozenset(
    {"simple_expansion", "expansion", "command_substitution", "arithmetic_expansion", "process_substitution"}
)
_MKTEMP = re.compile(r'"?\$\(\s*mktemp(?:\s+-[dqu]+|\s+--(?:directory|quiet|dry-run))*\s*\)"?')
"""`$(mktemp)` with no template, nor -p or --tmpdir: a new name in $TMPDIR."""
_DATE = re.compile(
    r"(?:\$\(|`)\s*date(?:\s+(?:-u|--utc|--universal))*\s+"
    r"(?:'\+([^'\\]*)'|\"\+([^\"\\$`]*)\"|\+([^\s'\"\\$`;&|<>()]*))\s*(?:\)|`)"
)
"""`$(date +FORMAT)`: what it prints is known but for its numbers (`_date`)."""
_DATE_FIELDS: dict[str, list[Piece]] = {
    **{c: [Wild.NUMBER] for c in "CdGgHIjmMNsSuUVwWyY"},
    "F": [Wild.NUMBER, "-", Wild.NUMBER, "-", Wild.NUMBER],
    "T": [Wild.NUMBER, ":", Wild.NUMBER, ":", Wild.NUMBER],
    "R": [Wild.NUMBER, ":", Wild.NUMBER],
    "%": ["%"],
}
"""date's conversions that print only digits and '-' (and the separators of %F, %T, %R)."""
_REDEFINES = re.compile(r"\b(?:date|mktemp)\s*\(\s*\)|\bfunction\s+(?:date|mktemp)\b|\b(?:alias|hash|enable|PATH)\b")
"""A command that may make `date` or `mktemp` run something else."""


@cache
def _parser() -> tree_sitter.Parser:
    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_bash.language()))


def _text(node: tree_sitter.Node) -> str:
    return (node.text or b"").decode("utf-8", "surrogatepass")


def _option(arg: str, following: list[Item], valued: frozenset[str]) -> list[tuple[str, Item | None]]:
    """The options one word `arg` (`-x`, `-xVALUE`, `-abc`, `--name`, `--name=VALUE`) gives, each
    with its value (None for a flag); a valued option without one in `arg` takes the first of
    `following` (removed from it), but one `valued` names as `-x::` takes only a value attached to
    it, as getopt takes an optional argument. A long option given by a prefix of one of `valued` is
    that one, as getopt_long takes it."""
    if arg.startswith("--"):
        name, eq, value = arg.partition("=")
        whole = [v for v in valued if _abbreviates(name, v)]
        name = whole[0] if name not in valued and len(whole) == 1 else name
        if eq or name not in valued:
            return [(name, value if eq else None)]
        return [(name, following.pop(0) if following else None)]
    out: list[tuple[str, Item | None]] = []
    for i, c in enumerate(arg[1:], 1):
        if f"-{c}::" in valued:
            out.append((f"-{c}", arg[i + 1 :] or None))
            break
        if f"-{c}" in valued:
            rest = arg[i + 1 :]
            out.append((f"-{c}", rest if rest else following.pop(0) if following else None))
            break
        out.append((f"-{c}", None))
    return out


def _abbreviates(arg: str, name: str) -> bool:
    """Whether the long option `arg` (`--na`, `--na=VALUE`) names the long option `name`, as
    getopt_long takes a prefix of it (one that is a prefix of another option too is refused there,
    so the command does nothing)."""
    given = arg.partition("=")[0]
    return len(given) > 2 and given.startswith("--") and name.startswith(given)


def _is_option(item: Item) -> bool:
    return isinstance(item, str) and item.startswith("-") and item != "-"


def _options(items: list[Item], valued: frozenset[str]) -> Iterator[tuple[str, Item | None]]:
    """The leading options of `items` as (option, its value or None), up to the first operand or
    `--` (consumed); `items` is shortened to what follows them."""
    while items and _is_option(items[0]):
        arg = str(items.pop(0))
        if arg == "--":
            return
        yield from _option(arg, items, valued)


def _split(
    args: list[Item], valued: frozenset[str]
) -> tuple[list[tuple[Item, list[tuple[str, Item | None]] | None]], list[Item]]:
    """A command's words before `--`, each with the options it gives (`_option`; None for an
    operand; a word an option takes as its value is not listed), and the words after `--`."""
    before: list[tuple[Item, list[tuple[str, Item | None]] | None]] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            return before, rest
        before.append((arg, _option(str(arg), rest, valued) if _is_option(arg) else None))
    return before, []


def _operands(args: list[Item], valued: frozenset[str]) -> tuple[list[Item], dict[str, Item]]:
    """A command's operands (options anywhere before `--`) and the values of the options in `valued`."""
    before, after = _split(args, valued)
    values = {name: value for _, given in before for name, value in given or () if value is not None}
    return [word for word, given in before if given is None] + after, values


_ANSI_C = {"a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_ANSI_C |= {"\\": "\\", "'": "'", '"': '"', "?": "?"}


def _ansi_c(body: str) -> str | None:
    """The text of a `$'…'` string's `body` with its escapes decoded as bash does, or None for one
    not decoded here (a control character's `c` escape, a NUL, a byte past ASCII)."""
    out: list[str] = []
    escape = r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{1,4})|U([0-9A-Fa-f]{1,8})|(.))|([^\\]+)"
    if re.fullmatch(f"(?:{escape})*", body, re.S) is None:
        return None
    for m in re.finditer(escape, body, re.S):
        octal, hexa, u4, u8, char, plain = m.groups()
        if plain is not None:
            out.append(plain)
        elif char is not None and char in _ANSI_C:
            out.append(_ANSI_C[char])
        elif char is not None:
            if char == "c":
                return None
            out.append("\\" + char)  # an unknown escape stays as written
        else:
            code = int(octal, 8) if octal else int(hexa or u4 or u8, 16)
            if code == 0 or 0xD800 <= code < 0xE000 or code > 0x10FFFF or (octal or hexa) and code > 0x7F:
                return None  # a NUL, or a byte bash passes as it is (not a character of this text)
            out.append(chr(code))
    return "".join(out)


def _chars(text: str, quoted: bool) -> Chars:
    return [(c, quoted) for c in text]


def _unescaped(text: str, specials: str | None = None) -> Chars:
    """Unquoted text (or, with `specials`, the inside of double quotes) with its backslashes
    applied: an escaped character is quoted; a backslash-newline is removed."""
    out: Chars = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and (specials is None or text[i + 1] in specials):
            if text[i + 1] != "\n":
                out.append((text[i + 1], True))
            i += 2
            continue
        out.append((c, specials is not None))
        i += 1
    return out


def _sequence(body: str) -> range | list[str] | None:
    """The words of a brace sequence `a..b[..step]` (numbers, or single letters), or None."""
    m = re.fullmatch(r"(-?\d+|[A-Za-z])\.\.(-?\d+|[A-Za-z])(?:\.\.(-?\d+))?", body)
    if m is None:
        return None
    first, last, step = m.group(1), m.group(2), abs(int(m.group(3) or 1)) or 1
    numeric = first.lstrip("-").isdigit()
    if numeric != last.lstrip("-").isdigit():
        return None
    a, b = (int(first), int(last)) if numeric else (ord(first), ord(last))
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    if len(values) > _MOST_EXPANDED:
        return values  # too many to make
    if not numeric:
        return [chr(v) for v in values]
    padded = first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0")
    return [str(v).zfill(max(len(first), len(last)) if padded else 0) for v in values]


def _first_brace(word: Chars) -> list[Chars] | None:
    """`word` with its first brace expansion made (a list of words), or None if it has none."""
    for i, (c, quoted) in enumerate(word):
        if c != "{" or quoted:
            continue
        depth, commas, end = 0, [], None
        for j in range(i, len(word)):
            d, q = word[j]
            if q:
                continue
            if d == "{":
                depth += 1
            elif d == "}":
                depth -= 1
                if depth == 0:
                    end = j
                    break
            elif d == "," and depth == 1:
                commas.append(j)
        if end is None:
            continue
        pre, post = word[:i], word[end + 1 :]
        if commas:
            bounds = [i, *commas, end]
            return [pre + word[a + 1 : b] + post for a, b in zip(bounds, bounds[1:], strict=False)]
        body = word[i + 1 : end]
        seq = None if any(q for _, q in body) else _sequence("".join(c for c, _ in body))
        if isinstance(seq, range):
            return [word] * (_MOST_EXPANDED + 1)  # too many: only counted
        if seq is not None:
            return [pre + _chars(s, True) + post for s in seq]
    return None


def _braces(word: Chars) -> list[Chars] | None:
    """`word` brace-expanded as bash does (quoted characters are literal); None for more than
    _MOST_EXPANDED words."""
    done: list[Chars] = []
    todo = [word]
    while todo:
        current = todo.pop()
        expanded = _first_brace(current)
        if expanded is None:
            done.append(current)
        else:
            todo.extend(reversed(expanded))
        if len(done) + len(todo) > _MOST_EXPANDED:
            return None
    return done


def _shape(spelled: Spelled) -> list[Piece]:
    """What the rest of a word may be, as a shape (`globs.Wild`): a pattern's characters match any
    characters of one segment (a bracket to the end of its segment), a brace may expand to anything.
    (A segment that is only a pattern, `**` among them, may be any name, '..' too: any path.)"""
    pieces: list[Piece] = []
    bracket = False
    for c in spelled:
        if isinstance(c, Wild):
            pieces.append(c)
            continue
        char, quoted = c
        bracket = bracket and char != "/"
        if not quoted and char == "{":
            pieces.append(Wild.PATH)
        elif bracket or not quoted and char in _GLOB:
            bracket = bracket or char == "["
            pieces.append(Wild.NAME)
        else:
            pieces.append(char)
    return pieces


def _date(form: str) -> list[Piece] | None:
    """What `date +FORM` prints, a character at a time with `Wild.NUMBER` for a number; None for a
    conversion that may print anything else (a '/', a space, a name), or a character that is not a
    plain one of a file's name."""
    printed: list[Piece] = []
    i = 0
    while i < len(form):
        field = re.match(r"%[-0]?(.)", form[i:], re.DOTALL)
        if field is not None:
            if field.group(1) not in _DATE_FIELDS:
                return None
            printed += _DATE_FIELDS[field.group(1)]
            i += field.end()
        elif re.fullmatch(r"[\w.,:+=@-]", form[i], re.ASCII):
            printed.append(form[i])
            i += 1
        else:
            return None
    return printed


class _Walk:
    """One walk of a command's syntax tree: what it writes, and what it writes that cannot be told.

    Variables: a first walk takes none as known, and notes how each may be set (`sets`); if what it
    leaves unknown would be refused, a second walk (`settled`) takes as known a variable set only to
    one literal value (or `$(mktemp)`), from where an assignment surely ran in this shell on (`values`;
    not in a child shell, nor past a subshell, a branch or a loop that may have set it), and a `for`
    loop's variable, the only loop setting it, in its body (each word in turn)."""

    def __init__(self, known: dict[str, str] | None = None, loops: frozenset[str] = frozenset()) -> None:
        self.found: list[tuple[str, HandleKind, bool, int | None]] = []
        """(path, how, whether a directory there stands for the files below it, the job writing it or None)."""
        self.unknown: list[Unknown] = []
        self.linked: list[str] = []
        """The files at the ends of the hard links the command makes (`_followed` fills it from `ends`)."""
        self.ends: list[tuple[str, Follow]] = []
        """The ends of the hard links the command makes: a directory stands for the files below it, found
        following symlinks as the command will (`_expand`)."""
        self.functions: dict[str, tuple[tree_sitter.Node, list[tree_sitter.Node], bytes]] = {}
        """Each function's body, the redirections of its definition, and the text it is in."""
        self.depth = 0
        self.calls = 0
        """Function calls followed so far (each walks the function's body)."""
        self.untrusted = False
        """The command may set HOME, PWD, CDPATH or how patterns match (`_SETS`)."""
        self.read_descriptors: set[int] = set()
        """The descriptors the command redirects to read a file (`_READ_REDIRECTION`): written by
        name (`/dev/fd/3`, `/dev/stdout`), the file is opened for writing."""
        self.programs: list[tuple[str, Cwd]] = []
        """The program files sed and awk read (`-f`), as read when the hook runs (`_program_file`),
        with the directory of the command reading each."""
        self.piped_startup = False
        """The command may give a shell a startup file read from its input or a pipe (`_PIPED_STARTUP`)."""
        self.visited = 0
        """Directory entries read so far (`_MOST_VISITED`)."""
        self.deadline = time.monotonic() + _MOST_SECONDS
        self.redefined = False
        """The command may make `date` or `mktemp` run something else (`_REDEFINES`)."""
        self.ifs = False
        """The command names IFS: an unquoted expansion may split anywhere."""
        self.tmp = ""
        """Where `$(mktemp)` makes its name ("" when the command names TMPDIR: unknown)."""
        self.sets: dict[str, set[str | None]] = {}
        """How each name may be set: its literal values, `_FOR`, or None (any other way)."""
        self.changes: dict[str, int] = {}
        """How many times each name was noted as maybe set so far (`_note`)."""
        self.loops_of: dict[str, set[tuple[bytes, int]]] = {}
        """The `for` loops (text, offset) setting each name."""
        self.setter_words: list[str] = []
        """The words of builtins that set variables they name (`_SETTERS`): a name in one may be set."""
        self.poisoned = False
        """A variable may be set by a name known only when the command runs (`source`, `read "$v"`, a
        nameref, a command named by an expansion): none is taken as known."""
        self.known = known or {}
        """The variables this walk takes as known where assigned (`settled`), with their value."""
        self.loops = loops
        """The `for` variables this walk takes as known in their loop's body."""
        self.values: dict[str, str] = {}
        """The variables known at this point of the walk, with their value."""
        self.succeeded: dict[str, str] | None = None
        """After an `a && b` list: the variables known where it succeeded (`b` ran to its end)."""
        self.globs: dict[str, ManagedGlobs | None] = {}
        """The managed globs of each volume an unknown write lies in (`_unmanaged`)."""
        self.traps: list[str] = []
        """The handlers `trap` set, run when the shell exits."""
        self.start = ""
        """The directory the command starts in."""
        self.elsewhere: Unknown | None = None
        """Where the command may start in a directory known only when it runs (`shell_writes`'
        `elsewhere`), that directory, placed at `start`: a word known only when it runs and placed
        there may be in it (`from_start`)."""
        self.source = b""
        """The text being walked (of the innermost `bash -c`, `eval` or `trap`)."""
        self.job: int | None = None
        """The job (`background`) the walk is in, if any: what it writes is written in the background."""
        self.jobs: list[int] = []
        """The jobs the command's own shell starts (a `wait` there may wait for them), in order."""
        self.started = 0
        """Jobs started so far (each job's number)."""
        self.forked = False
        """The walk is in a child process of the command's shell (a subshell, a pipeline's part, a job,
        `bash -c`): a `wait` there waits for none of the shell's jobs, and a job it starts is not one."""
        self.may_quit = False
        """The command may end its shell before a `wait` (`_QUITS`, or code known only when it runs)."""
        self.between = False
        """A statement ran in the command's own shell since the first of its jobs that no `wait` covers
        started (`_marks`): a `wait` then covers none (`_wait`). Bash ends a shell, or moves what a
        variable names, in more ways than any list can name (a failing subscript, `break x`, `${1x}`,
        `mapfile -C`, `compgen -F`, a word expanded twice); nothing but other jobs' starts, `NAME=$!`
        and the `wait` itself between a job and its `wait` leaves it none."""
        self.marked = 0
        """How many statements set `between` so far (a loop's body that set it runs again after its job)."""
        self.looping = 0
        """How many loops the walk is in: a job started in one is as many jobs as it has rounds."""
        self.loop_jobs: set[int] = set()
        """The jobs started in a loop (`looping`): only a `wait` for all covers them."""
        self.physical = False
        """The command may turn on `set -P` (`_PHYSICAL`): a `cd` may then enter a directory either way."""
        self.arithmetic = False
        """The command may evaluate arithmetic (`_ARITHMETIC`), which may set any variable."""
        self.coproc = False
        """The command runs a `coproc` (`_COPROC`): tree-sitter cannot tell where its command ends (it
        reads the rest of a compound one as the commands after it), so every write is taken as its."""

    def tick(self, entries: int = 0) -> None:
        """Count `entries` directory entries read; _TooMuch past the bound on them or on time."""
        self.visited += entries
        if entries and self.visited > _MOST_VISITED or time.monotonic() > self.deadline:
            raise _TooMuch

    # ---- words ----------------------------------------------------------------------

    def _variable(self, name: str, cwd: Cwd, word: str) -> Chars | Unknown:
        if name == "PWD" and not self.untrusted:
            return _chars(cwd, True) if isinstance(cwd, str) else cwd
        if name == "HOME" and not self.untrusted and os.environ.get("HOME"):
            return _chars(os.environ["HOME"], True)
        if name == "OLDPWD" and name not in self.values:  # (after a `cd`, the directory it started in)
            return Unknown(word, _PREVIOUS, _place(self.elsewhere or self.start), anywhere=True)
        if name in self.values:
            return _chars(self.values[name], True)
        return Unknown(word, f"the variable ${name}", "")

    def _pieces(self, node: tree_sitter.Node, cwd: Cwd, out: Spelled, quoted: bool = False) -> Unknown | None:
        """Append the characters `node` stands for to `out` (with whether each is quoted); for a part
        known only when the command runs, the `Wild` it may be (`_wild`), and on with the rest. Returns
        the first such part as an Unknown."""
        kind = node.type
        if kind in ("word", "number", "brace_expression", "$"):
            out.extend(_unescaped(_text(node)))
        elif kind == "raw_string":
            out.extend(_chars(_text(node)[1:-1], True))
        elif kind in ("string", "translated_string", "concatenation"):
            first: Unknown | None = None
            for child in _untranslated(node.children) if kind == "concatenation" else node.children:
                if child.type == '"' or kind == "translated_string" and child.type == "$":
                    continue  # `$"…"`: a string to translate, its text as written
                if child.type == "string_content":
                    out.extend(_unescaped(_text(child), '$`"\\\n'))
                elif kind == "string" and not child.is_named:
                    out.extend(_chars(_text(child), True))
                else:
                    unknown = self._pieces(child, cwd, out, quoted or kind != "concatenation")
                    first = first or unknown
            return first
        elif kind == "ansi_c_string" and (decoded := _ansi_c(_text(node)[2:-1])) is not None:
            out.extend(_chars(decoded, True))
        elif kind == "process_substitution":
            out.extend(_chars("/dev/fd/63", True))  # what bash passes: a pipe (its commands are walked)
        else:
            return self._expansion(node, cwd, out, quoted)
        return None

    def _expansion(self, node: tree_sitter.Node, cwd: Cwd, out: Spelled, quoted: bool) -> Unknown | None:
        """`_pieces` of a parameter, command or arithmetic expansion."""
        kind, text = node.type, _text(node)
        if kind in ("simple_expansion", "expansion"):
            names = [c for c in node.children if c.is_named]
            if [c.type for c in node.children] in (["$", "variable_name"], ["${", "variable_name", "}"]):
                value = self._variable(_text(names[0]), cwd, text)
                if isinstance(value, Unknown):
                    out.append(Wild.PATH)
                    return value
                if not quoted and (self.ifs or any(c.isspace() or c in _GLOB for c, _ in value)):
                    out.append(Wild.PATH)
                    return Unknown(text, "a variable whose value is split into words or matched as a pattern", "")
                out.extend(value)
                return None
            if "=" in text or "[" in text:  # `${v:=x}` sets v; a subscript is arithmetic, which may
                self._mark(text, poison=text.startswith("${!"))
            number = [c.type for c in node.children][:2] in (["$", "special_variable_name"], ["${", "#"])
            number = number and text[-1] in "$?#}"  # `$$`, `$?`, `$#`, `${#v}`: digits (`$!` may be empty)
            self._wild(out, Wild.NUMBER if number else Wild.PATH, quoted)
            return Unknown(text, "an expansion", "")
        if kind == "arithmetic_expansion":
            self._mark(text)
            self._wild(out, Wild.NUMBER, quoted)
            return Unknown(text, "an arithmetic expansion", "")
        if kind == "command_substitution":
            date = None if self.redefined else _DATE.fullmatch(text)
            printed = _date(next(g for g in date.groups() if g is not None)) if date else None
            if printed is None or not quoted and self.ifs:
                out.append(Wild.PATH)
                return Unknown(text, "a command substitution", "")
            out.extend(p if isinstance(p, Wild) else (p, True) for p in printed)
            return Unknown(text, "a command substitution", "") if Wild.NUMBER in printed else None
        out.append(Wild.PATH)
        return Unknown(text, "an expansion", "")

    def _wild(self, out: Spelled, wild: Wild, quoted: bool) -> None:
        """Append what an expansion may be: where it is not quoted and the command names IFS, it may
        be split anywhere, so any path."""
        out.append(wild if quoted or not self.ifs else Wild.PATH)

    def expand(self, node: tree_sitter.Node, cwd: Cwd) -> list[Item]:
        """The words `node` expands to in `cwd`: brace expansion, tilde, parameters, globs."""
        spelled: Spelled = []
        unknown = self._pieces(node, cwd, spelled)
        if unknown is not None:
            return [self._unknown_word(node, cwd, spelled, unknown)]
        return self._expanded(spelled, cwd, _text(node))

    def _expanded(self, spelled: Spelled, cwd: Cwd, source: str) -> list[Item]:
        """The words the known word `spelled` (written `source`) expands to in `cwd`: brace
        expansion, tilde, globs, each over the whole word."""
        chars = [c for c in spelled if not isinstance(c, Wild)]
        words: list[Item] = []
        expanded = _braces(chars)
        if expanded is None:
            return [Unknown(source, f"a brace expansion of more than {_MOST_EXPANDED} words", _place(cwd))]
        for word in expanded:
            tilded = self._tilde(word, cwd)
            if not isinstance(tilded, Unknown):
                tilded = _proc_word(tilded, cwd)
            if isinstance(tilded, Unknown):
                words.append(Unknown(source, tilded.why, tilded.place, tilded.anywhere))
                continue
            words.extend(self._glob(tilded, cwd, source))
        return words

    def _unknown_word(self, node: tree_sitter.Node, cwd: Cwd, spelled: Spelled, part: Unknown) -> Unknown:
        """The word `node`, spelled with a part known only when the command runs (the first: `part`):
        the directory its known part names, and what it may be below that (`Unknown.shape`). A word
        that begins with a part placed somewhere (`$OLDPWD`: the start directory) is placed there."""
        why = part.why
        cut = _literal_end(spelled)
        prefix = self._tilde([c for c in spelled[:cut] if not isinstance(c, Wild)], cwd)
        known = "".join(c for c, _ in prefix) if isinstance(prefix, list) else None
        rest = _shape(spelled[cut:])
        shape: tuple[Piece, ...] | None
        if known is None or "=" in known or known.startswith("-"):
            # `of=…`, `--output=…`: what a command takes for a path may begin after the word does
            place, shape = _place(cwd), None
        elif not known and part.place and spelled and isinstance(spelled[0], Wild):
            place, shape = part.place, None
        elif isinstance(cwd, Unknown) and not known.startswith("/"):
            place, shape = cwd.place, cwd.below("/", known, *rest).shape
        else:
            where = os.path.join(cwd, known) if isinstance(cwd, str) else known
            place = os.path.dirname(where) if "/" in known else str(cwd)
            shape = (known.rpartition("/")[2], *rest)
        # an expansion first may be any path, and so may one a `..` after it leaves
        after = re.split(r"[$`*?\[{]", _text(node), maxsplit=1)[-1]
        anywhere = not known or bool(re.search(r"(?:^|/)\.\.(?:/|$)", after))
        anywhere = anywhere or isinstance(cwd, Unknown) and cwd.anywhere and not (known or "").startswith("/")
        lead = None if _splits(node, self.ifs) or not isinstance(prefix, list) else "".join(c for c, _ in prefix)
        return Unknown(_text(node), why, place, anywhere, shape, lead)

    def _tilde(self, word: Chars, cwd: Cwd) -> Chars | Unknown:
        """`word` with a leading unquoted `~`, `~+` or `~user` expanded; also one after the `=` of
        a word like an assignment (`of=~/x`), as bash does."""
        assignment = re.match(r"[A-Za-z_][A-Za-z0-9_]*=~", "".join(c for c, _ in word))
        if assignment is not None and not any(q for _, q in word[: assignment.end()]):
            rest = self._tilde(word[assignment.end() - 1 :], cwd)
            return rest if isinstance(rest, Unknown) else word[: assignment.end() - 1] + rest
        if not word or word[0] != ("~", False):
            return word
        end = next((i for i, (c, _) in enumerate(word) if c == "/"), len(word))
        if any(q for _, q in word[:end]):
            return word
        prefix = "".join(c for c, _ in word[:end])
        if prefix == "~+":
            value: str | Unknown = cwd
        elif prefix == "~-":
            value = Unknown(prefix, _PREVIOUS, _place(self.elsewhere or self.start), anywhere=True)
        elif prefix == "~" and (self.untrusted or not os.environ.get("HOME")):
            value = Unknown(prefix, "the home directory: HOME is set in the command, or not at all", "")
        else:
            value = os.path.expanduser(prefix)
        if isinstance(value, Unknown):
            return dataclasses.replace(value, place=value.place or _place(cwd))
        return _chars(value, True) + word[end:]

    def _glob(self, word: Chars, cwd: Cwd, source: str) -> list[Item]:
        literal = "".join(c for c, _ in word)
        if not any(c in _GLOB and not q for c, q in word):
            return [literal]
        if isinstance(cwd, Unknown) and not literal.startswith("/"):
            why = f"a pattern matched in the directory after `{cwd.word}`: {cwd.why}"
            return [Unknown(source, why, cwd.place, cwd.anywhere)]
        place, anywhere, deeper = _pattern_place(list(word), cwd)
        if self.untrusted:
            why = "a pattern, and the command changes how patterns match"
            return [Unknown(source, why, place, anywhere, volumes_below=deeper)]
        pattern = _pattern(word)
        if pattern is None:
            why = "a pattern with a quoted character in a bracket expression"
            return [Unknown(source, why, place, anywhere, volumes_below=deeper)]
        if re.search(r"\[[^]/]*\[[:=.]", pattern):  # a class like [[:alpha:]]: fnmatch has none
            return [Unknown(source, "a pattern with a character class", place, anywhere, volumes_below=deeper)]
        try:
            matches = sorted(self._matches(pattern, str(cwd)))
        except _TooMuch:
            return [Unknown(source, f"a pattern that needs more than {_MOST_VISITED} entries read", place, True)]
        if len(matches) > _MOST_EXPANDED:
            why = f"a pattern matching more than {_MOST_EXPANDED} files"
            return [Unknown(source, why, place, anywhere, volumes_below=deeper)]
        return list[Item](matches) if matches else [literal]

    def _matches(self, pattern: str, cwd: str) -> list[str]:
        """The paths `pattern` matches from `cwd` (as bash: hidden names only by a pattern that
        starts with `.`; `**` as globstar, a superset of what it matches without), reading at most
        the bounded entries."""
        parts = pattern.split("/")
        found = ["/"] if pattern.startswith("/") else [""]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if not part:
                continue
            if not glob.has_magic(part):
                unescaped = re.sub(r"\[(.)\]", r"\1", part)
                found = [os.path.join(f, unescaped) for f in found]
                found = [f for f in found if os.path.lexists(os.path.join(cwd, f))] if last else found
                continue
            new: list[str] = []
            for base in found:
                if part == "**":
                    new.extend(self._below(base, cwd, files=last))
                    continue
                for name, is_dir in self._entries(os.path.join(cwd, base) if base else cwd):
                    hidden_ok = part.startswith(".")
                    if (is_dir or last) and (hidden_ok or not name.startswith(".")) and fnmatch.fnmatchcase(name, part):
                        new.append(os.path.join(base, name))
            found = new
            if len(found) > _MOST_EXPANDED:
                break
        return [f for f in found if f not in ("", "/")]

    def _entries(self, directory: str) -> list[tuple[str, bool]]:
        try:
            with os.scandir(directory) as it:
                entries = [(e.name, e.is_dir()) for e in it]
        except OSError:
            return []
        self.tick(len(entries) + 1)
        return entries

    def _below(self, base: str, cwd: str, files: bool) -> list[str]:
        """`base` and the directories (and, with `files`, files) at any depth below it, hidden ones aside."""
        out = [base]
        todo = [base]
        while todo:
            current = todo.pop()
            for name, is_dir in self._entries(os.path.join(cwd, current) if current else cwd):
                if name.startswith("."):
                    continue
                path = os.path.join(current, name)
                if is_dir:
                    todo.append(path)
                if is_dir or files:
                    out.append(path)
        return out

    # ---- the tree -------------------------------------------------------------------

    def statements(self, nodes: Iterable[tree_sitter.Node], state: State) -> tuple[State, State]:
        """Run statements one after another: (where the last leaves the shell when it succeeds, when it fails)."""
        ok, fail = state, state
        for node in nodes:
            if node.is_named and node.type not in ("comment", "heredoc_body"):
                if node.next_sibling is not None and node.next_sibling.type == "&":  # in a subshell of its own
                    with self.background(waitable=True):
                        self.run(node, ok | fail)
                    ok = fail = ok | fail
                else:
                    ok, fail = self.run(node, ok | fail)
        return ok, fail

    @contextmanager
    def apart(self, inherit: bool = True, child: bool = False) -> Iterator[None]:
        """Walk what runs in a subshell, or may not run (to its end): the variables known after it are
        those known before (and so is which jobs a `wait` surely waited for), and so is the job it is
        in; in a child shell (not `inherit`), none is known. A subshell or child shell is a `child`
        process (`forked`)."""
        before, forked, job = self.values, self.forked, self.job
        self.values = dict(before) if inherit else {}
        self.forked = forked or child or not inherit
        try:
            yield
        finally:
            self.values, self.forked, self.job = before, forked, job

    @contextmanager
    def background(self, waitable: bool = False) -> Iterator[None]:
        """Walk a job: what runs apart from the shell that starts it, which does not wait for it (`&`,
        a process substitution, a command `setsid` or `sudo -b` runs). What it writes is written in
        the background (`ShellWrites.background`), unless it is `waitable` (`&`), a job of the
        command's own shell, and a `wait` surely waited for it there (`waited`)."""
        job = self._job(waitable)
        with self.apart(child=True):
            self.job = job
            yield

    def _job(self, waitable: bool) -> int:
        """A new job's number, noted as one of the shell's (`jobs`) if `waitable` and started there."""
        self.started += 1
        if waitable and not self.forked:
            if not set(self.jobs) - self._done():
                self.between = False  # the first job no `wait` covers: nothing ran since it started
            self.jobs.append(self.started)
            if self.looping:
                self.loop_jobs.add(self.started)
        return self.started

    def _done(self) -> set[int]:
        """The jobs a `wait` surely waited for so far (`_wait`)."""
        return {int(job) for job in self.values.get(_WAITED, "").split()}

    def waited(self) -> frozenset[int]:
        """The jobs a `wait` surely waited for: those the command's own shell started before a `wait`
        with no operands that surely ran there after them (not in a branch, a loop, a function or a
        list that may not have run it), unless the command may end the shell first (`may_quit`)."""
        if self.may_quit or self.traps or self.poisoned:  # a handler may run between; any variable may be set
            return frozenset()
        return frozenset(self._done())

    def _wait(self, args: list[Item]) -> None:
        """`wait` in the command's own shell: the jobs it surely waits for are waited for (`waited`),
        when it surely names each of its operands. With no operand it waits for all; `$!` is the last
        job (when nothing but jobs of this shell ran apart from it), so is a variable set to it (`_pid`),
        `%%` and `%+` its last job, `%1` and `%-` the only one (when one job was started), `$(jobs -p)`
        all; with `-n` it waits for one job only (so it covers them only when one is left, and nothing
        but the shell's jobs ran apart); any other word: none."""
        if self.between:
            return  # a statement ran since the jobs it would cover started
        done = self._done()
        left = set(self.jobs) - done
        rest, one = list(args), False
        for option, _ in _options(rest, _names("-p")):
            if option not in ("-n", "-f"):
                return  # `-p NAME`: a name bash refuses (read-only, not one) makes it return at once
            one = one or option == "-n"
        covered = set(left) if not rest else set()
        for arg in rest:
            job = self._waited_job(arg)
            if job is None:
                return
            covered |= job
        if one and not (left <= covered and len(left) <= 1 and self.started == len(self.jobs)):
            return
        if (rest or one) and left & self.loop_jobs:
            return  # a job started in a loop is one per round: `$!`, `%1`, `-n` name one of them
        self.values[_WAITED] = " ".join(str(job) for job in sorted(done | covered))

    def _waited_job(self, arg: Item) -> set[int] | None:
        """The jobs a `wait` operand surely names (`_wait`), or None."""
        text = arg.word if isinstance(arg, Unknown) else arg
        if text in _BANG:
            return {self.started} if self.jobs[-1:] == [self.started] else None
        variable = re.fullmatch(r'("?)\$(?:([A-Za-z_]\w*)|\{([A-Za-z_]\w*)\})\1', text)
        if variable is not None and (variable.group(1) or not self.ifs):  # unquoted: split by IFS
            return self._pid(variable.group(2) or variable.group(3))
        if text in ("%%", "%+") and self.jobs:
            return {self.jobs[-1]}
        if text in ("%1", "%-") and len(self.jobs) == 1:
            return set(self.jobs)
        if text in ("$(jobs -p)", "`jobs -p`") and "jobs" not in self.functions and not self.ifs:
            return set(self.jobs)
        return None

    def _pid(self, name: str) -> set[int] | None:
        """The job variable `name` surely names: the one `$!` named where it was set to it in the
        command's own shell (`_assign`), when nothing may have set it since (`changes`, a builtin
        naming it, a variable set by a name known only when it runs, a trap's handler, arithmetic
        anywhere in the command: `_ARITHMETIC`); else None."""
        recorded = self.values.get(_PID + name)
        if recorded is None or self.poisoned or self.traps or self.arithmetic:
            return None
        if any(name in w for w in self.setter_words):
            return None
        job, changes = recorded.split()
        return {int(job)} if int(changes) == self.changes.get(name, 0) else None

    def _note(self, name: str, how: str | None) -> None:
        """Name `name` may be set, `how` (`sets`); one that changes how the shell runs may end it
        before a `wait` (`_SHELL_MODES`); one of `_ENVIRONMENT` makes the walk `untrusted` from here on."""
        self.sets.setdefault(name, set()).add(how)
        self.untrusted = self.untrusted or name in _ENVIRONMENT  # however the command spells it
        self.may_quit = self.may_quit or name in _SHELL_MODES
        self.changes[name] = self.changes.get(name, 0) + 1

    def _mark(self, text: str, poison: bool = False) -> None:
        """Every name in `text` may be set (and, with `poison`, any variable at all)."""
        for name in re.findall(r"[A-Za-z_]\w*", text):
            self._note(name, None)
        self.poisoned = self.poisoned or poison

    def _assign(self, node: tree_sitter.Node, state: State, persist: bool) -> None:
        """An assignment `NAME=VALUE`: noted (`sets`); when it `persist`s in this shell (not the
        prefix of a command) and its name is known, known from here on; `NAME=$!` in the command's own
        shell, after a job of it started last, names that job from here on (`_pid`)."""
        name, value = node.child_by_field_name("name"), node.child_by_field_name("value")
        if value is not None:
            self.run(value, state)  # its command substitutions
        if name is None or name.type != "variable_name":
            self._mark(_text(name or node))  # an element of an array: its subscript is arithmetic
            return
        literal = self._literal(node, value)
        self._note(_text(name), literal)
        if persist and literal is not None and self.known.get(_text(name)) == literal:
            self.values[_text(name)] = literal
        bang = value is not None and _text(value) in _BANG and not any(c.type == "+=" for c in node.children)
        if persist and bang and not self.forked and self.jobs[-1:] == [self.started] and _plain(_text(name)):
            self.values[_PID + _text(name)] = f"{self.started} {self.changes[_text(name)]}"

    def _literal(self, node: tree_sitter.Node, value: tree_sitter.Node | None) -> str | None:
        """The value an assignment gives, when it is literal text or `$(mktemp)`; else None."""
        if any(c.type == "+=" for c in node.children):
            return None
        if value is None:
            return ""
        if _MKTEMP.fullmatch(_text(value)):
            return os.path.join(self.tmp, "tmp.XXXXXXXXXX") if self.tmp and not self.redefined else None
        stack = [value]
        while stack:
            current = stack.pop()
            if current.type in _EXPANDS or current.type in ("ansi_c_string", "array"):
                return None
            stack.extend(current.children)
        spelled: Spelled = []
        if self._pieces(value, self.start, spelled) is not None:
            return None
        chars = [c for c in spelled if not isinstance(c, Wild)]
        text = "".join(c for c, _ in chars)
        tilde = any(c == ("~", False) and (i == 0 or chars[i - 1] == (":", False)) for i, c in enumerate(chars))
        return None if tilde else text

    def _declared(self, node: tree_sitter.Node, state: State) -> tuple[State, State]:
        """`declare`, `local`, `export`, `readonly`, `typeset`, `unset`: the names they take may be
        set (a nameref, or a name known only when it runs, may set any); all but `export` and `unset`
        may end the shell (`_SHELL_QUITS`)."""
        self.may_quit = self.may_quit or _text(node.children[0]) in _SHELL_QUITS
        for child in node.named_children:
            if child.type == "variable_assignment":
                name, value = child.child_by_field_name("name"), child.child_by_field_name("value")
                self._mark(_text(name or child))
                if value is not None:
                    self.run(value, state)
                continue
            self.run(child, state)
            if child.type == "variable_name":
                self._mark(_text(child))
                continue
            for cwd in state:
                for item in self.expand(child, cwd):
                    nameref = isinstance(item, str) and item[:1] == "-" and "n" in item and _text(node)[:5] != "unset"
                    self._mark(item if isinstance(item, str) else "", poison=isinstance(item, Unknown) or nameref)
        return state, state

    def _setters(self, items: list[Item]) -> None:
        """Note the names a command may set: a word that is an assignment or a name (`read v`,
        `coproc v`, `{v}>file`), every word of a builtin that sets the variables it names; any
        variable, for one it names only when it runs, and for `source`."""
        if not items:
            return
        for item in items:
            name = re.match(r"\{?([A-Za-z_]\w*)(?:\}|\+?=|\[|$)", item) if isinstance(item, str) else None
            if name is not None:
                self._note(name.group(1), None)
        command = os.path.basename(items[0]) if items and isinstance(items[0], str) else None
        args = items[1:]
        setter = (
            command in _SETTERS or command in ("printf", "wait") and bool(args) and str(args[0])[:2] in ("-v", "-p")
        )
        maybe_option = (
            bool(args) and isinstance(args[0], Unknown) and not (command == "wait" and self._waited_job(args[0]))
        )
        setter = setter or command in ("printf", "wait") and maybe_option  # `-v NAME`, `-p NAME`; not a job's number
        if setter:
            self.setter_words += [a for a in args if isinstance(a, str)]
        if command is None or command in ("source", ".") or setter and any(isinstance(a, Unknown) for a in args):
            self.poisoned = True

    def settled(self) -> tuple[dict[str, str], frozenset[str]] | None:
        """The variables a second walk may take as known (`_Walk`), after this one noted how each may
        be set: (literal ones with their value, `for` ones); None if none."""
        if self.poisoned or self.untrusted:
            return None

        def plain(name: str) -> bool:
            return _plain(name) and not any(name in w for w in self.setter_words)

        known = {n: v for n, (v, *more) in self.sets.items() if v not in (None, _FOR) and not more and plain(n)}
        loops = {n for n, ways in self.sets.items() if ways == {_FOR} and len(self.loops_of[n]) == 1 and plain(n)}
        return (known, frozenset(loops)) if known or loops else None

    def run(self, node: tree_sitter.Node, state: State, tail: Sequence[tree_sitter.Node] = ()) -> tuple[State, State]:
        """Run one statement from `state`: (the states after it succeeded, after it failed). `tail`:
        redirections tree-sitter put after a list or pipeline, which bash gives its last command."""
        self.tick()
        if not self.forked and _marks(node):
            self.between = True
            self.marked += 1
        result = self._statement(node, state, tail)
        if node.type != "list":
            self.succeeded = None
        return result

    def _statement(self, node: tree_sitter.Node, state: State, tail: Sequence[tree_sitter.Node]) -> tuple[State, State]:
        kind = node.type
        if kind == "list":
            left, op, right = node.children[0], node.children[1].type, node.children[-1]
            lok, lfail = self.run(left, state)
            known = self.values  # after the list: the right side may not have run
            self.values = dict(self.succeeded if op == "&&" and self.succeeded is not None else known)
            rok, rfail = self.run(right, lok if op == "&&" else lfail, tail)
            self.succeeded, self.values = (self.values if op == "&&" else None), known
            return (rok, lfail | rfail) if op == "&&" else (lok | rok, rfail)
        if kind == "negated_command":
            ok, fail = self.run(node.named_children[-1], state, tail) if node.named_children else (state, state)
            return fail, ok
        if kind == "pipeline":  # each part runs in a subshell of its own
            parts = node.named_children
            for i, child in enumerate(parts):
                with self.apart(child=True):
                    self.run(child, state, tail if i == len(parts) - 1 else ())
            return state, state
        if kind == "redirected_statement":
            return self._redirected(node, state, tail)
        if kind == "command":
            return self._command(node, state, tail)
        for redirect in tail:  # on a compound command: it applies to all of it
            self.redirect(redirect, state)
        if kind == "process_substitution":  # bash does not wait for it
            with self.background():
                self.statements(node.children, state)
            return state, state
        if kind == "command_substitution" and _text(node).startswith("`"):  # its code, unescaped as bash reads it
            with self.apart(child=True):
                self.walk(_backquoted(_text(node)[1:-1]), state)
            return state, state
        if kind in ("subshell", "command_substitution"):
            with self.apart(child=True):
                self.statements(node.children, state)
            return state, state
        if kind in ("variable_assignment", "variable_assignments"):
            for assignment in [node] if kind == "variable_assignment" else node.named_children:
                self._assign(assignment, state, persist=True)
            return state, state
        if kind in ("declaration_command", "unset_command"):
            return self._declared(node, state)
        if kind in ("c_style_for_statement", "compound_statement") and node.children[0].type in ("for", "(("):
            self._mark(_text(node))  # arithmetic may set any name in it
        if kind == "function_definition":
            body = node.child_by_field_name("body")
            name = node.child_by_field_name("name")
            redirects = node.children_by_field_name("redirect")
            if body is not None and name is not None:
                self.functions[_text(name)] = (body, redirects, self.source)  # run where it is called
            return state, state
        if kind == "if_statement":
            with self.apart():
                return self._if(node, state)
        if kind in ("while_statement", "until_statement", "for_statement", "c_style_for_statement"):
            started, marked = self.started, self.marked
            self.looping += 1
            try:
                with self.apart():
                    return self._loop(node, state)
            finally:
                self.looping -= 1
                if self.started > started and (kind != "for_statement" or self.marked > marked):
                    self.between = True  # its next round's statements (or condition) run after its job
        if kind == "case_statement":
            started = self.started
            try:
                return self._case(node, state)
            finally:
                if self.started > started:
                    self.between = True  # `;;&` tests the patterns after it, which are not expanded here
        if kind in ("compound_statement", "do_group", "program"):
            return self.statements(node.children, state)
        if kind == "test_command" and node.children and node.children[0].type == "[":
            self._bracket_redirects(node, state)
        self.statements(node.children, state)  # anything else (a word, a test, `local`, an error): what it holds
        return state, state

    def _case(self, node: tree_sitter.Node, state: State) -> tuple[State, State]:
        """A `case`: its word, then each item, which may not run."""
        value = node.child_by_field_name("value")
        if value is not None:
            self.run(value, state)
        after = state
        for item in node.children:
            if item.type == "case_item":
                with self.apart():  # it may not run
                    ok, fail = self.statements([c for c in item.children if c.is_named and c.type != "word"], state)
                after = after | ok | fail
        return after, after

    def _bracket_redirects(self, node: tree_sitter.Node, state: State) -> None:
        """In `[ … ]` (a command, unlike `[[ … ]]`) a `>` is a redirection: tree-sitter reads it as a comparison."""
        for child in node.named_children:
            operator = child.child_by_field_name("operator")
            right = child.child_by_field_name("right")
            if child.type == "binary_expression" and operator is not None and right is not None:
                if operator.type in (">", ">>"):
                    for cwd in state:
                        for item in self.expand(right, cwd):
                            self.write(item, cwd, _WRITE_OPS[operator.type])
                self._bracket_redirects(child, state)

    def _if(self, node: tree_sitter.Node, state: State) -> tuple[State, State]:
        """Each condition runs where the one before failed; its body where it succeeded."""
        clauses = [_clause(node.children)] + [_clause(c.children) for c in node.children if c.type == "elif_clause"]
        otherwise = next(
            ([c for c in e.children if c.is_named] for e in node.children if e.type == "else_clause"), None
        )
        after_ok: State = frozenset()
        after_fail: State = frozenset()
        current = state
        for condition, body in clauses:
            cok, cfail = self.statements(condition, current)
            ok, fail = self.statements(body, cok)
            after_ok, after_fail = after_ok | ok, after_fail | fail
            current = cfail
        if otherwise is not None:
            ok, fail = self.statements(otherwise, current)
            return after_ok | ok, after_fail | fail
        return after_ok | current, after_fail

    def _loop(self, node: tree_sitter.Node, state: State) -> tuple[State, State]:
        """A loop's condition and body run from every directory a round can start in (`state`, or
        where a round before ended), until no round reaches a new one: the loop ends (after its
        condition, or a `break` in its body) in any of them. A loop that keeps reaching new ones
        (`cd sub` in it) is followed from an unknown directory. Each round starts with the variables
        known before the loop; a `for` loop's variable is each of its words in turn (`_rounds`)."""
        body = [b for b in [node.child_by_field_name("body")] if b is not None]
        parts = [c for c in node.named_children if c not in body]  # the condition, or the words looped over
        variable = node.child_by_field_name("variable")
        name = None if variable is None else _text(variable)
        if name is not None:
            listed = node.children[0].type == "for" and any(c.type == "in" for c in node.children)
            self._note(name, _FOR if listed else None)  # else "$@", or `select`'s input
            self.loops_of.setdefault(name, set()).add((self.source, node.start_byte))
        words = node.children_by_field_name("value") if name in self.loops else None
        before = self.values
        reach = state
        for _ in range(_LOOP_ROUNDS):
            functions = dict(self.functions)
            self.values = dict(before)
            cok, cfail = self.statements(parts, reach)
            ok, fail = self._rounds(body, cok | cfail, name, words)
            after = reach | cok | cfail | ok | fail
            if after == reach and functions == self.functions:  # a function it defines runs in the next round
                return reach, reach
            reach = after
        moved = frozenset({_unknown_cwd(state, _text(node)[:40], "a loop that changes the directory")})
        self.values = dict(before)
        self.statements([*parts, *body], moved)
        return reach | moved, reach | moved

    def _rounds(
        self, body: list[tree_sitter.Node], state: State, name: str | None, words: list[tree_sitter.Node] | None
    ) -> tuple[State, State]:
        """A loop's body, once; with `words` (a `for` loop whose variable `name` is known), once for
        each word they expand to, the variable set to it (unknown for a word known only when it runs)."""
        if name is None or words is None:
            return self.statements(body, state)
        start = self.values
        ok: State = frozenset()
        fail: State = frozenset()
        for cwd in state:
            for item in [i for word in _merged(words, self.source) for i in self._expand_all(word, cwd)]:
                self.values = {**start, name: item} if isinstance(item, str) else dict(start)
                o, f = self.statements(body, frozenset({cwd}))
                ok, fail = ok | o, fail | f
        self.values = start
        return ok, fail

    def _redirected(
        self, node: tree_sitter.Node, state: State, tail: Sequence[tree_sitter.Node]
    ) -> tuple[State, State]:
        body = node.child_by_field_name("body")
        redirects = [c for c in node.children if c != body] + list(tail)
        if body is None:
            for redirect in redirects:
                self.redirect(redirect, state)
            return state, state
        return self.run(body, state, redirects)

    def redirect(self, node: tree_sitter.Node, state: State) -> tuple[list[tree_sitter.Node], list[tree_sitter.Node]]:
        """Record what a redirection writes (in every working directory of `state`). Returns the
        words after its target (arguments of the command, which tree-sitter puts with it) and, for
        a here-document, what follows its start on its line (`&&`, `||` and `|` with what they join)."""
        if node.type == "heredoc_redirect":
            follows: list[tree_sitter.Node] = []
            start = next((c for c in node.children if c.type == "heredoc_start"), None)
            quoted = start is None or re.search(r"[\\'\"]", _text(start)) is not None
            for child in node.children:
                if child.type in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
                    follows += self.redirect(child, state)[1]
                elif child.type == "heredoc_body":
                    self.run(child, state)
                    if not quoted:  # bash runs every substitution in it, where tree-sitter-bash may see none
                        with self.apart(child=True):
                            for code in _body_substitutions(_text(child)):
                                self.walk(code, state)
                elif (
                    child.type in ("&&", "||") or child.is_named and child.type not in ("heredoc_start", "heredoc_end")
                ):
                    follows.append(child)
            return [], follows
        if node.type != "file_redirect":
            self.run(node, state)
            return [], []
        ops = [c for c in node.children if not c.is_named]
        op = ops[0].type if ops else ""
        if op == "<" and any(c.type == "ERROR" and _text(c) == ">" for c in node.children):
            op = "<>"  # tree-sitter-bash has no `<>`: it reads `<` and an error
        targets = node.children_by_field_name("destination")
        if not targets:
            return [], []
        first, *others = _merged(targets, self.source)  # a target may go on after a line continuation
        rest = [n for group in others for n in group]
        for target in first:
            self.run(target, state)
        if op in _WRITE_OPS and first[0].type != "process_substitution":
            for cwd in state:
                for item in self._expand_all(first, cwd):
                    fd_copy = op == ">&" and isinstance(item, str) and (item.isdigit() or item == "-")
                    if not fd_copy:
                        self.write(item, cwd, _WRITE_OPS[op])
        return rest, []

    def write(self, item: Item, cwd: Cwd, kind: HandleKind, expand: bool = False) -> None:
        """Record that `item` is written (with `expand`, a directory there stands for the files below it).
        An append by a plain relative name in the start directory known only when the command runs
        (`elsewhere`) is not: it needs no view and loses nothing, and its file is unknown (`_appended`)."""
        if kind == "append" and not expand and cwd == self.elsewhere and isinstance(item, str) and _appended(item):
            return
        placed = _own_process(_unproc(_placed(item, cwd), cwd), cwd)
        if isinstance(placed, str) and _descriptor_number(placed) in self.read_descriptors:
            # (`{ echo x > /dev/stdout; } 1<f`: the kernel opens f to write)
            why = "a descriptor the command opened on a file to read, which a write by its name opens to write"
            placed = Unknown(placed, why, _place(cwd), anywhere=True)
        if isinstance(placed, Unknown):
            self.unknown.append(placed.below("/", Wild.DIRS) if expand else placed)
        else:
            self.found.append((placed, kind, expand, self.job))

    def link(self, item: Item, cwd: Cwd, follow: Follow) -> None:
        """Record an end of a hard link the command makes (a directory there stands for the files below
        it, found following symlinks as `follow` says): one known only when it runs may be a managed file."""
        placed = _own_process(_unproc(_placed(item, cwd), cwd), cwd)
        if isinstance(placed, Unknown):
            why = f"an end of a hard link, which may be a managed file: {placed.why}"
            self.unknown.append(dataclasses.replace(placed.below("/", Wild.DIRS), why=why))
        else:
            self.ends.append((placed, follow))

    # ---- commands -------------------------------------------------------------------

    def _command(self, node: tree_sitter.Node, state: State, tail: Sequence[tree_sitter.Node]) -> tuple[State, State]:
        words: list[tree_sitter.Node] = []
        follows: list[tree_sitter.Node] = []
        name_node = node.child_by_field_name("name")
        parts = [*node.children, *tail]
        for i, child in enumerate(parts):
            if _descriptor_of(child, parts[i + 1 : i + 2]):
                continue  # `bash 0< <(…)`: tree-sitter reads the 0 as a word of the command
            if child.type in ("file_redirect", "heredoc_redirect", "herestring_redirect"):
                rest, more = self.redirect(child, state)
                words += rest
                follows += more
            elif child.type == "variable_assignment" and i < len(node.children):
                self._assign(child, state, persist=False)  # for the command only
            elif i >= len(node.children):
                self.run(child, state)
            elif child == name_node and child.named_children:
                words.append(child.named_children[0])
            elif child.is_named or node.field_name_for_child(i):
                words.append(child)
        # a line tree-sitter-bash takes for more words of this command (one led by a backslash: `\\EOF`)
        after = [w for w in words if self.source[w.start_byte : w.start_byte + 1] == b"\n"]
        words = words[: words.index(after[0])] if after else words
        for word in words:  # their command substitutions
            self.run(word, state)
        merged = _merged(words, self.source)
        ok: set[Cwd] = set()
        fail: set[Cwd] = set()
        for cwd in state:
            items: list[Item] = [item for word in merged for item in self._expand_all(word, cwd)]
            o, f = self.simple(items, cwd)
            ok |= o
            fail |= f
        result = frozenset(ok), frozenset(fail)
        op = ""
        for follower in follows:  # `cat <<EOF && next` / `|| next` / `| next`: the rest of the line
            if follower.type in ("&&", "||"):
                op = follower.type
                continue
            if op == "&&":
                rok, rfail = self.run(follower, result[0])
                result = rok, result[1] | rfail
            elif op == "||":
                rok, rfail = self.run(follower, result[1])
                result = result[0] | rok, rfail
            else:
                self.statements(follower.children if follower.type == "pipeline" else [follower], state)
        if after:  # the next line, which tree-sitter-bash took for more words of this command
            line = self.source[after[0].start_byte : after[-1].end_byte].decode("utf-8", "surrogateescape")
            result = self.walk(line, result[0] | result[1])
        return result

    def _expand_all(self, word: list[tree_sitter.Node], cwd: Cwd) -> list[Item]:
        """The words of one word of bash that tree-sitter split into several nodes (`_merged`):
        expanded as one, so a pattern spans them all (`plans/[a]\\.md` is two nodes)."""
        if len(word) == 1:
            return self.expand(word[0], cwd)
        nodes = _untranslated(word)
        source = "".join(_text(x) for x in word)
        spelled: Spelled = []
        for n in nodes:
            if self._pieces(n, cwd, spelled) is not None or any(isinstance(c, Wild) for c in spelled):
                place, anywhere, deeper = _pattern_place(spelled, cwd)
                return [Unknown(source, "a word tree-sitter splits", place, anywhere, volumes_below=deeper)]
        return self._expanded(spelled, cwd, source)

    def simple(self, items: list[Item], cwd: Cwd) -> tuple[set[Cwd], set[Cwd]]:
        """One simple command, its words expanded: what it writes, and (after success, after
        failure) the working directories it leaves its shell in."""
        same = ({cwd}, {cwd})
        items, in_shell = list(items), True
        self._setters(items)
        while items[:1] in (["{"], ["!"], ["coproc"], ["time"]):  # keywords tree-sitter reads as words
            if items[0] == "coproc":  # `coproc f`, `coproc NAME { …; }`: in a subshell (`coproc`: a job)
                in_shell = False
                items = items[2:] if items[2:3] == ["{"] else items[1:]
            elif items[0] == "time" and len(items) > 1 and _is_option(items[1]) and items[1] not in ("-p", "--"):
                break  # /usr/bin/time's options: a wrapper
            else:  # `time [-p]` runs what follows in this shell
                del items[: 2 if items[0] == "time" and items[1:2] in (["-p"], ["--"]) else 1]
        if items and isinstance(items[0], str) and items[0] in self.functions:  # no wrapper calls a function
            ok, fail = self._call(items[0], cwd)
            return (set(ok), set(fail)) if in_shell else same
        unwrapped = self.unwrap(items, cwd)
        if unwrapped is None:
            return same
        items, cwd, wrapped_in_shell, detached = unwrapped
        if detached:  # a wrapper that does not wait for its command
            with self.background():
                self._invoke(items, cwd, in_shell=False)
            return same
        return self._invoke(items, cwd, in_shell and wrapped_in_shell)

    def _invoke(self, items: list[Item], cwd: Cwd, in_shell: bool) -> tuple[set[Cwd], set[Cwd]]:
        """One simple command, keywords and wrappers looked through (`simple`): `in_shell` when it
        runs in the shell walked (a builtin there may change its directory, or wait for its jobs)."""
        same = ({cwd}, {cwd})
        self._setters(items)
        if items and isinstance(items[0], Unknown):
            self.may_quit = True  # it may be `exit`
            self.unknown.append(Unknown(items[0].word, "a command whose name is known only when it runs", _place(cwd)))
            return same
        if not items or not isinstance(items[0], str):
            return same
        name, args = os.path.basename(items[0]), items[1:]
        named = name in _SHELL_QUITS or _GLOBBED.search(items[0]) is not None or _SIGNALS.search(name) is not None
        self.may_quit = self.may_quit or named  # (a pattern's expansion too: `/bin/k?ll`)
        if name in ("cd", "pushd", "popd") and in_shell:
            return self._cd(name, args, cwd)
        if name == "wait" and in_shell and not self.forked:
            self._wait(args)
            return same
        if name == "eval" and args:
            return self._script(" ".join(self._code(a) for a in args), cwd, inherit=True)
        if name == "trap":
            handler = args[1:2] if args[:1] == ["--"] else args[:1]
            if handler and not _is_option(handler[0]):
                self.traps.append(self._code(handler[0]))  # run when the shell exits (`trapped`)
                self._script(self.traps[-1], cwd, inherit=False)
            return same
        altering = (
            _shell_altering(args)
            if name in _SHELLS
            else _altering(args, _SU_VALUED)
            if name in ("su", "runuser")
            else None
        )
        if altering is not None:
            why = f"a word of {name} known only when it runs, which may be an option (`-c` makes a word a script)"
            self.unknown.append(Unknown(altering.word, why, _place(cwd), anywhere=True))
        if name in _SHELLS:
            script = _shell_script(args)
            if self.piped_startup:  # its startup file, run before its script, is known only when it runs
                why = "a startup file (BASH_ENV, ENV, --rcfile, --init-file) the shell reads from its input or a pipe"
                self.unknown.append(Unknown(name, why, self._script_place(cwd), True))
            if script is not None:
                self._script(self._code(script), cwd, inherit=False)
            elif _shell_file(args) is None or "-s" in args or _from_input(_shell_file(args), cwd):
                self.unknown.append(
                    Unknown(name, "a script the shell reads from its input", self._script_place(cwd), True)
                )
            return same
        if name in ("source", ".") and _from_input(next((a for a in args if a != "--"), None), cwd):
            self.unknown.append(Unknown(name, "a script the shell reads from its input", self._script_place(cwd), True))
            return same
        if name in ("su", "runuser"):
            _, values = _operands(args, _SU_VALUED)
            script = values.get("-c") or values.get("--command")
            rest = list(args)
            user = dict(_options(rest, _SU_VALUED | _names("-u --user")))
            if script is not None:
                self._script(self._code(script), cwd, inherit=False)
            elif name == "runuser" and ("-u" in user or "--user" in user):  # `runuser -u USER [--] COMMAND`
                self.simple(rest, cwd)
            else:  # the user's shell, reading its commands from its input
                self.unknown.append(
                    Unknown(name, "a shell it starts, reading its script from its input", self._script_place(cwd), True)
                )
            return same
        if name == "script":  # its options may follow its file (getopt permutes them)
            operands, values = _operands(args, _SCRIPT_VALUED)
            logs = [values[o] for o in _SCRIPT_LOGS if o in values] + _script_timing(args)
            for file in [*operands[:1], *logs] or ["typescript"]:
                self.write(file, cwd, "write")
            script = values.get("-c") or values.get("--command")
            if script is not None:
                self._script(self._code(script), cwd, inherit=False)
            else:
                self.unknown.append(
                    Unknown(name, "a script the shell reads from its input", self._script_place(cwd), True)
                )
            return same
        if name == "watch":
            self._watch(args, cwd)
        elif name == "tmux":
            self._tmux(args, cwd)
        elif name in ("at", "batch") and not _given(args, _AT_VALUED) & _AT_LISTS:
            why = f"a job {name} runs later, read from its input or a file"
            self.unknown.append(Unknown(name, why, _place(cwd), anywhere=True))
        elif name == "git":
            self._git(args, cwd)
        elif name == "xargs":
            self._xargs(args, cwd)
        elif name == "find":
            self._find(args, cwd)
        elif name == "parallel":
            self._parallel(args, cwd)
        elif name in ("apply_patch", "applypatch"):
            why = "a patch run as a shell command; a patch is checked only when it comes through the apply_patch tool"
            below = isinstance(cwd, Unknown) and cwd.volumes_below  # (run where a volume below may be)
            self.unknown.append(Unknown(name, why, _place(cwd), anywhere=True, volumes_below=below))
        elif name in _VALUED or name in _AWKS:
            effect = _command_writes(name, args, cwd)
            for item, kind, expand in effect.writes:
                self.write(item, cwd, kind, expand)
            for end, follow in effect.linked:
                self.link(end, cwd, follow)
            self.programs += [(os.path.join(_place(cwd), f), cwd) for f in _program_file_names(name, args)]
        return same

    def _code(self, item: Item) -> str:
        """The text of code to walk (`eval`, `trap`, `sh -c`); one with an expansion is walked as
        written, and what the expansion brings is unknown anywhere."""
        if isinstance(item, str):
            return item
        self.poisoned = self.may_quit = True  # it may set any variable, or end the shell
        self.unknown.append(Unknown(item.word, f"code with {item.why}, known only when it runs", item.place, True))
        word = item.word
        return word[1:-1] if len(word) > 1 and word[0] == word[-1] == '"' else word

    def trapped(self, state: State) -> None:
        """Walk the handlers `trap` set where the shell may exit (`state`)."""
        done = 0
        while done < len(self.traps) and done < _MOST_CALLS:
            for cwd in state:
                self._script(self.traps[done], cwd, inherit=False)
            done += 1

    def _call(self, name: str, cwd: Cwd) -> tuple[State, State]:
        """Run function `name` from `cwd`, with the redirections of its definition."""
        if self.depth >= _DEEPEST or self.calls >= _MOST_CALLS:
            self.may_quit = True  # its builtins are not seen
            self.unknown.append(Unknown(name, "a function called too often to follow", _place(cwd)))
            return frozenset({cwd}), frozenset({cwd})
        body, redirects, source = self.functions[name]
        for redirect in redirects:
            self.redirect(redirect, frozenset({cwd}))
        self.calls += 1
        self.depth += 1
        outer, self.source = self.source, source
        try:
            with self.apart():  # it may return early; a `for` loop in it may be the one it is called from
                return self.statements([body], frozenset({cwd}))
        finally:
            self.depth -= 1
            self.source = outer
            self.values = {n: v for n, v in self.values.items() if n not in self.loops}

    def _script(self, script: str, cwd: Cwd, inherit: bool) -> tuple[set[Cwd], set[Cwd]]:
        """Walk the text of `bash -c`, `eval` or `trap`: in this shell (`inherit`) or a child."""
        if self.depth >= _DEEPEST:
            self.may_quit = True  # its builtins are not seen
            self.unknown.append(Unknown(script[:80], f"commands nested more than {_DEEPEST} deep", _place(cwd)))
            return {cwd}, {cwd}
        self.depth += 1
        with self.apart(inherit):
            ok, fail = self.walk(script, frozenset({cwd}))
        self.depth -= 1
        self.values = {n: v for n, v in self.values.items() if n not in self.loops}
        return (set(ok), set(fail)) if inherit else ({cwd}, {cwd})

    def walk(self, command: str, state: State) -> tuple[State, State]:
        """Walk the code `command` (the command's, or a script it runs) from `state`."""
        command = _BACKSLASHED_DELIMITER.sub(_quoted_delimiter, command)
        text, hidden = _unquoted(command)
        self.may_quit = self.may_quit or hidden or _QUITS.search(_HARMLESS.sub(" ", text)) is not None or _signals(text)
        self.physical = self.physical or hidden or _PHYSICAL.search(text) is not None
        self.coproc = self.coproc or _COPROC.search(text) is not None
        self.arithmetic = self.arithmetic or hidden or _ARITHMETIC.search(text) is not None
        if len(command) > _LONGEST or "\0" in command:
            self.may_quit = True
            why = f"a command of more than {_LONGEST} characters, or with a NUL character"
            self.unknown.append(Unknown(command[:80], why, self.start, True))
            return state, state
        outer, self.source = self.source, command.encode("utf-8", "surrogatepass")
        tree = _parser().parse(self.source)
        broken = _errors(tree.root_node)
        self.may_quit = self.may_quit or broken is not None  # a builtin may hide in what it cannot parse
        if broken is not None:
            for cwd in state:
                self.unknown.append(Unknown(broken, "a part tree-sitter cannot parse as bash", _place(cwd)))
        try:
            return self.run(tree.root_node, state)
        finally:
            self.source = outer

    def unwrap(self, items: list[Item], cwd: Cwd) -> tuple[list[Item], Cwd, bool, bool] | None:
        """`items` with the wrappers in front looked through: (the command, its working directory,
        whether it still runs in this shell: no wrapper but `builtin` or `command`, whether a wrapper
        does not wait for it: `_Wrapper.detached`); None when the wrapper runs no command."""
        items, in_shell, detached = list(items), True, False
        while items and isinstance(items[0], str):
            name = os.path.basename(items[0])
            self.may_quit = self.may_quit or name in _SHELL_QUITS  # `exec`, also with no command
            spec = _WRAPPERS.get(name)
            if spec is None:
                break
            items.pop(0)
            in_shell = in_shell and name in ("builtin", "command")
            here = spec.here is None
            waits = spec.detached is None
            for first in (True, False) if spec.leading else (True,):  # options may follow them too (flock LOCK -c)
                for option, value in _options(items, spec.valued):
                    if option in spec.no_command:
                        return None
                    if option in spec.unsure:
                        why = f"a command {name} runs in a file system or directory known only when it runs ({option})"
                        self.unknown.append(Unknown(name, why, _place(cwd), anywhere=True))
                        return None
                    if option in spec.script and value is not None:
                        self._script(self._code(value), cwd, inherit=False)
                        return None
                    here = here or option in (spec.here or ())
                    waits = waits or option in (spec.detached or ())
                    detached = detached or option in spec.detaching
                    if option in spec.chdir and value is not None:
                        here = True
                        cwd = value if isinstance(value, Unknown) else _joined(cwd, value)
                    elif name == "env" and option in ("-S", "--split-string") and isinstance(value, str):
                        try:
                            items[:0] = shlex.split(value)
                        except ValueError:
                            return None
                    elif option in spec.output and value is not None:
                        with self.background() if detached or not waits else nullcontext():  # by what it leaves running
                            self.write(value, cwd, "write")
                while first and spec.assignments and items and isinstance(items[0], str) and "=" in items[0]:
                    items.pop(0)
                numeric = not spec.numeric or bool(items) and isinstance(items[0], str) and items[0].isdigit()
                del items[: spec.leading if first and numeric else 0]
            if not here:
                without = " or ".join(sorted(spec.here or ()))
                why = f"the directory {name} runs its command in (not this one, without {without})"
                cwd = Unknown(name, why, _place(cwd), anywhere=True)
            detached = detached or not waits
        return items, cwd, in_shell, detached

    def _cd(self, name: str, args: list[Item], cwd: Cwd) -> tuple[set[Cwd], set[Cwd]]:
        """`cd`, `pushd` or `popd` with `args` from `cwd`: (the directories the shell may be in after
        it succeeded, after it failed). A directory is entered as bash enters it (`_entered`):
        logically unless physically (`cd -P`; `set -P`, which the command may turn on: `physical`).
        `pushd -n` and `popd -n` stay; the directory stack, `cd -` and a directory known only when it
        runs are unknown. A relative one (not `.`, `..`, `./…`, `../…`) is looked for below each
        directory of CDPATH first (`_cdpath`), bash entering the first that is one when it runs: each
        up to the first that is one now is one the shell may be in after it; where the command may
        set CDPATH, or the directory is known only when it runs and CDPATH is set, it may be any
        directory."""
        operands, flags = list(args), ""
        while operands and _is_option(operands[0]) and not re.fullmatch(r"-\d+", str(operands[0])):
            option = str(operands.pop(0))
            if option == "--":
                break
            flags += option[1:]
        if name != "cd" and "n" in flags:  # it changes the stack only
            return {cwd}, {cwd}
        numbered = isinstance(operands[0], str) and re.fullmatch(r"[+-]\d+", operands[0]) if operands else False
        if name == "popd" or operands[:1] == ["-"] or name == "pushd" and (not operands or numbered):
            return {Unknown(" ".join([name, *map(str, args)]), "the directory stack", self.start, True)}, {cwd}
        if not operands:
            home = os.environ.get("HOME")
            if self.untrusted or not home:
                return {Unknown(name, "HOME is set in the command, or not at all", _place(cwd))}, {cwd}
            operands = [home]
        target = operands[0]
        cdpath = self._cdpath()
        if isinstance(target, Unknown):
            relative = not (target.lead or "").startswith(("/", "./", "../"))
            anywhere = target.anywhere or relative and cdpath != []  # (CDPATH may lead it anywhere)
            return {Unknown(f"{name} {target.word}", target.why, target.place, anywhere)}, {cwd}
        relative = not target.startswith(("/", "./", "../")) and target not in (".", "..")
        if relative and cdpath is None:
            why = "CDPATH, which the command may set, may name any directory"
            return {Unknown(f"{name} {target}", why, _place(cwd), anywhere=True)}, {cwd}
        chosen = next((c == "P" for c in reversed(flags) if c in "LP"), None) if name == "cd" else None
        ways = [chosen] if chosen is not None else [False, True] if self.physical else [False]
        after: set[Cwd] = set()
        for base in [*cdpath, "."] if relative and cdpath else ["."]:
            new = _unproc(_joined(cwd, os.path.join(base, target)), cwd)
            if isinstance(new, Unknown):
                return {new}, {cwd}
            entered = [_entered(new, p) for p in ways]
            found: set[Cwd] = {e for e in entered if e is not None}
            if None not in entered:  # a directory there now, entered whichever way: bash looks no further
                return after | found, set()
            after |= found or {os.path.normpath(new)}  # (or made by the command first)
        return after, {cwd}

    def _cdpath(self) -> list[str] | None:
        """The directories a relative `cd` looks in first, as bash finds them in the CDPATH the hook
        inherits (`~` expanded, an empty entry the working directory: "."); None where the command
        may set CDPATH (`untrusted`: it names it). As with HOME, a script it sources is taken to
        leave CDPATH as it is (a virtualenv's `activate` before a `cd` is no write to anywhere)."""
        if self.untrusted:
            return None
        return [os.path.expanduser(d) if d else "." for d in _inherited_cdpath()]

    def _script_place(self, cwd: Cwd) -> str:
        """Where a script known only when it runs is judged: the directory it runs in where that is
        in a volume, else the one the command started in (the script may go back there, `cd -`)."""
        here = _place(cwd)
        return here if located_directory(here) is not None else _place(self.start)

    def _watch(self, args: list[Item], cwd: Cwd) -> None:
        """`watch [OPTIONS] COMMAND…`: its words joined with spaces are a script it runs with `sh -c`;
        with `-x`/`--exec` they are the command itself (each word as given)."""
        rest = list(args)
        given = {name for name, _ in _options(rest, _WATCH_VALUED)}
        exact = any(g == "-x" or _abbreviates(g, "--exec") for g in given)
        words = [shlex.quote(a) if exact and isinstance(a, str) else self._code(a) for a in rest]
        if words:
            self._script(" ".join(words), cwd, inherit=False)

    def _tmux(self, args: list[Item], cwd: Cwd) -> None:
        """tmux's commands (separated by `;` words), run by its server apart from this shell: the
        command `new-session` starts (one word: a shell script) is walked as a job, in the directory
        its `-c` names or this one; `-c SCRIPT` before them is a shell script run here. A command that
        may run a shell command (any other but `_TMUX_QUIET`, one with a `#(` format, any read in
        control mode `-C`) runs one known only when it runs."""
        rest, control = list(args), False
        for option, value in _options(rest, _TMUX_VALUED):
            if option == "-c" and value is not None:
                self._script(self._code(value), cwd, inherit=False)
            control = control or option == "-C"
        if control:
            why = "tmux commands read from its input (control mode), known only when they run"
            self.unknown.append(Unknown("tmux -C", why, _place(cwd), anywhere=True))
            return
        commands: list[list[Item]] = [[]]
        for arg in rest or ["new-session"]:
            if arg == ";":
                commands.append([])
            else:
                commands[-1].append(arg)
        for words in filter(None, commands):
            name = words[0]
            formats = any("#(" in str(w) or str(w).endswith(";") for w in words)
            if name in _TMUX_QUIET and not formats:
                continue
            if name not in ("new", "new-session") or formats:
                why = f"a command tmux's server runs later ({str(name)[:40]}), known only when it runs"
                self.unknown.append(Unknown(str(name), why, _place(cwd), anywhere=True))
                continue
            command = words[1:]
            start = dict(_options(command, _TMUX_NEW_VALUED)).get("-c")
            here = cwd if start is None else start if isinstance(start, Unknown) else _joined(cwd, start)
            with self.background():
                if len(command) == 1:
                    self._script(self._code(command[0]), here, inherit=False)
                elif command:
                    self.simple(command, here)

    def _git(self, args: list[Item], cwd: Cwd) -> None:
        """`git clean` (but `-n`) and `git stash` with `-u` or `-a`: they remove files git does not
        track (and with `-x`, `-X` or `-a` those it ignores, a volume's registry too), a set known
        only when they run, below the directories they clean (`_git_removes`). Other git commands
        are not recognised."""
        items = list(args)
        moved = ("GIT_DIR", "GIT_WORK_TREE")  # another work tree than the one `cwd` lies in
        elsewhere = any(n in os.environ or n.encode() in self.source for n in moved)
        aliased = False  # an alias given on its command line may be `clean`
        for option, value in _options(items, _GIT_VALUED):
            if option == "-C" and value is not None:
                cwd = value if isinstance(value, Unknown) else _joined(cwd, value)
            elif option in ("--git-dir", "--work-tree") or option == "-c" and isinstance(value, str):
                elsewhere = elsewhere or option != "-c" or str(value).lower().startswith("core.worktree")
                aliased = aliased or option == "-c" and str(value).lower().startswith("alias.")
            elif option in ("-c", "--config-env"):
                aliased = True
        if not items:
            return
        if items[0] == "mv" and not _gives(_given(items[1:], frozenset()), "-n --dry-run"):
            effect = _command_writes("mv", items[1:], cwd)  # as mv moves them (its -k skips, -f forces)
            for item, kind, expand in effect.writes:
                self.write(item, cwd, kind, expand)
            return
        command = items[0] if isinstance(items[0], str) else None
        places = [_git_top(cwd)] if aliased or command is None else _git_removes(command, items[1:], cwd)
        word = f"git {command if command is not None else _code_word(items[0])}"
        why = (
            f"the files `{word}` may remove: those git does not track (with -x, -X or -a also those it ignores, the "
            "registry among them), known only when it runs"
        )
        for place in places:
            placed = _placed(place, cwd)
            if elsewhere or isinstance(placed, Unknown):  # another work tree: anywhere
                placed = "/"
            self.unknown.append(
                Unknown(word, why, placed, shape=("/", Wild.DIRS), volumes_below=True, advice=_GIT_ADVICE)
            )

    def _xargs(self, args: list[Item], cwd: Cwd) -> None:
        items = list(args)
        replace: Item | None = None
        while items and _is_option(items[0]):
            arg = str(items.pop(0))
            if arg == "--":
                break
            name, eq, value = arg.partition("=")
            if arg.startswith("--") and _abbreviates(name, "--replace"):  # its value only after `=`: `{}` else
                replace = value if eq else "{}"
                continue
            cut = re.match(r"-[^-IiEeLlnPsad]*([iel])", arg)  # -i, -e, -l take a value only attached
            if cut is not None and cut.group(1) == "i":
                replace = arg[cut.end() :] or "{}"
            elif cut is None:
                for option, given in _option(arg, items, _XARGS_VALUED):
                    replace = given if option == "-I" else replace
        source = Unknown("xargs", "the operands xargs reads", _place(cwd))
        self._run_with(items or ["echo"], source, replace if isinstance(replace, str) else None, cwd)

    def _find(self, args: list[Item], cwd: Cwd) -> None:
        starts: list[Item] = []
        follows = "P"  # how find treats symlinks: the last of -H, -L, -P
        i = 0
        while i < len(args) and isinstance(args[i], str) and re.fullmatch(r"-[HLP]+|-D|-O\d*", str(args[i])):
            follows = next((c for c in reversed(str(args[i])) if c in "HLP"), follows)
            i += 2 if args[i] == "-D" else 1  # its debug and optimisation options
        while i < len(args) and not (isinstance(args[i], str) and str(args[i])[:1] in "-(!"):
            starts.append(args[i])
            i += 1
        # each starting point and everything below it (as a shape of what lies below the place)
        trees = [(*_tree(cwd, s), s if isinstance(s, str) else None) for s in starts or ["."]]
        if "-files0-from" in args:  # more starting points, read from a file
            trees = [(_place(cwd), None, None)]
        altering = _find_altering(starts, args[i:])
        if altering is not None:
            why = (
                "a word of find known only when it runs, which may be a test or an action (`-delete`, `-exec`, "
                "`-fprint FILE`) that makes it delete or write any file"
            )
            self.unknown.append(Unknown(altering.word, why, _place(cwd), anywhere=True))
        deleted = self._find_deleted(starts or ["."], args[i:], follows, cwd) if "-delete" in args[i:] else []
        if isinstance(deleted, str):
            why = (
                f"the files find deletes: {deleted}. Run the same find with -print instead of -delete to list them, "
                "then remove those files with rm, naming each"
            )
            self.unknown += [Unknown("find -delete", why, place, shape=shape) for place, shape, _ in trees]
        for path in deleted if isinstance(deleted, list) else []:
            self.write(path, cwd, "write")
        while i < len(args):
            arg = args[i]
            if arg in ("-fprint", "-fprint0", "-fls", "-fprintf") and i + 1 < len(args):
                self.write(args[i + 1], cwd, "write")
            elif arg in ("-exec", "-execdir", "-ok", "-okdir"):
                end = next((j for j in range(i + 1, len(args)) if args[j] in (";", "+")), len(args))
                for place, shape, start in trees:  # find names a file as its starting point, then below it
                    lead = "./" if "dir" in str(arg) else start
                    named = Unknown(f"find {arg}", "the files find names", place, shape=shape, lead=lead)
                    visited = Unknown(f"find {arg}", "the directories find visits", place, shape=shape)
                    self._run_with(args[i + 1 : end], named, "{}", visited if "dir" in str(arg) else cwd)
                i = end
            i += 1

    def _find_deleted(self, starts: list[Item], expression: list[Item], follows: str, cwd: Cwd) -> list[str] | str:
        """The files `find STARTS EXPRESSION` with `-delete` deletes (`follows`: the last of its
        -H, -L, -P): each file (not a directory: one find deletes is empty) at or below a starting
        point for which the expression may reach `-delete` (`_find_reaches`), each a deletion checked
        like `rm`'s. Or why they cannot be told before it runs: a starting point or working directory
        known only then, symlinks followed (-L, -follow), more starting points read from a file, an
        expression this does not read, too many files."""
        if "L" in follows or "-follow" in expression:
            return "it follows symlinks (-L, -follow), so which files it reaches is known only when it runs"
        if "-files0-from" in expression:
            return "it reads more starting points from a file"
        if isinstance(cwd, Unknown) or any(isinstance(s, Unknown) for s in starts):
            return "a starting point is known only when it runs"
        parsed = _find_expression(expression)
        if isinstance(parsed, _Unreadable):
            return f"its expression has {parsed}, which coherent-volume does not read"
        deleted: list[str] = []
        for start in map(str, starts):
            found = self._find_files(os.path.join(str(cwd), start), start, "H" in follows)
            if found is None:
                return f"it may delete more than {_MOST_EXPANDED} files"
            deleted += [path for path, shown, kind in found if _find_reaches(parsed, shown, kind)[1]]
        if "-prune" in expression and any(_in_registry(path) for path in deleted):
            return (
                "-prune leaves no directory out of a find that deletes (-delete turns on -depth, with which -prune "
                "does nothing; GNU find refuses to run the two together), so it may delete files of a volume's "
                f"registry ({REGISTRY_DIR})"
            )
        return deleted

    def _find_files(self, path: str, shown: str, follow: bool) -> list[tuple[str, str, str]] | None:
        """Every entry but a directory at or below find's starting point `path` (given as `shown`),
        as (path, the path as find names it, its type letter as `-type` tests it); symlinks are not
        followed, but a starting point's with `follow` (-H). None for more than _MOST_EXPANDED."""
        try:
            st = os.stat(path) if follow else os.lstat(path)
        except OSError:
            return []  # nothing there (or nothing find may read): nothing it deletes
        if not stat.S_ISDIR(st.st_mode):
            return [(path, shown, _type_letter(st.st_mode))]
        found: list[tuple[str, str, str]] = []
        for directory, dirs, names in os.walk(path):
            self.tick(len(dirs) + len(names) + 1)
            for name in names + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
                entry = os.path.join(directory, name)
                found.append(
                    (entry, shown.rstrip("/") + entry[len(path.rstrip("/")) :], _type_letter(os.lstat(entry).st_mode))
                )
            if len(found) > _MOST_EXPANDED:
                return None
        return found

    def _parallel(self, args: list[Item], cwd: Cwd) -> None:
        items = list(args)
        for _ in _options(items, _PARALLEL_VALUED):  # its own options: only passed over
            pass
        end = next((j for j, a in enumerate(items) if isinstance(a, str) and a.startswith(":::")), len(items))
        source = Unknown("parallel", "the operands parallel reads", _place(cwd))
        self._run_with(items[:end], source, "{", cwd)

    def _run_with(self, command: list[Item], source: Unknown, marker: str | None, cwd: Cwd) -> None:
        """Recognise `command` run with operands from elsewhere (`source`): where a word holds
        `marker`, or appended."""
        if marker is not None and any(isinstance(a, str) and marker in a for a in command):
            # a word that is more than the marker may be anything
            shapeless = dataclasses.replace(source, shape=None)
            command = [
                (source if a == marker else shapeless) if isinstance(a, str) and marker in a else a for a in command
            ]
        else:
            command = [*command, source]
        self.simple(command, cwd)

    # ---- unknown writes -------------------------------------------------------------

    def refused(self, unknown: Unknown, volumes: set[str]) -> str | None:
        """The root of the volume an unknown write may land in: the volume its place lies in, unless
        no file it may reach there is managed (`_unmanaged`); or one of `volumes` (those the command
        names) at or below its place (anywhere, if it may be any path)."""
        found = located_directory(unknown.place)
        if found is not None:
            return None if self._unmanaged(unknown, found) else found.root
        place = os.path.realpath(unknown.place)
        if (unknown.volumes_below or self.from_start(unknown)) and (root := _volume_below(place)) is not None:
            if root != place:
                return root
            here = located_directory(self.start)  # too much to search: the volume it runs in, if any
            return here.root if here is not None else min(volumes, default=place)
        below = [v for v in sorted(volumes) if unknown.anywhere or v == place or v.startswith(place.rstrip("/") + "/")]
        return below[0] if below else None

    def from_start(self, unknown: Unknown) -> bool:
        """Whether `unknown` is placed in the directory the command starts in, where that is known
        only when it runs (`elsewhere`): then it may lie anywhere below that place, a volume there
        too, however the word reached it (`$PWD`, `~+`, `/proc/self/cwd`, `cd -`, a pattern, find's
        starting point, each of which makes a new unknown of it)."""
        if self.elsewhere is None or not unknown.place:
            return False
        return os.path.realpath(unknown.place) == os.path.realpath(self.elsewhere.place)

    def _unmanaged(self, unknown: Unknown, found: Located) -> bool:
        """Whether no file an unknown write in a volume may reach is managed, as far as can be told
        before the command runs: no path of its shape below its place (resolved as the kernel will,
        and as written) may match the volume's globs (`ManagedGlobs.may_match`; the registry's own
        directory counts as managed), and no entry such a path may name or pass through is now a
        symlink (which may lead to a managed file), a mount point or another volume's root."""
        if unknown.shape is None:
            return False
        real = os.path.realpath(unknown.place)
        top = real[: len(real) - len(found.rel) - 1] if found.rel else real
        named = os.path.normpath(unknown.place)
        rels = {found.rel, *([named[len(top) + 1 :]] if named.startswith(top + "/") else [])}
        globs = self._globs(found.root)
        if globs is None or any(globs.may_match((*([f"{rel}/"] if rel else []), *unknown.shape)) for rel in rels):
            return False
        try:
            return self._plain(real, unknown.shape)
        except _TooMuch:
            return False

    def _globs(self, root: str) -> ManagedGlobs | None:
        """The managed globs of the volume at `root`, and its registry's directory; None if they
        cannot be read."""
        if root not in self.globs:
            try:
                core = open_core(root)
                try:
                    managed = core.paths.globs.patterns
                finally:
                    core.close()
                self.globs[root] = ManagedGlobs.of((*managed, REGISTRY_DIR, f"{REGISTRY_DIR}/**"))
            except (CoherenceError, OSError):
                self.globs[root] = None
        return self.globs[root]

    def _plain(self, directory: str, shape: tuple[Piece, ...]) -> bool:
        """Whether no entry a path of `shape` below `directory` may name or pass through is now a
        symlink, a mount point or a volume's root (reading entries within the walk's bounds)."""
        text = "".join(glob.escape(p) if isinstance(p, str) else "\0" if p is Wild.DIRS else "*" for p in shape)
        levels = [None if part == "\0" else part for part in text.split("/") if part not in ("", ".")]
        try:
            device = os.stat(directory).st_dev
        except OSError:
            return True  # nothing there yet
        frontier = [directory]
        for level in levels:  # a pattern of one segment, or None for any number of directories
            reached: list[str] = []
            todo = list(frontier)
            while todo:
                current = todo.pop()
                if level is None:
                    reached.append(current)
                for entry in self._scan(current):
                    if level is not None and not fnmatch.fnmatchcase(entry.name, level):
                        continue
                    if entry.is_symlink():
                        return False
                    if entry.is_dir(follow_symlinks=False):
                        if entry.stat(follow_symlinks=False).st_dev != device or recorded_in(
                            os.path.join(entry.path, REGISTRY_DIR)
                        ):
                            return False
                        (todo if level is None else reached).append(entry.path)
            frontier = reached
        return True

    def _scan(self, directory: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            return []
        self.tick(len(entries) + 1)
        return entries


_GIT_VALUED = _names("-C -c --git-dir --work-tree --namespace --config-env --super-prefix --exec-path --attr-source")
"""git's own options (before its command) that take a value."""
_GIT_CLEAN_VALUED = _names("-e --exclude")
_GIT_STASH_VALUED = _names("-m --message --pathspec-from-file")
_GIT_ADVICE = (
    "List what it would remove with `git clean -n` (same options), then remove the files you mean by name; "
    "or limit it to a directory that holds no managed file (`git clean -fd build/`). With -x, `-e .coherent` "
    "keeps the registry (with -X nothing does); `git stash` without -u or -a leaves untracked files alone."
)


def _code_word(item: Item) -> str:
    return item.word if isinstance(item, Unknown) else item


def _git_removes(command: str, args: list[Item], cwd: Cwd) -> list[Item]:
    """The directories below which `git COMMAND ARGS` removes files git does not track (a set known
    only when it runs): `clean`'s pathspecs (else the working directory), unless `-n`; the top of the
    work tree for `stash` with `-u`, `-a` (a pathspec too may be its top, `:/`: fail closed)."""
    if command == "clean":
        operands, _ = _operands(args, _GIT_CLEAN_VALUED)
        given = _given(args, _GIT_CLEAN_VALUED)
        if _gives(given, "-n --dry-run"):
            return []
        return [o if isinstance(o, Unknown) or not o.startswith(":") else "/" for o in operands] or ["."]
    if command != "stash":
        return []
    rest = list(args)
    if rest[:1] in (["push"], ["save"]):
        rest.pop(0)
    elif rest and not _is_option(rest[0]):
        return []  # list, show, pop, apply, drop, …: they remove no untracked file
    given = _given(rest, _GIT_STASH_VALUED)
    untracked = {"-u", "-a"} & given or any(
        _abbreviates(g, "--include-untracked") or _abbreviates(g, "--all") for g in given
    )
    if not untracked and not any(isinstance(a, Unknown) for a in rest):
        return []
    return [_git_top(cwd)]


def _git_top(cwd: Cwd) -> str:
    """The top of the work tree `cwd` lies in (the nearest directory up with a `.git`), or `/`."""
    if isinstance(cwd, Unknown):
        return "/"
    path = os.path.abspath(cwd)
    while not os.path.lexists(os.path.join(path, ".git")):
        if os.path.dirname(path) == path:
            return "/"
        path = os.path.dirname(path)
    return path


def _volume_below(place: str) -> str | None:
    """The root of a volume that lies below `place` (not following symlinks, passing over `.git`),
    or `place` itself when more than _MOST_VISITED entries lie there to tell; None for none."""
    todo, seen = [place], 0
    while todo:
        directory = todo.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            continue
        seen += len(entries) + 1
        if seen > _MOST_VISITED:
            return place
        for entry in entries:
            if entry.name == REGISTRY_DIR and recorded_in(entry.path):
                return directory
            if entry.name != ".git" and entry.is_dir(follow_symlinks=False):
                todo.append(entry.path)
    return None


_STATEMENTS = frozenset(
    {
        "command",
        "redirected_statement",
        "variable_assignment",
        "variable_assignments",
        "declaration_command",
        "unset_command",
        "test_command",
        "pipeline",
        "for_statement",
        "c_style_for_statement",
        "case_statement",
        "function_definition",
    }
)
"""Statements that run something of their own in the shell: a command, an assignment, a test, the
words a `for` or `case` expands, a function's definition (in POSIX mode one named as a special
builtin ends the shell). A list, a group, a branch or a loop's body only runs the statements in
it; a subshell's run in a child."""


def _marks(node: tree_sitter.Node) -> bool:
    """Whether statement `node`, run in the command's own shell, leaves a `wait` after it none of the
    jobs started before it (`_Walk.between`): one of `_STATEMENTS` or an arithmetic command `((…))`,
    but not a `wait` nor `NAME=$!`."""
    arithmetic = node.type == "compound_statement" and node.children[:1] != [] and node.children[0].type == "(("
    if not (node.type in _STATEMENTS or arithmetic) or _waits(node):
        return False
    value = node.child_by_field_name("value") if node.type == "variable_assignment" else None
    return value is None or _text(value) not in _BANG


def _waits(node: tree_sitter.Node) -> bool:
    """Whether statement `node` is a bare `wait` (`builtin wait` too): no prefix assignment, no
    redirection, here-document or here-string (bash expands those first, and an expansion that fails
    ends the shell before it waits), operands that are words or plain expansions."""
    if node.type != "command" or not node.named_children or node.named_children[0].type != "command_name":
        return False
    if any(child.type not in _WAIT_WORDS for child in node.named_children[1:]):
        return False
    words = [_text(child) for child in node.named_children[:2]]
    return words[:1] == ["wait"] or words == ["builtin", "wait"]


_WAIT_WORDS = frozenset(
    {"word", "simple_expansion", "expansion", "string", "raw_string", "number", "command_substitution"}
)
"""What the operands of a bare `wait` (`_waits`) may be."""


def _plain(name: str) -> bool:
    """Whether variable `name` holds what was last assigned to it: not one the shell sets or reads
    specially (`_SHELL_SET`)."""
    return _SHELL_SET.fullmatch(name) is None


def _pattern(word: Chars) -> str | None:
    """The fnmatch pattern of a word with a pattern character, its quoted characters literal; None
    where a quoted character other than a letter, digit, `.` or `_` stands in a bracket expression
    (`[a\\]]`, `[\\*]`: fnmatch has no way to say those)."""
    out, start = [], -1  # the index in `word` of the `[` of the bracket expression under way
    for i, (c, q) in enumerate(word):
        if start < 0:
            if c == "[" and not q:
                start = i
            out.append(glob.escape(c) if q else c)
            continue
        if c == "]" and not q and i > _first_member(word, start):
            start = -1
        elif q and not (c.isalnum() or c in "._"):
            return None
        out.append(c)
    return "".join(out).replace("[^", "[!")


def _first_member(word: Chars, bracket: int) -> int:
    """The index of the first member of the bracket expression opened at `word[bracket]`: after an
    unquoted `!` or `^` that negates it (a `]` there is a member, not its end)."""
    after = bracket + 1
    return after + 1 if after < len(word) and word[after][0] in "!^" and not word[after][1] else after


def _untranslated(nodes: Sequence[tree_sitter.Node]) -> list[tree_sitter.Node]:
    """`nodes`, parts of one word, without the `$` of each `$"…"` among them (a string to translate:
    its text as written; tree-sitter reads it as a `$` and a string wherever it is not first)."""
    return [
        n
        for i, n in enumerate(nodes)
        if not (
            n.type == "$"
            and i + 1 < len(nodes)
            and nodes[i + 1].type == "string"
            and n.end_byte == nodes[i + 1].start_byte
        )
    ]


def _merged(words: list[tree_sitter.Node], source: bytes) -> list[list[tree_sitter.Node]]:
    """Words tree-sitter split that bash reads as one (nothing but line continuations between them)."""
    merged: list[list[tree_sitter.Node]] = []
    for w in words:
        if merged and source[merged[-1][-1].end_byte : w.start_byte].replace(b"\\\n", b"") == b"":
            merged[-1].append(w)
        else:
            merged.append([w])
    return merged


def _clause(children: list[tree_sitter.Node]) -> tuple[list[tree_sitter.Node], list[tree_sitter.Node]]:
    """The condition and the body of an `if` or `elif` clause."""
    condition: list[tree_sitter.Node] = []
    body: list[tree_sitter.Node] = []
    part = condition
    for child in children:
        if child.type == "then":
            part = body
        elif child.is_named and child.type not in ("elif_clause", "else_clause"):
            part.append(child)
    return condition, body


def _splits(node: tree_sitter.Node, ifs: bool) -> bool:
    """Whether an expansion in the word `node` may split it into several words: an unquoted one (but
    one of digits, an arithmetic expansion or `$$`, `$?`, `$#`, `${#v}`, unless the command names
    `ifs`), or one of all the elements of an array or all the positional parameters (`"${a[@]}"`,
    `"$@"`)."""
    stack = [(node, False)]
    while stack:
        current, quoted = stack.pop()
        if current.type in _EXPANDS:
            text = _text(current)
            every = current.type in ("simple_expansion", "expansion") and re.search(r"[@*]", text)
            digits = current.type == "arithmetic_expansion" or re.fullmatch(r"\$[$?#]|\$\{#\w+\}", text)
            if not quoted and (ifs or not digits) or every:
                return True
            continue  # what it holds is its own
        stack.extend((child, quoted or current.type == "string") for child in current.children)
    return False


def _may_begin(item: Item, text: str) -> bool:
    """Whether the word `item` may be, or be split into, a word that begins with `text`."""
    if isinstance(item, str):
        return item.startswith(text)
    return item.lead is None or item.lead.startswith(text) or text.startswith(item.lead)


def _place(cwd: Cwd) -> str:
    return cwd.place if isinstance(cwd, Unknown) else cwd


def _literal_end(spelled: Spelled) -> int:
    """Where the literal part of a word ends: at its first pattern character, brace or part known
    only when it runs (the word's length if it has none)."""
    return next(
        (i for i, c in enumerate(spelled) if isinstance(c, Wild) or (not c[1] and (c[0] in _GLOB or c[0] == "{"))),
        len(spelled),
    )


def _pattern_place(spelled: Spelled, cwd: Cwd) -> tuple[str, bool, bool]:
    """Where a word that is a pattern (or has a part known only when it runs) may lead, for an
    Unknown of it: the directory its literal part names before its first pattern character, brace
    or unknown part (from `cwd`); whether it may be any path (a `..` after that, or no literal part
    where `cwd` is itself unknown and may be anywhere); and whether it may reach directories below
    that one (a `/` after it: a volume there may be reached, `Unknown.volumes_below`)."""
    cut = _literal_end(spelled)
    prefix = "".join(c[0] for c in spelled[:cut] if not isinstance(c, Wild))
    rest = "".join(c[0] if not isinstance(c, Wild) else "\0" for c in spelled[cut:])
    anywhere = bool(re.search(r"(?:^|/)\.\.(?:/|$)", rest))
    deeper = "/" in rest
    directory = prefix.rpartition("/")[0] if "/" in prefix else ""
    if prefix.startswith("/"):
        return directory or "/", anywhere, deeper
    base = _place(cwd)
    anywhere = anywhere or (isinstance(cwd, Unknown) and cwd.anywhere)
    return (os.path.join(base, directory) if directory else base), anywhere, deeper


def _tree(cwd: Cwd, start: Item) -> tuple[str, tuple[Piece, ...] | None]:
    """The place and the shape of a find's starting point and everything below it."""
    if isinstance(start, Unknown):
        tree = start.below("/", Wild.DIRS)
    elif isinstance(cwd, Unknown) and not start.startswith("/"):
        tree = cwd.below("/", start, "/", Wild.DIRS)
    else:
        return os.path.join(str(cwd), start), (Wild.DIRS,)
    return tree.place, tree.shape


_FIND_ONE = _names(
    "-name -iname -path -ipath -wholename -iwholename -lname -ilname -regex -iregex -type -xtype -newer -anewer "
    "-cnewer -perm -size -user -group -uid -gid -links -inum -mtime -atime -ctime -mmin -amin -cmin -used -samefile "
    "-fstype -context -maxdepth -mindepth -regextype -printf -fprint -fprint0 -fls -files0-from"
)
"""find's primaries that take one argument (besides `-newerXY`)."""
_FIND_NONE = _names(
    "-delete -print -print0 -ls -prune -quit -true -false -empty -executable -readable -writable -nouser -nogroup "
    "-depth -d -xdev -mount -noleaf -ignore_readdir_race -noignore_readdir_race -daystart -follow -warn -nowarn "
    "-help -version"
)
"""find's primaries that take none."""
_FIND_TRUE = _names(
    "-print -print0 -ls -fprint -fprint0 -fls -printf -fprintf -prune -quit -true -depth -d -xdev -mount -noleaf "
    "-ignore_readdir_race -noignore_readdir_race -daystart -warn -nowarn -maxdepth -mindepth -regextype -help -version"
)
"""find's options and actions that are true for every file (`-quit` and `-help` end it: taken as going on)."""


@dataclass(frozen=True)
class _FindNode:
    """A find expression: `-a`, `-o`, `,` or `!` of its operands ("and", "or", ",", "not"), or a
    primary with its arguments."""

    name: str
    operands: tuple[_FindNode, ...] = ()
    arguments: tuple[Item, ...] = ()


def _find_expression(items: list[Item]) -> _FindNode | _Unreadable:
    """find's expression `items` as a tree (`-a` binds closer than `-o`, which binds closer than
    `,`), or what in it this cannot read (an unknown primary, an expansion where a primary stands,
    an unbalanced parenthesis)."""
    at = 0

    def peek() -> Item | None:
        return items[at] if at < len(items) else None

    def joined(name: str, operators: tuple[str, ...], operand: Callable[[], _FindNode]) -> _FindNode:
        """Operands joined by one of `operators`, left to right, as `name`."""
        nonlocal at
        node = operand()
        while peek() in operators:
            at += 1
            node = _FindNode(name, (node, operand()))
        return node

    def listed() -> _FindNode:
        return joined(",", (",",), alternatives)

    def alternatives() -> _FindNode:
        return joined("or", ("-o", "-or"), conjunction)

    def conjunction() -> _FindNode:
        nonlocal at
        node = unary()
        while peek() is not None and peek() not in ("-o", "-or", ",", ")"):
            at += 1 if peek() in ("-a", "-and") else 0
            node = _FindNode("and", (node, unary()))
        return node

    def unary() -> _FindNode:
        nonlocal at
        token = peek()
        if token in ("!", "-not"):
            at += 1
            return _FindNode("not", (unary(),))
        if token == "(":
            at += 1
            node = listed()
            if peek() != ")":
                raise _Unreadable("an unbalanced `(`")
            at += 1
            return node
        return primary()

    def primary() -> _FindNode:
        nonlocal at
        token = peek()
        if not isinstance(token, str):
            if token is None:
                raise _Unreadable("a missing test")
            raise _Unreadable("an expansion where a test or action stands", token)
        at += 1
        if token in _FIND_NONE:
            return _FindNode(token)
        if token in ("-exec", "-execdir", "-ok", "-okdir"):
            end = next((j for j in range(at, len(items)) if items[j] in (";", "+")), len(items))
            arguments, at = items[at:end], end + 1
            return _FindNode(token, arguments=tuple(arguments))
        count = (
            1 if token in _FIND_ONE or re.fullmatch(r"-newer[aBcm][aBcmt]", token) else 2 if token == "-fprintf" else 0
        )
        if not count or at + count > len(items):
            raise _Unreadable(f"`{token}`")
        arguments, at = items[at : at + count], at + count
        return _FindNode(token, arguments=tuple(arguments))

    try:
        node = listed()
        if peek() is not None:
            token = peek()
            raise _Unreadable(f"`{token}`") if isinstance(token, str) else _Unreadable("an expansion", token)
    except _Unreadable as e:
        return e
    return node


def _find_altering(starts: list[Item], expression: list[Item]) -> Unknown | None:
    """The first word of find's command line known only when it runs that may change what find does:
    a starting point that may begin with `-`, `(` or `!` (find reads it as its expression then), a
    word of the expression that may be split into several, one that stands where a test, an action
    or an operator stands, or one in the command of an `-exec` that may end it (`;`, `+`) before
    words find would then read as its expression."""
    for start in starts:
        if isinstance(start, Unknown) and any(_may_begin(start, c) for c in "-(!"):
            return start
    for word in expression:
        if isinstance(word, Unknown) and word.lead is None:
            return word
    parsed = _find_expression(expression)
    if isinstance(parsed, _Unreadable) and parsed.expansion is not None:
        return parsed.expansion
    for i, word in enumerate(expression):
        if word not in ("-exec", "-execdir", "-ok", "-okdir"):
            continue
        end = next((j for j in range(i + 1, len(expression)) if expression[j] in (";", "+")), len(expression))
        command = expression[i + 1 : end]
        for k, arg in enumerate(command):
            if not isinstance(arg, Unknown) or not (_may_begin(arg, ";") or _may_begin(arg, "+")):
                continue
            if any(_is_option(b) or b in ("(", "!", ",") for b in command[k + 1 :]):
                return arg
    return None


class _Unreadable(Exception):
    """What in a find expression `_find_expression` cannot read (as the model is told), and the word
    known only when find runs that stands where a test, an action or an operator does, if that is it."""

    def __init__(self, what: str, expansion: Unknown | None = None) -> None:
        super().__init__(what)
        self.expansion = expansion


def _find_reaches(node: _FindNode, path: str, kind: str) -> tuple[bool | None, bool]:
    """The value of find's expression `node` for the file find names `path` (a `-type` letter
    `kind`), None where it is known only when find runs (a time, a size, an owner, a pattern
    fnmatch may not match as find does), and whether it may evaluate `-delete` for it: an operand
    of `-a` after a false one, or of `-o` after a true one, is not evaluated."""
    name, operands = node.name, node.operands
    if name in ("and", "or"):
        value, deletes = _find_reaches(operands[0], path, kind)
        if value is (name == "or"):
            return value, deletes
        other, also = _find_reaches(operands[1], path, kind)
        both = (value, other)
        if name == "and":
            return (False if False in both else True if both == (True, True) else None), deletes or also
        return (True if True in both else False if both == (False, False) else None), deletes or also
    if name == ",":
        (_, deletes), (value, also) = (_find_reaches(n, path, kind) for n in operands)
        return value, deletes or also
    if name == "not":
        value, deletes = _find_reaches(operands[0], path, kind)
        return (None if value is None else not value), deletes
    if name == "-delete":
        return None, True  # false where it fails
    return _find_test(name, node.arguments, path, kind), False


def _find_test(name: str, arguments: tuple[Item, ...], path: str, kind: str) -> bool | None:
    """The value of one of find's primaries (not `-delete`) for a file (`_find_reaches`)."""
    if name in _FIND_TRUE:
        return True
    if name == "-false":
        return False
    argument = arguments[0] if arguments else None
    if not isinstance(argument, str):
        return None
    if name == "-type":
        letters = argument.split(",")
        return kind in letters if all(len(c) == 1 and c in "bcdpflsD" for c in letters) else None
    if (
        name not in ("-name", "-iname", "-path", "-ipath", "-wholename", "-iwholename")
        or "[" in argument
        or "\\" in argument
    ):
        return None  # a test of what only the file system knows, or a pattern fnmatch may read otherwise
    subject = os.path.basename(path.rstrip("/")) if name in ("-name", "-iname") else path
    if not (subject.isascii() and argument.isascii()):
        return None  # what `?` matches, and which letters fold, is the locale's
    if name in ("-iname", "-ipath", "-iwholename"):
        subject, argument = subject.lower(), argument.lower()
    return fnmatch.fnmatchcase(subject, argument)


def _in_registry(path: str) -> bool:
    """Whether `path` (absolute) lies in a volume's registry directory."""
    parts = path.split("/")
    return any(part == REGISTRY_DIR and recorded_in("/".join(parts[: i + 1])) for i, part in enumerate(parts))


def _type_letter(mode: int) -> str:
    """A file's type as find's `-type` names it."""
    for test, letter in ((stat.S_ISREG, "f"), (stat.S_ISLNK, "l"), (stat.S_ISDIR, "d"), (stat.S_ISFIFO, "p")):
        if test(mode):
            return letter
    return "s" if stat.S_ISSOCK(mode) else "b" if stat.S_ISBLK(mode) else "c"


def _appended(name: str) -> bool:
    """Whether an append to the relative path `name` in a directory known only when the command runs
    goes ahead (`_Walk.write`): where it has no `..` and names nothing a volume's registry directory
    may hold (that directory, its database, a lock, its staging directory), so wherever the command
    runs it appends to a file no one else's view is lost in, not to the registry."""
    if name.startswith("/") or not name:
        return False
    parts = [part for part in name.split("/") if part not in ("", ".")]
    registry = (REGISTRY_DIR, STAGING, "..")
    return bool(parts) and not any(
        part in registry or part.startswith(DB_FILE) or part.endswith(".lock") for part in parts
    )


def _placed(item: Item, cwd: Cwd) -> Item:
    """The path `item` names from `cwd`: absolute, or known only when the command runs."""
    if isinstance(item, Unknown):
        return item
    if item.startswith("/"):
        return item
    if isinstance(cwd, Unknown):
        why = f"a path relative to the directory after `{cwd.word}`: {cwd.why}"
        return dataclasses.replace(cwd.below("/", item), word=item, why=why)
    return os.path.join(cwd, item)


_PROC = re.compile(r"/proc/(self|thread-self|\d+)(?:/task/\d+)?/(cwd|root)(?=/|$)")


def _unproc(placed: Item, cwd: Cwd) -> Item:
    """`placed` with a leading /proc/self/cwd (or /proc/self/root) read as the directory it names for
    the command: its working directory (the root). Through another process's (/proc/PID/…, or a
    /proc path known only when it runs) it may be any path (refused in a volume)."""
    if isinstance(placed, Unknown):
        if placed.place == "/proc" or placed.place.startswith("/proc/"):
            why = f"a path through /proc, which may lead to any directory: {placed.why}"
            return Unknown(placed.word, why, _place(cwd), anywhere=True)
        return placed
    plain = re.sub(r"/(?:\.?/)+", "/", placed)  # `//` and `/./` name what `/` does
    match = _PROC.match(plain)
    if match is None:
        return placed
    if match.group(1) not in ("self", "thread-self"):
        why = "a path through a process's directory in /proc, which may be any directory"
        return Unknown(placed, why, _place(cwd), anywhere=True)
    rest = plain[match.end() :].lstrip("/")
    return "/" + rest if match.group(2) == "root" else _placed(rest or ".", cwd)


_DESCRIPTOR = re.compile(
    r"/+dev/+(?:std(?:in|out|err)|fd/+\d+)|/+proc/+(?:self|thread-self|\d+)(?:/+task/+\d+)?/+fd/+\d+"
)
"""A name of one of the command's open descriptors (`> /dev/stderr`): a write there goes where a
redirection of the command (which is recognised) or the agent opened it, not to a name."""


_READ_REDIRECTION = re.compile(r"(?<![\w<>&$])(\d*)<(?![<>&(])")
"""A redirection opening a descriptor to read a file (`<f`, `3<f`, `exec 3< f`): not `<<`, `<>`,
`<&`, nor a process substitution."""


def _descriptor_number(path: str) -> int | None:
    """The descriptor a descriptor's own name (`_DESCRIPTOR`) stands for, None for another path."""
    if not _DESCRIPTOR.fullmatch(path):
        return None
    named = {"stdin": 0, "stdout": 1, "stderr": 2}
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return named[last] if last in named else int(last)


def _own_process(placed: Item, cwd: Cwd) -> Item:
    """`placed`, unless it leads through the /proc entry of the process that opens it however it is
    spelled (`hook_paths.through_own_process`: a symlink to /proc/self, `/dev/fd/../cwd`, a pattern
    bash expands in its own /proc/self/task): then it may be any path. A descriptor's own name
    (`_DESCRIPTOR`) is left as it is."""
    if isinstance(placed, Unknown) or _DESCRIPTOR.fullmatch(placed) or not through_own_process(placed):
        return placed
    why = "a path through the /proc entry of the process that opens it, which may lead to any directory"
    return Unknown(placed, why, _place(cwd), anywhere=True)


def _proc_word(word: Chars, cwd: Cwd) -> Chars | Unknown:
    """A word (before pattern matching) that begins with /proc/self/cwd or /proc/self/root, with
    that part read as the command's working directory (the root), as `_unproc` does: this process's
    /proc/self is not the command's."""
    text = "".join(c for c, _ in word)
    found = _unproc(text, cwd) if text.startswith("/") else text
    if found == text:
        return word
    raw = re.match(r"/+proc/+(?:self|thread-self)(?:/+task/+\d+)?/+(cwd|root)(?=/|$)", text)
    if isinstance(found, Unknown) or raw is None or raw.group(1) == "cwd" and isinstance(cwd, Unknown):
        why = "a path through /proc that may lead to any directory"
        return found if isinstance(found, Unknown) else Unknown(text, why, _place(cwd), anywhere=True)
    return (_chars(str(cwd), True) if raw.group(1) == "cwd" else []) + (word[raw.end() :] or _chars("/", True))


def _entered(path: str, physical: bool) -> str | None:
    """The directory bash's `cd` enters for `path` (its PWD joined with the directory named), as its
    PWD then; None if it cannot enter one. Physically (`cd -P`), `path` as the kernel resolves it,
    symlinks resolved in the PWD too. Logically, `path` as text (`_logical`), where that is a
    directory; else (a name before a `..` that is no directory, or no directory there) `path` as the
    kernel resolves it, as bash tries next."""
    logical = None if physical else _logical(path)
    if logical is not None and os.path.isdir(logical) and os.access(logical, os.X_OK):
        return logical
    return os.path.realpath(path) if os.path.isdir(path) and os.access(path, os.X_OK) else None


def _logical(path: str) -> str | None:
    """The absolute `path` as bash's logical `cd` makes it its PWD (`sh_canonpath`): empty names and
    `.` dropped, each `..` taking away the name before it as text, not as the kernel would after a
    symlink; None where a name before a `..` is no directory (symlinks followed)."""
    names: list[str] = []
    for name in path.split("/"):
        if name == "..":
            if names and not os.path.isdir("/" + "/".join(names)):
                return None
            del names[-1:]
        elif name not in ("", "."):
            names.append(name)
    return "/" + "/".join(names)


def _joined(cwd: Cwd, path: str) -> Cwd:
    if path.startswith("/"):
        return path
    if isinstance(cwd, Unknown):
        return cwd
    return os.path.join(cwd, path)


def _unknown_cwd(state: State, word: str, why: str) -> Unknown:
    known = [c for c in state if isinstance(c, str)]
    return Unknown(word, why, sorted(known)[0] if known else _place(next(iter(state))))


def _shell_script(args: list[Item]) -> Item | None:
    """The script of `sh -c SCRIPT` (its options before it), or None for a script file or stdin."""
    command = False
    items = list(args)
    while items and isinstance(items[0], str) and items[0][:1] in "-+" and items[0] != "-":
        arg = str(items.pop(0))
        if arg == "--":
            break
        if arg in ("--rcfile", "--init-file") and items:
            items.pop(0)
        elif not arg.startswith("--"):
            command = command or arg[0] == "-" and "c" in arg
            if ("o" in arg[1:] or "O" in arg[1:]) and items:  # `-eo pipefail`: the option's name
                items.pop(0)
    return items[0] if command and items else None


_BACKSLASHED_DELIMITER = re.compile(r"(?<!<)(<<-?)(?!<)\\((?:\\?[^\s;&|<>()'\"\\])+)")
"""A here-document whose delimiter starts with a backslash (`<<\\EOF`): bash ends it at the line
`EOF`, where tree-sitter-bash looks for `\\EOF` and reads the commands between as data."""


def _quoted_delimiter(match: re.Match[str]) -> str:
    """`<<\\EOF` written as `<<'EOF'`, which bash reads alike (a quoted delimiter, its body not
    expanded) and tree-sitter-bash ends where bash does."""
    return f"{match.group(1)}'{match.group(2).replace(chr(92), '')}'"


def _backquoted(code: str) -> str:
    """The code of a `…` substitution as bash runs it: within backquotes a backslash quotes only
    `$`, a backquote and a backslash (so a nested `\\`…\\`` is a substitution of its own)."""
    return re.sub(r"\\([$`\\])", r"\1", code)


def _body_substitutions(body: str) -> list[str]:
    """The code of each command substitution bash runs in the body of an unquoted here-document,
    `…` and $(…) wherever they stand on a line (a backslash-escaped one is text)."""
    found: list[str] = []
    i = 0
    while i < len(body):
        if body[i] == "\\":
            i += 2
        elif body[i] == "`":
            end = i + 1
            while end < len(body) and body[end] != "`":
                end += 2 if body[end] == "\\" else 1
            found.append(_backquoted(body[i + 1 : end]))
            i = end + 1
        elif body.startswith("$(", i) and not body.startswith("$((", i):
            depth, end = 1, i + 2
            while end < len(body) and depth:
                if body[end] == "\\":
                    end += 1
                else:
                    depth += {"(": 1, ")": -1}.get(body[end], 0)
                end += 1
            found.append(body[i + 2 : end - 1])
            i = end
        else:
            i += 1
    return found


def _descriptor_of(node: tree_sitter.Node, following: Sequence[tree_sitter.Node]) -> bool:
    """Whether `node` is a number written against the redirection after it (`0<`, `3>`): the
    descriptor it redirects, which tree-sitter-bash may read as a word of the command."""
    return (
        node.type == "number"
        and bool(following)
        and following[0].type in ("file_redirect", "heredoc_redirect", "herestring_redirect")
        and following[0].start_byte == node.end_byte
    )


def _shell_file(args: list[Item]) -> Item | None:
    """The script file a shell runs (its first word after its options), or None for none."""
    items = list(args)
    while items and isinstance(items[0], str) and items[0][:1] in "-+" and items[0] != "-":
        arg = str(items.pop(0))
        if arg == "--":
            break
        if arg in ("--rcfile", "--init-file") or not arg.startswith("--") and ("o" in arg[1:] or "O" in arg[1:]):
            del items[:1]  # its value: the file, or the option's name (`-eo pipefail`)
    return items[0] if items else None


_INPUT = re.compile(r"/dev/stdin|/dev/fd/\d+|/proc/(?:self|thread-self|\d+)(?:/task/\d+)?/fd/\d+")
"""Names of a script file that read it from a descriptor: the shell's input, a pipe (`<(…)`, `/dev/fd/63`);
also `-`, which a shell takes for the end of its options."""


def _from_input(script: Item | None, cwd: Cwd) -> bool:
    """Whether the script file `script` is read from a descriptor (`_INPUT`: `bash /dev/stdin`,
    `source /dev/fd/0`), whose script is known only when it runs, as `bash <<EOF` reads its input."""
    if not isinstance(script, str):
        return False
    named = re.sub(r"^/+", "/", os.path.normpath(os.path.join(_place(cwd), script)))  # (`//dev/stdin` too)
    return script == "-" or _INPUT.fullmatch(named) is not None


def _shell_altering(args: list[Item]) -> Unknown | None:
    """A word of a shell's command line known only when it runs, before its script or script file,
    that may be an option: one that may be split into several words, or that may begin with `-` or
    `+` and has a word after it (`bash "$o" 'rm f'` is `bash -c 'rm f'` when $o is `-c`)."""
    items = list(args)
    while items:
        arg = items.pop(0)
        if isinstance(arg, Unknown):
            option = _may_begin(arg, "-") or _may_begin(arg, "+")
            return arg if arg.lead is None or option and bool(items) else None
        if arg == "--" or arg[:1] not in "-+" or arg == "-":
            return None  # the script file, or what is read as it: what follows are its arguments
        if arg in ("--rcfile", "--init-file") and items:
            items.pop(0)
        elif not arg.startswith("--") and ("o" in arg[1:] or "O" in arg[1:]) and items:
            items.pop(0)  # `-o pipefail`: the option's name
    return None


def _errors(root: tree_sitter.Node) -> str | None:
    """The text of the first part tree-sitter could not parse (but `<>`, which it lacks), or None."""
    if not root.has_error:
        return None
    stack = [root]
    while stack:
        node = stack.pop()
        if node.type == "ERROR" or node.is_missing:
            if node.type == "ERROR" and _text(node) == ">" and node.parent and node.parent.type == "file_redirect":
                continue
            return _text(node)[:80] or "(a missing token)"
        stack.extend(c for c in node.children if c.has_error or c.is_missing or c.type == "ERROR")
    return None


def _into(dest: Item, sources: list[Item], cwd: Cwd, directory: bool) -> list[Item]:
    """Where `sources` land when copied or moved to `dest`: into it when it is a `directory` (`-t`)
    or an existing one, else as it."""
    if isinstance(dest, Unknown):
        return [dest]
    where = _joined(cwd, dest)
    if directory or isinstance(where, str) and os.path.isdir(where):
        place = where if isinstance(where, str) else where.place
        return [
            os.path.join(dest, os.path.basename(s.rstrip("/"))) if isinstance(s, str) else Unknown(s.word, s.why, place)
            for s in sources
        ]
    return [dest]


_PROGRAM_ADVICE = (
    "Write the program literally in the command, its options too (a file it reads may stay an expansion), or make "
    "the change with your file-editing tool."
)
_OPTION_ADVICE = (
    "Name the file and the command's options literally in the command (past `--` a word is no option), or make the "
    "change with your file-editing tool."
)
_COPIERS = _names("-t --target-directory -S --suffix -m --mode -o --owner -g --group")
_CURL_VALUED = _names(
    "-A -b -c -C -d -D -e -E -F -H -K -m -o -P -Q -r -T -t -u -U -w -x -X -y -Y -z --output --cookie-jar "
    "--dump-header --trace --trace-ascii --stderr --etag-save --libcurl --hsts --alt-svc --output-dir --config "
    "--user-agent --cookie --continue-at --data --data-binary --data-raw --data-urlencode --referer --cert --form "
    "--header --max-time --ftp-port --quote --range --upload-file --telnet-option --user --proxy-user --write-out "
    "--proxy --request --speed-limit --speed-time --time-cond --connect-timeout --retry --url --json"
)
_CURL_FILES = _names(
    "-o --output -c --cookie-jar -D --dump-header --trace --trace-ascii --stderr --etag-save --libcurl --hsts --alt-svc"
)
"""curl's options that name a file it writes (`--hsts` and `--alt-svc` caches are read and written)."""
_CURL_OUTPUT = _names("-o --output")
"""Those of them that name where it saves what it fetches (below `--output-dir`)."""
_WGET_VALUED = _names(
    "-o --output-file -a --append-output -e --execute -i --input-file -B --base -t --tries -O --output-document "
    "-T --timeout -w --wait -Q --quota -P --directory-prefix -U --user-agent -l --level -A --accept -R --reject "
    "-D --domains -I --include-directories -X --exclude-directories --save-cookies --load-cookies --header "
    "--user --password --post-data --post-file --warc-file --rejected-log --config"
)
_PACKERS = {
    "gzip": (".gz", ".z", "-gz", "-z", "_z"),
    "pigz": (".gz", ".z", "-gz", "-z", "_z"),
    "bzip2": (".bz2", ".bz"),
    "xz": (".xz", ".lzma"),
    "lzma": (".lzma",),
    "zstd": (".zst",),
}
"""Compressors that replace a file by its packed copy (`FILE` by `FILE.gz`), and back with `-d`: the
suffixes each unpacks (the first is the one it packs to)."""
_UNPACKERS = {"gunzip": "gzip", "unpigz": "pigz", "bunzip2": "bzip2", "unxz": "xz", "unlzma": "lzma", "unzstd": "zstd"}
_PACKER_VALUED = _names(
    "-S --suffix -o -D -T -F --format -C --check -M --memlimit --memory --threads --block-size -b -p --processes "
    "--output-dir-flat --output-dir-mirror"
)
_VALUED: dict[str, frozenset[str]] = {
    "tee": frozenset(),
    "sed": _SED_VALUED,
    "perl": _PERL_VALUED,
    "ruby": _PERL_VALUED,
    "sort": _SORT_VALUED,
    "uniq": _names("-f -s -w --skip-fields --skip-chars --check-chars"),
    "rm": frozenset(),
    "unlink": frozenset(),
    "shred": _names("-n --iterations -s --size --random-source"),
    "mv": _COPIERS,
    "cp": _COPIERS,
    "install": _COPIERS,
    "ln": _COPIERS,
    "link": frozenset(),
    "truncate": _names("-s --size -r --reference"),
    "dd": frozenset(),
    **dict.fromkeys(_UNPACKERS, _PACKER_VALUED),
    "shuf": _names("-o --output -n --head-count -i --input-range --random-source"),
    "iconv": _names("-f --from-code -t --to-code -o --output"),
    "sponge": frozenset(),
    "xxd": frozenset(),
    "openssl": frozenset(),
    "curl": _CURL_VALUED,
    "wget": _WGET_VALUED,
    "split": _names(
        "-a --suffix-length --additional-suffix -b --bytes -C --line-bytes -l --lines -n --number -t --separator "
        "--filter"
    ),
    "csplit": _names("-b --suffix-format -f --prefix -n --digits"),
    **dict.fromkeys(_PACKERS, _PACKER_VALUED),
}
"""The commands `_command_writes` knows, each with its options that take a value."""
_OUTPUTS = {"shuf": _names("-o --output"), "iconv": _names("-o --output")}
"""Commands that write the file an option of theirs names."""


@dataclass
class _Effect:
    """What one command `_command_writes` knows does to files."""

    writes: list[tuple[Item, HandleKind, bool]]
    """(path as given, how, whether a directory there stands for the files below it)."""
    linked: list[tuple[Item, Follow]]
    """The two ends of each hard link it makes (a directory stands for the files below it, found
    following symlinks as the second says)."""


def _command_writes(name: str, args: list[Item], cwd: Cwd) -> _Effect:
    """What one simple command (wrappers and redirections aside) writes, and the hard links it makes.
    A word known only when it runs that may change which files it writes (`_altering`), or a sed or
    awk program known only then, may make it write any file."""
    if name in _AWKS:  # what any awk it may be writes
        return _Effect([(f, "write", False) for awk in _AWKS[name] for f in _awk_writes(name, awk, args, cwd)], [])
    valued = _VALUED[name]
    files: list[Item] = []
    landed: list[Item] = []  # where copies, moves and links land: a directory there stands for its files
    removed: list[Item] = []
    linked: list[tuple[Item, Follow]] = []
    kind: HandleKind = "write"
    flags = [a for a in args if isinstance(a, str) and a.startswith("-")]
    given = _given(args, valued)
    altering = None if name == "dd" else _altering(args, valued)
    if altering is not None:
        files.append(_altered(name, altering, cwd))
    if name == "tee":
        files += _operands(args, valued)[0]
        if any(_abbreviates(a, "--append") or a[1] != "-" and "a" in a for a in flags if len(a) > 1):
            kind = "append"
    elif name == "sed":
        operands, values, programs = _program(args, valued, ("-e", "--expression"), ("-f", "--file"))
        in_place = any(re.match(r"-[nrEsuz]*i", a) or _abbreviates(a, "--in-place") for a in flags)
        files += [*operands] if in_place else []
        files += _sed_writes(args, valued, programs, cwd)
    elif name in ("perl", "ruby"):
        files += _edited_in_place(args, _PERL_SWITCHES if name == "perl" else _RUBY_SWITCHES)
    elif name == "sort":
        _, values = _operands(args, valued)
        files += [values[o] for o in ("-o", "--output") if o in values]
    elif name == "uniq":
        operands, _ = _operands(args, valued)
        files += operands[1:2]
    elif name == "shred":  # it overwrites what a symlink leads to before it removes the name
        removed, _ = _operands(args, valued)
    elif name in ("rm", "unlink"):
        removed = [f for f in _operands(args, valued)[0] if not _symlink(f, cwd)]
    elif name in ("mv", "cp", "install", "ln"):
        operands, values = _operands(args, valued)
        target_dir = values.get("-t") or values.get("--target-directory")
        if name == "ln" and target_dir is None and len(operands) == 1:
            target_dir = "."  # `ln -s TARGET`: a link of its name here
        sources = operands if target_dir else operands[:-1]
        if any(_abbreviates(a, "--no-target-directory") or re.match(r"-[^-]*T", a) for a in flags):
            landed = (
                operands[-1:] if sources else []
            )  # `-T`: the destination is the copy itself, never a directory to copy into
        elif sources and name == "cp" and any(_abbreviates(g, "--parents") for g in given if len(g) > 3):
            dest = target_dir if target_dir is not None else operands[-1]  # DEST/SOURCE, each as written
            landed = [
                f"{dest.rstrip('/')}/{source}" if isinstance(source, str) and isinstance(dest, str) else dest
                for source in sources
            ]
        elif sources:
            landed = _into(target_dir if target_dir is not None else operands[-1], sources, cwd, target_dir is not None)
        if name == "mv":
            removed = [f for f in sources if not _symlink(f, cwd)]  # a move deletes its sources
        symbolic = "-s" in given or any(_abbreviates(g, "--symbolic") for g in given)
        if symbolic:  # a link into a process's own /proc entry: what is written through it may be any file
            why = "a symlink into the /proc entry of the process that opens it, which may lead to any directory"
            files += [
                Unknown(t, why, _place(cwd), anywhere=True)
                for t in sources
                if isinstance(t, str) and through_own_process(os.path.join(_place(cwd), t))
            ]
        hard = (
            name == "ln" and not symbolic or name == "cp" and any(g == "-l" or _abbreviates(g, "--link") for g in given)
        )
        follow = _cp_follows(args) if name == "cp" else "none"
        linked = [*((s, follow) for s in sources), *((d, "none") for d in landed)] if hard else []
    elif name == "link":
        operands, _ = _operands(args, valued)
        landed = operands[1:2]
        linked = [(o, "none") for o in operands[:2]]
    elif name == "truncate":
        operands, _ = _operands(args, valued)
        files += operands
    elif name in _OUTPUTS:
        _, values = _operands(args, valued)
        files += [values[o] for o in _OUTPUTS[name] if o in values]
    elif name == "sponge":  # it soaks up its input, then writes (or with -a appends to) its file
        files += _operands(args, valued)[0][:1]
        kind = "append" if "-a" in given else "write"
    elif name == "xxd":
        files += _xxd_output(args)
    elif name == "openssl":
        files += _openssl_outputs(args, cwd)
    elif name == "curl":
        files += _curl_writes(args, given, cwd)
    elif name == "wget":
        files += _wget_writes(args, given, cwd)
    elif name in ("split", "csplit"):
        files.append(_split_pieces(name, args, valued, given, cwd))
    elif name in _PACKERS or name in _UNPACKERS:
        packed, removed = _packer_writes(name, args, valued, given, cwd)
        files += packed
    elif name == "dd":  # its operands are `NAME=VALUE`: one known only when it runs may be `of=FILE`
        files += [a[3:] for a in args if isinstance(a, str) and a.startswith("of=")]
        why = "an operand of dd known only when it runs, which may be `of=FILE`"
        files += [
            Unknown(a.word, why, _place(cwd), anywhere=True)
            for a in args
            if isinstance(a, Unknown) and _may_begin(a, "of=")
        ]
    writes = [(f, kind, False) for f in files] + [(f, "write", True) for f in landed + removed]
    return _Effect(writes, linked)


def _edited_in_place(args: list[Item], switches: _Switches) -> list[Item]:
    """The files perl or ruby (read with `switches`) edits in place: its file operands when `-i` stands
    among its switches where it reads one, in any cluster (`-0777pi`, `-gpi`); else none."""
    rest, in_place, program = list(args), False, False
    while rest and isinstance(rest[0], str) and rest[0].startswith("-") and rest[0] != "-":
        word = str(rest.pop(0))
        if word == "--":
            break
        letter, takes_next = _switch_cluster(word, switches) if not word.startswith("--") else ("", False)
        in_place = in_place or letter == "i"
        program = program or bool(letter) and letter in switches.program
        if takes_next and rest:
            rest.pop(0)
    return (rest if program else rest[1:]) if in_place else []


def _switch_cluster(word: str, switches: _Switches) -> tuple[str, bool]:
    """The letter of the switch cluster `word` that takes the rest of it as its value ("" for none),
    and whether that value is the next word instead (nothing follows the letter)."""
    i = 1
    while i < len(word):
        letter = word[i]
        i += 1
        if letter in switches.digits:
            hexadecimal = letter == "0" and word[i : i + 1] == "x"
            i += 1 if hexadecimal else 0
            while i < len(word) and word[i] in ("0123456789abcdefABCDEF" if hexadecimal else "01234567"):
                i += 1
        elif letter in switches.next_word or letter in switches.rest:
            return letter, letter in switches.next_word and i == len(word)
    return "", False


def _values(args: list[Item], valued: frozenset[str], names: Collection[str]) -> list[Item]:
    """Every value given to the options `names` (not only the last), in order."""
    return [v for _, opts in _split(args, valued)[0] for n, v in opts or () if n in names and v is not None]


def _xxd_output(args: list[Item]) -> list[Item]:
    """The file `xxd [OPTIONS] [IN [OUT]]` writes, in either direction: OUT. Its options come first,
    each taking a value attached (`-c8`) or as the next word (`-c 8`, `-cols 8`), as xxd reads them."""
    rest = list(args)
    while rest and _is_option(rest[0]):
        word = str(rest.pop(0))
        if word == "--":
            break
        flag = word[2:] if word.startswith("--") else word[1:]
        long = _XXD_VALUED.get(flag[:1])
        if long is not None and (flag == flag[:1] or flag.startswith(long) and len(long) > 1) and rest:
            rest.pop(0)  # `-c 8`, `-cols 8`; `-c8` holds its value
    out = rest[1:2]
    return [o for o in out if o != "-"]


_XXD_VALUED = {"c": "cols", "g": "groupsize", "l": "len", "o": "offset", "s": "seek", "n": "name", "R": "R"}
"""xxd's options that take a value, by their letter: the long name they may be spelled as."""


def _gives(given: set[str], names: str) -> bool:
    """Whether a command is given any option of `names` (a long one also by a prefix of it, as
    getopt_long and curl take one)."""
    wanted = _names(names)
    return any(g in wanted or any(n.startswith("--") and _abbreviates(g, n) for n in wanted) for g in given)


def _openssl_outputs(args: list[Item], cwd: Cwd) -> list[Item]:
    """The files an `openssl` command writes: the value of each option whose name ends in `out`
    (`-out`, `-keyout`, `-sess_out`, …; `-passout` and `-timeout` take no file), of `-writerand`,
    `-keylogfile`, `-msgfile` and `-signer` (which a verification writes), and any file in the
    directory `-outdir` names; given as the next word or after `=`, with one dash or two, as
    OpenSSL reads them. (Options that only read a file are taken as writing it where they share
    these names: a check more, never one less.)"""
    out: list[Item] = []
    for i, word in enumerate(args):
        if not isinstance(word, str) or not word.startswith("-"):
            continue
        name, eq, value = word.lstrip("-").partition("=")
        given: list[Item] = [value] if eq else args[i + 1 : i + 2]
        if name == "outdir":
            why = "the files openssl writes in the directory -outdir names, under names known only when it runs"
            out += [
                Unknown("openssl -outdir", why, _place(_placed(d, cwd) if isinstance(d, str) else d)) for d in given
            ]
        elif name.endswith("out") and name not in ("passout", "timeout") or name in _OPENSSL_FILES:
            out += given
    return [o for o in out if o != "-"]


_OPENSSL_FILES = ("writerand", "keylogfile", "msgfile", "signer")


def _curl_writes(args: list[Item], given: set[str], cwd: Cwd) -> list[Item]:
    """What curl writes: the files its options name (`_CURL_FILES`; `-o` below `--output-dir`, a
    `#N` in it filled from the URL's glob when it runs), for `-O` each URL's last segment there, and
    for an upload (`-T`) to a `file://` URL that file; a name the server gives (`-J`), or options a
    config file gives (`-K`), are known only when it runs."""
    operands, values = _operands(args, _CURL_VALUED)
    directory = values.get("--output-dir")
    place = cwd if directory is None else _joined(cwd, directory) if isinstance(directory, str) else directory
    named = "the name of the file curl saves, which a URL, its glob or the server gives when it runs"
    out = [f for f in _values(args, _CURL_VALUED, _CURL_FILES - _CURL_OUTPUT) if f != "-"]
    for f in _values(args, _CURL_VALUED, _CURL_OUTPUT):
        where = _placed(f, place) if f != "-" else None
        if isinstance(where, str) and re.search(r"#\d", where):  # filled from the URL's glob when it runs
            out.append(Unknown(f"curl -o {f}", named, os.path.dirname(where), shape=(Wild.NAME,)))
        elif where is not None:
            out.append(where)
    urls = [*operands, *_values(args, _CURL_VALUED, ("--url",))]
    if _gives(given, "-K --config"):
        why = "the options a curl config file gives, which may name any file it writes"
        out.append(Unknown("curl -K", why, _place(cwd), anywhere=True))
    if _gives(given, "-T --upload-file"):  # a file:// URL is a file it writes
        for url in urls:
            if isinstance(url, Unknown) or url.lower().startswith("file:"):
                path = url if isinstance(url, Unknown) else urllib.parse.unquote(urllib.parse.urlsplit(url).path)
                if isinstance(path, str) and path.endswith("/"):
                    out.append(Unknown(f"curl -T {url}", named, path, shape=(Wild.NAME,)))
                else:
                    out.append(path)
    if _gives(given, "-O --remote-name --remote-name-all"):
        for url in urls:
            name = url.split("?")[0].split("#")[0].rstrip("/").rpartition("/")[2] if isinstance(url, str) else None
            if name is None or _gives(given, "-J --remote-header-name") or any(c in name for c in "{[]}"):
                out.append(Unknown("curl -O", named, _place(place), shape=(Wild.NAME,)))
            elif name not in ("", ".", ".."):
                out.append(_placed(name, place))
    return out


def _wget_writes(args: list[Item], given: set[str], cwd: Cwd) -> list[Item]:
    """What wget writes: the files its options name (`-O`, its log, cookies, a WARC file), or,
    without `-O`, when it may overwrite a file it saves under the URL's name (`-N`, `-c`, `-r`,
    `-m`, `-p`; by default it saves under a new name, `NAME.1`), any file below its directory; a
    `-e` command (a wgetrc line) may name any file."""
    out = [
        f
        for f in _values(args, _WGET_VALUED, _names("-O --output-document -o --output-file -a --append-output"))
        if f != "-"
    ]
    out += _values(args, _WGET_VALUED, _names("--save-cookies --rejected-log"))
    out += [w + ".warc.gz" if isinstance(w, str) else w for w in _values(args, _WGET_VALUED, ("--warc-file",))]
    if _gives(given, "-e --execute --config"):
        why = "a wgetrc command or file wget reads, which may name any file it writes"
        out.append(Unknown("wget -e", why, _place(cwd), anywhere=True))
    overwrites = "-N --timestamping -c --continue -r --recursive -m --mirror -p --page-requisites"
    if not _gives(given, "-O --output-document --spider") and _gives(given, overwrites):
        prefix = _values(args, _WGET_VALUED, _names("-P --directory-prefix"))[-1:]
        place = _joined(cwd, prefix[0]) if prefix and isinstance(prefix[0], str) else cwd
        why = "the files wget saves under names the URLs and the server give, overwriting those there"
        out.append(Unknown("wget", why, _place(place)))
    return out


def _split_pieces(name: str, args: list[Item], valued: frozenset[str], given: set[str], cwd: Cwd) -> Item:
    """The files `split` or `csplit` writes: its prefix (split's second operand, csplit's `-f`;
    `x`, `xx` by default) and a suffix, letters or digits, overwriting those there; a `--filter`
    command (which split runs on each part) may write any file."""
    operands, values = _operands(args, valued)
    if name == "split" and _gives(given, "--filter"):
        why = "a command split runs on each part (--filter), which may write any file"
        return Unknown("split --filter", why, _place(cwd), anywhere=True, advice=_PROGRAM_ADVICE)
    if name == "split":
        prefix = (operands[1:2] or ["x"])[0]
        numbered = _gives(given, "-d --numeric-suffixes")
        suffix: Piece = Wild.NUMBER if numbered else Wild.NAME if _gives(given, "-x --hex-suffixes") else Wild.LETTERS
        extra = values.get("--additional-suffix", "")
    else:
        prefix = values.get("-f") or values.get("--prefix") or "xx"
        suffix, extra = (Wild.NAME if _gives(given, "-b --suffix-format") else Wild.NUMBER), ""
    where = _placed(prefix, cwd)
    if isinstance(where, Unknown) or isinstance(extra, Unknown):
        return dataclasses.replace(where, shape=None) if isinstance(where, Unknown) else where
    head, tail = os.path.split(where)
    why = f"the files {name} writes, numbered after their prefix"
    return Unknown(f"{name} {prefix}", why, head, shape=(tail, suffix, extra))


def _packer_writes(
    name: str, args: list[Item], valued: frozenset[str], given: set[str], cwd: Cwd
) -> tuple[list[Item], list[Item]]:
    """The files a compressor writes and those it removes (each directory with `-r` standing for
    every file below it, which it packs or unpacks in place): each FILE replaced by FILE.gz (its
    suffix, or `-S`'s), or unpacked back (`-d`, `gunzip`, …) from a name with a suffix it knows (a
    `.tgz`-like one gives `.tar`), under the name its header holds with `-N` (known only when it
    runs); none to standard output (`-c`), in a test or a listing; FILE kept with `-k` (zstd keeps
    it unless `--rm`); zstd's `-o FILE` names the one file it writes, `--output-dir-flat DIR` and
    `--output-dir-mirror DIR` the directory."""
    family = _UNPACKERS.get(name, name)
    operands, values = _operands(args, valued)
    if _gives(given, "-c --stdout --to-stdout -t --test -l --list") or not operands:
        return [], []
    unpack = name in _UNPACKERS or _gives(given, "-d --decompress --uncompress")
    if _gives(given, "-r --recursive"):
        return [], list(operands)  # every file below each one, packed or unpacked where it is
    keep = _gives(given, "-k --keep") or family == "zstd" and not _gives(given, "--rm")
    custom = values.get("-S") or values.get("--suffix")
    suffixes = (custom, *_PACKERS[family]) if isinstance(custom, str) else _PACKERS[family]
    flat, mirror = values.get("--output-dir-flat"), values.get("--output-dir-mirror")
    written: list[Item] = []
    for file in operands:
        if isinstance(file, Unknown):
            written.append(file)
        elif unpack and _gives(given, "-N --name"):
            why = "the name a packed file's header holds, which gunzip -N restores"
            written.append(
                Unknown(f"{name} -N {file}", why, _place(_joined(cwd, os.path.dirname(file))), shape=(Wild.NAME,))
            )
        elif not unpack:
            written.append(file + suffixes[0])
        else:
            tar = [file[: -len(t)] + ".tar" for t in _TAR_SUFFIXES if file.endswith(t) and len(file) > len(t)]
            written += (tar or [file[: -len(s)] for s in suffixes if file.endswith(s) and len(file) > len(s)])[:1]
    if family == "zstd" and isinstance(values.get("-o"), str):
        written = [values["-o"]]
    elif isinstance(flat, str):
        written = [os.path.join(flat, os.path.basename(w)) if isinstance(w, str) else w for w in written]
    elif isinstance(mirror, str):
        written = [os.path.join(mirror, w) if isinstance(w, str) else w for w in written]
    elif isinstance(flat, Unknown) or isinstance(mirror, Unknown):
        written = [d.below("/", Wild.NAME) for d in (flat, mirror) if isinstance(d, Unknown)]
    return written, [] if keep else list(operands)


_TAR_SUFFIXES = (".tgz", ".taz", ".tbz2", ".tbz", ".txz", ".tlz", ".tzst")
"""Suffixes of packed tar files, which unpack to `.tar`."""


def _altered(name: str, altering: Unknown, cwd: Cwd) -> Unknown:
    """The write of any file that a word of the command `name` known only when it runs may make it
    do (`_altering`)."""
    why = f"a word of {name} known only when it runs, which may be an option that makes it write any file"
    advice = _PROGRAM_ADVICE if name in ("sed", "perl", "ruby", *_AWKS) else _OPTION_ADVICE
    written = altering.lead is not None  # a word of its command line, not one xargs or find passes
    return Unknown(altering.word, why, _place(cwd), anywhere=True, advice=advice if written else None)


def _awk_writes(name: str, awk: _Awk, args: list[Item], cwd: Cwd) -> list[Item]:
    """The files the command `name` writes, read as the awk `awk`: gawk's files edited in place (`-i
    inplace`) and those its options write (`_GAWK_OUTPUTS`), and the files its program's `print >
    FILE` names (`_awk_program`); any file, for a word known only when it runs that may be an
    option, or a program known only then."""
    before, after = _split(args, awk.valued)
    options = [(n, v) for _, given in before for n, v in given or ()]
    words = [_altering(args, awk.valued)]
    if awk.gawk:  # `-W NAME[=VALUE]` is `--NAME[=VALUE]`: one known only when it runs may be any option
        words += [v for n, v in options if n == "-W" and isinstance(v, Unknown)]
        options = [
            o
            for n, v in options
            for o in (_option(f"--{v}", [], awk.valued) if n == "-W" and isinstance(v, str) else [(n, v)])
        ]
    files: list[Item] = [_altered(name, w, cwd) for w in words if w is not None]
    operands = [w for w, given in before if given is None] + after
    programs: list[Item] = [v for n, v in options if n in awk.texts and v is not None]
    read = [_program_file(v, cwd, "awk") for n, v in options if n in awk.files and v is not None]
    if not programs and not read:
        programs, operands = operands[:1], operands[1:]
    programs += read
    if awk.gawk:
        included = [v for n, v in options if n in ("-i", "--include")]
        if any(isinstance(v, Unknown) or v in ("inplace", "inplace.awk") for v in included):
            files += [f for f in operands if not (isinstance(f, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", f))]
        for n, v in options:
            default = next((f for o, f in _GAWK_OUTPUTS.items() if n == o or _abbreviates(n, o)), None)
            files += [] if default is None else [default if v is None else v]
    return files + [f for program in programs for f in _awk_program(program, cwd)]


def _awk_program(program: Item, cwd: Cwd) -> list[Item]:
    """The files an awk program's `print … > FILE` names; any file for one known only when it runs,
    or one that runs commands (`print | CMD`, `CMD | getline`, `system()`), through a shell."""
    if isinstance(program, Unknown):
        why = "an awk program known only when it runs, whose `print >` may write any file"
        return [Unknown(program.word, why, _place(cwd), anywhere=True, advice=_PROGRAM_ADVICE)]
    files: list[Item] = []
    outputs = _awk_outputs(program)
    if re.search(r"\bsystem\s*\(|\|\s*&?\s*getline\b", program) or any(op == "|" for op, _ in outputs):
        why = "an awk program that runs commands (`print | CMD`, `CMD | getline`, `system()`) through a shell"
        files.append(Unknown(program, why, _place(cwd), anywhere=True, advice=_COMMANDS_ADVICE))
    for op, target in outputs:
        literal = re.fullmatch(r'"([^"\\]*)"', target)
        if op != "|":
            files.append(literal[1] if literal else Unknown(target, "a file named in an awk program", _place(cwd)))
    return files


def _awk_outputs(program: str) -> list[tuple[str, str]]:
    """Each redirection of a `print`/`printf` statement of an awk program: its operator (`>`, `>>`,
    `|`) and the text of the expression after it, to the statement's end. Read as awk does: strings,
    regular expression literals and comments are skipped; a `>` inside parentheses is a comparison;
    a statement ends at `;`, `}` or a newline not after a comma, `{`, `&&` or `||` (a backslash-newline
    joins lines)."""
    text, i, last = program.replace("\\\n", " "), 0, ""
    found: list[tuple[str, str]] = []
    while i < len(text):
        c = text[i]
        if c == '"' or (c == "/" and (not last or last in "(,~!{};&|\n=<>+-*%^?:")):
            i = _awk_skip(text, i, c)
            last = "x"
        elif c == "#":
            i = text.find("\n", i) if "\n" in text[i:] else len(text)
        elif re.match(r"printf?\b", text[i:]) and not re.match(r"\w", text[i - 1 : i] or " "):
            i = _awk_statement(text, i + (6 if text.startswith("printf", i) else 5), found)
            last = ";"
        else:
            last = c if not c.isspace() or c == "\n" else last
            i += 1
    return found


def _awk_skip(text: str, i: int, quote: str) -> int:
    """The index after the string or regular expression literal opened by `quote` at `i`."""
    i += 1
    while i < len(text) and text[i] != quote:
        i += 2 if text[i] == "\\" else 1
    return i + 1


def _awk_statement(text: str, i: int, found: list[tuple[str, str]]) -> int:
    """Scan a print statement's arguments from `i`, noting its redirection in `found`; the index of its end."""
    depth, last, redirect = 0, "", None
    while i < len(text):
        c = text[i]
        if c == '"' or (c == "/" and last in ("", "(", ",", "~", "!", ">", "|")):
            i, last = _awk_skip(text, i, c), "x"
            continue
        if depth == 0 and (c in ";}" or (c == "\n" and last not in (",", "{", "&", "|"))):
            break
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0 and c in ">|" and redirect is None:
            op = ">>" if text.startswith(">>", i) else c
            redirect = (op, i + len(op))
            i += len(op)
            last = c
            continue
        last = c if not c.isspace() else last
        i += 1
    if redirect is not None:
        found.append((redirect[0], text[redirect[1] : i].strip()))
    return i


_SED_SIMPLE = frozenset("=dDgGhHnNpPxzF")
"""sed's commands that take no argument."""
_SED_SPECIAL = ("/dev/stdout", "/dev/stderr")
"""Names GNU sed's `w` takes for its own output streams, opening no file."""
_MOST_SCRIPT = 100_000
"""Bytes of a sed script file (`sed -f FILE`) read at most (longer: a program known only when it runs)."""
_COMMANDS_ADVICE = "Run those commands as commands of their own, or make the change with your file-editing tool."


class _SedError(Exception):
    """A sed script GNU sed would not accept (or that this reads otherwise than it may)."""


class _SedScript:
    """A sed script read as GNU sed compiles it: the files its `w`/`W` commands and `s///w` flags
    write (`written`), and whether it runs shell commands (`runs`: the `e` command, the `s///e` flag).
    Where GNU sed may read the script another way, this reads it so as to find more, never less."""

    def __init__(self, text: str) -> None:
        self.text, self.i = text, 0
        self.written: list[str] = []
        self.runs = False
        depth = 0
        while self._skip(" \t\n\r\v\f;") or self.i < len(text):
            if self._peek() == "#":
                self._line()
                continue
            addressed = self._addresses()
            command = self._take()
            if command == "{":
                depth += 1
            elif command == "}":
                depth -= 1
                if depth < 0 or addressed:
                    raise _SedError("unexpected `}`")
                self._end()
            else:
                self._command(command, addressed)
        if depth:
            raise _SedError("unmatched `{`")

    def _peek(self) -> str:
        """The next character ("" at the end)."""
        return self.text[self.i : self.i + 1]

    def _take(self) -> str:
        """The next character, consumed ("" at the end)."""
        c = self._peek()
        self.i += len(c)
        return c

    def _skip(self, chars: str) -> bool:
        """Skip any of `chars`; always False (so it can lead a loop's condition)."""
        while self._peek() and self._peek() in chars:
            self.i += 1
        return False

    def _digits(self) -> str:
        """The decimal digits next, consumed."""
        start = self.i
        while self._peek().isdigit():
            self.i += 1
        return self.text[start : self.i]

    def _line(self) -> str:
        """The rest of the line, consumed with its newline; without it."""
        end = self.text.find("\n", self.i)
        end = len(self.text) if end < 0 else end
        line, self.i = self.text[self.i : end], end + 1
        return line

    def _addresses(self) -> bool:
        """Read a command's addresses (`A`, `A,B`, `A,+N`, `A,~N`) and `!`; whether it has any."""
        given = self._address()
        if given:
            self._skip(" \t")
            if self._peek() == ",":
                self.i += 1
                self._skip(" \t")
                if self._peek() in ("+", "~"):
                    self.i += 1
                    self._skip(" \t")
                    if not self._digits():
                        raise _SedError("a line count expected")
                elif not self._address():
                    raise _SedError("unexpected `,`")
        self._skip(" \t")
        if self._peek() == "!":
            self.i += 1
            self._skip(" \t")
            if self._peek() == "!":
                raise _SedError("multiple `!`s")
        return given

    def _address(self) -> bool:
        """Read one address (`N`, `FIRST~STEP`, `$`, `/RE/`, `\\cREc`, with `I`/`M`); whether there was one."""
        c = self._peek()
        if c.isdigit():
            self._digits()
            self._skip(" \t")
            if self._peek() == "~":
                self.i += 1
                self._skip(" \t")
                self._digits()
            return True
        if c == "$":
            self.i += 1
            return True
        if c not in ("/", "\\"):
            return False
        self.i += 1
        self._delimited(self._delimiter() if c == "\\" else "/")
        while not self._skip(" \t") and self._peek() in ("I", "M"):
            self.i += 1
        return True

    def _delimiter(self) -> str:
        """The character delimiting a regular expression (`\\cREc`, `s`, `y`), consumed."""
        c = self._take()
        if c in ("", "\n", "\\"):
            raise _SedError("a delimiter expected")
        return c

    def _delimited(self, delimiter: str) -> None:
        """Skip the text up to the unescaped `delimiter`, consumed; a newline may only be escaped."""
        while (c := self._take()) != delimiter:
            if c in ("", "\n") or c == "\\" and self._take() == "":
                raise _SedError(f"unterminated text before `{delimiter}`")

    def _end(self) -> None:
        """The end of a command: blanks, then `;` or a newline (consumed), `}`, `#` or the end."""
        self._skip(" \t")
        if self._peek() in ("", ";", "\n"):
            self.i += 1
        elif self._peek() not in ("}", "#"):
            raise _SedError("extra characters after a command")

    def _label(self) -> str:
        """The label of `:`, `b`, `t`, `T` or `v`, consumed: after blanks, up to a blank, `;`, `}` or `#`."""
        self._skip(" \t")
        start = self.i
        while self._peek() and self._peek() not in " \t\n\r;}#":
            self.i += 1
        return self.text[start : self.i]

    def _file(self) -> str:
        """The file name of `r`, `R`, `w`, `W` or `s///w`: the rest of the line, after blanks."""
        self._skip(" \t")
        name = self._line()
        if not name:
            raise _SedError("missing file name")
        return name

    def _text(self) -> None:
        """Skip the text of `a`, `i` or `c`: `\\` and a newline, or the one-line form, up to a newline
        no backslash escapes."""
        self._skip(" \t")
        if self._peek() == "\\":
            self.i += 1
            self._skip("\n" if self._peek() == "\n" else "")
        elif self._peek() in ("", "\n"):
            raise _SedError("expected \\ after `a`, `c` or `i`")
        while (c := self._take()) not in ("", "\n"):
            self.i += len(self._peek()) if c == "\\" else 0

    def _write(self, name: str) -> None:
        """Note a `w` file (but sed's own streams)."""
        self.written += [] if name in _SED_SPECIAL else [name]

    def _command(self, command: str, addressed: bool) -> None:
        """Read the command `command` after its addresses."""
        if command in _SED_SIMPLE:
            self._end()
        elif command == ":":
            if not self._label() or addressed:
                raise _SedError("`:` takes a label and no address")
            self._end()
        elif command in ("b", "t", "T", "v"):
            self._label()
            self._end()
        elif command in ("q", "Q", "l"):
            self._skip(" \t")
            self._digits()
            self._end()
        elif command in ("a", "i", "c"):
            self._text()
        elif command in ("r", "R"):
            self._file()
        elif command in ("w", "W"):
            self._write(self._file())
        elif command == "e":
            self.runs = True
            self._line()
        elif command == "y":
            delimiter = self._delimiter()
            self._delimited(delimiter)
            self._delimited(delimiter)
            self._end()
        elif command == "s":
            self._substitute()
        else:
            raise _SedError(f"unknown command `{command}`")

    def _substitute(self) -> None:
        """Read `s/RE/REPLACEMENT/FLAGS` after its `s`."""
        delimiter = self._delimiter()
        self._delimited(delimiter)
        self._delimited(delimiter)
        while not self._skip(" \t") and self._peek() and self._peek() in "gpiImMe0123456789":
            self.runs = self._take() == "e" or self.runs
        if self._peek() == "w":
            self.i += 1
            self._write(self._file())
        else:
            self._end()


def _sed_writes(args: list[Item], valued: frozenset[str], programs: list[Item], cwd: Cwd) -> list[Item]:
    """The files a sed command's script writes (`w FILE`, `W FILE`, `s///w FILE`): its `-e` texts and
    `-f` files in order, else its program operand, joined as sed joins them (`_SedScript`); any file
    for a script known only when it runs (an expansion, a file that cannot be read now), one that
    runs shell commands (`e`, `s///e`), or one GNU sed may not read as this does."""
    pieces = [(n, v) for n, v in _given_values(args, valued) if n in ("-e", "--expression", "-f", "--file")]
    texts: list[str] = []
    for name, value in pieces or [("-e", p) for p in programs]:
        text = value if name in ("-e", "--expression") else _program_file(value, cwd, "sed")
        if text is value and isinstance(value, Unknown):
            why = "a sed program known only when it runs, whose `w` command may write any file"
            return [Unknown(value.word, why, _place(cwd), anywhere=True, advice=_PROGRAM_ADVICE)]
        if isinstance(text, Unknown):
            return [text]
        texts.append(text)
    program = "\n".join(texts)
    try:
        script = _SedScript(program)
    except _SedError as error:
        why = f"a sed program this does not read as sed may ({error}), which may write any file"
        return [Unknown(program, why, _place(cwd), anywhere=True, advice=_PROGRAM_ADVICE)]
    files: list[Item] = list(script.written)
    if script.runs:
        why = "a sed program that runs commands (`e`, `s///e`) through a shell"
        files.append(Unknown(program, why, _place(cwd), anywhere=True, advice=_COMMANDS_ADVICE))
    return files


def _program_file(name: Item, cwd: Cwd, program: str) -> str | Unknown:
    """The text of the `program` (sed, awk) script file `name` (`-f`), when it is a regular file of at
    most `_MOST_SCRIPT` bytes now; else a program known only when it runs."""
    why = f"a {program} program read from a file that is not a regular file of known content now"
    unknown = Unknown(_code_word(name), why, _place(cwd), anywhere=True, advice=_PROGRAM_ADVICE)
    if isinstance(name, Unknown) or isinstance(cwd, Unknown):
        return unknown
    try:
        fd = os.open(os.path.join(cwd, name), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return unknown
    with os.fdopen(fd, "rb") as file:
        data = file.read(_MOST_SCRIPT + 1) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    return unknown if data is None or len(data) > _MOST_SCRIPT else data.decode("utf-8", "surrogateescape")


def _program_file_names(name: str, args: list[Item]) -> list[str]:
    """The program files (`-f`) sed, or any awk `name` may be, reads, as written."""
    if name == "sed":
        options = [(n, v) for n, v in _given_values(args, _VALUED["sed"]) if n in ("-f", "--file")]
    else:
        options = [(n, v) for awk in _AWKS.get(name, ()) for n, v in _given_values(args, awk.valued) if n in awk.files]
    return [v for _, v in options if isinstance(v, str)]


def _given_values(args: list[Item], valued: frozenset[str]) -> list[tuple[str, Item]]:
    """Each option given a value (before `--`), with it, in order."""
    return [(n, v) for _, given in _split(args, valued)[0] for n, v in given or () if v is not None]


def _cp_follows(args: list[Item]) -> Follow:
    """Which symlinks `cp` follows in what it copies, as its last option of -L, -H, -P (and those
    implying it: -d, -a) says; with -l and none of them, every one (as GNU cp does)."""
    follow: Follow = "all"
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            break
        for name, _ in _option(str(arg), rest, _COPIERS) if _is_option(arg) else []:
            if name == "-L" or _abbreviates(name, "--dereference"):
                follow = "all"
            elif name == "-H":
                follow = "top"
            elif name in ("-P", "-d", "-a") or any(_abbreviates(name, n) for n in ("--no-dereference", "--archive")):
                follow = "none"
    return follow


def _script_timing(args: list[Item]) -> list[Item]:
    """The file `script -tFILE` (`--timing=FILE`) writes its timing to: its value only attached (the
    option alone writes to standard error)."""
    files: list[Item] = []
    for arg in args:
        if arg == "--":
            break
        if not _is_option(arg):
            continue
        text = str(arg)
        name, eq, value = text.partition("=")
        if text.startswith("--"):
            files += [value] if eq and _abbreviates(name, "--timing") else []
            continue
        for i, c in enumerate(text[1:], 1):
            if f"-{c}" in _SCRIPT_VALUED:
                break
            if c == "t":
                files += [text[i + 1 :]] if text[i + 1 :] else []
                break
    return files


def _given(args: list[Item], valued: frozenset[str]) -> set[str]:
    """The names of the options a command is given (before `--`)."""
    return {name for _, given in _split(args, valued)[0] for name, _ in given or ()}


def _altering(args: list[Item], valued: frozenset[str]) -> Unknown | None:
    """The first word of a command `_command_writes` knows that is known only when it runs and may
    be an option, which may change which files the command writes: before `--`, one that may begin
    with `-` or be split into several words, but not the value of an option given as the next word."""
    before = _split(args, valued)[0]
    return next((w for w, given in before if isinstance(w, Unknown) and given is None and _may_begin(w, "-")), None)


def _symlink(item: Item, cwd: Cwd) -> bool:
    """Whether `item` is a symlink that removing or moving it acts on itself, as unlink(2) and
    rename(2) do, never on what it leads to: it writes no file of a volume (links carry no
    versions; `hook_paths.unlinks_link`)."""
    return isinstance(item, str) and isinstance(cwd, str) and unlinks_link(os.path.join(cwd, item))


def _program(
    args: list[Item], valued: frozenset[str], given: tuple[str, ...], files: tuple[str, ...]
) -> tuple[list[Item], dict[str, Item], list[Item]]:
    """The operands of sed, perl or awk past its program, its options' values, and its program's
    text (from the options `given`, else the first operand; none read from the options `files`)."""
    operands, values = _operands(args, valued)
    if not {*given, *files} & set(values) and operands:
        return operands[1:], values, operands[:1]
    return operands, values, _values(args, valued, given)  # every -e, not only the last


def _expand(path: str, walk: _Walk, follow: Follow = "none") -> list[str] | None:
    """The regular files at or below `path` (a directory a command removes, moves or links), a
    symlink followed where `follow` says (`_cp_follows`); None for more than _MOST_EXPANDED, or past
    the walk's bounds."""
    if not os.path.isdir(path) or os.path.islink(path) and follow == "none":
        return [path]
    found: list[str] = []
    for directory, dirs, names in os.walk(path, followlinks=follow == "all"):
        walk.tick(len(dirs) + len(names) + 1)
        found.extend(os.path.join(directory, n) for n in names)
        if len(found) > _MOST_EXPANDED:
            return None
    return found


_PATHLIKE = re.compile(r"[^\0\s'\"`;&|<>()=$*?\[{},]+")
"""The literal pieces of a command's text, up to a quote, expansion or pattern character: one
with a `/` may be a path."""


def _inherited_cdpath() -> list[str]:
    """The entries of the CDPATH the hook inherits (none if it is unset or empty)."""
    cdpath = os.environ.get("CDPATH", "")
    return cdpath.split(":") if cdpath else []


def _named_volumes(command: str, cwd: str) -> tuple[set[str], bool]:
    """The roots of the volumes the literal paths of `command` (all of it, however long) lie in:
    joined to `cwd`, and the text after a path's last `..` (which may climb from anywhere) also
    joined to `/` and to each of `cwd`'s ancestors; each entry of a `:`-separated list
    (`CDPATH=/a:/b`) too, and `~` and `$HOME` as the hook's HOME. And whether that is all of them:
    False where it names more than `_MOST_EXPANDED` such paths (the rest are not looked at)."""
    roots: set[str] = set()
    seen: set[str] = set()
    ancestors = [cwd]
    while os.path.dirname(ancestors[-1]) != ancestors[-1]:
        ancestors.append(os.path.dirname(ancestors[-1]))
    home = os.environ.get("HOME", "")
    if home.startswith("/"):  # (a command that may set HOME is refused anyway: `_SETS`)
        command = re.sub(r"\$(?:HOME\b|\{HOME\})|(?<![^\s=:'\"])~(?=[/:\s'\"]|$)", lambda _: home, command)
    text = re.sub(r"\$\{?[#!]?\w*", " ", command)  # a variable's name is no part of a path (its default may be)
    tokens = (match.group().lstrip(":-+=?#%") for match in _PATHLIKE.finditer(text))
    for token in (t for whole in tokens for t in dict.fromkeys([whole, *whole.split(":")]) if "/" in t):
        paths = [os.path.join(cwd, token)]
        if re.search(r"(?:^|/)\.\.(?:/|$)", token):
            tail = re.split(r"(?:^|/)\.\.(?:/|$)", token)[-1]
            paths += [os.path.join(a, tail) for a in ancestors]
        for path in paths:
            if path in seen:
                continue
            if len(seen) >= _MOST_EXPANDED:
                return roots, False
            seen.add(path)
            try:
                found = located_directory(path)  # the path itself may be a volume's root
            except PermissionError:  # one this user may not resolve (/proc/1/cwd): nor may its command
                continue
            if found is not None:
                roots.add(found.root)
    return roots, True


_PIPED_STARTUP = re.compile(
    r"(?<![\w$])(?:BASH_ENV|ENV)\s*=\s*(?:<\(|/+(?:dev/+(?:std|fd)|proc/))"
    r"|--(?:rcfile|init-file)(?:\s+|=)(?:<\(|/+(?:dev/+(?:std|fd)|proc/))"
)
"""A shell's startup file given as its input, a descriptor or a process substitution: `BASH_ENV=/dev/stdin`,
`env ENV=<(…)`, `--rcfile /proc/self/fd/0` (quotes and backslashes taken out first)."""
_ENVIRONMENT = frozenset({"HOME", "PWD", "CDPATH", "GLOBIGNORE"})
"""The variables a command that may set one of them is `untrusted` about (`_SETS`, `_Walk._note`)."""
_SETS = re.compile(
    r"(?<![\w$.{])(HOME|PWD|CDPATH|GLOBIGNORE|BASH_ENV|ENV|BASHOPTS)(?!\w)|\b(shopt|cdable_vars)\b|--(rcfile|init-file)\b"
)
"""A command that names HOME, PWD, CDPATH or GLOBIGNORE other than expanding it may set it, one
that runs `shopt` (or names `cdable_vars` or BASHOPTS, `bash -O`) may change how patterns match and
`cd` finds its directory, and one that gives a shell a startup file (BASH_ENV, ENV, `--rcfile`,
`--init-file`) may run anything in it: none of them is taken from the environment, nor is a pattern
matched. The walk notes names set by spellings this misses (`$'CDPATH'`, `{C,X}DPATH`: `_note`)."""


def volume_named(command: str, cwd: str) -> str | None:
    """The root of a volume a shell command run in `cwd` runs in, or names a literal path in (the
    first found): a command that may write there, before it is parsed. Where it names too many
    paths to tell (`_named_volumes`), the directory it runs in."""
    here = located_directory(os.path.join(os.getcwd(), cwd))
    if here is not None:
        return here.root
    roots, complete = _named_volumes(command, os.path.join(os.getcwd(), cwd))
    return min(roots, default=None if complete else os.path.join(os.getcwd(), cwd))


def _parses(command: str) -> bool:
    """Whether bash parses the whole of `command`: a syntax error ends a shell where it meets it,
    after the jobs started before it, and before any `wait` after it (`_Walk.waited`)."""
    try:
        return subprocess.run(["bash", "-n", "-c", command], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _followed(
    command: str,
    cwd: str,
    settled: tuple[dict[str, str], frozenset[str]] | None = None,
    deadline: float = 0.0,
    elsewhere: Unknown | None = None,
) -> tuple[_Walk, ShellWrites]:
    """One walk of `command` from `cwd` (taking the variables `settled` as known, within `deadline`
    if given; started in `elsewhere`, a directory known only when it runs, where given): the walk,
    and the files it found written with how (and which in the background)."""
    walk = _Walk(*settled) if settled else _Walk()
    walk.deadline = deadline or walk.deadline
    walk.start = cwd
    walk.elsewhere = elsewhere
    walk.untrusted = _SETS.search(re.sub(r"[\\'\"]", "", command)) is not None  # (`CD''PATH=`, `CD\\PATH=` too)
    walk.piped_startup = _PIPED_STARTUP.search(re.sub(r"[\\'\"]", "", command)) is not None
    walk.read_descriptors = {int(m.group(1) or 0) for m in _READ_REDIRECTION.finditer(command)}
    walk.redefined = _REDEFINES.search(command) is not None or any(
        name.startswith(("BASH_FUNC_date", "BASH_FUNC_mktemp")) for name in os.environ
    )
    walk.ifs = "IFS" in command
    tmp = os.environ.get("TMPDIR", "")
    walk.tmp = "" if "TMPDIR" in command else tmp if tmp.startswith("/") else "/tmp"
    kinds: dict[str, HandleKind] = {}
    background: set[str] = set()
    try:
        ok, fail = walk.walk(command, _started(cwd) if elsewhere is None else frozenset({elsewhere}))
        written = {path for path, *_ in walk.found}
        for path, at in walk.programs:  # read before the command (re)writes it: its text is not that one
            if path in written:
                why = "a program file (`-f`) the command itself writes before it runs it, read as it is now"
                walk.unknown.append(Unknown(path, why, _place(at), anywhere=True))
        walk.trapped(ok | fail)
        waited = walk.waited()
        waited = waited if not waited or _parses(command) else frozenset()
        for path, kind, expand, job in walk.found:
            files = _expand(path, walk) if expand else [path]
            if files is None:
                walk.unknown.append(Unknown(path, f"a directory of more than {_MOST_EXPANDED} files", path))
            for p in files or []:
                kinds[p] = "write" if "write" in (kind, kinds.get(p)) else kind  # truncated anywhere: a write
                background |= {p} if walk.coproc or job is not None and job not in waited else set()
        for path, follow in walk.ends:
            files = _expand(path, walk, follow)
            if files is None:
                walk.unknown.append(Unknown(path, f"a directory of more than {_MOST_EXPANDED} files", path))
            walk.linked += files or []
    except _TooMuch:
        why = f"a command that takes more than {_MOST_SECONDS:.0f} s or {_MOST_VISITED} directory entries to follow"
        walk.unknown.append(Unknown(command[:80], why, cwd, True))
    except (RecursionError, ValueError, OSError) as e:  # too deep, or a name the system cannot take
        walk.unknown.append(Unknown(command[:80], f"a command coherent-volume could not follow ({e})", cwd))
    return walk, ShellWrites(list(kinds.items()), frozenset(background))


def _started(cwd: str) -> State:
    """The directories a command run in `cwd` may start in, as its shell's PWD (what `cd ..` leaves
    and `$PWD` is): `cwd`, the PWD it is given, or, where bash keeps no such spelling of it (a symlink
    or `..` in it), the directory as the kernel resolves it, which bash takes when the PWD it
    inherits names another."""
    real = os.path.realpath(cwd)
    return frozenset({cwd, real}) if real != os.path.normpath(cwd) else frozenset({cwd})


def shell_writes(command: str, cwd: str, elsewhere: tuple[str, str, str] | None = None) -> ShellWrites:
    """The files a shell command run in `cwd` recognisably writes, each with how, and which of them
    it writes in the background (see the module's docstring); a directory removed or moved stands
    for the files below it. Paths are `cwd` joined with the words as bash expands them (`..` kept,
    but a `cd` enters a directory as bash does: `_Walk._cd`; a volume the inherited CDPATH names
    counts as one the command names). Raises UnresolvedShellWrite when a
    write's file is known only when the command runs and may be a managed file (`_Walk.refused`):
    when the first walk finds one, a second takes the variables it can as known (`_Walk.settled`).
    `elsewhere` (what names the directory, why, what to do instead): the command may start in a
    directory other than `cwd` that the hook cannot know (Codex's `workdir`), any directory at all:
    what it writes by a relative path (before a `cd` to an absolute directory) is known only when it
    runs, judged at `cwd`: refused where `cwd` is in a volume, or a volume lies at or below it (or
    too much does to tell), or the command names a path in a volume."""
    cwd = os.path.join(os.getcwd(), cwd)  # absolute, `..` kept
    start = None
    if elsewhere is not None:
        word, why, advice = elsewhere
        start = Unknown(word, why, cwd, anywhere=True, volumes_below=True, advice=advice)
    walk, found = _followed(command, cwd, elsewhere=start)
    inherited = " ".join(os.path.expanduser(d) for d in _inherited_cdpath())  # where a relative cd may lead
    volumes, complete = _named_volumes(f"{command} {inherited}", cwd) if walk.unknown else (set(), True)
    refusal: tuple[Unknown, str | None] | None = next(
        ((u, root) for u in walk.unknown if (root := walk.refused(u, volumes)) is not None), None
    )
    settled = walk.settled() if refusal is not None else None
    if settled is not None:
        walk, found = _followed(command, cwd, settled, walk.deadline, start)
        refusal = next(((u, root) for u in walk.unknown if (root := walk.refused(u, volumes)) is not None), None)
    if refusal is None and not complete and walk.unknown:  # a volume may lie among the paths not looked at
        refusal = walk.unknown[0], None
    if refusal is not None:
        unknown, landing = refusal
        told = start.advice if start is not None and walk.from_start(unknown) else unknown.advice
        place = os.path.realpath(unknown.place) if unknown.place else ""
        if landing is not None and place and landing.startswith(place.rstrip("/") + "/"):  # (a volume below it)
            raise _VolumeBelow(unknown.word, unknown.why, landing, told, place)
        raise UnresolvedShellWrite(unknown.word, unknown.why, landing, told)
    _refuse_links(walk.linked)
    return found


class _VolumeBelow(UnresolvedShellWrite):
    """An UnresolvedShellWrite whose write is placed in a directory in no volume, refused because a
    volume lies below it (the write may reach it, `Unknown.volumes_below`, or it may run there:
    `_Walk.from_start`): it says so, naming that volume as one for instance, not as the write's."""

    def __init__(self, word: str, why: str, root: str, advice: str | None, place: str) -> None:
        super().__init__(word, why, root, advice)
        self.args = (
            self.args[0],
            f"coherent-volume refused this shell command: it writes a file named by `{word}` ({why}), which is "
            f"known only when the command runs, and volumes lie below {place} (the one at {root}, for one), so the "
            "write may land in one and the hook cannot check that it loses no other session's change. "
            + (
                advice
                or "Name the file literally in the command (no variables, command substitutions, xargs or find "
                "-exec, and `cd` only to a literal directory), or make the change with your file-editing tool."
            ),
        )


def _refuse_links(ends: list[str]) -> None:
    """Raise LinkRefused if a hard link the command makes has a managed file at an end (as the core
    refuses it, `refuse_hard_link`), or a file of a volume's registry."""
    cores: dict[str, VolumeCore] = {}
    try:
        for path in ends:
            found = located(path)
            if found is None:
                continue
            if found.root not in cores:
                cores[found.root] = open_core(found.root)
            core = cores[found.root]
            try:
                target = core.resolve(found.rel)
            except OutsideVolume as outside:
                real = os.path.relpath(os.path.realpath(path), core.paths.root)
                if not (is_registry_path(found.rel) or is_registry_path(real)):
                    continue  # a symlink out of the volume: its own volume, if any, is another path
                raise LinkRefused(
                    f"coherent-volume refused this shell command: it makes a hard link of (or at) {path!r}: "
                    f"{outside}; a hard link would let writes reach the registry past coherent-volume: leave it out "
                    "of the command"
                ) from None
            try:
                refuse_hard_link(target)
            except LinkRefused as refused:
                raise LinkRefused(
                    f"coherent-volume refused this shell command: it makes a hard link of (or at) {path!r}: {refused}"
                ) from None
    finally:
        for core in cores.values():
            core.close()
