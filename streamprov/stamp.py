"""Stamping provenance onto step outputs, shared by every agent flavour (faust, confluent-kafka).

The map path is the hot path: per record it reads the input header's head fields, copies the source
checksum and DataID spans verbatim, computes one output checksum and appends a memoised lineage. No
lineage is decoded or encoded per record; the timestamp's varint is reused within a millisecond.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from time import time_ns as _time_ns
from typing import Any

import crc32c as _crc32c

from streamprov import avro
from streamprov.checksum import Checksum, ChecksumAlgorithm, compute, digest
from streamprov.errors import MalformedHeaderError
from streamprov.header import (
    PREFIX,
    ProvenanceHeader,
    encode_checksum,
    find_raw,
    now_ms,
    scan,
    verify_value,
)
from streamprov.lineage import (
    LINEAGE_CACHE_SIZE,
    InputDigest,
    Lineage,
    Step,
    common_prefix,
    encode_lineage,
)
from streamprov.lineage import extend_encoded as _extend
from streamprov.merkle import MerkleAccumulator, length_prefixed
from streamprov.registry import RegisteredFunction

Headers = Sequence[tuple[str, bytes | None]]
_crc: Callable[[bytes], int] = _crc32c.crc32c


class ChecksumMismatchError(MalformedHeaderError):
    """An input record's value does not match the checksum its own header claims."""


class _Clock:
    """Millisecond timestamp and its Avro varint, re-encoded only when the millisecond changes.

    Stamping reads the clock once per record; that must stay cheap. So the clock keeps the
    nanosecond window [lo, hi) of the current millisecond and answers with two integer comparisons
    while `time_ns()` stays inside it: no division and no varint encoding per record. A wall clock
    that steps backwards leaves the window too and is re-encoded like any new millisecond.
    """

    __slots__ = ("_enc", "_hi", "_lo", "_ms")

    def __init__(self) -> None:
        self._ms = -1
        self._enc = b""
        self._lo = 0
        self._hi = 0  # an empty window: the first read encodes

    @property
    def ms(self) -> int:
        """The millisecond of the last read (-1 before the first)."""
        return self._ms

    def encoded(self) -> bytes:
        t = _time_ns()
        if self._lo <= t < self._hi:
            return self._enc
        return self.tick(t)

    def tick(self, t_ns: int) -> bytes:
        """Move to the millisecond holding `t_ns` and return its varint (the slow path of `encoded`)."""
        ms = t_ns // 1_000_000
        self._lo = ms * 1_000_000
        self._hi = self._lo + 1_000_000
        if ms != self._ms:
            self._ms = ms
            self._enc = avro.encode_long(ms)
        return self._enc


_CRC_TAG = avro.encode_long(ChecksumAlgorithm.CRC32C) + avro.encode_long(4)
_CRC_HEAD = PREFIX + _CRC_TAG
"""Everything before a CRC32C checksum's 4 digest bytes: prefix, algorithm index, length."""
_SHORT_LEN = tuple(avro.encode_long(n) for n in range(64))
"""Avro length varints of 0..63, a single byte each: the length of every DataID of under 64 bytes."""


def _encoded_checksum(algorithm: ChecksumAlgorithm, value: bytes) -> bytes:
    if algorithm is ChecksumAlgorithm.CRC32C:
        return _CRC_TAG + _crc(value).to_bytes(4, "big")
    return encode_checksum(compute(algorithm, value))


def source_data_id(key: bytes | None, topic: str, partition: int, offset: int) -> str:
    """DataID for a record that arrives without provenance: its key, else its coordinates."""
    if key:
        try:
            return key.decode("utf-8")
        except UnicodeDecodeError:
            return "hex:" + key.hex()
    return f"{topic}/{partition}/{offset}"


@dataclass(frozen=True, slots=True)
class InputRecord:
    """What a step needs of one consumed record to stamp its output."""

    value: bytes
    headers: Headers | None
    key: bytes | None
    topic: str
    partition: int
    offset: int


class MapStamper:
    """Builds output headers for one map step (function + parameters + checksum algorithm)."""

    def __init__(
        self,
        function: RegisteredFunction,
        params: Mapping[str, Any] | None = None,
        algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C,
        verify_input: bool = True,
    ) -> None:
        self.function = function
        self.step: Step = function.step(params)
        self.algorithm = algorithm
        self.verify_input = verify_input
        self._clock = _Clock()
        self._first_lineage = encode_lineage((self.step,))
        self._lineages: dict[bytes, bytes] = {}

    def stamp(self, record: InputRecord, output_value: bytes) -> bytes:
        """Encoded output header; raises `HeaderError` when the input's header is bad."""
        raw = find_raw(record.headers)
        if raw is None:
            data_id = source_data_id(record.key, record.topic, record.partition, record.offset)
            return b"".join(
                (
                    PREFIX,
                    _encoded_checksum(self.algorithm, output_value),
                    _encoded_checksum(self.algorithm, record.value),
                    self._clock.encoded(),
                    avro.encode_bytes(data_id.encode("utf-8")),
                    self._first_lineage,
                )
            )
        if raw[: len(PREFIX)] != PREFIX:  # an older header version: decode fully, re-encode
            return self._stamp_decoded(ProvenanceHeader.decode(raw), record.value, output_value)
        source_start, source_end, id_start, lineage_at = scan(raw)
        if self.verify_input and not verify_value(raw, record.value):
            raise ChecksumMismatchError("input value does not match its header checksum", raw)
        # The source checksum and DataID spans are copied verbatim from the input header.
        return b"".join(
            (
                PREFIX,
                _encoded_checksum(self.algorithm, output_value),
                raw[source_start:source_end],
                self._clock.encoded(),
                raw[id_start:lineage_at],
                self._output_lineage(raw[lineage_at:]),
            )
        )

    def _output_lineage(self, input_lineage: bytes) -> bytes:
        out = self._lineages.get(input_lineage)
        if out is None:
            if len(self._lineages) >= LINEAGE_CACHE_SIZE:
                self._lineages.clear()
            out = self._lineages[input_lineage] = _extend(input_lineage, self.step)
        return out

    def _stamp_decoded(self, header: ProvenanceHeader, value: bytes, output_value: bytes) -> bytes:
        if self.verify_input and digest(header.checksum.algorithm, value) != header.checksum.value:
            raise ChecksumMismatchError("input value does not match its header checksum")
        return ProvenanceHeader(
            header.data_id,
            compute(self.algorithm, output_value),
            header.source_checksum,
            now_ms(),
            (*header.lineage, self.step),
        ).encode()


def input_header(record: InputRecord, algorithm: ChecksumAlgorithm) -> ProvenanceHeader:
    """The record's provenance, or a fresh source header when it carries none."""
    header = ProvenanceHeader.from_headers(record.headers)
    if header is None:
        data_id = source_data_id(record.key, record.topic, record.partition, record.offset)
        return ProvenanceHeader.for_source(data_id, record.value, algorithm)
    return header


def reduce_leaf(data_id: str, checksum: Checksum) -> bytes:
    """Merkle leaf of one reduce input: length-prefixed DataID, algorithm byte, digest."""
    return length_prefixed(data_id.encode("utf-8"), bytes([checksum.algorithm]), checksum.value)


_ALGORITHM_LEAF = tuple(length_prefixed(bytes((int(a),))) for a in ChecksumAlgorithm)
"""lp(algorithm byte) by the algorithm's index in the header encoding (as `_checksum_at` reads it)."""
_PREFIX_LEN = len(PREFIX)


def reduce_leaves(raw: bytes) -> tuple[bytes, bytes, bytes] | None:
    """Of one reduce input's encoded header, read in place (`scan`, no objects): its `reduce_leaf`
    (DataID, checksum), its sources leaf (DataID, source checksum) and its encoded lineage; None for
    a header of another schema version (decode that one). Raises `HeaderError` for a malformed one."""
    if raw[:_PREFIX_LEN] != PREFIX:
        return None
    source_start, source_end, id_start, lineage_at = scan(raw)
    _, data_at = avro.read_long(raw, id_start)
    data_id = raw[data_at:lineage_at]
    head = len(data_id).to_bytes(4, "big") + data_id
    p = _PREFIX_LEN
    leaf = b"".join(
        (
            head,
            _ALGORITHM_LEAF[raw[p] >> 1],
            (source_start - p - 2).to_bytes(4, "big"),
            raw[p + 2 : source_start],
        )
    )
    source = b"".join(
        (
            head,
            _ALGORITHM_LEAF[raw[source_start] >> 1],
            (source_end - source_start - 2).to_bytes(4, "big"),
            raw[source_start + 2 : source_end],
        )
    )
    return leaf, source, raw[lineage_at:]


def reduce_header(
    step: Step,
    data_id: str,
    output_value: bytes,
    algorithm: ChecksumAlgorithm,
    window: tuple[int, int] | None,
    digest: tuple[int, bytes, bytes],
    upstream: Lineage | None,
) -> ProvenanceHeader:
    """A reduce output's header: `digest` = (input count, inputs Merkle root, sources Merkle root),
    `upstream` the lineage its inputs share. The reduce step carries the input digest, never the
    input list. `ReduceState.header`, and the incremental recompute's (which builds the roots from
    the inputs' encoded headers)."""
    count, inputs_root, sources_root = digest
    input_digest = InputDigest(
        count,
        inputs_root,
        window[0] if window else None,
        window[1] if window else None,
    )
    reduce_step = Step(
        step.kind,
        step.function_id,
        step.function_version,
        step.code_hash,
        step.parameters,
        input_digest,
    )
    return ProvenanceHeader(
        data_id,
        compute(algorithm, output_value),
        Checksum(ChecksumAlgorithm.SHA256, sources_root),
        now_ms(),
        (*(upstream or ()), reduce_step),
    )


@dataclass
class ReduceState:
    """Accumulated state of one reduce group (key, window): the value and a bounded input digest.

    Only O(log n) hashes are kept whatever the fan-in; the lineage is the prefix the inputs share.
    """

    accumulator: Any
    inputs: MerkleAccumulator = field(default_factory=MerkleAccumulator)
    sources: MerkleAccumulator = field(default_factory=MerkleAccumulator)
    upstream: Lineage | None = None
    last_timestamp_ms: int = 0

    def add(
        self,
        function: RegisteredFunction,
        params: Mapping[str, Any],
        header: ProvenanceHeader,
        value: Any,
    ) -> None:
        self.accumulator = function.apply(self.accumulator, value, params=params)
        self.inputs.add(reduce_leaf(header.data_id, header.checksum))
        self.sources.add(reduce_leaf(header.data_id, header.source_checksum))
        lineage = header.lineage
        if self.upstream is None:
            self.upstream = lineage
        elif lineage is not self.upstream:  # the same (shared, decoded once) lineage: no change
            self.upstream = common_prefix([self.upstream, lineage])
        self.last_timestamp_ms = max(self.last_timestamp_ms, header.timestamp_ms)

    @property
    def count(self) -> int:
        return self.inputs.count

    def header(
        self,
        step: Step,
        data_id: str,
        output_value: bytes,
        algorithm: ChecksumAlgorithm,
        window: tuple[int, int] | None = None,
    ) -> ProvenanceHeader:
        """The output header: the reduce step carries the input digest, never the input list."""
        digest_ = (self.inputs.count, self.inputs.root(), self.sources.root())
        return reduce_header(step, data_id, output_value, algorithm, window, digest_, self.upstream)


_EMPTY_LINEAGE = encode_lineage(())


class SourceStamper:
    """Headers for original records as a producer writes them: empty lineage, own checksum as source.

    `header` is on the per-record path of every producer, so it builds the bytes directly: one
    checksum call, one clock read and one join; no Checksum or ProvenanceHeader objects.
    """

    __slots__ = ("_clock", "_crc32c", "algorithm")

    def __init__(self, algorithm: ChecksumAlgorithm = ChecksumAlgorithm.CRC32C) -> None:
        self.algorithm = algorithm
        self._crc32c = algorithm is ChecksumAlgorithm.CRC32C
        self._clock = _Clock()

    def header(self, data_id: str | bytes, value: bytes) -> bytes:
        """The encoded header of a source record with DataID `data_id` and value bytes `value`."""
        id_bytes = data_id_bytes(data_id)
        n = len(id_bytes)
        id_len = _SHORT_LEN[n] if n < 64 else avro.encode_long(n)
        clock = self._clock
        t = _time_ns()
        ts = clock._enc if clock._lo <= t < clock._hi else clock.tick(t)
        if self._crc32c:
            digest4 = _crc(value).to_bytes(4, "big")
            return b"".join((_CRC_HEAD, digest4, _CRC_TAG, digest4, ts, id_len, id_bytes, _EMPTY_LINEAGE))
        encoded = _encoded_checksum(self.algorithm, value)
        return b"".join((PREFIX, encoded, encoded, ts, id_len, id_bytes, _EMPTY_LINEAGE))


def data_id_bytes(data_id: str | bytes | bytearray) -> bytes:
    """A DataID as the UTF-8 bytes the header carries.

    A binary key follows the rule of `source_data_id`: its bytes when they are UTF-8, else
    "hex:<hex>", so a header is always decodable. ASCII keys (the common case) skip the decode.
    """
    if type(data_id) is bytes:
        if data_id.isascii():
            return data_id
    elif isinstance(data_id, str):
        return data_id.encode("utf-8")
    else:
        data_id = bytes(data_id)
    try:
        data_id.decode("utf-8")
    except UnicodeDecodeError:
        return ("hex:" + data_id.hex()).encode("ascii")
    return data_id
