"""Reason codes: one enum, the same string in envelopes, audit, logs and metrics.

Policy violations returned by Rego are free-form strings and travel next to
these; ``BadRequest_Missing<Name>`` is built from the attribute name by
:func:`missing_attribute`.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # parse & bound
    REQUEST_TOO_LARGE = "Request_TooLarge"
    BODY_TIMEOUT = "BadRequest_BodyTimeout"
    MALFORMED_PATH = "BadRequest_MalformedPath"
    AMBIGUOUS_REQUEST = "BadRequest_Ambiguous"
    MALFORMED_HEADER = "BadRequest_MalformedHeader"
    UNSUPPORTED_ENCODING = "Request_UnsupportedEncoding"
    EXPECTATION_FAILED = "Request_ExpectationFailed"
    # the HTTP parser (before a request exists; see proxy.httpserver)
    MALFORMED_REQUEST = "BadRequest_MalformedRequest"
    HEADERS_TOO_LARGE = "Request_HeadersTooLarge"
    # route
    ROUTE_NOT_MAPPED = "Route_NotMapped"
    # authenticate
    AUTH_MISSING = "Auth_Missing"
    AUTH_INVALID = "Auth_Invalid"
    # attributes
    INVALID_JSON = "BadRequest_InvalidJson"
    # anti-replay
    MISSING_REQUEST_ID = "BadRequest_MissingRequestId"
    INVALID_REQUEST_ID = "BadRequest_InvalidRequestId"
    REPLAY_CONCURRENT = "Inv_ReplayConcurrent"
    REPLAY_MISMATCH = "Inv_ReplayPayloadMismatch"
    REPLAY_UNAVAILABLE = "Inv_ReplayCheckUnavailable"
    # invariants
    MODE_READ_ONLY = "Mode_ReadOnly_NoWrite"
    MODE_KILL_SWITCH = "Mode_KillSwitch"
    TENANT_MISMATCH = "Tenant_Mismatch"
    # rate limits
    RATE_LIMITED = "RateLimit_Exceeded"
    RATE_LIMIT_UNAVAILABLE = "Inv_RateLimitUnavailable"
    BUDGET_EXCEEDED = "Budget_Exceeded"
    MODE_STORE_UNAVAILABLE = "Inv_ModeStoreUnavailable"
    # policy
    POLICY_DENIED = "Policy_Denied"
    POLICY_BAD_RESULT = "Policy_BadResult"
    POLICY_EVAL_ERROR = "Policy_EvalError"
    APPROVAL_REQUIRED = "Approval_Required"
    APPROVAL_NOT_ACCEPTED = "Approval_NotAccepted"  # approved, yet the policy asks again
    OPA_UNAVAILABLE = "OPA_Unavailable"
    # audit
    AUDIT_UNAVAILABLE = "Audit_Unavailable"
    # forward
    UPSTREAM_UNAVAILABLE = "Upstream_Unavailable"
    UPSTREAM_TIMEOUT = "Upstream_Timeout"
    UPSTREAM_BUSY = "Upstream_Busy"  # no pool connection free within upstream.pool_timeout_ms
    # the decision doors
    INVALID_DECISION_REQUEST = "BadRequest_InvalidDecisionRequest"
    UNKNOWN_TOOL = "BadRequest_UnknownTool"
    MISSING_ORIGINAL_URI = "BadRequest_MissingOriginalUri"
    BODY_UNAVAILABLE = "Decision_BodyUnavailable"
    # the admin API
    ADMIN_DISABLED = "Admin_Disabled"
    INVALID_MODE = "BadRequest_InvalidMode"
    # MCP (proxy.mcp)
    MCP_BATCH_NOT_ALLOWED = "Mcp_BatchNotAllowed"
    MCP_INVALID_MESSAGE = "Mcp_InvalidMessage"
    MCP_INVALID_PARAMS = "Mcp_InvalidParams"
    MCP_HEADER_MISMATCH = "Mcp_HeaderMismatch"
    MCP_METHOD_NOT_ALLOWED = "Mcp_MethodNotAllowed"
    MCP_SESSION_UNKNOWN = "Mcp_SessionUnknown"
    # cross-cutting
    FAIL_CLOSED = "FAIL_CLOSED"
    INTERNAL_ERROR = "Internal_Error"
    # anti-replay: a finished request's outcome dropped by the embedded store's budget
    REPLAY_OUTCOME_EVICTED = "Inv_ReplayOutcomeEvicted"
    # human approval (docs/approvals.md)
    APPROVAL_DENIED = "Approval_Denied"
    APPROVAL_SELF = "Approval_SelfApproval"
    APPROVAL_NOT_PENDING = "Approval_NotPending"
    APPROVAL_NOT_FOUND = "Approval_NotFound"
    APPROVAL_NOT_APPROVER = "Approval_NotApprover"
    APPROVAL_STORE_UNAVAILABLE = "Approval_StoreUnavailable"
    INVALID_APPROVAL_ID = "BadRequest_InvalidApprovalId"
    INVALID_COMMENT = "BadRequest_InvalidComment"
    INVALID_FILTER = "BadRequest_InvalidFilter"
    CONSOLE_CSRF = "Console_CsrfInvalid"
    # WebSocket routes (proxy/doors/websocket.py)
    UPGRADE_NOT_ALLOWED = "BadRequest_UpgradeNotAllowed"
    UPGRADE_REQUIRED = "BadRequest_UpgradeRequired"


def missing_attribute(name: str) -> str:
    """``patient_id`` → ``BadRequest_MissingPatientId`` (casf-core's spelling)."""
    leaf = name.rsplit(".", 1)[-1]
    camel = "".join(part[:1].upper() + part[1:] for part in leaf.replace("-", "_").split("_"))
    return f"BadRequest_Missing{camel}"
