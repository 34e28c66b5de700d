"""Validate rendered Kubernetes manifests against the schemas shipped in the kubernetes-validate package.

    python scripts/k8s_validate.py --kube-version 1.25.0 --kube-version 1.37.0 rendered/*.yaml

Strict validation (unknown fields are errors), offline. Custom resources have no schema there:
ServiceMonitor (monitoring.coreos.com/v1) is skipped and reported as skipped, never silently.
Each workload's configuration (Deployment or StatefulSet: the ConfigMap's streamprov.yaml plus the
pod's STREAMPROV__... environment, values from Secrets stood in for) is loaded with streamprov's own
loader too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml

from streamprov.config import ConfigError, loads_config

SKIPPED_GROUPS = ("monitoring.coreos.com/",)
WORKLOADS = ("Deployment", "StatefulSet")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def pod_environ(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment; a value from a Secret or elsewhere becomes a stand-in string."""
    return {
        item["name"]: str(item["value"]) if "value" in item else "<set from valueFrom>"
        for item in container.get("env", [])
    }


def check_configs(docs: list[dict[str, Any]]) -> int:
    """Load the streamprov.yaml each workload mounts, with that workload's pod environment."""
    failures = 0
    configs = {
        doc["metadata"]["name"]: doc["data"]["streamprov.yaml"]
        for doc in docs
        if doc.get("kind") == "ConfigMap" and "streamprov.yaml" in doc.get("data", {})
    }
    for doc in docs:
        if doc.get("kind") not in WORKLOADS:
            continue
        spec = doc["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                if mount["mountPath"] != "/etc/streamprov/streamprov.yaml":
                    continue
                name = volumes[mount["name"]]["configMap"]["name"]
                where = f"{doc['kind']}/{doc['metadata']['name']} (ConfigMap/{name})"
                try:
                    loads_config(
                        configs[name], source=where, environ=pod_environ(container), check_secrets=False
                    )
                except ConfigError as exc:
                    failures += 1
                    print(f"  FAIL {where}: its configuration does not load:\n{exc}")
                else:
                    print(f"  ok   {where}: configuration loads with the pod's environment")
    return failures


def check(path: Path, versions: list[str]) -> int:
    failures = 0
    docs = documents(path)
    failures += check_configs(docs)
    for doc in docs:
        kind = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        if str(doc.get("apiVersion", "")).startswith(SKIPPED_GROUPS):
            print(f"  skip {kind} ({doc['apiVersion']}: a CRD, no schema in kubernetes-validate)")
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                failures += 1
                print(f"  FAIL {kind} on Kubernetes {version}: {exc.message} at {list(exc.path)}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                failures += 1
                print(f"  FAIL {kind} on Kubernetes {version}: no schema ({exc})")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kube-version", action="append", required=True, dest="versions")
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    failures = 0
    for path in args.files:
        count = len(documents(path))
        print(f"{path}: {count} objects, Kubernetes {', '.join(args.versions)}")
        failures += check(path, args.versions)
    if failures:
        print(f"{failures} manifest problem(s)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
