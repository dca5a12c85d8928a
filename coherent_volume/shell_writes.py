"""The files a shell command recognisably writes, for the hooks of agents whose shell tool runs
commands the hooks check like a write tool: redirections, `tee`, `sed -i`/`perl -i`, `rm`, `mv`,
`cp`, `install`, `truncate`, `dd of=`. Anything else (a script, an interpreter's own file writes)
is not recognised; on a mount the file system checks those writes.
"""

from __future__ import annotations

import os
import re
import shlex

from .hooks import absolute
from .protocol import HandleKind

_REDIRECTS: dict[str, HandleKind] = {">": "write", ">|": "write", "&>": "write", ">>": "append", "&>>": "append"}
_INPUTS = {"<", "<<", "<<-", "<<<", "<&", ">&", "<>"}
_WRAPPERS = {"sudo", "command", "exec", "nohup", "env", "time", "nice", "doas"}
_MOST_EXPANDED = 1000
"""Files a directory a command removes or moves is expanded to at most."""
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")


def _without_heredoc_bodies(command: str) -> str:
    """`command` without the bodies of its here-documents (data, not commands)."""
    out: list[str] = []
    lines = command.split("\n")
    i = 0
    while i < len(lines):
        out.append(lines[i])
        ends = [m.group(2) for m in _HEREDOC.finditer(lines[i])]
        i += 1
        for end in ends:
            while i < len(lines) and lines[i].strip() != end:
                i += 1
            i += 1
    return "\n".join(out)


def _operands(args: list[str], valued: set[str]) -> tuple[list[str], dict[str, str]]:
    """A command's operands (after its options) and the values of the options in `valued`."""
    operands: list[str] = []
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            operands.extend(args[i + 1 :])
            break
        if arg.startswith("-") and arg != "-":
            name = arg.split("=", 1)[0]
            if name in valued:
                if "=" in arg:
                    values[name] = arg.split("=", 1)[1]
                elif i + 1 < len(args):
                    values[name] = args[i + 1]
                    i += 1
        else:
            operands.append(arg)
        i += 1
    return operands, values


def _into(dest: str, sources: list[str], cwd: str) -> list[str]:
    """Where `sources` land when copied or moved to `dest` (an existing directory or a name)."""
    where = absolute(dest, cwd) or dest
    if os.path.isdir(where):
        return [os.path.join(where, os.path.basename(s.rstrip("/"))) for s in sources]
    return [where]


def _command_writes(words: list[str], cwd: str) -> list[tuple[str, HandleKind, bool]]:
    """The files one simple command (its redirections aside) writes, as far as it can be
    recognised: (path as given, how, whether a directory there stands for the files below it)."""
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words = words[1:]
    while words and os.path.basename(words[0]) in _WRAPPERS:
        words = words[1:]
        while words and (words[0].startswith("-") or re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0])):
            words = words[1:]
    if not words:
        return []
    name, args = os.path.basename(words[0]), words[1:]
    files: list[str] = []
    removed: list[str] = []
    kind: HandleKind = "write"
    if name == "tee":
        files, _ = _operands(args, set())
        kind = "append" if {"-a", "--append"} & set(args) else "write"
    elif name in ("sed", "perl") and any(a.startswith(("-i", "--in-place")) or re.match(r"^-\w*i", a) for a in args):
        script_flags = {"-e", "--expression", "-f", "--file"} if name == "sed" else {"-e", "-E"}
        files, values = _operands(args, script_flags | {"-l", "-s", "--line-length"})
        if not set(values) & script_flags and files:
            files = files[1:]  # the first operand is the script
    elif name in ("rm", "unlink", "shred"):
        removed, _ = _operands(args, set())
    elif name in ("mv", "cp", "install"):
        operands, values = _operands(args, {"-t", "--target-directory", "-S", "--suffix", "-m", "--mode"})
        target_dir = values.get("-t") or values.get("--target-directory")
        sources = operands if target_dir else operands[:-1]
        if sources:
            files = _into(target_dir + "/" if target_dir else operands[-1], sources, cwd)
        if name == "mv":
            removed = sources  # a move deletes its sources
    elif name == "truncate":
        files, _ = _operands(args, {"-s", "--size", "-r", "--reference"})
    elif name == "dd":
        files = [a[3:] for a in args if a.startswith("of=")]
    return [(f, kind, False) for f in files] + [(f, "write", True) for f in removed]


def _expand(path: str) -> list[str]:
    """The regular files at or below `path` (a directory a command removes or moves)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return [path]
    found: list[str] = []
    for directory, _dirs, names in os.walk(path):
        found.extend(os.path.join(directory, n) for n in names)
        if len(found) >= _MOST_EXPANDED:
            break
    return found[:_MOST_EXPANDED]


def shell_writes(command: str, cwd: str) -> list[tuple[str, HandleKind]]:
    """The files (absolute) a shell command recognisably writes, each with how: redirections
    (`>`, `>>`, `&>`), `tee`, `sed -i`/`perl -i`, `rm`, `mv`, `cp`, `install`, `truncate`,
    `dd of=`; a directory removed or moved stands for the files below it. Anything else (a
    script, an interpreter's own file writes) is not recognised; unparsable text yields nothing."""
    lexer = shlex.shlex(_without_heredoc_bodies(command), posix=True, punctuation_chars=";&|<>()\n")
    lexer.whitespace = " \t\r"
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:
        return []
    found: list[tuple[str, HandleKind, bool]] = []
    words: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        punct = all(c in ";&|<>()\n" for c in token)
        if punct and token in _REDIRECTS:
            if words and words[-1].isdigit():
                words.pop()  # a file descriptor number: 2>file
            if i + 1 < len(tokens):
                found.append((tokens[i + 1], _REDIRECTS[token], False))
            i += 2
            continue
        if punct and token in _INPUTS:
            if words and words[-1].isdigit():
                words.pop()
            i += 2
            continue
        if punct:
            found.extend(_command_writes(words, cwd))
            words = []
        else:
            words.append(token)
        i += 1
    found.extend(_command_writes(words, cwd))
    out: list[tuple[str, HandleKind]] = []
    for path, kind, expand in found:
        where = absolute(path, cwd)
        if where is not None:
            out.extend((p, kind) for p in (_expand(where) if expand else [where]))
    return out
