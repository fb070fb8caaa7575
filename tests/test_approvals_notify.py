"""The approval webhook against real aiohttp servers: flaky, hanging, and a full queue."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.approvals.config import ApprovalsConfig, NotifyConfig
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.metrics import ApprovalMetrics
from proxy.approvals.notify import WebhookNotifier
from proxy.approvals.service import Approvals
from proxy.audit.records import EventIds
from proxy.audit.sqlite import SqliteAuditSink
from tests.approvals_support import POLICY_HASH, details

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def hook_server(handler: Handler) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/hook", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def service(tmp_path: Path, notify: NotifyConfig, registry: CollectorRegistry
                  ) -> AsyncIterator[Approvals]:
    cfg = ApprovalsConfig(approver_roles=("custodian",), notify=notify)
    metrics = ApprovalMetrics(registry)
    sink = SqliteAuditSink(tmp_path / "audit.db", "c", timeout_s=2.0)
    await sink.start()
    svc = Approvals(cfg, MemoryApprovalStore(cfg), sink, event_id=EventIds().next,
                    policy_hash=lambda: POLICY_HASH, metrics=metrics,
                    notifier=WebhookNotifier(notify, metrics, backoff_base_s=0.01))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()
        await sink.close()


async def test_retries_until_delivered_and_sends_no_attributes(tmp_path: Path) -> None:
    got: list[dict[str, Any]] = []

    async def flaky(request: web.Request) -> web.Response:
        got.append(await request.json())
        return web.Response(status=503 if len(got) <= 2 else 204)

    registry = CollectorRegistry()
    async with hook_server(flaky) as url, service(
            tmp_path, NotifyConfig(url, timeout_ms=2000, retries=3), registry) as svc:
        res = await svc.request("user-custodian\0r-1", "fp", details())
        assert svc.notifier is not None
        await svc.notifier.idle()
        assert len(got) == 3
        assert got[0] == got[2] == {"id": res.approval.id,
                                    "tool": "cliniccloud.cancel_appointment",
                                    "tenant": "t1", "caller": "user-custodian",
                                    "expires_at": res.approval.envelope_field()["expires_at"]}
        assert svc.notifier.delivered == 1 and svc.notifier.failed == 0
        assert registry.get_sample_value("casf_approval_notifications_total",
                                         {"result": "delivered"}) == 1
        # the same approval found again is not notified again
        await svc.request("user-custodian\0r-1", "fp", details())
        await svc.notifier.idle()
        assert len(got) == 3


async def test_hanging_webhook_never_blocks_and_is_given_up(tmp_path: Path) -> None:
    release = asyncio.Event()
    hits: list[int] = []

    async def hang(request: web.Request) -> web.Response:
        hits.append(1)
        await release.wait()
        return web.Response(status=204)

    registry = CollectorRegistry()
    try:
        async with hook_server(hang) as url, service(
                tmp_path, NotifyConfig(url, timeout_ms=100, retries=1), registry) as svc:
            assert svc.notifier is not None
            # the requests return while the webhook hangs: nothing waits for it
            first = await svc.request("user-custodian\0r-1", "fp", details())
            second = await svc.request("user-custodian\0r-2", "fp", details(request_id="r-2"))
            assert first.created and second.created
            assert svc.notifier.delivered == 0
            await svc.notifier.idle()
            assert svc.notifier.failed == 2 and svc.notifier.delivered == 0
            assert len(hits) == 4  # each: the attempt and one retry
            assert registry.get_sample_value("casf_approval_notifications_total",
                                             {"result": "failed"}) == 2
            release.set()  # let the server's hung handlers end before it stops
    finally:
        release.set()


async def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(status=204)

    registry = CollectorRegistry()
    async with hook_server(hang) as url:
        notify = NotifyConfig(url, timeout_ms=60_000, retries=0)
        notifier = WebhookNotifier(notify, ApprovalMetrics(registry), queue_size=2)
        await notifier.start()
        try:
            from proxy.approvals.model import create, new_id
            items = [create(new_id(), f"k{i}", "fp", details(request_id=f"r{i}"), 0.0, 60)
                     for i in range(6)]
            for a in items:
                notifier.submit(a)
            # at most one in flight and two queued: the rest are dropped at once
            assert notifier.dropped >= 3
            assert registry.get_sample_value("casf_approval_notifications_total",
                                             {"result": "dropped"}) == notifier.dropped
        finally:
            release.set()
            await notifier.idle()
            await notifier.close()
        assert notifier.delivered + notifier.dropped == 6


def test_no_url_is_refused() -> None:
    with pytest.raises(ValueError):
        WebhookNotifier(NotifyConfig(None))
