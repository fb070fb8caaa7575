"""Real backing servers for tests: throwaway redis-server processes.

Each server gets a fresh directory and a free port, and can be stopped and
restarted mid-test on the same port (fault tests). When the binary is
missing, tests are skipped with a clear message, except under ``CI=true``
where that is a failure: CI must never silently run without Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found on PATH: tests that need a real server cannot run"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: install it, e.g. apt-get install redis-server)")
        pytest.skip(message)
    return path


class RedisServer:
    """A redis-server on 127.0.0.1 with no persistence, owned by one test."""

    def __init__(self, directory: Path, *, cluster: bool = False, port: int | None = None) -> None:
        self.binary = require_binary("redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     str(self.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``casf-proxy run`` as a real process (for multi-process and crash tests)."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config = config
        self.port = free_port()
        self.admin_port = free_port()
        self.env = {**os.environ, **env, "CASF_PORT": str(self.port),
                    "CASF_ADMIN_PORT": str(self.admin_port)}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        import sys

        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "run", "-c", str(self.config)], cwd=ROOT,
                env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("proxy did not start")

    def kill(self) -> None:
        """SIGKILL: the process dies holding whatever it held."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.terminate()
        code = self.proc.wait(timeout=15)
        self.proc = None
        return code
