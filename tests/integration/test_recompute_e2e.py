"""Recompute end to end on Apache Kafka, with the ledger on.

Pipeline through `streamprov.agents.processor`: source (compacted) -> map `enrich` (re-keyed by
group) -> map `tag`, and -> reduce `sum_n` (per group). One source record gets a new value; the
ChangeDetector emits a change event; policy -> planner -> executor -> PriorityPublisher must recompute
exactly the outputs derived from the old version (as a brute-force scan of the ledger finds them) and
publish them to the priority topics with the full provenance header (source checksum = the new
source's), a checksum that matches the value, and `streamprov.supersedes` naming the original record.
Nothing else is published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import consume_all, create_topic, record_view
from ledger_pipeline import brute_force_downstream, ledger_entries, value
from ledger_support import LEDGER, verifier
from recompute_pipeline import N, build_pipeline, change_source, priority_topics  # noqa: F401 - fixture

from recompute_manager.cache import ResultCache
from recompute_manager.executor import PLAN_HEADER, SUPERSEDES_HEADER, TASK_HEADER, Executor
from recompute_manager.outputs import OutputIndex, SourceIndex
from recompute_manager.planner import plan_for_change
from recompute_manager.policy import Action, TopicPolicy
from recompute_manager.priority import PRIORITY_HEADER, PriorityPublisher, PriorityRecord
from streamprov.changes import ChangeKind
from streamprov.checksum import ChecksumAlgorithm, compute, matches
from streamprov.config.models import RecomputeSettings
from streamprov.header import ProvenanceHeader
from streamprov.ledger import DataRef, LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader

pytestmark = pytest.mark.kafka


def test_one_changed_source_recomputes_exactly_its_outputs(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811 - the fixture
) -> None:
    bootstrap = kafka_bootstrap
    group = unique_group()  # the detector's, before and after the change (it remembers versions)
    p = build_pipeline(bootstrap, new_topic, unique_group, tmp_path, group)
    for t in p.outputs:
        priority_topics.append(create_topic(bootstrap, p.priority(t), partitions=2))

    changed, new_value = "id-007", value(1007)
    event = change_source(bootstrap, p, group, tmp_path, changed, new_value)
    assert event.kind is ChangeKind.SOURCE_CHANGED and event.source is not None
    old = DataRef.of(changed, p.sources[changed])
    assert event.source.previous_node == old

    # policy
    decision = TopicPolicy(p.src, RecomputeSettings()).on_change(event, 1000.0)
    assert decision.action is Action.RECOMPUTE, decision.reason

    # where the original outputs are, and the values of the intermediates the plan does not recompute
    config = {"bootstrap.servers": bootstrap}
    with ResultCache(tmp_path / "cache") as cache:
        outputs = OutputIndex(config, p.outputs, cache=cache)
        sources = SourceIndex(config, [p.src])
        try:
            assert outputs.catch_up() >= 2 * N
            assert sources.catch_up() >= N + 1
        finally:
            outputs.close()
            sources.close()
        assert sources.get(changed) == new_value

        entries = ledger_entries(bootstrap, p.ledger)
        expected = brute_force_downstream(entries, [old])
        assert len(expected) == 3  # enrich output, its tag, the group's sum
        with LedgerIndex(tmp_path / "index", LEDGER, verifier=verifier()) as idx:
            idx.catch_up(KafkaLedgerReader(bootstrap, p.ledger, idle_timeout_s=20.0))
            plan = plan_for_change(idx, event, supersedes=outputs.locations)
        assert set(plan.outputs) == expected and len(plan) == 3
        assert {t.topic for t in plan.tasks} == set(p.outputs)

        result = Executor(processor_fns.registry, sources, cache=cache, headers=outputs.headers).run_plan(
            plan
        )
        assert not result.dead and not result.skipped and len(result.changed) == 3

        publisher = PriorityPublisher(config, f"tx-{p.src}")
        try:
            sent = publisher.publish_all(
                (p.priority(r.task.topic), PriorityRecord.of(r)) for r in result.changed
            )
        finally:
            publisher.close()
        assert sent == 3

    new_checksum = compute(ChecksumAlgorithm.CRC32C, new_value)
    by_topic: dict[str, list[Any]] = {}
    for t in p.outputs:
        by_topic[t] = consume_all(bootstrap, p.priority(t), expected=1, timeout_s=30, grace_s=0.5)
    assert {t: len(m) for t, m in by_topic.items()} == {t: 1 for t in p.outputs}  # nothing else

    originals = {node: where for node, where in outputs.locations.items() if node in expected}
    task_ids = {t.task_id for t in plan.tasks}
    for topic, [msg] in by_topic.items():
        key, val, raw_headers = record_view(msg)
        assert val is not None
        headers = {k: v for k, v in raw_headers if v is not None}
        header = ProvenanceHeader.from_headers(raw_headers)
        assert header is not None
        assert matches(header.checksum, val)
        [(node, where)] = [(n, w) for n, w in originals.items() if w.topic == topic]
        assert header.data_id == node.data_id == (key or b"").decode()
        assert headers[SUPERSEDES_HEADER] == f"{where.topic}/{where.partition}/{where.offset}".encode()
        assert headers[TASK_HEADER].decode() in task_ids
        assert headers[PLAN_HEADER].decode() == plan.plan_id
        assert headers[PRIORITY_HEADER].startswith(b"confidence=low;")
        original = _original_header(bootstrap, where.topic, where.partition, where.offset)
        assert [s.function_id for s in header.lineage] == [s.function_id for s in original.lineage]
        assert header.checksum != node.checksum  # the value changed
        got = json.loads(val)
        if topic == p.mid:
            assert header.source_checksum == new_checksum
            assert got == {"n": 1007, "scaled": 3021}
        elif topic == p.tagged:
            assert header.source_checksum == new_checksum
            assert got == {"n": 1007, "scaled": 3021, "label": "tagged"}
        else:
            old_sum = json.loads(_original_value(bootstrap, where.topic, where.partition, where.offset))
            assert got == old_sum - 7 + 1007
            assert header.source_checksum != original.source_checksum  # digest over the new source


def _original(bootstrap: str, topic: str, partition: int, offset: int) -> Any:
    for msg in consume_all(bootstrap, topic, expected=10**6, timeout_s=3):
        if (msg.partition(), msg.offset()) == (partition, offset):
            return msg
    raise AssertionError(f"no record at {topic}/{partition}/{offset}")


def _original_header(bootstrap: str, topic: str, partition: int, offset: int) -> ProvenanceHeader:
    header = ProvenanceHeader.from_headers(_original(bootstrap, topic, partition, offset).headers() or [])
    assert header is not None
    return header


def _original_value(bootstrap: str, topic: str, partition: int, offset: int) -> bytes:
    val: bytes = _original(bootstrap, topic, partition, offset).value()
    return val
