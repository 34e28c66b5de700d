"""Ledger values, their hashes (entry identity, chain hash) and their Avro encoding on the topic."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ledger_support import CTX, map_app, node, reduce_app

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.header import ProvenanceHeader
from streamprov.ledger import (
    Application,
    ApplicationKind,
    Context,
    DataRef,
    LedgerEntry,
    MalformedRecordError,
    Origin,
    decode_record,
    encode_record,
    entry_id_of,
    genesis_hash,
    seal,
)
from streamprov.ledger.codec import (
    CHECKPOINT_PREFIX,
    ENTRY_PREFIX,
    decode_entry_body,
    encode_entry_body,
    encode_entry_body_generic,
    stored,
)
from streamprov.ledger.hashing import content_problem
from streamprov.ledger.model import MalformedRecord
from streamprov.lineage import StepKind
from streamprov.registry import FunctionRegistry
from streamprov.stamp import ReduceState

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_entry_id_is_the_same_for_a_replayed_application() -> None:
    a = map_app("to_eur", node("o-1", "100"), node("o-1", "92"), rate=0.92)
    replay = dataclasses.replace(
        a, timestamp_ms=a.timestamp_ms + 5000, device_id="another-pod", context=Context()
    )
    assert entry_id_of(a) == entry_id_of(replay)
    assert seal(a, 0, genesis_hash("l")).entry_hash != seal(replay, 0, genesis_hash("l")).entry_hash


@pytest.mark.parametrize(
    "change",
    [
        {"function_id": "other"},
        {"function_version": "2"},
        {"code_hash": b"x" * 16},
        {"parameters": (("rate", "0.93"),)},
        {"inputs": (node("o-1", "101"),)},
        {"output": node("o-1", "93")},
        {"kind": ApplicationKind.REDUCE},
        {"origin": Origin.RECOMPUTE},
        {"task_id": "task-7"},
        {"window_start": 0},
        {"window_end": 0},
    ],
)
def test_entry_id_changes_with_every_identifying_field(change: dict[str, object]) -> None:
    a = map_app("to_eur", node("o-1", "100"), node("o-1", "92"), rate=0.92)
    assert entry_id_of(dataclasses.replace(a, **change)) != entry_id_of(a)  # type: ignore[arg-type]


def test_hashing_is_length_prefixed_not_concatenated() -> None:
    base = map_app("f", node("a", "1"), node("b", "2"))
    one = dataclasses.replace(base, parameters=(("a", "bc"),))
    two = dataclasses.replace(base, parameters=(("ab", "c"),))
    assert entry_id_of(one) != entry_id_of(two)
    ids = dataclasses.replace(base, function_id="ab", function_version="c")
    assert entry_id_of(ids) != entry_id_of(dataclasses.replace(base, function_id="a", function_version="bc"))
    refs = dataclasses.replace(base, inputs=(DataRef("ab", base.output.checksum),))
    assert entry_id_of(refs) != entry_id_of(
        dataclasses.replace(base, inputs=(DataRef("a", base.output.checksum),))
    )


def test_parameter_order_does_not_change_identity() -> None:
    a = map_app("f", node("a", "1"), node("a", "2"), x=1, y=2)
    shuffled = dataclasses.replace(a, parameters=tuple(reversed(a.parameters)))
    assert entry_id_of(a) == entry_id_of(shuffled)


def test_genesis_binds_the_ledger() -> None:
    assert genesis_hash("a") != genesis_hash("b")
    app = map_app("f", node("a", "1"), node("a", "2"))
    assert seal(app, 0, genesis_hash("a")).entry_hash != seal(app, 0, genesis_hash("b")).entry_hash


def test_content_problem_names_what_was_changed() -> None:
    entry = seal(map_app("f", node("a", "1"), node("a", "2")), 3, genesis_hash("l"))
    assert content_problem(entry) is None
    changed = dataclasses.replace(
        entry, application=dataclasses.replace(entry.application, function_version="9")
    )
    assert "entry_id" in (content_problem(changed) or "")
    relocated = dataclasses.replace(entry, seq=4)
    assert "entry_hash" in (content_problem(relocated) or "")
    retimed = dataclasses.replace(entry, application=dataclasses.replace(entry.application, timestamp_ms=0))
    assert "entry_hash" in (content_problem(retimed) or "")


_text = st.text(max_size=12)
_checksums = st.one_of(
    st.binary(min_size=4, max_size=4).map(lambda b: Checksum(ChecksumAlgorithm.CRC32C, b)),
    st.binary(min_size=32, max_size=32).map(lambda b: Checksum(ChecksumAlgorithm.SHA256, b)),
)
_refs = st.builds(DataRef, _text, _checksums)
_longs = st.integers(-(2**63), 2**63 - 1)
applications = st.builds(
    Application,
    st.sampled_from(ApplicationKind),
    _text,
    _text,
    st.binary(max_size=16),
    st.dictionaries(_text, _text, max_size=3).map(lambda d: tuple(sorted(d.items()))),
    st.lists(_refs, max_size=4).map(tuple),
    _refs,
    _longs,
    _text,
    st.builds(Context, _text, _text, st.lists(_text, max_size=3).map(tuple)),
    st.sampled_from(Origin),
    st.none() | _text,
    st.none() | _longs,
    st.none() | _longs,
)


@settings(max_examples=150, deadline=None)
@given(applications, st.integers(0, 2**62))
def test_entries_round_trip_and_the_fast_encoder_matches_fastavro(app: Application, seq: int) -> None:
    entry = seal(app, seq, genesis_hash("l"))
    assert encode_entry_body(entry) == encode_entry_body_generic(entry)
    assert decode_entry_body(encode_entry_body(entry)) == entry
    raw = encode_record(entry)
    assert raw.startswith(ENTRY_PREFIX)
    back = decode_record(raw)
    assert back == entry and content_problem(back) is None  # type: ignore[arg-type]


def test_plain_fastavro_with_the_schema_file_reads_a_ledger_record() -> None:
    schema = fastavro.schema.load_schema(str(SCHEMAS / "ledger_entry.avsc"))
    fp = bytes.fromhex(
        fastavro.schema.fingerprint(fastavro.schema.to_parsing_canonical_form(schema), "CRC-64-AVRO")
    )
    entry = seal(reduce_app("sum", [node("a", "1"), node("b", "2")], node("k", "3")), 7, genesis_hash("l"))
    raw = encode_record(entry)
    assert raw[:2] == b"\xc3\x01" and raw[2:10] == fp
    record = fastavro.schemaless_reader(io.BytesIO(raw[10:]), schema, None)
    assert record["seq"] == 7 and record["kind"] == "REDUCE" and record["entry_hash"] == entry.entry_hash
    assert [i["data_id"] for i in record["inputs"]] == ["a", "b"]
    assert record["context"] == {"source": CTX.source, "location": CTX.location, "access_rights": ["pii"]}
    assert record["window_end"] == 60_000


def test_schemas_are_valid_json_with_docs() -> None:
    for name in ("ledger_entry", "ledger_checkpoint"):
        schema = json.loads((SCHEMAS / f"{name}.avsc").read_text())
        assert schema["namespace"] == "io.streamprov.ledger" and schema["doc"]
    assert ENTRY_PREFIX != CHECKPOINT_PREFIX


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc3\x01",
        b"not avro at all",
        ENTRY_PREFIX,
        ENTRY_PREFIX + b"\x00" * 5,
        CHECKPOINT_PREFIX + b"\x02\x02",
        b"\xc3\x01" + b"\x00" * 8 + b"body",
    ],
)
def test_malformed_records_raise_one_typed_error(raw: bytes) -> None:
    with pytest.raises(MalformedRecordError):
        decode_record(raw)
    kept = stored(3, raw)
    assert kept.offset == 3 and isinstance(kept.record, MalformedRecord) and kept.record.raw == raw


def test_truncated_and_extended_records_are_malformed() -> None:
    raw = encode_record(seal(map_app("f", node("a", "1"), node("a", "2")), 0, genesis_hash("l")))
    with pytest.raises(MalformedRecordError):
        decode_record(raw[:-1])
    with pytest.raises(MalformedRecordError):
        decode_record(raw + b"\x00")


def test_of_step_and_step_round_trip_a_reduce_header() -> None:
    registry = FunctionRegistry()
    total = registry.add(lambda acc, v: acc + v, "total", "3", kind=StepKind.REDUCE, initial=int)
    state = ReduceState(accumulator=0)
    inputs = []
    for i in range(5):
        header = ProvenanceHeader.for_source(f"o-{i}", f"{i}".encode())
        state.add(total, {}, header, i)
        inputs.append(DataRef(header.data_id, header.checksum))
    out = state.header(total.step(), "k", b"10", ChecksumAlgorithm.CRC32C, window=(0, 60_000))
    reduce_step = out.lineage[-1]
    app = Application.of_step(reduce_step, inputs, DataRef(out.data_id, out.checksum), device_id="pod")
    assert app.kind is ApplicationKind.REDUCE and (app.window_start, app.window_end) == (0, 60_000)
    assert reduce_step.inputs is not None and app.check_input_digest(reduce_step.inputs)
    assert app.step() == reduce_step
    shuffled = dataclasses.replace(app, inputs=tuple(reversed(app.inputs)))
    assert not shuffled.check_input_digest(reduce_step.inputs)


def test_source_applications_and_descriptions() -> None:
    src = Application.of_source(node("o-1", "v1"), timestamp_ms=5, device_id="d", context=CTX)
    assert src.step() is None and src.describe().startswith("source o-1@crc32c:")
    m = map_app("to_eur", node("o-1", "v1"), node("o-1", "v2"), rate=0.92)
    assert m.describe().startswith("map to_eur@1(rate=0.92): o-1@")
    step = m.step()
    assert step is not None and step.function_id == "to_eur" and step.params == {"rate": 0.92}
    assert isinstance(seal(m, 0, genesis_hash("l")), LedgerEntry)
