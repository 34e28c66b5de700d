"""Signed provenance (`streamprov.sig`): HMAC-SHA256 and Ed25519, forgeries caught by the Validator."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.agents.processor import StepTransform
from streamprov.header import HEADER_KEY, ProvenanceHeader
from streamprov.registry import FunctionRegistry
from streamprov.signing import (
    SIG_HEADER,
    Ed25519Signer,
    HmacSigner,
    SigningError,
    Verifier,
    signed_headers,
)
from streamprov.stamp import SourceStamper
from validator.alerts import _V1_PREFIX, PREFIX, Alert, AlertKind, Criticality, Evidence
from validator.checks import Checker, TopicPolicy

SECRET = b"0123456789abcdef-pipeline-secret"
registry = FunctionRegistry()


@registry.map("double", "1")
def double(value: dict[str, Any]) -> dict[str, Any]:
    return {"x": value["x"] * 2}


class Msg:
    def __init__(self, v: bytes, h: list[tuple[str, bytes | None]], o: int = 0, k: bytes = b"k") -> None:
        self.v, self.h, self.o, self.k = v, h, o, k

    def value(self) -> bytes:
        return self.v

    def key(self) -> bytes:
        return self.k

    def headers(self) -> list[tuple[str, bytes | None]]:
        return self.h

    def topic(self) -> str:
        return "out"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.o

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_800_000_000_000)

    def error(self) -> Any:
        return None


def _signers() -> list[HmacSigner | Ed25519Signer]:
    return [HmacSigner("k1", SECRET), Ed25519Signer("ed1", Ed25519PrivateKey.generate())]


def _signed(signer: HmacSigner | Ed25519Signer, value: bytes, data_id: str = "d-1") -> list[Any]:
    return signed_headers(SourceStamper().header(data_id, value), signer)


@pytest.mark.parametrize("signer", _signers(), ids=["hmac", "ed25519"])
def test_valid_signature_passes_and_forgeries_fail(signer: HmacSigner | Ed25519Signer) -> None:
    verifier = Verifier.for_signers([signer])
    value = b'{"x":1}'
    headers = _signed(signer, value)
    assert headers[0][0] == HEADER_KEY and headers[1][0] == SIG_HEADER
    assert verifier.problem(headers, value) is None

    # An attacker replaces the value and re-computes the header (valid checksum) without the key.
    forged_value = b'{"x":1000}'
    forged_header = SourceStamper().header("d-1", forged_value)
    kept_sig = [(HEADER_KEY, forged_header), headers[1]]
    problem = verifier.problem(kept_sig, forged_value)
    assert problem is not None and "does not verify" in problem.reason
    unsigned = verifier.problem([(HEADER_KEY, forged_header)], forged_value)
    assert unsigned is not None and "unsigned" in unsigned.reason

    # A tampered signature.
    sig = bytearray(headers[1][1])
    sig[-1] ^= 1
    assert verifier.problem([headers[0], (SIG_HEADER, bytes(sig))], value) is not None
    # A genuine signed header with another value.
    replaced = verifier.problem(headers, forged_value)
    assert replaced is not None and "value was replaced" in replaced.reason
    # Truncated, unknown key, unknown algorithm.
    assert verifier.problem([headers[0], (SIG_HEADER, b"\x01")], value) is not None
    other = HmacSigner("k2", SECRET)
    unknown = verifier.problem(_signed(other, value), value)
    assert unknown is not None and "unknown key" in unknown.reason
    bad_alg = bytes([1, 9]) + headers[1][1][2:]
    assert verifier.problem([headers[0], (SIG_HEADER, bad_alg)], value) is not None


def test_keys_from_env_and_file_and_ed25519_pem(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SP_KEY", SECRET.decode())
    (tmp_path / "key").write_bytes(SECRET + b"\n")
    header = SourceStamper().header("d", b"v")
    a = HmacSigner("k", env="SP_KEY").sign(header)
    b = HmacSigner("k", file=tmp_path / "key").sign(header)
    assert a == b == HmacSigner("k", SECRET.decode()).sign(header)
    assert "0123" not in repr(HmacSigner("k", SECRET))
    with pytest.raises(SigningError):
        HmacSigner("k", b"short")
    with pytest.raises(SigningError):
        HmacSigner("k", env="SP_NOT_SET_ANYWHERE")
    with pytest.raises(SigningError):
        HmacSigner("k")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ed.pem").write_bytes(pem)
    signer = Ed25519Signer.from_file("ed", tmp_path / "ed.pem")
    verifier = Verifier(ed25519_keys={"ed": private.public_key()})
    assert verifier.verify(header, b"v", signer.sign(header)) is None
    with pytest.raises(SigningError):
        Verifier()


def test_map_step_signs_its_outputs_and_drops_the_inputs_signature() -> None:
    signer = HmacSigner("k1", SECRET)
    verifier = Verifier.for_signers([signer])
    step = StepTransform(double, output_topic="out", dead_letter_topic="dlq", signer=signer)
    value = json.dumps({"x": 2}).encode()
    inp = Msg(value, [*_signed(signer, value), ("other", b"kept")])
    (out,) = step.process(inp)
    assert not out.dead_letter
    keys = [k for k, _ in out.headers]
    assert keys == [HEADER_KEY, SIG_HEADER, "other"]
    assert verifier.problem(out.headers, out.value) is None
    unsigned = StepTransform(double, output_topic="out", dead_letter_topic="dlq")
    (plain,) = unsigned.process(inp)
    assert [k for k, _ in plain.headers] == [HEADER_KEY, "other"]  # a stale signature is not carried


def test_validator_raises_bad_signature_for_a_forgery_only() -> None:
    signer = HmacSigner("k1", SECRET)
    pol = TopicPolicy(integrity=True, source_drift=False, verifier=Verifier.for_signers([signer]))
    checker = Checker(lambda _t: pol, None, dead_letter_topic="dlq")
    good_value, forged_value = b'{"x":1}', b'{"x":9}'
    good = _signed(signer, good_value)
    forged = [(HEADER_KEY, SourceStamper().header("d-1", forged_value)), good[1]]
    unsigned = [(HEADER_KEY, SourceStamper().header("d-2", forged_value))]
    result = checker.check(
        [Msg(good_value, good, 0), Msg(forged_value, forged, 1), Msg(forged_value, unsigned, 2)], 0
    )
    assert [(a.offset, a.kind) for a in result.alerts] == [
        (1, AlertKind.BAD_SIGNATURE),
        (2, AlertKind.BAD_SIGNATURE),
    ]
    assert "without the pipeline's key" in result.alerts[0].evidence.reason
    # Without a verifier the forgery passes the checksum check: that is what signing adds.
    plain = Checker(lambda _t: TopicPolicy(source_drift=False), None, dead_letter_topic="dlq")
    assert plain.check([Msg(forged_value, forged, 1)], 0).alerts == []


def test_bad_signature_alert_round_trips_and_older_alerts_still_decode() -> None:
    alert = Alert.create(
        AlertKind.BAD_SIGNATURE,
        data_id="d",
        topic="t",
        partition=0,
        offset=1,
        header=None,
        evidence=Evidence("e", "a", "r"),
        criticality=Criticality.HIGH,
        detected_at_ms=1,
    )
    assert Alert.decode(alert.encode()) == alert
    older = Alert.create(
        AlertKind.MALFORMED,
        data_id="d",
        topic="t",
        partition=0,
        offset=1,
        header=ProvenanceHeader.for_source("d", b"v").encode(),
        evidence=Evidence("e", "a", "r"),
        criticality=Criticality.LOW,
        detected_at_ms=1,
    )
    v1 = _V1_PREFIX + older.encode()[len(PREFIX) :]  # as a validator before `bad_signature` wrote it
    assert _V1_PREFIX != PREFIX and Alert.decode(v1) == older
