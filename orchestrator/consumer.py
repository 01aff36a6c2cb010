"""How every service consumes a queue: decode strictly, handle, then ack; reject what can
never be handled; ride out broker outages without spending a message's delivery budget.

A service supplies a decoder (bytes -> contract) and a handler; `Consumer` does the rest, the
same way for every queue:

- **Bad input** (undecodable properties, wrong content type or message type, anything the
  published JSON Schema refuses, or an `InvalidMessage` the handler raises): a
  `message.rejected` status event, then the copy in `<queue>.dlq` with `orch-reason` and
  `orch-detail`, then the ack. That path reads only checked fields, so no bytes or properties
  can make it fail. On a queue consumed without acks (soft state) there is no copy to keep:
  the drop is counted (`orchestrator_messages_dropped_total`) and announced the same way.
- **A broker outage** inside the handler (Redis, RabbitMQ, a network error): the message is
  kept, not requeued — a requeue would count towards the queue's delivery limit, and a 60 s
  outage would dead-letter valid messages — and the handler is retried with capped
  exponential backoff until it succeeds, the process stops (the unacked message goes back to
  the queue with the channel) or twice `retry_limit_s` (the outage limit) has passed: a real
  outage would have ended the process by then (orchestrator.outage), so the message itself
  is the problem and is dead-lettered with `handler_error`.
- **A bug** (any other exception): retried a few times, then dead-lettered with reason
  `handler_error`, so one message that trips a bug never blocks a queue or loops forever.
- The handler's normal return acks, unless it returns `HOLD` (it keeps the message and
  settles it itself: the dispatcher's head buffers).

Log lines inside a delivery carry `queue` and `message_id` (bound with contextvars).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from prometheus_client import Counter

from orchestrator import tracing
from orchestrator.amqp import (
    InvalidMessage,
    dead_letter,
    publish,
    rejection_event,
    safe_text,
    valid_id,
)
from orchestrator.outage import OUTAGES, dependency_of, sleep_unless
from orchestrator.telemetry import bound_context, get_logger

log = get_logger(__name__)

M = TypeVar("M")

# A handler that raised something other than a broker failure this often for one message has
# a bug that this message trips: the message goes to the DLQ with the error, the queue goes on.
BUG_ATTEMPTS = 3
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0  # capped: no busy loop, and a broker that is back is noticed within 5 s
GIVE_UP_FACTOR = 2

REJECTED = Counter(
    "orchestrator_messages_rejected_total",
    "Messages dead-lettered as invalid, by queue and reason",
    ["queue", "reason"],
)
DROPPED = Counter(
    "orchestrator_messages_dropped_total",
    "Invalid messages of queues consumed without acks (soft state), by queue and reason",
    ["queue", "reason"],
)
RETRIED = Counter(
    "orchestrator_handler_retries_total",
    "Handler runs retried in place, by queue and cause (a dependency, or bug)",
    ["queue", "cause"],
)


class Settle(enum.Enum):
    ACK = "ack"
    HOLD = "hold"  # the handler keeps the message and acks (or gives it back) itself


Decoder = Callable[[AbstractIncomingMessage], M]
Handler = Callable[[M, AbstractIncomingMessage], Awaitable[Settle | None]]


class Consumer(Generic[M]):
    """One queue's consumer. `await consumer.start(channel)`, later `await consumer.cancel()`."""

    def __init__(
        self,
        queue: str,
        decoder: Decoder[M],
        handler: Handler[M],
        *,
        stop: asyncio.Event | None = None,
        retry_limit_s: float = 120.0,
        no_ack: bool = False,
        entity: str = "message",
    ) -> None:
        self.queue = queue
        self.decoder = decoder
        self.handler = handler
        self.stop = stop or asyncio.Event()
        self.retry_limit_s = retry_limit_s
        self.no_ack = no_ack
        self.entity = entity  # rejections are announced as `<entity>.rejected`
        self.channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, channel: AbstractChannel) -> None:
        self.channel = channel
        # A passive declare, not `ensure=False`: only declared queues are registered with a
        # robust channel, which re-declares them and restarts their consumers after the
        # connection comes back (a RabbitMQ restart). Without it a consumer stops for good.
        self._queue = await channel.get_queue(self.queue)
        self._tag = await self._queue.consume(self.deliver, no_ack=self.no_ack)

    async def cancel(self) -> None:
        if self._queue is not None and self._tag is not None:
            try:
                await self._queue.cancel(self._tag)
            except Exception as exc:  # a closed channel has no consumer left
                log.debug("consumer.cancel_failed", queue=self.queue, error=repr(exc))
        self._tag = None

    # ------------------------------------------------------------------ one delivery
    async def deliver(self, incoming: AbstractIncomingMessage) -> None:
        """The consume callback: aio-pika runs each delivery on a task of its own."""
        message_id = valid_id(incoming.message_id) or safe_text(incoming.message_id, 80)
        with (
            bound_context(queue=self.queue, message_id=message_id),
            tracing.consume_span(self.queue, incoming.headers),
        ):
            try:
                message = self.decoder(incoming)
            except InvalidMessage as exc:
                await self.reject(incoming, exc)
                return
            except Exception as exc:  # whatever the bytes do to a decoder
                await self.reject(incoming, InvalidMessage("undecodable", safe_text(exc, 1000)))
                return
            await self._handle(message, incoming)

    async def _handle(self, message: M, incoming: AbstractIncomingMessage) -> None:
        started = time.monotonic()
        bugs = 0
        delay = BACKOFF_MIN_S
        failing: set[str] = set()
        while True:
            try:
                settle = await self.handler(message, incoming)
                break
            except InvalidMessage as exc:
                await self.reject(incoming, exc)
                return
            except asyncio.CancelledError:
                await self._give_back(incoming)
                raise
            except Exception as exc:  # sorted below: outage or bug
                dependency = dependency_of(exc)
                if dependency is None:
                    bugs += 1
                    log.exception("consumer.handler_failed", attempt=bugs)
                else:
                    failing.add(dependency)
                    OUTAGES.failed(dependency, exc)
                RETRIED.labels(self.queue, dependency or "bug").inc()
                # A broker failure is retried until the process stops; a real outage ends
                # the process at the outage limit (the message goes back unacked). Failing
                # twice as long while the process lives means this message is the problem
                # (say, a publish no queue takes): it must not stay unacked for ever.
                stuck = time.monotonic() - started > GIVE_UP_FACTOR * self.retry_limit_s
                if bugs >= BUG_ATTEMPTS or stuck:
                    await self.reject(
                        incoming, InvalidMessage("handler_error", safe_text(exc, 1000))
                    )
                    return
                if await sleep_unless(self.stop, delay):
                    return  # stopping: unacked, it goes back to the queue with the channel
                if _channel_closed(incoming):
                    return  # the broker has given it back already: it is redelivered
                delay = min(delay * 2, BACKOFF_MAX_S)
        for dependency in failing:
            OUTAGES.recovered(dependency)  # the handler got through: it answers again
        if settle is not Settle.HOLD and not self.no_ack:
            await ack(incoming)

    async def _give_back(self, incoming: AbstractIncomingMessage) -> None:
        if self.no_ack:
            return
        try:
            await incoming.nack(requeue=True)
        except Exception as exc:  # gone with its channel: back in the queue anyway
            log.debug("consumer.nack_failed", error=repr(exc))

    # ------------------------------------------------------------------ the reject path
    async def reject(self, incoming: AbstractIncomingMessage, exc: InvalidMessage) -> None:
        """Status event, DLQ copy, ack — retried while the broker is away, never given up on
        for anything in the message: every field it reads is checked or ours."""
        reason, detail = exc.reason, exc.detail
        _say("info", "message.rejected", reason=reason, detail=detail[:200])
        delay = BACKOFF_MIN_S
        announced = False
        while True:
            try:
                if not announced:
                    assert self.channel is not None
                    extra = {"dropped": True} if self.no_ack else {}
                    event = rejection_event(
                        self.queue,
                        incoming,
                        reason,
                        detail,
                        entity=self.entity,
                        tenant=exc.tenant,
                        flow=exc.flow,
                        **extra,
                    )
                    await publish(self.channel, event)
                    announced = True
                if self.no_ack:
                    DROPPED.labels(self.queue, reason).inc()
                else:
                    assert self.channel is not None
                    await dead_letter(self.channel, incoming, self.queue, reason, detail)
                    REJECTED.labels(self.queue, reason).inc()
            except Exception as error:  # a broker failure: wait and try again
                dependency = dependency_of(error) or "rabbitmq"
                with contextlib.suppress(Exception):
                    OUTAGES.failed(dependency, error)
                _say("warning", "consumer.reject_failed", error=repr(error))
                if self.channel is None or self.channel.is_closed or self.stop.is_set():
                    return  # unacked: it comes back, and is rejected then
                if await sleep_unless(self.stop, delay):
                    return
                delay = min(delay * 2, BACKOFF_MAX_S)
            else:
                return


def _say(level: str, event: str, **values: object) -> None:
    """Logs from the reject path: a log line that cannot be written (stderr closed, a full
    pipe's broken end) must not stop a message being rejected."""
    with contextlib.suppress(Exception):
        getattr(log, level)(event, **values)


def _channel_closed(incoming: AbstractIncomingMessage) -> bool:
    channel = incoming.channel
    return bool(getattr(channel, "is_closed", False))


async def ack(incoming: AbstractIncomingMessage) -> None:
    """Acks; a channel that closed meanwhile has given the message back (it is redelivered
    and, its effects being idempotent, handled again harmlessly).

    Without waiting for the frame to be written (`wait=False`): the wait makes aiormq drain
    the socket for this one frame, a system call per ack, where the coalescing writer would
    send it with the publishes and acks around it. The broker answers no ack, so there is
    nothing more to wait for either way: an ack lost with this process brings a copy back."""
    try:
        if incoming.delivery_tag is None:  # a basic.get without a tag: aio-pika's own path
            await incoming.ack()
        else:
            await incoming.channel.basic_ack(incoming.delivery_tag, wait=False)
    except Exception as exc:  # see above
        log.warning("consumer.ack_failed", error=repr(exc))
