"""Hostile bytes: whatever a Kafka header holds, decoding raises a `HeaderError` or yields a valid header.

"Valid" means what the codec actually guarantees. A decoded header is not always byte-identical to
its input when re-encoded (other Avro writers may split arrays and maps into several blocks, pad
varints, or repeat map keys), but re-encoding it is a fixpoint: `decode(encode(h)) == h` and
`encode(decode(encode(h))) == encode(h)`.
"""

from __future__ import annotations

import contextlib
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.errors import HeaderError
from streamprov.header import HEADER_KEY, PREFIX, ProvenanceHeader, scan, verify_value
from streamprov.lineage import InputDigest, Step, StepKind
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, SourceStamper

FUZZ = settings(
    deadline=None,  # CI machines are slow and shared; a per-example deadline would only flake
    max_examples=500,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_LESS = settings(FUZZ, max_examples=200)  # expensive examples (whole headers generated)
LONG = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
DIGEST_SIZES = {ChecksumAlgorithm.CRC32C: 4, ChecksumAlgorithm.SHA256: 32}

# --- valid headers ------------------------------------------------------------------------------

checksums = st.sampled_from(list(ChecksumAlgorithm)).flatmap(
    lambda a: st.binary(min_size=DIGEST_SIZES[a], max_size=DIGEST_SIZES[a]).map(lambda v: Checksum(a, v))
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
input_digests = st.builds(
    InputDigest, LONG, st.binary(min_size=32, max_size=32), st.none() | LONG, st.none() | LONG
)
steps = st.builds(
    Step.create,
    st.sampled_from(list(StepKind)),
    st.text(max_size=12),
    st.text(max_size=4),
    st.binary(max_size=16),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    st.none() | input_digests,
)
headers = st.builds(
    ProvenanceHeader,
    st.text(max_size=80),  # crosses the 63-byte boundary of the one-byte length varint
    checksums,
    checksums,
    LONG,
    st.lists(steps, max_size=3).map(tuple),
)


def _seed_headers() -> list[bytes]:
    step = Step.create(StepKind.MAP, "clean", "1", bytes(16), {"unit": "EUR", "n": [1, {"x": None}]})
    reduce_step = Step.create(
        StepKind.REDUCE, "sum", "2", bytes(range(16)), {}, InputDigest(7, bytes(32), 0, 60_000)
    )
    crc = ChecksumAlgorithm.CRC32C
    return [
        ProvenanceHeader.for_source("order-1", b"v", timestamp_ms=1_731_000_000_000).encode(),
        ProvenanceHeader(
            "é" * 40, compute(crc, b"o"), compute(crc, b"s"), 1_731_000_000_000, (step, reduce_step)
        ).encode(),
        ProvenanceHeader.for_source("k", b"v", ChecksumAlgorithm.SHA256, timestamp_ms=-5).encode(),
    ]


SEEDS = _seed_headers()


# --- the oracle ---------------------------------------------------------------------------------


def check_decode(raw: bytes) -> ProvenanceHeader | None:
    """Decode; only a HeaderError may escape (any other exception fails the test).

    When decoding succeeds, the header must be a well-formed value that re-encodes to a fixpoint, and
    the hot-path functions must agree with it.
    """
    try:
        header = ProvenanceHeader.decode(raw)
    except HeaderError as exc:
        assert exc.raw is None or isinstance(exc.raw, bytes)
        return None
    assert isinstance(header.data_id, str)
    assert -(1 << 63) <= header.timestamp_ms < (1 << 63)
    for c in (header.checksum, header.source_checksum):
        assert len(c.value) == DIGEST_SIZES[c.algorithm]
    again = header.encode()
    assert ProvenanceHeader.decode(again) == header
    assert ProvenanceHeader.decode(again).encode() == again
    if raw[: len(PREFIX)] == PREFIX:
        # The per-record head fields are read by hand; what decoded must scan, and verify_value must
        # agree with the decoded checksum.
        source_start, source_end, _, _ = scan(raw)
        assert raw[source_start + 2 : source_end] == header.source_checksum.value
        assert avro.read_long(raw, source_end)[0] == header.timestamp_ms
        for value in (b"", b"x"):
            assert verify_value(raw, value) == matches(header.checksum, value)
    return header


def check_hot_paths(raw: bytes) -> None:
    for fn in (scan, lambda r: verify_value(r, b"value")):
        with contextlib.suppress(HeaderError):
            fn(raw)


_REG = FunctionRegistry()
_STAMPER = _REG.add(lambda v: v, "identity", "1")
STAMPERS = [MapStamper(_STAMPER), MapStamper(_STAMPER, verify_input=False)]


def check_stamp(raw: bytes, value: bytes = b"v") -> None:
    """A map step given a hostile input header: HeaderError, or an output header that decodes."""
    record = InputRecord(value, [(HEADER_KEY, raw)], b"key", "t", 0, 1)
    for stamper in STAMPERS:
        try:
            out = stamper.stamp(record, b"out")
        except HeaderError:
            continue
        header = ProvenanceHeader.decode(out)
        assert header.lineage[-1] == stamper.step
        assert matches(header.checksum, b"out")


def check_all(raw: bytes) -> None:
    check_decode(raw)
    check_hot_paths(raw)
    check_stamp(raw)


# --- properties ---------------------------------------------------------------------------------


@FUZZ_LESS
@given(headers)
def test_valid_headers_round_trip_byte_identically(header: ProvenanceHeader) -> None:
    raw = header.encode()
    assert ProvenanceHeader.decode(raw) == header
    assert ProvenanceHeader.decode(raw).encode() == raw
    assert check_decode(raw) == header


@FUZZ
@given(st.binary(max_size=200))
@example(b"")
@example(b"\xc3")
@example(b"\xc3\x01")
@example(PREFIX)
def test_any_bytes(raw: bytes) -> None:
    check_all(raw)


@FUZZ
@given(st.binary(max_size=120))
@example(b"\x00\x08" + bytes(4) + b"\x00\x08" + bytes(4) + b"\x00\x00\x00")  # smallest valid body
@example(b"\x00\x08" + bytes(4) + b"\x00\x08" + bytes(4) + b"\xff" * 9 + b"\x02\x00\x00")  # ts > long
@example(b"\x00\x08" + bytes(4) + b"\x00\x08" + bytes(4) + b"\x00\x80\x01" + b"a" * 64 + b"\x00")
def test_current_prefix_with_random_body(body: bytes) -> None:
    check_all(PREFIX + body)


@FUZZ
@given(st.sampled_from(SEEDS), st.integers(min_value=0, max_value=300), st.binary(max_size=40))
def test_prefix_kept_random_tail(seed: bytes, keep: int, tail: bytes) -> None:
    """A valid header whose first `keep` bytes are kept and whose remainder is random."""
    check_all(seed[: max(len(PREFIX), keep % (len(seed) + 1))] + tail)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS) | headers.map(ProvenanceHeader.encode)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "replace", "delete"]))
        at = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "truncate":
            del raw[at:]
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "replace" and raw:
            raw[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "delete" and raw:
            del raw[at]
    return bytes(raw)


@FUZZ
@given(mutated())
def test_mutated_headers(raw: bytes) -> None:
    check_all(raw)


@FUZZ_LESS
@given(headers, st.binary(max_size=8))
def test_stamp_verifies_or_trusts_the_input_value(header: ProvenanceHeader, value: bytes) -> None:
    raw = header.encode()
    record = InputRecord(value, [(HEADER_KEY, raw)], None, "t", 0, 1)
    out = STAMPERS[1].stamp(record, b"o")  # verify_input=False: always stamps
    decoded = ProvenanceHeader.decode(out)
    assert decoded.data_id == header.data_id
    assert decoded.source_checksum == header.source_checksum
    assert decoded.lineage == (*header.lineage, _STAMPER.step())
    if matches(header.checksum, value):
        verified = ProvenanceHeader.decode(STAMPERS[0].stamp(record, b"o"))
        assert verified.lineage == decoded.lineage and verified.checksum == decoded.checksum
    else:
        with pytest.raises(HeaderError):
            STAMPERS[0].stamp(record, b"o")


# --- exhaustive single-byte damage --------------------------------------------------------------

REPLACEMENTS = (0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xC3, 0xFE, 0xFF)


@pytest.mark.parametrize("seed_index", range(len(SEEDS)))
def test_every_position_every_damage(seed_index: int) -> None:
    seed = SEEDS[seed_index]
    decoded = 0
    for at in range(len(seed)):
        candidates = [seed[:at], seed[:at] + seed[at + 1 :], seed[:at] + b"\x80" + seed[at:]]
        candidates += [seed[:at] + bytes([seed[at] ^ (1 << bit)]) + seed[at + 1 :] for bit in range(8)]
        candidates += [seed[:at] + bytes([b]) + seed[at + 1 :] for b in REPLACEMENTS if b != seed[at]]
        for raw in candidates:
            check_all(raw)
            decoded += check_decode(raw) is not None
    # Some damage is harmless (a digest byte, a DataID letter); most is not. Both paths ran.
    assert 0 < decoded < len(seed) * 20


# --- pathological lengths and counts ------------------------------------------------------------

_HEAD = SEEDS[0][: scan(SEEDS[0])[3]]  # a valid header up to (not including) its lineage
_STEP_HEAD = avro.encode_long(0) + avro.encode_bytes(b"f") + avro.encode_bytes(b"1") + avro.encode_bytes(b"")

PATHOLOGICAL = {
    "array count 2^62": avro.encode_long(1 << 62),
    "array count -2^63 (abs overflows)": avro.encode_long(-(1 << 63)) + avro.encode_long(1),
    "array count 10^8, one item": avro.encode_long(10**8) + _STEP_HEAD + b"\x00\x00",
    "map count 2^62": avro.encode_long(1) + _STEP_HEAD + avro.encode_long(1 << 62),
    "map count -2^62 with byte size": avro.encode_long(1)
    + _STEP_HEAD
    + avro.encode_long(-(1 << 62))
    + avro.encode_long(1 << 62)
    + b"\x02a\x02b",
    "string length 2^62": avro.encode_long(1) + avro.encode_long(0) + avro.encode_long(1 << 62),
    "string length negative": avro.encode_long(1) + avro.encode_long(0) + avro.encode_long(-7) + b"abc",
    "bytes length long max": avro.encode_long(1)
    + avro.encode_long(0)
    + b"\x02f\x021"
    + avro.encode_long((1 << 63) - 1),
    "overlong varint": avro.encode_long(1) + b"\xff" * 30,
    "many empty map blocks": avro.encode_long(1) + _STEP_HEAD + b"\x02\x02a\x02b" * 2000 + b"\x00\x00\x00",
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_lineage_is_fast_and_typed(name: str) -> None:
    started = time.perf_counter()
    check_all(_HEAD + PATHOLOGICAL[name])
    assert time.perf_counter() - started < 1.0, name


@pytest.mark.parametrize(
    "data_id_length",
    [1 << 62, (1 << 63) - 1, -(1 << 63), -1, 10**9],
)
def test_pathological_data_id_length(data_id_length: int) -> None:
    raw = SEEDS[0]
    _, _, id_start, lineage_at = scan(raw)
    bad = raw[:id_start] + avro.encode_long(data_id_length) + raw[lineage_at:]
    started = time.perf_counter()
    with pytest.raises(HeaderError):
        ProvenanceHeader.decode(bad)
    check_all(bad)
    assert time.perf_counter() - started < 1.0


def test_multi_block_lineage_decodes_to_the_same_header() -> None:
    """Avro lets a writer split an array into blocks, with or without a byte size (negative count).

    We never write that, but any Avro writer may: it must decode to the same header, and re-encoding
    gives our single-block form (equal by value, not byte-identical).
    """
    steps_ = [Step.create(StepKind.MAP, f"f{i}", "1", bytes(16), {"i": i}) for i in range(3)]
    header = ProvenanceHeader(
        "d",
        compute(ChecksumAlgorithm.CRC32C, b"v"),
        compute(ChecksumAlgorithm.CRC32C, b"s"),
        5,
        tuple(steps_),
    )
    single = header.encode()
    head = single[: scan(single)[3]]
    items = [
        ProvenanceHeader("d", header.checksum, header.source_checksum, 5, (s,)).encode()[len(head) + 1 : -1]
        for s in steps_
    ]  # each step's Avro bytes, without block framing
    two_blocks = head + avro.encode_long(1) + items[0] + avro.encode_long(2) + items[1] + items[2] + b"\x00"
    sized = (
        head
        + avro.encode_long(-2)
        + avro.encode_long(len(items[0] + items[1]))
        + items[0]
        + items[1]
        + avro.encode_long(1)
        + items[2]
        + b"\x00"
    )
    for raw in (two_blocks, sized):
        assert raw != single
        decoded = check_decode(raw)
        assert decoded == header
        assert decoded.encode() == single


def test_map_with_repeated_keys_decodes_to_a_fixpoint() -> None:
    step_bytes = _STEP_HEAD + avro.encode_long(2) + b"\x02a\x021\x02a\x022" + b"\x00" + b"\x00"
    raw = _HEAD + avro.encode_long(1) + step_bytes + b"\x00"
    decoded = check_decode(raw)
    assert decoded is not None
    assert decoded.lineage[0].parameters == (("a", "2"),)  # the last one wins, as in any Avro reader
    assert decoded.encode() != raw


def test_source_stamper_never_writes_an_undecodable_header() -> None:
    stamper = SourceStamper()
    for key in (b"\xff", b"\xc3\x01", bytes(range(256)), "ключ".encode(), b"a" * 5000):
        header = ProvenanceHeader.decode(stamper.header(key, b"v"))
        assert header.is_source
