"""`orchestrator up --demo` (`make run`): a fair system at work, in one terminal.

Applies the demo flows (examples/demo/flows.yaml: four tenants, weights 3:2:1:1, plans
premium, standard, standard and free under examples/demo/policy.yaml), then keeps every
tenant busy: each one always has `OUTSTANDING` executions requested and not yet ended, so the
workers are saturated and share out by weight. The `noisy` tenant's steps burn CPU; the
violations consumer penalises it within a window or two and quarantines it at its third
offence. `orchestrator top` shows it live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from orchestrator import topology
from orchestrator.amqp import open_channel, publish
from orchestrator.flowfiles import load_flow_files
from orchestrator.operator import Operator
from orchestrator.outage import sleep_unless
from orchestrator.telemetry import get_logger
from schemas import FlowStartRequested

log = get_logger(__name__)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "demo"
FLOWS_FILE = EXAMPLES / "flows.yaml"
POLICY_FILE = EXAMPLES / "policy.yaml"
WEIGHTS = {"acme": 3.0, "globex": 2.0, "initech": 1.0, "noisy": 1.0}
OUTSTANDING = {"acme": 24, "globex": 24, "initech": 24, "noisy": 32}
MAX_STARTS_PER_S = 40.0  # per tenant: a refused tenant (quarantined) is not hammered
FORGET_S = 120.0  # a request whose end never showed is no longer counted as outstanding
ENDS = {"succeeded", "failed", "compensated", "cancelled"}


@dataclass
class _Tenant:
    flow: str
    target: int
    pending: deque[float] = field(default_factory=deque)  # request times, oldest first
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(MAX_STARTS_PER_S, self.tokens + (now - self.refilled) * MAX_STARTS_PER_S)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


async def prepare(operator: Operator) -> list[str]:
    """Applies the demo flows and weights; returns the flows as `tenant/flow`."""
    definitions = load_flow_files([FLOWS_FILE])
    await operator.apply_flows(definitions)
    for tenant, weight in WEIGHTS.items():
        await operator.set_weight(tenant, weight)
    return [f"{d.tenant}/{d.id}" for d in definitions]


class LoadDriver:
    """Keeps each demo tenant's outstanding executions at its target (closed loop: a new
    request for every one that ended or was refused), at most MAX_STARTS_PER_S each."""

    def __init__(
        self, connection: AbstractRobustConnection, flows: list[str], user_id: str
    ) -> None:
        self.connection = connection
        self.user_id = user_id  # the requests are signed by the account that publishes them
        self.tenants: dict[str, _Tenant] = {}
        for member in flows:
            tenant, _, flow = member.partition("/")
            self.tenants[tenant] = _Tenant(flow, OUTSTANDING.get(tenant, 16))
        self.started = 0

    async def _on_event(self, message: AbstractIncomingMessage) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(message.body)
            entity, _, state = str(event["type"]).removeprefix("io.orchestrator.").partition(".")
            ended = (entity == "execution" and state in ENDS) or (
                entity == "flow_start" and state == "rejected"
            )
            tenant = self.tenants.get(str(event.get("tenant")))
            if ended and tenant is not None and tenant.pending:
                tenant.pending.popleft()

    async def run(self, stop: asyncio.Event) -> None:
        channel = await open_channel(self.connection, prefetch=1000)
        feed = await channel.declare_queue(exclusive=True, auto_delete=True)
        for tenant in self.tenants:
            await feed.bind(topology.STATUS, routing_key=f"{tenant}.*.execution.*")
            await feed.bind(topology.STATUS, routing_key=f"{tenant}.*.flow_start.rejected")
        await feed.consume(self._on_event, no_ack=True)
        log.info("demo.load_started", tenants=sorted(self.tenants))
        while not stop.is_set():
            now = time.monotonic()
            requests = []
            for name, state in self.tenants.items():
                while state.pending and now - state.pending[0] > FORGET_S:
                    state.pending.popleft()
                while len(state.pending) < state.target and state.take():
                    state.pending.append(now)
                    requests.append(
                        FlowStartRequested(
                            tenant=name, flow_id=state.flow, idempotency_key=str(uuid.uuid4())
                        )
                    )
            if requests:
                results = await asyncio.gather(
                    *(publish(channel, r, user_id=self.user_id) for r in requests),
                    return_exceptions=True,
                )
                self.started += sum(1 for r in results if not isinstance(r, BaseException))
            await sleep_unless(stop, 0.1)
        with contextlib.suppress(Exception):
            await channel.close()
