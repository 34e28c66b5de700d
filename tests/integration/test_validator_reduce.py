"""Source drift for reduce outputs on Apache Kafka: a source -> map -> reduce pipeline records into a
ledger; the Validator reads that ledger, so when one source record changes it flags the map output
derived from it and the one reduce output (of four) whose inputs included it, naming the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import processor_fns
import pytest
from ledger_pipeline import ledger_writer, produce_sources, run_step, value
from ledger_support import LEDGER
from test_validator import http_get, read_alerts, running, settings_for, wait_until

from streamprov.agents.processor import AT_LEAST_ONCE
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG
from validator.alerts import AlertKind
from validator.service import Validator

pytestmark = pytest.mark.kafka

COMPACTED = {"cleanup.policy": "compact"}


def test_a_changed_source_flags_the_reduce_output_it_went_into(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n, groups = 24, 4
    src = new_topic(2, COMPACTED, prefix="src")
    mid, sums, dlq = new_topic(2), new_topic(), new_topic()
    alerts, vdlq = new_topic(), new_topic()
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        run_step(
            kafka_bootstrap,
            processor_fns.enrich,
            src,
            mid,
            dlq,
            unique_group(),
            writer,
            records=n,
            key_by=lambda v: f"g{v['n'] % groups}",
        )
        run_step(
            kafka_bootstrap,
            processor_fns.sum_n,
            mid,
            sums,
            dlq,
            unique_group(),
            writer,
            records=n,
            guarantee=AT_LEAST_ONCE,
            window_ms=3_600_000,
            flush_windows_on_stop=True,
        )
    changed = "id-007"  # in group g3 (7 % 4)
    produce_sources(kafka_bootstrap, src, [(changed, value(1007))])

    s = settings_for(
        kafka_bootstrap,
        tmp_path,
        topics=(mid, sums),
        sources=(src,),
        alerts=alerts,
        dlq=vdlq,
        group=unique_group(),
        ledger_topic=ledger_topic,
        ledger_id=LEDGER,
    )
    with running(Validator(s)) as v:
        wait_until(lambda: v.stats.checked >= n + groups, 90, "every record checked")
        (port,) = v.http_ports
        _, metrics = http_get(port, "/metrics")
    assert f"streamprov_validator_reduce_drift_checked_total {groups}" in metrics.splitlines()
    assert "streamprov_validator_drift_skipped_total" not in metrics  # nothing left unchecked

    got = read_alerts(kafka_bootstrap, alerts, expected=2, timeout_s=30, grace_s=1.5)
    by_topic = {a.topic: a for a in got}
    assert len(got) == 2 and set(by_topic) == {mid, sums}, [a.describe() for a in got]
    assert all(a.kind is AlertKind.SOURCE_CHANGED for a in got)
    assert by_topic[mid].data_id == changed
    total = by_topic[sums]
    assert total.data_id == "g3"
    assert total.evidence.expected.startswith("sha256:") and total.evidence.actual.startswith("sha256:")
    assert total.evidence.actual != total.evidence.expected
    old = compute(ChecksumAlgorithm.CRC32C, sources[changed]).hex()
    assert f"'{changed}' (was {old}, now {src}/" in total.evidence.reason
    assert f"1 of the {n // groups} source record(s)" in total.evidence.reason
