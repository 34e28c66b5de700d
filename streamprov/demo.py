"""`streamprov demo`: a small source -> map -> reduce pipeline that shows what provenance looks like.

Sensor readings (°C) are produced as source records; a map step converts them to °F and re-keys them
by sensor; a windowed reduce keeps each sensor's maximum. One reading is sent with a tampered
checksum to show the dead-letter path. Then the records are read back and their headers decoded,
and the lineage of one reduce output is re-derived from the records it digests. Both steps record
every application in a provenance ledger (its own topic); the ledger is verified and the lineage of
the same output is shown again, this time from the ledger, back to the source readings.

Then the other half of the product, on the same pipeline (`streamprov.demo_recompute`): a sensor-a
reading is corrected at the source and a map output is corrupted in flight; the Validator reports
both, the change detector emits the correction's change event with its impact set from the ledger,
and the Recompute Manager recomputes only those outputs and publishes them to the priority topics.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamprov.agents.dead_letter import ERROR_HEADER, REASON_HEADER, SOURCE_HEADER
from streamprov.agents.processor import AT_LEAST_ONCE, EXACTLY_ONCE, Processor
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.inspect import as_text, message_headers, read_topic
from streamprov.ledger.model import Context, DataRef
from streamprov.ledger.writer import LedgerWriter
from streamprov.merkle import merkle_root
from streamprov.producer import ProvenanceProducer
from streamprov.registry import FunctionRegistry
from streamprov.stamp import reduce_leaf

Echo = Callable[[str], None]

WINDOW_MS = 60_000
SENSORS = ("sensor-a", "sensor-b", "sensor-c")
# Short group timeouts: Tansu completes a join after about half the session timeout.
FAST_GROUPS = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000}

registry = FunctionRegistry()


@registry.map("to_fahrenheit", "1", offset=32.0)
def to_fahrenheit(reading: dict[str, Any], offset: float) -> dict[str, Any]:
    return {"sensor": reading["sensor"], "fahrenheit": round(reading["celsius"] * 9 / 5 + offset, 2)}


@registry.reduce("max_fahrenheit", "1", initial=lambda: None)
def max_fahrenheit(best: dict[str, Any] | None, reading: dict[str, Any]) -> dict[str, Any]:
    if best is None or reading["fahrenheit"] > best["fahrenheit"]:
        return {"sensor": reading["sensor"], "fahrenheit": reading["fahrenheit"]}
    return best


@dataclass(frozen=True)
class DemoTopics:
    readings: str
    fahrenheit: str
    maxima: str
    dead_letters: str

    @classmethod
    def named(cls, prefix: str) -> DemoTopics:
        return cls(f"{prefix}.readings", f"{prefix}.fahrenheit", f"{prefix}.max", f"{prefix}.dead-letters")

    def all(self) -> list[str]:
        return [self.readings, self.fahrenheit, self.maxima, self.dead_letters]

    @property
    def ledger(self) -> str:
        return self.readings.rsplit(".", 1)[0] + ".ledger"


def run_demo(bootstrap_servers: str | None, records: int, *, echo: Echo) -> None:
    """Run the pipeline; starts (and stops) an embedded broker when no bootstrap servers are given."""
    with contextlib.ExitStack() as stack:
        embedded = not bootstrap_servers
        if embedded:
            from streamprov.embedded import EmbeddedBroker  # noqa: PLC0415 - optional extra

            broker = stack.enter_context(EmbeddedBroker())
            bootstrap_servers = broker.start()
            echo(f"Started an embedded Kafka-compatible broker (Tansu) at {bootstrap_servers}.")
        assert bootstrap_servers is not None
        run_id = uuid.uuid4().hex[:6]
        topics = DemoTopics.named(f"streamprov-demo-{run_id}")
        _create_topics(bootstrap_servers, topics)
        echo(f"Topics: {', '.join(topics.all())}")
        # Tansu accepts transactions but does not hide aborted ones, so exactly-once needs real Kafka.
        guarantee = AT_LEAST_ONCE if embedded else EXACTLY_ONCE
        sources = _produce_sources(bootstrap_servers, topics, records)
        echo(f"\n1. Produced {records} source readings, plus 1 with a tampered checksum.")
        ledger = _start_ledger(bootstrap_servers, topics, echo)
        writer, public_key = ledger if ledger is not None else (None, b"")
        try:
            mapped = _run_step(bootstrap_servers, topics, run_id, "map", guarantee, records + 1, writer)
            echo(
                f"2. map to_fahrenheit@1 ({guarantee.replace('_', '-')}): {mapped['records_out']} out, "
                f"{mapped['dead_lettered']} dead-lettered."
            )
            reduced = _run_step(bootstrap_servers, topics, run_id, "reduce", guarantee, records, writer)
            echo(
                f"3. reduce max_fahrenheit@1 per sensor, {WINDOW_MS // 1000} s windows: "
                f"{reduced['records_out']} out."
            )
        finally:
            if writer is not None:
                writer.close()
        ledger = writer = None  # its Kafka producer goes now, not at exit (after an embedded broker)
        maxima = _show(bootstrap_servers, topics, sources, records, echo)
        if public_key and maxima:
            _show_ledger(bootstrap_servers, topics, public_key, maxima[0], echo)
        if records >= 2:  # the correction is a sensor-a reading, the corruption a sensor-b one
            from streamprov.demo_recompute import RepairDemo, run_repair_stages  # noqa: PLC0415 - imports demo

            run_repair_stages(RepairDemo(bootstrap_servers, topics, run_id, records, public_key), echo)
        else:
            echo("\n(stages 4-6 need at least 2 readings: skipped)")
        if embedded:
            echo("\nStopping the embedded broker (its topics go with it).")
        else:
            echo(
                f"\nThe topics stay on {bootstrap_servers}; look again with: "
                f"streamprov inspect {topics.maxima} -b {bootstrap_servers}"
            )


def _create_topics(bootstrap: str, topics: DemoTopics) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, 1, 1) for t in topics.all()], operation_timeout=30)
    for name, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            raise StreamprovError(f"could not create topic {name} on {bootstrap}: {exc}") from exc


def _produce_sources(bootstrap: str, topics: DemoTopics, records: int) -> dict[str, bytes]:
    """Readings keyed by their DataID, all inside one window; returns DataID -> value."""
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    base = int(time.time() * 1000) // WINDOW_MS * WINDOW_MS - WINDOW_MS  # a window already over
    sent: dict[str, bytes] = {}
    for i in range(records):
        data_id = f"reading-{i + 1:04d}"
        value = json.dumps(
            {"sensor": SENSORS[i % len(SENSORS)], "celsius": round(18 + (i * 7 % 13) * 0.5, 1)},
            separators=(",", ":"),
        ).encode()
        producer.producer.produce(
            topics.readings,
            value,
            data_id,
            headers=[(HEADER_KEY, _source_header(data_id, value))],
            timestamp=base + i * 100,
        )
        sent[data_id] = value
    tampered = b'{"sensor":"sensor-a","celsius":99.9}'
    producer.producer.produce(
        topics.readings,
        tampered,
        "reading-tampered",
        headers=[(HEADER_KEY, _source_header("reading-tampered", b'{"sensor":"sensor-a","celsius":9.9}'))],
        timestamp=base + records * 100,
    )
    if producer.flush(30) != 0:
        raise StreamprovError(f"could not deliver the source readings to {bootstrap} within 30 s")
    return sent


def _source_header(data_id: str, value: bytes) -> bytes:
    return ProvenanceHeader.for_source(data_id, value).encode()


def _start_ledger(bootstrap: str, topics: DemoTopics, echo: Echo) -> tuple[LedgerWriter, bytes] | None:
    """A ledger topic and its writer (signed with a throw-away key); None when the broker cannot
    host one (the demo then runs without it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: PLC0415

    from streamprov.ledger.kafka import KafkaLedgerSink, create_ledger_topic  # noqa: PLC0415
    from streamprov.ledger.signing import CheckpointSigner  # noqa: PLC0415

    seed = Ed25519PrivateKey.generate()
    try:
        create_ledger_topic(bootstrap, topics.ledger)
        writer = LedgerWriter(
            KafkaLedgerSink(bootstrap, topics.ledger, timeout_s=15.0),
            topics.ledger,
            CheckpointSigner(seed),
            checkpoint_every=100,
        ).start()
    except (StreamprovError, KafkaException) as exc:
        echo(f"   (provenance ledger not available on this broker: {exc}; going on without it)")
        return None
    public = seed.public_key().public_bytes_raw()
    return writer, public


def _run_step(
    bootstrap: str,
    topics: DemoTopics,
    run_id: str,
    step: str,
    guarantee: Any,
    expected: int,
    ledger: LedgerWriter | None = None,
) -> dict[str, int]:
    where = Context("sensors", "streamprov-demo", ())
    if step == "map":
        processor = Processor(
            {"bootstrap.servers": bootstrap},
            group_id=f"streamprov-demo-{run_id}-map",
            input_topics=topics.readings,
            output_topic=topics.fahrenheit,
            dead_letter_topic=topics.dead_letters,
            function=registry.get("to_fahrenheit"),
            key_by=lambda out: out["sensor"],
            guarantee=guarantee,
            consumer_config=FAST_GROUPS,
            ledger=ledger,
            ledger_context=where,
        )
    else:
        processor = Processor(
            {"bootstrap.servers": bootstrap},
            group_id=f"streamprov-demo-{run_id}-reduce",
            input_topics=topics.fahrenheit,
            output_topic=topics.maxima,
            dead_letter_topic=topics.dead_letters,
            function=registry.get("max_fahrenheit"),
            window_ms=WINDOW_MS,
            flush_windows_on_stop=True,
            guarantee=guarantee,
            consumer_config=FAST_GROUPS,
            ledger=ledger,
            ledger_context=where,
        )
    try:
        return processor.run(max_records=expected, idle_timeout_s=15.0).as_dict()
    finally:
        processor.close()


def _read(bootstrap: str, topic: str, limit: int) -> list[Message]:
    return list(read_topic(bootstrap, topic, limit=limit, idle_timeout_s=3.0))


def _show(
    bootstrap: str, topics: DemoTopics, sources: dict[str, bytes], records: int, echo: Echo
) -> list[Message]:
    source_msgs = _read(bootstrap, topics.readings, records + 1)
    mapped = _read(bootstrap, topics.fahrenheit, records)
    maxima = _read(bootstrap, topics.maxima, len(SENSORS))
    dead = _read(bootstrap, topics.dead_letters, 10)

    echo("\n--- a source record, then the map output derived from it ---")
    print_record(source_msgs[0], echo)
    print_record(mapped[0], echo)
    echo("\n--- reduce outputs ---")
    for msg in maxima:
        print_record(msg, echo)
    if maxima:
        _print_lineage(maxima[0], mapped, echo)
    echo("\n--- dead letters ---")
    for msg in dead:
        why = dict(message_headers(msg))
        echo(
            f"{as_text(msg.key())} (from {as_text(why.get(SOURCE_HEADER))}): "
            f"{as_text(why.get(REASON_HEADER))} - {as_text(why.get(ERROR_HEADER))}"
        )
    return maxima


def _show_ledger(bootstrap: str, topics: DemoTopics, public_key: bytes, output: Message, echo: Echo) -> None:
    """Verify the ledger, index it, and print the output's lineage as the ledger records it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey  # noqa: PLC0415

    from streamprov.export.lineage import LineageGraph, to_tree  # noqa: PLC0415
    from streamprov.ledger.index import LedgerIndex  # noqa: PLC0415
    from streamprov.ledger.kafka import KafkaLedgerReader  # noqa: PLC0415
    from streamprov.ledger.signing import CheckpointVerifier  # noqa: PLC0415
    from streamprov.ledger.verify import verify_ledger  # noqa: PLC0415

    reader = KafkaLedgerReader(bootstrap, topics.ledger, idle_timeout_s=15.0)
    verifier = CheckpointVerifier([Ed25519PublicKey.from_public_bytes(public_key)])
    report = verify_ledger(reader.read(), topics.ledger, verifier, require_signed=True)
    echo(f"\n--- provenance ledger ({topics.ledger}) ---")
    echo(
        f"{report.entries} entries, {report.checkpoints} signed checkpoints: "
        + ("verified (hash chain, Merkle roots, signatures)" if report.ok else report.describe())
    )
    header = ProvenanceHeader.from_headers(message_headers(output))
    if header is None:
        return
    with (
        tempfile.TemporaryDirectory(prefix="streamprov-demo-index-") as path,
        LedgerIndex(path, topics.ledger, verifier=verifier) as index,
    ):
        index.catch_up(reader)
        lineage = index.upstream(DataRef(header.data_id, header.checksum))
    echo(f"lineage of {as_text(output.key())} from the ledger (streamprov lineage prints the same):")
    echo(to_tree(LineageGraph.of_upstream([lineage])))


def print_record(msg: Message, echo: Echo) -> None:
    header = ProvenanceHeader.from_headers(message_headers(msg))
    echo(f"\n{msg.topic()}  key={as_text(msg.key())}  value={as_text(msg.value())}")
    if header is None:
        echo("  (no provenance header)")
        return
    view = header.describe()
    echo(f"  DataID    {view['data_id']}")
    echo(f"  Checksum  {view['checksum']}   source checksum {view['source_checksum']}")
    when = datetime.fromtimestamp(header.timestamp_ms / 1000, tz=UTC).isoformat(timespec="milliseconds")
    echo(f"  Timestamp {when}")
    steps = view["lineage"] or ["(source record: empty lineage)"]
    echo("  Lineage   " + "\n            ".join(steps))


def _print_lineage(output: Message, mapped: list[Message], echo: Echo) -> None:
    """Re-derive the reduce output's input digest from the map outputs it claims to summarise."""
    header = ProvenanceHeader.from_headers(message_headers(output))
    assert header is not None
    reduce_step = header.lineage[-1]
    assert reduce_step.inputs is not None
    key = output.key()
    inputs = [m for m in mapped if m.key() == key]
    input_headers = [ProvenanceHeader.from_headers(message_headers(m)) for m in inputs]
    leaves = [reduce_leaf(h.data_id, h.checksum) for h in input_headers if h is not None]
    matches = merkle_root(leaves) == reduce_step.inputs.merkle_root
    echo(f"\n--- lineage of {as_text(key)} ---")
    echo(f"{as_text(key)} = {as_text(output.value())}")
    echo(f"└─ {reduce_step.describe()}")
    for h in input_headers:
        if h is None:
            continue
        echo(f"   ├─ {h.data_id}  {h.checksum.hex()}")
        for step in reversed(h.lineage):
            echo(f"   │  └─ {step.describe()}")
        echo(f"   │     └─ source {h.data_id}  {h.source_checksum.hex()}")
    verdict = "matches" if matches else "DOES NOT MATCH"
    echo(
        f"Merkle root over these {len(leaves)} inputs {verdict} the digest in the header "
        f"({reduce_step.inputs.merkle_root.hex()[:16]}...)."
    )
