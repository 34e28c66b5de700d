#!/usr/bin/env bash
# One command from a fresh clone to the full test suite: install, then pytest.
# Integration tests use Apache Kafka started by scripts/kafka.sh (fetched from Maven Central on first
# use), or an existing cluster named by STREAMPROV_TEST_BOOTSTRAP=host:port.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
