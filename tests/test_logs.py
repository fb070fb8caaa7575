"""Logs and tracing (issue 6 item 5) on a real ``casf-proxy run`` process.

Every line the process writes is one JSON object; there is one access line per
request with the trace id, tool, decision, reason codes, status and latency;
no body value, API key, bearer token or admin token sent in the test appears
anywhere; ``CASF_LOG_LEVEL`` is honoured; W3C ``traceparent`` is continued
(same trace id, new parent span id) or started.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from tests.conftest import ADMIN_TOKEN, CLINIC, KEYS, ROOT, clinic_env, run_upstream, write_config
from tests.servers import ProxyProcess

BODY_SECRET = "SECRET-BODY-VALUE-4711"
PATIENT_SECRET = "p-SECRET-PATIENT-0815"
BAD_KEY = "sk-live-NOT-A-REAL-KEY-42"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def mint(role: str) -> str:
    out = subprocess.run([sys.executable, str(CLINIC / "mint_token.py"), "--role", role],
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


def parse(path: Path) -> list[dict[str, Any]]:
    lines = []
    for raw in path.read_text().splitlines():
        assert raw.strip(), "empty log line"
        obj = json.loads(raw)  # every line is JSON
        assert isinstance(obj, dict)
        assert {"ts", "level", "logger", "msg"} <= set(obj)
        lines.append(obj)
    return lines


async def test_every_line_is_json_and_carries_no_secret(tmp_path: Path) -> None:
    token = mint("nurse")
    async with run_upstream() as up:
        path = write_config(tmp_path, lambda d: None)
        proc = ProxyProcess(path, dict(clinic_env(up.url, tmp_path).variables),
                            tmp_path / "proxy.log")
        proc.start()
        assert proc.proc is not None
        sent = 0
        try:
            async with aiohttp.ClientSession() as s:
                async def call(method: str, target: str, headers: dict[str, str],
                               **kw: Any) -> tuple[int, dict[str, Any] | None, str]:
                    nonlocal sent
                    sent += 1
                    async with s.request(method, URL(proc.url + target, encoded=True),
                                         headers=headers, **kw) as r:
                        raw = await r.read()
                        body = json.loads(raw) if r.content_type == "application/json" else None
                        return r.status, body, r.headers.get("X-Casf-Trace-Id", "")

                nurse = {"X-API-Key": KEYS["nurse"]}
                # 1. a caller's trace is continued
                st, _, trace = await call("GET", "/appointments",
                                          {**nurse, "traceparent": f"00-{TRACE}-{PARENT}-01"})
                assert (st, trace) == (200, TRACE)
                upstream_tp = up.seen[-1].headers["traceparent"].split("-")
                assert upstream_tp[1] == TRACE and upstream_tp[2] != PARENT
                # 2. no traceparent: one is started, and the upstream gets it
                st, _, trace = await call("GET", "/appointments", nurse)
                assert st == 200 and len(trace) == 32
                assert up.seen[-1].headers["traceparent"].split("-")[1] == trace
                # 3. body values (allowed write, then a denied one) and a bearer token
                sms = {"patient_id": PATIENT_SECRET, "message": BODY_SECRET}
                st, _, _ = await call("POST", "/sms", {**nurse, "Idempotency-Key": "s1"},
                                      json=sms)
                assert st in (200, 201)
                st, body, trace = await call("POST", "/invoices",
                                             {"Authorization": f"Bearer {token}",
                                              "Idempotency-Key": "i1"},
                                             json={"patient_id": PATIENT_SECRET,
                                                   "amount_cents": BODY_SECRET})
                assert st == 403 and body is not None and body["trace_id"] == trace
                # 4. a wrong key, a malformed target, an unmapped route
                st, body, _ = await call("GET", "/appointments", {"X-API-Key": BAD_KEY})
                assert st == 401
                st, _, _ = await call("GET", "/appointments/%2e%2e/%ZZ", nurse)
                assert st == 400
                st, _, _ = await call("GET", f"/nope?q={BODY_SECRET}", nurse)
                assert st == 403
                # 5. the admin API, and a reload that fails
                async with s.put(proc.admin + "/admin/mode", json={"mode": "ALLOW"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                    assert r.status == 200
                path.write_text(path.read_text() + "\nnot_a_key: 1\n")
                proc.proc.send_signal(signal.SIGHUP)
                for _ in range(100):
                    if "config reload (SIGHUP) failed" in (tmp_path / "proxy.log").read_text():
                        break
                    await asyncio.sleep(0.05)
        finally:
            assert proc.stop() == 0
    text = (tmp_path / "proxy.log").read_text()
    for secret in (BODY_SECRET, PATIENT_SECRET, BAD_KEY, token, ADMIN_TOKEN, KEYS["nurse"],
                   token.split(".")[2]):
        assert secret not in text, f"{secret[:12]}... leaked into the log"
    lines = parse(tmp_path / "proxy.log")
    access = [ln for ln in lines if ln["logger"] == "casf.access"]
    assert len(access) == sent
    for ln in access:
        assert ln["msg"] == "request" and ln["level"] == "info"
        for name in ("trace_id", "tool", "decision", "reason_codes", "status", "latency_ms",
                     "method", "request_id"):
            assert name in ln, (name, ln)
        assert isinstance(ln["latency_ms"], float) and isinstance(ln["reason_codes"], list)
    by_status = {(ln["status"], ln["decision"]) for ln in access}
    assert {(200, "ALLOW"), (403, "DENY"), (401, "DENY"), (400, "DENY")} <= by_status
    assert access[0]["trace_id"] == TRACE and access[0]["tool"] == "cliniccloud.list_appointments"
    denied = next(ln for ln in access if ln["status"] == 401)
    assert denied["reason_codes"] == ["Auth_Invalid"] and denied["key_id"] is None
    jwt_line = next(ln for ln in access if ln.get("auth") == "jwt")
    assert jwt_line["decision"] == "DENY" and jwt_line["tool"] == "stripe.generate_invoice"
    failed = [ln for ln in lines if ln.get("event") == "config_reload"]
    assert failed and failed[0]["level"] == "error" and "not_a_key: unknown key" in failed[0]["msg"]
    assert any(ln.get("event") == "shutdown" for ln in lines)


async def test_log_level_is_honoured(tmp_path: Path) -> None:
    async with run_upstream() as up:
        path = write_config(tmp_path, lambda d: None)
        env = dict(clinic_env(up.url, tmp_path, CASF_LOG_LEVEL="warning").variables)
        proc = ProxyProcess(path, env, tmp_path / "proxy.log")
        proc.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.get(proc.url + "/appointments",
                                 headers={"X-API-Key": KEYS["nurse"]}) as r:
                    assert r.status == 200
        finally:
            assert proc.stop() == 0
    lines = parse(tmp_path / "proxy.log")
    assert lines and all(ln["level"] in ("warning", "error") for ln in lines)
    assert not [ln for ln in lines if ln["logger"] == "casf.access"]


def test_a_config_error_at_startup_is_a_json_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, lambda d: d.update(bogus=1))
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30,
                         env={"PATH": "/usr/bin:/bin", "CLINIC_UPSTREAM": "http://127.0.0.1:9"})
    assert out.returncode == 2
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert line["level"] == "error" and "bogus: unknown key" in line["msg"]
