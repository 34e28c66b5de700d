"""Recompute spans (`RecomputeTracing` on the executor) without a broker: parent = the superseded
record's context, links to the cause and to the tasks read, sampling follows the superseded record,
dead letters end in an error span; without tracing nothing changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased
from opentelemetry.trace import SpanContext, StatusCode
from test_recompute_cache_executor import change, ledger, ref, registry

from recompute_manager.executor import DeadLetter, Executor, Recomputed, RetryPolicy
from recompute_manager.planner import plan_for_change
from recompute_manager.priority import PriorityRecord
from recompute_manager.tracing import LINK_KIND, RecomputeTracing, cause_headers
from streamprov.agents.dead_letter import REASON_HEADER
from streamprov.header import HEADER_KEY
from streamprov.ledger import DataRef
from streamprov.signing import SIG_HEADER, HmacSigner, Verifier
from streamprov.telemetry import TRACEPARENT, span_context


def provider(sampler: object | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    p = TracerProvider() if sampler is None else TracerProvider(sampler=sampler)  # type: ignore[arg-type]
    p.add_span_processor(SimpleSpanProcessor(exporter))
    return p, exporter


def record_of(p: TracerProvider, name: str, sampled: bool = True) -> tuple[tuple[str, bytes], ...]:
    """The trace headers an upstream stage would have written on a record (a span of its own)."""
    span = p.get_tracer("upstream").start_span(name)
    ctx = span.get_span_context()
    span.end()
    flags = "01" if sampled else "00"
    return ((TRACEPARENT, f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{flags}".encode()),)


def ctx_of(headers: object) -> SpanContext:
    found = span_context(headers)  # type: ignore[arg-type]
    assert found is not None
    return found


def recompute_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name.endswith(" recompute")]


def test_chain_continues_each_superseded_trace_and_links_cause_and_inputs(tmp_path: Path) -> None:
    p, exporter = provider()
    reg = registry()
    originals: dict[DataRef, tuple[tuple[str, bytes], ...]] = {
        ref("s", 2): record_of(p, "double process"),
        ref("s", 3): record_of(p, "inc process"),
    }
    cause = record_of(p, "alert")
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
        tracing = RecomputeTracing(p, originals=originals)
        result = Executor(reg, {"s": b"5"}, tracing=tracing).run_plan(
            plan, causes=[cause, [("other", b"x")], None]
        )
    first, second = result.changed
    spans = {s.name: s for s in recompute_spans(exporter)}
    assert set(spans) == {"double recompute", "inc recompute"}
    for done, span, node in (
        (first, spans["double recompute"], ref("s", 2)),
        (second, spans["inc recompute"], ref("s", 3)),
    ):
        parent = ctx_of(originals[node])
        assert span.context.trace_id == parent.trace_id  # the superseded record's trace goes on
        assert span.parent is not None and span.parent.span_id == parent.span_id
        published = ctx_of(done.headers())  # ... into the record the priority topic gets
        assert (published.trace_id, published.span_id) == (span.context.trace_id, span.context.span_id)
        attrs = span.attributes or {}
        assert attrs["streamprov.recompute.task_id"] == done.task.task_id
        assert (
            attrs["streamprov.recompute.attempts"] == 1 and attrs["streamprov.recompute.unchanged"] is False
        )
        assert attrs["streamprov.data_id"] == "s"
    cause_ctx = ctx_of(cause)
    links = {
        (link.context.span_id, (link.attributes or {})[LINK_KIND]) for link in spans["inc recompute"].links
    }
    # the cause once (headers without context are skipped), and the task it read (double's span)
    assert links == {(cause_ctx.span_id, "cause"), (spans["double recompute"].context.span_id, "input")}
    assert [(link.attributes or {})[LINK_KIND] for link in spans["double recompute"].links] == ["cause"]


def test_a_record_without_trace_context_starts_a_trace_and_an_unsampled_one_stays_unsampled(
    tmp_path: Path,
) -> None:
    p, exporter = provider(ParentBased(ALWAYS_OFF))  # roots never sampled: only parents decide
    reg = registry()
    originals = {ref("s", 2): ((TRACEPARENT, b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-00"),)}
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
        result = Executor(reg, {"s": b"5"}, tracing=RecomputeTracing(p, originals=originals)).run_plan(plan)
    first, second = result.changed
    assert recompute_spans(exporter) == []
    unsampled = ctx_of(first.headers())
    assert unsampled.trace_id == int("a" * 32, 16) and not unsampled.trace_flags.sampled
    root = ctx_of(second.headers())  # s/3 had no context: a new trace, not sampled by ALWAYS_OFF
    assert root.trace_id != unsampled.trace_id and not root.trace_flags.sampled


def test_dead_letter_ends_the_span_with_an_error_and_carries_its_context(tmp_path: Path) -> None:
    p, exporter = provider()
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
    ex = Executor(reg, {}, retry=RetryPolicy(1, base_delay_s=0), tracing=RecomputeTracing(p))
    done = ex.run(plan.tasks[0], causes=[record_of(p, "change")])
    assert isinstance(done, DeadLetter) and done.attempts == 2
    (span,) = recompute_spans(exporter)
    assert span.status.status_code is StatusCode.ERROR and "missing" in (span.status.description or "")
    assert span.parent is None and [(lk.attributes or {})[LINK_KIND] for lk in span.links] == ["cause"]
    headers = dict((k, v) for k, v in done.headers() if v is not None)
    assert REASON_HEADER in headers
    assert ctx_of(list(headers.items())).span_id == span.context.span_id


def test_without_tracing_records_carry_no_trace_context(tmp_path: Path) -> None:
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
        result = Executor(reg, {"s": b"5"}).run_plan(plan, causes=[((TRACEPARENT, b"junk"),)])
    assert all(isinstance(r, Recomputed) and r.trace == () for r in result.recomputed)
    assert all(k != TRACEPARENT for r in result.changed for k, _ in r.headers())


def test_an_exception_out_of_the_run_still_ends_the_span(tmp_path: Path) -> None:
    p, exporter = provider()
    with ledger(tmp_path, registry()) as idx:
        task = plan_for_change(idx, change("s", 1, 5), topic="out").tasks[0]
    with pytest.raises(KeyboardInterrupt):
        RecomputeTracing(p).traced(task, {}, (), _interrupt)
    (span,) = recompute_spans(exporter)
    assert span.status.status_code is StatusCode.ERROR
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left attached


def test_cause_headers_keeps_only_the_trace_context() -> None:
    headers = [
        ("streamprov", b"h"),
        (TRACEPARENT, b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01"),
        ("tracestate", "a=b"),
    ]
    assert cause_headers(headers) == (headers[1], ("tracestate", b"a=b"))
    assert cause_headers(None) == () and cause_headers({"x": b"y"}) == ()


def _interrupt() -> Recomputed:
    raise KeyboardInterrupt


def test_priority_record_signed_with_the_topics_key_and_still_traced(tmp_path: Path) -> None:
    """The Recompute Manager's corrections pass a Validator that requires signatures (PriorityRecord
    signs the recomputed header) and keep their trace context."""
    p, _ = provider()
    reg = registry()
    signer = HmacSigner("pipeline-1", b"a-secret-only-the-pipeline-has")
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
        result = Executor(reg, {"s": b"5"}, tracing=RecomputeTracing(p)).run_plan(plan)
    done = result.changed[-1]
    record = PriorityRecord.of(done, signer=signer)
    keys = [k for k, _ in record.headers]
    assert keys[:2] == [HEADER_KEY, SIG_HEADER] and TRACEPARENT in keys
    assert Verifier.for_signers([signer]).problem(list(record.headers), record.value) is None
    unsigned = PriorityRecord.of(done)
    assert SIG_HEADER not in dict(unsigned.headers) and list(unsigned.headers) == done.headers()
    problem = Verifier.for_signers([signer]).problem(list(unsigned.headers), unsigned.value)
    assert problem is not None and "unsigned" in problem.reason
