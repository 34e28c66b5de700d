"""Validator throughput against a plain consumer of the same records, side by side in one run.

Setup (once): a compacted source topic with N source records (small JSON values, provenance headers
from ProvenanceProducer) and an output topic with N map outputs of them (1 KiB random payloads,
headers stamped by MapStamper, so each carries the source checksum and a one-step lineage).

Variants, on the same broker and the same output topic, interleaved over rounds (ABAB..., alternating
which goes first), each summarised by its median:

  consume plain  bench_headers.run_consume("plain"): Consumer.consume(1000) batches with explicit
                 assignment, msg.value() of every record (the baseline of bench_headers.py)
  validator      the Validator service (validator.service.Validator) with integrity and source drift
                 on, nothing else: a new consumer group and a new state directory every round; it
                 joins the group, fills its RocksDB source view from the source topic, then checks
                 every record (header head fields, CRC32C of the payload, the source's current
                 checksum from the view) and commits after acknowledgement. Any alert fails the run.

Both clocks start once records flow (the first batch is excluded): the validator's group join and
source-view catch-up are start-up costs, not throughput. The process runs with the garbage-collector
settings of the `streamprov validator run` process (`validator.cli.tune_gc`), for every variant
alike; `--default-gc` keeps CPython's defaults instead. The last line is `validator_ratio=<x.xxx>`
(validator / plain, ratio of medians).

Usage: python bench/bench_validator.py [--bootstrap HOST:PORT] [--messages N] [--rounds R] [--profile]
Without --bootstrap it starts Apache Kafka with scripts/kafka.sh (a no-op when it already runs).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from bench_headers import (  # noqa: E402 - the shared method: same consumer config, same plain variant
    CONSUME_BATCH,
    CONSUMER_CONFIG,
    PAYLOAD_SIZE,
    PRODUCER_CONFIG,
    Variant,
    create_topics,
    delete_topics,
    log,
    run_consume,
    start_kafka,
)

from streamprov.header import HEADER_KEY, ProvenanceHeader  # noqa: E402
from streamprov.producer import ProvenanceProducer  # noqa: E402
from streamprov.registry import FunctionRegistry  # noqa: E402
from streamprov.stamp import InputRecord, MapStamper  # noqa: E402
from validator.checks import TopicPolicy  # noqa: E402
from validator.cli import GC_THRESHOLD, tune_gc  # noqa: E402
from validator.service import Validator  # noqa: E402
from validator.settings import ServiceSettings  # noqa: E402

registry = FunctionRegistry()


@registry.map("enrich", "1")
def enrich(value: Any) -> Any:
    return value


def _flush(producer: Producer | ProvenanceProducer, what: str) -> None:
    if producer.flush(120) != 0:
        sys.exit(f"{what}: records undelivered after 120 s")


def setup(bootstrap: str, source_topic: str, output_topic: str, n: int) -> None:
    """N source records and N outputs derived from them (one per DataID)."""
    sources = ProvenanceProducer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    outputs = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    stamper = MapStamper(enrich)
    blob = os.urandom(n * PAYLOAD_SIZE)
    for i in range(n):
        data_id = b"sensor-%08d" % i
        value = json.dumps({"sensor": i, "f": 60 + i % 40}).encode()
        src_header = ProvenanceHeader.for_source(data_id.decode(), value).encode()
        payload = blob[i * PAYLOAD_SIZE : (i + 1) * PAYLOAD_SIZE]
        header = stamper.stamp(InputRecord(value, [(HEADER_KEY, src_header)], data_id, "s", 0, i), payload)
        while True:
            try:
                sources.produce(source_topic, value, data_id)
                break
            except BufferError:
                sources.poll(0.01)
        while True:
            try:
                outputs.produce(output_topic, payload, data_id, headers=[(HEADER_KEY, header)])
                break
            except BufferError:
                outputs.poll(0.01)
        if i % 1000 == 0:
            sources.poll(0)
            outputs.poll(0)
    _flush(sources, "sources")
    _flush(outputs, "outputs")


def run_validator(
    bootstrap: str, names: dict[str, str], n: int, state_root: Path, profile: cProfile.Profile | None
) -> tuple[float, int]:
    """Records/s of the Validator from its first checked batch to its last, and how many alerts."""
    out = names["out"]
    settings = ServiceSettings(
        kafka={"bootstrap.servers": bootstrap},
        topics=(out,),
        sources=(names["src"],),
        alerts_topic=names["alerts"],
        dead_letter_topic=names["dlq"],
        state_dir=Path(tempfile.mkdtemp(dir=state_root)),
        group_id=f"bench-validator-{uuid.uuid4().hex}",
        policies={out: TopicPolicy(integrity=True, source_drift=True)},
        http_port=None,
        batch_size=CONSUME_BATCH,
        consumer_config=CONSUMER_CONFIG,
    )
    with Validator(settings) as validator:
        validator.start()
        if profile is not None:
            profile.enable()
        stats = validator.run(max_messages=n)
        if profile is not None:
            profile.disable()
    if stats.checked != n or stats.first_batch_done is None or stats.last_batch_done is None:
        sys.exit(f"the validator checked {stats.checked} records, expected {n}")
    elapsed = stats.last_batch_done - stats.first_batch_done
    return (n - stats.first_batch_size) / elapsed, stats.alerts + stats.dead_letters


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start scripts/kafka.sh)")
    ap.add_argument("--messages", type=int, default=100_000, help="output records (and source records)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds (each runs both variants once)")
    ap.add_argument("--profile", action="store_true", help="cProfile the validator rounds (top 25 to stderr)")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time bench_headers' 'consume + verify' (check_batch: header found, CRC32C compared) "
        "on the same topic: the floor any header-checking consumer pays here (informational)",
    )
    ap.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics")
    ap.add_argument(
        "--default-gc", action="store_true", help="keep CPython's GC thresholds (not the service's)"
    )
    args = ap.parse_args(argv)
    if not args.default_gc:
        tune_gc()
    if args.messages < 2 * CONSUME_BATCH or args.rounds < 1:
        ap.error(f"need --messages >= {2 * CONSUME_BATCH} and --rounds >= 1")
    bootstrap = args.bootstrap or start_kafka()
    n = args.messages

    prefix = f"bench-validator-{uuid.uuid4().hex[:8]}"
    names = {k: f"{prefix}-{k}" for k in ("src", "out", "alerts", "dlq")}
    log(f"broker {bootstrap}: creating topics {prefix}-*")
    create_topics(bootstrap, list(names.values()), 1)
    plain, checked, verify = Variant("consume plain"), Variant("validator"), Variant("consume + verify")
    problems = 0
    profile = cProfile.Profile() if args.profile else None
    started = time.monotonic()
    try:
        t0 = time.monotonic()
        setup(bootstrap, names["src"], names["out"], n)
        log(f"produced {n:,} sources and {n:,} outputs in {time.monotonic() - t0:.1f} s")
        with tempfile.TemporaryDirectory(prefix="bench-validator-") as state_root:
            for r in range(args.rounds):
                order = ["plain", "validator", *(["verify"] if args.breakdown else [])]
                if r % 2:
                    order.reverse()
                for variant in order:
                    if variant in ("plain", "verify"):
                        rate, failed = run_consume(variant, bootstrap, names["out"], 1, n)
                        (plain if variant == "plain" else verify).rates.append(rate)
                    else:
                        rate, failed = run_validator(bootstrap, names, n, Path(state_root), profile)
                        checked.rates.append(rate)
                    problems += failed
                log(
                    f"round {r + 1}/{args.rounds} ({order[0]} first): plain {plain.rates[-1]:,.0f}/s, "
                    f"validator {checked.rates[-1]:,.0f}/s"
                )
    finally:
        if not args.keep_topics:
            delete_topics(bootstrap, list(names.values()))

    if profile is not None:
        buf = io.StringIO()
        pstats.Stats(profile, stream=buf).sort_stats(os.environ.get("BENCH_SORT", "tottime")).print_stats(25)
        log(buf.getvalue())
    ratio = checked.median / plain.median
    paired = statistics.median(v / p for v, p in zip(checked.rates, plain.rates, strict=True))
    print(
        f"broker {bootstrap}; {n:,} output records of {PAYLOAD_SIZE} B (+ {n:,} source records); "
        f"{args.rounds} rounds; {time.monotonic() - started:.0f} s"
    )
    print(f"consumer config (both variants): {CONSUMER_CONFIG}, consume({CONSUME_BATCH})")
    print("validator checks: integrity + source drift (RocksDB view, in-memory cache in front)")
    gc_note = "CPython defaults" if args.default_gc else f"the service's, threshold {GC_THRESHOLD}"
    print(f"garbage collector (all variants): {gc_note}")
    print(f"{'variant':<16} {'median records/s':>18} {'min':>10} {'max':>10} {'vs plain':>9}")
    for var in (plain, *([verify] if verify.rates else []), checked):
        print(
            f"{var.name:<16} {var.median:>18,.0f} {min(var.rates):>10,.0f} {max(var.rates):>10,.0f} "
            f"{var.median / plain.median:>9.3f}"
        )
    print(f"median of per-round ratios: {paired:.3f}")
    print(f"alerts or dead letters (must be 0): {problems}")
    if problems:
        print("FAILED: the validator reported problems with a clean stream", file=sys.stderr)
    print(f"validator_ratio={ratio:.3f}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
