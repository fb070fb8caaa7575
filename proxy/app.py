"""Wiring: builds the runtime from a Config and serves the two listeners.

The traffic listener is aiohttp's low-level ``web.Server`` (no router: every
request goes to :meth:`Runtime.handle`, which hands it to the current
:class:`Pipeline`); the admin listener is a regular ``web.Application``
serving ``/health``, ``/healthz``, ``/metrics`` and the token-protected admin
API. Resources are opened in :meth:`Runtime.open` and closed in reverse order.

Hot reload (docs/operations.md): everything a config change can touch — the
config, the routes, the compiled policy, the identity sources, the upstream
session — lives in a *generation*. :meth:`Runtime.reload` loads the config and
builds a complete new generation (policy compiled, authenticators started);
only then does it become current. A request picks the current generation once,
when it arrives, and finishes with it; a replaced generation closes what only
it owns when its last request is done. A reload that fails changes nothing.
What is opened once per process (listeners, Redis, the audit store, the mode)
needs a restart to change; a reload that changes it says so in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.audit.postgres import PostgresAuditSink
from proxy.audit.records import now_iso
from proxy.audit.sqlite import SqliteAuditSink
from proxy.config import Config, Mode, load_config, rego_files
from proxy.core import DecisionCore, trace_context
from proxy.doors.decisions import DecisionDoors
from proxy.doors.inline import InlineProxy
from proxy.embedded.memory import MemoryAdmissionStore, MemoryModeStore, ModeStateFile
from proxy.envelope import envelope_response
from proxy.forward import UpstreamClient, new_upstream
from proxy.httpserver import TrafficServer
from proxy.identity import Identity
from proxy.metrics import Metrics, exposition
from proxy.model import Verdict
from proxy.policy_opa import OpaEngine, open_policy_engine
from proxy.ports import (
    AdmissionStore,
    AuditSink,
    AuditUnavailable,
    ModeStore,
    PolicyEngine,
    StoreUnavailable,
)
from proxy.reasons import Reason
from proxy.redisstate import RedisAdmissionStore, RedisConnection, RedisModeStore, RedisSettings
from proxy.settings import Environment
from proxy.stages import Stage
from proxy.stages.admission import AdmissionStage
from proxy.stages.attributes import AttributeBuilder
from proxy.stages.authenticate import AuthenticateStage
from proxy.stages.policy import PolicyStage
from proxy.stages.ratelimit import RateRules
from proxy.stages.replay import MAX_ID_LENGTH, parse_request_id
from proxy.strictjson import JsonRejected, loads_strict
from proxy.tasks import spawn
from proxy.trail import AuditTrail

log = logging.getLogger("casf")
_SET_MODE = "casf.admin.set_mode"  # the tool name of admin mode changes in the audit chain

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One of ``casf-proxy run --workers N``'s processes (docs/operations.md, workers).

    The parent picks concrete ports (so ``:0`` works) that every worker binds
    with SO_REUSEPORT; each worker writes its own audit chain.
    """

    index: int
    count: int
    traffic_port: int
    admin_port: int
    decisions_port: int = 0

    def apply(self, cfg: Config, env: Environment) -> Config:
        audit = cfg.audit
        # an explicit chain id, or SQLite's default one, would be shared by every
        # worker: suffix it. PostgreSQL without one leases a free chain per process.
        if audit.chain_id_set or not env.pg_dsn:
            audit = dataclasses.replace(audit, chain_id=f"{audit.chain_id}-w{self.index}")
        decisions = cfg.decisions_listener
        if decisions is not None:
            decisions = dataclasses.replace(decisions, port=self.decisions_port)
        return dataclasses.replace(
            cfg, traffic=dataclasses.replace(cfg.traffic, port=self.traffic_port),
            admin=dataclasses.replace(cfg.admin, port=self.admin_port), audit=audit,
            decisions_listener=decisions)


class _Shared(Generic[T]):
    """A resource used by one or more generations; closed when the last lets go."""

    def __init__(self, value: T, close: Callable[[], Awaitable[Any]]) -> None:
        self.value = value
        self._close = close
        self.users = 0

    def acquire(self) -> T:
        self.users += 1
        return self.value

    async def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            await self._close()


class _Generation:
    """The config and everything built from it, as one unit (see the module doc)."""

    __slots__ = ("active", "cfg", "engine", "identity", "pipeline", "released", "retired",
                 "session")

    def __init__(self, cfg: Config, pipeline: InlineProxy, engine: _Shared[PolicyEngine],
                 identity: _Shared[Identity], session: _Shared[UpstreamClient]) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.engine = engine
        self.identity = identity
        self.session = session
        for ref in (engine, identity, session):
            ref.acquire()
        self.active = 0
        self.retired = False
        self.released = False

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        await self.pipeline.flush()  # outcome records still on their way to the sink
        for ref in (self.session, self.identity, self.engine):
            try:
                await ref.release()
            except Exception:
                log.exception("closing a replaced config generation failed")


_GEN = web.RequestKey("casf_generation", _Generation)


def _describe(exc: BaseException) -> str:
    from proxy.config import ConfigError
    from proxy.policy_regorus import PolicyLoadError

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, PolicyLoadError):
        return f"policy does not compile: {exc}"
    return f"{type(exc).__name__}: {exc}"


# Settings read once at startup: a reload that changes them is logged, not applied.
def _restart_only(old: Config, new: Config) -> list[str]:
    changed = []
    if old.traffic != new.traffic:
        changed.append("listen.traffic")
    if old.admin != new.admin:
        changed.append("listen.admin")
    if old.decisions_listener != new.decisions_listener:
        changed.append("listen.decisions")
    if old.redis != new.redis:
        changed.append("redis")
    for name in ("sqlite_path", "chain_id", "batch_max", "batch_wait_s", "timeout_s"):
        if getattr(old.audit, name) != getattr(new.audit, name):
            changed.append(f"audit.{name.removesuffix('_s')}")
    if old.mode_default != new.mode_default:
        changed.append("mode.default")
    if old.mode_state_path != new.mode_state_path:
        changed.append("mode.state_path")
    return changed


def _session_params(cfg: Config) -> tuple[float, float, int]:
    u = cfg.upstream
    return (u.connect_timeout_s, u.read_timeout_s, u.pool_size)


def _same_identity(old: Config, new: Config) -> bool:
    """Equal apart from the key set (the authenticator re-reads its sources itself)."""
    a, b = old.identity, new.identity
    if a.api_keys is not None and b.api_keys is not None:
        a = dataclasses.replace(a, api_keys=dataclasses.replace(a.api_keys, keys=()))
        b = dataclasses.replace(b, api_keys=dataclasses.replace(b.api_keys, keys=()))
    return a == b


# ------------------------------------------------------------ file watch

Stat = tuple[str, int, int, int]


def watched_files(cfg: Config) -> list[Path]:
    """Every file a reload reads: the config, key sources, JWKS file, policy files."""
    out = [cfg.source]
    ak = cfg.identity.api_keys
    if ak is not None:
        if ak.keys_file is not None:
            out.append(ak.keys_file)
        if ak.keys_dir is not None:
            out.append(ak.keys_dir)
            with contextlib.suppress(OSError):
                out.extend(ak.keys_dir / n for n in sorted(os.listdir(ak.keys_dir))
                           if not n.startswith("."))
    if cfg.identity.jwt is not None and cfg.identity.jwt.jwks_file is not None:
        out.append(cfg.identity.jwt.jwks_file)
    if cfg.policy.bundle is not None:
        out.append(cfg.policy.bundle)
        out.extend(cfg.policy.files)
        with contextlib.suppress(OSError):  # a new or removed file changes the bundle
            out.extend(f for f in rego_files(cfg.policy.bundle) if f not in cfg.policy.files)
    return out


def file_stats(paths: list[Path]) -> dict[str, Stat]:
    """Where each path resolves to (symlinks followed: a ConfigMap's ``..data`` swap
    changes it), with inode, mtime and size. Blocking: run it in a thread."""
    out: dict[str, Stat] = {}
    for path in paths:
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
            out[str(path)] = (real, st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            out[str(path)] = ("", -1, -1, -1)
    return out


# ------------------------------------------------------------ runtime


class Runtime:
    """The process's shared resources plus the current config generation."""

    def __init__(self, env: Environment, metrics: Metrics, audit: AuditSink, mode: ModeStore,
                 state: AdmissionStore, backends: dict[str, str],
                 redis: RedisConnection | None, worker: WorkerSpec | None) -> None:
        self.env = env
        self.metrics = metrics
        self.audit = audit
        self.mode = mode
        self.state = state
        self.backends = backends
        self.redis = redis
        self.worker = worker
        self.multiproc_dir = env.prometheus_multiproc_dir if worker is not None else None
        self.draining = False  # set at SIGTERM: readiness answers 503 from then on
        self.in_flight = 0
        self.cut_off = 0  # requests cancelled at the drain timeout
        self._gen: _Generation | None = None
        self._retired: list[_Generation] = []
        self._reload_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self._stats: dict[str, Stat] = {}

    # the current generation's parts (what a request that arrives now would use)

    @property
    def gen(self) -> _Generation:
        assert self._gen is not None, "runtime is not open"
        return self._gen

    @property
    def cfg(self) -> Config:
        return self.gen.cfg

    @property
    def pipeline(self) -> InlineProxy:
        return self.gen.pipeline

    @property
    def engine(self) -> PolicyEngine:
        return self.gen.engine.value

    @property
    def identity(self) -> Identity:
        return self.gen.identity.value

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Config, env: Environment, *, worker: WorkerSpec | None = None,
                   watch: bool = True) -> AsyncIterator[Runtime]:
        if worker is not None:
            cfg = worker.apply(cfg, env)
        stats = await asyncio.to_thread(file_stats, watched_files(cfg))
        metrics = Metrics()
        audit: SqliteAuditSink | PostgresAuditSink
        if env.pg_dsn:
            audit = PostgresAuditSink(
                env.pg_dsn, cfg.audit.chain_id if cfg.audit.chain_id_set else None,
                host=env.get("HOSTNAME") or socket.gethostname() or "casf",
                batch_max=cfg.audit.batch_max, batch_wait_s=cfg.audit.batch_wait_s,
                timeout_s=cfg.audit.timeout_s)
            audit_kind, audit_where = "postgresql", "PostgreSQL (PG_DSN)"
        else:
            audit = SqliteAuditSink(cfg.audit.sqlite_path, cfg.audit.chain_id,
                                    batch_max=cfg.audit.batch_max,
                                    batch_wait_s=cfg.audit.batch_wait_s,
                                    timeout_s=cfg.audit.timeout_s)
            audit_kind, audit_where = "sqlite", f"SQLite at {cfg.audit.sqlite_path}"
        await audit.start()
        conn: RedisConnection | None = None
        mode_follow: RedisModeStore | None = None
        rt: Runtime | None = None
        try:
            state: AdmissionStore
            mode: ModeStore
            if env.redis_url:
                rc = cfg.redis
                conn = RedisConnection(RedisSettings(
                    env.redis_url, cluster=rc.cluster, timeout_s=rc.timeout_s,
                    pool_size=rc.pool_size, key_prefix=rc.key_prefix,
                    mode_refresh_s=rc.mode_refresh_s))
                if not await conn.prepare():
                    log.error("Redis is unreachable at startup: writes fail closed until it is")
                state = RedisAdmissionStore(conn)
                mode = mode_follow = RedisModeStore(
                    conn, cfg.mode_default,
                    ModeStateFile(cfg.mode_state_path) if cfg.mode_state_path else None)
                await mode_follow.start()
                backends = {"state": "redis", "audit": audit_kind, "policy": cfg.policy.engine}
                log.warning("shared state on Redis%s; audit on %s (chain %r)",
                            " Cluster" if rc.cluster else "", audit_where, audit.chain_id)
            else:
                state = MemoryAdmissionStore(max_bytes=cfg.replay.memory_max_bytes,
                                             on_evict=metrics.replay_evicted.inc)
                mode = MemoryModeStore(cfg.mode_default)
                backends = {"state": "memory", "audit": audit_kind, "policy": cfg.policy.engine}
                log.warning("running embedded: in-memory replay/rate-limit/mode state (not "
                            "shared between replicas); audit on %s (chain %r)", audit_where,
                            audit.chain_id)
            rt = cls(env, metrics, audit, mode, state, backends, conn, worker)
            rt._gen = await rt._build(cfg, None)
            rt._stats = stats
            metrics.set_config_hash(cfg.digest)
            if watch:
                rt._watcher = spawn(rt._watch(), name="casf-config-watch")
            yield rt
        finally:
            if rt is not None:
                await rt._close_generations()
            if mode_follow is not None:
                await mode_follow.close()
            if conn is not None:
                await conn.close()
            await audit.close()

    async def _build(self, cfg: Config, prev: _Generation | None) -> _Generation:
        """A complete generation for ``cfg``; reuses ``prev``'s parts that did not change."""
        stack = contextlib.AsyncExitStack()
        engine_value = await stack.enter_async_context(open_policy_engine(cfg.policy,
                                                                          self.metrics))
        engine = _Shared(engine_value, stack.aclose)
        identity: _Shared[Identity] | None = None
        try:
            if prev is not None and _same_identity(prev.cfg, cfg):
                identity = prev.identity
                await identity.value.reload()  # key files and JWKS read now, not in ~1 s
            else:
                new_identity = Identity.build(cfg.identity, self.env, self.metrics)
                await new_identity.start()
                identity = _Shared(new_identity, new_identity.close)
            if prev is not None and _session_params(prev.cfg) == _session_params(cfg):
                session = prev.session
            else:
                new = new_upstream(cfg.upstream)
                session = _Shared(new, new.close)
        except BaseException:
            if identity is not None and identity.users == 0:
                await identity.value.close()
            await stack.aclose()
            raise
        ident = identity.value
        stages: list[Stage] = [
            AuthenticateStage(ident),
            AttributeBuilder(cfg.decisions.trusted_callers),
            AdmissionStage(cfg.replay, RateRules(cfg.rate_limits, cfg.budgets), self.state,
                           cfg.replay_lease_s, self.metrics),
            PolicyStage(engine_value),
        ]
        trail = AuditTrail(self.audit, self.metrics, engine_value.policy_hash, cfg.audit.redact,
                           cfg.digest, prev.pipeline.trail.event_ids if prev else None)
        core = DecisionCore(cfg, stages, state=self.state, mode=self.mode, trail=trail,
                            metrics=self.metrics)
        pipeline = InlineProxy(cfg, core, metrics=self.metrics, upstream=session.value,
                               consumed_headers=ident.consumed_headers,
                               stripped_headers=ident.stripped_headers,
                               mcp_sessions=prev.pipeline.mcp_sessions if prev else None)
        return _Generation(cfg, pipeline, engine, identity, session)

    async def _close_generations(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        async with self._reload_lock:  # a reload in progress finishes first
            gens = [*self._retired, *([self._gen] if self._gen is not None else [])]
            self._retired.clear()
            for gen in gens:
                await gen.release()

    # ------------------------------------------------------------ traffic

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The traffic listener's handler: the request keeps the generation it started with."""
        gen = self.gen
        gen.active += 1
        self.in_flight += 1
        try:
            return await gen.pipeline.handle(request)
        except asyncio.CancelledError:
            if self.draining:
                self.cut_off += 1
            raise
        finally:
            self.in_flight -= 1
            gen.active -= 1
            if gen.retired and gen.active == 0:
                spawn(self._release(gen), name="casf-release-generation")

    @web.middleware
    async def _pin_generation(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
        """A decision-listener request keeps the generation it started with, too."""
        gen = self.gen
        gen.active += 1
        self.in_flight += 1
        request[_GEN] = gen
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            gen.active -= 1
            if gen.retired and gen.active == 0:
                spawn(self._release(gen), name="casf-release-generation")

    def decisions_app(self) -> web.Application:
        doors = DecisionDoors(lambda request: request[_GEN].pipeline.core, self.metrics)
        return doors.app([self._admin_errors, self._pin_generation])

    async def _release(self, gen: _Generation) -> None:
        with contextlib.suppress(ValueError):
            self._retired.remove(gen)
        await gen.release()

    # ------------------------------------------------------------ hot reload

    async def reload(self, reason: str) -> bool:
        """Load the config again and switch to it if (and only if) all of it is valid."""
        async with self._reload_lock:
            old = self.gen
            try:
                cfg = await asyncio.to_thread(load_config, old.cfg.source, self.env)
                if self.worker is not None:
                    cfg = self.worker.apply(cfg, self.env)
                gen = await self._build(cfg, old)
            except Exception as exc:
                self.metrics.config_reload.labels("error").inc()
                log.error("config reload (%s) failed, keeping config %s: %s", reason,
                          old.cfg.digest[:12], _describe(exc),
                          extra={"fields": {"event": "config_reload", "result": "error",
                                            "hash": old.cfg.digest}})
                return False
            if cfg.digest == old.cfg.digest and reason.startswith("file change"):
                # the same bytes as the config in force (a file was touched, or a
                # directory and the file in it were both seen to change): nothing
                # to do, and not a reload
                await gen.release()
                self.metrics.config_reload.labels("unchanged").inc()
                log.info("config files touched, content unchanged (hash %s): not reloaded",
                         cfg.digest[:12])
                return True
            ignored = _restart_only(old.cfg, cfg)
            if ignored:
                log.warning("config reload (%s): %s changed; these settings apply only after "
                            "a restart (the running values stay)", reason, ", ".join(ignored),
                            extra={"fields": {"event": "config_reload",
                                              "restart_required": ignored}})
            self._gen = gen  # from here on, new requests use the new generation
            old.retired = True
            if old.active == 0:
                await old.release()
            else:
                self._retired.append(old)
            self.metrics.config_reload.labels("success").inc()
            self.metrics.set_config_hash(cfg.digest)
            log.warning("config reloaded (%s): hash %s -> %s, policy %s", reason,
                        old.cfg.digest[:12], cfg.digest[:12], gen.pipeline.policy_hash,
                        extra={"fields": {"event": "config_reload", "result": "success",
                                          "hash": cfg.digest,
                                          "policy_hash": gen.pipeline.policy_hash}})
            return True

    async def _watch(self) -> None:
        """Poll the watched files; a change (content, inode or symlink target) reloads."""
        while True:
            await asyncio.sleep(self.cfg.reload.interval_s)
            if not self.cfg.reload.watch or self.draining:
                continue
            try:
                before = self._stats
                now = await asyncio.to_thread(file_stats, watched_files(self.cfg))
                if now == before:
                    continue
                changed = sorted(p for p in now if now[p] != before.get(p))
                await self.reload("file change: " + ", ".join(changed[:3])
                                  + (" ..." if len(changed) > 3 else ""))
                # the stats taken before the load: a write during it is seen next time;
                # files the new config added are stat'ed now
                paths = watched_files(self.cfg)
                fresh = await asyncio.to_thread(file_stats, [p for p in paths
                                                             if str(p) not in now])
                self._stats = {str(p): now.get(str(p)) or fresh[str(p)] for p in paths}
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("config file watch failed")

    # ------------------------------------------------------------ admin

    def admin_app(self) -> web.Application:
        app = web.Application(middlewares=[self._admin_errors], client_max_size=64 * 1024)
        app.router.add_get("/health", self._health)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/mode", self._get_mode)
        app.router.add_put("/admin/mode", self._put_mode)
        app.router.add_post("/admin/identity/reload", self._reload_identity)
        app.router.add_post("/admin/config/reload", self._reload_config)
        return app

    def _admin_envelope(self, request: web.BaseRequest, status: int, reasons: tuple[str, ...],
                        message: str, headers: tuple[tuple[str, str], ...] = (),
                        tool: str | None = None) -> web.Response:
        """The admin API's own errors: the same envelope as the traffic listener's."""
        verdict = Verdict("DENY", status, reasons, message, headers, shadowable=False)
        return envelope_response(verdict, tool, "", trace_context(request.headers)[0],
                                 self.pipeline.policy_hash)

    @web.middleware
    async def _admin_errors(self, request: web.Request,
                            handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                            ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                return self._admin_envelope(request, 413, (Reason.REQUEST_TOO_LARGE,),
                                            "request body too large")
            if exc.status == 405:
                return self._admin_envelope(request, 405, (Reason.ROUTE_NOT_MAPPED,),
                                            "method not allowed here",
                                            (("Allow", exc.headers.get("Allow", "")),))
            return self._admin_envelope(request, exc.status, (Reason.ROUTE_NOT_MAPPED,),
                                        "no such admin resource")

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _healthz(self, _: web.Request) -> web.Response:
        if self.draining:  # shutting down: out of the load balancer first
            return web.json_response({"status": "draining", "checks": {},
                                      "backends": self.backends,
                                      "mode": self.mode.current().value,
                                      "config_hash": self.cfg.digest}, status=503)
        policy_ok = not isinstance(self.engine, OpaEngine) or await self.engine.healthy()
        checks = {"config": "ok", "policy": "ok" if policy_ok else "unavailable",
                  "audit": "ok" if await self.audit.healthy() else "unavailable"}
        if self.redis is not None:
            checks["redis"] = "ok" if await self.redis.ping() else "unavailable"
        ok = all(v == "ok" for v in checks.values())
        return web.json_response({"status": "ok" if ok else "unavailable", "checks": checks,
                                  "backends": self.backends,
                                  "mode": self.mode.current().value,
                                  "config_hash": self.cfg.digest},
                                 status=200 if ok else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        self.metrics.set_mode(self.mode.current().value, (m.value for m in Mode))
        if self.multiproc_dir is not None:  # every worker's files: read them off the loop
            body = await asyncio.to_thread(exposition, self.metrics, self.multiproc_dir)
        else:
            body = exposition(self.metrics, None)
        resp = web.Response(body=body)
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    def _authorised(self, request: web.Request) -> web.Response | None:
        token = self.env.admin_token
        if token is None:
            return self._admin_envelope(request, 404, (Reason.ADMIN_DISABLED,),
                                        "admin API disabled (CASF_ADMIN_TOKEN unset)")
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            reason = Reason.AUTH_INVALID if given else Reason.AUTH_MISSING
            return self._admin_envelope(request, 401, (reason,), "unauthorised",
                                        (("WWW-Authenticate", "Bearer"),))
        return None

    async def _reload_identity(self, request: web.Request) -> web.Response:
        """Re-read API keys and refetch the JWKS now (docs/identity.md)."""
        denied = self._authorised(request)
        if denied is not None:
            return denied
        loaded = await self.identity.reload() if self.identity is not None else {}
        return web.json_response({"reloaded": loaded})

    async def _reload_config(self, request: web.Request) -> web.Response:
        """Reload the config now, like SIGHUP (this process only; see docs/operations.md)."""
        denied = self._authorised(request)
        if denied is not None:
            return denied
        ok = await self.reload("admin API")
        return web.json_response({"reloaded": ok, "config_hash": self.cfg.digest,
                                  "policy_hash": self.pipeline.policy_hash},
                                 status=200 if ok else 422)

    async def _get_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        return web.json_response({"mode": self.mode.current().value})

    async def _put_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        # validated like the traffic listener's request ids (proxy.stages.replay): the
        # value goes into the audit chain; absent, one is generated
        ids = request.headers.getall("X-Request-Id", [])
        request_id = (self.pipeline.event_ids.next() if not ids else
                      parse_request_id(ids[0]) if len(ids) == 1 else None)
        if request_id is None:
            verdict = Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,),
                              f"X-Request-Id must be sent once, 1-{MAX_ID_LENGTH} printable "
                              "characters", shadowable=False)
            return envelope_response(verdict, _SET_MODE, "", trace_context(request.headers)[0],
                                     self.pipeline.policy_hash)
        try:
            body = loads_strict(await request.read())  # duplicate keys are refused
            if not isinstance(body, dict) or set(body) != {"mode"}:
                raise ValueError("not {\"mode\": ...}")
            new = Mode(body["mode"])
        except (JsonRejected, TypeError, ValueError):
            return self._admin_envelope(
                request, 400, (Reason.INVALID_MODE,),
                'body must be {"mode": "ALLOW" | "STEP_UP" | "READ_ONLY" | "KILL_SWITCH"}',
                tool=_SET_MODE)
        old = self.mode.current()
        # audited before it takes effect: an unaudited mode change must not happen
        try:
            await self.audit.append(self._mode_record(request_id, old, new, "ALLOW", 200, ()))
        except AuditUnavailable:
            return self._admin_envelope(request, 503, (Reason.FAIL_CLOSED,
                                                       Reason.AUDIT_UNAVAILABLE),
                                        "audit store unavailable; mode unchanged",
                                        (("Retry-After", "1"),), tool=_SET_MODE)
        try:
            # false: a more restrictive mode accepted while Redis is unreachable; in force
            # here, published once Redis answers (docs/state.md)
            shared = await self.mode.set(new)
        except StoreUnavailable:
            reasons = (Reason.FAIL_CLOSED, Reason.MODE_STORE_UNAVAILABLE)
            with contextlib.suppress(AuditUnavailable):
                await self.audit.append(self._mode_record(request_id, old, new, "DENY", 503,
                                                          reasons))
            return self._admin_envelope(request, 503, reasons,
                                        "shared state unavailable; mode unchanged",
                                        (("Retry-After", "1"),), tool=_SET_MODE)
        log.warning("mode changed %s -> %s%s", old.value, new.value,
                    "" if shared else " (this replica only until Redis answers)")
        return web.json_response({"mode": new.value, "previous": old.value, "shared": shared})

    def _mode_record(self, request_id: str, old: Mode, new: Mode, decision: str,
                     status: int, reasons: tuple[str, ...]) -> dict[str, Any]:
        return {
            "event_id": self.pipeline.event_ids.next(), "ts": now_iso(), "kind": "decision",
            "request_id": request_id, "trace_id": None,
            "actor": "admin", "role": "admin", "tenant": None, "tool": _SET_MODE,
            "effect": "write", "method": "PUT", "route": "/admin/mode", "decision": decision,
            "status": status, "reason_codes": list(reasons),
            "policy_hash": self.pipeline.policy_hash, "body_sha256": None,
            "attrs": {"args": {"from": old.value, "to": new.value}},
        }


class _AdminRunner(web.AppRunner):
    """The admin and decision apps on the traffic listener's HTTP server: parse
    errors get the envelope (never the offending bytes, which may hold the admin
    token), a slow head is cut off, and request bodies are never decompressed."""

    def __init__(self, app: web.Application, rt: Runtime, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._rt = rt

    async def _make_server(self) -> web.Server:
        app = self.app
        app._set_loop(asyncio.get_running_loop())
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        rt = self._rt
        return TrafficServer(app._handle, request_factory=app._make_request,
                             auto_decompress=False,
                             policy_hash=lambda: rt.pipeline.policy_hash,
                             head_timeout=lambda: rt.cfg.limits.header_timeout_s,
                             on_refusal=lambda verdict, trace_id: rt.pipeline.record_refusal(
                                 verdict, trace_id), **self._kwargs)


@dataclass(slots=True)
class Serving:
    traffic_port: int
    admin_port: int
    runners: list[web.BaseRunner]
    decisions_port: int | None = None

    @property
    def traffic(self) -> web.BaseRunner:
        return self.runners[0]

    async def stop_traffic(self, timeout_s: float) -> None:
        """Stop accepting connections, close idle ones, and give the requests in flight
        up to ``timeout_s`` to finish (then they are cancelled)."""
        runner = self.traffic
        for site in list(runner.sites):
            await site.stop()
        server = runner.server
        if server is not None:
            await asyncio.sleep(0)  # let requests already read reach their handler
            server.pre_shutdown()
            await server.shutdown(timeout_s)

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


async def serve(rt: Runtime, *, traffic_sock: socket.socket | None = None) -> Serving:
    """Start both listeners; returns their bound ports (port 0 picks a free one).

    Workers (``rt.worker``) bind both with SO_REUSEPORT: the kernel spreads new
    connections over the workers.
    """
    cfg = rt.cfg
    loop = asyncio.get_running_loop()

    def make_request(message: Any, payload: Any, protocol: Any, writer: Any, task: Any
                     ) -> web.BaseRequest:
        if rt.draining:  # answer with Connection: close, so clients reconnect elsewhere
            message = message._replace(should_close=True)
        return web.BaseRequest(message, payload, protocol, writer, task, loop)

    # parse errors (smuggling, oversized headers) get the envelope: proxy.httpserver
    server = TrafficServer(rt.handle, access_log=None, request_factory=make_request,
                           auto_decompress=False,
                           policy_hash=lambda: rt.pipeline.policy_hash,
                           head_timeout=lambda: rt.cfg.limits.header_timeout_s,
                           on_refusal=lambda verdict, trace_id: rt.pipeline.record_refusal(
                               verdict, trace_id))
    traffic = web.ServerRunner(server, handle_signals=False,
                               shutdown_timeout=cfg.shutdown.drain_timeout_s)
    await traffic.setup()
    reuse = True if rt.worker is not None else None
    if traffic_sock is not None:
        tsite: web.BaseSite = web.SockSite(traffic, traffic_sock)
    else:
        tsite = web.TCPSite(traffic, cfg.traffic.host, cfg.traffic.port, backlog=1024,
                            reuse_port=reuse)
    await tsite.start()
    admin = _AdminRunner(rt.admin_app(), rt, access_log=None, handle_signals=False)
    await admin.setup()
    asite = web.TCPSite(admin, cfg.admin.host, cfg.admin.port, reuse_port=reuse)
    await asite.start()
    runners: list[web.BaseRunner] = [traffic, admin]
    decisions_port: int | None = None
    if cfg.decisions_listener is not None:
        doors = _AdminRunner(rt.decisions_app(), rt, access_log=None, handle_signals=False)
        await doors.setup()
        runners.append(doors)
        await web.TCPSite(doors, cfg.decisions_listener.host, cfg.decisions_listener.port,
                          reuse_port=reuse).start()
        decisions_port = _port(doors)
    return Serving(_port(traffic), _port(admin), runners, decisions_port)


def _port(runner: web.BaseRunner) -> int:
    addrs = runner.addresses
    return int(addrs[0][1]) if addrs else 0


async def graceful_stop(rt: Runtime, serving: Serving, hurry: asyncio.Event | None = None
                        ) -> None:
    """SIGTERM's sequence (docs/operations.md): readiness 503 now; keep accepting for
    ``shutdown.delay_ms`` (``hurry`` cuts it short); stop accepting; let in-flight
    requests finish for up to ``shutdown.drain_timeout_ms``; close the listeners.
    The audit writer is flushed and the pools are closed when the runtime closes."""
    sd = rt.cfg.shutdown
    rt.draining = True
    log.warning("shutting down: readiness is 503; accepting for %d ms more, then draining "
                "for up to %d ms", sd.delay_s * 1000, sd.drain_timeout_s * 1000,
                extra={"fields": {"event": "shutdown", "phase": "delay"}})
    if sd.delay_s > 0:
        waiter = hurry if hurry is not None else asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(sd.delay_s):
                await waiter.wait()
    log.warning("shutting down: no longer accepting; %d request(s) in flight", rt.in_flight,
                extra={"fields": {"event": "shutdown", "phase": "drain",
                                  "in_flight": rt.in_flight}})
    await serving.stop_traffic(sd.drain_timeout_s)
    if rt.cut_off:
        log.error("shutting down: %d request(s) still running at the %d ms drain timeout "
                  "were cut off", rt.cut_off, sd.drain_timeout_s * 1000,
                  extra={"fields": {"event": "shutdown", "phase": "drain",
                                    "cut_off": rt.cut_off}})
    await serving.close()
