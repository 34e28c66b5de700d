#!/usr/bin/env bash
# Regenerate docker/requirements.lock: the image's runtime dependencies (streamprov's core
# dependencies + the telemetry extra), every version pinned and every file hashed, resolved by
# pip-compile for Python 3.11 on Linux (the image's base). Run after changing dependencies in
# pyproject.toml; tests/unit/test_dockerfile.py checks the lock still covers them.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3.11}"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"$py" -m venv "$tools/venv"
"$tools/venv/bin/pip" install --quiet --disable-pip-version-check "pip-tools>=7.4,<8"
CUSTOM_COMPILE_COMMAND="docker/lock.sh" "$tools/venv/bin/pip-compile" \
  --quiet --no-header --annotate --no-emit-index-url --no-emit-find-links --no-emit-trusted-host --generate-hashes --strip-extras --allow-unsafe \
  --extra telemetry --output-file docker/requirements.lock pyproject.toml
echo "wrote docker/requirements.lock ($(grep -c '==' docker/requirements.lock) pinned packages)" >&2
