"""Optional OpenTelemetry tracing (install `streamprov[telemetry]` for the SDK; the API suffices).

`StepTracing` records spans per stage and carries W3C trace context in Kafka headers
(`streamprov.telemetry.propagation`); docs/telemetry.md describes the spans and their cost.
"""

from streamprov.telemetry.propagation import (
    TRACEPARENT,
    TRACESTATE,
    KafkaHeadersGetter,
    KafkaHeadersSetter,
    extract,
    inject,
    span_context,
    trace_headers,
)
from streamprov.telemetry.sampling import LinkAwareParentBased
from streamprov.telemetry.tracing import StepTracing, sampled, traceparent

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "KafkaHeadersGetter",
    "KafkaHeadersSetter",
    "LinkAwareParentBased",
    "StepTracing",
    "extract",
    "inject",
    "sampled",
    "span_context",
    "trace_headers",
    "traceparent",
]
