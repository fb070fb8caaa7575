"""The audit trail as the decision core and every front door use it.

One object per config generation: it builds records (redaction, the policy
hash, event ids), commits the ones a request waits for (``record``), queues
the ones nobody waits for (``record_later``: outcome records, refusals), and
waits for the queued ones at shutdown (``flush``). It never decides anything;
a failed commit raises :class:`~proxy.ports.AuditUnavailable` to the caller,
which then refuses the request (503 ``Audit_Unavailable``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from proxy.audit.records import EventIds, base_record
from proxy.audit.spool import AuditSpooled
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.ports import AuditSink, AuditUnavailable
from proxy.reasons import Reason

errlog = logging.getLogger("casf.pipeline")

# the answer when a decision's record cannot be committed: nothing moves
AUDIT_UNAVAILABLE = Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.AUDIT_UNAVAILABLE),
                            "the audit store is unavailable; request refused",
                            (("Retry-After", "1"),), shadowable=False,
                            fail_closed_trigger="audit")


class AuditTrail:
    def __init__(self, sink: AuditSink, metrics: Metrics, policy_hash: str,
                 redact: Any, config_hash: str, event_ids: EventIds | None = None) -> None:
        self.sink = sink
        self.metrics = metrics
        self.policy_hash = policy_hash
        self.config_hash = config_hash
        self.redact = redact
        self.event_ids = event_ids if event_ids is not None else EventIds()
        self._pending: set[asyncio.Future[Any]] = set()

    def build(self, ex: Exchange, kind: str, decision: str, status: int,
              reasons: tuple[str, ...], extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
        record = base_record(ex, kind, decision, status, reasons, self.policy_hash,
                             self.redact, self.event_ids.next())
        record["config_hash"] = self.config_hash
        record["via"] = ex.door
        if ex.record_extra and kind == "decision":
            record.update(ex.record_extra)
        if extra:
            record.update(extra)
        return record

    async def record(self, ex: Exchange, kind: str, decision: str, status: int,
                     reasons: tuple[str, ...], **extra: Any) -> dict[str, Any]:
        """Commit a record; returns it. Raises AuditUnavailable (counted)."""
        record = self.build(ex, kind, decision, status, reasons, extra)
        with ex.span.stage("audit commit"):
            await self.commit(record)
        return record

    async def commit(self, record: dict[str, Any]) -> None:
        try:
            await self.sink.append(record)
        except AuditUnavailable:
            self.metrics.audit_errors.inc()
            raise
        self.metrics.audit_events.labels(str(record["kind"])).inc()

    def refuse(self, ex: Exchange) -> Verdict:
        """The 503 for a request whose record could not be committed.

        The record the request waited for may still be committed after the
        wait gave up (it was already in a batch): the refusal is queued behind
        it, so the chain never shows an ALLOW for a request that was not
        forwarded without the DENY that ended it. Nobody waits for the
        refusal: if its batch fails too, it is kept in the local spool
        (``audit.spool_dir``) and written to the chain, in order, once the
        store commits again; it is lost only when the spool is full or unusable.
        """
        self.metrics.fail_closed.labels("audit").inc()
        v = AUDIT_UNAVAILABLE
        self.record_later(ex, self.build(ex, "decision", v.decision, v.status, v.reasons))
        return v

    def record_later(self, ex: Exchange, record: dict[str, Any]) -> None:
        """Queue a record nobody waits for; its commit or failure is counted and logged."""
        kind = str(record["kind"])
        try:
            pending = self.sink.append_later(record)
        except AuditUnavailable:
            self._failed(kind, ex.trace_id)
            return
        self._pending.add(pending)
        pending.add_done_callback(lambda f: self._done(f, kind, ex.trace_id))

    async def flush(self) -> None:
        """Wait until every queued record is committed (or has failed)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    def _done(self, fut: asyncio.Future[Any], kind: str, trace_id: str) -> None:
        self._pending.discard(fut)
        if fut.cancelled():
            self._failed(kind, trace_id)
            return
        exc = fut.exception()
        if exc is None:
            self.metrics.audit_events.labels(kind).inc()
        elif isinstance(exc, AuditSpooled):  # kept: written once the store is back
            self.metrics.audit_spooled.inc()
            errlog.warning("%s record kept in the local audit spool (trace %s)", kind, trace_id)
        else:
            self._failed(kind, trace_id)

    def _failed(self, kind: str, trace_id: str) -> None:
        self.metrics.audit_errors.inc()
        errlog.error("%s record not audited (trace %s)", kind, trace_id)
