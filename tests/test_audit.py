"""Audit chain over real traffic: commit-before-forward, verify, tamper, privacy, outage."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.waiting import wait_until

PHI = "PHI-NOTES-7f3a91"
SMS_TEXT = "SMS-SECRET-55c2"


def run_cli(*args: str, audit_path: Path,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CASF_AUDIT_PATH": str(audit_path), "CLINIC_UPSTREAM": "http://x:1"}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=60)


async def traffic(p: Proxy) -> None:
    await p.call("GET", "/appointments")
    await p.call("POST", "/appointments",
                 json={"patient_id": "p1", "slot": "s", "notes": PHI}, rid="a1")
    await p.call("POST", "/appointments",
                 json={"patient_id": "p1", "slot": "s", "notes": PHI}, rid="a1")
    await p.call("POST", "/sms", key="nurse", json={"patient_id": "p1", "message": SMS_TEXT},
                 rid="a2")
    await p.call("GET", "/patients/p1/history", key="receptionist")
    await p.call("GET", "/nope", key=None)


def rows(db: Path) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    out = [dict(r) for r in conn.execute("SELECT * FROM audit_events ORDER BY seq")]
    conn.close()
    return out


async def test_every_forward_has_a_prior_decision_record(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    records = rows(tmp_path / "audit.db")
    forwarded = [s.headers["X-Request-Id"] for s in proxy.upstream.seen]
    assert len(forwarded) == 3
    for rid in forwarded:
        mine = [r for r in records if r["request_id"] == rid]
        decisions = [r for r in mine if r["kind"] == "decision" and r["decision"] == "ALLOW"]
        outcomes = [r for r in mine if r["kind"] == "outcome"]
        assert len(decisions) == 1 and len(outcomes) == 1
        assert decisions[0]["seq"] < outcomes[0]["seq"]
        assert json.loads(outcomes[0]["extra"])["response_sha256"]
    kinds = [r["kind"] for r in records]
    assert kinds.count("replay") == 1
    denies = [r for r in records if r["decision"] == "DENY"]
    assert {json.loads(r["reason_codes"])[0] for r in denies} == {"Role_NotPermitted",
                                                                  "Route_NotMapped"}


async def test_chain_verifies_and_tampering_is_named(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    cfg = str(proxy.cfg.source)
    db = tmp_path / "audit.db"
    ok = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok chain 'clinic-0'" in ok.stdout

    target = rows(db)[3]
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_events SET decision = 'ALLOW', status = 200 WHERE seq = ?",
                 (target["seq"],))
    conn.commit()
    conn.close()
    bad = run_cli("audit", "verify", "-c", cfg, audit_path=db)
    assert bad.returncode == 1
    assert f"seq {target['seq']} (event {target['event_id']})" in bad.stdout
    assert "modified" in bad.stdout


async def test_deleted_record_is_named(proxy: Proxy, tmp_path: Path) -> None:
    await traffic(proxy)
    db = tmp_path / "audit.db"
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM audit_events WHERE seq = 2")
    conn.commit()
    conn.close()
    bad = run_cli("audit", "verify", "-c", str(proxy.cfg.source), audit_path=db)
    assert bad.returncode == 1
    assert "expected seq 2, found 3" in bad.stdout


async def test_verify_missing_store_is_exit_2(tmp_path: Path) -> None:
    from tests.conftest import write_config

    cfg = write_config(tmp_path, lambda d: None)
    res = run_cli("audit", "verify", "-c", str(cfg), audit_path=tmp_path / "absent.db")
    assert res.returncode == 2


async def test_no_body_value_or_credential_in_audit_or_logs(
        proxy: Proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await traffic(proxy)
    await proxy.call("GET", "/appointments", key="demo-wrong-key-value")
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("audit.db*") if p.is_file())
    logs = caplog.text
    for secret in (PHI, SMS_TEXT, "demo-receptionist", "demo-nurse", "demo-wrong-key-value"):
        assert secret.encode() not in raw, secret
        assert secret not in logs, secret
    # the hashed attribute is present as a digest, and body digests are recorded
    assert b"sha256:" in raw
    assert any(r["body_sha256"] for r in rows(tmp_path / "audit.db"))


async def test_audit_outage_refuses_and_recovers(make_proxy: Any, tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["audit"]["timeout_ms"] = 300

    async with make_proxy(patch) as p:
        assert (await p.call("GET", "/appointments"))[0] == 200
        before = len(p.upstream.seen)
        # another process holds the database's write lock: commits cannot happen
        locker = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            for method, path, payload, rid in (
                    ("GET", "/appointments", None, None),
                    ("POST", "/appointments", {"patient_id": "p1", "slot": "a"}, "out-1")):
                status, hdrs, raw = await p.call(method, path, json=payload, rid=rid)
                assert status == 503
                env = json.loads(raw)
                assert env["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
                assert hdrs["Retry-After"]
            # a request that would be denied anyway cannot be denied unrecorded either
            status, _, raw = await p.call("GET", "/admin")
            assert status == 503
            assert json.loads(raw)["reason_codes"] == ["FAIL_CLOSED", "Audit_Unavailable"]
            assert len(p.upstream.seen) == before
            async with p.session.get(p.admin + "/healthz") as r:
                assert r.status == 503
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        # recovery without restart; the claim was released, so the same key proceeds
        status, _, _ = await p.call("POST", "/appointments",
                                    json={"patient_id": "p1", "slot": "a"}, rid="out-1")
        assert status == 201
        assert 'casf_fail_closed_total{trigger="audit"} 3.0' in await p.metrics()
    res = run_cli("audit", "verify", "-c", str(tmp_path / "casf.yaml"),
                  audit_path=tmp_path / "audit.db")
    assert res.returncode == 0, res.stdout


async def test_chain_resumes_after_restart(make_proxy: Any, tmp_path: Path) -> None:
    async with make_proxy() as p:
        await p.call("GET", "/appointments")
    async with make_proxy() as p:
        await p.call("GET", "/appointments")
    seqs = [r["seq"] for r in rows(tmp_path / "audit.db")]
    assert seqs == [1, 2, 3, 4]
    res = run_cli("audit", "verify", "-c", str(tmp_path / "casf.yaml"),
                  audit_path=tmp_path / "audit.db")
    assert res.returncode == 0


async def test_mode_change_is_audited(proxy: Proxy, tmp_path: Path) -> None:
    await proxy.set_mode("READ_ONLY")
    rec = [r for r in rows(tmp_path / "audit.db") if r["tool"] == "casf.admin.set_mode"]
    assert len(rec) == 1
    assert json.loads(rec[0]["attrs"])["args"] == {"from": "ALLOW", "to": "READ_ONLY"}


async def test_sqlite_window_digest_and_migrate(proxy: Proxy, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    await traffic(proxy)
    cfg = str(proxy.cfg.source)
    db = tmp_path / "audit.db"
    recs = rows(db)
    win = run_cli("audit", "verify", "-c", cfg, "--since", recs[4]["ts"], audit_path=db)
    assert win.returncode == 0, win.stdout + win.stderr
    assert f"(seq 5..{len(recs)})" in win.stdout and "(sqlite)" in win.stdout

    key = Ed25519PrivateKey.generate()
    priv = tmp_path / "k.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    out = tmp_path / "digest.json"
    made = run_cli("audit", "digest", "-c", cfg, "--sign", str(priv), "--out", str(out),
                   audit_path=db)
    assert made.returncode == 0, made.stderr
    doc = json.loads(out.read_text())
    assert doc["store"] == "sqlite" and doc["records"] == len(recs)
    checked = run_cli("audit", "digest", "--verify", str(out), "--key", str(priv),
                      audit_path=db)
    assert checked.returncode == 0, checked.stdout
    assert run_cli("audit", "migrate", "-c", cfg, audit_path=db).returncode == 0

    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_events SET status = 599 WHERE seq = 3")
    conn.commit()
    conn.close()
    refused = run_cli("audit", "digest", "-c", cfg, audit_path=db)
    assert refused.returncode == 1 and "no digest written" in refused.stderr


async def test_sink_close_does_not_hang_when_the_writer_has_stopped(tmp_path: Path) -> None:
    """A writer that stopped with records still queued must not hold shutdown forever."""
    import asyncio
    import time

    from proxy.audit.sqlite import SqliteAuditSink

    sink = SqliteAuditSink(tmp_path / "a.db", "c", timeout_s=0.5)
    await sink.start()
    pending = sink.append_later({"kind": "outcome", "status": 200, "attrs": {},
                                 "reason_codes": []})
    writer = sink._writer
    assert writer is not None
    writer.cancel()  # stops before taking the queued record
    await wait_until(writer.done, "the cancelled audit writer to stop")
    started = time.monotonic()
    await asyncio.wait_for(sink.close(), 5)
    assert time.monotonic() - started < 2
    assert not pending.done() or pending.exception() is not None


async def test_a_refusal_follows_an_allow_committed_after_its_wait_gave_up(
        make_proxy: Any, tmp_path: Path) -> None:
    """Under overload a request's ALLOW record can be committed after its wait timed
    out (it was already in a batch); the request was refused 503 and not forwarded.
    The chain must then also hold the DENY that ended it, after the ALLOW."""
    import asyncio

    def patch(d: dict[str, Any]) -> None:
        d["audit"]["timeout_ms"] = 1  # far below one commit: most waits give up

    late_allows = 0
    async with make_proxy(patch) as p:
        for _ in range(5):
            answers = await asyncio.gather(*(p.call("GET", "/appointments")
                                             for _ in range(200)))
            assert {status for status, _, _ in answers} <= {200, 503}
            await p.rt.gen.pipeline.flush()
            records = rows(tmp_path / "audit.db")
            forwarded = {r["request_id"] for r in records
                         if r["kind"] == "outcome" and r["reason_codes"] == "[]"}
            refused_after = {}
            for r in records:
                if (r["kind"] == "decision" and r["decision"] == "DENY"
                        and "Audit_Unavailable" in r["reason_codes"]):
                    refused_after[r["request_id"]] = r["seq"]
            for r in records:
                if r["kind"] == "decision" and r["decision"] == "ALLOW":
                    if r["request_id"] in forwarded:
                        continue
                    late_allows += 1
                    # not forwarded: a DENY for the same request follows it in the chain
                    assert refused_after.get(r["request_id"], -1) > r["seq"], r
            assert len(forwarded) == len(p.upstream.seen)
            if late_allows:
                break
    assert late_allows > 0, "the overload never committed a record after its wait gave up"
    res = run_cli("audit", "verify", "-c", str(tmp_path / "casf.yaml"),
                  audit_path=tmp_path / "audit.db")
    assert res.returncode == 0, res.stdout
