#!/usr/bin/env bash
# One command from a fresh clone to a running demo: install, then `streamprov demo`.
# With no --bootstrap-servers the demo starts an embedded Kafka-compatible broker and stops it after.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
exec "$root/.venv/bin/streamprov" demo "$@"
