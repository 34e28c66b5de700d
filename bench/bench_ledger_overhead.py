"""What recording every application in the provenance ledger costs a map processor.

Claim under test: the ledger hook does not block the data path, so a map processor with the ledger
on keeps >= 90% of its throughput. `--writer` picks how the agent records:

* `client` (default; the deployment for more than one process): `KafkaLedgerClient` sends each
  batch's map rows (the two header byte strings per record) to the sequencer's requests topic; the
  shared sequencer seals them elsewhere. Here it runs after the agent (on a cluster it is its own
  service on other cores) and is timed apart; every entry is checked to arrive.
* `process`: a `ProcessLedgerWriter` seals in a child process on the same machine.
* `thread`: a `LedgerWriter` seals on a thread of the agent's process.

One input topic (3 partitions) holds `--records` source records with provenance headers (small JSON
values, distinct DataIDs), written once. Each round runs the same `Processor` (map `scale`,
exactly once unless `--guarantee at_least_once`, batch size `--batch-size`) over all of it twice,
with a fresh consumer group and output topic each time: once without a ledger and once with the
chosen writer (one-partition ledger topic, Ed25519 checkpoints every 1000 entries). Which goes first
alternates per round. Throughput = records / time from the first batch to the end of `run()` (which
ends once every batch is committed, so with the ledger on, every entry - or, with `client`, every
request - is durable by then). Each variant is summarised by its median over rounds.

The last line is `ledger_overhead_ratio=<median with ledger / median without>` (throughput ratio;
1.0 = free).

Usage: python bench/bench_ledger_overhead.py [--writer client|process|thread] [--bootstrap HOST:PORT]
       [--records N] [--rounds R]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import uuid
from typing import Any

import kafka_setup
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.agents.processor import EXACTLY_ONCE, Processor
from streamprov.header import HEADER_KEY
from streamprov.ledger import CheckpointSigner, Context, LedgerWriter
from streamprov.ledger.kafka import LEDGER_TOPIC_CONFIG, KafkaLedgerSink, create_ledger_topic
from streamprov.ledger.process_writer import ProcessLedgerWriter
from streamprov.ledger.requests import KafkaLedgerClient
from streamprov.ledger.sequencer import LedgerSequencer
from streamprov.registry import FunctionRegistry
from streamprov.stamp import SourceStamper

registry = FunctionRegistry()


@registry.map("scale", "1", factor=3)
def scale(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {**value, "scaled": value["n"] * factor}


class _TimedProcessor(Processor):
    """Starts the clock at the first batch, so the group join (the same for both variants) is left out."""

    first_batch_at = 0.0

    def _process(self, batch: list[Any]) -> None:
        if batch and not self.first_batch_at:
            self.first_batch_at = time.perf_counter()
        super()._process(batch)


def _fill(bootstrap: str, topic: str, n: int) -> None:
    stamper = SourceStamper()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "enable.idempotence": True})
    for i in range(n):
        data_id = f"rec-{i:08d}"
        value = b'{"n":%d,"pad":"%s"}' % (i, b"x" * 64)
        while True:  # bounded by the broker draining the local queue
            try:
                producer.produce(
                    topic, value, data_id.encode(), headers=[(HEADER_KEY, stamper.header(data_id, value))]
                )
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(60):
        sys.exit("could not write the input records")


def _run(
    bootstrap: str, admin: AdminClient, prefix: str, src: str, n: int, args: argparse.Namespace, ledger: bool
) -> tuple[float, dict[str, Any]]:
    tag = uuid.uuid4().hex[:8]
    out = kafka_setup.create_topic(admin, f"{prefix}-out-{tag}", 3)
    dlq = kafka_setup.create_topic(admin, f"{prefix}-dlq-{tag}", 1)
    writer: LedgerWriter | ProcessLedgerWriter | KafkaLedgerClient | None = None
    topics = [out, dlq]
    ledger_topic = requests = ""
    if ledger:
        ledger_topic = f"{prefix}-ledger-{tag}"
        create_ledger_topic(bootstrap, ledger_topic)
        topics.append(ledger_topic)
        seed = os.urandom(32)
        if args.writer == "client":
            requests = kafka_setup.create_topic(admin, f"{prefix}-requests-{tag}", 1)
            topics.append(requests)
            writer = KafkaLedgerClient(bootstrap, requests, ledger_topic)
        elif args.writer == "process":
            sink_factory = functools.partial(KafkaLedgerSink, bootstrap, ledger_topic)
            writer = ProcessLedgerWriter(
                sink_factory, ledger_topic, seed, checkpoint_every=1000, nice=args.nice
            ).start()
        else:
            signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(seed))
            sink = KafkaLedgerSink(bootstrap, ledger_topic)
            writer = LedgerWriter(sink, ledger_topic, signer, checkpoint_every=1000).start()
    processor = _TimedProcessor(
        {"bootstrap.servers": bootstrap, "session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        group_id=f"{prefix}-g-{tag}",
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=scale,
        guarantee=args.guarantee,
        batch_size=args.batch_size,
        ledger=writer,
        ledger_context=Context("bench", "local", ("internal",)),
    )
    try:
        with processor:
            cpu0 = os.times()
            stats = processor.run(max_records=n, idle_timeout_s=30)
            elapsed = time.perf_counter() - processor.first_batch_at
            if writer is not None:
                writer.close()  # a writer process is reaped here: its CPU counts as the children's
            cpu1 = os.times()
        used = (cpu1.user + cpu1.system + cpu1.children_user + cpu1.children_system) - (
            cpu0.user + cpu0.system + cpu0.children_user + cpu0.children_system
        )
        extra: dict[str, Any] = {"records_in": stats.records_in, "cpu_us_per_record": round(used / n * 1e6)}
        if isinstance(writer, KafkaLedgerClient):
            extra.update(_sequence(bootstrap, requests, ledger_topic, dlq, seed, n))
        elif writer is not None:
            extra.update(entries=writer.stats.entries, duplicates=writer.stats.duplicates)
    finally:
        if writer is not None:
            writer.close()
        kafka_setup.delete_topics(admin, topics)
    if stats.records_in != n:
        sys.exit(f"processed {stats.records_in} of {n} records")
    return n / elapsed, extra


def _sequence(
    bootstrap: str, requests: str, ledger_topic: str, dead_letters: str, seed: bytes, n: int
) -> dict[str, Any]:
    """Seal what the agent sent (the sequencer runs after the agent: on a cluster it is a service
    on other cores); checks every application arrived and times the sequencer on its own."""
    signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(seed))
    # as many requests as the client sent (its producer is idempotent, not transactional: one offset
    # per request), not n / batch size: a batch the agent cut short makes one request more
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{requests}-probe"})
    try:
        low, high = probe.get_watermark_offsets(TopicPartition(requests, 0), timeout=30)
    finally:
        probe.close()
    with LedgerSequencer(
        bootstrap,
        requests_topic=requests,
        ledger_topic=ledger_topic,
        ledger_id=ledger_topic,
        signer=signer,
        dead_letter_topic=dead_letters,  # the round's (created): the sequencer checks it exists
    ) as seq:
        start = time.perf_counter()
        seq.run(max_requests=high - low, idle_timeout_s=30)
        elapsed = time.perf_counter() - start
    if seq.stats.entries != n:
        sys.exit(f"the sequencer sealed {seq.stats.entries} of {n} applications")
    return {"entries": seq.stats.entries, "sequencer_records_per_s": round(n / elapsed)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", default=None)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--guarantee", default=EXACTLY_ONCE, choices=["exactly_once", "at_least_once"])
    p.add_argument(
        "--writer",
        default="client",
        choices=["process", "thread", "client"],
        help="ProcessLedgerWriter (default: the ledger's work on another core), LedgerWriter (a thread), "
        "or KafkaLedgerClient (sealed by the shared sequencer, run after the agent and timed apart)",
    )
    p.add_argument("--nice", type=int, default=0, help="niceness of the writer process (process writer)")
    args = p.parse_args()
    bootstrap = kafka_setup.bootstrap(args.bootstrap)
    admin = AdminClient({"bootstrap.servers": bootstrap})
    prefix = f"bench-ledger-{uuid.uuid4().hex[:6]}"
    src = kafka_setup.create_topic(admin, f"{prefix}-src", 3)
    try:
        _fill(bootstrap, src, args.records)
        print(
            f"records={args.records} rounds={args.rounds} batch_size={args.batch_size} "
            f"guarantee={args.guarantee} writer={args.writer} ledger_topic_config={LEDGER_TOPIC_CONFIG}"
        )
        results: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            for ledger in order:
                rate, extra = _run(bootstrap, admin, prefix, src, args.records, args, ledger)
                results[ledger].append(rate)
                cpu[ledger].append(extra["cpu_us_per_record"])
                name = "with_ledger" if ledger else "without_ledger"
                print(f"round {r} {name}: {rate:,.0f} records/s {extra}", flush=True)
        without = statistics.median(results[False])
        with_ = statistics.median(results[True])
        print(f"median without ledger: {without:,.0f} records/s")
        print(f"median with ledger:    {with_:,.0f} records/s")
        print(
            "median CPU of this process and its children per record (the broker not included): "
            f"{statistics.median(cpu[False]):.0f} us without, {statistics.median(cpu[True]):.0f} us with"
        )
        print(f"ledger_overhead_ratio={with_ / without:.3f}")
    finally:
        kafka_setup.delete_topics(admin, [src])


if __name__ == "__main__":
    main()
