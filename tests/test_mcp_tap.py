"""proxy.mcp.tap: a tools/call answer read for its outcome while it streams through."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mcp.protocol import call_outcome
from proxy.mcp.sse import serialize
from proxy.mcp.tap import CallTap, TapOutcome

OK = {"jsonrpc": "2.0", "id": 4, "result": {"content": [{"type": "text", "text": "ok"}],
                                            "isError": False}}
FAILED = {"jsonrpc": "2.0", "id": 4, "result": {"content": [], "isError": True}}
ERROR = {"jsonrpc": "2.0", "id": 4, "error": {"code": -32602, "message": "bad"}}
PROGRESS = {"jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 1, "progress": 1}}


def tap(chunks: list[bytes], content_type: str | None, msg_id: Any = 4,
        max_bytes: int = 1 << 20) -> TapOutcome:
    t = CallTap(content_type, msg_id, max_bytes)
    for c in chunks:
        t.feed(c)
    return t.finish()


def stream(*docs: Any) -> bytes:
    return b": hello\n\n" + b"".join(serialize(orjson.dumps(d).decode(), event="message")
                                     for d in docs)


def test_json_answer() -> None:
    raw = orjson.dumps(OK)
    got = tap([raw[:5], raw[5:]], "application/json")
    assert got == TapOutcome(call_outcome(OK).response_sha256, False, len(raw), True)


def test_error_answers() -> None:
    assert tap([orjson.dumps(FAILED)], "application/json").is_error is True
    assert tap([orjson.dumps(ERROR)], "application/json; charset=utf-8").is_error is True


def test_sse_answer_skips_notifications_and_other_ids() -> None:
    other = {**FAILED, "id": 99}
    raw = stream(PROGRESS, other, PROGRESS, OK)
    got = tap([raw[i:i + 7] for i in range(0, len(raw), 7)], "text/event-stream")
    assert got == TapOutcome(call_outcome(OK).response_sha256, False, len(raw), True)


def test_sse_stream_without_an_answer_falls_back_to_the_raw_digest() -> None:
    raw = stream(PROGRESS)
    got = tap([raw], "text/event-stream")
    assert got == TapOutcome(hashlib.sha256(raw).hexdigest(), None, len(raw), False)


def test_unreadable_or_oversized_answers_fall_back_to_the_raw_digest() -> None:
    for raw, ctype, limit in [(b"<html>oops</html>", "text/html", 1 << 20),
                              (orjson.dumps(OK), "application/json", 10),
                              (stream(OK), "text/event-stream", 10)]:
        got = tap([raw[i:i + 3] for i in range(0, len(raw), 3)], ctype, max_bytes=limit)
        assert got == TapOutcome(hashlib.sha256(raw).hexdigest(), None, len(raw), False)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 4000), max_size=10), st.booleans())
def test_the_outcome_does_not_depend_on_chunking(points: list[int], sse: bool) -> None:
    raw = stream(PROGRESS, FAILED) if sse else orjson.dumps(FAILED)
    cuts = sorted({p % (len(raw) + 1) for p in points})
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    ctype = "text/event-stream" if sse else "application/json"
    assert tap(chunks, ctype) == tap([raw], ctype)
    assert tap(chunks, ctype).is_error is True
