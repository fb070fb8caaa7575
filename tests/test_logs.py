"""Logs and tracing (docs/operations.md) on a real ``casf-proxy run`` process.

Every line the process writes is one JSON object; there is one access line per
request with the trace id, tool, decision, reason codes, status and latency;
no body value, API key, bearer token or admin token sent in the test appears
anywhere; ``CASF_LOG_LEVEL`` is honoured; W3C ``traceparent`` is continued
(same trace id, new parent span id) or started. Passwords in ``REDIS_URL``,
``PG_DSN`` and ``upstream.url`` never reach a startup or error line.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from yarl import URL

from proxy.audit.postgres import migrate
from tests.ci import skip_or_fail
from tests.conftest import (
    ADMIN_TOKEN,
    CLINIC,
    EXTERNAL_PG_DSN,
    KEYS,
    ROOT,
    clinic_env,
    run_upstream,
    write_config,
)
from tests.servers import ExternalPostgres, PostgresServer, ProxyProcess, RedisServer, free_port
from tests.waiting import wait_until

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
                await wait_until(lambda: "config reload (SIGHUP) failed"
                                 in (tmp_path / "proxy.log").read_text(),
                                 "the failed SIGHUP reload to be logged", interval=0.05)
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


# ------------------------------------------------------------ passwords in URLs

URL_PASSWORD = "pw-URL-SECRET-93e1"


def with_password(url: str, password: str, database: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or 'casf'}:{password}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc,
                                     path=f"/{database}" if database else parts.path))


@pytest.fixture
def pg_with_password() -> Iterator[tuple[str, str]]:
    """(DSN of a fresh, migrated database with a password in it, that password)."""
    server: PostgresServer | ExternalPostgres
    if EXTERNAL_PG_DSN:
        password = urlsplit(EXTERNAL_PG_DSN).password
        if not password:
            skip_or_fail("PG_DSN has no password to look for in the log (give it one, or "
                         "unset PG_DSN to use a throwaway server)")
        server = ExternalPostgres(EXTERNAL_PG_DSN)
    else:
        server, password = PostgresServer(), URL_PASSWORD
        server.start()
    name = "casf_log_" + uuid.uuid4().hex[:12]

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        dsn = with_password(server.dsn, password, name)  # a trust server ignores it
        asyncio.run(migrate(dsn))
        yield dsn, password
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        server.destroy()


def assert_absent(secret: str, text: str) -> None:
    assert text.strip(), "no log lines"
    assert secret not in text, f"a URL password leaked into the log: {text[-1500:]}"


@pytest.mark.redis
@pytest.mark.postgres
async def test_url_passwords_never_reach_the_log(tmp_path: Path,
                                                 pg_with_password: tuple[str, str]) -> None:
    dsn, pg_password = pg_with_password
    redis = RedisServer(tmp_path / "redis", password=URL_PASSWORD)
    redis.start()
    try:
        async with run_upstream() as up:
            upstream = with_password(up.url, URL_PASSWORD)
            path = write_config(tmp_path, lambda d: None)
            env = dict(clinic_env(upstream, tmp_path, REDIS_URL=redis.url, PG_DSN=dsn).variables)
            proc = ProxyProcess(path, env, tmp_path / "proxy.log")
            proc.start()
            try:
                async with aiohttp.ClientSession() as s, s.get(
                        proc.url + "/appointments", headers={"X-API-Key": KEYS["nurse"]}) as r:
                    assert r.status == 200  # Redis, PostgreSQL and the upstream all in use
                assert up.seen[-1].headers["Authorization"].startswith("Basic ")
            finally:
                assert proc.stop() == 0
    finally:
        redis.stop()
    text = (tmp_path / "proxy.log").read_text()
    for secret in (URL_PASSWORD, pg_password):
        assert_absent(secret, text)
    assert "shared state on Redis; audit on PostgreSQL (PG_DSN)" in text
    assert f"→ http://***@127.0.0.1:{urlsplit(up.url).port}" in text

    # the same passwords in URLs of servers that cannot be reached: the error lines
    closed = free_port()
    env = dict(clinic_env("http://127.0.0.1:9", tmp_path,
                          REDIS_URL=f"redis://:{URL_PASSWORD}@127.0.0.1:{closed}/0").variables)
    proc = ProxyProcess(path, env, tmp_path / "unreachable.log")
    proc.start()  # embedded audit; writes fail closed until Redis answers
    proc.stop()
    text = (tmp_path / "unreachable.log").read_text()
    assert "Redis is unreachable at startup" in text
    assert_absent(URL_PASSWORD, text)
    out = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "run", "-c", str(path)], cwd=ROOT,
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **env, "REDIS_URL": "",
             "PG_DSN": f"postgresql://casf:{URL_PASSWORD}@127.0.0.1:{closed}/casf"})
    assert out.returncode == 2
    assert "cannot connect to the PostgreSQL audit store" in out.stderr
    assert_absent(URL_PASSWORD, out.stdout + out.stderr)
