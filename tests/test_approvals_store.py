"""Approval stores: the embedded one and Redis (a real redis-server), same behaviour.

Two Redis store instances on one server stand for two replicas (and for a
proxy restart: the second instance only knows what Redis holds).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from proxy.approvals import model
from proxy.approvals.config import ApprovalsConfig, ApprovalsConfigError, parse_approvals
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.model import Approver, Details, NotFound, NotPending, Status
from proxy.approvals.redisstore import RedisApprovalStore
from proxy.approvals.store import ApprovalStore
from proxy.ports import StoreUnavailable
from proxy.redisstate import RedisConnection, RedisSettings
from tests.servers import RedisServer

CFG = ApprovalsConfig(approver_roles=("custodian",), pending_ttl_seconds=60,
                      approved_ttl_seconds=30)
T0 = 1_800_000_000.0
CUSTODIAN2 = Approver("user-custodian2", "custodian", "t1")


def details(caller: str = "user-custodian", tenant: str | None = "t1",
            request_id: str = "r-1") -> Details:
    return Details(tool="cliniccloud.cancel_appointment", effect="write", method="DELETE",
                   route="/appointments/{appointment_id}", caller=caller,
                   caller_role="custodian", tenant=tenant, request_id=request_id,
                   reason_codes=("Approval_Required",),
                   attrs={"subject": {"patient_id": "sha256:ab"}, "args": {}, "context": {}},
                   body_sha256="e3b0", via="proxy")


StoreFactory = Callable[[], ApprovalStore]


@pytest.fixture(params=["memory", "redis"])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """A factory of stores that share state (memory: the same instance)."""
    if request.param == "memory":
        shared = MemoryApprovalStore(CFG)
        yield lambda: shared
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    conns: list[RedisConnection] = []

    def make() -> ApprovalStore:
        conn = RedisConnection(RedisSettings(url=server.url, timeout_s=2.0))
        conns.append(conn)
        return RedisApprovalStore(conn, CFG)

    yield make
    for c in conns:
        await c.close()


async def test_create_is_idempotent_per_key_and_fingerprint(stores: StoreFactory) -> None:
    s = stores()
    first = await s.find_or_create("k1", "fp1", details(), T0)
    assert first.created and not first.mismatch
    a = first.approval
    assert a.status is Status.PENDING and model.valid_id(a.id)
    assert a.expires_at == T0 + 60 and a.tool == "cliniccloud.cancel_appointment"
    assert a.attrs == {"subject": {"patient_id": "sha256:ab"}, "args": {}, "context": {}}
    again = await stores().find_or_create("k1", "fp1", details(), T0 + 1)
    assert (again.approval.id, again.created, again.mismatch) == (a.id, False, False)
    assert (await s.lookup("k1", T0 + 1)) == a
    assert (await s.get(a.id, T0 + 1)) == a
    other_key = await s.find_or_create("k2", "fp1", details(request_id="r-2"), T0)
    assert other_key.created and other_key.approval.id != a.id


async def test_other_fingerprint_under_a_live_approval_is_a_mismatch(
        stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    res = await s.find_or_create("k1", "fp2", details(), T0 + 1)
    assert res.mismatch and not res.created and res.approval.id == a.id
    await s.approve(a.id, CUSTODIAN2, T0 + 2, None)
    res = await s.find_or_create("k1", "fp2", details(), T0 + 3)
    assert res.mismatch and res.approval.status is Status.APPROVED
    # the approval never covers the other fingerprint
    assert await s.consume(a.id, "fp2", T0 + 4) is None
    assert (await s.get(a.id, T0 + 4)).status is Status.APPROVED  # type: ignore[union-attr]


async def test_expired_pending_is_seen_once_and_replaced(stores: StoreFactory) -> None:
    one, two = stores(), stores()
    a = (await one.find_or_create("k1", "fp1", details(), T0)).approval
    assert await one.pending_count(T0 + 1) == 1
    got = await two.get(a.id, T0 + 60)
    assert got is not None and got.status is Status.EXPIRED
    assert [x.id for x in two.take_expired()] == [a.id]
    assert (await one.get(a.id, T0 + 61)).status is Status.EXPIRED  # type: ignore[union-attr]
    assert one.take_expired() == [] or one is two  # marked once, by the store that saw it
    assert await one.pending_count(T0 + 61) == 0
    with pytest.raises(NotPending):
        await one.approve(a.id, CUSTODIAN2, T0 + 61, None)
    res = await one.find_or_create("k1", "fp1", details(), T0 + 62)
    assert res.created and res.approval.id != a.id and res.approval.status is Status.PENDING


async def test_expiry_found_by_find_or_create_is_reported(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    res = await s.find_or_create("k1", "fp1", details(), T0 + 100)
    assert res.created
    assert [x.id for x in s.take_expired()] == [a.id]


async def test_sweep_marks_expired(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    b = (await s.find_or_create("k2", "fp1", details(request_id="r2"), T0 + 50)).approval
    await s.approve(b.id, CUSTODIAN2, T0 + 51, None)
    await s.sweep(T0 + 70)
    assert [x.id for x in s.take_expired()] == [a.id]
    await s.sweep(T0 + 82)  # approved at +51, usable for 30 s
    assert [x.id for x in s.take_expired()] == [b.id]
    assert (await s.get(b.id, T0 + 90)).status is Status.EXPIRED  # type: ignore[union-attr]


async def test_approve_then_consume_once(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    done = await s.approve(a.id, CUSTODIAN2, T0 + 5, "checked with the patient")
    assert done.status is Status.APPROVED and done.approvers == ("user-custodian2",)
    assert done.approved_at == T0 + 5 and done.expires_at == T0 + 35
    assert done.decided_by == "user-custodian2" and done.comment == "checked with the patient"
    assert await s.pending_count(T0 + 6) == 0
    seen = await stores().get(a.id, T0 + 6)
    assert seen == done
    assert seen.policy_field() == {"id": a.id, "status": "approved",
                                   "approvers": ["user-custodian2"],
                                   "approved_at": model.iso(T0 + 5)}
    with pytest.raises(NotPending):
        await s.deny(a.id, CUSTODIAN2, T0 + 6, None)
    used = await s.consume(a.id, "fp1", T0 + 7)
    assert used is not None and used.status is Status.USED and used.used_at == T0 + 7
    assert await s.consume(a.id, "fp1", T0 + 8) is None
    same = await s.find_or_create("k1", "fp1", details(), T0 + 9)
    assert same.approval.status is Status.USED and not same.created


async def test_approved_but_unused_expires(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    await s.approve(a.id, CUSTODIAN2, T0 + 5, None)
    assert await s.consume(a.id, "fp1", T0 + 35) is None
    assert (await s.get(a.id, T0 + 36)).status is Status.EXPIRED  # type: ignore[union-attr]
    assert [x.id for x in s.take_expired()] == [a.id]


async def test_deny_is_final_and_a_corrected_body_gets_a_new_approval(
        stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp1", details(), T0)).approval
    denied = await s.deny(a.id, CUSTODIAN2, T0 + 1, "not this patient")
    assert denied.status is Status.DENIED and denied.comment == "not this patient"
    again = await s.find_or_create("k1", "fp1", details(), T0 + 2)
    assert again.approval.status is Status.DENIED and not again.created
    corrected = await s.find_or_create("k1", "fp2", details(), T0 + 3)
    assert corrected.created and corrected.approval.id != a.id
    with pytest.raises(NotPending):
        await s.approve(a.id, CUSTODIAN2, T0 + 4, None)


async def test_unknown_id(stores: StoreFactory) -> None:
    s = stores()
    with pytest.raises(NotFound):
        await s.approve(model.new_id(), CUSTODIAN2, T0, None)
    assert await s.get(model.new_id(), T0) is None
    assert await s.consume(model.new_id(), "fp", T0) is None
    assert await s.lookup("nothing", T0) is None


async def test_concurrent_consume_has_one_winner(stores: StoreFactory) -> None:
    a = (await stores().find_or_create("k1", "fp1", details(), T0)).approval
    await stores().approve(a.id, CUSTODIAN2, T0 + 1, None)
    replicas = [stores() for _ in range(4)]
    results = await asyncio.gather(*(replicas[i % 4].consume(a.id, "fp1", T0 + 2)
                                     for i in range(20)))
    assert sum(r is not None for r in results) == 1


async def test_concurrent_decisions_have_one_winner(stores: StoreFactory) -> None:
    a = (await stores().find_or_create("k1", "fp1", details(), T0)).approval
    replicas = [stores() for _ in range(3)]

    async def act(i: int) -> str:
        s = replicas[i % 3]
        try:
            if i % 2:
                await s.approve(a.id, CUSTODIAN2, T0 + 1, None)
            else:
                await s.deny(a.id, CUSTODIAN2, T0 + 1, None)
        except NotPending:
            return "lost"
        return "won"

    outcomes = await asyncio.gather(*(act(i) for i in range(12)))
    assert outcomes.count("won") == 1


async def test_list_is_per_tenant_newest_first(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp", details(), T0)).approval
    b = (await s.find_or_create("k2", "fp", details(request_id="r2"), T0 + 1)).approval
    c = (await s.find_or_create("k3", "fp", details(tenant="t2", request_id="r3"),
                                T0 + 2)).approval
    await s.deny(a.id, CUSTODIAN2, T0 + 3, None)
    assert [x.id for x in await s.list_tenant("t1", None, 10, T0 + 4)] == [b.id, a.id]
    assert [x.id for x in await s.list_tenant("t1", Status.PENDING, 10, T0 + 4)] == [b.id]
    assert [x.id for x in await s.list_tenant("t2", Status.PENDING, 10, T0 + 4)] == [c.id]
    assert [x.id for x in await s.list_tenant("t1", None, 1, T0 + 4)] == [b.id]
    assert await s.pending_count(T0 + 4) == 2


async def test_withdraw_drops_only_pending(stores: StoreFactory) -> None:
    s = stores()
    a = (await s.find_or_create("k1", "fp", details(), T0)).approval
    await s.withdraw(a.id)
    assert await s.get(a.id, T0 + 1) is None and await s.lookup("k1", T0 + 1) is None
    b = (await s.find_or_create("k2", "fp", details(request_id="r2"), T0)).approval
    await s.approve(b.id, CUSTODIAN2, T0 + 1, None)
    await s.withdraw(b.id)
    assert (await s.get(b.id, T0 + 2)).status is Status.APPROVED  # type: ignore[union-attr]


async def test_redis_down_is_store_unavailable(redis_server: RedisServer) -> None:
    conn = RedisConnection(RedisSettings(url=redis_server.url, timeout_s=0.5))
    s = RedisApprovalStore(conn, CFG)
    a = (await s.find_or_create("k1", "fp", details(), T0)).approval
    redis_server.stop()
    try:
        for call in (s.find_or_create("k2", "fp", details(), T0), s.get(a.id, T0),
                     s.approve(a.id, CUSTODIAN2, T0, None), s.consume(a.id, "fp", T0),
                     s.pending_count(T0), s.lookup("k1", T0)):
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        await conn.close()


async def test_redis_keys_expire_after_retention(redis_server: RedisServer) -> None:
    conn = RedisConnection(RedisSettings(url=redis_server.url, timeout_s=2.0))
    try:
        s = RedisApprovalStore(conn, CFG)
        a = (await s.find_or_create("k1", "fp", details(), T0)).approval
        ttl = await conn.client.pttl(f"casf:{{apr}}:id:{a.id}")
        assert 0 < ttl <= (60 + 24 * 3600) * 1000
    finally:
        await conn.close()


# ------------------------------------------------------------ pure rules

WHO = {"custodian": Approver("user-custodian", "custodian", "t1"),
       "custodian2": CUSTODIAN2,
       "t2-custodian": Approver("user-t2-custodian", "custodian", "t2"),
       "nurse": Approver("user-nurse", "nurse", "t1")}
RULES = model.Rules(("custodian",), True, 30)


def pending() -> model.Approval:
    return model.create(model.new_id(), "k", "fp", details(), T0, 60)


@pytest.mark.parametrize(("who", "rules", "at", "status", "error"), [
    ("custodian2", RULES, T0 + 1, Status.PENDING, None),
    ("nurse", RULES, T0 + 1, Status.PENDING, model.NotApprover),
    ("t2-custodian", RULES, T0 + 1, Status.PENDING, model.NotFound),
    ("custodian", RULES, T0 + 1, Status.PENDING, model.SelfApproval),
    ("custodian", dataclasses.replace(RULES, four_eyes=False), T0 + 1, Status.PENDING, None),
    ("custodian2", RULES, T0 + 60, Status.PENDING, model.NotPending),
    ("custodian2", RULES, T0 + 1, Status.DENIED, model.NotPending),
    ("custodian2", RULES, T0 + 1, Status.USED, model.NotPending),
    ("custodian2", RULES, T0 + 1, Status.APPROVED, model.NotPending),
    # the role is checked first: a nurse learns nothing about other tenants
    ("nurse", RULES, T0 + 60, Status.DENIED, model.NotApprover),
])
def test_check_decider(who: str, rules: model.Rules, at: float, status: Status,
                       error: type[Exception] | None) -> None:
    a = dataclasses.replace(pending(), status=status)
    if error is None:
        assert model.approve(a, WHO[who], rules, at, None).status is Status.APPROVED
    else:
        with pytest.raises(error):
            model.approve(a, WHO[who], rules, at, None)


def test_ids_are_random_and_validated() -> None:
    ids = {model.new_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(model.valid_id(i) and len(i) == 36 for i in ids)
    for bad in ("apr_", "apr_short", "xyz_" + "a" * 32, "apr_" + "a" * 33, "apr_" + "!" * 32,
                "APR_" + "a" * 32, "apr_" + "a" * 31 + "/"):
        assert not model.valid_id(bad)


@pytest.mark.parametrize(("body", "ok"), [
    (None, None), ({}, None), ({"comment": "fine"}, "fine"), ({"comment": ""}, None),
    ({"comment": "x" * 500}, "x" * 500), ({"comment": "x" * 501}, ValueError),
    ({"comment": 5}, ValueError), ({"other": 1}, ValueError), ([], ValueError),
    ("text", ValueError),
])
def test_parse_comment(body: Any, ok: Any) -> None:
    if ok is ValueError:
        with pytest.raises(ValueError):
            model.parse_comment(body)
    else:
        assert model.parse_comment(body) == ok


# ------------------------------------------------------------ config

def test_config_defaults_and_values() -> None:
    assert parse_approvals(None) is None
    cfg = parse_approvals({"approver_roles": ["custodian"]})
    assert cfg == ApprovalsConfig(approver_roles=("custodian",))
    assert cfg is not None and cfg.four_eyes and cfg.pending_ttl_seconds == 900
    assert cfg.notify.webhook_url is None and cfg.notify.timeout_ms == 2000
    assert cfg.notify.retries == 3 and cfg.console.cookie_secure
    env = {"CASF_APPROVAL_WEBHOOK": "http://hooks.example/x", "TTL": "120"}

    def expand(value: str, path: str) -> str:
        for k, v in env.items():
            value = value.replace("${" + k + ":-}", v).replace("${" + k + "}", v)
        return value.replace("${NONE:-}", "")

    cfg = parse_approvals({"approver_roles": ["custodian", "doctor"], "four_eyes": False,
                           "pending_ttl_seconds": "${TTL}", "approved_ttl_seconds": 60,
                           "notify": {"webhook_url": "${CASF_APPROVAL_WEBHOOK:-}",
                                      "timeout_ms": 500, "retries": 0},
                           "console": {"session_ttl_seconds": 300, "cookie_secure": "false"}},
                          expand=expand)
    assert cfg is not None
    assert cfg.approver_roles == ("custodian", "doctor") and not cfg.four_eyes
    assert cfg.pending_ttl_seconds == 120 and cfg.approved_ttl_seconds == 60
    assert cfg.notify.webhook_url == "http://hooks.example/x" and cfg.notify.retries == 0
    assert cfg.console.session_ttl_seconds == 300 and not cfg.console.cookie_secure
    off = parse_approvals({"approver_roles": ["c"], "notify": {"webhook_url": "${NONE:-}"}},
                          expand=expand)
    assert off is not None and off.notify.webhook_url is None


@pytest.mark.parametrize(("raw", "message"), [
    ([], "approvals: expected a mapping"),
    ({}, "approvals.approver_roles: must be a non-empty list"),
    ({"approver_roles": []}, "approvals.approver_roles: must be a non-empty list"),
    ({"approver_roles": "custodian"}, "approvals.approver_roles: must be a non-empty list"),
    ({"approver_roles": [3]}, "approvals.approver_roles[0]: must be a role name"),
    ({"approver_roles": ["c"], "pending_ttl_seconds": 0},
     "approvals.pending_ttl_seconds: must be a positive integer"),
    ({"approver_roles": ["c"], "pending_ttl_seconds": -5},
     "approvals.pending_ttl_seconds: must be a positive integer"),
    ({"approver_roles": ["c"], "approved_ttl_seconds": "soon"},
     "approvals.approved_ttl_seconds: must be a positive integer"),
    ({"approver_roles": ["c"], "approved_ttl_seconds": True},
     "approvals.approved_ttl_seconds: must be a positive integer"),
    ({"approver_roles": ["c"], "four_eyes": "maybe"}, "approvals.four_eyes: must be true"),
    ({"approver_roles": ["c"], "colour": 1}, "approvals.colour: unknown key"),
    ({"approver_roles": ["c"], "notify": {"webhook_url": 5}},
     "approvals.notify.webhook_url: must be a URL"),
    ({"approver_roles": ["c"], "notify": {"webhook_url": "ftp://x"}},
     "approvals.notify.webhook_url: must be an http"),
    ({"approver_roles": ["c"], "notify": {"timeout_ms": 0}},
     "approvals.notify.timeout_ms: must be a positive integer"),
    ({"approver_roles": ["c"], "notify": {"retries": -1}},
     "approvals.notify.retries: must be an integer >= 0"),
    ({"approver_roles": ["c"], "notify": {"retries": 11}},
     "approvals.notify.retries: must be at most 10"),
    ({"approver_roles": ["c"], "console": {"session_ttl_seconds": 0}},
     "approvals.console.session_ttl_seconds: must be a positive integer"),
    ({"approver_roles": ["c"], "console": {"secure": True}},
     "approvals.console.secure: unknown key"),
])
def test_config_errors_name_the_path(raw: object, message: str) -> None:
    with pytest.raises(ApprovalsConfigError) as info:
        parse_approvals(raw)
    assert str(info.value).startswith(message), str(info.value)
