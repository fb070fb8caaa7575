"""Redis's own memory eviction: the proxy says when Redis may drop its keys, and a
full Redis under ``noeviction`` makes writes fail closed, never deliver twice."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from proxy.redisstate import RedisConnection, RedisSettings
from tests.servers import RedisServer

APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}


async def test_an_evicting_memory_policy_is_reported(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    conn = RedisConnection(RedisSettings(redis_server.url))
    try:
        assert await conn.eviction_policy() is None  # no maxmemory: nothing is evicted
        await conn.client.config_set("maxmemory-policy", "allkeys-lru")
        assert await conn.eviction_policy() is None  # a policy alone evicts nothing
        await conn.client.config_set("maxmemory", "64mb")
        assert await conn.eviction_policy() == "allkeys-lru"
        with caplog.at_level(logging.ERROR, logger="casf.redis"):
            assert await conn.prepare()
        assert any("maxmemory-policy allkeys-lru" in r.getMessage() for r in caplog.records)
        await conn.client.config_set("maxmemory-policy", "noeviction")
        assert await conn.eviction_policy() is None
    finally:
        await conn.close()


async def test_a_full_noeviction_redis_fails_writes_closed(
        make_proxy: Callable[..., Any], redis_server: RedisServer) -> None:
    async with make_proxy(REDIS_URL=redis_server.url) as p:
        status, _, first = await p.call("POST", "/appointments", json=APPT, rid="before")
        assert status == 201
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            for i in range(32):  # 2 MB of other data, then a limit below what is used
                await client.set(f"filler:{i}", b"x" * (64 << 10))
            used = int((await client.info("memory"))["used_memory"])
            await client.config_set("maxmemory-policy", "noeviction")
            await client.config_set("maxmemory", str(used - (512 << 10)))
            with pytest.raises(ResponseError, match="maxmemory"):
                await client.set("one-more", b"x")
            status, _, raw = await p.call("POST", "/appointments", json=APPT, rid="while-full")
            assert status == 503 and b"Inv_ReplayCheckUnavailable" in raw
            # the finished request is still replayed (reading needs no memory)
            status, headers, again = await p.call("POST", "/appointments", json=APPT,
                                                  rid="before")
            assert status == 201 and headers.get("Idempotent-Replayed") == "true"
            assert again == first
            assert len(p.upstream.seen) == 1
        finally:
            await client.config_set("maxmemory", "0")
            await client.aclose()
