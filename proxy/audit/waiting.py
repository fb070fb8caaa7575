"""Handing a record to a sink's writer and waiting for its commit (both sinks).

The waiter gets the receipt once the record's batch committed, or
``AuditUnavailable`` after ``timeout_s``. The timeout is one timer handle per
record (cheaper on the hot path than a cancel scope); an expired record's
future is done, so the writer skips it or leaves it alone.

The queue is bounded (``queue_max`` records): when it is full, ``append``
and ``append_later`` raise ``AuditUnavailable`` at once (the request is
refused 503 ``Audit_Unavailable``) and ``rejected_full`` counts it
(``casf_audit_queue_full_total``), so a slow store cannot grow memory
without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from proxy.ports import AuditReceipt, AuditUnavailable

# (record, its future, handed over with append_later: nobody waits, so it is spooled
# rather than given up when its batch fails)
Pending = tuple[dict[str, Any], "asyncio.Future[AuditReceipt]", bool]
DEFAULT_QUEUE_MAX = 10_000


def _consume(fut: asyncio.Future[AuditReceipt]) -> None:
    """Mark a result as seen so a waiter that gave up leaves no warning."""
    if not fut.cancelled():
        fut.exception()


def _expire(fut: asyncio.Future[AuditReceipt]) -> None:
    if not fut.done():
        fut.set_exception(AuditUnavailable("audit commit timed out"))


class QueuedSink:
    """The request side of both sinks: records go on ``_queue`` for the writer task.

    ``on_full`` (optional) is called once per record refused because the
    queue is full, e.g. to count ``casf_audit_queue_full_total``.
    """

    _queue: asyncio.Queue[Pending]
    _writer: asyncio.Task[None] | None
    timeout_s: float
    queue_max: int
    rejected_full: int
    on_full: Callable[[], None] | None

    def _init_queue(self, queue_max: int, on_full: Callable[[], None] | None) -> None:
        if queue_max < 1:
            raise ValueError("queue_max must be at least 1")
        self.queue_max = queue_max
        self._queue = asyncio.Queue(maxsize=queue_max)
        self.rejected_full = 0  # records refused because the queue was full
        self.on_full = on_full

    def _check_writer(self) -> None:
        if self._writer is None or self._writer.done():
            raise AuditUnavailable("audit writer is not running")

    def _put(self, entry: Pending) -> None:
        try:
            self._queue.put_nowait(entry)
        except asyncio.QueueFull:
            self.rejected_full += 1
            if self.on_full is not None:
                self.on_full()
            raise AuditUnavailable(f"audit queue full ({self.queue_max} records waiting for "
                                   "the store)") from None

    async def append(self, record: dict[str, Any]) -> AuditReceipt:
        """Wait for the record's commit (at most ``timeout_s``)."""
        self._check_writer()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AuditReceipt] = loop.create_future()
        fut.add_done_callback(_consume)
        self._put((record, fut, False))
        timer = loop.call_later(self.timeout_s, _expire, fut)
        try:
            return await fut
        finally:
            timer.cancel()

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

    def _leftovers(self) -> list[Pending]:
        """What is still queued once the writer has stopped (for the spool, at close)."""
        out: list[Pending] = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
            self._queue.task_done()
        return out

    def append_later(self, record: dict[str, Any]) -> asyncio.Future[AuditReceipt]:
        """Queue a record nobody waits for and return at once.

        No timer: a record that no request is waiting on is never given up, so a
        slow commit delays it but does not drop it (the sink's health reports the
        slow commit). The future settles with its commit; when its batch fails it
        is kept in the local spool (``AuditSpooled``, written once the store is
        back), or fails with ``AuditUnavailable`` when the spool cannot take it.
        """
        self._check_writer()
        fut: asyncio.Future[AuditReceipt] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_consume)
        self._put((record, fut, True))
        return fut
