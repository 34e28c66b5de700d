"""The priority sub-stream: corrected records published exactly once, and a consumer that drains it first.

Publishing: `PriorityPublisher` writes recomputed records to the topic's priority topic
(`TopicSettings.priority_topic_name`) with a transactional producer: a batch (one plan's results, and
optionally the consumed task offsets) commits as a whole or not at all. The partition is chosen by a
confidence/age key (`PriorityKey`): records of one confidence level and age bucket share a
partition, so a consumer can read the freshest, least confident corrections first or separately. The
Kafka key stays the DataID, and the key's text rides in a header (`streamprov.priority`).

Consuming: `PriorityConsumer` reads a regular topic and its priority topic together. While the
priority topic has records waiting (its high watermark is past what was delivered), the regular
partitions are paused and any regular records already fetched are held back; they are delivered
once the priority stream is drained.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Producer, TopicPartition

from recompute_manager.executor import Recomputed
from streamprov.agents.kafka_io import list_all_topics
from streamprov.agents.processor import FatalProcessorError, FencedError, ProcessorError
from streamprov.header import now_ms
from streamprov.signing import Signer, signed_headers

__all__ = [
    "DEFAULT_AGE_BUCKETS_MS",
    "PRIORITY_HEADER",
    "Confidence",
    "PlainRecord",
    "PriorityConsumer",
    "PriorityKey",
    "PriorityPublisher",
    "PriorityRecord",
]

log = logging.getLogger(__name__)

PRIORITY_HEADER = "streamprov.priority"
DEFAULT_AGE_BUCKETS_MS: tuple[int, ...] = (60_000, 3_600_000, 86_400_000)
"""Bucket bounds: < 1 min, < 1 h, < 1 day, older."""


class Confidence(enum.IntEnum):
    """How much to trust a record; a fresh recompute is LOW until the Validator confirms it."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2


@dataclass(frozen=True, slots=True)
class PriorityKey:
    confidence: Confidence
    age_bucket: int

    @classmethod
    def of(
        cls, confidence: Confidence, age_ms: int, buckets_ms: Sequence[int] = DEFAULT_AGE_BUCKETS_MS
    ) -> PriorityKey:
        bucket = next((i for i, bound in enumerate(buckets_ms) if age_ms < bound), len(buckets_ms))
        return cls(confidence, bucket)

    def rank(self, buckets: int = len(DEFAULT_AGE_BUCKETS_MS) + 1) -> int:
        """0 = most urgent (lowest confidence, freshest)."""
        return int(self.confidence) * buckets + self.age_bucket

    def partition(self, partitions: int, buckets: int = len(DEFAULT_AGE_BUCKETS_MS) + 1) -> int:
        """The partition for this key: urgency ranks spread over the partitions, most urgent on 0."""
        if partitions <= 0:
            raise ValueError("a topic has at least one partition")
        return self.rank(buckets) % partitions

    def text(self) -> str:
        return f"confidence={self.confidence.name.lower()};age_bucket={self.age_bucket}"


@dataclass(frozen=True, slots=True)
class PriorityRecord:
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    priority: PriorityKey

    @classmethod
    def of(
        cls,
        result: Recomputed,
        *,
        confidence: Confidence = Confidence.LOW,
        age_ms: int | None = None,
        buckets_ms: Sequence[int] = DEFAULT_AGE_BUCKETS_MS,
        signer: Signer | None = None,
    ) -> PriorityRecord:
        """A recomputed result; its age defaults to the time since its task was planned.

        `signer`: sign the recomputed provenance header (`streamprov.sig`, as the topic's stampers do:
        `KeyRing.signer_for(config.topic(result.task.topic))`), so a Validator requiring signatures
        accepts the correction.
        """
        age = max(0, now_ms() - result.task.created_at_ms) if age_ms is None else age_ms
        headers = result.headers()
        if signer is not None:
            headers = [(k, v) for k, v in signed_headers(result.header, signer, headers) if v is not None]
        return cls(
            result.task.key,
            result.value,
            tuple(headers),
            PriorityKey.of(confidence, age, buckets_ms),
        )


@dataclass(frozen=True, slots=True)
class PlainRecord:
    """A record to publish in a priority transaction to a topic of its own (default partitioner)."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes | None], ...] = ()


class PriorityPublisher:
    """Transactional producer to priority topics. One per worker (its own `transactional_id`)."""

    def __init__(
        self,
        config: Mapping[str, Any],
        transactional_id: str,
        *,
        timeout_s: float = 30.0,
        buckets: int = len(DEFAULT_AGE_BUCKETS_MS) + 1,
    ) -> None:
        settings = dict(config)
        settings.update({"transactional.id": transactional_id, "enable.idempotence": True, "acks": "all"})
        settings.setdefault("linger.ms", 5)
        self.timeout_s = timeout_s
        self.buckets = buckets
        self._producer = Producer(settings)
        self._closed = False
        self._partitions: dict[str, int] = {}
        self._errors: list[KafkaError] = []
        try:
            self._call(self._producer.init_transactions, timeout_s)
        except ProcessorError as exc:
            self._closed = True  # nothing was produced: nothing to flush
            if exc.code != KafkaError._TIMED_OUT:
                raise
            # librdkafka's "retry call to resume" tells an operator nothing about the likely cause.
            raise ProcessorError(
                f"the brokers at {settings.get('bootstrap.servers')!r} did not answer within {timeout_s:g} s "
                f"(initialising transactional producer {transactional_id!r}: {exc}): check "
                "kafka.bootstrap_servers, that Kafka is running and reachable, and that its transaction "
                "state topic is available",
                exc.kafka_error,
            ) from exc

    def _call(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except KafkaException as exc:
            err: KafkaError = exc.args[0]
            if err.code() == KafkaError._FENCED or err.code() == KafkaError.PRODUCER_FENCED:
                raise FencedError(f"producer fenced: {err.str()}", err) from exc
            if err.fatal():
                raise FatalProcessorError(f"fatal producer error: {err.str()}", err) from exc
            raise ProcessorError(f"producer error: {err.str()}", err) from exc

    def partitions(self, topic: str) -> int:
        n = self._partitions.get(topic)
        if n is None:
            # all topics: a metadata request naming a topic creates it on a broker that auto-creates
            meta = list_all_topics(self._producer, self.timeout_s).get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                raise ProcessorError(f"priority topic {topic!r} does not exist")
            n = self._partitions[topic] = len(meta.partitions)
        return n

    def _on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:  # record only; act outside the callback
            self._errors.append(err)

    def publish(
        self,
        topic: str,
        records: Iterable[PriorityRecord],
        *,
        consumer: Consumer | None = None,
        offsets: Sequence[TopicPartition] | None = None,
    ) -> int:
        """Publish `records` (and commit `offsets` for `consumer`'s group) in one transaction.

        Aborts and raises `ProcessorError` when anything fails; nothing of the batch is visible then.
        """
        return self.publish_all(((topic, r) for r in records), consumer=consumer, offsets=offsets)

    def publish_all(
        self,
        items: Iterable[tuple[str, PriorityRecord]],
        *,
        consumer: Consumer | None = None,
        offsets: Sequence[TopicPartition] | None = None,
        plain: Iterable[PlainRecord] = (),
    ) -> int:
        """`publish` for records bound to several priority topics: (topic, record) pairs, one
        transaction (a plan over a multi-step pipeline corrects records of several topics). `plain`
        records (progress reports, dead letters) join the transaction, partitioned by key."""
        batch = list(items)
        extra = list(plain)
        partitions = {topic: self.partitions(topic) for topic in dict.fromkeys(t for t, _ in batch)}
        self._errors.clear()
        self._call(self._producer.begin_transaction)
        try:
            for topic, r in batch:
                headers: list[tuple[str, str | bytes | None]] = [
                    *r.headers,
                    (PRIORITY_HEADER, r.priority.text().encode("ascii")),
                ]
                self._producer.produce(
                    topic,
                    r.value,
                    r.key,
                    partition=r.priority.partition(partitions[topic], self.buckets),
                    headers=headers,
                    on_delivery=self._on_delivery,
                )
                self._producer.poll(0)
            for p in extra:
                self._producer.produce(
                    p.topic, p.value, p.key, headers=list(p.headers), on_delivery=self._on_delivery
                )
                self._producer.poll(0)
            if consumer is not None and offsets:
                self._call(
                    self._producer.send_offsets_to_transaction,
                    list(offsets),
                    consumer.consumer_group_metadata(),
                    self.timeout_s,
                )
            self._call(self._producer.flush, self.timeout_s)
            if self._errors:
                raise ProcessorError(f"delivery failed: {self._errors[0].str()}", self._errors[0])
            self._call(self._producer.commit_transaction, self.timeout_s)
        except FencedError:
            raise
        except BaseException:
            try:
                self._producer.abort_transaction(self.timeout_s)
            except KafkaException as exc:  # the original error matters more
                log.warning("abort_transaction failed: %s", exc)
            raise
        return len(batch)

    def close(self) -> None:
        """Flush what is queued, then release the client (its threads, connections and transactional
        id) now rather than at garbage collection; idempotent. A transaction still open is aborted
        (its records are replayed from the committed offsets)."""
        if self._closed:
            return
        self._closed = True
        self._producer.flush(self.timeout_s)
        close = getattr(self._producer, "close", None)  # not in every confluent-kafka 2.x
        if close is not None:
            close()


class PriorityConsumer:
    """Reads `regular` and `priority` topics; delivers priority records first (see module docs).

    Manual assignment of every partition of both topics from the group's committed offsets (else the
    beginning); `commit()` commits what was delivered. Not thread-safe.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        regular: str,
        priority: str,
        *,
        timeout_s: float = 10.0,
        refresh_s: float = 0.5,
    ) -> None:
        """Raises `ProcessorError` when a topic is missing, the two topics are the same, or the brokers
        do not answer within `timeout_s`; the consumer it created is closed then."""
        if regular == priority:
            raise ProcessorError(
                f"the regular and the priority topic are both {regular!r}: pass the topic's priority "
                "topic (TopicSettings.priority_topic_name) as `priority`"
            )
        settings = dict(config)
        settings.setdefault("enable.auto.commit", False)
        settings.setdefault("isolation.level", "read_committed")
        settings.setdefault("auto.offset.reset", "earliest")
        # Watermark queries queue behind an open long-poll fetch (500 ms by default), as in TopicReader.
        settings.setdefault("fetch.wait.max.ms", 50)
        self.regular, self.priority = regular, priority
        self.timeout_s, self.refresh_s = timeout_s, refresh_s
        self._consumer = Consumer(settings)
        self._next: dict[tuple[str, int], int] = {}
        self._high: dict[int, int] = {}
        self._refreshed = 0.0
        self._held: deque[Any] = deque()
        self._paused = False
        try:
            self._regular_tps = self._all(regular)
            self._priority_tps = self._all(priority)
            starts = self._consumer.committed(self._regular_tps + self._priority_tps, timeout=timeout_s)
            assigned = [
                TopicPartition(t.topic, t.partition, t.offset if t.offset >= 0 else OFFSET_BEGINNING)
                for t in starts
            ]
            self._next = {(t.topic, t.partition): max(t.offset, 0) for t in starts}
            self._consumer.assign(assigned)
            self._refresh(force=True)
            if self.priority_waiting():
                self._pause()
        except KafkaException as exc:
            self._consumer.close()
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            raise ProcessorError(
                f"cannot read {regular!r} and {priority!r} from the brokers at "
                f"{settings.get('bootstrap.servers')!r}: {err.str() if err else exc}; check "
                "bootstrap.servers and that "
                "the brokers are up and reachable",
                err,
            ) from exc
        except BaseException:
            self._consumer.close()
            raise

    def _all(self, topic: str) -> list[TopicPartition]:
        meta = self._consumer.list_topics(topic, timeout=self.timeout_s).topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            raise ProcessorError(f"topic {topic!r} does not exist")
        return [TopicPartition(topic, p) for p in sorted(meta.partitions)]

    def _refresh(self, *, force: bool = False) -> None:
        """Query the priority high watermarks, at most every `refresh_s` unless forced: each query
        costs a broker round trip, so querying on every poll while caught up slowed `poll` to
        seconds."""
        now = time.monotonic()
        if not force and now - self._refreshed < self.refresh_s:
            return
        for tp in self._priority_tps:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=self.timeout_s, cached=False)
            self._high[tp.partition] = high
            key = (tp.topic, tp.partition)
            self._next[key] = max(self._next.get(key, 0), low)
        self._refreshed = now

    def _caught_up_to_cached(self) -> bool:
        return not any(
            self._high.get(tp.partition, 0) > self._next[(tp.topic, tp.partition)]
            for tp in self._priority_tps
        )

    def priority_waiting(self) -> bool:
        """Records on the priority topic not yet delivered (as of the last watermark refresh).

        With read_committed, aborted records and transaction markers count until consumed past, so
        this errs on the side of draining the priority stream.
        """
        return not self._caught_up_to_cached()

    def _pause(self) -> None:
        if not self._paused:
            self._consumer.pause(self._regular_tps)
            self._paused = True

    def _resume(self) -> None:
        if self._paused:
            self._consumer.resume(self._regular_tps)
            self._paused = False

    def poll(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Any]:
        """Up to `max_records` messages: priority ones first; regular ones only when none is waiting."""
        self._refresh()
        out: list[Any] = []
        for msg in self._consumer.consume(max_records, timeout_s):
            err = msg.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error: %s", err.str())
                continue
            if msg.topic() == self.priority:
                out.append(msg)
                self._delivered(msg)
            else:
                self._held.append(msg)
        if out and self._caught_up_to_cached():
            self._refresh(force=True)  # more may have arrived meanwhile
        # Transaction markers occupy offsets: a caught-up position can sit one past the last record.
        for tp in self._priority_tps:
            pos = self._consumer.position([tp])[0].offset
            if pos >= 0:
                key = (tp.topic, tp.partition)
                self._next[key] = max(self._next[key], pos)
        if self.priority_waiting():
            self._pause()
            return out
        self._resume()
        while self._held and len(out) < max_records:
            msg = self._held.popleft()
            out.append(msg)
            self._delivered(msg)
        return out

    def _delivered(self, msg: Any) -> None:
        self._next[(msg.topic(), msg.partition())] = msg.offset() + 1

    def commit(self) -> None:
        """Commit the delivered positions of every partition (synchronously)."""
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._next.items() if o > 0]
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=False)

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> PriorityConsumer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
