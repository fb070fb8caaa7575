"""Traces of real requests through the real proxy, received by a real OTLP/HTTP receiver.

The spans carry the envelope's trace id, a child per stage under the server
span, the allow-listed attributes, and never a value sent in the body or a
credential. A collector that is down or answers 500 changes nothing for the
requests: spans are dropped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.conftest import Proxy
from tests.otlp_receiver import OtlpReceiver, otlp_receiver
from tests.servers import free_port
from tests.waiting import wait_until

SECRET_PATIENT = "patient-secret-4711"
SECRET_SLOT = "slot-secret-0815"


def telemetry_patch(endpoint: str) -> Callable[[dict[str, Any]], None]:
    def patch(d: dict[str, Any]) -> None:
        d["telemetry"] = {"otlp_endpoint": endpoint, "schedule_delay_ms": 50,
                          "export_timeout_ms": 500, "shutdown_timeout_ms": 1000}
    return patch


def dropped(text: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith("casf_telemetry_spans_dropped_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_spans_of_a_forwarded_write_and_a_deny(make_proxy: Callable[..., Any]) -> None:
    async with otlp_receiver() as rx:
        async with make_proxy(telemetry_patch(rx.endpoint)) as p:
            parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            status, headers, _ = await p.call(
                "POST", "/appointments", rid="tr-1",
                json={"patient_id": SECRET_PATIENT, "slot": SECRET_SLOT},
                headers={"traceparent": parent})
            assert status == 201
            trace_id = headers["X-Casf-Trace-Id"]
            assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
            status, headers2, raw = await p.call("POST", "/invoices", rid="tr-2",
                                                 json={"patient_id": SECRET_PATIENT})
            assert status == 403
            deny_trace = json.loads(raw)["trace_id"]
            assert headers2["X-Casf-Trace-Id"] == deny_trace
            upstream_parent = p.upstream.seen[-1].headers["traceparent"]

            def both() -> bool:
                ids = {s.trace_id for s in rx.spans if s.kind == 2}  # SERVER
                return {trace_id, deny_trace} <= ids

            await rx.wait_for(both)
        spans = [s for s in rx.spans if s.trace_id == trace_id]
        server = next(s for s in spans if s.kind == 2)
        assert server.parent_span_id == "00f067aa0ba902b7"  # the caller's span
        assert server.attributes["casf.tool"] == "cliniccloud.create_appointment"
        assert server.attributes["casf.decision"] == "ALLOW"
        assert server.attributes["http.response.status_code"] == 201
        assert server.attributes["casf.via"] == "proxy"
        children = {s.name: s for s in spans if s.parent_span_id == server.span_id}
        assert {"authenticate", "admission", "policy", "audit commit", "upstream"} <= set(
            children), sorted(children)
        # the upstream's traceparent names the upstream span: the trace continues there
        assert upstream_parent.split("-")[2] == children["upstream"].span_id
        deny = next(s for s in rx.spans if s.trace_id == deny_trace and s.kind == 2)
        assert deny.attributes["casf.decision"] == "DENY"
        assert "Role_NotPermitted" in deny.attributes["casf.reason_codes"]
        # nothing sent in the body, no credential, in any span or resource
        blob = b"".join(rx.bodies)
        for secret in (SECRET_PATIENT, SECRET_SLOT, "demo-receptionist"):
            assert secret.encode() not in blob, secret


async def test_a_dead_or_failing_collector_costs_only_dropped_spans(
        make_proxy: Callable[..., Any]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with make_proxy(telemetry_patch(dead)) as p:
        for i in range(5):
            assert (await p.call("GET", "/appointments"))[0] == 200
            assert (await p.call("POST", "/appointments", rid=f"dead-{i}",
                                 json={"patient_id": "p1", "slot": "s"}))[0] == 201

        async def counted() -> bool:
            async with p.session.get(p.admin + "/metrics") as r:
                return dropped(await r.text()) >= 10

        await wait_until(counted, "dropped spans to be counted")
    rx: OtlpReceiver
    async with otlp_receiver("error") as rx:
        async with make_proxy(telemetry_patch(rx.endpoint)) as p:
            assert (await p.call("GET", "/appointments"))[0] == 200
            await rx.wait_for(lambda: rx.requests >= 1)

            async def counted_500() -> bool:
                async with p.session.get(p.admin + "/metrics") as r:
                    return 'reason="export_failed"} ' in await r.text() and dropped(
                        await r.text()) >= 1

            await wait_until(counted_500, "500s counted as export failures")


async def test_tracing_is_off_without_an_endpoint(proxy: Proxy) -> None:
    assert proxy.rt.telemetry is not None and not proxy.rt.telemetry.enabled
    assert proxy.rt.pipeline.core.telemetry is None
    assert (await proxy.call("GET", "/appointments"))[0] == 200
