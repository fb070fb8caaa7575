"""MCP answers stream through event by event: a scripted upstream on a real socket.

The upstream (an aiohttp server) answers a ``tools/call`` with a progress
event, then holds the stream open until the test releases it: the agent
must already have the event. It answers ``tools/list`` with one event
listing a mapped and an unmapped tool, then an event it never terminates:
the first arrives filtered, the second never arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from proxy.mcp.sse import SseEvent, SseParser
from proxy.settings import Environment
from tests.conftest import ADMIN_TOKEN, Proxy, Upstream, start_proxy
from tests.test_mcp_example_server import META, modern_call, modern_headers
from tests.test_mcp_proxy import mcp_config
from tests.waiting import wait_until


class Scripted:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        doc = await request.json()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        if doc["method"] == "tools/call":
            self.calls += 1
            progress = {"jsonrpc": "2.0", "method": "notifications/progress",
                        "params": {"progressToken": "t", "progress": 1}}
            await out.write(b"event: message\ndata: " + orjson.dumps(progress) + b"\n\n")
            await self.release.wait()
            answer = {"jsonrpc": "2.0", "id": doc["id"],
                      "result": {"content": [{"type": "text", "text": "done"}],
                                 "isError": False}}
            await out.write(b"event: message\ndata: " + orjson.dumps(answer) + b"\n\n")
        else:
            listing = {"jsonrpc": "2.0", "id": doc["id"], "result": {"tools": [
                {"name": "list_appointments", "inputSchema": {"type": "object"}},
                {"name": "secret_tool", "inputSchema": {"type": "object"}}]}}
            await out.write(b": keep-alive\n\n")
            await out.write(b"data: " + orjson.dumps(listing) + b"\n\n")
            await out.write(b"data: " + orjson.dumps({**listing, "id": 99}))  # never ended
        await out.write_eof()
        return out


@pytest.fixture
async def scripted(tmp_path: Path) -> AsyncIterator[tuple[Proxy, Scripted]]:
    state = Scripted()
    app = web.Application()
    app.router.add_post("/mcp", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    env = Environment({"MCP_UPSTREAM": f"http://127.0.0.1:{port}", "CASF_PORT": "0",
                       "CASF_ADMIN_PORT": "0", "CASF_AUDIT_PATH": str(tmp_path / "audit.db"),
                       "CASF_ADMIN_TOKEN": ADMIN_TOKEN})
    try:
        async with start_proxy(mcp_config(tmp_path, lambda d: None), env, Upstream()) as p:
            yield p, state
    finally:
        state.release.set()
        await runner.cleanup()


async def next_events(resp: aiohttp.ClientResponse, parser: SseParser) -> list[SseEvent]:
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return parser.close_events()
        events = [e for e in parser.feed(chunk) if e.data is not None]
        if events:
            return events


async def test_a_tool_calls_events_reach_the_agent_while_the_call_runs(
        scripted: tuple[Proxy, Scripted]) -> None:
    proxy, state = scripted
    headers = {**modern_headers("tools/call", **{"Mcp-Name": "list_appointments"}),
               "X-API-Key": "demo-receptionist"}
    parser = SseParser()
    async with proxy.session.post(proxy.url + "/mcp", headers=headers,
                                  data=orjson.dumps(modern_call("list_appointments", {},
                                                                msg_id=5))) as r:
        assert r.status == 200
        first = await asyncio.wait_for(next_events(r, parser), 10)
        # the upstream is still holding the call open: the event was not buffered
        assert not state.release.is_set()
        assert first[0].json()["method"] == "notifications/progress"
        state.release.set()
        rest = await asyncio.wait_for(next_events(r, parser), 10)
        assert rest[0].json()["id"] == 5

    def outcome() -> dict[str, Any] | None:
        conn_records = _records(proxy)
        return next((rec for rec in conn_records if rec["kind"] == "outcome"), None)

    record = await wait_until(outcome, "the tool call's outcome record")
    assert record is not None and record["result_error"] is False


async def test_a_tools_list_stream_is_filtered_and_an_open_event_dropped(
        scripted: tuple[Proxy, Scripted]) -> None:
    proxy, _ = scripted
    headers = {**modern_headers("tools/list"), "X-API-Key": "demo-receptionist"}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    async with proxy.session.post(proxy.url + "/mcp", headers=headers,
                                  data=orjson.dumps(body)) as r:
        assert r.status == 200
        raw = await r.read()
    assert raw.startswith(b": keep-alive\n\n")  # a comment passes byte for byte
    assert b"secret_tool" not in raw and b'"id":99' not in raw
    parser = SseParser()
    events = [e for e in parser.feed(raw) + parser.close_events() if e.data is not None]
    assert [[t["name"] for t in e.json()["result"]["tools"]] for e in events] == [
        ["list_appointments"]]
    assert parser.tail() == b""


def _records(proxy: Proxy) -> list[dict[str, Any]]:
    from tests.audit_rows import all_records
    return all_records(proxy.cfg.audit.sqlite_path)
