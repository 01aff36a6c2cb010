"""What cron firing and flow-start ingress share: the Redis stores, the channel they publish
on, admission of an execution (overlap policy, quarantine), status events, and the ids that
make every admission step safe to repeat."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator.amqp import open_channel, publish
from orchestrator.clock import Clock, SystemClock
from orchestrator.config import Settings, instance_id
from orchestrator.store import Keys, member
from orchestrator.store.admission import Admission, AdmissionStore, idempotency_digest
from orchestrator.store.batch import Batcher
from orchestrator.store.flows import FlowRegistry
from schemas import ExecutionRequested, FlowDefinition, StatusEvent

# Execution ids are UUIDv5 of the fire id: a re-fired tick or a re-sent request yields the
# same execution id, which is what makes every admission step safe to repeat.
EXECUTION_NAMESPACE = uuid.UUID("6f1c2d4e-8a8b-4c1e-9a43-0f5d2b7c9e11")


def iso_ms(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def cron_fire_id(tenant: str, flow_id: str, nominal: datetime) -> str:
    return f"{tenant}/{flow_id}@{iso_ms(nominal)}"


def request_fire_id(tenant: str, flow_id: str, idempotency_key: str) -> str:
    return f"{tenant}/{flow_id}#{idempotency_digest(idempotency_key)}"


def execution_id_for(fire_id: str) -> str:
    return str(uuid.uuid5(EXECUTION_NAMESPACE, fire_id))


class Admitting:
    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        connection: AbstractRobustConnection,
        clock: Clock | None = None,
        replica: str | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.connection = connection
        self.clock: Clock = clock or SystemClock()
        self.replica = replica or instance_id()
        self.keys = Keys(settings.redis_prefix)
        self.flows = FlowRegistry(redis, self.keys)
        self.admission = AdmissionStore(redis, self.keys, batched=Batcher(redis))
        self.lease_ms = int(settings.running_lease_s * 1000)
        self._channel: AbstractChannel | None = None

    async def channel(self) -> AbstractChannel:
        if self._channel is None or self._channel.is_closed:
            self._channel = await open_channel(
                self.connection, prefetch=self.settings.ingress_prefetch
            )
        return self._channel

    async def admit(self, definition: FlowDefinition, execution: ExecutionRequested) -> Admission:
        return await self.admission.admit(
            member(definition.tenant, definition.id),
            tenant=definition.tenant,
            flow_id=definition.id,
            execution_id=execution.execution_id,
            policy=definition.overlap,
            lease_ms=self.lease_ms,
            payload=execution.model_dump_json(),
        )

    async def status(
        self,
        entity: str,
        state: str,
        definition: FlowDefinition | None,
        event_key: str,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        tenant: str | None = None,
    ) -> None:
        event = StatusEvent.build(
            entity,
            state,
            event_id=f"{event_key}:{entity}.{state}",
            tenant=definition.tenant if definition else tenant,
            flow=definition.id if definition else None,
            subject=subject,
            data=data,
        )
        await publish(await self.channel(), event)
