"""The approver API on a real listener, with a real API-key identity and a real audit file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.model import Status, new_id
from proxy.approvals.redisstore import RedisApprovalStore
from proxy.approvals.store import ApprovalStore
from proxy.audit.sqlite import SqliteReader
from proxy.audit.verify import check_chains
from proxy.redisstate import RedisConnection, RedisSettings
from tests.approvals_support import Env, approvals_env, key
from tests.conftest import ADMIN_TOKEN

CFG = ApprovalsConfig(approver_roles=("custodian",))


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[ApprovalStore]:
    if request.param == "memory":
        yield MemoryApprovalStore(CFG)
        return
    server = request.getfixturevalue("redis_server")
    conn = RedisConnection(RedisSettings(url=server.url, timeout_s=2.0))
    yield RedisApprovalStore(conn, CFG)
    await conn.close()


@pytest.fixture
async def env(tmp_path: Path, store: ApprovalStore) -> AsyncIterator[Env]:
    async with approvals_env(tmp_path, store=store, cfg=CFG) as e:
        yield e


async def call(env: Env, method: str, path: str, who: str | None = "custodian2",
               body: Any = None, headers: dict[str, str] | None = None
               ) -> tuple[int, dict[str, Any]]:
    h = dict(headers or {})
    if who is not None:
        h["X-API-Key"] = key(who)
    kwargs: dict[str, Any] = {"headers": h}
    if isinstance(body, (bytes, str)):
        kwargs["data"] = body
    elif body is not None:
        kwargs["json"] = body
    async with env.http.request(method, env.url + path, **kwargs) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_flow_list_approve_and_audit(env: Env) -> None:
    seeded = await env.seed()
    aid = seeded.approval.id
    status, body = await call(env, "GET", "/approvals?status=pending")
    assert status == 200
    [item] = body["approvals"]
    assert item["id"] == aid and item["status"] == "pending"
    assert item["caller"] == "user-custodian" and item["tool"] == "cliniccloud.cancel_appointment"
    assert item["attrs"]["args"] == {"appointment_id": "a-17"}
    assert "binding_key" not in item
    status, body = await call(env, "POST", f"/approvals/{aid}/approve",
                              body={"comment": "confirmed by phone"})
    assert status == 200
    assert body["approval"]["status"] == "approved"
    assert body["approval"]["approvers"] == ["user-custodian2"]
    assert body["approval"]["comment"] == "confirmed by phone"
    status, body = await call(env, "GET", "/approvals?status=pending")
    assert (status, body) == (200, {"approvals": []})
    status, body = await call(env, "GET", f"/approvals/{aid}")
    assert status == 200 and body["approval"]["status"] == "approved"
    # the approved retry uses it, once
    approved = await env.approvals.lookup("user-custodian\0r-1")
    assert approved is not None and approved.status is Status.APPROVED
    assert await env.approvals.consume(approved, "fp-1") is not None
    assert await env.approvals.consume(approved, "fp-1") is None
    records = [r for r in env.records() if r["kind"] == "approval"]
    assert [(r["action"], r["decision"], r["via"], r["approver"], r["actor"])
            for r in records] == [
        ("created", "ALLOW", "proxy", None, "user-custodian"),
        ("approved", "ALLOW", "admin", "user-custodian2", "user-custodian2"),
        ("used", "ALLOW", "proxy", None, "user-custodian"),
        ("used", "ALLOW", "proxy", None, "user-custodian"),  # the second retry's attempt,
        ("used", "DENY", "proxy", None, "user-custodian"),   # then its refusal
    ]
    for r in records:
        assert r["approval_id"] == aid and r["request_id"] == "r-1" and r["tenant"] == "t1"
        assert r["tool"] == "cliniccloud.cancel_appointment" and r["event_id"] and r["ts"]
        assert r["attrs"]["subject"] == {"patient_id": "p1"}
        assert r["config_hash"] == "sha256:cfg"
    assert records[1]["comment"] == "confirmed by phone"
    assert records[-1]["reason_codes"] == ["Approval_NotPending"]
    async with SqliteReader.open(env.audit_path) as reader:
        results = [r async for r in check_chains(reader)]
    assert [r.broken for r in results] == [None]
    assert env.metric("casf_approvals_total", action="created") == 1
    assert env.metric("casf_approvals_total", action="approved") == 1
    assert env.metric("casf_approvals_total", action="used") == 1


async def test_deny(env: Env) -> None:
    aid = (await env.seed()).approval.id
    status, body = await call(env, "POST", f"/approvals/{aid}/deny", body={"comment": "no"})
    assert status == 200 and body["approval"]["status"] == "denied"
    assert body["approval"]["decided_by"] == "user-custodian2"
    for action in ("approve", "deny"):
        status, body = await call(env, "POST", f"/approvals/{aid}/{action}")
        assert status == 409 and body["reason_codes"] == ["Approval_NotPending"]
    denied = await env.approvals.lookup("user-custodian\0r-1")
    assert denied is not None and denied.status is Status.DENIED
    assert env.metric("casf_approvals_total", action="denied") == 1
    records = [r for r in env.records() if r["kind"] == "approval"]
    assert [(r["action"], r["decision"], r["via"], r["approver"], r["approval_status"])
            for r in records] == [
        ("created", "ALLOW", "proxy", None, "pending"),
        ("denied", "ALLOW", "admin", "user-custodian2", "denied"),
    ]
    assert records[1]["comment"] == "no" and records[1]["role"] == "custodian"


async def test_envelope_request_id_is_validated(env: Env) -> None:
    aid = (await env.seed()).approval.id
    status, body = await call(env, "POST", f"/approvals/{aid}/approve", who="nurse",
                              headers={"X-Request-Id": "op-42"})
    assert status == 403 and body["request_id"] == "op-42"
    status, body = await call(env, "POST", f"/approvals/{aid}/approve", who="nurse",
                              headers={"X-Request-Id": "x" * 300})
    assert status == 403 and body["request_id"] is None


async def test_four_eyes(env: Env) -> None:
    aid = (await env.seed()).approval.id
    status, body = await call(env, "POST", f"/approvals/{aid}/approve", who="custodian")
    assert status == 403 and body["reason_codes"] == ["Approval_SelfApproval"]
    assert body["decision"] == "DENY" and body["status"] == 403
    status, body = await call(env, "POST", f"/approvals/{aid}/deny", who="custodian")
    assert status == 403 and body["reason_codes"] == ["Approval_SelfApproval"]
    status, body = await call(env, "GET", f"/approvals/{aid}", who="custodian")
    assert status == 200  # seeing it is fine
    assert [r["action"] for r in env.records()] == ["created"]  # nothing else recorded


async def test_other_tenant_is_exactly_unknown(env: Env) -> None:
    aid = (await env.seed()).approval.id
    unknown = new_id()
    for method, suffix in (("GET", ""), ("POST", "/approve"), ("POST", "/deny")):
        st1, theirs = await call(env, method, f"/approvals/{aid}{suffix}", who="t2-custodian")
        st2, none = await call(env, method, f"/approvals/{unknown}{suffix}", who="t2-custodian")
        assert st1 == st2 == 404
        for b in (theirs, none):
            b.pop("trace_id")
        assert theirs == none
        assert theirs["reason_codes"] == ["Approval_NotFound"]
    status, body = await call(env, "GET", "/approvals?status=pending", who="t2-custodian")
    assert (status, body) == (200, {"approvals": []})
    assert (await env.approvals.lookup("user-custodian\0r-1")).status is Status.PENDING  # type: ignore[union-attr]


@pytest.mark.parametrize("path", ["/approvals", "/approvals/{id}"])
async def test_non_approver_role_is_403(env: Env, path: str) -> None:
    aid = (await env.seed()).approval.id
    for who in ("nurse", "receptionist"):
        status, body = await call(env, "GET", path.format(id=aid), who=who)
        assert status == 403 and body["reason_codes"] == ["Approval_NotApprover"]
    status, body = await call(env, "POST", f"/approvals/{aid}/approve", who="nurse")
    assert status == 403 and body["reason_codes"] == ["Approval_NotApprover"]


@pytest.mark.parametrize(("headers", "reason"), [
    ({}, "Auth_Missing"),
    ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, "Auth_Missing"),
    ({"X-API-Key": "demo-nobody"}, "Auth_Invalid"),
])
async def test_unauthenticated_is_401(env: Env, headers: dict[str, str], reason: str) -> None:
    aid = (await env.seed()).approval.id
    for method, path in (("GET", "/approvals"), ("GET", f"/approvals/{aid}"),
                         ("POST", f"/approvals/{aid}/approve")):
        status, body = await call(env, method, path, who=None, headers=headers)
        assert status == 401 and body["reason_codes"] == [reason]
    assert (await env.approvals.lookup("user-custodian\0r-1")).status is Status.PENDING  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["apr_x", "nope", "apr_" + "a" * 40, "apr_" + "%21" * 32])
async def test_malformed_id_is_400(env: Env, bad: str) -> None:
    for method, suffix in (("GET", ""), ("POST", "/approve"), ("POST", "/deny")):
        status, body = await call(env, method, f"/approvals/{bad}{suffix}")
        assert status == 400 and body["reason_codes"] == ["BadRequest_InvalidApprovalId"]


@pytest.mark.parametrize("body", [{"comment": "x" * 501}, {"comment": 7}, {"note": "x"},
                                  "not json", b"[1]", "x" * 5000])
async def test_bad_comment_is_400(env: Env, body: Any) -> None:
    aid = (await env.seed()).approval.id
    status, got = await call(env, "POST", f"/approvals/{aid}/approve", body=body)
    assert status == 400 and got["reason_codes"] == ["BadRequest_InvalidComment"]
    assert (await env.approvals.lookup("user-custodian\0r-1")).status is Status.PENDING  # type: ignore[union-attr]


async def test_comment_of_500_characters_is_fine(env: Env) -> None:
    aid = (await env.seed()).approval.id
    status, got = await call(env, "POST", f"/approvals/{aid}/approve",
                             body={"comment": "é" * 500})
    assert status == 200 and got["approval"]["comment"] == "é" * 500


async def test_bad_list_filters_are_400(env: Env) -> None:
    for q in ("status=waiting", "limit=0", "limit=501", "limit=x"):
        status, body = await call(env, "GET", f"/approvals?{q}")
        assert status == 400 and body["reason_codes"] == ["BadRequest_InvalidFilter"], q


async def test_audit_down_means_nothing_changes(env: Env) -> None:
    aid = (await env.seed()).approval.id
    await env.stop_audit()
    status, body = await call(env, "POST", f"/approvals/{aid}/approve")
    assert status == 503
    assert body["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
    got = await env.approvals.lookup("user-custodian\0r-1")
    assert got is not None and got.status is Status.PENDING
    # a new approval whose created record cannot be committed is withdrawn
    from proxy.ports import AuditUnavailable
    with pytest.raises(AuditUnavailable):
        await env.seed(request_id="r-2")
    assert await env.approvals.lookup("user-custodian\0r-2") is None


async def test_concurrent_approvers_one_wins(env: Env) -> None:
    aid = (await env.seed()).approval.id
    results = await asyncio.gather(*(call(env, "POST", f"/approvals/{aid}/approve")
                                     for _ in range(6)))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(200) == 1
    assert set(statuses) <= {200, 409}
    approved = [r for r in env.records() if r.get("action") == "approved"
                and r["decision"] == "ALLOW"]
    refused = [r for r in env.records() if r.get("action") == "approved"
               and r["decision"] == "DENY"]
    # every attempt that passed the checks was recorded; each loser says so afterwards
    assert len(approved) - len(refused) == 1


async def test_expiry_is_recorded_once(tmp_path: Path) -> None:
    clock = Clock()
    async with approvals_env(tmp_path, clock=clock) as env:
        aid = (await env.seed()).approval.id
        await env.approvals.sweep()
        assert env.metric("casf_approvals_pending") == 1
        clock.now += 901
        status, body = await call(env, "POST", f"/approvals/{aid}/approve")
        assert status == 409 and body["reason_codes"] == ["Approval_NotPending"]
        status, body = await call(env, "GET", f"/approvals/{aid}")
        assert body["approval"]["status"] == "expired"
        await env.approvals.sweep()
        assert env.metric("casf_approvals_pending") == 0
        expired = [r for r in env.records() if r.get("action") == "expired"]
        assert len(expired) == 1
        assert expired[0]["approver"] is None and expired[0]["via"] == "admin"
        assert expired[0]["actor"] == "system"
        # the caller's retry gets a new approval
        again = await env.seed()
        assert again.created and again.approval.id != aid
