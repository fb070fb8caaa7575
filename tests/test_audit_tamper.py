"""Tampering that hides behind the storage layout, on real SQLite files and a real PostgreSQL.

A row is verified as a reader of the table sees it: a field rewritten in its
column with the original hidden in ``extra`` (where the old reader merged it
back) is a modified record; so is a field moved from its column into
``extra``. Every row of a chain is read, whatever its seq (0, negative,
NULL), and rows of no chain are reported. A forged chain with valid hashes
is named by ``verify --digest`` and ``digest --previous``. The SQLite schema
forbids such rows; ``audit migrate`` upgrades a file of the earlier schema
and refuses one that holds them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.audit import sqlite as lite
from proxy.audit.chain import seal
from proxy.audit.postgres import COLUMNS
from proxy.audit.postgres import to_row as pg_row
from proxy.audit.records import FIELDS
from tests import test_postgres_audit as _pga
from tests.conftest import Proxy, write_config
from tests.test_audit import rows, run_cli, traffic
from tests.test_postgres_audit import cli, superuser
from tests.test_postgres_audit import rows as pg_rows
from tests.test_postgres_audit import traffic as pg_traffic

# the PostgreSQL fixtures of tests/test_postgres_audit.py (a server, a fresh database)
fresh_db = _pga.fresh_db
pg_dsn = _pga.pg_dsn
pg_proxy = _pga.pg_proxy
pg_server = _pga.pg_server


# the schema of files written before the constraints (user_version 0)
V1_SCHEMA = (
    "CREATE TABLE audit_events ("
    + ", ".join(f + (" INTEGER" if f in ("seq", "status") else " TEXT") for f in FIELDS)
    + ", extra TEXT NOT NULL DEFAULT '{}', PRIMARY KEY (chain_id, seq))")


def records(chain: str, n: int, start_ts: str = "2026-01-01T00:00:00.0000") -> list[dict[str, Any]]:
    """``n`` sealed records of one chain (as the writer makes them)."""
    out, prev = [], ""
    for i in range(1, n + 1):
        rec: dict[str, Any] = {f: None for f in FIELDS}
        rec.update({"event_id": f"{chain}-e{i}", "ts": f"{start_ts}{i:02d}Z", "kind": "decision",
                    "decision": "DENY", "status": 403, "reason_codes": ["Role_NotPermitted"],
                    "attrs": {}, "mode": "ALLOW"})
        seal(rec, chain, i, prev)
        prev = rec["hash"]
        out.append(rec)
    return out


def v1_file(path: Path, recs: list[dict[str, Any]]) -> None:
    conn = sqlite3.connect(path)
    conn.execute(V1_SCHEMA)
    conn.executemany(lite._INSERT, [lite.to_row(r) for r in recs])
    conn.commit()
    conn.close()


def sql(db: Path, statement: str, *args: Any) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute(statement, args)
        conn.commit()
    finally:
        conn.close()


# ------------------------------------------------------------------ SQLite: extra


async def test_sqlite_column_rewritten_with_the_original_hidden_in_extra(
        proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    deny = next(r for r in rows(db) if r["decision"] == "DENY")
    # the reader used to merge extra over the columns: the hash still matched
    sql(db, "UPDATE audit_events SET decision = 'ALLOW', status = 200, extra = "
            "json_set(extra, '$.decision', 'DENY', '$.status', ?) WHERE seq = ?",
        deny["status"], deny["seq"])
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1, bad.stdout
    assert f"chain 'clinic-0' seq {deny['seq']} (event {deny['event_id']})" in bad.stdout
    assert "decision, status stored in extra as well as in their column(s)" in bad.stdout
    assert "[modified]" in bad.stdout


async def test_sqlite_field_moved_into_extra(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    target = rows(db)[2]
    # a reader of the column sees no actor; the hash would still cover it
    sql(db, "UPDATE audit_events SET actor = NULL, extra = json_set(extra, '$.actor', ?) "
            "WHERE seq = ?", target["actor"], target["seq"])
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1, bad.stdout
    assert f"seq {target['seq']}" in bad.stdout and "actor stored in extra" in bad.stdout


async def test_sqlite_extra_that_is_not_an_object(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    sql(db, "UPDATE audit_events SET extra = '[1]' WHERE seq = 2")
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "seq 2" in bad.stdout and "extra is not a JSON object" in bad.stdout


# ------------------------------------------------------------------ SQLite: positions


@pytest.mark.parametrize(("seq", "at"), [(0, 1), (-3, 1), (None, 1), ("2b", 5)])
async def test_sqlite_rows_outside_the_chain_positions_are_read(tmp_path: Path, seq: Any,
                                                                at: int) -> None:
    """A file of the earlier schema accepts such rows; verify reads and names them."""
    db = tmp_path / "audit.db"
    recs = records("c-1", 4)
    forged = dict(records("c-1", 1)[0])
    forged.update({"event_id": "forged", "decision": "ALLOW", "status": 200})
    seal(forged, "c-1", 1, "")
    v1_file(db, recs)
    sql(db, f"INSERT INTO audit_events ({', '.join(FIELDS)}, extra) VALUES "
            f"({', '.join('?' for _ in FIELDS)}, ?)", *lite.to_row({**forged, "seq": seq}))
    cfg = str(write_config(tmp_path, lambda d: None))
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1, bad.stdout
    shown = "NULL" if seq is None else repr(seq)
    # named where it is met: before seq 1, or after the last record (text sorts last)
    assert (f"BROKEN chain 'c-1' seq {at} (event forged): a record stored at seq {shown}, "
            "outside the chain's positions") in bad.stdout
    assert "[inserted]" in bad.stdout


async def test_sqlite_rows_of_no_chain_are_named(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    v1_file(db, records("c-1", 3))
    orphan = records("c-1", 1)[0]
    sql(db, f"INSERT INTO audit_events ({', '.join(FIELDS)}, extra) VALUES "
            f"({', '.join('?' for _ in FIELDS)}, ?)", *lite.to_row({**orphan, "chain_id": None}))
    cfg = str(write_config(tmp_path, lambda d: None))
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1, bad.stdout
    assert "ok chain 'c-1': 3 records" in bad.stdout
    assert "belongs to no chain (record inserted)" in bad.stdout


async def test_sqlite_schema_forbids_rows_outside_the_positions(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    lite.connect(db, create=True).close()
    base = records("c-1", 1)[0]
    for change in ({"seq": 0}, {"seq": -1}, {"seq": None}, {"seq": "x1"}, {"seq": 1.5},
                   {"chain_id": None}):
        with pytest.raises(sqlite3.IntegrityError):
            sql(db, lite._INSERT, *lite.to_row({**base, **change}))
    sql(db, lite._INSERT, *lite.to_row(base))
    with pytest.raises(sqlite3.IntegrityError):  # one row per position
        sql(db, lite._INSERT, *lite.to_row({**base, "event_id": "twin"}))


async def test_migrate_upgrades_an_earlier_file_and_refuses_one_with_stray_rows(
        tmp_path: Path) -> None:
    cfg = str(write_config(tmp_path, lambda d: None))
    db = tmp_path / "audit.db"
    v1_file(db, records("c-1", 5) + records("c-2", 2))
    up = run_cli("audit", "migrate", "-c", cfg, audit_path=db)
    assert up.returncode == 0, up.stderr
    assert "schema upgraded" in up.stdout
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == lite.SCHEMA_VERSION
    conn.close()
    with pytest.raises(sqlite3.IntegrityError):
        sql(db, lite._INSERT, *lite.to_row({**records("c-1", 1)[0], "seq": 0}))
    ok = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert ok.returncode == 0, ok.stdout
    assert "2 chain(s), 7 records" in ok.stdout
    again = run_cli("audit", "migrate", "-c", cfg, audit_path=db)
    assert again.returncode == 0 and "schema present" in again.stdout

    bad_db = tmp_path / "bad.db"
    v1_file(bad_db, records("c-1", 2))
    sql(bad_db, lite._INSERT, *lite.to_row({**records("c-1", 1)[0], "seq": 0}))
    before = bad_db.read_bytes()
    refused = run_cli("audit", "migrate", "-c", cfg, audit_path=bad_db)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "chain 'c-1', seq 0" in refused.stderr and "evidence of tampering" in refused.stderr
    conn = sqlite3.connect(bad_db)
    assert conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] == 3
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
    conn.close()
    assert len(bad_db.read_bytes()) >= len(before)


# ------------------------------------------------------------------ SQLite: forged chain


async def test_a_forged_chain_with_valid_hashes_is_named_against_the_digest(
        proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    digest = tmp_path / "d1.json"
    made = run_cli("audit", "digest", "-c", cfg, "--out", str(digest), audit_path=db)
    assert made.returncode == 0, made.stderr
    # a whole chain, well formed, dated before the digest was made
    sql_conn = sqlite3.connect(db)
    sql_conn.executemany(lite._INSERT, [lite.to_row(r) for r in records("forged-0", 3)])
    sql_conn.commit()
    sql_conn.close()
    plain = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert plain.returncode == 0  # the chain alone is valid
    anchored = run_cli("audit", "verify", "-c", cfg, "--digest", str(digest), audit_path=db)
    assert anchored.returncode == 1, anchored.stdout
    assert ("BROKEN chain 'forged-0' is not in the digest but has records in the time it "
            "covers") in anchored.stdout
    nxt = run_cli("audit", "digest", "-c", cfg, "--previous", str(digest), audit_path=db)
    assert nxt.returncode == 1, nxt.stderr
    assert "chain 'forged-0' is not in the digest" in nxt.stderr
    assert "no digest written" in nxt.stderr


async def test_a_chain_started_after_the_digest_is_named_new(proxy: Proxy,
                                                             tmp_path: Path) -> None:
    await traffic(proxy)
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    digest = tmp_path / "d1.json"
    assert run_cli("audit", "digest", "-c", cfg, "--out", str(digest),
                   audit_path=db).returncode == 0
    conn = sqlite3.connect(db)
    conn.executemany(lite._INSERT, [lite.to_row(r) for r in
                                    records("later-0", 2, "2099-01-01T00:00:00.0000")])
    conn.commit()
    conn.close()
    anchored = run_cli("audit", "verify", "-c", cfg, "--digest", str(digest), audit_path=db)
    assert anchored.returncode == 0, anchored.stdout
    assert "NEW chain 'later-0' is not in the digest" in anchored.stdout
    nxt = run_cli("audit", "digest", "-c", cfg, "--previous", str(digest), audit_path=db)
    assert nxt.returncode == 0, nxt.stderr
    assert "NEW chain 'later-0'" in nxt.stderr
    assert {c["chain_id"] for c in json.loads(nxt.stdout)["chains"]} == {"clinic-0", "later-0"}


# ------------------------------------------------------------------ PostgreSQL


async def _pg_break(pg_proxy: Any, pg_dsn: str, *statements: tuple[Any, ...] | str
                    ) -> tuple[dict[str, Any], str]:
    async with pg_proxy() as p:
        await pg_traffic(p)
        cfg = str(p.cfg.source)
    ok = cli("audit", "verify", "-c", cfg, dsn=pg_dsn)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    target = next(r for r in await pg_rows(pg_dsn) if r["decision"] == "DENY")
    await superuser(pg_dsn, "DROP TRIGGER audit_events_append_only ON audit_events",
                    *[(st[0], *st[1:], target["seq"]) if isinstance(st, tuple) else st
                      for st in statements])
    bad = cli("audit", "verify", "-c", cfg, dsn=pg_dsn)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"chain 'clinic-0' seq {target['seq']} (event {target['event_id']})" in bad.stdout
    return target, bad.stdout


@pytest.mark.postgres
async def test_pg_column_rewritten_with_the_original_hidden_in_extra(
        pg_proxy: Any, pg_dsn: str) -> None:
    _, out = await _pg_break(pg_proxy, pg_dsn, (
        "UPDATE audit_events SET decision = 'ALLOW', status = 200, extra = (extra::jsonb || "
        "jsonb_build_object('decision', decision, 'status', status))::json WHERE seq = $1",))
    assert "decision, status stored in extra as well as in their column(s)" in out
    assert "[modified]" in out


@pytest.mark.postgres
async def test_pg_field_moved_into_extra(pg_proxy: Any, pg_dsn: str) -> None:
    _, out = await _pg_break(pg_proxy, pg_dsn, (
        "UPDATE audit_events SET decision = NULL, extra = (extra::jsonb || "
        "jsonb_build_object('decision', decision))::json WHERE seq = $1",))
    assert "decision stored in extra although their column(s) could hold them" in out


@pytest.mark.postgres
async def test_pg_value_the_column_cannot_hold_still_verifies(pg_dsn: str,
                                                              tmp_path: Path) -> None:
    """The one legitimate use of extra for a column's field: a value of another type."""
    recs = records("odd-0", 2)
    recs[1].update({"status": "not a number", "actor": 7})
    seal(recs[1], "odd-0", 2, recs[0]["hash"])
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table("audit_events", records=[pg_row(r) for r in recs],
                                         columns=COLUMNS)
    finally:
        await conn.close()
    stored = await pg_rows(pg_dsn, "odd-0")
    assert stored[1]["status"] == "not a number" and stored[1]["actor"] == 7
    cfg = str(write_config(tmp_path, lambda d: None))
    ok = cli("audit", "verify", "-c", cfg, dsn=pg_dsn)
    assert ok.returncode == 0, ok.stdout


@pytest.mark.postgres
async def test_pg_schema_forbids_rows_outside_the_positions(pg_dsn: str) -> None:
    base = records("c-1", 1)[0]
    conn = await asyncpg.connect(pg_dsn)
    try:
        for change in ({"seq": 0}, {"seq": -1}, {"chain_id": None}):
            with pytest.raises(asyncpg.PostgresError):
                await conn.copy_records_to_table("audit_events", columns=COLUMNS,
                                                 records=[pg_row({**base, **change})])
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_pg_forged_chain_is_named_against_the_digest(pg_proxy: Any, pg_dsn: str,
                                                           tmp_path: Path) -> None:
    async with pg_proxy() as p:
        await pg_traffic(p)
        cfg = str(p.cfg.source)
    digest = tmp_path / "d.json"
    assert cli("audit", "digest", "-c", cfg, "--out", str(digest), dsn=pg_dsn).returncode == 0
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.copy_records_to_table("audit_events", columns=COLUMNS,
                                         records=[pg_row(r) for r in records("forged-0", 3)])
    finally:
        await conn.close()
    assert cli("audit", "verify", "-c", cfg, dsn=pg_dsn).returncode == 0
    anchored = cli("audit", "verify", "-c", cfg, "--digest", str(digest), dsn=pg_dsn)
    assert anchored.returncode == 1, anchored.stdout
    assert "BROKEN chain 'forged-0' is not in the digest" in anchored.stdout
    nxt = cli("audit", "digest", "-c", cfg, "--previous", str(digest), dsn=pg_dsn)
    assert nxt.returncode == 1 and "chain 'forged-0' is not in the digest" in nxt.stderr
