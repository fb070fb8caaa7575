"""The MCP example launched by its fixed names, as the README runs it.

``python examples/mcp/server.py --port P`` and ``casf-proxy run -c
examples/mcp/casf.yaml`` run as real processes (what examples/mcp/run.sh
starts); examples/mcp/client.py lists the tools and calls an allowed and a
denied one through the proxy; ``casf-proxy audit verify`` checks the chain.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_example_e2e import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_validates() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "validate", "-c",
                          "examples/mcp/casf.yaml"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture
async def example(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    server_port, port, admin_port = free_port(), free_port(), free_port()
    env = {**os.environ, "MCP_UPSTREAM": f"http://127.0.0.1:{server_port}",
           "CASF_PORT": str(port), "CASF_ADMIN_PORT": str(admin_port),
           "CASF_AUDIT_PATH": str(tmp_path / "audit.db"), "CASF_ADMIN_TOKEN": "demo-admin-token"}
    server = subprocess.Popen([sys.executable, "examples/mcp/server.py", "--port",
                               str(server_port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = (tmp_path / "proxy.log").open("w")
    proxy = subprocess.Popen([sys.executable, "-m", "proxy.cli", "run", "-c",
                              "examples/mcp/casf.yaml"], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        await wait_port(server_port, timeout=30)
        await wait_port(port, timeout=30)
        yield {"url": f"http://127.0.0.1:{port}/mcp", "env": env}
    finally:
        for p in (proxy, server):
            p.terminate()
        assert proxy.wait(timeout=15) == 0  # SIGTERM is a clean shutdown
        server.wait(timeout=15)
        log.close()


async def client(example: dict[str, Any], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "examples/mcp/client.py", "--url", example["url"], *args, cwd=ROOT,
        env=example["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode or 0, out.decode()


async def test_the_readme_commands(example: dict[str, Any]) -> None:
    code, out = await client(example, "--key", "demo-receptionist")
    assert code == 0, out
    assert ("tools shown: list_appointments, create_appointment, cancel_appointment, "
            "send_sms") in out
    assert 'list_appointments: ok: {"appointments": []}' in out
    code, out = await client(example, "--key", "demo-receptionist", "--call",
                             "create_appointment", "--args",
                             '{"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}')
    assert code == 0, out
    assert ('create_appointment: ok: {"id": "a-1", "patient_id": "p1", '
            '"slot": "2026-11-23T10:00:00Z"}') in out
    code, out = await client(example, "--key", "demo-billing", "--call", "send_sms", "--args",
                             '{"patient_id": "p1", "message": "see you tomorrow"}')
    assert code == 1, out
    assert "tools shown: generate_invoice" in out
    assert "send_sms: refused (-32010) DENY ['Role_NotPermitted']: denied by policy" in out
    verify = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "audit", "verify", "-c", "examples/mcp/casf.yaml",
        cwd=ROOT, env=example["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out_b, _ = await asyncio.wait_for(verify.communicate(), timeout=60)
    assert verify.returncode == 0, out_b.decode()
