"""The declared topology keeps the invariants: quorum, dead letters, delivery limits, routes."""

from __future__ import annotations

import pytest

from orchestrator import topology
from schemas import MESSAGES, ExecutionPage, ExecutionView, UsageEvent


def test_every_consuming_queue_is_quorum_with_dlq_and_delivery_limit() -> None:
    queues = {queue.name: queue for queue in topology.TOPOLOGY.queues}
    dlq_bindings = {
        (b.queue, b.routing_key)
        for b in topology.TOPOLOGY.bindings
        if b.exchange == topology.DEAD_LETTERS
    }
    consuming = [q for q in queues.values() if q.dead_letter]
    assert consuming
    for queue in consuming:
        args = queue.arguments()
        assert args["x-queue-type"] == "quorum"
        assert args["x-dead-letter-exchange"] == topology.DEAD_LETTERS
        assert args["x-delivery-limit"] == topology.DELIVERY_LIMIT
        assert queue.dlq in queues
        assert (queue.dlq, queue.name) in dlq_bindings


def test_tenant_queue_pushes_back_on_floods() -> None:
    args = topology.tenant_queue("acme").arguments()
    assert args["x-max-length"] == topology.TENANT_QUEUE_MAX_LENGTH
    assert args["x-overflow"] == "reject-publish"
    assert args["x-dead-letter-routing-key"] == "fq.acme"


def test_every_amqp_message_has_a_route_to_a_declared_exchange() -> None:
    exchanges = {e.name for e in topology.TOPOLOGY.exchanges}
    # Usage is Kafka; views and pages are replies, sent to the asker's reply_to.
    amqp_messages = {
        m for m in MESSAGES.values() if m not in (UsageEvent, ExecutionView, ExecutionPage)
    }
    assert set(topology.ROUTES) == amqp_messages
    for route in topology.ROUTES.values():
        assert route.exchange in exchanges


def test_every_binding_targets_a_declared_queue_and_exchange() -> None:
    queues = {q.name for q in topology.TOPOLOGY.queues}
    exchanges = {e.name for e in topology.TOPOLOGY.exchanges}
    for binding in topology.TOPOLOGY.bindings:
        assert binding.queue in queues
        assert binding.exchange in exchanges


def test_soft_state_queues_are_bounded_without_refusing_publishes() -> None:
    """Dispatcher completions: nobody reads them while no dispatcher leads, so they must not
    grow without bound, and a full queue must not fail the workers' result publishes."""
    args = topology.TOPOLOGY.queue(topology.COMPLETIONS_QUEUE).arguments()
    assert args["x-max-length"] == topology.COMPLETIONS_MAX_LENGTH
    assert args["x-overflow"] == "drop-head"
    assert args["x-message-ttl"] > 0
    assert "x-dead-letter-exchange" not in args


def test_dead_lettering_queues_refuse_to_drop_messages() -> None:
    with pytest.raises(ValueError, match="reject-publish"):
        topology.Queue("q", "", consumer="c", max_length=10, overflow="drop-head")
