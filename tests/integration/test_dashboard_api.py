"""The dashboard's DLQ API against real RabbitMQ and Redis (in this process, over ASGI):
depths and reasons, and the reasons read again only when they may have changed."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from aio_pika import Message
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import dashboard, dlq, store, topology
from orchestrator.amqp import REASON_HEADER
from orchestrator.config import Settings
from orchestrator.testing import wait_until
from tests.integration.helpers import fresh_settings, purged

pytestmark = pytest.mark.asyncio(loop_scope="session")

DLQ = topology.EXECUTIONS_QUEUE + topology.DLQ_SUFFIX


async def _letter(channel: AbstractChannel, reason: str) -> None:
    await channel.default_exchange.publish(
        Message(
            f'{{"broken": "{uuid.uuid4()}"}}'.encode(),
            content_type="application/json",
            message_id=str(uuid.uuid4()),
            headers={REASON_HEADER: reason},
        ),
        routing_key=DLQ,
    )


async def test_dlq_reasons_are_counted_and_read_again_only_when_the_depth_changes(
    settings: Settings,
    amqp: AbstractRobustConnection,
    channel: AbstractChannel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    test_settings = fresh_settings(settings)
    await purged(channel, DLQ)
    peeks: list[str] = []
    peek = dlq.peek

    async def counted(*args: Any, **kwargs: Any) -> list[dlq.Letter]:
        peeks.append(args[1])
        return await peek(*args, **kwargs)

    monkeypatch.setattr(dlq, "peek", counted)
    redis = store.connect(test_settings)
    app = dashboard.Dashboard(test_settings, redis, amqp).app()
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://dashboard") as http:

            async def ours() -> dict[str, Any]:
                answer = (await http.get("/api/dlqs")).json()
                return next(q for q in answer["queues"] if q["queue"] == DLQ)

            async def at_depth(depth: int) -> dict[str, Any]:
                """The management API's depths lag the queue by its stats interval (5 s)."""

                async def check() -> dict[str, Any] | None:
                    queue = await ours()
                    return queue if queue["depth"] == depth else None

                return await wait_until(check, timeout_s=30, every_s=0.2, what=f"depth {depth}")

            await _letter(channel, "schema_violation")
            await _letter(channel, "schema_violation")
            await _letter(channel, "undecodable")
            first = await at_depth(3)
            assert first["reasons"] == {"schema_violation": 2, "undecodable": 1}
            read = peeks.count(DLQ)

            # Same depth: the counts come from memory, the letters are not touched again.
            assert await ours() == first
            assert peeks.count(DLQ) == read

            # A new letter: read again.
            await _letter(channel, "forbidden")
            later = await at_depth(4)
            assert later["reasons"] == {"schema_violation": 2, "undecodable": 1, "forbidden": 1}
            assert peeks.count(DLQ) == read + 1
    finally:
        await purged(channel, DLQ)
        await redis.aclose()
