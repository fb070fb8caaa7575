"""The emergency stop during a Redis outage.

A switch to a more restrictive mode takes effect on the replica that receives
it while Redis is down, survives that replica's restart (the mode state file)
and is published once Redis answers, by the merge rule: the more restrictive
mode wins. A less restrictive switch still needs Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.config import Mode, load_config
from proxy.embedded.memory import ModeStateFile, SavedMode
from proxy.redisstate import RedisConnection, RedisModeStore, RedisSettings, _text
from tests.conftest import ADMIN_TOKEN, Proxy, clinic_env, write_config
from tests.servers import RedisServer

APPT = {"patient_id": "p1", "slot": "2026-11-23T10:00:00Z"}
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def put_mode(p: Proxy, mode: str) -> tuple[int, dict[str, Any]]:
    async with p.session.put(p.admin + "/admin/mode", json={"mode": mode}, headers=AUTH) as r:
        return r.status, await r.json()


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)


async def redis_mode(url: str) -> str | None:
    client = aioredis.Redis.from_url(url)
    try:
        raw = await client.get("casf:{mode}:current")
    except Exception:
        return None
    finally:
        await client.aclose()
    return None if raw is None else _text(raw)


async def test_kill_switch_during_a_redis_outage(
        make_proxy: Callable[..., Any], redis_server: RedisServer, tmp_path: Path) -> None:
    state = tmp_path / "casf-mode.json"  # mode.state_path's default: next to the audit file
    async with make_proxy(REDIS_URL=redis_server.url) as p:
        assert p.cfg.mode_state_path == state
        status, _, _ = await p.call("GET", "/appointments?patient_id=p1")
        assert status == 200
        seen = len(p.upstream.seen)
        redis_server.stop()

        status, body = await put_mode(p, "KILL_SWITCH")
        assert status == 200 and body == {"mode": "KILL_SWITCH", "previous": "ALLOW",
                                          "shared": False}
        assert p.rt.mode.current() is Mode.KILL_SWITCH
        assert orjson.loads(state.read_bytes()) == {"mode": "KILL_SWITCH", "pending": True}
        status, _, raw = await p.call("GET", "/appointments?patient_id=p1")
        assert status == 403 and b"Mode_KillSwitch" in raw
        status, _, raw = await p.call("POST", "/appointments", json=APPT, rid="during")
        assert status in (403, 503)  # the mode denies it, and so does the dead Redis
        assert len(p.upstream.seen) == seen

        # lifting it needs Redis: refused, the stop stays in force
        status, body = await put_mode(p, "ALLOW")
        assert status == 503
        assert body["reason_codes"] == ["FAIL_CLOSED", "Inv_ModeStoreUnavailable"]
        assert p.rt.mode.current() is Mode.KILL_SWITCH

    # the replica restarts while Redis is still down: the stop is still in force
    async with make_proxy(REDIS_URL=redis_server.url) as p:
        assert p.rt.mode.current() is Mode.KILL_SWITCH
        status, _, raw = await p.call("GET", "/appointments?patient_id=p1")
        assert status == 403 and b"Mode_KillSwitch" in raw

        # Redis comes back (empty): the pending stop is published
        redis_server.start()

        async def published() -> bool:
            return await redis_mode(redis_server.url) == "KILL_SWITCH"

        await until(published, 10.0, "KILL_SWITCH published to Redis")

        async def saved_as_published() -> bool:
            saved: dict[str, Any] = orjson.loads(state.read_bytes())
            return saved == {"mode": "KILL_SWITCH", "pending": False}

        await until(saved_as_published, 5.0, "the state file no longer pending")

        # a second replica, which never saw it, enforces it
        conn = RedisConnection(RedisSettings(redis_server.url))
        other = RedisModeStore(conn, Mode.ALLOW)
        try:
            await other.start()
            assert other.current() is Mode.KILL_SWITCH
        finally:
            await other.close()
            await conn.close()

        # and with Redis back, the operator can lift it for everyone
        status, body = await put_mode(p, "ALLOW")
        assert status == 200 and body["shared"] is True
        assert await redis_mode(redis_server.url) == "ALLOW"
        status, _, _ = await p.call("GET", "/appointments?patient_id=p1")
        assert status == 200


@contextlib.asynccontextmanager
async def store(url: str, path: Path | None, default: Mode = Mode.ALLOW,
                start: bool = False) -> Any:
    conn = RedisConnection(RedisSettings(url, mode_refresh_s=0.05))
    s = RedisModeStore(conn, default, None if path is None else ModeStateFile(path))
    try:
        if start:
            await s.start()
        yield s
    finally:
        await s.close()
        await conn.close()


async def set_key(url: str, mode: str) -> None:
    client = aioredis.Redis.from_url(url)
    try:
        await client.set("casf:{mode}:current", mode)
    finally:
        await client.aclose()


async def test_merge_rule_the_more_restrictive_mode_wins(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Not started (no follower): the test decides when the replica reconnects."""
    async with store(redis_server.url, tmp_path / "a.json") as a, \
            store(redis_server.url, tmp_path / "b.json") as b:
        redis_server.stop()
        assert await a.set(Mode.READ_ONLY) is False
        assert await b.set(Mode.READ_ONLY) is False
        assert a.pending is b.pending is Mode.READ_ONLY
        with pytest.raises(Exception, match="redis"):
            await a.set(Mode.STEP_UP)  # less restrictive: needs Redis
        assert a.current() is Mode.READ_ONLY
        redis_server.start()

        # another replica lifted the mode meanwhile: the pending stop still wins
        await set_key(redis_server.url, "ALLOW")
        await a.refresh()
        assert await redis_mode(redis_server.url) == "READ_ONLY"
        assert a.current() is Mode.READ_ONLY and a.pending is None
        assert ModeStateFile(tmp_path / "a.json").load() == SavedMode(Mode.READ_ONLY, False)

        # Redis already holds a more restrictive mode: it stays, and the replica takes it
        await set_key(redis_server.url, "KILL_SWITCH")
        await b.refresh()
        assert await redis_mode(redis_server.url) == "KILL_SWITCH"
        assert b.current() is Mode.KILL_SWITCH and b.pending is None
        assert ModeStateFile(tmp_path / "b.json").load() == SavedMode(Mode.KILL_SWITCH, False)


async def test_a_pending_mode_is_not_lifted_by_a_laxer_message(
        redis_server: RedisServer, tmp_path: Path) -> None:
    async with store(redis_server.url, tmp_path / "a.json") as a:
        redis_server.stop()
        assert await a.set(Mode.KILL_SWITCH) is False
        redis_server.start()
        await a._apply(b"ALLOW")  # what a pub/sub message from another replica would do
        assert a.current() is Mode.KILL_SWITCH and a.pending is Mode.KILL_SWITCH


async def test_the_last_mode_seen_survives_a_restart_while_redis_is_down(
        redis_server: RedisServer, tmp_path: Path) -> None:
    path = tmp_path / "mode.json"
    async with store(redis_server.url, path, start=True) as a:
        assert await a.set(Mode.KILL_SWITCH) is True
        assert ModeStateFile(path).load() == SavedMode(Mode.KILL_SWITCH, False)
    redis_server.stop()
    async with store(redis_server.url, path, start=True) as a:
        assert a.current() is Mode.KILL_SWITCH and a.pending is None
    # the config default still applies when it is the more restrictive one
    ModeStateFile(path).save(SavedMode(Mode.STEP_UP, False))
    async with store(redis_server.url, path, default=Mode.READ_ONLY, start=True) as a:
        assert a.current() is Mode.READ_ONLY


async def test_replicas_sharing_the_state_file_adopt_a_pending_mode(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Workers of one host share the file: a stop that reached one worker while
    Redis is down reaches the others through it."""
    path = tmp_path / "mode.json"
    redis_server.stop()
    async with store(redis_server.url, path, start=True) as a, \
            store(redis_server.url, path, start=True) as b:
        assert a.current() is b.current() is Mode.ALLOW
        assert await a.set(Mode.KILL_SWITCH) is False

        async def b_stopped() -> bool:
            return b.current() is Mode.KILL_SWITCH

        await until(b_stopped, 5.0, "the other worker adopting KILL_SWITCH")
        redis_server.start()

        async def published() -> bool:
            return await redis_mode(redis_server.url) == "KILL_SWITCH"

        await until(published, 10.0, "KILL_SWITCH published to Redis")

        async def settled() -> bool:
            return a.pending is None and b.pending is None

        await until(settled, 5.0, "both workers done publishing")
        assert ModeStateFile(path).load() == SavedMode(Mode.KILL_SWITCH, False)


def test_state_file_is_replaced_atomically_and_a_bad_one_is_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = ModeStateFile(tmp_path / "sub" / "mode.json")
    assert f.load() is None
    f.save(SavedMode(Mode.READ_ONLY, True))
    f.save(SavedMode(Mode.KILL_SWITCH, True))
    assert f.load() == SavedMode(Mode.KILL_SWITCH, True)
    assert [p.name for p in f.path.parent.iterdir()] == ["mode.json"]  # no temporary left
    for bad in (b"{", b'{"mode": "PANIC", "pending": true}', b'{"pending": true}', b"[]"):
        f.path.write_bytes(bad)
        with caplog.at_level(logging.ERROR, logger="casf.state"):
            assert f.load() is None
    assert sum("unreadable mode state file" in r.getMessage() for r in caplog.records) == 4


async def test_a_sibling_does_not_overwrite_an_unpublished_stop_in_the_file(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """A replica that reads a laxer mode from Redis keeps the shared file's pending
    stop (its owner has not published it yet); once published, the file says so."""
    path = tmp_path / "mode.json"
    async with store(redis_server.url, path) as owner, store(redis_server.url, path) as sibling:
        redis_server.stop()
        assert await owner.set(Mode.KILL_SWITCH) is False
        redis_server.start()
        await set_key(redis_server.url, "READ_ONLY")
        await sibling.refresh()  # the sibling reaches Redis before the owner does
        assert sibling.current() is Mode.READ_ONLY
        assert ModeStateFile(path).load() == SavedMode(Mode.KILL_SWITCH, True)
        await owner.refresh()
        assert await redis_mode(redis_server.url) == "KILL_SWITCH"
        assert ModeStateFile(path).load() == SavedMode(Mode.KILL_SWITCH, False)


async def test_an_adopted_stop_already_published_is_not_published_again(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """A worker that took a sibling's stop from the file does not publish it once
    the file says the sibling did: that would undo a relaxation made since."""
    path = tmp_path / "mode.json"
    redis_server.stop()
    async with store(redis_server.url, path) as owner, store(redis_server.url, path) as other:
        assert await owner.set(Mode.KILL_SWITCH) is False
        await other._adopt_from_file()
        assert other.current() is Mode.KILL_SWITCH and other.pending is Mode.KILL_SWITCH
        redis_server.start()
        await owner.refresh()  # published; then the operator lifts it through Redis
        assert await owner.set(Mode.ALLOW) is True
        await other.refresh()
        assert other.current() is Mode.ALLOW and other.pending is None
        assert await redis_mode(redis_server.url) == "ALLOW"


def test_mode_state_path_is_configurable_relative_to_the_config(tmp_path: Path) -> None:
    def patch(d: dict[str, Any]) -> None:
        d["mode"]["state_path"] = "state/mode.json"

    cfg = load_config(write_config(tmp_path, patch), clinic_env("http://127.0.0.1:1", tmp_path))
    assert cfg.mode_state_path == tmp_path / "state" / "mode.json"
