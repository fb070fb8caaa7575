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

import asyncio
import hashlib
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.claims import ClaimHandle
from proxy.config import Config
from proxy.core import INTERNAL, NOT_MAPPED, Decision, DecisionCore
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

_UNREACHABLE = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,), "the upstream is unreachable",
                       shadowable=False)
_CONNECTION_FAILED = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,),
                             "the upstream connection failed", shadowable=False)
_TIMED_OUT = Verdict("DENY", 504, (Reason.UPSTREAM_TIMEOUT,),
                     "the upstream did not answer in time", shadowable=False)
_BUSY = Verdict("DENY", 503, (Reason.UPSTREAM_BUSY,), "no upstream connection became free in time",
                (("Retry-After", "1"),), shadowable=False)

class _SizedResponse(web.StreamResponse):
    """A response of a declared length: its headers go out with the first body chunk."""

    _send_headers_immediately = False


# what a request ends with: the response, and the decision, status and reason
# codes for the access log and the request metrics
Answer = tuple[web.StreamResponse, str, int, tuple[str, ...]]


def peer_of(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


async def read_body(request: web.BaseRequest, max_bytes: int, timeout_s: float
                    ) -> bytes | Verdict:
    """The whole body within ``max_bytes`` and ``timeout_s``, or the verdict refusing it.

    ``Expect: 100-continue`` gets its interim answer before the body is read
    (aiohttp's low-level server does not send it); any other expectation is 417.
    """
    too_large = Verdict("DENY", 413, (Reason.REQUEST_TOO_LARGE,),
                        f"request body exceeds {max_bytes} bytes",
                        (("Connection", "close"),), shadowable=False)
    length = request.content_length
    if length is not None and length > max_bytes:
        return too_large
    if not request.body_exists:
        return b""
    content = request.content
    expect = request.headers.get("Expect")
    if expect is not None and request.version >= (1, 1):
        if expect.strip().lower() != "100-continue":
            return Verdict("DENY", 417, (Reason.EXPECTATION_FAILED,),
                           "only Expect: 100-continue is supported",
                           (("Connection", "close"),), shadowable=False)
        if not content.is_eof():
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the real response has not started
    if content.is_eof():  # the whole body arrived with the headers: no read to time
        body = content.read_nowait()
        return too_large if len(body) > max_bytes else body
    chunks: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in content.iter_chunked(65536):
                total += len(chunk)
                if total > max_bytes:
                    return too_large
                chunks.append(chunk)
    except TimeoutError:
        return Verdict("DENY", 408, (Reason.BODY_TIMEOUT,), "request body read timed out",
                       (("Connection", "close"),), shadowable=False)
    return b"".join(chunks)


class InlineProxy:
    """The traffic listener's front door over one generation's decision core."""

    def __init__(self, cfg: Config, core: DecisionCore, *, metrics: Metrics,
                 upstream: UpstreamClient, consumed_headers: tuple[str, ...],
                 stripped_headers: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.core = core
        self.trail = core.trail
        self.metrics = metrics
        self.session = upstream.session
        self.pool = upstream.gate
        self.consumed = consumed_headers
        self.stripped = stripped_headers  # never forwarded (trusted identity headers)
        self.base_url = cfg.upstream.url

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
        if verdict is None:
            body = await read_body(request, limits.max_body_bytes, limits.body_read_timeout_s)
            verdict = body if isinstance(body, Verdict) else core.take_body(ex, body)
        if verdict is not None:
            return await self._deny(ex, verdict)
        # 2. route
        if core.route(ex) is None:
            if core.passthrough(ex):
                allowed = await core.allow(ex, ())
                return await self._answer(request, ex, allowed, claim)
            return await self._deny(ex, NOT_MAPPED)
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
        response, outcome, status, sent = await self._forward(request, ex, decision.claim)
        return response, outcome, status, (*decision.reasons, *sent)

    async def _deny(self, ex: Exchange, verdict: Verdict) -> Answer:
        decided = await self.core.deny(ex, verdict)
        if decided.claim is not None:
            await decided.claim.release()
        assert decided.verdict is not None
        return self._envelope(ex, decided.verdict)

    def _envelope(self, ex: Exchange, verdict: Verdict) -> Answer:
        reasons = (*verdict.reasons, *ex.extra_reasons)
        extra: tuple[tuple[str, str], ...] = ()
        if verdict.status == 503 and not any(k == "Retry-After" for k, _ in verdict.headers):
            extra = (("Retry-After", "1"),)
        shown = verdict if not ex.extra_reasons else Verdict(
            verdict.decision, verdict.status, reasons, verdict.message, verdict.headers,
            verdict.shadowable)
        return (envelope_response(shown, ex.tool, ex.request_id, ex.trace_id,
                                  self.core.policy_hash, extra),
                verdict.decision, verdict.status, reasons)

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
        # a free pool slot, within upstream.pool_timeout_ms: a wait that gives up
        # never reached the upstream (503, the claim is released), and is never
        # reported as a connect timeout
        if self.pool.locked():  # a free slot is taken at once: no timer for that
            try:
                async with asyncio.timeout(self.cfg.upstream.pool_timeout_s):
                    await self.pool.acquire()
            except TimeoutError:
                if claim is not None:
                    await claim.release()
                return await self._upstream_failed(ex, _BUSY, started)
        else:
            await self.pool.acquire()
        try:
            return await self._send(request, ex, url, headers, started, claim)
        finally:
            self.pool.release()

    async def _send(self, request: web.BaseRequest, ex: Exchange, url: URL,
                    headers: CIMultiDict[str], started: float, claim: ClaimHandle | None
                    ) -> Answer:
        ex.forwarded = True
        try:
            with ex.span.stage("upstream") as span:
                traceparent = span.traceparent()
                if traceparent is not None:  # the upstream's parent is the upstream span
                    headers["traceparent"] = traceparent
                async with asyncio.timeout(self.cfg.upstream.timeout_s):
                    upstream = await self.session.request(
                        ex.method, url, data=ex.body if ex.body else None, headers=headers,
                        allow_redirects=False)
        except aiohttp.ClientConnectorError:
            if claim is not None:  # never reached the upstream: a retry is evaluated afresh
                await claim.release()
            return await self._upstream_failed(ex, _UNREACHABLE, started)
        except TimeoutError:
            if claim is not None:  # the upstream may have acted
                claim.abandon()
            return await self._upstream_failed(ex, _TIMED_OUT, started)
        except aiohttp.ClientError:
            if claim is not None:
                claim.abandon()
            return await self._upstream_failed(ex, _CONNECTION_FAILED, started)
        self.metrics.upstream_duration.observe(time.perf_counter() - started)
        response = await self._stream_back(request, ex, upstream, started, claim)
        return response, "ALLOW", upstream.status, ()

    async def _upstream_failed(self, ex: Exchange, verdict: Verdict, started: float) -> Answer:
        latency = round((time.perf_counter() - started) * 1000, 3)
        self.trail.record_later(ex, self._outcome(ex, verdict.status, latency, None, 0,
                                                  verdict.reasons))
        return self._envelope(ex, verdict)

    def _outcome(self, ex: Exchange, status: int, latency_ms: float, digest: str | None,
                 size: int, reasons: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
        """A compact outcome record: what happened, and the decision it refers to."""
        record = self.trail.build(ex, "outcome", "ALLOW", status, reasons, {
            "ref": ex.decision_ref or None, "latency_ms": latency_ms,
            "response_sha256": digest, "response_bytes": size, **extra})
        for name in ("attrs", "body_sha256", "shadow", "key_id", "mode"):
            record.pop(name, None)  # all in the decision record it refers to
        return record

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
        keep = claim is not None
        limit = self.cfg.replay.max_stored_body_bytes
        captured = bytearray()
        complete = True
        size = 0
        client_gone = False
        abandoned = False  # stopped reading before the upstream's end
        try:
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                size += len(chunk)
                digest.update(chunk)
                if keep and complete:
                    if len(captured) + len(chunk) <= limit:
                        captured += chunk
                    else:
                        complete = False
                if client_gone:
                    # nobody reads the rest: keep reading only while the stored
                    # replay still wants it (bounded by its size cap), then let go
                    if not (keep and complete):
                        abandoned = True
                        break
                    continue
                try:
                    await out.write(chunk)
                except (ConnectionError, aiohttp.ClientConnectionResetError):
                    client_gone = True
                    if not (keep and complete):
                        abandoned = True
                        break
            if not client_gone:
                await out.write_eof()
        except (aiohttp.ClientError, TimeoutError):
            complete = False
            abandoned = True
            errlog.warning("upstream response broke off (trace %s)", ex.trace_id)
        finally:
            if abandoned:
                complete = False
                upstream.close()  # an unread connection is never handed to the next request
            else:
                upstream.release()
        if claim is not None:
            await claim.complete(StoredOutcome(upstream.status, replay_headers(upstream.headers),
                                               bytes(captured) if complete else b"", complete))
        latency = round((time.perf_counter() - started) * 1000, 3)
        extra: dict[str, Any] = {}
        if abandoned:  # the digest and byte count cover what was read, not the whole
            extra["response_truncated"] = True
        if client_gone:
            extra["client_gone"] = True
        # the decision record was committed before the forward: the outcome
        # record is committed in the background, so the connection's next
        # request does not wait for a second commit (flush() waits at shutdown)
        self.trail.record_later(ex, self._outcome(ex, upstream.status, latency,
                                                  digest.hexdigest(), size, **extra))
        return out
