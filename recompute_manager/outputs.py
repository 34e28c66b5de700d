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
import time
from collections.abc import Iterable, Mapping
from typing import Any

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message

from recompute_manager.cache import ResultCache
from recompute_manager.planner import Coordinates
from recompute_manager.policy import DEFAULT_ERROR_WINDOW_S
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
        checked_window_s: float = DEFAULT_ERROR_WINDOW_S,
    ) -> None:
        """`summaries`: told of every reduce output indexed (`SummaryKeeper.note`).
        `checked_window_s`: records written longer ago than this are not counted (`take_checked`)."""
        self.cache = cache
        self.checked_window_s = checked_window_s
        self._checked: dict[str, dict[int, int]] = {}
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
        now = time.time()
        for msg in msgs:
            self._count(msg, now)
            self.add(msg)
        if msgs:
            self._forget_checked(now)
        return len(msgs)

    def _count(self, msg: Message, now: float) -> None:
        """Count a record read (valid or not: what the Validator checks) in the wall-clock second it
        was written (its timestamp; none: now), unless that is longer ago than `checked_window_s`."""
        kind, ms = msg.timestamp()
        second = int(now) if kind == TIMESTAMP_NOT_AVAILABLE or ms < 0 else min(ms // 1000, int(now))
        if second > now - self.checked_window_s:
            topic = msg.topic() or ""
            per_second = self._checked.setdefault(topic, {})
            per_second[second] = per_second.get(second, 0) + 1

    def _forget_checked(self, now: float) -> None:
        """Drop counts that left the window before anyone took them (bounded memory)."""
        for topic, per_second in list(self._checked.items()):
            if len(per_second) > 2 * self.checked_window_s:
                kept = {s: n for s, n in per_second.items() if s > now - self.checked_window_s}
                self._checked[topic] = kept

    def take_checked(self) -> dict[str, dict[int, int]]:
        """Records read since the last call, per topic and wall-clock second written (only those
        written within `checked_window_s` of being read): the manager reports them to the topic's
        policy as messages checked, the denominator of `acceptable_error_rate`."""
        out, self._checked = self._checked, {}
        return out

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
