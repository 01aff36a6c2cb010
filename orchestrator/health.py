"""Whether the three brokers answer: used by `orchestrator check` and `orchestrator up`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aio_pika
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient

from orchestrator.config import Settings

CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class BrokerStatus:
    name: str
    ok: bool
    detail: str


async def check_rabbitmq(settings: Settings) -> BrokerStatus:
    connection = await aio_pika.connect(str(settings.rabbitmq_url), timeout=CHECK_TIMEOUT_S)
    async with connection:
        channel = await connection.channel()
        await channel.close()
        props = connection.transport.connection.server_properties if connection.transport else {}
        version = props.get("version", b"?")
        text = version.decode() if isinstance(version, bytes) else str(version)
    return BrokerStatus("rabbitmq", True, f"RabbitMQ {text} at {settings.rabbitmq_url.host}")


async def check_redis(settings: Settings) -> BrokerStatus:
    client = aioredis.from_url(str(settings.redis_url))
    try:
        await client.ping()
        info = await client.info("server")
    finally:
        await client.aclose()
    return BrokerStatus("redis", True, f"Redis {info.get('redis_version', '?')}")


async def check_kafka(settings: Settings) -> BrokerStatus:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_servers, request_timeout_ms=int(CHECK_TIMEOUT_S * 1000)
    )
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    brokers = cluster.get("brokers", [])
    if not brokers:
        return BrokerStatus("kafka", False, "metadata lists no broker")
    return BrokerStatus(
        "kafka", True, f"{len(brokers)} broker(s), controller {cluster.get('controller_id')}"
    )


async def check_all(settings: Settings) -> list[BrokerStatus]:
    checks = {"rabbitmq": check_rabbitmq, "redis": check_redis, "kafka": check_kafka}

    async def guarded(name: str) -> BrokerStatus:
        try:
            return await asyncio.wait_for(checks[name](settings), CHECK_TIMEOUT_S * 2)
        except Exception as exc:  # any failure means "down", and we say which
            return BrokerStatus(name, False, f"{type(exc).__name__}: {exc}")

    return list(await asyncio.gather(*(guarded(name) for name in checks)))
