"""``budgeter top``: a live terminal view of every tenant, read straight from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from budgeter.domain.periods import PERIODS
from budgeter.serving import stop_event_on_signals
from budgeter.settings import Settings
from budgeter.store.client import redis_from_settings
from budgeter.tenants.status import status_snapshot

DECISION_STYLE = {"ADMIT": "bold green", "DEFER": "bold yellow", "REJECT": "bold red"}


def _now_ms() -> int:
    return int(time.time() * 1000)


def _tokens(n: int) -> str:
    if n >= 10_000_000:
        return f"{n / 1_000_000:.0f}M"
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,}"


def _age(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def _budget_cell(budget: dict[str, Any], *, compact: bool = False) -> Text:
    limit = max(1, int(budget["limit"]))
    pct = 100 * int(budget["remaining"]) / limit
    style = "red" if pct < 15 else "yellow" if pct < 40 else "green"
    shown = f"{pct:.1f}" if 0 < pct < 10 or 99 < pct < 100 else f"{pct:.0f}"
    if compact:
        return Text(f"{shown}%", style=style)
    reserved = int(budget["reserved"])
    cell = Text(_tokens(int(budget["used"])))
    if reserved:
        cell.append(f"+{_tokens(reserved)}", style="cyan")
    cell.append(f"/{_tokens(int(budget['limit']))} ")
    cell.append(f"{shown}%", style=style)
    return cell


def _last_decision(recent: list[dict[str, Any]], now_ms: int) -> tuple[Text, Text]:
    """(how long ago, decision and reason) of the newest admission decision."""
    if not recent:
        return Text("-", style="dim"), Text("-", style="dim")
    last = recent[0]
    text = Text(last["decision"], style=DECISION_STYLE.get(last["decision"], "bold"))
    if last["reason"]:
        text.append(f" {last['reason']}")
    return Text(f"{_age((now_ms - last['at_ms']) / 1000)} ago", style="dim"), text


def render_snapshot(snapshot: Mapping[str, Any], *, width: int = 200) -> Group:
    """The header line and one table row per tenant (budgets as % only when narrow)."""
    now_ms = int(snapshot["now_ms"])
    tenants = snapshot["tenants"]
    sched = snapshot["scheduler"]
    parked = {p["tenant"]: p["until_ms"] for p in sched["parked"]}
    header = Text()
    header.append("budgeter top", style="bold")
    header.append(f"  {time.strftime('%H:%M:%S', time.gmtime(now_ms / 1000))} UTC  ", style="dim")
    header.append(f"tenants {len(tenants)}  ")
    header.append(f"ready {sched['ready']}  ", style="cyan")
    header.append(f"parked {len(parked)}", style="yellow" if parked else "")
    if parked:
        header.append(
            " (" + ", ".join(f"{t} {_age((u - now_ms) / 1000)}" for t, u in parked.items()) + ")",
            style="dim",
        )

    periods = [p for p in PERIODS if any(b["period"] == p for t in tenants for b in t["budgets"])]
    compact = width < 60 + 22 * len(periods)
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        expand=False,
        header_style="bold",
        caption="budgets: % remaining"
        if compact
        else "budgets: used[+reserved]/limit and % remaining",
        caption_justify="left",
    )
    table.add_column("tenant", style="bold", no_wrap=True)
    table.add_column("queued", justify="right", no_wrap=True)
    table.add_column("inflight", justify="right", no_wrap=True)
    table.add_column("oldest", justify="right", no_wrap=True)
    for period in periods:
        table.add_column(period, justify="right")
    table.add_column("last", justify="right", no_wrap=True)
    table.add_column("decision", min_width=24)
    for tenant in tenants:
        by_period = {
            b["period"]: b
            for b in tenant["budgets"]
            if b.get("unit", "tokens") == "tokens" and b.get("model") is None
        }
        name = Text(tenant["tenant"])
        if tenant["tenant"] in parked:
            name.append(" (parked)", style="yellow")
        table.add_row(
            name,
            f"{tenant['queued']:,}",
            f"{tenant['inflight']:,}",
            _age(tenant["oldest_age_s"]) if tenant["queued"] else "-",
            *(
                _budget_cell(by_period[p], compact=compact)
                if p in by_period
                else Text("-", style="dim")
                for p in periods
            ),
            *_last_decision(tenant["recent"], now_ms),
        )
    if not tenants:
        return Group(header, Text("no tenants yet", style="dim"))
    return Group(header, table)


async def run_top(
    settings: Settings,
    *,
    interval_s: float = 1.0,
    once: bool = False,
    console: Console | None = None,
) -> int:
    """Show the status every ``interval_s`` until Ctrl-C/SIGTERM; ``once`` prints one table."""
    console = console or Console()
    prefix = settings.key_prefix
    async with redis_from_settings(settings) as redis:
        snapshot = await status_snapshot(redis, prefix=prefix, now_ms=_now_ms())
        if once:
            console.print(render_snapshot(snapshot, width=console.width))
            return 0
        stop = stop_event_on_signals()
        try:
            with Live(
                render_snapshot(snapshot, width=console.width),
                console=console,
                auto_refresh=False,
                transient=False,
            ) as live:
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=max(0.1, interval_s))
                    if stop.is_set():
                        break
                    snapshot = await status_snapshot(redis, prefix=prefix, now_ms=_now_ms())
                    live.update(render_snapshot(snapshot, width=console.width), refresh=True)
        finally:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
    return 0
