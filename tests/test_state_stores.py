"""One behavioural table for the admission store, run against the embedded
store and a real redis-server (standalone)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.embedded.memory import MemoryAdmissionStore
from proxy.ports import Claim, ClaimState, RateCheck, StoredOutcome
from proxy.redisstate import RedisAdmissionStore, RedisConnection, RedisSettings
from tests.servers import RedisClusterServers, RedisServer
from tests.waiting import wait_until

_PREFIXES = itertools.count()
# these tests check semantics, not latency: a loaded CI machine must not turn
# 200 concurrent calls into timeouts (the 200 ms default is tested elsewhere)
SEMANTICS_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryAdmissionStore()
        return
    if request.param == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        # each test gets its own key prefix on the shared three-master cluster
        prefix = f"t{next(_PREFIXES)}"
        conn = RedisConnection(RedisSettings(cluster.url, cluster=True, key_prefix=prefix,
                                             timeout_s=SEMANTICS_TIMEOUT_S))
        assert await conn.prepare()
        try:
            yield RedisAdmissionStore(conn)
        finally:
            await conn.close()
        return
    server = RedisServer(tmp_path / "redis")
    server.start()
    conn = RedisConnection(RedisSettings(server.url, timeout_s=SEMANTICS_TIMEOUT_S))
    assert await conn.prepare()
    try:
        yield RedisAdmissionStore(conn)
    finally:
        await conn.close()
        server.stop()


def claim(key: str = "k1", fp: str = "fp1", lease: float = 5.0, scope: str = "s1") -> Claim:
    return Claim(scope, key, fp, lease)


def check(rule: str = "r", key: str = "r:p1", limit: int = 2, window: float = 60,
          cost: int = 1) -> RateCheck:
    return RateCheck(rule, key, limit, window, cost)


OUTCOME = StoredOutcome(201, (("Content-Type", "application/json"), ("ETag", '"1"')),
                        b'{"id": "a-1"}', True)


async def test_new_claim_then_in_flight_then_replay(store: Any) -> None:
    first = await store.admit("s1", claim(), [], True)
    assert first.claim_state is ClaimState.NEW and first.claimed
    again = await store.admit("s1", claim(), [], True)
    assert again.claim_state is ClaimState.IN_FLIGHT and not again.claimed
    await store.complete(claim(), OUTCOME, 60)
    replay = await store.admit("s1", claim(), [], True)
    assert replay.claim_state is ClaimState.REPLAY
    assert replay.outcome == OUTCOME


async def test_mismatch_changes_nothing(store: Any) -> None:
    await store.admit("s1", claim(fp="a"), [], True)
    got = await store.admit("s1", claim(fp="b"), [check()], True)
    assert got.claim_state is ClaimState.MISMATCH
    # the rate check was not consumed: two more pass, the third refuses
    for _ in range(2):
        assert (await store.admit("s1", None, [check()], True)).refused_rule is None
    assert (await store.admit("s1", None, [check()], True)).refused_rule == "r"


async def test_release_frees_the_key_only_for_its_fingerprint(store: Any) -> None:
    await store.admit("s1", claim(fp="a"), [], True)
    await store.release(claim(fp="other"))
    assert (await store.admit("s1", claim(fp="a"), [], True)).claim_state is ClaimState.IN_FLIGHT
    await store.release(claim(fp="a"))
    assert (await store.admit("s1", claim(fp="a"), [], True)).claimed


async def test_completed_outcome_is_not_released(store: Any) -> None:
    await store.admit("s1", claim(), [], True)
    await store.complete(claim(), OUTCOME, 60)
    await store.release(claim())
    assert (await store.admit("s1", claim(), [], True)).claim_state is ClaimState.REPLAY


async def claimable(store: Any) -> bool:
    return bool((await store.admit("s1", claim(), [], True)).claimed)


async def test_lease_expires_an_abandoned_claim(store: Any) -> None:
    # the lease leaves ample time for the in-flight check right after the claim
    await store.admit("s1", claim(lease=1.0), [], True)  # its holder "crashes"
    assert (await store.admit("s1", claim(), [], True)).claim_state is ClaimState.IN_FLIGHT
    await wait_until(lambda: claimable(store), "the abandoned claim's lease to expire")


async def test_outcome_ttl(store: Any) -> None:
    await store.admit("s1", claim(), [], True)
    await store.complete(claim(), OUTCOME, 0.3)
    await wait_until(lambda: claimable(store), "the stored outcome's TTL to expire")


async def test_not_proceeding_consumes_nothing_and_claims_nothing(store: Any) -> None:
    got = await store.admit("s1", claim(), [check(limit=1)], False)
    assert got.claim_state is ClaimState.NEW and not got.claimed
    assert (await store.admit("s1", claim(), [check(limit=1)], True)).claimed


async def test_rate_limit_refuses_with_retry_after(store: Any) -> None:
    c = check(limit=2, window=10)
    assert (await store.admit("s1", None, [c], True)).refused_rule is None
    assert (await store.admit("s1", None, [c], True)).refused_rule is None
    refused = await store.admit("s1", None, [c], True)
    assert refused.refused_rule == "r"
    assert 4.5 <= refused.retry_after_s <= 5.01  # one emission interval (10 s / 2)


async def test_refusal_takes_no_claim_and_is_all_or_nothing(store: Any) -> None:
    loose, tight = check("loose", "l", limit=10), check("tight", "t", limit=1)
    assert (await store.admit("s1", claim("a"), [loose, tight], True)).claimed
    got = await store.admit("s1", claim("b"), [loose, tight], True)
    assert got.refused_rule == "tight" and not got.claimed
    # the refused admission consumed nothing from 'loose' (10 per window)
    for i in range(9):
        assert (await store.admit("s1", None, [loose], True)).refused_rule is None, i
    assert (await store.admit("s1", None, [loose], True)).refused_rule == "loose"
    # and 'b' was not claimed
    assert (await store.admit("s1", claim("b"), [], True)).claimed


async def test_cost_counts_against_the_limit(store: Any) -> None:
    assert (await store.admit("s1", None, [check(limit=5, cost=3)], True)).refused_rule is None
    assert (await store.admit("s1", None, [check(limit=5, cost=3)], True)).refused_rule == "r"
    assert (await store.admit("s1", None, [check(limit=5, cost=2)], True)).refused_rule is None


async def test_scopes_are_separate_buckets(store: Any) -> None:
    c = check(limit=1)
    assert (await store.admit("tenant-a", None, [c], True)).refused_rule is None
    assert (await store.admit("tenant-b", None, [c], True)).refused_rule is None
    assert (await store.admit("tenant-a", None, [c], True)).refused_rule == "r"


async def test_concurrent_claims_exactly_one_wins(store: Any) -> None:
    results = await asyncio.gather(*(store.admit("s1", claim(), [], True) for _ in range(50)))
    assert sum(1 for r in results if r.claimed) == 1
    assert all(r.claim_state in (ClaimState.NEW, ClaimState.IN_FLIGHT) for r in results)


async def test_limit_is_exact_under_concurrency(store: Any) -> None:
    c = check(limit=7, window=60)
    results = await asyncio.gather(*(store.admit("s1", None, [c], True) for _ in range(200)))
    assert sum(1 for r in results if r.refused_rule is None) == 7


async def test_binary_and_incomplete_bodies_round_trip(store: Any) -> None:
    outcome = StoredOutcome(500, (), bytes(range(256)) * 3, False)
    await store.admit("s1", claim(), [], True)
    await store.complete(claim(), outcome, 60)
    got = await store.admit("s1", claim(), [], True)
    assert got.outcome == outcome


def quota(rule: str = "b:daily", key: str = "b:daily:2026-11-26", limit: int = 10,
          left: float = 3600, cost: int = 1) -> RateCheck:
    return RateCheck(rule, key, limit, left, cost, quota=True, warn_at=0.9)


async def test_budget_warns_at_90_percent_and_stops_at_100(store: Any) -> None:
    q = quota(limit=10, cost=3)
    got = [await store.admit("t1", None, [q], True) for _ in range(4)]
    # 3, 6, 9 (90% -> warning), then 12 > 10: refused with the period's time left
    assert [g.warnings for g in got[:3]] == [(), (), ("b:daily 9/10",)]
    assert got[3].refused_rule == "b:daily" and got[3].refused_quota
    assert got[3].retry_after_s == pytest.approx(3600, abs=1)
    # a cheaper request still fits exactly at 100%
    last = await store.admit("t1", None, [quota(limit=10, cost=1)], True)
    assert last.refused_rule is None and last.warnings == ("b:daily 10/10",)


async def test_budget_is_per_period_key_and_per_tenant(store: Any) -> None:
    q = quota(limit=1)
    assert (await store.admit("t1", None, [q], True)).refused_rule is None
    assert (await store.admit("t1", None, [q], True)).refused_quota
    assert (await store.admit("t2", None, [q], True)).refused_rule is None  # other tenant
    tomorrow = quota(limit=1, key="b:daily:2026-11-27")
    assert (await store.admit("t1", None, [tomorrow], True)).refused_rule is None


async def test_budget_and_rate_limit_refusals_consume_nothing(store: Any) -> None:
    q, r = quota(limit=1), check(limit=1)
    assert (await store.admit("t1", None, [r], True)).refused_rule is None
    refused = await store.admit("t1", claim(scope="t1"), [q, r], True)  # rate limit refuses
    assert refused.refused_rule == "r" and not refused.refused_quota and not refused.claimed
    # the budget was not charged by the refused request
    assert (await store.admit("t1", None, [q], True)).refused_rule is None


async def test_budget_is_exact_under_concurrency(store: Any) -> None:
    q = quota(limit=25, cost=1)
    results = await asyncio.gather(*(store.admit("t1", None, [q], True) for _ in range(200)))
    assert sum(1 for r in results if r.refused_rule is None) == 25
    assert all(r.refused_quota for r in results if r.refused_rule is not None)
