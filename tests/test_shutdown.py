"""Graceful shutdown (docs/operations.md): SIGTERM under load on a real process.

The load generator behaves like a Service in front of the pod: it polls the
readiness probe and stops opening new requests once the probe says 503 (the
endpoint is removed), while the requests it already sent must all complete.
"""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import KEYS, ROOT, clinic_env, run_upstream, write_config
from tests.servers import ProxyProcess
from tests.waiting import wait_until

APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
DELAY_MS = 700


def _patch(d: dict[str, Any]) -> None:
    d["shutdown"] = {"delay_ms": DELAY_MS, "drain_timeout_ms": 5000}


async def test_sigterm_under_load_drains_everything_and_the_chain_verifies(
        tmp_path: Path) -> None:
    async with run_upstream() as up:
        up.delay_s = 0.25  # requests are in flight at every moment
        path = write_config(tmp_path, _patch)
        env = dict(clinic_env(up.url, tmp_path).variables)
        proc = ProxyProcess(path, env, tmp_path / "proxy.log")
        proc.start()
        assert proc.proc is not None
        loop = asyncio.get_running_loop()
        removed = asyncio.Event()  # readiness said 503: no new requests from now on
        t: dict[str, float] = {}
        outcomes: list[int] = []
        errors: list[BaseException] = []
        sent = 0

        async def client(session: aiohttp.ClientSession, i: int) -> None:
            nonlocal sent
            n = 0
            while not removed.is_set():
                n += 1
                sent += 1
                try:
                    if i % 3 == 0:
                        async with session.post(
                                proc.url + "/appointments", json=APPT,
                                headers={"X-API-Key": KEYS["doctor"],
                                         "Idempotency-Key": f"c{i}-{n}"}) as r:
                            await r.read()
                            outcomes.append(r.status)
                    else:
                        async with session.get(proc.url + "/appointments",
                                               headers={"X-API-Key": KEYS["nurse"]}) as r:
                            await r.read()
                            outcomes.append(r.status)
                except Exception as exc:  # every failure is reported
                    errors.append(exc)

        async def probe(session: aiohttp.ClientSession) -> None:
            while True:
                async with session.get(proc.admin + "/healthz") as r:
                    if r.status == 503:
                        t["not_ready"] = loop.time()
                        assert (await r.json())["status"] == "draining"
                        removed.set()
                        return
                await asyncio.sleep(0.01)  # the probe's period, like a load balancer's

        async with aiohttp.ClientSession() as traffic, aiohttp.ClientSession() as admin:
            async with admin.get(proc.admin + "/healthz") as r:
                assert r.status == 200
            clients = [asyncio.ensure_future(client(traffic, i)) for i in range(20)]
            prober = asyncio.ensure_future(probe(admin))
            # two rounds of the 20 clients done (each request takes 0.25 s upstream)
            await wait_until(lambda: len(outcomes) + len(errors) >= 40,
                             "40 requests of the load to complete")
            t["sigterm"] = loop.time()
            proc.proc.terminate()
            await prober
            # readiness flips at once, long before the listener stops accepting
            assert t["not_ready"] - t["sigterm"] < DELAY_MS / 1000 / 2
            # the listener still accepts during the delay (a client that has not seen the
            # probe yet); the response asks it to close the connection
            async with aiohttp.ClientSession() as late:
                async with late.get(proc.url + "/appointments",
                                    headers={"X-API-Key": KEYS["nurse"]}) as r:
                    assert r.status == 200
                    assert r.headers.get("Connection", "").lower() == "close"
                    outcomes.append(r.status)
                    sent += 1
            await asyncio.gather(*clients)
            code = await asyncio.to_thread(proc.proc.wait, 15)
            t["exited"] = loop.time()
        assert code == 0
        proc.proc = None
        # every accepted request completed normally
        assert not errors, errors[:3]
        assert len(outcomes) == sent > 40
        assert set(outcomes) <= {200, 201}, sorted(set(outcomes))
        # the listener is gone, and the process took the delay plus the drain, not more
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", proc.port)) != 0
        assert DELAY_MS / 1000 <= t["exited"] - t["sigterm"] < DELAY_MS / 1000 + 5
        forwarded = len(up.seen)
        assert forwarded == len(outcomes)
    # the audit chain verifies and holds a decision and an outcome per forwarded request
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "-c", str(path)],
                         cwd=ROOT, env={**env, "PATH": "/usr/bin:/bin"}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"(\d+) chain\(s\), (\d+) records", out.stdout)
    assert m is not None, out.stdout
    assert (int(m.group(1)), int(m.group(2))) == (1, 2 * forwarded)
    log = (tmp_path / "proxy.log").read_text()
    phases = re.findall(r'"phase":"(\w+)"', log)
    assert phases[:2] == ["delay", "drain"]
    assert "cut_off" not in log
    assert "casf-proxy stopped" in log


async def test_drain_timeout_bounds_the_shutdown(tmp_path: Path) -> None:
    """A request longer than the drain timeout is cut off; the process still exits."""
    def patch(d: dict[str, Any]) -> None:
        d["shutdown"] = {"delay_ms": 0, "drain_timeout_ms": 300}

    async with run_upstream() as up:
        held = up.hold_next()  # answered only after the test: longer than any drain
        path = write_config(tmp_path, patch)
        proc = ProxyProcess(path, dict(clinic_env(up.url, tmp_path).variables),
                            tmp_path / "proxy.log")
        proc.start()
        assert proc.proc is not None
        async with aiohttp.ClientSession() as s:
            req = asyncio.ensure_future(s.get(proc.url + "/appointments",
                                              headers={"X-API-Key": KEYS["nurse"]}))
            await held.wait_arrived()  # in flight
            proc.proc.terminate()
            code = await asyncio.to_thread(proc.proc.wait, 10)
            proc.proc = None
            # it exited while the upstream still held the request: the drain was bounded
            assert not held.released.is_set()
            try:
                await req
            except aiohttp.ClientError:
                pass
        assert code == 0
        log = (tmp_path / "proxy.log").read_text()
        assert '"cut_off":1' in log
        assert "still running at the 300 ms drain timeout were cut off" in log
