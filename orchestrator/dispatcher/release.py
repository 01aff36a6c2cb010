"""Releasing what the ledger picked: published to the work queues together (their confirms
overlap), their dispatched markers written in one Redis round trip, and only then the
tenant-queue deliveries acked.

A released step's tenant-queue message is acked right after its marker is written, so a copy
can only come back to a new leader if the old one died in between: it comes back as soon as
the broker notices the dead connection (at worst a few heartbeat intervals), and the marker
drops it.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel

from orchestrator import topology, tracing
from orchestrator.amqp import Outgoing, send
from orchestrator.clock import Clock
from orchestrator.dispatcher.ledger import RELEASED_MEMORY_S, Ledger, Pick
from orchestrator.dispatcher.metrics import DISPATCHED, DWELL, EXPRESS
from orchestrator.dispatcher.stats import RecentService
from orchestrator.store import Keys
from orchestrator.telemetry import get_logger

log = get_logger(__name__)

DISPATCHED_MEMORY_S = RELEASED_MEMORY_S  # the markers' life, as long as the ledger's memory


class ReleaseNotConfirmed(ConnectionError):
    """The broker did not confirm a work-queue publish: RabbitMQ trouble, not a bug."""


def outgoing(pick: Pick) -> Outgoing:
    """The task as it came (its body is not rendered again), to its work queue."""
    task, incoming = pick.queued.task, pick.queued.delivery
    exchange, key = topology.work_route(task, express=pick.express)
    parent = (incoming.headers or {}).get(tracing.HEADER) if tracing.enabled() else None
    with tracing.span(
        "dispatcher.release",
        parent=parent if isinstance(parent, str) else None,
        attributes={
            "orchestrator.execution": task.execution_id,
            "orchestrator.tenant": task.tenant,
        },
    ):
        return Outgoing(
            exchange,
            key,
            task.message_id(),
            task.message_type,
            task.content_type,
            True,
            incoming.body,
            tracing.current_traceparent(),
        )


class Releaser:
    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        ledger: Ledger,
        recent: RecentService,
        clock: Clock,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.ledger = ledger
        self.recent = recent
        self.clock = clock

    async def release(self, channel: AbstractChannel, picks: list[Pick]) -> None:
        """Releases `picks`; raises ReleaseNotConfirmed if any publish was not confirmed (its
        delivery stays unacked and goes back to its queue with this process's channel)."""
        ledger, redis = self.ledger, self.redis
        outcomes = await asyncio.gather(
            *(send(channel, outgoing(pick)) for pick in picks), return_exceptions=True
        )
        released = [p for p, outcome in zip(picks, outcomes, strict=True) if outcome is None]
        for pick, outcome in zip(picks, outcomes, strict=True):
            if outcome is not None:
                task_id = pick.queued.task.task_id
                ledger.forget(task_id)
                log.warning("dispatcher.publish_failed", task_id=task_id, error=str(outcome))
        marks = [self.keys.dispatched(pick.queued.task.task_id) for pick in released]
        if len(marks) == 1:  # the common case below saturation: no pipeline machinery
            await redis.set(marks[0], "1", ex=DISPATCHED_MEMORY_S)
        elif marks:
            async with redis.pipeline(transaction=False) as pipe:
                for mark in marks:
                    pipe.set(mark, "1", ex=DISPATCHED_MEMORY_S)
                await pipe.execute()
        ledger.mark_released(pick.queued.task.task_id for pick in released)
        stamp, now = self.clock.monotonic(), self.clock.now()
        for pick in released:
            task, incoming = pick.queued.task, pick.queued.delivery
            # Without waiting for the frame to be written: the confirm and marker came first, so
            # an ack lost with this process only brings back a copy that gets dropped.
            assert incoming.delivery_tag is not None  # a delivery, not a basic.get
            await incoming.channel.basic_ack(incoming.delivery_tag, wait=False)
            DISPATCHED.labels(task.tenant).inc()
            if pick.express:
                EXPRESS.labels(task.tenant).inc()
            dwell_s = max(0.0, (now - task.enqueued_at).total_seconds())
            DWELL.labels(task.tenant).observe(dwell_s)
            self.recent.dispatched(task.tenant, dwell_s, stamp)
        if len(released) < len(picks):
            raise ReleaseNotConfirmed("work-queue publish not confirmed")
