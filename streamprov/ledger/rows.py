"""The ledger's per-entry fast path: seal applications given as rows straight into stored bytes.

`LedgerChain.append` builds an `Application` and a `LedgerEntry` and the codec encodes them: clear,
and what verification and the index use. A pipeline appends one entry per record, though, so the
writer seals rows (`Row`: plain tuples under a registered `AppTemplate`) here instead: the identity
material, entry_id, entry_hash and Avro body are joined from per-template bytes computed once and
the few per-record parts, with no objects in between. The bytes are exactly those of the object
path (`tests/unit/test_ledger_rows.py` checks every field against `LedgerChain.append` +
`encode_record`), so readers, verification and the index cannot tell which path wrote an entry.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.errors import HeaderError
from streamprov.header import PREFIX, record_fields, scan
from streamprov.ledger.chain import LedgerChain
from streamprov.ledger.codec import (
    DIGEST_SIZES,
    ENTRY_PREFIX,
    _enc_device_context,
    _enc_function,
    _enc_window_origin,
    encode_record,
    record_key,
)
from streamprov.ledger.errors import MalformedRecordError
from streamprov.ledger.hashing import _context_part, _identity_head, _identity_tail
from streamprov.ledger.model import AnyRow, AppTemplate, RefRow, Row

_PREFIX_LEN = len(PREFIX)
_u32 = struct.Struct(">I").pack
_i64 = struct.Struct(">q").pack
_enc_long = avro.encode_long
_SMALL = tuple(bytes((z,)) for z in range(128))


def _varint(n: int) -> bytes:
    """Avro zig-zag varint of a non-negative long (sequence numbers, and timestamps after 1970)."""
    if n < 0:
        return _enc_long(n)
    z = n << 1
    if z < 0x80:
        return _SMALL[z]
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_DOMAIN_LP = _u32(len(b"streamprov/ledger/entry/v1")) + b"streamprov/ledger/entry/v1"
_EIGHT = _u32(8)
_LP32 = _u32(32)
_ENC32 = _enc_long(32)
_ALG_LP = tuple(_u32(1) + bytes((a,)) for a in range(256))
_ONE = _enc_long(1)
_END = b"\x00"
_DIGEST_SIZE_OF = tuple(DIGEST_SIZES[a] for a in ChecksumAlgorithm)
"""Digest size by algorithm number: the codec refuses an entry holding a digest of another size."""
_CHECKSUM_HEADS = frozenset((a << 1, DIGEST_SIZES[a] << 1) for a in ChecksumAlgorithm)
"""(algorithm byte, length byte) of every valid checksum in a header, as zig-zag varints."""


@dataclass(frozen=True, slots=True)
class _TemplateBytes:
    identity_head: bytes
    identity_tail_plain: bytes
    """Identity tail for rows without a window (every map): origin, task, two absent window ends."""
    device_context_hash: bytes
    """lp(device) lp(context) as the entry hash covers them."""
    function_avro: bytes
    device_context_avro: bytes
    window_origin_avro_plain: bytes


def _template_bytes(t: AppTemplate) -> _TemplateBytes:
    device = t.device_id.encode("utf-8")
    context = _context_part(t.context)
    return _TemplateBytes(
        _identity_head(t.kind, t.function_id, t.function_version, t.code_hash, t.parameters),
        _identity_tail(t.origin, t.task_id, None, None),
        _u32(len(device)) + device + _u32(len(context)) + context,
        _enc_function(t.kind, t.function_id, t.function_version, t.code_hash, t.parameters),
        _enc_device_context(t.device_id, t.context),
        _enc_window_origin(None, None, t.origin, t.task_id),
    )


def _ref_lp(ref: RefRow) -> bytes:
    """`DataRef.leaf_data()` of a row ref: lp(DataID) lp(algorithm byte) lp(digest)."""
    data_id = ref[0].encode("utf-8")
    digest = ref[2]
    return b"".join((_u32(len(data_id)), data_id, _ALG_LP[ref[1]], _u32(len(digest)), digest))


def _ref_avro(ref: RefRow) -> bytes:
    data_id = ref[0].encode("utf-8")
    digest = ref[2]
    return b"".join((_enc_long(len(data_id)), data_id, _enc_long(ref[1]), _enc_long(len(digest)), digest))


def header_checksum(raw: bytes) -> Checksum:
    """The value checksum a provenance header claims (current format read in place; older decoded)."""
    alg, digest = _claimed(raw)
    return Checksum(ChecksumAlgorithm(alg), digest)


def input_ref_row(raw: bytes, data_id: str) -> RefRow:
    """The node a map read, from its header: a map keeps the DataID, so `data_id` (the output's) is
    the input's when the header is current; an older header is decoded for its own."""
    if raw[:_PREFIX_LEN] == PREFIX:
        alg, digest = _claimed(raw)
        return data_id, alg, digest
    f = record_fields(raw)
    return f.data_id, int(f.checksum.algorithm), f.checksum.value


def expand(row: AnyRow) -> Row:
    """A `MapRow` (header bytes as the data path had them) as a `Row`; a `Row` as it is.

    Raises `MalformedRecordError` for a map row that would seal into an entry the codec cannot read
    back: a header that does not decode, or an input checksum not of its algorithm's size."""
    if len(row) == 6:
        return row
    key, input_raw, input_checksum, output_header = row
    try:
        data_id, alg, digest, timestamp = output_fields(output_header)
    except HeaderError as exc:
        raise MalformedRecordError(f"output header: {exc}") from exc
    if input_raw is None:
        assert input_checksum is not None
        in_alg, in_digest = input_checksum
        if not 0 <= in_alg < len(_DIGEST_SIZE_OF) or len(in_digest) != _DIGEST_SIZE_OF[in_alg]:
            raise MalformedRecordError(f"input checksum: {_describe_checksum(in_alg, in_digest)}")
        inp: RefRow = (data_id, in_alg, in_digest)
    else:
        try:
            inp = input_ref_row(input_raw, data_id)
        except HeaderError as exc:
            raise MalformedRecordError(f"input header: {exc}") from exc
    return key, (inp,), (data_id, alg, digest), timestamp, None, None


def _claimed(raw: bytes) -> tuple[int, bytes]:
    """(algorithm number, digest) of the checksum a header claims, read in place when current.

    Only a digest of its algorithm's size is read in place; anything else goes through
    `record_fields`, which raises `MalformedHeaderError` for it (as `header._digest_len` does): an
    entry holding it would not decode (`codec._ref_from_avro`)."""
    if raw[:_PREFIX_LEN] == PREFIX:
        try:
            head = raw[_PREFIX_LEN], raw[_PREFIX_LEN + 1]
            n = head[1] >> 1
            start = _PREFIX_LEN + 2
            value = raw[start : start + n]
            if head in _CHECKSUM_HEADS and len(value) == n:
                return head[0] >> 1, value
        except IndexError:
            pass
    c = record_fields(raw).checksum
    return int(c.algorithm), c.value


def _describe_checksum(alg: int, digest: bytes) -> str:
    if not 0 <= alg < len(_DIGEST_SIZE_OF):
        return f"unknown checksum algorithm {alg}"
    name = ChecksumAlgorithm(alg).name
    return f"{name} digest of {len(digest)} bytes ({name} digests are {_DIGEST_SIZE_OF[alg]} bytes)"


def output_fields(raw: bytes) -> tuple[str, int, bytes, int]:
    """(DataID, checksum algorithm, digest, timestamp_ms) of a header a stamper just made."""
    if raw[:_PREFIX_LEN] == PREFIX:
        source_start, source_end, id_start, lineage_at = scan(raw)
        timestamp, _ = avro.read_long(raw, source_end)
        first = raw[id_start]
        at = id_start + 1 if first < 0x80 else avro.read_long(raw, id_start)[1]
        return (
            raw[at:lineage_at].decode("utf-8"),
            raw[_PREFIX_LEN] >> 1,
            raw[_PREFIX_LEN + 2 : source_start],
            timestamp,
        )
    f = record_fields(raw)
    return f.data_id, int(f.checksum.algorithm), f.checksum.value, f.timestamp_ms


class RowSealer:
    """Seals rows on a `LedgerChain` (the same sequencer state) into (key, value) records to store."""

    def __init__(self, chain: LedgerChain) -> None:
        self.chain = chain
        self._templates: dict[int, _TemplateBytes] = {}

    def add_template(self, key: int, template: AppTemplate) -> None:
        self._templates[key] = _template_bytes(template)

    def seal(self, template: AppTemplate, row: AnyRow, out: list[Any]) -> bool:
        """Append the row's entry (and a checkpoint when one is due) to `out`; False for a duplicate."""
        tb = self._templates.get(row[0])
        if tb is None:
            tb = self._templates[row[0]] = _template_bytes(template)
        parts = _map_parts(tb, row) if len(row) == 4 else None
        if parts is None:
            parts = _row_parts(tb, template, expand(row))
        return self._finish(tb, parts, out)

    def _finish(self, tb: _TemplateBytes, parts: _Parts, out: list[Any]) -> bool:
        material, inputs_avro, output_avro, window_origin, timestamp, timestamp_avro = parts
        entry_id = hashlib.sha256(material).digest()
        state = self.chain.state
        if entry_id in state.recent_ids:
            return False
        seq = state.next_seq
        prev = state.head_hash
        entry_hash = hashlib.sha256(
            b"".join(
                (
                    _DOMAIN_LP,
                    _EIGHT,
                    _i64(seq),
                    _LP32,
                    prev,
                    _LP32,
                    entry_id,
                    _u32(len(material)),
                    material,
                    _EIGHT,
                    _i64(timestamp),
                    tb.device_context_hash,
                )
            )
        ).digest()
        out.append(
            (
                entry_id,
                b"".join(
                    (
                        ENTRY_PREFIX,
                        _ENC32,
                        entry_id,
                        _varint(seq),
                        _ENC32,
                        prev,
                        tb.function_avro,
                        inputs_avro,
                        output_avro,
                        window_origin,
                        timestamp_avro,
                        tb.device_context_avro,
                        _ENC32,
                        entry_hash,
                    )
                ),
            )
        )
        # the chain's state moves exactly as LedgerChain.append moves it
        state.tree.add(entry_hash)
        state.head_hash = entry_hash
        state.next_seq = seq + 1
        state.remember(entry_id, self.chain.dedup_window)
        chain = self.chain
        if chain.signer is not None and state.next_seq - state.checkpointed_size >= chain.checkpoint_every:
            cp = chain.checkpoint()
            if cp is not None:
                out.append((record_key(cp), encode_record(cp)))
        return True


_Parts = tuple[bytes, bytes, bytes, bytes, int, bytes]
"""(identity material, Avro inputs, Avro output, Avro window+origin+task, timestamp, Avro timestamp)."""


def _row_parts(tb: _TemplateBytes, template: AppTemplate, row: Row) -> _Parts:
    _, inputs, output, timestamp, window_start, window_end = row
    if len(inputs) == 1:
        ref = _ref_lp(inputs[0])
        inputs_lp = _u32(len(ref)) + ref
        inputs_avro = _ONE + _ref_avro(inputs[0]) + _END
    elif inputs:
        inputs_lp = b"".join([_u32(len(r)) + r for r in map(_ref_lp, inputs)])
        inputs_avro = b"".join((_enc_long(len(inputs)), *map(_ref_avro, inputs), _END))
    else:
        inputs_lp = b""
        inputs_avro = _END
    out_lp = _ref_lp(output)
    if window_start is None and window_end is None:
        tail = tb.identity_tail_plain
        window_origin = tb.window_origin_avro_plain
    else:
        tail = _identity_tail(template.origin, template.task_id, window_start, window_end)
        window_origin = _enc_window_origin(window_start, window_end, template.origin, template.task_id)
    material = b"".join((tb.identity_head, _u32(len(inputs_lp)), inputs_lp, _u32(len(out_lp)), out_lp, tail))
    return material, inputs_avro, _ref_avro(output), window_origin, timestamp, _varint(timestamp)


def _map_parts(tb: _TemplateBytes, row: AnyRow) -> _Parts | None:
    """The parts of a `MapRow` cut straight out of the two headers (current format, short DataID,
    non-negative timestamp); None for anything else, which `expand` then handles."""
    _, in_raw, in_checksum, out_h = row  # type: ignore[misc]
    p = _PREFIX_LEN
    try:
        if out_h[:p] != PREFIX:
            return None
        alg, n = out_h[p], out_h[p + 1]
        s0 = p + 2 + (n >> 1)
        m = out_h[s0 + 1]
        at = s0 + 2 + (m >> 1)
        if (alg, n) not in _CHECKSUM_HEADS or m >= 0x80 or m & 1 or out_h[at] & 1:
            return None  # not what our stamper writes: the general path (which refuses a bad one)
        end = at
        while out_h[end] & 0x80:  # at most 10 bytes: the header was scanned when it was made
            end += 1
        timestamp_avro = out_h[at : end + 1]
        timestamp, _ = avro.read_long(out_h, at)
        first = out_h[end + 1]
        if first >= 0x80 or first & 1:
            return None
        id_avro = out_h[end + 1 : end + 2 + (first >> 1)]
        digest = out_h[p + 2 : s0]
        if in_raw is None:
            if in_checksum is None:
                return None
            in_alg, in_digest = in_checksum
            if not 0 <= in_alg < len(_DIGEST_SIZE_OF) or len(in_digest) != _DIGEST_SIZE_OF[in_alg]:
                return None  # the general path refuses it
        else:
            if in_raw[:p] != PREFIX:
                return None
            a, k = in_raw[p], in_raw[p + 1]
            if (a, k) not in _CHECKSUM_HEADS:
                return None
            in_alg, in_digest = a >> 1, in_raw[p + 2 : p + 2 + (k >> 1)]
            if len(in_digest) != k >> 1:
                return None
    except IndexError:
        return None
    did = id_avro[1:]
    lp_id = _u32(len(did)) + did
    ref_in = b"".join((lp_id, _ALG_LP[in_alg], _u32(len(in_digest)), in_digest))
    ref_out = b"".join((lp_id, _ALG_LP[alg >> 1], _u32(len(digest)), digest))
    material = b"".join(
        (tb.identity_head, _u32(len(ref_in) + 4), _u32(len(ref_in)), ref_in, _u32(len(ref_out)), ref_out)
    )
    material += tb.identity_tail_plain
    inputs_avro = b"".join((_ONE, id_avro, _varint(in_alg), _varint(len(in_digest)), in_digest, _END))
    output_avro = b"".join((id_avro, _SMALL[alg], _SMALL[n], digest))
    return material, inputs_avro, output_avro, tb.window_origin_avro_plain, timestamp, timestamp_avro
