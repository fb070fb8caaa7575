"""In-memory idempotency store, GCRA rate limiter and mode store.

Used when ``REDIS_URL`` is not set. Single-process only: nothing is shared
between replicas, which the proxy says at startup.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.config import Mode
from proxy.ports import ClaimResult, ClaimState, RateCheck, RateResult, StoredOutcome

Clock = Callable[[], float]


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    expires: float
    outcome: StoredOutcome | None = None


class MemoryIdempotencyStore:
    """Dict-backed claims; atomic because the event loop runs one coroutine at a time."""

    def __init__(self, clock: Clock = time.monotonic, max_entries: int = 1_000_000) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._clock = clock
        self._max = max_entries

    def _sweep(self, now: float) -> None:
        # entries are appended in claim order; drop expired ones from the front
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if entry.expires > now and len(self._entries) <= self._max:
                break
            del self._entries[key]

    async def claim(self, key: str, fingerprint: str, lease_s: float) -> ClaimResult:
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            del self._entries[key]
            entry = None
        if entry is None:
            self._sweep(now)
            self._entries[key] = _Entry(fingerprint, now + lease_s)
            return ClaimResult(ClaimState.NEW)
        if entry.fingerprint != fingerprint:
            return ClaimResult(ClaimState.MISMATCH)
        if entry.outcome is None:
            return ClaimResult(ClaimState.IN_FLIGHT)
        return ClaimResult(ClaimState.REPLAY, entry.outcome)

    async def complete(self, key: str, fingerprint: str, outcome: StoredOutcome,
                       ttl_s: float) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.fingerprint != fingerprint:
            return
        entry.outcome = outcome
        entry.expires = self._clock() + ttl_s
        self._entries.move_to_end(key)

    async def release(self, key: str, fingerprint: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.fingerprint == fingerprint and entry.outcome is None:
            del self._entries[key]


class MemoryRateLimiter:
    """GCRA (generic cell rate algorithm) per key, all-or-nothing over the checks.

    A limit of N per window W has emission interval T = W/N and lets a burst of
    N through; a request of cost c advances the key's theoretical arrival time
    (TAT) by c*T and is refused when TAT would exceed now + W.
    """

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._tat: dict[str, float] = {}
        self._clock = clock

    async def consume(self, checks: Sequence[RateCheck]) -> RateResult:
        now = self._clock()
        updates: list[tuple[str, float]] = []
        for c in checks:
            interval = c.window_s / c.limit
            tat = max(self._tat.get(c.key, now), now)
            new_tat = tat + c.cost * interval
            if new_tat - now > c.window_s + 1e-9:
                return RateResult(False, c.rule, new_tat - now - c.window_s)
            updates.append((c.key, new_tat))
        for key, tat in updates:
            self._tat[key] = tat
        if len(self._tat) > 100_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        return RateResult(True)


class MemoryModeStore:
    def __init__(self, initial: Mode) -> None:
        self._mode = initial

    def current(self) -> Mode:
        return self._mode

    async def set(self, mode: Mode) -> None:
        self._mode = mode
