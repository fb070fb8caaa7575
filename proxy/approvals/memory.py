"""Embedded approval store: one process, in memory (state is lost on restart).

Each operation runs without an ``await`` in between its read and its write,
so on one event loop it is atomic. Memory is bounded: at most
``max_entries`` approvals are kept; beyond that the oldest final ones
(denied, expired, used) go first, and a new approval is refused with
:class:`~proxy.ports.StoreUnavailable` only when every kept one is live.
"""

from __future__ import annotations

import dataclasses

from proxy.approvals import model
from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.model import Approval, Approver, Details, NotFound, NotPending, Status
from proxy.approvals.store import RETENTION_S, FindResult
from proxy.ports import StoreUnavailable


class MemoryApprovalStore:
    def __init__(self, cfg: ApprovalsConfig, *, max_entries: int = 10_000) -> None:
        self.cfg = cfg
        self.max_entries = max_entries
        self._by_id: dict[str, Approval] = {}
        self._by_key: dict[str, str] = {}
        self._expired: list[Approval] = []

    # ------------------------------------------------------------ internals

    def _settle(self, a: Approval, now: float) -> Approval:
        if model.is_expired(a, now):
            a = model.expire(a)
            self._by_id[a.id] = a
            self._expired.append(a)
        return a

    def _drop(self, a: Approval) -> None:
        self._by_id.pop(a.id, None)
        if self._by_key.get(a.binding_key) == a.id:
            del self._by_key[a.binding_key]

    def _prune(self, now: float) -> None:
        for a in list(self._by_id.values()):
            if now >= a.expires_at + RETENTION_S:
                self._drop(self._settle(a, now))
        if len(self._by_id) < self.max_entries:
            return
        final = sorted((a for a in self._by_id.values() if a.status not in model.LIVE),
                       key=lambda a: a.created_at)
        for a in final[: len(self._by_id) - self.max_entries + 1]:
            self._drop(a)
        if len(self._by_id) >= self.max_entries:
            raise StoreUnavailable("approval store is full of live approvals")

    # ------------------------------------------------------------ port

    async def find_or_create(self, binding_key: str, fingerprint: str, details: Details,
                             now: float) -> FindResult:
        current_id = self._by_key.get(binding_key)
        current = self._by_id.get(current_id) if current_id else None
        if current is not None:
            current = self._settle(current, now)
            same = current.fingerprint == fingerprint
            if current.status in model.LIVE:
                return FindResult(current, False, not same)
            if same and current.status is not Status.EXPIRED:
                return FindResult(current, False, False)
        self._prune(now)
        a = model.create(model.new_id(), binding_key, fingerprint, details, now,
                         self.cfg.pending_ttl_seconds)
        self._by_id[a.id] = a
        self._by_key[binding_key] = a.id
        return FindResult(a, True, False)

    async def lookup(self, binding_key: str, now: float) -> Approval | None:
        current_id = self._by_key.get(binding_key)
        a = self._by_id.get(current_id) if current_id else None
        return self._settle(a, now) if a is not None else None

    async def get(self, approval_id: str, now: float) -> Approval | None:
        a = self._by_id.get(approval_id)
        return self._settle(a, now) if a is not None else None

    async def list_tenant(self, tenant: str | None, status: Status | None, limit: int,
                   now: float) -> list[Approval]:
        out = [self._settle(a, now) for a in self._by_id.values() if a.tenant == tenant]
        out = [a for a in out if status is None or a.status is status]
        out.sort(key=lambda a: a.created_at, reverse=True)
        return out[:limit]

    def _decide(self, approval_id: str, now: float) -> Approval:
        a = self._by_id.get(approval_id)
        if a is None:
            raise NotFound()
        a = self._settle(a, now)
        if a.status is not Status.PENDING:
            raise NotPending(a.status.value)
        return a

    async def approve(self, approval_id: str, who: Approver, now: float,
                      comment: str | None) -> Approval:
        a = self._decide(approval_id, now)
        a = dataclasses.replace(a, status=Status.APPROVED, approvers=(*a.approvers, who.id),
                                approved_at=now, decided_by=who.id, comment=comment,
                                expires_at=now + self.cfg.approved_ttl_seconds)
        self._by_id[a.id] = a
        return a

    async def deny(self, approval_id: str, who: Approver, now: float,
                   comment: str | None) -> Approval:
        a = self._decide(approval_id, now)
        a = dataclasses.replace(a, status=Status.DENIED, decided_by=who.id, comment=comment)
        self._by_id[a.id] = a
        return a

    async def consume(self, approval_id: str, fingerprint: str, now: float
                      ) -> Approval | None:
        a = self._by_id.get(approval_id)
        if a is None:
            return None
        used = model.use(self._settle(a, now), fingerprint, now)
        if used is not None:
            self._by_id[a.id] = used
        return used

    async def withdraw(self, approval_id: str) -> None:
        a = self._by_id.get(approval_id)
        if a is not None and a.status is Status.PENDING:
            self._drop(a)

    async def pending_count(self, now: float) -> int:
        return sum(1 for a in self._by_id.values()
                   if a.status is Status.PENDING and not model.is_expired(a, now))

    async def sweep(self, now: float) -> None:
        for a in list(self._by_id.values()):
            self._settle(a, now)

    def take_expired(self) -> list[Approval]:
        out, self._expired = self._expired, []
        return out

    async def close(self) -> None:
        return None
