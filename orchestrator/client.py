"""`OrchestratorClient`: what a service needs to start flows and follow them, with only an
AMQP URL and its tenant account (no Redis, no Kafka).

    async with OrchestratorClient("amqp://orchestrator.tenant.acme:SECRET@rabbit/") as client:
        execution_id = await client.start_flow("acme", "nightly-sync", {"day": "2026-12-01"})
        outcome = await client.wait_for(execution_id, timeout=300)
        async for event in client.subscribe("acme.nightly-sync.#"):
            ...

* `start_flow` returns the execution id once the scheduler accepted the request, or raises
  the refusal's typed error (`UnknownFlow`, `InvalidInput`, `Paused`, `Quarantined`,
  `RateLimited`, `Forbidden`, ...), never a silent drop. The request is signed with the
  account (`user_id`), so the broker vouches for who sent it.
* `subscribe` yields typed status events; a message is acked only after the loop body has
  handled it (when the loop asks for the next one), so delivery is at least once: the event
  a loop was left with comes again to a durable subscriber (deduplicate by `id`). With
  `queue=NAME` the queue is durable and named `status.<tenant>.NAME`: a service that must
  not miss events while down keeps its queue.
* `wait_for` returns the terminal event, also when the execution ended before the call (the
  engine keeps it: `get_execution`).
* `get_execution`, `list_executions` and `cancel` ask the engine over AMQP (request/reply
  through `amq.rabbitmq.reply-to`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from datetime import datetime
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import DeliveryError
from aiormq.exceptions import ChannelAccessRefused
from opentelemetry.trace import SpanKind

from orchestrator import topology, tracing
from orchestrator.accounts import DEFAULT_PREFIX, status_queue_name, tenant_of_user, user_of
from orchestrator.amqp import publish, to_amqp
from schemas import (
    TERMINAL_STATES,
    ExecutionCancel,
    ExecutionList,
    ExecutionPage,
    ExecutionQuery,
    ExecutionView,
    FlowStartRequested,
    Message,
    StatusEvent,
)

A = TypeVar("A", bound=Message)
REPLY_TO = "amq.rabbitmq.reply-to"


class OrchestratorError(Exception):
    """Something the orchestrator refused or could not do; `reason` is the machine-readable
    cause (the `orch-reason` of the refusal), `detail` says it for people."""

    reason = "error"

    def __init__(self, detail: str, *, reason: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if reason is not None:
            self.reason = reason


class FlowStartRefused(OrchestratorError):
    reason = "refused"


class UnknownFlow(FlowStartRefused):
    reason = "unknown_flow"


class UnknownTenant(FlowStartRefused):
    """Nothing takes flow starts for the tenant: it has no flows (or the scheduler has not
    seen them yet: they are picked up within a second of `flows apply`)."""

    reason = "unknown_tenant"


class InvalidInput(FlowStartRefused):
    reason = "schema_violation"


class Paused(FlowStartRefused):
    reason = "paused"


class Quarantined(FlowStartRefused):
    reason = "quarantined"


class RateLimited(FlowStartRefused):
    reason = "rate_limited"


class Overlapping(FlowStartRefused):
    reason = "overlap"


class Forbidden(FlowStartRefused):
    reason = "forbidden"


class Unauthenticated(FlowStartRefused):
    reason = "unauthenticated"


REFUSALS: dict[str, type[FlowStartRefused]] = {
    cls.reason: cls
    for cls in (
        UnknownFlow,
        InvalidInput,
        Paused,
        Quarantined,
        RateLimited,
        Overlapping,
        Forbidden,
        Unauthenticated,
    )
}
REFUSALS["malformed_json"] = InvalidInput


class UnknownExecution(OrchestratorError):
    reason = "unknown_execution"


class Timeout(OrchestratorError, TimeoutError):
    reason = "timeout"


class OrchestratorClient:
    def __init__(
        self,
        url: str,
        *,
        account_prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 30.0,
        connection_name: str = "orchestrator-client",
    ) -> None:
        self.url = url
        self.user = user_of(url)
        # The tenant of a tenant account; None for an operator (who names tenants per call).
        self.tenant = tenant_of_user(self.user, account_prefix)
        self.timeout_s = timeout_s
        self._name = connection_name
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._replies: dict[str, asyncio.Future[Any]] = {}  # message id / correlation id
        self._bound: set[str] = set()
        self._responses: aio_pika.abc.AbstractQueue | None = None
        self._rpc: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> OrchestratorClient:
        self._connection = await aio_pika.connect_robust(
            self.url, client_properties={"connection_name": self._name}
        )
        self._channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()
        for future in self._replies.values():
            future.cancel()

    @property
    def connection(self) -> AbstractRobustConnection:
        if self._connection is None:
            raise RuntimeError("use OrchestratorClient as `async with`")
        return self._connection

    def _tenant(self, tenant: str | None) -> str:
        chosen = tenant or self.tenant
        if chosen is None:
            raise ValueError("which tenant? (an operator account names it)")
        return chosen

    def _queue_name(self, tenant: str, name: str) -> str:
        # A tenant account may declare only status.<tenant>.*; operators use the same names.
        return status_queue_name(tenant, name)

    # ------------------------------------------------------------------ start_flow
    async def _responses_for(self, tenant: str, flow: str) -> None:
        """The client's own queue for flow-start answers, bound per (tenant, flow) before
        the first request, so no answer can arrive before it is listened for."""
        async with self._lock:
            if self._responses is None:
                channel = await self.connection.channel()
                self._responses = await channel.declare_queue(
                    self._queue_name(tenant, f"client-{uuid.uuid4().hex[:12]}"),
                    exclusive=True,
                    auto_delete=True,
                )
                await self._responses.consume(self._on_response, no_ack=True)
            for key in (f"{tenant}.{flow}.flow_start.*", f"{tenant}._.flow_start.rejected"):
                if key not in self._bound:
                    await self._responses.bind(topology.STATUS, routing_key=key)
                    self._bound.add(key)

    async def _on_response(self, message: AbstractIncomingMessage) -> None:
        try:
            event = StatusEvent.model_validate_json(message.body)
        except ValueError:
            return
        data = event.data
        if event.type.endswith("flow_start.accepted"):
            key = data.get("idempotency_key")
            wanted = f"start:{event.tenant}:{event.flow}:{key}"
        else:
            wanted = str(data.get("message_id", ""))
        future = self._replies.get(wanted)
        if future is not None and not future.done():
            future.set_result(event)

    async def start_flow(
        self,
        tenant: str | None,
        flow: str,
        input: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """Starts the flow; returns its execution id once accepted (also when the key was
        seen before: the same execution). A refusal raises its typed error."""
        tenant = self._tenant(tenant)
        if self.tenant is not None and tenant != self.tenant:
            # The broker would refuse it too (topic permissions); said here, the client's
            # channels stay open.
            raise Forbidden(f"account {self.user!r} may start flows of {self.tenant!r} only")
        request = FlowStartRequested(
            tenant=tenant,
            flow_id=flow,
            idempotency_key=idempotency_key or f"client-{uuid.uuid4()}",
            input=input or {},
            requested_by=self._name[:100],
        )
        await self._responses_for(tenant, flow)
        future: asyncio.Future[StatusEvent] = asyncio.get_running_loop().create_future()
        self._replies[request.message_id()] = future
        try:
            assert self._channel is not None
            try:
                # The execution's trace begins here, or continues the caller's span.
                with tracing.span(
                    f"start_flow {tenant}/{flow}",
                    kind=SpanKind.PRODUCER,
                    attributes={"orchestrator.tenant": tenant, "orchestrator.flow": flow},
                ):
                    await publish(self._channel, request, user_id=self.user)
            except DeliveryError:
                raise UnknownTenant(
                    f"nothing takes flow starts of tenant {tenant!r}: it has no flows"
                ) from None
            except ChannelAccessRefused as exc:  # the broker closed the channel: a new one
                self._channel = await self.connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
                raise Forbidden(
                    f"account {self.user!r} may not start flows of tenant {tenant!r} ({exc})"
                ) from None
            try:
                event = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                raise Timeout(f"no answer to the flow start within {self.timeout_s:g} s") from None
        finally:
            self._replies.pop(request.message_id(), None)
        if event.type.endswith("flow_start.accepted"):
            return str(event.data["execution_id"])
        reason = str(event.data.get("reason", "refused"))
        error = REFUSALS.get(reason, FlowStartRefused)
        raise error(str(event.data.get("detail", reason)), reason=reason)

    # ------------------------------------------------------------------ subscribe
    async def _subscription(
        self, pattern: str, queue: str | None, tenant: str | None
    ) -> tuple[AbstractChannel, aio_pika.abc.AbstractQueue]:
        owner = self._tenant(tenant)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=100)
        if queue is None:
            declared = await channel.declare_queue(
                self._queue_name(owner, f"sub-{uuid.uuid4().hex[:12]}"), exclusive=True
            )
        else:
            declared = await channel.declare_queue(self._queue_name(owner, queue), durable=True)
        await declared.bind(topology.STATUS, routing_key=pattern)
        return channel, declared

    @staticmethod
    async def _events(
        channel: AbstractChannel, declared: aio_pika.abc.AbstractQueue
    ) -> AsyncGenerator[StatusEvent, None]:
        try:
            async with declared.iterator() as messages:
                async for message in messages:
                    try:
                        event = StatusEvent.model_validate_json(message.body)
                    except ValueError:
                        await message.ack()  # not an event: nothing to hand over
                        continue
                    yield event
                    await message.ack()  # the loop body is done with it
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def subscribe(
        self, pattern: str, queue: str | None = None, *, tenant: str | None = None
    ) -> AsyncIterator[StatusEvent]:
        """Status events matching `pattern` (`<tenant>.<flow>.<entity>.<state>`, `#`/`*`).
        Each is acked when the loop asks for the next one, so an event the body did not
        finish with (the service crashed) comes again. `queue`: a durable queue that keeps
        events while the subscriber is away (delete it with `unsubscribe`)."""
        channel, declared = await self._subscription(pattern, queue, tenant)
        async for event in self._events(channel, declared):
            yield event

    async def unsubscribe(self, queue: str, *, tenant: str | None = None) -> None:
        """Deletes a durable subscription's queue."""
        channel = await self.connection.channel()
        try:
            await channel.queue_delete(self._queue_name(self._tenant(tenant), queue))
        finally:
            await channel.close()

    # ------------------------------------------------------------------ executions
    async def _ask(self, request: Message, routing_key: str, answer: type[A]) -> A:
        """Request/reply with the engine through `amq.rabbitmq.reply-to`."""
        async with self._lock:
            if self._rpc is None or self._rpc.is_closed:
                self._rpc = await self.connection.channel(publisher_confirms=True)
                queue = await self._rpc.get_queue(REPLY_TO, ensure=False)
                await queue.consume(self._on_reply, no_ack=True)
            rpc = self._rpc
        correlation_id = request.message_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._replies[correlation_id] = future
        try:
            message = to_amqp(request, user_id=self.user)
            message.reply_to = REPLY_TO
            message.correlation_id = correlation_id
            exchange = await rpc.get_exchange(topology.COMMANDS, ensure=False)
            try:
                await exchange.publish(message, routing_key=routing_key)
            except ChannelAccessRefused as exc:  # the broker closed the channel
                self._rpc = None
                raise Forbidden(f"account {self.user!r} may not ask that ({exc})") from None
            try:
                body = await asyncio.wait_for(future, self.timeout_s)
            except TimeoutError:
                raise Timeout(f"the engine did not answer within {self.timeout_s:g} s") from None
        finally:
            self._replies.pop(correlation_id, None)
        try:
            return answer.model_validate_json(body)
        except ValueError as exc:
            raise OrchestratorError(f"bad answer: {exc}", reason="bad_reply") from None

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        future = self._replies.get(message.correlation_id or "")
        if future is not None and not future.done():
            future.set_result(message.body)

    async def get_execution(self, execution_id: str, tenant: str | None = None) -> ExecutionView:
        """The execution as the engine has it (state, steps, attempts, timings, outputs);
        `found` false if there is none of that tenant (or it expired). An operator account
        may leave `tenant` out."""
        tenant = tenant or self.tenant
        query = ExecutionQuery(tenant=tenant, execution_id=execution_id)
        return await self._ask(
            query, topology.query_key(tenant or topology.NO_TENANT), ExecutionView
        )

    async def list_executions(
        self,
        tenant: str | None = None,
        *,
        flow: str | None = None,
        state: str | None = None,
        since: datetime | None = None,
        limit: int = 50,
    ) -> ExecutionPage:
        """Recent executions, newest first. An operator account may leave `tenant` out
        for every tenant's; a tenant account lists its own."""
        tenant = tenant or self.tenant
        query = ExecutionList.model_validate(
            {"tenant": tenant, "flow_id": flow, "state": state, "since": since, "limit": limit}
        )
        return await self._ask(
            query, topology.query_key(tenant or topology.NO_TENANT), ExecutionPage
        )

    async def cancel(
        self, execution_id: str, reason: str = "cancelled by request", tenant: str | None = None
    ) -> ExecutionView:
        """Cancels a running execution: no new step starts, steps in flight finish, completed
        steps are compensated (latest first), and it ends `cancelled`. Returns the execution
        right after the request was applied (`cancelling`, or already `cancelled` when
        nothing was in flight or to undo); an execution already ending or ended is left as
        it is (see its `status`). Raises UnknownExecution if there is none."""
        tenant = tenant or self.tenant
        request = ExecutionCancel(
            tenant=tenant, execution_id=execution_id, reason=reason, requested_by=self._name[:100]
        )
        key = topology.cancel_key(tenant or topology.NO_TENANT)
        view = await self._ask(request, key, ExecutionView)
        if not view.found:
            raise UnknownExecution(
                f"no execution {execution_id}" + (f" of tenant {tenant!r}" if tenant else "")
            )
        return view

    async def wait_for(
        self,
        execution_id: str,
        timeout: float,  # noqa: ASYNC109 - the API the contract names
        tenant: str | None = None,
    ) -> StatusEvent:
        """The execution's terminal status event. Subscribed first, then the engine is
        asked: an execution that ended before the call is answered from its record."""
        tenant = self._tenant(tenant)
        channel, declared = await self._subscription(f"{tenant}.*.execution.*", None, tenant)
        events = self._events(channel, declared)
        try:
            async with asyncio.timeout(timeout):
                view = await self.get_execution(execution_id, tenant)
                if view.outcome is not None:
                    return StatusEvent.model_validate(view.outcome)
                async for event in events:
                    _, state = event.entity_state
                    if event.subject == execution_id and state in TERMINAL_STATES:
                        return event
        except TimeoutError:
            raise Timeout(f"execution {execution_id} did not end within {timeout:g} s") from None
        finally:
            await events.aclose()
        raise OrchestratorError("the subscription ended", reason="closed")
