"""The progress topic: what the planner decided, what each unit did, and plans waiting for approval.

Three kinds of record, told apart by the `streamprov.recompute.record` header and keyed so that log
compaction keeps one of each that matters (never a unit's record under its plan's key):

* `progress`, key = plan id: the plan's state as the planner (or `approve`) left it: `planned`,
  `approved`, or the policy's refusal (`needs_approval`, `over_budget`, ...), or `done` for a plan
  with nothing to run; tasks in the plan, units in the plan. JSON (`Progress`, `unit` = -1).
* `progress`, key = `<plan id>/duplicate`: the same cause refused as a repeat (`duplicate`), under a
  key of its own: it has the plan id of the plan it repeats, whose record it must not replace.
* `progress`, key = `<plan id>/<unit>`: one unit done (or `failed`: some task dead-lettered), with
  its counts. Written in the unit's own transaction, so a unit counts once however often it ran.
* `pending-unit`, key = `<plan id>/pending/<unit>`: a unit of a plan waiting for approval, in the
  tasks-topic encoding (`RecomputeUnit`), for `streamprov recompute approve` to publish.

`PlanStatus.of` folds them into tasks done / total per plan; `read_progress` reads the topic to its
end (read_committed, no group).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from recompute_manager.policy import Action
from recompute_manager.units import RecomputeUnit, UnitError
from streamprov.errors import StreamprovError

__all__ = [
    "KIND_PENDING",
    "KIND_PROGRESS",
    "RECORD_HEADER",
    "PlanStatus",
    "Progress",
    "ProgressLog",
    "pending_key",
    "progress_bar",
    "read_progress",
    "unit_key",
]

log = logging.getLogger(__name__)

RECORD_HEADER = "streamprov.recompute.record"
KIND_PROGRESS = b"progress"
DUPLICATE = Action.DUPLICATE.value
"""The plan state of a cause the policy refused as a repeat. A cause repeated exactly has the plan id
of the plan it repeats; its record must not replace that plan's."""
KIND_PENDING = b"pending-unit"

RUNNING_STATES = ("planned", "approved")
"""Plan states after which units report in."""


def unit_key(plan_id: str, unit: int) -> bytes:
    return f"{plan_id}/{unit}".encode("ascii")


def pending_key(plan_id: str, unit: int) -> bytes:
    return f"{plan_id}/pending/{unit}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Progress:
    """A plan's state (`unit` = -1) or one unit's result, as published on the progress topic (JSON)."""

    plan_id: str
    cause: str
    subject: str
    state: str
    """Plan: `planned`, `approved`, `done` (nothing to run) or the policy's refusal; unit: `done` or
    `failed` (some task dead-lettered)."""
    reason: str
    total: int
    """Tasks in the plan (plan record) or in the unit (unit record)."""
    done: int
    recomputed: int
    unchanged: int
    skipped: int
    dead: int
    at_ms: int
    unit: int = -1
    units: int = 0
    """Units in the plan."""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        """Raises `StreamprovError` for anything that is not a progress record (older ones decode)."""
        try:
            d = json.loads(raw)
            known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
            return cls(**known)
        except (ValueError, TypeError, KeyError) as exc:
            raise StreamprovError(f"not a progress record: {exc}") from exc

    @property
    def key(self) -> bytes:
        if self.unit >= 0:
            return unit_key(self.plan_id, self.unit)
        if self.state == DUPLICATE:  # a repeat of the plan's cause: compaction must keep the plan's own
            return f"{self.plan_id}/duplicate".encode("ascii")
        return self.plan_id.encode("ascii")


def progress_bar(done: int, total: int, width: int = 20) -> str:
    """`[#####---------------]  25%`; a plan of no tasks is complete."""
    frac = 1.0 if total <= 0 else min(1.0, max(0.0, done / total))
    filled = int(frac * width + 1e-9)
    return f"[{'#' * filled}{'-' * (width - filled)}] {int(frac * 100):3d}%"


@dataclass
class PlanStatus:
    """One plan's progress: the planner's record and every unit's latest record, folded."""

    plan: Progress | None = None
    units: dict[int, Progress] = field(default_factory=dict)

    @property
    def plan_id(self) -> str:
        if self.plan is not None:
            return self.plan.plan_id
        return next(iter(self.units.values())).plan_id

    @property
    def unit_count(self) -> int:
        if self.plan is not None and self.plan.units:
            return self.plan.units
        return max((u.units for u in self.units.values()), default=0)

    @property
    def total(self) -> int:
        if self.plan is not None:
            return self.plan.total
        return sum(u.total for u in self.units.values())

    def _sum(self, name: str) -> int:
        if not self.units and self.plan is not None:
            return int(getattr(self.plan, name))
        return sum(int(getattr(u, name)) for u in self.units.values())

    @property
    def done(self) -> int:
        return self._sum("done")

    @property
    def state(self) -> str:
        base = self.plan.state if self.plan is not None else "planned"
        if base not in RUNNING_STATES:
            return base
        if not self.units:
            return base
        if len(self.units) < self.unit_count:
            return "running"
        return "failed" if any(u.state == "failed" for u in self.units.values()) else "done"

    def line(self) -> str:
        ref = self.plan if self.plan is not None else next(iter(self.units.values()))
        counts = ", ".join(f"{n} {self._sum(n)}" for n in ("recomputed", "unchanged", "skipped", "dead"))
        units = f", {len(self.units)}/{self.unit_count} units" if self.unit_count else ""
        return (
            f"{self.plan_id[:16]} {self.state:<14} {progress_bar(self.done, self.total)} "
            f"{self.done}/{self.total} tasks{units} ({counts}) {ref.cause} {ref.subject}: {ref.reason}"
        )

    @classmethod
    def of(cls, records: Iterable[Progress]) -> dict[str, PlanStatus]:
        """Plan id -> status, from progress records in topic order (the latest record of a key wins)."""
        plans: dict[str, PlanStatus] = {}
        for p in records:
            status = plans.setdefault(p.plan_id, cls())
            if p.unit < 0:
                if p.state == DUPLICATE and status.plan is not None:
                    continue  # the same cause again: the plan it repeats keeps its state
                status.plan = p
            else:
                status.units[p.unit] = p
        return plans


@dataclass
class ProgressLog:
    """The progress topic as read: progress records in order, pending units by plan and index."""

    records: list[Progress] = field(default_factory=list)
    pending: dict[str, dict[int, RecomputeUnit]] = field(default_factory=dict)
    unreadable: int = 0
    complete: bool = True
    """False when the read stopped at its deadline before the end of every partition."""

    def add(self, key: bytes | None, value: bytes | None, headers: Mapping[str, bytes]) -> None:
        if not value:
            return
        kind = headers.get(RECORD_HEADER, KIND_PROGRESS)
        try:
            if kind == KIND_PENDING:
                unit = RecomputeUnit.decode(value)
                self.pending.setdefault(unit.plan_id, {})[unit.index] = unit
            else:
                self.records.append(Progress.decode(value))
        except (StreamprovError, UnitError) as exc:
            self.unreadable += 1
            log.warning("progress record %r skipped: %s", key, exc)

    def statuses(self) -> dict[str, PlanStatus]:
        return PlanStatus.of(self.records)


def _headers(raw: Any) -> dict[str, bytes]:
    items = list(raw.items()) if isinstance(raw, dict) else list(raw or [])
    return {k: (v.encode() if isinstance(v, str) else v) for k, v in items if v is not None}


def read_progress(config: Mapping[str, Any], topic: str, *, timeout_s: float = 10.0) -> ProgressLog:
    """Every committed record of the progress topic up to its current end (bounded by `timeout_s`).

    Each partition is read from its log start, which retention (or `delete_records`) moves past 0: a
    partition whose records are all gone (log start = end) is read when it is assigned.

    Raises `StreamprovError` when the topic does not exist or the brokers do not answer in time.
    """
    if timeout_s <= 0:
        raise StreamprovError(f"the timeout must be more than 0 seconds, not {timeout_s}")
    consumer = Consumer(
        {
            **{k: v for k, v in config.items() if k != "group.id"},
            "group.id": "streamprov-recompute-status",  # assign() only, never commits
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",  # retention moved the log start while we read
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
    )
    out = ProgressLog()
    try:
        meta = consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise StreamprovError(f"progress topic {topic!r} does not exist")
        deadline = time.monotonic() + timeout_s
        ends: dict[int, int] = {}
        read_to: dict[int, int] = {}  # per partition: every offset below it is read (or gone)
        for part in sorted(meta.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=timeout_s)
            ends[part], read_to[part] = int(high), int(low)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(ends)])
        lows_checked = time.monotonic()
        while True:
            behind = _behind(consumer, topic, ends, read_to)
            if not behind:
                break
            now = time.monotonic()
            if now >= deadline:
                out.complete = False
                break
            batch = consumer.consume(500, 0.2)
            if not batch and now - lows_checked >= _LOW_RECHECK_S:
                # nothing comes: retention may have deleted what was left to read
                lows_checked = now
                for part in behind:
                    low, _ = consumer.get_watermark_offsets(
                        TopicPartition(topic, part), timeout=max(0.1, deadline - now)
                    )
                    read_to[part] = max(read_to[part], int(low))
            for msg in batch:
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("progress topic: %s", err.str())
                    continue
                part, offset = msg.partition(), msg.offset()
                if part is not None and offset is not None:
                    read_to[part] = max(read_to[part], offset + 1)
                out.add(msg.key(), msg.value(), _headers(msg.headers()))
    except KafkaException as exc:
        cause = exc.args[0] if exc.args else None
        reason = cause.str() if isinstance(cause, KafkaError) else str(exc)
        raise StreamprovError(
            f"the brokers at {config.get('bootstrap.servers')!r} did not answer within {timeout_s:g} s "
            f"({reason}): check kafka.bootstrap_servers and that Kafka is running, or allow more time"
        ) from exc
    finally:
        consumer.close()
    return out


_LOW_RECHECK_S = 1.0
"""How long `read_progress` waits for records before it asks again where the partitions start."""


def _behind(consumer: Consumer, topic: str, ends: Mapping[int, int], read_to: dict[int, int]) -> list[int]:
    """The partitions not read up to their end yet (`read_to` updated from the consumer's positions,
    which step over transaction markers)."""
    behind = []
    for part, end in ends.items():
        if read_to[part] < end:
            pos = consumer.position([TopicPartition(topic, part)])[0].offset
            if pos >= 0:  # OFFSET_INVALID before the first record of the partition
                read_to[part] = max(read_to[part], pos)
        if read_to[part] < end:
            behind.append(part)
    return behind
