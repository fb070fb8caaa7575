"""The approver API on the admin listener: list, show, approve, deny.

Approvers authenticate with their own identity (API key, JWT, trusted
headers), exactly as clients of the traffic listener do; the operator's
bearer token is not an identity here (401). Answers:

- 400: malformed id, bad ``status`` filter, body not ``{"comment": str<=500}``;
- 401: no or invalid credential;
- 403 ``Approval_NotApprover``: the role is not one of ``approver_roles``;
- 403 ``Approval_SelfApproval``: four eyes, and this is the approver's own request;
- 404 ``Approval_NotFound``: unknown id, or another tenant's approval (the same answer);
- 409 ``Approval_NotPending``: approved, denied, expired or used already;
- 503 ``Audit_Unavailable`` / ``Approval_StoreUnavailable``: nothing changed.

Every error is the JSON envelope.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.approvals import model
from proxy.approvals.model import Approver, Status
from proxy.approvals.service import Approvals
from proxy.envelope import envelope_response
from proxy.identity import Identity
from proxy.model import Exchange, Principal, Verdict
from proxy.pathnorm import Target
from proxy.ports import AuditUnavailable, StoreUnavailable
from proxy.reasons import Reason
from proxy.stages.authenticate import AuthenticateStage
from proxy.stages.replay import parse_request_id

Authenticate = Callable[[CIMultiDictProxy[str], str], Awaitable[Principal | Verdict]]
"""Who is asking, from the request headers and the TCP peer address: the principal, or
the 401 verdict to answer with."""

MAX_BODY = 4096
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def trace_id_of(headers: Mapping[str, str]) -> str:
    """The W3C ``traceparent`` trace id when there is a valid one, else a new one."""
    m = _TRACEPARENT.match(headers.get("traceparent", "").strip())
    if m and m.group(1) != "0" * 32:
        return m.group(1)
    return secrets.token_hex(16)


def identity_authenticator(identity: Callable[[], Identity]) -> Authenticate:
    """Authenticate an admin-listener request with the proxy's identity (as the traffic
    listener does). ``identity`` returns the current one, so a config reload applies."""

    async def authenticate(headers: CIMultiDictProxy[str], peer: str) -> Principal | Verdict:
        ex = Exchange(method="GET", target=Target("/", ""), headers=headers, peer=peer,
                      scheme="http", host="", trace_id=trace_id_of(headers), traceparent="")
        verdict = await AuthenticateStage(identity()).check(ex)
        if verdict is not None:
            return verdict
        assert ex.principal is not None
        return ex.principal

    return authenticate


def api_key_header(identity: Identity) -> str | None:
    """The API-key header of the identity (the console's sign-in form), None without keys."""
    auth = identity.get("api_keys")
    header = getattr(auth, "header", None)
    return header if isinstance(header, str) else None


def approver_of(p: Principal) -> Approver:
    return Approver(p.id, p.role, p.tenant)


ERRORS: dict[type[Exception], Verdict] = {
    model.NotApprover: Verdict("DENY", 403, (Reason.APPROVAL_NOT_APPROVER,),
                               "your role may not decide approvals", shadowable=False),
    model.NotFound: Verdict("DENY", 404, (Reason.APPROVAL_NOT_FOUND,), "no such approval",
                            shadowable=False),
    model.SelfApproval: Verdict("DENY", 403, (Reason.APPROVAL_SELF,),
                                "four eyes: you cannot decide your own request",
                                shadowable=False),
    model.NotPending: Verdict("DENY", 409, (Reason.APPROVAL_NOT_PENDING,),
                              "the approval is no longer pending", shadowable=False),
    AuditUnavailable: Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.AUDIT_UNAVAILABLE),
                              "audit store unavailable; nothing changed",
                              (("Retry-After", "1"),), shadowable=False),
    StoreUnavailable: Verdict("DENY", 503, (Reason.FAIL_CLOSED,
                                            Reason.APPROVAL_STORE_UNAVAILABLE),
                              "approval store unavailable; nothing changed",
                              (("Retry-After", "1"),), shadowable=False),
}
BAD_ID = Verdict("DENY", 400, (Reason.INVALID_APPROVAL_ID,), "malformed approval id",
                 shadowable=False)


def error_verdict(exc: Exception) -> Verdict:
    for cls, verdict in ERRORS.items():
        if isinstance(exc, cls):
            return verdict
    raise exc


class ApproverApi:
    """The four routes, added to an admin ``web.Application`` by :func:`add_approval_routes`."""

    def __init__(self, approvals: Callable[[], Approvals | None], authenticate: Authenticate,
                 policy_hash: Callable[[], str]) -> None:
        self.approvals = approvals
        self.authenticate = authenticate
        self.policy_hash = policy_hash

    def _envelope(self, verdict: Verdict, request: web.Request, trace_id: str,
                  tool: str | None = None) -> web.Response:
        ids = request.headers.getall("X-Request-Id", [])
        request_id = (parse_request_id(ids[0]) or "") if len(ids) == 1 else ""
        return envelope_response(verdict, tool, request_id, trace_id, self.policy_hash())

    async def _who(self, request: web.Request, trace_id: str
                   ) -> tuple[Approvals, Approver] | web.Response:
        svc = self.approvals()
        if svc is None:
            return self._envelope(error_verdict(model.NotFound()), request, trace_id)
        got = await self.authenticate(request.headers, request.remote or "")
        if isinstance(got, Verdict):
            return self._envelope(got, request, trace_id)
        return svc, approver_of(got)

    async def list(self, request: web.Request) -> web.Response:
        trace_id = trace_id_of(request.headers)
        who = await self._who(request, trace_id)
        if isinstance(who, web.Response):
            return who
        svc, approver = who
        raw_status = request.query.get("status")
        raw_limit = request.query.get("limit", "100")
        try:
            status = Status(raw_status) if raw_status else None
        except ValueError:
            return self._envelope(Verdict("DENY", 400, (Reason.INVALID_FILTER,),
                                          "status must be one of: " + ", ".join(Status),
                                          shadowable=False), request, trace_id)
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 500:
            return self._envelope(Verdict("DENY", 400, (Reason.INVALID_FILTER,),
                                          "limit must be 1-500", shadowable=False),
                                  request, trace_id)
        try:
            items = await svc.list_for(approver, status, int(raw_limit))
        except (model.ApprovalError, StoreUnavailable) as exc:
            return self._envelope(error_verdict(exc), request, trace_id)
        return _json({"approvals": [a.public() for a in items]})

    async def show(self, request: web.Request) -> web.Response:
        trace_id = trace_id_of(request.headers)
        who = await self._who(request, trace_id)
        if isinstance(who, web.Response):
            return who
        svc, approver = who
        approval_id = request.match_info["id"]
        if not model.valid_id(approval_id):
            return self._envelope(BAD_ID, request, trace_id)
        try:
            a = await svc.get_for(approver, approval_id)
        except (model.ApprovalError, StoreUnavailable) as exc:
            return self._envelope(error_verdict(exc), request, trace_id)
        return _json({"approval": a.public()})

    async def approve(self, request: web.Request) -> web.Response:
        return await self._decide(request, True)

    async def deny(self, request: web.Request) -> web.Response:
        return await self._decide(request, False)

    async def _decide(self, request: web.Request, approve: bool) -> web.Response:
        trace_id = trace_id_of(request.headers)
        who = await self._who(request, trace_id)
        if isinstance(who, web.Response):
            return who
        svc, approver = who
        approval_id = request.match_info["id"]
        if not model.valid_id(approval_id):
            return self._envelope(BAD_ID, request, trace_id)
        raw = b""
        while len(raw) <= MAX_BODY:  # bounded: never more than MAX_BODY + 1 bytes
            chunk = await request.content.read(MAX_BODY + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        try:
            if len(raw) > MAX_BODY:
                raise ValueError("body too large")
            comment = model.parse_comment(orjson.loads(raw) if raw.strip() else None)
        except (ValueError, orjson.JSONDecodeError) as exc:
            msg = str(exc) if isinstance(exc, ValueError) and not isinstance(
                exc, orjson.JSONDecodeError) else "body is not JSON"
            return self._envelope(Verdict("DENY", 400, (Reason.INVALID_COMMENT,), msg,
                                          shadowable=False), request, trace_id)
        try:
            a = await svc.decide(approval_id, approver, approve, comment, trace_id)
        except (model.ApprovalError, AuditUnavailable, StoreUnavailable) as exc:
            return self._envelope(error_verdict(exc), request, trace_id)
        return _json({"approval": a.public()})


def _json(data: object) -> web.Response:
    resp = web.Response(body=orjson.dumps(data), content_type="application/json")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def add_approval_routes(app: web.Application, approvals: Callable[[], Approvals | None],
                        authenticate: Authenticate, policy_hash: Callable[[], str]) -> None:
    """``GET /approvals``, ``GET /approvals/{id}``, ``POST /approvals/{id}/approve|deny``.

    ``approvals`` returns the current service (None: approvals are not configured,
    every route answers 404).
    """
    api = ApproverApi(approvals, authenticate, policy_hash)
    app.router.add_get("/approvals", api.list)
    app.router.add_get("/approvals/{id}", api.show)
    app.router.add_post("/approvals/{id}/approve", api.approve)
    app.router.add_post("/approvals/{id}/deny", api.deny)
