"""Approval: what a human approver decided about this very request (before the policy).

A request that holds an idempotency claim (a request id, on a write or a
decision door) may have an approval bound to its caller-scoped request id
(the claim's key) and its fingerprint:

* pending → 403 ``NEEDS_APPROVAL`` again, with the same approval in the envelope;
* denied → 403 ``Approval_Denied``;
* bound to another body (pending or approved) → 409 ``Inv_ReplayPayloadMismatch``;
* approved → the policy input carries ``approval`` (id, status, approvers,
  approved_at) and the policy decides; an ALLOW consumes it (the core does,
  atomically, before the decision record: one approval, one forward);
* none, expired or used → decided as usual.

When the policy answers NEEDS_APPROVAL, the core asks :meth:`ApprovalGate.needs`
for the approval (found or created) to put in the envelope.
"""

from __future__ import annotations

from typing import Any, Protocol

from proxy.audit.records import redact_attrs
from proxy.model import Exchange, Verdict
from proxy.ports import AuditUnavailable, StoreUnavailable
from proxy.reasons import Reason


class ApprovalService(Protocol):
    """What the core needs of the approvals service (``proxy.approvals.service``)."""

    async def lookup(self, binding_key: str) -> Any: ...
    async def request(self, binding_key: str, fingerprint: str, details: Any,
                      trace_id: str | None = None) -> Any: ...
    async def consume(self, a: Any, fingerprint: str, trace_id: str | None = None) -> Any: ...


_MISMATCH = Verdict("DENY", 409, (Reason.REPLAY_MISMATCH,),
                    "this request id is bound to another payload awaiting approval",
                    shadowable=False)
_UNAVAILABLE = Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.APPROVAL_STORE_UNAVAILABLE),
                       "the approval store is unavailable; request refused",
                       shadowable=False, fail_closed_trigger="redis")
_AUDIT = Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.AUDIT_UNAVAILABLE),
                 "the audit store is unavailable; request refused", shadowable=False,
                 fail_closed_trigger="audit")


class ApprovalGate:
    """The approval stage (before the policy) and the core's two calls after it."""

    name = "approval"

    def __init__(self, service: ApprovalService, details: Any, states: Any,
                 denied: Verdict, not_pending: Verdict, redact: Any) -> None:
        # the approvals package's own types, passed in so that this stage imports
        # nothing of its I/O: Details(...), retry_state(), the DENIED / NOT_PENDING
        # verdicts
        self.service = service
        self._details = details
        self._states = states
        self._denied = denied
        self._not_pending = not_pending
        self._redact = redact

    async def check(self, ex: Exchange) -> Verdict | None:
        claim = ex.claim
        if claim is None:
            return None
        try:
            found = await self.service.lookup(claim.key)
        except StoreUnavailable:
            return _UNAVAILABLE if ex.route and ex.route.fail_mode == "closed" else None
        state = self._states.retry_state(found, claim.fingerprint)
        kind = state.value
        if kind == "mismatch":
            return _MISMATCH
        if kind == "denied":
            return self._denied
        if kind == "pending":
            v = self._states.pending_verdict()
            return Verdict(v.decision, v.status, v.reasons, v.message, shadowable=False,
                           approval=found.envelope_field())
        if kind == "approved":
            ex.approval = found
            ex.policy_input["approval"] = found.policy_field()
        return None

    async def needs(self, ex: Exchange, verdict: Verdict) -> Verdict:
        """The NEEDS_APPROVAL answer, with the approval found or created for it."""
        claim = ex.claim
        p, route = ex.principal, ex.route
        if claim is None or p is None or route is None:
            return verdict  # no request id: nothing to bind an approval to
        details = self._details(
            tool=route.tool, effect=route.effect, method=ex.method, route=route.path,
            caller=p.id, caller_role=p.role, tenant=p.tenant, request_id=ex.request_id,
            reason_codes=verdict.reasons,
            attrs=redact_attrs(ex.policy_input, self._redact) if ex.policy_input else {},
            body_sha256=ex.body_sha256 or None, via=ex.door)
        try:
            res = await self.service.request(claim.key, claim.fingerprint, details,
                                             ex.trace_id)
        except StoreUnavailable:
            return _UNAVAILABLE
        except AuditUnavailable:
            return _AUDIT
        if res.mismatch:
            return _MISMATCH
        return Verdict(verdict.decision, verdict.status, verdict.reasons, verdict.message,
                       verdict.headers, shadowable=False,
                       approval=res.approval.envelope_field())

    async def consume(self, ex: Exchange) -> Verdict | None:
        """Use the approved approval the request carries; a verdict when it may not go."""
        if ex.approval is None or ex.claim is None:
            return None
        try:
            used = await self.service.consume(ex.approval, ex.claim.fingerprint, ex.trace_id)
        except StoreUnavailable:
            return _UNAVAILABLE
        except AuditUnavailable:
            return _AUDIT
        return None if used is not None else self._not_pending
