"""Plans that read a reduce over many inputs through the inputs that changed (delta tasks): the ledger
index keeps each consumed node's positions and a head of every application with many inputs, the
planner's traversal records the edges it came through, and a reduce task lists only its changed
inputs; the executor expands it from the ledger entry. No broker."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from ledger_support import CTX, LEDGER, build, map_app, node, reduce_app
from rocksdict import Options, Rdict

from recompute_manager.cache import ResultCache
from recompute_manager.executor import ExecutionError, Executor, PlanResult
from recompute_manager.planner import (
    InputOrigin,
    PlanError,
    RecomputePlan,
    RecomputeTask,
    plan_for_change,
    plan_for_changes,
)
from recompute_manager.summary import (
    InputParts,
    ReduceSummary,
    SummaryError,
    SummaryKeeper,
    with_inverse,
)
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.errors import StreamprovError
from streamprov.header import ProvenanceHeader
from streamprov.ledger import Application, DataRef, LedgerIndex, keys
from streamprov.ledger.index import HEAD_MIN_INPUTS
from streamprov.ledger.queries import downstream, downstream_edges
from streamprov.merkle import FlatTree, leaf_hash, root_of
from streamprov.registry import FunctionRegistry
from streamprov.stamp import ReduceState

FAN_IN = 20
assert FAN_IN >= HEAD_MIN_INPUTS


def _apps() -> list[Application]:
    """FAN_IN sources -> map `inc` -> one reduce `total` (with one input twice) -> map `publish`."""
    apps: list[Application] = []
    mids: list[DataRef] = []
    for i in range(FAN_IN):
        src = node(f"s{i}", str(i))
        apps.append(Application.of_source(src, timestamp_ms=1, device_id="src", context=CTX))
        mid = node(f"s{i}", str(i + 1))
        apps.append(map_app("inc", src, mid))
        mids.append(mid)
    total = node("t", str(sum(range(1, FAN_IN + 1)) + 1))
    apps.append(reduce_app("total", [*mids, mids[0]], total))  # s0 counted twice: positions 0 and 20
    apps.append(map_app("publish", total, node("t", "published")))
    return apps


@pytest.fixture
def index(tmp_path: Path) -> Iterator[LedgerIndex]:
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx:
        idx.catch_up(build(_apps()))
        yield idx


def _change(data_id: str, old: str, new: str) -> ChangeEvent:
    sc = SourceChange("src", 0, 1, data_id, node(data_id, old).checksum, node(data_id, new).checksum)
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, sc, EMPTY_IMPACT, 5)


def test_the_index_keeps_positions_and_a_head_of_a_reduce_over_many_inputs(index: LedgerIndex) -> None:
    [(eid, at)] = index.consumers_at(node("s0", "1"))
    assert at == (0, FAN_IN)  # the node at both of its positions
    head = index.head(eid)
    assert head is not None and head.input_count == FAN_IN + 1 and head.entry.application.inputs == ()
    full = index.entry(eid)
    assert dataclasses.replace(full.application, inputs=()) == head.entry.application
    assert (head.entry.seq, head.entry.entry_hash) == (full.seq, full.entry_hash)
    [(map_eid, map_at)] = index.consumers_at(node("s3", "3"))
    assert map_at == (0,) and index.head(map_eid) is None  # one input: read the entry itself


def test_the_edge_traversal_finds_what_downstream_finds_reading_only_the_changed_inputs(
    index: LedgerIndex,
) -> None:
    roots = [node("s3", "3"), node("s0", "0")]
    plain, edges = downstream(index, roots), downstream_edges(index, roots)
    assert [a.entry.entry_id for a in edges.applications] == [a.entry.entry_id for a in plain.applications]
    by_fn = {a.entry.application.function_id: a for a in edges.applications}
    total = by_fn["total"]
    assert total.input_count == FAN_IN + 1 and total.entry.application.inputs == ()
    assert total.reached == ((0, node("s0", "1")), (3, node("s3", "4")), (FAN_IN, node("s0", "1")))
    assert by_fn["publish"].input_count is None and by_fn["publish"].reached == (
        (0, total.entry.application.output),
    )


def _strip_positions(path: Path) -> None:
    """What an index made before positions and heads were kept looks like."""
    db = Rdict(str(path), Options(raw_mode=True))
    try:
        for k in list(db.keys(from_key=keys.CONSUMED)):
            if isinstance(k, bytes) and k.startswith(keys.CONSUMED):
                db.put(k, b"")
        for k in list(db.keys(from_key=keys.HEAD)):
            if isinstance(k, bytes) and k.startswith(keys.HEAD):
                db.delete(k)
    finally:
        db.close()


def test_an_index_without_positions_plans_the_same_tasks_listing_every_input(tmp_path: Path) -> None:
    path = tmp_path / "idx"
    with LedgerIndex(path, LEDGER) as idx:
        idx.catch_up(build(_apps()))
        delta = plan_for_change(idx, _change("s3", "3", "30"))
    _strip_positions(path)
    with LedgerIndex(path, LEDGER) as idx:
        assert {p for _, p in idx.consumers_at(node("s3", "4"))} == {None}
        whole = plan_for_change(idx, _change("s3", "3", "30"))
    assert [t.task_id for t in whole.tasks] == [t.task_id for t in delta.tasks]
    assert [len(t.inputs) for t in whole.tasks] == [1, FAN_IN + 1, 1]
    assert all(t.input_count is None for t in whole.tasks)
    assert [t.input_count for t in delta.tasks] == [None, FAN_IN + 1, None]


def test_a_reduce_task_lists_only_the_inputs_the_plan_changes(index: LedgerIndex) -> None:
    plan = plan_for_changes(index, [_change("s3", "3", "30"), _change("s0", "0", "10")])
    inc0, inc3, total, publish = plan.tasks  # dependency order, ties by ledger position
    assert total.input_count == FAN_IN + 1
    assert [(i.position, i.node, i.origin, i.from_task) for i in total.inputs] == [
        (0, node("s0", "1"), InputOrigin.TASK, inc0.task_id),
        (3, node("s3", "4"), InputOrigin.TASK, inc3.task_id),
        (FAN_IN, node("s0", "1"), InputOrigin.TASK, inc0.task_id),
    ]
    assert set(total.depends_on) == {inc0.task_id, inc3.task_id} and publish.input_count is None
    assert RecomputeTask.decode(total.encode()) == total


def _registry() -> FunctionRegistry:
    reg = FunctionRegistry()
    reg.map("inc", "1")(lambda v: v + 1)
    reg.reduce("total", "1", initial=int)(lambda acc, v: acc + v)
    reg.map("publish", "1")(lambda v: v)
    return reg


def _run(plan: RecomputePlan, path: Path, ledger: LedgerIndex | None) -> PlanResult:
    sources = {f"s{i}": str(30 if i == 3 else i).encode() for i in range(FAN_IN)}
    with ResultCache(path) as cache:
        for i in range(FAN_IN):
            cache.put_value(node(f"s{i}", str(i + 1)), str(i + 1).encode())
        return Executor(_registry(), sources, cache=cache, ledger=ledger, sleep=lambda _s: None).run_plan(
            plan
        )


def _fields(raw: bytes) -> tuple[object, ...]:
    h = ProvenanceHeader.decode(raw)
    return h.data_id, h.checksum, h.source_checksum, h.lineage


def test_the_executor_expands_a_delta_task_from_the_ledger_entry(index: LedgerIndex, tmp_path: Path) -> None:
    """The delta plan's results equal those of the same plan listing every input (values, and headers
    but their timestamps); without a ledger to read, the task is dead-lettered saying so."""
    plan = plan_for_change(index, _change("s3", "3", "30"))
    inc, total, publish = plan.tasks
    whole = Executor(_registry(), {}, ledger=index)._expand(total)
    assert whole.input_count is None and [i.position for i in whole.inputs] == [None] * (FAN_IN + 1)
    assert whole.inputs[3] == dataclasses.replace(total.inputs[0], position=None)
    assert {i.origin for i in whole.inputs[:3]} == {InputOrigin.STORED}
    assert [i.node for i in whole.inputs] == list(index.entry(total.entry_id).application.inputs)

    delta = _run(plan, tmp_path / "delta", index)
    listed = _run(dataclasses.replace(plan, tasks=(inc, whole, publish)), tmp_path / "listed", None)
    assert not delta.dead and [r.value for r in delta.recomputed] == [b"31", b"238", b"238"]
    assert [r.value for r in listed.recomputed] == [r.value for r in delta.recomputed]
    assert [_fields(r.header) for r in listed.recomputed] == [_fields(r.header) for r in delta.recomputed]

    none = _run(plan, tmp_path / "none", None)
    assert [d.task.task_id for d in none.dead] == [total.task_id, publish.task_id]
    assert "read from the ledger index, and this executor has none" in none.dead[0].error


def test_a_delta_task_that_does_not_fit_its_entry_or_is_malformed_is_refused(index: LedgerIndex) -> None:
    plan = plan_for_change(index, _change("s3", "3", "30"))
    total = plan.tasks[1]
    ex = Executor(_registry(), {}, ledger=index)
    with pytest.raises(ExecutionError, match="names 7 inputs"):
        ex._expand(dataclasses.replace(total, input_count=7))
    moved = dataclasses.replace(total, inputs=(dataclasses.replace(total.inputs[0], position=4),))
    with pytest.raises(ExecutionError, match="input 4 is"):
        ex._expand(moved)
    for bad in (
        dataclasses.replace(total, input_count=2),  # position 3 out of range
        dataclasses.replace(total, inputs=(*total.inputs, total.inputs[0])),  # twice
        dataclasses.replace(total, input_count=None),  # a position without a count
    ):
        with pytest.raises(PlanError):
            RecomputeTask.decode(bad.encode())


def _inverse_registry() -> FunctionRegistry:
    reg = FunctionRegistry()
    reg.map("inc", "1")(lambda v: v + 1)
    reg.reduce("total", "1", initial=int, inverse=lambda acc, v: acc - v)(lambda acc, v: acc + v)
    reg.map("publish", "1")(lambda v: [v])  # not the identity: its output is another node than the sum's
    return reg


class _NoExpand(Executor):
    def _expand(self, task: RecomputeTask) -> RecomputeTask:
        raise AssertionError(f"task {task.task_id[:8]} was expanded: the delta path was not taken")


def test_a_delta_runs_against_the_summary_the_last_recompute_kept(index: LedgerIndex, tmp_path: Path) -> None:
    """Plan A (s3 changed) folds the reduce whole: no summary of the pipeline's output exists yet,
    and it keeps one of its result. Plan B (s5 changed), planned from the same ledger, starts from
    A's result (the latest version of the output it names) and reads only s5 and A's summary. Its
    output equals a full fold of both changes (value, and header but its timestamp: input digest,
    sources root and lineage), and publish after it too."""
    sources = {f"s{i}": str(i).encode() for i in range(FAN_IN)}
    reg = _inverse_registry()
    with ResultCache(tmp_path / "cache") as cache:
        for i in range(FAN_IN):
            cache.put_value(node(f"s{i}", str(i + 1)), str(i + 1).encode())
        sources["s3"] = b"30"
        first = Executor(reg, sources, cache=cache, ledger=index).run_plan(
            plan_for_change(index, _change("s3", "3", "30"))
        )
        assert not first.dead
        sources["s5"] = b"50"
        plan_b = plan_for_change(index, _change("s5", "5", "50"))
        assert plan_b.tasks[1].input_count == FAN_IN + 1 and len(plan_b.tasks[1].inputs) == 1
        second = _NoExpand(reg, sources, cache=cache, ledger=index).run_plan(plan_b)
    assert not second.dead
    both = plan_for_changes(index, [_change("s3", "3", "30"), _change("s5", "5", "50")])
    expanded = Executor(reg, {}, ledger=index)
    whole = dataclasses.replace(
        both, tasks=tuple(expanded._expand(t) if t.is_delta else t for t in both.tasks)
    )
    with ResultCache(tmp_path / "fresh") as fresh:
        for i in range(FAN_IN):
            fresh.put_value(node(f"s{i}", str(i + 1)), str(i + 1).encode())
        full = Executor(reg, sources, cache=fresh, incremental=False).run_plan(whole)  # every input folded
    mine = {r.task.steps[0].function_id + r.task.data_id: r for r in second.recomputed}
    theirs = {r.task.steps[0].function_id + r.task.data_id: r for r in full.recomputed}
    expected = sum(range(1, FAN_IN + 1)) + 1 - 4 - 6 + 31 + 51
    assert mine["totalt"].value == theirs["totalt"].value == str(expected).encode()
    assert _fields(mine["totalt"].header) == _fields(theirs["totalt"].header)
    assert mine["publisht"].value == theirs["publisht"].value == f"[{expected}]".encode()
    assert _fields(mine["publisht"].header) == _fields(theirs["publisht"].header)
    read = list(mine["totalt"].applied[0][1])  # what its ledger entry lists: every input, as folded
    assert read == list(theirs["totalt"].applied[0][1])
    assert read[5] == theirs["incs5"].node and read[3] == theirs["incs3"].node


def test_a_delta_without_a_summary_runs_whole_and_keeps_one_when_a_delta_could_use_it(
    index: LedgerIndex, tmp_path: Path
) -> None:
    """The pipeline's own output has no summary (nothing recomputed it yet): the task is expanded
    from the ledger entry; the result keeps a summary for the next delta when the reduce has an
    inverse (only then does a delta run), and none when it has not."""
    plan = plan_for_change(index, _change("s3", "3", "30"))
    for registry, kept in ((_inverse_registry(), True), (_registry(), False)):
        path = tmp_path / str(kept)
        sources = {f"s{i}": str(30 if i == 3 else i).encode() for i in range(FAN_IN)}
        with ResultCache(path) as cache:
            for i in range(FAN_IN):
                cache.put_value(node(f"s{i}", str(i + 1)), str(i + 1).encode())
            ex = Executor(registry, sources, cache=cache, ledger=index, sleep=lambda _s: None)
            result = ex.run_plan(plan)
            assert not result.dead and (ex.deltas, ex.expanded) == (0, 1)
            assert [r.value for r in result.recomputed][:2] == [b"31", b"238"]
            digest = ProvenanceHeader.decode(result.recomputed[1].header).lineage[-1].inputs
            assert digest is not None and (cache.summary(digest.merkle_root) is not None) is kept


def _parts(i: int, lineage: bytes = b"L") -> InputParts:
    return InputParts(bytes([i]) * 32, bytes([100 + i]) * 32, lineage)


def test_a_summary_round_trips_and_replaces_inputs_of_another_length() -> None:
    nodes = [node(f"s{i}", str(i)) for i in range(5)]
    summary = ReduceSummary.of(nodes, [_parts(i, b"A" if i % 2 else b"B") for i in range(5)])
    assert ReduceSummary.decode(summary.encode()) == summary
    assert list(summary.input_nodes()) == nodes and summary.lineages == (b"B", b"A")
    longer = node("a-much-longer-data-id", "x")
    after = summary.replaced({1: (longer, _parts(9, b"C")), 3: (node("s3", "y"), _parts(8, b"C"))})
    assert list(after.input_nodes()) == [nodes[0], longer, nodes[2], node("s3", "y"), nodes[4]]
    assert after.parts(1) == _parts(9, b"C") and after.parts(4) == summary.parts(4)
    assert after.lineages_present() == [b"B", b"C"]  # every input with lineage A was replaced
    assert ReduceSummary.decode(after.encode()) == after
    raw = summary.encode()
    for bad in (raw[:10], b"\x07" + raw[1:], raw[: len(raw) - len(summary.nodes) - 1]):
        with pytest.raises(SummaryError):
            ReduceSummary.decode(bad)


@pytest.mark.parametrize("width", [1, 2, 3, 5, 16, 21, 100])
def test_a_flat_tree_updated_along_the_changed_paths_is_the_tree_of_the_new_leaves(width: int) -> None:
    rng = random.Random(width)
    leaves = [rng.randbytes(12) for _ in range(width)]
    tree = FlatTree.of([leaf_hash(x) for x in leaves])
    assert tree.root == root_of(leaves) and FlatTree(tree.raw, width) == tree
    for _ in range(5):
        new = list(leaves)
        for i in rng.sample(range(width), rng.randint(1, width)):
            new[i] = rng.randbytes(7)
        changed = tree.replaced({i: leaf_hash(x) for i, x in enumerate(new) if x != leaves[i]})
        assert changed == FlatTree.of([leaf_hash(x) for x in new]) and changed.root == root_of(new)
    assert tree.consistent(range(width))
    if width > 1:  # a corrupt sibling on leaf 0's path is seen from leaf 0, not from a leaf it is not on
        corrupt = FlatTree(tree.raw[:32] + bytes(32) + tree.raw[64:], width)
        assert not corrupt.consistent([0]) and corrupt.consistent([width - 1]) is (width > 2)
    with pytest.raises(StreamprovError):
        FlatTree(tree.raw[:-1], width)
    with pytest.raises(StreamprovError):
        tree.replaced({width: leaf_hash(b"x")})


def _pipeline_headers(index: LedgerIndex, reg: FunctionRegistry) -> tuple[DataRef, dict[DataRef, bytes]]:
    """The reduce output node and the headers the pipeline stamped on it and its inputs (counted as
    original records), as the views index them from the output topics."""
    [(eid, _)] = index.consumers_at(node("s0", "1"))
    app = index.entry(eid).application
    fn = reg.get("total", "1")
    state = ReduceState(0)
    headers: dict[DataRef, bytes] = {}
    for mid in app.inputs:
        value = int(mid.data_id[1:]) + 1
        h = ProvenanceHeader.for_source(mid.data_id, str(value).encode())
        headers[mid] = h.encode()
        state.add(fn, {}, h, value)
    out = app.output
    value = str(state.accumulator).encode()
    headers[out] = state.header(fn.step({}), out.data_id, value, out.checksum.algorithm, (0, 60_000)).encode()
    return out, headers


def test_the_views_keep_a_summary_of_each_pipeline_reduce_output(index: LedgerIndex, tmp_path: Path) -> None:
    """`SummaryKeeper`: a reduce output's summary is built from its ledger entry and its inputs'
    headers once they are all indexed; one that never can be is given up after MAX_TRIES."""
    out, headers = _pipeline_headers(index, _inverse_registry())
    header = ProvenanceHeader.decode(headers[out])
    digest = header.lineage[-1].inputs
    assert digest is not None
    with ResultCache(tmp_path / "c") as cache:
        keeper = SummaryKeeper(cache)
        keeper.note(out, header)
        partial = {k: v for k, v in headers.items() if k != node("s7", "8")}
        assert keeper.keep(index, partial) == 0 and keeper.pending == 1  # s7's header is not indexed yet
        assert keeper.keep(index, headers) == 1 and keeper.pending == 0
        kept = cache.summary(digest.merkle_root)
        assert kept is not None and ReduceSummary.decode(kept).inputs_tree.root == digest.merkle_root
        keeper.note(out, header)
        assert keeper.keep(index, headers) == 0 and keeper.pending == 0  # kept already
        elsewhere = dataclasses.replace(digest, merkle_root=b"\x01" * 32)
        last = dataclasses.replace(header.lineage[-1], inputs=elsewhere)
        keeper.note(node("gone", "x"), dataclasses.replace(header, lineage=(*header.lineage[:-1], last)))
        for _ in range(SummaryKeeper.MAX_TRIES):
            keeper.keep(index, headers)
        assert keeper.pending == 0 and keeper.given_up == 1  # no ledger entry ever came: bounded


def test_the_views_summarise_only_reduces_a_delta_can_serve_and_never_block_planning(
    index: LedgerIndex, tmp_path: Path
) -> None:
    out, headers = _pipeline_headers(index, _inverse_registry())
    header = ProvenanceHeader.decode(headers[out])
    with ResultCache(tmp_path / "c") as cache:
        keeper = SummaryKeeper(cache, with_inverse(_registry()))  # `total` without its inverse
        keeper.note(out, header)
        assert keeper.pending == 0
        keeper = SummaryKeeper(cache, with_inverse(_inverse_registry()))
        keeper.note(out, header)
        assert keeper.pending == 1
        assert keeper.keep(index, headers, max_seconds=0.0) == 0 and keeper.pending == 1  # next turn
        assert keeper.keep(index, headers) == 1 and keeper.pending == 0


def test_the_first_recompute_of_a_pipeline_reduce_is_a_delta(index: LedgerIndex, tmp_path: Path) -> None:
    """With the summary the views keep, a reduce task listing one changed input never reads the
    others: its output equals the full fold's (value, header but its timestamp, ledger inputs)."""
    reg = _inverse_registry()
    out, headers = _pipeline_headers(index, reg)
    sources = {f"s{i}": str(30 if i == 3 else i).encode() for i in range(FAN_IN)}
    plan = plan_for_change(index, _change("s3", "3", "30"))
    runs = []
    for name, executor in (("delta", _NoExpand), ("full", Executor)):
        with ResultCache(tmp_path / name) as cache:
            for mid in headers:
                cache.put_value(mid, str(int(mid.data_id[1:]) + 1).encode() if mid != out else b"")
            cache.put_value(out, str(sum(range(1, FAN_IN + 1)) + 1).encode())
            if executor is _NoExpand:
                keeper = SummaryKeeper(cache)
                keeper.note(out, ProvenanceHeader.decode(headers[out]))
                assert keeper.keep(index, headers) == 1
                ex = executor(reg, sources, cache=cache, headers=headers, ledger=index)
                runs.append(ex.run_plan(plan))
            else:
                tasks = tuple(
                    Executor(reg, {}, ledger=index)._expand(t) if t.is_delta else t for t in plan.tasks
                )
                ex = executor(reg, sources, cache=cache, headers=headers, incremental=False)
                runs.append(ex.run_plan(dataclasses.replace(plan, tasks=tasks)))
    delta, full = runs
    assert not delta.dead and not full.dead
    assert [r.value for r in delta.recomputed] == [r.value for r in full.recomputed]
    assert [_fields(r.header) for r in delta.recomputed] == [_fields(r.header) for r in full.recomputed]
    assert list(delta.recomputed[1].applied[0][1]) == list(full.recomputed[1].applied[0][1])
