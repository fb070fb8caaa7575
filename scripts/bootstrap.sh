#!/usr/bin/env bash
# Create .venv (if needed) and install casf-proxy with its dev extras.
# Needs only python3 (>= 3.11) with venv and pip, and access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.casf-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/dev.lock -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # every dependency at its locked version and hashes (scripts/lock.sh writes the
  # lock); then the project itself, with nothing more resolved
  .venv/bin/python -m pip install -q --require-hashes -r requirements/dev.lock
  .venv/bin/python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
