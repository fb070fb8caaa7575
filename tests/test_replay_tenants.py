"""The embedded store's memory budget is shared fairly between tenants.

One tenant's writes can only push out its own stored outcomes, never those of
a tenant within its fair share, and an outcome that was pushed out leaves a
tombstone: a retry of that request id is refused (409
``Inv_ReplayOutcomeEvicted``), never delivered to the upstream a second time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.embedded.memory import SCOPE_OVERHEAD, TOMBSTONE_SIZE, MemoryAdmissionStore
from proxy.ports import Claim, ClaimState, StoredOutcome
from tests.conftest import KEYS, Upstream, clinic_env, start_proxy, write_config

BIG = 60 * 1024  # each response body: within replay.max_stored_body_bytes (64 KiB)


@contextlib.asynccontextmanager
async def big_upstream() -> AsyncIterator[tuple[str, Counter[str]]]:
    """A real upstream answering every POST with a 60 KB body, counting deliveries per id."""
    deliveries: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        deliveries[request.headers.get("Idempotency-Key", "")] += 1
        return web.Response(status=201, body=b"x" * BIG, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", deliveries
    finally:
        await runner.cleanup()


async def post(session: aiohttp.ClientSession, url: str, key: str, rid: str
               ) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/appointments",
                            json={"patient_id": "p1", "slot": f"slot-{rid}"},
                            headers={"X-API-Key": KEYS[key], "Idempotency-Key": rid}) as r:
        return r.status, dict(r.headers), await r.read()


async def flood(session: aiohttp.ClientSession, url: str, key: str, prefix: str, n: int) -> None:
    sem = asyncio.Semaphore(8)

    async def one(i: int) -> None:
        async with sem:
            status, _, _ = await post(session, url, key, f"{prefix}-{i}")
            assert status == 201

    await asyncio.gather(*(one(i) for i in range(n)))


async def test_one_tenants_flood_never_evicts_another_tenants_outcome(tmp_path: Path) -> None:
    """Tenant t2's 320 writes of 60 KB (19 MB, over the 16 MB budget) push out only
    t2's own outcomes: t1's completed write is still replayed, not delivered again."""
    async with big_upstream() as (url, deliveries):
        env = clinic_env(url, tmp_path)
        async with start_proxy(write_config(tmp_path, lambda d: None), env, Upstream(url)) as p:
            assert p.cfg.replay.memory_max_bytes == 16 << 20
            status, _, first = await post(p.session, p.url, "receptionist", "t1-once")
            assert status == 201
            await flood(p.session, p.url, "t2-receptionist", "t2", 320)
            store = p.rt.state
            assert isinstance(store, MemoryAdmissionStore)
            assert store.stored_bytes <= 16 << 20
            assert store.tombstones > 0  # the budget did push outcomes out: t2's

            status, headers, again = await post(p.session, p.url, "receptionist", "t1-once")
            assert status == 201 and headers.get("Idempotent-Replayed") == "true"
            assert again == first
            assert deliveries["t1-once"] == 1

            # t2's own earliest outcome is gone, and its retry is refused, not re-delivered
            status, _, body = await post(p.session, p.url, "t2-receptionist", "t2-0")
            assert status == 409 and b"Inv_ReplayOutcomeEvicted" in body
            assert deliveries["t2-0"] == 1
            assert sum(deliveries.values()) == 321


async def test_a_tenant_over_the_budget_gets_409_for_its_own_evicted_outcome(
        tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d.setdefault("replay", {})["memory_max_mb"] = 1

    async with big_upstream() as (url, deliveries):
        env = clinic_env(url, tmp_path)
        async with start_proxy(write_config(tmp_path, patch), env, Upstream(url)) as p:
            await flood(p.session, p.url, "receptionist", "w", 40)  # 2.4 MB
            status, _, body = await post(p.session, p.url, "receptionist", "w-0")
            assert status == 409 and b"Inv_ReplayOutcomeEvicted" in body
            assert b"use a new request id" in body
            # the same id with another payload is still a mismatch, as before eviction
            async with p.session.post(p.url + "/appointments",
                                      json={"patient_id": "p2", "slot": "other"},
                                      headers={"X-API-Key": KEYS["receptionist"],
                                               "Idempotency-Key": "w-0"}) as r:
                assert r.status == 409 and b"Inv_ReplayPayloadMismatch" in await r.read()
            status, headers, _ = await post(p.session, p.url, "receptionist", "w-39")
            assert status == 201 and headers.get("Idempotent-Replayed") == "true"
            assert deliveries["w-0"] == 1 and deliveries["w-39"] == 1
            assert sum(deliveries.values()) == 40


# ------------------------------------------------------------ budget accounting


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def outcome(size: int) -> StoredOutcome:
    return StoredOutcome(201, (("Content-Type", "application/json"),), b"x" * size, True)


def recount(store: MemoryAdmissionStore) -> int:
    """The store's bytes counted afresh from what it holds."""
    total = 0
    for sc in store._scopes.values():
        items = sum(e.size for e in sc.done.values()) + TOMBSTONE_SIZE * len(sc.tombs)
        assert sc.items == items and sc.tomb_bytes == TOMBSTONE_SIZE * len(sc.tombs)
        assert sc.bytes == (items + SCOPE_OVERHEAD if items else 0)
        total += sc.bytes
    return total


def holdings(store: MemoryAdmissionStore) -> dict[str, tuple[set[str], set[int], int]]:
    return {name: (set(sc.done), set(sc.tombs), sc.bytes) for name, sc in store._scopes.items()}


SCOPES = ("a", "b", "c")
ops = st.lists(st.tuples(st.sampled_from(SCOPES), st.integers(0, 40), st.integers(0, 6000),
                         st.sampled_from(("complete", "complete", "complete", "release",
                                          "retry"))),
               max_size=120)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, cap_kb=st.integers(4, 40))
def test_budget_accounting_and_fair_share(ops: list[tuple[str, int, int, str]],
                                          cap_kb: int) -> None:
    """After every step the stored bytes never exceed the cap and match a recount;
    when a step by scope T pushes anything out of another scope S, S held more than
    its fair share (cap / the scopes holding anything, T included) before that step;
    a finished request is replayed or refused, and claimed afresh only once its
    tombstone was dropped too."""
    cap = cap_kb * 1024

    async def run() -> None:
        clock = Clock()
        forgotten: list[int] = []
        store = MemoryAdmissionStore(clock, max_bytes=cap, on_forget=lambda: forgotten.append(1))
        completed: dict[tuple[str, int], StoredOutcome] = {}
        for scope, key, size, op in ops:
            clock.now += 0.001
            claim = Claim(scope, f"k{key}", f"fp{key}", 15.0)
            before = holdings(store)
            holding = {name for name, (_, _, b) in before.items() if b} | {scope}
            admission = await store.admit(scope, claim, (), True)
            if (scope, key) in completed:
                state = admission.claim_state
                assert state in (ClaimState.REPLAY, ClaimState.EVICTED) or (
                    admission.claimed and forgotten)
                if state is ClaimState.REPLAY:
                    assert admission.outcome == completed[(scope, key)]
                if admission.claimed:
                    del completed[(scope, key)]
            if admission.claimed:
                if op == "complete":
                    out = outcome(size)
                    await store.complete(claim, out, 86_400)
                    completed[(scope, key)] = out
                else:
                    await store.release(claim)
            assert store.stored_bytes == recount(store) <= cap
            assert store.in_flight == 0
            after = holdings(store)
            for name, (done, tombs, held) in before.items():
                if name == scope:
                    continue
                now_done, now_tombs, _ = after.get(name, (set(), set(), 0))
                if done != now_done or tombs != now_tombs:
                    assert held > cap / len(holding), (name, held, cap, holding)

    asyncio.run(run())


@settings(max_examples=100, deadline=None)
@given(mine=st.lists(st.integers(0, 2000), min_size=1, max_size=6),
       flood=st.lists(st.tuples(st.sampled_from(("b", "c")), st.integers(0, 8000)),
                      max_size=200))
def test_a_scope_within_its_share_is_never_evicted(mine: list[int],
                                                   flood: list[tuple[str, int]]) -> None:
    """Scope a's outcomes fit in a third of the cap: however scopes b and c flood
    the store, every one of a's requests is still replayed."""
    async def run() -> None:
        clock = Clock()
        sizes = [900 + s for s in mine]
        cap = 3 * (SCOPE_OVERHEAD + sum(s + 1000 for s in sizes))
        store = MemoryAdmissionStore(clock, max_bytes=cap)
        for i, size in enumerate(sizes):
            claim = Claim("a", f"a{i}", f"fa{i}", 15.0)
            assert (await store.admit("a", claim, (), True)).claimed
            await store.complete(claim, outcome(size), 86_400)
        assert store.scope_bytes("a") <= cap / 3
        for i, (scope, size) in enumerate(flood):
            claim = Claim(scope, f"f{i}", f"ff{i}", 15.0)
            assert (await store.admit(scope, claim, (), True)).claimed
            await store.complete(claim, outcome(size), 86_400)
            assert store.stored_bytes <= cap
        for i, size in enumerate(sizes):
            again = await store.admit("a", Claim("a", f"a{i}", f"fa{i}", 15.0), (), True)
            assert again.claim_state is ClaimState.REPLAY
            assert again.outcome == outcome(size)

    asyncio.run(run())


async def test_tombstones_expire_with_the_outcome_ttl() -> None:
    clock = Clock()
    store = MemoryAdmissionStore(clock, max_bytes=8 * 1024)
    for i in range(20):
        claim = Claim("s", f"k{i}", f"fp{i}", 15.0)
        assert (await store.admit("s", claim, (), True)).claimed
        await store.complete(claim, outcome(1000), 3600)
    assert store.tombstones > 0
    gone = max(i for i in range(20) if f"k{i}" not in store._scopes["s"].done)
    tomb = await store.admit("s", Claim("s", f"k{gone}", f"fp{gone}", 15.0), (), True)
    replay = await store.admit("s", Claim("s", "k19", "fp19", 15.0), (), True)
    assert tomb.claim_state is ClaimState.EVICTED and not tomb.claimed
    assert replay.claim_state is ClaimState.REPLAY
    clock.now += 3601  # the outcome's TTL has passed: the id is free again, as in Redis
    fresh = await store.admit("s", Claim("s", f"k{gone}", f"fp{gone}", 15.0), (), True)
    assert fresh.claim_state is ClaimState.NEW and fresh.claimed
    clock.now += 61  # the periodic sweep drops whatever else expired
    await store.admit("s", None, (), True)
    assert store.tombstones == 0 and store.stored_bytes == 0 and len(store) == 0
