"""A real nginx running the sample config deploy/nginx/nginx.conf.template.

:func:`render` substitutes the template's four names (as envsubst with an
explicit list does: every other ``$name`` is left to nginx) into a throwaway
directory; :class:`Nginx` starts ``nginx -p DIR -c DIR/nginx.conf`` in the
foreground on a free port, waits until it accepts connections, and stops it.
:func:`nginx_t` is ``nginx -t`` on a rendered config.

nginx is a system package (Debian: ``apt-get install nginx``); without it the
tests skip, except under ``CI=true`` where they fail.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.ci import require_binary
from tests.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
NAMES = ("CASF_NGINX_LISTEN", "CASF_DECISIONS_ADDR", "CASF_BACKEND_ADDR", "CASF_NGINX_RUN_DIR")


def render(directory: Path, *, listen: int, decisions: str, backend: str,
           template: Path = TEMPLATE) -> Path:
    """Write ``directory/nginx.conf`` from the template; return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    values = {"CASF_NGINX_LISTEN": f"127.0.0.1:{listen}", "CASF_DECISIONS_ADDR": decisions,
              "CASF_BACKEND_ADDR": backend, "CASF_NGINX_RUN_DIR": str(directory)}
    text = template.read_text()
    used = set(re.findall(r"\$\{(\w+)\}", text))
    assert used == set(NAMES), f"template names {sorted(used)} != {sorted(NAMES)}"
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    conf = directory / "nginx.conf"
    conf.write_text(text)
    return conf


def _globals(directory: Path) -> str:
    # as root the master would hand the workers to an unprivileged user that
    # cannot write the throwaway directory
    user = "user root; " if os.geteuid() == 0 else ""
    return f"daemon off; {user}pid {directory}/nginx.pid;"


def nginx_t(conf: Path) -> subprocess.CompletedProcess[str]:
    binary = require_binary("nginx")
    return subprocess.run([binary, "-t", "-p", str(conf.parent), "-c", str(conf),
                           "-g", _globals(conf.parent)],
                          capture_output=True, text=True, timeout=30, check=False)


class Nginx:
    """nginx in the foreground with the rendered sample config, owned by one test."""

    def __init__(self, directory: Path, *, decisions: str, backend: str) -> None:
        self.binary = require_binary("nginx")
        self.dir = directory
        self.port = free_port()
        self.conf = render(directory, listen=self.port, decisions=decisions, backend=backend)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "nginx.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> Nginx:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.dir), "-c", str(self.conf),
                 "-g", _globals(self.dir)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"nginx did not listen on {self.port}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish, then exit
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
