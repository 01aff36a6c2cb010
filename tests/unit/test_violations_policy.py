"""The violation policy: rules, the escalation ladder, deterministic commands, policy files."""

from __future__ import annotations

import dataclasses
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.violations.policy import (
    MIB,
    Decision,
    Limits,
    Offence,
    Penalty,
    Plan,
    PolicyError,
    Quarantine,
    Span,
    Stats,
    Violation,
    Warn,
    add,
    decide,
    evaluate,
    load_policy,
    plan_for,
    release_id,
    span_add,
    to_command,
)
from schemas.control import PenaltyCommand, QuarantineCommand
from schemas.usage import UsageEvent

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
T0 = 1_700_000_040.0  # a window start (a multiple of 60)
LADDER: list[Warn | Penalty | Quarantine] = [
    Warn(action="warn"),
    Penalty(action="penalty", minutes=10),
    Quarantine(action="quarantine", minutes=15),
]
counter = itertools.count()


def plan(ladder: list[Warn | Penalty | Quarantine] | None = None, **limits: float) -> Plan:
    return Plan(limits=Limits.model_validate(limits), ladder=ladder or LADDER)


def event(
    *,
    cpu_s: float = 1.0,
    outcome: str = "succeeded",
    execution: str = "e1",
    start: float = T0,
    end: float = T0 + 1,
    memory: int = 0,
) -> UsageEvent:
    return UsageEvent.model_validate(
        {
            "event_id": f"ev-{next(counter)}",
            "tenant": "acme",
            "flow_id": "sync",
            "execution_id": execution,
            "step_id": "fetch",
            "step_type": "demo.echo",
            "attempt": 1,
            "worker_id": "w1",
            "outcome": outcome,
            "wall_s": end - start,
            "cpu_s": cpu_s,
            "peak_memory_bytes": memory,
            "bytes_in": 10,
            "bytes_out": 5,
            "started_at": datetime.fromtimestamp(start, UTC),
            "finished_at": datetime.fromtimestamp(end, UTC),
        }
    )


def run(
    p: Plan,
    tenant_stats: Stats,
    total_stats: Stats | None = None,
    *,
    flow_stats: dict[str, Stats] | None = None,
    flow_spans: dict[str, dict[str, Span]] | None = None,
    intervals: dict[str, float] | None = None,
) -> list[Violation]:
    total = total_stats or tenant_stats
    return evaluate(
        p,
        "acme",
        window_s=60,
        tenant_stats=tenant_stats,
        total_stats=total,
        flow_stats=flow_stats,
        flow_spans=flow_spans,
        intervals=intervals,
    )


def violation(rule: str = "cpu_share", flow: str | None = None) -> Violation:
    return Violation(rule, "acme", flow, 0.9, 0.5, f"{rule} detail")  # type: ignore[arg-type]


def decide_at(
    window_start: float,
    history: list[Offence],
    violations: list[Violation] | None = None,
    lookback_s: float = 3600,
    p: Plan | None = None,
) -> Decision | None:
    return decide(
        p or plan(),
        [violation()] if violations is None else violations,
        history,
        window_start=window_start,
        window_s=60,
        lookback_s=lookback_s,
    )


# --- statistics -----------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=100),
            st.sampled_from(["succeeded", "failed", "timeout"]),
            st.integers(min_value=0, max_value=2**40),
        ),
        max_size=20,
    )
)
def test_add_accumulates_and_survives_json(events: list[tuple[float, str, int]]) -> None:
    stats = Stats()
    for cpu, outcome, memory in events:
        stats = add(stats, event(cpu_s=cpu, outcome=outcome, memory=memory))
    assert stats.steps == len(events)
    assert stats.errors == sum(1 for _, outcome, _ in events if outcome != "succeeded")
    assert stats.io_bytes == 15 * len(events)
    assert stats.peak_memory_bytes == max((m for *_, m in events), default=0)
    assert stats.cpu_s == pytest.approx(sum(c for c, *_ in events))
    assert Stats.from_dict(json.loads(json.dumps(stats.to_dict()))) == stats


def test_span_add_widens_per_execution_and_is_bounded() -> None:
    spans = span_add({}, event(start=T0 + 5, end=T0 + 10))
    spans = span_add(spans, event(start=T0 + 1, end=T0 + 3))
    spans = span_add(spans, event(execution="e2", start=T0, end=T0 + 2))
    assert spans == {"e1": (T0 + 1, T0 + 10), "e2": (T0, T0 + 2)}
    assert span_add(spans, event(execution="e3"), limit=2) == spans  # full: new ones ignored
    widened = span_add(json.loads(json.dumps(spans)), event(start=T0 + 15, end=T0 + 20), limit=2)
    assert widened["e1"] == (T0 + 1, T0 + 20)  # known ones still widen, lists from JSON too


# --- rules ----------------------------------------------------------------------------------


def test_cpu_share_fires_above_the_limit() -> None:
    [found] = run(plan(max_cpu_share=0.5, min_cpu_s=30), Stats(cpu_s=60), Stats(cpu_s=100))
    assert (found.rule, found.tenant, found.flow) == ("cpu_share", "acme", None)
    assert found.measured == pytest.approx(0.6)
    assert found.limit == 0.5
    assert "60.0%" in found.detail
    assert "60.0 of 100.0 s" in found.detail
    assert run(plan(max_cpu_share=0.5, min_cpu_s=30), Stats(cpu_s=50), Stats(cpu_s=100)) == []


def test_cpu_share_floor_spares_a_small_tenant() -> None:
    """90% of 2 CPU seconds is no hog: the floor keeps quiet systems quiet."""
    p = plan(max_cpu_share=0.5, min_cpu_s=30)
    assert run(p, Stats(cpu_s=1.8), Stats(cpu_s=2.0)) == []
    assert run(p, Stats(cpu_s=0), Stats(cpu_s=0)) == []


def test_rules_are_off_without_limits() -> None:
    busy = Stats(cpu_s=1000, steps=10_000, errors=10_000, peak_memory_bytes=2**40)
    assert run(plan(), busy, busy) == []


def test_steps_per_min_scales_with_the_window() -> None:
    p, stats = plan(max_steps_per_min=600), Stats(steps=1000)
    [found] = evaluate(p, "acme", window_s=60, tenant_stats=stats, total_stats=stats)
    assert found.rule == "steps_per_min"
    assert found.measured == pytest.approx(1000)
    assert evaluate(p, "acme", window_s=120, tenant_stats=stats, total_stats=stats) == []
    assert evaluate(p, "acme", window_s=60, tenant_stats=Stats(steps=600), total_stats=stats) == []


def test_error_rate_needs_enough_steps() -> None:
    p = plan(max_error_rate=0.5, min_steps_for_error_rate=20)
    assert run(p, Stats(steps=19, errors=19)) == []
    [found] = run(p, Stats(steps=20, errors=11))
    assert found.rule == "error_rate"
    assert found.measured == pytest.approx(0.55)
    assert run(p, Stats(steps=20, errors=10)) == []


def test_memory_rule_names_the_hungry_flow() -> None:
    p = plan(max_memory_per_step_mb=512)
    flows = {"small": Stats(peak_memory_bytes=MIB), "big": Stats(peak_memory_bytes=600 * MIB)}
    [found] = run(p, Stats(peak_memory_bytes=600 * MIB), flow_stats=flows)
    assert (found.rule, found.flow, found.measured) == ("memory_per_step", None, 600)
    assert "flow big" in found.detail
    assert run(p, Stats(peak_memory_bytes=512 * MIB)) == []


def test_runtime_rule_needs_enough_overrunning_executions() -> None:
    p = plan(max_runtime_ratio=1.0, min_runtime_executions=3)
    two = {"e1": (T0, T0 + 90), "e2": (T0, T0 + 70), "e3": (T0, T0 + 10)}
    three = two | {"e4": (T0, T0 + 61)}
    spans = {"slow": three, "almost": two, "manual": three}
    intervals = {"slow": 60.0, "almost": 60.0}  # "manual" has no schedule
    [found] = run(p, Stats(), flow_spans=spans, intervals=intervals)
    assert (found.rule, found.flow, found.tenant) == ("runtime_vs_interval", "slow", "acme")
    assert found.measured == pytest.approx(1.5)  # longest 90 s over a 60 s interval
    assert "3 of 4 executions" in found.detail


def test_several_rules_yield_one_decision_for_the_first() -> None:
    p = plan(max_cpu_share=0.5, min_cpu_s=1, max_error_rate=0.1)
    found = run(p, Stats(cpu_s=90, steps=100, errors=50), Stats(cpu_s=100, steps=100))
    assert [v.rule for v in found] == ["cpu_share", "error_rate"]
    decision = decide_at(T0, [], list(reversed(found)), p=p)
    assert decision is not None
    assert decision.rule == "cpu_share"
    assert "also error_rate" in decision.reason


# --- the ladder -----------------------------------------------------------------------------


def escalate(starts: list[float], lookback_s: float = 3600) -> list[str]:
    history: list[Offence] = []
    actions: list[str] = []
    for start in starts:
        decision = decide_at(start, history, lookback_s=lookback_s)
        assert decision is not None
        history.append(decision.offence())
        actions.append(decision.action)
    return actions


def test_ladder_escalates_and_saturates() -> None:
    actions = escalate([T0 + 60 * i for i in range(5)])
    assert actions == ["warn", "penalty", "quarantine", "quarantine", "quarantine"]


def test_offences_outside_the_lookback_are_forgotten() -> None:
    assert escalate([T0, T0 + 300, T0 + 600], lookback_s=600) == ["warn", "penalty", "quarantine"]
    assert escalate([T0, T0 + 600, T0 + 1200], lookback_s=600) == ["warn", "penalty", "penalty"]
    assert escalate([T0, T0 + 660, T0 + 1320], lookback_s=600) == ["warn", "warn", "warn"]


def test_other_subjects_do_not_escalate() -> None:
    history = [
        Offence("acme", "sync", "runtime_vs_interval", T0 - 60, 0, "warn"),
        Offence("globex", None, "cpu_share", T0 - 60, 0, "warn"),
    ]
    decision = decide_at(T0, history)
    assert decision is not None
    assert decision.action == "warn"


def test_a_window_counts_once_however_often_recorded() -> None:
    offence = Offence("acme", None, "cpu_share", T0 - 60, 0, "warn")
    decision = decide_at(T0, [offence, offence, offence])
    assert decision is not None
    assert (decision.action, decision.offences) == ("penalty", 2)


offences = st.builds(
    Offence,
    tenant=st.just("acme"),
    flow=st.sampled_from([None, "sync"]),
    rule=st.sampled_from(["cpu_share", "error_rate"]),
    window_start=st.integers(min_value=-80, max_value=10).map(lambda i: T0 + 60 * i),
    rung=st.integers(min_value=0, max_value=2),
    action=st.sampled_from(["warn", "penalty", "quarantine"]),
)


@settings(max_examples=200, deadline=None)
@given(
    history=st.lists(offences, max_size=30),
    redone=st.lists(offences.map(lambda o: dataclasses.replace(o, window_start=T0)), max_size=5),
    flow=st.sampled_from([None, "sync"]),
)
def test_redeciding_a_window_is_unaffected_by_its_own_offences(
    history: list[Offence], redone: list[Offence], flow: str | None
) -> None:
    """A consumer restarted after recording this window's offence decides exactly as before."""
    violations = [violation("runtime_vs_interval" if flow else "cpu_share", flow)]
    first = decide_at(T0, history, violations)
    assert first is not None
    again = decide_at(T0, [*redone, *reversed(history), *redone], violations)
    assert again == first
    assert first.offence() == Offence(**first.offence().to_dict())
    recent = [o for o in history if o.flow == flow and T0 - 3600 <= o.window_start < T0]
    assert first.rung_index == min(len({o.window_start for o in recent}), 2)


def test_no_violations_no_decision() -> None:
    assert decide(plan(), [], [], window_start=T0, window_s=60, lookback_s=3600) is None


def test_one_subject_per_decision() -> None:
    with pytest.raises(ValueError, match="one subject"):
        decide_at(T0, [], [violation(), violation("runtime_vs_interval", "sync")])


# --- commands -------------------------------------------------------------------------------


def decision_at(start: float, earlier: int, flow: str | None = None) -> Decision:
    rule = "runtime_vs_interval" if flow else "cpu_share"
    history = [Offence("acme", flow, rule, start - 60 * (i + 1), 0, "warn") for i in range(earlier)]
    decision = decide_at(start, history, [violation(rule, flow)])
    assert decision is not None
    return decision


def test_command_ids_are_deterministic_and_per_window() -> None:
    assert decision_at(T0, 0).command_id == f"warn:cpu_share:acme:{int(T0)}"
    penalty = decision_at(T0, 1, flow="sync")
    assert penalty.command_id == f"penalty:runtime_vs_interval:acme:sync:{int(T0)}"
    assert decision_at(T0, 1, flow="sync") == penalty
    assert decision_at(T0 + 60, 1, flow="sync").command_id != penalty.command_id
    assert release_id(penalty.command_id) == f"release:{penalty.command_id}"


def test_warnings_send_no_command() -> None:
    assert to_command(decision_at(T0, 0)) is None


def test_penalty_command_is_the_same_however_often_built() -> None:
    command = to_command(decision_at(T0, 1))
    assert isinstance(command, PenaltyCommand)
    assert command.message_id() == f"penalty:cpu_share:acme:{int(T0)}"
    assert (command.tenant, command.flow_id, command.rule) == ("acme", None, "cpu_share")
    assert command.issued_by == "violations"
    assert command.issued_at.timestamp() == T0 + 60  # the window end, not the clock
    assert command.expires_at.timestamp() == T0 + 60 + 600
    assert command.weight_factor == 0.5
    assert "cpu_share detail" in command.reason
    rebuilt = to_command(decision_at(T0, 1))
    assert rebuilt is not None
    assert rebuilt.to_bytes() == command.to_bytes()


def test_quarantine_command_for_a_flow() -> None:
    command = to_command(decision_at(T0, 5, flow="sync"))
    assert isinstance(command, QuarantineCommand)
    assert command.flow_id == "sync"
    assert command.expires_at.timestamp() == T0 + 60 + 900


# --- policy files ---------------------------------------------------------------------------


def test_the_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE)
    assert policy.window_s == 60
    assert plan_for(policy, "acme") is policy.plans["premium"]
    assert plan_for(policy, "someone-else") is policy.plans["standard"]
    assert all(plan.ladder for plan in policy.plans.values())


GOOD = """
default_plan: standard
plans:
  standard:
    limits: {max_cpu_share: 0.5}
    ladder: [{action: warn}]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("window_s: [", "cannot read"),
        ("- a list", "expected a mapping"),
        ("", "expected a mapping"),
        (GOOD + "tenants: {acme: gold}", "tenants.acme: unknown plan 'gold'"),
        (
            GOOD.replace("default_plan: standard", "default_plan: gold"),
            "default_plan: unknown plan",
        ),
        (
            GOOD.replace("0.5", "-0.5"),
            "plans.standard.limits.max_cpu_share: Input should be greater than 0",
        ),
        (
            GOOD.replace("max_cpu_share", "max_cpu_shares"),
            "plans.standard.limits.max_cpu_shares: Extra inputs",
        ),
        (
            GOOD.replace("[{action: warn}]", "[]"),
            "plans.standard.ladder: List should have at least 1",
        ),
        (
            GOOD.replace("{action: warn}", "{action: penalty}"),
            "plans.standard.ladder.0.penalty.minutes: Field required",
        ),
        (
            GOOD.replace("{action: warn}", "{action: ban}"),
            "plans.standard.ladder.0: Input tag 'ban'",
        ),
        (GOOD + "window_s: 0", "window_s: Input should be greater than or equal to 1"),
    ],
)
def test_bad_policy_files_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_a_missing_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"nowhere\.yaml: cannot read"):
        load_policy(tmp_path / "nowhere.yaml")
