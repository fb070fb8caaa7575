"""The request pipeline, in the contract's order (contract §2).

    1 parse & bound → 2 route → 3 authenticate → 4 attributes → 5 anti-replay
    → 6 invariants → 7 rate limits → 8 policy → 9 audit (committed) → 10 forward

:meth:`Pipeline.handle` reads top to bottom in that order. Stages 3-8 are
:class:`~proxy.stages.Stage` objects in ``self.stages`` (5-7 are one
admission stage: one atomic state call, answers reported in stage order,
see ``proxy.stages.admission``); the first verdict
stops the pipeline (unless the route is in shadow mode and the verdict is
shadowable). :meth:`Pipeline._forward` is called from exactly one place: the
ALLOW branch, after the decision record has been committed. Any unexpected
exception before forwarding becomes a 500 envelope with decision DENY and an
audit record; an error never forwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.audit.records import EventIds, base_record
from proxy.config import Config
from proxy.envelope import envelope_response
from proxy.forward import (
    UpstreamClient,
    downstream_headers,
    replay_headers,
    upstream_request_headers,
)
from proxy.metrics import Metrics
from proxy.model import ANONYMOUS_AUTH, Exchange, Principal, Verdict
from proxy.pathnorm import MalformedTarget, Target, split_target
from proxy.ports import AdmissionStore, AuditSink, AuditUnavailable, ModeStore, StoredOutcome
from proxy.reasons import Reason
from proxy.requestcheck import header_verdict, override_param_verdict
from proxy.routing import PASSTHROUGH_METHODS
from proxy.stages import Stage
from proxy.stages.replay import client_request_id

log = logging.getLogger("casf.access")
errlog = logging.getLogger("casf.pipeline")

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# trace and span ids need to be unique, not secret (they are echoed to the caller
# and sent upstream): a PRNG seeded from os.urandom, reseeded in a forked child,
# instead of a getrandom() system call per id
_IDS = random.Random()  # noqa: S311
os.register_at_fork(after_in_child=_IDS.seed)


def _span_id() -> str:
    return f"{_IDS.getrandbits(64) or 1:016x}"  # all zeros is invalid (W3C)


def _trace_id() -> str:
    return f"{_IDS.getrandbits(128) or 1:032x}"


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_UNREACHABLE = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,), "the upstream is unreachable",
                       shadowable=False)
_CONNECTION_FAILED = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,),
                             "the upstream connection failed", shadowable=False)
_TIMED_OUT = Verdict("DENY", 504, (Reason.UPSTREAM_TIMEOUT,),
                     "the upstream did not answer in time", shadowable=False)
_ANONYMOUS = Principal("anonymous", "", None, ANONYMOUS_AUTH, "")


# what a request ends with: the response, and the decision, status and reason
# codes for the access log and the request metrics
Answer = tuple[web.StreamResponse, str, int, tuple[str, ...]]


def trace_context(headers: Mapping[str, str]) -> tuple[str, str]:
    """(trace_id, traceparent to forward) per W3C Trace Context.

    A valid caller ``traceparent`` keeps its trace id and flags; the proxy is a
    new span, so the upstream gets a new parent id. Absent or invalid: a new
    trace (sampled).
    """
    tp = headers.get("traceparent", "").strip().lower()
    m = _TRACEPARENT.match(tp)
    if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
        return m.group(1), f"00-{m.group(1)}-{_span_id()}-{m.group(3)}"
    trace_id = _trace_id()
    return trace_id, f"00-{trace_id}-{_span_id()}-01"


class Pipeline:
    def __init__(self, cfg: Config, stages: list[Stage], *, state: AdmissionStore,
                 mode: ModeStore, audit: AuditSink, policy_hash: str, metrics: Metrics,
                 upstream: UpstreamClient, consumed_headers: tuple[str, ...],
                 stripped_headers: tuple[str, ...] = ()) -> None:
        self.cfg = cfg
        self.stages = stages
        self.state = state
        self.mode = mode
        self.audit = audit
        self.policy_hash = policy_hash
        self.metrics = metrics
        self.session = upstream.session
        self.pool = upstream.gate
        self.consumed = consumed_headers
        self.stripped = stripped_headers  # never forwarded (trusted identity headers)
        self.base_url = cfg.upstream.url
        self.event_ids = EventIds()
        self._pending: set[asyncio.Future[Any]] = set()  # outcome records being committed

    async def flush(self) -> None:
        """Wait until every outcome record handed to the audit sink is committed."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    # ------------------------------------------------------------ entry

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        self.metrics.in_flight.inc()
        trace_id, traceparent = trace_context(request.headers)
        ex = Exchange(method=request.method, target=Target("", ""), headers=request.headers,
                      peer=_peer(request), scheme=request.scheme,
                      host=request.headers.get("Host", ""), trace_id=trace_id,
                      traceparent=traceparent, mode=self.mode.current())
        decision, status, sent = "DENY", 500, 0
        reasons: tuple[str, ...] = (Reason.INTERNAL_ERROR,)
        # the caller's id when valid (validation errors are the replay stage's to report),
        # else a generated one, so every envelope and record names the request
        if not isinstance(client_request_id(ex, self.cfg.replay.request_id_headers), str):
            ex.request_id = self.event_ids.next()
        try:
            response, decision, status, reasons = await self._run(request, ex)
            sent = response.status
            return response
        except Exception:
            errlog.exception("unexpected error (trace %s)", trace_id)
            if ex.forwarded:  # keep the claim: it expires with its lease, never re-opened
                ex.claim = None
            verdict = Verdict("DENY", 500, (Reason.INTERNAL_ERROR,), "internal error",
                              shadowable=False)
            response, decision, status, reasons = await self._deny(ex, verdict)
            sent = response.status
            return response
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.in_flight.dec()
            self.metrics.duration.observe(elapsed)
            self.metrics.count_request(ex.tool or "-", decision, sent or status)
            if log.isEnabledFor(logging.INFO):  # one JSON line (proxy.logs), never bodies
                log.info({
                    "trace_id": trace_id, "request_id": ex.request_id or None,
                    "method": ex.method, "route": ex.route.path if ex.route else None,
                    "tool": ex.tool or None, "decision": decision, "status": sent or status,
                    "auth": ex.principal.auth if ex.principal else None,
                    "key_id": ex.principal.key_id if ex.principal else None,  # never the key
                    "reason_codes": list(reasons), "shadow": ex.shadow or None,
                    "latency_ms": round(elapsed * 1000, 3)})

    async def _run(self, request: web.BaseRequest, ex: Exchange) -> Answer:
        # 1. parse & bound
        verdict = await self._parse(request, ex)
        if verdict is not None:
            return await self._deny(ex, verdict)
        # 2. route
        match = self.cfg.table.match(ex.method, ex.target.path)
        if match is None:
            if ex.method in PASSTHROUGH_METHODS and self._passthrough(ex.target.path):
                return await self._allow(request, ex, ())
            verdict = Verdict("DENY", 403, (Reason.ROUTE_NOT_MAPPED,),
                              "no route maps this request to a tool", shadowable=False)
            return await self._deny(ex, verdict)
        ex.route, ex.params = match.value, dict(match.params)
        # 3-8. authenticate, attributes, anti-replay, invariants, rate limits, policy
        for stage in self.stages:
            verdict = await stage.check(ex)
            if verdict is None:
                continue
            if verdict.replay is not None:
                return await self._replay(ex, verdict.replay)
            if verdict.shadowable and not ex.route.enforce:
                ex.shadow.extend(verdict.reasons)
                if ex.principal is None:
                    ex.principal = _ANONYMOUS
                continue
            return await self._deny(ex, verdict)
        # 9-10. audit, then forward; the record names what shadow mode would have
        # denied and which dependency a fail-open route went on without
        return await self._allow(request, ex, (*ex.shadow, *ex.degraded))

    # ------------------------------------------------------------ stage 1

    async def _parse(self, request: web.BaseRequest, ex: Exchange) -> Verdict | None:
        limits = self.cfg.limits
        # non-ASCII header bytes, method/URL overrides, Content-Encoding (proxy.requestcheck)
        verdict = header_verdict(request.raw_headers)
        if verdict is not None:
            return verdict
        try:
            ex.target = split_target(request.raw_path)
        except MalformedTarget as exc:
            return Verdict("DENY", 400, (Reason.MALFORMED_PATH,), str(exc), shadowable=False)
        if ex.target.query and (verdict := override_param_verdict(ex.target.query, None, b"")):
            return verdict
        length = request.content_length
        too_large = Verdict("DENY", 413, (Reason.REQUEST_TOO_LARGE,),
                            f"request body exceeds {limits.max_body_bytes} bytes",
                            (("Connection", "close"),), shadowable=False)
        if length is not None and length > limits.max_body_bytes:
            return too_large
        if not request.body_exists:
            ex.body_sha256 = hashlib.sha256(b"").hexdigest()
            return None
        content = request.content
        expect = request.headers.get("Expect")
        if expect is not None and request.version >= (1, 1):
            # the client waits for an interim answer before it sends the body
            if expect.strip().lower() != "100-continue":
                return Verdict("DENY", 417, (Reason.EXPECTATION_FAILED,),
                               "only Expect: 100-continue is supported",
                               (("Connection", "close"),), shadowable=False)
            if not content.is_eof():
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0  # the real response has not started
        if content.is_eof():  # the whole body arrived with the headers: no read to time
            ex.body = content.read_nowait()
            if len(ex.body) > limits.max_body_bytes:
                return too_large
        else:
            chunks: list[bytes] = []
            total = 0
            try:
                async with asyncio.timeout(limits.body_read_timeout_s):
                    async for chunk in content.iter_chunked(65536):
                        total += len(chunk)
                        if total > limits.max_body_bytes:
                            return too_large
                        chunks.append(chunk)
            except TimeoutError:
                return Verdict("DENY", 408, (Reason.BODY_TIMEOUT,),
                               "request body read timed out", (("Connection", "close"),),
                               shadowable=False)
            ex.body = b"".join(chunks)
        ex.body_sha256 = hashlib.sha256(ex.body).hexdigest()
        return override_param_verdict("", request.headers.get("Content-Type"), ex.body)

    def _passthrough(self, path: str) -> bool:
        for prefix in self.cfg.passthrough:
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                return True
        return False

    # ------------------------------------------------------------ outcomes

    def _build(self, ex: Exchange, kind: str, decision: str, status: int,
               reasons: tuple[str, ...], extra: dict[str, Any]) -> dict[str, Any]:
        record = base_record(ex, kind, decision, status, reasons, self.policy_hash,
                             self.cfg.audit.redact, self.event_ids.next())
        record.update(extra)
        return record

    async def _record(self, ex: Exchange, kind: str, decision: str, status: int,
                      reasons: tuple[str, ...], **extra: Any) -> None:
        record = self._build(ex, kind, decision, status, reasons, extra)
        try:
            await self.audit.append(record)
        except AuditUnavailable:
            self.metrics.audit_errors.inc()
            raise
        self.metrics.audit_events.labels(kind).inc()

    async def _release(self, ex: Exchange) -> None:
        if ex.claim is not None:
            claim, ex.claim = ex.claim, None
            try:
                await self.state.release(claim)
            except Exception:
                errlog.warning("could not release idempotency claim (trace %s)", ex.trace_id)

    async def _deny(self, ex: Exchange, verdict: Verdict) -> Answer:
        """Answer with an envelope; the upstream is never contacted.

        No decision goes unrecorded: when the deny cannot be audited, the answer
        is 503 ``Audit_Unavailable`` instead, as on every other route.
        """
        await self._release(ex)
        if verdict.fail_closed_trigger is not None:
            self.metrics.fail_closed.labels(verdict.fail_closed_trigger).inc()
        extra: tuple[tuple[str, str], ...] = ()
        if verdict.status == 503:
            extra = (("Retry-After", "1"),)
        try:
            await self._record(ex, "decision", verdict.decision, verdict.status, verdict.reasons)
        except AuditUnavailable:
            errlog.error("deny not audited: audit store unavailable (trace %s)", ex.trace_id)
            return await self._audit_unavailable(ex)
        return (envelope_response(verdict, ex.tool, ex.request_id, ex.trace_id,
                                  self.policy_hash, extra),
                verdict.decision, verdict.status, verdict.reasons)

    async def _audit_unavailable(self, ex: Exchange) -> Answer:
        await self._release(ex)
        self.metrics.fail_closed.labels("audit").inc()
        verdict = Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.AUDIT_UNAVAILABLE),
                          "the audit store is unavailable; request refused", shadowable=False)
        # the record this request waited for may still be committed after the wait
        # gave up (it was already in a batch): the refusal is queued behind it, so
        # the chain never shows an ALLOW for a request that was not forwarded
        # without the DENY that ended it (written if and when the store recovers)
        self._record_later(ex, self._build(ex, "decision", verdict.decision, verdict.status,
                                           verdict.reasons, {}))
        return (envelope_response(verdict, ex.tool, ex.request_id, ex.trace_id,
                                  self.policy_hash, (("Retry-After", "1"),)),
                verdict.decision, verdict.status, verdict.reasons)

    async def _replay(self, ex: Exchange, outcome: StoredOutcome) -> Answer:
        """Return a stored upstream outcome again, after auditing the replay."""
        try:
            await self._record(ex, "replay", "ALLOW", outcome.status, ())
        except AuditUnavailable:
            return await self._audit_unavailable(ex)
        resp = web.Response(status=outcome.status,
                            body=outcome.body if outcome.body_complete else b"")
        for name, value in outcome.headers:
            resp.headers.add(name, value)
        resp.headers["Idempotent-Replayed"] = "true"
        resp.headers["X-Casf-Trace-Id"] = ex.trace_id
        if not outcome.body_complete:
            resp.headers["X-Casf-Replay-Body"] = "omitted"
        return resp, "ALLOW", outcome.status, ()

    async def _allow(self, request: web.BaseRequest, ex: Exchange, reasons: tuple[str, ...]
                     ) -> Answer:
        # 9. the decision record is committed before anything reaches the upstream
        try:
            await self._record(ex, "decision", "ALLOW", 200, reasons)
        except AuditUnavailable:
            return await self._audit_unavailable(ex)
        if ex.shadow:  # one count per request shadow mode would have denied
            self.metrics.shadow_denied.inc()
        # 10. forward
        response, decision, status, sent = await self._forward(request, ex)
        return response, decision, status, (*reasons, *sent)

    # ------------------------------------------------------------ stage 10

    async def _forward(self, request: web.BaseRequest, ex: Exchange) -> Answer:
        headers = upstream_request_headers(ex, self.consumed, self.cfg.upstream.forward_credentials,
                                           self.stripped)
        # the normalised target exactly as decided on, byte for byte: a string URL
        # would be re-quoted by the client (``%3B`` sent as ``;``, ``%7E`` as ``~``)
        url = URL(self.base_url + ex.target.path_and_query, encoded=True)
        started = time.perf_counter()
        # a free pool slot, within upstream.pool_timeout_ms: a wait that gives up
        # never reached the upstream (503, the claim is released), and is never
        # reported as a connect timeout
        try:
            async with asyncio.timeout(self.cfg.upstream.pool_timeout_s):
                await self.pool.acquire()
        except TimeoutError:
            await self._release(ex)
            verdict = Verdict("DENY", 503, (Reason.UPSTREAM_BUSY,),
                              "no upstream connection became free in time",
                              (("Retry-After", "1"),), shadowable=False)
            return await self._upstream_failed(ex, verdict, started)
        try:
            return await self._send(request, ex, url, headers, started)
        finally:
            self.pool.release()

    async def _send(self, request: web.BaseRequest, ex: Exchange, url: URL,
                    headers: CIMultiDict[str], started: float) -> Answer:
        ex.forwarded = True
        try:
            async with asyncio.timeout(self.cfg.upstream.timeout_s):
                upstream = await self.session.request(
                    ex.method, url, data=ex.body if ex.body else None, headers=headers,
                    allow_redirects=False)
        except aiohttp.ClientConnectorError:
            await self._release(ex)  # never reached the upstream: a retry is evaluated afresh
            return await self._upstream_failed(ex, _UNREACHABLE, started)
        except TimeoutError:
            # the upstream may have acted: the claim stays until its lease expires
            return await self._upstream_failed(ex, _TIMED_OUT, started)
        except aiohttp.ClientError:
            return await self._upstream_failed(ex, _CONNECTION_FAILED, started)
        self.metrics.upstream_duration.observe(time.perf_counter() - started)
        response = await self._stream_back(request, ex, upstream, started)
        return response, "ALLOW", upstream.status, ()

    async def _upstream_failed(self, ex: Exchange, verdict: Verdict, started: float) -> Answer:
        latency = round((time.perf_counter() - started) * 1000, 3)
        try:
            await self._record(ex, "outcome", "ALLOW", verdict.status, verdict.reasons,
                               latency_ms=latency, response_sha256=None)
        except AuditUnavailable:
            errlog.error("upstream failure not audited (trace %s)", ex.trace_id)
        return (envelope_response(verdict, ex.tool, ex.request_id, ex.trace_id,
                                  self.policy_hash),
                verdict.decision, verdict.status, verdict.reasons)

    async def _stream_back(self, request: web.BaseRequest, ex: Exchange,
                           upstream: aiohttp.ClientResponse, started: float
                           ) -> web.StreamResponse:
        out = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                 headers=downstream_headers(upstream.headers))
        if upstream.content_length is not None and "chunked" not in upstream.headers.get(
                "Transfer-Encoding", "").lower():
            out.content_length = upstream.content_length
        out.headers["X-Casf-Trace-Id"] = ex.trace_id
        if ex.budget_warnings:
            out.headers["X-Casf-Budget-Warning"] = ", ".join(ex.budget_warnings)
        digest = hashlib.sha256()
        keep = ex.claim is not None
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
        if ex.claim is not None:
            stored = StoredOutcome(upstream.status, replay_headers(upstream.headers),
                                   bytes(captured) if complete else b"", complete)
            try:
                await self.state.complete(ex.claim, stored, self.cfg.replay.ttl_s)
            except Exception:
                errlog.warning("could not store outcome for replay (trace %s)", ex.trace_id)
        latency = round((time.perf_counter() - started) * 1000, 3)
        # the response is complete and its decision record was committed before
        # the forward: the outcome record is committed in the background, so
        # the connection's next request does not wait for a second commit
        # (flush() waits for these at shutdown)
        extra: dict[str, Any] = {"latency_ms": latency, "response_sha256": digest.hexdigest(),
                                 "response_bytes": size}
        if abandoned:  # the digest and byte count cover what was read, not the whole
            extra["response_truncated"] = True
        if client_gone:
            extra["client_gone"] = True
        self._record_later(ex, self._build(ex, "outcome", "ALLOW", upstream.status, (), extra))
        return out

    def record_refusal(self, verdict: Verdict, trace_id: str) -> str:
        """Audit a request the HTTP parser refused (proxy.httpserver); returns its id.

        Nothing of it could be parsed, so the record has no method, route or
        principal; it is queued (the answer does not wait for the commit).
        """
        ex = Exchange(method="", target=Target("", ""), headers=_NO_HEADERS, peer="",
                      scheme="", host="", trace_id=trace_id, traceparent="",
                      mode=self.mode.current())
        ex.request_id = self.event_ids.next()
        self.metrics.count_request("-", verdict.decision, verdict.status)
        self._record_later(ex, self._build(ex, "decision", verdict.decision, verdict.status,
                                           verdict.reasons, {}))
        return ex.request_id

    def _record_later(self, ex: Exchange, record: dict[str, Any]) -> None:
        """Queue a record nobody waits for; its commit or failure is counted and logged."""
        kind = str(record["kind"])
        try:
            pending = self.audit.append_later(record)
        except AuditUnavailable:
            self._background_failed(kind, ex.trace_id)
            return
        self._pending.add(pending)
        pending.add_done_callback(lambda f: self._background_done(f, kind, ex.trace_id))

    def _background_done(self, fut: asyncio.Future[Any], kind: str, trace_id: str) -> None:
        self._pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            self._background_failed(kind, trace_id)
        else:
            self.metrics.audit_events.labels(kind).inc()

    def _background_failed(self, kind: str, trace_id: str) -> None:
        self.metrics.audit_errors.inc()
        errlog.error("%s record not audited (trace %s)", kind, trace_id)


def _peer(request: web.BaseRequest) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"
