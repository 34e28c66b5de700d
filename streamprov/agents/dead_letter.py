"""Dead-letter records: the original record, untouched, plus headers that say why it was set aside.

Every agent flavour sends a record it cannot process here instead of dropping it or crashing: the
key, value and headers stay exactly as consumed (so it can be replayed once fixed), and three headers
are added: the reason (a stable, machine-readable code), the error text, and where it came from
(topic/partition/offset). Only a record too large to be stored with them is cut (`fit`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any

from streamprov.errors import (
    HeaderError,
    MissingHeaderError,
    ProcessingError,
    SerdeError,
    UnknownSchemaError,
)
from streamprov.reduce import LateRecordError
from streamprov.stamp import ChecksumMismatchError

REASON_HEADER = "streamprov.dlq.reason"
ERROR_HEADER = "streamprov.dlq.error"
SOURCE_HEADER = "streamprov.dlq.source"
CUT_HEADER = "streamprov.dlq.cut"
"""On a dead letter cut to fit (`fit`): what was cut."""
DLQ_HEADERS = frozenset({REASON_HEADER, ERROR_HEADER, SOURCE_HEADER, CUT_HEADER})

MAX_DEAD_LETTER_BYTES = 900_000
"""A dead letter's value and headers together stay under this (`fit`): under librdkafka's default
`message.max.bytes` (1,000,000) and Kafka's default topic limit, with room for framing."""

MAX_ERROR_BYTES = 1024
"""Error text is cut to this size: a header is no place for a whole traceback."""


class DeadLetterReason(enum.StrEnum):
    """Why a record was dead-lettered; the value is what goes into the reason header."""

    MALFORMED_HEADER = "malformed_header"
    """A provenance header that does not decode (empty, truncated, bad marker, bad field or lineage)."""
    UNKNOWN_SCHEMA = "unknown_schema"
    """A well-framed header whose schema fingerprint this version does not know."""
    CHECKSUM_MISMATCH = "checksum_mismatch"
    DESERIALIZATION_ERROR = "deserialization_error"
    SERIALIZATION_ERROR = "serialization_error"
    PROCESSING_ERROR = "processing_error"
    LATE_RECORD = "late_record"
    MISSING_HEADER = "missing_header"
    """No provenance header at all."""
    RECORD_TOO_LARGE = "record_too_large"
    """The output would be larger than the producer may send (`message.max.bytes`): the input, or a
    window's result, is set aside instead of blocking every record after it."""


def classify(exc: BaseException, *, serialising: bool = False) -> DeadLetterReason:
    """The reason code for an exception raised while processing a record.

    `serialising` tells a `SerdeError` on the way out (the function's result) from one on the way in.
    Anything unexpected counts as a processing error: the user's function raised it.
    """
    if isinstance(exc, ChecksumMismatchError):
        return DeadLetterReason.CHECKSUM_MISMATCH
    if isinstance(exc, UnknownSchemaError):
        return DeadLetterReason.UNKNOWN_SCHEMA
    if isinstance(exc, MissingHeaderError):
        return DeadLetterReason.MISSING_HEADER
    if isinstance(exc, HeaderError):
        return DeadLetterReason.MALFORMED_HEADER
    if isinstance(exc, SerdeError):
        return DeadLetterReason.SERIALIZATION_ERROR if serialising else DeadLetterReason.DESERIALIZATION_ERROR
    if isinstance(exc, LateRecordError):
        return DeadLetterReason.LATE_RECORD
    if isinstance(exc, ProcessingError):
        return DeadLetterReason.PROCESSING_ERROR
    return DeadLetterReason.PROCESSING_ERROR


def source_of(topic: str, partition: int, offset: int) -> str:
    """Where a record came from, as written into the source header."""
    return f"{topic}/{partition}/{offset}"


def error_text(error: BaseException | str) -> str:
    """Bounded, single-string error description for the error header."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    data = text.encode("utf-8")
    if len(data) <= MAX_ERROR_BYTES:
        return text
    return data[: MAX_ERROR_BYTES - 3].decode("utf-8", "ignore") + "..."


def dead_letter_headers(
    headers: Iterable[tuple[str, bytes | None]] | None,
    reason: DeadLetterReason | str,
    error: BaseException | str,
    source: str,
) -> list[tuple[str, bytes | None]]:
    """The original headers (minus earlier dead-letter headers) followed by reason, error, source."""
    kept = [(k, v) for k, v in (headers or ()) if k not in DLQ_HEADERS]
    return [
        *kept,
        (REASON_HEADER, str(reason).encode("utf-8")),
        (ERROR_HEADER, error_text(error).encode("utf-8")),
        (SOURCE_HEADER, source.encode("utf-8")),
    ]


RECORD_FRAMING_BYTES = 1024
"""Room left under a client's message size limit for what `record_size` does not count."""
DEFAULT_MAX_OUTPUT_BYTES = 1_000_000 - RECORD_FRAMING_BYTES
"""The largest output an agent sends by default: librdkafka's `message.max.bytes` and faust's
`producer_max_request_size` default to 1,000,000; a larger one is dead-lettered (`RECORD_TOO_LARGE`)."""

MAX_KEY_BYTES = 1024
"""A dead letter's key is cut to this when the record does not fit (`fit`): keys only route."""


def fit(
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    limit: int = MAX_DEAD_LETTER_BYTES,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]:
    """A dead letter that can always be stored: (key, value, headers) as given when together they stay
    under `limit`; else the key's first `MAX_KEY_BYTES`, the dead-letter headers only (reason, error,
    source), `CUT_HEADER` saying what was cut, and the value's first bytes that still fit. Why: a
    record near Kafka's size limit plus the dead-letter headers is refused by the producer or the
    dead-letter topic, and a dead letter that cannot be stored holds back every record after it (the
    batch is retried forever). The whole record stays where the source header says, for the source
    topic's retention."""
    size = record_size(key, value, headers)
    if size <= limit:
        return key, value, list(headers)
    kept = [(k, v) for k, v in headers if k in DLQ_HEADERS and k != CUT_HEADER]
    short_key = None if key is None else key[:MAX_KEY_BYTES]
    key_note = (
        "" if short_key == key else f", a key of {len(key or b'')} bytes (its first {MAX_KEY_BYTES} kept)"
    )
    note = (
        f"cut to fit a dead letter: {len(value or b'')} value bytes{key_note} and {len(headers) - len(kept)} "
        f"other headers, {size} bytes in all; the whole record is at its source"
    ).encode()
    room = (
        limit - len(short_key or b"") - len(CUT_HEADER) - len(note) - sum(_header_size(k, v) for k, v in kept)
    )
    return short_key, (None if value is None else value[: max(0, room)]), [*kept, (CUT_HEADER, note)]


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, Any]]) -> int:
    """Bytes of a record's key, value and headers: what a client's message size limit counts (less
    the framing: compare with some room under the limit)."""
    return len(key or b"") + len(value or b"") + sum(_header_size(k, v) for k, v in headers)


def _header_size(key: str, value: object) -> int:
    """Bytes a header takes (a value consumed as something else than bytes counts as its text)."""
    return len(key) + (
        len(value) if isinstance(value, bytes | str) else len(str(value)) if value is not None else 0
    )
