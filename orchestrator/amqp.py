"""How processes talk to RabbitMQ: confirmed persistent publishes, strict decoding, dead letters.

Invariant 1 lives here: `publish` returns only once the broker confirmed the message (and, for
mandatory routes, that a queue took it), so a consumer that acks its input after `publish`
returns can never lose a message.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
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

from orchestrator import frames, topology, tracing
from orchestrator.coalesce import CoalescingRobustConnection
from orchestrator.config import Settings
from orchestrator.frames import BAD_PROPERTIES_HEADER
from schemas import Message, StatusEvent
from schemas.common import SLUG_PATTERN

frames.install()  # before any connection: a bad property must never cost one

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
# No contract allows more (payloads are bounded at 256 KiB); refused before parsing.
MAX_BODY_BYTES = 1024 * 1024
_MESSAGE_ID = re.compile(r"[\x21-\x7e]{1,256}")
_TENANT = re.compile(SLUG_PATTERN)


class InvalidMessage(Exception):
    """A message that can never be processed: it goes to the DLQ with `reason` and `detail`."""

    def __init__(
        self, reason: str, detail: str, *, tenant: str | None = None, flow: str | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # Where the rejection is announced, when the handler knows (checked ids only).
        self.tenant = tenant
        self.flow = flow


async def connect(settings: Settings, name: str) -> AbstractRobustConnection:
    """A connection that reconnects and re-declares its consumers after a broker restart."""
    return await aio_pika.connect_robust(
        str(settings.rabbitmq_url),
        client_properties={"connection_name": name},
        connection_class=CoalescingRobustConnection,
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
        content_type=message.content_type,
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=message.message_id(),
        type=message.message_type,
        timestamp=datetime.now(UTC),
        headers=headers or {},
        user_id=user_id,
    )


@dataclass(frozen=True)
class Outgoing:
    """A message rendered for the wire: where it goes, the properties consumers read, its
    body. Kept in the engine's outbox as is, so a flush publishes bytes, parsing nothing."""

    exchange: str
    routing_key: str
    message_id: str
    message_type: str
    content_type: str
    mandatory: bool
    body: bytes
    # W3C trace context of the span it was rendered in ('' = none): sent as a header, so
    # the consumer's span continues the trace (orchestrator.tracing).
    traceparent: str = ""

    @classmethod
    def of(cls, message: Message) -> Outgoing:
        exchange, routing_key, mandatory = topology.route(message)
        return cls(
            exchange,
            routing_key,
            message.message_id(),
            message.message_type,
            message.content_type,
            mandatory,
            message.to_bytes(),
            tracing.current_traceparent(),
        )


async def send(channel: AbstractChannel, outgoing: Outgoing) -> None:
    """Publishes a rendered message persistently and waits for the confirm (as `publish`)."""
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(
        outgoing.body,
        exchange=outgoing.exchange,
        routing_key=outgoing.routing_key,
        properties=aiormq.spec.Basic.Properties(
            content_type=outgoing.content_type,
            delivery_mode=DeliveryMode.PERSISTENT.value,
            message_id=outgoing.message_id,
            message_type=outgoing.message_type,
            timestamp=datetime.now(UTC),
            headers={tracing.HEADER: outgoing.traceparent} if outgoing.traceparent else None,
        ),
        mandatory=outgoing.mandatory,
        timeout=PUBLISH_TIMEOUT_S,
        wait=False,
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
    if headers is None and user_id is None:  # the common case: pamqp properties directly
        await send(
            channel,
            Outgoing(
                exchange if exchange is not None else default_exchange,
                routing_key if routing_key is not None else default_key,
                message.message_id(),
                message.message_type,
                message.content_type,
                mandatory,
                message.to_bytes(),
                tracing.current_traceparent(),
            ),
        )
        return
    traceparent = tracing.current_traceparent()
    if traceparent:
        headers = {**(headers or {}), tracing.HEADER: traceparent}
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
    """Validates a delivery against its contract or raises InvalidMessage saying why.

    Exactly the published JSON Schema: no coercion (`"attempt": "1"` and Unix numbers for
    date-times are refused; `strict`), no NaN or Infinity anywhere (the models refuse them)."""
    check_properties(incoming)
    if incoming.content_type not in (None, CONTENT_TYPE):
        raise InvalidMessage("bad_content_type", f"content type {safe_text(incoming.content_type)}")
    if incoming.type not in (None, model.message_type):
        raise InvalidMessage(
            "wrong_message_type",
            f"expected {model.message_type!r}, got {safe_text(incoming.type)}",
        )
    try:
        return model.model_validate_json(incoming.body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        json_invalid = [e for e in errors if e["type"] == "json_invalid"]
        if any("recursion limit" in e["msg"] for e in json_invalid):
            reason = "too_deep"  # JSON nested deeper than the parser's limit (~200 levels)
        else:
            reason = "malformed_json" if json_invalid else "schema_violation"
        raise InvalidMessage(reason, _summarise(exc)) from None


def decode_any(incoming: AbstractIncomingMessage, models: tuple[type[M], ...]) -> M:
    """For a queue that carries several message types, told apart by the AMQP `type`."""
    check_properties(incoming)
    for model in models:
        if incoming.type == model.message_type:
            return decode(incoming, model)
    if incoming.type is None:
        errors: list[InvalidMessage] = []
        for model in models:
            try:
                return decode(incoming, model)
            except InvalidMessage as exc:
                errors.append(exc)
        reasons = {exc.reason for exc in errors}
        reason = reasons.pop() if len(reasons) == 1 else "schema_violation"
        detail = "; ".join(
            f"as {model.message_type}: {exc.detail}"
            for model, exc in zip(models, errors, strict=True)
        )
        raise InvalidMessage(reason, detail[:MAX_DETAIL_CHARS])
    expected = ", ".join(model.message_type for model in models)
    raise InvalidMessage(
        "wrong_message_type", f"expected one of {expected}, got {safe_text(incoming.type)}"
    )


def check_properties(incoming: AbstractIncomingMessage) -> None:
    """Refuses what no contract can accept, before parsing: properties the frame reader could
    not decode (orchestrator.frames), and bodies over the size any message may have."""
    headers = incoming.headers or {}
    bad = headers.get(BAD_PROPERTIES_HEADER)
    if bad is not None:
        raise InvalidMessage(
            "bad_properties", f"AMQP properties that cannot be decoded: {safe_text(bad)}"
        )
    if len(incoming.body) > MAX_BODY_BYTES:
        raise InvalidMessage(
            "too_large", f"body of {len(incoming.body)} bytes, the limit is {MAX_BODY_BYTES}"
        )


def safe_text(value: object, limit: int = 300) -> str:
    """Any value as printable ASCII, bounded: safe in a header, a log line and a JSON event."""
    return ascii(value)[:limit]


def valid_id(value: object) -> str | None:
    """`value` when it is a valid message id (what our contracts accept), else None."""
    if isinstance(value, str) and _MESSAGE_ID.fullmatch(value):
        return value
    return None


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in error["loc"]) or "<message>"
        parts.append(f"{location}: {error['msg']}")
    return safe_text("; ".join(parts), MAX_DETAIL_CHARS + 2)[1:-1]


async def dead_letter(
    channel: AbstractChannel,
    incoming: AbstractIncomingMessage,
    queue: str,
    reason: str,
    detail: str,
) -> None:
    """Moves a message to `<queue>.dlq` with why, then acks it. Confirm first, ack second:
    a crash in between leaves a duplicate in the DLQ (tolerated), never a loss.

    `queue` is the queue the message was consumed from, so a replay goes back where it was.
    Whatever the message's own headers hold, the copy goes out: if they cannot be sent again,
    it goes with ours only (and says so)."""
    ours: dict[str, Any] = {
        REASON_HEADER: safe_text(reason, 100).strip("'"),
        DETAIL_HEADER: detail[:MAX_DETAIL_CHARS],
        QUEUE_HEADER: queue,
        REJECTED_AT_HEADER: datetime.now(UTC).isoformat(),
    }
    original = dict(incoming.headers or {})
    try:
        headers = {**original, **ours}
        copy = _dead_letter_copy(incoming, headers)
        copy.properties.marshal()  # fails here, not half-way through a publish
    except Exception:  # a header we cannot encode again: send ours only
        copy = _dead_letter_copy(incoming, {**ours, "orch-headers-dropped": True})
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
    await underlay.basic_publish(
        copy.body,
        exchange=topology.DEAD_LETTERS,
        routing_key=queue,
        properties=copy.properties,
        mandatory=True,
        timeout=PUBLISH_TIMEOUT_S,
    )
    await incoming.ack()


def _dead_letter_copy(
    incoming: AbstractIncomingMessage, headers: dict[str, Any]
) -> aio_pika.Message:
    if incoming.user_id:
        # user_id itself is not copied: the broker checks it against *our* connection's user.
        # As a header, an operator still sees who sent it.
        headers = {**headers, "orch-user-id": _short(incoming.user_id)}
    return aio_pika.Message(
        body=incoming.body,
        content_type=_short(incoming.content_type),
        delivery_mode=DeliveryMode.PERSISTENT,
        message_id=_short(incoming.message_id),
        type=_short(incoming.type),
        timestamp=incoming.timestamp,
        headers=headers,
    )


def _short(value: str | None) -> str | None:
    """A string property that fits an AMQP short string (255 bytes), or None."""
    if value is None:
        return None
    try:
        return value if len(value.encode("utf-8")) <= 255 else None
    except UnicodeEncodeError:
        return None


def rejection_id(queue: str, incoming: AbstractIncomingMessage) -> str:
    """The status event id of a rejection: a hash of where it came from and what it was, so a
    redelivered copy gets the same id, and no raw field can make the id invalid."""
    digest = hashlib.sha256()
    digest.update(queue.encode("utf-8", "backslashreplace"))
    digest.update(b"\0")
    digest.update(str(incoming.message_id).encode("utf-8", "backslashreplace"))
    digest.update(b"\0")
    digest.update(incoming.body)
    return f"rejected:{digest.hexdigest()[:32]}"


def rejection_event(
    queue: str,
    incoming: AbstractIncomingMessage,
    reason: str,
    detail: str,
    *,
    entity: str = "message",
    tenant: str | None = None,
    flow: str | None = None,
    **extra: object,
) -> StatusEvent:
    """The `<entity>.rejected` event for a bad message. Cannot fail: every field is either
    ours or checked first. Its tenant is the hint when valid, else the tenant whose queue it
    came from (the broker routed it there), else the broker-validated user when that is a
    tenant id."""
    data: dict[str, object] = {
        "queue": queue,
        "reason": safe_text(reason, 100).strip("'"),
        "detail": detail[:MAX_DETAIL_CHARS],
        **extra,
    }
    message_id = valid_id(incoming.message_id)
    if message_id is not None:
        data["message_id"] = message_id
    elif incoming.message_id is not None:
        data["message_id_invalid"] = safe_text(incoming.message_id)
    candidates = [tenant, topology.queue_tenant(queue), incoming.user_id]
    owner = next((c for c in candidates if isinstance(c, str) and _TENANT.fullmatch(c)), None)
    if owner is None or not (isinstance(flow, str) and _TENANT.fullmatch(flow)):
        flow = None
    event_id = rejection_id(queue, incoming)
    try:
        return StatusEvent.build(
            entity, "rejected", event_id=event_id, tenant=owner, flow=flow, data=data
        )
    except Exception:  # belt and braces: the bare event has only our fields
        return StatusEvent.build(
            "message", "rejected", event_id=event_id, data={"queue": queue, "reason": "invalid"}
        )


async def reject_invalid(
    channel: AbstractChannel, incoming: AbstractIncomingMessage, queue: str, exc: InvalidMessage
) -> None:
    """Bad input: a `message.rejected` status event (subscribers learn of it), then the DLQ
    with the reason (operators can inspect and replay it), then the ack. The consumer goes on."""
    event = rejection_event(
        queue, incoming, exc.reason, exc.detail, tenant=exc.tenant, flow=exc.flow
    )
    await publish(channel, event)
    await dead_letter(channel, incoming, queue, exc.reason, exc.detail)
