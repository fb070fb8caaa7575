"""Rate limits: which rules apply to a request, and their bucket keys (pure).

Keys are templates over the policy input (``{subject.patient_id}``); a
missing field renders empty, so requests without it share one bucket (the
stricter choice). Consumption happens in the admission stage's atomic call.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from proxy.config import RateLimitRule
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


class RateRules:
    """The configured rules indexed by tool."""

    def __init__(self, rules: tuple[RateLimitRule, ...]) -> None:
        self.by_tool: dict[str, list[RateLimitRule]] = {}
        for rule in rules:
            for tool in rule.tools:
                self.by_tool.setdefault(tool, []).append(rule)

    def checks(self, ex: Exchange) -> list[RateCheck]:
        rules = self.by_tool.get(ex.tool)
        if not rules:
            return []
        return [RateCheck(r.name, f"{r.name}:{render_key(r.key, ex.policy_input)}", r.limit,
                          r.window_s, r.cost) for r in rules]
