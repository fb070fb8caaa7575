"""Wiring: builds the runtime from a Config and serves the two listeners.

The traffic listener is aiohttp's low-level ``web.Server`` (no router: every
request goes to :meth:`Pipeline.handle`); the admin listener is a regular
``web.Application`` serving ``/health``, ``/healthz``, ``/metrics`` and the
token-protected admin API. Resources are opened in :meth:`Runtime.open` and
closed in reverse order.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.audit.postgres import PostgresAuditSink
from proxy.audit.records import now_iso
from proxy.audit.sqlite import SqliteAuditSink
from proxy.config import Config, Mode
from proxy.embedded.memory import MemoryAdmissionStore, MemoryModeStore
from proxy.forward import new_session
from proxy.identity import Identity, open_identity
from proxy.metrics import Metrics
from proxy.pipeline import Pipeline
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

log = logging.getLogger("casf")


@dataclass(slots=True)
class Runtime:
    cfg: Config
    env: Environment
    metrics: Metrics
    audit: AuditSink
    mode: ModeStore
    pipeline: Pipeline
    backends: dict[str, str] = field(default_factory=dict)
    redis: RedisConnection | None = None
    identity: Identity | None = None
    engine: PolicyEngine | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, cfg: Config, env: Environment) -> AsyncIterator[Runtime]:
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
                mode = mode_follow = RedisModeStore(conn, cfg.mode_default)
                await mode_follow.start()
                backends = {"state": "redis", "audit": audit_kind, "policy": cfg.policy.engine}
                log.warning("shared state on Redis%s; audit on %s (chain %r)",
                            " Cluster" if rc.cluster else "", audit_where, audit.chain_id)
            else:
                state = MemoryAdmissionStore()
                mode = MemoryModeStore(cfg.mode_default)
                backends = {"state": "memory", "audit": audit_kind, "policy": cfg.policy.engine}
                log.warning("running embedded: in-memory replay/rate-limit/mode state (not "
                            "shared between replicas); audit on %s (chain %r)", audit_where,
                            audit.chain_id)
            async with (open_policy_engine(cfg.policy, metrics) as engine,
                        open_identity(cfg.identity, env, metrics) as identity,
                        new_session(cfg.upstream) as session):
                stages: list[Stage] = [
                    AuthenticateStage(identity),
                    AttributeBuilder(),
                    AdmissionStage(cfg.replay, RateRules(cfg.rate_limits, cfg.budgets), state,
                                   cfg.replay_lease_s, metrics),
                    PolicyStage(engine),
                ]
                pipeline = Pipeline(cfg, stages, state=state, mode=mode, audit=audit,
                                    policy_hash=engine.policy_hash, metrics=metrics,
                                    session=session, consumed_headers=identity.consumed_headers,
                                    stripped_headers=identity.stripped_headers)
                yield cls(cfg, env, metrics, audit, mode, pipeline, backends, conn,
                          identity=identity, engine=engine)
        finally:
            if mode_follow is not None:
                await mode_follow.close()
            if conn is not None:
                await conn.close()
            await audit.close()

    # ------------------------------------------------------------ admin

    def admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/admin/mode", self._get_mode)
        app.router.add_put("/admin/mode", self._put_mode)
        app.router.add_post("/admin/identity/reload", self._reload_identity)
        return app

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _healthz(self, _: web.Request) -> web.Response:
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
        resp = web.Response(body=generate_latest(self.metrics.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    def _authorised(self, request: web.Request) -> web.Response | None:
        token = self.env.admin_token
        if token is None:
            return web.json_response({"error": "admin API disabled (CASF_ADMIN_TOKEN unset)"},
                                     status=404)
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response({"error": "unauthorised"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return None

    async def _reload_identity(self, request: web.Request) -> web.Response:
        """Re-read API keys and refetch the JWKS now (docs/identity.md)."""
        denied = self._authorised(request)
        if denied is not None:
            return denied
        loaded = await self.identity.reload() if self.identity is not None else {}
        return web.json_response({"reloaded": loaded})

    async def _get_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        return web.json_response({"mode": self.mode.current().value})

    async def _put_mode(self, request: web.Request) -> web.Response:
        denied = self._authorised(request)
        if denied is not None:
            return denied
        try:
            body = orjson.loads(await request.read())
            new = Mode(body["mode"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return web.json_response(
                {"error": "body must be {\"mode\": ALLOW|STEP_UP|READ_ONLY|KILL_SWITCH}"},
                status=400)
        old = self.mode.current()
        # audited before it takes effect: an unaudited mode change must not happen
        try:
            await self.audit.append(self._mode_record(request, old, new, "ALLOW", 200, ()))
        except AuditUnavailable:
            return web.json_response({"error": "audit store unavailable; mode unchanged"},
                                     status=503)
        try:
            await self.mode.set(new)
        except StoreUnavailable:
            with contextlib.suppress(AuditUnavailable):
                reasons = (Reason.FAIL_CLOSED, Reason.MODE_STORE_UNAVAILABLE)
                await self.audit.append(self._mode_record(request, old, new, "DENY", 503,
                                                          reasons))
            return web.json_response({"error": "shared state unavailable; mode unchanged"},
                                     status=503)
        log.warning("mode changed %s -> %s", old.value, new.value)
        return web.json_response({"mode": new.value, "previous": old.value})

    def _mode_record(self, request: web.Request, old: Mode, new: Mode, decision: str,
                     status: int, reasons: tuple[str, ...]) -> dict[str, Any]:
        return {
            "event_id": self.pipeline.event_ids.next(), "ts": now_iso(), "kind": "decision",
            "request_id": request.headers.get("X-Request-Id"), "trace_id": None,
            "actor": "admin", "role": "admin", "tenant": None, "tool": "casf.admin.set_mode",
            "effect": "write", "method": "PUT", "route": "/admin/mode", "decision": decision,
            "status": status, "reason_codes": list(reasons),
            "policy_hash": self.pipeline.policy_hash, "body_sha256": None,
            "attrs": {"args": {"from": old.value, "to": new.value}},
        }


@dataclass(slots=True)
class Serving:
    traffic_port: int
    admin_port: int
    runners: list[web.BaseRunner]

    async def close(self) -> None:
        for runner in reversed(self.runners):
            await runner.cleanup()


async def serve(rt: Runtime, *, traffic_sock: socket.socket | None = None) -> Serving:
    """Start both listeners; returns their bound ports (port 0 picks a free one)."""
    cfg = rt.cfg
    server = web.Server(rt.pipeline.handle, access_log=None)
    traffic = web.ServerRunner(server, handle_signals=False)
    await traffic.setup()
    if traffic_sock is not None:
        tsite: web.BaseSite = web.SockSite(traffic, traffic_sock)
    else:
        tsite = web.TCPSite(traffic, cfg.traffic.host, cfg.traffic.port, backlog=1024)
    await tsite.start()
    admin = web.AppRunner(rt.admin_app(), access_log=None, handle_signals=False)
    await admin.setup()
    asite = web.TCPSite(admin, cfg.admin.host, cfg.admin.port)
    await asite.start()
    return Serving(_port(traffic), _port(admin), [traffic, admin])


def _port(runner: web.BaseRunner) -> int:
    addrs = runner.addresses
    return int(addrs[0][1]) if addrs else 0
