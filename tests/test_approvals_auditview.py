"""The console's audit views over a real SQLite file and a real PostgreSQL: same answers."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit.postgres import PostgresAuditSink, migrate
from proxy.audit.records import EventIds, now_iso
from proxy.audit.sqlite import SqliteAuditSink
from proxy.console.auditview import (
    AuditView,
    Filters,
    PostgresAuditView,
    SqliteAuditView,
)
from proxy.ports import AuditSink
from tests.conftest import EXTERNAL_PG_DSN
from tests.servers import ExternalPostgres, PostgresServer

Server = PostgresServer | ExternalPostgres


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Server]:
    if EXTERNAL_PG_DSN:
        yield ExternalPostgres(EXTERNAL_PG_DSN)
        return
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


def record(ids: EventIds, i: int, **over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "event_id": ids.next(), "ts": now_iso(), "kind": "decision", "request_id": f"r-{i}",
        "trace_id": None, "actor": "user-receptionist", "role": "receptionist",
        "tenant": "t1", "tool": "cliniccloud.create_appointment", "effect": "write",
        "method": "POST", "route": "/appointments", "decision": "ALLOW", "status": 200,
        "reason_codes": [], "policy_hash": "sha256:p", "body_sha256": None,
        "attrs": {"subject": {"patient_id": f"p{i}"}, "args": {}, "context": {}},
    }
    base.update(over)
    return base


async def fill(sink: AuditSink) -> None:
    ids = EventIds()
    for i in range(30):
        await sink.append(record(ids, i))
    await sink.append(record(ids, 100, decision="DENY", status=403,
                             reason_codes=["Role_NotPermitted", "Policy_Denied"],
                             tool="stripe.generate_invoice"))
    await sink.append(record(ids, 101, decision="NEEDS_APPROVAL", status=403,
                             reason_codes=["Approval_Required"]))
    await sink.append(record(ids, 102, kind="approval", action="created",
                             approval_id="apr_x", via="proxy",
                             reason_codes=["Approval_Required"]))
    await sink.append(record(ids, 200, tenant="t2", actor="user-t2-receptionist",
                             decision="DENY", status=403, reason_codes=["Role_NotPermitted"]))


@pytest.fixture(params=["sqlite", "postgres"])
async def view(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AuditView]:
    if request.param == "sqlite":
        path = tmp_path / "audit.db"
        sink = SqliteAuditSink(path, "chain-a", timeout_s=2.0)
        await sink.start()
        await fill(sink)
        await sink.close()
        v: AuditView = SqliteAuditView(path)
    else:
        server: Server = request.getfixturevalue("pg_server")
        name = "casf_v_" + uuid.uuid4().hex[:12]
        admin = await asyncpg.connect(server.dsn)
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        dsn = server.dsn_for(name)
        await migrate(dsn)
        pg_sink = PostgresAuditSink(dsn, "chain-a", timeout_s=5)
        await pg_sink.start()
        await fill(pg_sink)
        await pg_sink.close()
        v = PostgresAuditView(dsn)
    try:
        yield v
    finally:
        await v.close()


async def test_recent_is_per_tenant_newest_first(view: AuditView) -> None:
    rows = await view.recent(Filters(tenant="t1"), 10, 0)
    assert len(rows) == 10
    assert [r["request_id"] for r in rows[:3]] == ["r-102", "r-101", "r-100"]
    assert rows[0]["action"] == "created" and rows[0]["via"] == "proxy"  # extra fields
    assert rows[1]["attrs"] == {"subject": {"patient_id": "p101"}, "args": {}, "context": {}}
    assert all(r["tenant"] == "t1" for r in await view.recent(Filters(tenant="t1"), 200, 0))
    t2 = await view.recent(Filters(tenant="t2"), 50, 0)
    assert [r["request_id"] for r in t2] == ["r-200"]
    assert await view.recent(Filters(tenant=None), 50, 0) == []


@pytest.mark.parametrize(("filters", "expected"), [
    ({"decision": "DENY"}, ["r-100"]),
    ({"decision": "NEEDS_APPROVAL"}, ["r-101"]),
    ({"reason": "Policy_Denied"}, ["r-100"]),
    ({"reason": "Approval_Required"}, ["r-102", "r-101"]),
    ({"reason": "Approval_Required", "kind": "approval"}, ["r-102"]),
    ({"tool": "stripe.generate_invoice"}, ["r-100"]),
    ({"tool": "stripe.generate_invoice", "decision": "ALLOW"}, []),
    ({"reason": "Role"}, []),  # whole codes only
    ({"since": "2999-01-01T00:00:00.000000Z"}, []),
    ({"until": "2000-01-01T00:00:00.000000Z"}, []),
])
async def test_filters(view: AuditView, filters: dict[str, Any], expected: list[str]) -> None:
    rows = await view.recent(Filters(tenant="t1", **filters), 50, 0)
    assert [r["request_id"] for r in rows] == expected


async def test_paging(view: AuditView) -> None:
    first = await view.recent(Filters(tenant="t1"), 20, 0)
    second = await view.recent(Filters(tenant="t1"), 20, 20)
    assert len(first) == 20 and len(second) == 13
    assert not {r["event_id"] for r in first} & {r["event_id"] for r in second}
    assert await view.recent(Filters(tenant="t1"), 20, 40) == []


async def test_chain_status(view: AuditView) -> None:
    status = await view.chain_status()
    assert status.ok and status.error is None and status.records == 34
    [head] = status.chains
    assert head.chain_id == "chain-a" and head.last_seq == 34 and head.broken is None
    assert head.last_hash.startswith("sha256:") or len(head.last_hash) == 64


async def test_sqlite_tampering_shows(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    sink = SqliteAuditSink(path, "chain-a", timeout_s=2.0)
    await sink.start()
    await fill(sink)
    await sink.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE audit_events SET decision = 'ALLOW' WHERE seq = 31")
    conn.commit()
    conn.close()
    view = SqliteAuditView(path)
    try:
        status = await view.chain_status()
    finally:
        await view.close()
    assert not status.ok
    assert status.chains[0].broken is not None and "seq 31" in status.chains[0].broken


async def test_missing_store_is_reported(tmp_path: Path) -> None:
    view = SqliteAuditView(tmp_path / "absent.db")
    status = await view.chain_status()
    assert not status.ok and status.error is not None
    from proxy.ports import AuditUnavailable
    with pytest.raises(AuditUnavailable):
        await view.recent(Filters(tenant="t1"), 10, 0)
    pg_view = PostgresAuditView("postgresql://nobody@127.0.0.1:1/none", timeout_s=1)
    status = await pg_view.chain_status()
    assert not status.ok and status.error is not None
    with pytest.raises(AuditUnavailable):
        await pg_view.recent(Filters(tenant="t1"), 10, 0)
    await pg_view.close()
