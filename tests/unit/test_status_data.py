"""The `data` models of status events against what the emitting code actually sends."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import pytest
from pydantic import ValidationError

from orchestrator import amqp, dlq
from orchestrator.dlq_cli import _destination
from orchestrator.engine.machine import Execution, Timer, Transition, new_execution
from orchestrator.scheduler.admitting import cron_fire_id, execution_id_for, iso_ms
from orchestrator.violations import policy
from schemas import FlowDefinition, StatusEvent, StepResult
from schemas.status import STATES
from schemas.status_data import DATA_MODELS, EventData, ViolationRule, check_data
from schemas.steps import StepError

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


# ---------------------------------------------------------------- the catalogue
def test_every_status_type_has_a_data_model_and_no_other() -> None:
    kinds = {f"{entity}.{state}" for entity, states in STATES.items() for state in states}
    assert set(DATA_MODELS) == kinds


@pytest.mark.parametrize("kind", sorted(DATA_MODELS))
def test_each_model_is_documented_strict_and_open(kind: str) -> None:
    model = DATA_MODELS[kind]
    assert issubclass(model, EventData)
    assert model.__doc__
    assert model.__doc__.strip()
    assert model.model_config.get("extra") == "allow"
    assert model.model_config.get("strict") is True
    assert model.model_json_schema(mode="serialization")["type"] == "object"


def test_violation_rules_match_the_policy() -> None:
    assert get_args(ViolationRule) == policy.RULES


def test_an_unknown_type_has_no_model() -> None:
    with pytest.raises(ValueError, match=r"no data model"):
        check_data("step", "exploded", {})


# ---------------------------------------------------------------- the state machine
def flow(steps: list[dict[str, Any]]) -> FlowDefinition:
    return FlowDefinition.model_validate({"tenant": "acme", "id": "f", "steps": steps})


def execution(
    definition: FlowDefinition, execution_input: dict[str, Any] | None = None
) -> Execution:
    return new_execution(
        execution_id="e1",
        fire_id="acme/f#k",
        definition=definition,
        execution_input={"x": 1} if execution_input is None else execution_input,
        now=NOW,
    )


def result(
    x: Execution,
    step_id: str,
    ok: bool = True,
    *,
    output: dict[str, Any] | None = None,
    retryable: bool = True,
    kind: Literal["action", "compensation"] = "action",
    reason: str | None = None,
) -> StepResult:
    state = x.steps[step_id]
    attempt = state.attempt if kind == "action" else state.compensation_attempt
    return StepResult(
        task_id=state.task_id or "?",
        execution_id=x.execution_id,
        tenant="acme",
        flow_id="f",
        step_id=step_id,
        kind=kind,
        attempt=attempt,
        outcome="succeeded" if ok else "failed",
        output=output if ok else None,
        error=None
        if ok
        else StepError(type="Boom", message="no", retryable=retryable, reason=reason),
        worker_id="w-1",
        started_at=NOW,
    )


class Recorder:
    """Runs transitions and keeps every status event they emit."""

    def __init__(self) -> None:
        self.events: list[StatusEvent] = []

    def run(
        self, x: Execution, step: Callable[[Transition], object], now: datetime = NOW
    ) -> Transition:
        transition = Transition(x, now)
        step(transition)
        self.events.extend(transition.effects.statuses)
        return transition


def success(rec: Recorder) -> None:
    x = execution(
        flow(
            [
                {"id": "a", "type": "demo.echo"},
                {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
                {"id": "c", "type": "demo.echo", "depends_on": ["a"]},
            ]
        )
    )
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a", output={"a": 1})))
    rec.run(x, lambda t: t.result(result(x, "b", output={"b": [1, 2]})))
    rec.run(x, lambda t: t.result(result(x, "c")))
    assert x.status == "succeeded"


def retry(rec: Recorder) -> None:
    policy_ = {"max_attempts": 4, "initial_backoff_s": 1, "multiplier": 2, "jitter": 0}
    x = execution(flow([{"id": "a", "type": "demo.fail", "retry": policy_, "timeout_s": 10}]))
    fx = rec.run(x, lambda t: t.start()).effects
    # 1: the worker's error (with a runtime reason); 2: the deadline passes without a result.
    fx = rec.run(x, lambda t: t.result(result(x, "a", ok=False, reason="poison"))).effects
    (timer,) = [t for t in fx.timers if t.kind == "retry"]
    fx = rec.run(x, lambda t: t.timer(timer), timer.at).effects
    (deadline,) = [t for t in fx.timers if t.kind == "deadline"]
    fx = rec.run(x, lambda t: t.timer(deadline), deadline.at).effects
    (timer,) = [t for t in fx.timers if t.kind == "retry"]
    rec.run(x, lambda t: t.timer(timer), timer.at)
    rec.run(x, lambda t: t.result(result(x, "a")))
    assert x.status == "succeeded"


def failure_with_compensation(rec: Recorder) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo"},
        {"id": "b", "type": "demo.fail", "depends_on": ["a"], "retry": {"max_attempts": 1}},
    ]
    x = execution(flow(steps))
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a", output={"id": 7})))
    rec.run(x, lambda t: t.result(result(x, "b", ok=False)))
    rec.run(x, lambda t: t.result(result(x, "a", kind="compensation")))
    assert x.status == "compensated"


def failure_without_compensation(rec: Recorder) -> None:
    x = execution(flow([{"id": "a", "type": "demo.fail"}]))
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a", ok=False, retryable=False)))
    assert x.status == "failed"


def invalid_input(rec: Recorder) -> None:
    """A dependency's output plus the flow input exceed the payload bound: `InvalidInput`."""
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "demo.echo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
    ]
    x = execution(flow(steps), {"big": ["x" * 50_000] * 3})
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a", output={"big": ["y" * 50_000] * 3})))
    assert x.status == "failed"
    assert x.failure is not None
    assert x.failure["error"]["type"] == "InvalidInput"


def failed_compensation(rec: Recorder) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo", "retry": {"max_attempts": 2}},
        {"id": "b", "type": "demo.fail", "depends_on": ["a"], "retry": {"max_attempts": 1}},
    ]
    x = execution(flow(steps))
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a")))
    rec.run(x, lambda t: t.result(result(x, "b", ok=False)))
    fx = rec.run(x, lambda t: t.result(result(x, "a", ok=False, kind="compensation"))).effects
    (timer,) = [t for t in fx.timers if t.kind == "retry"]  # a compensation is retried too
    rec.run(x, lambda t: t.timer(timer), timer.at)
    rec.run(x, lambda t: t.result(result(x, "a", ok=False, kind="compensation")))
    assert x.status == "failed"
    assert x.failure is not None
    assert x.failure["compensation_failed"] == "a"


def cancel(rec: Recorder) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo"},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
    ]
    x = execution(flow(steps))
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a")))
    rec.run(x, lambda t: t.cancel("not needed", "ops"))
    rec.run(x, lambda t: t.result(result(x, "b")))
    rec.run(x, lambda t: t.result(result(x, "a", kind="compensation")))
    assert x.status == "cancelled"
    # Nobody named: `requested_by` is null.
    y = execution(flow([{"id": "a", "type": "demo.echo"}]))
    rec.run(y, lambda t: t.start())
    rec.run(y, lambda t: t.cancel("stop", None))
    rec.run(y, lambda t: t.result(result(y, "a")))
    assert y.status == "cancelled"


def cancel_with_failed_compensation(rec: Recorder) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "demo.echo", "compensation": "demo.undo", "retry": {"max_attempts": 1}},
        {"id": "b", "type": "demo.echo", "depends_on": ["a"]},
    ]
    x = execution(flow(steps))
    rec.run(x, lambda t: t.start())
    rec.run(x, lambda t: t.result(result(x, "a")))
    rec.run(x, lambda t: t.cancel("stop", "ops"))
    rec.run(x, lambda t: t.result(result(x, "b", ok=False)))  # fails while cancelling
    rec.run(x, lambda t: t.result(result(x, "a", ok=False, kind="compensation")))
    assert x.status == "failed"
    assert x.cancellation is not None


def breaker(rec: Recorder) -> None:
    x = execution(flow([{"id": "a", "type": "demo.echo"}]))

    def start_deferred(t: Transition) -> None:
        t.start()
        t.defer("a", NOW + timedelta(seconds=30))

    rec.run(x, start_deferred)
    rec.run(x, lambda t: t.timer(Timer("breaker", "a", 0, NOW + timedelta(seconds=30))))
    rec.run(x, lambda t: t.result(result(x, "a")))
    assert x.status == "succeeded"


SCENARIOS = [
    success,
    retry,
    failure_with_compensation,
    failure_without_compensation,
    invalid_input,
    failed_compensation,
    cancel,
    cancel_with_failed_compensation,
    breaker,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__)
def test_engine_events_match_their_models(scenario: Callable[[Recorder], None]) -> None:
    rec = Recorder()
    scenario(rec)
    assert rec.events
    for event in rec.events:
        check_data(*event.entity_state, event.data)
        # As a subscriber receives it, too.
        again = StatusEvent.model_validate_json(event.to_bytes())
        check_data(*again.entity_state, again.data)


def test_the_scenarios_emit_every_execution_and_step_type() -> None:
    rec = Recorder()
    for scenario in SCENARIOS:
        scenario(rec)
    seen = {".".join(event.entity_state) for event in rec.events}
    wanted = {f"{e}.{s}" for e in ("execution", "step") for s in STATES[e]}
    assert wanted <= seen


def test_engine_failure_shapes() -> None:
    rec = Recorder()
    failed_compensation(rec)
    cancel_with_failed_compensation(rec)
    failures = [e.data for e in rec.events if e.type.endswith("execution.failed")]
    assert {"step_id", "error", "compensation_failed", "compensation_error"} <= set(
        failures[0]["failure"]  # type: ignore[arg-type]
    )
    assert "cancellation" in failures[1]
    # The engine's unknown-flow failure (orchestrator.engine.service._fail_unknown_flow).
    check_data(
        "execution",
        "failed",
        {"failure": {"reason": "unknown_flow", "detail": "the flow was deleted"}},
    )


# ---------------------------------------------------------------- the scheduler
NOMINAL = datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


def tick_data(*, coalesced: int | None = None, trigger: str = "cron") -> dict[str, Any]:
    fire_id = cron_fire_id("acme", "daily", NOMINAL)
    data: dict[str, Any] = {
        "fire_id": fire_id,
        "nominal_time": iso_ms(NOMINAL),
        "execution_id": execution_id_for(fire_id),
        "trigger": trigger,
    }
    if coalesced:
        data["coalesced"] = coalesced
    return data


def unrun(reason: str) -> dict[str, Any]:
    fire_id = cron_fire_id("acme", "daily", NOMINAL)
    return {"fire_id": fire_id, "nominal_time": iso_ms(NOMINAL), "reason": reason}


def summary(reason: str, *, truncated: bool) -> dict[str, Any]:
    return {
        "reason": reason,
        "summary": True,
        "count": 250,
        "count_is_lower_bound": truncated,
        "first": iso_ms(NOMINAL),
        "last": iso_ms(NOMINAL + timedelta(hours=249)),
    }


@pytest.mark.parametrize(
    ("state", "data"),
    [
        ("fired", tick_data()),
        ("fired", tick_data(coalesced=3, trigger="catch_up")),
        ("buffered", tick_data()),
        ("skipped", {**tick_data(), "reason": "paused"}),
        ("skipped", {**tick_data(coalesced=2, trigger="catch_up"), "reason": "paused"}),
        ("skipped", {**tick_data(), "reason": "overlap"}),
        ("skipped", {**tick_data(), "reason": "quarantined"}),
        ("skipped", unrun("missed")),
        ("skipped", summary("missed", truncated=True)),
        ("coalesced", unrun("catch_up")),
        ("coalesced", summary("catch_up", truncated=False)),
    ],
)
def test_tick_events(state: str, data: dict[str, Any]) -> None:
    check_data("tick", state, data)


@pytest.mark.parametrize(
    ("state", "data"),
    [
        ("skipped", {**unrun("missed"), "reason": "late"}),  # not a reason of skipped
        ("coalesced", unrun("missed")),
        ("fired", {**tick_data(), "coalesced": True}),
        ("fired", {**tick_data(), "trigger": "request"}),
        ("skipped", {"reason": "missed"}),  # neither one tick nor a summary
        ("skipped", {**summary("missed", truncated=False), "count": None}),
        ("coalesced", {**unrun("catch_up"), "nominal_time": 1774747800}),
        ("coalesced", {**unrun("catch_up"), "nominal_time": "2026-03-29T01:30:00"}),  # no offset
    ],
)
def test_bad_tick_events_are_refused(state: str, data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        check_data("tick", state, data)


def accepted(*, duplicate: bool = False, buffered: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "idempotency_key": "order-42",
        "execution_id": execution_id_for("acme/daily#abc"),
        "fire_id": "acme/daily#0123456789abcdef0123456789abcdef",
    }
    if duplicate:
        data["duplicate"] = True
    if buffered:
        data["buffered"] = True
    return data


@pytest.mark.parametrize("data", [accepted(), accepted(duplicate=True), accepted(buffered=True)])
def test_flow_start_accepted(data: dict[str, Any]) -> None:
    check_data("flow_start", "accepted", data)


def test_flow_start_refused_by_policy() -> None:
    """orchestrator.scheduler.ingress.Ingress._refuse"""
    data: dict[str, Any] = {
        "reason": "rate_limited",
        "detail": "more than 10 flow starts at once or 5/s for tenant 'acme'",
        "queue": "ingress.acme",
    }
    check_data("flow_start", "rejected", data)
    check_data("flow_start", "rejected", {**data, "message_id": "m-1"})
    with pytest.raises(ValidationError):
        check_data("flow_start", "rejected", {"reason": "paused", "queue": "ingress.acme"})


# ---------------------------------------------------------------- rejections (orchestrator.amqp)
@dataclass
class Incoming:
    """What the rejection path reads of an aio-pika IncomingMessage."""

    body: bytes
    message_id: str | None = "m-1"
    user_id: str | None = None


@pytest.mark.parametrize("message_id", ["m-1", "has space", None])
@pytest.mark.parametrize("extra", [{}, {"dropped": True}])
def test_rejection_events(message_id: str | None, extra: dict[str, Any]) -> None:
    incoming = Incoming(body=b"{", message_id=message_id, user_id="acme")
    for entity, queue in (("message", "fq.acme"), ("flow_start", "ingress.acme")):
        event = amqp.rejection_event(
            queue,
            incoming,  # type: ignore[arg-type]
            "schema_violation",
            "tenant: field required",
            entity=entity,
            **extra,
        )
        assert event.entity_state == (entity, "rejected")
        check_data(*event.entity_state, event.data)


def test_bare_and_kafka_rejections() -> None:
    # The fallback of amqp.rejection_event, and the violations service's Kafka rejection.
    check_data("message", "rejected", {"queue": "fq.acme", "reason": "invalid"})
    check_data(
        "message",
        "rejected",
        {"topic": "usage", "reason": "invalid_usage_event", "detail": "cpu_s: field required"},
    )
    with pytest.raises(ValidationError):
        check_data("message", "rejected", {"queue": "fq.acme"})
    with pytest.raises(ValidationError):
        check_data("message", "rejected", {"queue": "fq.acme", "reason": "x", "dropped": "yes"})


# ---------------------------------------------------------------- violations
def _iso(epoch: float) -> str:  # orchestrator.violations.service._iso
    return datetime.fromtimestamp(epoch, UTC).isoformat()


RUNGS: list[policy.Warn | policy.Penalty | policy.Quarantine] = [
    policy.Warn(action="warn"),
    policy.Penalty(action="penalty", minutes=10),
    policy.Quarantine(action="quarantine", minutes=15),
]


def figures(decision: policy.Decision) -> dict[str, object]:
    """As orchestrator.violations.service.Violations._announce builds them."""
    return {
        "rule": decision.rule,
        "measured": round(decision.measured, 6),
        "limit": decision.limit,
        "reason": decision.reason,
        "offences": decision.offences,
        "window_start": _iso(decision.window_start),
        "window_s": decision.window_s,
        "action": decision.action,
        "command_id": decision.command_id,
        "expires_at": None if decision.expires_at is None else _iso(decision.expires_at),
    }


def decision(
    rung: policy.Warn | policy.Penalty | policy.Quarantine, flow: str | None
) -> policy.Decision:
    return policy.Decision(
        tenant="acme",
        flow=flow,
        rule="steps_per_min",
        rung_index=RUNGS.index(rung),
        rung=rung,
        offences=RUNGS.index(rung) + 1,
        measured=1234.5678901,
        limit=600,  # an int limit, as a plan may give one
        reason="steps_per_min: 1235 steps/min, limit 600 (offence 1 within 3600 s)",
        window_start=1_777_000_000.25,
        window_s=60,
        decided_at=1_777_000_061.5,
    )


@pytest.mark.parametrize("flow_id", [None, "daily"])
@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: r.action)
def test_tenant_decisions(
    rung: policy.Warn | policy.Penalty | policy.Quarantine, flow_id: str | None
) -> None:
    state = {"warn": "warned", "penalty": "penalized", "quarantine": "quarantined"}[rung.action]
    data = figures(decision(rung, flow_id))
    check_data("tenant", state, data)
    # The action must be the event's own, and only a warning has no end.
    wrong = next(s for s in ("warned", "penalized", "quarantined") if s != state)
    with pytest.raises(ValidationError):
        check_data("tenant", wrong, data)


def test_tenant_released() -> None:
    for kind in ("penalty", "quarantine"):
        command_id = decision(RUNGS[1], None).command_id
        check_data("tenant", "released", {"released": kind, "command_id": command_id})
    with pytest.raises(ValidationError):
        check_data("tenant", "released", {"released": "warn", "command_id": "x"})


# ---------------------------------------------------------------- dlq audit (orchestrator.dlq_cli)
def dlq_run(target: dlq.Target | None) -> dict[str, Any]:
    summary = dlq.Summary(moved=3, skipped=1, over_limit=["m-9"], failed=0, seconds=0.123456)
    summary.reasons.update({"schema_violation": 2, "too_large": 1})
    return {
        "queue": "ingress.acme.dlq",
        "by": "ops",
        "filters": {"reason": "schema_violation"},
        "to": _destination(target),
        **summary.as_dict(),
    }


@pytest.mark.parametrize(
    "target",
    [dlq.Target.parse("original"), dlq.Target.parse("queue:fq.acme"), dlq.Target.parse("x:y")],
)
def test_dlq_replayed(target: dlq.Target) -> None:
    check_data("dlq", "replayed", dlq_run(target))
    with pytest.raises(ValidationError):
        check_data("dlq", "purged", dlq_run(target))


def test_dlq_purged() -> None:
    check_data("dlq", "purged", dlq_run(None))
    with pytest.raises(ValidationError):
        check_data("dlq", "replayed", dlq_run(None))
    with pytest.raises(ValidationError):
        check_data("dlq", "purged", {**dlq_run(None), "reasons": {"x": "2"}})


# ---------------------------------------------------------------- strictness
STEP = {"step_id": "a", "attempt": 1}


@pytest.mark.parametrize(
    ("kind", "data"),
    [
        ("step.succeeded", {**STEP, "attempt": "1"}),  # a number as a string
        ("step.succeeded", {**STEP, "attempt": True}),  # a boolean as a number
        ("step.succeeded", {**STEP, "attempt": 1.0}),
        ("step.succeeded", {**STEP, "attempt": 0}),
        ("step.succeeded", {"step_id": "a"}),  # a required field missing
        ("step.succeeded", {**STEP, "step_id": "Not.A.Slug"}),
        ("step.compensated", {**STEP, "attempt": None}),
        ("step.waiting", {"step_id": "a", "reason": "circuit_open", "until": "soon"}),
        (
            "step.retrying",
            {**STEP, "kind": "undo", "delay_s": 1.0, "error": {"type": "X", "retryable": True}},
        ),
        (
            "step.retrying",
            {**STEP, "kind": "action", "delay_s": "1", "error": {"type": "X", "retryable": True}},
        ),
        ("step.failed", {**STEP, "kind": "action", "error": {"type": "X", "retryable": "no"}}),
        ("step.failed", {**STEP, "kind": "action", "error": {"retryable": False}}),
        ("execution.started", {"fire_id": "f", "steps": "3"}),
        ("execution.succeeded", {"fire_id": "f", "duration_s": 1.5, "outputs": {"a": None}}),
        ("execution.cancelling", {"cancellation": {"reason": "x", "at": "2026-05-01T12:00:00Z"}}),
        ("execution.compensated", {"fire_id": "f", "duration_s": 1.5}),
        ("execution.succeeded", {"fire_id": "f", "duration_s": float("nan"), "outputs": {}}),
    ],
)
def test_wrong_types_are_refused(kind: str, data: dict[str, Any]) -> None:
    entity, _, state = kind.partition(".")
    with pytest.raises(ValidationError):
        check_data(entity, state, data)


def test_unknown_fields_are_allowed_and_ints_pass_as_floats() -> None:
    check_data("step", "succeeded", {**STEP, "later": {"added": True}})
    check_data(
        "step",
        "retrying",
        {
            **STEP,
            "kind": "action",
            "delay_s": 2,
            "error": {"type": "X", "retryable": True, "stack": "..."},
        },
    )
    check_data("execution", "succeeded", {"fire_id": "f", "duration_s": 0, "outputs": {}})
