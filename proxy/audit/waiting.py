"""Handing a record to a sink's writer and waiting for its commit (both sinks).

The waiter gets the receipt once the record's batch committed, or
``AuditUnavailable`` after ``timeout_s``. The timeout is one timer handle per
record (cheaper on the hot path than a cancel scope); an expired record's
future is done, so the writer skips it or leaves it alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.ports import AuditReceipt, AuditUnavailable

Pending = tuple[dict[str, Any], "asyncio.Future[AuditReceipt]"]


def _consume(fut: asyncio.Future[AuditReceipt]) -> None:
    """Mark a result as seen so a waiter that gave up leaves no warning."""
    if not fut.cancelled():
        fut.exception()


def _expire(fut: asyncio.Future[AuditReceipt]) -> None:
    if not fut.done():
        fut.set_exception(AuditUnavailable("audit commit timed out"))


async def submit(queue: asyncio.Queue[Pending], record: dict[str, Any],
                 timeout_s: float) -> AuditReceipt:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[AuditReceipt] = loop.create_future()
    fut.add_done_callback(_consume)
    timer = loop.call_later(timeout_s, _expire, fut)
    queue.put_nowait((record, fut))
    try:
        return await fut
    finally:
        timer.cancel()
