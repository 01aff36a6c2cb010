"""The `orchestrator` command against the real brokers, as an operator runs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from orchestrator.config import Settings
from orchestrator.testing import process_env


def _run(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = process_env(settings, **env)
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


def test_topology_apply_and_up(settings: Settings, tmp_path: Path) -> None:
    applied = _run(settings, "topology", "apply")
    assert applied.returncode == 0, applied.stderr
    assert "queue    engine.executions" in applied.stdout
    assert (
        "binding  orchestrator.dlx --engine.executions--> engine.executions.dlq" in applied.stdout
    )
    up = _run(settings, "up", "--check-only", "--accounts", str(tmp_path / "accounts"))
    assert up.returncode == 0, up.stderr
    assert "orchestrator is up" in up.stdout
    # up provisions the service accounts its processes run with
    for role in ("scheduler", "engine", "dispatcher", "worker", "violations", "operator"):
        assert (tmp_path / "accounts" / f"{role}.env").exists(), role


def test_flows_apply_validates_everything_before_writing(
    settings: Settings, tmp_path: Path
) -> None:
    prefix = f"{settings.redis_prefix}cli-{uuid.uuid4().hex[:6]}:"
    good = tmp_path / "good.yaml"
    good.write_text(
        "tenant: acme\nid: nightly\ncron: '0 3 * * *'\ntimezone: Europe/Berlin\n"
        "steps:\n  - {id: a, type: demo.echo}\n"
    )
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "flows": [
                    {
                        "tenant": "acme",
                        "id": "broken",
                        "cron": "61 * * * *",
                        "steps": [{"id": "a", "type": "demo.echo"}],
                    },
                ]
            }
        )
    )
    refused = _run(settings, "flows", "apply", str(good), str(bad), ORCH_REDIS_PREFIX=prefix)
    assert refused.returncode == 2
    assert "bad.json: flow acme/broken: cron:" in refused.stderr
    assert "nothing was applied" in refused.stderr
    listed = _run(settings, "flows", "list", ORCH_REDIS_PREFIX=prefix)
    assert "acme/nightly" not in listed.stdout  # all or nothing

    applied = _run(settings, "flows", "apply", str(good), ORCH_REDIS_PREFIX=prefix)
    assert applied.returncode == 0, applied.stderr
    assert "acme/nightly: created" in applied.stdout
    again = _run(settings, "flows", "apply", str(good), ORCH_REDIS_PREFIX=prefix)
    assert "acme/nightly: unchanged" in again.stdout

    shown = _run(settings, "flows", "show", "acme/nightly", ORCH_REDIS_PREFIX=prefix)
    document = json.loads(shown.stdout)
    assert document["definition"]["timezone"] == "Europe/Berlin"
    assert document["next_fire"] is not None
    assert (
        _run(settings, "flows", "pause", "acme/nightly", ORCH_REDIS_PREFIX=prefix).returncode == 0
    )
    shown = _run(settings, "flows", "show", "acme/nightly", ORCH_REDIS_PREFIX=prefix)
    assert json.loads(shown.stdout)["definition"]["paused"] is True
    missing = _run(settings, "flows", "show", "acme/nope", ORCH_REDIS_PREFIX=prefix)
    assert missing.returncode == 1
    assert "no flow acme/nope" in missing.stderr
    usage = _run(settings, "flows", "show", "no-slash", ORCH_REDIS_PREFIX=prefix)
    assert usage.returncode == 2
    trigger = _run(
        settings, "flows", "trigger", "acme/nightly", "--input", "[1]", ORCH_REDIS_PREFIX=prefix
    )
    assert trigger.returncode == 2
    assert "invalid trigger" in trigger.stderr
    deleted = _run(settings, "flows", "delete", "acme/nightly", ORCH_REDIS_PREFIX=prefix)
    assert deleted.returncode == 0
    assert "acme/nightly" not in _run(settings, "flows", "list", ORCH_REDIS_PREFIX=prefix).stdout


def test_violations_check_validates_the_policy_file(settings: Settings, tmp_path: Path) -> None:
    good = _run(settings, "violations", "--policy", "examples/policy.yaml", "--check")
    assert good.returncode == 0, good.stderr
    assert "3 plans" in good.stdout
    bad = tmp_path / "policy.yaml"
    bad.write_text("default_plan: gold\nplans:\n  std:\n    ladder: []\n")
    result = _run(settings, "violations", "--policy", str(bad), "--check")
    assert result.returncode == 2
    assert f"{bad}: plans.std.ladder" in result.stderr


def test_dashboard_on_a_port_in_use_says_so_and_exits_1(settings: Settings) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run(settings, "dashboard", "--port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"the dashboard cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr
