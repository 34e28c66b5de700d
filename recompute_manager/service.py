"""The Recompute Manager service: alerts and change events in, corrected records out, exactly once.

Each turn of the loop consumes a batch from the alerts and changes topics (read_committed, one consumer
group), and for each cause:

1. brings its views up to date (ledger index, current source values, output coordinates and values:
   `recompute_manager.outputs`), only when the batch has something to plan;
2. plans (`plan_for_alert` / `plan_for_change`), asks the topic's policy (`TopicPolicy`, from
   `topics.<name>.recompute`; a change event is judged by its source topic's settings);
3. runs the plan (`Executor.run_plan`: cache, early cut-off, retries, dead letters);
4. publishes, in ONE transaction per batch: the changed records to their priority topics, dead letters,
   one progress record per plan (`Progress`: tasks done/total) and the consumed offsets. A crash
   before the commit replays the batch; plans and task ids are deterministic, so does the result.

Rate-limited decisions wait (stop-aware, bounded) and are decided again; over-budget,
needs-approval, duplicate, alert-only and disabled decisions are reported on the progress topic
with their reason and not run. SIGTERM/SIGINT (`stop()`) end the loop after the current batch.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from recompute_manager.cache import ResultCache
from recompute_manager.executor import Executor, PlanResult, RetryPolicy
from recompute_manager.outputs import OutputIndex, SourceIndex, where
from recompute_manager.planner import RecomputePlan, plan_for_alert, plan_for_change
from recompute_manager.policy import Action, Decision, TopicPolicy, trigger_of_alert, trigger_of_change
from recompute_manager.priority import PlainRecord, PriorityPublisher, PriorityRecord
from streamprov.agents.kafka_io import kafka_error
from streamprov.changes.event import ChangeEvent
from streamprov.config.models import RecomputeSettings, RecomputeTrigger, StreamprovConfig, TopicSettings
from streamprov.errors import StreamprovError
from streamprov.header import now_ms
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader
from streamprov.registry import FunctionRegistry
from validator.alerts import Alert
from validator.health import HttpEndpoints, probe_route

__all__ = ["ManagerSettings", "ManagerStats", "Progress", "RecomputeManager"]

log = logging.getLogger(__name__)

MAX_RATE_WAITS = 20
"""A rate-limited plan is decided again at most this many times in one batch."""


@dataclass(frozen=True, slots=True)
class Progress:
    """One plan's state, as published on the progress topic (JSON, key = plan id)."""

    plan_id: str
    cause: str
    subject: str
    state: str
    """`done`, `failed` (some task dead-lettered), or the policy's action when it did not run."""
    reason: str
    total: int
    done: int
    recomputed: int
    unchanged: int
    skipped: int
    dead: int
    at_ms: int

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Progress:
        return cls(**json.loads(raw))


@dataclass(frozen=True)
class ManagerSettings:
    kafka: Mapping[str, Any]
    group_id: str
    alerts_topic: str
    changes_topic: str
    progress_topic: str
    dead_letter_topic: str
    ledger_topic: str
    sources: tuple[str, ...]
    outputs: tuple[str, ...]
    state_dir: Path
    topic_settings: Callable[[str], TopicSettings] = lambda _t: TopicSettings()
    max_retries: int = 5
    batch_size: int = 100
    poll_timeout_s: float = 0.5
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    ledger_idle_s: float = 1.0
    ledger_id: str | None = None
    """The ledger's id (default: the ledger topic's name, as `streamprov ledger` assumes)."""
    consumer_config: Mapping[str, Any] = field(default_factory=dict)
    """Extra settings of the alerts/changes consumer only (e.g. session timeouts)."""

    @classmethod
    def from_config(cls, config: StreamprovConfig, **overrides: Any) -> ManagerSettings:
        s, m = config.streams, config.recompute_manager
        values: dict[str, Any] = {
            "kafka": config.kafka.librdkafka(),
            "group_id": m.group_id,
            "alerts_topic": s.alerts,
            "changes_topic": s.changes,
            "progress_topic": s.recompute_progress,
            "dead_letter_topic": s.dead_letters,
            "ledger_topic": s.ledger,
            "sources": tuple(config.sources),
            "outputs": tuple(config.topics),
            "state_dir": m.state_dir,
            "topic_settings": config.topic,
            "max_retries": m.max_retries,
            "http_port": m.http_port,
        }
        values.update(overrides)
        return cls(**values)


@dataclass
class ManagerStats:
    causes: int = 0
    plans_run: int = 0
    tasks_recomputed: int = 0
    tasks_unchanged: int = 0
    tasks_skipped: int = 0
    dead_letters: int = 0
    published: int = 0
    transactions: int = 0
    decisions: dict[str, int] = field(default_factory=dict)


class RecomputeManager:
    """Use as a context manager; `run()` until `stop()`."""

    def __init__(self, settings: ManagerSettings, registry: FunctionRegistry) -> None:
        self.settings = s = settings
        self.stats = ManagerStats()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        self._heartbeat = time.monotonic()
        self._ready = False
        self._closed = False
        self._policies: dict[str, TopicPolicy] = {}
        self.cache = ResultCache(s.state_dir / "cache")
        self.index = LedgerIndex(s.state_dir / "ledger-index", s.ledger_id or s.ledger_topic)
        kafka = dict(s.kafka)
        self.outputs = OutputIndex(kafka, s.outputs, cache=self.cache)
        self.sources = SourceIndex(kafka, s.sources)
        self.executor = Executor(
            registry,
            self.sources,
            cache=self.cache,
            retry=RetryPolicy(max_retries=s.max_retries),
            headers=self.outputs.headers,
        )
        consumer = {**kafka, **s.consumer_config, "group.id": s.group_id, "enable.auto.commit": False}
        consumer.update({"isolation.level": "read_committed", "auto.offset.reset": "earliest"})
        self._consumer = Consumer(consumer)
        self._publisher = PriorityPublisher(kafka, f"{s.group_id}-publisher")
        self._http: HttpEndpoints | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Return from `run()` after the current batch; safe from signal handlers."""
        self._stop.set()

    def alive(self) -> tuple[bool, str]:
        idle = time.monotonic() - self._heartbeat
        if not self._closed and idle > 120:
            return False, f"the loop has not turned for {idle:.0f} s"
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        return (True, "consuming") if self._ready else (False, "starting")

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.port

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for closer in (self._consumer.close, self._publisher.close, self.outputs.close, self.sources.close):
            try:
                closer()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing: %s", exc)
        self.index.close()
        self.cache.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> RecomputeManager:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def policy(self, topic: str) -> TopicPolicy:
        p = self._policies.get(topic)
        if p is None:
            settings: RecomputeSettings = self.settings.topic_settings(topic).recompute
            p = self._policies[topic] = TopicPolicy(topic, settings)
        return p

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, *, max_causes: int | None = None, idle_timeout_s: float | None = None) -> ManagerStats:
        s = self.settings
        if s.http_port is not None and self._http is None:
            routes = {"/healthz": probe_route(self.alive), "/readyz": probe_route(self.ready)}
            self._http = HttpEndpoints(s.http_host, s.http_port, routes).start()
        self._consumer.subscribe([s.alerts_topic, s.changes_topic])
        self._ready = True
        log.info("recompute manager consuming %s, %s (group %s)", s.alerts_topic, s.changes_topic, s.group_id)
        last = time.monotonic()
        start = self.stats.causes
        try:
            while not self._stop.is_set():
                self._heartbeat = time.monotonic()
                if max_causes is not None and self.stats.causes - start >= max_causes:
                    break
                if idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                    break
                try:
                    msgs = self._consumer.consume(s.batch_size, s.poll_timeout_s)
                except KafkaException as exc:
                    log.warning("consume: %s", kafka_error(exc).str())
                    continue
                good = [m for m in msgs if not _skip(m)]
                if good:
                    last = time.monotonic()
                    self._batch(good)
        finally:
            self._ready = False
        return self.stats

    def _batch(self, msgs: list[Message]) -> None:
        s = self.settings
        self._catch_up()
        records: list[tuple[str, PriorityRecord]] = []
        plain: list[PlainRecord] = []
        offsets: dict[tuple[str, int], int] = {}
        for msg in msgs:
            at = where(msg)
            offsets[(at.topic, at.partition)] = at.offset + 1
            self.stats.causes += 1
            handled = self._cause(msg, at.topic == s.alerts_topic)
            if handled is None:
                continue
            plan, decision, result = handled
            progress = _progress(plan, decision, result)
            plain.append(PlainRecord(s.progress_topic, plan.plan_id.encode(), progress.encode()))
            self.stats.decisions[progress.state] = self.stats.decisions.get(progress.state, 0) + 1
            if result is None:
                continue
            for r in result.changed:
                topic = s.topic_settings(r.task.topic).priority_topic_name(r.task.topic)
                records.append((topic, PriorityRecord.of(r)))
            for d in result.dead:
                plain.append(
                    PlainRecord(s.dead_letter_topic, d.task.key, d.task.encode(), tuple(d.headers()))
                )
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        self._publisher.publish_all(records, consumer=self._consumer, offsets=tps, plain=plain)
        self.stats.published += len(records)
        self.stats.transactions += 1

    def _catch_up(self) -> None:
        s = self.settings
        self.index.catch_up(KafkaLedgerReader(dict(s.kafka), s.ledger_topic, idle_timeout_s=s.ledger_idle_s))
        self.sources.catch_up()
        self.outputs.catch_up()

    def _cause(
        self, msg: Message, is_alert: bool
    ) -> tuple[RecomputePlan, Decision, PlanResult | None] | None:
        raw = msg.value() or b""
        now = time.monotonic()
        trigger: RecomputeTrigger | None
        try:
            if is_alert:
                alert = Alert.decode(raw)
                plan = plan_for_alert(self.index, alert)
                policy = self.policy(alert.topic)
                decision = policy.on_alert(alert, now, tasks=len(plan))
                trigger = trigger_of_alert(alert)
            else:
                event = ChangeEvent.decode(raw)
                plan = plan_for_change(self.index, event, supersedes=self.outputs.locations)
                topic = event.source.topic if event.source is not None else ""
                policy = self.policy(topic)
                decision = policy.on_change(event, now, tasks=len(plan))
                trigger = trigger_of_change(event)
        except (StreamprovError, ValueError) as exc:
            log.warning("skipping %s: %s", "alert" if is_alert else "change event", exc)
            return None
        waits = 0
        while (
            decision.action is Action.RATE_LIMITED
            and trigger is not None
            and waits < MAX_RATE_WAITS
            and not self._stop.is_set()
        ):
            self._stop.wait(min(decision.retry_after_s, 5.0))
            waits += 1
            # the trigger passed already: decide again without counting the alert a second time
            decision = policy.decide(
                trigger, decision.data_id, decision.cause, time.monotonic(), tasks=len(plan)
            )
        if not decision.runs or not plan.tasks:
            log.info("plan %s not run: %s", plan.plan_id[:12], decision.reason)
            return plan, decision, None
        result = self.executor.run_plan(plan)
        self.stats.plans_run += 1
        self.stats.tasks_recomputed += len(result.recomputed) - sum(r.unchanged for r in result.recomputed)
        self.stats.tasks_unchanged += sum(r.unchanged for r in result.recomputed)
        self.stats.tasks_skipped += len(result.skipped)
        self.stats.dead_letters += len(result.dead)
        return plan, decision, result


def _skip(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume: %s", err.str())
    return True


def _progress(plan: RecomputePlan, decision: Decision, result: PlanResult | None) -> Progress:
    total = len(plan.tasks)
    if result is None:
        state = decision.action.value if not decision.runs else "done"
        return Progress(
            plan.plan_id,
            plan.cause.kind,
            decision.data_id,
            state,
            decision.reason,
            total,
            0,
            0,
            0,
            0,
            0,
            now_ms(),
        )
    unchanged = sum(r.unchanged for r in result.recomputed)
    return Progress(
        plan.plan_id,
        plan.cause.kind,
        decision.data_id,
        "failed" if result.dead else "done",
        decision.reason,
        total,
        len(result.recomputed) + len(result.skipped) + len(result.dead),
        len(result.recomputed) - unchanged,
        unchanged,
        len(result.skipped),
        len(result.dead),
        now_ms(),
    )
