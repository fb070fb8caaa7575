"""Webhook notification of new approvals: a bounded queue drained by one background task.

:meth:`WebhookNotifier.submit` never waits: the request that created the
approval goes on whatever happens to the webhook. The task POSTs
``{"id", "tool", "tenant", "caller", "expires_at"}`` (never attribute values)
with a total timeout of ``notify.timeout_ms`` per attempt and up to
``notify.retries`` retries with a bounded exponential backoff. A full queue
drops the notification; a notification that fails every attempt is given
up. Both are counted (``casf_approval_notifications_total{result}``) and
logged without the payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from proxy.approvals.config import NotifyConfig
from proxy.approvals.metrics import ApprovalMetrics
from proxy.approvals.model import Approval, iso
from proxy.tasks import spawn

log = logging.getLogger("casf.approvals")

BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 5.0


def payload(a: Approval) -> dict[str, Any]:
    return {"id": a.id, "tool": a.tool, "tenant": a.tenant, "caller": a.caller,
            "expires_at": iso(a.expires_at)}


class WebhookNotifier:
    def __init__(self, cfg: NotifyConfig, metrics: ApprovalMetrics | None = None, *,
                 queue_size: int = 1000, backoff_base_s: float = BACKOFF_BASE_S) -> None:
        if cfg.webhook_url is None:
            raise ValueError("no webhook_url configured")
        self.url = cfg.webhook_url
        self.cfg = cfg
        self.metrics = metrics
        self.backoff_base_s = backoff_base_s
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=queue_size)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[Any] | None = None
        self.delivered = 0
        self.failed = 0
        self.dropped = 0

    def _count(self, result: str) -> None:
        setattr(self, result, getattr(self, result) + 1)
        if self.metrics is not None:
            self.metrics.notifications.labels(result).inc()

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout_ms / 1000)
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._task = spawn(self._run(), name="casf-approval-webhook")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    def submit(self, a: Approval) -> None:
        """Queue the notification of a new approval (never blocks)."""
        try:
            self._queue.put_nowait(payload(a))
        except asyncio.QueueFull:
            log.warning("approval webhook queue full: notification of %s dropped", a.id)
            self._count("dropped")

    async def idle(self) -> None:
        """Wait until every queued notification was delivered or given up (tests)."""
        await self._queue.join()

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                ok = await self._deliver(item)
                self._count("delivered" if ok else "failed")
            finally:
                self._queue.task_done()

    async def _deliver(self, item: dict[str, Any]) -> bool:
        assert self._session is not None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                await asyncio.sleep(min(BACKOFF_MAX_S, self.backoff_base_s * 2 ** (attempt - 1)))
            try:
                async with self._session.post(self.url, json=item) as resp:
                    if 200 <= resp.status < 300:
                        return True
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problem = type(exc).__name__
            log.warning("approval webhook attempt %d for %s failed: %s", attempt + 1,
                        item["id"], problem)
        return False
