"""The Validator service: consume output topics, check every record, publish alerts and dead letters.

Delivery is at least once, and no alert is ever lost:

* consumed records are checked (`validator.checks`), their alerts and dead letters produced at once
  (idempotent producer, acks=all); offsets are only committed after `flush()` has confirmed every
  record produced so far, with a synchronous commit of the consumer's positions. A crash (kill -9)
  between the two re-checks the uncommitted records after the restart and produces their alerts
  again, with the same deterministic alert ids, so consumers de-duplicate;
* commits happen at most every `commit_interval_s` (a commit is a broker round trip; once per batch
  would cost more than checking the batch), always on shutdown;
* a failed delivery (after librdkafka's own retries) rewinds every partition to its last committed
  offset and checks the records again; `max_consecutive_failures` bounds that;
* a broker outage just stalls: `consume()` returns nothing, the producer keeps its queue, commits
  are skipped while acknowledgements are missing, and librdkafka reconnects by itself.

Rebalances are handled outside the librdkafka callbacks (`streamprov.agents.kafka_io.RebalanceEvents`):
work of revoked partitions that was not committed yet is redone by the new owner (duplicates, never
losses). SIGTERM/SIGINT (`stop()`) end the loop after the current batch; `run()` then ships and commits
what is done, and `close()` releases the clients.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from streamprov.agents.health import HttpEndpoints
from streamprov.agents.kafka_io import (
    KAFKA_LOG,
    RebalanceEvents,
    TopicPartitionKey,
    kafka_error,
    produce_blocking,
    seek_retrying,
)
from streamprov.agents.lifecycle import ServiceState, close_probes, serve_probes, stall_limit
from streamprov.agents.serde import Serde
from streamprov.header import now_ms
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader, list_topics_within
from streamprov.registry import FunctionRegistry
from streamprov.telemetry.propagation import trace_headers
from validator.alerts import Alert
from validator.checks import BatchResult, Checker
from validator.errors import FatalValidatorError, ValidatorConfigError, ValidatorError
from validator.metrics import ValidatorMetrics
from validator.rederive import Rederiver
from validator.reduce_drift import LedgerSources
from validator.settings import ServiceSettings
from validator.source_view import SourceView

if TYPE_CHECKING:
    from streamprov.telemetry.tracing import StepTracing

log = logging.getLogger(__name__)

_CONSUMER_ONLY = (
    "group.id",
    "group.instance.id",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "auto.offset.reset",
    "isolation.level",
    "max.poll.interval.ms",
    "enable.auto.commit",
    "enable.partition.eof",
)


METADATA_REFRESH_MS = 10_000
"""How soon a configured output topic created while the Validator runs is subscribed (librdkafka's
`topic.metadata.refresh.interval.ms`; one metadata request per interval)."""


@dataclass
class ValidatorStats:
    """What the service did (cumulative); alerts and dead letters count once handed to the producer."""

    checked: int = 0
    alerts: int = 0
    dead_letters: int = 0
    batches: int = 0
    commits: int = 0
    rewinds: int = 0
    alerts_by_kind: Counter[str] = field(default_factory=Counter)
    first_batch_done: float | None = None
    """`time.perf_counter()` when the first batch of records was checked (throughput measurement)."""
    first_batch_size: int = 0
    last_batch_done: float | None = None
    """`time.perf_counter()` when the latest batch was checked."""


class Validator:
    """The Validator's consume-check-produce loop. Use as a context manager; `run()` until `stop()`."""

    def __init__(
        self,
        settings: ServiceSettings,
        *,
        registry: FunctionRegistry | None = None,
        serde: Serde | None = None,
        metrics: ValidatorMetrics | None = None,
        max_consecutive_failures: int = 10,
        tracing: StepTracing | None = None,
    ) -> None:
        self.tracing = tracing
        """A span per validated record of a sampled trace, joining it (`streamprov.telemetry`)."""
        if settings.needs_registry and registry is None:
            raise ValidatorConfigError(
                f"re-derivation is enabled for {', '.join(settings.needs_registry)} but no function "
                "registry was given (--functions module:attribute)"
            )
        self.settings = settings
        self.metrics = metrics if metrics is not None else ValidatorMetrics()
        self.max_consecutive_failures = max_consecutive_failures
        self.stats = ValidatorStats()
        self.view = SourceView(
            settings.state_dir / "source-view",
            settings.kafka,
            settings.sources,
            cache_size=settings.source_cache_size,
            operation_timeout_s=settings.operation_timeout_s,
            refresh_interval_s=settings.source_refresh_s,
        )
        self.ledger = self._open_ledger()
        """Explains reduce outputs from the ledger, so their sources get the drift check too."""
        self.checker = Checker(
            settings.policy,
            self.view,
            dead_letter_topic=settings.dead_letter_topic,
            rederiver=Rederiver(registry, serde) if registry is not None else None,
            refresh=lambda: self.view.catch_up(settings.source_catch_up_s),
            topics=settings.topics,
            ledger=self.ledger,
        )
        try:
            self._consumer = Consumer(self._consumer_settings())
        except KafkaException as exc:
            self._close_state()
            raise ValidatorConfigError(f"bad consumer configuration: {exc}", kafka_error(exc)) from exc
        try:
            self._producer = Producer(self._producer_settings())
        except KafkaException as exc:
            self._consumer.close()
            self._close_state()
            raise ValidatorConfigError(f"bad producer configuration: {exc}", kafka_error(exc)) from exc
        self._rebalance = RebalanceEvents()
        self.state = ServiceState(
            stall_limit(settings.operation_timeout_s), not_ready="the source view is catching up"
        )
        """Stop flag, heartbeat and readiness (`streamprov.agents.lifecycle`), read by the probes."""
        self._fatal: KafkaError | None = None
        self._failed: list[KafkaError] = []
        self._assigned: set[TopicPartitionKey] = set()
        self._committed: dict[TopicPartitionKey, int] = {}
        self._dirty = False
        self._failures = 0
        self._last_commit = time.monotonic()
        self._http: list[HttpEndpoints] = []

    # -- client settings ---------------------------------------------------------------------------------
    def _consumer_settings(self) -> dict[str, Any]:
        s = self.settings
        settings: dict[str, Any] = {**s.kafka, **s.consumer_config}
        settings["group.id"] = s.group_id
        settings["enable.auto.commit"] = False
        settings["enable.auto.offset.store"] = False
        settings.setdefault("auto.offset.reset", "earliest")
        settings.setdefault("enable.partition.eof", False)
        settings.setdefault("isolation.level", "read_committed")
        # an output topic created after the start is found at the next metadata refresh: librdkafka's
        # default (5 min) left it unchecked that long
        settings.setdefault("topic.metadata.refresh.interval.ms", METADATA_REFRESH_MS)
        settings.setdefault("error_cb", self._on_error)
        settings.setdefault("logger", KAFKA_LOG)
        return settings

    def _producer_settings(self) -> dict[str, Any]:
        s = self.settings
        settings: dict[str, Any] = {**s.kafka, **s.producer_config}
        for key in _CONSUMER_ONLY:
            settings.pop(key, None)
        settings["enable.idempotence"] = True
        settings["acks"] = "all"
        settings.setdefault("linger.ms", 5)
        settings.setdefault("error_cb", self._on_error)
        settings.setdefault("logger", KAFKA_LOG)
        return settings

    def _on_error(self, err: KafkaError) -> None:
        # A librdkafka callback: record, act in the loop.
        if err.fatal():
            self._fatal = err
            log.error("fatal Kafka error: %s", err.str())
        else:
            KAFKA_LOG.warning("Kafka: %s", err.str())

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:  # a librdkafka callback: record, act after flush()
            self._failed.append(err)

    # -- state for the HTTP endpoints (read from their threads) ------------------------------------------
    def alive(self) -> tuple[bool, str]:
        """Liveness: the loop turned within the last few operation timeouts."""
        return self.state.alive()

    def ready(self) -> tuple[bool, str]:
        """Readiness: the source view and the ledger index have caught up, partitions are assigned."""
        return self.state.ready()

    @property
    def http_ports(self) -> list[int]:
        return [h.port for h in self._http]

    # -- lifecycle ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask `run()` to return after the current batch; safe from signal handlers and other threads."""
        self.state.stop()

    def close(self) -> None:
        """Leave the group and release everything; what was not committed is checked again next time."""
        if self.state.closed:
            return
        self.state.closed = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer: %s", exc)
        try:
            left = self._producer.flush(self.settings.operation_timeout_s)
            if left:
                log.warning("%d alert(s)/dead letter(s) undelivered at close: re-checked on restart", left)
        except (KafkaException, RuntimeError) as exc:
            log.warning("flushing the producer: %s", exc)
        self._close_state()
        close_probes(self._http)
        self.metrics.shutdown()

    def _open_ledger(self) -> LedgerSources | None:
        s = self.settings
        if not s.ledger_topic:
            return None
        try:
            index = LedgerIndex(
                s.state_dir / "ledger-index", s.ledger_id or s.ledger_topic, verifier=s.checkpoint_verifier
            )
        except LedgerError as exc:
            self.view.close()
            raise ValidatorConfigError(f"the ledger index: {exc}") from exc
        except Exception as exc:  # rocksdict raises plain Exceptions (a held lock, a corrupt dir)
            self.view.close()
            raise ValidatorError(f"cannot open the ledger index: {exc}") from exc
        reader = KafkaLedgerReader(dict(s.kafka), s.ledger_topic, idle_timeout_s=s.operation_timeout_s)
        return LedgerSources(index, reader, refresh_s=s.ledger_refresh_s)

    def _close_state(self) -> None:
        self.view.close()
        if self.ledger is not None:
            self.ledger.close()

    def __enter__(self) -> Validator:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Serve HTTP, wait for the brokers, check the topics exist, bring the source view up to date,
        join the group. Stop-aware: it returns early once `stop()` is called (nothing is consumed
        then); the wait for the brokers asks in attempts of at most a second for at most
        `operation_timeout_s`, then raises `ValidatorError` naming them."""
        state = self.state
        if state.started:
            return
        if state.closed:
            raise ValidatorError("the validator is closed")
        state.started = True
        state.beat()
        s = self.settings
        self._http = serve_probes(
            state, s.http_host, s.http_port, metrics_port=s.metrics_port, render_metrics=self.metrics.render
        )
        topics = self._await_brokers()
        if topics is None:  # stopped while the brokers did not answer
            return
        self._check_topics(topics)
        self.view.start()
        while not self.view.caught_up:  # stop-aware; /readyz says why it is not ready meanwhile
            if not state.beat():
                return
            self.view.poll(1000, 0.2)
        if self.ledger is not None:  # a long catch-up (a first start on a big ledger) keeps beating
            state.set_not_ready("the ledger index is catching up")
            self.ledger.catch_up(beat=state.beat)
        if state.stopping:
            return
        state.set_not_ready("no partitions assigned")
        r = self._rebalance
        self._consumer.subscribe(
            list(self.settings.topics), on_assign=r.on_assign, on_revoke=r.on_revoke, on_lost=r.on_lost
        )
        log.info(
            "validating %s (group %s) -> alerts %s, dead letters %s; sources %s",
            ",".join(self.settings.topics),
            self.settings.group_id,
            self.settings.alerts_topic,
            self.settings.dead_letter_topic,
            ",".join(self.settings.sources) or "none",
        )

    def _await_brokers(self) -> dict[str, Any] | None:
        """Every topic of the cluster once the brokers answer (`list_topics_within`: attempts of at
        most a second, pausing on the stop flag, for at most `operation_timeout_s`); None when a stop
        is requested first: against brokers that do not answer, the later steps would each block in
        librdkafka calls that do not look at it (5-10 s each, about 40 s in all). `ValidatorError`
        naming the brokers when none answers."""
        s = self.settings
        admin = {k: v for k, v in s.kafka.items() if k not in _CONSUMER_ONLY}
        admin.setdefault("logger", KAFKA_LOG)
        try:
            topics: dict[str, Any] | None = list_topics_within(
                admin, s.operation_timeout_s, pause=self.state.pause
            )
        except LedgerError as exc:  # its text names the brokers and what to check
            raise ValidatorError(f"validator start-up: {exc}") from exc
        return topics

    def _check_topics(self, topics: dict[str, Any]) -> None:
        """`topics`: every topic of the cluster (`_await_brokers`)."""
        s = self.settings
        missing = [t for t in (s.alerts_topic, s.dead_letter_topic) if t not in topics]
        absent = [t for t in s.topics if t not in topics]
        if missing:
            raise ValidatorConfigError(
                f"topic(s) {', '.join(missing)} do not exist: create the alerts and dead-letter topics "
                "(streams: in streamprov.yaml) before starting the Validator"
            )
        if absent:
            log.warning("output topic(s) %s do not exist yet: waiting for them", ", ".join(absent))

    def run(
        self,
        *,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
        stop_event: threading.Event | None = None,
    ) -> ValidatorStats:
        """Validate until stopped (or `max_messages` checked, or idle for `idle_timeout_s`).

        On return everything checked so far is shipped and committed (unless the broker cannot be
        reached within the operation timeout: then it is checked again after a restart).
        """
        self.start()
        try:
            self._loop(max_messages, idle_timeout_s, stop_event)
        except FatalValidatorError:
            self.close()
            raise
        finally:
            self.state.clear_stop()
        if not self.state.closed:
            self._ship(self.settings.operation_timeout_s)
        return self.stats

    # -- the loop ---------------------------------------------------------------------------------------
    def _loop(
        self, max_messages: int | None, idle_timeout_s: float | None, stop_event: threading.Event | None
    ) -> None:
        s = self.settings
        consumer_consume = self._consumer.consume
        started_with = self.stats.checked
        last_activity = time.monotonic()
        state = self.state
        while not state.stopping and not (stop_event is not None and stop_event.is_set()):
            state.beat()
            now = time.monotonic()
            if max_messages is not None and self.stats.checked - started_with >= max_messages:
                break
            if idle_timeout_s is not None and now - last_activity >= idle_timeout_s:
                log.info("idle for %.1f s: stopping", idle_timeout_s)
                break
            if self._fatal is not None:
                raise FatalValidatorError(f"Kafka client: {self._fatal.str()}", self._fatal)
            self.view.poll(1000, 0.0)
            try:
                messages = consumer_consume(s.batch_size, s.poll_timeout_s)
            except KafkaException as exc:
                err = kafka_error(exc)
                if err.fatal():
                    raise FatalValidatorError(f"consume: {err.str()}", err) from exc
                log.warning("consume: %s", err.str())
                messages = []
            if self._rebalance.pending:
                self._apply_rebalance()
            if messages:
                last_activity = time.monotonic()
                self._process(messages)
            self._producer.poll(0)
            if self._failed:
                self._rewind()
            elif self._dirty and time.monotonic() - self._last_commit >= s.commit_interval_s:
                self._ship(s.flush_timeout_s)

    def _process(self, messages: list[Any]) -> None:
        started = time.perf_counter()
        result = self.checker.check(messages, now_ms())
        if self.tracing is not None:
            self.tracing.on_validated(messages, result.alerts)
        for err in result.errors:
            if err.fatal():
                raise FatalValidatorError(f"consume: {err.str()}", err)
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer: %s", err.str())
        if result.alerts or result.dead_letters:
            self._send(result, messages)
        self._dirty = True
        stats = self.stats
        stats.batches += 1
        stats.checked += result.checked
        done = time.perf_counter()
        if stats.first_batch_done is None:
            stats.first_batch_done, stats.first_batch_size = done, result.checked
        stats.last_batch_done = done
        m = self.metrics
        m.messages_checked.add(result.checked)
        if result.drift_skipped:
            m.drift_skipped.add(result.drift_skipped)
        if result.reduce_checked:
            m.reduce_checked.add(result.reduce_checked)
        if result.rederived:
            m.rederived.add(result.rederived)
        m.latency.record(done - started)

    def _send(self, result: BatchResult, messages: Sequence[Message] = ()) -> None:
        s = self.settings
        timeout = s.operation_timeout_s
        traces = _alerted_traces(result.alerts, messages)
        alerts = [a.fitted() for a in result.alerts]  # an alert the broker refuses would stop us
        for alert in alerts:
            trace = traces.get((alert.topic, alert.partition, alert.offset))
            self._produce(s.alerts_topic, alert.encode(), alert.key, list(trace) if trace else None, timeout)
            self.stats.alerts_by_kind[alert.kind] += 1
            self.metrics.alerts.add(1, {"kind": str(alert.kind), "topic": alert.topic})
        for dead in result.dead_letters:
            self._produce(s.dead_letter_topic, dead.value, dead.key, dead.headers, timeout)
        self.stats.alerts += len(result.alerts)
        self.stats.dead_letters += len(result.dead_letters)
        if result.dead_letters:
            self.metrics.dead_letters.add(len(result.dead_letters))
        for alert in alerts:
            log.info(
                "alert %s %s at %s/%s/%s (DataID %r): %s",
                alert.kind,
                alert.alert_id[:12],
                alert.topic,
                alert.partition,
                alert.offset,
                alert.data_id,
                alert.evidence.reason,
            )

    def _produce(
        self,
        topic: str,
        value: bytes | None,
        key: bytes | None,
        headers: list[tuple[str, bytes | None]] | None,
        timeout: float,
    ) -> None:
        try:
            enqueued = produce_blocking(
                self._producer,
                topic,
                value,
                key,
                headers=headers,
                on_delivery=self._on_delivery,
                timeout_s=timeout,
            )
        except KafkaException as exc:
            err = kafka_error(exc)
            if err.fatal():
                raise FatalValidatorError(f"produce: {err.str()}", err) from exc
            self._failed.append(err)
            return
        if not enqueued:
            self._failed.append(KafkaError(KafkaError._QUEUE_FULL, "the producer queue stayed full"))

    # -- shipping: acknowledged, then committed ------------------------------------------------------
    def _ship(self, flush_timeout_s: float) -> bool:
        """Wait for every produced record's acknowledgement, then commit the consumer's positions."""
        remaining = self._producer.flush(flush_timeout_s)
        if self._failed:
            self._rewind()
            return False
        if remaining:
            log.info("%d record(s) not acknowledged yet: commit postponed", remaining)
            return False
        self._failures = 0
        committed = self._commit()
        self._update_lag()
        return committed

    def _commit(self) -> bool:
        consumer = self._consumer
        try:
            assignment = consumer.assignment()
            positions = consumer.position(assignment) if assignment else []
        except KafkaException as exc:
            log.warning("reading positions: %s", kafka_error(exc).str())
            return False
        offsets = [
            TopicPartition(tp.topic, tp.partition, tp.offset)
            for tp in positions
            if tp.offset >= 0 and self._committed.get((tp.topic, tp.partition)) != tp.offset
        ]
        self._last_commit = time.monotonic()
        if not offsets:
            self._dirty = False
            return True
        try:
            result = consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Typically a rebalance or a broker that is away: the records are checked again, never lost.
            log.warning("offset commit failed (%s): trying again later", kafka_error(exc).str())
            return False
        ok = True
        for tp in result or ():
            if tp.error is not None:
                ok = False
                log.warning("offset commit of %s/%s failed: %s", tp.topic, tp.partition, tp.error)
            else:
                self._committed[(tp.topic, tp.partition)] = tp.offset
        if ok:
            self._dirty = False
            self.stats.commits += 1
            self.metrics.commits.add(1)
        return ok

    def _rewind(self) -> None:
        """A delivery failed: check everything since the last commit again (duplicates, never losses)."""
        failed, self._failed = self._failed, []
        self._failures += 1
        self.stats.rewinds += 1
        for err in failed:
            if err.fatal():
                raise FatalValidatorError(f"delivery: {err.str()}", err)
        if self._failures > self.max_consecutive_failures:
            raise ValidatorError(
                f"alerts could not be delivered {self._failures} times in a row (last: {failed[0].str()})",
                failed[0],
            )
        log.warning(
            "%d alert(s)/dead letter(s) not delivered (first: %s): checking since the last commit again",
            len(failed),
            failed[0].str(),
        )
        self._producer.flush(self.settings.flush_timeout_s)  # let the rest of the batch settle
        self._failed.clear()  # records of this batch are produced again anyway
        for tp in sorted(self._assigned):
            offset = self._committed.get(tp)
            if offset is None:
                offset = self._committed_offset(tp)
            try:
                seek_retrying(self._consumer, tp[0], tp[1], offset, self.settings.operation_timeout_s)
            except KafkaException as exc:
                log.warning("cannot seek %s/%s back to %s: %s", tp[0], tp[1], offset, kafka_error(exc).str())
        self._dirty = False

    def _committed_offset(self, tp: TopicPartitionKey) -> int:
        try:
            (found,) = self._consumer.committed(
                [TopicPartition(tp[0], tp[1])], timeout=self.settings.operation_timeout_s
            )
        except (KafkaException, ValueError) as exc:
            log.warning("committed offset of %s/%s unknown (%s): from the beginning", tp[0], tp[1], exc)
            return OFFSET_BEGINNING
        return found.offset if found.offset >= 0 else OFFSET_BEGINNING

    def _apply_rebalance(self) -> None:
        for kind, tps in self._rebalance.drain():
            log.info("partitions %s: %s", "assigned" if kind == "assign" else "revoked", sorted(tps))
            for tp in tps:
                if kind == "assign":
                    self._assigned.add(tp)
                else:
                    self._assigned.discard(tp)
                    self._committed.pop(tp, None)
        if self._assigned:
            self.state.set_ready("assigned and caught up")
        else:
            self.state.set_not_ready("no partitions assigned")

    def _update_lag(self) -> None:
        consumer = self._consumer
        lag: dict[TopicPartitionKey, int] = {}
        for topic, partition in self._assigned:
            tp = TopicPartition(topic, partition)
            try:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                (pos,) = consumer.position([tp])
            except (KafkaException, ValueError):
                continue
            at = pos.offset if pos.offset >= 0 else self._committed.get((topic, partition), -1)
            if high >= 0 and at >= 0:
                lag[(topic, partition)] = max(0, high - at)
        self.metrics.set_lag(lag, self.view.lag())


def _alerted_traces(
    alerts: Sequence[Alert], messages: Sequence[Message]
) -> dict[tuple[str, int, int], tuple[tuple[str, bytes], ...]]:
    """The trace context of each alerted record, by coordinates: an alert carries it, so the
    recompute it causes links back to the record (looked up only when a batch has alerts)."""
    if not alerts or not messages:
        return {}
    wanted = {(a.topic, a.partition, a.offset) for a in alerts}
    found: dict[tuple[str, int, int], tuple[tuple[str, bytes], ...]] = {}
    for msg in messages:
        at = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        if at in wanted:
            trace = trace_headers(msg.headers())
            if trace:
                found[at] = trace
    return found
