"""The ledger's hashes: entry identity, the hash chain, the Merkle leaves and the signed bytes.

Every hash is SHA-256 over length-prefixed parts (4-byte big-endian length before each part, nested
for lists), each starting with a domain string, so no two different values or kinds of value can
produce the same hashed bytes. The Avro encoding is not hashed: other Avro writers may legally encode
the same entry differently (block splits, map order), while these bytes depend only on the values.
docs/ledger.md gives the layout byte by byte for independent verifiers.
"""

from __future__ import annotations

import functools
import hashlib
import struct

from streamprov.ledger.model import Application, Checkpoint, Context, DataRef, LedgerEntry
from streamprov.merkle import length_prefixed

HASH_SIZE = 32
ENTRY_ID_DOMAIN = b"streamprov/ledger/entry-id/v1"
ENTRY_HASH_DOMAIN = b"streamprov/ledger/entry/v1"
GENESIS_DOMAIN = b"streamprov/ledger/genesis/v1"
CHECKPOINT_DOMAIN = b"streamprov/ledger/checkpoint/v1"

_i64 = struct.Struct(">q").pack
_u32 = struct.Struct(">I").pack


def _lp(*parts: bytes) -> bytes:
    """`streamprov.merkle.length_prefixed`, inlined for the per-entry path (same bytes, fewer calls)."""
    out: list[bytes] = []
    for p in parts:
        out.append(_u32(len(p)))
        out.append(p)
    return b"".join(out)


def _opt_int(value: int | None) -> bytes:
    return b"" if value is None else _i64(value)  # 0 bytes vs 8: unambiguous under the length prefix


def _opt_str(value: str | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value.encode("utf-8")


_ALG_LP = tuple(_u32(1) + bytes((a,)) for a in range(256))
"""lp(algorithm byte), by algorithm number."""
_DOMAIN_LP = _u32(len(ENTRY_HASH_DOMAIN)) + ENTRY_HASH_DOMAIN
_EIGHT = _u32(8)


def _ref(ref: DataRef) -> bytes:
    """`DataRef.leaf_data()`: DataID, algorithm byte, digest (the reduce header's Merkle leaf)."""
    data_id = ref.data_id.encode("utf-8")
    checksum = ref.checksum
    value = checksum.value
    return b"".join((_u32(len(data_id)), data_id, _ALG_LP[checksum.algorithm], _u32(len(value)), value))


def genesis_hash(ledger_id: str) -> bytes:
    """prev_hash of entry 0: binds the chain to its ledger, so entries cannot move between ledgers."""
    return hashlib.sha256(length_prefixed(GENESIS_DOMAIN, ledger_id.encode("utf-8"))).digest()


@functools.lru_cache(maxsize=1024)
def _identity_head(
    kind: int, function_id: str, version: str, code_hash: bytes, parameters: tuple[tuple[str, str], ...]
) -> bytes:
    """The identity parts a step shares across all its applications (memoised: the per-entry path)."""
    params = _lp(*[_lp(k.encode("utf-8"), v.encode("utf-8")) for k, v in sorted(parameters)])
    return _lp(
        ENTRY_ID_DOMAIN,
        bytes([kind]),
        function_id.encode("utf-8"),
        version.encode("utf-8"),
        code_hash,
        params,
    )


@functools.lru_cache(maxsize=1024)
def _identity_tail(
    origin: int, task_id: str | None, window_start: int | None, window_end: int | None
) -> bytes:
    return _lp(bytes([origin]), _opt_str(task_id), _opt_int(window_start), _opt_int(window_end))


@functools.lru_cache(maxsize=256)
def _context_part(ctx: Context) -> bytes:
    return _lp(
        ctx.source.encode("utf-8"),
        ctx.location.encode("utf-8"),
        _lp(*[r.encode("utf-8") for r in ctx.access_rights]),
    )


def identity_material(app: Application) -> bytes:
    """The bytes that identify an application: what ran, on what, producing what, and why.

    Not the timestamp, the device or the context: the same application replayed after a crash, on
    another pod, must get the same entry_id so the ledger and its index can drop the duplicate.

    `LP(domain, kind, function_id, function_version, code_hash, LP(LP(k, v)...), LP(ref(i)...),
    ref(output), origin, opt_str(task_id), opt_int(window_start), opt_int(window_end))`, built from
    memoised parts: what a step shares is encoded once.
    """
    inputs = b"".join([_lp(_ref(r)) for r in app.inputs])
    output = _ref(app.output)
    return b"".join(
        (
            _identity_head(app.kind, app.function_id, app.function_version, app.code_hash, app.parameters),
            _u32(len(inputs)),
            inputs,
            _u32(len(output)),
            output,
            _identity_tail(app.origin, app.task_id, app.window_start, app.window_end),
        )
    )


def entry_id_of(app: Application, material: bytes | None = None) -> bytes:
    """The idempotency key: SHA-256 of `identity_material`."""
    return hashlib.sha256(identity_material(app) if material is None else material).digest()


def entry_hash_of(
    seq: int, prev_hash: bytes, entry_id: bytes, app: Application, material: bytes | None = None
) -> bytes:
    """The chain hash: covers the entry's place, its link, its identity and every other field."""
    material = identity_material(app) if material is None else material
    device = app.device_id.encode("utf-8")
    context = _context_part(app.context)
    return hashlib.sha256(
        b"".join(
            (
                _DOMAIN_LP,
                _EIGHT,
                _i64(seq),
                _u32(len(prev_hash)),
                prev_hash,
                _u32(len(entry_id)),
                entry_id,
                _u32(len(material)),
                material,
                _EIGHT,
                _i64(app.timestamp_ms),
                _u32(len(device)),
                device,
                _u32(len(context)),
                context,
            )
        )
    ).digest()


def seal(app: Application, seq: int, prev_hash: bytes) -> LedgerEntry:
    """The entry for `app` at `seq`, chained to `prev_hash`."""
    material = identity_material(app)
    entry_id = entry_id_of(app, material)
    return LedgerEntry(seq, prev_hash, entry_id, app, entry_hash_of(seq, prev_hash, entry_id, app, material))


def content_problem(entry: LedgerEntry) -> str | None:
    """Why the entry's stored hashes do not match its content, or None when they do."""
    material = identity_material(entry.application)
    if entry_id_of(entry.application, material) != entry.entry_id:
        return "its entry_id does not match its content (function, parameters, inputs or output changed)"
    if (
        entry_hash_of(entry.seq, entry.prev_hash, entry.entry_id, entry.application, material)
        != entry.entry_hash
    ):
        return "its entry_hash does not match its content"
    return None


def checkpoint_message(cp: Checkpoint) -> bytes:
    """What a checkpoint's Ed25519 signature covers: every field but the signature."""
    return length_prefixed(
        CHECKPOINT_DOMAIN,
        cp.ledger_id.encode("utf-8"),
        _i64(cp.number),
        _i64(cp.tree_size),
        cp.root_hash,
        cp.head_hash,
        length_prefixed(*cp.frontier),
        _i64(cp.timestamp_ms),
        cp.key_id,
    )
