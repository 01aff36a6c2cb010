"""Connections to the real brokers of this test session (see tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from orchestrator import topology
from orchestrator.amqp import connect, open_channel
from orchestrator.config import Settings


@pytest_asyncio.fixture(loop_scope="session")
async def amqp(settings: Settings) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(settings, "tests")
    async with connection:
        yield connection


@pytest_asyncio.fixture(loop_scope="session")
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    channel = await open_channel(amqp)
    await topology.apply(channel)
    yield channel
    if not channel.is_closed:
        await channel.close()
