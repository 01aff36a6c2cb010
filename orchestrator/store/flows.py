"""The flow registry and due index in Redis: apply, list, pause, delete, (re)schedule."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from orchestrator.cron import next_due
from orchestrator.store import Keys, member
from orchestrator.store.batch import Batcher
from schemas import FlowDefinition

ApplyOutcome = Literal["created", "updated", "rescheduled", "unchanged"]


@dataclass(frozen=True)
class Applied:
    tenant: str
    flow_id: str
    outcome: ApplyOutcome


PARSED_CACHE = 1024  # flow definitions kept parsed, by their stored JSON


class FlowRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys, batched: Batcher | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # `get` through a batcher (a busy engine), and parsed once per stored version: a
        # definition is validated (cron and all) when applied, not at every execution.
        self.batched = batched
        self._parsed: dict[str, FlowDefinition] = {}

    async def apply(self, definitions: list[FlowDefinition], now: datetime) -> list[Applied]:
        """Writes all flows in one transaction (all or nothing). Unchanged flows stay as they
        are; a changed schedule (cron, timezone, jitter) is rescheduled from `now`."""
        members = [member(d.tenant, d.id) for d in definitions]
        if len(set(members)) != len(members):
            dupes = sorted({m for m in members if members.count(m) > 1})
            raise ValueError(f"flow defined twice in one apply: {', '.join(dupes)}")
        flow_keys = [self.keys.flow(m) for m in members]
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*flow_keys)
                    stored = [
                        None if raw is None else str(raw)
                        for raw in (await pipe.mget(flow_keys) if flow_keys else [])
                    ]
                    pipe.multi()  # type: ignore[no-untyped-call]
                    results = []
                    for definition, key, old_json, flow_member in zip(
                        definitions, flow_keys, stored, members, strict=True
                    ):
                        outcome = self._outcome(definition, old_json)
                        results.append(Applied(definition.tenant, definition.id, outcome))
                        if outcome == "unchanged":
                            continue
                        pipe.set(key, definition.model_dump_json())
                        pipe.sadd(self.keys.flows, flow_member)
                        pipe.sadd(self.keys.tenants, definition.tenant)
                        if outcome in ("created", "rescheduled"):
                            self._schedule(pipe, definition, flow_member, now)
                    await pipe.execute()
                except WatchError:
                    continue
                return results

    @staticmethod
    def _outcome(definition: FlowDefinition, old_json: str | None) -> ApplyOutcome:
        if old_json is None:
            return "created"
        old = FlowDefinition.model_validate_json(old_json)
        if old == definition:
            return "unchanged"
        schedule = ("cron", "timezone", "jitter_s")
        if any(getattr(old, name) != getattr(definition, name) for name in schedule):
            return "rescheduled"
        return "updated"

    def _schedule(
        self, pipe: aioredis.client.Pipeline, definition: FlowDefinition, key: str, now: datetime
    ) -> None:
        due = next_due(key, definition.cron, definition.timezone, definition.jitter_s, now)
        if due is None:
            pipe.zrem(self.keys.due, key)
            pipe.hdel(self.keys.nominal, key)
        else:
            pipe.zadd(self.keys.due, {key: due[0]})
            pipe.hset(self.keys.nominal, key, str(due[1]))

    async def get(self, tenant: str, flow_id: str) -> FlowDefinition | None:
        key = self.keys.flow(member(tenant, flow_id))
        found = await (self.batched.call("GET", key) if self.batched else self.redis.get(key))
        if found is None:
            return None
        raw = str(found)
        parsed = self._parsed.get(raw)
        if parsed is None:
            if len(self._parsed) >= PARSED_CACHE:
                self._parsed.clear()
            parsed = self._parsed[raw] = FlowDefinition.model_validate_json(raw)
        return parsed  # shared: callers do not change definitions

    async def list(self, tenant: str | None = None) -> list[FlowDefinition]:
        members = sorted(str(m) for m in await self.redis.smembers(self.keys.flows))
        if tenant is not None:
            members = [m for m in members if m.startswith(f"{tenant}/")]
        if not members:
            return []
        raws = await self.redis.mget([self.keys.flow(m) for m in members])
        return [FlowDefinition.model_validate_json(raw) for raw in raws if raw is not None]

    async def next_fire(self, tenant: str, flow_id: str) -> int | None:
        score = await self.redis.hget(self.keys.nominal, member(tenant, flow_id))
        return None if score is None else int(score)

    async def set_paused(self, tenant: str, flow_id: str, paused: bool) -> bool:
        """Returns False when the flow does not exist."""
        key = self.keys.flow(member(tenant, flow_id))
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.get(key)
                    if raw is None:
                        return False
                    definition = FlowDefinition.model_validate_json(raw)
                    pipe.multi()  # type: ignore[no-untyped-call]
                    pipe.set(
                        key, definition.model_copy(update={"paused": paused}).model_dump_json()
                    )
                    await pipe.execute()
                except WatchError:
                    continue
                return True

    async def delete(self, tenant: str, flow_id: str) -> bool:
        key = member(tenant, flow_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.flow(key))
            pipe.srem(self.keys.flows, key)
            pipe.zrem(self.keys.due, key)
            pipe.hdel(self.keys.nominal, key)
            deleted, *_ = await pipe.execute()
        return bool(deleted)
