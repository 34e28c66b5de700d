"""Workers: members of the `<group>-workers` consumer group over the tasks topic, one unit per transaction.

A worker takes one unit at a time (`consume(1)`: a rebalance waits for at most one unit), runs it
with its own `Executor` over the process's views (cache, early cut-off, retries with backoff, dead
letters), and publishes in ONE transaction: the changed records to their priority topics, the
dead letters, the unit's progress record and the tasks-topic offset. Nothing of a unit is visible
before that commit; a crash or an abort replays the unit (its ids are deterministic, the cache makes
the replay cheap, and superseded versions are only written after the commit: `views.CommittedCache`).

Identity and fencing: the consumer is a static member (`group.instance.id` =
`<replica>.worker-<index>`) and the producer's `transactional.id` is `<group>-workers.` plus the
same, both stable across restarts. A restarted replica takes its predecessor's partitions back at
once (no rebalance wait) and its `init_transactions` aborts whatever transaction the predecessor left
open, so read_committed readers are not held up until the transaction timeout. A zombie (a
predecessor still running) is fenced by the broker on both sides (KIP-447: offsets are committed
with the consumer's group generation); a fenced worker stops and the manager stops with it.

An undecodable record on the tasks topic is dead-lettered (reason `deserialization_error`) with its
offset, in one transaction; any other failure before the commit (a view not readable, a transaction
aborted) rewinds to the unit and tries again after an exponential backoff.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from recompute_manager.executor import DeadLetter, Executor, PlanResult
from recompute_manager.ledger_entries import ledger_requests
from recompute_manager.outputs import where
from recompute_manager.priority import PlainRecord, PriorityPublisher, PriorityRecord
from recompute_manager.progress import KIND_PROGRESS, RECORD_HEADER, Progress
from recompute_manager.units import RecomputeUnit, UnitError
from recompute_manager.views import Staged, Views
from streamprov.agents.dead_letter import DeadLetterReason, dead_letter_headers, fit, source_of
from streamprov.agents.kafka_io import RebalanceEvents, is_fenced, kafka_error, seek_retrying
from streamprov.agents.processor import FatalProcessorError, FencedError
from streamprov.errors import StreamprovError
from streamprov.header import now_ms
from streamprov.inspect import message_headers
from streamprov.signing import Signer

MAX_POLL_INTERVAL_MS = 1_800_000
"""A worker polls between units only: a unit may run this long before the group drops the worker
(its transaction then fails and the unit runs elsewhere). Override with `consumer_config`."""

__all__ = ["UnitWorker", "WorkerSettings", "WorkerStats", "instance_id", "unit_progress"]

log = logging.getLogger(__name__)


def instance_id(*parts: str) -> str:
    """A `group.instance.id` from `parts`: Kafka allows only [a-zA-Z0-9._-], at most 249 characters."""
    text = ".".join(re.sub(r"[^a-zA-Z0-9._-]", "_", p) for p in parts)
    return text[:249]


@dataclass(frozen=True)
class WorkerSettings:
    kafka: Mapping[str, Any]
    group_id: str
    """The workers' consumer group (`<manager group>-workers`)."""
    member: str
    """`<replica>.worker-<index>` (`instance_id`): this worker's stable identity in the group (its
    `group.instance.id`) and, with the group, in its transactions."""
    tasks_topic: str
    progress_topic: str
    dead_letter_topic: str
    priority_topic: Callable[[str], str]
    consumer_config: Mapping[str, Any]
    poll_timeout_s: float = 0.5
    signer_for: Callable[[str], Signer | None] = lambda _t: None
    """The signer of an output topic's corrected records (None: unsigned)."""
    backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    ledger_requests_topic: str | None = None
    """Where the unit's ledger entries go (the sequencer's requests topic), in the unit's transaction;
    None: recomputes are not recorded."""
    ledger_id: str = ""

    @property
    def transactional_id(self) -> str:
        return f"{self.group_id}.{self.member}"


@dataclass
class WorkerStats:
    units: int = 0
    tasks_recomputed: int = 0
    tasks_unchanged: int = 0
    tasks_skipped: int = 0
    dead_letters: int = 0
    published: int = 0
    transactions: int = 0
    aborted: int = 0
    malformed: int = 0


def unit_progress(unit: RecomputeUnit, result: PlanResult) -> Progress:
    unchanged = sum(r.unchanged for r in result.recomputed)
    return Progress(
        unit.plan_id,
        unit.tasks[0].cause.kind,
        unit.subject,
        "failed" if result.dead else "done",
        f"unit {unit.index + 1}/{unit.count}: {len(unit.tasks)} tasks",
        len(unit.tasks),
        len(result.recomputed) + len(result.skipped) + len(result.dead),
        len(result.recomputed) - unchanged,
        unchanged,
        len(result.skipped),
        len(result.dead),
        now_ms(),
        unit.index,
        unit.count,
    )


class UnitWorker:
    """One member of the workers group: `run(stop)` in a thread until `stop` is set."""

    def __init__(
        self,
        settings: WorkerSettings,
        views: Views,
        executor: Executor,
        *,
        on_done: Callable[[RecomputeUnit, Progress], None] | None = None,
    ) -> None:
        self.settings = s = settings
        self.views = views
        self.executor = executor
        self.on_done = on_done
        self.stats = WorkerStats()
        self.error: BaseException | None = None
        self.heartbeat = time.monotonic()
        self.busy = False
        self.assigned: set[tuple[str, int]] = set()
        self._events = RebalanceEvents()
        consumer = {**s.kafka, **s.consumer_config}
        consumer.setdefault("max.poll.interval.ms", MAX_POLL_INTERVAL_MS)
        consumer.update(
            {
                "group.id": s.group_id,
                "group.instance.id": s.member,
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        self._consumer = Consumer(consumer)
        self._publisher = PriorityPublisher(s.kafka, s.transactional_id)
        self._backoff = 0.0

    def close(self) -> None:
        for closer in (self._consumer.close, self._publisher.close):
            try:
                closer()
            except (KafkaException, RuntimeError) as exc:
                log.warning("worker %s closing: %s", self.settings.member, exc)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        """Consume and run units until `stop`; a fenced or fatal producer ends it (`self.error`)."""
        s = self.settings
        e = self._events
        self._consumer.subscribe(
            [s.tasks_topic], on_assign=e.on_assign, on_revoke=e.on_revoke, on_lost=e.on_lost
        )
        try:
            while not stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    msgs = self._consumer.consume(1, s.poll_timeout_s)
                except KafkaException as exc:
                    self._consume_error(kafka_error(exc))
                    continue
                self._rebalanced()
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        self._consume_error(err)
                        continue
                    if not self._handle(msg) and self._backoff:
                        stop.wait(self._backoff)
        except BaseException as exc:  # the manager reports it and stops
            self.error = exc
            log.error("worker %s stopped: %s", s.member, exc)
        finally:
            self.busy = False

    def _consume_error(self, err: KafkaError) -> None:
        """Log a consumer error; a fatal one (e.g. FENCED_INSTANCE_ID: another live member has this
        worker's group.instance.id, so two replicas share a replica id) ends the worker."""
        if err.fatal():
            cls = FencedError if is_fenced(err) else FatalProcessorError
            raise cls(f"worker {self.settings.member}: fatal consumer error: {err.str()}", err)
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("worker %s consume: %s", self.settings.member, err.str())

    def _rebalanced(self) -> None:
        events = self._events.drain()
        if events:  # a partition that moved may carry units another replica ran: catch up again
            with self.views.lock:
                self.views.forget_fresh()
        for kind, parts in events:
            if kind == "assign":
                self.assigned.update(parts)
            else:
                self.assigned.difference_update(parts)
            log.info("worker %s %s %s", self.settings.member, kind, sorted(parts))

    def _outputs(
        self, unit: RecomputeUnit, result: PlanResult, progress: Progress
    ) -> tuple[list[tuple[str, PriorityRecord]], list[PlainRecord]]:
        """What the unit's transaction publishes: corrected records, dead letters, its progress
        record and its ledger entries."""
        s = self.settings
        records = [
            (s.priority_topic(r.task.topic), PriorityRecord.of(r, signer=s.signer_for(r.task.topic)))
            for r in result.changed
        ]
        plain = [
            PlainRecord(s.dead_letter_topic, d.task.key, d.task.encode(), tuple(d.headers()))
            for d in result.dead
        ]
        plain.append(
            PlainRecord(s.progress_topic, progress.key, progress.encode(), ((RECORD_HEADER, KIND_PROGRESS),))
        )
        if s.ledger_requests_topic is not None:
            key = s.ledger_id.encode()
            for request in ledger_requests(result.recomputed, s.ledger_id, device_id=s.member):
                plain.append(PlainRecord(s.ledger_requests_topic, key, request))
        return records, plain

    def _handle(self, msg: Message) -> bool:
        """One unit, one transaction; False when it must be tried again (rewound)."""
        at = where(msg)
        offsets = [TopicPartition(at.topic, at.partition, at.offset + 1)]
        try:
            unit = RecomputeUnit.decode(msg.value())
        except UnitError as exc:
            return self._dead_letter(msg, exc, offsets)
        self.busy = True
        t0 = time.monotonic()
        log.info(
            "unit %d/%d of plan %s started: %d tasks",
            unit.index + 1,
            unit.count,
            unit.plan_id[:12],
            len(unit.tasks),
        )
        try:
            with self.views.lock:
                self.views.for_execution(unit.plan_id)
            t1 = time.monotonic()
            self.views.cache.begin()
            try:
                result = self.executor.run_plan(unit.plan(), causes=[msg.headers() or []])
            finally:
                staged = self.views.cache.staged()
            staged = _unplaced(result, staged)
            t2 = time.monotonic()
            progress = unit_progress(unit, result)
            records, plain = self._outputs(unit, result, progress)
            self._publisher.publish_all(records, consumer=self._consumer, offsets=offsets, plain=plain)
        except (FencedError, FatalProcessorError):
            raise
        except (StreamprovError, KafkaException) as exc:
            self._failed(msg, f"unit {unit.unit_id[:20]}: {exc}")
            return False
        finally:
            self.busy = False
        with self.views.lock:
            self.views.cache.commit(staged)
            if result.dead:  # for the later parts of its plan (`Executor.run_plan`)
                self.views.cache.mark_dead(d.task.task_id for d in result.dead)
        st = self.stats
        st.units += 1
        st.transactions += 1
        unchanged = sum(r.unchanged for r in result.recomputed)
        st.tasks_recomputed += len(result.recomputed) - unchanged
        st.tasks_unchanged += unchanged
        st.tasks_skipped += len(result.skipped)
        st.dead_letters += len(result.dead)
        st.published += len(records)
        self._backoff = 0.0
        log.info(
            "unit %s/%d of plan %s done: %d tasks, %d published, %d dead "
            "(views %.2f s, run %.2f s, commit %.2f s)",
            unit.index + 1,
            unit.count,
            unit.plan_id[:12],
            len(unit.tasks),
            len(records),
            len(result.dead),
            t1 - t0,
            t2 - t1,
            time.monotonic() - t2,
        )
        if self.on_done is not None:
            self.on_done(unit, progress)
        return True

    def _dead_letter(self, msg: Message, exc: Exception, offsets: list[TopicPartition]) -> bool:
        s = self.settings
        at = where(msg)
        headers = dead_letter_headers(
            message_headers(msg),
            DeadLetterReason.DESERIALIZATION_ERROR,
            exc,
            source_of(at.topic, at.partition, at.offset),
        )
        key, value, headers = fit(msg.key(), msg.value() or b"", headers)
        record = PlainRecord(s.dead_letter_topic, key, value or b"", tuple(headers))
        try:
            self._publisher.publish_all([], consumer=self._consumer, offsets=offsets, plain=[record])
        except (FencedError, FatalProcessorError):
            raise
        except (StreamprovError, KafkaException) as err:
            self._failed(msg, f"dead-lettering {source_of(at.topic, at.partition, at.offset)}: {err}")
            return False
        log.warning("tasks record %s dead-lettered: %s", source_of(at.topic, at.partition, at.offset), exc)
        self.stats.malformed += 1
        self.stats.transactions += 1
        self._backoff = 0.0
        return True

    def _failed(self, msg: Message, why: str) -> None:
        """The transaction did not commit: rewind to the unit, back off (exponentially) and retry."""
        s = self.settings
        self.stats.aborted += 1
        self._backoff = min(s.max_backoff_s, max(s.backoff_s, self._backoff * 2))
        log.warning("worker %s: %s; again in %.1f s", s.member, why, self._backoff)
        at = where(msg)
        try:
            seek_retrying(self._consumer, at.topic, at.partition, at.offset, 5.0)
        except KafkaException as exc:  # no longer ours: its next owner starts from the committed offset
            log.info("worker %s: rewind %s/%d: %s", s.member, at.topic, at.partition, exc)


def _unplaced(result: PlanResult, staged: Staged) -> Staged:
    """Dead-letter the changed results whose task names no output topic (the manager has not indexed
    the record the output replaces: its topic is not among the configured outputs, or was not read
    yet): published, they went to a topic named `.priority`. Their corrections are not committed to
    the cache. Returns the staged corrections that remain."""
    unplaced = [r for r in result.changed if not r.task.topic]
    if not unplaced:
        return staged
    for r in unplaced:
        log.error(
            "task %s: no output topic is known for %s: dead-lettered", r.task.task_id[:12], r.task.data_id
        )
        result.recomputed.remove(r)
        result.dead.append(
            DeadLetter(
                r.task,
                f"no output topic is known for {r.task.data_id!r}: the record it replaces was not read "
                "from the configured output topics (add its topic to the outputs, then replay this task)",
                r.attempts,
                r.trace,
            )
        )
    nodes = {r.node for r in unplaced}
    return [e for e in staged if e[1] not in nodes]
