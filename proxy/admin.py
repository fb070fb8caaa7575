"""The admin listener: health, readiness, metrics, the operator's admin API, and the
approvers' API and console.

The operator API (``/admin/*``) needs ``Authorization: Bearer $CASF_ADMIN_TOKEN``
(compared in constant time); approvers act with their own identity and never
with the operator token. Every error, from any handler or from aiohttp's
router (404, 405, 413), is the JSON envelope. A mode change is audited before
it takes effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from yarl import URL

from proxy.approvals.api import add_approval_routes, api_key_header, identity_authenticator
from proxy.audit.records import now_iso
from proxy.config import Mode
from proxy.console.app import ConsoleDeps, add_console
from proxy.core import trace_context
from proxy.doors.admin_schema import MODE_CHANGE, admin_api_spec
from proxy.doors.schema import validate
from proxy.envelope import envelope_response
from proxy.metrics import exposition
from proxy.model import Verdict
from proxy.policy_opa import OpaEngine
from proxy.ports import AuditUnavailable, StoreUnavailable
from proxy.reasons import Reason
from proxy.stages.replay import MAX_ID_LENGTH, parse_request_id
from proxy.strictjson import JsonRejected, loads_strict

if TYPE_CHECKING:
    from proxy.app import Runtime

log = logging.getLogger("casf")
_SET_MODE = "casf.admin.set_mode"  # the tool name of admin mode changes in the audit chain


_UPSTREAM_CHECK_MAX_S = 1.0  # readiness probes time out in seconds: never wait longer


async def upstream_accepts(url: str, timeout_s: float) -> bool:
    """Whether the upstream's host:port accepts a TCP connection within ``timeout_s``.

    A plain connect, closed at once (no request, no TLS handshake): a sidecar
    whose app is not listening yet would answer every request with 502.
    """
    target = URL(url)
    if target.host is None or target.port is None:
        return False
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class AdminApi:
    """The admin application's handlers over the running :class:`~proxy.app.Runtime`."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt


    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors], client_max_size=64 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/mode", self._get_mode)
        app.router.add_put("/admin/mode", self._put_mode)
        app.router.add_post("/admin/identity/reload", self._reload_identity)
        app.router.add_post("/admin/config/reload", self._reload_config)
        app.router.add_get("/openapi.json", self._openapi)
        # approvers act with their own identity (API key, JWT, trusted headers), never
        # the operator token: the approver API and the console (docs/approvals.md)
        auth = identity_authenticator(lambda: self.rt.identity)
        add_approval_routes(app, lambda: self.rt.approvals, auth,
                            lambda: self.rt.pipeline.policy_hash)
        if self.rt.approvals is not None and self.rt.audit_view is not None:
            console = self.rt.cfg.approvals.console if self.rt.cfg.approvals else None
            add_console(app, ConsoleDeps(
                approvals=lambda: self.rt.approvals, authenticate=auth,
                api_key_header=lambda: api_key_header(self.rt.identity),
                audit=self.rt.audit_view, mode=lambda: self.rt.mode.current().value,
                policy_hash=lambda: self.rt.pipeline.policy_hash,
                session_ttl_s=console.session_ttl_seconds if console else 900.0,
                cookie_secure=console.cookie_secure if console else True))
        return app

    def _admin_envelope(self, request: web.BaseRequest, status: int, reasons: tuple[str, ...],
                        message: str, headers: tuple[tuple[str, str], ...] = (),
                        tool: str | None = None) -> web.Response:
        """The admin API's own errors: the same envelope as the traffic listener's."""
        verdict = Verdict("DENY", status, reasons, message, headers, shadowable=False)
        return envelope_response(verdict, tool, "", trace_context(request.headers)[0],
                                 self.rt.pipeline.policy_hash)

    @web.middleware
    async def errors(self, request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                return self._admin_envelope(request, 413, (Reason.REQUEST_TOO_LARGE,),
                                            "request body too large")
            if exc.status == 405:
                return self._admin_envelope(request, 405, (Reason.ROUTE_NOT_MAPPED,),
                                            "method not allowed here",
                                            (("Allow", exc.headers.get("Allow", "")),))
            return self._admin_envelope(request, exc.status, (Reason.ROUTE_NOT_MAPPED,),
                                        "no such admin resource")

    async def _openapi(self, request: web.Request) -> web.Response:
        """This listener's OpenAPI document (the approvals routes when mounted)."""
        approvals = any(r.canonical == "/approvals" for r in request.app.router.resources())
        return web.json_response(admin_api_spec(approvals=approvals))

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _healthz(self, _: web.Request) -> web.Response:
        if self.rt.draining:  # shutting down: out of the load balancer first
            return web.json_response({"status": "draining", "checks": {},
                                      "backends": self.rt.backends,
                                      "mode": self.rt.mode.current().value,
                                      "config_hash": self.rt.cfg.digest}, status=503)
        policy_ok = not isinstance(self.rt.engine, OpaEngine) or await self.rt.engine.healthy()
        checks = {"config": "ok", "policy": "ok" if policy_ok else "unavailable",
                  "audit": "ok" if await self.rt.audit.healthy() else "unavailable"}
        if self.rt.redis is not None:
            checks["redis"] = "ok" if await self.rt.redis.ping() else "unavailable"
        u = self.rt.cfg.upstream
        checks["upstream"] = "ok" if await upstream_accepts(
            u.url, min(u.connect_timeout_s, _UPSTREAM_CHECK_MAX_S)) else "unavailable"
        ok = all(v == "ok" for v in checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "checks": checks,
                                  "backends": self.rt.backends,
                                  "mode": self.rt.mode.current().value,
                                  "config_hash": self.rt.cfg.digest},
                                 status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        self.rt.metrics.set_mode(self.rt.mode.current().value, (m.value for m in Mode))
        if self.rt.multiproc_dir is not None:  # every worker's files: read them off the loop
            body = await asyncio.to_thread(exposition, self.rt.metrics, self.rt.multiproc_dir)
        else:
            body = exposition(self.rt.metrics, None)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    def _authorised(self, request: web.Request) -> web.Response | None:
        token = self.rt.env.admin_token
        if token is None:
            return self._admin_envelope(request, 404, (Reason.ADMIN_DISABLED,),
                                        "admin API disabled (CASF_ADMIN_TOKEN unset)")
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            reason = Reason.AUTH_INVALID if given else Reason.AUTH_MISSING
            return self._admin_envelope(request, 401, (reason,), "unauthorised",
                                        (("WWW-Authenticate", "Bearer"),))
        return None

    async def _reload_identity(self, request: web.Request) -> web.Response:
        """Re-read API keys and refetch the JWKS now (docs/identity.md)."""
        denied = self._authorised(request)
        if denied is not None:
            return denied
        loaded = await self.rt.identity.reload() if self.rt.identity is not None else {}
        return web.json_response({"reloaded": loaded})

    async def _reload_config(self, request: web.Request) -> web.Response:
        """Reload the config now, like SIGHUP (this process only; see docs/operations.md)."""
        denied = self._authorised(request)
        if denied is not None:
            return denied
        ok = await self.rt.reload("admin API")
        return web.json_response({"reloaded": ok, "config_hash": self.rt.cfg.digest,
                                  "policy_hash": self.rt.pipeline.policy_hash},
                                 status=200 if ok else 422)

    async def _get_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        return web.json_response({"mode": self.rt.mode.current().value})

    async def _put_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        # validated like the traffic listener's request ids (proxy.stages.replay): the
        # value goes into the audit chain; absent, one is generated
        ids = request.headers.getall("X-Request-Id", [])
        request_id = (self.rt.pipeline.event_ids.next() if not ids else
                      parse_request_id(ids[0]) if len(ids) == 1 else None)
        if request_id is None:
            verdict = Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,),
                              f"X-Request-Id must be sent once, 1-{MAX_ID_LENGTH} printable "
                              "characters", shadowable=False)
            return envelope_response(verdict, _SET_MODE, "", trace_context(request.headers)[0],
                                     self.rt.pipeline.policy_hash)
        try:
            body = loads_strict(await request.read())  # duplicate keys are refused
            validate(body, MODE_CHANGE)  # the published schema; SchemaError is a ValueError
            new = Mode(body["mode"])
        except (JsonRejected, TypeError, ValueError):
            return self._admin_envelope(
                request, 400, (Reason.INVALID_MODE,),
                'body must be {"mode": "ALLOW" | "STEP_UP" | "READ_ONLY" | "KILL_SWITCH"}',
                tool=_SET_MODE)
        old = self.rt.mode.current()
        # audited before it takes effect: an unaudited mode change must not happen
        try:
            await self.rt.audit.append(self._mode_record(request_id, old, new, "ALLOW", 200, ()))
        except AuditUnavailable:
            return self._admin_envelope(request, 503, (Reason.FAIL_CLOSED,
                                                       Reason.AUDIT_UNAVAILABLE),
                                        "audit store unavailable; mode unchanged",
                                        (("Retry-After", "1"),), tool=_SET_MODE)
        try:
            # false: a more restrictive mode accepted while Redis is unreachable; in force
            # here, published once Redis answers (docs/state.md)
            shared = await self.rt.mode.set(new)
        except StoreUnavailable:
            reasons = (Reason.FAIL_CLOSED, Reason.MODE_STORE_UNAVAILABLE)
            with contextlib.suppress(AuditUnavailable):
                await self.rt.audit.append(self._mode_record(request_id, old, new, "DENY", 503,
                                                          reasons))
            return self._admin_envelope(request, 503, reasons,
                                        "shared state unavailable; mode unchanged",
                                        (("Retry-After", "1"),), tool=_SET_MODE)
        log.warning("mode changed %s -> %s%s", old.value, new.value,
                    "" if shared else " (this replica only until Redis answers)")
        return web.json_response({"mode": new.value, "previous": old.value, "shared": shared})

    def _mode_record(self, request_id: str, old: Mode, new: Mode, decision: str,
                     status: int, reasons: tuple[str, ...]) -> dict[str, Any]:
        return {
            "event_id": self.rt.pipeline.event_ids.next(), "ts": now_iso(), "kind": "decision",
            "request_id": request_id, "trace_id": None,
            "actor": "admin", "role": "admin", "tenant": None, "tool": _SET_MODE,
            "effect": "write", "method": "PUT", "route": "/admin/mode", "decision": decision,
            "status": status, "reason_codes": list(reasons),
            "policy_hash": self.rt.pipeline.policy_hash, "body_sha256": None,
            "attrs": {"args": {"from": old.value, "to": new.value}},
            "config_hash": self.rt.cfg.digest, "via": "admin",
        }
