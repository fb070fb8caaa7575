"""The decision API's wire models, as JSON Schema, and the validator that uses them.

The same dictionaries validate requests and are published in the OpenAPI
document (``GET /openapi.json``), so the spec cannot drift from the code.
The validator covers the subset the models use (type, required, properties,
additionalProperties, maxProperties, enum, pattern, items); an error
names the field (``subject: must be an object``).
"""

from __future__ import annotations

import re
from typing import Any

MODES = ["ALLOW", "STEP_UP", "READ_ONLY", "KILL_SWITCH"]
_ID_PATTERN = r"^[ -~]{1,255}$"
_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# the methods an Envoy ext_authz check request may carry (the original request's)
_ENVOY_METHODS = ("get", "post", "put", "patch", "delete", "options")
_URI_PATTERN = r"^/[!-~]{0,2047}$"  # origin-form: a path (and query) of visible ASCII
_ATTRS: dict[str, Any] = {"type": "object", "description": "attribute name to JSON value",
                          "maxProperties": 64}

VERIFY_REQUEST: dict[str, Any] = {
    "title": "VerifyRequestV1",
    "type": "object",
    "required": ["request_id", "tool"],
    "additionalProperties": False,
    "properties": {
        "request_id": {"type": "string", "pattern": _ID_PATTERN,
                       "description": "unique per logical request (printable ASCII, 1-255); "
                                      "the same id with the same payload returns the first "
                                      "decision again"},
        "tool": {"type": "string", "pattern": _NAME_PATTERN,
                 "description": "a tool the config knows (a route's, or decisions.tools)"},
        "mode": {"type": "string", "enum": MODES,
                 "description": "the caller's mode; the effective mode is the more "
                                "restrictive of this and the operator's"},
        "role": {"type": "string", "pattern": _NAME_PATTERN,
                 "description": "taken as given only from a trusted caller"},
        "subject": _ATTRS,
        "args": _ATTRS,
        "context": _ATTRS,
    },
}

VERIFY_RESPONSE: dict[str, Any] = {
    "title": "VerifyResponseV1",
    "type": "object",
    "required": ["decision", "violations", "allowed_outputs", "reason"],
    "additionalProperties": False,
    "properties": {
        "decision": {"type": "string", "enum": ["ALLOW", "DENY", "NEEDS_APPROVAL"]},
        "violations": {"type": "array", "items": {"type": "string"}},
        "allowed_outputs": {"type": "array", "items": {"type": "string"}},
        "reason": {"type": "string"},
        "approval": {"type": "object"},
    },
}

ENVELOPE: dict[str, Any] = {
    "title": "Envelope",
    "type": "object",
    "required": ["decision", "status", "reason_codes", "message", "tool", "request_id",
                 "trace_id", "policy_hash"],
    "properties": {
        "decision": {"type": "string", "enum": ["DENY", "NEEDS_APPROVAL"]},
        "status": {"type": "integer"},
        "reason_codes": {"type": "array", "items": {"type": "string"}},
        "message": {"type": "string"},
        "tool": {"type": ["string", "null"]},
        "request_id": {"type": ["string", "null"]},
        "trace_id": {"type": "string"},
        "policy_hash": {"type": "string"},
        "retry_after": {"type": "integer"},
        "approval": {"type": "object"},
    },
}

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "integer": (int,),
    "boolean": (bool,), "null": (type(None),),
}


class SchemaError(ValueError):
    """The document does not fit the model; ``field`` names where."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field


def validate(doc: Any, schema: dict[str, Any], where: str = "") -> None:
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        ok = any(isinstance(doc, _TYPES[n]) and not (n == "integer" and isinstance(doc, bool))
                 for n in names)
        if not ok:
            raise SchemaError(where or "body", f"must be {' or '.join(names)}")
    if "enum" in schema and doc not in schema["enum"]:
        raise SchemaError(where, "must be one of " + ", ".join(map(str, schema["enum"])))
    if isinstance(doc, str):
        if "pattern" in schema and not re.fullmatch(schema["pattern"], doc):
            raise SchemaError(where, "is not in the expected form")
    if isinstance(doc, dict):
        if len(doc) > schema.get("maxProperties", 1 << 30):
            raise SchemaError(where, "has too many fields")
        for name in schema.get("required", ()):
            if name not in doc:
                raise SchemaError(_join(where, name), "is required")
        props = schema.get("properties", {})
        for name, value in doc.items():
            if name in props:
                validate(value, props[name], _join(where, name))
            elif schema.get("additionalProperties") is False:
                raise SchemaError(_join(where, name), "is not a known field")
    if isinstance(doc, list) and "items" in schema:
        for i, item in enumerate(doc):
            validate(item, schema["items"], f"{where}[{i}]")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def openapi(title: str, paths: dict[str, Any], *, schemas: dict[str, Any] | None = None,
            security_schemes: dict[str, Any] | None = None,
            security: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An OpenAPI 3.1 document; without ``schemas``/``security_schemes``/``security``,
    the decision API's."""
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "1"},
        "components": {
            "schemas": schemas if schemas is not None else {
                "VerifyRequestV1": VERIFY_REQUEST, "VerifyResponseV1": VERIFY_RESPONSE,
                "Envelope": ENVELOPE},
            "securitySchemes": security_schemes if security_schemes is not None else {
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": security if security is not None else [{"apiKey": []}, {"bearer": []}],
        "paths": paths,
    }


def _envelope(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Envelope"}}}}


def decision_api_spec() -> dict[str, Any]:
    denied = {str(s): _envelope("the envelope") for s in (400, 401, 403, 409, 413, 429, 503)}
    method = {"type": "string", "enum": _METHODS,
              "description": "the original request's method (GET when absent)"}
    uri = {"type": "string", "pattern": _URI_PATTERN, "examples": ["/appointments?day=1"],
           "description": "the original request's path and query; one of X-Original-URI "
                          "and X-Forwarded-Uri is required (400 BadRequest_MissingOriginalUri)"}
    authz_params = [{"name": "X-Original-Method", "in": "header", "schema": method},
                    {"name": "X-Original-URI", "in": "header", "schema": uri},
                    {"name": "X-Forwarded-Method", "in": "header", "schema": method},
                    {"name": "X-Forwarded-Uri", "in": "header", "schema": uri}]
    allowed = {"description": "allow; X-Casf-* headers name the decision",
               "headers": {h: {"schema": {"type": "string"}} for h in (
                   "X-Casf-Decision", "X-Casf-Tool", "X-Casf-Principal", "X-Casf-Role",
                   "X-Casf-Tenant", "X-Casf-Trace-Id")}}

    def envoy(method: str) -> dict[str, Any]:
        op: dict[str, Any] = {
            "summary": "Envoy ext_authz HTTP service: the original method, path and query "
                       "(and, with with_request_body, body)",
            "parameters": [{"name": "path", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": allowed, **denied}}
        if method not in ("get", "delete", "options"):
            op["requestBody"] = {"required": False, "description": "the original body",
                                 "content": {"application/json": {"schema": {}}}}
        return op

    return openapi("casf-proxy decision API", {
        "/verify": {"post": {
            "summary": "decide a tool call (casf-core compatible)",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/VerifyRequestV1"}}}},
            "responses": {
                "200": {"description": "every decision, deny included",
                        "content": {"application/json": {"schema": {
                            "$ref": "#/components/schemas/VerifyResponseV1"}}}},
                "400": _envelope("the body does not fit the schema, an unknown tool, "
                                 "a required attribute missing"),
                "401": _envelope("no or an invalid credential"),
                "413": _envelope("body too large")}}},
        "/authz/forward": {"get": {
            "summary": "forward auth (nginx auth_request, Traefik ForwardAuth)",
            "parameters": authz_params,
            "responses": {"200": allowed, **denied}}},
        "/authz/envoy/{path}": {method: envoy(method) for method in _ENVOY_METHODS},
    })
