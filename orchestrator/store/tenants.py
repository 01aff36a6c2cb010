"""Tenant state in Redis: known tenants, weights and caps, penalties, quarantines, commands.

Penalties and quarantines are keys with an expiry (the command's `expires_at`), so a punished
tenant is released by Redis itself when the time is up, even if nobody is running.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis.asyncio as aioredis

from orchestrator.store import Keys
from schemas import PenaltyCommand, QuarantineCommand, ReleaseCommand

COMMAND_MEMORY_S = 30 * 86_400  # command ids are remembered this long (replays are no-ops)
VIOLATIONS_KEPT = 20  # the last violations shown per tenant


@dataclass
class TenantPolicy:
    """What the dispatcher applies to one tenant right now."""

    weight: float = 1.0
    factor: float = 1.0  # penalty weight factor
    concurrency_cap: int | None = None
    rate_per_s: float | None = None
    quarantined: bool = False
    quarantined_flows: frozenset[str] = frozenset()
    penalty: dict[str, Any] | None = None


class TenantStore:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.index = keys.tenants
        self.flow_index = keys.quarantined_flows

    async def record_violation(
        self, tenant: str, window_start: float, entry: dict[str, Any]
    ) -> None:
        """Keeps the tenant's last violations for operators. Deterministic entries for the same
        window collapse, so a consumer replaying a window after a restart adds nothing."""
        key = self.keys.violations(tenant)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(key, {json.dumps(entry, sort_keys=True): window_start})
            pipe.zremrangebyrank(key, 0, -VIOLATIONS_KEPT - 1)
            await pipe.execute()

    async def violations(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's last violations, newest first."""
        raw = await self.redis.zrevrange(self.keys.violations(tenant), 0, -1)
        return [json.loads(str(entry)) for entry in raw]

    async def register(self, tenant: str) -> None:
        await self.redis.sadd(self.index, tenant)

    async def tenants(self) -> list[str]:
        return sorted(str(t) for t in await self.redis.smembers(self.index))

    async def set_config(
        self,
        tenant: str,
        *,
        weight: float | None = None,
        concurrency_cap: int | None = None,
        rate_per_s: float | None = None,
    ) -> None:
        fields: dict[str, str] = {}
        if weight is not None:
            fields["weight"] = str(weight)
        if concurrency_cap is not None:
            fields["concurrency_cap"] = str(concurrency_cap)
        if rate_per_s is not None:
            fields["rate_per_s"] = str(rate_per_s)
        await self.register(tenant)
        if fields:
            await self.redis.hset(self.keys.tenant_config(tenant), mapping=fields)  # type: ignore[arg-type]

    async def policies(self, tenants: list[str]) -> dict[str, TenantPolicy]:
        """Current policy of each tenant, in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
                pipe.hgetall(self.keys.tenant_config(tenant))
                pipe.get(self.keys.penalty(tenant))
                pipe.exists(self.keys.quarantine(tenant))
            results = await pipe.execute()
        flow_quarantines: dict[str, set[str]] = {}
        for target in await self._quarantined_flows():
            tenant, _, flow = target.partition("/")
            flow_quarantines.setdefault(tenant, set()).add(flow)
        out = {}
        for i, tenant in enumerate(tenants):
            config, penalty_raw, quarantined = results[3 * i : 3 * i + 3]
            penalty = json.loads(penalty_raw) if penalty_raw else None
            caps = [
                int(c)
                for c in (config.get("concurrency_cap"), (penalty or {}).get("concurrency_cap"))
                if c is not None
            ]
            rates = [
                float(r)
                for r in (config.get("rate_per_s"), (penalty or {}).get("rate_per_s"))
                if r is not None
            ]
            out[tenant] = TenantPolicy(
                weight=float(config.get("weight", 1.0)),
                factor=float((penalty or {}).get("weight_factor", 1.0)),
                concurrency_cap=min(caps) if caps else None,
                rate_per_s=min(rates) if rates else None,
                quarantined=bool(quarantined),
                quarantined_flows=frozenset(flow_quarantines.get(tenant, set())),
                penalty=penalty,
            )
        return out

    async def _quarantined_flows(self) -> list[str]:
        """Flow quarantines still in force (an index, not a keyspace scan); the index forgets
        the ones that expired."""
        members = sorted(str(m) for m in await self.redis.smembers(self.flow_index))
        if not members:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for target in members:
                tenant, _, flow = target.partition("/")
                pipe.exists(self.keys.quarantine(tenant, flow))
            alive = await pipe.execute()
        expired = [m for m, ok in zip(members, alive, strict=True) if not ok]
        if expired:
            await self.redis.srem(self.flow_index, *expired)
        return [m for m, ok in zip(members, alive, strict=True) if ok]

    async def apply(
        self, command: PenaltyCommand | QuarantineCommand | ReleaseCommand, now: datetime
    ) -> bool:
        """Applies a control command once (by command id). False for a replay."""
        if not await self.redis.set(
            self.keys.command(command.command_id), "1", nx=True, ex=COMMAND_MEMORY_S
        ):
            return False
        # Not registered: a command may name a tenant that has no flows (from a forged usage
        # event, say), and a registered tenant gets a fair queue. The penalty or quarantine
        # key applies once the tenant runs anything, and expires either way.
        if isinstance(command, PenaltyCommand):
            ttl_ms = int((command.expires_at - now).total_seconds() * 1000)
            if ttl_ms > 0:
                penalty = {
                    "weight_factor": command.weight_factor,
                    "concurrency_cap": command.concurrency_cap,
                    "rate_per_s": command.rate_per_s,
                    "rule": command.rule,
                    "reason": command.reason,
                    "command_id": command.command_id,
                    "expires_at": command.expires_at.isoformat(),
                }
                await self.redis.set(
                    self.keys.penalty(command.tenant), json.dumps(penalty), px=ttl_ms
                )
        elif isinstance(command, QuarantineCommand):
            ttl_ms = int((command.expires_at - now).total_seconds() * 1000)
            if ttl_ms > 0:
                reason = json.dumps(
                    {
                        "rule": command.rule,
                        "reason": command.reason,
                        "command_id": command.command_id,
                        "expires_at": command.expires_at.isoformat(),
                    }
                )
                await self.redis.set(
                    self.keys.quarantine(command.tenant, command.flow_id), reason, px=ttl_ms
                )
                if command.flow_id is not None:
                    await self.redis.sadd(self.flow_index, f"{command.tenant}/{command.flow_id}")
        else:
            if command.releases in ("penalty", "all"):
                await self.redis.delete(self.keys.penalty(command.tenant))
            if command.releases in ("quarantine", "all"):
                await self.redis.delete(self.keys.quarantine(command.tenant, command.flow_id))
        return True

    async def describe(self, tenant: str) -> dict[str, Any]:
        policy = (await self.policies([tenant]))[tenant]
        raw = await self.redis.get(self.keys.quarantine(tenant))
        quarantine = None if raw is None else str(raw)
        return {
            "tenant": tenant,
            "weight": policy.weight,
            "penalty": policy.penalty,
            "quarantine": json.loads(quarantine)
            if quarantine and quarantine.startswith("{")
            else quarantine,
            "quarantined_flows": sorted(policy.quarantined_flows),
            "concurrency_cap": policy.concurrency_cap,
            "rate_per_s": policy.rate_per_s,
            "last_violations": await self.violations(tenant),
        }
