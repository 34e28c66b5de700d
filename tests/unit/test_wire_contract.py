"""The wire contract: any Avro reader holding the files in schemas/ decodes what streamprov writes.

The write side uses streamprov; the read side (`_plain_read`) uses only json, fastavro and the .avsc
file on disk, so a change that makes our bytes drift from the published schema fails here. To keep
that separation visible, streamprov is imported only inside the functions that write or decode with it.
"""

# ruff: noqa: PLC0415

from __future__ import annotations

import copy
import datetime
import io
import json
import struct
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, load_schema, to_parsing_canonical_form

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"
SCHEMA_FILE = SCHEMAS / "provenance_header.avsc"
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
TS = 1_731_000_000_123


# --- the plain reader: no streamprov below this line until the write side ------------------------


def _plain_fingerprint(schema: Any) -> bytes:
    """CRC-64-AVRO of the parsing canonical form; the spec's single-object frame stores it little-endian."""
    hex_fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    as_int = int(hex_fp, 16)
    little_endian = bytes.fromhex(hex_fp)
    # fastavro renders the fingerprint as the little-endian byte string in hex; cross-check with the
    # spec's reference algorithm below so a change in fastavro's convention cannot slip through.
    assert little_endian == _crc64_avro(to_parsing_canonical_form(schema).encode()).to_bytes(8, "little")
    assert as_int.bit_length() <= 64
    return little_endian


def _crc64_avro(data: bytes) -> int:
    """The Avro specification's reference Rabin fingerprint (CRC-64-AVRO), written out."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def _plain_read(raw: bytes) -> dict[str, Any]:
    """Decode a provenance header with plain fastavro and the .avsc file alone."""
    schema = load_schema(str(SCHEMA_FILE))
    assert raw[:2] == b"\xc3\x01", "single-object marker"
    assert raw[2:10] == _plain_fingerprint(schema), "fingerprint of schemas/provenance_header.avsc"
    body = io.BytesIO(raw[10:])
    record: dict[str, Any] = fastavro.schemaless_reader(body, schema, None)
    assert body.read() == b"", "the body holds exactly one record"
    return record


def test_plain_fingerprint_matches_the_spec_example() -> None:
    # The Avro spec's fingerprint of the canonical form '"int"' is 0x7275d51a3f395c8f (as a long).
    assert _crc64_avro(b'"int"') == 0x7275D51A3F395C8F
    assert _plain_fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")


# --- the write side -----------------------------------------------------------------------------


def _written_headers() -> dict[str, tuple[bytes, dict[str, Any]]]:
    """Headers written by streamprov, with the plain record each must decode to."""
    from streamprov.checksum import ChecksumAlgorithm, compute
    from streamprov.header import ProvenanceHeader
    from streamprov.lineage import InputDigest, Step, StepKind
    from streamprov.registry import FunctionRegistry
    from streamprov.stamp import InputRecord, MapStamper, SourceStamper

    reg = FunctionRegistry()
    clean = reg.add(lambda v, unit: v, "clean", "1.2", params={"unit": "EUR"})
    map_step = clean.step({"rounding": {"mode": "half-even", "digits": 2}})
    digest = InputDigest(10_000, bytes(range(32)), TS - 60_000, TS)
    reduce_step = Step.create(StepKind.REDUCE, "sum", "3", bytes(16), {}, digest)
    crc, sha = ChecksumAlgorithm.CRC32C, ChecksumAlgorithm.SHA256
    header = ProvenanceHeader(
        "customer/ü/" + "x" * 70, compute(sha, b"out"), compute(crc, b"src"), TS, (map_step, reduce_step)
    )
    source_raw = SourceStamper(crc).header("order-1", b"value")
    stamped = MapStamper(clean, algorithm=sha).stamp(
        InputRecord(b"value", [("streamprov", source_raw)], b"order-1", "t", 0, 0), b"VALUE"
    )
    stamped_ts = ProvenanceHeader.decode(stamped).timestamp_ms
    source_ts = ProvenanceHeader.decode(source_raw).timestamp_ms
    plain_map_step = {
        "kind": "MAP",
        "function_id": "clean",
        "function_version": "1.2",
        "code_hash": clean.code_hash,
        "parameters": {"unit": '"EUR"'},
        "inputs": None,
    }
    return {
        "model": (
            header.encode(),
            {
                "checksum": {"algorithm": "SHA256", "value": compute(sha, b"out").value},
                "source_checksum": {"algorithm": "CRC32C", "value": compute(crc, b"src").value},
                "timestamp": TS,
                "data_id": "customer/ü/" + "x" * 70,
                "lineage": [
                    {
                        "kind": "MAP",
                        "function_id": "clean",
                        "function_version": "1.2",
                        "code_hash": clean.code_hash,
                        "parameters": {
                            "rounding": '{"digits":2,"mode":"half-even"}',
                            "unit": '"EUR"',
                        },
                        "inputs": None,
                    },
                    {
                        "kind": "REDUCE",
                        "function_id": "sum",
                        "function_version": "3",
                        "code_hash": bytes(16),
                        "parameters": {},
                        "inputs": {
                            "count": 10_000,
                            "merkle_root": bytes(range(32)),
                            "window_start": TS - 60_000,
                            "window_end": TS,
                        },
                    },
                ],
            },
        ),
        "source-stamper": (
            source_raw,
            {
                "checksum": {"algorithm": "CRC32C", "value": compute(crc, b"value").value},
                "source_checksum": {"algorithm": "CRC32C", "value": compute(crc, b"value").value},
                "timestamp": source_ts,
                "data_id": "order-1",
                "lineage": [],
            },
        ),
        "map-stamper": (
            stamped,
            {
                "checksum": {"algorithm": "SHA256", "value": compute(sha, b"VALUE").value},
                "source_checksum": {"algorithm": "CRC32C", "value": compute(crc, b"value").value},
                "timestamp": stamped_ts,
                "data_id": "order-1",
                "lineage": [plain_map_step],
            },
        ),
    }


@pytest.mark.parametrize("name", ["model", "source-stamper", "map-stamper"])
def test_plain_fastavro_reads_what_streamprov_writes(name: str) -> None:
    raw, expected = _written_headers()[name]
    record = _plain_read(raw)
    # timestamp-millis comes back as an aware datetime from a plain reader; compare exactly.
    ts = record.pop("timestamp")
    assert ts == EPOCH + datetime.timedelta(milliseconds=expected.pop("timestamp"))
    assert record == expected


def test_field_order_is_the_contract() -> None:
    schema = json.loads(SCHEMA_FILE.read_text("utf-8"))
    assert [f["name"] for f in schema["fields"]] == [
        "checksum",
        "source_checksum",
        "timestamp",
        "data_id",
        "lineage",
    ]
    assert schema["fields"][2]["type"] == {"type": "long", "logicalType": "timestamp-millis"}


def test_prefix_fingerprint_matches_the_schema_file() -> None:
    from streamprov.header import PREFIX

    schema = load_schema(str(SCHEMA_FILE))
    assert b"\xc3\x01" + _plain_fingerprint(schema) == PREFIX
    # The fingerprint ignores docs and logical types (not in the canonical form) but not names.
    raw_json = json.loads(SCHEMA_FILE.read_text("utf-8"))
    undocumented = copy.deepcopy(raw_json)
    undocumented.pop("doc")
    assert _plain_fingerprint(fastavro.parse_schema(undocumented)) == PREFIX[2:]
    renamed = copy.deepcopy(raw_json)
    renamed["fields"][3]["name"] = "dataid"
    assert _plain_fingerprint(fastavro.parse_schema(renamed)) != PREFIX[2:]


def test_packaged_schema_is_the_published_one() -> None:
    from streamprov import avro

    assert avro.load_schema_json("provenance_header") == json.loads(SCHEMA_FILE.read_text("utf-8"))


def test_unknown_fingerprint_raises_unknown_schema() -> None:
    from streamprov.errors import UnknownSchemaError
    from streamprov.header import ProvenanceHeader

    raw = ProvenanceHeader.for_source("a", b"v", timestamp_ms=TS).encode()
    newer = b"\xc3\x01" + struct.pack("<Q", 0x0123456789ABCDEF) + raw[10:]
    with pytest.raises(UnknownSchemaError, match="efcdab8967452301") as info:
        ProvenanceHeader.decode(newer)
    assert info.value.raw == newer


# --- an older schema version stays readable -----------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers older versions into its own copy of the registry of known versions."""
    import streamprov.header as header_module

    monkeypatch.setattr(header_module, "_OLDER_VERSIONS", dict(header_module._OLDER_VERSIONS))


def _older_schemas() -> dict[str, dict[str, Any]]:
    current = json.loads(SCHEMA_FILE.read_text("utf-8"))
    no_window = copy.deepcopy(current)
    step = no_window["fields"][4]["type"]["items"]
    digest = step["fields"][5]["type"][1]
    digest["fields"] = [f for f in digest["fields"] if f["name"] not in ("window_start", "window_end")]
    no_inputs = copy.deepcopy(current)
    step = no_inputs["fields"][4]["type"]["items"]
    step["fields"] = [f for f in step["fields"] if f["name"] != "inputs"]
    return {"no-window": no_window, "no-inputs": no_inputs}


def _plain_single_object(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    parsed = fastavro.parse_schema(copy.deepcopy(schema))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, parsed, record)
    return b"\xc3\x01" + _plain_fingerprint(parsed) + body.getvalue()


def _older_record(ts: int, inputs: dict[str, Any] | None, with_inputs_field: bool) -> dict[str, Any]:
    step: dict[str, Any] = {
        "kind": "REDUCE",
        "function_id": "sum",
        "function_version": "1",
        "code_hash": b"\x07" * 16,
        "parameters": {"field": '"amount"'},
    }
    if with_inputs_field:
        step["inputs"] = inputs
    return {
        "checksum": {"algorithm": "SHA256", "value": b"\x01" * 32},
        "source_checksum": {"algorithm": "CRC32C", "value": b"\x02\x03\x04\x05"},
        "timestamp": ts,
        "data_id": "key-é",
        "lineage": [step],
    }


# Timestamps that a float round trip through datetime.timestamp() used to get wrong by 1 ms, one
# beyond year 9999 and one before year 1 (datetime cannot hold them; an Avro long can).
OLD_TIMESTAMPS = [TS, 2_197_322_347_193, -8_605_548_232_074, 0, -1, 253_402_300_800_000, -62_135_596_800_001]


@pytest.mark.parametrize("ts", OLD_TIMESTAMPS)
@pytest.mark.parametrize("version", ["no-window", "no-inputs"])
def test_older_version_stays_readable(version: str, ts: int) -> None:
    from streamprov.checksum import Checksum, ChecksumAlgorithm
    from streamprov.errors import UnknownSchemaError
    from streamprov.header import ProvenanceHeader, register_older_version
    from streamprov.lineage import InputDigest, StepKind

    schema = _older_schemas()[version]
    inputs = {"count": 12, "merkle_root": b"\x09" * 32} if version == "no-window" else None
    raw = _plain_single_object(schema, _older_record(ts, inputs, version == "no-window"))
    # Unknown until registered: an older writer is just as foreign as a newer one.
    with pytest.raises(UnknownSchemaError):
        ProvenanceHeader.decode(raw)
    register_older_version(schema)
    header = ProvenanceHeader.decode(raw)
    assert header.data_id == "key-é"
    assert header.timestamp_ms == ts
    assert header.checksum == Checksum(ChecksumAlgorithm.SHA256, b"\x01" * 32)
    assert header.source_checksum == Checksum(ChecksumAlgorithm.CRC32C, b"\x02\x03\x04\x05")
    (step,) = header.lineage
    assert (step.kind, step.function_id, step.function_version) == (StepKind.REDUCE, "sum", "1")
    assert step.code_hash == b"\x07" * 16
    assert step.params == {"field": "amount"}
    if version == "no-window":
        assert step.inputs == InputDigest(12, b"\x09" * 32, None, None)  # new fields take defaults
    else:
        assert step.inputs is None
    # Re-encoding writes the current version, which decodes to the same header.
    again = header.encode()
    assert again[2:10] != raw[2:10]
    assert ProvenanceHeader.decode(again) == header


def test_older_version_rejects_damage_with_typed_errors() -> None:
    from streamprov.errors import MalformedHeaderError
    from streamprov.header import ProvenanceHeader, register_older_version

    schema = _older_schemas()["no-inputs"]
    register_older_version(schema)
    raw = _plain_single_object(schema, _older_record(TS, None, False))
    with pytest.raises(MalformedHeaderError, match="trailing"):
        ProvenanceHeader.decode(raw + b"\x00")
    for cut in range(10, len(raw)):
        with pytest.raises(MalformedHeaderError):
            ProvenanceHeader.decode(raw[:cut])
    wrong_size = copy.deepcopy(_older_record(TS, None, False))
    wrong_size["checksum"] = {"algorithm": "CRC32C", "value": b"\x01" * 5}
    with pytest.raises(MalformedHeaderError, match="5 bytes"):
        ProvenanceHeader.decode(_plain_single_object(schema, wrong_size))


def test_map_stamper_upgrades_an_older_input_header() -> None:
    from streamprov.checksum import ChecksumAlgorithm, compute
    from streamprov.header import PREFIX, ProvenanceHeader, register_older_version
    from streamprov.registry import FunctionRegistry
    from streamprov.stamp import ChecksumMismatchError, InputRecord, MapStamper

    schema = _older_schemas()["no-inputs"]
    register_older_version(schema)
    record = _older_record(TS, None, False)
    record["checksum"] = {"algorithm": "CRC32C", "value": compute(ChecksumAlgorithm.CRC32C, b"in").value}
    raw = _plain_single_object(schema, record)
    fn = FunctionRegistry().add(lambda v: v, "id", "1")
    out = MapStamper(fn).stamp(InputRecord(b"in", [("streamprov", raw)], None, "t", 0, 0), b"out")
    assert out.startswith(PREFIX)
    decoded = ProvenanceHeader.decode(out)
    older = ProvenanceHeader.decode(raw)
    assert decoded.lineage == (*older.lineage, fn.step())
    assert (decoded.data_id, decoded.source_checksum) == (older.data_id, older.source_checksum)
    with pytest.raises(ChecksumMismatchError):
        MapStamper(fn).stamp(InputRecord(b"other", [("streamprov", raw)], None, "t", 0, 0), b"out")


def test_history_folder_versions_are_registered() -> None:
    """Every schema in schemas/history/ is readable (today the folder may be empty)."""
    from streamprov.header import _OLDER_VERSIONS

    history = sorted((SCHEMAS / "history").glob("*.avsc"))
    for path in history:
        fp = _plain_fingerprint(load_schema(str(path)))
        assert fp in _OLDER_VERSIONS, path.name


# --- docs/header-format.md stays true -----------------------------------------------------------

DOC = Path(__file__).resolve().parents[2] / "docs" / "header-format.md"


def _doc_blocks(lang: str) -> list[str]:
    text = DOC.read_text("utf-8")
    return [block.split("\n```", 1)[0] for block in text.split(f"```{lang}\n")[1:]]


def test_doc_hex_dump_is_what_the_codec_writes() -> None:
    from streamprov.checksum import ChecksumAlgorithm, compute
    from streamprov.header import ProvenanceHeader
    from streamprov.lineage import Step, StepKind

    (dump,) = [b for b in _doc_blocks("") if b.startswith("00000000:")]
    documented = bytes.fromhex("".join(line[10:50] for line in dump.splitlines()).replace(" ", ""))
    crc = ChecksumAlgorithm.CRC32C
    step = Step.create(
        StepKind.MAP, "to_eur", "1", bytes.fromhex("24367332e58de7b83a8d2f1f1adb32fa"), {"rate": 0.92}
    )
    header = ProvenanceHeader(
        "order-42", compute(crc, b'{"amount":92.0}'), compute(crc, b'{"amount":100}'), 1731000000123, (step,)
    )
    assert header.encode() == documented
    assert _plain_read(documented)["data_id"] == "order-42"


def test_doc_plain_reader_snippet_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from streamprov.header import ProvenanceHeader

    (snippet,) = [b for b in _doc_blocks("python") if "schemaless_reader" in b]
    assert len(snippet.strip().splitlines()) <= 14
    raw = ProvenanceHeader.for_source("order-1", b"v", timestamp_ms=TS).encode()

    class Message:
        def headers(self) -> list[tuple[str, bytes]]:
            return [("traceparent", b"00"), ("streamprov", raw)]

    monkeypatch.chdir(SCHEMAS.parent)
    namespace: dict[str, Any] = {"message": Message()}
    exec(snippet, namespace)
    assert namespace["header"]["data_id"] == "order-1"
    assert namespace["header"]["lineage"] == []
