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
LATE_S = 300

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
            late_s=LATE_S,
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
    appended = (T0 + WINDOW + LATE_S + 1) * 1000  # past the last moment a record may amend
    assert b.add(late, partition=0, offset=50, appended_ms=appended) == "late"
    assert tables["w"][f"noisy|{T0}"]["stats"]["cpu_s"] == 8.0
    assert tables["t"][f"0|{T0}"]["stats"]["cpu_s"] == 10.0


def _flushed_after_outage(start: int, offset: int, delay_s: float) -> list[tuple[UsageEvent, int]]:
    """noisy's 8 CPU seconds of the window, appended `delay_s` after the window ended."""
    return [
        (event("noisy", start + 1 + i, 1.0, offset + i), int((start + WINDOW + delay_s) * 1000))
        for i in range(8)
    ]


def test_records_flushed_after_a_kafka_outage_are_judged_in_their_window() -> None:
    """The window was judged on what had arrived (quiet's 2 s: nothing to decide); noisy's
    records, buffered by its worker through a Kafka outage, arrive two minutes later. They
    amend the window, and the next tick decides the violation they show, with the id it
    would have had on time."""
    on_time, _ = book()
    feed(on_time, noisy_window(T0))
    (window,) = on_time.due(0, (T0 + WINDOW + 2) * 1000)
    (expected,) = on_time.decide(window, {})

    b, _ = book()
    quiet = [event("quiet", T0 + 1 + i, 1.0, 100 + i) for i in range(2)]
    feed(b, quiet)
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    assert b.decide(window, {}) == []
    b.closed(window, [])
    outcomes = [
        b.add(e, partition=0, offset=10 + i, appended_ms=at)
        for i, (e, at) in enumerate(_flushed_after_outage(T0, 0, 120))
    ]
    assert set(outcomes) == {"amended"}
    decided_at = T0 + WINDOW + 121
    (window,) = b.due(0, decided_at * 1000)
    assert window.amended
    (decision,) = b.decide(window, {}, decided_at=decided_at)
    assert (decision.tenant, decision.command_id) == ("noisy", expected.command_id)
    # Its minute of penalty runs from the decision: the outage (longer than the penalty)
    # does not let the tenant off.
    assert decision.expires_at == decided_at + 60
    b.closed(window, [decision])
    assert b.due(0, (T0 + WINDOW + 122) * 1000) == []
    # Decided once: a later late record for the same window adds nothing new to decide.
    extra = event("noisy", T0 + 9, 1.0, 50)
    assert b.add(extra, partition=0, offset=30, appended_ms=(T0 + WINDOW + 130) * 1000) == (
        "amended"
    )
    (window,) = b.due(0, (T0 + WINDOW + 131) * 1000)
    assert b.decide(window, {}) == []


def test_a_window_nobody_reported_on_time_opens_when_its_records_arrive() -> None:
    """Nothing reached Kafka during the window (it was down); later windows were judged
    meanwhile. The flushed records open their window, and the next tick judges it."""
    b, _ = book()
    later = T0 + 5 * WINDOW
    feed(b, [event("quiet", later + 1, 1.0, 1)])
    (window,) = b.due(0, (later + WINDOW + 2) * 1000)
    b.closed(window, b.decide(window, {}))
    flushed = _flushed_after_outage(T0, 100, 4 * WINDOW + 30)
    outcomes = [
        b.add(e, partition=0, offset=10 + i, appended_ms=at) for i, (e, at) in enumerate(flushed)
    ]
    assert set(outcomes) == {"counted"}
    (window,) = b.due(0, flushed[-1][1] + 1)
    assert window.start == T0
    (decision,) = b.decide(window, {})
    assert decision.tenant == "noisy"


def test_amendments_replayed_after_a_restart_decide_nothing_twice() -> None:
    b, tables = book()
    feed(b, [event("quiet", T0 + 1, 1.0, 100), event("quiet", T0 + 2, 1.0, 101)])
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    b.closed(window, [])
    flushed = _flushed_after_outage(T0, 0, 60)
    for i, (e, at) in enumerate(flushed):
        b.add(e, partition=0, offset=10 + i, appended_ms=at)
    (window,) = b.due(0, (T0 + WINDOW + 61) * 1000)
    (decision,) = b.decide(window, {})
    b.closed(window, [decision])
    restored = copy.deepcopy(tables)
    again, _ = book(restored)
    replayed = [
        again.add(e, partition=0, offset=10 + i, appended_ms=at)
        for i, (e, at) in enumerate(flushed)
    ]
    assert set(replayed) == {"closed"}
    assert again.due(0, (T0 + WINDOW + 62) * 1000) == []


def test_closed_windows_are_forgotten_after_the_late_limit() -> None:
    b, tables = book()
    events = noisy_window(T0)
    feed(b, events)
    (window,) = b.due(0, (T0 + WINDOW + 2) * 1000)
    b.closed(window, b.decide(window, {}))
    b.purge(0, (T0 + WINDOW + LATE_S - 1) * 1000)
    assert f"noisy|{T0}" in tables["w"]
    b.purge(0, (T0 + WINDOW + LATE_S + 1) * 1000)
    assert f"noisy|{T0}" not in tables["w"]
    assert f"0|{T0}" not in tables["t"]
    assert set(feed(b, events)) == {"closed"}  # replayed later: still nothing


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
