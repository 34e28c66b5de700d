"""streamprov.yaml's `telemetry:` and `signing:` reach the running pieces, on Apache Kafka.

`processor_main --config-file` signs its output with the output topic's key and continues the input
records' traces; the Validator's settings built by `validator.cli.service_settings` verify the topics
whose `signing.verify` is on with the keys they accept, and drop the metrics port when Prometheus is
off.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kafka_support import consume_all
from opentelemetry.sdk.trace import TracerProvider

from streamprov.agents import processor_main
from streamprov.config import load_config
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger.requests import decode_request
from streamprov.producer import ProvenanceProducer
from streamprov.signing import SIG_HEADER, HmacSigner, KeyRing
from streamprov.telemetry import StepTracing, span_context
from validator.cli import service_settings

SECRET = "pipeline-secret-0123456789abcdef"


def write_config(
    tmp_path: Path, bootstrap: str, out: str, *, prometheus: bool = True, requests: str = "unused"
) -> Path:
    path = tmp_path / "streamprov.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            kafka: {{bootstrap_servers: "{bootstrap}", client: {{session.timeout.ms: 6000}}}}
            streams: {{ledger_requests: {requests}}}
            ledger: {{id: wired-ledger}}
            telemetry:
              tracing: {{enabled: true, sampling_ratio: 1.0, exporter: none}}
              metrics: {{prometheus: {str(prometheus).lower()}}}
            signing:
              keys:
                pipeline-1: {{algorithm: hmac, secret_env: H1_SIGNING_SECRET}}
                old-1: {{algorithm: hmac, secret_env: H1_OLD_SECRET}}
            defaults:
              signing: {{key: pipeline-1}}
            topics:
              {out}: {{signing: {{verify: true, accept: [pipeline-1]}}}}
              unverified: {{}}
            """
        )
    )
    return path


def test_processor_main_signs_and_traces_from_the_config_file(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("H1_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("H1_OLD_SECRET", "an-older-secret-0123456789")
    src, out, dlq, requests = new_topic(), new_topic(), new_topic(), new_topic(prefix="ledger-req")
    path = write_config(tmp_path, kafka_bootstrap, out, requests=requests)
    upstream = StepTracing(TracerProvider())  # an always-sampled producer upstream
    producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap}, tracing=upstream)
    for i in range(3):
        producer.produce(src, json.dumps({"n": i}).encode(), f"k-{i}".encode(), data_id=f"d-{i}")
    assert producer.flush(30) == 0
    inputs = {
        ProvenanceHeader.from_headers(m.headers()).data_id: m  # type: ignore[union-attr]
        for m in consume_all(kafka_bootstrap, src, expected=3, timeout_s=30)
    }

    code = processor_main.main(
        ["--config-file", str(path), "--input", src, "--output", out, "--dlq", dlq, "--group", unique_group(),
         "--function", "processor_fns:enrich", "--max-records", "3", "--idle-timeout", "30",
         "--record-ledger"]
    )  # fmt: skip
    assert code == 0
    # --record-ledger: each application went to the sequencer's requests topic, for ledger.id
    sent = [
        decode_request(m.value())
        for m in consume_all(kafka_bootstrap, requests, expected=1, timeout_s=30, grace_s=1.0)
    ]
    assert {r.ledger_id for r in sent} == {"wired-ledger"}
    apps = [a for r in sent for a in r.expanded()]
    assert sorted(a.output.data_id for a in apps) == ["d-0", "d-1", "d-2"]
    assert {a.function_id for a in apps} == {"enrich"}

    config = load_config(path)
    verifier = KeyRing(config.signing).verifier_for(config.topic(out))
    assert verifier is not None
    outputs = consume_all(kafka_bootstrap, out, expected=3, timeout_s=30)
    assert len(outputs) == 3
    for msg in outputs:
        headers = msg.headers() or []
        assert verifier.problem(headers, msg.value()) is None  # signed with pipeline-1's secret
        sig = dict(headers)[SIG_HEADER]
        assert sig[3 : 3 + sig[2]] == b"pipeline-1"
        header = ProvenanceHeader.from_headers(headers)
        assert header is not None
        before = span_context(inputs[header.data_id].headers())
        after = span_context(headers)
        assert before is not None and after is not None
        assert after.trace_id == before.trace_id and after.span_id != before.span_id  # the map's span
        assert after.trace_flags.sampled
        assert dict(headers)[HEADER_KEY] == header.encode()


def test_validator_settings_verify_what_the_config_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("H1_SIGNING_SECRET", SECRET)
    monkeypatch.setenv("H1_OLD_SECRET", "an-older-secret-0123456789")
    path = write_config(tmp_path, "127.0.0.1:1", "checked", prometheus=False)
    config = load_config(path)
    settings = service_settings(config, KeyRing(config.signing))
    assert settings.metrics_port is None  # telemetry.metrics.prometheus: false
    checked, unverified = settings.policy("checked"), settings.policy("unverified")
    assert checked.verifier is not None and unverified.verifier is None
    assert settings.default_policy.verifier is None
    header = ProvenanceHeader.for_source("d", b"v").encode()
    assert checked.verifier.verify(header, b"v", HmacSigner("pipeline-1", SECRET).sign(header)) is None
    refused = checked.verifier.verify(
        header, b"v", HmacSigner("old-1", "an-older-secret-0123456789").sign(header)
    )
    assert refused is not None and "unknown key" in refused.reason  # accept: [pipeline-1] only
    with_port = service_settings(
        load_config(write_config(tmp_path, "127.0.0.1:1", "checked")), KeyRing(config.signing)
    )
    assert with_port.metrics_port == config.validator.metrics_port
