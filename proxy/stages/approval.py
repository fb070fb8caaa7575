"""Approvals: what a human approver decided about this very request.

Consulted only when the policy answers NEEDS_APPROVAL (so a request that needs
no approval costs nothing here), for a request that holds an idempotency claim
(a request id): the approval bound to its caller-scoped request id (the
claim's key) and its fingerprint is found, or created:

* pending (just created, or still waiting) → 403 ``NEEDS_APPROVAL`` with the
  approval in the envelope;
* denied → 403 ``Approval_Denied``;
* bound to another body (pending or approved) → 409 ``Inv_ReplayPayloadMismatch``;
* approved → the policy input carries ``approval`` (id, status, approvers,
  approved_at) and the policy decides again; an ALLOW consumes it (the core
  does, atomically, before the decision record: one approval, one forward);
* used (its forwarded retry happened, the stored outcome is gone) → 409
  ``Approval_NotPending``.

A request id whose approval is pending stays bound to its body: the next
request under that id that the policy sends for approval with another body is
a 409. (A body the policy allows without approval is not held back: nothing
an approver decided is needed for it.)
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
    """The core's two calls: on NEEDS_APPROVAL (:meth:`needs`), on ALLOW (:meth:`consume`)."""

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

    async def needs(self, ex: Exchange, verdict: Verdict) -> Verdict | None:
        """The answer to a NEEDS_APPROVAL, or None: approved, decide again (the
        approval is in ``ex.approval`` and in the policy input)."""
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
        a = res.approval
        kind = self._states.retry_state(a, claim.fingerprint).value
        if kind == "approved":
            ex.approval = a
            ex.policy_input["approval"] = a.policy_field()
            return None
        if kind == "denied":
            return self._denied
        if kind == "used":
            return self._not_pending
        return Verdict(verdict.decision, verdict.status, verdict.reasons, verdict.message,
                       verdict.headers, shadowable=False, approval=a.envelope_field())

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
