"""``budgeter usage export`` and ``budgeter usage report``: the per-request ledger
(budgeter/ledger) as CSV/JSONL, streamed, and grouped into a chargeback table.

    budgeter usage export --tenant T [--since 30d] [--until ...] [--format csv|jsonl]
    budgeter usage report [--tenant T] --group-by tenant|model|tag:<name>|day|batch
        [--since ...] [--until ...] [--format table|csv]

Export streams a page at a time to stdout (a rich progress bar on stderr when it is a
terminal, sized by the stream's length). The report's total row is the sum of every entry
read; with no ``--since``/``--until`` it covers every entry kept, and the line under the
table compares it with the tenants' all-time usage counters (equal unless entries were
trimmed by the retention).
"""

from __future__ import annotations

import csv
import datetime as dt
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from typing import TextIO

from budgeter.domain import jsonio
from budgeter.ledger.entry import LedgerEntry, parse_batch_source
from budgeter.ledger.read import LedgerFilter, iter_entries
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.audit import BadQueryError, parse_since

COLUMNS = (
    "id", "time", "tenant", "key", "ancestors", "model", "input", "output", "cache_creation",
    "cache_read", "usd", "reserved", "outcome", "source", "tags",
)  # fmt: skip
TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")


class LedgerCliError(ValueError):
    """A bad option (the message names it)."""


def window(since: str | None, until: str | None, now_ms: int | None = None) -> LedgerFilter:
    now = now_ms if now_ms is not None else int(time.time() * 1000)
    try:
        return LedgerFilter(
            since_ms=parse_since(since, now_ms=now) if since else None,
            until_ms=parse_since(until, now_ms=now) if until else None,
        )
    except BadQueryError as exc:
        raise LedgerCliError(str(exc)) from None


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def csv_row(e: LedgerEntry) -> list[str]:
    return [
        e.id, _iso(e.time_ms), e.tenant, e.key or "", ",".join(e.ancestors), e.model,
        str(e.input), str(e.output), str(e.cache_creation), str(e.cache_read), f"{e.usd:.6f}",
        str(e.reserved), e.outcome, e.source, jsonio.dumps_str(e.tags) if e.tags else "",
    ]  # fmt: skip


async def export(
    redis: RedisClient,
    keys: TenantKeys,
    where: LedgerFilter,
    out: TextIO,
    *,
    fmt: str = "csv",
    progress: bool = True,
) -> int:
    """Write the entries to ``out``; answers how many."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(file=sys.stderr)
    total = int(await redis.xlen(keys.ledger))
    writer = csv.writer(out, lineterminator="\n")
    if fmt == "csv":
        writer.writerow(COLUMNS)
    n = 0
    with Progress(
        TextColumn("[bold]ledger of " + keys.tenant),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=not (progress and console.is_terminal),
    ) as bar:
        task = bar.add_task("export", total=total)
        async for entry in iter_entries(redis, keys, where):
            if fmt == "csv":
                writer.writerow(csv_row(entry))
            else:
                out.write(jsonio.dumps_str(entry.model_dump(mode="json")) + "\n")
            n += 1
            if n % 1000 == 0:
                bar.update(task, completed=n)
        bar.update(task, completed=n)
    return n


def group_of(entry: LedgerEntry, group_by: str) -> str:
    if group_by == "tenant":
        return entry.tenant
    if group_by == "model":
        return entry.model
    if group_by == "day":
        return _iso(entry.time_ms)[:10]
    if group_by == "batch":
        batch = parse_batch_source(entry.source)
        return batch[0] if batch else "(proxy)"
    if group_by.startswith("tag:"):
        return entry.tags.get(group_by[4:], "(none)")
    raise LedgerCliError(f"--group-by: {group_by!r}: tenant, model, tag:<name>, day or batch")


def check_group_by(group_by: str) -> str:
    ok = group_by in ("tenant", "model", "day", "batch") or (
        group_by.startswith("tag:") and len(group_by) > 4
    )
    if not ok:
        raise LedgerCliError(f"--group-by: {group_by!r}: tenant, model, tag:<name>, day or batch")
    return group_by


Totals = dict[str, float]


def _zero() -> Totals:
    return {"requests": 0, **{k: 0 for k in TOKEN_KINDS}, "usd": 0.0}


async def group(entries: AsyncIterator[LedgerEntry], group_by: str) -> dict[str, Totals]:
    groups: dict[str, Totals] = defaultdict(_zero)
    for_group = check_group_by(group_by)
    async for e in entries:
        g = groups[group_of(e, for_group)]
        g["requests"] += e.outcome != "released"
        for kind in TOKEN_KINDS:
            g[kind] += getattr(e, kind)
        g["usd"] = round(g["usd"] + e.usd, 6)
    return dict(sorted(groups.items()))


def total(groups: Iterable[Totals]) -> Totals:
    out = _zero()
    for g in groups:
        for k, v in g.items():
            out[k] = round(out[k] + v, 6) if k == "usd" else out[k] + v
    return out


async def counters_total(redis: RedisClient, keys: TenantKeys) -> Totals:
    """The tenant's all-time usage counters ('total:total:<model>:<kind>' fields)."""
    out = _zero()
    for field, value in (await redis.hgetall(keys.usage)).items():
        parts = str(field).split(":")
        if len(parts) >= 4 and parts[0] == "total" and parts[-1] in out:
            kind = parts[-1]
            out[kind] = (
                round(out[kind] + float(value), 6) if kind == "usd" else out[kind] + int(value)
            )
    return out


async def _all(
    redis: RedisClient, tenants: list[TenantKeys], where: LedgerFilter
) -> AsyncIterator[LedgerEntry]:
    for keys in tenants:
        async for entry in iter_entries(redis, keys, where):
            yield entry


async def report(
    redis: RedisClient,
    tenants: list[TenantKeys],
    group_by: str,
    where: LedgerFilter,
    out: TextIO,
    *,
    fmt: str = "table",
) -> tuple[dict[str, Totals], Totals]:
    groups = await group(_all(redis, tenants, where), group_by)
    sums = total(groups.values())
    head = [group_by, "requests", *TOKEN_KINDS, "usd"]
    rows = [[name, *(_cell(k, g[k]) for k in head[1:])] for name, g in groups.items()]
    last = ["total", *(_cell(k, sums[k]) for k in head[1:])]
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerows([head, *rows, last])
        return groups, sums
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"usage by {group_by} (from the ledger)", show_footer=False)
    for i, column in enumerate(head):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    table.add_section()
    table.add_row(*last, style="bold")
    console = Console(file=out, width=120)
    console.print(table)
    if where.since_ms is None and where.until_ms is None:
        counted = _zero()
        for keys in tenants:
            counted = total([counted, await counters_total(redis, keys)])
        same = all(counted[k] == sums[k] for k in ("requests", *TOKEN_KINDS))
        console.print(
            "usage counters (all time): "
            + ", ".join(f"{k} {_cell(k, counted[k])}" for k in ("requests", *TOKEN_KINDS, "usd"))
            + (" — equal to the total" if same else " — differ (entries past the retention)"),
            soft_wrap=True,
        )
    return groups, sums


def _cell(kind: str, value: float) -> str:
    return f"{value:.6f}" if kind == "usd" else f"{int(value):,}"
