"""Audit throughput into PostgreSQL: group commit vs one transaction per record.

Measured in one run, against one server and database, with the real sink
(``proxy.audit.postgres.PostgresAuditSink``: sealing, hashing, COPY, lease):

1. closed loop, ``--writers`` concurrent appenders: records/s with group
   commit (``batch_max`` 256) and with one transaction per record
   (``batch_max`` 1, i.e. a commit per record: what a non-batching writer does);
2. open loop at fixed request rates: the latency a request waits for its
   decision record to commit (what the audit stage adds before forwarding).

    python bench/audit_throughput.py                 # throwaway local server (fsync on)
    python bench/audit_throughput.py --dsn postgresql://user@host/db   # or PG_DSN

Each scenario writes its own chain in a fresh database; results are printed
and saved to bench/results/audit_throughput.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402

from proxy.audit.postgres import PostgresAuditSink, migrate  # noqa: E402
from proxy.audit.records import EventIds, now_iso  # noqa: E402

IDS = EventIds()


def record(i: int) -> dict[str, Any]:
    """A decision record shaped like the clinic's (same fields and sizes)."""
    return {
        "event_id": IDS.next(), "ts": now_iso(), "kind": "decision",
        "request_id": f"req-{i}", "trace_id": uuid.uuid4().hex, "actor": "user-receptionist",
        "role": "receptionist", "tenant": "t1", "tool": "cliniccloud.create_appointment",
        "effect": "write", "method": "POST", "route": "/appointments", "decision": "ALLOW",
        "status": 200, "reason_codes": [], "policy_hash": "sha256:" + "a" * 64,
        "body_sha256": "b" * 64,
        "attrs": {"subject": {"patient_id": f"p{i % 1000}"},
                  "args": {"slot": "2026-11-23T10:00:00Z"}, "context": {"tenant_id": "t1"}},
        "mode": "ALLOW", "shadow": False, "key_id": "key-receptionist",
    }


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def closed_loop(dsn: str, chain: str, batch_max: int, writers: int, total: int
                      ) -> dict[str, Any]:
    sink = PostgresAuditSink(dsn, chain, batch_max=batch_max, timeout_s=30)
    await sink.start()
    lat: list[float] = []
    counter = iter(range(total))

    async def writer() -> None:
        for i in counter:
            t = time.perf_counter()
            await sink.append(record(i))
            lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    elapsed = time.perf_counter() - t0
    batches = sink.batches
    await sink.close()
    return {"scenario": f"batch_max={batch_max}", "records": total, "writers": writers,
            "seconds": round(elapsed, 3), "records_per_s": round(total / elapsed),
            "transactions": batches, "avg_batch": round(total / max(batches, 1), 1),
            "append_p50_ms": round(pct(lat, 50) * 1000, 3),
            "append_p99_ms": round(pct(lat, 99) * 1000, 3)}


async def fixed_rate(dsn: str, chain: str, rate: int, seconds: float) -> dict[str, Any]:
    sink = PostgresAuditSink(dsn, chain, batch_max=256, timeout_s=30)
    await sink.start()
    lat: list[float] = []
    tasks: list[asyncio.Task[None]] = []

    async def one(i: int) -> None:
        t = time.perf_counter()
        await sink.append(record(i))
        lat.append(time.perf_counter() - t)

    n = int(rate * seconds)
    start = time.perf_counter()
    for i in range(n):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    batches = sink.batches
    await sink.close()
    return {"rate_per_s": rate, "records": n, "transactions": batches,
            "avg_batch": round(n / max(batches, 1), 1),
            "commit_wait_p50_ms": round(pct(lat, 50) * 1000, 3),
            "commit_wait_p95_ms": round(pct(lat, 95) * 1000, 3),
            "commit_wait_p99_ms": round(pct(lat, 99) * 1000, 3),
            "commit_wait_mean_ms": round(statistics.fmean(lat) * 1000, 3)}


async def run(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    name = "casf_bench_" + uuid.uuid4().hex[:8]
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        version = await admin.fetchval("SHOW server_version")
        fsync = await admin.fetchval("SHOW fsync")
        sync_commit = await admin.fetchval("SHOW synchronous_commit")
    finally:
        await admin.close()
    from urllib.parse import urlsplit, urlunsplit

    db = urlunsplit(urlsplit(dsn)._replace(path="/" + name))
    try:
        await migrate(db)
        await closed_loop(db, "warmup", 256, args.writers, 2000)
        group = await closed_loop(db, "group", 256, args.writers, args.records)
        single = await closed_loop(db, "single", 1, args.writers, args.per_record_records)
        rates = [await fixed_rate(db, f"rate-{r}", r, args.seconds) for r in args.rates]
    finally:
        admin = await asyncpg.connect(dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    return {"server": {"version": version, "fsync": fsync,
                       "synchronous_commit": sync_commit},
            "throughput": [group, single],
            "speedup": round(group["records_per_s"] / single["records_per_s"], 1),
            "fixed_rate": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default=os.environ.get("PG_DSN"),
                   help="superuser-ish DSN (creates a scratch database); default PG_DSN, "
                        "else a throwaway local server")
    p.add_argument("--writers", type=int, default=256, help="concurrent appenders")
    p.add_argument("--records", type=int, default=50_000, help="records with group commit")
    p.add_argument("--per-record-records", type=int, default=5_000,
                   help="records with one transaction each")
    p.add_argument("--rates", type=int, nargs="*", default=[500, 2000, 5000])
    p.add_argument("--seconds", type=float, default=4.0, help="per fixed-rate run")
    args = p.parse_args()

    server = None
    dsn = args.dsn
    if not dsn:
        from tests.servers import PostgresServer

        server = PostgresServer(fsync=True)
        server.start()
        dsn = server.dsn
    try:
        import uvloop

        result = uvloop.run(run(dsn, args))
    finally:
        if server is not None:
            server.destroy()

    print(f"PostgreSQL {result['server']['version']} (fsync={result['server']['fsync']}, "
          f"synchronous_commit={result['server']['synchronous_commit']})")
    print(f"{'scenario':<14}{'records':>9}{'records/s':>11}{'txns':>8}{'avg batch':>11}"
          f"{'p50 ms':>9}{'p99 ms':>9}")
    for r in result["throughput"]:
        print(f"{r['scenario']:<14}{r['records']:>9}{r['records_per_s']:>11}"
              f"{r['transactions']:>8}{r['avg_batch']:>11}{r['append_p50_ms']:>9}"
              f"{r['append_p99_ms']:>9}")
    print(f"group commit speed-up: x{result['speedup']}")
    print(f"{'fixed rate/s':<14}{'txns':>8}{'avg batch':>11}{'p50 ms':>9}{'p95 ms':>9}"
          f"{'p99 ms':>9}")
    for r in result["fixed_rate"]:
        print(f"{r['rate_per_s']:<14}{r['transactions']:>8}{r['avg_batch']:>11}"
              f"{r['commit_wait_p50_ms']:>9}{r['commit_wait_p95_ms']:>9}"
              f"{r['commit_wait_p99_ms']:>9}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "audit_throughput.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
