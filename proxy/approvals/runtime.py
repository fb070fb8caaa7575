"""Building the approvals of one proxy process from its config (one call for the core)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.metrics import ApprovalMetrics
from proxy.approvals.notify import WebhookNotifier
from proxy.approvals.redisstore import RedisApprovalStore
from proxy.approvals.service import Approvals
from proxy.approvals.store import ApprovalStore
from proxy.ports import AuditSink
from proxy.redisstate import RedisConnection


@contextlib.asynccontextmanager
async def open_approvals(cfg: ApprovalsConfig, *, audit: AuditSink,
                         redis: RedisConnection | None, registry: CollectorRegistry,
                         event_id: Callable[[], str], policy_hash: Callable[[], str],
                         config_hash: Callable[[], str | None] = lambda: None
                         ) -> AsyncIterator[Approvals]:
    """The service on Redis (``redis`` given) or in memory, with its metrics on
    ``registry``, its webhook when configured, and its sweeper running."""
    metrics = ApprovalMetrics(registry)
    store: ApprovalStore = (RedisApprovalStore(redis, cfg) if redis is not None
                            else MemoryApprovalStore(cfg))
    notifier = (WebhookNotifier(cfg.notify, metrics) if cfg.notify.webhook_url is not None
                else None)
    svc = Approvals(cfg, store, audit, event_id=event_id, policy_hash=policy_hash,
                    config_hash=config_hash, metrics=metrics, notifier=notifier)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.close()
