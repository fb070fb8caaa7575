"""Approvals on Redis: shared by every replica, kept across proxy restarts.

Keys (``casf`` is ``redis.key_prefix``; ``{apr}`` is one cluster hash tag, so
every approval key lives in one slot and each script runs atomically on
Redis Cluster too)::

    casf:{apr}:id:<approval id>        hash: status, fp, exp, bind, doc (JSON), approvers,
                                       approved_at, decided_by, comment, used_at
    casf:{apr}:bind:<sha256(binding)>  the approval id bound to a caller's request id
    casf:{apr}:pending                 sorted set: pending ids by expiry
    casf:{apr}:approved                sorted set: approved (unused) ids by expiry
    casf:{apr}:tenant:<tenant>         sorted set: the tenant's ids by creation time

Every transition is one Lua script that checks the current status and
changes it in the same step: of N concurrent approvers or consumers exactly
one wins. Expiry uses the ``now`` the caller passes (the replicas' clocks,
kept in step by NTP); a live approval past its expiry is marked ``expired``
by the first script that sees it, which reports that it did so (one
``expired`` audit record across all replicas). Keys carry a TTL of the
approval's expiry plus :data:`~proxy.approvals.store.RETENTION_S`. Redis or
network errors surface as :class:`~proxy.ports.StoreUnavailable`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy.approvals.config import ApprovalsConfig
from proxy.approvals.model import Approval, Approver, Details, NotFound, NotPending, Status, new_id
from proxy.approvals.model import create as create_approval
from proxy.approvals.store import RETENTION_S, FindResult
from proxy.redisstate import RedisConnection

_FIND_OR_CREATE = """
local now = tonumber(ARGV[3])
local expired = ''
local cur = redis.call('GET', KEYS[1])
if cur then
  local h = ARGV[1] .. cur
  local f = redis.call('HMGET', h, 'status', 'fp', 'exp')
  if f[1] then
    local st = f[1]
    if (st == 'pending' or st == 'approved') and now >= tonumber(f[3]) then
      redis.call('HSET', h, 'status', 'expired')
      redis.call('ZREM', KEYS[2], cur)
      redis.call('ZREM', KEYS[5], cur)
      st = 'expired'
      expired = cur
    end
    if st == 'pending' or st == 'approved' then
      local verdict = 'found'
      if f[2] ~= ARGV[2] then verdict = 'mismatch' end
      return {cur, verdict, expired, redis.call('HGETALL', h)}
    end
    if st ~= 'expired' and f[2] == ARGV[2] then
      return {cur, 'found', expired, redis.call('HGETALL', h)}
    end
  end
end
redis.call('HSET', KEYS[4], 'status', 'pending', 'fp', ARGV[2], 'exp', ARGV[5],
           'doc', ARGV[6], 'bind', KEYS[1])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('ZADD', KEYS[3], ARGV[8], ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[9])
return {ARGV[4], 'created', expired, redis.call('HGETALL', KEYS[4])}
"""

# KEYS: item, pending, approved. ARGV: id, now. Returns {marked, fields}.
_GET = """
local f = redis.call('HMGET', KEYS[1], 'status', 'exp')
if not f[1] then return {0, {}} end
local marked = 0
if (f[1] == 'pending' or f[1] == 'approved') and tonumber(ARGV[2]) >= tonumber(f[2]) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  marked = 1
end
return {marked, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: item, pending, approved. ARGV: id, now, action, decided_by, comment,
# approved expiry, approvers JSON, key TTL ms. Returns {result, marked, fields}.
_DECIDE = """
local f = redis.call('HMGET', KEYS[1], 'status', 'exp', 'bind')
if not f[1] then return {'missing', 0, {}} end
local now = tonumber(ARGV[2])
if f[1] == 'pending' and now >= tonumber(f[2]) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'expired', 1, redis.call('HGETALL', KEYS[1])}
end
if f[1] ~= 'pending' then return {f[1], 0, redis.call('HGETALL', KEYS[1])} end
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[3] == 'approved' then
  redis.call('HSET', KEYS[1], 'status', 'approved', 'exp', ARGV[6], 'approvers', ARGV[7],
             'approved_at', ARGV[2], 'decided_by', ARGV[4], 'comment', ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[8])
  if f[3] and redis.call('GET', f[3]) == ARGV[1] then redis.call('PEXPIRE', f[3], ARGV[8]) end
else
  redis.call('HSET', KEYS[1], 'status', 'denied', 'decided_by', ARGV[4], 'comment', ARGV[5])
end
return {'ok', 0, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: item, approved. ARGV: id, now, fingerprint. Returns {result, marked, fields}.
_CONSUME = """
local f = redis.call('HMGET', KEYS[1], 'status', 'fp', 'exp')
if not f[1] then return {'missing', 0, {}} end
if f[1] == 'approved' and tonumber(ARGV[2]) >= tonumber(f[3]) then
  redis.call('HSET', KEYS[1], 'status', 'expired')
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'expired', 1, redis.call('HGETALL', KEYS[1])}
end
if f[1] ~= 'approved' or f[2] ~= ARGV[3] then return {f[1], 0, {}} end
redis.call('HSET', KEYS[1], 'status', 'used', 'used_at', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
return {'ok', 0, redis.call('HGETALL', KEYS[1])}
"""

# KEYS: item, pending, tenant index. ARGV: id.
_WITHDRAW = """
local f = redis.call('HMGET', KEYS[1], 'status', 'bind')
if f[1] ~= 'pending' then return 0 end
if f[2] and redis.call('GET', f[2]) == ARGV[1] then redis.call('DEL', f[2]) end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""

_MUTABLE = ("approvers", "approved_at", "decided_by", "comment", "used_at")


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _parse(fields: list[Any]) -> Approval | None:
    if not fields:
        return None
    h = {_text(fields[i]): _text(fields[i + 1]) for i in range(0, len(fields), 2)}
    if "doc" not in h:
        return None
    doc = orjson.loads(h["doc"])
    doc["status"] = h["status"]
    doc["expires_at"] = float(h["exp"])
    for name in _MUTABLE:
        value = h.get(name)
        if value is None or value == "":
            continue
        doc[name] = orjson.loads(value) if name == "approvers" else value
    return Approval.from_doc(doc)


class RedisApprovalStore:
    """:class:`~proxy.approvals.store.ApprovalStore` on the process's Redis connection."""

    def __init__(self, conn: RedisConnection, cfg: ApprovalsConfig) -> None:
        self.conn = conn
        self.cfg = cfg
        base = f"{conn.settings.key_prefix}:{{apr}}:"
        self._id = base + "id:"
        self._bind = base + "bind:"
        self._tenant = base + "tenant:"
        self._pending = base + "pending"
        self._approved = base + "approved"
        client = conn.client
        self._find_or_create = client.register_script(_FIND_OR_CREATE)
        self._get = client.register_script(_GET)
        self._decide_script = client.register_script(_DECIDE)
        self._consume = client.register_script(_CONSUME)
        self._withdraw = client.register_script(_WITHDRAW)
        self._expired: list[Approval] = []

    def _bind_key(self, binding_key: str) -> str:
        return self._bind + hashlib.sha256(binding_key.encode()).hexdigest()

    def _tenant_key(self, tenant: str | None) -> str:
        return self._tenant + ("-" if tenant is None else "t:" + tenant)

    def _note_expired(self, marked: Any, fields: list[Any]) -> Approval | None:
        a = _parse(fields)
        if a is not None and int(marked) == 1:
            self._expired.append(a)
        return a

    async def find_or_create(self, binding_key: str, fingerprint: str, details: Details,
                             now: float) -> FindResult:
        candidate = create_approval(new_id(), binding_key, fingerprint, details, now,
                                    self.cfg.pending_ttl_seconds)
        ttl_ms = int((candidate.expires_at - now + RETENTION_S) * 1000)
        doc = orjson.dumps(candidate.to_doc())
        got = await self.conn.call(self._find_or_create(
            keys=[self._bind_key(binding_key), self._pending, self._tenant_key(details.tenant),
                  self._id + candidate.id, self._approved],
            args=[self._id, fingerprint, repr(now), candidate.id, repr(candidate.expires_at),
                  doc, ttl_ms, repr(now), repr(now - RETENTION_S)]))
        approval_id, verdict, expired_id, fields = (_text(got[0]), _text(got[1]),
                                                    _text(got[2]), got[3])
        if expired_id:
            old = await self.get(expired_id, now)
            if old is not None:
                self._expired.append(old)
        a = _parse(fields)
        if a is None:  # vanished between the script and now: impossible inside one script
            raise NotFound(approval_id)
        return FindResult(a, verdict == "created", verdict == "mismatch")

    async def lookup(self, binding_key: str, now: float) -> Approval | None:
        current = await self.conn.call(self.conn.client.get(self._bind_key(binding_key)))
        return None if current is None else await self.get(_text(current), now)

    async def get(self, approval_id: str, now: float) -> Approval | None:
        got = await self.conn.call(self._get(
            keys=[self._id + approval_id, self._pending, self._approved],
            args=[approval_id, repr(now)]))
        return self._note_expired(got[0], got[1])

    async def list_tenant(self, tenant: str | None, status: Status | None, limit: int,
                   now: float) -> list[Approval]:
        scan = min(1000, max(limit * 5, 100))
        ids = await self.conn.call(self.conn.client.zrevrange(self._tenant_key(tenant), 0,
                                                              scan - 1))
        if not ids:
            return []
        pipe = self.conn.client.pipeline(transaction=False)
        for raw in ids:
            aid = _text(raw)
            await self._get(keys=[self._id + aid, self._pending, self._approved],
                            args=[aid, repr(now)], client=pipe)  # queued, not sent
        results = await self.conn.call(pipe.execute())
        out: list[Approval] = []
        for marked, fields in results:
            a = self._note_expired(marked, fields)
            if a is not None and a.tenant == tenant and (status is None or a.status is status):
                out.append(a)
                if len(out) >= limit:
                    break
        return out

    async def _decide(self, approval_id: str, action: str, who: Approver, now: float,
                      comment: str | None) -> Approval:
        approved_exp = now + self.cfg.approved_ttl_seconds
        ttl_ms = int((self.cfg.approved_ttl_seconds + RETENTION_S) * 1000)
        got = await self.conn.call(self._decide_script(
            keys=[self._id + approval_id, self._pending, self._approved],
            args=[approval_id, repr(now), action, who.id, comment or "", repr(approved_exp),
                  orjson.dumps([who.id]), ttl_ms]))
        result = _text(got[0])
        a = self._note_expired(got[1], got[2])
        if result == "missing" or a is None:
            raise NotFound()
        if result != "ok":
            raise NotPending(result)
        return a

    async def approve(self, approval_id: str, who: Approver, now: float,
                      comment: str | None) -> Approval:
        return await self._decide(approval_id, "approved", who, now, comment)

    async def deny(self, approval_id: str, who: Approver, now: float,
                   comment: str | None) -> Approval:
        return await self._decide(approval_id, "denied", who, now, comment)

    async def consume(self, approval_id: str, fingerprint: str, now: float
                      ) -> Approval | None:
        got = await self.conn.call(self._consume(
            keys=[self._id + approval_id, self._approved],
            args=[approval_id, repr(now), fingerprint]))
        a = self._note_expired(got[1], got[2])
        return a if _text(got[0]) == "ok" else None

    async def withdraw(self, approval_id: str) -> None:
        a = await self.get(approval_id, 0.0)
        tenant_key = self._tenant_key(a.tenant if a is not None else None)
        await self.conn.call(self._withdraw(
            keys=[self._id + approval_id, self._pending, tenant_key], args=[approval_id]))

    async def pending_count(self, now: float) -> int:
        return int(await self.conn.call(
            self.conn.client.zcount(self._pending, f"({now!r}", "+inf")))

    async def sweep(self, now: float) -> None:
        for key in (self._pending, self._approved):
            ids = await self.conn.call(self.conn.client.zrangebyscore(key, "-inf", repr(now),
                                                                      start=0, num=200))
            for raw in ids:
                await self.get(_text(raw), now)

    def take_expired(self) -> list[Approval]:
        out, self._expired = self._expired, []
        return out

    async def close(self) -> None:
        return None  # the connection belongs to the process
