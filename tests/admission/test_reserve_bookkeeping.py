"""admission/reserve.lua's bookkeeping, asserted exactly on the Redis keys (issue 21, item
3: each test kills named mutants of tools/mutate_lua.py that the behavioural tests let live).

Reserves made together (``asyncio.gather``) are decided in one script call, so what the
script carries from one request to the next (the in-flight count, the recent list's
cut-off) shows.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.admission.recent import parse_recent
from budgeter.domain.periods import period_of
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import PriceTable
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
DAY = 86_400_000


async def make(redis: Redis, policy: dict[str, object]) -> Admission:
    await TenantStore(redis).put("acme", TenantPolicy.model_validate(policy))
    return Admission(redis, prices=PriceTable(bundled=False))


async def test_the_recent_list_keeps_exactly_the_last_20_decisions_of_one_call(
    redis: Redis,
) -> None:
    """25 reserves in one call: the list holds the last 20, newest first."""
    adm = await make(redis, {})
    decisions = await asyncio.gather(
        *(adm.reserve("acme", f"r{n}", n, 1, now_ms=NOW) for n in range(25))
    )
    assert all(d.kind == "ADMIT" for d in decisions)
    recent = [parse_recent(e) for e in await redis.lrange(adm.keys("acme").recent, 0, -1)]
    assert [e["tokens"] for e in recent] == [n + 1 for n in range(24, 4, -1)]
    assert {(e["at_ms"], e["decision"], e["reason"]) for e in recent} == {(NOW, "ADMIT", "")}


async def test_exactly_20_reserves_in_one_call_are_all_recorded(redis: Redis) -> None:
    adm = await make(redis, {})
    await asyncio.gather(*(adm.reserve("acme", f"r{n}", n, 1, now_ms=NOW) for n in range(20)))
    recent = [parse_recent(e) for e in await redis.lrange(adm.keys("acme").recent, 0, -1)]
    assert [e["tokens"] for e in recent] == [n + 1 for n in range(19, -1, -1)]


async def test_the_recent_list_is_trimmed_to_20_across_calls(redis: Redis) -> None:
    adm = await make(redis, {})
    for n in range(23):
        await adm.reserve("acme", f"r{n}", n, 1, now_ms=NOW)
    recent = [parse_recent(e) for e in await redis.lrange(adm.keys("acme").recent, 0, -1)]
    assert [e["tokens"] for e in recent] == [n + 1 for n in range(22, 2, -1)]


async def test_the_in_flight_count_grows_with_each_admit_of_one_call(redis: Redis) -> None:
    """max_concurrency 2, three reserves in one call: ADMIT, ADMIT, DEFER."""
    adm = await make(redis, {"max_concurrency": 2})
    decisions = await asyncio.gather(
        *(adm.reserve("acme", f"r{n}", 1, 1, now_ms=NOW) for n in range(3))
    )
    assert [(d.kind, d.reason) for d in decisions] == [
        ("ADMIT", ""),
        ("ADMIT", ""),
        ("DEFER", "concurrency"),
    ]
    assert await redis.hlen(adm.keys("acme").resv) == 2


async def test_a_new_period_starts_its_counter_from_nothing_used(redis: Redis) -> None:
    """Yesterday's use is not carried into today's counter: after today's first ADMIT the
    day counter holds today's id, 0 used and the new reservation."""
    adm = await make(redis, {"budgets": {"day": 1000}})
    await adm.reserve("acme", "a", 300, 300, now_ms=NOW)
    await adm.settle("acme", "a", Usage(300, 200), now_ms=NOW)
    assert (await adm.reserve("acme", "b", 300, 300, now_ms=NOW + DAY)).kind == "ADMIT"
    counters = await redis.hgetall(adm.keys("acme").budget)
    assert counters == {
        "day:id": period_of("day", NOW + DAY)[0],
        "day:used": "0",
        "day:reserved": "600",
    }
    # and so 300 more fit today (with yesterday's 500 carried over they would not)
    await adm.settle("acme", "b", Usage(300, 300), now_ms=NOW + DAY)
    assert (await adm.reserve("acme", "c", 200, 200, now_ms=NOW + DAY)).kind == "ADMIT"


async def test_an_exhausted_total_budget_is_rejected_even_when_told_to_wait(
    redis: Redis,
) -> None:
    """on_exhausted=wait waits for a reset; a total budget never resets: REJECT (reset 0),
    and nothing more is reserved."""
    adm = await make(redis, {"budgets": {"total": 1000}, "on_exhausted": "wait"})
    await adm.reserve("acme", "a", 400, 400, now_ms=NOW)
    await adm.settle("acme", "a", Usage(400, 400), now_ms=NOW)
    refused = await adm.reserve("acme", "b", 200, 200, now_ms=NOW)
    assert (refused.kind, refused.reason, refused.until_ms) == ("REJECT", "exhausted:total", 0)
    assert (await redis.hgetall(adm.keys("acme").budget))["total:reserved"] == "0"


async def test_a_pause_defers_until_its_end_and_not_at_it(redis: Redis) -> None:
    """paused_until is the first moment that is not paused."""
    adm = await make(redis, {})
    until = NOW + 5000
    await redis.hset(adm.keys("acme").state, "paused_until", until)
    waiting = await adm.reserve("acme", "a", 1, 1, now_ms=until - 1)
    assert (waiting.kind, waiting.reason, waiting.until_ms) == ("DEFER", "paused", until)
    assert (await adm.reserve("acme", "a", 1, 1, now_ms=until)).kind == "ADMIT"


async def test_the_day_after_a_century_without_leap_day_is_named_right(redis: Redis) -> None:
    """2100 is not a leap year: the day after 2100-02-28 is 2100-03-01 (a civil-date
    slip there would name it 2100-02-29)."""
    adm = await make(redis, {"budgets": {"day": 1000}})
    at = 4_107_542_400_000 + 3_600_000  # 2100-03-01T01:00:00Z
    assert period_of("day", at)[0] == "2100-03-01"
    await adm.reserve("acme", "a", 1, 1, now_ms=at)
    assert await redis.hget(adm.keys("acme").budget, "day:id") == "2100-03-01"
