"""``text/event-stream`` read and written incrementally (pure).

:class:`SseParser` is fed the response body chunk by chunk, as it arrives,
and returns each event as soon as its terminating blank line is in: a
stream is passed on event by event and never held whole. Lines end in
``\\r\\n``, ``\\n`` or ``\\r`` (a ``\\r`` at the end of a chunk waits for the
next one), an event may span any number of chunks, ``data`` lines join with
``\\n``, comment lines (``:`` keep-alives) are kept, and a leading BOM is
skipped, all as the HTML standard's event-stream parser reads them.

Every :class:`SseEvent` keeps its ``raw`` bytes, so an event the proxy does
not change is passed on byte for byte; comment-only blocks are events too
(``data`` None) for the same reason. :func:`serialize` writes an event the
proxy did change (a filtered ``tools/list``, a replay's id).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import orjson

_BOM = b"\xef\xbb\xbf"
_LINE_END = re.compile(rb"\r\n|\r|\n")
_SPLIT = re.compile(r"\r\n|\r|\n")
DEFAULT_MAX_EVENT_BYTES = 4 * 1024 * 1024


class SseTooLarge(ValueError):
    """One event grew past the parser's bound before it ended."""


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One block of the stream, as dispatched by an event-stream reader.

    ``data`` is None when the block had no ``data`` line (a comment-only
    keep-alive, or a block a reader would not dispatch).
    """

    raw: bytes
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: tuple[str, ...] = ()

    def json(self) -> Any:
        """``data`` parsed as JSON, or None when absent or not JSON."""
        if self.data is None:
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            return None

    def with_data(self, data: str) -> SseEvent:
        """The same event with other data (re-serialised; comments are dropped)."""
        raw = serialize(data, event=self.event, id=self.id, retry=self.retry)
        return replace(self, raw=raw, data=data, comments=())


def serialize(data: str, *, event: str | None = None, id: str | None = None,
              retry: int | None = None) -> bytes:
    """One event in wire form; multi-line data becomes several ``data`` lines."""
    out: list[str] = []
    if event is not None:
        out.append(f"event: {_one_line(event)}")
    if id is not None:
        out.append(f"id: {_one_line(id)}")
    if retry is not None:
        out.append(f"retry: {int(retry)}")
    out.extend(f"data: {line}" for line in _SPLIT.split(data))
    return ("\n".join(out) + "\n\n").encode()


def _one_line(value: str) -> str:
    if _SPLIT.search(value) or "\x00" in value:
        raise ValueError("an SSE field value cannot hold a line break or NUL")
    return value


class SseParser:
    """Incremental event-stream parser: :meth:`feed` chunks, get complete events."""

    def __init__(self, max_event_bytes: int | None = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buf = bytearray()  # bytes of the current (incomplete) block
        self._scan = 0  # where the next unread line starts in _buf
        self._started = False  # BOM handled
        self._data: list[str] = []
        self._has_data = False
        self._event: str | None = None
        self._id: str | None = None
        self._retry: int | None = None
        self._comments: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """Add ``chunk``; return the events it completed (possibly none)."""
        self._buf += chunk
        if not self._started:
            if len(self._buf) < len(_BOM) and _BOM.startswith(bytes(self._buf)):
                return []
            self._started = True
            if self._buf.startswith(_BOM):
                self._scan = len(_BOM)
        events = self._drain(final=False)
        if self._max is not None and len(self._buf) > self._max:
            raise SseTooLarge(f"an SSE event is larger than {self._max} bytes")
        return events

    def close_events(self) -> list[SseEvent]:
        """At the end of the stream: the events a last lone ``\\r`` completes.

        An event whose blank line never came is not dispatched (readers drop it);
        its bytes stay in :meth:`tail`.
        """
        if not self._started:
            self._started = True
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[SseEvent]:
        events: list[SseEvent] = []
        while True:
            m = _LINE_END.search(self._buf, self._scan)
            if m is None:
                break
            if not final and m.group() == b"\r" and m.end() == len(self._buf):
                break  # a \r at the end: wait, the next byte may be its \n
            line = bytes(self._buf[self._scan:m.start()])
            self._scan = m.end()
            if line:
                self._line(line.decode("utf-8", errors="replace"))
                continue
            raw = bytes(self._buf[:self._scan])
            del self._buf[:self._scan]
            self._scan = 0
            events.append(self._dispatch(raw))
        return events

    def tail(self) -> bytes:
        """The bytes of an event still open (forwarded as they are at the end)."""
        return bytes(self._buf)

    def _line(self, line: str) -> None:
        if line.startswith(":"):
            self._comments.append(line[1:])
            return
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._has_data = True
        elif field == "event":
            self._event = value
        elif field == "id":
            if "\x00" not in value:
                self._id = value
        elif field == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)

    def _dispatch(self, raw: bytes) -> SseEvent:
        ev = SseEvent(raw=raw, data="\n".join(self._data) if self._has_data else None,
                      event=self._event, id=self._id, retry=self._retry,
                      comments=tuple(self._comments))
        self._data = []
        self._has_data = False
        self._event = None
        self._retry = None
        self._comments = []
        # per the standard the last event id persists across events; each event here
        # reports only the id it carried itself, which is what a rewriter needs
        self._id = None
        return ev
