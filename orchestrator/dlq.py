"""Dead-letter queues: inspect, replay, purge. What `orchestrator dlq ...` runs.

Every consuming queue `Q` has `Q.dlq` (topology). A dead letter says why it is there: our
reject path adds `orch-reason`, `orch-detail`, `orch-queue` (the queue it came from) and
`orch-rejected-at`; the broker's own dead-lettering (delivery limit, a consumer's reject)
adds `x-death`. `describe` reads either.

* Reading is non-destructive: messages are consumed without acks and handed back when the
  channel closes, in their order.
* A replay publishes each message to its destination (by default the queue it came from,
  through the default exchange) and acks it from the DLQ only after the broker confirmed
  the copy: a replay killed at any moment loses nothing; at most the copies whose confirm
  was outstanding exist twice (same message id, which consumers deduplicate). Each copy
  counts its replays in `orch-replays`; a message replayed `max_replays` times stays where it
  is and is reported.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from orchestrator import topology
from orchestrator.amqp import (
    DETAIL_HEADER,
    PUBLISH_TIMEOUT_S,
    QUEUE_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    REPLAYS_HEADER,
    open_channel,
)

FILTER_KEYS = ("reason", "queue", "tenant", "type", "message_id")
IDLE_S = 0.5  # a queue that delivers nothing for this long has been read to its end
BATCH = 500  # copies in flight before their confirms are awaited
# Messages held at once while reading a DLQ: a filtered run passes over at most this many
# non-matching ones (they stay where they are; run it again after purging them, or filter less).
PREFETCH = 2000


class DlqError(Exception):
    """A bad queue name or filter; the message says which and what would be valid."""


@dataclass(frozen=True)
class Letter:
    """What an operator needs to know of one dead letter."""

    message_id: str | None
    type: str | None
    reason: str
    detail: str
    queue: str | None  # the queue it came from
    tenant: str | None
    replays: int
    dead_since: datetime | None
    body: bytes

    def field(self, name: str) -> str | None:
        value = getattr(self, name)
        return None if value is None else str(value)

    def as_dict(self, body_chars: int = 500) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "type": self.type,
            "reason": self.reason,
            "detail": self.detail,
            "queue": self.queue,
            "tenant": self.tenant,
            "replays": self.replays,
            "dead_since": self.dead_since.isoformat() if self.dead_since else None,
            "body": self.body[:body_chars].decode("utf-8", "replace"),
        }


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _when(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def describe(message: AbstractIncomingMessage, dlq: str, *, read_body: bool = True) -> Letter:
    """The letter's story. `read_body=False` skips parsing the body for its tenant (when
    the origin queue does not name one): replays of big queues do not need it."""
    headers = dict(message.headers or {})
    deaths = headers.get("x-death")
    death = deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict) else {}
    source = _text(headers.get(QUEUE_HEADER)) or _text(death.get("queue"))
    if source is None and dlq.endswith(topology.DLQ_SUFFIX):
        source = dlq.removesuffix(topology.DLQ_SUFFIX)
    reason = _text(headers.get(REASON_HEADER)) or _text(death.get("reason")) or "unknown"
    replays = headers.get(REPLAYS_HEADER)
    tenant = topology.queue_tenant(source or "") or (
        _tenant_of(message.body) if read_body else None
    )
    return Letter(
        message_id=_text(message.message_id),
        type=_text(message.type),
        reason=reason,
        detail=_text(headers.get(DETAIL_HEADER)) or "",
        queue=source,
        tenant=tenant,
        replays=replays if isinstance(replays, int) else 0,
        dead_since=_when(headers.get(REJECTED_AT_HEADER)) or _when(death.get("time")),
        body=message.body,
    )


def _tenant_of(body: bytes) -> str | None:
    """The `tenant` field of a JSON body, if there is one (dead letters may be anything)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    tenant = value.get("tenant") if isinstance(value, dict) else None
    return tenant if isinstance(tenant, str) else None


def parse_filters(items: Iterable[str]) -> dict[str, str]:
    """`key=value` pairs over FILTER_KEYS; raises DlqError naming what is wrong."""
    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DlqError(f"bad filter {item!r}: expected key=value")
        if key not in FILTER_KEYS:
            raise DlqError(f"bad filter key {key!r}: one of {', '.join(FILTER_KEYS)}")
        found[key] = value
    return found


def matches(letter: Letter, filters: dict[str, str]) -> bool:
    return all(letter.field(key) == value for key, value in filters.items())


async def ensure_dlq(connection: AbstractRobustConnection, name: str) -> int:
    """The queue's message count; DlqError if it is not a DLQ or does not exist."""
    if not name.endswith(topology.DLQ_SUFFIX):
        raise DlqError(f"{name!r} is not a dead-letter queue (their names end in .dlq)")
    channel = await connection.channel()
    try:
        declared = await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise DlqError(f"no queue {name!r}") from None
    finally:
        if not channel.is_closed:
            await channel.close()
    return declared.declaration_result.message_count or 0


async def read(
    connection: AbstractRobustConnection,
    name: str,
    on_message: Callable[[AbstractIncomingMessage], Awaitable[bool]],
    *,
    prefetch: int = 1000,
    finish: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hands each message of the queue to `on_message` (in order, each once) until it
    returns False or the queue has nothing more for IDLE_S; then runs `finish` (while the
    messages can still be acked). Messages left unsettled go back to the queue, in order,
    when this returns."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.get_queue(name)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    tag = await queue.consume(inbox.put)
    try:
        while True:
            try:
                message = await asyncio.wait_for(inbox.get(), IDLE_S)
            except TimeoutError:
                return
            if not await on_message(message):
                return
    finally:
        if finish is not None and not channel.is_closed:
            await finish()
        if not channel.is_closed:
            await queue.cancel(tag)
            await channel.close()  # everything unsettled goes back


async def peek(
    connection: AbstractRobustConnection, name: str, limit: int, filters: dict[str, str]
) -> list[Letter]:
    """Up to `limit` matching letters, leaving the queue as it was."""
    found: list[Letter] = []

    async def keep(message: AbstractIncomingMessage) -> bool:
        letter = describe(message, name)
        if matches(letter, filters):
            found.append(letter)
        return len(found) < limit

    await read(connection, name, keep)
    return found


@dataclass
class Summary:
    moved: int = 0
    skipped: int = 0  # not matching the filter, or over the limit
    over_limit: list[str] = field(default_factory=list)  # message ids replayed too often
    failed: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "moved": self.moved,
            "skipped": self.skipped,
            "over_limit": len(self.over_limit),
            "failed": self.failed,
            "reasons": dict(self.reasons),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Target:
    """Where replayed letters go: ("", queue) is a queue through the default exchange."""

    exchange: str
    routing_key: str | None  # None: the queue each letter came from

    @classmethod
    def parse(cls, spec: str) -> Target:
        """'original', 'queue:NAME' (a queue, through the default exchange), or
        'EXCHANGE:ROUTING_KEY'."""
        if spec == "original":
            return cls("", None)
        exchange, sep, key = spec.partition(":")
        if not sep or not exchange or (exchange == "queue" and not key):
            raise DlqError(f"bad --to {spec!r}: 'original', 'queue:NAME' or 'EXCHANGE:ROUTING_KEY'")
        return cls("", key) if exchange == "queue" else cls(exchange, key)


def _copy(message: AbstractIncomingMessage, replays: int, user_id: str | None) -> aio_pika.Message:
    headers = {
        k: v for k, v in (message.headers or {}).items() if k not in ("x-death", "x-delivery-count")
    }
    headers[REPLAYS_HEADER] = replays
    return aio_pika.Message(
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message.message_id,
        correlation_id=message.correlation_id,
        type=message.type,
        timestamp=message.timestamp,
        headers=headers,
        user_id=user_id,
    )


@dataclass
class _Mover:
    name: str
    target: Target | None
    filters: dict[str, str]
    limit: int | None
    rate_per_s: float | None
    max_replays: int
    dry_run: bool
    user_id: str | None
    progress: Callable[[int], None] | None
    underlay: aiormq.Channel
    summary: Summary = field(default_factory=Summary)
    pending: list[tuple[AbstractIncomingMessage, asyncio.Future[Any]]] = field(default_factory=list)
    handled: int = 0
    held: bool = False  # letters left unacked before the pending ones (filtered, failed)
    began: float = field(default_factory=time.monotonic)

    async def settle(self) -> None:
        """Acks each letter whose copy the broker confirmed; a refused one stays. When every
        letter delivered so far was copied and confirmed, one ack (`multiple`) settles them."""
        if not self.pending:
            return
        outcomes = await asyncio.gather(*(c for _, c in self.pending), return_exceptions=True)
        confirmed = [
            m
            for (m, _), o in zip(self.pending, outcomes, strict=True)
            if not isinstance(o, BaseException)
        ]
        self.summary.failed += len(self.pending) - len(confirmed)  # stay in the DLQ
        if len(confirmed) == len(self.pending) and not self.held:
            await self.pending[-1][0].ack(multiple=True)
        else:
            for message in confirmed:
                await message.ack()
        self.held = self.held or len(confirmed) != len(self.pending)
        self.summary.moved += len(confirmed)
        self.pending.clear()

    async def on_message(self, message: AbstractIncomingMessage) -> bool:
        letter = describe(message, self.name, read_body="tenant" in self.filters)
        if not matches(letter, self.filters):
            self.summary.skipped += 1
            self.held = True
            return True
        if self.target is not None and letter.replays >= self.max_replays:
            self.summary.skipped += 1
            self.summary.over_limit.append(letter.message_id or "?")
            self.held = True
            return True
        self.handled += 1
        self.summary.reasons[letter.reason] += 1
        if self.dry_run:
            self.summary.moved += 1
        elif self.target is None:  # purge
            await message.ack()
            self.summary.moved += 1
        else:
            await self._copy_out(message, letter, self.target)
        if self.progress is not None:
            self.progress(self.handled)
        if self.rate_per_s:
            wait = self.began + self.handled / self.rate_per_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        return self.limit is None or self.handled < self.limit

    async def _copy_out(
        self, message: AbstractIncomingMessage, letter: Letter, target: Target
    ) -> None:
        key = target.routing_key if target.routing_key is not None else letter.queue
        if key is None:
            self.summary.failed += 1
            return
        confirm = self.underlay.basic_publish(
            message.body,
            exchange=target.exchange,
            routing_key=key,
            properties=_copy(message, letter.replays + 1, self.user_id).properties,
            mandatory=True,
            timeout=PUBLISH_TIMEOUT_S,
        )
        self.pending.append((message, asyncio.ensure_future(confirm)))
        if len(self.pending) >= BATCH or self.rate_per_s:
            await self.settle()


async def move(
    connection: AbstractRobustConnection,
    name: str,
    *,
    target: Target | None,
    filters: dict[str, str],
    limit: int | None = None,
    rate_per_s: float | None = None,
    max_replays: int = 3,
    dry_run: bool = False,
    user_id: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Replays (target given) or purges (target None) the matching letters; see the module
    docstring for the guarantees. `user_id` signs the copies (the replaying account), so a
    replayed flow start is an operator's request."""
    publisher = await open_channel(connection)  # an unroutable copy is a failure, not a move
    try:
        mover = _Mover(
            name,
            target,
            filters,
            limit,
            rate_per_s,
            max_replays,
            dry_run,
            user_id,
            progress,
            cast(aiormq.Channel, await publisher.get_underlay_channel()),
        )
        await read(connection, name, mover.on_message, prefetch=PREFETCH, finish=mover.settle)
    finally:
        if not publisher.is_closed:
            await publisher.close()
    mover.summary.seconds = time.monotonic() - mover.began
    return mover.summary
