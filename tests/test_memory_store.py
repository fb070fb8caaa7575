"""The embedded admission store's memory budget (replay.memory_max_mb).

The store keeps finished outcomes for replay; without a budget an embedded
proxy would hold every write of the last TTL (24 h by default) in memory.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from proxy.embedded.memory import ENTRY_OVERHEAD, MemoryAdmissionStore
from proxy.ports import Claim, ClaimState, StoredOutcome
from tests.conftest import MakeProxy

OUTCOME = StoredOutcome(201, (("Content-Type", "application/json"),), b"x" * 100, True)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def claim(i: int) -> Claim:
    return Claim("scope", f"key-{i}", f"fp-{i}", 15.0)


async def fill(store: MemoryAdmissionStore, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        admission = await store.admit("scope", claim(i), (), True)
        assert admission.claimed
        await store.complete(claim(i), OUTCOME, 86_400)


async def test_oldest_finished_outcomes_are_evicted_within_the_budget() -> None:
    evicted: list[int] = []
    forgotten: list[int] = []
    budget = 50 * (ENTRY_OVERHEAD + 200)
    store = MemoryAdmissionStore(Clock(), max_bytes=budget, on_evict=lambda: evicted.append(1),
                                 on_forget=lambda: forgotten.append(1))
    await fill(store, 500)
    assert store.stored_bytes <= budget
    assert 30 <= len(store) <= 50
    assert len(evicted) == 500 - len(store)
    assert len(forgotten) == len(evicted) - store.tombstones > 0
    # the newest outcomes are still replayed
    newest = await store.admit("scope", claim(499), (), True)
    assert newest.claim_state is ClaimState.REPLAY and newest.outcome == OUTCOME
    # the most recently evicted ones left a tombstone: answered, never claimed anew
    last_evicted = 500 - len(store) - 1
    tomb = await store.admit("scope", claim(last_evicted), (), True)
    assert tomb.claim_state is ClaimState.EVICTED and not tomb.claimed
    # the oldest tombstones were dropped too: that id is evaluated afresh
    oldest = await store.admit("scope", claim(0), (), True)
    assert oldest.claim_state is ClaimState.NEW and oldest.claimed


async def test_in_flight_claims_are_never_evicted_by_the_budget() -> None:
    clock = Clock()
    store = MemoryAdmissionStore(clock, max_bytes=20 * (ENTRY_OVERHEAD + 200))
    held = claim(-1)
    assert (await store.admit("scope", held, (), True)).claimed  # oldest entry, in flight
    await fill(store, 300)
    again = await store.admit("scope", held, (), True)
    assert again.claim_state is ClaimState.IN_FLIGHT  # a concurrent duplicate is still refused
    # its lease still ends it
    clock.now += 16
    assert (await store.admit("scope", held, (), True)).claim_state is ClaimState.NEW


async def test_only_in_flight_claims_over_budget_do_not_loop() -> None:
    store = MemoryAdmissionStore(Clock(), max_bytes=ENTRY_OVERHEAD * 3)
    for i in range(10):
        assert (await store.admit("scope", claim(i), (), True)).claimed
    for i in range(10):
        assert (await store.admit("scope", claim(i), (), True)).claim_state is ClaimState.IN_FLIGHT


async def test_released_and_expired_entries_give_their_bytes_back() -> None:
    clock = Clock()
    store = MemoryAdmissionStore(clock)
    assert store.stored_bytes == 0
    await store.admit("scope", claim(1), (), True)
    await store.release(claim(1))
    assert store.stored_bytes == 0 and len(store) == 0
    await fill(store, 10)
    assert store.stored_bytes > 0
    clock.now += 86_401
    await store.admit("scope", None, (), True)  # any admission sweeps expired entries
    assert store.stored_bytes == 0 and len(store) == 0


async def test_budget_through_the_proxy(make_proxy: MakeProxy) -> None:
    """A 1 MB budget: the latest writes are replayed, the earliest refused (409)."""
    def patch(d: dict[str, Any]) -> None:
        d.setdefault("replay", {})["memory_max_mb"] = 1

    async with make_proxy(patch) as p:
        sem = asyncio.Semaphore(16)

        async def write(i: int) -> int:
            async with sem:
                status, _, _ = await p.call("POST", "/appointments", rid=f"budget-{i}",
                                            json={"patient_id": "p1", "slot": f"s{i}"})
                return status

        n = 1600
        assert set(await asyncio.gather(*(write(i) for i in range(n)))) == {201}
        assert len(p.upstream.seen) == n
        metrics = await p.metrics()
        found = re.search(r"^casf_replay_evicted_total (\S+)$", metrics, re.M)
        assert found is not None, metrics
        evicted = float(found[1])
        assert evicted > 0
        # the latest write is replayed; the first one's outcome was dropped, and its
        # retry is refused rather than delivered a second time
        status, headers, _ = await p.call("POST", "/appointments", rid=f"budget-{n - 1}",
                                          json={"patient_id": "p1", "slot": f"s{n - 1}"})
        assert status == 201 and headers.get("Idempotent-Replayed") == "true"
        assert len(p.upstream.seen) == n
        status, headers, body = await p.call("POST", "/appointments", rid="budget-0",
                                          json={"patient_id": "p1", "slot": "s0"})
        assert status == 409 and b"Inv_ReplayOutcomeEvicted" in body
        assert len(p.upstream.seen) == n
