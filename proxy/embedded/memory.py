"""Embedded (single-process) state: admission store and mode store.

Used when ``REDIS_URL`` is not set. Nothing is shared between replicas, which
the proxy says at startup. Atomicity comes from the event loop: ``admit``
never awaits, so no other request interleaves with it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.config import Mode
from proxy.ports import Admission, Claim, ClaimState, RateCheck, StoredOutcome

Clock = Callable[[], float]


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    expires: float
    outcome: StoredOutcome | None = None


def gcra(tat: float | None, now: float, check: RateCheck) -> tuple[bool, float]:
    """GCRA step: (allowed, new TAT or seconds to wait).

    A limit of N per window W has emission interval T = W/N and allows a burst
    of N; a request of cost c moves the theoretical arrival time (TAT) by c*T
    and is refused when the TAT would run more than W ahead of now.
    """
    interval = check.window_s / check.limit
    start = now if tat is None or tat < now else tat
    new_tat = start + check.cost * interval
    ahead = new_tat - now
    if ahead > check.window_s + 1e-9:
        return False, ahead - check.window_s
    return True, new_tat


class MemoryAdmissionStore:
    def __init__(self, clock: Clock = time.monotonic, max_entries: int = 1_000_000) -> None:
        self._claims: OrderedDict[str, _Entry] = OrderedDict()
        self._tat: dict[str, float] = {}
        self._used: dict[str, tuple[int, float]] = {}  # quota counter: (used, expires)
        self._clock = clock
        self._max = max_entries

    def _sweep(self, now: float) -> None:
        # claims are kept in claim/completion order; drop expired ones from the front
        while self._claims:
            key, entry = next(iter(self._claims.items()))
            if entry.expires > now and len(self._claims) <= self._max:
                break
            del self._claims[key]
        if len(self._tat) > 100_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        if len(self._used) > 100_000:
            self._used = {k: v for k, v in self._used.items() if v[1] > now}

    async def admit(self, scope: str, claim: Claim | None, checks: Sequence[RateCheck],
                    proceed: bool) -> Admission:
        now = self._clock()
        state: ClaimState | None = None
        if claim is not None:
            entry = self._claims.get(claim.key)
            if entry is not None and entry.expires <= now:
                del self._claims[claim.key]
                entry = None
            if entry is not None:
                if entry.fingerprint != claim.fingerprint:
                    return Admission(ClaimState.MISMATCH)
                if entry.outcome is None:
                    return Admission(ClaimState.IN_FLIGHT)
                return Admission(ClaimState.REPLAY, outcome=entry.outcome)
            state = ClaimState.NEW
        if not proceed:
            return Admission(state)
        updates: list[tuple[str, float]] = []
        spends: list[tuple[str, int, float]] = []
        warnings: list[str] = []
        for check in checks:
            key = f"{scope}:{check.key}"
            if check.quota:
                used, expires = self._used.get(key, (0, 0.0))
                if expires <= now:
                    used = 0
                total = used + check.cost
                if total > check.limit:
                    return Admission(state, refused_rule=check.rule, refused_quota=True,
                                     retry_after_s=check.window_s)
                if total >= check.warn_at * check.limit:
                    warnings.append(f"{check.rule} {total}/{check.limit}")
                spends.append((key, total, now + check.window_s))
                continue
            ok, value = gcra(self._tat.get(key), now, check)
            if not ok:
                return Admission(state, refused_rule=check.rule, retry_after_s=value)
            updates.append((key, value))
        for key, tat in updates:
            self._tat[key] = tat
        for key, total, expires in spends:
            self._used[key] = (total, expires)
        self._sweep(now)
        if claim is None:
            return Admission(None, warnings=tuple(warnings))
        self._claims[claim.key] = _Entry(claim.fingerprint, now + claim.lease_s)
        return Admission(ClaimState.NEW, claimed=True, warnings=tuple(warnings))

    async def complete(self, claim: Claim, outcome: StoredOutcome, ttl_s: float) -> None:
        entry = self._claims.get(claim.key)
        if entry is None or entry.fingerprint != claim.fingerprint:
            return
        entry.outcome = outcome
        entry.expires = self._clock() + ttl_s
        self._claims.move_to_end(claim.key)

    async def release(self, claim: Claim) -> None:
        entry = self._claims.get(claim.key)
        if entry is not None and entry.fingerprint == claim.fingerprint and entry.outcome is None:
            del self._claims[claim.key]


class MemoryModeStore:
    def __init__(self, initial: Mode) -> None:
        self._mode = initial

    def current(self) -> Mode:
        return self._mode

    async def set(self, mode: Mode) -> None:
        self._mode = mode
