"""The traffic listener's HTTP server: aiohttp's, with the JSON envelope on parse errors.

Requests the HTTP parser cannot frame (request smuggling attempts such as
``Content-Length`` with ``Transfer-Encoding`` or two ``Content-Length``
headers, obs-fold, bare LF, invalid methods or header tokens, oversized or too
many header lines) never become a request: nothing is decided, forwarded or
audited. aiohttp's own answer to them is a text/plain body that quotes the
offending bytes (a credential in a malformed header line would be echoed) and
an ERROR log line with the same bytes. Here they get the JSON error
envelope instead (400 ``BadRequest_MalformedRequest``, or 431
``Request_HeadersTooLarge``), the connection is closed, the log line names
the exception type only, and a ``DENY`` decision record is queued for the
audit trail (``on_refusal``: no method, route or principal, since none could
be parsed; the envelope's request id names it).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from proxy.envelope import envelope_response
from proxy.model import Verdict
from proxy.reasons import Reason

log = logging.getLogger("casf.http")


def parse_error_verdict(exc: BaseException | None) -> Verdict:
    too_large = isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc))
    if too_large:
        return Verdict("DENY", 431, (Reason.HEADERS_TOO_LARGE,),
                       "the request line or headers are too large", shadowable=False)
    return Verdict("DENY", 400, (Reason.MALFORMED_REQUEST,),
                   "the request is not well-formed HTTP/1.1", shadowable=False)


class _Handler(RequestHandler):
    def __init__(self, manager: web.Server, *, policy_hash: Callable[[], str],
                 head_timeout: Callable[[], float],
                 on_refusal: Callable[[Verdict, str], str], **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.policy_hash = policy_hash
        self._head_timeout = head_timeout
        self._on_refusal = on_refusal
        self._head_timer: asyncio.TimerHandle | None = None

    # A request head (request line and headers) must arrive within
    # limits.header_timeout_ms of its first byte. aiohttp has no such timeout:
    # a client sending header bytes slowly (slowloris) would hold the
    # connection, and its slot, for as long as it likes.

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        idle = self._current_request is None and not self._messages
        super().data_received(data)
        if self._request_count != before:  # a head completed: the request is underway
            self._disarm()
        elif idle and data and self._head_timer is None and not self._force_close:
            self._head_timer = self._loop.call_later(self._head_timeout(), self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        peer = self.transport.get_extra_info("peername") if self.transport else None
        log.warning("request head from %s not complete within %.0f ms: connection closed",
                    peer[0] if isinstance(peer, tuple) and peer else "unknown",
                    self._head_timeout() * 1000)
        self.force_close()
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError) or status >= 500:
            return super().handle_error(request, status, exc, message)
        log.warning("malformed HTTP request from %s refused (%s)", request.remote,
                    type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        verdict = parse_error_verdict(exc)
        try:
            policy_hash = self.policy_hash()
        except Exception:
            policy_hash = ""
        trace_id = secrets.token_hex(16)
        try:
            request_id = self._on_refusal(verdict, trace_id)  # queues the DENY record
        except Exception:
            log.exception("parser refusal not audited")
            request_id = ""
        resp = envelope_response(verdict, None, request_id, trace_id, policy_hash)
        resp.force_close()
        return resp


class TrafficServer(web.Server):
    """``web.Server`` whose connections answer parse errors with the envelope and
    close when a request head does not arrive in time."""

    def __init__(self, handler: Any, *, policy_hash: Callable[[], str],
                 head_timeout: Callable[[], float], on_refusal: Callable[[Verdict, str], str],
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._policy_hash = policy_hash
        self._head_timeout = head_timeout
        self._on_refusal = on_refusal

    def __call__(self) -> RequestHandler:
        return _Handler(self, policy_hash=self._policy_hash, head_timeout=self._head_timeout,
                        on_refusal=self._on_refusal, loop=self._loop, **self._kwargs)
