"""Registered functions the processor tests run, in-process and in a subprocess.

A subprocess names them as `processor_fns:<name>` (with this folder on PYTHONPATH). `enrich` takes
a `delay_ms` parameter that slows it down per record, so a test can kill a processor mid-stream or
start a second group member while the first is busy.
"""

from __future__ import annotations

import time
from typing import Any

from streamprov.registry import FunctionRegistry

registry = FunctionRegistry()


@registry.map("enrich", "1", factor=3)
def enrich(value: dict[str, Any], factor: int, delay_ms: float = 0) -> dict[str, Any]:
    """Map step 1: raises for negative numbers (a processing error to dead-letter)."""
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    if value["n"] < 0:
        raise ValueError(f"negative n: {value['n']}")
    return {**value, "scaled": value["n"] * factor}


@registry.map("tag", "1")
def tag(value: dict[str, Any], label: str = "tagged") -> dict[str, Any]:
    """Map step 2, chained after enrich."""
    return {**value, "label": label}


@registry.reduce("sum_n", "1", initial=int)
def sum_n(total: int, value: dict[str, Any], delay_ms: float = 0) -> int:
    """Per-key, per-window sum of n."""
    if delay_ms:
        time.sleep(delay_ms / 1000.0)
    if value["n"] < 0:
        raise ValueError(f"negative n: {value['n']}")
    return total + int(value["n"])


def _unsum(total: int, value: dict[str, Any]) -> int:
    """`sum_inv`'s inverse: the total without `value`."""
    return total - int(value["n"])


@registry.reduce("sum_inv", "1", initial=int, inverse=_unsum)
def sum_inv(total: int, value: dict[str, Any]) -> int:
    """`sum_n` registered with its inverse: the Recompute Manager recomputes it from its previous
    output (a delta: only the changed inputs are read)."""
    return total + int(value["n"])
