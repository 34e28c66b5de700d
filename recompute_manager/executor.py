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

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from recompute_manager.cache import CacheKey, ResultCache, unchanged
from recompute_manager.planner import InputOrigin, InputRef, RecomputePlan, RecomputeTask
from streamprov.agents.dead_letter import DeadLetterReason, dead_letter_headers, source_of
from streamprov.agents.serde import JsonSerde, Serde
from streamprov.checksum import ChecksumAlgorithm, matches
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader, record_fields, scan
from streamprov.header import PREFIX as HEADER_PREFIX
from streamprov.ledger.model import DataRef
from streamprov.lineage import Lineage, StepKind, decode_lineage
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, ReduceState, SourceStamper

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


_In = tuple[bytes, "bytes | ProvenanceHeader", DataRef]
"""An input: value, provenance header (encoded, or decoded when it was built here), node."""


class ExecutionError(StreamprovError):
    """A task cannot run (missing input, unknown function, the function raised)."""


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


Applied = tuple[bytes, tuple[DataRef, ...], DataRef]
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
    ) -> None:
        """`headers`: the original provenance headers of stored intermediates (an `OutputIndex`'s),
        so a reduce over them keeps their lineage and sources; without one a stored input counts as
        an original record. `tracing`: a span per task continuing the superseded record's trace."""
        self.registry = registry
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

    # -- inputs --------------------------------------------------------------------------------------
    def _inputs(self, refs: tuple[InputRef, ...], outputs: Mapping[str, Recomputed]) -> list[_In]:
        """(value, header, node) of each input; the stored ones are read in one batch (a reduce's
        unaffected inputs: one multi-get for their versions, one for their values)."""
        stored = [r.node for r in refs if r.origin is InputOrigin.STORED]
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
        return self._stored([ref.node])[0]

    def _stored(self, refs: list[DataRef]) -> list[_In]:
        """Unaffected intermediates from the value store, each at its latest version (a recompute
        may have replaced it since it was recorded), checked against its checksum."""
        if self.cache is None:
            raise ExecutionError(f"intermediate value {refs[0].describe()}: no value store")
        found: list[_In] = []
        for ref, (node, stored) in zip(refs, self.cache.latest_values(refs), strict=True):
            if stored is None:
                raise ExecutionError(f"intermediate value {node.describe()} is not in the value store")
            if not matches(node.checksum, stored):
                raise ExecutionError(f"stored value of {node.describe()} does not match its checksum")
            header: bytes | ProvenanceHeader | None = self.headers.get(node)
            if header is None and node != ref:  # a recomputed version: the header its task stamped
                header = self.cache.header(node)
            if header is None:  # counts as an original record (decoded form: a reduce needs no bytes)
                header = ProvenanceHeader.for_source(node.data_id, stored, self.algorithm)
            found.append((stored, header, node))
        return found

    def _decode(self, raw: bytes) -> ProvenanceHeader:
        """`ProvenanceHeader.decode`, with each distinct lineage decoded once: a reduce's inputs come
        from one stage and share it (the per-record fields are read with `record_fields`)."""
        if raw[: len(HEADER_PREFIX)] != HEADER_PREFIX:
            return ProvenanceHeader.decode(raw)
        encoded = raw[scan(raw)[3] :]
        lineage = self._lineages.get(encoded)
        if lineage is None:
            if len(self._lineages) >= MAX_LINEAGES:
                self._lineages.clear()
            lineage = self._lineages[encoded] = decode_lineage(encoded)
        f = record_fields(raw)
        return ProvenanceHeader(f.data_id, f.checksum, f.source_checksum, f.timestamp_ms, lineage)

    # -- one attempt ---------------------------------------------------------------------------------
    def execute(
        self, task: RecomputeTask, outputs: Mapping[str, Recomputed], attempts: int = 1
    ) -> Recomputed:
        """Run a task once; raises `ExecutionError` (or what the function raised)."""
        ins = self._inputs(task.inputs, outputs)
        value, header, node_refs = b"", b"", [n for _, _, n in ins]
        cached = False
        applied: list[Applied] = []
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
                window = None
                if step.inputs is not None and step.inputs.window_start is not None:
                    window = (step.inputs.window_start, step.inputs.window_end or 0)
                header = state.header(fn.step(params), task.data_id, value, self.algorithm, window).encode()
            if self.cache is not None and hit is None:
                self.cache.put(step, node_refs, value, key=key)
            node = DataRef.of(task.data_id, value, self.algorithm)
            applied.append((header, tuple(node_refs), node))
            ins, node_refs = [(value, header, node)], [node]
        same = unchanged(task.previous_output, value)
        if self.cache is not None:
            new_node = DataRef.of(task.data_id, value, task.previous_output.algorithm)
            self.cache.put_value(new_node, value)
            if not same:
                self.cache.supersede(task.previous_node, new_node, header)
        return Recomputed(task, value, header, same, cached, attempts, applied=tuple(applied))

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
            except Exception as exc:  # the user's function may raise anything: retry, then dead-letter
                error = f"{type(exc).__name__}: {exc}"
                log.warning("task %s attempt %d/%d failed: %s", task.task_id[:12], attempt, attempts, error)
                if attempt < attempts:
                    self.sleep(self.retry.delay(attempt))
        return DeadLetter(task, error, attempts)

    def run_plan(self, plan: RecomputePlan, *, causes: Sequence[KafkaHeaders] = ()) -> PlanResult:
        """Every task in order; tasks whose inputs all come from unchanged (cut-off) tasks are skipped,
        and so are the dependents of dead-lettered tasks (they go to the dead letters too). `causes`:
        see `run`."""
        result = PlanResult()
        outputs: dict[str, Recomputed] = {}
        cut: set[str] = set()
        dead: set[str] = set()
        for task in plan.tasks:
            failed = [d for d in task.depends_on if d in dead]
            if failed:
                dead.add(task.task_id)
                result.dead.append(DeadLetter(task, f"depends on dead-lettered task {failed[0]}", 0))
                continue
            direct = [i for i in task.inputs if i.origin is not InputOrigin.TASK]
            if task.depends_on and not direct and all(d in cut for d in task.depends_on):
                cut.add(task.task_id)
                result.skipped.append(task)
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
        return result


def values_of(result: PlanResult) -> dict[str, Any]:
    """DataID -> recomputed value bytes of the changed outputs (for logs and tests)."""
    return {r.task.data_id: r.value for r in result.changed}
