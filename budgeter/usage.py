"""A tenant's budgets (limit, used, reserved, remaining, reset) and recorded usage."""

from __future__ import annotations

from typing import Any

from budgeter.keys import TenantKeys
from budgeter.periods import period_of
from budgeter.policy import PERIODS

USAGE_KINDS = ("requests", "input", "output", "cache_creation", "cache_read")


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
        pipe.llen(keys.queue)
        policy, budget, usage, inflight, queued = await pipe.execute()
    if not policy:
        return None
    budgets = []
    for period in PERIODS:
        limit = policy.get(f"budget:{period}")
        if limit is None:
            continue
        pid, reset = period_of(period, now_ms)
        current = budget.get(f"{period}:id") == pid
        used = int(budget.get(f"{period}:used") or 0) if current else 0
        reserved = int(budget.get(f"{period}:reserved") or 0) if current else 0
        budgets.append(
            {
                "period": period,
                "period_id": pid,
                "limit": int(limit),
                "used": used,
                "reserved": reserved,
                "remaining": max(0, int(limit) - used - reserved),
                "resets_at_ms": reset,
            }
        )
    wanted = {period: period_of(period, now_ms)[0] for period in ("day", "month", "total")}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for field, value in usage.items():
        period, pid, rest = field.split(":", 2)
        model, _, kind = rest.rpartition(":")
        if wanted.get(period) != pid or kind not in USAGE_KINDS:
            continue
        row = rows.setdefault((period, model), {"period": period, "period_id": pid, "model": model})
        row[kind] = int(value)
    order = {"day": 0, "month": 1, "total": 2}
    return {
        "tenant": tenant,
        "inflight": int(inflight),
        "queued": int(queued),
        "budgets": budgets,
        "usage": sorted(rows.values(), key=lambda r: (order[r["period"]], r["model"])),
    }
