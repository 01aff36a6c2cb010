"""The engine's memory of the states it committed last is bounded by count and by size."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from orchestrator.engine import store as engine_store
from orchestrator.engine.store import ExecutionStore
from orchestrator.store import Keys


def _store() -> ExecutionStore:
    # A client that never connects: remembering states makes no Redis call.
    return ExecutionStore(aioredis.Redis(), Keys("unit:"), 60)


def test_states_beyond_the_byte_budget_push_out_the_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_store, "KNOWN_STATES_BYTES", 1000)
    executions = _store()
    for n in range(5):
        executions._know(f"e{n}", str(n) * 300)
    assert list(executions._known) == ["e2", "e3", "e4"]
    assert executions._known_bytes == 900


def test_the_count_is_bounded_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_store, "KNOWN_STATES", 2)
    executions = _store()
    for n in range(4):
        executions._know(f"e{n}", "x")
    assert list(executions._known) == ["e2", "e3"]


def test_a_big_state_is_not_remembered_and_forgetting_gives_its_room_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(engine_store, "KNOWN_STATE_MAX", 400)
    executions = _store()
    executions._know("small", "s" * 100)
    executions._know("big", "b" * 500)
    assert list(executions._known) == ["small"]
    executions._know("small", "t" * 200)  # a newer state replaces the older one
    assert executions._known_bytes == 200
    executions._know("small", None)
    assert executions._known == {}
    assert executions._known_bytes == 0
