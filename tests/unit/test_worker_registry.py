"""The worker registry's entry is a contract between workers and its readers."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from orchestrator.store.workers import WorkerEntry


def test_an_entry_round_trips_and_counts_its_step_threads() -> None:
    entry = WorkerEntry(
        id="w1",
        host="h",
        pool="default",
        steps=["demo.echo"],
        concurrency=8,
        threads=10,
        in_flight=3,
        last_heartbeat=datetime(2026, 12, 2, tzinfo=UTC),
    )
    assert WorkerEntry.model_validate_json(entry.model_dump_json()) == entry
    assert entry.step_threads == 10


def test_an_entry_of_an_older_worker_is_read_with_defaults() -> None:
    old = {
        "id": "w0",
        "host": "h",
        "pool": "default",
        "steps": [],
        "concurrency": 4,
        "in_flight": 1,
        "last_heartbeat": "2026-12-01T00:00:00+00:00",
        "extra": "ignored",
    }
    entry = WorkerEntry.model_validate_json(json.dumps(old))
    assert entry.cpus == 1
    assert entry.step_threads == 4
