"""Planning one consumed batch of change events: one ledger traversal (`ChangeBatch`) vs one per event.

The Recompute Manager's planner stage needs, for a batch of change events, each event's own plan
size (what its topic's policy judges) and the plan of the events that run. Planned the straight way,
that is a traversal per event (`plan_for_change`) and one more for them together
(`plan_for_changes`); `ChangeBatch` traverses once and derives the counts (and any subset's plan)
from it. Same ledger as bench_recompute.py (N sources -> enrich -> tag, enrich outputs summed in
groups of --group), batches of 10, 100 and 500 changed sources spread over the groups. Each run
checks that both give the same counts and the same plan. Prints per batch size both times and
`batch_planning_ratio=<ChangeBatch / per event>` (lower is better).

Usage: python bench/bench_batch_planning.py [--n N] [--group G]
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_recompute import TS, build, make_registry, source_value

from recompute_manager.planner import ChangeBatch, plan_for_change, plan_for_changes
from streamprov.changes.event import EMPTY_IMPACT, ChangeEvent, ChangeKind, SourceChange
from streamprov.ledger import DataRef


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="source records")
    ap.add_argument("--group", type=int, default=100, help="sources per reduce group (0: no reduce)")
    a = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-batch-planning-"))
    try:
        index, cache, sources, _headers, _entries, build_s = build(make_registry(True), root, a.n, a.group)
        print(f"built: {a.n} sources, {index.size} ledger entries in {build_s:.1f} s")
        gc.collect()
        gc.freeze()  # the set-up's objects out of the cyclic GC's way, for both variants
        ratios = []
        for size in (10, 100, 500):
            changed = [f"s{i:07d}" for i in range(0, a.n, max(1, a.n // size))][:size]
            events = [
                ChangeEvent.for_source(
                    ChangeKind.SOURCE_CHANGED,
                    SourceChange(
                        "bench-sources",
                        0,
                        i,
                        d,
                        DataRef.of(d, sources[d]).checksum,
                        DataRef.of(d, source_value(int(d[1:]), 1)).checksum,
                    ),
                    EMPTY_IMPACT,
                    TS,
                )
                for i, d in enumerate(changed)
            ]
            started = time.perf_counter()
            alone = [len(plan_for_change(index, e, created_at_ms=TS)) for e in events]
            together = plan_for_changes(index, events, created_at_ms=TS)
            per_event_s = time.perf_counter() - started
            started = time.perf_counter()
            batch = ChangeBatch.of(index, events, created_at_ms=TS)
            counts, plan = batch.own_tasks(), batch.plan()
            batch_s = time.perf_counter() - started
            if list(counts) != alone or plan != together:
                print(f"MISMATCH at {size} events: the two ways disagree")
                return 1
            ratios.append(batch_s / per_event_s)
            print(
                f"{size} events ({len(plan)} tasks together): per event + together {per_event_s:.3f} s, "
                f"ChangeBatch {batch_s:.3f} s, ratio {ratios[-1]:.3f}"
            )
        index.close()
        cache.close()
        print(f"batch_planning_ratio={max(ratios):.3f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
