"""Deliveries the fair order may not see yet, checked first, in order of arrival.

A redelivered step may be a copy a leader already released (a takeover redelivers what the
old leader had not acked): its dispatched marker says so, and it is acked and dropped. The
first step of a flow waits for the flow's `max_parallel` to be read. One Redis round trip
checks every delivery that arrived meanwhile; everything arriving while a check is under way
waits behind it, so the fair order sees each tenant's steps in the order they came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as aioredis
from aio_pika.abc import AbstractIncomingMessage

from orchestrator.dispatcher.ledger import Ledger, Queued
from orchestrator.store import Keys
from orchestrator.store.flows import FlowRegistry
from schemas import StepTask


class Screening:
    """One per leadership: `stop` when it ends (what it held went back with the channel)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        ledger: Ledger,
        pushed: Callable[[], None],
        failed: Callable[[BaseException], None],
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.flows = FlowRegistry(redis, keys)
        self.ledger = ledger
        self.pushed = pushed  # steps went into the ledger: time to dispatch
        self.failed = failed  # a check failed (Redis trouble)
        self._waiting: list[Queued] = []
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def admit(self, task: StepTask, incoming: AbstractIncomingMessage) -> bool:
        """Into the ledger at once (True), or held here for a check."""
        if not (self._waiting or incoming.redelivered) and self.ledger.knows_flow(
            task.tenant, task.flow_id
        ):
            self.ledger.push(task, incoming)
            return True
        self._waiting.append(Queued(task, incoming))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._check())
            self._task.add_done_callback(self._checked)
        return False

    def stop(self) -> None:
        self._stopped = True
        self._waiting.clear()
        if self._task is not None:
            self._task.cancel()

    async def _check(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            redelivered = [q for q in batch if q.delivery.redelivered]
            markers = (
                await self.redis.mget([self.keys.dispatched(q.task.task_id) for q in redelivered])
                if redelivered
                else []
            )
            released = {
                q.task.task_id for q, mark in zip(redelivered, markers, strict=True) if mark
            }
            for queued in batch:
                task = queued.task
                if not self.ledger.knows_flow(task.tenant, task.flow_id):
                    definition = await self.flows.get(task.tenant, task.flow_id)
                    limit = definition.max_parallel if definition else None
                    self.ledger.learn_flow(task.tenant, task.flow_id, limit)
            if self._stopped:
                return  # these went back to their queues with the leader's channel
            for queued in batch:
                if queued.task.task_id in released:
                    await queued.delivery.ack()
                else:
                    self.ledger.push(queued.task, queued.delivery)
            self.pushed()

    def _checked(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self.failed(error)
