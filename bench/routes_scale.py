"""Throughput with 10 routes vs 5,000 routes (route matching must not depend on N).

    python bench/routes_scale.py [--duration 10] [--routes 10,5000]

Runs casf-proxy on embedded defaults with the clinic config plus N - 6 extra
routes (templates like ``/svc{i}/items/{item_id}``), one proxy at a time
against the same backend, and loads GET /appointments (a clinic route) with
wrk. Prints req/s per route count and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from run import PY, process, wrk  # noqa: E402

from tests.servers import free_port  # noqa: E402

CLINIC = ROOT / "examples" / "clinic"


def config_with(n_routes: int, directory: Path) -> Path:
    data = yaml.safe_load((CLINIC / "casf.yaml").read_text())
    data["identity"]["api_keys"]["keys_file"] = str(CLINIC / "keys.yaml")
    if "jwt" in data["identity"]:
        data["identity"]["jwt"]["jwks_file"] = str(CLINIC / "dev-keys" / "jwks.json")
    data["policy"]["bundle"] = str(CLINIC / "policies")
    for i in range(max(0, n_routes - len(data["routes"]))):
        method = ("GET", "POST", "PUT", "DELETE")[i % 4]
        data["routes"].append({
            "method": method, "path": f"/svc{i}/items/{{item_id}}",
            "tool": f"bench.tool_{i}", "effect": "read" if method == "GET" else "write",
            "attributes": {"args.item_id": {"from": "path", "name": "item_id"}}})
    path = directory / f"casf-{n_routes}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--routes", default="10,5000")
    a = ap.parse_args()
    counts = [int(n) for n in a.routes.split(",")]
    out: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="casf-routes-") as tmpdir, ExitStack() as stack:
        tmp = Path(tmpdir)
        backend_port = free_port()
        stack.enter_context(process(
            [PY, "examples/clinic/backend.py", "--port", str(backend_port)], backend_port))
        for n in counts:
            cfg = config_with(n, tmp)
            port, admin = free_port(), free_port()
            env = {"CLINIC_UPSTREAM": f"http://127.0.0.1:{backend_port}",
                   "CASF_PORT": str(port), "CASF_ADMIN_PORT": str(admin),
                   "CASF_DECISIONS_PORT": str(free_port()),
                   "CASF_LOG_LEVEL": "warning", "CASF_SHUTDOWN_DELAY_MS": "0",
                   "CASF_AUDIT_PATH": str(tmp / f"{n}.db")}
            with process([PY, "-m", "proxy.cli", "run", "-c", str(cfg)], port, env,
                         tmp / f"{n}.log"):
                url = f"http://127.0.0.1:{port}"
                wrk(url, "read", 2, a.connections)
                out[n] = wrk(url, "read", a.duration, a.connections)["rps"]
            print(f"{n:6} routes: {out[n]:8.0f} req/s", flush=True)
    if len(counts) == 2:
        print(f"ratio {counts[1]} / {counts[0]} routes: {out[counts[1]] / out[counts[0]]:.3f}")
    print(json.dumps({str(k): v for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
