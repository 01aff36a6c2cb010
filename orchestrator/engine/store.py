"""Execution state in Redis: optimistic transactions with an outbox, timers, breakers.

A transition is stored in one MULTI/EXEC together with its effects: the new state, the messages
to publish (an outbox list, in order) and the timers to set. Publishing happens after the
commit; every handler flushes the outbox before acking its input, so a crash between commit
and publish only delays the messages until the input is redelivered (or a timer fires), and a
per-execution flush lock keeps one execution's status events in sequence order.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from orchestrator.engine.machine import Effects, Execution
from orchestrator.store import Keys, member

OutboxKind = Literal["task", "status", "release"]
FLUSH_LOCK_MS = 15_000
FLUSH_WAIT_S = 20.0
TIMER_LEASE_MS = 30_000

# Timers due now: push their score forward by a lease, so a crashed engine's timers come back.
_CLAIM_TIMER = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# KEYS: breaker hash, probe key; ARGV: now ms, cooldown ms, probe retry ms
# Returns 0 when a step of this type may be dispatched, else the ms time to try again.
_BREAKER_ACQUIRE = """
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return 0 end
local now = tonumber(ARGV[1])
if now < open_until then return open_until end
if redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[2]) then return 0 end
return now + tonumber(ARGV[3])
"""

# KEYS: breaker hash, probe key; ARGV: success (1/0), now ms, threshold, cooldown ms, ttl ms
# Every write renews the hash's expiry: step types come from tenants' flow definitions, so a
# breaker nobody uses any more must not stay in Redis for ever.
_BREAKER_RECORD = """
if ARGV[1] == '1' then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 0
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local half_open = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') > 0
local result = 0
if half_open or failures >= tonumber(ARGV[3]) then
  result = tonumber(ARGV[2]) + tonumber(ARGV[4])
  redis.call('HSET', KEYS[1], 'open_until', result, 'failures', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]) + tonumber(ARGV[5]))
return result
"""
# A breaker with no failure recorded for this long (beyond its cool-down) is forgotten: closed.
BREAKER_MEMORY_MS = 600_000


@dataclass(frozen=True)
class OutboxEntry:
    kind: OutboxKind
    body: str  # a message's JSON, or the flow member for a lease release
    extra: str = ""  # the execution id for a lease release

    def encode(self) -> str:
        return json.dumps([self.kind, self.body, self.extra])

    @classmethod
    def decode(cls, raw: str) -> OutboxEntry:
        kind, body, extra = json.loads(raw)
        return cls(kind, body, extra)


class EngineKeys:
    def __init__(self, keys: Keys) -> None:
        prefix = keys.prefix
        self.prefix = prefix
        self.timers = f"{prefix}timers"
        self.live = f"{prefix}live"  # hash execution id -> flow member

    def execution(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}"

    def index(self, tenant: str) -> str:
        """A tenant's executions by start time (ms), for listing; trimmed to the state TTL."""
        return f"{self.prefix}executions:{tenant}"

    def outbox(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}:outbox"

    def flush_lock(self, execution_id: str) -> str:
        return f"{self.prefix}exec:{execution_id}:flush"

    def breaker(self, tenant: str, step_type: str) -> str:
        """One breaker per (tenant, step type): a tenant's failing steps hold back its own
        steps of that type only, never another tenant's."""
        return f"{self.prefix}breaker:{tenant}:{step_type}"

    def probe(self, tenant: str, step_type: str) -> str:
        return f"{self.prefix}breaker:{tenant}:{step_type}:probe"


Mutator = Callable[[Execution | None], Awaitable[tuple[Execution, Effects] | None]]


class ExecutionStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys, state_ttl_s: int) -> None:
        self.redis = redis
        self.keys = EngineKeys(keys)
        self.state_ttl_s = state_ttl_s
        self._claim_timer = redis.register_script(_CLAIM_TIMER)
        self._breaker_acquire = redis.register_script(_BREAKER_ACQUIRE)
        self._breaker_record = redis.register_script(_BREAKER_RECORD)

    async def load(self, execution_id: str) -> Execution | None:
        raw = await self.redis.get(self.keys.execution(execution_id))
        return None if raw is None else Execution.model_validate_json(raw)

    async def transact(self, execution_id: str, mutate: Mutator) -> Execution | None:
        """Runs `mutate` on the current state and commits its result atomically with the
        effects; retried from scratch if another replica changed the execution meanwhile."""
        key = self.keys.execution(execution_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    current = None if raw is None else Execution.model_validate_json(raw)
                    changed = await mutate(current)
                    if changed is None:
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return current
                    execution, effects = changed
                    pipe.multi()  # type: ignore[no-untyped-call]
                    self._write(pipe, execution, effects)
                    await pipe.execute()
                except WatchError:
                    continue
                return execution

    def _write(self, pipe: Any, execution: Execution, effects: Effects) -> None:
        eid = execution.execution_id
        ttl = self.state_ttl_s if execution.terminal else None
        pipe.set(self.keys.execution(eid), execution.model_dump_json(), ex=ttl)
        entries = [OutboxEntry("status", e.to_bytes().decode()).encode() for e in effects.statuses]
        # Status events first: a subscriber sees `step.dispatched` before any worker can answer.
        entries += [OutboxEntry("task", t.model_dump_json()).encode() for t in effects.tasks]
        flow = member(execution.tenant, execution.flow_id)
        if effects.release_lease:
            entries.append(OutboxEntry("release", flow, eid).encode())
            pipe.hdel(self.keys.live, eid)
        elif not execution.terminal:
            pipe.hset(self.keys.live, eid, flow)
        if entries:
            pipe.rpush(self.keys.outbox(eid), *entries)
        if effects.created:
            started_ms = int(execution.started_at.timestamp() * 1000)
            index = self.keys.index(execution.tenant)
            pipe.zadd(index, {eid: started_ms})
            pipe.zremrangebyscore(index, "-inf", started_ms - self.state_ttl_s * 1000)
        for timer in effects.timers:
            pipe.zadd(self.keys.timers, {f"{eid}|{timer.key}": int(timer.at.timestamp() * 1000)})
        for timer_key in effects.cancel_timers:
            pipe.zrem(self.keys.timers, f"{eid}|{timer_key}")

    async def flush(
        self, execution_id: str, send_all: Callable[[list[OutboxEntry]], Awaitable[None]]
    ) -> bool:
        """Carries out the execution's pending effects in order. False if another process held
        the flush lock for too long (the caller then retries later)."""
        lock = self.keys.flush_lock(execution_id)
        outbox = self.keys.outbox(execution_id)
        token = f"{id(self)}:{asyncio.current_task()!r}"
        waited = 0.0
        while not await self.redis.set(lock, token, nx=True, px=FLUSH_LOCK_MS):
            if not await self.redis.exists(outbox):
                return True  # someone else flushed everything, including ours
            await asyncio.sleep(0.01)
            waited += 0.01
            if waited > FLUSH_WAIT_S:
                return False
        try:
            while True:
                raws = await self.redis.lrange(outbox, 0, -1)
                if not raws:
                    return True
                await send_all([OutboxEntry.decode(str(raw)) for raw in raws])
                await self.redis.ltrim(outbox, len(raws), -1)
        finally:
            if await self.redis.get(lock) == token:
                await self.redis.delete(lock)

    async def pending_outboxes(self, limit: int = 100) -> list[str]:
        """Executions with unflushed effects (after a crash with no redelivery to come)."""
        found = []
        async for key in self.redis.scan_iter(match=f"{self.keys.prefix}exec:*:outbox", count=500):
            found.append(str(key).removeprefix(f"{self.keys.prefix}exec:").removesuffix(":outbox"))
            if len(found) >= limit:
                break
        return found

    async def recent(
        self, tenants: list[str], since_ms: int | None, scan: int
    ) -> tuple[list[Execution], bool]:
        """Up to `scan` executions of the tenants, newest first, started at or after
        `since_ms`; and whether there were more."""
        low = "-inf" if since_ms is None else since_ms
        candidates: list[tuple[float, str]] = []
        for tenant in tenants:
            found = await self.redis.zrevrangebyscore(
                self.keys.index(tenant), "+inf", low, start=0, num=scan + 1, withscores=True
            )
            candidates += [(float(pair[1]), str(pair[0])) for pair in found]
        candidates.sort(reverse=True)
        more = len(candidates) > scan
        ids = [eid for _, eid in candidates[:scan]]
        raws = await self.redis.mget([self.keys.execution(eid) for eid in ids]) if ids else []
        return [Execution.model_validate_json(raw) for raw in raws if raw is not None], more

    # ------------------------------------------------------------------ timers
    async def due_timers(self, now_ms: int, limit: int) -> list[str]:
        members = await self.redis.zrangebyscore(
            self.keys.timers, "-inf", now_ms, start=0, num=limit
        )
        claimed = []
        for timer in map(str, members):
            if await self._claim_timer(
                keys=[self.keys.timers], args=[timer, now_ms, TIMER_LEASE_MS]
            ):
                claimed.append(timer)
        return claimed

    async def next_timer_ms(self) -> int | None:
        head = await self.redis.zrange(self.keys.timers, 0, 0, withscores=True)
        return int(head[0][1]) if head else None

    async def drop_timer(self, timer: str) -> None:
        await self.redis.zrem(self.keys.timers, timer)

    # ------------------------------------------------------------------ live executions
    async def live(self) -> dict[str, str]:
        return {str(k): str(v) for k, v in (await self.redis.hgetall(self.keys.live)).items()}

    # ------------------------------------------------------------------ circuit breakers
    async def breaker_acquire(
        self, tenant: str, step_type: str, now_ms: int, cooldown_ms: int
    ) -> int:
        """0 when the tenant's step of this type may run now, else when to try again (ms)."""
        keys = [self.keys.breaker(tenant, step_type), self.keys.probe(tenant, step_type)]
        return int(await self._breaker_acquire(keys=keys, args=[now_ms, cooldown_ms, 1000]))

    async def breaker_record(
        self,
        tenant: str,
        step_type: str,
        *,
        success: bool,
        now_ms: int,
        threshold: int,
        cooldown_ms: int,
    ) -> int:
        """Records an attempt's outcome; returns the open-until time if this opened the breaker."""
        keys = [self.keys.breaker(tenant, step_type), self.keys.probe(tenant, step_type)]
        args = ["1" if success else "0", now_ms, threshold, cooldown_ms, BREAKER_MEMORY_MS]
        return int(await self._breaker_record(keys=keys, args=args))

    async def breaker_state(self, tenant: str, step_type: str) -> dict[str, str]:
        state = await self.redis.hgetall(self.keys.breaker(tenant, step_type))
        return {str(k): str(v) for k, v in state.items()}
