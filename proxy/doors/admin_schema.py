"""The admin listener's wire models and its OpenAPI document (``GET /openapi.json``).

Built with :mod:`proxy.doors.schema`'s helpers: :data:`MODE_CHANGE` is both
the published request body of ``PUT /admin/mode`` and the model the handler
validates with, so the document cannot drift from the code. The approvals
routes are described when they are mounted on the admin app.
"""

from __future__ import annotations

from typing import Any

from proxy.approvals.model import MAX_COMMENT
from proxy.doors.schema import ENVELOPE, MODES, openapi

MODE_CHANGE: dict[str, Any] = {
    "title": "ModeChange",
    "type": "object",
    "required": ["mode"],
    "additionalProperties": False,
    "properties": {"mode": {"type": "string", "enum": MODES}},
}

_OK_OR_NOT = {"type": "string", "enum": ["ok", "unavailable"]}

HEALTH: dict[str, Any] = {
    "title": "Health", "type": "object", "required": ["status"],
    "properties": {"status": {"type": "string", "enum": ["ok"]}},
}

HEALTHZ: dict[str, Any] = {
    "title": "Readiness",
    "type": "object",
    "required": ["status", "checks", "backends", "mode", "config_hash"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "unavailable", "draining"]},
        "checks": {"type": "object", "additionalProperties": _OK_OR_NOT,
                   "description": "config, policy, audit and (with Redis) redis; empty "
                                  "while draining"},
        "backends": {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "state, audit and policy backends in use"},
        "mode": {"type": "string", "enum": MODES},
        "config_hash": {"type": "string"},
    },
}

MODE_STATE: dict[str, Any] = {
    "title": "ModeState", "type": "object", "required": ["mode"],
    "additionalProperties": False,
    "properties": {"mode": {"type": "string", "enum": MODES}},
}

MODE_CHANGED: dict[str, Any] = {
    "title": "ModeChanged",
    "type": "object",
    "required": ["mode", "previous", "shared"],
    "additionalProperties": False,
    "properties": {
        "mode": {"type": "string", "enum": MODES},
        "previous": {"type": "string", "enum": MODES},
        "shared": {"type": "boolean",
                   "description": "false: in force on this replica, published to the "
                                  "shared state once Redis answers"},
    },
}

CONFIG_RELOADED: dict[str, Any] = {
    "title": "ConfigReloaded",
    "type": "object",
    "required": ["reloaded", "config_hash", "policy_hash"],
    "additionalProperties": False,
    "properties": {"reloaded": {"type": "boolean"}, "config_hash": {"type": "string"},
                   "policy_hash": {"type": "string"}},
}

IDENTITY_RELOADED: dict[str, Any] = {
    "title": "IdentityReloaded",
    "type": "object",
    "required": ["reloaded"],
    "additionalProperties": False,
    "properties": {"reloaded": {"type": "object", "additionalProperties": {"type": "integer"},
                                "description": "how many keys each source holds now"}},
}

APPROVAL: dict[str, Any] = {
    "title": "Approval",
    "type": "object",
    "required": ["id", "status", "tool", "tenant", "created_at", "expires_at"],
    "properties": {
        "id": {"type": "string"}, "status": {"type": "string"},
        "tool": {"type": "string"}, "tenant": {"type": ["string", "null"]},
        "created_at": {"type": ["string", "null"]}, "expires_at": {"type": ["string", "null"]},
        "reason_codes": {"type": "array", "items": {"type": "string"}},
        "comment": {"type": ["string", "null"]},
    },
}

APPROVAL_DECISION: dict[str, Any] = {
    "title": "ApprovalDecision",
    "type": "object",
    "additionalProperties": False,
    "properties": {"comment": {"type": ["string", "null"], "maxLength": MAX_COMMENT}},
}


def _json(description: str, ref: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{ref}"}}}}


def _envelope(description: str) -> dict[str, Any]:
    return _json(description, "Envelope")


_REFUSED = {"401": _envelope("no or a wrong admin token"),
            "404": _envelope("the admin API is disabled (CASF_ADMIN_TOKEN unset)")}
_ADMIN: list[dict[str, Any]] = [{"adminToken": []}]
_PUBLIC: list[dict[str, Any]] = []


def _approvals_paths() -> dict[str, Any]:
    refused = {"400": _envelope("a malformed id, filter or comment"),
               "401": _envelope("no or an invalid credential"),
               "403": _envelope("not an approver of this approval's tenant"),
               "404": _envelope("no such approval, or approvals are not configured"),
               "409": _envelope("the approval is no longer pending"),
               "503": _envelope("the approval store or the audit store is unavailable")}
    approval = {"type": "object", "required": ["approval"],
                "properties": {"approval": {"$ref": "#/components/schemas/Approval"}}}
    one = {"200": {"description": "the approval", "content": {
        "application/json": {"schema": approval}}}, **refused}
    id_param = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    body = {"required": False, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ApprovalDecision"}}}}
    security: list[dict[str, Any]] = [{"apiKey": []}, {"bearer": []}]
    return {
        "/approvals": {"get": {
            "summary": "the approvals this approver may see", "security": security,
            "parameters": [
                {"name": "status", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500}}],
            "responses": {"200": {"description": "the approvals", "content": {
                "application/json": {"schema": {
                    "type": "object", "required": ["approvals"],
                    "properties": {"approvals": {"type": "array", "items": {
                        "$ref": "#/components/schemas/Approval"}}}}}}}, **refused}}},
        "/approvals/{id}": {"get": {"summary": "one approval", "security": security,
                                    "parameters": [id_param], "responses": one}},
        "/approvals/{id}/approve": {"post": {
            "summary": "approve a pending request", "security": security,
            "parameters": [id_param], "requestBody": body, "responses": one}},
        "/approvals/{id}/deny": {"post": {
            "summary": "deny a pending request", "security": security,
            "parameters": [id_param], "requestBody": body, "responses": one}},
    }


def admin_api_spec(*, approvals: bool = False) -> dict[str, Any]:
    """The admin listener's OpenAPI document; ``approvals``: the approvals routes are
    mounted on it."""
    request_id = {"name": "X-Request-Id", "in": "header", "required": False,
                  "description": "recorded in the audit chain (printable, sent once); "
                                 "absent, one is generated",
                  "schema": {"type": "string"}}
    paths: dict[str, Any] = {
        "/health": {"get": {
            "summary": "liveness", "security": _PUBLIC,
            "responses": {"200": _json("the process serves", "Health")}}},
        "/healthz": {"get": {
            "summary": "readiness (the checks, the backends, the mode)", "security": _PUBLIC,
            "responses": {"200": _json("ready", "Readiness"),
                          "503": _json("a dependency is unavailable, or draining",
                                       "Readiness")}}},
        "/metrics": {"get": {
            "summary": "Prometheus exposition", "security": _PUBLIC,
            "responses": {"200": {"description": "the metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}}},
        "/admin/mode": {
            "get": {"summary": "the mode in force", "security": _ADMIN,
                    "responses": {"200": _json("the mode", "ModeState"), **_REFUSED}},
            "put": {"summary": "change the mode (audited before it takes effect)",
                    "security": _ADMIN, "parameters": [request_id],
                    "requestBody": {"required": True, "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ModeChange"}}}},
                    "responses": {
                        "200": _json("the mode changed", "ModeChanged"),
                        "400": _envelope("not {\"mode\": ...} with a known mode, or a "
                                         "malformed X-Request-Id"),
                        **_REFUSED,
                        "503": _envelope("the audit store or the shared state is "
                                         "unavailable; the mode is unchanged")}}},
        "/admin/config/reload": {"post": {
            "summary": "reload the config now, like SIGHUP", "security": _ADMIN,
            "responses": {"200": _json("reloaded", "ConfigReloaded"),
                          "422": _json("the new config was rejected; the running one "
                                       "stays", "ConfigReloaded"), **_REFUSED}}},
        "/admin/identity/reload": {"post": {
            "summary": "re-read the API keys and refetch the JWKS now", "security": _ADMIN,
            "responses": {"200": _json("reloaded", "IdentityReloaded"), **_REFUSED}}},
    }
    if approvals:
        paths.update(_approvals_paths())
    schemas = {"Envelope": ENVELOPE, "Health": HEALTH, "Readiness": HEALTHZ,
               "ModeState": MODE_STATE, "ModeChange": MODE_CHANGE,
               "ModeChanged": MODE_CHANGED, "ConfigReloaded": CONFIG_RELOADED,
               "IdentityReloaded": IDENTITY_RELOADED}
    if approvals:
        schemas.update({"Approval": APPROVAL, "ApprovalDecision": APPROVAL_DECISION})
    security_schemes: dict[str, Any] = {
        "adminToken": {"type": "http", "scheme": "bearer",
                       "description": "the CASF_ADMIN_TOKEN value"}}
    if approvals:
        security_schemes.update({"apiKey": {"type": "apiKey", "in": "header",
                                            "name": "X-API-Key"},
                                 "bearer": {"type": "http", "scheme": "bearer"}})
    return openapi("casf-proxy admin API", paths, schemas=schemas,
                   security_schemes=security_schemes, security=_ADMIN)
