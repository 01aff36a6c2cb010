"""Flow-start ingress: requests from other services (and operators), one queue per tenant.

Each registered tenant's requests wait in their own queue with their own prefetch, so one
tenant's flood fills only its own share of a replica's attention. A request is authorized
(its tenant is the authenticated one, or an operator's), rate limited per tenant, checked
against the flow, deduplicated by its idempotency key and admitted like a tick.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import time
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from prometheus_client import Counter
from pydantic import ValidationError

from orchestrator import topology
from orchestrator.accounts import tenant_of_user
from orchestrator.amqp import InvalidMessage, decode, publish, rejection_id, valid_id
from orchestrator.clock import to_ms
from orchestrator.consumer import Consumer
from orchestrator.outage import OUTAGES, dependency_of, sleep_unless
from orchestrator.scheduler.admitting import Admitting, execution_id_for, request_fire_id
from orchestrator.store import member
from orchestrator.store.admission import Admission, RateLimit
from orchestrator.telemetry import bound_context, get_logger
from schemas import ExecutionRequested, FlowDefinition, FlowStartRequested

log = get_logger(__name__)

INGRESS_REFRESH_S = 1.0
# A flow-start request being handled holds its idempotency key this long at most (handling
# takes milliseconds; a handler that died lets go of the key when the lease lapses).
REQUEST_LEASE_MS = 10_000
REQUEST_POLL_S = 0.02

FLOW_STARTS = Counter(
    "orchestrator_flow_starts_total", "Flow-start requests by outcome", ["outcome"]
)


class Ingress:
    def __init__(self, ctx: Admitting) -> None:
        self.ctx = ctx
        self.operators = ctx.settings.operator_accounts
        self.rate = RateLimit(ctx.settings.ingress_rate_per_s, ctx.settings.ingress_burst)
        self._consumers: dict[str, Consumer[FlowStartRequested]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Consumes every registered tenant's ingress until `stop` (`start` first): newly
        registered tenants within a second."""
        try:
            while not await sleep_unless(stop, INGRESS_REFRESH_S):
                await self.start(stop)
        finally:
            for consumer in self._consumers.values():
                await consumer.cancel()

    async def refresh(self, stop: asyncio.Event) -> None:
        """Consumes the ingress queue of every registered tenant (declaring it first): each
        tenant's requests wait in their own queue, each queue has its own prefetch, so one
        tenant's flood fills only its own share of this replica's attention."""
        tenants = sorted(str(t) for t in await self.ctx.redis.smembers(self.ctx.keys.tenants))
        for tenant in tenants:
            if tenant in self._consumers:
                continue
            channel = await self.ctx.channel()
            await topology.declare_ingress_queue(channel, tenant)
            consumer = Consumer(
                topology.ingress_queue_name(tenant),
                lambda incoming: decode(incoming, FlowStartRequested),
                functools.partial(self.handle_flow_start, queue_tenant=tenant),
                stop=stop,
                retry_limit_s=self.ctx.settings.outage_limit_s,
                entity="flow_start",
            )
            await consumer.start(channel)
            self._consumers[tenant] = consumer

    async def start(self, stop: asyncio.Event) -> None:
        """A broker outage (also at start) costs a refresh, never the process: the next
        round tries again."""
        try:
            await self.refresh(stop)
        except Exception as exc:
            dependency = dependency_of(exc)
            if dependency is None:
                log.exception("scheduler.ingress_refresh_failed")
            else:
                OUTAGES.failed(dependency, exc)

    def _authorize(
        self, request: FlowStartRequested, incoming: AbstractIncomingMessage, queue_tenant: str
    ) -> None:
        """The request's tenant is the authenticated one: a tenant account starts its own
        flows, an operator account anybody's. RabbitMQ has checked `user_id` against the
        publishing connection's account; without one the sender is unknown."""
        tenant = request.tenant
        user = incoming.user_id
        if tenant != queue_tenant:
            detail = f"a request for tenant {tenant!r} on the ingress of {queue_tenant!r}"
            FLOW_STARTS.labels("forbidden").inc()
            raise InvalidMessage("forbidden", detail, tenant=queue_tenant)
        if user:
            owner = tenant_of_user(user, self.ctx.settings.account_prefix)
            if owner != tenant and user not in self.operators:
                detail = f"account {user!r} may not start flows of tenant {tenant!r}"
                FLOW_STARTS.labels("forbidden").inc()
                raise InvalidMessage("forbidden", detail, tenant=tenant)
        elif self.ctx.settings.require_auth:
            detail = "the request has no AMQP user_id and authentication is required"
            FLOW_STARTS.labels("unauthenticated").inc()
            raise InvalidMessage("unauthenticated", detail, tenant=tenant)

    async def handle_flow_start(
        self,
        request: FlowStartRequested,
        incoming: AbstractIncomingMessage,
        *,
        queue_tenant: str | None = None,
    ) -> None:
        """Admits one decoded flow-start request. Bad requests raise InvalidMessage (the
        consumer skeleton announces and dead-letters them); policy refusals (rate limited,
        paused, quarantined...) are announced and acked here."""
        tenant = request.tenant
        self._authorize(request, incoming, queue_tenant or tenant)
        with bound_context(tenant=tenant, flow=request.flow_id):
            # Independent reads, one round trip: the tenant's token and the flow's definition.
            allowed, definition = await asyncio.gather(
                self.rate.take(self.ctx.admission, tenant, to_ms(self.ctx.clock.now())),
                self.ctx.flows.get(tenant, request.flow_id),
            )
            if not allowed:
                detail = (
                    f"more than {self.rate.burst} flow starts at once or "
                    f"{self.rate.per_s:g}/s for tenant {tenant!r}"
                )
                await self._refuse(incoming, "rate_limited", detail, None, tenant=tenant)
                return
            if definition is None:
                detail = f"tenant {tenant!r} has no flow {request.flow_id!r}"
                FLOW_STARTS.labels("unknown_flow").inc()
                raise InvalidMessage("unknown_flow", detail, tenant=tenant, flow=request.flow_id)
            await self._admit_request(incoming, request, definition)

    async def _admit_request(
        self,
        incoming: AbstractIncomingMessage,
        request: FlowStartRequested,
        definition: FlowDefinition,
    ) -> None:
        flow = member(definition.tenant, definition.id)
        fire_id = request_fire_id(definition.tenant, definition.id, request.idempotency_key)
        execution_id = execution_id_for(fire_id)
        data: dict[str, Any] = {
            "idempotency_key": request.idempotency_key,
            "execution_id": execution_id,
            "fire_id": fire_id,
        }
        seen = await self._claim_request(flow, request.idempotency_key, incoming)
        if seen.startswith("done:"):
            FLOW_STARTS.labels("duplicate").inc()
            # A new event (its own id, from this very request message), not a copy of the
            # first acceptance: subscribers that drop repeated ids still see it.
            queue = topology.ingress_queue_name(definition.tenant)
            await self.ctx.status(
                "flow_start",
                "accepted",
                definition,
                f"{fire_id}:duplicate:{rejection_id(queue, incoming)}",
                {**data, "duplicate": True},
                subject=execution_id,
            )
            return
        if definition.paused:
            await self.ctx.admission.forget_request(flow, request.idempotency_key)
            await self._refuse(incoming, "paused", "the flow is paused", definition)
            return
        try:
            execution = ExecutionRequested(
                execution_id=execution_id,
                fire_id=fire_id,
                tenant=definition.tenant,
                flow_id=definition.id,
                trigger=request.trigger,
                input={**definition.input, **request.input},
            )
        except ValidationError as exc:
            await self.ctx.admission.forget_request(flow, request.idempotency_key)
            FLOW_STARTS.labels("schema_violation").inc()
            raise InvalidMessage(
                "schema_violation", str(exc)[:500], tenant=definition.tenant, flow=definition.id
            ) from None
        decision = await self.ctx.admit(definition, execution)
        FLOW_STARTS.labels(decision.value).inc()
        if decision not in (Admission.RUN, Admission.BUFFERED):
            # Refused by policy, not for bad input: the key is forgotten so the caller may
            # retry the same request later (once the flow is free or released).
            await self.ctx.admission.forget_request(flow, request.idempotency_key)
            detail = f"admission refused the request: {decision.value}"
            await self._refuse(incoming, decision.value, detail, definition)
            return
        if decision is Admission.BUFFERED:
            data["buffered"] = True
        accepted = self.ctx.status(
            "flow_start", "accepted", definition, fire_id, data, subject=execution_id
        )
        if decision is Admission.RUN:
            # Both out together, one wait for their confirms: if either fails, the request is
            # handled again (same ids: the admission and the event repeat, as copies).
            await asyncio.gather(publish(await self.ctx.channel(), execution), accepted)
        else:
            await accepted
        # Only once both are confirmed: a finished key answers "duplicate" from then on.
        await self.ctx.admission.finish_request(flow, request.idempotency_key, execution_id)

    async def _claim_request(
        self, flow: str, idempotency_key: str, incoming: AbstractIncomingMessage
    ) -> str:
        """Claims the idempotency key; a concurrent delivery of the same key (another replica,
        another consumer) is waited for, so exactly one of them runs and the other reports the
        duplicate. The owner is this delivery: the consumer retrying it in place after an
        outage finds its own claim."""
        delivery = f"{self.ctx.replica}/{incoming.consumer_tag}/{incoming.delivery_tag}"
        owner = hashlib.sha256(delivery.encode()).hexdigest()[:24]
        deadline = time.monotonic() + REQUEST_LEASE_MS / 1000 * 2
        while True:
            seen = await self.ctx.admission.begin_request(
                flow,
                idempotency_key,
                ttl_s=self.ctx.settings.idempotency_ttl_s,
                owner=owner,
                now_ms=to_ms(self.ctx.clock.now()),
                lease_ms=REQUEST_LEASE_MS,
            )
            if seen != "busy" or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(REQUEST_POLL_S)

    async def _refuse(
        self,
        incoming: AbstractIncomingMessage,
        reason: str,
        detail: str,
        definition: FlowDefinition | None,
        *,
        tenant: str | None = None,
    ) -> None:
        """A valid request that policy refuses (rate limited, paused, quarantined, running):
        announced, then acked by the consumer. Not a dead letter: the same request may
        succeed later."""
        FLOW_STARTS.labels(reason).inc()
        queue = topology.ingress_queue_name(definition.tenant if definition else str(tenant))
        data = {"reason": reason, "detail": detail, "queue": queue}
        if (message_id := valid_id(incoming.message_id)) is not None:
            data["message_id"] = message_id
        key = rejection_id(queue, incoming)
        await self.ctx.status("flow_start", "rejected", definition, key, data, tenant=tenant)
        log.info("flow_start.rejected", reason=reason, detail=detail)
