"""Confidence/age keys of the priority sub-stream; the priority consumer's errors without a broker."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer

from recompute_manager import priority as priority_module
from recompute_manager.priority import Confidence, PriorityConsumer, PriorityKey, PriorityPublisher
from streamprov.agents.processor import ProcessorError


def test_age_buckets_and_partitions() -> None:
    assert PriorityKey.of(Confidence.LOW, 0).age_bucket == 0
    assert PriorityKey.of(Confidence.LOW, 60_000).age_bucket == 1
    assert PriorityKey.of(Confidence.HIGH, 10**12).age_bucket == 3
    assert PriorityKey.of(Confidence.LOW, 0).partition(8) == 0  # most urgent on partition 0
    assert PriorityKey.of(Confidence.MEDIUM, 0).partition(8) == 4
    assert PriorityKey.of(Confidence.HIGH, 0).partition(8) == 0  # rank 8 wraps
    assert PriorityKey.of(Confidence.LOW, 5, (10, 20)).rank(3) == 0
    assert PriorityKey.of(Confidence.MEDIUM, 15, (10, 20)).text() == "confidence=medium;age_bucket=1"
    with pytest.raises(ValueError):
        PriorityKey.of(Confidence.LOW, 0).partition(0)


class _TrackingConsumer(Consumer):
    """The real client, remembering whether `close` was called."""

    instances: ClassVar[list[_TrackingConsumer]] = []

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.closed = False
        _TrackingConsumer.instances.append(self)

    def close(self) -> None:
        self.closed = True
        super().close()


def test_consumer_on_the_same_topic_twice_is_refused_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(priority_module, "Consumer", _TrackingConsumer)
    _TrackingConsumer.instances.clear()
    with pytest.raises(ProcessorError, match=r"both 'orders'.*priority_topic_name"):
        PriorityConsumer({"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}, "orders", "orders")
    assert all(c.closed for c in _TrackingConsumer.instances)


def test_consumer_without_a_broker_raises_a_typed_error_and_closes_its_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(priority_module, "Consumer", _TrackingConsumer)
    _TrackingConsumer.instances.clear()
    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g"}
    with pytest.raises(ProcessorError) as info:
        PriorityConsumer(config, "orders", "orders.priority", timeout_s=1.0)
    assert "127.0.0.1:1" in str(info.value)
    assert "check bootstrap.servers" in str(info.value)
    assert len(_TrackingConsumer.instances) == 1
    assert _TrackingConsumer.instances[0].closed


def test_publisher_without_a_broker_names_the_brokers_and_what_to_check() -> None:
    with pytest.raises(ProcessorError) as info:
        PriorityPublisher({"bootstrap.servers": "127.0.0.1:1"}, "tx-unreachable", timeout_s=1.0)
    assert "the brokers at '127.0.0.1:1' did not answer within 1 s" in str(info.value)
    assert "check kafka.bootstrap_servers" in str(info.value)
