"""OpenTelemetry spans for recompute tasks: a corrected record continues the trace of the one it replaces.

One INTERNAL span `<function id> recompute` per executed task (all its attempts, so retries and
backoff are inside it). Its parent is the trace context of the record the task supersedes (that
record's `traceparent`, as `OutputIndex.trace_headers` kept it), so the source -> map -> reduce trace
of a record goes on into its recompute; the published priority record carries the span's context,
so a consumer of `<topic>.priority` continues the same trace. It links to

- the cause: the trace context of the alert / change event (or the task record that carries it
  forward, `cause_headers`), when that has one;
- its inputs: the recompute spans of earlier tasks of the plan it reads, and the original records of
  stored intermediates it reads (the reduce-output pattern of `StepTracing`), bounded by `max_links`.

Sampling follows the superseded record (parent-based): a record whose trace was not sampled gets a
non-recording span whose `traceparent` says so. A superseded record without trace context makes the
span a root, sampled by the provider's sampler (`LinkAwareParentBased` samples it when a link is).

Cost: nothing unless the executor has a `RecomputeTracing` (one `is None` test per task); with one, a
span per task, which is small beside replaying the task's functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, TracerProvider

from recompute_manager.executor import DeadLetter, Recomputed
from recompute_manager.planner import InputOrigin, RecomputeTask
from streamprov.ledger.model import DataRef
from streamprov.telemetry.propagation import KafkaHeaders, inject, span_context, trace_headers
from streamprov.telemetry.tracing import INSTRUMENTATION, SYSTEM

__all__ = ["LINK_KIND", "RecomputeTracing", "TraceHeaders", "cause_headers"]

TraceHeaders = tuple[tuple[str, bytes], ...]
"""The `traceparent` (and `tracestate`) headers of a record, as (key, bytes) pairs."""

LINK_KIND = "streamprov.link"
"""Link attribute: `cause` (what triggered the recompute) or `input` (a record the task read)."""

_Done = TypeVar("_Done", bound=Recomputed | DeadLetter)


def cause_headers(headers: KafkaHeaders) -> TraceHeaders:
    """What a planner stage copies from an alert / change event onto the task records it produces,
    so workers link their task spans to the cause (`Executor.run(..., causes=[task_headers])`)."""
    return trace_headers(headers)


class RecomputeTracing:
    """Give to `Executor(tracing=...)`; `originals` maps an output node to its record's trace headers
    (`OutputIndex.trace_headers`)."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        originals: Mapping[DataRef, TraceHeaders] | None = None,
        max_links: int = 32,
    ) -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        self.originals: Mapping[DataRef, TraceHeaders] = originals if originals is not None else {}
        self.max_links = max_links

    def _links(
        self, task: RecomputeTask, outputs: Mapping[str, Recomputed], causes: Iterable[KafkaHeaders]
    ) -> list[Link]:
        links: list[Link] = []
        seen: set[tuple[int, int]] = set()

        def add(headers: KafkaHeaders, kind: str) -> None:
            ctx = span_context(headers) if headers else None
            if ctx is None or len(links) >= self.max_links or (ctx.trace_id, ctx.span_id) in seen:
                return
            seen.add((ctx.trace_id, ctx.span_id))
            links.append(Link(ctx, {LINK_KIND: kind}))

        for headers in causes:
            add(headers, "cause")
        for ref in task.inputs:
            if ref.origin is InputOrigin.TASK:
                done = outputs.get(ref.from_task or "")
                if done is not None:
                    add(done.trace, "input")
            elif ref.origin is InputOrigin.STORED:
                add(self.originals.get(ref.node, ()), "input")
        return links

    def start(
        self,
        task: RecomputeTask,
        outputs: Mapping[str, Recomputed] | None = None,
        causes: Iterable[KafkaHeaders] = (),
    ) -> Span:
        """The task's span, child of the superseded record's context (a root when it has none)."""
        original = self.originals.get(task.previous_node, ())
        parent = span_context(original) if original else None
        context = trace.set_span_in_context(
            trace.NonRecordingSpan(parent) if parent is not None else trace.INVALID_SPAN
        )
        function = task.steps[-1].function_id if task.steps else "task"
        span = self.tracer.start_span(
            f"{function} recompute",
            context=context,
            kind=SpanKind.INTERNAL,
            links=self._links(task, outputs or {}, causes),
        )
        if span.is_recording():
            attrs: dict[str, Any] = {
                **SYSTEM,
                "streamprov.data_id": task.data_id,
                "streamprov.function.id": function,
                "streamprov.function.version": task.steps[-1].function_version if task.steps else "",
                "streamprov.recompute.topic": task.topic,
                "streamprov.recompute.task_id": task.task_id,
                "streamprov.recompute.plan_id": task.plan_id,
                "streamprov.recompute.cause": task.cause.kind,
            }
            s = task.supersedes
            if s is not None:
                attrs["streamprov.supersedes"] = f"{s.topic}/{s.partition}/{s.offset}"
            span.set_attributes(attrs)
        return span

    def finish(self, span: Span, done: _Done) -> _Done:
        """End the span with the task's outcome; the result carries the span's trace headers."""
        if span.is_recording():
            span.set_attribute("streamprov.recompute.attempts", done.attempts)
            if isinstance(done, Recomputed):
                span.set_attribute("streamprov.recompute.unchanged", done.unchanged)
                span.set_attribute("streamprov.recompute.cached", done.cached)
            else:
                span.set_status(Status(StatusCode.ERROR, done.error))
        headers: list[tuple[str, Any]] = []
        inject(headers, trace.set_span_in_context(span))
        span.end()
        return dataclasses.replace(done, trace=trace_headers(headers))

    def traced(
        self,
        task: RecomputeTask,
        outputs: Mapping[str, Recomputed],
        causes: Sequence[KafkaHeaders],
        run: Callable[[], _Done],
    ) -> _Done:
        """`run()` (the task's attempts) inside the task's span; the span ends whatever happens."""
        span = self.start(task, outputs, causes)
        try:
            done = run()
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
            raise
        return self.finish(span, done)
