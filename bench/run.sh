#!/usr/bin/env bash
# The benchmark in one command: installs what it needs (venv, wrk, redis-server,
# PostgreSQL), then runs bench/run.py; arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system-deps.sh wrk
exec .venv/bin/python bench/run.py "$@"
