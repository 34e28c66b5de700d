#!/usr/bin/env bash
# Create .venv (Python >= 3.11) and install streamprov with every extra and the dev tools.
# Idempotent: a second run only re-checks the install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "streamprov needs Python >= 3.11 ('$py' is $("$py" --version 2>&1 || echo missing))." >&2
  echo "Install it (Debian: apt-get install python3 python3-venv) or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv || {
    echo "Could not create .venv: on Debian/Ubuntu install python3-venv first." >&2
    exit 1
  }
fi
stamp=.venv/.streamprov-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "Installing streamprov and its dependencies into .venv (first run takes a minute) ..." >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  touch "$stamp"
fi
