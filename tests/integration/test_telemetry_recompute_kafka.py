"""One trace source -> map -> reduce -> recompute on Apache Kafka (in-memory span exporter).

A traced pipeline (ProvenanceProducer -> map `enrich` -> reduce `sum_n`, the ledger on) runs; one
source record gets a new version; the library pieces of the Recompute Manager (ChangeDetector ->
planner -> Executor with `RecomputeTracing` -> PriorityPublisher) republish the affected outputs;
a traced processor consumes the priority topic. The changed record's trace must hold its source
`publish`, the map's `process`, the reduce's `receive`, the map output's `recompute` and the priority
consumer's `process`, each the child of the one before it where the data flowed; the reduce output's
`recompute` continues the reduce output's own trace and links to the map output's `recompute` (its
input) and to the cause.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import processor_fns
from kafka_support import FAST_GROUP_CONFIG, consume_all, create_topic, delete_topics
from ledger_pipeline import ledger_writer, run_step, value
from ledger_support import LEDGER, verifier
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from recompute_pipeline import open_detector

from recompute_manager.cache import ResultCache
from recompute_manager.executor import Executor
from recompute_manager.outputs import OutputIndex, SourceIndex
from recompute_manager.planner import plan_for_change
from recompute_manager.priority import PriorityPublisher, PriorityRecord
from recompute_manager.tracing import LINK_KIND, RecomputeTracing
from streamprov.agents.processor import AT_LEAST_ONCE, Processor
from streamprov.changes import ChangeEvent
from streamprov.config.models import TopicSettings
from streamprov.ledger import LedgerIndex
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerReader
from streamprov.producer import ProvenanceProducer
from streamprov.telemetry import StepTracing, span_context, traceparent

N, GROUPS, CHANGED = 6, 2, "id-3"


def _named(spans: list[ReadableSpan], name: str, data_id: str | None = None) -> list[ReadableSpan]:
    return [
        s
        for s in spans
        if s.name == name and (data_id is None or (s.attributes or {}).get("streamprov.data_id") == data_id)
    ]


def test_one_trace_spans_source_map_reduce_and_recompute(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    bootstrap = kafka_bootstrap
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # ParentBased(ALWAYS_ON): every trace sampled
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    src = new_topic(1, {"cleanup.policy": "compact"}, prefix="src")
    mid, sums, tagged, dlq = new_topic(2), new_topic(), new_topic(), new_topic()
    changes, ledger = new_topic(1, prefix="changes"), new_topic(1, LEDGER_TOPIC_CONFIG, prefix="ledger")
    priority = {t: TopicSettings().priority_topic_name(t) for t in (mid, sums)}
    for topic in priority.values():
        create_topic(bootstrap, topic, partitions=2)
    detector_group = unique_group()
    try:
        # -- the traced pipeline: source -> enrich (re-keyed by group) -> sum_n -----------------------
        producer = ProvenanceProducer({"bootstrap.servers": bootstrap}, tracing=StepTracing(provider))
        old_values = {f"id-{i}": value(i) for i in range(N)}
        for data_id, v in old_values.items():
            producer.produce(src, v, data_id)
        assert producer.flush(30) == 0
        with ledger_writer(bootstrap, ledger) as writer:
            with open_detector(bootstrap, detector_group, src, changes, ledger, tmp_path, writer) as d:
                assert d.run(max_records=N, idle_timeout_s=20).first_seen == N
            map_tracing = StepTracing(provider, consumer_group="map")
            run_step(bootstrap, processor_fns.enrich, src, mid, dlq, unique_group(), writer, records=N,
                     key_by=lambda v: f"g{v['n'] % GROUPS}", tracing=map_tracing)  # fmt: skip
            run_step(bootstrap, processor_fns.sum_n, mid, sums, dlq, unique_group(), writer, records=N,
                     guarantee=AT_LEAST_ONCE, window_ms=3_600_000, flush_windows_on_stop=True,
                     tracing=StepTracing(provider, consumer_group="reduce"))  # fmt: skip

        # -- a new version of one source record; the detector's change event -------------------------
        producer.produce(src, value(1003), CHANGED)
        assert producer.flush(30) == 0
        with (
            ledger_writer(bootstrap, ledger) as writer,
            open_detector(bootstrap, detector_group, src, changes, ledger, tmp_path, writer) as d,
        ):
            assert d.run(max_records=1, idle_timeout_s=20).events == 1
        [change_msg] = consume_all(bootstrap, changes, expected=1, timeout_s=30, grace_s=0.3)
        event = ChangeEvent.decode(change_msg.value())
        [new_source] = [
            m for m in consume_all(bootstrap, src, expected=N + 1, timeout_s=30, grace_s=0.3)
            if m.key() == CHANGED.encode() and m.value() == value(1003)
        ]  # fmt: skip
        # The change event carries the trace context of the new source version that caused it.
        assert traceparent(change_msg.headers()) is not None
        assert traceparent(change_msg.headers()) == traceparent(new_source.headers())

        # -- Recompute Manager pieces, with tracing ------------------------------------------------
        config = {"bootstrap.servers": bootstrap}
        with ResultCache(tmp_path / "cache") as cache:
            outputs = OutputIndex(config, [mid, sums], cache=cache)
            sources = SourceIndex(config, [src])
            try:
                assert outputs.catch_up() == N + GROUPS
                sources.catch_up()
            finally:
                outputs.close()
                sources.close()
            assert len(outputs.trace_headers) == N + GROUPS  # every traced output kept its context
            with LedgerIndex(tmp_path / "index", LEDGER, verifier=verifier()) as idx:
                idx.catch_up(KafkaLedgerReader(bootstrap, ledger, idle_timeout_s=20.0))
                plan = plan_for_change(idx, event, supersedes=outputs.locations)
            tracing = RecomputeTracing(provider, originals=outputs.trace_headers)
            executor = Executor(
                processor_fns.registry, sources, cache=cache, headers=outputs.headers, tracing=tracing
            )
            result = executor.run_plan(plan, causes=[change_msg.headers()])
            assert not result.dead and len(result.changed) == 2
            publisher = PriorityPublisher(config, f"tx-{src}")
            try:
                publisher.publish_all((priority[r.task.topic], PriorityRecord.of(r)) for r in result.changed)
            finally:
                publisher.close()

        # -- a consumer of the priority topic continues the trace -----------------------------------
        [mid_fix] = consume_all(bootstrap, priority[mid], expected=1, timeout_s=30, grace_s=0.3)
        [sum_fix] = consume_all(bootstrap, priority[sums], expected=1, timeout_s=30, grace_s=0.3)
        consumer = Processor(
            {"bootstrap.servers": bootstrap, **FAST_GROUP_CONFIG},
            group_id=unique_group(),
            input_topics=priority[mid],
            output_topic=tagged,
            dead_letter_topic=dlq,
            function=processor_fns.tag,
            tracing=StepTracing(provider, consumer_group="priority-consumer"),
        )
        with consumer:
            assert consumer.run(max_records=1, idle_timeout_s=30).records_out == 1
    finally:
        delete_topics(bootstrap, list(priority.values()))

    spans = list(exporter.get_finished_spans())
    # the old version's publish, then the new version's (the cause)
    publish, new_publish = sorted(_named(spans, f"{src} publish", CHANGED), key=lambda s: s.start_time or 0)
    [process] = _named(spans, "enrich process", CHANGED)
    [receive] = _named(spans, "sum_n receive", CHANGED)
    [map_recompute] = _named(spans, "enrich recompute")
    [sum_recompute] = _named(spans, "sum_n recompute")
    [consumed] = _named(spans, "tag process")
    group = f"g{3 % GROUPS}"
    [emit] = _named(spans, "sum_n emit", group)

    # One trace: source -> map -> reduce (input) -> recompute of the map output -> priority consumer.
    trace_id = publish.context.trace_id
    chain = [publish, process, receive, map_recompute, consumed]
    assert {s.context.trace_id for s in chain} == {trace_id}
    parent_of = {s.name: s.parent.span_id if s.parent else None for s in chain}
    assert parent_of == {
        publish.name: None,
        "enrich process": publish.context.span_id,
        "sum_n receive": process.context.span_id,
        "enrich recompute": process.context.span_id,  # the superseded map output's span
        "tag process": map_recompute.context.span_id,  # read from the priority topic
    }
    assert map_recompute.kind is SpanKind.INTERNAL and consumed.kind is SpanKind.CONSUMER
    attrs = map_recompute.attributes or {}
    assert attrs["streamprov.data_id"] == CHANGED and attrs["streamprov.recompute.topic"] == mid
    assert attrs["streamprov.recompute.plan_id"] == plan.plan_id
    assert attrs["streamprov.supersedes"].startswith(f"{mid}/")

    # The priority records carry the recompute spans' contexts.
    for msg, span in ((mid_fix, map_recompute), (sum_fix, sum_recompute)):
        ctx = span_context(msg.headers())
        assert ctx is not None and (ctx.trace_id, ctx.span_id) == (
            span.context.trace_id,
            span.context.span_id,
        )

    # The reduce output's recompute continues the reduce output's trace (a root linking its inputs) ...
    assert sum_recompute.context.trace_id == emit.context.trace_id != trace_id
    assert sum_recompute.parent is not None and sum_recompute.parent.span_id == emit.context.span_id
    assert (sum_recompute.attributes or {})["streamprov.data_id"] == group
    # ... and links to the cause and to what it read: the map output's recompute (same plan) and the
    # stored map outputs of the group's other members (their `enrich process` spans).
    links = {(link.context.span_id, (link.attributes or {})[LINK_KIND]) for link in sum_recompute.links}
    members = [f"id-{i}" for i in range(N) if i % GROUPS == 3 % GROUPS and f"id-{i}" != CHANGED]
    others = {_named(spans, "enrich process", d)[0].context.span_id for d in members}
    assert links == {
        (new_publish.context.span_id, "cause"),
        (map_recompute.context.span_id, "input"),
        *((span_id, "input") for span_id in others),
    }
    assert [(link.attributes or {})[LINK_KIND] for link in map_recompute.links] == ["cause"]
    assert json.loads(mid_fix.value())["n"] == 1003
