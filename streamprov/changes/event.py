"""Change events: what changed, and which outputs derive from it (`schemas/change_event.avsc`).

Framed like the provenance header and alerts (Avro single-object encoding, `streamprov.avro`), so any
Avro reader holding the schema file decodes them. A source change is keyed by its DataID and a
function change by the function id, so events about one thing stay in order on one partition.

The change id is deterministic (SHA-256 over length-prefixed parts): a detector that sees the same
change again (a restart before it committed) emits the same id, and consumers de-duplicate on it.
"""

from __future__ import annotations

import enum
import hashlib
import io
from dataclasses import dataclass
from typing import Any

import fastavro

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.errors import StreamprovError
from streamprov.ledger.model import DataRef
from streamprov.ledger.queries import DownstreamResult
from streamprov.merkle import length_prefixed

SCHEMA_NAME = "change_event"
SCHEMA = avro.load_schema_json(SCHEMA_NAME)
PREFIX = avro.single_object_prefix(SCHEMA)
_PARSED = fastavro.parse_schema(avro.without_logical_types(SCHEMA))
_READER = avro.without_logical_types(SCHEMA)

DEFAULT_MAX_OUTPUTS = 1000
"""Impacted outputs carried in one event; the rest are counted (`Impact.total`, `truncated`)."""


class ChangeEventError(StreamprovError):
    """Bytes that are not a change event of this schema."""


class ChangeKind(enum.StrEnum):
    """The values are the Avro enum's symbols (order is wire format; only ever appended)."""

    SOURCE_CHANGED = "source_changed"
    """A source record has a new version: same DataID, different checksum."""
    SOURCE_DELETED = "source_deleted"
    """A source record was deleted (a tombstone on the compacted source topic)."""
    FUNCTION_CHANGED = "function_changed"
    """A registered function's version or code differs from what the ledger recorded applications of."""


@dataclass(frozen=True, slots=True)
class SourceChange:
    topic: str
    partition: int
    offset: int
    data_id: str
    previous: Checksum
    current: Checksum | None
    ledger_entry_id: bytes | None = None

    @property
    def previous_node(self) -> DataRef:
        return DataRef(self.data_id, self.previous)

    @property
    def current_node(self) -> DataRef | None:
        return None if self.current is None else DataRef(self.data_id, self.current)


@dataclass(frozen=True, slots=True)
class FunctionChange:
    function_id: str
    previous_version: str
    previous_code_hash: bytes
    current_version: str
    current_code_hash: bytes


@dataclass(frozen=True, slots=True)
class ImpactedOutput:
    """An output derived from what changed, and the application that produced it."""

    node: DataRef
    entry_id: bytes
    function_id: str
    function_version: str
    depth: int


@dataclass(frozen=True, slots=True)
class Impact:
    """The first outputs of the impact set in dependency order, and how many there are in all."""

    outputs: tuple[ImpactedOutput, ...]
    total: int
    truncated: bool
    complete: bool
    ledger_size: int

    @classmethod
    def of(cls, result: DownstreamResult, *, max_outputs: int, ledger_size: int) -> Impact:
        """From a downstream query: each output once (its first producing application), in order."""
        seen: dict[DataRef, ImpactedOutput] = {}
        for applied in result.applications:
            app = applied.entry.application
            if app.output not in seen:
                seen[app.output] = ImpactedOutput(
                    app.output, applied.entry.entry_id, app.function_id, app.function_version, applied.depth
                )
        outputs = tuple(seen.values())
        return cls(
            outputs[:max_outputs], len(outputs), len(outputs) > max_outputs, not result.truncated, ledger_size
        )

    @property
    def nodes(self) -> tuple[DataRef, ...]:
        return tuple(o.node for o in self.outputs)


EMPTY_IMPACT = Impact((), 0, False, True, 0)


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    change_id: str
    kind: ChangeKind
    detected_at_ms: int
    impact: Impact
    source: SourceChange | None = None
    function: FunctionChange | None = None

    @classmethod
    def for_source(
        cls, kind: ChangeKind, source: SourceChange, impact: Impact, detected_at_ms: int
    ) -> ChangeEvent:
        current = b"" if source.current is None else _checksum_bytes(source.current)
        parts = (kind.value.encode(), source.topic.encode(), source.data_id.encode())
        cid = change_id(*parts, _checksum_bytes(source.previous), current)
        return cls(cid, kind, detected_at_ms, impact, source=source)

    @classmethod
    def for_function(cls, function: FunctionChange, impact: Impact, detected_at_ms: int) -> ChangeEvent:
        f = function
        cid = change_id(
            ChangeKind.FUNCTION_CHANGED.value.encode(),
            f.function_id.encode(),
            f.previous_version.encode(),
            f.previous_code_hash,
            f.current_version.encode(),
            f.current_code_hash,
        )
        return cls(cid, ChangeKind.FUNCTION_CHANGED, detected_at_ms, impact, function=function)

    @property
    def key(self) -> bytes:
        """Kafka key: the DataID of a source change, the function id of a function change."""
        if self.source is not None:
            return self.source.data_id.encode("utf-8")
        assert self.function is not None
        return self.function.function_id.encode("utf-8")

    # -- bytes ----------------------------------------------------------------------------------------
    def to_record(self) -> dict[str, Any]:
        src = self.source
        fn = self.function
        return {
            "change_id": self.change_id,
            "kind": self.kind.value,
            "detected_at": self.detected_at_ms,
            "source": None
            if src is None
            else {
                "topic": src.topic,
                "partition": src.partition,
                "offset": src.offset,
                "data_id": src.data_id,
                "previous": _checksum_record(src.previous),
                "current": None if src.current is None else _checksum_record(src.current),
                "ledger_entry_id": src.ledger_entry_id,
            },
            "function": None
            if fn is None
            else {
                "function_id": fn.function_id,
                "previous_version": fn.previous_version,
                "previous_code_hash": fn.previous_code_hash,
                "current_version": fn.current_version,
                "current_code_hash": fn.current_code_hash,
            },
            "impact": {
                "outputs": [
                    {
                        "data_id": o.node.data_id,
                        "checksum": _checksum_record(o.node.checksum),
                        "entry_id": o.entry_id,
                        "function_id": o.function_id,
                        "function_version": o.function_version,
                        "depth": o.depth,
                    }
                    for o in self.impact.outputs
                ],
                "total": self.impact.total,
                "truncated": self.impact.truncated,
                "complete": self.impact.complete,
                "ledger_size": self.impact.ledger_size,
            },
        }

    def encode(self) -> bytes:
        buf = io.BytesIO()
        buf.write(PREFIX)
        fastavro.schemaless_writer(buf, _PARSED, self.to_record())
        return buf.getvalue()

    @classmethod
    def decode(cls, raw: bytes) -> ChangeEvent:
        """Decode an event; raises `ChangeEventError` for anything that is not one of this schema."""
        if not isinstance(raw, bytes) or raw[: len(PREFIX)] != PREFIX:
            raise ChangeEventError("not a change event of this schema version (marker or fingerprint differ)")
        try:
            r: Any = avro.schemaless_read(raw[len(PREFIX) :], _READER, _READER)
        except Exception as exc:  # untrusted bytes through fastavro: one typed error out
            raise ChangeEventError(f"change event does not decode: {exc!r}") from exc
        s, f, i = r["source"], r["function"], r["impact"]
        return cls(
            r["change_id"],
            ChangeKind(r["kind"]),
            r["detected_at"],
            Impact(
                tuple(
                    ImpactedOutput(
                        DataRef(o["data_id"], _checksum(o["checksum"])),
                        o["entry_id"],
                        o["function_id"],
                        o["function_version"],
                        o["depth"],
                    )
                    for o in i["outputs"]
                ),
                i["total"],
                i["truncated"],
                i["complete"],
                i["ledger_size"],
            ),
            None
            if s is None
            else SourceChange(
                s["topic"],
                s["partition"],
                s["offset"],
                s["data_id"],
                _checksum(s["previous"]),
                None if s["current"] is None else _checksum(s["current"]),
                s["ledger_entry_id"],
            ),
            None
            if f is None
            else FunctionChange(
                f["function_id"],
                f["previous_version"],
                f["previous_code_hash"],
                f["current_version"],
                f["current_code_hash"],
            ),
        )

    def describe(self) -> dict[str, Any]:
        """A plain, printable view."""
        out: dict[str, Any] = {"change_id": self.change_id, "kind": self.kind.value}
        if self.source is not None:
            s = self.source
            out["source"] = {
                "at": f"{s.topic}/{s.partition}/{s.offset}",
                "data_id": s.data_id,
                "previous": s.previous.hex(),
                "current": None if s.current is None else s.current.hex(),
            }
        if self.function is not None:
            f = self.function
            out["function"] = {
                "function_id": f.function_id,
                "previous": f"{f.previous_version}#{f.previous_code_hash.hex()}",
                "current": f"{f.current_version}#{f.current_code_hash.hex()}",
            }
        out["impact"] = {
            "outputs": [o.node.describe() for o in self.impact.outputs],
            "total": self.impact.total,
            "truncated": self.impact.truncated,
            "complete": self.impact.complete,
        }
        out["detected_at_ms"] = self.detected_at_ms
        return out


def change_id(*parts: bytes) -> str:
    return hashlib.sha256(length_prefixed(*parts)).hexdigest()


def _checksum_bytes(c: Checksum) -> bytes:
    return bytes((c.algorithm,)) + c.value


def _checksum_record(c: Checksum) -> dict[str, Any]:
    return {"algorithm": c.algorithm.name, "value": c.value}


def _checksum(r: dict[str, Any]) -> Checksum:
    return Checksum(ChecksumAlgorithm[r["algorithm"]], r["value"])
