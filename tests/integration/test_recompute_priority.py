"""Priority sub-stream on a real broker: transactional publishing by confidence/age partition, and a
consumer that delivers priority records ahead of a regular backlog."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka import Consumer
from kafka_support import FAST_GROUP_CONFIG, Record, create_topic, delete_topics, produce

from recompute_manager.priority import (
    PRIORITY_HEADER,
    Confidence,
    PriorityConsumer,
    PriorityKey,
    PriorityPublisher,
    PriorityRecord,
)
from streamprov.agents.processor import ProcessorError
from streamprov.config.models import TopicSettings

pytestmark = pytest.mark.kafka


def _record(i: int, confidence: Confidence, age_ms: int) -> PriorityRecord:
    return PriorityRecord(
        f"d{i}".encode(), f"fixed-{i}".encode(), (("x", b"1"),), PriorityKey.of(confidence, age_ms)
    )


def test_priority_records_delivered_before_regular_backlog(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique_group: Callable[..., str]
) -> None:
    regular = new_topic(2)
    priority = TopicSettings().priority_topic_name(regular)
    create_topic(kafka_bootstrap, priority, partitions=4)
    try:
        produce(kafka_bootstrap, regular, [Record(f"r{i}".encode(), f"k{i}".encode()) for i in range(400)])
        pub = PriorityPublisher({"bootstrap.servers": kafka_bootstrap}, f"tx-{regular}")
        recs = [_record(i, Confidence(i % 3), (i % 5) * 1_000_000) for i in range(30)]
        assert pub.publish(priority, recs) == 30
        pub.close()

        config = {"bootstrap.servers": kafka_bootstrap, "group.id": unique_group(), **FAST_GROUP_CONFIG}
        got: list[tuple[str, bytes]] = []
        with PriorityConsumer(config, regular, priority) as pc:
            deadline = time.monotonic() + 60
            while len(got) < 430 and time.monotonic() < deadline:
                for m in pc.poll(50, 0.5):
                    got.append((m.topic(), m.value()))
                    if m.topic() == priority:
                        headers = dict(m.headers() or [])
                        key = PriorityKey.of(Confidence.LOW, 0)  # only to check the header's shape
                        assert headers[PRIORITY_HEADER].startswith(b"confidence=")
                        assert key.text().startswith("confidence=low")
            pc.commit()
        topics = [t for t, _ in got]
        assert len(got) == 430
        assert topics[:30] == [priority] * 30, topics[:40]
        assert topics[30:] == [regular] * 400
    finally:
        delete_topics(kafka_bootstrap, [priority])


def test_partition_by_confidence_age_and_exactly_once(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique_group: Callable[..., str]
) -> None:
    topic = new_topic(3)
    pub = PriorityPublisher({"bootstrap.servers": kafka_bootstrap}, f"tx-{topic}", buckets=4)
    recs = [_record(i, Confidence(i % 3), (i % 4) * 2_000_000) for i in range(24)]
    pub.publish(topic, recs)

    class BoomError(Exception):
        pass

    def failing() -> Iterator[PriorityRecord]:
        yield _record(100, Confidence.LOW, 0)
        raise BoomError

    with pytest.raises(BoomError):  # the batch is built before the transaction: nothing is written
        pub.publish(topic, failing())
    with pytest.raises(ProcessorError):
        pub.publish("no-such-topic-" + topic, recs)
    pub.close()

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": unique_group(),
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            **FAST_GROUP_CONFIG,
        }
    )
    consumer.subscribe([topic])
    seen = []
    deadline = time.monotonic() + 30
    while len(seen) < 24 and time.monotonic() < deadline:
        for m in consumer.consume(50, 0.5):
            if m.error() is None:
                seen.append(m)
    consumer.close()
    assert len(seen) == 24
    for m in seen:
        i = int(m.key()[1:])
        expected = PriorityKey.of(Confidence(i % 3), (i % 4) * 2_000_000).partition(3, 4)
        assert m.partition() == expected


def test_empty_priority_topic_does_not_slow_the_regular_backlog(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique_group: Callable[..., str]
) -> None:
    """Each poll used to query every priority watermark behind a 500 ms long-poll fetch (about 2 s per
    poll with 4 priority partitions): 20 polls took 40 s. Now they take well under a second."""
    regular = new_topic(2)
    priority = TopicSettings().priority_topic_name(regular)
    create_topic(kafka_bootstrap, priority, partitions=4)
    try:
        produce(kafka_bootstrap, regular, [Record(f"r{i}".encode(), f"k{i}".encode()) for i in range(5000)])
        config = {"bootstrap.servers": kafka_bootstrap, "group.id": unique_group(), **FAST_GROUP_CONFIG}
        with PriorityConsumer(config, regular, priority) as pc:
            got, polls = 0, 0
            start = time.monotonic()
            while got < 5000 and time.monotonic() - start < 60:
                got += len(pc.poll(250, 0.5))
                polls += 1
            elapsed = time.monotonic() - start
        assert got == 5000
        assert polls >= 20  # at most 250 a poll
        assert elapsed < 10.0, f"{polls} polls took {elapsed:.1f} s"
    finally:
        delete_topics(kafka_bootstrap, [priority])


def test_priority_records_published_mid_backlog_jump_the_queue(
    kafka_bootstrap: str, new_topic: Callable[..., str], unique_group: Callable[..., str]
) -> None:
    """Watermarks are refreshed every `refresh_s` while caught up: corrections that arrive while a
    backlog is being read are delivered together, ahead of the rest of the backlog."""
    regular = new_topic(1)
    priority = TopicSettings().priority_topic_name(regular)
    create_topic(kafka_bootstrap, priority, partitions=2)
    try:
        produce(kafka_bootstrap, regular, [Record(f"r{i}".encode(), f"k{i}".encode()) for i in range(6000)])
        config = {"bootstrap.servers": kafka_bootstrap, "group.id": unique_group(), **FAST_GROUP_CONFIG}
        topics: list[str] = []
        with PriorityConsumer(config, regular, priority, refresh_s=0.2) as pc:
            while len(topics) < 500:
                topics += [m.topic() for m in pc.poll(100, 0.5)]
            pub = PriorityPublisher({"bootstrap.servers": kafka_bootstrap}, f"tx-{regular}")
            pub.publish(priority, [_record(i, Confidence(i % 3), 0) for i in range(10)])
            pub.close()
            deadline = time.monotonic() + 60
            while len(topics) < 6010 and time.monotonic() < deadline:
                topics += [m.topic() for m in pc.poll(100, 0.5)]
                time.sleep(0.02)  # a consumer doing work: the backlog lasts about 1.2 s more
        assert len(topics) == 6010
        first = topics.index(priority)
        assert topics[first : first + 10] == [priority] * 10  # together
        assert topics.count(regular) - topics[:first].count(regular) > 0, "delivered after the backlog"
    finally:
        delete_topics(kafka_bootstrap, [priority])


def test_missing_topic_closes_the_consumer(
    kafka_bootstrap: str,
    new_topic: Callable[..., str],
    unique_group: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[bool] = []

    class Tracking(Consumer):
        def close(self) -> None:
            closed.append(True)
            super().close()

    monkeypatch.setattr("recompute_manager.priority.Consumer", Tracking)
    regular = new_topic(1)
    config = {"bootstrap.servers": kafka_bootstrap, "group.id": unique_group()}
    with pytest.raises(ProcessorError, match="does not exist"):
        PriorityConsumer(config, regular, TopicSettings().priority_topic_name(regular), timeout_s=5)
    assert closed == [True]
