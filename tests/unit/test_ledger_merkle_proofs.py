"""RFC 6962 / RFC 9162 inclusion and consistency proofs in streamprov.merkle, and the proof objects."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamprov.errors import StreamprovError
from streamprov.ledger import ConsistencyProof, InclusionProof, MemoryProver, ProofError
from streamprov.merkle import (
    MerkleAccumulator,
    SubtreeHashes,
    consistency_proof,
    fold_frontier,
    inclusion_proof,
    leaf_hash,
    merkle_root,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

# The reference tree of Certificate Transparency's tests (google/certificate-transparency,
# cpp/merkletree/merkle_tree_test.cc): eight leaves, with published audit paths and proofs.
CT_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_PATHS = {
    (0, 1): [],
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_CONSISTENCY = {
    (1, 1): [],
    (1, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}
CT_HASHES = [leaf_hash(x) for x in CT_LEAVES]


@pytest.mark.parametrize(("index", "size"), sorted(CT_PATHS))
def test_inclusion_proofs_match_certificate_transparency(index: int, size: int) -> None:
    proof = inclusion_proof(index, size, SubtreeHashes(CT_HASHES[:size]))
    assert [p.hex() for p in proof] == CT_PATHS[(index, size)]
    assert verify_inclusion(CT_HASHES[index], index, size, proof, merkle_root(CT_LEAVES[:size]))


@pytest.mark.parametrize(("old", "new"), sorted(CT_CONSISTENCY))
def test_consistency_proofs_match_certificate_transparency(old: int, new: int) -> None:
    proof = consistency_proof(old, new, SubtreeHashes(CT_HASHES[:new]))
    assert [p.hex() for p in proof] == CT_CONSISTENCY[(old, new)]
    assert verify_consistency(old, new, merkle_root(CT_LEAVES[:old]), merkle_root(CT_LEAVES[:new]), proof)


def _hashes(n: int) -> list[bytes]:
    return [leaf_hash(hashlib.sha256(i.to_bytes(4, "big")).digest()) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1))))
def test_every_inclusion_proof_verifies_and_any_change_breaks_it(case: tuple[int, int]) -> None:
    size, index = case
    hashes = _hashes(size)
    root = root_from_leaf_hashes(hashes)
    proof = inclusion_proof(index, size, SubtreeHashes(hashes))
    assert len(proof) <= size.bit_length()
    assert verify_inclusion(hashes[index], index, size, proof, root)
    other = hashes[(index + 1) % size] if size > 1 else leaf_hash(b"x")
    assert not verify_inclusion(other, index, size, proof, root)
    assert not verify_inclusion(hashes[index], index, size, proof, leaf_hash(b"root"))
    for i in range(len(proof)):
        mutated = list(proof)
        mutated[i] = bytes([mutated[i][0] ^ 1]) + mutated[i][1:]
        assert not verify_inclusion(hashes[index], index, size, mutated, root)
    if proof:
        assert not verify_inclusion(hashes[index], index, size, proof[:-1], root)
        assert not verify_inclusion(hashes[index], index, size, [*proof, proof[0]], root)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_every_consistency_proof_verifies_and_any_change_breaks_it(case: tuple[int, int]) -> None:
    old, new = case
    hashes = _hashes(new)
    old_root, new_root = root_from_leaf_hashes(hashes[:old]), root_from_leaf_hashes(hashes)
    proof = consistency_proof(old, new, SubtreeHashes(hashes))
    assert verify_consistency(old, new, old_root, new_root, proof)
    if 0 < old < new:
        assert not verify_consistency(old, new, leaf_hash(b"forged"), new_root, proof)
        assert not verify_consistency(old, new, old_root, leaf_hash(b"forged"), proof)
        for i in range(len(proof)):
            mutated = list(proof)
            mutated[i] = bytes([mutated[i][0] ^ 1]) + mutated[i][1:]
            assert not verify_consistency(old, new, old_root, new_root, mutated)
        assert not verify_consistency(old, new, old_root, new_root, proof[:-1])


def test_a_rewritten_history_has_no_consistency_proof() -> None:
    hashes = _hashes(20)
    rewritten = list(hashes)
    rewritten[3] = leaf_hash(b"rewritten")
    old_root = root_from_leaf_hashes(hashes[:10])
    proof = consistency_proof(10, 20, SubtreeHashes(rewritten))
    assert not verify_consistency(10, 20, old_root, root_from_leaf_hashes(rewritten), proof)


def test_bad_arguments() -> None:
    with pytest.raises(StreamprovError):
        inclusion_proof(3, 3, SubtreeHashes(_hashes(3)))
    with pytest.raises(StreamprovError):
        consistency_proof(4, 3, SubtreeHashes(_hashes(3)))
    assert not verify_inclusion(CT_HASHES[0], 1, 1, [], CT_HASHES[0])
    assert not verify_consistency(2, 1, b"", b"", [])
    assert not verify_consistency(2, 3, b"a", b"b", [])  # an empty proof proves nothing
    assert verify_consistency(0, 5, b"", b"anything", [])
    assert not verify_consistency(3, 3, b"a", b"b", [])


def test_accumulator_reports_every_perfect_subtree_and_resumes_from_its_frontier() -> None:
    hashes = _hashes(77)
    nodes: dict[tuple[int, int], bytes] = {}
    acc = MerkleAccumulator()
    for h in hashes:
        acc.add_leaf_hash(h, lambda level, index, value: nodes.__setitem__((level, index), value))
    subtree = SubtreeHashes(hashes)
    assert len(nodes) == 77 + 38 + 19 + 9 + 4 + 2 + 1
    for (level, index), value in nodes.items():
        assert subtree(index << level, (index + 1) << level) == value
    assert acc.root() == root_from_leaf_hashes(hashes) == fold_frontier(acc.frontier)
    resumed = MerkleAccumulator.from_frontier(
        50, MerkleAccumulator.from_bytes(_prefix_state(hashes, 50)).frontier
    )
    for h in hashes[50:]:
        resumed.add_leaf_hash(h)
    assert resumed.root() == acc.root()
    with pytest.raises(StreamprovError):
        MerkleAccumulator.from_frontier(3, [b"x" * 32])


def _prefix_state(hashes: list[bytes], n: int) -> bytes:
    acc = MerkleAccumulator()
    for h in hashes[:n]:
        acc.add_leaf_hash(h)
    return acc.to_bytes()


def test_accumulator_add_leaf_hash_agrees_with_add() -> None:
    a, b = MerkleAccumulator(), MerkleAccumulator()
    for i in range(33):
        data = i.to_bytes(2, "big")
        a.add(data)
        b.add_leaf_hash(leaf_hash(data))
        assert a.root() == b.root() == merkle_root([j.to_bytes(2, "big") for j in range(i + 1)])


def test_ledger_proof_objects_check_sizes_and_roots() -> None:
    entry_hashes = [hashlib.sha256(bytes([i])).digest() for i in range(12)]
    prover = MemoryProver(entry_hashes)
    proof = prover.inclusion(7, 12)
    assert isinstance(proof, InclusionProof) and proof.entry_hash == entry_hashes[7]
    cons = prover.consistency(5, 12)
    assert isinstance(cons, ConsistencyProof)
    with pytest.raises(ProofError):
        prover.inclusion(12, 12)
    with pytest.raises(ProofError):
        prover.consistency(5, 13)
    with pytest.raises(ProofError):
        prover.consistency(6, 5)
