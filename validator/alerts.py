"""Alerts: what the Validator found, as Avro records on the alerts topic (`schemas/alert.avsc`).

An alert is framed like the provenance header (Avro single-object encoding, `streamprov.avro`), so
any Avro reader holding the schema file decodes it. It is keyed by DataID, so every alert about one
piece of data lands on one partition, in order.

The alert id is deterministic (SHA-256 over the record's coordinates and the kind, length-prefixed):
after a crash the Validator re-checks records whose alerts may already be out, and the repeats carry
the same id, so a consumer de-duplicates instead of acting twice.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, replace
from typing import Any

from streamprov import avro
from streamprov.agents.dead_letter import MAX_DEAD_LETTER_BYTES
from streamprov.config.models import Criticality  # one name per concept: the config's enum
from streamprov.errors import StreamprovError
from streamprov.merkle import length_prefixed

SCHEMA_NAME = "alert"
SCHEMA = avro.load_schema_json(SCHEMA_NAME)
PREFIX = avro.single_object_prefix(SCHEMA)
_READER = avro.without_logical_types(SCHEMA)
_V1_PREFIX = avro.single_object_prefix(
    {
        **SCHEMA,
        "fields": [
            {**f, "type": {**f["type"], "symbols": f["type"]["symbols"][:-1]}} if f["name"] == "kind" else f
            for f in SCHEMA["fields"]
        ],
    }
)
"""Alerts written before `bad_signature` was appended: same body (enum indexes are unchanged)."""


class AlertKind(enum.StrEnum):
    """What is wrong with a record; the values are the Avro enum's symbols (order is wire format)."""

    CHECKSUM_MISMATCH = "checksum_mismatch"
    """The value does not match the checksum in its header: corrupted, or the header was tampered with."""
    SOURCE_CHANGED = "source_changed"
    """The source record it derives from has a new version (its checksum differs from the header's)."""
    REDERIVATION_MISMATCH = "rederivation_mismatch"
    """Replaying the lineage on the source gives another value: a nondeterministic or faulty step."""
    STALE = "stale"
    """The record or its source is older than the topic allows."""
    MISSING_SOURCE = "missing_source"
    """No source record with the record's DataID exists (never produced, or deleted)."""
    MALFORMED = "malformed"
    """No provenance header, or one that does not decode; the record also goes to the dead-letter topic."""
    MISSING_FUNCTION = "missing_function"
    """Re-derivation needs a function the registry does not have."""
    BAD_SIGNATURE = "bad_signature"
    """The topic requires signed provenance and the `streamprov.sig` signature is missing or does not
    verify: a header re-computed without the pipeline's key (a forgery), or a tampered signature."""


_KINDS = tuple(AlertKind)


MAX_DATA_ID_BYTES = 1024
"""An alert's DataID (and key) is cut to this when the alert would not fit a record (`Alert.fitted`)."""
MAX_TEXT = 2000
"""Each evidence text is cut to this when the alert would not fit a record."""

_CRITICALITIES = tuple(Criticality)
"""The Avro enum's symbol order is the config enum's order (low..critical, its `rank`); a test checks it."""


class AlertError(StreamprovError):
    """Bytes that are not an alert of this schema."""


@dataclass(frozen=True, slots=True)
class Evidence:
    """Expected vs actual (as text) and how the finding was made."""

    expected: str
    actual: str
    reason: str


@dataclass(frozen=True, slots=True)
class Alert:
    """One finding about one consumed record."""

    alert_id: str
    kind: AlertKind
    data_id: str
    topic: str
    partition: int
    offset: int
    header: bytes | None
    evidence: Evidence
    criticality: Criticality
    detected_at_ms: int

    @classmethod
    def create(
        cls,
        kind: AlertKind,
        *,
        data_id: str,
        topic: str,
        partition: int,
        offset: int,
        header: bytes | None,
        evidence: Evidence,
        criticality: Criticality,
        detected_at_ms: int,
        aspect: str = "",
    ) -> Alert:
        """An alert whose id is derived from its coordinates, kind and `aspect` (see `alert_id`)."""
        return cls(
            alert_id(topic, partition, offset, kind, aspect),
            kind,
            data_id,
            topic,
            partition,
            offset,
            header,
            evidence,
            criticality,
            detected_at_ms,
        )

    @property
    def key(self) -> bytes:
        """The Kafka key of the alert record: its DataID."""
        return self.data_id.encode("utf-8")

    def encode(self) -> bytes:
        """Single-object encoding; written by hand (a few varints), checked against fastavro in tests."""
        e = self.evidence
        return b"".join(
            (
                PREFIX,
                _string(self.alert_id),
                avro.encode_long(_KINDS.index(self.kind)),
                _string(self.data_id),
                _string(self.topic),
                avro.encode_long(self.partition),
                avro.encode_long(self.offset),
                b"\x00" if self.header is None else b"\x02" + avro.encode_bytes(self.header),
                _string(e.expected),
                _string(e.actual),
                _string(e.reason),
                avro.encode_long(_CRITICALITIES.index(self.criticality)),
                avro.encode_long(self.detected_at_ms),
            )
        )

    @classmethod
    def decode(cls, raw: bytes) -> Alert:
        """Decode an alert; raises `AlertError` for anything that is not one of this schema."""
        if not isinstance(raw, bytes) or raw[: len(PREFIX)] not in (PREFIX, _V1_PREFIX):
            raise AlertError("not an alert of this schema version (marker or fingerprint differ)")
        try:
            r: Any = avro.schemaless_read(raw[len(PREFIX) :], _READER, _READER)
        except Exception as exc:  # untrusted bytes through fastavro: one typed error out
            raise AlertError(f"alert does not decode: {exc!r}") from exc
        ev = r["evidence"]
        return cls(
            r["alert_id"],
            AlertKind(r["kind"]),
            r["data_id"],
            r["topic"],
            r["partition"],
            r["offset"],
            r["header"],
            Evidence(ev["expected"], ev["actual"], ev["reason"]),
            Criticality(r["criticality"]),
            r["detected_at"],
        )

    def fitted(self, limit: int = MAX_DEAD_LETTER_BYTES) -> Alert:
        """This alert as a record that can always be stored (encoded, with its key, under `limit`).
        Why: an alert the broker refuses (MSG_SIZE_TOO_LARGE) can never be delivered, and the
        records after it would be checked again forever. A DataID over `MAX_DATA_ID_BYTES` is cut
        (it is also the key), then a header that still does not fit is left out; the reason says
        what was cut, and the record itself is at its coordinates."""
        if len(self.encode()) + len(self.key) <= limit:
            return self
        cuts: list[str] = []
        raw_id = self.data_id.encode("utf-8")
        data_id = self.data_id
        if len(raw_id) > MAX_DATA_ID_BYTES:
            data_id = raw_id[:MAX_DATA_ID_BYTES].decode("utf-8", "ignore")
            cuts.append(f"a DataID of {len(raw_id)} bytes cut to its first {MAX_DATA_ID_BYTES}")
        e = self.evidence
        evidence = Evidence(e.expected[:MAX_TEXT], e.actual[:MAX_TEXT], e.reason[:MAX_TEXT])
        out = replace(self, data_id=data_id, evidence=evidence)
        if self.header is not None and len(out.encode()) + len(out.key) > limit - 200:
            out = replace(out, header=None)
            cuts.append(f"the header ({len(self.header)} bytes) left out")
        where = f"{self.topic}/{self.partition}/{self.offset}"
        what = ", ".join(cuts) or "texts cut"
        reason = f"{evidence.reason} [alert cut to fit a record: {what}; the record is at {where}]"
        return replace(out, evidence=Evidence(evidence.expected, evidence.actual, reason))

    def describe(self) -> dict[str, Any]:
        """A plain, printable view."""
        return {
            "alert_id": self.alert_id,
            "kind": str(self.kind),
            "data_id": self.data_id,
            "at": f"{self.topic}/{self.partition}/{self.offset}",
            "expected": self.evidence.expected,
            "actual": self.evidence.actual,
            "reason": self.evidence.reason,
            "criticality": str(self.criticality),
            "detected_at_ms": self.detected_at_ms,
        }


def _string(text: str) -> bytes:
    return avro.encode_bytes(text.encode("utf-8"))


def alert_id(topic: str, partition: int, offset: int, kind: AlertKind | str, aspect: str = "") -> str:
    """SHA-256 (hex) over length-prefixed topic, partition, offset, kind and aspect.

    `aspect` tells apart two findings of one kind about one record (a stale record and a stale
    source are both `stale`); it is empty for every other kind.
    """
    parts = (topic, str(partition), str(offset), str(kind), aspect)
    return hashlib.sha256(length_prefixed(*(p.encode("utf-8") for p in parts))).hexdigest()


__all__ = [
    "MAX_DATA_ID_BYTES",
    "PREFIX",
    "SCHEMA",
    "Alert",
    "AlertError",
    "AlertKind",
    "Criticality",
    "Evidence",
    "alert_id",
]
