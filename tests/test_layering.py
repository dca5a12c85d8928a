"""Layering: `coherent_volume` (core, API, CLI, hooks) never depends on the FUSE face.

`fusefs` builds on `coherent_volume`, never the reverse; the FUSE libraries (pyfuse3,
trio) are an optional extra that only the mount commands load, inside the command. The MCP
SDK (the `mcp` extra) is loaded only inside `coherent_volume/mcp_server.py`'s functions, when
`coherent-volume mcp` runs: the rest of the CLI and the hooks never import it. The PostgreSQL
backend's modules are loaded by a volume that uses it, the diff library by the first diff: a hook
of a SQLite volume that reads or allows a write (every tool call of an agent) loads neither.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FUSE_SIDE = ("fusefs", "pyfuse3", "trio")
LAZY_FUSEFS = {("coherent_volume/cli.py", "mount"), ("coherent_volume/cli.py", "unmount")}
"""The only places in coherent_volume that may import fusefs: inside the mount commands."""
MCP_SIDE = ("mcp", "mcp_types", "pydantic", "anyio")
"""The MCP SDK and what it brings."""
MCP_SERVER = "coherent_volume/mcp_server.py"


def _imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(top-level module imported, enclosing function or None at module level, line) for every
    absolute import in `path`, including importlib.import_module/__import__ with a literal name."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, str | None, int]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Import):
                found.extend((a.name.split(".")[0], function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module.split(".")[0], function, child.lineno))
            elif (
                isinstance(child, ast.Call)
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
                and (
                    getattr(child.func, "attr", None) == "import_module"
                    or getattr(child.func, "id", None) == "__import__"
                )
            ):
                found.append((child.args[0].value.split(".")[0], function, child.lineno))
            visit(child, inner)

    visit(tree, None)
    return found


def test_coherent_volume_never_imports_the_fuse_side() -> None:
    modules = sorted((REPO / "coherent_volume").rglob("*.py"))
    assert len(modules) > 10
    violations = []
    for module in modules:
        rel = module.relative_to(REPO).as_posix()
        for name, function, line in _imports(module):
            if name not in FUSE_SIDE:
                continue
            if name == "fusefs" and (rel, function) in LAZY_FUSEFS:
                continue
            violations.append(
                f"{rel}:{line} imports {name}" + (f" in {function}()" if function else " at module level")
            )
    assert not violations, "coherent_volume must not depend on the FUSE face:\n" + "\n".join(violations)


def test_the_mcp_sdk_is_imported_only_inside_the_mcp_servers_functions() -> None:
    modules = sorted((REPO / "coherent_volume").rglob("*.py"))
    violations = []
    for module in modules:
        rel = module.relative_to(REPO).as_posix()
        for name, function, line in _imports(module):
            if name in MCP_SIDE and (rel != MCP_SERVER or function is None):
                violations.append(
                    f"{rel}:{line} imports {name}" + (f" in {function}()" if function else " at module level")
                )
    assert not violations, "only the MCP server's functions may import the MCP SDK:\n" + "\n".join(violations)
    assert any(name == "mcp" for name, _, _ in _imports(REPO / MCP_SERVER)), "the server uses the SDK"


PG_SIDE = ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c")
"""The PostgreSQL driver (the `postgresql` extra)."""
PG_BACKEND = "coherent_volume/registry/pg_connections.py"


def _type_checking_lines(path: Path) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks (imports there are for mypy only, never run)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def test_the_postgresql_driver_is_imported_only_inside_the_postgresql_backends_functions() -> None:
    violations = []
    for module in sorted((REPO / "coherent_volume").rglob("*.py")):
        rel = module.relative_to(REPO).as_posix()
        for_mypy = _type_checking_lines(module)
        for name, function, line in _imports(module):
            if name in PG_SIDE and line not in for_mypy and (rel != PG_BACKEND or function is None):
                violations.append(
                    f"{rel}:{line} imports {name}" + (f" in {function}()" if function else " at module level")
                )
    assert not violations, "only the PostgreSQL backend's functions may import psycopg:\n" + "\n".join(violations)
    assert any(name == "psycopg" for name, _, _ in _imports(REPO / PG_BACKEND)), "the backend uses the driver"


def test_fusefs_builds_on_coherent_volume() -> None:
    """The allowed direction: the FUSE face imports the core (and nothing in the core imports it back)."""
    importers = {
        m.name for m in (REPO / "fusefs").glob("*.py") if any(name == "coherent_volume" for name, _, _ in _imports(m))
    }
    assert {"mount.py", "operations.py"} <= importers


HOOK_RUN = r"""
import io, json, os, sys
import coherent_volume, coherent_volume.cli, coherent_volume.claude_code
from coherent_volume import CoherentVolume
from coherent_volume.cli import main

root = sys.argv[1]
with CoherentVolume(root, agent="setup") as v:
    v.write("plans/plan.md", "v1\n")

class Exited(Exception):
    pass

def no_exit(code):
    raise Exited(code)

os._exit = no_exit  # the hook entry ends with os._exit: keep this interpreter to inspect it
for name, tool in (("PostToolUse", "Read"), ("PreToolUse", "Write"), ("PostToolUse", "Write")):
    event = {"session_id": "layers", "cwd": root, "hook_event_name": name, "tool_name": tool,
             "tool_input": {"file_path": os.path.join(root, "plans/plan.md")},
             "tool_response": {"file": {"content": "v1\n", "startLine": 1, "numLines": 2}}}
    sys.stdin = io.TextIOWrapper(io.BytesIO(json.dumps(event).encode()))
    try:
        main(["hook", "claude-code"], standalone_mode=False)
    except Exited as e:
        assert e.args[0] == 0, e.args
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("fusefs", "pyfuse3", "trio", "rich", "mcp", "mcp_types", "pydantic", "anyio", "psycopg", "psycopg_pool", "rapidfuzz")
                or m.startswith(("coherent_volume.registry.pg_", "coherent_volume.registry.postgresql")))
print("LOADED " + json.dumps(loaded))
"""


def test_the_hook_path_loads_only_what_it_uses(root: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", HOOK_RUN, str(root)], capture_output=True, text=True, timeout=60, cwd=REPO, check=False
    )
    assert r.returncode == 0, r.stderr
    assert '"permissionDecision": "deny"' not in r.stdout, "the session read the file: its write is allowed"
    loaded = json.loads(r.stdout.rsplit("LOADED ", 1)[1])
    assert not [m for m in loaded if m.split(".")[0] in FUSE_SIDE], loaded
    assert not [m for m in loaded if m.startswith("rich")], f"the hook needs no rich: {loaded}"
    assert not [m for m in loaded if m.split(".")[0] in MCP_SIDE], f"the hook needs no MCP SDK: {loaded}"
    assert not [m for m in loaded if m.split(".")[0] in PG_SIDE], f"a SQLite volume needs no psycopg: {loaded}"
    assert not [m for m in loaded if m.startswith("coherent_volume.registry")], f"nor its PostgreSQL backend: {loaded}"
    assert "rapidfuzz" not in loaded, f"a read and an allowed write need no diff: {loaded}"


def test_the_mount_commands_load_fusefs_only_when_run() -> None:
    pytest.importorskip("pyfuse3")
    code = (
        "import sys, coherent_volume.cli as c; assert 'fusefs' not in sys.modules; "
        "import fusefs.mount; assert 'coherent_volume.core' in sys.modules; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
