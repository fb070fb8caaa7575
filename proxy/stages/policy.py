"""Policy: Rego evaluation, deny by default.

ALLOW continues; DENY answers 403 with the policy's violations (or
``Policy_Denied``); NEEDS_APPROVAL answers 403 with ``Approval_Required``.
A bad result or an evaluation error is a deny; an unreachable external engine
fails closed on fail-closed routes (503 ``OPA_Unavailable``).
"""

from __future__ import annotations

from proxy.model import Exchange, Verdict
from proxy.ports import PolicyEngine, PolicyOutcome, PolicyUnavailable
from proxy.reasons import Reason


class PolicyStage:
    name = "policy"

    def __init__(self, engine: PolicyEngine) -> None:
        self.engine = engine

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        assert route is not None
        try:
            result = await self.engine.evaluate(ex.policy_input)
        except PolicyUnavailable:
            if route.fail_mode == "closed":
                return Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.OPA_UNAVAILABLE),
                               "the policy engine is unavailable; request refused",
                               shadowable=False, fail_closed_trigger="opa")
            ex.degraded.append(Reason.OPA_UNAVAILABLE)
            return None
        if result.outcome is PolicyOutcome.ALLOW:
            ex.allowed_outputs = result.allowed_outputs
            return None
        if result.outcome is PolicyOutcome.NEEDS_APPROVAL:
            return Verdict("NEEDS_APPROVAL", 403,
                           (Reason.APPROVAL_REQUIRED, *result.violations),
                           "this request needs approval")
        if result.error is not None:
            return Verdict("DENY", 403, (result.error,), "the policy did not produce a decision")
        return Verdict("DENY", 403, result.violations or (Reason.POLICY_DENIED,),
                       "denied by policy")
