"""Execution state in Redis: optimistic transactions with an outbox, timers, breakers.

A transition is committed by one script (`_COMMIT`), atomically with all its effects: the new
state (only if the stored one is still the one the transition started from: optimistic, like
WATCH, but in one round trip), the messages to publish (an outbox list, in order), timers,
the live-executions hash, the tenant's execution index, the outcome of the step attempt for
its circuit breaker, and the breaker gates of the steps it dispatches (a step whose breaker
is open is refused, and the transition defers it instead). The same script takes the
execution's flush lock and returns the outbox, so the handler publishes at once; a second
script trims what was published, releases the flow's running lease when the execution ended,
and frees the lock. Every handler flushes the outbox before acking its input, so a crash
between commit and publish only delays the messages until the input is redelivered (or the
sweeper or a timer flushes them), and the flush lock keeps one execution's status events in
sequence order. Three round trips per transition: read, commit, finish.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import redis.asyncio as aioredis

from orchestrator.amqp import Outgoing
from orchestrator.engine.machine import Effects, Execution
from orchestrator.store import Keys, member
from orchestrator.store.batch import Batcher
from schemas import StatusEvent, StepTask

OutboxKind = Literal["task", "status", "release"]
FLUSH_LOCK_MS = 15_000
FLUSH_WAIT_S = 20.0
TIMER_LEASE_MS = 30_000
PROBE_RETRY_MS = 1000

# Timers due now: push their score forward by a lease, so a crashed engine's timers come back.
_CLAIM_TIMER = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if (not score) or tonumber(score) > tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return 1
"""

# The circuit breaker, as Lua functions shared by the scripts below.
# acquire: 0 when a step of this type may be dispatched now, else the ms time to try again.
# record: an attempt's outcome; the open-until time if this opened the breaker, else 0. Every
# write renews the hash's expiry: step types come from tenants' flow definitions, so a breaker
# nobody uses any more must not stay in Redis for ever.
_BREAKER_FUNCTIONS = """
local function breaker_acquire(bkey, pkey, now, cooldown, retry)
  local open_until = tonumber(redis.call('HGET', bkey, 'open_until') or '0')
  if open_until == 0 then return 0 end
  if now < open_until then return open_until end
  if redis.call('SET', pkey, '1', 'NX', 'PX', cooldown) then return 0 end
  return now + retry
end
local function breaker_record(bkey, pkey, success, now, threshold, cooldown, memory)
  if success == '1' then
    redis.call('DEL', bkey, pkey)
    return 0
  end
  local failures = redis.call('HINCRBY', bkey, 'failures', 1)
  local half_open = tonumber(redis.call('HGET', bkey, 'open_until') or '0') > 0
  local result = 0
  if half_open or failures >= threshold then
    result = now + cooldown
    redis.call('HSET', bkey, 'open_until', result, 'failures', 0)
    redis.call('DEL', pkey)
  end
  redis.call('PEXPIRE', bkey, cooldown + memory)
  return result
end
"""
# KEYS: breaker hash, probe key; ARGV: now ms, cooldown ms, probe retry ms
_BREAKER_ACQUIRE = (
    _BREAKER_FUNCTIONS
    + "return breaker_acquire(KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2]), "
    "tonumber(ARGV[3]))"
)
# KEYS: breaker hash, probe key; ARGV: success (1/0), now ms, threshold, cooldown ms, memory ms
_BREAKER_RECORD = (
    _BREAKER_FUNCTIONS
    + "return breaker_record(KEYS[1], KEYS[2], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), "
    "tonumber(ARGV[4]), tonumber(ARGV[5]))"
)

# KEYS: 1 execution, 2 outbox, 3 live hash, 4 timers, 5 flush lock, 6 tenant index,
#       7,8 the recorded attempt's breaker and probe (or placeholders), 9 the definition
#       record of a terminal state (or a placeholder), then a breaker and probe key per gated
#       dispatch.
# ARGV: 1 sha1 of the state the transition started from ('' = must not exist),
#       2 new state, 3 ttl s (0 = none), 4 live: 'set' | 'del', 5 flow member,
#       6 lock token, 7 lock ms, 8 index score ('' = none), 9 index trim below,
#       10 now ms, 11 cooldown ms, 12 probe retry ms, 13 threshold, 14 breaker memory ms,
#       15 record ('' | '1' success | '0' failure), 16 gates, 17 execution id,
#       18 the definition of a terminal state ('' = none), 19 entries n, then the entries,
#       then timers to add n and (score, member) pairs, then timers to remove n and members.
# Returns {'conflict', current state or false}, {'refused', gate index, retry at, ...} (nothing
# written but the breaker record), or {'ok', lock taken (1/0), outbox entries if taken...}.
_COMMIT = (
    _BREAKER_FUNCTIONS
    + """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '' then
  if current then return {'conflict', current} end
elseif (not current) or redis.sha1hex(current) ~= ARGV[1] then
  return {'conflict', current or false}
end
local now = tonumber(ARGV[10])
local cooldown = tonumber(ARGV[11])
if ARGV[15] ~= '' then
  breaker_record(KEYS[7], KEYS[8], ARGV[15], now, tonumber(ARGV[13]), cooldown,
    tonumber(ARGV[14]))
end
local gates = tonumber(ARGV[16])
local refused = {}
local probes = {}
for i = 1, gates do
  local bkey, pkey = KEYS[8 + 2 * i], KEYS[9 + 2 * i]
  local retry_at = breaker_acquire(bkey, pkey, now, cooldown, tonumber(ARGV[12]))
  if retry_at == 0 then
    if tonumber(redis.call('HGET', bkey, 'open_until') or '0') > 0 then
      table.insert(probes, pkey)  -- half open: this dispatch is the probe
    end
  else
    table.insert(refused, i)
    table.insert(refused, retry_at)
  end
end
if #refused > 0 then
  -- The transition defers these and commits again: the probes it took are handed back.
  for _, pkey in ipairs(probes) do redis.call('DEL', pkey) end
  table.insert(refused, 1, 'refused')
  return refused
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
  -- Shared by every finished execution of this definition: it outlives each one's record.
  if ARGV[18] ~= '' then
    local left = redis.call('TTL', KEYS[9])
    if left ~= -1 and left < tonumber(ARGV[3]) then
      redis.call('SET', KEYS[9], ARGV[18], 'EX', ARGV[3])
    end
  end
else
  redis.call('SET', KEYS[1], ARGV[2])
  if ARGV[18] ~= '' then redis.call('SET', KEYS[9], ARGV[18]) end
end
if ARGV[4] == 'set' then
  redis.call('HSET', KEYS[3], ARGV[17], ARGV[5])
else
  redis.call('HDEL', KEYS[3], ARGV[17])
end
if ARGV[8] ~= '' then
  redis.call('ZADD', KEYS[6], tonumber(ARGV[8]), ARGV[17])
  redis.call('ZREMRANGEBYSCORE', KEYS[6], '-inf', '(' .. ARGV[9])
end
local at = 19
local entries = tonumber(ARGV[at])
for i = 1, entries do redis.call('RPUSH', KEYS[2], ARGV[at + i]) end
at = at + entries + 1
local adds = tonumber(ARGV[at])
for i = 1, adds do
  redis.call('ZADD', KEYS[4], tonumber(ARGV[at + 2 * i - 1]), ARGV[at + 2 * i])
end
at = at + 2 * adds + 1
local removes = tonumber(ARGV[at])
for i = 1, removes do redis.call('ZREM', KEYS[4], ARGV[at + i]) end
if redis.call('SET', KEYS[5], ARGV[6], 'NX', 'PX', ARGV[7]) then
  local out = redis.call('LRANGE', KEYS[2], 0, -1)
  table.insert(out, 1, 1)
  table.insert(out, 1, 'ok')
  return out
end
return {'ok', 0}
"""
)

# After a flush. KEYS: outbox, flush lock, then the running lease of each flow to release.
# ARGV: entries published, lock token, lock ms, then the execution id of each lease.
# Returns how many entries came in meanwhile: 0, and the lock is freed; more, and the lock is
# kept (renewed) for the caller to publish them too.
_FINISH = """
redis.call('LTRIM', KEYS[1], tonumber(ARGV[1]), -1)
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then redis.call('DEL', KEYS[i]) end
end
local left = redis.call('LLEN', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[2] then
  if left == 0 then
    redis.call('DEL', KEYS[2])
  else
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
end
return left
"""
# A breaker with no failure recorded for this long (beyond its cool-down) is forgotten: closed.
BREAKER_MEMORY_MS = 600_000
# A finished execution's record starts so, then the digest of its definition (`_compact`).
_COMPACT = '{"definition_ref":"'
DEFINITION_CACHE = 256
# States this engine committed last, by execution: the next transition of an execution (its
# step's result, a timer) usually comes back to the engine that dispatched it, and starts
# from what that engine wrote without reading it again. The commit's compare-and-set checks
# it: a state another replica changed meanwhile is a conflict, answered with the newer one.
KNOWN_STATES = 4096
KNOWN_STATES_BYTES = 64 * 1024 * 1024  # and at most this much of them (outputs can be big)
KNOWN_STATE_MAX = 256 * 1024  # a bigger state is read again each time

_SEP = "\x1f"
_BODY = "\x1e"


@dataclass(frozen=True)
class OutboxEntry:
    """A message to publish (rendered: kind `task` or `status`), or the release of a flow's
    running lease (kind `release`: `flow`, `execution_id`) once everything before it is out."""

    kind: OutboxKind
    outgoing: Outgoing | None = None
    flow: str = ""
    execution_id: str = ""

    def encode(self) -> str:
        if self.outgoing is None:
            return _SEP.join((self.kind, self.flow, self.execution_id)) + _BODY
        o = self.outgoing
        fields = (self.kind, o.exchange, o.routing_key, o.message_id, o.message_type)
        head = _SEP.join((*fields, o.content_type, "1" if o.mandatory else "0", o.traceparent))
        return head + _BODY + o.body.decode()

    @classmethod
    def decode(cls, raw: str | bytes) -> OutboxEntry:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if text.startswith("["):
            return cls._decode_v1(text)
        head, _, body = text.partition(_BODY)
        fields = head.split(_SEP)
        kind: OutboxKind = fields[0]  # type: ignore[assignment]
        if kind == "release":
            return cls(kind, flow=fields[1], execution_id=fields[2])
        exchange, routing_key, message_id, message_type, content_type, mandatory = fields[1:7]
        outgoing = Outgoing(
            exchange,
            routing_key,
            message_id,
            message_type,
            content_type,
            mandatory == "1",
            body.encode(),
            fields[7] if len(fields) > 7 else "",  # entries of engines before tracing: none
        )
        return cls(kind, outgoing)

    @classmethod
    def _decode_v1(cls, text: str) -> OutboxEntry:
        """Entries written by engines before the rendered format: [kind, body, extra]."""
        kind, body, extra = json.loads(text)
        if kind == "release":
            return cls("release", flow=body, execution_id=extra)
        model = StatusEvent if kind == "status" else StepTask
        return cls(kind, Outgoing.of(model.model_validate_json(body)))


@dataclass(frozen=True)
class Gate:
    """A dispatch that its step type's circuit breaker must let through."""

    tenant: str
    step_type: str


@dataclass(frozen=True)
class Attempt:
    """A step attempt's outcome, recorded with the commit for its step type's breaker."""

    tenant: str
    step_type: str
    success: bool


@dataclass(frozen=True)
class BreakerPolicy:
    threshold: int
    cooldown_ms: int


@dataclass
class Commit:
    """What a commit found: `conflict` (the state changed since it was read: `current` is the
    stored one), `refused` (gates whose breaker is open: index -> retry at ms), or done, with
    the outbox if it took the flush lock (`claimed`; None: someone else flushes, wait)."""

    conflict: bool = False
    current: str | None = None
    refused: dict[int, int] = field(default_factory=dict)
    claimed: list[str] | None = None
    token: str = ""


def state_digest(raw: str | None) -> str:
    return "" if raw is None else hashlib.sha1(raw.encode()).hexdigest()  # noqa: S324 - a CAS tag


class ExecutionStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        state_ttl_s: int,
        breaker: BreakerPolicy | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.state_ttl_s = state_ttl_s
        self.breaker = breaker or BreakerPolicy(threshold=5, cooldown_ms=30_000)
        self._claim_timer = redis.register_script(_CLAIM_TIMER)
        self._breaker_acquire = redis.register_script(_BREAKER_ACQUIRE)
        self._breaker_record = redis.register_script(_BREAKER_RECORD)
        # The calls every transition makes, batched across the handlers running at once.
        self.batched = Batcher(redis)
        self._definitions: dict[str, str] = {}  # digest -> definition JSON, bounded
        self._known: OrderedDict[str, str] = OrderedDict()  # execution -> state, bounded
        self._known_bytes = 0

    async def load(self, execution_id: str) -> Execution | None:
        raw = await self.read(execution_id)
        return None if raw is None else await self.parse(raw)

    async def read(self, execution_id: str) -> str | None:
        """The state as stored (what a commit's compare-and-set compares against)."""
        raw = await self.batched.call("GET", self.keys.execution(execution_id))
        return None if raw is None else _text(raw)

    async def current(self, execution_id: str) -> tuple[str | None, bool]:
        """The state a transition starts from, and whether it is only remembered: the one
        this engine committed last if it knows it, else as stored. A remembered state may be
        stale: a commit from it is checked (its compare-and-set), a decision to change
        nothing is not, so the caller asks the stored state before it settles for nothing.
        Only for transitions: an answer to a query reads what is stored."""
        known = self._known.get(execution_id)
        if known is not None:
            return known, True
        return await self.read(execution_id), False

    def _know(self, execution_id: str, state: str | None) -> None:
        """Remembers `state` as the execution's latest (None: forgets it), oldest out first
        beyond KNOWN_STATES states or KNOWN_STATES_BYTES characters."""
        forgotten = self._known.pop(execution_id, None)
        if forgotten is not None:
            self._known_bytes -= len(forgotten)
        if state is None or len(state) > KNOWN_STATE_MAX:
            return
        while self._known and (
            len(self._known) >= KNOWN_STATES or self._known_bytes + len(state) > KNOWN_STATES_BYTES
        ):
            self._known_bytes -= len(self._known.popitem(last=False)[1])
        self._known[execution_id] = state
        self._known_bytes += len(state)

    async def parse(self, raw: str) -> Execution:
        """A stored state: a running execution carries its definition; a finished one refers
        to it by digest (`_compact`), and gets it back from the cache or Redis."""
        if not raw.startswith(_COMPACT):
            return Execution.model_validate_json(raw)
        digest = raw[len(_COMPACT) : len(_COMPACT) + 40]
        definition = self._definitions.get(digest)
        if definition is None:
            stored = await self.batched.call("GET", self.keys.definition(digest))
            if stored is None:
                raise LookupError(f"definition {digest} of a finished execution is gone")
            definition = self._remember(digest, _text(stored))
        rest = raw[len(_COMPACT) + 42 :]  # past the digest, its quote and the comma
        return Execution.model_validate_json(f'{{"definition":{definition},{rest}')

    def _remember(self, digest: str, definition: str) -> str:
        if len(self._definitions) >= DEFINITION_CACHE:
            self._definitions.pop(next(iter(self._definitions)))
        self._definitions[digest] = definition
        return definition

    def _compact(self, execution: Execution) -> tuple[str, str, str]:
        """A finished execution's record without its definition (which running ones keep:
        they must not depend on a shared key while they run, however long): the record, the
        definition's digest and its JSON. The definition of a flow is stored once for all its
        finished executions; for a one-step flow that is a third of the record."""
        definition = execution.definition.model_dump_json()
        digest = hashlib.sha1(definition.encode()).hexdigest()  # noqa: S324 - a content address
        self._remember(digest, definition)
        body = execution.model_dump_json(exclude={"definition"})
        return f'{_COMPACT}{digest}",{body[1:]}', digest, definition

    async def commit(
        self,
        execution: Execution,
        effects: Effects,
        *,
        started_from: str | None,
        now_ms: int,
        gates: list[Gate],
        attempt: Attempt | None = None,
    ) -> Commit:
        """Stores the transition's result and effects if the stored state is still
        `started_from` (None: there is none yet). See `_COMMIT`."""
        eid = execution.execution_id
        flow = member(execution.tenant, execution.flow_id)
        ttl = self.state_ttl_s if execution.terminal else 0
        entries = [OutboxEntry("status", Outgoing.of(e)).encode() for e in effects.statuses]
        # Status events first: a subscriber sees `step.dispatched` before any worker can answer.
        entries += [OutboxEntry("task", Outgoing.of(t)).encode() for t in effects.tasks]
        if effects.release_lease:
            entries.append(OutboxEntry("release", flow=flow, execution_id=eid).encode())
        live = "del" if effects.release_lease or execution.terminal else "set"
        index_score = ""
        index_floor = 0
        if effects.created:
            started_ms = int(execution.started_at.timestamp() * 1000)
            index_score = str(started_ms)
            index_floor = started_ms - self.state_ttl_s * 1000
        token = uuid.uuid4().hex
        record = attempt or Gate(execution.tenant, "-")
        if execution.terminal:
            state, digest, definition = self._compact(execution)
        else:
            state, digest, definition = execution.model_dump_json(), "-", ""
        keys = [
            self.keys.execution(eid),
            self.keys.outbox(eid),
            self.keys.live,
            self.keys.timers,
            self.keys.flush_lock(eid),
            self.keys.execution_index(execution.tenant),
            self.keys.breaker(record.tenant, record.step_type),
            self.keys.probe(record.tenant, record.step_type),
            self.keys.definition(digest),
        ]
        for gate in gates:
            keys += [self.keys.breaker(gate.tenant, gate.step_type)]
            keys += [self.keys.probe(gate.tenant, gate.step_type)]
        timers = [(int(t.at.timestamp() * 1000), f"{eid}|{t.key}") for t in effects.timers]
        args: list[str | int] = [
            state_digest(started_from),
            state,
            ttl,
            live,
            flow,
            token,
            FLUSH_LOCK_MS,
            index_score,
            index_floor,
            now_ms,
            self.breaker.cooldown_ms,
            PROBE_RETRY_MS,
            self.breaker.threshold,
            BREAKER_MEMORY_MS,
            "" if attempt is None else ("1" if attempt.success else "0"),
            len(gates),
            eid,
            definition,
            len(entries),
            *entries,
            len(timers),
            *(part for pair in timers for part in pair),
            len(effects.cancel_timers),
            *(f"{eid}|{key}" for key in effects.cancel_timers),
        ]
        try:
            reply = await self.batched.script(_COMMIT, keys, args)
        except BaseException:
            self._know(eid, None)  # committed or not: only Redis knows now
            raise
        outcome = _text(reply[0])
        if outcome == "conflict":
            current = None if reply[1] is None else _text(reply[1])
            self._know(eid, None)
            return Commit(conflict=True, current=current)
        if outcome == "refused":
            pairs = reply[1:]
            return Commit(
                refused={int(pairs[i]) - 1: int(pairs[i + 1]) for i in range(0, len(pairs), 2)}
            )
        # A finished execution is not expected back: it leaves room for running ones.
        self._know(eid, None if execution.terminal else state)
        if int(reply[1]):
            return Commit(claimed=[_text(raw) for raw in reply[2:]], token=token)
        return Commit()

    async def finish(self, execution_id: str, entries: list[OutboxEntry], token: str) -> int:
        """Trims the published `entries`, releases the running leases among them; frees the
        flush lock held with `token` unless more entries came in (returns how many)."""
        releases = [e for e in entries if e.kind == "release"]
        keys = [self.keys.outbox(execution_id), self.keys.flush_lock(execution_id)]
        keys += [self.keys.running(e.flow) for e in releases]
        args: list[str | int] = [len(entries), token, FLUSH_LOCK_MS]
        args += [e.execution_id for e in releases]
        return int(await self.batched.script(_FINISH, keys, args))

    async def flush(
        self,
        execution_id: str,
        send_all: Callable[[list[OutboxEntry]], Awaitable[None]],
        claimed: Commit | None = None,
    ) -> bool:
        """Carries out the execution's pending effects in order: those `claimed` by the commit
        (which took the flush lock), else under the lock once it is free. False if another
        process held the lock for too long (the caller then retries later)."""
        lock = self.keys.flush_lock(execution_id)
        outbox = self.keys.outbox(execution_id)
        if claimed is not None and claimed.claimed is not None:
            token, raws = claimed.token, claimed.claimed
        else:
            token = uuid.uuid4().hex
            waited = 0.0
            while not await self.redis.set(lock, token, nx=True, px=FLUSH_LOCK_MS):
                if not await self.redis.exists(outbox):
                    return True  # someone else flushed everything, including ours
                await asyncio.sleep(0.01)
                waited += 0.01
                if waited > FLUSH_WAIT_S:
                    return False
            raws = [_text(raw) for raw in await self.redis.lrange(outbox, 0, -1)]
        try:
            while raws:
                entries = [OutboxEntry.decode(raw) for raw in raws]
                await send_all(entries)
                if not await self.finish(execution_id, entries, token):
                    return True  # all out, the lock is free
                raws = [_text(raw) for raw in await self.redis.lrange(outbox, 0, -1)]
        except BaseException:
            await asyncio.shield(self._unlock(lock, token))
            raise
        await self._unlock(lock, token)  # held, with nothing in the outbox
        return True

    async def _unlock(self, lock: str, token: str) -> None:
        if await self.redis.get(lock) == token:
            await self.redis.delete(lock)

    async def pending_outboxes(self, limit: int = 100) -> list[str]:
        """Executions with unflushed effects (after a crash with no redelivery to come)."""
        found = []
        async for key in self.redis.scan_iter(match=self.keys.outbox_pattern, count=500):
            found.append(self.keys.outbox_owner(str(key)))
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
                self.keys.execution_index(tenant),
                "+inf",
                low,
                start=0,
                num=scan + 1,
                withscores=True,
            )
            candidates += [(float(pair[1]), str(pair[0])) for pair in found]
        candidates.sort(reverse=True)
        more = len(candidates) > scan
        ids = [eid for _, eid in candidates[:scan]]
        raws = await self.redis.mget([self.keys.execution(eid) for eid in ids]) if ids else []
        return [await self.parse(_text(raw)) for raw in raws if raw is not None], more

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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
