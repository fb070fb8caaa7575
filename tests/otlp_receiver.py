"""A real OTLP/HTTP trace receiver for tests: an aiohttp server on 127.0.0.1.

``POST /v1/traces`` bodies are decoded with opentelemetry-proto's
``ExportTraceServiceRequest`` and every span is recorded as a :class:`Span`.
``mode`` says how the receiver answers:

- ``"ok"``: 200 with an empty ``ExportTraceServiceResponse`` (what a collector does);
- ``"error"``: 500 (not retried by OTLP exporters: the batch is lost);
- ``"hang"``: the request is read, counted in :attr:`OtlpReceiver.hanging`, and
  never answered; :meth:`release` (or :meth:`stop`) drops those connections.

Spans of answered-200 requests are :attr:`spans`; spans of requests answered
otherwise are :attr:`refused` (they never count as delivered). Tests wait on
:meth:`wait_for`, woken at every request, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

Mode = Literal["ok", "error", "hang"]


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status_code: int
    start_ns: int
    end_ns: int


@dataclass
class OtlpReceiver:
    mode: Mode = "ok"
    port: int = 0
    spans: list[Span] = field(default_factory=list)
    refused: list[Span] = field(default_factory=list)
    requests: int = 0
    hanging: int = 0
    bodies: list[bytes] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def endpoint(self) -> str:
        """The base URL (``OTEL_EXPORTER_OTLP_ENDPOINT`` style)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> OtlpReceiver:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        assert self._runner.addresses
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def release(self) -> None:
        """Drop every hanging request's connection (the exporter sees an error)."""
        self._release.set()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        decoded = ExportTraceServiceRequest.FromString(body)
        spans = [
            Span(trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                 parent_span_id=s.parent_span_id.hex(), name=s.name, kind=s.kind,
                 attributes={a.key: _value(a.value) for a in s.attributes},
                 resource={a.key: _value(a.value) for a in rs.resource.attributes},
                 status_code=s.status.code, start_ns=s.start_time_unix_nano,
                 end_ns=s.end_time_unix_nano)
            for rs in decoded.resource_spans for ss in rs.scope_spans for s in ss.spans]
        mode = self.mode
        async with self._changed:
            self.requests += 1
            self.bodies.append(body)
            if mode == "ok":
                self.spans.extend(spans)
            else:
                self.refused.extend(spans)
                if mode == "hang":
                    self.hanging += 1
            self._changed.notify_all()
        if mode == "ok":
            return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                                content_type="application/x-protobuf")
        if mode == "error":
            return web.Response(status=500, text="collector error")
        await self._release.wait()
        async with self._changed:
            self.hanging -= 1
            self._changed.notify_all()
        if request.transport is not None:
            request.transport.close()  # no answer at all: the connection just ends
        return web.Response(status=204)  # never sent: the connection is gone

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        """Until ``predicate()`` holds; re-checked at every request the receiver gets."""
        async with asyncio.timeout(timeout):
            async with self._changed:
                await self._changed.wait_for(predicate)


@contextlib.asynccontextmanager
async def otlp_receiver(mode: Mode = "ok") -> AsyncIterator[OtlpReceiver]:
    rx = await OtlpReceiver(mode=mode).start()
    try:
        yield rx
    finally:
        await rx.stop()
