"""The violations consumer's bookkeeping over its tables: which window an event counts in,
when a window closes, what was decided. No I/O of its own: the tables are mappings (faust
tables backed by changelog topics in the app, plain dicts in unit tests).

Determinism is the point. A consumer killed at any moment replays events and ticks from its
last committed offset onto tables restored from their changelogs, and must reach the same
decisions with the same command ids:

* An event counts in the tumbling window of its `finished_at`, once: each table entry keeps
  the offset of the last record applied, so a replayed record is skipped.
* Ticks are records the consumer appends to every partition of the usage topic. A tick
  appended at T closes the windows with end + grace < T: every on-time record of those
  windows precedes the tick in the partition.
* A record that arrives after its window was closed (workers flushing what they buffered
  through a Kafka outage) still counts: the closed window is kept `late_s` past its end, the
  record amends it, and the next tick decides it again. Only decisions for subjects not yet
  decided in that window come out (a corrective decision, with the same deterministic id it
  would have had on time). A record appended (broker `LogAppendTime`) more than `late_s`
  after its window's end is late and ignored, whenever it is read: lateness is a property of
  the record, not of when we read it.
* Windows forgotten after `late_s` are remembered (`purged_until`), so replayed events and
  ticks change nothing; decisions use offences of earlier windows only (`policy.decide`).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

from orchestrator.violations import policy
from orchestrator.violations.policy import Decision, Offence, PolicyFile, Stats
from schemas import UsageEvent

Table = MutableMapping[str, Any]


@dataclass(frozen=True)
class Window:
    """One window of one partition, ready to be decided (again, when `amended`)."""

    partition: int
    start: int
    size: int
    tenants: tuple[str, ...]
    amended: bool = False


@dataclass(frozen=True)
class Expired:
    key: str
    tenant: str
    flow: str | None
    kind: str  # "penalty" | "quarantine"
    command_id: str


class Book:
    """Tables (all JSON values):

    * windows  `<tenant>|<start>`    -> tenant stats, per-flow stats and spans, last offset
    * totals   `<partition>|<start>` -> everybody's stats, tenants seen, size, last offset
    * cursors  `<partition>`         -> open window starts, closed ones (start -> subjects
                                        decided) and those amended since, purged_until
    * offences `<subject>`           -> recent offences (the ladder's memory)
    * active   `<subject>|<kind>`    -> the punishment in force, to announce its expiry
    """

    def __init__(
        self,
        policy_file: PolicyFile,
        *,
        windows: Table,
        totals: Table,
        cursors: Table,
        offences: Table,
        active: Table,
        grace_s: float,
        late_s: float = 600.0,
    ) -> None:
        self.policy = policy_file
        self.late_s = late_s
        self.windows = windows
        self.totals = totals
        self.cursors = cursors
        self.offences = offences
        self.active = active
        self.grace_s = grace_s

    # ------------------------------------------------------------------ events
    def add(self, event: UsageEvent, *, partition: int, offset: int, appended_ms: int) -> str:
        """Counts the event; returns "counted", "amended" (its window was closed: decided
        again at the next tick), "late", "closed" or "replayed"."""
        size = self.policy.window_s
        start = int(event.finished_at.timestamp()) // size * size
        if appended_ms / 1000 > start + size + self.late_s:
            return "late"
        cursor = self._cursor(partition)
        if start <= cursor["purged_until"]:
            return "closed"
        closed = str(start) in cursor["closed"]
        key = f"{event.tenant}|{start}"
        entry = self.windows.get(key) or {"stats": {}, "flows": {}, "spans": {}, "offset": -1}
        if offset <= entry["offset"]:
            return "closed" if closed else "replayed"
        entry = {
            "stats": policy.add(_stats(entry["stats"]), event).to_dict(),
            "flows": {
                **entry["flows"],
                event.flow_id: policy.add(
                    _stats(entry["flows"].get(event.flow_id)), event
                ).to_dict(),
            },
            "spans": {
                **entry["spans"],
                event.flow_id: policy.span_add(entry["spans"].get(event.flow_id, {}), event),
            },
            "offset": offset,
        }
        self.windows[key] = entry
        total_key = f"{partition}|{start}"
        total = self.totals.get(total_key) or {
            "stats": {},
            "tenants": [],
            "size": size,
            "offset": -1,
        }
        if offset > total["offset"]:
            tenants = total["tenants"]
            self.totals[total_key] = {
                "stats": policy.add(_stats(total["stats"]), event).to_dict(),
                "tenants": tenants if event.tenant in tenants else sorted([*tenants, event.tenant]),
                "size": total["size"],
                "offset": offset,
            }
        if closed:
            if start not in cursor["amended"]:
                amended = sorted([*cursor["amended"], start])
                self.cursors[str(partition)] = {**cursor, "amended": amended}
            return "amended"
        if start not in cursor["open"]:
            self.cursors[str(partition)] = {**cursor, "open": sorted([*cursor["open"], start])}
        return "counted"

    # ------------------------------------------------------------------ ticks
    def due(self, partition: int, appended_ms: int) -> list[Window]:
        """Windows of the partition that a tick appended at `appended_ms` closes, and closed
        ones that late records amended since the last tick."""
        now = appended_ms / 1000
        cursor = self._cursor(partition)
        found = []
        for start in cursor["open"]:
            total = self.totals.get(f"{partition}|{start}")
            size = int(total["size"]) if total else self.policy.window_s
            if start + size + self.grace_s < now:
                tenants = tuple(total["tenants"]) if total else ()
                found.append(Window(partition, start, size, tenants))
        for start in cursor["amended"]:
            total = self.totals.get(f"{partition}|{start}")
            size = int(total["size"]) if total else self.policy.window_s
            tenants = tuple(total["tenants"]) if total else ()
            found.append(Window(partition, start, size, tenants, amended=True))
        return found

    def purge(self, partition: int, appended_ms: int) -> None:
        """Forgets closed windows that no record may amend any more (`late_s` past their end)."""
        now = appended_ms / 1000
        cursor = self._cursor(partition)
        gone = [
            int(start)
            for start in cursor["closed"]
            if int(start) + self.policy.window_s + self.late_s < now
            and int(start) not in cursor["amended"]
        ]
        if not gone:
            return
        for start in gone:
            total = self.totals.pop(f"{partition}|{start}", None)
            for tenant in total["tenants"] if total else []:
                self.windows.pop(f"{tenant}|{start}", None)
        self.cursors[str(partition)] = {
            **cursor,
            "closed": {k: v for k, v in cursor["closed"].items() if int(k) not in gone},
            "purged_until": max(cursor["purged_until"], *gone),
        }

    def decide(
        self,
        window: Window,
        intervals: dict[str, dict[str, float]],
        decided_at: float | None = None,
    ) -> list[Decision]:
        """The decisions for a closed window: at most one per tenant-wide subject and one
        per flow. `intervals` maps tenant -> flow -> schedule interval in seconds;
        `decided_at` is the log time of the deciding tick (punishments run from it)."""
        total = self.totals.get(f"{window.partition}|{window.start}")
        if total is None:
            return []
        everybody = _stats(total["stats"])
        decisions = []
        for tenant in window.tenants:
            entry = self.windows.get(f"{tenant}|{window.start}")
            if entry is None:
                continue
            plan = policy.plan_for(self.policy, tenant)
            found = policy.evaluate(
                plan,
                tenant,
                window_s=window.size,
                tenant_stats=_stats(entry["stats"]),
                total_stats=everybody,
                flow_stats={flow: _stats(s) for flow, s in entry["flows"].items()},
                flow_spans={
                    flow: {execution: (span[0], span[1]) for execution, span in spans.items()}
                    for flow, spans in entry["spans"].items()
                },
                intervals=intervals.get(tenant, {}),
            )
            by_subject: dict[str, list[policy.Violation]] = {}
            for violation in found:
                by_subject.setdefault(violation.subject, []).append(violation)
            for subject, violations in sorted(by_subject.items()):
                decision = policy.decide(
                    plan,
                    violations,
                    self._history(subject),
                    window_start=window.start,
                    window_s=window.size,
                    lookback_s=self.policy.lookback_s,
                    decided_at=decided_at,
                )
                if decision is not None:
                    decisions.append(decision)
        # A window decided again (amended by late records): only what is new comes out.
        decided = self._cursor(window.partition)["closed"].get(str(window.start), [])
        return [d for d in decisions if _subject(d.tenant, d.flow) not in decided]

    def closed(self, window: Window, decisions: list[Decision]) -> None:
        """Records a window's decisions (after their commands are confirmed) and forgets it."""
        horizon = window.start - self.policy.lookback_s
        for decision in decisions:
            subject = _subject(decision.tenant, decision.flow)
            kept = [o for o in self._history(subject) if o.window_start >= horizon]
            if not any(o.window_start == window.start for o in kept):
                kept.append(decision.offence())
            self.offences[subject] = [o.to_dict() for o in kept]
            if decision.expires_at is not None:
                self.active[f"{subject}|{decision.action}"] = {
                    "tenant": decision.tenant,
                    "flow": decision.flow,
                    "command_id": decision.command_id,
                    "expires_at": decision.expires_at,
                    "partition": window.partition,
                }
        cursor = self._cursor(window.partition)
        decided = cursor["closed"].get(str(window.start), [])
        subjects = sorted({*decided, *(_subject(d.tenant, d.flow) for d in decisions)})
        self.cursors[str(window.partition)] = {
            **cursor,
            "open": [s for s in cursor["open"] if s != window.start],
            "amended": [s for s in cursor["amended"] if s != window.start],
            "closed": {**cursor["closed"], str(window.start): subjects},
        }

    def expired(self, partition: int, appended_ms: int) -> list[Expired]:
        """Punishments decided on this partition that ran out by a tick appended at
        `appended_ms` (each partition's ticks announce its own)."""
        now = appended_ms / 1000
        found = []
        for key, entry in list(self.active.items()):
            if entry["partition"] != partition:
                continue
            if entry["expires_at"] <= now:
                kind = key.rsplit("|", 1)[1]
                found.append(
                    Expired(key, entry["tenant"], entry["flow"], kind, entry["command_id"])
                )
        return found

    def released(self, expired: Expired) -> None:
        self.active.pop(expired.key, None)

    # ------------------------------------------------------------------ helpers
    def _cursor(self, partition: int) -> dict[str, Any]:
        cursor = self.cursors.get(str(partition)) or {}
        return {
            "open": cursor.get("open", []),
            "closed": cursor.get("closed", {}),
            "amended": cursor.get("amended", []),
            # `closed_until` is what cursors written before amendments kept
            "purged_until": cursor.get("purged_until", cursor.get("closed_until", -1)),
        }

    def _history(self, subject: str) -> list[Offence]:
        return [Offence.from_dict(o) for o in self.offences.get(subject) or []]


def _stats(data: dict[str, Any] | None) -> Stats:
    return Stats.from_dict(data) if data else Stats()


def _subject(tenant: str, flow: str | None) -> str:
    return tenant if flow is None else f"{tenant}/{flow}"
