"""Rate limits and budgets: which counters a request consumes (pure).

Rate-limit keys are templates over the policy input (``{subject.patient_id}``);
a missing field renders empty, so requests without it share one bucket (the
stricter choice). Budgets are per-tenant cost quotas per UTC calendar day and
month; their counter key names the period, so a new period starts from zero
without a reset job. Consumption happens in the admission stage's atomic call.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from proxy.config import BudgetRule, RateLimitRule
from proxy.model import Exchange
from proxy.ports import RateCheck

_REF = re.compile(r"\{([^}]*)\}")


def render_key(template: str, policy_input: Mapping[str, Any]) -> str:
    """Fill ``{subject.patient_id}``-style references; a missing field renders empty."""

    def sub(m: re.Match[str]) -> str:
        node: Any = policy_input
        for part in m.group(1).split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        return "" if node is None else str(node)

    return _REF.sub(sub, template)


def budget_periods(now: float) -> tuple[tuple[str, str, float], tuple[str, str, float]]:
    """``(name, id, seconds left)`` of the UTC day and month containing ``now``."""
    t = datetime.fromtimestamp(now, UTC)
    day_start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start.replace(year=t.year + 1, month=1) if t.month == 12
                  else month_start.replace(month=t.month + 1))
    return (("daily", day_start.strftime("%Y-%m-%d"), day_start.timestamp() + 86_400 - now),
            ("monthly", month_start.strftime("%Y-%m"), next_month.timestamp() - now))


class RateRules:
    """The configured rate limits and budgets, indexed by tool."""

    def __init__(self, rules: tuple[RateLimitRule, ...], budgets: tuple[BudgetRule, ...] = (),
                 clock: Callable[[], float] = time.time) -> None:
        self.by_tool: dict[str, list[RateLimitRule]] = {}
        self._reasons = {rule.name: rule.reason for rule in rules if rule.reason}
        for rule in rules:
            for tool in rule.tools:
                self.by_tool.setdefault(tool, []).append(rule)
        self.budgets_by_tool: dict[str, list[BudgetRule]] = {}
        for budget in budgets:
            for tool in budget.costs:
                self.budgets_by_tool.setdefault(tool, []).append(budget)
        self.clock = clock

    def reasons(self, rule_names: Iterable[str]) -> tuple[str, ...]:
        """The violations the named rules report (``reason``), in order, once each."""
        out: list[str] = []
        for name in rule_names:
            reason = self._reasons.get(name)
            if reason is not None and reason not in out:
                out.append(reason)
        return tuple(out)

    def checks(self, ex: Exchange) -> list[RateCheck]:
        rules = self.by_tool.get(ex.tool)
        checks = [RateCheck(r.name, f"{r.name}:{render_key(r.key, ex.policy_input)}", r.limit,
                            r.window_s, r.cost) for r in rules] if rules else []
        budgets = self.budgets_by_tool.get(ex.tool)
        if budgets:
            tenant = ex.principal.tenant if ex.principal is not None else None
            periods = budget_periods(self.clock())
            for b in budgets:
                limits = b.limits_for(tenant)
                for (period, pid, left), limit in zip(periods, (limits.daily, limits.monthly),
                                                      strict=True):
                    if limit is not None:
                        checks.append(RateCheck(f"{b.name}:{period}", f"{b.name}:{period}:{pid}",
                                                limit, left, b.costs[ex.tool], quota=True,
                                                warn_at=b.warn_at))
        return checks
