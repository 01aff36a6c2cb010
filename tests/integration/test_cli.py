"""The `orchestrator` command against the real brokers, as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys

from orchestrator.config import Settings


def _run(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "ORCH_RABBITMQ_URL": str(settings.rabbitmq_url),
        "ORCH_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "ORCH_REDIS_URL": str(settings.redis_url),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )


def test_check_reports_all_three_brokers_up(settings: Settings) -> None:
    result = _run(settings, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    for broker in ("rabbitmq", "redis", "kafka"):
        assert broker in result.stdout


def test_check_fails_when_a_broker_is_unreachable(settings: Settings) -> None:
    result = _run(settings, "check", ORCH_REDIS_URL="redis://127.0.0.1:1/0")
    assert result.returncode == 1
    assert "down" in result.stdout


def test_topology_apply_and_up(settings: Settings) -> None:
    applied = _run(settings, "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "queue    engine.executions" in applied.stdout
    assert (
        "binding  orchestrator.dlx --engine.executions--> engine.executions.dlq" in applied.stdout
    )
    up = _run(settings, "up")
    assert up.returncode == 0, up.stderr
    assert "orchestrator is up" in up.stdout
