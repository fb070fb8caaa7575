"""The casf-proxy CLI: validate, policy test; exit codes 0/1/2 and error messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CLINIC, write_config

FIXTURES = Path(__file__).parent / "fixtures"


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "CLINIC_UPSTREAM": "http://127.0.0.1:3000", **env}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, env=full, timeout=60)


def test_validate_clinic_config_ok() -> None:
    res = cli("validate", "-c", str(CLINIC / "casf.yaml"))
    assert res.returncode == 0, res.stderr
    assert "6 routes" in res.stdout


def test_validate_reads_casf_config_env() -> None:
    res = cli("validate", CASF_CONFIG=str(CLINIC / "casf.yaml"))
    assert res.returncode == 0, res.stderr


def test_no_config_is_usage_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != "CASF_CONFIG"}
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "validate"], capture_output=True,
                         text=True, env=env, timeout=60)
    assert res.returncode == 2
    assert "CASF_CONFIG" in res.stderr


def test_unknown_subcommand_is_exit_2() -> None:
    assert cli("frobnicate").returncode == 2


BAD = [
    ("unknown top key", lambda d: d.update(listn={}), "listn: unknown key"),
    ("bad effect", lambda d: d["routes"][1].update(effect="mutate"), "routes[1].effect"),
    ("bad method", lambda d: d["routes"][0].update(method="FETCH"), "routes[0].method"),
    ("bad template", lambda d: d["routes"][0].update(path="/a/{x"), "routes[0].path"),
    ("unknown path param", lambda d: d["routes"][2]["attributes"].update(
        {"args.x": {"from": "path", "name": "nope"}}), "routes[2].attributes.args.x.name"),
    ("required not an attribute", lambda d: d["routes"][0].update(required=["subject.zz"]),
     "routes[0].required[0]"),
    ("bad mode", lambda d: d["mode"].update(default="SOMETIMES"), "mode.default"),
    ("bad rate key", lambda d: d["rate_limits"][0].update(key="{body.x}"), "rate_limits[0].key"),
    ("bad listener", lambda d: d["listen"].update(traffic="nowhere"), "listen.traffic"),
    ("bad upstream", lambda d: d["upstream"].update(url="ftp://x"), "upstream.url"),
    ("missing policy dir", lambda d: d["policy"].update(bundle="/nonexistent"), "policy.bundle"),
    ("bad redact", lambda d: d["audit"].update(redact={"args.message": "shred"}),
     "audit.redact.args.message"),
    ("budget without quota", lambda d: d["budgets"][0].pop("daily") and
     d["budgets"][0].pop("monthly"), "budgets[0]: sets no quota"),
    ("budget cost for other tool", lambda d: d["budgets"][0]["cost"].update({"x.y": 2}),
     "budgets[0].cost.x.y"),
    ("budget warn_at over 1", lambda d: d["budgets"][0].update(warn_at=90),
     "budgets[0].warn_at"),
    ("budget tenant key", lambda d: d["budgets"][0]["tenants"]["t2"].update(weekly=3),
     "budgets[0].tenants.t2.weekly"),
    ("rate limit without limit", lambda d: d["rate_limits"][0].pop("limit"),
     "rate_limits[0].limit: is required"),
    ("rate limit without window", lambda d: d["rate_limits"][0].pop("window_seconds"),
     "rate_limits[0].window_seconds: is required"),
    ("budget name reused", lambda d: d["budgets"][0].update(name="sms_per_patient"),
     "is used twice"),
]


@pytest.mark.parametrize(("name", "patch", "where"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(tmp_path: Path, name: str, patch: Any, where: str) -> None:
    cfg = write_config(tmp_path, patch)
    res = cli("validate", "-c", str(cfg))
    assert res.returncode == 2, res.stdout
    assert where in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_missing_env_var_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    text = (CLINIC / "casf.yaml").read_text().replace(
        "${CLINIC_UPSTREAM:-http://127.0.0.1:3000}", "${CASF_TEST_UNSET_VAR}")
    cfg.write_text(text)
    for name in ("keys.yaml",):
        (tmp_path / name).write_text((CLINIC / name).read_text())
    (tmp_path / "policies").symlink_to(CLINIC / "policies")
    res = cli("validate", "-c", str(cfg))
    assert res.returncode == 2
    assert "upstream.url: environment variable CASF_TEST_UNSET_VAR is not set" in res.stderr


def test_overlapping_routes_fail_validation(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append({"method": "GET", "path": "/patients/all/history",
                            "tool": "x.y", "effect": "read"})

    res = cli("validate", "-c", str(write_config(tmp_path, patch)))
    assert res.returncode == 1
    assert "routes[3] and routes[6] overlap" in res.stderr


def test_policy_that_does_not_compile_fails_validation(tmp_path: Path) -> None:
    bundle = tmp_path / "pol"
    bundle.mkdir()
    (bundle / "casf.rego").write_text("package casf\nallow { true }\n")  # v0 syntax, v1 mode

    res = cli("validate", "-c", str(write_config(
        tmp_path, lambda d: d["policy"].update(bundle=str(bundle)))))
    assert res.returncode == 1
    assert "casf.rego" in res.stderr


def test_bad_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "k.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"id": "k", "sha256": "demo-plaintext",
                                              "principal": {"id": "a", "role": "b"}}]}))
    cfg = write_config(tmp_path, lambda d: d["identity"]["api_keys"].update(
        keys_file=str(keys)))
    res = cli("validate", "-c", str(cfg))
    assert res.returncode == 2
    assert "keys[0].sha256" in res.stderr


def test_policy_test_clinic_passes() -> None:
    res = cli("policy", "test", str(CLINIC / "policies"), "-v")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout


def test_policy_test_failing_rego_exits_1() -> None:
    res = cli("policy", "test", str(FIXTURES / "failing_rego"))
    assert res.returncode == 1
    assert "FAIL" in res.stdout


def test_policy_test_v0_needs_flag() -> None:
    ok = cli("policy", "test", str(FIXTURES / "casf_core_v0"), "--v0-compatible")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert cli("policy", "test", str(FIXTURES / "casf_core_v0")).returncode == 1


def test_policy_test_missing_dir_is_exit_2() -> None:
    assert cli("policy", "test", "/nonexistent-dir").returncode == 2


def test_starter_config_and_policy_are_valid() -> None:
    root = CLINIC.parent.parent
    res = cli("validate", "-c", str(root / "config" / "casf.yaml"))
    assert res.returncode == 0, res.stderr
    res = cli("policy", "test", str(root / "policies"))
    assert res.returncode == 0, res.stdout
