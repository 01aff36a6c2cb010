"""`orchestrator top`: the live terminal view of an `Overview` (rich).

Per tenant: weight, its share of the weights against its share of the cost served in the
last minute, dwell p50/p99, in flight, backlog, penalty or quarantine and until when. Then
the workers and their load, executions per second, DLQ depths, and the latest violations.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from orchestrator import store
from orchestrator.config import Settings
from orchestrator.outage import sleep_unless
from orchestrator.overview import Overview, gather

STATE_STYLE = {"ok": "green", "penalised": "yellow", "quarantined": "bold red"}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _until(iso: str | None) -> str:
    if not iso:
        return ""
    try:
        left = (datetime.fromisoformat(iso) - datetime.now(UTC)).total_seconds()
    except ValueError:
        return iso
    return f"{max(0, left) / 60:.1f} min left" if left < 7200 else iso


def _bar(share: float, width: int = 10) -> str:
    filled = round(max(0.0, min(1.0, share)) * width)
    return "█" * filled + "·" * (width - filled)


def render(overview: Overview) -> Group:
    tenants = Table(
        title="tenants: share of the weights, and of the cost served in the last minute",
        expand=True,
    )
    tenants.add_column("tenant", no_wrap=True)
    for column in ("weight", "weight%", "served%"):
        tenants.add_column(column, justify="right", no_wrap=True)
    tenants.add_column("", no_wrap=True)
    for column in ("dwell p50", "p99 ms", "in flight", "queued"):
        tenants.add_column(column, justify="right", no_wrap=True)
    tenants.add_column("state")
    for row in overview.tenants:
        weight = f"{row.weight:g}" + (f" x{row.factor:g}" if row.factor != 1 else "")
        state = Text(row.state, style=STATE_STYLE.get(row.state, ""))
        if row.until:
            state.append(f" ({_until(row.until)})", style="dim")
        tenants.add_row(
            row.tenant,
            weight,
            f"{row.weight_share:.0%}",
            f"{row.served_share:.0%}",
            _bar(row.served_share),
            _ms(row.dwell_p50_ms),
            _ms(row.dwell_p99_ms),
            str(row.in_flight),
            str(row.backlog),
            state,
        )
    workers = Table(title="workers", expand=True)
    for column in ("id", "pool", "load", "steps"):
        workers.add_column(column)
    for entry in overview.workers:
        load = f"{entry.get('in_flight', 0)}/{entry.get('concurrency', '?')}"
        workers.add_row(
            str(entry.get("id")), str(entry.get("pool")), load, ", ".join(entry.get("steps", []))
        )
    rates = ", ".join(f"{state} {rate:.1f}/s" for state, rate in overview.executions_per_s.items())
    dispatcher = overview.dispatcher
    lead = (
        f"dispatcher {dispatcher.get('id', '?')}: window {dispatcher.get('window')}, "
        f"in flight {dispatcher.get('in_flight_total')}"
        if dispatcher
        else "no dispatcher leads"
    )
    dlqs = ", ".join(f"{name} {depth}" for name, depth in overview.dlqs.items() if depth) or "empty"
    violations = Table(title="latest violations", expand=True)
    for column in ("window", "tenant", "rule", "action", "measured / limit", "reason"):
        violations.add_column(column)
    for entry in overview.violations[:5]:
        violations.add_row(
            str(entry.get("window_start", ""))[11:19],
            str(entry.get("tenant")),
            str(entry.get("rule")),
            str(entry.get("action")),
            f"{_num(entry.get('measured'))} / {_num(entry.get('limit'))}",
            str(entry.get("reason", ""))[:60],
        )
    summary = Text.assemble(
        ("executions: ", "bold"),
        rates or "none in the last 10 s",
        "   ",
        (lead, "dim"),
        "\n",
        ("DLQs: ", "bold"),
        (dlqs, "red" if any(overview.dlqs.values()) else "green"),
    )
    parts: list[Any] = [Panel(summary, title=f"orchestrator top  {overview.at[11:19]} UTC")]
    parts += [tenants, violations, workers]
    parts += [Text(error, style="red") for error in overview.errors]
    return Group(*parts)


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


async def run(
    settings: Settings,
    *,
    interval_s: float = 1.0,
    once: bool = False,
    stop: asyncio.Event | None = None,
) -> None:
    """Refreshes every `interval_s` until `stop` (or Ctrl-C); `once` prints one frame."""
    redis = store.connect(settings)
    console = Console()
    stop = stop or asyncio.Event()
    try:
        if once:
            console.print(render(await gather(settings, redis)))
            return
        with Live(console=console, screen=False, auto_refresh=False) as live:
            while not stop.is_set():
                try:
                    frame = render(await gather(settings, redis))
                except Exception as exc:  # a broker away: say so, keep watching
                    frame = Group(Text(f"cannot read the system: {exc!r}", style="red"))
                live.update(frame, refresh=True)
                await sleep_unless(stop, interval_s)
    finally:
        with contextlib.suppress(Exception):
            await redis.aclose()
