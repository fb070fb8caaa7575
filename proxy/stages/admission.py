"""Admission: anti-replay (5), invariants (6) and rate limits (7) in one state call.

The three stages keep the pipeline's order in what they *report*: a replay
answer (stored outcome, 409 in flight, 409 mismatch) comes first, then an
invariant's 403, then a rate limit's or budget's 429. Because the invariants are pure,
they are evaluated before the state store is asked, which lets the store do
the claim and every rate-limit check atomically in one round trip without
consuming anything for a request the invariants deny (see
:class:`proxy.ports.AdmissionStore`).

Denies: 400 when a write has no request id or an id is invalid; 409
``Inv_ReplayConcurrent`` / ``Inv_ReplayPayloadMismatch`` /
``Inv_ReplayOutcomeEvicted``; 403 from the
invariants; 429 ``RateLimit_Exceeded`` or ``Budget_Exceeded`` with
``Retry-After`` (a budget's is the time left in its period); 503
``FAIL_CLOSED`` + ``Inv_ReplayCheckUnavailable`` (or
``Inv_RateLimitUnavailable`` when no claim was involved) when the store is
unreachable on a fail-closed route.
"""

from __future__ import annotations

import math

from proxy.canonical import canonical_body, fingerprint
from proxy.config import ReplayConfig
from proxy.metrics import Metrics
from proxy.model import ANONYMOUS_AUTH, Exchange, Verdict
from proxy.ports import AdmissionStore, Claim, ClaimState, StoreUnavailable
from proxy.reasons import Reason
from proxy.stages.invariants import invariant_verdict
from proxy.stages.ratelimit import RateRules
from proxy.stages.replay import client_request_id, scoped_key, state_scope


class AdmissionStage:
    name = "admission"

    def __init__(self, replay: ReplayConfig, rules: RateRules, store: AdmissionStore,
                 lease_s: float, metrics: Metrics) -> None:
        self.replay = replay
        self.rules = rules
        self.store = store
        self.lease_s = lease_s
        self.metrics = metrics

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        assert route is not None and ex.principal is not None
        # 5. the request id (a claim is needed on write routes); a door with its own
        # idempotency rules (MCP, see DoorIdempotency) names the id and the fingerprinted
        # bytes itself, and may send a write without an id (no replay protection)
        own = ex.idempotency
        rid = (own.request_id if own is not None
               else ex.door_request_id if ex.door_request_id is not None
               else client_request_id(ex, self.replay.request_id_headers))
        if isinstance(rid, Verdict):
            return rid
        scope = state_scope(ex.principal.tenant, ex.principal.id)
        claim: Claim | None = None
        if route.effect == "write" and rid is None and own is None:
            return Verdict("DENY", 400, (Reason.MISSING_REQUEST_ID,),
                           "write requests need an Idempotency-Key or X-Request-Id")
        # an unauthenticated request on a shadow-mode route (the pipeline's anonymous
        # principal) takes no claim: all such callers would share one key space, so one
        # could be replayed another's stored response, or blocked by its key (docs/state.md)
        # /verify replays every request id, reads included (casf-core's decision cache)
        replayed = route.effect == "write" or ex.door == "verify"
        if replayed and rid is not None and ex.principal.auth != ANONYMOUS_AUTH:
            # a decision door's stored answer is a decision, never an upstream
            # response: its fingerprints live apart from the proxy's
            tool = route.tool if ex.door == "proxy" else f"{ex.door}:{route.tool}"
            claim = Claim(scope, scoped_key(ex.principal.id, rid),
                          fingerprint(tool, ex.method, ex.target.path_and_query,
                                      own.fingerprint_body if own is not None else
                                      canonical_body(ex.body, ex.headers.get("Content-Type"))),
                          self.lease_s)
        # 6. invariants: decided now, reported after the replay answer
        invariant = invariant_verdict(ex)
        checks = self.rules.checks(ex)
        if claim is None and not checks:
            return invariant
        proceed = invariant is None or not route.enforce
        try:
            admission = await self.store.admit(scope, claim, checks, proceed)
        except StoreUnavailable:
            code = Reason.REPLAY_UNAVAILABLE if claim else Reason.RATE_LIMIT_UNAVAILABLE
            if route.fail_mode == "closed":
                # fail_mode, not enforce, decides dependency failures: shadow
                # mode never forwards a fail-closed route past a dead Redis
                return Verdict("DENY", 503, (Reason.FAIL_CLOSED, code,
                                             *self.rules.reasons(c.rule for c in checks)),
                               "replay protection or rate limiting is unavailable",
                               shadowable=False, fail_closed_trigger="redis")
            ex.degraded.append(code)
            return invariant
        # 5. replay answers
        state = admission.claim_state
        if state is ClaimState.REPLAY:
            assert admission.outcome is not None
            self.metrics.replay_hit.inc()
            return Verdict("ALLOW", admission.outcome.status, (), "replayed outcome",
                           shadowable=False, replay=admission.outcome)
        if state is ClaimState.IN_FLIGHT:
            return Verdict("DENY", 409, (Reason.REPLAY_CONCURRENT,),
                           "a request with this id is still being processed")
        if state is ClaimState.EVICTED:
            # finished once already; its outcome is gone, so neither a replay nor a
            # second delivery: the caller must decide whether to send it anew
            return Verdict("DENY", 409, (Reason.REPLAY_OUTCOME_EVICTED,),
                           "the outcome of this request id is no longer stored; "
                           "use a new request id")
        if state is ClaimState.MISMATCH:
            self.metrics.replay_mismatch.inc()
            return Verdict("DENY", 409, (Reason.REPLAY_MISMATCH,),
                           "this request id was used with a different payload")
        if admission.claimed:
            ex.claim = claim
        # 6.
        if invariant is not None:
            return invariant
        # 7. rate limits and budgets
        if admission.refused_rule is not None:
            retry = str(max(1, math.ceil(admission.retry_after_s)))
            if admission.refused_quota:
                self.metrics.budget_exceeded.labels(admission.refused_rule).inc()
                return Verdict("DENY", 429, (Reason.BUDGET_EXCEEDED,),
                               f"budget {admission.refused_rule} is used up",
                               (("Retry-After", retry),))
            self.metrics.rate_limited.inc()
            return Verdict("DENY", 429, (Reason.RATE_LIMITED,
                                         *self.rules.reasons((admission.refused_rule,))),
                           f"rate limit {admission.refused_rule} exceeded",
                           (("Retry-After", retry),))
        if admission.warnings:
            ex.budget_warnings = admission.warnings
            for warning in admission.warnings:
                self.metrics.budget_warning.labels(warning.split(" ", 1)[0]).inc()
        return None
