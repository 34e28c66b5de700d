"""The consumer-side hot path: `streamprov.verify` must agree with the full decoder on every input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.errors import HeaderError, MalformedHeaderError, UnknownSchemaError
from streamprov.header import HEADER_KEY, ProvenanceHeader, record_fields
from streamprov.stamp import SourceStamper
from streamprov.verify import Verdict, check_batch, verify_message, verify_record


@dataclass
class Msg:
    h: Any
    v: bytes | None

    def headers(self) -> Any:
        return self.h

    def value(self) -> bytes | None:
        return self.v


def crc_header(value: bytes, data_id: str = "d-1") -> bytes:
    return SourceStamper().header(data_id, value)


def sha_header(value: bytes) -> bytes:
    return ProvenanceHeader.for_source("d-2", value, ChecksumAlgorithm.SHA256).encode()


def test_ok_mismatch_and_no_header() -> None:
    raw = crc_header(b"payload")
    assert verify_record([(HEADER_KEY, raw)], b"payload") is Verdict.OK
    assert verify_record([(HEADER_KEY, raw)], b"payloaD") is Verdict.MISMATCH
    assert verify_record([], b"payload") is Verdict.NO_HEADER
    assert verify_record(None, b"payload") is Verdict.NO_HEADER
    assert verify_record([("other", b"x")], b"payload") is Verdict.NO_HEADER


def test_general_path_sha256_later_position_mapping_and_bytearray() -> None:
    raw = sha_header(b"v")
    assert verify_record([("trace", b"t"), (HEADER_KEY, raw)], b"v") is Verdict.OK
    assert verify_record({HEADER_KEY: raw}, b"v") is Verdict.OK
    assert verify_record([(HEADER_KEY, bytearray(raw))], b"w") is Verdict.MISMATCH
    crc = crc_header(b"v")
    assert verify_record([("trace", b"t"), (HEADER_KEY, crc)], b"v") is Verdict.OK


def test_null_value_is_checked_as_empty_bytes() -> None:
    assert verify_record([(HEADER_KEY, crc_header(b""))], None) is Verdict.OK
    assert verify_record([(HEADER_KEY, crc_header(b"x"))], None) is Verdict.MISMATCH


@pytest.mark.parametrize(
    ("headers", "error"),
    [
        ([(HEADER_KEY, b"")], MalformedHeaderError),
        ([(HEADER_KEY, None)], MalformedHeaderError),
        ([(HEADER_KEY, "text")], MalformedHeaderError),
        ([(HEADER_KEY, b"garbage bytes")], MalformedHeaderError),
        ([(HEADER_KEY, b"\xc3\x01" + b"\x00" * 8 + b"\x00\x08abcd")], UnknownSchemaError),
        ([(HEADER_KEY, crc_header(b"v")[:11])], MalformedHeaderError),
        ([42], MalformedHeaderError),
    ],
)
def test_malformed_headers_raise_typed_errors(headers: Any, error: type[HeaderError]) -> None:
    with pytest.raises(error):
        verify_record(headers, b"v")


def test_check_batch_reports_only_failures_with_positions() -> None:
    good = crc_header(b"a")
    batch = [
        Msg([(HEADER_KEY, good)], b"a"),
        Msg([(HEADER_KEY, good)], b"tampered"),
        Msg([], b"a"),
        Msg([(HEADER_KEY, b"junk")], b"a"),
        Msg([(HEADER_KEY, sha_header(b"s"))], b"s"),
    ]
    failures = check_batch(batch)
    assert [(f.position, f.verdict) for f in failures] == [
        (1, Verdict.MISMATCH),
        (2, Verdict.NO_HEADER),
        (3, Verdict.MALFORMED),
    ]
    assert isinstance(failures[2].error, MalformedHeaderError)
    assert failures[2].error.raw == b"junk"
    assert check_batch(batch[:1] + batch[4:]) == []
    assert verify_message(batch[1]) is Verdict.MISMATCH


def test_record_fields_match_full_decode() -> None:
    raw = crc_header(b"value", data_id="x" * 70)
    fields = record_fields(raw)
    full = ProvenanceHeader.decode(raw)
    assert (fields.data_id, fields.timestamp_ms, fields.checksum, fields.source_checksum) == (
        full.data_id,
        full.timestamp_ms,
        full.checksum,
        full.source_checksum,
    )
    assert fields.checksum == compute(ChecksumAlgorithm.CRC32C, b"value")


@settings(max_examples=300, deadline=None)
@given(value=st.binary(max_size=64), other=st.binary(max_size=64), cut=st.integers(0, 80), sha=st.booleans())
def test_verify_agrees_with_the_decoder(value: bytes, other: bytes, cut: int, sha: bool) -> None:
    raw = (sha_header if sha else crc_header)(value)[: cut or None]
    try:
        header = ProvenanceHeader.decode(raw)
    except HeaderError:
        header = None
    try:
        verdict = verify_record([(HEADER_KEY, raw)], other)
    except HeaderError:
        verdict = None
    if header is not None:  # a decodable header must give the decoder's answer
        expected = (
            Verdict.OK if compute(header.checksum.algorithm, other) == header.checksum else Verdict.MISMATCH
        )
        assert verdict is expected
    (failure,) = check_batch([Msg([(HEADER_KEY, raw)], other)]) or [None]
    batch_verdict = Verdict.OK if failure is None else failure.verdict
    assert batch_verdict is (Verdict.MALFORMED if verdict is None else verdict)
