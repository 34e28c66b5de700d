"""Re-derive a stored ledger and name the first thing wrong with it.

`verify_ledger` streams the stored records once, in storage order, and re-derives everything: each
entry's entry_id and entry_hash from its content, the sequence numbers, the hash chain, every
checkpoint's Merkle root (from the entries themselves) and Ed25519 signature. It stops at the first
problem and says what kind it is, which entry (seq) and where it is stored (offset):

- MODIFIED: an entry's content no longer matches its hashes, or it was changed and re-hashed so its
  successor's link no longer matches, or it no longer decodes;
- DELETED: sequence numbers jump (entries, or a checkpoint, are missing);
- INSERTED: a record that is not part of the chain sits between chained entries;
- REORDERED: the entry that should come next is stored a little later;
- BAD_SIGNATURE: a checkpoint's signature fails, or names an untrusted key;
- REWRITTEN: the chain is intact but does not match what a signed checkpoint covers (entries changed
  and every later entry re-chained); the checkpoint's frontier narrows where;
- TRUNCATED: the ledger ends before a checkpoint you already trust (pass it as `trusted`);
- UNSIGNED (only with `require_signed`): entries after the last checkpoint.

Telling insertion from deletion from reordering needs to look ahead: a bounded window of upcoming
records (`lookahead`), so memory stays bounded whatever the ledger's size. Limits, stated plainly:
entries appended at the end with a valid chain are "unsigned" until a checkpoint covers them, and
cutting both the last entries and their checkpoints is invisible without a checkpoint kept elsewhere
(publish checkpoints to a witness and pass the last one as `trusted`).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from streamprov.ledger.codec import CHECKPOINT_PREFIX
from streamprov.ledger.hashing import content_problem, genesis_hash
from streamprov.ledger.model import Checkpoint, LedgerEntry, MalformedRecord, StoredRecord
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.merkle import MerkleAccumulator

DEFAULT_LOOKAHEAD = 1024


class ProblemKind(enum.Enum):
    MODIFIED = "modified"
    DELETED = "deleted"
    INSERTED = "inserted"
    REORDERED = "reordered"
    BAD_SIGNATURE = "bad signature"
    REWRITTEN = "rewritten"
    TRUNCATED = "truncated"
    UNSIGNED = "unsigned"


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong: its kind, the entry (seq) and storage position (offset) it is at."""

    kind: ProblemKind
    seq: int | None
    offset: int | None
    detail: str
    checkpoint: int | None = None

    def describe(self) -> str:
        where = []
        if self.seq is not None:
            where.append(f"seq {self.seq}")
        if self.checkpoint is not None:
            where.append(f"checkpoint {self.checkpoint}")
        if self.offset is not None:
            where.append(f"offset {self.offset}")
        return f"{self.kind.value.upper()} at {', '.join(where) or 'end of ledger'}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What verification established; `problem` is None when nothing is wrong."""

    ledger_id: str
    entries: int
    """Entries verified (before the problem, if any)."""
    checkpoints: int
    signed_size: int
    """Entries covered by the last verified checkpoint."""
    head_hash: bytes
    root_hash: bytes
    signatures_checked: bool
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def unsigned_tail(self) -> int:
        """Entries after the last verified checkpoint (a running writer's latest, or a cut tail)."""
        return self.entries - self.signed_size

    def describe(self) -> str:
        if self.problem is not None:
            return (
                f"ledger {self.ledger_id!r}: FAILED after {self.entries} good entries and "
                f"{self.checkpoints} good checkpoints\n  {self.problem.describe()}"
            )
        lines = [
            f"ledger {self.ledger_id!r}: OK, {self.entries} entries, {self.checkpoints} checkpoints",
            f"  root {self.root_hash.hex()} over {self.entries} entries, head {self.head_hash.hex()}",
        ]
        if not self.signatures_checked:
            lines.append("  signatures NOT checked (no public key given)")
        if self.unsigned_tail:
            lines.append(f"  {self.unsigned_tail} entries after the last checkpoint are not signed yet")
        return "\n".join(lines)


class _Verifier:
    def __init__(
        self,
        records: Iterable[StoredRecord],
        ledger_id: str,
        verifier: CheckpointVerifier | None,
        trusted: Iterable[Checkpoint],
        lookahead: int,
    ) -> None:
        self.ledger_id = ledger_id
        self.verifier = verifier
        self.trusted = {cp.tree_size: cp for cp in trusted}
        self.lookahead = max(1, lookahead)
        self._source: Iterator[StoredRecord] = iter(records)
        self._buffer: deque[StoredRecord] = deque()
        self.tree = MerkleAccumulator()
        self.head = genesis_hash(ledger_id)
        self.checkpoints = 0
        self.signed_size = 0
        self.next_checkpoint = 0
        self.last: tuple[LedgerEntry, int, bytes] | None = None  # last accepted, its offset, head before it
        self._frontier_before_last: tuple[bytes, ...] = ()

    # -- reading with a bounded look-ahead --------------------------------------------------------
    def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            item = next(self._source, None)
            if item is None:
                return
            self._buffer.append(item)

    def _next(self) -> StoredRecord | None:
        self._fill(1)
        return self._buffer.popleft() if self._buffer else None

    def _upcoming_entries(self) -> Iterator[tuple[LedgerEntry, int]]:
        self._fill(self.lookahead)
        for item in self._buffer:
            if isinstance(item.record, LedgerEntry):
                yield item.record, item.offset

    def _next_entry(self) -> LedgerEntry | None:
        return next((e for e, _ in self._upcoming_entries()), None)

    @property
    def expected(self) -> int:
        return self.tree.count

    def _belongs_later(self, e: LedgerEntry) -> bool:
        """Is `e` a genuine entry stored too early: its predecessor (seq - 1) is coming up and links
        to it, and it is not stored a second time (a copy is an insertion)."""
        linked = False
        for entry, _ in self._upcoming_entries():
            if entry.entry_hash == e.entry_hash:
                return False
            linked = linked or (entry.seq == e.seq - 1 and entry.entry_hash == e.prev_hash)
        return linked

    def _fits(self, entry: LedgerEntry | None) -> bool:
        return (
            entry is not None
            and entry.seq == self.expected
            and entry.prev_hash == self.head
            and content_problem(entry) is None
        )

    # -- the walk ----------------------------------------------------------------------------------
    def run(self) -> Problem | None:
        while True:  # one stored record per turn; the source is finite
            item = self._next()
            if item is None:
                return self._at_end()
            rec = item.record
            if isinstance(rec, LedgerEntry):
                problem = self._entry(rec, item.offset)
            elif isinstance(rec, Checkpoint):
                problem = self._checkpoint(rec, item.offset)
            else:
                problem = self._malformed(rec, item.offset)
            if problem is not None:
                return problem

    def _accept(self, entry: LedgerEntry, offset: int) -> Problem | None:
        self.last = (entry, offset, self.head)
        self._frontier_before_last = self.tree.frontier
        self.tree.add(entry.entry_hash)
        self.head = entry.entry_hash
        trusted = self.trusted.get(self.tree.count)
        if trusted is not None and trusted.root_hash != self.tree.root():
            return self._rewritten(trusted, offset, "a trusted checkpoint")
        return None

    def _entry(self, e: LedgerEntry, offset: int) -> Problem | None:
        k = self.expected
        content = content_problem(e)
        if content is None and e.seq == k and e.prev_hash == self.head:
            return self._accept(e, offset)
        nxt = self._next_entry()
        if content is None and e.seq > k and self._belongs_later(e):
            moved = next((off for entry, off in self._upcoming_entries() if entry.seq == k), None)
            return Problem(
                ProblemKind.REORDERED,
                k,
                offset if moved is None else moved,
                f"entry seq {e.seq} (offset {offset}) is stored before seq {k}"
                + ("" if moved is None else f" (offset {moved})"),
            )
        if self._fits(nxt):
            return Problem(
                ProblemKind.INSERTED,
                k,
                offset,
                f"the entry stored here (claiming seq {e.seq}) is not part of the chain: "
                f"the next entry continues the chain from seq {k - 1}",
            )
        if self.last is not None and content is None and e.seq == k - 1 and e.prev_hash == self.last[2]:
            _, first_offset, _ = self.last
            if nxt is not None and nxt.prev_hash == e.entry_hash:
                return Problem(
                    ProblemKind.INSERTED,
                    k - 1,
                    first_offset,
                    f"two entries claim seq {k - 1} (offsets {first_offset} and {offset}); the chain "
                    f"continues from the one at offset {offset}, so the one at offset {first_offset} "
                    "was inserted",
                )
            return Problem(
                ProblemKind.INSERTED,
                k - 1,
                offset,
                f"a second entry claiming seq {k - 1} (the first is at offset {first_offset})",
            )
        if e.seq > k:
            moved = next((off for entry, off in self._upcoming_entries() if entry.seq == k), None)
            if moved is not None:
                return Problem(
                    ProblemKind.REORDERED,
                    k,
                    moved,
                    f"entry seq {k} is stored at offset {moved}, after seq {e.seq} (offset {offset})",
                )
            gap = f"seq {k}" if e.seq == k + 1 else f"seq {k}..{e.seq - 1}"
            after = f"the entry stored after seq {k - 1}" if k else "the first stored entry"
            return Problem(ProblemKind.DELETED, k, offset, f"{gap} missing: {after} is seq {e.seq}")
        if e.seq < k:
            return Problem(
                ProblemKind.INSERTED,
                k,
                offset,
                f"an entry claiming seq {e.seq} is stored after seq {k - 1}",
            )
        if content is not None:
            return Problem(ProblemKind.MODIFIED, k, offset, f"entry seq {k}: {content}")
        if self.last is None:
            return Problem(
                ProblemKind.MODIFIED,
                0,
                offset,
                f"entry seq 0 does not chain from the genesis of ledger {self.ledger_id!r} "
                "(changed, or another ledger's entry)",
            )
        prev, prev_offset, _ = self.last
        return Problem(
            ProblemKind.MODIFIED,
            prev.seq,
            prev_offset,
            f"entry seq {prev.seq} was changed and re-hashed: its entry_hash is not the prev_hash "
            f"entry seq {k} (offset {offset}) committed to",
        )

    def _malformed(self, rec: MalformedRecord, offset: int) -> Problem:
        k = self.expected
        if rec.raw.startswith(CHECKPOINT_PREFIX):
            return Problem(
                ProblemKind.MODIFIED,
                None,
                offset,
                f"a checkpoint (expected number {self.next_checkpoint}) no longer decodes: {rec.reason}",
                self.next_checkpoint,
            )
        if self._fits(self._next_entry()):
            return Problem(
                ProblemKind.INSERTED, k, offset, f"a record that is not a ledger record: {rec.reason}"
            )
        return Problem(
            ProblemKind.MODIFIED, k, offset, f"the record stored for seq {k} no longer decodes: {rec.reason}"
        )

    def _checkpoint(self, cp: Checkpoint, offset: int) -> Problem | None:
        last_seq = cp.tree_size - 1 if cp.tree_size else None
        if self.verifier is not None:
            reason = self.verifier.problem(cp)
            if reason is not None:
                return Problem(
                    ProblemKind.BAD_SIGNATURE,
                    last_seq,
                    offset,
                    f"checkpoint {cp.number}: {reason}",
                    cp.number,
                )
        if cp.ledger_id != self.ledger_id:
            return Problem(
                ProblemKind.INSERTED, last_seq, offset, f"a checkpoint of ledger {cp.ledger_id!r}", cp.number
            )
        if cp.number > self.next_checkpoint:
            missing = self.next_checkpoint
            return Problem(
                ProblemKind.DELETED,
                None,
                offset,
                f"checkpoint {missing} is missing: the next stored checkpoint is {cp.number}",
                missing,
            )
        if cp.number < self.next_checkpoint:
            return Problem(
                ProblemKind.INSERTED,
                last_seq,
                offset,
                f"checkpoint {cp.number} appears again after checkpoint {self.next_checkpoint - 1}",
                cp.number,
            )
        k = self.expected
        if cp.tree_size > k:
            upcoming = {e.seq for e, _ in self._upcoming_entries()}
            if all(s in upcoming for s in range(k, min(cp.tree_size, k + self.lookahead))):
                return Problem(
                    ProblemKind.REORDERED,
                    k,
                    offset,
                    f"checkpoint {cp.number} covers {cp.tree_size} entries but is stored before seq {k}",
                    cp.number,
                )
            return Problem(
                ProblemKind.DELETED,
                k,
                offset,
                f"checkpoint {cp.number} covers {cp.tree_size} entries but only {k} are stored before it",
                cp.number,
            )
        if cp.tree_size < k:
            return Problem(
                ProblemKind.REORDERED,
                cp.tree_size,
                offset,
                f"checkpoint {cp.number} covers {cp.tree_size} entries but is stored after seq {k - 1}",
                cp.number,
            )
        if cp.root_hash != self.tree.root() or cp.head_hash != self.head:
            if self._only_last_changed(cp) and self.last is not None:
                entry, entry_offset, _ = self.last
                return Problem(
                    ProblemKind.MODIFIED,
                    entry.seq,
                    entry_offset,
                    f"entry seq {entry.seq} was changed and re-hashed: checkpoint {cp.number} signed "
                    "another entry_hash for it",
                    cp.number,
                )
            return self._rewritten(cp, offset, f"signed checkpoint {cp.number}")
        self.checkpoints += 1
        self.next_checkpoint = cp.number + 1
        self.signed_size = cp.tree_size
        return None

    def _only_last_changed(self, cp: Checkpoint) -> bool:
        """Would the tree match the checkpoint with its last leaf being the head the checkpoint signed?"""
        if cp.head_hash == self.head or not self.tree.count:
            return False
        tree = MerkleAccumulator.from_frontier(self.tree.count - 1, self._frontier_before_last)
        tree.add(cp.head_hash)
        return tree.root() == cp.root_hash

    def _rewritten(self, cp: Checkpoint, offset: int, what: str) -> Problem:
        """Entries re-chained after a change: the first differing frontier subtree bounds where."""
        lo, hi = self.signed_size, cp.tree_size
        start = 0
        for level in reversed(range(cp.tree_size.bit_length())):
            if not cp.tree_size >> level & 1:
                continue
            size = 1 << level
            index = bin(cp.tree_size >> (level + 1)).count("1")
            ours = self.tree.frontier[index] if index < len(self.tree.frontier) else b""
            if cp.frontier[index] != ours:
                lo, hi = max(lo, start), min(hi, start + size)
                break
            start += size
        return Problem(
            ProblemKind.REWRITTEN,
            lo,
            offset,
            f"the entries do not match {what} over {cp.tree_size} entries: an entry in seq "
            f"{lo}..{hi - 1} was changed and every later entry re-chained",
            cp.number,
        )

    def _at_end(self) -> Problem | None:
        beyond = [size for size in self.trusted if size > self.expected]
        if beyond:
            return Problem(
                ProblemKind.TRUNCATED,
                self.expected,
                None,
                f"the ledger ends after {self.expected} entries, but a trusted checkpoint covers "
                f"{max(beyond)}",
            )
        return None


def verify_ledger(
    records: Iterable[StoredRecord],
    ledger_id: str,
    verifier: CheckpointVerifier | None,
    *,
    trusted: Iterable[Checkpoint] = (),
    require_signed: bool = False,
    lookahead: int = DEFAULT_LOOKAHEAD,
) -> VerifyReport:
    """Verify stored records (in storage order) of ledger `ledger_id`; see the module docstring.

    `verifier` holds the trusted public keys (None skips signatures: the report says so).
    `trusted`: checkpoints obtained elsewhere earlier (a witness); the ledger must contain them.
    `require_signed`: entries after the last checkpoint are a problem (a cleanly closed writer
    always ends the ledger with a checkpoint).
    """
    v = _Verifier(records, ledger_id, verifier, trusted, lookahead)
    problem = v.run()
    if problem is None and require_signed and v.expected > v.signed_size:
        problem = Problem(
            ProblemKind.UNSIGNED,
            v.signed_size,
            None,
            f"{v.expected - v.signed_size} entries after the last checkpoint are not covered by a signature",
        )
    return VerifyReport(
        ledger_id,
        v.expected,
        v.checkpoints,
        v.signed_size,
        v.head,
        v.tree.root(),
        v.verifier is not None,
        problem,
    )
