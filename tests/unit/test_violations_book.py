"""The violations consumer's bookkeeping, over plain dicts: windows, ticks, replays, expiry."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from orchestrator.violations.book import Book
from orchestrator.violations.policy import PolicyFile
from schemas import UsageEvent
from tests.factories import cpu_usage

WINDOW = 10
T0 = 1_800_000_000  # a window start (multiple of 10)

POLICY = PolicyFile.model_validate(
    {
        "window_s": WINDOW,
        "lookback_s": 600,
        "default_plan": "standard",
        "plans": {
            "standard": {
                "limits": {"max_cpu_share": 0.5, "min_cpu_s": 5},
                "ladder": [
                    {"action": "penalty", "minutes": 1, "weight_factor": 0.5},
                    {"action": "quarantine", "minutes": 2},
                ],
            }
        },
    }
)


def event(tenant: str, at: float, cpu: float, n: int, flow: str = "f") -> UsageEvent:
    return cpu_usage(tenant, cpu, n, finished=datetime.fromtimestamp(at, UTC), flow=flow)


def book(
    tables: dict[str, dict[str, Any]] | None = None, policy: PolicyFile = POLICY
) -> tuple[Book, dict[str, Any]]:
    tables = tables if tables is not None else {n: {} for n in ("w", "t", "c", "o", "a")}
    return (
        Book(
            policy,
            windows=tables["w"],
            totals=tables["t"],
            cursors=tables["c"],
            offences=tables["o"],
            active=tables["a"],
            grace_s=1.0,
        ),
        tables,
    )


def feed(b: Book, events: list[UsageEvent], first_offset: int = 0) -> list[str]:
    return [
        b.add(
            e,
            partition=0,
            offset=first_offset + i,
            appended_ms=int(e.finished_at.timestamp() * 1000),
        )
        for i, e in enumerate(events)
    ]


def noisy_window(start: int, offset: int = 0) -> list[UsageEvent]:
    """'noisy' uses 8 of 10 CPU seconds; 'quiet' 2."""
    return [event("noisy", start + 1 + i, 1.0, offset + i) for i in range(8)] + [
        event("quiet", start + 1 + i, 1.0, offset + 100 + i) for i in range(2)
    ]


def test_a_tick_closes_a_window_only_after_its_end_plus_grace() -> None:
    b, _ = book()
    feed(b, noisy_window(T0))
    assert b.due(0, (T0 + WINDOW) * 1000) == []
    assert b.due(0, (T0 + WINDOW + 1) * 1000) == []  # grace not yet passed
    (window,) = b.due(0, (T0 + WINDOW + 1) * 1000 + 1)
    assert (window.start, window.tenants) == (T0, ("noisy", "quiet"))


def test_over_share_tenant_is_penalised_then_quarantined_and_small_ones_not() -> None:
    b, _ = book()
    actions = []
    for k in range(3):
        start = T0 + k * WINDOW
        feed(b, noisy_window(start, offset=k * 1000), first_offset=k * 1000)
        (window,) = b.due(0, (start + WINDOW + 2) * 1000)
        decisions = b.decide(window, {})
        assert [d.tenant for d in decisions] == ["noisy"]  # quiet: 20 % share, under the floor
        b.closed(window, decisions)
        actions.append(decisions[0].action)
    assert actions == ["penalty", "quarantine", "quarantine"]


def test_a_small_tenant_with_a_big_share_of_little_is_left_alone() -> None:
    b, _ = book()
    feed(b, [event("tiny", T0 + 1, 0.5, 1), event("tiny", T0 + 2, 0.5, 2)])
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    assert b.decide(window, {}) == []  # 100 % share of 1 CPU second: under min_cpu_s


def test_replayed_and_late_records_count_once_or_not_at_all() -> None:
    b, tables = book()
    events = noisy_window(T0)
    assert set(feed(b, events)) == {"counted"}
    assert set(feed(b, events)) == {"replayed"}
    late = event("noisy", T0 + 5, 1.0, 999)
    assert b.add(late, partition=0, offset=50, appended_ms=(T0 + WINDOW + 2) * 1000) == "late"
    assert tables["w"][f"noisy|{T0}"]["stats"]["cpu_s"] == 8.0
    assert tables["t"][f"0|{T0}"]["stats"]["cpu_s"] == 10.0


def test_a_restart_mid_window_reaches_the_same_decision() -> None:
    """Tables restored from the changelog (ahead of the committed offset) plus a replay from
    the committed offset: the same figures, the same command id."""
    events = noisy_window(T0)
    b, tables = book()
    feed(b, events[:6])
    restored = copy.deepcopy(tables)  # what the changelog held at the kill
    feed(b, events[6:], first_offset=6)
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    uninterrupted = b.decide(window, {})

    again, _ = book(restored)
    feed(again, events[3:], first_offset=3)  # offsets 3.. were not committed yet
    (window,) = again.due(0, (T0 + WINDOW + 2) * 1000)
    replayed = again.decide(window, {})
    assert [d.command_id for d in replayed] == [d.command_id for d in uninterrupted]
    assert replayed[0].measured == uninterrupted[0].measured


def test_a_decided_window_stays_decided() -> None:
    b, _ = book()
    events = noisy_window(T0)
    feed(b, events)
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    b.closed(window, b.decide(window, {}))
    assert set(feed(b, events)) == {"closed"}  # replayed after the close: ignored
    assert b.due(0, (T0 + WINDOW + 5) * 1000) == []


def test_a_punishment_expires_once() -> None:
    b, _ = book()
    feed(b, noisy_window(T0))
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    (decision,) = b.decide(window, {})
    b.closed(window, [decision])
    assert decision.expires_at == T0 + WINDOW + 60
    assert b.expired(0, (T0 + WINDOW + 59) * 1000) == []
    (gone,) = b.expired(0, (T0 + WINDOW + 60) * 1000)
    assert (gone.tenant, gone.kind, gone.command_id) == ("noisy", "penalty", decision.command_id)
    b.released(gone)
    assert b.expired(0, (T0 + WINDOW + 61) * 1000) == []


def test_a_flow_that_keeps_outrunning_its_interval_is_quarantined_alone() -> None:
    policy = PolicyFile.model_validate(
        {
            "window_s": 60,
            "default_plan": "p",
            "plans": {
                "p": {
                    "limits": {"max_runtime_ratio": 1.0, "min_runtime_executions": 2},
                    "ladder": [{"action": "quarantine", "minutes": 5}],
                }
            },
        }
    )
    b, _ = book(policy=policy)
    start = T0 // 60 * 60 + 60
    # Two executions of "slow" run 15 s each, its schedule fires every 10 s; "fast" is fine.
    events = [event("acme", start + 20 + 15 * k, 15.0, k, flow="slow") for k in range(2)]
    events += [event("acme", start + 30, 1.0, 9, flow="fast")]
    feed(b, events)
    (window,) = b.due(0, (start + 61) * 1000 + 1)
    (decision,) = b.decide(window, {"acme": {"slow": 10.0, "fast": 10.0}})
    assert (decision.flow, decision.rule, decision.action) == (
        "slow",
        "runtime_vs_interval",
        "quarantine",
    )
    assert decision.command_id == f"quarantine:runtime_vs_interval:acme:slow:{start}"
