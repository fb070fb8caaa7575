"""The MCP front door: one JSON-RPC message per POST, decided by the decision core.

A request on the traffic listener whose normalised path is an ``mcp:``
endpoint's comes here instead of the route table (:class:`McpDoor`). A POST
is bounded, parsed and cross-checked with its mirrored headers (a refusal is
a JSON-RPC error, audited, never forwarded), then decided by what it is:

* ``tools/call``: the whole pipeline as the mapped tool
  (:meth:`DecisionCore.decide`), attributes read from ``params.arguments``;
  replay protection only with an ``Idempotency-Key`` (the fingerprint covers
  the tool and the canonical arguments, never the JSON-RPC id); the answer is
  streamed back and read for the outcome record (:class:`~proxy.mcp.tap.CallTap`);
* ``tools/list``: authenticated, denied in KILL_SWITCH, its answer filtered
  (JSON, or an SSE stream event by event) to what the caller may call;
* lifecycle and notifications: authenticated, in every mode; any other
  method only when the endpoint lists it.

``Mcp-Session-Id`` is bound to the caller whose ``initialize`` answer carried
it (:class:`McpSessions`); any other caller presenting it, or an id never
issued through this proxy, is 404 ``Mcp_SessionUnknown``. ``GET`` (the
server's stream) and ``DELETE`` (end of session) pass when authenticated,
with the same session check. Every message gets a decision record (``via:
mcp``, ``mcp_method``, ``jsonrpc_id``; tool ``mcp.<method>`` for methods other
than ``tools/call``); ``Mcp-Param-*`` values are never logged or recorded.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from yarl import URL

from proxy.claims import ClaimHandle
from proxy.config import Config, Mode, RouteConfig
from proxy.core import NOT_MAPPED, DecisionCore
from proxy.doors.upstream import (
    Answer,
    RelayBroken,
    outcome_record,
    read_body,
    relay,
    shown_verdict,
    upstream_call,
)
from proxy.envelope import envelope_doc
from proxy.forward import (
    UpstreamClient,
    downstream_headers,
    replay_headers,
    upstream_request_headers,
)
from proxy.mcp.config import McpEndpoint, McpTool
from proxy.mcp.listing import (
    candidates,
    filter_json_answer,
    filter_sse_event,
    response_result,
    sse_result,
    visibility_input,
)
from proxy.mcp.protocol import (
    DENIED,
    INTERNAL_ERROR,
    INVALID_REQUEST,
    McpMessage,
    McpRejected,
    ParamBinding,
    bindings_from_list,
    check_headers,
    deny_answer,
    error_body,
    fingerprint_input,
    parse_message,
    rejection_answer,
    with_id,
)
from proxy.mcp.sse import SseEvent, SseParser, SseTooLarge
from proxy.mcp.tap import CallTap
from proxy.metrics import Metrics
from proxy.model import DoorIdempotency, Exchange, Verdict
from proxy.ports import PolicyEngine, PolicyUnavailable, StoredOutcome
from proxy.reasons import Reason
from proxy.stages import Stage
from proxy.stages.attributes import build_input
from proxy.stages.policy import PolicyStage
from proxy.stages.replay import parse_request_id

errlog = logging.getLogger("casf.pipeline")

SESSION_HEADER = "Mcp-Session-Id"
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: bound on a JSON ``tools/list`` answer read whole to be filtered
MAX_LIST_BYTES = 4 * 1024 * 1024
MAX_SESSIONS = 100_000

_SESSION_UNKNOWN = Verdict("DENY", 404, (Reason.MCP_SESSION_UNKNOWN,),
                           "no such MCP session for this caller", shadowable=False)
_METHOD_DENIED = Verdict("DENY", 403, (Reason.MCP_METHOD_NOT_ALLOWED,),
                         "this MCP method is not allowed on this endpoint", shadowable=False)
_KILL_SWITCH = Verdict("DENY", 403, (Reason.MODE_KILL_SWITCH,),
                       "the kill switch is on: requests are not allowed")
_HTTP_METHOD = Verdict("DENY", 405, (Reason.ROUTE_NOT_MAPPED,),
                       "an MCP endpoint takes POST, GET and DELETE",
                       (("Allow", "POST, GET, DELETE"),), shadowable=False)
_NEED_KEY = Verdict("DENY", 400, (Reason.MISSING_REQUEST_ID,),
                    "tool calls on this endpoint need an Idempotency-Key")
_BAD_KEY = Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,),
                   "Idempotency-Key must be sent once, 1-255 printable characters")


def policy_engine(stages: list[Stage]) -> PolicyEngine:
    """The engine the core's policy stage evaluates with (``list_query`` uses it too)."""
    return next(s.engine for s in stages if isinstance(s, PolicyStage))


def _owner(ex: Exchange) -> str:
    p = ex.principal
    assert p is not None
    return f"{p.tenant or ''}\x00{p.id}"


class McpSessions:
    """``Mcp-Session-Id`` → the caller it was issued to (bounded, least recently used
    dropped first). Kept across config reloads; a dropped or restarted binding makes
    the session unknown, and MCP clients start a new one on the 404."""

    def __init__(self, max_entries: int = MAX_SESSIONS) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries

    def bind(self, session_id: str, owner: str) -> None:
        if self._owners.setdefault(session_id, owner) != owner:
            return  # issued to someone else first: it stays theirs
        self._owners.move_to_end(session_id)
        while len(self._owners) > self._max:
            self._owners.popitem(last=False)

    def owned_by(self, session_id: str, owner: str) -> bool:
        if self._owners.get(session_id) != owner:
            return False
        self._owners.move_to_end(session_id)
        return True

    def end(self, session_id: str) -> None:
        self._owners.pop(session_id, None)


def _message_route(ep: McpEndpoint, tool: str, *, kill_switch: bool) -> RouteConfig:
    """The route-like settings a message other than a tool call is recorded under."""
    return RouteConfig(index=-1, method="POST", path=ep.path, tool=tool, effect="read",
                       attributes=(), required=(), enforce=True, fail_mode="open",
                       allow_in_kill_switch=kill_switch, resource_tenant=None)


class McpDoor:
    """The MCP endpoints of one config generation, over its decision core."""

    def __init__(self, cfg: Config, core: DecisionCore, *, metrics: Metrics,
                 upstream: UpstreamClient, consumed_headers: tuple[str, ...],
                 stripped_headers: tuple[str, ...], sessions: McpSessions) -> None:
        self.cfg = cfg
        self.core = core
        self.trail = core.trail
        self.metrics = metrics
        self.upstream = upstream
        self.consumed = consumed_headers
        self.stripped = stripped_headers
        self.sessions = sessions
        self.endpoints = {ep.path: ep for ep in cfg.mcp}
        self._auth = next(s for s in core.stages if s.name == "authenticate")
        self._engine = policy_engine(core.stages)
        # tool settings a route gives the same tool (enforce, fail mode, kill switch)
        by_tool: dict[str, RouteConfig] = {}
        for rt in cfg.routes:
            by_tool.setdefault(rt.tool, rt)
        self._by_tool = by_tool
        self._routes: dict[tuple[str, str], RouteConfig] = {
            (ep.path, name): self._tool_route(ep, tool)
            for ep in cfg.mcp for name, tool in ep.tools.items()}
        # Mcp-Param-* bindings learnt from the server's tools/list answers, per endpoint
        self._bindings: dict[str, dict[str, dict[str, ParamBinding]]] = {}

    def endpoint(self, path: str) -> McpEndpoint | None:
        return self.endpoints.get(path)

    def _tool_route(self, ep: McpEndpoint, tool: McpTool) -> RouteConfig:
        same = self._by_tool.get(tool.tool)
        write = tool.effect == "write"
        return RouteConfig(
            index=-1, method="POST", path=ep.path, tool=tool.tool, effect=tool.effect,
            attributes=tool.attribute_specs(), required=tool.required,
            enforce=same.enforce if same else self.cfg.enforce_default,
            fail_mode=same.fail_mode if same else ("closed" if write else "open"),
            allow_in_kill_switch=same.allow_in_kill_switch if same else False,
            resource_tenant=None)

    # ------------------------------------------------------------ entry

    async def handle(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                     claim: list[ClaimHandle | None]) -> Answer:
        """Answer one request on ``ep`` (its head already checked by the inline door)."""
        ex.door = "mcp"
        if ex.method == "POST":
            return await self._post(request, ex, ep, claim)
        if ex.method not in ("GET", "DELETE"):
            ex.route = _message_route(ep, f"mcp.{ex.method}", kill_switch=True)
            return await self._deny_plain(ex, _HTTP_METHOD)
        # the server's stream, the end of a session: authenticated, session checked
        ex.route = _message_route(ep, f"mcp.{ex.method}", kill_switch=True)
        verdict = await self._authenticate(ex) or self._session_verdict(ex)
        if verdict is not None:
            return await self._deny_plain(ex, verdict)
        decision = await self.core.allow(ex, ())
        if decision.kind != "allow":
            assert decision.verdict is not None
            return self._plain(ex, decision.verdict)
        return await self._forward(request, ex, ep, None, None)

    async def _post(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                    claim: list[ClaimHandle | None]) -> Answer:
        limits = self.cfg.limits
        body = await read_body(request, limits.max_body_bytes, limits.body_read_timeout_s)
        verdict = body if isinstance(body, Verdict) else self.core.take_body(ex, body)
        if verdict is not None:
            return await self._refuse(ex, McpRejected(INVALID_REQUEST, verdict.reasons[0],
                                                      verdict.message, None, verdict.status),
                                      verdict)
        assert isinstance(body, bytes)
        try:
            msg = parse_message(body)
        except McpRejected as exc:
            return await self._refuse(ex, exc)
        ex.record_extra.update(mcp_method=msg.method, jsonrpc_id=msg.id_text)
        if msg.tool_name is not None:  # the name called, mapped or not (never an argument)
            ex.record_extra["mcp_tool"] = msg.tool_name
        try:
            check_headers(msg, request.headers.items(), self._param_bindings(ep, msg, ex))
        except McpRejected as exc:
            return await self._refuse(ex, exc)
        if msg.kind == "tool_call":
            return await self._tool_call(request, ex, ep, msg, claim)
        kill_switch = msg.kind == "lifecycle"
        ex.route = _message_route(ep, msg.audit_tool(), kill_switch=kill_switch)
        verdict = await self._authenticate(ex) or self._session_verdict(ex)
        if verdict is None and msg.kind == "other" and not ep.method_allowed(msg.method):
            verdict = _METHOD_DENIED
        if verdict is None and ex.mode is Mode.KILL_SWITCH and not kill_switch:
            verdict = _KILL_SWITCH
        if verdict is not None:
            return await self._deny_message(ex, ep, msg, verdict)
        decision = await self.core.allow(ex, ())
        if decision.kind != "allow":
            assert decision.verdict is not None
            return self._message_denied(ex, ep, msg, decision.verdict)
        return await self._forward(request, ex, ep, msg, None)

    def _param_bindings(self, ep: McpEndpoint, msg: McpMessage, ex: Exchange
                        ) -> dict[str, ParamBinding] | None:
        """The called tool's ``Mcp-Param-*`` bindings for the headers the call carries.

        Every mirrored header present is compared with its argument; one that is
        absent is the server's to require: a caller shown a filtered ``tools/list``
        never saw the definitions of the tools it may not call, so it cannot know
        their headers, and its call is decided (denied) on the body alone.
        """
        known = self._bindings.get(ep.path, {}).get(msg.tool_name or "")
        if known is None:
            return None
        sent = {k.lower().replace("_", "-") for k in ex.headers}
        return {t: b for t, b in known.items() if f"mcp-param-{t}" in sent}

    async def _tool_call(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                         msg: McpMessage, claim: list[ClaimHandle | None]) -> Answer:
        name = msg.tool_name or ""
        route = self._routes.get((ep.path, name))
        if route is None:
            tool = ep.resolve(name)  # unknown_tools: allow runs it as itself
            route = self._tool_route(ep, tool) if tool is not None else None
        if ex.headers.get(SESSION_HEADER) is not None:
            verdict = await self._authenticate(ex) or self._session_verdict(ex)
            if verdict is not None:
                if route is not None:
                    ex.route = route
                return await self._deny_message(ex, ep, msg, verdict)
        if route is None:
            return await self._deny_message(ex, ep, msg, NOT_MAPPED)
        ex.route = route
        # idempotency: the Idempotency-Key only (MCP has no request id of its own;
        # the JSON-RPC id changes on every retry)
        keys = ex.headers.getall(IDEMPOTENCY_HEADER, [])
        key = parse_request_id(keys[0]) if len(keys) == 1 else None
        if (keys and key is None) or (key is None and ep.require_request_id):
            # who is asking comes first, as on a route (401 before 400)
            verdict = await self._authenticate(ex) or (_BAD_KEY if keys else _NEED_KEY)
            return await self._deny_message(ex, ep, msg, verdict)
        if key is not None:
            ex.request_id = key
        ex.idempotency = DoorIdempotency(key, fingerprint_input(msg))
        decision = await self.core.decide(ex)
        claim[0] = decision.claim
        if decision.kind == "replay":
            assert decision.outcome is not None
            return self._replayed(ex, msg, decision.outcome)
        if decision.kind == "deny":
            assert decision.verdict is not None
            if decision.claim is not None:  # nothing reached the upstream
                await decision.claim.release()
            return self._message_denied(ex, ep, msg, decision.verdict)
        answer = await self._forward(request, ex, ep, msg, decision.claim)
        return (*answer[:3], (*decision.reasons, *answer[3]))

    # ------------------------------------------------------------ gates

    async def _authenticate(self, ex: Exchange) -> Verdict | None:
        if ex.principal is not None:
            return None
        return await self._auth.check(ex)

    def _session_verdict(self, ex: Exchange) -> Verdict | None:
        sessions = ex.headers.getall(SESSION_HEADER, [])
        if not sessions:
            return None
        if len(sessions) > 1 or not self.sessions.owned_by(sessions[0], _owner(ex)):
            return _SESSION_UNKNOWN
        return None

    # ------------------------------------------------------------ answers

    def _envelope(self, ex: Exchange, verdict: Verdict) -> tuple[dict[str, Any], Verdict,
                                                                 tuple[tuple[str, str], ...]]:
        shown, extra = shown_verdict(ex, verdict)
        doc = envelope_doc(shown, ex.tool, ex.request_id, ex.trace_id, self.core.policy_hash,
                           extra)
        return doc, shown, (*verdict.headers, *extra)

    def _json(self, ex: Exchange, status: int, body: bytes,
              headers: tuple[tuple[str, str], ...] = ()) -> web.Response:
        resp = web.Response(status=status, body=body, content_type="application/json")
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        resp.headers["Cache-Control"] = "no-store"
        for name, value in headers:
            resp.headers[name] = value
        return resp

    async def _refuse(self, ex: Exchange, exc: McpRejected,
                      verdict: Verdict | None = None) -> Answer:
        """A message refused before any decision: audited, a JSON-RPC error."""
        if verdict is None:
            verdict = Verdict("DENY", exc.status, (exc.reason,), exc.message, shadowable=False)
        decided = await self.core.deny(ex, verdict)
        assert decided.verdict is not None
        doc, shown, headers = self._envelope(ex, decided.verdict)
        if decided.verdict is not verdict:  # the audit store refused: its 503 answers
            status, body = decided.verdict.status, error_body(exc.id, DENIED, doc)
        else:
            status, body = rejection_answer(exc, doc)
        return self._json(ex, status, body, headers), shown.decision, status, shown.reasons

    async def _deny_message(self, ex: Exchange, ep: McpEndpoint, msg: McpMessage,
                            verdict: Verdict) -> Answer:
        decided = await self.core.deny(ex, verdict)
        if decided.claim is not None:
            await decided.claim.release()
        assert decided.verdict is not None
        return self._message_denied(ex, ep, msg, decided.verdict)

    def _message_denied(self, ex: Exchange, ep: McpEndpoint, msg: McpMessage,
                        verdict: Verdict) -> Answer:
        doc, shown, headers = self._envelope(ex, verdict)
        if verdict.status == 404:  # an unknown session: the client must see the 404
            status, body = 404, error_body(msg.id, DENIED, doc)
        else:
            status, body = deny_answer(msg, doc, ep)
        if status == 200:  # a tool error: nothing of the refusal is in HTTP terms
            headers = ()
        return self._json(ex, status, body, headers), shown.decision, status, shown.reasons

    async def _deny_plain(self, ex: Exchange, verdict: Verdict) -> Answer:
        decided = await self.core.deny(ex, verdict)
        assert decided.verdict is not None
        return self._plain(ex, decided.verdict)

    def _plain(self, ex: Exchange, verdict: Verdict) -> Answer:
        """The envelope itself, for GET and DELETE (no JSON-RPC message to answer)."""
        doc, shown, headers = self._envelope(ex, verdict)
        return (self._json(ex, verdict.status, orjson.dumps(doc) + b"\n", headers),
                shown.decision, verdict.status, shown.reasons)

    def _replayed(self, ex: Exchange, msg: McpMessage, outcome: StoredOutcome) -> Answer:
        """The stored answer of the first call, with the retry's JSON-RPC id."""
        content_type = next((v for k, v in outcome.headers if k.lower() == "content-type"),
                            None)
        if outcome.body_complete:
            body = with_id(outcome.body, content_type, msg.id)
            resp = web.Response(status=outcome.status, body=body)
            for name, value in outcome.headers:
                resp.headers.add(name, value)
        else:
            body = orjson.dumps({"jsonrpc": "2.0", "id": msg.id, "error": {
                "code": INTERNAL_ERROR,
                "message": "the answer of this Idempotency-Key was too large to store; "
                           "the call is not run again"}})
            resp = self._json(ex, outcome.status, body)
            resp.headers["X-Casf-Replay-Body"] = "omitted"
        resp.headers["Idempotent-Replayed"] = "true"
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        return resp, "ALLOW", outcome.status, ()

    # ------------------------------------------------------------ forward

    async def _forward(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                       msg: McpMessage | None, claim: ClaimHandle | None) -> Answer:
        headers = upstream_request_headers(ex, self.consumed,
                                           self.cfg.upstream.forward_credentials, self.stripped)
        target = ep.upstream_path + (f"?{ex.target.query}" if ex.target.query else "")
        url = URL(self.cfg.upstream.url + target, encoded=True)
        started = time.perf_counter()
        async with upstream_call(self.upstream, self.cfg.upstream, ex, url, headers,
                                 claim) as upstream:
            if isinstance(upstream, Verdict):
                latency = round((time.perf_counter() - started) * 1000, 3)
                if msg is not None and msg.kind == "tool_call":
                    self.trail.record_later(ex, outcome_record(
                        self.trail, ex, upstream.status, latency, None, 0, upstream.reasons))
                if msg is None:
                    return self._plain(ex, upstream)
                return self._message_denied(ex, ep, msg, upstream)
            self.metrics.upstream_duration.observe(time.perf_counter() - started)
            response = await self._stream_back(request, ex, ep, msg, upstream, started, claim)
            return response, "ALLOW", upstream.status, ()

    async def _stream_back(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                           msg: McpMessage | None, upstream: aiohttp.ClientResponse,
                           started: float, claim: ClaimHandle | None) -> web.StreamResponse:
        self._learn_session(ex, msg, upstream)
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                 headers=downstream_headers(upstream.headers))
        out.headers["X-Casf-Trace-Id"] = ex.trace_id
        if ex.budget_warnings:
            out.headers["X-Casf-Budget-Warning"] = ", ".join(ex.budget_warnings)
        content_type = upstream.headers.get("Content-Type")
        sse = content_type is not None and "text/event-stream" in content_type.lower()
        listing = msg is not None and msg.kind == "tool_list"  # any status: never unread
        tap = CallTap(content_type, msg.id) if msg is not None and msg.kind == "tool_call" \
            else None
        if listing and not sse:
            return await self._filtered_json(request, ex, ep, msg, upstream, out)
        got = await relay(request, out, upstream, ex, keep=claim is not None,
                          limit=self.cfg.replay.max_stored_body_bytes,
                          feed=tap.feed if tap is not None else _ignore,
                          rewrite=_ListFilter(self, ex, ep) if listing else None)
        if claim is not None:
            await claim.complete(StoredOutcome(upstream.status, replay_headers(upstream.headers),
                                               got.captured, got.complete))
        if ex.method == "DELETE" and 200 <= upstream.status < 300:
            for sid in ex.headers.getall(SESSION_HEADER, []):
                self.sessions.end(sid)
        if tap is not None:  # a tool call's outcome record
            read = tap.finish()
            extra: dict[str, Any] = {"result_error": read.is_error}
            if got.abandoned:
                extra["response_truncated"] = True
            if got.client_gone:
                extra["client_gone"] = True
            latency = round((time.perf_counter() - started) * 1000, 3)
            self.trail.record_later(ex, outcome_record(
                self.trail, ex, upstream.status, latency, read.response_sha256,
                read.response_bytes, **extra))
        return out

    def _learn_session(self, ex: Exchange, msg: McpMessage | None,
                       upstream: aiohttp.ClientResponse) -> None:
        """An ``initialize`` answer's session id becomes the caller's."""
        sid = upstream.headers.get(SESSION_HEADER)
        if sid is not None and msg is not None and msg.method == "initialize":
            self.sessions.bind(sid, _owner(ex))

    # ------------------------------------------------------------ tools/list

    async def _filtered_json(self, request: web.BaseRequest, ex: Exchange, ep: McpEndpoint,
                             msg: McpMessage | None, upstream: aiohttp.ClientResponse,
                             out: web.StreamResponse) -> web.StreamResponse:
        assert msg is not None
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in upstream.content.iter_any():
                total += len(chunk)
                if total > MAX_LIST_BYTES:
                    chunks = []
                    break
                chunks.append(chunk)
        finally:
            upstream.close() if total > MAX_LIST_BYTES else upstream.release()
        raw = b"".join(chunks)
        visible = await self.visibility(ex, ep, response_result(raw))
        body = filter_json_answer(raw, ep, visible.__contains__, msg.id)
        out.content_length = len(body)
        await out.prepare(request)
        await out.write(body)
        await out.write_eof()
        return out

    async def visibility(self, ex: Exchange, ep: McpEndpoint, result: Any) -> frozenset[str]:
        """The tools of a ``tools/list`` result the caller is shown: mapped (or any with
        ``unknown_tools: allow``) and, with ``list_query``, true for the caller and the
        tool. An engine that cannot answer shows nothing."""
        if isinstance(result, dict):
            learnt = bindings_from_list(result)
            if learnt:
                self._bindings.setdefault(ep.path, {}).update(learnt)
        names = candidates(result, ep)
        if ep.list_query is None:
            return frozenset(names)
        assert ex.principal is not None and ex.route is not None
        groups: dict[str, dict[str, Any]] = {"subject": {}, "args": {}, "context": {}}
        if ex.principal.tenant is not None:
            groups["context"]["tenant_id"] = ex.principal.tenant
        list_input = build_input(ex, ex.route, groups)
        shown: set[str] = set()
        for name in names:
            tool = ep.resolve(name)
            if tool is None:
                continue
            try:
                if await self._engine.query_true(ep.list_query,
                                                 visibility_input(list_input, tool)):
                    shown.add(name)
            except PolicyUnavailable:
                continue
        return frozenset(shown)


def _ignore(chunk: bytes) -> None:
    return None


class _ListFilter:
    """A ``tools/list`` answer stream, filtered event by event as it passes."""

    def __init__(self, door: McpDoor, ex: Exchange, ep: McpEndpoint) -> None:
        self.door, self.ex, self.ep = door, ex, ep
        self.parser = SseParser()

    async def _events(self, events: list[SseEvent]) -> bytes:
        out = bytearray()
        for event in events:
            result = sse_result(event)
            if result is None:
                out += event.raw
                continue
            visible = await self.door.visibility(self.ex, self.ep, result)
            out += filter_sse_event(event, self.ep, visible.__contains__)
        return bytes(out)

    async def feed(self, chunk: bytes) -> bytes:
        try:
            events = self.parser.feed(chunk)
        except SseTooLarge as exc:  # cannot be filtered, so never passed on unread
            raise RelayBroken(str(exc)) from None
        return await self._events(events)

    async def close(self) -> bytes:
        # an event left open at the end is never dispatched by a reader; it is
        # dropped rather than passed on unfiltered
        return await self._events(self.parser.close_events())


def mcp_door_for(cfg: Config, core: DecisionCore, *, metrics: Metrics,
                 upstream: UpstreamClient, consumed_headers: tuple[str, ...],
                 stripped_headers: tuple[str, ...], sessions: McpSessions | None
                 ) -> McpDoor | None:
    """The generation's MCP door, or None when the config has no ``mcp:`` endpoint."""
    if not cfg.mcp:
        return None
    return McpDoor(cfg, core, metrics=metrics, upstream=upstream,
                   consumed_headers=consumed_headers, stripped_headers=stripped_headers,
                   sessions=sessions if sessions is not None else McpSessions())

