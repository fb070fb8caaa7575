"""Rate limits: keyed by templates over the policy input, consumed atomically.

Denies 429 ``RateLimit_Exceeded`` with ``Retry-After`` (whole seconds, rounded
up); when the limiter is unavailable, fail-closed routes deny 503.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from proxy.config import RateLimitRule
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.ports import RateCheck, RateLimiter, StoreUnavailable
from proxy.reasons import Reason

_REF = re.compile(r"\{([^}]*)\}")


def render_key(template: str, policy_input: Mapping[str, Any]) -> str:
    """Fill ``{subject.patient_id}``-style references; a missing field renders empty."""

    def sub(m: re.Match[str]) -> str:
        node: Any = policy_input
        for part in m.group(1).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return "" if node is None else str(node)

    return _REF.sub(sub, template)


class RateLimitStage:
    name = "rate_limit"

    def __init__(self, rules: tuple[RateLimitRule, ...], limiter: RateLimiter,
                 metrics: Metrics) -> None:
        self.by_tool: dict[str, list[RateLimitRule]] = {}
        for rule in rules:
            for tool in rule.tools:
                self.by_tool.setdefault(tool, []).append(rule)
        self.limiter = limiter
        self.metrics = metrics

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        assert route is not None
        rules = self.by_tool.get(route.tool)
        if not rules:
            return None
        checks = [RateCheck(r.name, f"{r.name}:{render_key(r.key, ex.policy_input)}",
                            r.limit, r.window_s, r.cost) for r in rules]
        try:
            result = await self.limiter.consume(checks)
        except StoreUnavailable:
            if route.fail_mode == "closed":
                return Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.RATE_LIMIT_UNAVAILABLE),
                               "rate limiting is unavailable; write refused",
                               fail_closed_trigger="redis")
            ex.degraded.append(Reason.RATE_LIMIT_UNAVAILABLE)
            return None
        if result.allowed:
            return None
        self.metrics.rate_limited.inc()
        retry = max(1, math.ceil(result.retry_after_s))
        return Verdict("DENY", 429, (Reason.RATE_LIMITED,),
                       f"rate limit {result.rule} exceeded",
                       (("Retry-After", str(retry)),))
