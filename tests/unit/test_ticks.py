"""Planning due ticks: on time, late within grace, coalesced after downtime, missed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from orchestrator.cron import CronSchedule
from orchestrator.scheduler.ticks import MAX_ENUMERATED_TICKS, plan_ticks
from schemas import CatchUpPolicy

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=10)
MINUTELY = CronSchedule("* * * * *")


def test_on_time_tick_runs_and_schedules_the_next() -> None:
    plan = plan_ticks(MINUTELY, T0, T0 + timedelta(milliseconds=5), CatchUpPolicy(), GRACE)
    assert plan.run == [T0]
    assert plan.catch_up is None
    assert not plan.missed
    assert not plan.coalesced
    assert plan.next_nominal == T0 + timedelta(minutes=1)


def test_busy_scheduler_fires_every_tick_within_grace() -> None:
    every_second = CronSchedule("* * * * * *")
    plan = plan_ticks(every_second, T0, T0 + timedelta(seconds=3), CatchUpPolicy(), GRACE)
    assert plan.run == [T0 + timedelta(seconds=s) for s in range(4)]


def test_downtime_coalesces_ticks_in_window_and_skips_older() -> None:
    now = T0 + timedelta(minutes=90, seconds=5)
    plan = plan_ticks(MINUTELY, T0, now, CatchUpPolicy(window_s=30 * 60), GRACE)
    assert plan.run == [T0 + timedelta(minutes=90)]
    in_window = [T0 + timedelta(minutes=m) for m in range(61, 90)]
    assert plan.catch_up == in_window[-1]
    assert plan.coalesced == in_window[:-1]
    assert plan.missed == [T0 + timedelta(minutes=m) for m in range(61)]


def test_without_coalescing_missed_ticks_are_all_skipped() -> None:
    now = T0 + timedelta(minutes=5, seconds=30)
    plan = plan_ticks(MINUTELY, T0, now, CatchUpPolicy(window_s=3600, coalesce=False), GRACE)
    assert plan.catch_up is None
    assert len(plan.missed) == 6
    assert plan.run == []


def test_enumeration_is_bounded_after_long_downtime() -> None:
    every_second = CronSchedule("* * * * * *")
    now = T0 + timedelta(hours=5)
    plan = plan_ticks(every_second, T0, now, CatchUpPolicy(window_s=60), GRACE)
    assert plan.truncated
    assert len(plan.missed) <= 2 * MAX_ENUMERATED_TICKS
    assert plan.catch_up is not None
    assert now - plan.catch_up <= timedelta(seconds=61)
    assert plan.next_nominal == now + timedelta(seconds=1)
