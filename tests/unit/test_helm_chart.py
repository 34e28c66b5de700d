"""The Helm chart, rendered by the real helm: what the services will read, and what helm must refuse.

helm is built by scripts/helm.sh into .tools/ (CI does that before the tests). Without a helm binary
the rendering tests are skipped, saying so; the schema and defaults tests run regardless.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from streamprov.config import StreamprovConfig, load_config, loads_config
from streamprov.config.models import LedgerSettings, TelemetrySettings
from streamprov.header import ProvenanceHeader
from streamprov.signing import KeyRing, SigningError

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "streamprov"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
BAD_VALUES = sorted((ROOT / "helm" / "testdata").glob("bad-*.yaml"))
CONFIG_PATH = "/etc/streamprov/streamprov.yaml"
SERVICES = {  # workload name (release "rel") -> the chart's values key
    "rel-streamprov-validator": "validator",
    "rel-streamprov-recompute-manager": "recomputeManager",
    "rel-streamprov-change-detector": "changes",
    "rel-streamprov-ledger-sequencer": "sequencer",
}
SIGNING_MOUNT = "/etc/streamprov/secrets/signing"
MANAGER = "rel-streamprov-recompute-manager"  # a StatefulSet (stable replica ids); the others: Deployments


def find_helm() -> str | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


HELM = find_helm()
needs_helm = pytest.mark.skipif(
    HELM is None,
    reason="helm binary not found (.tools/helm, $HELM or PATH): run scripts/helm.sh build (CI does)",
)


def helm_template(*values: Path, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    args = [HELM, "template", "rel", str(CHART), "--namespace", "data"]
    for path in values:
        args += ["-f", str(path)]
    return subprocess.run([*args, *extra], check=False, capture_output=True, text=True, timeout=120)


def render(values: Path) -> list[dict[str, Any]]:
    result = helm_template(values, extra=("--api-versions", "monitoring.coreos.com/v1"))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The services' Deployments and StatefulSets by name."""
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


def metrics_services(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: doc
        for name, doc in by_kind(docs, "Service").items()
        if doc["metadata"]["labels"].get("streamprov.io/metrics") == "true"
    }


def helm_merge(base: Any, override: Any) -> Any:
    """Helm's values coalescing: maps merge key by key, a null removes the key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            if value is None and key in merged:
                del merged[key]
            else:
                merged[key] = helm_merge(merged.get(key), value)
        return merged
    return override


def expected_config(values: Path) -> dict[str, Any]:
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["config"]
    user = yaml.safe_load(values.read_text(encoding="utf-8")).get("config", {})
    merged: dict[str, Any] = helm_merge(defaults, user)
    return merged


def expected_values(values: Path) -> dict[str, Any]:
    """The chart's values for a release with this values file (values.yaml under it)."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    merged: dict[str, Any] = helm_merge(defaults, yaml.safe_load(values.read_text(encoding="utf-8")))
    return merged


def expected_args(name: str, values: dict[str, Any]) -> list[str]:
    """The command line each Deployment runs (after the image's `streamprov` entrypoint)."""
    service = SERVICES[name]
    if service == "changes":
        functions = values["changes"].get("functions")
        return ["changes", "run", "--config", CONFIG_PATH, *(["--functions", functions] if functions else [])]
    if service == "sequencer":
        unsigned = not values["config"].get("ledger", {}).get("checkpoint_key")
        return ["ledger", "sequencer", "--config", CONFIG_PATH, *(["--unsigned"] if unsigned else [])]
    return [name.removeprefix("rel-streamprov-"), "run", "--config", CONFIG_PATH]


def write_pem_keys(directory: Path, key_id: str) -> Ed25519PrivateKey:
    """An Ed25519 key pair written as the chart mounts it (private.pem, public.pem)."""
    private = Ed25519PrivateKey.generate()
    (directory / key_id).mkdir(parents=True, exist_ok=True)
    (directory / key_id / "private.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (directory / key_id / "public.pem").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private


def secret_items(pod: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(Secret name, key, file name) of every Secret item a pod mounts, projected volumes included."""
    items: set[tuple[str, str, str]] = set()
    for volume in pod.get("volumes", []):
        sources = [volume, *volume.get("projected", {}).get("sources", [])]
        for source in sources:
            secret = source.get("secret")
            if secret is None:
                continue
            name = secret.get("secretName") or secret.get("name")
            for item in secret.get("items", [{"key": "*", "path": "*"}]):
                items.add((name, item["key"], item["path"]))
    return items


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    """The pod's environment; values that come from Secrets get a stand-in (they are never in values)."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {
        e["name"]: str(e["value"]) if "value" in e else "<from a Secret>" for e in container.get("env", [])
    }


# ------------------------------------------------------------------------------- without helm


def test_values_schema_is_generated_from_the_config_models() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "helm_values_schema.py"), "--check"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_values_yaml_config_defaults_are_the_models_defaults() -> None:
    config = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["config"]
    defaults = StreamprovConfig.model_validate({"kafka": {"bootstrap_servers": "k:1"}}).as_dict()
    for block in ("streams", "validator", "recompute_manager", "changes"):
        assert config[block] == defaults[block], block
    # ledger: nulls mean "derived" (the ledger topic's name, unsigned, the default group)
    assert LedgerSettings.model_validate(config["ledger"]) == LedgerSettings()
    # null defaults are left out of values.yaml (helm drops keys set to null)
    assert TelemetrySettings.model_validate(config["telemetry"]) == TelemetrySettings()
    assert config["signing"] == {"keys": {}}
    assert config["kafka"]["security_protocol"] == defaults["kafka"]["security_protocol"]
    assert "bootstrap_servers" not in config["kafka"]  # required: every release must say where Kafka is


def test_every_ci_values_config_loads_on_its_own(tmp_path: Path) -> None:
    assert len(CI_VALUES) >= 3
    for values in CI_VALUES:
        path = tmp_path / f"{values.stem}.yaml"
        path.write_text(yaml.safe_dump(expected_config(values)), encoding="utf-8")
        given = yaml.safe_load(values.read_text(encoding="utf-8"))
        secrets = given.get("kafkaSecrets", {})
        env = {}
        if secrets.get("sasl", {}).get("existingSecret"):  # the chart names the mounted password file
            env["STREAMPROV__KAFKA__SASL__PASSWORD_FILE"] = "/etc/streamprov/secrets/sasl/password"
        for key in given.get("signingSecrets", {}).get("keys", []):  # ... and the signing keys' files
            where = f"STREAMPROV__SIGNING__KEYS__{key['keyId']}__"
            for item, setting in (("secretKey", "SECRET_FILE"), ("publicKeyKey", "PUBLIC_KEY_FILE")):
                if key.get(item):
                    env[where + setting] = f"/etc/streamprov/secrets/signing/{key['keyId']}/file"
        load_config(path, environ=env, check_secrets=False)


# ---------------------------------------------------------------------------------- with helm


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_configmap_is_the_values_config_and_loads_like_the_file(values: Path, tmp_path: Path) -> None:
    docs = render(values)
    configmaps = by_kind(docs, "ConfigMap")
    text = configmaps["rel-streamprov-config"]["data"]["streamprov.yaml"]
    assert yaml.load(text, Loader=yaml.SafeLoader) is not None

    file = tmp_path / "streamprov.yaml"
    file.write_text(yaml.safe_dump(expected_config(values), sort_keys=False), encoding="utf-8")

    deployments = workloads(docs)
    assert set(deployments) == set(SERVICES)  # the four services, each loading the same file
    for deployment in deployments.values():
        env = container_env(deployment)
        in_pod = loads_config(text, environ=env, check_secrets=False)
        from_file = load_config(file, environ=env, check_secrets=False)
        assert in_pod == from_file
        assert in_pod.as_dict() == from_file.as_dict()
        assert sorted(in_pod.topics) == sorted(expected_config(values)["topics"])  # toYaml sorts keys


@needs_helm
def test_sasl_and_tls_come_from_secrets_as_files() -> None:
    docs = render(CHART / "ci" / "sasl-tls-values.yaml")
    configmap = by_kind(docs, "ConfigMap")["rel-streamprov-config"]
    assert "password" not in configmap["data"]["streamprov.yaml"]
    validator = by_kind(docs, "Deployment")["rel-streamprov-validator"]
    pod = validator["spec"]["template"]["spec"]
    env = container_env(validator)
    assert env["STREAMPROV__KAFKA__SASL__PASSWORD_FILE"] == "/etc/streamprov/secrets/sasl/password"
    assert env["STREAMPROV__KAFKA__SSL__CA_LOCATION"] == "/etc/streamprov/tls/ca.crt"
    assert "STREAMPROV__KAFKA__SSL__CERTIFICATE_LOCATION" not in env  # certificateKey: "" (no mutual TLS)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["kafka-sasl"]["secret"]["secretName"] == "streamprov-kafka-user"
    assert volumes["kafka-sasl"]["secret"]["items"] == [{"key": "password", "path": "password"}]
    assert volumes["kafka-tls"]["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["kafka-sasl"] == {
        "name": "kafka-sasl",
        "mountPath": "/etc/streamprov/secrets/sasl",
        "readOnly": True,
    }

    config = loads_config(configmap["data"]["streamprov.yaml"], environ=env, check_secrets=False)
    assert config.kafka.sasl is not None
    assert config.kafka.sasl.password_file == Path("/etc/streamprov/secrets/sasl/password")
    client = config.kafka.redacted()
    assert client["security.protocol"] == "SASL_SSL"
    assert client["sasl.password"] == "**********"
    assert client["ssl.ca.location"] == "/etc/streamprov/tls/ca.crt"
    assert config.topic("fahrenheit").priority_topic_name("fahrenheit") == "fahrenheit.recomputed"
    assert config.topic("unlisted").criticality == "low"
    image = pod["containers"][0]["image"]
    assert image == "registry.example.com/data/streamprov@sha256:" + "0123456789abcdef" * 4


@needs_helm
def test_signing_keys_and_otlp_credentials_come_from_secrets(tmp_path: Path) -> None:
    """The keys' files as the chart mounts them (real keys written where the Secrets would be): the
    Recompute Manager signs with both keys, the Validator verifies both and holds no private key."""
    docs = render(CHART / "ci" / "telemetry-signing-values.yaml")
    text = by_kind(docs, "ConfigMap")["rel-streamprov-config"]["data"]["streamprov.yaml"]
    assert "secret" not in text.replace("secretKey", "")  # no key material in the ConfigMap
    mounted = tmp_path / "signing"
    (mounted / "pipeline-2026").mkdir(parents=True)
    (mounted / "pipeline-2026" / "secret").write_text("a-shared-hmac-secret-of-the-pipeline\n")
    private = Ed25519PrivateKey.generate()
    (mounted / "partner.2025").mkdir()
    (mounted / "partner.2025" / "private.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    (mounted / "partner.2025" / "public.pem").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    pods = {}
    for name, deployment in workloads(docs).items():
        env = {
            k: v.replace("/etc/streamprov/secrets/signing", str(mounted))
            for k, v in container_env(deployment).items()
        }
        pod = deployment["spec"]["template"]["spec"]
        mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
        for volume in pod["volumes"]:
            if volume["name"].startswith("signing-key-"):
                assert volume["secret"]["defaultMode"] == 0o440
                assert mounts[volume["name"]]["readOnly"] is True
        assert env["OTLP_AUTH"] == "<from a Secret>"
        pods[name.removeprefix("rel-streamprov-")] = (loads_config(text, environ=env), env)

    manager, manager_env = pods["recompute-manager"]
    validator, validator_env = pods["validator"]
    private = "STREAMPROV__SIGNING__KEYS__partner.2025__PRIVATE_KEY_FILE"
    holders = {name for name, (_, env) in pods.items() if private in env}
    assert holders == {"recompute-manager"}  # not the validator, change detector or sequencer
    assert manager.telemetry.otlp.headers_env == {"authorization": "OTLP_AUTH"}
    assert manager.telemetry.tracing.sampling_ratio == 0.05
    signing = KeyRing(manager.signing, environ=manager_env)
    verifying = KeyRing(validator.signing, environ=validator_env)
    header = ProvenanceHeader.for_source("d-1", b"v").encode()
    for topic in ("fahrenheit", "partner-feed"):
        signer = signing.signer_for(manager.topic(topic))
        verifier = verifying.verifier_for(validator.topic(topic))
        assert signer is not None and verifier is not None
        assert verifier.verify(header, b"v", signer.sign(header)) is None
    with pytest.raises(SigningError, match="no private key to sign with"):
        verifying.signer("partner.2025")


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_deployments_are_locked_down_and_probe_the_configured_port(values: Path) -> None:
    docs = render(values)
    given = expected_values(values)
    config = loads_config(
        by_kind(docs, "ConfigMap")["rel-streamprov-config"]["data"]["streamprov.yaml"],
        environ=container_env(by_kind(docs, "Deployment")["rel-streamprov-validator"]),
        check_secrets=False,
    )
    # Deployment -> (health port, metrics port or None, state directory or None)
    expected = {
        "rel-streamprov-validator": (
            config.validator.http_port,
            config.validator.metrics_port,
            config.validator.state_dir,
        ),
        "rel-streamprov-recompute-manager": (
            config.recompute_manager.http_port,
            config.recompute_manager.metrics_port,
            config.recompute_manager.state_dir,
        ),
        "rel-streamprov-change-detector": (config.changes.http_port, None, config.changes.state_dir),
        "rel-streamprov-ledger-sequencer": (config.ledger.sequencer.http_port, None, None),
    }
    deployments = workloads(docs)
    assert set(deployments) == set(SERVICES)
    assert set(by_kind(docs, "StatefulSet")) == {MANAGER}
    claims = by_kind(docs, "PersistentVolumeClaim")
    for name, deployment in deployments.items():
        http_port, metrics_port, state_dir = expected[name]
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == expected_args(name, given), name
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": http_port, **({"metrics": metrics_port} if metrics_port else {})}, name
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        env = container_env(deployment)
        assert env["STREAMPROV_HEALTH_URL"] == f"http://127.0.0.1:{http_port}/healthz"
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[CONFIG_PATH]["subPath"] == "streamprov.yaml"
        assert mounts[CONFIG_PATH]["readOnly"] is True
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[CONFIG_PATH]["name"]]["configMap"]["name"] == "rel-streamprov-config"
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
        writable = {path for path, m in mounts.items() if not m.get("readOnly")}
        if state_dir is None:  # the sequencer resumes from the ledger topic: /tmp is all it writes
            assert writable == {"/tmp"}, name
        else:
            assert writable == {"/tmp", str(state_dir)}, name
            state = volumes[mounts[str(state_dir)]["name"]]
            persistence = given[SERVICES[name]].get("persistence", {})
            if persistence.get("enabled"):
                claim = state["persistentVolumeClaim"]["claimName"]
                assert claim in claims or claim == persistence.get("existingClaim")
                assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one claim, one holder
            else:
                assert "emptyDir" in state
                rollout = deployment["spec"]["updateStrategy" if name == MANAGER else "strategy"]
                assert rollout["type"] == "RollingUpdate", name
        assert container["resources"]["requests"]
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert len(annotations["checksum/config"]) == 64
    budgets = {
        name
        for name, service in SERVICES.items()
        if given[service]["enabled"] and given[service]["podDisruptionBudget"]["enabled"]
    }
    assert set(by_kind(docs, "PodDisruptionBudget")) == budgets
    metrics = metrics_services(docs)
    assert set(metrics) == {"rel-streamprov-validator-metrics", "rel-streamprov-recompute-manager-metrics"}
    assert (
        metrics["rel-streamprov-validator-metrics"]["spec"]["ports"][0]["port"]
        == config.validator.metrics_port
    )


@needs_helm
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.stem)
def test_recompute_manager_is_a_statefulset_named_by_its_pods(values: Path) -> None:
    """The manager's replica id (its workers' group.instance.id and transactional.id) is its pod name:
    a StatefulSet keeps it across restarts, so a restarted pod rejoins as the same static member and
    fences its predecessor's transactions. The other services stay Deployments."""
    docs = render(values)
    given = expected_values(values)["recomputeManager"]
    assert set(by_kind(docs, "StatefulSet")) == {MANAGER}
    assert set(by_kind(docs, "Deployment")) == set(SERVICES) - {MANAGER}
    spec = by_kind(docs, "StatefulSet")[MANAGER]["spec"]
    assert "strategy" not in spec  # a Deployment's field
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    assert spec["podManagementPolicy"] == "Parallel"
    selector = spec["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/component"] == "recompute-manager"
    assert spec["template"]["metadata"]["labels"].items() >= selector.items()

    headless = by_kind(docs, "Service")[spec["serviceName"]]  # the governing Service exists
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == selector
    assert "streamprov.io/metrics" not in headless["metadata"]["labels"]  # not scraped
    assert spec["serviceName"] not in metrics_services(docs)

    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["STREAMPROV_REPLICA_ID"] == {
        "name": "STREAMPROV_REPLICA_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    for name, deployment in by_kind(docs, "Deployment").items():
        assert "STREAMPROV_REPLICA_ID" not in container_env(deployment), name

    # Its state (result cache, ledger index) is rebuilt from Kafka: an emptyDir, no claim per pod.
    assert "volumeClaimTemplates" not in spec
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert "emptyDir" in volumes["state"]

    if given["autoscaling"]["enabled"]:
        assert "replicas" not in spec
        target = by_kind(docs, "HorizontalPodAutoscaler")[MANAGER]["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": MANAGER}
    else:
        assert spec["replicas"] == given["replicas"]
        assert MANAGER not in by_kind(docs, "HorizontalPodAutoscaler")
    if given["podDisruptionBudget"]["enabled"]:
        budget = by_kind(docs, "PodDisruptionBudget")[MANAGER]
        assert budget["spec"]["selector"]["matchLabels"] == selector


@needs_helm
def test_hpa_replaces_replicas_and_servicemonitor_scrapes_metrics() -> None:
    docs = render(CHART / "ci" / "hpa-servicemonitor-values.yaml")
    deployments = workloads(docs)
    for name in ("rel-streamprov-validator", "rel-streamprov-recompute-manager"):
        assert "replicas" not in deployments[name]["spec"]
    # no HPA for the change detector or the sequencer (one seals; more add standbys, not throughput)
    assert deployments["rel-streamprov-change-detector"]["spec"]["replicas"] == 1
    assert deployments["rel-streamprov-ledger-sequencer"]["spec"]["replicas"] == 2
    assert set(by_kind(docs, "HorizontalPodAutoscaler")) == {
        "rel-streamprov-validator",
        "rel-streamprov-recompute-manager",
    }
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    targets = {name: hpa["spec"]["scaleTargetRef"] for name, hpa in hpas.items()}
    assert targets == {  # each scales its own workload, whatever its kind
        "rel-streamprov-validator": {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "rel-streamprov-validator",
        },
        MANAGER: {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": MANAGER},
    }
    for name, target in targets.items():
        assert target["name"] in by_kind(docs, target["kind"]), name
    validator = hpas["rel-streamprov-validator"]["spec"]
    assert (validator["minReplicas"], validator["maxReplicas"]) == (2, 12)
    assert validator["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    manager = hpas["rel-streamprov-recompute-manager"]["spec"]
    assert manager["metrics"][-1]["resource"]["name"] == "memory"
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert by_kind(docs, "PodDisruptionBudget")["rel-streamprov-validator"]["spec"]["minAvailable"] == "50%"
    # Helm writes 1000000 as 1e+06 in the ConfigMap; it must still read as the number
    text = by_kind(docs, "ConfigMap")["rel-streamprov-config"]["data"]["streamprov.yaml"]
    config = loads_config(text, environ={}, check_secrets=False)
    assert config.topic("order-totals").recompute.budget_per_hour == 1_000_000


@needs_helm
def test_minimal_values_render_no_optional_objects() -> None:
    docs = render(CHART / "ci" / "minimal-values.yaml")
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",  # validator, change detector, ledger sequencer
        "Deployment",
        "Deployment",
        "PodDisruptionBudget",  # validator, recompute-manager, ledger-sequencer (one change detector: none)
        "PodDisruptionBudget",
        "PodDisruptionBudget",
        "Service",  # metrics of the validator and the recompute-manager (the other two have none yet)
        "Service",
        "Service",  # the recompute-manager's headless Service (its StatefulSet's serviceName)
        "ServiceAccount",
        "StatefulSet",  # the recompute manager
    ]
    replicas = {name: d["spec"]["replicas"] for name, d in workloads(docs).items()}
    assert replicas == {
        "rel-streamprov-validator": 2,
        "rel-streamprov-recompute-manager": 2,
        "rel-streamprov-change-detector": 1,  # one consumer of the source topics
        "rel-streamprov-ledger-sequencer": 2,  # one seals, one stands by
    }
    for deployment in workloads(docs).values():
        env = container_env(deployment)
        assert not [name for name in env if name.startswith("STREAMPROV__")]
    assert "rel-streamprov-change-detector" not in by_kind(docs, "PodDisruptionBudget")


@needs_helm
def test_change_detector_and_sequencer_take_their_settings() -> None:
    values = CHART / "ci" / "changes-sequencer-values.yaml"
    docs = render(values)
    deployments = by_kind(docs, "Deployment")

    detector = deployments["rel-streamprov-change-detector"]
    pod = detector["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == [
        "changes",
        "run",
        "--config",
        CONFIG_PATH,
        "--functions",
        "my_pkg.fns:registry",
    ]
    assert container["ports"] == [{"name": "http", "containerPort": 18082, "protocol": "TCP"}]
    assert container["startupProbe"]["failureThreshold"] == 180
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "512Mi"}
    assert detector["spec"]["replicas"] == 1
    assert detector["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["terminationGracePeriodSeconds"] == 90
    assert detector["spec"]["template"]["metadata"]["labels"]["team"] == "provenance"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/streamprov/detector"  # config.changes.state_dir
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"] == {
        "name": "state",
        "persistentVolumeClaim": {"claimName": "rel-streamprov-change-detector-state"},
    }
    (claim,) = by_kind(docs, "PersistentVolumeClaim").values()
    assert claim["metadata"]["name"] == "rel-streamprov-change-detector-state"
    assert claim["metadata"]["annotations"] == {"backup.example.com/skip": "true"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "fast-ssd",
        "resources": {"requests": {"storage": "10Gi"}},
    }

    sequencer = deployments["rel-streamprov-ledger-sequencer"]
    pod = sequencer["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # config.ledger.checkpoint_key is set: signed checkpoints, no --unsigned
    assert container["args"] == ["ledger", "sequencer", "--config", CONFIG_PATH]
    assert container["ports"] == [{"name": "http", "containerPort": 18083, "protocol": "TCP"}]
    assert sequencer["spec"]["replicas"] == 3
    assert pod["priorityClassName"] == "streamprov-critical"
    assert pod["terminationGracePeriodSeconds"] == 30
    assert {v["name"] for v in pod["volumes"]} == {
        "config",
        "tmp",
        "signing-key-0",
        "signing-key-1",
        "signing-key-2",
    }
    budget = by_kind(docs, "PodDisruptionBudget")["rel-streamprov-ledger-sequencer"]["spec"]
    assert budget["minAvailable"] == 2 and "maxUnavailable" not in budget
    assert budget["selector"]["matchLabels"]["app.kubernetes.io/component"] == "ledger-sequencer"
    assert "rel-streamprov-change-detector" not in by_kind(docs, "PodDisruptionBudget")

    config = loads_config(
        by_kind(docs, "ConfigMap")["rel-streamprov-config"]["data"]["streamprov.yaml"],
        environ=container_env(sequencer),
        check_secrets=False,
    )
    assert config.ledger_id() == "pipeline-ledger"
    assert config.ledger.sequencer.group_id == "pipeline-ledger-sequencer"
    assert config.ledger.sequencer.checkpoint_every == 500
    assert config.changes.record_sources is False
    assert config.changes.function_check_interval.total_seconds() == 60


@needs_helm
def test_checkpoint_private_key_is_mounted_in_the_sequencer_only(tmp_path: Path) -> None:
    """The ledger's checkpoint key signs in the sequencer pods and nowhere else; every other pod
    verifies checkpoints with its public key. The records' key signs in the Recompute Manager only.
    Checked on the rendered objects (Secret items, variables) and with real keys where they are mounted."""
    docs = render(CHART / "ci" / "changes-sequencer-values.yaml")
    text = by_kind(docs, "ConfigMap")["rel-streamprov-config"]["data"]["streamprov.yaml"]
    assert "PRIVATE" not in text and "private.pem" not in text
    deployments = workloads(docs)
    checkpoint_item = ("streamprov-ledger-checkpoint", "private.pem", "private.pem")
    records_item = ("streamprov-records-key", "tls.key", "private.pem")
    holders: dict[tuple[str, str, str], set[str]] = {checkpoint_item: set(), records_item: set()}
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        items = secret_items(pod)
        for item, names in holders.items():
            if item in items:
                names.add(name)
        for secret in ("streamprov-ledger-checkpoint", "streamprov-records-key"):  # public keys: everyone
            assert (secret, "public.pem", "public.pem") in items, name
        assert ("streamprov-signing", "hmac-secret", "secret") in items, name
        for volume in pod["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440
    assert holders[checkpoint_item] == {"rel-streamprov-ledger-sequencer"}
    assert holders[records_item] == {"rel-streamprov-recompute-manager"}

    mounted = tmp_path / "signing"
    checkpoint_key = write_pem_keys(mounted, "ledger-2026")
    write_pem_keys(mounted, "records-2026")
    (mounted / "pipeline-hmac").mkdir()
    (mounted / "pipeline-hmac" / "secret").write_text("a-shared-hmac-secret-of-the-pipeline\n")
    rings = {}
    for name, deployment in deployments.items():
        env = {k: v.replace(SIGNING_MOUNT, str(mounted)) for k, v in container_env(deployment).items()}
        signs = "STREAMPROV__SIGNING__KEYS__ledger-2026__PRIVATE_KEY_FILE" in env
        assert signs == (name == "rel-streamprov-ledger-sequencer"), name
        config = loads_config(text, environ=env)  # with the secrets checked, as the services start
        assert config.ledger.checkpoint_key == "ledger-2026"
        rings[name] = KeyRing(config.signing, environ=env)

    signer = rings["rel-streamprov-ledger-sequencer"].signer("ledger-2026")
    header = ProvenanceHeader.for_source("checkpoint-1", b"root").encode()
    signature = signer.sign(header)
    raw = checkpoint_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert rings["rel-streamprov-ledger-sequencer"].key("ledger-2026").public_key is not None
    for name, ring in rings.items():
        assert ring.verifier(["ledger-2026"]).verify(header, b"root", signature) is None, name
        public = ring.key("ledger-2026").public_key
        assert public is not None
        assert public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == raw
        if name != "rel-streamprov-ledger-sequencer":
            with pytest.raises(SigningError, match="no private key to sign with"):
                ring.signer("ledger-2026")
        if name != "rel-streamprov-recompute-manager":
            with pytest.raises(SigningError, match="no private key to sign with"):
                ring.signer("records-2026")


@needs_helm
def test_change_detector_and_sequencer_can_be_turned_off_or_scaled() -> None:
    minimal = CHART / "ci" / "minimal-values.yaml"
    result = helm_template(
        minimal, extra=("--set", "changes.enabled=false", "--set", "sequencer.enabled=false")
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert set(by_kind(docs, "Deployment")) == {"rel-streamprov-validator"}
    assert set(by_kind(docs, "StatefulSet")) == {MANAGER}
    assert set(by_kind(docs, "PodDisruptionBudget")) == {
        "rel-streamprov-validator",
        "rel-streamprov-recompute-manager",
    }

    # no Recompute Manager: no StatefulSet, no headless Service, no budget for it
    result = helm_template(minimal, extra=("--set", "recomputeManager.enabled=false"))
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    assert not by_kind(docs, "StatefulSet")
    assert set(by_kind(docs, "Deployment")) == set(SERVICES) - {MANAGER}
    assert set(by_kind(docs, "Service")) == {"rel-streamprov-validator-metrics"}
    assert MANAGER not in by_kind(docs, "PodDisruptionBudget")

    # more change detectors share the source partitions, each with its own emptyDir
    result = helm_template(
        minimal, extra=("--set", "changes.replicas=3", "--set", "changes.podDisruptionBudget.enabled=true")
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    detector = by_kind(docs, "Deployment")["rel-streamprov-change-detector"]
    assert detector["spec"]["replicas"] == 3
    assert detector["spec"]["strategy"]["type"] == "RollingUpdate"
    volumes = {v["name"]: v for v in detector["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert (
        by_kind(docs, "PodDisruptionBudget")["rel-streamprov-change-detector"]["spec"]["maxUnavailable"] == 1
    )
    assert not by_kind(docs, "PersistentVolumeClaim")

    # a claim of your own: used, none created
    result = helm_template(
        minimal,
        extra=(
            "--set",
            "changes.persistence.enabled=true",
            "--set",
            "changes.persistence.existingClaim=detector-state",
        ),
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    detector = by_kind(docs, "Deployment")["rel-streamprov-change-detector"]
    volumes = {v["name"]: v for v in detector["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"] == {"claimName": "detector-state"}
    assert not by_kind(docs, "PersistentVolumeClaim")

    # a key named by config.ledger.checkpoint_key but no sequencer here: nothing to mount it in
    keys = CHART / "ci" / "changes-sequencer-values.yaml"
    result = helm_template(keys, extra=("--set", "sequencer.enabled=false"))
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for deployment in workloads(docs).values():
        items = secret_items(deployment["spec"]["template"]["spec"])
        assert ("streamprov-ledger-checkpoint", "private.pem", "private.pem") not in items


@needs_helm
@pytest.mark.parametrize("values", BAD_VALUES, ids=lambda p: p.stem)
def test_bad_values_are_refused(values: Path) -> None:
    expect = next(
        line.removeprefix("# expect: ") for line in values.read_text().splitlines() if line.startswith("#")
    )
    result = helm_template(values)
    assert result.returncode != 0, f"{values.name} rendered but should be refused"
    assert expect in result.stderr, result.stderr


@needs_helm
def test_negative_replicas_and_unknown_criticality_fail_from_the_command_line() -> None:
    minimal = CHART / "ci" / "minimal-values.yaml"
    replicas = helm_template(minimal, extra=("--set", "validator.replicas=-1"))
    assert replicas.returncode != 0 and "/validator/replicas" in replicas.stderr
    urgent = helm_template(minimal, extra=("--set", "config.topics.fahrenheit.criticality=urgent"))
    assert urgent.returncode != 0
    assert "'low', 'medium', 'high', 'critical'" in urgent.stderr
    secret = helm_template(minimal, extra=("--set", "config.kafka.client.sasl\\.password=x"))
    assert secret.returncode != 0 and "would be stored in a ConfigMap" in secret.stderr
    ratio = helm_template(minimal, extra=("--set", "config.telemetry.tracing.sampling_ratio=2"))
    assert ratio.returncode != 0 and "/config/telemetry/tracing/sampling_ratio" in ratio.stderr
    algorithm = helm_template(minimal, extra=("--set", "config.signing.keys.k1.algorithm=rsa"))
    assert algorithm.returncode != 0 and "'hmac', 'ed25519'" in algorithm.stderr
