"""Every service that reads the ledger checks its checkpoint signatures with `ledger.checkpoint_key`
(the public half of the sequencer's key), and reads the ledger under `ledger.id`; without a key it
checks the hash chain only. A checkpoint signed by another key is refused by the index."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from ledger_support import LEDGER, OTHER_SEED, chain_apps, signer

from recompute_manager.service import ManagerSettings
from streamprov.changes.service import ChangeServiceSettings
from streamprov.config import loads_config
from streamprov.config.models import StreamprovConfig
from streamprov.ledger import Checkpoint, LedgerChain, LedgerIndex, StoredRecord
from streamprov.ledger.errors import ChainError
from streamprov.ledger.signing import CheckpointVerifier
from validator.settings import ServiceSettings

PIPELINE = """
kafka: {bootstrap_servers: "k:9092"}
sources: [orders]
topics: {orders.enriched: {}}
"""


def _config(with_key: bool) -> StreamprovConfig:
    if not with_key:
        return loads_config(PIPELINE + f"ledger: {{id: {LEDGER}}}\n", environ={})
    public = signer().public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = public.decode().strip().replace("\n", "\\n")
    return loads_config(
        PIPELINE
        + f"ledger: {{id: {LEDGER}, checkpoint_key: ledger-cp}}\n"
        + f'signing: {{keys: {{ledger-cp: {{algorithm: ed25519, public_key: "{pem}"}}}}}}\n',
        environ={},
    )


def _verifiers(config: StreamprovConfig) -> dict[str, CheckpointVerifier | None]:
    manager = ManagerSettings.from_config(config)
    changes = ChangeServiceSettings.from_config(config)
    validator = ServiceSettings.from_config(config)
    assert manager.ledger_id == changes.ledger_id == validator.ledger_id == LEDGER
    return {
        "recompute manager": manager.checkpoint_verifier,
        "change detector": changes.checkpoint_verifier,
        "validator": validator.checkpoint_verifier,
    }


def _signed_ledger(seed_signer: object) -> list[StoredRecord]:
    chain = LedgerChain(LEDGER, seed_signer, checkpoint_every=4)  # type: ignore[arg-type]
    records = [r for app in chain_apps(8) for r in chain.append(app)]
    assert any(isinstance(r, Checkpoint) for r in records)
    return [StoredRecord(i, r) for i, r in enumerate(records)]


def test_without_a_checkpoint_key_no_service_checks_signatures() -> None:
    assert set(_verifiers(_config(with_key=False)).values()) == {None}


@pytest.mark.parametrize("service", ["recompute manager", "change detector", "validator"])
def test_each_service_indexes_the_sequencer_s_checkpoints_and_refuses_another_key_s(
    service: str, tmp_path: Path
) -> None:
    verifier = _verifiers(_config(with_key=True))[service]
    assert verifier is not None
    with LedgerIndex(tmp_path / "good", LEDGER, verifier=verifier) as index:
        assert index.apply(_signed_ledger(signer())) > 0
    with (
        LedgerIndex(tmp_path / "forged", LEDGER, verifier=verifier) as index,
        pytest.raises(ChainError, match="not a trusted key"),
    ):
        index.apply(_signed_ledger(signer(OTHER_SEED)))
