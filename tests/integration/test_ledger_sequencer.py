"""The shared ledger sequencer on a real Kafka broker: many clients, one chain, exactly once.

Clients (`KafkaLedgerClient`) send unsealed applications to a one-partition requests topic; the
sequencer seals them into the ledger topic in transactions that also commit its offsets. Checked:
two clients give one verifying ledger with every application once (client replays dropped); bad
requests are dead-lettered with their reason; a second sequencer takes over where the first stopped;
a sequencer killed with SIGKILL mid-stream and restarted leaves each application sealed exactly once.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from kafka_support import consume_all, produce
from ledger_pipeline import produce_sources, run_step, value
from ledger_support import LEDGER, SEED, chain_apps, map_app, node, pipeline, signer, verifier
from test_validator import http_get, wait_until

from streamprov.agents.dead_letter import (
    CUT_HEADER,
    ERROR_HEADER,
    MAX_DEAD_LETTER_BYTES,
    REASON_HEADER,
    SOURCE_HEADER,
)
from streamprov.header import ProvenanceHeader
from streamprov.ledger import DataRef, LedgerEntry, entry_id_of, verify_ledger
from streamprov.ledger import kafka as ledger_kafka
from streamprov.ledger.errors import LedgerError
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader
from streamprov.ledger.model import ApplicationKind, AppTemplate, Context, MapRow
from streamprov.ledger.requests import KafkaLedgerClient, encode_request
from streamprov.ledger.sequencer import LedgerSequencer

pytestmark = pytest.mark.kafka


def _sequencer(bootstrap: str, requests: str, ledger: str, dlq: str, **kw: object) -> LedgerSequencer:
    return LedgerSequencer(
        bootstrap,
        requests_topic=requests,
        ledger_topic=ledger,
        ledger_id=LEDGER,
        signer=signer(),
        dead_letter_topic=dlq,
        checkpoint_every=40,
        **kw,  # type: ignore[arg-type]
    )


def _entries(bootstrap: str, ledger: str) -> list[LedgerEntry]:
    reader = KafkaLedgerReader(bootstrap, ledger, idle_timeout_s=20.0)
    report = verify_ledger(reader.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok, report.describe()
    return [r.record for r in reader.read() if isinstance(r.record, LedgerEntry)]


def test_two_clients_one_ledger_each_application_once_and_bad_requests_dead_lettered(
    kafka_bootstrap: str, new_topic: ...
) -> None:
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    apps = pipeline(15, chain_len=2, fan_in=3)  # 165 applications
    half = len(apps) // 2

    def send(part: list[object], batch: int) -> None:
        with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=batch) as client:
            for app in part:
                client.append(app)  # type: ignore[arg-type]

    # two senders at once, the second replaying five of the first's applications (a crash replay)
    threads = [
        threading.Thread(target=send, args=(apps[:half], 7)),
        threading.Thread(target=send, args=(apps[half:] + apps[:5], 11)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    produce(kafka_bootstrap, requests, [b"garbage bytes", encode_request("another-ledger", apps[:2])])

    with _sequencer(kafka_bootstrap, requests, ledger, dlq) as seq:
        stats = seq.run(idle_timeout_s=3.0)
    assert stats.dead_letters == 2 and stats.duplicates == 5, stats

    entries = _entries(kafka_bootstrap, ledger)
    assert len(entries) == len(apps)
    assert {e.entry_id for e in entries} == {entry_id_of(a) for a in apps}
    # each sender's own order survives: the first sender's applications are sealed in its order
    first = {entry_id_of(a): i for i, a in enumerate(apps[:half])}
    seen = [first[e.entry_id] for e in entries if e.entry_id in first]
    assert seen == sorted(seen)

    dead = consume_all(kafka_bootstrap, dlq, expected=2, timeout_s=20.0)
    reasons = sorted(dict(m.headers() or [])[REASON_HEADER] for m in dead)
    assert reasons == [b"malformed_request", b"wrong_ledger"]
    assert all(dict(m.headers() or [])[SOURCE_HEADER].startswith(requests.encode()) for m in dead)
    assert {m.value() for m in dead} >= {b"garbage bytes"}  # the original bytes, kept for replay


def test_a_second_sequencer_takes_over_where_the_first_stopped(kafka_bootstrap: str, new_topic: ...) -> None:
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    apps = chain_apps(200)
    with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=10) as client:
        client.append_many(apps)

    with _sequencer(kafka_bootstrap, requests, ledger, dlq, batch_size=5) as first:
        first.run(max_requests=8, idle_timeout_s=10.0)
    assert 0 < first.stats.entries < len(apps)
    with _sequencer(kafka_bootstrap, requests, ledger, dlq, batch_size=5) as second:
        second.run(idle_timeout_s=3.0)
    assert first.stats.entries + second.stats.entries == len(apps)
    assert second.stats.duplicates == 0

    entries = _entries(kafka_bootstrap, ledger)
    assert [e.entry_id for e in entries] == [entry_id_of(a) for a in apps]
    assert [e.seq for e in entries] == list(range(len(apps)))


def test_sequencer_killed_mid_stream_seals_each_application_exactly_once(
    kafka_bootstrap: str, new_topic: ..., tmp_path: Path
) -> None:
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    apps = chain_apps(3000)
    with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=10) as client:
        client.append_many(apps)  # 300 requests

    cmd = [
        str(Path(sys.executable).with_name("streamprov")),
        "ledger",
        "sequencer",
        "-b",
        kafka_bootstrap,
        "--topic",
        ledger,
        "--requests-topic",
        requests,
        "--ledger-id",
        LEDGER,
        "--dead-letter-topic",
        dlq,
        "--checkpoint-every",
        "100",
        "--batch-size",
        "2",
    ]
    env = {**os.environ, "STREAMPROV_LEDGER_SIGNING_KEY": SEED.hex()}
    reader = KafkaLedgerReader(kafka_bootstrap, ledger, isolation="read_uncommitted")
    log = (tmp_path / "seq1.log").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while reader.watermarks()[1] < 300 and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "seq1.log").read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    sealed_before = reader.watermarks()[1]
    assert 300 <= sealed_before < len(apps), "the kill did not land mid-stream"

    done = subprocess.run(
        [*cmd, "--idle-exit", "4"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]

    entries = _entries(kafka_bootstrap, ledger)
    assert [e.entry_id for e in entries] == [entry_id_of(a) for a in apps], done.stderr[-3000:]
    assert "0 dead letters" in done.stdout


def test_sequencer_from_the_config_file_signs_with_the_configured_key_and_stops_on_sigterm(
    kafka_bootstrap: str, new_topic: ..., tmp_path: Path
) -> None:
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    key = tmp_path / "ledger-key.pem"
    key.write_bytes(
        Ed25519PrivateKey.from_private_bytes(SEED).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f'kafka: {{bootstrap_servers: "{kafka_bootstrap}"}}\n'
        f"streams: {{ledger: {ledger}, ledger_requests: {requests}, dead_letters: {dlq}}}\n"
        f"ledger: {{id: {LEDGER}, checkpoint_key: ledger-key, sequencer: {{checkpoint_every: 25}}}}\n"
        f"signing: {{keys: {{ledger-key: {{algorithm: ed25519, private_key_file: {key}}}}}}}\n"
    )
    apps = chain_apps(60)
    with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=20) as client:
        client.append_many(apps)

    cmd = [str(Path(sys.executable).with_name("streamprov")), "ledger", "sequencer", "--config", str(config)]
    log_path = tmp_path / "sequencer.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([*cmd, "--host", "127.0.0.1", "--http-port", "0"], stderr=log)
    reader = KafkaLedgerReader(kafka_bootstrap, ledger)
    try:
        wait_until(lambda: reader.watermarks()[1] >= 62 or proc.poll() is not None, 60, "60 entries sealed")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        port = int(re.findall(r"on http://127\.0\.0\.1:(\d+)", log_path.read_text())[0])
        assert http_get(port, "/healthz") == (200, "ok: alive\n")
        assert http_get(port, "/readyz") == (200, f"ok: sealing ledger {LEDGER}\n")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    # checkpoints at 25 and 50 entries, and a final one on SIGTERM: covered to the last entry
    reader = KafkaLedgerReader(kafka_bootstrap, ledger, idle_timeout_s=20.0)
    report = verify_ledger(reader.read(), LEDGER, verifier(), require_signed=True)
    assert report.ok and report.entries == 60 and report.checkpoints == 3, report.describe()


def test_two_processors_record_through_the_sequencer_into_one_ledger(
    kafka_bootstrap: str, new_topic: ..., unique_group: ...
) -> None:
    """Two agent processes' worth of steps (source -> enrich -> tag), each with its own client: one
    ledger, every application once, each entry's nodes exactly the records on the topics."""
    n = 40
    src, mid, out, dlq = new_topic(2), new_topic(2), new_topic(2), new_topic()
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests = new_topic(1, prefix="ledger-req")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i}", value(i)) for i in range(n)))
    for fn, a, b in ((processor_fns.enrich, src, mid), (processor_fns.tag, mid, out)):
        with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=16) as client:
            stats = run_step(kafka_bootstrap, fn, a, b, dlq, unique_group(), client, records=n)
        assert stats.records_in == n
    with _sequencer(kafka_bootstrap, requests, ledger, dlq) as seq:
        seq.run(idle_timeout_s=3.0)
    assert seq.stats.entries == 2 * n and seq.stats.dead_letters == 0

    entries = _entries(kafka_bootstrap, ledger)
    by_fn = {
        fid: [e.application for e in entries if e.application.function_id == fid] for fid in ("enrich", "tag")
    }
    outputs = consume_all(kafka_bootstrap, out, expected=n, timeout_s=30)
    middles = consume_all(kafka_bootstrap, mid, expected=n, timeout_s=30)

    def nodes(msgs: list[Any]) -> set[DataRef]:
        return {DataRef(m.key().decode(), ProvenanceHeader.from_headers(m.headers()).checksum) for m in msgs}

    assert {a.output for a in by_fn["enrich"]} == nodes(middles)
    assert {a.inputs[0] for a in by_fn["enrich"]} == {DataRef.of(k, v) for k, v in sources.items()}
    assert {a.inputs[0] for a in by_fn["tag"]} == nodes(middles)
    assert {a.output for a in by_fn["tag"]} == nodes(outputs)
    assert {a.device_id for a in by_fn["tag"]} == {"test-pod"}


def test_a_missing_dead_letter_topic_is_refused_at_start(kafka_bootstrap: str, new_topic: Any) -> None:
    """Not found after the first malformed request by a transaction failing again and again."""
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests = new_topic(1, prefix="ledger-req")
    missing = f"no-such-dlq-{uuid.uuid4().hex[:8]}"
    with (
        _sequencer(kafka_bootstrap, requests, ledger, missing) as seq,
        pytest.raises(LedgerError, match=f"dead-letter topic {missing} is not available"),
    ):
        seq.run(idle_timeout_s=3.0)


def test_a_takeover_remembers_the_whole_dedup_window(
    kafka_bootstrap: str, new_topic: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's replay of entries older than the tail a takeover would otherwise read (here 16
    records) but within `dedup_window` is dropped, not sealed twice."""
    monkeypatch.setattr(ledger_kafka, "_TAIL_WINDOW", 16)
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    apps = chain_apps(400)
    with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER, max_batch=50) as client:
        client.append_many(apps)
    with _sequencer(kafka_bootstrap, requests, ledger, dlq, dedup_window=300) as first:
        first.run(idle_timeout_s=3.0)
    assert first.stats.entries == len(apps)
    with KafkaLedgerClient(kafka_bootstrap, requests, LEDGER) as client:
        client.append_many(apps[150:160])  # ~245 entries back: beyond the 16-record tail
    with _sequencer(kafka_bootstrap, requests, ledger, dlq, dedup_window=300) as second:
        second.run(idle_timeout_s=3.0)
    assert (second.stats.duplicates, second.stats.entries) == (10, 0)
    assert [e.entry_id for e in _entries(kafka_bootstrap, ledger)] == [entry_id_of(a) for a in apps]


def test_oversized_requests_are_dead_lettered_cut_to_fit_and_the_rest_is_sealed(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    """Two requests near Kafka's message limit: garbage, and a valid request whose entry would not
    fit a ledger record. Each is dead-lettered, cut to fit (the dead-letter headers and what was cut
    kept), and the requests around them are sealed. Before, the dead letter (the value plus its
    headers) was refused by the producer (MSG_SIZE_TOO_LARGE), every retry of the batch failed the
    same way, and the sequencer exited with nothing sealed: for good, as a restart resumed there."""
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    apps = pipeline(2, chain_len=2, fan_in=3)
    huge = map_app("huge", node("x", "v0"), node("x", "v1"), blob="y" * 950_000)
    half = len(apps) // 2
    produce(
        kafka_bootstrap,
        requests,
        [
            encode_request(LEDGER, apps[:half]),
            bytes(1_030_000),  # garbage, under the topic's limit (1,048,588) but over a dead letter's
            encode_request(LEDGER, [huge]),
            encode_request(LEDGER, apps[half:]),
        ],
        config={"message.max.bytes": 2_000_000},
    )
    with _sequencer(kafka_bootstrap, requests, ledger, dlq) as seq:
        stats = seq.run(idle_timeout_s=3.0)
    assert stats.dead_letters == 2 and stats.entries == len(apps), stats
    assert {e.entry_id for e in _entries(kafka_bootstrap, ledger)} == {entry_id_of(a) for a in apps}
    dead = consume_all(kafka_bootstrap, dlq, expected=2, timeout_s=20.0)
    headers = [dict(m.headers() or []) for m in dead]
    assert sorted(h[REASON_HEADER] for h in headers) == [b"entry_too_large", b"malformed_request"]
    assert all(CUT_HEADER in h and h[SOURCE_HEADER].startswith(requests.encode()) for h in headers)
    assert all(0 < len(m.value() or b"") < MAX_DEAD_LETTER_BYTES for m in dead)


def test_a_map_row_too_large_for_a_ledger_record_is_dead_lettered_and_the_rest_is_sealed(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    """A map row whose output header has a 600 kB DataID: its entry holds the DataID twice (over
    1 MB), so the broker refuses it. Before, only a request's applications were size-checked: the
    batch failed with MSG_SIZE_TOO_LARGE ten times, the sequencer stopped with the applications
    around it unsealed, and a restart did the same (with an idle timeout it exited as if idle, having
    sealed nothing). Now it is dead-lettered as entry_too_large; a 150 kB DataID (a ~300 kB entry)
    is sealed."""
    ledger = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    dead = _seal_two_map_rows(kafka_bootstrap, new_topic, ledger, "X" * 600_000, "Y" * 150_000)
    assert dict(dead.headers() or [])[REASON_HEADER] == b"entry_too_large"


def _seal_two_map_rows(kafka_bootstrap: str, new_topic: Any, ledger: str, too_large: str, fits: str) -> Any:
    """Two chains around a map row whose DataID is `too_large` and one whose DataID `fits`: the
    sequencer seals all but the first row, whose request it dead-letters (returned)."""
    requests, dlq = new_topic(1, prefix="ledger-req"), new_topic(1, prefix="dlq")
    template = AppTemplate(ApplicationKind.MAP, "f", "1", b"0123456789abcdef", (), "pod", Context("s", "l"))

    def row(data_id: str) -> MapRow:
        return (0, None, (0, b"1234"), ProvenanceHeader.for_source(data_id, b"v", timestamp_ms=1).encode())

    before, after = chain_apps(2, prefix="a"), chain_apps(2, prefix="b")
    produce(
        kafka_bootstrap,
        requests,
        [
            encode_request(LEDGER, before),
            encode_request(LEDGER, [], [(template, [row(too_large)])]),
            encode_request(LEDGER, [], [(template, [row(fits)])]),
            encode_request(LEDGER, after),
        ],
        config={"message.max.bytes": 2_000_000},
    )
    with _sequencer(kafka_bootstrap, requests, ledger, dlq) as seq:
        stats = seq.run(idle_timeout_s=3.0)
    assert (stats.dead_letters, stats.entries, stats.recoveries) == (1, 5, 0), stats
    entries = _entries(kafka_bootstrap, ledger)
    assert [e.entry_id for e in entries[:2] + entries[3:]] == [entry_id_of(a) for a in before + after]
    assert entries[2].application.output.data_id == fits
    (dead,) = consume_all(kafka_bootstrap, dlq, expected=1, timeout_s=20.0)
    return dead


def test_an_entry_over_the_ledger_topics_max_message_bytes_is_dead_lettered(
    kafka_bootstrap: str, new_topic: Any
) -> None:
    """The ledger topic takes records of at most 50,000 bytes, far under the 900 kB the sequencer
    allowed an entry: a map row with an 80 kB DataID that does not compress (a ~160 kB entry) was
    sealed and the broker refused the transaction's record. It reads the topic's limit when it
    starts; the bound is on the entry before compression, as the producer's own is."""
    ledger = new_topic(1, {**LEDGER_TOPIC_CONFIG, "max.message.bytes": "50000"}, prefix="ledger")
    incompressible = base64.b64encode(os.urandom(60_000)).decode()  # a ~160 kB entry, even with lz4
    dead = _seal_two_map_rows(kafka_bootstrap, new_topic, ledger, incompressible, "Y" * 10_000)  # ~20 kB
    headers = dict(dead.headers() or [])
    assert headers[REASON_HEADER] == b"entry_too_large"
    assert b"above max_entry_bytes=48976" in headers[ERROR_HEADER]
