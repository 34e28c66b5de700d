"""Randomized properties of delta reduce tasks (`Executor._delta`): whatever the fan-in, the change
sets, the order plans run in, duplicate inputs, the inputs' lineages and the state of the summaries,
a reduce's latest output equals the full fold of the same reduce over every input at its current
version (`Executor(incremental=False)` on the expanded task, in a fresh cache): its value, its
header but the timestamp (DataID, checksums, lineage with the input digest's count and Merkle
root) and the input nodes its ledger entry lists. Bounded `random.Random(seed)` loops; no broker.

The pipeline: sources s0..s{n-1} -> a chain of 0, 1 or 2 maps each (`inc`, then `lift`) -> one
reduce `total` (with an inverse) over the chain tails, some at two positions -> map `publish`."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ledger_support import CTX, LEDGER, build, map_app, reduce_app

from recompute_manager.cache import ResultCache
from recompute_manager.executor import Executor, PlanResult, Recomputed, RetryPolicy
from recompute_manager.planner import RecomputePlan, plan_for_changes
from recompute_manager.summary import InputParts, ReduceSummary, SummaryKeeper
from streamprov.agents.serde import JsonSerde
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.checksum import ChecksumAlgorithm
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import Application, DataRef, LedgerIndex
from streamprov.merkle import FlatTree, leaf_hash
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, ReduceState

SERDE = JsonSerde()
ALG = ChecksumAlgorithm.CRC32C
CHAIN = ("inc", "lift")
WINDOW = (0, 60_000)


def _registry() -> FunctionRegistry:
    """Value ranges of the stages never meet (sources 0..999, inc 1000.., lift 1_000_000..), so no
    node of one stage is a node of another under the same DataID."""
    reg = FunctionRegistry()
    reg.map("inc", "1")(lambda v: v + 1000)
    reg.map("lift", "1")(lambda v: v + 1_000_000)
    reg.reduce("total", "1", initial=int, inverse=lambda acc, v: acc - v)(lambda acc, v: acc + v)
    reg.map("publish", "1")(lambda v: [v])
    return reg


REG = _registry()


def _bytes(v: object) -> bytes:
    return SERDE.dumps(v)


def _ref(data_id: str, v: object) -> DataRef:
    return DataRef.of(data_id, _bytes(v), ALG)


def _sid(i: int) -> str:
    return f"s{i}"


# -- the pipeline as recorded ---------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    chains: tuple[int, ...]
    """Maps between source i and the reduce: 0 (the reduce reads the source), 1 (inc) or 2 (inc,
    lift)."""
    picks: tuple[int, ...]
    """The source whose chain tail each reduce position reads (a source may be read more than once)."""
    orig: tuple[int, ...]
    """The sources' values when the pipeline ran (what the ledger records)."""
    reg: FunctionRegistry = dataclasses.field(default=REG, compare=False, repr=False)

    def stages(self, i: int, v: int) -> list[int]:
        """Source i's value at each stage of its chain, the source value first."""
        out = [v]
        for fid in CHAIN[: self.chains[i]]:
            out.append(self.reg.get(fid, "1").apply(out[-1], params={}))
        return out

    def tail(self, i: int, v: int) -> DataRef:
        return _ref(_sid(i), self.stages(i, v)[-1])

    def total(self, values: Sequence[int]) -> int:
        return sum(self.stages(i, values[i])[-1] for i in self.picks)


def random_world(
    rng: random.Random,
    *,
    chains: Sequence[int] = (1,),
    dups: tuple[int, int] = (0, 4),
    fan_in: int | None = None,
) -> World:
    """A reduce of 16..70 inputs (`fan_in`), `dups` (low, high) of them a second (or third) read of
    a source another position reads too."""
    n = rng.randint(16, 70) if fan_in is None else fan_in
    n_dup = rng.randint(*dups)
    n_src = n - n_dup
    picks = list(range(n_src)) + [rng.randrange(n_src) for _ in range(n_dup)]
    rng.shuffle(picks)
    return World(
        tuple(rng.choice(chains) for _ in range(n_src)),
        tuple(picks),
        tuple(rng.randrange(1000) for _ in range(n_src)),
    )


def _apps(w: World) -> list[Application]:
    apps: list[Application] = []
    for i, v in enumerate(w.orig):
        values = w.stages(i, v)
        prev = _ref(_sid(i), values[0])
        apps.append(Application.of_source(prev, timestamp_ms=1, device_id="src", context=CTX))
        for fid, out_v in zip(CHAIN, values[1:], strict=False):
            out = _ref(_sid(i), out_v)
            apps.append(map_app(fid, prev, out))
            prev = out
    total = w.total(w.orig)
    apps.append(reduce_app("total", [w.tail(i, w.orig[i]) for i in w.picks], _ref("t", total)))
    apps.append(map_app("publish", _ref("t", total), _ref("t", [total])))
    return apps


def _pipeline(w: World) -> tuple[dict[DataRef, bytes], dict[DataRef, bytes]]:
    """(node -> value bytes, node -> the header the pipeline stamped) of every record the pipeline
    made up to the reduce, sources included: what the value store and the views hold."""
    values: dict[DataRef, bytes] = {}
    headers: dict[DataRef, bytes] = {}
    tails: dict[int, tuple[bytes, bytes]] = {}
    for i, v in enumerate(w.orig):
        stages = w.stages(i, v)
        raw = _bytes(stages[0])
        header = ProvenanceHeader.for_source(_sid(i), raw, ALG, timestamp_ms=1).encode()
        ref = _ref(_sid(i), stages[0])
        values[ref], headers[ref] = raw, header
        for fid, out_v in zip(CHAIN, stages[1:], strict=False):
            out_raw = _bytes(out_v)
            record = InputRecord(raw, [(HEADER_KEY, header)], _sid(i).encode(), "", 0, 0)
            header = MapStamper(w.reg.get(fid, "1"), {}, ALG, verify_input=False).stamp(record, out_raw)
            raw, ref = out_raw, _ref(_sid(i), out_v)
            values[ref], headers[ref] = raw, header
        tails[i] = (raw, header)
    fn = w.reg.get("total", "1")
    assert fn.initial is not None
    state = ReduceState(fn.initial())
    for i in w.picks:
        raw, header = tails[i]
        state.add(fn, {}, ProvenanceHeader.decode(header), SERDE.loads(raw))
    total_raw = _bytes(state.accumulator)
    total = _ref("t", state.accumulator)
    values[total] = total_raw
    headers[total] = state.header(fn.step({}), "t", total_raw, ALG, WINDOW).encode()
    return values, headers


def _change(i: int, old: int, new: int, offset: int) -> ChangeEvent:
    sc = SourceChange("src", 0, offset, _sid(i), _ref(_sid(i), old).checksum, _ref(_sid(i), new).checksum)
    return ChangeEvent.for_source(ChangeKind.SOURCE_CHANGED, sc, EMPTY_IMPACT, 5)


# -- what is compared -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """A reduce output as compared: its value, its header but the timestamp, the input nodes its
    ledger entry lists."""

    value: bytes
    fields: tuple[object, ...]
    inputs: tuple[DataRef, ...]


def _fields(raw: bytes) -> tuple[object, ...]:
    h = ProvenanceHeader.decode(raw)
    return h.data_id, h.checksum, h.source_checksum, h.lineage


def _out(r: Recomputed) -> Out:
    [(header, inputs, _)] = r.applied
    assert header == r.header
    return Out(r.value, _fields(r.header), tuple(inputs))


def _reduce_of(result: PlanResult) -> Recomputed | None:
    found = [r for r in result.recomputed if r.task.steps[0].function_id == "total"]
    assert len(found) <= 1
    return found[0] if found else None


class Harness:
    """One ledger (the pipeline's: recompute entries are never sealed into it), one value store that
    persists across plans (the service's), and the ground truth computed afresh for each check.

    `headers`: which original headers the views hold ("all": every record's, and the reduce output's
    summary is kept by `SummaryKeeper` when `keeper`; "some": the reduce output's and about half of
    its inputs'; "none": nothing, every stored input counts as an original record)."""

    def __init__(
        self, w: World, tmp: Path, *, headers: str = "all", keeper: bool = False, seed: int = 0
    ) -> None:
        self.w, self.tmp = w, tmp
        self.idx = LedgerIndex(tmp / "idx", LEDGER)
        self.idx.catch_up(build(_apps(w), checkpoint_every=1000))
        self.values, self.pipeline_headers = _pipeline(w)
        self.total_node = _ref("t", w.total(w.orig))
        rng = random.Random(seed)
        if headers == "all":
            self.headers = dict(self.pipeline_headers)
        elif headers == "some":
            self.headers = {k: v for k, v in self.pipeline_headers.items() if rng.random() < 0.5}
            self.headers[self.total_node] = self.pipeline_headers[self.total_node]
        else:
            assert headers == "none" and not keeper
            self.headers = {}
        self.current = list(w.orig)
        self.seen: list[set[int]] = [{v} for v in w.orig]
        """Each source's values so far: a new one is never one of them (see `fresh`)."""
        self.applied = list(w.orig)
        """The source values the reduce's latest output was made from."""
        self.totals = {w.total(w.orig)}
        """Every sum the reduce's output had."""
        self.touched: set[int] = set()
        """Sources some plan changed (their chains were recomputed)."""
        self.offset = 0
        self.runs = 0
        self.cache = ResultCache(tmp / "cache")
        self._fill(self.cache)
        if keeper:  # the views' summary of the pipeline's reduce output: the first recompute is a delta
            assert headers == "all"
            k = SummaryKeeper(self.cache)
            k.note(self.total_node, ProvenanceHeader.decode(self.headers[self.total_node]))
            assert k.keep(self.idx, self.headers) == 1
        self._planned: dict[str, list[int]] = {}
        self.latest: Out | None = None
        self.deltas = self.expanded = 0

    def close(self) -> None:
        self.cache.close()
        self.idx.close()

    def _fill(self, cache: ResultCache) -> None:
        for ref, raw in self.values.items():
            cache.put_value(ref, raw)

    # -- changes and plans ---------------------------------------------------------------------------
    def fresh(self, rng: random.Random, picked: Sequence[int]) -> dict[int, int]:
        """New values for the `picked` sources: never a value the source had (no map output goes back
        to its recorded node: `test_a_map_output_back_at_its_recorded_node_is_not_seen_by_the_reduce`)
        and such that the reduce's sum after a plan of them is none it had either (no output goes back
        to an earlier version: `test_an_output_back_at_an_earlier_version_is_still_the_base_...`)."""
        for _ in range(1000):
            new = {i: rng.randrange(1000) for i in picked}
            if any(v in self.seen[i] for i, v in new.items()):
                continue
            if self.w.total([new.get(i, v) for i, v in enumerate(self.applied)]) not in self.totals:
                return new
        raise AssertionError("no fresh values found")

    def sums_after(self, *plans: Sequence[int]) -> list[int]:
        """The reduce's sums after plans of these sources run in this order, on the current values."""
        applied, sums = list(self.applied), []
        for picked in plans:
            for i in picked:
                applied[i] = self.current[i]
            sums.append(self.w.total(applied))
        return sums

    def set(self, changes: dict[int, int]) -> None:
        for i, v in changes.items():
            self.current[i] = v
            self.seen[i].add(v)
            self.touched.add(i)

    def plan(self, changes: Sequence[int]) -> RecomputePlan:
        """A plan for these sources changed, from the pipeline's ledger: each event names the recorded
        version as the previous one and the current one as the new."""
        events = []
        for i in sorted(set(changes)):
            self.offset += 1
            events.append(_change(i, self.w.orig[i], self.current[i], self.offset))
        plan = plan_for_changes(self.idx, events)
        self._planned[plan.plan_id] = sorted(set(changes))
        return plan

    def sources(self) -> dict[str, bytes]:
        return {_sid(i): _bytes(v) for i, v in enumerate(self.current)}

    def run(self, plan: RecomputePlan) -> PlanResult:
        ex = Executor(
            self.w.reg,
            self.sources(),
            cache=self.cache,
            headers=self.headers,
            ledger=self.idx,
            retry=RetryPolicy(max_retries=0),
            sleep=lambda _s: None,
        )
        result = ex.run_plan(plan)
        assert not result.dead, [d.error for d in result.dead]
        self.deltas += ex.deltas
        self.expanded += ex.expanded
        r = _reduce_of(result)
        if r is not None:
            self.latest = _out(r)
        for i in self._planned[plan.plan_id]:  # its tasks read the sources' current values
            self.applied[i] = self.current[i]
        self.totals.add(self.w.total(self.applied))
        return result

    # -- the property ---------------------------------------------------------------------------------
    def got(self) -> Out:
        """The reduce's latest output: the last recompute's, else the pipeline's."""
        return self.latest if self.latest is not None else self._original()

    def _original(self) -> Out:
        raw = self.pipeline_headers[self.total_node]
        entry = self.idx.entry(self.idx.producers(self.total_node)[0])
        return Out(self.values[self.total_node], _fields(raw), tuple(entry.application.inputs))

    def truth(self) -> Out:
        """The full fold over every input at its current version: one plan for every source a plan
        touched (so each of their chains is stamped afresh, as in the runs; one back at its recorded
        value whose header the views hold is that record), its reduce expanded and every input
        folded (no summary, no inverse), in a fresh value store holding what the pipeline made."""
        changed = [
            i
            for i in sorted(self.touched)
            if self.current[i] != self.w.orig[i] or self.w.tail(i, self.w.orig[i]) not in self.headers
        ]
        if not changed:
            return self._original()
        events = [_change(i, self.w.orig[i], self.current[i], 1) for i in changed]
        plan = plan_for_changes(self.idx, events)
        expander = Executor(self.w.reg, {}, ledger=self.idx)
        whole = dataclasses.replace(
            plan, tasks=tuple(expander._expand(t) if t.is_delta else t for t in plan.tasks)
        )
        self.runs += 1
        with ResultCache(self.tmp / f"truth{self.runs}") as fresh:
            self._fill(fresh)
            ex = Executor(self.w.reg, self.sources(), cache=fresh, headers=self.headers, incremental=False)
            result = ex.run_plan(whole)
        assert not result.dead, [d.error for d in result.dead]
        r = _reduce_of(result)
        if r is None:  # cut off: every input is a task's output and none changed
            return self._original()
        assert r.value == _bytes(self.w.total(self.current))  # the sum by hand
        return _out(r)

    def check(self, what: str, *, latest: bool = True) -> None:
        """The reduce's latest output is the full fold's; `latest`: and `ResultCache.latest` of the
        recorded output names it (what the next delta starts from)."""
        got, want = self.got(), self.truth()
        assert got.value == want.value, f"{what}: value {got.value!r}, the full fold's {want.value!r}"
        assert got.fields == want.fields, f"{what}: the header is not the full fold's"
        assert got.inputs == want.inputs, f"{what}: the ledger inputs are not the full fold's"
        if latest and self.latest is not None:
            node = self.cache.latest(self.total_node)
            assert node == DataRef.of("t", got.value, ALG), f"{what}: ResultCache.latest is {node}"


@contextmanager
def _harness(
    tmp: Path, w: World, *, headers: str = "all", keeper: bool = False, seed: int = 0
) -> Iterator[Harness]:
    h = Harness(w, tmp, headers=headers, keeper=keeper, seed=seed)
    try:
        yield h
    finally:
        h.close()


# -- scenarios ------------------------------------------------------------------------------------


def _sample(rng: random.Random, w: World, low: int, high: int) -> list[int]:
    return rng.sample(range(len(w.orig)), min(len(w.orig), rng.randint(low, high)))


def test_a_sequence_of_plans_keeps_the_reduce_equal_to_the_full_fold(tmp_path: Path) -> None:
    """Plans one after another, each changing a random subset of the sources; the first from the
    summary the views keep (`keeper`) or expanded from the ledger entry."""
    for seed in range(8):
        rng = random.Random(seed)
        w = random_world(rng)
        keeper = seed % 2 == 0
        with _harness(tmp_path / str(seed), w, keeper=keeper) as h:
            for step in range(6):
                picked = _sample(rng, w, 1, 5)
                h.set(h.fresh(rng, picked))
                h.run(h.plan(picked))
                h.check(f"seed {seed} plan {step} ({len(w.picks)} inputs, changed {sorted(picked)})")
            assert (h.deltas, h.expanded) == ((6, 0) if keeper else (5, 1))


def test_the_same_source_changed_in_plan_after_plan(tmp_path: Path) -> None:
    """A few sources, each changed again in many successive plans (sometimes with another)."""
    for seed in range(6):
        rng = random.Random(100 + seed)
        w = random_world(rng, dups=(0, 3))
        hot = rng.sample(range(len(w.orig)), 2)
        with _harness(tmp_path / str(seed), w, keeper=bool(seed % 2)) as h:
            for step in range(8):
                picked = [rng.choice(hot)] + ([rng.randrange(len(w.orig))] if rng.random() < 0.3 else [])
                h.set(h.fresh(rng, picked))
                h.run(h.plan(picked))
                h.check(f"seed {seed} plan {step} (changed {picked})")
            assert h.deltas >= 7


def test_two_plans_from_one_ledger_state_run_in_either_order(tmp_path: Path) -> None:
    """Plans A and B are made from the same ledger (B's changes made after A was planned, some of
    them to A's sources too), then run in either order: the second applies on top of the first
    (its base is the latest version of the output both name), and the result counts both."""
    for seed in range(8):
        rng = random.Random(200 + seed)
        w = random_world(rng)
        with _harness(tmp_path / str(seed), w, keeper=seed % 4 != 0) as h:
            for step in range(3):
                a = _sample(rng, w, 1, 4)
                b = _sample(rng, w, 1, 4) + (a[:1] if rng.random() < 0.5 else [])
                order = (a, b) if rng.random() < 0.5 else (b, a)
                for _ in range(100):  # no sum repeats, whichever runs first
                    h.set(h.fresh(rng, a))
                    plan_a = h.plan(a)
                    h.set(h.fresh(rng, b))
                    plan_b = h.plan(b)
                    sums = h.sums_after(*order)
                    if len(set(sums)) == 2 and not h.totals & set(sums):
                        break
                else:
                    raise AssertionError("no fresh values found")
                first, second = (plan_a, plan_b) if order[0] is a else (plan_b, plan_a)
                h.run(first)
                h.run(second)
                h.check(f"seed {seed} round {step}: A {sorted(a)}, B {sorted(b)}")


def test_duplicate_inputs_are_retracted_and_folded_at_each_position(tmp_path: Path) -> None:
    """Sources read at two or three positions of the reduce (duplicates), changed alone or with
    others: the delta task lists every position of each, each is retracted and folded."""
    for seed in range(6):
        rng = random.Random(300 + seed)
        w = random_world(rng, dups=(3, 10))
        dup = [i for i in set(w.picks) if w.picks.count(i) > 1]
        with _harness(tmp_path / str(seed), w, keeper=seed % 3 != 0) as h:
            for step in range(5):
                picked = [rng.choice(dup)] + (_sample(rng, w, 1, 3) if rng.random() < 0.5 else [])
                h.set(h.fresh(rng, picked))
                plan = h.plan(picked)
                [task] = [t for t in plan.tasks if t.steps[0].function_id == "total"]
                listed = [i.position for i in task.inputs]
                want = [at for at, i in enumerate(w.picks) if i in picked]
                assert listed == want or (listed == [None] * len(want) and len(want) == len(w.picks))
                h.run(plan)
                h.check(f"seed {seed} plan {step} (changed {picked}, positions {want})")
            assert h.deltas >= 4


def test_inputs_of_other_lineages_change_the_shared_prefix(tmp_path: Path) -> None:
    """Inputs through chains of 0, 1 or 2 maps, and stored inputs the views have no header of (they
    count as original records: empty lineage) replaced by recomputed ones: the lineage the inputs
    share changes as inputs are replaced; plans change up to all of the inputs, so a plan's reduce
    task may list every input (then it is not a delta)."""
    configs = [((1, 2), "none"), ((1, 2), "some"), ((0, 1, 2), "all"), ((2,), "none"), ((1, 2), "all")]
    for seed, (chains, headers) in enumerate(configs * 2):
        rng = random.Random(400 + seed)
        w = random_world(rng, chains=chains, fan_in=rng.randint(16, 24), dups=(0, 2))
        prefixes = set()
        with _harness(
            tmp_path / str(seed), w, headers=headers, keeper=headers == "all" and seed % 2 == 0, seed=seed
        ) as h:
            for step in range(5):
                picked = _sample(rng, w, 1, len(w.orig) // 2 + 2)
                h.set(h.fresh(rng, picked))
                h.run(h.plan(picked))
                h.check(f"seed {seed} {chains} headers {headers} plan {step} (changed {sorted(picked)})")
                lineage = h.got().fields[3]
                assert isinstance(lineage, tuple)
                prefixes.add(len(lineage))
            assert h.deltas >= 1
            if headers == "none" and len(h.touched) == len(w.orig):  # every input was replaced
                assert len(prefixes) > 1, prefixes


def test_the_first_recompute_without_a_summary_falls_back_then_deltas_follow(tmp_path: Path) -> None:
    """No summary of the pipeline's output (the views did not keep one): the first plan expands the
    task from the ledger entry, keeps a summary of its result, and every later plan is a delta."""
    for seed in range(4):
        rng = random.Random(500 + seed)
        w = random_world(rng, chains=(0, 1, 2) if seed % 2 else (1,))
        with _harness(tmp_path / str(seed), w, headers="all" if seed < 2 else "some") as h:
            for step in range(4):
                picked = _sample(rng, w, 1, 3)
                h.set(h.fresh(rng, picked))
                h.run(h.plan(picked))
                h.check(f"seed {seed} plan {step}")
                assert (h.deltas, h.expanded) == (step, 1)


# -- ReduceSummary.replaced -----------------------------------------------------------------------


def _random_node(rng: random.Random) -> DataRef:
    """A node whose encoding has a random length: DataIDs of 0..40 characters, some of them several
    UTF-8 bytes long, and 4-byte (CRC32C) or 32-byte (SHA-256) checksums."""
    data_id = "".join(rng.choice("ab7_é€𝄞") for _ in range(rng.randint(0, 40)))
    return DataRef.of(data_id, rng.randbytes(8), rng.choice(list(ChecksumAlgorithm)))


def _random_parts(rng: random.Random, lineages: Sequence[bytes]) -> InputParts:
    return InputParts(leaf_hash(rng.randbytes(9)), leaf_hash(rng.randbytes(9)), rng.choice(lineages))


def test_a_summary_with_inputs_replaced_is_the_summary_of_the_new_inputs() -> None:
    """`ReduceSummary.replaced` with replacement nodes longer, shorter or as long as the ones they
    replace (offsets shift), any set of positions, lineages lost and new: the same nodes, offsets,
    trees and per-input parts as `ReduceSummary.of` the new input list, and it round-trips."""
    rng = random.Random(700)
    for case in range(300):
        n = rng.choice([1, 2, 3, 5, 16, 17, 31, 64, rng.randint(1, 90)])
        lineages = [bytes([k]) * rng.randint(0, 5) for k in range(rng.randint(1, 4))]
        nodes = [_random_node(rng) for _ in range(n)]
        parts = [_random_parts(rng, lineages) for _ in range(n)]
        summary = ReduceSummary.of(nodes, parts)
        for _round in range(3):
            k = min(n, rng.choice([0, 1, 2, rng.randint(0, n)]))
            changes = {
                i: (_random_node(rng), _random_parts(rng, [*lineages, b"new" * rng.randint(1, 3)]))
                for i in rng.sample(range(n), k)
            }
            after = summary.replaced(changes)
            for i, (node, p) in changes.items():
                nodes[i], parts[i] = node, p
            want = ReduceSummary.of(nodes, parts)
            what = f"case {case}: {n} inputs, replaced {sorted(changes)}"
            assert after.nodes == want.nodes and after.offsets == want.offsets, what
            assert after.inputs_tree == want.inputs_tree and after.sources_tree == want.sources_tree, what
            assert list(after.input_nodes()) == nodes, what
            assert [after.parts(i) for i in range(n)] == parts, what
            assert sorted(after.lineages_present()) == sorted(want.lineages_present()), what
            assert ReduceSummary.decode(after.encode()) == after, what
            assert after.inputs_tree == FlatTree(after.inputs_tree.raw, n), what
            summary = after


# -- summaries that are not there, or not what they should be ---------------------------------------


def _latest_root(h: Harness) -> bytes:
    """The inputs root the reduce's latest output commits to: where its summary is kept."""
    node = h.cache.latest(h.total_node)
    raw = h.cache.header(node) or h.headers[node]
    digest = ProvenanceHeader.decode(raw).lineage[-1].inputs
    assert digest is not None
    return digest.merkle_root


def _cut(rng: random.Random, raw: bytes) -> bytes:
    """Bytes that do not decode as a summary of `raw`'s inputs: cut short, another version, another
    input count, nothing."""
    kind = rng.randrange(5)
    if kind == 0:
        return raw[: rng.randrange(len(raw))]
    if kind == 1:
        return bytes([raw[0] + 1]) + raw[1:]
    if kind == 2:
        n = int.from_bytes(raw[1:5], "big")
        other = rng.choice([1, n - 1, n + 1, 1 << 17])
        return raw[:1] + other.to_bytes(4, "big") + raw[5:]
    if kind == 3:
        return raw[: rng.randrange(len(raw))] + rng.randbytes(rng.randint(1, 64))
    return b""


def test_a_summary_that_does_not_decode_falls_back_to_the_ledger_entry(tmp_path: Path) -> None:
    """After each plan the summary of the reduce's latest output is replaced by bytes that do not
    decode as one of its inputs (cut short, another version or input count, garbage after a cut,
    nothing): the next plan expands the task from the ledger entry, its result equals the full fold
    and keeps a sound summary, the one after is a delta again."""
    for seed in range(6):
        rng = random.Random(600 + seed)
        w = random_world(rng, chains=(1, 2))
        with _harness(tmp_path / str(seed), w, keeper=True) as h:
            for step in range(5):
                if step % 2:
                    root = _latest_root(h)
                    raw = h.cache.summary(root)
                    assert raw is not None
                    h.cache.put_summary(root, _cut(rng, raw))
                before = h.expanded
                picked = _sample(rng, w, 1, 4)
                h.set(h.fresh(rng, picked))
                h.run(h.plan(picked))
                h.check(f"seed {seed} plan {step}")
                assert h.expanded - before == step % 2, (step, h.expanded - before)
            assert (h.deltas, h.expanded) == (3, 2)


# -- the bugs these properties found, as minimal cases (fixed in the commit that made them pass) -------

SMALL = World(chains=(1,) * 16, picks=tuple(range(16)), orig=tuple(range(100, 116)))
"""16 sources 100..115 -> inc (+1000) -> total (recorded 17720) -> publish."""


def _non_injective() -> FunctionRegistry:
    reg = FunctionRegistry()
    reg.map("inc", "1")(lambda v: v // 10 + 1000)  # 103 and 104 both -> 1010
    reg.reduce("total", "1", initial=int, inverse=lambda acc, v: acc - v)(lambda acc, v: acc + v)
    reg.map("publish", "1")(lambda v: [v])
    return reg


def test_a_map_output_back_at_its_recorded_node_is_not_seen_by_the_reduce(tmp_path: Path) -> None:
    """inc = v // 10 + 1000. Plan 1: s3 103 -> 500 (inc 1010 -> 1050, total 16166 -> 16206).
    Plan 2 (from the same ledger): s3 103 -> 104, a real change, but inc(104) = 1010 is the recorded
    node: the inc task is `unchanged` and the delta reduce task (listing position 3 only) is skipped.
    Expected total 16166 (the full fold), got 16206 (plan 1's, still carrying s3 = 500); every later
    delta starts from it."""
    w = dataclasses.replace(SMALL, reg=_non_injective())
    with _harness(tmp_path, w, keeper=True) as h:
        h.set({3: 500})
        h.run(h.plan([3]))
        h.check("plan 1")
        h.set({3: 104})
        h.run(h.plan([3]))  # inc unchanged: total and publish skipped
        h.check("plan 2", latest=False)  # value b'16206', the full fold's b'16166'


def test_a_source_set_back_to_its_recorded_value_is_not_seen_by_the_reduce(tmp_path: Path) -> None:
    """Plan 1: s3 103 -> 113 (total 17730). Plan 2: s3 back to 103 (recorded): expected 17720, got
    17730."""
    with _harness(tmp_path, SMALL, keeper=True) as h:
        h.set({3: 113})
        h.run(h.plan([3]))
        h.check("plan 1")
        h.set({3: 103})
        h.run(h.plan([3]))
        h.check("plan 2", latest=False)


def test_an_output_back_at_an_earlier_version_is_still_the_base_of_the_next_delta(tmp_path: Path) -> None:
    """Plan 1: s3 103 -> 113 (total T0 17720 -> T1 17730). Plan 2: s5 105 -> 95 (total back to
    17720: the recorded node T0, new header). Plan 3: s7 107 -> 150: expected 17763, got 17773
    (started from T1, which has s5 = 105)."""
    with _harness(tmp_path, SMALL, keeper=True) as h:
        h.set({3: 113})
        h.run(h.plan([3]))
        h.check("plan 1")
        h.set({5: 95})
        h.run(h.plan([5]))
        h.check("plan 2", latest=False)  # right, but ResultCache.latest(T0) is T1 now
        h.set({7: 150})
        h.run(h.plan([7]))
        h.check("plan 3", latest=False)  # value b'17773', the full fold's b'17763'


def test_a_summary_of_other_inputs_under_the_base_root_is_not_used(tmp_path: Path) -> None:
    """Plan 1: s3 103 -> 113 (T1 17730, its summary kept under T1's root R1). R1 then holds the
    pipeline output's summary (R0's: s3 at 103). Plan 2: s3 -> 123: expected 17740, got 17750 (1103
    retracted where the base folded 1113)."""
    with _harness(tmp_path, SMALL, keeper=True) as h:
        r0 = _latest_root(h)
        h.set({3: 113})
        h.run(h.plan([3]))
        h.check("plan 1")
        r1 = _latest_root(h)
        other = h.cache.summary(r0)
        assert other is not None and r1 != r0
        h.cache.put_summary(r1, other)
        h.set({3: 123})
        h.run(h.plan([3]))
        h.check("plan 2")


def test_a_summary_whose_lineage_does_not_decode_falls_back(tmp_path: Path) -> None:
    """Plan 1: s3 -> 113; the lineage in its summary then says 2 steps where it has 1 (the Avro
    array count 0x02 -> 0x04). Plan 2 (s5 -> 150): dead-lettered, 'lineage is not valid Avro'."""
    with _harness(tmp_path, SMALL, keeper=True) as h:
        h.set({3: 113})
        h.run(h.plan([3]))
        root = _latest_root(h)
        raw = h.cache.summary(root)
        assert raw is not None
        summary = ReduceSummary.decode(raw)
        [lineage] = summary.lineages
        at = raw.index(len(lineage).to_bytes(4, "big") + lineage) + 4
        assert raw[at] == 0x02  # one step: inc
        h.cache.put_summary(root, raw[:at] + b"\x04" + raw[at + 1 :])
        h.set({5: 150})
        h.run(h.plan([5]))
        h.check("plan 2")


def _toggle(rng: random.Random, h: Harness, i: int) -> dict[int, int]:
    """Source i to another of three values: its recorded one, +1, +7."""
    pool = [h.w.orig[i], (h.w.orig[i] + 1) % 1000, (h.w.orig[i] + 7) % 1000]
    return {i: rng.choice([v for v in pool if v != h.current[i]])}


def test_sources_going_back_and_forth_between_a_few_values(tmp_path: Path) -> None:
    """Scenarios 1-3 without the fresh-values precondition: a few sources toggling among three values
    (their recorded one included), one or two per plan, sometimes two plans from one ledger state
    run in either order (failed before the cut-off and supersede fixes)."""
    for seed in range(8):
        rng = random.Random(900 + seed)
        w = random_world(rng, chains=(1, 2), fan_in=rng.randint(16, 30))
        hot = rng.sample(range(len(w.orig)), 3)

        with _harness(tmp_path / str(seed), w, keeper=bool(seed % 2)) as h:
            for step in range(8):
                picked = rng.sample(hot, rng.randint(1, 2))
                for i in picked:
                    h.set(_toggle(rng, h, i))
                plans = [h.plan(picked)]
                if rng.random() < 0.3:
                    other = rng.choice(hot)
                    h.set(_toggle(rng, h, other))
                    plans.append(h.plan([other]))
                for plan in rng.sample(plans, len(plans)):
                    h.run(plan)
                h.check(f"seed {seed} plan {step}")
