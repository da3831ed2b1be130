"""USD budgets with prices and long-context tiers, asserted exactly on the Redis keys
(issue 21, item 3: the mutants of admission/reserve.lua, admission/settle.lua and
lib/prices.lua that only the dollar counters show).

One model with distinct prices for every kind and one tier above 200,000 input tokens, so
a price taken from the wrong slot, the wrong tier or with the wrong sign shows in the
counters (budget ``usd:day:*``, the reservation's ``u``, the usage hash's ``usd``).
"""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.periods import period_of
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import ModelPrice, PriceTable, PriceTier
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
MODEL = "claude-priced"
ABOVE = 200_000
PRICE = ModelPrice(
    input=3,
    output=15,
    cache_write=3.75,
    cache_read=0.3,
    tiers=[PriceTier(above=ABOVE, input=6, output=22.5, cache_write=7.5, cache_read=0.6)],
)


async def make(redis: Redis, usd_day: float = 100.0) -> Admission:
    policy = TenantPolicy(budgets={"day": 10_000_000}, usd_budgets={"day": usd_day})
    await TenantStore(redis).put("acme", policy)
    return Admission(redis, prices=PriceTable({MODEL: PRICE}, bundled=False))


async def budget(adm: Admission) -> dict[str, str]:
    return {
        k: v for k, v in (await adm.redis.hgetall(adm.keys("acme").budget)).items() if "usd" in k
    }


def usd_usage(at_ms: int) -> set[str]:
    return {f"{per}:{period_of(per, at_ms)[0]}:{MODEL}:usd" for per in ("day", "month", "total")}


async def usage_usd(adm: Admission) -> set[str]:
    usage = await adm.redis.hgetall(adm.keys("acme").usage)
    return {v for k, v in usage.items() if k.endswith(":usd")}


async def test_reserve_holds_the_dearest_cost_and_settle_charges_the_real_one(
    redis: Redis,
) -> None:
    """1000 in / 500 out reserve (1000 * max(3, 3.75) + 500 * 15) / 1e6 = 0.01125; the
    usage 400 in, 200 out, 100 cache writes, 300 cache reads costs 0.004665."""
    adm = await make(redis)
    assert (await adm.reserve("acme", "r1", 1000, 500, model=MODEL, now_ms=NOW)).kind == "ADMIT"
    pid = period_of("day", NOW)[0]
    assert await budget(adm) == {
        "usd:day:id": pid,
        "usd:day:used": "0.000000",
        "usd:day:reserved": "0.011250",
    }
    record = json.loads(await redis.hget(adm.keys("acme").resv, "r1"))
    assert record["u"] == pytest.approx(0.01125) and record["d"] == {"usd:day": pid}
    await adm.settle("acme", "r1", Usage(400, 200, 100, 300), now_ms=NOW)
    assert await budget(adm) == {
        "usd:day:id": pid,
        "usd:day:used": "0.004665",
        "usd:day:reserved": "0.000000",
    }
    assert await usage_usd(adm) == {"0.004665"}
    usage = await redis.hgetall(adm.keys("acme").usage)
    assert {k for k in usage if k.endswith(":usd")} == usd_usage(NOW)


async def test_two_reservations_add_up_and_a_release_gives_its_dollars_back(
    redis: Redis,
) -> None:
    adm = await make(redis)
    await adm.reserve("acme", "a", 1000, 500, model=MODEL, now_ms=NOW)
    await adm.reserve("acme", "b", 2000, 0, model=MODEL, now_ms=NOW)  # 0.0075
    assert (await budget(adm))["usd:day:reserved"] == "0.018750"
    await adm.release("acme", "a", now_ms=NOW)
    assert (await budget(adm))["usd:day:reserved"] == "0.007500"
    assert (await budget(adm))["usd:day:used"] == "0.000000"
    await adm.charge_full("acme", "b", now_ms=NOW)
    got = await budget(adm)
    assert (got["usd:day:used"], got["usd:day:reserved"]) == ("0.007500", "0.000000")
    assert await usage_usd(adm) == {"0.0075"}


async def test_a_new_day_starts_the_dollar_counter_from_nothing(redis: Redis) -> None:
    adm = await make(redis)
    await adm.reserve("acme", "a", 1000, 0, model=MODEL, now_ms=NOW)
    await adm.settle("acme", "a", Usage(1000, 0), now_ms=NOW)
    assert (await budget(adm))["usd:day:used"] == "0.003000"
    tomorrow = NOW + 86_400_000
    await adm.reserve("acme", "b", 1000, 0, model=MODEL, now_ms=tomorrow)
    assert await budget(adm) == {
        "usd:day:id": period_of("day", tomorrow)[0],
        "usd:day:used": "0.000000",
        "usd:day:reserved": "0.003750",
    }


@pytest.mark.parametrize(
    ("input_tokens", "reserved"),
    [
        # exactly at the threshold: base prices, 200,000 * 3.75 + 1000 * 15
        (ABOVE, "0.765000"),
        # ten tokens over: the tier, 200,010 * 7.5 + 1000 * 22.5 (dearer than the base)
        (ABOVE + 10, "1.522575"),
    ],
)
async def test_reserve_prices_the_tier_the_count_falls_in(
    redis: Redis, input_tokens: int, reserved: str
) -> None:
    adm = await make(redis)
    decision = await adm.reserve("acme", "r", input_tokens, 1000, model=MODEL, now_ms=NOW)
    assert decision.kind == "ADMIT"
    assert (await budget(adm))["usd:day:reserved"] == reserved


@pytest.mark.parametrize(
    ("usage", "usd"),
    [
        # 250,000 input with the cache writes: the tier, 100k * 6 + 1k * 22.5 + 150k * 7.5
        (Usage(100_000, 1000, 150_000, 0), "1.747500"),
        # 250,000 input with the cache reads: the tier, 100k * 6 + 1k * 22.5 + 150k * 0.6
        (Usage(100_000, 1000, 0, 150_000), "0.712500"),
        # exactly 200,000: the base prices, 200k * 3 + 1k * 15
        (Usage(ABOVE, 1000, 0, 0), "0.615000"),
        # under the threshold, every kind at its base price: 1k*3 + 2k*15 + 4k*3.75 + 8k*0.3
        (Usage(1000, 2000, 4000, 8000), "0.050400"),
    ],
)
async def test_settle_prices_the_tier_of_the_real_input(
    redis: Redis, usage: Usage, usd: str
) -> None:
    adm = await make(redis)
    await adm.reserve("acme", "r", 250_000, 2000, model=MODEL, now_ms=NOW)
    await adm.settle("acme", "r", usage, now_ms=NOW)
    got = await budget(adm)
    assert (got["usd:day:used"], got["usd:day:reserved"]) == (usd, "0.000000")


async def test_a_dollar_budget_rejects_what_cannot_fit_and_defers_what_waits(
    redis: Redis,
) -> None:
    """A 0.02 USD day: 0.01125 fits; a second 0.01125 waits for the first to settle; once
    0.015 is spent, it cannot fit (REJECT, the dollars named)."""
    adm = await make(redis, usd_day=0.02)
    assert (await adm.reserve("acme", "a", 1000, 500, model=MODEL, now_ms=NOW)).kind == "ADMIT"
    second = await adm.reserve("acme", "b", 1000, 500, model=MODEL, now_ms=NOW)
    assert (second.kind, second.reason) == ("DEFER", "inflight:usd:day")
    await adm.settle("acme", "a", Usage(0, 1000), now_ms=NOW)  # 0.015
    third = await adm.reserve("acme", "b", 1000, 500, model=MODEL, now_ms=NOW)
    assert (third.kind, third.reason) == ("REJECT", "exhausted:usd:day")
    assert (await budget(adm))["usd:day:reserved"] == "0.000000"
