"""Bad input benchmark: what malformed messages on every queue cost valid flow starts.

    python -m bench.bad_input [--rate 20] [--seconds 15] [--bad-factor 10]

The whole system runs in this process (scheduler, engine, dispatcher and a worker with 4
slots on one connection, like the integration tests' system), against the brokers of
`scripts/infra env`, in a vhost, Redis prefix and Kafka usage topic of its own, all removed
afterwards.
* baseline: valid flow starts (one demo.echo step) at `rate` per second for `seconds`;
  latency from the flow-start publish to the `execution.succeeded` status event, p50/p99;
* with bad input: the same, while another process (a raw AMQP client, so it can send what
  aio-pika would not) publishes bad messages at `bad-factor` x `rate` across every consuming
  queue: garbage, malformed JSON, schema violations, wrong content or message types,
  properties the client library cannot decode, NaN, 10 000 levels of nesting, and a few
  bodies over 1 MiB. Each must be rejected (dead-lettered, or dropped on
  dispatcher.completions); the table says whether all were.
The ratio row compares the two phases of the same run; absolute figures depend on the host.
"CPU s/s" is this process's CPU per second of the phase (the services and the valid traffic;
the bad-input publisher is a process of its own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import struct
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pamqp import commands, frame
from prometheus_client import Counter

from bench.common import isolated_settings
from orchestrator import store, topology
from orchestrator.amqp import connect, open_channel, publish
from orchestrator.config import Settings
from orchestrator.consumer import DROPPED, REJECTED
from orchestrator.dispatcher.service import Dispatcher
from orchestrator.engine.service import Engine
from orchestrator.kafka import ensure_topics
from orchestrator.scheduler.service import Scheduler
from orchestrator.store.flows import FlowRegistry
from orchestrator.telemetry import configure_logging
from schemas import (
    ExecutionRequested,
    FlowDefinition,
    FlowStartRequested,
    Message,
    PenaltyCommand,
    StepResult,
    StepTask,
)
from workers import Worker
from workers import builtin as _builtin  # noqa: F401 - registers demo.* steps

TENANT = "bench"
FLOW = {
    "tenant": TENANT,
    "id": "echo",
    "overlap": "allow",
    "steps": [{"id": "a", "type": "demo.echo"}],
}
WARMUP = 20
SETTLE_S = 60.0  # most a phase waits for its last executions / rejections


# ------------------------------------------------------------------------------ isolation
@contextlib.asynccontextmanager
async def isolated() -> AsyncIterator[Settings]:
    """A vhost, a Redis prefix and a usage topic of this run's own, created up front; all
    removed afterwards (bench.common.isolated_settings)."""
    with isolated_settings("bad-input") as settings:
        await ensure_topics(settings)
        yield settings


# ------------------------------------------------------------------------ the system
@dataclass
class System:
    connection: AbstractRobustConnection
    tasks: list[asyncio.Task[None]]
    reconnects: list[Any] = field(default_factory=list)


@contextlib.asynccontextmanager
async def running_system(settings: Settings, concurrency: int = 4) -> AsyncIterator[System]:
    """Scheduler, engine, dispatcher and a worker in this process, on one connection."""
    redis = store.connect(settings)
    connection = await connect(settings, f"bench-bad-input-{uuid.uuid4().hex[:6]}")
    stop = asyncio.Event()
    try:
        await FlowRegistry(redis, store.Keys(settings.redis_prefix)).apply(
            [FlowDefinition.model_validate(FLOW)], datetime.now(UTC)
        )
        async with Worker(settings, connection, redis, concurrency=concurrency) as worker:
            tasks = [
                asyncio.create_task(Scheduler(settings, redis, connection).run(stop)),
                asyncio.create_task(Engine(settings, redis, connection).run(stop)),
                asyncio.create_task(Dispatcher(settings, redis, connection).run(stop)),
                asyncio.create_task(worker.run(stop)),
            ]
            system = System(connection, tasks)
            connection.reconnect_callbacks.add(lambda *args: system.reconnects.append(args))
            try:
                yield system
            finally:
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        if not connection.is_closed:
            await connection.close()
        await redis.aclose()


# ------------------------------------------------------------------------ bad messages
FLAGS = {
    "content_type": 0x8000,
    "content_encoding": 0x4000,
    "headers": 0x2000,
    "delivery_mode": 0x1000,
    "priority": 0x0800,
    "correlation_id": 0x0400,
    "reply_to": 0x0200,
    "expiration": 0x0100,
    "message_id": 0x0080,
    "timestamp": 0x0040,
    "type": 0x0020,
    "user_id": 0x0010,
    "app_id": 0x0008,
    "cluster_id": 0x0004,
}
FRAME_END = b"\xce"


def shortstr(value: bytes) -> bytes:
    return struct.pack("B", len(value)) + value


def table(entries: list[tuple[bytes, bytes]]) -> bytes:
    content = b"".join(shortstr(key) + value for key, value in entries)
    return struct.pack(">I", len(content)) + content


def encode_properties(values: dict[str, bytes]) -> bytes:
    """Basic properties from their wire encodings (flags in the protocol's order)."""
    flags = 0
    parts = []
    for name, bit in FLAGS.items():
        if name in values:
            flags |= bit
            parts.append(values[name])
    return struct.pack(">H", flags) + b"".join(parts)


def _now() -> datetime:
    return datetime.now(UTC)


def _templates() -> dict[str, tuple[str, bytes, Message]]:
    """queue -> (exchange, routing key, a valid message to break)."""
    now = _now()
    task = StepTask(
        task_id="bad-1:a:1",
        execution_id="bad-1",
        tenant=TENANT,
        flow_id="echo",
        step_id="a",
        step_type="demo.echo",
        attempt=1,
        timeout_s=30,
        deadline=now + timedelta(seconds=30),
    )
    return {
        topology.ingress_queue_name(TENANT): (
            topology.COMMANDS,
            topology.flow_start_key(TENANT).encode(),
            FlowStartRequested(tenant=TENANT, flow_id="echo", idempotency_key="bad"),
        ),
        topology.EXECUTIONS_QUEUE: (
            topology.COMMANDS,
            b"execution.requested",
            ExecutionRequested(
                execution_id="bad-1",
                fire_id="bench/echo#bad-1",
                tenant=TENANT,
                flow_id="echo",
                trigger="manual",
            ),
        ),
        topology.RESULTS_QUEUE: (  # also routed to dispatcher.completions
            topology.COMMANDS,
            b"step.result",
            StepResult(
                task_id="bad-1:a:1",
                execution_id="bad-1",
                tenant=TENANT,
                flow_id="echo",
                step_id="a",
                attempt=1,
                outcome="succeeded",
                worker_id="w",
                started_at=now,
            ),
        ),
        topology.CONTROL_QUEUE: (
            topology.CONTROL,
            b"penalty.bench",
            PenaltyCommand(  # long expired, should one ever get through
                command_id="bad-1",
                tenant=TENANT,
                rule="r",
                issued_at=now - timedelta(days=2),
                expires_at=now - timedelta(days=1),
            ),
        ),
        topology.tenant_queue_name(TENANT): (topology.STEPS, TENANT.encode(), task),
        topology.work_queue_name("default"): (topology.WORK, b"default", task),
        topology.express_queue_name("default"): (topology.WORK, b"default.express", task),
    }


BODY_KINDS = ["garbage", "truncated", "nan", "deep", *(["unknown", "wrong type", "slug"] * 2)]


def _bad_body(rng: random.Random, message: Message) -> bytes:
    doc = json.loads(message.to_bytes())
    kind = rng.choice(BODY_KINDS)
    if kind == "garbage":
        return b"\xff" + rng.randbytes(rng.randrange(64))
    if kind == "truncated":
        text = message.to_bytes()
        return text[: rng.randrange(1, len(text))]
    if kind == "unknown":
        doc[f"extra{rng.randrange(100)}"] = rng.randrange(100)
    elif kind == "wrong type":
        doc[rng.choice(sorted(doc))] = rng.choice([[1], [], [None]])  # no field takes a list
    elif kind == "slug":
        doc["tenant"] = rng.choice(["BENCH", "bench\u200b", "be.nch", "\u202ebench", ""])
    elif kind == "nan":
        return (
            json.dumps({**doc, "schema_version": "__nan__"}).encode().replace(b'"__nan__"', b"NaN")
        )
    else:  # 10 000 levels, in a field that takes a string
        return (
            json.dumps({**doc, "tenant": "__deep__"})
            .encode()
            .replace(b'"__deep__"', b"[" * 10_000 + b"]" * 10_000)
        )
    return json.dumps(doc).encode()


def bad_message(
    rng: random.Random, templates: dict[str, Any], n: int
) -> tuple[str, bytes, bytes, bytes]:
    """(exchange, routing key, body, properties) of one bad message, and it is bad by
    construction: a broken body, or a property the consumer must refuse."""
    queue = rng.choice(sorted(templates))
    exchange, key, message = templates[queue]
    props: dict[str, bytes] = {
        "content_type": shortstr(b"application/json"),
        "delivery_mode": b"\x02",
        "message_id": shortstr(f"bad-{n}".encode()),
    }
    body = message.to_bytes()
    kind = rng.random()
    if kind < 0.005:  # over the 1 MiB any message may have
        body = b"{" + b" " * (1024 * 1024) + b"}"
    elif kind < 0.6:
        body = _bad_body(rng, message)
    elif kind < 0.68:
        props["content_type"] = shortstr(rng.choice([b"text/plain", b"application/xml"]))
    elif kind < 0.76:
        props["type"] = shortstr(b"no.such.type")
    elif kind < 0.84:
        props[rng.choice(["message_id", "type", "app_id"])] = shortstr(
            b"\xff\xfe-" + str(n).encode()
        )
    elif kind < 0.92:
        props["timestamp"] = struct.pack(">Q", 2**63 + n)
    else:
        props["headers"] = table([(b"when", b"T" + struct.pack(">Q", 2**64 - 1))])
    return exchange, key, body, encode_properties(props)


class RawPublisher:
    """A minimal AMQP 0-9-1 publisher writing content headers byte by byte (so it can send
    properties no client library would), with confirms, pipelined up to `window`."""

    def __init__(self, url: str, window: int = 256) -> None:
        self.url = urllib.parse.urlsplit(url)
        self.window = window
        self.frame_max = 131072
        self.sent = 0
        self.pending: set[int] = set()
        self.nacked = 0
        self._room = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    async def _frame(self) -> object:
        head = await self.reader.readexactly(7)
        size = struct.unpack(">I", head[3:7])[0]
        rest = await self.reader.readexactly(size + 1)
        return frame.unmarshal(head + rest)[2]

    async def _expect(self, kind: type) -> object:
        while not isinstance(value := await self._frame(), kind):
            if isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                raise ConnectionError(f"broker closed: {value.reply_code} {value.reply_text}")
        return value

    def _send(self, channel: int, value: Any) -> None:
        self.writer.write(frame.marshal(value, channel))

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.url.hostname or "localhost", self.url.port or 5672
        )
        self.writer.write(b"AMQP\x00\x00\x09\x01")
        await self._expect(commands.Connection.Start)
        user = urllib.parse.unquote(self.url.username or "guest")
        password = urllib.parse.unquote(self.url.password or "guest")
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "bench.bad_input"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        self.frame_max = tune.frame_max or self.frame_max
        self._send(0, commands.Connection.TuneOk(tune.channel_max, self.frame_max, 0))
        vhost = urllib.parse.unquote(self.url.path[1:] if len(self.url.path) > 1 else "/")
        self._send(0, commands.Connection.Open(vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(1, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)
        self._reader_task = asyncio.create_task(self._confirms())

    async def _confirms(self) -> None:
        while True:
            value = await self._frame()
            if isinstance(value, (commands.Basic.Ack, commands.Basic.Nack)):
                tags = (
                    {t for t in self.pending if t <= value.delivery_tag}
                    if value.multiple
                    else {value.delivery_tag}
                )
                if isinstance(value, commands.Basic.Nack):
                    self.nacked += len(tags & self.pending)
                self.pending -= tags
                self._room.set()
            elif isinstance(value, (commands.Connection.Close, commands.Channel.Close)):
                raise ConnectionError(f"broker closed: {value.reply_code} {value.reply_text}")

    async def publish(
        self, exchange: str, routing_key: bytes, body: bytes, properties: bytes
    ) -> None:
        while len(self.pending) >= self.window:
            self._room.clear()
            await self._room.wait()
        method = (
            struct.pack(">HHH", 60, 40, 0)
            + shortstr(exchange.encode())
            + shortstr(routing_key)
            + b"\x00"
        )
        out = [struct.pack(">BHI", 1, 1, len(method)) + method + FRAME_END]
        header = struct.pack(">HHQ", 60, 0, len(body)) + properties
        out.append(struct.pack(">BHI", 2, 1, len(header)) + header + FRAME_END)
        chunk = self.frame_max - 8
        for start in range(0, len(body), chunk):
            part = body[start : start + chunk]
            out.append(struct.pack(">BHI", 3, 1, len(part)) + part + FRAME_END)
        self.writer.write(b"".join(out))
        self.sent += 1
        self.pending.add(self.sent)
        await self.writer.drain()

    async def settle(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            if self._reader_task is not None and self._reader_task.done():
                self._reader_task.result()  # raises what closed the connection
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def publish_bad(url: str, rate: float, seconds: float, seed: int) -> None:
    """The bad-input process: `rate` bad messages per second for `seconds`, paced; prints
    "ready" once connected and a JSON summary at the end."""
    rng = random.Random(seed)
    templates = _templates()
    raw = RawPublisher(url)
    await raw.connect()
    print("ready", flush=True)
    per_queue: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    began = loop.time()
    total = int(rate * seconds)
    for n in range(total):
        delay = began + n / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        exchange, key, body, properties = bad_message(rng, templates, n)
        await raw.publish(exchange, key, body, properties)
        per_queue[f"{exchange}:{key!r}"] = per_queue.get(f"{exchange}:{key!r}", 0) + 1
    await raw.settle()
    elapsed = loop.time() - began
    results = per_queue.get(f"{topology.COMMANDS}:{b'step.result'!r}", 0)
    summary = {"published": raw.sent, "results": results, "nacked": raw.nacked, "seconds": elapsed}
    print(json.dumps(summary), flush=True)
    await raw.close()


# ------------------------------------------------------------------------------ phases
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def counted(counter: Counter) -> float:
    """A Prometheus counter's total over all its labels."""
    return float(
        sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))
    )


@dataclass
class Phase:
    name: str
    latencies: list[float]
    started: int
    bad_published: int = 0
    bad_expected: int = 0  # rejections expected: step results count twice (two queues)
    rejected: int = 0
    cpu_s: float = 0.0
    seconds: float = 0.0


class Harness:
    """Valid flow starts at a steady rate, timed to their execution.succeeded event."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.published: dict[str, float] = {}  # idempotency key -> publish time
        self.execution_of: dict[str, str] = {}  # execution id -> idempotency key
        self.done: dict[str, float] = {}  # idempotency key -> succeeded event time

    async def start(self) -> None:
        self.connection = await connect(self.settings, "bench-bad-input-client")
        self.channel = await open_channel(self.connection)
        feed = await self.channel.declare_queue(exclusive=True)
        await feed.bind(topology.STATUS, routing_key=f"{TENANT}.echo.flow_start.accepted")
        await feed.bind(topology.STATUS, routing_key=f"{TENANT}.echo.execution.succeeded")
        await feed.consume(self._on_status, no_ack=True)

    async def _on_status(self, message: AbstractIncomingMessage) -> None:
        now = time.monotonic()
        event = json.loads(message.body)
        if event["type"].endswith("flow_start.accepted"):
            self.execution_of[event["data"]["execution_id"]] = event["data"]["idempotency_key"]
        elif (key := self.execution_of.get(event["subject"])) is not None:
            self.done.setdefault(key, now)

    async def _start_one(self, key: str) -> None:
        self.published[key] = time.monotonic()
        await publish(
            self.channel, FlowStartRequested(tenant=TENANT, flow_id="echo", idempotency_key=key)
        )

    async def steady(self, label: str, rate: float, seconds: float) -> list[str]:
        loop = asyncio.get_running_loop()
        keys = [f"{label}-{i}-{uuid.uuid4().hex[:6]}" for i in range(int(rate * seconds))]
        began = loop.time()
        pending = set()
        for i, key in enumerate(keys):
            delay = began + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(self._start_one(key))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)
        await self.until(lambda: all(k in self.done for k in keys), SETTLE_S)
        return keys

    @staticmethod
    async def until(check: Callable[[], bool], wait_s: float) -> bool:
        deadline = time.monotonic() + wait_s
        while not check():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    def latencies(self, keys: list[str]) -> list[float]:
        return [self.done[k] - self.published[k] for k in keys if k in self.done]

    async def phase(self, name: str, args: argparse.Namespace, bad_rate: float) -> Phase:
        rejected_before = counted(REJECTED) + counted(DROPPED)
        cpu_before, began = time.process_time(), time.monotonic()
        process = None
        if bad_rate > 0:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.bad_input",
                "--bad-publisher",
                str(self.settings.rabbitmq_url),
                "--rate",
                str(bad_rate),
                "--seconds",
                str(args.seconds),
                stdout=asyncio.subprocess.PIPE,
            )
            assert process.stdout is not None
            ready = await asyncio.wait_for(process.stdout.readline(), 30)
            assert ready.strip() == b"ready", ready
        keys = await self.steady(name, args.rate, args.seconds)
        result = Phase(name, self.latencies(keys), len(keys))
        if process is not None:
            out, _ = await asyncio.wait_for(process.communicate(), SETTLE_S)
            if process.returncode != 0:
                raise RuntimeError(f"the bad-input publisher failed ({process.returncode})")
            summary = json.loads(out.decode().strip().splitlines()[-1])
            result.bad_published = summary["published"]
            result.bad_expected = summary["published"] + summary["results"] - summary["nacked"]
        await self.until(
            lambda: counted(REJECTED) + counted(DROPPED) - rejected_before >= result.bad_expected,
            SETTLE_S,
        )
        result.rejected = int(counted(REJECTED) + counted(DROPPED) - rejected_before)
        result.cpu_s = time.process_time() - cpu_before
        result.seconds = time.monotonic() - began
        return result


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


async def run(args: argparse.Namespace) -> None:
    configure_logging("WARNING")  # not a line per rejected message
    async with isolated() as settings, running_system(settings) as system:
        harness = Harness(settings)
        await harness.start()
        try:
            print("warming up ...", file=sys.stderr)
            await harness.steady("warmup", args.rate, WARMUP / args.rate)
            print(f"baseline: {args.rate}/s valid for {args.seconds}s ...", file=sys.stderr)
            baseline = await harness.phase("baseline", args, 0)
            bad_rate = args.rate * args.bad_factor
            print(f"with bad input at {bad_rate}/s ...", file=sys.stderr)
            with_bad = await harness.phase("bad", args, bad_rate)
        finally:
            await harness.connection.close()
        died = [t for t in system.tasks if t.done()]
        reconnects = len(system.reconnects)
    rows = []
    for phase in (baseline, with_bad):
        rows.append(
            [
                "valid only" if phase is baseline else f"+ bad input x{args.bad_factor}",
                f"{len(phase.latencies)}/{phase.started}",
                f"{phase.bad_published}",
                f"{phase.rejected}/{phase.bad_expected}",
                f"{percentile(phase.latencies, 50) * 1000:.1f}",
                f"{percentile(phase.latencies, 99) * 1000:.1f}",
                f"{max(phase.latencies, default=float('nan')) * 1000:.1f}",
                f"{phase.cpu_s / phase.seconds:.2f}",
            ]
        )
    p50 = percentile(with_bad.latencies, 50) / percentile(baseline.latencies, 50)
    p99 = percentile(with_bad.latencies, 99) / percentile(baseline.latencies, 99)
    worst = max(with_bad.latencies, default=float("nan")) / max(baseline.latencies, default=1)
    cpu = (with_bad.cpu_s / with_bad.seconds) / (baseline.cpu_s / baseline.seconds)
    rows.append(
        [
            "ratio (bad / valid only)",
            "",
            "",
            "",
            f"{p50:.2f}",
            f"{p99:.2f}",
            f"{worst:.2f}",
            f"{cpu:.2f}",
        ]
    )
    print_table(
        f"flow start -> execution.succeeded, {args.rate}/s for {args.seconds}s (ms)",
        ["phase", "succeeded", "bad sent", "rejected", "p50", "p99", "max", "CPU s/s"],
        rows,
    )
    print(
        f"\nrejected counts dead-lettered + dropped (bad step results reach two queues); "
        f"service tasks ended: {len(died)}; reconnects: {reconnects}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=20, help="valid flow starts per second")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--bad-factor", type=float, default=10, help="bad messages per valid one")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bad-publisher", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bad_publisher:
        asyncio.run(publish_bad(args.bad_publisher, args.rate, args.seconds, args.seed))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
