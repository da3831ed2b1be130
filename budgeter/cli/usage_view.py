"""``budgeter usage``: the tree part of the answer (own totals and the subtree's rollup,
each direct child, each API key), as tables under the budgets and usage ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from budgeter.admission.admission import format_ms
from budgeter.tenants.usage import PeriodTotals, UsageAnswer

if TYPE_CHECKING:
    from rich.console import Console


def _cells(totals: list[PeriodTotals]) -> dict[str, PeriodTotals]:
    return {t.period: t for t in totals}


def _pair(row: PeriodTotals | None) -> str:
    if row is None:
        return "-"
    text = f"{row.used:,}"
    if row.reserved:
        text += f" (+{row.reserved:,})"
    return text


def print_tree_usage(console: Console, report: UsageAnswer) -> None:
    """Own totals beside the rollup, one row per direct child, and the keys."""
    from rich.table import Table

    if report.totals is None or report.rollup is None:
        return
    periods = [t.period for t in report.totals]
    rollup = report.rollup
    title = f"tokens used (+reserved) by {report.tenant}"
    if report.parent:
        title += f" (parent: {report.parent})"
    tree = Table(title=title)
    tree.add_column("tenant", justify="left")
    tree.add_column("what", justify="left")
    for period in periods:
        tree.add_column(period, justify="right")
    tree.add_column("requests today", justify="right")
    own, summed = _cells(report.totals), _cells(rollup.totals)
    tree.add_row(
        report.tenant, "own", *(_pair(own.get(p)) for p in periods), f"{own['day'].requests:,}"
    )
    below = f"with {rollup.descendants} below" + (
        f" (first {rollup.tenants - 1} read)" if rollup.capped else ""
    )
    tree.add_row("", below, *(_pair(summed.get(p)) for p in periods), f"{summed['day'].requests:,}")
    for child in report.children or []:
        mine, sub = _cells(child.totals), _cells(child.rollup)
        tree.add_row(
            f"└ {child.tenant}",
            "own",
            *(_pair(mine.get(p)) for p in periods),
            f"{mine['day'].requests:,}",
        )
        if child.descendants:
            tree.add_row(
                "",
                f"with {child.descendants} below",
                *(_pair(sub.get(p)) for p in periods),
                f"{sub['day'].requests:,}",
            )
    console.print(tree)
    if report.keys:
        keys = Table(title=f"API keys of {report.tenant}")
        for column in ("id", "name", "hint", "last used", "usage"):
            keys.add_column(column)
        for key in report.keys:
            keys.add_row(
                key.id,
                key.name or "-",
                f"…{key.hint}",
                "never" if key.last_used_at_ms is None else format_ms(key.last_used_at_ms),
                _key_today(key.usage),
            )
        console.print(keys)
        if report.keys_note:
            console.print(report.keys_note, style="dim")


def _key_today(usage: list[PeriodTotals] | None) -> str:
    """A key's tokens today (+ reserved), as the tenant's rows show them."""
    today = next((t for t in usage or [] if t.period == "day"), None)
    if today is None:
        return "-"
    return f"{today.used:,} (+{today.reserved:,}) today, {today.requests:,} requests"
