"""Plans: from an alert or a change event and the ledger, the affected sub-graph as recompute tasks.

A plan replays exactly the affected applications, in dependency order (the ledger's own order:
`streamprov.ledger.queries.dependency_order`):

* an alert about an output record (checksum mismatch, re-derivation mismatch, stale): the lineage of
  that output (`LedgerIndex.upstream`), replayed from the original data;
* an alert or change event about a source record: everything derived from the old source version
  (`LedgerIndex.downstream`), replayed on the current version;
* a function change: every application of the old function version and everything derived from them
  (`LedgerIndex.affected_by_function`).

One task per application. A task's inputs say where each comes from: the current source record,
another task of the plan (`depends_on`), or an unaffected intermediate value (the value store).
Tasks are keyed by the DataID of their output, so one DataID's tasks stay ordered on one partition
(STYLE.md item 7). Plan and task ids are deterministic: planning one cause twice gives the same ids.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fastavro

from recompute_manager.policy import Cause, cause_of_alert, cause_of_change
from streamprov import avro
from streamprov.changes.event import ChangeEvent, ChangeKind
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader, now_ms
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import Application, ApplicationKind, DataRef
from streamprov.ledger.queries import Applied, dependency_order, downstream_edges
from streamprov.lineage import InputDigest, Step, StepKind
from streamprov.merkle import length_prefixed
from validator.alerts import Alert, AlertKind

__all__ = [
    "PREFIX",
    "SCHEMA",
    "ChangeBatch",
    "Coordinates",
    "InputOrigin",
    "InputRef",
    "PlanError",
    "RecomputePlan",
    "RecomputeTask",
    "changes_cause",
    "plan_for_alert",
    "plan_for_change",
    "plan_for_changes",
    "plan_from_applications",
]

SCHEMA_NAME = "recompute_task"
SCHEMA = avro.load_schema_json(SCHEMA_NAME)
PREFIX = avro.single_object_prefix(SCHEMA)
_READER = avro.without_logical_types(SCHEMA)
_PARSED = fastavro.parse_schema(_READER)


class PlanError(StreamprovError):
    """A cause that cannot be planned (no header to locate the output, unknown in the ledger), or
    bytes that are not a recompute task."""


class InputOrigin(enum.StrEnum):
    SOURCE = "source"
    TASK = "task"
    STORED = "stored"


@dataclass(frozen=True, slots=True)
class InputRef:
    node: DataRef
    origin: InputOrigin
    from_task: str | None = None
    position: int | None = None
    """Its position among the application's inputs, in a task that lists only the inputs it changes
    (`RecomputeTask.input_count`); None when the task lists them all (the position is the index)."""


@dataclass(frozen=True, slots=True)
class Coordinates:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class RecomputeTask:
    task_id: str
    plan_id: str
    data_id: str
    topic: str
    position: int
    entry_id: bytes
    steps: tuple[Step, ...]
    inputs: tuple[InputRef, ...]
    previous_output: Checksum
    depends_on: tuple[str, ...]
    cause: Cause
    created_at_ms: int
    supersedes: Coordinates | None = None
    input_count: int | None = None
    """None: `inputs` is every input. Else the application (a reduce over many inputs) has this many,
    `inputs` holds those the plan changes (with their positions), and the others are what its
    previous output was folded from: a delta, run against the previous output's summary, or expanded
    from the ledger entry (`Executor._delta`, `Executor._expand`)."""

    @property
    def is_delta(self) -> bool:
        return self.input_count is not None

    @property
    def key(self) -> bytes:
        """The Kafka key: the output's DataID (one DataID's tasks stay in order)."""
        return self.data_id.encode("utf-8")

    @property
    def previous_node(self) -> DataRef:
        return DataRef(self.data_id, self.previous_output)

    def to_record(self, *, unit_cause: Cause | None = None) -> dict[str, Any]:
        """The Avro record; `unit_cause`: the cause of the unit that carries the task (the cause field
        is then empty when it is the same: a plan of many change events has one cause tree, written
        once per unit, not once per task)."""
        same = unit_cause is not None and (unit_cause is self.cause or unit_cause == self.cause)
        return {
            "task_id": self.task_id,
            "plan_id": self.plan_id,
            "data_id": self.data_id,
            "topic": self.topic,
            "position": self.position,
            "entry_id": self.entry_id,
            "steps": [_step_record(s) for s in self.steps],
            "inputs": [
                {
                    "data_id": i.node.data_id,
                    "algorithm": int(i.node.checksum.algorithm),
                    "checksum": i.node.checksum.value,
                    "origin": i.origin.value,
                    "from_task": i.from_task,
                    "position": -1 if i.position is None else i.position,
                }
                for i in self.inputs
            ],
            "previous_output": {
                "algorithm": int(self.previous_output.algorithm),
                "checksum": self.previous_output.value,
            },
            "depends_on": list(self.depends_on),
            "supersedes": None
            if self.supersedes is None
            else {
                "topic": self.supersedes.topic,
                "partition": self.supersedes.partition,
                "offset": self.supersedes.offset,
            },
            "input_count": -1 if self.input_count is None else self.input_count,
            "cause": "" if same else json.dumps(self.cause.to_dict(), sort_keys=True, separators=(",", ":")),
            "created_at": self.created_at_ms,
        }

    def encode(self, *, unit_cause: Cause | None = None) -> bytes:
        """Single-object encoding; `unit_cause` as for `to_record` (inside a unit record only: a task
        written on its own, e.g. as a dead letter, carries its cause)."""
        out = io.BytesIO()
        out.write(PREFIX)
        fastavro.schemaless_writer(out, _PARSED, self.to_record(unit_cause=unit_cause))
        return out.getvalue()

    @classmethod
    def decode(cls, raw: bytes, *, unit_cause: Cause | None = None) -> RecomputeTask:
        """`unit_cause`: the cause of the unit the task came in, for a task whose cause field is
        empty (its unit's); a task with an empty cause read on its own is not a task."""
        if not isinstance(raw, bytes) or raw[: len(PREFIX)] != PREFIX:
            raise PlanError("not a recompute task of this schema version (marker or fingerprint differ)")
        try:
            r: Any = avro.schemaless_read(raw[len(PREFIX) :], _READER, _READER)
            if r["cause"]:
                cause = _cause(json.loads(r["cause"]))
            elif unit_cause is not None:
                cause = unit_cause
            else:
                raise PlanError("recompute task has no cause of its own: it is part of a unit record")
            task = cls(
                r["task_id"],
                r["plan_id"],
                r["data_id"],
                r["topic"],
                r["position"],
                r["entry_id"],
                tuple(_step(s) for s in r["steps"]),
                tuple(
                    InputRef(
                        DataRef(i["data_id"], Checksum(ChecksumAlgorithm(i["algorithm"]), i["checksum"])),
                        InputOrigin(i["origin"]),
                        i["from_task"],
                        None if i["position"] < 0 else i["position"],
                    )
                    for i in r["inputs"]
                ),
                Checksum(
                    ChecksumAlgorithm(r["previous_output"]["algorithm"]), r["previous_output"]["checksum"]
                ),
                tuple(r["depends_on"]),
                cause,
                r["created_at"],
                None if r["supersedes"] is None else Coordinates(**r["supersedes"]),
                None if r["input_count"] < 0 else r["input_count"],
            )
            _check_delta(task)
            return task
        except PlanError:
            raise
        except Exception as exc:  # untrusted bytes: one typed error out
            raise PlanError(f"recompute task does not decode: {exc!r}") from exc


def _check_delta(task: RecomputeTask) -> None:
    """A task listing only its changed inputs (`input_count`) has one step, a position for each,
    in range, increasing; a task listing all has none."""
    if task.input_count is None:
        if any(i.position is not None for i in task.inputs):
            raise PlanError(f"task {task.task_id[:12]}: input positions without an input count")
        return
    positions = [i.position for i in task.inputs if i.position is not None]
    if (
        len(task.steps) != 1
        or len(positions) != len(task.inputs)
        or positions != sorted(set(positions))
        or (positions and not 0 <= positions[0] <= positions[-1] < task.input_count)
    ):
        raise PlanError(
            f"task {task.task_id[:12]}: a delta of {task.input_count} inputs needs one step and "
            f"increasing positions in range, not {[i.position for i in task.inputs]}"
        )


def _step_record(s: Step) -> dict[str, Any]:
    return {
        "kind": s.kind.name,
        "function_id": s.function_id,
        "function_version": s.function_version,
        "code_hash": s.code_hash,
        "parameters": [{"name": k, "value": v} for k, v in s.parameters],
        "window_start": s.inputs.window_start if s.inputs is not None else None,
        "window_end": s.inputs.window_end if s.inputs is not None else None,
    }


def _step(r: Mapping[str, Any]) -> Step:
    kind = StepKind[r["kind"]]
    digest = None
    if kind is StepKind.REDUCE and (r["window_start"] is not None or r["window_end"] is not None):
        digest = InputDigest(0, b"", r["window_start"], r["window_end"])
    params = tuple((p["name"], p["value"]) for p in r["parameters"])
    return Step(kind, r["function_id"], r["function_version"], r["code_hash"], params, digest)


def _cause(d: Mapping[str, Any]) -> Cause:
    return Cause(d["kind"], d["subject"], d.get("detail", ""), tuple(_cause(c) for c in d.get("causes", ())))


@dataclass(frozen=True, slots=True)
class RecomputePlan:
    plan_id: str
    cause: Cause
    tasks: tuple[RecomputeTask, ...]
    truncated: bool
    """The ledger query hit its limit: the plan is not the whole affected sub-graph."""
    cyclic: bool

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def outputs(self) -> tuple[DataRef, ...]:
        return tuple(t.previous_node for t in self.tasks)

    def describe(self) -> str:
        lines = [f"plan {self.plan_id[:16]}: {len(self.tasks)} task(s)", self.cause.describe(1)]
        for t in self.tasks:
            step = t.steps[0]
            deps = f" after {', '.join(d[:8] for d in t.depends_on)}" if t.depends_on else ""
            fn = f"{step.function_id}@{step.function_version}"
            lines.append(f"  {t.position}. {t.task_id[:8]} {fn} -> {t.data_id}{deps}")
        return "\n".join(lines)


def _hex_id(*parts: bytes) -> str:
    return hashlib.sha256(length_prefixed(*parts)).hexdigest()


def plan_from_applications(
    lookup: LedgerIndex,
    applied: Iterable[Applied],
    *,
    cause_id: str,
    cause: Cause,
    topic: str = "",
    replace: Mapping[DataRef, DataRef] | None = None,
    supersedes: Mapping[DataRef, Coordinates] | None = None,
    truncated: bool = False,
    cyclic: bool = False,
    created_at_ms: int | None = None,
    upgrade: Mapping[str, tuple[str, bytes]] | None = None,
) -> RecomputePlan:
    """Tasks for `applied` (already in dependency order); SOURCE entries are skipped (nothing to run).

    `replace` maps an old input version onto the one to replay with (a changed source record);
    `upgrade` maps a function id onto the (version, code hash) to replay it with (a changed function).
    `supersedes` maps an output onto where the original record sits; such a task's topic is that
    record's topic (a plan can span the topics of a multi-step pipeline), the others get `topic`.

    Whether an input is original data (`InputOrigin.SOURCE`) or an unaffected intermediate (`STORED`)
    comes from the index's node kinds, asked once for all the plan's inputs (`sources_among`): no
    ledger entry is decoded to plan.
    """
    apps = [a for a in applied if a.entry.application.kind is not ApplicationKind.SOURCE]
    plan_id = _hex_id(cause_id.encode("utf-8"), *(a.entry.entry_id for a in apps))
    created = now_ms() if created_at_ms is None else created_at_ms
    replace = replace or {}
    supersedes = supersedes or {}
    # First pass: the task ids, and for each input the earlier task producing it (None: not in the
    # plan before it). Those others are then asked of the index in one batch.
    task_ids: list[str] = []
    from_tasks: list[list[str | None]] = []
    outside: list[DataRef] = []
    producer: dict[DataRef, str] = {}
    for a in apps:
        app = a.entry.application
        refs = _task_inputs(a)
        row = [producer.get(ref) for _, ref in refs]
        outside += [ref for (_, ref), t in zip(refs, row, strict=True) if t is None]
        from_tasks.append(row)
        task_ids.append(_hex_id(plan_id.encode("ascii"), a.entry.entry_id))
        producer.setdefault(app.output, task_ids[-1])
    kinds = iter(lookup.sources_among(outside))
    tasks: list[RecomputeTask] = []
    for position, (a, task_id, row) in enumerate(zip(apps, task_ids, from_tasks, strict=True)):
        app = a.entry.application
        inputs: list[InputRef] = []
        for (at, ref), from_task in zip(_task_inputs(a), row, strict=True):
            if from_task is not None:
                inputs.append(InputRef(ref, InputOrigin.TASK, from_task, at))
            elif next(kinds):
                inputs.append(
                    InputRef(replace.get(ref, ref) if replace else ref, InputOrigin.SOURCE, None, at)
                )
            else:
                inputs.append(InputRef(ref, InputOrigin.STORED, None, at))
        step = _task_step(app)
        if upgrade and step.function_id in upgrade:
            version, code = upgrade[step.function_id]
            step = Step(step.kind, step.function_id, version, code, step.parameters, step.inputs)
        depends = tuple(dict.fromkeys(t for t in row if t is not None))
        where = supersedes.get(app.output) if supersedes else None
        tasks.append(
            RecomputeTask(
                task_id,
                plan_id,
                app.output.data_id,
                topic if where is None else where.topic,
                position,
                a.entry.entry_id,
                (step,),
                tuple(inputs),
                app.output.checksum,
                depends,
                cause,
                created,
                where,
                None if inputs and inputs[0].position is None else a.input_count,
            )
        )
    return RecomputePlan(plan_id, cause, tuple(tasks), truncated, cyclic)


def _task_inputs(a: Applied) -> list[tuple[int | None, DataRef]]:
    """(position, node) of the inputs a task lists: every input (position None: its index), or for an
    application read without its inputs (`Applied.input_count`) those the traversal reached it
    through, the ones this plan changes."""
    if a.input_count is None:
        return [(None, ref) for ref in a.entry.application.inputs]
    assert a.reached is not None  # a head comes only from a traversal that records its edges
    if len(a.reached) == a.input_count:  # every input changes: the task lists them all, in order
        return [(None, ref) for _, ref in a.reached]
    return [(at, ref) for at, ref in a.reached]


def _task_step(app: Application) -> Step:
    """The step a task replays: as the task record carries it (a reduce keeps its window; the input
    digest is re-derived when the task runs, so the Merkle root over the inputs is not computed)."""
    digest = None
    if app.kind is ApplicationKind.REDUCE and (app.window_start is not None or app.window_end is not None):
        digest = InputDigest(0, b"", app.window_start, app.window_end)
    params = tuple(sorted(app.parameters))
    return Step(StepKind(int(app.kind)), app.function_id, app.function_version, app.code_hash, params, digest)


def plan_for_alert(
    lookup: LedgerIndex,
    alert: Alert,
    *,
    cause: Cause | None = None,
    limit: int | None = None,
    created_at_ms: int | None = None,
) -> RecomputePlan:
    """The plan that fixes what `alert` found (see the module docs); `cause` defaults to the alert's."""
    cause = cause or cause_of_alert(alert)
    if alert.header is None:
        raise PlanError(f"alert {alert.alert_id} carries no provenance header: the output cannot be located")
    try:
        header = ProvenanceHeader.decode(alert.header)
    except HeaderError as exc:
        raise PlanError(f"alert {alert.alert_id}: header does not decode: {exc}") from exc
    where = Coordinates(alert.topic, alert.partition, alert.offset)
    output = DataRef(header.data_id, header.checksum)
    if alert.kind is AlertKind.SOURCE_CHANGED:
        old_source = DataRef(header.data_id, header.source_checksum)
        down = lookup.downstream(old_source, limit=limit)
        current = _current_source(lookup, header.data_id, old_source)
        replace = {old_source: current} if current is not None else {}
        return plan_from_applications(
            lookup,
            down.applications,
            cause_id=alert.alert_id,
            cause=cause,
            topic=alert.topic,
            replace=replace,
            supersedes={output: where},
            truncated=down.truncated,
            cyclic=down.cyclic,
            created_at_ms=created_at_ms,
        )
    up = lookup.upstream(output, limit=limit)
    if not up.applications:
        raise PlanError(f"the ledger has no application producing {output.describe()}")
    return plan_from_applications(
        lookup,
        up.applications,
        cause_id=alert.alert_id,
        cause=cause,
        topic=alert.topic,
        supersedes={output: where},
        truncated=up.truncated,
        cyclic=up.cyclic,
        created_at_ms=created_at_ms,
    )


def _current_source(lookup: LedgerIndex, data_id: str, old: DataRef) -> DataRef | None:
    """The newest other source version of `data_id` the ledger has (by its SOURCE entry's seq)."""
    best: tuple[int, DataRef] | None = None
    for v in lookup.versions(data_id):
        if v == old:
            continue
        for eid in lookup.producers(v):
            e = lookup.entry(eid)
            if e.application.kind is ApplicationKind.SOURCE and (best is None or e.seq > best[0]):
                best = (e.seq, v)
    return None if best is None else best[1]


def plan_for_change(
    lookup: LedgerIndex,
    event: ChangeEvent,
    *,
    topic: str = "",
    cause: Cause | None = None,
    limit: int | None = None,
    created_at_ms: int | None = None,
    supersedes: Mapping[DataRef, Coordinates] | None = None,
) -> RecomputePlan:
    """The plan a change event calls for (see the module docs); `supersedes` locates the original
    output records (the ledger does not record Kafka coordinates: see `recompute_manager.outputs`).
    The same plan (same ids) as `plan_for_changes` of this one event."""
    return plan_for_changes(
        lookup,
        [event],
        topic=topic,
        cause=cause,
        limit=limit,
        created_at_ms=created_at_ms,
        supersedes=supersedes,
    )


def plan_for_changes(
    lookup: LedgerIndex,
    events: Sequence[ChangeEvent],
    *,
    topic: str = "",
    cause: Cause | None = None,
    limit: int | None = None,
    created_at_ms: int | None = None,
    supersedes: Mapping[DataRef, Coordinates] | None = None,
) -> RecomputePlan:
    """ONE plan for a batch of change events (in the order they were consumed): the union of what
    each one affects, every application once, in dependency order.

    Sources: everything derived from each changed source's old version, replayed on the newest
    version the batch names for that DataID (the last event about it wins; after a deletion there is
    none and the replay of that source dead-letters, as for a single event). Functions: every
    application of each old version and what derives from them, replayed with the version the last
    event about that function names. Where two changed sources meet under one reduce, the reduce runs
    once with both corrections (planned apart, each plan would run it).

    One traversal of the ledger for all source versions and function applications (`limit` bounds
    it), recording how each application was reached: a reduce over many inputs becomes a task that
    lists only the inputs the plan changes (`RecomputeTask.input_count`). The plan id covers the
    events' change ids in order, so a redelivered batch
    plans the same ids; a batch of one event is `plan_for_change` of it. `cause` defaults to the
    event's cause, or for several a `changes` cause with one sub-cause per event
    (`changes_cause`). `ChangeBatch` also plans any subset of the events without traversing again.
    """
    batch = ChangeBatch.of(
        lookup, events, topic=topic, limit=limit, created_at_ms=created_at_ms, supersedes=supersedes
    )
    return batch.plan(cause=cause)


def changes_cause(causes: Sequence[Cause]) -> Cause:
    """The cause of a plan of several change events: one sub-cause per event (one: that one)."""
    return (
        causes[0] if len(causes) == 1 else Cause("changes", f"{len(causes)} change events", "", tuple(causes))
    )


_Roots = tuple[tuple[DataRef, ...], tuple[bytes, ...]]
"""One change event's roots in the ledger: (old source versions, applications of the old function)."""


@dataclass(frozen=True, eq=False)
class ChangeBatch:
    """Change events and what they affect, from ONE traversal of the ledger: the plan of all of them
    (`plan_for_changes`), of one (`plan_for_change`'s plan, same ids) or of any subset, and how many
    tasks each event's own plan has, without traversing again: an event's own plan is what it reaches
    among the batch's applications (the batch's set is closed under consumers, so the same set
    `downstream` finds for it alone). With a `limit` that cut the traversal short (`truncated`), a
    subset is planned with its own traversal instead."""

    lookup: LedgerIndex
    events: tuple[ChangeEvent, ...]
    roots: tuple[_Roots, ...]
    applications: tuple[Applied, ...]
    """Everything the events affect, in dependency order."""
    truncated: bool
    cyclic: bool
    topic: str = ""
    limit: int | None = None
    created_at_ms: int | None = None
    supersedes: Mapping[DataRef, Coordinates] | None = None

    @classmethod
    def of(
        cls,
        lookup: LedgerIndex,
        events: Sequence[ChangeEvent],
        *,
        topic: str = "",
        limit: int | None = None,
        created_at_ms: int | None = None,
        supersedes: Mapping[DataRef, Coordinates] | None = None,
    ) -> ChangeBatch:
        """Traverse the ledger once for `events` (raises `PlanError` for none, or an event naming
        neither a source nor a function)."""
        if not events:
            raise PlanError("no change events to plan")
        sources: dict[DataRef, None] = {}
        functions: dict[bytes, None] = {}
        roots: list[_Roots] = []
        for event in events:
            if event.source is not None:
                sources.setdefault(event.source.previous_node, None)
                roots.append(((event.source.previous_node,), ()))
            elif event.function is not None:
                f = event.function
                applied = tuple(
                    lookup.applications_of(f.function_id, f.previous_version, f.previous_code_hash or None)
                )
                functions.update(dict.fromkeys(applied))
                roots.append(((), applied))
            else:
                raise PlanError(f"change event {event.change_id} names neither a source nor a function")
        found = downstream_edges(lookup, sources, entry_ids=functions, limit=limit)
        return cls(
            lookup,
            tuple(events),
            tuple(roots),
            found.applications,
            found.truncated,
            found.cyclic,
            topic,
            limit,
            created_at_ms,
            supersedes,
        )

    def plan(self, which: Sequence[int] | None = None, *, cause: Cause | None = None) -> RecomputePlan:
        """The plan of the events at positions `which` (None: all), in batch order; the same plan (same
        ids) as `plan_for_changes` of those events, `plan_for_change` for one. `cause` defaults to
        theirs (`changes_cause`)."""
        picked = list(range(len(self.events))) if which is None else sorted(set(which))
        if not picked or picked[-1] >= len(self.events) or picked[0] < 0:
            raise PlanError(f"no such events in a batch of {len(self.events)}: {which}")
        events = [self.events[i] for i in picked]
        if len(picked) == len(self.events):
            applications, cyclic, truncated = self.applications, self.cyclic, self.truncated
        elif self.truncated:  # the union was cut short: the subset's own traversal is exact
            return ChangeBatch.of(
                self.lookup,
                events,
                topic=self.topic,
                limit=self.limit,
                created_at_ms=self.created_at_ms,
                supersedes=self.supersedes,
            ).plan(cause=cause)
        else:
            union = set().union(*(self._reached[i] for i in picked))
            applications, cyclic = dependency_order(self.applications[i] for i in sorted(union))
            truncated = False
        replace, upgrade = _replacements(events)
        ids = list(dict.fromkeys(e.change_id for e in events))
        return plan_from_applications(
            self.lookup,
            applications,
            cause_id="\n".join(ids),
            cause=cause if cause is not None else changes_cause([cause_of_change(e) for e in events]),
            topic=self.topic,
            replace=replace,
            supersedes=self.supersedes,
            truncated=truncated,
            cyclic=cyclic,
            created_at_ms=self.created_at_ms,
            upgrade=upgrade or None,
        )

    def causes_of_tasks(
        self, causes: Sequence[tuple[int, Cause]]
    ) -> Callable[[Sequence[RecomputeTask]], Cause] | None:
        """For a plan of the events at the positions `causes` names, each with its cause: the cause
        of some of its tasks (a unit's), naming only the events whose own plan has one of them
        (`changes_cause` of theirs, in the given order). A batch of 100 events planned together has
        one cause tree of 100 sub-causes; each unit, usually reached by one event, carries that one.
        None when the traversal was cut short (`truncated`): what reaches what is not known."""
        if self.truncated:
            return None
        reached = self._reached
        by_entry: dict[bytes, list[int]] = {}
        for k, (position, _) in enumerate(causes):
            for i in reached[position]:
                by_entry.setdefault(self.applications[i].entry.entry_id, []).append(k)
        every = changes_cause([c for _, c in causes])

        def cause_of(tasks: Sequence[RecomputeTask]) -> Cause:
            ks = sorted({k for t in tasks for k in by_entry.get(t.entry_id, ())})
            return changes_cause([causes[k][1] for k in ks]) if ks else every

        return cause_of

    def own_tasks(self) -> tuple[int, ...]:
        """How many tasks each event's own plan (`plan_for_change`) has, in event order: what a policy
        judges each event by. Exact unless `truncated`."""
        kinds = [a.entry.application.kind is not ApplicationKind.SOURCE for a in self.applications]
        return tuple(sum(kinds[i] for i in seen) for seen in self._reached)

    @functools.cached_property
    def _reached(self) -> tuple[frozenset[int], ...]:
        """For each event: the positions in `applications` it reaches (its roots' consumers, their
        outputs' consumers, ...; a root application itself). One pass over every input, on demand."""
        applications = self.applications
        consumers: dict[DataRef, list[int]] = {}
        at: dict[bytes, int] = {}
        for i, a in enumerate(applications):
            at[a.entry.entry_id] = i
            for ref in a.edge_inputs():
                consumers.setdefault(ref, []).append(i)
        found: list[frozenset[int]] = []
        for nodes, entry_ids in self.roots:
            seen = {at[e] for e in entry_ids if e in at}
            queue = [applications[i].entry.application.output for i in seen] + list(nodes)
            outputs: set[DataRef] = set(queue)
            while queue:  # each node is queued once
                for i in consumers.get(queue.pop(), ()):
                    if i in seen:
                        continue
                    seen.add(i)
                    out = applications[i].entry.application.output
                    if out not in outputs:
                        outputs.add(out)
                        queue.append(out)
            found.append(frozenset(seen))
        return tuple(found)


def _replacements(
    events: Sequence[ChangeEvent],
) -> tuple[dict[DataRef, DataRef], dict[str, tuple[str, bytes]]]:
    """(old source version -> the newest version the events name for its DataID (none after a
    deletion), function id -> the (version, code hash) the last event about it names)."""
    olds: dict[DataRef, None] = {}
    latest: dict[str, DataRef | None] = {}
    upgrade: dict[str, tuple[str, bytes]] = {}
    for event in events:
        if event.source is not None:
            s = event.source
            olds.setdefault(s.previous_node, None)
            deleted = event.kind is ChangeKind.SOURCE_DELETED or s.current is None
            latest[s.data_id] = None if deleted else s.current_node
        elif event.function is not None:
            f = event.function
            upgrade[f.function_id] = (f.current_version, f.current_code_hash)
    replace: dict[DataRef, DataRef] = {}
    for old in olds:
        current = latest.get(old.data_id)
        if current is not None:
            replace[old] = current
    return replace, upgrade
