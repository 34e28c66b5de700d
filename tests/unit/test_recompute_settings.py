"""`ManagerSettings.from_config`: the streamprov.yaml pieces the Recompute Manager runs on (its topics,
workers, each output topic's signing key); no broker."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recompute_manager.service import ManagerSettings, default_replica
from streamprov.config import loads_config
from streamprov.signing import SigningError


def test_from_config_wires_topics_workers_and_signers(tmp_path: Path) -> None:
    (tmp_path / "hmac").write_text("recompute-settings-test-secret-0123456789\n")
    text = f"""\
    kafka: {{bootstrap_servers: "127.0.0.1:9092"}}
    streams: {{recompute_tasks: my.tasks, recompute_progress: my.progress}}
    sources: [src]
    signing:
      keys:
        k1: {{algorithm: hmac, secret_file: {tmp_path / "hmac"}}}
    topics:
      signed: {{signing: {{key: k1}}}}
      plain: {{priority_topic: plain.fixes}}
    recompute_manager: {{group_id: rm, workers: 3, state_dir: {tmp_path / "state"}}}
    """
    settings = ManagerSettings.from_config(loads_config(textwrap.dedent(text), environ={}), replica_id="r0")
    assert (settings.tasks_topic, settings.progress_topic, settings.workers) == ("my.tasks", "my.progress", 3)
    assert (settings.group_id, settings.workers_group, settings.replica_id) == ("rm", "rm-workers", "r0")
    assert settings.sources == ("src",) and set(settings.outputs) == {"signed", "plain"}
    assert settings.priority_topic("plain") == "plain.fixes"
    assert settings.priority_topic("signed") == "signed.priority"
    signer = settings.signer_for("signed")
    assert signer is not None and signer.key_id == "k1"
    assert settings.signer_for("plain") is None


def test_a_topic_key_that_cannot_sign_fails_when_asked(tmp_path: Path) -> None:
    public = tmp_path / "k.pub"
    public.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    text = f"""\
    kafka: {{bootstrap_servers: "127.0.0.1:9092"}}
    signing: {{keys: {{partner: {{algorithm: ed25519, public_key_file: {public}}}}}}}
    topics: {{out: {{signing: {{key: partner}}}}}}
    """
    settings = ManagerSettings.from_config(loads_config(textwrap.dedent(text), environ={}))
    with pytest.raises(SigningError, match="no private key"):
        settings.signer_for("out")


def test_the_replica_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMPROV_REPLICA_ID", "rm-2")
    assert default_replica() == "rm-2"
    monkeypatch.delenv("STREAMPROV_REPLICA_ID")
    monkeypatch.setenv("POD_NAME", "recompute-manager-0")
    assert default_replica() == "recompute-manager-0"
