"""WebSocket routes through the real proxy: a real aiohttp WebSocket upstream and client.

The upgrade is decided like any request (denied ones never reach the
upstream), messages are relayed both ways, the close is the outcome record,
an oversized message closes the session with 1009, and an Upgrade on any other
route is 400 ``BadRequest_UpgradeNotAllowed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from proxy.app import graceful_stop
from proxy.config import ConfigError, load_config
from proxy.tasks import spawn
from tests.audit_rows import all_records
from tests.conftest import KEYS, Proxy, Upstream, clinic_env, start_proxy, write_config
from tests.waiting import wait_event, wait_until

LIMIT = 4096  # limits.websocket_max_message_bytes in these tests
WS_ROUTE = {"method": "GET", "path": "/ws/appointments", "tool": "cliniccloud.list_appointments",
            "effect": "read", "websocket": True}


@dataclass
class WsUpstream:
    """An aiohttp server with a WebSocket endpoint that echoes, and plain routes."""

    url: str = ""
    handshakes: list[CIMultiDict[str]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)
    received: list[tuple[str, Any]] = field(default_factory=list)
    closed_with: list[int | None] = field(default_factory=list)
    session_ended: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        async def ws(request: web.Request) -> web.StreamResponse:
            self.handshakes.append(CIMultiDict(request.headers))
            self.targets.append(request.raw_path)
            resp = web.WebSocketResponse(protocols=("chat.v2",),
                                         max_msg_size=10 * LIMIT)
            await resp.prepare(request)
            try:
                async for msg in resp:
                    if msg.type is WSMsgType.TEXT:
                        self.received.append(("text", msg.data))
                        if msg.data == "close-please":
                            await resp.close(code=4001, message=b"asked to")
                            break
                        if msg.data == "send-big":
                            await resp.send_bytes(b"u" * (LIMIT + 1))
                            continue
                        if msg.data == "protocol":
                            await resp.send_str(resp.ws_protocol or "")
                            continue
                        await resp.send_str("echo:" + msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        self.received.append(("binary", msg.data))
                        await resp.send_bytes(bytes(reversed(msg.data)))
            finally:
                self.closed_with.append(resp.close_code)
                self.session_ended.set()
            return resp

        async def plain(request: web.Request) -> web.Response:
            self.plain.append(request.path)
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/ws/{tail:.*}", ws)
        app.router.add_route("*", "/{tail:.*}", plain)
        return app


@contextlib.asynccontextmanager
async def run_ws_upstream() -> AsyncIterator[WsUpstream]:
    state = WsUpstream()
    runner = web.AppRunner(state.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


def ws_patch(extra: Callable[[dict[str, Any]], None] = lambda d: None
             ) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append(dict(WS_ROUTE))
        d.setdefault("limits", {})["websocket_max_message_bytes"] = LIMIT
        extra(d)
    return patch


@contextlib.asynccontextmanager
async def ws_proxy(tmp_path: Path, upstream_url: str,
                   extra: Callable[[dict[str, Any]], None] = lambda d: None
                   ) -> AsyncIterator[Proxy]:
    path = write_config(tmp_path, ws_patch(extra))
    async with start_proxy(path, clinic_env(upstream_url, tmp_path), Upstream(url=upstream_url)
                           ) as p:
        yield p


def records(p: Proxy) -> list[dict[str, Any]]:
    return all_records(p.cfg.audit.sqlite_path)


async def outcome_of(p: Proxy, decision: dict[str, Any]) -> dict[str, Any]:
    """The outcome record referring to ``decision`` (queued when the session closed)."""
    async def found() -> dict[str, Any]:  # empty: not yet
        await p.rt.pipeline.flush()
        for r in records(p):
            if r["kind"] == "outcome" and r.get("ref") == decision["event_id"]:
                return r
        return {}

    record: dict[str, Any] = await wait_until(found, "the session's outcome record")
    return record


def ws_decisions(p: Proxy) -> list[dict[str, Any]]:
    return [r for r in records(p) if r["kind"] == "decision" and r["route"] == "/ws/appointments"]


def key(role: str) -> dict[str, str]:
    return {"X-API-Key": KEYS[role]}


async def test_messages_both_ways_and_the_close_is_the_outcome(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments?patient_id=p1",
                                        headers={**key("receptionist"),
                                                 "Origin": "https://app.example"},
                                        protocols=("chat.v1", "chat.v2")) as ws:
            # the client prefers v1, the upstream speaks only v2: its choice is passed back
            assert ws.protocol == "chat.v2"
            await ws.send_str("héllo")
            assert (await ws.receive()).data == "echo:héllo"
            await ws.send_bytes(b"\x00\x01\x02")
            assert (await ws.receive()).data == b"\x02\x01\x00"
            await ws.send_str("protocol")
            assert (await ws.receive()).data == "chat.v2"
            await ws.close(code=1000)
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1000]
        assert up.received == [("text", "héllo"), ("binary", b"\x00\x01\x02"),
                               ("text", "protocol")]
        assert up.targets == ["/ws/appointments?patient_id=p1"]  # the target as decided
        (seen,) = up.handshakes
        # the forward's header rewriting: the credential is consumed, the proxy's
        # X-Forwarded-* and trace context added, the Origin passed on
        assert "X-API-Key" not in seen and seen["Origin"] == "https://app.example"
        assert seen["X-Forwarded-For"] == "127.0.0.1" and "traceparent" in seen
        assert seen["Sec-WebSocket-Protocol"] == "chat.v1,chat.v2"
        assert "Sec-WebSocket-Extensions" not in seen  # nothing is inflated
        (decision,) = ws_decisions(p)
        assert (decision["decision"], decision["tool"], decision["via"]) == (
            "ALLOW", "cliniccloud.list_appointments", "proxy")
        out = await outcome_of(p, decision)
        assert out["status"] == 101 and out["websocket"] is True
        assert (out["client_messages"], out["client_bytes"]) == (3, len("héllo".encode()) + 3 + 8)
        assert (out["upstream_messages"], out["upstream_bytes"]) == (
            3, len("echo:héllo".encode()) + 3 + len("chat.v2"))
        assert (out["close_code"], out["closed_by"], out["close_reason"]) == (
            1000, "client", "closed")
        assert out["duration_ms"] >= 0 and out["attrs"] is None  # in the decision record


async def test_the_upstream_closing_first_is_passed_on(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            await ws.send_str("close-please")
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE
            assert (msg.data, msg.extra) == (4001, "asked to")
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["close_code"], out["closed_by"], out["close_reason"]) == (
            4001, "upstream", "closed")
        assert (out["client_messages"], out["upstream_messages"]) == (1, 0)


async def test_the_client_vanishing_closes_the_upstream_side(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        ws = await p.session.ws_connect(p.url + "/ws/appointments", headers=key("nurse"))
        await ws.send_str("one")
        assert (await ws.receive()).data == "echo:one"
        # the TCP connection goes away without a close frame
        transport = ws._response.connection.transport  # type: ignore[union-attr]
        assert transport is not None
        transport.abort()
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1001]  # going away
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["closed_by"], out["close_reason"]) == ("client", "connection_lost")
        await ws.close()


async def test_an_oversized_message_closes_with_1009(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse"), max_msg_size=0) as ws:
            await ws.send_bytes(b"x" * LIMIT)  # at the limit: relayed
            assert len((await ws.receive()).data) == LIMIT
            await ws.send_bytes(b"y" * (LIMIT + 1))
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and msg.data == 1009
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1001]
        assert [len(d) for _, d in up.received] == [LIMIT]  # the oversized one never arrived
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["close_code"], out["closed_by"], out["close_reason"]) == (
            1009, "proxy", "client_message_too_big")
        assert (out["client_messages"], out["client_bytes"]) == (1, LIMIT)


async def test_an_oversized_upstream_message_closes_both_sides(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            await ws.send_str("send-big")
            msg = await ws.receive()
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1009]
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["close_code"], out["close_reason"]) == (1009, "upstream_message_too_big")
        assert out["upstream_messages"] == 0


async def test_an_idle_session_is_closed(tmp_path: Path) -> None:
    def idle(d: dict[str, Any]) -> None:
        d["limits"]["websocket_idle_timeout_ms"] = 200

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, idle) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            msg = await ws.receive(timeout=10)  # nothing is sent: the proxy closes
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1001]
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["closed_by"], out["close_reason"]) == ("proxy", "idle_timeout")
        assert (out["client_messages"], out["upstream_messages"]) == (0, 0)


async def handshake(p: Proxy, path: str, headers: dict[str, str]
                    ) -> tuple[int, dict[str, Any]]:
    """A WebSocket opening handshake that the proxy refuses: status and envelope."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await p.session.ws_connect(p.url + path, headers=headers)
    assert caught.value.headers is not None
    assert caught.value.headers["Content-Type"].startswith("application/json")
    async with p.session.get(p.url + path, headers={
            **headers, "Connection": "Upgrade", "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            ) as r:
        assert r.status == caught.value.status
        return r.status, json.loads(await r.read())


async def test_denied_upgrades_never_reach_the_upstream(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        status, env = await handshake(p, "/ws/appointments", key("billing"))
        assert (status, env["reason_codes"]) == (403, ["Role_NotPermitted"])
        status, env = await handshake(p, "/ws/appointments", {})
        assert (status, env["reason_codes"]) == (401, ["Auth_Missing"])
        status, env = await handshake(p, "/ws/appointments", {"X-API-Key": "nope"})
        assert (status, env["reason_codes"]) == (401, ["Auth_Invalid"])
        # an Upgrade on any other route: refused, never stripped and forwarded
        status, env = await handshake(p, "/appointments", key("receptionist"))
        assert (status, env["reason_codes"]) == (400, ["BadRequest_UpgradeNotAllowed"])
        assert up.handshakes == [] and up.plain == []
        decisions = [r for r in records(p) if r["kind"] == "decision"]
        assert [(r["status"], r["decision"]) for r in decisions] == [
            (403, "DENY"), (403, "DENY"), (401, "DENY"), (401, "DENY"), (401, "DENY"),
            (401, "DENY"), (400, "DENY"), (400, "DENY")]
        assert not [r for r in records(p) if r["kind"] == "outcome"]


async def test_upgrade_header_rules(tmp_path: Path) -> None:
    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url) as p:
        # any Upgrade on a plain route, websocket or not (h2c), even without Connection
        for upgrade in ("websocket", "h2c"):
            async with p.session.get(p.url + "/appointments",
                                     headers={**key("receptionist"), "Upgrade": upgrade}) as r:
                env = json.loads(await r.read())
                assert (r.status, env["reason_codes"]) == (400, ["BadRequest_UpgradeNotAllowed"])
        # a plain request on a websocket route: 426, with the protocol to upgrade to
        async with p.session.get(p.url + "/ws/appointments", headers=key("nurse")) as r:
            env = json.loads(await r.read())
            assert (r.status, env["reason_codes"]) == (426, ["BadRequest_UpgradeRequired"])
            assert r.headers["Upgrade"] == "websocket"
        # an Upgrade on the websocket route that is not a valid WebSocket handshake
        for bad in ({"Upgrade": "h2c", "Connection": "Upgrade"},
                    {"Upgrade": "websocket", "Connection": "Upgrade",
                     "Sec-WebSocket-Version": "8", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="},
                    {"Upgrade": "websocket", "Connection": "Upgrade",
                     "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "c2hvcnQ="}):
            async with p.session.get(p.url + "/ws/appointments",
                                     headers={**key("nurse"), **bad}) as r:
                env = json.loads(await r.read())
                assert (r.status, env["reason_codes"]) == (400, ["BadRequest_UpgradeNotAllowed"])
        assert up.handshakes == [] and up.plain == []


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_unreachable_is_a_502_envelope_before_the_upgrade(tmp_path: Path
                                                                         ) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with ws_proxy(tmp_path, url) as p:
        status, env = await handshake(p, "/ws/appointments", key("nurse"))
        assert (status, env["reason_codes"]) == (502, ["Upstream_Unavailable"])
        assert env["decision"] == "DENY" and env["tool"] == "cliniccloud.list_appointments"
        await p.rt.pipeline.flush()
        outcomes = [r for r in records(p) if r["kind"] == "outcome"]
        allowed = [r for r in ws_decisions(p) if r["decision"] == "ALLOW"]
        assert len(allowed) == 2  # the ALLOW was committed before trying, as for a forward
        assert sorted(o["ref"] for o in outcomes) == sorted(r["event_id"] for r in allowed)
        assert {o["status"] for o in outcomes} == {502}


async def test_an_upstream_refusing_the_upgrade_is_a_502(tmp_path: Path) -> None:
    async with run_ws_upstream() as up:
        def route_to_plain(d: dict[str, Any]) -> None:
            d["routes"].append({**WS_ROUTE, "path": "/plain-ws"})

        async with ws_proxy(tmp_path, up.url, route_to_plain) as p:
            # the upstream serves /plain-ws as a plain route: 200, no 101
            status, env = await handshake(p, "/plain-ws", key("nurse"))
            assert (status, env["reason_codes"]) == (502, ["Upstream_Unavailable"])
            assert "HTTP 200" in env["message"]
            await p.rt.pipeline.flush()
            outcomes = [r for r in records(p) if r["kind"] == "outcome"]
            assert [o.get("upstream_status") for o in outcomes] == [200, 200]


async def test_an_upgrade_on_a_passthrough_path_is_refused(tmp_path: Path) -> None:
    def passthrough(d: dict[str, Any]) -> None:
        d["unmatched"]["passthrough"] = ["/public/"]

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, passthrough) as p:
        async with p.session.get(p.url + "/public/x") as r:
            assert r.status == 200  # passthrough itself works
        async with p.session.get(p.url + "/public/x", headers={"Upgrade": "websocket",
                                                               "Connection": "Upgrade"}) as r:
            env = json.loads(await r.read())
            assert (r.status, env["reason_codes"]) == (400, ["BadRequest_UpgradeNotAllowed"])
        assert up.plain == ["/public/x"]


async def test_a_session_ends_at_its_maximum_duration(tmp_path: Path) -> None:
    def short(d: dict[str, Any]) -> None:
        d["limits"]["websocket_max_duration_ms"] = 300

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, short) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            sent = 0
            while True:  # never idle: only the overall bound can end it
                await ws.send_str(f"m{sent}")
                sent += 1
                msg = await ws.receive(timeout=10)
                if msg.type is not WSMsgType.TEXT:
                    break
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["closed_by"], out["close_reason"]) == ("proxy", "max_duration")
        assert out["client_messages"] in (sent, sent - 1)  # the last may have been cut off


async def test_shutdown_closes_open_sessions_and_records_them(tmp_path: Path) -> None:
    def quick(d: dict[str, Any]) -> None:
        d["shutdown"] = {"delay_ms": 0, "drain_timeout_ms": 10_000}

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, quick) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            await ws.send_str("one")
            assert (await ws.receive()).data == "echo:one"
            # SIGTERM's sequence: once the listener stops accepting, the sessions are
            # closed (the drain would otherwise wait for them to its end, 10 s here,
            # then cut them off without a close frame)
            stopping = spawn(graceful_stop(p.rt, p.serving))
            msg = await ws.receive(timeout=10)
            assert msg.type is WSMsgType.CLOSE and msg.data == 1001
            await stopping
        await wait_event(up.session_ended, "the upstream session to end")
        assert up.closed_with == [1001]
        (decision,) = ws_decisions(p)
        out = await outcome_of(p, decision)
        assert (out["closed_by"], out["close_reason"], out["close_code"]) == (
            "proxy", "shutdown", 1001)


async def test_a_write_session_cannot_be_opened_twice_under_one_request_id(tmp_path: Path
                                                                          ) -> None:
    def write_route(d: dict[str, Any]) -> None:
        d["routes"][-1] = {**WS_ROUTE, "path": "/ws/book", "effect": "write",
                           "tool": "cliniccloud.create_appointment"}

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, write_route) as p:
        status, env = await handshake(p, "/ws/book", key("receptionist"))
        assert (status, env["reason_codes"]) == (400, ["BadRequest_MissingRequestId"])
        headers = {**key("receptionist"), "Idempotency-Key": "session-1"}
        async with p.session.ws_connect(p.url + "/ws/book", headers=headers) as ws:
            await ws.send_str("one")
            assert (await ws.receive()).data == "echo:one"
        await wait_event(up.session_ended, "the upstream session to end")
        status, env = await handshake(p, "/ws/book", headers)
        assert (status, env["reason_codes"]) == (409, ["Inv_ReplayConcurrent"])
        assert len(up.handshakes) == 1
        headers["Idempotency-Key"] = "session-2"
        async with p.session.ws_connect(p.url + "/ws/book", headers=headers) as ws:
            await ws.send_str("two")
            assert (await ws.receive()).data == "echo:two"
        assert len(up.handshakes) == 2


@pytest.mark.parametrize(("change", "problem"), [
    ({"method": "POST"}, "routes[{i}].method: a websocket route is opened with GET, not POST"),
    ({"attributes": {"args.x": {"from": "body", "pointer": "/x"}}},
     "routes[{i}].attributes: a WebSocket upgrade has no body"),
    ({"websocket": "sometimes"}, "routes[{i}].websocket: expected true or false"),
])
def test_websocket_route_config_is_checked(tmp_path: Path, change: dict[str, Any],
                                           problem: str) -> None:
    index: list[int] = []

    def patch(d: dict[str, Any]) -> None:
        d["routes"][-1].update(change)
        index.append(len(d["routes"]) - 1)

    path = write_config(tmp_path, ws_patch(patch))
    with pytest.raises(ConfigError) as info:
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))
    assert problem.format(i=index[0]) in str(info.value), str(info.value)


def test_websocket_limits_are_read(tmp_path: Path) -> None:
    def limits(d: dict[str, Any]) -> None:
        d["limits"].update(websocket_idle_timeout_ms=1500, websocket_max_duration_ms=60_000)

    cfg = load_config(write_config(tmp_path, ws_patch(limits)),
                      clinic_env("http://127.0.0.1:1", tmp_path))
    lim = cfg.limits
    assert (lim.websocket_max_message_bytes, lim.websocket_idle_timeout_s,
            lim.websocket_max_duration_s) == (LIMIT, 1.5, 60.0)
    assert cfg.routes[-1].websocket and not any(r.websocket for r in cfg.routes[:-1])


async def test_a_session_holds_a_pool_slot(tmp_path: Path) -> None:
    def one_slot(d: dict[str, Any]) -> None:
        d["upstream"].update(pool_size=1, pool_timeout_ms=100)

    async with run_ws_upstream() as up, ws_proxy(tmp_path, up.url, one_slot) as p:
        async with p.session.ws_connect(p.url + "/ws/appointments",
                                        headers=key("nurse")) as ws:
            await ws.send_str("one")
            assert (await ws.receive()).data == "echo:one"
            status, env = await handshake(p, "/ws/appointments", key("nurse"))
            assert (status, env["reason_codes"]) == (503, ["Upstream_Busy"])
        await wait_event(up.session_ended, "the upstream session to end")

        async def slot_free() -> bool:  # the slot is given back when the session ends
            async with p.session.get(p.url + "/appointments", headers=key("nurse")) as r:
                return r.status == 200

        freed: bool = await wait_until(slot_free, "the pool slot back after the session")
        assert freed and len(up.handshakes) == 1


async def test_an_upstream_that_never_answers_the_upgrade_is_a_504(tmp_path: Path) -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads the handshake, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    def fast(d: dict[str, Any]) -> None:
        d["upstream"]["timeout_ms"] = 300

    try:
        async with ws_proxy(tmp_path, f"http://127.0.0.1:{port}", fast) as p:
            status, env = await handshake(p, "/ws/appointments", key("nurse"))
            assert (status, env["reason_codes"]) == (504, ["Upstream_Timeout"])
            await p.rt.pipeline.flush()
            assert {r["status"] for r in records(p) if r["kind"] == "outcome"} == {504}
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
