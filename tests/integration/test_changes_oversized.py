"""`streamprov changes run` on Apache Kafka with source records too large for what the service makes of
them (found by probing: a legal 300 kB key blocked the service for good, `batch failed (application
of @ with 0 inputs needs about 1200292 bytes, above max_entry_bytes=900000)` on every try and after
every restart, and the real change behind it was never reported).

Here, with `record_sources` on (the default), a source topic and clients that take records of up to
4 MB and a changes topic that takes at most 2.5 MB: a 950 kB key without a provenance header and a
1.3 MB DataID from a provenance header get no `SOURCE` ledger entry (over the ledger client's
900,000-byte `max_entry_bytes`; logged, counted `unrecorded`); the change of the 950 kB key is still
reported (without a ledger entry id), the change of the 1.3 MB DataID cannot be a change event on
that topic (logged, counted `unreported`); the real change to `id-001` between them is reported; no
batch fails, every record is counted once, and the offsets are committed. (Before the ledger counted
text in UTF-8 bytes rather than 4 bytes a character, 240 kB and 400 kB were enough.)"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from kafka_support import consume_all
from ledger_pipeline import ledger_writer, produce_sources, value
from ledger_support import map_app
from test_changes_service import COMPACTED, spawn, write_config
from test_validator import wait_until

from streamprov.changes import ChangeEvent, ChangeKind
from streamprov.ledger import ApplicationKind, DataRef
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG
from streamprov.ledger.requests import decode_request
from streamprov.producer import ProvenanceProducer

pytestmark = pytest.mark.kafka

BIG_KEY = "K" * 950_000  # a SOURCE entry over max_entry_bytes; its change event (~1.9 MB) fits
BIG_ID = "H" * 1_300_000  # from the header: no SOURCE entry, and its change event (~2.6 MB) cannot fit
LARGE = '"message.max.bytes": 4000000'


def test_source_records_too_large_for_a_ledger_entry_or_an_event_do_not_block_the_service(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 3
    src = new_topic(2, {**COMPACTED, "max.message.bytes": "4000000"}, prefix="src")
    changes = new_topic(2, {"max.message.bytes": "2500000"}, prefix="changes")
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests = new_topic(1, prefix="ledger-requests")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        for k, v in sources.items():
            writer.append(map_app("enrich", DataRef.of(k, v), DataRef.of(k, v + b"!")))
        writer.flush()
    config = write_config(
        tmp_path / "streamprov.yaml",
        kafka_bootstrap,
        src=src,
        changes=changes,
        ledger=ledger_topic,
        requests=requests,
        client=LARGE,
    )
    log_path = tmp_path / "changes.log"
    group = unique_group()
    proc = spawn(config, tmp_path / "state", group, log_path)

    def log() -> str:
        return log_path.read_text(errors="replace")

    try:
        wait_until(lambda: "watching" in log() or proc.poll() is not None, 60, "the service to start")
        assert proc.poll() is None, log()[-3000:]
        wait_until(lambda: f'"first_seen": {n}' in log(), 60, "the first sightings in a progress line")
        producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap, "message.max.bytes": 4_000_000})
        producer.producer.produce(src, b"big-key-1", BIG_KEY.encode())  # no provenance header
        producer.produce(src, b"big-id-1", "hdr-big", data_id=BIG_ID)
        producer.produce(src, value(1001), "id-001")  # a real change behind them
        producer.producer.produce(src, b"big-key-2", BIG_KEY.encode())
        producer.produce(src, b"big-id-2", "hdr-big", data_id=BIG_ID)
        assert producer.flush(30.0) == 0
        wait_until(
            lambda: '"unreported": 1' in log() or "batch failed" in log(),
            60,
            "the records in a progress line",
        )
        got = consume_all(kafka_bootstrap, changes, expected=2, timeout_s=30, grace_s=1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    text = log()
    assert "batch failed" not in text, text[-4000:]
    events = {e.key: e for e in (ChangeEvent.decode(m.value()) for m in got)}  # type: ignore[arg-type]
    assert set(events) == {b"id-001", BIG_KEY.encode()}
    real, big = events[b"id-001"].source, events[BIG_KEY.encode()].source
    assert real is not None and real.ledger_entry_id is not None
    assert real.previous_node == DataRef.of("id-001", sources["id-001"])
    assert events[b"id-001"].impact.total == 1
    assert big is not None and big.data_id == BIG_KEY and big.ledger_entry_id is None
    assert all(e.kind is ChangeKind.SOURCE_CHANGED for e in events.values())
    # each set-aside record named in the log (its DataID cut short) with the reason
    assert text.count("no SOURCE ledger entry, it is too large for a ledger record") == 4
    assert "(1300000 characters) (source record " in text and "not reported" in text
    assert BIG_KEY not in text and BIG_ID not in text
    (stopped,) = [line for line in text.splitlines() if "stopped: " in line]
    for counter in ('"records": 8', '"first_seen": 5', '"changed": 3', '"events": 2'):
        assert counter in stopped, stopped
    assert '"unrecorded": 4' in stopped and '"unreported": 1' in stopped, stopped

    # the SOURCE entries that fit went to the sequencer, the oversized ones did not
    sent = [
        decode_request(m.value())
        for m in consume_all(kafka_bootstrap, requests, expected=1, timeout_s=30, grace_s=2.0)
    ]
    outputs = {a.output for r in sent for a in r.applications if a.kind is ApplicationKind.SOURCE}
    assert outputs == {DataRef.of(k, v) for k, v in sources.items()} | {DataRef.of("id-001", value(1001))}

    # every record was committed: a restart does not read them again
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        parts = [TopicPartition(src, p) for p in (0, 1)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=30)}
        ends = {p: consumer.get_watermark_offsets(TopicPartition(src, p), timeout=30)[1] for p in (0, 1)}
    finally:
        consumer.close()
    assert committed == ends
