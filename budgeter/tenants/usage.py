"""A tenant's budgets (limit, used, reserved, remaining, reset) and recorded usage."""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

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


class BudgetReport(TypedDict):
    """One budget of a tenant (the shape of ``api.schemas.BudgetRow``)."""

    period: str
    period_id: str
    unit: Unit
    model: str | None
    limit: int | float
    used: int | float
    reserved: int | float
    remaining: int | float
    resets_at_ms: int


class UsageRow(TypedDict):
    """What one model used in one period (the shape of ``api.schemas.UsageRow``): an
    entry per kind recorded."""

    period: str
    period_id: str
    model: str
    requests: NotRequired[int]
    input: NotRequired[int]
    output: NotRequired[int]
    cache_creation: NotRequired[int]
    cache_read: NotRequired[int]
    usd: NotRequired[float]


class UsageReport(TypedDict):
    """What ``tenant_usage`` answers (the shape of ``api.schemas.UsageAnswer``)."""

    tenant: str
    inflight: int
    queued: int
    budgets: list[BudgetReport]
    usage: list[UsageRow]


def _budget_row(
    policy: dict[str, str],
    budget: dict[str, str],
    model: str | None,
    unit: Unit,
    period: str,
    now_ms: int,
) -> BudgetReport | None:
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
    return {
        "period": period,
        "period_id": pid,
        "unit": unit,
        "model": model,
        "limit": limit,
        "used": used,
        "reserved": reserved,
        "remaining": remaining,
        "resets_at_ms": reset,
    }


def _usage_rows(usage: dict[str, str], now_ms: int) -> list[UsageRow]:
    """The usage hash ('<period>:<period id>:<model>:<kind>', written by settle.lua) of
    the current day, month and total, one row per (period, model)."""
    wanted = {period: period_of(period, now_ms)[0] for period in ("day", "month", "total")}
    rows: dict[tuple[str, str], UsageRow] = {}
    for field, value in usage.items():
        period, pid, rest = field.split(":", 2)
        model, _, kind = rest.rpartition(":")
        if wanted.get(period) != pid or kind not in USAGE_KINDS:
            continue
        row = rows.setdefault((period, model), {"period": period, "period_id": pid, "model": model})
        if kind == "usd":
            row["usd"] = round(float(value), 6)
        else:
            row[kind] = int(value)  # type: ignore[literal-required]  # kind is in USAGE_KINDS
    order = {"day": 0, "month": 1, "total": 2}
    return [rows[k] for k in sorted(rows, key=lambda k: (order[k[0]], k[1]))]


async def tenant_usage(
    redis: RedisClient, tenant: str, *, prefix: str = "budgeter", now_ms: int
) -> UsageReport | None:
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
    return {
        "tenant": tenant,
        "inflight": int(inflight),
        "queued": int(queued),
        "budgets": budgets,
        "usage": _usage_rows(usage, now_ms),
    }
