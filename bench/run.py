"""Side-by-side throughput of the clinic backend, a bare proxy and casf-proxy.

    python bench/run.py [--duration 10] [--connections 32] [--targets ...]

Starts, in one run on this machine: the clinic backend (reached directly: the
limit), a bare aiohttp pass-through proxy (bench/bare_proxy.py: the floor of any
aiohttp proxy), casf-proxy on embedded defaults, and casf-proxy with a real
redis-server (started here). Each is loaded with wrk (closed loop) on a read
route (GET /appointments) and a write route (POST /appointments with a unique
Idempotency-Key per request), with API-key auth and the example's Rego policy.
Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import RedisServer, free_port  # noqa: E402

PY = sys.executable
API_KEY = "demo-receptionist"


@dataclass
class Result:
    target: str
    route: str
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    requests: int
    rss_mb: dict[str, float] = field(default_factory=dict)


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None,
            log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = log.open("ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def wrk(url: str, route: str, duration: float, connections: int) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            "-H", f"X-API-Key: {API_KEY}"]
    if route == "write":
        args += ["-s", str(ROOT / "bench" / "write.lua")]
    args.append(url + "/appointments")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in sock.groups()) if sock else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"rps": rps, "p50_ms": _ms(pct.get("50", "")), "p90_ms": _ms(pct.get("90", "")),
            "p99_ms": _ms(pct.get("99", "")), "errors": errors, "requests": total}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--targets", default="direct,bare,embedded,redis")
    ap.add_argument("--routes", default="read,write")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: bash scripts/system-deps.sh wrk", file=sys.stderr)
        return 2
    targets = a.targets.split(",")
    routes = a.routes.split(",")
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="casf-bench-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        backend_port = free_port()
        backend = stack.enter_context(process(
            [PY, "examples/clinic/backend.py", "--port", str(backend_port)], backend_port))
        upstream = f"http://127.0.0.1:{backend_port}"
        for target in targets:
            with ExitStack() as per:
                procs = {"backend": backend}
                if target == "direct":
                    url = upstream
                elif target == "bare":
                    port = free_port()
                    procs["proxy"] = per.enter_context(process(
                        [PY, "bench/bare_proxy.py", "--port", str(port), "--upstream", upstream],
                        port))
                    url = f"http://127.0.0.1:{port}"
                elif target in ("embedded", "redis"):
                    port, admin = free_port(), free_port()
                    env = {"CLINIC_UPSTREAM": upstream, "CASF_PORT": str(port),
                           "CASF_ADMIN_PORT": str(admin), "CASF_LOG_LEVEL": "warning",
                           "CASF_AUDIT_PATH": str(tmp / f"{target}.db")}
                    if target == "redis":
                        redis = RedisServer(tmp / "redis")
                        redis.start()
                        per.callback(redis.stop)
                        env["REDIS_URL"] = redis.url
                        if redis.proc is not None:
                            procs["redis"] = redis.proc  # type: ignore[assignment]
                    procs["proxy"] = per.enter_context(process(
                        [PY, "-m", "proxy.cli", "run", "-c", "examples/clinic/casf.yaml"],
                        port, env, tmp / f"{target}.log"))
                    url = f"http://127.0.0.1:{port}"
                else:
                    raise SystemExit(f"unknown target {target}")
                for route in routes:
                    wrk(url, route, a.warmup, a.connections)
                    got = wrk(url, route, a.duration, a.connections)
                    res = Result(target, route, **got)  # type: ignore[arg-type]
                    res.rss_mb = {name: round(rss_mb(p.pid), 1) for name, p in procs.items()}
                    results.append(res)
                    print(f"{target:9} {route:5} {res.rps:9.0f} req/s  p50 {res.p50_ms:6.2f} ms"
                          f"  p99 {res.p99_ms:6.2f} ms  errors {res.errors}", flush=True)
    base = {(r.route, r.target): r.rps for r in results}
    print("\n| target | route | req/s | x direct | x bare | p50 ms | p99 ms | errors |"
          "\n|---|---|---|---|---|---|---|---|")
    for r in results:
        d, b = base.get((r.route, "direct")), base.get((r.route, "bare"))
        print(f"| {r.target} | {r.route} | {r.rps:.0f} | {r.rps / d if d else float('nan'):.2f} "
              f"| {r.rps / b if b else float('nan'):.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
              f"| {r.errors} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"duration_s": a.duration, "connections": a.connections},
        "results": [asdict(r) for r in results]}, indent=2))
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
