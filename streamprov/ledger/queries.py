"""Graph queries over the provenance DAG: upstream lineage and downstream impact, in dependency order.

The traversals only ask four questions of the store (`GraphLookup`): which applications produced a
node, which consumed it, which nodes a DataID has, and what an application was. Each answer is a
prefix scan in the index, so a query visits exactly the part of the graph it returns: its cost grows
with the answer, never with the ledger (bench/bench_ledger_queries.py measures it).

Results are in dependency order (an application comes after every application that produced one of
its inputs), which is the order a recompute replays them in. Ties are broken by ledger position, so
the order is deterministic. Content addressing can make cycles: an identity step maps a node onto
itself (same DataID, same bytes). Self-loops are ignored for ordering; a longer cycle is reported
(`cyclic`) and its members are placed in ledger order.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from streamprov.ledger.model import ApplicationKind, DataRef, LedgerEntry


class GraphLookup(Protocol):
    def producers(self, node: DataRef) -> list[bytes]:
        """entry_ids of the applications whose output is `node`."""
        ...

    def consumers(self, node: DataRef) -> list[bytes]:
        """entry_ids of the applications with `node` among their inputs."""
        ...

    def versions(self, data_id: str) -> list[DataRef]:
        """Every node (version) of `data_id` the ledger has seen."""
        ...

    def entry(self, entry_id: bytes) -> LedgerEntry: ...


class EdgeLookup(GraphLookup, Protocol):
    """What a traversal that records its edges asks besides (`downstream_edges`)."""

    def consumers_at(self, node: DataRef) -> list[tuple[bytes, tuple[int, ...] | None]]:
        """(entry_id, the node's positions among its inputs, None when not known) of each
        application consuming `node`."""
        ...

    def head(self, entry_id: bytes) -> EntryHead | None:
        """The application without its inputs decoded, when the store keeps one for it."""
        ...


@dataclass(frozen=True, slots=True)
class EntryHead:
    """An entry whose inputs were not decoded (its application's `inputs` is empty): a reduce over
    many inputs, read by a traversal that only needs the inputs it came through."""

    entry: LedgerEntry
    input_count: int


@dataclass(frozen=True, slots=True)
class Applied:
    """An application in a query's answer, `depth` steps from where the query started."""

    entry: LedgerEntry
    depth: int
    reached: tuple[tuple[int, DataRef], ...] | None = None
    """(position, node) of each input the traversal came through (a root, or the output of another
    application of the answer), in position order; None when the traversal did not record them."""
    input_count: int | None = None
    """Set for an `EntryHead`'s entry: its inputs were not decoded (`entry.application.inputs` is
    empty), it has this many."""

    def edge_inputs(self) -> Iterable[DataRef]:
        """The inputs that can link it to other applications of the answer: those it was reached
        through when recorded (the same edges), else all of them."""
        if self.reached is not None:
            return dict.fromkeys(r for _, r in self.reached)
        return dict.fromkeys(self.entry.application.inputs)


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """Where `target` came from: the applications that led to it, oldest first, and its sources."""

    target: DataRef
    applications: tuple[Applied, ...]
    sources: tuple[DataRef, ...]
    """Nodes with no producing application, or produced by a SOURCE entry: the original data."""
    truncated: bool
    """The depth or size limit stopped the walk before every source was reached."""
    cyclic: bool


@dataclass(frozen=True, slots=True)
class DownstreamResult:
    """What derives from `roots`: every affected application in dependency order."""

    roots: tuple[DataRef, ...]
    applications: tuple[Applied, ...]
    truncated: bool
    cyclic: bool

    @property
    def outputs(self) -> tuple[DataRef, ...]:
        """Every affected output node, in dependency order (each once)."""
        seen: dict[DataRef, None] = {}
        for a in self.applications:
            seen.setdefault(a.entry.application.output, None)
        return tuple(seen)


def dependency_order(found: Iterable[Applied]) -> tuple[tuple[Applied, ...], bool]:
    """Kahn's algorithm over the applications found (edges only among them); ties by seq.

    Returns the order and whether a cycle (other than self-loops) was left over.
    """
    apps = {a.entry.entry_id: a for a in found}
    producers: dict[DataRef, list[bytes]] = {}
    for eid, a in apps.items():
        producers.setdefault(a.entry.application.output, []).append(eid)
    waiting: dict[bytes, int] = {}
    dependents: dict[bytes, list[bytes]] = {}
    for eid, a in apps.items():
        n = 0
        for ref in a.edge_inputs():
            for p in producers.get(ref, ()):
                if p != eid:
                    n += 1
                    dependents.setdefault(p, []).append(eid)
        waiting[eid] = n
    ready = [(apps[eid].entry.seq, eid) for eid, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    ordered: list[Applied] = []
    while ready:  # each application enters `ready` once
        _, eid = heapq.heappop(ready)
        ordered.append(apps[eid])
        for d in dependents.get(eid, ()):
            waiting[d] -= 1
            if waiting[d] == 0:
                heapq.heappush(ready, (apps[d].entry.seq, d))
    cyclic = len(ordered) < len(apps)
    if cyclic:
        done = {a.entry.entry_id for a in ordered}
        ordered += sorted((a for eid, a in apps.items() if eid not in done), key=lambda a: a.entry.seq)
    return tuple(ordered), cyclic


def upstream(
    lookup: GraphLookup, target: DataRef, *, max_depth: int | None = None, limit: int | None = None
) -> UpstreamResult:
    """The lineage of `target` back to its sources, at most `max_depth` applications deep."""
    found: dict[bytes, Applied] = {}
    sources: dict[DataRef, None] = {}
    seen = {target}
    queue: deque[tuple[DataRef, int]] = deque([(target, 0)])
    truncated = False
    while queue:  # each node is queued once
        ref, depth = queue.popleft()
        producer_ids = lookup.producers(ref)
        if not producer_ids:
            sources.setdefault(ref, None)
            continue
        if (max_depth is not None and depth >= max_depth) or (limit is not None and len(found) >= limit):
            truncated = True
            continue
        for eid in producer_ids:
            if eid in found:
                continue
            entry = lookup.entry(eid)
            found[eid] = Applied(entry, depth + 1)
            if entry.application.kind is ApplicationKind.SOURCE:
                sources.setdefault(ref, None)
            for inp in entry.application.inputs:
                if inp not in seen:
                    seen.add(inp)
                    queue.append((inp, depth + 1))
    ordered, cyclic = dependency_order(found.values())
    return UpstreamResult(target, ordered, tuple(sources), truncated, cyclic)


def downstream(
    lookup: GraphLookup, roots: Iterable[DataRef], *, limit: int | None = None
) -> DownstreamResult:
    """Every application that (transitively) consumed one of `roots`, in dependency order."""
    return _downstream(lookup, tuple(roots), (), limit)


def downstream_of_applications(
    lookup: GraphLookup, entry_ids: Iterable[bytes], *, limit: int | None = None
) -> DownstreamResult:
    """The given applications and everything downstream of their outputs (a function's impact)."""
    first = [Applied(lookup.entry(eid), 0) for eid in entry_ids]
    roots = tuple(dict.fromkeys(a.entry.application.output for a in first))
    return _downstream(lookup, roots, first, limit)


def downstream_edges(
    lookup: EdgeLookup,
    roots: Iterable[DataRef],
    *,
    entry_ids: Iterable[bytes] = (),
    limit: int | None = None,
) -> DownstreamResult:
    """`downstream` of `roots` and of the applications `entry_ids` (`downstream_of_applications`),
    for a recompute plan: each application found records the inputs it was reached through, with
    their positions (`Applied.reached`), and one the store keeps a head of is not decoded
    (`Applied.input_count`): a plan reads of a reduce over 100 inputs only the one that changed."""
    first = [Applied(lookup.entry(eid), 0) for eid in entry_ids]
    tops = tuple(dict.fromkeys((*roots, *(a.entry.application.output for a in first))))
    return _downstream(lookup, tops, first, limit, edges=lookup)


def _downstream(
    lookup: GraphLookup,
    roots: tuple[DataRef, ...],
    first: Iterable[Applied],
    limit: int | None,
    *,
    edges: EdgeLookup | None = None,
) -> DownstreamResult:
    found: dict[bytes, Applied] = {a.entry.entry_id: a for a in first}
    reached: dict[bytes, list[tuple[int, DataRef]]] = {eid: [] for eid in found}
    seen = set(roots)
    queue: deque[tuple[DataRef, int]] = deque((r, 0) for r in roots)
    truncated = False
    while queue:  # each node is queued once
        ref, depth = queue.popleft()
        hits = edges.consumers_at(ref) if edges is not None else [(e, None) for e in lookup.consumers(ref)]
        for eid, positions in hits:
            if eid not in found:
                if limit is not None and len(found) >= limit:
                    truncated = True
                    break
                head = edges.head(eid) if edges is not None and positions is not None else None
                if head is None:
                    found[eid] = Applied(lookup.entry(eid), depth + 1)
                else:
                    found[eid] = Applied(head.entry, depth + 1, input_count=head.input_count)
                reached[eid] = []
                out = found[eid].entry.application.output
                if out not in seen:
                    seen.add(out)
                    queue.append((out, depth + 1))
            if edges is not None:
                at = positions
                if at is None:  # an index made before positions were kept: from the entry
                    at = tuple(i for i, r in enumerate(found[eid].entry.application.inputs) if r == ref)
                reached[eid] += [(p, ref) for p in at]
    if edges is not None:
        found = {
            eid: Applied(a.entry, a.depth, tuple(sorted(reached[eid], key=lambda x: x[0])), a.input_count)
            for eid, a in found.items()
        }
    ordered, cyclic = dependency_order(found.values())
    return DownstreamResult(roots, ordered, truncated, cyclic)
