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
remembered in RocksDB so a restart does not report them again; a state without them (a fresh state
dir) first rebuilds them from the `function_changed` events on the changes topic (those past its
retention are reported again).

Delivery is at least once, without losing a change: per batch, the events are produced and
delivered, the ledger flushed, and only then the checksums stored, together with each partition's
next offset (one RocksDB WriteBatch), and the offsets committed. A crash before the state is stored
replays the batch; the events come again with the same `change_id` (consumers de-duplicate) and the
`SOURCE` entries with the same entry_id (the ledger drops them).

The checksums are local, the group's committed offsets are in Kafka; a partition is read from where
the *local state* ends (the stored next offset; its beginning when the state has none of it), and the
committed offset, read when the partition is assigned, only says how far that history was handled
already: records below it (a fresh or lost state dir, a partition another replica handled meanwhile)
are replayed silently, rebuilding the checksums without events, ledger entries or `first_seen`
counts (`stats.replayed`). A state ahead of the committed offsets (stored, then a crash before the
commit) is not read again: its events were delivered. The source topics are compacted, so a replay
from the beginning reads the compacted history.

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
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from rocksdict import Options, Rdict, WriteBatch

from streamprov.agents.dead_letter import RECORD_FRAMING_BYTES, record_size
from streamprov.agents.kafka_io import (
    KAFKA_LOG,
    TopicMissingError,
    TopicReader,
    TopicReadTimeoutError,
    kafka_error,
    seek_retrying,
)
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
from streamprov.ledger.errors import EntryTooLargeError
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
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_SOURCE = b"S"
_OFFSET = b"O"
_REPORTED = b"F"
_SYNCED = b"R"
_ALGORITHMS = tuple(ChecksumAlgorithm)
_TP = tuple[str, int]


class ChangeDetectorError(StreamprovError):
    """The detector cannot go on (Kafka, ledger or state failed); `kafka_error` keeps librdkafka's."""

    def __init__(self, message: str, kafka_error: KafkaError | None = None) -> None:
        super().__init__(message)
        self.kafka_error = kafka_error


def _lp(b: bytes) -> bytes:
    return _LP.pack(len(b)) + b


def _brief(text: str, keep: int = 64) -> str:
    """`text` for a log line: a DataID may be hundreds of kB."""
    return text if len(text) <= keep else f"{text[:keep]}... ({len(text)} characters)"


class SourceVersions:
    """The detector's local state (RocksDB): the last checksum seen per (topic, DataID), the next offset
    per source partition those checksums cover, and the function changes already reported."""

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

    @staticmethod
    def _okey(topic: str, partition: int) -> bytes:
        return _OFFSET + _lp(topic.encode("utf-8")) + _I32.pack(partition)

    def get(self, topic: str, data_id: str) -> Checksum | None:
        raw: bytes | None = self._db.get(self._key(topic, data_id))
        if raw is None:
            return None
        return Checksum(_ALGORITHMS[raw[0]], raw[1:])

    def next_offset(self, topic: str, partition: int) -> int | None:
        """The offset after the last record of the partition the stored checksums include (None: no
        record of it is in this state)."""
        raw: bytes | None = self._db.get(self._okey(topic, partition))
        return None if raw is None else int(_I64.unpack(raw)[0])

    def write(
        self,
        changes: Mapping[tuple[str, str], Checksum | None],
        offsets: Mapping[tuple[str, int], int] | None = None,
    ) -> None:
        """Store the latest checksum of each (topic, DataID) (None: deleted) and the next offset of each
        (topic, partition) they were read up to, atomically (one WriteBatch)."""
        batch = WriteBatch(raw_mode=True)
        for (topic, data_id), checksum in changes.items():
            key = self._key(topic, data_id)
            if checksum is None:
                batch.delete(key)
            else:
                batch.put(key, bytes((checksum.algorithm,)) + checksum.value)
        for (topic, partition), offset in (offsets or {}).items():
            batch.put(self._okey(topic, partition), _I64.pack(offset))
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

    def reported_synced(self, changes_topic: str) -> bool:
        """Whether the reported function changes were rebuilt from (or started empty with) the changes
        topic `changes_topic`."""
        return self._db.get(_SYNCED + changes_topic.encode("utf-8")) is not None

    def mark_reported_synced(self, changes_topic: str) -> None:
        self._db.put(_SYNCED + changes_topic.encode("utf-8"), b"1")

    def close(self) -> None:
        self._db.close()


@dataclass
class DetectorStats:
    """Counters of the records and changes handled. A batch's counts are added once it is stored: a
    batch that failed and is tried again is counted once, when it goes through."""

    records: int = 0
    first_seen: int = 0
    unchanged: int = 0
    changed: int = 0
    deleted: int = 0
    skipped: int = 0
    """Records whose header is malformed or does not match their value: logged, never a change."""
    unrecorded: int = 0
    """New source versions whose `SOURCE` ledger entry is too large for a ledger record (a DataID of
    hundreds of kB, from the key or the header): logged; the change is still detected and reported,
    its event without a `ledger_entry_id`."""
    unreported: int = 0
    """Changes whose event cannot be a Kafka record even without its impact outputs (a DataID over the
    changes topic's size limit): logged, the new version is stored, no event."""
    function_changes: int = 0
    events: int = 0
    batches: int = 0
    replayed: int = 0
    """Records below the group's committed offset read again only to rebuild the local state (a
    fresh or stale state dir, a partition that moved here): no event, no ledger entry; not in
    `records`."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def add(self, other: DetectorStats) -> None:
        """Add `other`'s counts (a batch's, once it is stored) to these."""
        for name, count in asdict(other).items():
            setattr(self, name, getattr(self, name) + count)


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

    heartbeat: Callable[[], object] | None = None
    """Called while a long read goes on (rebuilding the reported function changes): a service's
    liveness beat."""

    max_event_bytes: int
    """A change event whose record (key, value, headers) is larger is cut to fit (see `_fit`): the
    producer's `message.max.bytes` less room for the framing; a service lowers it to the changes
    topic's `max.message.bytes`."""

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
        self.max_event_bytes = int(config.get("message.max.bytes", 1_000_000)) - RECORD_FRAMING_BYTES
        self.state = SourceVersions(state_dir)
        base = dict(config)
        base.setdefault("logger", KAFKA_LOG)  # librdkafka's own log lines, repeats held back
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
        self._incremental = (
            "cooperative" in str(consumer_settings.get("partition.assignment.strategy", "")).lower()
            or str(consumer_settings.get("group.protocol", "")).lower() == "consumer"
        )
        """Incremental rebalancing: `on_assign` gets the added partitions only (else the whole set)."""
        self._reader_settings = producer_settings  # a plain reader of the changes topic (no group)
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
        self._replay_until: dict[_TP, int | None] = {}
        """Per assigned partition: its records below this offset (the group's committed offset when it
        was assigned, when the local state ended before it) only rebuild the state; None: none."""
        self._unresolved: set[_TP] = set()
        """Assigned partitions whose committed offset was not read yet (see `_resolve`)."""
        self._must_rewind = False
        """A batch failed after it was consumed: `rewind()` before consuming again."""

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
            self._consumer.subscribe(
                self.source_topics,
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_revoke,
            )
            self._subscribed = True
        if self._must_rewind:  # never read on past a batch that failed
            self.rewind()
        want = self.batch_size if max_records is None else max(1, min(self.batch_size, max_records))
        self._must_rewind = True  # until the batch is stored: the position runs ahead of the state
        batch = self._consume(want)
        self._resolve()
        if batch:
            # a revoked partition's records (fetched before the rebalance) are its new owner's
            batch = [m for m in batch if (m.topic() or "", m.partition() or 0) in self._replay_until]
        if batch:
            _events, offsets = self._handle(batch)
            self._commit(offsets)
        self._must_rewind = False
        return len(batch)

    def rewind(self) -> None:
        """Seek every assigned partition back to where the local state ends (its beginning when the
        state has none of it), so a batch that failed is consumed again. Needs no broker round trip
        (the offsets are local); raises `ChangeDetectorError` when a seek fails, and `step()` then
        rewinds again before it consumes."""
        try:
            for tp in self._consumer.assignment():
                local = self.state.next_offset(tp.topic, tp.partition)
                offset = OFFSET_BEGINNING if local is None else local
                seek_retrying(self._consumer, tp.topic, tp.partition, offset, self.operation_timeout_s)
        except KafkaException as exc:
            self._must_rewind = True
            raise ChangeDetectorError(
                f"cannot rewind to the stored offsets: {exc}", kafka_error(exc)
            ) from exc
        self._must_rewind = False

    # -- partitions: where to start, what to replay ----------------------------------------------------
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Start each new partition where the local state ends (its beginning when the state has none
        of it), not at the group's committed offset; whether its first records only rebuild the state
        is resolved after `consume()` returns (`_resolve`: no broker calls in a rebalance callback)."""
        start = []
        for p in partitions:
            local = self.state.next_offset(p.topic, p.partition)
            start.append(TopicPartition(p.topic, p.partition, OFFSET_BEGINNING if local is None else local))
            self._replay_until.pop((p.topic, p.partition), None)
            self._unresolved.add((p.topic, p.partition))
        if self._incremental:
            consumer.incremental_assign(start)
        else:
            consumer.assign(start)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            self._replay_until.pop((p.topic, p.partition), None)
            self._unresolved.discard((p.topic, p.partition))

    def _resolve(self) -> None:
        """Read the committed offsets of newly assigned partitions: where the local state ends before
        one (a fresh state dir, a partition that was another replica's), the records up to it were
        handled already (their events sent) and are replayed silently, to rebuild the state only."""
        if not self._unresolved:
            return
        wanted = [TopicPartition(t, p) for t, p in sorted(self._unresolved)]
        try:
            committed = self._consumer.committed(wanted, timeout=self.operation_timeout_s)
        except KafkaException as exc:
            raise ChangeDetectorError(
                f"cannot read the committed offsets of the assigned partitions: {exc}", kafka_error(exc)
            ) from exc
        for tp in committed:
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                raise ChangeDetectorError(f"committed offset of {tp.topic} [{tp.partition}]: {tp.error}")
            local = self.state.next_offset(*key)
            replay = tp.offset >= 0 and (local is None or local < tp.offset)
            self._replay_until[key] = tp.offset if replay else None
            self._unresolved.discard(key)
            if replay:
                log.info(
                    "%s [%d]: the local state ends at %s, the group committed %d: replaying up to it "
                    "to rebuild the state (no events)",
                    tp.topic,
                    tp.partition,
                    "its beginning" if local is None else f"offset {local}",
                    tp.offset,
                )

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

    def _commit(self, offsets: Mapping[_TP, int]) -> None:
        """Commit the next offset of each partition the batch handled live records of (never a replay's:
        that would move the group's offset back)."""
        live = [
            TopicPartition(t, p, offset)
            for (t, p), offset in offsets.items()
            if (until := self._replay_until.get((t, p))) is None or offset > until
        ]
        if not live:
            return
        try:
            result = self._consumer.commit(offsets=live, asynchronous=False)
        except KafkaException as exc:  # typically a rebalance: the next owner redoes the batch
            log.warning("offset commit failed (%s): the batch will be seen again", exc)
            return
        for tp in result or []:
            if tp.error is not None:
                log.warning("offset commit of %s [%d] failed: %s", tp.topic, tp.partition, tp.error)

    # -- source records --------------------------------------------------------------------------------
    def _observe(
        self, msg: Message, stats: DetectorStats, *, quiet: bool = False
    ) -> tuple[str, Checksum | None] | None:
        """(DataID, checksum; None for a tombstone) of a source record; None when it is unusable
        (counted in `stats`; `quiet`: a replayed record, counted and logged the first time)."""
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
            if quiet:
                return None
            stats.skipped += 1
            log.warning("source record %s/%s/%s skipped: %s", topic, partition, offset, exc)
            return None
        data_id = source_data_id(msg.key(), topic, partition, offset)
        return data_id, None if value is None else compute(self.algorithm, value)

    def handle(self, messages: Iterable[Message]) -> list[ChangeEvent]:
        """Detect the changes in a batch of source records, emit their events, store the new state.

        Returns the events produced (delivered). Offsets are the caller's (`run` commits after it).
        """
        return self._handle(messages)[0]

    def _handle(self, messages: Iterable[Message]) -> tuple[list[ChangeEvent], dict[_TP, int]]:
        """`handle`, also returning the next offset of each partition it read (stored with the state).
        Its counts go to `self.stats` once the state is stored (a batch that fails is not counted)."""
        stats = DetectorStats()
        latest: dict[tuple[str, str], Checksum | None] = {}
        pending: list[_Pending] = []
        appended = False
        stored: dict[_TP, int] = {}  # per partition: the next offset the state (with this batch) covers
        moved: dict[_TP, int] = {}
        warned: set[_TP] = set()
        for msg in messages:
            topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
            tp = (topic, partition)
            if tp not in stored:
                known = self.state.next_offset(topic, partition)
                stored[tp] = -1 if known is None else known
            if offset < stored[tp]:  # in the state already: a record fetched twice, never a change
                if tp not in warned:
                    warned.add(tp)
                    log.warning(
                        "%s [%d] offset %d: below the offset the local state ends at (%d): in it already, "
                        "skipped (a source topic that was recreated needs a fresh state dir)",
                        topic,
                        partition,
                        offset,
                        stored[tp],
                    )
                continue
            stored[tp] = moved[tp] = offset + 1
            until = self._replay_until.get(tp)
            if until is not None and offset < until:  # handled before (its events sent): state only
                stats.replayed += 1
                seen = self._observe(msg, stats, quiet=True)
                if seen is not None:
                    latest[(topic, seen[0])] = seen[1]
                continue
            stats.records += 1
            appended = self._detect(msg, latest, pending, stats) or appended
        events = self._impacts(pending) if pending else []
        events = self._emit(events, [p.trace for p in pending], stats)
        if appended and not pending and self.writer is not None:
            self.writer.flush(self.operation_timeout_s)
        if latest or moved:
            self.state.write(latest, moved)
        stats.batches += 1
        self.stats.add(stats)
        return events, moved

    def _detect(
        self,
        msg: Message,
        latest: dict[tuple[str, str], Checksum | None],
        pending: list[_Pending],
        stats: DetectorStats,
    ) -> bool:
        """Detect what a (live) source record changed: into `latest` (the batch's new state), `pending`
        (its events) and `stats`. True when it appended a `SOURCE` entry to the writer.

        A `SOURCE` entry too large for a ledger record (`EntryTooLargeError`: a DataID of hundreds of kB)
        is left out, logged and counted (`unrecorded`); the version is still detected, as without a
        writer. It is the same every time the record is read: failing the batch would block the
        partition (and the changes behind the record) for good."""
        topic, partition, offset = msg.topic() or "", msg.partition() or 0, msg.offset() or 0
        appended = False
        seen = self._observe(msg, stats)
        if seen is None:
            return False
        data_id, checksum = seen
        key = (topic, data_id)
        previous = latest[key] if key in latest else self.state.get(topic, data_id)
        where = (topic, partition, offset)
        if checksum is None:
            if previous is not None:
                stats.deleted += 1
                pending.append(
                    _Pending(
                        ChangeKind.SOURCE_DELETED,
                        SourceChange(*where, data_id, previous, None),
                        trace_headers(msg.headers()),
                    )
                )
            latest[key] = None
            return False
        if previous == checksum:
            stats.unchanged += 1
            return False
        entry_id = None
        if self.writer is not None:
            app = Application.of_source(
                DataRef(data_id, checksum), device_id=self.device_id, context=self.context
            )
            try:
                self.writer.append(app)
            except EntryTooLargeError as exc:  # raised before anything is queued
                stats.unrecorded += 1
                log.warning(
                    "source record %s/%s/%s (DataID %s): no SOURCE ledger entry, it is too large for a "
                    "ledger record (%s); its version is still detected and reported, without one",
                    topic,
                    partition,
                    offset,
                    _brief(data_id),
                    exc,
                )
            else:
                entry_id = entry_id_of(app)
                appended = True
        latest[key] = checksum
        if previous is None:
            stats.first_seen += 1
        else:
            stats.changed += 1
            pending.append(
                _Pending(
                    ChangeKind.SOURCE_CHANGED,
                    SourceChange(*where, data_id, previous, checksum, entry_id),
                    trace_headers(msg.headers()),
                )
            )
        return appended

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

    def _emit(
        self,
        events: list[ChangeEvent],
        traces: Sequence[tuple[tuple[str, bytes], ...]] = (),
        stats: DetectorStats | None = None,
    ) -> list[ChangeEvent]:
        """Produce and wait for every delivery; raise when any failed (nothing is committed then).
        `traces[i]`: headers (trace context) of event i. Returns the events delivered: each as it fit
        under `max_event_bytes` (see `_fit`; one that cannot fit is left out). Counts go to `stats`
        (default: `self.stats`)."""
        stats = self.stats if stats is None else stats
        if not events:
            return []
        errors: list[KafkaError] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:  # a librdkafka callback: record only
                errors.append(err)

        sent = []
        for i, detected in enumerate(events):
            deadline = time.monotonic() + self.operation_timeout_s
            headers: list[tuple[str, str | bytes | None]] | None = (
                list(traces[i]) if i < len(traces) and traces[i] else None
            )
            fitted = self._fit(detected, headers or [], stats)
            if fitted is None:
                continue
            event, value = fitted
            while True:  # retries only while the local queue is full, until the deadline
                try:
                    self._producer.produce(
                        self.changes_topic,
                        value,
                        event.key,
                        headers=headers,
                        on_delivery=on_delivery,
                    )
                    break
                except BufferError:
                    if time.monotonic() > deadline:
                        raise ChangeDetectorError("the producer queue stayed full") from None
                    self._producer.poll(0.05)
            sent.append(event)
        remaining = self._producer.flush(self.operation_timeout_s) if sent else 0
        if remaining or errors:
            raise ChangeDetectorError(
                f"{len(errors)} change events failed, {remaining} undelivered: "
                f"{errors[0].str() if errors else 'timeout'}",
                errors[0] if errors else None,
            )
        stats.events += len(sent)
        for event in sent:
            log.info(
                "change %s: %s, %d outputs affected",
                event.kind.value,
                _brief(event.key.decode("utf-8", "replace")),
                event.impact.total,
            )
        return sent

    def _fit(
        self, event: ChangeEvent, headers: Sequence[tuple[str, Any]], stats: DetectorStats
    ) -> tuple[ChangeEvent, bytes] | None:
        """`event` and its encoding when the record (key, value, headers) fits under `max_event_bytes`.

        A larger one would be refused by the producer (`message.max.bytes`) or the broker (the changes
        topic's `max.message.bytes`), every time the batch is tried: it carries the first impact
        outputs that fit instead (`truncated`; `total` still counts them all). When even none fit (the
        DataID itself is too long), None: logged and counted (`unreported`), the new version is stored
        all the same, so the partition goes on."""
        value = event.encode()
        size = record_size(event.key, value, headers)
        if size <= self.max_event_bytes:
            return event, value
        outputs = event.impact.outputs

        def cut(n: int) -> tuple[ChangeEvent, bytes]:
            e = replace(event, impact=replace(event.impact, outputs=outputs[:n], truncated=True))
            return e, e.encode()

        lo, hi = -1, len(outputs)  # the most outputs that fit: > lo ... < hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if record_size(event.key, cut(mid)[1], headers) <= self.max_event_bytes:
                lo = mid
            else:
                hi = mid
        subject = _brief(event.key.decode("utf-8", "replace"))
        if lo < 0:
            stats.unreported += 1
            src = event.source
            where = "" if src is None else f" (source record {src.topic}/{src.partition}/{src.offset})"
            log.warning(
                "change %s of %s%s not reported: its event needs %d bytes even without impact outputs, "
                "above the %d a change event may have (the producer's message.max.bytes, the changes "
                "topic's max.message.bytes): its key is %d bytes; the new version is stored",
                event.kind.value,
                subject,
                where,
                record_size(event.key, cut(0)[1], headers),
                self.max_event_bytes,
                len(event.key),
            )
            return None
        log.warning(
            "change %s of %s: its event carries the first %d of its %d impact outputs (all of them need "
            "%d bytes, above the %d a change event may have)",
            event.kind.value,
            subject,
            lo,
            event.impact.total,
            size,
            self.max_event_bytes,
        )
        return cut(lo)

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
        if not self.state.reported_synced(self.changes_topic):
            self._sync_reported()
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
        sent = self._emit(events)
        for event in events:  # one left out (it can never fit) too: it is not tried again
            assert event.function is not None
            self.state.mark_reported(event.function)
        self.stats.function_changes += len(events)
        return sent

    def _sync_reported(self) -> None:
        """A state without the reported function changes (a fresh state dir, an emptyDir after a pod
        was replaced): rebuild them from the `function_changed` events on the changes topic, so they
        are not reported (and recomputed) again. Events past the topic's retention are reported again."""
        topic = self.changes_topic
        marked = read = 0
        reader: TopicReader | None = None
        try:
            reader = TopicReader(
                self._reader_settings,
                [topic],
                group_id=f"streamprov-changes-reader-{uuid.uuid4().hex[:12]}",  # never joined
                timeout_s=self.operation_timeout_s,
            )
            for batch in reader.read(wait_s=self.operation_timeout_s, idle=True, beat=self.heartbeat):
                read += len(batch)
                for msg in batch:
                    value: bytes | None = msg.value()
                    try:
                        event = None if value is None else ChangeEvent.decode(value)
                    except StreamprovError:
                        continue  # not a change event: not ours to judge here
                    if event is not None and event.function is not None:
                        self.state.mark_reported(event.function)
                        marked += 1
        except TopicMissingError:
            log.info("changes topic %s not there: no reported function changes to rebuild", topic)
            return
        except TopicReadTimeoutError as exc:
            raise ChangeDetectorError(f"nothing came from {topic} for too long") from exc
        except (KafkaException, StreamprovError) as exc:  # StreamprovError: the topic is not available
            err = kafka_error(exc) if isinstance(exc, KafkaException) else None
            raise ChangeDetectorError(f"cannot read the changes topic {topic}: {exc}", err) from exc
        finally:
            if reader is not None:
                reader.close()
        self.state.mark_reported_synced(topic)
        log.info("reported function changes rebuilt from %s: %d of %d events", topic, marked, read)
