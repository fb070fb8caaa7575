"""casf-proxy with REDIS_URL: shared replay, limits and mode across replicas,
fail-closed on a real Redis outage, recovery without restart, round trips."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.config import Mode
from proxy.redisstate import RedisConnection, RedisModeStore, RedisSettings, _text
from tests.conftest import ADMIN_TOKEN, MakeProxy, Proxy, clinic_env, write_config
from tests.servers import ProxyProcess, RedisClusterServers, RedisServer
from tests.waiting import wait_until

APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}


@pytest.fixture
def redis_proxy(make_proxy: Callable[..., Any], redis_server: RedisServer) -> Callable[..., Any]:
    def factory(patch: Callable[[dict[str, Any]], None] = lambda d: None) -> Any:
        return make_proxy(patch, REDIS_URL=redis_server.url)
    return factory


async def commandstats(url: str) -> dict[str, int]:
    client = aioredis.Redis.from_url(url)
    try:
        info = await client.info("commandstats")
    finally:
        await client.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def test_replay_semantics_over_redis(redis_proxy: Any) -> None:
    async with redis_proxy() as p:
        s1, _, b1 = await p.call("POST", "/appointments", json=APPT, rid="r1")
        s2, h2, b2 = await p.call("POST", "/appointments", json=APPT, rid="r1")
        s3, _, raw = await p.call("POST", "/appointments", json={**APPT, "slot": "x"}, rid="r1")
        assert (s1, s2, s3) == (201, 201, 409)
        assert b1 == b2 and h2["Idempotent-Replayed"] == "true"
        assert json.loads(raw)["reason_codes"] == ["Inv_ReplayPayloadMismatch"]
        assert len(p.upstream.seen) == 1
        async with p.session.get(p.admin + "/healthz") as r:
            body = await r.json()
            assert r.status == 200 and body["checks"]["redis"] == "ok"
            assert body["backends"]["state"] == "redis"


async def test_fifty_concurrent_same_key_reach_upstream_once(redis_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["redis"] = {"timeout_ms": 3000}  # exactness under a burst, not latency

    async with redis_proxy(patch) as p:
        p.upstream.delay_s = 0.05
        results = await asyncio.gather(*(p.call("POST", "/appointments", json=APPT, rid="same")
                                         for _ in range(50)))
        statuses = [r[0] for r in results]
        assert len(p.upstream.seen) == 1
        assert set(statuses) <= {201, 409} and 201 in statuses


async def test_limit_exact_under_200_concurrent(redis_proxy: Any) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["rate_limits"] = [{"name": "n", "tools": ["cliniccloud.create_appointment"],
                             "key": "{principal.id}", "limit": 12, "window_seconds": 60}]
        # 200 requests at once keep one event loop busy for longer than the
        # 200 ms default: that would (correctly) fail some closed; this test is
        # about exactness, so it gives the Redis calls room
        d["redis"] = {"timeout_ms": 3000}

    async with redis_proxy(patch) as p:
        results = await asyncio.gather(*(
            p.call("POST", "/appointments", json={**APPT, "slot": str(i)}, rid=f"c{i}")
            for i in range(200)))
        statuses = [r[0] for r in results]
        assert statuses.count(201) == 12 and statuses.count(429) == 188
        assert len(p.upstream.seen) == 12


async def test_sms_rule_over_redis(redis_proxy: Any) -> None:
    async with redis_proxy() as p:
        sms = {"patient_id": "p1", "message": "m"}
        assert (await p.call("POST", "/sms", json=sms, key="nurse", rid="s1"))[0] == 201
        status, hdrs, _ = await p.call("POST", "/sms", json=sms, key="nurse", rid="s2")
        assert status == 429 and 3590 <= int(hdrs["Retry-After"]) <= 3600


async def test_outage_fails_closed_and_recovers_without_restart(
        redis_proxy: Any, redis_server: RedisServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"].append({"method": "POST", "path": "/notes", "tool": "cliniccloud.note",
                            "effect": "write", "fail_mode": "open"})
        d["policy"]["bundle"] = str(Path(__file__).parent / "fixtures" / "allow_all")

    async with redis_proxy(patch) as p:
        assert (await p.call("POST", "/appointments", json=APPT, rid="before"))[0] == 201
        redis_server.stop()
        status, hdrs, raw = await p.call("POST", "/appointments", json=APPT, rid="during")
        assert status == 503
        env = json.loads(raw)
        assert env["reason_codes"] == ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"]
        assert env["decision"] == "DENY" and hdrs["Retry-After"]
        sms = {"patient_id": "p1", "message": "m"}
        assert (await p.call("POST", "/sms", key="nurse", json=sms, rid="sms"))[0] == 503
        # reads fail open; a write route overridden to fail open is forwarded too
        assert (await p.call("GET", "/appointments"))[0] == 200
        assert (await p.call("POST", "/notes", json={"x": 1}, rid="n1"))[0] == 201
        assert p.upstream.paths() == ["/appointments", "/appointments", "/notes"]
        async with p.session.get(p.admin + "/healthz") as r:
            assert r.status == 503 and (await r.json())["checks"]["redis"] == "unavailable"
        assert 'casf_fail_closed_total{trigger="redis"} 2.0' in await p.metrics()
        redis_server.start()  # same port, empty data
        status, _, _ = await p.call("POST", "/appointments", json=APPT, rid="after")
        assert status == 201
        async with p.session.get(p.admin + "/healthz") as r:
            assert r.status == 200, await r.text()


async def test_noscript_is_reloaded(redis_proxy: Any, redis_server: RedisServer) -> None:
    async with redis_proxy() as p:
        assert (await p.call("POST", "/appointments", json=APPT, rid="a"))[0] == 201
        client = aioredis.Redis.from_url(redis_server.url)
        await client.script_flush()
        await client.aclose()
        assert (await p.call("POST", "/appointments", json=APPT, rid="b"))[0] == 201


async def test_round_trips_per_request(redis_proxy: Any, redis_server: RedisServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["redis"] = {"mode_refresh_ms": 600000}  # no background reads during the count

    async with redis_proxy(patch) as p:
        await p.call("POST", "/appointments", json=APPT, rid="warm")  # scripts loaded
        await p.call("GET", "/appointments")
        before = await commandstats(redis_server.url)
        await p.call("POST", "/appointments", json=APPT, rid="counted")
        mid = await commandstats(redis_server.url)
        await p.call("GET", "/appointments")
        after = await commandstats(redis_server.url)

    # commandstats also counts the commands a script runs inside Redis; a round
    # trip is a command the proxy sends itself
    top_level = {"evalsha", "eval", "script|load", "get", "set", "publish", "ping", "del",
                 "mget", "hgetall", "incrby", "multi", "exec"}

    def diff(a: dict[str, int], b: dict[str, int]) -> int:
        return sum(b[k] - a.get(k, 0) for k in b if k in top_level)

    write_trips, read_trips = diff(before, mid), diff(mid, after)
    print(f"redis round trips: write={write_trips} read={read_trips}")
    assert write_trips == 2  # admission script + outcome
    assert read_trips == 0  # no claim and no rate rule on this read route


async def test_abandoned_claim_expires_after_lease(
        tmp_path: Path, redis_server: RedisServer, make_proxy: MakeProxy) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["replay"]["lease_seconds"] = 1

    async with make_proxy(patch, REDIS_URL=redis_server.url) as p:
        # replica A takes the claim and dies (SIGKILL) while the upstream is still busy
        env = dict(clinic_env(p.upstream.url, tmp_path, REDIS_URL=redis_server.url,
                              CASF_AUDIT_PATH=str(tmp_path / "a.db")).variables)
        a = ProxyProcess(p.cfg.source, env, tmp_path / "a.log")
        a.start()
        held = p.upstream.hold_next()  # the upstream is still busy with A's request
        async with aiohttp.ClientSession() as s:
            req = asyncio.ensure_future(s.post(a.url + "/appointments", json=APPT, headers={
                "X-API-Key": "demo-receptionist", "Idempotency-Key": "crash"}))
            await held.wait_arrived()  # A holds the claim: it forwarded the request
            a.kill()
            with pytest.raises(aiohttp.ClientError):
                await req
        status, _, raw = await p.call("POST", "/appointments", json=APPT, rid="crash")
        assert status == 409 and b"Inv_ReplayConcurrent" in raw

        async def claimable() -> bool:  # 409 until the lease (1 s) runs out
            return (await p.call("POST", "/appointments", json=APPT, rid="crash"))[0] == 201

        await wait_until(claimable, "the abandoned claim to expire with its lease",
                         interval=0.05)


async def test_mode_switch_reaches_other_process_within_a_second(
        tmp_path: Path, redis_server: RedisServer, make_proxy: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="casf.redis")
    async with make_proxy(REDIS_URL=redis_server.url) as b:
        env = dict(clinic_env(b.upstream.url, tmp_path, REDIS_URL=redis_server.url,
                              CASF_AUDIT_PATH=str(tmp_path / "a.db")).variables)
        a = ProxyProcess(b.cfg.source, env, tmp_path / "a.log")
        a.start()
        try:
            async with aiohttp.ClientSession() as s:
                async with s.put(a.admin + "/admin/mode", json={"mode": "READ_ONLY"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                    assert r.status == 200
                await wait_until(lambda: b.rt.mode.current().value == "READ_ONLY",
                                 "the mode to reach the other replica", timeout=1.0)
            status, _, raw = await b.call("POST", "/appointments", json=APPT, rid="m1")
            assert status == 403 and b"Mode_ReadOnly_NoWrite" in raw
            # a replica that cannot reach Redis keeps the last mode it saw
            redis_server.stop()
            await wait_until(lambda: follower_warned(caplog),
                             "the mode follower to notice that Redis is gone")
            assert b.rt.mode.current().value == "READ_ONLY"
            redis_server.start()
        finally:
            assert a.stop() == 0


async def test_mode_relaxation_needs_redis(redis_proxy: Any, redis_server: RedisServer) -> None:
    async with redis_proxy() as p:
        await p.set_mode("READ_ONLY")
        redis_server.stop()
        async with p.session.put(p.admin + "/admin/mode", json={"mode": "ALLOW"},
                                 headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 503
            body = await r.json()
            assert body["reason_codes"] == ["FAIL_CLOSED", "Inv_ModeStoreUnavailable"]
        assert p.rt.mode.current().value == "READ_ONLY"
        redis_server.start()


UNAVAILABLE = "mode follower: Redis unavailable"


def follower_warned(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the mode follower warned that Redis is unavailable."""
    return [r.getMessage().startswith(UNAVAILABLE) for r in caplog.records].count(True)


async def wait_for_mode(read: Callable[[], Awaitable[str]], want: str, within: float) -> float:
    """Poll ``read`` until it answers ``want``; the seconds that took (fails after ``within``)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    seen: list[str] = []

    async def arrived() -> bool:
        seen.append(await read())
        return seen[-1] == want

    await wait_until(arrived, lambda: f"mode {want} (still {seen[-1]})", timeout=within,
                     interval=0.02)
    return loop.time() - t0


async def test_replica_started_while_redis_is_down_follows_the_mode_once_it_is_back(
        tmp_path: Path, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture) -> None:
    # the mode follower of a replica started without Redis meets redis-py's
    # RuntimeError (pub/sub never subscribed) and connection errors: it must
    # survive them, warn once, take up a KILL_SWITCH set once Redis is back,
    # and the replica must still shut down cleanly (exit 0)
    redis_server = RedisServer(tmp_path / "redis")  # its port, not started yet
    caplog.set_level(logging.WARNING, logger="casf.redis")
    a: ProxyProcess | None = None
    try:
        async with make_proxy(REDIS_URL=redis_server.url) as b:
            env = dict(clinic_env(b.upstream.url, tmp_path, REDIS_URL=redis_server.url,
                                  CASF_AUDIT_PATH=str(tmp_path / "a.db")).variables)
            a = ProxyProcess(b.cfg.source, env, tmp_path / "a.log")
            a.start()
            log = a.log
            await wait_until(lambda: follower_warned(caplog) and UNAVAILABLE in log.read_text(),
                             "both replicas' mode followers to meet the outage")
            # the outage lasts several follower turns (retries 0.25, 0.5, 1 s apart):
            # its length is the behaviour under test (one warning per outage, not
            # per turn), not a wait for something to happen
            await asyncio.sleep(1.0)
            assert b.rt.mode.current() is Mode.ALLOW
            redis_server.start()
            conn = RedisConnection(RedisSettings(redis_server.url))
            try:  # another replica's store switches the mode
                await RedisModeStore(conn, Mode.ALLOW).set(Mode.KILL_SWITCH)
            finally:
                await conn.close()

            async def in_process() -> str:
                return b.rt.mode.current().value

            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with aiohttp.ClientSession(headers=auth) as s:
                async def subprocess_mode() -> str:
                    async with s.get(a.admin + "/admin/mode") as r:
                        assert r.status == 200
                        return str((await r.json())["mode"])

                took_b, took_a = await asyncio.gather(
                    wait_for_mode(in_process, "KILL_SWITCH", 3.0),
                    wait_for_mode(subprocess_mode, "KILL_SWITCH", 3.0))
            print(f"KILL_SWITCH taken up {took_b:.3f} s (in-process replica), "
                  f"{took_a:.3f} s (subprocess replica) after it was set")
            status, _, raw = await b.call("GET", "/appointments")
            assert status == 403 and b"Mode_KillSwitch" in raw
            # still running (a task that died would no longer be listed)
            (follower,) = [t for t in asyncio.all_tasks() if t.get_name() == "casf-mode-follow"]
            assert follower_warned(caplog) == 1  # once per outage, not per turn
            assert a.log.read_text().count(UNAVAILABLE) == 1
            code = a.stop()
        assert code == 0, a.log.read_text()[-2000:]
        assert follower.cancelled()  # stopped by the shutdown, not dead of an error
    finally:
        if a is not None:
            a.kill()
        redis_server.stop()


async def test_mode_follower_resubscribes_after_a_redis_restart(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    # the key is re-read only every 30 s: within this test, a change can only
    # arrive by pub/sub, so the follower must subscribe again after the restart
    caplog.set_level(logging.WARNING, logger="casf.redis")
    settings = RedisSettings(redis_server.url, mode_refresh_s=30.0)
    conn, other = RedisConnection(settings), RedisConnection(settings)
    replica, admin = RedisModeStore(conn, Mode.ALLOW), RedisModeStore(other, Mode.ALLOW)

    async def current() -> str:
        return replica.current().value

    await replica.start()
    try:
        await admin.set(Mode.READ_ONLY)
        await wait_for_mode(current, "READ_ONLY", 2.0)
        redis_server.stop()  # the follower's pub/sub connection is lost
        await wait_until(lambda: follower_warned(caplog),
                         "the mode follower to notice the lost connection")
        assert replica.current() is Mode.READ_ONLY  # the last mode seen is kept
        # the outage outlasts a retry (1 s apart here): its length is the behaviour
        # under test (one warning per outage), not a wait for something to happen
        await asyncio.sleep(1.5)
        assert replica.current() is Mode.READ_ONLY
        redis_server.start()  # same port, empty data
        await admin.set(Mode.KILL_SWITCH)
        took = await wait_for_mode(current, "KILL_SWITCH", 3.0)
        print(f"KILL_SWITCH taken up {took:.3f} s after it was set")
        assert follower_warned(caplog) == 1
    finally:
        await replica.close()  # raises if the follower died of an error
        await conn.close()
        await other.close()


async def test_shadow_mode_does_not_forward_past_a_dead_redis(
        redis_proxy: Any, redis_server: RedisServer) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["routes"][1]["enforce"] = False  # POST /appointments in shadow mode

    async with redis_proxy(patch) as p:
        redis_server.stop()
        status, _, raw = await p.call("POST", "/appointments", json=APPT, rid="sh-1")
        assert status == 503
        assert json.loads(raw)["reason_codes"] == ["FAIL_CLOSED", "Inv_ReplayCheckUnavailable"]
        assert p.upstream.seen == []
        redis_server.start()


async def test_counters_without_a_claim_fail_closed_as_rate_limit_unavailable(
        redis_proxy: Any, redis_server: RedisServer) -> None:
    # a read route with a rate limit, overridden to fail closed: no claim is
    # involved, so the failure is the limiter's
    def patch(d: dict[str, Any]) -> None:
        d["routes"][0]["fail_mode"] = "closed"  # GET /appointments
        d["rate_limits"].append({"name": "reads", "tools": ["cliniccloud.list_appointments"],
                                 "key": "{principal.id}", "limit": 100, "window_seconds": 60})

    async with redis_proxy(patch) as p:
        assert (await p.call("GET", "/appointments"))[0] == 200
        redis_server.stop()
        status, hdrs, raw = await p.call("GET", "/appointments")
        assert status == 503 and hdrs["Retry-After"]
        assert json.loads(raw)["reason_codes"] == ["FAIL_CLOSED", "Inv_RateLimitUnavailable"]
        assert p.upstream.paths() == ["/appointments"]
        redis_server.start()


def test_two_replicas_share_a_config(tmp_path: Path) -> None:
    # the fixture config is reusable by subprocess replicas (guards the helpers above)
    cfg = write_config(tmp_path, lambda d: None)
    assert cfg.exists()
    assert isinstance(Proxy, type)


async def test_proxy_on_a_three_master_cluster(tmp_path: Path, make_proxy: Any) -> None:
    cluster = RedisClusterServers(tmp_path / "cluster")
    cluster.start()
    try:
        def patch(d: dict[str, Any]) -> None:
            d["redis"] = {"cluster": True}

        async with make_proxy(patch, REDIS_URL=cluster.url) as p:
            s1, _, b1 = await p.call("POST", "/appointments", json=APPT, rid="c1")
            s2, h2, b2 = await p.call("POST", "/appointments", json=APPT, rid="c1")
            s3, _, raw = await p.call("POST", "/appointments", json={**APPT, "slot": "y"},
                                      rid="c1")
            assert (s1, s2, s3) == (201, 201, 409) and b1 == b2
            assert h2["Idempotent-Replayed"] == "true" and b"Inv_ReplayPayloadMismatch" in raw
            sms = {"patient_id": "p1", "message": "m"}
            assert (await p.call("POST", "/sms", json=sms, key="nurse", rid="s1"))[0] == 201
            assert (await p.call("POST", "/sms", json=sms, key="nurse", rid="s2"))[0] == 429
            async with p.session.put(p.admin + "/admin/mode", json={"mode": "READ_ONLY"},
                                     headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
                assert r.status == 200
            assert (await p.call("POST", "/appointments", json=APPT, rid="c2"))[0] == 403
            async with p.session.get(p.admin + "/healthz") as r:
                assert r.status == 200 and (await r.json())["checks"]["redis"] == "ok"
            assert p.upstream.paths() == ["/appointments", "/sms"]
    finally:
        cluster.stop()


async def test_mode_survives_a_redis_restart_that_lost_it(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Redis comes back empty: the replica that saw KILL_SWITCH puts it back, so a
    replica started afterwards (config default ALLOW) enforces KILL_SWITCH too."""
    caplog.set_level(logging.WARNING, logger="casf.redis")
    settings = RedisSettings(redis_server.url, mode_refresh_s=0.1)
    conn, late_conn = RedisConnection(settings), RedisConnection(settings)
    replica = RedisModeStore(conn, Mode.ALLOW)

    async def current() -> str:
        return replica.current().value

    await replica.start()
    late: RedisModeStore | None = None
    try:
        await replica.set(Mode.KILL_SWITCH)
        redis_server.stop()
        await wait_until(lambda: follower_warned(caplog),
                         "the mode follower to notice that Redis is gone")
        redis_server.start()  # same port, no data: the mode key is gone

        async def restored() -> Any:
            with contextlib.suppress(Exception):
                return await conn.client.get(replica.key)
            return None

        raw = await wait_until(restored, "the replica to put its mode back into Redis",
                               interval=0.05)
        assert _text(raw) == "KILL_SWITCH"
        assert (await current()) == "KILL_SWITCH"
        late = RedisModeStore(late_conn, Mode.ALLOW)
        await late.start()
        assert late.current() is Mode.KILL_SWITCH
    finally:
        if late is not None:
            await late.close()
        await replica.close()
        await conn.close()
        await late_conn.close()
