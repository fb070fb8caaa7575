"""Per-request data carried through the pipeline (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from multidict import CIMultiDictProxy

from proxy.config import Mode, RouteConfig
from proxy.pathnorm import Target
from proxy.ports import Claim, StoredOutcome

# ``Principal.auth`` of the caller recorded when authentication failed on a
# shadow-mode route (``proxy.core``): nobody was authenticated
ANONYMOUS_AUTH = "none"


class _NoStage:
    __slots__ = ()

    def __enter__(self) -> _NoStage:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def traceparent(self) -> str | None:
        return None


class NoSpan:
    """A request's trace span when tracing is off (``proxy.telemetry`` has the real one)."""

    __slots__ = ()
    _stage = _NoStage()

    def stage(self, name: str) -> _NoStage:
        return self._stage

    def end(self, **attrs: Any) -> None:
        return None


NO_SPAN = NoSpan()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. ``key_id`` names the credential, never its value."""

    id: str
    role: str
    tenant: str | None
    auth: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """A stage's answer that stops the pipeline (anything but "continue").

    ``shadowable`` verdicts are recorded but not enforced on routes with
    ``enforce: false``; parse, routing and audit verdicts are never shadowable.
    """

    decision: str  # DENY | NEEDS_APPROVAL
    status: int
    reasons: tuple[str, ...]
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    shadowable: bool = True
    fail_closed_trigger: str | None = None
    replay: StoredOutcome | None = None  # a replayed outcome, not a deny
    approval: Mapping[str, Any] | None = None  # the envelope's "approval" (NEEDS_APPROVAL)


@dataclass(frozen=True, slots=True)
class DoorIdempotency:
    """A door's own idempotency rules, used by the admission stage instead of the
    request-id headers and the request body (MCP: the JSON-RPC envelope changes on
    every retry, the tool call does not).

    ``request_id``: the caller's key, or None: then the request is processed
    without replay protection, a write included (the door enforces any
    requirement itself). ``fingerprint_body``: the canonical bytes the
    fingerprint covers in place of the body.
    """

    request_id: str | None
    fingerprint_body: bytes


@dataclass(slots=True)
class Exchange:
    """Mutable per-request state; each stage fills in its part."""

    method: str
    target: Target
    headers: CIMultiDictProxy[str]
    peer: str
    scheme: str
    host: str
    trace_id: str
    traceparent: str
    body: bytes = b""
    body_sha256: str | None = ""  # None: no body reached the proxy (forward auth)
    route: RouteConfig | None = None
    params: dict[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    json_body: Any = None
    policy_input: dict[str, Any] = field(default_factory=dict)
    mode: Mode = Mode.ALLOW
    request_id: str = ""
    claim: Claim | None = None  # held by this request: complete or release it
    shadow: list[str] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)  # fail-open events on reads
    budget_warnings: tuple[str, ...] = ()  # "<budget>:<period> <used>/<limit>"
    forwarded: bool = False  # the upstream may have acted: a claim must not be released
    door: str = "proxy"  # the front door: proxy | verify | envoy | forward | mcp
    # a decision door's policy input parts given in its request body (``/verify``):
    # role, subject, args, context, already checked by the door
    preset: dict[str, Any] | None = None
    decision_ref: str = ""  # event_id of this request's committed decision record
    allowed_outputs: tuple[str, ...] = ()  # from the policy's decision document
    extra_reasons: tuple[str, ...] = ()  # reported next to a deny's own
    door_request_id: str | None = None  # a decision door's request id from its body
    record_extra: dict[str, Any] = field(default_factory=dict)  # added to decision records
    approval: Any = None  # the approved approval this request carries (proxy.approvals)
    span: Any = NO_SPAN  # the request's trace span (proxy.telemetry.RequestSpan)
    idempotency: DoorIdempotency | None = None  # a door's own rules (MCP), see the class

    @property
    def tool(self) -> str:
        return self.route.tool if self.route is not None else ""
