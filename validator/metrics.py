"""The Validator's OpenTelemetry metrics, and their Prometheus text exposition for `/metrics`.

Instruments live on an SDK `MeterProvider` of our own (never the global one: a library does not
configure the host's telemetry) read by an `InMemoryMetricReader`, which collects on demand, so a
Prometheus scrape is a pull. `render_prometheus` turns the collected data into the Prometheus text
format (version 0.0.4). It is written here instead of using opentelemetry-exporter-prometheus, which
would add prometheus_client and register into its process-global registry (two Validators in one
process, as in tests, would collide); the format needs ~60 lines.

Instruments are updated once per batch (counts added in bulk), never once per record: an OTel
`add()` costs microseconds, more than the checks of a record.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    Gauge,
    Histogram,
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
    Sum,
)

from streamprov.agents.health import PROMETHEUS_TEXT

PREFIX = "streamprov_validator_"
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = PROMETHEUS_TEXT


class ValidatorMetrics:
    """Counters, a latency histogram and a lag gauge, with a pull reader for `/metrics`."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])
        meter = self.provider.get_meter("streamprov.validator")
        self.messages_checked = meter.create_counter(
            PREFIX + "messages_checked", unit="1", description="Records checked."
        )
        self.alerts = meter.create_counter(
            PREFIX + "alerts", unit="1", description="Alerts produced, by kind and topic."
        )
        self.dead_letters = meter.create_counter(
            PREFIX + "dead_letters", unit="1", description="Records sent to the dead-letter topic, by topic."
        )
        self.drift_skipped = meter.create_counter(
            PREFIX + "drift_skipped",
            unit="1",
            description="Records derived through a reduce that got no drift check: the ledger does not "
            "explain them (not indexed yet, ambiguous) or no ledger is configured.",
        )
        self.reduce_checked = meter.create_counter(
            PREFIX + "reduce_drift_checked",
            unit="1",
            description="Records derived through a reduce whose sources were drift-checked via the ledger.",
        )
        self.rederived = meter.create_counter(
            PREFIX + "rederived", unit="1", description="Records re-derived (sampled)."
        )
        self.commits = meter.create_counter(
            PREFIX + "commits", unit="1", description="Offset commits after every alert was acknowledged."
        )
        self.latency = meter.create_histogram(
            PREFIX + "batch_processing_seconds",
            unit="s",
            description="Time to check one consumed batch and hand its alerts to the producer.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S,
        )
        self._lock = threading.Lock()
        self._lag: dict[tuple[str, int], int] = {}
        self._source_lag = 0
        meter.create_observable_gauge(
            PREFIX + "consumer_lag",
            callbacks=[self._observe_lag],
            unit="1",
            description="Records between the committed position and the end of each assigned partition.",
        )
        meter.create_observable_gauge(
            PREFIX + "source_view_lag",
            callbacks=[self._observe_source_lag],
            unit="1",
            description="Source records the view has not read yet (0 once it caught up).",
        )

    def set_lag(self, lag: Mapping[tuple[str, int], int], source_lag: int) -> None:
        """Called by the loop (the only thread that may touch the consumer); read at scrape time."""
        with self._lock:
            self._lag = dict(lag)
            self._source_lag = source_lag

    def _observe_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            lag = dict(self._lag)
        return [Observation(n, {"topic": t, "partition": p}) for (t, p), n in sorted(lag.items())]

    def _observe_source_lag(self, _options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            return [Observation(self._source_lag)]

    def render(self) -> str:
        """Everything collected so far, as Prometheus text."""
        data = self.reader.get_metrics_data()
        return render_prometheus(data)

    def shutdown(self) -> None:
        self.provider.shutdown()


# -- Prometheus text format ------------------------------------------------------------------------------
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    """A valid Prometheus metric name (dots and other characters become underscores)."""
    cleaned = _NAME_BAD.sub("_", name)
    return "_" + cleaned if cleaned[:1].isdigit() else cleaned


def _label_name(name: str) -> str:
    cleaned = _LABEL_BAD.sub("_", name)
    return "_" + cleaned if cleaned[:1].isdigit() else cleaned


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(attributes: Mapping[str, Any] | None, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = [(_label_name(k), str(v)) for k, v in sorted((attributes or {}).items())]
    pairs.extend(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs) + "}"


def render_prometheus(data: MetricsData | None) -> str:
    """Prometheus text exposition (0.0.4) of OTel SDK metrics data.

    Monotonic sums become counters named `<name>_total`; other sums and gauges become gauges;
    explicit-bucket histograms become `_bucket` (cumulative, with `le`), `_sum` and `_count`.
    """
    lines: list[str] = []
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _render_metric(metric.name, metric.description or "", metric.data, lines)
    return "\n".join(lines) + "\n" if lines else ""


def _render_metric(name: str, description: str, data: Any, lines: list[str]) -> None:
    base = metric_name(name)
    if isinstance(data, Sum) and data.is_monotonic:
        prom = base if base.endswith("_total") else base + "_total"
        kind = "counter"
    elif isinstance(data, Sum | Gauge):
        prom, kind = base, "gauge"
    elif isinstance(data, Histogram):
        prom, kind = base, "histogram"
    else:  # exponential histograms are not used here
        return
    if description:
        lines.append(f"# HELP {prom} {_escape_help(description)}")
    lines.append(f"# TYPE {prom} {kind}")
    if kind == "histogram":
        for hp in data.data_points:
            _render_histogram(prom, hp, lines)
        return
    for p in data.data_points:
        number: NumberDataPoint = p
        lines.append(f"{prom}{_labels(number.attributes)} {_number(number.value)}")


def _render_histogram(prom: str, point: HistogramDataPoint, lines: list[str]) -> None:
    cumulative = 0
    bounds = [*point.explicit_bounds, math.inf]
    for bound, count in zip(bounds, point.bucket_counts, strict=False):
        cumulative += count
        le = (("le", _number(bound)),)
        lines.append(f"{prom}_bucket{_labels(point.attributes, le)} {cumulative}")
    lines.append(f"{prom}_sum{_labels(point.attributes)} {_number(point.sum)}")
    lines.append(f"{prom}_count{_labels(point.attributes)} {point.count}")


__all__ = ["CONTENT_TYPE", "ValidatorMetrics", "render_prometheus"]
