"""A real nginx, with the sample config deploy/nginx/, in front of the clinic
backend, asking a real casf-proxy's forward-auth door (``GET /authz/forward``
on the decision listener) about every request.

All three are real processes: ``examples/clinic/backend.py``, ``casf-proxy
run`` with the clinic config (a rate limit on a read route added, so a 429 can
be had without a body attribute), and nginx. Between nginx and the backend
sits a recording relay (a plain aiohttp forwarder written here) so the test
sees exactly what reached the backend: the X-Casf-* headers casf-proxy
answered with, and no client credentials.

Cases: an allowed read and an allowed write reach the backend; 401 (no key),
403 (role not permitted), 400 (a route whose attributes read the body, which
forward auth never sees), 409 (the same Idempotency-Key for another target),
429 (the rate limit, with Retry-After) and 503 (the audit store locked by
another process, with Retry-After) reach the client with casf-proxy's status,
headers and envelope, and never the backend.

nginx is a system package: without it the tests skip, except under
``CI=true`` where they fail.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tests.ci import require_binary
from tests.conftest import write_config
from tests.nginx_fixture import Nginx
from tests.servers import free_port
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
CASF_HEADERS = ("X-Casf-Decision", "X-Casf-Tool", "X-Casf-Principal", "X-Casf-Role",
                "X-Casf-Tenant", "X-Casf-Trace-Id")
# spoofed by the client: must never reach the backend (or casf-proxy) as sent
SPOOFED = {"X-Casf-Role": "custodian", "X-Casf-Decision": "ALLOW", "X-Casf-Tenant": "t9",
           "X-Casf-Principal": "root"}
TRACE_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass
class Seen:
    method: str
    path: str
    headers: CIMultiDict[str]


@dataclass
class Stack:
    backend: str  # the clinic backend itself (http://127.0.0.1:P)
    audit: Path
    log: Path  # casf-proxy's output (JSON lines)
    seen: list[Seen] = field(default_factory=list)  # what reached the backend
    url: str = ""  # nginx


async def _accepts(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    w.close()
    return True


def _patch(d: dict[str, Any]) -> None:
    # bounds the wait of the locked-store case; generous for a loaded machine
    d["audit"]["timeout_ms"] = 2000
    d["reload"]["watch"] = False
    # a read route whose attributes come from the path: forward auth can decide it
    d["rate_limits"].append({"name": "history_per_patient",
                             "tools": ["cliniccloud.summary_history"],
                             "key": "{principal.id}:{subject.patient_id}",
                             "limit": 1, "window_seconds": 3600})


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    require_binary("nginx")
    cfg = write_config(tmp_path, _patch)
    backend_port, traffic, admin, decisions = free_port(), free_port(), free_port(), free_port()
    audit = tmp_path / "audit.db"
    env = {**os.environ, "CLINIC_UPSTREAM": f"http://127.0.0.1:{backend_port}",
           "CASF_PORT": str(traffic), "CASF_ADMIN_PORT": str(admin),
           "CASF_DECISIONS_PORT": str(decisions), "CASF_AUDIT_PATH": str(audit),
           "CASF_AUTH": "api_keys", "CASF_SHUTDOWN_DELAY_MS": "0"}
    backend = subprocess.Popen([sys.executable, "examples/clinic/backend.py", "--port",
                                str(backend_port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(cfg)],
                             cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    runner: web.AppRunner | None = None
    session = aiohttp.ClientSession()
    try:
        for port in (backend_port, decisions):
            async def accepts(port: int = port) -> bool:
                return await _accepts(port)

            opened: bool = await wait_until(accepts, f"port {port} to open "
                                            f"(proxy log: {tmp_path / 'proxy.log'})",
                                            timeout=30)
            assert opened
        st = Stack(backend=f"http://127.0.0.1:{backend_port}", audit=audit,
                   log=tmp_path / "proxy.log")

        async def relay(request: web.Request) -> web.Response:
            st.seen.append(Seen(request.method, request.path_qs, CIMultiDict(request.headers)))
            async with session.request(request.method, st.backend + request.path_qs,
                                       data=await request.read(),
                                       headers={"Content-Type": request.content_type}) as r:
                return web.Response(status=r.status, body=await r.read(),
                                    content_type=r.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", relay)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        relay_port = free_port()
        await web.TCPSite(runner, "127.0.0.1", relay_port).start()
        with Nginx(tmp_path / "nginx", decisions=f"127.0.0.1:{decisions}",
                   backend=f"127.0.0.1:{relay_port}") as n:
            st.url = n.url
            yield st
    finally:
        await session.close()
        if runner is not None:
            await runner.cleanup()
        for p in (proxy, backend):
            p.terminate()
        assert proxy.wait(timeout=15) == 0, (tmp_path / "proxy.log").read_text()
        backend.wait(timeout=10)
        log.close()


async def _send(st: Stack, method: str, path: str, *, key: str | None,
                rid: str | None = None, body: Any = None,
                ) -> tuple[int, CIMultiDict[str], bytes]:
    headers = dict(SPOOFED)
    if key is not None:
        headers["X-API-Key"] = f"demo-{key}"
    if rid is not None:
        headers["Idempotency-Key"] = rid
    async with aiohttp.ClientSession() as s, s.request(
            method, st.url + path, headers=headers, json=body,
            timeout=aiohttp.ClientTimeout(total=20)) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def _decisions(st: Stack) -> list[tuple[str, int]]:
    """The forward door's decisions, from casf-proxy's access log: (decision, status)."""
    out = []
    for line in st.log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("logger") == "casf.access" and rec.get("via") == "forward":
            out.append((rec["decision"], rec["status"]))
    return out


def _allowed(seen: Seen, tool: str, role: str) -> None:
    h = seen.headers
    for name in CASF_HEADERS:
        assert len(h.getall(name, [])) == 1, name  # casf-proxy's, never the client's too
    assert h["X-Casf-Decision"] == "ALLOW"
    assert h["X-Casf-Tool"] == tool
    assert h["X-Casf-Principal"] == f"user-{role}"
    assert h["X-Casf-Role"] == role
    assert h["X-Casf-Tenant"] == "t1"
    assert TRACE_ID.match(h["X-Casf-Trace-Id"]), h["X-Casf-Trace-Id"]
    assert "X-API-Key" not in h and "Authorization" not in h  # the credentials stay in nginx


def _refused(status: int, headers: CIMultiDict[str], raw: bytes, want: int,
             reasons: list[str]) -> dict[str, Any]:
    assert status == want, raw
    assert headers["Content-Type"].startswith("application/json")
    env: dict[str, Any] = json.loads(raw)
    assert (env["decision"], env["status"], env["reason_codes"]) == ("DENY", want, reasons)
    assert env["trace_id"] == headers["X-Casf-Trace-Id"]  # casf-proxy's headers came along
    assert env["policy_hash"].startswith("sha256:")
    return env


async def test_allowed_read_reaches_the_backend_with_casf_headers(stack: Stack) -> None:
    status, _, raw = await _send(stack, "GET", "/appointments?day=2026-01-01",
                                 key="receptionist")
    assert status == 200, raw
    assert isinstance(json.loads(raw), list | dict)
    (seen,) = stack.seen
    assert (seen.method, seen.path) == ("GET", "/appointments?day=2026-01-01")
    _allowed(seen, "cliniccloud.list_appointments", "receptionist")


async def test_allowed_write_reaches_the_backend_with_casf_headers(stack: Stack) -> None:
    # an appointment to cancel, made at the backend directly
    async with aiohttp.ClientSession() as s, s.post(
            stack.backend + "/appointments",
            json={"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}) as r:
        assert r.status == 201
        ident = (await r.json())["id"]
    status, _, raw = await _send(stack, "DELETE", f"/appointments/{ident}", key="doctor",
                                 rid="cancel-1")
    assert status == 200, raw
    assert json.loads(raw) == {"id": ident, "status": "cancelled"}
    (seen,) = stack.seen
    assert (seen.method, seen.path) == ("DELETE", f"/appointments/{ident}")
    _allowed(seen, "cliniccloud.cancel_appointment", "doctor")


async def test_missing_key_is_401_with_the_envelope(stack: Stack) -> None:
    status, headers, raw = await _send(stack, "GET", "/appointments", key=None)
    _refused(status, headers, raw, 401, ["Auth_Missing"])
    assert headers.getall("WWW-Authenticate") == ['ApiKey header="X-API-Key"']  # once
    assert stack.seen == []


async def test_role_not_permitted_is_403_with_the_envelope(stack: Stack) -> None:
    status, headers, raw = await _send(stack, "DELETE", "/appointments/a1", key="nurse",
                                       rid="nurse-1")
    env = _refused(status, headers, raw, 403, ["Role_NotPermitted"])
    assert env["tool"] == "cliniccloud.cancel_appointment"
    assert stack.seen == []


async def test_route_reading_the_body_is_refused_400(stack: Stack) -> None:
    """Forward auth never sees the body: a route whose attributes read it is refused."""
    status, headers, raw = await _send(stack, "POST", "/sms", key="nurse", rid="sms-1",
                                       body={"patient_id": "p1", "message": "hi"})
    _refused(status, headers, raw, 400, ["Decision_BodyUnavailable"])
    assert stack.seen == []


async def test_same_idempotency_key_for_another_target_is_409(stack: Stack) -> None:
    status, _, raw = await _send(stack, "DELETE", "/appointments/a1", key="receptionist",
                                 rid="k-409")
    assert status == 404, raw  # allowed: the backend has no such appointment
    assert len(stack.seen) == 1
    status, headers, raw = await _send(stack, "DELETE", "/appointments/a2",
                                       key="receptionist", rid="k-409")
    _refused(status, headers, raw, 409, ["Inv_ReplayPayloadMismatch"])
    assert len(stack.seen) == 1


async def test_rate_limited_read_is_429_with_retry_after(stack: Stack) -> None:
    status, _, raw = await _send(stack, "GET", "/patients/p1/history", key="nurse")
    assert status == 200, raw
    for _ in range(2):  # decided afresh each time, never served from another's answer
        status, headers, raw = await _send(stack, "GET", "/patients/p1/history", key="nurse")
        env = _refused(status, headers, raw, 429, ["RateLimit_Exceeded"])
        assert headers.getall("Retry-After") == [str(env["retry_after"])]
        assert int(headers["Retry-After"]) >= 1
    assert len(stack.seen) == 1
    # one decision per client request: a refusal is served from nginx's kept answer
    want = [("ALLOW", 200), ("DENY", 429), ("DENY", 429)]
    got = await wait_until(lambda: len(_decisions(stack)) >= 3 and _decisions(stack),
                           lambda: f"three forward decisions logged: {_decisions(stack)}")
    assert got == want
    # another patient's bucket is untouched
    status, _, raw = await _send(stack, "GET", "/patients/p2/history", key="nurse")
    assert status == 200, raw
    assert len(stack.seen) == 2


async def test_audit_store_locked_is_503_then_recovers(stack: Stack) -> None:
    status, _, _ = await _send(stack, "GET", "/appointments", key="receptionist")
    assert status == 200
    locker = sqlite3.connect(stack.audit, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
    try:
        status, headers, raw = await _send(stack, "GET", "/appointments", key="receptionist")
        _refused(status, headers, raw, 503, ["FAIL_CLOSED", "Audit_Unavailable"])
        assert int(headers["Retry-After"]) >= 1
        assert len(stack.seen) == 1
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    status, _, raw = await _send(stack, "GET", "/appointments", key="receptionist")
    assert status == 200, raw
    assert len(stack.seen) == 2
