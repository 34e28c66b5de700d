"""Result cache (keys, early cut-off, invalidate/force) and the task executor (headers, retries, DLQ)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ledger_support import LEDGER, build

from recompute_manager.cache import CacheKey, ResultCache, unchanged
from recompute_manager.executor import (
    SUPERSEDES_HEADER,
    DeadLetter,
    Executor,
    Recomputed,
    RetryPolicy,
)
from recompute_manager.planner import Coordinates, plan_for_change, plan_from_applications
from streamprov.agents.dead_letter import REASON_HEADER
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import Application, ApplicationKind, DataRef, LedgerIndex
from streamprov.lineage import Step, StepKind
from streamprov.registry import FunctionRegistry


def registry() -> FunctionRegistry:
    reg = FunctionRegistry()
    reg.add(lambda x: x * 2, "double", "1")
    reg.add(lambda x: x + 1, "inc", "1")
    reg.add(lambda x: 1 if x > 0 else 0, "sign", "1")
    reg.add(lambda acc, x: acc + x, "total", "1", kind=StepKind.REDUCE, initial=lambda: 0)
    return reg


def ref(data_id: str, value: int) -> DataRef:
    return DataRef.of(data_id, str(value).encode())


def app(reg: FunctionRegistry, fid: str, inputs: list[DataRef], out: DataRef) -> Application:
    fn = reg.get(fid)
    kind = ApplicationKind.REDUCE if fn.kind is StepKind.REDUCE else ApplicationKind.MAP
    more: dict[str, Any] = {"window_start": 0, "window_end": 60_000} if kind is ApplicationKind.REDUCE else {}
    return Application.create(kind, fid, "1", fn.code_hash, {}, inputs, out, timestamp_ms=1, **more)


def change(data_id: str, old: int, new: int) -> ChangeEvent:
    sc = SourceChange("src", 0, 1, data_id, ref(data_id, old).checksum, ref(data_id, new).checksum)
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, sc, EMPTY_IMPACT, 1)


def ledger(tmp_path: Path, reg: FunctionRegistry) -> LedgerIndex:
    apps = [
        Application.of_source(ref("s", 1), timestamp_ms=1),
        app(reg, "double", [ref("s", 1)], ref("s", 2)),
        app(reg, "inc", [ref("s", 2)], ref("s", 3)),
        Application.of_source(ref("p", 1), timestamp_ms=1),
        app(reg, "sign", [ref("p", 1)], ref("p", 1)),
        app(reg, "double", [ref("p", 1)], ref("q", 2)),  # a second branch, keyed q
        Application.of_source(ref("a", 1), timestamp_ms=1),
        Application.of_source(ref("b", 2), timestamp_ms=1),
        app(reg, "total", [ref("a", 1), ref("b", 2)], ref("ab", 3)),
    ]
    idx = LedgerIndex(tmp_path / "idx", LEDGER)
    idx.catch_up(build(apps))
    return idx


def test_cache_keys_cutoff_invalidate_force(tmp_path: Path) -> None:
    step = Step.create(StepKind.MAP, "f", "1", b"c", {"k": 1})
    other = Step.create(StepKind.MAP, "f", "2", b"c", {"k": 1})
    ins = [ref("x", 1)]
    assert CacheKey.of(step, ins) != CacheKey.of(Step.create(StepKind.MAP, "f", "1", b"c", {"k": 2}), ins)
    assert CacheKey.of(step, ins) != CacheKey.of(step, [ref("x", 2)])
    # length-prefixed: ("ab", "c") and ("a", "bc") differ
    assert CacheKey.of(Step.create(StepKind.MAP, "ab", "c", b"", {}), ins) != CacheKey.of(
        Step.create(StepKind.MAP, "a", "bc", b"", {}), ins
    )
    with ResultCache(tmp_path / "c") as cache:
        assert cache.get(step, ins) is None
        cache.put(step, ins, b"out")
        cache.put(other, ins, b"out2")
        assert cache.get(step, ins) == b"out" and cache.hits == 1
        assert cache.get(step, ins, force=True) is None
        assert cache.invalidate("f", "1") == 1
        assert cache.get(step, ins) is None and cache.get(other, ins) == b"out2"
        cache.put(step, ins, b"out")
        cache.force("f")
        assert cache.get(step, ins) is None and cache.get(other, ins) is None
        cache.unforce("f")
        cache.put(step, ins, b"again")
        assert cache.get(step, ins) == b"again"
        cache.put_value(ref("x", 1), b"1")
        assert cache.value(ref("x", 1)) == b"1" and cache.value(ref("x", 9)) is None
    assert unchanged(compute(ChecksumAlgorithm.CRC32C, b"v"), b"v")
    assert not unchanged(compute(ChecksumAlgorithm.SHA256, b"v"), b"w")


def test_replay_chain_headers_and_cache(tmp_path: Path) -> None:
    reg = registry()
    with ledger(tmp_path, reg) as idx, ResultCache(tmp_path / "c") as cache:
        plan = plan_for_change(idx, change("s", 1, 5), topic="out")
        ex = Executor(reg, {"s": b"5"}, cache=cache)
        result = ex.run_plan(plan)
        assert [r.value for r in result.changed] == [b"10", b"11"]
        last = result.changed[-1]
        header = ProvenanceHeader.decode(last.header)
        assert header.data_id == "s" and header.checksum == compute(ChecksumAlgorithm.CRC32C, b"11")
        assert header.source_checksum == compute(ChecksumAlgorithm.CRC32C, b"5")
        assert [s.function_id for s in header.lineage] == ["double", "inc"]
        assert last.headers()[0] == (HEADER_KEY, last.header)
        again = ex.run_plan(plan)
        assert all(r.cached for r in again.recomputed) and values(again) == values(result)


def values(result: Any) -> list[bytes]:
    return [r.value for r in result.recomputed]


def test_early_cutoff_of_a_chain(tmp_path: Path) -> None:
    reg = registry()
    apps = [
        Application.of_source(ref("z", 1), timestamp_ms=1),
        app(reg, "sign", [ref("z", 1)], ref("z", 1)),
    ]
    # make sign's output a distinct node (other DataID) so the chain continues from it
    apps[1] = app(reg, "sign", [ref("z", 1)], ref("zs", 1))
    apps.append(app(reg, "double", [ref("zs", 1)], ref("zs", 2)))
    with LedgerIndex(tmp_path / "i2", LEDGER) as idx:
        idx.catch_up(build(apps))
        plan = plan_for_change(idx, change("z", 1, 9))
        result = Executor(reg, {"z": b"9"}).run_plan(plan)
    assert [t.steps[0].function_id for t in result.skipped] == ["double"]
    assert result.changed == []


def test_reduce_replay(tmp_path: Path) -> None:
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("a", 1, 10))
        (r,) = Executor(reg, {"a": b"10", "b": b"2"}).run_plan(plan).changed
    assert r.value == b"12" and r.task.data_id == "ab"
    header = ProvenanceHeader.decode(r.header)
    step = header.lineage[-1]
    assert step.kind is StepKind.REDUCE and step.inputs is not None and step.inputs.count == 2
    assert (step.inputs.window_start, step.inputs.window_end) == (0, 60_000)


def test_retries_with_backoff_then_dead_letter(tmp_path: Path) -> None:
    reg = FunctionRegistry()
    calls: list[int] = []

    def flaky(x: int) -> int:
        calls.append(x)
        if len(calls) < 3:
            raise RuntimeError("transient")
        return x

    reg.add(flaky, "flaky", "1")
    reg.add(lambda x: 1 // 0, "broken", "1")
    apps = [
        Application.of_source(ref("s", 1), timestamp_ms=1),
        Application.create(
            ApplicationKind.MAP,
            "flaky",
            "1",
            reg.get("flaky").code_hash,
            {},
            [ref("s", 1)],
            ref("s", 1),
            timestamp_ms=1,
        ),
        Application.create(
            ApplicationKind.MAP,
            "broken",
            "1",
            reg.get("broken").code_hash,
            {},
            [ref("s", 1)],
            ref("t", 0),
            timestamp_ms=1,
        ),
    ]
    slept: list[float] = []
    with LedgerIndex(tmp_path / "i", LEDGER) as idx:
        idx.catch_up(build(apps))
        down = idx.downstream(ref("s", 1))
        plan = plan_from_applications(
            idx,
            down.applications,
            cause_id="c",
            cause=plan_for_change(idx, change("s", 1, 4)).cause,
            supersedes={ref("t", 0): Coordinates("out", 1, 2)},
        )
        ex = Executor(reg, {"s": b"4"}, retry=RetryPolicy(3, 0.1, 0.25), sleep=slept.append)
        result = ex.run_plan(plan)
    ok = {r.task.steps[0].function_id: r for r in result.recomputed}
    assert isinstance(ok["flaky"], Recomputed) and ok["flaky"].attempts == 3
    (dead,) = result.dead
    assert isinstance(dead, DeadLetter) and dead.attempts == 4 and "ZeroDivisionError" in dead.error
    assert slept == [0.1, 0.2, 0.1, 0.2, 0.25]
    assert (REASON_HEADER, b"processing_error") in dead.headers()
    assert dead.task.supersedes == Coordinates("out", 1, 2)
    assert ok["flaky"].headers()[1][0] != SUPERSEDES_HEADER


def test_missing_source_dead_letters(tmp_path: Path) -> None:
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5))
        result = Executor(reg, {}, retry=RetryPolicy(0)).run_plan(plan)
    assert len(result.dead) == 2 and "missing" in result.dead[0].error
    assert "dead-lettered" in result.dead[1].error
