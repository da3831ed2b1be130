"""Terminal sparklines of the per-minute rollups (issue 18, item 5): what ``budgeter usage
report --since 1h --chart`` draws under its table, the status page's tokens-per-minute
chart in one line of block characters per tenant.

:func:`sparkline` is pure (values -> characters); :func:`chart_lines` reads the rollups
(budgeter.tenants.rollups) of some tenants and formats one line each."""

from __future__ import annotations

from collections.abc import Sequence

from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.rollups import MINUTE_MS, Minute, read_minutes

BLOCKS = "▁▂▃▄▅▆▇█"
EMPTY = " "  # a column with nothing settled: blank, told apart from a small amount
MAX_WIDTH = 120


def buckets(values: Sequence[int], width: int) -> list[int]:
    """``values`` summed into at most ``width`` columns of consecutive values (the last
    column ends with the last value; oldest first)."""
    if width <= 0 or not values:
        return []
    if len(values) <= width:
        return list(values)
    per = -(-len(values) // width)  # ceil: every column holds ``per`` values but the first
    start = len(values) - per * (len(values) // per)
    columns = [sum(values[:start])] if start else []
    columns += [sum(values[i : i + per]) for i in range(start, len(values), per)]
    return columns


def sparkline(values: Sequence[int], width: int = MAX_WIDTH) -> str:
    """One block character per column, scaled to the largest: 0 is blank, anything above
    0 at least the lowest block."""
    columns = buckets(values, width)
    peak = max(columns, default=0)
    if peak <= 0:
        return EMPTY * len(columns)
    top = len(BLOCKS) - 1
    return "".join(EMPTY if v <= 0 else BLOCKS[v * top // peak] for v in columns)


def _fmt(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    return f"{n:,}"


def chart_line(tenant: str, rows: Sequence[Minute], *, name_width: int, width: int) -> str:
    tokens = [r.tokens for r in rows]
    total, peak = sum(tokens), max(tokens, default=0)
    line = sparkline(tokens, width)
    usd = sum(r.usd for r in rows)
    return (
        f"{tenant:<{name_width}}  {line}  {_fmt(total)} tokens, peak {_fmt(peak)}/min, ${usd:.4f}"
    )


async def chart_lines(
    redis: RedisClient,
    tenants: Sequence[str],
    *,
    prefix: str,
    since_ms: int,
    now_ms: int,
    width: int = 60,
) -> list[str]:
    """A header and one sparkline per tenant of tokens per minute from ``since_ms`` to now
    (at most 48 h back: what the rollups keep), each column ``len(minutes) / width``."""
    name_width = max((len(t) for t in tenants), default=6)
    lines: list[str] = []
    span = 0
    for tenant in tenants:
        rows = await read_minutes(
            redis, TenantKeys(prefix, tenant), since_ms=since_ms, now_ms=now_ms
        )
        span = len(rows)
        lines.append(chart_line(tenant, rows, name_width=name_width, width=width))
    per = max(1, -(-span // width)) if span else 1
    header = f"tokens per minute, the {span} minutes to now" + (
        f" ({per} minutes a column)" if per > 1 else ""
    )
    return [header, *lines]


async def report_chart(
    redis: RedisClient,
    *,
    prefix: str,
    since: str,
    tenants: Sequence[str] | None = None,
    now_ms: int,
    width: int = 60,
) -> list[str]:
    """What ``budgeter usage report --since SINCE --chart`` prints under its table: the
    sparklines of ``tenants`` (default: every tenant with a policy). ``since`` as
    ``--since`` takes it (``1h``, RFC 3339, unix ms); a bad one is a CliError."""
    from budgeter.cli.errors import CliError
    from budgeter.tenants.audit import BadQueryError, parse_since
    from budgeter.tenants.store import TenantStore

    try:
        since_ms = parse_since(since, now_ms=now_ms)
    except BadQueryError as exc:
        raise CliError(f"--{exc}") from None
    names = list(tenants) if tenants else await TenantStore(redis, prefix=prefix).list_ids()
    if not names:
        return ["no tenants"]
    # the minutes after since's own: --since 1h is the current minute and the 59 before
    first_ms = since_ms + MINUTE_MS
    return await chart_lines(
        redis, names, prefix=prefix, since_ms=first_ms, now_ms=now_ms, width=width
    )
