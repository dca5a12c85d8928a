"""The history checker: judges a recorded history on its own, sharing no code with coherent_volume.

It sees only what the harness recorded (attempts with the tokens they read and wrote, the
version the face reported, outcomes, timestamps), the content the harness itself put in
place (seeds, foreign writes), the final files, and the volume's log as plain data. Per path:

- every file content anyone saw is complete and was committed (no torn file, no refused or
  failed write visible);
- versions go up by exactly one per accepted commit (no gap, no version made twice), the
  final file is the last version, and the log lists exactly the versions the history made;
- no two accepted commits start from the same content, and each accepted commit was built on
  the version just before the one it produced (no lost update);
- with read-set isolation, every other file an accepted commit read was still current when
  it committed, and the accepted commits are serializable (no write skew);
- the final counter equals the counter the file was seeded with (or last written to from
  outside) plus the accepted increments since;
- when the content store was audited (`History.store`): every version with a hash has its bytes
  stored, hashing to it; the versions of a path run 1..n and are the ones the log lists, by the
  same writers; each stored version holds the content the history says that version was; the
  registry's current record is the last version, and the file on disk is its bytes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .history import COMMITTED, Append, Attempt, History, Hold, Move, Producer, SlotWrite

MAX_MESSAGES = 40


@dataclass
class Verdict:
    violations: int = 0
    messages: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def add(self, kind: str, message: str) -> None:
        self.violations += 1
        self.kinds[kind] += 1
        if len(self.messages) < MAX_MESSAGES:
            self.messages.append(f"{kind}: {message}")

    @property
    def ok(self) -> bool:
        return self.violations == 0


@dataclass
class Node:
    """One version of one path: who made it, from what, and when it was done."""

    path: str
    token: str
    count: int
    version: int | None
    done: float | None
    attempt: Attempt | None = None
    producer: Producer | None = None

    @property
    def expected_log(self) -> tuple[str, str | None]:
        """(kind, agent) the volume's log should give this version."""
        if self.attempt is not None:
            return ("commit", self.attempt.agent)
        assert self.producer is not None
        return ("foreign", "external") if self.producer.kind == "foreign" else ("commit", self.producer.agent)

    @property
    def label(self) -> str:
        who = self.attempt.agent if self.attempt else self.producer.kind if self.producer else "?"
        return f"{self.path}@v{self.version} ({self.token} by {who})"


def _nodes(history: History, verdict: Verdict) -> dict[str, Node]:
    """Token -> the committed content it names."""
    nodes: dict[str, Node] = {}
    for p in history.producers:
        nodes[p.token] = Node(p.path, p.token, p.count, p.version, p.t, producer=p)
    for a in history.attempts:
        if not a.committed:
            continue
        if a.token in nodes:
            verdict.add("harness", f"token {a.token} recorded twice")
        nodes[a.token] = Node(a.target, a.token, a.count, a.version, a.t_write1, attempt=a)
    return nodes


def _check_visible(history: History, nodes: dict[str, Node], verdict: Verdict) -> None:
    """Everything read, sampled or left at the end is one complete, committed content of that path."""
    seen: list[tuple[str, str | None, str]] = [(p, t, "a sample") for p, t in history.samples]
    seen += [(r.path, r.token, "the final file") for r in history.final.values() if r.error is None]
    for a in history.attempts:
        seen += [(r.path, r.token, f"a read by {a.agent}") for r in a.reads if r.error is None]
    for path, token, where in seen:
        if token is None:
            verdict.add("torn", f"{where} of {path} was not a complete payload")
        elif token not in nodes:
            verdict.add("uncommitted-visible", f"{where} of {path} returned {token}, which was never committed")
        elif nodes[token].path != path:
            verdict.add("misplaced", f"{where} of {path} returned content written to {nodes[token].path}")


def _check_versions(path: str, chain: list[Node], history: History, verdict: Verdict) -> None:
    versions = [n.version for n in chain]
    if any(v is None for v in versions):
        missing = [n.label for n in chain if n.version is None]
        verdict.add("harness", f"{path}: no version known for {missing[:3]}")
        return
    for prev, nxt in zip(chain, chain[1:], strict=False):
        if nxt.version == prev.version:
            verdict.add("duplicate-version", f"{path} v{nxt.version} made twice: {prev.label} and {nxt.label}")
        elif nxt.version != prev.version + 1:  # type: ignore[operator]
            verdict.add("version-gap", f"{path} jumps from v{prev.version} to v{nxt.version}")
    final_version = history.final_versions.get(path)
    if final_version is not None and final_version != chain[-1].version:
        verdict.add("final-version", f"{path} is at v{final_version}, the history ends at {chain[-1].label}")
    logged = history.log.get(path)
    if logged is not None:
        made = {n.version: n for n in chain}
        for v in sorted(set(logged) - set(made)):
            verdict.add("unrecorded-commit", f"the log lists {path} v{v} {logged[v]} that no recorded write made")
        for v in sorted(set(made) - set(logged)):
            verdict.add("unlogged-commit", f"{made[v].label} is missing from the log")
        for v in sorted(set(made) & set(logged)):
            if logged[v] != made[v].expected_log:
                verdict.add("log-mismatch", f"log says {path} v{v} is {logged[v]}, history: {made[v].label}")


def _check_commits(path: str, commits: list[Node], nodes: dict[str, Node], versioned: bool, verdict: Verdict) -> None:
    """Each accepted commit was built on the version just before its own; no two on the same base."""
    by_base: dict[str | None, list[Node]] = defaultdict(list)
    for n in commits:
        assert n.attempt is not None
        by_base[n.attempt.prev].append(n)
        base = nodes.get(n.attempt.prev or "")
        if base is None:
            verdict.add("unknown-base", f"{n.label} was built on {n.attempt.prev}, never committed")
            continue
        if n.count != base.count + 1:
            verdict.add("harness", f"{n.label} wrote count {n.count} on a base with count {base.count}")
        if versioned and base.version is not None and n.version is not None and n.version != base.version + 1:
            verdict.add("lost-update", f"{n.label} was built on stale {base.label}")
    for base_token, group in by_base.items():
        if len(group) > 1:
            verdict.add(
                "same-base",
                f"{len(group)} accepted commits of {path} were built on the same content "
                f"{base_token}: {', '.join(g.label for g in group[:4])}",
            )


def _check_final(path: str, chain: list[Node], history: History, versioned: bool, verdict: Verdict) -> None:
    """The final file is the last version and its counter is the base plus the accepted increments."""
    final = history.final.get(path)
    if final is None or final.token is None:
        verdict.add("final-missing", f"{path} has no complete final content")
        return
    if versioned and chain and chain[-1].token != final.token:
        verdict.add("final-content", f"{path} holds {final.token}, the last version is {chain[-1].label}")
    bases = [n for n in chain if n.attempt is None]
    if not bases:
        verdict.add("harness", f"{path} has no seed")
        return
    base = bases[-1] if versioned else bases[0]
    increments = sum(1 for n in chain if n.attempt is not None and (not versioned or n.version > base.version))
    if final.count != base.count + increments:
        verdict.add(
            "final-count",
            f"{path} counter is {final.count}, expected {base.count} + {increments} accepted "
            f"increments = {base.count + increments} "
            f"({base.count + increments - (final.count or 0)} updates lost)",
        )


def _successor(chains: dict[str, dict[int, Node]], node: Node) -> Node | None:
    return chains.get(node.path, {}).get(node.version + 1) if node.version is not None else None


def _check_read_sets(
    history: History, nodes: dict[str, Node], chains: dict[str, dict[int, Node]], verdict: Verdict
) -> None:
    """Every file an accepted commit read was still current when it committed (real time)."""
    for a in history.attempts:
        if not a.committed or a.t_write0 is None:
            continue
        for r in a.reads:
            if r.path == a.target or r.token not in nodes:
                continue
            nxt = _successor(chains, nodes[r.token])
            if nxt is not None and nxt.done is not None and nxt.done < a.t_write0:
                verdict.add(
                    "stale-read-set",
                    f"{a.agent} committed {a.target} ({a.token}) after reading "
                    f"{nodes[r.token].label}, already replaced by {nxt.label}",
                )


def _edges(history: History, nodes: dict[str, Node], chains: dict[str, dict[int, Node]]) -> dict[str, set[str]]:
    """Dependency graph over committed contents: version order, read-from, and anti-dependencies."""
    out: dict[str, set[str]] = defaultdict(set)
    for chain in chains.values():
        for v, n in chain.items():
            if v + 1 in chain:
                out[n.token].add(chain[v + 1].token)
    for a in history.attempts:
        if not a.committed:
            continue
        for r in a.reads:
            if r.token not in nodes or r.token == a.token:
                continue
            out[r.token].add(a.token)  # a read it: it comes after
            nxt = _successor(chains, nodes[r.token])
            if nxt is not None and nxt.token != a.token:
                out[a.token].add(nxt.token)  # a read the version nxt replaced: it comes before nxt
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in list(graph):
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, ()))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(component)
    return found


def _check_serializable(
    history: History, nodes: dict[str, Node], chains: dict[str, dict[int, Node]], verdict: Verdict
) -> None:
    for component in _cycles(_edges(history, nodes, chains)):
        sample = ", ".join(nodes[t].label for t in component[:4])
        verdict.add("write-skew", f"{len(component)} commits form a dependency cycle (not serializable): {sample}")


def check(history: History, isolation: str | None = None) -> Verdict:
    """Judge `history`; `isolation` overrides the one it ran with (to judge file isolation as read-set)."""
    verdict = Verdict()
    nodes = _nodes(history, verdict)
    _check_visible(history, nodes, verdict)
    by_path: dict[str, list[Node]] = defaultdict(list)
    for n in nodes.values():
        by_path[n.path].append(n)
    chains: dict[str, dict[int, Node]] = {}
    for path in sorted(set(by_path) | set(history.final)):
        chain = by_path[path]
        if history.versioned:
            chain.sort(key=lambda n: (n.version is None, n.version or 0))
            _check_versions(path, chain, history, verdict)
            chains[path] = {n.version: n for n in chain if n.version is not None}
        else:
            chain.sort(key=lambda n: n.attempt is not None)
        _check_commits(path, [n for n in chain if n.attempt is not None], nodes, history.versioned, verdict)
        _check_final(path, chain, history, history.versioned, verdict)
    if history.versioned and (isolation or history.isolation) == "read-set":
        _check_read_sets(history, nodes, chains, verdict)
        _check_serializable(history, nodes, chains, verdict)
    if history.store is not None:
        check_store(history, {path: {v: n.token for v, n in chain.items()} for path, chain in chains.items()}, verdict)
    return verdict


# ---- the content store: every version's bytes kept, whole, and the right ones ---------------

_LOGGED_AS = {
    "commit": {"commit"},
    "restore": {"restore"},
    "merge": {"merge"},
    "foreign": {"foreign"},
    "delete": {"delete", "commit", "foreign"},  # a deletion, one completed by recovery, or a foreign one
}
"""Which log kinds (`History.log`) may record a version of each kind of the versions table."""


def check_store(history: History, tokens: dict[str, dict[int, str]], verdict: Verdict) -> None:
    """Judge the audited content store (`history.store`). For every path: versions 1..n with no
    gap; a version that is not a deletion has a hash, its bytes are stored and hash to it (unless
    the retention policy pruned them; never the current version's); the registry's current record
    is the last version. For each judged path (`history.final`) also: no stored version is torn;
    the versions are exactly those the log lists, each by the writer the log names; the version
    the history made with content `tokens[path][v]` stores that content; the file on disk is the
    last version's bytes (no file after a deletion)."""
    store = history.store
    assert store is not None
    for path in sorted(set(store.versions) | set(store.current)):
        rows = store.versions.get(path, {})
        versions = sorted(rows)
        if versions != list(range(1, len(versions) + 1)):
            missing = sorted(set(range(1, (versions or [0])[-1] + 1)) - set(versions))
            verdict.add("store-gap", f"{path}: the versions table lacks v{missing[:6]}")
        for v in versions:
            row = rows[v]
            what = f"{path}@v{v} ({row.kind} by {row.writer})"
            if row.kind == "delete":
                if row.hash is not None:
                    verdict.add("store-delete", f"{what} is a deletion with a hash {row.hash}")
            elif row.state == "none":
                verdict.add("store-no-hash", f"{what} has no hash: its bytes cannot be retained")
            elif row.state == "missing":
                verdict.add("store-missing", f"{what}: no stored bytes for its hash {row.hash}")
            elif row.state == "damaged":
                verdict.add("store-damaged", f"{what}: the stored bytes do not hash to {row.hash}")
        last = rows[versions[-1]] if versions else None
        if last is not None and last.state == "pruned":
            verdict.add("store-pruned-current", f"{path}@v{last.version}: the current version's bytes were pruned")
        current = store.current.get(path)
        if current is not None and (last is None or current != (last.version, last.hash)):
            verdict.add(
                "store-current",
                f"{path}: the registry's current record is v{current[0]} {current[1]}, "
                f"the last version is {f'v{last.version} {last.hash}' if last else 'none'}",
            )
    for path in sorted(history.final):
        _check_stored_path(path, history, tokens.get(path, {}), verdict)


def _check_stored_path(path: str, history: History, tokens: dict[int, str], verdict: Verdict) -> None:
    store = history.store
    assert store is not None
    rows = store.versions.get(path, {})
    for v, row in sorted(rows.items()):
        if row.read is not None and row.read.token is None:
            verdict.add("store-torn", f"{path}@v{v} ({row.kind} by {row.writer}) stores no complete payload")
    logged = history.log.get(path, {})
    for v in sorted(set(rows) - set(logged)):
        verdict.add("store-unlogged", f"{path}@v{v} ({rows[v].kind} by {rows[v].writer}) is not in the log")
    for v in sorted(set(logged) - set(rows)):
        verdict.add("store-unrecorded", f"the log lists {path} v{v} {logged[v]}, the versions table does not")
    for v in sorted(set(rows) & set(logged)):
        kind, agent = logged[v]
        row = rows[v]
        if row.writer != agent or kind not in _LOGGED_AS.get(row.kind, set()):
            verdict.add(
                "store-log", f"{path}@v{v} is {row.kind} by {row.writer} in the versions table, {logged[v]} in the log"
            )
    for v, token in sorted(tokens.items()):
        row = rows.get(v)
        if row is not None and row.read is not None and row.read.token != token:
            verdict.add("store-content", f"{path}@v{v} stores {row.read.token}, the history made it {token}")
    if rows or path in store.disk:
        last = rows[max(rows)] if rows else None
        expected = last.hash if last is not None else None
        if store.disk.get(path) != expected:
            verdict.add(
                "store-final",
                f"{path} on disk hashes to {store.disk.get(path)}, its last version "
                f"{f'v{last.version}' if last else '(none)'} is {expected}",
            )


# ---- appends: every accepted line is there, once, in its writer's order ---------------------


def check_appends(
    path: str,
    appends: list[Append],
    final: str | None,
    seed_lines: list[str],
    log: dict[int, tuple[str, str]] | None = None,
    seed_agent: str | None = None,
) -> Verdict:
    """Judge a file that agents only appended lines to (each line a unique token). Every accepted
    append is in the final file exactly once, in the order its writer appended; a refused one is
    not; nothing else is; and, when `log` (version -> (kind, agent)) is given, each line is one
    version of its agent: versions 1..n with no gap, each agent's commits = its lines present."""
    verdict = Verdict()
    if final is None:
        verdict.add("final-missing", f"{path} is gone")
        return verdict
    if final and not final.endswith("\n"):
        verdict.add("torn", f"{path} ends in a partial line")
    lines = final.splitlines()
    if lines[: len(seed_lines)] != seed_lines:
        verdict.add("lost-update", f"{path} no longer starts with its seed lines")
    by_token = {a.token: a for a in appends}
    positions: dict[str, list[int]] = defaultdict(list)
    for i, line in enumerate(lines[len(seed_lines) :], start=len(seed_lines)):
        if line in by_token:
            positions[line].append(i)
        else:
            verdict.add("uncommitted-visible", f"line {i + 1} of {path} ({line[:60]!r}) was never appended")
    present: dict[str, int] = defaultdict(int)
    for a in appends:
        n = len(positions.get(a.token, ()))
        if n:
            present[a.agent] += 1
        if n > 1:
            verdict.add("duplicate-line", f"{a.writer}'s append {a.token} is in {path} {n} times")
        if a.outcome == COMMITTED and n == 0:
            verdict.add("lost-line", f"{a.writer}'s accepted append {a.token} is missing from {path}")
        elif a.outcome == "refused" and n:
            verdict.add("uncommitted-visible", f"{a.writer}'s refused append {a.token} is in {path}")
    order: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for a in appends:
        if positions.get(a.token):
            order[a.writer].append((a.seq, positions[a.token][0]))
    for writer, seen in order.items():
        seen.sort()
        if any(later < earlier for (_, earlier), (_, later) in zip(seen, seen[1:], strict=False)):
            verdict.add("reordered", f"{writer}'s lines are not in the order it appended them in {path}")
    if log is not None:
        _check_line_versions(path, log, present, seed_agent, verdict)
    return verdict


def _check_line_versions(
    path: str, log: dict[int, tuple[str, str]], present: dict[str, int], seed_agent: str | None, verdict: Verdict
) -> None:
    """One version per line (or per slot write): the log's commits of `path` by each agent are its
    lines present; `seed_agent` made v1, the seed."""
    versions = sorted(log)
    if versions != list(range(1, len(versions) + 1)):
        verdict.add("version-gap", f"{path}'s versions are not 1..{len(versions)}: {versions[:8]}…")
    commits: dict[str, int] = defaultdict(int)
    for version, (kind, agent) in log.items():
        if kind != "commit":
            verdict.add("log-mismatch", f"{path} v{version} is a {kind} by {agent}: only appends were made")
        else:
            commits[agent] += 1
    if seed_agent is not None:
        if log.get(1) != ("commit", seed_agent):
            verdict.add("log-mismatch", f"{path} v1 is {log.get(1)}, not the seed by {seed_agent}")
        else:
            commits[seed_agent] -= 1
    for agent in sorted(set(commits) | set(present)):
        if commits[agent] > present[agent]:
            verdict.add(
                "unrecorded-commit",
                f"the log lists {commits[agent]} commits of {path} by {agent}, "
                f"{present[agent]} of its lines are in the file",
            )
        elif commits[agent] < present[agent]:
            verdict.add(
                "unlogged-commit",
                f"{present[agent]} lines of {agent} are in {path}, the log lists {commits[agent]} commits",
            )


# ---- slots: in-place increments of fixed-width fields of one shared file --------------------


def parse_slots(text: str | None) -> dict[str, int] | None:
    """`name value` per line (as same_agent writes them), or None if the file is not that."""
    if text is None or (text and not text.endswith("\n")):
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or fields[0] in out:
            return None
        out[fields[0]] = int(fields[1])
    return out


def check_slots(
    path: str,
    writes: list[SlotWrite],
    final: str | None,
    seeds: dict[str, int],
    log: dict[int, tuple[str, str]] | None = None,
    seed_agent: str | None = None,
) -> Verdict:
    """Each slot has one writing process, so its increments are sequential: every write handle must
    read the value of the slot's last accepted write (a lower value: a later commit of another
    handle clobbered it, a lost update; a higher one: a refused write became visible), and the
    final file must hold every slot's last accepted value. With `log`: one version per accepted
    write, versions 1..n with no gap."""
    verdict = Verdict()
    values = parse_slots(final)
    if values is None or set(values) != set(seeds):
        verdict.add("torn", f"{path} is not one well-formed line per slot: {(final or '')[:120]!r}")
        values = values or {}
    expected = dict(seeds)
    accepted: dict[str, int] = defaultdict(int)
    for w in sorted(writes, key=lambda w: (w.slot, w.seq)):
        if w.read is not None and w.read != expected[w.slot]:
            kind = "lost-update" if w.read < expected[w.slot] else "uncommitted-visible"
            verdict.add(
                kind, f"{w.slot} write {w.seq} read {w.read} in {path}, its last accepted write left {expected[w.slot]}"
            )
        if w.outcome == COMMITTED:
            if w.read is None or w.wrote != w.read + 1:
                verdict.add("harness", f"{w.slot} write {w.seq} wrote {w.wrote} after reading {w.read}")
            expected[w.slot] = w.wrote if w.wrote is not None else expected[w.slot]
            accepted[w.agent] += 1
    for slot, value in expected.items():
        if slot in values and values[slot] != value:
            verdict.add("final-count", f"{path}: slot {slot} holds {values[slot]}, its last accepted write was {value}")
    if log is not None:
        _check_line_versions(path, log, accepted, seed_agent, verdict)
    return verdict


# ---- moves: content that renames and exchanges carry between paths ---------------------------


@dataclass
class _Entry:
    token: str | None  # None: a tombstone
    label: str
    logged_as: tuple[str, str | None]


def check_moves(history: History) -> Verdict:
    """Judge a history in which renames and exchanges moved contents between paths (and out of and
    back into the managed paths): `history.moves` say what each one moved, with the token its
    mover read at the source just before.

    Per managed path: every version is made by exactly one recorded action (a seed, an accepted
    increment, or an accepted move: a tombstone where it took a file away, the moved content where
    it put one), versions go 1..n with no gap, the log lists exactly those (as commit or delete, by
    whom), and the final file is the last version. Every increment was built on the version just
    before its own. Every move carried what its source held just before (its mover's view was
    current), and what it parked outside the managed paths is what it brings back. Per counter (a seed and the increments built on it, wherever
    moves carried it): no two increments on one base, and its last increment is in exactly one
    final file, with the seed's count plus the accepted increments. A refused move changed no file
    and its refusal is in the log. Every content anyone saw was committed, at that path (or at one
    a move connected it with: a name looked up just before a move opens the file it carried)."""
    verdict = Verdict()
    managed = lambda p: any(p.startswith(m) for m in history.managed)  # noqa: E731
    nodes = _nodes(history, verdict)
    entries: dict[str, dict[int, _Entry]] = defaultdict(dict)

    def put(path: str, version: int | None, entry: _Entry) -> None:
        if version is None:
            verdict.add("harness", f"no version known for {entry.label}")
        elif version in entries[path]:
            verdict.add(
                "duplicate-version", f"{path} v{version} made twice: {entries[path][version].label} and {entry.label}"
            )
        else:
            entries[path][version] = entry

    for p in history.producers:
        put(
            p.path,
            p.version,
            _Entry(
                p.token,
                f"{p.path}@v{p.version} (seed {p.token})",
                ("foreign", "external") if p.kind == "foreign" else ("commit", p.agent),
            ),
        )
    for a in history.attempts:
        if a.committed and managed(a.target):
            put(
                a.target,
                a.version,
                _Entry(a.token, f"{a.target}@v{a.version} ({a.token} by {a.agent})", ("commit", a.agent)),
            )
    moves = sorted((m for m in history.moves if m.committed), key=lambda m: m.t0)
    for m in moves:
        what = (
            f"{m.agent}'s {m.op} {m.src} <-> {m.dst}"
            if m.op == "exchange"
            else f"{m.agent}'s rename {m.src} -> {m.dst}"
        )
        into = {to for _, to, _ in m.files}
        for frm, to, token in m.files:
            assert frm is not None and to is not None
            if managed(to):
                if to not in m.versions:
                    verdict.add(
                        "unlogged-move",
                        f"{what} put {token} at {to}, the log has no commit of it by {m.agent} at that time",
                    )
                else:
                    put(
                        to,
                        m.versions[to],
                        _Entry(token, f"{to}@v{m.versions[to]} ({token}, moved there by {what})", ("commit", m.agent)),
                    )
            if managed(frm) and frm not in into:
                if frm not in m.versions:
                    verdict.add(
                        "unlogged-move",
                        f"{what} took {token} away from {frm}, the log has no deletion of it by {m.agent} at that time",
                    )
                else:
                    put(
                        frm,
                        m.versions[frm],
                        _Entry(None, f"{frm}@v{m.versions[frm]} (deleted by {what})", ("delete", m.agent)),
                    )
    for path in sorted(set(entries) | set(history.log)):
        _check_entry_versions(path, entries.get(path, {}), history, verdict)
    for a in history.attempts:
        if a.committed and a.version is not None:
            before = entries[a.target].get(a.version - 1)
            if before is not None and before.token != a.prev:  # an unknown one is a version-gap already
                verdict.add(
                    "lost-update",
                    f"{a.agent}'s {a.token} made {a.target} v{a.version} from {a.prev}, but "
                    f"v{a.version - 1} is {before.label}",
                )
    _check_carried(moves, entries, managed, verdict)
    _check_counters(history, nodes, verdict)
    _check_refused_moves(history, verdict)
    _check_seen_at(history, nodes, entries, managed, verdict)
    return verdict


def _check_entry_versions(path: str, chain: dict[int, _Entry], history: History, verdict: Verdict) -> None:
    versions = sorted(chain)
    if versions and versions != list(range(1, versions[-1] + 1)):
        missing = sorted(set(range(1, versions[-1] + 1)) - set(versions))
        verdict.add("version-gap", f"{path}: no recorded action made v{missing[:6]}")
    final_version = history.final_versions.get(path)
    if final_version is not None and final_version != (versions[-1] if versions else 0):
        verdict.add(
            "final-version", f"{path} is at v{final_version}, the history ends at v{versions[-1] if versions else 0}"
        )
    final = history.final.get(path)
    on_disk = final.token if final is not None and final.error is None else None
    present = final is not None and final.error is None
    last = chain[versions[-1]] if versions else None
    if last is not None and (present != (last.token is not None) or (last.token is not None and on_disk != last.token)):
        verdict.add(
            "final-content", f"{path} holds {on_disk if present else 'no file'}, the last version is {last.label}"
        )
    logged = history.log.get(path, {})
    for v in sorted(set(logged) - set(chain)):
        verdict.add("unrecorded-commit", f"the log lists {path} v{v} {logged[v]} that no recorded action made")
    for v in sorted(set(chain) - set(logged)):
        verdict.add("unlogged-commit", f"{chain[v].label} is missing from the log")
    for v in sorted(set(chain) & set(logged)):
        if logged[v] != chain[v].logged_as:
            verdict.add("log-mismatch", f"log says {path} v{v} is {logged[v]}, history: {chain[v].label}")


def _check_carried(
    moves: list[Move], entries: dict[str, dict[int, _Entry]], managed: Callable[[str], bool], verdict: Verdict
) -> None:
    """Each move carried what its source held just before. What a move parked outside the managed
    paths comes back as it was left there (`moves` in time order)."""
    parked: dict[str, str | None] = {}
    for m in moves:
        for frm, to, token in m.files:
            assert frm is not None and to is not None
            if managed(frm):
                if frm in m.versions:
                    before = entries[frm].get(m.versions[frm] - 1)
                    if before is None or before.token != token:
                        verdict.add(
                            "moved-stale",
                            f"{m.agent}'s {m.op} carried {token} out of {frm}, which held "
                            f"{before.label if before else 'nothing known'} just before",
                        )
            elif frm in parked and parked.pop(frm) != token:
                verdict.add(
                    "moved-stale", f"{m.agent}'s {m.op} brought {token} back from {frm}, not what was parked there"
                )
        for _, to, token in m.files:
            if to is not None and not managed(to):
                parked[to] = token


def _check_counters(history: History, nodes: dict[str, Node], verdict: Verdict) -> None:
    """Per counter (seed and the increments built on it): one chain, all of it accounted for at the end."""
    root: dict[str, str] = {p.token: p.token for p in history.producers if p.kind == "seed"}
    commits = [a for a in history.attempts if a.committed]
    children: dict[str | None, list[Attempt]] = defaultdict(list)
    for a in commits:
        children[a.prev].append(a)
    for base, group in children.items():
        if len(group) > 1:
            verdict.add(
                "same-base",
                f"{len(group)} accepted increments were built on {base}: "
                f"{', '.join(f'{g.token} by {g.agent}' for g in group[:4])}",
            )
    pending = list(commits)
    while pending:  # counters through any number of increments, in any recording order
        left = [a for a in pending if a.prev not in root]
        for a in pending:
            if a.prev in root:
                root[a.token] = root[a.prev]
                base = nodes.get(a.prev)
                if base is not None and a.count != base.count + 1:
                    verdict.add("harness", f"{a.token} wrote count {a.count} on a base with count {base.count}")
        if len(left) == len(pending):
            for a in left:
                verdict.add(
                    "unknown-base", f"{a.agent}'s {a.token} of {a.target} was built on {a.prev}, never committed"
                )
            break
        pending = left
    increments: dict[str, int] = defaultdict(int)
    for a in commits:
        if a.token in root:
            increments[root[a.token]] += 1
    where: dict[str, list[str]] = defaultdict(list)
    for path, r in history.final.items():
        if r.token is not None:
            where[r.token].append(path)
    for seed in (p for p in history.producers if p.kind == "seed"):
        expected = seed.count + increments[seed.token]
        tips = [t for t, r in root.items() if r == seed.token and t in nodes and nodes[t].count == expected]
        if len(tips) != 1:
            verdict.add("harness", f"counter {seed.token} has {len(tips)} increments with its final count {expected}")
            continue
        found = where.get(tips[0], [])
        if len(found) != 1:
            verdict.add(
                "final-count",
                f"counter {seed.token}: its last increment {tips[0]} (count {expected}) is in "
                f"{len(found)} final files {found[:3]}",
            )
    for token, paths in where.items():
        r = root.get(token)
        if r is not None and nodes[token].count != nodes[r].count + increments[r]:
            verdict.add(
                "final-count",
                f"{paths[0]} holds {token} (count {nodes[token].count}), not the last increment of its counter",
            )


def _check_refused_moves(history: History, verdict: Verdict) -> None:
    """A refused move changed no file (the trees under both names are as they were), and one the
    protocol refused (EACCES, not the mount's EBUSY for unsaved changes) is in the log; a move that
    failed otherwise (neither done nor refused) is a finding of its own."""
    for m in history.moves:
        if m.outcome not in ("refused", "error"):
            continue
        if m.outcome == "error":
            verdict.add(
                "move-error", f"{m.agent}'s {m.op} {m.src} {m.dst} failed with {m.reason}: neither done nor refused"
            )
        if sorted(m.before) != sorted(m.after):
            verdict.add(
                "refused-but-moved",
                f"{m.agent}'s {m.outcome} {m.op} {m.src} {m.dst} changed the files: "
                f"{sorted(set(m.before) ^ set(m.after))[:4]}",
            )
        t1 = m.t1 if m.t1 is not None else m.t0
        if (
            m.outcome == "refused"
            and m.reason == "EACCES"
            and not any(agent == m.agent and m.t0 <= at <= t1 for agent, _, at in history.refusals)
        ):
            verdict.add("unlogged-refusal", f"{m.agent}'s {m.op} {m.src} {m.dst} was refused, the log has no refusal")


def _check_seen_at(
    history: History,
    nodes: dict[str, Node],
    entries: dict[str, dict[int, _Entry]],
    managed: Callable[[str], bool],
    verdict: Verdict,
) -> None:
    """Every content read, sampled or left at the end was committed, and was at that path at some version."""
    seen: list[tuple[str, str | None, str]] = [(p, t, "a sample") for p, t in history.samples]
    seen += [(r.path, r.token, "the final file") for r in history.final.values() if r.error is None]
    for a in history.attempts:
        seen += [(r.path, r.token, f"a read by {a.agent}") for r in a.reads if r.error is None]
    for m in history.moves:
        seen += [(frm, token, f"a read by {m.agent}") for frm, _, token in m.files if token is not None]  # type: ignore[misc]
    at: dict[str, set[str | None]] = {path: {e.token for e in chain.values()} for path, chain in entries.items()}
    related: dict[str, set[str]] = defaultdict(set)  # a name looked up before a move opens the file after it
    for m in history.moves:
        if m.committed:
            for frm, to, _ in m.files:
                related[frm].add(to)  # type: ignore[index,arg-type]
                related[to].add(frm)  # type: ignore[index,arg-type]
    for path, token, where in seen:
        if token is None:
            verdict.add("torn", f"{where} of {path} was not a complete payload")
        elif token not in nodes:
            verdict.add("uncommitted-visible", f"{where} of {path} returned {token}, which was never committed")
        elif managed(path) and not any(token in at.get(p, set()) for p in {path} | related[path]):
            verdict.add("misplaced", f"{where} of {path} returned {token}, which no version of {path} holds")


# ---- grants: nobody else writes while a grant is held ---------------------------------------


def check_holds(holds: list[Hold], events: list[dict], attempts: list[Attempt]) -> Verdict:
    """`holds` are what holders recorded; `events` the volume's log as plain dicts (kind, path, agent,
    at, detail). Each recorded hold lies within a grant of its agent that the log shows, from its
    `grant` event to the `release` (or `reclaim`) that ended it; no other agent's commit of that
    path is logged inside such a grant, and no accepted attempt of another agent ran wholly inside
    a recorded hold; a grant whose holder was killed is reclaimed only once it expired (a holder in
    another PID namespace cannot be judged dead from here), never before `expires_at`."""
    verdict = Verdict()
    agents = {h.agent for h in holds}
    spans: list[tuple[str, str, float, float, dict | None]] = []  # agent, path, from, to, the event that ended it
    open_: dict[tuple[str, str], float] = {}
    for e in sorted(events, key=lambda e: e["at"]):
        key = (e["agent"], e["path"])
        if e["agent"] not in agents:
            continue
        if e["kind"] == "grant":
            open_[key] = e["at"]
        elif e["kind"] in ("release", "reclaim") and key in open_:
            spans.append((*key, open_.pop(key), e["at"], e))
    spans += [(*key, at, float("inf"), None) for key, at in open_.items()]
    for h in holds:
        end = h.end if h.end is not None else h.start
        if not any(a == h.agent and p == h.path and s <= h.start and end <= t for a, p, s, t, _ in spans):
            verdict.add(
                "unlogged-grant",
                f"{h.agent} held {h.path} from {h.start:.3f} ({h.where}), the log shows no grant of it then",
            )
        if h.end is None:
            ended = [e for a, p, s, t, e in spans if a == h.agent and p == h.path and s <= h.start <= t]
            for e in ended:
                if e is None:
                    continue
                if e["kind"] != "reclaim" or e["at"] < h.expires_at:
                    verdict.add(
                        "early-reclaim",
                        f"the grant of killed {h.agent} ({h.where}) on {h.path} ended by "
                        f"{e['kind']} ({e.get('detail')}) {h.expires_at - e['at']:.2f} s "
                        "before it expired",
                    )
    for e in events:
        if e["kind"] not in ("commit", "merge", "restore"):  # an agent's commit, by its version's kind
            continue
        for a, p, s, t, _ in spans:
            if p == e["path"] and a != e["agent"] and s < e["at"] < t:
                verdict.add("held-write", f"{e['agent']} committed {p} v{e['version']} while {a} held its grant")
    for x in attempts:
        if not x.committed or x.t_write0 is None or x.t_write1 is None:
            continue
        for h in holds:
            end = h.end if h.end is not None else h.expires_at
            if h.path == x.target and h.agent != x.agent and h.start < x.t_write0 and x.t_write1 < end:
                verdict.add(
                    "held-write",
                    f"{x.agent}'s {x.token} of {x.target} was accepted while {h.agent} held it ({h.where})",
                )
    return verdict
