"""How processes talk to RabbitMQ: confirmed persistent publishes, strict decoding, dead letters.

Invariant 1 lives here: `publish` returns only once the broker confirmed the message (and, for
mandatory routes, that a queue took it), so a consumer that acks its input after `publish`
returns can never lose a message.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractRobustConnection,
    DeliveryMode,
)
from pydantic import ValidationError

from orchestrator import topology
from orchestrator.config import Settings
from schemas import Message, StatusEvent

M = TypeVar("M", bound=Message)

# Header names for our own dead-lettering. Not `x-` prefixed: since RabbitMQ 3.13 the broker
# strips client-set `x-` headers when a message is republished.
REASON_HEADER = "orch-reason"
DETAIL_HEADER = "orch-detail"
QUEUE_HEADER = "orch-queue"
REJECTED_AT_HEADER = "orch-rejected-at"
REPLAYS_HEADER = "orch-replays"

CONTENT_TYPE = "application/json"
# A confirm that takes longer than this means the broker is in trouble (disk alarm, partition);
# better to fail the publish and redeliver the input than to hang a consumer forever.
PUBLISH_TIMEOUT_S = 30.0
MAX_DETAIL_CHARS = 1000


class InvalidMessage(Exception):
    """A message that can never be processed: it goes to the DLQ with `reason` and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects and re-declares its consumers after a broker restart."""
    return await aio_pika.connect_robust(
        str(settings.rabbitmq_url), client_properties={"connection_name": name}
    )


async def open_channel(
    connection: AbstractRobustConnection, prefetch: int | None = None
) -> AbstractChannel:
    """Publisher confirms on, and unroutable mandatory publishes raise instead of vanishing."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


def to_amqp(
    message: Message, *, headers: dict[str, Any] | None = None, user_id: str | None = None
) -> aio_pika.Message:
    return aio_pika.Message(
        body=message.to_bytes(),
        content_type=CONTENT_TYPE,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id(),
        type=message.message_type,
        timestamp=datetime.now(UTC),
        headers=headers or {},
        user_id=user_id,
    )


async def publish(
    channel: AbstractChannel,
    message: Message,
    *,
    routing_key: str | None = None,
    exchange: str | None = None,
    headers: dict[str, Any] | None = None,
    user_id: str | None = None,
) -> None:
    """Publishes along the message's route (topology.ROUTES) and waits for the confirm.

    Straight on aio-pika's underlying aiormq channel, which `Exchange.publish` also ends in,
    but without waiting for the socket write to drain first: that wait holds the channel's
    publish lock, so concurrent publishes went out one drain at a time. The confirm (a nack
    raises DeliveryError, an unroutable mandatory message PublishError) is still awaited."""
    default_exchange, default_key, mandatory = topology.route(message)
    amqp_message = to_amqp(message, headers=headers, user_id=user_id)
    # The concrete aiormq channel: its abstract type does not declare `wait`.
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(
        amqp_message.body,
        exchange=exchange if exchange is not None else default_exchange,
        routing_key=routing_key if routing_key is not None else default_key,
        properties=amqp_message.properties,
        mandatory=mandatory,
        timeout=PUBLISH_TIMEOUT_S,
        wait=False,
    )


def decode(incoming: AbstractIncomingMessage, model: type[M]) -> M:
    """Validates a delivery against its contract or raises InvalidMessage saying why."""
    if incoming.content_type not in (None, CONTENT_TYPE):
        raise InvalidMessage("bad_content_type", f"content type {incoming.content_type!r}")
    if incoming.type not in (None, model.message_type):
        raise InvalidMessage(
            "wrong_message_type", f"expected {model.message_type!r}, got {incoming.type!r}"
        )
    try:
        return model.model_validate_json(incoming.body)
    except ValidationError as exc:
        json_invalid = any(error["type"] == "json_invalid" for error in exc.errors())
        return_reason = "malformed_json" if json_invalid else "schema_violation"
        raise InvalidMessage(return_reason, _summarise(exc)) from None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "<message>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)[:MAX_DETAIL_CHARS]


async def dead_letter(
    channel: AbstractChannel,
    incoming: AbstractIncomingMessage,
    queue: str,
    reason: str,
    detail: str,
) -> None:
    """Moves a message to `<queue>.dlq` with why, then acks it. Confirm first, ack second:
    a crash in between leaves a duplicate in the DLQ (tolerated), never a loss."""
    headers = dict(incoming.headers or {})
    headers.update(
        {
            REASON_HEADER: reason,
            DETAIL_HEADER: detail[:MAX_DETAIL_CHARS],
            QUEUE_HEADER: queue,
            REJECTED_AT_HEADER: datetime.now(UTC).isoformat(),
        }
    )
    copy = aio_pika.Message(
        body=incoming.body,
        content_type=incoming.content_type,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=incoming.message_id,
        type=incoming.type,
        timestamp=incoming.timestamp,
        headers=headers,
        # user_id is not copied: the broker checks it against *our* connection's user.
    )
    exchange = await channel.get_exchange(topology.DEAD_LETTERS, ensure=False)
    await exchange.publish(copy, routing_key=queue, mandatory=True, timeout=PUBLISH_TIMEOUT_S)
    await incoming.ack()


async def reject_invalid(
    channel: AbstractChannel, incoming: AbstractIncomingMessage, queue: str, exc: InvalidMessage
) -> None:
    """Bad input: a `message.rejected` status event (subscribers learn of it), then the DLQ
    with the reason (operators can inspect and replay it), then the ack. The consumer goes on."""
    event = StatusEvent.build(
        "message",
        "rejected",
        event_id=f"rejected:{incoming.message_id or uuid.uuid4().hex}",
        data={
            "queue": queue,
            "reason": exc.reason,
            "detail": exc.detail,
            "message_id": incoming.message_id,
        },
    )
    await publish(channel, event)
    await dead_letter(channel, incoming, queue, exc.reason, exc.detail)
