"""Selective vs full recompute: change 1% of N source records, replay only what derives from them.

Pipeline (real registered functions, real values and checksums): source s_i -> map `enrich` -> map
`tag`, and the `enrich` outputs reduced by `sum_n` in groups of --group sources. Its applications go
through the real LedgerChain into a LedgerIndex (RocksDB), as the ledger writer records them; the
`enrich` outputs are in the value store (what `OutputIndex` fills from the output topics).

Then 1% of the sources get a new value, and in the same run:

  selective  one plan for the batch of change events: `plan_from_applications` over the union of
             `LedgerIndex.downstream` of each changed source's old version (ledger order), run by
             `Executor.run_plan` with the RocksDB `ResultCache`: each changed source's enrich and
             tag, and the sum of every group that has a changed source (once per group; the sum
             re-reads all its inputs: the un-changed ones from the value store);
  full       every application of the pipeline replayed from the current sources (one plan, no
             cache, no early cut-off): what recomputing without provenance would have to do;
  replay     the selective plans again (a redelivery after a crash): the cache answers.

Printed: tasks and wall time of each, the cache hit rate of the selective pass and of the replay,
and last `recompute_time_ratio=<selective wall / full wall>` (target <= 0.05).

Usage: python bench/bench_recompute.py [--n N] [--changed-pct P] [--group G]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recompute_manager.cache import ResultCache
from recompute_manager.executor import DeadLetter, Executor, PlanResult, Recomputed
from recompute_manager.planner import RecomputePlan, plan_from_applications
from recompute_manager.policy import Cause
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

LEDGER = "bench-recompute"
CTX = Context("bench-source", "bench-site", ("internal",))
TS = 1_700_000_000_000

registry = FunctionRegistry()


@registry.map("enrich", "1", factor=3)
def enrich(value: dict[str, Any], factor: int) -> dict[str, Any]:
    return {**value, "scaled": value["n"] * factor}


@registry.map("tag", "1")
def tag(value: dict[str, Any], label: str = "tagged") -> dict[str, Any]:
    return {**value, "label": label}


@registry.reduce("sum_n", "1", initial=int)
def sum_n(total: int, value: dict[str, Any]) -> int:
    return total + int(value["n"])


def dumps(v: Any) -> bytes:
    return json.dumps(v, separators=(",", ":"), sort_keys=True).encode()


def source_value(i: int, version: int = 0) -> bytes:
    return dumps({"n": i + 1_000_000 * version})


Built = tuple[LedgerIndex, ResultCache, dict[str, bytes], list[LedgerEntry], float]


def build(root: Path, n: int, group: int) -> Built:
    """The ledger index and value store of the pipeline over n sources: (index, cache, sources,
    entries in pipeline order, seconds)."""
    started = time.perf_counter()
    cache = ResultCache(root / "cache")
    signer = CheckpointSigner(Ed25519PrivateKey.from_private_bytes(bytes(32)))
    chain = LedgerChain(LEDGER, signer, checkpoint_every=10_000, dedup_window=1_000)
    index = LedgerIndex(root / "index", LEDGER)
    e_step, t_step = enrich.step(), tag.step()
    sources: dict[str, bytes] = {}
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

    reduce, group = group > 0, group or n
    for g in range((n + group - 1) // group):
        mids: list[DataRef] = []
        total = 0
        for i in range(g * group, min(n, (g + 1) * group)):
            data_id = f"s{i:07d}"
            raw = sources[data_id] = source_value(i)
            src = DataRef.of(data_id, raw)
            add(Application.of_source(src, timestamp_ms=TS, device_id="bench", context=CTX))
            mid_value = dumps(enrich.apply(json.loads(raw)))
            mid = DataRef.of(data_id, mid_value)
            cache.put_value(mid, mid_value)
            add(Application.of_step(e_step, [src], mid, timestamp_ms=TS, device_id="bench", context=CTX))
            tagged = DataRef.of(f"{data_id}-t", dumps(tag.apply(json.loads(mid_value))))
            add(Application.of_step(t_step, [mid], tagged, timestamp_ms=TS, device_id="bench", context=CTX))
            mids.append(mid)
            total = sum_n.apply(total, json.loads(mid_value))
        if not reduce:
            continue
        out = DataRef.of(f"g{g}", dumps(total))
        add(Application.of_step(sum_n.step(), mids, out, timestamp_ms=TS, device_id="bench", context=CTX))
        if len(batch) >= 10_000:
            index.apply(batch, batch_size=20_000)
            batch = []
    final = chain.checkpoint()
    if final is not None:
        batch.append(StoredRecord(offset, final))
    index.apply(batch, batch_size=20_000)
    index.compact()
    return index, cache, sources, entries, time.perf_counter() - started


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
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-recompute-"))
    try:
        index, cache, sources, entries, build_s = build(root, a.n, a.group)
        print(f"built: {a.n} sources, {index.size} ledger entries in {build_s:.1f} s")
        step = max(1, round(100 / a.changed_pct))
        changed = [f"s{i:07d}" for i in range(0, a.n, step)]
        old = {d: DataRef.of(d, sources[d]) for d in changed}
        for d in changed:
            sources[d] = source_value(int(d[1:]), 1)

        started = time.perf_counter()
        affected: dict[bytes, Applied] = {}
        for d in changed:  # the change events of one batch: their downstream sets, merged
            for applied in index.downstream(old[d]).applications:
                affected.setdefault(applied.entry.entry_id, applied)
        plans = [
            plan_from_applications(
                index,
                sorted(affected.values(), key=lambda x: x.entry.seq),  # ledger order: inputs first
                cause_id="changes",
                cause=Cause("source_changed", f"{len(changed)} sources"),
                replace={old[d]: DataRef.of(d, sources[d]) for d in changed},
                created_at_ms=TS,
            )
        ]
        plan_s = time.perf_counter() - started
        selective, sel_run_s = run(Executor(registry, sources, cache=cache), plans)
        sel_s = plan_s + sel_run_s
        sel_tasks, sel_hits, _, sel_dead = summary(selective)

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
        full, full_run_s = run_all(Executor(registry, sources), full_plan)
        full_s = full_plan_s + full_run_s
        full_tasks, _, full_unchanged, full_dead = summary(full)

        replay, replay_s = run(Executor(registry, sources, cache=cache), plans)
        rep_tasks, rep_hits, _, _ = summary(replay)
        index.close()
        cache.close()

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
        print(
            f"cache hit rate: selective {sel_hits / max(1, sel_tasks):.3f}, "
            f"replay {rep_hits / max(1, rep_tasks):.3f} ({rep_tasks} tasks, {replay_s:.3f} s)"
        )
        print(f"recompute_time_ratio={sel_s / full_s:.4f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
