"""When a cron schedule fires, as UTC instants, with one documented rule for daylight saving.

croniter's own timezone code gets DST wrong in the version faust-streaming pins (5.0.1), so
croniter only ever sees *naive local wall-clock* times here; turning those into instants is
done with zoneinfo under the rule Debian's cron(8) users know (and `cronsim` implements):

* **Fixed-time schedules** — neither the minute nor the hour field starts with `*`
  (`30 2 * * *`, `0 9-17 * * 1-5`): a time that falls into a spring-forward gap runs at the
  moment of the jump (a daily job never silently loses a day; several gap times run once); a
  time inside a repeated hour runs once, at its first occurrence.
* **Interval schedules** — the minute or the hour field starts with `*` (`*/15 * * * *`,
  `0 */2 * * *`): they keep their real-time rhythm. Every real instant whose local wall-clock
  time matches fires: nothing fires inside a gap, and a repeated hour fires twice.

Six-field expressions carry seconds as the last field (croniter's convention).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# Longest DST shift in the tz database (Antarctica/Troll: 2 h); bounds every look-back.
MAX_SHIFT = timedelta(hours=2)
# Candidates examined per call before giving up (e.g. `0 0 30 2 *` never fires).
MAX_SCAN = 10_000
ONE_SECOND = timedelta(seconds=1)
ONE_MINUTE = timedelta(minutes=1)


def _is_real(naive: datetime, tz: ZoneInfo) -> bool:
    aware = naive.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


def _is_repeated(naive: datetime, tz: ZoneInfo) -> bool:
    first = naive.replace(tzinfo=tz, fold=0)
    second = naive.replace(tzinfo=tz, fold=1)
    return first.utcoffset() != second.utcoffset() and _is_real(naive, tz)


ANSWERS_KEPT = 256


@dataclass(frozen=True)
class CronSchedule:
    expression: str
    timezone: str = "UTC"
    tz: ZoneInfo = field(init=False, repr=False, compare=False)
    fixed_time: bool = field(init=False, repr=False, compare=False)
    # Parsing an expression costs more than iterating it; one iterator is re-positioned per
    # call (next_after never awaits, so no two callers interleave).
    _iterator: croniter = field(init=False, repr=False, compare=False)
    # Answers already computed: the flows sharing a schedule (everyone's `0 * * * *`) ask the
    # same question at the same instant, so a burst computes it once.
    _answers: dict[datetime, datetime | None] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        expanded = ALIASES.get(self.expression.strip(), self.expression)
        fields = expanded.split()
        object.__setattr__(self, "tz", ZoneInfo(self.timezone))
        object.__setattr__(
            self, "fixed_time", not fields[0].startswith("*") and not fields[1].startswith("*")
        )
        object.__setattr__(self, "expression", expanded)
        object.__setattr__(self, "_iterator", croniter(expanded, datetime(2000, 1, 1)))

    def _instants(self, naive: datetime) -> list[datetime]:
        """The instants one local wall-clock candidate stands for, under the rule above."""
        tz = self.tz
        if self.fixed_time:
            while not _is_real(naive, tz):  # in a gap: run at the jump
                naive = naive.replace(second=0) + ONE_MINUTE
            return [naive.replace(tzinfo=tz, fold=0).astimezone(UTC)]
        if not _is_real(naive, tz):
            return []
        first = naive.replace(tzinfo=tz, fold=0).astimezone(UTC)
        second = naive.replace(tzinfo=tz, fold=1).astimezone(UTC)
        return [first] if first == second else [first, second]

    def next_after(self, after: datetime) -> datetime | None:
        """The first fire instant strictly after `after` (aware), in UTC; None if it never fires."""
        try:
            return self._answers[after]
        except KeyError:
            pass
        if len(self._answers) >= ANSWERS_KEPT:
            self._answers.clear()
        answer = self._answers[after] = self._next_after(after)
        return answer

    def _next_after(self, after: datetime) -> datetime | None:
        local = after.astimezone(self.tz)
        start = local.replace(tzinfo=None, microsecond=0)
        if not self.fixed_time and local.fold == 0 and _is_repeated(start, self.tz):
            # In the first pass of a repeated hour, the second pass of *earlier* wall-clock
            # times may still be ahead of us: start the scan before the repeated hour.
            start -= MAX_SHIFT
        candidates = self._iterator
        candidates.set_current(start - ONE_SECOND, force=True)
        best: datetime | None = None
        for _ in range(MAX_SCAN):
            try:
                naive = candidates.get_next(datetime)
            except (StopIteration, ValueError, KeyError):  # croniter's "no such date"
                break
            instants = self._instants(naive)
            if not instants:
                continue
            if best is not None and instants[0] >= best:
                break
            for instant in instants:
                if instant > after and (best is None or instant < best):
                    best = instant
        return best

    def fires_between(self, start: datetime, end: datetime, limit: int) -> list[datetime]:
        """Fire instants in (start, end], at most `limit` of them (the earliest)."""
        out: list[datetime] = []
        cursor = start
        while len(out) < limit:
            nxt = self.next_after(cursor)
            if nxt is None or nxt > end:
                break
            out.append(nxt)
            cursor = nxt
        return out


def jitter_ms(seed: str, nominal_ms: int, jitter_s: float) -> int:
    """Deterministic jitter: every replica computes the same fire-at for the same tick of the
    same flow (`seed` names the flow)."""
    if jitter_s <= 0:
        return 0
    digest = hashlib.sha256(f"{seed}@{nominal_ms}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (int(jitter_s * 1000) + 1)


def fire_at_ms(seed: str, nominal: datetime, jitter_s: float) -> tuple[int, int]:
    """(fire-at, nominal) in epoch ms: when the tick `nominal` of flow `seed` fires."""
    nominal_ms = round(nominal.timestamp() * 1000)
    return nominal_ms + jitter_ms(seed, nominal_ms, jitter_s), nominal_ms


def next_due(
    seed: str, cron: str | None, timezone: str, jitter_s: float, after: datetime
) -> tuple[int, int] | None:
    """(fire-at, nominal) ms of a flow's next tick after `after`; None without one (no cron,
    or a schedule that never fires again)."""
    if cron is None:
        return None
    nominal = CronSchedule(cron, timezone).next_after(after)
    return None if nominal is None else fire_at_ms(seed, nominal, jitter_s)
