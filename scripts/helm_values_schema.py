"""Write helm/streamprov/values.schema.json (JSON Schema draft-07).

The `config` part is generated from the pydantic models in streamprov.config, so the chart refuses
exactly the keys, types and enum values the services would refuse; the rest describes the chart's
own values. Run after changing either:

    .venv/bin/python scripts/helm_values_schema.py          # write
    .venv/bin/python scripts/helm_values_schema.py --check  # exit 1 if the file is out of date
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from streamprov.config.models import KEY_ID_PATTERN
from streamprov.config.schema import config_json_schema

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "helm" / "streamprov" / "values.schema.json"

QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        schema["required"] = required
    schema.update(extra)
    return schema


def string_map() -> dict[str, Any]:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def probe() -> dict[str, Any]:
    return obj(
        {
            "periodSeconds": {"type": "integer", "minimum": 1},
            "failureThreshold": {"type": "integer", "minimum": 1},
            "timeoutSeconds": {"type": "integer", "minimum": 1},
        },
        required=["periodSeconds", "failureThreshold", "timeoutSeconds"],
    )


def int_or_percent() -> dict[str, Any]:
    return {
        "oneOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": r"^[0-9]{1,3}%$"},
        ]
    }


def persistence() -> dict[str, Any]:
    return obj(
        {
            "enabled": {"type": "boolean"},
            "existingClaim": {"type": "string", "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
            "storageClassName": {"type": "string"},
            "accessModes": {
                "type": "array",
                "minItems": 1,
                "items": {"enum": ["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]},
            },
            "size": {"type": "string", "pattern": QUANTITY},
            "annotations": string_map(),
        },
        required=["enabled"],
    )


def component(
    description: str,
    *,
    state: bool = True,
    autoscaling: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A service's chart settings. `state`: it has a state_dir (an emptyDir); `autoscaling`: an HPA
    can drive its replicas; `extra`: settings of that service only."""
    quantity = {"oneOf": [{"type": "string", "pattern": QUANTITY}, {"type": "number", "minimum": 0}]}
    resources_map = {"type": "object", "additionalProperties": quantity}
    percent = {"type": ["integer", "null"], "minimum": 1, "maximum": 100}
    optional: dict[str, Any] = {}
    if state:
        optional["stateSizeLimit"] = {"type": "string", "pattern": QUANTITY}
    if autoscaling:
        optional["autoscaling"] = obj(
            {
                "enabled": {"type": "boolean"},
                "minReplicas": {"type": "integer", "minimum": 1},
                "maxReplicas": {"type": "integer", "minimum": 1},
                "targetCPUUtilizationPercentage": percent,
                "targetMemoryUtilizationPercentage": percent,
                "scaleDownStabilizationSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
            }
        )
    return obj(
        {
            "enabled": {"type": "boolean"},
            "replicas": {
                "type": "integer",
                "minimum": 0,
                **({"description": "Ignored while autoscaling is enabled."} if autoscaling else {}),
            },
            **(extra or {}),
            "resources": obj(
                {"requests": resources_map, "limits": resources_map, "claims": {"type": "array"}}
            ),
            **optional,
            "tmpSizeLimit": {"type": "string", "pattern": QUANTITY},
            "probes": obj(
                {"startup": probe(), "liveness": probe(), "readiness": probe()},
                required=["startup", "liveness", "readiness"],
            ),
            "podDisruptionBudget": obj(
                {
                    "enabled": {"type": "boolean"},
                    "maxUnavailable": int_or_percent(),
                    "minAvailable": {"oneOf": [*int_or_percent()["oneOf"], {"type": "null"}]},
                }
            ),
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "priorityClassName": {"type": "string"},
            "podAnnotations": string_map(),
            "podLabels": string_map(),
            "nodeSelector": string_map(),
            "tolerations": {"type": "array", "items": {"type": "object"}},
            "affinity": {"type": "object"},
            "topologySpreadConstraints": {"type": "array", "items": {"type": "object"}},
            "extraEnv": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string", "pattern": r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"}},
                },
            },
            "extraVolumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
            "extraVolumeMounts": {
                "type": "array",
                "items": {"type": "object", "required": ["name", "mountPath"]},
            },
        },
        required=[
            "enabled",
            "replicas",
            "resources",
            "probes",
            "podDisruptionBudget",
            *(["autoscaling"] if autoscaling else []),
        ],
        description=description,
    )


def values_schema() -> dict[str, Any]:
    config = config_json_schema(draft="07")
    definitions = config.pop("definitions")
    config["description"] = (
        "The topic-level configuration (docs/configuration.md), rendered into the ConfigMap. "
        "Generated from streamprov.config's models."
    )
    secret_ref = {"type": "string", "pattern": r"^$|^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
    key = {"type": "string", "pattern": r"^$|^[-._a-zA-Z0-9]+$"}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": "Generated by scripts/helm_values_schema.py - edit that, not this file.",
        "title": "streamprov chart values",
        **obj(
            {
                "image": obj(
                    {
                        "repository": {"type": "string", "minLength": 1},
                        "tag": {"type": "string"},
                        "digest": {"type": "string", "pattern": r"^$|^sha256:[0-9a-f]{64}$"},
                        "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                    },
                    required=["repository"],
                ),
                "imagePullSecrets": {
                    "type": "array",
                    "items": obj({"name": {"type": "string", "minLength": 1}}, required=["name"]),
                },
                "nameOverride": {"type": "string"},
                "fullnameOverride": {"type": "string"},
                "commonLabels": string_map(),
                "serviceAccount": obj(
                    {
                        "create": {"type": "boolean"},
                        "name": {"type": "string"},
                        "annotations": string_map(),
                        "automountServiceAccountToken": {"type": "boolean"},
                    }
                ),
                "podSecurityContext": {"type": "object"},
                "containerSecurityContext": {"type": "object"},
                "validator": component("The Validator service."),
                "recomputeManager": component("The Recompute Manager service."),
                "changes": component(
                    "The change detector service (streamprov changes run).",
                    autoscaling=False,
                    extra={
                        "functions": {
                            "type": "string",
                            "pattern": r"^$|^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$",
                            "description": "module:attribute of a FunctionRegistry, passed as --functions.",
                        },
                        "persistence": persistence(),
                    },
                ),
                "sequencer": component(
                    "The ledger sequencer (streamprov ledger sequencer): one seals, the others stand by.",
                    state=False,
                    autoscaling=False,
                ),
                "kafkaSecrets": obj(
                    {
                        "sasl": obj(
                            {"existingSecret": secret_ref, "passwordKey": key, "usernameKey": key},
                            required=["existingSecret", "passwordKey"],
                        ),
                        "tls": obj(
                            {
                                "existingSecret": secret_ref,
                                "caKey": key,
                                "certificateKey": key,
                                "keyKey": key,
                                "keyPasswordKey": key,
                            },
                            required=["existingSecret"],
                        ),
                    }
                ),
                "signingSecrets": obj(
                    {
                        "keys": {
                            "type": "array",
                            "description": "Keys of config.signing.keys from Secrets (mounted files).",
                            "items": obj(
                                {
                                    "keyId": {"type": "string", "pattern": KEY_ID_PATTERN},
                                    "existingSecret": {**secret_ref, "minLength": 1},
                                    "secretKey": key,
                                    "privateKeyKey": key,
                                    "publicKeyKey": key,
                                },
                                required=["keyId", "existingSecret"],
                            ),
                        }
                    }
                ),
                "metrics": obj(
                    {
                        "service": obj(
                            {
                                "enabled": {"type": "boolean"},
                                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "annotations": string_map(),
                            }
                        ),
                        "serviceMonitor": obj(
                            {
                                "enabled": {"type": "boolean"},
                                "namespace": {"type": "string"},
                                "labels": string_map(),
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"},
                                "scrapeTimeout": {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"},
                            }
                        ),
                    }
                ),
                "config": config,
                "global": {"type": "object"},
            },
            required=[
                "image",
                "validator",
                "recomputeManager",
                "changes",
                "sequencer",
                "kafkaSecrets",
                "config",
            ],
        ),
        "definitions": definitions,
    }


def render() -> str:
    return json.dumps(values_schema(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: run scripts/helm_values_schema.py",
                file=sys.stderr,
            )
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
