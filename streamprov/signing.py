"""Authenticity of provenance headers: a signature in a separate Kafka header `streamprov.sig`.

The provenance header's checksum proves the value matches the header, not who wrote the header: anyone
can recompute a header with a valid checksum for a forged value. A pipeline that needs more signs each
header it stamps with a key only its stampers hold:

- HMAC-SHA256 (`HmacSigner` / `HmacVerifier`): one shared secret, from a value, an environment
  variable or a file;
- Ed25519 (`Ed25519Signer` / `Ed25519Verifier`, `cryptography`): stampers hold the private key,
  validators only the public key.

The signature travels in its own header, so the provenance wire format is unchanged and readers that
do not verify ignore it. The signed message is length-prefixed (domain, algorithm, key id, provenance
header bytes); the header carries the value's checksum, so the signature covers the value through
it, and `Verifier.problem` checks that checksum against the value too.

Wire format of `streamprov.sig` (version 1): byte 0x01, algorithm byte (1 = HMAC-SHA256,
2 = Ed25519), key-id length byte, key id (UTF-8, at most 255 bytes), signature (32 or 64 bytes).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streamprov.errors import HeaderError, StreamprovError
from streamprov.header import HEADER_KEY, HeadersLike, find_raw, verify_value
from streamprov.merkle import length_prefixed

if TYPE_CHECKING:
    from streamprov.config.models import SigningKey, SigningSettings, TopicSettings

SIG_HEADER = "streamprov.sig"
"""Kafka record header key carrying the signature of the record's provenance header."""
_VERSION = 1
_DOMAIN = b"streamprov.sig/1"


class SignatureAlgorithm(enum.IntEnum):
    HMAC_SHA256 = 1
    ED25519 = 2


class SigningError(StreamprovError):
    """A key that cannot be loaded or used."""


def _message(algorithm: SignatureAlgorithm, key_id: bytes, header: bytes) -> bytes:
    return length_prefixed(_DOMAIN, bytes([algorithm]), key_id, header)


def _key_id(key_id: str) -> bytes:
    raw = key_id.encode("utf-8")
    if len(raw) > 255:
        raise SigningError("a key id is at most 255 UTF-8 bytes")
    return raw


class Signer(Protocol):
    """Signs encoded provenance headers; the result is the value of the `streamprov.sig` header."""

    def sign(self, header: bytes) -> bytes: ...


class _SignerBase:
    algorithm: SignatureAlgorithm

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        self._kid = _key_id(key_id)
        self._head = bytes([_VERSION, self.algorithm, len(self._kid)]) + self._kid

    def _raw_sign(self, message: bytes) -> bytes:
        raise NotImplementedError

    def sign(self, header: bytes) -> bytes:
        return self._head + self._raw_sign(_message(self.algorithm, self._kid, header))

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(key_id={self.key_id!r})"


def _secret(secret: bytes | str | None, env: str | None, file: str | Path | None) -> bytes:
    given = [x is not None for x in (secret, env, file)]
    if sum(given) != 1:
        raise SigningError("give exactly one of secret=, env= or file=")
    if secret is not None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    elif env is not None:
        value = os.environ.get(env)
        if not value:
            raise SigningError(f"environment variable {env} is not set")
        key = value.encode("utf-8")
    else:
        try:
            key = Path(file).read_bytes().strip()  # type: ignore[arg-type]
        except OSError as exc:
            raise SigningError(f"cannot read the key file {file}: {exc}") from exc
    if len(key) < 16:
        raise SigningError("an HMAC key needs at least 16 bytes")
    return key


class HmacSigner(_SignerBase):
    """HMAC-SHA256 with a shared secret (give exactly one of `secret`, `env`, `file`)."""

    algorithm = SignatureAlgorithm.HMAC_SHA256

    def __init__(
        self,
        key_id: str,
        secret: bytes | str | None = None,
        *,
        env: str | None = None,
        file: str | Path | None = None,
    ) -> None:
        super().__init__(key_id)
        self._key = _secret(secret, env, file)

    def _raw_sign(self, message: bytes) -> bytes:
        return hmac.digest(self._key, message, hashlib.sha256)


class Ed25519Signer(_SignerBase):
    """Ed25519 with a private key (an object, or PEM / raw 32 bytes via `from_pem` / `from_file`)."""

    algorithm = SignatureAlgorithm.ED25519

    def __init__(self, key_id: str, private_key: Ed25519PrivateKey) -> None:
        super().__init__(key_id)
        self._key = private_key

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The key itself: the ledger's checkpoint signer uses the same configured key."""
        return self._key

    @classmethod
    def from_pem(cls, key_id: str, pem: bytes, password: bytes | None = None) -> Ed25519Signer:
        key = serialization.load_pem_private_key(pem, password)
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningError("the PEM key is not an Ed25519 private key")
        return cls(key_id, key)

    @classmethod
    def from_file(cls, key_id: str, path: str | Path, password: bytes | None = None) -> Ed25519Signer:
        return cls.from_pem(key_id, Path(path).read_bytes(), password)

    def public_key(self) -> Ed25519PublicKey:
        return self._key.public_key()

    def _raw_sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


@dataclass(frozen=True, slots=True)
class SignatureProblem:
    """Why a record's signature does not verify (the alert's evidence)."""

    expected: str
    actual: str
    reason: str


class Verifier:
    """Verifies `streamprov.sig` against the keys it knows, by key id (HMAC secrets, Ed25519 public keys).

    `problem(headers, value)` is None for a valid signature over the record's provenance header whose
    checksum matches the value, else a `SignatureProblem`: no signature, an unknown key, a bad
    signature (a header rewritten or re-computed without the key), or a value that does not match.
    """

    def __init__(
        self,
        hmac_keys: Mapping[str, bytes] | None = None,
        ed25519_keys: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self._hmac = {_key_id(k): bytes(v) for k, v in (hmac_keys or {}).items()}
        self._ed = {_key_id(k): v for k, v in (ed25519_keys or {}).items()}
        if not self._hmac and not self._ed:
            raise SigningError("a verifier needs at least one key")

    @classmethod
    def for_signers(cls, signers: Iterable[HmacSigner | Ed25519Signer]) -> Verifier:
        """A verifier for these signers' keys (HMAC: the same secret; Ed25519: the public key)."""
        hm: dict[str, bytes] = {}
        ed: dict[str, Ed25519PublicKey] = {}
        for s in signers:
            if isinstance(s, HmacSigner):
                hm[s.key_id] = s._key
            else:
                ed[s.key_id] = s.public_key()
        return cls(hm, ed)

    def __repr__(self) -> str:
        kids = sorted(k.decode("utf-8") for k in (*self._hmac, *self._ed))
        return f"Verifier(key_ids={kids!r})"

    def problem(self, headers: HeadersLike, value: bytes | None) -> SignatureProblem | None:
        try:
            header = find_raw(headers)
        except HeaderError as exc:
            return SignatureProblem("a provenance header", "an unreadable one", str(exc))
        if header is None:
            return SignatureProblem("a provenance header", "none", "the record carries no header to verify")
        sig = _find(headers, SIG_HEADER)
        if sig is None:
            return SignatureProblem(
                f"a {SIG_HEADER} header",
                "none",
                "the topic requires signed provenance; the record is unsigned",
            )
        return self.verify(header, value, sig)

    def verify(self, header: bytes, value: bytes | None, sig: bytes) -> SignatureProblem | None:
        """None when `sig` is a valid signature over `header` and `header` matches `value`."""
        if len(sig) < 3 or sig[0] != _VERSION or len(sig) < 3 + sig[2]:
            return SignatureProblem(
                "a version-1 signature", f"{len(sig)} bytes", "the signature is malformed"
            )
        alg, n = sig[1], sig[2]
        kid, signature = sig[3 : 3 + n], sig[3 + n :]
        kid_text = kid.decode("utf-8", "replace")
        bad = SignatureProblem(
            f"a valid signature by key {kid_text!r}",
            f"signature {signature[:8].hex()}…",
            "the provenance header's signature does not verify: the header was altered or re-computed "
            "by someone without the pipeline's key",
        )
        if alg == SignatureAlgorithm.HMAC_SHA256:
            key = self._hmac.get(kid)
            if key is None:
                return _unknown(kid_text)
            mac = hmac.digest(key, _message(SignatureAlgorithm.HMAC_SHA256, kid, header), hashlib.sha256)
            if not hmac.compare_digest(mac, signature):
                return bad
        elif alg == SignatureAlgorithm.ED25519:
            public = self._ed.get(kid)
            if public is None:
                return _unknown(kid_text)
            try:
                public.verify(signature, _message(SignatureAlgorithm.ED25519, kid, header))
            except InvalidSignature:
                return bad
        else:
            return SignatureProblem(
                "HMAC-SHA256 or Ed25519", f"algorithm {alg}", "unknown signature algorithm"
            )
        try:
            ok = verify_value(header, value if value is not None else b"")
        except HeaderError:  # an older header version: the checksum check belongs to the integrity check
            ok = True
        if not ok:
            return SignatureProblem(
                "a value matching the signed header's checksum",
                "a different value",
                "the signed header is genuine but the value was replaced",
            )
        return None


def _unknown(kid: str) -> SignatureProblem:
    return SignatureProblem(
        "a known signing key", f"key id {kid!r}", "the record is signed by an unknown key"
    )


def _find(headers: HeadersLike, key: str) -> bytes | None:
    if not headers:
        return None
    if isinstance(headers, Mapping):
        found = headers.get(key)
    else:
        found = next((v for k, v in headers if k == key), None)
    if found is None:
        return None
    return found.encode("utf-8") if isinstance(found, str) else bytes(found)


def signed_headers(
    header: bytes, signer: Signer | None, rest: Iterable[tuple[str, bytes | None]] = ()
) -> list[tuple[str, bytes | None]]:
    """The provenance header, its signature when a signer is given, then `rest` without either."""
    out: list[tuple[str, bytes | None]] = [(HEADER_KEY, header)]
    if signer is not None:
        out.append((SIG_HEADER, signer.sign(header)))
    out.extend(h for h in rest if h[0] != HEADER_KEY and h[0] != SIG_HEADER)
    return out


# -- from streamprov.yaml (`signing.keys`) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedKey:
    """One configured key, read: its signer (None for a verify-only Ed25519 public key), and what a
    verifier needs (the HMAC secret or the Ed25519 public key)."""

    key_id: str
    signer: HmacSigner | Ed25519Signer | None
    hmac_secret: bytes | None = None
    public_key: Ed25519PublicKey | None = None

    def __repr__(self) -> str:  # never the secret
        return f"LoadedKey(key_id={self.key_id!r}, signs={self.signer is not None})"


def _read(field: str, file: Path | None, env: str | None, environ: Mapping[str, str]) -> bytes | None:
    """A secret from its file or variable; SigningError("<field>: why") that never holds the secret."""
    if file is not None:
        try:
            return Path(file).read_bytes()
        except OSError as exc:
            raise SigningError(
                f"{field}_file: cannot read {str(file)!r} ({exc.strerror or type(exc).__name__})"
            ) from None
    if env is not None:
        if env not in environ:
            raise SigningError(f"{field}_env: environment variable {env} is not set")
        return environ[env].encode("utf-8")
    return None


def load_key(key_id: str, key: SigningKey, environ: Mapping[str, str] | None = None) -> LoadedKey:
    """Read a configured key (`signing.keys.<key_id>`) from its file or environment variable.

    Raises `SigningError` whose message starts with the setting at fault (`secret_file: ...`) and
    never contains key material.
    """
    from streamprov.config.models import SigningAlgorithm  # noqa: PLC0415 - pydantic on demand

    env = os.environ if environ is None else environ
    if key.algorithm is SigningAlgorithm.HMAC:
        field = "secret_file" if key.secret_file is not None else "secret_env"
        raw = _read("secret", key.secret_file, key.secret_env, env)
        secret = (raw or b"").strip()
        if len(secret) < 16:
            raise SigningError(f"{field}: the HMAC secret has {len(secret)} bytes; it needs at least 16")
        signer = HmacSigner(key_id, secret)
        return LoadedKey(key_id, signer, hmac_secret=secret)
    private_pem = _read("private_key", key.private_key_file, key.private_key_env, env)
    signer_ed: Ed25519Signer | None = None
    if private_pem is not None:
        field = "private_key_file" if key.private_key_file is not None else "private_key_env"
        try:
            signer_ed = Ed25519Signer.from_pem(key_id, private_pem)
        except (ValueError, TypeError, SigningError):
            raise SigningError(
                f"{field}: not an unencrypted PEM Ed25519 private key (write it with "
                "`openssl genpkey -algorithm ed25519`)"
            ) from None
    public: Ed25519PublicKey | None = None
    public_pem = key.public_key.encode("utf-8") if key.public_key is not None else None
    if public_pem is None and key.public_key_file is not None:
        public_pem = _read("public_key", key.public_key_file, None, env)
    if public_pem is not None:
        field = "public_key" if key.public_key is not None else "public_key_file"
        try:
            loaded = serialization.load_pem_public_key(public_pem)
        except (ValueError, TypeError):
            loaded = None
        if not isinstance(loaded, Ed25519PublicKey):
            raise SigningError(
                f"{field}: not a PEM Ed25519 public key (write it with `openssl pkey -pubout`)"
            )
        public = loaded
        if signer_ed is not None and public.public_bytes_raw() != signer_ed.public_key().public_bytes_raw():
            raise SigningError(f"{field}: is not the public half of the private key")
    if public is None and signer_ed is not None:
        public = signer_ed.public_key()
    return LoadedKey(key_id, signer_ed, public_key=public)


class KeyRing:
    """The configured keys, each read once on first use: signers and verifiers by key id."""

    def __init__(self, settings: SigningSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        self._environ = environ
        self._loaded: dict[str, LoadedKey] = {}

    def key(self, key_id: str) -> LoadedKey:
        found = self._loaded.get(key_id)
        if found is None:
            config = self.settings.keys.get(key_id)
            if config is None:
                raise SigningError(f"no key {key_id!r} under signing.keys")
            try:
                found = self._loaded[key_id] = load_key(key_id, config, self._environ)
            except SigningError as exc:
                raise SigningError(f"signing.keys.{key_id}.{exc}") from None
        return found

    def signer(self, key_id: str) -> HmacSigner | Ed25519Signer:
        signer = self.key(key_id).signer
        if signer is None:
            raise SigningError(f"signing.keys.{key_id} has no private key to sign with")
        return signer

    def verifier(self, key_ids: Iterable[str] | None = None) -> Verifier:
        """A verifier for these keys (None: every configured key)."""
        hm: dict[str, bytes] = {}
        ed: dict[str, Ed25519PublicKey] = {}
        for key_id in self.settings.keys if key_ids is None else key_ids:
            loaded = self.key(key_id)
            if loaded.hmac_secret is not None:
                hm[key_id] = loaded.hmac_secret
            if loaded.public_key is not None:
                ed[key_id] = loaded.public_key
        return Verifier(hm, ed)

    def signer_for(self, topic_settings: TopicSettings) -> HmacSigner | Ed25519Signer | None:
        """The signer of records written to a topic (`topics.<t>.signing.key`), or None: unsigned."""
        key_id = topic_settings.signing.key
        return None if key_id is None else self.signer(key_id)

    def verifier_for(self, topic_settings: TopicSettings) -> Verifier | None:
        """The Validator's verifier for a topic (`signing.verify`), or None: signatures not checked."""
        signing = topic_settings.signing
        return self.verifier(signing.accept) if signing.verify else None
