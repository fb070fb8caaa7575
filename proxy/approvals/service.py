"""The approvals service: the store, the audit chain, metrics and the webhook, together.

This is what the decision core and the approver API call; each transition
is audited **before** it takes effect (as the operator's mode switch):

- :meth:`Approvals.request` (NEEDS_APPROVAL for a request with an id):
  finds the approval bound to the caller's request id or creates one. A new
  one is recorded (``created``); when that record cannot be committed the
  approval is withdrawn and :class:`~proxy.ports.AuditUnavailable` raised.
- :meth:`Approvals.consume` (an approved retry about to be forwarded): the
  ``used`` record is committed, then the approval is used atomically; when
  another retry used it first, a ``used`` record with ``DENY`` 409 follows
  and None is returned (that retry must not be forwarded).
- :meth:`Approvals.decide` (approve or deny): the rules of
  :func:`proxy.approvals.model.check_decider`, the record, then the atomic
  transition; when that loses a race or the store fails, a second record
  with ``DENY`` says so.
- Expiry discovered by any of these (or by the periodic sweep) is recorded
  once (``expired``); it has already happened, so a failed record is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from proxy.approvals import model
from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.metrics import ApprovalMetrics
from proxy.approvals.model import Approval, Approver, Details, NotPending, Rules, Status
from proxy.approvals.notify import WebhookNotifier
from proxy.approvals.records import approval_record
from proxy.approvals.store import ApprovalStore, FindResult
from proxy.audit.records import now_iso
from proxy.ports import AuditSink, AuditUnavailable, StoreUnavailable
from proxy.reasons import Reason
from proxy.tasks import spawn

log = logging.getLogger("casf.approvals")


class Approvals:
    """One instance per proxy process; ``start``/``close`` own the sweeper and the webhook.

    ``event_id``, ``policy_hash`` and ``config_hash`` come from the decision
    core (the same ids and hashes its own records carry); ``clock`` is the
    wall clock in seconds.
    """

    def __init__(self, cfg: ApprovalsConfig, store: ApprovalStore, audit: AuditSink, *,
                 event_id: Callable[[], str], policy_hash: Callable[[], str],
                 config_hash: Callable[[], str | None] = lambda: None,
                 metrics: ApprovalMetrics | None = None,
                 notifier: WebhookNotifier | None = None,
                 clock: Callable[[], float] = time.time,
                 sweep_interval_s: float = 5.0) -> None:
        self.cfg = cfg
        self.store = store
        self.audit = audit
        self.metrics = metrics
        self.notifier = notifier
        self.clock = clock
        self.rules = Rules(cfg.approver_roles, cfg.four_eyes, cfg.approved_ttl_seconds)
        self._event_id = event_id
        self._policy_hash = policy_hash
        self._config_hash = config_hash
        self._sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task[Any] | None = None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.notifier is not None:
            await self.notifier.start()
        self._sweeper = spawn(self._sweep_loop(), name="casf-approval-sweeper")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.notifier is not None:
            await self.notifier.close()
        await self.store.close()

    async def _sweep_loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except StoreUnavailable as exc:
                log.warning("approval sweep skipped: %s", exc)
            except Exception:
                log.exception("approval sweep failed")
            await asyncio.sleep(self._sweep_interval_s)

    async def sweep(self) -> None:
        """Mark and record expired approvals; refresh ``casf_approvals_pending``."""
        now = self.clock()
        await self.store.sweep(now)
        await self._flush_expired()
        if self.metrics is not None:
            self.metrics.pending.set(await self.store.pending_count(now))

    # ------------------------------------------------------------ records

    def _record(self, a: Approval, action: str, *, approver: Approver | None = None,
                trace_id: str | None = None, decision: str = "ALLOW", status: int = 200,
                reasons: tuple[str, ...] = ()) -> dict[str, Any]:
        return approval_record(a, action, event_id=self._event_id(), ts=now_iso(),
                               policy_hash=self._policy_hash(),
                               config_hash=self._config_hash(), approver=approver,
                               trace_id=trace_id, decision=decision, status=status,
                               reasons=reasons)

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.total.labels(action).inc()

    async def _flush_expired(self) -> None:
        for a in self.store.take_expired():
            self._count("expired")
            try:
                await self.audit.append(self._record(a, "expired"))
            except AuditUnavailable:
                log.error("expiry of approval %s could not be recorded", a.id)

    async def _refused(self, record: dict[str, Any]) -> None:
        with contextlib.suppress(AuditUnavailable):
            await self.audit.append(record)

    # ------------------------------------------------------------ decision core

    async def request(self, binding_key: str, fingerprint: str, details: Details,
                      trace_id: str | None = None) -> FindResult:
        """The approval for a NEEDS_APPROVAL request (see the module docstring)."""
        res = await self.store.find_or_create(binding_key, fingerprint, details, self.clock())
        await self._flush_expired()
        if res.created:
            try:
                await self.audit.append(self._record(res.approval, "created",
                                                     trace_id=trace_id))
            except AuditUnavailable:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.withdraw(res.approval.id)
                raise
            self._count("created")
            if self.metrics is not None:
                self.metrics.pending.inc()
            if self.notifier is not None:
                self.notifier.submit(res.approval)
        return res

    async def lookup(self, binding_key: str) -> Approval | None:
        """The approval bound to a caller's request id, as it stands now."""
        a = await self.store.lookup(binding_key, self.clock())
        await self._flush_expired()
        return a

    async def consume(self, a: Approval, fingerprint: str, trace_id: str | None = None
                      ) -> Approval | None:
        """Use an approved approval for the retry about to be forwarded; None: do not forward.

        Raises :class:`AuditUnavailable` (nothing used) or :class:`StoreUnavailable`.
        """
        now = self.clock()
        used = model.use(a, fingerprint, now)
        if used is None:
            return None
        await self.audit.append(self._record(used, "used", trace_id=trace_id))
        try:
            got = await self.store.consume(a.id, fingerprint, now)
        except StoreUnavailable:
            await self._refused(self._record(used, "used", trace_id=trace_id, decision="DENY",
                                             status=503, reasons=(
                                                 Reason.FAIL_CLOSED,
                                                 Reason.APPROVAL_STORE_UNAVAILABLE)))
            raise
        await self._flush_expired()
        if got is None:
            await self._refused(self._record(used, "used", trace_id=trace_id, decision="DENY",
                                             status=409,
                                             reasons=(Reason.APPROVAL_NOT_PENDING,)))
            return None
        self._count("used")
        return got

    # ------------------------------------------------------------ approvers

    async def get_for(self, who: Approver, approval_id: str) -> Approval:
        """An approval the approver may see (NotApprover / NotFound otherwise)."""
        model.check_role(who, self.rules)
        a = await self.store.get(approval_id, self.clock())
        await self._flush_expired()
        return model.visible(a, who)

    async def list_for(self, who: Approver, status: Status | None, limit: int = 100
                       ) -> list[Approval]:
        model.check_role(who, self.rules)
        out = await self.store.list_tenant(who.tenant, status, limit, self.clock())
        await self._flush_expired()
        return out

    async def decide(self, approval_id: str, who: Approver, approve: bool,
                     comment: str | None, trace_id: str | None = None) -> Approval:
        """Approve or deny; raises a :mod:`proxy.approvals.model` error, AuditUnavailable
        (nothing changed) or StoreUnavailable."""
        now = self.clock()
        model.check_role(who, self.rules)
        current = await self.store.get(approval_id, now)
        await self._flush_expired()
        action = "approved" if approve else "denied"
        transition = model.approve if approve else model.deny
        planned = transition(model.visible(current, who), who, self.rules, now, comment)
        await self.audit.append(self._record(planned, action, approver=who,
                                             trace_id=trace_id))
        op = self.store.approve if approve else self.store.deny
        try:
            done = await op(approval_id, who, now, comment)
        except NotPending:
            await self._flush_expired()
            await self._refused(self._record(planned, action, approver=who, trace_id=trace_id,
                                             decision="DENY", status=409,
                                             reasons=(Reason.APPROVAL_NOT_PENDING,)))
            raise
        except StoreUnavailable:
            await self._refused(self._record(planned, action, approver=who, trace_id=trace_id,
                                             decision="DENY", status=503,
                                             reasons=(Reason.FAIL_CLOSED,
                                                      Reason.APPROVAL_STORE_UNAVAILABLE)))
            raise
        self._count(action)
        if self.metrics is not None:
            self.metrics.pending.dec()
        return done
