"""Ports: the small interfaces between the pure pipeline and its I/O.

Each port has one real adapter (Redis, PostgreSQL, ...) and, where the
proxy must run without that service, an embedded one (``proxy.embedded``). Adapters
translate their library's exceptions into the three below; the pipeline maps
those to reason codes and to fail-open/fail-closed behaviour. An adapter must
never let a library exception escape: an unexpected exception is treated as
an internal error and denies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from proxy.config import Mode


class StoreUnavailable(Exception):
    """Shared state (idempotency, rate limits, mode) could not be reached in time."""


class PolicyUnavailable(Exception):
    """An external policy engine could not answer in time."""


class AuditUnavailable(Exception):
    """The audit store could not durably commit a record."""


# ------------------------------------------------------------ admission state


@dataclass(frozen=True, slots=True)
class StoredOutcome:
    """An upstream response kept for replay: status, safe headers, body.

    ``body_complete`` is false when the upstream body exceeded
    ``replay.max_stored_body_bytes``; such a replay answers with the status
    and headers, an empty body and ``X-Casf-Replay-Body: omitted``.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    body_complete: bool


class ClaimState(Enum):
    NEW = "new"  # no earlier use of this key
    REPLAY = "replay"  # finished earlier with the same fingerprint
    IN_FLIGHT = "in_flight"  # same fingerprint, not finished yet
    MISMATCH = "mismatch"  # same key, different fingerprint
    # finished earlier with the same fingerprint, but the embedded store's memory
    # budget dropped the outcome (a tombstone remains until its TTL): never replayed
    # and never forwarded again
    EVICTED = "evicted"


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotency key (already scoped by principal) and the request's fingerprint.

    ``scope`` is the request's state partition (derived from its tenant): the
    claim and the request's rate-limit buckets all live in it.
    """

    scope: str
    key: str
    fingerprint: str
    lease_s: float


@dataclass(frozen=True, slots=True)
class RateCheck:
    """One counter a request consumes from, checked with the others atomically.

    ``quota=False``: a GCRA rate limit of ``limit`` per ``window_s``.
    ``quota=True``: a budget counter for one calendar period (``key`` names the
    period); ``window_s`` is the time left in the period (the counter's TTL
    and the ``Retry-After`` of a refusal) and ``warn_at`` the used share at or
    above which the request carries a warning.
    """

    rule: str
    key: str
    limit: int
    window_s: float
    cost: int
    quota: bool = False
    warn_at: float = 1.0


@dataclass(frozen=True, slots=True)
class Admission:
    """What the state store decided, in the pipeline's stage order.

    ``claim_state`` is ``None`` when no claim was asked for. ``claimed`` is true
    only when this request now holds the claim. ``refused_rule`` names the first
    rate-limit rule that refused (nothing was consumed then).
    """

    claim_state: ClaimState | None
    claimed: bool = False
    outcome: StoredOutcome | None = None
    refused_rule: str | None = None
    refused_quota: bool = False
    retry_after_s: float = 0.0
    warnings: tuple[str, ...] = ()  # "<rule> <used>/<limit>" of quotas past warn_at


class AdmissionStore(Protocol):
    """Anti-replay claims and rate limits, decided atomically in one call.

    ``admit`` does, as one atomic step (one Redis round trip):

    1. when ``claim`` is given and its key exists: report REPLAY (with the
       stored outcome), IN_FLIGHT, MISMATCH or EVICTED (the outcome was dropped
       before its TTL, only its tombstone is left), and change nothing;
    2. when ``proceed`` is false (an in-process invariant already denies):
       report NEW and change nothing;
    3. when any check would exceed its limit (a GCRA rate limit, or a budget
       quota whose used + cost passes the limit): report the first refusing
       rule and change nothing;
    4. otherwise consume every check, report the quotas now at or above their
       ``warn_at`` share, and take the claim (if any) with a lease
       of ``claim.lease_s``; a claim neither completed nor released expires
       then, so a crashed holder never blocks the key for the whole TTL.

    ``scope`` partitions the state by tenant: a rate-limit bucket is
    identified by (scope, check key), so limits are always per tenant (on
    Redis the scope is the keys' cluster hash tag).

    ``complete`` stores the upstream outcome for ``ttl_s``; ``release`` drops
    an unfinished claim. Both act only when the fingerprint matches.
    """

    async def admit(self, scope: str, claim: Claim | None, checks: Sequence[RateCheck],
                    proceed: bool) -> Admission: ...

    async def complete(self, claim: Claim, outcome: StoredOutcome, ttl_s: float) -> None: ...

    async def release(self, claim: Claim) -> None: ...


# ------------------------------------------------------------ mode


# how restrictive each mode is: a mode of a higher rank denies at least what a lower one does
MODE_RANK = {Mode.ALLOW: 0, Mode.STEP_UP: 1, Mode.READ_ONLY: 2, Mode.KILL_SWITCH: 3}


def stricter(a: Mode, b: Mode) -> Mode:
    """The more restrictive of two modes."""
    return a if MODE_RANK[a] >= MODE_RANK[b] else b


class ModeStore(Protocol):
    """Operator-controlled mode; ``current`` is a cached, non-blocking read.

    ``set`` returns true once every replica will follow the change, false when
    it took effect on this replica only for now (a mode at least as restrictive
    as the current one, accepted while the shared store is unreachable and
    published once it answers again); it raises :class:`StoreUnavailable`
    when the change cannot be made at all.
    """

    def current(self) -> Mode: ...

    async def set(self, mode: Mode) -> bool: ...


# ------------------------------------------------------------ policy


class PolicyOutcome(Enum):
    ALLOW = "ALLOW"
    DENY = "DENY"
    NEEDS_APPROVAL = "NEEDS_APPROVAL"


@dataclass(frozen=True, slots=True)
class PolicyResult:
    outcome: PolicyOutcome
    violations: tuple[str, ...] = ()
    error: str | None = None  # set when the deny comes from a bad result or an eval error
    allowed_outputs: tuple[str, ...] = ()  # the decision document's allowed_outputs, sorted


class PolicyEngine(Protocol):
    """Evaluates the policy input; never raises except :class:`PolicyUnavailable`."""

    @property
    def policy_hash(self) -> str: ...

    async def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyResult: ...

    async def query_true(self, query: str, policy_input: Mapping[str, Any]) -> bool:
        """Whether another document of the policy (``data.casf.visible``) is ``true``
        for ``policy_input``; undefined is false."""
        ...


# ------------------------------------------------------------ audit


@dataclass(frozen=True, slots=True)
class AuditReceipt:
    chain_id: str
    seq: int
    hash: str


class AuditSink(Protocol):
    """Append-only, hash-chained audit store.

    ``append`` returns only once the record is durably committed (group
    commit is allowed: many callers may share one transaction) and raises
    :class:`AuditUnavailable` otherwise. The sink assigns ``chain_id``,
    ``seq``, ``prev_hash`` and ``hash``.
    """

    async def append(self, record: dict[str, Any]) -> AuditReceipt: ...

    def append_later(self, record: dict[str, Any]) -> asyncio.Future[AuditReceipt]:
        """Queue a record nobody waits for (an outcome); the future settles with its
        commit or its failure. Raises :class:`AuditUnavailable` when the sink is down."""
        ...

    async def healthy(self) -> bool: ...
