"""The traffic listener's HTTP server: aiohttp's, with the contract's envelope on parse errors.

Requests the HTTP parser cannot frame (request smuggling attempts such as
``Content-Length`` with ``Transfer-Encoding`` or two ``Content-Length``
headers, obs-fold, bare LF, invalid methods or header tokens, oversized or too
many header lines) never become a request: nothing is decided, forwarded or
audited. aiohttp's own answer to them is a text/plain body that quotes the
offending bytes (a credential in a malformed header line would be echoed) and
an ERROR log line with the same bytes. Here they get the JSON envelope of
contract §5 instead (400 ``BadRequest_MalformedRequest``, or 431
``Request_HeadersTooLarge``), the connection is closed, and the log line names
the exception type only.
"""

from __future__ import annotations

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
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.policy_hash = policy_hash

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
        resp = envelope_response(verdict, None, "", secrets.token_hex(16), policy_hash)
        resp.force_close()
        return resp


class TrafficServer(web.Server):
    """``web.Server`` whose connections answer parse errors with the envelope."""

    def __init__(self, handler: Any, *, policy_hash: Callable[[], str], **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._policy_hash = policy_hash

    def __call__(self) -> RequestHandler:
        return _Handler(self, policy_hash=self._policy_hash, loop=self._loop, **self._kwargs)
