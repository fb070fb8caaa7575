"""What an agent using the official MCP SDK sees of casf-proxy's MCP answers.

A real aiohttp server on 127.0.0.1 answers every tools/call with the bodies
proxy.mcp.protocol builds (a deny as a JSON-RPC error, a deny as a tool
error, a refusal); the SDK's streamable-HTTP client reads them, as an
agent would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from mcp.shared.exceptions import MCPError

from proxy.mcp.config import parse_mcp
from proxy.mcp.protocol import (
    DENIED,
    INVALID_PARAMS,
    McpMessage,
    McpRejected,
    deny_answer,
    parse_message,
    rejection_answer,
)
from tests.mcp_fixtures import mcp_client
from tests.servers import free_port

ENVELOPE = {"decision": "DENY", "status": 429, "reason_codes": ["RateLimit_Exceeded",
                                                                "Inv_NoSmsBurst"],
            "message": "rate limit sms_per_patient exceeded", "tool": "twilio.send_sms",
            "request_id": None, "trace_id": "0af7651916cd43dd8448eb211c80319c",
            "policy_hash": "sha256:abc", "retry_after": 3600}

Answer = Callable[[McpMessage], tuple[int, bytes]]


async def serve(answer: Answer) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            msg = parse_message(raw)
        except McpRejected as exc:
            status, body = rejection_answer(exc, {"decision": "DENY", "status": 400,
                                                  "reason_codes": [exc.reason],
                                                  "message": exc.message})
            return web.Response(status=status, body=body, content_type="application/json")
        if msg.is_notification:
            return web.Response(status=202)
        if msg.method == "initialize":  # the handshake of 2025 clients
            return web.json_response({"jsonrpc": "2.0", "id": msg.id, "result": {
                "protocolVersion": "2025-11-25", "capabilities": {"tools": {}},
                "serverInfo": {"name": "answers", "version": "1"}}})
        status, body = answer(msg)
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/mcp", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        await runner.cleanup()


@pytest.fixture
async def jsonrpc_deny() -> AsyncIterator[str]:
    endpoint = parse_mcp([{"path": "/mcp", "deny_as": "jsonrpc_error"}])[0]

    def answer(msg: McpMessage) -> tuple[int, bytes]:
        if msg.tool_name == "refused":
            exc = McpRejected(INVALID_PARAMS, "Mcp_InvalidParams", "bad params", msg.id)
            return rejection_answer(exc, {"decision": "DENY", "status": 400,
                                          "reason_codes": [exc.reason], "message": exc.message})
        return deny_answer(msg, ENVELOPE, endpoint)

    async for url in serve(answer):
        yield url


@pytest.fixture
async def tool_error_deny() -> AsyncIterator[str]:
    endpoint = parse_mcp([{"path": "/mcp", "deny_as": "tool_error"}])[0]
    async for url in serve(lambda m: deny_answer(m, ENVELOPE, endpoint)):
        yield url


MODES = ["2026-07-28", "legacy"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_jsonrpc_error_deny_reaches_the_agent_with_the_envelope(
        jsonrpc_deny: str, mode: str) -> None:
    async with mcp_client(jsonrpc_deny, mode=mode) as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("send_sms", {"patient_id": "p1", "message": "hi"})
    assert info.value.code == DENIED
    assert info.value.message == ENVELOPE["message"]
    assert info.value.data == ENVELOPE  # retry_after included: no HTTP header reaches it


@pytest.mark.parametrize("mode", MODES)
async def test_a_tool_error_deny_is_a_result_the_model_can_read(
        tool_error_deny: str, mode: str) -> None:
    async with mcp_client(tool_error_deny, mode=mode) as client:
        result = await client.call_tool("send_sms", {"patient_id": "p1", "message": "hi"})
    assert result.is_error
    text = " ".join(getattr(c, "text", "") for c in result.content)
    assert "RateLimit_Exceeded" in text and "Inv_NoSmsBurst" in text and "3600" in text
    meta: dict[str, Any] = result.meta or {}
    assert meta["casf"] == ENVELOPE


@pytest.mark.parametrize("mode", MODES)
async def test_a_refusal_reaches_the_agent_with_its_code(jsonrpc_deny: str, mode: str) -> None:
    async with mcp_client(jsonrpc_deny, mode=mode) as client:
        with pytest.raises(MCPError) as info:
            await client.call_tool("refused", {})
    assert info.value.code == INVALID_PARAMS
    assert info.value.data["reason_codes"] == ["Mcp_InvalidParams"]
