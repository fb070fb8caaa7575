"""``list_query`` asked of both policy engines: ``query_true`` is true only for ``true``.

In-process (regorus, the MCP example's own policy) and through the OPA
adapter against the fake OPA of tests/test_opa.py (a real HTTP server that
evaluates the clinic's Rego); undefined documents and other values are
false; an OPA that is gone raises PolicyUnavailable (the door then shows
nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import OpaConfig, load_config
from proxy.metrics import Metrics
from proxy.policy_opa import OpaEngine
from proxy.policy_regorus import RegorusEngine
from proxy.ports import PolicyUnavailable
from proxy.settings import Environment
from tests.test_mcp_proxy import mcp_config
from tests.test_opa import run_opa


def visibility(role: str, tool: str) -> dict[str, Any]:
    return {"tool": tool, "effect": "read", "mode": "ALLOW", "role": role, "subject": {},
            "args": {}, "context": {"tenant_id": "t1"},
            "principal": {"id": role, "role": role, "tenant": "t1", "auth": "api_key"},
            "request": {"method": "POST", "path": "/mcp", "route": "/mcp"}}


async def test_the_in_process_engine_answers_the_list_query(tmp_path: Path) -> None:
    cfg = load_config(mcp_config(tmp_path, lambda d: None), Environment({}))
    engine = RegorusEngine(cfg.policy)
    try:
        q = "data.casf.visible"
        assert await engine.query_true(q, visibility("billing", "stripe.generate_invoice"))
        assert not await engine.query_true(q, visibility("billing", "twilio.send_sms"))
        assert not await engine.query_true("data.casf.nothing_here",
                                           visibility("billing", "stripe.generate_invoice"))
        # a value that is not true (a set) is false
        assert not await engine.query_true("data.casf.violations",
                                           visibility("billing", "twilio.send_sms"))
        # the decision query still works after the engine answered another query
        decided = await engine.evaluate(visibility("billing", "stripe.generate_invoice"))
        assert decided.violations == ()
    finally:
        engine.close()


async def test_the_opa_adapter_answers_the_list_query() -> None:
    async with run_opa() as opa:
        engine = OpaEngine(OpaConfig(url=opa.url, path="casf", timeout_s=5.0), "sha256:x",
                           Metrics())
        await engine.start()
        try:
            allowed = visibility("billing", "stripe.generate_invoice")
            allowed["effect"] = "write"
            allowed["subject"] = {"patient_id": "p1"}
            assert await engine.query_true("data.casf.allow", allowed)
            assert opa.paths[-1] == "casf/allow"
            assert not await engine.query_true("data.casf.allow",
                                               visibility("billing", "twilio.send_sms"))
            assert not await engine.query_true("data.casf.undefined_rule", allowed)
            await opa.stop()
            with pytest.raises(PolicyUnavailable):
                await engine.query_true("data.casf.allow", allowed)
        finally:
            await engine.close()
