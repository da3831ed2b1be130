"""Budget notifications detected inside admission/settle.lua (issue 18, item 4): a policy's
``notify.thresholds`` make the settle that first brings a budget's used share to each
threshold, in a period, append exactly one ``budget.threshold`` event to the tenant's outbox
(and ``budget.exhausted`` at 1.0), however the settles are batched or raced; a new period
notifies again; the reaper's charges count too. Asserted exactly on the stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable
from budgeter.notify.outbox import Outbox
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
DAY = 86_400_000
MODEL = "claude-x"
NOTIFY = {"thresholds": [1.0, 0.5, 0.8]}  # sorted when validated


async def make(redis: Redis, policy: dict[str, object], **kw: Any) -> Admission:
    await TenantStore(redis).put("acme", TenantPolicy.model_validate(policy))
    return Admission(redis, prices=kw.get("prices", PriceTable(bundled=False)))


async def events(redis: Redis) -> list[tuple[str, dict[str, Any]]]:
    entries = await redis.xrange("budgeter:{t:acme}:outbox")
    return [(f["type"], json.loads(f["data"])) for _, f in entries]


async def spend(adm: Admission, rid: str, tokens: int, *, now: int = NOW) -> int:
    """Reserve and settle ``tokens`` output tokens; the events the settle appended."""
    assert (await adm.reserve("acme", rid, 0, tokens, model=MODEL, now_ms=now)).kind == "ADMIT"
    return (await adm.settle("acme", rid, Usage(0, tokens), now_ms=now)).events


async def test_each_threshold_once_at_exactly_its_share(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "notify": NOTIFY})
    assert await spend(adm, "r1", 499) == 0
    assert await events(redis) == []
    assert await spend(adm, "r2", 1) == 1  # used 500 = 0.5 x 1000: reached
    assert await events(redis) == [
        (
            "budget.threshold",
            {"budget": "day", "period": "2025-11-27", "threshold": 0.5, "used": 500, "limit": 1000},
        )
    ]
    assert await spend(adm, "r3", 10) == 0  # still past 0.5: not again
    assert await spend(adm, "r4", 290) == 1  # 800
    assert await spend(adm, "r5", 199) == 0  # 999
    assert await spend(adm, "r6", 1) == 2  # 1000: the last threshold and exhausted
    got = await events(redis)
    assert [(kind, data["threshold"], data["used"]) for kind, data in got] == [
        ("budget.threshold", 0.5, 500),
        ("budget.threshold", 0.8, 800),
        ("budget.threshold", 1.0, 1000),
        ("budget.exhausted", 1.0, 1000),
    ]
    assert await redis.hget(adm.keys("acme").budget, "day:notified") == "2025-11-27 1"
    assert await Outbox(redis).hinted() == ["acme"]


async def test_one_settle_past_two_thresholds_tells_both_in_order(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "notify": NOTIFY})
    assert await spend(adm, "r1", 900) == 2
    assert [d["threshold"] for _, d in await events(redis)] == [0.5, 0.8]


async def test_a_new_period_notifies_again(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "notify": NOTIFY})
    assert await spend(adm, "r1", 600) == 1
    assert await spend(adm, "r2", 600, now=NOW + DAY) == 1
    assert [d["period"] for _, d in await events(redis)] == ["2025-11-27", "2025-11-28"]


async def test_batched_settles_notify_exactly_once(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "notify": NOTIFY})
    for n in range(20):
        await adm.reserve("acme", f"r{n}", 0, 30, model=MODEL, now_ms=NOW)
    results = await asyncio.gather(
        *(adm.settle("acme", f"r{n}", Usage(0, 30), now_ms=NOW) for n in range(20))
    )  # one round: one script call settles all 20 in turn (600 tokens in all)
    assert sum(r.events for r in results) == 1
    assert [d["used"] for _, d in await events(redis)] == [510]  # the 17th: 17 x 30


async def test_reaped_charges_notify_too(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "notify": NOTIFY})
    await adm.reserve(
        "acme", "r1", 0, 700, model=MODEL, hold_ms=1000, now_ms=NOW, sent_at_once=True
    )
    reaped = await adm.reap("acme", now_ms=NOW + 2000)
    assert (reaped.settled, reaped.charged_full, reaped.events) == (1, 1, 1)
    assert [d["used"] for _, d in await events(redis)] == [700]


async def test_usd_and_model_budgets_have_their_own_thresholds(redis: Redis) -> None:
    price = ModelPrice(input=0, output=100_000)  # $0.10 per output token
    policy = {
        "usd_budgets": {"day": 100},
        "models": {MODEL: {"budgets": {"day": 800}}},
        "notify": {"thresholds": [0.5]},
    }
    adm = await make(redis, policy, prices=PriceTable({MODEL: price}, bundled=False))
    assert await spend(adm, "r1", 400) == 1  # the model's 400 of 800; $40 of $100
    assert await spend(adm, "r2", 100) == 1  # $50 of $100 (the model's mark holds)
    got = [(d["budget"], d["used"]) for _, d in await events(redis)]
    assert got == [(f"m:{MODEL}:day", 400), ("usd:day", 50)]


async def test_without_notify_nothing_is_appended(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}})
    assert await spend(adm, "r1", 1000) == 0
    assert await redis.exists("budgeter:{t:acme}:outbox") == 0
    assert await Outbox(redis).hinted() == []


@pytest.mark.parametrize("thresholds", [[], [0], [1.5], [-0.5], [0.1] * 11])
def test_bad_thresholds_are_refused(thresholds: list[float]) -> None:
    with pytest.raises(ValidationError):
        TenantPolicy.model_validate({"notify": {"thresholds": thresholds}})
