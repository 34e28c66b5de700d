"""Shared by the ledger-on-agents and change-detection tests: run processor steps with the ledger on,
read the ledger back, and answer impact questions by brute force (a full scan, no index)."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from kafka_support import FAST_GROUP_CONFIG
from ledger_support import LEDGER, SEED, signer

from streamprov.agents.processor import EXACTLY_ONCE, Guarantee, Processor, ProcessorStats
from streamprov.ledger import Application, Context, DataRef, LedgerEntry, LedgerWriter
from streamprov.ledger.kafka import KafkaLedgerReader, KafkaLedgerSink
from streamprov.ledger.process_writer import ProcessLedgerWriter
from streamprov.ledger.writer import LedgerAppender
from streamprov.producer import ProvenanceProducer
from streamprov.registry import RegisteredFunction

CTX = Context("orders", "test-cluster", ("internal",))


def value(n: int, **extra: Any) -> bytes:
    return json.dumps({"n": n, **extra}, separators=(",", ":"), sort_keys=True).encode()


def produce_sources(bootstrap: str, topic: str, items: Iterable[tuple[str, bytes]]) -> dict[str, bytes]:
    """Source records through ProvenanceProducer (DataID = key); returns value by DataID."""
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    sent: dict[str, bytes] = {}
    for data_id, v in items:
        producer.produce(topic, v, data_id)
        producer.poll(0)
        sent[data_id] = v
    assert producer.flush(30.0) == 0
    return sent


def ledger_writer(bootstrap: str, topic: str, *, every: int = 100) -> LedgerWriter:
    sink = KafkaLedgerSink(bootstrap, topic, timeout_s=20.0)
    return LedgerWriter(sink, LEDGER, signer(), checkpoint_every=every, put_timeout_s=5.0)


def process_ledger_writer(bootstrap: str, topic: str, *, every: int = 100) -> ProcessLedgerWriter:
    """The same writer in a child process (the sink is built there)."""
    sink = functools.partial(KafkaLedgerSink, bootstrap, topic, timeout_s=20.0)
    return ProcessLedgerWriter(sink, LEDGER, SEED, checkpoint_every=every, put_timeout_s=5.0)


def run_step(
    bootstrap: str,
    function: RegisteredFunction,
    src: str,
    out: str,
    dlq: str,
    group: str,
    writer: LedgerAppender | None,
    *,
    records: int,
    guarantee: Guarantee = EXACTLY_ONCE,
    idle_timeout_s: float = 30.0,
    **kwargs: Any,
) -> ProcessorStats:
    processor = Processor(
        {"bootstrap.servers": bootstrap, **FAST_GROUP_CONFIG},
        group_id=group,
        input_topics=src,
        output_topic=out,
        dead_letter_topic=dlq,
        function=function,
        guarantee=guarantee,
        ledger=writer,
        ledger_context=CTX,
        device_id="test-pod",
        **kwargs,
    )
    with processor:
        return processor.run(max_records=records, idle_timeout_s=idle_timeout_s)


def ledger_entries(bootstrap: str, topic: str) -> list[LedgerEntry]:
    reader = KafkaLedgerReader(bootstrap, topic, idle_timeout_s=20.0)
    return [r.record for r in reader.read() if isinstance(r.record, LedgerEntry)]


def brute_force_downstream(entries: Iterable[LedgerEntry], roots: Iterable[DataRef]) -> set[DataRef]:
    """Every output derived (transitively) from `roots`, by scanning all entries to a fixpoint."""
    apps: list[Application] = [e.application for e in entries]
    reached = set(roots)
    derived: set[DataRef] = set()
    changed = True
    while changed:  # each turn adds at least one node, and there are finitely many
        changed = False
        for app in apps:
            if app.output not in derived and any(i in reached for i in app.inputs):
                derived.add(app.output)
                if app.output not in reached:
                    reached.add(app.output)
                changed = True
    return derived
