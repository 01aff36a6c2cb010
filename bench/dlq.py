"""DLQ replay benchmark: `dlq.move` (confirm before ack) against the raw broker ceiling.

    python -m bench.dlq [--messages 20000]

Quorum queues like the real DLQs. Measured in the same run, each on a freshly filled queue:
* raw publish: the messages published with confirms, 500 in flight (how fast they can arrive);
* raw consume: consumed and acked, nothing else (how fast they can leave);
* replay: `orchestrator.dlq.move` to another queue, each letter acked only once its copy's
  confirm came back (what `orchestrator dlq replay` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from bench.common import isolated_settings, print_table
from orchestrator import dlq
from orchestrator.amqp import connect

WINDOW = 500


def _queue_args() -> dict[str, object]:
    return {"x-queue-type": "quorum"}


async def _fill(channel: AbstractChannel, queue: str, count: int) -> float:
    began = time.monotonic()
    for start in range(0, count, WINDOW):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(b'{"n": %d}' % n, message_id=f"m-{n}"), routing_key=queue
                )
                for n in range(start, min(count, start + WINDOW))
            )
        )
    return time.monotonic() - began


async def _consume(connection: AbstractRobustConnection, queue: str, count: int) -> float:
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=2000)
    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    source = await channel.get_queue(queue)
    began = time.monotonic()
    await source.consume(on_message)
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.monotonic() - began
    await channel.close()
    return elapsed


async def main(count: int) -> None:
    with isolated_settings("dlq") as settings:
        connection = await connect(settings, "bench-dlq")
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            for name in ("raw.dlq", "replay.dlq", "replay.dest"):
                await channel.declare_queue(name, durable=True, arguments=_queue_args())
            publish_s = await _fill(channel, "raw.dlq", count)
            consume_s = await _consume(connection, "raw.dlq", count)
            await _fill(channel, "replay.dlq", count)
            summary = await dlq.move(
                connection,
                "replay.dlq",
                target=dlq.Target("", "replay.dest"),
                filters={},
            )
            assert summary.moved == count, summary
    replay_rate = count / summary.seconds
    rows = [
        ["raw publish (confirmed, 500 in flight)", f"{count / publish_s:,.0f}", "-"],
        ["raw consume + ack", f"{count / consume_s:,.0f}", "-"],
        [
            "dlq replay (confirm before ack)",
            f"{replay_rate:,.0f}",
            f"{replay_rate / min(count / publish_s, count / consume_s):.2f}",
        ],
    ]
    print_table(
        f"DLQ replay, {count:,} messages, quorum queues", ["path", "msg/s", "x ceiling"], rows
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().messages))
