"""Reading a ``tools/call`` answer while it streams through (pure, incremental).

The front door forwards every chunk of the upstream's answer as it arrives
and also feeds it to a :class:`CallTap`; at the end :meth:`CallTap.finish`
says what the outcome record needs: the digest of the JSON-RPC result (or
error) and whether the call failed. The tap never holds more than
``max_bytes`` of the answer: past that (one huge JSON body or SSE event) it
stops reading, and the outcome falls back to the digest of the raw bytes
with the error flag unknown. Forwarding is never held back by the tap.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.mcp.protocol import JsonRpcId, call_outcome, is_response
from proxy.mcp.sse import SseParser, SseTooLarge

DEFAULT_MAX_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TapOutcome:
    """What the outcome record of a tool call carries about the answer."""

    response_sha256: str  # of the canonical result/error; of the raw bytes when unread
    is_error: bool | None  # None: no JSON-RPC response could be read
    response_bytes: int  # bytes of the answer as forwarded
    read: bool  # whether the digest is over the JSON-RPC response (else the raw bytes)


class CallTap:
    """Feed it the answer's chunks; :meth:`finish` gives the :class:`TapOutcome`.

    ``msg_id`` is the call's JSON-RPC id: in a stream, the response event with
    that id is the answer (notifications and other events are skipped).
    """

    def __init__(self, content_type: str | None, msg_id: JsonRpcId,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._sse = content_type is not None and "text/event-stream" in content_type.lower()
        self._id = msg_id
        self._max = max_bytes
        self._raw = hashlib.sha256()
        self._size = 0
        self._body = bytearray()
        self._parser = SseParser(max_event_bytes=max_bytes) if self._sse else None
        self._response: dict[str, Any] | None = None
        self._gave_up = False

    def feed(self, chunk: bytes) -> None:
        self._raw.update(chunk)
        self._size += len(chunk)
        if self._gave_up or self._response is not None:
            return
        if self._parser is None:
            if len(self._body) + len(chunk) > self._max:
                self._gave_up = True
                self._body.clear()
            else:
                self._body += chunk
            return
        try:
            events = self._parser.feed(chunk)
        except SseTooLarge:
            self._gave_up = True
            return
        self._take(events)

    def _take(self, events: list[Any]) -> None:
        for event in events:
            doc = event.json()
            if is_response(doc) and doc.get("id") == self._id:
                self._response = doc
                self._parser = None  # the answer is in; the rest is only counted
                return

    def finish(self) -> TapOutcome:
        if self._response is None and not self._gave_up:
            if self._parser is not None:
                self._take(self._parser.close_events())
            elif self._body:
                try:
                    doc = orjson.loads(bytes(self._body))
                except orjson.JSONDecodeError:
                    doc = None
                if is_response(doc):
                    self._response = doc
        if self._response is not None:
            got = call_outcome(self._response)
            return TapOutcome(got.response_sha256, got.is_error, self._size, True)
        return TapOutcome(self._raw.hexdigest(), None, self._size, False)
