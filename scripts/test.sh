#!/usr/bin/env bash
# The project's test command (README): install, lint, type-check, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/system-deps.sh
echo "== ruff"; .venv/bin/python -m ruff check .
echo "== mypy --strict"; .venv/bin/python -m mypy
echo "== import-linter"; .venv/bin/lint-imports --no-cache >/dev/null && echo "architecture contracts kept" || { .venv/bin/lint-imports --no-cache; exit 1; }
echo "== pytest"; .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
