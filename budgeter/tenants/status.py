"""One snapshot of every tenant's state, for the status page and ``budgeter top``."""

from __future__ import annotations

from typing import TypedDict

from budgeter.admission.recent import RecentDecision, parse_recent
from budgeter.queue.jobqueue import oldest_queued_age_s
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage


class TenantStatus(TypedDict):
    tenant: str
    policy: str | None  # the policy's JSON (defaults left out), as the page parses it
    queued: int
    inflight: int
    oldest_age_s: float
    budgets: list[dict[str, object]]  # BudgetRow as JSON
    usage_today: list[dict[str, object]]  # UsageRow as JSON
    recent: list[RecentDecision]


class ParkedTenant(TypedDict):
    tenant: str
    until_ms: int


class SchedulerStatus(TypedDict):
    ready: int
    parked: list[ParkedTenant]


class StatusSnapshot(TypedDict):
    now_ms: int
    tenants: list[TenantStatus]
    scheduler: SchedulerStatus


async def _tenant_status(
    redis: RedisClient, store: TenantStore, tenant: str, *, prefix: str, now_ms: int
) -> TenantStatus | None:
    keys = TenantKeys.of(prefix, tenant)
    report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
    if report is None:
        return None
    recent = await redis.lrange(keys.recent, 0, 9)
    policy = await store.get(tenant)
    oldest_age_s = await oldest_queued_age_s(redis, keys, now_ms)
    return {
        "tenant": tenant,
        "policy": None if policy is None else policy.model_dump_json(exclude_defaults=True),
        "queued": report.queued,
        "inflight": report.inflight,
        "oldest_age_s": round(oldest_age_s, 1),
        "budgets": [row.model_dump(mode="json") for row in report.budgets],
        "usage_today": [row.model_dump(mode="json") for row in report.usage if row.period == "day"],
        "recent": [parse_recent(str(entry)) for entry in recent],
    }


async def status_snapshot(
    redis: RedisClient, *, prefix: str = "budgeter", now_ms: int
) -> StatusSnapshot:
    store = TenantStore(redis, prefix=prefix)
    rows = []
    for tenant in await store.list_ids():
        row = await _tenant_status(redis, store, tenant, prefix=prefix, now_ms=now_ms)
        if row is not None:
            rows.append(row)
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
