"""Where records are: the original outputs a recompute supersedes, and the current source values.

The ledger records what was derived from what, not Kafka coordinates. `OutputIndex` reads output
topics (committed records only) and keeps, per output node (DataID, checksum), the record's
coordinates and header; with a `ResultCache` it also fills the value store, so intermediates a plan does not
recompute (`InputOrigin.STORED`) can be read back. `SourceIndex` keeps the latest value per DataID
of source topics (the executor's `SourceView`; a tombstone deletes). Both read in bounded batches up
to the high watermarks they saw when called (`catch_up`), so a caller interleaves them with its loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition

from recompute_manager.cache import ResultCache
from recompute_manager.planner import Coordinates
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.ledger.model import DataRef
from streamprov.telemetry.propagation import trace_headers

__all__ = ["OutputIndex", "SourceIndex", "TopicReader", "where"]

log = logging.getLogger(__name__)


def where(msg: Message) -> Coordinates:
    """A consumed record's coordinates."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise StreamprovError("a consumed record without coordinates")
    return Coordinates(topic, partition, offset)


class TopicReader:
    """Manually assigned, read_committed reader of whole topics, from the beginning, no group.

    Its fetches wait at most 50 ms: an idle consumer keeps a long-poll fetch open
    (`fetch.wait.max.ms`, 500 ms by default), and every watermark query of a `catch_up` queues behind
    it on the broker connection (about 0.5 s per partition, so seconds per catch-up; measured with
    the Recompute Manager's workers, which catch up before every unit). Pausing the partitions between
    catch-ups instead costs about 0.4 s per catch-up in fetch restarts.
    """

    def __init__(self, config: Mapping[str, Any], topics: Iterable[str], *, timeout_s: float = 10.0) -> None:
        settings = {k: v for k, v in config.items() if k != "group.id"}
        settings.update(
            {
                "group.id": "streamprov-recompute-reader",  # never commits; assign() only
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 50,  # a catch-up's watermark queries wait behind a fetch
            }
        )
        self.timeout_s = timeout_s
        self._consumer = Consumer(settings)
        self._tps: list[TopicPartition] = []
        for topic in topics:
            meta = self._consumer.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise StreamprovError(f"topic {topic!r} does not exist")
            self._tps += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(meta.partitions)]
        self._consumer.assign(self._tps)
        self._next: dict[tuple[str, int], int] = {(t.topic, t.partition): 0 for t in self._tps}

    def catch_up(self, *, max_wait_s: float = 30.0) -> list[Message]:
        """Every committed record up to the high watermarks as of now (bounded by `max_wait_s`)."""
        targets: dict[tuple[str, int], int] = {}
        for tp in self._tps:
            _low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s, cached=False)
            targets[(tp.topic, tp.partition)] = high
        out: list[Message] = []
        deadline = time.monotonic() + max_wait_s
        while time.monotonic() < deadline:
            behind = []
            for key, high in targets.items():
                if self._next[key] >= high:
                    continue
                pos = self._consumer.position([TopicPartition(*key)])[0].offset
                if pos >= 0:  # transaction markers occupy offsets
                    self._next[key] = max(self._next[key], pos)
                if self._next[key] < high:
                    behind.append(key)
            if not behind:
                break
            for msg in self._consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        log.warning("read error: %s", err.str())
                    continue
                at = where(msg)
                self._next[(at.topic, at.partition)] = at.offset + 1
                out.append(msg)
        return out

    def close(self) -> None:
        self._consumer.close()


class OutputIndex:
    """Output node -> coordinates of the record that carries it (and its value, into the cache)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Iterable[str],
        *,
        cache: ResultCache | None = None,
    ) -> None:
        self.cache = cache
        self._reader = TopicReader(config, topics)
        self.locations: dict[DataRef, Coordinates] = {}
        self.headers: dict[DataRef, bytes] = {}
        """The original provenance header of each output (for `Executor(headers=)`)."""
        self.trace_headers: dict[DataRef, tuple[tuple[str, bytes], ...]] = {}
        """The `traceparent`/`tracestate` of each output that has one (for `RecomputeTracing`)."""

    def catch_up(self, *, max_wait_s: float = 30.0) -> int:
        msgs = self._reader.catch_up(max_wait_s=max_wait_s)
        for msg in msgs:
            self.add(msg)
        return len(msgs)

    def add(self, msg: Message) -> None:
        value = msg.value()
        kafka_headers = msg.headers() or []
        try:
            header = ProvenanceHeader.from_headers(kafka_headers)
        except HeaderError:
            return
        if header is None or value is None:
            return
        node = DataRef(header.data_id, header.checksum)
        self.locations[node] = where(msg)
        self.headers[node] = header.encode()
        trace = trace_headers(kafka_headers)
        if trace:
            self.trace_headers[node] = trace
        if self.cache is not None:
            self.cache.put_value(node, value)

    def close(self) -> None:
        self._reader.close()


class SourceIndex:
    """The latest value of every source record (DataID = key); `get` is the executor's source view."""

    def __init__(self, config: Mapping[str, Any], topics: Iterable[str]) -> None:
        self._reader = TopicReader(config, topics)
        self.values: dict[str, bytes] = {}

    def catch_up(self, *, max_wait_s: float = 30.0) -> int:
        msgs = self._reader.catch_up(max_wait_s=max_wait_s)
        for msg in msgs:
            key = msg.key()
            if key is None:
                continue
            data_id = key.decode("utf-8", "replace")
            value = msg.value()
            if value is None:
                self.values.pop(data_id, None)
            else:
                self.values[data_id] = value
        return len(msgs)

    def get(self, data_id: str) -> bytes | None:
        return self.values.get(data_id)

    def close(self) -> None:
        self._reader.close()
