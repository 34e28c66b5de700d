"""The provenance header codec: model <-> bytes, Kafka headers, the hot-path scan, and the stampers.

Every test compares the fast, hand-rolled paths (scan, verify_value, MapStamper, SourceStamper) with
the slow, obvious one (build a `ProvenanceHeader` from the model and `encode()` it).
"""

from __future__ import annotations

import hashlib

import crc32c
import pytest

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, matches
from streamprov.errors import HeaderError, MalformedHeaderError, UnknownSchemaError
from streamprov.header import (
    HEADER_KEY,
    PREFIX,
    ProvenanceHeader,
    encode_checksum,
    headers_without,
    now_ms,
    scan,
    verify_value,
)
from streamprov.lineage import InputDigest, Step, StepKind, encode_lineage
from streamprov.registry import FunctionRegistry, RegisteredFunction
from streamprov.stamp import ChecksumMismatchError, InputRecord, MapStamper, SourceStamper

CRC = ChecksumAlgorithm.CRC32C
SHA = ChecksumAlgorithm.SHA256
TS = 1_731_000_000_123  # a realistic timestamp-millis (November 2024)
HASH_A = bytes(range(16))
HASH_B = bytes(range(16, 32))


def _map(fid: str = "clean", version: str = "1", **params: object) -> Step:
    return Step.create(StepKind.MAP, fid, version, HASH_A, params)


def _reduce(window: tuple[int, int] | None, count: int = 3) -> Step:
    digest = InputDigest(count, hashlib.sha256(b"root").digest(), *(window if window else (None, None)))
    return Step.create(StepKind.REDUCE, "sum", "2", HASH_B, {"field": "amount"}, digest)


def _header(data_id: str, value: bytes = b"payload", alg: ChecksumAlgorithm = CRC, lineage=(), **kw):
    source = kw.pop("source", compute(alg, b"the source record"))
    return ProvenanceHeader(data_id, compute(alg, value), source, kw.pop("ts", TS), tuple(lineage))


SAMPLES: dict[str, ProvenanceHeader] = {
    "source-crc32c": ProvenanceHeader.for_source("order-1", b'{"amount": 5}', CRC, timestamp_ms=TS),
    "source-sha256": ProvenanceHeader.for_source("order-1", b'{"amount": 5}', SHA, timestamp_ms=TS),
    "map-chain": _header("order-2", lineage=[_map("parse"), _map("clean", unit="EUR"), _map("enrich")]),
    "reduce-windowed": _header("customer-9", alg=SHA, lineage=[_map("parse"), _reduce((TS - 60_000, TS))]),
    "reduce-unwindowed": _header("customer-9", lineage=[_reduce(None, count=10_000)]),
    "reduce-negative-window": _header("k", lineage=[_reduce((-120_000, -60_000))]),
    "mixed-algorithms": ProvenanceHeader("m", compute(SHA, b"out"), compute(CRC, b"src"), TS, (_map(),)),
    "unicode-data-id": _header("日本語/ключ/😀/é", lineage=[_map()]),
    "data-id-63-bytes": _header("x" * 63),  # the longest DataID with a one-byte length varint
    "data-id-64-bytes": _header("x" * 64),  # the shortest with a two-byte length varint
    "data-id-long": _header("d" * 300 + "é" * 200, lineage=[_map()]),
    "data-id-empty": _header(""),
    "empty-params": _header("e", lineage=[Step.create(StepKind.MAP, "f", "1", HASH_A, {})]),
    "nested-json-params": _header(
        "n",
        lineage=[
            _map(
                "geo",
                config={"zones": [{"id": 1, "bbox": [0.5, -1.25]}, None], "flag": True},
                label="Zürich ✓",
                threshold=0.75,
                limit=-3,
                nothing=None,
            )
        ],
    ),
    "timestamp-zero": _header("t", ts=0),
    "timestamp-negative": _header("t", ts=-1),
    "timestamp-max-long": _header("t", ts=(1 << 63) - 1),
    "timestamp-min-long": _header("t", ts=-(1 << 63)),
    "empty-code-hash-and-ids": _header("z", lineage=[Step.create(StepKind.MAP, "", "", b"", {"": ""})]),
}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip(name: str) -> None:
    header = SAMPLES[name]
    raw = header.encode()
    assert raw.startswith(PREFIX)
    decoded = ProvenanceHeader.decode(raw)
    assert decoded == header
    assert decoded.encode() == raw  # our own writer's bytes are canonical: a fixpoint
    # Also from bytearray and memoryview (confluent-kafka hands out bytes, but other clients differ).
    assert ProvenanceHeader.decode(bytearray(raw)) == header
    assert ProvenanceHeader.decode(memoryview(raw)) == header


def test_nested_params_come_back_as_values() -> None:
    (step,) = SAMPLES["nested-json-params"].lineage
    decoded = ProvenanceHeader.decode(SAMPLES["nested-json-params"].encode()).lineage[0]
    assert decoded.params == {
        "config": {"zones": [{"id": 1, "bbox": [0.5, -1.25]}, None], "flag": True},
        "label": "Zürich ✓",
        "threshold": 0.75,
        "limit": -3,
        "nothing": None,
    }
    # Canonical JSON: sorted keys, no spaces, non-ASCII kept as is.
    assert dict(step.parameters)["config"] == '{"flag":true,"zones":[{"bbox":[0.5,-1.25],"id":1},null]}'
    assert dict(step.parameters)["label"] == '"Zürich ✓"'
    assert [k for k, _ in decoded.parameters] == sorted(k for k, _ in decoded.parameters)


def test_reduce_step_fields_survive() -> None:
    header = ProvenanceHeader.decode(SAMPLES["reduce-windowed"].encode())
    reduce_step = header.lineage[-1]
    assert reduce_step.kind is StepKind.REDUCE
    assert reduce_step.inputs == InputDigest(3, hashlib.sha256(b"root").digest(), TS - 60_000, TS)
    assert header.lineage[0].inputs is None
    unwindowed = ProvenanceHeader.decode(SAMPLES["reduce-unwindowed"].encode()).lineage[-1].inputs
    assert unwindowed is not None
    assert (unwindowed.count, unwindowed.window_start, unwindowed.window_end) == (10_000, None, None)


def test_data_id_length_varint_widths() -> None:
    for name, width in (("data-id-63-bytes", 1), ("data-id-64-bytes", 2), ("data-id-long", 2)):
        raw = SAMPLES[name].encode()
        _, _, id_start, lineage_at = scan(raw)
        n, data_at = avro.read_long(raw, id_start)
        assert data_at - id_start == width, name
        assert n == len(SAMPLES[name].data_id.encode("utf-8")) == lineage_at - data_at


def test_checksum_digest_sizes_and_byte_order() -> None:
    value = b"hello"
    crc = compute(CRC, value)
    assert crc.value == crc32c.crc32c(value).to_bytes(4, "big")
    sha = compute(SHA, value)
    assert sha.value == hashlib.sha256(value).digest()
    assert matches(crc, value) and not matches(crc, value + b"!")
    assert encode_checksum(crc) == b"\x00\x08" + crc.value  # enum index 0, length 4 (zig-zag 8)
    assert encode_checksum(sha) == b"\x02\x40" + sha.value  # enum index 1, length 32


def test_encode_refuses_a_timestamp_beyond_a_long() -> None:
    with pytest.raises(OverflowError):
        _header("t", ts=1 << 63).encode()
    with pytest.raises(OverflowError):
        _header("t", ts=-(1 << 63) - 1).encode()


@pytest.mark.parametrize(
    "varint",
    [b"\xff" * 9 + b"\x02", b"\xff" * 9 + b"\x7f", b"\x80" * 10 + b"\x01", b"\xff" * 11],
)
def test_timestamp_varint_wider_than_a_long_is_malformed(varint: bytes) -> None:
    raw = SAMPLES["source-crc32c"].encode()
    _, source_end, id_start, _ = scan(raw)
    bad = raw[:source_end] + varint + raw[id_start:]
    with pytest.raises(MalformedHeaderError):
        ProvenanceHeader.decode(bad)


def test_non_canonical_timestamp_varint_still_decodes() -> None:
    """Avro allows padded varints; other writers may emit them. The value is what counts."""
    raw = ProvenanceHeader.for_source("p", b"v", timestamp_ms=0).encode()
    _, source_end, id_start, _ = scan(raw)
    padded = raw[:source_end] + b"\x80\x80\x00" + raw[id_start:]
    decoded = ProvenanceHeader.decode(padded)
    assert decoded.timestamp_ms == 0
    assert decoded.encode() == raw


# --- Kafka headers -----------------------------------------------------------------------------


def test_to_headers_and_back() -> None:
    header = SAMPLES["map-chain"]
    kafka_headers = header.to_headers()
    assert kafka_headers == [(HEADER_KEY, header.encode())]
    assert HEADER_KEY == "streamprov"
    mixed = [("traceparent", b"00-abc"), *kafka_headers, ("other", None)]
    assert ProvenanceHeader.from_headers(mixed) == header
    assert headers_without(mixed) == [("traceparent", b"00-abc"), ("other", None)]


@pytest.mark.parametrize("headers", [None, [], [("traceparent", b"x")], [("Streamprov", b"x")]])
def test_from_headers_absent_is_none(headers) -> None:
    assert ProvenanceHeader.from_headers(headers) is None


@pytest.mark.parametrize("value", [b"", None])
def test_from_headers_present_but_empty_is_malformed(value) -> None:
    with pytest.raises(MalformedHeaderError, match="empty"):
        ProvenanceHeader.from_headers([("a", b"1"), (HEADER_KEY, value)])


def test_from_headers_garbage_is_malformed() -> None:
    with pytest.raises(MalformedHeaderError) as info:
        ProvenanceHeader.from_headers([(HEADER_KEY, b"not avro at all")])
    assert info.value.raw == b"not avro at all"  # kept for the dead-letter record


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(MalformedHeaderError):
        ProvenanceHeader.decode("c3 01")  # type: ignore[arg-type]


def test_unknown_fingerprint() -> None:
    raw = SAMPLES["source-crc32c"].encode()
    foreign = avro.SINGLE_OBJECT_MARKER + b"\x00" * 8 + raw[len(PREFIX) :]
    with pytest.raises(UnknownSchemaError, match="0000000000000000"):
        ProvenanceHeader.decode(foreign)
    with pytest.raises(UnknownSchemaError):
        scan(foreign)
    with pytest.raises(UnknownSchemaError):
        verify_value(foreign, b"payload")


# --- scan and verify_value agree with the full decode ------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLES))
def test_scan_spans_match_the_model(name: str) -> None:
    header = SAMPLES[name]
    raw = header.encode()
    source_start, source_end, id_start, lineage_at = scan(raw)
    assert raw[len(PREFIX) : source_start] == encode_checksum(header.checksum)
    assert raw[source_start:source_end] == encode_checksum(header.source_checksum)
    assert avro.read_long(raw, source_end) == (header.timestamp_ms, id_start)
    assert avro.read_bytes(raw, id_start) == (header.data_id.encode("utf-8"), lineage_at)
    assert raw[lineage_at:] == encode_lineage(header.lineage)


def test_verify_value_agrees_with_decoded_checksum() -> None:
    for alg in (CRC, SHA):
        for value in (b"", b"x", b"payload" * 1000):
            raw = ProvenanceHeader.for_source("v", value, alg, timestamp_ms=TS).encode()
            decoded = ProvenanceHeader.decode(raw)
            for candidate in (value, value + b"\x00", b"other"):
                assert verify_value(raw, candidate) == matches(decoded.checksum, candidate)
            assert verify_value(raw, value) is True
            assert verify_value(raw, value + b"\x00") is False


@pytest.mark.parametrize("cut", range(1, 36))
def test_verify_value_and_scan_reject_truncation(cut: int) -> None:
    raw = ProvenanceHeader.for_source("v", b"value", SHA, timestamp_ms=TS).encode()
    truncated = raw[: len(PREFIX) + cut]
    with pytest.raises(MalformedHeaderError):
        scan(truncated)
    with pytest.raises(MalformedHeaderError):
        ProvenanceHeader.decode(truncated)
    if cut < 34:  # the checksum itself is cut: there is nothing to compare against
        with pytest.raises(MalformedHeaderError):
            verify_value(truncated, b"value")
    else:
        assert verify_value(truncated, b"value") is True


@pytest.mark.parametrize(
    ("tag", "why"),
    [(b"\x04\x08", "algorithm index 2"), (b"\x00\x0a", "CRC32C of 5 bytes"), (b"\x02\x08", "SHA of 4")],
)
def test_bad_checksum_tags_are_rejected(tag: bytes, why: str) -> None:
    raw = SAMPLES["source-crc32c"].encode()
    bad = PREFIX + tag + raw[len(PREFIX) + 2 :]
    for check in (ProvenanceHeader.decode, scan, lambda r: verify_value(r, b"v")):
        with pytest.raises(MalformedHeaderError, match="bad checksum encoding"):
            check(bad)


def test_invalid_utf8_data_id_is_malformed() -> None:
    raw = _header("ab").encode()
    _, _, id_start, _ = scan(raw)
    bad = raw[: id_start + 1] + b"\xff\xfe" + raw[id_start + 3 :]
    with pytest.raises(MalformedHeaderError, match="UTF-8"):
        ProvenanceHeader.decode(bad)


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(MalformedHeaderError, match="trailing"):
        ProvenanceHeader.decode(SAMPLES["map-chain"].encode() + b"\x00")


# --- stampers produce what the model would ------------------------------------------------------


@pytest.fixture
def registry() -> FunctionRegistry:
    reg = FunctionRegistry()

    @reg.map("upper", "1", suffix="")
    def upper(value: bytes, suffix: str) -> bytes:
        return value.upper() + suffix.encode()

    @reg.map("strip", "3")
    def strip(value: bytes) -> bytes:
        return value.strip()

    @reg.map("reverse", "1")
    def reverse(value: bytes) -> bytes:
        return value[::-1]

    return reg


def _record(value: bytes, header: bytes | None, key: bytes | None = b"k1") -> InputRecord:
    headers = [("traceparent", b"00-1")] + ([(HEADER_KEY, header)] if header is not None else [])
    return InputRecord(value, headers, key, "in", 3, 42)


def _assert_recent(ts: int) -> None:
    assert abs(ts - now_ms()) < 60_000


@pytest.mark.parametrize("alg", [CRC, SHA])
@pytest.mark.parametrize("input_alg", [CRC, SHA])
def test_map_stamper_equals_model(registry: FunctionRegistry, alg, input_alg) -> None:
    upper = registry.get("upper")
    source_value = b" order "
    source = ProvenanceHeader.for_source("order-7", source_value, input_alg, timestamp_ms=TS)
    previous = MapStamper(registry.get("strip"), algorithm=input_alg)
    mid_value = source_value.strip()
    mid_raw = previous.stamp(_record(source_value, source.encode()), mid_value)

    stamper = MapStamper(upper, {"suffix": "!"}, algorithm=alg)
    out_value = upper.apply(mid_value, params={"suffix": "!"})
    assert out_value == b"ORDER!"
    raw = stamper.stamp(_record(mid_value, mid_raw), out_value)

    decoded = ProvenanceHeader.decode(raw)
    _assert_recent(decoded.timestamp_ms)
    expected = ProvenanceHeader(
        "order-7",
        compute(alg, out_value),
        source.checksum,
        decoded.timestamp_ms,
        (registry.get("strip").step(), upper.step({"suffix": "!"})),
    )
    assert decoded == expected
    assert raw == expected.encode()  # byte for byte, not just field for field
    assert decoded.lineage[-1].params == {"suffix": "!"}


def test_map_stamper_defaults_params_from_registration(registry: FunctionRegistry) -> None:
    stamper = MapStamper(registry.get("upper"))
    assert stamper.step.params == {"suffix": ""}


def test_map_stamper_on_a_record_without_provenance(registry: FunctionRegistry) -> None:
    stamper = MapStamper(registry.get("reverse"), algorithm=SHA)
    cases = [
        (b"key-\xc3\xa9", "key-é"),
        (None, "in/3/42"),
        (b"", "in/3/42"),
        (b"\xff\x00", "hex:ff00"),
    ]
    for key, data_id in cases:
        raw = stamper.stamp(_record(b"abc", None, key=key), b"cba")
        decoded = ProvenanceHeader.decode(raw)
        expected = ProvenanceHeader(
            data_id,
            compute(SHA, b"cba"),
            compute(SHA, b"abc"),  # the input is the source
            decoded.timestamp_ms,
            (registry.get("reverse").step(),),
        )
        assert decoded == expected
        assert raw == expected.encode()


@pytest.mark.parametrize("alg", [CRC, SHA])
def test_source_stamper_equals_model(alg) -> None:
    stamper = SourceStamper(alg)
    for data_id in ("order-1", "ü" * 100, ""):
        raw = stamper.header(data_id, b"value")
        decoded = ProvenanceHeader.decode(raw)
        _assert_recent(decoded.timestamp_ms)
        expected = ProvenanceHeader.for_source(data_id, b"value", alg, timestamp_ms=decoded.timestamp_ms)
        assert decoded == expected
        assert raw == expected.encode()
        assert decoded.is_source and decoded.checksum == decoded.source_checksum


def test_source_stamper_bytes_data_id() -> None:
    """A binary key must still give a decodable header (regression: it used to write raw bytes)."""
    stamper = SourceStamper()
    assert ProvenanceHeader.decode(stamper.header(b"order-1", b"v")).data_id == "order-1"
    assert ProvenanceHeader.decode(stamper.header(b"\x00\xff\x10", b"v")).data_id == "hex:00ff10"


def test_chained_map_stampers_carry_source_checksum_and_data_id(registry: FunctionRegistry) -> None:
    source_value = b"  abc  "
    raw = SourceStamper(SHA).header("src-1", source_value)
    source = ProvenanceHeader.decode(raw)
    value = source_value
    chain: list[RegisteredFunction] = [registry.get("strip"), registry.get("upper"), registry.get("reverse")]
    for i, fn in enumerate(chain):
        out = fn.apply(value)
        raw = MapStamper(fn, algorithm=CRC if i % 2 else SHA).stamp(_record(value, raw, key=None), out)
        value = out
        decoded = ProvenanceHeader.decode(raw)
        assert decoded.data_id == "src-1"
        assert decoded.source_checksum == source.checksum
        assert decoded.lineage == tuple(f.step() for f in chain[: i + 1])
        assert verify_value(raw, value)
    assert value == b"CBA"


def test_checksum_mismatch_on_input(registry: FunctionRegistry) -> None:
    raw = SourceStamper().header("s", b"original")
    record = _record(b"tampered", raw)
    with pytest.raises(ChecksumMismatchError) as info:
        MapStamper(registry.get("reverse")).stamp(record, b"x")
    assert isinstance(info.value, HeaderError)
    assert info.value.raw == raw
    # Without verification the step trusts its input and still stamps a correct output header.
    out = MapStamper(registry.get("reverse"), verify_input=False).stamp(record, b"x")
    decoded = ProvenanceHeader.decode(out)
    assert decoded.checksum == compute(CRC, b"x")
    assert decoded.source_checksum == compute(CRC, b"original")


def test_map_stamper_input_header_errors_are_typed(registry: FunctionRegistry) -> None:
    stamper = MapStamper(registry.get("reverse"))
    good = SourceStamper().header("s", b"v")
    for bad in (b"\x00", good[:-1], good + b"\x00", avro.SINGLE_OBJECT_MARKER + b"\x01" * 8):
        with pytest.raises(HeaderError):
            stamper.stamp(_record(b"v", bad), b"out")
    with pytest.raises(MalformedHeaderError):
        stamper.stamp(_record(b"v", b""), b"out")


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_map_stamper_accepts_any_bytes_like_header(registry: FunctionRegistry, kind) -> None:
    """Regression: a bytearray header value hit an unhashable memo key (TypeError), a memoryview
    an AttributeError; both are legitimate header values from other Kafka clients."""
    raw = SourceStamper().header("s", b"v")
    out = MapStamper(registry.get("reverse")).stamp(_record(b"v", kind(raw)), b"o")
    assert ProvenanceHeader.decode(out).data_id == "s"
    assert ProvenanceHeader.from_headers([(HEADER_KEY, kind(raw))]) == ProvenanceHeader.decode(raw)


def test_header_value_of_another_type_is_malformed(registry: FunctionRegistry) -> None:
    with pytest.raises(MalformedHeaderError, match="must be bytes"):
        ProvenanceHeader.from_headers([(HEADER_KEY, "c3 01")])  # type: ignore[list-item]
    with pytest.raises(MalformedHeaderError):
        MapStamper(registry.get("reverse")).stamp(_record(b"v", "c3 01"), b"o")  # type: ignore[arg-type]


def test_map_stamper_memo_does_not_mix_lineages(registry: FunctionRegistry) -> None:
    stamper = MapStamper(registry.get("reverse"))
    a = ProvenanceHeader("a", compute(CRC, b"1"), compute(CRC, b"s"), TS, (_map("one"),))
    b = ProvenanceHeader("b", compute(CRC, b"1"), compute(CRC, b"s"), TS, (_map("two"),))
    for _ in range(3):
        for h in (a, b):
            out = ProvenanceHeader.decode(stamper.stamp(_record(b"1", h.encode()), b"o"))
            assert out.lineage == (*h.lineage, registry.get("reverse").step())
            assert out.data_id == h.data_id


def test_checksum_hex_and_describe() -> None:
    header = SAMPLES["reduce-windowed"]
    view = header.describe()
    assert view["data_id"] == "customer-9"
    assert view["checksum"] == "sha256:" + header.checksum.value.hex()
    assert view["lineage"][0] == "map parse@1()"
    assert "<- 3 inputs" in view["lineage"][1] and f"window [{TS - 60_000}, {TS})" in view["lineage"][1]
    assert Checksum(CRC, b"\x00\x01\x02\x03").hex() == "crc32c:00010203"


def test_a_provenance_header_twice_is_malformed(registry: FunctionRegistry) -> None:
    """Readers differ on which of two they take (first, or Java's `lastHeader()`): ambiguous
    provenance is refused everywhere a header is looked up, agents included."""
    raw = SourceStamper().header("s", b"v")
    twice = [(HEADER_KEY, raw), ("traceparent", b"00-x"), (HEADER_KEY, raw)]
    with pytest.raises(MalformedHeaderError, match="appears 2 times"):
        ProvenanceHeader.from_headers(twice)
    with pytest.raises(MalformedHeaderError, match="appears 2 times"):
        MapStamper(registry.get("reverse")).stamp(InputRecord(b"v", twice, b"k", "t", 0, 0), b"o")
    assert ProvenanceHeader.from_headers(twice[:2]) == ProvenanceHeader.decode(raw)


def test_a_timestamp_varint_must_fit_a_long() -> None:
    """The 10th byte of a varint holds bit 63 only; `scan` (the hot path) refuses more, as the full
    decoder does."""
    good = ProvenanceHeader.for_source("s", b"v", timestamp_ms=-(2**63)).encode()  # the 10-byte extreme
    assert scan(good) and ProvenanceHeader.decode(good).timestamp_ms == -(2**63)
    source_end = scan(good)[1]
    assert good[source_end + 9] == 1
    bad = good[: source_end + 9] + b"\x7f" + good[source_end + 10 :]
    for read in (scan, ProvenanceHeader.decode):
        with pytest.raises(MalformedHeaderError, match="overflows"):
            read(bad)
