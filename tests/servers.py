"""Real backing servers for tests: throwaway redis-server and PostgreSQL processes.

Each server gets a fresh directory and a free port, and can be stopped and
restarted mid-test on the same port (fault tests). When the binary is
missing, tests are skipped with a clear message, except in CI (tests/ci.py)
where that is a failure: CI must never silently run without Redis or PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from tests.ci import require_binary, skip_or_fail
from tests.waiting import poll_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port P whose cluster bus port P + 10000 is free (and valid) too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a redis cluster node")


class RedisServer:
    """A redis-server on 127.0.0.1 with no persistence, owned by one test."""

    def __init__(self, directory: Path, *, cluster: bool = False, port: int | None = None,
                 password: str | None = None) -> None:
        self.binary = require_binary("redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.cluster = cluster
        self.password = password  # requirepass: clients must AUTH
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no",
                "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file",
                     str(self.dir / "nodes.conf"), "--cluster-node-timeout", "2000"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            poll_until(self._answers, f"redis-server to answer PING on port {self.port}",
                       interval=0.05)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.dir / "redis.log"
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}: "
                               + (log.read_text()[-2000:] if log.exists() else "no log"))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(16).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisClusterServers:
    """Three cluster-enabled redis-servers joined as a three-master Redis Cluster."""

    def __init__(self, directory: Path) -> None:
        self.cli = require_binary("redis-cli")
        self.nodes = [RedisServer(directory / f"node{i}", cluster=True) for i in range(3)]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([self.cli, "--cluster", "create", *addrs, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)

        def ready() -> bool:  # every node must know the whole cluster
            infos = [subprocess.run([self.cli, "-p", str(n.port), "cluster", "info"],
                                    capture_output=True, text=True, timeout=5).stdout
                     for n in self.nodes]
            return all("cluster_state:ok" in i and "cluster_known_nodes:3" in i for i in infos)

        poll_until(ready, "every redis cluster node to report the 3-node cluster ok",
                   timeout=20, interval=0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


ROOT = Path(__file__).resolve().parent.parent


class ProxyProcess:
    """``casf-proxy run`` as a real process (for multi-process and crash tests)."""

    def __init__(self, config: Path, env: dict[str, str], log: Path) -> None:
        self.config = config
        self.port = free_port()
        self.admin_port = free_port()
        self.decisions_port = free_port()
        self.env = {**os.environ, **env, "CASF_PORT": str(self.port),
                    "CASF_ADMIN_PORT": str(self.admin_port),
                    "CASF_DECISIONS_PORT": str(self.decisions_port)}
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
        poll_until(self._listening, lambda: f"the proxy's admin port {self.admin_port} to "
                   f"open; its log: {self.log.read_text()[-2000:]}", timeout=20, interval=0.05)

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited: {self.log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", self.admin_port), timeout=0.2).close()
        except OSError:
            return False
        return True

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


# ------------------------------------------------------------------ PostgreSQL


def postgres_binaries() -> tuple[str, str] | None:
    """initdb and pg_ctl from PATH, else from the newest /usr/lib/postgresql/*/bin."""
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl:
        return initdb, pg_ctl
    import glob

    def version(path: str) -> float:
        try:
            return float(Path(path).parent.parent.name)
        except ValueError:
            return 0.0

    for found in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version,
                        reverse=True):
        ctl = Path(found).with_name("pg_ctl")
        if ctl.exists():
            return found, str(ctl)
    return None


def require_postgres() -> tuple[str, str]:
    bins = postgres_binaries()
    if bins is None:
        message = ("PostgreSQL (initdb/pg_ctl) not found on PATH or in "
                   "/usr/lib/postgresql/*/bin: this PostgreSQL audit test cannot run (set PG_DSN "
                   "to run the others against an existing server)")
        skip_or_fail(message + " (install: apt-get install postgresql)")
    return bins


def _unprivileged() -> tuple[int, int] | None:
    """(uid, gid) to run initdb/postgres as when we are root (they refuse to run as root)."""
    if os.geteuid() != 0:
        return None
    import pwd

    for name in ("casf", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return entry.pw_uid, entry.pw_gid
    subprocess.run(["useradd", "--system", "--no-create-home", "casf"], check=True,
                   capture_output=True, timeout=30)
    entry = pwd.getpwnam("casf")
    return entry.pw_uid, entry.pw_gid


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl), owned by the tests.

    The data directory lives in a fresh temporary directory (not pytest's
    tmp_path, which an unprivileged server user cannot enter); under root the
    server runs as an unprivileged user. ``stop``/``start`` keep the data and
    the port, for outage tests. Durability settings are relaxed (fsync off):
    the tests stop and kill the server, never the machine.
    """

    def __init__(self, *, fsync: bool = False) -> None:
        import tempfile

        self.initdb, self.pg_ctl = require_postgres()
        self.owner = _unprivileged()
        self.root = Path(tempfile.mkdtemp(prefix="casf-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.fsync = fsync
        if self.owner is not None:
            os.chown(self.root, *self.owner)
        self._run([self.initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust",
                   "-E", "UTF8", "--locale=C", "--no-sync"], timeout=120)

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
               "HOME": str(self.root)}
        if self.owner is None:
            res = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                 env=env, cwd=self.root)
        else:  # root: run as the unprivileged owner of the data directory
            res = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                                 env=env, cwd=self.root, user=self.owner[0],
                                 group=self.owner[1], extra_groups=[])
        if res.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed ({res.returncode}): "
                               f"{res.stdout[-1500:]}{res.stderr[-1500:]}")
        return res

    @property
    def dsn(self) -> str:
        """The superuser's DSN for the ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200 "
                f"-c full_page_writes={'on' if self.fsync else 'off'}")
        self._run([self.pg_ctl, "-D", str(self.data), "-o", opts, "-l",
                   str(self.root / "postgres.log"), "-w", "-t", "60", "start"], timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """``fast``: a clean shutdown; ``immediate``: like a crash (recovery on start)."""
        self._run([self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"],
                  timeout=90)

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except RuntimeError:
            pass  # not running
        shutil.rmtree(self.root, ignore_errors=True)


class ExternalPostgres:
    """The PostgreSQL named by ``PG_DSN`` when the tests run (never stopped by them)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def dsn_for(self, database: str) -> str:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.dsn)
        return urlunsplit(parts._replace(path="/" + database))

    def start(self) -> None:
        pass

    def destroy(self) -> None:
        pass
