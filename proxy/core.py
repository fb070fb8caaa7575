"""The decision core: stages 1-9 of the pipeline, for every front door.

    1 parse & bound (the pure checks) → 2 route → 3 authenticate → 4 attributes
    → 5 anti-replay → 6 invariants → 7 rate limits → 8 policy → 9 audit

A front door (``proxy.doors``) owns its connection: it reads and bounds the
body, builds an :class:`~proxy.model.Exchange` with :meth:`DecisionCore.exchange`,
and asks :meth:`DecisionCore.decide`. The answer is a :class:`Decision`:

* ``deny``: the verdict to answer with; its record is committed (or, when it
  could not be, the verdict is the 503 ``Audit_Unavailable`` refusal);
* ``replay``: a stored outcome for the same request id and fingerprint; its
  replay record is committed;
* ``allow``: the ALLOW decision record is committed; the door may now act
  (forward, or tell its data plane to).

A claim taken by the admission stage comes back as ``decision.claim`` (a
:class:`~proxy.claims.ClaimHandle`); the door completes, releases or
abandons it. The core holds no socket, no client session and no aiohttp
request: it is the same for the inline proxy, ``/verify``, the Envoy and
forward-auth doors and MCP.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.claims import ClaimHandle
from proxy.config import Config, RouteConfig
from proxy.metrics import Metrics
from proxy.model import ANONYMOUS_AUTH, Exchange, Principal, Verdict
from proxy.pathnorm import MalformedTarget, Target, split_target
from proxy.ports import AdmissionStore, AuditUnavailable, ModeStore, StoredOutcome
from proxy.reasons import Reason
from proxy.requestcheck import header_verdict, override_param_verdict
from proxy.routing import PASSTHROUGH_METHODS
from proxy.stages import Stage
from proxy.stages.approval import ApprovalGate
from proxy.stages.replay import client_request_id
from proxy.trail import AuditTrail

log = logging.getLogger("casf.access")
errlog = logging.getLogger("casf.pipeline")

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# trace and span ids need to be unique, not secret (they are echoed to the caller
# and sent upstream): a PRNG seeded from os.urandom, reseeded in a forked child,
# instead of a getrandom() system call per id
_IDS = random.Random()  # noqa: S311
os.register_at_fork(after_in_child=_IDS.seed)

_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
_ANONYMOUS = Principal("anonymous", "", None, ANONYMOUS_AUTH, "")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
NOT_MAPPED = Verdict("DENY", 403, (Reason.ROUTE_NOT_MAPPED,),
                     "no route maps this request to a tool", shadowable=False)
# stages traced as child spans of the request (the others are cheap and pure)
_SPANNED = frozenset({"authenticate", "admission", "policy"})
INTERNAL = Verdict("DENY", 500, (Reason.INTERNAL_ERROR,), "internal error", shadowable=False)


def _span_id() -> str:
    return f"{_IDS.getrandbits(64) or 1:016x}"  # all zeros is invalid (W3C)


def _trace_id() -> str:
    return f"{_IDS.getrandbits(128) or 1:032x}"


def caller_parent(headers: Mapping[str, str]) -> tuple[str | None, bool]:
    """The caller's span id and sampled flag from a valid ``traceparent`` (else None)."""
    m = _TRACEPARENT.match(headers.get("traceparent", "").strip().lower())
    if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
        return m.group(2), bool(int(m.group(3), 16) & 1)
    return None, True


def trace_context(headers: Mapping[str, str]) -> tuple[str, str]:
    """(trace_id, traceparent to forward) per W3C Trace Context.

    A valid caller ``traceparent`` keeps its trace id and flags; the proxy is a
    new span, so the upstream gets a new parent id. Absent or invalid: a new
    trace (sampled).
    """
    tp = headers.get("traceparent", "").strip().lower()
    m = _TRACEPARENT.match(tp)
    if m and m.group(1) != "0" * 32 and m.group(2) != "0" * 16:
        return m.group(1), f"00-{m.group(1)}-{_span_id()}-{m.group(3)}"
    trace_id = _trace_id()
    return trace_id, f"00-{trace_id}-{_span_id()}-01"


class Tracer(Protocol):
    """Starts a request's span (``proxy.telemetry.Telemetry``)."""

    def start_request(self, trace_id: str, parent_span_id: str | None, name: str, *,
                      parent_sampled: bool = True, method: str | None = None) -> Any: ...


@dataclass(slots=True)
class Decision:
    """What the core decided; see the module docstring."""

    kind: str  # deny | replay | allow
    verdict: Verdict | None = None  # deny: the answer
    outcome: StoredOutcome | None = None  # replay: the stored outcome
    reasons: tuple[str, ...] = ()  # allow: shadowed and degraded reasons on the record
    claim: ClaimHandle | None = None
    record: dict[str, Any] | None = None  # allow: the committed decision record

    @property
    def status(self) -> int:
        if self.verdict is not None:
            return self.verdict.status
        if self.outcome is not None:
            return self.outcome.status
        return 200

    @property
    def decision(self) -> str:
        return self.verdict.decision if self.verdict is not None else "ALLOW"


class DecisionCore:
    """One config generation's decision logic; shared by every front door."""

    def __init__(self, cfg: Config, stages: list[Stage], *, state: AdmissionStore,
                 mode: ModeStore, trail: AuditTrail, metrics: Metrics,
                 approvals: ApprovalGate | None = None, telemetry: Tracer | None = None
                 ) -> None:
        self.cfg = cfg
        self.stages = stages
        self.state = state
        self.mode = mode
        self.trail = trail
        self.metrics = metrics
        self.approvals = approvals
        self._policy = next((st for st in stages if st.name == "policy"), None)
        self.telemetry = telemetry

    @property
    def policy_hash(self) -> str:
        return self.trail.policy_hash

    # ------------------------------------------------------------ exchanges

    def exchange(self, door: str, method: str, headers: CIMultiDictProxy[str], *, peer: str,
                 scheme: str = "http", host: str = "") -> Exchange:
        """A new exchange: trace context, the operator mode, the request id."""
        trace_id, traceparent = trace_context(headers)
        ex = Exchange(method=method, target=Target("", ""), headers=headers, peer=peer,
                      scheme=scheme, host=host, trace_id=trace_id, traceparent=traceparent,
                      mode=self.mode.current(), door=door)
        # the caller's id when valid (validation errors are the replay stage's to report),
        # else a generated one, so every envelope and record names the request
        if not isinstance(client_request_id(ex, self.cfg.replay.request_id_headers), str):
            ex.request_id = self.trail.event_ids.next()
        if self.telemetry is not None:
            parent, sampled = caller_parent(headers)
            ex.span = self.telemetry.start_request(trace_id, parent, door,
                                                   parent_sampled=sampled, method=method)
        return ex

    # ------------------------------------------------------------ stage 1 (pure)

    def check_head(self, ex: Exchange, raw_headers: Iterable[tuple[bytes, bytes]],
                   raw_target: str) -> Verdict | None:
        """Header bytes, overrides and encodings; the target split and normalised."""
        verdict = header_verdict(raw_headers)
        if verdict is not None:
            return verdict
        try:
            ex.target = split_target(raw_target)
        except MalformedTarget as exc:
            return Verdict("DENY", 400, (Reason.MALFORMED_PATH,), str(exc), shadowable=False)
        if ex.target.query:
            return override_param_verdict(ex.target.query, None, b"")
        return None

    def take_body(self, ex: Exchange, body: bytes | None) -> Verdict | None:
        """The body as read and bounded by the door (``None``: no body reached it)."""
        if body is None:
            ex.body, ex.body_sha256 = b"", None
            return None
        ex.body = body
        ex.body_sha256 = hashlib.sha256(body).hexdigest() if body else _EMPTY_SHA256
        if not body:
            return None
        return override_param_verdict("", ex.headers.get("Content-Type"), body)

    # ------------------------------------------------------------ stages 2-9

    def route(self, ex: Exchange) -> RouteConfig | None:
        match = self.cfg.table.match(ex.method, ex.target.path)
        if match is None:
            return None
        ex.route, ex.params = match.value, dict(match.params)
        return ex.route

    def passthrough(self, ex: Exchange) -> bool:
        if ex.method not in PASSTHROUGH_METHODS:
            return False
        path = ex.target.path
        return any(path == prefix or (prefix.endswith("/") and path.startswith(prefix))
                   for prefix in self.cfg.passthrough)

    async def decide(self, ex: Exchange) -> Decision:
        """Stages 3-9 for an exchange whose route is set (``ex.route``)."""
        assert ex.route is not None
        for stage in self.stages:
            if stage.name in _SPANNED:
                with ex.span.stage(stage.name):
                    verdict = await stage.check(ex)
            else:
                verdict = await stage.check(ex)
            if verdict is None:
                continue
            if verdict.replay is not None:
                return await self._replay(ex, verdict.replay)
            if verdict.shadowable and not ex.route.enforce:
                ex.shadow.extend(verdict.reasons)
                if ex.principal is None:
                    ex.principal = _ANONYMOUS
                continue
            if verdict.decision == "NEEDS_APPROVAL" and self.approvals is not None:
                # the policy asks for a human: the approval to wait for, found or created
                answer = await self.approvals.needs(ex, verdict)
                if answer is None:  # approved: the policy decides again, seeing it
                    answer = await self._decide_again(ex)
                    if answer is None:
                        break
                verdict = answer
            return await self.deny(ex, verdict)
        # 9. the record names what shadow mode would have denied and which
        # dependency a fail-open route went on without
        return await self.allow(ex, (*ex.shadow, *ex.degraded))

    async def _decide_again(self, ex: Exchange) -> Verdict | None:
        assert self._policy is not None
        with ex.span.stage("policy"):
            verdict = await self._policy.check(ex)
        if verdict is not None and verdict.decision == "NEEDS_APPROVAL":
            # still asks for approval although it carries one: the policy does not
            # accept it for this request; say so rather than wait forever
            return Verdict("DENY", 403, (Reason.APPROVAL_NOT_ACCEPTED, *verdict.reasons[1:]),
                           "the policy does not accept the approval for this request",
                           shadowable=False)
        return verdict

    async def deny(self, ex: Exchange, verdict: Verdict) -> Decision:
        """Record a deny; when it cannot be committed, the answer is the 503 refusal."""
        claim = self._claim(ex)
        if verdict.fail_closed_trigger is not None:
            self.metrics.fail_closed.labels(verdict.fail_closed_trigger).inc()
        reasons = (*verdict.reasons, *ex.extra_reasons)
        try:
            await self.trail.record(ex, "decision", verdict.decision, verdict.status, reasons)
        except AuditUnavailable:
            errlog.error("deny not audited: audit store unavailable (trace %s)", ex.trace_id)
            if claim is not None:
                await claim.release()
            return Decision("deny", self.trail.refuse(ex))
        return Decision("deny", verdict, claim=claim)

    async def allow(self, ex: Exchange, reasons: tuple[str, ...]) -> Decision:
        """Commit the ALLOW decision record; only then may the door act.

        A request that carries an approved approval uses it first, atomically:
        of concurrent retries, one goes; an approval covers one delivery.
        """
        if ex.approval is not None and self.approvals is not None:
            refused = await self.approvals.consume(ex)
            if refused is not None:
                return await self.deny(ex, refused)
        claim = self._claim(ex)
        try:
            record = await self.trail.record(ex, "decision", "ALLOW", 200, reasons)
        except AuditUnavailable:
            if claim is not None:
                await claim.release()
            return Decision("deny", self.trail.refuse(ex))
        ex.decision_ref = str(record["event_id"])
        if ex.shadow:  # one count per request shadow mode would have denied
            self.metrics.shadow_denied.inc()
        return Decision("allow", reasons=reasons, claim=claim, record=record)

    async def _replay(self, ex: Exchange, outcome: StoredOutcome) -> Decision:
        try:
            await self.trail.record(ex, "replay", "ALLOW", outcome.status, ())
        except AuditUnavailable:
            return Decision("deny", self.trail.refuse(ex))
        return Decision("replay", outcome=outcome)

    def _claim(self, ex: Exchange) -> ClaimHandle | None:
        if ex.claim is None:
            return None
        claim, ex.claim = ex.claim, None
        return ClaimHandle(self.state, claim, self.cfg.replay.ttl_s, ex.trace_id)

    # ------------------------------------------------------------ after the answer

    def finish(self, ex: Exchange, decision: str, status: int, reasons: Iterable[str],
               started: float) -> None:
        """Request metrics and the access log line, for what the caller was sent."""
        elapsed = time.perf_counter() - started
        route = ex.route
        ex.span.end(status=status, decision=decision, tool=ex.tool or None,
                    effect=route.effect if route else None, mode=ex.mode.value,
                    reason_codes=tuple(reasons), via=ex.door)
        self.metrics.duration.observe(elapsed)
        self.metrics.count_request(ex.tool or "-", decision, status)
        if log.isEnabledFor(logging.INFO):  # one JSON line (proxy.logs), never bodies
            p = ex.principal
            log.info({
                "trace_id": ex.trace_id, "request_id": ex.request_id or None,
                "via": ex.door, "method": ex.method,
                "route": ex.route.path if ex.route else None,
                "tool": ex.tool or None, "decision": decision, "status": status,
                "auth": p.auth if p else None,
                "key_id": p.key_id if p else None,  # never the key
                "reason_codes": list(reasons), "shadow": ex.shadow or None,
                "latency_ms": round(elapsed * 1000, 3)})

    def record_refusal(self, verdict: Verdict, trace_id: str) -> str:
        """Audit a request the HTTP parser refused (proxy.httpserver); returns its id.

        Nothing of it could be parsed, so the record has no method, route or
        principal; it is queued (the answer does not wait for the commit).
        """
        ex = Exchange(method="", target=Target("", ""), headers=_NO_HEADERS, peer="",
                      scheme="", host="", trace_id=trace_id, traceparent="",
                      mode=self.mode.current())
        ex.request_id = self.trail.event_ids.next()
        self.metrics.count_request("-", verdict.decision, verdict.status)
        self.trail.record_later(ex, self.trail.build(ex, "decision", verdict.decision,
                                                     verdict.status, verdict.reasons))
        return ex.request_id
