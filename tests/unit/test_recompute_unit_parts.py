"""A component too large for one unit record, cut into parts that run one after the other: the same
results as the whole component, and a task dead-lettered in one part stops its dependents in the
next ones; no broker."""

from __future__ import annotations

from pathlib import Path

import pytest
from ledger_support import LEDGER, build

from recompute_manager.cache import ResultCache
from recompute_manager.executor import Executor, PlanResult
from recompute_manager.planner import InputOrigin, RecomputePlan, plan_for_change
from recompute_manager.policy import Cause
from recompute_manager.units import RecomputeUnit, encoded_units, split_units
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, FunctionChange
from streamprov.header import ProvenanceHeader
from streamprov.ledger import Application, ApplicationKind, DataRef, LedgerIndex
from streamprov.lineage import StepKind
from streamprov.registry import FunctionRegistry

WHY = Cause("policy", "function:scale", "recompute")
N = 40


def scale_v1(x: int) -> int:
    return x * 2


def scale_v2(x: int) -> int:
    if x == 13:
        raise ValueError("13 is unlucky")
    return x * 3


def _registry() -> FunctionRegistry:
    reg = FunctionRegistry()
    reg.add(scale_v1, "scale", "1")
    reg.add(scale_v2, "scale", "2")
    reg.add(lambda acc, x: acc + x, "total", "1", kind=StepKind.REDUCE, initial=lambda: 0)
    return reg


def _ref(data_id: str, value: int) -> DataRef:
    return DataRef.of(data_id, str(value).encode())


def _plan(tmp_path: Path, reg: FunctionRegistry) -> RecomputePlan:
    """scale changed from v1 to v2: N map tasks and the one reduce over their outputs, one component."""
    old, new = reg.get("scale", "1"), reg.get("scale", "2")
    total = reg.get("total")
    apps: list[Application] = []
    mids: list[DataRef] = []
    for i in range(N):
        src = _ref(f"s{i:03d}", i)
        mid = _ref(f"s{i:03d}", i * 2)
        apps.append(Application.of_source(src, timestamp_ms=1))
        apps.append(
            Application.create(
                ApplicationKind.MAP, "scale", "1", old.code_hash, {}, [src], mid, timestamp_ms=1
            )
        )
        mids.append(mid)
    out = _ref("sum", sum(i * 2 for i in range(N)))
    apps.append(
        Application.create(
            ApplicationKind.REDUCE, "total", "1", total.code_hash, {}, mids, out, timestamp_ms=1
        )
    )
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        change = FunctionChange("scale", "1", old.code_hash, "2", new.code_hash)
        return plan_for_change(idx, ChangeEvent.for_function(change, EMPTY_IMPACT, 3))


def _no_sleep(_s: float) -> None:
    """Retries without their backoff: the unlucky task fails every attempt."""


def _sources() -> dict[str, bytes]:
    return {f"s{i:03d}": str(i).encode() for i in range(N)}


def _run_parts(units: tuple[RecomputeUnit, ...], executor: Executor, cache: ResultCache) -> list[PlanResult]:
    """Each part in turn, as one worker takes them off one partition: its dead tasks are marked once
    it committed (`UnitWorker`)."""
    results = []
    for unit in units:
        result = executor.run_plan(unit.plan())
        cache.mark_dead(d.task.task_id for d in result.dead)
        results.append(result)
    return results


def test_a_component_over_max_bytes_is_cut_into_parts_of_one_key_that_fit(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _registry())
    [whole] = split_units(plan, subject="function:scale", cause=WHY, created_at_ms=1)
    size = len(whole.encode())
    limit = size // 3
    parts = split_units(plan, subject="function:scale", cause=WHY, created_at_ms=1, max_bytes=limit)
    assert len(parts) >= 3
    assert all(len(p.encode()) <= limit for p in parts)
    assert [p.index for p in parts] == list(range(len(parts))) and {p.count for p in parts} == {len(parts)}
    assert {p.key for p in parts} == {b"sum"}  # the component's sink: one partition, in order
    assert [t.task_id for p in parts for t in p.tasks] == [t.task_id for t in plan.tasks]
    reduce_task = parts[-1].tasks[-1]
    assert reduce_task.steps[0].kind is StepKind.REDUCE
    earlier = {t.task_id for p in parts[:-1] for t in p.tasks}
    # inputs from earlier parts are stored inputs naming their task; dependencies stay in the part
    for ref in reduce_task.inputs:
        if ref.from_task in earlier:
            assert ref.origin is InputOrigin.STORED
        else:
            assert ref.origin is InputOrigin.TASK
    assert set(reduce_task.depends_on) <= {t.task_id for t in parts[-1].tasks}
    for p in parts:
        p.check()
        again = RecomputeUnit.decode(p.encode())
        assert again == p and again.key == b"sum"
    # unsplit when it fits
    assert split_units(plan, subject="function:scale", cause=WHY, created_at_ms=1, max_bytes=size) == (whole,)
    # the records made with the units (each task encoded once) are the units' own encodings
    for max_bytes in (limit, size, None):
        pairs = encoded_units(plan, subject="function:scale", cause=WHY, created_at_ms=1, max_bytes=max_bytes)
        assert [raw for _, raw in pairs] == [u.encode() for u, _ in pairs]


def test_a_task_larger_than_max_bytes_stays_one_part_for_the_caller_to_refuse(tmp_path: Path) -> None:
    plan = _plan(tmp_path, _registry())
    parts = split_units(plan, subject="function:scale", cause=WHY, max_bytes=100)
    assert len(parts) == len(plan.tasks) and all(len(p.tasks) == 1 for p in parts)
    assert all(len(p.encode()) > 100 for p in parts)


def test_parts_run_in_order_give_the_whole_components_results(tmp_path: Path) -> None:
    reg = _registry()
    reg_ok = FunctionRegistry()
    reg_ok.add(scale_v1, "scale", "1")
    plan = _plan(tmp_path, reg)
    [whole] = split_units(plan, subject="s", cause=WHY)
    parts = split_units(plan, subject="s", cause=WHY, max_bytes=len(whole.encode()) // 4)
    with ResultCache(tmp_path / "a") as a, ResultCache(tmp_path / "b") as b:
        one = Executor(reg, _sources(), cache=a, sleep=_no_sleep).run_plan(whole.plan())
        many = _run_parts(parts, Executor(reg, _sources(), cache=b, sleep=_no_sleep), b)
    # the task that raises (input 13) is dead in both; so is the sum, which needs its output
    assert [d.task.data_id for d in one.dead] == ["s013", "sum"]
    assert [d.task.data_id for r in many for d in r.dead] == ["s013", "sum"]
    assert "depends on dead-lettered task" in [d for r in many for d in r.dead][-1].error
    got = {r.task.task_id: r for res in many for r in res.recomputed}
    assert len(got) == len(one.recomputed) == N - 1
    for r in one.recomputed:
        mine, theirs = ProvenanceHeader.decode(got[r.task.task_id].header), ProvenanceHeader.decode(r.header)
        assert got[r.task.task_id].value == r.value
        assert (mine.checksum, mine.source_checksum, mine.lineage) == (
            theirs.checksum,
            theirs.source_checksum,
            theirs.lineage,
        )


def test_the_last_part_reads_the_earlier_parts_outputs(tmp_path: Path) -> None:
    """Without the unlucky input, the sum over stored inputs of earlier parts equals the whole's."""
    reg = FunctionRegistry()
    reg.add(scale_v1, "scale", "1")
    reg.add(lambda x: x * 3, "scale", "2")
    reg.add(lambda acc, x: acc + x, "total", "1", kind=StepKind.REDUCE, initial=lambda: 0)
    plan = _plan(tmp_path, reg)
    [whole] = split_units(plan, subject="s", cause=WHY)
    parts = split_units(plan, subject="s", cause=WHY, max_bytes=len(whole.encode()) // 4)
    assert len(parts) >= 4
    with ResultCache(tmp_path / "a") as a, ResultCache(tmp_path / "b") as b:
        one = Executor(reg, _sources(), cache=a, sleep=_no_sleep).run_plan(whole.plan())
        many = _run_parts(parts, Executor(reg, _sources(), cache=b, sleep=_no_sleep), b)
    assert not one.dead and not any(r.dead for r in many)
    [whole_sum] = [r for r in one.recomputed if r.task.data_id == "sum"]
    [part_sum] = [r for r in many[-1].recomputed if r.task.data_id == "sum"]
    assert whole_sum.value == part_sum.value == str(sum(i * 3 for i in range(N))).encode()
    mine, theirs = ProvenanceHeader.decode(part_sum.header), ProvenanceHeader.decode(whole_sum.header)
    assert (mine.checksum, mine.source_checksum, mine.lineage) == (
        theirs.checksum,
        theirs.source_checksum,
        theirs.lineage,
    )


@pytest.mark.parametrize("marked", [True, False])
def test_a_dead_earlier_part_task_is_known_only_once_marked(tmp_path: Path, marked: bool) -> None:
    """The mark is what stops the sum: unmarked, it would fold the unlucky input's old version."""
    reg = _registry()
    plan = _plan(tmp_path, reg)
    [whole] = split_units(plan, subject="s", cause=WHY)
    parts = split_units(plan, subject="s", cause=WHY, max_bytes=len(whole.encode()) // 4)
    with ResultCache(tmp_path / "c") as cache:
        for i in range(N):  # the original outputs, as the output index stores them
            cache.put_value(_ref(f"s{i:03d}", i * 2), str(i * 2).encode())
        ex = Executor(reg, _sources(), cache=cache, sleep=_no_sleep)
        for unit in parts[:-1]:
            result = ex.run_plan(unit.plan())
            if marked:
                cache.mark_dead(d.task.task_id for d in result.dead)
        last = ex.run_plan(parts[-1].plan())
    sums = [r for r in last.recomputed if r.task.data_id == "sum"]
    if marked:
        assert sums == [] and [d.task.data_id for d in last.dead] == ["sum"]
    else:
        assert [r.value for r in sums] == [str(sum(i * 3 for i in range(N)) - 13).encode()]
