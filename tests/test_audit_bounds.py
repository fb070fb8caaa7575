"""Bounded audit queues, and the durable spool for records nobody waits for.

Against real stores only: a SQLite file locked by another connection, and a
real PostgreSQL stopped and started again with pg_ctl.

- A full writer queue refuses ``append`` and ``append_later`` at once
  (``AuditUnavailable``) and counts it.
- A record handed to ``append_later`` whose batch fails is kept in the
  chain's spool (fsynced) and written to the chain, in order, once the
  store commits again: without traffic, and at the next start if the
  process stopped first; exactly once, even when the process died between
  the commit and emptying the spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit.postgres import PostgresAuditSink, migrate
from proxy.audit.spool import AuditSpooled, Spool, spool_file
from proxy.audit.sqlite import SqliteAuditSink, SqliteReader
from proxy.audit.verify import check_chains
from proxy.ports import AuditUnavailable
from tests import test_postgres_audit as _pga
from tests.conftest import write_config
from tests.servers import PostgresServer
from tests.test_audit import rows, run_cli
from tests.test_postgres_audit import cli
from tests.test_postgres_audit import rows as pg_rows

# the PostgreSQL fixtures of tests/test_postgres_audit.py (a server, a fresh database)
fresh_db = _pga.fresh_db
pg_dsn = _pga.pg_dsn
pg_server = _pga.pg_server



def rec(event: str, kind: str = "decision") -> dict[str, Any]:
    return {"event_id": event, "kind": kind, "decision": "DENY", "status": 503,
            "reason_codes": ["FAIL_CLOSED", "Audit_Unavailable"], "attrs": {}}


async def until(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def locked(db: Path) -> Any:
    """Another connection holds the file's write lock: no commit can happen."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
    finally:
        conn.execute("ROLLBACK")
        conn.close()


async def sqlite_verified(db: Path) -> int:
    async with SqliteReader.open(db) as reader:
        results = [r async for r in check_chains(reader)]
    assert results and all(r.broken is None for r in results), [str(r.broken) for r in results]
    return sum(r.check.count for r in results)


# ------------------------------------------------------------------ the queue bound


async def test_sqlite_full_queue_refuses_at_once_and_counts(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    full: list[int] = []
    sink = SqliteAuditSink(db, "q-1", timeout_s=4, queue_max=3,
                           on_full=lambda: full.append(1))
    await sink.start()
    try:
        with locked(db):
            first = sink.append_later(rec("held"))
            await until(lambda: sink._committing_since is not None, "the writer to commit")
            queued = [sink.append_later(rec(f"q{i}")) for i in range(3)]
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(AuditUnavailable, match="audit queue full"):
                sink.append_later(rec("over"))
            with pytest.raises(AuditUnavailable, match="audit queue full"):
                await sink.append(rec("over-wait"))
            assert loop.time() - started < 2  # at once, not after the commit timeout
            assert sink.rejected_full == 2 and full == [1, 1]
        await asyncio.gather(first, *queued, return_exceptions=True)
    finally:
        await sink.close()


@pytest.mark.postgres
async def test_pg_full_queue_refuses_at_once_and_counts(pg_dsn: str, tmp_path: Path) -> None:
    sink = PostgresAuditSink(pg_dsn, "q-1", timeout_s=4, queue_max=2,
                             spool_dir=tmp_path / "spool")
    await sink.start()
    slow = await asyncpg.connect(pg_dsn)  # a slow store: the table is locked
    try:
        tx = slow.transaction()
        await tx.start()
        await slow.execute("LOCK TABLE audit_events IN ACCESS EXCLUSIVE MODE")
        first = sink.append_later(rec("held"))
        await until(lambda: sink._committing_since is not None, "the writer to commit")
        queued = [sink.append_later(rec(f"q{i}")) for i in range(2)]
        with pytest.raises(AuditUnavailable, match="audit queue full"):
            sink.append_later(rec("over"))
        with pytest.raises(AuditUnavailable, match="audit queue full"):
            await sink.append(rec("over-wait"))
        assert sink.rejected_full == 2
        await tx.rollback()
        await asyncio.gather(first, *queued, return_exceptions=True)
    finally:
        await slow.close()
        await sink.close()


def test_queue_max_is_a_config_key(tmp_path: Path) -> None:
    from proxy.config import load_config
    from proxy.settings import Environment

    def patch(d: dict[str, Any]) -> None:
        d["audit"].update(queue_max=123, spool_dir="sp")

    path = write_config(tmp_path, patch)
    cfg = load_config(path, Environment({"CASF_AUDIT_PATH": str(tmp_path / "a.db"),
                                         "CLINIC_UPSTREAM": "http://x:1"}))
    assert cfg.audit.queue_max == 123 and cfg.audit.spool_dir == tmp_path / "sp"
    plain = load_config(write_config(tmp_path, lambda d: None),
                        Environment({"CASF_AUDIT_PATH": str(tmp_path / "a.db"),
                                     "CLINIC_UPSTREAM": "http://x:1"}))
    assert plain.audit.queue_max == 10_000
    assert plain.audit.spool_dir == tmp_path / "a.db.spool"  # one spool per audit file


# ------------------------------------------------------------------ spool: SQLite


async def test_sqlite_refusal_is_spooled_while_locked_and_written_after(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    sink = SqliteAuditSink(db, "s-1", timeout_s=1, retry_s=0.1)
    await sink.start()
    try:
        await sink.append(rec("before"))
        with locked(db):
            with pytest.raises(AuditUnavailable):  # a waiter is refused, never spooled
                await sink.append(rec("waited"))
            refusal = sink.append_later(rec("refusal"))
            with pytest.raises(AuditSpooled):
                await refusal
            assert sink.spooled == 1
            spooled = spool_file(sink.spool_dir, "s-1").read_bytes()
            assert json.loads(spooled)["record"]["event_id"] == "refusal"
        # no traffic needed: the writer retries the file and writes the spool
        await until(lambda: sink.spooled == 0, "the spool to drain")
        after = await sink.append(rec("after"))
    finally:
        await sink.close()
    stored = rows(db)
    assert [r["event_id"] for r in stored] == ["before", "refusal", "after"]
    assert after.seq == 3 and await sqlite_verified(db) == 3
    cfg = str(write_config(tmp_path, lambda d: None))
    assert run_cli("audit", "verify", "-c", cfg, audit_path=db).returncode == 0


async def test_sqlite_spool_is_replayed_at_start_exactly_once(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    sink = SqliteAuditSink(db, "s-1", timeout_s=1, retry_s=60)
    await sink.start()
    await sink.append(rec("before"))
    path = spool_file(sink.spool_dir, "s-1")
    with locked(db):
        spooled = [sink.append_later(rec(f"r{i}", "outcome")) for i in range(3)]
        for fut in spooled:
            with pytest.raises(AuditSpooled):
                await fut
        await sink.close()  # stops with the file still locked
    saved = path.read_bytes()
    assert saved.count(b"\n") == 3

    again = SqliteAuditSink(db, "s-1", timeout_s=1)
    await again.start()  # replays before anything else is written
    assert again.spooled == 0 and path.read_bytes() == b""
    await again.append(rec("next"))
    await again.close()
    assert [r["event_id"] for r in rows(db)] == ["before", "r0", "r1", "r2", "next"]

    # died after the replay's commit, before the spool was emptied: the marker
    # (head seq 1 before the replay) tells the next start they are there already
    path.write_bytes(saved + b'{"replay_after":1}\n')
    third = SqliteAuditSink(db, "s-1", timeout_s=1)
    await third.start()
    assert third.spooled == 0
    await third.close()
    assert [r["event_id"] for r in rows(db)] == ["before", "r0", "r1", "r2", "next"]
    # the same marker with nothing committed after it: the records are written
    path.write_bytes(saved + b'{"replay_after":5}\n')
    fourth = SqliteAuditSink(db, "s-1", timeout_s=1)
    await fourth.start()
    await fourth.close()
    assert [r["event_id"] for r in rows(db)][5:] == ["r0", "r1", "r2"]
    assert await sqlite_verified(db) == 8


def test_spool_cuts_a_torn_tail_and_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "c.spool"
    path.write_bytes(b'{"record":{"event_id":"a"}}\n{"record":{"ev')
    sp = Spool(path, max_records=2)
    sp.open()
    try:
        assert [e["event_id"] for e in sp.entries] == ["a"]
        assert path.read_bytes() == b'{"record":{"event_id":"a"}}\n'
        assert sp.add([{"event_id": "b"}, {"event_id": "c"}]) == 1  # bounded
        other = Spool(path, max_records=2)
        with pytest.raises(Exception, match="in use by another process"):
            other.open()
    finally:
        sp.close()


async def test_proxy_refusal_record_survives_a_locked_file(make_proxy: Any,
                                                           tmp_path: Path) -> None:
    """The pipeline's refusal (DENY 503 Audit_Unavailable) of a request refused while the
    file was locked is in the chain once the file commits again."""
    def patch(d: dict[str, Any]) -> None:
        d["audit"]["timeout_ms"] = 300

    db = tmp_path / "audit.db"
    async with make_proxy(patch) as p:
        assert (await p.call("GET", "/appointments"))[0] == 200
        with locked(db):
            status, _, raw = await p.call("GET", "/appointments")
            assert status == 503
            refused = json.loads(raw)["request_id"]
            await p.rt.gen.pipeline.flush()
        sink = p.rt.audit
        assert isinstance(sink, SqliteAuditSink)
        await until(lambda: sink.spooled == 0, "the spool to drain")
        assert (await p.call("GET", "/appointments"))[0] == 200
        await p.rt.gen.pipeline.flush()
    denies = [r for r in rows(db) if r["decision"] == "DENY"
              and "Audit_Unavailable" in r["reason_codes"]]
    assert len(denies) == 1, rows(db)
    assert denies[0]["request_id"] == refused
    cfg = str(tmp_path / "casf.yaml")
    res = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert res.returncode == 0, res.stdout


# ------------------------------------------------------------------ spool: PostgreSQL


@contextlib.asynccontextmanager
async def own_server() -> AsyncIterator[PostgresServer]:
    server = PostgresServer()  # its own server: the test stops it
    try:
        await asyncio.to_thread(server.start)
        await migrate(server.dsn)
        yield server
    finally:
        await asyncio.to_thread(server.destroy)


@pytest.mark.postgres
async def test_pg_refusal_is_spooled_while_down_and_written_after_restart(
        tmp_path: Path) -> None:
    async with own_server() as server:
        sink = PostgresAuditSink(server.dsn, "p-1", timeout_s=1, retry_s=0.2,
                                 spool_dir=tmp_path / "spool")
        await sink.start()
        try:
            await sink.append(rec("before"))
            await asyncio.to_thread(server.stop, "immediate")
            with pytest.raises(AuditUnavailable):
                await sink.append(rec("waited"))
            refusals = [sink.append_later(rec(f"refusal-{i}")) for i in range(2)]
            for fut in refusals:
                with pytest.raises(AuditSpooled):
                    await fut
            assert sink.spooled == 2
            await asyncio.to_thread(server.start)
            # no traffic: the writer reconnects and writes the spool by itself
            await until(lambda: sink.spooled == 0, "the spool to drain", timeout=30)
            after = await sink.append(rec("after"))
        finally:
            await sink.close()
        stored = await pg_rows(server.dsn, "p-1")
        assert [r["event_id"] for r in stored] == ["before", "refusal-0", "refusal-1", "after"]
        assert after.seq == 4
        cfg = str(write_config(tmp_path, lambda d: None))
        res = cli("audit", "verify", "-c", cfg, dsn=server.dsn)
        assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.postgres
async def test_pg_spool_is_replayed_at_start(tmp_path: Path) -> None:
    async with own_server() as server:
        spool_dir = tmp_path / "spool"
        sink = PostgresAuditSink(server.dsn, "p-1", timeout_s=1, retry_s=60,
                                 spool_dir=spool_dir)
        await sink.start()
        await sink.append(rec("before"))
        await asyncio.to_thread(server.stop, "immediate")
        outcome = sink.append_later(rec("outcome-1", "outcome"))
        with pytest.raises(AuditSpooled):
            await outcome
        await sink.close()  # stopped while the database is down
        await asyncio.to_thread(server.start)
        again = PostgresAuditSink(server.dsn, "p-1", timeout_s=2, spool_dir=spool_dir)
        await again.start()
        assert again.spooled == 0
        await again.append(rec("next"))
        await again.close()
        stored = await pg_rows(server.dsn, "p-1")
        assert [r["event_id"] for r in stored] == ["before", "outcome-1", "next"]
        cfg = str(write_config(tmp_path, lambda d: None))
        assert cli("audit", "verify", "-c", cfg, dsn=server.dsn).returncode == 0


async def test_a_spool_that_cannot_be_opened_leaves_the_sink_running(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    db = tmp_path / "a.db"
    sink = SqliteAuditSink(db, "s-1", timeout_s=1, spool_dir=not_a_dir / "spool")
    await sink.start()  # the store works: requests are served, without a spool
    try:
        assert (await sink.append(rec("ok"))).seq == 1
        with locked(db):
            lost = sink.append_later(rec("lost", "outcome"))
            with pytest.raises(AuditUnavailable) as err:
                await lost
            assert not isinstance(err.value, AuditSpooled)  # failed as before, not kept
    finally:
        await sink.close()


async def test_one_chain_has_one_spool_writer(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    first = SqliteAuditSink(db, "s-1", timeout_s=1)
    await first.start()
    try:
        twin = SqliteAuditSink(db, "s-1", timeout_s=1)
        with pytest.raises(AuditUnavailable, match="in use by another process"):
            await twin.start()
    finally:
        await first.close()


async def test_records_still_queued_at_close_are_spooled(tmp_path: Path) -> None:
    """Shutdown during an outage: what is queued for the writer is kept, not dropped."""
    db = tmp_path / "a.db"
    sink = SqliteAuditSink(db, "s-1", timeout_s=1)
    await sink.start()
    await sink.append(rec("before"))
    with locked(db):
        queued = [sink.append_later(rec(f"out-{i}", "outcome")) for i in range(20)]
        await sink.close()  # right away: none of them can be committed
    assert all(f.done() and isinstance(f.exception(), AuditSpooled) for f in queued)
    again = SqliteAuditSink(db, "s-1", timeout_s=1)
    await again.start()
    await again.close()
    assert [r["event_id"] for r in rows(db)] == ["before"] + [f"out-{i}" for i in range(20)]
    assert await sqlite_verified(db) == 21


async def test_sqlite_spooled_records_go_first_in_the_next_commit(tmp_path: Path) -> None:
    """No retry in between: the next batch carries the spooled records ahead of its own."""
    db = tmp_path / "a.db"
    sink = SqliteAuditSink(db, "s-1", timeout_s=1, retry_s=60)
    await sink.start()
    try:
        await sink.append(rec("before"))
        with locked(db):
            with pytest.raises(AuditSpooled):
                await sink.append_later(rec("refusal"))
        after = await sink.append(rec("after"))
        await until(lambda: sink.spooled == 0, "the spool to be emptied")
    finally:
        await sink.close()
    assert [r["event_id"] for r in rows(db)] == ["before", "refusal", "after"]
    assert after.seq == 3 and await sqlite_verified(db) == 3


@pytest.mark.postgres
async def test_pg_spooled_records_go_first_in_the_next_copy(tmp_path: Path) -> None:
    async with own_server() as server:
        sink = PostgresAuditSink(server.dsn, "p-1", timeout_s=1, retry_s=60,
                                 spool_dir=tmp_path / "spool")
        await sink.start()
        try:
            await sink.append(rec("before"))
            await asyncio.to_thread(server.stop, "immediate")
            with pytest.raises(AuditSpooled):
                await sink.append_later(rec("refusal"))
            await asyncio.to_thread(server.start)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while True:  # the first append after the restart may still find it down
                try:
                    after = await sink.append(rec("after"))
                    break
                except AuditUnavailable:
                    assert loop.time() < deadline, "the sink did not recover"
                    await asyncio.sleep(0.1)
            await until(lambda: sink.spooled == 0, "the spool to be emptied")
        finally:
            await sink.close()
        stored = await pg_rows(server.dsn, "p-1")
        assert [r["event_id"] for r in stored][:2] == ["before", "refusal"]
        assert stored[-1]["event_id"] == "after" and after.seq == len(stored)
        cfg = str(write_config(tmp_path, lambda d: None))
        assert cli("audit", "verify", "-c", cfg, dsn=server.dsn).returncode == 0
