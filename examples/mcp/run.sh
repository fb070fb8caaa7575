#!/usr/bin/env bash
# Run the MCP example: the MCP server on :3001 and casf-proxy in front of it on
# :8080 (MCP endpoint http://127.0.0.1:8080/mcp, admin on :9901), embedded
# defaults (no Redis, no PostgreSQL). Ctrl-C (or SIGTERM) stops both.
# Then: .venv/bin/python examples/mcp/client.py --key demo-receptionist
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh
export CASF_ADMIN_TOKEN=${CASF_ADMIN_TOKEN:-demo-admin-token}
SERVER_PORT=${SERVER_PORT:-3001}
export MCP_UPSTREAM=${MCP_UPSTREAM:-http://127.0.0.1:$SERVER_PORT}
.venv/bin/python examples/mcp/server.py --port "$SERVER_PORT" &
server=$!
.venv/bin/casf-proxy run -c examples/mcp/casf.yaml &
proxy=$!
trap 'kill $proxy $server 2>/dev/null || true; wait' EXIT INT TERM
echo "MCP server on :$SERVER_PORT; casf-proxy on :${CASF_PORT:-8080} (MCP endpoint /mcp), admin :${CASF_ADMIN_PORT:-9901} (token $CASF_ADMIN_TOKEN)"
wait -n "$server" "$proxy"
