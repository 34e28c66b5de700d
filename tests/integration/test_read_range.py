"""`kafka_io.read_range` on Apache Kafka: what a faust agent reads back after faust dropped records
(`ProvenanceAgents._missed`). Offsets without a record (transaction markers) are skipped; aborted
records are read only with read_uncommitted; a tombstone is returned as it is; the end is exclusive."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import Producer
from kafka_support import Record, produce

from streamprov.agents.faust_agents import read_back_record
from streamprov.agents.kafka_io import read_range
from streamprov.errors import StreamprovError

pytestmark = pytest.mark.kafka


def _transaction(bootstrap: str, topic: str, values: list[bytes], *, commit: bool) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"sp-read-range-{topic}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for v in values:
        producer.produce(topic, v, b"k", partition=0)
    producer.flush(30)
    if commit:
        producer.commit_transaction(30)
    else:
        producer.abort_transaction(30)


def test_a_range_is_read_with_its_gaps_tombstones_and_isolation(kafka_bootstrap: str, new_topic: Any) -> None:
    topic = new_topic(1, prefix="read-range")
    settings = {"bootstrap.servers": kafka_bootstrap}
    produce(
        kafka_bootstrap, topic, [Record(b"a", b"k", [("h", b"1")], 0), Record(None, b"gone", partition=0)]
    )
    _transaction(kafka_bootstrap, topic, [b"t1", b"t2"], commit=True)  # offsets 2, 3; marker at 4
    _transaction(kafka_bootstrap, topic, [b"x1"], commit=False)  # offset 5, aborted; marker at 6
    produce(kafka_bootstrap, topic, [Record(b"z", b"k", partition=0)])  # offset 7

    committed = read_range(settings, topic, 0, 0, 8, isolation_level="read_committed", timeout_s=30)
    assert [(m.offset(), m.value()) for m in committed] == [
        (0, b"a"),
        (1, None),  # the tombstone, as it is
        (2, b"t1"),
        (3, b"t2"),
        (7, b"z"),  # no record at the markers (4, 6); the aborted one is not read committed
    ]
    uncommitted = read_range(settings, topic, 0, 2, 7, timeout_s=30)  # the end is exclusive
    assert [m.value() for m in uncommitted] == [b"t1", b"t2", b"x1"]
    assert read_range(settings, topic, 0, 8, 20, timeout_s=30) == []  # past the end: nothing, at once

    record, ts = read_back_record(committed[0])
    assert (record.value, record.key, record.topic, record.partition, record.offset) == (
        b"a",
        b"k",
        topic,
        0,
        0,
    )
    assert record.headers == [("h", b"1")] and ts is not None and ts > 0


def test_a_range_that_cannot_be_read_is_an_error_after_the_timeout(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    """A partition that does not exist: librdkafka reports nothing the reader could act on, so it
    waits out its timeout and says how far it got (the agent then logs the offsets as unprocessed)."""
    topic = new_topic(1, prefix="read-range")
    with pytest.raises(StreamprovError, match=f"offsets 0 to 4 of {topic}/3 were not read within 2 s"):
        read_range({"bootstrap.servers": kafka_bootstrap}, topic, 3, 0, 5, timeout_s=2)
