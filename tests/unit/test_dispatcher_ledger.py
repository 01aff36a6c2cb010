"""The dispatcher's ledger, driven by a hand-moved clock: window sizing, eligibility, rate
limits, the express lane, cost correction, lost completions and the released-id memory."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.clock import ManualClock
from orchestrator.dispatcher.ledger import (
    DEFAULT_COST_S,
    DEFAULT_MAX_PARALLEL,
    IN_FLIGHT_GRACE,
    RELEASED_MEMORY,
    RELEASED_MEMORY_S,
    Ledger,
)
from orchestrator.store.tenants import TenantPolicy
from schemas import StepTask

START = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
_ids = itertools.count()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


def task(
    tenant: str = "ta", flow: str = "f", step_type: str = "demo.echo", timeout_s: float = 30
) -> StepTask:
    n = next(_ids)
    return StepTask(
        task_id=f"e{n}:s:1",
        execution_id=f"e{n}",
        tenant=tenant,
        flow_id=flow,
        step_id="s",
        step_type=step_type,
        attempt=1,
        timeout_s=timeout_s,
        deadline=START + timedelta(seconds=timeout_s),
    )


def ledger_with(
    clock: ManualClock, slots: int = 2, headroom: float = 0.0, **policies: TenantPolicy
) -> Ledger:
    ledger = Ledger(clock, headroom)
    ledger.set_capacity(slots, slots, 1)
    ledger.set_policies(policies, every=True)
    return ledger


def taken(ledger: Ledger, refilling: bool = False) -> list[tuple[str, bool]]:
    return [(p.queued.task.tenant, p.express) for p in ledger.take(refilling)]


# ---------------------------------------------------------------- window
def test_window_is_the_slots_plus_measured_headroom_capped(clock: ManualClock) -> None:
    ledger = Ledger(clock, headroom=1.0)
    ledger.step_s, ledger.round_trip_s = 0.1, 0.01  # round trip a tenth of a step
    assert ledger.window_for(10) == 11
    ledger.round_trip_s = 1.0  # ten steps' time: capped at one slot's worth each
    assert ledger.window_for(10) == 20
    assert Ledger(clock, headroom=0.0).window_for(10) == 10
    assert ledger.window_for(0) == 1  # nothing registered yet: one step, to learn from


def test_completions_move_the_estimates_that_size_the_window(clock: ManualClock) -> None:
    ledger = ledger_with(clock, slots=4, headroom=1.0)
    for _ in range(4):
        ledger.push(task(), delivery=None)
    picks = ledger.take()
    clock.advance(0.5)  # each completion seen 0.5 s after release; the step took 0.1 s
    for pick in picks:
        ledger.completed(pick.queued.task.task_id, wall_s=0.1, cpu_s=None)
    assert ledger.step_s == pytest.approx(DEFAULT_COST_S)  # the steps took the default
    assert ledger.round_trip_s > 0.2  # 0.4 s of overhead each, averaged in
    ledger.set_capacity(4, 4, 1)
    assert ledger.window == 8  # the round trip outgrew a step: full headroom


# ---------------------------------------------------------------- taking
def test_takes_no_more_than_the_window_but_a_quiet_tenant_goes_express(
    clock: ManualClock,
) -> None:
    ledger = ledger_with(clock, slots=2)
    for _ in range(5):
        ledger.push(task("ta"), delivery=None)
    assert taken(ledger) == [("ta", True), ("ta", False)]
    assert taken(ledger) == []  # window full, and ta has steps in flight
    ledger.push(task("tb"), delivery=None)
    assert taken(ledger) == [("tb", True)]  # nothing of tb's in flight: express
    assert len(ledger.in_flight) == 3


def test_while_refilling_only_express_steps_are_taken(clock: ManualClock) -> None:
    ledger = ledger_with(clock, slots=10)
    ledger.push(task("ta"), delivery=None)
    ledger.push(task("ta"), delivery=None)
    assert taken(ledger, refilling=True) == [("ta", True)]
    assert taken(ledger, refilling=True) == []
    assert taken(ledger) == [("ta", False)]


def test_quarantine_caps_and_max_parallel_hold_a_tenant(clock: ManualClock) -> None:
    ledger = ledger_with(
        clock,
        slots=10,
        ta=TenantPolicy(quarantined=True),
        tb=TenantPolicy(concurrency_cap=1),
        tc=TenantPolicy(quarantined_flows=frozenset({"bad"})),
    )
    ledger.learn_flow("td", "f", 2)
    for tenant in ("ta", "tb", "tb", "td", "td", "td"):
        ledger.push(task(tenant), delivery=None)
    ledger.push(task("tc", flow="bad"), delivery=None)
    ledger.push(task("tc", flow="good"), delivery=None)
    assert sorted(t for t, _ in taken(ledger)) == ["tb", "tc", "td", "td"]
    assert ledger.queue.backlog() == 4  # ta's, tb's second, td's third, tc's bad flow
    assert not ledger.eligible("ta", "f")
    assert not ledger.eligible("tb", "f")
    assert not ledger.eligible("td", "f")
    assert ledger.eligible("tc", "good")
    assert not ledger.eligible("tc", "bad")
    ledger.set_policies({"ta": TenantPolicy()})  # released
    assert taken(ledger) == [("ta", True)]


def test_an_unknown_flow_is_allowed_the_default_parallelism(clock: ManualClock) -> None:
    ledger = ledger_with(clock)
    assert not ledger.knows_flow("ta", "gone")
    ledger.learn_flow("ta", "gone", None)
    assert ledger.knows_flow("ta", "gone")
    assert ledger.max_parallel[("ta", "gone")] == DEFAULT_MAX_PARALLEL


def test_rate_limit_releases_at_the_rate_of_the_clock(clock: ManualClock) -> None:
    ledger = ledger_with(clock, slots=100, ta=TenantPolicy(rate_per_s=2.0))
    for _ in range(10):
        ledger.push(task("ta"), delivery=None)
    assert len(taken(ledger)) == 1  # one token to start with
    assert taken(ledger) == []
    clock.advance(0.5)
    assert len(taken(ledger)) == 1
    clock.advance(10)  # idle time saves up at most max(1, rate) tokens
    assert len(taken(ledger)) == 2
    ledger.set_policies({"ta": TenantPolicy()}, every=True)  # limit lifted
    assert len(taken(ledger)) == 6


# ---------------------------------------------------------------- completions
def test_completion_charges_the_dominant_resource_and_learns_per_tenant(
    clock: ManualClock,
) -> None:
    ledger = ledger_with(clock, slots=4)
    ledger.set_capacity(4, 4, 1)  # four step threads share one CPU
    ledger.push(task("ta", step_type="cpu"), delivery=None)
    (pick,) = ledger.take()
    done = ledger.completed(pick.queued.task.task_id, wall_s=0.2, cpu_s=0.1)
    assert done is not None
    assert done[1] == pytest.approx(0.4)  # 0.1 CPU-s x 4 threads per CPU beats 0.2 s of slot
    assert ledger.estimates[("ta", "cpu")] == pytest.approx(0.4)
    assert ledger.estimates[("", "cpu")] == pytest.approx(0.4)
    assert ledger.per_tenant["ta"] == 0
    assert not ledger.in_flight
    # A newcomer is charged everyone's estimate, not the default.
    ledger.push(task("tb", step_type="cpu"), delivery=None)
    item = ledger.queue.pick(ledger.eligible, ledger.estimate)
    assert item is not None
    assert ledger.estimate(item) == pytest.approx(0.4)


def test_completion_of_a_step_not_in_flight_changes_nothing(clock: ManualClock) -> None:
    ledger = ledger_with(clock)
    assert ledger.completed("nobody:s:1", wall_s=5.0, cpu_s=None) is None
    assert ledger.step_s == DEFAULT_COST_S
    assert not ledger.estimates


def test_a_lost_completion_is_forgotten_after_the_deadline_and_grace(
    clock: ManualClock,
) -> None:
    ledger = ledger_with(clock, slots=1)
    ledger.push(task("ta", timeout_s=10), delivery=None)
    ledger.push(task("ta", timeout_s=10), delivery=None)
    assert len(ledger.take()) == 1
    clock.advance(10 + IN_FLIGHT_GRACE.total_seconds() - 1)
    assert ledger.expire() == []
    clock.advance(2)
    assert [item.tenant for item in ledger.expire()] == ["ta"]
    assert not ledger.in_flight
    assert ledger.per_tenant["ta"] == 0
    assert len(ledger.take()) == 1  # the window has its slot back


def test_forget_returns_a_slot_whose_publish_failed(clock: ManualClock) -> None:
    ledger = ledger_with(clock, slots=1)
    ledger.push(task("ta"), delivery=None)
    (pick,) = ledger.take()
    assert ledger.forget(pick.queued.task.task_id) is not None
    assert ledger.forget(pick.queued.task.task_id) is None
    assert ledger.per_flow[("ta", "f")] == 0


# ---------------------------------------------------------------- released ids
def test_released_ids_are_remembered_as_long_as_the_markers(clock: ManualClock) -> None:
    ledger = ledger_with(clock)
    ledger.mark_released(["a:s:1", "b:s:1"])
    clock.advance(RELEASED_MEMORY_S / 2)
    ledger.mark_released(["c:s:1"])
    clock.advance(RELEASED_MEMORY_S / 2 + 1)
    ledger.forget_released()
    assert not ledger.was_released("a:s:1")
    assert not ledger.was_released("b:s:1")
    assert ledger.was_released("c:s:1")


def test_released_memory_is_bounded_oldest_first(clock: ManualClock) -> None:
    ledger = ledger_with(clock)
    ledger.mark_released(f"{n}:s:1" for n in range(RELEASED_MEMORY + 10))
    ledger.forget_released()
    assert len(ledger.released) == RELEASED_MEMORY
    assert not ledger.was_released("9:s:1")
    assert ledger.was_released("10:s:1")


def test_step_down_drops_flights_and_held_steps_but_keeps_what_was_learnt(
    clock: ManualClock,
) -> None:
    ledger = ledger_with(clock, ta=TenantPolicy(weight=3))
    ledger.push(task("ta"), delivery=None)
    ledger.push(task("ta"), delivery=None)
    ledger.push(task("ta"), delivery=None)
    (first, _) = ledger.take()
    ledger.completed(first.queued.task.task_id, 0.3, None)
    ledger.mark_released(["x:s:1"])
    ledger.step_down()
    assert not ledger.in_flight
    assert ledger.queue.backlog() == 0
    assert not ledger.per_tenant
    assert ledger.estimates
    assert ledger.was_released("x:s:1")
    assert "ta" in ledger.policies
    assert ledger.summary() == {"window": 2, "in_flight_total": 0, "in_flight": {}}
