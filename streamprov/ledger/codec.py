"""Ledger records as bytes: Avro single-object encoding of `LedgerEntry` and `LedgerCheckpoint`.

One ledger topic carries both kinds; the schema fingerprint in each record's prefix says which, so
any Avro reader holding schemas/ledger_entry.avsc and schemas/ledger_checkpoint.avsc decodes the
topic. Decoding untrusted bytes raises only `MalformedRecordError` (a verifier reports it, it never
crashes on it). The index stores the schemaless body of entries (`encode_entry_body`): the same
Avro without the 10-byte prefix.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import fastavro
from fastavro.schema import parse_schema

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.ledger.errors import MalformedRecordError
from streamprov.ledger.hashing import HASH_SIZE
from streamprov.ledger.model import (
    Application,
    ApplicationKind,
    Checkpoint,
    Context,
    DataRef,
    LedgerEntry,
    LedgerRecord,
    MalformedRecord,
    Origin,
    StoredRecord,
)

ENTRY_SCHEMA_JSON = avro.load_schema_json("ledger_entry")
CHECKPOINT_SCHEMA_JSON = avro.load_schema_json("ledger_checkpoint")
ENTRY_PREFIX = avro.single_object_prefix(ENTRY_SCHEMA_JSON)
CHECKPOINT_PREFIX = avro.single_object_prefix(CHECKPOINT_SCHEMA_JSON)
_PREFIX_LEN = len(ENTRY_PREFIX)

# Logical types off: timestamps stay the exact longs written (see avro.without_logical_types).
_ENTRY_SCHEMA = parse_schema(avro.without_logical_types(ENTRY_SCHEMA_JSON))
_CHECKPOINT_SCHEMA = parse_schema(avro.without_logical_types(CHECKPOINT_SCHEMA_JSON))
DIGEST_SIZES = {ChecksumAlgorithm.CRC32C: 4, ChecksumAlgorithm.SHA256: 32}
"""The one digest size of each algorithm: an entry holding another does not decode."""
KEY_ID_SIZE = 8
SIGNATURE_SIZE = 64


def _ref_to_avro(ref: DataRef) -> dict[str, Any]:
    return {
        "data_id": ref.data_id,
        "checksum": {"algorithm": ref.checksum.algorithm.name, "value": ref.checksum.value},
    }


def application_to_avro(app: Application) -> dict[str, Any]:
    """The Avro datum of an application's fields (shared by ledger entries and sequencer requests)."""
    return {
        "kind": app.kind.name,
        "function_id": app.function_id,
        "function_version": app.function_version,
        "code_hash": app.code_hash,
        "parameters": dict(app.parameters),
        "inputs": [_ref_to_avro(r) for r in app.inputs],
        "output": _ref_to_avro(app.output),
        "window_start": app.window_start,
        "window_end": app.window_end,
        "origin": app.origin.name,
        "task_id": app.task_id,
        "timestamp": app.timestamp_ms,
        "device_id": app.device_id,
        "context": {
            "source": app.context.source,
            "location": app.context.location,
            "access_rights": list(app.context.access_rights),
        },
    }


def _entry_to_avro(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "entry_id": entry.entry_id,
        "seq": entry.seq,
        "prev_hash": entry.prev_hash,
        **application_to_avro(entry.application),
        "entry_hash": entry.entry_hash,
    }


def _write(schema: Any, datum: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema, datum)
    return buf.getvalue()


_enc_long = avro.encode_long
_NULL = b"\x00"  # union branch 0 (null); branch 1 is b"\x02" followed by the value
_SOME = b"\x02"
_END = b"\x00"  # end of an array or map: a block of 0 items


def _enc_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _enc_long(len(raw)) + raw


def _enc_bytes(raw: bytes) -> bytes:
    return _enc_long(len(raw)) + raw


def _enc_ref(ref: DataRef) -> bytes:
    return b"".join(
        (_enc_str(ref.data_id), _enc_long(ref.checksum.algorithm), _enc_bytes(ref.checksum.value))
    )


def _enc_opt_long(value: int | None) -> bytes:
    return _NULL if value is None else _SOME + _enc_long(value)


@functools.lru_cache(maxsize=1024)
def _enc_function(
    kind: int, function_id: str, version: str, code_hash: bytes, parameters: tuple[tuple[str, str], ...]
) -> bytes:
    parts = [_enc_long(kind), _enc_str(function_id), _enc_str(version), _enc_bytes(code_hash)]
    if parameters:
        parts.append(_enc_long(len(parameters)))
        parts += [_enc_str(k) + _enc_str(v) for k, v in sorted(parameters)]
    parts.append(_END)
    return b"".join(parts)


@functools.lru_cache(maxsize=1024)
def _enc_window_origin(
    window_start: int | None, window_end: int | None, origin: int, task_id: str | None
) -> bytes:
    return b"".join(
        (
            _enc_opt_long(window_start),
            _enc_opt_long(window_end),
            _enc_long(origin),
            _NULL if task_id is None else _SOME + _enc_str(task_id),
        )
    )


@functools.lru_cache(maxsize=256)
def _enc_device_context(device_id: str, ctx: Context) -> bytes:
    parts = [_enc_str(device_id), _enc_str(ctx.source), _enc_str(ctx.location)]
    if ctx.access_rights:
        parts.append(_enc_long(len(ctx.access_rights)))
        parts += [_enc_str(r) for r in ctx.access_rights]
    parts.append(_END)
    return b"".join(parts)


_ONE_ITEM = _enc_long(1)


def encode_entry_body(entry: LedgerEntry) -> bytes:
    """The entry's Avro body without the single-object prefix (what the index stores).

    Written field by field (the schema's order, one block per array and map, parameters sorted):
    several times faster than a generic writer on the ledger's per-entry path, and the unit tests
    check plain fastavro reads it back to the same values. What a step's entries share (function,
    parameters, window, origin, device, context) is encoded once and memoised.
    """
    app = entry.application
    inputs = app.inputs
    if len(inputs) == 1:
        refs = _ONE_ITEM + _enc_ref(inputs[0]) + _END
    elif inputs:
        refs = b"".join((_enc_long(len(inputs)), *[_enc_ref(r) for r in inputs], _END))
    else:
        refs = _END
    return b"".join(
        (
            _enc_bytes(entry.entry_id),
            _enc_long(entry.seq),
            _enc_bytes(entry.prev_hash),
            _enc_function(app.kind, app.function_id, app.function_version, app.code_hash, app.parameters),
            refs,
            _enc_ref(app.output),
            _enc_window_origin(app.window_start, app.window_end, app.origin, app.task_id),
            _enc_long(app.timestamp_ms),
            _enc_device_context(app.device_id, app.context),
            _enc_bytes(entry.entry_hash),
        )
    )


def encode_entry_body_generic(entry: LedgerEntry) -> bytes:
    """The same body through fastavro's generic writer (the reference the fast path is tested against)."""
    return _write(_ENTRY_SCHEMA, _entry_to_avro(entry))


def encode_entry(entry: LedgerEntry) -> bytes:
    return ENTRY_PREFIX + encode_entry_body(entry)


def encode_checkpoint_body(cp: Checkpoint) -> bytes:
    return _write(
        _CHECKPOINT_SCHEMA,
        {
            "ledger_id": cp.ledger_id,
            "number": cp.number,
            "tree_size": cp.tree_size,
            "root_hash": cp.root_hash,
            "head_hash": cp.head_hash,
            "frontier": list(cp.frontier),
            "timestamp": cp.timestamp_ms,
            "key_id": cp.key_id,
            "signature": cp.signature,
        },
    )


def encode_checkpoint(cp: Checkpoint) -> bytes:
    return CHECKPOINT_PREFIX + encode_checkpoint_body(cp)


def encode_record(record: LedgerRecord) -> bytes:
    return encode_entry(record) if isinstance(record, LedgerEntry) else encode_checkpoint(record)


def record_key(record: LedgerRecord) -> bytes:
    """The Kafka key of a ledger record: the entry_id, or `checkpoint:<number>` (for humans and tools;
    the ledger topic has one partition, so keys do not route)."""
    if isinstance(record, LedgerEntry):
        return record.entry_id
    return f"checkpoint:{record.number}".encode("ascii")


def _hash(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise MalformedRecordError(f"{name} is not a {HASH_SIZE}-byte hash")
    return value


_ALGORITHMS = {a.name: (a, DIGEST_SIZES[a]) for a in ChecksumAlgorithm}
"""Avro enum symbol -> (algorithm, digest size): a reduce entry decodes one per input."""


def _ref_from_avro(r: dict[str, Any]) -> DataRef:
    checksum = r["checksum"]
    algorithm, size = _ALGORITHMS[checksum["algorithm"]]
    value = checksum["value"]
    if len(value) != size:
        raise MalformedRecordError(f"{algorithm.name} checksum of {len(value)} bytes in a data ref")
    return DataRef(r["data_id"], Checksum(algorithm, value))


def application_from_avro(r: dict[str, Any]) -> Application:
    """The application in a decoded Avro datum (raises `MalformedRecordError` on bad checksums)."""
    ctx = r["context"]
    return Application(
        ApplicationKind[r["kind"]],
        r["function_id"],
        r["function_version"],
        r["code_hash"],
        tuple(sorted(r["parameters"].items())),
        tuple(_ref_from_avro(i) for i in r["inputs"]),
        _ref_from_avro(r["output"]),
        r["timestamp"],
        r["device_id"],
        Context(ctx["source"], ctx["location"], tuple(ctx["access_rights"])),
        Origin[r["origin"]],
        r["task_id"],
        r["window_start"],
        r["window_end"],
    )


def _entry_from_avro(r: dict[str, Any]) -> LedgerEntry:
    app = application_from_avro(r)
    if r["seq"] < 0:
        raise MalformedRecordError(f"negative seq {r['seq']}")
    return LedgerEntry(
        r["seq"],
        _hash(r["prev_hash"], "prev_hash"),
        _hash(r["entry_id"], "entry_id"),
        app,
        _hash(r["entry_hash"], "entry_hash"),
    )


def _checkpoint_from_avro(r: dict[str, Any]) -> Checkpoint:
    frontier = tuple(_hash(h, "a frontier hash") for h in r["frontier"])
    if r["tree_size"] < 0 or r["number"] < 0 or len(frontier) != r["tree_size"].bit_count():
        raise MalformedRecordError(
            f"checkpoint claims {r['tree_size']} entries with a frontier of {len(frontier)} hashes"
        )
    if len(r["key_id"]) != KEY_ID_SIZE or len(r["signature"]) != SIGNATURE_SIZE:
        raise MalformedRecordError("checkpoint key_id or signature has the wrong length")
    return Checkpoint(
        r["ledger_id"],
        r["number"],
        r["tree_size"],
        _hash(r["root_hash"], "root_hash"),
        _hash(r["head_hash"], "head_hash"),
        frontier,
        r["timestamp"],
        r["key_id"],
        r["signature"],
    )


def decode_entry_body(body: bytes) -> LedgerEntry:
    try:
        return _entry_from_avro(avro.schemaless_read(body, _ENTRY_SCHEMA))
    except MalformedRecordError:
        raise
    except Exception as exc:  # untrusted bytes through fastavro: one typed error out
        raise MalformedRecordError(f"not a ledger entry: {exc!r}", body) from exc


def decode_checkpoint_body(body: bytes) -> Checkpoint:
    try:
        return _checkpoint_from_avro(avro.schemaless_read(body, _CHECKPOINT_SCHEMA))
    except MalformedRecordError:
        raise
    except Exception as exc:
        raise MalformedRecordError(f"not a ledger checkpoint: {exc!r}", body) from exc


def decode_record(raw: bytes) -> LedgerRecord:
    """An entry or a checkpoint, told apart by the schema fingerprint in the prefix."""
    if not isinstance(raw, bytes):
        raise MalformedRecordError(f"a ledger record must be bytes, not {type(raw).__name__}")
    prefix, body = raw[:_PREFIX_LEN], raw[_PREFIX_LEN:]
    try:
        if prefix == ENTRY_PREFIX:
            return _entry_from_avro(avro.schemaless_read(body, _ENTRY_SCHEMA))
        if prefix == CHECKPOINT_PREFIX:
            return _checkpoint_from_avro(avro.schemaless_read(body, _CHECKPOINT_SCHEMA))
    except MalformedRecordError as exc:
        raise MalformedRecordError(str(exc), raw) from exc
    except Exception as exc:
        raise MalformedRecordError(f"ledger record does not decode: {exc!r}", raw) from exc
    raise MalformedRecordError(
        "not a ledger record of a known schema (bad marker or unknown fingerprint "
        f"{prefix[2:].hex() or '-'}); was something else written to the ledger topic?",
        raw,
    )


def stored(offset: int, raw: bytes | None) -> StoredRecord:
    """Decode what storage holds at `offset`, keeping undecodable bytes as a `MalformedRecord`."""
    try:
        return StoredRecord(offset, decode_record(raw if raw is not None else b""))
    except MalformedRecordError as exc:
        return StoredRecord(offset, MalformedRecord(raw or b"", str(exc)))
