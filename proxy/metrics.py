"""Prometheus metrics (stable ``casf_*`` names, docs/operations.md) on a per-app registry.

With ``casf-proxy run --workers N`` every worker runs with
``PROMETHEUS_MULTIPROC_DIR`` set (prometheus_client's multiprocess mode): the
values live in memory-mapped files in that directory, and :func:`exposition`
merges every worker's files, so ``/metrics`` on any worker shows the totals
(docs/operations.md, workers).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0)


class Metrics:
    """All metrics of one proxy instance (no module-level registry)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("casf_requests_total",
                                "Requests by tool, decision and the HTTP status the client got",
                                ["tool", "decision", "status"], registry=r)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self.duration = Histogram("casf_request_duration_seconds",
                                  "Time from request to response headers",
                                  buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("casf_in_flight", "Requests being processed", registry=r,
                               multiprocess_mode="livesum")
        self.fail_closed = Counter("casf_fail_closed_total", "Fail-closed denials by trigger",
                                   ["trigger"], registry=r)
        self.replay_hit = Counter("casf_replay_hit_total", "Replayed outcomes", registry=r)
        self.replay_mismatch = Counter("casf_replay_mismatch_total",
                                       "Request ids reused with another payload", registry=r)
        self.replay_evicted = Counter("casf_replay_evicted_total",
                                      "Stored outcomes dropped by the embedded store's "
                                      "memory budget before their TTL", registry=r)
        self.rate_limited = Counter("casf_rate_limited_total", "Rate-limited requests",
                                    registry=r)
        self.budget_warning = Counter("casf_budget_warning_total",
                                      "Requests admitted past a budget's warning share",
                                      ["budget"], registry=r)
        self.budget_exceeded = Counter("casf_budget_exceeded_total",
                                       "Requests refused by an exhausted budget", ["budget"],
                                       registry=r)
        self.shadow_denied = Counter("casf_shadow_denied_total",
                                     "Requests shadow mode would have denied", registry=r)
        self.audit_events = Counter("casf_audit_events_total", "Audit records committed",
                                    ["kind"], registry=r)
        self.audit_errors = Counter("casf_audit_errors_total", "Audit appends that failed",
                                    registry=r)
        self.audit_queue_full = Counter("casf_audit_queue_full_total",
                                        "Audit records refused because the writer queue was "
                                        "full (audit.queue_max)", registry=r)
        self.audit_spooled = Counter("casf_audit_spooled_total",
                                     "Queued audit records whose batch failed, kept in the "
                                     "local spool until the store commits again", registry=r)
        for trigger in ("redis", "opa", "audit"):
            self.fail_closed.labels(trigger)  # present (at 0) before the first event
        # identity (docs/identity.md) and the external OPA adapter (proxy/policy_opa.py)
        self.opa_errors = Counter("casf_opa_error_total",
                                  "External OPA calls that failed, by kind", ["kind"],
                                  registry=r)
        for kind in ("timeout", "unavailable", "bad_status", "bad_response"):
            self.opa_errors.labels(kind)
        self.identity_reload = Counter("casf_identity_reload_total",
                                       "Reloads of API keys and JWKS fetches, by result",
                                       ["source", "result"], registry=r)
        self.upstream_duration = Histogram("casf_upstream_duration_seconds",
                                           "Upstream time to response headers",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        # hot reload (docs/operations.md): result is "success" or "error"; the info
        # gauge is 1 for the hash of the config (and policy bundle) in force
        self.config_reload = Counter("casf_config_reload_total",
                                     "Config reloads (SIGHUP or file change), by result",
                                     ["result"], registry=r)
        for result in ("success", "error", "unchanged"):
            self.config_reload.labels(result)
        # completed file-watch poll cycles (each interval_ms, also with watch: false,
        # when a cycle checks nothing): a test or an operator can tell "the watcher
        # looked and saw no change" from "the watcher has not looked yet"
        self.config_watch_cycles = Counter("casf_config_watch_cycles_total",
                                           "Completed config file-watch poll cycles",
                                           registry=r)
        self.config_info = Gauge("casf_config_info", "1 for the active config hash",
                                 ["hash"], registry=r, multiprocess_mode="livemax")
        self._config_hash: str | None = None
        # OpenTelemetry spans that never reached the collector (proxy.telemetry)
        self.spans_dropped = Counter("casf_telemetry_spans_dropped_total",
                                     "Trace spans dropped, by reason", ["reason"], registry=r)
        for reason in ("queue_full", "export_failed", "shutdown"):
            self.spans_dropped.labels(reason)
        # the operator mode: 1 for the mode in force on this replica, 0 for the others
        self.mode = Gauge("casf_mode", "1 for the current operator mode", ["mode"], registry=r,
                          multiprocess_mode="livemax")

    def count_request(self, tool: str, decision: str, status: int) -> None:
        """``casf_requests_total`` for what was sent; the label child is cached."""
        key = (tool, decision, status)
        child = self._request_children.get(key)
        if child is None:
            if len(self._request_children) > 10_000:  # tools x decisions x statuses: bounded
                self._request_children.clear()
            child = self._request_children[key] = self.requests.labels(tool, decision,
                                                                       str(status))
        child.inc()

    def set_mode(self, current: str, modes: Iterable[str]) -> None:
        for mode in modes:
            self.mode.labels(mode).set(1 if mode == current else 0)

    def set_config_hash(self, digest: str) -> None:
        """Make ``digest`` the only ``casf_config_info`` series at 1."""
        old, self._config_hash = self._config_hash, digest
        self.config_info.labels(digest).set(1)
        if old is not None and old != digest:
            self.config_info.labels(old).set(0)  # multiprocess files keep it: hidden at 0
            self.config_info.remove(old)


class _MergedWorkers:
    """Every worker's values (multiprocess mode), minus retired config hashes."""

    def __init__(self, path: str) -> None:
        self._collector = MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for family in self._collector.collect():  # type: ignore[no-untyped-call]
            if family.name == "casf_config_info":
                family.samples = [s for s in family.samples if s.value]
            yield family


def exposition(metrics: Metrics, multiproc_dir: str | None) -> bytes:
    """The ``/metrics`` body: this process's registry, or all workers' merged."""
    if multiproc_dir is None:
        return generate_latest(metrics.registry)
    registry = CollectorRegistry()
    registry.register(_MergedWorkers(multiproc_dir))
    return generate_latest(registry)
