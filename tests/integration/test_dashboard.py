"""The dashboard in a real headless browser (Debian's chromium, driven by Selenium) against a
running system: the page shows the tenants' weights and states, the executions and their
steps, and the DLQ depths the APIs report, and it updates without a reload."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aio_pika import Message
from aio_pika.abc import AbstractChannel

from orchestrator import topology
from orchestrator.accounts import Management, vhost_of
from orchestrator.amqp import connect
from orchestrator.client import OrchestratorClient
from orchestrator.config import Settings
from orchestrator.dashboard import serve_dashboard
from orchestrator.operator import Operator
from orchestrator.overview import gather
from orchestrator.testing import wait_for_consumers, wait_until
from tests.conftest import IN_CI
from tests.integration.helpers import fresh_settings, purged, reset_queues
from tests.integration.system import System, running_system

pytestmark = pytest.mark.asyncio(loop_scope="session")

FLOW = {
    "tenant": "dash",
    "id": "chain",
    "overlap": "allow",
    "steps": [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.sleep", "depends_on": ["a"], "input": {"ms": 50}},
    ],
}


def _browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        message = "chromium and chromedriver are needed (Debian: chromium chromium-driver)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture
def browser() -> Iterator[Any]:
    driver = _browser()
    try:
        yield driver
    finally:
        driver.quit()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.asynccontextmanager
async def dashboard(system: System) -> AsyncIterator[str]:
    port = _free_port()
    stop = asyncio.Event()
    connection = await connect(system.settings, "tests-dashboard")
    task = asyncio.create_task(
        serve_dashboard(system.settings, system.redis, connection, stop, port=port)
    )
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop.set()
        await task
        await connection.close()


async def _eventually(check: Callable[[], Any], wait_s: float = 30.0) -> Any:
    """Polls a blocking browser check (in a thread, so the dashboard keeps serving) until it
    answers something true; its last answer if it never does (for the caller's assert)."""
    last: Any = None

    def attempt() -> Any:
        nonlocal last
        try:
            last = check()
        except Exception:
            last = None
        return last

    with contextlib.suppress(TimeoutError):
        return await wait_until(
            lambda: asyncio.to_thread(attempt), timeout_s=wait_s, every_s=0.3, what="the page"
        )
    return last


def _text(browser: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    return str(browser.find_element(By.CSS_SELECTOR, selector).text)


async def test_the_page_shows_what_the_apis_report_and_updates_live(
    settings: Settings, channel: AbstractChannel, browser: Any
) -> None:
    from selenium.webdriver.common.by import By

    test_settings = fresh_settings(settings)
    await reset_queues(channel, "dash")
    dlq = await purged(channel, topology.EXECUTIONS_QUEUE + topology.DLQ_SUFFIX)
    async with running_system(test_settings) as system:
        await system.apply(FLOW)
        async with (
            Operator(test_settings) as operator,
            OrchestratorClient(str(test_settings.rabbitmq_url)) as client,
            dashboard(system) as url,
        ):
            await operator.set_weight("dash", 4)
            await wait_for_consumers(system.connection, topology.ingress_queue_name("dash"))
            execution_id = await client.start_flow("dash", "chain")
            await client.wait_for(execution_id, timeout=30, tenant="dash")
            await channel.default_exchange.publish(
                Message(b"{broken", content_type="application/json"),
                routing_key=topology.EXECUTIONS_QUEUE,
            )

            await asyncio.to_thread(browser.get, url)
            # Tenants: the weight and state the API reports.
            row = "#tenants tr[data-tenant='dash']"
            assert await _eventually(lambda: _text(browser, f"{row} [data-field='weight']"))
            api = await gather(test_settings, system.redis)
            dash = next(t for t in api.tenants if t.tenant == "dash")
            assert _text(browser, f"{row} [data-field='weight']") == f"{dash.weight:g}"
            assert _text(browser, f"{row} [data-field='state']").startswith(dash.state)
            share = f"{round(dash.weight_share * 100)}%"
            assert await _eventually(
                lambda: _text(browser, f"{row} [data-field='weight_share']") == share
            ), (share, _text(browser, f"{row} [data-field='weight_share']"))

            # Executions: the one we ran, in the state the engine reports, and its steps.
            view = await client.get_execution(execution_id, "dash")
            cell = f"#executions tr[data-execution='{execution_id}'] [data-field='status']"
            assert await _eventually(lambda: _text(browser, cell)) == view.status
            await asyncio.to_thread(
                browser.find_element(By.CSS_SELECTOR, f"tr[data-execution='{execution_id}']").click
            )
            for step, state in view.steps.items():
                selector = f"#steps tr[data-step='{step}'] [data-field='status']"
                assert await _eventually(lambda s=selector: _text(browser, s)) == state.status

            # DLQs: the broker's depth, and a new dead letter shows without a reload.
            name = dlq.name
            depth_cell = f"#dlqs tr[data-queue='{name}'] [data-field='depth']"

            def depth() -> int:
                return int(_text(browser, depth_cell))

            assert await _eventually(lambda: depth() == 1)
            with Management(test_settings.rabbitmq_management_url) as management:
                assert management.queue_depths(vhost_of(str(test_settings.rabbitmq_url)))[name] == 1
            updated = browser.find_element(By.TAG_NAME, "body").get_attribute("data-updated")
            await channel.default_exchange.publish(
                Message(f"{{also broken {uuid.uuid4()}".encode(), content_type="application/json"),
                routing_key=topology.EXECUTIONS_QUEUE,
            )
            assert await _eventually(lambda: depth() == 2), "the page did not update"
            later = browser.find_element(By.TAG_NAME, "body").get_attribute("data-updated")
            assert later != updated
            assert browser.find_element(By.ID, "live").get_attribute("data-live") == "on"
    await dlq.purge()
