"""`streamprov changes run`: the change detector as a service.

The `ChangeDetector` (this package) does the work; the service gives it what a long-running process
needs, the way the Validator has it (`streamprov.agents.lifecycle`):

* start: the changes and ledger topics must exist (else a configuration error); the ledger index
  (`<state_dir>/ledger-index`) is caught up with the ledger topic before the first batch, beating
  the liveness heartbeat (`/readyz` says "the ledger index is catching up" meanwhile); with a
  function registry, `check_functions` runs at start and every `function_check_interval_s`;
* the loop: one detector batch per turn (consume, detect, emit, store, commit), a progress line in
  the log every `progress_interval_s`;
* a batch that fails (the ledger cannot be read, a change event not delivered) is never skipped:
  it is tried again after a backoff (stop-aware, doubling up to 30 s), and the detector's next
  `step()` first goes back to the offsets its local state ends at (`ChangeDetector.rewind`). A
  rewind that fails fails that step, and counts as a failure: nothing is consumed past a failed
  batch. After `max_consecutive_failures` in a row the service stops with an error (the
  orchestrator restarts it). A fatal Kafka error stops it at once;
* what is wrong with one source record, and the same every time it is read, never fails the batch
  (that would block its partition for good): a malformed header is skipped (`skipped`); a `SOURCE`
  entry too large for a ledger record (a DataID of hundreds of kB) is left out (`unrecorded`: the
  change is still reported); a change event over the changes topic's `max.message.bytes` (read at
  start) carries fewer impact outputs, and one that cannot fit at all is left out (`unreported`).
  Each is logged with the record's coordinates and the reason;
* SIGTERM/SIGINT (`stop()`): the current batch is finished and committed, then `run()` returns.

The service never writes the ledger topic (a ledger has one writer): with a `requests_topic`
(`changes.record_sources`) it sends its `SOURCE` entries to the shared sequencer
(`KafkaLedgerClient`); without one it only reports. Impacts come from the applications the pipeline
recorded, which is all a change event needs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaException

from streamprov.agents.health import HttpEndpoints
from streamprov.agents.kafka_io import KAFKA_LOG, kafka_error, record_limit_below
from streamprov.agents.lifecycle import ServiceState, beating, close_probes, serve_probes, stall_limit
from streamprov.changes.detector import ChangeDetector, ChangeDetectorError, DetectorStats
from streamprov.changes.event import DEFAULT_MAX_OUTPUTS
from streamprov.ledger.config import checkpoint_verifier
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader, list_topics_within
from streamprov.ledger.requests import KafkaLedgerClient
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.registry import FunctionRegistry

if TYPE_CHECKING:
    from streamprov.config.models import StreamprovConfig

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
_CONSUMER_ONLY = frozenset({"session.timeout.ms", "heartbeat.interval.ms", "group.instance.id"})


class ChangeServiceConfigError(ChangeDetectorError):
    """The service's configuration cannot work (missing topics, bad values, an index of another ledger)."""


class FatalChangeServiceError(ChangeDetectorError):
    """librdkafka reported a fatal error: the client can do nothing more; restart the service."""


@dataclass(frozen=True)
class ChangeServiceSettings:
    """Everything `ChangeService` needs; `from_config` takes the topics from `streamprov.yaml`."""

    kafka: Mapping[str, Any]
    """librdkafka settings shared by every client (bootstrap.servers, security)."""
    sources: tuple[str, ...]
    changes_topic: str
    ledger_topic: str
    state_dir: Path
    group_id: str = "streamprov-changes"
    ledger_id: str | None = None
    """The ledger's id (default: the ledger topic's name, as `streamprov ledger` assumes)."""
    http_host: str = "0.0.0.0"  # noqa: S104 - a service in a pod is probed from outside it
    http_port: int | None = None
    """/healthz and /readyz; None: no HTTP server, 0: any free port."""
    batch_size: int = 500
    poll_timeout_s: float = 0.5
    operation_timeout_s: float = 30.0
    max_outputs: int = DEFAULT_MAX_OUTPUTS
    progress_interval_s: float = 30.0
    function_check_interval_s: float = 300.0
    retry_backoff_s: float = 1.0
    max_consecutive_failures: int = 10
    consumer_config: Mapping[str, Any] = field(default_factory=dict)
    """Extra settings of the source consumer and the event producer (e.g. session timeouts)."""
    requests_topic: str | None = None
    """Send a SOURCE ledger entry per new source version to the ledger sequencer's requests topic
    (`streams.ledger_requests`); None: record nothing (the ledger has one writer: the sequencer)."""
    checkpoint_verifier: CheckpointVerifier | None = None
    """Verifies the ledger's signed checkpoints as the index reads them (`ledger.checkpoint_key`); a
    bad signature fails the batch (None: the hash chain is checked, signatures are not)."""

    def __post_init__(self) -> None:
        problems = []
        if not self.sources or not all(self.sources):
            problems.append("no source topics to watch (list them under sources:)")
        if not self.changes_topic or not self.ledger_topic:
            problems.append("the changes and ledger topics must be named (streams.changes, streams.ledger)")
        overlap = set(self.sources) & {self.changes_topic, self.ledger_topic}
        if overlap:
            problems.append(f"topic(s) {sorted(overlap)} are both a source and the changes/ledger topic")
        if self.batch_size < 1 or self.poll_timeout_s <= 0 or self.operation_timeout_s <= 0:
            problems.append("batch_size, poll_timeout_s and operation_timeout_s must be positive")
        if self.progress_interval_s <= 0 or self.function_check_interval_s <= 0 or self.retry_backoff_s < 0:
            problems.append("progress and function-check intervals must be positive, the backoff >= 0")
        if self.max_outputs < 0 or self.max_consecutive_failures < 1:
            problems.append("max_outputs must be >= 0 and max_consecutive_failures >= 1")
        if problems:
            raise ChangeServiceConfigError("; ".join(problems))

    @classmethod
    def from_config(cls, config: StreamprovConfig, **overrides: Any) -> ChangeServiceSettings:
        """Sources, `streams.*`, `ledger.id`, `changes:` and the Kafka settings from `streamprov.yaml`;
        `overrides` that are not None win (command-line options)."""
        c = config.changes
        values: dict[str, Any] = {
            "kafka": config.kafka.librdkafka(),
            "sources": tuple(config.sources),
            "changes_topic": config.streams.changes,
            "ledger_topic": config.streams.ledger,
            "ledger_id": config.ledger_id(),
            "state_dir": c.state_dir,
            "group_id": c.group_id,
            "http_port": c.http_port,
            "batch_size": c.batch_size,
            "max_outputs": c.max_outputs,
            "function_check_interval_s": c.function_check_interval.total_seconds(),
            "progress_interval_s": c.progress_interval.total_seconds(),
            "requests_topic": config.streams.ledger_requests if c.record_sources else None,
            "checkpoint_verifier": checkpoint_verifier(config),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class ChangeService:
    """The detector's service loop. Use as a context manager; `run()` until `stop()`."""

    def __init__(self, settings: ChangeServiceSettings, *, registry: FunctionRegistry | None = None) -> None:
        self.settings = s = settings
        self.registry = registry
        self.state = ServiceState(stall_limit(s.operation_timeout_s))
        """Stop flag, heartbeat and readiness (`streamprov.agents.lifecycle`), read by the probes."""
        try:
            s.state_dir.mkdir(parents=True, exist_ok=True)
            self.index = LedgerIndex(
                s.state_dir / "ledger-index", s.ledger_id or s.ledger_topic, verifier=s.checkpoint_verifier
            )
        except LedgerError as exc:
            raise ChangeServiceConfigError(f"the ledger index: {exc}") from exc
        except Exception as exc:  # rocksdict raises plain Exceptions (a held lock), mkdir an OSError
            raise ChangeDetectorError(f"cannot open the ledger index under {s.state_dir}: {exc}") from exc
        self.reader = KafkaLedgerReader(dict(s.kafka), s.ledger_topic, idle_timeout_s=s.operation_timeout_s)
        self.ledger_client = (
            None
            if s.requests_topic is None
            else KafkaLedgerClient(dict(s.kafka), s.requests_topic, s.ledger_id or s.ledger_topic)
        )
        try:
            self.detector = ChangeDetector(
                {**s.kafka, **s.consumer_config},
                group_id=s.group_id,
                source_topics=s.sources,
                changes_topic=s.changes_topic,
                index=self.index,
                ledger=self.reader,
                writer=self.ledger_client,
                state_dir=s.state_dir / "sources",
                max_outputs=s.max_outputs,
                batch_size=s.batch_size,
                poll_timeout_s=s.poll_timeout_s,
                operation_timeout_s=s.operation_timeout_s,
            )
        except ChangeDetectorError:
            self.index.close()
            raise
        self.detector.heartbeat = self.state.beat
        self._http: list[HttpEndpoints] = []
        self._failures = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def http_ports(self) -> list[int]:
        return [h.port for h in self._http]

    def stop(self) -> None:
        """Return from `run()` after the current batch; safe from signal handlers and other threads."""
        self.state.stop()

    def close(self) -> None:
        """Leave the group and release everything; uncommitted source records are seen again next time."""
        if self.state.closed:
            return
        self.state.closed = True
        self.detector.close()
        if self.ledger_client is not None:
            try:
                self.ledger_client.close(self.settings.operation_timeout_s)
            except LedgerError as exc:  # the detector flushes before each commit: a replay resends
                log.warning("ledger requests not all stored: %s", exc)
        self.index.close()
        close_probes(self._http)

    def __enter__(self) -> ChangeService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Serve the probes, wait for the brokers, check the topics, catch the ledger index up.
        Stop-aware: it returns early once `stop()` is called (nothing is consumed then); the wait for
        the brokers asks in attempts of at most a second for at most `operation_timeout_s`, then
        raises `ChangeDetectorError` naming them."""
        state, s = self.state, self.settings
        if state.started:
            return
        if state.closed:
            raise ChangeDetectorError("the change service is closed")
        state.started = True
        state.beat()
        self._http = serve_probes(state, s.http_host, s.http_port)
        topics = self._await_brokers()
        if topics is None:  # stopped while the brokers did not answer
            return
        self._check_topics(topics)
        self._fit_changes_topic()
        if state.stopping:
            return
        state.set_not_ready("the ledger index is catching up")
        try:
            applied = self.index.apply(beating(self.reader.read(self.index.next_offset), state.beat))
        except LedgerError as exc:
            raise ChangeDetectorError(
                f"cannot catch the ledger index up with {s.ledger_topic}: {exc}"
            ) from exc
        log.info("ledger index: %d record(s) read, %d entries", applied, self.index.size)
        if state.stopping:
            return
        if self.registry is not None:
            self._check_functions()
        state.set_ready(f"watching {', '.join(s.sources)}")
        log.info(
            "watching %s (group %s) -> change events on %s; impacts from ledger %s",
            ", ".join(s.sources),
            s.group_id,
            s.changes_topic,
            s.ledger_topic,
        )

    def _await_brokers(self) -> dict[str, Any] | None:
        """Every topic of the cluster once the brokers answer (`list_topics_within`: attempts of at
        most a second, pausing on the stop flag, for at most `operation_timeout_s`); None when a stop
        is requested first: against brokers that do not answer, the later steps would each block in
        librdkafka calls that do not look at it (10 s each, about 30 s in all).
        `ChangeDetectorError` naming the brokers when none answers."""
        s = self.settings
        admin = {k: v for k, v in s.kafka.items() if k not in _CONSUMER_ONLY}
        admin.setdefault("logger", KAFKA_LOG)
        try:
            topics: dict[str, Any] | None = list_topics_within(
                admin, s.operation_timeout_s, pause=self.state.pause
            )
        except LedgerError as exc:  # its text names the brokers and what to check
            raise ChangeDetectorError(f"change detector start-up: {exc}") from exc
        return topics

    def _check_topics(self, topics: dict[str, Any]) -> None:
        """`topics`: every topic of the cluster (`_await_brokers`)."""
        s = self.settings
        missing = [t for t in (s.changes_topic, s.ledger_topic) if t not in topics]
        absent = [t for t in s.sources if t not in topics]
        if missing:
            raise ChangeServiceConfigError(
                f"topic(s) {', '.join(missing)} do not exist: create the changes topic and the ledger "
                "topic (streams.changes, streams.ledger in streamprov.yaml) before starting the detector"
            )
        if absent:
            log.warning("source topic(s) %s do not exist yet: watched once they appear", ", ".join(absent))

    def _fit_changes_topic(self) -> None:
        """Lower the detector's change event limit to the changes topic's `max.message.bytes` when that
        is below the producer's: the broker would refuse a larger event every time its batch is tried
        (checked once, at start)."""
        s, detector = self.settings, self.detector
        lower = record_limit_below(
            {k: v for k, v in s.kafka.items() if k not in _CONSUMER_ONLY},
            s.changes_topic,
            detector.max_event_bytes,
            timeout_s=min(10.0, s.operation_timeout_s),
        )
        if lower is not None:
            detector.max_event_bytes = lower
            log.info(
                "changes topic %s takes records of at most %d bytes less framing (max.message.bytes): "
                "larger change events carry fewer impact outputs",
                s.changes_topic,
                lower,
            )

    # -- the loop --------------------------------------------------------------------------------------
    def run(self, *, idle_timeout_s: float | None = None) -> DetectorStats:
        """Watch until stopped (or idle for `idle_timeout_s`); every finished batch is committed."""
        self.start()
        s, state = self.settings, self.state
        now = time.monotonic()
        next_progress = now + s.progress_interval_s
        next_functions = now + s.function_check_interval_s
        last_activity = now
        try:
            while not state.stopping:
                state.beat()
                now = time.monotonic()
                if idle_timeout_s is not None and now - last_activity >= idle_timeout_s:
                    log.info("idle for %.1f s: stopping", idle_timeout_s)
                    break
                if now >= next_progress:
                    next_progress = now + s.progress_interval_s
                    self._log_progress()
                if self.registry is not None and now >= next_functions:
                    next_functions = now + s.function_check_interval_s
                    self._guarded(self._check_functions)
                if self._guarded(self.detector.step):
                    last_activity = time.monotonic()
        finally:
            state.clear_stop()
            state.set_not_ready("stopped")
        self._log_progress()
        return self.detector.stats

    def _guarded(self, work: Any) -> int:
        """Run one unit of work; a failure backs off and counts (see the module docs). No batch is read
        past a failed one: the detector's `step()` rewinds to its stored offsets first (and a rewind
        that fails is a failure of that step)."""
        try:
            done = int(work() or 0)
        except (ChangeDetectorError, LedgerError) as exc:
            self._failed(exc)
            return 0
        except KafkaException as exc:  # e.g. a change event the producer refuses
            err = kafka_error(exc)
            self._failed(ChangeDetectorError(f"Kafka: {err.str()}", err))
            return 0
        self._failures = 0
        return done

    def _failed(self, exc: ChangeDetectorError | LedgerError) -> None:
        err = getattr(exc, "kafka_error", None)
        if err is not None and err.fatal():
            raise FatalChangeServiceError(f"Kafka client: {err.str()}", err) from exc
        self._failures += 1
        s = self.settings
        if self._failures >= s.max_consecutive_failures:
            raise ChangeDetectorError(f"{self._failures} batches in a row failed (last: {exc})") from exc
        delay = min(MAX_BACKOFF_S, s.retry_backoff_s * 2 ** (self._failures - 1))
        log.warning("batch failed (%s): trying it again in %.1f s (%d in a row)", exc, delay, self._failures)
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and self.state.beat():  # stop-aware, still alive
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def _check_functions(self) -> int:
        assert self.registry is not None
        events = self.detector.check_functions(self.registry)
        for event in events:
            assert event.function is not None
            log.info(
                "function change %s: %s -> %s, %d outputs affected",
                event.function.function_id,
                event.function.previous_version,
                event.function.current_version,
                event.impact.total,
            )
        return 0  # not source records: no effect on the idle timeout

    def _log_progress(self) -> None:
        stats = self.detector.stats.as_dict()
        log.info("progress: %s, ledger index %d entries", json.dumps(stats, sort_keys=True), self.index.size)
