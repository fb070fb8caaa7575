"""The approval store port: where approvals live (memory when embedded, Redis when shared).

Every method that changes an approval does so atomically: with several
replicas on one Redis, exactly one of N concurrent ``approve`` calls wins and
exactly one of N concurrent ``consume`` calls gets the approval. Adapters
raise only :class:`~proxy.ports.StoreUnavailable` (the store cannot be
reached) and the :mod:`proxy.approvals.model` errors.

Expiry is lazy: a live approval past its ``expires_at`` is marked
``expired`` by whichever operation reads it first (also :meth:`sweep`), and
that marking happens once across all replicas: the store that made it keeps
the approval for :meth:`take_expired`, so exactly one ``expired`` audit
record is written.

Approvals are kept ``RETENTION_S`` past their expiry (so a late retry or an
approver sees ``expired``/``used``/``denied``, not "unknown"), then dropped.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from proxy.approvals.model import Approval, Approver, Details, Status

RETENTION_S = 24 * 3600


class FindResult(NamedTuple):
    """``created``: a new pending approval was made; ``mismatch``: the binding key holds a
    pending or approved approval for a different fingerprint (nothing changed)."""

    approval: Approval
    created: bool
    mismatch: bool


class ApprovalStore(Protocol):
    """Approvals by id and by the caller-scoped request id key they are bound to."""

    async def find_or_create(self, binding_key: str, fingerprint: str, details: Details,
                             now: float) -> FindResult:
        """The approval bound to ``binding_key`` for ``fingerprint``, created when absent.

        - pending/approved, same fingerprint: returned (``created`` false);
        - pending/approved, other fingerprint: returned with ``mismatch``;
        - denied/used, same fingerprint: returned (the caller answers from it);
        - expired, or denied/used for another fingerprint: replaced by a new one.
        """
        ...

    async def lookup(self, binding_key: str, now: float) -> Approval | None: ...

    async def get(self, approval_id: str, now: float) -> Approval | None: ...

    async def list_tenant(self, tenant: str | None, status: Status | None, limit: int,
                   now: float) -> list[Approval]:
        """The tenant's approvals, newest first, optionally of one status."""
        ...

    async def approve(self, approval_id: str, who: Approver, now: float,
                      comment: str | None) -> Approval:
        """pending → approved (raises NotFound / NotPending; role, tenant and four eyes
        are the caller's checks, see :func:`proxy.approvals.model.check_decider`)."""
        ...

    async def deny(self, approval_id: str, who: Approver, now: float,
                   comment: str | None) -> Approval: ...

    async def consume(self, approval_id: str, fingerprint: str, now: float
                      ) -> Approval | None:
        """approved → used for that fingerprint, atomically; None when not (or no longer)
        usable: exactly one of concurrent consumers gets the approval."""
        ...

    async def withdraw(self, approval_id: str) -> None:
        """Drop a pending approval whose ``created`` record could not be committed."""
        ...

    async def pending_count(self, now: float) -> int: ...

    async def sweep(self, now: float) -> None:
        """Mark every live approval past its expiry (they go to :meth:`take_expired`)."""
        ...

    def take_expired(self) -> list[Approval]:
        """Approvals this store instance marked expired since the last call."""
        ...

    async def close(self) -> None: ...
