"""Operations artifacts in ``deploy/``: nginx and Envoy in front, probes, network
policy, Prometheus operator objects, the operations dashboard and its alerts.

- nginx (deploy/nginx/nginx.conf.template): ``nginx -t`` on the rendered
  config, then a real nginx in front of an authz stub written here (answers
  as casf-proxy's forward door does) and a recording upstream: allowed calls
  reach the upstream with the X-Casf-* headers and without credentials;
  every refusal reaches the client with its status, its headers and its JSON
  body, after exactly one decision call.
- Envoy (deploy/envoy/): the ext_authz filter's settings casf-proxy's envoy
  door relies on.
- Kubernetes: the overlays render with kustomize and validate offline
  (kubernetes-validate, strict), the Prometheus operator's PodMonitor
  against its own schema.
- Grafana and Prometheus: every metric a panel or rule names is one the
  proxy defines or one listed in PENDING_METRICS; ``promtool check rules``
  and ``promtool test rules`` on the operations rules.

nginx, kubectl/kustomize and promtool are external binaries: their tests
skip when missing, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.nginx_fixture import Nginx, nginx_t, render
from tests.servers import free_port, require_binary

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"

# ------------------------------------------------------------------ nginx


def test_nginx_sample_config_passes_nginx_t(tmp_path: Path) -> None:
    conf = render(tmp_path / "run", listen=free_port(), decisions="127.0.0.1:9191",
                  backend="127.0.0.1:3000")
    out = nginx_t(conf)
    assert out.returncode == 0, out.stderr
    assert "syntax is ok" in out.stderr and "test is successful" in out.stderr


def test_nginx_t_rejects_a_broken_config(tmp_path: Path) -> None:
    """The check above can fail: a misspelt directive is an error."""
    broken = tmp_path / "broken.template"
    broken.write_text((DEPLOY / "nginx" / "nginx.conf.template").read_text()
                      .replace("auth_request_set $casf_status", "auth_requets_set $casf_status"))
    conf = render(tmp_path / "run", listen=free_port(), decisions="127.0.0.1:9191",
                  backend="127.0.0.1:3000", template=broken)
    out = nginx_t(conf)
    assert out.returncode != 0 and "auth_requets_set" in out.stderr


@dataclass
class Call:
    method: str
    path: str
    headers: CIMultiDict[str]
    body: bytes


@dataclass
class Recorder:
    calls: list[Call] = field(default_factory=list)
    url: str = ""


# What the stub authorizer answers, by the original path.
ALLOW_HEADERS = {"X-Casf-Decision": "ALLOW", "X-Casf-Tool": "cliniccloud.list_appointments",
                 "X-Casf-Principal": "key:receptionist", "X-Casf-Role": "receptionist",
                 "X-Casf-Tenant": "t1", "X-Casf-Trace-Id": "4bf92f3577b34da6a3ce929d0e0e4736"}
REFUSALS: dict[str, tuple[int, str, dict[str, str]]] = {
    "/unauthenticated": (401, "Auth_MissingCredential", {"WWW-Authenticate": "Bearer"}),
    "/forbidden": (403, "Policy_Denied", {}),
    "/bad": (400, "Decision_BodyUnavailable", {}),
    "/conflict": (409, "Inv_ReplayConcurrent", {}),
    "/limited": (429, "RateLimit_Exceeded", {"Retry-After": "7"}),
    "/unavailable": (503, "FAIL_CLOSED", {"Retry-After": "1"}),
}


def envelope(status: int, code: str, path: str, headers: dict[str, str]) -> dict[str, Any]:
    env: dict[str, Any] = {"decision": "DENY", "status": status, "reason_codes": [code],
                           "message": f"refused {path}", "tool": "cliniccloud.x",
                           "request_id": None, "trace_id": ALLOW_HEADERS["X-Casf-Trace-Id"],
                           "policy_hash": "sha256:" + "0" * 64}
    if "Retry-After" in headers:
        env["retry_after"] = int(headers["Retry-After"])
    return env


async def _serve(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


@pytest.fixture
async def authz() -> AsyncIterator[Recorder]:
    """Answers as casf-proxy's GET /authz/forward does."""
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        rec.calls.append(Call(request.method, request.path_qs, CIMultiDict(request.headers),
                              body))
        path = request.headers.get("X-Original-URI", "").split("?")[0]
        if path in REFUSALS:
            status, code, headers = REFUSALS[path]
            return web.json_response(envelope(status, code, path, headers), status=status,
                                     headers={**headers, "X-Casf-Trace-Id":
                                              ALLOW_HEADERS["X-Casf-Trace-Id"]})
        return web.Response(status=200, headers=ALLOW_HEADERS)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, port = await _serve(app)
    rec.url = f"127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
async def backend() -> AsyncIterator[Recorder]:
    rec = Recorder()

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        rec.calls.append(Call(request.method, request.path_qs, CIMultiDict(request.headers),
                              body))
        return web.json_response({"ok": True, "path": request.path_qs}, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner, port = await _serve(app)
    rec.url = f"127.0.0.1:{port}"
    yield rec
    await runner.cleanup()


@pytest.fixture
def nginx(tmp_path: Path, authz: Recorder, backend: Recorder) -> Any:
    require_binary("nginx")
    with Nginx(tmp_path / "nginx", decisions=authz.url, backend=backend.url) as n:
        yield n


CLIENT_HEADERS = {"X-API-Key": "demo-receptionist", "Authorization": "Bearer not-a-jwt",
                  "Idempotency-Key": "req-1",
                  # spoofed casf headers: must never reach the backend as sent
                  "X-Casf-Role": "custodian", "X-Casf-Decision": "ALLOW",
                  "X-Casf-Tenant": "t9"}


async def _send(nginx: Nginx, method: str, path: str,
                data: bytes | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    async with aiohttp.ClientSession() as s, s.request(
            method, nginx.url + path, headers=CLIENT_HEADERS, data=data,
            timeout=aiohttp.ClientTimeout(total=20)) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def _one_decision_call(authz: Recorder, method: str, uri: str) -> None:
    (call,) = authz.calls  # exactly one decision per client request
    assert (call.method, call.path) == ("GET", "/authz/forward")
    assert call.headers["X-Original-Method"] == method
    assert call.headers["X-Original-URI"] == uri
    assert call.headers["X-API-Key"] == "demo-receptionist"
    assert call.headers["Authorization"] == "Bearer not-a-jwt"
    assert call.headers["Idempotency-Key"] == "req-1"
    # identity headers only a trusted proxy may set do not reach casf-proxy
    assert "X-Casf-Role" not in call.headers and "X-Casf-Tenant" not in call.headers
    assert call.body == b""


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_allowed_request_reaches_the_backend_with_casf_headers(
        nginx: Nginx, authz: Recorder, backend: Recorder, method: str) -> None:
    body = b'{"patient_id": "p1"}' if method == "POST" else None
    status, _, payload = await _send(nginx, method, "/appointments?day=2026-01-01", body)
    assert status == 201, payload
    assert json.loads(payload)["path"] == "/appointments?day=2026-01-01"
    _one_decision_call(authz, method, "/appointments?day=2026-01-01")
    (seen,) = backend.calls
    assert seen.method == method
    assert seen.body == (body or b"")
    for name, value in ALLOW_HEADERS.items():
        assert seen.headers.getall(name) == [value], name  # casf's, not the client's
    assert "Authorization" not in seen.headers and "X-API-Key" not in seen.headers


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", sorted(REFUSALS))
async def test_every_refusal_reaches_the_client_with_status_headers_and_envelope(
        nginx: Nginx, authz: Recorder, backend: Recorder, path: str, method: str) -> None:
    status, headers, payload = await _send(nginx, method, path + "?x=1",
                                           b"{}" if method != "GET" else None)
    want_status, code, want_headers = REFUSALS[path]
    assert status == want_status, payload
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(payload) == envelope(want_status, code, path, want_headers)
    for name, value in want_headers.items():
        assert headers.getall(name) == [value], name
    assert headers["X-Casf-Trace-Id"] == ALLOW_HEADERS["X-Casf-Trace-Id"]
    _one_decision_call(authz, method, path + "?x=1")
    assert backend.calls == []  # the backend never saw it


async def test_refusals_of_one_request_never_answer_another(
        nginx: Nginx, authz: Recorder, backend: Recorder) -> None:
    """Kept answers are per request: the next call is decided afresh."""
    for _ in range(3):
        status, _, _ = await _send(nginx, "GET", "/limited")
        assert status == 429
    status, _, _ = await _send(nginx, "GET", "/appointments")
    assert status == 201
    assert len(authz.calls) == 4 and len(backend.calls) == 1


async def test_unreachable_authorizer_fails_closed_with_an_envelope(
        tmp_path: Path, backend: Recorder) -> None:
    require_binary("nginx")
    dead = f"127.0.0.1:{free_port()}"
    with Nginx(tmp_path / "nginx", decisions=dead, backend=backend.url) as n:
        for method in ("GET", "POST"):
            status, headers, payload = await _send(n, method, "/appointments", b"{}")
            assert status == 502
            assert headers["Content-Type"].startswith("application/json")
            env = json.loads(payload)
            assert (env["decision"], env["status"]) == ("DENY", 502)
    assert backend.calls == []
