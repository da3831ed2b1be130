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

TIMES = "\N{MULTIPLICATION SIGN}"
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


def _last_decision(groups: list[dict[str, Any]], now_ms: int) -> tuple[Text, Text]:
    """(how long ago, decision and reason) of the newest run of identical decisions, with
    its count: 'DEFER rate:rpm x12' (with a multiplication sign)."""
    if not groups:
        return Text("-", style="dim"), Text("-", style="dim")
    last = groups[0]
    text = Text(last["decision"], style=DECISION_STYLE.get(last["decision"], "bold"))
    if last["reason"]:
        text.append(f" {last['reason']}")
    if last["count"] > 1:
        text.append(f" {TIMES}{last['count']}", style="bold")
    return Text(f"{_age((now_ms - last['last_at_ms']) / 1000)} ago", style="dim"), text


def _until(ms: int) -> str:
    """'in 12s'; under a second 'due now' (never '0s')."""
    return f"in {_age(ms / 1000)}" if ms >= 1000 else "due now"


def _rate_cell(rates: list[dict[str, Any]], now_ms: int) -> Text:
    """The fullest rate bucket: 'rpm 95% 57s' (fill, and when its whole limit is free)."""
    if not rates:
        return Text("-", style="dim")
    fullest = max(rates, key=lambda r: r["fill"])
    pct = 100 * fullest["fill"]
    style = "red" if pct >= 90 else "yellow" if pct >= 60 else "green"
    cell = Text(f"{fullest['kind']} ")
    cell.append(f"{pct:.0f}%", style=style)
    wait = fullest["full_at_ms"] - now_ms
    if wait >= 1000:
        cell.append(f" {_age(wait / 1000)}", style="dim")
    return cell


def _batches_cell(batches: list[dict[str, Any]], now_ms: int) -> Text:
    """Open batches together: done/total, and the latest ETA."""
    if not batches:
        return Text("-", style="dim")
    total = sum(b["total"] for b in batches)
    done = total - sum(b["processing"] for b in batches)
    cell = Text(f"{done}/{total}")
    etas = [b["eta_ms"] for b in batches if b["eta_ms"]]
    if etas and max(etas) - now_ms >= 1000:
        cell.append(f" eta {_age((max(etas) - now_ms) / 1000)}", style="dim")
    return cell


def _idle_line(idle: list[str]) -> Text:
    shown = ", ".join(idle[:12]) + (f" and {len(idle) - 12} more" if len(idle) > 12 else "")
    return Text(f"{len(idle)} idle: {shown}", style="dim")


def _header(snapshot: Mapping[str, Any], parked: dict[str, int]) -> Text:
    now_ms = int(snapshot["now_ms"])
    header = Text()
    header.append("budgeter top", style="bold")
    header.append(f"  {time.strftime('%H:%M:%S', time.gmtime(now_ms / 1000))} UTC  ", style="dim")
    header.append(f"tenants {len(snapshot['tenants'])}  ")
    header.append(f"ready {snapshot['scheduler']['ready']}  ", style="cyan")
    header.append(f"parked {len(parked)}", style="yellow" if parked else "")
    if parked:
        header.append(
            " (" + ", ".join(f"{t} {_until(u - now_ms)}" for t, u in parked.items()) + ")",
            style="dim",
        )
    return header


NARROW_DROPS = ("oldest", "batches", "last")
"""Columns left out when the terminal is narrow (budgets then show only their %)."""


def _cells(
    tenant: Mapping[str, Any], periods: list[str], parked: bool, now_ms: int, compact: bool
) -> dict[str, Text | str]:
    by_period = {
        b["period"]: b
        for b in tenant["budgets"]
        if b.get("unit", "tokens") == "tokens" and b.get("model") is None
    }
    depth = int(tenant.get("depth") or 0)
    name = Text("  " * (depth - 1) + "└ " if depth else "", style="dim")
    name.append(tenant["tenant"])
    if parked:
        name.append(" (parked)", style="yellow")
    last, decision = _last_decision(tenant.get("recent_groups", []), now_ms)
    return {
        "tenant": name,
        "queued": f"{tenant['queued']:,}",
        "inflight": f"{tenant['inflight']:,}",
        "oldest": _age(tenant["oldest_age_s"]) if tenant["queued"] else "-",
        **{
            p: _budget_cell(by_period[p], compact=compact)
            if p in by_period
            else Text("-", style="dim")
            for p in periods
        },
        "rate": _rate_cell(tenant.get("rates", []), now_ms),
        "batches": _batches_cell(tenant.get("batches", []), now_ms),
        "last": last,
        "decision": decision,
    }


def tree_rows(snapshot: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], list[str]]:
    """(the rows to show: the organisation tree depth first, siblings busiest first as the
    snapshot orders them; the tenants folded away: every tenant of an idle subtree). A
    parent shows while anything below it is busy, even when it is idle itself."""
    tenants = snapshot["tenants"]
    by_name = {t["tenant"]: t for t in tenants}
    roots = [by_name[r] for r in snapshot.get("roots", [t["tenant"] for t in tenants])]
    shown: list[Mapping[str, Any]] = []
    folded: list[str] = []

    def quiet(t: Mapping[str, Any]) -> bool:
        return bool(t.get("subtree_idle", t.get("idle")))

    def fold(t: Mapping[str, Any]) -> None:
        folded.append(t["tenant"])
        for child in t.get("children", []):
            fold(by_name[child])

    def walk(t: Mapping[str, Any]) -> None:
        if quiet(t):
            fold(t)
            return
        shown.append(t)
        for child in t.get("children", []):
            walk(by_name[child])

    for root in roots:
        walk(root)
    return shown, sorted(folded)


def render_snapshot(snapshot: Mapping[str, Any], *, width: int = 200) -> Group:
    """The header line, one table row per active tenant in the organisation tree (children
    indented under their parent, siblings busiest first: the snapshot's order), and one
    line naming the idle ones. When narrow, budgets show as % only and the age, batch and
    time columns are left out."""
    now_ms = int(snapshot["now_ms"])
    tenants = snapshot["tenants"]
    parked = {p["tenant"]: p["until_ms"] for p in snapshot["scheduler"]["parked"]}
    header = _header(snapshot, parked)
    if not tenants:
        return Group(header, Text("no tenants yet", style="dim"))
    active, idle = tree_rows(snapshot)
    periods = [p for p in PERIODS if any(b["period"] == p for t in active for b in t["budgets"])]
    compact = width < 150 + 22 * len(periods)
    columns = ["tenant", "queued", "inflight", "oldest", *periods, "rate", "batches", "last"]
    columns = [c for c in columns if not (compact and c in NARROW_DROPS)] + ["decision"]
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
    for column in columns:
        if column == "decision":
            table.add_column(column, min_width=16 if compact else 24)
        elif column in periods:
            table.add_column(column, justify="right")
        else:
            left = column in ("tenant", "rate")
            table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for tenant in active:
        cells = _cells(tenant, periods, tenant["tenant"] in parked, now_ms, compact)
        table.add_row(*(cells[c] for c in columns))
    parts: list[Table | Text] = [header]
    parts.append(table if active else Text("every tenant is idle", style="dim"))
    if idle:
        parts.append(_idle_line(idle))
    return Group(*parts)


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
