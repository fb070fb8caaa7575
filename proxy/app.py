"""The composition root: builds the runtime from a Config and serves its listeners.

The traffic listener is aiohttp's low-level ``web.Server`` (no router: every
request goes to :meth:`Runtime.handle`, which hands it to the current
generation's inline proxy door, :class:`~proxy.doors.inline.InlineProxy`); the
admin listener is a regular ``web.Application`` serving ``/health``,
``/healthz``, ``/metrics``, the token-protected admin API, the approver API and
the console; the decision listener (``listen.decisions``) serves the decision
doors of :mod:`proxy.doors.decisions`. Resources are opened in
:meth:`Runtime.open` and closed in reverse order.

The parts live in their own modules: :mod:`proxy.generations` (config
generations and hot reload; :meth:`Runtime._build` is the one place a
generation is assembled: stages, decision core, front doors),
:mod:`proxy.watch` (the one file watcher), :mod:`proxy.admin` (the admin
listener's application).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.admin import AdminApi
from proxy.approvals import core as approval_states
from proxy.approvals.model import Details
from proxy.approvals.runtime import open_approvals
from proxy.approvals.service import Approvals
from proxy.audit.postgres import PostgresAuditSink
from proxy.audit.records import EventIds
from proxy.audit.sqlite import SqliteAuditSink
from proxy.config import Config, load_config
from proxy.console.auditview import AuditView, PostgresAuditView, SqliteAuditView
from proxy.core import DecisionCore
from proxy.doors.decisions import DecisionDoors
from proxy.doors.inline import InlineProxy
from proxy.embedded.memory import MemoryAdmissionStore, MemoryModeStore, ModeStateFile
from proxy.forward import new_upstream
from proxy.generations import (
    GEN,
    Generation,
    Generations,
    Shared,
    same_identity,
    session_params,
)
from proxy.httpserver import TrafficServer
from proxy.identity import Identity
from proxy.metrics import Metrics
from proxy.policy_opa import open_policy_engine
from proxy.ports import (
    AdmissionStore,
    AuditSink,
    ModeStore,
    PolicyEngine,
)
from proxy.redisstate import RedisAdmissionStore, RedisConnection, RedisModeStore, RedisSettings
from proxy.settings import Environment
from proxy.stages import Stage
from proxy.stages.admission import AdmissionStage
from proxy.stages.approval import ApprovalGate
from proxy.stages.attributes import AttributeBuilder
from proxy.stages.authenticate import AuthenticateStage
from proxy.stages.policy import PolicyStage
from proxy.stages.ratelimit import RateRules
from proxy.tasks import spawn
from proxy.telemetry import Telemetry
from proxy.trail import AuditTrail
from proxy.watch import ConfigWatcher, Stat, file_stats, watched_files

log = logging.getLogger("casf")



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


def _version() -> str | None:
    try:
        return importlib.metadata.version("casf-proxy")
    except importlib.metadata.PackageNotFoundError:
        return None


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
        self.event_ids = EventIds()  # one sequence for every generation's records
        self.approvals: Approvals | None = None  # process-wide (approvals: needs a restart)
        self.audit_view: AuditView | None = None  # what the console reads
        self.telemetry: Telemetry | None = None
        self.backends = backends
        self.redis = redis
        self.worker = worker
        self.multiproc_dir = env.prometheus_multiproc_dir if worker is not None else None
        self.draining = False  # set at SIGTERM: readiness answers 503 from then on
        self.in_flight = 0
        self.cut_off = 0  # requests cancelled at the drain timeout
        self.generations = Generations(metrics)
        self._watcher: asyncio.Task[None] | None = None
        self._stats: dict[str, Stat] = {}  # the files as the watcher last saw them

    # the current generation's parts (what a request that arrives now would use)

    @property
    def gen(self) -> Generation:
        return self.generations.current

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
                timeout_s=cfg.audit.timeout_s, queue_max=cfg.audit.queue_max,
                spool_dir=cfg.audit.spool_dir, on_full=metrics.audit_queue_full.inc)
            audit_kind, audit_where = "postgresql", "PostgreSQL (PG_DSN)"
        else:
            audit = SqliteAuditSink(cfg.audit.sqlite_path, cfg.audit.chain_id,
                                    batch_max=cfg.audit.batch_max,
                                    batch_wait_s=cfg.audit.batch_wait_s,
                                    timeout_s=cfg.audit.timeout_s,
                                    queue_max=cfg.audit.queue_max,
                                    spool_dir=cfg.audit.spool_dir,
                                    on_full=metrics.audit_queue_full.inc)
            audit_kind, audit_where = "sqlite", f"SQLite at {cfg.audit.sqlite_path}"
        await audit.start()
        conn: RedisConnection | None = None
        mode_follow: RedisModeStore | None = None
        rt: Runtime | None = None
        approvals_stack = contextlib.AsyncExitStack()
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
            # one tracer per process (after any fork); a dead collector only drops spans
            rt.telemetry = Telemetry(
                cfg.telemetry, service_version=_version(), instance_id=audit.chain_id,
                on_dropped=lambda reason, n: metrics.spans_dropped.labels(str(reason)).inc(n))
            if cfg.approvals is not None:
                runtime = rt
                rt.approvals = await approvals_stack.enter_async_context(open_approvals(
                    cfg.approvals, audit=audit, redis=conn, registry=metrics.registry,
                    event_id=rt.event_ids.next,
                    policy_hash=lambda: runtime.pipeline.policy_hash,
                    config_hash=lambda: runtime.cfg.digest))
                backends["approvals"] = "redis" if conn is not None else "memory"
                rt.audit_view = (PostgresAuditView(env.pg_dsn) if env.pg_dsn
                                 else SqliteAuditView(cfg.audit.sqlite_path))
            rt.generations.start(await rt._build(cfg, None))
            rt._stats = stats
            metrics.set_config_hash(cfg.digest)
            if watch:
                rt._watcher = spawn(ConfigWatcher(rt, rt._stats).run(),
                                    name="casf-config-watch")
            yield rt
        finally:
            if rt is not None:
                await rt._close_generations()
                if rt.audit_view is not None:
                    await rt.audit_view.close()
            await approvals_stack.aclose()
            if rt is not None and rt.telemetry is not None:
                await rt.telemetry.aclose()
            if mode_follow is not None:
                await mode_follow.close()
            if conn is not None:
                await conn.close()
            await audit.close()

    async def _build(self, cfg: Config, prev: Generation | None) -> Generation:
        """A complete generation for ``cfg``; reuses ``prev``'s parts that did not change."""
        stack = contextlib.AsyncExitStack()
        if prev is not None and prev.cfg.policy == cfg.policy:
            # the same policy (same bytes, query and engine settings): a key rotation
            # or a route change does not recompile it
            engine = prev.engine
            engine_value = engine.value
        else:
            engine_value = await stack.enter_async_context(open_policy_engine(cfg.policy,
                                                                              self.metrics))
            engine = Shared(engine_value, stack.aclose)
        identity: Shared[Identity] | None = None
        try:
            if prev is not None and same_identity(prev.cfg, cfg):
                identity = prev.identity
                await identity.value.reload()  # key files and JWKS read now, not in ~1 s
            else:
                # with reload.watch the runtime's file watcher is the only one polling
                # the key files: a change reloads the config, and the identity with it
                new_identity = Identity.build(cfg.identity, self.env, self.metrics,
                                              watch_files=not cfg.reload.watch)
                await new_identity.start()
                identity = Shared(new_identity, new_identity.close)
            if prev is not None and session_params(prev.cfg) == session_params(cfg):
                session = prev.session
            else:
                new = new_upstream(cfg.upstream)
                session = Shared(new, new.close)
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
        gate: ApprovalGate | None = None
        if self.approvals is not None:
            gate = ApprovalGate(self.approvals, Details, approval_states, approval_states.DENIED,
                                approval_states.NOT_PENDING, cfg.audit.redact)
        trail = AuditTrail(self.audit, self.metrics, engine_value.policy_hash, cfg.audit.redact,
                           cfg.digest, self.event_ids)
        core = DecisionCore(cfg, stages, state=self.state, mode=self.mode, trail=trail,
                            metrics=self.metrics, approvals=gate,
                            telemetry=self.telemetry if self.telemetry and
                            self.telemetry.enabled else None)
        pipeline = InlineProxy(cfg, core, metrics=self.metrics, upstream=session.value,
                               consumed_headers=ident.consumed_headers,
                               stripped_headers=ident.stripped_headers,
                               mcp_sessions=prev.pipeline.mcp_sessions if prev else None)
        return Generation(cfg, pipeline, engine, identity, session)

    async def _close_generations(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.generations.close()

    # ------------------------------------------------------------ traffic

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The traffic listener's handler: the request keeps the generation it started with."""
        gen = self.generations.pin()
        self.in_flight += 1
        try:
            return await gen.pipeline.handle(request)
        except asyncio.CancelledError:
            if self.draining:
                self.cut_off += 1
            raise
        finally:
            self.in_flight -= 1
            self.generations.unpin(gen)

    @web.middleware
    async def _pin_generation(self, request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                              ) -> web.StreamResponse:
        """A decision-listener request keeps the generation it started with, too."""
        gen = self.generations.pin()
        self.in_flight += 1
        request[GEN] = gen
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            self.generations.unpin(gen)

    def decisions_app(self) -> web.Application:
        doors = DecisionDoors(lambda request: request[GEN].pipeline.core, self.metrics)
        return doors.app([AdminApi(self).errors, self._pin_generation])

    def close_websockets(self) -> None:
        """Close every generation's open WebSocket sessions with 1001 (going away)."""
        for gen in self.generations.every():
            gen.pipeline.websocket.shutdown()

    async def reload(self, reason: str) -> bool:
        """Load the config again and switch to it if (and only if) all of it is valid."""
        def load(old: Config) -> Config:
            cfg = load_config(old.source, self.env)
            return self.worker.apply(cfg, self.env) if self.worker is not None else cfg

        return await self.generations.reload(reason, load, self._build)

    # ------------------------------------------------------------ admin

    def admin_app(self) -> web.Application:
        return AdminApi(self).app()


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

    async def stop_traffic(self, timeout_s: float,
                           stopped: Callable[[], None] = lambda: None) -> None:
        """Stop accepting connections, close idle ones, and give the requests in flight
        up to ``timeout_s`` to finish (then they are cancelled). ``stopped`` runs once
        nothing new is accepted (the runtime closes its WebSocket sessions)."""
        runner = self.traffic
        for site in list(runner.sites):
            await site.stop()
        stopped()
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
    await serving.stop_traffic(sd.drain_timeout_s, rt.close_websockets)
    if rt.cut_off:
        log.error("shutting down: %d request(s) still running at the %d ms drain timeout "
                  "were cut off", rt.cut_off, sd.drain_timeout_s * 1000,
                  extra={"fields": {"event": "shutdown", "phase": "drain",
                                    "cut_off": rt.cut_off}})
    await serving.close()
