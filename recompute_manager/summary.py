"""Reduce summaries: what a reduce output's header commits to, input by input.

A reduce header commits to all of its inputs: the input digest's Merkle root over every input's
(DataID, checksum), the sources root over every input's (DataID, source checksum), and the lineage
the inputs share. Recomputing it after k of its n inputs changed needs either all n inputs' headers
(O(n) reads and hashes, what the full fold and `Executor._incremental` do) or this summary of the
previous output: both trees' leaf hashes and each input's lineage, from which the new roots cost
O(k log n) hashes (`merkle.root_with_hashes`) and the new shared lineage one prefix over the distinct
lineages still present. A delta task (`RecomputeTask.input_count`) runs against it
(`Executor._delta`).

Summaries are kept by the **inputs Merkle root** of the output they describe (`ResultCache`), not by
the output node: two folds can make the same output bytes from different inputs, never the same
inputs root. The executor stores one for every reduce output it makes; `summary_of` builds one for a
pipeline's reduce output from its ledger entry's inputs and their headers.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from streamprov.errors import FunctionNotFoundError, HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.ledger import keys
from streamprov.ledger.index import HEAD_MIN_INPUTS
from streamprov.ledger.model import DataRef, LedgerEntry
from streamprov.lineage import Step, StepKind, encode_lineage
from streamprov.merkle import HASH_SIZE, FlatTree, leaf_hash
from streamprov.registry import FunctionRegistry
from streamprov.stamp import reduce_leaf, reduce_leaves

if TYPE_CHECKING:
    from recompute_manager.cache import ResultCache

__all__ = [
    "InputParts",
    "ReduceSummary",
    "SummaryError",
    "SummaryKeeper",
    "input_parts",
    "summary_of",
    "with_inverse",
]

_VERSION = 1
_HEAD = struct.Struct(">BII")  # version, inputs, distinct lineages
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
MAX_INPUTS = 1 << 16
"""Inputs a summary holds: (2n - 1) x 2 hashes of 32 bytes, 8 MB at most. A reduce over more is
recomputed from its inputs' headers."""
MAX_LINEAGES = 65_535
"""Distinct lineages among one reduce's inputs that a summary holds (a u16 index each)."""


class SummaryError(StreamprovError):
    """Bytes that are not a reduce summary of this version."""


@dataclass(frozen=True, slots=True)
class InputParts:
    """What one input adds to a reduce header: its inputs-tree and sources-tree leaf hashes and its
    encoded lineage."""

    input_hash: bytes
    source_hash: bytes
    lineage: bytes


def input_parts(node: DataRef, header: bytes | ProvenanceHeader) -> InputParts | None:
    """The parts of an input `node` read with `header` (encoded headers read in place), or None when
    the header names another (DataID, checksum) than the node: the fold digests the header, the
    summary the node, and they must agree."""
    found = reduce_leaves(header) if isinstance(header, bytes) else None
    if found is None:
        try:
            h = header if isinstance(header, ProvenanceHeader) else ProvenanceHeader.decode(header)
        except HeaderError:
            return None
        leaf, source, lineage = (
            reduce_leaf(h.data_id, h.checksum),
            reduce_leaf(h.data_id, h.source_checksum),
            encode_lineage(h.lineage),
        )
    else:
        leaf, source, lineage = found
    if leaf != reduce_leaf(node.data_id, node.checksum):
        return None
    return InputParts(leaf_hash(leaf), leaf_hash(source), lineage)


@dataclass(frozen=True, slots=True)
class ReduceSummary:
    """Per input, in order: the node, both trees' leaf hashes (with every node above them: a
    `FlatTree` each) and the lineage (an index into `lineages`)."""

    nodes: bytes
    """The inputs' `keys.node` encodings, one after the other (parsed on demand: `node`)."""
    offsets: tuple[int, ...]
    """Where each input's node starts in `nodes`."""
    inputs_tree: FlatTree
    sources_tree: FlatTree
    lineages: tuple[bytes, ...]
    """The distinct encoded lineages among the inputs."""
    lineage_of: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.offsets)

    def node(self, i: int) -> DataRef:
        return keys.parse_node(self.nodes, self.offsets[i])

    def parts(self, i: int) -> InputParts:
        return InputParts(
            self.inputs_tree.leaf(i), self.sources_tree.leaf(i), self.lineages[self.lineage_of[i]]
        )

    def input_nodes(self) -> SummaryNodes:
        """Every input node, parsed when read (a ledger entry lists them; a header does not)."""
        return SummaryNodes(self)

    def lineages_present(self) -> list[bytes]:
        """The distinct lineages some input has (one that every input of it lost is left out)."""
        used = set(self.lineage_of)
        return [lineage for i, lineage in enumerate(self.lineages) if i in used]

    @classmethod
    def of(cls, nodes: Sequence[DataRef], parts: Sequence[InputParts]) -> ReduceSummary:
        if not nodes or len(nodes) > MAX_INPUTS:
            raise SummaryError(f"a summary holds 1 to {MAX_INPUTS} inputs, not {len(nodes)}")
        encoded = [keys.node(n) for n in nodes]
        offsets, at = [], 0
        for e in encoded:
            offsets.append(at)
            at += len(e)
        index: dict[bytes, int] = {}
        lineage_of = tuple(index.setdefault(p.lineage, len(index)) for p in parts)
        if len(index) > MAX_LINEAGES:
            raise SummaryError(f"{len(index)} distinct lineages among one reduce's inputs")
        return cls(
            b"".join(encoded),
            tuple(offsets),
            FlatTree.of([p.input_hash for p in parts]),
            FlatTree.of([p.source_hash for p in parts]),
            tuple(index),
            lineage_of,
        )

    def replaced(self, changes: Mapping[int, tuple[DataRef, InputParts]]) -> ReduceSummary:
        """The summary with the inputs at these positions replaced: both trees rehashed along the
        changed paths only, the other nodes' bytes copied."""
        index = {lineage: i for i, lineage in enumerate(self.lineages)}
        lineage_of = list(self.lineage_of)
        pieces: list[bytes] = []
        offsets = list(self.offsets)
        ends = (*self.offsets[1:], len(self.nodes))
        shift, done, last = 0, 0, -1  # bytes later nodes move by; end of what was copied; last change
        for i in sorted(changes):
            node, parts = changes[i]
            lineage_of[i] = index.setdefault(parts.lineage, len(index))
            encoded = keys.node(node)
            pieces += (self.nodes[done : self.offsets[i]], encoded)
            if shift:  # a replaced node of another length moved the ones after it
                for j in range(last + 1, i + 1):
                    offsets[j] = self.offsets[j] + shift
            shift += len(encoded) - (ends[i] - self.offsets[i])
            done, last = ends[i], i
        if shift:
            for j in range(last + 1, len(offsets)):
                offsets[j] = self.offsets[j] + shift
        pieces.append(self.nodes[done:])
        return ReduceSummary(
            b"".join(pieces),
            tuple(offsets),
            self.inputs_tree.replaced({i: p.input_hash for i, (_, p) in changes.items()}),
            self.sources_tree.replaced({i: p.source_hash for i, (_, p) in changes.items()}),
            tuple(index),
            tuple(lineage_of),
        )

    def encode(self) -> bytes:
        n = self.count
        return b"".join(
            (
                _HEAD.pack(_VERSION, n, len(self.lineages)),
                *(_U32.pack(len(lineage)) + lineage for lineage in self.lineages),
                struct.pack(f">{n}H", *self.lineage_of),
                struct.pack(f">{n}I", *self.offsets),
                self.inputs_tree.raw,
                self.sources_tree.raw,
                self.nodes,
            )
        )

    @classmethod
    def decode(cls, raw: bytes) -> ReduceSummary:
        try:
            version, n, m = _HEAD.unpack_from(raw)
            if version != _VERSION:
                raise SummaryError(f"reduce summary version {version}, not {_VERSION}")
            if not 0 < n <= MAX_INPUTS:
                raise SummaryError(f"reduce summary of {n} inputs")
            at = _HEAD.size
            lineages = []
            for _ in range(m):
                (size,) = _U32.unpack_from(raw, at)
                lineages.append(raw[at + 4 : at + 4 + size])
                at += 4 + size
            lineage_of = struct.unpack_from(f">{n}H", raw, at)
            at += 2 * n
            offsets = struct.unpack_from(f">{n}I", raw, at)
            at += 4 * n
            size = _tree_nodes(n) * HASH_SIZE
            inputs = FlatTree(raw[at : at + size], n)
            sources = FlatTree(raw[at + size : at + 2 * size], n)
            at += 2 * size
        except (struct.error, StreamprovError) as exc:
            raise SummaryError(f"reduce summary is cut short or inconsistent: {exc}") from exc
        nodes = raw[at:]
        if max(lineage_of) >= m or max(offsets) >= len(nodes):
            raise SummaryError("reduce summary is inconsistent")
        return cls(nodes, offsets, inputs, sources, tuple(lineages), lineage_of)


def _tree_nodes(width: int) -> int:
    """How many nodes an RFC 6962 tree of `width` leaves has, every level counted (`FlatTree`)."""
    total = width
    while width > 1:
        width = (width + 1) // 2
        total += width
    return total


class SummaryNodes(Sequence[DataRef]):
    """A summary's input nodes as a sequence, each parsed when read."""

    def __init__(self, summary: ReduceSummary) -> None:
        self._summary = summary

    def __len__(self) -> int:
        return self._summary.count

    def __getitem__(self, i: int) -> DataRef:  # type: ignore[override]  # no slices needed
        return self._summary.node(i)

    def __iter__(self) -> Iterator[DataRef]:
        return (self._summary.node(i) for i in range(self._summary.count))


def summary_of(
    nodes: Sequence[DataRef], headers: Sequence[bytes | ProvenanceHeader | None]
) -> ReduceSummary | None:
    """The summary of a reduce over `nodes` read with these headers; None when one has no header or
    its header names another node (the fold then counts it as an original record, or digests what
    the header says: only a fold can summarise that)."""
    parts: list[InputParts] = []
    for node, header in zip(nodes, headers, strict=True):
        found = input_parts(node, header) if header is not None else None
        if found is None:
            return None
        parts.append(found)
    return ReduceSummary.of(nodes, parts)


class EntryReader(Protocol):
    """The ledger index, as `SummaryKeeper` reads it."""

    def producers(self, node: DataRef) -> list[bytes]: ...

    def entry(self, entry_id: bytes) -> LedgerEntry: ...


class SummaryKeeper:
    """Keeps the summary of every pipeline reduce output the views index, so the first recompute of
    a reduce is already a delta (the executor keeps one of each output it makes).

    `note` hears of each output record whose header's last step is a reduce; `keep` (planner
    thread, views lock held) builds the summaries it can: the output's ledger entry gives its input
    nodes, the views' output headers their headers, and the result must have the inputs root and
    count the output's header commits to. One whose entry or input headers are not indexed yet is
    tried again at the next `keep`, `MAX_TRIES` times; what is left is recomputed from every
    input's header, as before summaries."""

    MAX_PENDING = 100_000
    MAX_TRIES = 20
    MAX_SECONDS = 0.25
    """Time one `keep` may take (it runs on the planning thread, under the views lock): a busy
    pipeline's reduce outputs are summarised over several turns, or given up, never block planning."""

    def __init__(self, cache: ResultCache, wanted: Callable[[Step], bool] | None = None) -> None:
        """`wanted`: which reduce steps to summarise (a delta only runs for a reduce with an inverse:
        the service passes its registry's answer); None: every one."""
        self.cache = cache
        self.wanted = wanted
        self._pending: deque[tuple[DataRef, bytes, int, int]] = deque()
        self.kept = 0
        self.given_up = 0

    def note(self, node: DataRef, header: ProvenanceHeader) -> None:
        last = header.lineage[-1] if header.lineage else None
        if last is None or last.kind is not StepKind.REDUCE or last.inputs is None:
            return
        if not HEAD_MIN_INPUTS <= last.inputs.count <= MAX_INPUTS:  # no delta task would use it
            return
        if self.wanted is not None and not self.wanted(last):
            return
        if len(self._pending) >= self.MAX_PENDING:
            self._pending.popleft()
            self.given_up += 1
        self._pending.append((node, last.inputs.merkle_root, last.inputs.count, 0))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def keep(
        self,
        index: EntryReader,
        headers: Mapping[DataRef, bytes],
        *,
        budget: int = 10_000,
        max_seconds: float | None = MAX_SECONDS,
    ) -> int:
        """Build up to `budget` pending summaries, for at most `max_seconds` (None: no limit);
        returns how many were kept."""
        kept = 0
        again: list[tuple[DataRef, bytes, int, int]] = []
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        for _ in range(min(budget, len(self._pending))):
            if deadline is not None and time.monotonic() >= deadline:
                break
            node, root, count, tries = self._pending.popleft()
            if self.cache.summary(root) is not None:
                continue
            summary = self._build(index, headers, node, root, count)
            if summary is not None:
                self.cache.put_summary(root, summary.encode())
                kept += 1
            elif tries + 1 < self.MAX_TRIES:
                again.append((node, root, count, tries + 1))
            else:
                self.given_up += 1
        self._pending.extend(again)
        self.kept += kept
        return kept

    @staticmethod
    def _build(
        index: EntryReader, headers: Mapping[DataRef, bytes], node: DataRef, root: bytes, count: int
    ) -> ReduceSummary | None:
        for eid in index.producers(node):
            inputs = index.entry(eid).application.inputs
            if len(inputs) != count:
                continue
            found = [headers.get(n) for n in inputs]
            summary = summary_of(inputs, found) if all(h is not None for h in found) else None
            if summary is not None and summary.inputs_tree.root == root:
                return summary
        return None


def with_inverse(registry: FunctionRegistry) -> Callable[[Step], bool]:
    """`SummaryKeeper(wanted=)` for a manager running `registry`: the reduce steps a delta can run,
    those whose function (version) is registered with an inverse."""

    def wanted(step: Step) -> bool:
        try:
            fn = registry.get(step.function_id, step.function_version)
        except FunctionNotFoundError:
            return False
        return fn.inverse is not None

    return wanted
