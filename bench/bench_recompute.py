"""Selective vs full recompute: change 1% of N source records, replay only what derives from them.

Pipeline (real registered functions, real values and checksums): source s_i -> map `enrich` -> map
`tag`, and the `enrich` outputs reduced by `sum_n` in groups of --group sources. Its applications go
through the real LedgerChain into a LedgerIndex (RocksDB), as the ledger writer records them; the
`enrich` and `sum_n` outputs are in the value store and their original provenance headers are given
to the executor (what `OutputIndex` fills from the output topics and the service passes as
`headers=`).

Then 1% of the sources get a new value, and in the same run:

  selective  one plan for the batch of change events (`plan_for_changes`: one ledger traversal for
             all changed sources' old versions, which reads a sum's ledger entry through the input
             that changed, not its other inputs), run by `Executor.run_plan` with the RocksDB
             `ResultCache`: each changed source's enrich and tag, and the sum of every group that has
             a changed source (once per group), as a delta task (only its changed input listed).
             `sum_n` is registered with its inverse, so the sum is recomputed from its previous
             output and the summary the views keep of it (`SummaryKeeper`, built in the set-up as
             the service's views build it): the changed input's old value retracted, its new one
             folded in, both Merkle trees rehashed along its path; no unchanged input is read.
             `--no-summaries` keeps none: the sum is expanded from its ledger entry and every input's
             header read. `--no-inverse` registers it without an inverse: the sum re-folds all its
             inputs, the unchanged ones read from the value store in one batch;
  full       every application of the pipeline replayed from the current sources (one plan over
             every ledger entry, no cache, no early cut-off): what recomputing without provenance
             would have to do;
  replay     the selective plan again, as a redelivery after a crash: the value store is the
             service's `CommittedCache`, and the selective pass's corrections were never committed
             (its unit's transaction "failed"), so the replay recomputes every task: the cache answers.

Both wall times include planning. The objects the set-up built (ledger entries, sources, headers:
millions) are frozen out of the cyclic garbage collector first (`gc.freeze()`); otherwise every
full collection in either pass re-scans them, which costs more than the work being measured
(`--no-freeze` measures with them). Every output the selective pass recomputed is checked against
the full replay's output of the same application: same value bytes and same provenance header apart
from its timestamp (the run fails otherwise).

Printed: tasks and wall time of each, the cache hit rate of the selective pass and of the replay,
the process CPU time of both passes and the load average (the machine may be shared: CPU time is
the steadier of the two), and last `recompute_time_ratio=<selective wall / full wall>` (target
<= 0.05). `--profile` adds a cProfile of the selective pass (planning and execution).

Usage: python bench/bench_recompute.py [--n N] [--changed-pct P] [--group G] [--no-inverse]
                                      [--no-summaries] [--profile] [--no-freeze]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recompute_manager.executor import DeadLetter, Executor, PlanResult, Recomputed
from recompute_manager.planner import RecomputePlan, plan_for_changes, plan_from_applications
from recompute_manager.policy import Cause
from recompute_manager.summary import SummaryKeeper
from recompute_manager.views import CommittedCache
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.ledger import (
    Application,
    CheckpointSigner,
    Context,
    DataRef,
    LedgerChain,
    LedgerEntry,
    LedgerIndex,
    StoredRecord,
)
from streamprov.ledger.queries import Applied
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, ReduceState, SourceStamper

LEDGER = "bench-recompute"
CTX = Context("bench-source", "bench-site", ("internal",))
TS = 1_700_000_000_000


def enrich(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {**value, "scaled": value["n"] * factor}


def tag(value: dict[str, Any], label: str = "tagged") -> dict[str, Any]:
    return {**value, "label": label}


def sum_n(total: int, value: dict[str, Any]) -> int:
    return total + int(value["n"])


def unsum_n(total: int, value: dict[str, Any]) -> int:
    """`sum_n`'s inverse: the total without `value`."""
    return total - int(value["n"])


def make_registry(inverse: bool) -> FunctionRegistry:
    """The pipeline's functions; `sum_n` with its inverse or without (its code hash differs: the
    ledger and the headers are built with the registry the passes use)."""
    registry = FunctionRegistry()
    registry.map("enrich", "1", factor=3)(enrich)
    registry.map("tag", "1")(tag)
    registry.reduce("sum_n", "1", initial=int, inverse=unsum_n if inverse else None)(sum_n)
    return registry


def dumps(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), sort_keys=True).encode()


def source_value(i: int, version: int = 0) -> bytes:
    return dumps({"n": i + 1_000_000 * version})


Built = tuple[LedgerIndex, CommittedCache, dict[str, bytes], dict[DataRef, bytes], list[LedgerEntry], float]


def build(registry: FunctionRegistry, root: Path, n: int, group: int, summaries: bool = True) -> Built:
    """The ledger index and value store of the pipeline over n sources: (index, cache, sources,
    original headers of the enrich and sum_n outputs, entries in pipeline order, seconds)."""
    started = time.perf_counter()
    enrich, tag, sum_n = registry.get("enrich"), registry.get("tag"), registry.get("sum_n")
    cache = CommittedCache(root / "cache")
    signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    chain = LedgerChain(LEDGER, signer, checkpoint_every=10_000, dedup_window=1_000)
    index = LedgerIndex(root / "index", LEDGER)
    e_step, t_step, s_step = enrich.step(), tag.step(), sum_n.step()
    sources: dict[str, bytes] = {}
    headers: dict[DataRef, bytes] = {}
    source_stamper, enrich_stamper = SourceStamper(), MapStamper(enrich, verify_input=False)
    batch: list[StoredRecord] = []
    entries: list[LedgerEntry] = []
    offset = 0

    def add(app: Application) -> None:
        nonlocal offset
        for record in chain.append(app):
            batch.append(StoredRecord(offset, record))
            offset += 1
            if isinstance(record, LedgerEntry):
                entries.append(record)

    keeper = SummaryKeeper(cache) if summaries else None
    reduce, group = group > 0, group or n
    for g in range((n + group - 1) // group):
        mids: list[DataRef] = []
        state = ReduceState(0)
        for i in range(g * group, min(n, (g + 1) * group)):
            data_id = f"s{i:07d}"
            raw = sources[data_id] = source_value(i)
            src = DataRef.of(data_id, raw)
            add(Application.of_source(src, timestamp_ms=TS, device_id="bench", context=CTX))
            mid_value = dumps(enrich.apply(json.loads(raw)))
            mid = DataRef.of(data_id, mid_value)
            cache.put_value(mid, mid_value)
            src_header = source_stamper.header(data_id, raw)
            record = InputRecord(raw, [(HEADER_KEY, src_header)], data_id.encode(), "", 0, 0)
            mid_header = headers[mid] = enrich_stamper.stamp(record, mid_value)
            add(Application.of_step(e_step, [src], mid, timestamp_ms=TS, device_id="bench", context=CTX))
            tagged = DataRef.of(f"{data_id}-t", dumps(tag.apply(json.loads(mid_value))))
            add(Application.of_step(t_step, [mid], tagged, timestamp_ms=TS, device_id="bench", context=CTX))
            mids.append(mid)
            if reduce:
                state.add(sum_n, {}, ProvenanceHeader.decode(mid_header), json.loads(mid_value))
        if not reduce:
            continue
        out_value = dumps(state.accumulator)
        out = DataRef.of(f"g{g}", out_value)
        cache.put_value(out, out_value)  # the sum's output record, as the OutputIndex reads it
        headers[out] = state.header(s_step, out.data_id, out_value, out.checksum.algorithm).encode()
        if keeper is not None:  # the views hear of each reduce output they index (OutputIndex)
            keeper.note(out, ProvenanceHeader.decode(headers[out]))
        add(Application.of_step(s_step, mids, out, timestamp_ms=TS, device_id="bench", context=CTX))
        if len(batch) >= 10_000:
            index.apply(batch, batch_size=20_000)
            batch = []
    final = chain.checkpoint()
    if final is not None:
        batch.append(StoredRecord(offset, final))
    index.apply(batch, batch_size=20_000)
    index.compact()
    if keeper is not None:  # and keep their summaries as they catch up (Views.for_planning)
        keeper.keep(index, headers, budget=keeper.pending, max_seconds=None)
        assert keeper.pending == 0 and keeper.given_up == 0
    return index, cache, sources, headers, entries, time.perf_counter() - started


def run(executor: Executor, plans: list[RecomputePlan]) -> tuple[list[PlanResult], float]:
    started = time.perf_counter()
    results = [executor.run_plan(p) for p in plans]
    return results, time.perf_counter() - started


def run_all(executor: Executor, plan: RecomputePlan) -> tuple[list[PlanResult], float]:
    """Every task, no early cut-off: a recompute that knows nothing of the previous outputs."""
    started = time.perf_counter()
    result = PlanResult()
    outputs: dict[str, Recomputed] = {}
    for task in plan.tasks:
        done = executor.run(task, outputs)
        if isinstance(done, DeadLetter):
            result.dead.append(done)
        else:
            outputs[task.task_id] = done
            result.recomputed.append(done)
    return [result], time.perf_counter() - started


def mismatches(selective: list[PlanResult], full: list[PlanResult]) -> tuple[int, list[str]]:
    """Every selective output against the full replay's output of the same ledger entry: same value,
    same header but its timestamp. Returns (outputs compared, problems)."""
    by_entry = {r.task.entry_id: r for res in full for r in res.recomputed}
    problems: list[str] = []
    compared = 0
    for r in (r for res in selective for r in res.recomputed):
        other = by_entry.get(r.task.entry_id)
        compared += 1
        if other is None:
            problems.append(f"{r.task.data_id}: not in the full replay")
            continue
        mine, theirs = ProvenanceHeader.decode(r.header), ProvenanceHeader.decode(other.header)
        if r.value != other.value:
            problems.append(f"{r.task.data_id}: value {r.value!r} != {other.value!r}")
        elif (mine.data_id, mine.checksum, mine.source_checksum, mine.lineage) != (
            theirs.data_id,
            theirs.checksum,
            theirs.source_checksum,
            theirs.lineage,
        ):
            problems.append(f"{r.task.data_id}: header {mine} != {theirs}")
    return compared, problems


def summary(results: list[PlanResult]) -> tuple[int, int, int, int]:
    """(tasks run, cache hits, unchanged, dead)."""
    done = [r for res in results for r in res.recomputed]
    return (
        len(done),
        sum(r.cached for r in done),
        sum(r.unchanged for r in done),
        sum(len(r.dead) for r in results),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="source records")
    ap.add_argument("--changed-pct", type=float, default=1.0, help="percent of sources changed")
    ap.add_argument("--group", type=int, default=100, help="sources per reduce group (0: no reduce)")
    ap.add_argument(
        "--no-inverse",
        action="store_true",
        help="register sum_n without its inverse: the selective pass re-folds every input of a sum",
    )
    ap.add_argument(
        "--no-summaries",
        action="store_true",
        help="no reduce summaries in the value store: a reduce task is run from every input's header",
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the selective pass (slower)")
    ap.add_argument("--no-freeze", action="store_true", help="leave the set-up objects to the cyclic GC")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-recompute-"))
    try:
        registry = make_registry(inverse=not a.no_inverse)
        index, cache, sources, headers, entries, build_s = build(
            registry, root, a.n, a.group, summaries=not a.no_summaries
        )
        print(f"built: {a.n} sources, {index.size} ledger entries in {build_s:.1f} s")
        print(f"sum_n: {'without' if a.no_inverse else 'with'} its inverse")
        # The data set is set-up, not work: out of the cyclic GC's way, so that neither pass pays for
        # re-scanning millions of set-up objects at every full collection (both passes benefit).
        if not a.no_freeze:
            gc.collect()
            gc.freeze()
        step = max(1, round(100 / a.changed_pct))
        changed = [f"s{i:07d}" for i in range(0, a.n, step)]
        old = {d: DataRef.of(d, sources[d]) for d in changed}
        for d in changed:
            sources[d] = source_value(int(d[1:]), 1)
        events = [  # the change events of one consumed batch, as the change detector writes them
            ChangeEvent.for_source(
                ChangeKind.SOURCE_CHANGED,
                SourceChange("bench-sources", 0, i, d, old[d].checksum, DataRef.of(d, sources[d]).checksum),
                EMPTY_IMPACT,
                TS,
            )
            for i, d in enumerate(changed)
        ]

        profile = cProfile.Profile() if a.profile else None
        if profile is not None:
            profile.enable()
        load_before = os.getloadavg()[0]
        cpu = time.process_time()
        started = time.perf_counter()
        plans = [plan_for_changes(index, events, created_at_ms=TS)]
        plan_s = time.perf_counter() - started
        executor = Executor(registry, sources, cache=cache, headers=headers, ledger=index)
        cache.begin()  # a worker's unit: its corrections are staged until its transaction commits
        selective, sel_run_s = run(executor, plans)
        sel_cpu = time.process_time() - cpu
        if profile is not None:
            profile.disable()
        sel_s = plan_s + sel_run_s
        sel_tasks, sel_hits, _, sel_dead = summary(selective)

        cpu = time.process_time()
        started = time.perf_counter()
        every = [Applied(e, 0) for e in entries]
        full_plan = plan_from_applications(
            index,
            every,
            cause_id="full",
            cause=Cause("full", "all"),
            replace={DataRef.of(d, source_value(int(d[1:]))): DataRef.of(d, sources[d]) for d in changed},
            created_at_ms=TS,
        )
        full_plan_s = time.perf_counter() - started
        full, full_run_s = run_all(Executor(registry, sources, headers=headers), full_plan)
        full_s = full_plan_s + full_run_s
        full_cpu = time.process_time() - cpu
        load_after = os.getloadavg()[0]
        full_tasks, _, full_unchanged, full_dead = summary(full)

        cache.staged()  # ... which it never does: the unit is redelivered
        cache.begin()
        replay, replay_s = run(Executor(registry, sources, cache=cache, headers=headers, ledger=index), plans)
        rep_tasks, rep_hits, _, _ = summary(replay)
        compared, problems = mismatches(selective, full)
        index.close()
        cache.close()

        if profile is not None:
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(30)
            print(out.getvalue())

        print(f"changed sources: {len(changed)} of {a.n} ({a.changed_pct:g}%)")
        print(
            f"selective: {len(plans)} plans, {sel_tasks} tasks, {sel_s:.3f} s "
            f"(plan {plan_s:.3f} s, run {sel_run_s:.3f} s), dead {sel_dead}"
        )
        print(
            f"full:      1 plan, {full_tasks} tasks, {full_s:.3f} s "
            f"(plan {full_plan_s:.3f} s, run {full_run_s:.3f} s), "
            f"unchanged {full_unchanged}, dead {full_dead}"
        )
        print(f"work ratio (tasks): {sel_tasks / max(1, full_tasks):.4f}")
        print(f"selective outputs equal to the full replay's: {compared - len(problems)} of {compared}")
        for problem in problems[:5]:
            print(f"  MISMATCH {problem}")
        print(
            f"cache hit rate: selective {sel_hits / max(1, sel_tasks):.3f}, "
            f"replay {rep_hits / max(1, rep_tasks):.3f} ({rep_tasks} tasks, {replay_s:.3f} s)"
        )
        print(
            f"cpu time: selective {sel_cpu:.3f} s, full {full_cpu:.3f} s, ratio {sel_cpu / full_cpu:.4f} "
            f"(1-min load average {load_before:.2f} before the selective pass, {load_after:.2f} after full)"
        )
        print(f"recompute_time_ratio={sel_s / full_s:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if problems or sel_dead else 0


if __name__ == "__main__":
    sys.exit(main())
