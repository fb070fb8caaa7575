"""The external OPA adapter against a real HTTP server speaking OPA's Data API.

The fake OPA evaluates the clinic's own Rego with regorus, so one decision
table runs unchanged through the in-process engine and through the adapter.
Failure modes (slow answers, 500s, malformed JSON, an undefined decision, a
server that is gone) are switched per test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import regorus
from aiohttp import web

from proxy.config import ConfigError, load_config
from tests.conftest import CLINIC, Proxy, clinic_env, write_config


@dataclass
class FakeOpa:
    behaviour: str = "ok"  # ok | slow | 500 | malformed | not_object | undefined | bad_shape
    inputs: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    peers: set[tuple[str, int]] = field(default_factory=set)
    url: str = ""
    runner: web.AppRunner | None = None
    # "slow": answers only once released (at the latest when stopped), so the
    # proxy's timeout always comes first, however loaded the machine
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0  # "slow" queries not answered yet

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def run_opa() -> AsyncIterator[FakeOpa]:
    state = FakeOpa()
    # held in a dict cleared on exit: a regorus engine must be freed on this thread
    holder = {"engine": regorus.Engine()}
    for f in sorted((CLINIC / "policies").glob("*.rego")):
        if not f.name.endswith("_test.rego"):
            holder["engine"].add_policy_from_file(str(f))

    async def data(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            state.peers.add((peer[0], peer[1]))
        doc = await request.json()
        state.inputs.append(doc["input"])
        state.paths.append(request.match_info["path"])
        b = state.behaviour
        if b == "slow":
            state.holding += 1
            try:
                await asyncio.wait_for(state.release.wait(), 30)
            finally:
                state.holding -= 1
        if b == "500":
            return web.json_response({"code": "internal_error"}, status=500)
        if b == "malformed":
            return web.Response(body=b'{"result": {"allow": tr', content_type="application/json")
        if b == "not_object":
            return web.json_response([1, 2])
        if b == "undefined":
            return web.json_response({})
        if b == "bad_shape":
            return web.json_response({"result": {"allow": "yes"}})
        if b == "split":  # a valid answer in two chunks, 50 ms apart
            out = web.StreamResponse(headers={"Content-Type": "application/json"})
            await out.prepare(request)
            await out.write(b'{"result": {"allow": true, ')
            await asyncio.sleep(0.05)
            await out.write(b'"violations": []}}')
            await out.write_eof()
            return out
        engine = holder["engine"]
        engine.set_input_json(json.dumps(doc["input"]))
        query = "data." + request.match_info["path"].replace("/", ".")
        raw = orjson.loads(engine.eval_query_as_json(query))
        if not raw.get("result"):
            return web.json_response({})  # OPA: an undefined document has no "result"
        return web.json_response({"result": raw["result"][0]["expressions"][0]["value"]})

    async def document(request: web.Request) -> web.Response:
        # GET /v1/data/{path}: the document without input (the proxy's health check)
        if state.behaviour == "undefined":
            return web.json_response({})
        engine = holder["engine"]
        engine.set_input_json("{}")
        query = "data." + request.match_info["path"].replace("/", ".")
        raw = orjson.loads(engine.eval_query_as_json(query))
        if not raw.get("result"):
            return web.json_response({})
        return web.json_response({"result": raw["result"][0]["expressions"][0]["value"]})

    async def health(_: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/v1/data/{path:.+}", data)
    app.router.add_get("/v1/data/{path:.+}", document)
    app.router.add_get("/health", health)
    state.runner = web.AppRunner(app, access_log=None)
    await state.runner.setup()
    site = web.TCPSite(state.runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{state.runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await state.stop()
        holder.clear()


def opa_patch(url: str, **opa: Any) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        d["policy"]["engine"] = "opa"
        d["policy"]["opa"] = {"url": url, **opa}
    return patch


@contextlib.asynccontextmanager
async def engine_proxy(make_proxy: Any, engine: str) -> AsyncIterator[Proxy]:
    if engine == "regorus":
        async with make_proxy() as p:
            yield p
    else:
        async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
            yield p


# (name, mode, method, path, key, json, rid, status, decision, codes)
DECISIONS: list[tuple[Any, ...]] = [
    ("receptionist lists", "ALLOW", "GET", "/appointments", "receptionist", None, None, 200,
     None, []),
    ("doctor reads history", "ALLOW", "GET", "/patients/p1/history", "doctor", None, None, 200,
     None, []),
    ("receptionist may not read history", "ALLOW", "GET", "/patients/p1/history",
     "receptionist", None, None, 403, "DENY", ["Role_NotPermitted"]),
    ("receptionist books", "ALLOW", "POST", "/appointments", "receptionist",
     {"patient_id": "p1", "slot": "s"}, "o-1", 201, None, []),
    ("nurse may not invoice", "ALLOW", "POST", "/invoices", "nurse",
     {"patient_id": "p1", "amount_cents": 5}, "o-2", 403, "DENY", ["Role_NotPermitted"]),
    ("billing invoices", "ALLOW", "POST", "/invoices", "billing",
     {"patient_id": "p1", "amount_cents": 5}, "o-3", 201, None, []),
    ("custodian cancels", "ALLOW", "DELETE", "/appointments/a1", "custodian", None,
     "o-4", 200, None, []),
    ("custodian may not create", "ALLOW", "POST", "/appointments", "custodian",
     {"patient_id": "p1", "slot": "s"}, "o-4b", 403, "DENY", ["Role_NotPermitted"]),
    ("step-up write needs approval", "STEP_UP", "POST", "/appointments", "receptionist",
     {"patient_id": "p1", "slot": "s"}, "o-5", 403, "NEEDS_APPROVAL", ["Approval_Required"]),
    ("step-up read passes", "STEP_UP", "GET", "/appointments", "nurse", None, None, 200, None,
     []),
]


@pytest.mark.parametrize("engine", ["regorus", "opa"])
async def test_same_decisions_in_process_and_through_opa(make_proxy: Any, engine: str) -> None:
    async with engine_proxy(make_proxy, engine) as p:
        got = []
        for (name, mode, method, path, key, body, rid, _, _, _) in DECISIONS:
            if p.rt.mode.current().value != mode:
                await p.set_mode(mode)
            status, _, raw = await p.call(method, path, key=key, json=body, rid=rid)
            env = json.loads(raw) if status >= 400 else {}
            got.append((name, status, env.get("decision"), env.get("reason_codes", [])))
        expected = [(d[0], d[7], d[8], d[9]) for d in DECISIONS]
        assert got == expected


async def test_opa_receives_the_policy_input(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        status, _, _ = await p.call("POST", "/sms", key="nurse", rid="in-1",
                                    json={"patient_id": "p7", "message": "hi"})
        assert status == 201
        assert opa.paths == ["casf"]
        assert opa.inputs == [{
            "tool": "twilio.send_sms", "effect": "write", "mode": "ALLOW", "role": "nurse",
            "subject": {"patient_id": "p7"}, "args": {"message": "hi"},
            "context": {"tenant_id": "t1"},
            "principal": {"id": "user-nurse", "role": "nurse", "tenant": "t1",
                          "auth": "api_key"},
            "request": {"method": "POST", "path": "/sms", "route": "/sms"},
        }]


async def test_opa_answer_in_several_chunks_is_read_whole(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        opa.behaviour = "split"
        status, _, _ = await p.call("POST", "/appointments", rid="split-1",
                                    json={"patient_id": "p1", "slot": "s"})
        assert status == 201
        assert 'casf_opa_error_total{kind="bad_response"} 0.0' in await p.metrics()


async def test_opa_connection_is_reused(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        for _ in range(10):
            assert (await p.call("GET", "/appointments"))[0] == 200
        assert len(opa.inputs) == 10
        assert len(opa.peers) == 1  # one keep-alive connection for sequential calls


FAILURES = [
    ("slow", "timeout", 503),
    ("500", "bad_status", 503),
    ("malformed", "bad_response", 503),
    ("not_object", "bad_response", 503),
]


@pytest.mark.parametrize(("behaviour", "kind", "write_status"), FAILURES,
                         ids=[f[0] for f in FAILURES])
async def test_opa_failure_fails_closed_for_writes_open_for_reads(
        make_proxy: Any, behaviour: str, kind: str, write_status: int) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        opa.behaviour = behaviour
        status, hdrs, raw = await p.call("POST", "/appointments", key="receptionist",
                                         json={"patient_id": "p1", "slot": "s"}, rid="f-1")
        assert status == write_status
        env = json.loads(raw)
        assert env["decision"] == "DENY"
        assert env["reason_codes"] == ["FAIL_CLOSED", "OPA_Unavailable"]
        assert hdrs["Retry-After"]
        assert p.upstream.seen == []
        # reads fail open (and are audited with the degradation)
        status, _, _ = await p.call("GET", "/appointments", key="receptionist")
        assert status == 200
        assert len(p.upstream.seen) == 1
        text = await p.metrics()
        assert f'casf_opa_error_total{{kind="{kind}"}} 2.0' in text
        assert 'casf_fail_closed_total{trigger="opa"} 1.0' in text


async def test_opa_slow_answer_is_bounded(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url, timeout_ms=100)) as p:
        opa.behaviour = "slow"
        # bounded: the proxy answers while the OPA still holds its answer back
        status, _, raw = await asyncio.wait_for(
            p.call("POST", "/appointments", key="receptionist",
                   json={"patient_id": "p1", "slot": "s"}, rid="t-1"), 10)
        assert status == 503
        assert json.loads(raw)["reason_codes"] == ["FAIL_CLOSED", "OPA_Unavailable"]
        assert len(opa.inputs) == 1 and opa.holding == 1


async def test_opa_gone_is_unavailable(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        assert (await p.call("GET", "/appointments"))[0] == 200
        await opa.stop()
        status, _, raw = await p.call("POST", "/appointments", key="receptionist",
                                      json={"patient_id": "p1", "slot": "s"}, rid="g-1")
        assert (status, json.loads(raw)["reason_codes"]) == (503, ["FAIL_CLOSED",
                                                                  "OPA_Unavailable"])
        assert (await p.call("GET", "/appointments"))[0] == 200
        text = await p.metrics()
        assert 'casf_opa_error_total{kind="unavailable"} 2.0' in text
        async with p.session.get(p.admin + "/healthz") as r:
            body = await r.json()
            assert r.status == 503 and body["checks"]["policy"] == "unavailable"


@pytest.mark.parametrize("behaviour", ["undefined", "bad_shape"])
async def test_opa_unusable_decision_is_a_deny_like_in_process(make_proxy: Any,
                                                               behaviour: str) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url)) as p:
        opa.behaviour = behaviour
        for method, path, body, rid in (("GET", "/appointments", None, None),
                                        ("POST", "/appointments",
                                         {"patient_id": "p1", "slot": "s"}, "u-1")):
            status, _, raw = await p.call(method, path, key="receptionist", json=body, rid=rid)
            assert (status, json.loads(raw)["reason_codes"]) == (403, ["Policy_BadResult"])
        assert p.upstream.seen == []
        assert 'casf_opa_error_total{kind="bad_response"} 2.0' in await p.metrics()


async def test_opa_decision_path_and_health(make_proxy: Any) -> None:
    async with run_opa() as opa, make_proxy(opa_patch(opa.url, path="casf")) as p:
        async with p.session.get(p.admin + "/healthz") as r:
            body = await r.json()
            assert body["checks"]["policy"] == "ok"
            assert body["backends"]["policy"] == "opa"
        assert (await p.call("GET", "/appointments"))[0] == 200
        assert opa.paths == ["casf"]


@pytest.mark.parametrize(("policy", "match"), [
    ({"engine": "opa"}, "policy.opa.url"),
    ({"engine": "opa", "opa": {"url": "ftp://x"}}, "policy.opa.url"),
    ({"engine": "opa", "opa": {"url": "http://127.0.0.1:8181", "path": "a b"}},
     "policy.opa.path"),
    ({"engine": "regorus", "opa": {"url": "http://127.0.0.1:8181"}}, "policy.opa"),
    ({"engine": "wasm"}, "policy.engine"),
])
def test_opa_config_errors(tmp_path: Any, policy: dict[str, Any], match: str) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["policy"].update(policy)

    path = write_config(tmp_path, patch)
    with pytest.raises(ConfigError, match=match):
        load_config(path, clinic_env("http://127.0.0.1:1", tmp_path))


def test_opa_config_defaults(tmp_path: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["policy"] = {"engine": "opa", "query": "data.casf.decision",
                       "opa": {"url": "http://127.0.0.1:8181/"}}

    cfg = load_config(write_config(tmp_path, patch), clinic_env("http://127.0.0.1:1", tmp_path))
    assert cfg.policy.opa is not None
    assert (cfg.policy.opa.url, cfg.policy.opa.path, cfg.policy.opa.timeout_s) == (
        "http://127.0.0.1:8181", "casf/decision", 0.35)
    assert cfg.policy.bundle is None and cfg.policy.policy_hash.startswith("sha256:")
