"""``casf-proxy run --workers N`` (docs/operations.md): real processes, a real Redis.

Two workers share the traffic and admin ports (SO_REUSEPORT); /metrics on
either shows the totals of both; each writes its own audit chain; a worker
that dies is restarted; SIGTERM to the supervisor stops them all gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import KEYS, ROOT, clinic_env, run_upstream, write_config
from tests.servers import RedisServer, free_port
from tests.waiting import wait_until


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_for_log(path: Path, proc: subprocess.Popen[bytes], pattern: str, count: int,
                       timeout: float = 20) -> list[str]:
    def logged() -> list[str] | None:
        found = re.findall(pattern, path.read_text())
        if len(found) >= count:
            return found
        assert proc.poll() is None, path.read_text()[-3000:]
        return None

    return await wait_until(logged, f"{pattern!r} logged {count} times", timeout=timeout,
                            interval=0.05)


def requests_total(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^casf_requests_total\{[^}]*\} (\S+)$", text,
                                            re.M))


async def test_two_workers_serve_and_their_metrics_add_up(tmp_path: Path,
                                                           redis_server: RedisServer) -> None:
    async with run_upstream() as up:
        path = write_config(tmp_path, lambda d: None)
        port, admin = free_port(), free_port()
        env = {**os.environ, **clinic_env(up.url, tmp_path).variables,
               "REDIS_URL": redis_server.url, "CASF_PORT": str(port),
               "CASF_ADMIN_PORT": str(admin), "CASF_DECISIONS_PORT": str(free_port())}
        log = tmp_path / "proxy.log"
        with log.open("wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c", str(path),
                                     "--workers", "2"], cwd=ROOT, env=env, stdout=sink,
                                    stderr=subprocess.STDOUT)
        try:
            await wait_for_log(log, proc, r"casf-proxy listening", 2)
            url, admin_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"

            async def burst(n: int) -> None:
                # a new connection per request: the kernel spreads them over the workers
                conn = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=conn) as s:
                    for _ in range(n):
                        async with s.get(url + "/appointments",
                                         headers={"X-API-Key": KEYS["nurse"]}) as r:
                            assert r.status == 200

            async def scrape() -> str:
                conn = aiohttp.TCPConnector(force_close=True)
                async with aiohttp.ClientSession(connector=conn) as s:
                    async with s.get(admin_url + "/metrics") as r:
                        assert r.status == 200
                        return await r.text()

            await burst(40)
            for _ in range(4):  # whichever worker answers, it reports both
                text = await scrape()
                assert requests_total(text) == 40
                assert re.search(r"^casf_in_flight 0\.0$", text, re.M)
                assert len(re.findall(r"^casf_config_info\{", text, re.M)) == 1
            served = {ln.get("worker") for ln in log_lines(log) if ln["logger"] == "casf.access"}
            assert served == {0, 1}
            # a worker that dies is restarted; the counts it had are kept
            pid = int(re.findall(r"worker 0 started \(pid (\d+)\)", log.read_text())[0])
            os.kill(pid, signal.SIGKILL)
            await wait_for_log(log, proc, r"worker 0 started", 2)
            await wait_for_log(log, proc, r"casf-proxy listening", 3)
            await burst(20)
            assert requests_total(await scrape()) == 60
            # SIGHUP reaches every worker
            proc.send_signal(signal.SIGHUP)
            await wait_for_log(log, proc, r"config reloaded \(SIGHUP\)", 2)
            assert re.search(r'casf_config_reload_total\{result="success"\} 2\.0',
                             await scrape())
        finally:
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        lines = log_lines(log)  # every line is JSON
        stopped = [ln for ln in lines if "casf-proxy stopped" in ln["msg"]]
        assert sorted(ln["worker"] for ln in stopped) == [0, 1]
        assert "exited unexpectedly" in log.read_text()
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "audit", "verify", "-c", str(path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok chain 'clinic-0-w0'" in out.stdout and "ok chain 'clinic-0-w1'" in out.stdout
    assert "2 chain(s), 120 records" in out.stdout


def test_workers_need_shared_state(tmp_path: Path) -> None:
    path = write_config(tmp_path, lambda d: None)
    env = {**os.environ, **clinic_env("http://127.0.0.1:9", tmp_path).variables}
    env.pop("REDIS_URL", None)
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(path),
                          "--workers", "2"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2
    line = json.loads(out.stderr.strip().splitlines()[-1])
    assert line["level"] == "error" and "needs REDIS_URL" in line["msg"]
    bad = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(path),
                          "--workers", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2
