"""The change detector across restarts on Apache Kafka: its read position is the consumer group's
committed offsets, its last checksum per DataID is local (RocksDB). A new detector in the same group
with an empty state dir (a replaced pod on an emptyDir, a partition that moved to another replica)
replays the sources up to the committed offsets silently to rebuild that state, then reports the next
change and deletion; a detector whose state is ahead of the committed offsets (it stopped after storing
a batch, before committing it) reports nothing twice; function changes already on the changes topic
are not reported again by a detector with a fresh state."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import Record, consume_all, produce
from ledger_pipeline import ledger_writer, produce_sources, run_step, value
from ledger_support import LEDGER
from test_validator import wait_until

from streamprov.changes import ChangeDetector, ChangeEvent, ChangeKind
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.ledger import Application, LedgerIndex
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader
from streamprov.producer import ProvenanceProducer

pytestmark = pytest.mark.kafka

COMPACTED = {"cleanup.policy": "compact"}


def crc(v: bytes) -> Any:
    return compute(ChecksumAlgorithm.CRC32C, v)


class RecordingWriter:
    """Stands in for the ledger writer: keeps what the detector appends."""

    def __init__(self) -> None:
        self.appended: list[Application] = []

    def append(self, app: Application, timeout_s: float | None = None) -> None:
        self.appended.append(app)

    def flush(self, timeout_s: float = 30.0) -> None:
        pass


@contextlib.contextmanager
def _detector(
    bootstrap: str, src: str, changes: str, ledger: str, group: str, state: Path, **kw: Any
) -> Iterator[ChangeDetector]:
    index = LedgerIndex(state / "index", LEDGER)  # the caller's: closed after the detector
    try:
        with ChangeDetector(
            {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
            group_id=group,
            source_topics=src,
            changes_topic=changes,
            index=index,
            ledger=KafkaLedgerReader(bootstrap, ledger, idle_timeout_s=20.0),
            state_dir=state / "sources",
            batch_size=7,  # several batches: replays and commits cross batch boundaries
            **kw,
        ) as detector:
            yield detector
    finally:
        index.close()


def _events(bootstrap: str, topic: str, expected: int) -> list[Any]:
    return consume_all(bootstrap, topic, expected=expected, timeout_s=30, grace_s=2.0)


def _latest(bootstrap: str, topic: str, expected: int) -> dict[bytes, Any]:
    """The last record per key in `topic`, as the detector reads it."""
    out = {}
    for m in consume_all(bootstrap, topic, expected=expected, timeout_s=30):
        out[m.key()] = m
    return out


def test_a_fresh_state_in_the_same_group_reports_the_next_change_and_deletion(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 40
    src = new_topic(2, COMPACTED, prefix="src")
    changes = new_topic(2, prefix="changes")
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    group = unique_group()
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "a") as first:
        stats = first.run(max_records=n, idle_timeout_s=30)
        assert (stats.records, stats.first_seen, stats.events) == (n, n, 0)

    # the pod is replaced: same group, an empty state dir; meanwhile one new version, one deletion,
    # one re-send of the same content
    changed, deleted, resent = "id-005", "id-011", "id-020"
    producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(src, value(1005), changed)
    producer.produce(src, sources[resent], resent)
    assert producer.flush(30) == 0
    produce(kafka_bootstrap, src, [Record(None, deleted.encode())])

    writer = RecordingWriter()
    with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "b", writer=writer) as second:
        stats = second.run(max_records=3, idle_timeout_s=30)

    got = _events(kafka_bootstrap, changes, 2)
    events = {e.kind: e for e in (ChangeEvent.decode(m.value()) for m in got)}
    assert len(got) == 2 and set(events) == {ChangeKind.SOURCE_CHANGED, ChangeKind.SOURCE_DELETED}
    in_topic = _latest(kafka_bootstrap, src, n + 3)
    ev = events[ChangeKind.SOURCE_CHANGED].source
    assert ev is not None and ev.data_id == changed
    assert ev.previous == compute(ChecksumAlgorithm.CRC32C, sources[changed])
    assert ev.current == compute(ChecksumAlgorithm.CRC32C, value(1005))
    rec = in_topic[changed.encode()]
    assert (ev.topic, ev.partition, ev.offset) == (src, rec.partition(), rec.offset())
    gone = events[ChangeKind.SOURCE_DELETED].source
    assert gone is not None and gone.data_id == deleted and gone.current is None
    assert gone.previous == compute(ChecksumAlgorithm.CRC32C, sources[deleted])
    tomb = in_topic[deleted.encode()]
    assert tomb.value() is None and (gone.partition, gone.offset) == (tomb.partition(), tomb.offset())

    # the history up to the committed offsets only rebuilt the state
    assert (stats.replayed, stats.records, stats.first_seen) == (n, 3, 0)
    assert (stats.changed, stats.deleted, stats.unchanged, stats.events) == (1, 1, 1, 2)
    assert [a.output.data_id for a in writer.appended] == [changed]  # no SOURCE entry sent again


def test_a_state_ahead_of_the_committed_offsets_repeats_no_event(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 20
    src = new_topic(1, COMPACTED, prefix="src")
    changes = new_topic(1, prefix="changes")
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    group = unique_group()
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    state = tmp_path / "state"
    with _detector(kafka_bootstrap, src, changes, ledger, group, state) as first:
        assert first.run(max_records=n, idle_timeout_s=30).first_seen == n
        # two versions of one DataID and a deletion; the detector stores the batch (its events are
        # delivered) and stops before committing the offsets
        producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(src, value(2001), "id-001")
        producer.produce(src, value(2002), "id-001")
        assert producer.flush(30) == 0
        produce(kafka_bootstrap, src, [Record(None, b"id-002")])
        first._commit = lambda *_a: None  # type: ignore[method-assign]
        stats = first.run(max_records=3, idle_timeout_s=30)
        assert (stats.changed, stats.deleted, stats.events) == (2, 1, 3)
    assert len(_events(kafka_bootstrap, changes, 3)) == 3

    with _detector(kafka_bootstrap, src, changes, ledger, group, state) as second:
        stats = second.run(idle_timeout_s=5)  # the three records again? none is a change
        assert stats.events == 0
        producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(src, value(2003), "id-003")
        assert producer.flush(30) == 0
        stats = second.run(max_records=1, idle_timeout_s=30)
        assert (stats.changed, stats.events, stats.replayed) == (1, 1, 0)

    got = [ChangeEvent.decode(m.value()) for m in _events(kafka_bootstrap, changes, 4)]
    assert len(got) == 4 and len({e.change_id for e in got}) == 4
    assert [(e.kind, e.key) for e in got] == [
        (ChangeKind.SOURCE_CHANGED, b"id-001"),
        (ChangeKind.SOURCE_CHANGED, b"id-001"),
        (ChangeKind.SOURCE_DELETED, b"id-002"),
        (ChangeKind.SOURCE_CHANGED, b"id-003"),
    ]
    assert got[0].source is not None and got[0].source.previous == compute(
        ChecksumAlgorithm.CRC32C, sources["id-001"]
    )


def test_function_changes_on_the_changes_topic_are_not_reported_again_from_a_fresh_state(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 10
    src, mid, dlq = new_topic(1, COMPACTED, prefix="src"), new_topic(), new_topic()
    changes = new_topic(2, prefix="changes")
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger) as writer:
        run_step(kafka_bootstrap, processor_fns.enrich, src, mid, dlq, unique_group(), writer, records=n)
    v2 = dataclasses.replace(processor_fns.enrich, version="2", code_hash=b"\x02" * 16)
    v3 = dataclasses.replace(processor_fns.enrich, version="3", code_hash=b"\x03" * 16)
    group = unique_group()
    with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "a") as first:
        [event] = first.check_functions([v2])
        assert event.function is not None and event.function.current_version == "2"
        assert first.check_functions([v2]) == []

    with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "b") as second:
        assert second.check_functions([v2]) == []  # rebuilt from the changes topic
        [again] = second.check_functions([v3])  # a newer function is a new change
        assert again.function is not None and again.function.current_version == "3"
    got = [ChangeEvent.decode(m.value()) for m in _events(kafka_bootstrap, changes, 2)]
    assert [e.function.current_version for e in got if e.function is not None] == ["2", "3"]


def test_a_partition_moving_to_another_replica_and_back_loses_and_repeats_no_change(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 30
    src = new_topic(2, COMPACTED, prefix="src")
    changes = new_topic(1, prefix="changes")
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    group = unique_group()
    produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    partition_of = {
        m.key().decode(): m.partition() for m in consume_all(kafka_bootstrap, src, expected=n, timeout_s=30)
    }
    one_of = {p: sorted(k for k, q in partition_of.items() if q == p) for p in (0, 1)}
    producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})

    def new_version(data_id: str, n: int) -> None:
        producer.produce(src, value(n), data_id)
        assert producer.flush(30) == 0

    def running(detector: ChangeDetector) -> tuple[threading.Event, threading.Thread]:
        stop = threading.Event()
        thread = threading.Thread(target=detector.run, kwargs={"stop_event": stop}, daemon=True)
        thread.start()
        return stop, thread

    with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "a") as a:
        assert a.run(max_records=n, idle_timeout_s=30).first_seen == n
        stop_a, thread_a = running(a)
        try:
            with _detector(kafka_bootstrap, src, changes, ledger, group, tmp_path / "b") as b:
                stop_b, thread_b = running(b)
                try:  # a second replica: one partition each; b rebuilds its state silently
                    wait_until(lambda: len(a._replay_until) == len(b._replay_until) == 1, 60, "a rebalance")
                    (moved,) = list(b._replay_until)
                    wait_until(lambda: b.stats.replayed == len(one_of[moved[1]]), 30, "b's replay")
                    new_version(one_of[0][0], 100)
                    new_version(one_of[1][0], 101)
                    wait_until(lambda: a.stats.events + b.stats.events == 2, 60, "two change events")
                    assert b.stats.events == 1 and b.stats.first_seen == 0
                finally:
                    stop_b.set()
                    thread_b.join(30)
            # b is gone: its partition comes back to a, whose state of it is behind b's commits
            wait_until(lambda: len(a._replay_until) == 2, 60, "the partition back on a")
            back = one_of[moved[1]]
            new_version(back[0], 200)
            produce(kafka_bootstrap, src, [Record(None, back[1].encode())])
            wait_until(lambda: a.stats.events == 3, 60, "the change and the deletion on a")
        finally:
            stop_a.set()
            thread_a.join(30)
        assert a.stats.replayed == 1 and a.stats.first_seen == n  # b's new version, only rebuilt

    got = [ChangeEvent.decode(m.value()) for m in _events(kafka_bootstrap, changes, 4)]
    assert sorted((e.kind.value, e.key.decode()) for e in got) == sorted(
        [
            ("source_changed", one_of[0][0]),
            ("source_changed", one_of[1][0]),
            ("source_changed", back[0]),
            ("source_deleted", back[1]),
        ]
    )
    (again,) = [e for e in got if e.source is not None and e.source.current == crc(value(200))]
    assert again.key.decode() == back[0]  # compared with b's version of it, not a's stale one
    assert again.source is not None and again.source.previous == crc(value(100 + moved[1]))
