"""Tracing without a broker: trace context in Kafka headers, spans per step, the unsampled fast path,
reduce span links, and no headers or spans when no TracerProvider is configured."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased

from streamprov.agents.processor import StepTransform
from streamprov.header import HEADER_KEY
from streamprov.registry import FunctionRegistry
from streamprov.stamp import SourceStamper
from streamprov.telemetry import (
    LinkAwareParentBased,
    StepTracing,
    extract,
    inject,
    sampled,
    span_context,
    traceparent,
)

registry = FunctionRegistry()


@registry.map("inc", "3")
def inc(value: dict[str, Any]) -> dict[str, Any]:
    return {"n": value["n"] + 1}


@registry.reduce("total", "1", initial=int)
def total(acc: int, value: dict[str, Any]) -> int:
    return acc + int(value["n"])


class Msg:
    def __init__(self, v: bytes, h: list[tuple[str, Any]], k: bytes = b"k", o: int = 0) -> None:
        self.v, self.h, self.k, self.o = v, h, k, o

    def value(self) -> bytes:
        return self.v

    def key(self) -> bytes:
        return self.k

    def headers(self) -> list[tuple[str, Any]]:
        return self.h

    def topic(self) -> str:
        return "in"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return self.o

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_000)


def _provider(sampler: Any = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler) if sampler is not None else TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _source(data_id: str, n: int, tracing: StepTracing | None = None) -> Msg:
    value = json.dumps({"n": n}).encode()
    headers: list[tuple[str, Any]] = [(HEADER_KEY, SourceStamper().header(data_id, value))]
    if tracing is not None:
        tracing.on_produce("in", data_id, headers)
    return Msg(value, headers, k=data_id.encode())


def test_headers_carry_w3c_trace_context_both_ways() -> None:
    provider, _ = _provider()
    span = provider.get_tracer("t").start_span("s")
    headers: list[tuple[str, Any]] = [("traceparent", b"stale"), ("other", b"x")]
    inject(headers, trace.set_span_in_context(span))
    tp = traceparent(headers)
    assert tp is not None and sampled(tp) and [k for k, _ in headers] == ["other", "traceparent"]
    ctx = span_context(headers)
    assert ctx is not None and ctx.trace_id == span.get_span_context().trace_id
    assert span_context({"traceparent": tp.decode()}) == ctx  # a mapping of str works too
    assert span_context([("traceparent", b"\xff garbage")]) is None
    assert trace.get_current_span(extract(None)).get_span_context().is_valid is False
    assert not sampled(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")


def test_map_span_is_a_child_of_the_source_span_and_is_injected() -> None:
    provider, exporter = _provider()
    tracing = StepTracing(provider, consumer_group="g")
    step = StepTransform(inc, output_topic="out", dead_letter_topic="dlq", tracing=tracing)
    src = _source("d-1", 1, tracing)
    (out,) = step.process(src)
    publish, process = exporter.get_finished_spans()
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert process.kind is trace.SpanKind.CONSUMER and publish.kind is trace.SpanKind.PRODUCER
    assert dict(process.attributes or {}) == {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": "in",
        "messaging.destination.partition.id": "2",
        "messaging.kafka.offset": 0,
        "messaging.consumer.group.name": "g",
        "streamprov.function.id": "inc",
        "streamprov.function.version": "3",
        "streamprov.data_id": "d-1",
    }
    ctx = span_context(out.headers)
    assert ctx is not None and ctx.span_id == process.context.span_id
    assert sum(k == "traceparent" for k, _ in out.headers) == 1


def test_an_unsampled_upstream_costs_no_span_and_keeps_its_context() -> None:
    provider, exporter = _provider(ParentBased(ALWAYS_OFF))
    tracing = StepTracing(provider)
    src = _source("d-1", 1, tracing)
    tp = traceparent(src.headers())
    assert tp is not None and not sampled(tp)
    (out,) = StepTransform(inc, output_topic="o", dead_letter_topic="d", tracing=tracing).process(src)
    assert traceparent(out.headers) == tp and exporter.get_finished_spans() == ()


def test_sampling_ratio_decides_at_the_root() -> None:
    provider, exporter = _provider(ParentBased(TraceIdRatioBased(0.01)))
    tracing = StepTracing(provider)
    step = StepTransform(inc, output_topic="o", dead_letter_topic="d", tracing=tracing)
    for i in range(2000):
        step.process(_source(f"d-{i}", i, tracing))
    publish = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.PRODUCER]
    process = [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.CONSUMER]
    assert 2 <= len(publish) <= 60 and len(process) == len(publish)


def test_reduce_output_links_to_its_inputs() -> None:
    provider, exporter = _provider()
    tracing = StepTracing(provider, max_links=2)
    step = StepTransform(total, output_topic="o", dead_letter_topic="d", window_ms=10_000, tracing=tracing)
    sources = [_source(f"d-{i}", i, tracing) for i in range(3)]
    for i, s in enumerate(sources):
        s.o, s.k = i, b"one-group"
        assert step.process(s) == []
    (out,) = step.flush()
    spans = exporter.get_finished_spans()
    receive = [s for s in spans if s.name == "total receive"]
    (emit,) = [s for s in spans if s.name == "total emit"]
    assert len(receive) == 3 and emit.parent is None
    assert [link.context.span_id for link in emit.links] == [r.context.span_id for r in receive[:2]]
    assert (emit.attributes or {})["streamprov.reduce.linked_inputs"] == 2
    ctx = span_context(out.headers)
    assert ctx is not None and ctx.span_id == emit.context.span_id


def test_without_a_tracer_provider_nothing_is_written() -> None:
    tracing = StepTracing()  # the global provider: the API's no-op unless an SDK was installed
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return  # another test installed a global provider; nothing to check here
    src = _source("d-1", 1, tracing)
    assert traceparent(src.headers()) is None
    (out,) = StepTransform(inc, output_topic="o", dead_letter_topic="d", tracing=tracing).process(src)
    assert traceparent(out.headers) is None


def test_linked_step_for_the_recompute_manager() -> None:
    provider, exporter = _provider()
    tracing = StepTracing(provider)
    inputs = [_source(f"d-{i}", i, tracing).headers() for i in range(2)]
    out: list[tuple[str, Any]] = []
    tracing.linked_step("recompute", [*inputs, []], out, {"streamprov.task": "t1"})
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "recompute"]
    assert len(span.links) == 2 and span_context(out) is not None


def test_link_aware_sampler_keeps_a_reduce_output_whose_input_was_sampled() -> None:
    sampled_inputs, _ = _provider()
    tracing_in = StepTracing(sampled_inputs)
    provider, exporter = _provider(LinkAwareParentBased(TraceIdRatioBased(0.0)))
    tracing = StepTracing(provider)
    step = StepTransform(total, output_topic="o", dead_letter_topic="d", window_ms=10_000, tracing=tracing)
    for i in range(2):
        src = _source(f"d-{i}", i, tracing_in)  # a sampled upstream trace
        src.o, src.k = i, b"g"
        step.process(src)
    (out,) = step.flush()
    (emit,) = [s for s in exporter.get_finished_spans() if s.name == "total emit"]
    assert len(emit.links) == 2 and span_context(out.headers) is not None
    # Without sampled links a root follows the ratio (0 here); with a parent, the parent decides.
    unsampled = provider.get_tracer("t").start_span("root")
    assert not unsampled.is_recording()
    assert "LinkAwareParentBased" in LinkAwareParentBased(ALWAYS_OFF).get_description()
