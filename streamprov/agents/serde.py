"""Value (de)serialisers shared by every agent flavour (faust, confluent-kafka).

Agents move raw bytes over Kafka so the checksum in a provenance header is over exactly the bytes on
the wire; a serde turns those bytes into the value a registered function sees and back. JSON is
compact and canonical (sorted keys, no spaces), so equal values always serialise to equal bytes and
a recompute reproduces the same checksum.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

from streamprov.errors import SerdeError


@runtime_checkable
class Serde(Protocol):
    """Turns wire bytes into values and back; raises `SerdeError` on anything it cannot handle."""

    name: str

    def loads(self, data: bytes) -> Any: ...

    def dumps(self, value: Any) -> bytes: ...


class JsonSerde:
    """Compact canonical JSON (UTF-8, sorted keys, no whitespace)."""

    name = "json"

    def loads(self, data: bytes) -> Any:
        try:
            return json.loads(data)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise SerdeError(f"value is not JSON: {exc}") from exc

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(
                value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
            ).encode("utf-8")
        except (ValueError, TypeError) as exc:
            raise SerdeError(f"value of type {type(value).__name__} is not JSON-serialisable: {exc}") from exc


class RawSerde:
    """Bytes in, bytes out: for functions that work on the payload itself."""

    name = "raw"

    def loads(self, data: bytes) -> Any:
        return data

    def dumps(self, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
        raise SerdeError(f"raw serde needs bytes, not {type(value).__name__}")
