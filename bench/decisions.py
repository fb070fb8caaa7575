"""Decisions per second and latency of the decision doors, against casf-core's targets.

    python bench/decisions.py [--rate 200] [--duration 10] [--connections 16] [--json]

Starts the clinic example embedded (in-memory state, SQLite audit with
fsync), then for each door — ``POST /verify`` (a write tool, a unique
``request_id`` per request: every decision is a new claim, a policy decision
and a committed decision record), ``GET /authz/forward`` (a read route) and
the Envoy door (``POST /authz/envoy/appointments`` with the body) — measures:

- **max**: decisions/s with ``--connections`` keep-alive connections in a
  closed loop for ``--duration`` seconds;
- **fixed rate**: an open-loop run at ``--rate`` decisions/s, latency from
  each request's scheduled time (no coordinated omission): p50/p95/p99.

casf-core's own targets for its verifier: p50 < 15 ms, p95 < 50 ms,
> 200 req/s. The table says which hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import Pool, Stats, one  # noqa: E402

Builder = Callable[[str], bytes]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def verify_request(host: str) -> bytes:
    body = json.dumps({"request_id": uuid.uuid4().hex, "tool": "cliniccloud.create_appointment",
                       "subject": {"patient_id": "p1"},
                       "args": {"slot": "2026-11-23T10:00:00Z"}}).encode()
    return (f"POST /verify HTTP/1.1\r\nHost: {host}\r\nX-API-Key: demo-receptionist\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def forward_request(host: str) -> bytes:
    return (f"GET /authz/forward HTTP/1.1\r\nHost: {host}\r\nX-API-Key: demo-receptionist\r\n"
            "X-Original-Method: GET\r\nX-Original-URI: /appointments\r\n\r\n").encode()


def envoy_request(host: str) -> bytes:
    body = b'{"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}'
    return (f"POST /authz/envoy/appointments HTTP/1.1\r\nHost: {host}\r\n"
            f"X-API-Key: demo-receptionist\r\nIdempotency-Key: {uuid.uuid4().hex}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


DOORS: dict[str, Builder] = {"verify": verify_request, "forward": forward_request,
                             "envoy": envoy_request}


def pct(lat: list[float], p: float) -> float:
    return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 2) if lat else -1.0


async def closed_loop(port: int, build: Builder, connections: int, duration: float
                      ) -> dict[str, Any]:
    host = f"127.0.0.1:{port}"
    pool = Pool("127.0.0.1", port)
    stats = Stats()
    stop = time.perf_counter() + duration

    async def client() -> None:
        while time.perf_counter() < stop:
            await one(pool, build(host), time.perf_counter(), stats)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"decisions_per_s": round(len(stats.latencies) / elapsed, 1),
            "errors": stats.errors, "statuses": stats.statuses}


async def fixed_rate(port: int, build: Builder, rate: float, duration: float,
                     warmup: float = 2.0) -> dict[str, Any]:
    host = f"127.0.0.1:{port}"
    pool = Pool("127.0.0.1", port)
    warm, stats = Stats(), Stats()
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    for i in range(int(rate * (warmup + duration))):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.ensure_future(one(pool, build(host), scheduled,
                                         warm if i < rate * warmup else stats))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    lat = sorted(stats.latencies)
    return {"rate": rate, "requests": len(lat), "errors": stats.errors,
            "statuses": stats.statuses, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
            "p99_ms": pct(lat, 99)}


@contextlib.contextmanager
def clinic(tmp: Path) -> Iterator[int]:
    backend_port, port, admin, decisions = free_port(), free_port(), free_port(), free_port()
    env = {**os.environ, "CLINIC_UPSTREAM": f"http://127.0.0.1:{backend_port}",
           "CASF_PORT": str(port), "CASF_ADMIN_PORT": str(admin),
           "CASF_DECISIONS_PORT": str(decisions), "CASF_LOG_LEVEL": "warning",
           "CASF_SHUTDOWN_DELAY_MS": "0", "CASF_AUDIT_PATH": str(tmp / "audit.db")}
    env.pop("REDIS_URL", None)
    env.pop("PG_DSN", None)
    backend = subprocess.Popen([sys.executable, "examples/clinic/backend.py", "--port",
                                str(backend_port)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c",
                              "examples/clinic/casf.yaml"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", decisions), timeout=0.2):
                break
            if proxy.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("casf-proxy did not start")
            time.sleep(0.05)
        yield decisions
    finally:
        for p in (proxy, backend):
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)


async def measure(port: int, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in args.doors:
        build = DOORS[name]
        await closed_loop(port, build, args.connections, 1.0)  # warm-up
        out[name] = {"max": await closed_loop(port, build, args.connections, args.duration),
                     "fixed": await fixed_rate(port, build, args.rate, args.duration)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--doors", nargs="+", default=list(DOORS), choices=list(DOORS))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, clinic(Path(tmp)) as port:
        res = uvloop.run(measure(port, args))
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"| door | decisions/s (closed loop, {args.connections} conns) | "
          f"p50 / p95 / p99 ms at {args.rate:g}/s | errors | casf-core targets "
          "(p50 < 15, p95 < 50, > 200/s) |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        f, m = r["fixed"], r["max"]
        held = (f["p50_ms"] < 15 and f["p95_ms"] < 50 and m["decisions_per_s"] > 200)
        print(f"| {name} | {m['decisions_per_s']} | {f['p50_ms']} / {f['p95_ms']} / "
              f"{f['p99_ms']} | {m['errors'] + f['errors']} | {'held' if held else 'NOT held'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
