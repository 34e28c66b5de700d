"""The ledger on a real Kafka topic: write through LedgerWriter, read back, verify, index, resume,
fence a zombie writer, and catch tampering done on the topic itself."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from kafka_support import produce
from ledger_support import LEDGER, chain_apps, pipeline, signer, verifier
from typer.testing import CliRunner

from streamprov.ledger import (
    LedgerEntry,
    LedgerIndex,
    LedgerWriteFailedError,
    LedgerWriter,
    ProblemKind,
    encode_record,
    verify_ledger,
)
from streamprov.ledger import kafka as ledger_kafka
from streamprov.ledger.cli import ledger_app
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader, KafkaLedgerSink

pytestmark = pytest.mark.kafka


def _writer(sink: KafkaLedgerSink, every: int = 50) -> LedgerWriter:
    return LedgerWriter(sink, LEDGER, signer(), checkpoint_every=every, put_timeout_s=5.0)


def test_write_read_back_verify_index_and_resume(
    kafka_bootstrap: str, new_topic: ..., tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    apps = pipeline(20, chain_len=2, fan_in=3)  # 220 applications
    reader = KafkaLedgerReader(kafka_bootstrap, topic, idle_timeout_s=20.0)

    with _writer(KafkaLedgerSink(kafka_bootstrap, topic, timeout_s=20.0)) as w:
        for app in apps[:100]:
            w.append(app)
        w.flush(30.0)  # durable now: a reader sees all of it
        assert sum(isinstance(r.record, LedgerEntry) for r in reader.read()) == 100
        for app in apps[100:]:
            w.append(app)

    report = verify_ledger(reader.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == 220 and report.checkpoints == 5, report.describe()

    with LedgerIndex(tmp_path / "idx", LEDGER, verifier=verifier()) as idx:
        assert idx.catch_up(reader) == 225
        down = idx.downstream("g7-s1")
        assert [a.entry.application.function_id for a in down.applications] == [
            "map0",
            "map1",
            "sum",
            "publish",
        ]

    # a new writer resumes from the topic's tail (a small window forces the tail search to widen)
    monkeypatch.setattr(ledger_kafka, "_TAIL_WINDOW", 8)
    with _writer(KafkaLedgerSink(kafka_bootstrap, topic, timeout_s=20.0)) as w2:
        assert w2.next_seq == 220
        for app in apps[-3:]:  # replays after a crash: recognised, not appended again
            w2.append(app)
        for app in chain_apps(30, prefix="later"):
            w2.append(app)
    assert w2.stats.duplicates == 3 and w2.stats.entries == 30

    report = verify_ledger(reader.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == 250, report.describe()
    with LedgerIndex(tmp_path / "idx", LEDGER, verifier=verifier()) as idx:
        assert idx.catch_up(reader) == 31  # resumed: only the new entries and their checkpoint
        assert idx.size == 250 and idx.root_hash == report.root_hash
        proof = idx.inclusion_proof(123)
        covering = idx.checkpoint_covering(123)
        assert covering is not None and proof.verify(covering)


def test_a_second_transactional_writer_fences_the_first(kafka_bootstrap: str, new_topic: ...) -> None:
    topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger-txn")
    txn = f"streamprov-ledger-{topic}"
    first = _writer(KafkaLedgerSink(kafka_bootstrap, topic, transactional_id=txn, timeout_s=10.0)).start()
    for app in chain_apps(10):
        first.append(app)
    first.flush(30.0)

    second = _writer(KafkaLedgerSink(kafka_bootstrap, topic, transactional_id=txn, timeout_s=10.0)).start()
    assert second.next_seq == 10  # took over the chain where the first left it

    for app in chain_apps(5, prefix="zombie"):
        first.append(app)
    with pytest.raises(LedgerWriteFailedError):
        first.flush(30.0)  # fenced: its transaction cannot commit
    with pytest.raises(LedgerWriteFailedError):
        first.close()

    for app in chain_apps(5, prefix="new"):
        second.append(app)
    second.close()

    report = verify_ledger(
        KafkaLedgerReader(kafka_bootstrap, topic).read(), LEDGER, verifier(), require_signed=True
    )
    assert report.ok and report.entries == 15, report.describe()


def test_tampering_on_the_topic_is_caught(kafka_bootstrap: str, new_topic: ...) -> None:
    original = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger-orig")
    with _writer(KafkaLedgerSink(kafka_bootstrap, original, timeout_s=20.0), every=10) as w:
        for app in chain_apps(25):
            w.append(app)
    records = list(KafkaLedgerReader(kafka_bootstrap, original).read())
    raw = [encode_record(r.record) for r in records]  # type: ignore[arg-type]
    victim = next(r.record for r in records if isinstance(r.record, LedgerEntry) and r.record.seq == 12)
    assert isinstance(victim, LedgerEntry)
    forged = dataclasses.replace(
        victim, application=dataclasses.replace(victim.application, device_id="evil")
    )
    raw[records.index(next(r for r in records if r.record is victim))] = encode_record(forged)

    copy = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger-copy")
    produce(kafka_bootstrap, copy, raw)
    report = verify_ledger(KafkaLedgerReader(kafka_bootstrap, copy).read(), LEDGER, verifier())
    assert report.problem is not None and report.problem.kind is ProblemKind.MODIFIED
    assert report.problem.seq == 12 and report.entries == 12

    # the command line says the same, from the topic
    key = signer().public_key.public_bytes_raw().hex()
    cli = ["verify", "-b", kafka_bootstrap, "--ledger-id", LEDGER, "-k", key]
    ok = CliRunner().invoke(ledger_app, [*cli, "--topic", original, "--require-signed"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(ledger_app, [*cli, "--topic", copy])
    assert bad.exit_code == 1 and "MODIFIED at seq 12" in bad.output


def test_a_topic_with_several_partitions_is_refused(kafka_bootstrap: str, new_topic: ...) -> None:
    topic = new_topic(3, LEDGER_TOPIC_CONFIG, prefix="ledger-3p")
    with pytest.raises(ledger_kafka.LedgerError, match="exactly one"):
        _writer(KafkaLedgerSink(kafka_bootstrap, topic, timeout_s=10.0)).start()
