"""Side-by-side benchmark of the clinic backend, a bare proxy and casf-proxy.

    bash bench/run.sh            (installs wrk, then runs this with defaults)
    python bench/run.py [--duration 10] [--connections 32] [--rate 1000] [--targets ...]
                        [--workers N] [--soak-requests N]

Starts, in one run on this machine: the clinic backend (reached directly: the
limit), a bare aiohttp pass-through proxy (bench/bare_proxy.py: the floor of
any aiohttp proxy), casf-proxy on embedded defaults (memory state, SQLite
audit), and casf-proxy with a real redis-server and PostgreSQL (started here,
fsync on). Each is measured on a read route (GET /appointments) and a write
route (POST /appointments, unique Idempotency-Key per request), with API-key
auth and the example's Rego policy, under two load shapes: maximum throughput
(wrk, closed loop) and a fixed rate (bench/loadgen.py, open loop, latency from
each request's scheduled time). Reports req/s, p50/p90/p99/p99.9, errors,
ratios against the direct backend and the bare proxy, RSS of each process,
and checks that the audit trail holds one ALLOW decision per forwarded request.
Prints a table and writes bench/results/latest.json.

Target ``mcp`` (in ``--targets``): the MCP example server
(examples/mcp/server.py, JSON answers, stateless) reached directly
(``mcp-direct``) and through casf-proxy's MCP door on examples/mcp/casf.yaml
(``mcp``, embedded defaults): ``tools/call`` of ``list_appointments`` (read)
and ``create_appointment`` (write, unique ``Idempotency-Key``) at the fixed
rate ``--mcp-rate`` (the SDK server is far slower than the clinic backend),
decisions/s and latency percentiles, in the same run as the REST routes.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import PostgresServer, RedisServer, free_port  # noqa: E402

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
    fixed_rate: dict[str, Any] = field(default_factory=dict)
    # the proxy process's CPU time (user + system, all threads and child
    # processes) during the measured wrk run, per request served; None for direct
    cpu_us_per_request: float | None = None


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited early: {proc.args!r}")
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


_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree: every thread of ``pid`` and of each
    live descendant, plus the children that already exited and were waited for."""
    total = 0
    seen: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            # fields after the command (which may hold spaces): state is field 3
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
        total += utime + stime + cutime + cstime
        todo += _children(p)
    return total / _TICK


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process tree has used so far."""
    return cpu_seconds(pid)


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


MCP_CALLS = {"read": ("list_appointments", {}),
             "write": ("create_appointment", {"patient_id": "p1",
                                              "slot": "2026-11-23T10:00:00Z"})}


def fixed_rate(url: str, route: str, rate: float, duration: float, *,
               mcp: bool = False, proxy: int | None = None) -> dict[str, Any]:
    """bench/loadgen.py on the route (with ``mcp``: tools/call on the MCP endpoint);
    with ``proxy`` (its pid), also the proxy's CPU time per request sent."""
    args = [PY, str(ROOT / "bench" / "loadgen.py"), url + ("/mcp" if mcp else "/appointments"),
            "--rate", str(rate), "--duration", str(duration), "--json"]
    if mcp:
        tool, arguments = MCP_CALLS[route]
        args += ["--mcp-tool", tool, "--mcp-args", json.dumps(arguments)]
    if route == "write":
        args.append("--write")
    cpu_before = cpu_s(proxy) if proxy is not None else 0.0
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    got = dict(json.loads(out))
    if proxy is not None:  # the generator's 2 s warm-up included: every request sent
        sent = rate * (2.0 + duration)
        got["proxy_cpu_ms_per_request"] = round((cpu_s(proxy) - cpu_before) * 1000 / sent, 3)
    # as wrk's "Non-2xx or 3xx responses": a refusal (e.g. 503 under overload) is an error
    got["errors"] += sum(n for status, n in got["statuses"].items() if not 200 <= int(status) < 400)
    return got


def run_mcp(tmp: Path, routes: list[str], rate: float, duration: float) -> list[Result]:
    """The MCP example server directly and behind casf-proxy's MCP door, at a fixed rate."""
    results: list[Result] = []
    with ExitStack() as per:
        server_port, port, admin = free_port(), free_port(), free_port()
        server = per.enter_context(process(
            [PY, "examples/mcp/server.py", "--port", str(server_port), "--json",
             "--stateless"], server_port))
        direct = f"http://127.0.0.1:{server_port}"
        env = {"MCP_UPSTREAM": direct, "CASF_PORT": str(port), "CASF_ADMIN_PORT": str(admin),
               "CASF_LOG_LEVEL": "warning", "CASF_SHUTDOWN_DELAY_MS": "0",
               "CASF_AUDIT_PATH": str(tmp / "mcp.db")}
        proxy = per.enter_context(process(
            [PY, "-m", "proxy.cli", "run", "-c", "examples/mcp/casf.yaml"], port, env,
            tmp / "mcp.log"))
        targets = (("mcp-direct", direct, {"server": server}),
                   ("mcp", f"http://127.0.0.1:{port}", {"server": server, "proxy": proxy}))
        # route by route, so both targets meet the server in the same state (the
        # writes add appointments that list_appointments then returns)
        for route in routes:
            for target, url, procs in targets:
                fr = fixed_rate(url, route, rate, duration, mcp=True,
                                proxy=procs["proxy"].pid if "proxy" in procs else None)
                res = Result(target, route, rps=fr["achieved_rate"], p50_ms=fr["p50_ms"],
                             p90_ms=fr["p90_ms"], p99_ms=fr["p99_ms"], errors=fr["errors"],
                             requests=fr["requests"], fixed_rate=fr,
                             rss_mb={n: round(rss_mb(p.pid), 1) for n, p in procs.items()})
                results.append(res)
                print(f"{target:10} {route:5} tools/call at {rate:.0f}/s: "
                      f"{fr['achieved_rate']} decisions/s  p50 {fr['p50_ms']} p99 "
                      f"{fr['p99_ms']} p99.9 {fr['p99_9_ms']} ms errors {fr['errors']}"
                      f" proxy CPU {fr.get('proxy_cpu_ms_per_request', '-')} ms/request",
                      flush=True)
    return results


def upstream_received(upstream: str) -> int:
    """Requests the backend has received on /appointments (its own counter)."""
    import urllib.request

    with urllib.request.urlopen(upstream + "/_stats", timeout=5) as r:
        stats = json.loads(r.read())
    return sum(n for k, n in stats.items() if k.endswith(" /appointments"))


# ALLOW decision records of requests that were then forwarded: an ALLOW committed
# after its request's wait gave up is followed by that request's DENY 503
# Audit_Unavailable (it was refused, not forwarded), and an ALLOW whose request
# found no free upstream connection within upstream.pool_timeout_ms has an
# outcome 503 Upstream_Busy (it never reached the upstream); neither is counted
_BUSY = ("SELECT 1 FROM audit_events o WHERE o.request_id = a.request_id "
         "AND o.kind = 'outcome' AND o.status = 503 "
         "AND CAST(o.reason_codes AS TEXT) LIKE '%Upstream_Busy%'")
_FORWARDED_ALLOWS = (
    "SELECT count(*) FROM audit_events a WHERE a.kind = 'decision' AND a.decision = 'ALLOW' "
    "AND NOT EXISTS (SELECT 1 FROM audit_events d WHERE d.request_id = a.request_id "
    f"AND d.kind = 'decision' AND d.decision = 'DENY' AND d.status = 503) "
    f"AND NOT EXISTS ({_BUSY})")
_REFUSED = ("SELECT count(*) FROM audit_events WHERE kind = 'decision' AND decision = 'DENY' "
            "AND status = 503")
_REFUSED_BUSY = ("SELECT count(*) FROM audit_events a WHERE a.kind = 'decision' "
                 f"AND a.decision = 'ALLOW' AND EXISTS ({_BUSY})")


def audit_allows(target: str, tmp: Path, dsn: str | None) -> tuple[int, int, int]:
    """(ALLOW decisions of forwarded requests, 503 refusals, ALLOWs refused 503
    Upstream_Busy) from the proxy's audit."""
    if dsn is not None:
        import asyncio

        import asyncpg

        async def count() -> tuple[int, int, int]:
            conn = await asyncpg.connect(dsn)
            try:
                return (int(await conn.fetchval(_FORWARDED_ALLOWS)),
                        int(await conn.fetchval(_REFUSED)),
                        int(await conn.fetchval(_REFUSED_BUSY)))
            finally:
                await conn.close()

        return asyncio.run(count())
    import sqlite3

    db = sqlite3.connect(tmp / f"{target}.db")
    try:
        return (int(db.execute(_FORWARDED_ALLOWS).fetchone()[0]),
                int(db.execute(_REFUSED).fetchone()[0]),
                int(db.execute(_REFUSED_BUSY).fetchone()[0]))
    finally:
        db.close()


def start_target(per: ExitStack, target: str, backend: subprocess.Popen[bytes], upstream: str,
                 tmp: Path, workers: int) -> tuple[str, dict[str, subprocess.Popen[bytes]],
                                                   str | None]:
    """Start one target (and what it needs); returns its URL, processes and PG DSN."""
    procs = {"backend": backend}
    dsn: str | None = None
    if target == "direct":
        return upstream, procs, None
    if target == "bare":
        port = free_port()
        procs["proxy"] = per.enter_context(process(
            [PY, "bench/bare_proxy.py", "--port", str(port), "--upstream", upstream], port))
        return f"http://127.0.0.1:{port}", procs, None
    if target not in ("embedded", "redis", "full"):
        raise SystemExit(f"unknown target {target}")
    port, admin = free_port(), free_port()
    env = {"CLINIC_UPSTREAM": upstream, "CASF_PORT": str(port),
           "CASF_ADMIN_PORT": str(admin), "CASF_LOG_LEVEL": "warning",
           "CASF_DECISIONS_PORT": str(free_port()),
           "CASF_SHUTDOWN_DELAY_MS": "0",
           "CASF_AUDIT_PATH": str(tmp / f"{target}.db")}
    if target in ("redis", "full"):
        redis = RedisServer(tmp / f"redis-{target}")
        redis.start()
        per.callback(redis.stop)
        env["REDIS_URL"] = redis.url
        if redis.proc is not None:
            procs["redis"] = redis.proc
    if target == "full":
        pg = PostgresServer(fsync=True)
        pg.start()
        per.callback(pg.destroy)
        env["PG_DSN"] = dsn = pg.dsn
        subprocess.run([PY, "-m", "proxy.cli", "audit", "migrate", "-c",
                        "examples/clinic/casf.yaml"], cwd=ROOT, check=True,
                       env={**os.environ, **env}, capture_output=True)
    n = workers if target in ("redis", "full") else 1
    procs["proxy"] = per.enter_context(process(
        [PY, "-m", "proxy.cli", "run", "-c", "examples/clinic/casf.yaml",
         "--workers", str(n)], port, env, tmp / f"{target}.log"))
    return f"http://127.0.0.1:{port}", procs, dsn


def settled_count(upstream: str, timeout: float = 60.0) -> int:
    """The backend's request count once it has stopped moving (the proxy drained)."""
    last = upstream_received(upstream)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = upstream_received(upstream)
        if now == last:
            break
        last = now
    time.sleep(0.5)  # the last outcome records commit after the response
    return last


def soak(url: str, route: str, connections: int, requests: int, upstream: str,
         procs: dict[str, subprocess.Popen[bytes]], every: float = 5.0) -> dict[str, Any]:
    """wrk until the backend has received ``requests``; RSS sampled every ``every`` s.

    Reports the proxy's RSS at the end, its maximum, and its trend (least squares,
    MB per minute) over the last five minutes and over the whole run.
    """
    import signal

    args = ["wrk", "-t1", f"-c{connections}", "-d24h", "-H", f"X-API-Key: {API_KEY}"]
    if route == "write":
        args += ["-s", str(ROOT / "bench" / "write.lua")]
    before = upstream_received(upstream)
    started = time.monotonic()
    load = subprocess.Popen([*args, url + "/appointments"], stdout=subprocess.PIPE, text=True)
    samples: list[tuple[float, int, float]] = []  # (seconds, requests, RSS MB)
    try:
        while True:
            time.sleep(every)
            done = upstream_received(upstream) - before
            samples.append((round(time.monotonic() - started, 1), done,
                            round(rss_mb(procs["proxy"].pid), 1)))
            print(f"soak {samples[-1][0]:7.0f} s  {done:9d} requests  RSS "
                  f"{samples[-1][2]:6.1f} MB", flush=True)
            if done >= requests or load.poll() is not None:
                break
    finally:
        load.send_signal(signal.SIGINT)
        out = load.communicate(timeout=30)[0]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (
        sum(int(g) for g in sock.groups()) if sock else 0)

    def slope(points: list[tuple[float, int, float]]) -> float:
        if len(points) < 2:
            return float("nan")
        n = len(points)
        mx = sum(p[0] for p in points) / n
        my = sum(p[2] for p in points) / n
        var = sum((p[0] - mx) ** 2 for p in points)
        return round(sum((p[0] - mx) * (p[2] - my) for p in points) / var * 60, 3)

    end = samples[-1][0]
    return {"requests": samples[-1][1], "seconds": end, "errors": errors,
            "rss_end_mb": samples[-1][2], "rss_max_mb": max(p[2] for p in samples),
            "trend_last_5min_mb_per_min": slope([p for p in samples if p[0] >= end - 300]),
            "trend_all_mb_per_min": slope(samples), "samples": samples}


def cpu_table(results: list[Result]) -> str:
    """CPU per request (µs) of each proxy target and route, and what it adds over bare."""
    cpu = {(r.target, r.route): r.cpu_us_per_request for r in results}
    bare = {route: cpu.get(("bare", route)) for route in ("read", "write")}

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    def added(target: str, route: str) -> str:
        v, b = cpu.get((target, route)), bare[route]
        return "-" if v is None or b is None else f"{v - b:+.0f}"

    lines = ["\n| CPU per request (proxy process, us) | read | write | added over bare: read "
             "| write |", "|---|---|---|---|---|"]
    for target in dict.fromkeys(r.target for r in results if r.cpu_us_per_request is not None):
        lines.append(f"| {target} | {cell(cpu.get((target, 'read')))} "
                     f"| {cell(cpu.get((target, 'write')))} | {added(target, 'read')} "
                     f"| {added(target, 'write')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--targets", default="direct,bare,embedded,full")
    ap.add_argument("--rate", type=float, default=1000.0, help="fixed-rate load (req/s)")
    ap.add_argument("--workers", type=int, default=1,
                    help="casf-proxy run --workers N for the redis and full targets")
    ap.add_argument("--rate-duration", type=float, default=10.0)
    ap.add_argument("--mcp-rate", type=float, default=200.0,
                    help="fixed-rate load of the mcp target (tools/call per second)")
    ap.add_argument("--routes", default="read,write")
    ap.add_argument("--soak-requests", type=int, default=0,
                    help="instead of the throughput and fixed-rate runs: load each target "
                         "and route until the backend got this many requests, sampling RSS")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON output (default bench/results/latest.json, or soak.json)")
    a = ap.parse_args()
    if a.out is None:
        a.out = ROOT / "bench" / "results" / ("soak.json" if a.soak_requests else "latest.json")
    if shutil.which("wrk") is None:
        print("wrk not found: bash scripts/system-deps.sh wrk", file=sys.stderr)
        return 2
    targets = a.targets.split(",")
    routes = a.routes.split(",")
    results: list[Result] = []
    dsns: dict[str, str] = {}
    audit_checks: dict[str, dict[str, int]] = {}
    soaks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="casf-bench-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        backend_port = free_port()
        backend = stack.enter_context(process(
            [PY, "examples/clinic/backend.py", "--port", str(backend_port)], backend_port))
        upstream = f"http://127.0.0.1:{backend_port}"
        for target in targets:
            if target == "mcp":
                if not a.soak_requests:
                    results += run_mcp(tmp, routes, a.mcp_rate, a.rate_duration)
                continue
            with ExitStack() as per:
                url, procs, dsn = start_target(per, target, backend, upstream, tmp, a.workers)
                if dsn is not None:
                    dsns[target] = dsn
                received_before = upstream_received(upstream)
                for route in routes:
                    if a.soak_requests:
                        got_soak = soak(url, route, a.connections, a.soak_requests, upstream,
                                        procs)
                        soaks.append({"target": target, "route": route, **got_soak})
                        continue
                    wrk(url, route, a.warmup, a.connections)
                    proxy = procs.get("proxy")
                    cpu_before = cpu_seconds(proxy.pid) if proxy is not None else 0.0
                    got = wrk(url, route, a.duration, a.connections)
                    res = Result(target, route, **got)  # type: ignore[arg-type]
                    if proxy is not None and res.requests:
                        res.cpu_us_per_request = round(
                            (cpu_seconds(proxy.pid) - cpu_before) / res.requests * 1e6, 1)
                    res.fixed_rate = fr = fixed_rate(
                        url, route, a.rate, a.rate_duration,
                        proxy=procs["proxy"].pid if "proxy" in procs else None)
                    res.rss_mb = {name: round(rss_mb(p.pid), 1) for name, p in procs.items()}
                    results.append(res)
                    print(f"{target:9} {route:5} {res.rps:9.0f} req/s  p50 {res.p50_ms:6.2f} ms"
                          f"  p99 {res.p99_ms:6.2f} ms  errors {res.errors} | at {a.rate:.0f}/s:"
                          f" p50 {fr['p50_ms']} p99 {fr['p99_ms']} p99.9 {fr['p99_9_ms']} ms"
                          f" errors {fr['errors']} proxy CPU "
                          f"{fr.get('proxy_cpu_ms_per_request', '-')} ms/request"
                          f" | CPU/request (closed loop) {res.cpu_us_per_request} us",
                          flush=True)
                if target in ("embedded", "redis", "full"):
                    forwarded = settled_count(upstream) - received_before
                    allows, refused, busy = audit_allows(target, tmp, dsns.get(target))
                    audit_checks[target] = {"forwarded": forwarded, "allow_records": allows,
                                            "refused_503": refused, "upstream_busy_503": busy}
                    print(f"{target:9} audit: {audit_checks[target]}", flush=True)
    base = {(r.route, r.target): r.rps for r in results}
    print(f"\n| target | route | req/s | x direct | x bare | p50 ms | p99 ms | errors "
          f"| @{a.rate:.0f}/s p50 | p90 | p99 | p99.9 ms | RSS proxy MB |"
          f"\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        d, b = base.get((r.route, "direct")), base.get((r.route, "bare"))
        if r.target.startswith("mcp"):  # against the MCP server, not the clinic backend
            d, b = base.get((r.route, "mcp-direct")), None
        fr = r.fixed_rate
        print(f"| {r.target} | {r.route} | {r.rps:.0f} | {r.rps / d if d else float('nan'):.2f} "
              f"| {r.rps / b if b else float('nan'):.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
              f"| {r.errors} | {fr.get('p50_ms')} | {fr.get('p90_ms')} | {fr.get('p99_ms')} "
              f"| {fr.get('p99_9_ms')} | {r.rss_mb.get('proxy', '-')} |")
    print(cpu_table(results))
    for sk in soaks:
        print(f"soak {sk['target']} {sk['route']}: {sk['requests']} requests in "
              f"{sk['seconds']:.0f} s, errors {sk['errors']}, proxy RSS at the end "
              f"{sk['rss_end_mb']} MB (max {sk['rss_max_mb']}), trend over the last 5 min "
              f"{sk['trend_last_5min_mb_per_min']} MB/min (whole run "
              f"{sk['trend_all_mb_per_min']} MB/min)")
    for target, check in audit_checks.items():
        verdict = "ok" if check["forwarded"] == check["allow_records"] else "MISMATCH"
        print(f"audit {target}: {check['allow_records']} ALLOW records for "
              f"{check['forwarded']} forwarded requests: {verdict} "
              f"({check['refused_503']} requests refused 503 by a fail-closed dependency, "
              f"{check.get('upstream_busy_503', 0)} allowed but refused 503 Upstream_Busy: no "
              "upstream connection free in time)")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "settings": {"duration_s": a.duration, "connections": a.connections,
                     "fixed_rate": a.rate, "fixed_rate_duration_s": a.rate_duration,
                     "mcp_rate": a.mcp_rate},
        "results": [asdict(r) for r in results], "soak": soaks, "audit": audit_checks},
        indent=2))
    print(f"\nwritten to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
