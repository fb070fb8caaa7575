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


# what one entry costs beyond its stored body and headers (the key and
# fingerprint strings, the entry, the outcome, the dict slot), rounded up:
# tracemalloc measured ~630 bytes per entry with a 120-byte body and one
# header, which this estimate counts as ~830
ENTRY_OVERHEAD = 600


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    expires: float
    outcome: StoredOutcome | None = None
    size: int = ENTRY_OVERHEAD


def _outcome_size(outcome: StoredOutcome) -> int:
    return (ENTRY_OVERHEAD + len(outcome.body)
            + sum(len(k) + len(v) + 64 for k, v in outcome.headers))


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
    """Claims and stored outcomes in one ordered dict, within a memory budget.

    Entries are kept in claim/completion order. Expired ones are dropped from
    the front; so is the oldest entry while the store is over ``max_bytes``
    (``replay.memory_max_mb``), so a long-running embedded proxy keeps a
    bounded window of outcomes rather than every write of the last TTL.
    ``on_evict`` is called for each finished outcome dropped before it expired.
    """

    def __init__(self, clock: Clock = time.monotonic, max_bytes: int = 16 << 20,
                 on_evict: Callable[[], None] | None = None) -> None:
        self._claims: OrderedDict[str, _Entry] = OrderedDict()
        self._tat: dict[str, float] = {}
        self._used: dict[str, tuple[int, float]] = {}  # quota counter: (used, expires)
        self._clock = clock
        self._max_bytes = max_bytes
        self._bytes = 0
        self._on_evict = on_evict

    @property
    def stored_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._claims)

    def _drop(self, key: str) -> None:
        self._bytes -= self._claims.pop(key).size

    def _sweep(self, now: float) -> None:
        moves = len(self._claims)  # in-flight claims passed over, at most once each
        while self._claims:
            key, entry = next(iter(self._claims.items()))
            if entry.expires > now:
                if self._bytes <= self._max_bytes:
                    break
                if entry.outcome is None:  # in flight: never dropped before its lease ends
                    if moves == 0:
                        break
                    moves -= 1
                    self._claims.move_to_end(key)
                    continue
                if self._on_evict is not None:
                    self._on_evict()
            self._drop(key)
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
                self._drop(claim.key)
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
        self._bytes += ENTRY_OVERHEAD
        return Admission(ClaimState.NEW, claimed=True, warnings=tuple(warnings))

    async def complete(self, claim: Claim, outcome: StoredOutcome, ttl_s: float) -> None:
        entry = self._claims.get(claim.key)
        if entry is None or entry.fingerprint != claim.fingerprint:
            return
        now = self._clock()
        entry.outcome = outcome
        entry.expires = now + ttl_s
        size = _outcome_size(outcome)
        self._bytes += size - entry.size
        entry.size = size
        self._claims.move_to_end(claim.key)
        self._sweep(now)

    async def release(self, claim: Claim) -> None:
        entry = self._claims.get(claim.key)
        if entry is not None and entry.fingerprint == claim.fingerprint and entry.outcome is None:
            self._drop(claim.key)


class MemoryModeStore:
    def __init__(self, initial: Mode) -> None:
        self._mode = initial

    def current(self) -> Mode:
        return self._mode

    async def set(self, mode: Mode) -> None:
        self._mode = mode
