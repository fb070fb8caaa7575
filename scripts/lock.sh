#!/usr/bin/env bash
# Re-pin every dependency with its hashes after a change to pyproject.toml:
#   requirements/dev.lock      runtime + dev extras (scripts/bootstrap.sh installs it)
#   requirements/runtime.lock  runtime only (deploy/Dockerfile installs it)
# pip-tools runs from a throwaway venv; review the diff before committing it.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install -q --upgrade pip pip-tools
common=(--generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links --strip-extras
        "$@")
"$tools/bin/pip-compile" -q "${common[@]}" --extra dev -o requirements/dev.lock pyproject.toml
"$tools/bin/pip-compile" -q "${common[@]}" -o requirements/runtime.lock pyproject.toml
echo "requirements/dev.lock and requirements/runtime.lock written"
