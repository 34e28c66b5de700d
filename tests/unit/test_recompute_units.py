"""Units (a plan cut into independent parts), their wire format, progress folding, and the cache's
committed-only superseded versions; no broker."""

from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import fastavro
import pytest
from ledger_support import CTX, LEDGER, build, node, pipeline

from recompute_manager.planner import PlanError, RecomputePlan, RecomputeTask, plan_for_change
from recompute_manager.policy import Cause
from recompute_manager.progress import (
    KIND_PENDING,
    RECORD_HEADER,
    PlanStatus,
    Progress,
    ProgressLog,
    pending_key,
    progress_bar,
)
from recompute_manager.units import SCHEMA, UNIT_PREFIX, RecomputeUnit, UnitError, split_units
from recompute_manager.views import CommittedCache
from recompute_manager.worker import instance_id
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, FunctionChange
from streamprov.errors import StreamprovError
from streamprov.ledger import Application, LedgerIndex

WHY = Cause("policy", "function:map1", "recompute 10 task(s)")


def _plan(tmp_path: Path, groups: int = 2) -> RecomputePlan:
    """map1 changed: in each group its 3 map1 tasks, the group's sum and its publish (one unit each)."""
    apps = pipeline(groups, chain_len=2, fan_in=3)
    apps.append(Application.of_source(node("g0-s1", "v1"), timestamp_ms=2, device_id="src", context=CTX))
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        fc = FunctionChange("map1", "1", b"map1".ljust(16, b"."), "2", b"new-code")
        return plan_for_change(idx, ChangeEvent.for_function(fc, EMPTY_IMPACT, 3))


def test_a_plan_splits_into_one_unit_per_connected_component(tmp_path: Path) -> None:
    plan = _plan(tmp_path, groups=3)
    units = split_units(plan, subject="function:map1", cause=WHY, created_at_ms=7)
    assert [len(u.tasks) for u in units] == [5, 5, 5]
    assert [u.index for u in units] == [0, 1, 2] and {u.count for u in units} == {3}
    assert {u.plan_tasks for u in units} == {len(plan)}
    assert sorted(t.task_id for u in units for t in u.tasks) == sorted(t.task_id for t in plan.tasks)
    position = {t.task_id: t.position for t in plan.tasks}
    for u in units:
        assert [position[t.task_id] for t in u.tasks] == sorted(position[t.task_id] for t in u.tasks)
        assert [t.steps[0].function_id for t in u.tasks] == ["map1"] * 3 + ["sum", "publish"]
        assert u.key == u.tasks[-1].data_id.encode()  # the sink: the group's published output
        u.check()  # every dependency earlier in its own unit
    assert [u.key for u in units] == [b"g0", b"g1", b"g2"]
    assert units[1].unit_id == f"{plan.plan_id}/1"
    again = split_units(plan, subject="function:map1", cause=WHY, created_at_ms=7)
    assert again == units  # deterministic


def _task(template: RecomputeTask, i: int, data_id: str, deps: tuple[str, ...]) -> RecomputeTask:
    return dataclasses.replace(
        template, task_id=f"t{i:03d}", plan_id="p", data_id=data_id, position=i, depends_on=deps
    )


def test_random_dags_keep_every_dependency_and_every_dataid_inside_one_unit(tmp_path: Path) -> None:
    template = _plan(tmp_path).tasks[0]
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(1, 40)
        tasks: list[RecomputeTask] = []
        for i in range(n):
            deps = tuple(sorted({f"t{rng.randrange(i):03d}" for _ in range(rng.randint(0, 2))} if i else ()))
            tasks.append(_task(template, i, f"d{rng.randrange(max(1, n // 2))}", deps))
        plan = RecomputePlan("p", WHY, tuple(tasks), False, False)
        units = split_units(plan, subject="s", cause=WHY)
        home = {t.task_id: u.index for u in units for t in u.tasks}
        assert len(home) == n
        for t in tasks:
            assert all(home[d] == home[t.task_id] for d in t.depends_on)
        by_data: dict[str, set[int]] = {}
        for t in tasks:
            by_data.setdefault(t.data_id, set()).add(home[t.task_id])
        assert all(len(h) == 1 for h in by_data.values())  # one DataID's tasks: one unit, in order
        for u in units:
            u.check()
        firsts = [min(t.position for t in u.tasks) for u in units]
        assert firsts == sorted(firsts)


def test_unit_round_trip_and_plain_fastavro(tmp_path: Path) -> None:
    [unit, _] = split_units(_plan(tmp_path), subject="function:map1", cause=WHY, created_at_ms=11)
    raw = unit.encode()
    assert raw.startswith(UNIT_PREFIX)
    assert RecomputeUnit.decode(raw) == unit
    body = io.BytesIO(raw[len(UNIT_PREFIX) :])
    plain: Any = fastavro.schemaless_reader(body, fastavro.parse_schema(SCHEMA))
    assert (plain["plan_id"], plain["unit_index"], plain["unit_count"], plain["key"]) == (
        unit.plan_id,
        0,
        2,
        "g0",
    )
    assert [RecomputeTask.decode(t, unit_cause=WHY) for t in plain["tasks"]] == list(unit.tasks)
    assert json.loads(plain["cause"])["kind"] == "policy"
    with pytest.raises(PlanError, match="part of a unit record"):  # its cause is the unit's
        RecomputeTask.decode(plain["tasks"][0])


def test_a_unit_writes_its_cause_once_not_once_per_task(tmp_path: Path) -> None:
    """A plan of a batch of change events has one cause with a sub-cause per event: written with
    every task it made each task as large as the batch (a batch of 1,000 events: 229 KB a task)."""
    plan = _plan(tmp_path)
    big = Cause(
        "changes", "1000 change events", "", tuple(Cause("change", f"s{i}", "x" * 100) for i in range(1000))
    )
    [unit, _] = split_units(plan, subject="s", cause=big)
    assert all(t.cause is big for t in unit.tasks)  # the tasks run for the unit's (the decision's) cause
    raw = unit.encode()
    assert len(raw) < 2 * len(json.dumps(big.to_dict()))
    decoded = RecomputeUnit.decode(raw)
    assert decoded == unit and all(t.cause == big for t in decoded.tasks)
    alone = unit.tasks[0].encode()  # on its own (a dead letter) a task carries its cause
    assert RecomputeTask.decode(alone).cause == big
    approved = unit.approved("ops")
    assert len(approved.encode()) < len(raw) + 200
    assert RecomputeUnit.decode(approved.encode()).tasks[0].cause == approved.cause


@pytest.mark.parametrize("raw", [b"", b"nope", UNIT_PREFIX, UNIT_PREFIX + b"\xff\xff", None])
def test_bytes_that_are_not_a_unit_raise_unit_error(raw: bytes | None) -> None:
    with pytest.raises(UnitError):
        RecomputeUnit.decode(raw)


def test_an_inconsistent_unit_does_not_decode(tmp_path: Path) -> None:
    [unit, other] = split_units(_plan(tmp_path), subject="s", cause=WHY)
    backwards = dataclasses.replace(unit, tasks=tuple(reversed(unit.tasks)))
    with pytest.raises(UnitError, match="not earlier in the unit"):
        RecomputeUnit.decode(backwards.encode())
    foreign = dataclasses.replace(unit, tasks=(dataclasses.replace(unit.tasks[0], plan_id="x" * 64),))
    with pytest.raises(UnitError, match="belongs to plan"):
        RecomputeUnit.decode(foreign.encode())
    with pytest.raises(UnitError, match="index"):
        RecomputeUnit.decode(dataclasses.replace(other, index=2).encode())


def test_approval_tops_the_cause_tree(tmp_path: Path) -> None:
    [unit, _] = split_units(_plan(tmp_path), subject="function:map1", cause=WHY)
    approved = unit.approved("ops")
    assert approved.cause == Cause("approved", "function:map1", "approved by ops", (WHY,))
    assert [t.task_id for t in approved.tasks] == [t.task_id for t in unit.tasks] and approved.key == unit.key
    assert {t.cause for t in approved.tasks} == {approved.cause}


def _progress(state: str, unit: int = -1, **kw: int) -> Progress:
    counts = {"total": 10, "done": 0, "recomputed": 0, "unchanged": 0, "skipped": 0, "dead": 0} | kw
    return Progress("p" * 64, "change:x", "s", state, "why", at_ms=1, unit=unit, units=2, **counts)


def test_plan_status_folds_unit_records() -> None:
    planned = _progress("planned")
    u0 = _progress("done", 0, total=5, done=5, recomputed=4, unchanged=1)
    u1 = _progress("failed", 1, total=5, done=5, recomputed=3, dead=2)
    assert PlanStatus.of([planned])["p" * 64].state == "planned"
    running = PlanStatus.of([planned, u0])["p" * 64]
    assert (running.state, running.done, running.total) == ("running", 5, 10)
    assert "running" in running.line() and "5/10 tasks, 1/2 units" in running.line()
    assert "[##########----------]  50%" in running.line()
    assert PlanStatus.of([planned, u0, u0])["p" * 64].done == 5  # a unit counts once
    failed = PlanStatus.of([planned, u0, u1])["p" * 64]
    assert (failed.state, failed.done) == ("failed", 10)
    assert "recomputed 7, unchanged 1, skipped 0, dead 2" in failed.line()
    assert PlanStatus.of([planned, dataclasses.replace(u1, state="done"), u0])["p" * 64].state == "done"
    held = PlanStatus.of([_progress("needs_approval")])["p" * 64]
    assert (held.state, held.done) == ("needs_approval", 0)
    assert PlanStatus.of([_progress("approved"), u0])["p" * 64].state == "running"


def test_progress_records_decode_old_and_refuse_junk() -> None:
    old = {k: v for k, v in dataclasses.asdict(_progress("done")).items() if k not in ("unit", "units")}
    decoded = Progress.decode(json.dumps(old).encode())
    assert (decoded.unit, decoded.units, decoded.key) == (-1, 0, b"p" * 64)
    assert _progress("done", 3).key == b"p" * 64 + b"/3"
    for junk in (b"\x00", b"[]", b'{"plan_id": 1}'):
        with pytest.raises(StreamprovError):
            Progress.decode(junk)
    assert progress_bar(0, 0) == "[####################] 100%"
    assert progress_bar(1, 3, width=3) == "[#--]  33%"


def test_progress_log_keeps_pending_units_apart(tmp_path: Path) -> None:
    [unit, _] = split_units(_plan(tmp_path), subject="s", cause=WHY)
    log = ProgressLog()
    log.add(pending_key(unit.plan_id, 0), unit.encode(), {RECORD_HEADER: KIND_PENDING})
    log.add(b"k", _progress("needs_approval").encode(), {})
    log.add(b"k", b"garbage", {})
    log.add(b"k", None, {})
    assert log.pending == {unit.plan_id: {0: unit}}
    assert [r.state for r in log.records] == ["needs_approval"] and log.unreadable == 1


def test_committed_cache_writes_superseded_versions_only_once_committed(tmp_path: Path) -> None:
    old, new, newer = node("d", "v0"), node("d", "v1"), node("d", "v2")
    with CommittedCache(tmp_path / "cache") as cache:
        cache.begin()
        cache.supersede(old, new, b"h1")
        assert cache.latest(old) == old and cache.header(new) is None  # not committed: invisible
        staged = cache.staged()
        assert staged == [(old, new, b"h1")]
        cache.begin()
        assert cache.staged() == []  # an aborted unit leaves nothing
        cache.commit(staged)
        assert cache.latest(old) == new and cache.header(new) == b"h1"
        assert not cache.record(old, newer, b"h2", at_ms=0)  # an older correction loses
        assert cache.latest(old) == new
        assert cache.record(old, newer, b"h2", at_ms=2**62)
        assert cache.latest(old) == newer
        cache.supersede(newer, node("d", "v3"), b"h3")  # outside a unit: at once
        assert cache.latest(old) == node("d", "v3")


def test_instance_ids_are_what_kafka_accepts() -> None:
    assert instance_id("pod-7.a", "worker-0") == "pod-7.a.worker-0"
    assert instance_id("host/with spaces:1", "planner") == "host_with_spaces_1.planner"
    assert len(instance_id("x" * 300)) == 249


def test_a_repeated_cause_does_not_replace_the_state_of_the_plan_it_repeats() -> None:
    """A cause repeated exactly gets the plan id of the plan it repeats; its `duplicate` record was
    published under that plan's key, so `recompute status` (and compaction) lost the plan's state:
    a plan waiting for approval could no longer be approved."""
    waiting = Progress("p1", "alert", "id-1", "needs_approval", "too many", 9, 0, 0, 0, 0, 0, 1)
    repeat = Progress("p1", "alert", "id-1", "duplicate", "recomputed 2s ago", 9, 0, 0, 0, 0, 0, 2)
    assert repeat.key == b"p1/duplicate" and waiting.key == b"p1"
    for records in ([waiting, repeat], [repeat, waiting]):  # two keys: two partitions, either order
        assert PlanStatus.of(records)["p1"].state == "needs_approval"
    assert PlanStatus.of([repeat])["p1"].state == "duplicate"  # the plan's own record is gone
