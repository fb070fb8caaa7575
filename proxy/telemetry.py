"""OpenTelemetry traces over OTLP/HTTP: one server span per request, one child per stage.

Off unless an OTLP endpoint is configured (``telemetry.otlp_endpoint``, or
``OTEL_EXPORTER_OTLP_ENDPOINT`` read by :mod:`proxy.settings`); then every
call here is a no-op on shared singletons and no thread is started.

On, the spans of a request carry the envelope's ``trace_id`` as their trace
id, so a trace found by the ``X-Casf-Trace-Id`` a client got back is the
trace of that request; when the caller sent ``traceparent``, its span id is
the server span's parent. Attributes are an allow-list (tool, effect, mode,
decision, status, reason codes, the front door, the HTTP method): no path,
query, header or body value reaches a span, so neither credentials nor
request data are exported.

Export never blocks or fails a request. Ended spans go into a bounded
in-memory queue (the SDK's batch processor); a background thread sends
batches with a bounded timeout. A collector that is down, slow or answers
errors costs only dropped spans, each counted by reason
(:class:`DropReason`) in :attr:`Telemetry.spans_dropped` and reported to the
``on_dropped`` callback (the ``casf_telemetry_spans_dropped_total{reason}``
counter). Shutdown flushes what it can within ``shutdown_timeout_s`` and
counts the rest as dropped.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType, TracebackType
from typing import Final
from urllib.parse import urlsplit

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._shared_internal import BatchProcessor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

DEFAULT_SERVICE_NAME: Final = "casf-proxy"
TRACES_PATH: Final = "/v1/traces"


class Stage(StrEnum):
    """The child spans of a request, named as operators see them."""

    AUTHENTICATE = "authenticate"
    ADMISSION = "admission"
    POLICY = "policy"
    AUDIT_COMMIT = "audit commit"
    UPSTREAM = "upstream"


class DropReason(StrEnum):
    """Why a span was not delivered (the ``reason`` label of the drop counter)."""

    QUEUE_FULL = "queue_full"  # the bounded queue was full: the oldest span went
    EXPORT_FAILED = "export_failed"  # the collector refused, errored or timed out
    SHUTDOWN = "shutdown"  # still queued when the shutdown bound ran out, or ended after


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    """The ``telemetry:`` section (YAML ``*_ms`` keys as ``*_s`` seconds here).

    ``otlp_endpoint`` None (the default) turns tracing off.

    ``otlp_endpoint`` is the collector's OTLP/HTTP base URL, as in
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://collector:4318``); spans are
    posted to ``<base>/v1/traces``. A URL that already ends in ``/v1/traces``
    is used as it is.
    """

    otlp_endpoint: str | None = None
    service_name: str = DEFAULT_SERVICE_NAME
    # Sampling of requests that arrive without a traceparent; with one, the
    # caller's sampled flag decides.
    sample_ratio: float = 1.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    schedule_delay_s: float = 1.0
    export_timeout_s: float = 5.0  # one batch, retries included
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        problems = list(self.problems())
        if problems:
            raise ValueError("; ".join(f"telemetry.{key}: {msg}" for key, msg in problems))
        object.__setattr__(self, "headers", MappingProxyType(dict(self.headers)))

    def problems(self) -> Iterable[tuple[str, str]]:
        """(key, problem) for every invalid value."""
        if self.otlp_endpoint is not None:
            parts = urlsplit(self.otlp_endpoint)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                yield "otlp_endpoint", "must be an http:// or https:// URL"
            elif parts.username is not None or parts.password is not None:
                yield "otlp_endpoint", "must not carry credentials (use telemetry.headers)"
            elif parts.query or parts.fragment:
                yield "otlp_endpoint", "must not have a query or fragment"
        if not self.service_name:
            yield "service_name", "must not be empty"
        if not 0.0 <= self.sample_ratio <= 1.0:
            yield "sample_ratio", "must be between 0 and 1"
        if self.max_queue_size < 1:
            yield "max_queue_size", "must be at least 1"
        if not 1 <= self.max_export_batch_size <= self.max_queue_size:
            yield "max_export_batch_size", "must be between 1 and max_queue_size"
        for name in ("schedule_delay_s", "export_timeout_s", "shutdown_timeout_s"):
            if not 0.0 < getattr(self, name) <= 300.0:
                # named as in the YAML, where durations are milliseconds
                yield name.removesuffix("_s") + "_ms", "must be more than 0 and at most 300000"

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None

    @property
    def traces_url(self) -> str | None:
        if self.otlp_endpoint is None:
            return None
        base = self.otlp_endpoint.rstrip("/")
        return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


DropCallback = Callable[[DropReason, int], None]


class _Drops:
    """Thread-safe drop counts (the export thread and the event loop both add)."""

    def __init__(self, on_dropped: DropCallback | None) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(DropReason, 0)
        self._on_dropped = on_dropped

    def add(self, reason: DropReason, count: int) -> None:
        if count <= 0:
            return
        with self._lock:
            self._counts[reason] += count
        if self._on_dropped is not None:
            try:
                self._on_dropped(reason, count)
            except Exception:  # noqa: S110 - a broken metric hook must not break tracing
                pass

    def snapshot(self) -> dict[DropReason, int]:
        with self._lock:
            return dict(self._counts)


class _CountingExporter(SpanExporter):
    """Counts every span of a batch the collector did not take as dropped."""

    def __init__(self, inner: SpanExporter, drops: _Drops) -> None:
        self._inner = inner
        self._drops = drops
        self.exported = 0  # spans the collector accepted (only the export thread writes)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self._drops.add(DropReason.EXPORT_FAILED, len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class _QueueAccounting:
    """The batch processor's metrics hook: where the SDK reports queue drops."""

    def __init__(self, drops: _Drops) -> None:
        self._drops = drops
        self.queue_size: Callable[[], int] = lambda: 0

    def register_queue_size(self, get_queue_size: Callable[[], int]) -> None:
        self.queue_size = get_queue_size

    def drop_items(self, count: int, error_type: str = "queue_full") -> None:
        reason = DropReason.SHUTDOWN if error_type == "already_shutdown" else DropReason.QUEUE_FULL
        self._drops.add(reason, count)

    def finish_items(self, count: int) -> None:
        pass


class _BoundedBatchProcessor(SpanProcessor):
    """The SDK's batching engine with a bounded queue, visible drops and a shutdown bound.

    (``BatchSpanProcessor`` wraps the same engine but neither reports drops
    without the SDK's own metrics pipeline nor bounds its shutdown.) The
    engine lives in an internal module of the pinned SDK:
    tests/test_telemetry.py fails if its behaviour changes.
    """

    def __init__(self, exporter: SpanExporter, cfg: TelemetryConfig, drops: _Drops) -> None:
        self._drops = drops
        self._accounting = _QueueAccounting(drops)
        self._shutdown_ms = int(cfg.shutdown_timeout_s * 1000)
        self._batch: BatchProcessor[ReadableSpan] = BatchProcessor(
            exporter,
            schedule_delay_millis=cfg.schedule_delay_s * 1000,
            max_export_batch_size=cfg.max_export_batch_size,
            export_timeout_millis=cfg.export_timeout_s * 1000,
            max_queue_size=cfg.max_queue_size,
            exporting="Span",
            metrics=self._accounting,
        )
        self._closed = False

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is not None and span.context.trace_flags.sampled:
            self._batch.emit(span)  # an append to a bounded deque: never waits

    @property
    def queued(self) -> int:
        return self._accounting.queue_size()

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._batch.shutdown(timeout_millis=self._shutdown_ms)
        # What the export thread did not get to within the bound is lost.
        self._drops.add(DropReason.SHUTDOWN, self.queued)

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._batch.force_flush(timeout_millis)


# The trace id the next root span takes: set around start_span only.
_NEXT_TRACE_ID: contextvars.ContextVar[int] = contextvars.ContextVar("casf_trace_id",
                                                                      default=0)


class _EnvelopeTraceIds(RandomIdGenerator):
    """Root spans take the request's envelope trace id instead of a random one."""

    def generate_trace_id(self) -> int:
        wanted = _NEXT_TRACE_ID.get()
        return wanted if wanted else super().generate_trace_id()


def _hex_id(value: str | None, digits: int) -> int:
    """A W3C id as an int, 0 when absent or malformed (all zeros is invalid too)."""
    if value is None or len(value) != digits:
        return 0
    try:
        return int(value, 16)
    except ValueError:
        return 0


def _traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


class StageSpan:
    """One stage of a request; a context manager (see :meth:`RequestSpan.stage`)."""

    __slots__ = ("_kind", "_name", "_parent", "_span", "_tracer")

    def __init__(self, tracer: trace.Tracer, parent: otel_context.Context, name: Stage,
                 kind: SpanKind) -> None:
        self._tracer = tracer
        self._parent = parent
        self._name = name
        self._kind = kind
        self._span: trace.Span | None = None

    def __enter__(self) -> StageSpan:
        try:
            self._span = self._tracer.start_span(self._name, context=self._parent,
                                                 kind=self._kind, record_exception=False)
        except Exception:
            self._span = None
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        span, self._span = self._span, None
        if span is None:
            return
        try:
            if exc_type is not None:
                # the type only: an exception's message may quote request data
                span.set_status(Status(StatusCode.ERROR, exc_type.__name__))
            span.end()
        except Exception:  # noqa: S110 - tracing never fails a request
            pass

    def traceparent(self) -> str | None:
        """The ``traceparent`` to send on, naming this stage span (upstream calls)."""
        if self._span is None:
            return None
        return _traceparent(self._span.get_span_context())


class RequestSpan:
    """The server span of one request and the parent of its stage spans."""

    __slots__ = ("_ctx", "_span", "_tracer")

    def __init__(self, tracer: trace.Tracer, span: trace.Span) -> None:
        self._tracer = tracer
        self._span = span
        self._ctx = trace.set_span_in_context(span, otel_context.Context())

    @property
    def recording(self) -> bool:
        return True

    @property
    def span_id(self) -> str:
        return f"{self._span.get_span_context().span_id:016x}"

    def stage(self, name: Stage) -> StageSpan:
        """``with req.stage(Stage.POLICY): ...`` times the block as a child span."""
        kind = SpanKind.CLIENT if name == Stage.UPSTREAM else SpanKind.INTERNAL
        return StageSpan(self._tracer, self._ctx, name, kind)

    def stage_done(self, name: Stage, start_ns: int, end_ns: int, *,
                   failed: bool = False) -> None:
        """Record a stage already timed (``time.time_ns()`` at its start and end)."""
        try:
            kind = SpanKind.CLIENT if name == Stage.UPSTREAM else SpanKind.INTERNAL
            span = self._tracer.start_span(name, context=self._ctx, kind=kind,
                                           start_time=start_ns)
            if failed:
                span.set_status(Status(StatusCode.ERROR))
            span.end(end_time=end_ns)
        except Exception:  # noqa: S110 - tracing never fails a request
            pass

    def end(self, *, status: int, decision: str | None = None, tool: str | None = None,
            effect: str | None = None, mode: str | None = None,
            reason_codes: Sequence[str] = (), via: str | None = None) -> None:
        """End the server span with the request's outcome (allow-listed attributes)."""
        try:
            span = self._span
            span.set_attribute("http.response.status_code", status)
            if decision is not None:
                span.set_attribute("casf.decision", decision)
            if tool is not None:
                span.set_attribute("casf.tool", tool)
            if effect is not None:
                span.set_attribute("casf.effect", effect)
            if mode is not None:
                span.set_attribute("casf.mode", mode)
            if reason_codes:
                span.set_attribute("casf.reason_codes", [str(c) for c in reason_codes])
            if via is not None:
                span.set_attribute("casf.via", via)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
        except Exception:  # noqa: S110 - tracing never fails a request
            pass


class _NoopStage(StageSpan):
    __slots__ = ()

    def __init__(self) -> None:
        pass

    def __enter__(self) -> StageSpan:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        return None

    def traceparent(self) -> str | None:
        return None


class _NoopRequest(RequestSpan):
    """What every call returns when tracing is off or the request is not sampled."""

    __slots__ = ()

    def __init__(self) -> None:
        pass

    @property
    def recording(self) -> bool:
        return False

    @property
    def span_id(self) -> str:
        return ""

    def stage(self, name: Stage) -> StageSpan:
        return NOOP_STAGE

    def stage_done(self, name: Stage, start_ns: int, end_ns: int, *,
                   failed: bool = False) -> None:
        return None

    def end(self, *, status: int, decision: str | None = None, tool: str | None = None,
            effect: str | None = None, mode: str | None = None,
            reason_codes: Sequence[str] = (), via: str | None = None) -> None:
        return None


NOOP_STAGE: Final[StageSpan] = _NoopStage()
NOOP_REQUEST: Final[RequestSpan] = _NoopRequest()


class Telemetry:
    """The process's tracer: built once from :class:`TelemetryConfig`, closed at shutdown.

    Usage in a front door::

        req = tel.start_request(trace_id, parent_span_id, "proxy", method="POST")
        with req.stage(Stage.POLICY):
            ...
        req.end(status=403, decision="DENY", tool=tool, effect="write",
                reason_codes=codes)

    ``on_dropped(reason, n)`` is called (from the event loop or the export
    thread) for every span that will never reach the collector.
    """

    def __init__(self, cfg: TelemetryConfig, *, service_version: str | None = None,
                 instance_id: str | None = None,
                 on_dropped: DropCallback | None = None) -> None:
        self.config = cfg
        self._drops = _Drops(on_dropped)
        self._closed = False
        self._provider: TracerProvider | None = None
        self._processor: _BoundedBatchProcessor | None = None
        self._exporter: _CountingExporter | None = None
        if cfg.traces_url is None:
            return
        attrs: dict[str, str] = {"service.name": cfg.service_name}
        if service_version:
            attrs["service.version"] = service_version
        if instance_id:
            attrs["service.instance.id"] = instance_id
        inner = OTLPSpanExporter(endpoint=cfg.traces_url, headers=dict(cfg.headers),
                                 timeout=cfg.export_timeout_s)
        self._exporter = _CountingExporter(inner, self._drops)
        self._processor = _BoundedBatchProcessor(self._exporter, cfg, self._drops)
        self._provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
            resource=Resource(attrs),
            shutdown_on_exit=False,
            id_generator=_EnvelopeTraceIds(),
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("casf-proxy", service_version)

    @property
    def enabled(self) -> bool:
        return self._provider is not None and not self._closed

    def start_request(self, trace_id: str, parent_span_id: str | None, name: str, *,
                      parent_sampled: bool = True, method: str | None = None) -> RequestSpan:
        """Open the server span of a request whose envelope ``trace_id`` is given.

        ``parent_span_id`` (16 hex digits) and ``parent_sampled`` come from the
        caller's ``traceparent``; None when it sent none.
        """
        if self._provider is None or self._closed:
            return NOOP_REQUEST
        try:
            tid = _hex_id(trace_id, 32)
            parent = _hex_id(parent_span_id, 16)
            if parent and tid:
                flags = TraceFlags(TraceFlags.SAMPLED if parent_sampled else TraceFlags.DEFAULT)
                remote = SpanContext(tid, parent, is_remote=True, trace_flags=flags)
                ctx = trace.set_span_in_context(NonRecordingSpan(remote),
                                                otel_context.Context())
                span = self._tracer.start_span(name, context=ctx, kind=SpanKind.SERVER)
            else:
                token = _NEXT_TRACE_ID.set(tid)
                try:
                    span = self._tracer.start_span(name, context=otel_context.Context(),
                                                   kind=SpanKind.SERVER)
                finally:
                    _NEXT_TRACE_ID.reset(token)
            if not span.is_recording():
                return NOOP_REQUEST
            if method is not None:
                span.set_attribute("http.request.method", method)
            return RequestSpan(self._tracer, span)
        except Exception:
            return NOOP_REQUEST

    # ----------------------------------------------------------- accounting

    @property
    def spans_dropped(self) -> int:
        return sum(self._drops.snapshot().values())

    def dropped_by_reason(self) -> dict[DropReason, int]:
        return self._drops.snapshot()

    @property
    def spans_exported(self) -> int:
        return self._exporter.exported if self._exporter is not None else 0

    @property
    def spans_queued(self) -> int:
        return self._processor.queued if self._processor is not None else 0

    # ----------------------------------------------------------- lifecycle

    def shutdown(self) -> None:
        """Flush within ``shutdown_timeout_s`` and stop (blocking: see :meth:`aclose`)."""
        if self._provider is None or self._closed:
            return
        self._closed = True
        self._provider.shutdown()

    async def aclose(self) -> None:
        """:meth:`shutdown` off the event loop, for the app's cleanup."""
        if self._provider is None or self._closed:
            return
        await asyncio.to_thread(self.shutdown)


def now_ns() -> int:
    """The clock :meth:`RequestSpan.stage_done` expects."""
    return time.time_ns()
