"""Where the PostgreSQL audit wait's tail comes from, at a fixed request rate.

    python bench/audit_tail.py [--rate 1000] [--seconds 10] [--dsn ...]

Drives the real sink (``proxy.audit.postgres.PostgresAuditSink``: sealing,
hashing, COPY, lease) the way the proxy does on the write route: per request
one decision record it waits for (``append``) and one outcome record queued
after it (``append_later``), requests sent open loop at ``--rate``. Against a
throwaway PostgreSQL with ``fsync=on`` unless ``--dsn``/``PG_DSN`` names one.

Prints the distribution of the decision records' wait (hand-off to receipt),
of each batch's write (seal, COPY, commit) and size, and splits every wait into the part
spent behind the batch already being written and the part in its own batch, so the
tail is attributed to what causes it. Writes bench/results/audit_tail.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))
from audit_throughput import pct, record  # noqa: E402

from proxy.audit.postgres import PostgresAuditSink, migrate  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    return {f"p{p}": round(pct(values, p), 3) for p in (50, 90, 99, 99.9)} | {
        "max": round(max(values), 3)}


async def measure(dsn: str, rate: float, seconds: float, batch_wait_ms: float
                  ) -> dict[str, Any]:
    await migrate(dsn)
    sink = PostgresAuditSink(dsn, "tail", batch_max=256, timeout_s=30,
                             batch_wait_s=batch_wait_ms / 1000)
    await sink.start()
    # each batch the writer writes (seal, hash, COPY, commit): (start, end, records)
    copies: list[tuple[float, float, int]] = []
    real_write = sink._write

    async def timed_write(live: list[Any]) -> None:
        t0 = time.perf_counter()
        try:
            await real_write(live)
        finally:
            copies.append((t0, time.perf_counter(), len(live)))

    # warm up first (the first COPY prepares its statement), as the proxy's warm-up does
    for i in range(200):
        await sink.append(record(-1 - i))
    sink._write = timed_write  # type: ignore[method-assign]
    waits: list[tuple[float, float]] = []  # (handed over, receipt)
    tasks: list[asyncio.Future[None]] = []

    async def one(i: int) -> None:
        t = time.perf_counter()
        await sink.append(record(2 * i))
        waits.append((t, time.perf_counter()))
        sink.append_later(record(2 * i + 1) | {"kind": "outcome"})

    n = int(rate * seconds)
    start = time.perf_counter()
    lag: list[float] = []
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append((time.perf_counter() - due) * 1000)
        tasks.append(asyncio.ensure_future(one(i)))
    await asyncio.gather(*tasks)
    await sink.close()
    # each wait: the time behind the COPY in flight when the record was handed
    # over, and the rest (its own COPY, plus the writer's hand-offs)
    behind: list[float] = []
    own: list[float] = []
    for t, done in waits:
        before = [c for c in copies if c[0] <= t < c[1]]
        ahead = (before[0][1] - t) if before else 0.0
        behind.append(ahead * 1000)
        own.append((done - t - ahead) * 1000)
    wait_ms = [(d - t) * 1000 for t, d in waits]
    slow = sorted(range(len(wait_ms)), key=wait_ms.__getitem__)[-max(1, len(wait_ms) // 100):]
    return {
        "rate_per_s": rate, "batch_wait_ms": batch_wait_ms, "requests": n, "records": 2 * n,
        "batches": len(copies),
        "wait_ms": summary(wait_ms),
        "batch_write_ms": summary([(e - s) * 1000 for s, e, _ in copies]),
        "batch_rows": summary([float(r) for _, _, r in copies]),
        "slowest_1pct": {
            "mean_wait_ms": round(sum(wait_ms[i] for i in slow) / len(slow), 3),
            "mean_behind_copy_in_flight_ms": round(sum(behind[i] for i in slow) / len(slow), 3),
            "mean_own_copy_ms": round(sum(own[i] for i in slow) / len(slow), 3)},
        "sender_lag_ms": summary(lag),
        "slowest_batches": [{"at_s": round(s0 - start, 3), "ms": round((e - s0) * 1000, 1),
                             "records": r}
                            for s0, e, r in sorted(copies, key=lambda c: c[0] - c[1])[:5]],
    }


async def run(dsn: str | None, rate: float, seconds: float, batch_wait_ms: float,
              fsync: bool) -> dict[str, Any]:
    if dsn is not None:
        return await measure(dsn, rate, seconds, batch_wait_ms)
    from tests.servers import PostgresServer

    pg = PostgresServer(fsync=fsync)
    pg.start()
    try:
        return await measure(pg.dsn, rate, seconds, batch_wait_ms) | {"fsync": fsync}
    finally:
        pg.destroy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dsn", default=os.environ.get("PG_DSN"))
    p.add_argument("--rate", type=float, default=1000.0, help="requests/s (2 records each)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch-wait-ms", type=float, default=0.0,
                   help="the sink's batch_wait (audit.batch_wait_ms)")
    p.add_argument("--no-fsync", action="store_true",
                   help="the throwaway server with fsync off (to attribute the tail)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "audit_tail.json")
    a = p.parse_args()
    import uvloop

    got = uvloop.run(run(a.dsn, a.rate, a.seconds, a.batch_wait_ms, not a.no_fsync))
    print(json.dumps(got, indent=2))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(got, indent=2))


if __name__ == "__main__":
    main()
