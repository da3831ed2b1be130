"""One snapshot of every tenant's state, for the status page and ``budgeter top``."""

from __future__ import annotations

from typing import Any

from budgeter.queue.jobqueue import oldest_queued_age_s
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage


def parse_decision(entry: str) -> dict[str, Any]:
    """'<ms> <decision> <reason> <tokens>' as written by admission/reserve.lua."""
    ms, decision, reason, tokens = entry.split(" ", 3)
    return {
        "at_ms": int(ms or 0),
        "decision": decision,
        "reason": "" if reason == "-" else reason,
        "tokens": int(tokens or 0),
    }


async def status_snapshot(redis: Any, *, prefix: str = "budgeter", now_ms: int) -> dict[str, Any]:
    tenants = await TenantStore(redis, prefix=prefix).list()
    rows = []
    for tenant in tenants:
        keys = TenantKeys.of(prefix, tenant)
        report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
        if report is None:
            continue
        async with redis.pipeline(transaction=False) as pipe:
            pipe.lrange(keys.recent, 0, 9)
            pipe.hget(keys.policy, "json")
            recent, policy = await pipe.execute()
        oldest_age_s = await oldest_queued_age_s(redis, keys, now_ms)
        rows.append(
            {
                "tenant": tenant,
                "policy": policy,
                "queued": report["queued"],
                "inflight": report["inflight"],
                "oldest_age_s": round(oldest_age_s, 1),
                "budgets": report["budgets"],
                "usage_today": [row for row in report["usage"] if row["period"] == "day"],
                "recent": [parse_decision(entry) for entry in recent],
            }
        )
    sched = SchedKeys(prefix)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(sched.ready)
        pipe.zrange(sched.parked, 0, -1, withscores=True)
        ready, parked = await pipe.execute()
    return {
        "now_ms": now_ms,
        "tenants": rows,
        "scheduler": {
            "ready": int(ready),
            "parked": [{"tenant": t, "until_ms": int(until)} for t, until in parked],
        },
    }
