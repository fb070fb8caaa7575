#!/usr/bin/env bash
# Make sure the real servers the tests start are installed: redis-server and
# redis-cli (Redis tests, a three-master cluster), initdb and pg_ctl
# (PostgreSQL tests), promtool (alert-rule tests), wrk (the benchmark's smoke
# test), nginx (the sample nginx config in front of a real casf-proxy) and
# chromium (the approvals console's browser test). On a fresh Debian/Ubuntu
# machine they come from apt; elsewhere, install them yourself. kubectl (the
# kustomize builds of deploy/k8s) is part of this machine image; apt has none.
# The tests skip locally when a binary is missing and fail in CI (CI set to
# true, 1 or yes, in any case: tests/ci.py), so nothing silently runs without
# them.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v promtool >/dev/null || need+=(prometheus)  # alert-rule tests
command -v wrk >/dev/null || need+=(wrk)  # the benchmark's smoke test
command -v nginx >/dev/null || need+=(nginx)  # the sample nginx config, forward auth
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && ! command -v google-chrome >/dev/null; then
  need+=(chromium)  # the approvals console's browser test
fi
for extra in "$@"; do command -v "$extra" >/dev/null || need+=("$extra"); done
[ ${#need[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing ${need[*]} with apt-get" >&2
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "missing ${need[*]}: install them (no apt-get here)" >&2
fi
