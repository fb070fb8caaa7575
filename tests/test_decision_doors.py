"""The decision listener: POST /verify, Envoy ext_authz and forward auth.

Every door is driven over real sockets against the real proxy (the clinic
example's config, which serves the decision listener); the same decisions are
asked through the inline proxy and each door, and the answers must agree.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from tests.audit_rows import all_records
from tests.conftest import KEYS, Proxy, Upstream, clinic_env, start_proxy, write_config
from tests.servers import RedisServer

KEYS = {**KEYS, "orchestrator": "demo-orchestrator"}
APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}


class Doors:
    def __init__(self, proxy: Proxy) -> None:
        self.p = proxy
        assert proxy.serving.decisions_port
        self.base = f"http://127.0.0.1:{proxy.serving.decisions_port}"

    async def verify(self, body: Any, key: str | None = "receptionist",
                     raw: bytes | None = None) -> tuple[int, dict[str, str], Any]:
        headers = {"Content-Type": "application/json"}
        if key is not None:
            headers["X-API-Key"] = KEYS.get(key, key)
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.p.session.post(self.base + "/verify", data=data,
                                       headers=headers) as r:
            return r.status, dict(r.headers), json.loads(await r.read())

    async def envoy(self, method: str, path: str, key: str | None = "receptionist",
                    body: Any = None, rid: str | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        if key is not None:
            h["X-API-Key"] = KEYS.get(key, key)
        if rid is not None:
            h["Idempotency-Key"] = rid
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            h["Content-Type"] = "application/json"
        url = URL(self.base + "/authz/envoy" + path, encoded=True)
        async with self.p.session.request(method, url, data=data, headers=h) as r:
            return r.status, dict(r.headers), await r.read()

    async def forward(self, method: str | None, uri: str | None,
                      key: str | None = "receptionist", rid: str | None = None,
                      style: str = "nginx", headers: dict[str, str] | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        h = dict(headers or {})
        names = (("X-Original-Method", "X-Original-URI") if style == "nginx"
                 else ("X-Forwarded-Method", "X-Forwarded-Uri"))
        if method is not None:
            h[names[0]] = method
        if uri is not None:
            h[names[1]] = uri
        if key is not None:
            h["X-API-Key"] = KEYS.get(key, key)
        if rid is not None:
            h["Idempotency-Key"] = rid
        async with self.p.session.get(self.base + "/authz/forward", headers=h) as r:
            return r.status, dict(r.headers), await r.read()


def records(p: Proxy) -> list[dict[str, Any]]:
    return all_records(p.cfg.audit.sqlite_path)


@pytest.fixture
async def doors(make_proxy: Callable[..., Any]) -> AsyncIterator[Doors]:
    async with make_proxy() as p:
        yield Doors(p)


def vreq(rid: str, tool: str, **kw: Any) -> dict[str, Any]:
    return {"request_id": rid, "tool": tool, **kw}


# ------------------------------------------------------------------ /verify


async def test_verify_allow_and_deny_are_200_with_the_wire_format(doors: Doors) -> None:
    status, headers, body = await doors.verify(vreq(
        "v1", "cliniccloud.create_appointment", mode="ALLOW", role="receptionist",
        subject={"patient_id": "p1"}, args={"slot": "s"}, context={}))
    assert status == 200
    assert body == {"decision": "ALLOW", "violations": [], "allowed_outputs": [],
                    "reason": "allowed"}
    assert headers["X-Casf-Trace-Id"]
    status, _, body = await doors.verify(vreq(
        "v2", "stripe.generate_invoice", subject={"patient_id": "p1"}), key="nurse")
    assert status == 200 and body["decision"] == "DENY"
    assert "Role_NotPermitted" in body["violations"]
    await doors.p.rt.pipeline.flush()
    mine = [r for r in records(doors.p) if r["request_id"] in ("v1", "v2")]
    assert [(r["via"], r["decision"], r["kind"]) for r in mine] == [
        ("verify", "ALLOW", "decision"), ("verify", "DENY", "decision")]
    assert all(r["config_hash"] == doors.p.cfg.digest for r in mine)
    assert doors.p.upstream.seen == []  # a decision door never forwards


BAD = [
    ("not json", None, b"{nope", "BadRequest_InvalidJson"),
    ("not an object", None, b"[1]", "BadRequest_InvalidDecisionRequest"),
    ("missing request_id", {"tool": "cliniccloud.list_appointments"}, None,
     "BadRequest_InvalidDecisionRequest"),
    ("missing tool", {"request_id": "b1"}, None, "BadRequest_InvalidDecisionRequest"),
    ("wrong type", vreq("b2", "cliniccloud.list_appointments", subject="p1"), None,
     "BadRequest_InvalidDecisionRequest"),
    ("bad mode", vreq("b3", "cliniccloud.list_appointments", mode="LAX"), None,
     "BadRequest_InvalidDecisionRequest"),
    ("unknown role", vreq("b4", "cliniccloud.list_appointments", role="janitor"), None,
     "BadRequest_InvalidDecisionRequest"),
    ("extra field", vreq("b5", "cliniccloud.list_appointments", sudo=True), None,
     "BadRequest_InvalidDecisionRequest"),
    ("unknown tool", vreq("b6", "cliniccloud.drop_database"), None, "BadRequest_UnknownTool"),
    ("request id not printable", vreq("b\x01", "cliniccloud.list_appointments"), None,
     "BadRequest_InvalidDecisionRequest"),
    ("duplicate keys", None, b'{"request_id":"b7","tool":"x","tool":"y"}',
     "BadRequest_Ambiguous"),
    ("missing patient_id", vreq("b8", "cliniccloud.summary_history"), None,
     "BadRequest_MissingPatientId"),
]


@pytest.mark.parametrize("name,body,raw,reason", BAD, ids=[b[0] for b in BAD])
async def test_verify_bad_input_is_a_400_envelope_naming_the_field(
        doors: Doors, name: str, body: Any, raw: bytes | None, reason: str) -> None:
    status, _, env = await doors.verify(body, key="doctor", raw=raw)
    assert status == 400, env
    assert env["decision"] == "DENY" and reason in env["reason_codes"], env
    if reason == "BadRequest_InvalidDecisionRequest" and body is not None:
        field = {"missing request_id": "request_id", "missing tool": "tool",
                 "wrong type": "subject", "bad mode": "mode", "unknown role": "role",
                 "extra field": "sudo", "request id not printable": "request_id"}[name]
        assert field in env["message"], env


async def test_verify_without_credentials_is_401(doors: Doors) -> None:
    status, _, env = await doors.verify(vreq("n1", "cliniccloud.list_appointments"),
                                        key=None)
    assert status == 401 and env["reason_codes"] == ["Auth_Missing"]
    status, _, env = await doors.verify(vreq("n2", "cliniccloud.list_appointments"),
                                        key="demo-wrong")
    assert status == 401 and env["reason_codes"] == ["Auth_Invalid"]


async def test_only_trusted_callers_assert_role_and_context(doors: Doors) -> None:
    body = vreq("t1", "cliniccloud.create_appointment", role="receptionist",
                subject={"patient_id": "p1"})
    # the orchestrator (role system) decides for a receptionist, with the context it names
    _, _, got = await doors.verify(body, key="orchestrator")
    assert got["violations"] == ["BadRequest_MissingTenantId"]  # as given: no tenant
    body["context"] = {"tenant_id": "t1"}
    status, _, got = await doors.verify({**body, "request_id": "t1b"}, key="orchestrator")
    assert status == 200 and got["decision"] == "ALLOW", got
    # a nurse asserting receptionist is decided as a nurse, and the record says so
    status, _, got = await doors.verify({**body, "request_id": "t2"}, key="nurse")
    assert status == 200 and got["decision"] == "DENY"
    assert "Role_NotPermitted" in got["violations"]
    # another tenant in the body: decided as the caller's own tenant
    status, _, got = await doors.verify(
        vreq("t3", "cliniccloud.list_appointments", context={"tenant_id": "t2"}))
    assert status == 200 and got["decision"] == "DENY"
    assert got["violations"] == ["Tenant_Mismatch"]
    await doors.p.rt.pipeline.flush()
    by_id = {r["request_id"]: r for r in records(doors.p) if r["kind"] == "decision"}
    assert by_id["t1b"]["trusted_caller"] is True
    assert by_id["t1b"]["policy_role"] == "receptionist"
    assert by_id["t1b"]["actor"] == "user-orchestrator"
    assert by_id["t2"]["asserted_role"] == "receptionist" and by_id["t2"]["role"] == "nurse"


async def test_the_effective_mode_is_the_stricter_one(doors: Doors) -> None:
    write = vreq("m1", "cliniccloud.create_appointment", subject={"patient_id": "p1"},
                 mode="READ_ONLY")
    _, _, got = await doors.verify(write)
    assert got["decision"] == "DENY" and got["violations"] == ["Mode_ReadOnly_NoWrite"]
    await doors.p.set_mode("KILL_SWITCH")
    _, _, got = await doors.verify(vreq("m2", "cliniccloud.list_appointments", mode="ALLOW"))
    assert got["decision"] == "DENY" and got["violations"] == ["Mode_KillSwitch"]
    await doors.p.set_mode("STEP_UP")
    _, _, got = await doors.verify({**write, "request_id": "m3", "mode": "ALLOW"})
    assert got["decision"] == "NEEDS_APPROVAL" and "Approval_Required" in got["violations"]


async def test_verify_replay_follows_casf_core(doors: Doors) -> None:
    body = vreq("r1", "cliniccloud.create_appointment", subject={"patient_id": "p1"})
    first = await doors.verify(body)
    again = await doors.verify(body)
    assert first[2] == again[2] and again[1]["X-Casf-Replayed"] == "true"
    assert "X-Casf-Replayed" not in first[1]
    changed = await doors.verify({**body, "subject": {"patient_id": "p2"}})
    assert changed[0] == 200 and changed[2]["decision"] == "DENY"
    assert changed[2]["violations"] == ["Inv_ReplayPayloadMismatch"]
    # scoped by caller: another caller's same id is its own request
    other = await doors.verify(body, key="doctor")
    assert other[2]["decision"] == "ALLOW" and "X-Casf-Replayed" not in other[1]
    # a read's request id is replayed too, as casf-core does
    read = vreq("r3", "cliniccloud.list_appointments")
    r1, r2 = await doors.verify(read), await doors.verify(read)
    assert r1[2] == r2[2] and r2[1]["X-Casf-Replayed"] == "true"
    # a deny is replayed too
    deny = vreq("r2", "stripe.generate_invoice", subject={"patient_id": "p1"})
    d1, d2 = await doors.verify(deny, key="nurse"), await doors.verify(deny, key="nurse")
    assert d1[2] == d2[2] and d2[1]["X-Casf-Replayed"] == "true"


async def test_an_unauditable_decision_is_a_fail_closed_deny(
        make_proxy: Callable[..., Any], tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["audit"]["timeout_ms"] = 300

    async with make_proxy(patch) as p:
        doors = Doors(p)
        assert (await doors.verify(vreq("a0", "cliniccloud.list_appointments")))[0] == 200
        locker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            status, _, got = await doors.verify(vreq("a1", "cliniccloud.list_appointments"))
            assert status == 200 and got["decision"] == "DENY"
            assert got["violations"] == ["FAIL_CLOSED", "Audit_Unavailable"]
            status, _, raw = await doors.forward("GET", "/appointments")
            assert status == 503
            assert json.loads(raw)["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        # released, not stored: the same request is decided afresh now
        status, _, got = await doors.verify(vreq("a1", "cliniccloud.list_appointments"))
        assert got["decision"] == "ALLOW"


async def test_allowed_outputs_come_from_the_policy(make_proxy: Callable[..., Any],
                                                    tmp_path: Path) -> None:
    bundle = tmp_path / "outputs"
    bundle.mkdir()
    (bundle / "casf.rego").write_text(
        "package casf\n\nimport rego.v1\n\ndefault allow := false\n\n"
        "allow if input.tool == \"cliniccloud.list_appointments\"\n\n"
        "violations := set()\n\n"
        "allowed_outputs contains \"slots\" if allow\n"
        "allowed_outputs contains \"names\" if input.role == \"doctor\"\n")

    def patch(d: dict[str, Any]) -> None:
        d["policy"]["bundle"] = str(bundle)

    async with make_proxy(patch) as p:
        doors = Doors(p)
        _, _, got = await doors.verify(vreq("o1", "cliniccloud.list_appointments"), key="doctor")
        assert got == {"decision": "ALLOW", "violations": [], "reason": "allowed",
                       "allowed_outputs": ["names", "slots"]}


async def test_casf_core_smoke_scenario_over_redis(make_proxy: Callable[..., Any],
                                                   redis_server: RedisServer) -> None:
    async with make_proxy(REDIS_URL=redis_server.url) as p:
        doors = Doors(p)
        sms = vreq("s1", "twilio.send_sms", subject={"patient_id": "p9"},
                   args={"message": "reminder"})
        first = await doors.verify(sms)
        assert first[2]["decision"] == "ALLOW"
        second = await doors.verify({**sms, "request_id": "s2"})
        assert second[2]["decision"] == "DENY"
        assert second[2]["violations"] == ["RateLimit_Exceeded", "Inv_NoSmsBurst"]
        replay = await doors.verify(sms)
        assert replay[2] == first[2] and replay[1]["X-Casf-Replayed"] == "true"
        mismatch = await doors.verify({**sms, "args": {"message": "other"}})
        assert mismatch[2]["violations"] == ["Inv_ReplayPayloadMismatch"]
        redis_server.stop()
        try:
            down = await doors.verify({**sms, "request_id": "s3",
                                       "subject": {"patient_id": "p10"}})
            assert down[0] == 200 and down[2]["decision"] == "DENY"
            assert down[2]["violations"][0] == "FAIL_CLOSED"
            assert "Inv_ReplayCheckUnavailable" in down[2]["violations"]
            assert "Inv_NoSmsBurst" in down[2]["violations"]
            read = await doors.verify(vreq("s4", "cliniccloud.list_appointments"))
            assert read[2]["decision"] == "ALLOW"  # reads fail open
        finally:
            redis_server.start()


# ------------------------------------------------------------------ authz doors


async def test_envoy_door_allows_with_headers_and_denies_with_the_envelope(doors: Doors
                                                                           ) -> None:
    status, headers, raw = await doors.envoy("GET", "/appointments?patient_id=p1")
    assert status == 200 and raw == b""
    assert headers["X-Casf-Decision"] == "ALLOW"
    assert headers["X-Casf-Tool"] == "cliniccloud.list_appointments"
    assert headers["X-Casf-Principal"] == "user-receptionist"
    assert headers["X-Casf-Role"] == "receptionist" and headers["X-Casf-Tenant"] == "t1"
    assert headers["X-Casf-Trace-Id"]
    assert "demo-receptionist" not in json.dumps(headers)  # no credential in the answer
    status, _, raw = await doors.envoy("POST", "/appointments", body=APPT, rid="e1")
    assert status == 200
    status, _, raw = await doors.envoy("POST", "/invoices", body={"patient_id": "p1"},
                                       rid="e2")
    assert status == 403 and "Role_NotPermitted" in json.loads(raw)["reason_codes"]
    status, _, raw = await doors.envoy("GET", "/nowhere")
    assert status == 403 and json.loads(raw)["reason_codes"] == ["Route_NotMapped"]
    status, _, raw = await doors.envoy("POST", "/appointments", body=APPT, rid="e3",
                                       headers={"x-envoy-auth-partial-body": "true"})
    assert status == 400 and json.loads(raw)["reason_codes"] == ["Decision_BodyUnavailable"]
    status, _, raw = await doors.envoy("GET", "/patients/%2e%2e/history", key="doctor")
    assert status == 400 and json.loads(raw)["reason_codes"] == ["BadRequest_MalformedPath"]
    await doors.p.rt.pipeline.flush()
    vias = {r["via"] for r in records(doors.p)}
    assert vias == {"envoy"}
    assert not [r for r in records(doors.p) if r["kind"] == "outcome"]


async def test_forward_door_for_nginx_and_traefik(doors: Doors) -> None:
    for style in ("nginx", "traefik"):
        status, headers, _ = await doors.forward("GET", "/appointments", style=style)
        assert status == 200 and headers["X-Casf-Tool"] == "cliniccloud.list_appointments"
    status, headers, _ = await doors.forward("DELETE", "/appointments/a1", rid="f1")
    assert status == 200 and headers["X-Casf-Tool"] == "cliniccloud.cancel_appointment"
    # the body never reaches forward auth: a route that reads it is refused, not guessed
    status, _, raw = await doors.forward("POST", "/appointments", rid="f2")
    assert status == 400 and json.loads(raw)["reason_codes"] == ["Decision_BodyUnavailable"]
    status, _, raw = await doors.forward("GET", None)
    assert status == 400 and json.loads(raw)["reason_codes"] == ["BadRequest_MissingOriginalUri"]
    status, _, raw = await doors.forward("GET", "/appointments", key=None)
    assert status == 401
    status, _, raw = await doors.forward("DELETE", "/appointments/a2")
    assert status == 400 and json.loads(raw)["reason_codes"] == ["BadRequest_MissingRequestId"]
    # the same id and target again: the same decision, without deciding again
    status, headers, _ = await doors.forward("DELETE", "/appointments/a1", rid="f1")
    assert status == 200 and headers["X-Casf-Replayed"] == "true"
    status, _, raw = await doors.forward("DELETE", "/appointments/a9", rid="f1")
    assert status == 409 and json.loads(raw)["reason_codes"] == ["Inv_ReplayPayloadMismatch"]
    await doors.p.rt.pipeline.flush()
    f1 = [r for r in records(doors.p) if r["request_id"] == "f1" and r["kind"] == "decision"]
    assert f1 and f1[0]["body_sha256"] is None and f1[0]["via"] == "forward"


async def test_forward_door_passes_429_with_retry_after(doors: Doors) -> None:
    sms = ("POST", "/sms")
    # /sms reads the body: through forward auth it is refused; through Envoy it is decided
    assert (await doors.forward(*sms, rid="x1"))[0] == 400
    ok = await doors.envoy(*sms, body={"patient_id": "p5", "message": "m"}, rid="x2")
    limited = await doors.envoy(*sms, body={"patient_id": "p5", "message": "m"}, rid="x3")
    assert ok[0] == 200 and limited[0] == 429
    env = json.loads(limited[2])
    assert env["reason_codes"] == ["RateLimit_Exceeded", "Inv_NoSmsBurst"]
    assert limited[1]["Retry-After"] == str(env["retry_after"])


# ------------------------------------------------------------------ one core, four doors

# (key, method, path, body, tool, verify subject)
SAME = [
    ("receptionist", "GET", "/appointments", None, "cliniccloud.list_appointments", {}),
    ("nurse", "GET", "/patients/p1/history", None, "cliniccloud.summary_history",
     {"patient_id": "p1"}),
    ("receptionist", "GET", "/patients/p1/history", None, "cliniccloud.summary_history",
     {"patient_id": "p1"}),
    ("billing", "DELETE", "/appointments/a1", None, "cliniccloud.cancel_appointment", {}),
    ("doctor", "DELETE", "/appointments/a1", None, "cliniccloud.cancel_appointment", {}),
    ("t2-receptionist", "GET", "/appointments", None, "cliniccloud.list_appointments", {}),
]


async def test_every_door_gives_the_same_decision(doors: Doors) -> None:
    p = doors.p
    for n, (key, method, path, body, tool, subject) in enumerate(SAME):
        rid = f"same-{n}"
        status, _, raw = await p.call(method, path, key=key, json=body,
                                      rid=rid if method != "GET" else None)
        proxy_decision = ("ALLOW" if status < 300 else json.loads(raw)["decision"])
        proxy_reasons = [] if status < 300 else json.loads(raw)["reason_codes"]
        _, _, v = await doors.verify(vreq(rid + "-v", tool, subject=subject), key=key)
        es, _, eraw = await doors.envoy(method, path, key=key, rid=rid + "-e")
        fs, _, fraw = await doors.forward(method, path, key=key, rid=rid + "-f")
        envoy_reasons = [] if es == 200 else json.loads(eraw)["reason_codes"]
        forward_reasons = [] if fs == 200 else json.loads(fraw)["reason_codes"]
        assert v["decision"] == proxy_decision, (key, path, v)
        assert v["violations"] == proxy_reasons == envoy_reasons == forward_reasons, (
            key, path, v, proxy_reasons, envoy_reasons, forward_reasons)
        assert (es == 200) == (fs == 200) == (proxy_decision == "ALLOW")


async def test_openapi_is_served_from_the_models(doors: Doors) -> None:
    async with doors.p.session.get(doors.base + "/openapi.json") as r:
        spec = await r.json()
    assert spec["openapi"].startswith("3.1")
    req = spec["components"]["schemas"]["VerifyRequestV1"]
    assert set(req["required"]) == {"request_id", "tool"}
    assert {"/verify", "/authz/forward", "/authz/envoy/{path}"} <= set(spec["paths"])


async def test_no_decision_listener_unless_configured(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        del d["listen"]["decisions"]

    up = Upstream(url="http://127.0.0.1:9")
    async with start_proxy(write_config(tmp_path, patch), clinic_env(up.url, tmp_path),
                           up) as p:
        assert p.serving.decisions_port is None
        assert len(p.serving.runners) == 2


async def test_concurrent_verify_with_one_id_decides_once(doors: Doors) -> None:
    body = vreq("c1", "cliniccloud.create_appointment", subject={"patient_id": "p1"})
    got = await asyncio.gather(*(doors.verify(body) for _ in range(20)))
    decisions = [g[2]["decision"] for g in got]
    assert decisions.count("ALLOW") == 20 - sum(
        1 for g in got if g[2]["violations"] == ["Inv_ReplayConcurrent"])
    await doors.p.rt.pipeline.flush()
    allows = [r for r in records(doors.p)
              if r["request_id"] == "c1" and r["kind"] == "decision" and r["decision"] == "ALLOW"]
    assert len(allows) == 1  # one decision; the rest are replays or concurrent denies


async def test_an_unexpected_error_in_a_decision_door_is_a_recorded_deny(doors: Doors) -> None:
    class Exploding:
        name = "exploding"

        async def check(self, ex: Any) -> None:
            raise RuntimeError("boom with secret body value")

    doors.p.rt.pipeline.stages.insert(0, Exploding())
    status, _, env = await doors.verify(vreq("boom-1", "cliniccloud.create_appointment",
                                             subject={"patient_id": "p1"}))
    assert status == 500 and env["reason_codes"] == ["Internal_Error"]
    assert "secret" not in json.dumps(env)
    status, headers, raw = await doors.forward("GET", "/appointments")
    assert status == 500 and json.loads(raw)["reason_codes"] == ["Internal_Error"]
    assert "X-Casf-Decision" not in headers
    await doors.p.rt.pipeline.flush()
    denied = [r for r in records(doors.p) if r["reason_codes"] == ["Internal_Error"]]
    assert {r["via"] for r in denied} == {"verify", "forward"}
