"""Payload checksums: CRC32C (default, hardware-accelerated) or SHA-256.

A checksum is always over the record value bytes exactly as they travel on the wire, so any consumer
can verify it without knowing how the value was serialised.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import crc32c as _crc32c

_crc = _crc32c.crc32c
_sha256 = hashlib.sha256


class ChecksumAlgorithm(enum.IntEnum):
    """Algorithms, numbered as the symbols of the Avro enum `ChecksumAlgorithm` (order is wire format)."""

    CRC32C = 0
    SHA256 = 1


@dataclass(frozen=True, slots=True)
class Checksum:
    """An algorithm and its digest bytes (CRC32C: 4 bytes big-endian; SHA-256: 32 bytes)."""

    algorithm: ChecksumAlgorithm
    value: bytes

    def hex(self) -> str:
        return f"{self.algorithm.name.lower()}:{self.value.hex()}"


def digest(algorithm: ChecksumAlgorithm, data: bytes) -> bytes:
    """Digest bytes of `data`; the hot path of stamping and verifying."""
    if algorithm is ChecksumAlgorithm.CRC32C:
        return _crc(data).to_bytes(4, "big")
    return _sha256(data).digest()


def compute(algorithm: ChecksumAlgorithm, data: bytes) -> Checksum:
    return Checksum(algorithm, digest(algorithm, data))


def matches(checksum: Checksum, data: bytes) -> bool:
    return digest(checksum.algorithm, data) == checksum.value
