"""The hash chain: one sequencer turns applications into numbered, chained entries and checkpoints.

Chaining needs a single writer: each entry's hash covers the hash before it, so two writers appending
to one ledger would fork it. `LedgerChain` is that sequencer; it is not thread-safe by design, and the
asynchronous `LedgerWriter` runs it on its own thread. The ledger topic has one partition and exactly
one writer (a transactional id lets Kafka fence a zombie writer; see `KafkaLedgerSink`).

Replays are expected: after a crash, agents re-process records whose ledger entries may already be
stored. An application's entry_id depends only on what ran on what, so the chain drops an id it has
seen within its bounded `dedup_window`; older duplicates are appended but the index ignores them
(it keys the graph by entry_id), so the DAG never grows twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streamprov.header import now_ms
from streamprov.ledger.errors import ChainError
from streamprov.ledger.hashing import (
    content_problem,
    entry_hash_of,
    entry_id_of,
    genesis_hash,
    identity_material,
)
from streamprov.ledger.model import (
    Application,
    Checkpoint,
    LedgerEntry,
    LedgerRecord,
    MalformedRecord,
    StoredRecord,
)
from streamprov.ledger.signing import CheckpointSigner
from streamprov.merkle import MerkleAccumulator, fold_frontier

DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_DEDUP_WINDOW = 100_000


@dataclass
class ChainState:
    """Everything the sequencer needs to continue a ledger: O(log n) hashes plus the dedup window."""

    ledger_id: str
    next_seq: int
    head_hash: bytes
    tree: MerkleAccumulator
    next_checkpoint: int = 0
    checkpointed_size: int = 0
    recent_ids: dict[bytes, None] = field(default_factory=dict)
    """entry_ids seen lately, oldest first (a dict keeps insertion order: a bounded FIFO set)."""

    @classmethod
    def genesis(cls, ledger_id: str) -> ChainState:
        return cls(ledger_id, 0, genesis_hash(ledger_id), MerkleAccumulator())

    def remember(self, entry_id: bytes, window: int) -> None:
        self.recent_ids[entry_id] = None
        while len(self.recent_ids) > window:  # at most one turn per call after the first fill
            del self.recent_ids[next(iter(self.recent_ids))]

    def advance(self, entry: LedgerEntry, window: int) -> None:
        self.tree.add(entry.entry_hash)
        self.head_hash = entry.entry_hash
        self.next_seq = entry.seq + 1
        self.remember(entry.entry_id, window)


class LedgerChain:
    """Sequences applications into entries; signs a checkpoint every `checkpoint_every` entries.

    Without a signer the chain has no checkpoints: entries are still chained, but nothing proves the
    ledger was not rewritten wholesale. Production ledgers pass a signer.
    """

    def __init__(
        self,
        ledger_id: str,
        signer: CheckpointSigner | None = None,
        *,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
        state: ChainState | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        if checkpoint_every < 1 or dedup_window < 0:
            raise ValueError("checkpoint_every must be >= 1 and dedup_window >= 0")
        if state is not None and state.ledger_id != ledger_id:
            raise ChainError(f"state of ledger {state.ledger_id!r} given to a chain of {ledger_id!r}")
        self.ledger_id = ledger_id
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.dedup_window = dedup_window
        self.state = state if state is not None else ChainState.genesis(ledger_id)
        self._clock = clock

    @property
    def next_seq(self) -> int:
        return self.state.next_seq

    @property
    def head_hash(self) -> bytes:
        return self.state.head_hash

    def append(self, app: Application) -> list[LedgerRecord]:
        """The records to store for `app`, in order: [] for a recent duplicate, else the entry,
        followed by a checkpoint when one is due."""
        state = self.state
        material = identity_material(app)
        entry_id = entry_id_of(app, material)
        if entry_id in state.recent_ids:
            return []
        seq = state.next_seq
        entry = LedgerEntry(
            seq, state.head_hash, entry_id, app, entry_hash_of(seq, state.head_hash, entry_id, app, material)
        )
        state.advance(entry, self.dedup_window)
        if self.signer is not None and state.next_seq - state.checkpointed_size >= self.checkpoint_every:
            return [entry, self._sign()]
        return [entry]

    def checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint now if any entry is not covered yet (on close, so a cleanly stopped
        ledger is covered to its last entry); None without a signer or anything new."""
        if self.signer is None or self.state.next_seq == self.state.checkpointed_size:
            return None
        return self._sign()

    def _sign(self) -> Checkpoint:
        assert self.signer is not None
        state = self.state
        cp = self.signer.sign(
            self.ledger_id,
            state.next_checkpoint,
            state.next_seq,
            state.tree.root(),
            state.head_hash,
            state.tree.frontier,
            self._clock(),
        )
        state.next_checkpoint += 1
        state.checkpointed_size = state.next_seq
        return cp


def resume_state(
    ledger_id: str,
    records: Iterable[StoredRecord],
    *,
    from_start: bool,
    dedup_window: int = DEFAULT_DEDUP_WINDOW,
) -> ChainState | None:
    """Rebuild the sequencer's state from stored records (a new writer taking over the ledger).

    With `from_start` the records begin at the ledger's first record. Otherwise they are a tail: the
    state starts at the first checkpoint met (its frontier carries the tree) and None means the tail
    held no checkpoint, so the caller reads further back. Entries are checked (hashes, sequence,
    links, checkpoint roots) but signatures are not: a writer needs consistency, verifiers trust.
    Raises `ChainError` rather than extend a ledger that does not chain.
    """
    state = ChainState.genesis(ledger_id) if from_start else None
    early_ids: dict[bytes, None] = {}
    for item in records:
        rec = item.record
        if isinstance(rec, MalformedRecord):
            raise ChainError(f"ledger record at offset {item.offset} is malformed: {rec.reason}")
        if isinstance(rec, Checkpoint):
            if rec.ledger_id != ledger_id:
                raise ChainError(f"checkpoint at offset {item.offset} belongs to ledger {rec.ledger_id!r}")
            if fold_frontier(rec.frontier) != rec.root_hash:
                raise ChainError(
                    f"checkpoint {rec.number} at offset {item.offset}: frontier does not fold to its root"
                )
            if state is None:
                state = ChainState(
                    ledger_id,
                    rec.tree_size,
                    rec.head_hash,
                    MerkleAccumulator.from_frontier(rec.tree_size, rec.frontier),
                    rec.number + 1,
                    rec.tree_size,
                    early_ids,
                )
                continue
            if (
                rec.tree_size != state.next_seq
                or rec.root_hash != state.tree.root()
                or rec.head_hash != state.head_hash
            ):
                raise ChainError(
                    f"checkpoint {rec.number} at offset {item.offset} does not match the entries before it",
                    state.next_seq,
                )
            state.next_checkpoint = rec.number + 1
            state.checkpointed_size = rec.tree_size
            continue
        if state is None:
            early_ids[rec.entry_id] = None
            if len(early_ids) > dedup_window:
                del early_ids[next(iter(early_ids))]
            continue
        problem = content_problem(rec)
        if problem is not None:
            raise ChainError(f"entry seq {rec.seq} at offset {item.offset}: {problem}", rec.seq)
        if rec.seq != state.next_seq or rec.prev_hash != state.head_hash:
            raise ChainError(
                f"entry at offset {item.offset} (seq {rec.seq}) does not continue the chain at seq "
                f"{state.next_seq}; run `streamprov ledger verify`",
                state.next_seq,
            )
        state.advance(rec, dedup_window)
    return state
