"""Recovery and sharing on Apache Kafka: a large plan survives `kill -9`, is shared by replicas, and
waits for approval; every way, the priority topics end up with what a clean run publishes.

The pipeline (`recompute_pipeline`: N sources -> enrich -> tag, and -> sum_n per group, ledger on)
is built once for the module. `enrich` then gets version 2 (`recompute_fns`); the ChangeDetector's
function check emits one `function_changed` event, whose plan replays every enrich application and
everything downstream: 2N + G tasks in G independent units (one per group: its enrich and tag tasks
and its sum). Each run below gets its own changes topic (the saved event is produced into it when
the run is ready), tasks, progress and priority topics, group and state dir; the event's plan id is
the same in every run, so are the unit ids.

Compared as multisets of (output, key, value, provenance header with its timestamp zeroed — the
one field a replay stamps anew — and `streamprov.supersedes`), read with read_committed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import recompute_fns
from confluent_kafka import Consumer, KafkaError, TopicPartition
from kafka_support import (
    FAST_GROUP_CONFIG,
    Record,
    consume_all,
    create_topic,
    delete_topics,
    partitions_of,
    produce,
    record_view,
    unique_name,
)
from ledger_pipeline import ledger_writer
from ledger_support import LEDGER
from recompute_pipeline import Pipeline, build_pipeline, detector
from typer.testing import CliRunner

from recompute_manager.executor import SUPERSEDES_HEADER
from recompute_manager.progress import RECORD_HEADER, Progress
from recompute_manager.service import ManagerSettings, ManagerStats, RecomputeManager
from streamprov.changes import ChangeKind
from streamprov.cli import app
from streamprov.config import load_config
from streamprov.header import ProvenanceHeader

pytestmark = pytest.mark.kafka

HERE = Path(__file__).resolve().parent
STREAMPROV = Path(sys.executable).parent / "streamprov"
N, G = 120, 6
TASKS = 2 * N + G
"""enrich and tag per source, sum_n per group."""

Row = tuple[str, bytes | None, bytes | None, bytes, bytes]


@dataclass
class Module:
    bootstrap: str
    pipeline: Pipeline
    event: bytes
    """The function_changed event, as the detector produced it."""
    event_key: bytes
    tmp: Path
    new_topic: Callable[..., str]


@dataclass
class Run:
    name: str
    config: Path
    changes: str
    tasks: str
    progress: str
    dead: str
    priority: dict[str, str]
    """Output topic -> this run's priority topic."""
    group: str
    state: Path


@pytest.fixture(scope="module")
def module(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Module]:
    bootstrap = kafka_bootstrap
    created: list[str] = []

    def new_topic(partitions: int = 1, config: dict[str, str] | None = None, *, prefix: str = "t") -> str:
        name = create_topic(bootstrap, unique_name(f"sp-{prefix}"), partitions=partitions, config=config)
        created.append(name)
        return name

    def unique_group(prefix: str = "g") -> str:
        return unique_name(f"sp-{prefix}")

    tmp = tmp_path_factory.mktemp("recompute-kill")
    detector_group = unique_group("detector")
    try:
        p = build_pipeline(bootstrap, new_topic, unique_group, tmp, detector_group, n=N, groups=G)
        with (
            ledger_writer(bootstrap, p.ledger) as writer,
            detector(bootstrap, p, detector_group, tmp, writer) as d,
        ):
            events = d.check_functions(recompute_fns.registry)
        assert [(e.kind, e.function.function_id if e.function else "") for e in events] == [
            (ChangeKind.FUNCTION_CHANGED, "enrich")
        ]
        [msg] = consume_all(bootstrap, p.changes, expected=1, timeout_s=30, grace_s=0.3)
        yield Module(bootstrap, p, msg.value(), msg.key(), tmp, new_topic)
    finally:
        delete_topics(bootstrap, created)


def make_run(
    m: Module, name: str, *, tasks_partitions: int = 2, max_fanout: int = 1000, workers: int = 1
) -> Run:
    p = m.pipeline
    t = m.new_topic
    run = Run(
        name,
        m.tmp / f"{name}.yaml",
        t(1, prefix=f"{name}-changes"),
        t(tasks_partitions, prefix=f"{name}-tasks"),
        t(2, prefix=f"{name}-progress"),
        t(1, prefix=f"{name}-dl"),
        {out: t(2, prefix=f"{name}-prio") for out in p.outputs},
        unique_name(f"sp-rm-{name}"),
        m.tmp / f"{name}-state",
    )
    topics = "".join(f"  {out}:\n    priority_topic: {prio}\n" for out, prio in run.priority.items())
    run.config.write_text(
        f"kafka:\n  bootstrap_servers: {m.bootstrap}\n"
        "streams:\n"
        f"  alerts: {t(1, prefix=f'{name}-alerts')}\n  changes: {run.changes}\n  ledger: {p.ledger}\n"
        f"  recompute_tasks: {run.tasks}\n  recompute_progress: {run.progress}\n  dead_letters: {run.dead}\n"
        f"sources:\n  - {p.src}\n"
        f"defaults:\n  recompute:\n    max_fanout: {max_fanout}\n"
        f"topics:\n{topics}"
        f"recompute_manager:\n  group_id: {run.group}\n  state_dir: {run.state}\n  workers: {workers}\n"
    )
    return run


def start_event(m: Module, run: Run) -> None:
    """The function change reaches this run's manager."""
    produce(m.bootstrap, run.changes, [Record(m.event, m.event_key)])


def settings(run: Run, replica: str) -> ManagerSettings:
    """An in-process replica of the run's manager (each replica has a state dir of its own)."""
    return ManagerSettings.from_config(
        load_config(run.config),
        state_dir=run.state / replica,
        http_port=None,
        ledger_id=LEDGER,
        replica_id=replica,
        consumer_config=FAST_GROUP_CONFIG,
    )


def output(m: Module, run: Run) -> list[Row]:
    """Every record on the run's priority topics (read_committed), comparable across runs; reads a
    little past the expected count per topic to see what should not be there."""
    p = m.pipeline
    expected = {p.mid: N, p.tagged: N, p.sums: G}
    rows: list[Row] = []
    for out, prio in run.priority.items():
        for msg in consume_all(m.bootstrap, prio, expected=expected[out], timeout_s=30, grace_s=0.5):
            key, value, headers = record_view(msg)
            header = ProvenanceHeader.from_headers(headers)
            assert header is not None
            supersedes = dict(headers)[SUPERSEDES_HEADER]
            assert supersedes is not None
            stable = dataclasses.replace(header, timestamp_ms=0).encode()
            rows.append((out, key, value, stable, supersedes))
    return rows


class ProgressWatcher:
    """Reads a progress topic (read_committed) as it grows: the unit records committed so far."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": unique_name("watch"),
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": False,
            }
        )
        self._consumer.assign([TopicPartition(topic, p, 0) for p in partitions_of(bootstrap, topic)])
        self.records: list[Progress] = []

    def poll(self, timeout_s: float = 0.2) -> None:
        for msg in self._consumer.consume(500, timeout_s):
            err = msg.error()
            if err is not None:
                assert err.code() == KafkaError._PARTITION_EOF, err.str()
                continue
            if dict(msg.headers() or []).get(RECORD_HEADER) == b"progress":
                self.records.append(Progress.decode(msg.value()))

    def units(self) -> list[tuple[str, int]]:
        return [(r.plan_id, r.unit) for r in self.records if r.unit >= 0]

    def wait_units(self, count: int, timeout_s: float, alive: Callable[[], None] = lambda: None) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.units()) < count:
            assert time.monotonic() < deadline, f"{len(self.units())} of {count} units done in {timeout_s}s"
            alive()
            self.poll()

    def settle(self, quiet_s: float = 1.0) -> None:
        """Read until nothing new arrived for `quiet_s` (after a kill: all that will ever commit)."""
        seen, quiet_until = -1, 0.0
        while len(self.records) != seen or time.monotonic() < quiet_until:
            if len(self.records) != seen:
                seen, quiet_until = len(self.records), time.monotonic() + quiet_s
            self.poll()

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture(scope="module")
def clean(module: Module) -> list[Row]:
    """A run nobody disturbs: the reference output (two worker threads in one process)."""
    run = make_run(module, "clean", workers=2)
    start_event(module, run)
    with RecomputeManager(settings(run, "clean"), recompute_fns.registry) as manager:
        stats = manager.run(max_causes=1, idle_timeout_s=90)
    assert (stats.plans_run, stats.units_planned, stats.units_done, stats.dead_letters) == (1, G, G, 0)
    assert stats.tasks_recomputed == TASKS
    rows = output(module, run)
    assert len(rows) == TASKS and len(set(rows)) == TASKS
    p = module.pipeline
    assert Counter(r[0] for r in rows) == {p.mid: N, p.tagged: N, p.sums: G}
    return rows


def _cli(run: Run, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [str(STREAMPROV), "recompute-manager", "run", "--config", str(run.config)]
    cmd += ["--functions", "recompute_fns:registry", "--http-port", "0", "--ledger-id", LEDGER, *extra]
    env = {**os.environ, "PYTHONPATH": f"{HERE}:{os.environ.get('PYTHONPATH', '')}"}
    with log.open("w") as f:
        return subprocess.Popen(cmd, stderr=f, env=env)


_STARTED = re.compile(r"unit (\d+/\d+) of plan \w+ started")
_DONE = re.compile(r"unit (\d+/\d+) of plan \w+ done")


def in_flight(log: Path) -> set[str]:
    """Units an incarnation began and did not finish (by its log)."""
    text = log.read_text()
    return set(_STARTED.findall(text)) - set(_DONE.findall(text))


def _done(logs: list[Path]) -> set[str]:
    return {u for log in logs for u in _DONE.findall(log.read_text())}


def test_kill_9_three_times_mid_plan_publishes_exactly_the_clean_output(
    module: Module, clean: list[Row]
) -> None:
    run = make_run(module, "kill")
    watcher = ProgressWatcher(module.bootstrap, run.progress)
    logs = [module.tmp / f"kill-{i}.log" for i in range(4)]
    proc = _cli(run, logs[0], "--replica", "kill-test")
    start_event(module, run)

    current = logs[0]

    def running() -> None:
        assert proc.poll() is None, current.read_text()[-3000:]

    kills: list[int] = []
    interrupted: list[set[str]] = []
    try:
        for i in range(3):
            watcher.wait_units(len(watcher.units()) + 1, 60, running)  # this incarnation did some work
            deadline = time.monotonic() + 20  # and has begun the next unit
            while not in_flight(logs[i]) and len(watcher.units()) < G - 1:
                assert time.monotonic() < deadline, logs[i].read_text()[-3000:]
                running()
                time.sleep(0.02)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            watcher.settle()
            kills.append(len(watcher.units()))
            interrupted.append(in_flight(logs[i]))
            current = logs[i + 1]
            proc = _cli(run, current, "--replica", "kill-test")  # the same replica comes back
        assert all(0 < k < G for k in kills), f"units done at the kills: {kills} of {G}"
        assert any(interrupted), "no kill landed inside a unit"
        watcher.wait_units(G, 90, running)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, logs[-1].read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        watcher.settle(0.5)
        watcher.close()

    # the units the kills interrupted were run again by a later incarnation
    rerun = [u for i, units in enumerate(interrupted) for u in units if u in _done(logs[i + 1 :])]
    assert rerun, f"interrupted {interrupted}, none done later"
    # every unit committed exactly once, every incarnation but the first resumed (no re-planning)
    assert sorted(watcher.units()) == sorted(set(watcher.units())) and len(watcher.units()) == G
    plans = [r for r in watcher.records if r.unit < 0]
    assert [(r.state, r.total, r.units) for r in plans] == [("planned", TASKS, G)]
    got = output(module, run)
    assert len(got) == len(set(got)) == TASKS  # no duplicates, nothing missing
    assert Counter(got) == Counter(clean)
    assert not consume_all(module.bootstrap, run.dead, expected=1, timeout_s=1)


def _run_in_thread(manager: RecomputeManager, results: dict[str, Any], name: str) -> threading.Thread:
    def target() -> None:
        try:
            results[name] = manager.run(idle_timeout_s=120)
        except BaseException as exc:  # reported by the test
            results[name] = exc

    thread = threading.Thread(target=target, name=f"manager-{name}", daemon=True)
    thread.start()
    return thread


def test_two_replicas_share_the_units_of_one_plan(module: Module, clean: list[Row]) -> None:
    run = make_run(module, "pair", tasks_partitions=4)
    results: dict[str, Any] = {}
    watcher = ProgressWatcher(module.bootstrap, run.progress)
    with (
        RecomputeManager(settings(run, "replica-a"), recompute_fns.registry) as a,
        RecomputeManager(settings(run, "replica-b"), recompute_fns.registry) as b,
    ):
        threads = [_run_in_thread(a, results, "a"), _run_in_thread(b, results, "b")]
        try:
            deadline = time.monotonic() + 60  # both workers hold tasks partitions before the plan
            while len(a.workers[0].assigned) + len(b.workers[0].assigned) < 4 or not (
                a.workers[0].assigned and b.workers[0].assigned
            ):
                assert time.monotonic() < deadline, (a.workers[0].assigned, b.workers[0].assigned)
                time.sleep(0.1)
            start_event(module, run)
            watcher.wait_units(G, 90)
        finally:
            a.stop()
            b.stop()
            for t in threads:
                t.join(timeout=60)
            watcher.close()
    sa, sb = results["a"], results["b"]
    assert isinstance(sa, ManagerStats) and isinstance(sb, ManagerStats), results
    assert sa.units_done > 0 and sb.units_done > 0, (sa.units_done, sb.units_done)  # both worked
    assert sa.units_done + sb.units_done == G
    assert sa.plans_run + sb.plans_run == 1  # one of them planned
    got = output(module, run)
    assert len(got) == len(set(got)) == TASKS
    assert Counter(got) == Counter(clean)


def test_a_plan_over_max_fanout_waits_for_approve(module: Module, clean: list[Row]) -> None:
    """Refused (needs_approval) while one manager runs; approved (twice) while none runs; run by the
    next manager (the CLI runs in this thread alone: CliRunner swaps sys.stdout)."""
    run = make_run(module, "approve", max_fanout=50)
    watcher = ProgressWatcher(module.bootstrap, run.progress)
    results: dict[str, Any] = {}
    cli = CliRunner()
    try:
        with RecomputeManager(settings(run, "approve"), recompute_fns.registry) as manager:
            thread = _run_in_thread(manager, results, "planner")
            try:
                start_event(module, run)
                deadline = time.monotonic() + 60
                while not any(r.state == "needs_approval" for r in watcher.records):
                    assert time.monotonic() < deadline, watcher.records
                    watcher.poll()
            finally:
                manager.stop()
                thread.join(timeout=60)
        assert isinstance(results["planner"], ManagerStats), results
        [held] = watcher.records
        assert (held.unit, held.total, held.units) == (-1, TASKS, G)
        assert not consume_all(module.bootstrap, run.tasks, expected=1, timeout_s=1)  # nothing runs

        status = cli.invoke(app, ["recompute", "status", "--config", str(run.config)])
        assert status.exit_code == 0, status.output
        assert "needs_approval" in status.output and f"0/{TASKS} tasks, 0/{G} units" in status.output
        approve = ["recompute", "approve", held.plan_id[:10], "--config", str(run.config), "--by", "test"]
        first = cli.invoke(app, approve)
        assert first.exit_code == 0, first.output
        assert f"approved: {TASKS} tasks in {G} units" in first.output
        again = cli.invoke(app, approve)
        assert again.exit_code == 0 and "approved before" in again.output, again.output
        unknown = cli.invoke(app, ["recompute", "approve", "ffff", "--config", str(run.config)])
        assert unknown.exit_code == 1 and "no plan 'ffff'" in unknown.output, unknown.output

        with RecomputeManager(settings(run, "approve"), recompute_fns.registry) as manager:
            thread = _run_in_thread(manager, results, "workers")
            try:
                watcher.wait_units(G, 90)
                watcher.settle(1.0)
            finally:
                manager.stop()
                thread.join(timeout=60)
        assert isinstance(results["workers"], ManagerStats), results
    finally:
        watcher.close()
    assert len(watcher.units()) == len(set(watcher.units())) == G  # approved once, run once
    assert len(consume_all(module.bootstrap, run.tasks, expected=G, timeout_s=10, grace_s=0.5)) == G
    states = [r.state for r in watcher.records if r.unit < 0]
    assert states == ["needs_approval", "approved"]
    status = cli.invoke(app, ["recompute", "status", held.plan_id[:10], "--config", str(run.config)])
    assert status.exit_code == 0, status.output
    assert " done " in status.output and f"100% {TASKS}/{TASKS} tasks, {G}/{G} units" in status.output
    assert "approved by test" in status.output
    got = output(module, run)
    assert len(got) == len(set(got)) == TASKS
    assert Counter(got) == Counter(clean)


def test_units_over_max_unit_bytes_run_in_parts_with_the_clean_output(
    module: Module, clean: list[Row]
) -> None:
    """Each group's unit (its enrich and tag tasks and its sum) is larger than `max_unit_bytes`: it is
    cut into parts keyed by the group's sum, run one after the other; the last part's sum reads the
    enrich outputs of the earlier parts from the value store (two worker threads)."""
    run = make_run(module, "parts", workers=2)
    limit = 9_000
    start_event(module, run)
    config = dataclasses.replace(settings(run, "parts"), max_unit_bytes=limit)
    with RecomputeManager(config, recompute_fns.registry) as manager:
        stats = manager.run(max_causes=1, idle_timeout_s=90)
    assert stats.plans_run == 1 and stats.units_planned > G, stats.units_planned  # cut into parts
    assert (stats.units_done, stats.dead_letters) == (stats.units_planned, 0)
    assert stats.tasks_recomputed == TASKS
    units = consume_all(module.bootstrap, run.tasks, expected=stats.units_planned, timeout_s=10, grace_s=0.5)
    assert len(units) == stats.units_planned and all(len(u.value()) <= limit for u in units)
    assert len({u.key() for u in units}) == G  # one key per group: its parts ran in order
    got = output(module, run)
    assert len(got) == len(set(got)) == TASKS
    assert Counter(got) == Counter(clean)
    assert not consume_all(module.bootstrap, run.dead, expected=1, timeout_s=1)
