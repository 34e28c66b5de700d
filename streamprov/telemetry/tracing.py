"""OpenTelemetry spans for the provenance pipeline: source producer -> map -> reduce -> validation.

Each stage reads the trace context from the consumed record's `traceparent`/`tracestate` headers,
records one span, and writes its own context into the output's headers, so one trace follows a
record through every map step. A reduce output has many inputs and a span has one parent: each input
gets a short CONSUMER span in its own trace, and the output's span starts a new trace that *links* to
those input spans (bounded: `max_links` per window).

Cost: nothing is done per record unless a `StepTracing` is given. Sampling is parent-based: a record
whose upstream was not sampled (trace flags 00) is passed on untouched (its `traceparent` header
already travels with it), no span, no parsing beyond one header lookup; so at 1% sampling 99% of the
records cost one header scan. Roots (a source producer, a reduce output, records without context)
ask the tracer provider's sampler. With no SDK `TracerProvider` configured the API's no-op tracer
records nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from time import time_ns
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    TracerProvider,
)

from streamprov.errors import HeaderError
from streamprov.header import find_raw, record_fields
from streamprov.telemetry.propagation import (
    TRACEPARENT,
    TRACESTATE,
    KafkaHeaders,
    extract,
    inject,
    span_context,
)

INSTRUMENTATION = "streamprov"
SYSTEM = {"messaging.system": "kafka"}


class _Msg(Protocol):
    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def headers(self) -> Any: ...


class _Function(Protocol):
    @property
    def function_id(self) -> str: ...
    @property
    def version(self) -> str: ...


def traceparent(headers: KafkaHeaders) -> bytes | None:
    """The raw `traceparent` header, or None."""
    if not headers:
        return None
    try:
        if isinstance(headers, Mapping):
            found = headers.get(TRACEPARENT)
        else:
            found = next((v for k, v in headers if k == TRACEPARENT), None)
    except (TypeError, ValueError):
        return None
    if found is None:
        return None
    return found.encode("ascii", "replace") if isinstance(found, str) else bytes(found)


def sampled(tp: bytes) -> bool:
    """The sampled flag of a W3C traceparent ('00-<trace>-<span>-<flags>'); False if unreadable."""
    try:
        return bool(int(tp[53:55], 16) & 1) if len(tp) >= 55 else False
    except ValueError:
        return False


def _parent(tp: bytes, headers: KafkaHeaders) -> Context:
    """The remote parent context of a record: its `traceparent` parsed directly (the common case), or
    through the propagator when the header is unusual or a `tracestate` comes with it."""
    if len(tp) == 55 and tp[:3] == b"00-" and tp[35:36] == b"-" and tp[52:53] == b"-":
        try:
            trace_id, span_id, flags = int(tp[3:35], 16), int(tp[36:52], 16), int(tp[53:55], 16)
        except ValueError:
            return extract(headers)
        if trace_id and span_id and not _has(headers, TRACESTATE):
            ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
            return trace.set_span_in_context(NonRecordingSpan(ctx))
    return extract(headers)


def _has(headers: KafkaHeaders, key: str) -> bool:
    if not headers:
        return False
    if isinstance(headers, Mapping):
        return key in headers
    return any(h[0] == key for h in headers)


def _inject(headers: list[tuple[str, Any]], span: Span) -> None:
    """`inject` for a span we just made: format its `traceparent` directly (no propagator pass)."""
    ctx = span.get_span_context()
    if ctx.trace_state:
        inject(headers, trace.set_span_in_context(span))
        return
    headers[:] = [h for h in headers if h[0] != TRACEPARENT and h[0] != TRACESTATE]
    if ctx.is_valid:
        headers.append((TRACEPARENT, b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)))


def _data_id(headers: Any) -> str | None:
    try:
        raw = find_raw(headers)
        return None if raw is None else record_fields(raw).data_id
    except HeaderError:
        return None


def _function_attrs(function: _Function | None) -> dict[str, Any]:
    if function is None:
        return {}
    return {
        "streamprov.function.id": function.function_id,
        "streamprov.function.version": str(getattr(function, "version", "")),
    }


def _consumed(msg: _Msg, consumer_group: str | None) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        **SYSTEM,
        "messaging.operation.type": "process",
        "messaging.destination.name": msg.topic() or "",
        "messaging.destination.partition.id": str(msg.partition() or 0),
        "messaging.kafka.offset": msg.offset() or 0,
    }
    if consumer_group:
        attrs["messaging.consumer.group.name"] = consumer_group
    return attrs


class StepTracing:
    """Spans for one stage (a producer, a processor step, the validator); give it to that stage."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        *,
        consumer_group: str | None = None,
        max_links: int = 32,
        max_open_windows: int = 10_000,
    ) -> None:
        self.tracer = trace.get_tracer(INSTRUMENTATION, tracer_provider=tracer_provider)
        self.consumer_group = consumer_group
        self.max_links = max_links
        self.max_open_windows = max_open_windows
        self._links: dict[Any, list[trace.SpanContext]] = {}
        self._functions: dict[int, dict[str, Any]] = {}

    def _function_attrs(self, function: _Function | None) -> dict[str, Any]:
        key = id(function)
        found = self._functions.get(key)
        if found is None:
            found = self._functions[key] = _function_attrs(function)
        return found

    # -- source producer ---------------------------------------------------------------------------
    def on_produce(self, topic: str, data_id: str | bytes | None, headers: list[tuple[str, Any]]) -> None:
        """A PRODUCER span for a source record; its context goes into `headers` (in place)."""
        parent = extract(headers) if traceparent(headers) is not None else None
        span = self.tracer.start_span(
            f"{topic} publish", context=parent, kind=SpanKind.PRODUCER, record_exception=False
        )
        if span.is_recording():
            ident = data_id.decode("utf-8", "replace") if isinstance(data_id, bytes) else data_id
            span.set_attributes(
                {
                    **SYSTEM,
                    "messaging.operation.type": "send",
                    "messaging.destination.name": topic,
                    "streamprov.data_id": ident or "",
                }
            )
        inject(headers, trace.set_span_in_context(span))
        span.end()

    # -- map -----------------------------------------------------------------------------------------
    def on_map(
        self, msg: _Msg, out_headers: list[tuple[str, Any]], start_ns: int, function: _Function | None = None
    ) -> None:
        """A CONSUMER span for one map application (child of the input's span), injected into the output.

        An input whose upstream was not sampled keeps its `traceparent` (already in `out_headers`).
        The input's trace context is read from `out_headers`, which carry a copy of the input's other
        headers (one list scan instead of another `msg.headers()` from librdkafka), else from `msg`.
        """
        hs: KafkaHeaders = out_headers
        tp = traceparent(out_headers)
        if tp is None:
            hs = msg.headers()
            tp = traceparent(hs)
        if tp is not None and not sampled(tp):
            return
        span = self.tracer.start_span(
            f"{function.function_id if function else 'map'} process",
            context=_parent(tp, hs) if tp is not None else None,
            kind=SpanKind.CONSUMER,
            start_time=start_ns,
        )
        if span.is_recording():
            attrs = _consumed(msg, self.consumer_group)
            attrs.update(self._function_attrs(function))
            attrs["streamprov.data_id"] = _data_id(out_headers) or ""
            span.set_attributes(attrs)
        _inject(out_headers, span)
        span.end()

    # -- reduce --------------------------------------------------------------------------------------
    def on_reduce_input(
        self, msg: _Msg, window: Any, data_id: str, function: _Function | None = None
    ) -> None:
        """A CONSUMER span for one input of a reduce window, in the input's trace; remembered as a link."""
        hs = msg.headers()
        tp = traceparent(hs)
        if tp is None or not sampled(tp):
            return
        span = self.tracer.start_span(
            f"{function.function_id if function else 'reduce'} receive",
            context=_parent(tp, hs),
            kind=SpanKind.CONSUMER,
        )
        if not span.is_recording():
            span.end()
            return
        span.set_attributes(_consumed(msg, self.consumer_group) | _function_attrs(function))
        span.set_attribute("streamprov.data_id", data_id)
        span.end()
        links = self._links.get(window)
        if links is None:
            if len(self._links) >= self.max_open_windows:  # windows dropped without output (reset)
                self._links.pop(next(iter(self._links)))
            links = self._links[window] = []
        if len(links) < self.max_links:
            links.append(span.get_span_context())

    def on_reduce_output(
        self,
        window: Any,
        out_headers: list[tuple[str, Any]],
        function: _Function | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """An INTERNAL span for a window's output: a new trace linking to the input spans."""
        links = self._links.pop(window, [])
        span = self.tracer.start_span(
            f"{function.function_id if function else 'reduce'} emit",
            context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root, whatever is current
            kind=SpanKind.INTERNAL,
            links=[Link(c) for c in links],
        )
        if span.is_recording():
            span.set_attributes({**SYSTEM, **_function_attrs(function), **(attributes or {})})
            span.set_attribute("streamprov.data_id", _data_id(out_headers) or "")
            span.set_attribute("streamprov.reduce.linked_inputs", len(links))
        inject(out_headers, trace.set_span_in_context(span))
        span.end()

    def forget_windows(self) -> None:
        self._links.clear()

    # -- any step with many inputs (the Recompute Manager) -------------------------------------------
    def linked_step(
        self,
        name: str,
        inputs: Iterable[KafkaHeaders],
        out_headers: list[tuple[str, Any]],
        attributes: dict[str, Any] | None = None,
    ) -> None:
        """A span for a step computed from records `inputs` (their headers): a new trace linking to
        each input's context (bounded by `max_links`), injected into `out_headers`."""
        links: list[Link] = []
        for hs in inputs:
            ctx = span_context(hs)
            if ctx is not None and len(links) < self.max_links:
                links.append(Link(ctx))
        span = self.tracer.start_span(
            name, context=trace.set_span_in_context(trace.INVALID_SPAN), kind=SpanKind.INTERNAL, links=links
        )
        if span.is_recording():
            span.set_attributes({**SYSTEM, **(attributes or {})})
        inject(out_headers, trace.set_span_in_context(span))
        span.end()

    # -- validator -----------------------------------------------------------------------------------
    def on_validated(self, messages: Sequence[_Msg], alerts: Iterable[Any] = ()) -> None:
        """A CONSUMER span per validated record whose trace is sampled, as a child of its span.

        `alerts`: the batch's alerts (anything with topic, partition, offset and kind); their kinds
        become the span's `streamprov.alerts` attribute and an error status.
        """
        found: dict[tuple[str, int, int], list[str]] = {}
        for a in alerts:
            found.setdefault((a.topic, a.partition, a.offset), []).append(str(a.kind))
        now = time_ns()
        for m in messages:
            hs = m.headers()
            tp = traceparent(hs)
            if tp is None or not sampled(tp):
                continue
            span = self.tracer.start_span(
                f"{m.topic()} validate", context=_parent(tp, hs), kind=SpanKind.CONSUMER, start_time=now
            )
            if span.is_recording():
                span.set_attributes(_consumed(m, self.consumer_group))
                span.set_attribute("streamprov.data_id", _data_id(hs) or "")
                kinds = found.get((m.topic() or "", m.partition() or 0, m.offset() or 0))
                if kinds:
                    span.set_attribute("streamprov.alerts", kinds)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, ", ".join(kinds)))
            span.end()
