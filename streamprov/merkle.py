"""RFC 6962 Merkle tree hashing with an incremental, O(log n)-state accumulator.

A reduce step digests an unbounded number of inputs into a constant-size header field; the
accumulator keeps only the roots of the perfect subtrees seen so far (the "frontier"), so windowed
state stays small however many records a window holds. Leaf and node hashes use the RFC 6962
domain-separation prefixes (0x00, 0x01) so a leaf can never be confused with an inner node.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterable, Sequence

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


def root_of(leaves: Sequence[bytes]) -> bytes:
    """`merkle_root(leaves)` (what a `MerkleAccumulator` fed them returns), built bottom-up a level
    at a time (`levels_of`): for a list at hand, no per-leaf Python frame."""
    return levels_of(leaves)[-1][0] if leaves else _EMPTY_ROOT


def levels_of(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the RFC 6962 tree over `leaves` (raw leaf data), leaf hashes first, the root
    last (alone): adjacent pairs hashed, an odd last node carried up unchanged. Kept whole so that
    `root_with` can replace a few leaves in O(log n) hashes each. `[[]]` for no leaves."""
    sha256 = hashlib.sha256
    return levels_from_hashes([sha256(b"\x00" + leaf).digest() for leaf in leaves])


def levels_from_hashes(leaf_hashes: Sequence[bytes]) -> list[list[bytes]]:
    """`levels_of` the leaves whose `leaf_hash`es these are."""
    sha256 = hashlib.sha256
    level = list(leaf_hashes)
    levels = [level]
    while len(level) > 1:
        paired = [sha256(b"\x01" + a + b).digest() for a, b in zip(level[::2], level[1::2], strict=False)]
        if len(level) & 1:
            paired.append(level[-1])
        level = paired
        levels.append(level)
    return levels


def root_with(levels: Sequence[Sequence[bytes]], replaced: dict[int, bytes]) -> bytes:
    """The root of the tree `levels` (`levels_of`) describes, with the leaves at the positions of
    `replaced` (position -> raw leaf data) replaced: only their paths are rehashed, the levels are
    not modified. Equal to `root_of` of the replaced leaf list."""
    sha256 = hashlib.sha256
    return root_with_hashes(levels, {i: sha256(b"\x00" + leaf).digest() for i, leaf in replaced.items()})


def root_with_hashes(levels: Sequence[Sequence[bytes]], replaced: dict[int, bytes]) -> bytes:
    """`root_with`, the replaced leaves given by their `leaf_hash`es."""
    if not replaced:
        return levels[-1][0] if levels[0] else _EMPTY_ROOT
    width = len(levels[0])
    if any(not 0 <= i < width for i in replaced):
        raise StreamprovError(f"a replaced leaf is outside a tree of {width} leaves")
    sha256 = hashlib.sha256
    changed = dict(replaced)
    for below in levels[:-1]:
        up: dict[int, bytes] = {}
        for j in {i >> 1 for i in changed}:
            left = changed.get(2 * j, below[2 * j])
            if 2 * j + 1 < len(below):
                up[j] = sha256(b"\x01" + left + changed.get(2 * j + 1, below[2 * j + 1])).digest()
            else:  # the odd last node, carried up
                up[j] = left
        changed = up
    return changed[0]


@functools.lru_cache(maxsize=256)
def _tree_layout(width: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(leaves per level from the bottom, where each level starts, nodes in all) of a `FlatTree`."""
    widths = [width]
    while widths[-1] > 1:
        widths.append((widths[-1] + 1) // 2)
    starts, at = [], 0
    for w in widths:
        starts.append(at)
        at += w
    return tuple(widths), tuple(starts), at


class FlatTree:
    """Every node of an RFC 6962 tree (`levels_from_hashes`) in one byte string, level by level from
    the leaf hashes up, `HASH_SIZE` bytes each: stored as it is, read without splitting it, and
    updated for a few replaced leaves in O(log n) hashes (`replaced`)."""

    __slots__ = ("_starts", "_widths", "raw", "width")

    def __init__(self, raw: bytes, width: int) -> None:
        if width < 1:
            raise StreamprovError(f"a tree has at least one leaf, not {width}")
        widths, starts, nodes = _tree_layout(width)
        if len(raw) != nodes * HASH_SIZE:
            raise StreamprovError(f"a tree of {width} leaves has {nodes} nodes, not {len(raw) // HASH_SIZE}")
        self.raw, self.width, self._widths, self._starts = raw, width, widths, starts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FlatTree) and (self.width, self.raw) == (other.width, other.raw)

    def __hash__(self) -> int:
        return hash((self.width, self.raw))

    def __repr__(self) -> str:
        return f"FlatTree(width={self.width}, root={self.root.hex()[:16]})"

    @classmethod
    def of(cls, leaf_hashes: Sequence[bytes]) -> FlatTree:
        return cls(b"".join(h for level in levels_from_hashes(leaf_hashes) for h in level), len(leaf_hashes))

    def leaf(self, i: int) -> bytes:
        """The `leaf_hash` of leaf i."""
        return self.raw[i * HASH_SIZE : (i + 1) * HASH_SIZE]

    @property
    def root(self) -> bytes:
        return self.raw[-HASH_SIZE:]

    def consistent(self, leaves: Iterable[int]) -> bool:
        """Does every node on the paths from these leaves to the root equal the hash of its two
        children as stored? O(log n) hashes a leaf: a `replaced` rehashes exactly those paths with
        their siblings, so a corrupt sibling would otherwise make a wrong root."""
        sha256 = hashlib.sha256
        raw, starts, widths = self.raw, self._starts, self._widths
        for leaf in leaves:
            if not 0 <= leaf < self.width:
                return False
            i = leaf
            for depth in range(len(widths) - 1):
                j = i >> 1
                left = (starts[depth] + 2 * j) * HASH_SIZE
                if 2 * j + 1 < widths[depth]:
                    node = sha256(b"\x01" + raw[left : left + 2 * HASH_SIZE]).digest()
                else:
                    node = raw[left : left + HASH_SIZE]
                up = (starts[depth + 1] + j) * HASH_SIZE
                if raw[up : up + HASH_SIZE] != node:
                    return False
                i = j
        return True

    def replaced(self, leaves: dict[int, bytes]) -> FlatTree:
        """The tree with the leaves at these positions replaced (position -> `leaf_hash`): only their
        paths are rehashed. Its root equals `root_of` of the replaced leaf list."""
        if leaves and (min(leaves) < 0 or max(leaves) >= self.width):
            raise StreamprovError(f"a replaced leaf is outside a tree of {self.width} leaves")
        sha256 = hashlib.sha256
        buf = bytearray(self.raw)
        changed = dict(leaves)
        for depth, width in enumerate(self._widths):
            base = self._starts[depth]
            for i, h in changed.items():
                buf[(base + i) * HASH_SIZE : (base + i + 1) * HASH_SIZE] = h
            if width == 1:
                break
            up: dict[int, bytes] = {}
            for j in {i >> 1 for i in changed}:
                left = bytes(buf[(base + 2 * j) * HASH_SIZE : (base + 2 * j + 1) * HASH_SIZE])
                if 2 * j + 1 < width:
                    right = buf[(base + 2 * j + 1) * HASH_SIZE : (base + 2 * j + 2) * HASH_SIZE]
                    up[j] = sha256(b"\x01" + left + right).digest()
                else:  # the odd last node, carried up
                    up[j] = left
            changed = up
        return FlatTree(bytes(buf), self.width)


def fold_frontier(frontier: Sequence[bytes]) -> bytes:
    """The root of a tree from its frontier (perfect subtree roots, leftmost first)."""
    if not frontier:
        return _EMPTY_ROOT
    node = frontier[-1]
    for left in reversed(frontier[:-1]):
        node = node_hash(left, node)
    return node


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
        return fold_frontier(self._frontier)

    def add_leaf_hash(self, node: bytes, on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        """Append a leaf given by its leaf hash (`leaf_hash(data)`, computed by the caller).

        `on_node(level, index, hash)` hears of every perfect subtree this completes, the leaf itself
        first (level 0): the node covering leaves [index * 2**level, (index + 1) * 2**level). A store
        that keeps them can later answer proofs in O(log n) lookups (see `inclusion_proof`).
        """
        n = self._count
        level = 0
        if on_node is not None:
            on_node(0, n, node)
        while n & 1:
            node = node_hash(self._frontier.pop(), node)
            n >>= 1
            level += 1
            if on_node is not None:
                on_node(level, n, node)  # n is now the merged node's index at `level`
        self._frontier.append(node)
        self._count += 1

    @property
    def frontier(self) -> tuple[bytes, ...]:
        """Roots of the perfect subtrees so far, largest (leftmost) first; their sizes are the set
        bits of `count`. With the count they are the whole state, and they fold into `root()`."""
        return tuple(self._frontier)

    @classmethod
    def from_frontier(cls, count: int, frontier: Sequence[bytes]) -> MerkleAccumulator:
        """Resume from `count` and its `frontier` (as a checkpoint stores them)."""
        if count < 0 or len(frontier) != count.bit_count() or any(len(h) != HASH_SIZE for h in frontier):
            raise StreamprovError(f"a frontier of {len(frontier)} hashes does not fit {count} leaves")
        acc = cls()
        acc._count = count
        acc._frontier = list(frontier)
        return acc

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


# --- proofs (RFC 6962 §2.1.1-2.1.2, verification per RFC 9162 §2.1.3.2 and §2.1.4.2) ---------------
#
# Proof *generation* needs the Merkle Tree Hash of sub-ranges of the leaves. It takes that as a
# function, `subtree(start, end) -> MTH(D[start:end])`, so a caller with millions of leaves can answer
# from stored perfect-subtree hashes in O(log n) lookups (the ledger index does) instead of holding
# every leaf in memory. `SubtreeHashes` is the plain in-memory implementation over leaf hashes.
# Every range a proof asks for starts at a multiple of the largest power of two not above its size.

SubtreeHash = Callable[[int, int], bytes]
"""`subtree(start, end)`: the Merkle Tree Hash of leaves [start, end), 0 <= start < end."""


def _split(n: int) -> int:
    """The largest power of two strictly smaller than n (n >= 2): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH over leaves given by their leaf hashes (already `leaf_hash`ed), iteratively, O(n)."""
    if not hashes:
        return _EMPTY_ROOT
    acc = MerkleAccumulator()
    for h in hashes:
        acc.add_leaf_hash(h)
    return acc.root()


class SubtreeHashes:
    """`SubtreeHash` over an in-memory sequence of leaf hashes (memoising perfect subtrees)."""

    __slots__ = ("_hashes", "_memo")

    def __init__(self, hashes: Sequence[bytes]) -> None:
        self._hashes = hashes
        self._memo: dict[tuple[int, int], bytes] = {}

    def __call__(self, start: int, end: int) -> bytes:
        if not 0 <= start < end <= len(self._hashes):
            raise StreamprovError(f"no subtree [{start}, {end}) in a tree of {len(self._hashes)} leaves")
        n = end - start
        if n == 1:
            return self._hashes[start]
        key = (start, end)
        found = self._memo.get(key)
        if found is None:
            k = _split(n)
            found = node_hash(self(start, start + k), self(start + k, end))
            if not n & (n - 1):  # perfect subtrees recur across proofs; partial ones rarely do
                self._memo[key] = found
        return found


def inclusion_proof(index: int, size: int, subtree: SubtreeHash) -> list[bytes]:
    """Audit path PATH(index, D[size]) of RFC 6962 §2.1.1, leaf to root (at most log2(size) hashes)."""
    if not 0 <= index < size:
        raise StreamprovError(f"leaf {index} is not in a tree of {size} leaves")
    siblings: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:  # descends one level per turn: at most 64 turns
        k = _split(end - start)
        if m < k:
            siblings.append(subtree(start + k, end))
            end = start + k
        else:
            siblings.append(subtree(start, start + k))
            start += k
            m -= k
    siblings.reverse()
    return siblings


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    """Does `proof` show leaf hash `leaf` at `index` in the tree of `size` leaves with `root`?

    RFC 9162 §2.1.3.2, step by step; any malformed input is simply `False`.
    """
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0 or len(p) != HASH_SIZE:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:  # fn == sn with fn even: climb past levels with no right sibling
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def consistency_proof(old_size: int, new_size: int, subtree: SubtreeHash) -> list[bytes]:
    """PROOF(old_size, D[new_size]) of RFC 6962 §2.1.2: the tree of old_size leaves is a prefix.

    Empty when the sizes are equal (the roots must then be equal) or the old tree is empty.
    """
    if not 0 <= old_size <= new_size:
        raise StreamprovError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end, m, complete = 0, new_size, old_size, True
    while m != end - start:  # SUBPROOF(m, D[start:end], complete), one level per turn
        k = _split(end - start)
        if m <= k:
            proof.append(subtree(start + k, end))
            end = start + k
        else:
            proof.append(subtree(start, start + k))
            start += k
            m -= k
            complete = False
    if not complete:
        proof.append(subtree(start, end))
    proof.reverse()
    return proof


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Does `proof` show the tree (old_size, old_root) is a prefix of (new_size, new_root)?

    RFC 9162 §2.1.4.2, step by step; any malformed input is simply `False`.
    """
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # the empty tree is a prefix of every tree
    if not proof or any(len(p) != HASH_SIZE for p in proof):
        return False
    path = list(proof)
    if not old_size & (old_size - 1):  # an exact power of two: the old root is itself a subtree
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0
