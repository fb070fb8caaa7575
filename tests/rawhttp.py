"""Helpers for the hardening, fuzz, chaos and soak tests.

* a raw-socket HTTP/1.1 client: requests are sent byte for byte (no client
  normalisation or validation), responses parsed by hand;
* an audit reader for the embedded SQLite chain;
* an upstream that, at the moment a request reaches it, checks the audit file
  for a committed ALLOW decision with the request's id ("forwarded ⇒ ALLOW
  decision committed before the upstream saw it").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from proxy.audit.records import FIELDS
from tests.conftest import Upstream, _upstream_app

Header = tuple[str | bytes, str | bytes]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def request(method: str | bytes, target: str | bytes, headers: Iterable[Header] = (),
            body: bytes = b"", *, length: bool = True, close: bool = True,
            version: bytes = b"HTTP/1.1") -> bytes:
    """One request, exactly as given (``length`` adds a Content-Length for ``body``)."""
    lines = [_b(method) + b" " + _b(target) + b" " + version, b"Host: proxy.test"]
    lines += [_b(k) + b": " + _b(v) for k, v in headers]
    if length and body:
        lines.append(b"Content-Length: %d" % len(body))
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class RawResponse:
    status: int
    headers: CIMultiDict[str]
    body: bytes

    def envelope(self) -> dict[str, Any]:
        env = json.loads(self.body)
        assert isinstance(env, dict)
        return env

    @property
    def reasons(self) -> list[str]:
        try:
            return list(self.envelope().get("reason_codes", []))
        except ValueError:
            return []


def _parse_one(buf: bytes, no_body: bool = False) -> tuple[RawResponse, bytes] | None:
    head_end = buf.find(b"\r\n\r\n")
    if head_end == -1:
        return None
    head = buf[:head_end].decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers: CIMultiDict[str] = CIMultiDict()
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())
    rest = buf[head_end + 4:]
    if no_body:
        return RawResponse(status, headers, b""), rest
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        body = b""
        while True:
            line_end = rest.find(b"\r\n")
            if line_end == -1:
                return None
            size = int(rest[:line_end].split(b";")[0], 16)
            if len(rest) < line_end + 2 + size + 2:
                return None
            body += rest[line_end + 2: line_end + 2 + size]
            rest = rest[line_end + 2 + size + 2:]
            if size == 0:
                return RawResponse(status, headers, body), rest
    length = int(headers.get("Content-Length", "0"))
    if len(rest) < length:
        return None
    return RawResponse(status, headers, rest[:length]), rest[length:]


async def exchange(port: int, data: bytes | Iterable[bytes], *, count: int = 1,
                   timeout: float = 10.0, pause: float = 0.0, head: bool = False
                   ) -> list[RawResponse]:
    """Send ``data`` (one blob, or pieces with ``pause`` seconds between them) and
    read until ``count`` responses are parsed, the server closes, or ``timeout``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[RawResponse] = []
    buf = b""

    async def send() -> None:
        pieces = [data] if isinstance(data, bytes) else list(data)
        for i, piece in enumerate(pieces):
            if i and pause:
                await asyncio.sleep(pause)
            try:
                writer.write(piece)
                await writer.drain()
            except ConnectionError:
                return

    sender = asyncio.ensure_future(send())
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                try:
                    chunk = await reader.read(65536)
                except ConnectionError:
                    chunk = b""
                if not chunk:
                    break
                buf += chunk
                while (parsed := _parse_one(buf, head)) is not None:
                    resp, buf = parsed
                    out.append(resp)
    except TimeoutError:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(BaseException):
            await sender
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return out


async def one(port: int, data: bytes, **kw: Any) -> RawResponse:
    got = await exchange(port, data, **kw)
    assert got, f"no response to {data[:120]!r}"
    return got[0]


# ------------------------------------------------------------------ audit


def audit_rows(path: Path) -> list[dict[str, Any]]:
    """Every record of the SQLite audit file, ordered by (chain_id, seq)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = conn.execute(f"SELECT {', '.join(FIELDS)} FROM audit_events "
                            "ORDER BY chain_id, seq").fetchall()
    finally:
        conn.close()
    return [dict(zip(FIELDS, r, strict=True)) for r in rows]


def committed_allow(conn: sqlite3.Connection, request_id: str) -> int:
    """How many ALLOW decision records for ``request_id`` are committed."""
    row = conn.execute("SELECT count(*) FROM audit_events WHERE request_id = ? AND "
                       "kind = 'decision' AND decision = 'ALLOW'", (request_id,)).fetchone()
    return int(row[0])


# ------------------------------------------------------------------ checking upstream


@dataclass
class CheckingUpstream(Upstream):
    """The recording upstream of tests/conftest.py that also checks, when a request
    arrives, that an ALLOW decision with its X-Request-Id is already committed."""

    audit_path: Path | None = None
    checked: int = 0
    violations: list[str] = field(default_factory=list)
    fail_with: int | None = None  # answer every request with this status (chaos/soak)
    _conn: sqlite3.Connection | None = None

    def check(self, request_id: str | None, method: str, path: str) -> None:
        if self.audit_path is None:
            return
        if self._conn is None:
            self._conn = sqlite3.connect(f"file:{self.audit_path}?mode=ro", uri=True,
                                         timeout=5, check_same_thread=False)
        self.checked += 1
        if not request_id:
            self.violations.append(f"{method} {path}: forwarded without X-Request-Id")
        elif committed_allow(self._conn, request_id) == 0:
            self.violations.append(f"{method} {path} ({request_id}): no committed ALLOW "
                                   "decision when the upstream received it")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


@contextlib.asynccontextmanager
async def run_checking_upstream(state: CheckingUpstream, port: int = 0
                                ) -> AsyncIterator[CheckingUpstream]:
    app = _upstream_app(state)

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        state.check(request.headers.get("X-Request-Id"), request.method, request.raw_path)
        if state.fail_with is not None:
            await request.read()
            state.seen.append(_seen(request))
            return web.json_response({"failed": True}, status=state.fail_with)
        return await handler(request)

    app.middlewares.append(check)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024, reuse_address=True)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        state.close()
        await runner.cleanup()


def _seen(request: web.Request) -> Any:
    from tests.conftest import Seen

    return Seen(request.method, request.raw_path, CIMultiDict(request.headers), b"")
