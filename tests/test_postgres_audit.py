"""The PostgreSQL audit store against a real PostgreSQL (never a mock).

A session-scoped throwaway server (initdb/pg_ctl, tests/servers.py) or the
server named by ``PG_DSN``; every test gets a fresh database. Covered: the
schema and its migration, the append-only trigger and the writer role,
tamper detection by ``audit verify``, per-instance chains and their lease,
group commit under two proxy processes, an outage and recovery without
restart, privacy, and signed digests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.audit.chain import Break, ChainCheck, seal, verify_records
from proxy.audit.postgres import (
    COLUMNS,
    AuditStartError,
    PostgresAuditSink,
    from_row,
    migrate,
    to_row,
)
from proxy.audit.records import FIELDS
from proxy.ports import AuditUnavailable
from tests.conftest import (
    EXTERNAL_PG_DSN,
    ROOT,
    MakeProxy,
    Proxy,
    Upstream,
    _upstream_app,
    clinic_env,
    write_config,
)
from tests.servers import ExternalPostgres, PostgresServer, ProxyProcess
from tests.waiting import wait_until

pytestmark = pytest.mark.postgres

PHI = "PHI-DIAGNOSIS-91c2e7"
SMS = "SMS-BODY-4d1f0a"
APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
Server = PostgresServer | ExternalPostgres


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
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


async def _admin(server: Server, sql: str) -> None:
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def fresh_db(pg_server: Server) -> AsyncIterator[str]:
    """A new, empty database (no schema); its DSN."""
    name = "casf_t_" + uuid.uuid4().hex[:12]
    await _admin(pg_server, f'CREATE DATABASE "{name}"')
    yield pg_server.dsn_for(name)
    await _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def pg_dsn(fresh_db: str) -> str:
    """A new database with the audit schema applied."""
    await migrate(fresh_db)
    return fresh_db


@pytest.fixture
def pg_proxy(make_proxy: Callable[..., Any], pg_dsn: str) -> Callable[..., Any]:
    def factory(patch: Callable[[dict[str, Any]], None] = lambda d: None) -> Any:
        return make_proxy(patch, PG_DSN=pg_dsn)
    return factory


def cli(*args: str, dsn: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLINIC_UPSTREAM": "http://127.0.0.1:9"}
    if dsn is not None:
        env["PG_DSN"] = dsn
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


async def rows(dsn: str, chain: str | None = None) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        sql = f"SELECT {', '.join(COLUMNS)} FROM audit_events"
        if chain is not None:
            return [from_row(r) for r in await conn.fetch(
                sql + " WHERE chain_id = $1 ORDER BY seq", chain)]
        return [from_row(r) for r in await conn.fetch(sql + " ORDER BY chain_id, seq")]
    finally:
        await conn.close()


async def superuser(dsn: str, *statements: tuple[Any, ...] | str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for st in statements:
            if isinstance(st, str):
                await conn.execute(st)
            else:
                await conn.execute(*st)
    finally:
        await conn.close()


async def traffic(p: Proxy) -> None:
    assert (await p.call("GET", "/appointments"))[0] == 200
    body = {**APPT, "notes": PHI}
    assert (await p.call("POST", "/appointments", json=body, rid="a1"))[0] == 201
    assert (await p.call("POST", "/appointments", json=body, rid="a1"))[0] == 201  # replay
    sms = {"patient_id": "p1", "message": SMS}
    assert (await p.call("POST", "/sms", key="nurse", json=sms, rid="s1"))[0] == 201
    assert (await p.call("GET", "/patients/p1/history", key="doctor"))[0] == 200
    assert (await p.call("GET", "/patients/p1/history"))[0] == 403  # role denied
    assert (await p.call("GET", "/nope", key=None))[0] in (401, 403)
    assert (await p.call("GET", "/appointments", key="demo-wrong-key-value"))[0] == 401


# ------------------------------------------------------------------ schema


def test_schema_shipped_in_the_package_is_the_operator_copy() -> None:
    shipped = sorted((ROOT / "proxy" / "audit" / "sql").glob("*.sql"))
    operator = sorted((ROOT / "deploy" / "sql").glob("*.sql"))
    assert [p.name for p in shipped] == [p.name for p in operator] == ["001_audit.sql"]
    for a, b in zip(shipped, operator, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{a} and {b} differ: copy deploy/sql over"


async def test_migrate_is_idempotent(fresh_db: str, tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path, lambda d: None))
    first = cli("audit", "migrate", "-c", cfg, dsn=fresh_db)
    assert first.returncode == 0, first.stderr
    assert "001_audit: applied" in first.stdout
    again = cli("audit", "migrate", "-c", cfg, dsn=fresh_db)
    assert again.returncode == 0, again.stderr
    assert "001_audit: already applied" in again.stdout
    conn = await asyncpg.connect(fresh_db)
    try:
        triggers = {r["tgname"] for r in await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'audit_events'::regclass "
            "AND NOT tgisinternal")}
        assert triggers == {"audit_events_append_only", "audit_events_no_truncate"}
        # the SQL itself is idempotent too: running it again without the bookkeeping works
        await conn.execute("DELETE FROM casf_audit_migrations")
    finally:
        await conn.close()
    third = cli("audit", "migrate", "-c", cfg, dsn=fresh_db)
    assert third.returncode == 0 and "001_audit: applied" in third.stdout, third.stderr
    bad = cli("audit", "migrate", "-c", cfg, dsn="postgresql://postgres@127.0.0.1:1/x")
    assert bad.returncode == 2 and "audit store unavailable" in bad.stderr


async def test_proxy_refuses_to_start_without_schema(fresh_db: str, tmp_path: Path,
                                                     upstream: Upstream) -> None:
    cfg = write_config(tmp_path, lambda d: None)
    env = dict(clinic_env(upstream.url, tmp_path, PG_DSN=fresh_db).variables)
    proc = ProxyProcess(cfg, env, tmp_path / "p.log")
    with pytest.raises(RuntimeError, match="audit migrate"):
        proc.start()
    assert proc.proc is not None and proc.proc.wait(10) == 2


# ------------------------------------------------------------------ append-only


def _with_user(dsn: str, user: str, password: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


async def test_append_only_trigger_and_writer_role(pg_proxy: Any, pg_dsn: str) -> None:
    async with pg_proxy() as p:
        await traffic(p)
    n = len(await rows(pg_dsn))
    assert n >= 8
    for sql in ("UPDATE audit_events SET decision = 'ALLOW' WHERE seq = 2",
                "DELETE FROM audit_events WHERE seq = 2",
                "TRUNCATE audit_events"):
        with pytest.raises(asyncpg.PostgresError, match="append-only"):
            await superuser(pg_dsn, sql)
    assert len(await rows(pg_dsn)) == n

    role, password = "casf_w_" + uuid.uuid4().hex[:8], uuid.uuid4().hex
    await superuser(pg_dsn, f"CREATE ROLE {role} LOGIN PASSWORD '{password}' "
                            "IN ROLE casf_audit_writer")
    try:
        writer_dsn = _with_user(pg_dsn, role, password)
        sink = PostgresAuditSink(writer_dsn, "writer-role", timeout_s=5)
        await sink.start()  # SELECT + INSERT are all the proxy needs
        receipt = await sink.append({"event_id": "w1", "kind": "decision"})
        assert receipt.seq == 1
        await sink.close()
        for sql in ("UPDATE audit_events SET status = 1",
                    "DELETE FROM audit_events",
                    "ALTER TABLE audit_events DISABLE TRIGGER USER",
                    "DROP TRIGGER audit_events_append_only ON audit_events"):
            with pytest.raises(asyncpg.PostgresError) as err:
                await superuser(writer_dsn, sql)
            assert isinstance(err.value, asyncpg.InsufficientPrivilegeError), sql
    finally:
        await superuser(pg_dsn, f"DROP ROLE IF EXISTS {role}")


# ------------------------------------------------------------------ tampering


async def _tamper(dsn: str, kind: str, chain: str, k: int, recs: list[dict[str, Any]]) -> str:
    """Apply one tampering (the trigger is gone); returns what verify must print."""
    target = recs[k - 1]
    if kind == "modified":
        await superuser(dsn, ("UPDATE audit_events SET decision = 'DENY', status = 403 "
                              "WHERE chain_id = $1 AND seq = $2", chain, k))
        return f"seq {k} (event {target['event_id']}): hash mismatch: record modified"
    if kind == "deleted":
        await superuser(dsn, ("DELETE FROM audit_events WHERE chain_id = $1 AND seq = $2",
                              chain, k))
        return f"record seq {k} missing (deleted)"
    if kind == "inserted":
        # make room (the unique key forbids a duplicate seq), then a well-formed forgery
        await superuser(
            dsn,
            ("UPDATE audit_events SET seq = seq + 1000000 WHERE chain_id = $1 AND seq >= $2",
             chain, k),
            ("UPDATE audit_events SET seq = seq - 999999 WHERE chain_id = $1 AND seq > 1000000",
             chain))
        forged: dict[str, Any] = {f: None for f in FIELDS}
        forged.update({"event_id": "forged-1", "ts": target["ts"], "kind": "decision",
                       "decision": "ALLOW", "status": 200, "reason_codes": [], "attrs": {}})
        seal(forged, chain, k, recs[k - 2]["hash"])
        conn = await asyncpg.connect(dsn)
        try:
            await conn.copy_records_to_table("audit_events", records=[to_row(forged)],
                                             columns=COLUMNS)
        finally:
            await conn.close()
        return f"record seq {k} (event forged-1) was inserted"
    assert kind == "reordered"
    await superuser(
        dsn,
        ("UPDATE audit_events SET seq = 1000000 WHERE chain_id = $1 AND seq = $2", chain, k),
        ("UPDATE audit_events SET seq = $2 WHERE chain_id = $1 AND seq = $3", chain, k, k + 1),
        ("UPDATE audit_events SET seq = $2 WHERE chain_id = $1 AND seq = 1000000", chain, k + 1))
    return f"records seq {k} and seq {k + 1} (event {target['event_id']}) are swapped"


@pytest.mark.parametrize("kind", ["modified", "deleted", "inserted", "reordered"])
async def test_tampering_is_detected_and_named(pg_proxy: Any, pg_dsn: str, kind: str) -> None:
    async with pg_proxy() as p:
        await traffic(p)
        cfg = str(p.cfg.source)
    ok = cli("audit", "verify", "-c", cfg, dsn=pg_dsn)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok chain 'clinic-0'" in ok.stdout and "(postgresql)" in ok.stdout
    recs = await rows(pg_dsn)
    await superuser(pg_dsn, "DROP TRIGGER audit_events_append_only ON audit_events")
    expected = await _tamper(pg_dsn, kind, "clinic-0", 4, recs)
    bad = cli("audit", "verify", "-c", cfg, dsn=pg_dsn)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert expected in bad.stdout, bad.stdout
    assert f"[{kind}]" in bad.stdout
    assert "chain verification FAILED" in bad.stdout


async def test_verify_one_chain_and_time_window(pg_proxy: Any, pg_dsn: str) -> None:
    async with pg_proxy() as p:
        await traffic(p)
        cfg = str(p.cfg.source)
    recs = await rows(pg_dsn)
    since = recs[4]["ts"]  # from seq 5: anchored on seq 4
    win = cli("audit", "verify", "-c", cfg, "--since", since, dsn=pg_dsn)
    assert win.returncode == 0, win.stdout + win.stderr
    assert f"(seq 5..{len(recs)})" in win.stdout
    assert cli("audit", "verify", "-c", cfg, "--chain", "clinic-0", dsn=pg_dsn).returncode == 0
    missing = cli("audit", "verify", "-c", cfg, "--chain", "nope", dsn=pg_dsn)
    assert missing.returncode == 1 and "no records for chain 'nope'" in missing.stdout
    assert cli("audit", "verify", "-c", cfg, "--since", "yesterday", dsn=pg_dsn).returncode == 2

    await superuser(pg_dsn, "DROP TRIGGER audit_events_append_only ON audit_events",
                    "UPDATE audit_events SET status = 599 WHERE seq = 2")
    # seq 2 is outside the window; the whole store shows it
    assert cli("audit", "verify", "-c", cfg, "--since", since, dsn=pg_dsn).returncode == 0
    assert cli("audit", "verify", "-c", cfg, dsn=pg_dsn).returncode == 1
    await superuser(pg_dsn, "UPDATE audit_events SET status = 599 WHERE seq = 4")
    anchored = cli("audit", "verify", "-c", cfg, "--since", since, dsn=pg_dsn)
    assert anchored.returncode == 1 and "seq 4" in anchored.stdout  # the window's anchor


async def test_verify_unreachable_store_is_exit_2(tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path, lambda d: None))
    res = cli("audit", "verify", "-c", cfg, dsn="postgresql://postgres@127.0.0.1:1/x")
    assert res.returncode == 2 and "audit store unavailable" in res.stderr


# ------------------------------------------------------------------ chains and lease


async def test_group_commit_resume_and_lease(pg_dsn: str) -> None:
    sink = PostgresAuditSink(pg_dsn, "c1", batch_max=64, timeout_s=5)
    await sink.start()
    receipts = await asyncio.gather(*(sink.append({"event_id": f"e{i}", "kind": "decision"})
                                      for i in range(300)))
    assert sorted(r.seq for r in receipts) == list(range(1, 301))
    assert sink.batches < 300 / 4, sink.batches  # concurrent appends shared transactions
    assert await sink.healthy()

    twin = PostgresAuditSink(pg_dsn, "c1", timeout_s=5)
    with pytest.raises(AuditStartError, match="already being written by backend pid"):
        await twin.start()
    await sink.close()

    again = PostgresAuditSink(pg_dsn, "c1", timeout_s=5)
    await again.start()  # the lease was released with the connection
    nxt = await again.append({"event_id": "after-restart", "kind": "decision"})
    last = max(receipts, key=lambda r: r.seq)
    assert nxt.seq == 301
    stored = await rows(pg_dsn, "c1")
    assert stored[-1]["prev_hash"] == last.hash
    await again.close()
    assert [type(r) for r in verify_records(stored)] == [ChainCheck]

    # no chain configured: each process takes the first free worker slot
    a = PostgresAuditSink(pg_dsn, None, host="pod", timeout_s=5)
    b = PostgresAuditSink(pg_dsn, None, host="pod", timeout_s=5)
    await a.start()
    await b.start()
    assert (a.chain_id, b.chain_id) == ("pod-0", "pod-1")
    await a.close()
    c = PostgresAuditSink(pg_dsn, None, host="pod", timeout_s=5)
    await c.start()
    assert c.chain_id == "pod-0"
    await b.close()
    await c.close()


async def test_killed_connection_leaves_no_gap_and_loses_nothing(pg_dsn: str) -> None:
    sink = PostgresAuditSink(pg_dsn, "k1", timeout_s=2)
    await sink.start()
    acked = [await sink.append({"event_id": f"a{i}", "kind": "decision"}) for i in range(5)]

    async def burst(tag: str, n: int) -> list[Any]:
        return await asyncio.gather(*(sink.append({"event_id": f"{tag}{i}", "kind": "decision"})
                                      for i in range(n)), return_exceptions=True)

    inflight = asyncio.ensure_future(burst("b", 50))
    await superuser(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE application_name = 'casf-proxy audit k1'")
    results = await inflight
    acked += [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, AuditUnavailable) for r in results if isinstance(r, BaseException))
    async def appended() -> Any:  # recovery without restart
        try:
            return await sink.append({"event_id": "after", "kind": "decision"})
        except AuditUnavailable:
            return None

    acked.append(await wait_until(appended, "the sink to recover", interval=0.1))
    await sink.close()
    stored = await rows(pg_dsn, "k1")
    assert [type(r) for r in verify_records(stored)] == [ChainCheck]
    assert [r["seq"] for r in stored] == list(range(1, len(stored) + 1))
    by_seq = {r["seq"]: r["hash"] for r in stored}
    for receipt in acked:  # every acknowledged record is there, exactly as acknowledged
        assert by_seq[receipt.seq] == receipt.hash


async def test_unique_key_stops_a_writer_without_the_lease(pg_dsn: str) -> None:
    sink = PostgresAuditSink(pg_dsn, "u1", timeout_s=2)
    await sink.start()
    first = await sink.append({"event_id": "x1", "kind": "decision"})
    # a rogue writer ignoring the lease takes position 2 first
    rogue = seal({**{f: None for f in FIELDS}, "event_id": "rogue", "kind": "decision"},
                 "u1", 2, first.hash)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table("audit_events", records=[to_row(rogue)],
                                         columns=COLUMNS)
    finally:
        await conn.close()
    with pytest.raises(AuditUnavailable):
        await sink.append({"event_id": "x2", "kind": "decision"})
    async def appended() -> Any:
        try:
            return await sink.append({"event_id": "x3", "kind": "decision"})
        except AuditUnavailable:
            return None

    third = await wait_until(appended, "the sink to append after the rogue record",
                             interval=0.1)
    await sink.close()
    assert third.seq == 3  # continued after the rogue record: no fork, no gap
    stored = await rows(pg_dsn, "u1")
    assert [r["event_id"] for r in stored] == ["x1", "rogue", "x3"]
    assert not [r for r in verify_records(stored) if isinstance(r, Break)]


# ------------------------------------------------------------------ two processes


@contextlib.asynccontextmanager
async def roomy_upstream() -> AsyncIterator[Upstream]:
    """The recording upstream with a listen backlog for hundreds of connections at once."""
    state = Upstream()
    runner = web.AppRunner(_upstream_app(state), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=2048).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


async def test_two_processes_500_concurrent_requests(pg_dsn: str, tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["audit"].pop("chain_id", None)  # each process picks its own worker chain
        # generous bounds: this test counts records, it does not measure latency
        d["upstream"].update(connect_timeout_ms=10_000, timeout_ms=60_000)
        d["audit"]["timeout_ms"] = 10_000

    cfg = write_config(tmp_path, patch)
    async with roomy_upstream() as upstream:
        await _two_processes(cfg, pg_dsn, tmp_path, upstream)


async def _two_processes(cfg: Path, pg_dsn: str, tmp_path: Path, upstream: Upstream) -> None:
    procs = []
    for name in ("a", "b"):
        env = dict(clinic_env(upstream.url, tmp_path, PG_DSN=pg_dsn, HOSTNAME="pod-x",
                              CASF_AUDIT_PATH=str(tmp_path / f"{name}.db")).variables)
        proc = ProxyProcess(cfg, env, tmp_path / f"{name}.log")
        proc.start()
        procs.append(proc)
    sent = {0: 0, 1: 0}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=600)) as s:
            async def one(i: int) -> int:
                target = procs[i % 2]
                headers = {"X-API-Key": "demo-receptionist"}
                if i % 4 == 0:
                    headers["Idempotency-Key"] = f"k-{i}"
                    req = s.post(target.url + "/appointments", headers=headers,
                                 json={"patient_id": f"p{i}", "slot": f"s{i}"})
                else:
                    req = s.get(target.url + f"/appointments?patient_id=p{i}", headers=headers)
                async with req as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(i) for i in range(500)))
        for i, status in enumerate(statuses):
            assert status in (200, 201), (i, status)
            sent[i % 2] += 1
    finally:
        codes = [p.stop() for p in procs]
    assert codes == [0, 0]
    assert len(upstream.seen) == 500

    res = cli("audit", "verify", "-c", str(cfg), dsn=pg_dsn)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 chain(s)" in res.stdout
    stored = await rows(pg_dsn)
    chains = sorted({r["chain_id"] for r in stored})
    assert chains == ["pod-x-0", "pod-x-1"]
    forwarded = {s.headers["X-Request-Id"] for s in upstream.seen}
    allowed: set[str] = set()
    per_chain = []
    for chain in chains:
        mine = [r for r in stored if r["chain_id"] == chain]
        decisions = [r for r in mine if r["kind"] == "decision" and r["decision"] == "ALLOW"]
        outcomes = [r for r in mine if r["kind"] == "outcome"]
        assert len(decisions) == len(outcomes) and len(mine) == 2 * len(decisions)
        per_chain.append(len(decisions))
        allowed |= {r["request_id"] for r in decisions}
    assert sorted(per_chain) == sorted(sent.values()) == [250, 250]
    assert sum(per_chain) == len(upstream.seen)
    assert allowed == forwarded


async def test_second_process_on_the_same_chain_refuses_to_start(
        pg_dsn: str, tmp_path: Path, upstream: Upstream) -> None:
    cfg = write_config(tmp_path, lambda d: d["audit"].update(chain_id="shared"))
    env = dict(clinic_env(upstream.url, tmp_path, PG_DSN=pg_dsn).variables)
    first = ProxyProcess(cfg, env, tmp_path / "first.log")
    first.start()
    try:
        second = ProxyProcess(cfg, env, tmp_path / "second.log")
        with pytest.raises(RuntimeError, match="proxy exited"):
            second.start()
        assert second.proc is not None and second.proc.wait(10) == 2
        log = (tmp_path / "second.log").read_text()
        assert "audit chain 'shared' is already being written by" in log
    finally:
        assert first.stop() == 0


# ------------------------------------------------------------------ outage


async def test_outage_refuses_everything_and_recovers_without_restart(
        make_proxy: MakeProxy, tmp_path: Path) -> None:
    server = PostgresServer()  # its own server: this test stops it
    try:
        await asyncio.to_thread(server.start)
        await migrate(server.dsn)

        def patch(d: dict[str, Any]) -> None:
            d["audit"]["timeout_ms"] = 1000

        async with make_proxy(patch, PG_DSN=server.dsn) as p:
            assert (await p.call("GET", "/appointments"))[0] == 200
            assert (await p.call("POST", "/appointments", json=APPT, rid="before"))[0] == 201
            before = len(p.upstream.seen)
            committed = await rows(server.dsn)
            await asyncio.to_thread(server.stop, "immediate")
            for method, path, payload, rid, key in (
                    ("GET", "/appointments", None, None, "receptionist"),
                    ("GET", "/patients/p1/history", None, None, "doctor"),  # PHI read
                    ("POST", "/appointments", APPT, "during", "receptionist")):
                status, hdrs, raw = await p.call(method, path, json=payload, rid=rid, key=key)
                assert status == 503, (method, path, raw)
                env = json.loads(raw)
                assert env["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
                assert env["decision"] == "DENY" and hdrs["Retry-After"]
            assert len(p.upstream.seen) == before  # the upstream saw nothing
            async with p.session.get(p.admin + "/healthz") as r:
                assert r.status == 503 and (await r.json())["checks"]["audit"] == "unavailable"

            await asyncio.to_thread(server.start)
            async def ready() -> bool:  # readiness comes back by itself, before any traffic
                async with p.session.get(p.admin + "/healthz") as r:
                    return r.status == 200

            await wait_until(ready, "the audit store to recover (readiness 200)", timeout=15,
                             interval=0.1)
            assert (await p.call("GET", "/appointments"))[0] == 200
            # the refused write released its idempotency claim: the retry proceeds
            assert (await p.call("POST", "/appointments", json=APPT, rid="during"))[0] == 201
            assert len(p.upstream.seen) == before + 2
            assert 'casf_fail_closed_total{trigger="audit"} 3.0' in await p.metrics()
            cfg = str(p.cfg.source)
        after = await rows(server.dsn)
        assert after[:len(committed)] == committed  # acknowledged records survived
        res = cli("audit", "verify", "-c", cfg, dsn=server.dsn)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        await asyncio.to_thread(server.destroy)


# ------------------------------------------------------------------ privacy


async def test_phi_and_credentials_never_reach_the_table(pg_proxy: Any, pg_dsn: str) -> None:
    async with pg_proxy() as p:
        await traffic(p)
    conn = await asyncpg.connect(pg_dsn)
    try:
        dump = await conn.fetchval("SELECT string_agg(t::text, E'\\n') FROM audit_events t")
    finally:
        await conn.close()
    for secret in (PHI, SMS, "demo-receptionist", "demo-nurse", "demo-wrong-key-value"):
        assert secret not in dump, secret
    assert "sha256:" in dump  # args.message is hashed by the clinic config
    # every decision names its body's digest (outcome records are compact: they
    # refer to their decision)
    assert all(r["body_sha256"] for r in await rows(pg_dsn) if r["kind"] != "outcome")


# ------------------------------------------------------------------ digest


def _keys(tmp_path: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp_path / "digest.key", tmp_path / "digest.pub"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


async def test_signed_digest_verifies_and_a_flipped_byte_fails(
        pg_proxy: Any, pg_dsn: str, tmp_path: Path) -> None:
    async with pg_proxy() as p:
        await traffic(p)
        cfg = str(p.cfg.source)
    stored = await rows(pg_dsn)
    priv, pub = _keys(tmp_path)
    out = tmp_path / "digest.json"
    made = cli("audit", "digest", "-c", cfg, "--sign", str(priv), "--out", str(out), dsn=pg_dsn)
    assert made.returncode == 0, made.stderr
    doc = json.loads(out.read_bytes())
    assert doc["store"] == "postgresql" and doc["records"] == len(stored)
    assert doc["chains"][0]["chain_id"] == "clinic-0"
    assert doc["chains"][0]["last_hash"] == stored[-1]["hash"]
    assert doc["chains"][0]["first_hash"] == stored[0]["hash"]
    assert doc["signature"]["alg"] == "Ed25519"

    good = cli("audit", "digest", "--verify", str(out), "--key", str(pub))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "signature valid" in good.stdout

    raw = out.read_bytes()
    for pos in (len(raw) // 2, raw.index(b'"merkle_root":"') + 20, raw.index(b'"value":"') + 12,
                raw.index(b'"count":') + 8):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        bad = tmp_path / f"flipped-{pos}.json"
        bad.write_bytes(bytes(flipped))
        res = cli("audit", "digest", "--verify", str(bad), "--key", str(pub))
        assert res.returncode == 1, (pos, res.stdout)
        assert "FAILED" in res.stdout

    (tmp_path / "other").mkdir()
    other, _ = _keys(tmp_path / "other")
    wrong = cli("audit", "digest", "--verify", str(out), "--key", str(other))
    assert wrong.returncode == 1 and "different key" in wrong.stdout

    today = datetime.now(UTC).date().isoformat()
    dated = cli("audit", "digest", "-c", cfg, "--date", today, dsn=pg_dsn)
    assert dated.returncode == 0 and json.loads(dated.stdout)["records"] == len(stored)
    empty = cli("audit", "digest", "-c", cfg, "--date", "2001-01-01", dsn=pg_dsn)
    assert empty.returncode == 0 and json.loads(empty.stdout)["chains"] == []

    # the digest anchors the chain heads: removing the newest record is caught
    anchored = cli("audit", "verify", "-c", cfg, "--digest", str(out), dsn=pg_dsn)
    assert anchored.returncode == 0, anchored.stdout
    await superuser(pg_dsn, "DROP TRIGGER audit_events_append_only ON audit_events",
                    ("DELETE FROM audit_events WHERE seq = $1", len(stored)))
    assert cli("audit", "verify", "-c", cfg, dsn=pg_dsn).returncode == 0  # invisible alone
    cut = cli("audit", "verify", "-c", cfg, "--digest", str(out), dsn=pg_dsn)
    assert cut.returncode == 1 and f"seq {len(stored)}: missing" in cut.stdout


async def test_the_auditor_script_in_the_docs_verifies_an_export(
        pg_proxy: Any, pg_dsn: str, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "audit.md").read_text()
    script = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "auditor.py").write_text(script)
    async with pg_proxy() as p:
        await traffic(p)
    conn = await asyncpg.connect(pg_dsn)
    try:
        lines = await conn.fetch("SELECT row_to_json(t)::text AS j FROM (SELECT * FROM "
                                 "audit_events ORDER BY chain_id, seq) t")
    finally:
        await conn.close()
    export = tmp_path / "audit.jsonl"
    export.write_text("".join(r["j"] + "\n" for r in lines))
    ok = subprocess.run([sys.executable, str(tmp_path / "auditor.py"), str(export)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"clinic-0: {len(lines)} records ok" in ok.stdout
    tampered = export.read_text().replace('"status":201', '"status":200', 1)
    export.write_text(tampered)
    bad = subprocess.run([sys.executable, str(tmp_path / "auditor.py"), str(export)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "broken at seq" in bad.stderr
