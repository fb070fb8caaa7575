"""The approval console: ``/console/`` on the admin listener (docs/approvals.md).

Server-rendered pages (Jinja2, autoescaped), one stylesheet from
``/console/static/``, no script at all, and a strict Content-Security-Policy.

Sign-in: a request that carries valid trusted identity headers (an auth
proxy such as oauth2-proxy in front, from a trusted source address) signs
in by itself; otherwise the sign-in form takes an API key. Either way the
browser gets a random session token in an HttpOnly, SameSite=Strict cookie
(``Secure`` unless ``approvals.console.cookie_secure: false``), valid for
``approvals.console.session_ttl_seconds``. Only principals whose role is in
``approvals.approver_roles`` may use the console.

Every POST form carries the session's CSRF token; a POST without it, or with
a wrong one, is a 403 envelope (``Console_CsrfInvalid``). The sign-in form is
protected the same way with a token bound to a short-lived pre-sign-in
cookie.

Pages show attributes as the audit records and approvals hold them (after
redaction), never bodies or credentials.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.approvals import model
from proxy.approvals.api import Authenticate, approver_of, trace_id_of
from proxy.approvals.model import Approval, Status
from proxy.approvals.service import Approvals
from proxy.audit.verify import normalise_ts
from proxy.console.auditview import AuditView, ChainStatus, Filters
from proxy.console.sessions import Session, SessionTable
from proxy.envelope import envelope_response
from proxy.model import Principal, Verdict
from proxy.ports import AuditUnavailable, StoreUnavailable
from proxy.reasons import Reason

COOKIE = "casf_console"
LOGIN_COOKIE = "casf_console_login"
PREFIX = "/console"
PAGE_SIZE = 50
CHAIN_MAX_AGE_S = 60.0
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
_HERE = Path(__file__).resolve().parent

# flash messages are chosen by key: nothing from the query string is shown as text
NOTICES = {
    "approved": "Approved. The caller's retry will now be let through (once).",
    "denied": "Denied. The caller's retry will be refused.",
    "signed_out": "You are signed out.",
    "expired": "Your session has ended. Please sign in again.",
    "verified": "The audit chain was verified just now.",
}
PROBLEMS = {
    "self": "Four eyes: you cannot decide your own request. Another approver must.",
    "not_pending": "That approval is no longer pending (already decided, used or expired).",
    "not_found": "No such approval.",
    "comment": "The comment must be at most 500 characters.",
    "unavailable": "The decision could not be recorded (audit or approval store "
                   "unavailable). Nothing changed; please try again.",
    "bad_key": "That API key was not accepted.",
    "role": "Your role may not use the approval console.",
    "no_keys": "Sign-in with an API key is not configured; use your organisation's sign-in.",
}


@dataclass(frozen=True, slots=True)
class ConsoleDeps:
    """What the console needs from the running proxy (all read at request time)."""

    approvals: Callable[[], Approvals | None]
    authenticate: Authenticate
    api_key_header: Callable[[], str | None]
    audit: AuditView
    mode: Callable[[], str]
    policy_hash: Callable[[], str]
    session_ttl_s: float = 900.0
    cookie_secure: bool = True
    clock: Callable[[], float] = time.time
    session_clock: Callable[[], float] = time.monotonic


CONSOLE_KEY = web.AppKey("casf_console", object)
NEW_SESSION = web.RequestKey("casf_console_new_session", str)


def _ago(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d"


def _flatten(attrs: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for group in ("subject", "args", "context"):
        values = attrs.get(group)
        if not isinstance(values, Mapping):
            continue
        for name, value in values.items():
            text = value if isinstance(value, str) else orjson.dumps(value).decode()
            out.append((f"{group}.{name}", text))
    return out


class Console:
    def __init__(self, deps: ConsoleDeps) -> None:
        self.deps = deps
        self.sessions = SessionTable(deps.session_ttl_s, clock=deps.session_clock)
        self._login_tokens = SessionTable(600.0, max_sessions=10_000)
        self._chain: ChainStatus | None = None
        self._chain_lock = asyncio.Lock()

    # ------------------------------------------------------------ plumbing

    def _envelope(self, request: web.Request, verdict: Verdict) -> web.Response:
        return envelope_response(verdict, None, "", trace_id_of(request.headers),
                                 self.deps.policy_hash())

    def _csrf_refused(self, request: web.Request) -> web.Response:
        return self._envelope(request, Verdict(
            "DENY", 403, (Reason.CONSOLE_CSRF,),
            "the form's CSRF token is missing or wrong: reload the page and submit again",
            shadowable=False))

    def _allowed(self, p: Principal) -> bool:
        svc = self.deps.approvals()
        return svc is not None and p.role in svc.cfg.approver_roles

    def set_session(self, resp: web.StreamResponse, token: str) -> None:
        resp.set_cookie(COOKIE, token, max_age=int(self.deps.session_ttl_s),
                        path=PREFIX + "/", httponly=True, samesite="Strict",
                        secure=self.deps.cookie_secure)

    async def _trusted_principal(self, request: web.Request) -> Principal | None:
        """The principal of trusted identity headers on this request, if any."""
        got = await self.deps.authenticate(request.headers, request.remote or "")
        if isinstance(got, Principal) and got.auth == "trusted_header":
            return got
        return None

    async def _session(self, request: web.Request
                       ) -> tuple[str, Session] | web.StreamResponse:
        """The signed-in session, or the answer to send (sign-in page / refusal)."""
        token = request.cookies.get(COOKIE)
        session = self.sessions.get(token)
        trusted = await self._trusted_principal(request)
        if trusted is not None and (session is None or session.principal != trusted):
            if not self._allowed(trusted):
                return await self._render(request, "login.html", {
                    "problem": PROBLEMS["role"], "key_form": False}, status=403)
            self.sessions.drop(token)
            token, session = self.sessions.create(trusted)
            request[NEW_SESSION] = token  # set on the response by the middleware
        if session is None or token is None:
            where = "login?notice=expired" if token else "login"
            raise web.HTTPSeeOther(f"{PREFIX}/{where}")
        return token, session

    async def _render(self, request: web.Request, name: str, ctx: dict[str, Any],
                      status: int = 200, session: Session | None = None) -> web.Response:
        ctx = {"mode": self.deps.mode(), "session": session,
               "user": session.principal if session else None, "prefix": PREFIX, **ctx}
        notice = request.query.get("notice")
        problem = request.query.get("problem")
        ctx.setdefault("notice", NOTICES.get(notice or ""))
        ctx.setdefault("problem", PROBLEMS.get(problem or ""))
        return aiohttp_jinja2.render_template(name, request, ctx, status=status)

    async def _form(self, request: web.Request) -> Mapping[str, str]:
        if request.content_length is not None and request.content_length > 8192:
            raise web.HTTPRequestEntityTooLarge(max_size=8192,
                                                actual_size=request.content_length)
        data = await request.post()
        return {k: v for k, v in data.items() if isinstance(v, str)}

    # ------------------------------------------------------------ sign-in

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        trusted = await self._trusted_principal(request)
        if trusted is not None:
            got = await self._session(request)
            if isinstance(got, web.StreamResponse):
                return got
            raise web.HTTPSeeOther(f"{PREFIX}/")
        login_token, login = self._login_tokens.create(
            Principal("-", "-", None, "none", "-"))
        resp = await self._render(request, "login.html", {
            "login_csrf": login.csrf, "key_form": self.deps.api_key_header() is not None,
            "problem": None if self.deps.api_key_header() else PROBLEMS["no_keys"]})
        resp.set_cookie(LOGIN_COOKIE, login_token, max_age=600, path=PREFIX + "/",
                        httponly=True, samesite="Strict", secure=self.deps.cookie_secure)
        return resp

    async def login(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        login = self._login_tokens.get(request.cookies.get(LOGIN_COOKIE))
        if login is None or not login.csrf_ok(form.get("csrf")):
            return self._csrf_refused(request)
        header = self.deps.api_key_header()
        presented = form.get("api_key", "").strip()
        if header is None or not presented or len(presented) > 1024:
            raise web.HTTPSeeOther(f"{PREFIX}/login?problem=bad_key")
        headers = CIMultiDictProxy(CIMultiDict({header: presented}))
        got = await self.deps.authenticate(headers, request.remote or "")
        if not isinstance(got, Principal):
            raise web.HTTPSeeOther(f"{PREFIX}/login?problem=bad_key")
        if not self._allowed(got):
            raise web.HTTPSeeOther(f"{PREFIX}/login?problem=role")
        self._login_tokens.drop(request.cookies.get(LOGIN_COOKIE))
        token, _ = self.sessions.create(got)
        resp = web.HTTPSeeOther(f"{PREFIX}/")
        self.set_session(resp, token)
        resp.del_cookie(LOGIN_COOKIE, path=PREFIX + "/")
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        token, session = got
        form = await self._form(request)
        if not session.csrf_ok(form.get("csrf")):
            return self._csrf_refused(request)
        self.sessions.drop(token)
        resp = web.HTTPSeeOther(f"{PREFIX}/login?notice=signed_out")
        resp.del_cookie(COOKIE, path=PREFIX + "/")
        raise resp

    # ------------------------------------------------------------ approvals

    def _row(self, a: Approval, now: float) -> dict[str, Any]:
        return {"a": a, "attrs": _flatten(a.attrs), "age": _ago(now - a.created_at),
                "expires_in": _ago(a.expires_at - now), "created": model.iso(a.created_at),
                "expires": model.iso(a.expires_at)}

    async def approvals_page(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        _, session = got
        svc = self.deps.approvals()
        if svc is None:
            raise web.HTTPNotFound()
        who = approver_of(session.principal)
        error = None
        try:
            items = await svc.list_for(who, Status.PENDING, 200)
        except StoreUnavailable:
            items, error = [], PROBLEMS["unavailable"]
        except model.ApprovalError:
            items, error = [], PROBLEMS["role"]
        now = self.deps.clock()
        ctx: dict[str, Any] = {"page": "approvals",
                               "rows": [self._row(a, now) for a in items],
                               "four_eyes": svc.cfg.four_eyes}
        if error:
            ctx["problem"] = error
        return await self._render(request, "approvals.html", ctx, session=session)

    async def decide(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        _, session = got
        form = await self._form(request)
        if not session.csrf_ok(form.get("csrf")):
            return self._csrf_refused(request)
        svc = self.deps.approvals()
        approval_id = request.match_info["id"]
        action = request.match_info["action"]
        if svc is None or action not in ("approve", "deny") or not model.valid_id(approval_id):
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=not_found")
        comment = form.get("comment", "").strip()
        if len(comment) > model.MAX_COMMENT:
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=comment")
        try:
            await svc.decide(approval_id, approver_of(session.principal), action == "approve",
                             comment or None, trace_id_of(request.headers))
        except model.SelfApproval:
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=self") from None
        except model.NotPending:
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=not_pending") from None
        except (model.NotFound, model.NotApprover):
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=not_found") from None
        except (AuditUnavailable, StoreUnavailable):
            raise web.HTTPSeeOther(f"{PREFIX}/?problem=unavailable") from None
        done = "approved" if action == "approve" else "denied"
        raise web.HTTPSeeOther(f"{PREFIX}/?notice={done}")

    # ------------------------------------------------------------ audit

    async def decisions_page(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        _, session = got
        q = request.query

        def text(name: str) -> str | None:
            value = q.get(name, "").strip()
            return value[:200] or None

        form = {k: q.get(k, "") for k in ("tool", "decision", "reason", "kind", "since",
                                          "until")}
        problem = None
        status = 200
        since = until = None
        try:
            since = normalise_ts(form["since"]) if form["since"].strip() else None
            until = normalise_ts(form["until"]) if form["until"].strip() else None
        except ValueError:
            problem = "A time bound is not a date or time (e.g. 2026-12-01T09:00)."
            status = 400
        decision = text("decision")
        kind = text("kind")
        if decision not in (None, "ALLOW", "DENY", "NEEDS_APPROVAL") or kind not in (
                None, "decision", "approval", "replay"):
            problem, status = "Unknown decision or kind filter.", 400
        raw_offset = q.get("offset", "0")
        offset = int(raw_offset) if raw_offset.isdigit() and len(raw_offset) < 9 else 0
        records: list[dict[str, Any]] = []
        if problem is None:
            filters = Filters(tenant=session.principal.tenant, tool=text("tool"),
                              decision=decision, reason=text("reason"), kind=kind,
                              since=since, until=until)
            try:
                records = await self.deps.audit.recent(filters, PAGE_SIZE + 1, offset)
            except AuditUnavailable:
                problem, status = "The audit trail cannot be read right now.", 503
        more = len(records) > PAGE_SIZE
        rows = [{"r": r, "attrs": _flatten(r.get("attrs") or {})} for r in records[:PAGE_SIZE]]
        keep = {k: v for k, v in form.items() if v}
        return await self._render(request, "decisions.html", {
            "page": "decisions", "rows": rows, "form": form, "problem": problem,
            "offset": offset, "page_size": PAGE_SIZE, "more": more,
            "query_newer": {**keep, "offset": max(0, offset - PAGE_SIZE)},
            "query_older": {**keep, "offset": offset + PAGE_SIZE},
        }, status=status, session=session)

    async def _chain_status(self, force: bool) -> ChainStatus:
        async with self._chain_lock:
            stale = (self._chain is None
                     or self.deps.clock() - self._chain.verified_at > CHAIN_MAX_AGE_S)
            if force or stale:
                self._chain = await self.deps.audit.chain_status()
            assert self._chain is not None
            return self._chain

    async def chain_page(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        _, session = got
        chain = await self._chain_status(force=False)
        return await self._render(request, "chain.html", {
            "page": "chain", "chain": chain, "verified": model.iso(chain.verified_at),
            "verified_ago": _ago(self.deps.clock() - chain.verified_at)}, session=session)

    async def verify(self, request: web.Request) -> web.StreamResponse:
        got = await self._session(request)
        if isinstance(got, web.StreamResponse):
            return got
        _, session = got
        form = await self._form(request)
        if not session.csrf_ok(form.get("csrf")):
            return self._csrf_refused(request)
        await self._chain_status(force=True)
        raise web.HTTPSeeOther(f"{PREFIX}/chain?notice=verified")


@web.middleware
async def _headers(request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
    """Security headers on every answer; a session made from trusted headers gets its cookie."""
    try:
        resp = await handler(request)
    except web.HTTPException as exc:
        _decorate(request, exc)
        raise
    _decorate(request, resp)
    return resp


def _decorate(request: web.Request, resp: web.StreamResponse) -> None:
    token = request.get(NEW_SESSION)
    console = request.config_dict[CONSOLE_KEY]
    if isinstance(token, str) and isinstance(console, Console):
        console.set_session(resp, token)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    if not request.path.startswith(PREFIX + "/static/"):
        resp.headers["Cache-Control"] = "no-store"


def _query(params: Mapping[str, Any]) -> str:
    return urlencode(dict(params))


def build_console(deps: ConsoleDeps) -> web.Application:
    """The console as an aiohttp sub-application (see :func:`add_console`)."""
    console = Console(deps)
    app = web.Application(middlewares=[_headers])
    app[CONSOLE_KEY] = console
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(str(_HERE / "templates")),
                               autoescape=jinja2.select_autoescape(default=True),
                               undefined=jinja2.StrictUndefined)
    env.filters["query"] = _query
    env.globals["csrf_of"] = lambda s: s.csrf if s is not None else ""
    app.router.add_get("/", console.approvals_page)
    app.router.add_get("/login", console.login_page)
    app.router.add_post("/login", console.login)
    app.router.add_post("/logout", console.logout)
    app.router.add_post("/approvals/{id}/{action}", console.decide)
    app.router.add_get("/decisions", console.decisions_page)
    app.router.add_get("/chain", console.chain_page)
    app.router.add_post("/chain/verify", console.verify)
    app.router.add_static("/static/", _HERE / "static", show_index=False, follow_symlinks=False)
    return app


def add_console(admin: web.Application, deps: ConsoleDeps) -> None:
    """Serve the console under ``/console/`` of the admin application."""
    async def to_slash(_: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(f"{PREFIX}/")

    admin.router.add_get(PREFIX, to_slash)
    admin.add_subapp(PREFIX, build_console(deps))

