"""Shared setup for the approval tests: real identity, real audit file, real listener."""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.memory import MemoryApprovalStore
from proxy.approvals.metrics import ApprovalMetrics
from proxy.approvals.model import Details
from proxy.approvals.service import Approvals
from proxy.approvals.store import ApprovalStore, FindResult
from proxy.audit.records import EventIds
from proxy.audit.sqlite import SqliteAuditSink
from proxy.config import ApiKeysConfig, IdentityConfig, TrustedHeadersConfig, load_keys
from proxy.identity import Identity, open_identity
from proxy.metrics import Metrics
from proxy.settings import Environment
from tests.audit_rows import all_records

# the clinic's principals (the key for role R is demo-R), plus the second custodian
# and the tenant-2 custodian that show four eyes and tenant isolation
PRINCIPALS = {
    "receptionist": ("user-receptionist", "receptionist", "t1"),
    "nurse": ("user-nurse", "nurse", "t1"),
    "custodian": ("user-custodian", "custodian", "t1"),
    "custodian2": ("user-custodian2", "custodian", "t1"),
    "t2-custodian": ("user-t2-custodian", "custodian", "t2"),
}
POLICY_HASH = "sha256:" + "0" * 64


def key(name: str) -> str:
    return f"demo-{name}"


def write_keys(path: Path) -> Path:
    keys = [{"id": f"key-{n}", "sha256": hashlib.sha256(key(n).encode()).hexdigest(),
             "principal": {"id": pid, "role": role, "tenant": tenant}}
            for n, (pid, role, tenant) in PRINCIPALS.items()]
    path.write_text(yaml.safe_dump({"keys": keys}))
    return path


def identity_config(tmp: Path, trusted: bool = False) -> IdentityConfig:
    keys_file = write_keys(tmp / "keys.yaml")
    api = ApiKeysConfig(header="X-API-Key", keys_file=keys_file,
                        keys=load_keys(keys_file, Environment({})))
    if not trusted:
        return IdentityConfig(api_keys=api)
    th = TrustedHeadersConfig(sources=(ip_network("127.0.0.1/32"),))
    return IdentityConfig(api_keys=api, trusted_headers=th,
                          order=("trusted_headers", "api_keys"))


def details(caller: str = "custodian", request_id: str = "r-1",
            attrs: dict[str, Any] | None = None) -> Details:
    pid, role, tenant = PRINCIPALS[caller]
    return Details(tool="cliniccloud.cancel_appointment", effect="write", method="DELETE",
                   route="/appointments/{appointment_id}", caller=pid, caller_role=role,
                   tenant=tenant, request_id=request_id, reason_codes=("Approval_Required",),
                   attrs=attrs if attrs is not None else {
                       "subject": {"patient_id": "p1"}, "args": {"appointment_id": "a-17"},
                       "context": {"tenant_id": tenant}},
                   body_sha256=None, via="proxy")


@dataclass
class Env:
    url: str
    approvals: Approvals
    sink: SqliteAuditSink
    audit_path: Path
    registry: CollectorRegistry
    identity: Identity
    http: aiohttp.ClientSession
    audit_closed: bool = False

    async def stop_audit(self) -> None:
        """Stop the audit writer: every append fails from now on (the store is down)."""
        self.audit_closed = True
        await self.sink.close()

    async def seed(self, caller: str = "custodian", request_id: str = "r-1",
                   fingerprint: str = "fp-1", **kw: Any) -> FindResult:
        pid = PRINCIPALS[caller][0]
        return await self.approvals.request(f"{pid}\0{request_id}", fingerprint,
                                            details(caller, request_id, **kw))

    def records(self) -> list[dict[str, Any]]:
        return all_records(self.audit_path)

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@contextlib.asynccontextmanager
async def approvals_env(tmp: Path, *, store: ApprovalStore | None = None,
                        cfg: ApprovalsConfig | None = None, trusted: bool = False,
                        build: Callable[[Env, web.Application], None] | None = None,
                        clock: Callable[[], float] = time.time) -> AsyncIterator[Env]:
    """An admin app with the approver API (and whatever ``build`` adds) on 127.0.0.1."""
    from proxy.approvals.api import add_approval_routes, identity_authenticator

    cfg = cfg or ApprovalsConfig(approver_roles=("custodian",))
    audit_path = tmp / "audit.db"
    sink = SqliteAuditSink(audit_path, "chain-a", timeout_s=2.0)
    await sink.start()
    registry = CollectorRegistry()
    metrics = ApprovalMetrics(registry)
    ids = EventIds()
    svc = Approvals(cfg, store or MemoryApprovalStore(cfg), sink, event_id=ids.next,
                    policy_hash=lambda: POLICY_HASH, config_hash=lambda: "sha256:cfg",
                    metrics=metrics, clock=clock)
    async with open_identity(identity_config(tmp, trusted), Environment({}),
                             Metrics()) as identity:
        app = web.Application()
        add_approval_routes(app, lambda: svc, identity_authenticator(lambda: identity),
                            lambda: POLICY_HASH)
        async with aiohttp.ClientSession() as http:
            env = Env("", svc, sink, audit_path, registry, identity, http)
            if build is not None:
                build(env, app)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            env.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            try:
                yield env
            finally:
                await runner.cleanup()
                await svc.close()
                if not env.audit_closed:
                    await sink.close()


def with_console(mode: Callable[[], str] = lambda: "STEP_UP", *, ttl_s: float = 900.0,
                 session_clock: Callable[[], float] = time.monotonic
                 ) -> Callable[[Env, web.Application], None]:
    """A ``build`` for :func:`approvals_env` that serves the console (SQLite audit view)."""
    from proxy.approvals.api import api_key_header
    from proxy.console.app import ConsoleDeps, add_console
    from proxy.console.auditview import SqliteAuditView

    def build(env: Env, app: web.Application) -> None:
        from proxy.approvals.api import identity_authenticator
        deps = ConsoleDeps(approvals=lambda: env.approvals,
                           authenticate=identity_authenticator(lambda: env.identity),
                           api_key_header=lambda: api_key_header(env.identity),
                           audit=SqliteAuditView(env.audit_path), mode=mode,
                           policy_hash=lambda: POLICY_HASH, session_ttl_s=ttl_s,
                           cookie_secure=False, session_clock=session_clock)
        add_console(app, deps)

    return build
