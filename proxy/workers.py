"""``casf-proxy run --workers N``: a supervisor and N worker processes.

The supervisor (this module) serves nothing itself. It

- picks the traffic and admin ports (resolving ``:0``) and holds them with a
  bound, non-listening SO_REUSEPORT socket, so the port cannot be taken while
  workers restart; every worker binds both ports with SO_REUSEPORT and the
  kernel spreads new connections over them;
- creates the metrics directory every worker writes to
  (``PROMETHEUS_MULTIPROC_DIR``, prometheus_client's multiprocess mode), so
  ``/metrics`` on any worker answers with the totals of all of them;
- starts each worker as ``casf-proxy run`` with a hidden ``--worker I``
  option (its own audit chain: the chain id gets ``-wI``), in its own
  session so that a terminal's Ctrl-C reaches the supervisor only;
- forwards SIGTERM, SIGINT and SIGHUP to every worker (a second SIGTERM or
  SIGINT is forwarded too: workers then skip what is left of the delay);
- restarts a worker that exits while it is not stopping (at most
  ``MAX_RESTARTS`` within ``RESTART_WINDOW_S``; beyond that it stops all and
  exits 2), and exits once every worker has stopped after a signal (0 when
  every worker exited 0).

Workers need shared state (``REDIS_URL``): with in-memory state each worker
would keep its own replay claims, rate-limit counters and mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from proxy.config import Config, Listener
from proxy.settings import Environment

log = logging.getLogger("casf.supervisor")

# Restarts back off from 0.5 s to 10 s; more than MAX_RESTARTS worker exits within
# RESTART_WINDOW_S (about 45 s of retrying: long enough for PostgreSQL to drop a
# killed worker's chain lease) stop the supervisor with exit code 2.
MAX_RESTARTS = 8
RESTART_WINDOW_S = 120.0


def reserve_port(listener: Listener) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on the listener's address."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((listener.host, listener.port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    def __init__(self, config_path: str, cfg: Config, env: Environment, count: int) -> None:
        self.config_path = config_path
        self.cfg = cfg
        self.env = env
        self.count = count
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self.failed = False
        self.crashes: list[float] = []
        self.codes: dict[int, int] = {}
        self._own_dir = False
        self.metrics_dir = ""
        self.ports = (0, 0, 0)

    def prepare(self) -> list[socket.socket]:
        """Hold the ports and create the metrics directory (before the loop runs)."""
        held: list[socket.socket] = []
        try:
            for listener in (self.cfg.traffic, self.cfg.admin, self.cfg.decisions_listener):
                if listener is not None:
                    held.append(reserve_port(listener))
        except OSError:
            for sock in held:
                sock.close()
            raise
        ports = [sock.getsockname()[1] for sock in held]
        self.ports = (ports[0], ports[1], ports[2] if len(ports) > 2 else 0)
        given = self.env.prometheus_multiproc_dir
        if given:
            self.metrics_dir = given
            Path(given).mkdir(parents=True, exist_ok=True)
            for f in Path(given).glob("*.db"):  # values of an earlier run
                f.unlink()
        else:
            self.metrics_dir = tempfile.mkdtemp(prefix="casf-metrics-")
            self._own_dir = True
        return held

    def cleanup(self, held: list[socket.socket]) -> None:
        for sock in held:
            sock.close()
        if self._own_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)
        log.warning("supervisor: starting %d workers on traffic port %d, admin port %d "
                    "(SO_REUSEPORT); metrics merged from %s", self.count, self.ports[0],
                    self.ports[1], self.metrics_dir)
        await asyncio.gather(*(self._keep(i) for i in range(self.count)))
        if self.failed:
            return 2
        bad = {i: c for i, c in self.codes.items() if c != 0}
        if bad:
            log.error("supervisor: workers exited with %s", bad)
            return 1
        log.warning("supervisor: all workers stopped")
        return 0

    def _args(self, index: int) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", "run", "-c", self.config_path,
                "--workers", str(self.count), "--worker", str(index),
                "--traffic-port", str(self.ports[0]), "--admin-port", str(self.ports[1]),
                "--decisions-port", str(self.ports[2])]

    async def _keep(self, index: int) -> None:
        """Run worker ``index`` until the supervisor stops; restart it when it dies."""
        env = {**self.env.variables, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir}
        while not self.stopping:
            proc = await asyncio.create_subprocess_exec(*self._args(index), env=env,
                                                        start_new_session=True)
            self.procs[index] = proc
            log.warning("supervisor: worker %d started (pid %d)", index, proc.pid)
            code = await proc.wait()
            self.procs.pop(index, None)
            self.codes[index] = code
            self._mark_dead(proc.pid)
            if self.stopping:
                log.warning("supervisor: worker %d (pid %d) stopped with exit code %d", index,
                            proc.pid, code)
                return
            now = time.monotonic()
            self.crashes = [t for t in self.crashes if now - t < RESTART_WINDOW_S] + [now]
            if len(self.crashes) > MAX_RESTARTS:
                log.error("supervisor: worker %d exited with code %d; %d worker exits within "
                          "%d s, giving up", index, code, len(self.crashes),
                          RESTART_WINDOW_S)
                self.failed = True
                self._stop(signal.SIGTERM)
                return
            log.error("supervisor: worker %d (pid %d) exited unexpectedly with code %d; "
                      "restarting", index, proc.pid, code)
            with contextlib.suppress(TimeoutError):  # a signal ends the back-off early
                async with asyncio.timeout(min(0.5 * 2 ** (len(self.crashes) - 1), 10.0)):
                    await self._stopped.wait()

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    def _stop(self, sig: signal.Signals) -> None:
        if not self.stopping:
            self.stopping = True
            self._stopped.set()
            log.warning("supervisor: %s: stopping %d workers", sig.name, len(self.procs))
        self._forward(sig)

    def _forward(self, sig: signal.Signals) -> None:
        for proc in list(self.procs.values()):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)


def supervise(config_path: str, cfg: Config, env: Environment, count: int) -> int:
    sup = Supervisor(config_path, cfg, env, count)
    try:
        held = sup.prepare()
    except OSError as exc:
        log.error("cannot bind the listeners: %s", exc)
        return 2
    try:
        return asyncio.run(sup.run())
    finally:
        sup.cleanup(held)


async def watch_parent(stop: asyncio.Event, interval_s: float = 1.0) -> None:
    """In a worker: stop gracefully when the supervisor is gone (we were re-parented)."""
    parent = os.getppid()
    while not stop.is_set():
        await asyncio.sleep(interval_s)
        if os.getppid() != parent:
            log.error("supervisor (pid %d) is gone: shutting down", parent)
            stop.set()
            return
