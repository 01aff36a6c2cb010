"""Every process answers /healthz, /readyz and Prometheus /metrics (ORCH_METRICS_PORT), with
the metric names docs/operations.md documents; /readyz turns 503 while a broker is away and
200 again after (shown for every process through a cut Redis connection)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from aio_pika.abc import AbstractChannel

from orchestrator import topology
from orchestrator.config import Settings
from orchestrator.testing import process_env, wait_until
from tests.faults import TcpProxy
from tests.integration.helpers import fresh_settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

ROOT = Path(__file__).resolve().parents[2]
# A process type, its arguments, and metrics of its own it must expose from the start.
PROCESSES: dict[str, tuple[list[str], list[str]]] = {
    "scheduler": (["scheduler"], ["orchestrator_ticks_total", "orchestrator_flow_starts_total"]),
    "engine": (["engine"], ["orchestrator_executions_total"]),
    "dispatcher": (["dispatcher"], ["orchestrator_dispatcher_leading"]),
    "worker": (["worker", "--concurrency", "2"], ["orchestrator_usage_events_buffered"]),
    "violations": (
        ["violations", "--policy", str(ROOT / "examples" / "policy.yaml")],
        ["orchestrator_usage_events_total"],
    ),
    "dashboard": (["dashboard"], ["orchestrator_dlq_messages"]),
}
COMMON = ["orchestrator_outage_active", "orchestrator_messages_rejected_total"]


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=3)
    except httpx.HTTPError:  # not listening (yet, or any more)
        return 0, ""
    return response.status_code, response.text


async def _until(port: int, path: str, status: int, wait_s: float = 60, name: str = "") -> str:
    async def answered() -> tuple[str] | None:
        code, body = await asyncio.to_thread(_get, port, path)
        return (body,) if code == status else None

    (body,) = await wait_until(
        answered, timeout_s=wait_s, every_s=0.3, what=f"{name} {path} answering {status}"
    )
    return body


def _tail(log: Any) -> str:
    log.seek(0)
    return repr(log.read()[-3000:])


def _documented() -> set[str]:
    text = (ROOT / "docs" / "operations.md").read_text()
    return {
        word.strip("`") for word in text.split() if word.strip("`|").startswith("orchestrator_")
    }


async def test_every_process_answers_health_ready_and_metrics(
    settings: Settings, channel: AbstractChannel
) -> None:
    test_settings = fresh_settings(settings)
    await topology.apply(channel)  # as `orchestrator up` or `accounts provision` do first
    documented = _documented()
    host = test_settings.redis_url.host or "127.0.0.1"
    async with TcpProxy(host, test_settings.redis_url.port or 6379) as proxy:
        redis_url = f"redis://127.0.0.1:{proxy.port}/0"
        ports = {name: _port() for name in PROCESSES}
        processes: dict[str, subprocess.Popen[bytes]] = {}
        logs: dict[str, Any] = {}
        try:
            for name, (command, _) in PROCESSES.items():
                args = [*command, "--port", str(_port())] if name == "dashboard" else command
                extra = {"ORCH_METRICS_PORT": str(ports[name]), "ORCH_REDIS_URL": redis_url}
                logs[name] = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
                processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "orchestrator", *args],
                    env=process_env(test_settings, **extra),
                    stdout=subprocess.DEVNULL,
                    stderr=logs[name],
                )
            for name, (_, own) in PROCESSES.items():
                port = ports[name]
                try:
                    healthy = await _until(port, "/healthz", 200, name=name)
                except TimeoutError:
                    raise AssertionError(f"{name}: {_tail(logs[name])}") from None
                assert json.loads(healthy) == {"status": "ok"}
                ready: dict[str, Any] = json.loads(await _until(port, "/readyz", 200, name=name))
                assert ready["ready"] is True, name
                _, metrics = await asyncio.to_thread(_get, port, "/metrics")
                for metric in [*own, *COMMON]:
                    assert metric in metrics, f"{name} lacks {metric}"
                    assert metric in documented, f"{metric} is not in docs/operations.md"
            proxy.cut()  # Redis away: every process says it is not ready, and stays up
            for name in PROCESSES:
                answer = json.loads(await _until(ports[name], "/readyz", 503, name=name))
                assert "redis" in answer["failing"], (name, answer)
            proxy.restore()
            for name in PROCESSES:
                await _until(ports[name], "/readyz", 200)
                assert processes[name].poll() is None, name
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=40)
                except subprocess.TimeoutExpired:
                    process.kill()
            for log in logs.values():
                log.close()
