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
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from tests.ci import require_binary
from tests.nginx_fixture import Nginx, nginx_t, render
from tests.servers import free_port
from tests.test_deploy import (
    BACKEND,
    PROXY,
    TARGET_LABELS,
    _defined_metrics,
    _exposed,
    _named,
    container,
    deployment,
    env_of,
    one,
)
from tests.test_deploy import render as render_overlay

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


# ------------------------------------------------------------------ Envoy

ENVOY = DEPLOY / "envoy" / "envoy.yaml"
CASF_HEADERS = ["x-casf-decision", "x-casf-tool", "x-casf-principal", "x-casf-role",
                "x-casf-tenant", "x-casf-trace-id"]

# The Envoy v3 API fields of every message the sample uses (from Envoy's API
# protos), so a misspelt or misplaced field fails here as it would in
# `envoy --mode validate`. "" is a scalar, "*" a message not checked further,
# "[X]" a list of message X, "@" a typed_config resolved by its "@type".
_ENVOY_FIELDS: dict[str, dict[str, str]] = {
    "Bootstrap": {"admin": "Admin", "static_resources": "StaticResources", "node": "*",
                  "layered_runtime": "*", "overload_manager": "*", "stats_config": "*"},
    "Admin": {"address": "Address", "access_log": "*", "profile_path": "",
              "socket_options": "*", "ignore_global_conn_limit": ""},
    "StaticResources": {"listeners": "[Listener]", "clusters": "[Cluster]", "secrets": "*"},
    "Listener": {"name": "", "address": "Address", "filter_chains": "[FilterChain]",
                 "per_connection_buffer_limit_bytes": "", "listener_filters": "*",
                 "drain_type": ""},
    "Address": {"socket_address": "SocketAddress", "pipe": "*"},
    "SocketAddress": {"protocol": "", "address": "", "port_value": "", "named_port": "",
                      "resolver_name": "", "ipv4_compat": ""},
    "FilterChain": {"filter_chain_match": "*", "filters": "[NetworkFilter]",
                    "transport_socket": "*", "name": ""},
    "NetworkFilter": {"name": "", "typed_config": "@"},
    "HttpConnectionManager": {
        "codec_type": "", "stat_prefix": "", "rds": "*", "route_config": "RouteConfiguration",
        "http_filters": "[HttpFilter]", "access_log": "[AccessLog]", "use_remote_address": "",
        "xff_num_trusted_hops": "", "normalize_path": "", "merge_slashes": "",
        "path_with_escaped_slashes_action": "", "request_timeout": "",
        "request_headers_timeout": "", "stream_idle_timeout": "", "generate_request_id": "",
        "common_http_protocol_options": "*", "http_protocol_options": "*", "server_name": "",
        "tracing": "*", "preserve_external_request_id": ""},
    "RouteConfiguration": {"name": "", "virtual_hosts": "[VirtualHost]",
                           "request_headers_to_remove": "", "response_headers_to_add": "*",
                           "response_headers_to_remove": "", "request_headers_to_add": "*"},
    "VirtualHost": {"name": "", "domains": "", "routes": "[Route]",
                    "typed_per_filter_config": "*", "request_headers_to_remove": "",
                    "request_headers_to_add": "*"},
    "Route": {"name": "", "match": "RouteMatch", "route": "RouteAction", "direct_response": "*",
              "typed_per_filter_config": "*", "request_headers_to_remove": "",
              "request_headers_to_add": "*", "response_headers_to_add": "*",
              "response_headers_to_remove": "", "metadata": "*"},
    "RouteMatch": {"prefix": "", "path": "", "safe_regex": "*", "path_separated_prefix": "",
                   "headers": "*", "query_parameters": "*", "case_sensitive": ""},
    "RouteAction": {"cluster": "", "timeout": "", "idle_timeout": "", "prefix_rewrite": "",
                    "regex_rewrite": "*", "host_rewrite_literal": "", "retry_policy": "*",
                    "weighted_clusters": "*", "cluster_header": ""},
    "HttpFilter": {"name": "", "typed_config": "@", "is_optional": "", "disabled": ""},
    "AccessLog": {"name": "", "typed_config": "@", "filter": "*"},
    "StdoutAccessLog": {"log_format": "*"},
    "Router": {"dynamic_stats": "", "start_child_span": "", "upstream_log": "*",
               "suppress_envoy_headers": "", "strict_check_headers": "",
               "respect_expected_rq_timeout": ""},
    "HeaderMutation": {"mutations": "Mutations", "most_specific_header_mutations_wins": ""},
    "Mutations": {"request_mutations": "[HeaderMutationRule]",
                  "response_mutations": "[HeaderMutationRule]", "parameter_mutations": "*"},
    "HeaderMutationRule": {"remove": "", "append": "*"},
    "ExtAuthz": {
        "grpc_service": "*", "http_service": "HttpService", "transport_api_version": "",
        "failure_mode_allow": "", "failure_mode_allow_header_add": "",
        "with_request_body": "BufferSettings", "clear_route_cache": "",
        "status_on_error": "HttpStatus", "validate_mutations": "",
        "metadata_context_namespaces": "", "typed_metadata_context_namespaces": "",
        "filter_enabled": "*", "filter_enabled_metadata": "*", "deny_at_disable": "*",
        "include_peer_certificate": "", "stat_prefix": "", "bootstrap_metadata_labels_key": "",
        "allowed_headers": "ListStringMatcher", "disallowed_headers": "ListStringMatcher",
        "include_tls_session": "", "charge_cluster_response_stats": "",
        "encode_raw_headers": ""},
    "HttpService": {"server_uri": "HttpUri", "path_prefix": "",
                    "authorization_request": "AuthorizationRequest",
                    "authorization_response": "AuthorizationResponse", "retry_policy": "*"},
    "HttpUri": {"uri": "", "cluster": "", "timeout": ""},
    "AuthorizationRequest": {"allowed_headers": "ListStringMatcher", "headers_to_add": "*"},
    "AuthorizationResponse": {
        "allowed_upstream_headers": "ListStringMatcher",
        "allowed_upstream_headers_to_append": "ListStringMatcher",
        "allowed_client_headers": "ListStringMatcher",
        "allowed_client_headers_on_success": "ListStringMatcher",
        "dynamic_metadata_from_headers": "ListStringMatcher"},
    "ListStringMatcher": {"patterns": "[StringMatcher]"},
    "StringMatcher": {"exact": "", "prefix": "", "suffix": "", "safe_regex": "*",
                      "contains": "", "ignore_case": ""},
    "BufferSettings": {"max_request_bytes": "", "allow_partial_message": "",
                       "pack_as_bytes": ""},
    "HttpStatus": {"code": ""},
    "Cluster": {"name": "", "type": "", "connect_timeout": "",
                "load_assignment": "ClusterLoadAssignment", "lb_policy": "",
                "typed_extension_protocol_options": "*", "circuit_breakers": "*",
                "health_checks": "*", "dns_lookup_family": "",
                "per_connection_buffer_limit_bytes": ""},
    "ClusterLoadAssignment": {"cluster_name": "", "endpoints": "[LocalityLbEndpoints]",
                              "policy": "*"},
    "LocalityLbEndpoints": {"locality": "*", "lb_endpoints": "[LbEndpoint]",
                            "load_balancing_weight": "", "priority": ""},
    "LbEndpoint": {"endpoint": "Endpoint", "health_status": "",
                   "load_balancing_weight": "", "metadata": "*"},
    "Endpoint": {"address": "Address", "health_check_config": "*", "hostname": ""},
}
_ENVOY_TYPES = {
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager": "HttpConnectionManager",
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router": "Router",
    "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz": "ExtAuthz",
    "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation":
        "HeaderMutation",
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog":
        "StdoutAccessLog",
}
# filter / logger name -> the config type it takes
_ENVOY_NAMES = {
    "envoy.filters.network.http_connection_manager": "HttpConnectionManager",
    "envoy.filters.http.router": "Router", "envoy.filters.http.ext_authz": "ExtAuthz",
    "envoy.filters.http.header_mutation": "HeaderMutation",
    "envoy.access_loggers.stdout": "StdoutAccessLog",
}
_ENVOY_ENUMS = {
    ("HttpConnectionManager", "codec_type"): {"AUTO", "HTTP1", "HTTP2", "HTTP3"},
    ("HttpConnectionManager", "path_with_escaped_slashes_action"): {
        "IMPLEMENTATION_SPECIFIC_DEFAULT", "KEEP_UNCHANGED", "REJECT_REQUEST",
        "UNESCAPE_AND_REDIRECT", "UNESCAPE_AND_FORWARD"},
    ("ExtAuthz", "transport_api_version"): {"V3"},
    ("HttpStatus", "code"): {"BadRequest", "Unauthorized", "Forbidden", "TooManyRequests",
                             "InternalServerError", "BadGateway", "ServiceUnavailable",
                             "GatewayTimeout"},
    ("Cluster", "type"): {"STATIC", "STRICT_DNS", "LOGICAL_DNS", "EDS", "ORIGINAL_DST"},
}
_DURATION_FIELDS = {"timeout", "connect_timeout", "request_timeout", "idle_timeout",
                    "request_headers_timeout", "stream_idle_timeout"}


def _envoy_problems(value: Any, message: str, where: str) -> list[str]:
    fields = _ENVOY_FIELDS[message]
    if not isinstance(value, dict):
        return [f"{where}: {message} must be a mapping"]
    out: list[str] = []
    for key, sub in value.items():
        path = f"{where}.{key}"
        if key not in fields:
            out.append(f"{path}: {message} has no field {key!r}")
            continue
        kind = fields[key]
        if (message, key) in _ENVOY_ENUMS and sub not in _ENVOY_ENUMS[(message, key)]:
            out.append(f"{path}: {sub!r} is not a {key} value")
        if key in _DURATION_FIELDS and not re.fullmatch(r"\d+(\.\d+)?s", str(sub)):
            out.append(f"{path}: {sub!r} is not a duration like 2s")
        if kind in ("", "*"):
            continue
        if kind == "@":
            url = sub.get("@type") if isinstance(sub, dict) else None
            target = _ENVOY_TYPES.get(str(url))
            if target is None:
                out.append(f"{path}: unknown @type {url!r}")
                continue
            named = _ENVOY_NAMES.get(value.get("name", ""))
            if named is not None and named != target:
                out.append(f"{path}: {value['name']} takes {named}, not {target}")
            out += _envoy_problems({k: v for k, v in sub.items() if k != "@type"}, target,
                                   path)
        elif kind.startswith("["):
            if not isinstance(sub, list):
                out.append(f"{path}: must be a list")
                continue
            for i, item in enumerate(sub):
                out += _envoy_problems(item, kind[1:-1], f"{path}[{i}]")
        else:
            out += _envoy_problems(sub, kind, path)
    if message == "HeaderMutationRule" and len(value) != 1:
        out.append(f"{where}: exactly one of remove, append")
    return out


def _envoy() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(ENVOY.read_text())
    return data


def test_envoy_config_uses_only_fields_of_the_envoy_api() -> None:
    assert _envoy_problems(_envoy(), "Bootstrap", "envoy") == []


def test_envoy_field_check_rejects_mistakes() -> None:
    """The check above can fail: a misspelt field, a wrong enum, a bad @type."""
    cfg = _envoy()
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    authz = hcm["typed_config"]["http_filters"][1]["typed_config"]
    authz["failure_mode_alow"] = authz.pop("failure_mode_allow")
    authz["status_on_error"] = {"code": 503}
    hcm["typed_config"]["http_filters"][2]["typed_config"]["@type"] += "X"
    problems = "\n".join(_envoy_problems(cfg, "Bootstrap", "envoy"))
    assert "no field 'failure_mode_alow'" in problems
    assert "503 is not a code value" in problems
    assert "unknown @type" in problems


def _hcm(cfg: dict[str, Any]) -> dict[str, Any]:
    (listener,) = cfg["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (hcm,) = chain["filters"]
    conf: dict[str, Any] = hcm["typed_config"]
    return conf


def _cluster_addr(cfg: dict[str, Any], name: str) -> tuple[str, int]:
    (cluster,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == name]
    (group,) = cluster["load_assignment"]["endpoints"]
    (ep,) = group["lb_endpoints"]
    sa = ep["endpoint"]["address"]["socket_address"]
    return sa["address"], sa["port_value"]


def _patterns(matcher: dict[str, Any]) -> list[str]:
    assert all(p.get("ignore_case") for p in matcher["patterns"])
    return [p["exact"] for p in matcher["patterns"]]


def test_envoy_uses_casf_proxy_as_its_ext_authz_http_service() -> None:
    cfg = _envoy()
    hcm = _hcm(cfg)
    filters = [f["name"] for f in hcm["http_filters"]]
    # spoofed X-Casf-* removed first, then the decision, the router last
    assert filters == ["envoy.filters.http.header_mutation", "envoy.filters.http.ext_authz",
                       "envoy.filters.http.router"]
    strip = hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    assert set(CASF_HEADERS) <= {m["remove"] for m in strip}
    authz = hcm["http_filters"][1]["typed_config"]
    svc = authz["http_service"]
    assert svc["path_prefix"] == "/authz/envoy"
    uri = urlsplit(svc["server_uri"]["uri"])
    assert _cluster_addr(cfg, svc["server_uri"]["cluster"]) == (uri.hostname, uri.port)
    assert uri.port == 9191
    assert float(svc["server_uri"]["timeout"].rstrip("s")) <= 5
    assert sorted(_patterns(svc["authorization_response"]["allowed_upstream_headers"])) == (
        sorted(CASF_HEADERS))
    client = _patterns(svc["authorization_response"]["allowed_client_headers"])
    assert {"content-type", "retry-after", "x-casf-trace-id"} <= set(client)
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"]["code"] == "ServiceUnavailable"
    # the credentials and request ids the clinic config reads reach casf-proxy
    clinic = yaml.safe_load((ROOT / "examples" / "clinic" / "casf.yaml").read_text())
    passed = set(_patterns(authz["allowed_headers"]))
    wanted = {clinic["identity"]["api_keys"]["header"].lower(), "authorization",
              *(h.lower() for h in clinic["replay"]["request_id_headers"]), "traceparent"}
    assert wanted <= passed, wanted - passed
    # the whole body casf-proxy would accept, and no partial bodies
    body = authz["with_request_body"]
    assert body["max_request_bytes"] == clinic["limits"]["max_body_bytes"]
    assert body["allow_partial_message"] is False
    # the path casf-proxy decides on is the one forwarded
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    (vhost,) = hcm["route_config"]["virtual_hosts"]
    for route in vhost["routes"]:
        assert {"authorization", "x-api-key"} <= set(route["request_headers_to_remove"])
        assert route["route"]["cluster"] == "tool_api"
    assert _cluster_addr(cfg, "tool_api") == ("127.0.0.1", 3000)
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def test_envoy_binary_validates_the_sample_when_installed() -> None:
    """The authoritative check, where an envoy binary exists (not a Debian package)."""
    envoy = shutil.which("envoy")
    if envoy is None:
        pytest.skip("envoy is not installed")
    out = subprocess.run([envoy, "--mode", "validate", "-c", str(ENVOY)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


# ------------------------------------------------------------------ Kubernetes

OVERLAYS_ALL = ("embedded", "production", "envoy", "monitoring")
K8S_VERSIONS = ("1.28.0", "latest")
# The subset of the Prometheus operator's PodMonitor CRD (monitoring.coreos.com/v1)
# the manifests use, strict like the built-in kinds: kubernetes-validate has no
# schema for custom resources.
_DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
             r"(([0-9]+)ms)?)$")
_LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector"],
                 "properties": {
                     "selector": _LABEL_SELECTOR,
                     "namespaceSelector": {"type": "object", "additionalProperties": False,
                                           "properties": {"any": {"type": "boolean"},
                                                          "matchNames": {"type": "array"}}},
                     "jobLabel": {"type": "string"},
                     "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                     "sampleLimit": {"type": "integer", "minimum": 0},
                     "podMetricsEndpoints": {"type": "array", "items": {
                         "type": "object", "additionalProperties": False, "properties": {
                             "port": {"type": "string"},
                             "portNumber": {"type": "integer"},
                             "path": {"type": "string"},
                             "scheme": {"enum": ["http", "https"]},
                             "interval": {"type": "string", "pattern": _DURATION},
                             "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                             "honorLabels": {"type": "boolean"},
                             "params": {"type": "object"},
                             "relabelings": {"type": "array"},
                             "metricRelabelings": {"type": "array"}}}}}}}}


def _render(overlay: str) -> list[dict[str, Any]]:
    return render_overlay(overlay)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", ("envoy", "monitoring"))
def test_new_overlays_match_the_kubernetes_schemas(overlay: str, version: str) -> None:
    import jsonschema
    import kubernetes_validate

    if version == "latest":
        version = kubernetes_validate.latest_version()
    objs = _render(overlay)
    custom = 0
    for obj in objs:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            custom += 1
            jsonschema.validate(obj, PODMONITOR_SCHEMA)
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at "
                        f"{'.'.join(map(str, exc.absolute_path))}")
    assert custom == (1 if overlay == "monitoring" else 0)


def test_podmonitor_schema_rejects_a_misspelt_field() -> None:
    import jsonschema

    pm = json.loads(json.dumps(one(_render("monitoring"), "PodMonitor")))
    pm["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pm, PODMONITOR_SCHEMA)


def _ports(spec: dict[str, Any]) -> dict[str, tuple[str, int]]:
    """Named container port -> (container, number), across the pod."""
    out: dict[str, tuple[str, int]] = {}
    for c in spec["containers"]:
        for p in c.get("ports", []):
            assert p["name"] not in out, f"port name {p['name']} used twice"
            out[p["name"]] = (c["name"], p["containerPort"])
    return out


@pytest.mark.parametrize("overlay", OVERLAYS_ALL)
def test_startup_and_readiness_probes(overlay: str) -> None:
    spec = deployment(_render(overlay))["spec"]["template"]["spec"]
    proxy = container(spec, PROXY)
    startup = proxy["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["httpGet"]["port"] == "admin"
    # room to start (policy compile, state connections) before liveness counts
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30
    ready = proxy["readinessProbe"]["httpGet"]
    assert (ready["path"], ready["port"]) == ("/healthz", "admin")
    for c in spec["containers"]:
        if c.get("ports"):
            assert "readinessProbe" in c and "startupProbe" in c, c["name"]


@pytest.mark.parametrize("overlay", OVERLAYS_ALL)
def test_network_policy_admits_only_the_traffic_port_and_admin_from_monitoring(
        overlay: str) -> None:
    objs = _render(overlay)
    template = deployment(objs)["spec"]["template"]
    pol = one(objs, "NetworkPolicy")["spec"]
    assert pol["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pol["policyTypes"] == ["Ingress"]
    ports = _ports(template["spec"])
    open_rules = [r for r in pol["ingress"] if "from" not in r]
    scoped = [r for r in pol["ingress"] if "from" in r]
    assert [[p["port"] for p in r["ports"]] for r in open_rules] == [["http"]]
    assert [[p["port"] for p in r["ports"]] for r in scoped] == [["admin"]]
    (peer,) = scoped[0]["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}
    # the names resolve: the Service's target, and casf-proxy's admin listener
    svc = one(objs, "Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    assert ports["admin"] == (PROXY, 9901)
    assert ports["http"] == (("envoy", 8080) if overlay == "envoy" else (PROXY, 8080))
    assert set(ports) == {"http", "admin"}  # nothing else is exposed


def test_envoy_overlay_fronts_the_backend_with_casf_as_authorizer() -> None:
    objs = _render("envoy")
    dep = deployment(objs)
    assert dep["spec"]["replicas"] == 1  # embedded state
    spec = dep["spec"]["template"]["spec"]
    assert {c["name"] for c in spec["containers"]} == {PROXY, BACKEND, "envoy"}
    envoy = container(spec, "envoy")
    proxy = container(spec, PROXY)
    backend = container(spec, BACKEND)
    # the mounted Envoy config is deploy/envoy/envoy.yaml, byte for byte
    copy = DEPLOY / "k8s" / "overlays" / "envoy" / "envoy.yaml"
    assert copy.read_bytes() == ENVOY.read_bytes(), (
        "cp deploy/envoy/envoy.yaml deploy/k8s/overlays/envoy/envoy.yaml")
    vols = {v["name"]: v for v in spec["volumes"]}
    mount = {m["name"]: m["mountPath"] for m in envoy["volumeMounts"]}
    cm = _named(objs, "ConfigMap", vols["envoy-config"]["configMap"]["name"])
    assert cm["data"]["envoy.yaml"] == ENVOY.read_text()
    assert envoy["args"][envoy["args"].index("-c") + 1] == f"{mount['envoy-config']}/envoy.yaml"
    cfg = _envoy()
    listener = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener["port_value"] == envoy["ports"][0]["containerPort"]
    # Envoy reaches casf-proxy's decision listener and the backend over loopback
    env: dict[str, Any] = {k: v.get("value") for k, v in env_of(proxy).items()}
    assert (env["CASF_DECISIONS_HOST"], int(env["CASF_DECISIONS_PORT"])) == (
        _cluster_addr(cfg, "casf_decisions"))
    args = backend["args"]
    assert _cluster_addr(cfg, "tool_api") == (args[args.index("--host") + 1],
                                             int(args[args.index("--port") + 1]))
    # casf-proxy's traffic listener is loopback-only and not a pod port
    assert env["CASF_HOST"] == "127.0.0.1"
    assert [p["name"] for p in proxy["ports"]] == ["admin"]
    # every container unprivileged, read-only root, as in the other overlays
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsUser"] > 0 and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(
            res["limits"])
    # the backend outlives both front containers' preStop delay
    stops = {c["name"]: int(c["lifecycle"]["preStop"]["exec"]["command"][1])
             for c in spec["containers"]}
    assert stops[BACKEND] > max(stops["envoy"], stops[PROXY])
    assert max(stops.values()) < spec["terminationGracePeriodSeconds"]


def test_monitoring_overlay_scrapes_the_admin_port_of_the_production_pods() -> None:
    objs = _render("monitoring")
    prod = {(o["kind"], o["metadata"]["name"]) for o in render_overlay("production")}
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} == prod | {
        ("PodMonitor", "casf-proxy")}
    pm = one(objs, "PodMonitor")
    assert pm["metadata"]["namespace"] == "casf-clinic"
    template = deployment(objs)["spec"]["template"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= (
        template["metadata"]["labels"].items())
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert _ports(template["spec"])[ep["port"]] == (PROXY, 9901)
    assert ep["path"] == "/metrics"
    # the annotations-based scrape config agrees
    ann = template["metadata"]["annotations"]
    assert (ann["prometheus.io/port"], ann["prometheus.io/path"]) == ("9901", "/metrics")


# ------------------------------------------------------------------ Grafana and Prometheus

OPS_DASHBOARD = DEPLOY / "grafana" / "casf-proxy-operations.json"
OPS_RULES = DEPLOY / "prometheus" / "operations-alerts.yaml"
# Metrics (and labels) the operations dashboard and alerts use that other work
# adds to proxy/: the telemetry drop counter (reasons: DropReason in
# proxy/telemetry.py). An entry must be pruned once proxy/ defines it.
PENDING_METRICS: dict[str, set[str]] = {}


def _ops_expressions() -> list[tuple[str, str]]:
    dash = json.loads(OPS_DASHBOARD.read_text())
    out = [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"]
           for t in p.get("targets", [])]
    for group in yaml.safe_load(OPS_RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"alert {rule['alert']}", rule["expr"]))
    return out


def _known_labels() -> dict[str, set[str]]:
    exposed = _exposed(_defined_metrics())
    labels = {name: set(lbl) for name, (_, lbl) in exposed.items()}
    for name, lbl in PENDING_METRICS.items():
        labels[name] = labels.get(name, set()) | lbl
    return labels


def test_pending_metrics_are_not_yet_defined() -> None:
    """Prune PENDING_METRICS as proxy/ defines these (then they are checked as defined)."""
    exposed = _exposed(_defined_metrics())
    for name, labels in PENDING_METRICS.items():
        if name in exposed:
            assert not labels <= exposed[name][1], f"{name}{sorted(labels)}: prune it"


def test_operations_dashboard_and_alerts_use_only_known_metrics_and_labels() -> None:
    known = _known_labels()
    referenced: set[str] = set()
    for where, expr in _ops_expressions():
        expr = expr.replace("$__rate_interval", "5m")
        allowed = set(TARGET_LABELS)
        for metric, selector in re.findall(r"\b(casf_[a-z0-9_]+)(\{[^}]*\})?", expr):
            referenced.add(metric)
            assert metric in known, f"{where}: {metric} is neither defined nor pending"
            own = known[metric] | TARGET_LABELS
            allowed |= own
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
                assert label in own, f"{where}: {metric} has no label {label!r}"
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                assert label in allowed, f"{where}: no metric in it has label {label!r}"
    assert set(PENDING_METRICS) <= referenced, "prune PENDING_METRICS"


def test_operations_dashboard_structure() -> None:
    dash = json.loads(OPS_DASHBOARD.read_text())
    main = json.loads((DEPLOY / "grafana" / "casf-proxy.json").read_text())
    assert dash["uid"] == "casf-proxy-operations" != main["uid"]
    assert dash["templating"] == main["templating"]  # same data source and job variables
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    by_topic = {
        "mode": 'casf_mode{job=~"$job"',
        "5xx": 'status=~"5.."',
        "approvals pending": "casf_approvals_pending",
        "approvals by action": "sum by (action)",
        "spans dropped": "casf_telemetry_spans_dropped_total",
    }
    for topic, needle in by_topic.items():
        panels = [p for p in dash["panels"]
                  if p["type"] != "row" and topic in p["title"].lower()]
        assert panels, topic
        assert any(needle in t["expr"] for p in panels for t in p["targets"]), topic
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["description"]
        for t in p["targets"]:
            assert 'job=~"$job"' in t["expr"], (p["title"], t["expr"])


def test_operations_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_binary("promtool")
    rules = [{"record": f"casf_dashboard:ops{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$job", ".+")}
             for i, (where, expr) in enumerate(_ops_expressions()) if where.startswith("panel")]
    path = tmp_path / "ops-dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "ops", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_operations_alert_rules() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(OPS_RULES.read_text())["groups"]
             for r in g["rules"]}
    assert set(rules) == {"CasfKillSwitchOn", "CasfReadOnlyOn", "CasfUpstream5xxHigh",
                          "CasfApprovalsPiling", "CasfTelemetrySpansDropped"}
    for name, mode in (("CasfKillSwitchOn", "KILL_SWITCH"), ("CasfReadOnlyOn", "READ_ONLY")):
        assert f'casf_mode{{mode="{mode}"}}' in rules[name]["expr"]
        assert rules[name]["expr"].rstrip().endswith("== 1")
        assert int(rules[name]["for"].rstrip("m")) >= 5
    assert 'status=~"5.."' in rules["CasfUpstream5xxHigh"]["expr"]
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_promtool_checks_and_unit_tests_the_operations_rules() -> None:
    promtool = require_binary("promtool")
    here = DEPLOY / "prometheus"
    for args in (["check", "rules", OPS_RULES.name],
                 ["test", "rules", "operations-alerts_test.yaml"]):
        out = subprocess.run([promtool, *args], cwd=here, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 0, f"promtool {' '.join(args)}:\n{out.stdout}{out.stderr}"
