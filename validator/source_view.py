"""The Validator's local view of the source topics: the current version of every source record.

Source topics are compacted and keyed by DataID, so the latest record of a key is the "original
data" an output derives from. The view keeps it in RocksDB (rocksdict), filled by a consumer that
assigns every partition of every source topic (no consumer group: every Validator needs all of it)
and resumes from the offsets stored next to the data, written in the same atomic batch, so a
restart neither re-reads the whole topic nor skips anything.

The partitions to read are looked up again every `refresh_interval_s` and before every drift
report, so partitions added to a source topic and source topics created after the start are read
without a restart (from their beginning).

Per record it stores the value (for re-derivation), the CRC32C of the value (the drift check's
common case, compared as encoded bytes with the header's source checksum), the record's Kafka
timestamp (staleness) and its coordinates (evidence). A tombstone deletes the DataID.

The per-message lookup goes through a bounded in-memory cache in front of RocksDB (hits and misses
both cached, oldest evicted first). Writes go through it: a stored source version replaces its entry,
so the cache never serves an old version, and recently changed sources, the ones new outputs derive
from, are usually found without a RocksDB read.
Not thread-safe: the Validator's loop owns it.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import crc32c as _crc32c
from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    TopicPartition,
)
from rocksdict import Options, Rdict, WriteBatch

from streamprov.agents.kafka_io import KAFKA_LOG, kafka_error
from streamprov.checksum import Checksum, ChecksumAlgorithm, digest
from streamprov.errors import HeaderError
from streamprov.header import ProvenanceHeader, encode_checksum
from validator.errors import SourceViewError

log = logging.getLogger(__name__)

_DATA = b"d"
_OFFSET = b"o"
_RECORD = struct.Struct(">qIiqH")
"""timestamp_ms, CRC32C of the value, partition, offset, topic length; then topic, then value."""
_NEXT = struct.Struct(">q")
_CRC_TAG = b"\x00\x08"
"""Avro encoding of the Checksum head for CRC32C: algorithm 0, length 4."""


class SourceEntry(NamedTuple):
    """The current version of one source record, as the checks need it."""

    crc32c: int
    """CRC32C of the value (compared as an int with the header's, on the hot path)."""
    timestamp_ms: int
    """The record's Kafka timestamp (-1 when the broker gave none)."""
    topic: str
    partition: int
    offset: int

    @property
    def checksum(self) -> bytes:
        """The Avro-encoded CRC32C Checksum (tag + 4 digest bytes), as a header carries it."""
        return _CRC_TAG + self.crc32c.to_bytes(4, "big")

    @property
    def coordinates(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"


class SourceLookup(Protocol):
    """What the checks read from the view (tests pass a dict-backed fake).

    `crcs` is read directly on the hot path (a dict lookup instead of a method call, and an int
    instead of an entry: one memory access less per record): it may hold the CRC32C of any subset
    of the sources `get` returns, and never a stale one.
    """

    @property
    def crcs(self) -> dict[bytes, int]: ...

    def get(self, data_id: bytes) -> SourceEntry | None: ...

    def encoded_checksum(self, data_id: bytes, algorithm: ChecksumAlgorithm) -> bytes | None: ...

    def value(self, data_id: bytes) -> bytes | None: ...


def source_key(key: bytes | None, headers: Any) -> bytes | None:
    """DataID (UTF-8 bytes) of a source record: its key ('hex:...' if not UTF-8), else its header's."""
    if key:
        try:
            key.decode("utf-8")
        except UnicodeDecodeError:
            return b"hex:" + key.hex().encode("ascii")
        return key
    try:
        header = ProvenanceHeader.from_headers(headers)
    except HeaderError:
        return None
    return None if header is None else header.data_id.encode("utf-8")


def _offset_key(topic: str, partition: int) -> bytes:
    return _OFFSET + topic.encode("utf-8") + b"\x00" + partition.to_bytes(4, "big")


def _decode_entry(raw: bytes) -> tuple[SourceEntry, bytes]:
    ts, crc, partition, offset, topic_len = _RECORD.unpack_from(raw)
    start = _RECORD.size
    topic = raw[start : start + topic_len].decode("utf-8")
    value = raw[start + topic_len :]
    return SourceEntry(crc, ts, topic, partition, offset), value


class SourceView:
    """RocksDB view of the compacted source topics; `start()` connects, `poll()` keeps it current."""

    def __init__(
        self,
        path: str | Path,
        kafka_config: Mapping[str, Any],
        topics: Sequence[str],
        *,
        cache_size: int = 100_000,
        operation_timeout_s: float = 30.0,
        refresh_interval_s: float = 10.0,
    ) -> None:
        """`refresh_interval_s`: how often `poll` looks for new source partitions and topics."""
        if cache_size <= 0:
            raise SourceViewError("cache_size must be positive")
        if refresh_interval_s <= 0:
            raise SourceViewError("refresh_interval_s must be positive")
        self.path = Path(path)
        self.topics = list(topics)
        self.cache_size = cache_size
        self.operation_timeout_s = operation_timeout_s
        self.refresh_interval_s = refresh_interval_s
        self._kafka_config = dict(kafka_config)
        self.path.mkdir(parents=True, exist_ok=True)
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        try:
            self._db = Rdict(str(self.path), opts)
        except Exception as exc:  # rocksdict raises plain Exceptions (a held lock, a corrupt dir)
            raise SourceViewError(f"cannot open the source view at {self.path}: {exc}") from exc
        self._cache: dict[bytes, SourceEntry | None] = {}
        self._crcs: dict[bytes, int] = {}
        self._next: dict[tuple[str, int], int] = {}
        self._targets: dict[tuple[str, int], int] = {}
        self._assigned: set[tuple[str, int]] = set()
        self._next_refresh = 0.0
        self.partitions_added = 0
        """Partitions assigned after the start (new partitions, new topics)."""
        self._caught_up = not self.topics
        self._consumer: Consumer | None = None
        self.records_applied = 0
        self.records_skipped = 0

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        """Assign every partition of the source topics from the stored offsets (else the beginning).

        Source topics that do not exist yet, and partitions added later, are picked up while the
        view runs (`refresh_partitions`), from their beginning.
        """
        if self._consumer is not None or not self.topics:
            return
        settings = {
            **self._kafka_config,
            "group.id": "streamprov-validator-source-view",  # required by librdkafka; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
        settings.setdefault("logger", KAFKA_LOG)  # librdkafka's own log lines, repeats held back
        settings.pop("group.instance.id", None)  # the view never joins a group: no static membership
        try:
            consumer = Consumer(settings)
        except KafkaException as exc:
            raise SourceViewError(f"bad consumer configuration: {exc}", kafka_error(exc)) from exc
        self._consumer = consumer
        found, missing = self._partitions(consumer)
        assignment = self._start_positions(found)
        consumer.assign(assignment)
        self._assigned = set(found)
        self._next_refresh = time.monotonic() + self.refresh_interval_s
        self._targets = self._high_watermarks(found)
        log.info(
            "source view %s: %d partition(s) of %s, resuming at %s",
            self.path,
            len(assignment),
            ",".join(self.topics),
            {f"{t}/{p}": n for (t, p), n in sorted(self._next.items())} or "the beginning",
        )
        if missing:
            log.warning(
                "source topic(s) %s do not exist yet: read once they appear (checked every %.0f s)",
                ", ".join(missing),
                self.refresh_interval_s,
            )

    def _start_positions(self, tps: Iterable[tuple[str, int]]) -> list[TopicPartition]:
        """Where to read each partition from: the offset stored with the data, else the beginning."""
        assignment = []
        for topic, partition in tps:
            stored = self._db.get(_offset_key(topic, partition))
            start = _NEXT.unpack(stored)[0] if stored is not None else OFFSET_BEGINNING
            if stored is not None:
                self._next[(topic, partition)] = start
            assignment.append(TopicPartition(topic, partition, start))
        return assignment

    def _metadata(self, consumer: Consumer, timeout_s: float) -> tuple[list[tuple[str, int]], list[str]]:
        """(partitions of the source topics that exist, source topics that do not); one metadata
        request per source topic (a request for all topics costs tens of ms on a cluster with
        thousands). Raises `KafkaException` when the broker does not answer."""
        found: list[tuple[str, int]] = []
        missing: list[str] = []
        for topic in self.topics:
            meta = consumer.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                missing.append(topic)
            else:
                found.extend((topic, p) for p in sorted(meta.partitions))
        return found, missing

    def _partitions(self, consumer: Consumer) -> tuple[list[tuple[str, int]], list[str]]:
        """The metadata at start, retried while the broker does not answer (`operation_timeout_s`)."""
        deadline = time.monotonic() + self.operation_timeout_s
        while True:
            try:
                return self._metadata(consumer, min(5.0, self.operation_timeout_s))
            except KafkaException as exc:
                if time.monotonic() >= deadline:
                    raise SourceViewError(
                        f"cannot read the metadata of the source topics: {kafka_error(exc).str()}",
                        kafka_error(exc),
                    ) from exc
            time.sleep(0.5)

    def refresh_partitions(self, timeout_s: float | None = None) -> int:
        """Assign source partitions that appeared since the last look (new partitions of a source
        topic, a source topic created after the start), from their beginning; returns how many.

        One metadata request per source topic; a broker that does not answer within `timeout_s`
        (default: 2 s) is not an error, the next refresh tries again. Called every
        `refresh_interval_s` from `poll` and before every drift report (`catch_up`), so a source
        record on a brand-new partition is read before an output derived from it is flagged.
        """
        consumer = self._consumer
        if consumer is None:
            return 0
        self._next_refresh = time.monotonic() + self.refresh_interval_s
        try:
            found, _missing = self._metadata(consumer, 2.0 if timeout_s is None else timeout_s)
        except KafkaException as exc:
            log.debug("source topic metadata: %s", kafka_error(exc).str())
            return 0
        new = [tp for tp in found if tp not in self._assigned]
        if not new:
            return 0
        try:
            consumer.incremental_assign(self._start_positions(new))
        except KafkaException as exc:
            log.warning("cannot assign new source partitions %s: %s", new, kafka_error(exc).str())
            return 0
        self._assigned.update(new)
        self.partitions_added += len(new)
        log.info("source view: new source partition(s) %s, read from the beginning", sorted(new))
        return len(new)

    def _high_watermarks(self, tps: Iterable[tuple[str, int]]) -> dict[tuple[str, int], int]:
        assert self._consumer is not None
        marks: dict[tuple[str, int], int] = {}
        for topic, partition in tps:
            try:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=min(10.0, self.operation_timeout_s)
                )
            except KafkaException as exc:
                log.warning("high watermark of %s/%s: %s", topic, partition, kafka_error(exc).str())
                continue
            marks[(topic, partition)] = int(high)
        return marks

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the source view consumer: %s", exc)
            self._consumer = None
        self._db.close()

    # -- keeping up -----------------------------------------------------------------------------------
    def poll(self, max_messages: int = 1000, timeout_s: float = 0.0) -> int:
        """Apply what the source consumer has ready (waiting up to `timeout_s`); returns how many."""
        consumer = self._consumer
        if consumer is None:
            return 0
        if time.monotonic() >= self._next_refresh:
            self.refresh_partitions()
        try:
            messages = consumer.consume(max_messages, timeout_s)
        except KafkaException as exc:
            err = kafka_error(exc)
            if err.fatal():
                raise SourceViewError(f"source consumer: {err.str()}", err) from exc
            log.warning("source consumer: %s", err.str())
            return 0
        records: list[tuple[str, int, int, bytes | None, bytes | None, Any, int]] = []
        for msg in messages:
            error = msg.error()
            if error is not None:
                if error.fatal():
                    raise SourceViewError(f"source consumer: {error.str()}", error)
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("source consumer: %s", error.str())
                continue
            kind, ts = msg.timestamp()
            records.append(
                (
                    msg.topic() or "",
                    msg.partition() or 0,
                    msg.offset() or 0,
                    msg.key(),
                    msg.value(),
                    msg.headers(),
                    -1 if kind == TIMESTAMP_NOT_AVAILABLE else ts,
                )
            )
        if records:
            self.apply(records)
        return len(records)

    def apply(self, records: Sequence[tuple[str, int, int, bytes | None, bytes | None, Any, int]]) -> None:
        """Store (topic, partition, offset, key, value, headers, timestamp_ms) records and their
        next offsets in one atomic write; a None value deletes the DataID (a tombstone)."""
        batch = WriteBatch(raw_mode=True)
        cache = self._cache
        nexts: dict[tuple[str, int], int] = {}
        fresh: list[tuple[bytes, SourceEntry | None]] = []
        for topic, partition, offset, key, value, headers, ts in records:
            nexts[(topic, partition)] = offset + 1
            data_id = source_key(key, headers)
            if data_id is None:
                self.records_skipped += 1
                log.warning(
                    "source record %s/%s/%s has no key and no DataID: ignored", topic, partition, offset
                )
                continue
            if value is None:
                batch.delete(_DATA + data_id)
                fresh.append((data_id, None))
            else:
                topic_bytes = topic.encode("utf-8")
                crc = _crc32c.crc32c(value)
                head = _RECORD.pack(ts, crc, partition, offset, len(topic_bytes))
                batch.put(_DATA + data_id, b"".join((head, topic_bytes, value)))
                fresh.append((data_id, SourceEntry(crc, ts, topic, partition, offset)))
            self.records_applied += 1
        for (topic, partition), next_offset in nexts.items():
            batch.put(_offset_key(topic, partition), _NEXT.pack(next_offset))
        self._db.write(batch)
        self._next.update(nexts)
        # Write-through, once stored: recently written sources are the ones outputs ask for next.
        for data_id, entry in fresh:
            cache.pop(data_id, None)
            self._remember(data_id, entry)

    @property
    def caught_up(self) -> bool:
        """Has the view read every source partition up to where it ended when the view started?"""
        if self._caught_up:
            return True
        consumer = self._consumer
        if consumer is None:
            return False
        behind = [tp for tp, high in self._targets.items() if self._next.get(tp, 0) < high]
        if behind:
            try:  # a transaction marker at the end is never a message: ask for the fetch position
                positions = consumer.position([TopicPartition(t, p) for t, p in behind])
            except KafkaException:
                return False
            if any(tp.offset < self._targets[(tp.topic, tp.partition)] for tp in positions):
                return False
        self._caught_up = True
        log.info("source view caught up (%d records applied)", self.records_applied)
        return True

    def catch_up(self, timeout_s: float) -> bool:
        """Read the source topics up to their current ends (a broker round trip); False on timeout.

        Called before reporting a changed or missing source, so a record whose new source version
        is already on the source topic but not yet in the view is not flagged.
        """
        consumer = self._consumer
        if consumer is None:
            return True
        self.refresh_partitions(min(2.0, timeout_s))
        targets = self._high_watermarks(self._next_or_all())
        deadline = time.monotonic() + timeout_s
        while True:
            behind = [tp for tp, high in targets.items() if self._next.get(tp, 0) < high]
            if behind:
                try:
                    positions = consumer.position([TopicPartition(t, p) for t, p in behind])
                    behind = [
                        (tp.topic, tp.partition)
                        for tp in positions
                        if tp.offset < targets[(tp.topic, tp.partition)]
                    ]
                except KafkaException:
                    pass
            if not behind:
                return True
            if time.monotonic() >= deadline:
                return False
            self.poll(1000, min(0.2, max(0.0, deadline - time.monotonic())))

    def _next_or_all(self) -> list[tuple[str, int]]:
        assert self._consumer is not None
        try:
            assigned: list[TopicPartition] = self._consumer.assignment()
            return [(tp.topic, tp.partition) for tp in assigned]
        except KafkaException:
            return sorted(self._assigned)

    def lag(self) -> int:
        """Records between the view and the ends seen at start (0 once caught up)."""
        if self._caught_up:
            return 0
        return sum(max(0, high - self._next.get(tp, 0)) for tp, high in self._targets.items())

    @property
    def cache(self) -> dict[bytes, SourceEntry | None]:
        return self._cache

    @property
    def crcs(self) -> dict[bytes, int]:
        return self._crcs

    def _remember(self, data_id: bytes, entry: SourceEntry | None) -> None:
        cache = self._cache
        if len(cache) >= self.cache_size:  # FIFO eviction: O(1), good enough for hot DataIDs
            oldest = next(iter(cache))
            del cache[oldest]
            self._crcs.pop(oldest, None)
        cache[data_id] = entry
        if entry is None:
            self._crcs.pop(data_id, None)
        else:
            self._crcs[data_id] = entry.crc32c

    # -- lookups ----------------------------------------------------------------------------------------
    def get(self, data_id: bytes) -> SourceEntry | None:
        """The current version of DataID `data_id` (UTF-8 bytes), or None when there is none."""
        cache = self._cache
        try:
            return cache[data_id]
        except KeyError:
            pass
        raw = self._db.get(_DATA + data_id)
        entry = None if raw is None else _decode_entry(raw)[0]
        self._remember(data_id, entry)
        return entry

    def value(self, data_id: bytes) -> bytes | None:
        """The current source value of `data_id` (for re-derivation); None when there is none."""
        raw = self._db.get(_DATA + data_id)
        return None if raw is None else _decode_entry(raw)[1]

    def encoded_checksum(self, data_id: bytes, algorithm: ChecksumAlgorithm) -> bytes | None:
        """The current source value's Checksum, Avro-encoded, in `algorithm` (SHA-256 is computed)."""
        if algorithm is ChecksumAlgorithm.CRC32C:
            entry = self.get(data_id)
            return None if entry is None else entry.checksum
        value = self.value(data_id)
        return None if value is None else encode_checksum(Checksum(algorithm, digest(algorithm, value)))
