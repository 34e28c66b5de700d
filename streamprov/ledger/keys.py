"""Key layout of the local ledger index: every query is a point lookup or a prefix scan.

RocksDB keeps keys sorted, so "everything under this prefix" costs one seek plus one step per
result: a query's cost follows the size of its answer, not of the ledger. Each relation is a family
of keys whose first byte names it; variable-length parts are length-prefixed (4-byte big-endian) so
no prefix can run into the next part; entry ids are always 32 bytes and end the key.

    M name                                  meta: resume position, chain head, Merkle frontier
    E entry_id                              -> entry (Avro body), the first time the id was seen
    S seq(8)                                -> entry_id + entry_hash (Merkle leaves, by position)
    T level(1) index(8)                     -> hash of a perfect Merkle subtree (level >= 4)
    K number(8)                             -> checkpoint (Avro body)
    O node entry_id                         -> ''   output node -> applications producing it
    C node entry_id                         -> pos  input node -> applications consuming it, with the
                                                    node's positions among their inputs (4 bytes each;
                                                    '' in an index made before they were kept)
    H entry_id                              -> count(4) + entry (Avro body) without its inputs: the
                                                    head of an application with many inputs
    F fid version code_hash entry_id        -> ''   function -> its applications
    D node                                  -> seq(8) first seen   DataID -> its versions

where node = lp(DataID) alg(1) lp(digest), so `D lp(DataID)` is the prefix of every version of a
DataID and `F lp(fid) lp(version)` the prefix of every application of a function version.
"""

from __future__ import annotations

import struct

from streamprov.checksum import Checksum, ChecksumAlgorithm
from streamprov.ledger.model import DataRef

ENTRY_ID_SIZE = 32

META = b"M"
ENTRY = b"E"
SEQ = b"S"
TREE = b"T"
CHECKPOINT = b"K"
PRODUCED = b"O"
CONSUMED = b"C"
HEAD = b"H"
FUNCTION = b"F"
VERSIONS = b"D"

_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")


def lp(part: bytes) -> bytes:
    return _u32.pack(len(part)) + part


def u64(n: int) -> bytes:
    return _u64.pack(n)


def read_u64(raw: bytes, at: int = 0) -> int:
    value: int = _u64.unpack_from(raw, at)[0]
    return value


def node(ref: DataRef) -> bytes:
    return lp(ref.data_id.encode("utf-8")) + bytes((ref.checksum.algorithm,)) + lp(ref.checksum.value)


def data_id_prefix(data_id: str) -> bytes:
    return VERSIONS + lp(data_id.encode("utf-8"))


def parse_node(raw: bytes, at: int = 0) -> DataRef:
    """The DataRef encoded at `raw[at:]` by `node`."""
    (n,) = _u32.unpack_from(raw, at)
    data_id = raw[at + 4 : at + 4 + n].decode("utf-8")
    at += 4 + n
    algorithm = ChecksumAlgorithm(raw[at])
    (m,) = _u32.unpack_from(raw, at + 1)
    return DataRef(data_id, Checksum(algorithm, raw[at + 5 : at + 5 + m]))


def function_prefix(function_id: str, version: str | None = None, code_hash: bytes | None = None) -> bytes:
    key = FUNCTION + lp(function_id.encode("utf-8"))
    if version is None:
        return key
    key += lp(version.encode("utf-8"))
    return key if code_hash is None else key + lp(code_hash)


def function_key(function_id: str, version: str, code_hash: bytes, entry_id: bytes) -> bytes:
    return function_prefix(function_id, version, code_hash) + entry_id


def tree_key(level: int, index: int) -> bytes:
    return TREE + bytes((level,)) + u64(index)
