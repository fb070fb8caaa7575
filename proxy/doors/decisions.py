"""The decision listener's front doors: the core decides, the caller acts.

* ``POST /verify`` — casf-core's decision API: VerifyRequestV1 in,
  VerifyResponseV1 out, ``200`` for every decision (deny included), a ``400``
  envelope for a body that does not fit the schema, an unknown tool or a
  missing required attribute, ``401`` without a valid credential.
* ``ANY /authz/envoy/<original path>`` — Envoy's ext_authz HTTP service
  (``path_prefix: /authz/envoy``): the original method, path, query,
  headers and (with ``with_request_body``) body.
* ``GET /authz/forward`` — forward auth (nginx ``auth_request``, Traefik
  ForwardAuth): the original method and URI in ``X-Original-Method`` /
  ``X-Original-URI`` or ``X-Forwarded-Method`` / ``X-Forwarded-Uri``; no
  body ever reaches it.

An allow of the two authz doors is ``200`` with ``X-Casf-*`` headers for the
upstream; a deny is the envelope with its status. Every decision is recorded
with ``via`` naming the door; no outcome record (the data plane forwards).
A claim completes with the decision, so a retry with the same request id and
payload gets the same decision back; fail-closed refusals release it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Mode
from proxy.core import INTERNAL, NOT_MAPPED, Decision, DecisionCore
from proxy.doors.schema import VERIFY_REQUEST, SchemaError, decision_api_spec, validate
from proxy.doors.upstream import peer_of, read_body
from proxy.envelope import envelope_response
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.pathnorm import Target
from proxy.ports import StoredOutcome
from proxy.reasons import Reason
from proxy.strictjson import JsonRejected, loads_strict

errlog = logging.getLogger("casf.pipeline")
_STRICTNESS = {Mode.ALLOW: 0, Mode.STEP_UP: 1, Mode.READ_ONLY: 2, Mode.KILL_SWITCH: 3}
_ORIGINAL = (("X-Original-Method", "X-Original-URI"), ("X-Forwarded-Method", "X-Forwarded-Uri"))
# what the authz doors take from their own request line, never from the original's
_DOOR_HEADERS = frozenset({"x-original-method", "x-original-uri", "x-forwarded-method",
                           "x-forwarded-uri", "x-envoy-auth-partial-body"})


def stricter(a: Mode, b: Mode) -> Mode:
    """The more restrictive mode: a caller can ask for more caution, never less."""
    return a if _STRICTNESS[a] >= _STRICTNESS[b] else b


def _stored(decision: str, status: int, reasons: tuple[str, ...], message: str,
            outputs: tuple[str, ...]) -> StoredOutcome:
    body = orjson.dumps({"decision": decision, "status": status, "reasons": list(reasons),
                         "message": message, "allowed_outputs": list(outputs)})
    return StoredOutcome(200, (), body, True)


class DecisionDoors:
    """The decision listener's handlers over the current generation's core."""

    def __init__(self, core: Callable[[web.Request], DecisionCore], metrics: Metrics) -> None:
        self._core = core
        self.metrics = metrics

    def app(self, middlewares: list[Any]) -> web.Application:
        app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
        app.router.add_post("/verify", self.verify)
        app.router.add_get("/authz/forward", self.forward)
        # any path, line breaks included (decided and refused, never a router 404)
        app.router.add_route("*", "/authz/envoy/{tail:[\\s\\S]*}", self.envoy)
        app.router.add_route("*", "/authz/envoy", self.envoy)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(decision_api_spec())

    # ------------------------------------------------------------ /verify

    async def verify(self, request: web.Request) -> web.StreamResponse:
        core = self._core(request)
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        ex = core.exchange("verify", "POST", request.headers, peer=peer_of(request),
                           scheme=request.scheme, host=request.headers.get("Host", ""))
        ex.target = Target("/verify", "")
        answer: tuple[web.StreamResponse, str, int, tuple[str, ...]] | None = None
        try:
            try:
                answer = await self._verify(core, request, ex)
            except Exception:
                answer = await self._internal_error(core, ex)
            return answer[0]
        finally:
            self.metrics.in_flight.dec()
            if answer is None:
                answer = (web.Response(), "DENY", 500, (Reason.INTERNAL_ERROR.value,))
            core.finish(ex, answer[1], answer[2], answer[3], started)

    async def _verify(self, core: DecisionCore, request: web.Request, ex: Exchange
                      ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        body = await read_body(request, core.cfg.decisions.max_body_bytes,
                               core.cfg.limits.body_read_timeout_s)
        if isinstance(body, Verdict):
            return await self._envelope(core, ex, body)
        try:
            doc = loads_strict(body)
            validate(doc, VERIFY_REQUEST)
        except JsonRejected as exc:
            return await self._envelope(core, ex, Verdict(
                "DENY", 400, (exc.reason,), exc.message, shadowable=False))
        except SchemaError as exc:
            return await self._envelope(core, ex, Verdict(
                "DENY", 400, (Reason.INVALID_DECISION_REQUEST,),
                f"the request does not fit VerifyRequestV1: {exc}", shadowable=False))
        ex.door_request_id = ex.request_id = doc["request_id"]
        roles = core.cfg.decisions.roles
        if roles and "role" in doc and doc["role"] not in roles:
            return await self._envelope(core, ex, Verdict(
                "DENY", 400, (Reason.INVALID_DECISION_REQUEST,),
                "role: not a role this proxy knows", shadowable=False))
        route = core.cfg.decisions.tools.get(doc["tool"])
        if route is None:
            return await self._envelope(core, ex, Verdict(
                "DENY", 400, (Reason.UNKNOWN_TOOL,), "tool: not a tool this proxy knows",
                shadowable=False))
        ex.route = route
        if "mode" in doc:
            ex.mode = stricter(ex.mode, Mode(doc["mode"]))
        ex.preset = {k: doc.get(k) for k in ("role", "subject", "args", "context")}
        # the fingerprint covers the payload (casf-core: the canonical body without the id)
        payload = {k: v for k, v in doc.items() if k != "request_id"}
        core.take_body(ex, orjson.dumps(payload, option=orjson.OPT_SORT_KEYS))
        decision = await core.decide(ex)
        if decision.kind == "replay":
            assert decision.outcome is not None
            stored = orjson.loads(decision.outcome.body)
            resp = self._response(stored["decision"], tuple(stored["reasons"]),
                                  stored["message"], tuple(stored["allowed_outputs"]), ex)
            resp.headers["X-Casf-Replayed"] = "true"
            return resp, stored["decision"], 200, tuple(stored["reasons"])
        verdict = decision.verdict
        if verdict is not None and verdict.status in (400, 401, 413):
            await _release(decision)
            return self._rendered(core, ex, verdict)
        reasons = (*verdict.reasons, *ex.extra_reasons) if verdict else decision.reasons
        outcome = verdict.decision if verdict else "ALLOW"
        message = verdict.message if verdict else "allowed"
        outputs = ex.allowed_outputs if verdict is None else ()
        shown = tuple(r for r in reasons) if verdict else ()
        await _settle(decision, _stored(outcome, 200, shown, message, outputs))
        approval = verdict.approval if verdict is not None else None
        return (self._response(outcome, shown, message, outputs, ex, approval), outcome, 200,
                reasons)

    def _response(self, decision: str, violations: tuple[str, ...], reason: str,
                  outputs: tuple[str, ...], ex: Exchange,
                  approval: Any = None) -> web.Response:
        doc: dict[str, Any] = {"decision": decision, "violations": list(violations),
                               "allowed_outputs": list(outputs), "reason": reason}
        if approval is not None:
            doc["approval"] = dict(approval)
        resp = web.json_response(doc, dumps=lambda o: orjson.dumps(o).decode())
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        resp.headers["Cache-Control"] = "no-store"
        return resp

    # ------------------------------------------------------------ authz doors

    async def envoy(self, request: web.Request) -> web.StreamResponse:
        tail = request.raw_path[len("/authz/envoy"):] or "/"
        if not tail.startswith("/"):
            tail = "/" + tail
        partial = request.headers.get("x-envoy-auth-partial-body", "").lower() == "true"
        return await self._authz(request, "envoy", request.method, tail,
                                 body_sent=True, partial=partial)

    async def forward(self, request: web.Request) -> web.StreamResponse:
        for method_h, uri_h in _ORIGINAL:
            uri = request.headers.get(uri_h)
            if uri is not None:
                method = request.headers.get(method_h, "GET").upper()
                return await self._authz(request, "forward", method, uri, body_sent=False,
                                         partial=False)
        core = self._core(request)
        started = time.perf_counter()
        ex = core.exchange("forward", "GET", request.headers, peer=peer_of(request))
        answer = await self._envelope(core, ex, Verdict(
            "DENY", 400, (Reason.MISSING_ORIGINAL_URI,),
            "X-Original-URI (or X-Forwarded-Uri) is required", shadowable=False))
        core.finish(ex, answer[1], answer[2], answer[3], started)
        return answer[0]

    async def _authz(self, request: web.Request, door: str, method: str, target: str, *,
                     body_sent: bool, partial: bool) -> web.StreamResponse:
        core = self._core(request)
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        headers = CIMultiDictProxy(CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _DOOR_HEADERS))
        ex = core.exchange(door, method, headers, peer=peer_of(request),
                           scheme=request.headers.get("X-Forwarded-Proto", request.scheme),
                           host=request.headers.get("X-Forwarded-Host",
                                                    request.headers.get("Host", "")))
        answer: tuple[web.StreamResponse, str, int, tuple[str, ...]] | None = None
        try:
            try:
                answer = await self._authz_run(core, request, ex, target,
                                               body_sent=body_sent, partial=partial)
            except Exception:
                answer = await self._internal_error(core, ex)
            return answer[0]
        finally:
            self.metrics.in_flight.dec()
            if answer is None:
                answer = (web.Response(), "DENY", 500, (Reason.INTERNAL_ERROR.value,))
            core.finish(ex, answer[1], answer[2], answer[3], started)

    async def _authz_run(self, core: DecisionCore, request: web.Request, ex: Exchange,
                         target: str, *, body_sent: bool, partial: bool
                         ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        # the header bytes as received (aiohttp decodes them as UTF-8 with surrogate
        # escapes): a value outside ASCII is refused by the head check, never a 500
        raw = [(k.encode("utf-8", "surrogateescape"), v.encode("utf-8", "surrogateescape"))
               for k, v in ex.headers.items()]
        verdict = core.check_head(ex, raw, target)
        if verdict is not None:
            return await self._envelope(core, ex, verdict)
        body: bytes | None = None
        if body_sent:
            got = await read_body(request, core.cfg.limits.max_body_bytes,
                                  core.cfg.limits.body_read_timeout_s)
            if isinstance(got, Verdict):
                return await self._envelope(core, ex, got)
            body = got
        verdict = core.take_body(ex, body)
        if verdict is not None:
            return await self._envelope(core, ex, verdict)
        route = core.route(ex)
        if route is None:
            if core.passthrough(ex):
                return self._allowed(core, ex, await core.allow(ex, ()))
            return await self._envelope(core, ex, NOT_MAPPED)
        if route.reads_body and (body is None or partial):
            return await self._envelope(core, ex, Verdict(
                "DENY", 400, (Reason.BODY_UNAVAILABLE,),
                "this route's attributes read the body, which did not reach the authorizer",
                shadowable=False))
        decision = await core.decide(ex)
        if decision.kind == "replay":
            assert decision.outcome is not None
            stored = orjson.loads(decision.outcome.body)
            if stored["decision"] == "ALLOW":
                resp = self._allow_headers(core, ex)
                resp.headers["X-Casf-Replayed"] = "true"
                return resp, "ALLOW", 200, ()
            replayed = Verdict(stored["decision"], stored["status"], tuple(stored["reasons"]),
                               stored["message"], shadowable=False)
            denied, d, s, r = self._rendered(core, ex, replayed)
            denied.headers["X-Casf-Replayed"] = "true"
            return denied, d, s, r
        if decision.kind == "allow":
            await _settle(decision, _stored("ALLOW", 200, (), "allowed", ex.allowed_outputs))
            return self._allowed(core, ex, decision)
        assert decision.verdict is not None
        v = decision.verdict
        await _settle(decision, _stored(v.decision, v.status, (*v.reasons, *ex.extra_reasons),
                                        v.message, ()))
        return self._rendered(core, ex, v)

    def _allowed(self, core: DecisionCore, ex: Exchange, decision: Decision
                 ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        if decision.kind != "allow":  # the ALLOW record could not be committed
            assert decision.verdict is not None
            return self._rendered(core, ex, decision.verdict)
        return self._allow_headers(core, ex), "ALLOW", 200, decision.reasons

    def _allow_headers(self, core: DecisionCore, ex: Exchange) -> web.Response:
        p = ex.principal
        resp = web.Response(status=200)
        resp.headers["X-Casf-Decision"] = "ALLOW"
        resp.headers["X-Casf-Tool"] = ex.tool or ""
        resp.headers["X-Casf-Principal"] = p.id if p else ""
        resp.headers["X-Casf-Role"] = p.role if p else ""
        resp.headers["X-Casf-Tenant"] = (p.tenant or "") if p else ""
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        if ex.request_id:
            resp.headers["X-Request-Id"] = ex.request_id
        return resp

    # ------------------------------------------------------------ envelopes

    async def _internal_error(self, core: DecisionCore, ex: Exchange
                              ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        """An unexpected error: a 500 DENY envelope, recorded; never an allow."""
        errlog.exception("unexpected error in the %s door (trace %s)", ex.door, ex.trace_id)
        return await self._envelope(core, ex, INTERNAL)

    async def _envelope(self, core: DecisionCore, ex: Exchange, verdict: Verdict
                        ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        """A deny decided by the door itself (bad input): recorded like any other."""
        decided = await core.deny(ex, verdict)
        await _release(decided)
        assert decided.verdict is not None
        return self._rendered(core, ex, decided.verdict)

    def _rendered(self, core: DecisionCore, ex: Exchange, verdict: Verdict
                  ) -> tuple[web.StreamResponse, str, int, tuple[str, ...]]:
        reasons = (*verdict.reasons, *ex.extra_reasons)
        shown = dataclasses.replace(verdict, reasons=reasons)  # the approval kept
        extra: tuple[tuple[str, str], ...] = ()
        if verdict.status == 503 and not any(k == "Retry-After" for k, _ in verdict.headers):
            extra = (("Retry-After", "1"),)
        return (envelope_response(shown, ex.tool, ex.request_id, ex.trace_id, core.policy_hash,
                                  extra), verdict.decision, verdict.status, reasons)


async def _release(decision: Decision) -> None:
    if decision.claim is not None:
        await decision.claim.release()


async def _settle(decision: Decision, outcome: StoredOutcome) -> None:
    """Complete the claim with the decision; a fail-closed refusal or a request
    awaiting approval releases it (the approval binds the id to its payload)."""
    if decision.claim is None:
        return
    if decision.verdict is not None and (decision.verdict.status >= 500
                                         or decision.verdict.decision == "NEEDS_APPROVAL"):
        # decided afresh on retry: once the dependency is back, or once approved
        await decision.claim.release()
    else:
        await decision.claim.complete(outcome)
