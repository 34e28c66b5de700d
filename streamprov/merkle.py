"""RFC 6962 Merkle tree hashing with an incremental, O(log n)-state accumulator.

A reduce step digests an unbounded number of inputs into a constant-size header field; the
accumulator keeps only the roots of the perfect subtrees seen so far (the "frontier"), so windowed
state stays small however many records a window holds. Leaf and node hashes use the RFC 6962
domain-separation prefixes (0x00, 0x01) so a leaf can never be confused with an inner node.
"""

from __future__ import annotations

import hashlib

from streamprov.errors import StreamprovError

HASH_SIZE = 32
_EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def length_prefixed(*parts: bytes) -> bytes:
    """Join parts unambiguously (4-byte big-endian length before each), never by plain concat."""
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def merkle_root(leaves: list[bytes]) -> bytes:
    """Reference RFC 6962 Merkle Tree Hash of raw leaf data (recursive definition, for checks)."""
    if not leaves:
        return _EMPTY_ROOT
    if len(leaves) == 1:
        return leaf_hash(leaves[0])
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(merkle_root(leaves[:split]), merkle_root(leaves[split:]))


class MerkleAccumulator:
    """Append leaves one at a time; `root()` equals `merkle_root(all leaves)`."""

    __slots__ = ("_count", "_frontier")

    def __init__(self) -> None:
        self._count = 0
        # Roots of perfect subtrees, largest first; their sizes are the set bits of _count.
        self._frontier: list[bytes] = []

    @property
    def count(self) -> int:
        return self._count

    def add(self, data: bytes) -> None:
        node = leaf_hash(data)
        n = self._count
        while n & 1:
            node = node_hash(self._frontier.pop(), node)
            n >>= 1
        self._frontier.append(node)
        self._count += 1

    def root(self) -> bytes:
        if not self._frontier:
            return _EMPTY_ROOT
        node = self._frontier[-1]
        for left in reversed(self._frontier[:-1]):
            node = node_hash(left, node)
        return node

    def to_bytes(self) -> bytes:
        return self._count.to_bytes(8, "big") + b"".join(self._frontier)

    @classmethod
    def from_bytes(cls, data: bytes) -> MerkleAccumulator:
        if len(data) < 8 or (len(data) - 8) % HASH_SIZE:
            raise StreamprovError(f"Merkle accumulator state has a bad length ({len(data)} bytes)")
        acc = cls()
        acc._count = int.from_bytes(data[:8], "big")
        body = data[8:]
        acc._frontier = [body[i : i + HASH_SIZE] for i in range(0, len(body), HASH_SIZE)]
        if len(acc._frontier) != acc._count.bit_count():
            raise StreamprovError("Merkle accumulator state does not match its count")
        return acc
