"""``casf-proxy audit export``: verified JSON lines from a real SQLite file and a real PostgreSQL.

Each line is the record exactly as it was hashed; a broken link stops the
export after the records before it (exit 1, naming the chain and seq); a
time window is verified from the chain's start; ``--follow`` picks up
records appended after it started and stops on SIGTERM with exit 0.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.audit.chain import record_hash
from tests import test_postgres_audit as _pga
from tests.conftest import ROOT, Proxy
from tests.test_audit import rows, run_cli, traffic
from tests.test_postgres_audit import cli, superuser
from tests.test_postgres_audit import rows as pg_rows
from tests.test_postgres_audit import traffic as pg_traffic

# the PostgreSQL fixtures of tests/test_postgres_audit.py (a server, a fresh database)
fresh_db = _pga.fresh_db
pg_dsn = _pga.pg_dsn
pg_proxy = _pga.pg_proxy
pg_server = _pga.pg_server


def lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def stored(db: Path) -> list[dict[str, Any]]:
    """The records as hashed, read with the store's own reader."""
    from proxy.audit.sqlite import from_row

    conn = sqlite3.connect(db)
    try:
        from proxy.audit.records import FIELDS

        return [dict(from_row(r)) for r in conn.execute(
            f"SELECT {', '.join(FIELDS)}, extra FROM audit_events ORDER BY chain_id, seq")]
    finally:
        conn.close()


async def test_export_writes_every_record_as_hashed(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    await proxy.rt.gen.pipeline.flush()
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    res = run_cli("audit", "export", "-c", cfg, audit_path=db)
    assert res.returncode == 0, res.stderr
    out = lines(res.stdout)
    assert out == stored(db) and len(out) >= 8
    for rec in out:  # each line re-verifies with nothing but SHA-256
        assert record_hash(rec) == rec["hash"]
    raw = res.stdout.splitlines()[0]
    assert raw == json.dumps(out[0], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert f"{len(out)} record(s) of 1 chain(s) written and verified (sqlite)" in res.stderr
    one = run_cli("audit", "export", "-c", cfg, "--chain", "clinic-0", audit_path=db)
    assert one.returncode == 0 and lines(one.stdout) == out
    none = run_cli("audit", "export", "-c", cfg, "--chain", "nope", audit_path=db)
    assert none.returncode == 1 and "no records for chain 'nope'" in none.stderr


async def test_export_time_window_is_verified_from_the_chain_start(proxy: Proxy,
                                                                    tmp_path: Path) -> None:
    await traffic(proxy)
    await proxy.rt.gen.pipeline.flush()
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    recs = stored(db)
    since, until = recs[3]["ts"], recs[6]["ts"]
    res = run_cli("audit", "export", "-c", cfg, "--since", since, "--until", until,
                  audit_path=db)
    assert res.returncode == 0, res.stderr
    assert lines(res.stdout) == [r for r in recs if since <= r["ts"] < until]
    # a record before the window is changed: the window is not exported as if intact
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_events SET status = 599 WHERE seq = 2")
    conn.commit()
    conn.close()
    bad = run_cli("audit", "export", "-c", cfg, "--since", since, audit_path=db)
    assert bad.returncode == 1 and bad.stdout == ""
    assert "BROKEN chain 'clinic-0' seq 2" in bad.stderr
    assert run_cli("audit", "export", "-c", cfg, "--since", "never",
                   audit_path=db).returncode == 2


async def test_export_stops_at_a_tampered_record(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    await proxy.rt.gen.pipeline.flush()
    cfg, db = str(proxy.cfg.source), tmp_path / "audit.db"
    recs = stored(db)
    target = recs[4]
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_events SET decision = 'DENIED' WHERE seq = ?", (target["seq"],))
    conn.commit()
    conn.close()
    res = run_cli("audit", "export", "-c", cfg, audit_path=db)
    assert res.returncode == 1
    assert lines(res.stdout) == recs[:4]  # the records before the break
    assert (f"BROKEN chain 'clinic-0' seq {target['seq']} (event {target['event_id']}): "
            "hash mismatch: record modified [modified]") in res.stderr
    assert "4 record(s) before it were written" in res.stderr


async def test_export_missing_store_is_exit_2(tmp_path: Path) -> None:
    from tests.conftest import write_config

    cfg = str(write_config(tmp_path, lambda d: None))
    res = run_cli("audit", "export", "-c", cfg, audit_path=tmp_path / "absent.db")
    assert res.returncode == 2 and "audit store unavailable" in res.stderr


async def follow(env: dict[str, str], cfg: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "audit", "export", "-c", cfg, "--follow",
        "--interval", "0.1", env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)


async def read_records(proc: asyncio.subprocess.Process, n: int) -> list[dict[str, Any]]:
    assert proc.stdout is not None
    out = []
    for _ in range(n):
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, "export ended early"
        out.append(json.loads(line))
    return out


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), err.decode()


async def test_export_follow_picks_up_new_records(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    await proxy.rt.gen.pipeline.flush()
    db = tmp_path / "audit.db"
    before = stored(db)
    env = {**os.environ, "CASF_AUDIT_PATH": str(db), "CLINIC_UPSTREAM": "http://x:1"}
    proc = await follow(env, str(proxy.cfg.source))
    try:
        assert await read_records(proc, len(before)) == before
        status, _, _ = await proxy.call("GET", "/appointments")
        assert status == 200
        await proxy.rt.gen.pipeline.flush()
        new = await read_records(proc, 2)  # the decision, then the outcome
        assert [r["kind"] for r in new] == ["decision", "outcome"]
        assert [r["seq"] for r in new] == [len(before) + 1, len(before) + 2]
        assert new == stored(db)[len(before):]
    finally:
        code, err = await stop(proc)
    assert code == 0, err
    assert rows(db)  # the file is still there and readable


# ------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
async def test_pg_export_tamper_and_follow(pg_proxy: Any, pg_dsn: str) -> None:
    async with pg_proxy() as p:
        await pg_traffic(p)
        await p.rt.gen.pipeline.flush()
        cfg = str(p.cfg.source)
        recs = [dict(r) for r in await pg_rows(pg_dsn)]
        res = cli("audit", "export", "-c", cfg, dsn=pg_dsn)
        assert res.returncode == 0, res.stderr
        assert lines(res.stdout) == recs and "(postgresql)" in res.stderr

        env = {**os.environ, "PG_DSN": pg_dsn, "CLINIC_UPSTREAM": "http://127.0.0.1:9"}
        proc = await follow(env, cfg)
        try:
            assert await read_records(proc, len(recs)) == recs
            assert (await p.call("GET", "/appointments"))[0] == 200
            await p.rt.gen.pipeline.flush()
            new = await read_records(proc, 2)
            assert [r["seq"] for r in new] == [len(recs) + 1, len(recs) + 2]
        finally:
            code, err = await stop(proc)
        assert code == 0, err

    recs = [dict(r) for r in await pg_rows(pg_dsn)]
    await superuser(pg_dsn, "DROP TRIGGER audit_events_append_only ON audit_events",
                    "UPDATE audit_events SET status = 599 WHERE seq = 3")
    bad = cli("audit", "export", "-c", cfg, dsn=pg_dsn)
    assert bad.returncode == 1
    assert lines(bad.stdout) == recs[:2]
    assert "BROKEN chain 'clinic-0' seq 3" in bad.stderr
    assert cli("audit", "export", "-c", cfg,
               dsn="postgresql://postgres@127.0.0.1:1/x").returncode == 2
