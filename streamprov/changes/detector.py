"""Change detection: watch source topics and the function registry, emit change events with their impact.

A source topic is compacted and keyed by DataID; its latest record per DataID is the original data.
The detector keeps the last checksum it saw per (topic, DataID) in RocksDB. For every source record:

- first sighting of a DataID: a `SOURCE` ledger entry for the version (it entered the pipeline);
- same checksum as last seen: nothing (a re-send of the same content);
- another checksum: a `SOURCE` ledger entry for the new version and a `source_changed` event whose
  impact set is everything the ledger derived from the *previous* version (`LedgerIndex.downstream`),
  in dependency order; bounded: the first `max_outputs` outputs, the total count, a truncated flag;
- a tombstone of a known DataID: a `source_deleted` event with the impact of the last version.

`check_functions(registry)` compares each registered function (the version now registered for its id)
with the (version, code hash) pairs the ledger recorded applications of; every other pair is a
`function_changed` event whose impact is `LedgerIndex.affected_by_function`. Reported pairs are
remembered in RocksDB so a restart does not report them again.

Delivery is at least once, without losing a change: per batch, the events are produced and
delivered, the ledger flushed, and only then the checksums stored and the offsets committed. A crash
in between replays the batch; the events come again with the same `change_id` (consumers de-duplicate)
and the `SOURCE` entries with the same entry_id (the ledger drops them).

The impact is what the ledger holds when the change is seen: the index catches up with the ledger
topic first (and flushes the detector's own writer, which in-process pipelines may share).
Applications recorded later (a pipeline still catching up on the old version) are not in the event;
`Impact.ledger_size` says how far the ledger was read.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer
from rocksdict import Options, Rdict, WriteBatch

from streamprov.agents.kafka_io import kafka_error, seek_retrying
from streamprov.changes.event import (
    DEFAULT_MAX_OUTPUTS,
    ChangeEvent,
    ChangeKind,
    FunctionChange,
    Impact,
    SourceChange,
)
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import find_raw, now_ms, record_fields
from streamprov.ledger.hashing import entry_id_of
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.model import Application, Context, DataRef
from streamprov.ledger.store import LedgerSource
from streamprov.ledger.writer import LedgerAppender
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import source_data_id
from streamprov.telemetry.propagation import trace_headers

log = logging.getLogger(__name__)

DEFAULT_MAX_WALK = 1_000_000
"""Applications a single impact query may visit; past it the event says `complete=False`."""

_LP = struct.Struct(">I")
_SOURCE = b"S"
_REPORTED = b"F"
_ALGORITHMS = tuple(ChecksumAlgorithm)


class ChangeDetectorError(StreamprovError):
    """The detector cannot go on (Kafka, ledger or state failed); `kafka_error` keeps librdkafka's."""

    def __init__(self, message: str, kafka_error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


def _lp(b: bytes) -> bytes:
    return _LP.pack(len(b)) + b


class SourceVersions:
    """The last checksum seen per (topic, DataID), and the function changes already reported (RocksDB)."""

    def __init__(self, path: str | Path) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self._db = Rdict(str(path), opts)
        except Exception as exc:  # rocksdict raises plain Exceptions (a held lock, a corrupt dir)
            raise ChangeDetectorError(f"cannot open the detector state at {path}: {exc}") from exc

    @staticmethod
    def _key(topic: str, data_id: str) -> bytes:
        return _SOURCE + _lp(topic.encode("utf-8")) + data_id.encode("utf-8")

    def get(self, topic: str, data_id: str) -> Checksum | None:
        raw: bytes | None = self._db.get(self._key(topic, data_id))
        if raw is None:
            return None
        return Checksum(_ALGORITHMS[raw[0]], raw[1:])

    def write(self, changes: Mapping[tuple[str, str], Checksum | None]) -> None:
        """Store the latest checksum of each (topic, DataID) (None: deleted), atomically."""
        batch = WriteBatch(raw_mode=True)
        for (topic, data_id), checksum in changes.items():
            key = self._key(topic, data_id)
            if checksum is None:
                batch.delete(key)
            else:
                batch.put(key, bytes((checksum.algorithm,)) + checksum.value)
        self._db.write(batch)

    @staticmethod
    def _fkey(function_id: str, version: str, code_hash: bytes) -> bytes:
        return _REPORTED + _lp(function_id.encode()) + _lp(version.encode()) + _lp(code_hash)

    def reported(self, function_id: str, version: str, code_hash: bytes, current: tuple[str, bytes]) -> bool:
        raw: bytes | None = self._db.get(self._fkey(function_id, version, code_hash))
        return raw is not None and raw == _lp(current[0].encode()) + _lp(current[1])

    def mark_reported(self, change: FunctionChange) -> None:
        key = self._fkey(change.function_id, change.previous_version, change.previous_code_hash)
        self._db.put(key, _lp(change.current_version.encode()) + _lp(change.current_code_hash))

    def close(self) -> None:
        self._db.close()


@dataclass
class DetectorStats:
    records: int = 0
    first_seen: int = 0
    unchanged: int = 0
    changed: int = 0
    deleted: int = 0
    skipped: int = 0
    """Records whose header is malformed or does not match their value: logged, never a change."""
    function_changes: int = 0
    events: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Pending:
    kind: ChangeKind
    change: SourceChange
    trace: tuple[tuple[str, bytes], ...] = ()
    """The source record's trace context: the change event carries it, so the recompute it causes
    links back to it."""


class ChangeDetector:
    """Watches `source_topics` (consumer group `group_id`) and emits `ChangeEvent`s on `changes_topic`.

    `index` is the detector's own `LedgerIndex`, caught up from `ledger` (the ledger topic reader)
    before every impact query. `writer` (optional) records `SOURCE` entries; without it, the detector
    only reports. `config` holds librdkafka settings shared by its consumer and producer.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        *,
        group_id: str,
        source_topics: Sequence[str] | str,
        changes_topic: str,
        index: LedgerIndex,
        ledger: LedgerSource,
        state_dir: str | Path,
        writer: LedgerAppender | None = None,
        context: Context | None = None,
        device_id: str | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        max_outputs: int = DEFAULT_MAX_OUTPUTS,
        max_walk: int = DEFAULT_MAX_WALK,
        batch_size: int = 500,
        poll_timeout_s: float = 0.5,
        operation_timeout_s: float = 30.0,
    ) -> None:
        topics = [source_topics] if isinstance(source_topics, str) else list(source_topics)
        if not topics or not all(topics) or not changes_topic or not group_id:
            raise ChangeDetectorError("a change detector needs source topics, a changes topic and a group id")
        if max_outputs < 0 or max_walk < 1 or batch_size < 1:
            raise ChangeDetectorError("max_outputs must be >= 0, max_walk and batch_size >= 1")
        self.source_topics = topics
        self.changes_topic = changes_topic
        self.index = index
        self.ledger = ledger
        self.writer = writer
        self.context = context if context is not None else Context()
        self.device_id = device_id
        self.algorithm = algorithm
        self.max_outputs = max_outputs
        self.max_walk = max_walk
        self.batch_size = batch_size
        self.poll_timeout_s = poll_timeout_s
        self.operation_timeout_s = operation_timeout_s
        self.stats = DetectorStats()
        self.state = SourceVersions(state_dir)
        base = dict(config)
        base.setdefault("logger", log)
        consumer_settings = {
            **base,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
            "enable.partition.eof": False,
        }
        producer_settings = {
            k: v
            for k, v in base.items()
            if k not in ("session.timeout.ms", "heartbeat.interval.ms", "group.instance.id")
        }
        try:
            self._consumer = Consumer(consumer_settings)
        except KafkaException as exc:
            self.state.close()
            err = kafka_error(exc)
            raise ChangeDetectorError(f"bad consumer configuration: {err.str()}", err) from exc
        try:
            self._producer = Producer({**producer_settings, "enable.idempotence": True, "acks": "all"})
        except KafkaException as exc:
            self._consumer.close()
            self.state.close()
            err = kafka_error(exc)
            raise ChangeDetectorError(f"bad producer configuration: {err.str()}", err) from exc
        self._subscribed = False
        self._closed = False
        self._delivery_errors: list[KafkaError] = []

    # -- lifecycle -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave the group and close the state; the writer and the index belong to the caller."""
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("closing the consumer: %s", exc)
        self._producer.flush(self.operation_timeout_s)
        self.state.close()

    def __enter__(self) -> ChangeDetector:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def run(
        self,
        max_records: int | None = None,
        idle_timeout_s: float | None = None,
        stop_event: threading.Event | None = None,
    ) -> DetectorStats:
        """Watch until `max_records` source records were handled, nothing came for `idle_timeout_s`, or
        `stop_event` is set. Returns the cumulative stats; everything handled is committed."""
        start = self.stats.records
        last = time.monotonic()
        while stop_event is None or not stop_event.is_set():
            done = self.stats.records - start
            if max_records is not None and done >= max_records:
                break
            if idle_timeout_s is not None and time.monotonic() - last >= idle_timeout_s:
                break
            if self.step(None if max_records is None else max_records - done):
                last = time.monotonic()
        return self.stats

    def step(self, max_records: int | None = None) -> int:
        """One batch: consume (up to `batch_size`, or `max_records`), detect, emit, store, commit.

        Returns the records consumed (0 when nothing came within `poll_timeout_s`). Raises
        `ChangeDetectorError` (or a `LedgerError` from the index) when the batch could not be
        finished: nothing of it is committed, and `rewind()` makes the next step see it again.
        """
        if self._closed:
            raise ChangeDetectorError("the change detector is closed")
        if not self._subscribed:
            self._consumer.subscribe(self.source_topics)
            self._subscribed = True
        want = self.batch_size if max_records is None else max(1, min(self.batch_size, max_records))
        batch = self._consume(want)
        if batch:
            self.handle(batch)
            self._commit()
        return len(batch)

    def rewind(self) -> None:
        """Seek every assigned partition back to its committed offset (the beginning when none is), so
        a batch that failed is consumed again. Raises `ChangeDetectorError` when that fails."""
        try:
            assigned = self._consumer.assignment()
            committed = (
                self._consumer.committed(assigned, timeout=self.operation_timeout_s) if assigned else []
            )
            for tp in committed:
                offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
                seek_retrying(self._consumer, tp.topic, tp.partition, offset, self.operation_timeout_s)
        except KafkaException as exc:
            raise ChangeDetectorError(
                f"cannot rewind to the committed offsets: {exc}", kafka_error(exc)
            ) from exc

    def _consume(self, count: int) -> list[Message]:
        try:
            messages = self._consumer.consume(count, self.poll_timeout_s)
        except KafkaException as exc:
            raise ChangeDetectorError(f"consume failed: {exc}", exc.args[0] if exc.args else None) from exc
        out = []
        for msg in messages:
            err = msg.error()
            if err is None:
                out.append(msg)
            elif err.fatal():
                raise ChangeDetectorError(f"consume: {err.str()}", err)
            elif err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err.str())
        return out

    def _commit(self) -> None:
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:  # typically a rebalance: the next owner redoes the batch
            log.warning("offset commit failed (%s): the batch will be seen again", exc)

    # -- source records --------------------------------------------------------------------------------
    def _observe(self, msg: Message) -> tuple[str, Checksum | None] | None:
        """(DataID, checksum; None for a tombstone) of a source record; None when it is unusable."""
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        value: bytes | None = msg.value()
        try:
            raw = find_raw(msg.headers())
            if raw is not None:
                fields = record_fields(raw)
                if value is not None and not matches(fields.checksum, value):
                    raise HeaderError("the value does not match its header checksum")
                return fields.data_id, None if value is None else fields.checksum
        except HeaderError as exc:
            self.stats.skipped += 1
            log.warning("source record %s/%s/%s skipped: %s", topic, partition, offset, exc)
            return None
        data_id = source_data_id(msg.key(), topic, partition, offset)
        return data_id, None if value is None else compute(self.algorithm, value)

    def handle(self, messages: Iterable[Message]) -> list[ChangeEvent]:
        """Detect the changes in a batch of source records, emit their events, store the new state.

        Returns the events produced (delivered). Offsets are the caller's (`run` commits after it).
        """
        latest: dict[tuple[str, str], Checksum | None] = {}
        pending: list[_Pending] = []
        appended = False
        for msg in messages:
            self.stats.records += 1
            seen = self._observe(msg)
            if seen is None:
                continue
            data_id, checksum = seen
            topic = msg.topic() or ""
            key = (topic, data_id)
            previous = latest[key] if key in latest else self.state.get(topic, data_id)
            where = (topic, msg.partition() or 0, msg.offset() or 0)
            if checksum is None:
                if previous is not None:
                    self.stats.deleted += 1
                    pending.append(
                        _Pending(
                            ChangeKind.SOURCE_DELETED,
                            SourceChange(*where, data_id, previous, None),
                            trace_headers(msg.headers()),
                        )
                    )
                latest[key] = None
                continue
            if previous == checksum:
                self.stats.unchanged += 1
                continue
            entry_id = None
            if self.writer is not None:
                app = Application.of_source(
                    DataRef(data_id, checksum), device_id=self.device_id, context=self.context
                )
                self.writer.append(app)
                entry_id = entry_id_of(app)
                appended = True
            latest[key] = checksum
            if previous is None:
                self.stats.first_seen += 1
            else:
                self.stats.changed += 1
                pending.append(
                    _Pending(
                        ChangeKind.SOURCE_CHANGED,
                        SourceChange(*where, data_id, previous, checksum, entry_id),
                        trace_headers(msg.headers()),
                    )
                )
        events = self._impacts(pending) if pending else []
        self._emit(events, [p.trace for p in pending])
        if appended and not pending and self.writer is not None:
            self.writer.flush(self.operation_timeout_s)
        if latest:
            self.state.write(latest)
        self.stats.batches += 1
        return events

    def _catch_up(self) -> int:
        if self.writer is not None:  # the detector's own entries (and an in-process pipeline's)
            self.writer.flush(self.operation_timeout_s)
        self.index.catch_up(self.ledger)
        return self.index.size

    def _impacts(self, pending: list[_Pending]) -> list[ChangeEvent]:
        size = self._catch_up()
        events = []
        now = now_ms()
        for p in pending:
            result = self.index.downstream(p.change.previous_node, limit=self.max_walk)
            impact = Impact.of(result, max_outputs=self.max_outputs, ledger_size=size)
            events.append(ChangeEvent.for_source(p.kind, p.change, impact, now))
        return events

    def _emit(self, events: list[ChangeEvent], traces: Sequence[tuple[tuple[str, bytes], ...]] = ()) -> None:
        """Produce and wait for every delivery; raise when any failed (nothing is committed then).
        `traces[i]`: headers (trace context) of event i."""
        if not events:
            return
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:  # a librdkafka callback: record only
                errors.append(err)

        for i, event in enumerate(events):
            deadline = time.monotonic() + self.operation_timeout_s
            headers: list[tuple[str, str | bytes | None]] | None = (
                list(traces[i]) if i < len(traces) and traces[i] else None
            )
            while True:  # retries only while the local queue is full, until the deadline
                try:
                    self._producer.produce(
                        self.changes_topic,
                        event.encode(),
                        event.key,
                        headers=headers,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    if time.monotonic() > deadline:
                        raise ChangeDetectorError("the producer queue stayed full") from None
                    self._producer.poll(0.05)
        remaining = self._producer.flush(self.operation_timeout_s)
        if remaining or errors:
            raise ChangeDetectorError(
                f"{len(errors)} change events failed, {remaining} undelivered: "
                f"{errors[0].str() if errors else 'timeout'}",
                errors[0] if errors else None,
            )
        self.stats.events += len(events)
        for event in events:
            log.info(
                "change %s: %s, %d outputs affected",
                event.kind.value,
                event.key.decode("utf-8", "replace"),
                event.impact.total,
            )

    # -- functions -------------------------------------------------------------------------------------
    def check_functions(
        self, functions: FunctionRegistry | Iterable[RegisteredFunction]
    ) -> list[ChangeEvent]:
        """Emit a `function_changed` event for each (version, code hash) the ledger recorded applications
        of that is not the function registered now (for a registry: the latest registration of each id;
        for an iterable: the last given per id). Each pair is reported once per current function."""
        if isinstance(functions, FunctionRegistry):
            current = {f.function_id: functions.get(f.function_id) for f in functions}
        else:
            current = {f.function_id: f for f in functions}
        size = self._catch_up()
        events = []
        now = now_ms()
        for fid, fn in sorted(current.items()):
            now_is = (fn.version, fn.code_hash)
            for version, code_hash in self.index.recorded_functions(fid):
                if (version, code_hash) == now_is or self.state.reported(fid, version, code_hash, now_is):
                    continue
                change = FunctionChange(fid, version, code_hash, fn.version, fn.code_hash)
                result = self.index.affected_by_function(fid, version, code_hash, limit=self.max_walk)
                impact = Impact.of(result, max_outputs=self.max_outputs, ledger_size=size)
                events.append(ChangeEvent.for_function(change, impact, now))
        self._emit(events)
        for event in events:
            assert event.function is not None
            self.state.mark_reported(event.function)
        self.stats.function_changes += len(events)
        return events
