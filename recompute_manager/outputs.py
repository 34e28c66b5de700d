"""Where records are: the original outputs a recompute supersedes, and the current source values.

The ledger records what was derived from what, not Kafka coordinates. `OutputIndex` reads output
topics (committed records only) and keeps, per output node (DataID, checksum), the record's
coordinates and header; with a `ResultCache` it also fills the value store, so intermediates a plan does not
recompute (`InputOrigin.STORED`) can be read back. `SourceIndex` keeps the latest value per DataID
of source topics (the executor's `SourceView`; a tombstone deletes). Both read in bounded batches up
to the high watermarks they saw when called (`catch_up`), so a caller interleaves them with its loop;
their reader is `streamprov.agents.kafka_io.TopicReader` (re-exported here).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import Message

from recompute_manager.cache import ResultCache
from recompute_manager.planner import Coordinates
from recompute_manager.summary import SummaryKeeper
from streamprov.agents.kafka_io import TopicReader
from streamprov.checksum import matches
from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.ledger.model import DataRef
from streamprov.telemetry.propagation import trace_headers

log = logging.getLogger(__name__)

__all__ = ["READER_GROUP", "OutputIndex", "SourceIndex", "TopicReader", "where"]

READER_GROUP = "streamprov-recompute-reader"
"""The group.id of the Recompute Manager's `TopicReader`s (never joined, never committed to)."""


def where(msg: Message) -> Coordinates:
    """A consumed record's coordinates."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise StreamprovError("a consumed record without coordinates")
    return Coordinates(topic, partition, offset)


class OutputIndex:
    """Output node -> coordinates of the record that carries it (and its value, into the cache)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Iterable[str],
        *,
        cache: ResultCache | None = None,
        summaries: SummaryKeeper | None = None,
    ) -> None:
        """`summaries`: told of every reduce output indexed (`SummaryKeeper.note`)."""
        self.cache = cache
        self.summaries = summaries
        self._reader = TopicReader(config, topics, group_id=READER_GROUP)
        self.locations: dict[DataRef, Coordinates] = {}
        self.headers: dict[DataRef, bytes] = {}
        """The original provenance header of each output (for `Executor(headers=)`)."""
        self.trace_headers: dict[DataRef, tuple[tuple[str, bytes], ...]] = {}
        """The `traceparent`/`tracestate` of each output that has one (for `RecomputeTracing`)."""
        self.mismatched = 0
        """Records skipped: their value does not match their own header's checksum."""

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
        if not matches(header.checksum, value):
            # corrupted in flight, or a forged copy (the Validator's checksum_mismatch): it must not
            # stand for the node its header names (its value would poison every recompute reading it)
            self.mismatched += 1
            log.warning("%s: value does not match its provenance header's checksum: not indexed", where(msg))
            return
        node = DataRef(header.data_id, header.checksum)
        self.locations[node] = where(msg)
        self.headers[node] = header.encode()
        trace = trace_headers(kafka_headers)
        if trace:
            self.trace_headers[node] = trace
        if self.cache is not None:
            self.cache.put_value(node, value)
        if self.summaries is not None:
            self.summaries.note(node, header)

    def close(self) -> None:
        self._reader.close()


class SourceIndex:
    """The latest value of every source record (DataID = key); `get` is the executor's source view."""

    def __init__(self, config: Mapping[str, Any], topics: Iterable[str]) -> None:
        self._reader = TopicReader(config, topics, group_id=READER_GROUP)
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
