"""Violation policy: window statistics, plan limits, the escalation ladder. Pure, no I/O.

The violations consumer aggregates `UsageEvent`s in tumbling windows per tenant and per flow
(`add`, `span_add`), and once a window has closed calls `evaluate` per tenant, then `decide`
per subject (a tenant, or tenant/flow for per-flow rules). Everything here is a function of
its arguments only, so a consumer restarted mid-way re-derives, for the same window, the same
decision with the same command id and the same content:

* `decide` counts only offences of windows *before* the one decided (this window's own
  offence, possibly recorded before a crash, is ignored) and counts each window once;
* command ids derive from (action, rule, subject, window start), and `issued_at`/`expires_at`
  from `decided_at`: the log time of the tick that decided the window (the window end when
  not given), never from the clock. A punishment runs its full length from its decision, so
  a window decided late (its records flushed after a Kafka outage, a consumer that was down)
  is punished as one decided on time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self, get_args

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic_core import ErrorDetails

from schemas.common import Contract, Slug, TenantId
from schemas.control import PenaltyCommand, QuarantineCommand
from schemas.usage import UsageEvent

Rule = Literal["cpu_share", "steps_per_min", "error_rate", "memory_per_step", "runtime_vs_interval"]
RULES: tuple[Rule, ...] = get_args(Rule)  # of several for one subject, the first is acted on
MAX_EXECUTIONS = 64  # executions tracked per flow per window, see `span_add`
ISSUED_BY = "violations"
MIB = 1024 * 1024
MAX_REASON = 1024  # `ShortText`

# --- window statistics ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stats:
    """Usage of one tenant, one flow or everybody in one window. Each event is one attempt."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0
    errors: int = 0  # outcome other than "succeeded"
    io_bytes: int = 0  # bytes_in + bytes_out
    peak_memory_bytes: int = 0  # of the hungriest single step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stats:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


def add(stats: Stats, event: UsageEvent) -> Stats:
    return Stats(
        cpu_s=stats.cpu_s + event.cpu_s,
        wall_s=stats.wall_s + event.wall_s,
        steps=stats.steps + 1,
        errors=stats.errors + int(event.outcome != "succeeded"),
        io_bytes=stats.io_bytes + event.bytes_in + event.bytes_out,
        peak_memory_bytes=max(stats.peak_memory_bytes, event.peak_memory_bytes),
    )


Span = tuple[float, float]  # (first step started, last step finished), epoch seconds


def span_add(
    spans: Mapping[str, Span], event: UsageEvent, limit: int = MAX_EXECUTIONS
) -> dict[str, Span]:
    """Widens the span of the event's execution; `spans` maps execution id to span (lists, as
    read back from JSON, are accepted). Bounded: once `limit` executions are tracked, events of
    further executions are ignored, so the window measures the first `limit` executions seen
    (a deterministic choice: Kafka keeps one tenant's events in order). A span only covers the
    steps seen in this window, so executions longer than the window are measured in parts."""
    start, end = event.started_at.timestamp(), event.finished_at.timestamp()
    out = dict(spans)
    known = out.get(event.execution_id)
    if known is not None:
        out[event.execution_id] = (min(known[0], start), max(known[1], end))
    elif len(out) < limit:
        out[event.execution_id] = (start, end)
    return out


# --- the policy file ------------------------------------------------------------------------


class Limits(Contract):
    """Every `max_*` limit is optional: absent or null turns its rule off."""

    max_cpu_share: Annotated[float, Field(gt=0, le=1)] | None = None
    min_cpu_s: Annotated[float, Field(ge=0)] = 30.0  # share rule floor, in window CPU seconds
    max_steps_per_min: Annotated[float, Field(gt=0)] | None = None
    max_error_rate: Annotated[float, Field(ge=0, le=1)] | None = None
    min_steps_for_error_rate: Annotated[int, Field(ge=1)] = 20
    max_memory_per_step_mb: Annotated[float, Field(gt=0)] | None = None  # MiB
    max_runtime_ratio: Annotated[float, Field(gt=0)] | None = None  # x the schedule interval
    min_runtime_executions: Annotated[int, Field(ge=1)] = 3


Minutes = Annotated[float, Field(gt=0)]


class Warn(Contract):
    action: Literal["warn"]


class Penalty(Contract):
    action: Literal["penalty"]
    minutes: Minutes
    weight_factor: Annotated[float, Field(gt=0, le=1)] = 0.5
    concurrency_cap: Annotated[int, Field(ge=0)] | None = None
    rate_per_s: Annotated[float, Field(gt=0)] | None = None


class Quarantine(Contract):
    action: Literal["quarantine"]
    minutes: Minutes


Rung = Annotated[Warn | Penalty | Quarantine, Field(discriminator="action")]


class Plan(Contract):
    limits: Limits = Field(default_factory=Limits)
    ladder: Annotated[list[Rung], Field(min_length=1)]


class PolicyFile(Contract):
    window_s: Annotated[int, Field(ge=1)] = 60  # whole seconds: window starts name commands
    lookback_s: Annotated[int, Field(ge=0)] = 3600
    default_plan: Slug
    tenants: dict[TenantId, Slug] = Field(default_factory=dict)
    plans: Annotated[dict[Slug, Plan], Field(min_length=1)]

    @model_validator(mode="after")
    def _plans_exist(self) -> Self:
        known = ", ".join(sorted(self.plans))
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan: unknown plan {self.default_plan!r} (plans: {known})")
        for tenant, plan in sorted(self.tenants.items()):
            if plan not in self.plans:
                raise ValueError(f"tenants.{tenant}: unknown plan {plan!r} (plans: {known})")
        return self


class PolicyError(ValueError):
    """A policy file could not be read or is invalid; the message names the file and field."""


def _describe(error: ErrorDetails) -> str:
    location = ".".join(str(part) for part in error["loc"])
    ctx = error.get("ctx", {})
    message = str(ctx["error"]) if error["type"] == "value_error" else error["msg"]
    return f"{location}: {message}" if location else message


def load_policy(path: str | Path) -> PolicyFile:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PolicyError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{path}: expected a mapping at the top, got {type(raw).__name__}")
    try:
        return PolicyFile.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise PolicyError("\n".join(f"{path}: {_describe(e)}" for e in errors)) from None


def plan_for(policy: PolicyFile, tenant: str) -> Plan:
    return policy.plans[policy.tenants.get(tenant, policy.default_plan)]


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Violation:
    rule: Rule
    tenant: str
    flow: str | None  # None: the rule acts on the whole tenant
    measured: float
    limit: float
    detail: str

    @property
    def subject(self) -> str:
        return self.tenant if self.flow is None else f"{self.tenant}/{self.flow}"


def evaluate(
    plan: Plan,
    tenant: str,
    *,
    window_s: float,
    tenant_stats: Stats,
    total_stats: Stats,
    flow_stats: Mapping[str, Stats] | None = None,
    flow_spans: Mapping[str, Mapping[str, Span]] | None = None,
    intervals: Mapping[str, float] | None = None,
) -> list[Violation]:
    """The tenant's violations in one closed window: tenant-wide rules in `RULES` order, then
    the per-flow runtime rule by flow id. `total_stats` covers every tenant (for the CPU
    share); `intervals` maps a flow to its schedule interval in seconds (unscheduled flows are
    absent and skip the runtime rule)."""
    lim, s, found = plan.limits, tenant_stats, list[Violation]()

    def check(rule: Rule, measured: float, limit: float, detail: str, shown: str) -> None:
        if measured > limit:
            found.append(Violation(rule, tenant, None, measured, limit, f"{detail}, limit {shown}"))

    if lim.max_cpu_share is not None and total_stats.cpu_s > 0 and s.cpu_s >= lim.min_cpu_s:
        share, limit = s.cpu_s / total_stats.cpu_s, lim.max_cpu_share
        detail = f"used {share:.1%} of all CPU time ({s.cpu_s:.1f} of {total_stats.cpu_s:.1f} s)"
        check("cpu_share", share, limit, detail, f"{limit:.1%}")
    if lim.max_steps_per_min is not None:
        rate, limit = s.steps / (window_s / 60), lim.max_steps_per_min
        detail = f"ran {rate:.1f} steps/min ({s.steps} in {window_s:g} s)"
        check("steps_per_min", rate, limit, detail, f"{limit:g}")
    if lim.max_error_rate is not None and s.steps >= lim.min_steps_for_error_rate:
        rate, limit = s.errors / s.steps, lim.max_error_rate
        detail = f"{rate:.1%} of steps failed ({s.errors} of {s.steps})"
        check("error_rate", rate, limit, detail, f"{limit:.1%}")
    if lim.max_memory_per_step_mb is not None:
        most, limit = s.peak_memory_bytes, lim.max_memory_per_step_mb
        peak = most / MIB
        top = sorted(f for f, fs in (flow_stats or {}).items() if fs.peak_memory_bytes == most)
        detail = f"a step{f' of flow {top[0]}' if top else ''} peaked at {peak:.0f} MiB"
        check("memory_per_step", peak, limit, detail, f"{limit:g} MiB")
    if lim.max_runtime_ratio is not None:
        ratio, spans, every = lim.max_runtime_ratio, flow_spans or {}, intervals or {}
        for flow in sorted(spans):
            interval = every.get(flow)
            if interval is None or interval <= 0:
                continue
            durations = [end - start for start, end in spans[flow].values()]
            over = [d for d in durations if d > ratio * interval]
            if len(over) >= lim.min_runtime_executions:
                worst = max(over)
                detail = (
                    f"{len(over)} of {len(durations)} executions ran longer than {ratio:g} x the "
                    f"{interval:g} s schedule interval (longest {worst:.1f} s)"
                )
                found.append(
                    Violation("runtime_vs_interval", tenant, flow, worst / interval, ratio, detail)
                )
    return found


# --- the ladder -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Offence:
    """One decision, kept by the consumer per subject to escalate the next ones."""

    tenant: str
    flow: str | None
    rule: str
    window_start: float
    rung: int
    action: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offence:
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True, slots=True)
class Decision:
    tenant: str
    flow: str | None
    rule: Rule
    rung_index: int
    rung: Warn | Penalty | Quarantine
    offences: int  # within the look-back, this one included
    measured: float
    limit: float
    reason: str
    window_start: float
    window_s: float
    decided_at: float | None = None  # the deciding tick's log time; None: at the window end

    @property
    def action(self) -> Literal["warn", "penalty", "quarantine"]:
        return self.rung.action

    @property
    def window_end(self) -> float:
        return self.window_start + self.window_s

    @property
    def starts_at(self) -> float:
        """When the punishment starts: its decision, never before the window's end."""
        return self.window_end if self.decided_at is None else max(self.decided_at, self.window_end)

    @property
    def expires_at(self) -> float | None:
        return None if isinstance(self.rung, Warn) else self.starts_at + self.rung.minutes * 60

    @property
    def command_id(self) -> str:
        flow = "" if self.flow is None else f":{self.flow}"
        return f"{self.action}:{self.rule}:{self.tenant}{flow}:{int(self.window_start)}"

    def offence(self) -> Offence:
        return Offence(
            self.tenant, self.flow, self.rule, self.window_start, self.rung_index, self.action
        )


def decide(
    plan: Plan,
    violations: Sequence[Violation],
    history: Iterable[Offence],
    *,
    window_start: float,
    window_s: float,
    lookback_s: float,
    decided_at: float | None = None,
) -> Decision | None:
    """At most one decision for one subject in one window. Offence n (1-based: distinct
    earlier windows of this subject with `window_start - lookback_s <= start < window_start`,
    whatever the rule, plus this one) takes rung min(n, len(ladder)) - 1. Of several rules,
    the first in `RULES` is acted on and the others named in the reason."""
    if not violations:
        return None
    subjects = {(v.tenant, v.flow) for v in violations}
    if len(subjects) != 1:
        raise ValueError(f"decide() takes one subject, got {sorted(v.subject for v in violations)}")
    tenant, flow = subjects.pop()
    chosen, *others = sorted(violations, key=lambda v: (RULES.index(v.rule), v.measured, v.detail))
    earlier = {
        o.window_start
        for o in history
        if (o.tenant, o.flow) == (tenant, flow)
        and window_start - lookback_s <= o.window_start < window_start
    }
    n = len(earlier) + 1
    index = min(n, len(plan.ladder)) - 1
    reason = f"{chosen.rule}: {chosen.detail}"
    if others:
        reason += "; also " + "; ".join(f"{v.rule}: {v.detail}" for v in others)
    reason += f" (offence {n} within {lookback_s:g} s)"
    return Decision(
        tenant=tenant,
        flow=flow,
        rule=chosen.rule,
        rung_index=index,
        rung=plan.ladder[index],
        offences=n,
        measured=chosen.measured,
        limit=chosen.limit,
        reason=reason,
        window_start=window_start,
        window_s=window_s,
        decided_at=decided_at,
    )


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def to_command(decision: Decision) -> PenaltyCommand | QuarantineCommand | None:
    """The command for a decision (None for a warning), issued when it was decided."""
    rung = decision.rung
    if isinstance(rung, Warn):
        return None
    common: dict[str, Any] = {
        "command_id": decision.command_id,
        "tenant": decision.tenant,
        "flow_id": decision.flow,
        "rule": decision.rule,
        "reason": decision.reason[:MAX_REASON],
        "issued_by": ISSUED_BY,
        "issued_at": _utc(decision.starts_at),
        "expires_at": _utc(decision.starts_at + rung.minutes * 60),
    }
    if isinstance(rung, Quarantine):
        return QuarantineCommand.model_validate(common)
    return PenaltyCommand.model_validate(
        common | rung.model_dump(include={"weight_factor", "concurrency_cap", "rate_per_s"})
    )


def release_id(command_id: str) -> str:
    """The id of the command that ends `command_id` early (re-sent, it is still one release)."""
    return f"release:{command_id}"
