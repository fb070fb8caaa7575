"""A policy that can never decide is refused wherever a policy is loaded.

``policy.query`` (default ``data.casf``) must name a document the bundle
defines, with ``allow`` in it: else every request would be a 403
``Policy_BadResult`` behind a health check saying ``policy: ok``. validate,
startup and hot reload refuse such a bundle; an external OPA without the
document makes ``/healthz`` report ``policy: unavailable``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from proxy.config import PolicyConfig
from proxy.policy_regorus import PolicyQueryError, RegorusEngine
from tests.conftest import CLINIC, Upstream, clinic_env, start_proxy, write_config

MYAPP = 'package myapp\nimport rego.v1\ndefault allow := false\nallow if input.role == "a"\n'


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CLINIC_UPSTREAM": "http://127.0.0.1:3000"}
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def bundle(tmp_path: Path, text: str, name: str = "pol") -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "policy.rego").write_text(text)
    return d


def config(tmp_path: Path, policies: Path, **policy: Any) -> Path:
    return write_config(tmp_path, lambda d: d["policy"].update(bundle=str(policies), **policy))


def test_validate_refuses_a_package_the_query_does_not_name(tmp_path: Path) -> None:
    res = cli("validate", "-c", str(config(tmp_path, bundle(tmp_path, MYAPP))))
    assert res.returncode == 1, res.stdout
    assert "policy cannot decide" in res.stderr
    assert "policy.query data.casf names nothing the policy defines" in res.stderr
    assert "data.myapp" in res.stderr
    assert res.stdout == ""


def test_validate_refuses_a_decision_without_allow(tmp_path: Path) -> None:
    pol = bundle(tmp_path, "package casf\nimport rego.v1\nviolations contains \"x\" if true\n")
    res = cli("validate", "-c", str(config(tmp_path, pol)))
    assert res.returncode == 1
    assert "policy.query data.casf has no allow rule" in res.stderr


def test_validate_accepts_the_configured_query(tmp_path: Path) -> None:
    res = cli("validate", "-c", str(config(tmp_path, bundle(tmp_path, MYAPP),
                                            query="data.myapp")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ok: ")


@pytest.mark.parametrize(("text", "query"), [
    # a rule holding the whole decision: only evaluation can see into its value
    ('package app\nimport rego.v1\ndecision := {"allow": input.ok == true}\n',
     "data.app.decision"),
    # the decision one level under the query's package, through a ref head
    ("package app\nimport rego.v1\nv1.allow if input.ok\n", "data.app.v1"),
    # a v0 policy (casf-core's style)
    ("package casf\ndefault allow = false\nallow { input.ok }\n", "data.casf"),
])
def test_queries_that_can_decide_load(tmp_path: Path, text: str, query: str) -> None:
    pol = bundle(tmp_path, text)
    cfg = PolicyConfig(bundle=pol, files=(pol / "policy.rego",), query=query,
                       rego_v0="allow {" in text, decision_cache_size=0)
    RegorusEngine(cfg).close()


@pytest.mark.parametrize(("text", "query", "message"), [
    (MYAPP, "data.casf", "names nothing the policy defines (its packages: data.myapp)"),
    (MYAPP, "data.myapp.decision", "names nothing the policy defines"),
    ("package casf.v1\nimport rego.v1\nallow if true\n", "data.casf",
     "has no allow rule, so no request could ever be allowed (packages: data.casf.v1)"),
])
def test_engine_refuses_queries_that_cannot_decide(tmp_path: Path, text: str, query: str,
                                                   message: str) -> None:
    pol = bundle(tmp_path, text)
    cfg = PolicyConfig(bundle=pol, files=(pol / "policy.rego",), query=query)
    with pytest.raises(PolicyQueryError, match=f"policy.query {query}") as info:
        RegorusEngine(cfg)
    assert message in str(info.value)


async def test_proxy_refuses_to_start(tmp_path: Path, upstream: Upstream) -> None:
    path = config(tmp_path, bundle(tmp_path, MYAPP))
    with pytest.raises(PolicyQueryError, match=r"data\.myapp"):
        async with start_proxy(path, clinic_env(upstream.url, tmp_path), upstream):
            pytest.fail("the proxy started with a policy that cannot decide")


def test_run_exits_with_the_reason(tmp_path: Path) -> None:
    path = config(tmp_path, bundle(tmp_path, MYAPP))
    env = {**os.environ, "CLINIC_UPSTREAM": "http://127.0.0.1:9", "CASF_PORT": "0",
           "CASF_ADMIN_PORT": "0", "CASF_AUDIT_PATH": str(tmp_path / "audit.db"),
           "CASF_ADMIN_TOKEN": "t"}
    res = subprocess.run([sys.executable, "-m", "proxy.cli", "run", "-c", str(path)],
                         capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2
    assert "policy.query data.casf names nothing the policy defines" in res.stderr


async def test_hot_reload_to_a_policy_that_cannot_decide_is_refused(
        tmp_path: Path, upstream: Upstream, caplog: Any) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(CLINIC / "policies", policies)
    path = write_config(tmp_path, lambda d: d["policy"].update(bundle=str(policies))
                        or d.update(reload={"watch": False}))
    async with start_proxy(path, clinic_env(upstream.url, tmp_path), upstream) as p:
        policy_hash = p.rt.pipeline.policy_hash
        assert (await p.call("GET", "/appointments"))[0] == 200
        rego = policies / "casf.rego"
        rego.write_text(rego.read_text().replace("package casf", "package myapp", 1))
        with caplog.at_level(logging.ERROR):
            assert await p.rt.reload("test") is False
        assert p.rt.pipeline.policy_hash == policy_hash
        assert (await p.call("GET", "/appointments"))[0] == 200  # the old policy serves
        failed = [r.getMessage() for r in caplog.records if "config reload" in r.getMessage()]
        assert len(failed) == 1
        assert "policy.query data.casf names nothing the policy defines" in failed[0]
        assert "data.myapp" in failed[0]
        async with p.session.get(p.admin + "/healthz") as r:
            assert (r.status, (await r.json())["checks"]["policy"]) == (200, "ok")


# ------------------------------------------------------------ external OPA


@contextlib.asynccontextmanager
async def fake_opa(document: dict[str, Any]) -> AsyncIterator[str]:
    """OPA's Data API answering ``document`` for every path (``{}``: undefined)."""
    async def data(_: web.Request) -> web.Response:
        return web.json_response(document)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/v1/data/{path:.+}", data)
    app.router.add_post("/v1/data/{path:.+}", data)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def opa_config(tmp_path: Path, url: str) -> Path:
    def patch(d: dict[str, Any]) -> None:
        d["policy"] = {"engine": "opa", "opa": {"url": url}}
    return write_config(tmp_path, patch)


@pytest.mark.parametrize(("document", "problem"), [
    ({}, "the decision document data.casf is undefined in OPA"),
    ({"result": [1]}, "the decision document data.casf is not an object"),
])
async def test_opa_without_the_document_is_unhealthy(tmp_path: Path, upstream: Upstream,
                                                     caplog: Any, document: dict[str, Any],
                                                     problem: str) -> None:
    async with fake_opa(document) as url:
        with caplog.at_level(logging.ERROR):
            async with start_proxy(opa_config(tmp_path, url),
                                   clinic_env(upstream.url, tmp_path), upstream) as p:
                async with p.session.get(p.admin + "/healthz") as r:
                    body = await r.json()
                    assert (r.status, body["checks"]["policy"]) == (503, "unavailable")
                status, _, raw = await p.call("GET", "/appointments")
                assert (status, json.loads(raw)["reason_codes"]) == (403, ["Policy_BadResult"])
    logged = [r.getMessage() for r in caplog.records if "OPA cannot decide" in r.getMessage()]
    assert len(logged) == 1 and problem in logged[0], logged


async def test_opa_with_the_document_is_healthy(tmp_path: Path, upstream: Upstream) -> None:
    async with fake_opa({"result": {"allow": True}}) as url:
        async with start_proxy(opa_config(tmp_path, url),
                               clinic_env(upstream.url, tmp_path), upstream) as p:
            async with p.session.get(p.admin + "/healthz") as r:
                assert (r.status, (await r.json())["checks"]["policy"]) == (200, "ok")
            assert (await p.call("GET", "/appointments"))[0] == 200


def test_validate_with_an_external_opa_has_nothing_local_to_check(tmp_path: Path) -> None:
    res = cli("validate", "-c", str(opa_config(tmp_path, "http://127.0.0.1:9")))
    assert res.returncode == 0, res.stderr
