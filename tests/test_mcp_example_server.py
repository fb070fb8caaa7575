"""The MCP example server as a real process: the SDK client, raw HTTP, the test hooks.

Proves examples/mcp/server.py and tests/mcp_fixtures.py work on their own
(before any proxy is in front): tools are listed and called in both
protocol eras, progress notifications come before the result on the SSE
stream, the recording hooks see every request, and the server's own
verdict on mirrored headers agrees with proxy.mcp.protocol.check_headers.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.mcp.protocol import (
    HEADER_MISMATCH,
    McpRejected,
    bindings_from_list,
    check_headers,
    parse_message,
)
from proxy.mcp.sse import SseEvent, SseParser
from tests.mcp_fixtures import McpServer, mcp_client, mcp_server, start_mcp_server

__all__ = ["mcp_server"]

TOOLS = {"list_appointments", "create_appointment", "cancel_appointment", "summary_history",
         "send_sms", "generate_invoice"}
MODERN = "2026-07-28"
META = {"io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {}}


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_sdk_client_lists_and_calls_tools(mcp_server: McpServer, mode: str) -> None:
    async with mcp_client(mcp_server.url, {"X-API-Key": "demo-receptionist"},
                          mode=mode) as client:
        assert client.protocol_version == (MODERN if mode == "auto" else "2025-11-25")
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} == TOOLS
        sms = next(t for t in listed.tools if t.name == "send_sms")
        assert set(sms.input_schema["properties"]) == {"patient_id", "message"}
        result = await client.call_tool("create_appointment",
                                        {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"})
        assert not result.is_error
        created = orjson.loads(result.content[0].text)  # type: ignore[union-attr]
        assert created["patient_id"] == "p1" and created["id"].startswith("a-")
        failed = await client.call_tool("cancel_appointment", {"appointment_id": "a-999"})
        assert failed.is_error
    assert await mcp_server.calls() == [
        {"tool": "create_appointment",
         "arguments": {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}},
        {"tool": "cancel_appointment", "arguments": {"appointment_id": "a-999"}}]
    requests = (await mcp_server.seen())["requests"]
    assert [r["tool"] for r in requests if r["method"] == "tools/call"] == [
        "create_appointment", "cancel_appointment"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_progress_reaches_the_sdk_client_before_the_result(
        mcp_server: McpServer, mode: str) -> None:
    seen: list[float] = []

    # named as the SDK's progress-callback protocol names them
    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with mcp_client(mcp_server.url, mode=mode) as client:
        result = await client.call_tool("summary_history", {"patient_id": "p1"},
                                        progress_callback=on_progress)
        # the callback ran for every notification by the time the result returned
        assert seen == [1.0, 2.0, 3.0]
        assert orjson.loads(result.content[0].text)["visits"] == 2  # type: ignore[union-attr]


async def test_the_hooks_reset_and_record_every_http_request(mcp_server: McpServer) -> None:
    async with mcp_client(mcp_server.url, mode="legacy") as client:
        await client.list_tools()
    await mcp_server.reset()
    assert await mcp_server.seen() == {"requests": [], "calls": []}
    async with aiohttp.ClientSession() as s:
        async with s.post(mcp_server.url, data=b"not json", headers=modern_headers("x")) as r:
            assert r.status == 400
        async with s.get(mcp_server.url) as r:
            pass
    requests = (await mcp_server.seen())["requests"]
    assert [(r["http_method"], r["method"]) for r in requests] == [("POST", None),
                                                                   ("GET", None)]
    assert await mcp_server.calls() == []


def modern_headers(method: str, **extra: str) -> dict[str, str]:
    return {"Accept": "application/json, text/event-stream",
            "Content-Type": "application/json", "MCP-Protocol-Version": MODERN,
            "Mcp-Method": method, **extra}


def modern_call(name: str, arguments: dict[str, Any], msg_id: Any = 1,
                token: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = dict(META)
    if token is not None:
        meta["progressToken"] = token
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta}}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def read_events(response: aiohttp.ClientResponse) -> list[SseEvent]:
    parser = SseParser()
    events: list[SseEvent] = []
    async for chunk in response.content.iter_any():
        events.extend(parser.feed(chunk))
    events.extend(parser.close_events())
    assert parser.tail() == b""
    return events


async def test_progress_events_precede_the_response_on_the_stream(
        mcp_server: McpServer, session: aiohttp.ClientSession) -> None:
    body = modern_call("summary_history", {"patient_id": "p1"}, msg_id=11, token="tok")
    headers = modern_headers("tools/call", **{"Mcp-Name": "summary_history",
                                              "Mcp-Param-PatientId": "p1"})
    async with session.post(mcp_server.url, json=body, headers=headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(r)
    docs = [e.json() for e in events if e.data is not None]
    assert [d.get("method") for d in docs] == ["notifications/progress"] * 3 + [None]
    assert [d["params"]["progress"] for d in docs[:3]] == [1, 2, 3]
    assert docs[-1]["id"] == 11 and docs[-1]["result"]["isError"] is False


async def test_json_mode_answers_application_json(session: aiohttp.ClientSession) -> None:
    async with start_mcp_server("--json") as server:
        body = modern_call("list_appointments", {}, msg_id="j1")
        headers = modern_headers("tools/call", **{"Mcp-Name": "list_appointments"})
        async with session.post(server.url, json=body, headers=headers) as r:
            assert r.status == 200 and r.content_type == "application/json"
            doc = await r.json()
        assert doc["id"] == "j1" and doc["result"]["isError"] is False


def b64(text: str) -> str:
    return "=?base64?" + base64.b64encode(text.encode()).decode() + "?="


HEADER_CASES: list[tuple[str, dict[str, str | None], bool]] = [
    ("as a client sends them", {}, True),
    ("name base64", {"Mcp-Name": b64("send_sms")}, True),
    ("param base64", {"Mcp-Param-PatientId": b64("p1")}, True),
    ("param name lower case", {"Mcp-Param-PatientId": None, "mcp-param-patientid": "p1"}, True),
    ("method differs", {"Mcp-Method": "tools/list"}, False),
    ("name differs", {"Mcp-Name": "generate_invoice"}, False),
    ("name base64 differs", {"Mcp-Name": b64("generate_invoice")}, False),
    ("param differs", {"Mcp-Param-PatientId": "p2"}, False),
    ("param base64 differs", {"Mcp-Param-PatientId": b64("p2")}, False),
    ("param missing", {"Mcp-Param-PatientId": None}, False),
    ("param base64 malformed", {"Mcp-Param-PatientId": "=?base64?%%%?="}, False),
]


@pytest.mark.parametrize(("changes", "passes"), [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
async def test_check_headers_agrees_with_the_sdk_server(
        mcp_server: McpServer, session: aiohttp.ClientSession,
        changes: dict[str, str | None], passes: bool) -> None:
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    async with session.post(mcp_server.url, json=listing,
                            headers=modern_headers("tools/list")) as r:
        bindings = bindings_from_list((await r.json())["result"])
    assert set(bindings) == TOOLS
    assert set(bindings["send_sms"]) == {"patientid"}

    body = modern_call("send_sms", {"patient_id": "p1", "message": "Grüße"}, msg_id=5)
    headers: dict[str, str] = modern_headers("tools/call", **{
        "Mcp-Name": "send_sms", "Mcp-Param-PatientId": "p1"})
    for name, value in changes.items():
        headers.pop(name, None)
        if value is not None:
            headers[name] = value
    raw = orjson.dumps(body)
    msg = parse_message(raw)
    try:
        check_headers(msg, headers.items(), bindings["send_sms"])
        ours = True
    except McpRejected as exc:
        assert exc.code == HEADER_MISMATCH
        ours = False
    async with session.post(mcp_server.url, data=raw, headers=headers) as r:
        status = r.status
        answer = await r.read()
    theirs = status == 200
    if not theirs:
        assert status == 400 and orjson.loads(answer)["error"]["code"] == HEADER_MISMATCH
    assert (ours, theirs) == (passes, passes)
