"""Attributes: build the policy input (docs/policy-input.md) from the request.

Denies 400 when the body must be JSON and is not (or is ambiguous JSON, see
``proxy.strictjson``: duplicate keys, integers beyond 64 bits, deep nesting),
when a named query parameter or header is repeated (ambiguous), or when a
required attribute is missing or empty (``BadRequest_Missing<Name>``).

"Repeated" is judged the way lenient servers would read the request, so the
policy and the upstream cannot pick different values: a query parameter read
as an attribute is ambiguous when any other parameter names it after
case-folding, ``;`` as a separator, a ``[...]`` suffix or ``.``/space for
``_`` (PHP, ASP.NET, old CGI parsers); a header read as an attribute is
ambiguous when another header names it with ``_`` for ``-`` (CGI/WSGI).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, unquote_plus

from proxy.config import AttributeSpec, RouteConfig
from proxy.model import Exchange, Principal, Verdict
from proxy.reasons import Reason, missing_attribute
from proxy.strictjson import JsonRejected, loads_strict

_ABSENT = object()


def resolve_pointer(doc: Any, pointer: str) -> Any:
    """RFC 6901 JSON pointer lookup; returns ``_ABSENT`` when it does not resolve."""
    node = doc
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            if token not in node:
                return _ABSENT
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return _ABSENT
    return node


class AttributeBuilder:
    """``trusted_callers``: principal ids whose decision-door bodies may assert the
    role and context (``/verify``); anyone else is decided as who they are."""

    name = "attributes"

    def __init__(self, trusted_callers: frozenset[str] = frozenset()) -> None:
        self.trusted = trusted_callers

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        principal = ex.principal
        assert route is not None and principal is not None
        if ex.preset is not None:  # a decision door's body names the attributes itself
            return self._preset(ex, route, principal, ex.preset)
        if route.reads_body and ex.body:
            try:
                ex.json_body = loads_strict(ex.body)
            except JsonRejected as exc:
                return Verdict("DENY", 400, (exc.reason,), exc.message)
        groups: dict[str, dict[str, Any]] = {"subject": {}, "args": {}, "context": {}}
        if principal.tenant is not None:
            groups["context"]["tenant_id"] = principal.tenant
        query: dict[str, list[str]] | None = None
        for spec in route.attributes:
            if spec.source == "query" and query is None:
                query = parse_qs(ex.target.query, keep_blank_values=True)
            value = self._value(ex, spec, query)
            if isinstance(value, Verdict):
                return value
            group, field = spec.target.split(".", 1)
            if value is _ABSENT or value is None:
                continue
            groups[group][field] = value
        missing = _missing(route, groups)
        if missing is not None:
            return missing
        ex.policy_input = build_input(ex, route, groups)
        return None

    def _preset(self, ex: Exchange, route: RouteConfig, principal: Principal,
                preset: dict[str, Any]) -> Verdict | None:
        groups = {g: dict(preset.get(g) or {}) for g in ("subject", "args", "context")}
        role = preset.get("role")
        if principal.id in self.trusted:
            ex.record_extra["trusted_caller"] = True
            if role is not None:  # the role the policy decides with, as asserted
                ex.record_extra["policy_role"] = role
        else:
            # decided as who the caller is: its own role and tenant, whatever it asserts
            if role is not None and role != principal.role:
                ex.record_extra["asserted_role"] = role
            role = None
            body_tenant = groups["context"].get("tenant_id")
            if principal.tenant is not None:
                if body_tenant not in (None, "") and str(body_tenant) != principal.tenant:
                    return Verdict("DENY", 403, (Reason.TENANT_MISMATCH,),
                                   "the request names another tenant than the caller's")
                groups["context"]["tenant_id"] = principal.tenant
        missing = _missing(route, groups)
        if missing is not None:
            return missing
        ex.policy_input = build_input(ex, route, groups, role=role)
        return None

    @staticmethod
    def _value(ex: Exchange, spec: AttributeSpec,
               query: dict[str, list[str]] | None) -> Any:
        principal = ex.principal
        assert principal is not None
        if spec.source == "path":
            return ex.params.get(spec.name, _ABSENT)
        if spec.source == "query":
            values = (query or {}).get(spec.name)
            loose = _loose_query_count(ex.target.query, spec.name)
            if not values and not loose:
                return _ABSENT
            if not values or len(values) > 1 or loose != 1:
                return Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                               f"query parameter {spec.name} is repeated or misspelt")
            return values[0]
        if spec.source == "header":
            hv = ex.headers.getall(spec.name, [])
            if not hv:
                return _ABSENT
            if len(hv) > 1 or _header_count(ex, spec.name) > 1:
                return Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                               f"header {spec.name} is repeated")
            return hv[0]
        if spec.source == "body":
            if ex.json_body is None:
                return _ABSENT
            return resolve_pointer(ex.json_body, spec.name)
        return {"id": principal.id, "role": principal.role,
                "tenant": principal.tenant}.get(spec.name, _ABSENT)


def _missing(route: RouteConfig, groups: dict[str, dict[str, Any]]) -> Verdict | None:
    for req in route.required:
        group, field = req.split(".", 1)
        if groups[group].get(field) in (None, "", [], {}):
            return Verdict("DENY", 400, (missing_attribute(req),),
                           f"required attribute {field} is missing")
    return None


_BRACKET_SUFFIX = re.compile(r"\[[^\]]*\]$")


def _loose_name(name: str) -> str:
    name = _BRACKET_SUFFIX.sub("", name.strip().casefold())
    return name.replace(".", "_").replace(" ", "_").replace("[", "_")


def _loose_query_count(query: str, name: str) -> int:
    """How many parameters a lenient parser would take for ``name``."""
    if not query:
        return 0
    want = _loose_name(name)
    return sum(1 for piece in re.split("[&;]", query)
               if piece and _loose_name(unquote_plus(piece.split("=", 1)[0])) == want)


def _header_count(ex: Exchange, name: str) -> int:
    want = name.lower().replace("_", "-")
    return sum(1 for k in ex.headers if k.lower().replace("_", "-") == want)


def build_input(ex: Exchange, route: RouteConfig, groups: dict[str, dict[str, Any]],
                role: str | None = None) -> dict[str, Any]:
    """The policy input; ``role`` is a trusted decision caller's asserted role."""
    principal = ex.principal
    assert principal is not None
    return {
        "tool": route.tool,
        "effect": route.effect,
        "mode": ex.mode.value,
        "role": role if role is not None else principal.role,
        "subject": groups["subject"],
        "args": groups["args"],
        "context": groups["context"],
        "principal": {"id": principal.id, "role": principal.role,
                      "tenant": principal.tenant, "auth": principal.auth},
        "request": {"method": ex.method, "path": ex.target.path, "route": route.path},
    }
