"""Replay a recompute task: inputs -> registered functions -> output bytes, provenance header, supersedes.

Inputs come from where the plan says (`InputOrigin`): the current original record (a `SourceView`:
DataID -> value bytes), the output of an earlier task of the plan (`TaskOutputs`), or the value store
(the cache's values by content). A source input gets a fresh source header (empty lineage, its own
checksum), a task output keeps the header its task stamped, so the recomputed record's header is the
full provenance a pipeline would have stamped: MAP steps through `MapStamper`, REDUCE through
`ReduceState` (input digest, never the input list).

The cache is consulted first (function, version, params, input hash); a recomputed output whose
checksum equals the original output's is `unchanged` (early cut-off): tasks that depend only on
unchanged outputs are skipped (`Executor.run_plan`).

Retries: a failing task is retried with exponential backoff (`RetryPolicy`); after the last attempt
it becomes a `DeadLetter` with the reason (never dropped, never raised out of the loop).
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from recompute_manager.cache import CacheKey, ResultCache, node_leaves, unchanged
from recompute_manager.planner import InputOrigin, InputRef, RecomputePlan, RecomputeTask
from recompute_manager.summary import MAX_INPUTS as MAX_SUMMARY_INPUTS
from recompute_manager.summary import InputParts, ReduceSummary, SummaryError, input_parts, summary_of
from streamprov.agents.dead_letter import DeadLetterReason, dead_letter_headers, source_of
from streamprov.agents.serde import JsonSerde, Serde
from streamprov.checksum import ChecksumAlgorithm, matches
from streamprov.errors import FunctionNotFoundError, HeaderError, StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader, record_fields, scan
from streamprov.header import PREFIX as HEADER_PREFIX
from streamprov.ledger.index import HEAD_MIN_INPUTS
from streamprov.ledger.model import DataRef, LedgerEntry
from streamprov.lineage import Lineage, Step, StepKind, common_prefix, decode_lineage
from streamprov.merkle import leaf_hash, levels_of, root_of, root_with
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import (
    InputRecord,
    MapStamper,
    ReduceState,
    SourceStamper,
    reduce_header,
    reduce_leaf,
    reduce_leaves,
)

if TYPE_CHECKING:
    from recompute_manager.tracing import RecomputeTracing
    from streamprov.telemetry.propagation import KafkaHeaders

__all__ = [
    "SUPERSEDES_HEADER",
    "TASK_HEADER",
    "DeadLetter",
    "ExecutionError",
    "Executor",
    "Recomputed",
    "RetryPolicy",
    "SourceView",
]

log = logging.getLogger(__name__)

SUPERSEDES_HEADER = "streamprov.supersedes"
"""`topic/partition/offset` of the record a recomputed record replaces."""
TASK_HEADER = "streamprov.recompute.task"
PLAN_HEADER = "streamprov.recompute.plan"
MAX_LINEAGES = 1024
"""Decoded lineages an executor keeps (by their encoded bytes) for the reduce input path."""


_MISSING: Any = object()
"""`Executor._previous`: no usable previous output."""

_In = tuple[bytes, "bytes | ProvenanceHeader", DataRef]
"""An input: value, provenance header (encoded, or decoded when it was built here), node."""


class ExecutionError(StreamprovError):
    """A task cannot run (missing input, unknown function, the function raised)."""


class EntryLookup(Protocol):
    """The ledger index, as the executor reads it to expand a delta task (`Executor._expand`)."""

    def entry(self, entry_id: bytes) -> LedgerEntry: ...

    def sources_among(self, nodes: Sequence[DataRef]) -> list[bool]: ...


class SourceView(Protocol):
    def get(self, data_id: str) -> bytes | None:
        """The current value of the original record with this DataID, or None."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 5
    base_delay_s: float = 0.1
    max_delay_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Backoff before attempt `attempt` (1 = the first retry): base * 2**(attempt-1), capped."""
        return float(min(self.max_delay_s, self.base_delay_s * (2 ** max(0, attempt - 1))))


Applied = tuple[bytes, Sequence[DataRef], DataRef]
"""One step of a task as applied: (stamped header, input nodes, output node)."""


@dataclass(frozen=True, slots=True)
class Recomputed:
    """One task's result: the record to publish (when it changed) and how it was made."""

    task: RecomputeTask
    value: bytes
    header: bytes
    unchanged: bool
    """Early cut-off: same checksum as the original output."""
    cached: bool
    attempts: int
    trace: tuple[tuple[str, bytes], ...] = ()
    """`traceparent`/`tracestate` of the task's span (`RecomputeTracing`); published with the record."""
    applied: tuple[Applied, ...] = ()
    """Each step as applied: (the header it stamped, the input nodes it read, its output node), for
    the task's ledger entries (`recompute_manager.ledger_entries`)."""

    @property
    def node(self) -> DataRef:
        return DataRef(self.task.data_id, ProvenanceHeader.decode(self.header).checksum)

    def headers(self) -> list[tuple[str, bytes]]:
        """Provenance header first, then what the record supersedes and which task made it."""
        out = [(HEADER_KEY, self.header)]
        s = self.task.supersedes
        if s is not None:
            out.append((SUPERSEDES_HEADER, source_of(s.topic, s.partition, s.offset).encode("utf-8")))
        out.append((TASK_HEADER, self.task.task_id.encode("ascii")))
        out.append((PLAN_HEADER, self.task.plan_id.encode("ascii")))
        out.extend(self.trace)
        return out


@dataclass(frozen=True, slots=True)
class DeadLetter:
    task: RecomputeTask
    error: str
    attempts: int
    trace: tuple[tuple[str, bytes], ...] = ()

    def headers(self) -> list[tuple[str, bytes | None]]:
        return dead_letter_headers(
            [(TASK_HEADER, self.task.task_id.encode("ascii")), *self.trace],
            DeadLetterReason.PROCESSING_ERROR,
            self.error,
            f"recompute/{self.task.plan_id}/{self.task.position}",
        )


@dataclass
class PlanResult:
    recomputed: list[Recomputed] = field(default_factory=list)
    skipped: list[RecomputeTask] = field(default_factory=list)
    """Cut off: every task they depend on produced an unchanged output."""
    dead: list[DeadLetter] = field(default_factory=list)

    @property
    def changed(self) -> list[Recomputed]:
        return [r for r in self.recomputed if not r.unchanged]


class Executor:
    def __init__(
        self,
        registry: FunctionRegistry,
        sources: SourceView | Mapping[str, bytes],
        *,
        cache: ResultCache | None = None,
        serde: Serde | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        headers: Mapping[DataRef, bytes] | None = None,
        tracing: RecomputeTracing | None = None,
        incremental: bool = True,
        ledger: EntryLookup | None = None,
    ) -> None:
        """`headers`: the original provenance headers of stored intermediates (an `OutputIndex`'s),
        so a reduce over them keeps their lineage and sources; without one a stored input counts as
        an original record. `tracing`: a span per task continuing the superseded record's trace.
        `incremental`: recompute a reduce whose function has an inverse from its previous output
        when it can (`_incremental`); False always re-folds every input. `ledger`: where a task that
        lists only its changed inputs (`RecomputeTask.input_count`) finds the others (the ledger
        index)."""
        self.registry = registry
        self.ledger = ledger
        self.incremental = incremental
        self.tracing = tracing
        self.headers: Mapping[DataRef, bytes] = headers if headers is not None else {}
        self.sources = sources
        self.cache = cache
        self.serde: Serde = serde if serde is not None else JsonSerde()
        self.algorithm = algorithm
        self.retry = retry or RetryPolicy()
        self.sleep = sleep
        self._source_stamper = SourceStamper(algorithm)
        self._lineages: dict[bytes, Lineage] = {}
        self.deltas = 0
        """Delta tasks run against a summary (`_delta`)."""
        self.expanded = 0
        """Delta tasks run whole, expanded from their ledger entry (`_expand`)."""

    # -- inputs --------------------------------------------------------------------------------------
    def _inputs(self, refs: tuple[InputRef, ...], outputs: Mapping[str, Recomputed]) -> list[_In]:
        """(value, header, node) of each input; the stored ones are read in one batch (a reduce's
        unaffected inputs: one multi-get for their versions, one for their values)."""
        stored = [r for r in refs if r.origin is InputOrigin.STORED]
        if len(stored) < 2:
            return [self._input(r, outputs) for r in refs]
        read = iter(self._stored(stored))
        return [next(read) if r.origin is InputOrigin.STORED else self._input(r, outputs) for r in refs]

    def _input(self, ref: InputRef, outputs: Mapping[str, Recomputed]) -> _In:
        """(value, header, node) of one input."""
        if ref.origin is InputOrigin.TASK:
            done = outputs.get(ref.from_task or "")
            if done is None:
                raise ExecutionError(f"input {ref.node.describe()}: task {ref.from_task} has not run")
            return done.value, done.header, done.node
        if ref.origin is InputOrigin.SOURCE:
            value = self.sources.get(ref.node.data_id)
            if value is None:
                raise ExecutionError(f"source record {ref.node.data_id!r} is missing (deleted?)")
            node = DataRef.of(ref.node.data_id, value, self.algorithm)
            return value, self._source_stamper.header(ref.node.data_id, value), node
        return self._stored([ref])[0]

    def _stored(self, refs: list[InputRef]) -> list[_In]:
        """Unaffected intermediates (or outputs of an earlier part's tasks) from the value store,
        each at its latest version (a recompute may have replaced it since it was recorded), checked
        against its checksum."""
        if self.cache is None:
            raise ExecutionError(f"intermediate value {refs[0].node.describe()}: no value store")
        found: list[_In] = []
        latest = self.cache.latest_values([r.node for r in refs])
        for ref, (node, stored) in zip(refs, latest, strict=True):
            if stored is None:
                raise ExecutionError(f"intermediate value {node.describe()} is not in the value store")
            if not matches(node.checksum, stored):
                raise ExecutionError(f"stored value of {node.describe()} does not match its checksum")
            header: bytes | ProvenanceHeader | None = self._stored_header(ref, node)
            if header is None:  # counts as an original record (decoded form: a reduce needs no bytes)
                header = ProvenanceHeader.for_source(node.data_id, stored, self.algorithm)
            found.append((stored, header, node))
        return found

    def _stored_header(self, ref: InputRef, node: DataRef) -> bytes | None:
        """The header of a stored input at its latest version `node`: the one its recompute stamped
        (for a superseded node, or for the output of an earlier part's task, which may have stamped
        new provenance on the same bytes), else the original record's (`headers`)."""
        assert self.cache is not None
        if node != ref.node or ref.from_task is not None:
            stamped = self.cache.header(node)
            if stamped is not None:
                return stamped
        return self.headers.get(node)

    def _decode(self, raw: bytes) -> ProvenanceHeader:
        """`ProvenanceHeader.decode`, with each distinct lineage decoded once: a reduce's inputs come
        from one stage and share it (the per-record fields are read with `record_fields`)."""
        if raw[: len(HEADER_PREFIX)] != HEADER_PREFIX:
            return ProvenanceHeader.decode(raw)
        lineage = self._lineage(raw[scan(raw)[3] :])
        f = record_fields(raw)
        return ProvenanceHeader(f.data_id, f.checksum, f.source_checksum, f.timestamp_ms, lineage)

    def _lineage(self, encoded: bytes) -> Lineage:
        """`decode_lineage`, each distinct encoded lineage decoded once (kept by its bytes)."""
        lineage = self._lineages.get(encoded)
        if lineage is None:
            if len(self._lineages) >= MAX_LINEAGES:
                self._lineages.clear()
            lineage = self._lineages[encoded] = decode_lineage(encoded)
        return lineage

    # -- one attempt ---------------------------------------------------------------------------------
    def execute(
        self, task: RecomputeTask, outputs: Mapping[str, Recomputed], attempts: int = 1
    ) -> Recomputed:
        """Run a task once; raises `ExecutionError` (or what the function raised). A task that lists
        only its changed inputs runs against its previous output's summary (`_delta`), else as the
        task with all of them (`_expand`)."""
        whole: list[RecomputeTask] = []  # the task with every input, expanded once when needed
        quick = self._quick(task, outputs, attempts, whole)
        if quick is not None:
            return quick
        if not whole:
            whole.append(self._expand(task) if task.is_delta else task)
        ins = self._inputs(whole[0].inputs, outputs)
        value, header, node_refs = b"", b"", [n for _, _, n in ins]
        cached = False
        applied = []
        for step in task.steps:
            fn = self.registry.get(step.function_id, step.function_version)
            params = step.params
            key = CacheKey.of(step, node_refs) if self.cache is not None else None
            hit = self.cache.get(step, node_refs, key=key) if self.cache is not None else None
            if fn.kind is StepKind.MAP:
                if len(ins) != 1:
                    raise ExecutionError(f"map {step.function_id} needs one input, the task has {len(ins)}")
                in_value, in_header, _ = ins[0]
                if hit is None:
                    value = self.serde.dumps(fn.apply(self.serde.loads(in_value), params=params))
                else:
                    value, cached = hit, True
                raw_header = in_header if isinstance(in_header, bytes) else in_header.encode()
                record = InputRecord(in_value, [(HEADER_KEY, raw_header)], task.data_id.encode(), "", 0, 0)
                stamper = MapStamper(fn, params, self.algorithm, verify_input=False)
                header = stamper.stamp(record, value)
            else:
                assert fn.initial is not None
                state = ReduceState(fn.initial())
                for in_value, in_header, _ in ins:
                    decoded = (
                        in_header if isinstance(in_header, ProvenanceHeader) else self._decode(in_header)
                    )
                    state.add(fn, params, decoded, self.serde.loads(in_value))
                if hit is None:
                    value = self.serde.dumps(state.accumulator)
                else:
                    value, cached = hit, True
                window = _window(step)
                header = state.header(fn.step(params), task.data_id, value, self.algorithm, window).encode()
                if self.cache is not None and fn.inverse is not None:  # for a later `_delta`
                    self._keep_summary(state.inputs.root(), node_refs, [h for _, h, _ in ins])
            if self.cache is not None and hit is None:
                self.cache.put(step, node_refs, value, key=key)
            node = DataRef.of(task.data_id, value, self.algorithm)
            applied.append((header, tuple(node_refs), node))
            ins, node_refs = [(value, header, node)], [node]
        return self._finish(task, value, header, cached, attempts, applied)

    def _quick(
        self,
        task: RecomputeTask,
        outputs: Mapping[str, Recomputed],
        attempts: int,
        whole: list[RecomputeTask],
    ) -> Recomputed | None:
        """A one-step reduce from its previous output, when it can: a delta task from the previous
        output's summary (`_delta`), else from the previous value with every input's header
        (`_incremental`); None: fold every input. `whole` gets the expanded task when one was made."""
        if not self.incremental or self.cache is None or not self._has_inverse(task):
            return None
        delta = self._delta(task, outputs) if task.is_delta else None
        if delta is not None:
            self.deltas += 1
            value, header, nodes, cached, base = delta
            output = DataRef.of(task.data_id, value, self.algorithm)
            return self._finish(task, value, header, cached, attempts, [(header, nodes, output)], base)
        whole.append(self._expand(task) if task.is_delta else task)
        fast = self._incremental(whole[0], outputs)
        if fast is None:
            return None
        value, header, node_refs, cached = fast
        output = DataRef.of(task.data_id, value, self.algorithm)
        return self._finish(task, value, header, cached, attempts, [(header, tuple(node_refs), output)])

    def _has_inverse(self, task: RecomputeTask) -> bool:
        """A one-step reduce whose function has an inverse: the only kind recomputed from its
        previous output (and the only one a summary serves)."""
        if len(task.steps) != 1 or task.steps[0].kind is not StepKind.REDUCE:
            return False
        step = task.steps[0]
        fn = self.registry.get(step.function_id, step.function_version)
        return fn.inverse is not None and fn.initial is not None and fn.kind is StepKind.REDUCE

    def _expand(self, task: RecomputeTask) -> RecomputeTask:
        """The task with every input: those it lists at their positions, the others as its ledger
        entry names them (what the previous output was folded from), each original data
        (`InputOrigin.SOURCE`) or an intermediate (`STORED`), as the planner decides for a task
        that lists them all."""
        if self.ledger is None:
            raise ExecutionError(
                f"task {task.task_id[:12]} lists {len(task.inputs)} of {task.input_count} inputs: "
                "the other inputs are read from the ledger index, and this executor has none"
            )
        self.expanded += 1
        entry = self.ledger.entry(task.entry_id)
        inputs = entry.application.inputs
        if len(inputs) != task.input_count:
            raise ExecutionError(
                f"task {task.task_id[:12]} names {task.input_count} inputs, its ledger entry "
                f"{task.entry_id.hex()[:12]} has {len(inputs)}"
            )
        listed = {i.position: i for i in task.inputs}
        for at, ref in listed.items():
            assert at is not None  # RecomputeTask.decode and the planner check it
            if ref.origin is not InputOrigin.SOURCE and inputs[at] != ref.node:
                raise ExecutionError(
                    f"task {task.task_id[:12]}: input {at} is {ref.node.describe()}, its ledger entry "
                    f"has {inputs[at].describe()}"
                )
        others = [n for at, n in enumerate(inputs) if at not in listed]
        kinds = iter(self.ledger.sources_among(others))
        refs = [
            dataclasses.replace(listed[at], position=None)
            if at in listed
            else InputRef(n, InputOrigin.SOURCE if next(kinds) else InputOrigin.STORED)
            for at, n in enumerate(inputs)
        ]
        return dataclasses.replace(task, inputs=tuple(refs), input_count=None)

    def _finish(
        self,
        task: RecomputeTask,
        value: bytes,
        header: bytes,
        cached: bool,
        attempts: int,
        applied: Sequence[Applied],
        base: DataRef | None = None,
    ) -> Recomputed:
        """`base`: the version of the previous output the task started from, when a recompute had
        superseded it already (`_delta`); it is superseded by the new output too."""
        # Cut-off against the output's current version, not the recorded one: a map back at its
        # recorded value after an earlier plan changed it is a change (its dependents, a delta
        # reduce that lists only it, must run), and one equal to the current version is not.
        current = self.cache.latest(task.previous_node) if self.cache is not None else task.previous_node
        same = unchanged(current.checksum, value)
        if self.cache is not None:
            new_node = DataRef.of(task.data_id, value, task.previous_output.algorithm)
            self.cache.put_value(new_node, value)
            self.cache.supersede(task.previous_node, new_node, header)
            if base is not None and base != task.previous_node:
                self.cache.supersede(base, new_node, header)
        return Recomputed(task, value, header, same, cached, attempts, applied=tuple(applied))

    def _keep_summary(
        self, inputs_root: bytes, nodes: Sequence[DataRef], headers: Sequence[bytes | ProvenanceHeader]
    ) -> None:
        """Store the summary of a reduce output folded from `nodes` read with `headers` (none when a
        header does not name its node: then no delta starts from it)."""
        assert self.cache is not None
        if not HEAD_MIN_INPUTS <= len(nodes) <= MAX_SUMMARY_INPUTS:  # no delta task would use it
            return
        summary = summary_of(nodes, headers)
        if summary is not None:
            self.cache.put_summary(inputs_root, summary.encode())

    # -- delta reduce --------------------------------------------------------------------------------
    def _delta(
        self, task: RecomputeTask, outputs: Mapping[str, Recomputed]
    ) -> tuple[bytes, bytes, Sequence[DataRef], bool, DataRef] | None:
        """A reduce task that lists only its changed inputs, run against the summary of its base:
        (value, header, input nodes, cached, base), or None to run it whole (`_expand`).

        The base is the latest version of the previous output (`ResultCache.latest`): when another
        plan recomputed this reduce for other inputs since this plan was made, this delta applies on
        top of that result, so the two converge. Its header (the one a recompute stamped, else the
        original) must be this function's reduce step (id, version, code hash, parameters, window)
        over `input_count` inputs, and the value store must hold the summary under its inputs root
        and its value. The new value is the base's with each changed input's old value retracted
        (`fn.inverse`) and its new one folded; the new roots are the summary's trees with the
        changed leaves' paths rehashed; the shared lineage is the prefix of the distinct lineages
        still present. O(changed · log n) hashes: no unchanged input is read.

        Called for a one-step reduce with an inverse (`_has_inverse`). None (run whole) when: the
        function is forced, the base's header, summary or value is missing or does not fit, or a
        changed input's header does not name its node."""
        cache = self.cache
        assert cache is not None
        step = task.steps[0]  # a one-step reduce with an inverse: `_quick` checked (`_has_inverse`)
        if cache.forced(step):
            return None
        fn = self.registry.get(step.function_id, step.function_version)
        want = fn.step(step.params)
        base = cache.latest(task.previous_node)
        raw = cache.header(base) or self.headers.get(base)
        summary = self._summary_of(raw, want, task) if raw is not None else None
        if summary is None:
            return None
        changed = self._delta_changes(task, summary, outputs)
        if changed is None:
            return None
        changes, olds, news = changed
        at = list(changes)
        if not (summary.inputs_tree.consistent(at) and summary.sources_tree.consistent(at)):
            return None  # a corrupt summary: its trees would give wrong roots
        after = summary.replaced(changes) if changes else summary
        inputs_root, sources_root = after.inputs_tree.root, after.sources_tree.root
        key = CacheKey.of_root(step, inputs_root)
        hit = cache.lookup(key)  # not forced: checked above
        if hit is None:
            [stored] = cache.values([base])
            if stored is None or not matches(base.checksum, stored):
                return None
            accumulator = self._replace(fn, step.params, self.serde.loads(stored), olds, news)
            if accumulator is _MISSING:
                return None
            value = self.serde.dumps(accumulator)
            cache.put(step, (), value, key=key)
        else:
            value = hit
        window = _window(step)
        digest = (after.count, inputs_root, sources_root)
        try:
            upstream = self._shared_lineage(after)
        except HeaderError:  # a changed input's lineage does not decode: the whole fold says why
            return None
        header = reduce_header(want, task.data_id, value, self.algorithm, window, digest, upstream).encode()
        if changes:
            cache.put_summary(inputs_root, after.encode())
        return value, header, after.input_nodes(), hit is not None, base

    def _delta_changes(
        self, task: RecomputeTask, summary: ReduceSummary, outputs: Mapping[str, Recomputed]
    ) -> tuple[dict[int, tuple[DataRef, InputParts]], list[DataRef], list[bytes | DataRef]] | None:
        """(position -> new node and parts of each input that differs from the summary's, the old
        nodes whose values are retracted, the new values (or nodes to read) folded in); None when a
        changed input's header does not name its node."""
        changes: dict[int, tuple[DataRef, InputParts]] = {}
        olds: list[DataRef] = []
        news: list[bytes | DataRef] = []
        for ref in task.inputs:
            at = ref.position
            assert at is not None  # RecomputeTask checks a delta's positions
            node, value, header = self._delta_input(ref, outputs)
            parts = input_parts(node, header)
            if parts is None:
                return None
            try:
                old = summary.node(at)
            except (ValueError, IndexError, struct.error):  # a corrupt summary
                return None
            if leaf_hash(reduce_leaf(old.data_id, old.checksum)) != summary.inputs_tree.leaf(at):
                return None  # its node is not the one its tree was built over: corrupt
            if old != node or parts != summary.parts(at):
                changes[at] = (node, parts)
            if old != node:
                olds.append(old)
                news.append(node if value is None else value)
        return changes, olds, news

    def _shared_lineage(self, summary: ReduceSummary) -> Lineage | None:
        """The lineage a reduce's inputs share: the prefix of the distinct ones (each decoded once)."""
        upstream: Lineage | None = None
        for encoded in summary.lineages_present():
            lineage = self._lineage(encoded)
            upstream = lineage if upstream is None else common_prefix([upstream, lineage])
        return upstream

    def _lineage_of(self, raw: bytes) -> Lineage | None:
        """The lineage of a previous output's header (None when it does not decode)."""
        try:
            return self._decode(raw).lineage
        except HeaderError:
            return None

    @staticmethod
    def _reduce_step(lineage: Lineage, want: Step, task: RecomputeTask, count: int) -> Step | None:
        """The last step of a previous reduce output's lineage when it is `want` (id, version, code
        hash, parameters) over `count` inputs in the task's window; else None: the previous output
        was not made by this reduce over these inputs, and no recompute may start from it."""
        last = lineage[-1] if lineage else None
        window = task.steps[0].inputs
        if (
            last is None
            or last.kind is not StepKind.REDUCE
            or (last.function_id, last.function_version, last.code_hash, last.parameters)
            != (want.function_id, want.function_version, want.code_hash, want.parameters)
            or last.inputs is None
            or last.inputs.count != count
            or (last.inputs.window_start, last.inputs.window_end)
            != ((None, None) if window is None else (window.window_start, window.window_end))
        ):
            return None
        return last

    def _summary_of(self, raw: bytes, want: Step, task: RecomputeTask) -> ReduceSummary | None:
        """The summary a delta of `task` starts from: the one kept under the inputs root of the base
        header `raw`, when that header's last step is `want` over `task.input_count` inputs in the
        task's window."""
        assert self.cache is not None
        lineage = self._lineage_of(raw)
        last = None if lineage is None else self._reduce_step(lineage, want, task, task.input_count or 0)
        if lineage is None or last is None or last.inputs is None:
            return None
        found = self.cache.summary(last.inputs.merkle_root)
        if found is None:
            return None
        try:
            summary = ReduceSummary.decode(found)
        except SummaryError:
            log.warning(
                "reduce summary under %s does not decode: running the task whole",
                last.inputs.merkle_root.hex(),
            )
            return None
        if summary.count != task.input_count or summary.inputs_tree.root != last.inputs.merkle_root:
            return None  # not the summary of these inputs (a corrupt or misfiled value)
        try:
            if self._shared_lineage(summary) != lineage[:-1]:
                return None  # its lineages are not the ones the base header shares
        except HeaderError:  # one of its lineages does not decode
            return None
        return summary

    def _delta_input(
        self, ref: InputRef, outputs: Mapping[str, Recomputed]
    ) -> tuple[DataRef, bytes | None, bytes | ProvenanceHeader]:
        """(node, value when at hand (None: read from the value store), header) of a changed input."""
        if ref.origin is InputOrigin.TASK:
            done = outputs.get(ref.from_task or "")
            if done is None:
                raise ExecutionError(f"input {ref.node.describe()}: task {ref.from_task} has not run")
            return done.node, done.value, done.header
        if ref.origin is InputOrigin.SOURCE:
            value = self.sources.get(ref.node.data_id)
            if value is None:
                raise ExecutionError(f"source record {ref.node.data_id!r} is missing (deleted?)")
            node = DataRef.of(ref.node.data_id, value, self.algorithm)
            return node, value, self._source_stamper.header(ref.node.data_id, value)
        assert self.cache is not None
        node = self.cache.latest(ref.node)
        header = self._stored_header(ref, node)
        if header is None:  # counts as an original record: its header is derived from its value
            value = self.cache.value(node)
            if value is None:
                raise ExecutionError(f"intermediate value {node.describe()} is not in the value store")
            return node, value, ProvenanceHeader.for_source(node.data_id, value, self.algorithm)
        return node, None, header

    # -- incremental reduce ----------------------------------------------------------------------------
    def _incremental(
        self, task: RecomputeTask, outputs: Mapping[str, Recomputed]
    ) -> tuple[bytes, bytes, list[DataRef], bool] | None:
        """A one-step REDUCE task whose function has an inverse, from its previous output: (value,
        header, input nodes, cached), or None for the full fold.

        The previous output (the ledger's, `task.previous_node`) was folded from exactly the nodes
        the task's InputRefs name (a TASK or STORED ref names the original input; `_previous` checks
        it against the previous header's input digest). So the new value
        is `inverse` of each changed input's old value, then `fn` of its new value, applied to the
        previous value: only changed inputs' values are read. Changed: a TASK input whose output
        differs, or a STORED one superseded since (its latest version). The unchanged ones are read
        as the full fold reads them for the header (the same headers: `self.headers`, else the one a
        recompute stamped), but only their header: the input digest, sources root and lineage need
        every input's leaf, in order, so the header is the one the full fold stamps.

        None (full fold) when: a SOURCE input (its ref names the new version only), nothing is
        STORED, the function (version) is forced, a stored input has no header (the full fold
        derives it from the value) or an input's header names another (DataID, checksum) than its
        node (the full fold digests the headers; this path the nodes), the previous output's value
        or header is missing, its header's reduce step is not this function (id, version, code
        hash, parameters, window) or its input digest is not over exactly the task's original input
        nodes in order (count and Merkle root), or an old value (or a superseded input's new value)
        is missing or does not match its checksum. An unchanged input's value is not read, so it
        need not be in the value store.

        The new inputs root is the old one (over the original nodes, built once: `_previous` checks
        it) with the changed inputs' leaves replaced, in O(log n) hashes each (`root_with`).
        """
        if len(task.steps) != 1 or task.steps[0].kind is not StepKind.REDUCE:
            return None
        cache = self.cache
        assert cache is not None
        step = task.steps[0]
        fn = self.registry.get(step.function_id, step.function_version)
        refs = task.inputs
        if fn.inverse is None or fn.initial is None or fn.kind is not StepKind.REDUCE:
            return None
        if any(r.origin is InputOrigin.SOURCE for r in refs) or cache.forced(step):
            return None
        stored = [r.node for r in refs if r.origin is InputOrigin.STORED]
        if not stored:
            return None
        old_leaves = node_leaves([r.node for r in refs])
        gathered = self._changed_inputs(refs, old_leaves, outputs)
        if gathered is None:
            return None
        nodes, headers, changed = gathered
        leaves = list(old_leaves)
        replaced = dict(zip(changed, node_leaves([nodes[i] for i in changed]), strict=True))
        for i, leaf in replaced.items():
            leaves[i] = leaf
        provenance = self._provenance(headers, leaves)
        if provenance is None:
            return None
        sources_root, upstream = provenance
        old_tree = levels_of(old_leaves)
        params = step.params
        want = fn.step(params)
        key = CacheKey.of_leaves(step, leaves)
        hit = cache.lookup(key)  # not forced: checked above
        if hit is None:
            accumulator = self._previous(task, want, old_tree[-1][0])
            if accumulator is _MISSING:
                return None
            old = [refs[i].node for i in changed]
            accumulator = self._replace(fn, params, accumulator, old, list(changed.values()))
            if accumulator is _MISSING:
                return None
            value = self.serde.dumps(accumulator)
        else:
            value = hit
        window = _window(step)
        digest = (len(leaves), root_with(old_tree, replaced), sources_root)
        header_bytes = reduce_header(
            want, task.data_id, value, self.algorithm, window, digest, upstream
        ).encode()
        if hit is None:
            cache.put(step, nodes, value, key=key)
            cache.put(step, (), value, key=CacheKey.of_root(step, digest[1]))  # a delta's replay
        self._keep_summary(digest[1], nodes, headers)
        return value, header_bytes, nodes, hit is not None

    def _provenance(
        self, headers: list[bytes | ProvenanceHeader], leaves: list[bytes]
    ) -> tuple[bytes, Lineage | None] | None:
        """What `ReduceState` derives from the inputs' headers for the output header, besides the
        inputs root: (sources Merkle root, the lineage they share); None when a header's (DataID,
        checksum) is not its input node's (`leaves`: the nodes' `node_leaves`), as the inputs root
        is built from the nodes. Encoded headers are read in place (`reduce_leaves`); a run of
        inputs with one encoded lineage (a stage's outputs) decodes and compares it once."""
        sources: list[bytes] = []
        upstream: Lineage | None = None
        merged: bytes | None = None  # the encoded lineage last merged into `upstream`
        for h, node_leaf in zip(headers, leaves, strict=True):
            found = reduce_leaves(h) if isinstance(h, bytes) else None
            if found is None:
                d = h if isinstance(h, ProvenanceHeader) else self._decode(h)
                if reduce_leaf(d.data_id, d.checksum) != node_leaf:
                    return None
                sources.append(reduce_leaf(d.data_id, d.source_checksum))
                lineage, merged = d.lineage, None
            else:
                leaf, source, encoded = found
                if leaf != node_leaf:
                    return None
                sources.append(source)
                if encoded == merged:
                    continue
                lineage, merged = self._lineage(encoded), encoded
            if upstream is None:
                upstream = lineage
            elif lineage is not upstream:
                upstream = common_prefix([upstream, lineage])
        return root_of(sources), upstream

    def _changed_inputs(
        self, refs: tuple[InputRef, ...], leaves: list[bytes], outputs: Mapping[str, Recomputed]
    ) -> tuple[list[DataRef], list[bytes | ProvenanceHeader], dict[int, bytes | DataRef]] | None:
        """(every input's node, every input's header, position -> new value (a task's output) or
        new node (a superseded stored input) of each changed input), or None when a stored input has
        no header. `leaves`: the `node_leaves` of the refs' nodes."""
        cache = self.cache
        assert cache is not None
        at = [i for i, r in enumerate(refs) if r.origin is InputOrigin.STORED]
        latest = iter(cache.latest_nodes([refs[i].node for i in at], [leaves[i] for i in at]))
        nodes: list[DataRef] = []
        headers: list[bytes | ProvenanceHeader] = []
        changed: dict[int, bytes | DataRef] = {}
        for i, r in enumerate(refs):
            if r.origin is InputOrigin.TASK:
                done = outputs.get(r.from_task or "")
                if done is None:
                    raise ExecutionError(f"input {r.node.describe()}: task {r.from_task} has not run")
                node, header = done.node, done.header
                if node != r.node:
                    changed[i] = done.value
            else:
                node = next(latest)
                found = self._stored_header(r, node)
                if found is None:
                    return None
                header = found
                if node != r.node:
                    changed[i] = node
            nodes.append(node)
            headers.append(header)
        return nodes, headers, changed

    def _replace(
        self,
        fn: RegisteredFunction,
        params: Mapping[str, Any],
        accumulator: Any,
        old: list[DataRef],
        new: list[bytes | DataRef],
    ) -> Any:
        """`accumulator` with each old input retracted, then each new one folded in (old values and
        superseded inputs' new values read from the value store, checked against their checksums);
        `_MISSING` when one is not there."""
        cache = self.cache
        assert cache is not None
        reads = [n for n in new if isinstance(n, DataRef)]
        wanted = [*old, *reads]
        found = cache.values(wanted)
        checked: list[bytes] = []
        for n, v in zip(wanted, found, strict=True):
            if v is None or not matches(n.checksum, v):
                return _MISSING
            checked.append(v)
        old_values, fresh = checked[: len(old)], iter(checked[len(old) :])
        new_values = [n if isinstance(n, bytes) else next(fresh) for n in new]
        loads = self.serde.loads
        for v in old_values:
            try:
                accumulator = fn.retract(accumulator, loads(v), params=params)
            except Exception as exc:  # the user's inverse; the full fold does not need it
                log.warning("inverse of %s failed (%r): recomputing with the full fold", fn.function_id, exc)
                return _MISSING
        for v in new_values:
            accumulator = fn.apply(accumulator, loads(v), params=params)
        return accumulator

    def _previous(self, task: RecomputeTask, want: Step, inputs_root: bytes) -> Any:
        """The previous output's accumulator (deserialised value), or `_MISSING` when its value or
        header is not stored, or its header's reduce step is not `want` in the task's window, folded
        over exactly the task's original input nodes (`InputRef.node`), in order: the input
        digest's count and Merkle root (`inputs_root`, over those nodes) are checked, so the
        retracted values are the folded ones."""
        cache = self.cache
        assert cache is not None
        prev = task.previous_node
        raw = self.headers.get(prev)
        if raw is None:
            raw = cache.header(prev)
        if raw is None:
            return _MISSING
        lineage = self._lineage_of(raw)
        last = None if lineage is None else self._reduce_step(lineage, want, task, len(task.inputs))
        if last is None or last.inputs is None:
            return _MISSING
        if inputs_root != last.inputs.merkle_root:
            return _MISSING
        value = cache.value(prev)
        if value is None or not matches(prev.checksum, value):
            return _MISSING
        return self.serde.loads(value)

    # -- retries -------------------------------------------------------------------------------------
    def run(
        self,
        task: RecomputeTask,
        outputs: Mapping[str, Recomputed] | None = None,
        *,
        causes: Sequence[KafkaHeaders] = (),
    ) -> Recomputed | DeadLetter:
        """Execute with retries and exponential backoff; a `DeadLetter` after the last attempt.

        `causes`: headers of the records that caused the task (the alert or change event, or the
        task record that carries their trace context); with `tracing`, the task's span links them.
        """
        outputs = outputs or {}
        if self.tracing is not None:
            done_outputs = outputs
            return self.tracing.traced(task, outputs, causes, lambda: self._attempts(task, done_outputs))
        return self._attempts(task, outputs)

    def _attempts(self, task: RecomputeTask, outputs: Mapping[str, Recomputed]) -> Recomputed | DeadLetter:
        attempts = self.retry.max_retries + 1
        error = ""
        for attempt in range(1, attempts + 1):
            try:
                return self.execute(task, outputs, attempt)
            except FunctionNotFoundError as exc:  # permanent: no retry registers the function
                log.warning("task %s: %s", task.task_id[:12], exc)
                return DeadLetter(task, f"{type(exc).__name__}: {exc}", attempt)
            except Exception as exc:  # the user's function may raise anything: retry, then dead-letter
                error = f"{type(exc).__name__}: {exc}"
                log.warning("task %s attempt %d/%d failed: %s", task.task_id[:12], attempt, attempts, error)
                if attempt < attempts:
                    self.sleep(self.retry.delay(attempt))
        return DeadLetter(task, error, attempts)

    def run_plan(self, plan: RecomputePlan, *, causes: Sequence[KafkaHeaders] = ()) -> PlanResult:
        """Every task in order; tasks whose inputs all come from unchanged (cut-off) tasks are skipped
        (run after all when a task that does run needs one's output: `_run_skipped`), and the
        dependents of dead-lettered tasks, in this plan or in an earlier part of it
        (`ResultCache.dead`), go to the dead letters too. `causes`: see `run`."""
        result = PlanResult()
        outputs: dict[str, Recomputed] = {}
        cut: set[str] = set()
        dead: set[str] = set()
        skipped: dict[str, RecomputeTask] = {}
        for task in plan.tasks:
            failed = [d for d in task.depends_on if d in dead] or self._dead_earlier(task)
            if failed:
                dead.add(task.task_id)
                result.dead.append(DeadLetter(task, f"depends on dead-lettered task {failed[0]}", 0))
                continue
            direct = [i for i in task.inputs if i.origin is not InputOrigin.TASK]
            if task.depends_on and not direct and all(d in cut for d in task.depends_on):
                cut.add(task.task_id)
                skipped[task.task_id] = task
                continue
            failed = self._run_skipped(task, skipped, outputs, dead, result, causes)
            if failed:
                dead.add(task.task_id)
                result.dead.append(DeadLetter(task, f"depends on dead-lettered task {failed[0]}", 0))
                continue
            done = self.run(task, outputs, causes=causes)
            if isinstance(done, DeadLetter):
                dead.add(task.task_id)
                result.dead.append(done)
                continue
            outputs[task.task_id] = done
            result.recomputed.append(done)
            if done.unchanged:
                cut.add(task.task_id)
        result.skipped.extend(skipped.values())
        return result

    def _run_skipped(
        self,
        task: RecomputeTask,
        skipped: dict[str, RecomputeTask],
        outputs: dict[str, Recomputed],
        dead: set[str],
        result: PlanResult,
        causes: Sequence[KafkaHeaders],
    ) -> list[str]:
        """Run the skipped tasks whose output `task` reads (and theirs, first), as if they had not
        been skipped: a task that reads an unchanged branch and a changed one needs the unchanged
        branch's output too (it was dead-lettered as "task ... has not run"). Returns the ids of
        those that were dead-lettered (then `task` is too)."""
        failed: list[str] = []
        for ref in task.inputs:
            needed = skipped.pop(ref.from_task, None) if ref.from_task is not None else None
            if needed is None:
                continue
            below = self._run_skipped(needed, skipped, outputs, dead, result, causes)
            done = (
                DeadLetter(needed, f"depends on dead-lettered task {below[0]}", 0)
                if below
                else self.run(needed, outputs, causes=causes)
            )
            if isinstance(done, DeadLetter):
                dead.add(needed.task_id)
                result.dead.append(done)
                failed.append(needed.task_id)
            else:
                outputs[needed.task_id] = done
                result.recomputed.append(done)
        return failed

    def _dead_earlier(self, task: RecomputeTask) -> list[str]:
        """The tasks of earlier parts of the task's component (stored inputs that name their task:
        `units.split_units`) that were dead-lettered: their output is not the one this task needs."""
        if self.cache is None:
            return []
        return [
            i.from_task
            for i in task.inputs
            if i.origin is InputOrigin.STORED and i.from_task is not None and self.cache.dead(i.from_task)
        ]


def _window(step: Step) -> tuple[int, int] | None:
    """The (start, end) of a reduce step's window as a task carries it, for its output header."""
    if step.inputs is None or step.inputs.window_start is None:
        return None
    return (step.inputs.window_start, step.inputs.window_end or 0)


def values_of(result: PlanResult) -> dict[str, Any]:
    """DataID -> recomputed value bytes of the changed outputs (for logs and tests)."""
    return {r.task.data_id: r.value for r in result.changed}
