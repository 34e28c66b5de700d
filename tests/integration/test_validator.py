"""The Validator against a real Apache Kafka broker: a clean stream gives no alert; a stream with
every kind of problem gives exactly the expected alerts (and dead letters); kill -9 mid-stream and a
restart lose no alert; a broker restart during a run loses nothing.

The broker-restart test runs its own private broker (scripts/kafka.sh copied into a temporary
checkout that shares the jars, on free ports) so stopping it cannot break tests of other sessions
that share the project's broker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions
from kafka_support import (
    FAST_GROUP_CONFIG,
    KAFKA_SCRIPT,
    REPO_ROOT,
    Record,
    consume_all,
    create_topic,
    delete_topics,
    produce,
    unique_name,
    wait_for_broker,
)

from streamprov.agents.dead_letter import REASON_HEADER, SOURCE_HEADER
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.config.models import Criticality
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.lineage import Step, StepKind
from streamprov.producer import ProvenanceProducer
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, SourceStamper
from validator.alerts import Alert, AlertKind, alert_id
from validator.checks import TopicPolicy
from validator.service import Validator
from validator.settings import ServiceSettings

pytestmark = pytest.mark.kafka

COMPACTED = {"cleanup.policy": "compact"}
registry = FunctionRegistry()


@registry.map("f2c", "1")
def f2c(value: dict[str, Any]) -> dict[str, Any]:
    return {"c": round((value["f"] - 32) * 5 / 9, 3)}


def dumps(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def reading(i: int) -> bytes:
    return dumps({"f": 32 + i})


# -- helpers ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def produce_sources(bootstrap: str, topic: str, items: dict[str, bytes]) -> None:
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for data_id, value in items.items():
        producer.produce(topic, value, data_id.encode())
    assert producer.flush(30.0) == 0


def produce_old_source(bootstrap: str, topic: str, data_id: str, value: bytes, ts_ms: int) -> None:
    """A source record whose Kafka timestamp (CreateTime) lies in the past."""
    errors: list[Any] = []
    p = Producer({"bootstrap.servers": bootstrap})
    header = SourceStamper().header(data_id, value)
    p.produce(
        topic,
        value,
        data_id.encode(),
        timestamp=ts_ms,
        headers=[(HEADER_KEY, header)],
        on_delivery=lambda err, _m: errors.append(err) if err else None,
    )
    assert p.flush(30.0) == 0 and not errors


def derived(data_id: str, source: bytes, *, ts_ms: int | None = None) -> tuple[bytes, bytes]:
    """(value, header) of f2c applied to `source`, stamped as the processor stamps it."""
    src_header = ProvenanceHeader.for_source(data_id, source).encode()
    value = dumps(f2c.apply(json.loads(source)))
    header = MapStamper(f2c).stamp(InputRecord(source, [(HEADER_KEY, src_header)], None, "s", 0, 0), value)
    if ts_ms is not None:
        h = ProvenanceHeader.decode(header)
        header = ProvenanceHeader(h.data_id, h.checksum, h.source_checksum, ts_ms, h.lineage).encode()
    return value, header


def settings_for(
    bootstrap: str,
    tmp_path: Path,
    *,
    topics: tuple[str, ...],
    sources: tuple[str, ...],
    alerts: str,
    dlq: str,
    group: str,
    policies: dict[str, TopicPolicy] | None = None,
    **kw: Any,
) -> ServiceSettings:
    return ServiceSettings(
        kafka={"bootstrap.servers": bootstrap, **FAST_GROUP_CONFIG},
        topics=topics,
        sources=sources,
        alerts_topic=alerts,
        dead_letter_topic=dlq,
        state_dir=tmp_path / "state",
        group_id=group,
        policies=policies or {},
        http_host="127.0.0.1",
        http_port=0,
        commit_interval_s=0.2,
        **kw,
    )


@contextmanager
def running(validator: Validator) -> Iterator[Validator]:
    """The validator's loop in a thread; stopped (batch finished, committed) and closed on exit."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            validator.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="validator", daemon=True)
    thread.start()
    try:
        yield validator
    finally:
        validator.stop()
        thread.join(60)
        validator.close()
    assert not thread.is_alive(), "the validator did not stop within 60 s"
    assert not failure, f"the validator failed: {failure[0]!r}"


TRACEPARENT = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def read_alerts(
    bootstrap: str, topic: str, expected: int, timeout_s: float, grace_s: float = 0.0
) -> list[Alert]:
    msgs = consume_all(bootstrap, topic, expected=expected, timeout_s=timeout_s, grace_s=grace_s)
    alerts = [Alert.decode(m.value()) for m in msgs]  # type: ignore[arg-type]
    for m, a in zip(msgs, alerts, strict=True):
        assert m.key() == a.data_id.encode()
    return alerts


def committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        found = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return sum(max(tp.offset, 0) for tp in found)
    finally:
        probe.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


# -- 1. clean --------------------------------------------------------------------------------------
def test_clean_stream_gives_no_alerts(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n, partitions = 300, 3
    src, out = new_topic(2, COMPACTED), new_topic(partitions)
    alerts, dlq = new_topic(), new_topic()
    group = unique_group()
    sources = {f"s-{i:04d}": reading(i) for i in range(n)}
    produce_sources(kafka_bootstrap, src, sources)
    records = []
    for data_id, value in sources.items():
        out_value, header = derived(data_id, value)
        records.append(Record(out_value, data_id.encode(), [(HEADER_KEY, header), ("traceparent", b"00-1")]))
    produce(kafka_bootstrap, out, records)
    policy = TopicPolicy(source_max_age_ms=3_600_000, message_max_age_ms=3_600_000, rederive_rate=0.5)
    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(out,),
        sources=(src,),
        alerts=alerts,
        dlq=dlq,
        group=group,
        policies={out: policy},
    )
    with running(Validator(s, registry=registry)) as v:
        wait_until(lambda: v.http_ports, 30, "the HTTP endpoints")
        (port,) = v.http_ports
        wait_until(lambda: v.stats.checked >= n, 90, f"{n} records checked")
        wait_until(lambda: committed_total(kafka_bootstrap, group, out, partitions) == n, 30, "the commit")
        assert http_get(port, "/healthz") == (200, "ok: alive\n")
        assert http_get(port, "/readyz") == (200, "ok: assigned and caught up\n")
        status, metrics = http_get(port, "/metrics")
        assert status == 200 and f"streamprov_validator_messages_checked_total {n}" in metrics.splitlines()
        assert (
            "streamprov_validator_rederived_total" in metrics
            and "streamprov_validator_consumer_lag{" in metrics
        )
    assert v.stats.checked == n and v.stats.alerts == 0 and v.stats.dead_letters == 0
    assert read_alerts(kafka_bootstrap, alerts, expected=0, timeout_s=5, grace_s=1.5) == []
    assert consume_all(kafka_bootstrap, dlq, expected=0, timeout_s=5, grace_s=0.5) == []


# -- 1b. records whose alert or dead letter would not fit a record --------------------------------------
def test_records_whose_findings_would_be_too_large_are_reported_cut_and_the_stream_goes_on(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    """A 600 KB key on a record without header, and a 400 KB DataID in a header that does not match
    its value: their alerts (the DataID is the key and a field) and dead letter were larger than a
    record, the broker refused them, and the service retried the batch until it exited, on every
    restart (found by probing). Now they are cut to fit, and the records after them are checked."""
    src = new_topic(1, COMPACTED)
    out, alerts, dlq = new_topic(), new_topic(), new_topic()
    produce_sources(kafka_bootstrap, src, {"s-1": reading(1)})
    good_value, good_header = derived("s-1", reading(1))
    h = ProvenanceHeader.decode(good_header)
    big_id = ProvenanceHeader("D" * 400_000, h.checksum, h.source_checksum, h.timestamp_ms, h.lineage)
    produce(
        kafka_bootstrap,
        out,
        [
            Record(b"v", b"K" * 600_000),  # no header
            Record(b"corrupt", b"big-id", [(HEADER_KEY, big_id.encode())]),  # does not match
            Record(good_value, b"s-1", [(HEADER_KEY, good_header)]),
            Record(b"corrupt-after", b"s-1", [(HEADER_KEY, good_header)]),
        ],
    )
    group = unique_group()
    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(out,),
        sources=(src,),
        alerts=alerts,
        dlq=dlq,
        group=group,
        policies={out: TopicPolicy(source_drift=False)},
    )
    with running(Validator(s, registry=registry)) as v:
        wait_until(lambda: committed_total(kafka_bootstrap, group, out, 1) == 4, 60, "all 4 committed")
    assert v.stats.rewinds == 0
    found = sorted((a.kind, a.offset, len(a.data_id)) for a in read_alerts(kafka_bootstrap, alerts, 3, 30))
    assert found == [
        (AlertKind.CHECKSUM_MISMATCH, 1, 1024),
        (AlertKind.CHECKSUM_MISMATCH, 3, 3),
        (AlertKind.MALFORMED, 0, 1024),
    ]
    (dead,) = consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=30, grace_s=0.5)
    assert dead.key() == b"K" * 600_000 and dead.value() == b"v"  # it fits: the alert (the key twice) did not


# -- 2. every kind of problem ----------------------------------------------------------------------
def test_problem_stream_gives_exactly_the_expected_alerts(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    src = new_topic(1, COMPACTED)
    out, out2 = new_topic(), new_topic()
    alerts, dlq = new_topic(), new_topic()
    now = int(time.time() * 1000)
    clean = {f"s-clean-{i}": reading(i) for i in range(10)}
    produce_sources(kafka_bootstrap, src, {**clean, "s-changed": reading(100)})
    produce_old_source(kafka_bootstrap, src, "s-aged", reading(200), now - 2 * 3_600_000)

    rows: list[Record] = []
    expected: dict[int, tuple[AlertKind, str]] = {}  # offset in `out` -> (kind, aspect)
    for data_id, value in clean.items():
        v, h = derived(data_id, value)
        rows.append(Record(v, data_id.encode(), [(HEADER_KEY, h)]))  # offsets 0..9: clean
    v, h = derived("s-clean-0", clean["s-clean-0"])
    corrupted = v + b" "
    rows.append(Record(corrupted, b"s-clean-0", [(HEADER_KEY, h), ("traceparent", TRACEPARENT)]))
    expected[10] = (AlertKind.CHECKSUM_MISMATCH, "")
    v, h = derived("s-clean-1", clean["s-clean-1"])
    tampered = bytearray(h)
    tampered[15] ^= 0x01  # last checksum digest byte
    rows.append(Record(v, b"s-clean-1", [(HEADER_KEY, bytes(tampered))]))
    expected[11] = (AlertKind.CHECKSUM_MISMATCH, "")
    changed_value, h = derived("s-changed", reading(100))
    rows.append(Record(changed_value, b"s-changed", [(HEADER_KEY, h)]))
    expected[12] = (AlertKind.SOURCE_CHANGED, "")
    v, h = derived("s-aged", reading(200))
    rows.append(Record(v, b"s-aged", [(HEADER_KEY, h)]))
    expected[13] = (AlertKind.STALE, "source")
    v, h = derived("s-clean-2", clean["s-clean-2"], ts_ms=now - 3_600_000)
    rows.append(Record(v, b"s-clean-2", [(HEADER_KEY, h)]))
    expected[14] = (AlertKind.STALE, "message")
    v, h = derived("s-missing", reading(7))
    rows.append(Record(v, b"s-missing", [(HEADER_KEY, h)]))
    expected[15] = (AlertKind.MISSING_SOURCE, "")
    rows.append(Record(b"\x00\xffgarbage", b"g-1"))  # no header at all
    expected[16] = (AlertKind.MALFORMED, "")
    rows.append(Record(b"\x00\xffgarbage", b"g-2", [(HEADER_KEY, b"\xc3\x01not a header")]))
    expected[17] = (AlertKind.MALFORMED, "")
    _, h = derived("s-clean-5", clean["s-clean-5"])
    rows.append(Record(b"\x00\xffgarbage", b"g-3", [(HEADER_KEY, h[:20])]))  # current schema, cut short
    expected[18] = (AlertKind.MALFORMED, "")
    produce(kafka_bootstrap, out, rows)
    # The source changes after its output was made: a new version of the same DataID.
    produce_sources(kafka_bootstrap, src, {"s-changed": reading(101)})

    # A second topic with re-derivation on every record and its own criticality.
    rows2 = []
    v, h = derived("s-clean-3", clean["s-clean-3"])
    rows2.append(Record(v, b"s-clean-3", [(HEADER_KEY, h)]))  # faithful
    wrong = dumps({"c": 12345})
    forged = ProvenanceHeader.decode(h)
    forged = ProvenanceHeader(
        forged.data_id, compute(ChecksumAlgorithm.CRC32C, wrong), forged.source_checksum, now, forged.lineage
    )
    rows2.append(Record(wrong, b"s-clean-3", [(HEADER_KEY, forged.encode())]))  # not what f2c gives
    ghost = Step.create(StepKind.MAP, "ghost", "1", b"\x00" * 16, {})
    unknown = ProvenanceHeader(
        "s-clean-4",
        compute(ChecksumAlgorithm.CRC32C, b"{}"),
        compute(ChecksumAlgorithm.CRC32C, clean["s-clean-4"]),
        now,
        (ghost,),
    )
    rows2.append(Record(b"{}", b"s-clean-4", [(HEADER_KEY, unknown.encode())]))
    produce(kafka_bootstrap, out2, rows2)

    policies = {
        out: TopicPolicy(
            source_max_age_ms=3_600_000, message_max_age_ms=900_000, criticality=Criticality.HIGH
        ),
        out2: TopicPolicy(rederive_rate=1.0, criticality=Criticality.LOW),
    }
    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(out, out2),
        sources=(src,),
        alerts=alerts,
        dlq=dlq,
        group=unique_group(),
        policies=policies,
    )
    with running(Validator(s, registry=registry)) as v:
        wait_until(lambda: v.stats.checked >= len(rows) + len(rows2), 90, "every record checked")
    got = read_alerts(kafka_bootstrap, alerts, expected=len(expected) + 2, timeout_s=30, grace_s=1.5)
    assert len(got) == len(expected) + 2, [a.describe() for a in got]
    # an alert carries its record's trace context (the recompute it causes links back to it)
    traced = {
        (a.topic, a.offset): dict(m.headers() or []).get("traceparent")
        for m in consume_all(kafka_bootstrap, alerts, expected=len(got), timeout_s=10)
        for a in [Alert.decode(m.value())]  # type: ignore[arg-type]
    }
    assert traced[(out, 10)] == TRACEPARENT and traced[(out, 11)] is None
    by_id = {a.alert_id: a for a in got}
    for offset, (kind, aspect) in expected.items():
        a = by_id.pop(alert_id(out, 0, offset, kind, aspect), None)
        assert a is not None, f"no {kind} alert for offset {offset}; got {[x.describe() for x in got]}"
        assert a.criticality is Criticality.HIGH and abs(a.detected_at_ms - now) < 120_000
    rest = sorted(by_id.values(), key=lambda a: a.offset)
    assert [(a.topic, a.offset, a.kind) for a in rest] == [
        (out2, 1, AlertKind.REDERIVATION_MISMATCH),
        (out2, 2, AlertKind.MISSING_FUNCTION),
    ]
    assert all(a.criticality is Criticality.LOW for a in rest)

    alerts_at = {a.offset: a for a in got if a.topic == out}
    corrupt = alerts_at[10]
    assert corrupt.data_id == "s-clean-0" and corrupt.header == rows[10].headers[0][1]
    assert corrupt.evidence.actual == compute(ChecksumAlgorithm.CRC32C, corrupted).hex()
    assert corrupt.evidence.expected == compute(ChecksumAlgorithm.CRC32C, rows[0].value or b"").hex()
    assert alerts_at[11].evidence.actual == compute(ChecksumAlgorithm.CRC32C, rows[1].value or b"").hex()
    changed = alerts_at[12]
    assert changed.evidence.expected == compute(ChecksumAlgorithm.CRC32C, reading(100)).hex()
    assert changed.evidence.actual == compute(ChecksumAlgorithm.CRC32C, reading(101)).hex()
    assert f"{src}/0/" in changed.evidence.reason
    assert alerts_at[13].evidence.expected == "source updated within 3600000 ms"
    assert alerts_at[14].evidence.expected == "age <= 900000 ms"
    assert alerts_at[15].data_id == "s-missing"
    assert alerts_at[16].header is None and alerts_at[16].data_id == "g-1"
    assert alerts_at[17].header == b"\xc3\x01not a header"
    assert alerts_at[18].header == rows[18].headers[0][1]
    malformed = [alerts_at[o].evidence for o in (16, 17, 18)]
    codes = [e.reason.split(":")[0] for e in malformed]
    assert codes == ["missing_header", "unknown_schema", "malformed_header"]
    assert malformed[0].actual == "no header" and malformed[2].actual.startswith("20 header bytes")
    assert rest[0].evidence.expected == compute(ChecksumAlgorithm.CRC32C, wrong).hex()
    assert rest[0].evidence.actual == compute(ChecksumAlgorithm.CRC32C, rows2[0].value or b"").hex()
    assert rest[1].evidence.expected == "ghost@1 in the function registry"

    dead = consume_all(kafka_bootstrap, dlq, expected=3, timeout_s=20, grace_s=1.0)
    assert [(m.key(), m.value()) for m in dead] == [
        (b"g-1", b"\x00\xffgarbage"),
        (b"g-2", b"\x00\xffgarbage"),
        (b"g-3", b"\x00\xffgarbage"),
    ]
    reasons = (b"missing_header", b"unknown_schema", b"malformed_header")
    for m, offset, reason in zip(dead, (16, 17, 18), reasons, strict=True):
        headers = dict(m.headers() or [])
        assert headers[REASON_HEADER] == reason
        assert headers[SOURCE_HEADER] == f"{out}/0/{offset}".encode()


# -- 2b. rebalance ------------------------------------------------------------------------------------
def test_a_second_instance_takes_partitions_without_losing_alerts(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n, partitions = 2000, 4
    src, out = new_topic(1, COMPACTED), new_topic(partitions)
    alerts, dlq = new_topic(), new_topic()
    group = unique_group()
    sources = {f"s-{i:05d}": reading(i) for i in range(n)}
    produce_sources(kafka_bootstrap, src, sources)
    records = []
    for i, (data_id, value) in enumerate(sources.items()):
        v, h = derived(data_id, value)
        records.append(Record(v + b"~" if i % 5 == 0 else v, data_id.encode(), [(HEADER_KEY, h)]))

    def make(name: str) -> Validator:
        s = settings_for(
            kafka_bootstrap,
            tmp_path / name,
            topics=(out,),
            sources=(src,),
            alerts=alerts,
            dlq=dlq,
            group=group,
        )
        return Validator(s)

    with running(make("a")) as a:
        delivered = produce(kafka_bootstrap, out, records[: n // 2])
        wait_until(lambda: a.stats.checked >= n // 4, 60, "the first instance at work")
        with running(make("b")) as b:
            wait_until(lambda: b.ready()[0], 60, "the second instance assigned")
            delivered += produce(kafka_bootstrap, out, records[n // 2 :])
            wait_until(
                lambda: committed_total(kafka_bootstrap, group, out, partitions) == n,
                90,
                "everything committed",
            )
            assert b.stats.checked > 0
    assert a.stats.checked + b.stats.checked >= n
    bad = {
        alert_id(m.topic(), m.partition(), m.offset(), AlertKind.CHECKSUM_MISMATCH)
        for m in delivered
        if int(m.key()[2:]) % 5 == 0
    }
    got = read_alerts(kafka_bootstrap, alerts, expected=len(bad), timeout_s=60, grace_s=1.0)
    assert {x.alert_id for x in got} == bad and len(bad) == n // 5


# -- 2c. source partitions and topics that appear mid-run -----------------------------------------
def source_record(data_id: str, value: bytes, partition: int) -> Record:
    """A source record on an explicit partition, stamped as ProvenanceProducer stamps it."""
    return Record(value, data_id.encode(), [(HEADER_KEY, SourceStamper().header(data_id, value))], partition)


def wait_for_partitions(bootstrap: str, topic: str, count: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})

    def ready() -> bool:
        md = admin.list_topics(topic=topic, timeout=5.0).topics.get(topic)
        return (
            md is not None
            and len(md.partitions) == count
            and all(p.leader >= 0 for p in md.partitions.values())
        )

    wait_until(ready, 30, f"{count} partitions of {topic}")


def test_new_source_partitions_and_topics_are_read_without_a_restart(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    src = new_topic(1, COMPACTED)
    later = unique_name("src-later")  # a configured source topic created while the validator runs
    out, alerts, dlq = new_topic(), new_topic(), new_topic()
    produce_sources(kafka_bootstrap, src, {"s-0": reading(0)})
    # No periodic refresh during the test: only the drift check's own refresh can find them.
    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(out,),
        sources=(src, later),
        alerts=alerts,
        dlq=dlq,
        group=unique_group(),
        source_refresh_s=3600.0,
    )
    try:
        with running(Validator(s)) as v:
            wait_until(lambda: v.ready()[0], 60, "the validator to be ready")
            value, header = derived("s-0", reading(0))
            produce(kafka_bootstrap, out, [Record(value, b"s-0", [(HEADER_KEY, header)])])
            wait_until(lambda: v.stats.checked >= 1, 60, "the first record checked")
            assert v.view.partitions_added == 0

            admin = AdminClient({"bootstrap.servers": kafka_bootstrap})  # kept until the result
            admin.create_partitions([NewPartitions(src, 3)], operation_timeout=30)[src].result(timeout=30)
            wait_for_partitions(kafka_bootstrap, src, 3)
            create_topic(kafka_bootstrap, later, partitions=2, config=COMPACTED)
            produce(
                kafka_bootstrap,
                src,
                [
                    source_record("s-p1", reading(1), 1),
                    source_record("s-p2", reading(2), 2),
                    source_record("s-p2", reading(3), 2),  # s-p2 changes on its new partition
                ],
            )
            produce(
                kafka_bootstrap,
                later,
                [source_record("s-new", reading(4), 0), source_record("s-new2", reading(5), 1)],
            )
            rows = []
            for data_id, source in (
                ("s-p1", reading(1)),
                ("s-p2", reading(2)),  # derived from the version before the change
                ("s-new", reading(4)),
                ("s-new2", reading(5)),
            ):
                value, header = derived(data_id, source)
                rows.append(Record(value, data_id.encode(), [(HEADER_KEY, header)]))
            produce(kafka_bootstrap, out, rows)
            wait_until(lambda: v.stats.checked >= 5, 60, "every record checked")
            assert v.view.partitions_added == 4  # src/1, src/2, later/0, later/1
    finally:
        delete_topics(kafka_bootstrap, [later])
    # Unread, they would be missing_source alerts; read, exactly the changed one is flagged.
    got = read_alerts(kafka_bootstrap, alerts, expected=1, timeout_s=30, grace_s=1.5)
    assert [(a.kind, a.data_id, a.offset) for a in got] == [(AlertKind.SOURCE_CHANGED, "s-p2", 2)]
    assert got[0].evidence.actual == compute(ChecksumAlgorithm.CRC32C, reading(3)).hex()
    assert f"{src}/2/1" in got[0].evidence.reason


def test_an_output_topic_created_while_running_is_checked_within_seconds(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    """Subscribed topics that do not exist are found at librdkafka's metadata refresh, 5 minutes by
    default: a late output topic went unchecked that long while /readyz said ready (found by
    probing). The Validator refreshes every 10 s."""
    src, out, alerts, dlq = new_topic(1, COMPACTED), new_topic(), new_topic(), new_topic()
    late = unique_name("out-later")
    produce_sources(kafka_bootstrap, src, {"s-0": reading(0)})
    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(out, late),  # with one that exists, the group forms without the late one
        sources=(src,),
        alerts=alerts,
        dlq=dlq,
        group=unique_group(),
    )
    try:
        with running(Validator(s)) as v:
            wait_until(lambda: v.ready()[0], 60, "the validator to be ready")
            time.sleep(3)  # assigned its partitions, without the late topic
            create_topic(kafka_bootstrap, late, partitions=1)
            _, header = derived("s-0", reading(0))
            produce(kafka_bootstrap, late, [Record(b"corrupted", b"s-0", [(HEADER_KEY, header)])])
            created = time.monotonic()
            wait_until(lambda: v.stats.checked >= 1, 60, "the late topic's record checked")
            took = time.monotonic() - created
    finally:
        delete_topics(kafka_bootstrap, [late])
    assert took < 60
    (alert,) = read_alerts(kafka_bootstrap, alerts, expected=1, timeout_s=30)
    assert (alert.kind, alert.topic) == (AlertKind.CHECKSUM_MISMATCH, late)


# -- 3. kill -9 ------------------------------------------------------------------------------------
def _write_config(path: Path, bootstrap: str, **names: str) -> Path:
    path.write_text(
        f"""
kafka:
  bootstrap_servers: "{bootstrap}"
  client: {{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000, "group.instance.id": "validator-1"}}
streams: {{alerts: {names["alerts"]}, dead_letters: {names["dlq"]}}}
sources: [{names["src"]}]
topics:
  {names["out"]}:
    criticality: critical
    checks: {{integrity: true, source_drift: true}}
validator:
  group_id: {names["group"]}
  state_dir: {path.parent / "state"}
  http_port: {free_port()}
  metrics_port: {free_port()}
  batch_size: 25
"""
    )
    return path


def _spawn(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "validator",
                "run",
                "--config",
                str(config),
                "--host",
                "127.0.0.1",
                "--commit-interval",
                "0.1",
                "--log-level",
                "info",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )


def test_kill_9_mid_stream_then_restart_loses_no_alert(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n, every, partitions = 3000, 6, 3
    src, out = new_topic(1, COMPACTED), new_topic(partitions)
    alerts, dlq = new_topic(), new_topic()
    group = unique_group()
    sources = {f"s-{i:05d}": reading(i) for i in range(n)}
    produce_sources(kafka_bootstrap, src, sources)
    records = []
    for i, (data_id, value) in enumerate(sources.items()):
        v, h = derived(data_id, value)
        records.append(Record(v + b" " if i % every == 0 else v, data_id.encode(), [(HEADER_KEY, h)]))
    config = _write_config(
        tmp_path / "streamprov.yaml", kafka_bootstrap, alerts=alerts, dlq=dlq, src=src, out=out, group=group
    )
    log_path = tmp_path / "validator.log"

    # Produce while the first instance runs, so it dies with work in flight.
    delivered: list[Any] = []
    first = _spawn(config, log_path)
    try:
        for start in range(0, n // 2, 100):
            delivered += produce(kafka_bootstrap, out, records[start : start + 100])
            time.sleep(0.05)
        wait_until(lambda: committed_total(kafka_bootstrap, group, out, partitions) > 0, 60, "a first commit")
        seen_before = len(consume_all(kafka_bootstrap, alerts, expected=10**9, timeout_s=1.0))
    finally:
        first.kill()  # SIGKILL: no shutdown, no final commit
        first.wait(30)
    assert first.returncode == -signal.SIGKILL
    committed_at_kill = committed_total(kafka_bootstrap, group, out, partitions)
    assert 0 < committed_at_kill < n and seen_before > 0

    second = _spawn(config, log_path)
    try:
        for start in range(n // 2, n, 300):
            delivered += produce(kafka_bootstrap, out, records[start : start + 300])
        wait_until(
            lambda: committed_total(kafka_bootstrap, group, out, partitions) == n,
            120,
            "everything committed after the restart",
        )
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, log_path.read_text()[-4000:]
    finally:
        if second.poll() is None:
            second.kill()

    bad = {
        alert_id(m.topic(), m.partition(), m.offset(), AlertKind.CHECKSUM_MISMATCH)
        for m in delivered
        if (m.key() or b"") and int(m.key()[2:]) % every == 0
    }
    assert len(bad) == n // every
    got = read_alerts(kafka_bootstrap, alerts, expected=len(bad), timeout_s=60, grace_s=1.0)
    ids = Counter(a.alert_id for a in got)
    assert set(ids) == bad, f"missing {len(bad - set(ids))}, unexpected {len(set(ids) - bad)}"
    assert all(a.kind is AlertKind.CHECKSUM_MISMATCH and a.criticality is Criticality.CRITICAL for a in got)
    log = log_path.read_text()
    assert "stopping after the current batch" in log and '"checked"' in log


# -- 4. broker restart -----------------------------------------------------------------------------
@contextmanager
def private_broker(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A broker of our own: scripts/kafka.sh in a temporary checkout sharing the downloaded jars."""
    libs = REPO_ROOT / ".kafka" / "libs"
    if not libs.is_dir():
        pytest.skip("the broker jars are not in .kafka/libs (the session broker is external)")
    root = tmp_path / "broker"
    (root / "scripts").mkdir(parents=True)
    (root / ".kafka").mkdir()
    shutil.copy(KAFKA_SCRIPT, root / "scripts" / "kafka.sh")
    (root / ".kafka" / "libs").symlink_to(libs)
    port = free_port()
    while True:  # the controller takes port + 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                break
            except OSError:
                port = free_port()
    env = {**os.environ, "STREAMPROV_KAFKA_PORT": str(port), "STREAMPROV_PYTHON": sys.executable}

    def script(verb: str) -> None:
        done = subprocess.run(
            ["bash", str(root / "scripts" / "kafka.sh"), verb],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
            env=env,
        )
        assert done.returncode == 0, f"kafka.sh {verb}: {done.stderr[-3000:]}"

    script("up")
    try:
        yield f"127.0.0.1:{port}", script
    finally:
        subprocess.run(
            ["bash", str(root / "scripts" / "kafka.sh"), "down"],
            capture_output=True,
            timeout=120,
            check=False,
            env=env,
        )


slow = FunctionRegistry()


@slow.map("f2c", "1")
def slow_f2c(value: dict[str, Any]) -> dict[str, Any]:
    """f2c, slowly: re-deriving every record with it keeps the validator busy for ~20 s, longer than a
    loaded machine takes to stop the broker (at 0.5 ms the prefetched records ran out during a slow
    stop in CI, and nothing was left to check during the outage)."""
    time.sleep(0.0025)
    return {"c": round((value["f"] - 32) * 5 / 9, 3)}


def test_broker_restart_during_a_run_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    """The broker goes away while the validator works through prefetched records: their alerts wait
    in the producer, commits wait for them, and after the restart everything arrives."""
    with private_broker(tmp_path) as (bootstrap, script):
        src, out, alerts, dlq = (unique_name(f"sp-v{x}") for x in ("src", "out", "alerts", "dlq"))
        create_topic(bootstrap, src, config=COMPACTED)
        for name in (out, alerts, dlq):
            create_topic(bootstrap, name)
        n = 8000
        sources = {f"s-{i:05d}": reading(i) for i in range(n)}
        produce_sources(bootstrap, src, sources)
        records = []
        for i, (data_id, value) in enumerate(sources.items()):
            v, h = derived(data_id, value)
            records.append(Record(v + b"!" if i % 4 == 0 else v, data_id.encode(), [(HEADER_KEY, h)]))
        delivered = produce(bootstrap, out, records)
        group = unique_name("sp-vgroup")
        s = settings_for(
            bootstrap,
            tmp_path,
            topics=(out,),
            sources=(src,),
            alerts=alerts,
            dlq=dlq,
            group=group,
            policies={out: TopicPolicy(rederive_rate=1.0)},
            batch_size=50,
            flush_timeout_s=1.0,
        )
        with running(Validator(s, registry=slow)) as v:
            wait_until(lambda: v.stats.checked >= 500, 60, "the first records checked")
            stopping = time.monotonic()
            script("stop")
            stop_s = time.monotonic() - stopping
            at_stop = v.stats.checked
            time.sleep(3.0)  # no broker: the validator goes on with what it prefetched
            during_outage = v.stats.checked - at_stop
            assert v.alive()[0]
            script("start")
            wait_for_broker(bootstrap, timeout_s=60)
            wait_until(lambda: committed_total(bootstrap, group, out, 1) == n, 150, "everything committed")
        assert during_outage > 0, (
            f"nothing was checked while the broker was away ({at_stop} checked after a {stop_s:.1f} s stop)"
        )
        assert v.stats.checked >= n
        bad = {
            alert_id(m.topic(), m.partition(), m.offset(), AlertKind.CHECKSUM_MISMATCH)
            for m in delivered
            if int(m.key()[2:]) % 4 == 0
        }
        got = read_alerts(bootstrap, alerts, expected=len(bad), timeout_s=60, grace_s=1.0)
        ids = {a.alert_id for a in got}
        assert ids == bad and len(bad) == n // 4, f"missing {len(bad - ids)}, unexpected {len(ids - bad)}"
