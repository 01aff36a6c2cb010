"""Atomic admission state in Redis: tick claims, running leases, the buffered slot, idempotency.

Each operation is one Lua script, so concurrent scheduler replicas (and engines releasing
leases) can never interleave inside a decision. Execution ids are deterministic (from the fire
id or the idempotency key), which makes every step here safe to repeat after a crash: a
replica that finds a lease held by *the same* execution carries on instead of skipping.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from orchestrator.store import EXTEND_IF_OWNER, RELEASE_IF_OWNER, Keys
from orchestrator.store.batch import Batcher
from schemas import OverlapPolicy

_CLAIM = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) ~= tonumber(ARGV[2]) then return false end
if not redis.call('SET', KEYS[3], ARGV[3], 'NX', 'PX', ARGV[4]) then return false end
return {redis.call('HGET', KEYS[2], ARGV[1]) or '', redis.call('GET', KEYS[4]) or ''}
"""

_COMPLETE = """
if redis.call('GET', KEYS[3]) ~= ARGV[3] then return 0 end
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) == tonumber(ARGV[2]) then
  if ARGV[4] == '' then
    redis.call('ZREM', KEYS[1], ARGV[1])
    redis.call('HDEL', KEYS[2], ARGV[1])
  else
    redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  end
end
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: running, buffered, buffered index, tenant quarantine, flow quarantine
# ARGV: execution id, policy, lease ms, member, execution JSON
_ADMIT = """
if redis.call('EXISTS', KEYS[4]) == 1 or redis.call('EXISTS', KEYS[5]) == 1 then
  return 'quarantined'
end
if ARGV[2] == 'allow' then return 'run' end
local holder = redis.call('GET', KEYS[1])
if (not holder) or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
  return 'run'
end
if ARGV[2] == 'buffer_one' then
  local waiting = redis.call('HGET', KEYS[2], 'execution_id')
  if not waiting then
    redis.call('HSET', KEYS[2], 'execution_id', ARGV[1], 'payload', ARGV[5])
    redis.call('SADD', KEYS[3], ARGV[4])
    return 'buffered'
  end
  if waiting == ARGV[1] then return 'buffered' end
end
return 'overlap'
"""

# KEYS: running, buffered, buffered index; ARGV: member, lease ms
# Moves the waiting execution into the running lease once the lease is free. The payload stays
# until `finish_buffered`, so a crash between promotion and publish only re-publishes it.
_PROMOTE = """
local waiting = redis.call('HGET', KEYS[2], 'execution_id')
if not waiting then
  redis.call('SREM', KEYS[3], ARGV[1])
  return false
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= waiting then return false end
redis.call('SET', KEYS[1], waiting, 'PX', ARGV[2])
return redis.call('HGET', KEYS[2], 'payload')
"""

_FINISH_BUFFERED = """
if redis.call('HGET', KEYS[1], 'execution_id') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS: idempotency key; ARGV: execution id, ttl seconds
# KEYS: the idempotency key. ARGV: ttl s, owner token, now ms, lease ms.
# 'new' (claimed by this owner), 'done:<execution id>', 'busy' (another delivery of the same
# key is being handled right now: wait for it), or 'retry' (its handler died: take it over).
_REQUEST = """
local seen = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[3])
if seen then
  if string.sub(seen, 1, 5) == 'done:' then return seen end
  local owner, deadline = string.match(seen, '^pending:([^:]+):(%d+)$')
  if owner and owner ~= ARGV[2] and tonumber(deadline) > now then return 'busy' end
end
redis.call('SET', KEYS[1], 'pending:' .. ARGV[2] .. ':' .. (now + tonumber(ARGV[4])), 'EX', ARGV[1])
if seen then return 'retry' end
return 'new'
"""


class Admission(StrEnum):
    RUN = "run"
    BUFFERED = "buffered"
    OVERLAP = "overlap"
    QUARANTINED = "quarantined"


@dataclass(frozen=True)
class Claim:
    nominal_ms: int
    definition_json: str  # empty when the flow was deleted


def idempotency_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


# A token bucket: KEYS[1] hash {tokens, at}; ARGV rate per ms, burst, now ms, expiry ms.
# Returns 1 when a token was taken. The key expires once the bucket would be full again, so
# idle tenants cost nothing.
_TAKE = """
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local rate, burst, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, at = tonumber(state[1]), tonumber(state[2])
if not tokens then tokens, at = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local taken = 0
if tokens >= 1 then tokens = tokens - 1; taken = 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return taken
"""


@dataclass(frozen=True)
class RateLimit:
    """Flow starts a tenant may make: `burst` at once, then `per_s` a second (0: no limit)."""

    per_s: float
    burst: int

    async def take(self, store: AdmissionStore, tenant: str, now_ms: int) -> bool:
        if self.per_s <= 0:
            return True
        return await store.take_token(tenant, self.per_s, self.burst, now_ms)


class AdmissionStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, batched: Batcher | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # The per-tick and per-request scripts through a batcher (a busy scheduler: the ticks
        # due together, the requests arriving together, share round trips).
        self.batched = batched
        self._claim = redis.register_script(_CLAIM)
        self._complete = redis.register_script(_COMPLETE)
        self._admit = redis.register_script(_ADMIT)
        self._promote = redis.register_script(_PROMOTE)
        self._finish_buffered = redis.register_script(_FINISH_BUFFERED)
        self._release = redis.register_script(RELEASE_IF_OWNER)
        self._extend = redis.register_script(EXTEND_IF_OWNER)
        self._request = redis.register_script(_REQUEST)
        self._take = redis.register_script(_TAKE)

    async def _run(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        if self.batched is not None:
            return await self.batched.script(str(script.script), keys, args)
        return await script(keys=keys, args=args)

    async def take_token(self, tenant: str, per_s: float, burst: int, now_ms: int) -> bool:
        """One token of the tenant's flow-start bucket (see RateLimit)."""
        refill_ms = int(burst / per_s * 1000) + 1000
        taken = await self._run(
            self._take,
            [self.keys.ingress_rate(tenant)],
            [per_s / 1000, burst, now_ms, refill_ms],
        )
        return bool(taken)

    async def due(self, now_ms: int, limit: int) -> list[tuple[str, int]]:
        entries = await self.redis.zrangebyscore(
            self.keys.due, "-inf", now_ms, start=0, num=limit, withscores=True
        )
        pairs = cast(list[tuple[str, float]], entries)
        return [(str(m), int(score)) for m, score in pairs]

    async def next_due_ms(self) -> int | None:
        head = await self.redis.zrange(self.keys.due, 0, 0, withscores=True)
        return int(head[0][1]) if head else None

    async def claim_ticks(
        self, due: list[tuple[str, int]], owner: str, lease_ms: int
    ) -> list[Claim | None]:
        """`claim_tick` for many flows in one round trip (a pipeline of scripts)."""
        if not due:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for flow, fire_at_ms in due:
                keys = [
                    self.keys.due,
                    self.keys.nominal,
                    self.keys.claim(flow),
                    self.keys.flow(flow),
                ]
                await self._claim(keys=keys, args=[flow, fire_at_ms, owner, lease_ms], client=pipe)
            results = await pipe.execute()
        return [
            Claim(int(r[0]) if r[0] else at, r[1]) if r else None
            for r, (_, at) in zip(results, due, strict=True)
        ]

    async def complete_ticks(
        self, done: list[tuple[str, int, tuple[int, int] | None]], owner: str
    ) -> None:
        """`complete_tick` for many flows in one round trip."""
        if not done:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for flow, fire_at_ms, next_due in done:
                keys = [self.keys.due, self.keys.nominal, self.keys.claim(flow)]
                fire_at, nominal = next_due if next_due else ("", "")
                args: list[str | int] = [flow, fire_at_ms, owner, fire_at, nominal]
                await self._complete(keys=keys, args=args, client=pipe)
            await pipe.execute()

    async def admit(
        self,
        flow: str,
        *,
        tenant: str,
        flow_id: str,
        execution_id: str,
        policy: OverlapPolicy,
        lease_ms: int,
        payload: str,
    ) -> Admission:
        keys = [
            self.keys.running(flow),
            self.keys.buffered(flow),
            self.keys.buffered_index,
            self.keys.quarantine(tenant),
            self.keys.quarantine(tenant, flow_id),
        ]
        args = [execution_id, policy.value, lease_ms, flow, payload]
        return Admission(await self._run(self._admit, keys, args))

    async def buffered_flows(self) -> list[str]:
        return sorted(str(m) for m in await self.redis.smembers(self.keys.buffered_index))

    async def promote_buffered(self, flow: str, lease_ms: int) -> str | None:
        """The payload of the waiting execution, now holding the lease; None if it must wait."""
        keys = [self.keys.running(flow), self.keys.buffered(flow), self.keys.buffered_index]
        payload = await self._promote(keys=keys, args=[flow, lease_ms])
        return payload or None

    async def finish_buffered(self, flow: str, execution_id: str) -> None:
        keys = [self.keys.buffered(flow), self.keys.buffered_index]
        await self._finish_buffered(keys=keys, args=[execution_id, flow])

    async def running(self, flow: str) -> str | None:
        holder = await self.redis.get(self.keys.running(flow))
        return None if holder is None else str(holder)

    async def release_running(self, flow: str, execution_id: str) -> bool:
        """Called when an execution ends: frees the flow for its next (or buffered) run."""
        return bool(await self._run(self._release, [self.keys.running(flow)], [execution_id]))

    async def extend_running(self, flow: str, execution_id: str, lease_ms: int) -> bool:
        """Heartbeat of a live execution; False if the lease was lost (expired, taken)."""
        return bool(
            await self._run(self._extend, [self.keys.running(flow)], [execution_id, lease_ms])
        )

    async def begin_request(
        self, flow: str, idempotency_key: str, *, ttl_s: int, owner: str, now_ms: int, lease_ms: int
    ) -> str:
        """Claims the key for `owner` (see _REQUEST): 'new', 'retry', 'busy' or
        'done:<execution id>'. A claim lapses after `lease_ms`, so a handler that died never
        blocks its key."""
        key = self.keys.idempotency(flow, idempotency_digest(idempotency_key))
        result: str = await self._run(self._request, [key], [ttl_s, owner, now_ms, lease_ms])
        return result

    async def finish_request(self, flow: str, idempotency_key: str, execution_id: str) -> None:
        key = self.keys.idempotency(flow, idempotency_digest(idempotency_key))
        await self.redis.set(key, f"done:{execution_id}", keepttl=True)

    async def forget_request(self, flow: str, idempotency_key: str) -> None:
        await self.redis.delete(self.keys.idempotency(flow, idempotency_digest(idempotency_key)))

    async def quarantine(self, tenant: str, flow_id: str | None, ttl_ms: int, reason: str) -> None:
        await self.redis.set(self.keys.quarantine(tenant, flow_id), reason, px=ttl_ms)

    async def release_quarantine(self, tenant: str, flow_id: str | None) -> None:
        await self.redis.delete(self.keys.quarantine(tenant, flow_id))
