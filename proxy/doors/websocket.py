"""WebSocket routes: decided at the upgrade, then relayed both ways.

A route with ``websocket: true`` accepts exactly one kind of request: a
WebSocket handshake (RFC 6455: ``GET``, HTTP/1.1, ``Upgrade: websocket``,
``Connection: upgrade``, ``Sec-WebSocket-Version: 13``, a 16-byte
``Sec-WebSocket-Key``). The handshake goes through the whole pipeline like any
request (authentication, attributes, anti-replay, mode, rate limits, policy,
the decision record committed); only an ALLOW opens the upstream WebSocket,
and only once the upstream accepted does the client get its ``101``. Every
other answer is the ordinary JSON envelope, before any upgrade.

* :func:`upgrade_verdict` is the door's parse check: an ``Upgrade`` header on
  any other route is 400 ``BadRequest_UpgradeNotAllowed`` (never stripped and
  forwarded as a plain request); a plain request on a WebSocket route is 426
  ``BadRequest_UpgradeRequired``; an Upgrade that is not a valid WebSocket
  handshake is 400 ``BadRequest_UpgradeNotAllowed``.
* :class:`WebSocketRelay` opens the upstream side (the inline door's client
  session and pool gate, the target exactly as decided, the request headers
  rewritten as for a forward, the offered subprotocols passed through and the
  upstream's choice answered to the client) and relays text and binary
  messages until one side closes, a message exceeds
  ``limits.websocket_max_message_bytes`` (closed with 1009), no message passes
  for ``limits.websocket_idle_timeout_ms``, or the session reaches
  ``limits.websocket_max_duration_ms`` (both closed with 1001).
* The close is the outcome record: ``kind: outcome``, ``ref`` to the
  decision, ``status`` 101, the duration, bytes and messages each way, the
  close code, who closed and why.

Pings are answered on each hop (never relayed); permessage-deflate is not
negotiated on either side, so a message's size is its size on the wire and
nothing is inflated.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.claims import ClaimHandle
from proxy.config import Config, RouteConfig
from proxy.forward import UpstreamClient, upstream_request_headers
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.reasons import Reason
from proxy.tasks import spawn
from proxy.trail import AuditTrail

errlog = logging.getLogger("casf.pipeline")

# a close handshake (ours or the peer's) waits at most this long for the answer
CLOSE_TIMEOUT_S = 5.0

UPGRADE_NOT_ALLOWED = Verdict("DENY", 400, (Reason.UPGRADE_NOT_ALLOWED,),
                              "this route does not accept a protocol upgrade",
                              (("Connection", "close"),), shadowable=False)
NOT_A_HANDSHAKE = Verdict("DENY", 400, (Reason.UPGRADE_NOT_ALLOWED,),
                          "not a WebSocket handshake: GET over HTTP/1.1 with Upgrade: websocket, "
                          "Connection: upgrade, Sec-WebSocket-Version: 13 and a "
                          "Sec-WebSocket-Key", (("Connection", "close"),), shadowable=False)
UPGRADE_REQUIRED = Verdict("DENY", 426, (Reason.UPGRADE_REQUIRED,),
                           "this route accepts only a WebSocket upgrade",
                           (("Upgrade", "websocket"),), shadowable=False)
_UNREACHABLE = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,), "the upstream is unreachable",
                       shadowable=False)
_CONNECTION_FAILED = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,),
                             "the upstream connection failed", shadowable=False)
_TIMED_OUT = Verdict("DENY", 504, (Reason.UPSTREAM_TIMEOUT,),
                     "the upstream did not accept the WebSocket in time", shadowable=False)
_BUSY = Verdict("DENY", 503, (Reason.UPSTREAM_BUSY,), "no upstream connection became free in time",
                (("Retry-After", "1"),), shadowable=False)

# close codes a close frame may carry (RFC 6455 §7.4): the others only describe
_SENDABLE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                       1014})

Answer = tuple[web.StreamResponse, str, int, tuple[str, ...]]


def _tokens(headers: CIMultiDictProxy[str], name: str) -> set[str]:
    return {t.strip().lower() for v in headers.getall(name, []) for t in v.split(",")
            if t.strip()}


def is_websocket_handshake(method: str, version: tuple[int, int],
                           headers: CIMultiDictProxy[str]) -> bool:
    """Whether the request is a WebSocket opening handshake aiohttp will accept."""
    if method != "GET" or version < (1, 1):
        return False
    if "websocket" not in _tokens(headers, "Upgrade"):
        return False
    if "upgrade" not in _tokens(headers, "Connection"):
        return False
    if headers.getall("Sec-WebSocket-Version", []) != ["13"]:
        return False
    keys = headers.getall("Sec-WebSocket-Key", [])
    if len(keys) != 1:
        return False
    try:
        return len(base64.b64decode(keys[0], validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def upgrade_verdict(route: RouteConfig | None, method: str, version: tuple[int, int],
                    headers: CIMultiDictProxy[str]) -> Verdict | None:
    """The door's check of a routed (or passthrough) request; ``None``: go on."""
    upgrade = "Upgrade" in headers
    if route is None or not route.websocket:
        return UPGRADE_NOT_ALLOWED if upgrade else None
    if not upgrade:
        return UPGRADE_REQUIRED
    return None if is_websocket_handshake(method, version, headers) else NOT_A_HANDSHAKE


def offered_protocols(headers: CIMultiDictProxy[str]) -> tuple[str, ...]:
    """The client's subprotocols, in its order of preference."""
    return tuple(t.strip() for v in headers.getall("Sec-WebSocket-Protocol", [])
                 for t in v.split(",") if t.strip())


def _sendable(code: int | None, fallback: int) -> int:
    if code is not None and (code in _SENDABLE or 3000 <= code <= 4999):
        return code
    return fallback


@dataclass(slots=True)
class _Direction:
    messages: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _End:
    """Why the session ended: who closed it, with which code, and why."""

    closed_by: str  # client | upstream | proxy
    code: int
    reason: str  # closed | message_too_big | protocol_error | connection_lost | ...
    message: bytes = b""  # the close frame's reason text, passed on


@dataclass(slots=True)
class _Session:
    client: _Direction = field(default_factory=_Direction)  # client → upstream
    upstream: _Direction = field(default_factory=_Direction)  # upstream → client
    last: float = field(default_factory=time.monotonic)
    trace_id: str = ""


class WebSocketRelay:
    """Opens and relays WebSocket sessions for the inline door of one generation."""

    def __init__(self, cfg: Config, trail: AuditTrail, metrics: Metrics,
                 upstream: UpstreamClient, consumed: tuple[str, ...],
                 stripped: tuple[str, ...], envelope: Callable[[Exchange, Verdict], Answer]
                 ) -> None:
        self.cfg = cfg
        self.envelope = envelope  # the door's envelope for a verdict (before any upgrade)
        self.trail = trail
        self.metrics = metrics
        self.session = upstream.session
        self.pool = upstream.gate
        self.consumed = consumed
        self.stripped = stripped
        self._stopping = asyncio.Event()

    def shutdown(self) -> None:
        """Close every open session with 1001 now (and any opened from now on).

        Called when the traffic listener stops accepting: a session would
        otherwise hold the drain to its end and then be cut off without a close.
        """
        self._stopping.set()

    def _headers(self, ex: Exchange) -> CIMultiDict[str]:
        """The forward's header rewriting; the handshake's own headers are the client's.

        ``Sec-WebSocket-*`` belong to each hop (its key, version and extensions);
        the subprotocols are passed on through ``ws_connect``.
        """
        out = upstream_request_headers(ex, self.consumed,
                                       self.cfg.upstream.forward_credentials, self.stripped)
        for name in list(out):
            if name.lower().startswith("sec-websocket-"):
                out.popall(name, None)
        return out

    async def relay(self, request: web.BaseRequest, ex: Exchange,
                    claim: ClaimHandle | None) -> Answer:
        started = time.perf_counter()
        url = URL(self.cfg.upstream.url + ex.target.path_and_query, encoded=True)
        try:
            async with asyncio.timeout(self.cfg.upstream.pool_timeout_s):
                await self.pool.acquire()
        except TimeoutError:
            if claim is not None:
                await claim.release()
            return self._failed(ex, _BUSY, started)
        try:  # the pool slot is the session's for as long as it lasts
            return await self._open(request, ex, url, claim, started)
        finally:
            self.pool.release()

    async def _open(self, request: web.BaseRequest, ex: Exchange, url: URL,
                    claim: ClaimHandle | None, started: float) -> Answer:
        # aiohttp refuses a message of max_msg_size bytes: the limit is inclusive here
        limit = self.cfg.limits.websocket_max_message_bytes + 1
        ex.forwarded = True
        try:
            async with asyncio.timeout(self.cfg.upstream.timeout_s):
                upstream = await self.session.ws_connect(
                    url, protocols=offered_protocols(ex.headers), headers=self._headers(ex),
                    autoclose=True, autoping=True, compress=0, max_msg_size=limit,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=CLOSE_TIMEOUT_S))
        except aiohttp.WSServerHandshakeError as exc:
            # the upstream answered, but opened no session: nothing was delivered
            if claim is not None:
                await claim.release()
            refused = Verdict("DENY", 502, (Reason.UPSTREAM_UNAVAILABLE,),
                              f"the upstream refused the WebSocket upgrade (HTTP {exc.status})",
                              shadowable=False)
            return self._failed(ex, refused, started, upstream_status=exc.status)
        except aiohttp.ClientConnectorError:
            if claim is not None:
                await claim.release()
            return self._failed(ex, _UNREACHABLE, started)
        except TimeoutError:
            if claim is not None:
                claim.abandon()
            return self._failed(ex, _TIMED_OUT, started)
        except aiohttp.ClientError:
            if claim is not None:
                claim.abandon()
            return self._failed(ex, _CONNECTION_FAILED, started)
        # a session was opened: it cannot be replayed, and a retry with the same
        # request id must not open a second one under this decision
        if claim is not None:
            claim.abandon()
        self.metrics.upstream_duration.observe(time.perf_counter() - started)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        down = web.WebSocketResponse(
            protocols=(upstream.protocol,) if upstream.protocol else (), autoclose=True,
            autoping=True, compress=False, max_msg_size=limit, timeout=CLOSE_TIMEOUT_S)
        down.headers["X-Casf-Trace-Id"] = ex.trace_id
        session = _Session(trace_id=ex.trace_id)
        opened = time.monotonic()
        try:
            await down.prepare(request)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            await self._close(upstream, WSCloseCode.GOING_AWAY, b"client gone")
            self._record(ex, latency_ms, opened, session,
                         _End("client", WSCloseCode.ABNORMAL_CLOSURE, "connection_lost"))
            return down, "ALLOW", 101, ()
        end = _End("proxy", WSCloseCode.GOING_AWAY, "shutdown")
        try:
            end = await self._pump_both(down, upstream, session, opened)
        finally:  # a shutdown that cancels the session still closes both sides and records it
            await self._close(down, *_passed_on(end, "client"))
            await self._close(upstream, *_passed_on(end, "upstream"))
            self._record(ex, latency_ms, opened, session, end)
        return down, "ALLOW", 101, ()

    async def _pump_both(self, down: web.WebSocketResponse,
                         upstream: aiohttp.ClientWebSocketResponse, session: _Session,
                         opened: float) -> _End:
        limits = self.cfg.limits
        to_upstream = spawn(_pump(down, upstream, session.client, session, "client"),
                            name="casf-websocket-to-upstream")
        to_client = spawn(_pump(upstream, down, session.upstream, session, "upstream"),
                          name="casf-websocket-to-client")
        stopping = spawn(self._stopping.wait(), name="casf-websocket-shutdown")
        pumps = {to_upstream, to_client}
        try:
            while True:
                if self._stopping.is_set():
                    return _End("proxy", WSCloseCode.GOING_AWAY, "shutdown")
                now = time.monotonic()
                idle_at = session.last + limits.websocket_idle_timeout_s
                over_at = opened + limits.websocket_max_duration_s
                if now >= over_at:
                    return _End("proxy", WSCloseCode.GOING_AWAY, "max_duration")
                if now >= idle_at:
                    return _End("proxy", WSCloseCode.GOING_AWAY, "idle_timeout")
                done, _ = await asyncio.wait({*pumps, stopping},
                                             timeout=min(idle_at, over_at) - now,
                                             return_when=asyncio.FIRST_COMPLETED)
                ended = done & pumps
                if ended:
                    try:
                        end: _End = ended.pop().result()
                    except Exception:  # never an HTTP answer after the 101: close it
                        errlog.exception("WebSocket relay failed (trace %s)", session.trace_id)
                        return _End("proxy", WSCloseCode.INTERNAL_ERROR, "internal_error")
                    return end
        finally:
            stopping.cancel()
            for pump in pumps:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pump

    async def _close(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                     code: int, message: bytes) -> None:
        if ws.closed:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                await ws.close(code=code, message=message)
        except (TimeoutError, ConnectionError, aiohttp.ClientError, RuntimeError):
            pass  # the peer is gone: nothing to close

    # ------------------------------------------------------------ records

    def _outcome(self, ex: Exchange, status: int, reasons: tuple[str, ...],
                 fields: dict[str, Any]) -> dict[str, Any]:
        record = self.trail.build(ex, "outcome", "ALLOW", status, reasons,
                                  {"ref": ex.decision_ref or None, **fields})
        for name in ("attrs", "body_sha256", "shadow", "key_id", "mode"):
            record.pop(name, None)  # all in the decision record it refers to
        return record

    def _record(self, ex: Exchange, latency_ms: float, opened: float, session: _Session,
                end: _End) -> None:
        self.trail.record_later(ex, self._outcome(ex, 101, (), {
            "latency_ms": latency_ms, "websocket": True,
            "duration_ms": round((time.monotonic() - opened) * 1000, 3),
            "client_messages": session.client.messages, "client_bytes": session.client.bytes,
            "upstream_messages": session.upstream.messages,
            "upstream_bytes": session.upstream.bytes,
            "close_code": end.code, "closed_by": end.closed_by, "close_reason": end.reason}))

    def _failed(self, ex: Exchange, verdict: Verdict, started: float,
                **fields: Any) -> Answer:
        latency = round((time.perf_counter() - started) * 1000, 3)
        self.trail.record_later(ex, self._outcome(ex, verdict.status, verdict.reasons, {
            "latency_ms": latency, "websocket": True, **fields}))
        return self.envelope(ex, verdict)


def _passed_on(end: _End, to: str) -> tuple[int, bytes]:
    """The close code (and reason text) the proxy sends ``to`` a side still open.

    A peer's close is passed on as it was (a close without a code as 1000); a
    connection that broke off is 1014 (bad gateway) towards the client and 1001
    (going away) towards the upstream; whatever the proxy ended (an oversized
    message, whose sender already got 1009; idle or overall time; shutdown) is 1001.
    """
    if end.reason == "closed":
        return _sendable(end.code, WSCloseCode.OK), end.message
    if end.reason == "connection_lost" and to == "client":
        return WSCloseCode.BAD_GATEWAY, b""
    return WSCloseCode.GOING_AWAY, b""


async def _pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                count: _Direction, session: _Session, side: str) -> _End:
    """Relay ``src``'s messages to ``dst`` until ``src`` ends; says how it ended."""
    while True:
        msg = await src.receive()
        if msg.type is WSMsgType.TEXT:
            data: str = msg.data
            size = len(data.encode())
            send = dst.send_str(data)
        elif msg.type is WSMsgType.BINARY:
            size = len(msg.data)
            send = dst.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:  # a close frame (answered already)
            code = int(msg.data) if msg.data else 1005
            reason = (msg.extra or "").encode()[:123]
            return _End(side, code, "closed", reason)
        elif msg.type is WSMsgType.ERROR:
            exc = msg.data
            if isinstance(exc, aiohttp.WebSocketError):  # src was closed with its code
                code = exc.code
                why = (f"{side}_message_too_big" if code == WSCloseCode.MESSAGE_TOO_BIG
                       else f"{side}_protocol_error")
                return _End("proxy", code, why)
            return _End(side, WSCloseCode.ABNORMAL_CLOSURE, "connection_lost")
        else:  # CLOSED / CLOSING without a close frame: the connection went away
            return _End(side, WSCloseCode.ABNORMAL_CLOSURE, "connection_lost")
        try:
            await send
        except (ConnectionError, aiohttp.ClientError, RuntimeError):
            other = "upstream" if side == "client" else "client"
            return _End(other, WSCloseCode.ABNORMAL_CLOSURE, "connection_lost")
        count.messages += 1
        count.bytes += size
        session.last = time.monotonic()
