"""Every exchange, queue and binding of the system, and which message goes where: one place.

Processes never declare ad-hoc queues; they call `apply` (idempotent) and publish with `route`.
The AsyncAPI document is generated from this module, so the docs cannot drift from the broker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aio_pika.abc import AbstractChannel, AbstractQueue, ExchangeType
from aiormq.exceptions import ChannelNotFoundEntity

from schemas import (
    ExecutionCancel,
    ExecutionList,
    ExecutionQuery,
    ExecutionRequested,
    FlowStartRequested,
    Message,
    PenaltyCommand,
    QuarantineCommand,
    ReleaseCommand,
    StatusEvent,
    StepResult,
    StepTask,
)

# In a routing key where a tenant goes: none (an operator's question about every tenant).
NO_TENANT = "_"

COMMANDS = "orchestrator.commands"
STEPS = "orchestrator.steps"
WORK = "orchestrator.work"
STATUS = "orchestrator.status"
CONTROL = "orchestrator.control"
DEAD_LETTERS = "orchestrator.dlx"

# A message redelivered this often (its consumer crashed or nacked it each time) is a poison
# message: the broker dead-letters it instead of looping forever. RabbitMQ 4 would default to
# 20; five attempts already rule out a transient failure.
DELIVERY_LIMIT = 5

# Per-tenant fair queue bound: a flooding tenant gets publisher back-pressure (reject-publish)
# instead of growing the broker's memory. The engine keeps the steps it could not enqueue.
TENANT_QUEUE_MAX_LENGTH = 10_000
COMPLETIONS_MAX_LENGTH = 100_000

DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class Exchange:
    name: str
    kind: ExchangeType
    description: str


@dataclass(frozen=True)
class Queue:
    name: str
    description: str
    consumer: str
    max_length: int | None = None
    single_active_consumer: bool = False
    dead_letter: bool = True  # False for the DLQs themselves and for soft state
    overflow: Literal["reject-publish", "drop-head"] = "reject-publish"  # at max_length
    message_ttl_ms: int | None = None

    def __post_init__(self) -> None:
        if self.dead_letter and self.overflow != "reject-publish":
            raise ValueError(f"{self.name}: at-least-once dead-lettering needs reject-publish")

    @property
    def dlq(self) -> str:
        return self.name + DLQ_SUFFIX

    def arguments(self) -> dict[str, Any]:
        args: dict[str, Any] = {"x-queue-type": "quorum"}
        if self.dead_letter:
            args.update(
                {
                    "x-dead-letter-exchange": DEAD_LETTERS,
                    "x-dead-letter-routing-key": self.name,
                    "x-delivery-limit": DELIVERY_LIMIT,
                    # at-least-once dead-lettering: the broker keeps a dead-lettered message
                    # until the DLQ confirms it, so a poison message is never dropped on the
                    # floor. It requires reject-publish overflow.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                }
            )
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
            args["x-overflow"] = self.overflow
        if self.message_ttl_ms is not None:
            args["x-message-ttl"] = self.message_ttl_ms
        if self.single_active_consumer:
            args["x-single-active-consumer"] = True
        return args


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str
    messages: tuple[str, ...]


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[Exchange, ...]
    queues: tuple[Queue, ...]
    bindings: tuple[Binding, ...]

    def queue(self, name: str) -> Queue:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)


EXCHANGES = (
    Exchange(
        COMMANDS, ExchangeType.TOPIC, "Requests into the system: flow starts, executions, results."
    ),
    Exchange(
        STEPS,
        ExchangeType.DIRECT,
        "Step tasks by tenant, into the per-tenant fair queues fq.<tenant>.",
    ),
    Exchange(WORK, ExchangeType.DIRECT, "Step tasks released by the dispatcher, by worker pool."),
    Exchange(
        STATUS,
        ExchangeType.TOPIC,
        "Status events (CloudEvents), key <tenant>.<flow>.<entity>.<state>.",
    ),
    Exchange(
        CONTROL,
        ExchangeType.TOPIC,
        "Penalty, quarantine and release commands, key <kind>.<tenant>.",
    ),
    Exchange(DEAD_LETTERS, ExchangeType.DIRECT, "Dead letters, keyed by the queue they came from."),
)

EXECUTIONS_QUEUE = "engine.executions"
RESULTS_QUEUE = "engine.results"
QUERIES_QUEUE = "engine.queries"
CANCELS_QUEUE = "engine.cancels"
CONTROL_QUEUE = "control.commands"
COMPLETIONS_QUEUE = "dispatcher.completions"
DEFAULT_POOL = "default"


def work_queue_name(pool: str) -> str:
    return f"work.{pool}"


def express_queue_name(pool: str) -> str:
    """Steps of tenants that had nothing in flight: they must not wait behind the headroom
    already queued in work.<pool>. A tenant has at most one step in this lane at a time."""
    return f"work.{pool}.express"


TENANT_QUEUE_PREFIX = "fq."
INGRESS_QUEUE_PREFIX = "ingress."
# A tenant's flow-start requests queue apart from everyone else's, so a tenant that floods
# them delays only itself; the scheduler consumes every registered tenant's queue.
INGRESS_MAX_LENGTH = 10_000


def flow_start_key(tenant: str) -> str:
    """The routing key of tenant T's flow-start requests. Tenant accounts may publish with
    their own key only (topic permissions), so the key names the sender's tenant."""
    return f"flow.start.{tenant}"


def query_key(tenant: str) -> str:
    """The routing key of tenant T's questions to the engine (ExecutionQuery)."""
    return f"query.{tenant}"


def cancel_key(tenant: str) -> str:
    """The routing key of tenant T's cancel requests (ExecutionCancel)."""
    return f"cancel.{tenant}"


def ingress_queue_name(tenant: str) -> str:
    return f"{INGRESS_QUEUE_PREFIX}{tenant}"


def ingress_queue(tenant: str) -> Queue:
    """Tenant T's flow-start requests; declared when the tenant is registered. A publish
    beyond the bound is refused (nack), so a flood pushes back on its publisher."""
    return Queue(
        ingress_queue_name(tenant),
        f"Flow-start requests of tenant {tenant}.",
        consumer="scheduler",
        max_length=INGRESS_MAX_LENGTH,
    )


def tenant_queue_name(tenant: str) -> str:
    return f"{TENANT_QUEUE_PREFIX}{tenant}"


def queue_tenant(queue: str) -> str | None:
    """The tenant a per-tenant queue (fq.T, ingress.T, or their DLQs) belongs to."""
    for prefix in (TENANT_QUEUE_PREFIX, INGRESS_QUEUE_PREFIX):
        if queue.startswith(prefix):
            return queue.removeprefix(prefix).removesuffix(DLQ_SUFFIX)
    return None


def tenant_queue(tenant: str) -> Queue:
    """The fair queue of one tenant; declared when the tenant first appears."""
    return Queue(
        tenant_queue_name(tenant),
        f"Steps of tenant {tenant} waiting for the dispatcher.",
        consumer="dispatcher",
        max_length=TENANT_QUEUE_MAX_LENGTH,
    )


def build_topology(pools: tuple[str, ...] = (DEFAULT_POOL,)) -> Topology:
    queues = [
        Queue(EXECUTIONS_QUEUE, "Admitted executions for the engine.", consumer="engine"),
        Queue(RESULTS_QUEUE, "Step results from workers.", consumer="engine"),
        Queue(
            QUERIES_QUEUE,
            "Questions about executions (request/reply: the answer goes to reply_to).",
            consumer="engine",
        ),
        Queue(CANCELS_QUEUE, "Requests to cancel executions.", consumer="engine"),
        Queue(
            CONTROL_QUEUE,
            "Control commands, applied to the tenant state in Redis.",
            consumer="dispatcher",
        ),
        Queue(
            COMPLETIONS_QUEUE,
            "Copies of step results: they free worker slots and correct cost estimates. Soft "
            "state, so bounded: while no dispatcher leads nobody reads them, and the oldest go "
            "first, after 10 minutes at the latest.",
            consumer="dispatcher",
            dead_letter=False,
            max_length=COMPLETIONS_MAX_LENGTH,
            overflow="drop-head",
            message_ttl_ms=600_000,
        ),
        *(
            Queue(
                work_queue_name(pool), f"Step tasks for workers of pool {pool}.", consumer="worker"
            )
            for pool in pools
        ),
        *(
            Queue(
                express_queue_name(pool),
                f"Step tasks of newly active tenants for workers of pool {pool}.",
                consumer="worker",
            )
            for pool in pools
        ),
    ]
    bindings = [
        Binding(
            COMMANDS, EXECUTIONS_QUEUE, "execution.requested", (ExecutionRequested.message_type,)
        ),
        Binding(COMMANDS, RESULTS_QUEUE, "step.result", (StepResult.message_type,)),
        Binding(
            COMMANDS,
            QUERIES_QUEUE,
            "query.*",
            (ExecutionQuery.message_type, ExecutionList.message_type),
        ),
        Binding(COMMANDS, CANCELS_QUEUE, "cancel.*", (ExecutionCancel.message_type,)),
        Binding(COMMANDS, COMPLETIONS_QUEUE, "step.result", (StepResult.message_type,)),
        Binding(
            CONTROL,
            CONTROL_QUEUE,
            "#",
            tuple(m.message_type for m in (PenaltyCommand, QuarantineCommand, ReleaseCommand)),
        ),
        *(Binding(WORK, work_queue_name(pool), pool, (StepTask.message_type,)) for pool in pools),
        *(
            Binding(WORK, express_queue_name(pool), f"{pool}.express", (StepTask.message_type,))
            for pool in pools
        ),
    ]
    dlqs = [
        Queue(q.dlq, f"Dead letters of {q.name}.", consumer="operator", dead_letter=False)
        for q in queues
        if q.dead_letter
    ]
    dlq_bindings = [Binding(DEAD_LETTERS, q.dlq, q.name, ()) for q in queues if q.dead_letter]
    return Topology(EXCHANGES, tuple(queues + dlqs), tuple(bindings + dlq_bindings))


TOPOLOGY = build_topology()


# ---------------------------------------------------------------- routing of published messages
@dataclass(frozen=True)
class Route:
    exchange: str
    address: str  # the routing key as documented, `{name}` marks a parameter
    routing_key: Callable[[Any], str]
    publisher: str
    mandatory: bool = True  # a message nobody receives is a bug, except where noted


ROUTES: dict[type[Message], Route] = {
    FlowStartRequested: Route(
        COMMANDS, "flow.start.{tenant}", lambda m: flow_start_key(m.tenant), "tenants, operators"
    ),
    ExecutionRequested: Route(
        COMMANDS, "execution.requested", lambda m: "execution.requested", "scheduler"
    ),
    StepResult: Route(COMMANDS, "step.result", lambda m: "step.result", "worker"),
    ExecutionQuery: Route(
        COMMANDS,
        "query.{tenant}",
        lambda m: query_key(m.tenant or NO_TENANT),
        "tenants, operators (tenant `_`: any tenant's, operators only)",
    ),
    ExecutionList: Route(
        COMMANDS,
        "query.{tenant}",
        lambda m: query_key(m.tenant or NO_TENANT),
        "tenants, operators (tenant `_`: every tenant's, operators only)",
    ),
    ExecutionCancel: Route(
        COMMANDS,
        "cancel.{tenant}",
        lambda m: cancel_key(m.tenant or NO_TENANT),
        "tenants, operators (tenant `_`: any tenant's, operators only)",
    ),
    # The engine publishes into the tenant's fair queue; the dispatcher republishes to
    # orchestrator.work with the pool as routing key (see `work_route`).
    StepTask: Route(STEPS, "{tenant}", lambda m: m.tenant, "engine"),
    # Status events are a broadcast: no subscriber is a normal situation, not a lost message.
    StatusEvent: Route(
        STATUS,
        "{tenant}.{flow}.{entity}.{state}",
        lambda m: m.routing_key,
        "engine",
        mandatory=False,
    ),
    PenaltyCommand: Route(
        CONTROL, "penalty.{tenant}", lambda m: f"penalty.{m.tenant}", "violations"
    ),
    QuarantineCommand: Route(
        CONTROL, "quarantine.{tenant}", lambda m: f"quarantine.{m.tenant}", "violations"
    ),
    ReleaseCommand: Route(
        CONTROL, "release.{tenant}", lambda m: f"release.{m.tenant}", "violations"
    ),
}


def work_route(task: StepTask, *, express: bool = False) -> tuple[str, str]:
    """Where the dispatcher releases a step task: (exchange, routing key)."""
    return WORK, f"{task.pool}.express" if express else task.pool


def route(message: Message) -> tuple[str, str, bool]:
    """(exchange, routing key, mandatory) for a message."""
    spec = ROUTES[type(message)]
    return spec.exchange, spec.routing_key(message), spec.mandatory


async def apply(
    channel: AbstractChannel, topology: Topology = TOPOLOGY, *, role: str | None = None
) -> list[str]:
    """Declares everything (the operator's `topology apply`), or with `role` only the queues
    that process type consumes, with their DLQs and bindings: services may not declare
    exchanges (their accounts cannot, see orchestrator.accounts), so the exchanges must exist;
    `TopologyMissing` says so when one does not. Idempotent. One line per declared object."""
    declared: list[str] = []
    if role is None:
        for exchange in topology.exchanges:
            await channel.declare_exchange(exchange.name, exchange.kind, durable=True)
            declared.append(f"exchange {exchange.name} ({exchange.kind.value})")
    owned = {q.name for q in topology.queues if role is None or q.consumer == role}
    owned |= {q.dlq for q in topology.queues if q.name in owned and q.dead_letter}
    queues: dict[str, AbstractQueue] = {}
    try:
        for queue in topology.queues:
            if queue.name in owned:
                queues[queue.name] = await declare_queue(channel, queue)
                declared.append(f"queue    {queue.name} {_describe_args(queue.arguments())}")
        for binding in topology.bindings:
            if binding.queue in owned:
                await queues[binding.queue].bind(binding.exchange, routing_key=binding.routing_key)
                declared.append(
                    f"binding  {binding.exchange} --{binding.routing_key}--> {binding.queue}"
                )
    except ChannelNotFoundEntity as exc:
        raise TopologyMissing(
            f"{exc}: the exchanges are missing; run `orchestrator topology apply` "
            "(or `orchestrator accounts provision`) as the operator first"
        ) from None
    return declared


class TopologyMissing(Exception):
    """A service started before the operator declared the exchanges."""


async def declare_queue(channel: AbstractChannel, queue: Queue) -> AbstractQueue:
    return await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments())


async def _declare_with_dlq(
    channel: AbstractChannel, queue: Queue, exchange: str, routing_key: str
) -> None:
    dlq = await declare_queue(channel, Queue(queue.dlq, "", consumer="operator", dead_letter=False))
    await dlq.bind(DEAD_LETTERS, routing_key=queue.name)
    declared = await declare_queue(channel, queue)
    await declared.bind(exchange, routing_key=routing_key)


async def declare_tenant_queue(channel: AbstractChannel, tenant: str) -> None:
    """Declares fq.<tenant> with its DLQ and binds it; safe to call again."""
    await _declare_with_dlq(channel, tenant_queue(tenant), STEPS, tenant)


async def declare_ingress_queue(channel: AbstractChannel, tenant: str) -> None:
    """Declares ingress.<tenant> with its DLQ, bound to its flow-start key; safe to repeat."""
    await _declare_with_dlq(channel, ingress_queue(tenant), COMMANDS, flow_start_key(tenant))


def _describe_args(args: dict[str, Any]) -> str:
    short = {k.removeprefix("x-"): v for k, v in args.items()}
    return " ".join(f"{k}={v}" for k, v in short.items())
