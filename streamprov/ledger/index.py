"""The local ledger index: a RocksDB (rocksdict) view of the ledger topic for graph queries and proofs.

Each service keeps one. It is materialised from the stored records in order and is resumable: the
position to read from next, the chain head and the Merkle frontier are written in the same atomic
batch as the entries they cover, so a process that stops anywhere resumes exactly where its last
batch ended (`catch_up`). It re-checks the chain as it goes (sequence, links, entry hashes,
checkpoint roots) and refuses to index past a break: a tampered ledger is never materialised.

Replays are idempotent: records before the resume position are skipped, an entry already indexed
at its seq is skipped, and an entry whose entry_id is already in the graph (a replayed application
appended again) advances the chain and the Merkle tree but adds nothing to the graph.

Key layout: `streamprov.ledger.keys`, plus the node kinds kept here (`N node kind`, kind `s` when a
SOURCE entry produced the node, `d` when a map or reduce did), so "is this input original data?" is
two point reads instead of decoding its producers' entries (`is_source`, `sources_among`). An index
made before node kinds existed gets them once when it is opened (`upgrade_node_kinds`, logged).
Queries: `streamprov.ledger.queries`.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from rocksdict import BlockBasedOptions, Cache, Options, Rdict, WriteBatch

from streamprov.checksum import ChecksumAlgorithm
from streamprov.ledger import keys
from streamprov.ledger.codec import (
    decode_checkpoint_body,
    decode_entry_body,
    encode_checkpoint_body,
    encode_entry_body,
)
from streamprov.ledger.errors import ChainError, LedgerIndexError
from streamprov.ledger.hashing import content_problem, genesis_hash
from streamprov.ledger.model import ApplicationKind, Checkpoint, DataRef, LedgerEntry, StoredRecord
from streamprov.ledger.proofs import ConsistencyProof, InclusionProof, prove_consistency, prove_inclusion
from streamprov.ledger.queries import (
    DownstreamResult,
    EntryHead,
    UpstreamResult,
    downstream,
    downstream_of_applications,
    upstream,
)
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.ledger.store import LedgerSource
from streamprov.merkle import MerkleAccumulator, leaf_hash, node_hash, root_from_leaf_hashes

logger = logging.getLogger(__name__)

MIN_STORED_LEVEL = 4
"""Perfect Merkle subtrees of 16 leaves and up are stored (about n/8 keys); smaller ones are rebuilt
from at most 16 leaves when a proof needs them. Proofs cost O(log n) reads either way."""
DEFAULT_BATCH = 10_000
COMPACT_AFTER = 100_000

_M_LEDGER = keys.META + b"ledger_id"
_M_OFFSET = keys.META + b"next_offset"
_M_TREE = keys.META + b"tree"
_M_HEAD = keys.META + b"head"
_M_CHECKPOINT = keys.META + b"next_checkpoint"
_M_KINDS = keys.META + b"kinds_to"
"""The storage offset up to which node kinds are indexed: written with every batch, so an index made
(or extended) by a version that did not keep node kinds is found out and upgraded on open."""

NODE_KIND = b"N"
"""`N node kind(1)` -> '': kind `s` = a SOURCE entry produced the node, `d` = a map/reduce did."""
_SOURCE_KIND = b"s"
_DERIVED_KIND = b"d"
_MULTI_GET = 4096


_U32 = struct.Struct(">I")
HEAD_MIN_INPUTS = 16
"""An application with at least this many inputs also gets a head record (`head`): a plan reaches a
reduce through the few inputs that changed and reads the rest of it without decoding the others."""
_ALGORITHM_BYTE = {a: bytes((a,)) for a in ChecksumAlgorithm}


def _kind_prefixes(nodes: Sequence[DataRef]) -> list[bytes]:
    """`NODE_KIND + keys.node(n)` of each node, built inline (planning asks for every reduce input)."""
    pack = _U32.pack
    found: list[bytes] = []
    for n in nodes:
        data_id, checksum = n.data_id.encode("utf-8"), n.checksum
        value = checksum.value
        found.append(
            b"".join(
                (
                    NODE_KIND,
                    pack(len(data_id)),
                    data_id,
                    _ALGORITHM_BYTE[checksum.algorithm],
                    pack(len(value)),
                    value,
                )
            )
        )
    return found


def _kind_key(node: DataRef, kind: ApplicationKind) -> bytes:
    return NODE_KIND + keys.node(node) + (_SOURCE_KIND if kind is ApplicationKind.SOURCE else _DERIVED_KIND)


def _options(cache_mb: int) -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    table = BlockBasedOptions()
    table.set_bloom_filter(10, False)  # point lookups of entries miss the disk when absent
    table.set_block_cache(Cache(cache_mb * 1024 * 1024))
    opts.set_block_based_table_factory(table)
    opts.set_max_background_jobs(2)
    return opts


class LedgerIndex:
    """Graph and proof index of one ledger in a RocksDB directory. Not thread-safe: one owner."""

    def __init__(
        self,
        path: str | Path,
        ledger_id: str,
        *,
        verify_hashes: bool = True,
        verifier: CheckpointVerifier | None = None,
        cache_mb: int = 64,
    ) -> None:
        self.path = Path(path)
        self.ledger_id = ledger_id
        self.verify_hashes = verify_hashes
        self.verifier = verifier
        self._db = Rdict(str(self.path), _options(cache_mb))
        stored = self._get(_M_LEDGER)
        if stored is None:
            self._db.put(_M_LEDGER, ledger_id.encode("utf-8"))
        elif stored != ledger_id.encode("utf-8"):
            self._db.close()
            raise LedgerIndexError(
                f"{self.path} indexes ledger {stored.decode('utf-8', 'replace')!r}, not {ledger_id!r}"
            )
        self._load_meta()
        self._batch: WriteBatch | None = None
        kinds_to = self._get(_M_KINDS)
        if kinds_to is None or keys.read_u64(kinds_to) != self._next_offset:
            self.upgrade_node_kinds()

    def upgrade_node_kinds(self) -> int:
        """Index the node kinds of the entries already indexed (an index made before they were kept);
        returns how many entries were read. Idempotent; the marker is written last, so an interrupted
        upgrade runs again on the next open."""
        if self._next_offset == 0 and self.size == 0:
            self._db.put(_M_KINDS, keys.u64(0))
            return 0
        logger.warning(
            "ledger index %s holds entries without node kinds (made or extended by a version that did "
            "not index them): indexing the node kinds of its %d entries once (about 40 s per million)",
            self.path,
            self.size,
        )
        n = 0
        batch = WriteBatch(raw_mode=True)
        it = self._db.iter()
        it.seek(keys.ENTRY)
        while it.valid():  # every indexed application once
            key: bytes = it.key()
            if not key.startswith(keys.ENTRY):
                break
            app = decode_entry_body(it.value()).application
            batch.put(_kind_key(app.output, app.kind), b"")
            n += 1
            if n % DEFAULT_BATCH == 0:
                self._db.write(batch)
                batch = WriteBatch(raw_mode=True)
            it.next()
        del it
        batch.put(_M_KINDS, keys.u64(self._next_offset))
        self._db.write(batch)
        logger.warning("ledger index %s: node kinds of %d entries indexed", self.path, n)
        return n

    def _load_meta(self) -> None:
        offset = self._get(_M_OFFSET)
        tree = self._get(_M_TREE)
        head = self._get(_M_HEAD)
        cp = self._get(_M_CHECKPOINT)
        self._next_offset = keys.read_u64(offset) if offset is not None else 0
        self._tree = MerkleAccumulator.from_bytes(tree) if tree is not None else MerkleAccumulator()
        self._head = head if head is not None else genesis_hash(self.ledger_id)
        self._next_checkpoint = keys.read_u64(cp) if cp is not None else 0

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LedgerIndex:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def next_offset(self) -> int:
        """Storage offset to read from next (resume position)."""
        return self._next_offset

    @property
    def size(self) -> int:
        """Entries indexed (the next seq)."""
        return self._tree.count

    @property
    def head_hash(self) -> bytes:
        return self._head

    @property
    def root_hash(self) -> bytes:
        return self._tree.root()

    # -- materialising ----------------------------------------------------------------------------
    def catch_up(
        self,
        source: LedgerSource,
        *,
        batch_size: int = DEFAULT_BATCH,
        compact_after: int | None = COMPACT_AFTER,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Index what `source` holds beyond the resume position; returns records applied.

        After a bulk catch-up (at least `compact_after` records) the database is compacted: freshly
        written data sits in many overlapping files that every lookup must consult, and a query's
        cost should depend on its answer, not on how the index was loaded. `on_progress` as `apply`'s,
        and once more after the compaction.
        """
        applied = self.apply(source.read(self._next_offset), batch_size=batch_size, on_progress=on_progress)
        if compact_after is not None and applied >= compact_after:
            self.compact()
            if on_progress is not None:
                on_progress(applied)
        return applied

    def compact(self) -> None:
        """Compact the whole database (seconds per million entries); queries get one sorted run."""
        self._db.compact_range(None, None)

    def apply(
        self,
        records: Iterable[StoredRecord],
        *,
        batch_size: int = DEFAULT_BATCH,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Index `records` (in storage order) in atomic batches; returns how many were applied.

        Raises `ChainError` at the first record that does not continue the chain; everything before
        it stays indexed, so fixing the source and calling again resumes there. `on_progress(n)`
        after each batch (n applied so far): a service indexing a large ledger on its loop's thread
        beats its liveness there.
        """
        applied = 0
        pending = 0
        self._batch = WriteBatch(raw_mode=True)
        in_batch: set[bytes] = set()
        try:
            for item in records:
                if item.offset < self._next_offset:
                    continue
                rec = item.record
                if isinstance(rec, LedgerEntry):
                    self._apply_entry(rec, item.offset, in_batch)
                elif isinstance(rec, Checkpoint):
                    self._apply_checkpoint(rec, item.offset)
                else:
                    raise ChainError(f"record at offset {item.offset} is malformed: {rec.reason}", self.size)
                self._next_offset = item.offset + 1
                pending += 1
                if pending >= batch_size:
                    self._commit()
                    in_batch.clear()
                    applied += pending
                    pending = 0
                    if on_progress is not None:
                        on_progress(applied)
        except ChainError:  # raised before touching the batch: what is in it is consistent
            self._commit()
            raise
        except BaseException:  # anything else may have left a half-written entry: drop the batch
            self._batch = None
            self._load_meta()
            raise
        self._commit()
        return applied + pending

    def _commit(self) -> None:
        batch = self._batch
        if batch is None:
            return
        batch.put(_M_OFFSET, keys.u64(self._next_offset))
        batch.put(_M_TREE, self._tree.to_bytes())
        batch.put(_M_HEAD, self._head)
        batch.put(_M_CHECKPOINT, keys.u64(self._next_checkpoint))
        batch.put(_M_KINDS, keys.u64(self._next_offset))
        self._db.write(batch)
        self._batch = WriteBatch(raw_mode=True)

    def _on_tree_node(self, level: int, index: int, node: bytes) -> None:
        if level >= MIN_STORED_LEVEL:
            assert self._batch is not None
            self._batch.put(keys.tree_key(level, index), node)

    def _apply_entry(self, rec: LedgerEntry, offset: int, in_batch: set[bytes]) -> None:
        seq = self._tree.count
        if rec.seq < seq and self._get(keys.SEQ + keys.u64(rec.seq)) == rec.entry_id + rec.entry_hash:
            return  # already indexed (the same ledger read again from an earlier point)
        if rec.seq != seq or rec.prev_hash != self._head:
            raise ChainError(
                f"entry at offset {offset} (seq {rec.seq}) does not continue the indexed chain at seq "
                f"{seq}; run `streamprov ledger verify`",
                seq,
            )
        if self.verify_hashes:
            problem = content_problem(rec)
            if problem is not None:
                raise ChainError(f"entry seq {seq} at offset {offset}: {problem}", seq)
        batch = self._batch
        assert batch is not None
        eid = rec.entry_id
        batch.put(keys.SEQ + keys.u64(seq), eid + rec.entry_hash)
        self._tree.add_leaf_hash(leaf_hash(rec.entry_hash), self._on_tree_node)
        self._head = rec.entry_hash
        if eid in in_batch or self._get(keys.ENTRY + eid) is not None:
            return  # a replayed application: the graph has it already
        in_batch.add(eid)
        batch.put(keys.ENTRY + eid, encode_entry_body(rec))
        app = rec.application
        out = keys.node(app.output)
        batch.put(keys.PRODUCED + out + eid, b"")
        batch.put(_kind_key(app.output, app.kind), b"")
        batch.put(keys.VERSIONS + out, b"")
        inputs = app.inputs
        at: dict[bytes, list[int]] = {}
        for position, ref in enumerate(inputs):
            at.setdefault(keys.node(ref), []).append(position)
        for n, positions in at.items():
            batch.put(keys.CONSUMED + n + eid, b"".join(map(_U32.pack, positions)))
            batch.put(keys.VERSIONS + n, b"")
        if len(inputs) >= HEAD_MIN_INPUTS:
            headless = replace(rec, application=replace(app, inputs=()))
            batch.put(keys.HEAD + eid, _U32.pack(len(inputs)) + encode_entry_body(headless))
        if app.kind is not ApplicationKind.SOURCE:
            batch.put(keys.function_key(app.function_id, app.function_version, app.code_hash, eid), b"")

    def _apply_checkpoint(self, cp: Checkpoint, offset: int) -> None:
        if cp.ledger_id != self.ledger_id:
            raise ChainError(f"checkpoint at offset {offset} belongs to ledger {cp.ledger_id!r}", self.size)
        if cp.number < self._next_checkpoint and self.checkpoint(cp.number) == cp:
            return  # already indexed
        if (
            cp.number != self._next_checkpoint
            or cp.tree_size != self.size
            or cp.root_hash != self._tree.root()
            or cp.head_hash != self._head
        ):
            raise ChainError(
                f"checkpoint {cp.number} at offset {offset} does not match the {self.size} entries indexed "
                f"before it; run `streamprov ledger verify`",
                self.size,
            )
        if self.verifier is not None:
            problem = self.verifier.problem(cp)
            if problem is not None:
                raise ChainError(f"checkpoint {cp.number} at offset {offset}: {problem}", self.size)
        assert self._batch is not None
        self._batch.put(keys.CHECKPOINT + keys.u64(cp.number), encode_checkpoint_body(cp))
        self._next_checkpoint += 1

    # -- lookups (each a point read or a prefix scan) -------------------------------------------------
    def _get(self, key: bytes) -> bytes | None:
        value: bytes | None = self._db.get(key)
        return value

    def _scan(self, prefix: bytes) -> Iterator[bytes]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():  # stops at the first key past the prefix
            key: bytes = it.key()
            if not key.startswith(prefix):
                return
            yield key
            it.next()

    def producers(self, node: DataRef) -> list[bytes]:
        return [k[-keys.ENTRY_ID_SIZE :] for k in self._scan(keys.PRODUCED + keys.node(node))]

    def consumers(self, node: DataRef) -> list[bytes]:
        return [k[-keys.ENTRY_ID_SIZE :] for k in self._scan(keys.CONSUMED + keys.node(node))]

    def consumers_at(self, node: DataRef) -> list[tuple[bytes, tuple[int, ...] | None]]:
        """(entry_id, the node's positions among the application's inputs) of each application
        consuming `node`; positions None in an index made before they were kept. One prefix scan."""
        prefix = keys.CONSUMED + keys.node(node)
        found: list[tuple[bytes, tuple[int, ...] | None]] = []
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():  # stops at the first key past the prefix
            key: bytes = it.key()
            if not key.startswith(prefix):
                break
            value: bytes = it.value()
            positions = tuple(p for (p,) in _U32.iter_unpack(value)) if value else None
            found.append((key[-keys.ENTRY_ID_SIZE :], positions))
            it.next()
        return found

    def head(self, entry_id: bytes) -> EntryHead | None:
        """The application `entry_id` without its inputs decoded (an `EntryHead`), kept for those with
        at least `HEAD_MIN_INPUTS` inputs; None for the others (read `entry`)."""
        raw = self._get(keys.HEAD + entry_id)
        if raw is None:
            return None
        (count,) = _U32.unpack_from(raw)
        return EntryHead(decode_entry_body(raw[4:]), count)

    def is_source(self, node: DataRef) -> bool:
        """Original data: no producer, or a SOURCE entry among its producers (an identity map onto a
        source node does not make it derived). Two point reads; no entry is decoded."""
        return self.sources_among([node])[0]

    def sources_among(self, nodes: Sequence[DataRef]) -> list[bool]:
        """`is_source` of each node, batched (RocksDB multi-get, two keys per node)."""
        found: list[bool] = []
        for at in range(0, len(nodes), _MULTI_GET):  # bounded multi-gets
            prefixes = _kind_prefixes(nodes[at : at + _MULTI_GET])
            wanted: list[str | int | float | bytes | bool] = [p + _SOURCE_KIND for p in prefixes]
            wanted += [p + _DERIVED_KIND for p in prefixes]
            got: list[bytes | None] = self._db.get(wanted) or []
            half = len(prefixes)
            found += [got[i] is not None or got[half + i] is None for i in range(half)]
        return found

    def derived(self, node: DataRef) -> bool:
        """Some map or reduce produced `node` (it may also be a source: see `is_source`)."""
        return self._get(NODE_KIND + keys.node(node) + _DERIVED_KIND) is not None

    def versions(self, data_id: str) -> list[DataRef]:
        """Every node of `data_id` seen as an input or output (in key order, not time order)."""
        return [keys.parse_node(k, 1) for k in self._scan(keys.data_id_prefix(data_id))]

    def applications_of(
        self, function_id: str, version: str | None = None, code_hash: bytes | None = None
    ) -> list[bytes]:
        """entry_ids of the applications of a function (any version, one version, one exact code)."""
        prefix = keys.function_prefix(function_id, version, code_hash)
        return [k[-keys.ENTRY_ID_SIZE :] for k in self._scan(prefix)]

    def recorded_functions(self, function_id: str) -> list[tuple[str, bytes]]:
        """The (version, code hash) pairs the ledger recorded applications of, one seek per pair."""
        prefix = keys.function_prefix(function_id)
        found: list[tuple[str, bytes]] = []
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():  # one turn per distinct (version, code hash): each skips past its entries
            key: bytes = it.key()
            if not key.startswith(prefix):
                break
            at = len(prefix)
            (n,) = struct.unpack_from(">I", key, at)
            version = key[at + 4 : at + 4 + n]
            at += 4 + n
            (m,) = struct.unpack_from(">I", key, at)
            code_hash = key[at + 4 : at + 4 + m]
            found.append((version.decode("utf-8"), code_hash))
            it.seek(
                keys.function_prefix(function_id, found[-1][0], code_hash)
                + b"\xff" * (keys.ENTRY_ID_SIZE + 1)
            )
        return found

    def entry(self, entry_id: bytes) -> LedgerEntry:
        """The entry of an application (the first time its entry_id was appended)."""
        body = self._get(keys.ENTRY + entry_id)
        if body is None:
            raise LedgerIndexError(f"no entry {entry_id.hex()} in the index")
        return decode_entry_body(body)

    def entry_at(self, seq: int) -> LedgerEntry:
        """The application recorded at `seq` (for a duplicate, the entry of its first appearance)."""
        value = self._get(keys.SEQ + keys.u64(seq)) if seq >= 0 else None
        if value is None:
            raise LedgerIndexError(f"no entry at seq {seq} (the index holds {self.size})")
        return self.entry(value[: keys.ENTRY_ID_SIZE])

    def entry_hash_at(self, seq: int) -> bytes:
        value = self._get(keys.SEQ + keys.u64(seq)) if seq >= 0 else None
        if value is None:
            raise LedgerIndexError(f"no entry at seq {seq} (the index holds {self.size})")
        return value[keys.ENTRY_ID_SIZE :]

    # -- queries --------------------------------------------------------------------------------------
    def upstream(
        self, node: DataRef, *, max_depth: int | None = None, limit: int | None = None
    ) -> UpstreamResult:
        """Lineage of `node` back to its sources (at most `max_depth` applications deep)."""
        return upstream(self, node, max_depth=max_depth, limit=limit)

    def downstream(self, start: DataRef | str, *, limit: int | None = None) -> DownstreamResult:
        """Everything derived from a node, or from the versions of a DataID, in dependency order."""
        return downstream(self, self._roots(start) if isinstance(start, str) else [start], limit=limit)

    def _roots(self, data_id: str) -> list[DataRef]:
        """The source versions of a DataID (no producer but SOURCE entries); else all its versions.

        A map keeps its input's DataID, so a DataID's versions include derived nodes; starting from
        the source versions gives the true depths (the answer is the same set either way).
        """
        versions = self.versions(data_id)
        sources = [v for v in versions if not self.derived(v)]
        return sources or versions

    def affected_by_function(
        self, function_id: str, version: str, code_hash: bytes | None = None, *, limit: int | None = None
    ) -> DownstreamResult:
        """Every output a function version produced and everything derived from them, in order."""
        return downstream_of_applications(
            self, self.applications_of(function_id, version, code_hash), limit=limit
        )

    # -- checkpoints and proofs ------------------------------------------------------------------------
    @property
    def checkpoint_count(self) -> int:
        return self._next_checkpoint

    def checkpoint(self, number: int) -> Checkpoint:
        body = self._get(keys.CHECKPOINT + keys.u64(number)) if number >= 0 else None
        if body is None:
            raise LedgerIndexError(f"no checkpoint {number} (the index holds {self._next_checkpoint})")
        return decode_checkpoint_body(body)

    def latest_checkpoint(self) -> Checkpoint | None:
        return self.checkpoint(self._next_checkpoint - 1) if self._next_checkpoint else None

    def checkpoint_covering(self, seq: int) -> Checkpoint | None:
        """The first checkpoint whose tree includes `seq` (binary search: O(log n) reads)."""
        lo, hi = 0, self._next_checkpoint
        while lo < hi:  # halves each turn
            mid = (lo + hi) // 2
            if self.checkpoint(mid).tree_size > seq:
                hi = mid
            else:
                lo = mid + 1
        return self.checkpoint(lo) if lo < self._next_checkpoint else None

    def _leaves(self, start: int, end: int) -> list[bytes]:
        hashes = [self.entry_hash_at(s) for s in range(start, end)]
        return [leaf_hash(h) for h in hashes]

    def subtree_hash(self, start: int, end: int) -> bytes:
        """MTH of entries [start, end) from stored perfect subtrees: O(log n) reads."""
        if not 0 <= start < end <= self.size:
            raise LedgerIndexError(f"no subtree [{start}, {end}) in a tree of {self.size}")
        n = end - start
        if not n & (n - 1) and not start % n:
            level = n.bit_length() - 1
            if level >= MIN_STORED_LEVEL:
                stored = self._get(keys.tree_key(level, start >> level))
                if stored is None:
                    raise LedgerIndexError(f"Merkle node {level}/{start >> level} missing from the index")
                return stored
            return root_from_leaf_hashes(self._leaves(start, end))
        k = 1 << ((n - 1).bit_length() - 1)
        return node_hash(self.subtree_hash(start, start + k), self.subtree_hash(start + k, end))

    def inclusion_proof(self, seq: int, tree_size: int | None = None) -> InclusionProof:
        """Proof that entry `seq` is in the tree of `tree_size` entries (default: the checkpoint
        covering it), to check with `InclusionProof.verify(checkpoint)`."""
        if tree_size is None:
            covering = self.checkpoint_covering(seq)
            if covering is None:
                raise LedgerIndexError(f"no checkpoint covers seq {seq} yet")
            tree_size = covering.tree_size
        if tree_size > self.size:
            raise LedgerIndexError(f"the index holds {self.size} entries, not {tree_size}")
        return prove_inclusion(self.subtree_hash, seq, tree_size, self.entry_hash_at(seq))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> ConsistencyProof:
        """Proof that the tree of `new_size` entries (default: all indexed) extends that of `old_size`."""
        new_size = self.size if new_size is None else new_size
        if new_size > self.size:
            raise LedgerIndexError(f"the index holds {self.size} entries, not {new_size}")
        return prove_consistency(self.subtree_hash, old_size, new_size)
