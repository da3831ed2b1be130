"""admission/settle.lua's bookkeeping, asserted exactly on the Redis keys (issue 21, item 3:
each test kills named mutants of tools/mutate_lua.py that the behavioural tests let live).

The buckets, the budget counters, the reservation's three records (resv, resv_sent,
resv_deadline), the usage hash and the reap's answer are read back after one settle of a
known reservation, with the clock passed in.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from budgeter.admission.admission import Admission, Usage
from budgeter.domain.periods import period_of
from budgeter.domain.policy import TenantPolicy
from budgeter.domain.pricing import PriceTable
from budgeter.tenants.store import TenantStore

NOW = 1_764_201_600_000  # 2025-11-27T00:00:00Z
MODEL = "claude-x"


async def make(redis: Redis, policy: dict[str, object]) -> Admission:
    await TenantStore(redis).put("acme", TenantPolicy.model_validate(policy))
    return Admission(redis, prices=PriceTable(bundled=False))  # no model priced


def usage_fields(model: str, at_ms: int, **kinds: int) -> dict[str, str]:
    """The usage hash one settle writes: every kind under day, month and total."""
    fields = {}
    for per in ("day", "month", "total"):
        pid = period_of(per, at_ms)[0]
        for kind, n in kinds.items():
            fields[f"{per}:{pid}:{model}:{kind}"] = str(n)
    return fields


async def test_settle_refunds_each_bucket_by_exactly_the_unused_part(redis: Redis) -> None:
    """itpm: 10 ms a token, otpm: 60 ms a token. Reserved 1000 in / 500 out; used 100 in
    + 200 cache writes + 300 cache reads (600 input in all) and 200 out: the itpm bucket
    moves back 400 tokens (4 s), the otpm bucket 300 tokens (18 s); rpm stays."""
    adm = await make(redis, {"rate": {"rpm": 60, "itpm": 6000, "otpm": 1000}})
    assert (await adm.reserve("acme", "r1", 1000, 500, model=MODEL, now_ms=NOW)).kind == "ADMIT"
    buckets = adm.keys("acme").buckets
    before = {k: float(v) for k, v in (await redis.hgetall(buckets)).items()}
    assert before == {"rpm": NOW + 1000, "itpm": NOW + 10_000, "otpm": NOW + 30_000}
    await adm.settle("acme", "r1", Usage(100, 200, 200, 300), now_ms=NOW)
    after = {k: float(v) for k, v in (await redis.hgetall(buckets)).items()}
    assert after == {"rpm": NOW + 1000, "itpm": NOW + 6_000, "otpm": NOW + 12_000}


async def test_settle_charges_more_input_than_reserved_to_the_bucket(redis: Redis) -> None:
    """The real input over the count moves the itpm bucket forward (the delta's sign)."""
    adm = await make(redis, {"rate": {"itpm": 6000}})
    await adm.reserve("acme", "r1", 1000, 10, model=MODEL, now_ms=NOW)
    await adm.settle("acme", "r1", Usage(1000, 10, 500, 0), now_ms=NOW)
    assert float(await redis.hget(adm.keys("acme").buckets, "itpm")) == NOW + 15_000


async def test_a_released_reservation_gives_its_request_back_to_rpm(redis: Redis) -> None:
    adm = await make(redis, {"rate": {"rpm": 60, "itpm": 6000}})
    await adm.reserve("acme", "r1", 100, 10, model=MODEL, now_ms=NOW)
    await adm.release("acme", "r1", now_ms=NOW)
    buckets = {k: float(v) for k, v in (await redis.hgetall(adm.keys("acme").buckets)).items()}
    assert buckets == {"rpm": NOW, "itpm": NOW}


async def test_a_settled_reservation_leaves_no_record_behind(redis: Redis) -> None:
    """resv, resv_sent and resv_deadline all lose the id, in every mode."""
    adm = await make(redis, {"budgets": {"day": 100_000}})
    keys = adm.keys("acme")
    for n, mode in enumerate(("usage", "full", "release")):
        rid = f"r{n}"
        await adm.reserve("acme", rid, 100, 100, model=MODEL, now_ms=NOW, sent_at_once=True)
        assert await redis.hget(keys.resv_sent, rid) == "1"
        assert await redis.zscore(keys.resv_deadline, rid) == NOW + 90_000
        if mode == "usage":
            await adm.settle("acme", rid, Usage(10, 10), now_ms=NOW)
        elif mode == "full":
            await adm.charge_full("acme", rid, now_ms=NOW)
        else:
            await adm.release("acme", rid, now_ms=NOW)
        assert await redis.hlen(keys.resv) == 0
        assert await redis.hlen(keys.resv_sent) == 0
        assert await redis.zcard(keys.resv_deadline) == 0


async def test_settle_records_the_usage_of_each_kind_and_nothing_else(redis: Redis) -> None:
    """Only the kinds the usage has get a field (no zeros written), plus one request; an
    unpriced model writes no dollars."""
    adm = await make(redis, {"budgets": {"day": 100_000}})
    keys = adm.keys("acme")
    await adm.reserve("acme", "r1", 100, 100, model=MODEL, now_ms=NOW)
    await adm.settle("acme", "r1", Usage(70, 30), now_ms=NOW)
    assert await redis.hgetall(keys.usage) == usage_fields(
        MODEL, NOW, input=70, output=30, requests=1
    )
    await redis.delete(keys.usage)
    await adm.reserve("acme", "r2", 100, 100, model=MODEL, now_ms=NOW)
    await adm.settle("acme", "r2", Usage(0, 0, 40, 60), now_ms=NOW)
    assert await redis.hgetall(keys.usage) == usage_fields(
        MODEL, NOW, cache_creation=40, cache_read=60, requests=1
    )
    budget = await redis.hgetall(keys.budget)
    assert budget["day:used"] == "200" and budget["day:reserved"] == "0"


async def test_settle_sums_the_usage_of_many_reservations_in_one_call(redis: Redis) -> None:
    """Settles batched into one script call add up per field."""
    adm = await make(redis, {})
    for n in range(3):
        await adm.reserve("acme", f"r{n}", 100, 100, model=MODEL, now_ms=NOW)
    await asyncio.gather(
        *(adm.settle("acme", f"r{n}", Usage(10 * (n + 1), 5), now_ms=NOW) for n in range(3))
    )
    assert await redis.hgetall(adm.keys("acme").usage) == usage_fields(
        MODEL, NOW, input=60, output=15, requests=3
    )


async def test_reap_answers_its_totals_and_clears_what_it_settled(redis: Redis) -> None:
    """Two reservations past their deadline: the sent one is charged in full, the other
    released; a deadline entry whose reservation is gone is dropped too."""
    adm = await make(redis, {"budgets": {"day": 100_000}})
    keys = adm.keys("acme")
    await adm.reserve("acme", "sent", 300, 200, model=MODEL, hold_ms=1000, now_ms=NOW)
    assert await adm.mark_sent("acme", "sent")
    await adm.reserve("acme", "idle", 70, 30, model=MODEL, hold_ms=1000, now_ms=NOW)
    await adm.reserve("acme", "later", 1, 1, model=MODEL, hold_ms=60_000, now_ms=NOW)
    await redis.zadd(keys.resv_deadline, {"orphan": NOW})
    reaped = await adm.reap("acme", now_ms=NOW + 1000)
    assert (reaped.settled, reaped.charged_full, reaped.released) == (2, 1, 1)
    assert (reaped.actual_tokens, reaped.reserved_tokens) == (500, 600)
    assert not reaped.waiting_settle
    assert await redis.zrange(keys.resv_deadline, 0, -1) == ["later"]
    assert await redis.hkeys(keys.resv) == ["later"]
    assert await redis.hlen(keys.resv_sent) == 0
    budget = await redis.hgetall(keys.budget)
    assert budget["day:used"] == "500" and budget["day:reserved"] == "2"


async def test_a_reap_that_settles_nothing_leaves_the_waiting_flag(redis: Redis) -> None:
    """The waiting_settle flag is for the settle that frees room; a reap of nothing
    neither reports nor clears it."""
    adm = await make(redis, {"max_concurrency": 1})
    keys = adm.keys("acme")
    await adm.reserve("acme", "a", 1, 1, model=MODEL, hold_ms=60_000, now_ms=NOW)
    assert (await adm.reserve("acme", "b", 1, 1, model=MODEL, now_ms=NOW)).waits_for_settle
    assert await redis.hget(keys.state, "waiting_settle") == "1"
    reaped = await adm.reap("acme", now_ms=NOW + 1000)
    assert (reaped.settled, reaped.waiting_settle) == (0, False)
    assert await redis.hget(keys.state, "waiting_settle") == "1"
    reaped = await adm.reap("acme", now_ms=NOW + 60_000)
    assert (reaped.settled, reaped.waiting_settle, reaped.released) == (1, True, 1)
    assert await redis.hget(keys.state, "waiting_settle") is None
