"""Attributes: build the policy input (contract §4) from the request.

Denies 400 when the body must be JSON and is not, when a named query
parameter or header is repeated (ambiguous), or when a required attribute is
missing or empty (``BadRequest_Missing<Name>``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import orjson

from proxy.config import AttributeSpec, RouteConfig
from proxy.model import Exchange, Verdict
from proxy.reasons import Reason, missing_attribute

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
    name = "attributes"

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        principal = ex.principal
        assert route is not None and principal is not None
        if route.reads_body and ex.body:
            try:
                ex.json_body = orjson.loads(ex.body)
            except orjson.JSONDecodeError:
                return Verdict("DENY", 400, (Reason.INVALID_JSON,),
                               "request body is not valid JSON")
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
        for req in route.required:
            group, field = req.split(".", 1)
            if groups[group].get(field) in (None, "", [], {}):
                return Verdict("DENY", 400, (missing_attribute(req),),
                               f"required attribute {field} is missing")
        ex.policy_input = build_input(ex, route, groups)
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
            if not values:
                return _ABSENT
            if len(values) > 1:
                return Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                               f"query parameter {spec.name} is repeated")
            return values[0]
        if spec.source == "header":
            hv = ex.headers.getall(spec.name, [])
            if not hv:
                return _ABSENT
            if len(hv) > 1:
                return Verdict("DENY", 400, (Reason.AMBIGUOUS_REQUEST,),
                               f"header {spec.name} is repeated")
            return hv[0]
        if spec.source == "body":
            if ex.json_body is None:
                return _ABSENT
            return resolve_pointer(ex.json_body, spec.name)
        return {"id": principal.id, "role": principal.role,
                "tenant": principal.tenant}.get(spec.name, _ABSENT)


def build_input(ex: Exchange, route: RouteConfig,
                groups: dict[str, dict[str, Any]]) -> dict[str, Any]:
    principal = ex.principal
    assert principal is not None
    return {
        "tool": route.tool,
        "effect": route.effect,
        "mode": ex.mode.value,
        "role": principal.role,
        "subject": groups["subject"],
        "args": groups["args"],
        "context": groups["context"],
        "principal": {"id": principal.id, "role": principal.role,
                      "tenant": principal.tenant, "auth": principal.auth},
        "request": {"method": ex.method, "path": ex.target.path, "route": route.path},
    }
