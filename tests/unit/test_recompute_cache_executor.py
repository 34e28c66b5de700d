"""Result cache (keys, early cut-off, invalidate/force) and the task executor (headers, retries, DLQ)."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
from ledger_support import LEDGER, build

from recompute_manager.cache import CacheKey, ResultCache, input_hash, node_leaves, unchanged
from recompute_manager.executor import (
    SUPERSEDES_HEADER,
    DeadLetter,
    Executor,
    Recomputed,
    RetryPolicy,
)
from recompute_manager.planner import Coordinates, plan_for_change, plan_for_changes, plan_from_applications
from recompute_manager.policy import Cause
from streamprov.agents.dead_letter import REASON_HEADER
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.errors import HeaderError
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import Application, ApplicationKind, Applied, DataRef, LedgerIndex
from streamprov.lineage import InputDigest, Step, StepKind
from streamprov.merkle import length_prefixed, root_of
from streamprov.registry import FunctionRegistry
from streamprov.stamp import ReduceState


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
        # Run again once its results are current (a plain cache: its supersedes are visible at
        # once): the first output is its own current version, so nothing after it changed. The
        # service's cache shows supersedes only once their transaction committed, so a redelivered
        # unit is run in full (test_recompute_kill.py).
        again = ex.run_plan(plan)
        assert all(r.cached for r in again.recomputed) and values(again) == [b"10"]
        assert again.changed == [] and [t.steps[0].function_id for t in again.skipped] == ["inc"]


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


def test_a_function_not_registered_dead_letters_at_once(tmp_path: Path) -> None:
    """Permanent: no retry registers it (before, every task waited out every backoff)."""
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5))
        slept: list[float] = []
        result = Executor(FunctionRegistry(), {"s": b"5"}, retry=RetryPolicy(3), sleep=slept.append).run_plan(
            plan
        )
    assert result.dead and result.dead[0].attempts == 1 and "FunctionNotFoundError" in result.dead[0].error
    assert slept == []


def _header_fields(raw: bytes) -> tuple[object, ...]:
    h = ProvenanceHeader.decode(raw)
    return h.data_id, h.checksum, h.source_checksum, h.lineage


def _replay_all(idx: LedgerIndex, reg: FunctionRegistry, sources: dict[str, bytes]) -> dict[str, Recomputed]:
    """Every application from scratch (no cache, no cut-off): output DataID -> result."""
    every = [Applied(idx.entry_at(seq), 0) for seq in range(idx.size)]
    plan = plan_from_applications(idx, every, cause_id="full", cause=Cause("full", "all"), created_at_ms=1)
    ex, done = Executor(reg, sources), {}
    for task in plan.tasks:
        r = ex.run(task, done)
        assert isinstance(r, Recomputed)
        done[task.task_id] = r
    return {r.task.data_id: r for r in done.values()}


def test_reduce_reads_its_stored_inputs_in_one_batch_and_equals_a_replay_from_scratch(tmp_path: Path) -> None:
    reg = registry()
    xs = [ref(f"x{i}", i + 1) for i in range(4)]
    ds = [ref(f"d{i}", 2 * (i + 1)) for i in range(4)]
    apps = [Application.of_source(x, timestamp_ms=1) for x in xs]
    apps += [app(reg, "double", [x], d) for x, d in zip(xs, ds, strict=True)]
    apps.append(app(reg, "total", ds, ref("t", 20)))
    sources = {x.data_id: str(i + 1).encode() for i, x in enumerate(xs)}
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx, ResultCache(tmp_path / "cache") as cache:
        idx.catch_up(build(apps))
        original = _replay_all(idx, reg, sources)  # what the pipeline wrote: the OutputIndex's view
        headers = {d: original[d.data_id].header for d in ds}
        for d in ds:
            cache.put_value(d, str(int(original[d.data_id].value)).encode())
        reads: list[int] = []
        read = cache.latest_values
        cache.latest_values = lambda nodes: reads.append(len(nodes)) or read(nodes)  # type: ignore[method-assign,func-returns-value]

        sources["x3"] = b"50"  # an earlier plan corrected d3 (8 -> 100)
        first = Executor(reg, sources, cache=cache, headers=headers).run_plan(
            plan_for_change(idx, change("x3", 4, 50))
        )
        assert [r.value for r in first.changed] == [b"100", b"112"]
        assert reads == [3]  # d0, d1, d2: one batch
        sources["x0"] = b"10"
        second = Executor(reg, sources, cache=cache, headers=headers).run_plan(
            plan_for_change(idx, change("x0", 1, 10))
        )
        assert [r.value for r in second.changed] == [b"20", b"130"]  # 20 + 4 + 6 + 100 (d3 as corrected)
        assert reads == [3, 3]
        scratch = _replay_all(idx, reg, sources)
        for r in second.changed:
            assert r.value == scratch[r.task.data_id].value
            assert _header_fields(r.header) == _header_fields(scratch[r.task.data_id].header)

    with LedgerIndex(tmp_path / "idx", LEDGER) as idx, ResultCache(tmp_path / "empty") as empty:
        cache_less = Executor(reg, sources, cache=empty, retry=RetryPolicy(0)).run_plan(
            plan_for_change(idx, change("x0", 1, 10))
        )
    (dead,) = cache_less.dead
    assert dead.task.data_id == "t" and "not in the value store" in dead.error


def test_cache_batch_reads_and_the_input_hash_definition(tmp_path: Path) -> None:
    refs = [ref("x", 1), DataRef.of("ü", b"2", ChecksumAlgorithm.SHA256), DataRef.of("", b"")]
    for k in range(len(refs) + 1):  # the one-pass build equals its definition
        leaves = length_prefixed(*(r.leaf_data() for r in refs[:k]))
        assert input_hash(refs[:k]) == hashlib.sha256(leaves).digest()
    with ResultCache(tmp_path / "c") as cache:
        a, b, new_b = ref("a", 1), ref("b", 2), ref("b", 3)
        cache.put_value(a, b"1")
        cache.put_value(new_b, b"3")
        cache.supersede(b, new_b, b"hdr")
        assert cache.values([a, b, new_b]) == [b"1", None, b"3"]
        assert cache.latest_values([a, b, new_b]) == [(a, b"1"), (new_b, b"3"), (new_b, b"3")]
        assert cache.values([]) == [] and cache.latest_values([]) == []
        step = Step.create(StepKind.REDUCE, "total", "1", b"c", {})
        cache.put(step, [a, b], b"out", key=CacheKey.of(step, [a, b]))
        assert cache.get(step, [a, b]) == b"out" == cache.get(step, [], key=CacheKey.of(step, [a, b]))


def test_reduce_inputs_decode_like_the_header_decoder(tmp_path: Path) -> None:
    reg = registry()
    with ledger(tmp_path, reg) as idx:
        plan = plan_for_change(idx, change("s", 1, 5))
        ex = Executor(reg, {"s": b"5"})
        done = ex.run_plan(plan)
    raws = [r.header for r in done.recomputed]
    raws += [ProvenanceHeader.for_source("x", b"1").encode(), ProvenanceHeader.for_source("y", b"2").encode()]
    step = Step.create(StepKind.REDUCE, "total", "1", b"c", {}, InputDigest(3, b"r" * 32, 0, 9))
    raws.append(
        ProvenanceHeader(
            "t", compute(ChecksumAlgorithm.SHA256, b"9"), ref("s", 1).checksum, 7, (step,)
        ).encode()
    )
    for raw in raws + raws:  # the second time from the decoded lineages
        assert ex._decode(raw) == ProvenanceHeader.decode(raw)
    assert len(ex._lineages) == 4  # (), (double,), (double, inc), (total,)
    with pytest.raises(HeaderError):
        ex._decode(b"not a header")


# --- incremental reduce (a reduce with an inverse, recomputed from its previous output) ---------------

CALLS = {"fold": 0, "inverse": 0}


def counted_sum(acc: int, x: int) -> int:
    CALLS["fold"] += 1
    return acc + x


INVERSE_FAILS = {"on": False}


def counted_unsum(acc: int, x: int) -> int:
    CALLS["inverse"] += 1
    if INVERSE_FAILS["on"]:
        raise ValueError("cannot retract")
    return acc - x


def inverse_registry() -> FunctionRegistry:
    reg = registry()
    reg.add(counted_sum, "isum", "1", kind=StepKind.REDUCE, initial=lambda: 0, inverse=counted_unsum)
    return reg


_XS = [ref(f"x{i}", i + 1) for i in range(4)]
_DS = [ref(f"x{i}", 2 * (i + 1)) for i in range(4)]
_T = ref("t", 20)


def _isum_ledger(tmp_path: Path, reg: FunctionRegistry) -> LedgerIndex:
    """x0..x3 (1..4) -> double -> d0..d3 (2..8) -> isum -> t (20), windowed. As a pipeline records
    them: a map keeps its input's DataID (d_i is x_i's next node), so the reduce header's input
    digest is over the ledger's input nodes (`Application.check_input_digest`)."""
    apps = [Application.of_source(x, timestamp_ms=1) for x in _XS]
    apps += [app(reg, "double", [x], d) for x, d in zip(_XS, _DS, strict=True)]
    apps.append(app(reg, "isum", _DS, _T))
    idx = LedgerIndex(tmp_path / "idx", LEDGER)
    idx.catch_up(build(apps))
    return idx


def _sources() -> dict[str, bytes]:
    return {x.data_id: str(i + 1).encode() for i, x in enumerate(_XS)}


def _fill(
    cache: ResultCache, original: dict[str, Recomputed], missing: tuple[DataRef, ...] = ()
) -> dict[DataRef, bytes]:
    """What an OutputIndex fills: every output's value (value store, but `missing`'s) and original
    header."""
    for node in [*_DS, _T]:
        if node not in missing:
            cache.put_value(node, original[node.data_id].value)
    return {node: original[node.data_id].header for node in [*_DS, _T]}


def _no_ts(raw: bytes) -> bytes:
    """The header bytes with the timestamp zeroed (the only field two runs may stamp differently)."""
    h = ProvenanceHeader.decode(raw)
    return ProvenanceHeader(h.data_id, h.checksum, h.source_checksum, 0, h.lineage).encode()


Setup = Any  # (cache, original) -> headers to give the executor, the value store filled


def _run_both(
    tmp_path: Path,
    plans: list[list[ChangeEvent]],
    new_sources: list[dict[str, bytes]],
    setup: Setup = None,
    *,
    scratch_header: bool = True,
) -> tuple[dict[str, Recomputed], dict[str, Recomputed], dict[str, int]]:
    """Run the same plans (in order) once with the incremental reduce and once with the full fold,
    each on its own value store filled alike: ({data_id: result} of the last plan, incremental and
    full) and the fold/inverse calls of the incremental run's last plan. Both equal a replay from
    scratch too (its header only with `scratch_header`: a withheld input header changes it)."""
    reg = inverse_registry()
    runs: list[dict[str, Recomputed]] = []
    calls: dict[str, int] = {}
    with _isum_ledger(tmp_path, reg) as idx:
        original = _replay_all(idx, reg, _sources())  # what the pipeline wrote
        for incremental in (True, False):
            sources = _sources()
            with ResultCache(tmp_path / f"cache-{incremental}") as cache:
                headers = (setup or _fill)(cache, original)
                for events, changed in zip(plans, new_sources, strict=True):
                    sources.update(changed)
                    ex = Executor(reg, sources, cache=cache, headers=headers, incremental=incremental)
                    CALLS.update(fold=0, inverse=0)
                    result = ex.run_plan(plan_for_changes(idx, events))
                    assert not result.dead, result.dead
                if incremental:
                    calls = dict(CALLS)
                runs.append({r.task.data_id: r for r in result.recomputed})
        scratch = _replay_all(idx, reg, sources)  # from scratch on the final sources
    fast, full = runs
    assert fast.keys() == full.keys()
    for data_id, r in fast.items():
        assert r.value == full[data_id].value == scratch[data_id].value
        assert _no_ts(r.header) == _no_ts(full[data_id].header)
        assert _no_ts(r.header) == _no_ts(scratch[data_id].header) or not scratch_header
        assert [(_no_ts(h), i, o) for h, i, o in r.applied] == [
            (_no_ts(h), i, o) for h, i, o in full[data_id].applied
        ]
        assert (r.unchanged, r.cached) == (full[data_id].unchanged, full[data_id].cached)
    return fast, full, calls


def test_incremental_reduce_one_changed_input_equals_the_full_fold(tmp_path: Path) -> None:
    fast, _, calls = _run_both(tmp_path, [[change("x3", 4, 50)]], [{"x3": b"50"}])
    assert fast["t"].value == b"112"  # 2 + 4 + 6 + 100
    assert calls == {"fold": 1, "inverse": 1}  # 8 out, 100 in: the three unchanged inputs not folded
    step = ProvenanceHeader.decode(fast["t"].header).lineage[-1]
    assert step.inputs is not None and step.inputs.count == 4
    assert (step.inputs.window_start, step.inputs.window_end) == (0, 60_000)


def test_incremental_reduce_several_changed_inputs_equals_the_full_fold(tmp_path: Path) -> None:
    events = [change("x0", 1, 10), change("x2", 3, 7)]
    fast, _, calls = _run_both(tmp_path, [events], [{"x0": b"10", "x2": b"7"}])
    assert fast["t"].value == b"46"  # 20 + 4 + 14 + 8
    assert calls == {"fold": 2, "inverse": 2}


def test_incremental_reduce_with_a_superseded_stored_input_equals_the_full_fold(tmp_path: Path) -> None:
    """A first plan corrects d3 (8 -> 100); a second, planned apart, changes x0: the ledger still
    names d3's original as t's input (STORED), which the value store says was superseded."""
    plans = [[change("x3", 4, 50)], [change("x0", 1, 10)]]
    fast, _, calls = _run_both(tmp_path, plans, [{"x3": b"50"}, {"x0": b"10"}])
    assert fast["t"].value == b"130"  # 20 + 4 + 6 + 100
    assert calls == {"fold": 2, "inverse": 2}  # d0 and d3 replaced, from t's original value 20


def _header_with(raw: bytes, **changes: Any) -> bytes:
    """`raw` with its last (reduce) step changed: Step fields, or count/merkle_root/window_*."""
    h = ProvenanceHeader.decode(raw)
    last = h.lineage[-1]
    assert last.inputs is not None
    digest = {k: changes.pop(k) for k in list(changes) if k in InputDigest.__dataclass_fields__}
    inputs = dataclasses.replace(last.inputs, **digest)
    step = dataclasses.replace(last, inputs=inputs, **changes)
    return ProvenanceHeader(
        h.data_id, h.checksum, h.source_checksum, h.timestamp_ms, (*h.lineage[:-1], step)
    ).encode()


def _mutated_previous(**changes: Any) -> Setup:
    def setup(cache: ResultCache, original: dict[str, Recomputed]) -> dict[DataRef, bytes]:
        headers = _fill(cache, original)
        return {**headers, _T: _header_with(headers[_T], **changes)}

    return setup


def _without(node: DataRef, *, header: bool = False, value: bool = False, wrong: bytes = b"") -> Setup:
    """`node`'s header left out, its value not stored, or a wrong value stored under it."""

    def setup(cache: ResultCache, original: dict[str, Recomputed]) -> dict[DataRef, bytes]:
        headers = _fill(cache, original, (node,) if value else ())
        if wrong:
            cache.put_value(node, wrong)
        return {k: v for k, v in headers.items() if not (header and k == node)}

    return setup


def _forced(cache: ResultCache, original: dict[str, Recomputed]) -> dict[DataRef, bytes]:
    cache.force("isum", "1")
    return _fill(cache, original)


FALLBACKS: dict[str, Setup] = {
    "forced": _forced,
    "previous header missing": _without(_T, header=True),
    "previous value missing": _without(_T, value=True),
    "previous value wrong": _without(_T, wrong=b"21"),
    "stored input without header": _without(_DS[0], header=True),
    "old value missing": _without(_DS[3], value=True),
    "old value wrong": _without(_DS[3], wrong=b"9"),
    "code hash": _mutated_previous(code_hash=b"c" * 16),
    "version": _mutated_previous(function_version="0"),
    "parameters": _mutated_previous(parameters=(("k", "1"),)),
    "count": _mutated_previous(count=5),
    "merkle root": _mutated_previous(merkle_root=b"r" * 32),
    "window": _mutated_previous(window_end=1),
    "not a reduce": _mutated_previous(kind=StepKind.MAP),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_incremental_reduce_falls_back_to_the_full_fold(tmp_path: Path, case: str) -> None:
    withheld = case == "stored input without header"  # both folds count it as an original record
    fast, _, calls = _run_both(
        tmp_path, [[change("x3", 4, 50)]], [{"x3": b"50"}], FALLBACKS[case], scratch_header=not withheld
    )
    assert fast["t"].value == b"112"
    assert calls == {"fold": 4, "inverse": 0}


def test_incremental_reduce_falls_back_when_the_inverse_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user's inverse failing is no reason to dead-letter: the full fold does not need it."""
    monkeypatch.setitem(INVERSE_FAILS, "on", True)
    fast, _, calls = _run_both(tmp_path, [[change("x3", 4, 50)]], [{"x3": b"50"}])
    assert fast["t"].value == b"112"
    assert calls == {"fold": 4, "inverse": 1}  # tried once, then every input folded


def test_incremental_reduce_falls_back_for_a_superseded_input_whose_new_value_is_missing(
    tmp_path: Path,
) -> None:
    """The second plan reads d3's superseding version (the first plan's output) from the value store."""

    def setup(cache: ResultCache, original: dict[str, Recomputed]) -> dict[DataRef, bytes]:
        headers = _fill(cache, original)
        stale = ResultCache.put_value

        def put_value(self: ResultCache, node: DataRef, value: bytes) -> None:  # d3's new version: lost
            if node.data_id != "x3":
                stale(self, node, value)

        cache.put_value = put_value.__get__(cache)  # type: ignore[method-assign]
        return headers

    plans = [[change("x3", 4, 50)], [change("x0", 1, 10)]]
    with pytest.raises(AssertionError, match="not in the value store"):  # the full fold dead-letters
        _run_both(tmp_path, plans, [{"x3": b"50"}, {"x0": b"10"}], setup)


def test_incremental_reduce_falls_back_for_source_inputs_and_without_an_inverse(tmp_path: Path) -> None:
    reg = inverse_registry()
    apps = [
        Application.of_source(ref("a", 1), timestamp_ms=1),
        Application.of_source(ref("b", 2), timestamp_ms=1),
        app(reg, "isum", [ref("a", 1), ref("b", 2)], ref("ab", 3)),  # SOURCE inputs only
        app(reg, "total", [ref("a", 1), ref("b", 2)], ref("ab2", 3)),  # no inverse
    ]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx, ResultCache(tmp_path / "c") as cache:
        idx.catch_up(build(apps))
        original = _replay_all(idx, reg, {"a": b"1", "b": b"2"})
        headers = {n: original[n.data_id].header for n in (ref("ab", 3), ref("ab2", 3))}
        for n in headers:
            cache.put_value(n, original[n.data_id].value)
        CALLS.update(fold=0, inverse=0)
        result = Executor(reg, {"a": b"10", "b": b"2"}, cache=cache, headers=headers).run_plan(
            plan_for_change(idx, change("a", 1, 10))
        )
    assert {r.task.data_id: r.value for r in result.changed} == {"ab": b"12", "ab2": b"12"}
    assert CALLS == {"fold": 2, "inverse": 0}


def test_incremental_header_digest_equals_the_reduce_state_of_the_decoded_headers() -> None:
    """`Executor._provenance` (encoded headers read in place) against `ReduceState.add` over the
    decoded headers: count, both Merkle roots and the shared lineage, for mixed lineages, both
    checksum algorithms, long and non-ASCII DataIDs, and headers given decoded."""
    a = Step.create(StepKind.MAP, "a", "1", b"c" * 16, {})
    b = Step.create(StepKind.MAP, "b", "1", b"d" * 16, {"k": 2})
    sha = ChecksumAlgorithm.SHA256
    raws: list[bytes | ProvenanceHeader] = [
        ProvenanceHeader("x", compute(sha, b"1"), compute(sha, b"0"), 5, (a, b)),
        ProvenanceHeader(
            "ü" * 40, compute(ChecksumAlgorithm.CRC32C, b"2"), compute(sha, b"0"), 6, (a, b)
        ).encode(),
        ProvenanceHeader(
            "y", compute(ChecksumAlgorithm.CRC32C, b"3"), compute(sha, b"1"), 7, (a, b)
        ).encode(),
        ProvenanceHeader(
            "z" * 70, compute(sha, b"4"), compute(ChecksumAlgorithm.CRC32C, b"4"), 8, (a,)
        ).encode(),
        ProvenanceHeader.for_source("s", b"5").encode(),
    ]
    ex = Executor(registry(), {})
    for k in range(1, len(raws) + 1):
        for order in (raws[:k], raws[:k][::-1]):
            state = ReduceState(0)
            for raw in order:
                decoded = raw if isinstance(raw, ProvenanceHeader) else ProvenanceHeader.decode(raw)
                state.add(registry().get("total"), {}, decoded, 1)
            headers = [
                raw if isinstance(raw, ProvenanceHeader) else ProvenanceHeader.decode(raw) for raw in order
            ]
            leaves = node_leaves([DataRef(h.data_id, h.checksum) for h in headers])
            found = ex._provenance(list(order), leaves)
            assert found is not None
            sources_root, upstream = found
            assert (len(leaves), root_of(leaves), sources_root) == (
                state.count,
                state.inputs.root(),
                state.sources.root(),
            )
            assert upstream == state.upstream
            # a header that does not describe its input node: not digested from the nodes
            other = node_leaves([DataRef(headers[-1].data_id, compute(sha, b"other"))])
            assert ex._provenance(list(order), [*leaves[:-1], *other]) is None


def test_a_task_reading_a_cut_off_branch_and_a_changed_one_gets_both(tmp_path: Path) -> None:
    """`ad` is skipped (its only input, `sign`'s output, did not change), `bd` changed: the sum over
    both ran without `ad`'s output and was dead-lettered ("task ... has not run") after its retries.
    The skipped task runs when a task that runs needs it; one nobody needs stays skipped."""
    reg = registry()
    apps = [
        Application.of_source(ref("a", 1), timestamp_ms=1),
        app(reg, "sign", [ref("a", 1)], ref("as", 1)),
        app(reg, "double", [ref("as", 1)], ref("ad", 2)),
        app(reg, "inc", [ref("as", 1)], ref("ai", 2)),  # skipped too, and nobody reads it
        Application.of_source(ref("b", 2), timestamp_ms=1),
        app(reg, "double", [ref("b", 2)], ref("bd", 4)),
        app(reg, "total", [ref("ad", 2), ref("bd", 4)], ref("r", 6)),
    ]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(apps))
        plan = plan_for_changes(idx, [change("a", 1, 5), change("b", 2, 3)])
    slept: list[float] = []
    result = Executor(reg, {"a": b"5", "b": b"3"}, sleep=slept.append).run_plan(plan)
    assert result.dead == [] and slept == []
    done = {r.task.data_id: (r.value, r.unchanged) for r in result.recomputed}
    assert done == {"as": (b"1", True), "ad": (b"2", True), "bd": (b"6", False), "r": (b"8", False)}
    assert [t.data_id for t in result.skipped] == ["ai"]
    total = next(r for r in result.recomputed if r.task.data_id == "r")
    step = ProvenanceHeader.decode(total.header).lineage[-1]
    assert step.inputs is not None and step.inputs.count == 2
