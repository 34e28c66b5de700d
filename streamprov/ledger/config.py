"""The ledger's settings from `streamprov.yaml`: its id, topics and checkpoint keys, for every service.

`ledger.checkpoint_key` names an ed25519 key under `signing.keys`: the sequencer signs with its
private key; indexes and `ledger verify` check with its public key (a verify-only pod has that alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamprov.ledger.errors import SigningKeyError
from streamprov.ledger.signing import CheckpointSigner, CheckpointVerifier
from streamprov.signing import Ed25519Signer, KeyRing, SigningError

if TYPE_CHECKING:
    from streamprov.config.models import StreamprovConfig


@dataclass(frozen=True)
class LedgerConfig:
    kafka: dict[str, Any]
    ledger_id: str
    ledger_topic: str
    requests_topic: str
    dead_letter_topic: str
    checkpoint_key: str | None

    @classmethod
    def of(cls, config: StreamprovConfig) -> LedgerConfig:
        s = config.streams
        return cls(
            config.kafka.librdkafka(),
            config.ledger_id(),
            s.ledger,
            s.ledger_requests,
            s.dead_letters,
            config.ledger.checkpoint_key,
        )


def checkpoint_signer(config: StreamprovConfig) -> CheckpointSigner | None:
    """The sequencer's signer (None: `ledger.checkpoint_key` not set); `SigningKeyError` when the
    key's private half is not available here."""
    kid = config.ledger.checkpoint_key
    if kid is None:
        return None
    try:
        signer = KeyRing(config.signing).key(kid).signer
    except SigningError as exc:
        raise SigningKeyError(f"ledger.checkpoint_key {kid!r}: {exc}") from exc
    if not isinstance(signer, Ed25519Signer):
        raise SigningKeyError(
            f"ledger.checkpoint_key {kid!r}: no ed25519 private key here (private_key_file or "
            "private_key_env under signing.keys); only the sequencer needs it"
        )
    return CheckpointSigner(signer.private_key)


def checkpoint_verifier(config: StreamprovConfig) -> CheckpointVerifier | None:
    """What indexes verify checkpoints with (None: `ledger.checkpoint_key` not set)."""
    kid = config.ledger.checkpoint_key
    if kid is None:
        return None
    try:
        public = KeyRing(config.signing).key(kid).public_key
    except SigningError as exc:
        raise SigningKeyError(f"ledger.checkpoint_key {kid!r}: {exc}") from exc
    if public is None:
        raise SigningKeyError(f"ledger.checkpoint_key {kid!r}: not an ed25519 key")
    return CheckpointVerifier([public])
