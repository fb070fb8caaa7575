"""The approval metrics, registered on the product's registry (``Metrics.registry``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.approvals.records import ACTIONS

NOTIFY_RESULTS = ("delivered", "failed", "dropped")


class ApprovalMetrics:
    """``casf_approvals_total{action}``, ``casf_approvals_pending`` and the webhook's
    ``casf_approval_notifications_total{result}`` (delivered | failed | dropped)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter("casf_approvals_total", "Approval transitions, by action",
                             ["action"], registry=registry)
        for action in ACTIONS:
            self.total.labels(action)
        self.pending = Gauge("casf_approvals_pending", "Approvals waiting for an approver",
                             registry=registry, multiprocess_mode="livemax")
        self.notifications = Counter("casf_approval_notifications_total",
                                     "Webhook notifications of new approvals, by result",
                                     ["result"], registry=registry)
        for result in NOTIFY_RESULTS:
            self.notifications.labels(result)
