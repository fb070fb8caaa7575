"""Second attack run: what reached the upstream that should not have, and how.

Each family is tested whole, against a real upstream that records the exact
bytes it received (the raw request target, every header name as sent):

* encoded reserved characters in the path, and escapes in the query, reach
  the upstream exactly as decided on (never re-encoded or decoded);
* method-override headers under every ``_``/``-``/case spelling, and
  ``_method`` in a JSON body however it is escaped, are refused;
* every client-address header spelling is dropped;
* a write is never sent twice when a reused keep-alive connection dies;
* a client that goes away stops the relay and frees the upstream connection,
  and a wait for a pool slot is reported as such, not as a connect timeout;
* parse errors on the admin listener never echo or log the offending bytes;
* the request log and metrics count what the client was sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.audit_rows import all_records
from tests.conftest import ADMIN_TOKEN, Proxy, Upstream, clinic_env, start_proxy, write_config
from tests.rawhttp import one, request

RECEPTIONIST = ("X-API-Key", "demo-receptionist")
JSON = ("Content-Type", "application/json")
APPT = b'{"patient_id":"p1","slot":"2026-11-23T10:00:00Z"}'


# ------------------------------------------------------------------ the upstream


class Recorder(Upstream):
    """Records the raw target and header names; ``/appointments?mode=...`` streams."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_targets: list[str] = []
        self.header_names: list[list[str]] = []
        self.streams_open = 0
        self.streams_closed = 0
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()


def recorder_app(state: Recorder) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        state.raw_targets.append(request.raw_path)
        state.header_names.append([k.decode("latin-1") for k, _ in request.raw_headers])
        mode = request.query.get("mode")
        state.arrived.set()
        if mode == "slow-stream":
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            state.streams_open += 1
            try:
                for _ in range(600):  # at most 60 s, far beyond any test's wait
                    await resp.write(b"x" * 1024)
                    await asyncio.sleep(0.1)
            except (ConnectionError, asyncio.CancelledError):
                state.streams_closed += 1
                raise
            return resp
        if mode == "hold":
            await state.release.wait()
        return web.json_response({"ok": True, "body": len(body)},
                                 status=201 if request.method == "POST" else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@contextlib.asynccontextmanager
async def run_recorder() -> AsyncIterator[Recorder]:
    state = Recorder()
    runner = web.AppRunner(recorder_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


@contextlib.asynccontextmanager
async def proxied(tmp_path: Path, patch: Callable[[dict[str, Any]], None] = lambda d: None
                  ) -> AsyncIterator[tuple[Proxy, Recorder]]:
    async with run_recorder() as up:
        cfg = write_config(tmp_path, patch)
        async with start_proxy(cfg, clinic_env(up.url, tmp_path), up) as proxy:
            yield proxy, up


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"not reached in time: {what}"
        await asyncio.sleep(0.01)


def records(p: Proxy) -> list[dict[str, Any]]:
    return all_records(p.cfg.audit.sqlite_path)


def port(p: Proxy) -> int:
    return p.serving.traffic_port


# ------------------------------------------------------------------ 1. exact target

RESERVED = ["%3B", "%40", "%3A", "%21", "%24", "%26", "%27", "%28", "%29", "%2A", "%2B",
            "%2C", "%3D", "%3b", "%3a", "%2c", "%5B", "%5D", "%7C", "%22", "%3C", "%3E",
            "%60", "%7B", "%7D", "%5E", "%25", "%20", "%C3%A9", "%3F"]


async def test_encoded_reserved_characters_reach_the_upstream_as_decided(tmp_path: Path
                                                                           ) -> None:
    async with proxied(tmp_path) as (p, up):
        for esc in RESERVED:
            target = f"/patients/p1{esc}jsessionid=x/history"
            before = len(up.raw_targets)
            resp = await one(port(p), request("GET", target, [("X-API-Key", "demo-doctor")]))
            if resp.status != 200:
                # refused (e.g. the double-encoding guard on %25): nothing reached it
                assert resp.status == 400, (esc, resp.status, resp.body)
                assert len(up.raw_targets) == before
                continue
            # hex digits upper-cased, nothing decoded or re-encoded
            expected = f"/patients/p1{esc.upper()}jsessionid=x/history"
            assert up.raw_targets[-1] == expected, esc


async def test_the_decision_sees_the_decoded_value_the_upstream_will_decode(tmp_path: Path
                                                                            ) -> None:
    seen: list[Any] = []

    def patch(d: dict[str, Any]) -> None:
        d["audit"]["redact"] = {}

    async with proxied(tmp_path, patch) as (p, up):
        resp = await one(port(p), request("GET", "/patients/p1%3Bjsessionid=x/history",
                                          [("X-API-Key", "demo-doctor")]))
        assert resp.status == 200
        assert up.raw_targets[-1] == "/patients/p1%3Bjsessionid=x/history"
        await p.rt.pipeline.flush()
        seen = [r["attrs"] for r in records(p) if r["kind"] == "decision"]
        assert {"patient_id": "p1;jsessionid=x"} in [a.get("subject") for a in seen]


QUERIES = ["a=%41%42", "q=%7E%2D%2E%5F", "x=a+b", "x=%2B", "x=1&x=2", "x=%26y%3D1",
           "x=%C3%A9", "x=a;b", "x=%3B", "x", "x=", "=x", "x=%25%34%31"]


async def test_the_query_is_kept_byte_for_byte(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (p, up):
        for query in QUERIES:
            target = f"/appointments?{query}"
            resp = await one(port(p), request("GET", target, [RECEPTIONIST]))
            if resp.status == 400:
                continue  # refused outright (e.g. _method lookalikes): nothing to compare
            assert resp.status == 200, (query, resp.body)
            assert up.raw_targets[-1] == target, query


# ------------------------------------------------------------------ 2. overrides

OVERRIDE_NAMES = ["X-HTTP-Method-Override", "X_HTTP_Method_Override", "X-Http-Method",
                  "X_HTTP_Method", "x_method_override", "X-METHOD-OVERRIDE", "X_Method-Override",
                  "x-http_method-override", "X-Original-URL", "X_Original_URL", "x_rewrite_url"]


@pytest.mark.parametrize("name", OVERRIDE_NAMES)
async def test_override_headers_in_every_spelling_are_refused(tmp_path: Path, name: str
                                                              ) -> None:
    async with proxied(tmp_path) as (p, up):
        resp = await one(port(p), request("GET", "/appointments",
                                          [RECEPTIONIST, (name, "DELETE")]))
        assert resp.status == 400 and "BadRequest_Ambiguous" in resp.reasons
        assert up.raw_targets == []


JSON_OVERRIDES = [b'{"_method":"DELETE","patient_id":"p1"}',
                  b'{"patient_id":"p1","_METHOD":"DELETE"}',
                  b'{"\\u005fmethod":"DELETE","patient_id":"p1"}',
                  b'{"_\\u006dethod":"DELETE","patient_id":"p1"}',
                  b' \n{"_method ":"PUT","patient_id":"p1"}']


async def test_method_override_in_a_json_body_is_refused(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (p, up):
        for n, body in enumerate(JSON_OVERRIDES):
            for ctype in ("application/json", "application/vnd.api+json", "text/plain"):
                resp = await one(port(p), request(
                    "POST", "/appointments",
                    [RECEPTIONIST, ("Content-Type", ctype), ("Idempotency-Key", f"o-{n}-{ctype}")],
                    body))
                assert resp.status == 400, (body, ctype, resp.body)
                assert "BadRequest_Ambiguous" in resp.reasons
        # a nested _method is a value of the tool's, not a parameter: it passes
        ok = await one(port(p), request(
            "POST", "/appointments", [RECEPTIONIST, JSON, ("Idempotency-Key", "nested")],
            b'{"patient_id":"p1","slot":"s","meta":{"_method":"x"}}'))
        assert ok.status == 201
        assert len(up.raw_targets) == 1


# ------------------------------------------------------------------ 3. client address

ADDRESS_HEADERS = ["Client-IP", "X-Cluster-Client-IP", "X-Originating-IP", "X-Remote-IP",
                   "X-Remote-Addr", "CF-Connecting-IP", "Fastly-Client-IP", "X-Forwarded",
                   "Forwarded-For", "X-ProxyUser-Ip", "X-Real-IP", "True-Client-IP",
                   "X-Client-IP", "Forwarded", "X-Forwarded-Host", "X-Forwarded-Port",
                   "X_Real_IP", "x_forwarded_for_original", "X-Original-Forwarded-For",
                   "X-Envoy-External-Address", "X-Forwarded-Client-Cert", "Via-Client-IP"]


async def test_every_client_address_header_is_dropped(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (p, up):
        headers = [RECEPTIONIST, *((name, "10.9.9.9") for name in ADDRESS_HEADERS)]
        resp = await one(port(p), request("GET", "/appointments", headers))
        assert resp.status == 200
        names = {n.lower().replace("_", "-") for n in up.header_names[-1]}
        for name in ADDRESS_HEADERS:
            canon = name.lower().replace("_", "-")
            if canon == "x-forwarded-host":  # the proxy's own value replaces it
                continue
            assert canon not in names, name


# ------------------------------------------------------------------ 4. admin listener


async def test_admin_parse_errors_echo_and_log_nothing(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "Bearer " + ADMIN_TOKEN
    async with proxied(tmp_path) as (p, _):
        admin = p.serving.admin_port
        raw = [
            b"GET /admin/mode HTTP/1.1\r\nHost: a\r\nAuthorization: " + secret.encode()
            + b"\x01\r\n\r\n",
            b"GET /admin/mode HTTP/1.1\r\nHost: a\r\nX-Bad\x00Name: " + secret.encode()
            + b"\r\n\r\n",
            b"GET /admin/mode HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n"
            b"Transfer-Encoding: chunked\r\nAuthorization: " + secret.encode() + b"\r\n\r\n",
            b"GET /admin/mode HTTP/1.1\r\nHost: a\r\n Authorization: " + secret.encode()
            + b"\r\n\r\n",
        ]
        for data in raw:
            resp = await one(admin, data)
            assert resp.status == 400, resp.body
            assert ADMIN_TOKEN.encode() not in resp.body
            env = resp.envelope()
            assert env["decision"] == "DENY" and env["reason_codes"] == [
                "BadRequest_MalformedRequest"]
        for record in caplog.records:
            assert ADMIN_TOKEN not in record.getMessage()
            assert record.exc_text is None or ADMIN_TOKEN not in record.exc_text


async def test_admin_api_errors_are_envelopes(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (p, _):
        admin = p.serving.admin_port
        auth = ("Authorization", "Bearer " + ADMIN_TOKEN)
        cases = [
            (request("GET", "/admin/mode"), 401, "Auth_Missing"),
            (request("GET", "/admin/mode", [("Authorization", "Bearer nope")]), 401,
             "Auth_Invalid"),
            (request("GET", "/admin/nothing-here", [auth]), 404, "Route_NotMapped"),
            (request("DELETE", "/admin/mode", [auth]), 405, "Route_NotMapped"),
            (request("PUT", "/admin/mode", [auth, JSON],
                     b'{"mode":"KILL_SWITCH","mode":"ALLOW"}'), 400, "BadRequest_InvalidMode"),
            (request("PUT", "/admin/mode", [auth, JSON], b'{"mode":"SIDEWAYS"}'), 400,
             "BadRequest_InvalidMode"),
            (request("PUT", "/admin/mode", [auth, JSON], b'{"mode":"ALLOW","x":1}'), 400,
             "BadRequest_InvalidMode"),
        ]
        for data, status, reason in cases:
            resp = await one(admin, data)
            assert resp.status == status, (data[:40], resp.body)
            env = resp.envelope()
            assert env["status"] == status and reason in env["reason_codes"], env
            assert resp.headers["Content-Type"].startswith("application/json")
        assert p.rt.mode.current().value == "ALLOW"  # no duplicate-key body switched it


# ------------------------------------------------------------------ 5. one delivery


class KeepAliveDropper:
    """A raw HTTP/1.1 server: answers the first request on a connection and keeps
    it open, reads the next one on that connection and closes without answering."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await reader.readexactly(length)
                self.received.append(head.split(b"\r\n", 1)[0])
                if served:
                    break  # the reused connection dies without an answer
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\nKeep-Alive: timeout=60\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> KeepAliveDropper:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.mark.parametrize("method,target,body", [
    ("DELETE", "/appointments/a1", b""),
    ("GET", "/appointments", b""),
    ("POST", "/appointments", APPT),
])
async def test_a_dead_keepalive_connection_is_never_retried(tmp_path: Path, method: str,
                                                            target: str, body: bytes) -> None:
    async with KeepAliveDropper() as up:
        def patch(d: dict[str, Any]) -> None:
            d["upstream"]["pool_size"] = 1

        cfg = write_config(tmp_path, patch)
        env = clinic_env(f"http://127.0.0.1:{up.port}", tmp_path)
        async with start_proxy(cfg, env, Upstream(url="")) as p:
            key = RECEPTIONIST
            first = await one(port(p), request("GET", "/appointments", [RECEPTIONIST]))
            assert first.status == 200
            headers = [key, ("Idempotency-Key", f"once-{method}")]
            if body:
                headers.append(JSON)
            second = await one(port(p), request(method, target, headers, body))
            assert second.status == 502, second.body
            assert "Upstream_Unavailable" in second.reasons
            # one request line per decision: nothing was re-sent on a new connection
            await asyncio.sleep(0)  # let a (wrong) resend reach the server if it was made
            lines = [r for r in up.received if not r.startswith(b"GET /appointments ")
                     or method == "GET"]
            assert len(lines) == (2 if method == "GET" else 1), up.received


# ------------------------------------------------------------------ 6. abandoned streams


async def test_a_client_that_leaves_frees_the_upstream_connection(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["upstream"]["pool_size"] = 3
        d["upstream"]["pool_timeout_ms"] = 5000

    async with proxied(tmp_path, patch) as (p, up):
        async def reader_that_leaves() -> None:
            r, w = await asyncio.open_connection("127.0.0.1", port(p))
            w.write(request("GET", "/appointments?mode=slow-stream", [RECEPTIONIST],
                            close=False))
            await w.drain()
            got = b""
            while len(got) < 300:
                chunk = await r.read(300)
                assert chunk
                got += chunk
            w.transport.abort()

        await asyncio.gather(*(reader_that_leaves() for _ in range(6)))
        # the proxy notices at its next write, stops relaying and lets the
        # upstream connection go: the upstream sees each stream end
        await wait_for(lambda: up.streams_closed >= up.streams_open == 6,
                       what="upstream streams closed")
        fresh = await one(port(p), request("GET", "/appointments", [RECEPTIONIST]))
        assert fresh.status == 200
        await p.rt.pipeline.flush()
        rows = [r for r in records(p) if r["kind"] == "outcome"]
        truncated = [r for r in rows if r.get("response_truncated")]
        assert len(truncated) == 6 and all(r.get("client_gone") for r in truncated)


async def test_a_pool_wait_is_not_a_connect_timeout(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["upstream"]["pool_size"] = 1
        d["upstream"]["pool_timeout_ms"] = 200

    async with proxied(tmp_path, patch) as (p, up):
        holder = asyncio.ensure_future(one(port(p), request(
            "GET", "/appointments?mode=hold", [RECEPTIONIST])))
        await asyncio.wait_for(up.arrived.wait(), 10)
        key = ("Idempotency-Key", "busy-1")
        busy = await one(port(p), request("POST", "/appointments", [RECEPTIONIST, JSON, key],
                                          APPT))
        assert busy.status == 503 and busy.reasons == ["Upstream_Busy"]
        assert busy.headers["Retry-After"] == "1"
        assert busy.envelope()["retry_after"] == 1
        assert len(up.raw_targets) == 1  # only the held request reached the upstream
        up.release.set()
        assert (await holder).status == 200
        # the claim was released: the same request goes through now
        again = await one(port(p), request("POST", "/appointments", [RECEPTIONIST, JSON, key],
                                           APPT))
        assert again.status == 201


# ------------------------------------------------------------------ 13. smaller ones


async def test_upstream_failures_are_counted_and_logged_as_sent(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="casf.access")
    cfg = write_config(tmp_path, lambda d: None)
    env = clinic_env("http://127.0.0.1:9", tmp_path)  # nothing listens on port 9
    async with start_proxy(cfg, env, Upstream(url="")) as p:
        resp = await one(port(p), request("GET", "/appointments", [RECEPTIONIST]))
        assert resp.status == 502
        text = await p.metrics()
        assert ('casf_requests_total{decision="DENY",status="502",'
                'tool="cliniccloud.list_appointments"} 1.0') in text
        lines = [r.msg for r in caplog.records if r.name == "casf.access"]
        assert lines and isinstance(lines[-1], dict)
        assert lines[-1]["decision"] == "DENY" and lines[-1]["status"] == 502
        assert lines[-1]["reason_codes"] == ["Upstream_Unavailable"]


async def test_shadow_counter_counts_requests_not_reasons(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["defaults"] = {"enforce": False}

    async with proxied(tmp_path, patch) as (p, _):
        # another tenant's clinic (an invariant) and a role the policy refuses: two
        # stages would have denied, one request
        resp = await one(port(p), request(
            "POST", "/appointments", [("X-API-Key", "demo-nurse"), JSON,
                                      ("Idempotency-Key", "sh-1")],
            b'{"patient_id":"p1","slot":"s","tenant_id":"t2"}'))
        assert resp.status == 201
        text = await p.metrics()
        assert "casf_shadow_denied_total 1.0" in text


async def test_a_malformed_compressed_body_logs_no_traceback(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with proxied(tmp_path) as (p, up):
        for target_port in (port(p), p.serving.admin_port):
            admin = target_port != port(p)
            data = request("PUT" if admin else "POST", "/admin/mode" if admin else "/appointments",
                           [RECEPTIONIST, JSON, ("Content-Encoding", "gzip"),
                            ("Idempotency-Key", "gz-1")], b"\x1f\x8bnot really gzip" * 20)
            resp = await one(target_port, data)
            assert resp.status in (401, 415), resp.body
        assert not [r for r in caplog.records if r.exc_info or r.exc_text]
        assert up.raw_targets == []


async def test_expect_100_continue_gets_its_interim_answer(tmp_path: Path) -> None:
    async with proxied(tmp_path) as (p, up):
        r, w = await asyncio.open_connection("127.0.0.1", port(p))
        head = request("POST", "/appointments",
                       [RECEPTIONIST, JSON, ("Idempotency-Key", "exp-1"),
                        ("Expect", "100-continue"), ("Content-Length", str(len(APPT)))],
                       length=False)
        w.write(head)
        await w.drain()
        interim = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        w.write(APPT)
        await w.drain()
        final = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert final.startswith(b"HTTP/1.1 201"), final
        w.close()
        # an expectation the proxy cannot meet is refused, never forwarded
        resp = await one(port(p), request(
            "POST", "/appointments", [RECEPTIONIST, JSON, ("Idempotency-Key", "exp-2"),
                                      ("Expect", "something-else")], APPT))
        assert resp.status == 417 and resp.reasons == ["Request_ExpectationFailed"]
        assert len(up.raw_targets) == 1
        assert b"expect" not in b"".join(n.lower().encode() for n in up.header_names[0])
