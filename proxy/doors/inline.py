"""The inline reverse proxy: read and bound the request, decide, forward on ALLOW.

:meth:`InlineProxy.handle` reads top to bottom in the pipeline's order: the
pure head checks, the body read within ``limits``, the route (or a
passthrough prefix), the decision core (stages 3-9), and only on ``allow``
:meth:`InlineProxy._forward` — called from exactly one place, after the
decision record was committed. The response is streamed back; the outcome
record is queued once it is complete, and the claim is completed with the
stored outcome (or released when nothing reached the upstream). Any
unexpected exception before forwarding becomes a 500 envelope with decision
DENY and an audit record; an error never forwards.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.claims import ClaimHandle
from proxy.config import Config
from proxy.core import INTERNAL, NOT_MAPPED, Decision, DecisionCore
from proxy.doors.mcp import McpSessions, mcp_door_for
from proxy.doors.upstream import (
    Answer,
    outcome_record,
    peer_of,
    read_body,
    relay,
    shown_verdict,
    upstream_call,
)
from proxy.doors.websocket import WebSocketRelay, upgrade_verdict
from proxy.envelope import envelope_response
from proxy.forward import (
    UpstreamClient,
    downstream_headers,
    replay_headers,
    upstream_request_headers,
)
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.ports import StoredOutcome
from proxy.reasons import Reason
from proxy.stages import Stage

errlog = logging.getLogger("casf.pipeline")


class _SizedResponse(web.StreamResponse):
    """A response of a declared length: its headers go out with the first body chunk
    (one transport write for a small response instead of two)."""

    _send_headers_immediately = False



class InlineProxy:
    """The traffic listener's front door over one generation's decision core."""

    def __init__(self, cfg: Config, core: DecisionCore, *, metrics: Metrics,
                 upstream: UpstreamClient, consumed_headers: tuple[str, ...],
                 stripped_headers: tuple[str, ...] = (),
                 mcp_sessions: McpSessions | None = None) -> None:
        self.cfg = cfg
        self.core = core
        self.trail = core.trail
        self.metrics = metrics
        self.upstream = upstream
        self.consumed = consumed_headers
        self.stripped = stripped_headers  # never forwarded (trusted identity headers)
        self.base_url = cfg.upstream.url
        self.websocket = WebSocketRelay(cfg, core.trail, metrics, upstream, consumed_headers,
                                        stripped_headers, self._envelope)
        # the MCP endpoints (docs/mcp.md); their sessions outlive a config reload
        self.mcp_sessions = mcp_sessions if mcp_sessions is not None else McpSessions()
        self.mcp = mcp_door_for(cfg, core, metrics=metrics, upstream=upstream,
                                consumed_headers=consumed_headers,
                                stripped_headers=stripped_headers, sessions=self.mcp_sessions)

    # what tests and the runtime read of a generation
    @property
    def policy_hash(self) -> str:
        return self.core.policy_hash

    @property
    def stages(self) -> list[Stage]:
        return self.core.stages

    @property
    def event_ids(self) -> Any:
        return self.trail.event_ids

    async def flush(self) -> None:
        await self.trail.flush()

    def record_refusal(self, verdict: Verdict, trace_id: str) -> str:
        return self.core.record_refusal(verdict, trace_id)

    # ------------------------------------------------------------ entry

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        ex = self.core.exchange("proxy", request.method, request.headers, peer=peer_of(request),
                                scheme=request.scheme, host=request.headers.get("Host", ""))
        decision, status = "DENY", 500
        reasons: tuple[str, ...] = (Reason.INTERNAL_ERROR.value,)
        claim: list[ClaimHandle | None] = [None]
        try:
            response, decision, status, reasons = await self._run(request, ex, claim)
            status = response.status
            return response
        except Exception:
            errlog.exception("unexpected error (trace %s)", ex.trace_id)
            held = claim[0]
            if held is not None:
                if ex.forwarded:  # the upstream may have acted: keep it until its lease ends
                    held.abandon()
                else:
                    await held.release()
            response, decision, status, reasons = await self._deny(ex, INTERNAL)
            return response
        finally:
            self.metrics.in_flight.dec()
            self.core.finish(ex, decision, status, reasons, started)

    async def _run(self, request: web.BaseRequest, ex: Exchange,
                   claim: list[ClaimHandle | None]) -> Answer:
        core, limits = self.core, self.cfg.limits
        # 1. parse & bound
        verdict = core.check_head(ex, request.raw_headers, request.raw_path)
        # an MCP endpoint's path: its own door (JSON-RPC), never the route table
        if verdict is None and self.mcp is not None and (
                endpoint := self.mcp.endpoint(ex.target.path)) is not None:
            return await self.mcp.handle(request, ex, endpoint, claim)
        if verdict is None:
            body = await read_body(request, limits.max_body_bytes, limits.body_read_timeout_s)
            verdict = body if isinstance(body, Verdict) else core.take_body(ex, body)
        if verdict is not None:
            return await self._deny(ex, verdict)
        # 2. route
        route = core.route(ex)
        if route is None and not core.passthrough(ex):
            return await self._deny(ex, NOT_MAPPED)
        # an Upgrade only on a websocket route, and there nothing else (never stripped)
        refused = upgrade_verdict(route, ex.method, request.version, request.headers)
        if refused is not None:
            return await self._deny(ex, refused)
        if route is None:  # passthrough
            return await self._answer(request, ex, await core.allow(ex, ()), claim)
        # 3-9. authenticate, attributes, anti-replay, invariants, rate limits, policy, audit
        return await self._answer(request, ex, await core.decide(ex), claim)

    async def _answer(self, request: web.BaseRequest, ex: Exchange, decision: Decision,
                      claim: list[ClaimHandle | None]) -> Answer:
        claim[0] = decision.claim
        if decision.kind == "replay":
            assert decision.outcome is not None
            return self._replayed(ex, decision.outcome), "ALLOW", decision.outcome.status, ()
        if decision.kind == "deny":
            assert decision.verdict is not None
            if decision.claim is not None:  # nothing reached the upstream
                await decision.claim.release()
            return self._envelope(ex, decision.verdict)
        # 10. forward: only here, after the ALLOW record was committed
        if ex.route is not None and ex.route.websocket:  # the upgrade was checked: relay
            response, outcome, status, sent = await self.websocket.relay(request, ex,
                                                                         decision.claim)
            return response, outcome, status, (*decision.reasons, *sent)
        response, outcome, status, sent = await self._forward(request, ex, decision.claim)
        return response, outcome, status, (*decision.reasons, *sent)

    async def _deny(self, ex: Exchange, verdict: Verdict) -> Answer:
        decided = await self.core.deny(ex, verdict)
        if decided.claim is not None:
            await decided.claim.release()
        assert decided.verdict is not None
        return self._envelope(ex, decided.verdict)

    def _envelope(self, ex: Exchange, verdict: Verdict) -> Answer:
        shown, extra = shown_verdict(ex, verdict)
        return (envelope_response(shown, ex.tool, ex.request_id, ex.trace_id,
                                  self.core.policy_hash, extra),
                verdict.decision, verdict.status, shown.reasons)

    def _replayed(self, ex: Exchange, outcome: StoredOutcome) -> web.Response:
        """A stored upstream outcome again (its replay record is committed)."""
        resp = web.Response(status=outcome.status,
                            body=outcome.body if outcome.body_complete else b"")
        for name, value in outcome.headers:
            resp.headers.add(name, value)
        resp.headers["Idempotent-Replayed"] = "true"
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        if not outcome.body_complete:
            resp.headers["X-Casf-Replay-Body"] = "omitted"
        return resp

    # ------------------------------------------------------------ stage 10

    async def _forward(self, request: web.BaseRequest, ex: Exchange,
                       claim: ClaimHandle | None) -> Answer:
        headers = upstream_request_headers(ex, self.consumed, self.cfg.upstream.forward_credentials,
                                           self.stripped)
        # the normalised target exactly as decided on, byte for byte: a string URL
        # would be re-quoted by the client (``%3B`` sent as ``;``, ``%7E`` as ``~``)
        url = URL(self.base_url + ex.target.path_and_query, encoded=True)
        started = time.perf_counter()
        async with upstream_call(self.upstream, self.cfg.upstream, ex, url, headers,
                                 claim) as upstream:
            if isinstance(upstream, Verdict):
                return await self._upstream_failed(ex, upstream, started)
            self.metrics.upstream_duration.observe(time.perf_counter() - started)
            response = await self._stream_back(request, ex, upstream, started, claim)
            return response, "ALLOW", upstream.status, ()

    async def _upstream_failed(self, ex: Exchange, verdict: Verdict, started: float) -> Answer:
        latency = round((time.perf_counter() - started) * 1000, 3)
        self.trail.record_later(ex, outcome_record(self.trail, ex, verdict.status, latency,
                                                   None, 0, verdict.reasons))
        return self._envelope(ex, verdict)

    async def _stream_back(self, request: web.BaseRequest, ex: Exchange,
                           upstream: aiohttp.ClientResponse, started: float,
                           claim: ClaimHandle | None) -> web.StreamResponse:
        sized = upstream.content_length is not None and "chunked" not in upstream.headers.get(
            "Transfer-Encoding", "").lower()
        # a response of a declared length goes out with its headers in one write
        # (headers held until the first chunk); a streamed one sends them at once
        out = (_SizedResponse if sized else web.StreamResponse)(
            status=upstream.status, reason=upstream.reason,
            headers=downstream_headers(upstream.headers))
        if sized:
            out.content_length = upstream.content_length
        out.headers["X-Casf-Trace-Id"] = ex.trace_id
        if ex.budget_warnings:
            out.headers["X-Casf-Budget-Warning"] = ", ".join(ex.budget_warnings)
        digest = hashlib.sha256()
        got = await relay(request, out, upstream, ex, keep=claim is not None,
                          limit=self.cfg.replay.max_stored_body_bytes, feed=digest.update)
        if claim is not None:
            await claim.complete(StoredOutcome(upstream.status, replay_headers(upstream.headers),
                                               got.captured, got.complete))
        latency = round((time.perf_counter() - started) * 1000, 3)
        extra: dict[str, Any] = {}
        if got.abandoned:  # the digest and byte count cover what was read, not the whole
            extra["response_truncated"] = True
        if got.client_gone:
            extra["client_gone"] = True
        # the decision record was committed before the forward: the outcome
        # record is committed in the background, so the connection's next
        # request does not wait for a second commit (flush() waits at shutdown)
        self.trail.record_later(ex, outcome_record(self.trail, ex, upstream.status, latency,
                                                   digest.hexdigest(), got.size, **extra))
        return out
