"""W3C trace context (`traceparent`, `tracestate`) in Kafka record headers.

The OpenTelemetry API's `TraceContextTextMapPropagator` reads and writes the headers through a getter
and a setter for Kafka's header shapes (a list of (key, bytes) pairs, or a mapping). Other headers are
left alone; injecting replaces any trace context the headers carried.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACE_HEADERS = frozenset((TRACEPARENT, TRACESTATE))

KafkaHeaders = Sequence[tuple[str, Any]] | Mapping[str, Any] | None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("ascii")
    except (UnicodeDecodeError, TypeError, ValueError):
        return None


class KafkaHeadersGetter(Getter[KafkaHeaders]):
    def get(self, carrier: KafkaHeaders, key: str) -> list[str] | None:
        if not carrier:
            return None
        if isinstance(carrier, Mapping):
            found = _text(carrier.get(key))
            return None if found is None else [found]
        values = [t for k, v in carrier if k == key and (t := _text(v)) is not None]
        return values or None

    def keys(self, carrier: KafkaHeaders) -> list[str]:
        if not carrier:
            return []
        return list(carrier) if isinstance(carrier, Mapping) else [k for k, _ in carrier]


class KafkaHeadersSetter(Setter[list[tuple[str, Any]]]):
    """Sets a header on a list of pairs, replacing any header of that key."""

    def set(self, carrier: list[tuple[str, Any]], key: str, value: str) -> None:
        carrier[:] = [h for h in carrier if h[0] != key]
        carrier.append((key, value.encode("ascii")))


GETTER = KafkaHeadersGetter()
SETTER = KafkaHeadersSetter()
PROPAGATOR = TraceContextTextMapPropagator()


def extract(headers: KafkaHeaders) -> Context:
    """The trace context the record's headers carry (an empty context when none)."""
    return PROPAGATOR.extract(headers, getter=GETTER)


def inject(headers: list[tuple[str, Any]], context: Context | None = None) -> None:
    """Write the current (or `context`'s) span as `traceparent`/`tracestate`, replacing old ones."""
    for key in TRACE_HEADERS:  # a non-recording invalid span writes nothing: drop stale context
        headers[:] = [h for h in headers if h[0] != key]
    PROPAGATOR.inject(headers, context=context, setter=SETTER)


def span_context(headers: KafkaHeaders) -> trace.SpanContext | None:
    """The remote span context of a record's headers, or None when it carries no valid one."""
    ctx = trace.get_current_span(extract(headers)).get_span_context()
    return ctx if ctx.is_valid else None


def without_trace(headers: Iterable[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return [h for h in headers or () if h[0] not in TRACE_HEADERS]


def trace_headers(headers: KafkaHeaders) -> tuple[tuple[str, bytes], ...]:
    """The record's `traceparent`/`tracestate` headers as (key, bytes) pairs (empty when none): small
    enough to keep per record, e.g. to continue a record's trace when it is superseded later."""
    if not headers:
        return ()
    pairs: Iterable[tuple[str, Any]] = headers.items() if isinstance(headers, Mapping) else headers
    out: list[tuple[str, bytes]] = []
    for key, value in pairs:
        if key in TRACE_HEADERS and value is not None:
            out.append((key, value.encode("ascii") if isinstance(value, str) else bytes(value)))
    return tuple(out)
