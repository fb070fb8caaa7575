"""proxy.mcp.listing: tools/list answers show only what the caller may call."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.mcp.config import parse_mcp
from proxy.mcp.listing import (
    candidates,
    filter_json_answer,
    filter_result,
    filter_sse_event,
    response_result,
    sse_result,
    visibility_input,
)
from proxy.mcp.protocol import INTERNAL_ERROR
from proxy.mcp.sse import SseParser

MAPPED = parse_mcp([{"path": "/mcp", "tools": {
    "list_appointments": {"tool": "cliniccloud.list_appointments", "effect": "read"},
    "send_sms": {"tool": "twilio.send_sms", "effect": "write"},
    "generate_invoice": {"tool": "stripe.generate_invoice", "effect": "write"}}}])[0]
OPEN = parse_mcp([{"path": "/mcp", "unknown_tools": "allow"}])[0]


def tool(name: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "inputSchema": {"type": "object"}, **extra}


RESULT: dict[str, Any] = {
    "tools": [tool("list_appointments", description="d", annotations={"readOnlyHint": True}),
              tool("send_sms"), tool("generate_invoice"), tool("unmapped_tool"),
              {"description": "no name"}, tool(5), "not an object", tool("send_sms")],
    "nextCursor": "page-2",
    "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "clinic"}},
    "ttlMs": 1000, "cacheScope": "private",
}


def names(result: Any) -> list[str]:
    return [t["name"] for t in result["tools"]]


def test_candidates_are_the_listable_names() -> None:
    assert candidates(RESULT, MAPPED) == ("list_appointments", "send_sms", "generate_invoice")
    assert candidates(RESULT, OPEN) == ("list_appointments", "send_sms", "generate_invoice",
                                        "unmapped_tool")
    assert candidates({"nope": 1}, MAPPED) == () and candidates(None, MAPPED) == ()


@pytest.mark.parametrize(("endpoint", "visible", "want"), [
    (MAPPED, lambda n: True, ["list_appointments", "send_sms", "generate_invoice", "send_sms"]),
    (MAPPED, lambda n: n != "send_sms", ["list_appointments", "generate_invoice"]),
    (MAPPED, lambda n: False, []),
    (OPEN, lambda n: True, ["list_appointments", "send_sms", "generate_invoice",
                            "unmapped_tool", "send_sms"]),
    (OPEN, lambda n: n.startswith("un"), ["unmapped_tool"]),
])
def test_filter_result(endpoint: Any, visible: Any, want: list[str]) -> None:
    out = filter_result(RESULT, endpoint, visible)
    assert names(out) == want
    assert {k: v for k, v in out.items() if k != "tools"} == {
        k: v for k, v in RESULT.items() if k != "tools"}
    assert all(any(t is o for o in RESULT["tools"]) for t in out["tools"])  # kept whole


def test_the_predicate_is_only_asked_about_listable_tools() -> None:
    asked: list[str] = []

    def visible(name: str) -> bool:
        asked.append(name)
        return True

    filter_result(RESULT, MAPPED, visible)
    assert "unmapped_tool" not in asked


def test_a_result_without_tools_is_unchanged() -> None:
    assert filter_result({"nextCursor": "x"}, MAPPED, lambda n: True) == {"nextCursor": "x"}


def response(result: Any, msg_id: Any = 3) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": result}


def test_filter_json_answer() -> None:
    raw = orjson.dumps(response(RESULT))
    assert response_result(raw) == RESULT
    out = orjson.loads(filter_json_answer(raw, MAPPED, lambda n: n == "send_sms", 3))
    assert out["id"] == 3 and out["jsonrpc"] == "2.0"
    assert names(out["result"]) == ["send_sms", "send_sms"]
    assert out["result"]["nextCursor"] == "page-2"


def test_a_jsonrpc_error_answer_passes() -> None:
    err = {"jsonrpc": "2.0", "id": 3, "error": {"code": -32603, "message": "boom"}}
    assert orjson.loads(filter_json_answer(orjson.dumps(err), MAPPED, lambda n: True)) == err


@pytest.mark.parametrize("raw", [b"<html>bad gateway</html>", b"", b"[]",
                                 b'{"tools": [{"name": "send_sms"}]}'])
def test_an_answer_that_cannot_be_filtered_is_not_passed_on(raw: bytes) -> None:
    out = orjson.loads(filter_json_answer(raw, MAPPED, lambda n: True, "id-9"))
    assert out["id"] == "id-9" and out["error"]["code"] == INTERNAL_ERROR
    assert "result" not in out
    assert response_result(raw) is None


def test_filter_sse_events() -> None:
    progress = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"x": 1}}
    stream = (b": ping\r\n\r\n"
              b"event: message\r\ndata: " + orjson.dumps(progress) + b"\r\n\r\n"
              b"event: message\r\nid: 9\r\ndata: " + orjson.dumps(response(RESULT)) +
              b"\r\n\r\n")
    parser = SseParser()
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i:i + 1])]
    assert [sse_result(e) for e in events] == [None, None, RESULT]
    out = [filter_sse_event(e, MAPPED, lambda n: n == "list_appointments") for e in events]
    assert out[0] == events[0].raw and out[1] == events[1].raw  # passed byte for byte
    [rewritten] = SseParser().feed(out[2])
    assert rewritten.event == "message" and rewritten.id == "9"
    doc = rewritten.json()
    assert doc["id"] == 3 and names(doc["result"]) == ["list_appointments"]
    assert doc["result"]["_meta"] == RESULT["_meta"]


def test_visibility_input_is_a_call_without_arguments() -> None:
    base = {"tool": "mcp.tools/list", "effect": "read", "mode": "ALLOW", "role": "nurse",
            "subject": {"patient_id": "p1"}, "args": {"x": 1},
            "context": {"tenant_id": "t1"}, "principal": {"id": "u", "role": "nurse"},
            "request": {"method": "POST", "path": "/mcp", "route": "/mcp"}}
    got = visibility_input(base, MAPPED.tools["send_sms"])
    assert got == {**base, "tool": "twilio.send_sms", "effect": "write", "subject": {},
                   "args": {}}
    assert base["tool"] == "mcp.tools/list"  # the message's input is left alone
