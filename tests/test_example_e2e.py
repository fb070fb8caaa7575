"""The clinic example launched by its fixed names, as a newcomer would (README.md).

Runs ``python examples/clinic/backend.py --port P`` and ``casf-proxy run -c
examples/clinic/casf.yaml`` as real processes and walks through the README's
scenarios, then checks the audit chain with ``casf-proxy audit verify``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout: float = 15.0) -> None:
    async def accepts() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        w.close()
        return True

    await wait_until(accepts, f"port {port} to open", timeout=timeout, interval=0.05)


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    backend_port, port, admin_port = free_port(), free_port(), free_port()
    env = {**os.environ, "CLINIC_UPSTREAM": f"http://127.0.0.1:{backend_port}",
           "CASF_PORT": str(port), "CASF_ADMIN_PORT": str(admin_port),
           "CASF_DECISIONS_PORT": str(free_port()),
           "CASF_AUDIT_PATH": str(tmp_path / "audit.db"), "CASF_ADMIN_TOKEN": "demo-admin-token"}
    backend = subprocess.Popen([sys.executable, "examples/clinic/backend.py", "--port",
                                str(backend_port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c",
                              "examples/clinic/casf.yaml"], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_port(backend_port)
        await wait_port(port)
        await wait_port(admin_port)
        yield {"port": port, "admin": admin_port, "env": env, "log": tmp_path / "proxy.log"}
    finally:
        for p in (proxy, backend):
            p.terminate()
        assert proxy.wait(timeout=10) == 0  # SIGTERM is a clean shutdown
        backend.wait(timeout=10)
        log.close()


async def test_readme_walkthrough(example: dict[str, Any]) -> None:
    base = f"http://127.0.0.1:{example['port']}"
    admin = f"http://127.0.0.1:{example['admin']}"
    appt = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}

    def h(key: str, rid: str | None = None) -> dict[str, str]:
        out = {"X-API-Key": f"demo-{key}"}
        if rid:
            out["Idempotency-Key"] = rid
        return out

    async with aiohttp.ClientSession() as s:
        async with s.get(base + "/appointments", headers=h("receptionist")) as r:
            assert r.status == 200
        async with s.post(base + "/appointments", json=appt, headers=h("receptionist", "d1")) as r:
            assert r.status == 201
            first = await r.read()
        async with s.post(base + "/appointments", json=appt, headers=h("receptionist", "d1")) as r:
            assert r.status == 201 and r.headers["Idempotent-Replayed"] == "true"
            assert await r.read() == first
        other = {"patient_id": "p2", "slot": "2026-11-23T11:00:00Z"}
        async with s.post(base + "/appointments", json=other, headers=h("receptionist", "d1")) as r:
            assert r.status == 409
            assert (await r.json())["reason_codes"] == ["Inv_ReplayPayloadMismatch"]

        backend = example["env"]["CLINIC_UPSTREAM"]

        async def backend_posts() -> int:  # counted on arrival, before the delay
            async with s.get(backend + "/_stats") as r:
                return int((await r.json()).get("POST /appointments", 0))

        posts = await backend_posts()

        async def slow_arrived() -> bool:
            return await backend_posts() > posts

        slow = s.post(base + "/appointments?delay_ms=1500", json=appt,
                      headers=h("receptionist", "d2"))
        task = asyncio.ensure_future(slow.__aenter__())
        await wait_until(slow_arrived, "the slow request to reach the backend")
        async with s.post(base + "/appointments?delay_ms=1500", json=appt,
                          headers=h("receptionist", "d2")) as r:
            assert r.status == 409
            assert (await r.json())["reason_codes"] == ["Inv_ReplayConcurrent"]
        resp = await task
        assert resp.status == 201
        resp.release()

        sms = {"patient_id": "p1", "message": "Reminder"}
        async with s.post(base + "/sms", json=sms, headers=h("nurse", "sms-1")) as r:
            assert r.status == 202
        async with s.post(base + "/sms", json=sms, headers=h("nurse", "sms-2")) as r:
            assert r.status == 429 and int(r.headers["Retry-After"]) > 3500

        inv = {"patient_id": "p1", "amount_cents": 1200}
        async with s.post(base + "/invoices", json=inv, headers=h("nurse", "d3")) as r:
            assert r.status == 403
            assert (await r.json())["reason_codes"] == ["Role_NotPermitted"]

        other_clinic = {"patient_id": "p1", "slot": "s", "tenant_id": "t1"}
        async with s.post(base + "/appointments", json=other_clinic,
                          headers=h("t2-receptionist", "d5")) as r:
            assert r.status == 403
            assert (await r.json())["reason_codes"] == ["Tenant_Mismatch"]

        tok = {"Authorization": "Bearer demo-admin-token"}
        async with s.put(admin + "/admin/mode", json={"mode": "READ_ONLY"}, headers=tok) as r:
            assert r.status == 200
        async with s.post(base + "/appointments", json=appt, headers=h("receptionist", "d4")) as r:
            assert r.status == 403
            assert (await r.json())["reason_codes"] == ["Mode_ReadOnly_NoWrite"]
        async with s.get(base + "/appointments", headers=h("receptionist")) as r:
            assert r.status == 200
        async with s.put(admin + "/admin/mode", json={"mode": "ALLOW"}, headers=tok) as r:
            assert r.status == 200

        for path, key, status in (("/admin", "receptionist", 403), ("/appointments", None, 401),
                                  ("/patients/%2e%2e/history", "doctor", 400)):
            from yarl import URL

            headers = h(key) if key else {}
            async with s.get(URL(base + path, encoded=True), headers=headers) as r:
                assert r.status == status
        async with s.get(admin + "/healthz") as r:
            assert r.status == 200
        async with s.get(admin + "/metrics") as r:
            text = await r.text()
            assert ('casf_requests_total{decision="DENY",status="429",'
                    'tool="twilio.send_sms"} 1.0') in text

    res = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "-c",
                          "examples/clinic/casf.yaml"], cwd=ROOT, env=example["env"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "running embedded" in example["log"].read_text()
