"""Ed25519 keys for checkpoints: loading them from config or a secret, signing and verifying.

The private key lives with the single ledger writer only (a Kubernetes secret mounted as a PEM file,
or a raw 32-byte seed in an environment variable); verifiers need only public keys. Each checkpoint
names its key by `key_id` (8 bytes of SHA-256 over the raw public key), so keys can rotate: a
verifier holds the old and the new public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streamprov.ledger.errors import SigningKeyError
from streamprov.ledger.hashing import checkpoint_message
from streamprov.ledger.model import Checkpoint

SIGNING_KEY_ENV = "STREAMPROV_LEDGER_SIGNING_KEY"
"""Raw 32-byte Ed25519 seed, hex or base64, or a whole PEM text."""
SIGNING_KEY_FILE_ENV = "STREAMPROV_LEDGER_SIGNING_KEY_FILE"
"""Path of a PKCS#8 PEM private key (for example a mounted Kubernetes secret)."""
_RAW_KEY_SIZE = 32


def key_id_of(public_key: Ed25519PublicKey) -> bytes:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).digest()[:8]


def _raw32(text: str) -> bytes | None:
    """32 key bytes from hex or base64 text, or None when it is neither."""
    text = text.strip()
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            raw = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(raw) == _RAW_KEY_SIZE:
            return raw
    return None


def private_key_from_pem(data: bytes, password: bytes | None = None) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the PEM private key does not load: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the PEM private key is {type(key).__name__}, not Ed25519")
    return key


def load_private_key(
    pem_path: str | Path | None = None,
    *,
    password: bytes | None = None,
    environ: Mapping[str, str] | None = None,
) -> Ed25519PrivateKey:
    """The checkpoint signing key: from `pem_path`, else $STREAMPROV_LEDGER_SIGNING_KEY_FILE (PEM),
    else $STREAMPROV_LEDGER_SIGNING_KEY (hex or base64 32-byte seed, or PEM text)."""
    env = os.environ if environ is None else environ
    path = pem_path or env.get(SIGNING_KEY_FILE_ENV, "").strip() or None
    if path is not None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"cannot read the signing key file {path}: {exc}") from exc
        return private_key_from_pem(data, password)
    value = env.get(SIGNING_KEY_ENV, "").strip()
    if not value:
        raise SigningKeyError(
            f"no checkpoint signing key: set {SIGNING_KEY_FILE_ENV} (PEM file) or {SIGNING_KEY_ENV} "
            "(32-byte seed, hex or base64)"
        )
    if value.startswith("-----BEGIN"):
        return private_key_from_pem(value.encode("ascii"), password)
    raw = _raw32(value)
    if raw is None:
        raise SigningKeyError(f"{SIGNING_KEY_ENV} is not a 32-byte Ed25519 seed in hex or base64")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_public_key(value: str | bytes | Path) -> Ed25519PublicKey:
    """A verification key from a PEM file path, PEM text, or the raw 32 bytes (bytes, hex, base64)."""
    if isinstance(value, bytes) and len(value) == _RAW_KEY_SIZE:
        return Ed25519PublicKey.from_public_bytes(value)
    data: bytes
    if isinstance(value, Path) or (isinstance(value, str) and not value.lstrip().startswith("-----BEGIN")):
        raw = _raw32(str(value)) if isinstance(value, str) else None
        if raw is not None:
            return Ed25519PublicKey.from_public_bytes(raw)
        try:
            data = Path(value).read_bytes()
        except OSError as exc:
            raise SigningKeyError(
                f"{value!s} is neither a raw 32-byte key nor a readable PEM file: {exc}"
            ) from exc
    else:
        data = value.encode("ascii") if isinstance(value, str) else value
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"the PEM public key does not load: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"the public key is {type(key).__name__}, not Ed25519")
    return key


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


class CheckpointSigner:
    """Signs checkpoints with one Ed25519 key (held only by the ledger writer)."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id_of(self.public_key)

    @classmethod
    def from_env(
        cls,
        pem_path: str | Path | None = None,
        *,
        password: bytes | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> CheckpointSigner:
        """The signer of the key `load_private_key` finds (a file, or the environment)."""
        return cls(load_private_key(pem_path, password=password, environ=environ))

    def sign(
        self,
        ledger_id: str,
        number: int,
        tree_size: int,
        root_hash: bytes,
        head_hash: bytes,
        frontier: Sequence[bytes],
        timestamp_ms: int,
    ) -> Checkpoint:
        unsigned = Checkpoint(
            ledger_id,
            number,
            tree_size,
            root_hash,
            head_hash,
            tuple(frontier),
            timestamp_ms,
            self.key_id,
            b"",
        )
        signature = self._key.sign(checkpoint_message(unsigned))
        return Checkpoint(
            ledger_id,
            number,
            tree_size,
            root_hash,
            head_hash,
            tuple(frontier),
            timestamp_ms,
            self.key_id,
            signature,
        )


class CheckpointVerifier:
    """Checks checkpoint signatures against trusted public keys, picked by key_id."""

    def __init__(self, public_keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id_of(k): k for k in public_keys}
        if not self._keys:
            raise SigningKeyError("a checkpoint verifier needs at least one public key")

    def problem(self, cp: Checkpoint) -> str | None:
        """Why the checkpoint's signature is not acceptable, or None when it verifies."""
        key = self._keys.get(cp.key_id)
        if key is None:
            return f"signed with key {cp.key_id.hex()}, which is not a trusted key"
        try:
            key.verify(cp.signature, checkpoint_message(cp))
        except InvalidSignature:
            return "its Ed25519 signature does not verify"
        return None
