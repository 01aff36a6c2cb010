"""The dispatcher's last-minute summary: shares of served cost, dwell percentiles, forgetting."""

from __future__ import annotations

import pytest

from orchestrator.dispatcher.stats import RecentService


def test_shares_are_of_the_cost_served_in_the_window() -> None:
    recent = RecentService(window_s=60)
    for i in range(30):
        recent.served("a", 1.0, now=float(i))
    for i in range(10):
        recent.served("b", 2.0, now=float(i))
    summary = recent.summary(now=30.0)
    assert summary["a"]["cost_s"] == 30.0
    assert summary["b"]["completed"] == 10
    assert summary["a"]["share"] == pytest.approx(0.6)
    assert summary["b"]["share"] == pytest.approx(0.4)


def test_what_left_the_window_no_longer_counts_and_idle_tenants_are_forgotten() -> None:
    recent = RecentService(window_s=60)
    recent.served("old", 5.0, now=0.0)
    recent.dispatched("old", 0.1, now=0.0)
    recent.served("new", 1.0, now=50.0)
    summary = recent.summary(now=61.0)
    assert "old" not in summary
    assert summary["new"]["share"] == 1.0
    assert recent.summary(now=200.0) == {}


def test_dwell_percentiles_are_of_the_steps_dispatched_in_the_window() -> None:
    recent = RecentService(window_s=60)
    for i in range(100):
        recent.dispatched("a", (i + 1) / 1000, now=1.0)  # 1..100 ms
    row = recent.summary(now=2.0)["a"]
    assert row["dispatched"] == 100
    assert row["dwell_p50_ms"] == pytest.approx(51.0, abs=1)
    assert row["dwell_p99_ms"] == pytest.approx(99.0, abs=1)
    assert row["cost_s"] == 0
    assert row["share"] == 0.0


def test_memory_stays_bounded_when_nobody_asks_for_a_summary() -> None:
    """A standby dispatcher publishes no summary: its window must not grow for ever."""
    recent = RecentService(window_s=10)
    for i in range(10_000):
        recent.served("a", 1.0, now=i * 0.1)
        recent.dispatched("a", 0.01, now=i * 0.1)
    state = recent._tenants["a"]
    assert len(state.served) <= 101
    assert len(state.dwell) <= 101
