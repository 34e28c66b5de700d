"""The wire contract's Avro side: schema files, fingerprints, single-object framing, and primitives.

Schemas live in the top-level `schemas/` folder (shipped inside the package), so any Avro reader holding
those files decodes what we write. Superseded versions stay in `schemas/history/` and remain readable.
"""

from __future__ import annotations

import functools
import io
import json
from importlib import resources
from typing import Any

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form

from streamprov.errors import MalformedHeaderError

SINGLE_OBJECT_MARKER = b"\xc3\x01"


def _schema_dir() -> Any:
    return resources.files("streamprov").joinpath("schemas")


def load_schema_json(name: str, *, history: bool = False) -> dict[str, Any]:
    """The raw JSON of `schemas/<name>.avsc` (or of `schemas/history/<name>.avsc`)."""
    folder = _schema_dir().joinpath("history") if history else _schema_dir()
    loaded: dict[str, Any] = json.loads(folder.joinpath(f"{name}.avsc").read_text("utf-8"))
    return loaded


def history_names() -> list[str]:
    folder = _schema_dir().joinpath("history")
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".avsc")] for p in folder.iterdir() if p.name.endswith(".avsc"))


def fingerprint_bytes(schema: dict[str, Any]) -> bytes:
    """CRC-64-AVRO fingerprint of the schema's parsing canonical form, little-endian as the spec says."""
    canonical = to_parsing_canonical_form(parse_schema(schema, _write_hint=False))
    return bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO"))


def single_object_prefix(schema: dict[str, Any]) -> bytes:
    return SINGLE_OBJECT_MARKER + fingerprint_bytes(schema)


@functools.lru_cache(maxsize=256)
def _small_long(n: int) -> bytes:
    return _encode_long(n)


def _encode_long(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z & ~0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_LONG_MIN = -(1 << 63)
_LONG_MAX = (1 << 63) - 1


def encode_long(n: int) -> bytes:
    """Avro zig-zag varint of a 64-bit long (anything wider would silently decode as another value)."""
    if 0 <= n < 256:
        return _small_long(n)
    if not _LONG_MIN <= n <= _LONG_MAX:
        raise OverflowError(f"{n} does not fit an Avro long")
    return _encode_long(n)


def encode_bytes(b: bytes) -> bytes:
    return encode_long(len(b)) + b


def read_long(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode an Avro varint at `pos`; returns (value, next position).

    Raises on truncation and on anything that is not a 64-bit long (more than 10 bytes, or a 10th
    byte above 1), so every value read here re-encodes and any other Avro reader agrees on it.
    """
    shift = 0
    z = 0
    while True:
        if pos >= len(buf):
            raise MalformedHeaderError("truncated varint", buf)
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:  # the 10th byte holds only bit 63; more would overflow a long
            raise MalformedHeaderError("varint overflows a 64-bit long", buf)
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


def read_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise MalformedHeaderError(f"length {n} runs past the end of the header", buf)
    return buf[pos:end], end


def without_logical_types(schema: Any) -> Any:
    """A copy of `schema` with every `logicalType` dropped: values decode as their Avro base type.

    The canonical form (and so the fingerprint) ignores logical types, so this is the same schema on
    the wire; it spares lossy conversions (timestamp-millis via a float datetime) and range limits.
    """
    if isinstance(schema, dict):
        return {k: without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [without_logical_types(v) for v in schema]
    return schema


def schemaless_read(body: bytes, writer: Any, reader: Any | None = None) -> Any:
    """fastavro's schemaless reader on bytes that must hold exactly one datum.

    Callers wrap its exceptions in a typed error; trailing bytes raise ValueError.
    """
    buf = io.BytesIO(body)
    value = fastavro.schemaless_reader(buf, writer, reader)
    if buf.tell() != len(body):
        raise ValueError(f"{len(body) - buf.tell()} trailing bytes after the Avro datum")
    return value
