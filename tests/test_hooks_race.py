"""Two Claude Code sessions, or two subagents of one session, racing on one file through the hooks
alone (no mount), with the Write tool or the Bash tool: no lost update.

Each session is a real process that runs the real `coherent-volume hook claude-code` command as
its child for every event, in the order Claude Code sends them: the Read tool reads the file,
PostToolUse Read; PreToolUse Write; if denied, read again and retry; else the tool writes the
file in the plain directory (temp file + rename, as Claude Code's Write tool does) and
PostToolUse Write. PreToolUse takes the session's write grant and PostToolUse releases it, so
check and write are one step between hooked sessions. Subagents' events carry their `agent_id`,
which makes each an agent of its own: without it, two subagents of one session would be one agent
and overwrite each other.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coherent_volume import CoherentVolume
from coherent_volume.core.sessions import HELD_CLOBBER

CLI = str(Path(sys.executable).parent / "coherent-volume")
P = "plans/counter.md"
CYCLES = 12
"""Per session. Each cycle is at least three hook processes (~0.15 s each on an idle machine)."""

SESSION = r"""
import json, os, random, subprocess, sys, time
cli, root, session, cycles, path, agent_id, tool = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6], sys.argv[7]
denials, slowest = {}, 0.0

def hook(name, tool, response=None, command=None):
    global slowest
    event = {"session_id": session, "transcript_path": f"/tmp/{session}.jsonl", "cwd": root,
             "permission_mode": "acceptEdits", "hook_event_name": name, "tool_name": tool,
             "tool_input": {"command": command} if command else {"file_path": path}}
    if agent_id:
        event.update(agent_id=agent_id, agent_type="general-purpose")
    if response is not None:
        event["tool_response"] = response
    started = time.monotonic()
    r = subprocess.run([cli, "hook", "claude-code"], input=json.dumps(event), capture_output=True, text=True,
                       timeout=60)
    slowest = max(slowest, time.monotonic() - started)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if r.stdout.strip() else {}

def read():
    # the Read tool, then PostToolUse Read with what it showed the model; a read between the other
    # session's `echo N >` truncating the file and writing it shows it empty: the model reads again
    while True:
        with open(path) as f:
            text = f.read()
        lines = text.split("\n")
        hook("PostToolUse", "Read", {"type": "text", "file": {"filePath": path, "content": text,
             "numLines": len(lines), "startLine": 1, "totalLines": len(lines)}})
        if text.strip():
            return int(text.split()[0])
        time.sleep(0.01)

for _ in range(cycles):
    value = read()
    while True:
        command = f"echo {value + 1} > {path}" if tool == "Bash" else None  # the Bash tool's write
        out = hook("PreToolUse", tool, command=command).get("hookSpecificOutput", {})
        if out.get("permissionDecision") != "deny":
            break
        reason = out["permissionDecisionReason"].split("(", 1)[1].split(")", 1)[0]
        denials[reason] = denials.get(reason, 0) + 1
        time.sleep(random.uniform(0, 0.05))
        value = read()
    time.sleep(0.03)  # Claude Code between the PreToolUse answer and the tool's write (permission step, tool start)
    if command:
        subprocess.run(["bash", "-c", command], check=True, timeout=60)
        hook("PostToolUse", "Bash", {"stdout": "", "stderr": "", "interrupted": False, "isImage": False}, command)
        continue
    tmp = f"{path}.tmp.{os.getpid()}"  # Claude Code's Write tool: temp file beside the target, rename
    with open(tmp, "w") as f:
        f.write(f"{value + 1}\n")
    os.replace(tmp, path)
    hook("PostToolUse", "Write", {"type": "update", "filePath": path})
print(json.dumps({"denials": denials, "slowest_hook": slowest}), flush=True)
"""


@pytest.mark.parametrize(
    ("racers", "tool"),
    [
        ([("racer1", ""), ("racer2", "")], "Write"),
        ([("parent", "agent-1"), ("parent", "agent-2")], "Write"),
        ([("racer1", ""), ("racer2", "")], "Bash"),
    ],
    ids=["sessions", "subagents", "bash"],
)
def test_two_hooked_agents_lose_no_update(root: Path, racers: list[tuple[str, str]], tool: str) -> None:
    """Each cycle reads the counter with the Read tool and writes it plus one with the Write tool,
    or (`bash`) with the Bash tool (`echo N > file`)."""
    target = root / P
    with CoherentVolume(root, agent="setup") as setup:
        setup.write(P, "0\n")
    started = time.monotonic()
    sessions = [
        subprocess.Popen(
            [sys.executable, "-c", SESSION, CLI, str(root), session, str(CYCLES), str(target), agent_id, tool],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for session, agent_id in racers
    ]
    results = []
    for s in sessions:
        out, err = s.communicate(timeout=300)
        assert s.returncode == 0, err
        results.append(json.loads(out))
    elapsed = time.monotonic() - started
    print(f"{2 * CYCLES} cycles in {elapsed:.1f} s; {results}")

    assert int(target.read_text()) == 2 * CYCLES, "every increment survives: no lost update"
    log = subprocess.run([CLI, "log", str(root), "--json", "-n", "100000"], capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in log.stdout.splitlines()]
    # `echo N >` empties the file before it writes: a peer's Read or check that sees it so records
    # that (by `external`, while the writer held the grant), and the writer's record over it is a
    # clobber made while it held the grant (the hook cannot tell that from another program's change)
    seen_half_done = [e for e in events if e["kind"] == "foreign"]
    assert all("held its write grant" in e["detail"] for e in seen_half_done), seen_half_done
    with CoherentVolume(root, agent="observer") as v:
        assert v.version(P) >= 1 + 2 * CYCLES, "each cycle is at least one version"
        for e in seen_half_done:
            assert v.read_version(P, e["version"]).strip() in (b"", *(str(n).encode() for n in range(2 * CYCLES + 1)))
    clobbers = [e for e in events if e["kind"] == "clobber"]
    assert all(e["detail"].endswith(HELD_CLOBBER) for e in clobbers), (
        "no write went over a version its writer had not read"
    )
    assert len(clobbers) <= len(seen_half_done)
    assert not [e for e in events if e["kind"] == "refusal" and e["reason"] not in ("held", "stale", "unread")]
    with CoherentVolume(root, agent="observer") as v:
        status = json.loads(
            subprocess.run([CLI, "status", str(root), "--json"], capture_output=True, text=True, check=True).stdout
        )
    assert all(f["holder"] is None for f in status["files"]), "every grant a PreToolUse took was released"
