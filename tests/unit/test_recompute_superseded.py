"""Two changes under one reduce, planned apart: the second plan reads the first one's corrected
intermediate (the cache's superseded versions), so the final sum counts both changes."""

from __future__ import annotations

from pathlib import Path

from ledger_support import LEDGER, build
from test_recompute_cache_executor import app, change, ref, registry

from recompute_manager.cache import ResultCache
from recompute_manager.executor import Executor
from recompute_manager.planner import plan_for_change
from streamprov.header import ProvenanceHeader
from streamprov.ledger import Application, DataRef, LedgerIndex


def test_second_plan_reads_the_first_plans_correction(tmp_path: Path) -> None:
    reg = registry()
    a2, b2 = ref("a2", 2), ref("b2", 4)
    apps = [
        Application.of_source(ref("a", 1), timestamp_ms=1),
        Application.of_source(ref("b", 2), timestamp_ms=1),
        app(reg, "double", [ref("a", 1)], a2),
        app(reg, "double", [ref("b", 2)], b2),
        app(reg, "total", [a2, b2], ref("ab", 6)),
    ]
    with LedgerIndex(tmp_path / "idx", LEDGER) as idx, ResultCache(tmp_path / "cache") as cache:
        idx.catch_up(build(apps))
        cache.put_value(a2, b"2")
        cache.put_value(b2, b"4")
        sources = {"a": b"10", "b": b"2"}
        first = Executor(reg, sources, cache=cache).run_plan(plan_for_change(idx, change("a", 1, 10)))
        assert [r.value for r in first.changed] == [b"20", b"24"]  # 2*10 + 4 (b2 read from the store)
        assert cache.latest(a2) == DataRef.of("a2", b"20")
        assert cache.latest(DataRef.of("a2", b"20")) == DataRef.of("a2", b"20")

        sources["b"] = b"30"
        second = Executor(reg, sources, cache=cache).run_plan(plan_for_change(idx, change("b", 2, 30)))
        assert [r.value for r in second.changed] == [b"60", b"80"]  # 20 (a2 as corrected) + 60
        total = second.changed[-1]
        header = ProvenanceHeader.decode(total.header)
        assert header.lineage[-1].function_id == "total"
        assert cache.latest(ref("ab", 6)) == DataRef.of("ab", b"80")  # ab: 6 -> 24 -> 80
