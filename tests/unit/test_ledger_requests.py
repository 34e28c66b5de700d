"""The sequencer's request codec: round trip, the schema file agrees with the entry schema, and
untrusted bytes only ever raise `MalformedRecordError`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ledger_support import pipeline, signer, verifier

from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY, PREFIX, ProvenanceHeader
from streamprov.ledger import EntryTooLargeError, LedgerChain, MalformedRecordError, verify_ledger
from streamprov.ledger.codec import encode_record, record_key, stored
from streamprov.ledger.model import (
    ApplicationKind,
    AppTemplate,
    Context,
    MalformedRecord,
    MapRow,
    Origin,
    application_of,
)
from streamprov.ledger.requests import (
    REQUEST_PREFIX,
    KafkaLedgerClient,
    LedgerRequest,
    _fastavro_request,
    decode_request,
    encode_request,
)
from streamprov.ledger.rows import RowSealer, expand
from streamprov.ledger.sequencer import LedgerSequencer, SequencerStats
from streamprov.lineage import StepKind
from streamprov.registry import FunctionRegistry
from streamprov.stamp import InputRecord, MapStamper, SourceStamper

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SEALING = {"entry_id", "seq", "prev_hash", "entry_hash"}


def test_round_trip_keeps_every_field_and_the_order() -> None:
    apps = pipeline(3, chain_len=2, fan_in=2)  # sources, maps, reduces with windows
    request = decode_request(encode_request("ledger-a", apps))
    assert request.ledger_id == "ledger-a"
    assert request.expanded() == tuple(apps)


def test_request_schema_is_the_entry_schema_without_the_sealed_fields() -> None:
    entry = json.loads((SCHEMAS / "ledger_entry.avsc").read_text())
    request = json.loads((SCHEMAS / "ledger_request.avsc").read_text())
    app = request["fields"][1]["type"]["items"]
    assert [f for f in entry["fields"] if f["name"] not in SEALING] == app["fields"]
    # and plain fastavro with the file alone reads what we write
    raw = encode_request("x", pipeline(1)[:2])
    parsed = fastavro.parse_schema(request)
    datum = fastavro.schemaless_reader(io.BytesIO(raw[len(REQUEST_PREFIX) :]), parsed)
    assert isinstance(datum, dict) and datum["ledger_id"] == "x" and len(datum["applications"]) == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=400))
def test_garbage_and_truncations_raise_a_typed_error(junk: bytes, cut: int) -> None:
    good = encode_request("l", pipeline(1)[:3])
    for raw in (junk, REQUEST_PREFIX + junk, good[:cut] if cut < len(good) else good + junk[:1] + b"x"):
        try:
            decode_request(raw)
        except MalformedRecordError:
            continue


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.sampled_from(list(ChecksumAlgorithm)),
    st.binary(max_size=40),
    st.booleans(),
)
def test_map_rows_travel_as_header_bytes_and_arrive_as_the_same_applications(
    data_id: str, alg: ChecksumAlgorithm, value: bytes, with_header: bool
) -> None:
    fn = FunctionRegistry().add(lambda v: v, "id", "1", kind=StepKind.MAP)
    source = SourceStamper(alg).header(data_id, value) if with_header else None
    record = InputRecord(value, [(HEADER_KEY, source)] if source else [], data_id.encode(), "t", 0, 7)
    out_header = MapStamper(fn, None, alg).stamp(record, value + b"!")
    c = compute(alg, value)
    row = (0, source, None if source else (int(c.algorithm), c.value), out_header)
    template = AppTemplate(
        ApplicationKind.MAP, "id", "1", b"h" * 16, (("p", "1"),), "pod-1", Context("s", "eu", ("pii",))
    )
    extra = pipeline(1)[:2]
    request = decode_request(encode_request("l", extra, [(template, [row, row])]))
    expected = application_of(template, expand(row))
    assert request.applications == tuple(extra) and len(request) == 4
    assert request.expanded() == (*extra, expected, expected)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0, 1]),
            st.lists(
                st.tuples(
                    st.one_of(
                        st.binary(max_size=300), st.tuples(st.sampled_from([0, 1]), st.binary(max_size=40))
                    ),
                    st.binary(max_size=300),
                ),
                max_size=70,
            ),
        ),
        max_size=3,
    ),
    st.text(max_size=20),
)
def test_hand_written_map_rows_are_the_bytes_fastavro_writes(
    batches: list[tuple[int, list[tuple[Any, bytes]]]], ledger_id: str
) -> None:
    templates = [
        AppTemplate(
            ApplicationKind.MAP, "id", "1", b"h" * 16, (("p", "1"),), "pod-1", Context("s", "eu", ("x",))
        ),
        AppTemplate(ApplicationKind.MAP, "g", "2", b"", (), "", Context(), Origin.RECOMPUTE, "task-7"),
    ]
    map_rows = [
        (
            templates[t],
            [(0, i, None, o) if isinstance(i, bytes) else (0, None, i, o) for i, o in rows],
        )
        for t, rows in batches
    ]
    apps = pipeline(1)[:1]
    assert encode_request(ledger_id, apps, map_rows) == _fastavro_request(ledger_id, apps, map_rows)


# -- what the sequencer seals must decode back -------------------------------------------------------------
# A probe sealed map rows whose input checksum had the wrong size for its algorithm: the codec refuses
# such an entry on read-back, so `ledger verify` reported the ledger MODIFIED, `ledger index` and every
# later sequencer failed on it, for good. The request is refused at decode (dead-lettered).

_TEMPLATE = AppTemplate(ApplicationKind.MAP, "f", "1", b"0123456789abcdef", (), "dev", Context("s", "l", ()))
_OUT = ProvenanceHeader.for_source("d1", b"value", timestamp_ms=1_700_000_000_000).encode()
_IN_CRC = ProvenanceHeader.for_source("d0", b"v0", timestamp_ms=1).encode()
_IN_SHA = ProvenanceHeader.for_source("d0", b"v0", ChecksumAlgorithm.SHA256, timestamp_ms=1).encode()
_P = len(PREFIX)


def _claiming(header: bytes, algorithm: ChecksumAlgorithm) -> bytes:
    """`header` with its checksum's algorithm byte changed (the digest and its length kept)."""
    return header[:_P] + bytes([int(algorithm) << 1]) + header[_P + 1 :]


BAD_ROWS = {
    "checksum: CRC32C of 10 bytes": (0, None, (int(ChecksumAlgorithm.CRC32C), b"0123456789"), _OUT),
    "checksum: SHA256 of 4 bytes": (0, None, (int(ChecksumAlgorithm.SHA256), b"1234"), _OUT),
    "checksum: empty CRC32C": (0, None, (int(ChecksumAlgorithm.CRC32C), b""), _OUT),
    "header: CRC32C with 32 bytes": (0, _claiming(_IN_SHA, ChecksumAlgorithm.CRC32C), None, _OUT),
    "header: SHA256 with 4 bytes": (0, _claiming(_IN_CRC, ChecksumAlgorithm.SHA256), None, _OUT),
}


@pytest.mark.parametrize("row", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_map_row_with_a_digest_of_the_wrong_size_is_refused_at_decode(row: Any) -> None:
    raw = encode_request("l", pipeline(1)[:2], [(_TEMPLATE, [_good_row(), row])])
    with pytest.raises(
        MalformedRecordError, match=r"map row 1 of batch 0: input (checksum|header): .*(digest|checksum)"
    ) as info:
        decode_request(raw)
    assert info.value.raw == raw  # kept for the dead letter


@pytest.mark.parametrize("row", BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_the_row_sealer_refuses_a_digest_of_the_wrong_size_rather_than_seal_it(row: Any) -> None:
    """The fast path (`_map_parts`) and the general one (`expand`) agree: nothing sealed."""
    items: list[tuple[bytes, bytes]] = []
    with pytest.raises(MalformedRecordError, match=r"^input (checksum|header): .*(digest|checksum)"):
        RowSealer(LedgerChain("l", None)).seal(_TEMPLATE, row, items)
    assert items == []


def _good_row() -> MapRow:
    return (0, _IN_CRC, None, _OUT)


def _seal_like_the_sequencer(request: LedgerRequest) -> list[tuple[bytes, bytes]]:
    chain = LedgerChain("l", signer(), checkpoint_every=3)
    sequencer = SimpleNamespace(_chain=chain, _sealer=RowSealer(chain), _template_keys={})
    items: list[tuple[bytes, bytes]] = []
    LedgerSequencer._seal_request(sequencer, request, items, SequencerStats())  # type: ignore[arg-type]
    cp = chain.checkpoint()
    if cp is not None:
        items.append((record_key(cp), encode_record(cp)))
    return items


_BASE = encode_request(
    "l",
    pipeline(1, chain_len=1, fan_in=2)[:3],
    [
        (
            _TEMPLATE,
            [
                (0, _IN_CRC, None, _OUT),
                (0, _IN_SHA, None, _OUT),
                (0, None, (0, b"\x01\x02\x03\x04"), _OUT),
                (0, None, (1, bytes(range(32))), _OUT),
            ],
        )
    ],
)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_BASE) - 1), st.integers(0, 255)), min_size=1, max_size=3))
@example([(_BASE.index(_IN_SHA) + _P, 0)])  # the probe's row: a header claiming CRC32C, 32 bytes after
def test_whatever_decodes_as_a_request_seals_into_records_that_decode_and_verify(
    changes: list[tuple[int, int]],
) -> None:
    """The principle behind the fix: a request the door (`decode_request`) lets in seals only into
    records the codec reads back and the verifier accepts. Any byte of a valid request, changed."""
    raw = bytearray(_BASE)
    for at, byte in changes:
        raw[at] = byte
    try:
        request = decode_request(bytes(raw))
    except MalformedRecordError:
        return
    records = [stored(offset, value) for offset, (_, value) in enumerate(_seal_like_the_sequencer(request))]
    assert [r.record.reason for r in records if isinstance(r.record, MalformedRecord)] == []
    report = verify_ledger(records, "l", verifier(), require_signed=True)
    assert report.ok, report.describe()


def test_the_mutation_base_seals_and_verifies() -> None:
    records = [stored(i, v) for i, (_, v) in enumerate(_seal_like_the_sequencer(decode_request(_BASE)))]
    assert verify_ledger(records, "l", verifier(), require_signed=True).entries == 7


def test_the_client_refuses_a_map_row_too_large_for_a_ledger_record() -> None:
    """As it refuses a too-large application: `EntryTooLargeError`, nothing of the call queued (the
    sequencer would dead-letter it; before, the broker refused its batch until the sequencer stopped)."""
    client = KafkaLedgerClient("127.0.0.1:1", "req", "l")  # never sends: nothing is flushed
    key = client.template(_TEMPLATE)
    big = ProvenanceHeader.for_source("X" * 600_000, b"value", timestamp_ms=1).encode()
    with pytest.raises(EntryTooLargeError, match=r"map application of f@1 needs about 1200\d\d\d bytes"):
        client.append_rows([(key, _IN_CRC, None, _OUT), (key, None, (0, b"1234"), big)])
    assert client._pending_count == 0 and not client._pending_rows
    client.append_rows([(key, _IN_CRC, None, _OUT)])
    assert client._pending_count == 1
