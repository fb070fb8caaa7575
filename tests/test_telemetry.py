"""OpenTelemetry traces (proxy/telemetry.py) against a real OTLP/HTTP receiver.

The exporter is the SDK's real OTLP/HTTP exporter posting protobuf to an
aiohttp receiver on 127.0.0.1 (tests/otlp_receiver.py), which decodes it with
opentelemetry-proto. Failure modes: a closed port, a collector answering 500
and one that never answers. In each, the request-side calls return while the
export is failing or stuck, and every span that did not reach the collector
is counted as dropped, by reason.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from proxy.telemetry import (
    NOOP_REQUEST,
    NOOP_STAGE,
    DropReason,
    Stage,
    Telemetry,
    TelemetryConfig,
    now_ns,
)
from tests.otlp_receiver import Span, otlp_receiver

SERVER, CLIENT, INTERNAL = 2, 3, 1  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2
STAGES = (Stage.AUTHENTICATE, Stage.ADMISSION, Stage.POLICY, Stage.AUDIT_COMMIT, Stage.UPSTREAM)


class DropWatch:
    """The ``on_dropped`` hook: counts by reason, wakes waiters on the test's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.counts: Counter[DropReason] = Counter()
        self._changed = asyncio.Event()

    def __call__(self, reason: DropReason, count: int) -> None:  # any thread
        self.loop.call_soon_threadsafe(self._bump, reason, count)

    def _bump(self, reason: DropReason, count: int) -> None:
        self.counts[reason] += count
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


def config(endpoint: str | None, **kw: Any) -> TelemetryConfig:
    base: dict[str, Any] = {"schedule_delay_s": 0.05, "export_timeout_s": 2.0,
                            "shutdown_timeout_s": 2.0}
    base.update(kw)
    return TelemetryConfig(otlp_endpoint=endpoint, **base)


def tid() -> str:
    return secrets.token_hex(16)


def one_request(tel: Telemetry, trace_id: str, parent: str | None = None,
                stages: tuple[Stage, ...] = STAGES, **end: Any) -> None:
    req = tel.start_request(trace_id, parent, "proxy", method="POST")
    for stage in stages:
        with req.stage(stage):
            pass
    req.end(**{"status": 200, "decision": "ALLOW", **end})


def by_trace(spans: list[Span], trace_id: str) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def server_of(spans: list[Span]) -> Span:
    (server,) = [s for s in spans if s.kind == SERVER]
    return server


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port bound on 127.0.0.1 but not listening: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def batch_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("OtelBatch"))


# ------------------------------------------------------------------ off


async def test_off_when_no_endpoint_and_every_call_is_a_no_op() -> None:
    before = batch_threads()
    tel = Telemetry(TelemetryConfig())
    assert not tel.enabled
    assert batch_threads() == before  # no export thread
    req = tel.start_request(tid(), secrets.token_hex(8), "proxy", method="GET")
    assert req is NOOP_REQUEST and not req.recording
    stage = req.stage(Stage.UPSTREAM)
    assert stage is NOOP_STAGE
    with stage as s:
        assert s.traceparent() is None
    req.stage_done(Stage.POLICY, now_ns(), now_ns())
    req.end(status=403, decision="DENY", reason_codes=["Mode_ReadOnly_NoWrite"])
    await tel.aclose()
    assert tel.spans_dropped == 0 and tel.spans_exported == 0


# ------------------------------------------------------------------ spans


async def test_spans_carry_the_envelope_trace_id_parent_links_and_attributes() -> None:
    async with otlp_receiver() as rx:
        tel = Telemetry(config(rx.endpoint), service_version="9.9.9", instance_id="pod-a")
        assert tel.enabled
        # 1: the caller sent a traceparent
        t1, parent = tid(), secrets.token_hex(8)
        req = tel.start_request(t1, parent, "proxy", method="POST")
        assert req.recording
        for stage in STAGES[:-1]:
            with req.stage(stage):
                pass
        with req.stage(Stage.UPSTREAM) as up:
            sent_upstream = up.traceparent()
        req.end(status=201, decision="ALLOW", tool="cliniccloud.create_appointment",
                effect="write", mode="ALLOW", via="proxy")
        # 2: no traceparent, a deny, a stage timed by the caller
        t2 = tid()
        req2 = tel.start_request(t2, None, "verify", method="POST")
        start = now_ns()
        end = start + 1_234_567
        req2.stage_done(Stage.POLICY, start, end)
        req2.end(status=403, decision="DENY", tool="cliniccloud.send_sms", effect="write",
                 mode="READ_ONLY", reason_codes=["Mode_ReadOnly_NoWrite", "Inv_NoSmsBurst"],
                 via="verify")
        await rx.wait_for(lambda: len(rx.spans) >= 8)
        await tel.aclose()

    spans1 = by_trace(rx.spans, t1)
    server = server_of(spans1)
    assert (server.name, server.parent_span_id) == ("proxy", parent)
    children = [s for s in spans1 if s is not server]
    assert [c.name for c in sorted(children, key=lambda c: c.start_ns)] == [
        "authenticate", "admission", "policy", "audit commit", "upstream"]
    for child in children:
        assert child.parent_span_id == server.span_id
        assert child.kind == (CLIENT if child.name == "upstream" else INTERNAL)
        assert server.start_ns <= child.start_ns <= child.end_ns <= server.end_ns
    (upstream,) = [c for c in children if c.name == "upstream"]
    assert sent_upstream == f"00-{t1}-{upstream.span_id}-01"
    # exactly the allow-listed attributes: no path, query, header or body value
    assert server.attributes == {
        "http.request.method": "POST", "http.response.status_code": 201,
        "casf.decision": "ALLOW", "casf.tool": "cliniccloud.create_appointment",
        "casf.effect": "write", "casf.mode": "ALLOW", "casf.via": "proxy"}
    assert server.resource == {"service.name": "casf-proxy", "service.version": "9.9.9",
                               "service.instance.id": "pod-a"}
    assert server.status_code != STATUS_ERROR

    spans2 = by_trace(rx.spans, t2)
    server2 = server_of(spans2)
    assert server2.parent_span_id == ""  # a root: trace id taken from the envelope
    (policy,) = [s for s in spans2 if s is not server2]
    assert (policy.name, policy.parent_span_id) == ("policy", server2.span_id)
    assert (policy.start_ns, policy.end_ns) == (start, end)
    assert server2.attributes["casf.reason_codes"] == ["Mode_ReadOnly_NoWrite",
                                                      "Inv_NoSmsBurst"]
    assert server2.attributes["http.response.status_code"] == 403
    assert len(rx.spans) == 8
    assert tel.spans_exported == 8 and tel.spans_dropped == 0


async def test_a_failing_stage_and_a_5xx_mark_errors_without_the_message() -> None:
    async with otlp_receiver() as rx:
        tel = Telemetry(config(rx.endpoint))
        t = tid()
        req = tel.start_request(t, None, "proxy")
        with pytest.raises(ConnectionResetError), req.stage(Stage.UPSTREAM):
            raise ConnectionResetError("patient-4711 secret-token")
        req.end(status=502, decision="ALLOW", reason_codes=["Upstream_Unavailable"])
        await tel.aclose()
    upstream = next(s for s in rx.spans if s.name == "upstream")
    assert upstream.status_code == STATUS_ERROR
    assert server_of(rx.spans).status_code == STATUS_ERROR
    body = b"".join(rx.bodies)
    assert b"ConnectionResetError" in body
    assert b"patient-4711" not in body and b"secret-token" not in body


async def test_sampling_follows_the_callers_flag_and_the_ratio() -> None:
    async with otlp_receiver() as rx:
        tel = Telemetry(config(rx.endpoint, sample_ratio=0.0))
        # no traceparent and ratio 0: not sampled, nothing recorded
        assert tel.start_request(tid(), None, "proxy") is NOOP_REQUEST
        # the caller said "not sampled"
        assert tel.start_request(tid(), secrets.token_hex(8), "proxy",
                                 parent_sampled=False) is NOOP_REQUEST
        # the caller said "sampled": recorded whatever the ratio
        t = tid()
        one_request(tel, t, secrets.token_hex(8), stages=(Stage.POLICY,))
        await tel.aclose()  # flushes
    assert {s.trace_id for s in rx.spans} == {t} and len(rx.spans) == 2


async def test_malformed_ids_never_fail_the_request() -> None:
    async with otlp_receiver() as rx:
        tel = Telemetry(config(rx.endpoint))
        req = tel.start_request("not-hex" * 5, "zz" * 8, "proxy")
        assert req.recording  # a fresh random trace id, no parent
        req.end(status=400, decision="DENY")
        await tel.aclose()
    (server,) = rx.spans
    assert len(server.trace_id) == 32 and int(server.trace_id, 16) and not server.parent_span_id


async def test_shutdown_flushes_what_is_queued() -> None:
    async with otlp_receiver() as rx:
        # the periodic export would come only after 60 s: shutdown must flush
        tel = Telemetry(config(rx.endpoint, schedule_delay_s=60.0))
        traces = [tid() for _ in range(5)]
        for t in traces:
            one_request(tel, t, stages=(Stage.AUTHENTICATE,))
        assert rx.requests == 0 and tel.spans_queued == 10
        await tel.aclose()
        assert not tel.enabled
        assert tel.start_request(tid(), None, "proxy") is NOOP_REQUEST  # closed
    assert {s.trace_id for s in rx.spans} == set(traces) and len(rx.spans) == 10
    assert tel.spans_dropped == 0


# ------------------------------------------------------------------ a broken collector


async def test_dead_collector_costs_only_counted_drops(closed_port: int) -> None:
    watch = DropWatch()
    # no periodic export for 60 s: the calls below can only queue
    tel = Telemetry(config(f"http://127.0.0.1:{closed_port}", export_timeout_s=0.5,
                           schedule_delay_s=60.0), on_dropped=watch)
    for _ in range(20):
        one_request(tel, tid(), stages=(Stage.POLICY,))
    # nothing was exported (or failed) on the caller's side
    assert tel.spans_queued == 40 and tel.spans_dropped == 0
    await tel.aclose()  # the flush at shutdown fails: every span counted
    await watch.wait_for(lambda: watch.counts[DropReason.EXPORT_FAILED] == 40)
    assert tel.dropped_by_reason() == {DropReason.EXPORT_FAILED: 40,
                                       DropReason.QUEUE_FULL: 0, DropReason.SHUTDOWN: 0}
    assert tel.spans_dropped == 40 and tel.spans_exported == 0
    assert watch.counts == Counter({DropReason.EXPORT_FAILED: 40})


async def test_collector_answering_500_costs_only_counted_drops() -> None:
    watch = DropWatch()
    async with otlp_receiver("error") as rx:
        tel = Telemetry(config(rx.endpoint), on_dropped=watch)
        for _ in range(10):
            one_request(tel, tid(), stages=(Stage.POLICY, Stage.UPSTREAM))
        await watch.wait_for(lambda: watch.counts[DropReason.EXPORT_FAILED] == 30)
        assert len(rx.refused) == 30 and not rx.spans  # it got them, and said no
        # it recovers: later spans are delivered
        rx.mode = "ok"
        t = tid()
        one_request(tel, t, stages=())
        await rx.wait_for(lambda: bool(rx.spans))
        await tel.aclose()
    assert [s.trace_id for s in rx.spans] == [t]
    assert tel.spans_dropped == 30 and tel.spans_exported == 1


async def test_hanging_collector_never_blocks_requests_and_shutdown_is_bounded() -> None:
    watch = DropWatch()
    async with otlp_receiver("hang") as rx:
        tel = Telemetry(config(rx.endpoint, max_queue_size=8, max_export_batch_size=4,
                               export_timeout_s=60.0, shutdown_timeout_s=0.5),
                        on_dropped=watch)
        one_request(tel, tid(), stages=STAGES[:3])  # 4 spans: one full batch
        await rx.wait_for(lambda: rx.hanging == 1)  # the export thread is stuck in it
        # 25 requests (100 spans) while the export hangs for up to 60 s: had any
        # call waited on the export, the hanging request would be over by now
        for _ in range(25):
            one_request(tel, tid(), stages=STAGES[:3])
        assert rx.hanging == 1 and watch.counts[DropReason.EXPORT_FAILED] == 0
        # the queue holds 8; the other 92 were dropped (oldest first), and counted
        assert tel.spans_queued == 8
        assert tel.dropped_by_reason()[DropReason.QUEUE_FULL] == 92
        # shutdown gives up after its bound, with the collector still hanging
        await asyncio.wait_for(tel.aclose(), timeout=30)
        assert rx.hanging == 1
        assert tel.dropped_by_reason()[DropReason.SHUTDOWN] == 8
        # spans ended after shutdown are dropped too (and counted), never queued
        one_request(tel, tid(), stages=())
        rx.release()  # the stuck batch now fails: its 4 spans are counted as well
        await watch.wait_for(lambda: watch.counts[DropReason.EXPORT_FAILED] == 4)
    assert tel.spans_exported == 0 and not rx.spans
    assert tel.spans_dropped == 104 == sum(watch.counts.values())


def test_config_is_checked_and_names_the_key() -> None:
    for bad, key in ((dict(otlp_endpoint="ftp://collector:4318"), "otlp_endpoint"),
                     (dict(otlp_endpoint="http://user:pw@collector:4318"), "otlp_endpoint"),
                     (dict(otlp_endpoint="http://collector:4318/?x=1"), "otlp_endpoint"),
                     (dict(sample_ratio=1.5), "sample_ratio"),
                     (dict(max_queue_size=0), "max_queue_size"),
                     (dict(max_queue_size=10, max_export_batch_size=11),
                      "max_export_batch_size"),
                     (dict(export_timeout_s=0), "export_timeout_ms"),
                     (dict(service_name=""), "service_name")):
        with pytest.raises(ValueError, match=f"telemetry.{key}:"):
            TelemetryConfig(**bad)
    assert TelemetryConfig().traces_url is None
    assert TelemetryConfig(otlp_endpoint="http://c:4318").traces_url == "http://c:4318/v1/traces"
    assert TelemetryConfig(otlp_endpoint="https://c/otlp/").traces_url == (
        "https://c/otlp/v1/traces")
    assert TelemetryConfig(otlp_endpoint="http://c:4318/v1/traces").traces_url == (
        "http://c:4318/v1/traces")
    assert TelemetryConfig(headers={"x-api-key": "k"}).headers["x-api-key"] == "k"

