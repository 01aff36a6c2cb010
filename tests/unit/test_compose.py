"""compose.yaml is a valid Compose file and a deployment: one service per process type,
replicas where they take over from each other, service accounts, health checks on /readyz."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft7Validator, Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "tests" / "data" / "compose-spec.json"
ROLES = ("scheduler", "engine", "dispatcher", "worker", "violations")


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator_class = (
        Draft202012Validator if "2020-12" in str(schema.get("$schema")) else Draft7Validator
    )
    errors = sorted(validator_class(schema).iter_errors(_compose()), key=lambda e: e.path)
    assert errors == [], [f"{list(e.path)}: {e.message}" for e in errors]


def test_the_schema_refuses_what_compose_refuses() -> None:
    """The check can fail: a misspelt key and a wrong type are errors."""
    schema = json.loads(SCHEMA.read_text())
    validator = Draft202012Validator(schema)
    broken = _compose()
    broken["services"]["engine"]["replicas_typo"] = 2
    broken["services"]["worker"]["deploy"] = {"replicas": [2]}
    assert len(list(validator.iter_errors(broken))) >= 2


def test_every_process_runs_as_its_own_service_with_its_account_and_readiness() -> None:
    services = _compose()["services"]
    for role in ROLES:
        service = services[role]
        command = " ".join(service["entrypoint"])
        assert f"/accounts/{role}.env" in command, role  # its own least-privilege account
        assert f"exec orchestrator {role}" in command, role
        assert "/readyz" in " ".join(service["healthcheck"]["test"]), role
        assert service["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    for role in ("scheduler", "engine", "dispatcher", "worker", "violations"):
        assert services[role]["deploy"]["replicas"] >= 2, role
    assert "/readyz" in " ".join(services["dashboard"]["healthcheck"]["test"])
    assert services["provision"]["command"][:2] == ["accounts", "provision"]
