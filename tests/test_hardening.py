"""Bypass attempts (docs/threat-model.md): hostile requests over raw sockets, byte for byte.

Every case asserts what the upstream received: nothing at all for a refused
request, and for a forwarded one exactly the normalised request the policy
decided on, after an ALLOW decision was committed (the upstream checks the
audit file when the request reaches it: tests/rawhttp.py CheckingUpstream).

One proxy serves the whole module (the clinic example, plus: trusted identity
headers from 127.0.0.1, a tenant taken from the ``X-Tenant`` header on
``GET /appointments``, and a 600 ms body-read timeout).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from proxy.audit.sqlite import SqliteAuditSink
from proxy.ports import AuditUnavailable
from tests.conftest import Proxy, clinic_env, start_proxy, write_config
from tests.rawhttp import (
    CheckingUpstream,
    RawResponse,
    audit_rows,
    exchange,
    one,
    request,
    run_checking_upstream,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

RECEPTIONIST = ("X-API-Key", "demo-receptionist")
DOCTOR = ("X-API-Key", "demo-doctor")
BILLING = ("X-API-Key", "demo-billing")
JSON = ("Content-Type", "application/json")
APPT = b'{"patient_id":"p1","slot":"2026-11-23T10:00:00Z"}'
BODY_TIMEOUT_MS = 600
HEADER_TIMEOUT_MS = 800


def hardening_patch(d: dict[str, Any]) -> None:
    d["identity"]["order"] = ["jwt", "api_keys", "trusted_headers"]
    d["identity"]["trusted_headers"] = {"enabled": True, "sources": ["127.0.0.1/32"]}
    d["limits"]["body_read_timeout_ms"] = BODY_TIMEOUT_MS
    d["limits"]["header_timeout_ms"] = HEADER_TIMEOUT_MS
    for route in d["routes"]:
        if route["method"] == "GET" and route["path"] == "/appointments":
            route["attributes"]["context.resource_tenant"] = {"from": "header",
                                                              "name": "X-Tenant"}
            route["resource_tenant"] = "context.resource_tenant"


@dataclass
class Env:
    proxy: Proxy
    upstream: CheckingUpstream
    audit: Path

    @property
    def port(self) -> int:
        return self.proxy.serving.traffic_port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("hardening")
    up = CheckingUpstream(audit_path=tmp / "audit.db")
    async with run_checking_upstream(up):
        cfg = write_config(tmp, hardening_patch)
        async with start_proxy(cfg, clinic_env(up.url, tmp), up) as proxy:
            yield Env(proxy, up, tmp / "audit.db")
    assert up.violations == []


_RID = iter(range(1_000_000))


def rid() -> tuple[str, str]:
    return ("Idempotency-Key", f"hard-{next(_RID)}")


# ------------------------------------------------------------------ the table

# (id, raw request, expected status, expected reason code or None,
#  the path+query the upstream must have received, or None for "nothing")
Case = tuple[str, bytes, int, str | None, str | None]


def get(target: str | bytes, *headers: tuple[str | bytes, str | bytes],
        key: tuple[str, str] = RECEPTIONIST) -> bytes:
    return request("GET", target, [key, *headers])


def post(target: str, body: bytes, *headers: tuple[str | bytes, str | bytes],
         key: tuple[str, str] = RECEPTIONIST, ctype: tuple[str, str] = JSON) -> bytes:
    return request("POST", target, [key, ctype, rid(), *headers], body)


MALFORMED = "BadRequest_MalformedPath"
UNMAPPED = "Route_NotMapped"
AMBIGUOUS = "BadRequest_Ambiguous"
PARSER = "BadRequest_MalformedRequest"
BAD_JSON = "BadRequest_InvalidJson"

PATH_TRICKS: list[Case] = [
    ("dotdot to an unmapped path", get("/appointments/../admin"), 403, UNMAPPED, None),
    ("dotdot out of a param route", get("/patients/p1/history/../../../admin", key=DOCTOR),
     403, UNMAPPED, None),
    ("dotdot above the root", get("/../appointments"), 400, MALFORMED, None),
    ("dotdot resolves before routing", get("/admin/../appointments"), 200, None,
     "/appointments"),
    ("encoded dotdot", get("/appointments/%2e%2e/admin"), 400, MALFORMED, None),
    ("encoded dotdot upper", get("/patients/%2E%2E/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("half-encoded dotdot", get("/patients/.%2e/history", key=DOCTOR), 400, MALFORMED, None),
    ("encoded single dot", get("/appointments/%2e"), 400, MALFORMED, None),
    ("encoded slash", get("/appointments%2fadmin"), 400, MALFORMED, None),
    ("encoded slash in a param", get("/patients/p1%2F..%2F..%2Fadmin/history", key=DOCTOR),
     400, MALFORMED, None),
    ("encoded backslash", get("/patients/p1%5c/history", key=DOCTOR), 400, MALFORMED, None),
    ("raw backslash", get(b"/appointments\\..\\admin"), 400, MALFORMED, None),
    ("double-encoded dotdot", get("/patients/%252e%252e/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("double-encoded slash", get("/appointments%252fadmin"), 400, MALFORMED, None),
    # found by the atheris run: the second escape only completes "%25a1" once decoded
    ("double encoding assembled by decoding", get("/patients/p%25a%31/history", key=DOCTOR),
     400, MALFORMED, None),
    ("leading double slash", get("//appointments"), 200, None, "/appointments"),
    ("double slash to unmapped", get("//admin"), 403, UNMAPPED, None),
    ("empty param segment collapses", get("/patients//history", key=DOCTOR), 403, UNMAPPED,
     None),
    ("triple slash inside", get("/patients///p1/history", key=DOCTOR), 200, None,
     "/patients/p1/history"),
    ("trailing dot", get("/appointments."), 403, UNMAPPED, None),
    ("trailing encoded dot", get("/appointments%2e"), 403, UNMAPPED, None),
    ("trailing slash", get("/appointments/"), 403, UNMAPPED, None),
    ("trailing slash-dot", get("/appointments/."), 403, UNMAPPED, None),
    ("trailing slash-dotdot", get("/appointments/.."), 403, UNMAPPED, None),
    ("trailing dot on a param route", get("/patients/p1/history.", key=DOCTOR), 403, UNMAPPED,
     None),
    ("trailing slash on a param route", get("/patients/p1/history/", key=DOCTOR), 403,
     UNMAPPED, None),
    ("upper case", get("/APPOINTMENTS"), 403, UNMAPPED, None),
    ("mixed case", get("/Appointments"), 403, UNMAPPED, None),
    ("mixed case literal after a param", get("/patients/p1/History", key=DOCTOR), 403,
     UNMAPPED, None),
    ("encoded upper-case letters", get("/%41ppointments"), 403, UNMAPPED, None),
    ("encoded unreserved letters decode", get("/appointment%73"), 200, None, "/appointments"),
    ("overlong dot pair", get("/patients/%C0%AE%C0%AE/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("overlong slash", get("/%C0%AFadmin"), 400, MALFORMED, None),
    ("3-byte overlong dot", get("/patients/%E0%80%AE/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("4-byte overlong dot", get("/patients/%F0%80%80%AE/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("invalid utf-8 byte", get("/patients/%FF/history", key=DOCTOR), 400, MALFORMED, None),
    ("encoded NUL", get("/appointments%00"), 400, MALFORMED, None),
    ("raw NUL", get(b"/appointments\x00"), 400, PARSER, None),
    ("raw non-ASCII", get(b"/appointments\xc3\xa9"), 400, PARSER, None),
    ("raw space", get(b"/appoint ments"), 400, PARSER, None),
    ("fragment", get("/appointments#x"), 400, MALFORMED, None),
    ("path parameter", get("/appointments;jsessionid=1"), 400, MALFORMED, None),
    ("path parameter inside", get("/patients/p1;x=1/history", key=DOCTOR), 400, MALFORMED,
     None),
    ("path parameter to confuse routing", get("/admin;/appointments"), 400, MALFORMED, None),
    ("encoded semicolon stays data", get("/appointments%3b"), 403, UNMAPPED, None),
    ("absolute-form target", get("http://evil.test/admin"), 400, MALFORMED, None),
    ("authority-form target", request("CONNECT", "evil.test:443", [RECEPTIONIST]), 400,
     MALFORMED, None),
    ("asterisk-form target", request("OPTIONS", "*", [RECEPTIONIST]), 400, MALFORMED, None),
]

QUERY_TRICKS: list[Case] = [
    ("plain query attribute", get("/appointments?patient_id=p1"), 200, None,
     "/appointments?patient_id=p1"),
    ("repeated query attribute", get("/appointments?patient_id=p1&patient_id=p2"), 400,
     AMBIGUOUS, None),
    ("semicolon separator", get("/appointments?patient_id=p1;patient_id=p2"), 400, AMBIGUOUS,
     None),
    ("case variant", get("/appointments?patient_id=p1&PATIENT_ID=p2"), 400, AMBIGUOUS, None),
    ("case variant alone", get("/appointments?Patient_Id=p2"), 400, AMBIGUOUS, None),
    ("dot for underscore (PHP)", get("/appointments?patient_id=p1&patient.id=p2"), 400,
     AMBIGUOUS, None),
    ("array suffix (PHP)", get("/appointments?patient_id[]=p2"), 400, AMBIGUOUS, None),
    ("encoded name", get("/appointments?patient%5Fid=p1&patient_id=p2"), 400, AMBIGUOUS,
     None),
    ("latin-1 escape in the query", get("/appointments?patient_id=p%E9"), 400, MALFORMED,
     None),
    ("overlong escape in the query", get("/appointments?patient_id=%C0%AE"), 400, MALFORMED,
     None),
    ("NUL in the query", get("/appointments?patient_id=p1%00"), 400, MALFORMED, None),
]

OVERRIDES: list[Case] = [
    *[(f"{h} header", get("/appointments", (h, v)), 400, AMBIGUOUS, None) for h, v in [
        ("X-HTTP-Method-Override", "DELETE"), ("x-http-method-override", "DELETE"),
        ("X-HTTP-Method", "DELETE"), ("X-Method-Override", "DELETE"),
        ("X-Original-URL", "/admin"), ("X-Rewrite-URL", "/admin")]],
    ("override on a write", request("DELETE", "/appointments/a1",
                                    [DOCTOR, rid(), ("X-HTTP-Method-Override", "GET")]),
     400, AMBIGUOUS, None),
    ("_method in the query", get("/appointments?_method=DELETE"), 400, AMBIGUOUS, None),
    ("encoded _method in the query", get("/appointments?%5Fmethod=DELETE"), 400, AMBIGUOUS,
     None),
    ("upper-case _METHOD", get("/appointments?_METHOD=delete"), 400, AMBIGUOUS, None),
    ("_method in a form body", post("/appointments", b"patient_id=p1&_method=DELETE",
                                    ctype=("Content-Type", "application/x-www-form-urlencoded")),
     400, AMBIGUOUS, None),
    ("_method in a multipart body", post(
        "/appointments",
        b'--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--\r\n',
        ctype=("Content-Type", "multipart/form-data; boundary=b")), 400, AMBIGUOUS, None),
    ("lower-case method token", request("get", "/appointments", [RECEPTIONIST]), 400, PARSER,
     None),
    ("unknown method", request("FOO", "/appointments", [RECEPTIONIST]), 400, PARSER, None),
    ("unmapped method", request("TRACE", "/appointments", [RECEPTIONIST]), 403, UNMAPPED, None),
    ("PUT on a POST route", request("PUT", "/appointments", [RECEPTIONIST, rid()], APPT), 403,
     UNMAPPED, None),
]

CHUNKED = ("Transfer-Encoding", "chunked")
SMUGGLING: list[Case] = [
    ("CL then TE", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Content-Length", "4"), CHUNKED],
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n", length=False), 400, PARSER, None),
    ("TE then CL", request("POST", "/appointments", [
        RECEPTIONIST, rid(), CHUNKED, ("Content-Length", "40")],
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: x\r\n\r\n", length=False), 400, PARSER, None),
    ("two different Content-Lengths", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Content-Length", "2"), ("Content-Length", "30")], b"{}",
        length=False), 400, PARSER, None),
    ("two equal Content-Lengths", request("POST", "/appointments", [
        RECEPTIONIST, rid(), JSON, ("Content-Length", str(len(APPT))),
        ("Content-Length", str(len(APPT)))], APPT, length=False), 400, PARSER, None),
    ("Content-Length list", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Content-Length", f"{len(APPT)}, {len(APPT)}")], APPT,
        length=False), 400, PARSER, None),
    ("signed Content-Length", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Content-Length", f"+{len(APPT)}")], APPT, length=False),
     400, PARSER, None),
    ("Content-Length overflow", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Content-Length", "9" * 30)], APPT, length=False), 400, PARSER,
     None),
    ("TE twice", request("POST", "/appointments", [RECEPTIONIST, rid(), CHUNKED, CHUNKED],
                         b"0\r\n\r\n", length=False), 400, PARSER, None),
    ("TE xchunked", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Transfer-Encoding", "xchunked")], b"0\r\n\r\n", length=False),
     400, PARSER, None),
    ("TE chunked, identity", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Transfer-Encoding", "chunked, identity")], b"0\r\n\r\n",
        length=False), 400, PARSER, None),
    ("TE gzip, chunked", request("POST", "/appointments", [
        RECEPTIONIST, rid(), ("Transfer-Encoding", "gzip, chunked")], b"0\r\n\r\n",
        length=False), 501, "Request_UnsupportedEncoding", None),
    ("TE with a space before the colon", b"POST /appointments HTTP/1.1\r\nHost: x\r\n"
     b"X-API-Key: demo-receptionist\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n"
     b"\r\n0\r\n\r\n", 400, PARSER, None),
    # accepted by the parser and framed as chunked (empty): decided like any request
    ("TE on HTTP/1.0", request("POST", "/appointments", [RECEPTIONIST, rid(), CHUNKED],
                               b"0\r\n\r\n", length=False, version=b"HTTP/1.0"), 400,
     "BadRequest_MissingPatientId", None),
    ("negative chunk size", request("POST", "/appointments", [RECEPTIONIST, rid(), CHUNKED],
                                    b"-1\r\n\r\n", length=False), 400, PARSER, None),
    ("obs-fold of a credential", b"GET /appointments HTTP/1.1\r\nHost: x\r\n"
     b"X-API-Key: demo-\r\n receptionist\r\n\r\n", 400, PARSER, None),
    ("obs-fold of TE", b"POST /appointments HTTP/1.1\r\nHost: x\r\n"
     b"X-API-Key: demo-receptionist\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
     400, PARSER, None),
    ("bare LF line ends", b"GET /appointments HTTP/1.1\nHost: x\n"
     b"X-API-Key: demo-receptionist\n\n", 400, PARSER, None),
    ("bare CR", b"GET /appointments HTTP/1.1\rHost: x\r\nX-API-Key: demo-receptionist\r\n\r\n",
     400, PARSER, None),
    ("two Host headers", get("/appointments", ("Host", "evil.test")), 400, PARSER, None),
]

HEADER_BYTES: list[Case] = [
    ("latin-1 byte in a header", get("/appointments", ("X-Note", b"caf\xe9")), 400,
     "BadRequest_MalformedHeader", None),
    ("invalid utf-8 in a header", get("/appointments", ("X-Note", b"\xff\xfe")), 400,
     "BadRequest_MalformedHeader", None),
    ("utf-8 in a header (obs-text)", get("/appointments", ("X-Note", "café")), 400,
     "BadRequest_MalformedHeader", None),
    ("non-ASCII byte in the credential",
     request("GET", "/appointments", [("X-API-Key", b"demo-receptionist\xff")]), 400,
     "BadRequest_MalformedHeader", None),
    ("non-ASCII header name", get("/appointments", (b"X-N\xc3\xa9", "1")), 400, PARSER, None),
    ("NUL in a header value", get("/appointments", ("X-Note", b"a\x00b")), 400, PARSER, None),
    ("gzip Content-Encoding", post("/appointments", gzip.compress(APPT),
                                   ("Content-Encoding", "gzip")), 415,
     "Request_UnsupportedEncoding", None),
    ("deflate Content-Encoding on a read", get("/appointments", ("Content-Encoding", "deflate")),
     415, "Request_UnsupportedEncoding", None),
    ("identity Content-Encoding is fine", get("/appointments",
                                              ("Content-Encoding", "identity")), 200, None,
     "/appointments"),
]

OVERSIZED: list[Case] = [
    ("one header over 8 KiB", get("/appointments", ("X-Big", "a" * 9000)), 431,
     "Request_HeadersTooLarge", None),
    ("too many headers", get("/appointments", *[(f"X-H{i}", "v") for i in range(200)]), 431,
     "Request_HeadersTooLarge", None),
    ("request line over 8 KiB", get("/appointments?x=" + "a" * 9000), 431,
     "Request_HeadersTooLarge", None),
    ("body over the limit", post("/appointments", b'{"patient_id":"p1","n":"' + b"x" * 70_000
                                 + b'"}'), 413, "Request_TooLarge", None),
]


def deep(n: int, inner: bytes = b"1") -> bytes:
    return b"[" * n + inner + b"]" * n


JSON_BOMBS: list[Case] = [
    ("nesting just allowed", post("/appointments", b'{"patient_id":"p1","x":' + deep(60)
                                  + b"}"), 201, None, "/appointments"),
    ("nesting over the limit", post("/appointments", b'{"patient_id":"p1","x":' + deep(64)
                                    + b"}"), 400, BAD_JSON, None),
    ("nesting in the attribute", post("/appointments", b'{"patient_id":' + deep(300, b'"p1"')
                                      + b"}"), 400, BAD_JSON, None),
    ("nesting of 30000", post("/appointments", deep(30_000)), 400, BAD_JSON, None),
    ("integer over 64 bits", post("/invoices", b'{"patient_id":"p1","amount_cents":'
                                  b"18446744073709551616}", key=BILLING), 400, BAD_JSON, None),
    ("integer under -2^63", post("/invoices", b'{"patient_id":"p1","amount_cents":'
                                 b"-9223372036854775809}", key=BILLING), 400, BAD_JSON, None),
    ("huge integer as the subject", post("/appointments", b'{"patient_id":1' + b"0" * 400
                                         + b"}"), 400, BAD_JSON, None),
    ("float overflow", post("/invoices", b'{"patient_id":"p1","amount_cents":1e400}',
                            key=BILLING), 400, BAD_JSON, None),
    ("64-bit integer is exact", post("/invoices", b'{"patient_id":"p1","amount_cents":'
                                     b"18446744073709551615}", key=BILLING), 201, None,
     "/invoices"),
    ("NaN", post("/invoices", b'{"patient_id":"p1","amount_cents":NaN}', key=BILLING), 400,
     BAD_JSON, None),
    ("byte order mark", post("/appointments", b"\xef\xbb\xbf" + APPT), 400, BAD_JSON, None),
    ("lone surrogate", post("/appointments", b'{"patient_id":"p\\ud800"}'), 400, BAD_JSON,
     None),
    ("two documents", post("/appointments", APPT + APPT), 400, BAD_JSON, None),
    ("duplicate subject", post("/appointments", b'{"patient_id":"p1","patient_id":"p2"}'),
     400, AMBIGUOUS, None),
    # the bypass before the fix: the policy (last wins) saw t1, a first-wins upstream t2
    ("duplicate tenant, foreign first", post(
        "/appointments", b'{"patient_id":"p1","tenant_id":"t2","tenant_id":"t1"}'), 400,
     AMBIGUOUS, None),
    ("duplicate by escape", post("/appointments",
                                 b'{"patient_id":"p1","\\u0070atient_id":"p2"}'), 400,
     AMBIGUOUS, None),
    ("duplicate ignoring case (Go)", post("/appointments",
                                          b'{"patient_id":"p1","PATIENT_ID":"p2"}'), 400,
     AMBIGUOUS, None),
    ("duplicate deep inside", post("/appointments",
                                   b'{"patient_id":"p1","x":[{"a":1,"a":2}]}'), 400,
     AMBIGUOUS, None),
    ("same key in sibling objects is fine", post(
        "/appointments", b'{"patient_id":"p1","x":[{"a":1},{"a":2}]}'), 201, None,
     "/appointments"),
]

TABLE = [*PATH_TRICKS, *QUERY_TRICKS, *OVERRIDES, *SMUGGLING, *HEADER_BYTES, *OVERSIZED,
         *JSON_BOMBS]


def _check_envelope(resp: RawResponse, status: int, code: str) -> None:
    assert resp.headers["Content-Type"].startswith("application/json"), resp
    env = resp.envelope()
    assert env["status"] == status and env["decision"] == "DENY", env
    assert code in env["reason_codes"], env
    assert resp.headers["X-Casf-Trace-Id"] == env["trace_id"]


@pytest.mark.parametrize(("name", "raw", "status", "code", "forwarded"), TABLE,
                         ids=[c[0] for c in TABLE])
async def test_bypass_table(env: Env, name: str, raw: bytes, status: int, code: str | None,
                            forwarded: str | None) -> None:
    before = len(env.upstream.seen)
    resp = await one(env.port, raw)
    seen = env.upstream.seen[before:]
    assert resp.status == status, (resp.status, resp.body[:300])
    if code is not None:
        _check_envelope(resp, status, code)
        # nothing of the request is echoed: no credential, no body value
        assert b"demo-" not in resp.body and b"p2" not in resp.body
    if forwarded is None:
        assert seen == [], [(s.method, s.path_qs) for s in seen]
    else:
        assert [s.path_qs for s in seen] == [forwarded]
        assert "X-API-Key" not in seen[0].headers
    assert env.upstream.violations == []


# ------------------------------------------------------------------ pipelining


async def test_pipelined_requests_are_each_decided(env: Env) -> None:
    before = len(env.upstream.seen)
    first = request("POST", "/appointments", [RECEPTIONIST, JSON, rid()], APPT, close=False)
    second = request("GET", "/admin", [RECEPTIONIST], close=False)
    third = request("GET", "/appointments/../admin%2f", [RECEPTIONIST])
    got = await exchange(env.port, first + second + third, count=3)
    assert [r.status for r in got] == [201, 403, 400]
    assert [s.path_qs for s in env.upstream.seen[before:]] == ["/appointments"]
    assert env.upstream.seen[before].body == APPT  # byte for byte what was decided on


async def test_body_bytes_reach_the_upstream_unchanged(env: Env) -> None:
    body = b'{ "slot" : "s",\n "patient_id":"p1", "n": 1.50, "u": "\\u00e9" }'
    before = len(env.upstream.seen)
    resp = await one(env.port, post("/appointments", body))
    assert resp.status == 201
    assert env.upstream.seen[before].body == body


# ------------------------------------------------------------------ hop-by-hop and spoofing


async def test_connection_listed_credential_is_used_then_not_forwarded(env: Env) -> None:
    for conn in ("X-API-Key", "close, X-API-Key, Authorization", "x-api-key"):
        before = len(env.upstream.seen)
        raw = request("GET", "/appointments",
                      [RECEPTIONIST, ("Connection", conn), ("X-Request-Id", f"conn-{conn}")],
                      close=False)
        resp = await one(env.port, raw)
        assert resp.status == 200, resp.body  # authenticated: not stripped before auth
        (seen,) = env.upstream.seen[before:]
        assert "X-API-Key" not in seen.headers and "Connection" not in seen.headers
    decisions = [r for r in audit_rows(env.audit)
                 if str(r["request_id"]).startswith("conn-") and r["kind"] == "decision"]
    assert decisions and all(r["actor"] not in (None, "anonymous") for r in decisions)


async def test_connection_listed_idempotency_key_still_counts(env: Env) -> None:
    before = len(env.upstream.seen)
    raw = request("POST", "/appointments", [RECEPTIONIST, JSON, ("Idempotency-Key", "hop-1"),
                                            ("Connection", "Idempotency-Key")], APPT)
    first, second = await one(env.port, raw), await one(env.port, raw)
    assert (first.status, second.status) == (201, 201)
    assert second.headers["Idempotent-Replayed"] == "true"
    assert len(env.upstream.seen) == before + 1


async def test_underscore_spellings_of_dropped_headers_are_dropped(env: Env) -> None:
    before = len(env.upstream.seen)
    resp = await one(env.port, get("/appointments", ("X_API_Key", "demo-doctor"),
                                   ("X_Casf_Role", "doctor"), ("X-Casf-Role", "doctor"),
                                   ("X_Casf_Actor", "someone"), ("Keep_Alive", "1"),
                                   ("Transfer_Encoding", "chunked")))
    assert resp.status == 200
    (seen,) = env.upstream.seen[before:]
    names = {k.lower().replace("_", "-") for k in seen.headers}
    for dropped in ("x-api-key", "x-casf-role", "x-casf-actor", "keep-alive",
                    "transfer-encoding"):
        assert dropped not in names, seen.headers


async def test_client_forwarding_claims_are_replaced(env: Env) -> None:
    before = len(env.upstream.seen)
    resp = await one(env.port, get(
        "/appointments", ("Forwarded", "for=10.0.0.1;proto=https;host=admin"),
        ("X-Real-IP", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.1"),
        ("X-Forwarded-Host", "admin.internal"), ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"), ("X-Forwarded-Prefix", "/admin"),
        ("X-Client-IP", "10.0.0.1"), ("True-Client-IP", "10.0.0.1"),
        ("Proxy-Authorization", "Basic eDp5"), ("TE", "trailers"),
        ("X-Request-Id", "spoof-1")))
    assert resp.status == 200
    (seen,) = env.upstream.seen[before:]
    h = seen.headers
    for name in ("Forwarded", "X-Real-IP", "X-Forwarded-Port", "X-Forwarded-Prefix",
                 "X-Client-IP", "True-Client-IP", "Proxy-Authorization", "TE"):
        assert name not in h, name
    # an Upgrade is refused, not dropped (tests/test_websocket.py)
    # the proxy's own entry is last: an upstream trusting its nearest hop sees the peer
    assert h["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert h["X-Forwarded-Host"] == "proxy.test" and h["X-Forwarded-Proto"] == "http"
    assert h["X-Request-Id"] == "spoof-1"


async def test_header_attribute_cannot_be_doubled(env: Env) -> None:
    before = len(env.upstream.seen)
    ok = await one(env.port, get("/appointments", ("X-Tenant", "t1")))
    foreign = await one(env.port, get("/appointments", ("X-Tenant", "t2")))
    doubled = await one(env.port, get("/appointments", ("X-Tenant", "t1"), ("X-Tenant", "t2")))
    underscored = await one(env.port, get("/appointments", ("X-Tenant", "t1"),
                                          ("X_Tenant", "t2")))
    assert ok.status == 200
    assert foreign.status == 403 and "Tenant_Mismatch" in foreign.reasons
    for resp in (doubled, underscored):
        assert resp.status == 400 and AMBIGUOUS in resp.reasons
    assert len(env.upstream.seen) == before + 1


# ------------------------------------------------------------------ parser refusals


@pytest.mark.parametrize("raw,status,reason", [
    (b"POST /appointments HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400, PARSER),
    (get("/appointments", *[(f"X-H{i}", "v") for i in range(200)]), 431,
     "Request_HeadersTooLarge"),
])
async def test_parser_refusals_are_audited(env: Env, raw: bytes, status: int,
                                           reason: str) -> None:
    before = len(env.upstream.seen)
    got = await exchange(env.port, raw, timeout=5)
    assert got and got[0].status == status and got[0].reasons == [reason]
    request_id = got[0].envelope()["request_id"]
    assert request_id
    await env.proxy.rt.pipeline.flush()
    records = [r for r in audit_rows(env.audit) if r["request_id"] == request_id]
    assert len(records) == 1, records
    (rec,) = records
    assert (rec["kind"], rec["decision"], rec["status"]) == ("decision", "DENY", status)
    assert reason in rec["reason_codes"] and rec["trace_id"] == got[0].envelope()["trace_id"]
    assert rec["method"] == "" and rec["route"] is None and rec["actor"] is None
    assert len(env.upstream.seen) == before


# ------------------------------------------------------------------ slow heads


async def test_slowloris_head_is_cut_at_the_header_timeout(env: Env) -> None:
    raw = get("/appointments")
    pieces = [raw[i:i + 1] for i in range(len(raw))]  # one byte every 50 ms: ~5 s
    before = len(env.upstream.seen)
    started = time.monotonic()
    got = await exchange(env.port, pieces, pause=0.05, timeout=10)
    elapsed = time.monotonic() - started
    assert got == []  # closed, nothing decided, nothing forwarded
    assert HEADER_TIMEOUT_MS / 1000 - 0.1 < elapsed < HEADER_TIMEOUT_MS / 1000 + 1.5, elapsed
    assert len(env.upstream.seen) == before


async def test_head_that_never_ends_is_cut(env: Env) -> None:
    started = time.monotonic()
    got = await exchange(env.port, b"GET /appointments HTTP/1.1\r\nHost: x\r\n", timeout=10)
    assert got == []
    assert time.monotonic() - started < HEADER_TIMEOUT_MS / 1000 + 1.5


async def test_head_sent_in_pieces_within_the_timeout_is_served(env: Env) -> None:
    raw = get("/appointments")
    third = len(raw) // 3
    got = await exchange(env.port, [raw[:third], raw[third:2 * third], raw[2 * third:]],
                         pause=0.05, timeout=5)  # well within the 800 ms
    assert got and got[0].status == 200


async def test_idle_keep_alive_is_not_a_slow_head(env: Env) -> None:
    """The timer starts with a request's first byte, not when the connection idles."""
    first = request("GET", "/appointments", [RECEPTIONIST], close=False)
    second = request("GET", "/appointments", [RECEPTIONIST])
    got = await exchange(env.port, [first, second], pause=HEADER_TIMEOUT_MS / 1000 + 0.5,
                         count=2, timeout=10)
    assert [r.status for r in got] == [200, 200]


# ------------------------------------------------------------------ slow bodies


async def test_slowloris_body_is_cut_at_the_read_timeout(env: Env) -> None:
    head = request("POST", "/appointments", [RECEPTIONIST, JSON, rid(),
                                             ("Content-Length", "400")], length=False,
                   close=False)
    pieces = [head] + [b" "] * 200  # one byte every 50 ms: would take 10 s
    before = len(env.upstream.seen)
    started = time.monotonic()
    got = await exchange(env.port, pieces, pause=0.05, timeout=10)
    elapsed = time.monotonic() - started
    assert got and got[0].status == 408 and "BadRequest_BodyTimeout" in got[0].reasons
    assert elapsed < BODY_TIMEOUT_MS / 1000 + 1.5, elapsed
    assert len(env.upstream.seen) == before


async def test_slow_chunked_body_is_cut_too(env: Env) -> None:
    head = request("POST", "/appointments", [RECEPTIONIST, JSON, rid(), CHUNKED], length=False,
                   close=False)
    pieces = [head] + [b"1\r\n \r\n"] * 200
    before = len(env.upstream.seen)
    started = time.monotonic()
    got = await exchange(env.port, pieces, pause=0.05, timeout=10)
    assert got and got[0].status == 408
    assert time.monotonic() - started < BODY_TIMEOUT_MS / 1000 + 1.5
    assert len(env.upstream.seen) == before


async def test_body_that_never_ends_times_out(env: Env) -> None:
    raw = request("POST", "/appointments", [RECEPTIONIST, JSON, rid(),
                                            ("Content-Length", "100")], length=False,
                  close=False) + b'{"patient_id":'
    before = len(env.upstream.seen)
    got = await exchange(env.port, raw, timeout=5)
    assert got and got[0].status == 408
    assert len(env.upstream.seen) == before


async def test_oversized_content_length_is_refused_before_the_body(env: Env) -> None:
    raw = request("POST", "/appointments", [RECEPTIONIST, JSON, rid(),
                                            ("Content-Length", "10000000")], length=False,
                  close=False)
    got = await exchange(env.port, raw, timeout=3)  # no body sent at all
    assert got and got[0].status == 413 and got[0].headers.get("Connection") == "close"


# ------------------------------------------------------------------ many connections


async def test_wide_json_is_handled_quickly(env: Env) -> None:
    body = json.dumps({"patient_id": "p1", **{f"k{i}": i for i in range(4000)}}).encode()
    assert len(body) < 65536
    started = time.monotonic()
    resp = await one(env.port, post("/appointments", body))
    assert resp.status == 201 and time.monotonic() - started < 2


async def test_every_refusal_is_audited_and_nothing_else_forwarded(env: Env) -> None:
    """Across the module: each forwarded request had its ALLOW decision committed
    first (checked by the upstream as it arrived), and the chain has only
    decisions for requests the pipeline saw (parser errors are not requests)."""
    assert env.upstream.checked == len(env.upstream.seen) > 0
    assert env.upstream.violations == []
    rows = audit_rows(env.audit)
    allowed = {r["request_id"] for r in rows if r["kind"] == "decision"
               and r["decision"] == "ALLOW"}
    forwarded = {s.headers["X-Request-Id"] for s in env.upstream.seen}
    assert forwarded <= allowed
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))


# ------------------------------------------------------------------ the audit writer


async def test_unserialisable_record_fails_one_request_not_the_writer(tmp_path: Path) -> None:
    sink = SqliteAuditSink(tmp_path / "a.db", "c", timeout_s=2)
    await sink.start()
    nested: Any = "x"
    for _ in range(300):  # deeper than canonical JSON can write
        nested = [nested]
    first = await sink.append({"event_id": "ok-1", "kind": "decision"})
    with pytest.raises(AuditUnavailable):
        await sink.append({"event_id": "bad", "kind": "decision", "attrs": {"x": nested}})
    results = await asyncio.gather(
        sink.append({"event_id": "ok-2", "kind": "decision"}),
        sink.append({"event_id": "bad-2", "kind": "decision", "attrs": {"x": nested}}),
        sink.append({"event_id": "ok-3", "kind": "decision"}), return_exceptions=True)
    assert isinstance(results[1], AuditUnavailable)
    assert await sink.healthy()
    await asyncio.wait_for(sink.close(), 5)  # did hang before the fix
    rows = audit_rows(tmp_path / "a.db")
    assert [r["event_id"] for r in rows] == ["ok-1", "ok-2", "ok-3"]
    assert [r["seq"] for r in rows] == [1, 2, 3] and first.seq == 1


async def test_deep_value_cannot_take_the_audit_down(env: Env) -> None:
    """The DoS found here: one deep body used to kill the audit writer (503 for all)."""
    for depth in (100, 300, 1000):
        deny = await one(env.port, post("/appointments", b'{"patient_id":'
                                        + deep(depth, b'"p1"') + b"}"))
        assert deny.status == 400 and BAD_JSON in deny.reasons
    assert (await one(env.port, post("/appointments", APPT))).status == 201
