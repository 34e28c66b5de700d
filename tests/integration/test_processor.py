"""The confluent-kafka processor against a real broker: provenance, exactly once across kill -9,
dead letters, windowed reduce with restart, and a rebalance between two group members."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from kafka_support import FAST_GROUP_CONFIG, Record, consume_all, produce, record_view

from streamprov.agents.dead_letter import (
    ERROR_HEADER,
    REASON_HEADER,
    RECORD_FRAMING_BYTES,
    SOURCE_HEADER,
    DeadLetterReason,
)
from streamprov.agents.processor import (
    AT_LEAST_ONCE,
    EXACTLY_ONCE,
    Checkpoint,
    FatalProcessorError,
    Processor,
    ProcessorError,
)
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.header import HEADER_KEY, PREFIX, ProvenanceHeader
from streamprov.lineage import StepKind
from streamprov.merkle import merkle_root
from streamprov.producer import ProvenanceProducer
from streamprov.stamp import SourceStamper, reduce_leaf

pytestmark = pytest.mark.kafka

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CRC = ChecksumAlgorithm.CRC32C


# -- helpers --------------------------------------------------------------------------------------------
def _config(bootstrap: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, **FAST_GROUP_CONFIG}


def _value(n: int, **extra: Any) -> bytes:
    return json.dumps({"n": n, **extra}, separators=(",", ":"), sort_keys=True).encode()


def _produce_sources(bootstrap: str, topic: str, items: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    """Source records through ProvenanceProducer (DataID = key); returns value by DataID."""
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent: dict[str, bytes] = {}
    for data_id, value in items:
        producer.produce(topic, value, data_id)
        producer.poll(0)
        sent[data_id] = value
    assert producer.flush(30.0) == 0
    return sent


def _produce_timed(bootstrap: str, topic: str, rows: list[tuple[str, str, bytes, int]]) -> None:
    """(key, DataID, value, timestamp_ms) rows with source headers, in order, on partition 0."""
    stamper = SourceStamper()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    errors: list[Any] = []
    for key, data_id, value, ts in rows:
        headers = [(HEADER_KEY, stamper.header(data_id, value))]
        producer.produce(
            topic,
            value,
            key.encode(),
            partition=0,
            timestamp=ts,
            headers=headers,
            on_delivery=lambda err, _m: errors.append(err) if err else None,
        )
    assert producer.flush(30.0) == 0 and not errors


def _header(msg: Message) -> tuple[bytes | None, bytes, ProvenanceHeader]:
    key, value, headers = record_view(msg)
    header = ProvenanceHeader.from_headers(headers)
    assert header is not None and value is not None
    return key, value, header


def _committed(bootstrap: str, group: str, topic: str, partitions: int) -> list[TopicPartition]:
    """The group's committed offsets, read without joining the group."""
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        return list(probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10))
    finally:
        probe.close()


def _committed_when_stable(bootstrap: str, group: str, topic: str, partitions: int) -> list[TopicPartition]:
    """`_committed` after a kill -9 of an exactly-once member: offsets it sent to a transaction it
    never ended stay unstable (the fetch times out) until the broker aborts that transaction at its
    timeout (the test gives its processors 10 s)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return _committed(bootstrap, group, topic, partitions)
        except KafkaException as exc:
            if time.monotonic() > deadline or exc.args[0].code() != KafkaError._TIMED_OUT:
                raise


def _committed_total(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    return sum(max(tp.offset, 0) for tp in _committed_when_stable(bootstrap, group, topic, partitions))


def _run(processor: Processor, **kwargs: Any) -> Any:
    with processor:
        return processor.run(**kwargs)


# -- 1. map, exactly once, chained --------------------------------------------------------------------------
def test_map_exactly_once_stamps_provenance_and_chains(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any
) -> None:
    src, mid, out, dlq = new_topic(3), new_topic(3), new_topic(2), new_topic()
    n = 300
    sources = _produce_sources(kafka_bootstrap, src, ((f"id-{i:04d}", _value(i)) for i in range(n)))

    first = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=src,
        output_topic=mid,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        batch_size=64,
    )
    stats = _run(first, max_records=n, idle_timeout_s=30)
    assert (stats.records_in, stats.records_out, stats.dead_lettered) == (n, n, 0)
    assert stats.commits >= 1 and stats.aborts == 0

    step1 = processor_fns.enrich.step()
    got = consume_all(kafka_bootstrap, mid, expected=n, timeout_s=30, grace_s=0.5)
    assert len(got) == n
    for msg in got:
        key, value, header = _header(msg)
        assert key is not None and header.data_id == key.decode()
        assert header.lineage == (step1,)
        assert header.source_checksum == compute(CRC, sources[header.data_id])
        assert matches(header.checksum, value)
        source_n = json.loads(sources[header.data_id])["n"]
        assert json.loads(value) == {"n": source_n, "scaled": 3 * source_n}

    second = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=[mid],
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.tag,
        params={"label": "x"},
    )
    stats = _run(second, max_records=n, idle_timeout_s=30)
    assert (stats.records_in, stats.records_out, stats.dead_lettered) == (n, n, 0)
    step2 = processor_fns.tag.step({"label": "x"})
    got = consume_all(kafka_bootstrap, out, expected=n, timeout_s=30, grace_s=0.5)
    assert sorted(_header(m)[2].data_id for m in got) == sorted(sources)
    for msg in got:
        _, value, header = _header(msg)
        assert header.lineage == (step1, step2)
        assert header.source_checksum == compute(CRC, sources[header.data_id])
        assert matches(header.checksum, value)
        assert json.loads(value)["label"] == "x"
    assert consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=1.0) == []


# -- 2. kill -9 mid-stream ------------------------------------------------------------------------------
def _spawn(bootstrap: str, log_path: Path, args: list[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "streamprov.agents.processor_main", "--bootstrap", bootstrap, *args]
    with log_path.open("a") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True)


def _wait_exit(proc: subprocess.Popen[str], timeout_s: float, log_path: Path) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        pytest.fail(f"processor did not finish in {timeout_s}s; log:\n{log_path.read_text()[-4000:]}")
    return proc.returncode, out


def _drain(consumer: Consumer, idle_s: float = 0.3) -> int:
    count = 0
    while batch := consumer.consume(1000, idle_s):
        count += sum(m.error() is None for m in batch)
    return count


def _kill_mid_batch(
    bootstrap: str, log_path: Path, args: list[str], group: str, src: str, out: str, partitions: int
) -> tuple[int, int]:
    """Run the processor and SIGKILL it while a batch is in flight: the output log then holds records
    past what the group committed (exactly once: an open transaction; at least once: delivered but not
    committed). Watching and killing race with the commit, so it is checked after the kill and tried
    again (at most 3 times) if the kill fell between two batches. Returns (committed, in flight)."""
    watcher = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"{group}-watch", "isolation.level": "read_uncommitted"}
    )
    watcher.assign([TopicPartition(out, p, 0) for p in range(partitions)])
    seen = extra_before = committed = 0
    try:
        for _attempt in range(3):
            start = committed
            proc = _spawn(bootstrap, log_path, [*args, "--log-level", "WARNING"])
            deadline = time.monotonic() + 60
            try:
                while time.monotonic() < deadline and proc.poll() is None:
                    committed = _committed_total(bootstrap, group, src, partitions)
                    seen += sum(m.error() is None for m in watcher.consume(1000, 0.02))
                    if committed >= start + 500 and seen - extra_before > committed:
                        break
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=10)
            assert proc.returncode == -signal.SIGKILL, log_path.read_text()[-3000:]
            seen += _drain(watcher)
            committed = _committed_total(bootstrap, group, src, partitions)
            extra = seen - committed  # records in the log beyond the committed input (1:1 map)
            if extra > extra_before:
                return committed, extra - extra_before
            extra_before = extra
    finally:
        watcher.close()
    pytest.fail(f"three kills all fell between batches; log:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("guarantee", [EXACTLY_ONCE, AT_LEAST_ONCE])
def test_kill_9_mid_stream_then_restart(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path, guarantee: str
) -> None:
    partitions, n = 3, 3000
    src, out, dlq = new_topic(partitions), new_topic(partitions), new_topic()
    group = unique_group()
    sources = _produce_sources(kafka_bootstrap, src, ((f"k-{i:05d}", _value(i)) for i in range(n)))
    log_path = tmp_path / "processor.log"
    args = [
        *f"--input {src} --output {out} --dlq {dlq} --group {group} --guarantee {guarantee}".split(),
        *["--function", "processor_fns:enrich", "--batch-size", "50", "--params"],
        '{"delay_ms": 2}',
        *["--config", "group.instance.id=member-1", "--config", "session.timeout.ms=6000"],
        *["--config", "transaction.timeout.ms=10000"],  # a killed member's transaction ends sooner
    ]

    done, in_flight = _kill_mid_batch(kafka_bootstrap, log_path, args, group, src, out, partitions)
    assert 500 <= done < n and in_flight > 0

    if guarantee == EXACTLY_ONCE:
        second = _spawn(kafka_bootstrap, log_path, [*args, "--idle-timeout", "4"])
    else:  # runs until SIGTERM, sent once everything is committed: a clean stop
        second = _spawn(kafka_bootstrap, log_path, args)
        deadline = time.monotonic() + 90
        while _committed_total(kafka_bootstrap, group, src, partitions) < n and time.monotonic() < deadline:
            time.sleep(0.2)
        second.send_signal(signal.SIGTERM)
    code, stdout = _wait_exit(second, 120, log_path)
    assert code == 0, log_path.read_text()[-4000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert 0 < stats["records_in"] <= n - done and stats["dead_lettered"] == 0

    isolation = "read_committed" if guarantee == EXACTLY_ONCE else "read_uncommitted"
    got = consume_all(kafka_bootstrap, out, expected=n, timeout_s=60, grace_s=1.0, isolation=isolation)
    counts = Counter(_header(m)[2].data_id for m in got)
    assert set(counts) == set(sources), f"missing: {sorted(set(sources) - set(counts))[:10]}"
    if guarantee == EXACTLY_ONCE:
        assert len(got) == n, f"duplicates: {[k for k, c in counts.items() if c > 1][:10]}"
        # ...although the killed instance's open transaction left records in the log (aborted since).
        everything = consume_all(
            kafka_bootstrap, out, expected=n + in_flight, timeout_s=10, isolation="read_uncommitted"
        )
        assert len(everything) >= n + in_flight
    else:  # what was delivered but not committed when it died was processed again
        assert len(got) >= n + in_flight
    assert _committed_total(kafka_bootstrap, group, src, partitions) == n


def test_reduce_survives_kill_9_exactly_once(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    """Crash mid-stream with windows open; the restart replays from the committed offsets (held back
    by open windows) and, from the checkpoint, neither re-emits closed windows nor loses records."""
    n, keys, step_ms = 2000, 10, 5  # 200 records per 1 s window, 20 per key
    src, out, dlq = new_topic(), new_topic(), new_topic()
    group = unique_group()
    base = (int(time.time() * 1000) // 10_000) * 10_000 - 60_000
    rows = [(f"k{i % keys}", f"r-{i:05d}", _value(i), base + i * step_ms) for i in range(n)]
    _produce_timed(kafka_bootstrap, src, rows)
    log_path = tmp_path / "reducer.log"
    args = [
        *f"--input {src} --output {out} --dlq {dlq} --group {group} --function processor_fns:sum_n".split(),
        *["--window-ms", "1000", "--batch-size", "50", "--params"],
        '{"delay_ms": 2}',
        *["--config", "group.instance.id=reducer-1", "--config", "session.timeout.ms=6000"],
        *["--config", "transaction.timeout.ms=10000"],  # a killed member's transaction ends sooner
    ]
    first = _spawn(kafka_bootstrap, log_path, [*args, "--log-level", "WARNING"])
    deadline = time.monotonic() + 60
    done = 0
    try:
        while time.monotonic() < deadline and first.poll() is None and done < 700:
            done = _committed_total(kafka_bootstrap, group, src, 1)
            time.sleep(0.03)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=10)
    (tp,) = _committed_when_stable(kafka_bootstrap, group, src, 1)
    checkpoint = Checkpoint.decode(tp.metadata)
    assert checkpoint is not None and tp.offset < checkpoint.position < n, log_path.read_text()[-3000:]

    second = _spawn(kafka_bootstrap, log_path, [*args, "--idle-timeout", "4", "--flush-windows-on-stop"])
    code, stdout = _wait_exit(second, 120, log_path)
    assert code == 0, log_path.read_text()[-4000:]
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert stats["replayed"] > 0 and stats["dead_lettered"] == 0

    expected: dict[tuple[bytes, int], list[tuple[str, bytes]]] = {}
    for key, data_id, value, ts in rows:
        expected.setdefault((key.encode(), ts - ts % 1000), []).append((data_id, value))
    got = consume_all(kafka_bootstrap, out, expected=len(expected), timeout_s=60, grace_s=1.0)
    windows = Counter((m.key(), _header(m)[2].lineage[-1].inputs.window_start) for m in got)  # type: ignore[union-attr]
    assert windows == Counter(set(expected)), "each window exactly once"
    for msg in got:
        key, value, header = _header(msg)
        step = header.lineage[-1]
        assert step.inputs is not None and key is not None
        inputs = expected[(key, step.inputs.window_start or 0)]
        assert json.loads(value) == sum(json.loads(v)["n"] for _, v in inputs)
        assert step.inputs.count == len(inputs)
        assert step.inputs.merkle_root == merkle_root([reduce_leaf(d, compute(CRC, v)) for d, v in inputs])
    assert consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=1.0) == []


# -- 3. dead letters ------------------------------------------------------------------------------------
def test_bad_records_go_to_the_dead_letter_topic_once(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any
) -> None:
    src, out, dlq = new_topic(), new_topic(), new_topic()
    stamper = SourceStamper()

    def good(data_id: str, value: bytes) -> list[tuple[str, bytes]]:
        return [(HEADER_KEY, stamper.header(data_id, value)), ("trace", b"00-abc-01")]

    valid = stamper.header("x", _value(1))
    records: list[tuple[Record, DeadLetterReason | None]] = []
    for i in range(5):
        records.append((Record(_value(i), f"good-{i}".encode(), good(f"good-{i}", _value(i))), None))
    bad = {
        "garbage": ([(HEADER_KEY, b"\x00garbage bytes")], _value(1), DeadLetterReason.MALFORMED_HEADER),
        "empty": ([(HEADER_KEY, b"")], _value(1), DeadLetterReason.MALFORMED_HEADER),
        "truncated": ([(HEADER_KEY, valid[: len(PREFIX) + 3])], _value(1), DeadLetterReason.MALFORMED_HEADER),
        "no-lineage": ([(HEADER_KEY, valid[:-1])], _value(1), DeadLetterReason.MALFORMED_HEADER),
        "foreign": (
            [(HEADER_KEY, b"\xc3\x01" + b"\x11" * 8 + valid[10:])],
            _value(1),
            DeadLetterReason.UNKNOWN_SCHEMA,
        ),
        "tampered": ([(HEADER_KEY, valid), ("trace", b"t")], _value(2), DeadLetterReason.CHECKSUM_MISMATCH),
        "not-json": (good("not-json", b"{not json"), b"{not json", DeadLetterReason.DESERIALIZATION_ERROR),
        "negative": (good("negative", _value(-1)), _value(-1), DeadLetterReason.PROCESSING_ERROR),
    }
    for name, (headers, value, reason) in bad.items():
        records.append((Record(value, f"bad-{name}".encode(), headers), reason))
        records.append(
            (Record(_value(10), f"good-after-{name}".encode(), good(f"good-after-{name}", _value(10))), None)
        )
    produce(kafka_bootstrap, src, [r for r, _ in records])
    originals = {m.key(): m for m in consume_all(kafka_bootstrap, src, expected=len(records), timeout_s=30)}
    assert len(originals) == len(records)

    processor = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        batch_size=7,
    )
    stats = _run(processor, max_records=len(records), idle_timeout_s=30)
    n_bad = len(bad)
    assert (stats.records_in, stats.records_out, stats.dead_lettered) == (
        len(records),
        len(records) - n_bad,
        n_bad,
    )

    letters = consume_all(kafka_bootstrap, dlq, expected=n_bad, timeout_s=30, grace_s=1.0)
    assert sorted(m.key() for m in letters) == sorted(f"bad-{name}".encode() for name in bad)
    for msg in letters:
        key, value, headers = record_view(msg)
        original = originals[key]
        _, original_value, original_headers = record_view(original)
        assert value == original_value
        assert headers[: len(original_headers)] == original_headers
        extra = dict(headers[len(original_headers) :])
        expected_reason = bad[key.decode()[4:]][2]
        assert extra[REASON_HEADER] == str(expected_reason).encode(), key
        assert extra[SOURCE_HEADER] == f"{src}/{original.partition()}/{original.offset()}".encode()
        assert extra[ERROR_HEADER]

    outputs = consume_all(kafka_bootstrap, out, expected=len(records) - n_bad, timeout_s=30, grace_s=0.5)
    assert sorted(m.key() for m in outputs) == sorted(r.key for r, reason in records if reason is None)
    for msg in outputs:
        _, value, headers = record_view(msg)
        header = ProvenanceHeader.from_headers(headers)
        assert header is not None and matches(header.checksum, value)
        assert ("trace", b"00-abc-01") in headers  # other headers ride along


def test_an_output_too_large_to_produce_is_dead_lettered_and_the_stream_goes_on(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any
) -> None:
    """A source record with a 600 KB key and no header: its output carries the key twice (key, and
    DataID in the header) and the producer refuses it. The batch could never be shipped: 11 tries,
    then the processor stopped, and stopped again on every restart (found by probing)."""
    src, out, dlq = new_topic(), new_topic(), new_topic()
    big = b"K" * 600_000
    produce(
        kafka_bootstrap,
        src,
        [Record(_value(1), b"good-0"), Record(_value(2), big), Record(_value(3), b"good-after")],
        config={"message.max.bytes": 2_000_000},
    )
    processor = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
    )
    stats = _run(processor, max_records=3, idle_timeout_s=30)
    assert (stats.records_in, stats.records_out, stats.dead_lettered) == (3, 2, 1)
    outputs = consume_all(kafka_bootstrap, out, expected=2, timeout_s=30, grace_s=0.5)
    assert sorted(m.key() for m in outputs) == [b"good-0", b"good-after"]
    (letter,) = consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=30, grace_s=0.5)
    key, value, headers = record_view(letter)
    assert (key, value) == (big, _value(2))  # the input as consumed: it fits
    assert dict(headers)[REASON_HEADER] == b"record_too_large"


def test_an_output_over_the_output_topics_max_message_bytes_is_dead_lettered(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any
) -> None:
    """The output topic takes at most 20,000 bytes a record, well under the producer's 1 MB: a 30 KB
    output was refused by the broker, the batch retried 11 times and the processor stopped, again on
    every restart (found by probing). The processor reads the topic's limit at start."""
    src, dlq = new_topic(), new_topic()
    out = new_topic(config={"max.message.bytes": "20000"})
    produce(
        kafka_bootstrap,
        src,
        [
            Record(_value(1), b"good-0"),
            Record(_value(2, pad="x" * 30_000), b"big"),
            Record(_value(3), b"after"),
        ],
    )
    processor = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        max_consecutive_failures=1,
    )
    stats = _run(processor, max_records=3, idle_timeout_s=30)
    assert (stats.records_in, stats.records_out, stats.dead_lettered, stats.aborts) == (3, 2, 1, 0)
    outputs = consume_all(kafka_bootstrap, out, expected=2, timeout_s=30, grace_s=0.5)
    assert sorted(m.key() for m in outputs) == [b"after", b"good-0"]
    (letter,) = consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=30, grace_s=0.5)
    key, _value_bytes, headers = record_view(letter)
    assert key == b"big" and dict(headers)[REASON_HEADER] == b"record_too_large"
    assert (
        f"more than the {20_000 - RECORD_FRAMING_BYTES} an output may be".encode()
        in dict(headers)[ERROR_HEADER]
    )


# -- 4. windowed reduce, with a restart in the middle ---------------------------------------------------
def test_windowed_reduce_with_restart(kafka_bootstrap: str, new_topic: Any, unique_group: Any) -> None:
    src, mid, out, dlq = new_topic(), new_topic(), new_topic(), new_topic()
    base = (int(time.time() * 1000) // 10_000) * 10_000 - 60_000  # window-aligned, recent (retention)
    rows = [  # key, DataID, n, offset in window (ms from base)
        ("a", "a-0", 1, 100),
        ("a", "a-1", 2, 1100),
        ("b", "b-0", 3, 800),  # window 0 still open: within the 500 ms grace
        ("c", "c-0", 4, 1600),  # closes window 0 (a, b)
        ("b", "b-1", 5, 900),  # after the restart: window 0 was emitted, truly late
        ("a", "a-2", 6, 1300),
        ("z", "z-0", 7, 5000),  # closes window 1 (a, c)
    ]
    _produce_timed(kafka_bootstrap, src, [(k, d, _value(n), base + t) for k, d, n, t in rows])
    mapped = Processor(
        _config(kafka_bootstrap),
        group_id=unique_group(),
        input_topics=src,
        output_topic=mid,
        dead_letter_topic=dlq,
        function=processor_fns.tag,
    )
    assert _run(mapped, max_records=len(rows), idle_timeout_s=30).records_out == len(rows)
    mid_records = {
        _header(m)[2].data_id: m for m in consume_all(kafka_bootstrap, mid, expected=len(rows), timeout_s=30)
    }
    assert [mid_records[d].timestamp()[1] - base for _, d, _, _ in rows] == [t for *_, t in rows]

    group = unique_group()

    def reducer() -> Processor:
        return Processor(
            _config(kafka_bootstrap),
            group_id=group,
            input_topics=mid,
            output_topic=out,
            dead_letter_topic=dlq,
            function=processor_fns.sum_n,
            window_ms=1000,
            grace_ms=500,
            batch_size=2,
        )

    first = _run(reducer(), max_records=4, idle_timeout_s=30)
    assert (first.records_in, first.records_out) == (4, 2)
    (tp,) = _committed(kafka_bootstrap, group, mid, 1)
    assert tp.offset == mid_records["a-1"].offset()  # never past the oldest record of an open window
    checkpoint = Checkpoint.decode(tp.metadata)
    assert checkpoint is not None and checkpoint.position == mid_records["c-0"].offset() + 1

    second = _run(reducer(), max_records=6, idle_timeout_s=30)
    assert (second.records_in, second.replayed, second.records_out, second.dead_lettered) == (6, 3, 2, 1)

    outputs = consume_all(kafka_bootstrap, out, expected=4, timeout_s=30, grace_s=1.0)
    windows = {(m.key(), _header(m)[2].lineage[-1].inputs.window_start - base): m for m in outputs}  # type: ignore[union-attr]
    expected = {(b"a", 0): ["a-0"], (b"b", 0): ["b-0"], (b"a", 1000): ["a-1", "a-2"], (b"c", 1000): ["c-0"]}
    assert len(outputs) == 4 and set(windows) == set(expected)
    step_map = processor_fns.tag.step()
    for (key, start), ids in expected.items():
        _, value, header = _header(windows[(key, start)])
        inputs = [_header(mid_records[d]) for d in ids]
        assert header.data_id == key.decode()
        assert json.loads(value) == sum(json.loads(v)["n"] for _, v, _ in inputs)
        assert matches(header.checksum, value)
        assert header.lineage[:-1] == (step_map,)
        step = header.lineage[-1]
        assert (step.kind, step.function_id) == (StepKind.REDUCE, "sum_n")
        assert step.inputs is not None and step.inputs.count == len(ids)
        leaves = [reduce_leaf(h.data_id, h.checksum) for _, _, h in inputs]
        assert step.inputs.merkle_root == merkle_root(leaves)
        assert (step.inputs.window_start, step.inputs.window_end) == (base + start, base + start + 1000)
        source_root = merkle_root([reduce_leaf(h.data_id, h.source_checksum) for _, _, h in inputs])
        assert header.source_checksum == Checksum(ChecksumAlgorithm.SHA256, source_root)

    (letter,) = consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=30, grace_s=1.0)
    assert dict(record_view(letter)[2])[REASON_HEADER] == str(DeadLetterReason.LATE_RECORD).encode()
    assert _header(letter)[2].data_id == "b-1"


# -- 5. rebalance between two members ------------------------------------------------------------------
@pytest.fixture
def threads() -> Iterator[list[threading.Thread]]:
    started: list[threading.Thread] = []
    yield started
    for t in started:
        t.join(timeout=60)


def test_rebalance_between_two_members_exactly_once(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, threads: list[threading.Thread]
) -> None:
    partitions, n = 4, 2000
    src, out, dlq = new_topic(partitions), new_topic(partitions), new_topic()
    sources = _produce_sources(kafka_bootstrap, src, ((f"r-{i:05d}", _value(i)) for i in range(n)))
    group = unique_group()
    members = [
        Processor(
            _config(kafka_bootstrap),
            group_id=group,
            input_topics=src,
            output_topic=out,
            dead_letter_topic=dlq,
            function=processor_fns.enrich,
            params={"delay_ms": 4},
            batch_size=40,
            transactional_id=f"{group}-{i}",
        )
        for i in range(2)
    ]
    errors: list[BaseException] = []

    def run(member: Processor) -> None:
        try:
            with member:
                member.run(idle_timeout_s=4)
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    for i, member in enumerate(members):
        thread = threading.Thread(target=run, args=(member,), daemon=True)
        thread.start()
        threads.append(thread)
        if i == 0:
            deadline = time.monotonic() + 30
            while member.stats.records_in < 300 and time.monotonic() < deadline:
                time.sleep(0.05)
    for thread in threads:
        thread.join(timeout=90)
    assert not errors and not any(t.is_alive() for t in threads)
    assert members[0].stats.records_in < n and members[1].stats.records_in > 0  # the work was shared

    got = consume_all(kafka_bootstrap, out, expected=n, timeout_s=60, grace_s=1.0)
    counts = Counter(_header(m)[2].data_id for m in got)
    assert set(counts) == set(sources)
    assert len(got) == n, f"duplicates: {[k for k, c in counts.items() if c > 1][:10]}"


# -- 6. an abortable transaction error ---------------------------------------------------------------------
def test_aborted_transactions_are_redone_then_give_up_with_a_typed_error(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker rejects an output (larger than the output topic allows): each attempt's transaction
    aborts, the batch is rewound and redone, and after the bound the processor stops with a typed
    error; nothing of the failed batch is visible, everything before it stays committed. The
    processor reads the topic's limit at start and dead-letters what is over it (test above), so
    here it does not: as when the limit is lowered after the processor started."""
    monkeypatch.setattr(Processor, "_fit_output_topic", lambda _self: None)
    src, out, dlq = new_topic(), new_topic(config={"max.message.bytes": "2000"}), new_topic()
    items = [(f"ok-{i:02d}", _value(i)) for i in range(21)] + [("huge", _value(1, pad="x" * 5000))]
    _produce_sources(kafka_bootstrap, src, items)
    group = unique_group()
    processor = Processor(
        _config(kafka_bootstrap),
        group_id=group,
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        batch_size=10,
        max_consecutive_failures=2,
    )
    with processor, pytest.raises(ProcessorError, match="in a row") as failure:
        processor.run(idle_timeout_s=30)
    assert not isinstance(failure.value, FatalProcessorError)
    stats = processor.stats
    assert (stats.records_in, stats.records_out, stats.aborts) == (20, 20, 3)
    assert _committed_total(kafka_bootstrap, group, src, 1) == 20
    got = consume_all(kafka_bootstrap, out, expected=21, timeout_s=3)
    assert sorted(m.key() for m in got) == [f"ok-{i:02d}".encode() for i in range(20)]
