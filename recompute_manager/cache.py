"""Intermediate-result cache in RocksDB: a step's output by (function id, version, params, inputs).

Key: length-prefixed parts (STYLE.md item 1) `function id | version | params hash | input hash`, so
no two different tuples share a key and every entry of one function (or one function version) sits
under one key prefix: `invalidate` deletes them with a range scan. The params hash is SHA-256 over the
canonical JSON parameters, sorted; the input hash is SHA-256 over the inputs' (DataID, checksum) leaves
in order (`DataRef.leaf_data`), so a cache hit never needs the input bytes.

Values are also kept by content (`put_value` / `value`, keyed by DataID and checksum): a plan's
unaffected intermediate inputs (InputOrigin.STORED) are read from here.

Superseded versions (`supersede` / `latest`): when a recompute replaces an output, the old node points
at the new one (and the new one's header is kept), so a later plan that reads the old node as an
unaffected intermediate (its ledger entry still names the original) reads the corrected value:
two changes under one reduce, planned apart, both count.

Early cut-off: `unchanged(previous, output)` is True when a recomputed output has the checksum the
original output had: nothing downstream of it needs recomputing.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from streamprov.checksum import Checksum, ChecksumAlgorithm, digest
from streamprov.ledger.model import DataRef
from streamprov.lineage import Step
from streamprov.merkle import length_prefixed

__all__ = [
    "CacheKey",
    "ResultCache",
    "input_hash",
    "leaves_hash",
    "node_leaves",
    "params_hash",
    "unchanged",
]

_RESULT = b"r"
_VALUE = b"v"
_FORCED = b"f"
_LATEST = b"l"
_HEADER = b"h"
_DEAD = b"x"
_SUMMARY = b"s"
MAX_SUPERSEDE_HOPS = 64
MULTI_GET = 4096
"""Keys per RocksDB multi-get (`values`, `latest_values`)."""
_U32 = struct.Struct(">I")
_ALGORITHM = {a: b"\x00\x00\x00\x01" + bytes((a,)) for a in ChecksumAlgorithm}
"""lp(algorithm byte) of each algorithm."""


def params_hash(parameters: Iterable[tuple[str, str]]) -> bytes:
    """SHA-256 over the sorted (name, canonical JSON value) pairs, each length-prefixed."""
    parts = [p.encode("utf-8") for pair in sorted(parameters) for p in pair]
    return hashlib.sha256(length_prefixed(*parts)).digest()


def input_hash(inputs: Sequence[DataRef]) -> bytes:
    """SHA-256 over the inputs' leaves (length-prefixed DataID, algorithm, digest), in order:
    `SHA-256(length_prefixed(*(r.leaf_data() for r in inputs)))`, built in one pass (a reduce's key
    covers every input)."""
    return leaves_hash(node_leaves(inputs))


def leaves_hash(leaves: Sequence[bytes]) -> bytes:
    """`input_hash` of the inputs whose `node_leaves` these are."""
    pack = _U32.pack
    parts: list[bytes] = []
    for leaf in leaves:
        parts += (pack(len(leaf)), leaf)
    return hashlib.sha256(b"".join(parts)).digest()


def node_leaves(nodes: Sequence[DataRef]) -> list[bytes]:
    """`n.leaf_data()` of each node (lp(DataID) lp(algorithm byte) lp(digest)), built inline: also
    the reduce Merkle leaves of the nodes (`streamprov.stamp.reduce_leaf`)."""
    pack, alg = _U32.pack, _ALGORITHM
    found: list[bytes] = []
    for n in nodes:
        data_id, checksum = n.data_id.encode("utf-8"), n.checksum
        value = checksum.value
        found.append(
            b"".join((pack(len(data_id)), data_id, alg[checksum.algorithm], pack(len(value)), value))
        )
    return found


class CacheKey(bytes):
    """The RocksDB key of one (function, version, params, inputs) result."""

    @classmethod
    def of(cls, step: Step, inputs: Sequence[DataRef]) -> CacheKey:
        return cls.of_leaves(step, node_leaves(inputs))

    @classmethod
    def of_root(cls, step: Step, inputs_root: bytes) -> CacheKey:
        """The key of a reduce's result by the Merkle root over its inputs (`Executor._delta`, which
        does not read every input): tagged, so it is never an `of_leaves` key."""
        return cls(
            _RESULT
            + length_prefixed(
                step.function_id.encode("utf-8"),
                step.function_version.encode("utf-8"),
                params_hash(step.parameters),
                b"merkle-root:" + inputs_root,
            )
        )

    @classmethod
    def of_leaves(cls, step: Step, leaves: Sequence[bytes]) -> CacheKey:
        """`of` the inputs whose `node_leaves` these are (a caller that built them already)."""
        return cls(
            _RESULT
            + length_prefixed(
                step.function_id.encode("utf-8"),
                step.function_version.encode("utf-8"),
                params_hash(step.parameters),
                leaves_hash(leaves),
            )
        )


def _prefix(function_id: str, version: str | None) -> bytes:
    parts = [function_id.encode("utf-8")] + ([] if version is None else [version.encode("utf-8")])
    return _RESULT + length_prefixed(*parts)


def unchanged(previous: Checksum, output: bytes) -> bool:
    """Early cut-off: the recomputed output equals the original one (same checksum), so what derives
    from it needs no recompute."""
    return digest(previous.algorithm, output) == previous.value


class ResultCache:
    """Not thread-safe: one owner per directory (each worker keeps its own, or serialises access)."""

    def __init__(self, path: str | Path, *, cache_mb: int = 64) -> None:
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        table = BlockBasedOptions()
        table.set_bloom_filter(10, False)
        table.set_block_cache(Cache(cache_mb * 1024 * 1024))
        opts.set_block_based_table_factory(table)
        self.path = Path(path)
        self._db = Rdict(str(self.path), opts)
        self.hits = 0
        self.misses = 0

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultCache:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- step results ------------------------------------------------------------------------------
    def get(
        self, step: Step, inputs: Sequence[DataRef], *, force: bool = False, key: CacheKey | None = None
    ) -> bytes | None:
        """The cached output, or None (a miss, `force`, or the function is forced to recompute).
        `key`: `CacheKey.of(step, inputs)` when the caller has it already (it hashes every input)."""
        if force or self.forced(step):
            self.misses += 1
            return None
        return self.lookup(key if key is not None else CacheKey.of(step, inputs))

    def lookup(self, key: CacheKey) -> bytes | None:
        """The cached output under `key`, for a caller that checked `forced` already (`get` without
        its two reads of the forced marks)."""
        value = self._db.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return bytes(value)

    def put(
        self, step: Step, inputs: Sequence[DataRef], output: bytes, *, key: CacheKey | None = None
    ) -> None:
        self._db.put(key if key is not None else CacheKey.of(step, inputs), output)

    def invalidate(self, function_id: str, version: str | None = None) -> int:
        """Drop every cached result of a function (or one version of it); returns how many."""
        prefix = _prefix(function_id, version)
        batch = WriteBatch(raw_mode=True)
        n = 0
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():  # bounded by the prefix's entries
            key = bytes(it.key())
            if not key.startswith(prefix):
                break
            batch.delete(key)
            n += 1
            it.next()
        del it
        if n:
            self._db.write(batch)
        return n

    def force(self, function_id: str, version: str | None = None) -> None:
        """Treat a function (version) as known wrong: never serve its results until `unforce`."""
        self.invalidate(function_id, version)
        self._db.put(_FORCED + _prefix(function_id, version)[len(_RESULT) :], b"")

    def unforce(self, function_id: str, version: str | None = None) -> None:
        self._db.delete(_FORCED + _prefix(function_id, version)[len(_RESULT) :])

    def forced(self, step: Step) -> bool:
        """Is the step's function (or its version) forced to recompute (`force`)? Then its earlier
        outputs are suspect too: an incremental recompute must not start from one."""
        fid = step.function_id.encode("utf-8")
        ver = step.function_version.encode("utf-8")
        return (
            self._db.get(_FORCED + length_prefixed(fid)) is not None
            or self._db.get(_FORCED + length_prefixed(fid, ver)) is not None
        )

    # -- values by content -------------------------------------------------------------------------
    def put_value(self, node: DataRef, value: bytes) -> None:
        self._db.put(_VALUE + node.leaf_data(), value)

    def value(self, node: DataRef) -> bytes | None:
        found = self._db.get(_VALUE + node.leaf_data())
        return None if found is None else bytes(found)

    def values(self, nodes: Sequence[DataRef]) -> list[bytes | None]:
        """`value` of each node, in order, by RocksDB multi-gets."""
        return [
            None if v is None else bytes(v)
            for v in self._get_many([_VALUE + leaf for leaf in node_leaves(nodes)])
        ]

    def latest_values(self, nodes: Sequence[DataRef]) -> list[tuple[DataRef, bytes | None]]:
        """(`latest(n)`, its `value`) of each node (a reduce's stored inputs): one multi-get asks for
        both the supersede link and the value of every node; only superseded ones read on (through
        `latest`). It reads the stored links as `latest` does: a subclass that answers `latest` from
        elsewhere must override this too."""
        leaves = node_leaves(nodes)
        found = self._get_many([_LATEST + leaf for leaf in leaves] + [_VALUE + leaf for leaf in leaves])
        half = len(leaves)
        out: list[tuple[DataRef, bytes | None]] = []
        for i, n in enumerate(nodes):
            if found[i] is None:
                value = found[half + i]
                out.append((n, None if value is None else bytes(value)))
            else:
                latest = self.latest(n)
                out.append((latest, self.value(latest)))
        return out

    def latest_nodes(self, nodes: Sequence[DataRef], leaves: Sequence[bytes] | None = None) -> list[DataRef]:
        """`latest(n)` of each node, values not read (the incremental reduce's unchanged inputs):
        one multi-get for every node's supersede link; only superseded ones read on. `leaves`: the
        nodes' `node_leaves` when the caller has them."""
        keyed = node_leaves(nodes) if leaves is None else leaves
        found = self._get_many([_LATEST + leaf for leaf in keyed])
        return [n if f is None else self.latest(n) for n, f in zip(nodes, found, strict=True)]

    def _get_many(self, keys: list[bytes]) -> list[bytes | None]:
        found: list[bytes | None] = []
        for at in range(0, len(keys), MULTI_GET):  # bounded multi-gets
            chunk: list[str | int | float | bytes | bool] = list(keys[at : at + MULTI_GET])
            found += self._db.get(chunk) or []
        return found

    # -- superseded versions -----------------------------------------------------------------------
    def supersede(self, old: DataRef, new: DataRef, header: bytes, *, current: bool = True) -> None:
        """`old` (same DataID) was replaced by `new`, whose provenance header is `header`. When
        `new` is `old` (a recompute made the same bytes) only the header it stamped is kept: a later
        part of its plan reads it with that header (`Executor`), as the whole plan would have.
        `current`: `new` is now the latest version, so a link from it to a version it had been
        replaced by before is dropped (an output back at an earlier version: without that, `latest`
        followed the old link, or stopped in the cycle it made, at a stale version)."""
        batch = WriteBatch(raw_mode=True)
        if old != new:
            batch.put(_LATEST + old.leaf_data(), bytes([int(new.checksum.algorithm)]) + new.checksum.value)
        if current:
            batch.delete(_LATEST + new.leaf_data())
        batch.put(_HEADER + new.leaf_data(), header)
        self._db.write(batch)

    def latest(self, node: DataRef) -> DataRef:
        """The newest version `node` was superseded by (itself when never superseded)."""
        seen = {node}
        for _ in range(MAX_SUPERSEDE_HOPS):  # bounded; a cycle (A->B->A) stops where it closes
            raw = self._db.get(_LATEST + node.leaf_data())
            if raw is None:
                break
            raw = bytes(raw)
            nxt = DataRef(node.data_id, Checksum(ChecksumAlgorithm(raw[0]), raw[1:]))
            if nxt in seen:
                break
            seen.add(nxt)
            node = nxt
        return node

    # -- reduce summaries ---------------------------------------------------------------------------
    def put_summary(self, inputs_root: bytes, summary: bytes) -> None:
        """A reduce output's `ReduceSummary` (encoded), by the Merkle root over its inputs."""
        self._db.put(_SUMMARY + inputs_root, summary)

    def summary(self, inputs_root: bytes) -> bytes | None:
        found = self._db.get(_SUMMARY + inputs_root)
        return None if found is None else bytes(found)

    # -- dead-lettered tasks -------------------------------------------------------------------------
    def mark_dead(self, task_ids: Iterable[str]) -> None:
        """These tasks were dead-lettered (committed): a later part of their plan that reads one's
        output dead-letters too, rather than read the version before it (`Executor.run_plan`)."""
        batch = WriteBatch(raw_mode=True)
        for task_id in task_ids:
            batch.put(_DEAD + task_id.encode("ascii"), b"")
        self._db.write(batch)

    def dead(self, task_id: str) -> bool:
        return self._db.get(_DEAD + task_id.encode("ascii")) is not None

    def header(self, node: DataRef) -> bytes | None:
        """The header a recompute stamped on `node` (see `supersede`)."""
        found = self._db.get(_HEADER + node.leaf_data())
        return None if found is None else bytes(found)
