"""Cost of provenance headers on one Kafka broker: produce and consume, side by side in one run.

Four variants, all on the same broker, with the same 1 KiB random payloads (generated once) and the
same distinct keys, the same topic settings and identical client configs:

  produce  plain       confluent_kafka.Producer.produce(topic, value, key) for every record, + flush()
  produce  provenance  streamprov ProvenanceProducer.produce(topic, value, key), + flush(): every
                       record gets a freshly encoded header with the CRC32C of its payload
  consume  plain       Consumer.consume() batches of the plain topic, msg.value() of every record
  consume  verify      Consumer.consume() batches of the provenance topic; streamprov.verify.check_batch
                       finds every record's header, checks its marker and schema fingerprint and
                       compares the CRC32C of the value with the header's (failures are counted and
                       must be 0)

Each consume variant reads what its produce variant wrote in the same round, so the provenance side
pays for carrying the headers too. The variants are interleaved over rounds (ABAB..., alternating
which goes first) and each is summarised by the median over rounds; the ratios are the ratios of the
medians. The last two lines are always `produce_ratio=<x.xxx>` and `consume_ratio=<x.xxx>`.

Usage: python bench/bench_headers.py [--bootstrap HOST:PORT] [--messages N] [--rounds R]
Without --bootstrap it starts Apache Kafka with scripts/kafka.sh (a no-op when it already runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from naive import NaiveProvenanceProducer, naive_failures  # noqa: E402

from streamprov.header import HEADER_KEY, ProvenanceHeader  # noqa: E402
from streamprov.producer import ProvenanceProducer  # noqa: E402
from streamprov.stamp import SourceStamper  # noqa: E402
from streamprov.verify import check_batch  # noqa: E402

PAYLOAD_SIZE = 1024

# Identical for both produce variants: throughput settings a bulk producer would use.
PRODUCER_CONFIG: dict[str, Any] = {
    "acks": "all",
    "enable.idempotence": False,
    "compression.type": "none",
    "linger.ms": 5,
    "batch.size": 1_048_576,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1_048_576,
}
# Identical for all consume variants: no group management (explicit assignment), no commits.
# fetch.queue.backoff.ms: librdkafka's default (1000 ms) parks the fetcher for a second whenever
# the prefetch queue is full, which a consumer slower than the fetch rate hits every time; the
# benchmark would then time that idle second instead of the consumer.
CONSUMER_CONFIG: dict[str, Any] = {
    "enable.auto.commit": False,
    "enable.partition.eof": False,
    "fetch.max.bytes": 52_428_800,
    "max.partition.fetch.bytes": 4_194_304,
    "queued.max.messages.kbytes": 262_144,
    "fetch.queue.backoff.ms": 5,
}
CONSUME_BATCH = 1000


@dataclass
class Variant:
    name: str
    rates: list[float] = field(default_factory=list)  # records/s, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_kafka() -> str:
    script = REPO / "scripts" / "kafka.sh"
    if not script.exists():
        sys.exit(
            f"no --bootstrap given and {script} does not exist: pass --bootstrap HOST:PORT of a running "
            "Apache Kafka broker"
        )
    log(f"starting Apache Kafka: bash {script} up")
    env = dict(os.environ)
    env.setdefault("STREAMPROV_PYTHON", sys.executable)
    result = subprocess.run(["bash", str(script), "up"], env=env, check=False, stdout=sys.stderr)
    if result.returncode != 0:
        sys.exit(f"scripts/kafka.sh up failed (exit {result.returncode}); see .kafka/logs/")
    return f"127.0.0.1:{os.environ.get('STREAMPROV_KAFKA_PORT', '39092')}"


def create_topics(bootstrap: str, names: Sequence[str], partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names], operation_timeout=30
    )
    for f in futures.values():
        f.result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # wait until every partition has a leader
        md = admin.list_topics(timeout=10).topics
        ready = all(n in md and len(md[n].partitions) == partitions and md[n].error is None for n in names)
        if ready and all(p.leader >= 0 for n in names for p in md[n].partitions.values()):
            return
        time.sleep(0.1)
    sys.exit(f"topics {names} did not get leaders within 30 s")


def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.delete_topics(list(names), operation_timeout=30).values():
        try:
            f.result(timeout=60)
        except KafkaException as exc:  # best effort: the run's numbers are already printed
            log(f"could not delete a topic: {exc}")


def _warm(producer: Producer, warmup_topic: str) -> None:
    """Connect to the partition leader before the clock starts (metadata, broker connection)."""
    producer.produce(warmup_topic, b"warm-up", b"warm-up")
    if producer.flush(30) != 0:
        sys.exit("the broker does not accept writes (warm-up record undelivered after 30 s)")


POLL_EVERY = 1000
"""Both produce loops call poll(0) every POLL_EVERY records, as confluent-kafka recommends, so
delivery reports are served (and delivered records freed) while producing, not all at flush()."""


def _produce_all(
    produce: Callable[..., None],
    poll: Callable[[float], int],
    topic: str,
    payloads: Sequence[bytes],
    keys: Sequence[bytes],
) -> None:
    n = len(payloads)
    for start in range(0, n, POLL_EVERY):
        i = start
        end = min(start + POLL_EVERY, n)
        while i < end:
            try:
                while i < end:
                    produce(topic, payloads[i], keys[i])
                    i += 1
            except BufferError:  # the local queue is full: let librdkafka drain it (same for both)
                poll(0.005)
        poll(0)


def run_produce(
    variant: str,
    bootstrap: str,
    topic: str,
    warmup_topic: str,
    payloads: Sequence[bytes],
    keys: Sequence[bytes],
) -> float:
    producer = Producer({"bootstrap.servers": bootstrap, **PRODUCER_CONFIG})
    _warm(producer, warmup_topic)
    if variant == "plain":
        produce: Callable[..., None] = producer.produce
    elif variant == "prov":
        produce = ProvenanceProducer({}, producer=producer).produce
    elif variant == "naive":
        produce = NaiveProvenanceProducer(producer.produce).produce
    else:  # "const": one precomputed header on every record, passed the way ProvenanceProducer does
        constant: list[tuple[str, str | bytes | None]] = [
            (HEADER_KEY, SourceStamper().header(keys[0], payloads[0]))
        ]
        raw_produce = producer.produce

        def produce(topic: str, value: bytes, key: bytes) -> None:
            raw_produce(topic, value, key, -1, None, None, 0, constant)

    start = time.perf_counter()
    _produce_all(produce, producer.poll, topic, payloads, keys)
    left = producer.flush(120)
    elapsed = time.perf_counter() - start
    if left:
        sys.exit(f"{left} records of {topic} undelivered after flush")
    return len(payloads) / elapsed


CONSUME_MODES = {
    "plain": "consume plain",
    "verify": "consume + verify",
    "carry": "  prov topic, value",
    "headers": "  + headers()",
    "naive": "consume naive verify",
}
"""Consume variants: the two measured ones, and (--breakdown) two steps between them: reading the
provenance topic touching only values (the cost of carrying headers), then also converting every
record's headers to Python (confluent-kafka's `Message.headers()`, which any header reader pays)."""


def run_consume(mode: str, bootstrap: str, topic: str, partitions: int, expected: int) -> tuple[float, int]:
    """Records/s from the first batch to the last record, and how many records failed verification."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}", **CONSUMER_CONFIG}
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    consume = consumer.consume
    deadline = time.monotonic() + 120
    first: list[Any] = []
    while not first:  # the clock starts once records flow: connection and first fetch excluded
        first = consume(CONSUME_BATCH, 1.0)
        if time.monotonic() > deadline:
            sys.exit(f"no records from {topic} within 120 s")
    failures = len(check_batch(first)) if mode == "verify" else 0
    seen = len(first)
    start = time.perf_counter()
    if mode in ("plain", "carry"):
        while seen < expected:
            msgs = consume(CONSUME_BATCH, 1.0)
            for m in msgs:
                m.value()
            seen += len(msgs)
    elif mode == "verify":
        while seen < expected:
            msgs = consume(CONSUME_BATCH, 1.0)
            failures += len(check_batch(msgs))
            seen += len(msgs)
    elif mode == "naive":
        failures += naive_failures(first)
        while seen < expected:
            msgs = consume(CONSUME_BATCH, 1.0)
            failures += naive_failures(msgs)
            seen += len(msgs)
    else:
        while seen < expected:
            msgs = consume(CONSUME_BATCH, 1.0)
            for m in msgs:
                m.value()
                m.headers()
            seen += len(msgs)
    elapsed = time.perf_counter() - start
    consumer.close()
    if seen != expected:
        sys.exit(f"read {seen} records from {topic}, expected {expected}")
    return (expected - len(first)) / elapsed, failures


def check_headers(bootstrap: str, topic: str, payloads: Sequence[bytes], keys: Sequence[bytes]) -> None:
    """Sanity: the provenance topic's first record decodes in full and matches what was produced."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}", **CONSUMER_CONFIG}
    )
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    msg = None
    deadline = time.monotonic() + 30
    while msg is None and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
    consumer.close()
    if msg is None or msg.error():
        sys.exit(f"cannot read back {topic}: {msg.error() if msg else 'timeout'}")
    header = ProvenanceHeader.from_headers(msg.headers())  # type: ignore[arg-type]
    key = msg.key() or b""
    index = keys.index(key)
    assert header is not None and header.data_id == key.decode(), header
    assert msg.value() == payloads[index] and header.is_source and header.checksum == header.source_checksum


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--bootstrap", help="HOST:PORT of a running broker (default: start scripts/kafka.sh)")
    ap.add_argument("--messages", type=int, default=150_000, help="records per variant and round")
    ap.add_argument("--rounds", type=int, default=8, help="rounds (each runs every variant once)")
    ap.add_argument("--partitions", type=int, default=1, help="partitions per topic")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also time two consume steps between plain and verify (informational)",
    )
    ap.add_argument(
        "--naive",
        action="store_true",
        help="also time the first, unoptimised implementation (bench/naive.py) for comparison",
    )
    ap.add_argument("--keep-topics", action="store_true", help="do not delete the bench topics")
    args = ap.parse_args(argv)
    if args.messages < 2 * CONSUME_BATCH or args.rounds < 1:
        ap.error(f"need --messages >= {2 * CONSUME_BATCH} and --rounds >= 1")
    bootstrap = args.bootstrap or start_kafka()

    n = args.messages
    blob = os.urandom(n * PAYLOAD_SIZE)  # random bytes generated once, shared by every variant
    payloads = [blob[i * PAYLOAD_SIZE : (i + 1) * PAYLOAD_SIZE] for i in range(n)]
    del blob
    keys = [b"key-%010d" % i for i in range(n)]

    run_id = uuid.uuid4().hex[:8]
    prefix = f"bench-headers-{run_id}"
    warmup = f"{prefix}-warmup"
    kinds = ["plain", "prov", *(["const"] if args.breakdown else []), *(["naive"] if args.naive else [])]
    topics = {(v, r): f"{prefix}-{v}-{r}" for r in range(args.rounds) for v in kinds}
    log(f"broker {bootstrap}: creating {len(topics) + 1} topics {prefix}-*")
    create_topics(bootstrap, [warmup, *topics.values()], args.partitions)

    produce_names = {
        "plain": "produce plain",
        "prov": "produce provenance",
        "const": "  constant header",
        "naive": "produce naive",
    }
    produce = {k: Variant(produce_names[k]) for k in kinds}
    modes = [
        "plain",
        "verify",
        *(["carry", "headers"] if args.breakdown else []),
        *(["naive"] if args.naive else []),
    ]
    consume = {m: Variant(CONSUME_MODES[m]) for m in modes}
    source = {"plain": "plain", "verify": "prov", "carry": "prov", "headers": "prov", "naive": "prov"}
    failures = 0
    started = time.monotonic()
    try:
        for r in range(args.rounds):
            flip = r % 2 == 1  # ABAB...: alternate which variant goes first
            for v in reversed(kinds) if flip else kinds:
                produce[v].rates.append(run_produce(v, bootstrap, topics[v, r], warmup, payloads, keys))
            if r == 0:
                check_headers(bootstrap, topics["prov", 0], payloads, keys)
            for mode in reversed(modes) if flip else modes:
                rate, failed = run_consume(mode, bootstrap, topics[source[mode], r], args.partitions, n)
                consume[mode].rates.append(rate)
                failures += failed
            log(
                f"round {r + 1}/{args.rounds} ({'last' if flip else 'first'} variant first): "
                f"produce {produce['plain'].rates[-1]:,.0f} vs {produce['prov'].rates[-1]:,.0f}/s, "
                f"consume {consume['plain'].rates[-1]:,.0f} vs {consume['verify'].rates[-1]:,.0f}/s"
            )
    finally:
        if not args.keep_topics:
            delete_topics(bootstrap, [warmup, *topics.values()])

    def paired(a: Variant, b: Variant) -> float:
        return statistics.median(x / y for x, y in zip(a.rates, b.rates, strict=True))

    produce_ratio = produce["prov"].median / produce["plain"].median
    consume_ratio = consume["verify"].median / consume["plain"].median
    print(
        f"broker {bootstrap}; {n:,} records of {PAYLOAD_SIZE} B per variant and round; "
        f"{args.rounds} rounds; {args.partitions} partition(s); {time.monotonic() - started:.0f} s"
    )
    print(f"producer config (both variants): {PRODUCER_CONFIG}")
    print(f"consumer config (all variants): {CONSUMER_CONFIG}, consume({CONSUME_BATCH})")
    print(f"{'variant':<20} {'median records/s':>18} {'MB/s':>7} {'min':>10} {'max':>10} {'vs plain':>9}")
    rows = [(produce[v], produce["plain"]) for v in ("plain", "const", "prov", "naive") if v in produce]
    rows += [
        (consume[m], consume["plain"])
        for m in ("plain", "carry", "headers", "verify", "naive")
        if m in consume
    ]
    for var, base in rows:
        print(
            f"{var.name:<20} {var.median:>18,.0f} {var.median * PAYLOAD_SIZE / 1e6:>7.1f} "
            f"{min(var.rates):>10,.0f} {max(var.rates):>10,.0f} {var.median / base.median:>9.3f}"
        )
    print(
        f"median of per-round ratios: produce {paired(produce['prov'], produce['plain']):.3f}, "
        f"consume {paired(consume['verify'], consume['plain']):.3f}"
    )
    print(f"verification failures: {failures}")
    if failures:
        print("FAILED: some records did not verify", file=sys.stderr)
    print(f"produce_ratio={produce_ratio:.3f}")
    print(f"consume_ratio={consume_ratio:.3f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
