"""reserve.lua and settle.lua against a real Redis server, with the clock passed in."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage, admission_from_settings
from budgeter.admission.global_limits import GlobalLimits
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import PriceTable
from budgeter.settings import Settings
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
MINUTE = 60_000


async def make(redis: Redis, policy: dict[str, object], tenant: str = "acme") -> Admission:
    await TenantStore(redis).put(tenant, TenantPolicy.model_validate(policy))
    return Admission(redis)


async def test_admit_then_budget_inflight_defers_then_exhausted_rejects(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}})
    first = await adm.reserve("acme", "r1", 300, 300, now_ms=NOW)
    assert first.kind == "ADMIT"
    # 600 reserved: another 600 would fit after refunds, so it waits for settle (DEFER)
    second = await adm.reserve("acme", "r2", 300, 300, now_ms=NOW)
    assert second.kind == "DEFER" and second.waits_for_settle
    assert second.reason == "inflight:day"
    settled = await adm.settle("acme", "r1", Usage(300, 200), now_ms=NOW)
    assert settled.settled == 1 and settled.waiting_settle
    assert settled.actual_tokens == 500 and settled.reserved_tokens == 600
    # used 500: 600 more cannot fit whatever settles -> REJECT with the reset time
    third = await adm.reserve("acme", "r3", 300, 300, now_ms=NOW)
    assert third.kind == "REJECT" and third.reason == "exhausted:day"
    assert third.until_ms == NOW + 86_400_000
    assert third.detail == "500/1000"
    assert "resets at 2025-11-28T00:00:00Z" in third.describe()
    # the next day it fits again
    assert (await adm.reserve("acme", "r4", 300, 300, now_ms=NOW + 86_400_000)).kind == "ADMIT"


async def test_too_large_for_budget_or_bucket_is_rejected(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 1000}, "rate": {"otpm": 500}})
    big = await adm.reserve("acme", "r1", 900, 200, now_ms=NOW)
    assert big.kind == "REJECT" and big.reason == "too_large:budget:day"
    wide = await adm.reserve("acme", "r2", 10, 600, now_ms=NOW)
    assert wide.kind == "REJECT" and wide.reason == "too_large:rate:otpm"
    assert await redis.hlen(adm.keys("acme").resv) == 0


async def test_rate_bucket_defers_until_the_exact_moment_it_fits(redis: Redis) -> None:
    adm = await make(redis, {"rate": {"itpm": 6000}})  # 100 tokens per second
    assert (await adm.reserve("acme", "a", 5000, 1, now_ms=NOW)).kind == "ADMIT"
    over = await adm.reserve("acme", "b", 2000, 1, now_ms=NOW)
    assert over.kind == "DEFER" and over.reason == "rate:itpm"
    assert over.until_ms == NOW + 10_000  # 1000 tokens missing at 100 tokens/s
    assert (await adm.reserve("acme", "b", 2000, 1, now_ms=over.until_ms - 1)).kind == "DEFER"
    assert (await adm.reserve("acme", "b", 2000, 1, now_ms=over.until_ms)).kind == "ADMIT"


async def test_settle_refunds_unused_output_to_the_bucket(redis: Redis) -> None:
    adm = await make(redis, {"rate": {"otpm": 1000}})
    assert (await adm.reserve("acme", "a", 1, 1000, now_ms=NOW)).kind == "ADMIT"
    assert (await adm.reserve("acme", "b", 1, 500, now_ms=NOW)).kind == "DEFER"
    await adm.settle("acme", "a", Usage(1, 100), now_ms=NOW)
    assert (await adm.reserve("acme", "b", 1, 500, now_ms=NOW)).kind == "ADMIT"


async def test_rpm_counts_requests(redis: Redis) -> None:
    adm = await make(redis, {"rate": {"rpm": 2}})
    assert (await adm.reserve("acme", "a", 1, 1, now_ms=NOW)).kind == "ADMIT"
    assert (await adm.reserve("acme", "b", 1, 1, now_ms=NOW)).kind == "ADMIT"
    third = await adm.reserve("acme", "c", 1, 1, now_ms=NOW)
    assert third.kind == "DEFER" and third.until_ms == NOW + 30_000


async def test_concurrency_limit_waits_for_settle(redis: Redis) -> None:
    adm = await make(redis, {"max_concurrency": 1})
    assert (await adm.reserve("acme", "a", 1, 1, now_ms=NOW)).kind == "ADMIT"
    second = await adm.reserve("acme", "b", 1, 1, now_ms=NOW)
    assert second.kind == "DEFER" and second.reason == "concurrency"
    await adm.settle("acme", "a", Usage(1, 1), now_ms=NOW)
    assert (await adm.reserve("acme", "b", 1, 1, now_ms=NOW)).kind == "ADMIT"


async def test_on_exhausted_wait_defers_until_reset(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"hour": 100}, "on_exhausted": "wait"})
    assert (await adm.reserve("acme", "a", 50, 50, now_ms=NOW)).kind == "ADMIT"
    await adm.settle("acme", "a", Usage(50, 50), now_ms=NOW)
    wait = await adm.reserve("acme", "b", 10, 10, now_ms=NOW + 5)
    assert wait.kind == "DEFER" and wait.reason == "exhausted:hour"
    assert wait.until_ms == NOW + 3_600_000


async def test_settle_is_idempotent(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"total": 10_000}})
    await adm.reserve("acme", "a", 100, 100, now_ms=NOW)
    assert (await adm.settle("acme", "a", Usage(100, 50), now_ms=NOW)).settled == 1
    assert (await adm.settle("acme", "a", Usage(100, 50), now_ms=NOW)).settled == 0
    assert (await adm.charge_full("acme", "a", now_ms=NOW)).settled == 0
    budget = await redis.hgetall(adm.keys("acme").budget)
    assert budget["total:used"] == "150" and budget["total:reserved"] == "0"


async def test_reserve_is_idempotent_by_id(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"total": 1000}})
    await adm.reserve("acme", "a", 100, 100, now_ms=NOW)
    again = await adm.reserve("acme", "a", 100, 100, now_ms=NOW)
    assert again.kind == "ADMIT" and again.reason == "already_reserved"
    assert (await redis.hgetall(adm.keys("acme").budget))["total:reserved"] == "200"
    # a retried reserve still answers so once the tenant's policy is gone (it stays held)
    await redis.delete(adm.keys("acme").policy)
    retried = await adm.reserve("acme", "a", 100, 100, now_ms=NOW)
    assert retried.kind == "ADMIT" and retried.reason == "already_reserved"
    other = await adm.reserve("acme", "b", 100, 100, now_ms=NOW)
    assert other.kind == "REJECT" and other.reason == "unknown_tenant"


async def test_reaper_charges_sent_and_releases_unsent(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"total": 10_000}, "rate": {"rpm": 10}})
    await adm.reserve("acme", "sent", 100, 100, now_ms=NOW, hold_ms=1000)
    await adm.reserve("acme", "unsent", 100, 100, now_ms=NOW, hold_ms=1000)
    await adm.mark_sent("acme", "sent")
    early = await adm.reap("acme", now_ms=NOW + 999)
    assert early.settled == 0
    reaped = await adm.reap("acme", now_ms=NOW + 1000)
    assert (reaped.settled, reaped.charged_full, reaped.released) == (2, 1, 1)
    budget = await redis.hgetall(adm.keys("acme").budget)
    assert budget["total:used"] == "200" and budget["total:reserved"] == "0"
    # a late settle by the worker that was thought dead changes nothing
    assert (await adm.settle("acme", "sent", Usage(1, 1), now_ms=NOW)).settled == 0


async def test_usage_recorded_per_period_model_and_kind(redis: Redis) -> None:
    adm = await make(redis, {})
    await adm.reserve("acme", "a", 100, 100, now_ms=NOW, model="claude-x")
    await adm.settle("acme", "a", Usage(60, 30, 25, 15), now_ms=NOW)
    usage = await redis.hgetall(adm.keys("acme").usage)
    assert usage["day:2025-11-27:claude-x:input"] == "60"
    assert usage["month:2025-11:claude-x:output"] == "30"
    assert usage["total:total:claude-x:cache_creation"] == "25"
    assert usage["total:total:claude-x:cache_read"] == "15"
    assert usage["day:2025-11-27:claude-x:requests"] == "1"


async def test_month_period_rolls_over_on_the_calendar(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"month": 100}})
    end_of_nov = 1_764_547_199_000  # 2025-11-30T23:59:59Z
    await adm.reserve("acme", "a", 50, 50, now_ms=end_of_nov)
    await adm.settle("acme", "a", Usage(50, 50), now_ms=end_of_nov)
    refused = await adm.reserve("acme", "b", 1, 1, now_ms=end_of_nov)
    assert refused.kind == "REJECT" and refused.until_ms == end_of_nov + 1000
    assert (await adm.reserve("acme", "b", 1, 1, now_ms=end_of_nov + 1000)).kind == "ADMIT"


async def test_unknown_tenant_is_rejected(redis: Redis) -> None:
    adm = Admission(redis)
    decision = await adm.reserve("ghost", "a", 1, 1, now_ms=NOW)
    assert decision.kind == "REJECT" and decision.reason == "unknown_tenant"


async def test_server_time_is_used_without_now(redis: Redis) -> None:
    adm = await make(redis, {"budgets": {"day": 100}})
    decision = await adm.reserve("acme", "a", 1, 1)
    seconds, micros = await redis.time()
    assert abs(decision.now_ms - (seconds * 1000 + micros // 1000)) < 60_000


@pytest.mark.parametrize("workers", [16])
async def test_no_overshoot_under_concurrency(redis: Redis, redis_url: str, workers: int) -> None:
    """Invariant 1: many clients race; admitted reservations never exceed the budget."""
    from budgeter.store.client import make_redis

    await make(redis, {"budgets": {"day": 10_000}})
    clients = [make_redis(redis_url) for _ in range(workers)]
    admitted: list[int] = []

    async def client_loop(index: int, client: Redis) -> None:
        adm = Admission(client)
        for n in range(40):
            cost_in, cost_out = 37 + index, 50 + n
            decision = await adm.reserve("acme", f"{index}-{n}", cost_in, cost_out, now_ms=NOW)
            if decision.kind == "ADMIT":
                admitted.append(cost_in + cost_out)
                if n % 3 == 0:
                    await adm.settle("acme", f"{index}-{n}", Usage(cost_in, 1), now_ms=NOW)

    await asyncio.gather(*(client_loop(i, c) for i, c in enumerate(clients)))
    for client in clients:
        await client.aclose()
    budget = await redis.hgetall(Admission(redis).keys("acme").budget)
    assert int(budget["day:used"]) + int(budget["day:reserved"]) <= 10_000
    assert sum(admitted) > 0


def test_admission_from_settings_wires_every_setting(redis: Redis) -> None:
    """Every process builds its admission here: the prefix everywhere, the global limits,
    the price table of BUDGETER_PRICES, the tenant tree and the ledger's retention."""
    price = {"input": 3.0, "output": 15.0}
    settings = Settings(key_prefix="bx", prices={"claude-x": price}, ledger_retention_days=2)
    adm = admission_from_settings(redis, settings)
    assert adm.prefix == "bx"
    assert isinstance(adm.global_limits, GlobalLimits) and adm.global_limits.prefix == "bx"
    assert isinstance(adm.prices, PriceTable) and "claude-x" in adm.prices.overrides
    assert adm.tree._parents_key.startswith("bx:")
    assert adm.ledger_retention_ms == 2 * 86_400_000
