"""NEEDS_APPROVAL that goes somewhere: the whole flow through the real proxy.

A write in STEP_UP waits for a custodian's approval bound to exactly that
request (caller, request id, body); approved, the first retry is forwarded
once; later retries are the stored outcome. Through the inline proxy, through
``/verify``, and with two replicas on one Redis.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.audit_rows import all_records
from tests.conftest import ADMIN_TOKEN, KEYS, Proxy
from tests.servers import RedisServer
from tests.test_audit import run_cli
from tests.waiting import wait_until

KEYS = {**KEYS, "custodian2": "demo-custodian2", "t2-custodian": "demo-t2-custodian",
        "orchestrator": "demo-orchestrator"}
APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}


async def approver(p: Proxy, method: str, path: str, key: str | None = "custodian",
                   body: Any = None, token: bool = False) -> tuple[int, dict[str, Any]]:
    headers: dict[str, str] = {}
    if key is not None:
        headers["X-API-Key"] = KEYS.get(key, key)
    if token:
        headers["Authorization"] = f"Bearer {ADMIN_TOKEN}"
    async with p.session.request(method, p.admin + path, json=body, headers=headers) as r:
        return r.status, json.loads(await r.read())


def records(p: Proxy) -> list[dict[str, Any]]:
    return all_records(p.cfg.audit.sqlite_path)


async def needs_approval(p: Proxy, rid: str, key: str = "receptionist",
                         body: Any = None, method: str = "POST",
                         path: str = "/appointments") -> dict[str, Any]:
    status, _, raw = await p.call(method, path, key=key, json=body if body is not None
                                  else (APPT if method == "POST" else None), rid=rid)
    env = json.loads(raw)
    assert status == 403 and env["decision"] == "NEEDS_APPROVAL", env
    assert "Approval_Required" in env["reason_codes"]
    approval = env["approval"]
    assert approval["status"] == "pending" and approval["id"].startswith("apr_")
    return dict(approval)


async def test_step_up_write_is_approved_then_forwarded_once(proxy: Proxy,
                                                             tmp_path: Path) -> None:
    await proxy.set_mode("STEP_UP")
    first = await needs_approval(proxy, "ap-1")
    again = await needs_approval(proxy, "ap-1")
    assert again["id"] == first["id"]  # the same approval, not a new one
    assert proxy.upstream.seen == []
    status, listed = await approver(proxy, "GET", "/approvals?status=pending")
    assert status == 200 and [a["id"] for a in listed["approvals"]] == [first["id"]]
    shown = listed["approvals"][0]
    assert shown["tool"] == "cliniccloud.create_appointment"
    assert shown["caller"] == "user-receptionist" and shown["tenant"] == "t1"
    status, got = await approver(proxy, "POST", f"/approvals/{first['id']}/approve",
                                 body={"comment": "ok for today"})
    assert status == 200 and got["approval"]["status"] == "approved"
    status, _, raw = await proxy.call("POST", "/appointments", json=APPT, rid="ap-1")
    assert status == 201, raw
    status, headers, raw2 = await proxy.call("POST", "/appointments", json=APPT, rid="ap-1")
    assert status == 201 and headers["Idempotent-Replayed"] == "true" and raw2 == raw
    assert len(proxy.upstream.seen) == 1  # exactly one delivery
    status, got = await approver(proxy, "GET", f"/approvals/{first['id']}")
    assert got["approval"]["status"] == "used"
    await proxy.rt.pipeline.flush()
    trail = [r for r in records(proxy) if r["kind"] == "approval"]
    actions = [(r["action"], r["via"], r["approver"]) for r in trail]
    assert actions == [("created", "proxy", None), ("approved", "admin", "user-custodian"),
                       ("used", "proxy", None)], actions
    assert all(r["approval_id"] == first["id"] and r["request_id"] == "ap-1" for r in trail)
    res = run_cli("audit", "verify", "-c", str(proxy.cfg.source),
                  audit_path=proxy.cfg.audit.sqlite_path)
    assert res.returncode == 0, res.stdout + res.stderr


async def test_approver_rules(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    # a custodian's own cancel: four eyes
    mine = await needs_approval(proxy, "fe-1", key="custodian", method="DELETE",
                                path="/appointments/a1")
    path = f"/approvals/{mine['id']}/approve"
    status, env = await approver(proxy, "POST", path, key="custodian")
    assert status == 403 and env["reason_codes"] == ["Approval_SelfApproval"]
    status, env = await approver(proxy, "POST", path, key="t2-custodian")
    assert status == 404  # another tenant's approval does not exist for it
    status, env2 = await approver(proxy, "POST", "/approvals/apr_" + "A" * 32 + "/approve")
    assert status == 404 and env2["reason_codes"] == env["reason_codes"]  # no existence leak
    status, env = await approver(proxy, "POST", path, key="nurse")
    assert status == 403 and "Approval_NotApprover" in env["reason_codes"]
    status, env = await approver(proxy, "POST", path, key=None, token=True)
    assert status == 401  # the operator token is not an approver's identity
    status, env = await approver(proxy, "POST", "/approvals/not-an-id/approve")
    assert status == 400
    status, env = await approver(proxy, "POST", path, key="custodian2",
                                 body={"comment": "x" * 501})
    assert status == 400
    status, _ = await approver(proxy, "POST", path, key="custodian2")
    assert status == 200
    status, env = await approver(proxy, "POST", path, key="custodian2")
    assert status == 409 and env["reason_codes"] == ["Approval_NotPending"]
    assert (await proxy.call("DELETE", "/appointments/a1", key="custodian", rid="fe-1"))[0] \
        == 200


async def test_denied_approvals_and_bindings(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    a = await needs_approval(proxy, "dn-1")
    status, _ = await approver(proxy, "POST", f"/approvals/{a['id']}/deny",
                               body={"comment": "not today"})
    assert status == 200
    status, _, raw = await proxy.call("POST", "/appointments", json=APPT, rid="dn-1")
    assert status == 403 and json.loads(raw)["reason_codes"] == ["Approval_Denied"]
    # a pending approval binds its request id to its body
    b = await needs_approval(proxy, "bd-1")
    status, _, raw = await proxy.call("POST", "/appointments", json={**APPT, "slot": "other"},
                                      rid="bd-1")
    assert status == 409 and json.loads(raw)["reason_codes"] == ["Inv_ReplayPayloadMismatch"]
    # the same body under another request id is another request: a new approval
    c = await needs_approval(proxy, "bd-2")
    assert c["id"] != b["id"]
    assert proxy.upstream.seen == []


async def test_concurrent_retries_after_approval_forward_once(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    a = await needs_approval(proxy, "cc-1")
    assert (await approver(proxy, "POST", f"/approvals/{a['id']}/approve"))[0] == 200
    got = await asyncio.gather(*(proxy.call("POST", "/appointments", json=APPT, rid="cc-1")
                                 for _ in range(12)))
    statuses = sorted(s for s, _, _ in got)
    assert statuses.count(201) >= 1
    assert set(statuses) <= {201, 409}
    assert len(proxy.upstream.seen) == 1


async def test_an_expired_approval_cannot_be_approved_and_a_retry_asks_again(
        make_proxy: Callable[..., Any]) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["approvals"]["pending_ttl_seconds"] = 1

    async with make_proxy(patch) as p:
        await p.set_mode("STEP_UP")
        a = await needs_approval(p, "ex-1")

        async def expired() -> bool:
            status, got = await approver(p, "GET", f"/approvals/{a['id']}")
            return status == 200 and got["approval"]["status"] == "expired"

        await wait_until(expired, "the approval to expire", timeout=10)
        status, env = await approver(p, "POST", f"/approvals/{a['id']}/approve")
        assert status == 409 and env["reason_codes"] == ["Approval_NotPending"]
        b = await needs_approval(p, "ex-1")
        assert b["id"] != a["id"]


async def test_approval_through_verify(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    base = f"http://127.0.0.1:{proxy.serving.decisions_port}"
    body = {"request_id": "vf-1", "tool": "cliniccloud.create_appointment",
            "subject": {"patient_id": "p1"}, "args": {"slot": "s"}}
    headers = {"X-API-Key": "demo-receptionist"}

    async def verify() -> dict[str, Any]:
        async with proxy.session.post(base + "/verify", json=body, headers=headers) as r:
            assert r.status == 200
            return dict(await r.json())

    first = await verify()
    assert first["decision"] == "NEEDS_APPROVAL" and first["approval"]["status"] == "pending"
    assert (await verify())["approval"]["id"] == first["approval"]["id"]
    status, _ = await approver(proxy, "POST", f"/approvals/{first['approval']['id']}/approve")
    assert status == 200
    allowed = await verify()
    assert allowed["decision"] == "ALLOW", allowed
    again = await verify()
    assert again == allowed  # the stored decision, the approval used once
    status, got = await approver(proxy, "GET", f"/approvals/{first['approval']['id']}")
    assert got["approval"]["status"] == "used"


async def test_two_replicas_share_approvals_on_redis(make_proxy: Callable[..., Any],
                                                     redis_server: RedisServer,
                                                     tmp_path: Path) -> None:
    async with make_proxy(REDIS_URL=redis_server.url) as a, \
            make_proxy(REDIS_URL=redis_server.url, CASF_AUDIT_PATH=str(tmp_path / "b.db"),
                       CASF_CHAIN_ID="clinic-1") as b:
        await a.set_mode("STEP_UP")

        async def b_in_step_up() -> bool:
            return bool(b.rt.mode.current().value == "STEP_UP")

        await wait_until(b_in_step_up, "replica b to see STEP_UP")
        asked = await needs_approval(a, "rr-1")
        status, _ = await approver(b, "POST", f"/approvals/{asked['id']}/approve")
        assert status == 200
        status, _, _ = await b.call("POST", "/appointments", json=APPT, rid="rr-1")
        assert status == 201
        status, headers, _ = await a.call("POST", "/appointments", json=APPT, rid="rr-1")
        assert status == 201 and headers["Idempotent-Replayed"] == "true"
        assert len(a.upstream.seen) == 1


async def test_approvals_off_is_a_dead_end_no_more(make_proxy: Callable[..., Any]) -> None:
    def patch(d: dict[str, Any]) -> None:
        del d["approvals"]

    async with make_proxy(patch) as p:
        await p.set_mode("STEP_UP")
        status, _, raw = await p.call("POST", "/appointments", json=APPT, rid="off-1")
        env = json.loads(raw)
        assert status == 403 and env["decision"] == "NEEDS_APPROVAL" and "approval" not in env
        async with aiohttp.ClientSession() as s, s.get(p.admin + "/approvals",
                                                       headers={"X-API-Key": "demo-custodian"}
                                                       ) as r:
            assert r.status == 404


async def test_approval_through_the_envoy_door(proxy: Proxy) -> None:
    await proxy.set_mode("STEP_UP")
    url = f"http://127.0.0.1:{proxy.serving.decisions_port}/authz/envoy/appointments"
    headers = {"X-API-Key": "demo-receptionist", "Idempotency-Key": "ev-1"}

    async def ask() -> tuple[int, dict[str, str], bytes]:
        async with proxy.session.post(url, json=APPT, headers=headers) as r:
            return r.status, dict(r.headers), await r.read()

    status, _, raw = await ask()
    env = json.loads(raw)
    assert status == 403 and env["decision"] == "NEEDS_APPROVAL"
    approval = env["approval"]
    assert (await approver(proxy, "POST", f"/approvals/{approval['id']}/approve"))[0] == 200
    status, allowed, _ = await ask()
    assert status == 200 and allowed["X-Casf-Decision"] == "ALLOW"
    status, again, _ = await ask()  # the decision again, the approval used once
    assert status == 200 and again["X-Casf-Replayed"] == "true"
    assert (await approver(proxy, "GET", f"/approvals/{approval['id']}"))[1][
        "approval"]["status"] == "used"
