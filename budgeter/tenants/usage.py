"""A tenant's budgets (limit, used, reserved, remaining, reset) and recorded usage."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from budgeter.domain.periods import PERIODS, period_of
from budgeter.domain.policy_fields import (
    LimitField,
    budget_counter,
    counter_field,
    field_models,
    format_field,
)
from budgeter.store.keys import TenantKeys
from budgeter.store.types import RedisClient

USAGE_KINDS = ("requests", "input", "output", "cache_creation", "cache_read", "usd")

Unit = Literal["tokens", "usd"]


class BudgetRow(BaseModel):
    """One budget of a tenant: its limit, what is used and reserved this period."""

    period: str
    period_id: str
    unit: Unit = "tokens"
    model: str | None = Field(default=None, description="Set for a limit of one model.")
    limit: int | float
    used: int | float
    reserved: int | float
    remaining: int | float
    resets_at_ms: int


class UsageRow(BaseModel):
    """What one model used in one period: a field per kind recorded (``requests``,
    ``input``, ``output``, ``cache_creation``, ``cache_read``, ``usd``)."""

    model_config = ConfigDict(extra="allow")

    period: str
    period_id: str
    model: str

    def amount(self, kind: str) -> int | float | None:
        """What was recorded of ``kind`` (None when nothing was)."""
        value = (self.model_extra or {}).get(kind)
        return value if isinstance(value, int | float) else None


class PeriodTotals(BaseModel):
    """What one tenant's own records hold for one period (``day``, ``month``, ``total``):
    the usage settle.lua recorded, and what its reservations in flight hold."""

    period: str
    period_id: str
    requests: int = 0
    used: int = Field(default=0, description="Tokens: input + output + cache, settled.")
    reserved: int = Field(default=0, description="Tokens held by reservations in flight.")
    usd_used: float = 0.0
    usd_reserved: float = 0.0


class ChildUsage(BaseModel):
    """A direct child of the tenant: its own totals and those of its whole subtree."""

    tenant: str
    descendants: int = Field(description="Tenants below this child.")
    totals: list[PeriodTotals] = Field(description="The child's own records.")
    rollup: list[PeriodTotals] = Field(description="The child and everything below it.")


class KeyUsage(BaseModel):
    """One API key of the tenant (never the key nor its hash)."""

    id: str
    name: str | None = None
    hint: str = Field(description="The key's last 4 characters.")
    created_at_ms: int
    last_used_at_ms: int | None = None
    usage: list[PeriodTotals] | None = Field(
        default=None, description="What was charged to the key per period (day, month, total)."
    )


class Rollup(BaseModel):
    """The tenant's subtree (the tenant and every descendant) summed per period."""

    tenants: int = Field(description="How many tenants were read and summed.")
    descendants: int = Field(description="Tenants below this one in the tree.")
    capped: bool = Field(description="True when only the first descendants were read.")
    counters_include_descendants: bool = Field(
        description="Whether a tenant's own records already hold its descendants' usage "
        "(false: each records only what was charged to itself, and the rollup adds them)."
    )
    totals: list[PeriodTotals]


class UsageAnswer(BaseModel):
    """What ``tenant_usage`` answers; ``usage_report`` (``GET /admin/tenants/{t}/usage``,
    ``GET /v1/usage``, ``budgeter usage``) adds the tree fields (null otherwise)."""

    tenant: str
    inflight: int
    queued: int
    budgets: list[BudgetRow]
    usage: list[UsageRow]
    parent: str | None = None
    totals: list[PeriodTotals] | None = Field(
        default=None, description="The tenant's own records per period."
    )
    children: list[ChildUsage] | None = None
    keys: list[KeyUsage] | None = None
    keys_note: str | None = None
    rollup: Rollup | None = None


def _budget_row(
    policy: dict[str, str],
    budget: dict[str, str],
    model: str | None,
    unit: Unit,
    period: str,
    now_ms: int,
) -> BudgetRow | None:
    usd = unit == "usd"
    limit_raw = policy.get(format_field(LimitField("usd" if usd else "budget", period, model)))
    if limit_raw is None:
        return None
    number = float if usd else int
    counter = budget_counter(period, usd=usd, model=model)
    pid, reset = period_of(period, now_ms)
    current = budget.get(counter_field(counter, "id")) == pid
    used_raw = budget.get(counter_field(counter, "used")) if current else None
    reserved_raw = budget.get(counter_field(counter, "reserved")) if current else None
    used = number(float(used_raw or 0))
    reserved = number(float(reserved_raw or 0))
    limit = number(float(limit_raw))
    remaining = max(number(0), limit - used - reserved)
    if usd:
        used, reserved, remaining = round(used, 6), round(reserved, 6), round(remaining, 6)
    return BudgetRow(
        period=period,
        period_id=pid,
        unit=unit,
        model=model,
        limit=limit,
        used=used,
        reserved=reserved,
        remaining=remaining,
        resets_at_ms=reset,
    )


def _usage_rows(usage: dict[str, str], now_ms: int) -> list[UsageRow]:
    """The usage hash ('<period>:<period id>:<model>:<kind>', written by settle.lua) of
    the current day, month and total, one row per (period, model)."""
    wanted = {period: period_of(period, now_ms)[0] for period in ("day", "month", "total")}
    rows: dict[tuple[str, str], dict[str, str | int | float]] = {}
    for field, value in usage.items():
        period, pid, rest = field.split(":", 2)
        model, _, kind = rest.rpartition(":")
        if wanted.get(period) != pid or kind not in USAGE_KINDS:
            continue
        row = rows.setdefault((period, model), {"period": period, "period_id": pid, "model": model})
        if kind == "usd":
            row["usd"] = round(float(value), 6)
        else:
            row[kind] = int(value)
    order = {"day": 0, "month": 1, "total": 2}
    return [UsageRow(**rows[k]) for k in sorted(rows, key=lambda k: (order[k[0]], k[1]))]


async def tenant_usage(
    redis: RedisClient, tenant: str, *, prefix: str = "budgeter", now_ms: int
) -> UsageAnswer | None:
    """None when the tenant has no policy."""
    keys = TenantKeys.of(prefix, tenant)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.policy)
        pipe.hgetall(keys.budget)
        pipe.hgetall(keys.usage)
        pipe.hlen(keys.resv)
        for queue in keys.queues:
            pipe.llen(queue)
        policy, budget, usage, inflight, *depths = await pipe.execute()
    queued = sum(int(n) for n in depths)
    if not policy:
        return None
    units: tuple[Unit, ...] = ("tokens", "usd")
    budgets = [
        row
        for model in [None, *field_models(policy)]
        for unit in units
        for period in PERIODS
        if (row := _budget_row(policy, budget, model, unit, period, now_ms)) is not None
    ]
    return UsageAnswer(
        tenant=tenant,
        inflight=int(inflight),
        queued=int(queued),
        budgets=budgets,
        usage=_usage_rows(usage, now_ms),
    )
