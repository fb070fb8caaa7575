"""Handing a record to a sink's writer and waiting for its commit (both sinks).

The waiter gets the receipt once the record's batch committed, or
``AuditUnavailable`` after ``timeout_s``. The timeout is one timer handle per
record (cheaper on the hot path than a cancel scope); an expired record's
future is done, so the writer skips it or leaves it alone.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def enqueue(queue: asyncio.Queue[Pending], record: dict[str, Any]
            ) -> asyncio.Future[AuditReceipt]:
    """Hand over a record nobody waits for; the future settles with its commit.

    No timer: a record that no request is waiting on is never given up, so a
    slow commit delays it but does not drop it (the sink's health reports the
    slow commit).
    """
    fut: asyncio.Future[AuditReceipt] = asyncio.get_running_loop().create_future()
    fut.add_done_callback(_consume)
    queue.put_nowait((record, fut))
    return fut


class QueuedSink:
    """The request side of both sinks: records go on ``_queue`` for the writer task."""

    _queue: asyncio.Queue[Pending]
    _writer: asyncio.Task[None] | None
    timeout_s: float

    def _check_writer(self) -> None:
        if self._writer is None or self._writer.done():
            raise AuditUnavailable("audit writer is not running")

    async def append(self, record: dict[str, Any]) -> AuditReceipt:
        """Wait for the record's commit (at most ``timeout_s``)."""
        self._check_writer()
        return await submit(self._queue, record, self.timeout_s)

    async def _stop_writer(self) -> None:
        """Let the writer write what is queued, then stop it.

        The wait is bounded by twice the commit timeout and ends at once if the
        writer has stopped (nobody would take the records).
        """
        writer = self._writer
        if writer is None:
            return
        if not writer.done():
            joined = asyncio.ensure_future(self._queue.join())
            try:
                await asyncio.wait({joined, writer}, timeout=self.timeout_s * 2,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                joined.cancel()
        writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writer

    def append_later(self, record: dict[str, Any]) -> asyncio.Future[AuditReceipt]:
        """Queue the record and return at once; the future settles with its commit."""
        self._check_writer()
        return enqueue(self._queue, record)
