"""The agents' settings files: merge coherent-volume's hooks into one, and remove exactly those.

Invariants: every other setting and hook is kept; installing twice changes nothing; a file that
is not a JSON object with a `hooks` object is never changed (CoherenceError); our entries are
those whose command runs `coherent-volume hook FACE`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import CoherenceError

Hooks = dict[str, list[dict[str, Any]]]
"""Event name -> the entries of a settings file's `hooks` object."""


def hook_command(face: str) -> str:
    """The command an agent runs for its hook: this installation's CLI, by absolute path."""
    cli = shutil.which("coherent-volume") or str(Path(sys.executable).parent / "coherent-volume")
    return f"{os.path.abspath(cli)} hook {face}"


def _ours(entry: object, face: str) -> bool:
    """Whether a settings entry runs our hook for `face`: its own command (Cursor's shape) or one
    of its `hooks` (Claude Code's, Gemini CLI's and Codex's)."""
    if not isinstance(entry, dict):
        return False
    inner = entry.get("hooks")
    nested = [h.get("command") for h in inner if isinstance(h, dict)] if isinstance(inner, list) else []
    return any(isinstance(c, str) and f"hook {face}" in c for c in [entry.get("command"), *nested])


def nested(hook: dict[str, Any], matchers: Mapping[str, str | None]) -> Hooks:
    """Per event, one entry that runs `hook` for the tools its matcher names (None: for every
    occurrence of the event), in the shape of Claude Code's settings (Gemini CLI's and Codex's too)."""
    return {e: [{"matcher": m, "hooks": [hook]} if m else {"hooks": [hook]}] for e, m in matchers.items()}


def _load(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text() or "{}")
    except ValueError as e:
        raise CoherenceError(f"{path} is not valid JSON ({e}); fix it first, nothing was changed") from e
    if not isinstance(data, dict) or not isinstance(data.get("hooks", {}), dict):
        raise CoherenceError(f"{path} does not hold a JSON object with a `hooks` object; nothing was changed")
    return data


def _save(path: Path, data: dict[str, Any]) -> None:
    """Replace the settings at `path` whole; a symlink's target is what is replaced (a settings file
    linked from elsewhere stays linked), and an existing file keeps its permissions."""
    real = Path(os.path.realpath(path))
    real.parent.mkdir(parents=True, exist_ok=True)
    tmp = real.with_name(real.name + ".coherent-tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    try:
        os.chmod(tmp, os.stat(real).st_mode & 0o7777)
    except FileNotFoundError:
        pass
    os.replace(tmp, real)


def merge_hooks(path: Path, face: str, ours: Hooks, top: Mapping[str, Any] | None = None) -> None:
    """Put `ours` into the `hooks` object of the settings at `path`, replacing our earlier entries
    for `face` and keeping every other setting and hook; `top` are top-level keys set only when
    missing. Idempotent."""
    data = _load(path)
    for key, value in (top or {}).items():
        data.setdefault(key, value)
    hooks = data.setdefault("hooks", {})
    for event, entries in ours.items():
        hooks[event] = [e for e in hooks.get(event, []) if not _ours(e, face)] + entries
    _save(path, data)


def remove_hooks(path: Path, face: str, top: Mapping[str, Any] | None = None) -> None:
    """Remove exactly our entries for `face` (and the `top` keys `merge_hooks` added, when nothing
    else is left in `hooks`). A missing file stays missing."""
    if not path.exists():
        return
    data = _load(path)
    hooks = data.get("hooks", {})
    for event in list(hooks):
        hooks[event] = [e for e in hooks[event] if not _ours(e, face)]
        if not hooks[event]:
            del hooks[event]
    if not hooks:
        data.pop("hooks", None)
        for key, value in (top or {}).items():
            if data.get(key) == value:
                del data[key]
    _save(path, data)
