"""Chaos under load: two proxy processes, real Redis and PostgreSQL.

Steady traffic (reads and idempotent writes, through both processes) runs
while Redis, PostgreSQL and the upstream are each stopped and restarted, then
Redis and PostgreSQL together. Afterwards:

* every request the upstream received has a committed ALLOW decision record
  with its request id (the Idempotency-Key for writes) in the audit chains;
* no write reached the upstream while Redis or PostgreSQL was down, and no
  request at all while PostgreSQL (the audit store) was down;
* during each outage the clients got the documented answers (503 fail-closed
  for writes without Redis, 503 Audit_Unavailable without PostgreSQL, 502
  without the upstream) and reads went on without Redis;
* ``casf-proxy audit verify`` proves every chain;
* both processes recovered without a restart: same PIDs, ready, serving.

A request in flight when a dependency is killed may have been admitted and
audited just before; writes the upstream received within
``GRACE_S`` of the kill are therefore not counted as "forwarded while down".
Bounded to about a minute (``CASF_CHAOS_SECONDS`` scales the phases).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from proxy.audit.postgres import migrate
from tests.conftest import ROOT, Upstream, _upstream_app, clinic_env, write_config
from tests.servers import PostgresServer, ProxyProcess, RedisServer, free_port
from tests.waiting import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

PHASE_S = float(os.environ.get("CASF_CHAOS_SECONDS", "4"))  # length of each outage / calm
GRACE_S = 0.3
WORKERS = 6


@dataclass
class Sent:
    t0: float
    t1: float
    proxy: int
    method: str
    rid: str
    status: int
    reasons: tuple[str, ...]


@dataclass
class Received:
    t: float
    method: str
    rid: str


@dataclass
class Timeline:
    windows: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    faults: int = 0

    def down(self, name: str) -> None:
        self.windows.setdefault(name, []).append((time.monotonic(), float("inf")))
        self.faults += 1

    def up(self, name: str) -> None:
        start, _ = self.windows[name][-1]
        self.windows[name][-1] = (start, time.monotonic())

    def inside(self, name: str, t: float, grace: float = 0.0) -> bool:
        return any(a + grace <= t <= b for a, b in self.windows.get(name, []))


class ChaosUpstream:
    """The recording upstream on a fixed port, stoppable and restartable."""

    def __init__(self) -> None:
        self.state = Upstream()
        self.port = free_port()
        self.state.url = f"http://127.0.0.1:{self.port}"
        self.received: list[Received] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = _upstream_app(self.state)

        @web.middleware
        async def stamp(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            self.received.append(Received(time.monotonic(), request.method,
                                          request.headers.get("X-Request-Id", "")))
            return await handler(request)

        app.middlewares.append(stamp)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, backlog=1024,
                          reuse_address=True).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@contextlib.asynccontextmanager
async def servers(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, PostgresServer]]:
    redis = RedisServer(tmp_path / "redis")
    pg = PostgresServer()  # its own server: this test stops it
    try:
        await asyncio.to_thread(redis.start)
        await asyncio.to_thread(pg.start)
        await migrate(pg.dsn)
        yield redis, pg
    finally:
        redis.stop()
        await asyncio.to_thread(pg.destroy)


async def traffic(procs: list[ProxyProcess], sent: list[Sent], stop: asyncio.Event) -> None:
    ids = itertools.count()
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=64)) as s:
        async def worker(w: int) -> None:
            while not stop.is_set():
                n = next(ids)
                which = n % len(procs)
                kind = n % 20
                rid = f"chaos-{n}"
                if kind < 10:
                    method, path, key, body = ("GET", f"/appointments?patient_id=p{n % 7}",
                                               "demo-receptionist", None)
                    headers = {"X-Request-Id": rid}
                elif kind < 17:
                    method, path, key, body = ("POST", "/appointments", "demo-receptionist",
                                               {"patient_id": f"p{n % 7}", "slot": str(n)})
                    headers = {"Idempotency-Key": rid}
                else:
                    method, path, key, body = ("DELETE", f"/appointments/a-{n}", "demo-doctor",
                                               None)
                    headers = {"Idempotency-Key": rid}
                headers["X-API-Key"] = key
                t0 = time.monotonic()
                try:
                    async with s.request(method, procs[which].url + path, json=body,
                                         headers=headers) as r:
                        raw = await r.read()
                        status = r.status
                        reasons: tuple[str, ...] = ()
                        if r.headers.get("Content-Type", "").startswith("application/json") \
                                and b'"reason_codes"' in raw:
                            reasons = tuple(json.loads(raw)["reason_codes"])
                except (aiohttp.ClientError, TimeoutError):
                    status, reasons = 0, ()
                sent.append(Sent(t0, time.monotonic(), which, method, rid, status, reasons))
                await asyncio.sleep(0.01)  # the load's pacing

        await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def pg_rows(dsn: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return list(await conn.fetch(
            "SELECT chain_id, seq, kind, request_id, decision, status, method "
            "FROM audit_events ORDER BY chain_id, seq"))
    finally:
        await conn.close()


async def wait_ready(procs: list[ProxyProcess], deadline_s: float = 20) -> None:
    async with aiohttp.ClientSession() as s:
        async def ready() -> bool:
            for p in procs:
                try:
                    async with s.get(p.admin + "/healthz") as r:
                        if r.status != 200:
                            return False
                except aiohttp.ClientError:
                    return False
            return True

        await wait_until(ready, lambda: f"every proxy ({[p.port for p in procs]}) ready",
                         timeout=deadline_s, interval=0.1)


async def test_chaos_under_load(tmp_path: Path) -> None:
    started = time.monotonic()
    up = ChaosUpstream()
    await up.start()
    async with servers(tmp_path) as (redis, pg):
        def patch(d: dict[str, Any]) -> None:
            d["audit"].pop("chain_id", None)  # each process leases its own worker chain
            d["audit"]["timeout_ms"] = 1000
            d["upstream"].update(connect_timeout_ms=500, timeout_ms=5000)

        cfg = write_config(tmp_path, patch)
        procs = []
        for name in ("a", "b"):
            env = dict(clinic_env(up.state.url, tmp_path, PG_DSN=pg.dsn, REDIS_URL=redis.url,
                                  HOSTNAME="chaos").variables)
            proc = ProxyProcess(cfg, env, tmp_path / f"{name}.log")
            proc.start()
            procs.append(proc)
        pids = [p.proc.pid for p in procs if p.proc is not None]
        try:
            await wait_ready(procs)
            sent: list[Sent] = []
            stop = asyncio.Event()
            tl = Timeline()
            load = asyncio.ensure_future(traffic(procs, sent, stop))

            async def outage(names: list[str], down: list[Callable[[], Awaitable[None]]],
                             back: list[Callable[[], Awaitable[None]]]) -> None:
                for name, fn in zip(names, down, strict=True):
                    await fn()
                    tl.down(name)
                await asyncio.sleep(PHASE_S)  # the outage's length is the scenario
                for name, fn in zip(names, back, strict=True):
                    tl.up(name)
                    await fn()
                await asyncio.sleep(PHASE_S)  # calm: recovery under load

            async def redis_down() -> None:
                await asyncio.to_thread(redis.stop)

            async def redis_up() -> None:
                await asyncio.to_thread(redis.start)

            async def pg_down() -> None:
                await asyncio.to_thread(pg.stop, "immediate")

            async def pg_up() -> None:
                await asyncio.to_thread(pg.start)

            await asyncio.sleep(PHASE_S / 2)  # steady state first
            await outage(["redis"], [redis_down], [redis_up])
            await outage(["postgres"], [pg_down], [pg_up])
            await outage(["upstream"], [up.stop], [up.start])
            await outage(["redis", "postgres"], [redis_down, pg_down], [redis_up, pg_up])
            await wait_ready(procs)  # readiness came back by itself
            calm_from = time.monotonic()
            await asyncio.sleep(PHASE_S / 2)  # load on the recovered proxies
            stop.set()
            await load
        finally:
            codes = []
            for p in procs:
                alive = p.proc is not None and p.proc.poll() is None
                codes.append(p.stop() if alive else -1)
            await up.stop()
        rows = await pg_rows(pg.dsn)
        verify = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "proxy.cli", "audit", "verify", "-c",
                             str(cfg)], capture_output=True, text=True, cwd=ROOT, timeout=120,
            env={**os.environ, "PG_DSN": pg.dsn, "CLINIC_UPSTREAM": up.state.url})

    # -------------------------------------------------------------- the proxies
    assert codes == [0, 0], "a proxy died during the run (or did not stop cleanly)"
    assert all(p.proc is None for p in procs) and len(set(pids)) == 2  # never restarted
    assert verify.returncode == 0, verify.stdout + verify.stderr

    # -------------------------------------------------------------- nothing unaudited
    allowed = Counter(r["request_id"] for r in rows
                      if r["kind"] == "decision" and r["decision"] == "ALLOW")
    received = Counter(x.rid for x in up.received)
    missing = [rid for rid, n in received.items() if allowed[rid] < n]
    assert missing == [], f"forwarded without a committed ALLOW decision: {missing[:10]}"

    # -------------------------------------------------------------- nothing while down
    writes = [x for x in up.received if x.method in ("POST", "DELETE")]
    for dep in ("redis", "postgres"):
        during = [x for x in writes if tl.inside(dep, x.t, GRACE_S)]
        assert during == [], f"writes forwarded while {dep} was down: {during[:5]}"
    during_pg = [x for x in up.received if tl.inside("postgres", x.t, GRACE_S)]
    assert during_pg == [], f"requests forwarded without the audit store: {during_pg[:5]}"

    # ---------------------------------------- clients saw only documented answers
    def answers(dep: str, method: str) -> Counter[tuple[int, tuple[str, ...]]]:
        return Counter((s.status, s.reasons) for s in sent
                       if s.method == method and tl.inside(dep, s.t0, GRACE_S)
                       and tl.inside(dep, s.t1))

    only_redis = [s for s in sent if tl.inside("redis", s.t0, GRACE_S)
                  and not tl.inside("postgres", s.t0)]
    assert any(s.method == "GET" and s.status == 200 for s in only_redis), "reads failed open"
    redis_writes = Counter((s.status, s.reasons) for s in only_redis if s.method == "POST"
                           and tl.inside("redis", s.t1))
    assert set(redis_writes) <= {(503, ("FAIL_CLOSED", "Inv_ReplayCheckUnavailable"))}, \
        redis_writes
    pg_answers = answers("postgres", "GET") + answers("postgres", "POST")
    assert pg_answers and all(status == 503 and "Audit_Unavailable" in reasons
                              for status, reasons in pg_answers), pg_answers
    up_answers = answers("upstream", "GET")
    assert up_answers and {st for st, _ in up_answers} <= {502}, up_answers

    # -------------------------------------------------------------- recovered without restart
    after = [s for s in sent if s.t0 >= calm_from]
    for i in range(2):
        mine = [s for s in after if s.proxy == i]
        assert mine and all(s.status in (200, 201) for s in mine), Counter(
            (s.status, s.reasons) for s in mine)

    chains = sorted({r["chain_id"] for r in rows})
    elapsed = time.monotonic() - started
    print(f"\nchaos: {tl.faults} faults injected "
          f"({', '.join(f'{k} x{len(v)}' for k, v in tl.windows.items())}), "
          f"{len(sent)} requests sent, {len(up.received)} received by the upstream and each "
          f"matched to a committed ALLOW decision, {len(rows)} audit records in "
          f"{len(chains)} chains verified, {elapsed:.0f} s")
    print("  client answers:", Counter((s.status, s.reasons[:2]) for s in sent).most_common(8))
