"""Change detection end to end on Apache Kafka, with the ledger on.

Pipeline: source (compacted) -> map `enrich` (re-keyed by group) -> map `tag`, and -> reduce `sum_n`
(per group). A ChangeDetector watches the source topic. Then one source record gets a new value, one
is deleted, and `enrich` gets a new version: each change event must name exactly the outputs derived
from what changed, in dependency order, as a brute-force scan of the ledger topic finds them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import Record, consume_all, produce
from ledger_pipeline import (
    CTX,
    brute_force_downstream,
    ledger_entries,
    ledger_writer,
    produce_sources,
    run_step,
    value,
)
from ledger_support import LEDGER, verifier

from streamprov.agents.processor import AT_LEAST_ONCE
from streamprov.changes import ChangeDetector, ChangeEvent, ChangeKind
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.ledger import ApplicationKind, DataRef, LedgerEntry, LedgerIndex, LedgerWriter
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader
from streamprov.producer import ProvenanceProducer
from streamprov.registry import FunctionRegistry

pytestmark = pytest.mark.kafka

COMPACTED = {"cleanup.policy": "compact"}


def _dependency_ordered(event: ChangeEvent, entries: list[LedgerEntry], root: set[DataRef]) -> bool:
    """Each impacted output's producing application has all its affected inputs earlier in the list."""
    apps = {e.entry_id: e.application for e in entries}
    affected = {o.node for o in event.impact.outputs}
    seen = set(root)
    for o in event.impact.outputs:
        app = apps[o.entry_id]
        if app.output != o.node:
            return False
        if any(i in affected and i not in seen for i in app.inputs):
            return False
        seen.add(o.node)
    return True


def _events(bootstrap: str, topic: str, expected: int) -> list[ChangeEvent]:
    got = consume_all(bootstrap, topic, expected=expected, timeout_s=30, grace_s=0.5)
    return [ChangeEvent.decode(m.value()) for m in got]


def _detector(
    bootstrap: str, src: str, changes: str, group: str, tmp: Path, writer: LedgerWriter | None, **kw: Any
) -> ChangeDetector:
    ledger_topic = kw.pop("ledger_topic")
    index = LedgerIndex(tmp / "index", LEDGER, verifier=verifier())
    return ChangeDetector(
        {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        group_id=group,
        source_topics=src,
        changes_topic=changes,
        index=index,
        ledger=KafkaLedgerReader(bootstrap, ledger_topic, idle_timeout_s=20.0),
        state_dir=tmp / "state",
        writer=writer,
        context=CTX,
        device_id="detector-0",
        **kw,
    )


def test_change_events_name_exactly_the_derived_outputs(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n, groups = 60, 4
    src = new_topic(2, COMPACTED, prefix="src")
    mid, tagged, sums, dlq = new_topic(2), new_topic(), new_topic(), new_topic()
    changes = new_topic(2, prefix="changes")
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    sources = produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))

    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        detector = _detector(
            kafka_bootstrap, src, changes, unique_group(), tmp_path, writer, ledger_topic=ledger_topic
        )
        with detector:
            stats = detector.run(max_records=n, idle_timeout_s=20)
            assert (stats.first_seen, stats.changed, stats.events) == (n, 0, 0)

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
            run_step(kafka_bootstrap, processor_fns.tag, mid, tagged, dlq, unique_group(), writer, records=n)
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

            # one new version, one re-send of the same content, one deletion
            changed, deleted = "id-007", "id-013"
            new_value = value(1007)
            producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap})
            producer.produce(src, new_value, changed)
            producer.produce(src, sources["id-020"], "id-020")
            assert producer.flush(30) == 0
            produce(kafka_bootstrap, src, [Record(None, deleted.encode())])
            stats = detector.run(max_records=3, idle_timeout_s=20)
            assert (stats.changed, stats.deleted, stats.unchanged, stats.events) == (1, 1, 1, 2)

            # the registered `enrich` is now version 2
            registry = FunctionRegistry()

            @registry.map("enrich", "2", factor=3)
            def enrich_v2(value: dict[str, Any], factor: int, delay_ms: float = 0) -> dict[str, Any]:
                return {**value, "scaled": value["n"] * factor, "v": 2}

            registry.add(processor_fns.tag.func, "tag", "1")
            [fn_event] = detector.check_functions(registry)
            assert detector.check_functions(registry) == []  # reported once

    entries = ledger_entries(kafka_bootstrap, ledger_topic)
    events = {e.kind: e for e in _events(kafka_bootstrap, changes, 3)}
    assert set(events) == {ChangeKind.SOURCE_CHANGED, ChangeKind.SOURCE_DELETED, ChangeKind.FUNCTION_CHANGED}

    # the changed record: exactly what derives from its previous version
    ev = events[ChangeKind.SOURCE_CHANGED]
    assert ev.source is not None and ev.source.data_id == changed
    old = DataRef.of(changed, sources[changed])
    assert ev.source.previous_node == old
    assert ev.source.current == compute(ChecksumAlgorithm.CRC32C, new_value)
    expected = brute_force_downstream(entries, [old])
    assert len(expected) == 3  # enrich output, tag output, the group's sum
    assert set(ev.impact.nodes) == expected and ev.impact.total == 3
    assert not ev.impact.truncated and ev.impact.complete
    assert ev.impact.outputs[0].function_id == "enrich" and ev.impact.outputs[0].depth == 1
    assert _dependency_ordered(ev, entries, {old})
    assert ev.key == changed.encode()
    sources_recorded = {e.application.output for e in entries if e.application.kind is ApplicationKind.SOURCE}
    assert ev.source.current_node in sources_recorded and old in sources_recorded
    assert ev.source.ledger_entry_id in {e.entry_id for e in entries}

    gone = events[ChangeKind.SOURCE_DELETED]
    assert gone.source is not None and gone.source.current is None
    old_deleted = DataRef.of(deleted, sources[deleted])
    assert set(gone.impact.nodes) == brute_force_downstream(entries, [old_deleted]) != set()

    # the function change: every output of enrich@1 and everything derived from them
    assert fn_event.function is not None and fn_event.function.previous_version == "1"
    assert fn_event.function.current_version == "2"
    enrich_outputs = {e.application.output for e in entries if e.application.function_key == ("enrich", "1")}
    expected_fn = enrich_outputs | brute_force_downstream(entries, enrich_outputs)
    assert (
        fn_event.impact.total
        == len(expected_fn)
        == n + n + len({o for o in expected_fn if o.data_id[:1] == "g"})
    )
    assert set(fn_event.impact.nodes) == expected_fn
    assert _dependency_ordered(fn_event, entries, set())
    assert events[ChangeKind.FUNCTION_CHANGED] == fn_event


def test_a_large_impact_is_bounded(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    n = 30
    src, mid, dlq = new_topic(1, COMPACTED, prefix="src"), new_topic(), new_topic()
    changes = new_topic(prefix="changes")
    ledger_topic = new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    produce_sources(kafka_bootstrap, src, ((f"id-{i:03d}", value(i)) for i in range(n)))
    with ledger_writer(kafka_bootstrap, ledger_topic) as writer:
        run_step(kafka_bootstrap, processor_fns.enrich, src, mid, dlq, unique_group(), writer, records=n)
    detector = _detector(
        kafka_bootstrap,
        src,
        changes,
        unique_group(),
        tmp_path,
        None,
        ledger_topic=ledger_topic,
        max_outputs=7,
    )
    with detector:
        changed = dataclasses.replace(processor_fns.enrich, version="9", code_hash=b"\x00" * 16)
        [event] = detector.check_functions([changed])
    assert event.impact.total == n and len(event.impact.outputs) == 7 and event.impact.truncated
    assert json.loads(json.dumps(event.describe()))["impact"]["total"] == n
    assert [e.kind for e in _events(kafka_bootstrap, changes, 1)] == [ChangeKind.FUNCTION_CHANGED]
