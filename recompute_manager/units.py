"""Units: a plan's task graph cut into independent parts, the records workers take from the tasks topic.

A unit is a connected component of the plan's task graph (`depends_on` edges, plus an edge between
tasks that write the same DataID), so every input a task takes from another task is produced inside
its own unit: a worker never waits for another worker's intermediate results, and units of one plan
can run anywhere, in any order, in parallel. Tasks keep the plan's dependency order inside a unit.

On the tasks topic a unit is ONE record (`schemas/recompute_unit.avsc`, its tasks in the
`recompute_task.avsc` encoding), keyed by the DataID of its last task (its sink): the partitioner
sends every unit with that key, from any plan, to one partition, where one worker runs them one after
the other. Unit ids (`plan_id/index`) are deterministic: planning a cause twice gives the same units.

A component too large for one record is cut into parts (`split_units(max_bytes=)`), which are units
keyed by the component's sink: they run in order, and a task reads what an earlier part's task made
as a stored input naming that task (docs/recompute-manager.md, Parts).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import fastavro

from recompute_manager.planner import InputOrigin, RecomputePlan, RecomputeTask
from recompute_manager.policy import Cause
from streamprov import avro
from streamprov.errors import StreamprovError
from streamprov.header import now_ms

__all__ = [
    "UNIT_PREFIX",
    "RecomputeUnit",
    "UnitError",
    "cause_from_dict",
    "cause_json",
    "encoded_units",
    "split_units",
]

SCHEMA_NAME = "recompute_unit"
SCHEMA = avro.load_schema_json(SCHEMA_NAME)
UNIT_PREFIX = avro.single_object_prefix(SCHEMA)
_READER = avro.without_logical_types(SCHEMA)
_PARSED = fastavro.parse_schema(_READER)


class UnitError(StreamprovError):
    """Bytes that are not a recompute unit of this schema version, or a unit that is inconsistent."""


def cause_json(cause: Cause) -> str:
    return json.dumps(cause.to_dict(), sort_keys=True, separators=(",", ":"))


def cause_from_dict(d: Mapping[str, Any]) -> Cause:
    return Cause(
        str(d["kind"]),
        str(d["subject"]),
        str(d.get("detail", "")),
        tuple(cause_from_dict(c) for c in d.get("causes", ())),
    )


@dataclass(frozen=True, slots=True)
class RecomputeUnit:
    plan_id: str
    index: int
    count: int
    plan_tasks: int
    subject: str
    cause: Cause
    """Why it runs: the policy decision's cause tree (with an approval on top when approved)."""
    tasks: tuple[RecomputeTask, ...]
    created_at_ms: int
    sink: str = ""
    """A part of a component cut to fit a record (`split_units`): the DataID of the component's
    sink, the key of all its parts. Empty: the unit is the whole component, its last task the sink."""

    @property
    def unit_id(self) -> str:
        return f"{self.plan_id}/{self.index}"

    @property
    def key(self) -> bytes:
        """The tasks-topic key: the DataID of the sink (the last task of the unit's component)."""
        return self.sink.encode("utf-8") if self.sink else self.tasks[-1].key

    def plan(self) -> RecomputePlan:
        """The unit as a plan for `Executor.run_plan` (its tasks are closed under `depends_on`)."""
        return RecomputePlan(self.plan_id, self.tasks[0].cause, self.tasks, False, False)

    def approved(self, by: str) -> RecomputeUnit:
        """The same unit, its cause tree topped by an operator's approval."""
        top = Cause("approved", self.subject, f"approved by {by}", (self.cause,))
        return replace(self, cause=top, tasks=tuple(replace(t, cause=top) for t in self.tasks))

    def encode(self, tasks: Sequence[bytes] | None = None) -> bytes:
        """`tasks`: the tasks already encoded for this unit (`RecomputeTask.encode(unit_cause=)`),
        as `encoded_units` has them; else they are encoded here."""
        record = {
            "plan_id": self.plan_id,
            "unit_index": self.index,
            "unit_count": self.count,
            "plan_tasks": self.plan_tasks,
            "key": self.sink or self.tasks[-1].data_id,
            "subject": self.subject,
            "cause": cause_json(self.cause),
            "created_at": self.created_at_ms,
            "tasks": list(tasks)
            if tasks is not None
            else [t.encode(unit_cause=self.cause) for t in self.tasks],
        }
        out = io.BytesIO()
        out.write(UNIT_PREFIX)
        fastavro.schemaless_writer(out, _PARSED, record)
        return out.getvalue()

    @classmethod
    def decode(cls, raw: bytes | None) -> RecomputeUnit:
        """Raises `UnitError` (only) for anything that is not a consistent unit."""
        if not isinstance(raw, bytes) or raw[: len(UNIT_PREFIX)] != UNIT_PREFIX:
            raise UnitError("not a recompute unit of this schema version (marker or fingerprint differ)")
        try:
            r: Any = avro.schemaless_read(raw[len(UNIT_PREFIX) :], _READER, _READER)
            cause = cause_from_dict(json.loads(r["cause"]))
            tasks = tuple(RecomputeTask.decode(t, unit_cause=cause) for t in r["tasks"])
            key = r["key"]
            unit = cls(
                r["plan_id"],
                r["unit_index"],
                r["unit_count"],
                r["plan_tasks"],
                r["subject"],
                cause,
                tasks,
                r["created_at"],
                "" if tasks and key == tasks[-1].data_id else key,
            )
        except Exception as exc:  # untrusted bytes: one typed error out
            raise UnitError(f"recompute unit does not decode: {exc}") from exc
        unit.check()
        if not key:
            raise UnitError(f"unit {unit.unit_id}: empty key")
        return unit

    def check(self) -> None:
        """Consistency a worker relies on: tasks of this plan, dependencies inside the unit, in order."""
        if not self.tasks:
            raise UnitError(f"unit {self.unit_id} has no tasks")
        if not 0 <= self.index < self.count or len(self.tasks) > self.plan_tasks:
            raise UnitError(
                f"unit {self.unit_id}: index {self.index} of {self.count}, "
                f"{len(self.tasks)} of {self.plan_tasks} tasks"
            )
        seen: set[str] = set()
        for t in self.tasks:
            if t.plan_id != self.plan_id:
                raise UnitError(
                    f"unit {self.unit_id}: task {t.task_id[:12]} belongs to plan {t.plan_id[:12]}"
                )
            missing = [d for d in t.depends_on if d not in seen]
            if missing:
                raise UnitError(
                    f"unit {self.unit_id}: task {t.task_id[:12]} depends on {missing[0][:12]}, "
                    "which is not earlier in the unit"
                )
            seen.add(t.task_id)


def split_units(
    plan: RecomputePlan,
    *,
    subject: str,
    cause: Cause,
    created_at_ms: int | None = None,
    max_bytes: int | None = None,
    cause_of: Callable[[Sequence[RecomputeTask]], Cause] | None = None,
) -> tuple[RecomputeUnit, ...]:
    """`encoded_units` without their records."""
    found = encoded_units(
        plan,
        subject=subject,
        cause=cause,
        created_at_ms=created_at_ms,
        max_bytes=max_bytes,
        cause_of=cause_of,
    )
    return tuple(u for u, _ in found)


def encoded_units(
    plan: RecomputePlan,
    *,
    subject: str,
    cause: Cause,
    created_at_ms: int | None = None,
    max_bytes: int | None = None,
    cause_of: Callable[[Sequence[RecomputeTask]], Cause] | None = None,
) -> tuple[tuple[RecomputeUnit, bytes], ...]:
    """The plan's connected components (by `depends_on` and by output DataID), each in plan order;
    units are numbered by their first task's position. A dependency on a task outside the plan (a
    truncated plan) is dropped from the graph: the executor reports that task's input as missing.

    `max_bytes`: a component whose unit record would be larger is cut into parts (`_parts`), runs of
    its tasks in plan order, each under it when its tasks allow (a single task larger than it stays
    one part: the caller refuses it). The parts share the component's sink as key, so they run one
    after the other on one partition, each after the previous one committed.

    `cause_of`: the cause of a component's unit(s) from its tasks, instead of `cause` for all (a plan
    of many change events: each unit names only the events that reach its tasks,
    `ChangeBatch.causes_of_tasks`).

    Returns each unit with its record (`RecomputeUnit.encode`): every task is encoded once, for the
    size check and the record (a reduce task over 100 inputs takes ~0.1 ms to encode).
    """
    parent: dict[str, str] = {t.task_id: t.task_id for t in plan.tasks}

    def find(x: str) -> str:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    writer: dict[str, str] = {}
    for t in plan.tasks:
        for d in t.depends_on:
            if d in parent:
                union(t.task_id, d)
        first = writer.setdefault(t.data_id, t.task_id)
        union(first, t.task_id)
    groups: dict[str, list[RecomputeTask]] = {}
    for t in plan.tasks:  # plan order: dependency order, and first-task order of the groups
        groups.setdefault(find(t.task_id), []).append(t)
    created = now_ms() if created_at_ms is None else created_at_ms
    encoded = _TaskRecords()
    cut: list[tuple[tuple[RecomputeTask, ...], str, Cause]] = []
    for found in groups.values():
        # The tasks run for their unit's cause (the decision's: the plan's cause through the policy),
        # which the unit record writes once, not once per task (`RecomputeTask.encode`).
        why = cause if cause_of is None else cause_of(found)
        tasks = [t if t.cause is why else replace(t, cause=why) for t in found]
        whole = RecomputeUnit(plan.plan_id, 0, 1, len(plan.tasks), subject, why, tuple(tasks), created)
        if max_bytes is None or len(whole.encode(encoded.of(tasks))) <= max_bytes:
            cut.append((whole.tasks, "", why))
            continue
        budget = max_bytes - len(replace(whole, tasks=(), sink=tasks[-1].data_id).encode())
        sink = tasks[-1].data_id
        parts = _parts(tasks, budget, encoded)
        cut += [(part, "" if part[-1].data_id == sink else sink, why) for part in parts]
    count = len(cut)
    units = (
        RecomputeUnit(plan.plan_id, i, count, len(plan.tasks), subject, why, tasks, created, sink)
        for i, (tasks, sink, why) in enumerate(cut)
    )
    return tuple((u, u.encode(encoded.of(u.tasks))) for u in units)


class _TaskRecords:
    """Each task's encoding in its unit (`RecomputeTask.encode(unit_cause=)`), made once: by task id,
    for that very task object (a part's copy of a task, `_in_part`, is encoded again)."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[RecomputeTask, bytes]] = {}

    def of(self, tasks: Sequence[RecomputeTask]) -> list[bytes]:
        out: list[bytes] = []
        for t in tasks:
            found = self._done.get(t.task_id)
            if found is None or found[0] is not t:
                found = self._done[t.task_id] = (t, t.encode(unit_cause=t.cause))
            out.append(found[1])
        return out


def _parts(tasks: list[RecomputeTask], budget: int, encoded: _TaskRecords) -> list[tuple[RecomputeTask, ...]]:
    """`tasks` (one component, plan order) in consecutive runs whose encoded tasks fit `budget`
    bytes. A task's input from a task of an earlier part becomes a stored input (`InputOrigin.STORED`)
    that names its task (`from_task`): the worker reads the earlier part's committed output from the
    value store at its latest version, and dead-letters the task when that part dead-lettered the
    named one (`Executor.run_plan`)."""
    parts: list[list[RecomputeTask]] = [[]]
    used = 0
    for t, raw in zip(tasks, encoded.of(tasks), strict=True):
        size = len(raw) + 8  # + the array item's length prefix and block count, generously
        if parts[-1] and used + size > budget:
            parts.append([])
            used = 0
        parts[-1].append(t)
        used += size
    out: list[tuple[RecomputeTask, ...]] = []
    for part in parts:
        here = {t.task_id for t in part}
        out.append(tuple(_in_part(t, here) for t in part))
    return out


def _in_part(task: RecomputeTask, here: set[str]) -> RecomputeTask:
    """`task` with its inputs from tasks outside `here` (its part) made stored inputs."""
    if all(d in here for d in task.depends_on):
        return task
    inputs = tuple(
        replace(i, origin=InputOrigin.STORED)
        if i.origin is InputOrigin.TASK and i.from_task not in here
        else i
        for i in task.inputs
    )
    return replace(task, inputs=inputs, depends_on=tuple(d for d in task.depends_on if d in here))
