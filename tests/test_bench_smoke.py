"""The benchmark starts, measures and writes its JSON (a smoke test, no timing
assertion: performance is measured by bench/, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ci import require_binary

ROOT = Path(__file__).resolve().parent.parent


def test_bench_runs_on_a_few_hundred_requests(tmp_path: Path) -> None:
    require_binary("wrk")
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "bench/run.py", "--targets", "direct,bare,embedded", "--duration", "1",
         "--warmup", "1", "--rate", "100", "--rate-duration", "1", "--connections", "4",
         "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    rows = {(r["target"], r["route"]): r for r in data["results"]}
    assert set(rows) == {(t, r) for t in ("direct", "bare", "embedded") for r in ("read", "write")}
    for row in rows.values():
        assert row["requests"] > 0 and row["errors"] == 0
        assert row["fixed_rate"]["requests"] >= 50 and row["fixed_rate"]["errors"] == 0, row
    check = data["audit"]["embedded"]
    assert check["forwarded"] > 0 and check["forwarded"] == check["allow_records"]
    assert "| embedded | write |" in res.stdout


def test_bench_soak_samples_rss_until_the_request_count(tmp_path: Path) -> None:
    require_binary("wrk")
    out = tmp_path / "soak.json"
    res = subprocess.run(
        [sys.executable, "bench/run.py", "--targets", "embedded", "--routes", "write",
         "--soak-requests", "300", "--connections", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["results"] == []
    (soak,) = data["soak"]
    assert soak["target"] == "embedded" and soak["route"] == "write"
    assert soak["requests"] >= 300 and soak["errors"] == 0
    assert soak["rss_end_mb"] > 0 and soak["samples"]
    check = data["audit"]["embedded"]
    assert check["forwarded"] >= 300 and check["forwarded"] == check["allow_records"]
