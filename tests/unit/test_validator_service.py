"""The Validator's delivery logic with stand-in clients: offsets are committed only after every alert
is acknowledged, a failed delivery rewinds to the committed offsets (and gives up after too many),
rebalance events are applied outside the callbacks, and a batch's alerts and dead letters are sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, KafkaError, TopicPartition

from validator.alerts import Alert, AlertKind
from validator.checks import TopicPolicy
from validator.errors import ValidatorConfigError, ValidatorError
from validator.service import Validator
from validator.settings import ServiceSettings

TP = tuple[str, int]


@dataclass
class FakeProducer:
    produced: list[tuple[str, bytes | None, bytes | None, Any]] = field(default_factory=list)
    pending: int = 0

    def produce(self, topic: str, value: bytes | None, key: bytes | None, **kw: Any) -> None:
        self.produced.append((topic, key, value, kw.get("headers")))

    def flush(self, _timeout: float | None = None) -> int:
        return self.pending

    def poll(self, _timeout: float = 0) -> int:
        return 0


@dataclass
class FakeConsumer:
    assigned: list[TP] = field(default_factory=list)
    positions: dict[TP, int] = field(default_factory=dict)
    commits: list[list[tuple[str, int, int]]] = field(default_factory=list)
    seeks: list[tuple[str, int, int]] = field(default_factory=list)
    stored: dict[TP, int] = field(default_factory=dict)

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in self.assigned]

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [
            TopicPartition(
                tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), OFFSET_INVALID)
            )
            for tp in tps
        ]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> list[TopicPartition]:
        assert asynchronous is False
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])
        return [TopicPartition(tp.topic, tp.partition, tp.offset) for tp in offsets]

    def committed(self, tps: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        return [
            TopicPartition(tp.topic, tp.partition, self.stored.get((tp.topic, tp.partition), OFFSET_INVALID))
            for tp in tps
        ]

    def seek(self, tp: TopicPartition) -> None:
        self.seeks.append((tp.topic, tp.partition, tp.offset))

    def get_watermark_offsets(self, _tp: TopicPartition, cached: bool = False) -> tuple[int, int]:
        return 0, 100

    def close(self) -> None:
        pass


@pytest.fixture
def validator(tmp_path: Path) -> Any:
    settings = ServiceSettings(
        kafka={"bootstrap.servers": "127.0.0.1:9", "socket.connection.setup.timeout.ms": 1000},
        topics=("out",),
        alerts_topic="alerts",
        dead_letter_topic="dlq",
        state_dir=tmp_path,
        flush_timeout_s=0.1,
        operation_timeout_s=0.5,
    )
    v = Validator(settings, max_consecutive_failures=2)
    v._consumer.close()  # the real clients never connect: stand-ins take their place
    v._producer.flush(0)
    v._consumer, v._producer = FakeConsumer(), FakeProducer()  # type: ignore[assignment]
    yield v
    v.close()


def test_commit_waits_for_every_acknowledgement(validator: Any) -> None:
    consumer, producer = validator._consumer, validator._producer
    consumer.assigned = [("out", 0), ("out", 1)]
    consumer.positions = {("out", 0): 10}  # partition 1: nothing consumed yet (invalid position)
    validator._dirty = True
    producer.pending = 3
    assert validator._ship(0.1) is False and consumer.commits == []
    producer.pending = 0
    assert validator._ship(0.1) is True
    assert consumer.commits == [[("out", 0, 10)]] and validator._committed == {("out", 0): 10}
    assert validator._dirty is False and validator.stats.commits == 1
    assert validator._ship(0.1) is True and len(consumer.commits) == 1  # nothing new: no commit


def test_a_failed_delivery_rewinds_to_the_committed_offsets_then_gives_up(validator: Any) -> None:
    consumer = validator._consumer
    validator._assigned = {("out", 0), ("out", 1)}
    validator._committed = {("out", 0): 10}
    consumer.stored = {}  # partition 1 never committed: from the beginning
    consumer.positions = {("out", 0): 50, ("out", 1): 7}
    validator._on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
    assert validator._ship(0.1) is False
    assert consumer.commits == [] and sorted(consumer.seeks) == [("out", 0, 10), ("out", 1, OFFSET_BEGINNING)]
    assert validator.stats.rewinds == 1 and validator._failed == []
    validator._on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
    validator._ship(0.1)
    validator._on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
    with pytest.raises(ValidatorError, match="3 times in a row"):
        validator._ship(0.1)


def test_a_successful_ship_resets_the_failure_count(validator: Any) -> None:
    validator._on_delivery(KafkaError(KafkaError._MSG_TIMED_OUT), None)
    validator._ship(0.1)
    assert validator._failures == 1
    validator._ship(0.1)
    assert validator._failures == 0


def test_rebalance_events_are_applied_after_consume(validator: Any) -> None:
    events = validator._rebalance
    events.on_assign(None, [TopicPartition("out", 0), TopicPartition("out", 1)])
    assert validator.ready() == (False, "the source view is catching up")
    validator.state.set_not_ready("no partitions assigned")  # as start() leaves it once caught up
    assert validator.ready()[0] is False  # recorded, not applied yet
    validator._apply_rebalance()
    assert validator.ready() == (True, "assigned and caught up")
    validator._committed = {("out", 0): 5, ("out", 1): 6}
    events.on_revoke(None, [TopicPartition("out", 0)])
    validator._apply_rebalance()
    assert validator._assigned == {("out", 1)} and validator._committed == {("out", 1): 6}
    events.on_lost(None, [TopicPartition("out", 1)])
    validator._apply_rebalance()
    assert validator.ready()[0] is False


@dataclass
class Msg:
    v: bytes | None
    h: Any
    o: int = 0

    def value(self) -> bytes | None:
        return self.v

    def key(self) -> bytes:
        return b"k"

    def headers(self) -> Any:
        return self.h

    def topic(self) -> str:
        return "out"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.o

    def error(self) -> None:
        return None


def test_a_batch_sends_its_alerts_and_dead_letters(validator: Any) -> None:
    validator._process([Msg(b"garbage", None, o=4)])
    producer = validator._producer
    assert [p[0] for p in producer.produced] == ["alerts", "dlq"]
    alert = Alert.decode(producer.produced[0][2])
    assert alert.kind is AlertKind.MALFORMED and alert.offset == 4 and producer.produced[0][1] == b"k"
    assert producer.produced[1][1:3] == (b"k", b"garbage")
    stats = validator.stats
    assert (stats.checked, stats.alerts, stats.dead_letters, stats.alerts_by_kind["malformed"]) == (
        1,
        1,
        1,
        1,
    )
    assert validator._dirty is True and stats.first_batch_done is not None
    metrics = validator.metrics.render()
    assert 'streamprov_validator_alerts_total{kind="malformed",topic="out"} 1' in metrics


def test_liveness_and_registry_requirements(validator: Any, tmp_path: Path) -> None:
    assert validator.alive() == (True, "alive")
    validator.state.started = True
    validator.state._heartbeat -= 10_000
    assert validator.alive()[0] is False
    settings = ServiceSettings(
        kafka={},
        topics=("out",),
        alerts_topic="a",
        dead_letter_topic="d",
        state_dir=tmp_path / "other",
        policies={"out": TopicPolicy(rederive_rate=0.1)},
    )
    with pytest.raises(ValidatorConfigError, match="no function registry"):
        Validator(settings)
