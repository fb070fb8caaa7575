"""The admin listener's OpenAPI document and the models its handlers validate with.

- ``GET /openapi.json`` needs no token and is the document the code builds;
  with the approvals routes mounted on the admin app it describes them too.
- Both documents load as OpenAPI (every ``$ref`` resolves) and name every
  route the admin app serves.
- ``PUT /admin/mode`` validates its body with the published ``ModeChange``
  schema: what the schema refuses is a 400 ``BadRequest_InvalidMode`` with
  the mode unchanged; what it accepts changes the mode and the answer fits
  ``ModeChanged``.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from aiohttp import web
from schemathesis.core.result import Ok

from proxy.approvals.api import add_approval_routes
from proxy.console.app import PREFIX as CONSOLE
from proxy.doors.admin_schema import MODE_CHANGE, MODE_CHANGED, admin_api_spec
from proxy.doors.schema import SchemaError, validate
from proxy.model import Principal, Verdict
from proxy.strictjson import loads_strict
from tests.conftest import ADMIN_TOKEN, Proxy
from tests.servers import free_port

TOKEN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}


def _served(app: web.Application) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource else {}
        path = str(info.get("path") or info.get("formatter") or info.get("prefix"))
        # the console is HTML for people, not part of the API
        if route.method != "HEAD" and path != "/openapi.json" and not path.startswith(
                CONSOLE):
            out.add((route.method, path))
    return out


@pytest.mark.parametrize("approvals", [False, True])
def test_the_document_loads_and_every_ref_resolves(approvals: bool) -> None:
    spec = admin_api_spec(approvals=approvals)
    schema = schemathesis.openapi.from_dict(spec)
    ops = set()
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result  # an operation that does not load is an Err
        ops.add((result.ok().method.upper(), result.ok().path))
    assert ops == _operations(spec)
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec["paths"])
    assert refs <= set(spec["components"]["schemas"])


async def test_openapi_needs_no_token_and_names_every_admin_route(proxy: Proxy) -> None:
    async with proxy.session.get(proxy.admin + "/openapi.json") as r:
        assert r.status == 200
        spec = await r.json()
    served = _served(proxy.rt.admin_app())
    mounted = any(path.startswith("/approvals") for _, path in served)
    assert spec == admin_api_spec(approvals=mounted)
    assert _operations(spec) == served
    assert mounted == any(p.startswith("/approvals") for p in spec["paths"])


async def test_mounted_approvals_routes_are_described(proxy: Proxy) -> None:
    async def nobody(headers: Any, peer: str) -> Principal | Verdict:
        return Verdict("DENY", 401, ("Auth_Missing",), "no", shadowable=False)

    app = proxy.rt.admin_app()
    if not any(r.canonical == "/approvals" for r in app.router.resources()):
        add_approval_routes(app, lambda: None, nobody, lambda: "sha256:" + "0" * 64)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with proxy.session.get(f"http://127.0.0.1:{port}/openapi.json") as r:
            spec = await r.json()
    finally:
        await runner.cleanup()
    assert spec == admin_api_spec(approvals=True)
    assert _operations(spec) == _served(app)
    assert {"Approval", "ApprovalDecision"} <= set(spec["components"]["schemas"])


@pytest.mark.parametrize("body", [
    b'{"mode": "SOMETIMES"}', b'{"mode": 1}', b'{"mode": "ALLOW", "why": "x"}', b"{}",
    b'["ALLOW"]', b'"ALLOW"', b"null", b'{"mode": "KILL_SWITCH", "mode": "ALLOW"}',
    b"not json", b""])
async def test_a_body_the_schema_refuses_is_400_invalid_mode(proxy: Proxy,
                                                             body: bytes) -> None:
    with pytest.raises(ValueError):  # the model refuses it, or it is not (strict) JSON
        validate(loads_strict(body), MODE_CHANGE)
    async with proxy.session.put(proxy.admin + "/admin/mode", data=body,
                                 headers={**TOKEN, "Content-Type": "application/json"}) as r:
        assert r.status == 400
        env = await r.json()
    assert env["reason_codes"] == ["BadRequest_InvalidMode"]
    assert env["tool"] == "casf.admin.set_mode"
    async with proxy.session.get(proxy.admin + "/admin/mode", headers=TOKEN) as r:
        assert (await r.json()) == {"mode": "ALLOW"}


async def test_a_body_the_schema_accepts_changes_the_mode(proxy: Proxy) -> None:
    body = {"mode": "READ_ONLY"}
    validate(body, MODE_CHANGE)
    async with proxy.session.put(proxy.admin + "/admin/mode", json=body, headers=TOKEN) as r:
        assert r.status == 200
        answer = await r.json()
    validate(answer, MODE_CHANGED)
    assert answer == {"mode": "READ_ONLY", "previous": "ALLOW", "shared": True}


def test_mode_change_model_names_the_field() -> None:
    with pytest.raises(SchemaError) as exc:
        validate({"mode": "SOMETIMES"}, MODE_CHANGE)
    assert exc.value.field == "mode"
