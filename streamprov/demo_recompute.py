"""Stages 4-6 of `streamprov demo`: what happens when data changes or breaks after it was computed.

On the demo's pipeline (readings -> map to_fahrenheit -> reduce max_fahrenheit per sensor), once it
has run:

4. one sensor-a reading is corrected at the source (a new version of the same DataID, chosen to be
   sensor-a's new maximum), and a copy of a sensor-b map output is re-produced with an altered value
   but its original provenance header (corruption in flight). The Validator
   (`validator.service.Validator`: integrity and source drift, reduce outputs through the ledger)
   checks the output topics; its alerts are read back from its alerts topic and printed;
5. the change detector (`streamprov.changes.ChangeDetector`, with a `LedgerIndex` of the demo's
   ledger) reads the readings topic, sees the corrected reading's new version and emits a change
   event whose impact set is what the ledger derived from the old version;
6. the Recompute Manager (`recompute_manager.service.RecomputeManager`, with the demo's function
   registry) plans that change event, recomputes only the affected outputs and publishes the
   corrected records to the priority topics (`<topic>.priority`), which are read back and printed.

The manager's alerts input is a topic of its own, left empty: the change event alone drives the
recompute (the Validator's `source_changed` alerts name the same outputs). Every service run is
bounded; a stage that fails on the broker prints a one-line reason, and the stages that need its
result are skipped.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import tempfile
import textwrap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from confluent_kafka import KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from recompute_manager.executor import SUPERSEDES_HEADER
from recompute_manager.service import ManagerSettings, RecomputeManager
from streamprov.changes import ChangeDetector, ChangeEvent
from streamprov.config.models import TopicSettings
from streamprov.demo import FAST_GROUPS, SENSORS, DemoTopics, Echo, print_record, registry
from streamprov.errors import StreamprovError
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.inspect import as_text, message_headers, read_topic
from streamprov.ledger.index import LedgerIndex
from streamprov.ledger.kafka import KafkaLedgerReader
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.producer import ProvenanceProducer
from validator.alerts import Alert
from validator.checks import TopicPolicy
from validator.service import Validator
from validator.settings import ServiceSettings

__all__ = ["CORRECTED_CELSIUS", "CORRECTED_READING", "CORRUPTED_READING", "RepairDemo", "run_repair_stages"]

CORRECTED_READING = "reading-0001"
"""A sensor-a reading (the first of every run)."""
CORRECTED_CELSIUS = 26.5
"""Above every demo reading (at most 24.0 °C), so the correction is sensor-a's new maximum."""
CORRUPTED_READING = "reading-0002"
"""A sensor-b reading: its map output is the one corrupted in flight (nothing sensor-a depends on)."""
SERVICE_TIMEOUT_S = 60.0
"""A service still running after this long is stopped, whatever the broker does."""

T = TypeVar("T")


@dataclass(frozen=True)
class RepairTopics:
    """The services' topics, next to the pipeline's."""

    alerts: str
    changes: str
    recompute_alerts: str
    tasks: str
    progress: str
    priority: tuple[str, ...]
    """The priority topics of the outputs (fahrenheit, max): where corrected records go."""

    @classmethod
    def of(cls, topics: DemoTopics) -> RepairTopics:
        prefix = topics.readings.rsplit(".", 1)[0]
        name = TopicSettings().priority_topic_name
        return cls(
            f"{prefix}.alerts",
            f"{prefix}.changes",
            f"{prefix}.recompute-alerts",
            f"{prefix}.recompute-tasks",
            f"{prefix}.recompute-progress",
            (name(topics.fahrenheit), name(topics.maxima)),
        )

    def all(self) -> list[str]:
        return [self.alerts, self.changes, self.recompute_alerts, self.tasks, self.progress, *self.priority]


@dataclass(frozen=True)
class RepairDemo:
    """What stages 4-6 take from the first three: the broker, the pipeline's topics, the ledger's
    public key (empty: the broker could not host a ledger, and stages 5 and 6 are skipped)."""

    bootstrap: str
    topics: DemoTopics
    run_id: str
    records: int
    ledger_public_key: bytes

    def group(self, name: str) -> str:
        return f"streamprov-demo-{self.run_id}-{name}"

    def verifier(self) -> CheckpointVerifier | None:
        if not self.ledger_public_key:
            return None
        return CheckpointVerifier([Ed25519PublicKey.from_public_bytes(self.ledger_public_key)])


def run_repair_stages(demo: RepairDemo, echo: Echo) -> None:
    """Stages 4-6. Raises nothing for what the broker cannot do: the stage says why it stopped."""
    repair = RepairTopics.of(demo.topics)
    if _stage(echo, "4-6", lambda: _create_topics(demo.bootstrap, repair.all())) is None:
        return
    try:
        with tempfile.TemporaryDirectory(prefix="streamprov-demo-services-") as tmp:
            _run_stages(demo, repair, Path(tmp), echo)
    finally:
        # The services' Kafka clients sit in reference cycles: free them now, while the broker is up
        # (an embedded one stops next), not at exit, where they would log failed reconnects.
        gc.collect()


def _run_stages(demo: RepairDemo, repair: RepairTopics, state: Path, echo: Echo) -> None:
    if _stage(echo, "4", lambda: _change_and_corrupt(demo, echo)) is None:
        return
    _stage(echo, "4", lambda: _validate(demo, repair, state / "validator", echo))
    if not demo.ledger_public_key:
        echo("\n5-6. skipped: change detection and recompute need the provenance ledger (see above).")
        return
    event = _stage(echo, "5", lambda: _detect(demo, repair, state / "detector", echo))
    if event is not None:
        _stage(echo, "6", lambda: _recompute(demo, repair, state / "recompute", event, echo))


def _stage(echo: Echo, label: str, run: Callable[[], T]) -> T | None:
    """Run a stage; a failure is one line and the demo goes on (None), never a traceback."""
    try:
        return run()
    except Exception as exc:  # a demo stage says why it stopped, and the demo goes on
        text = " ".join(str(exc).split())
        if not isinstance(exc, StreamprovError | KafkaException):
            text = f"{type(exc).__name__}: {text}"
        echo(f"\n{label}. could not run on this broker: {textwrap.shorten(text, 300)}")
        return None


def _create_topics(bootstrap: str, names: list[str]) -> bool:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, 1, 1) for t in names], operation_timeout=30)
    for name, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            raise StreamprovError(f"could not create topic {name}: {exc}") from exc
    return True


@contextlib.contextmanager
def _deadline(stop: Callable[[], None], seconds: float = SERVICE_TIMEOUT_S) -> Iterator[None]:
    """Call `stop` (the service's own, stop-aware) if the block still runs after `seconds`."""
    timer = threading.Timer(seconds, stop)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _quiet(logger: str) -> contextlib.AbstractContextManager[None]:
    """Hide a logger's warnings the demo prints itself (kept with -v, which logs INFO)."""
    log = logging.getLogger(logger)
    if log.isEnabledFor(logging.INFO):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def errors_only() -> Iterator[None]:
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            yield
        finally:
            log.setLevel(level)

    return errors_only()


def _wrap(label: str, text: str) -> str:
    return textwrap.fill(
        text, 104, initial_indent=f"    {label:<9}", subsequent_indent=" " * 13, break_on_hyphens=False
    )


def _count(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


# -- 4. a correction at the source, a corruption in flight, the Validator --------------------------------
def _change_and_corrupt(demo: RepairDemo, echo: Echo) -> bool:
    """Produce the corrected reading and the corrupted copy of a map output."""
    t = demo.topics
    readings = list(read_topic(demo.bootstrap, t.readings, limit=demo.records, idle_timeout_s=3.0))
    old = next((m for m in readings if as_text(m.key()) == CORRECTED_READING), None)
    mapped = list(read_topic(demo.bootstrap, t.fahrenheit, limit=demo.records, idle_timeout_s=3.0))
    original = next((m for m in mapped if _data_id(m) == CORRUPTED_READING), None)
    if old is None or original is None:
        raise StreamprovError(f"{CORRECTED_READING} or the map output of {CORRUPTED_READING} was not found")

    corrected = _compact({"sensor": "sensor-a", "celsius": CORRECTED_CELSIUS})
    source = ProvenanceProducer({"bootstrap.servers": demo.bootstrap, "enable.idempotence": True})
    source.produce(t.readings, corrected, key=CORRECTED_READING)  # same DataID, a new source header
    if source.flush(30) != 0:
        raise StreamprovError("the corrected reading was not delivered within 30 s")

    good = json.loads(original.value() or b"{}")
    bad = _compact({**good, "fahrenheit": round(float(good["fahrenheit"]) + 100, 2)})
    header = next(v for k, v in message_headers(original) if k == HEADER_KEY)
    copy = Producer({"bootstrap.servers": demo.bootstrap, "enable.idempotence": True})
    copy.produce(t.fahrenheit, bad, original.key(), headers=[(HEADER_KEY, header)])
    if copy.flush(30) != 0:
        raise StreamprovError("the corrupted copy was not delivered within 30 s")
    echo(
        "\n4. The data changes after it was computed:\n"
        f"   at the source: {CORRECTED_READING} is corrected (sensor-a's new maximum)\n"
        f"                  {as_text(old.value())} -> {as_text(corrected)}\n"
        f"   in flight:     a copy of {CORRUPTED_READING}'s map output is re-produced as {as_text(bad)}\n"
        f"                  with its original provenance header (stamped for {as_text(original.value())})"
    )
    return True


def _data_id(msg: Message) -> str | None:
    header = ProvenanceHeader.from_headers(message_headers(msg))
    return None if header is None else header.data_id


def _validate(demo: RepairDemo, repair: RepairTopics, state: Path, echo: Echo) -> None:
    t = demo.topics
    settings = ServiceSettings(
        kafka={"bootstrap.servers": demo.bootstrap},
        topics=(t.fahrenheit, t.maxima),
        sources=(t.readings,),
        alerts_topic=repair.alerts,
        dead_letter_topic=t.dead_letters,
        state_dir=state,
        group_id=demo.group("validator"),
        default_policy=TopicPolicy(integrity=True, source_drift=True),
        http_host="127.0.0.1",
        commit_interval_s=0.2,
        consumer_config=FAST_GROUPS,
        ledger_topic=t.ledger if demo.ledger_public_key else None,
        checkpoint_verifier=demo.verifier(),
    )
    # the map outputs, the corrupted copy, one maximum per sensor
    outputs = demo.records + 1 + min(demo.records, len(SENSORS))
    with Validator(settings) as validator, _deadline(validator.stop):
        stats = validator.run(max_messages=outputs, idle_timeout_s=20.0)
    found = read_topic(demo.bootstrap, repair.alerts, limit=stats.alerts, idle_timeout_s=3.0)
    alerts = sorted((Alert.decode(m.value() or b"") for m in found), key=lambda a: (a.topic, a.offset))
    echo(
        f"\n--- Validator alerts ({repair.alerts}) ---\n"
        "integrity and source drift checks (reduce outputs: their sources through the ledger):\n"
        f"{stats.checked} records checked, {len(alerts)} alerts"
    )
    for a in alerts:
        echo(f"\n{a.kind.value}  DataID {a.data_id}  at {a.topic}/{a.partition}/{a.offset}")
        echo(f"    expected {a.evidence.expected}")
        echo(f"    actual   {a.evidence.actual}")
        echo(_wrap("why", a.evidence.reason))


# -- 5. change detection -----------------------------------------------------------------------------------
def _detect(demo: RepairDemo, repair: RepairTopics, state: Path, echo: Echo) -> ChangeEvent:
    t = demo.topics
    with (
        _quiet("streamprov.changes.detector"),  # "skipped: the value does not match": counted below
        LedgerIndex(state / "ledger-index", t.ledger, verifier=demo.verifier()) as index,
        ChangeDetector(
            {"bootstrap.servers": demo.bootstrap, **FAST_GROUPS},
            group_id=demo.group("changes"),
            source_topics=t.readings,
            changes_topic=repair.changes,
            index=index,
            ledger=KafkaLedgerReader(demo.bootstrap, t.ledger, idle_timeout_s=15.0),
            state_dir=state / "sources",
        ) as detector,
    ):
        # every reading's first version, the tampered one, the corrected version
        stats = detector.run(max_records=demo.records + 2, idle_timeout_s=20.0)
    found = read_topic(demo.bootstrap, repair.changes, limit=max(stats.events, 1), idle_timeout_s=3.0)
    events = [ChangeEvent.decode(m.value() or b"") for m in found]
    echo(
        f"\n5. Change detection over {t.readings}: {stats.records} records read, "
        f"{stats.first_seen} first seen, {stats.changed} changed,\n   {stats.skipped} skipped "
        f"(the tampered one); {_count(len(events), 'change event')} on {repair.changes}"
    )
    if len(events) != 1 or events[0].source is None:
        raise StreamprovError(f"expected one source change event, found {len(events)}")
    event = events[0]
    s = event.source
    assert s is not None
    echo(f"\n--- change event {event.change_id[:16]}... ---")
    echo(f"{event.kind.value}  DataID {s.data_id}  at {s.topic}/{s.partition}/{s.offset}")
    echo(f"    previous {s.previous.hex()}  current {s.current.hex() if s.current else '(deleted)'}")
    echo(
        f"    impact   {_count(event.impact.total, 'output')} derived from the previous version "
        f"(from the ledger, {event.impact.ledger_size} entries), in replay order:"
    )
    for o in event.impact.outputs:
        echo(f"             {o.node.describe()}  {o.function_id}@{o.function_version}  depth {o.depth}")
    return event


# -- 6. the Recompute Manager ------------------------------------------------------------------------------
def _recompute(demo: RepairDemo, repair: RepairTopics, state: Path, event: ChangeEvent, echo: Echo) -> None:
    t = demo.topics
    settings = ManagerSettings(
        kafka={"bootstrap.servers": demo.bootstrap},
        group_id=demo.group("recompute"),
        alerts_topic=repair.recompute_alerts,
        changes_topic=repair.changes,
        tasks_topic=repair.tasks,
        progress_topic=repair.progress,
        dead_letter_topic=t.dead_letters,
        ledger_topic=t.ledger,
        sources=(t.readings,),
        outputs=(t.fahrenheit, t.maxima),
        state_dir=state,
        replica_id=f"demo-{demo.run_id}",
        consumer_config=FAST_GROUPS,
        checkpoint_verifier=demo.verifier(),
    )
    with RecomputeManager(settings, registry) as manager, _deadline(manager.stop):
        stats = manager.run(max_causes=1, idle_timeout_s=30.0)
    ran = stats.tasks_recomputed + stats.tasks_unchanged
    echo(
        "\n6. Recompute Manager (change event -> policy -> plan -> worker; each step one transaction):\n"
        f"   {_count(stats.plans_run, 'plan')}, {_count(ran, 'task')} ran of the ledger's "
        f"{event.impact.ledger_size} applications ({stats.tasks_recomputed} changed, "
        f"{stats.dead_letters} dead-lettered);\n"
        f"   {_count(stats.published, 'corrected record')} published to <topic>.priority"
    )
    echo("\n--- corrected records (priority topics) ---")
    for topic in repair.priority:
        for msg in read_topic(demo.bootstrap, topic, limit=demo.records, idle_timeout_s=3.0):
            print_record(msg, echo)
            echo(f"  Supersedes {as_text(dict(message_headers(msg)).get(SUPERSEDES_HEADER))}")
