"""Configuration comes from ORCH_* variables; a bad one stops the process, naming the variable."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from orchestrator.cli import ExitCode, app
from orchestrator.config import ConfigError, load_settings


def test_defaults_point_at_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ORCH_RABBITMQ_URL", "ORCH_KAFKA_BOOTSTRAP", "ORCH_REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.rabbitmq_url.host == "localhost"
    assert settings.kafka_servers == ["localhost:9092"]
    assert settings.redis_url.host == "localhost"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_KAFKA_BOOTSTRAP", "k1:9092, k2:9093")
    assert load_settings().kafka_servers == ["k1:9092", "k2:9093"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ORCH_REDIS_URL", "not-a-url"),
        ("ORCH_RABBITMQ_URL", "http://wrong-scheme"),
        ("ORCH_KAFKA_BOOTSTRAP", "no-port"),
        ("ORCH_LOG_LEVEL", "LOUD"),
        ("ORCH_METRICS_PORT", "-1"),
    ],
)
def test_invalid_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_cli_exits_with_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_REDIS_URL", "nope")
    result = CliRunner().invoke(app, ["check"])
    assert result.exit_code == ExitCode.CONFIG
    assert "ORCH_REDIS_URL" in result.output
