"""What OpenTelemetry tracing costs a map processor at the default sampling rate and at 100%, against off.

One run, three variants, `--rounds` rounds with the order rotated per round; each variant is the
median over rounds. Each variant reads `--records` source records (3 partitions, small JSON values,
distinct DataIDs) through the same `Processor` (map `scale`, exactly once, batch `--batch-size`) with a
fresh group and output topic:

- off: sources written by a plain `ProvenanceProducer`; the processor has no `tracing`;
- 100%: sources written with a PRODUCER span each (`StepTracing`, sampler ParentBased(ALWAYS_ON)),
  the processor records a CONSUMER span per record and injects its context into every output;
- default: the sampler `telemetry.tracing.enabled: true` builds with the default
  `sampling_ratio` (0.01, `TracingSettings().sampling_ratio`):
  LinkAwareParentBased(TraceIdRatioBased(0.01)): 99% of records carry an unsampled `traceparent`,
  which the processor passes on without a span;
- carried: the same sources (an unsampled `traceparent` on 99% of them), the processor without
  `tracing`: what carrying the context through the step costs without the hook.

Spans go through a `BatchSpanProcessor` (its export thread shares the GIL, as in production) to an
exporter that counts and drops them. Throughput = records / time from the first batch to the end of
`run()` (every batch committed).

The last line, the headline, is `tracing_overhead_ratio=<median at the default rate / median off>`
(throughput ratio; 1.0 = free); the line before is `tracing_overhead_ratio_100pct=<100% / off>`.

Usage: python bench/bench_tracing.py [--bootstrap HOST:PORT] [--records N] [--rounds R]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import kafka_setup
from confluent_kafka.admin import AdminClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from streamprov.agents.processor import EXACTLY_ONCE, Processor
from streamprov.config.models import TracingSettings
from streamprov.producer import ProvenanceProducer
from streamprov.registry import FunctionRegistry
from streamprov.telemetry import LinkAwareParentBased, StepTracing

registry = FunctionRegistry()
DEFAULT_RATIO = TracingSettings().sampling_ratio
"""The documented default `telemetry.tracing.sampling_ratio` (docs/configuration.md)."""
VARIANTS = ("off", "100%", "default", "carried")


@registry.map("scale", "1", factor=3)
def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {**value, "scaled": value["n"] * factor}


class _TimedProcessor(Processor):
    """Starts the clock at the first batch, so the group join (the same for every variant) is left out."""

    first_batch_at = 0.0

    def _process(self, batch: list[Any]) -> None:
        if batch and not self.first_batch_at:
            self.first_batch_at = time.perf_counter()
        super()._process(batch)


class CountingExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _provider(sampler: Sampler) -> tuple[TracerProvider, CountingExporter]:
    exporter = CountingExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536))
    return provider, exporter


def _sampler(variant: str) -> Sampler | None:
    if variant in {"default", "carried"}:  # what streamprov.telemetry.setup.build_telemetry builds
        return LinkAwareParentBased(TraceIdRatioBased(DEFAULT_RATIO))
    return {"off": None, "100%": ParentBased(ALWAYS_ON)}[variant]


def _fill(bootstrap: str, topic: str, n: int, variant: str) -> None:
    sampler = _sampler(variant)
    tracing = None if sampler is None else StepTracing(_provider(sampler)[0])
    producer = ProvenanceProducer(
        {"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True}, tracing=tracing
    )
    for i in range(n):
        value = b'{"n":%d,"pad":"%s"}' % (i, b"x" * 64)
        while True:  # bounded by the broker draining the local queue
            try:
                producer.produce(topic, value, f"rec-{i:08d}".encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        sys.exit("could not write the input records")


def _run(
    bootstrap: str, admin: AdminClient, prefix: str, src: str, n: int, args: argparse.Namespace, variant: str
) -> tuple[float, dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    out = kafka_setup.create_topic(admin, f"{prefix}-out-{tag}", 3)
    dlq = kafka_setup.create_topic(admin, f"{prefix}-dlq-{tag}", 1)
    sampler = _sampler(variant) if variant != "carried" else None  # carried: no hook in the step
    provider, exporter = _provider(sampler) if sampler is not None else (None, None)
    processor = _TimedProcessor(
        {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        group_id=f"{prefix}-g-{tag}",
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=scale,
        guarantee=args.guarantee,
        batch_size=args.batch_size,
        tracing=None if provider is None else StepTracing(provider, consumer_group="bench"),
    )
    try:
        with processor:
            cpu0 = os.times()
            stats = processor.run(max_records=n, idle_timeout_s=30)
            elapsed = time.perf_counter() - processor.first_batch_at
            if provider is not None:
                provider.shutdown()  # the exporter thread's remaining work counts
            cpu1 = os.times()
        used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        extra: dict[str, Any] = {"records_in": stats.records_in, "cpu_us_per_record": round(used / n * 1e6)}
        if exporter is not None:
            extra["spans"] = exporter.spans
    finally:
        kafka_setup.delete_topics(admin, [out, dlq])
    if stats.records_in != n:
        sys.exit(f"processed {stats.records_in} of {n} records")
    return n / elapsed, extra


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--guarantee", default=EXACTLY_ONCE, choices=["exactly_once", "at_least_once"])
    args = p.parse_args()
    bootstrap = kafka_setup.bootstrap(args.bootstrap)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    prefix = f"bench-tracing-{uuid.uuid4().hex[:6]}"
    sources = {v: kafka_setup.create_topic(admin, f"{prefix}-src-{i}", 3) for i, v in enumerate(VARIANTS)}
    try:
        for variant, topic in sources.items():
            _fill(bootstrap, topic, args.records, variant)
        print(
            f"records={args.records} rounds={args.rounds} batch_size={args.batch_size} "
            f"guarantee={args.guarantee} default_sampling_ratio={DEFAULT_RATIO:g}"
        )
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
            for variant in order:
                rate, extra = _run(bootstrap, admin, prefix, sources[variant], args.records, args, variant)
                results[variant].append(rate)
                cpu[variant].append(extra["cpu_us_per_record"])
                print(f"round {r} tracing {variant}: {rate:,.0f} records/s {extra}", flush=True)
        median = {v: statistics.median(results[v]) for v in VARIANTS}
        for v in VARIANTS:
            print(
                f"median tracing {v}: {median[v]:,.0f} records/s, "
                f"{statistics.median(cpu[v]):.0f} us CPU per record (this process)"
            )
        print(f"tracing_carried_ratio={median['carried'] / median['off']:.3f}")
        print(f"tracing_overhead_ratio_100pct={median['100%'] / median['off']:.3f}")
        print(
            f"(headline: default sampling_ratio {DEFAULT_RATIO:g}, LinkAwareParentBased(TraceIdRatioBased))"
        )
        print(f"tracing_overhead_ratio={median['default'] / median['off']:.3f}")
    finally:
        kafka_setup.delete_topics(admin, list(sources.values()))


if __name__ == "__main__":
    main()
