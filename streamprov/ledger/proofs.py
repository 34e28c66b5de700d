"""Ledger-level Merkle proofs: "this entry is in checkpoint N" and "checkpoint M extends checkpoint N".

The leaves of the ledger's Merkle tree are the entries' entry_hash values, hashed as RFC 6962 leaves
(SHA-256 of 0x00 || entry_hash); a checkpoint signs the root over its first `tree_size` leaves. A
proof is a short list of hashes (at most 2 log2(n)) that anyone holding the signed checkpoints can
check without the ledger: an auditor keeps checkpoints, asks the index for proofs, and checks them
here. Generation over an in-memory ledger is here too; the index generates from stored subtrees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streamprov.errors import StreamprovError
from streamprov.ledger.errors import ProofError
from streamprov.ledger.hashing import content_problem
from streamprov.ledger.model import Checkpoint, LedgerEntry
from streamprov.ledger.signing import CheckpointVerifier
from streamprov.merkle import (
    SubtreeHash,
    SubtreeHashes,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """The audit path of entry `seq` (with hash `entry_hash`) in the tree of `tree_size` entries."""

    seq: int
    tree_size: int
    entry_hash: bytes
    path: tuple[bytes, ...]

    def verify(self, checkpoint: Checkpoint) -> bool:
        """Does the path lead from the entry's leaf to the checkpoint's root? (Signature not checked.)"""
        return checkpoint.tree_size == self.tree_size and verify_inclusion(
            leaf_hash(self.entry_hash), self.seq, self.tree_size, self.path, checkpoint.root_hash
        )


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """Hashes showing the tree of `old_size` entries is a prefix of the tree of `new_size` entries."""

    old_size: int
    new_size: int
    path: tuple[bytes, ...]

    def verify(self, old: Checkpoint, new: Checkpoint) -> bool:
        """Does checkpoint `new` extend checkpoint `old` (nothing before `old_size` changed)?"""
        return (
            old.ledger_id == new.ledger_id
            and (old.tree_size, new.tree_size) == (self.old_size, self.new_size)
            and verify_consistency(self.old_size, self.new_size, old.root_hash, new.root_hash, self.path)
        )


def prove_inclusion(subtree: SubtreeHash, seq: int, tree_size: int, entry_hash: bytes) -> InclusionProof:
    try:
        return InclusionProof(seq, tree_size, entry_hash, tuple(inclusion_proof(seq, tree_size, subtree)))
    except StreamprovError as exc:
        raise ProofError(str(exc)) from exc


def prove_consistency(subtree: SubtreeHash, old_size: int, new_size: int) -> ConsistencyProof:
    try:
        return ConsistencyProof(old_size, new_size, tuple(consistency_proof(old_size, new_size, subtree)))
    except StreamprovError as exc:
        raise ProofError(str(exc)) from exc


class MemoryProver:
    """Proofs over entry hashes held in memory (tests, small ledgers, a verifier's own copy)."""

    def __init__(self, entry_hashes: Sequence[bytes]) -> None:
        self.entry_hashes = list(entry_hashes)
        self._subtree = SubtreeHashes([leaf_hash(h) for h in self.entry_hashes])

    def inclusion(self, seq: int, tree_size: int) -> InclusionProof:
        if tree_size > len(self.entry_hashes) or not 0 <= seq < tree_size:
            raise ProofError(f"no entry {seq} in a tree of {tree_size} (holding {len(self.entry_hashes)})")
        return prove_inclusion(self._subtree, seq, tree_size, self.entry_hashes[seq])

    def consistency(self, old_size: int, new_size: int) -> ConsistencyProof:
        if new_size > len(self.entry_hashes):
            raise ProofError(f"no tree of {new_size} entries (holding {len(self.entry_hashes)})")
        return prove_consistency(self._subtree, old_size, new_size)


def entry_proven(
    entry: LedgerEntry, proof: InclusionProof, checkpoint: Checkpoint, verifier: CheckpointVerifier
) -> str | None:
    """Everything an auditor checks for "this entry is in checkpoint N": the entry's own hashes,
    the proof, and the checkpoint's signature. None when proven, else why not."""
    problem = content_problem(entry)
    if problem is not None:
        return f"the entry is not intact: {problem}"
    if proof.seq != entry.seq or proof.entry_hash != entry.entry_hash:
        return "the proof is for another entry"
    signature = verifier.problem(checkpoint)
    if signature is not None:
        return f"checkpoint {checkpoint.number}: {signature}"
    if not proof.verify(checkpoint):
        return f"the inclusion proof does not lead to the root of checkpoint {checkpoint.number}"
    return None
