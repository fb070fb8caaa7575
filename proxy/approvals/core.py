"""What the decision core does with an approval (pure): the calls it makes are in
docs/approvals.md ("The flow"); this module says what each state means for a retry.

For a request with a request id on a route whose policy may answer
NEEDS_APPROVAL, before the policy runs the core looks up the approval bound
to the caller's request id (``Approvals.lookup(claim.key)``) and asks
:func:`retry_state`:

- ``NONE``: no approval (or an expired one): decide as usual;
- ``PENDING``: answer the same 403 NEEDS_APPROVAL (:func:`pending_verdict`) with
  the envelope's ``approval`` field (``Approval.envelope_field()``);
- ``APPROVED``: put ``Approval.policy_field()`` into the policy input as
  ``approval`` and let the policy decide; on ALLOW, ``Approvals.consume`` before
  forwarding (None: do not forward, answer :data:`NOT_PENDING`);
- ``DENIED``: 403 :data:`DENIED`;
- ``MISMATCH``: the id is bound to another body: 409 ``Inv_ReplayPayloadMismatch``;
- ``USED``: the retry after a forwarded one: the replay stage answers it from the
  stored outcome; if it reaches here, decide as usual (no approval in the input).
"""

from __future__ import annotations

from enum import Enum

from proxy.approvals.model import Approval, Status
from proxy.model import Verdict
from proxy.reasons import Reason


class RetryState(Enum):
    NONE = "none"
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    MISMATCH = "mismatch"
    USED = "used"


def retry_state(a: Approval | None, fingerprint: str) -> RetryState:
    """What an approval found under the caller's request id means for this request."""
    if a is None or a.status is Status.EXPIRED:
        return RetryState.NONE
    if a.fingerprint != fingerprint:
        if a.status in (Status.PENDING, Status.APPROVED):
            return RetryState.MISMATCH
        return RetryState.NONE  # a decided or used approval of an earlier body
    return {Status.PENDING: RetryState.PENDING, Status.APPROVED: RetryState.APPROVED,
            Status.DENIED: RetryState.DENIED, Status.USED: RetryState.USED}[a.status]


def pending_verdict(violations: tuple[str, ...] = ()) -> Verdict:
    """The 403 NEEDS_APPROVAL of a request whose approval is pending."""
    return Verdict("NEEDS_APPROVAL", 403, (Reason.APPROVAL_REQUIRED, *violations),
                   "this request needs an approver's decision; retry it with the same "
                   "request id once approved")


DENIED = Verdict("DENY", 403, (Reason.APPROVAL_DENIED,),
                 "an approver denied this request", shadowable=False)
NOT_PENDING = Verdict("DENY", 409, (Reason.APPROVAL_NOT_PENDING,),
                      "the approval was used by another retry or has expired",
                      shadowable=False)
