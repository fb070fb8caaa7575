"""The retry states the decision core acts on, and the one-call runtime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.approvals import core, model
from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.core import RetryState, retry_state
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.model import Status
from proxy.approvals.redisstore import RedisApprovalStore
from proxy.approvals.runtime import open_approvals
from proxy.audit.records import EventIds
from proxy.audit.sqlite import SqliteAuditSink
from proxy.redisstate import RedisConnection, RedisSettings
from tests.approvals_support import details
from tests.servers import RedisServer


def approval(status: Status, fp: str = "fp") -> model.Approval:
    a = model.create(model.new_id(), "k", fp, details(), 0.0, 60)
    return dataclasses.replace(a, status=status)


@pytest.mark.parametrize(("status", "fp", "state"), [
    (None, "fp", RetryState.NONE),
    (Status.PENDING, "fp", RetryState.PENDING),
    (Status.APPROVED, "fp", RetryState.APPROVED),
    (Status.DENIED, "fp", RetryState.DENIED),
    (Status.USED, "fp", RetryState.USED),
    (Status.EXPIRED, "fp", RetryState.NONE),
    (Status.PENDING, "other", RetryState.MISMATCH),
    (Status.APPROVED, "other", RetryState.MISMATCH),
    (Status.DENIED, "other", RetryState.NONE),
    (Status.USED, "other", RetryState.NONE),
    (Status.EXPIRED, "other", RetryState.NONE),
])
def test_retry_state(status: Status | None, fp: str, state: RetryState) -> None:
    a = approval(status) if status is not None else None
    assert retry_state(a, fp) is state


def test_verdicts() -> None:
    v = core.pending_verdict(("Role_NeedsCustodian",))
    assert (v.decision, v.status) == ("NEEDS_APPROVAL", 403)
    assert v.reasons == ("Approval_Required", "Role_NeedsCustodian")
    assert core.DENIED.reasons == ("Approval_Denied",) and core.DENIED.status == 403
    assert core.NOT_PENDING.status == 409


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_open_approvals_picks_the_store(tmp_path: Path, backend: str,
                                              request: pytest.FixtureRequest) -> None:
    cfg = ApprovalsConfig(approver_roles=("custodian",))
    sink = SqliteAuditSink(tmp_path / "a.db", "c", timeout_s=2)
    await sink.start()
    conn = None
    if backend == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        conn = RedisConnection(RedisSettings(url=server.url, timeout_s=2.0))
    registry = CollectorRegistry()
    try:
        async with open_approvals(cfg, audit=sink, redis=conn, registry=registry,
                                  event_id=EventIds().next,
                                  policy_hash=lambda: "sha256:p") as svc:
            expected = RedisApprovalStore if backend == "redis" else MemoryApprovalStore
            assert isinstance(svc.store, expected) and svc.notifier is None
            res = await svc.request("k", "fp", details())
            assert res.created
            await svc.sweep()
            assert registry.get_sample_value("casf_approvals_pending") == 1
            assert registry.get_sample_value("casf_approvals_total",
                                             {"action": "created"}) == 1
    finally:
        await sink.close()
        if conn is not None:
            await conn.close()
