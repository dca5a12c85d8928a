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
  outside) plus the accepted increments since.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from .history import Attempt, History, Producer

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
    for prev, nxt in zip(chain, chain[1:]):
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


def _check_commits(path: str, commits: list[Node], nodes: dict[str, Node], versioned: bool,
                   verdict: Verdict) -> None:
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
            verdict.add("same-base", f"{len(group)} accepted commits of {path} were built on the same content "
                                     f"{base_token}: {', '.join(g.label for g in group[:4])}")


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
        verdict.add("final-count", f"{path} counter is {final.count}, expected {base.count} + {increments} accepted "
                                   f"increments = {base.count + increments} "
                                   f"({base.count + increments - (final.count or 0)} updates lost)")


def _successor(chains: dict[str, dict[int, Node]], node: Node) -> Node | None:
    return chains.get(node.path, {}).get(node.version + 1) if node.version is not None else None


def _check_read_sets(history: History, nodes: dict[str, Node], chains: dict[str, dict[int, Node]],
                     verdict: Verdict) -> None:
    """Every file an accepted commit read was still current when it committed (real time)."""
    for a in history.attempts:
        if not a.committed or a.t_write0 is None:
            continue
        for r in a.reads:
            if r.path == a.target or r.token not in nodes:
                continue
            nxt = _successor(chains, nodes[r.token])
            if nxt is not None and nxt.done is not None and nxt.done < a.t_write0:
                verdict.add("stale-read-set", f"{a.agent} committed {a.target} ({a.token}) after reading "
                                              f"{nodes[r.token].label}, already replaced by {nxt.label}")


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


def _check_serializable(history: History, nodes: dict[str, Node], chains: dict[str, dict[int, Node]],
                        verdict: Verdict) -> None:
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
    return verdict
