"""`streamprov changes run` on Apache Kafka, as a process: a source -> map pipeline records into a
ledger; the service starts from streamprov.yaml, answers its probes, turns a changed source record
into one change event naming the map output derived from the old version, logs its progress, and
exits 0 on SIGTERM after committing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import REPO_ROOT, consume_all
from ledger_pipeline import ledger_writer, produce_sources, run_step, value
from ledger_support import LEDGER
from test_validator import http_get, wait_until

from streamprov.changes import ChangeEvent, ChangeKind
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.ledger import ApplicationKind, DataRef
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG
from streamprov.ledger.requests import decode_request
from streamprov.producer import ProvenanceProducer

pytestmark = pytest.mark.kafka

COMPACTED = {"cleanup.policy": "compact"}
TRACEPARENT = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def write_config(
    path: Path, bootstrap: str, *, src: str, changes: str, ledger: str, requests: str, client: str = ""
) -> Path:
    """`client`: more librdkafka settings, as `"name": value` pairs separated by commas."""
    extra = f", {client}" if client else ""
    path.write_text(
        f"""
kafka:
  bootstrap_servers: "{bootstrap}"
  client: {{"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000{extra}}}
streams: {{changes: {changes}, ledger: {ledger}, ledger_requests: {requests}}}
sources: [{src}]
"""
    )
    return path


def spawn(config: Path, state: Path, group: str, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from streamprov.cli import main; main()",
                "changes",
                "run",
                "--config",
                str(config),
                "--state-dir",
                str(state),
                "--group-id",
                group,
                "--ledger-id",
                LEDGER,
                "--host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--progress-interval",
                "0.5",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=env,
        )


def test_changes_run_emits_the_change_and_stops_cleanly_on_sigterm(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 10
    src = new_topic(2, COMPACTED, prefix="src")
    mid, dlq = new_topic(2), new_topic()
    changes = new_topic(2, prefix="changes")
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    requests = new_topic(1, prefix="ledger-requests")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        run_step(kafka_bootstrap, processor_fns.enrich, src, mid, dlq, unique_group(), writer, records=n)

    config = write_config(
        tmp_path / "streamprov.yaml",
        kafka_bootstrap,
        src=src,
        changes=changes,
        ledger=ledger_topic,
        requests=requests,
    )
    log_path = tmp_path / "changes.log"
    proc = spawn(config, tmp_path / "state", unique_group(), log_path)
    try:

        def log() -> str:
            return log_path.read_text(errors="replace")

        wait_until(lambda: "watching" in log() or proc.poll() is not None, 60, "the service to start")
        assert proc.poll() is None, log()[-3000:]
        port = int(re.findall(r"on http://127\.0\.0\.1:(\d+)", log())[0])
        assert http_get(port, "/healthz") == (200, "ok: alive\n")
        assert http_get(port, "/readyz") == (200, f"ok: watching {src}\n")
        # every source seen once (first sightings: no event), then one new version
        wait_until(lambda: f'"first_seen": {n}' in log(), 60, "the first sightings in a progress line")
        changed = "id-004"
        producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(src, value(404), changed, headers=[("traceparent", TRACEPARENT)])
        assert producer.flush(30.0) == 0
        got = consume_all(kafka_bootstrap, changes, expected=1, timeout_s=60, grace_s=1.0)
        wait_until(lambda: '"events": 1' in log(), 30, "the event in a progress line")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    (event,) = [ChangeEvent.decode(m.value()) for m in got]  # type: ignore[arg-type]
    assert event.kind is ChangeKind.SOURCE_CHANGED and event.source is not None
    assert event.source.data_id == changed and event.key == changed.encode()
    assert event.source.previous_node == DataRef.of(changed, sources[changed])
    assert event.source.current == compute(ChecksumAlgorithm.CRC32C, value(404))
    assert event.impact.total == 1 and event.impact.outputs[0].function_id == "enrich"
    # the event carries the changed record's trace context: the recompute it causes links to it
    assert dict(got[0].headers() or []).get("traceparent") == TRACEPARENT
    text = log_path.read_text()
    assert "SIGTERM: stopping after the current batch" in text
    stopped = [line for line in text.splitlines() if "stopped: " in line]
    assert stopped and '"changed": 1' in stopped[-1] and f'"records": {n + 1}' in stopped[-1]

    # every source version seen went to the ledger sequencer as a SOURCE application
    sent = [
        decode_request(m.value())
        for m in consume_all(kafka_bootstrap, requests, expected=1, timeout_s=30, grace_s=2.0)
    ]
    assert {r.ledger_id for r in sent} == {LEDGER}
    apps = [a for r in sent for a in r.applications]
    assert all(a.kind is ApplicationKind.SOURCE for a in apps)
    expected = {DataRef.of(k, v) for k, v in sources.items()} | {DataRef.of(changed, value(404))}
    assert {a.output for a in apps} == expected
