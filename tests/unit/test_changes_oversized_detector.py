"""The change detector and source records too large for what it makes of them, without a broker (the
events go to a stand-in producer; the ledger is in memory): a `SOURCE` entry too large for a ledger
record (a DataID of hundreds of kB, from the key or from the header) is left out, logged and counted,
and the batch goes on (it failed, and was retried for good); a change event over the size limit
carries fewer impact outputs, or none is published when its DataID alone is over it; and a batch
tried again is counted once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message
from ledger_support import LEDGER, map_app, node

from streamprov.changes import ChangeKind
from streamprov.changes.detector import ChangeDetector, ChangeDetectorError
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY
from streamprov.ledger import LedgerEntry, LedgerIndex, LedgerWriter, MemoryLedgerStore
from streamprov.ledger.model import ApplicationKind, DataRef
from streamprov.stamp import SourceStamper

SRC = "src"
MAX_ENTRY_BYTES = 200_000  # as a ledger topic taking smaller records would need
BIG_KEY = "K" * 300_000  # legal in Kafka; its SOURCE entry is over the writer's max_entry_bytes
BIG_ID = "H" * 300_000


class FakeProducer:
    """Stands in for the event producer: keeps what was produced; `fail_flushes` flushes leave one
    record undelivered (a broker that did not answer in time)."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes, bytes]] = []
        self.fail_flushes = 0

    def produce(self, topic: str, value: bytes, key: bytes, **_kw: Any) -> None:
        self.records.append((topic, value, key))

    def poll(self, _timeout: float = 0) -> int:
        return 0

    def flush(self, _timeout: float = 0) -> int:
        if self.fail_flushes:
            self.fail_flushes -= 1
            return 1
        return 0


def msg(offset: int, key: str | None, value: bytes, data_id: str | None = None) -> Message:
    headers = None if data_id is None else [(HEADER_KEY, SourceStamper().header(data_id, value))]
    return Message(
        topic=SRC,
        partition=0,
        offset=offset,
        key=None if key is None else key.encode(),
        value=value,
        headers=headers,
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ChangeDetector, FakeProducer, MemoryLedgerStore]]:
    store = MemoryLedgerStore()
    writer = LedgerWriter(store, LEDGER, None, max_entry_bytes=MAX_ENTRY_BYTES)
    writer.start()
    writer.append(map_app("enrich", node("id-1", "v1"), node("id-1", "v1!")))
    writer.flush()
    index = LedgerIndex(tmp_path / "idx", LEDGER)
    detector = ChangeDetector(
        {"bootstrap.servers": "127.0.0.1:9"},
        group_id="g",
        source_topics=SRC,
        changes_topic="changes",
        index=index,
        ledger=store,
        state_dir=tmp_path / "state",
        writer=writer,
    )
    producer = FakeProducer()
    detector._producer = producer  # type: ignore[assignment]
    try:
        yield detector, producer, store
    finally:
        detector.close()
        writer.close()
        index.close()


def source_outputs(store: MemoryLedgerStore) -> list[DataRef]:
    return [
        r.record.application.output
        for r in store.read()
        if isinstance(r.record, LedgerEntry) and r.record.application.kind is ApplicationKind.SOURCE
    ]


def test_a_source_entry_too_large_for_the_ledger_does_not_fail_the_batch(
    setup: tuple[ChangeDetector, FakeProducer, MemoryLedgerStore], caplog: pytest.LogCaptureFixture
) -> None:
    detector, producer, store = setup
    first = [msg(0, "id-1", b"v1"), msg(1, BIG_KEY, b"big-1"), msg(2, "hdr", b"hdr-1", data_id=BIG_ID)]
    with caplog.at_level(logging.WARNING, "streamprov.changes.detector"):
        assert detector.handle(first) == []
    assert (detector.stats.records, detector.stats.first_seen, detector.stats.unrecorded) == (3, 3, 2)
    assert (
        "src/0/1 (DataID KKKK" in caplog.text
        and "(300000 characters)): no SOURCE ledger entry" in caplog.text
    )
    assert BIG_KEY not in caplog.text  # the log line names the DataID, cut short
    # both huge versions are in the state all the same: their next versions are changes
    assert detector.state.get(SRC, BIG_KEY) == compute(ChecksumAlgorithm.CRC32C, b"big-1")
    second = [msg(3, BIG_KEY, b"big-2"), msg(4, "hdr", b"hdr-2", data_id=BIG_ID), msg(5, "id-1", b"v2")]
    events = detector.handle(second)
    assert [(e.kind, e.key) for e in events] == [
        (ChangeKind.SOURCE_CHANGED, BIG_KEY.encode()),
        (ChangeKind.SOURCE_CHANGED, BIG_ID.encode()),
        (ChangeKind.SOURCE_CHANGED, b"id-1"),
    ]
    assert [e.source.ledger_entry_id is None for e in events if e.source] == [True, True, False]
    assert events[2].impact.total == 1 and len(producer.records) == 3
    s = detector.stats
    assert (s.records, s.changed, s.unrecorded, s.unreported, s.events, s.batches) == (6, 3, 4, 0, 3, 2)
    # the ledger got the SOURCE entries that fit, nothing else
    assert source_outputs(store) == [node("id-1", "v1"), node("id-1", "v2")]


def test_a_change_event_over_the_limit_is_cut_to_fit_or_left_out(
    setup: tuple[ChangeDetector, FakeProducer, MemoryLedgerStore], caplog: pytest.LogCaptureFixture
) -> None:
    detector, producer, _store = setup
    long_key = "L" * 60_000
    detector.handle([msg(0, "id-1", b"v1"), msg(1, long_key, b"long-1")])
    detector.max_event_bytes = 2_000  # as if the changes topic took no more
    # 40 outputs derived from id-1 v1: the event cannot carry them all
    many = [
        map_app(f"f{i:02d}", node("id-1", "v1"), node(f"out-{i:02d}-" + "x" * 40, "o")) for i in range(40)
    ]
    writer = detector.writer
    assert isinstance(writer, LedgerWriter)
    for app in many:
        writer.append(app)
    with caplog.at_level(logging.WARNING, "streamprov.changes.detector"):
        events = detector.handle([msg(2, "id-1", b"v2"), msg(3, long_key, b"long-2")])
    (event,) = events  # the long key's change does not fit even without outputs
    assert event.key == b"id-1" and event.impact.total == 41 and event.impact.truncated
    assert 0 < len(event.impact.outputs) < 41
    ((_, value, key),) = producer.records
    assert len(value) + len(key) <= 2_000
    s = detector.stats
    assert (s.changed, s.events, s.unreported, s.records, s.batches) == (2, 1, 1, 4, 2)
    assert "change source_changed of id-1: its event carries the first" in caplog.text
    assert "(60000 characters) (source record src/0/3) not reported" in caplog.text
    # the long key's new version is stored: the partition goes on, the next version compares with it
    assert detector.state.get(SRC, long_key) == compute(ChecksumAlgorithm.CRC32C, b"long-2")
    assert detector.state.next_offset(SRC, 0) == 4


def test_a_batch_tried_again_is_counted_once(
    setup: tuple[ChangeDetector, FakeProducer, MemoryLedgerStore],
) -> None:
    detector, producer, _store = setup
    detector.handle([msg(0, "id-1", b"v1")])
    batch: Callable[[], list[Message]] = lambda: [msg(1, "id-2", b"a"), msg(2, "id-1", b"v2")]  # noqa: E731
    producer.fail_flushes = 2
    for _ in range(2):
        with pytest.raises(ChangeDetectorError, match="1 undelivered"):
            detector.handle(batch())
    assert (detector.stats.records, detector.stats.first_seen, detector.stats.changed) == (1, 1, 0)
    assert detector.state.next_offset(SRC, 0) == 1  # nothing of the failed batch stored
    (event,) = detector.handle(batch())
    assert event.key == b"id-1"
    s = detector.stats
    assert (s.records, s.first_seen, s.changed, s.events, s.batches) == (3, 2, 1, 1, 2)
