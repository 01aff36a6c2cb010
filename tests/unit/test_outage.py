"""The outage tracker: one warning per outage, readiness, and when a process gives up."""

from __future__ import annotations

import pytest

from orchestrator.outage import OutageExceeded, Outages, dependency_of
from orchestrator.runtime import WITHOUT_KAFKA


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_outage_past_the_limit_ends_the_process_only_if_it_is_critical() -> None:
    clock = Clock()
    outages = Outages(clock)
    outages.failed("kafka", "down")
    outages.failed("kafka", "still down")  # the same outage, not a new one
    assert not outages.ready
    clock.now = 121.0
    outages.check(120.0, WITHOUT_KAFKA)  # a worker keeps going: it buffers usage
    with pytest.raises(OutageExceeded) as raised:
        outages.check(120.0)
    assert raised.value.dependency == "kafka"
    outages.failed("redis", "down")
    clock.now = 200.0
    outages.check(120.0, WITHOUT_KAFKA)  # redis away for 79 s: within the limit
    clock.now = 242.0
    with pytest.raises(OutageExceeded):
        outages.check(120.0, WITHOUT_KAFKA)
    outages.recovered_all()
    assert outages.ready
    outages.check(120.0)


def test_broker_failures_are_outages_and_bugs_are_not() -> None:
    import redis.exceptions

    assert dependency_of(redis.exceptions.ConnectionError()) == "redis"
    assert dependency_of(redis.exceptions.ResponseError("WRONGTYPE")) is None
    assert dependency_of(ConnectionResetError()) == "network"
    assert dependency_of(KeyError("x")) is None


async def test_a_reconnecting_amqp_connection_is_an_outage_not_a_bug() -> None:
    """aio-pika raises RuntimeError for a robust connection that is reconnecting; a dispatcher
    that took it for a bug exited (code 1) during RabbitMQ restarts."""
    import aio_pika

    connection = aio_pika.RobustConnection(aio_pika.connection.make_url("amqp://127.0.0.1:1/"))
    with pytest.raises(RuntimeError) as raised:
        await connection.channel().__aenter__()
    assert dependency_of(raised.value) == "rabbitmq"
    assert dependency_of(RuntimeError("ours")) is None
