"""What `orchestrator dlq` reads from a dead letter, and how it parses filters and targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from orchestrator import dlq


@dataclass
class Letter:
    body: bytes = b'{"tenant": "acme"}'
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = "m-1"
    type: str | None = "step.result"


def test_our_rejections_say_why_and_where_from() -> None:
    letter = dlq.describe(
        Letter(  # type: ignore[arg-type]
            headers={
                "orch-reason": "schema_violation",
                "orch-detail": "attempt: must be an integer",
                "orch-queue": "ingress.acme",
                "orch-rejected-at": "2026-12-01T10:00:00+00:00",
                "orch-replays": 2,
            }
        ),
        "ingress.acme.dlq",
    )
    assert (letter.reason, letter.queue, letter.tenant, letter.replays) == (
        "schema_violation",
        "ingress.acme",
        "acme",
        2,
    )
    assert letter.dead_since == datetime(2026, 12, 1, 10, tzinfo=UTC)


def test_the_brokers_dead_letters_are_read_from_x_death() -> None:
    when = datetime(2026, 12, 1, 9, tzinfo=UTC)
    letter = dlq.describe(
        Letter(  # type: ignore[arg-type]
            body=b"not json",
            headers={
                "x-death": [{"queue": "engine.results", "reason": "delivery_limit", "time": when}]
            },
        ),
        "engine.results.dlq",
    )
    assert (letter.reason, letter.queue, letter.tenant, letter.dead_since) == (
        "delivery_limit",
        "engine.results",
        None,
        when,
    )


def test_a_bare_letter_comes_from_the_queue_its_dlq_is_named_after() -> None:
    letter = dlq.describe(Letter(headers={}), "work.default.dlq")  # type: ignore[arg-type]
    assert (letter.reason, letter.queue, letter.tenant) == ("unknown", "work.default", "acme")


def test_filters() -> None:
    assert dlq.parse_filters(["reason=too_large", "tenant=acme"]) == {
        "reason": "too_large",
        "tenant": "acme",
    }
    with pytest.raises(dlq.DlqError, match="bad filter key 'colour'"):
        dlq.parse_filters(["colour=red"])
    with pytest.raises(dlq.DlqError, match="expected key=value"):
        dlq.parse_filters(["reason"])


def test_targets() -> None:
    assert dlq.Target.parse("original") == dlq.Target("", None)
    assert dlq.Target.parse("queue:work.default") == dlq.Target("", "work.default")
    assert dlq.Target.parse("orchestrator.commands:step.result") == dlq.Target(
        "orchestrator.commands", "step.result"
    )
    for bad in ("nowhere", ":key", "queue:"):
        with pytest.raises(dlq.DlqError, match="bad --to"):
            dlq.Target.parse(bad)
