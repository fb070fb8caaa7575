"""What the HTTP front doors share: reading a request, calling the upstream.

:func:`read_body` reads and bounds a request body; :func:`peer_of` names the
client. :func:`upstream_call` sends a decided request to the upstream through
the shared session and its pool gate, and settles the idempotency claim when
the request fails: released when nothing reached the upstream (no pool slot
in time, a connect error), abandoned when it may have (a timeout, a broken
connection). :func:`outcome_record` is the compact outcome record of a
forwarded request. The inline proxy and the MCP door use them alike.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.claims import ClaimHandle
from proxy.config import UpstreamConfig
from proxy.forward import UpstreamClient
from proxy.model import Exchange, Verdict
from proxy.reasons import Reason
from proxy.trail import AuditTrail

errlog = logging.getLogger("casf.pipeline")

# what a request ends with: the response, and the decision, status and reason
# codes for the access log and the request metrics
Answer = tuple[web.StreamResponse, str, int, tuple[str, ...]]

UNREACHABLE = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,), "the upstream is unreachable",
                       shadowable=False)
CONNECTION_FAILED = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,),
                             "the upstream connection failed", shadowable=False)
TIMED_OUT = Verdict("DENY", 504, (Reason.UPSTREAM_TIMEOUT,),
                     "the upstream did not answer in time", shadowable=False)
BUSY = Verdict("DENY", 503, (Reason.UPSTREAM_BUSY,), "no upstream connection became free in time",
                (("Retry-After", "1"),), shadowable=False)



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


@asynccontextmanager
async def upstream_call(upstream: UpstreamClient, cfg: UpstreamConfig, ex: Exchange, url: URL,
                        headers: CIMultiDict[str], claim: ClaimHandle | None
                        ) -> AsyncIterator[aiohttp.ClientResponse | Verdict]:
    """The upstream's response to ``ex`` (its body unread), or the verdict of a failure.

    A free pool slot is awaited within ``upstream.pool_timeout_ms`` and held
    until the block ends (the caller streams the body inside it): a wait that
    gives up never reached the upstream (503 ``Upstream_Busy``) and is never
    reported as a connect timeout.
    """
    if upstream.gate.locked():  # a free slot is taken at once: no timer for that
        try:
            async with asyncio.timeout(cfg.pool_timeout_s):
                await upstream.gate.acquire()
        except TimeoutError:
            if claim is not None:
                await claim.release()
            yield BUSY
            return
    else:
        await upstream.gate.acquire()
    try:
        ex.forwarded = True
        got: aiohttp.ClientResponse | Verdict
        try:
            with ex.span.stage("upstream") as span:
                traceparent = span.traceparent()
                if traceparent is not None:  # the upstream's parent is the upstream span
                    headers["traceparent"] = traceparent
                async with asyncio.timeout(cfg.timeout_s):
                    got = await upstream.session.request(
                        ex.method, url, data=ex.body if ex.body else None, headers=headers,
                        allow_redirects=False)
        except aiohttp.ClientConnectorError:
            if claim is not None:  # never reached the upstream: a retry is evaluated afresh
                await claim.release()
            got = UNREACHABLE
        except TimeoutError:
            if claim is not None:  # the upstream may have acted
                claim.abandon()
            got = TIMED_OUT
        except aiohttp.ClientError:
            if claim is not None:
                claim.abandon()
            got = CONNECTION_FAILED
        yield got
    finally:
        upstream.gate.release()


def shown_verdict(ex: Exchange, verdict: Verdict
                  ) -> tuple[Verdict, tuple[tuple[str, str], ...]]:
    """The verdict as the caller is shown it (with the exchange's extra reasons) and
    the headers the answer adds (every 503 says when to retry)."""
    extra: tuple[tuple[str, str], ...] = ()
    if verdict.status == 503 and not any(k == "Retry-After" for k, _ in verdict.headers):
        extra = (("Retry-After", "1"),)
    if not ex.extra_reasons:
        return verdict, extra
    return dataclasses.replace(verdict, reasons=(*verdict.reasons, *ex.extra_reasons)), extra


class RelayBroken(Exception):
    """Raised by a :class:`Rewriter` that cannot go on: the relay stops as if the
    upstream broke off."""


class Rewriter(Protocol):
    """Changes a response on its way through (the MCP door's ``tools/list`` filter)."""

    async def feed(self, chunk: bytes) -> bytes: ...

    async def close(self) -> bytes: ...


@dataclass(slots=True)
class Relayed:
    """How a relay ended: the bytes kept for replay, and what the records say."""

    captured: bytes
    complete: bool  # ``captured`` is the whole answer (within the cap, nothing lost)
    size: int  # bytes read from the upstream
    client_gone: bool
    abandoned: bool  # stopped reading before the upstream's end


async def relay(request: web.BaseRequest, out: web.StreamResponse,
                upstream: aiohttp.ClientResponse, ex: Exchange, *, keep: bool, limit: int,
                feed: Callable[[bytes], None], rewrite: Rewriter | None = None) -> Relayed:
    """Stream the upstream's answer to the client chunk by chunk, never buffered.

    Every chunk read is given to ``feed`` (a digest, a tap); with ``keep`` the
    answer is also captured for replay, up to ``limit`` bytes. When the client
    goes away, reading goes on only while the capture still wants it (bounded
    by its cap), then the connection is let go; an unread connection is never
    handed to the next request.
    """
    captured = bytearray()
    complete = True
    size = 0
    client_gone = False
    abandoned = False
    try:
        await out.prepare(request)
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            feed(chunk)
            if keep and complete:
                if len(captured) + len(chunk) <= limit:
                    captured += chunk
                else:
                    complete = False
            if client_gone:
                if not (keep and complete):
                    abandoned = True
                    break
                continue
            data = await rewrite.feed(chunk) if rewrite is not None else chunk
            try:
                if data:
                    await out.write(data)
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                client_gone = True
                if not (keep and complete):
                    abandoned = True
                    break
        if not client_gone:
            if rewrite is not None:
                await out.write(await rewrite.close())
            await out.write_eof()
    except (aiohttp.ClientError, TimeoutError, RelayBroken):
        complete = False
        abandoned = True
        errlog.warning("upstream response broke off (trace %s)", ex.trace_id)
    finally:
        if abandoned:
            complete = False
            upstream.close()  # an unread connection is never handed to the next request
        else:
            upstream.release()
    return Relayed(bytes(captured) if complete else b"", complete, size, client_gone,
                   abandoned)


def outcome_record(trail: AuditTrail, ex: Exchange, status: int, latency_ms: float,
                   digest: str | None, size: int, reasons: tuple[str, ...] = (),
                   **extra: Any) -> dict[str, Any]:
    """A compact outcome record: what happened, and the decision it refers to."""
    record = trail.build(ex, "outcome", "ALLOW", status, reasons, {
        "ref": ex.decision_ref or None, "latency_ms": latency_ms,
        "response_sha256": digest, "response_bytes": size, **extra})
    for name in ("attrs", "body_sha256", "shadow", "key_id", "mode"):
        record.pop(name, None)  # all in the decision record it refers to
    return record
