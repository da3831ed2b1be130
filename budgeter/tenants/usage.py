"""A tenant's budgets (limit, used, reserved, remaining, reset) and recorded usage."""

from __future__ import annotations

from typing import Any

from budgeter.domain.periods import period_of
from budgeter.domain.policy import PERIODS
from budgeter.store.keys import TenantKeys

USAGE_KINDS = ("requests", "input", "output", "cache_creation", "cache_read", "usd")


def _scopes(policy: dict[str, str]) -> list[tuple[str, str | None]]:
    """('', None) for the policy's own limits, ('m:<model>:', model) for each model's."""
    models = sorted(
        {f[2:].rsplit(":", 2)[0] for f in policy if f.startswith("m:") and f.count(":") >= 3}
    )
    return [("", None)] + [(f"m:{model}:", model) for model in models]


def _budget_row(
    policy: dict[str, str],
    budget: dict[str, str],
    scope: str,
    model: str | None,
    unit: str,
    period: str,
    now_ms: int,
) -> dict[str, Any] | None:
    usd = unit == "usd"
    limit_raw = policy.get(f"{scope}{'usd' if usd else 'budget'}:{period}")
    if limit_raw is None:
        return None
    number = float if usd else int
    counter = f"{scope}usd:{period}" if usd else f"{scope}{period}"
    pid, reset = period_of(period, now_ms)
    current = budget.get(f"{counter}:id") == pid
    used = number(float(budget.get(f"{counter}:used") or 0)) if current else number(0)
    reserved = number(float(budget.get(f"{counter}:reserved") or 0)) if current else number(0)
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


async def tenant_usage(
    redis: Any, tenant: str, *, prefix: str = "budgeter", now_ms: int
) -> dict[str, Any] | None:
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
    budgets = [
        row
        for scope, model in _scopes(policy)
        for unit in ("tokens", "usd")
        for period in PERIODS
        if (row := _budget_row(policy, budget, scope, model, unit, period, now_ms)) is not None
    ]
    wanted = {period: period_of(period, now_ms)[0] for period in ("day", "month", "total")}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for field, value in usage.items():
        period, pid, rest = field.split(":", 2)
        model, _, kind = rest.rpartition(":")
        if wanted.get(period) != pid or kind not in USAGE_KINDS:
            continue
        row = rows.setdefault((period, model), {"period": period, "period_id": pid, "model": model})
        row[kind] = round(float(value), 6) if kind == "usd" else int(value)
    order = {"day": 0, "month": 1, "total": 2}
    return {
        "tenant": tenant,
        "inflight": int(inflight),
        "queued": int(queued),
        "budgets": budgets,
        "usage": sorted(rows.values(), key=lambda r: (order[r["period"]], r["model"])),
    }
