"""Invariants (in-process, no network): mode rules and tenant isolation.

READ_ONLY and KILL_SWITCH deny writes; KILL_SWITCH denies everything except
routes marked ``allow_in_kill_switch``; a resource tenant that differs from
the principal's tenant denies 403 ``Tenant_Mismatch``. STEP_UP is left to
the policy.
"""

from __future__ import annotations

from proxy.config import Mode
from proxy.model import Exchange, Verdict
from proxy.reasons import Reason


def invariant_verdict(ex: Exchange) -> Verdict | None:
    """The invariants' answer for this request (pure; no I/O).

    The admission stage evaluates it before its state round trip (so nothing
    is consumed for a request the invariants deny) and reports it after the
    anti-replay answer, as the pipeline orders them (replay, invariants, rate limits).
    """
    route = ex.route
    assert route is not None and ex.principal is not None
    if ex.mode is Mode.KILL_SWITCH and not route.allow_in_kill_switch:
        return Verdict("DENY", 403, (Reason.MODE_KILL_SWITCH,),
                       "the kill switch is on: requests are not allowed")
    if ex.mode in (Mode.READ_ONLY, Mode.KILL_SWITCH) and route.effect == "write":
        return Verdict("DENY", 403, (Reason.MODE_READ_ONLY,),
                       f"writes are not allowed in {ex.mode.value} mode")
    if route.resource_tenant is not None:
        group, field = route.resource_tenant.split(".", 1)
        resource_tenant = ex.policy_input.get(group, {}).get(field)
        if (resource_tenant not in (None, "") and ex.principal.tenant is not None
                and str(resource_tenant) != ex.principal.tenant):
            return Verdict("DENY", 403, (Reason.TENANT_MISMATCH,),
                           "the resource belongs to another tenant")
    return None
