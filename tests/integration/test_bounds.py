"""What tenant input can create is bounded: a command or a flow start naming a tenant without
flows creates no broker objects, and its Redis keys expire."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import aiormq
import pytest
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError

from orchestrator import store, topology
from orchestrator.amqp import publish
from orchestrator.config import Settings
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.scheduler.service import Scheduler
from orchestrator.testing import wait_until
from schemas import FlowStartRequested, PenaltyCommand
from tests.integration.helpers import fresh_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_penalty_for_a_tenant_without_flows_creates_no_queue(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    redis = store.connect(test_settings)
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    stop = asyncio.Event()
    dispatcher = asyncio.create_task(Dispatcher(test_settings, redis, amqp).run(stop))
    try:
        command = PenaltyCommand(
            command_id=f"cpu_share:{ghost}:{now:%Y%m%dT%H%M%S}",
            tenant=ghost,
            rule="cpu_share",
            weight_factor=0.5,
            issued_at=now,
            expires_at=now + timedelta(minutes=5),
        )
        await publish(channel, command)
        penalty = f"{test_settings.redis_prefix}penalty:{ghost}"
        await wait_until(lambda: redis.exists(penalty), timeout_s=10, what="the penalty applied")
        assert 0 < await redis.pttl(penalty) <= 300_000  # applied, and it expires
        # the wait is the behaviour under test: no queue appears through a few dispatcher
        # refreshes (every 0.5 s), an absence nothing announces
        await asyncio.sleep(1.5)
        probe = await amqp.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await probe.declare_queue(topology.tenant_queue_name(ghost), passive=True)
        assert ghost not in await redis.smembers(f"{test_settings.redis_prefix}tenants")
    finally:
        stop.set()
        await dispatcher
        async for key in redis.scan_iter(match=f"{test_settings.redis_prefix}*"):
            await redis.delete(key)
        await redis.aclose()


async def test_a_flow_start_for_an_unknown_tenant_is_unroutable_and_creates_nothing(
    settings: Settings, amqp: AbstractRobustConnection, channel: AbstractChannel
) -> None:
    """Ingress queues exist for registered tenants only: a request for any other tenant is
    returned to its publisher (mandatory), and the scheduler declares nothing for it."""
    test_settings = fresh_settings(settings)
    redis = store.connect(test_settings)
    ghost = f"ghost-{uuid.uuid4().hex[:8]}"
    stop = asyncio.Event()
    scheduler = asyncio.create_task(Scheduler(test_settings, redis, amqp).run(stop))
    try:
        request = FlowStartRequested(tenant=ghost, flow_id="f", idempotency_key="k")
        with pytest.raises(DeliveryError):
            await publish(channel, request)
        # the wait is the behaviour under test: no queue appears through a refresh of the
        # scheduler's ingress, an absence nothing announces
        await asyncio.sleep(1.5)
        probe = await amqp.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await probe.declare_queue(topology.ingress_queue_name(ghost), passive=True)
    finally:
        stop.set()
        await scheduler
        await redis.aclose()
