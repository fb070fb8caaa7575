"""Readiness waits for the upstream: ``/healthz`` connects to it before saying ready.

A sidecar that is Ready while its app is not listening yet would answer every
request with 502; the ``upstream`` check is a TCP connect to the upstream's
host:port, bounded by ``upstream.connect_timeout_ms`` (at most 1 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

from proxy.admin import upstream_accepts
from tests.conftest import Upstream, clinic_env, run_upstream, start_proxy, write_config
from tests.waiting import wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_healthz_waits_for_the_upstream_to_accept(tmp_path: Path) -> None:
    port = free_port()
    state = Upstream()
    path = write_config(tmp_path, lambda d: None)
    env = clinic_env(f"http://127.0.0.1:{port}", tmp_path)
    async with start_proxy(path, env, state) as p:
        async with p.session.get(p.admin + "/healthz") as r:
            body: dict[str, Any] = await r.json()
            assert r.status == 503 and body["status"] == "unavailable"
            assert body["checks"]["upstream"] == "unavailable"
            assert body["checks"]["audit"] == "ok" and body["checks"]["policy"] == "ok"
        # what readiness protects against: traffic now would get 502
        status, _, raw = await p.call("GET", "/appointments")
        assert (status, json.loads(raw)["reason_codes"]) == (502, ["Upstream_Unavailable"])
        async with run_upstream(state, port=port):
            async def ready() -> bool:
                async with p.session.get(p.admin + "/healthz") as r:
                    return r.status == 200

            became_ready: bool = await wait_until(ready, "readiness once the upstream listens")
            assert became_ready
            async with p.session.get(p.admin + "/healthz") as r:
                body = await r.json()
                assert body["checks"]["upstream"] == "ok" and body["status"] == "ok"
            assert (await p.call("GET", "/appointments"))[0] == 200
        # the upstream gone again: not ready again
        async with p.session.get(p.admin + "/healthz") as r:
            assert r.status == 503 and (await r.json())["checks"]["upstream"] == "unavailable"


async def test_upstream_check_is_bounded_for_an_address_that_never_answers() -> None:
    # a local listener whose accept queue is full drops new SYNs: the connect
    # hangs, and the check must answer "no" at its bound (only loopback is used)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        async with asyncio.timeout(5):
            assert await upstream_accepts(f"http://127.0.0.1:{port}", 0.3) is False
    finally:
        for c in fillers:
            c.close()
        srv.close()
