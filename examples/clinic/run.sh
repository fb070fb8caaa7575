#!/usr/bin/env bash
# Run the clinic example: the tool backend on :3000 and casf-proxy in front of
# it on :8080 (admin on :9901), embedded defaults (no Redis, no PostgreSQL).
# Ctrl-C (or SIGTERM) stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh
export CASF_ADMIN_TOKEN=${CASF_ADMIN_TOKEN:-demo-admin-token}
BACKEND_PORT=${BACKEND_PORT:-3000}
export CLINIC_UPSTREAM=${CLINIC_UPSTREAM:-http://127.0.0.1:$BACKEND_PORT}
.venv/bin/python examples/clinic/backend.py --port "$BACKEND_PORT" &
backend=$!
.venv/bin/casf-proxy run -c examples/clinic/casf.yaml &
proxy=$!
trap 'kill $proxy $backend 2>/dev/null || true; wait' EXIT INT TERM
echo "clinic backend on :$BACKEND_PORT; casf-proxy on :${CASF_PORT:-8080}, admin :${CASF_ADMIN_PORT:-9901} (token $CASF_ADMIN_TOKEN)"
wait -n "$backend" "$proxy"
