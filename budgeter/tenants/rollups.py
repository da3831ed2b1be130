"""Per-minute usage rollups (issue 18, item 5): the home of the field format that
admission/settle.lua writes into a tenant's ``minutes`` hash (``TenantKeys.minutes``) and
the reader every view uses (the API's ``/usage/minutes``, the status page's chart, the
CLI's sparkline).

One field per minute and kind, ``'<minute>:<kind>'`` -> tokens (``usd``: dollars), where
``minute`` is the settle's Redis time in ms // 60,000 and ``kind`` one of :data:`KINDS`;
field ``trimmed`` holds the oldest minute kept. Memory is bounded: the first settle of each
minute deletes the minutes that became older than 48 h (:data:`MINUTES_KEPT`) and sets the
hash to expire 48 h later, so an idle tenant holds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient

Kind = Literal["input", "output", "cache_creation", "cache_read", "usd"]
KINDS: tuple[Kind, ...] = ("input", "output", "cache_creation", "cache_read", "usd")
TOKEN_KINDS: tuple[Kind, ...] = KINDS[:4]
MINUTES_KEPT = 2880  # 48 h: settle.lua's ROLLUP_MINUTES
MINUTE_MS = 60_000
TRIMMED = "trimmed"


def minute_of(ms: int) -> int:
    """The minute id of a time in unix ms."""
    return ms // MINUTE_MS


def format_field(minute: int, kind: Kind) -> str:
    return f"{minute}:{kind}"


def parse_field(field: str) -> tuple[int, Kind] | None:
    """``(minute, kind)`` of a rollup field; None for any other field (``trimmed``)."""
    minute, sep, kind = field.partition(":")
    if not sep or not minute.isdigit() or kind not in KINDS:
        return None
    return int(minute), kind


class Minute(BaseModel):
    """What a tenant's settles charged in one minute (zeros when nothing)."""

    minute: int = Field(description="Unix minute: start of the minute in ms / 60000.")
    start_ms: int
    input: int = 0
    output: int = 0
    cache_creation: int = 0
    cache_read: int = 0
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input + self.output + self.cache_creation + self.cache_read


class MinutesAnswer(BaseModel):
    """``GET .../usage/minutes``: one row per minute from ``since`` to now, oldest first."""

    tenant: str
    since_ms: int
    until_ms: int
    minutes: list[Minute]
    tokens: int = Field(description="Sum of every kind of token over the rows.")
    usd: float


def minutes_from_fields(fields: Mapping[str, str], first: int, last: int) -> list[Minute]:
    """Dense rows for minutes ``first..last`` (inclusive) from the hash's fields."""
    rows = {m: Minute(minute=m, start_ms=m * MINUTE_MS) for m in range(first, last + 1)}
    for field, value in fields.items():
        parsed = parse_field(field)
        if parsed is None or parsed[0] not in rows:
            continue
        minute, kind = parsed
        row = rows[minute]
        if kind == "usd":
            row.usd = round(float(value), 6)
        else:
            setattr(row, kind, int(value))
    return [rows[m] for m in range(first, last + 1)]


async def read_minutes(
    redis: RedisClient, keys: TenantKeys, *, since_ms: int, now_ms: int
) -> list[Minute]:
    """The tenant's rows from the minute of ``since_ms`` (at most 48 h back) to ``now_ms``'s."""
    last = minute_of(now_ms)
    first = max(minute_of(since_ms), last - MINUTES_KEPT + 1)
    first = min(first, last)
    names = [format_field(m, k) for m in range(first, last + 1) for k in KINDS]
    fields: dict[str, str] = {}
    for i in range(0, len(names), 1000):
        chunk = names[i : i + 1000]
        values: Sequence[bytes | str | None] = await redis.hmget(keys.minutes, chunk)
        for name, value in zip(chunk, values, strict=True):
            if value is not None:
                fields[name] = value.decode() if isinstance(value, bytes) else value
    return minutes_from_fields(fields, first, last)


def answer(tenant: str, rows: list[Minute], *, since_ms: int, now_ms: int) -> MinutesAnswer:
    return MinutesAnswer(
        tenant=tenant,
        since_ms=rows[0].start_ms if rows else since_ms,
        until_ms=now_ms,
        minutes=rows,
        tokens=sum(r.tokens for r in rows),
        usd=round(sum(r.usd for r in rows), 6),
    )
