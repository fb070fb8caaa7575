"""Every status and reason code reachable on embedded defaults, over real sockets.

Each deny also asserts that the upstream received nothing.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.waiting import wait_until

Patch = Any


def body(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(raw)
    return doc


def assert_envelope(raw: bytes, status: int, *codes: str, decision: str = "DENY") -> dict[str, Any]:
    env = body(raw)
    fields = {"decision", "status", "reason_codes", "message", "tool", "request_id",
              "trace_id", "policy_hash"}
    if status in (429, 503):  # these answers carry Retry-After, mirrored in the envelope
        fields.add("retry_after")
        assert isinstance(env["retry_after"], int) and env["retry_after"] >= 1
    if decision == "NEEDS_APPROVAL" and "approval" in env:  # where approvals are enabled
        fields.add("approval")
        assert env["approval"]["id"].startswith("apr_") and env["approval"]["status"]
    assert set(env) == fields
    assert env["decision"] == decision
    assert env["status"] == status
    for code in codes:
        assert code in env["reason_codes"], env
    assert env["policy_hash"].startswith("sha256:")
    return env


# (name, method, path, key, json body, extra headers, rid, status, codes)
DENIES = [
    ("unmapped path", "GET", "/admin", "receptionist", None, {}, None, 403, ["Route_NotMapped"]),
    ("unmapped method", "PUT", "/appointments", "receptionist", None, {}, None, 403,
     ["Route_NotMapped"]),
    ("trailing slash is another path", "GET", "/appointments/", "receptionist", None, {}, None,
     403, ["Route_NotMapped"]),
    ("case-sensitive", "GET", "/Appointments", "receptionist", None, {}, None, 403,
     ["Route_NotMapped"]),
    ("dot-dot escapes route", "GET", "/patients/p1/history/../../admin", "doctor", None, {}, None,
     403, ["Route_NotMapped"]),
    ("encoded dot segment", "GET", "/patients/%2e%2e/history", "doctor", None, {}, None, 400,
     ["BadRequest_MalformedPath"]),
    ("encoded slash", "GET", "/patients/p1%2fx/history", "doctor", None, {}, None, 400,
     ["BadRequest_MalformedPath"]),
    ("encoded NUL", "GET", "/patients/p1%00/history", "doctor", None, {}, None, 400,
     ["BadRequest_MalformedPath"]),
    ("path parameter", "GET", "/appointments;jsessionid=1", "receptionist", None, {}, None, 400,
     ["BadRequest_MalformedPath"]),
    ("overlong utf-8", "GET", "/patients/%C0%AE%C0%AE/history", "doctor", None, {}, None, 400,
     ["BadRequest_MalformedPath"]),
    ("method override", "GET", "/appointments", "receptionist", None,
     {"X-HTTP-Method-Override": "DELETE"}, None, 400, ["BadRequest_Ambiguous"]),
    ("repeated query attribute", "GET", "/appointments?patient_id=p1&patient_id=p2",
     "receptionist", None, {}, None, 400, ["BadRequest_Ambiguous"]),
    ("no credentials", "GET", "/appointments", None, None, {}, None, 401, ["Auth_Missing"]),
    ("no credentials on a write", "POST", "/appointments", None, {"patient_id": "p1"}, {},
     "w-401", 401, ["Auth_Missing"]),
    ("unknown key", "GET", "/appointments", "demo-nobody", None, {}, None, 401, ["Auth_Invalid"]),
    ("missing request id", "POST", "/appointments", "receptionist",
     {"patient_id": "p1", "slot": "s"}, {}, None, 400, ["BadRequest_MissingRequestId"]),
    ("request id too long", "POST", "/appointments", "receptionist",
     {"patient_id": "p1", "slot": "s"}, {}, "x" * 256, 400, ["BadRequest_InvalidRequestId"]),
    ("missing patient", "POST", "/appointments", "receptionist", {"slot": "s"}, {}, "r-1", 400,
     ["BadRequest_MissingPatientId"]),
    ("empty patient", "POST", "/sms", "receptionist", {"patient_id": "", "message": "m"}, {},
     "r-2", 400, ["BadRequest_MissingPatientId"]),
    ("role not permitted (policy)", "POST", "/invoices", "nurse",
     {"patient_id": "p1", "amount_cents": 100}, {}, "r-3", 403, ["Role_NotPermitted"]),
    ("history needs clinical role", "GET", "/patients/p1/history", "receptionist", None, {},
     None, 403, ["Role_NotPermitted"]),
]


@pytest.mark.parametrize(("name", "method", "path", "key", "payload", "headers", "rid",
                          "status", "codes"), DENIES, ids=[d[0] for d in DENIES])
async def test_deny_table(proxy: Proxy, name: str, method: str, path: str, key: str | None,
                          payload: Any, headers: dict[str, str], rid: str | None, status: int,
                          codes: list[str]) -> None:
    got, hdrs, raw = await proxy.call(method, path, key=key, json=payload, headers=headers,
                                      rid=rid)
    assert got == status, raw
    env = assert_envelope(raw, status, *codes)
    assert hdrs["Content-Type"].startswith("application/json")
    assert hdrs["X-Casf-Trace-Id"] == env["trace_id"]
    assert proxy.upstream.seen == []
    if status == 401:
        assert "WWW-Authenticate" in hdrs
    if rid is not None and len(rid) <= 255:
        assert env["request_id"] == rid  # the caller's id, whichever stage denied


ALLOWS = [
    ("list appointments", "GET", "/appointments", "receptionist", None, None, 200),
    ("list with patient filter", "GET", "/appointments?patient_id=p1", "nurse", None, None, 200),
    ("history by doctor", "GET", "/patients/p1/history", "doctor", None, None, 200),
    ("create appointment", "POST", "/appointments", "receptionist",
     {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}, "c-1", 201),
    ("cancel appointment", "DELETE", "/appointments/a-1", "doctor", None, "d-1", 200),
    ("send sms", "POST", "/sms", "nurse", {"patient_id": "p9", "message": "hello"}, "s-1", 201),
    ("invoice by billing", "POST", "/invoices", "billing",
     {"patient_id": "p1", "amount_cents": 1200}, "i-1", 201),
    ("dot segments normalised", "GET", "/patients/./p1//history", "doctor", None, None, 200),
]


@pytest.mark.parametrize(("name", "method", "path", "key", "payload", "rid", "status"), ALLOWS,
                         ids=[a[0] for a in ALLOWS])
async def test_allow_table(proxy: Proxy, name: str, method: str, path: str, key: str,
                           payload: Any, rid: str | None, status: int) -> None:
    got, hdrs, raw = await proxy.call(method, path, key=key, json=payload, rid=rid)
    assert got == status, raw
    assert len(proxy.upstream.seen) == 1
    seen = proxy.upstream.seen[0]
    assert seen.method == method
    # the upstream sees the normalised path the policy decided on
    assert "//" not in seen.path_qs and "/./" not in seen.path_qs
    assert "X-API-Key" not in seen.headers
    assert seen.headers["X-Forwarded-For"] == "127.0.0.1"
    assert "traceparent" in seen.headers
    assert hdrs["X-Casf-Trace-Id"]


async def test_body_over_limit_is_413_without_reaching_upstream(proxy: Proxy) -> None:
    big = {"patient_id": "p1", "slot": "s", "notes": "x" * 70_000}
    status, _, raw = await proxy.call("POST", "/appointments", json=big, rid="big-1")
    assert status == 413
    assert_envelope(raw, 413, "Request_TooLarge")
    assert proxy.upstream.seen == []


async def test_chunked_body_over_limit_is_413(proxy: Proxy) -> None:
    async def gen() -> Any:
        for _ in range(20):
            yield b"x" * 8192

    async with proxy.session.post(proxy.url + "/appointments", data=gen(),
                                  headers={"X-API-Key": "demo-receptionist",
                                           "Idempotency-Key": "chunk-1"}) as resp:
        assert resp.status == 413
    assert proxy.upstream.seen == []


async def test_invalid_json_is_400(proxy: Proxy) -> None:
    status, _, raw = await proxy.call("POST", "/appointments", data=b"{not json",
                                      headers={"Content-Type": "application/json"}, rid="j-1")
    assert status == 400
    assert_envelope(raw, 400, "BadRequest_InvalidJson")
    assert proxy.upstream.seen == []


async def test_slow_body_times_out(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["limits"]["body_read_timeout_ms"] = 300

    async with make_proxy(patch) as p:
        reader, writer = await asyncio.open_connection("127.0.0.1", p.serving.traffic_port)
        writer.write(b"POST /appointments HTTP/1.1\r\nHost: x\r\nX-API-Key: demo-receptionist\r\n"
                     b"Idempotency-Key: slow-1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"patient_id\":")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 408"), head
        assert b"BadRequest_BodyTimeout" in head
        assert p.upstream.seen == []


# ------------------------------------------------------------ anti-replay


async def test_replay_returns_stored_outcome(proxy: Proxy) -> None:
    payload = {"patient_id": "p1", "slot": "s1"}
    s1, h1, b1 = await proxy.call("POST", "/appointments", json=payload, rid="rep-1")
    s2, h2, b2 = await proxy.call("POST", "/appointments", json=payload, rid="rep-1")
    assert (s1, s2) == (201, 201)
    assert b1 == b2
    assert h2["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in h1
    assert "Set-Cookie" not in h2  # only safe headers are stored
    assert h2["ETag"] == h1["ETag"]
    assert len(proxy.upstream.seen) == 1


async def test_same_key_other_payload_is_409_mismatch(proxy: Proxy) -> None:
    await proxy.call("POST", "/appointments", json={"patient_id": "p1", "slot": "a"}, rid="mm")
    status, _, raw = await proxy.call("POST", "/appointments",
                                      json={"patient_id": "p1", "slot": "b"}, rid="mm")
    assert status == 409
    assert_envelope(raw, 409, "Inv_ReplayPayloadMismatch")
    assert len(proxy.upstream.seen) == 1


async def test_key_order_does_not_change_fingerprint(proxy: Proxy) -> None:
    a = b'{"patient_id": "p1", "slot": "a"}'
    b = b'{"slot":"a","patient_id":"p1"}'
    h = {"Content-Type": "application/json"}
    s1, _, _ = await proxy.call("POST", "/appointments", data=a, headers=h, rid="order")
    s2, h2, _ = await proxy.call("POST", "/appointments", data=b, headers=h, rid="order")
    assert (s1, s2) == (201, 201)
    assert h2.get("Idempotent-Replayed") == "true"


async def test_keys_are_scoped_by_principal(proxy: Proxy) -> None:
    payload = {"patient_id": "p1", "slot": "a"}
    s1, _, _ = await proxy.call("POST", "/appointments", json=payload, rid="shared")
    s2, h2, _ = await proxy.call("POST", "/appointments", key="doctor", json=payload,
                                 rid="shared")
    assert (s1, s2) == (201, 201)
    assert "Idempotent-Replayed" not in h2
    assert len(proxy.upstream.seen) == 2


async def test_concurrent_same_key_is_409_in_flight(proxy: Proxy) -> None:
    held = proxy.upstream.hold_next()
    payload = {"patient_id": "p1", "slot": "a"}
    first = asyncio.ensure_future(proxy.call("POST", "/appointments", json=payload, rid="cc"))
    await held.wait_arrived()  # the first is in flight, and stays so until released
    status, _, raw = await proxy.call("POST", "/appointments", json=payload, rid="cc")
    assert status == 409
    assert_envelope(raw, 409, "Inv_ReplayConcurrent")
    held.release()
    assert (await first)[0] == 201
    assert len(proxy.upstream.seen) == 1


async def test_fifty_concurrent_same_key_reach_upstream_once(proxy: Proxy) -> None:
    proxy.upstream.delay_s = 0.05
    payload = {"patient_id": "p1", "slot": "a"}
    results = await asyncio.gather(*(proxy.call("POST", "/appointments", json=payload,
                                                rid="fifty") for _ in range(50)))
    statuses = [r[0] for r in results]
    assert len(proxy.upstream.seen) == 1
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}


async def test_denied_request_releases_claim(proxy: Proxy) -> None:
    payload = {"patient_id": "p1", "amount_cents": 5}
    status, _, _ = await proxy.call("POST", "/invoices", key="billing", json=payload,
                                    rid="rel", headers={"X-HTTP-Method-Override": "PUT"})
    assert status == 400
    await proxy.set_mode("READ_ONLY")
    status, _, _ = await proxy.call("POST", "/invoices", key="billing", json=payload, rid="rel")
    assert status == 403
    await proxy.set_mode("ALLOW")
    status, hdrs, _ = await proxy.call("POST", "/invoices", key="billing", json=payload,
                                       rid="rel")
    assert status == 201
    assert "Idempotent-Replayed" not in hdrs
    assert len(proxy.upstream.seen) == 1


async def test_upstream_5xx_is_stored_and_replayed(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append({"method": "POST", "path": "/status/{code}", "tool": "t.status",
                            "effect": "write"})
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        s1, _, _ = await p.call("POST", "/status/500", rid="five")
        s2, h2, _ = await p.call("POST", "/status/500", rid="five")
        assert (s1, s2) == (500, 500)
        assert h2["Idempotent-Replayed"] == "true"
        assert len(p.upstream.seen) == 1


async def test_large_outcome_replays_without_body(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["replay"]["max_stored_body_bytes"] = 1000
        d["routes"].append({"method": "POST", "path": "/big", "tool": "t.big", "effect": "write"})
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        s1, _, b1 = await p.call("POST", "/big", rid="big")
        s2, h2, b2 = await p.call("POST", "/big", rid="big")
        assert (s1, s2) == (200, 200)
        assert len(b1) == 200_000
        assert b2 == b""
        assert h2["X-Casf-Replay-Body"] == "omitted"
        assert len(p.upstream.seen) == 1


# ------------------------------------------------------------ modes


async def test_read_only_denies_writes_allows_reads(proxy: Proxy) -> None:
    await proxy.set_mode("READ_ONLY")
    status, _, raw = await proxy.call("POST", "/appointments",
                                      json={"patient_id": "p1", "slot": "a"}, rid="ro")
    assert status == 403
    assert_envelope(raw, 403, "Mode_ReadOnly_NoWrite")
    assert proxy.upstream.seen == []
    status, _, _ = await proxy.call("GET", "/appointments")
    assert status == 200


async def test_kill_switch_denies_everything(proxy: Proxy) -> None:
    await proxy.set_mode("KILL_SWITCH")
    status, _, raw = await proxy.call("GET", "/appointments")
    assert status == 403
    assert_envelope(raw, 403, "Mode_KillSwitch")
    assert proxy.upstream.seen == []


async def test_kill_switch_exempt_route(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"][0]["allow_in_kill_switch"] = True
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        await p.set_mode("KILL_SWITCH")
        assert (await p.call("GET", "/appointments"))[0] == 200
        assert (await p.call("GET", "/patients/p1/history"))[0] == 403


async def test_step_up_needs_approval_for_writes(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    status, _, raw = await proxy.call("POST", "/appointments",
                                      json={"patient_id": "p1", "slot": "a"}, rid="su")
    assert status == 403
    assert_envelope(raw, 403, "Approval_Required", decision="NEEDS_APPROVAL")
    assert proxy.upstream.seen == []
    assert (await proxy.call("GET", "/appointments"))[0] == 200


async def test_mode_is_not_chosen_by_caller(proxy: Proxy) -> None:
    await proxy.set_mode("READ_ONLY")
    status, _, _ = await proxy.call("POST", "/appointments",
                                    json={"patient_id": "p1", "slot": "a", "mode": "ALLOW"},
                                    headers={"X-Casf-Mode": "ALLOW"}, rid="mode")
    assert status == 403


async def test_admin_api_requires_token(proxy: Proxy) -> None:
    async with proxy.session.put(proxy.admin + "/admin/mode", json={"mode": "KILL_SWITCH"},
                                 headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401
    async with proxy.session.get(proxy.admin + "/admin/mode") as r:
        assert r.status == 401
    async with proxy.session.put(proxy.admin + "/admin/mode", json={"mode": "SIDEWAYS"},
                                 headers={"Authorization": "Bearer test-admin-token"}) as r:
        assert r.status == 400
    assert proxy.rt.mode.current().value == "ALLOW"


async def test_admin_mode_change_validates_its_request_id(proxy: Proxy, tmp_path: Path) -> None:
    auth = {"Authorization": "Bearer test-admin-token"}

    async def put(mode: str, headers: Any) -> tuple[int, bytes]:
        async with proxy.session.put(proxy.admin + "/admin/mode", json={"mode": mode},
                                     headers=headers) as r:
            return r.status, await r.read()

    for bad in ({**auth, "X-Request-Id": "x" * 256}, {**auth, "X-Request-Id": "a\tb"},
                [*auth.items(), ("X-Request-Id", "one"), ("X-Request-Id", "two")]):
        status, raw = await put("READ_ONLY", bad)
        assert status == 400
        env = assert_envelope(raw, 400, "BadRequest_InvalidRequestId")
        assert env["tool"] == "casf.admin.set_mode" and env["request_id"] is None
    assert proxy.rt.mode.current().value == "ALLOW"
    assert (await put("READ_ONLY", {**auth, "X-Request-Id": "change-42"}))[0] == 200
    assert (await put("ALLOW", auth))[0] == 200
    conn = sqlite3.connect(tmp_path / "audit.db")
    ids = [row[0] for row in conn.execute(
        "SELECT request_id FROM audit_events WHERE tool = 'casf.admin.set_mode' ORDER BY seq")]
    conn.close()
    assert len(ids) == 2 and ids[0] == "change-42"
    assert ids[1] and ids[1] != "change-42"  # absent: generated


async def test_admin_api_disabled_without_token(make_proxy: Any) -> None:
    async with make_proxy(CASF_ADMIN_TOKEN="") as p:
        async with p.session.put(p.admin + "/admin/mode", json={"mode": "READ_ONLY"}) as r:
            assert r.status == 404


# ------------------------------------------------------------ tenant, rate limit


async def test_tenant_mismatch(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        route = d["routes"][3]  # GET /patients/{patient_id}/history
        route["attributes"]["context.resource_tenant"] = {"from": "query", "name": "tenant"}
        route["resource_tenant"] = "context.resource_tenant"

    async with make_proxy(patch) as p:
        status, _, raw = await p.call("GET", "/patients/p1/history?tenant=t2", key="doctor")
        assert status == 403
        assert_envelope(raw, 403, "Tenant_Mismatch")
        assert p.upstream.seen == []
        assert (await p.call("GET", "/patients/p1/history?tenant=t1", key="doctor"))[0] == 200


async def test_tenant_mismatch_through_path(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append({
            "method": "GET", "path": "/tenants/{tenant_id}/appointments",
            "tool": "cliniccloud.list_tenant_appointments", "effect": "read",
            "attributes": {"context.resource_tenant": {"from": "path", "name": "tenant_id"}},
            "resource_tenant": "context.resource_tenant"})
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        _, _, raw = await p.call("GET", "/tenants/t1/appointments", key="t2-receptionist")
        assert_envelope(raw, 403, "Tenant_Mismatch")
        assert p.upstream.seen == []
        assert (await p.call("GET", "/tenants/t2/appointments", key="t2-receptionist"))[0] == 200
        assert p.upstream.paths() == ["/tenants/t2/appointments"]


async def test_tenant_mismatch_through_body_in_the_clinic_example(proxy: Proxy) -> None:
    # examples/clinic/casf.yaml: POST /appointments reads the optional body field tenant_id
    appt = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z", "tenant_id": "t1"}
    status, _, raw = await proxy.call("POST", "/appointments", key="t2-receptionist", json=appt,
                                      rid="tm-1")
    assert status == 403
    assert_envelope(raw, 403, "Tenant_Mismatch")
    assert proxy.upstream.seen == []
    assert (await proxy.call("POST", "/appointments", json=appt, rid="tm-2"))[0] == 201


async def test_sms_rate_limit(proxy: Proxy) -> None:
    sms = {"patient_id": "p1", "message": "reminder"}
    assert (await proxy.call("POST", "/sms", json=sms, rid="sms-1"))[0] == 201
    status, hdrs, raw = await proxy.call("POST", "/sms", json=sms, rid="sms-2")
    assert status == 429
    assert_envelope(raw, 429, "RateLimit_Exceeded")
    assert 3590 <= int(hdrs["Retry-After"]) <= 3600
    other = {"patient_id": "p2", "message": "reminder"}
    assert (await proxy.call("POST", "/sms", json=other, rid="sms-3"))[0] == 201
    assert len(proxy.upstream.seen) == 2


async def test_rate_limit_exact_under_concurrency(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["rate_limits"] = [{"name": "five", "tools": ["cliniccloud.create_appointment"],
                             "key": "{principal.id}", "limit": 5, "window_seconds": 60}]

    async with make_proxy(patch) as p:
        results = await asyncio.gather(*(
            p.call("POST", "/appointments", json={"patient_id": "p1", "slot": str(i)},
                   rid=f"rl-{i}") for i in range(200)))
        statuses = [r[0] for r in results]
        assert statuses.count(201) == 5
        assert statuses.count(429) == 195
        assert len(p.upstream.seen) == 5


# ------------------------------------------------------------ policy failure modes


@pytest.mark.parametrize(("fixture", "code"), [("bad_result", "Policy_BadResult"),
                                               ("eval_error", "Policy_EvalError"),
                                               ("deny_silent", "Policy_Denied")])
async def test_broken_policy_denies(make_proxy: Any, fixture: str, code: str) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / fixture)

    async with make_proxy(patch) as p:
        for method, path, payload, rid in (("GET", "/appointments", None, None),
                                           ("POST", "/appointments",
                                            {"patient_id": "p1", "slot": "a"}, "pb")):
            status, _, raw = await p.call(method, path, json=payload, rid=rid)
            assert status == 403
            assert_envelope(raw, 403, code)
        assert p.upstream.seen == []


# ------------------------------------------------------------ shadow mode, passthrough


async def test_shadow_mode_forwards_and_records(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"][5]["enforce"] = False  # POST /invoices

    async with make_proxy(patch) as p:
        status, _, _ = await p.call("POST", "/invoices", key="nurse",
                                    json={"patient_id": "p1", "amount_cents": 1}, rid="sh")
        assert status == 201
        assert len(p.upstream.seen) == 1
        assert "casf_shadow_denied_total 1.0" in await p.metrics()
        # other routes still enforce
        assert (await p.call("POST", "/appointments", key="nurse",
                             json={"patient_id": "p1", "slot": "a"}, rid="sh2"))[0] == 403


async def test_passthrough_prefix(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["unmatched"]["passthrough"] = ["/public/"]

    async with make_proxy(patch) as p:
        assert (await p.call("GET", "/public/logo.png", key=None))[0] == 200
        assert (await p.call("GET", "/publicx", key=None))[0] == 403
        assert p.upstream.paths() == ["/public/logo.png"]


async def test_passthrough_forwards_only_safe_methods(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["unmatched"]["passthrough"] = ["/public/"]

    async with make_proxy(patch) as p:
        for method in ("GET", "HEAD", "OPTIONS"):
            assert (await p.call(method, "/public/logo.png", key=None))[0] == 200, method
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            status, _, raw = await p.call(method, "/public/logo.png", key=None,
                                          json={"x": 1}, rid="pt")
            assert status == 403, method
            assert_envelope(raw, 403, "Route_NotMapped")
        assert [s.method for s in p.upstream.seen] == ["GET", "HEAD", "OPTIONS"]


async def test_shadow_mode_anonymous_callers_never_share_replay_keys(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"][5]["enforce"] = False  # POST /invoices

    async with make_proxy(patch) as p:
        invoice = {"patient_id": "p1", "amount_cents": 1}
        # two unauthenticated callers, one key, one payload: no stored outcome is shared
        s1, _, b1 = await p.call("POST", "/invoices", key=None, json=invoice, rid="anon")
        s2, h2, b2 = await p.call("POST", "/invoices", key=None, json=invoice, rid="anon")
        assert (s1, s2) == (201, 201)
        assert "Idempotent-Replayed" not in h2 and b1 != b2
        # nor can one block another's key while its request is in flight
        held = p.upstream.hold_next()
        first = asyncio.ensure_future(p.call("POST", "/invoices", key=None, json=invoice,
                                             rid="anon-2"))
        await held.wait_arrived()
        status, _, _ = await p.call("POST", "/invoices", key=None,
                                    json={**invoice, "amount_cents": 2}, rid="anon-2")
        assert status == 201 and not first.done()  # answered while the first is held
        held.release()
        assert (await first)[0] == 201
        assert len(p.upstream.seen) == 4
        # an authenticated caller on the same shadow route keeps its anti-replay
        s5, _, _ = await p.call("POST", "/invoices", key="billing", json=invoice, rid="anon")
        s6, h6, _ = await p.call("POST", "/invoices", key="billing", json=invoice, rid="anon")
        assert (s5, s6) == (201, 201) and h6["Idempotent-Replayed"] == "true"
        assert len(p.upstream.seen) == 5


# ------------------------------------------------------------ forwarding


async def test_upstream_down_is_502_and_releases_claim(make_proxy: Any, upstream: Any) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]

    def patch(d: dict[str, Any]) -> None:
        d["upstream"]["url"] = f"http://127.0.0.1:{dead}"

    async with make_proxy(patch) as p:
        payload = {"patient_id": "p1", "slot": "a"}
        status, _, raw = await p.call("POST", "/appointments", json=payload, rid="down")
        assert status == 502
        assert_envelope(raw, 502, "Upstream_Unavailable")
        # the claim was released: the same key is evaluated afresh, not 409
        status, _, raw = await p.call("POST", "/appointments", json=payload, rid="down")
        assert status == 502


async def test_upstream_timeout_is_504(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["upstream"]["timeout_ms"] = 200

    async with make_proxy(patch) as p:
        held = p.upstream.hold_next()  # answers only after the proxy gave up
        status, _, raw = await p.call("GET", "/appointments")
        assert held.request is not None and not held.released.is_set()
        assert status == 504
        assert_envelope(raw, 504, "Upstream_Timeout")


async def test_traceparent_propagated_and_used(proxy: Proxy) -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    status, hdrs, _ = await proxy.call("GET", "/appointments", headers={"traceparent": tp})
    assert status == 200
    assert hdrs["X-Casf-Trace-Id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    # same trace and flags; the proxy is a span of its own: a new parent id
    sent = proxy.upstream.seen[0].headers["traceparent"].split("-")
    assert sent[:2] == ["00", "4bf92f3577b34da6a3ce929d0e0e4736"] and sent[3] == "01"
    assert len(sent[2]) == 16 and sent[2] not in ("00f067aa0ba902b7", "0" * 16)
    status, hdrs, raw = await proxy.call("GET", "/nope", headers={"traceparent": tp})
    assert body(raw)["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


async def test_hop_by_hop_and_credentials_stripped(proxy: Proxy) -> None:
    status, _, _ = await proxy.call("GET", "/appointments",
                                    headers={"Connection": "keep-alive, X-Custom",
                                             "X-Custom": "drop-me", "X-Keep": "yes",
                                             "TE": "trailers"})
    assert status == 200
    seen = proxy.upstream.seen[0].headers
    assert "X-Custom" not in seen and "TE" not in seen and "X-API-Key" not in seen
    assert seen["X-Keep"] == "yes"
    assert seen["X-Forwarded-Proto"] == "http"


async def test_server_sent_events_stream_unbuffered(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append({"method": "GET", "path": "/events", "tool": "t.events",
                            "effect": "read"})
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        async with p.session.get(p.url + "/events",
                                 headers={"X-API-Key": "demo-nurse"}) as resp:
            assert resp.status == 200
            # the upstream sends the rest only once the first event reached the client
            first = await asyncio.wait_for(resp.content.readline(), 10)
            assert not p.upstream.events_resume.is_set()
            p.upstream.events_resume.set()
            rest = await resp.content.read()
        assert first.startswith(b"data: event 0")
        assert b"event 2" in rest


async def test_unexpected_exception_is_500_envelope_and_never_forwards(proxy: Proxy) -> None:
    class Exploding:
        name = "exploding"

        async def check(self, ex: Any) -> None:
            raise RuntimeError("boom with secret body value")

    proxy.rt.pipeline.stages.insert(0, Exploding())
    status, _, raw = await proxy.call("POST", "/appointments",
                                      json={"patient_id": "p1", "slot": "a"}, rid="boom")
    assert status == 500
    env = assert_envelope(raw, 500, "Internal_Error")
    assert "secret body value" not in raw.decode()
    assert env["decision"] == "DENY"
    assert proxy.upstream.seen == []
    import sqlite3

    conn = sqlite3.connect(proxy.cfg.audit.sqlite_path)
    rows = conn.execute("SELECT decision, status, reason_codes FROM audit_events "
                        "WHERE request_id = 'boom'").fetchall()
    conn.close()
    assert rows == [("DENY", 500, '["Internal_Error"]')]


CONTRACT_METRICS = ["casf_requests_total", "casf_request_duration_seconds", "casf_in_flight",
                    "casf_fail_closed_total", "casf_replay_hit_total",
                    "casf_replay_mismatch_total", "casf_rate_limited_total",
                    "casf_shadow_denied_total", "casf_audit_events_total",
                    "casf_upstream_duration_seconds"]


async def test_admin_endpoints_and_the_fixed_metric_names(proxy: Proxy) -> None:
    await proxy.call("GET", "/appointments")
    async with proxy.session.get(proxy.admin + "/health") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with proxy.session.get(proxy.admin + "/healthz") as r:
        body = await r.json()
        assert r.status == 200 and body["checks"]["audit"] == "ok" and body["mode"] == "ALLOW"
    text = await proxy.metrics()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
             if line and not line.startswith("#")}
    for name in CONTRACT_METRICS:
        assert any(n == name or n.startswith(name + "_") for n in names), name
    assert 'casf_fail_closed_total{trigger="redis"} 0.0' in text
    assert ('casf_requests_total{decision="ALLOW",status="200",'
            'tool="cliniccloud.list_appointments"} 1.0') in text
    assert 'casf_mode{mode="ALLOW"} 1.0' in text and 'casf_mode{mode="KILL_SWITCH"} 0.0' in text


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_counters_move_with_what_happened(proxy: Proxy) -> None:
    appt = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
    before = await proxy.metrics()
    await proxy.call("POST", "/appointments", json=appt, rid="m-1")
    await proxy.call("POST", "/appointments", json=appt, rid="m-1")  # replayed
    await proxy.call("POST", "/appointments", json={**appt, "slot": "x"}, rid="m-1")  # mismatch
    sms = {"patient_id": "p1", "message": "m"}
    await proxy.call("POST", "/sms", key="nurse", json=sms, rid="m-2")
    await proxy.call("POST", "/sms", key="nurse", json=sms, rid="m-3")  # rate limited
    outcomes = 'casf_audit_events_total{kind="outcome"}'

    async def outcomes_committed() -> str | None:  # committed after the response
        text = await proxy.metrics()
        return text if metric(text, outcomes) - metric(before, outcomes) >= 2 else None

    after = await wait_until(outcomes_committed, "both outcome records committed")
    for sample, delta in (("casf_replay_hit_total", 1), ("casf_replay_mismatch_total", 1),
                          ("casf_rate_limited_total", 1),
                          ("casf_upstream_duration_seconds_count", 2),
                          ("casf_request_duration_seconds_count", 5),
                          ('casf_audit_events_total{kind="replay"}', 1),
                          ('casf_audit_events_total{kind="outcome"}', 2)):
        assert metric(after, sample) - metric(before, sample) == delta, sample


async def test_budget_warning_then_exceeded(make_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["budgets"] = [{"name": "paid", "tools": ["twilio.send_sms", "stripe.generate_invoice"],
                         "cost": {"twilio.send_sms": 1, "stripe.generate_invoice": 4},
                         "daily": 100, "monthly": 1000,
                         "tenants": {"t1": {"daily": 10}}, "warn_at": 0.9}]
        d["rate_limits"] = []
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with make_proxy(patch) as p:
        inv = {"patient_id": "p1", "amount": 10}
        s1, h1, _ = await p.call("POST", "/invoices", key="billing", json=inv, rid="i1")
        s2, h2, _ = await p.call("POST", "/invoices", key="billing", json=inv, rid="i2")
        assert (s1, s2) == (201, 201) and "X-Casf-Budget-Warning" not in h1
        assert "X-Casf-Budget-Warning" not in h2  # 8/10
        sms = {"patient_id": "p1", "message": "m"}
        s3, h3, _ = await p.call("POST", "/sms", key="nurse", json=sms, rid="s1")
        assert s3 == 201 and h3["X-Casf-Budget-Warning"] == "paid:daily 9/10"
        _, h4, raw = await p.call("POST", "/invoices", key="billing", json=inv, rid="i3")
        assert_envelope(raw, 429, "Budget_Exceeded")
        left = 86_400 - (int(time.time()) % 86_400)  # to the next UTC midnight
        assert abs(int(h4["Retry-After"]) - left) <= 2
        s5, h5, _ = await p.call("POST", "/sms", key="nurse", json=sms, rid="s2")
        assert s5 == 201 and h5["X-Casf-Budget-Warning"] == "paid:daily 10/10"
        assert (await p.call("POST", "/sms", key="nurse", json=sms, rid="s3"))[0] == 429
        # tenant t2 has its own counters (default limits: 100/day)
        s6, h6, _ = await p.call("POST", "/invoices", key="t2-receptionist", json=inv, rid="t2")
        assert s6 == 201 and "X-Casf-Budget-Warning" not in h6
        assert p.upstream.paths().count("/invoices") == 3
        assert p.upstream.paths().count("/sms") == 2
        m = await p.metrics()
        assert 'casf_budget_exceeded_total{budget="paid:daily"} 2.0' in m
        assert 'casf_budget_warning_total{budget="paid:daily"} 2.0' in m
