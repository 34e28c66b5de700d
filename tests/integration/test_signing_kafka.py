"""Signed provenance on a real broker: a signing producer and map step, a Validator verifying the output
topic; a forged record (header re-computed without the key, valid checksum) and a tampered signature
are flagged `bad_signature`, the genuine records pass."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import FAST_GROUP_CONFIG, Record, consume_all, produce

from streamprov.agents.processor import Processor
from streamprov.header import HEADER_KEY
from streamprov.producer import ProvenanceProducer
from streamprov.signing import SIG_HEADER, HmacSigner, Verifier
from streamprov.stamp import InputRecord, MapStamper
from validator.alerts import Alert, AlertKind
from validator.checks import TopicPolicy
from validator.service import Validator
from validator.settings import ServiceSettings

pytestmark = pytest.mark.kafka


def test_validator_flags_forged_and_tampered_records_on_kafka(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    signer = HmacSigner("pipeline-1", b"a-secret-only-the-pipeline-has")
    src, out, dlq, alerts = (new_topic() for _ in range(4))
    config = {"bootstrap.servers": kafka_bootstrap, **FAST_GROUP_CONFIG}
    producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap}, signer=signer)
    for i in range(5):
        producer.produce(src, json.dumps({"n": i}).encode(), f"d-{i}".encode())
    assert producer.flush(30) == 0
    mapped = Processor(
        config,
        group_id=unique_group(),
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        signer=signer,
    )
    with mapped:
        assert mapped.run(max_records=5, idle_timeout_s=30).records_out == 5
    genuine = consume_all(kafka_bootstrap, out, expected=5, timeout_s=30)
    assert all(dict(m.headers() or [])[SIG_HEADER] for m in genuine)

    # An attacker writes a forged value with a header re-computed by the public code (valid checksum)
    # and copies a genuine signature; another record has a genuine header with one signature bit flipped.
    (template,) = [m for m in genuine if m.key() == b"d-0"]
    forged_value = json.dumps({"n": 0, "scaled": 999_999}).encode()
    (source,) = [m for m in consume_all(kafka_bootstrap, src, expected=5, timeout_s=30) if m.key() == b"d-0"]
    src_header = dict(source.headers() or [])[HEADER_KEY]
    forged_header = MapStamper(processor_fns.enrich, verify_input=False).stamp(
        InputRecord(b"{}", [(HEADER_KEY, src_header)], None, src, 0, 0), forged_value
    )
    genuine_sig = dict(template.headers() or [])[SIG_HEADER]
    assert genuine_sig is not None
    flipped = genuine_sig[:-1] + bytes([genuine_sig[-1] ^ 1])
    (second,) = [m for m in genuine if m.key() == b"d-1"]
    produce(
        kafka_bootstrap,
        out,
        [
            Record(forged_value, b"d-0", [(HEADER_KEY, forged_header), (SIG_HEADER, genuine_sig)]),
            Record(
                second.value(),
                b"d-1",
                [(HEADER_KEY, dict(second.headers() or [])[HEADER_KEY]), (SIG_HEADER, flipped)],
            ),
        ],
    )

    settings = ServiceSettings(
        kafka=config,
        topics=(out,),
        sources=(src,),
        alerts_topic=alerts,
        dead_letter_topic=dlq,
        state_dir=tmp_path / "state",
        group_id=unique_group(),
        policies={out: TopicPolicy(verifier=Verifier.for_signers([signer]))},
        http_host="127.0.0.1",
        http_port=0,
        commit_interval_s=0.2,
    )
    validator = Validator(settings)
    thread = threading.Thread(target=validator.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while validator.stats.checked < 7 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert validator.stats.checked >= 7
    finally:
        validator.stop()
        thread.join(60)
        validator.close()
    messages = consume_all(kafka_bootstrap, alerts, expected=2, timeout_s=30, grace_s=1.0)
    found = [Alert.decode(m.value() or b"") for m in messages]
    last_genuine = max(m.offset() or 0 for m in genuine)
    assert sorted((a.kind, a.data_id) for a in found) == [
        (AlertKind.BAD_SIGNATURE, "d-0"),
        (AlertKind.BAD_SIGNATURE, "d-1"),
    ]
    assert all(a.offset > last_genuine for a in found)  # the genuine records passed
    assert all("without the pipeline's key" in a.evidence.reason for a in found)
