"""Shared fixtures: a recording upstream and the real proxy, both on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from proxy.app import Runtime, Serving, serve
from proxy.config import Config, load_config
from proxy.settings import Environment
from tests.ci import in_ci as in_ci  # tests may import these from here too
from tests.ci import require_binary as require_binary
from tests.servers import RedisServer
from tests.waiting import wait_event, wait_until

# PG_DSN in the test run's environment names the PostgreSQL for the PostgreSQL
# audit tests (tests/test_postgres_audit.py); every other test, and every proxy
# or CLI process a test starts, must run embedded, so it is taken out here.
EXTERNAL_PG_DSN = os.environ.pop("PG_DSN", None) or None
# Proxy processes the tests start (the clinic config reads these) stop after SIGTERM
# without the production delay of 5 s (docs/operations.md, graceful shutdown).
os.environ.setdefault("CASF_SHUTDOWN_DELAY_MS", "50")
os.environ.setdefault("CASF_DRAIN_TIMEOUT_MS", "5000")

ROOT = Path(__file__).resolve().parent.parent
CLINIC = ROOT / "examples" / "clinic"
KEYS = {r: f"demo-{r}" for r in ("receptionist", "nurse", "doctor", "billing", "custodian")}
KEYS["t2-receptionist"] = "demo-t2-receptionist"
ADMIN_TOKEN = "test-admin-token"


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes


# The longest an upstream keeps a held request when the test never releases it
# (a test that failed half-way): long enough that no passing test depends on it.
HOLD_MAX_S = 30.0


@dataclass
class Hold:
    """One request the upstream keeps waiting, recorded, until the test releases it.

    ``arrived`` is set when the request reached the upstream (so the proxy has
    decided, audited and forwarded it, and it is in flight); the upstream
    answers it only after ``release()``. A test that needs a request in flight
    waits on ``arrived`` instead of sleeping and hoping.
    """

    match: Callable[[Seen], bool]
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    request: Seen | None = None

    def release(self) -> None:
        self.released.set()

    async def wait_arrived(self, timeout: float = 10.0) -> Seen:
        await wait_event(self.arrived, "the held request to reach the upstream",
                         timeout=timeout)
        assert self.request is not None
        return self.request


@dataclass
class Upstream:
    """A real aiohttp server that records everything it receives."""

    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    delay_s: float = 0.0
    holds: list[Hold] = field(default_factory=list)
    # /events (a server-sent event stream) stops after its first event until this
    # is set: a client that reads that event then has it before the stream ended
    events_resume: asyncio.Event = field(default_factory=asyncio.Event)

    def paths(self) -> list[str]:
        return [s.path_qs for s in self.seen]

    def hold_next(self, match: Callable[[Seen], bool] = lambda s: True) -> Hold:
        """Hold the next request that arrives (and ``match``es) until released."""
        hold = Hold(match)
        self.holds.append(hold)
        return hold

    def release_all(self) -> None:
        for hold in self.holds:
            hold.release()
        self.events_resume.set()

    def _take_hold(self, seen: Seen) -> Hold | None:
        for hold in self.holds:
            if hold.request is None and hold.match(seen):
                hold.request = seen
                hold.arrived.set()
                return hold
        return None


def _upstream_app(state: Upstream) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(request.method, request.raw_path, CIMultiDict(request.headers), body)
        state.seen.append(seen)
        hold = state._take_hold(seen)
        if hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hold.released.wait(), HOLD_MAX_S)
        if state.delay_s:  # a slow upstream (to wait for a request, hold it instead)
            await asyncio.sleep(state.delay_s)
        path = request.path
        if path == "/events":
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: event 0\n\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(state.events_resume.wait(), HOLD_MAX_S)
            for i in (1, 2):
                await resp.write(f"data: event {i}\n\n".encode())
            await resp.write_eof()
            return resp
        if path == "/big":
            return web.Response(body=b"x" * 200_000, content_type="application/octet-stream")
        if path.startswith("/status/"):
            return web.json_response({"status": int(path.rsplit("/", 1)[1])},
                                     status=int(path.rsplit("/", 1)[1]))
        status = 201 if request.method == "POST" else 200
        n = len(state.seen)
        return web.json_response({"n": n, "method": request.method, "path": path},
                                 status=status, headers={"Set-Cookie": "s=1", "ETag": f'"{n}"'})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@contextlib.asynccontextmanager
async def run_upstream(state: Upstream | None = None, port: int = 0
                       ) -> AsyncIterator[Upstream]:
    state = state or Upstream()
    runner = web.AppRunner(_upstream_app(state), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        state.release_all()  # held requests answer, so the server stops at once
        await runner.cleanup()


def pytest_report_header() -> str:
    ci = os.environ.get("CI", "")
    if in_ci():
        return f"CI={ci}: in CI, a test missing a tool it needs fails (tests/ci.py)"
    return f"CI={ci!r}: not in CI, a test missing a tool it needs is skipped (tests/ci.py)"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throwaway redis-server for one test (skips locally, fails in CI)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with run_upstream() as up:
        yield up


def clinic_env(upstream_url: str, tmp_path: Path, **extra: str) -> Environment:
    return Environment({
        "CLINIC_UPSTREAM": upstream_url, "CASF_PORT": "0", "CASF_ADMIN_PORT": "0",
        "CASF_DECISIONS_PORT": "0",
        "CASF_AUDIT_PATH": str(tmp_path / "audit.db"), "CASF_ADMIN_TOKEN": ADMIN_TOKEN,
        **extra})


def write_config(tmp_path: Path, patch: Callable[[dict[str, Any]], None]) -> Path:
    """The clinic config with ``patch`` applied, written next to its keys and policies."""
    data = yaml.safe_load((CLINIC / "casf.yaml").read_text())
    data["identity"]["api_keys"]["keys_file"] = str(CLINIC / "keys.yaml")
    data["policy"]["bundle"] = str(CLINIC / "policies")
    if "jwt" in data["identity"]:  # the example's dev JWKS (docs/identity.md)
        data["identity"]["jwt"]["jwks_file"] = str(CLINIC / data["identity"]["jwt"]["jwks_file"])
    patch(data)
    path = tmp_path / "casf.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@dataclass
class Proxy:
    cfg: Config
    rt: Runtime
    serving: Serving
    session: aiohttp.ClientSession
    upstream: Upstream

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.serving.traffic_port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.serving.admin_port}"

    async def call(self, method: str, path: str, *, key: str | None = "receptionist",
                   json: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None, rid: str | None = None
                   ) -> tuple[int, CIMultiDict[str], bytes]:
        h = dict(headers or {})
        if key is not None:
            h["X-API-Key"] = KEYS.get(key, key)
        if rid is not None:
            h["Idempotency-Key"] = rid
        # encoded=True: send the target byte for byte (no client-side normalisation)
        url = URL(self.url + path, encoded=True)
        async with self.session.request(method, url, json=json, data=data, headers=h) as resp:
            return resp.status, CIMultiDict(resp.headers), await resp.read()

    async def metrics(self) -> str:
        """/metrics once no request is in flight (counters are final then)."""
        async def settled() -> str | None:
            async with self.session.get(self.admin + "/metrics") as r:
                text = await r.text()
            return text if "\ncasf_in_flight 0.0" in text else None

        text = await wait_until(settled, "no request in flight (casf_in_flight 0) on /metrics")
        assert text is not None
        return text

    async def set_mode(self, mode: str) -> None:
        async with self.session.put(self.admin + "/admin/mode", json={"mode": mode},
                                    headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 200, await r.text()


@contextlib.asynccontextmanager
async def start_proxy(config_path: Path, env: Environment, up: Upstream
                      ) -> AsyncIterator[Proxy]:
    cfg = load_config(config_path, env)
    async with Runtime.open(cfg, env) as rt:
        serving = await serve(rt)
        try:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                yield Proxy(cfg, rt, serving, session, up)
        finally:
            await serving.close()


# the type of the make_proxy fixture: make_proxy(patch, **env) is an async context
# manager yielding a running Proxy
MakeProxy = Callable[..., contextlib.AbstractAsyncContextManager[Proxy]]


@pytest.fixture
def make_proxy(tmp_path: Path, upstream: Upstream) -> MakeProxy:
    def factory(patch: Callable[[dict[str, Any]], None] = lambda d: None,
                **env_extra: str) -> contextlib.AbstractAsyncContextManager[Proxy]:
        path = write_config(tmp_path, patch)
        return start_proxy(path, clinic_env(upstream.url, tmp_path, **env_extra), upstream)
    return factory


@pytest.fixture
async def proxy(make_proxy: Callable[..., Any]) -> AsyncIterator[Proxy]:
    async with make_proxy() as p:
        yield p


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
