"""The functions a Recompute Manager replays after `enrich` got a new version (version 2).

`tag` and `sum_n` are the very functions the pipeline ran (`processor_fns`, same code hashes), so a
function check finds exactly one change: `enrich` 1 -> 2. Version 2 adds 1000 to `n` (so the tags and
the per-group sums change too) and takes `DELAY_S` per record, so a plan over a few hundred tasks runs
long enough for a test to kill the manager in the middle of it. A subprocess names the registry as
`recompute_fns:registry` (with this folder on PYTHONPATH).
"""

from __future__ import annotations

import time
from typing import Any

import processor_fns

from streamprov.registry import FunctionRegistry, RegisteredFunction

DELAY_S = 0.025

registry = FunctionRegistry()


def _same(fn: RegisteredFunction) -> RegisteredFunction:
    return registry.add(
        fn.func, fn.function_id, fn.version, kind=fn.kind, params=fn.default_params, initial=fn.initial
    )


tag = _same(processor_fns.tag)
sum_n = _same(processor_fns.sum_n)


@registry.map("enrich", "2", factor=3)
def enrich(value: dict[str, Any], factor: int, delay_ms: float = 0) -> dict[str, Any]:
    """Version 2 of processor_fns.enrich: n is offset by 1000 (what version 1 got wrong), slowly."""
    time.sleep(DELAY_S + delay_ms / 1000.0)
    if value["n"] < 0:
        raise ValueError(f"negative n: {value['n']}")
    n = value["n"] + 1000
    return {**value, "n": n, "scaled": n * factor}
