"""Tracing on a real broker: one trace follows a record source -> map -> reduce input -> validation; the
reduce output's span starts its own trace linking to its inputs' spans, and validating it joins that."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from kafka_support import FAST_GROUP_CONFIG, consume_all
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from streamprov.agents.processor import Processor
from streamprov.producer import ProvenanceProducer
from streamprov.telemetry import StepTracing, traceparent
from validator.service import Validator
from validator.settings import ServiceSettings

pytestmark = pytest.mark.kafka


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


def _by_name(spans: list[ReadableSpan], suffix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.endswith(suffix)]


def test_one_trace_from_source_through_map_reduce_and_validation(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    src, mid, out, dlq, alerts = (new_topic() for _ in range(5))
    config = {"bootstrap.servers": kafka_bootstrap, **FAST_GROUP_CONFIG}

    producer = ProvenanceProducer({"bootstrap.servers": kafka_bootstrap}, tracing=StepTracing(provider))
    items = [("a-0", b"a"), ("a-1", b"a"), ("b-0", b"b")]
    for i, (data_id, key) in enumerate(items):
        producer.produce(src, json.dumps({"n": i + 1}).encode(), key, data_id=data_id)
    assert producer.flush(30) == 0

    mapped = Processor(
        config,
        group_id=unique_group(),
        input_topics=src,
        output_topic=mid,
        dead_letter_topic=dlq,
        function=processor_fns.enrich,
        tracing=StepTracing(provider, consumer_group="map"),
    )
    with mapped:
        assert mapped.run(max_records=3, idle_timeout_s=30).records_out == 3
    reducer = Processor(
        config,
        group_id=unique_group(),
        input_topics=mid,
        output_topic=out,
        dead_letter_topic=dlq,
        function=processor_fns.sum_n,
        window_ms=3_600_000,
        flush_windows_on_stop=True,
        tracing=StepTracing(provider, consumer_group="reduce"),
    )
    with reducer:
        reducer.run(max_records=3, idle_timeout_s=30)
    outputs = consume_all(kafka_bootstrap, out, expected=2, timeout_s=30, grace_s=0.5)
    assert len(outputs) == 2 and all(traceparent(m.headers()) is not None for m in outputs)

    settings = ServiceSettings(
        kafka=config,
        topics=(mid, out),
        sources=(src,),
        alerts_topic=alerts,
        dead_letter_topic=dlq,
        state_dir=tmp_path / "state",
        group_id=unique_group(),
        http_host="127.0.0.1",
        http_port=0,
        commit_interval_s=0.2,
    )
    validator = Validator(settings, tracing=StepTracing(provider, consumer_group="validator"))
    thread = threading.Thread(target=validator.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: len(_by_name(list(exporter.get_finished_spans()), "validate")) >= 5, 60, "validation")
    finally:
        validator.stop()
        thread.join(60)
        validator.close()

    spans = list(exporter.get_finished_spans())
    publish, process = _by_name(spans, "publish"), _by_name(spans, "enrich process")
    receive, emit = _by_name(spans, "sum_n receive"), _by_name(spans, "sum_n emit")
    validate = _by_name(spans, "validate")
    assert (len(publish), len(process), len(receive), len(emit), len(validate)) == (3, 3, 3, 2, 5)
    assert all(s.kind is SpanKind.PRODUCER for s in publish)
    assert all(s.kind is SpanKind.CONSUMER for s in (*process, *receive, *validate))

    def one(found: list[ReadableSpan], data_id: str) -> ReadableSpan:
        (span,) = [s for s in found if s.attributes and s.attributes.get("streamprov.data_id") == data_id]
        return span

    for data_id, _ in items:
        p, m, r = one(publish, data_id), one(process, data_id), one(receive, data_id)
        trace_id = p.context.trace_id
        # One trace: source producer -> map -> reduce input -> validation of the map output.
        assert m.context.trace_id == r.context.trace_id == trace_id
        assert m.parent is not None and m.parent.span_id == p.context.span_id
        assert r.parent is not None and r.parent.span_id == m.context.span_id
        (v,) = [s for s in validate if s.context.trace_id == trace_id]
        assert v.parent is not None and v.parent.span_id == m.context.span_id
        attrs = m.attributes or {}
        assert attrs["messaging.destination.name"] == src and attrs["streamprov.function.id"] == "enrich"
        assert attrs["messaging.kafka.offset"] >= 0 and attrs["messaging.consumer.group.name"] == "map"
    for e in emit:
        # The reduce output starts a trace of its own that links to each input's span.
        assert e.parent is None
        group = "a" if e.attributes and e.attributes["streamprov.data_id"] == "a" else "b"
        inputs = {one(receive, d).context.span_id for d, k in items if k.decode() == group}
        assert {link.context.span_id for link in e.links} == inputs
        (v,) = [s for s in validate if s.context.trace_id == e.context.trace_id]
        assert v.parent is not None and v.parent.span_id == e.context.span_id
