"""Build what a component traces and meters with from `streamprov.yaml`'s `telemetry:` block.

`build_telemetry(config.telemetry, component="validator")` returns a `Telemetry`: the SDK
`TracerProvider` (sampler `LinkAwareParentBased(TraceIdRatioBased(sampling_ratio))`, a
`BatchSpanProcessor` to the configured exporter, so export never runs on the data path and a full
queue drops spans instead of blocking), an OTLP-exporting `MeterProvider` when `metrics.otlp` is on,
and helpers that hand each stage its hook (`step_tracing`, `recompute_tracing`) or push an existing
pull reader's metrics (`push_metrics`, for the Validator's Prometheus metrics). Providers are never
made global: a library does not configure its host's telemetry.

Signers and verifiers come from `streamprov.signing.KeyRing(config.signing)`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, MetricsData, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from streamprov.errors import StreamprovError
from streamprov.telemetry.sampling import LinkAwareParentBased
from streamprov.telemetry.tracing import StepTracing

if TYPE_CHECKING:
    from recompute_manager.tracing import RecomputeTracing, TraceHeaders
    from streamprov.config.models import OtlpSettings, TelemetrySettings
    from streamprov.ledger.model import DataRef

__all__ = ["COMPONENTS", "MetricsPusher", "Telemetry", "TelemetryError", "build_telemetry"]

log = logging.getLogger(__name__)

COMPONENTS: Mapping[str, str] = {
    "validator": "streamprov-validator",
    "recompute-manager": "streamprov-recompute-manager",
    "processor": "streamprov-processor",
}
"""Component -> default OpenTelemetry `service.name` (`telemetry.service_name` overrides it)."""

_PACKAGES = {
    "http/protobuf": "opentelemetry-exporter-otlp-proto-http",
    "grpc": "opentelemetry-exporter-otlp-proto-grpc",
}


class TelemetryError(StreamprovError):
    """The telemetry settings cannot be turned into exporters (a package or a variable is missing)."""


def _otlp_target(otlp: OtlpSettings, signal: str) -> tuple[str, bool]:
    """(endpoint, insecure) for a signal: http/protobuf takes `<base>/v1/<signal>`, gRPC the base."""
    base = otlp.endpoint or ""
    if otlp.protocol == "grpc":
        return base, urlsplit(base).scheme == "http"
    suffix = f"/v1/{signal}"
    return (base if base.rstrip("/").endswith(suffix) else base.rstrip("/") + suffix), False


def _headers(otlp: OtlpSettings, environ: Mapping[str, str] | None) -> dict[str, str]:
    try:
        return otlp.resolve_headers(environ)
    except ValueError as exc:
        raise TelemetryError(f"telemetry.otlp.{exc}") from None


def otlp_span_exporter(otlp: OtlpSettings, environ: Mapping[str, str] | None = None) -> SpanExporter:
    """The OTLP span exporter for `telemetry.otlp` (protocol, endpoint, headers, timeout)."""
    endpoint, insecure = _otlp_target(otlp, "traces")
    headers, timeout = _headers(otlp, environ), otlp.timeout.total_seconds()
    try:
        if otlp.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter(endpoint=endpoint, insecure=insecure, headers=headers, timeout=timeout)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        return OTLPSpanExporter(endpoint=endpoint, headers=headers, timeout=timeout)
    except ImportError as exc:
        raise _missing(otlp, exc) from None


def otlp_metric_exporter(otlp: OtlpSettings, environ: Mapping[str, str] | None = None) -> MetricExporter:
    """The OTLP metric exporter for `telemetry.otlp`."""
    endpoint, insecure = _otlp_target(otlp, "metrics")
    headers, timeout = _headers(otlp, environ), otlp.timeout.total_seconds()
    try:
        if otlp.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (  # noqa: PLC0415
                OTLPMetricExporter as GrpcMetricExporter,
            )

            return GrpcMetricExporter(endpoint=endpoint, insecure=insecure, headers=headers, timeout=timeout)
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )

        return OTLPMetricExporter(endpoint=endpoint, headers=headers, timeout=timeout)
    except ImportError as exc:
        raise _missing(otlp, exc) from None


def _missing(otlp: OtlpSettings, exc: ImportError) -> TelemetryError:
    package = _PACKAGES[str(otlp.protocol)]
    return TelemetryError(
        f"telemetry.otlp.protocol {otlp.protocol} needs the package {package} "
        f"(pip install 'streamprov[telemetry]'): {exc}"
    )


class MetricsPusher:
    """Pushes a pull reader's metrics (e.g. the Validator's, served to Prometheus) over OTLP every
    `interval_s`, from a daemon thread; an export failure is logged and retried next interval."""

    def __init__(
        self, collect: Callable[[], MetricsData | None], exporter: MetricExporter, interval_s: float
    ) -> None:
        self._collect = collect
        self._exporter = exporter
        self.interval_s = interval_s
        self.exports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="streamprov-metrics-push", daemon=True)

    def start(self) -> MetricsPusher:
        self._thread.start()
        return self

    def push(self) -> None:
        data = self._collect()
        if data is None or not data.resource_metrics:
            return
        try:
            self._exporter.export(data, timeout_millis=self.interval_s * 1000)
            self.exports += 1
        except Exception as exc:  # an exporter may raise anything; metrics must not stop the service
            log.warning("pushing metrics over OTLP failed: %s", exc)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.push()

    def stop(self) -> None:
        """Push once more (the final counts) and stop."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 5)
        self.push()
        self._exporter.shutdown()


@dataclass
class Telemetry:
    """A component's tracer and meter providers; `shutdown()` flushes them when the component stops."""

    settings: TelemetrySettings
    service_name: str
    tracer_provider: TracerProvider | None
    """None when tracing is off: stages get no hook and do nothing per record."""
    meter_provider: MeterProvider | None
    """An OTLP-exporting provider when `metrics.otlp` is on, for a component's own instruments."""
    environ: Mapping[str, str] | None = None
    _pushers: list[MetricsPusher] = field(default_factory=list)

    def step_tracing(self, consumer_group: str | None = None) -> StepTracing | None:
        """The hook of a producer, processor step or the Validator; None when tracing is off."""
        if self.tracer_provider is None:
            return None
        return StepTracing(self.tracer_provider, consumer_group=consumer_group)

    def recompute_tracing(
        self, originals: Mapping[DataRef, TraceHeaders] | None = None
    ) -> RecomputeTracing | None:
        """The Recompute Manager's executor hook (`Executor(tracing=...)`); None when tracing is off.

        `originals`: the superseded records' trace headers (`OutputIndex.trace_headers`).
        """
        if self.tracer_provider is None:
            return None
        from recompute_manager.tracing import RecomputeTracing  # noqa: PLC0415 - the agents lack it

        return RecomputeTracing(self.tracer_provider, originals=originals)

    def push_metrics(self, collect: Callable[[], MetricsData | None]) -> MetricsPusher | None:
        """Push a pull reader's metrics (`reader.get_metrics_data`) over OTLP when `metrics.otlp` is on."""
        if not self.settings.metrics.otlp:
            return None
        exporter = otlp_metric_exporter(self.settings.otlp, self.environ)
        pusher = MetricsPusher(collect, exporter, self.settings.metrics.export_interval.total_seconds())
        self._pushers.append(pusher.start())
        return pusher

    def shutdown(self) -> None:
        """Export what is queued and stop the exporters (bounded by the OTLP timeout)."""
        for pusher in self._pushers:
            pusher.stop()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()

    def describe(self) -> str:
        """One line for the start-up log (no header values)."""
        t, m, o = self.settings.tracing, self.settings.metrics, self.settings.otlp
        target = f"{o.protocol} {o.endpoint}" if o.endpoint else "no OTLP endpoint"
        tracing = f"tracing {t.sampling_ratio:g} -> {t.exporter}" if t.enabled else "tracing off"
        metrics = ", ".join(n for n, on in (("prometheus", m.prometheus), ("otlp", m.otlp)) if on) or "off"
        return f"{self.service_name}: {tracing}; metrics {metrics}; {target}"


def build_telemetry(
    settings: TelemetrySettings,
    *,
    component: str,
    environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
) -> Telemetry:
    """Providers and exporters for `component` (a key of `COMPONENTS`) from the `telemetry:` block.

    `span_exporter` replaces the configured exporter (tests: an in-memory one). Raises
    `TelemetryError` when an exporter's package or a header's variable is missing.
    """
    from streamprov import __version__  # noqa: PLC0415

    name = settings.service_name or COMPONENTS.get(component, f"streamprov-{component}")
    resource = Resource.create(
        {"service.name": name, "service.namespace": "streamprov", "service.version": __version__}
    )
    env = os.environ if environ is None else environ
    tracer_provider: TracerProvider | None = None
    tracing = settings.tracing
    if tracing.enabled:
        sampler = LinkAwareParentBased(TraceIdRatioBased(tracing.sampling_ratio))
        tracer_provider = TracerProvider(sampler=sampler, resource=resource)
        exporter = span_exporter
        if exporter is None and tracing.exporter == "otlp":
            exporter = otlp_span_exporter(settings.otlp, env)
        elif exporter is None and tracing.exporter == "console":
            exporter = ConsoleSpanExporter(service_name=name)
        if exporter is not None:
            tracer_provider.add_span_processor(
                BatchSpanProcessor(
                    exporter,
                    max_queue_size=tracing.max_queue_size,
                    max_export_batch_size=min(512, tracing.max_queue_size),
                    export_timeout_millis=settings.otlp.timeout.total_seconds() * 1000,
                )
            )
    meter_provider: MeterProvider | None = None
    if settings.metrics.otlp:
        reader = PeriodicExportingMetricReader(
            otlp_metric_exporter(settings.otlp, env),
            export_interval_millis=settings.metrics.export_interval.total_seconds() * 1000,
        )
        meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    return Telemetry(settings, name, tracer_provider, meter_provider, env)
