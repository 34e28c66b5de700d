"""The brokers themselves: what streamprov relies on from Apache Kafka and from embedded Tansu.

These pin the broker features the rest of the suite builds on (headers survive a round trip,
transactions hide aborted records from read_committed consumers, consumer groups commit offsets),
so a broken broker setup fails here first, with a clear name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka_support import FAST_GROUP_CONFIG, Record, consume_all, produce, record_view

# Binary, empty and repeated header keys: provenance headers are Avro bytes, not text.
HEADERS_A = [("sp-prov", b"\x00\x01\xc3\x28\xff"), ("trace", b"00-abc-01"), ("empty", b"")]
HEADERS_B = [("dup", b"1"), ("dup", b"2"), ("sp-prov", bytes(range(256)))]


def _headers_round_trip(bootstrap: str, topic: str) -> None:
    records = [
        Record(key=f"k{i}".encode(), value=f"v{i}".encode(), headers=HEADERS_A if i % 2 else HEADERS_B)
        for i in range(20)
    ]
    produce(bootstrap, topic, records)
    got = consume_all(bootstrap, topic, expected=len(records), timeout_s=30.0, grace_s=0.5)
    assert len(got) == len(records)
    by_key = {msg.key(): record_view(msg) for msg in got}
    for record in records:
        assert by_key[record.key] == (record.key, record.value, record.headers)
    # per-key order is preserved within a partition
    for partition in {msg.partition() for msg in got}:
        offsets = [msg.offset() or 0 for msg in got if msg.partition() == partition]
        assert offsets == sorted(offsets)


def _group_commit_round_trip(bootstrap: str, topic: str, group: str) -> None:
    """Consume with a consumer group, commit, and check a second member resumes after it."""
    produce(bootstrap, topic, [f"m{i}".encode() for i in range(6)])
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
        **FAST_GROUP_CONFIG,
    }
    first = Consumer(config)
    try:
        first.subscribe([topic])
        seen: list[bytes] = []
        deadline = time.monotonic() + 45.0
        while len(seen) < 6 and time.monotonic() < deadline:
            msg = first.poll(0.5)
            if msg is not None and msg.error() is None:
                seen.append(msg.value() or b"")
        assert sorted(seen) == [f"m{i}".encode() for i in range(6)]
        first.commit(asynchronous=False)
        committed = first.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], 10.0)
        assert sum(tp.offset for tp in committed if tp.offset >= 0) == 6
    finally:
        first.close()

    produce(bootstrap, topic, [b"after-commit"])
    second = Consumer(config)
    try:
        second.subscribe([topic])
        later: list[bytes] = []
        deadline = time.monotonic() + 45.0
        while not later and time.monotonic() < deadline:
            msg = second.poll(0.5)
            if msg is not None and msg.error() is None:
                later.append(msg.value() or b"")
        assert later == [b"after-commit"]
    finally:
        second.close()


# -- Apache Kafka --------------------------------------------------------------------------------
@pytest.mark.kafka
def test_kafka_headers_round_trip(kafka_bootstrap: str, new_topic: Callable[..., str]) -> None:
    _headers_round_trip(kafka_bootstrap, new_topic(partitions=3))


@pytest.mark.kafka
def test_kafka_transactions_commit_visible_abort_invisible(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"sp-test-{topic}"})
    producer.init_transactions(30.0)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-1", headers=[("sp-prov", b"\x01")])
    producer.commit_transaction(30.0)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.flush(10.0)  # the aborted record really reaches the log before the abort
    producer.abort_transaction(30.0)
    producer.begin_transaction()
    producer.produce(topic, value=b"committed-2")
    producer.commit_transaction(30.0)

    committed = consume_all(kafka_bootstrap, topic, expected=2, timeout_s=30.0, grace_s=1.0)
    assert [m.value() for m in committed] == [b"committed-1", b"committed-2"]
    assert record_view(committed[0])[2] == [("sp-prov", b"\x01")]

    # The aborted record is in the log: only the isolation level hides it.
    everything = consume_all(kafka_bootstrap, topic, expected=3, timeout_s=30.0, isolation="read_uncommitted")
    assert [m.value() for m in everything] == [b"committed-1", b"aborted", b"committed-2"]


@pytest.mark.kafka
def test_kafka_open_transaction_is_invisible_until_commit(
    kafka_bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"sp-test-{topic}"})
    producer.init_transactions(30.0)
    producer.begin_transaction()
    producer.produce(topic, value=b"pending")
    producer.flush(10.0)
    assert consume_all(kafka_bootstrap, topic, expected=1, timeout_s=3.0) == []
    producer.commit_transaction(30.0)
    got = consume_all(kafka_bootstrap, topic, expected=1, timeout_s=30.0)
    assert [m.value() for m in got] == [b"pending"]


@pytest.mark.kafka
def test_kafka_consumer_group_commit(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique_group: Callable[..., str]
) -> None:
    _group_commit_round_trip(kafka_bootstrap, new_topic(partitions=2), unique_group())


# -- embedded Tansu ------------------------------------------------------------------------------
@pytest.mark.embedded
def test_embedded_headers_round_trip(embedded_bootstrap: str, new_embedded_topic: Callable[..., str]) -> None:
    _headers_round_trip(embedded_bootstrap, new_embedded_topic(partitions=3))


@pytest.mark.embedded
def test_embedded_consumer_group_commit(
    embedded_bootstrap: str,
    new_embedded_topic: Callable[..., str],
    unique_group: Callable[..., str],
) -> None:
    _group_commit_round_trip(embedded_bootstrap, new_embedded_topic(partitions=2), unique_group())
