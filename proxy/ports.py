"""Ports: the small interfaces between the pure pipeline and its I/O.

Each port has one real adapter (Redis, PostgreSQL, ...) and, where the
contract calls for it, an embedded one (``proxy.embedded``). Adapters
translate their library's exceptions into the three below; the pipeline maps
those to reason codes and to fail-open/fail-closed behaviour. An adapter must
never let a library exception escape: an unexpected exception is treated as
an internal error and denies.
"""

from __future__ import annotations

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


# ------------------------------------------------------------ idempotency


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
    NEW = "new"  # claimed by this request; continue
    REPLAY = "replay"  # finished earlier with the same fingerprint
    IN_FLIGHT = "in_flight"  # same fingerprint, not finished yet
    MISMATCH = "mismatch"  # same key, different fingerprint


@dataclass(frozen=True, slots=True)
class ClaimResult:
    state: ClaimState
    outcome: StoredOutcome | None = None


class IdempotencyStore(Protocol):
    """Atomic claim/complete/release of request ids (IETF Idempotency-Key).

    ``key`` is already scoped by principal. A claim that is neither completed
    nor released expires after ``lease_s`` (a crashed holder never blocks the
    key for the whole TTL); a completed outcome lives ``ttl_s``.
    """

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> ClaimResult: ...

    async def complete(self, key: str, fingerprint: str, outcome: StoredOutcome,
                       ttl_s: float) -> None: ...

    async def release(self, key: str, fingerprint: str) -> None: ...


# ------------------------------------------------------------ rate limits


@dataclass(frozen=True, slots=True)
class RateCheck:
    rule: str
    key: str
    limit: int
    window_s: float
    cost: int


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    rule: str | None = None  # the first rule that refused
    retry_after_s: float = 0.0


class RateLimiter(Protocol):
    """Consume all ``checks`` atomically, or none of them when one refuses."""

    async def consume(self, checks: Sequence[RateCheck]) -> RateResult: ...


# ------------------------------------------------------------ mode


class ModeStore(Protocol):
    """Operator-controlled mode; ``current`` is a cached, non-blocking read."""

    def current(self) -> Mode: ...

    async def set(self, mode: Mode) -> None: ...


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


class PolicyEngine(Protocol):
    """Evaluates the policy input; never raises except :class:`PolicyUnavailable`."""

    @property
    def policy_hash(self) -> str: ...

    async def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyResult: ...


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

    async def healthy(self) -> bool: ...
