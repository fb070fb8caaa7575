"""Audit records of approval transitions (pure: the caller passes ids, time and hashes).

One record per transition, in the same hash chain as the decisions:
``kind: "approval"``, ``action`` (created | approved | denied | expired |
used), ``approval_id`` and ``approver`` (the deciding principal; null for
created, used and expired). ``actor`` is whoever caused the transition: the
caller for created and used, the approver for approved and denied,
``system`` for expired. ``via`` is the request's front door for created
and used, ``admin`` for the approver's actions (and for expiry).

``decision``/``status`` say whether the transition took effect: an approver
action is recorded before it is applied (``ALLOW``, 200); when applying it
then fails, a second record with the same action says so (``DENY`` with the
status and reason codes the approver got).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from proxy.approvals.model import Approval, Approver, iso

APPROVAL_TOOL = "casf.approval"
ACTIONS = ("created", "approved", "denied", "expired", "used")
SYSTEM_ACTOR = "system"


def approval_record(a: Approval, action: str, *, event_id: str, ts: str, policy_hash: str,
                    config_hash: str | None = None, approver: Approver | None = None,
                    trace_id: str | None = None, decision: str = "ALLOW", status: int = 200,
                    reasons: Sequence[str] = ()) -> dict[str, Any]:
    """The audit record of ``action`` on ``a`` (``a`` as it is after the transition)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown approval action {action!r}")
    by_approver = action in ("approved", "denied")
    if by_approver and approver is None:
        raise ValueError(f"{action} needs the approver")
    if by_approver:
        assert approver is not None
        actor, role, via = approver.id, approver.role, "admin"
    elif action == "expired":
        actor, role, via = SYSTEM_ACTOR, None, "admin"
    else:
        actor, role, via = a.caller, a.caller_role, a.via
    record: dict[str, Any] = {
        "event_id": event_id, "ts": ts, "kind": "approval", "action": action,
        "approval_id": a.id, "approver": approver.id if by_approver and approver else None,
        "approval_status": a.status.value, "expires_at": iso(a.expires_at),
        "request_id": a.request_id, "trace_id": trace_id, "actor": actor, "role": role,
        "tenant": a.tenant, "tool": a.tool, "effect": a.effect, "method": a.method,
        "route": a.route, "decision": decision, "status": status,
        "reason_codes": list(reasons) if reasons else list(a.reason_codes),
        "policy_hash": policy_hash, "body_sha256": a.body_sha256, "attrs": dict(a.attrs),
        "via": via,
    }
    if by_approver and a.comment:
        record["comment"] = a.comment
    if config_hash is not None:
        record["config_hash"] = config_hash
    return record
