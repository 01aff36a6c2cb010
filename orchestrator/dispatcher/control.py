"""Control commands (penalties, quarantines, releases from the violations consumer and from
operators), applied to the tenants' state in Redis once per command id. Every dispatcher
applies them, leading or not, so a command is never stuck behind a takeover; the leader also
re-reads the tenant's policy at once (`changed`) instead of at its next refresh."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from orchestrator import topology
from orchestrator.amqp import decode_any
from orchestrator.clock import Clock
from orchestrator.consumer import Consumer
from orchestrator.store.tenants import TenantStore
from orchestrator.telemetry import get_logger
from schemas import PenaltyCommand, QuarantineCommand, ReleaseCommand

log = get_logger(__name__)

Command = PenaltyCommand | QuarantineCommand | ReleaseCommand
COMMANDS = (PenaltyCommand, QuarantineCommand, ReleaseCommand)


class ControlCommands:
    def __init__(
        self, tenants: TenantStore, clock: Clock, changed: Callable[[str], Awaitable[None]]
    ) -> None:
        self.tenants = tenants
        self.clock = clock
        self.changed = changed  # a command changed this tenant's state

    async def consume(
        self, channel: AbstractChannel, stop: asyncio.Event, retry_limit_s: float
    ) -> Consumer[Any]:
        consumer: Consumer[Any] = Consumer(
            topology.CONTROL_QUEUE,
            lambda incoming: decode_any(incoming, COMMANDS),
            self._on_command,
            stop=stop,
            retry_limit_s=retry_limit_s,
        )
        await consumer.start(channel)
        return consumer

    async def _on_command(self, command: Command, _: AbstractIncomingMessage) -> None:
        applied = await self.tenants.apply(command, self.clock.now())
        if applied:
            await self.changed(command.tenant)
        log.info(
            "dispatcher.control",
            command=command.message_type,
            tenant=command.tenant,
            applied=applied,
        )
