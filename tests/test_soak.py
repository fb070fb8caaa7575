"""Soak: memory and file descriptors of a proxy process over time.

A ``casf-proxy run`` process (embedded: SQLite audit, in-memory state) takes
traffic for ``CASF_SOAK_SECONDS`` (default 20) with heavy connection churn (a
new connection per request, clients that vanish mid-request or mid-response,
half-sent requests) while the upstream cycles through healthy, failing (500),
slow (504 at the proxy's timeout) and down (502). RSS and open descriptors
of the process are sampled twice a second and printed; after a warm-up the
later samples must stay within a generous bound of the warm level (no
unbounded growth), and after the traffic stops the descriptors return close
to the idle level.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.ci import skip_or_fail
from tests.conftest import clinic_env, write_config
from tests.rawhttp import CheckingUpstream, run_checking_upstream
from tests.servers import ProxyProcess, free_port
from tests.waiting import wait_until

SECONDS = float(os.environ.get("CASF_SOAK_SECONDS", "20"))
RSS_SLACK_MB = 64  # generous: allocator high-water marks are not leaks
FD_SLACK = 48


def sample(pid: int) -> tuple[float, int]:
    """(RSS in MB, open file descriptors) of ``pid`` from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def test_soak_memory_and_descriptors(tmp_path: Path) -> None:
    if not Path("/proc/self/status").exists():
        skip_or_fail("the soak test reads RSS and descriptors from /proc (Linux)")
    up = CheckingUpstream(audit_path=tmp_path / "audit.db")
    port = free_port()
    stack = contextlib.AsyncExitStack()
    await stack.enter_async_context(run_checking_upstream(up, port=port))

    def patch(d: dict[str, Any]) -> None:
        d["upstream"].update(timeout_ms=300, connect_timeout_ms=300)
        d["limits"]["body_read_timeout_ms"] = 500
        # the bounded caches fill during the warm-up, so what grows after it is a leak:
        # the decision LRU (10 000 inputs by default) and stored replay outcomes (TTL)
        d["policy"]["decision_cache_size"] = 200
        d["replay"]["ttl_seconds"] = 2

    cfg = write_config(tmp_path, patch)
    proxy = ProxyProcess(cfg, dict(clinic_env(up.url, tmp_path).variables),
                         tmp_path / "proxy.log")
    proxy.start()
    assert proxy.proc is not None
    pid = proxy.proc.pid
    stop = asyncio.Event()
    counts: dict[str, int] = {"requests": 0, "aborted": 0, "half_sent": 0}
    series: list[tuple[float, str, float, int]] = []
    phase = ["healthy"]
    ids = itertools.count()
    try:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True)) as s:
            async def ready() -> bool:
                async with s.get(proxy.admin + "/healthz") as r:
                    return r.status == 200

            await wait_until(ready, "the proxy to be ready (its audit file and pools open)")
        idle = sample(pid)

        async def churn() -> None:  # a new connection for every request
            conn = aiohttp.TCPConnector(force_close=True, limit=0)
            async with aiohttp.ClientSession(connector=conn) as s:
                while not stop.is_set():
                    n = next(ids)
                    try:
                        if n % 3:
                            req = s.get(proxy.url + f"/appointments?patient_id=p{n % 50}",
                                        headers={"X-API-Key": "demo-receptionist"})
                        else:
                            req = s.post(proxy.url + "/appointments",
                                         json={"patient_id": f"p{n % 50}", "slot": str(n)},
                                         headers={"X-API-Key": "demo-receptionist",
                                                  "Idempotency-Key": f"soak-{n}"})
                        async with req as r:
                            await r.read()
                        counts["requests"] += 1
                    except (aiohttp.ClientError, TimeoutError):
                        pass

        async def vanish() -> None:  # clients that give up mid-response or mid-request
            timeout = aiohttp.ClientTimeout(total=0.05)
            async with aiohttp.ClientSession(timeout=timeout) as s:
                while not stop.is_set():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with s.get(proxy.url + "/appointments",
                                         headers={"X-API-Key": "demo-receptionist"}) as r:
                            await r.read()
                    counts["aborted"] += 1
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                        writer.write(b"POST /appointments HTTP/1.1\r\nHost: x\r\n"
                                     b"X-API-Key: demo-receptionist\r\nIdempotency-Key: h-"
                                     + str(next(ids)).encode() + b"\r\n"
                                     b"Content-Length: 100\r\n\r\n{\"patient_id\":")
                        await writer.drain()
                        writer.close()
                        counts["half_sent"] += 1
                    except OSError:
                        pass
                    await asyncio.sleep(0.01)  # the vanishing clients' pacing

        async def cycle_upstream() -> None:
            names = ["healthy", "failing", "slow", "down"]
            step = max(SECONDS / 8, 1.0)
            i = 0
            while not stop.is_set():
                await asyncio.sleep(step)  # each upstream phase's length
                i += 1
                name = names[i % len(names)]
                prev = phase[0]
                phase[0] = name
                if prev == "down":
                    await stack.enter_async_context(run_checking_upstream(up, port=port))
                up.fail_with = 500 if name == "failing" else None
                up.delay_s = 0.5 if name == "slow" else 0.0
                if name == "down":
                    await stack.aclose()

        async def sampler() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                rss, fds = sample(pid)
                series.append((time.monotonic() - t0, phase[0], rss, fds))
                await asyncio.sleep(0.5)  # the sampling period

        tasks = [asyncio.ensure_future(c) for c in
                 (churn(), churn(), churn(), vanish(), cycle_upstream(), sampler())]
        await asyncio.sleep(SECONDS)  # the soak's length
        stop.set()
        await asyncio.gather(*tasks)

        def released() -> tuple[float, int] | None:  # closing connections finish
            now = sample(pid)
            return now if now[1] <= idle[1] + 16 else None

        final = await wait_until(released, lambda: f"descriptors to be released: idle "
                                 f"{idle[1]}, now {sample(pid)[1]}", timeout=15, interval=0.1)
        assert proxy.proc.poll() is None, "the proxy died"
    finally:
        code = proxy.stop()
        await stack.aclose()

    print(f"\nsoak: {SECONDS:.0f} s, {counts['requests']} requests on fresh connections, "
          f"{counts['aborted']} abandoned mid-response, {counts['half_sent']} half-sent; "
          f"upstream saw {len(up.seen)}, each checked against the audit file")
    print(f"  idle: rss {idle[0]:.1f} MB, fds {idle[1]}")
    print("     t  phase     rss MB  fds")
    for t, name, rss, fds in series:
        print(f"  {t:5.1f}  {name:8s} {rss:7.1f}  {fds:4d}")
    print(f"  after: rss {final[0]:.1f} MB, fds {final[1]}")

    assert code == 0
    assert up.violations == [], up.violations[:5]
    assert counts["requests"] > 100
    warm = series[len(series) // 4:]  # after the warm-up quarter
    base_rss = min(r for _, _, r, _ in warm[:4])
    base_fd = min(f for _, _, _, f in warm[:4])
    late = warm[len(warm) // 2:]
    assert max(r for _, _, r, _ in late) <= base_rss + RSS_SLACK_MB, "RSS keeps growing"
    assert max(f for _, _, _, f in late) <= base_fd + FD_SLACK, "descriptors keep growing"
    assert final[0] <= base_rss + RSS_SLACK_MB
