"""Small confluent-kafka pieces every streamprov consume-produce loop needs, shared by the processor
(`streamprov.agents.processor`) and the Validator (`validator.service`).

They encode lessons the loops must not relearn one by one:

* `kafka_error`: confluent-kafka raises `KafkaException` whose first argument is usually, not always,
  a `KafkaError`; callers want the error (its code, `fatal()`, `retriable()`) either way.
* `RebalanceEvents`: librdkafka calls the rebalance callbacks from inside `consume()`; doing work
  there (commits, seeks, produce) is how loops hang (confluent-kafka-python #457). The callbacks only
  record what changed; the loop acts on it after `consume()` returns.
* `produce_blocking`: `Producer.produce` raises `BufferError` when its local queue is full; the fix is
  to serve delivery reports (`poll`) and try again, for a bounded time, never to drop the record.
* `seek_retrying`: a seek right after an assignment can fail while the partition's fetcher starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

log = logging.getLogger(__name__)

TopicPartitionKey = tuple[str, int]
RebalanceKind = Literal["assign", "revoke"]

FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.FENCED_INSTANCE_ID,
    }
)
"""Error codes meaning a newer instance (same transactional.id or group.instance.id) took over."""


def kafka_error(exc: KafkaException) -> KafkaError:
    """The `KafkaError` inside a `KafkaException` (a generic `_FAIL` one when it carries none)."""
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else KafkaError(KafkaError._FAIL, str(exc))


def is_fenced(err: KafkaError) -> bool:
    return err.code() in FENCED_CODES


class RebalanceEvents:
    """Rebalance callbacks that only record: pass `on_assign`/`on_revoke`/`on_lost` to `subscribe`.

    The loop calls `drain()` after each `consume()` and applies the events in order. A lost
    assignment is recorded as a revocation: either way the partitions are no longer ours.
    """

    __slots__ = ("_events",)

    def __init__(self) -> None:
        self._events: list[tuple[RebalanceKind, list[TopicPartitionKey]]] = []

    def on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("assign", [(p.topic, p.partition) for p in partitions]))

    def on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._events.append(("revoke", [(p.topic, p.partition) for p in partitions]))

    on_lost = on_revoke

    @property
    def pending(self) -> bool:
        return bool(self._events)

    def drain(self) -> list[tuple[RebalanceKind, list[TopicPartitionKey]]]:
        events, self._events = self._events, []
        return events


def produce_blocking(
    producer: Producer,
    topic: str,
    value: bytes | None,
    key: bytes | None,
    *,
    headers: list[tuple[str, bytes | None]] | None = None,
    on_delivery: Callable[[KafkaError | None, Any], None] | None = None,
    timestamp_ms: int | None = None,
    timeout_s: float,
) -> bool:
    """`Producer.produce`, waiting (serving delivery reports) while the local queue is full.

    Returns False when the queue stayed full for `timeout_s`; the caller decides what that means
    (the record was not enqueued). Other errors (`KafkaException`) propagate.
    """
    kwargs: dict[str, Any] = {}
    if headers:
        kwargs["headers"] = headers
    if timestamp_ms is not None:
        kwargs["timestamp"] = timestamp_ms
    if on_delivery is not None:
        kwargs["on_delivery"] = on_delivery
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return True
        except BufferError:
            if time.monotonic() >= deadline:
                return False
            producer.poll(0.05)


def seek_retrying(consumer: Consumer, topic: str, partition: int, offset: int, timeout_s: float) -> None:
    """Seek, retrying for `timeout_s` while the partition's fetcher is still starting.

    Raises the last `KafkaException` when the seek keeps failing.
    """
    target = TopicPartition(topic, partition, offset)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            consumer.seek(target)
            return
        except KafkaException:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)
