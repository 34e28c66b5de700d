"""Lineage: the ordered map/reduce Steps a record went through since its source.

Lineages repeat: every record of a pipeline stage shares one. So a lineage is an immutable tuple of
Steps, and its Avro encoding is memoised in both directions (bytes -> Steps, Steps -> bytes): a stage
never decodes or encodes the same lineage twice.
"""

from __future__ import annotations

import enum
import functools
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fastavro
from fastavro.schema import parse_schema

from streamprov.avro import load_schema_json
from streamprov.errors import MalformedHeaderError

LINEAGE_CACHE_SIZE = 4096


class StepKind(enum.IntEnum):
    """Numbered as the symbols of the Avro enum `StepKind`."""

    MAP = 0
    REDUCE = 1


@dataclass(frozen=True, slots=True)
class InputDigest:
    """What a reduce step consumed, in constant size: count and Merkle root of (DataID, checksum)."""

    count: int
    merkle_root: bytes
    window_start: int | None = None
    window_end: int | None = None


@dataclass(frozen=True, slots=True)
class Step:
    """One function application: which function, which exact code, with which parameters."""

    kind: StepKind
    function_id: str
    function_version: str
    code_hash: bytes
    parameters: tuple[tuple[str, str], ...] = ()
    inputs: InputDigest | None = None

    @classmethod
    def create(
        cls,
        kind: StepKind,
        function_id: str,
        function_version: str,
        code_hash: bytes,
        params: Mapping[str, Any] | None = None,
        inputs: InputDigest | None = None,
    ) -> Step:
        """Build a Step from plain parameter values (stored as canonical JSON, sorted by name)."""
        encoded = tuple(sorted((k, canonical_json(v)) for k, v in (params or {}).items()))
        return cls(kind, function_id, function_version, code_hash, encoded, inputs)

    @property
    def params(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.parameters}

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.parameters)
        text = f"{self.kind.name.lower()} {self.function_id}@{self.function_version}({args})"
        if self.inputs is not None:
            text += f" <- {self.inputs.count} inputs, merkle {self.inputs.merkle_root.hex()[:12]}"
            if self.inputs.window_start is not None:
                text += f", window [{self.inputs.window_start}, {self.inputs.window_end})"
        return text


Lineage = tuple[Step, ...]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _lineage_schema() -> Any:
    header = load_schema_json("provenance_header")
    (field,) = [f for f in header["fields"] if f["name"] == "lineage"]
    return parse_schema(field["type"])


_SCHEMA = _lineage_schema()


def _step_to_avro(step: Step) -> dict[str, Any]:
    inputs = None
    if step.inputs is not None:
        inputs = {
            "count": step.inputs.count,
            "merkle_root": step.inputs.merkle_root,
            "window_start": step.inputs.window_start,
            "window_end": step.inputs.window_end,
        }
    return {
        "kind": step.kind.name,
        "function_id": step.function_id,
        "function_version": step.function_version,
        "code_hash": step.code_hash,
        "parameters": dict(step.parameters),
        "inputs": inputs,
    }


def step_from_avro(record: Mapping[str, Any]) -> Step:
    raw_inputs = record.get("inputs")
    inputs = None
    if raw_inputs is not None:
        inputs = InputDigest(
            raw_inputs["count"],
            raw_inputs["merkle_root"],
            raw_inputs.get("window_start"),
            raw_inputs.get("window_end"),
        )
    return Step(
        StepKind[record["kind"]],
        record["function_id"],
        record["function_version"],
        record["code_hash"],
        tuple(sorted(record["parameters"].items())),
        inputs,
    )


@functools.lru_cache(maxsize=LINEAGE_CACHE_SIZE)
def encode_lineage(lineage: Lineage) -> bytes:
    """Avro encoding of the lineage array (one block), memoised."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _SCHEMA, [_step_to_avro(s) for s in lineage])
    return buf.getvalue()


@functools.lru_cache(maxsize=LINEAGE_CACHE_SIZE)
def decode_lineage(raw: bytes) -> Lineage:
    """Decode the lineage array that must fill `raw` exactly, memoised by the raw bytes."""
    buf = io.BytesIO(raw)
    try:
        records: Any = fastavro.schemaless_reader(buf, _SCHEMA, None)
        lineage = tuple(step_from_avro(r) for r in records)
    except Exception as exc:  # fastavro raises many types on hostile bytes; one typed error out
        raise MalformedHeaderError(f"lineage is not valid Avro: {exc!r}", raw) from exc
    if buf.tell() != len(raw):
        raise MalformedHeaderError(f"{len(raw) - buf.tell()} trailing bytes after the lineage", raw)
    return lineage


@functools.lru_cache(maxsize=LINEAGE_CACHE_SIZE)
def extend_encoded(raw: bytes, step: Step) -> bytes:
    """Encoded lineage `raw` with `step` appended: the per-message work of a map stage, memoised."""
    return encode_lineage((*decode_lineage(raw), step))


def common_prefix(lineages: list[Lineage]) -> Lineage:
    """Longest run of leading Steps every lineage shares: what a reduce's inputs have in common."""
    if not lineages:
        return ()
    first = lineages[0]
    n = len(first)
    for other in lineages[1:]:
        n = min(n, len(other))
        for i in range(n):
            if other[i] != first[i]:
                n = i
                break
    return first[:n]
