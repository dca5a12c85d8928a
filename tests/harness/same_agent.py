"""Same-agent concurrency through a mount: several processes of ONE agent append lines to one
managed file and increment their own fixed-width slots of another in place, while other agents
append to the same log, increment a slot of their own, and read-modify-write a counter file.

What must hold (judged by `checker.check_appends`, `checker.check_slots` and the ordinary
history check of the counter):

- every append that returned success is in the log file exactly once, in its process's order,
  and no refused one is; each line is one version of its agent in the volume's log;
- every in-place increment that returned success is still there: the next write handle of that
  slot reads it back and the final file holds the last one (two handles of one agent that write
  different bytes both land: a handle's commit replays its edits onto its own agent's newer
  commit); each accepted write is one version;
- the counter's history checks out as in the sweeps.

A whole-file read-modify-write from two processes of one agent is NOT part of this scenario:
views are per agent, so such a pair loses updates with no refusal. `same_agent_rmw` shows that
(opt-in: `scripts/torture.py --only same-agent-rmw`; see docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from coherent_volume import CoherentVolume

from . import REPO, child
from .checker import check_appends, check_slots
from .history import Append, Journal, SlotWrite, load_append_records, load_journal
from .judge import judge_volume, unexpected_errors
from .mounts import Mount
from .resolve import log_versions, refusal_reasons
from .result import Result
from .sweeps import Sampler, load_records, spawn_shell_agent, stop_all, wait_all
from .volumes import SEED_AGENT, create, read_log, seed
from .workers import Workload

LOG, SLOTS, COUNTER = "plans/log.md", "plans/slots.md", "plans/counter.md"
NAME_WIDTH = 20
LINE = NAME_WIDTH + 1 + 9 + 1
"""Bytes of one slot line: `name` padded, a space, 9 digits, newline."""

APPENDER = r"""
set -u
export LC_ALL=C
exec {rec}>>"$REC"
: > "$READY"
for ((w = 0; w < 6000; w++)); do [[ -e $GO ]] && break; sleep 0.01; done
ok=0
for ((i = 0; ok < N && i < TRIES; i++)); do
  tok="$W.$i"
  t0=$EPOCHREALTIME
  { echo "$tok" >> "$MNT/$LOG"; } 2>"$ERRF"
  rc=$?
  t1=$EPOCHREALTIME
  msg=""
  if [[ $rc -eq 0 ]]; then ((ok++)); else IFS= read -r msg < "$ERRF"; sleep 0.0$((RANDOM % 10)); fi
  echo "A $W $tok $i $rc $t0 $t1 $msg" >&"$rec"
done
"""
"""One appending process: once every worker is ready (`_start_together`), `echo TOKEN >> log` until
N were accepted (at most TRIES times), each outcome recorded (see history.load_append_records);
after a refusal it pauses up to 10 ms."""

START_WAIT = 60.0
"""Seconds the workers wait for each other to start (each then starts anyway)."""


def slot_line(name: str, value: int) -> bytes:
    return f"{name:<{NAME_WIDTH}} {value:09d}\n".encode()


def _outcome(e: OSError) -> tuple[str, str]:
    import errno

    name = errno.errorcode.get(e.errno or 0, str(e.errno))
    return ("refused", name) if e.errno == errno.EACCES else ("error", name)


def slotter_main(config: dict) -> None:
    """One process incrementing its slot in place until `n` increments were accepted (at most 5n
    tries): a tracked read of the file, then open O_RDWR, pread the slot, pwrite it plus one,
    close (the commit)."""
    path, slot, index, agent = config["path"], config["slot"], config["index"], config["agent"]
    rng = random.Random(config["seed"])
    journal = Journal(config["record"])
    offset = index * LINE
    Path(config["ready"]).touch()
    deadline = time.monotonic() + START_WAIT
    while not os.path.exists(config["go"]) and time.monotonic() < deadline:
        time.sleep(0.01)
    accepted = 0
    for seq in range(config["n"] * 5):
        if accepted == config["n"]:
            break
        t0 = time.time()
        try:
            with open(path, "rb") as f:
                f.read()
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            journal.put(SlotWrite(slot, agent, seq, None, None, t0, time.time(), *_outcome(e)))
            time.sleep(rng.uniform(0, 0.01))
            continue
        read = wrote = None
        outcome, reason = "ok", None
        try:
            fields = os.pread(fd, LINE, offset).decode("ascii", "replace").split()
            if len(fields) != 2 or fields[0] != slot or not fields[1].isdigit():
                outcome, reason = "error", "torn"
            else:
                read = int(fields[1])
                time.sleep(rng.uniform(0, config["think"]))  # keep this handle open while others commit
                os.pwrite(fd, slot_line(slot, read + 1), offset)
                wrote = read + 1
        except OSError as e:
            outcome, reason = _outcome(e)
        finally:
            try:
                os.close(fd)  # the commit: a refusal can only be reported here
            except OSError as e:
                if outcome == "ok":
                    outcome, reason = _outcome(e)
        journal.put(
            SlotWrite(slot, agent, seq, read, wrote if outcome == "ok" else None, t0, time.time(), outcome, reason)
        )
        accepted += outcome == "ok"
        if outcome != "ok":
            time.sleep(rng.uniform(0, 0.01))
    journal.close()


def _spawn_appender(mnt: Path, agent: str, writer: str, n: int, records: Path) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "COHERENT_AGENT": agent,
        "MNT": str(mnt),
        "LOG": LOG,
        "W": writer,
        "N": str(n),
        "TRIES": str(n * 5),
        "REC": str(records / f"{writer}.appends"),
        "ERRF": str(records / f"{writer}.err"),
        "READY": str(records.parent / f"{writer}.appends.ready"),
        "GO": str(records.parent / GO),
    }
    return subprocess.Popen(
        ["bash", "-c", APPENDER], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd="/"
    )


def _spawn_slotter(
    mnt: Path, agent: str, slot: str, index: int, n: int, records: Path, seed_: int
) -> subprocess.Popen[str]:
    config = {
        "path": str(mnt / SLOTS),
        "slot": slot,
        "index": index,
        "agent": agent,
        "n": n,
        "seed": seed_,
        "think": 0.004,
        "record": str(records / f"{slot}.slots.jsonl"),
        "ready": str(records.parent / f"{slot}.slots.ready"),
        "go": str(records.parent / GO),
    }
    return subprocess.Popen(
        child("same_agent", "slotter", json.dumps(config)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "COHERENT_AGENT": agent},
    )


GO = "GO"
"""The file whose creation starts the appenders and slotters, in the records' directory."""


def _start_together(records: Path, workers: int) -> None:
    """Let the workers go once each of them is ready (started and waiting), or after START_WAIT s:
    on a loaded machine a worker started late would otherwise run alone and overlap no other."""
    deadline = time.monotonic() + START_WAIT
    while len(list(records.glob("*.ready"))) < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    (records / GO).touch()


def _overlapping(intervals: list[tuple[str, float, float]]) -> int:
    """How many accepted operations of one agent ran while another process of it had one under way."""
    count = 0
    for writer, t0, t1 in intervals:
        count += any(w != writer and s < t1 and t0 < e for w, s, e in intervals)
    return count


def same_agent(workdir: Path, appends: int, slot_writes: int, processes: int = 3, seed_: int = 0) -> Result:
    """`processes` processes of agent alice append `appends` lines each and increment their slots
    `slot_writes` times each; bob appends and increments his slot (half as often); bob and carol
    read-modify-write the counter through bash until the others are done."""
    root, records = create(workdir / "same-agent"), workdir / "same-agent-records"
    for sub in ("counter", "appends", "slots"):
        (records / sub).mkdir(parents=True)
    slots = [f"alice.p{i}" for i in range(processes)] + ["bob.p0"]
    with_seeds = seed(root, [COUNTER])
    with CoherentVolume(root, agent=SEED_AGENT) as vol:
        vol.write(LOG, b"")
        vol.write(SLOTS, b"".join(slot_line(s, 0) for s in slots))
    result = Result(f"same agent: {processes} processes appending and writing in place, with 2 other agents", 3)
    sampler = Sampler(root, [COUNTER])
    stop = records / "counter" / "STOP"
    started = time.monotonic()
    procs: list[subprocess.Popen[str]] = []
    sampler.start()
    try:
        with Mount(root, workdir / "same-agent-mnt") as m:
            work = Workload([COUNTER], attempts=-1, fill=300)
            counters = [
                spawn_shell_agent(m.path, agent, work, records / "counter", seed_ + i, stop)
                for i, agent in enumerate(("bob", "carol"))
            ]
            procs += counters
            workers = [
                _spawn_appender(m.path, "alice", f"alice.p{i}", appends, records / "appends") for i in range(processes)
            ]
            workers.append(_spawn_appender(m.path, "bob", "bob.p0", max(1, appends // 2), records / "appends"))
            workers += [
                _spawn_slotter(m.path, "alice", s, i, slot_writes, records / "slots", seed_ + 100 + i)
                for i, s in enumerate(slots[:-1])
            ]
            workers.append(
                _spawn_slotter(
                    m.path, "bob", "bob.p0", len(slots) - 1, max(1, slot_writes // 2), records / "slots", seed_ + 200
                )
            )
            procs += workers
            _start_together(records, len(workers))
            for e in wait_all(workers, timeout=900):
                result.fail(e)
            stop.touch()
            for e in wait_all(counters, timeout=120):
                result.fail(e)
    finally:
        stop.touch()
        stop_all(procs)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    _judge(result, root, records, with_seeds, samples, slots)
    return result


def _judge(result: Result, root: Path, records: Path, producers: list, samples: set, slots: list[str]) -> None:
    events = read_log(root)
    counter = load_records(records / "counter")
    judge_volume(result, root, [COUNTER], counter, producers, samples, "file", shell=True)
    unexpected_errors(result, counter)
    logged = log_versions(events)
    appended: list[Append] = []
    for f in sorted((records / "appends").glob("*.appends")):
        appended += load_append_records(f, f.stem.split(".")[0])
    result.absorb(check_appends(LOG, appended, _text(root / LOG), [], logged.get(LOG, {}), SEED_AGENT))
    writes: list[SlotWrite] = []
    for f in sorted((records / "slots").glob("*.jsonl")):
        writes += [r for r in load_journal(f) if isinstance(r, SlotWrite)]
    result.absorb(
        check_slots(SLOTS, writes, _text(root / SLOTS), {s: 0 for s in slots}, logged.get(SLOTS, {}), SEED_AGENT)
    )
    if len({w.slot for w in writes}) != len(slots) or not appended:
        result.fail(f"harness: records of {len({w.slot for w in writes})} slots and {len(appended)} appends")
    # counts for the report: every append and slot write is a commit attempt
    result.attempts += len(appended) + len(writes)
    result.accepted += sum(a.outcome == "ok" for a in appended) + sum(w.outcome == "ok" for w in writes)
    reasons = refusal_reasons([e for e in events if e["path"] in (LOG, SLOTS)])
    result.refusals.update(reasons)
    errors = Counter(f"{x.reason}" for x in [*appended, *writes] if x.outcome == "error")
    result.refusals.update(errors)
    for reason, n in errors.items():
        result.fail(f"unexpected-error: {n} appends or in-place writes failed with {reason}")
    result.stats.update(
        lines=sum(a.outcome == "ok" for a in appended),
        alice_appends_overlapping=_overlapping(
            [(a.writer, a.t0, a.t1 or a.t0) for a in appended if a.agent == "alice" and a.outcome == "ok"]
        ),
        alice_slot_writes_overlapping=_overlapping(
            [(w.slot, w.t0, w.t1 or w.t0) for w in writes if w.agent == "alice" and w.outcome == "ok"]
        ),
    )


def same_agent_rmw(workdir: Path, attempts: int, processes: int = 2, seed_: int = 0) -> Result:
    """`processes` bash processes of ONE agent read-modify-write one counter through the mount
    (shell_agent.sh, `attempts` in all), judged like a sweep. Each process's read moves the agent's
    view, so a write built on what the other process had not yet written passes: this run shows
    lost updates as long as views are per agent."""
    root, records = create(workdir / "same-agent-rmw"), workdir / "same-agent-rmw-records"
    records.mkdir()
    producers = seed(root, [COUNTER])
    result = Result(f"same agent: {processes} processes read-modify-write one file", 1)
    sampler = Sampler(root, [COUNTER])
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    sampler.start()
    try:
        with Mount(root, workdir / "same-agent-rmw-mnt") as m:
            work = Workload([COUNTER], attempts=max(1, attempts // processes), fill=300)
            procs += [
                spawn_shell_agent(m.path, "alice", work, records, seed_ + i, process=f"p{i}") for i in range(processes)
            ]
            for e in wait_all(procs, timeout=900):
                result.fail(e)
    finally:
        stop_all(procs)
        samples = sampler.stop()
    result.wall = time.monotonic() - started
    judge_volume(result, root, [COUNTER], load_records(records), producers, samples, "file", shell=True)
    return result


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    if sys.argv[1] == "slotter":
        slotter_main(json.loads(sys.argv[2]))
    else:
        sys.exit(f"unknown worker {sys.argv[1]!r}")
