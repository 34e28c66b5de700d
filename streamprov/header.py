"""The provenance header: a frozen value with one way onto a Kafka record and one way off.

Wire format (docs/header-format.md): the value of the Kafka record header `streamprov` is Avro
single-object encoding of `schemas/provenance_header.avsc`. The per-record fields come first and are
read by hand (a few slices and varints); the lineage, shared by every record of a stage, is decoded
through a memo. Unknown fingerprints and any malformed byte string raise `HeaderError` subclasses and
nothing else.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import crc32c as _crc32c

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute
from streamprov.errors import HeaderError, MalformedHeaderError, UnknownSchemaError
from streamprov.lineage import Lineage, decode_lineage, encode_lineage, step_from_avro

HEADER_KEY = "streamprov"
"""Kafka record header key carrying the provenance header."""

SCHEMA_NAME = "provenance_header"
CURRENT_SCHEMA = avro.load_schema_json(SCHEMA_NAME)
PREFIX = avro.single_object_prefix(CURRENT_SCHEMA)
_PREFIX_LEN = len(PREFIX)
_ALGORITHMS = tuple(ChecksumAlgorithm)
_crc: Callable[[bytes], int] = _crc32c.crc32c


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_checksum(c: Checksum) -> bytes:
    return avro.encode_long(c.algorithm) + avro.encode_bytes(c.value)


@dataclass(frozen=True, slots=True)
class ProvenanceHeader:
    """DataID, Lineage, Timestamp and Checksum of one record, plus its source's checksum."""

    data_id: str
    checksum: Checksum
    source_checksum: Checksum
    timestamp_ms: int
    lineage: Lineage = ()

    @classmethod
    def for_source(
        cls,
        data_id: str,
        value: bytes,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        timestamp_ms: int | None = None,
    ) -> ProvenanceHeader:
        """Header of an original record: empty lineage, the source checksum is its own checksum."""
        checksum = compute(algorithm, value)
        ts = now_ms() if timestamp_ms is None else timestamp_ms
        return cls(data_id, checksum, checksum, ts, ())

    @property
    def is_source(self) -> bool:
        return not self.lineage

    def encode(self) -> bytes:
        return b"".join(
            (
                PREFIX,
                encode_checksum(self.checksum),
                encode_checksum(self.source_checksum),
                avro.encode_long(self.timestamp_ms),
                avro.encode_bytes(self.data_id.encode("utf-8")),
                encode_lineage(self.lineage),
            )
        )

    @classmethod
    def decode(cls, raw: bytes) -> ProvenanceHeader:
        """Decode header bytes; raises only `HeaderError` subclasses, whatever the input."""
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise MalformedHeaderError(f"header value must be bytes, not {type(raw).__name__}")
        raw = bytes(raw)
        if raw[:_PREFIX_LEN] == PREFIX:
            return _decode_current(raw)
        return _decode_other_version(raw)

    def to_headers(self) -> list[tuple[str, bytes]]:
        return [(HEADER_KEY, self.encode())]

    @classmethod
    def from_headers(cls, headers: HeadersLike) -> ProvenanceHeader | None:
        """The header among a record's Kafka headers; None when the record carries none."""
        raw = find_raw(headers)
        return None if raw is None else cls.decode(raw)

    def describe(self) -> dict[str, Any]:
        """A plain, printable view (hex digests, step descriptions)."""
        return {
            "data_id": self.data_id,
            "timestamp_ms": self.timestamp_ms,
            "checksum": self.checksum.hex(),
            "source_checksum": self.source_checksum.hex(),
            "lineage": [s.describe() for s in self.lineage],
        }


HeadersLike = Sequence[tuple[str, bytes | str | None]] | Mapping[str, bytes | str | None] | None
"""Kafka record headers as clients hand them out (confluent-kafka: a list of pairs; a dict too)."""


def find_raw(headers: HeadersLike) -> bytes | None:
    """The raw provenance header among a record's headers; None when the record carries none.

    Raises `MalformedHeaderError` when the header is present but empty, null or not bytes, more than
    once, or when `headers` itself is not a list of (key, value) pairs or a mapping.
    """
    if not headers:
        return None
    matches: list[Any] = []
    try:
        if isinstance(headers, Mapping):
            if HEADER_KEY not in headers:
                return None
            value = headers[HEADER_KEY]
        else:
            matches = [found for key, found in headers if key == HEADER_KEY]
            if not matches:
                return None
            value = matches[0]
    except (TypeError, ValueError) as exc:
        raise MalformedHeaderError(f"record headers are not (key, value) pairs: {exc}") from exc
    if len(matches) > 1:  # readers that take the last one would see another provenance than we check
        raise MalformedHeaderError(
            f"header {HEADER_KEY!r} appears {len(matches)} times: which one is the record's provenance "
            "is ambiguous",
            b"",
        )
    if not value:
        raise MalformedHeaderError(f"header {HEADER_KEY!r} is present but empty", b"")
    if type(value) is bytes:
        return value
    if not isinstance(value, bytearray | memoryview):  # other clients hand out these
        raise MalformedHeaderError(f"header {HEADER_KEY!r} must be bytes, not {type(value).__name__}")
    return bytes(value)


def _digest_len(raw: bytes, pos: int) -> int:
    """Digest length of the Checksum encoded at `pos` (its algorithm index and length bytes)."""
    index, length = raw[pos], raw[pos + 1]
    if index == 0 and length == 8:  # CRC32C, 4 bytes (zig-zag 4 = 8)
        return 4
    if index == 2 and length == 64:  # SHA256 (index 1 = 2), 32 bytes
        return 32
    raise MalformedHeaderError(
        f"bad checksum encoding at byte {pos}: algorithm {index}, length byte {length}", raw
    )


def scan(raw: bytes) -> tuple[int, int, int, int]:
    """Locate the per-record fields of a current-version header without building any object.

    Returns (source_start, source_end, id_start, lineage_at): the checksum occupies
    raw[PREFIX_LEN:source_start], the source checksum raw[source_start:source_end], the timestamp
    sits between source_end and id_start (the DataID's length varint starts at id_start), and the
    lineage is raw[lineage_at:]. Validates as it goes; this is the per-message hot path.
    """
    if raw[:_PREFIX_LEN] != PREFIX:
        raise UnknownSchemaError("header is not the current provenance schema", raw)
    try:
        source_start = _PREFIX_LEN + 2 + _digest_len(raw, _PREFIX_LEN)
        source_end = source_start + 2 + _digest_len(raw, source_start)
        pos = source_end
        limit = pos + 9
        while raw[pos] & 0x80:
            pos += 1
            if pos > limit:
                raise MalformedHeaderError("timestamp varint longer than 10 bytes", raw)
        if pos == limit and raw[pos] > 1:  # the 10th byte holds only bit 63 (as `avro.read_long`)
            raise MalformedHeaderError("timestamp varint overflows a 64-bit long", raw)
        id_start = pos + 1
        first = raw[id_start]
        if first < 0x80 and not first & 1:  # the common case: a short DataID, one-byte length
            id_end = id_start + 1 + (first >> 1)
            if id_end > len(raw):
                raise MalformedHeaderError("DataID runs past the end of the header", raw)
            raw[id_start + 1 : id_end].decode("utf-8")
        else:  # a long DataID (64 bytes or more): a multi-byte length varint, not part of the text
            data_id, id_end = avro.read_bytes(raw, id_start)
            data_id.decode("utf-8")
        return source_start, source_end, id_start, id_end
    except IndexError as exc:
        raise MalformedHeaderError("header is truncated", raw) from exc
    except UnicodeDecodeError as exc:
        raise MalformedHeaderError(f"DataID is not UTF-8: {exc}", raw) from exc


_CRC_HEAD = PREFIX + avro.encode_long(ChecksumAlgorithm.CRC32C) + avro.encode_long(4)
# One C call reads the prefix, the CRC32C tag and the digest (as an int, no slice): the fast path.
_unpack_crc_head = struct.Struct(f">{len(_CRC_HEAD)}sI").unpack_from


def verify_value(raw: bytes, value: bytes) -> bool:
    """Does `value` match the checksum in current-version header `raw`? The validator's hot check.

    Raises `UnknownSchemaError` for another schema version and `MalformedHeaderError` for a bad or
    truncated checksum encoding; only the prefix and the checksum are read.
    """
    expected: int
    try:
        head, expected = _unpack_crc_head(raw)
    except (struct.error, TypeError):  # shorter than a CRC32C checksum, or not bytes: the slow path
        pass
    else:
        if head == _CRC_HEAD:
            return _crc(value) == expected
    if raw[:_PREFIX_LEN] != PREFIX:
        raise UnknownSchemaError("header is not the current provenance schema", raw)
    try:
        n = _digest_len(raw, _PREFIX_LEN)
    except IndexError as exc:
        raise MalformedHeaderError("header is truncated", raw) from exc
    expected_digest = raw[_PREFIX_LEN + 2 : _PREFIX_LEN + 2 + n]
    if len(expected_digest) != n:
        raise MalformedHeaderError("header is truncated inside its checksum", raw)
    if n == 4:
        return _crc(value).to_bytes(4, "big") == expected_digest
    return hashlib.sha256(value).digest() == expected_digest


def _checksum_at(raw: bytes, start: int, end: int) -> Checksum:
    return Checksum(_ALGORITHMS[raw[start] >> 1], raw[start + 2 : end])


class RecordFields(NamedTuple):
    """The per-record fields of a header; the lineage (shared by a whole stage) is left encoded."""

    data_id: str
    timestamp_ms: int
    checksum: Checksum
    source_checksum: Checksum


def record_fields(raw: bytes) -> RecordFields:
    """DataID, timestamp, checksum and source checksum of a header, without decoding its lineage.

    A current-version header is read with `scan` (a few slices and varints); an older one is decoded
    in full. Raises only `HeaderError` subclasses.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MalformedHeaderError(f"header value must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    if raw[:_PREFIX_LEN] != PREFIX:
        h = _decode_other_version(raw)
        return RecordFields(h.data_id, h.timestamp_ms, h.checksum, h.source_checksum)
    return _current_fields(raw, *scan(raw))


def _current_fields(
    raw: bytes, source_start: int, source_end: int, id_start: int, lineage_at: int
) -> RecordFields:
    timestamp_ms, _ = avro.read_long(raw, source_end)
    _, data_at = avro.read_long(raw, id_start)
    return RecordFields(
        raw[data_at:lineage_at].decode("utf-8"),
        timestamp_ms,
        _checksum_at(raw, _PREFIX_LEN, source_start),
        _checksum_at(raw, source_start, source_end),
    )


def _decode_current(raw: bytes) -> ProvenanceHeader:
    spans = scan(raw)
    fields = _current_fields(raw, *spans)
    return ProvenanceHeader(
        fields.data_id,
        fields.checksum,
        fields.source_checksum,
        fields.timestamp_ms,
        decode_lineage(raw[spans[3] :]),
    )


def _history() -> dict[bytes, Any]:
    known: dict[bytes, Any] = {}
    for name in avro.history_names():
        schema = avro.load_schema_json(name, history=True)
        known[avro.fingerprint_bytes(schema)] = avro.without_logical_types(schema)
    return known


_OLDER_VERSIONS: dict[bytes, Any] = _history()
# Older versions are read with logical types off: the timestamp comes back as the exact long written.
_READER_SCHEMA = avro.without_logical_types(CURRENT_SCHEMA)


def register_older_version(schema: dict[str, Any]) -> None:
    """Accept headers written with an older schema (schema resolution maps them onto the current)."""
    _OLDER_VERSIONS[avro.fingerprint_bytes(schema)] = avro.without_logical_types(schema)


def _decode_other_version(raw: bytes) -> ProvenanceHeader:
    if raw[:2] != avro.SINGLE_OBJECT_MARKER or len(raw) < _PREFIX_LEN:
        raise MalformedHeaderError(
            "not an Avro single-object encoded provenance header (bad marker or too short)", raw
        )
    fp = raw[2:_PREFIX_LEN]
    writer = _OLDER_VERSIONS.get(fp)
    if writer is None:
        raise UnknownSchemaError(
            f"unknown provenance schema fingerprint {fp.hex()}: written by a newer or foreign "
            "writer; upgrade streamprov or add the schema to schemas/history/",
            raw,
        )
    try:
        record = avro.schemaless_read(raw[_PREFIX_LEN:], writer, _READER_SCHEMA)
        return _from_record(record)
    except HeaderError:
        raise
    except Exception as exc:  # untrusted bytes through fastavro: one typed error out
        raise MalformedHeaderError(f"older-version header does not decode: {exc!r}", raw) from exc


_DIGEST_SIZES = {ChecksumAlgorithm.CRC32C: 4, ChecksumAlgorithm.SHA256: 32}


def _from_record(record: dict[str, Any]) -> ProvenanceHeader:
    def checksum(r: dict[str, Any]) -> Checksum:
        algorithm = ChecksumAlgorithm[r["algorithm"]]
        if len(r["value"]) != _DIGEST_SIZES[algorithm]:
            raise MalformedHeaderError(
                f"{algorithm.name} checksum of {len(r['value'])} bytes (expected {_DIGEST_SIZES[algorithm]})"
            )
        return Checksum(algorithm, r["value"])

    return ProvenanceHeader(
        record["data_id"],
        checksum(record["checksum"]),
        checksum(record["source_checksum"]),
        record["timestamp"],
        tuple(step_from_avro(s) for s in record["lineage"]),
    )


def headers_without(
    headers: Iterable[tuple[str, bytes | None]] | None, key: str = HEADER_KEY
) -> list[tuple[str, bytes | None]]:
    """A record's other headers, to carry through a step unchanged."""
    return [(k, v) for k, v in (headers or ()) if k != key]
