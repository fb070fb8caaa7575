"""The MCP front door end to end: the SDK client → casf-proxy → the example SDK server.

Every test runs the real example server (examples/mcp/server.py) and a real
casf-proxy started from examples/mcp/casf.yaml (ports 0, a temporary audit
file). The server's ``/_seen`` hook proves what reached it: a denied or
refused call never does.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from mcp.shared.exceptions import MCPError

from tests.audit_rows import all_records
from tests.conftest import ADMIN_TOKEN, CLINIC, ROOT, Proxy, Upstream, start_proxy
from tests.mcp_fixtures import McpServer, mcp_client, mcp_server
from tests.servers import RedisServer
from tests.test_mcp_example_server import META, modern_call, modern_headers
from tests.waiting import wait_until

__all__ = ["mcp_server"]

MCP = ROOT / "examples" / "mcp"
RECEPTIONIST_TOOLS = {"list_appointments", "create_appointment", "cancel_appointment",
                      "send_sms"}


def mcp_config(tmp_path: Path, patch: Callable[[dict[str, Any]], None]) -> Path:
    """examples/mcp/casf.yaml with ``patch`` applied, its relative paths made absolute."""
    data = yaml.safe_load((MCP / "casf.yaml").read_text())
    data["identity"]["api_keys"]["keys_file"] = str(CLINIC / "keys.yaml")
    data["identity"]["jwt"]["jwks_file"] = str(CLINIC / "dev-keys" / "jwks.json")
    data["policy"]["bundle"] = str(MCP / "policies")
    patch(data)
    path = tmp_path / "casf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def mcp_env(server: McpServer, tmp_path: Path, **extra: str) -> Any:
    from proxy.settings import Environment
    return Environment({"MCP_UPSTREAM": server.base, "CASF_PORT": "0", "CASF_ADMIN_PORT": "0",
                        "CASF_AUDIT_PATH": str(tmp_path / "audit.db"),
                        "CASF_ADMIN_TOKEN": ADMIN_TOKEN, **extra})


@dataclass
class Stack:
    proxy: Proxy
    server: McpServer

    @property
    def url(self) -> str:
        return self.proxy.url + "/mcp"

    def client(self, key: str, mode: str = "auto", **headers: str
               ) -> contextlib.AbstractAsyncContextManager[Any]:
        return mcp_client(self.url, {"X-API-Key": f"demo-{key}", **headers}, mode=mode)

    async def post(self, body: Any, *, key: str | None = "receptionist",
                   headers: dict[str, str] | None = None, raw: bytes | None = None,
                   method: str = "tools/call") -> tuple[int, dict[str, str], Any]:
        """A raw POST (2026-07-28 style: no session needed); the answer parsed."""
        h = modern_headers(method, **(headers or {}))
        if key is not None:
            h["X-API-Key"] = f"demo-{key}"
        data = raw if raw is not None else orjson.dumps(body)
        async with self.proxy.session.post(self.url, data=data, headers=h) as r:
            text = await r.read()
            ctype = r.headers.get("Content-Type", "")
            doc: Any = text
            if "application/json" in ctype:
                doc = orjson.loads(text)
            elif "text/event-stream" in ctype:
                doc = [orjson.loads(line[5:]) for line in text.decode().splitlines()
                       if line.startswith("data:")][-1]
            return r.status, dict(r.headers), doc

    def records(self) -> list[dict[str, Any]]:
        return all_records(self.proxy.cfg.audit.sqlite_path)

    async def tool_calls_seen(self) -> list[str]:
        return [r["tool"] for r in (await self.server.seen())["requests"]
                if r["method"] == "tools/call"]


def make_stack(tmp_path: Path, server: McpServer, patch: Callable[[dict[str, Any]], None]
               = lambda d: None, **env: str) -> contextlib.AbstractAsyncContextManager[Proxy]:
    return start_proxy(mcp_config(tmp_path, patch), mcp_env(server, tmp_path, **env),
                       Upstream())


@pytest.fixture
async def stack(tmp_path: Path, mcp_server: McpServer) -> AsyncIterator[Stack]:
    async with make_stack(tmp_path, mcp_server) as proxy:
        yield Stack(proxy, mcp_server)


def call(name: str, arguments: dict[str, Any], msg_id: Any = 1) -> dict[str, Any]:
    return modern_call(name, arguments, msg_id=msg_id)


def error_of(doc: Any) -> dict[str, Any]:
    assert isinstance(doc, dict) and "error" in doc, doc
    err: dict[str, Any] = doc["error"]
    return err


# ------------------------------------------------------------ listing and calls


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_tools_list_shows_each_role_what_it_may_call(stack: Stack, mode: str) -> None:
    async with stack.client("receptionist", mode) as client:
        assert {t.name for t in (await client.list_tools()).tools} == RECEPTIONIST_TOOLS
    async with stack.client("billing", mode) as client:
        assert {t.name for t in (await client.list_tools()).tools} == {"generate_invoice"}
    async with stack.client("nurse", mode) as client:
        assert {t.name for t in (await client.list_tools()).tools} == {
            "list_appointments", "summary_history", "send_sms"}
    listed = [r for r in stack.records() if r["tool"] == "mcp.tools/list"]
    assert listed and all(r["via"] == "mcp" and r["decision"] == "ALLOW" for r in listed)


async def test_tools_list_json_answer_is_filtered(tmp_path: Path) -> None:
    from tests.mcp_fixtures import start_mcp_server
    async with start_mcp_server("--json") as server, make_stack(tmp_path, server) as proxy:
        s = Stack(proxy, server)
        body = {"jsonrpc": "2.0", "id": "l1", "method": "tools/list", "params": {"_meta": META}}
        status, headers, doc = await s.post(body, key="billing", method="tools/list")
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert doc["id"] == "l1"
        assert [t["name"] for t in doc["result"]["tools"]] == ["generate_invoice"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_allowed_read_and_write_reach_the_server_and_are_recorded(
        stack: Stack, mode: str) -> None:
    async with stack.client("receptionist", mode) as client:
        created = await client.call_tool("create_appointment",
                                         {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"})
        assert not created.is_error
        listed = await client.call_tool("list_appointments", {"patient_id": "p1"})
        assert not listed.is_error
        assert "a-1" in listed.content[0].text
    assert [c["tool"] for c in await stack.server.calls()] == ["create_appointment",
                                                               "list_appointments"]

    def decided() -> list[dict[str, Any]]:
        return [r for r in stack.records() if r["kind"] == "decision"
                and r.get("mcp_method") == "tools/call"]

    def outcomes() -> list[dict[str, Any]] | None:
        out = [r for r in stack.records() if r["kind"] == "outcome"]
        return out if len(out) == len(decided()) else None

    done = await wait_until(outcomes, "an outcome record for every tool call")
    assert done is not None
    decisions = decided()
    # a 2026-07-28 client may send a call twice: first without the Mcp-Param-* headers
    # it learns from tools/list (the server refuses that one itself)
    assert [d["tool"] for d in decisions][-2:] == ["cliniccloud.create_appointment",
                                                   "cliniccloud.list_appointments"]
    write = decisions[-2]
    assert write["via"] == "mcp" and write["effect"] == "write"
    assert write["decision"] == "ALLOW" and write["method"] == "POST"
    assert isinstance(write["jsonrpc_id"], str)
    assert write["attrs"]["subject"] == {"patient_id": "p1"}
    assert write["attrs"]["args"] == {"slot": "2026-11-23T10:00:00Z"}
    assert write["mcp_tool"] == "create_appointment"
    assert [o["ref"] for o in done] == [d["event_id"] for d in decisions]
    assert all(o["result_error"] is False and o["status"] == 200 for o in done[-2:])
    assert all(len(o["response_sha256"]) == 64 and o["response_bytes"] > 0 for o in done)


async def test_a_tool_error_of_the_server_is_an_error_outcome(stack: Stack) -> None:
    async with stack.client("receptionist") as client:
        failed = await client.call_tool("cancel_appointment", {"appointment_id": "a-404"},
                                        )
        assert failed.is_error

    def outcome() -> dict[str, Any] | None:
        return next((r for r in stack.records() if r["kind"] == "outcome"), None)

    record = await wait_until(outcome, "the outcome record")
    assert record is not None and record["result_error"] is True


async def test_progress_notifications_arrive_before_the_result(stack: Stack) -> None:
    progress: list[float] = []
    finished: list[bool] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        assert not finished  # every notification came before the call returned
        progress.append(value)

    async with stack.client("nurse") as client:
        result = await client.call_tool("summary_history", {"patient_id": "p1"},
                                        progress_callback=on_progress)
        finished.append(True)
    assert progress == [1.0, 2.0, 3.0]
    assert orjson.loads(result.content[0].text)["visits"] == 2


# ------------------------------------------------------------ denials


async def test_a_denied_tool_is_a_jsonrpc_error_and_never_reaches_the_server(
        stack: Stack) -> None:
    async with stack.client("billing") as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("send_sms", {"patient_id": "p1", "message": "hi"})
    assert caught.value.code == -32010
    envelope = caught.value.data
    assert isinstance(envelope, dict)
    assert envelope["decision"] == "DENY" and envelope["status"] == 403
    assert "Role_NotPermitted" in envelope["reason_codes"]
    assert envelope["tool"] == "twilio.send_sms"
    assert await stack.tool_calls_seen() == []
    # another patient: the policy decides after the SMS rate limit (one per patient)
    status, _, doc = await stack.post(call("send_sms", {"patient_id": "p2", "message": "x"},
                                           msg_id="d1"), key="billing",
                                      headers={"Mcp-Name": "send_sms",
                                               "Mcp-Param-PatientId": "p2"})
    assert status == 403 and doc["id"] == "d1"
    assert error_of(doc)["code"] == -32010
    assert error_of(doc)["data"]["reason_codes"] == ["Role_NotPermitted"]
    denied = [r for r in stack.records() if r["decision"] == "DENY"]
    assert denied and all(r["via"] == "mcp" and r["tool"] == "twilio.send_sms" for r in denied)
    assert all(r["attrs"]["args"]["message"] != "x" for r in denied)  # redacted: hashed
    assert await stack.tool_calls_seen() == []


async def test_tool_error_deny_is_a_result_the_agent_can_read(
        tmp_path: Path, mcp_server: McpServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["mcp"][0]["deny_as"] = "tool_error"

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        s = Stack(proxy, mcp_server)
        async with s.client("billing") as client:
            result = await client.call_tool("send_sms", {"patient_id": "p1", "message": "x"})
        assert result.is_error
        text = result.content[0].text
        assert "DENY" in text and "Role_NotPermitted" in text
        assert result.meta is not None and result.meta["casf"]["status"] == 403
        assert await s.tool_calls_seen() == []


async def test_an_unknown_tool_is_not_mapped(stack: Stack) -> None:
    status, _, doc = await stack.post(call("drop_database", {}, msg_id=3),
                                      headers={"Mcp-Name": "drop_database"})
    assert status == 403 and doc["id"] == 3
    assert error_of(doc)["data"]["reason_codes"] == ["Route_NotMapped"]
    assert await stack.tool_calls_seen() == []


async def test_an_unauthenticated_call_is_401_and_never_forwarded(stack: Stack) -> None:
    status, headers, doc = await stack.post(call("list_appointments", {}, msg_id=4), key=None,
                                            headers={"Mcp-Name": "list_appointments"})
    assert status == 401 and "WWW-Authenticate" in headers
    assert error_of(doc)["data"]["reason_codes"] == ["Auth_Missing"]
    status, _, doc = await stack.post({"jsonrpc": "2.0", "id": 5, "method": "tools/list",
                                       "params": {"_meta": META}}, key=None,
                                      method="tools/list")
    assert status == 401 and error_of(doc)["code"] == -32010
    assert (await stack.server.seen())["requests"] == []


async def test_header_mismatch_is_refused(stack: Stack,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    status, _, doc = await stack.post(call("list_appointments", {}, msg_id=6),
                                      headers={"Mcp-Name": "send_sms"})
    assert status == 400 and doc["id"] == 6
    assert error_of(doc)["code"] == -32020
    assert error_of(doc)["data"]["reason_codes"] == ["Mcp_HeaderMismatch"]
    # once the server's tools/list went through, Mcp-Param-* is checked too
    await stack.post({"jsonrpc": "2.0", "id": 7, "method": "tools/list",
                      "params": {"_meta": META}}, method="tools/list")
    status, _, doc = await stack.post(
        call("send_sms", {"patient_id": "p1", "message": "hi"}, msg_id=8),
        headers={"Mcp-Name": "send_sms", "Mcp-Param-PatientId": "p2"})
    assert status == 400 and error_of(doc)["code"] == -32020
    assert await stack.tool_calls_seen() == []
    refused = [r for r in stack.records() if r["reason_codes"] == ["Mcp_HeaderMismatch"]]
    assert len(refused) == 2
    assert all("p2" not in orjson.dumps(r).decode() for r in refused)  # never recorded
    assert "'via': 'mcp'" in caplog.text  # the access log lines were captured
    assert "p2" not in caplog.text  # nor logged


MALFORMED: list[tuple[str, bytes, int, str]] = [
    ("not json", b"{not json", -32700, "BadRequest_InvalidJson"),
    ("a batch", b'[{"jsonrpc": "2.0", "id": 1, "method": "ping"}]', -32600,
     "Mcp_BatchNotAllowed"),
    ("not json-rpc", b'{"id": 1, "method": "ping"}', -32600, "Mcp_InvalidMessage"),
    ("no method", b'{"jsonrpc": "2.0", "id": 1}', -32600, "Mcp_InvalidMessage"),
    ("no tool name", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}}',
     -32602, "Mcp_InvalidParams"),
    ("arguments not an object", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
     b'"params": {"name": "send_sms", "arguments": [1]}}', -32602, "Mcp_InvalidParams"),
    ("duplicate keys", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
     b'"params": {"name": "send_sms", "name": "list_appointments"}}', -32600,
     "BadRequest_Ambiguous"),
    ("control characters in the name", b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call",'
     b' "params": {"name": "send\\u0000sms"}}', -32602, "Mcp_InvalidParams"),
]


@pytest.mark.parametrize(("raw", "code", "reason"), [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
async def test_malformed_messages_are_400_audited_never_forwarded(
        stack: Stack, raw: bytes, code: int, reason: str) -> None:
    status, _, doc = await stack.post(None, raw=raw)
    assert status == 400
    assert error_of(doc)["code"] == code
    assert error_of(doc)["data"]["reason_codes"] == [reason]
    assert (await stack.server.seen())["requests"] == []
    [record] = stack.records()
    assert record["via"] == "mcp" and record["status"] == 400
    assert record["reason_codes"] == [reason]


async def test_an_oversized_message_is_413(stack: Stack) -> None:
    big = call("send_sms", {"patient_id": "p1", "message": "x" * 70_000})
    status, _, doc = await stack.post(big)
    assert status == 413 and error_of(doc)["data"]["reason_codes"] == ["Request_TooLarge"]
    assert (await stack.server.seen())["requests"] == []


async def test_other_methods_are_denied_unless_listed(stack: Stack) -> None:
    body = {"jsonrpc": "2.0", "id": 9, "method": "resources/list", "params": {"_meta": META}}
    status, _, doc = await stack.post(body, method="resources/list")
    assert status == 403
    assert error_of(doc)["data"]["reason_codes"] == ["Mcp_MethodNotAllowed"]
    assert error_of(doc)["data"]["tool"] == "mcp.resources/list"
    assert (await stack.server.seen())["requests"] == []


async def test_unknown_tools_allow_decides_an_unmapped_tool_as_itself(
        tmp_path: Path, mcp_server: McpServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        ep = d["mcp"][0]
        ep["unknown_tools"] = "allow"
        del ep["list_query"]
        del ep["tools"]["generate_invoice"]
        ep["methods"] = ["resources/*"]

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        s = Stack(proxy, mcp_server)
        async with s.client("billing") as client:  # no list_query: every tool is shown
            names = {t.name for t in (await client.list_tools()).tools}
            assert "generate_invoice" in names and "send_sms" in names
        status, _, doc = await s.post(call("generate_invoice", {"patient_id": "p1",
                                                                "amount_cents": 5}, msg_id=1),
                                      key="billing", headers={"Mcp-Name": "generate_invoice"})
        # decided as the tool "generate_invoice" (a write): the policy knows no such tool
        assert status == 403
        assert error_of(doc)["data"]["tool"] == "generate_invoice"
        assert "Tool_Unknown" in error_of(doc)["data"]["reason_codes"]
        assert await s.tool_calls_seen() == []
        body = {"jsonrpc": "2.0", "id": 2, "method": "resources/list",
                "params": {"_meta": META}}
        status, _, doc = await s.post(body, method="resources/list")
        assert status == 200 and doc["id"] == 2  # listed under methods: forwarded
        seen = (await mcp_server.seen())["requests"]
        assert [r["method"] for r in seen][-1] == "resources/list"


# ------------------------------------------------------------ sessions


async def test_a_session_presented_by_another_caller_is_unknown(stack: Stack) -> None:
    async with stack.client("receptionist", "legacy") as client:  # the SDK's own session
        await client.list_tools()
    seen = (await stack.server.seen())["requests"]
    assert any("mcp-session-id" in r["mcp_headers"] for r in seen)
    # a session the receptionist's initialize opened, through raw requests
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}
    session = stack.proxy.session
    async with session.post(stack.url, json=init,
                            headers={**headers, "X-API-Key": "demo-receptionist"}) as r:
        assert r.status == 200
        sid = r.headers["Mcp-Session-Id"]
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    versioned = {**headers, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    async with session.post(stack.url, json=ping,
                            headers={**versioned, "X-API-Key": "demo-nurse"}) as r:
        assert r.status == 404
        doc = orjson.loads(await r.read())
        assert error_of(doc)["data"]["reason_codes"] == ["Mcp_SessionUnknown"]
    async with session.get(stack.url, headers={**versioned, "X-API-Key": "demo-nurse"}) as r:
        assert r.status == 404
    async with session.delete(stack.url,
                              headers={**versioned, "X-API-Key": "demo-nurse"}) as r:
        assert r.status == 404
    async with session.post(stack.url, json=ping,
                            headers={**versioned, "X-API-Key": "demo-receptionist"}) as r:
        assert r.status == 200
    async with session.delete(stack.url,
                              headers={**versioned, "X-API-Key": "demo-receptionist"}) as r:
        assert r.status in (200, 204)
    async with session.post(stack.url, json=ping,  # ended: unknown now
                            headers={**versioned, "X-API-Key": "demo-receptionist"}) as r:
        assert r.status == 404
    pings = [r for r in stack.records() if r["tool"] == "mcp.ping"]
    assert [r["status"] for r in pings] == [404, 200, 404]


async def test_a_session_binding_survives_a_config_reload(stack: Stack) -> None:
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json", "X-API-Key": "demo-nurse"}
    session = stack.proxy.session
    async with session.post(stack.url, json=init, headers=headers) as r:
        sid = r.headers["Mcp-Session-Id"]
    before = stack.proxy.rt.pipeline
    assert await stack.proxy.rt.reload("test")
    assert stack.proxy.rt.pipeline is not before  # a new generation serves now
    ping = {"jsonrpc": "2.0", "id": 2, "method": "ping"}
    async with session.post(stack.url, json=ping, headers={
            **headers, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}) as r:
        assert r.status == 200


# ------------------------------------------------------------ modes


async def test_read_only_denies_writes_and_passes_reads(stack: Stack) -> None:
    await stack.proxy.set_mode("READ_ONLY")
    async with stack.client("receptionist") as client:
        with pytest.raises(MCPError) as caught:
            await client.call_tool("create_appointment", {"patient_id": "p1", "slot": "s"})
        assert isinstance(caught.value.data, dict)
        assert "Mode_ReadOnly_NoWrite" in caught.value.data["reason_codes"]
        assert not (await client.call_tool("list_appointments", {})).is_error
    assert await stack.tool_calls_seen() == ["list_appointments"]


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_kill_switch_lets_a_client_connect_and_denies_tools(stack: Stack,
                                                                  mode: str) -> None:
    await stack.proxy.set_mode("KILL_SWITCH")
    async with stack.client("receptionist", mode) as client:  # the handshake passes
        with pytest.raises(MCPError) as listed:
            await client.list_tools()
        with pytest.raises(MCPError) as called:
            await client.call_tool("list_appointments", {})
    for caught in (listed, called):
        assert isinstance(caught.value.data, dict)
        assert caught.value.data["reason_codes"] == ["Mode_KillSwitch"]
    seen = (await stack.server.seen())["requests"]
    assert not any(r["method"] in ("tools/list", "tools/call") for r in seen)


# ------------------------------------------------------------ state


async def test_the_sms_rate_limit_holds_through_mcp(stack: Stack) -> None:
    async with stack.client("nurse") as client:
        # listed first, so the client sends the Mcp-Param-* headers the server requires
        # on its first call (a call the server refuses still counts against the limit)
        await client.list_tools()
        first = await client.call_tool("send_sms", {"patient_id": "p1", "message": "one"})
        assert not first.is_error
        with pytest.raises(MCPError) as caught:
            await client.call_tool("send_sms", {"patient_id": "p1", "message": "two"})
    envelope = caught.value.data
    assert isinstance(envelope, dict)
    assert envelope["status"] == 429 and envelope["reason_codes"][0] == "RateLimit_Exceeded"
    assert envelope["retry_after"] > 0
    assert len(await stack.server.calls("send_sms")) == 1


async def test_an_idempotency_key_replays_the_answer_with_the_retrys_id(stack: Stack) -> None:
    args = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
    h = {"Mcp-Name": "create_appointment", "Mcp-Param-PatientId": "p1",
         "Idempotency-Key": "k-1"}
    status, _, first = await stack.post(call("create_appointment", args, msg_id=1), headers=h)
    assert status == 200 and first["id"] == 1
    status, headers, again = await stack.post(call("create_appointment", args, msg_id=99),
                                              headers=h)
    assert status == 200 and headers["Idempotent-Replayed"] == "true"
    assert again["id"] == 99 and again["result"] == first["result"]
    assert len(await stack.server.calls("create_appointment")) == 1
    other = {**args, "slot": "2026-11-24T10:00:00Z"}
    status, _, doc = await stack.post(call("create_appointment", other, msg_id=100),
                                      headers=h)
    assert status == 409
    assert error_of(doc)["data"]["reason_codes"] == ["Inv_ReplayPayloadMismatch"]
    # without the header: no replay protection, the call runs again
    del h["Idempotency-Key"]
    for msg_id in (101, 102):
        status, _, _ = await stack.post(call("create_appointment", args, msg_id=msg_id),
                                        headers=h)
        assert status == 200
    assert len(await stack.server.calls("create_appointment")) == 3
    assert any(r["kind"] == "replay" and r["via"] == "mcp" for r in stack.records())


async def test_require_request_id_refuses_a_call_without_the_key(
        tmp_path: Path, mcp_server: McpServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["mcp"][0]["require_request_id"] = True

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        s = Stack(proxy, mcp_server)
        status, _, doc = await s.post(call("list_appointments", {}, msg_id="r"),
                                      headers={"Mcp-Name": "list_appointments"})
        assert status == 400 and doc["id"] == "r"
        assert error_of(doc)["data"]["reason_codes"] == ["BadRequest_MissingRequestId"]
        status, _, doc = await s.post(call("list_appointments", {}, msg_id="u"), key=None,
                                      headers={"Mcp-Name": "list_appointments"})
        assert status == 401  # who is asking comes first
        status, _, doc = await s.post(call("list_appointments", {}, msg_id="b"),
                                      headers={"Mcp-Name": "list_appointments",
                                               "Idempotency-Key": "k" * 300})
        assert status == 400
        assert error_of(doc)["data"]["reason_codes"] == ["BadRequest_InvalidRequestId"]
        status, _, _ = await s.post(call("list_appointments", {}, msg_id="r"),
                                    headers={"Mcp-Name": "list_appointments",
                                             "Idempotency-Key": "k"})
        assert status == 200
        assert await s.tool_calls_seen() == ["list_appointments"]


async def test_redis_down_fails_writes_closed_and_passes_reads(
        tmp_path: Path, mcp_server: McpServer, redis_server: RedisServer) -> None:
    async with make_stack(tmp_path, mcp_server, REDIS_URL=redis_server.url) as proxy:
        s = Stack(proxy, mcp_server)
        async with s.client("nurse") as client:
            await client.list_tools()
            assert not (await client.call_tool("send_sms", {"patient_id": "p1",
                                                            "message": "up"})).is_error
            redis_server.stop()
            with pytest.raises(MCPError) as caught:
                await client.call_tool("send_sms", {"patient_id": "p2", "message": "down"})
            envelope = caught.value.data
            assert isinstance(envelope, dict)
            assert envelope["status"] == 503 and envelope["reason_codes"][0] == "FAIL_CLOSED"
            assert envelope["retry_after"] >= 1
            assert not (await client.call_tool("list_appointments", {})).is_error
        status, _, doc = await s.post(
            call("create_appointment", {"patient_id": "p1", "slot": "s"}, msg_id=2),
            key="receptionist", headers={"Mcp-Name": "create_appointment",
                                         "Mcp-Param-PatientId": "p1", "Idempotency-Key": "k2"})
        assert status == 503 and "Inv_ReplayCheckUnavailable" in error_of(doc)["data"][
            "reason_codes"]
        assert [c["tool"] for c in await mcp_server.calls()] == ["send_sms",
                                                                 "list_appointments"]


async def test_no_audit_record_no_forward(tmp_path: Path, mcp_server: McpServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["audit"]["timeout_ms"] = 300

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        s = Stack(proxy, mcp_server)
        locker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            status, headers, doc = await s.post(call("list_appointments", {}, msg_id=1),
                                                headers={"Mcp-Name": "list_appointments"})
            assert status == 503 and headers["Retry-After"] == "1"
            assert error_of(doc)["code"] == -32010
            assert error_of(doc)["data"]["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
            assert error_of(doc)["data"]["retry_after"] == 1
            status, _, doc = await s.post(None, raw=b"[]")  # a refusal that cannot be recorded
            assert status == 503
            assert error_of(doc)["data"]["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        assert (await mcp_server.seen())["requests"] == []


# ------------------------------------------------------------ one policy, two doors


async def test_one_policy_decides_a_rest_route_and_the_mcp_tool_alike(
        tmp_path: Path, mcp_server: McpServer) -> None:
    """The same tool behind a REST route and an MCP tool: the same policy input
    (tool, effect, role, subject, args, context), the same decision."""
    def patch(d: dict[str, Any]) -> None:
        d["routes"] = [{"method": "POST", "path": "/sms", "tool": "twilio.send_sms",
                        "effect": "write",
                        "attributes": {
                            "subject.patient_id": {"from": "body", "pointer": "/patient_id"},
                            "args.message": {"from": "body", "pointer": "/message"}},
                        "required": ["subject.patient_id"]}]
        d["rate_limits"] = []

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        s = Stack(proxy, mcp_server)
        for n, role in enumerate(["nurse", "billing", "receptionist", "doctor"]):
            args = {"patient_id": f"p{n}", "message": "hello"}
            rest, _, _ = await proxy.call("POST", "/sms", key=role, json=args,
                                          rid=f"rest-{n}")
            status, _, doc = await s.post(call("send_sms", args, msg_id=n), key=role,
                                          headers={"Mcp-Name": "send_sms",
                                                   "Mcp-Param-PatientId": f"p{n}"})
            # allowed: forwarded (the MCP server has no /sms: 404); denied: 403 both ways
            assert (rest, status) in ((404, 200), (403, 403)), (role, rest, status, doc)
        decisions = [r for r in s.records() if r["kind"] == "decision"]
        by_door: dict[str, list[tuple[Any, ...]]] = {"proxy": [], "mcp": []}
        for r in decisions:  # tool, effect, role, mode and the attributes the policy saw
            by_door[r["via"]].append((r["tool"], r["effect"], r["role"], r["mode"],
                                      r["decision"], tuple(r["reason_codes"]),
                                      orjson.dumps(r["attrs"], option=orjson.OPT_SORT_KEYS)))
        assert by_door["proxy"] == by_door["mcp"] and len(by_door["mcp"]) == 4
        assert {d[4] for d in by_door["mcp"]} == {"ALLOW", "DENY"}


# ------------------------------------------------------------ config


def test_config_refuses_an_endpoint_on_a_route_path(tmp_path: Path) -> None:
    from proxy.config import ConfigError, load_config
    from proxy.settings import Environment

    def patch(d: dict[str, Any]) -> None:
        d["routes"] = [{"method": "POST", "path": "/mcp", "tool": "x", "effect": "read"}]

    with pytest.raises(ConfigError, match=r"mcp\[0\]\.path.*routes\[0\]"):
        load_config(mcp_config(tmp_path, patch), Environment({}))

    def passthrough(d: dict[str, Any]) -> None:
        d["unmatched"] = {"passthrough": ["/"]}

    with pytest.raises(ConfigError, match=r"mcp\[0\]\.path.*passthrough"):
        load_config(mcp_config(tmp_path, passthrough), Environment({}))

    def effect(d: dict[str, Any]) -> None:
        d["routes"] = [{"method": "POST", "path": "/sms", "tool": "twilio.send_sms",
                        "effect": "read"}]

    with pytest.raises(ConfigError, match=r"mcp\[0\]\.tools\.send_sms\.effect"):
        load_config(mcp_config(tmp_path, effect), Environment({}))

    def bad_key(d: dict[str, Any]) -> None:
        d["mcp"][0]["deny_as"] = "shrug"

    with pytest.raises(ConfigError, match=r"mcp\[0\]\.deny_as"):
        load_config(mcp_config(tmp_path, bad_key), Environment({}))


def test_a_list_query_the_policy_does_not_define_is_refused_at_load(tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.policy_regorus import PolicyQueryError, RegorusEngine
    from proxy.settings import Environment

    def patch(d: dict[str, Any]) -> None:
        d["mcp"][0]["list_query"] = "data.casf.shown"

    cfg = load_config(mcp_config(tmp_path, patch), Environment({}))
    assert cfg.policy.documents == ("data.casf.shown",)
    with pytest.raises(PolicyQueryError, match=r"data\.casf\.shown names no rule"):
        RegorusEngine(cfg.policy)
    good = load_config(mcp_config(tmp_path, lambda d: None), Environment({}))
    RegorusEngine(good.policy).close()


async def test_an_endpoint_only_config_forwards_nothing_else(stack: Stack) -> None:
    status, _, body = await stack.proxy.call("GET", "/appointments")
    assert status == 403 and b"Route_NotMapped" in body
    status, _, body = await stack.proxy.call("PUT", "/mcp", data=b"{}")
    assert status == 405
    assert (await stack.server.seen())["requests"] == []



# ------------------------------------------------------------ approvals


async def test_a_tool_call_waits_for_an_approval_and_runs_once(tmp_path: Path,
                                                               mcp_server: McpServer) -> None:
    """STEP_UP: an agent's write gets the approval's id in the JSON-RPC error's
    envelope; once a custodian approves, the same call (same Idempotency-Key and
    arguments, a new JSON-RPC id) runs once; the retry after it is the stored answer."""
    def patch(d: dict[str, Any]) -> None:
        d["approvals"] = {"approver_roles": ["custodian"], "four_eyes": True}

    async with make_stack(tmp_path, mcp_server, patch) as proxy:
        stack = Stack(proxy, mcp_server)
        await proxy.set_mode("STEP_UP")
        args = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
        h = {"Mcp-Name": "create_appointment", "Mcp-Param-PatientId": "p1",
             "Idempotency-Key": "ap-mcp-1"}
        status, _, doc = await stack.post(call("create_appointment", args, msg_id=1), headers=h)
        err = error_of(doc)
        assert status == 403 and err["code"] == -32010
        assert err["data"]["decision"] == "NEEDS_APPROVAL"
        approval = err["data"]["approval"]
        assert approval["status"] == "pending" and approval["id"].startswith("apr_")
        assert await stack.server.calls("create_appointment") == []
        async with proxy.session.post(
                f"{proxy.admin}/approvals/{approval['id']}/approve",
                headers={"X-API-Key": "demo-custodian"}) as r:
            assert r.status == 200
        status, _, done = await stack.post(call("create_appointment", args, msg_id=2), headers=h)
        assert status == 200 and done["id"] == 2 and "result" in done, done
        status, headers, again = await stack.post(call("create_appointment", args, msg_id=3),
                                                  headers=h)
        assert status == 200 and headers["Idempotent-Replayed"] == "true" and again["id"] == 3
        assert len(await stack.server.calls("create_appointment")) == 1
        actions = [(r["action"], r["via"]) for r in stack.records() if r["kind"] == "approval"]
        assert actions == [("created", "mcp"), ("approved", "admin"), ("used", "mcp")]
