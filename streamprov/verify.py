"""Consumer-side verification: is a consumed record's value the one its provenance header describes?

This is the Validator's per-record hot path, run on every record of every output topic, so it is
written for the common case and falls back to the general code for everything else:

* the common case is a current-version header with a CRC32C checksum as the record's first header
  (where `ProvenanceProducer` and the stampers put it). It is checked with one `struct` call
  (prefix, checksum tag and digest at once, the digest as an int) and one CRC32C call over the
  value; no header object, no slicing, no enum or dataclass is built per record;
* anything else (the header further down the list, a SHA-256 checksum, an older schema version, a
  malformed or truncated header, a null value) takes the general path, which decodes as much as it
  needs and raises only `HeaderError` subclasses for bad headers.

What this costs next to a plain consumer, and what bounds it, is measured by bench/bench_headers.py
(see bench/README.md).

`verify_record` answers for one record; `check_batch` checks a whole `Consumer.consume()` batch in
one loop and reports only the records that are not OK, so a Validator's cost for a clean batch is one
Python call, not one per record. `record_fields` gives the per-record fields (DataID, timestamp,
checksums) through `header.scan`, without decoding the lineage.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, Protocol

import crc32c as _crc32c

from streamprov.checksum import ChecksumAlgorithm, digest
from streamprov.errors import HeaderError
from streamprov.header import (
    _CRC_HEAD,
    _PREFIX_LEN,
    HEADER_KEY,
    PREFIX,
    HeadersLike,
    ProvenanceHeader,
    RecordFields,
    _unpack_crc_head,
    find_raw,
    record_fields,
    verify_value,
)

__all__ = [
    "Failure",
    "MessageLike",
    "RecordFields",
    "Verdict",
    "check_batch",
    "record_fields",
    "verify_message",
    "verify_record",
]


class MessageLike(Protocol):
    """The two methods of a consumed `confluent_kafka.Message` that verification reads."""

    def headers(self) -> HeadersLike: ...

    def value(self) -> bytes | None: ...


class Verdict(enum.IntEnum):
    """Outcome of verifying one record."""

    OK = 0
    """The value's checksum equals the one in its provenance header."""
    MISMATCH = 1
    """The header is well-formed but the value does not match its checksum: corrupt or altered."""
    NO_HEADER = 2
    """The record carries no provenance header at all."""
    MALFORMED = 3
    """Only in `check_batch` results: the header is bad (`verify_record` raises instead)."""


class Failure(NamedTuple):
    """A record of a batch that is not OK: its position in the batch, why, and the error if malformed."""

    position: int
    verdict: Verdict
    error: HeaderError | None = None


# Module-level bindings: a global lookup is cheaper than an attribute lookup on the hot path.
_OK = Verdict.OK
_MISMATCH = Verdict.MISMATCH
_NO_HEADER = Verdict.NO_HEADER
_MALFORMED = Verdict.MALFORMED
_KEY = HEADER_KEY
_crc: Callable[[bytes], int] = _crc32c.crc32c
_ALGORITHMS = tuple(ChecksumAlgorithm)


def _verify_raw(raw: bytes, value: bytes | None) -> Verdict:
    """The general check of a found header: any algorithm, any known schema version."""
    if value is None:  # a null value (tombstone) is checked as empty bytes
        value = b""
    if raw[:_PREFIX_LEN] == PREFIX:
        return _OK if verify_value(raw, value) else _MISMATCH
    header = ProvenanceHeader.decode(raw)  # an older version, or raises Unknown/Malformed
    expected = header.checksum
    return _OK if digest(expected.algorithm, value) == expected.value else _MISMATCH


def verify_record(headers: HeadersLike, value: bytes | None) -> Verdict:
    """Verify one record: OK, MISMATCH or NO_HEADER; raises `HeaderError` subclasses when malformed.

    Only the marker, the schema fingerprint and the checksum are read: this is the corruption check
    (so, like `header.verify_value`, a header cut after its checksum still verifies). The rest of
    the header (DataID, timestamp, source checksum) is read and validated by `record_fields`.
    """
    # Duck-typed on purpose: anything unexpected raises and falls through to the checked path.
    hs: Any = headers
    try:  # common case: the provenance header comes first (ProvenanceProducer puts it there)
        key, raw = hs[0]
        if key == _KEY:
            head, expected = _unpack_crc_head(raw)
            if head == _CRC_HEAD:
                return _OK if _crc(value) == expected else _MISMATCH  # type: ignore[arg-type]
    except (IndexError, KeyError, TypeError, ValueError, struct.error):
        pass  # no headers, another layout, a short header or a null value: the general path says why
    header = find_raw(headers)
    if header is None:
        return _NO_HEADER
    return _verify_raw(header, value)


def verify_message(message: MessageLike) -> Verdict:
    """`verify_record` on a consumed message's headers and value."""
    return verify_record(message.headers(), message.value())


def check_batch(messages: Iterable[MessageLike]) -> list[Failure]:
    """Verify every message of a batch; returns only those that are not OK (an empty list if clean).

    Never raises for a bad record: a malformed header is reported as `Verdict.MALFORMED` with its
    `HeaderError` (which keeps the raw bytes for a dead-letter record), and the batch goes on.
    The loop inlines `verify_record`'s common case, so a clean batch costs no Python call per record
    beyond the message's own `headers()` and `value()`, one `struct` unpack and the CRC32C itself.
    """
    failures: list[Failure] = []
    unpack = _unpack_crc_head
    crc = _crc
    head_ok = _CRC_HEAD
    key_ = _KEY
    for i, m in enumerate(messages):
        hs: Any = m.headers()  # duck-typed: anything unexpected raises into the general path
        try:
            first = hs[0]
            if first[0] == key_:
                head, expected = unpack(first[1])
                if head == head_ok and crc(m.value()) == expected:  # type: ignore[arg-type]
                    continue
        except (IndexError, KeyError, TypeError, struct.error):
            pass  # not the common case: the general path below gives the precise verdict
        try:
            verdict = verify_record(hs, m.value())
        except HeaderError as exc:
            failures.append(Failure(i, _MALFORMED, exc))
        else:
            if verdict is not _OK:
                failures.append(Failure(i, verdict))
    return failures
