"""The sequencer's request codec: round trip, the schema file agrees with the entry schema, and
untrusted bytes only ever raise `MalformedRecordError`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import fastavro
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_support import pipeline

from streamprov.ledger import MalformedRecordError
from streamprov.ledger.requests import REQUEST_PREFIX, decode_request, encode_request

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SEALING = {"entry_id", "seq", "prev_hash", "entry_hash"}


def test_round_trip_keeps_every_field_and_the_order() -> None:
    apps = pipeline(3, chain_len=2, fan_in=2)  # sources, maps, reduces with windows
    request = decode_request(encode_request("ledger-a", apps))
    assert request.ledger_id == "ledger-a"
    assert request.applications == tuple(apps)


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
