"""The Recompute Manager service on Apache Kafka: a change event in; the planner publishes the plan's
unit to the tasks topic with a `planned` progress record and the consumed offset (one transaction);
a worker publishes the affected outputs on their priority topics with the unit's progress record and
its tasks-topic offset (one transaction); a restart of the same groups finds nothing left to do.
`streamprov recompute status` reads the progress back, `streamprov recompute-manager run` stops
cleanly on SIGTERM, and a record on the tasks topic that is not a unit is dead-lettered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import processor_fns
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka_support import FAST_GROUP_CONFIG, Record, consume_all, create_topic, produce, record_view
from ledger_pipeline import ledger_writer, value
from ledger_support import LEDGER, build, pipeline, signer, verifier
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from recompute_pipeline import (  # noqa: F401 - fixture
    Pipeline,
    build_pipeline,
    change_source,
    detector,
    priority_topics,
)
from typer.testing import CliRunner

from recompute_manager.approval import approve as approve_plan
from recompute_manager.cache import ResultCache
from recompute_manager.executor import SUPERSEDES_HEADER, TASK_HEADER, DeadLetter
from recompute_manager.planner import plan_for_change
from recompute_manager.service import ManagerSettings, Progress, RecomputeManager
from recompute_manager.units import UNIT_PREFIX, RecomputeUnit
from recompute_manager.views import DeadTaskIndex
from streamprov.agents.dead_letter import ERROR_HEADER, REASON_HEADER, SOURCE_HEADER
from streamprov.changes import ChangeEvent
from streamprov.changes.event import EMPTY_IMPACT, FunctionChange
from streamprov.checksum import matches
from streamprov.cli import app
from streamprov.config.models import Criticality, RecomputeSettings, TelemetrySettings, TopicSettings
from streamprov.header import ProvenanceHeader
from streamprov.ledger import DataRef, LedgerIndex, Origin, verify_ledger
from streamprov.ledger.kafka import KafkaLedgerReader
from streamprov.ledger.requests import decode_request
from streamprov.ledger.sequencer import LedgerSequencer
from streamprov.producer import ProvenanceProducer
from streamprov.signing import HmacSigner, Verifier
from streamprov.telemetry.setup import build_telemetry
from validator.alerts import Alert, AlertKind, Evidence

pytestmark = pytest.mark.kafka

HERE = Path(__file__).resolve().parent
STREAMPROV = Path(sys.executable).parent / "streamprov"
SECRET = "recompute-manager-test-secret-0123456789"


def _committed(bootstrap: str, group: str, topic: str, partition: int = 0) -> int:
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        [tp] = probe.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        probe.close()


def _pipeline(
    bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path, created: list[str]
) -> tuple[Pipeline, str]:
    """The recompute pipeline (its detector's group) and the priority topics of its outputs (added
    to `created`: the `priority_topics` fixture deletes them)."""
    detector_group = unique_group()
    p = build_pipeline(bootstrap, new_topic, unique_group, tmp_path, detector_group)
    for t in p.outputs:
        created.append(create_topic(bootstrap, p.priority(t), partitions=2))
    return p, detector_group


def _settings(
    bootstrap: str, p: Pipeline, new_topic: Any, unique_group: Any, tmp_path: Path, **kw: Any
) -> ManagerSettings:
    """A manager of the recompute pipeline `p`, on fresh alerts, tasks, progress and dead-letter
    topics unless `kw` names them (and any other setting)."""
    fields: dict[str, Any] = {
        "kafka": {"bootstrap.servers": bootstrap},
        "group_id": unique_group("rm"),
        "changes_topic": p.changes,
        "ledger_topic": p.ledger,
        "ledger_id": LEDGER,
        "sources": (p.src,),
        "outputs": tuple(p.outputs),
        "state_dir": tmp_path / "rm",
        "consumer_config": FAST_GROUP_CONFIG,
        **kw,
    }
    fresh = {
        "alerts_topic": lambda: new_topic(prefix="alerts"),
        "tasks_topic": lambda: new_topic(2, prefix="tasks"),
        "progress_topic": lambda: new_topic(prefix="progress"),
        "dead_letter_topic": new_topic,
    }
    for name, make in fresh.items():
        if name not in fields:
            fields[name] = make()
    return ManagerSettings(**fields)


def test_service_recomputes_a_change_exactly_once(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    bootstrap = kafka_bootstrap
    p, detector_group = _pipeline(bootstrap, new_topic, unique_group, tmp_path, priority_topics)
    alerts, progress, dead = new_topic(prefix="alerts"), new_topic(prefix="progress"), new_topic()
    tasks = new_topic(2, prefix="tasks")
    requests = new_topic(1, prefix="ledger-req")
    change_source(bootstrap, p, detector_group, tmp_path, "id-011", b'{"n":2011}')

    settings = _settings(
        bootstrap,
        p,
        new_topic,
        unique_group,
        tmp_path,
        alerts_topic=alerts,
        tasks_topic=tasks,
        progress_topic=progress,
        dead_letter_topic=dead,
        http_port=0,
        signer_for=lambda topic: HmacSigner("rm-key", SECRET) if topic != p.sums else None,
        ledger_requests_topic=requests,
    )
    spans = InMemorySpanExporter()
    tracing = TelemetrySettings.model_validate({"tracing": {"enabled": True, "sampling_ratio": 1.0}})
    telemetry = build_telemetry(tracing, component="recompute-manager", span_exporter=spans)
    with RecomputeManager(settings, processor_fns.registry, telemetry=telemetry) as manager:
        stats = manager.run(max_causes=1, idle_timeout_s=60)
        assert manager.http_port  # health endpoints were served
    assert (stats.causes, stats.plans_run, stats.tasks_recomputed, stats.published) == (1, 1, 3, 3)
    assert (stats.units_planned, stats.units_done) == (1, 1)
    assert stats.transactions == 2 and stats.dead_letters == 0  # the plan's, the unit's

    # traced: a span per task (flushed when the manager closed), its context on the published record
    recompute_spans = {f"{sp.context.trace_id:032x}": sp for sp in spans.get_finished_spans()}
    assert sorted(sp.name for sp in recompute_spans.values()) == sorted(
        f"{fid} recompute" for fid in ("enrich", "tag", "sum_n")
    ), [sp.name for sp in spans.get_finished_spans()]
    for t in p.outputs:
        [msg] = consume_all(bootstrap, p.priority(t), expected=1, timeout_s=30, grace_s=0.5)
        traceparent = dict(msg.headers() or [])["traceparent"].decode()
        assert traceparent.split("-")[1] in recompute_spans
        header = ProvenanceHeader.from_headers(msg.headers() or [])
        assert header is not None and matches(header.checksum, msg.value())
        assert dict(msg.headers() or [])[SUPERSEDES_HEADER].startswith(f"{t}/".encode())
        signed = Verifier({"rm-key": SECRET.encode()}).problem(msg.headers() or [], msg.value())
        assert (signed is None) == (t != p.sums), signed  # the topic's key signed it, or none
    reports = consume_all(bootstrap, progress, expected=2, timeout_s=30, grace_s=0.5)
    got = {(r.unit, r.state): r for r in (Progress.decode(m.value()) for m in reports)}
    assert set(got) == {(-1, "planned"), (0, "done")}
    plan, unit = got[(-1, "planned")], got[(0, "done")]
    assert (plan.total, plan.units, plan.done) == (3, 1, 0)
    assert (unit.plan_id, unit.done, unit.total, unit.recomputed) == (plan.plan_id, 3, 3, 3)
    [task_record] = consume_all(bootstrap, tasks, expected=1, timeout_s=10, grace_s=0.3)
    assert RecomputeUnit.decode(task_record.value()).plan_id == plan.plan_id
    # each stage's offsets were committed with its transaction
    assert _committed(bootstrap, settings.group_id, p.changes) == 1
    assert _committed(bootstrap, settings.workers_group, tasks, task_record.partition()) == 1 + (
        task_record.offset()
    )

    # every recompute is a ledger entry: sent in the unit's transaction, sealed by the sequencer into
    # the pipeline's own ledger, which still verifies
    published = {
        DataRef(m.key().decode(), ProvenanceHeader.from_headers(m.headers()).checksum)  # type: ignore[union-attr]
        for t in p.outputs
        for m in consume_all(bootstrap, p.priority(t), expected=1, timeout_s=10)
    }
    [request] = consume_all(bootstrap, requests, expected=1, timeout_s=10, grace_s=0.5)
    apps = decode_request(request.value()).expanded()
    assert {a.origin for a in apps} == {Origin.RECOMPUTE} and {a.output for a in apps} == published
    assert {a.task_id for a in apps} == {t.task_id for t in RecomputeUnit.decode(task_record.value()).tasks}
    with LedgerSequencer(
        bootstrap,
        requests_topic=requests,
        ledger_topic=p.ledger,
        ledger_id=LEDGER,
        signer=signer(),
        dead_letter_topic=dead,
    ) as seq:
        seq.run(idle_timeout_s=3.0)
    assert seq.stats.entries == 3
    report = verify_ledger(
        KafkaLedgerReader(bootstrap, p.ledger).read(), LEDGER, verifier(), require_signed=True
    )
    assert report.ok, report.describe()

    # a restart of the same group has nothing left to do
    with RecomputeManager(settings, processor_fns.registry) as again:
        stats = again.run(idle_timeout_s=4)
    assert (stats.causes, stats.units_done, stats.transactions) == (0, 0, 0)
    for t in p.outputs:
        assert len(consume_all(bootstrap, p.priority(t), expected=2, timeout_s=2)) == 1

    # the status command reads the progress topic
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: {bootstrap}\nstreams:\n  recompute_progress: {progress}\n"
    )
    out = CliRunner().invoke(app, ["recompute", "status", plan.plan_id[:12], "--config", str(config)])
    assert out.exit_code == 0, out.output
    assert " done " in out.output and "[####################] 100% 3/3 tasks, 1/1 units" in out.output


def test_changes_consumed_together_are_one_plan_and_a_shared_reduce_runs_once(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    """Two sources of one reduce group change; both change events are on the changes topic before the
    manager starts, so the planner consumes them in one batch: ONE plan (both enrich -> tag chains and
    the group's sum, one unit), the sum recomputed once with both corrections, each map output once."""
    bootstrap = kafka_bootstrap
    p, detector_group = _pipeline(bootstrap, new_topic, unique_group, tmp_path, priority_topics)
    changed = {"id-011": 2011, "id-015": 2015}  # both in group g3 (n % 4), before and after
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap})
    for data_id, n in changed.items():
        producer.produce(p.src, value(n), data_id)
    assert producer.flush(30) == 0
    with (
        ledger_writer(bootstrap, p.ledger) as writer,
        detector(bootstrap, p, detector_group, tmp_path, writer) as d,
    ):
        seen = d.run(max_records=2, idle_timeout_s=20)
        assert (seen.changed, seen.events) == (2, 2)
    events = consume_all(bootstrap, p.changes, expected=2, timeout_s=30, grace_s=0.3)
    assert {ChangeEvent.decode(m.value()).source.data_id for m in events} == set(changed)  # type: ignore[union-attr]

    progress = new_topic(prefix="progress")
    settings = _settings(bootstrap, p, new_topic, unique_group, tmp_path, progress_topic=progress)
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(max_causes=2, idle_timeout_s=60)
    assert (stats.causes, stats.plans_run, stats.units_planned, stats.units_done) == (2, 1, 1, 1)
    assert stats.ledger_plans == 1  # the batch's plan: the policy judged each event by its count in it
    assert (stats.tasks_recomputed, stats.published, stats.dead_letters) == (5, 5, 0)  # not 6: one sum
    assert stats.decisions == {"planned": 2}

    reports = consume_all(bootstrap, progress, expected=2, timeout_s=30, grace_s=0.5)
    got = {(r.unit, r.state): r for r in (Progress.decode(m.value()) for m in reports)}
    assert set(got) == {(-1, "planned"), (0, "done")}
    plan = got[(-1, "planned")]
    assert (plan.total, plan.units, plan.cause) == (5, 1, "changes")
    [task_record] = consume_all(bootstrap, settings.tasks_topic, expected=1, timeout_s=10, grace_s=0.3)
    unit = RecomputeUnit.decode(task_record.value())
    assert unit.plan_id == plan.plan_id and len(unit.cause.causes) == 2
    assert sorted(t.steps[0].function_id for t in unit.tasks) == ["enrich", "enrich", "sum_n", "tag", "tag"]

    # each map output once, the group's sum once, with both new values in it
    for topic, count in ((p.mid, 2), (p.tagged, 2)):
        got_values = [
            json.loads(m.value())
            for m in consume_all(bootstrap, p.priority(topic), expected=count + 1, timeout_s=5)
        ]
        assert sorted(v["n"] for v in got_values) == sorted(changed.values())
    [total] = consume_all(bootstrap, p.priority(p.sums), expected=2, timeout_s=5)
    group = {n: n for n in range(40) if n % 4 == 3} | {11: 2011, 15: 2015}
    assert json.loads(total.value()) == sum(group.values())
    assert dict(total.headers() or [])[SUPERSEDES_HEADER].startswith(f"{p.sums}/".encode())


def test_cli_run_stops_on_sigterm(kafka_bootstrap: str, new_topic: Any, tmp_path: Path) -> None:
    streams = {k: new_topic(prefix=k) for k in ("alerts", "changes", "tasks", "progress", "dl", "ledger")}
    config = tmp_path / "streamprov.yaml"
    config.write_text(
        f"kafka:\n  bootstrap_servers: {kafka_bootstrap}\n"
        "streams:\n"
        f"  alerts: {streams['alerts']}\n  changes: {streams['changes']}\n"
        f"  recompute_tasks: {streams['tasks']}\n"
        f"  recompute_progress: {streams['progress']}\n  dead_letters: {streams['dl']}\n"
        f"  ledger: {streams['ledger']}\n"
        f"recompute_manager:\n  state_dir: {tmp_path / 'state'}\n  http_port: 18931\n  metrics_port: 18932\n"
    )
    cmd = [str(STREAMPROV), "recompute-manager", "run", "--config", str(config)]
    cmd += ["--functions", "processor_fns:registry", "--http-port", "0"]
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    log_path = tmp_path / "manager.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 90  # started = its signal handlers are installed
        while "recompute manager consuming" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1.0)
        assert proc.poll() is None, log_path.read_text()[-2000:]
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    err = log_path.read_text()
    assert proc.returncode == 0, err[-2000:]
    assert "stopping after the current batch" in err and "stopped:" in err


def _bare_settings(bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path) -> ManagerSettings:
    """A manager with fresh topics and no pipeline: for what it does with records it cannot use."""
    return ManagerSettings(
        kafka={"bootstrap.servers": bootstrap},
        group_id=unique_group("rm"),
        alerts_topic=new_topic(prefix="alerts"),
        changes_topic=new_topic(prefix="changes"),
        tasks_topic=new_topic(2, prefix="tasks"),
        progress_topic=new_topic(prefix="progress"),
        dead_letter_topic=new_topic(prefix="dl"),
        ledger_topic=new_topic(prefix="ledger"),
        sources=(),
        outputs=(),
        state_dir=tmp_path / "rm",
        replica_id="junk",
        consumer_config=FAST_GROUP_CONFIG,
    )


def test_a_tasks_record_that_is_not_a_unit_is_dead_lettered(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    """Neither a crash nor a silent drop: each bad record goes to the dead letters with its reason, in
    the transaction that commits its offset; the worker goes on with the next one."""
    settings = _bare_settings(kafka_bootstrap, new_topic, unique_group, tmp_path)
    tasks, dead = settings.tasks_topic, settings.dead_letter_topic
    bad = [
        Record(b"not a unit", b"k1", [("trace", b"t-1")], partition=1),
        Record(UNIT_PREFIX + b"\xff\xff\xff", b"k2", partition=1),  # framed, but no Avro unit body
    ]
    produce(kafka_bootstrap, tasks, bad)
    with RecomputeManager(settings, processor_fns.registry) as manager:
        thread = threading.Thread(target=manager.run, kwargs={"idle_timeout_s": 60}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 60
            while manager.stats.malformed < 2:
                assert time.monotonic() < deadline and thread.is_alive(), manager.stats
                time.sleep(0.1)
        finally:
            manager.stop()
            thread.join(timeout=60)
    letters = consume_all(kafka_bootstrap, dead, expected=2, timeout_s=30, grace_s=0.5)
    assert [record_view(m)[:2] for m in letters] == [(r.key, r.value) for r in bad]
    for msg, at in zip(letters, (0, 1), strict=True):
        headers = dict(record_view(msg)[2])
        assert headers[REASON_HEADER] == b"deserialization_error"
        assert headers[SOURCE_HEADER] == f"{tasks}/1/{at}".encode()
        assert b"recompute unit" in (headers[ERROR_HEADER] or b"")
    assert dict(record_view(letters[0])[2])["trace"] == b"t-1"  # the record's own headers are kept
    assert _committed(kafka_bootstrap, settings.workers_group, tasks, 1) == 2


def test_an_alert_or_change_event_that_does_not_decode_is_dead_lettered(
    kafka_bootstrap: str, new_topic: Any, unique_group: Any, tmp_path: Path
) -> None:
    """The planner stage keeps what it cannot plan: each undecodable cause goes to the dead letters
    with its reason and coordinates, committed with its offset; the planner goes on."""
    settings = _bare_settings(kafka_bootstrap, new_topic, unique_group, tmp_path)
    alerts, changes, dead = settings.alerts_topic, settings.changes_topic, settings.dead_letter_topic
    produce(kafka_bootstrap, alerts, [Record(b"not an alert", b"a1", [("trace", b"t-1")])])
    produce(kafka_bootstrap, changes, [Record(b"\x00\x01garbage", b"c1")])
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(max_causes=2, idle_timeout_s=60)
    assert (stats.causes, stats.malformed, stats.plans_run) == (2, 2, 0)
    letters = consume_all(kafka_bootstrap, dead, expected=2, timeout_s=30, grace_s=0.5)
    by_key = {record_view(m)[0]: record_view(m) for m in letters}
    assert by_key[b"a1"][1] == b"not an alert" and by_key[b"c1"][1] == b"\x00\x01garbage"
    for key, topic in ((b"a1", alerts), (b"c1", changes)):
        headers = dict(by_key[key][2])
        assert headers[REASON_HEADER] == b"deserialization_error"
        assert headers[SOURCE_HEADER] == f"{topic}/0/0".encode()
        assert headers[ERROR_HEADER]
    assert dict(by_key[b"a1"][2])["trace"] == b"t-1"  # the record's own headers are kept
    assert _committed(kafka_bootstrap, settings.group_id, alerts) == 1
    assert _committed(kafka_bootstrap, settings.group_id, changes) == 1


def test_dead_task_index_learns_the_task_dead_letters_any_replica_committed(
    kafka_bootstrap: str, new_topic: Any, tmp_path: Path
) -> None:
    """What tells a later part of a plan that an earlier part dead-lettered the task it reads from:
    the worker's own dead letters on the topic (read_committed), not look-alikes; a dead-letter topic
    that does not exist yet means no dead letters."""
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(pipeline(1, chain_len=2, fan_in=3)))
        fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
        plan = plan_for_change(idx, ChangeEvent.for_function(fc, EMPTY_IMPACT, 3))
    dead, kept, other = plan.tasks[0], plan.tasks[1], plan.tasks[2]
    letter = DeadLetter(dead, "ValueError: no", 6)
    look_alike = DeadLetter(other, "ValueError: no", 6).headers()
    topic = new_topic(prefix="dl")
    with ResultCache(tmp_path / "cache") as cache:
        missing = DeadTaskIndex({"bootstrap.servers": kafka_bootstrap}, f"{topic}-not-there", cache)
        assert missing.catch_up() == 0  # no topic: nothing dead-lettered
        missing.close()
        produce(
            kafka_bootstrap,
            topic,
            [
                Record(dead.encode(), dead.key, list(letter.headers())),
                # a record of another service carrying a task header (e.g. a priority record)
                Record(b"a corrected record", kept.key, [(TASK_HEADER, kept.task_id.encode())]),
                # the task header names another task than the value
                Record(
                    dead.encode(),
                    dead.key,
                    [(k, v) if k != TASK_HEADER else (k, other.task_id.encode()) for k, v in look_alike],
                ),
                Record(b"garbage", b"k", list(letter.headers())),
            ],
        )
        index = DeadTaskIndex({"bootstrap.servers": kafka_bootstrap}, topic, cache)
        try:
            assert index.catch_up() == 1
            assert index.catch_up() == 0  # goes on from where it stopped
        finally:
            index.close()
        assert cache.dead(dead.task_id)
        assert not cache.dead(kept.task_id) and not cache.dead(other.task_id)


def test_alerts_within_the_acceptable_error_rate_of_the_records_read_are_only_reported(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    """`acceptable_error_rate` over the output records the manager reads: the pipeline's 40 `tagged`
    records were just written, so 3 alerts on them are 3/40 <= 0.5: `alert_only`, nothing planned.
    Before, messages checked were never reported (rate 1.0 for every alert): all three were planned
    and recomputed. Records written an hour ago (by their Kafka timestamp) are not in the window: an
    alert on a topic that has only those is above the rate (planned; its header does not decode, so
    it is dead-lettered)."""
    bootstrap = kafka_bootstrap
    p, _detector_group = _pipeline(bootstrap, new_topic, unique_group, tmp_path, priority_topics)
    old = new_topic(prefix="old-out")
    producer = Producer({"bootstrap.servers": bootstrap})
    an_hour_ago = int(time.time() * 1000) - 3_600_000
    for i in range(40):
        producer.produce(old, b"v", f"o-{i}".encode(), timestamp=an_hour_ago)
    assert producer.flush(30) == 0
    tagged = consume_all(bootstrap, p.tagged, expected=40, timeout_s=30, grace_s=0.3)

    def alert(topic: str, msg: Any, header: bytes) -> bytes:
        return Alert.create(
            AlertKind.CHECKSUM_MISMATCH,
            data_id=msg.key().decode(),
            topic=topic,
            partition=msg.partition(),
            offset=msg.offset(),
            header=header,
            evidence=Evidence("aa", "bb", "test"),
            criticality=Criticality.HIGH,
            detected_at_ms=int(time.time() * 1000),
        ).encode()

    alerts = new_topic(prefix="alerts")
    produce(
        bootstrap, alerts, [alert(p.tagged, m, dict(m.headers() or [])["streamprov"]) for m in tagged[:3]]
    )
    produce(bootstrap, alerts, [alert(old, tagged[0], b"\x01\x02junk")])
    policy = RecomputeSettings(acceptable_error_rate=0.5, dedup_window=0)
    settings = _settings(
        bootstrap,
        p,
        new_topic,
        unique_group,
        tmp_path,
        alerts_topic=alerts,
        outputs=(*p.outputs, old),
        topic_settings=lambda _t: TopicSettings(recompute=policy),
    )
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(max_causes=4, idle_timeout_s=60)
        _rate, counted, checked = manager.policy(p.tagged).errors.rate(time.monotonic())
        assert (counted, checked) == (3, 40)
        assert manager.policy(old).errors.rate(time.monotonic())[1:] == (1, 0)
    assert stats.decisions == {"alert_only": 3} and stats.malformed == 1
    assert (stats.plans_run, stats.published) == (0, 0)


def _two_changes(bootstrap: str, p: Pipeline, detector_group: str, tmp_path: Path) -> list[ChangeEvent]:
    """id-001 and id-002 get new values; their change events are on the changes topic (in order)."""
    producer = ProvenanceProducer({"bootstrap.servers": bootstrap})
    for data_id, n in (("id-001", 3001), ("id-002", 3002)):
        producer.produce(p.src, value(n), data_id)
    assert producer.flush(30) == 0
    with (
        ledger_writer(bootstrap, p.ledger) as writer,
        detector(bootstrap, p, detector_group, tmp_path, writer) as d,
    ):
        seen = d.run(max_records=2, idle_timeout_s=20)
        assert (seen.changed, seen.events) == (2, 2)
    msgs = consume_all(bootstrap, p.changes, expected=2, timeout_s=30, grace_s=0.3)
    return [ChangeEvent.decode(m.value()) for m in msgs]


def _states(bootstrap: str, progress: str, expected: int) -> list[tuple[str, str]]:
    """(subject, state) of the plans' progress records, in order."""
    out = []
    for m in consume_all(bootstrap, progress, expected=expected, timeout_s=20, grace_s=1.0):
        if dict(m.headers() or []).get("streamprov.recompute.record") == b"progress":
            r = Progress.decode(m.value())
            if r.unit < 0:
                out.append((r.subject, r.state))
    return out


def test_a_rate_limited_change_is_held_back_never_refused(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    """Two change events in one batch, 3 tasks each, `rate_limit_per_s` 1: id-001 runs at once and
    borrows the bucket; id-002's partition is held back (rewound, paused) about 3 s and then decided
    again, so both run, id-001's plan published before id-002's wait. Then another group on the same
    events at 0.05/s is stopped while id-002 is held (as by SIGTERM): only id-001's offset is
    committed, and the restarted manager decides and runs id-002. Before: id-002 was published as
    `rate_limited` with its offset committed (at once on the stop, else after 20 waits of up to 5 s
    that held id-001's plan back too), never recomputed, and `recompute approve` refused it."""
    bootstrap = kafka_bootstrap
    p, detector_group = _pipeline(bootstrap, new_topic, unique_group, tmp_path, priority_topics)
    _two_changes(bootstrap, p, detector_group, tmp_path)

    def limited(rate: float, **kw: Any) -> ManagerSettings:
        settings = RecomputeSettings(rate_limit_per_s=rate)
        return _settings(
            bootstrap,
            p,
            new_topic,
            unique_group,
            tmp_path / f"rm-{rate}",
            **kw,
            topic_settings=lambda _t: TopicSettings(recompute=settings),
        )

    # held back, then decided once the bucket allows it
    settings = limited(1.0)
    started = time.monotonic()
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(max_causes=2, idle_timeout_s=60)
    assert stats.decisions == {"planned": 2} and stats.deferred >= 1
    assert (stats.causes, stats.plans_run, stats.units_done) == (2, 2, 2)
    assert time.monotonic() - started >= 2.5  # id-002 waited for the bucket (3 tasks at 1/s)
    # id-001's plan was published first, on its own (not held back with id-002)
    assert _states(bootstrap, settings.progress_topic, 4) == [("id-001", "planned"), ("id-002", "planned")]
    assert _committed(bootstrap, settings.group_id, p.changes) == 2

    # stopped while id-002 is held: not committed, consumed again by the restarted manager
    slow = limited(0.05)
    with RecomputeManager(slow, processor_fns.registry) as manager:
        thread = threading.Thread(target=manager.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while manager.stats.deferred < 1 or manager.stats.units_done < 1:
            assert time.monotonic() < deadline and thread.is_alive(), manager.stats
            time.sleep(0.1)
        manager.stop()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert manager.stats.decisions == {"planned": 1}
    assert _committed(bootstrap, slow.group_id, p.changes) == 1
    restarted = replace(slow, topic_settings=lambda _t: TopicSettings())
    with RecomputeManager(restarted, processor_fns.registry) as manager:
        stats = manager.run(max_causes=1, idle_timeout_s=60)
    assert stats.decisions == {"planned": 1} and stats.units_done == 1
    assert _committed(bootstrap, slow.group_id, p.changes) == 2
    assert _states(bootstrap, slow.progress_topic, 4) == [("id-001", "planned"), ("id-002", "planned")]


def test_a_change_over_the_hourly_budget_waits_for_approval_and_runs_once_approved(
    kafka_bootstrap: str,
    new_topic: Any,
    unique_group: Any,
    tmp_path: Path,
    priority_topics: list[str],  # noqa: F811
) -> None:
    """`budget_per_hour: 2` against 3-task plans: both events `needs_approval` (before: `over_budget`,
    which `recompute approve` refused: lost); approving one runs it."""
    bootstrap = kafka_bootstrap
    p, detector_group = _pipeline(bootstrap, new_topic, unique_group, tmp_path, priority_topics)
    _two_changes(bootstrap, p, detector_group, tmp_path)
    budget = RecomputeSettings(budget_per_hour=2)
    settings = _settings(
        bootstrap,
        p,
        new_topic,
        unique_group,
        tmp_path,
        topic_settings=lambda _t: TopicSettings(recompute=budget),
    )
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(max_causes=2, idle_timeout_s=60)
    assert stats.decisions == {"needs_approval": 2} and stats.plans_run == 0
    assert _committed(bootstrap, settings.group_id, p.changes) == 2
    reports = [
        Progress.decode(m.value())
        for m in consume_all(bootstrap, settings.progress_topic, expected=4, timeout_s=20, grace_s=1.0)
        if dict(m.headers() or []).get("streamprov.recompute.record") == b"progress"
    ]
    assert [r.state for r in reports] == ["needs_approval"] * 2
    assert all(
        "over budget_per_hour" in r.reason and "more than the whole budget" in r.reason for r in reports
    )
    done = approve_plan(
        settings.kafka,
        group_id=settings.group_id,
        tasks_topic=settings.tasks_topic,
        progress_topic=settings.progress_topic,
        prefix=reports[0].plan_id[:16],
        by="test",
    )
    assert (done.already, done.tasks) == (False, 3)
    with RecomputeManager(settings, processor_fns.registry) as manager:
        stats = manager.run(idle_timeout_s=8)
    assert (stats.units_done, stats.tasks_recomputed, stats.causes) == (1, 3, 0)
