"""Shared state on Redis: the admission store and the cluster-wide mode.

One client (and connection pool) per process; every call is bounded by
``redis.timeout_ms`` (200 ms by default) on top of the client's own socket
timeouts, and every Redis or network error is translated into
:class:`~proxy.ports.StoreUnavailable` — the pipeline turns that into
fail-closed 503s on writes. redis-py retries at most once, immediately (that
replaces a pooled connection that went stale, e.g. after a Redis restart);
the call's time bound applies to the whole attempt.

Keys (``casf`` is ``redis.key_prefix``)::

    casf:{S}:idem:<sha256(principal, id)>  hash: st (P|D), fp, status, headers, body, complete
    casf:{S}:rl:<rule>:<rendered key>      GCRA theoretical arrival time (ms, Redis clock)
    casf:{S}:rl:<budget>:<period>:<id>     budget: cost used in that period (integer)
    casf:{mode}:current                    the operator mode
    casf:{mode}:changes                    pub/sub channel announcing mode changes

``{S}`` is the request's state scope (from its tenant, see
``proxy.stages.replay.state_scope``) used as the cluster hash tag, so all
keys one request touches live in one slot and the admission script runs
atomically on Redis Cluster too. Rate-limit buckets are therefore per
tenant, on Redis and embedded alike.

Scripts are loaded once and called with EVALSHA (redis-py reloads them on
NOSCRIPT). Time comes from Redis (``TIME``) so all replicas share one clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from proxy.config import Mode
from proxy.embedded.memory import ModeStateFile, SavedMode
from proxy.ports import (
    MODE_RANK,
    Admission,
    Claim,
    ClaimState,
    RateCheck,
    StoredOutcome,
    StoreUnavailable,
    stricter,
)
from proxy.tasks import spawn

log = logging.getLogger("casf.redis")
T = TypeVar("T")

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local has_claim = ARGV[1] == '1'
local first = 1
if has_claim then
  first = 2
  local cur = redis.call('HMGET', KEYS[1], 'st', 'fp')
  if cur[1] then
    if cur[2] ~= ARGV[2] then return {'mismatch'} end
    if cur[1] == 'P' then return {'in_flight'} end
    local o = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body', 'complete')
    return {'replay', o[1], o[2], o[3], o[4]}
  end
end
if ARGV[4] ~= '1' then return {'new'} end
local vals, warn = {}, {}
for i = first, #KEYS do
  local a = 5 + (i - first) * 6
  local limit, window, cost = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if ARGV[a + 4] == '1' then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0') + cost
    if used > limit then
      return {'refused', ARGV[a + 3], string.format('%.3f', window), '1'}
    end
    if used >= tonumber(ARGV[a + 5]) * limit then
      warn[#warn + 1] = ARGV[a + 3] .. ' ' .. used .. '/' .. limit
    end
    vals[i] = tostring(used)
  else
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + cost * (window / limit)
    if new_tat - now > window + 0.000001 then
      return {'refused', ARGV[a + 3], string.format('%.3f', new_tat - now - window), '0'}
    end
    vals[i] = string.format('%.3f', new_tat)
  end
end
for i = first, #KEYS do
  local a = 5 + (i - first) * 6
  if ARGV[a + 4] == '1' then
    redis.call('SET', KEYS[i], vals[i], 'PX', math.ceil(tonumber(ARGV[a + 1])) + 60000)
  else
    redis.call('SET', KEYS[i], vals[i], 'PX', math.ceil(tonumber(vals[i]) - now) + 1)
  end
end
local verdict = 'ok'
if has_claim then
  redis.call('HSET', KEYS[1], 'st', 'P', 'fp', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  verdict = 'claimed'
end
table.insert(warn, 1, verdict)
return warn
"""

COMPLETE = """
local cur = redis.call('HMGET', KEYS[1], 'st', 'fp')
if cur[1] ~= 'P' or cur[2] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'st', 'D', 'status', ARGV[2], 'headers', ARGV[3], 'body', ARGV[4],
           'complete', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"""

# the merge rule for a mode set while Redis was unreachable: it is written unless
# Redis already holds a mode at least as restrictive; answers the mode Redis holds
PUBLISH_MODE = """
local rank = {ALLOW = 0, STEP_UP = 1, READ_ONLY = 2, KILL_SWITCH = 3}
local cur = redis.call('GET', KEYS[1])
if cur and rank[cur] and rank[cur] >= rank[ARGV[1]] then return cur end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 'st', 'fp')
if cur[1] == 'P' and cur[2] == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    cluster: bool = False
    timeout_s: float = 0.2
    pool_size: int = 64
    key_prefix: str = "casf"
    mode_refresh_s: float = 0.25


class RedisConnection:
    """The process's Redis client with bounded, translated calls."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        timeouts: dict[str, Any] = {
            "socket_timeout": settings.timeout_s, "socket_connect_timeout": settings.timeout_s}
        self.client: Any
        if settings.cluster:
            self.client = RedisCluster.from_url(
                settings.url, retry=Retry(NoBackoff(), 1),
                max_connections=settings.pool_size, **timeouts)
        else:
            # a blocking pool waits for a free connection (inside the call's time bound)
            # instead of failing when all are busy; the retry lives on the pool's
            # connections: one immediate retry replaces a connection Redis closed
            pool = aioredis.BlockingConnectionPool.from_url(
                settings.url, max_connections=settings.pool_size, timeout=settings.timeout_s,
                retry=Retry(NoBackoff(), 1), **timeouts)
            self.client = aioredis.Redis(connection_pool=pool)
        self._slots = asyncio.Semaphore(settings.pool_size) if settings.cluster else None
        self.admit_script = self.client.register_script(ADMIT)
        self.complete_script = self.client.register_script(COMPLETE)
        self.release_script = self.client.register_script(RELEASE)
        self.publish_mode_script = self.client.register_script(PUBLISH_MODE)

    async def call(self, coro: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                if self._slots is None:
                    return await coro
                # the cluster client fails instead of waiting when a node's
                # connections are all busy: queue here, inside the time bound
                async with self._slots:
                    return await coro
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc
        finally:
            if isinstance(coro, Coroutine):
                coro.close()  # no-op once awaited; silences one never started

    async def prepare(self) -> bool:
        """Learn the cluster's slots and load the scripts on every primary, once.

        Without it the first burst of traffic meets NOSCRIPT (and, on a
        cluster, slot discovery) on many connections at once. False when Redis
        is unreachable: the proxy starts anyway and the scripts load on first
        use (NOSCRIPT reload).
        """
        try:
            async with asyncio.timeout(max(2.0, self.settings.timeout_s * 10)):
                if self.settings.cluster:
                    await self.client.initialize()
                for script in (self.admit_script, self.complete_script, self.release_script,
                               self.publish_mode_script):
                    await self.client.script_load(script.script)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.warning("could not prepare Redis: %s: %s", type(exc).__name__, exc)
            return False
        policy = await self.eviction_policy()
        if policy is not None:
            log.error("Redis may evict keys (maxmemory-policy %s with maxmemory set): a "
                      "stored outcome evicted before its TTL lets a retry reach the upstream "
                      "a second time; use maxmemory-policy noeviction (docs/state.md)", policy)
        return True

    async def eviction_policy(self) -> str | None:
        """Redis's ``maxmemory-policy`` when it lets Redis evict keys, else ``None``.

        ``None`` also when the server does not say (``CONFIG`` renamed or
        refused, as on some managed services).
        """
        try:
            async with asyncio.timeout(max(1.0, self.settings.timeout_s * 5)):
                reply = await self.client.config_get("maxmemory*")
        except (RedisError, RedisClusterException, OSError, TimeoutError):
            return None
        found = {_text(k): _text(v) for k, v in reply.items()} if isinstance(reply, dict) else {}
        policy = found.get("maxmemory-policy", "noeviction")
        if found.get("maxmemory", "0") in ("0", "") or policy == "noeviction":
            return None
        return policy

    async def ping(self) -> bool:
        try:
            await self.call(self.client.ping())
        except StoreUnavailable:
            return False
        return True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()


class RedisAdmissionStore:
    """:class:`~proxy.ports.AdmissionStore` on Redis: one script call per admission."""

    def __init__(self, conn: RedisConnection) -> None:
        self.conn = conn
        self.prefix = conn.settings.key_prefix

    def claim_key(self, claim: Claim) -> str:
        return f"{self.prefix}:{{{claim.scope}}}:idem:{claim.key}"

    def rate_key(self, scope: str, check: RateCheck) -> str:
        return f"{self.prefix}:{{{scope}}}:rl:{check.key}"

    async def admit(self, scope: str, claim: Claim | None, checks: Sequence[RateCheck],
                    proceed: bool) -> Admission:
        keys: list[str] = []
        args: list[Any] = ["1" if claim else "0", claim.fingerprint if claim else "",
                           int(claim.lease_s * 1000) if claim else 0, "1" if proceed else "0"]
        if claim is not None:
            keys.append(self.claim_key(claim))
        for c in checks:
            keys.append(self.rate_key(scope, c))
            args += [c.limit, repr(c.window_s * 1000), c.cost, c.rule, "1" if c.quota else "0",
                     repr(c.warn_at)]
        reply = await self.conn.call(self.conn.admit_script(keys=keys, args=args))
        return _admission(reply, claim)

    async def complete(self, claim: Claim, outcome: StoredOutcome, ttl_s: float) -> None:
        headers = orjson.dumps([list(h) for h in outcome.headers])
        await self.conn.call(self.conn.complete_script(
            keys=[self.claim_key(claim)],
            args=[claim.fingerprint, outcome.status, headers, outcome.body,
                  "1" if outcome.body_complete else "0", int(ttl_s * 1000)]))

    async def release(self, claim: Claim) -> None:
        await self.conn.call(self.conn.release_script(keys=[self.claim_key(claim)],
                                                      args=[claim.fingerprint]))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _admission(reply: Any, claim: Claim | None) -> Admission:
    kind = _text(reply[0])
    new = ClaimState.NEW if claim is not None else None
    if kind == "claimed":
        return Admission(ClaimState.NEW, claimed=True,
                         warnings=tuple(_text(w) for w in reply[1:]))
    if kind == "ok":
        return Admission(new, warnings=tuple(_text(w) for w in reply[1:]))
    if kind == "new":
        return Admission(new)
    if kind == "mismatch":
        return Admission(ClaimState.MISMATCH)
    if kind == "in_flight":
        return Admission(ClaimState.IN_FLIGHT)
    if kind == "refused":
        return Admission(new, refused_rule=_text(reply[1]), refused_quota=_text(reply[3]) == "1",
                         retry_after_s=float(_text(reply[2])) / 1000)
    if kind == "replay":
        headers = tuple((str(k), str(v)) for k, v in orjson.loads(reply[2] or b"[]"))
        body = reply[3] if isinstance(reply[3], bytes) else _text(reply[3] or "").encode()
        outcome = StoredOutcome(int(_text(reply[1])), headers, body, _text(reply[4]) == "1")
        return Admission(ClaimState.REPLAY, outcome=outcome)
    raise StoreUnavailable(f"redis: unexpected admission reply {kind!r}")


class RedisModeStore:
    """The operator mode, shared by all replicas through Redis.

    ``current`` never blocks: it returns the last mode seen. A background task
    follows changes by pub/sub (standalone Redis) and re-reads the key every
    ``mode_refresh_ms``; while Redis is unreachable (at start too) the last
    mode is kept and the task retries, backing off up to ``RETRY_MAX_S``.

    The emergency stop works without Redis: ``set`` with a mode at least as
    restrictive as the current one (ALLOW < STEP_UP < READ_ONLY < KILL_SWITCH)
    takes effect on this replica when Redis is unreachable, is kept in the
    mode state file (``state``) as *pending*, and is published once Redis
    answers again, unless Redis then holds a mode at least as restrictive
    (the merge rule: the more restrictive mode wins; see :data:`PUBLISH_MODE`).
    A less restrictive mode still needs Redis. Every mode this replica
    enforces is saved to the file, so a restart while Redis is down starts
    from it (or from ``mode.default``, whichever is more restrictive).
    Replicas sharing the file (``--workers``) adopt a pending mode found there
    while Redis is unreachable.
    """

    RETRY_MAX_S = 1.0  # the longest wait between two attempts while Redis is down

    def __init__(self, conn: RedisConnection, default: Mode,
                 state: ModeStateFile | None = None) -> None:
        self.conn = conn
        self.key = f"{conn.settings.key_prefix}:{{mode}}:current"
        self.channel = f"{conn.settings.key_prefix}:{{mode}}:changes"
        self._mode = default
        self._default = default
        self._pending: Mode | None = None  # set locally, not yet published to Redis
        self._adopted = False  # the pending mode came from another replica's state file
        self._state = state
        self._saved: SavedMode | None = None  # what the state file holds, as far as we know
        self._lock = asyncio.Lock()  # one change at a time: set, publish, adopt
        self._task: asyncio.Task[None] | None = None

    def current(self) -> Mode:
        return self._mode

    @property
    def pending(self) -> Mode | None:
        """A mode in force here that Redis does not hold yet."""
        return self._pending

    async def set(self, mode: Mode) -> bool:
        async with self._lock:
            client = self.conn.client
            try:
                await self.conn.call(client.set(self.key, mode.value))
            except StoreUnavailable:
                if MODE_RANK[mode] < MODE_RANK[self._mode]:
                    raise  # lifting a restriction needs every replica to hear of it
                self._mode = self._pending = mode
                self._adopted = False
                log.warning("Redis is unreachable: mode %s is in force on this replica only "
                            "and will be published once Redis answers", mode.value)
                await self._save(SavedMode(mode, True))
                return False
            self._mode = mode
            self._pending = None  # an operator's change through a live Redis replaces it
            self._adopted = False
            await self._save(SavedMode(mode, False))
        with contextlib.suppress(StoreUnavailable):
            await self.conn.call(client.publish(self.channel, mode.value))
        return True

    async def _save(self, saved: SavedMode, *, seen: bool = False) -> None:
        """Keep ``saved`` in the state file; a failure is logged (the mode stays in force).

        ``seen``: a mode read from Redis, which must not overwrite a more
        restrictive mode another replica sharing the file has not published yet.
        """
        if self._state is None or saved == self._saved:
            return
        try:
            if seen:
                there = await asyncio.to_thread(self._state.load)
                if there is not None and there.pending and (
                        MODE_RANK[there.mode] > MODE_RANK[saved.mode]):
                    return
            await asyncio.to_thread(self._state.save, saved)
        except OSError as exc:
            log.error("cannot write the mode state file %s (mode %s stays in force but is "
                      "not kept across a restart): %s", self._state.path, saved.mode.value, exc)
            return
        self._saved = saved

    async def _apply(self, raw: Any) -> None:
        if raw is None:
            return
        try:
            mode = Mode(_text(raw))
        except ValueError:
            log.error("ignoring unknown mode %r in Redis", raw)
            return
        if self._pending is not None and MODE_RANK[mode] < MODE_RANK[self._pending]:
            return  # not published yet: a laxer mode seen meanwhile must not lift it
        if mode is not self._mode:
            log.warning("mode changed to %s (shared state)", mode.value)
            self._mode = mode
        if self._pending is None:
            await self._save(SavedMode(mode, False), seen=True)

    async def _publish_pending(self) -> None:
        """Publish the pending mode by the merge rule, then forget it (once Redis holds
        it or a more restrictive one)."""
        pending = self._pending
        if pending is None:
            return
        if self._adopted and self._state is not None:
            # taken from a sibling's file: once the sibling has published it (the
            # file says so), publishing it again could undo a relaxation made since
            saved = await asyncio.to_thread(self._state.load)
            if saved is None or not saved.pending:
                self._pending = None
                self._adopted = False
                return
        client = self.conn.client
        held = _text(await self.conn.call(self.conn.publish_mode_script(
            keys=[self.key], args=[pending.value])))
        if held == pending.value:
            with contextlib.suppress(StoreUnavailable):
                await self.conn.call(client.publish(self.channel, pending.value))
        if self._pending is pending:
            self._pending = None
            self._adopted = False
            log.warning("mode %s set while Redis was unreachable is published; Redis holds %s",
                        pending.value, held)
            await self._apply(held)

    async def refresh(self) -> None:
        """Re-read the shared mode; an empty key is seeded with the last mode seen.

        A pending mode is published first (merge rule). A Redis restart without
        persistence empties the key: seeding it with the config default would
        silently lift a KILL_SWITCH or READ_ONLY set by an operator, so the first
        replica back puts the mode it last saw instead (the default only for a
        replica that never saw another).
        """
        async with self._lock:
            client = self.conn.client
            await self._publish_pending()
            await self.conn.call(client.set(self.key, self._mode.value, nx=True))
            await self._apply(await self.conn.call(client.get(self.key)))

    async def _adopt_from_file(self) -> None:
        """Take on a pending mode another replica sharing the state file left there."""
        if self._state is None:
            return
        saved = await asyncio.to_thread(self._state.load)
        if saved is None or not saved.pending:
            return
        async with self._lock:
            if MODE_RANK[saved.mode] > MODE_RANK[self._mode]:
                log.warning("mode %s from the mode state file (set while Redis is "
                            "unreachable) is in force", saved.mode.value)
                self._mode = self._pending = saved.mode
                self._adopted = True
                self._saved = saved

    async def start(self) -> None:
        if self._state is not None:
            saved = await asyncio.to_thread(self._state.load)
            if saved is not None:
                self._saved = saved
                self._mode = stricter(saved.mode, self._default)
                if saved.pending:
                    self._pending = saved.mode
                    log.warning("mode %s was set while Redis was unreachable and is not "
                                "published yet: in force here until it is", saved.mode.value)
        missed = False
        try:
            await self.refresh()
        except StoreUnavailable:
            missed = True  # Redis down at start: the follower re-reads once it is back
        self._task = spawn(self._follow(missed), name="casf-mode-follow")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self._task, 2.0)

    async def _follow(self, missed: bool) -> None:
        """Follow mode changes until cancelled, surviving any error from Redis or redis-py.

        Standalone Redis: wait up to ``mode_refresh_s`` for a pub/sub message,
        else re-read the key; cluster: re-read it every ``mode_refresh_s``.
        Any failure (Redis down, a pub/sub connection lost or never made,
        whatever redis-py raises) keeps the last mode, is logged once per
        outage and is retried after a delay doubling from ``mode_refresh_s``
        up to ``RETRY_MAX_S``; meanwhile the state file is read for a pending
        mode another replica left there. A failed subscription is dropped and
        made afresh once Redis answers, then the key is re-read (``missed``: a
        change may have been published while nothing listened) after the
        pending mode, if any, is published.
        """
        interval = self.conn.settings.mode_refresh_s
        subscribe = not self.conn.settings.cluster
        pubsub: Any = None
        delay = first_delay = max(min(interval, self.RETRY_MAX_S), 0.01)
        outage = False
        try:
            while True:
                try:
                    if subscribe and pubsub is None:
                        pubsub = await self._subscribe()
                        if missed:
                            await self.refresh()
                    missed = False
                    if self._pending is not None:
                        await self.refresh()
                    if pubsub is None:
                        await asyncio.sleep(interval)
                        await self.refresh()
                    else:
                        try:
                            msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=interval)
                        except Exception:
                            await self._unsubscribe(pubsub)  # made afresh on the next turn
                            pubsub = None
                            raise
                        if msg is not None and msg.get("type") == "message":
                            async with self._lock:
                                await self._apply(msg.get("data"))
                        else:
                            await self.refresh()
                except Exception as exc:  # CancelledError is a BaseException: it stops us
                    missed = True
                    if not outage:
                        outage = True
                        log.warning("mode follower: Redis unavailable (%s: %s); keeping mode "
                                    "%s, retrying", type(exc).__name__, exc, self._mode.value)
                    with contextlib.suppress(Exception):
                        await self._adopt_from_file()
                    await asyncio.sleep(delay)  # keep the last mode; try again
                    delay = min(delay * 2, self.RETRY_MAX_S)
                else:
                    if outage:
                        outage = False
                        log.info("mode follower: Redis reachable again (mode %s)",
                                 self._mode.value)
                    delay = first_delay
        finally:
            if pubsub is not None:
                await self._unsubscribe(pubsub)

    async def _subscribe(self) -> Any:
        """A pub/sub connection subscribed to the mode channel, else the error."""
        pubsub = self.conn.client.pubsub()
        try:
            async with asyncio.timeout(max(1.0, self.conn.settings.timeout_s)):
                await pubsub.subscribe(self.channel)
        except BaseException:
            await self._unsubscribe(pubsub)  # gives its connection back to the pool
            raise
        return pubsub

    @staticmethod
    async def _unsubscribe(pubsub: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pubsub.aclose(), 1.0)
