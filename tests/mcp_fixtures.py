"""The MCP example server as a real process, and an SDK client for it.

``start_mcp_server()`` runs ``python examples/mcp/server.py --port P`` (with
``--json`` or ``--stateless`` when asked) on a free port and stops it
afterwards; the :class:`McpServer` it yields reads the server's test hooks
(what its MCP endpoint received, which tools ran) and can slow its tool
calls down. ``mcp_client()`` is the official SDK's client over streamable
HTTP, with extra headers (an API key) on every request.

Use the ``mcp_server`` fixture, or ``async with start_mcp_server(...)`` for
other flags. Import the fixture into a test module with
``from tests.mcp_fixtures import mcp_server  # noqa: F401``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "examples" / "mcp" / "server.py"


@dataclass
class McpServer:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The MCP endpoint."""
        return self.base + "/mcp"

    async def seen(self) -> dict[str, list[dict[str, Any]]]:
        """``{"requests": [...], "calls": [...]}``: every HTTP request the MCP
        endpoint received (``http_method``, JSON-RPC ``method``, ``tool``, ``id``,
        ``mcp_headers``: the names of its Mcp-* headers) and every tool that ran
        (``tool``, ``arguments``)."""
        async with aiohttp.ClientSession() as s, s.get(self.base + "/_seen") as r:
            assert r.status == 200
            doc: dict[str, list[dict[str, Any]]] = await r.json()
            return doc

    async def calls(self, tool: str | None = None) -> list[dict[str, Any]]:
        """The tool calls that ran (optionally only those of ``tool``)."""
        return [c for c in (await self.seen())["calls"] if tool is None or c["tool"] == tool]

    async def reset(self) -> None:
        async with aiohttp.ClientSession() as s, s.delete(self.base + "/_seen") as r:
            assert r.status == 204

    async def set_delay(self, ms: int) -> None:
        """Make every tool call wait ``ms`` before it runs (0: no delay)."""
        async with aiohttp.ClientSession() as s, \
                s.put(self.base + "/_delay", json={"ms": ms}) as r:
            assert r.status == 200


async def _wait_ready(server: McpServer, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            if server.process.poll() is not None:
                raise RuntimeError("examples/mcp/server.py exited with "
                                   f"{server.process.returncode}")
            try:
                async with s.get(server.base + "/_seen") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if loop.time() > deadline:
                raise TimeoutError("examples/mcp/server.py did not start")
            await asyncio.sleep(0.05)


@asynccontextmanager
async def start_mcp_server(*flags: str) -> AsyncIterator[McpServer]:
    """Run the example server (flags: ``--json``, ``--stateless``) until the block ends."""
    port = free_port()
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: a pipe could fill and block it
        process = subprocess.Popen([sys.executable, str(SERVER), "--port", str(port), *flags],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        server = McpServer(port, process)
        try:
            try:
                await _wait_ready(server)
            except (RuntimeError, TimeoutError) as exc:
                log.seek(0)
                raise RuntimeError(f"{exc}: {log.read()[-2000:].decode(errors='replace')}") \
                    from None
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@pytest.fixture
async def mcp_server() -> AsyncIterator[McpServer]:
    async with start_mcp_server() as server:
        yield server


@asynccontextmanager
async def mcp_client(url: str, headers: dict[str, str] | None = None, *,
                     mode: str = "auto") -> AsyncIterator[Client]:
    """The SDK's client on ``url``; ``mode`` is ``auto`` (2026-07-28 when the server
    speaks it), ``legacy`` (the initialize handshake, sessions) or a version."""
    async with httpx2.AsyncClient(headers=headers or {},
                                  timeout=httpx2.Timeout(30.0, read=60.0)) as http:
        transport = streamable_http_client(url, http_client=http)
        async with Client(transport, mode=mode, read_timeout_seconds=30.0) as client:
            yield client
