"""The Recompute Manager service: alerts and change events in, corrected records out, exactly once.

Two stages, each its own consumer group, each committing its input offsets inside the transaction
that publishes its output:

1. Planning (group `group_id`, over the alerts and changes topics, read_committed). Per batch: bring
   the ledger index and the output coordinates up to date, then traverse the ledger ONCE for the
   batch's change events (`ChangeBatch`: each event's own plan size, its own plan and the plan of any
   of them together come from it), and per cause ask the topic's policy with its own plan's size
   (`TopicPolicy`; a change event is judged by its source topic's settings; an alert, and a change
   event of a batch that could not be traversed together, is planned alone: `plan_for_alert` /
   `plan_for_change`). A rate-limited cause is not decided: its partition is held back at it (not
   committed, rewound and paused until the bucket allows it) while the rest of the batch is decided
   and published, and it is decided again when the partition resumes (or, stopped first, after the
   restart). An alert that runs is its own plan; the change
   events of the batch that run (of any source topic) run as ONE plan: the batch's plan when all of
   them run, else one planned for those that do (a reduce reached by several of them is one task
   reading all their corrections, not one per event; its cause is a `changes` tree of the events'
   decisions, its units carry the first event's trace context; a single event keeps its own plan and
   ids; the merged plan falls back to per-event plans if it cannot be made or has a task too large to
   publish). A change event that does not run (refused, waiting for approval) is reported with its
   own plan. A plan that runs is cut into independent units (`units.encoded_units`) and published in
   ONE transaction per batch: each unit as one record on the tasks topic (keyed by its sink DataID),
   a `planned` progress record per plan, and the consumed offsets. Refusals are reported per event
   on the progress topic with their reason; a `needs_approval` plan also leaves its units there
   for `streamprov recompute approve`.
2. Execution (group `<group_id>-workers`, over the tasks topic): `workers` threads per process, and
   every replica adds its own (`worker.UnitWorker`): one unit per transaction with its progress
   record and its tasks-topic offset.

A crash anywhere replays from the last commit: plan, unit and task ids are deterministic (a replayed
batch may be cut differently, so the change events planned together, and that plan's id, may differ;
nothing of the uncommitted plan was published), results
are cached, superseded versions are written only once committed (`views`), so the committed output
is the same as without the crash. SIGTERM/SIGINT (`stop()`) end both stages after the current
batch / unit.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from recompute_manager.executor import Executor, RetryPolicy
from recompute_manager.outputs import where
from recompute_manager.planner import (
    ChangeBatch,
    PlanError,
    RecomputePlan,
    RecomputeTask,
    changes_cause,
    plan_for_alert,
    plan_for_change,
    plan_for_changes,
    plan_from_applications,
)
from recompute_manager.policy import (
    Action,
    Cause,
    Decision,
    TopicPolicy,
)
from recompute_manager.priority import PlainRecord, PriorityPublisher
from recompute_manager.progress import KIND_PENDING, KIND_PROGRESS, RECORD_HEADER, Progress, pending_key
from recompute_manager.summary import with_inverse
from recompute_manager.tracing import TraceHeaders, cause_headers
from recompute_manager.units import RecomputeUnit, encoded_units
from recompute_manager.views import LockedLedger, StateError, Views
from recompute_manager.worker import UnitWorker, WorkerSettings, instance_id
from streamprov.agents.dead_letter import DeadLetterReason, dead_letter_headers, fit, source_of
from streamprov.agents.kafka_io import KAFKA_LOG, kafka_error
from streamprov.changes.event import ChangeEvent
from streamprov.config.errors import ConfigError, ConfigProblem
from streamprov.config.models import (
    RecomputeSettings,
    StreamprovConfig,
    TelemetrySettings,
    TopicSettings,
)
from streamprov.errors import FunctionNotFoundError, StreamprovError
from streamprov.header import now_ms
from streamprov.inspect import message_headers
from streamprov.ledger.config import checkpoint_verifier
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.kafka import list_topics_within
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.registry import FunctionRegistry
from streamprov.signing import KeyRing, Signer
from streamprov.telemetry.setup import Telemetry, build_telemetry
from validator.alerts import Alert
from validator.health import HttpEndpoints, probe_route

__all__ = [
    "ManagerError",
    "ManagerSettings",
    "ManagerStats",
    "ManagerStoppedError",
    "Progress",
    "RecomputeManager",
    "StateDirError",
    "default_replica",
]

log = logging.getLogger(__name__)

MIN_HOLD_S = 0.05
"""The shortest a partition is held back at a rate-limited cause."""
DEFAULT_MAX_UNIT_BYTES = 900_000
"""Below librdkafka's default `message.max.bytes` (1,000,000) and the broker's default record limit."""


class ManagerError(StreamprovError):
    """A stage of the manager cannot go on (a worker was fenced by a newer instance of itself, or its
    producer failed for good)."""


class ManagerStoppedError(ManagerError):
    """A stop was requested while the manager was starting (its `stop` event, see `RecomputeManager`):
    nothing ran and everything it had opened is closed. A stop request, not a failure (a CLI exits 0)."""


class StateDirError(ConfigError, StateError):
    """`recompute_manager.state_dir` cannot be made or written: a configuration problem (the CLI exits
    2), naming the directory and what to do; also a `StateError` (the state dir cannot be opened)."""

    def __init__(self, state_dir: Path, why: str) -> None:
        super().__init__(
            [
                ConfigProblem(
                    "recompute_manager.state_dir",
                    f"the state directory {str(state_dir)!r} cannot be used: {why}",
                    "set recompute_manager.state_dir (STREAMPROV__RECOMPUTE_MANAGER__STATE_DIR) to a "
                    "writable directory, or one that can be created, of its own for each replica",
                )
            ]
        )
        self.state_dir = state_dir


def _make_state_dir(state_dir: Path) -> None:
    """Create the state dir (and its parents); `StateDirError` when it cannot be made or written."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileNotFoundError (/proc/x), NotADirectoryError (a file/x), PermissionError
        raise StateDirError(state_dir, exc.strerror or str(exc)) from exc
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise StateDirError(state_dir, "it is not writable by this process")


def default_replica() -> str:
    """This process's stable name among the replicas: STREAMPROV_REPLICA_ID, POD_NAME, HOSTNAME, else
    the host name (a StatefulSet pod keeps its name across restarts, which is what fencing needs)."""
    for var in ("STREAMPROV_REPLICA_ID", "POD_NAME", "HOSTNAME"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return socket.gethostname() or "replica-0"


@dataclass(frozen=True)
class ManagerSettings:
    kafka: Mapping[str, Any]
    group_id: str
    alerts_topic: str
    changes_topic: str
    tasks_topic: str
    progress_topic: str
    dead_letter_topic: str
    ledger_topic: str
    sources: tuple[str, ...]
    outputs: tuple[str, ...]
    state_dir: Path
    topic_settings: Callable[[str], TopicSettings] = lambda _t: TopicSettings()
    max_retries: int = 5
    workers: int = 1
    """Worker threads in this process (0: plan only); more replicas add more."""
    replica_id: str = field(default_factory=default_replica)
    """Stable and unique per replica: derives the workers' group.instance.id and transactional.id."""
    max_unit_bytes: int = DEFAULT_MAX_UNIT_BYTES
    """A component larger than this is cut into parts that fit (`encoded_units`); a single task larger
    than it is not published, and its plan is reported `too_large`."""
    batch_size: int = 100
    poll_timeout_s: float = 0.5
    http_host: str = "127.0.0.1"
    http_port: int | None = None
    ledger_idle_s: float = 1.0
    ledger_id: str | None = None
    """The ledger's id (default: the ledger topic's name, as `streamprov ledger` assumes)."""
    consumer_config: Mapping[str, Any] = field(default_factory=dict)
    """Extra settings of the manager's consumers (planner and workers; e.g. session timeouts)."""
    signer_for: Callable[[str], Signer | None] = lambda _t: None
    """The signer of an output topic's corrected records (`topics.<t>.signing.key`), None: unsigned."""
    ledger_requests_topic: str | None = None
    """Record every recompute in the ledger through the sequencer's requests topic (None: not)."""
    checkpoint_verifier: CheckpointVerifier | None = None
    """Verifies the ledger's signed checkpoints as the index reads them (`ledger.checkpoint_key`); a
    bad signature stops the indexing (None: the hash chain is checked, signatures are not)."""
    start_timeout_s: float = 30.0
    """How long the start-up waits for the brokers to answer (stop-aware) before `ManagerError`."""
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    """`telemetry:`: with tracing on, a span per recompute task continuing the superseded record's
    trace, linked to its cause (the alert or change event's context travels on the unit record)."""

    @classmethod
    def from_config(cls, config: StreamprovConfig, **overrides: Any) -> ManagerSettings:
        s, m = config.streams, config.recompute_manager
        ring = KeyRing(config.signing)
        values: dict[str, Any] = {
            "kafka": config.kafka.librdkafka(),
            "group_id": m.group_id,
            "alerts_topic": s.alerts,
            "changes_topic": s.changes,
            "tasks_topic": s.recompute_tasks,
            "progress_topic": s.recompute_progress,
            "dead_letter_topic": s.dead_letters,
            "ledger_topic": s.ledger,
            "ledger_id": config.ledger_id(),
            "checkpoint_verifier": checkpoint_verifier(config),
            "ledger_requests_topic": s.ledger_requests if m.record_in_ledger else None,
            "telemetry": config.telemetry,
            "sources": tuple(config.sources),
            "outputs": tuple(config.topics),
            "state_dir": m.state_dir,
            "topic_settings": config.topic,
            "max_retries": m.max_retries,
            "workers": m.workers,
            "http_port": m.http_port,
            "signer_for": lambda topic: ring.signer_for(config.topic(topic)),
        }
        values.update(overrides)
        return cls(**values)

    def priority_topic(self, topic: str) -> str:
        return self.topic_settings(topic).priority_topic_name(topic)

    @property
    def workers_group(self) -> str:
        return f"{self.group_id}-workers"


@dataclass
class ManagerStats:
    causes: int = 0
    ledger_plans: int = 0
    """Plans made from the ledger index (each a traversal; the planner's main cost): one per batch of
    change events, one per alert, plus one for each event or subset that cannot use the batch's."""
    plans_run: int = 0
    """Plans published to the workers (as units)."""
    units_planned: int = 0
    units_done: int = 0
    """Units this process's workers committed (of any replica's plans)."""
    tasks_recomputed: int = 0
    tasks_unchanged: int = 0
    tasks_skipped: int = 0
    dead_letters: int = 0
    published: int = 0
    transactions: int = 0
    """Committed by the planner and this process's workers."""
    aborted: int = 0
    malformed: int = 0
    deferred: int = 0
    """Times a rate-limited cause was held back (not decided, not committed; decided again later)."""
    decisions: dict[str, int] = field(default_factory=dict)


class RecomputeManager:
    """Use as a context manager; `run()` until `stop()`."""

    def __init__(
        self,
        settings: ManagerSettings,
        registry: FunctionRegistry,
        *,
        telemetry: Telemetry | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        """`telemetry` (tests: an in-memory exporter) replaces the one built from `settings.telemetry`;
        building it raises `TelemetryError` when an exporter cannot be made.

        `stop`: the event `stop()` sets (default: a new one). A caller that installs its signal
        handlers before constructing the manager passes one and sets it from them: the start-up
        (waiting up to `start_timeout_s` for the brokers to answer, then each producer's
        `init_transactions`) looks at it between its steps and at least every second while the
        brokers do not answer, and raises `ManagerStoppedError` once it is set (nothing was started, all
        is closed); `run()` of a manager whose event is set returns at once."""
        self.settings = s = settings
        if s.workers < 0:
            raise ManagerError(f"workers must be >= 0, not {s.workers}")
        _make_state_dir(s.state_dir)
        self._stop = stop if stop is not None else threading.Event()
        self.telemetry = telemetry or build_telemetry(s.telemetry, component="recompute-manager")
        self._stats = ManagerStats()
        self._heartbeat = time.monotonic()
        self._ready = False
        self._closed = False
        self._policies: dict[str, TopicPolicy] = {}
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._last_unit = time.monotonic()
        self._held: dict[tuple[str, int], float] = {}
        """Partitions held back at a rate-limited cause -> when to resume them (monotonic)."""
        self.workers: list[UnitWorker] = []
        self._signers: dict[str, Signer | None] = {}
        self._threads: list[threading.Thread] = []
        self._http: HttpEndpoints | None = None
        self.registry = registry
        kafka = dict(s.kafka)
        kafka.setdefault("logger", KAFKA_LOG)  # librdkafka's own log lines, repeats held back
        try:
            self._await_brokers(kafka)
            # Every producer's init_transactions (here and in the workers) runs before the first read
            # of a view in run(): it aborts what a killed predecessor left open, which read_committed
            # reads of the priority topics would otherwise wait for.
            self._publisher = PriorityPublisher(kafka, f"{s.group_id}.{instance_id(s.replica_id, 'planner')}")
            self._starting()
            self._open(kafka, registry)
            self._starting()
        except BaseException:
            self._close(stop=False)  # the caller's event is theirs: a failed start-up is no stop request
            raise

    def _starting(self) -> None:
        """Between the steps of the start-up: `ManagerStoppedError` once a stop was requested."""
        if self._stop.is_set():
            raise ManagerStoppedError("stopped during start-up, before the manager ran")

    def _await_brokers(self, kafka: dict[str, Any]) -> None:
        """Wait (stop-aware, in attempts of at most a second) until the brokers answer a metadata
        request, at most `start_timeout_s`: the producers' `init_transactions` would otherwise block
        that long without looking at the stop request. `ManagerError` naming the brokers when none
        answers; `ManagerStoppedError` when stopped first."""
        self._starting()
        try:
            topics = list_topics_within(
                kafka, self.settings.start_timeout_s, pause=lambda s: not self._stop.wait(s)
            )
        except LedgerError as exc:  # its text names the brokers and what to check
            raise ManagerError(f"recompute manager start-up: {exc}") from exc
        if topics is None:
            self._starting()

    def _open(self, kafka: dict[str, Any], registry: FunctionRegistry) -> None:
        s = self.settings
        for topic in s.outputs:  # a key that cannot sign fails the start, not every unit
            self._signer(topic)
        self.views = Views(
            kafka,
            s.state_dir,
            ledger_id=s.ledger_id or s.ledger_topic,
            ledger_topic=s.ledger_topic,
            ledger_idle_s=s.ledger_idle_s,
            sources=s.sources,
            outputs=s.outputs,
            priority_topics=[s.priority_topic(t) for t in s.outputs],
            verifier=s.checkpoint_verifier,
            dead_letters=s.dead_letter_topic,
            summarise=with_inverse(registry),
        )
        tracing = self.telemetry.recompute_tracing(self.views.outputs.trace_headers)
        for i in range(s.workers):
            self._starting()  # each worker's producer runs init_transactions
            ws = WorkerSettings(
                kafka,
                s.workers_group,
                instance_id(s.replica_id, f"worker-{i}"),
                s.tasks_topic,
                s.progress_topic,
                s.dead_letter_topic,
                s.priority_topic,
                s.consumer_config,
                poll_timeout_s=s.poll_timeout_s,
                signer_for=self._signer,
                ledger_requests_topic=s.ledger_requests_topic,
                ledger_id=s.ledger_id or s.ledger_topic,
            )
            executor = Executor(  # one per worker: units run in parallel, outside the views lock
                registry,
                self.views.sources,
                cache=self.views.cache,
                retry=RetryPolicy(max_retries=s.max_retries),
                headers=self.views.outputs.headers,
                tracing=tracing,
                ledger=LockedLedger(self.views),
            )
            self.workers.append(UnitWorker(ws, self.views, executor, on_done=self._unit_done))
        consumer = {**kafka, **s.consumer_config, "group.id": s.group_id, "enable.auto.commit": False}
        consumer.update(
            {
                "group.instance.id": instance_id(s.replica_id, "planner"),
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
            }
        )
        self._consumer = Consumer(consumer)

    # -- lifecycle ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Return from `run()` after the current batch and units; safe from signal handlers."""
        self._stop.set()

    def _beat(self) -> None:
        """The planning loop is turning (also from inside a long step, e.g. a ledger catch-up)."""
        self._heartbeat = time.monotonic()

    def alive(self) -> tuple[bool, str]:
        now = time.monotonic()
        idle = now - self._heartbeat
        if not self._closed and idle > 120:
            return False, f"the planning loop has not turned for {idle:.0f} s"
        for w in self.workers:
            if w.error is not None:
                return False, f"worker {w.settings.member} stopped: {w.error}"
            if not self._closed and not w.busy and now - w.heartbeat > 120:
                return False, f"worker {w.settings.member} has not turned for {now - w.heartbeat:.0f} s"
        return True, "alive"

    def ready(self) -> tuple[bool, str]:
        return (True, "consuming") if self._ready else (False, "starting")

    @property
    def http_port(self) -> int | None:
        return None if self._http is None else self._http.port

    @property
    def stats(self) -> ManagerStats:
        """The planner's counters plus every worker's (a snapshot)."""
        p = self._stats
        out = ManagerStats(**{f.name: getattr(p, f.name) for f in fields(ManagerStats)})
        out.decisions = dict(p.decisions)
        for w in self.workers:
            ws = w.stats
            out.units_done += ws.units
            out.tasks_recomputed += ws.tasks_recomputed
            out.tasks_unchanged += ws.tasks_unchanged
            out.tasks_skipped += ws.tasks_skipped
            out.dead_letters += ws.dead_letters
            out.published += ws.published
            out.transactions += ws.transactions
            out.aborted += ws.aborted
            out.malformed += ws.malformed
        return out

    def close(self) -> None:
        """Stop (`stop()`) and release everything."""
        self._close(stop=True)

    def _close(self, *, stop: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if stop:
            self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        closers: list[Callable[[], None]] = [w.close for w in self.workers]
        if hasattr(self, "_consumer"):
            closers.append(self._consumer.close)
        if hasattr(self, "_publisher"):
            closers.append(self._publisher.close)
        for closer in closers:
            try:
                closer()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing: %s", exc)
        if hasattr(self, "views"):
            self.views.close()
        if self._http is not None:
            self._http.close()
        self.telemetry.shutdown()

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

    def _signer(self, topic: str) -> Signer | None:
        if topic not in self._signers:
            self._signers[topic] = self.settings.signer_for(topic)
        return self._signers[topic]

    def _unit_done(self, unit: RecomputeUnit, _progress: Progress) -> None:
        with self._pending_lock:
            self._pending.discard(unit.unit_id)
        self._last_unit = time.monotonic()

    @property
    def pending_units(self) -> int:
        """Units this process planned that its own workers have not committed yet."""
        with self._pending_lock:
            return len(self._pending)

    # -- the loop -----------------------------------------------------------------------------------
    def run(self, *, max_causes: int | None = None, idle_timeout_s: float | None = None) -> ManagerStats:
        """Plan and execute until `stop()`; or, for tests and batch use, until `max_causes` causes were
        planned and the units this process planned were run by its workers, or until nothing was
        planned or run for `idle_timeout_s`. Raises `ManagerError` when a worker failed for good."""
        s = self.settings
        if s.http_port is not None and self._http is None:
            routes = {"/healthz": probe_route(self.alive), "/readyz": probe_route(self.ready)}
            self._http = HttpEndpoints(s.http_host, s.http_port, routes).start()
        self._consumer.subscribe([s.alerts_topic, s.changes_topic])
        workers_stop = threading.Event()
        self._threads = [
            threading.Thread(target=w.run, args=(workers_stop,), name=f"recompute-worker-{i}", daemon=True)
            for i, w in enumerate(self.workers)
        ]
        for t in self._threads:
            t.start()
        self._ready = True
        log.info(
            "recompute manager consuming %s, %s (group %s); %d worker(s) on %s (replica %s)",
            s.alerts_topic,
            s.changes_topic,
            s.group_id,
            len(self.workers),
            s.tasks_topic,
            s.replica_id,
        )
        last = time.monotonic()
        start = self._stats.causes
        try:
            while not self._stop.is_set():
                self._beat()
                failed = next((w for w in self.workers if w.error is not None), None)
                if failed is not None:
                    raise ManagerError(f"worker {failed.settings.member} stopped: {failed.error}")
                if (
                    max_causes is not None
                    and self._stats.causes - start >= max_causes
                    and not self.pending_units
                ):
                    break
                last = max(last, self._last_unit)
                if self._held:  # a cause is held back by a rate limit: not idle
                    last = time.monotonic()
                    self._resume_held()
                if idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                    break
                if max_causes is not None and self._stats.causes - start >= max_causes:
                    self._stop.wait(0.05)  # only waiting for the workers now
                    continue
                try:
                    msgs = self._consumer.consume(s.batch_size, s.poll_timeout_s)
                except KafkaException as exc:
                    err = kafka_error(exc)
                    if err.fatal():
                        raise ManagerError(f"planner: fatal consumer error: {err.str()}") from exc
                    log.warning("consume: %s", err.str())
                    continue
                good = [m for m in msgs if not _skip(m)]
                if good:
                    last = time.monotonic()
                    self._batch(good)
        finally:
            self._ready = False
            workers_stop.set()
            for t in self._threads:
                t.join(timeout=120)
            self._threads = []
        return self.stats

    def _batch(self, msgs: list[Message]) -> None:
        s = self.settings
        if self._held:  # fetched before its partition was held back: consumed again after it resumes
            msgs = [m for m in msgs if (m.topic(), m.partition()) not in self._held]
            if not msgs:
                return
        with self.views.lock:
            self.views.for_planning(beat=self._beat)
            checked = self.views.outputs.take_checked()
        self._report_checked(checked)
        plain: list[PlainRecord] = []
        planned: list[RecomputeUnit] = []
        decisions: list[str] = []
        offsets: dict[tuple[str, int], int] = {}
        held: dict[tuple[str, int], tuple[int, Decision]] = {}
        together: list[_Run] = []
        changes = self._changes(msgs)
        for k, msg in enumerate(msgs):
            at = where(msg)
            if (at.topic, at.partition) in held:  # behind a held cause: consumed again after it
                continue
            handled = self._cause(msg, at.topic == s.alerts_topic, changes, k)
            if isinstance(handled, _Held):  # rate-limited: neither decided nor committed
                held[(at.topic, at.partition)] = (at.offset, handled.decision)
                continue
            offsets[(at.topic, at.partition)] = at.offset + 1
            self._stats.causes += 1
            if isinstance(handled, PlainRecord):  # not a cause it can plan: kept, with the reason
                plain.append(handled)
                self._stats.malformed += 1
                continue
            plan, decision, event = handled
            trace = cause_headers(msg.headers())
            if event is not None and decision.runs and (plan is None or plan.tasks):
                together.append(_Run(event, plan, decision, trace, msg, _position(changes, k)))
                continue
            assert plan is not None  # `_cause` plans alone every cause that does not run with the batch
            records, units, state = self._planned(plan, decision, trace)
            plain += records
            planned += units
            decisions.append(state)
        if together:
            records, units, states = self._planned_together(together, changes)
            plain += records
            planned += units
            decisions += states
        if plain or offsets:
            self._publish(plain, planned, offsets)
        if held:
            self._hold(held)
        for state in decisions:
            self._stats.decisions[state] = self._stats.decisions.get(state, 0) + 1

    def _publish(
        self, plain: list[PlainRecord], planned: list[RecomputeUnit], offsets: Mapping[tuple[str, int], int]
    ) -> None:
        """One transaction: the batch's records and the offsets of the causes it decided."""
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        with self._pending_lock:  # before the commit: a worker may finish a unit right after it
            self._pending.update(u.unit_id for u in planned)
        try:
            self._publisher.publish_all([], consumer=self._consumer, offsets=tps, plain=plain)
        except BaseException:
            with self._pending_lock:
                self._pending.difference_update(u.unit_id for u in planned)
            raise
        with self.views.lock:  # its units run on what it was planned with (`Views.for_execution`)
            for plan_id in dict.fromkeys(u.plan_id for u in planned):
                self.views.mark_fresh(plan_id)
        self._stats.transactions += 1
        self._stats.units_planned += len(planned)
        self._stats.plans_run += len({u.plan_id for u in planned})

    def _hold(self, held: Mapping[tuple[str, int], tuple[int, Decision]]) -> None:
        """Hold back each partition at its rate-limited cause until the policy's `retry_after_s`:
        paused, and rewound to the cause (its offset was not committed), so that cause and what follows
        it there are consumed and decided again then; the other partitions go on meanwhile. Stopped
        first, nothing of them was committed: consumed again after the restart."""
        now = time.monotonic()
        for (topic, partition), (offset, decision) in held.items():
            self._consumer.pause([TopicPartition(topic, partition)])
            self._consumer.seek(TopicPartition(topic, partition, offset))
            self._held[(topic, partition)] = now + max(decision.retry_after_s, MIN_HOLD_S)
            self._stats.deferred += 1
            log.info(
                "%s/%d/%d held back: %s (%s): decided again in %.3g s",
                topic,
                partition,
                offset,
                decision.data_id,
                decision.reason,
                max(decision.retry_after_s, MIN_HOLD_S),
            )

    def _resume_held(self) -> None:
        """Resume the held partitions whose time has come (their causes are consumed again)."""
        now = time.monotonic()
        due = [tp for tp, until in self._held.items() if until <= now]
        for tp in due:
            del self._held[tp]
        if due:
            try:
                self._consumer.resume([TopicPartition(t, p) for t, p in due])
            except KafkaException as exc:  # revoked meanwhile: its new owner reads the committed offset
                log.info("resuming %s: %s", due, kafka_error(exc).str())

    def _report_checked(self, checked: Mapping[str, Mapping[int, int]]) -> None:
        """The output records the views read (per topic and wall-clock second written) to each topic's
        policy as messages checked: the denominator of its `acceptable_error_rate`."""
        mono, wall = time.monotonic(), time.time()
        for topic, per_second in checked.items():
            policy = self.policy(topic)
            for second, count in per_second.items():
                policy.messages_checked(count, mono, at_s=mono - max(0.0, wall - second))

    def _changes(self, msgs: list[Message]) -> _Changes | None:
        """The batch's change events (those that decode) from ONE traversal of the ledger
        (`ChangeBatch`): each event's own plan size for the policy, and the plan of the events that
        run, or of one event, without traversing again; None for fewer than two events or when they
        cannot be planned together (each event is then planned alone)."""
        changes_topic = self.settings.changes_topic
        events: list[ChangeEvent] = []
        at: dict[int, int] = {}
        for k, msg in enumerate(msgs):
            if msg.topic() != changes_topic:
                continue
            try:
                event = ChangeEvent.decode(msg.value() or b"")
            except (StreamprovError, ValueError):
                continue  # dead-lettered by `_cause`
            at[k] = len(events)
            events.append(event)
        if len(events) < 2:
            return None
        try:
            with self.views.lock:
                batch = ChangeBatch.of(self.views.index, events, supersedes=self.views.locations)
            self._stats.ledger_plans += 1
        except (StreamprovError, ValueError) as exc:
            log.warning("%d change events not planned together (%s): each is planned alone", len(events), exc)
            return None
        return _Changes(batch, at)

    def _cause(
        self, msg: Message, is_alert: bool, changes: _Changes | None = None, k: int = -1
    ) -> tuple[RecomputePlan | None, Decision, ChangeEvent | None] | PlainRecord | _Held:
        """The cause's own plan, the policy's decision on it (judged by that plan's size) and the
        change event (None: an alert); or, for an alert or change event that does not decode or cannot
        be planned, its dead-letter record (committed with the batch: never replayed, never lost); or,
        when the policy rate-limited it, `_Held` (not decided: `_batch` holds it back, uncommitted).
        A change event of `changes` (message `k` of the batch) that runs has no plan of its own
        (None): its size is its count in the batch, and it runs in a plan of the batch's events
        (`_planned_together`)."""
        raw = msg.value() or b""
        now = time.monotonic()
        event: ChangeEvent | None = None
        reason = DeadLetterReason.DESERIALIZATION_ERROR
        plan: RecomputePlan | None = None
        try:
            if is_alert:
                alert = Alert.decode(raw)
                reason = DeadLetterReason.PROCESSING_ERROR
                policy = self.policy(alert.topic)
                made: list[RecomputePlan] = []

                def size(alert: Alert = alert) -> int:  # the policy plans it once it may run
                    with self.views.lock:
                        made.append(plan_for_alert(self.views.index, alert))
                        self._stats.ledger_plans += 1
                    return len(made[-1])

                decision = policy.on_alert(alert, now, tasks=size)
                plan = made[0] if made else self._unplanned(alert, decision)
                tasks = len(plan)
            else:
                position = _position(changes, k)
                if changes is None or position is None:
                    event = ChangeEvent.decode(raw)
                else:  # decoded and traversed with the batch
                    event = changes.batch.events[position]
                reason = DeadLetterReason.PROCESSING_ERROR
                self._check_registered(event)
                if changes is None or position is None:
                    plan = self._plan_alone(event)
                    tasks = len(plan)
                else:
                    tasks = changes.batch.own_tasks()[position]
                topic = event.source.topic if event.source is not None else ""
                policy = self.policy(topic)
                decision = policy.on_change(event, now, tasks=tasks)
        except (StreamprovError, ValueError) as exc:
            return self._dead_letter(msg, "alert" if is_alert else "change event", reason, exc)
        if decision.action is Action.RATE_LIMITED:  # a delay, not a refusal: decided again later
            return _Held(decision)
        if plan is None and event is not None and not (decision.runs and tasks):
            try:  # refused, waiting for approval, nothing to do: reported with its own plan
                plan = self._own_plan(event, changes, _position(changes, k))
            except (StreamprovError, ValueError) as exc:
                return self._dead_letter(msg, "change event", DeadLetterReason.PROCESSING_ERROR, exc)
        return plan, decision, event

    def _unplanned(self, alert: Alert, decision: Decision) -> RecomputePlan:
        """The plan of no task that reports an alert refused before it was planned (a kind recompute
        cannot fix, recompute or its trigger disabled, the error rate acceptable): its id is over the
        alert id alone, its cause the decision's."""
        with self.views.lock:
            return plan_from_applications(
                self.views.index, [], cause_id=alert.alert_id, cause=decision.cause, topic=alert.topic
            )

    def _check_registered(self, event: ChangeEvent) -> None:
        """A function change to a version this manager cannot run is refused before it is planned:
        every task of its plan would fail the same way (dead-lettered, with what to do)."""
        f = event.function
        if f is None:
            return
        try:
            self.registry.get(f.function_id, f.current_version)
        except FunctionNotFoundError as exc:
            raise PlanError(
                f"function change {f.function_id} {f.previous_version} -> {f.current_version}: {exc}; "
                "register that version with this Recompute Manager (--functions), then replay this change "
                "event from the dead-letter topic"
            ) from exc

    def _own_plan(self, event: ChangeEvent, changes: _Changes | None, position: int | None) -> RecomputePlan:
        """An event's own plan: from its batch's traversal when it has one (no ledger query)."""
        if changes is None or position is None:
            return self._plan_alone(event)
        with self.views.lock:
            return changes.batch.plan([position])

    def _plan_alone(self, event: ChangeEvent) -> RecomputePlan:
        with self.views.lock:
            plan = plan_for_change(self.views.index, event, supersedes=self.views.locations)
        self._stats.ledger_plans += 1
        return plan

    def _dead_letter(self, msg: Message, what: str, reason: DeadLetterReason, exc: Exception) -> PlainRecord:
        at = where(msg)
        source = source_of(at.topic, at.partition, at.offset)
        log.warning("%s %s dead-lettered (%s): %s", what, source, reason, exc)
        key, value, headers = fit(
            msg.key(), msg.value() or b"", dead_letter_headers(message_headers(msg), reason, exc, source)
        )
        return PlainRecord(self.settings.dead_letter_topic, key, value or b"", tuple(headers))

    def _planned_together(
        self, runs: list[_Run], changes: _Changes | None
    ) -> tuple[list[PlainRecord], list[RecomputeUnit], list[str]]:
        """The change events of one batch that the policy let run, as ONE plan (a node several of them
        reach, e.g. a reduce over several changed sources, is one task reading all their
        corrections): planned from the batch's traversal (`ChangeBatch.plan` of their positions: the
        batch's plan itself when all of them run), else with `plan_for_changes`. One event is its
        own plan (same ids as alone). Its cause names every event's decision; its units carry the
        first event's trace context that has one (a unit record links its task spans to one cause).
        Returns the records, the units that run and one state per event planned (an event that
        cannot be planned alone is dead-lettered). Falls back to each event's own plan when the
        merged plan cannot be made or has a unit too large to publish."""
        if len(runs) == 1:
            return self._planned_alone(runs, changes)
        subjects = list(dict.fromkeys(r.decision.data_id for r in runs))
        topics = {r.decision.topic for r in runs}
        cause = changes_cause([r.decision.cause for r in runs])
        positions = [r.position for r in runs]
        plan: RecomputePlan | None = None
        cause_of: Callable[[Sequence[RecomputeTask]], Cause] | None = None
        try:
            with self.views.lock:
                if changes is not None and all(p is not None for p in positions):
                    plan = changes.batch.plan([p for p in positions if p is not None], cause=cause)
                    cause_of = changes.batch.causes_of_tasks(
                        [(r.position, r.decision.cause) for r in runs if r.position is not None]
                    )
                else:
                    plan = plan_for_changes(
                        self.views.index,
                        [r.event for r in runs],
                        supersedes=self.views.locations,
                        cause=cause,
                    )
                    self._stats.ledger_plans += 1
        except (StreamprovError, ValueError) as exc:  # each one planned alone: they still can
            log.warning("%d change events not planned together (%s): each runs its own plan", len(runs), exc)
        if plan is not None:
            more = f", ... ({len(subjects)} in all)" if len(subjects) > 3 else ""
            decision = Decision(
                Action.RECOMPUTE,
                topics.pop() if len(topics) == 1 else "",
                ", ".join(subjects[:3]) + more,
                f"{len(runs)} change events planned together: recompute {len(plan.tasks)} task(s)",
                cause,
            )
            trace = next((r.trace for r in runs if r.trace), ())
            records, units, state = self._planned(plan, decision, trace, cause_of)
            if state != "too_large":
                return records, units, [state] * len(runs)
            log.warning(
                "plan %s of %d change events is too large: each runs its own plan",
                plan.plan_id[:12],
                len(runs),
            )
        return self._planned_alone(runs, changes)

    def _planned_alone(
        self, runs: list[_Run], changes: _Changes | None
    ) -> tuple[list[PlainRecord], list[RecomputeUnit], list[str]]:
        """Each run with its own plan (from the batch's traversal when it stood in for it)."""
        out: tuple[list[PlainRecord], list[RecomputeUnit], list[str]] = ([], [], [])
        for r in runs:
            plan = r.plan
            if plan is None:
                try:
                    plan = self._own_plan(r.event, changes, r.position)
                except (StreamprovError, ValueError) as exc:  # the policy has charged it already
                    out[0].append(
                        self._dead_letter(r.msg, "change event", DeadLetterReason.PROCESSING_ERROR, exc)
                    )
                    self._stats.malformed += 1
                    continue
            records, units, state = self._planned(plan, r.decision, r.trace)
            out[0].extend(records)
            out[1].extend(units)
            out[2].append(state)
        return out

    def _planned(
        self,
        plan: RecomputePlan,
        decision: Decision,
        trace: TraceHeaders = (),
        cause_of: Callable[[Sequence[RecomputeTask]], Cause] | None = None,
    ) -> tuple[list[PlainRecord], list[RecomputeUnit], str]:
        """The records a decided plan publishes: units to the tasks topic (it runs), or to the progress
        topic (it waits for approval), and its progress record; the units that will run; its state.
        `cause_of`: each unit's cause from its tasks (`ChangeBatch.causes_of_tasks`), else the
        decision's."""
        s = self.settings
        waits = decision.action is Action.NEEDS_APPROVAL
        encoded: tuple[tuple[RecomputeUnit, bytes], ...] = ()
        if plan.tasks and (decision.runs or waits):
            encoded = encoded_units(
                plan,
                subject=decision.data_id,
                cause=decision.cause,
                max_bytes=s.max_unit_bytes,
                cause_of=cause_of,
            )
        too_big = [(u, len(raw)) for u, raw in encoded if len(raw) > s.max_unit_bytes]
        state = "done" if decision.runs and not plan.tasks else decision.action.value
        reason = decision.reason
        if decision.runs and plan.tasks:
            state = "planned"
        if too_big:
            u, size = too_big[0]
            state = "too_large"
            reason = (
                f"unit {u.index} has {len(u.tasks)} task(s), {size} bytes encoded, more than "
                f"max_unit_bytes {s.max_unit_bytes} (raise it with the topics' max.message.bytes)"
            )
            encoded = ()
        records: list[PlainRecord] = []
        run: list[RecomputeUnit] = []
        for u, raw in encoded:
            if decision.runs:
                records.append(PlainRecord(s.tasks_topic, u.key, raw, tuple(trace)))
                run.append(u)
            else:
                key = pending_key(u.plan_id, u.index)
                records.append(PlainRecord(s.progress_topic, key, raw, ((RECORD_HEADER, KIND_PENDING),)))
        progress = Progress(
            plan.plan_id,
            plan.cause.kind,
            decision.data_id,
            state,
            reason,
            len(plan.tasks),
            0,
            0,
            0,
            0,
            0,
            now_ms(),
            -1,
            len(encoded),
        )
        records.append(
            PlainRecord(s.progress_topic, progress.key, progress.encode(), ((RECORD_HEADER, KIND_PROGRESS),))
        )
        if run:
            log.info("plan %s: %d tasks in %d unit(s)", plan.plan_id[:12], len(plan.tasks), len(run))
        else:
            log.info("plan %s not run: %s (%s)", plan.plan_id[:12], state, reason)
        return records, run, state


@dataclass(frozen=True, slots=True)
class _Run:
    """A change event the policy let run: its own plan (None: not made, the batch's traversal stands
    in for it), its trace headers, its record (to dead-letter it) and its position in the batch's
    `ChangeBatch` (None: not in one)."""

    event: ChangeEvent
    plan: RecomputePlan | None
    decision: Decision
    trace: TraceHeaders
    msg: Message
    position: int | None


@dataclass(frozen=True, slots=True)
class _Held:
    """A cause the policy rate-limited: not decided, its partition held back (`_hold`)."""

    decision: Decision


@dataclass(frozen=True)
class _Changes:
    """A batch's change events traversed in the ledger once, and which message is which event
    (message index -> position in `batch.events`)."""

    batch: ChangeBatch
    at: dict[int, int]


def _position(changes: _Changes | None, k: int) -> int | None:
    """Message `k`'s position among the batch's change events (None: not one of them)."""
    return None if changes is None else changes.at.get(k)


def _skip(msg: Message) -> bool:
    err = msg.error()
    if err is None:
        return False
    if err.fatal():  # e.g. FENCED_INSTANCE_ID: another live planner has this replica's id
        raise ManagerError(f"planner: fatal consumer error: {err.str()}")
    if err.code() != KafkaError._PARTITION_EOF:
        log.warning("consume: %s", err.str())
    return True
