"""Anti-replay / idempotency (IETF "Idempotency-Key HTTP Header Field" draft).

Write routes require a request id (``Idempotency-Key``, else ``X-Request-Id``;
configurable). The id is scoped by principal, the fingerprint covers tool,
method, normalised path+query and the canonical body. Denies 400 when the id
is missing or invalid, 409 on a concurrent or mismatched reuse; a finished
reuse returns the stored outcome (a replay, not a deny).
"""

from __future__ import annotations

import hashlib

from proxy.canonical import canonical_body, fingerprint
from proxy.config import ReplayConfig
from proxy.metrics import Metrics
from proxy.model import Exchange, Verdict
from proxy.ports import ClaimState, IdempotencyStore, StoreUnavailable
from proxy.reasons import Reason

MAX_ID_LENGTH = 255


def parse_request_id(raw: str) -> str | None:
    """Validate an id: printable ASCII, 1-255 characters; sf-string quotes stripped."""
    value = raw.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if not value or len(value) > MAX_ID_LENGTH:
        return None
    if not all(" " <= ch <= "~" for ch in value):
        return None
    return value


def scoped_key(principal_id: str, request_id: str) -> str:
    """One caller's id can never collide with, or block, another caller's."""
    h = hashlib.sha256()
    for part in (principal_id.encode(), request_id.encode()):
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()


def client_request_id(ex: Exchange, headers: tuple[str, ...]) -> str | Verdict | None:
    """The caller's request id from the first configured header present.

    Returns ``None`` when none is sent, a 400 verdict when it is invalid or
    repeated. A valid id is also stored on the exchange (``request_id``), so
    every later envelope and audit record carries it.
    """
    for header in headers:
        values = ex.headers.getall(header, [])
        if not values:
            continue
        if len(values) > 1:
            return Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,), f"{header} is repeated")
        parsed = parse_request_id(values[0])
        if parsed is None:
            return Verdict("DENY", 400, (Reason.INVALID_REQUEST_ID,),
                           f"{header} must be 1-{MAX_ID_LENGTH} printable characters")
        ex.request_id = parsed
        return parsed
    return None


class ReplayGuard:
    name = "replay"

    def __init__(self, cfg: ReplayConfig, store: IdempotencyStore, lease_s: float,
                 metrics: Metrics) -> None:
        self.cfg = cfg
        self.store = store
        self.lease_s = lease_s
        self.metrics = metrics

    async def check(self, ex: Exchange) -> Verdict | None:
        route = ex.route
        assert route is not None and ex.principal is not None
        rid = client_request_id(ex, self.cfg.request_id_headers)
        if isinstance(rid, Verdict):
            return rid
        if rid is None:
            if route.effect == "write":
                return Verdict("DENY", 400, (Reason.MISSING_REQUEST_ID,),
                               "write requests need an Idempotency-Key or X-Request-Id")
            return None
        if route.effect != "write":
            return None
        ex.replay_key = scoped_key(ex.principal.id, rid)
        ex.fingerprint = fingerprint(route.tool, ex.method, ex.target.path_and_query,
                                     canonical_body(ex.body, ex.headers.get("Content-Type")))
        try:
            claim = await self.store.claim(ex.replay_key, ex.fingerprint, self.lease_s)
        except StoreUnavailable:
            ex.replay_key = None
            if route.fail_mode == "closed":
                return Verdict("DENY", 503, (Reason.FAIL_CLOSED, Reason.REPLAY_UNAVAILABLE),
                               "replay protection is unavailable; write refused",
                               fail_closed_trigger="redis")
            ex.degraded.append(Reason.REPLAY_UNAVAILABLE)
            return None
        if claim.state is ClaimState.NEW:
            ex.claim = claim
            return None
        ex.replay_key = None  # not ours: never release or complete it
        if claim.state is ClaimState.REPLAY:
            self.metrics.replay_hit.inc()
            assert claim.outcome is not None
            return Verdict("ALLOW", claim.outcome.status, (), "replayed outcome",
                           shadowable=False, replay=claim.outcome)
        if claim.state is ClaimState.IN_FLIGHT:
            return Verdict("DENY", 409, (Reason.REPLAY_CONCURRENT,),
                           "a request with this id is still being processed")
        self.metrics.replay_mismatch.inc()
        return Verdict("DENY", 409, (Reason.REPLAY_MISMATCH,),
                       "this request id was used with a different payload")
