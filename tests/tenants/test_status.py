"""tenants/status.py: rate buckets read as reserve.lua stores them, open batches with an
ETA, decisions grouped into runs, tenants ordered by activity with the idle ones last."""

from __future__ import annotations

import time
from typing import cast

from redis.asyncio import Redis

from budgeter.admission.admission import Admission
from budgeter.admission.recent import RecentDecision
from budgeter.domain.policy import TenantPolicy
from budgeter.queue.batches import BatchStatus
from budgeter.tenants.status import (
    IDLE_AFTER_MS,
    TenantStatus,
    batch_progress,
    bucket_status,
    group_decisions,
    order_by_activity,
    status_snapshot,
)
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000


def decision(at_ms: int, kind: str, reason: str = "", tokens: int = 10) -> RecentDecision:
    return {"at_ms": at_ms, "decision": kind, "reason": reason, "tokens": tokens}


def test_a_bucket_holds_its_debt() -> None:
    # 60 rpm: one request is 1 s of debt; 30.5 s of debt is 31 requests in use
    state = bucket_status("rpm", None, 60, NOW + 30_500, NOW)
    assert state["in_use"] == 31 and state["remaining"] == 29
    assert state["full_at_ms"] == NOW + 30_500 and state["fill"] == round(31 / 60, 4)
    assert bucket_status("rpm", None, 60, None, NOW)["in_use"] == 0
    idle = bucket_status("itpm", "m", 1000, NOW - 5000, NOW)  # a past TAT: full
    assert idle["in_use"] == 0 and idle["full_at_ms"] == NOW and idle["model"] == "m"
    assert bucket_status("rpm", None, 20, NOW + 60_000, NOW)["fill"] == 1.0


def test_decisions_group_into_runs_newest_first() -> None:
    recent = [
        decision(NOW, "DEFER", "rate:rpm"),
        decision(NOW - 1000, "DEFER", "rate:rpm"),
        decision(NOW - 2000, "DEFER", "rate:rpm"),
        decision(NOW - 3000, "ADMIT"),
        decision(NOW - 4000, "DEFER", "rate:rpm"),
    ]
    groups = group_decisions(recent)
    assert [(g["decision"], g["reason"], g["count"]) for g in groups] == [
        ("DEFER", "rate:rpm", 3),
        ("ADMIT", "", 1),
        ("DEFER", "rate:rpm", 1),
    ]
    assert groups[0]["first_at_ms"] == NOW - 2000 and groups[0]["last_at_ms"] == NOW
    assert groups[0]["tokens"] == 30
    assert group_decisions([]) == []


def status(now_ms: int, **over: object) -> BatchStatus:
    fields: dict[str, object] = {
        "id": "msgbatch_1",
        "tenant": "t",
        "created_ms": now_ms - 10_000,
        "expires_ms": now_ms + 86_400_000,
        "ended_ms": None,
        "cancel_initiated_ms": None,
        "processing": 30,
        "succeeded": 8,
        "errored": 2,
        "canceled": 0,
        "expired": 0,
    } | over
    return BatchStatus(**fields)  # type: ignore[arg-type]


def test_batch_eta_at_its_own_pace() -> None:
    # 10 done in 10 s: the 30 left take 30 s more
    progress = batch_progress(status(NOW), NOW)
    assert progress["eta_ms"] == NOW + 30_000 and progress["total"] == 40
    assert batch_progress(status(NOW, succeeded=0, errored=0), NOW)["eta_ms"] is None
    assert batch_progress(status(NOW, cancel_initiated_ms=NOW), NOW)["canceling"] is True


def row(tenant: str, **over: object) -> TenantStatus:
    base: dict[str, object] = {
        "tenant": tenant,
        "policy": None,
        "queued": 0,
        "inflight": 0,
        "oldest_age_s": 0.0,
        "budgets": [],
        "usage_today": [],
        "recent": [],
        "recent_groups": [],
        "rates": [],
        "batches": [],
        "parked_until_ms": None,
        "idle": False,
    }
    return cast(TenantStatus, base | over)


def test_busiest_first_idle_last_by_name() -> None:
    old = [decision(NOW - IDLE_AFTER_MS - 1, "ADMIT")]
    rows = [
        row("aaa-idle"),
        row("zzz-busy", queued=50, inflight=2),
        row("bbb-old", recent=old),
        row("mmm-recent", recent=[decision(NOW - 5000, "DEFER", "rate:rpm")] * 3),
        row("ccc-lonely-decision", recent=[decision(NOW - 120_000, "ADMIT")]),
        row("nnn-queued", queued=3),
        row("abc-idle"),
    ]
    ordered = order_by_activity(rows, NOW)
    assert [(r["tenant"], r["idle"]) for r in ordered] == [
        ("zzz-busy", False),
        ("nnn-queued", False),
        ("mmm-recent", False),
        ("ccc-lonely-decision", False),
        ("aaa-idle", True),
        ("abc-idle", True),
        ("bbb-old", True),
    ]


async def test_snapshot_reads_the_buckets_reserve_lua_wrote(redis: Redis) -> None:
    await TenantStore(redis).put(
        "limited",
        TenantPolicy.model_validate(
            {"rate": {"rpm": 10, "otpm": 1000}, "models": {"m-1": {"rate": {"itpm": 500}}}}
        ),
    )
    await TenantStore(redis).put("quiet", TenantPolicy())
    adm = Admission(redis)
    for i in range(10):
        assert (await adm.reserve("limited", f"r{i}", 40, 50, model="m-1")).kind == "ADMIT"
    deferred = await adm.reserve("limited", "r10", 40, 50, model="m-1")
    assert (deferred.kind, deferred.reason) == ("DEFER", "rate:rpm")
    now_ms = int(time.time() * 1000)
    snap = await status_snapshot(redis, now_ms=now_ms)
    assert [t["tenant"] for t in snap["tenants"]] == ["limited", "quiet"]
    assert snap["idle"] == 1 and snap["tenants"][1]["idle"]
    limited = snap["tenants"][0]
    rates = {(r["kind"], r["model"]): r for r in limited["rates"]}
    assert list(rates) == [("rpm", None), ("otpm", None), ("itpm", "m-1")]
    tat = float(await redis.hget("budgeter:{t:limited}:buckets", "rpm") or 0)
    assert rates[("rpm", None)] == bucket_status("rpm", None, 10, tat, now_ms)
    assert rates[("rpm", None)]["in_use"] >= 1  # 10 requests at most one per 6 s ago
    assert rates[("otpm", None)]["in_use"] >= 1
    assert rates[("itpm", "m-1")]["limit"] == 500
    assert limited["recent_groups"][0]["decision"] == "DEFER"
    assert limited["recent_groups"][0]["count"] == 1
    assert limited["recent_groups"][1]["count"] == 10
    assert limited["inflight"] == 10 and limited["batches"] == []
