"""Planner: the affected sub-graph from the ledger, in dependency order, as deterministic tasks."""

from __future__ import annotations

import io
import itertools
import random
from pathlib import Path

import fastavro
import pytest
from ledger_support import CTX, LEDGER, build, map_app, node, pipeline, reduce_app

from recompute_manager.planner import (
    SCHEMA,
    ChangeBatch,
    InputOrigin,
    InputRef,
    PlanError,
    RecomputePlan,
    RecomputeTask,
    plan_for_alert,
    plan_for_change,
    plan_for_changes,
)
from streamprov import avro
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, FunctionChange, SourceChange
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.config.models import Criticality
from streamprov.header import ProvenanceHeader
from streamprov.ledger import Application, LedgerIndex
from validator.alerts import Alert, AlertKind, Evidence


def _index(tmp_path: Path) -> LedgerIndex:
    apps = pipeline(2, chain_len=2, fan_in=3)
    apps.append(Application.of_source(node("g0-s1", "v1"), timestamp_ms=2, device_id="src", context=CTX))
    idx = LedgerIndex(tmp_path / "idx", LEDGER)
    idx.catch_up(build(apps))
    return idx


def _source_change(data_id: str = "g0-s1") -> ChangeEvent:
    sc = SourceChange("src", 0, 7, data_id, node(data_id, "v0").checksum, node(data_id, "v1").checksum)
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, sc, EMPTY_IMPACT, 5)


def _alert(kind: AlertKind, out_id: str, out_content: str, source: Checksum) -> Alert:
    ref = node(out_id, out_content)
    header = ProvenanceHeader(out_id, ref.checksum, source, 1, ())
    return Alert.create(
        kind,
        data_id=out_id,
        topic="out",
        partition=2,
        offset=9,
        header=header.encode(),
        evidence=Evidence("a", "b", "r"),
        criticality=Criticality.HIGH,
        detected_at_ms=1,
    )


def test_source_change_plans_only_affected_subgraph_in_order(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        plan = plan_for_change(idx, _source_change(), topic="out", created_at_ms=1)
        again = plan_for_change(idx, _source_change(), topic="out", created_at_ms=1)
    assert plan == again  # deterministic ids
    names = [(t.steps[0].function_id, t.data_id) for t in plan.tasks]
    assert names == [("map0", "g0-s1"), ("map1", "g0-s1"), ("sum", "g0"), ("publish", "g0")]
    first, second, reduce_, publish = plan.tasks
    assert first.inputs[0].origin is InputOrigin.SOURCE
    assert first.inputs[0].node == node("g0-s1", "v1")  # replayed on the current version
    assert second.depends_on == (first.task_id,) and second.inputs[0].from_task == first.task_id
    origins = [i.origin for i in reduce_.inputs]
    assert origins.count(InputOrigin.TASK) == 1 and origins.count(InputOrigin.STORED) == 2
    assert reduce_.depends_on == (second.task_id,)
    assert publish.depends_on == (reduce_.task_id,)
    assert [t.position for t in plan.tasks] == [0, 1, 2, 3]
    assert all(t.plan_id == plan.plan_id for t in plan.tasks)
    assert len({t.task_id for t in plan.tasks}) == 4
    assert "change:source_changed" in plan.describe()


def test_alert_on_output_replays_its_lineage(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        a = _alert(AlertKind.CHECKSUM_MISMATCH, "g1", "published", node("g1", "x").checksum)
        plan = plan_for_alert(idx, a)
        assert len(plan) == 3 * 2 + 2
        assert plan.tasks[-1].supersedes is not None and plan.tasks[-1].supersedes.offset == 9
        assert all(t.topic == "out" for t in plan.tasks)
        assert all(i.origin is not InputOrigin.STORED for t in plan.tasks for i in t.inputs)
        # a source-changed alert replays what derives from the old source on the newest version
        sc = _alert(AlertKind.SOURCE_CHANGED, "g0-s1", "m1", node("g0-s1", "v0").checksum)
        plan2 = plan_for_alert(idx, sc)
        assert plan2.tasks[0].inputs[0].node == node("g0-s1", "v1")
        assert plan2.tasks[1].supersedes is not None
        with pytest.raises(PlanError):
            plan_for_alert(idx, _alert(AlertKind.STALE, "zz", "nothing", node("zz", "q").checksum))


def test_function_change_upgrades_version(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
        plan = plan_for_change(idx, ChangeEvent.for_function(fc, EMPTY_IMPACT, 3))
    assert [t.steps[0].function_id for t in plan.tasks].count("map1") == 6
    assert plan.tasks[-1].steps[0].function_id == "publish"
    assert {t.steps[0].function_version for t in plan.tasks if t.steps[0].function_id == "map1"} == {"2"}
    assert plan.tasks[0].inputs[0].origin is InputOrigin.STORED  # map0's output is not affected
    assert len(plan) == 6 + 2 + 2


def test_task_round_trip_and_plain_fastavro(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        plan = plan_for_change(idx, _source_change(), topic="out")
    for task in plan.tasks:
        raw = task.encode()
        assert RecomputeTask.decode(raw).to_record() == task.to_record()
        body = io.BytesIO(raw[len(avro.single_object_prefix(SCHEMA)) :])
        plain = fastavro.schemaless_reader(body, fastavro.parse_schema(SCHEMA))
        assert plain["task_id"] == task.task_id
    assert task.key == b"g0"
    with pytest.raises(PlanError):
        RecomputeTask.decode(b"nope")
    with pytest.raises(PlanError):
        RecomputeTask.decode(raw[:20])
    assert Checksum(ChecksumAlgorithm.CRC32C, b"1234") != task.previous_output


def _change(data_id: str, old: str, new: str | None, offset: int = 7) -> ChangeEvent:
    current = None if new is None else node(data_id, new).checksum
    kind = ChangeKind.SOURCE_CHANGED if new is not None else ChangeKind.SOURCE_DELETED
    sc = SourceChange("src", 0, offset, data_id, node(data_id, old).checksum, current)
    return ChangeEvent.for_source(kind, sc, EMPTY_IMPACT, 5)


def _assert_dependency_order(plan: RecomputePlan) -> None:
    seen: set[str] = set()
    for t in plan.tasks:
        assert set(t.depends_on) <= seen, f"{t.data_id} before a task it depends on"
        seen.add(t.task_id)


def test_a_batch_of_one_is_the_single_event_plan(tmp_path: Path) -> None:
    fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
    with _index(tmp_path) as idx:
        for event in (_source_change(), ChangeEvent.for_function(fc, EMPTY_IMPACT, 3)):
            assert plan_for_changes(idx, [event], created_at_ms=1) == plan_for_change(
                idx, event, created_at_ms=1
            )
        with pytest.raises(PlanError):
            plan_for_changes(idx, [])


def test_a_batch_plans_a_shared_reduce_once_with_every_change(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        events = [_change("g0-s0", "v0", "v9"), _change("g0-s2", "v0", "v8", 8)]
        plan = plan_for_changes(idx, events, topic="out", created_at_ms=1)
        apart = [plan_for_change(idx, e, topic="out", created_at_ms=1) for e in events]
        assert plan == plan_for_changes(idx, events, topic="out", created_at_ms=1)  # deterministic
        assert plan.plan_id != plan_for_changes(idx, events[::-1], topic="out", created_at_ms=1).plan_id
    names = [(t.steps[0].function_id, t.data_id) for t in plan.tasks]
    assert sorted(names) == sorted(
        [
            ("map0", "g0-s0"),
            ("map1", "g0-s0"),
            ("map0", "g0-s2"),
            ("map1", "g0-s2"),
            ("sum", "g0"),
            ("publish", "g0"),
        ]
    )
    assert sum(len(p) for p in apart) == 8  # apart, the reduce and publish run twice
    _assert_dependency_order(plan)
    (reduce_,) = [t for t in plan.tasks if t.steps[0].function_id == "sum"]
    origins = [i.origin for i in reduce_.inputs]
    assert origins == [InputOrigin.TASK, InputOrigin.STORED, InputOrigin.TASK]  # both changes, g0-s1 stored
    firsts = [t for t in plan.tasks if t.steps[0].function_id == "map0"]
    assert {t.inputs[0].node for t in firsts} == {node("g0-s0", "v9"), node("g0-s2", "v8")}
    assert all(i.origin is InputOrigin.SOURCE for t in firsts for i in t.inputs)
    assert plan.cause.kind == "changes" and len(plan.cause.causes) == 2
    assert all(t.cause == plan.cause for t in plan.tasks)


def test_a_batch_replays_on_the_newest_version_of_a_source(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:  # the ledger has g0-s1 v0 and v1
        twice = plan_for_changes(idx, [_change("g0-s1", "v0", "v1"), _change("g0-s1", "v1", "v2", 8)])
        assert twice.tasks[0].inputs[0].node == node("g0-s1", "v2")
        assert len(twice) == 4  # nothing derives from v1 yet
        gone = plan_for_changes(idx, [_change("g0-s1", "v0", "v1"), _change("g0-s1", "v1", None, 8)])
        assert gone.tasks[0].inputs[0].node == node("g0-s1", "v0")  # deleted: nothing to replace it with
        back = plan_for_changes(idx, [_change("g0-s1", "v1", "v0"), _change("g0-s1", "v0", "v1", 8)])
        assert back.tasks[0].inputs[0].node == node("g0-s1", "v1")


def test_a_batch_mixes_source_and_function_changes(tmp_path: Path) -> None:
    fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
    with _index(tmp_path) as idx:
        events = [_change("g0-s0", "v0", "v9"), ChangeEvent.for_function(fc, EMPTY_IMPACT, 3)]
        plan = plan_for_changes(idx, events, created_at_ms=1)
        fn_only = plan_for_change(idx, events[1], created_at_ms=1)
    assert len({t.entry_id for t in plan.tasks}) == len(plan) == len(fn_only) + 1  # + map0 of g0-s0
    _assert_dependency_order(plan)
    assert {t.steps[0].function_version for t in plan.tasks if t.steps[0].function_id == "map1"} == {"2"}
    (map0,) = [t for t in plan.tasks if t.steps[0].function_id == "map0"]
    assert map0.inputs[0] == InputRef(node("g0-s0", "v9"), InputOrigin.SOURCE)
    (map1,) = [t for t in plan.tasks if t.data_id == "g0-s0" and t.steps[0].function_id == "map1"]
    assert map1.inputs[0].origin is InputOrigin.TASK and map1.depends_on == (map0.task_id,)


def test_planned_tasks_are_what_their_records_decode_to(tmp_path: Path) -> None:
    with _index(tmp_path) as idx:
        plan = plan_for_changes(idx, [_change("g0-s0", "v0", "v9"), _change("g1-s1", "v0", "v7", 9)])
    for task in plan.tasks:
        assert RecomputeTask.decode(task.encode()) == task
    (reduce_, *_) = [t for t in plan.tasks if t.steps[0].function_id == "sum"]
    digest = reduce_.steps[0].inputs
    assert digest is not None and (digest.window_start, digest.window_end) == (0, 60_000)


def test_a_change_batch_plans_each_event_and_any_subset_from_one_traversal(tmp_path: Path) -> None:
    """`ChangeBatch`: the policy judges each event of a batch by its own plan's size, and the events
    that run are planned, without another ledger traversal: each count is `len(plan_for_change(e))`,
    each single plan IS `plan_for_change(e)` (same ids), each subset's plan IS `plan_for_changes` of
    it; for shared reduces, function changes, two versions of one source and a deletion."""
    fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
    batches = [
        [_change("g0-s0", "v0", "v9"), _change("g0-s2", "v0", "v8", 8)],
        [_change("g0-s0", "v0", "v9"), ChangeEvent.for_function(fc, EMPTY_IMPACT, 3)],
        [_change("g0-s1", "v0", "v1"), _change("g0-s1", "v1", "v2", 8), _change("g1-s1", "v0", None, 9)],
        [ChangeEvent.for_function(fc, EMPTY_IMPACT, 3), _change("g1-s0", "v0", "v5")],
    ]
    with _index(tmp_path) as idx:
        for events in batches:
            batch = ChangeBatch.of(idx, events, topic="out", created_at_ms=1)
            assert batch.plan() == plan_for_changes(idx, events, topic="out", created_at_ms=1)
            alone = [plan_for_change(idx, e, topic="out", created_at_ms=1) for e in events]
            assert list(batch.own_tasks()) == [len(p) for p in alone], [e.change_id for e in events]
            assert [batch.plan([i]) for i in range(len(events))] == alone
            for pair in itertools.combinations(range(len(events)), 2):
                some = [events[i] for i in pair]
                assert batch.plan(pair) == plan_for_changes(idx, some, topic="out", created_at_ms=1)
        shared = ChangeBatch.of(idx, batches[0], created_at_ms=1)
        with pytest.raises(PlanError):
            shared.plan([5])
        # the shared reduce and publish count twice
        assert sum(shared.own_tasks()) == 8 and len(shared.plan()) == 6


def _random_batch(rng: random.Random, idx_dir: Path) -> tuple[LedgerIndex, list[ChangeEvent]]:
    """A random small ledger (maps and reduces over versions of six DataIDs, self-loops, duplicate
    entries, a reduce reading one node twice, SOURCE entries) and 2-4 change events (source changes,
    deletions, function changes with and without a code hash, a repeated event)."""
    ids = [f"d{i}" for i in range(6)]
    nodes = [(d, f"v{j}") for d in ids for j in range(3)]
    apps = [
        Application.of_source(node(d, "v0"), timestamp_ms=1, device_id="s", context=CTX)
        for d in ids
        if rng.random() < 0.7
    ]
    for k in range(rng.randrange(3, 14)):
        fid, version = rng.choice(["f", "g", "h"]), rng.choice(["1", "2"])
        if rng.random() < 0.5:
            i, o = rng.sample(nodes, 2) if rng.random() < 0.9 else [rng.choice(nodes)] * 2
            apps.append(map_app(fid, node(*i), node(*o), version=version, ts=1 + k))
        else:
            ins = [node(*n) for n in rng.sample(nodes, rng.randrange(1, 4))]
            if rng.random() < 0.2:
                ins.append(ins[0])
            apps.append(reduce_app(fid, ins, node(*rng.choice(nodes)), version=version))
    if rng.random() < 0.3 and len(apps) > 1:
        apps.append(apps[rng.randrange(len(apps))])
    idx = LedgerIndex(idx_dir, LEDGER)
    idx.catch_up(build(apps))
    events: list[ChangeEvent] = []
    for e in range(rng.randrange(2, 5)):
        if rng.random() < 0.6:
            d = rng.choice(ids)
            old, new = rng.sample(["v0", "v1", "v2"], 2)
            current = None if rng.random() < 0.2 else node(d, new).checksum
            kind = ChangeKind.SOURCE_DELETED if current is None else ChangeKind.SOURCE_CHANGED
            events.append(
                ChangeEvent.for_source(
                    kind, SourceChange("src", 0, e, d, node(d, old).checksum, current), EMPTY_IMPACT, 5
                )
            )
        else:
            fid = rng.choice(["f", "g", "h"])
            code = fid.encode().ljust(16, b".") if rng.random() < 0.8 else b""
            fc = FunctionChange(fid, rng.choice(["1", "2"]), code, "3", b"new")
            events.append(ChangeEvent.for_function(fc, EMPTY_IMPACT, 3))
        if rng.random() < 0.15:
            events.append(events[-1])
    return idx, events


def test_a_change_batch_equals_planning_each_subset_on_random_ledgers(tmp_path: Path) -> None:
    """`ChangeBatch` against a traversal per subset, on 80 random ledgers (cycles, self-loops, two
    applications of one output, duplicate entries and events): counts, single plans, subset plans."""
    rng = random.Random(20261202)
    for seed in range(80):
        idx, events = _random_batch(rng, tmp_path / f"idx-{seed}")
        with idx:
            batch = ChangeBatch.of(idx, events, created_at_ms=1)
            alone = [plan_for_change(idx, e, created_at_ms=1) for e in events]
            assert list(batch.own_tasks()) == [len(p) for p in alone], seed
            assert [batch.plan([i]) for i in range(len(events))] == alone, seed
            some = sorted(rng.sample(range(len(events)), rng.randrange(1, len(events) + 1)))
            expected = plan_for_changes(idx, [events[i] for i in some], created_at_ms=1)
            assert batch.plan(some) == expected, (seed, some)
