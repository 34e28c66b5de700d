"""The sequencer's request codec: round trip, the schema file agrees with the entry schema, and
untrusted bytes only ever raise `MalformedRecordError`."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_support import pipeline

from streamprov.checksum import ChecksumAlgorithm, compute
from streamprov.header import HEADER_KEY
from streamprov.ledger import MalformedRecordError
from streamprov.ledger.model import ApplicationKind, AppTemplate, Context, Origin, application_of
from streamprov.ledger.requests import REQUEST_PREFIX, _fastavro_request, decode_request, encode_request
from streamprov.ledger.rows import expand
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
