"""Open-loop HTTP/1.1 load at a fixed rate, for latency percentiles.

    python bench/loadgen.py URL --rate 1000 --duration 10 [--write] [--json]
    python bench/loadgen.py URL/mcp --mcp-tool list_appointments [--write] ...

Closed-loop tools (wrk) wait for a response before sending the next request,
so a slow server lowers the offered load and hides its own latency
("coordinated omission"). This generator sends request *i* at ``start + i/rate``
whatever happened before, on a pool of keep-alive connections (a new one is
opened when all are busy), and measures each latency from the request's
*scheduled* time. Write requests carry a unique ``Idempotency-Key``.

With ``--mcp-tool NAME`` each request is an MCP ``tools/call`` of NAME (a
2026-07-28 message: no session, the mirrored ``Mcp-*`` headers set, a new
JSON-RPC id each time) with ``--mcp-args`` as its arguments, POSTed to URL.

Output: achieved rate, p50/p90/p99/p99.9/max in ms, status counts, errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import uvloop

BODY = b'{"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}'


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0


class Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def exchange(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)}
        if "content-length" in headers:
            await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        if headers.get("connection", "").lower() == "close":
            raise ConnectionResetError("server closed the connection")
        return status


class Pool:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[Conn] = []

    async def get(self) -> Conn:
        if self.idle:
            return self.idle.pop()
        reader, writer = await asyncio.open_connection(self.host, self.port)
        return Conn(reader, writer)

    def put(self, conn: Conn) -> None:
        self.idle.append(conn)


MCP_VERSION = "2026-07-28"


@dataclass(frozen=True)
class McpCall:
    """A ``tools/call`` to send instead of the REST request."""

    tool: str
    arguments: dict[str, object]

    def body(self, msg_id: int) -> bytes:
        meta = {"io.modelcontextprotocol/protocolVersion": MCP_VERSION,
                "io.modelcontextprotocol/clientCapabilities": {}}
        return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                           "params": {"name": self.tool, "arguments": self.arguments,
                                      "_meta": meta}}).encode()

    def headers(self) -> list[str]:
        out = ["Accept: application/json, text/event-stream", f"MCP-Protocol-Version: "
               f"{MCP_VERSION}", "Mcp-Method: tools/call", f"Mcp-Name: {self.tool}"]
        if isinstance(self.arguments.get("patient_id"), str):  # the example's x-mcp-header
            out.append(f"Mcp-Param-PatientId: {self.arguments['patient_id']}")
        return out


def build(method: str, host: str, path: str, api_key: str, write: bool,
          mcp: McpCall | None = None, seq: int = 0) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"X-API-Key: {api_key}"]
    body = b""
    if mcp is not None:
        body = mcp.body(seq)
        lines += mcp.headers()
    elif write:
        body = BODY
    if body:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if write:
        lines.append(f"Idempotency-Key: {uuid.uuid4().hex}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one(pool: Pool, request: bytes, scheduled: float, stats: Stats) -> None:
    try:
        conn = await pool.get()
    except OSError:
        stats.errors += 1
        return
    try:
        status = await asyncio.wait_for(conn.exchange(request), 10)
    except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
        stats.errors += 1
        conn.writer.close()
        return
    stats.latencies.append(time.perf_counter() - scheduled)
    stats.statuses[status] = stats.statuses.get(status, 0) + 1
    pool.put(conn)


async def run(url: str, rate: float, duration: float, write: bool, api_key: str,
              warmup: float, mcp: McpCall | None = None) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    method = "POST" if write or mcp is not None else "GET"
    pool = Pool(host, port)
    warm = Stats()
    stats = Stats()
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    total = int(rate * (warmup + duration))
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        target = warm if i < rate * warmup else stats
        task = asyncio.create_task(one(pool, build(method, f"{host}:{port}", path, api_key,
                                                   write, mcp, i), scheduled, target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = time.perf_counter() - start - warmup
    await asyncio.gather(*tasks)
    lat = sorted(stats.latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else -1.0

    return {"url": url, "method": method, "target_rate": rate,
            "achieved_rate": round(len(lat) / max(sent_for, 1e-9), 1),
            "requests": len(lat), "errors": stats.errors, "statuses": stats.statuses,
            "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "p99_9_ms": pct(99.9),
            "max_ms": round(lat[-1] * 1000, 3) if lat else -1.0,
            "connections": len(pool.idle)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url")
    ap.add_argument("--rate", type=float, default=1000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--warmup", type=float, default=2)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY", "demo-receptionist"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mcp-tool", help="send MCP tools/call messages of this tool")
    ap.add_argument("--mcp-args", default="{}", help="the tool's arguments as JSON")
    a = ap.parse_args()
    mcp = McpCall(a.mcp_tool, json.loads(a.mcp_args)) if a.mcp_tool else None
    res = uvloop.run(run(a.url, a.rate, a.duration, a.write, a.api_key, a.warmup, mcp))
    print(json.dumps(res) if a.json else json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
