"""Kafka topics the orchestrator relies on, declared in one place (like topology.py for AMQP).

`orchestrator.usage` carries one UsageEvent per step attempt, keyed by tenant. It must exist
before a consumer subscribes (a consumer that subscribes first waits minutes for a metadata
refresh), and it uses broker append time (`LogAppendTime`): the violations consumer decides
whether a record is late by when the broker stored it, a fact that does not change when the
record is read again after a restart.
"""

from __future__ import annotations

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from orchestrator.config import Settings
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

# The violations consumer's clock: a record with this key is appended to every partition of
# the usage topic each ORCH_VIOLATIONS_TICK_S (value `{}`). Tenant ids are slugs: no usage
# record has this key.
TICK_KEY = b"\x00tick"

USAGE_CONFIG = {"message.timestamp.type": "LogAppendTime", "retention.ms": str(7 * 86_400_000)}


def dlq_topic(settings: Settings) -> str:
    return f"{settings.usage_topic}.dlq"


async def ensure_topics(settings: Settings) -> int:
    """Creates the usage topic (and its DLQ) if missing, sets its append-time config, and
    returns its partition count. Idempotent."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
    await admin.start()
    try:
        for name, config in ((settings.usage_topic, USAGE_CONFIG), (dlq_topic(settings), {})):
            response = await admin.create_topics(
                [
                    NewTopic(
                        name,
                        num_partitions=settings.usage_partitions,
                        replication_factor=settings.kafka_replication,
                        topic_configs=config,
                    )
                ]
            )
            for _topic, code, *_ in response.topic_errors:
                if code == TopicAlreadyExistsError.errno:
                    if config:  # created elsewhere (e.g. by a producer): make sure of it
                        await admin.alter_configs(
                            [ConfigResource(ConfigResourceType.TOPIC, name, configs=config)]
                        )
                elif code:
                    raise for_code(code)(f"creating topic {name}")
                else:
                    log.info("kafka.topic_created", topic=name)
        metadata = await admin.describe_topics([settings.usage_topic])
        return len(metadata[0]["partitions"])
    finally:
        await admin.close()
