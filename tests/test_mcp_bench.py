"""The benchmark's MCP target starts, measures and writes its rows (a smoke test,
no timing assertion: performance is measured by bench/, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.ci import require_binary

ROOT = Path(__file__).resolve().parent.parent


def test_bench_mcp_target_measures_tool_calls_beside_the_rest_route(tmp_path: Path) -> None:
    require_binary("wrk")
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "bench/run.py", "--targets", "embedded,mcp", "--duration", "1",
         "--warmup", "1", "--rate", "50", "--rate-duration", "1", "--mcp-rate", "50",
         "--connections", "4", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    rows = {(r["target"], r["route"]): r for r in data["results"]}
    assert set(rows) == {(t, r) for t in ("embedded", "mcp-direct", "mcp")
                         for r in ("read", "write")}
    for target in ("mcp-direct", "mcp"):
        for route in ("read", "write"):
            fr = rows[(target, route)]["fixed_rate"]
            assert fr["requests"] >= 25 and fr["errors"] == 0
            assert set(fr["statuses"]) == {"200"}
    assert "| mcp | write |" in res.stdout
