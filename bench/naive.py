"""The first, straightforward implementation of the two hot paths, kept as a reference point.

`bench_headers.py --naive` runs these next to the current code in the same run, so the speed-up of
the optimised paths is measured, not remembered. They write and accept the same bytes as the current
code (the wire format did not change), only slower: a stamper object with a clock object, helper
calls and keyword arguments per record on the produce side; `find_raw` + a sliced `verify_value`
per record on the consume side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import crc32c as _crc32c

from streamprov import avro
from streamprov.checksum import ChecksumAlgorithm, compute, digest
from streamprov.errors import MalformedHeaderError, UnknownSchemaError
from streamprov.header import HEADER_KEY, PREFIX, encode_checksum, find_raw, now_ms
from streamprov.lineage import encode_lineage

_crc: Callable[[bytes], int] = _crc32c.crc32c
_PREFIX_LEN = len(PREFIX)
_CRC_TAG = avro.encode_long(ChecksumAlgorithm.CRC32C) + avro.encode_long(4)
_EMPTY_LINEAGE = encode_lineage(())


class _Clock:
    def __init__(self) -> None:
        self._ms = -1
        self._enc = b""

    def encoded(self) -> bytes:
        ms = now_ms()
        if ms != self._ms:
            self._ms = ms
            self._enc = avro.encode_long(ms)
        return self._enc


def _encoded_checksum(algorithm: ChecksumAlgorithm, value: bytes) -> bytes:
    if algorithm is ChecksumAlgorithm.CRC32C:
        return _CRC_TAG + digest(algorithm, value)
    return encode_checksum(compute(algorithm, value))


class NaiveProvenanceProducer:
    """The original ProvenanceProducer.produce + SourceStamper.header, for bytes keys."""

    def __init__(self, produce: Callable[..., None]) -> None:
        self._produce = produce
        self.algorithm = ChecksumAlgorithm.CRC32C
        self._clock = _Clock()

    def header(self, data_id: bytes, value: bytes) -> bytes:
        encoded = _encoded_checksum(self.algorithm, value)
        return b"".join(
            (PREFIX, encoded, encoded, self._clock.encoded(), avro.encode_bytes(data_id), _EMPTY_LINEAGE)
        )

    def produce(self, topic: str, value: bytes, key: bytes) -> None:
        if not isinstance(value, bytes | bytearray):
            raise TypeError("value must be bytes")
        stamped = [(HEADER_KEY, self.header(key, bytes(value)))]
        kwargs = {"headers": stamped}
        self._produce(topic, value, key, **kwargs)


def _digest_len(raw: bytes, pos: int) -> int:
    index, length = raw[pos], raw[pos + 1]
    if index == 0 and length == 8:
        return 4
    if index == 2 and length == 64:
        return 32
    raise MalformedHeaderError(f"bad checksum encoding at byte {pos}", raw)


def naive_verify_value(raw: bytes, value: bytes) -> bool:
    """The original `header.verify_value`: prefix slice, checksum slice, `to_bytes` per record."""
    if raw[:_PREFIX_LEN] != PREFIX:
        raise UnknownSchemaError("header is not the current provenance schema", raw)
    try:
        n = _digest_len(raw, _PREFIX_LEN)
    except IndexError as exc:
        raise MalformedHeaderError("header is truncated", raw) from exc
    expected = raw[_PREFIX_LEN + 2 : _PREFIX_LEN + 2 + n]
    if n == 4:
        return _crc(value).to_bytes(4, "big") == expected
    return hashlib.sha256(value).digest() == expected


def naive_failures(messages: Sequence[Any]) -> int:
    """Per record: `find_raw(msg.headers())`, then `naive_verify_value`; returns how many failed."""
    failed = 0
    for m in messages:
        raw = find_raw(m.headers())
        if raw is None or not naive_verify_value(raw, m.value()):
            failed += 1
    return failed
