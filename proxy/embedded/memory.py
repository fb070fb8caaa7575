"""Embedded (single-process) state: admission store and mode store; the mode state file.

Used when ``REDIS_URL`` is not set. Nothing is shared between replicas, which
the proxy says at startup. Atomicity comes from the event loop: ``admit``
never awaits, so no other request interleaves with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import logging
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from proxy.config import Mode
from proxy.ports import Admission, Claim, ClaimState, RateCheck, StoredOutcome

Clock = Callable[[], float]
log = logging.getLogger("casf.state")


# what one entry costs beyond its stored body and headers (the key and
# fingerprint strings, the entry, the outcome, the dict slot), rounded up:
# tracemalloc measured ~630 bytes per entry with a 120-byte body and one
# header, which this estimate counts as ~830
ENTRY_OVERHEAD = 600
# what one tombstone costs (an ordered-dict slot, two 64-bit ints, a tuple and
# a float): tracemalloc measured ~227 bytes
TOMBSTONE_SIZE = 240
# what a scope costs while it holds anything (its object, three empty ordered
# dicts, its name): tracemalloc measured ~560 bytes
SCOPE_OVERHEAD = 640
# the share of a scope's bytes its tombstones may take before its oldest
# tombstones are dropped rather than more of its outcomes turned into tombstones
TOMBSTONE_SHARE = 0.25
SWEEP_EVERY_S = 60.0  # how often every scope's expired entries are dropped


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    expires: float
    outcome: StoredOutcome | None = None
    size: int = ENTRY_OVERHEAD


def _outcome_size(outcome: StoredOutcome) -> int:
    return (ENTRY_OVERHEAD + len(outcome.body)
            + sum(len(k) + len(v) + 64 for k, v in outcome.headers))


def _digest(text: str) -> int:
    """64 bits of a key or fingerprint: what a tombstone keeps of it."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class _Scope:
    """One tenant partition's claims, outcomes and tombstones, each in time order.

    ``pending``: claims in flight (lease order); ``done``: stored outcomes
    (completion order); ``tombs``: evicted outcomes, ``digest(key) ->
    (digest(fingerprint), expires)`` (eviction order). ``bytes`` counts the
    outcomes and tombstones, plus ``SCOPE_OVERHEAD`` while there are any;
    claims in flight are counted apart (see :class:`MemoryAdmissionStore`).
    """

    __slots__ = ("bytes", "done", "items", "name", "pending", "tomb_bytes", "tombs")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending: OrderedDict[str, _Entry] = OrderedDict()
        self.done: OrderedDict[str, _Entry] = OrderedDict()
        self.tombs: OrderedDict[int, tuple[int, float]] = OrderedDict()
        self.items = 0  # bytes of the outcomes and tombstones
        self.tomb_bytes = 0
        self.bytes = 0

    def empty(self) -> bool:
        return not (self.pending or self.done or self.tombs)


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
    """Claims, stored outcomes and tombstones per tenant scope, within a memory budget.

    The budget (``max_bytes``, ``replay.memory_max_mb``) bounds the stored
    outcomes and tombstones of all scopes together, so a long-running embedded
    proxy keeps a bounded window of outcomes rather than every write of the
    last TTL. It is shared fairly: while the store is over budget, room is
    always taken from the scope that holds the most bytes, so one tenant's
    writes can only ever push out its own outcomes, never those of a tenant
    within its fair share (the budget divided by the scopes holding anything).

    Room is taken by turning that scope's oldest outcome into a *tombstone*
    (64 bits of its key and fingerprint and its expiry, no body): a retry of
    that request id is then answered ``EVICTED`` until the outcome's TTL ends,
    never passed to the upstream a second time (``on_evict`` is called). Only
    when the scope's tombstones take more than ``TOMBSTONE_SHARE`` of its bytes
    (or it has nothing else) is its oldest tombstone dropped (``on_forget``);
    a retry of that id is then evaluated afresh, as after its TTL.

    Claims in flight are never dropped before their lease ends, whatever the
    budget, and are not counted in it: there are at most as many as requests
    being processed, and each ends with its request or its lease.
    """

    def __init__(self, clock: Clock = time.monotonic, max_bytes: int = 16 << 20,
                 on_evict: Callable[[], None] | None = None,
                 on_forget: Callable[[], None] | None = None) -> None:
        self._scopes: dict[str, _Scope] = {}
        self._largest: list[tuple[int, str]] = []  # max-heap (-bytes, scope); stale rows skipped
        self._tat: dict[str, float] = {}
        self._used: dict[str, tuple[int, float]] = {}  # quota counter: (used, expires)
        self._clock = clock
        self._max_bytes = max_bytes
        self._bytes = 0
        self._in_flight = 0
        self._on_evict = on_evict
        self._on_forget = on_forget
        self._next_sweep = clock() + SWEEP_EVERY_S

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored outcomes and tombstones (what the budget bounds)."""
        return self._bytes

    def scope_bytes(self, scope: str) -> int:
        sc = self._scopes.get(scope)
        return 0 if sc is None else sc.bytes

    @property
    def scopes_holding(self) -> int:
        """How many scopes hold outcomes or tombstones (the fair share's divisor)."""
        return sum(1 for sc in self._scopes.values() if sc.bytes)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def tombstones(self) -> int:
        return sum(len(sc.tombs) for sc in self._scopes.values())

    def __len__(self) -> int:
        """Claims in flight plus stored outcomes (tombstones not counted)."""
        return sum(len(sc.pending) + len(sc.done) for sc in self._scopes.values())

    # ------------------------------------------------------------ accounting

    def _settle(self, sc: _Scope) -> None:
        """Recount ``sc.bytes`` after its items changed; forget an empty scope."""
        new = sc.items + SCOPE_OVERHEAD if sc.items else 0
        self._bytes += new - sc.bytes
        if new != sc.bytes and new:
            heapq.heappush(self._largest, (-new, sc.name))
        sc.bytes = new
        if sc.empty():
            del self._scopes[sc.name]

    def _drop_done(self, sc: _Scope, key: str) -> None:
        sc.items -= sc.done.pop(key).size

    def _drop_tomb(self, sc: _Scope, digest: int) -> None:
        del sc.tombs[digest]
        sc.items -= TOMBSTONE_SIZE
        sc.tomb_bytes -= TOMBSTONE_SIZE

    def _drop_pending(self, sc: _Scope, key: str) -> None:
        del sc.pending[key]
        self._in_flight -= 1

    def _expire(self, sc: _Scope, now: float) -> None:
        """Drop the expired entries at the front of each of the scope's queues."""
        while sc.pending:
            key, entry = next(iter(sc.pending.items()))
            if entry.expires > now:
                break
            self._drop_pending(sc, key)
        while sc.done:
            key, entry = next(iter(sc.done.items()))
            if entry.expires > now:
                break
            self._drop_done(sc, key)
        while sc.tombs:
            digest, (_, expires) = next(iter(sc.tombs.items()))
            if expires > now:
                break
            self._drop_tomb(sc, digest)

    def _sweep_all(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        for sc in list(self._scopes.values()):
            self._expire(sc, now)
            self._settle(sc)
        self._largest = [(-sc.bytes, sc.name) for sc in self._scopes.values() if sc.bytes]
        heapq.heapify(self._largest)
        if len(self._tat) > 100_000:
            self._tat = {k: v for k, v in self._tat.items() if v > now}
        if len(self._used) > 100_000:
            self._used = {k: v for k, v in self._used.items() if v[1] > now}

    def _fit(self, now: float) -> None:
        """Take room from the largest scope until the store is within its budget."""
        while self._bytes > self._max_bytes and self._largest:
            neg, name = heapq.heappop(self._largest)
            sc = self._scopes.get(name)
            if sc is None or sc.bytes != -neg or not sc.bytes:
                continue  # a stale row: that scope's size changed since
            before = sc.items
            self._expire(sc, now)
            if sc.items == before:
                if sc.tombs and (not sc.done or sc.tomb_bytes > TOMBSTONE_SHARE * sc.bytes):
                    self._drop_tomb(sc, next(iter(sc.tombs)))
                    if self._on_forget is not None:
                        self._on_forget()
                else:
                    key, entry = sc.done.popitem(last=False)
                    sc.tombs[_digest(key)] = (_digest(entry.fingerprint), entry.expires)
                    sc.items += TOMBSTONE_SIZE - entry.size
                    sc.tomb_bytes += TOMBSTONE_SIZE
                    if self._on_evict is not None:
                        self._on_evict()
            self._settle(sc)  # its size changed: a new row for it
        if len(self._largest) > 4 * len(self._scopes) + 64:
            self._largest = [(-sc.bytes, sc.name) for sc in self._scopes.values() if sc.bytes]
            heapq.heapify(self._largest)

    # ------------------------------------------------------------ the port

    def _lookup(self, sc: _Scope, claim: Claim, now: float) -> Admission | None:
        entry = sc.pending.get(claim.key)
        if entry is not None and entry.expires <= now:
            self._drop_pending(sc, claim.key)
            self._settle(sc)
            entry = None
        if entry is None:
            entry = sc.done.get(claim.key)
            if entry is not None and entry.expires <= now:
                self._drop_done(sc, claim.key)
                self._settle(sc)
                entry = None
        if entry is not None:
            if entry.fingerprint != claim.fingerprint:
                return Admission(ClaimState.MISMATCH)
            if entry.outcome is None:
                return Admission(ClaimState.IN_FLIGHT)
            return Admission(ClaimState.REPLAY, outcome=entry.outcome)
        if not sc.tombs:
            return None
        digest = _digest(claim.key)
        tomb = sc.tombs.get(digest)
        if tomb is None:
            return None
        if tomb[1] <= now:
            self._drop_tomb(sc, digest)
            self._settle(sc)
            return None
        if tomb[0] != _digest(claim.fingerprint):
            return Admission(ClaimState.MISMATCH)
        return Admission(ClaimState.EVICTED)

    async def admit(self, scope: str, claim: Claim | None, checks: Sequence[RateCheck],
                    proceed: bool) -> Admission:
        now = self._clock()
        self._sweep_all(now)
        state: ClaimState | None = None
        if claim is not None:
            sc = self._scopes.get(claim.scope)
            if sc is not None:
                found = self._lookup(sc, claim, now)
                if found is not None:
                    return found
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
        if claim is None:
            return Admission(None, warnings=tuple(warnings))
        sc = self._scopes.get(claim.scope)
        if sc is not None:
            self._expire(sc, now)
            self._settle(sc)  # may forget it, when nothing was left
        sc = self._scopes.get(claim.scope)
        if sc is None:
            sc = self._scopes[claim.scope] = _Scope(claim.scope)
        sc.pending[claim.key] = _Entry(claim.fingerprint, now + claim.lease_s)
        self._in_flight += 1
        return Admission(ClaimState.NEW, claimed=True, warnings=tuple(warnings))

    async def complete(self, claim: Claim, outcome: StoredOutcome, ttl_s: float) -> None:
        sc = self._scopes.get(claim.scope)
        entry = None if sc is None else sc.pending.get(claim.key)
        if sc is None or entry is None or entry.fingerprint != claim.fingerprint:
            return
        now = self._clock()
        self._drop_pending(sc, claim.key)
        entry.outcome = outcome
        entry.expires = now + ttl_s
        entry.size = _outcome_size(outcome)
        sc.done[claim.key] = entry
        sc.items += entry.size
        self._settle(sc)
        self._sweep_all(now)
        self._fit(now)

    async def release(self, claim: Claim) -> None:
        sc = self._scopes.get(claim.scope)
        entry = None if sc is None else sc.pending.get(claim.key)
        if sc is not None and entry is not None and entry.fingerprint == claim.fingerprint:
            self._drop_pending(sc, claim.key)
            self._settle(sc)


class MemoryModeStore:
    def __init__(self, initial: Mode) -> None:
        self._mode = initial

    def current(self) -> Mode:
        return self._mode

    async def set(self, mode: Mode) -> bool:
        self._mode = mode
        return True


@dataclass(frozen=True, slots=True)
class SavedMode:
    """What the mode state file holds: the mode this replica enforces, and whether
    it still has to be published to the shared store (``pending``)."""

    mode: Mode
    pending: bool


class ModeStateFile:
    """The replica's mode on local disk (``mode.state_path``), so that a mode set
    while Redis is unreachable survives a restart before Redis is back.

    One small JSON document, ``{"mode": "KILL_SWITCH", "pending": true}``,
    replaced atomically: written to a temporary file in the same directory,
    fsynced, renamed over the old one, and the directory fsynced. A reader thus
    sees the old or the new document, never a torn one. The methods block
    (file I/O): call them through ``asyncio.to_thread``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> SavedMode | None:
        """The saved mode; ``None`` when there is none or it cannot be read (logged)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the mode state file %s: %s", self.path, exc)
            return None
        try:
            doc = orjson.loads(raw)
            return SavedMode(Mode(doc["mode"]), doc["pending"] is True)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("ignoring the unreadable mode state file %s: %s", self.path, exc)
            return None

    def save(self, saved: SavedMode) -> None:
        """Replace the file with ``saved``, durably; raises :class:`OSError`."""
        data = orjson.dumps({"mode": saved.mode.value, "pending": saved.pending})
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
