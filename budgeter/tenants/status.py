"""One snapshot of every tenant's state, for the status page and ``budgeter top``.

Tenants come ordered by activity: the busiest first (queued + in flight, then the jobs
of their open batches, then how many admission decisions they had lately), and the idle
ones (nothing queued, in flight or open, no decision for ``IDLE_AFTER_MS``) last, by
name, flagged ``idle`` so a view can fold them away. Each tenant carries its rate buckets
as ``admission/reserve.lua`` stores them (fill level, when full again), its open batches
with progress and ETA, and its recent decisions grouped into runs of identical ones.

The organisation tree rides along (``arrange_tree``): each tenant names its ``parent``,
its ``children`` (busiest subtree first) and its ``depth``, and the snapshot its ``roots``,
so a view draws the tree with siblings ordered by activity and idle subtrees folded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NotRequired, TypedDict

from budgeter.admission.recent import RecentDecision, parse_recent
from budgeter.domain.policy_fields import RATE_KINDS, bucket_field, parse_field, parse_tat
from budgeter.queue.batches import BatchStatus, BatchStore
from budgeter.queue.jobqueue import oldest_queued_age_s
from budgeter.store.keys import SchedKeys, TenantKeys
from budgeter.store.types import RedisClient
from budgeter.tenants.rollups import read_minutes
from budgeter.tenants.store import TenantStore
from budgeter.tenants.usage import tenant_usage

IDLE_AFTER_MS = 5 * 60_000
"""A tenant with no work and no admission decision for this long counts as idle."""
BATCHES_SCANNED = 50
"""How many of a tenant's newest batches are looked at for the open ones."""
BUCKET_WINDOW_MS = 60_000
"""A rate bucket holds one minute of its limit (GCRA, continuous refill)."""
CHART_MINUTES = 60
"""The status page's tokens-per-minute chart: the last hour (budgeter.tenants.rollups)."""


class RateBucket(TypedDict):
    kind: str  # rpm | itpm | otpm
    model: str | None  # set for a limit of one model
    limit: int  # per minute
    in_use: int  # requests or tokens the bucket holds now
    remaining: int  # what fits now
    fill: float  # in_use / limit, 0..1
    full_at_ms: int  # when the whole limit is available again (now when it already is)


class BatchProgress(TypedDict):
    id: str
    created_ms: int
    expires_ms: int
    total: int
    succeeded: int
    errored: int
    canceled: int
    expired: int
    processing: int  # queued or in flight
    canceling: bool
    eta_ms: int | None  # at the batch's pace so far; None before its first result


class DecisionGroup(TypedDict):
    """A run of identical consecutive decisions (same decision and reason), newest first."""

    decision: str
    reason: str
    count: int
    first_at_ms: int
    last_at_ms: int
    tokens: int  # the sum over the run


class TenantStatus(TypedDict):
    tenant: str
    policy: str | None  # the policy's JSON (defaults left out), as the page parses it
    queued: int
    inflight: int
    oldest_age_s: float
    budgets: list[dict[str, object]]  # BudgetRow as JSON
    usage_today: list[dict[str, object]]  # UsageRow as JSON
    recent: list[RecentDecision]
    recent_groups: list[DecisionGroup]
    rates: list[RateBucket]
    batches: list[BatchProgress]
    parked_until_ms: int | None
    idle: bool
    parent: NotRequired[str | None]  # in the organisation tree (None: a root)
    children: NotRequired[list[str]]  # direct children, busiest subtree first
    depth: NotRequired[int]  # levels below its root (0: a root)
    subtree_idle: NotRequired[bool]  # it and every tenant below it idle: fold it away
    subtree_today: NotRequired[SubtreeToday | None]  # set for a tenant with children
    minutes: NotRequired[list[int]]  # tokens settled per minute, the last CHART_MINUTES
    minutes_start_ms: NotRequired[int]  # start of the first of them


class SubtreeToday(TypedDict):
    """What the tenant and every tenant below it used today (their own records summed)."""

    tenants: int
    requests: int
    tokens: int
    usd: float


class ParkedTenant(TypedDict):
    tenant: str
    until_ms: int


class SchedulerStatus(TypedDict):
    ready: int
    parked: list[ParkedTenant]


class StatusSnapshot(TypedDict):
    now_ms: int
    tenants: list[TenantStatus]  # by activity, the idle ones last
    roots: list[str]  # the tree's roots, busiest subtree first, idle subtrees last by name
    idle: int  # how many of them are idle
    scheduler: SchedulerStatus


def bucket_status(
    kind: str, model: str | None, limit: int, tat_ms: float | None, now_ms: int
) -> RateBucket:
    """A GCRA bucket of ``limit`` per minute whose theoretical arrival time is ``tat_ms``
    holds ``tat - now`` ms of debt, i.e. ``debt / (60000 / limit)`` units."""
    limit = max(1, limit)
    debt_ms = max(0.0, (tat_ms or now_ms) - now_ms)
    in_use = min(limit, math.ceil(debt_ms * limit / BUCKET_WINDOW_MS - 1e-9))
    return {
        "kind": kind,
        "model": model,
        "limit": limit,
        "in_use": in_use,
        "remaining": limit - in_use,
        "fill": round(in_use / limit, 4),
        "full_at_ms": now_ms + math.ceil(debt_ms),
    }


def rate_buckets(policy: dict[str, str], tats: dict[str, str], now_ms: int) -> list[RateBucket]:
    """Every rate limit of a flat policy with its bucket's state: the tenant's own first
    (rpm, itpm, otpm), then each model's."""
    found: list[tuple[str, str, str | None, int]] = []
    for name, raw in policy.items():
        field = parse_field(name)
        if field is None or field.kind != "rate":
            continue
        try:
            limit = int(float(raw))
        except ValueError:
            continue
        found.append((field.model or "", field.name, field.model, limit))
    found.sort(key=lambda f: (f[0], RATE_KINDS.index(f[1])))
    return [
        bucket_status(kind, model, limit, parse_tat(tats.get(bucket_field(kind, model))), now_ms)
        for _, kind, model, limit in found
    ]


def batch_progress(status: BatchStatus, now_ms: int) -> BatchProgress:
    done = status.total - status.processing
    eta_ms: int | None = None
    if done > 0 and status.processing > 0:
        pace = max(0, now_ms - status.created_ms) / done  # ms per finished request
        eta_ms = now_ms + math.ceil(pace * status.processing)
    return {
        "id": status.id,
        "created_ms": status.created_ms,
        "expires_ms": status.expires_ms,
        "total": status.total,
        "succeeded": status.succeeded,
        "errored": status.errored,
        "canceled": status.canceled,
        "expired": status.expired,
        "processing": status.processing,
        "canceling": status.cancel_initiated_ms is not None,
        "eta_ms": eta_ms,
    }


def group_decisions(recent: list[RecentDecision]) -> list[DecisionGroup]:
    """Runs of identical consecutive decisions ('DEFER rate:rpm' twelve times is one
    group of 12); ``recent`` and the answer are newest first."""
    groups: list[DecisionGroup] = []
    for entry in recent:
        last = groups[-1] if groups else None
        if last and (last["decision"], last["reason"]) == (entry["decision"], entry["reason"]):
            last["count"] += 1
            last["first_at_ms"] = min(last["first_at_ms"], entry["at_ms"])
            last["tokens"] += entry["tokens"]
            continue
        groups.append(
            {
                "decision": entry["decision"],
                "reason": entry["reason"],
                "count": 1,
                "first_at_ms": entry["at_ms"],
                "last_at_ms": entry["at_ms"],
                "tokens": entry["tokens"],
            }
        )
    return groups


def is_idle(row: TenantStatus, now_ms: int) -> bool:
    if row["queued"] or row["inflight"] or row["batches"]:
        return False
    last = max((d["at_ms"] for d in row["recent"]), default=None)
    return last is None or now_ms - last > IDLE_AFTER_MS


def activity_key(row: TenantStatus, now_ms: int) -> tuple[int, int, int, int, int, str]:
    """Sorts the busiest first: idle last; then queued + in flight, the jobs still open in
    its batches, decisions in the last minute, the newest decision; then the name."""
    recent_ms = [d["at_ms"] for d in row["recent"]]
    lately = sum(1 for at in recent_ms if now_ms - at <= 60_000)
    return (
        int(row["idle"]),
        -(row["queued"] + row["inflight"]),
        -sum(b["processing"] for b in row["batches"]),
        -lately,
        -max(recent_ms, default=0),
        row["tenant"],
    )


def order_by_activity(rows: list[TenantStatus], now_ms: int) -> list[TenantStatus]:
    """Flags the idle ones and sorts (see ``activity_key``); idle ones come by name."""
    for row in rows:
        row["idle"] = is_idle(row, now_ms)
    active = sorted((r for r in rows if not r["idle"]), key=lambda r: activity_key(r, now_ms))
    idle = sorted((r for r in rows if r["idle"]), key=lambda r: r["tenant"])
    return active + idle


_TOKEN_KINDS = ("input", "output", "cache_creation", "cache_read")


def _today(row: TenantStatus) -> SubtreeToday:
    usage = row["usage_today"]
    return {
        "tenants": 1,
        "requests": sum(int(str(u.get("requests") or 0)) for u in usage),
        "tokens": sum(int(str(u.get(k) or 0)) for u in usage for k in _TOKEN_KINDS),
        "usd": sum(float(str(u.get("usd") or 0)) for u in usage),
    }


def arrange_tree(
    rows: list[TenantStatus], parents: Mapping[str, str | None], now_ms: int
) -> list[str]:
    """Give each row its place in the organisation tree (``parent``, ``children``,
    ``depth``, ``subtree_idle``, ``subtree_today``) and answer the roots. Siblings come
    busiest subtree first (a subtree is as busy as its busiest tenant, see
    ``activity_key``), idle subtrees last by name. A parent without a row is left out
    (its children become roots). ``rows`` must have been through ``order_by_activity``."""
    by_name = {r["tenant"]: r for r in rows}
    below: dict[str, list[str]] = {}
    for row in rows:
        parent = parents.get(row["tenant"])
        row["parent"] = parent if parent in by_name else None
        if row["parent"] is not None:
            below.setdefault(row["parent"], []).append(row["tenant"])
    keys: dict[str, tuple[int, int, int, int, int]] = {}
    today: dict[str, SubtreeToday] = {}

    def visit(tenant: str, depth: int, seen: set[str]) -> None:
        row = by_name[tenant]
        seen.add(tenant)
        row["depth"] = depth
        own = activity_key(row, now_ms)[:-1]
        best, summed = own, _today(row)
        kids = [c for c in below.get(tenant, []) if c not in seen]
        for child in kids:
            visit(child, depth + 1, seen)
            best = min(best, keys[child])
            # a tenant's own records already hold its descendants' (each request is
            # charged along its chain): only the count of tenants adds up
            summed["tenants"] += today[child]["tenants"]
        keys[tenant], today[tenant] = best, summed
        row["subtree_idle"] = bool(best[0])
        row["children"] = _by_key(kids, keys)
        summed["usd"] = round(summed["usd"], 6)
        row["subtree_today"] = summed if kids else None

    roots = [r["tenant"] for r in rows if r["parent"] is None]
    seen: set[str] = set()
    for root in roots:
        visit(root, 0, seen)
    for row in rows:  # a cycle (never stored: the tree refuses it) shows as roots
        if row["tenant"] not in seen:
            row["parent"] = None
            roots.append(row["tenant"])
            visit(row["tenant"], 0, seen)
    return _by_key(roots, keys)


def _by_key(names: list[str], keys: Mapping[str, tuple[int, int, int, int, int]]) -> list[str]:
    active = sorted((n for n in names if not keys[n][0]), key=lambda n: (keys[n], n))
    return active + sorted(n for n in names if keys[n][0])


async def _open_batches(batches: BatchStore, tenant: str, now_ms: int) -> list[BatchProgress]:
    page, _ = await batches.list_batches(tenant, limit=BATCHES_SCANNED)
    return [batch_progress(b, now_ms) for b in page if not b.ended]


async def _tenant_status(
    redis: RedisClient,
    store: TenantStore,
    batches: BatchStore,
    tenant: str,
    *,
    prefix: str,
    now_ms: int,
    parked_until: int | None,
) -> TenantStatus | None:
    keys = TenantKeys.of(prefix, tenant)
    report = await tenant_usage(redis, tenant, prefix=prefix, now_ms=now_ms)
    if report is None:
        return None
    async with redis.pipeline(transaction=False) as pipe:
        pipe.lrange(keys.recent, 0, 19)
        pipe.hgetall(keys.policy)
        pipe.hgetall(keys.buckets)
        raw_recent, flat_policy, tats = await pipe.execute()
    policy = await store.get(tenant)
    oldest_age_s = await oldest_queued_age_s(redis, keys, now_ms)
    recent = [parse_recent(str(entry)) for entry in raw_recent]
    since = now_ms - (CHART_MINUTES - 1) * 60_000
    minutes = await read_minutes(redis, keys, since_ms=since, now_ms=now_ms)
    return {
        "tenant": tenant,
        "policy": None if policy is None else policy.model_dump_json(exclude_defaults=True),
        "queued": report.queued,
        "inflight": report.inflight,
        "oldest_age_s": round(oldest_age_s, 1),
        "budgets": [row.model_dump(mode="json") for row in report.budgets],
        "usage_today": [row.model_dump(mode="json") for row in report.usage if row.period == "day"],
        "recent": recent,
        "recent_groups": group_decisions(recent),
        "rates": rate_buckets(dict(flat_policy), dict(tats), now_ms),
        "batches": await _open_batches(batches, tenant, now_ms),
        "parked_until_ms": parked_until,
        "idle": False,
        "minutes": [m.tokens for m in minutes],
        "minutes_start_ms": minutes[0].start_ms,
    }


async def status_snapshot(
    redis: RedisClient, *, prefix: str = "budgeter", now_ms: int
) -> StatusSnapshot:
    sched = SchedKeys(prefix)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(sched.ready)
        pipe.zrange(sched.parked, 0, -1, withscores=True)
        ready, raw_parked = await pipe.execute()
    parked: list[ParkedTenant] = [{"tenant": str(t), "until_ms": int(u)} for t, u in raw_parked]
    parked_until = {p["tenant"]: p["until_ms"] for p in parked}
    store = TenantStore(redis, prefix=prefix)
    batches = BatchStore(redis, prefix=prefix)
    rows: list[TenantStatus] = []
    for tenant in await store.list_ids():
        row = await _tenant_status(
            redis,
            store,
            batches,
            tenant,
            prefix=prefix,
            now_ms=now_ms,
            parked_until=parked_until.get(tenant),
        )
        if row is not None:
            rows.append(row)
    ordered = order_by_activity(rows, now_ms)
    roots = arrange_tree(ordered, await store.parents(), now_ms)
    return {
        "now_ms": now_ms,
        "tenants": ordered,
        "roots": roots,
        "idle": sum(1 for r in ordered if r["idle"]),
        "scheduler": {"ready": int(ready), "parked": parked},
    }
