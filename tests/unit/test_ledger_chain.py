"""The sequencer (seq, links, dedup, checkpoints), resuming it from storage, and the signing keys."""

from __future__ import annotations

import base64
import dataclasses
import itertools
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from ledger_support import LEDGER, OTHER_SEED, SEED, build, chain_apps, signer, store_of, verifier

from streamprov.ledger import (
    ChainError,
    Checkpoint,
    CheckpointSigner,
    CheckpointVerifier,
    LedgerChain,
    LedgerEntry,
    SigningKeyError,
    genesis_hash,
    load_private_key,
    load_public_key,
    resume_state,
)
from streamprov.ledger.signing import SIGNING_KEY_ENV, SIGNING_KEY_FILE_ENV, key_id_of, public_key_pem
from streamprov.merkle import fold_frontier, leaf_hash, root_from_leaf_hashes


def test_entries_are_numbered_and_chained_from_the_ledger_genesis() -> None:
    chain = LedgerChain(LEDGER)
    entries = [r for app in chain_apps(5) for r in chain.append(app)]
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4]  # type: ignore[union-attr]
    assert isinstance(entries[0], LedgerEntry) and entries[0].prev_hash == genesis_hash(LEDGER)
    for before, after in itertools.pairwise(entries):
        assert isinstance(before, LedgerEntry) and isinstance(after, LedgerEntry)
        assert after.prev_hash == before.entry_hash
    assert chain.next_seq == 5 and chain.checkpoint() is None  # no signer, no checkpoints


def test_recent_duplicates_are_dropped_and_old_ones_appended() -> None:
    chain = LedgerChain(LEDGER, dedup_window=3)
    apps = chain_apps(5)
    for app in apps:
        assert len(chain.append(app)) == 1
    replay = dataclasses.replace(apps[4], timestamp_ms=0, device_id="other")
    assert chain.append(replay) == []  # within the window: the same application, not a new entry
    assert len(chain.append(apps[0])) == 1  # beyond the window: appended (the index ignores it)
    assert chain.next_seq == 6


def test_checkpoints_every_n_entries_cover_the_tree_and_verify() -> None:
    chain = LedgerChain(LEDGER, signer(), checkpoint_every=4)
    records = [r for app in chain_apps(10) for r in chain.append(app)]
    checkpoints = [r for r in records if isinstance(r, Checkpoint)]
    entries = [r for r in records if isinstance(r, LedgerEntry)]
    assert [(c.number, c.tree_size) for c in checkpoints] == [(0, 4), (1, 8)]
    assert records.index(checkpoints[0]) == 4  # right after the entry it ends with
    final = chain.checkpoint()
    assert final is not None and (final.number, final.tree_size) == (2, 10)
    assert chain.checkpoint() is None  # nothing new since
    for cp in [*checkpoints, final]:
        leaves = [leaf_hash(e.entry_hash) for e in entries[: cp.tree_size]]
        assert cp.root_hash == root_from_leaf_hashes(leaves) == fold_frontier(cp.frontier)
        assert cp.head_hash == entries[cp.tree_size - 1].entry_hash
        assert verifier().problem(cp) is None
        assert "not a trusted key" in (verifier(OTHER_SEED).problem(cp) or "")
        forged = dataclasses.replace(cp, tree_size=cp.tree_size + 1)
        assert "does not verify" in (verifier().problem(forged) or "")


def test_resume_from_start_and_from_a_tail_continue_the_same_chain() -> None:
    apps = chain_apps(23)
    store = build(apps[:17], checkpoint_every=5, final_checkpoint=False)
    from_start = resume_state(LEDGER, store.read(), from_start=True)
    tail = resume_state(LEDGER, store.read(len(store) - 6), from_start=False)
    no_checkpoint_in_tail = resume_state(LEDGER, store.read(len(store) - 1), from_start=False)
    assert no_checkpoint_in_tail is None
    assert from_start is not None and tail is not None
    assert from_start.next_seq == tail.next_seq == 17
    assert from_start.head_hash == tail.head_hash
    assert from_start.tree.root() == tail.tree.root()
    assert from_start.next_checkpoint == tail.next_checkpoint == 3
    # continuing either way gives exactly the ledger an uninterrupted chain would have written
    whole = build(apps, checkpoint_every=5, final_checkpoint=False)
    continued = LedgerChain(LEDGER, signer(), checkpoint_every=5, state=tail)
    for app in apps[17:]:
        store.write(continued.append(app))
    assert [_comparable(r.record) for r in store.read()] == [_comparable(r.record) for r in whole.read()]


def _comparable(record: object) -> object:
    """Entries as they are; checkpoints without their signing time (and so their signature)."""
    if isinstance(record, Checkpoint):
        return (record.number, record.tree_size, record.root_hash, record.head_hash, record.frontier)
    return record


def test_resume_refuses_a_broken_chain() -> None:
    store = build(chain_apps(8), checkpoint_every=3)
    raw = list(store.raw)
    del raw[2]
    with pytest.raises(ChainError) as err:
        resume_state(LEDGER, store_of(raw).read(), from_start=True)
    assert err.value.seq == 2
    with pytest.raises(ChainError):
        resume_state(LEDGER, store_of([*store.raw, b"junk"]).read(), from_start=True)
    with pytest.raises(ChainError):
        resume_state("another-ledger", store.read(), from_start=True)


def test_state_of_another_ledger_is_refused() -> None:
    state = resume_state(LEDGER, build(chain_apps(2)).read(), from_start=True)
    assert state is not None
    with pytest.raises(ChainError):
        LedgerChain("other", state=state)


# -- keys ---------------------------------------------------------------------------------------------
def test_signing_key_from_env_seed_hex_base64_or_pem(tmp_path: Path) -> None:
    expected = key_id_of(signer().public_key)
    assert key_id_of(load_private_key(environ={SIGNING_KEY_ENV: SEED.hex()}).public_key()) == expected
    b64 = base64.b64encode(SEED).decode()
    assert key_id_of(load_private_key(environ={SIGNING_KEY_ENV: b64}).public_key()) == expected
    pem = Ed25519PrivateKey.from_private_bytes(SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ledger.pem"
    path.write_bytes(pem)
    assert key_id_of(load_private_key(path).public_key()) == expected
    assert key_id_of(load_private_key(environ={SIGNING_KEY_FILE_ENV: str(path)}).public_key()) == expected
    assert key_id_of(load_private_key(environ={SIGNING_KEY_ENV: pem.decode()}).public_key()) == expected
    assert CheckpointSigner.from_env(path).key_id == expected


def test_public_keys_load_from_pem_file_text_or_raw(tmp_path: Path) -> None:
    public = signer().public_key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    path = tmp_path / "ledger.pub"
    path.write_bytes(public_key_pem(public))
    for value in (
        path,
        str(path),
        public_key_pem(public).decode(),
        raw,
        raw.hex(),
        base64.b64encode(raw).decode(),
    ):
        assert key_id_of(load_public_key(value)) == key_id_of(public)


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {SIGNING_KEY_ENV: "abcd"},
        {SIGNING_KEY_ENV: "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----"},
    ],
)
def test_missing_or_bad_signing_keys_raise_a_clear_error(environ: dict[str, str]) -> None:
    with pytest.raises(SigningKeyError):
        load_private_key(environ=environ)


def test_non_ed25519_and_unreadable_keys_are_refused(tmp_path: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / "ec.pem"
    path.write_bytes(pem)
    with pytest.raises(SigningKeyError, match="not Ed25519"):
        load_private_key(path)
    with pytest.raises(SigningKeyError):
        load_private_key(tmp_path / "missing.pem")
    with pytest.raises(SigningKeyError):
        load_public_key(tmp_path / "missing.pub")
    with pytest.raises(SigningKeyError):
        CheckpointVerifier([])
