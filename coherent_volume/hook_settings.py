"""The agents' settings files: merge coherent-volume's hooks into one, and remove exactly those.

Invariants: every other setting and hook is kept; installing twice changes nothing; a file that
is not a JSON object with a `hooks` object is never changed (CoherenceError). Our hooks are those
whose command is exactly one install writes (`ours`): this installation's, another's (a CLI by
absolute path ending in `/coherent-volume`, quoted for the shell, then ` hook FACE`), or the one given; only those are
removed, never a group's other hooks, nor a command that merely mentions `hook FACE` (before, such
a hook and every hook sharing a group with ours were dropped: /tmp/s32hookgc 2).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CoherenceError

Hooks = dict[str, list[dict[str, Any]]]
"""Event name -> the entries of a settings file's `hooks` object."""


CLI = "coherent-volume"


def installed_cli() -> str:
    """This installation's CLI, by absolute path: the script this process runs as, when it is the
    CLI (`sys.argv[0]`, as it was run: a link to it stays a link); else the one beside the
    interpreter (a virtual environment's, pipx's), else in the scripts directory of the
    interpreter's own or its user scheme (`pip install --user`). Never another `coherent-volume`
    found on PATH (before, the first there, an older or a stray one: /tmp/s32r2hooks 5)."""
    run = sys.argv[0] if sys.argv else ""
    if os.path.basename(run) == CLI and os.path.isfile(run):
        return os.path.abspath(run)
    beside = Path(sys.executable).parent / CLI
    places = [beside, Path(sysconfig.get_path("scripts")) / CLI]
    try:
        places.append(Path(sysconfig.get_path("scripts", sysconfig.get_preferred_scheme("user"))) / CLI)
    except (KeyError, ValueError):
        pass
    return os.path.abspath(next((p for p in places if p.is_file()), beside))


def hook_command(face: str) -> str:
    """The command an agent runs for its hook: this installation's CLI (`installed_cli`), by absolute
    path, quoted for the shell the agent runs it with (a path with a space would else be split, and
    the hook exit 127, which Claude Code takes for a non-blocking error: /tmp/s32r2hooks 4)."""
    return f"{shlex.quote(installed_cli())} hook {face}"


_UNQUOTED = re.compile(r"(/[^\s;&|$`'\"\\<>(){}*?\[\]#~=%!]*)( [^\s;&|$`'\"\\<>(){}*?\[\]#~=%!]+)+")
"""A path with spaces, unquoted, holding nothing else the shell gives a meaning."""


def ours(command: object, face: str, given: str | None = None) -> bool:
    """Whether a hook's `command` is one that `install` writes for `face`: `given` (the command it
    was told to write), this installation's (`hook_command`), or another installation's: an absolute
    path ending in `/coherent-volume`, quoted as `hook_command` quotes it (or in double quotes, with
    nothing in them the shell expands), then ` hook FACE`, and
    nothing else; or such a path with spaces written unquoted by an install before the quoting, which
    the shell cannot start (its first word is no file), with nothing the shell gives a meaning."""
    if not isinstance(command, str):
        return False
    if command in (given, hook_command(face)):
        return True
    suffix = f" hook {face}"
    if not command.endswith(suffix):
        return False
    quoted = command[: -len(suffix)]
    try:
        words = shlex.split(quoted)
    except ValueError:
        return False
    if len(words) == 1 and _cli_path(words[0]):
        plain = not any(c in words[0] for c in '$`\\"!')
        if quoted in (shlex.quote(words[0]), f'"{words[0]}"' if plain else None):
            return True
    return _UNQUOTED.fullmatch(quoted) is not None and _cli_path(quoted) and not os.path.isfile(quoted.split(" ")[0])


def _cli_path(path: str) -> bool:
    return os.path.isabs(path) and path.endswith("/coherent-volume") and "\n" not in path


def _without_ours(entries: list[Any], face: str, given: str | None) -> list[Any]:
    """`entries` of one event without our hooks: an entry that is our hook itself (Cursor's shape)
    goes; from a group (`hooks`: Claude Code's, Gemini CLI's and Codex's shape) only our hooks go,
    and the group only when none of its hooks is left."""
    kept: list[Any] = []
    for entry in entries:
        if not isinstance(entry, dict):
            kept.append(entry)
            continue
        if ours(entry.get("command"), face, given):
            continue
        inner = entry.get("hooks")
        if isinstance(inner, list):
            left = [h for h in inner if not (isinstance(h, dict) and ours(h.get("command"), face, given))]
            if not left and inner:
                continue
            entry = {**entry, "hooks": left}
        kept.append(entry)
    return kept


def nested(hook: dict[str, Any], matchers: Mapping[str, str | None]) -> Hooks:
    """Per event, one entry that runs `hook` for the tools its matcher names (None: for every
    occurrence of the event), in the shape of Claude Code's settings (Gemini CLI's and Codex's too)."""
    return {e: [{"matcher": m, "hooks": [hook]} if m else {"hooks": [hook]}] for e, m in matchers.items()}


def _finite(text: str) -> float:
    """A JSON number read as a float, refused where a float cannot hold it (`1e400` would be written
    back as `Infinity`, which no JSON reader takes)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is too large to be written back as it is")
    return value


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError as e:
        raise CoherenceError(
            f"{path} is a directory, not a settings file: move it away (a settings file is made there), then run "
            "this again; nothing was changed"
        ) from e
    except OSError as e:
        raise CoherenceError(
            f"{path} cannot be read ({e.strerror or e}): make it readable, then run this again; nothing was changed"
        ) from e
    try:
        data = json.loads(text or "{}", parse_float=_finite, parse_constant=_no_constant)
    except ValueError as e:
        raise CoherenceError(
            f"{path} is not plain JSON, which is what this installer writes back ({e}); comments, which "
            "some agents allow in their settings, and numbers JSON cannot hold are not: remove them, then "
            "install again; nothing was changed"
        ) from e
    if not isinstance(data, dict) or not isinstance(data.get("hooks", {}), dict):
        raise CoherenceError(f"{path} does not hold a JSON object with a `hooks` object; nothing was changed")
    return data


def _save(path: Path, data: dict[str, Any]) -> None:
    """Replace the settings at `path` whole; a symlink's target is what is replaced (a settings file
    linked from elsewhere stays linked), and an existing file keeps its permissions."""
    real = Path(os.path.realpath(path))
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # (a HOME or DIR/.claude that is a file, a read-only place)
        raise CoherenceError(
            f"the directory {real.parent} cannot be made ({e.strerror or e}; is a directory on its way a file?): "
            "nothing was changed"
        ) from e
    tmp = real.with_name(real.name + ".coherent-tmp")
    step = "written"
    try:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        try:
            os.chmod(tmp, os.stat(real).st_mode & 0o7777)
        except FileNotFoundError:
            pass
        step = "replaced"
        os.replace(tmp, real)
    except BaseException as e:  # a full disk, a read-only or immutable (`chattr +i`) file, an interrupt
        try:
            os.unlink(tmp)  # in every outcome (before, a failed write or rename left it: /tmp/s33cli 3)
        except OSError:
            pass
        if not isinstance(e, OSError):
            raise
        raise CoherenceError(
            f"{real} could not be {step} "
            f"({e.strerror or e}): it is as it was, nothing was changed. Make room on its file system, or make the "
            f"file and {real.parent} writable (an immutable file: `lsattr`, `chattr -i`), then run this again"
        ) from e


def merge_hooks(
    path: Path, face: str, entries: Hooks, top: Mapping[str, Any] | None = None, command: str | None = None
) -> None:
    """Put `entries` (our hooks, running `command`) into the `hooks` object of the settings at
    `path`, replacing our earlier hooks for `face` (`ours`) and keeping every other setting and
    hook; `top` are top-level keys set only when missing. Idempotent."""
    data = _load(path)
    for key, value in (top or {}).items():
        data.setdefault(key, value)
    hooks = data.setdefault("hooks", {})
    for event, added in entries.items():
        existing = hooks.get(event, [])
        if not isinstance(existing, list):
            raise CoherenceError(f"{path}: `hooks.{event}` is not a list; nothing was changed")
        hooks[event] = _without_ours(existing, face, command) + added
    _save(path, data)


def remove_hooks(path: Path, face: str, command: str | None = None) -> bool:
    """Remove exactly our hooks for `face` (`ours`; `command`: the one install was given), and a
    group or event that removing them left with none, and the `hooks` object if that left it empty;
    an event the user had empty stays (before, it went: /tmp/s32r2hooks 8; one that install added
    to and uninstall emptied cannot be told from one install made, and goes). The top-level keys
    `merge_hooks` sets when missing (Cursor's `"version": 1`) stay: the file does not say whether
    they were the user's before (before, they went, and a user's own went with them:
    /tmp/s32hookgc 2). A missing file stays missing, and a file holding none of our hooks is left
    as it is, byte for byte (before, it was rewritten, reformatted: /tmp/s33cli 4). Whether any was
    removed."""
    if not path.exists():
        return False
    data = _load(path)
    hooks = data.get("hooks", {})
    before = json.dumps(hooks, sort_keys=True)
    emptied = False
    for event in list(hooks):
        if not isinstance(hooks[event], list) or not hooks[event]:
            continue
        hooks[event] = _without_ours(hooks[event], face, command)
        if not hooks[event]:
            del hooks[event]
            emptied = True
    if json.dumps(hooks, sort_keys=True) == before:
        return False
    if not hooks and emptied:
        data.pop("hooks", None)
    _save(path, data)
    return True
