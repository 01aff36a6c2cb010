"""`Operator`: what an operator does to tenants and flows, as calls. The `orchestrator` CLI
is a presentation of these; scripts and dashboards use them the same way.

    async with Operator(load_settings()) as ops:
        await ops.apply_flows(load_flow_files([Path("flows.yaml")]))
        await ops.set_weight("acme", 3)
        await ops.penalize("noisy", factor=0.25, minutes=10, reason="ran hot")
        await ops.release("noisy")

Penalties, quarantines and releases travel as control commands over AMQP (the dispatcher
applies them; only operator and violations accounts may publish them), exactly like the
violations consumer's. Weights and flow definitions are written to Redis, which operators
reach and tenants do not. For what a tenant's service does (start, follow, cancel), see
`orchestrator.client.OrchestratorClient`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import redis.asyncio as aioredis
from aio_pika.abc import AbstractRobustConnection

from orchestrator import store
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.clock import SystemClock
from orchestrator.config import Settings
from orchestrator.store.admission import AdmissionStore
from orchestrator.store.flows import Applied, FlowRegistry
from orchestrator.store.tenants import TenantPolicy, TenantStore
from orchestrator.store.workers import WorkerEntry, live_workers
from schemas import (
    FlowDefinition,
    Message,
    PenaltyCommand,
    QuarantineCommand,
    ReleaseCommand,
)

Releases = Literal["penalty", "quarantine", "all"]


@dataclass(frozen=True)
class FlowState:
    definition: FlowDefinition
    next_fire_ms: int | None
    running_execution: str | None


class Operator:
    def __init__(self, settings: Settings, *, issued_by: str = "operator") -> None:
        self.settings = settings
        self.issued_by = issued_by
        self.keys = store.Keys(settings.redis_prefix)
        self._redis: aioredis.Redis | None = None
        self._connection: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Operator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        if self._redis is not None:
            await self._redis.aclose()

    @property
    def redis(self) -> aioredis.Redis:
        if self._redis is None:
            self._redis = store.connect(self.settings)
        return self._redis

    async def _send(self, command: Message) -> None:
        """Published with a confirm: when this returns, the broker has the command."""
        if self._connection is None:
            self._connection = await connect(self.settings, "orchestrator-operator")
        await publish(await open_channel(self._connection), command)

    def _command_id(self) -> str:
        return f"{self.issued_by}:{uuid.uuid4()}"

    # ------------------------------------------------------------------ tenants
    async def tenants(self) -> dict[str, TenantPolicy]:
        """Every known tenant and its policy now (weight, penalty, cap, quarantine)."""
        tenants = TenantStore(self.redis, self.keys)
        names = await tenants.tenants()
        return await tenants.policies(names) if names else {}

    async def describe_tenant(self, tenant: str) -> dict[str, Any]:
        return await TenantStore(self.redis, self.keys).describe(tenant)

    async def set_weight(
        self,
        tenant: str,
        weight: float,
        *,
        concurrency_cap: int | None = None,
        rate_per_s: float | None = None,
    ) -> None:
        await TenantStore(self.redis, self.keys).set_config(
            tenant, weight=weight, concurrency_cap=concurrency_cap, rate_per_s=rate_per_s
        )

    async def penalize(
        self,
        tenant: str,
        *,
        factor: float = 0.5,
        minutes: float = 10,
        concurrency_cap: int | None = None,
        rate_per_s: float | None = None,
        reason: str = "operator",
    ) -> PenaltyCommand:
        command = PenaltyCommand(
            command_id=self._command_id(),
            tenant=tenant,
            rule="operator",
            reason=reason,
            issued_by=self.issued_by,
            weight_factor=factor,
            concurrency_cap=concurrency_cap,
            rate_per_s=rate_per_s,
            expires_at=_in(minutes),
        )
        await self._send(command)
        return command

    async def quarantine(
        self, tenant: str, *, flow: str | None = None, minutes: float = 30, reason: str = "operator"
    ) -> QuarantineCommand:
        command = QuarantineCommand(
            command_id=self._command_id(),
            tenant=tenant,
            flow_id=flow,
            rule="operator",
            reason=reason,
            issued_by=self.issued_by,
            expires_at=_in(minutes),
        )
        await self._send(command)
        return command

    async def release(
        self, tenant: str, *, flow: str | None = None, what: Releases = "all"
    ) -> ReleaseCommand:
        command = ReleaseCommand(
            command_id=self._command_id(),
            tenant=tenant,
            flow_id=flow,
            rule="operator",
            issued_by=self.issued_by,
            releases=what,
        )
        await self._send(command)
        return command

    # ------------------------------------------------------------------ flows
    async def apply_flows(self, definitions: list[FlowDefinition]) -> list[Applied]:
        """Registers all of them at once, or none (ValueError says why)."""
        return await FlowRegistry(self.redis, self.keys).apply(definitions, SystemClock().now())

    async def flows(self, tenant: str | None = None) -> list[tuple[FlowDefinition, int | None]]:
        registry = FlowRegistry(self.redis, self.keys)
        return [(f, await registry.next_fire(f.tenant, f.id)) for f in await registry.list(tenant)]

    async def flow(self, tenant: str, flow_id: str) -> FlowState | None:
        registry = FlowRegistry(self.redis, self.keys)
        definition = await registry.get(tenant, flow_id)
        if definition is None:
            return None
        running = await AdmissionStore(self.redis, self.keys).running(store.member(tenant, flow_id))
        return FlowState(definition, await registry.next_fire(tenant, flow_id), running)

    async def set_paused(self, tenant: str, flow_id: str, paused: bool) -> bool:
        """False if there is no such flow."""
        return await FlowRegistry(self.redis, self.keys).set_paused(tenant, flow_id, paused)

    async def delete_flow(self, tenant: str, flow_id: str) -> bool:
        """False if there is no such flow."""
        return await FlowRegistry(self.redis, self.keys).delete(tenant, flow_id)

    # ------------------------------------------------------------------ workers
    async def workers(self) -> list[WorkerEntry]:
        return await live_workers(self.redis, self.keys)


def _in(minutes: float) -> datetime:
    return datetime.now(UTC) + timedelta(minutes=minutes)
