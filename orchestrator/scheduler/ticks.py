"""Which of a flow's due ticks run, coalesce or are skipped as missed: pure planning, no I/O.

A tick later than `grace` is *missed* (the scheduler was down or far behind). Missed ticks
inside the flow's catch-up window coalesce into one run (the latest of them) when the flow
says `coalesce`, or are all skipped otherwise; missed ticks older than the window are skipped.
Ticks within `grace` run normally, each one: a scheduler that is merely busy never merges them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from orchestrator.cron import CronSchedule
from schemas import CatchUpPolicy

# Enumerating missed ticks is bounded: after a day down, a per-second flow has 86 400 of them.
MAX_ENUMERATED_TICKS = 2_000


@dataclass
class TickPlan:
    run: list[datetime] = field(default_factory=list)  # ticks to fire as they are
    catch_up: datetime | None = None  # the one run standing for the coalesced ticks
    coalesced: list[datetime] = field(default_factory=list)
    missed: list[datetime] = field(default_factory=list)
    truncated: bool = False  # more missed ticks existed than were enumerated
    next_nominal: datetime | None = None


def plan_ticks(
    schedule: CronSchedule,
    first: datetime,
    now: datetime,
    catch_up: CatchUpPolicy,
    grace: timedelta,
) -> TickPlan:
    """Plans every tick from `first` (the due one) up to `now`."""
    ticks = [first]
    upcoming = schedule.next_after(first)
    while upcoming is not None and upcoming <= now and len(ticks) <= MAX_ENUMERATED_TICKS:
        ticks.append(upcoming)
        upcoming = schedule.next_after(upcoming)
    plan = TickPlan()
    if len(ticks) > MAX_ENUMERATED_TICKS:
        plan.truncated = True
        # Start over inside the window, which is all that can still run.
        window_start = max(first, now - timedelta(seconds=catch_up.window_s) - grace)
        plan.missed = ticks[:MAX_ENUMERATED_TICKS]
        ticks = schedule.fires_between(window_start, now, MAX_ENUMERATED_TICKS)
        upcoming = schedule.next_after(now)
    window = timedelta(seconds=catch_up.window_s)
    late: list[datetime] = []
    for tick in ticks:
        lateness = now - tick
        if lateness <= grace:
            plan.run.append(tick)
        elif lateness <= window:
            late.append(tick)
        else:
            plan.missed.append(tick)
    if late:
        if catch_up.coalesce:
            plan.catch_up = late[-1]
            plan.coalesced = late[:-1]
        else:
            plan.missed.extend(late)
    plan.next_nominal = upcoming
    return plan
