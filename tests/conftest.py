"""Real brokers for the tests: RabbitMQ, Kafka and Redis.

Where the brokers come from, in order:
1. `ORCH_*` URLs in the environment (what `scripts/infra env` prints, and what CI sets);
2. testcontainers, when a Docker engine answers;
3. nothing: integration tests are skipped, except with CI=true, where that is an error.

Each test session gets its own RabbitMQ virtual host and Redis key prefix, so runs never see
each other's queues or keys; Kafka tests use topics with unique names.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import subprocess
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import pytest_asyncio
import redis
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiokafka.admin import AIOKafkaAdminClient

from orchestrator import topology
from orchestrator.accounts import Management, ManagementError
from orchestrator.amqp import connect, open_channel
from orchestrator.config import Settings

T = TypeVar("T")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Every status event built in the tests (and in the processes they start, which inherit the
# environment) is checked against its published data schema (schemas/status_data.py).
os.environ.setdefault("ORCH_CONTRACT_CHECKS", "1")


@dataclass(frozen=True)
class BrokerUrls:
    rabbitmq: str
    management: str
    kafka: str
    redis: str


def _docker_engine() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, check=False).returncode == 0


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"broker unavailable in CI (CI=true makes this an error): {reason}")
    pytest.skip(f"no brokers: {reason} (run `scripts/infra up` and export `scripts/infra env`)")


@pytest.fixture(scope="session")
def broker_urls() -> Iterator[BrokerUrls]:
    if os.environ.get("ORCH_RABBITMQ_URL"):
        yield BrokerUrls(
            rabbitmq=os.environ["ORCH_RABBITMQ_URL"],
            management=os.environ.get(
                "ORCH_RABBITMQ_MANAGEMENT_URL", "http://guest:guest@127.0.0.1:15672/"
            ),
            kafka=os.environ.get("ORCH_KAFKA_BOOTSTRAP", "127.0.0.1:9092"),
            redis=os.environ.get("ORCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        )
        return
    if not _docker_engine():
        _unavailable("ORCH_RABBITMQ_URL is not set and no Docker engine answers")
    from testcontainers.kafka import KafkaContainer
    from testcontainers.rabbitmq import RabbitMqContainer
    from testcontainers.redis import RedisContainer

    with (
        RabbitMqContainer("rabbitmq:3.13-management").with_exposed_ports(15672) as rabbit,
        KafkaContainer("confluentinc/cp-kafka:7.9.0").with_kraft() as kafka,
        RedisContainer("redis:7") as redis_container,
    ):
        host = rabbit.get_container_host_ip()
        yield BrokerUrls(
            rabbitmq=f"amqp://guest:guest@{host}:{rabbit.get_exposed_port(5672)}/",
            management=f"http://guest:guest@{host}:{rabbit.get_exposed_port(15672)}/",
            kafka=kafka.get_bootstrap_server(),
            redis=f"redis://{redis_container.get_container_host_ip()}:"
            f"{redis_container.get_exposed_port(6379)}/0",
        )


@pytest.fixture(scope="session")
def management(broker_urls: BrokerUrls) -> Iterator[Management]:
    with Management(broker_urls.management) as client:
        yield client


@pytest.fixture(scope="session")
def vhost(broker_urls: BrokerUrls, management: Management) -> Iterator[str]:
    name = f"test-{uuid.uuid4().hex[:10]}"
    quoted = urllib.parse.quote(name, safe="")
    try:
        management.call("PUT", f"/vhosts/{quoted}", {})
    except ManagementError as exc:
        _unavailable(f"RabbitMQ management API at {management.base}: {exc}")
    user = urllib.parse.urlsplit(broker_urls.rabbitmq).username or "guest"
    management.call(
        "PUT", f"/permissions/{quoted}/{user}", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    yield name
    management.call("DELETE", f"/vhosts/{quoted}")
    users = management.call("GET", "/users")
    for found in users if isinstance(users, list) else []:
        if str(found.get("name", "")).startswith(f"{name}."):
            management.call("DELETE", f"/users/{urllib.parse.quote(found['name'], safe='')}")


@pytest.fixture(scope="session")
def settings(broker_urls: BrokerUrls, vhost: str) -> Iterator[Settings]:
    """The session's settings; at its end the Redis keys under its prefix and the Kafka
    topics its tests created (`test.*`, `test-*`) are removed (the vhost goes with `vhost`)."""
    base = broker_urls.rabbitmq.rstrip("/")
    if base.count("/") > 2:  # drop a vhost in the given URL: this session has its own
        base = base.rsplit("/", 1)[0]
    session = Settings(
        rabbitmq_url=f"{base}/{vhost}",  # type: ignore[arg-type]
        rabbitmq_management_url=broker_urls.management,
        kafka_bootstrap=broker_urls.kafka,
        redis_url=broker_urls.redis,  # type: ignore[arg-type]
        redis_prefix=f"test:{vhost}:",
        # Accounts this session provisions are its own; deleted at its end.
        account_prefix=f"{vhost}.",
        # Tests publish flow starts unsigned unless they test authentication.
        require_auth=False,
    )
    before = _in_thread(_topics(session))
    yield session
    after = _in_thread(_topics(session))
    created = sorted(t for t in after - before if t.startswith(("test.", "test-")))
    _in_thread(_delete_topics(session, created))
    client = redis.Redis.from_url(str(session.redis_url))
    try:
        for key in client.scan_iter(match=f"{session.redis_prefix}*", count=1000):
            client.unlink(key)
    except redis.RedisError:
        pass  # a broker a test left stopped: nothing to clean there
    finally:
        client.close()


def _in_thread(work: Coroutine[Any, Any, T]) -> T:
    """Runs `work` on a loop of its own (the session's loop may be mid-teardown)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, work).result()


async def _topics(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
    try:
        await admin.start()
        return set(await admin.list_topics())
    except Exception:  # Kafka away (a chaos test stopped it): nothing listed, nothing removed
        return set()
    finally:
        await admin.close()


async def _delete_topics(settings: Settings, topics: list[str]) -> None:
    if not topics:
        return
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_servers)
    try:
        await admin.start()
        await admin.delete_topics(topics)
    except Exception:  # best effort: left over, not wrong
        pass
    finally:
        await admin.close()


@pytest_asyncio.fixture(loop_scope="session")
async def redis_client(settings: Settings) -> AsyncIterator[object]:
    import redis.asyncio as aioredis

    client = aioredis.from_url(str(settings.redis_url), decode_responses=True)
    try:
        await client.ping()
    except OSError as exc:
        _unavailable(f"Redis at {settings.redis_url}: {exc}")
    yield client
    async for key in client.scan_iter(match=f"{settings.redis_prefix}*"):
        await client.delete(key)
    await client.aclose()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        default=False,
        help="run the soak versions of the chaos and fuzz suites (minutes, not seconds)",
    )


@pytest.fixture(scope="session")
def long_run(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--long"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(part in str(item.fspath) for part in ("/integration/", "/e2e/", "/chaos/")):
            item.add_marker(pytest.mark.integration)


@pytest_asyncio.fixture(loop_scope="session")
async def amqp(settings: Settings) -> AsyncIterator[AbstractRobustConnection]:
    connection = await connect(settings, "tests")
    async with connection:
        yield connection


@pytest_asyncio.fixture(loop_scope="session")
async def channel(amqp: AbstractRobustConnection) -> AsyncIterator[AbstractChannel]:
    channel = await open_channel(amqp)
    await topology.apply(channel)
    yield channel
    if not channel.is_closed:
        await channel.close()
